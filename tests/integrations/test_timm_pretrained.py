"""Fine-tuning through timm: ``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=...))``
(what timm's train.py makes of ``--pretrained-path``) and ``model.load_pretrained(...)``.

The expectations are timm's: its own ``resnet18`` loads the same files with the same keywords, and the
MoD model must end with the same stem, head (fresh when the class count changes: timm's
``num_classes`` / ``pretrained_cfg["num_classes"]`` rule) and ``in_chans`` adaptation; tensors are
compared with the file's, exactly.
"""

from __future__ import annotations

import logging

import pytest
import timm
import timm.loss
import timm.optim
import torch
import torchvision.models as tvm
from single_thread import one_intra_op_thread  # noqa: F401  (fixture)
from torch import nn

import mod_models
import mod_models.integrations.timm  # noqa: F401  (registers the MoD variants with timm)
from mod_models import MoDBlock

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def _save(state_dict: dict, path) -> str:
    torch.save(state_dict, path)
    return str(path)


def _mod_keys(model: nn.Module) -> list[str]:
    blocks = [n for n, m in model.named_modules() if isinstance(m, MoDBlock)]
    return [k for k in model.state_dict() if any(k.startswith(b + ".") for b in blocks)]


def _trained_like(model: nn.Module, seed: int = 3) -> nn.Module:
    """Every tensor moved away from its initial value (a file whose values show where they went)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for value in model.state_dict().values():
            if value.is_floating_point():
                value.add_(torch.randn(value.shape, generator=generator) * 0.1)
    return model


def test_timms_train_py_fine_tuning_call_end_to_end(tmp_path):
    """The call timm's train.py makes for --pretrained-path (10-class file, 5-class model), then one step."""
    source = _trained_like(timm.create_model("resnet18_mod", num_classes=10))
    path = _save(source.state_dict(), tmp_path / "c10.pth")
    torch.manual_seed(1)
    model = timm.create_model(
        "resnet18_mod", pretrained=True, in_chans=3, num_classes=5, drop_rate=0.0, drop_path_rate=None,
        drop_block_rate=None, global_pool=None, bn_momentum=None, bn_eps=None, scriptable=None,
        checkpoint_path=None, pretrained_cfg_overlay=dict(file=path, num_classes=-1),
    )
    torch.manual_seed(1)
    fresh = timm.create_model("resnet18_mod", num_classes=5)
    loaded = model.state_dict()
    for key, value in source.state_dict().items():
        if not key.startswith("fc."):
            assert torch.equal(loaded[key], value), key
    # the head: re-initialised for 5 classes, exactly what the model drew when it was built
    assert model.fc.out_features == 5
    assert torch.equal(model.fc.weight, fresh.fc.weight) and torch.equal(model.fc.bias, fresh.fc.bias)
    assert model.pretrained_cfg["file"] == path

    optimizer = timm.optim.create_optimizer_v2(model, "sgd", lr=0.05, momentum=0.9, weight_decay=1e-4)
    loss_fn = timm.loss.LabelSmoothingCrossEntropy(smoothing=0.1)
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    model.train()
    before = model.layer2[1].router.fc1.weight.detach().clone()
    loss = loss_fn(model(images), labels)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss) and not torch.equal(model.layer2[1].router.fc1.weight, before)


@pytest.mark.parametrize("name", ["resnet18_mod", "mobilenet_v2_mod"])
def test_a_mod_state_dict_of_the_same_variant_loads_every_tensor(name, tmp_path):
    source = _trained_like(timm.create_model(name, num_classes=7))
    path = _save(source.state_dict(), tmp_path / "mod.pth")
    # the class count the cfg declares equals the model's: the head loads too (timm's rule)
    model = timm.create_model(name, pretrained=True, num_classes=7,
                              pretrained_cfg_overlay=dict(file=path, num_classes=7))
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), source.eval()(x), rtol=0, atol=0)
    # a training checkpoint as timm saves them ({"state_dict": ..., "epoch": ...}) loads the same way
    path = _save({"state_dict": source.state_dict(), "epoch": 3}, tmp_path / "checkpoint.pth.tar")
    again = timm.create_model(name, pretrained=True, num_classes=7,
                              pretrained_cfg_overlay=dict(file=path, num_classes=7))
    assert all(torch.equal(again.state_dict()[k], v) for k, v in source.state_dict().items())


def test_the_head_follows_timms_num_classes_rule(tmp_path):
    source = _trained_like(timm.create_model("resnet18_mod", num_classes=10))
    path = _save(source.state_dict(), tmp_path / "c10.pth")
    # timm's rule: the head loads only when the model's class count equals pretrained_cfg["num_classes"]
    # (1000 by default), so a 10-class file into a 10-class model without the overlay gets a fresh head,
    # as timm's own resnet18 does.
    torch.manual_seed(2)
    model = timm.create_model("resnet18_mod", pretrained=True, num_classes=10, pretrained_cfg_overlay=dict(file=path))
    torch.manual_seed(2)
    fresh = timm.create_model("resnet18_mod", num_classes=10)
    assert torch.equal(model.fc.weight, fresh.fc.weight)
    assert torch.equal(model.layer1[1].router.fc1.weight, source.layer1[1].router.fc1.weight)

    timm_source = timm.create_model("resnet18", num_classes=10)
    timm_path = _save(timm_source.state_dict(), tmp_path / "timm_c10.pth")
    timm_model = timm.create_model("resnet18", pretrained=True, num_classes=10,
                                   pretrained_cfg_overlay=dict(file=timm_path))
    assert not torch.equal(timm_model.fc.weight, timm_source.fc.weight)  # timm's own model: fresh head too


@pytest.mark.parametrize("in_chans", [1, 4])
def test_in_chans_adapts_the_stem_as_timm_does(in_chans, tmp_path):
    baseline = _trained_like(tvm.resnet18())
    path = _save(baseline.state_dict(), tmp_path / "resnet18.pth")
    overlay = dict(file=path, num_classes=-1)
    model = timm.create_model("resnet18_mod", pretrained=True, in_chans=in_chans, num_classes=3,
                              pretrained_cfg_overlay=overlay)
    timms_own = timm.create_model("resnet18", pretrained=True, in_chans=in_chans, num_classes=3,
                                  pretrained_cfg_overlay=overlay)
    assert model.conv1.weight.shape == (64, in_chans, 7, 7)
    assert torch.equal(model.conv1.weight, timms_own.conv1.weight)
    assert torch.equal(model.layer1[0].conv1.weight, timms_own.layer1[0].conv1.weight)


@pytest.mark.parametrize("name, baseline", [
    ("resnet18_mod", lambda: tvm.resnet18()), ("resnet18_mod", lambda: timm.create_model("resnet18")),
    ("resnet50_mod", lambda: tvm.resnet50()), ("mobilenet_v2_mod", lambda: tvm.mobilenet_v2()),
])
def test_a_baseline_state_dict_loads_its_standard_blocks(name, baseline, tmp_path, caplog):
    source = _trained_like(baseline())
    path = _save(source.state_dict(), tmp_path / "baseline.pth")
    torch.manual_seed(4)
    with caplog.at_level(logging.INFO, logger="mod_models.integrations.timm"):
        model = timm.create_model(name, pretrained=True, num_classes=5,
                                  pretrained_cfg_overlay=dict(file=path, num_classes=-1))
    torch.manual_seed(4)
    fresh = timm.create_model(name, num_classes=5)
    mod_keys = set(_mod_keys(model))
    head = {"fc.weight", "fc.bias", "classifier.1.weight", "classifier.1.bias"}
    loaded = model.state_dict()
    for key, value in source.state_dict().items():
        if key not in mod_keys and key not in head:
            assert torch.equal(loaded[key], value), key
    for key in mod_keys | (head & set(loaded)):  # MoD blocks and the head as the model drew them
        assert torch.equal(loaded[key], fresh.state_dict()[key]), key
    assert "loaded" in caplog.text and "MoD block" in caplog.text  # the load report is logged


def test_features_only_loads_before_wrapping(tmp_path):
    source = _trained_like(timm.create_model("resnet18_mod", num_classes=10))
    path = _save(source.state_dict(), tmp_path / "c10.pth")
    for feature_cls in ("list", "getter"):
        features = timm.create_model("resnet18_mod", pretrained=True, features_only=True, feature_cls=feature_cls,
                                     pretrained_cfg_overlay=dict(file=path))
        stem = features.conv1 if feature_cls == "list" else features.model.conv1
        assert torch.equal(stem.weight, source.conv1.weight), feature_cls


def _deployed_state_dict() -> dict:
    model = timm.create_model("resnet18_mod", num_classes=10).eval()
    return mod_models.optimize_for_inference(model).state_dict()


@pytest.mark.parametrize("make, message", [
    (_deployed_state_dict, r"the deploy form of a model \(optimize_for_inference folded .* conv1.bias"),
    (lambda: tvm.mobilenet_v2().state_dict(), r"neither a resnet18_mod state_dict nor .* resnet18 state_dict"),
    (lambda: timm.create_model("resnet50_mod").state_dict(), r"neither .*a MoD state_dict of another variant"),
    (lambda: timm.create_model("resnet18_mod", capacity=16).state_dict(),
     r"built with other keywords \(capacity.*layer1.1.conv1.weight has shape \(4, 4, 3, 3\) in the checkpoint, "
     r"\(1, 1, 3, 3\) in the model"),
    (lambda: {"conv1.weight": "not a tensor"}, r"state_dict\['conv1.weight'\] must be a torch.Tensor"),
])
def test_a_foreign_or_deployed_state_dict_is_refused_and_nothing_loads(make, message, tmp_path):
    state_dict = make()
    model = timm.create_model("resnet18_mod", num_classes=10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises((ValueError, TypeError), match=message):
        model.load_pretrained(state_dict)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    if all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        path = _save(state_dict, tmp_path / "foreign.pth")
        with pytest.raises((ValueError, TypeError), match=message):
            timm.create_model("resnet18_mod", pretrained=True, pretrained_cfg_overlay=dict(file=path))


def test_a_head_that_must_load_but_does_not_fit_is_refused(tmp_path):
    path = _save(timm.create_model("resnet18_mod", num_classes=10).state_dict(), tmp_path / "c10.pth")
    with pytest.raises(ValueError, match=r"fc.weight has shape \(10, 512\) in the checkpoint, \(5, 512\) in the "
                                         r"model.*num_classes=-1"):
        timm.create_model("resnet18_mod", pretrained=True, num_classes=5,
                          pretrained_cfg_overlay=dict(file=path, num_classes=5))


@pytest.mark.parametrize("keywords, error, message", [
    ({}, ValueError, r"pretrained=True, but no pretrained weights exist .*pretrained_cfg_overlay=dict\(file="),
    ({"pretrained_cfg_overlay": dict(file="/nonexistent/weights.pth")}, FileNotFoundError,
     "no file /nonexistent/weights.pth"),
    ({"pretrained_cfg_overlay": dict(url="https://example.invalid/w.pth")}, ValueError,
     r"only a local file .*url='https://example.invalid/w.pth'"),
    ({"pretrained_cfg_overlay": dict(hf_hub_id="someone/weights")}, ValueError, "only a local file"),
])
def test_pretrained_without_a_local_file_is_refused_clearly(keywords, error, message):
    with pytest.raises(error, match=message):
        timm.create_model("resnet18_mod", pretrained=True, **keywords)


def test_load_pretrained_refuses_a_deployed_model():
    model = mod_models.optimize_for_inference(timm.create_model("resnet18_mod", num_classes=10).eval())
    with pytest.raises(ValueError, match="before optimize_for_inference"):
        model.load_pretrained(timm.create_model("resnet18_mod", num_classes=10).state_dict())
