"""Fine-tuning: ``python -m mod_models.train --init WEIGHTS`` starts a new run from trained weights
(mod_models.train.finetune): what loads, what starts fresh, what is refused."""

import json
import os

import pytest
import torch
import torchvision
from _training import tiny_config

import mod_models
from mod_models import build_model
from mod_models.blocks import MoDBlock
from mod_models.train import loop as train_module
from mod_models.train import main, train
from mod_models.train.finetune import InitError, apply_init, plan_init, read_init_source
from mod_models.train.run_folder import METRICS_JSON


def tiny_args(out, *extra):
    return [
        "--out", str(out), "--image-size", "16", "--num-classes", "4", "--train-samples", "16",
        "--val-samples", "16", "--batch-size", "16", "--lr", "0.02", "--backend", "reference",
        "--device", "cpu", "--workers", "0", "--no-progress", "--epochs", "1", *extra,
    ]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A one-epoch resnet18_mod run on 4 classes: its folder (checkpoint.pt, best.pt)."""
    out = tmp_path_factory.mktemp("pretrained") / "run"
    train(tiny_config(out, epochs=1, train_samples=16, val_samples=16))
    return out


def _initialised(name, path, num_classes, seed=1, **kwargs):
    """``(model, plan, fresh twin)``: a model built with ``seed`` and initialised from ``path``, and the
    same model built with the same seed and nothing loaded."""
    torch.manual_seed(seed)
    model = build_model(name, num_classes=num_classes, **kwargs)
    torch.manual_seed(seed)
    twin = build_model(name, num_classes=num_classes, **kwargs)
    plan = plan_init(model, name, read_init_source(path))
    apply_init(model, plan)
    return model, plan, twin


def _mod_keys(model):
    blocks = tuple(name + "." for name, module in model.named_modules() if isinstance(module, MoDBlock))
    return {key for key in model.state_dict() if key.startswith(blocks)}


@pytest.mark.parametrize("file", ["checkpoint.pt", "best.pt", "state_dict.pt"])
def test_a_mod_checkpoint_or_state_dict_loads_every_tensor(trained, tmp_path, file):
    source = torch.load(trained / "checkpoint.pt", weights_only=True)["model"]
    path = trained / file
    if file == "state_dict.pt":
        path = tmp_path / file
        torch.save(source, path)
    expected = torch.load(trained / "best.pt", weights_only=True)["model"] if file == "best.pt" else source
    model, plan, _ = _initialised("resnet18_mod", path, 4)
    state = model.state_dict()
    assert set(plan.tensors) == set(state) and plan.fresh == {} and plan.skipped == {}
    for key, tensor in expected.items():
        assert torch.equal(state[key], tensor), key


def test_the_head_is_reinitialised_when_the_class_count_differs(trained):
    source = torch.load(trained / "best.pt", weights_only=True)["model"]
    model, plan, twin = _initialised("resnet18_mod", trained / "best.pt", 6)
    state, fresh = model.state_dict(), twin.state_dict()
    for key in state:
        if key.startswith("fc."):
            assert torch.equal(state[key], fresh[key]), key  # as built, not from the file
            assert "4 classes in the file, 6 here; re-initialised" in plan.fresh[key]
        else:
            assert torch.equal(state[key], source[key]), key
    assert set(plan.skipped) == {"fc.weight", "fc.bias"}


@pytest.mark.parametrize(
    "name, baseline, head",
    [("resnet18_mod", "resnet18", "fc"), ("mobilenet_v2_mod", "mobilenet_v2", "classifier.1")],
)
@pytest.mark.parametrize("wrapping", ["plain", "reference-script", "ddp-prefix"])
def test_a_torchvision_baseline_loads_stem_standard_blocks_and_head(tmp_path, name, baseline, head, wrapping):
    torch.manual_seed(0)
    source = getattr(torchvision.models, baseline)(num_classes=5).state_dict()
    content = {
        "plain": source,
        "reference-script": {"model": source, "optimizer": {}, "epoch": 89},  # torchvision's references/
        "ddp-prefix": {f"module.{key}": value for key, value in source.items()},
    }[wrapping]
    torch.save(content, tmp_path / "baseline.pt")
    model, plan, twin = _initialised(name, tmp_path / "baseline.pt", 5)
    assert plan.through_torchvision
    state, fresh, mod_keys = model.state_dict(), twin.state_dict(), _mod_keys(model)
    assert mod_keys and any(key.startswith(head + ".") for key in plan.tensors)
    for key in state:
        if key in mod_keys:
            assert torch.equal(state[key], fresh[key]), key  # MoD blocks start fresh
            assert "MoD blocks" in plan.fresh[key]
        else:
            assert torch.equal(state[key], source[key]), key  # stem, standard blocks, head
    # The file's standard blocks at MoD positions are reported, not loaded.
    assert plan.skipped and all(reason == "standard blocks where the model has MoD blocks" for reason in
                                plan.skipped.values())


def test_a_refused_plan_leaves_the_model_untouched(tmp_path):
    torch.save(torchvision.models.resnet50(num_classes=4).state_dict(), tmp_path / "r50.pt")
    torch.manual_seed(0)
    model = build_model("resnet18_mod", num_classes=4)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    with pytest.raises(InitError, match="does not fit resnet18_mod"):
        plan_init(model, "resnet18_mod", read_init_source(tmp_path / "r50.pt"))
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())


def _refusals(trained, tmp_path):
    torch.save(torchvision.models.resnet50(num_classes=4).state_dict(), tmp_path / "resnet50.pt")
    deployed = mod_models.optimize_for_inference(build_model("resnet18_mod", num_classes=4).eval())
    torch.save(deployed.state_dict(), tmp_path / "deployed.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a torch file at all")
    torch.save({"epochs": 3, "note": "no tensors"}, tmp_path / "dict.pt")
    data = (trained / "checkpoint.pt").read_bytes()
    (tmp_path / "torn.pt").write_bytes(data[: len(data) // 2])
    return {
        "another-architecture": (tmp_path / "resnet50.pt", [], "does not fit resnet18_mod"),
        "our-checkpoint-of-another-model": (
            trained / "best.pt", ["--model", "resnet34_mod"], "is a checkpoint of resnet18_mod, another architecture"
        ),
        "other-capacity": (
            trained / "best.pt", ["--capacity", "32"], "were its MoD blocks trained with another capacity"
        ),
        "deployed": (tmp_path / "deployed.pt", [], "holds a deployed model (optimize_for_inference"),
        "garbage": (tmp_path / "garbage.pt", [], "cannot be read: UnpicklingError"),
        "torn-checkpoint": (tmp_path / "torn.pt", [], "cannot be read"),
        "no-state-dict": (tmp_path / "dict.pt", [], "holds neither a checkpoint of mod_models.train nor a state dict"),
        "missing": (tmp_path / "missing.pt", [], "no such file"),
    }


REFUSALS = [
    "another-architecture", "our-checkpoint-of-another-model", "other-capacity", "deployed", "garbage",
    "torn-checkpoint", "no-state-dict", "missing",
]


@pytest.mark.parametrize("case", REFUSALS)
def test_init_refuses_what_does_not_fit_before_writing(trained, tmp_path, capsys, case):
    path, extra, message = _refusals(trained, tmp_path)[case]
    out = tmp_path / "run"
    assert main(tiny_args(out, "--init", str(path), *extra)) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: --init") and message in error and error.count("\n") == 1, error
    assert not out.exists()


def test_resume_and_init_are_different_things(trained, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--out", str(tmp_path / "run"), "--resume", "--init", str(trained / "best.pt")])
    assert exit_info.value.code == 2
    assert "argument --init: not allowed with argument --resume" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "start a NEW run" in text and "continue an interrupted run exactly" in text and "use --init" in text


def test_an_init_run_end_to_end(trained, tmp_path, monkeypatch, capsys):
    """One epoch on 3 classes from the 4-class best.pt: the first step sees the file's weights (head
    fresh), the log and metrics.json say what loaded, and a resumed run keeps that record."""
    source = torch.load(trained / "best.pt", weights_only=True)["model"]
    at_start = {}
    real_epoch = train_module.train_one_epoch

    def recording_epoch(train_model, run, *args, **kwargs):
        if not at_start:
            at_start.update({key: value.clone() for key, value in run.model.state_dict().items()})
        return real_epoch(train_model, run, *args, **kwargs)

    monkeypatch.setattr(train_module, "train_one_epoch", recording_epoch)
    out = tmp_path / "run"
    args = tiny_args(out, "--init", str(trained / "best.pt"))
    args[args.index("--num-classes") + 1] = "3"
    assert main(args) == 0
    log = capsys.readouterr().out
    assert f"init from {trained / 'best.pt'} (weights checkpoint of resnet18_mod, epoch 1): loaded 128 tensors" in log
    assert "left fresh: 2 tensors (head fc: 4 classes in the file, 3 here; re-initialised)" in log
    for key, value in at_start.items():
        assert torch.equal(value, source[key]) != key.startswith("fc."), key
    record = json.loads((out / METRICS_JSON).read_text())["init"]
    assert record["path"] == str(trained / "best.pt") and len(record["loaded"]) == 128
    assert set(record["fresh"]) == {"fc.weight", "fc.bias"}
    assert torch.load(out / "checkpoint.pt", weights_only=True)["init"] == record
    assert main(["--out", str(out), "--resume", "--epochs", "2"]) == 0
    assert json.loads((out / METRICS_JSON).read_text())["init"] == record
    assert "init from" not in capsys.readouterr().out  # a resumed run loads its own checkpoint only
    assert os.path.exists(out / "best.pt")


def test_a_timm_resnet_loads_like_torchvision_and_a_timm_mobilenet_is_refused(tmp_path):
    """timm's ResNets use torchvision's module names; its MobileNetV2 does not (conv_stem, blocks...)."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    source = timm.create_model("resnet18", num_classes=5).state_dict()
    torch.save({"state_dict": source}, tmp_path / "timm_resnet18.pt")  # as timm's train.py wraps it
    model, plan, twin = _initialised("resnet18_mod", tmp_path / "timm_resnet18.pt", 5)
    mod_keys = _mod_keys(model)
    for key, value in model.state_dict().items():
        expected = twin.state_dict()[key] if key in mod_keys else source[key]
        assert torch.equal(value, expected), key
    torch.save(timm.create_model("mobilenetv2_100", num_classes=5).state_dict(), tmp_path / "timm_mbv2.pt")
    with pytest.raises(InitError, match="does not fit mobilenet_v2_mod: .* is it another architecture"):
        plan_init(build_model("mobilenet_v2_mod", num_classes=5), "mobilenet_v2_mod",
                  read_init_source(tmp_path / "timm_mbv2.pt"))
