"""Crafted checkpoints given to the three readers (``--resume``, the analysis tool, the export tool):
each is refused by the one validation in ``mod_models.train.checkpoint`` with one ``error:`` line
naming the entry, exit status 2, and nothing written."""

import os
import shutil

import pytest
import torch
from _training import file_digest, tiny_config

from mod_models.tools import analysis, export
from mod_models.train import checkpoint as checkpoint_module
from mod_models.train import main as train_main
from mod_models.train import train


@pytest.fixture(scope="module")
def one_epoch_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("validation") / "run"
    train(tiny_config(out, epochs=1, train_samples=16, val_samples=16))
    return out


def _momentum(checkpoint):
    checkpoint["optimizer"]["state"][0]["momentum_buffer"] = torch.zeros(3)


DAMAGES = {
    "config-not-a-dict": (lambda c: c.update(config=[1, 2]), "its 'config' entry must be a dict"),
    "dilation-on-basic-blocks": (
        lambda c: c["model_kwargs"].update(replace_stride_with_dilation=[False, True, True]),
        "model_kwargs hold 'replace_stride_with_dilation', which training never records",
    ),
    "ten-billion-classes": (
        lambda c: c["model_kwargs"].update(num_classes=10**10),
        "fc.weight has shape (4, 512), the model (10000000000, 512)",
    ),
    "negative-image-size": (
        lambda c: c["config"].update(image_size=-5), "image_size must be an int in [8, 4096], got -5"
    ),
    "momentum-buffer": (_momentum, "momentum_buffer of parameter 0 (conv1.weight) has shape (3,)"),
    "last-epoch-a-string": (
        lambda c: c["scheduler"].update(last_epoch="one"),
        "scheduler's last_epoch must be the checkpoint's epoch (1), got str 'one'",
    ),
    "classes-and-head-disagree": (lambda c: c.update(classes=["a", "b"]), "its 'classes' entry must be 4 class names"),
}


def _snapshot(folder):
    return {
        os.path.relpath(os.path.join(root, name), folder): file_digest(os.path.join(root, name))
        for root, _, names in os.walk(folder)
        for name in names
    }


def _readers(run):
    path = str(run / "checkpoint.pt")
    return {
        "train --resume": lambda: train_main(["--out", str(run), "--resume", "--epochs", "2", "--workers", "0"]),
        "analysis": lambda: analysis.main(["--checkpoint", path, "--out", str(run / "routing"), "--samples", "8"]),
        "export": lambda: export.main(["--checkpoint", path, "--out", str(run / "export")]),
    }


@pytest.mark.parametrize("reader", ["train --resume", "analysis", "export"])
@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_crafted_checkpoint_is_refused_by_every_reader(one_epoch_run, tmp_path, capsys, damage, reader):
    run = tmp_path / "run"
    shutil.copytree(one_epoch_run, run)
    checkpoint = torch.load(run / "checkpoint.pt", weights_only=True)
    change, message = DAMAGES[damage]
    change(checkpoint)
    torch.save(checkpoint, run / "checkpoint.pt")
    before = _snapshot(run)
    assert _readers(run)[reader]() == 2
    error = capsys.readouterr().err
    assert error.startswith(f"error: checkpoint '{run / 'checkpoint.pt'}' ") and message in error, error
    assert error.count("\n") == 1 and "Traceback" not in error, error
    assert _snapshot(run) == before  # nothing written, no output folder made


def test_validation_accepts_what_training_writes(one_epoch_run):
    for name in ("checkpoint.pt", "best.pt"):
        checkpoint = checkpoint_module.load_checkpoint(one_epoch_run / name)
        checkpoint_module.validate_checkpoint(checkpoint, name)  # idempotent on a loaded dict
    with pytest.raises(checkpoint_module.CheckpointError, match="not a checkpoint written by mod_models.train"):
        checkpoint_module.validate_checkpoint([1, 2], "list.pt")
