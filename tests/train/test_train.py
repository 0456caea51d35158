"""Training CLI and loop (mod_models.train): learning, exact resume, atomic checkpoints, bad input."""

import csv
import json
import os

import pytest
import torch
from _training import REPO_ROOT, assert_same_tree, file_digest, run_module, tiny_config, without_timings

from mod_models.train import ConfigError, TrainConfig, main, train, validate_config
from mod_models.train import checkpoint as checkpoint_module
from mod_models.train.checkpoint import CheckpointError, atomic_save, load_checkpoint, model_from_checkpoint
from mod_models.train.data import SyntheticShapes, write_image_folder


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def _assert_same_run(path_a, path_b):
    a, b = _load(path_a), _load(path_b)
    for key in ("model", "optimizer", "scheduler", "rng", "epoch", "model_name", "model_kwargs", "classes"):
        assert_same_tree(a[key], b[key], key)
    assert_same_tree(without_timings(a["history"]), without_timings(b["history"]), "history")


def test_short_training_learns(tmp_path):
    """resnet18_mod on the generated set (4 classes, chance 25%): loss falls, accuracy climbs well above chance.

    288 SGD steps of 16 images at 32 px. Measured on a 2-core CPU: val top-1 26.6 -> 38.3 -> 48.8 %,
    train loss 2.06 -> 1.66 -> 1.27 (the run is deterministic for a given thread count).
    """
    config = tiny_config(
        tmp_path / "run",
        epochs=3,
        image_size=32,
        num_classes=4,
        train_samples=1536,
        val_samples=256,
        batch_size=16,
        lr=0.02,
        channels_last=True,
    )
    result = train(config)
    history = result.history
    assert [row["epoch"] for row in history] == [1, 2, 3]
    assert history[-1]["train_loss"] < 0.75 * history[0]["train_loss"]
    assert history[-1]["val_top1"] >= 40.0, [row["val_top1"] for row in history]
    assert history[-1]["val_top1"] > history[0]["val_top1"] + 10.0
    assert all(row["val_top5"] is None for row in history)  # 4 classes: top-5 would be 100% by definition

    with open(tmp_path / "run" / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(row["epoch"]) for row in rows] == [1, 2, 3]
    assert float(rows[-1]["val_top1"]) == pytest.approx(history[-1]["val_top1"])
    summary = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert summary["model"] == "resnet18_mod" and summary["epochs_completed"] == 3
    assert summary["best_val_top1"] == max(row["val_top1"] for row in history)
    # best.pt holds the weights of the best epoch and rebuilds by name.
    model, best = model_from_checkpoint(tmp_path / "run" / "best.pt", backend="reference")
    assert best["kind"] == "weights" and best["history"][-1]["val_top1"] == summary["best_val_top1"]
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in result.model.parameters())


def test_resume_is_bitwise_identical_to_uninterrupted_run(tmp_path):
    """Random routing draws from the global RNG in training and evaluation: resume must restore it exactly."""
    train(tiny_config(tmp_path / "full", router="random", epochs=3))
    train(tiny_config(tmp_path / "part", router="random", epochs=1))
    first = _load(tmp_path / "part" / "checkpoint.pt")
    assert first["epoch"] == 1
    train(tiny_config(tmp_path / "part", router="random", epochs=3), resume=tmp_path / "part" / "checkpoint.pt")
    _assert_same_run(tmp_path / "full" / "checkpoint.pt", tmp_path / "part" / "checkpoint.pt")
    # The weights really moved after the first epoch (the comparison is not between two copies of epoch 1).
    final = _load(tmp_path / "part" / "checkpoint.pt")
    assert not torch.equal(first["model"]["fc.weight"], final["model"]["fc.weight"])


def test_resume_restores_the_python_and_numpy_random_state(tmp_path, monkeypatch):
    """Code run during training may draw from Python's and NumPy's global generators (augmentations
    often do): a resumed run must continue their streams where the interrupted run left them, as
    it does torch's. Each epoch here first draws from both, as such code would."""
    import random

    import numpy as np

    from mod_models.train import loop as train_module

    draws = []
    real_epoch = train_module.train_one_epoch

    def drawing_epoch(*args, **kwargs):
        draws.append((random.random(), float(np.random.random())))
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(train_module, "train_one_epoch", drawing_epoch)
    small = dict(train_samples=16, val_samples=16)
    train(tiny_config(tmp_path / "full", epochs=2, **small))
    uninterrupted = list(draws)
    draws.clear()
    train(tiny_config(tmp_path / "part", epochs=1, **small))
    train(tiny_config(tmp_path / "part", epochs=2, **small), resume=tmp_path / "part" / "checkpoint.pt")
    assert draws[0] == uninterrupted[0]
    python_draw, numpy_draw = draws[1]
    assert python_draw == uninterrupted[1][0], "the resumed run did not restore Python's random state"
    assert numpy_draw == uninterrupted[1][1], "the resumed run did not restore NumPy's random state"


def test_cli_resume_with_image_folder_and_worker_processes(tmp_path, capsys):
    """ImageFolder data (random crops and flips in a worker process), resumed from the CLI with only --out."""
    data = tmp_path / "data"
    write_image_folder(SyntheticShapes(48, image_size=24, num_classes=3, seed=5), data / "train")
    write_image_folder(SyntheticShapes(12, image_size=24, num_classes=3, split="val"), data / "val")
    common = [
        "--data",
        str(data),
        "--image-size",
        "16",
        "--batch-size",
        "16",
        "--lr",
        "0.02",
        "--workers",
        "1",
        "--backend",
        "reference",
        "--device",
        "cpu",
        "--no-progress",
    ]
    assert main(common + ["--out", str(tmp_path / "full"), "--epochs", "2"]) == 0
    assert main(common + ["--out", str(tmp_path / "part"), "--epochs", "1"]) == 0
    assert main(["--out", str(tmp_path / "part"), "--resume", "--epochs", "2"]) == 0
    assert "resuming resnet18_mod" in capsys.readouterr().out
    _assert_same_run(tmp_path / "full" / "checkpoint.pt", tmp_path / "part" / "checkpoint.pt")
    assert _load(tmp_path / "part" / "checkpoint.pt")["classes"] == ["checkerboard", "disk", "stripes"]
    # Asking for fewer epochs than done is not an error, and changes nothing.
    before = file_digest(tmp_path / "part" / "checkpoint.pt")
    assert main(["--out", str(tmp_path / "part"), "--resume", "--epochs", "2"]) == 0
    assert file_digest(tmp_path / "part" / "checkpoint.pt") == before


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    atomic_save({"value": torch.arange(4)}, path)
    good = file_digest(path)

    def torn_save(obj, handle):
        handle.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt  # killed in the middle of the write

    monkeypatch.setattr(checkpoint_module.torch, "save", torn_save)
    with pytest.raises(KeyboardInterrupt):
        atomic_save({"value": torch.arange(8)}, path)
    assert file_digest(path) == good
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pt"]  # no temporary file left behind


def test_atomic_writes_reach_the_disk_before_the_rename(tmp_path, monkeypatch):
    """The temporary file is fsynced, whole, before it is renamed over the target: otherwise a power
    loss after the rename can leave an empty or torn file under the target's name."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        status = os.fstat(fd)
        events.append(("fsync", status.st_ino, status.st_size))
        return real_fsync(fd)

    def replace(src, dst):
        status = os.stat(src)
        events.append(("replace", status.st_ino, status.st_size))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    atomic_save({"value": torch.arange(1000)}, tmp_path / "checkpoint.pt")
    checkpoint_module.atomic_write_text(tmp_path / "metrics.json", "{}\n" * 100)
    renames = [index for index, event in enumerate(events) if event[0] == "replace"]
    assert len(renames) == 2, events
    for index in renames:
        _, inode, size = events[index]
        synced = [event for event in events[:index] if event == ("fsync", inode, size)]
        assert synced, f"the temporary file (inode {inode}, {size} bytes) was renamed before an fsync of it: {events}"


def test_torn_or_foreign_checkpoint_is_reported(tmp_path):
    torn = tmp_path / "torn.pt"
    torn.write_bytes(b"PK\x03\x04 not a whole zip file")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(torn)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(CheckpointError, match="not a checkpoint written by mod_models.train"):
        load_checkpoint(foreign)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    train(tiny_config(out, epochs=1))
    return out


def test_cli_refuses_checkpoint_of_another_model_without_touching_it(finished_run):
    checkpoint = finished_run / "checkpoint.pt"
    before = file_digest(checkpoint), os.path.getmtime(checkpoint)
    result = run_module(
        "mod_models.train", "--model", "resnet34_mod", "--out", str(finished_run), "--resume", "--epochs", "3"
    )
    assert result.returncode == 2, result.stderr
    assert "written for model 'resnet18_mod', not 'resnet34_mod'" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert (file_digest(checkpoint), os.path.getmtime(checkpoint)) == before


def test_cli_unknown_model_exits_cleanly(tmp_path):
    result = run_module("mod_models.train", "--model", "resnet19_mod", "--out", str(tmp_path / "x"))
    assert result.returncode == 2
    assert result.stderr.startswith("error: unknown model 'resnet19_mod'")
    assert "resnet18_mod" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    "make_args, message",
    [
        (lambda d: ["--data", str(d / "nowhere")], "does not exist"),
        (lambda d: ["--data", str(d / "empty")], "must contain 'train' and 'val'"),
        (lambda d: ["--data", str(d / "empty_splits")], "no class sub-folders"),
        (lambda d: ["--model", "resnet18", "--capacity", "8"], "torchvision baseline"),
        (lambda d: ["--train-samples", "8", "--batch-size", "16"], "fewer than one batch"),
        (lambda d: ["--num-classes", "40"], "num_classes must be in"),
        (lambda d: ["--resume", str(d / "nothing.pt")], "no checkpoint at"),
        (lambda d: ["--resume"], "needs --out"),
    ],
)
def test_cli_bad_input_gives_message_and_status_2(tmp_path, capsys, make_args, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty_splits" / "train").mkdir(parents=True)
    (tmp_path / "empty_splits" / "val").mkdir()
    args = make_args(tmp_path)
    if "--out" not in args and args != ["--resume"]:
        args += ["--out", str(tmp_path / "out")]
    assert main(args + ["--backend", "reference", "--workers", "0", "--no-progress"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and message in error, error
    assert not (tmp_path / "out" / "checkpoint.pt").exists()


def test_cli_never_overwrites_a_good_checkpoint(finished_run, capsys):
    checkpoint = finished_run / "checkpoint.pt"
    before = file_digest(checkpoint)
    # A new run into a folder that holds a checkpoint.
    assert main(["--out", str(finished_run), "--epochs", "1", "--backend", "reference", "--workers", "0"]) == 2
    assert "already exists; pass --resume" in capsys.readouterr().err
    # Resume with a setting that defines the run changed.
    assert main(["--out", str(finished_run), "--resume", "--num-classes", "5"]) == 2
    assert "num_classes=4" in capsys.readouterr().err
    # Resume from best.pt (weights only) cannot continue a run.
    assert main(["--resume", str(finished_run / "best.pt"), "--out", str(finished_run / "again")]) == 2
    assert "weights only" in capsys.readouterr().err
    assert file_digest(checkpoint) == before


def test_diverging_run_fails_cleanly(tmp_path, capsys):
    args = [
        "--out",
        str(tmp_path / "run"),
        "--epochs",
        "2",
        "--lr",
        "1e12",
        "--image-size",
        "16",
        "--num-classes",
        "4",
        "--train-samples",
        "64",
        "--val-samples",
        "16",
        "--batch-size",
        "16",
        "--workers",
        "0",
        "--backend",
        "reference",
        "--no-progress",
    ]
    assert main(args) == 3
    assert "training diverged in epoch 1" in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


@pytest.mark.parametrize(
    "overrides",
    [
        {"model": "resnet18"},
        {"model": "mobilenet_v2_mod", "fusion": "last_k"},
        # 32 px: PyTorch's CPU bf16 channels-last conv can return NaN weight gradients for 1x1 inputs
        # (layer4 at 16 px), independent of MoD.
        {"model": "resnet18_mod", "amp": "bf16", "channels_last": True, "fusion": "original", "image_size": 32},
    ],
    ids=["torchvision-baseline", "mobilenet_v2_mod", "bf16-channels-last"],
)
def test_other_models_and_modes_train(tmp_path, overrides):
    result = train(tiny_config(tmp_path / "run", epochs=1, **overrides))
    row = result.history[0]
    assert torch.isfinite(torch.tensor([row["train_loss"], row["val_loss"]])).all()
    saved = _load(tmp_path / "run" / "checkpoint.pt")
    assert saved["model_name"] == overrides["model"]
    rebuilt, _ = model_from_checkpoint(saved)
    assert_same_tree(rebuilt.state_dict(), saved["model"])


@pytest.mark.parametrize(
    "field, value",
    [
        ("model", "vgg16_mod"),
        ("epochs", 0),
        ("batch_size", -1),
        ("lr", 0.0),
        ("amp", "fp8"),
        ("backend", "cuda"),
        ("fusion", "middle"),
        ("router", "noisy"),
        ("label_smoothing", 1.0),
        ("image_size", 4),
        ("workers", -1),
    ],
)
def test_config_validation(field, value):
    with pytest.raises(ConfigError):
        validate_config(TrainConfig(**{field: value}))
    assert issubclass(ConfigError, ValueError)
    with pytest.raises(TypeError):
        validate_config({"model": "resnet18_mod"})


def test_help_runs(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--amp", "--channels-last", "--backend", "--compile", "--seed", "--resume", "--data"):
        assert flag in text
    assert os.path.isdir(REPO_ROOT)
