"""torchvision conventions: the model registry, ``progress``, torch.hub, and loading torchvision weights.

Expected counts are derived here from the architectures (which blocks are MoD, how many tensors a
torchvision block has), not read back from ``mod_models``.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import torch
import torchvision
import torchvision.models as tvm
from torch import nn

import mod_models
from mod_models import MOD_BUILDERS, MoDBlock, load_torchvision_weights, register_with_torchvision
from mod_models.integrations.torchvision import torchvision_model_registry

REPO_ROOT = Path(__file__).resolve().parents[2]

ALL_VARIANTS = sorted([
    "resnet18_mod", "resnet26_mod", "resnet34_mod", "resnet42_mod", "resnet50_mod", "resnet75_mod",
    "resnet86_mod", "resnet101_mod", "resnet152_mod", "mobilenet_v2_mod", "mobilenet_v2_mod_l",
])


# ----------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------


def test_get_model_get_model_builder_and_list_models_find_every_variant():
    assert sorted(tvm.list_models(module=mod_models)) == ALL_VARIANTS
    assert set(ALL_VARIANTS) <= set(tvm.list_models())
    assert sorted(tvm.list_models(include="*_mod*")) == ALL_VARIANTS
    assert "resnet50" in tvm.list_models(module=tvm)  # torchvision's own models are still there
    for name in ALL_VARIANTS:
        assert tvm.get_model_builder(name) is MOD_BUILDERS[name]
    model = tvm.get_model("resnet50_mod", weights=None, progress=False, num_classes=10)
    assert isinstance(model, tvm.ResNet) and model.fc.out_features == 10
    assert isinstance(model.layer3[5], MoDBlock) and not isinstance(model.layer3[4], MoDBlock)
    with pytest.raises(ValueError, match="weights=None"):
        tvm.get_model("resnet18_mod", weights="IMAGENET1K_V1")


@pytest.mark.parametrize("name", ALL_VARIANTS)
def test_get_model_weights_says_no_pretrained_weights_exist(name):
    weights = tvm.get_model_weights(name)  # torchvision's loops over list_models() call this for every model
    assert issubclass(weights, tvm.WeightsEnum) and list(weights) == []
    assert "no pretrained MoD weights exist" in weights.__doc__
    message = r"no pretrained MoD weights exist.*weights=None.*load_torchvision_weights"
    with pytest.raises(AttributeError, match=message):
        getattr(weights, "DEFAULT")  # noqa: B009  (the attribute access is the test)
    with pytest.raises(KeyError, match=message):
        weights["IMAGENET1K_V1"]
    assert tvm.get_model_weights(MOD_BUILDERS[name]) is weights


def test_torchvision_private_registry_is_what_get_model_reads():
    """The one private torchvision API mod_models uses: fails loudly if torchvision changes it."""
    from torchvision.models import _api

    registry = torchvision_model_registry()
    assert registry is _api.BUILTIN_MODELS
    assert registry["resnet50"] is tvm.resnet50 and registry["resnet50_mod"] is mod_models.resnet50_mod

    def probe(**kwargs):
        return nn.Identity()

    registry["probe_only_for_this_test"] = probe
    try:
        assert tvm.get_model_builder("probe_only_for_this_test") is probe
        assert "probe_only_for_this_test" in tvm.list_models()
    finally:
        del registry["probe_only_for_this_test"]
    assert "probe_only_for_this_test" not in tvm.list_models()


def test_registration_is_idempotent_and_never_replaces_a_torchvision_model():
    assert sorted(register_with_torchvision()) == ALL_VARIANTS  # again: nothing changes
    assert tvm.get_model_builder("resnet18_mod") is mod_models.resnet18_mod

    def impostor(**kwargs):
        return nn.Identity()

    with pytest.warns(RuntimeWarning, match="torchvision already registers a model named 'resnet50'"):
        assert register_with_torchvision({"resnet50": impostor}) == []
    assert tvm.get_model_builder("resnet50") is tvm.resnet50


@pytest.mark.parametrize("name", ["resnet18_mod", "mobilenet_v2_mod"])
def test_builders_accept_progress_and_check_their_arguments(name):
    builder = MOD_BUILDERS[name]
    assert builder(progress=False, num_classes=3)(torch.randn(2, 3, 32, 32)).shape == (2, 3)
    with pytest.raises(TypeError, match=f"{name}: progress must be True or False, got 'no'"):
        builder(progress="no")
    with pytest.raises(ValueError, match=f"{name}: num_classes must be an int >= 0, got '10'"):
        builder(num_classes="10")


# ----------------------------------------------------------------------------------------------
# torch.hub
# ----------------------------------------------------------------------------------------------


def test_torch_hub_load_local():
    model = torch.hub.load(str(REPO_ROOT), "resnet50_mod", source="local", num_classes=10, capacity=32)
    assert isinstance(model, tvm.ResNet) and model.fc.out_features == 10
    assert model.layer1[1].k == 256 // 32
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(RuntimeError, match="Cannot find callable resnet19_mod in hubconf"):
        torch.hub.load(str(REPO_ROOT), "resnet19_mod", source="local")


def test_hubconf_entry_points_are_exactly_the_builders():
    spec = importlib.util.spec_from_file_location("hubconf_under_test", REPO_ROOT / "hubconf.py")
    hubconf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hubconf)
    # torch.hub.list's rule: the public callables of hubconf.py.
    entries = sorted(name for name in dir(hubconf) if callable(getattr(hubconf, name)) and not name.startswith("_"))
    assert entries == ALL_VARIANTS
    assert all(getattr(hubconf, name) is MOD_BUILDERS[name] for name in entries)
    assert hubconf.dependencies == ["torch", "torchvision"]


# ----------------------------------------------------------------------------------------------
# load_torchvision_weights
# ----------------------------------------------------------------------------------------------

# Tensors in one torchvision block without downsample: convs have a weight, BatchNorms 5 tensors.
BOTTLENECK_TENSORS = 3 * 1 + 3 * 5
INVERTED_RESIDUAL_TENSORS = (1 + 5) + (1 + 5) + 1 + 5  # expand conv+BN, depthwise conv+BN, project conv, BN


def _is_mod_position_resnet(key: str) -> bool:
    """Every second block of a stage (odd index) is a MoD block."""
    return re.match(r"layer[1-4]\.\d*[13579]\.", key) is not None


def _is_mod_position_mobilenet_v2(key: str) -> bool:
    """Blocks 1, 3, ... of each [t, c, n, s] group of the standard setting: features 3, 5, 8, 10, 12, 15."""
    return re.match(r"features\.(3|5|8|10|12|15)\.", key) is not None


def test_load_torchvision_resnet50_weights_counts_and_values():
    torch.manual_seed(1)
    torchvision_state = tvm.resnet50(weights=None, num_classes=10).state_dict()  # random init, built here
    model = mod_models.resnet50_mod(num_classes=10)
    before = {key: value.clone() for key, value in model.state_dict().items()}

    report = load_torchvision_weights(model, torchvision_state)

    # resnet50 stages (3, 4, 6, 3): MoD blocks at 1 + 2 + 3 + 1 = 7 positions, none with a downsample.
    expected_skipped = 7 * BOTTLENECK_TENSORS
    assert len(report.skipped) == expected_skipped == sum(map(_is_mod_position_resnet, torchvision_state))
    assert len(report.loaded) == len(torchvision_state) - expected_skipped == 320 - 126
    assert report.loaded == [key for key in torchvision_state if not _is_mod_position_resnet(key)]
    assert all(_is_mod_position_resnet(key) for key in report.skipped)
    reason = report.skipped["layer1.1.conv1.weight"]
    assert reason.startswith("MoD block 'layer1.1': its reduced block f_k sees the k selected channels")
    after = model.state_dict()
    for key in report.loaded:
        assert torch.equal(after[key], torchvision_state[key]), key
    assert report.missing == [key for key in after if key not in set(report.loaded)]
    assert report.missing and all(_is_mod_position_resnet(key) for key in report.missing)
    for key in report.missing:  # MoD blocks keep their initial values
        assert torch.equal(after[key], before[key]), key
    assert str(report) == f"loaded 194 tensors, skipped 126, left {len(report.missing)} model tensors as initialised"


def test_load_torchvision_weights_skips_a_head_of_another_size_and_loads_mobilenet_v2():
    torchvision_state = tvm.mobilenet_v2(weights=None).state_dict()  # 1000 classes
    model = mod_models.mobilenet_v2_mod(num_classes=10)
    report = load_torchvision_weights(model, torchvision_state)
    expected_skipped = {key for key in torchvision_state if _is_mod_position_mobilenet_v2(key)} | {
        "classifier.1.weight", "classifier.1.bias"
    }
    assert len(expected_skipped) == 6 * INVERTED_RESIDUAL_TENSORS + 2
    assert set(report.skipped) == expected_skipped
    assert len(report.loaded) == len(torchvision_state) - len(expected_skipped)
    assert "classifier.1.weight" in report.missing and "classifier.1.bias" in report.missing
    assert torch.equal(model.features[0][0].weight, torchvision_state["features.0.0.weight"])


def test_load_torchvision_weights_loads_a_module_all_or_nothing():
    state = tvm.resnet18(weights=None).state_dict()
    state = {key: value.double() for key, value in state.items()}  # also: values are cast to the model's dtype
    state["bn1.running_mean"] = torch.zeros(3)  # one tensor of the stem's BatchNorm no longer fits
    state["extra.weight"] = torch.zeros(1)
    model = mod_models.resnet18_mod()
    stem_bn_before = model.bn1.weight.detach().clone()
    report = load_torchvision_weights(model, state)
    for key in ("bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var", "bn1.num_batches_tracked"):
        assert key in report.skipped and key in report.missing
    assert report.skipped["bn1.weight"].startswith("module 'bn1' does not fit: bn1.running_mean has shape (3,)")
    assert report.skipped["extra.weight"] == "not in the model"
    assert torch.equal(model.bn1.weight, stem_bn_before)
    assert model.conv1.weight.dtype == torch.float32 and torch.equal(model.conv1.weight, state["conv1.weight"].float())


@pytest.mark.parametrize("name, baseline", [
    ("resnet18_mod", "resnet18"), ("resnet50_mod", "resnet50"), ("mobilenet_v2_mod", "mobilenet_v2"),
])
def test_load_torchvision_weights_never_loads_into_a_mod_block(name, baseline):
    # capacity=1: k = C, so f_k has the standard block's tensor shapes, but it sees the channels in score
    # order; a standard block's weights mean nothing there.
    torchvision_state = tvm.get_model(baseline, weights=None).state_dict()
    model = MOD_BUILDERS[name](capacity=1)
    mod_blocks = [n for n, m in model.named_modules() if isinstance(m, MoDBlock)]
    in_a_mod_block = [k for k in torchvision_state if any(k.startswith(b + ".") for b in mod_blocks)]
    assert in_a_mod_block and all(
        model.state_dict()[k].shape == torchvision_state[k].shape for k in in_a_mod_block if "conv" in k
    )
    before = {key: value.clone() for key, value in model.state_dict().items()}
    report = load_torchvision_weights(model, torchvision_state)
    assert not [k for k in report.loaded if k in in_a_mod_block]
    assert sorted(report.skipped) == sorted(in_a_mod_block)
    block = mod_blocks[0]
    assert report.skipped[f"{block}.conv1.weight" if name.startswith("resnet") else f"{block}.conv.0.0.weight"] == (
        f"MoD block {block!r}: its reduced block f_k sees the k selected channels in score order, not a standard "
        "block's channels, so a standard block's tensors mean nothing there (left as initialised)"
    )
    after = model.state_dict()
    for key in after:
        if any(key.startswith(b + ".") for b in mod_blocks):
            assert key in report.missing and torch.equal(after[key], before[key]), key
    assert len(report.loaded) == len(torchvision_state) - len(in_a_mod_block)


def test_load_torchvision_weights_refuses_a_deployed_model_and_changes_nothing():
    model = mod_models.resnet18_mod(num_classes=10).eval()
    mod_models.optimize_for_inference(model)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"deployed by optimize_for_inference.*load .*before optimize_for_inference"):
        load_torchvision_weights(model, tvm.resnet18(weights=None, num_classes=10).state_dict())
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    torchvision_model = tvm.resnet18(weights=None).eval()
    mod_models.optimize_for_inference(torchvision_model)  # a deployed plain model is refused too
    with pytest.raises(ValueError, match="deployed by optimize_for_inference"):
        load_torchvision_weights(torchvision_model, tvm.resnet18(weights=None).state_dict())


def test_load_torchvision_weights_rejects_bad_input():
    model = mod_models.resnet18_mod()
    with pytest.raises(TypeError, match=r"got a ResNet; pass its \.state_dict\(\)"):
        load_torchvision_weights(model, tvm.resnet18())
    with pytest.raises(TypeError, match=r"state_dict\['model'\] must be a torch.Tensor, got OrderedDict; is it a"):
        load_torchvision_weights(model, {"model": tvm.resnet18().state_dict()})
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        load_torchvision_weights("resnet18_mod", {})
    with pytest.raises(ValueError, match="none of the .* tensors of the checkpoint fits ResNet"):
        load_torchvision_weights(model, tvm.mobilenet_v2().state_dict())
    wrapped = {f"module.{key}": value for key, value in tvm.resnet18().state_dict().items()}
    with pytest.raises(ValueError, match="strip the DistributedDataParallel prefix"):
        load_torchvision_weights(model, wrapped)


def test_a_changed_private_registry_is_reported_not_hidden(monkeypatch):
    from torchvision.models import _api

    monkeypatch.delattr(_api, "BUILTIN_MODELS")
    with pytest.raises(RuntimeError, match=f"torchvision {re.escape(torchvision.__version__)} has no dict"):
        torchvision_model_registry()
    # import mod_models keeps working (registration is a convenience) but says why get_model cannot find them
    with pytest.warns(RuntimeWarning, match="cannot register its builders"):
        mod_models._register_with_torchvision()
