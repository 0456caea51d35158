"""Checkpoints of :mod:`mod_models.train`: atomic writes, validated loads, models rebuilt by name.

A checkpoint is a ``dict`` saved with :func:`torch.save` holding only tensors and plain
Python values (it loads with ``weights_only=True``)::

    {"format": CHECKPOINT_FORMAT, "kind": "full" | "weights",
     "model_name": "resnet18_mod", "model_kwargs": {"num_classes": 10, ...},
     "model": state_dict, "epoch": epochs completed, "config": {...}, "history": [...],
     # "full" only:
     "optimizer": ..., "scheduler": ..., "scaler": ..., "rng": [per-rank RNG states], "world_size": n}

:func:`atomic_save` writes to a temporary file in the same folder, fsyncs it and renames it
over the target with :func:`os.replace`, so a run killed at any moment leaves either the old
or the new file, never a torn one.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Any, Optional

import torch
from torch import nn

from .zoo import MOD_BUILDERS, build_model, model_names

CHECKPOINT_FORMAT = "mod-cnn-checkpoint/1"
CHECKPOINT_KINDS = ("full", "weights")


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, or does not fit the requested run."""


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` such that ``path`` is never left half-written.

    Writes ``.<name>.*.tmp`` beside ``path``, flushes it to disk, then ``os.replace``-s it
    over ``path``; on any error the temporary file is removed and ``path`` is untouched.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_path)
        raise
    _fsync_directory(directory)


def _fsync_directory(directory: str) -> None:
    """Make the rename durable (best effort: not every file system allows fsync on a folder)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load and validate a checkpoint written by :mod:`mod_models.train` (on the CPU).

    Raises:
        CheckpointError: missing file, unreadable or torn file, or not one of our checkpoints.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"no checkpoint at {path!r}")
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint path {path!r} is not a file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a damaged or foreign file
        first_line = str(error).splitlines()[0] if str(error) else ""
        raise CheckpointError(f"cannot read checkpoint {path!r}: {type(error).__name__}: {first_line}") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path!r} is not a checkpoint written by mod_models.train (expected format {CHECKPOINT_FORMAT!r})"
        )
    for key in ("kind", "model_name", "model_kwargs", "model", "epoch"):
        if key not in checkpoint:
            raise CheckpointError(f"checkpoint {path!r} lacks the entry {key!r}")
    if checkpoint["kind"] not in CHECKPOINT_KINDS:
        raise CheckpointError(f"checkpoint {path!r} has unknown kind {checkpoint['kind']!r}")
    if checkpoint["model_name"] not in model_names():
        raise CheckpointError(f"checkpoint {path!r} is for unknown model {checkpoint['model_name']!r}")
    return checkpoint


def model_from_checkpoint(
    checkpoint: dict | str | os.PathLike,
    *,
    backend: Optional[str] = None,
    inplace: Optional[bool] = None,
) -> tuple[nn.Module, dict]:
    """Rebuild the model a checkpoint was written for and load its weights.

    Args:
        checkpoint: a loaded checkpoint or a path to one.
        backend: backend of the MoD blocks (ignored for torchvision baselines); None keeps the default.
        inplace: override the MoD blocks' ``inplace`` (None keeps the builder's default).

    Returns:
        ``(model, checkpoint)``; the model is on the CPU in eval mode.
    """
    if not isinstance(checkpoint, dict):
        checkpoint = load_checkpoint(checkpoint)
    name = checkpoint["model_name"]
    kwargs = dict(checkpoint["model_kwargs"])
    if name in MOD_BUILDERS:
        if backend is not None:
            kwargs["backend"] = backend
        if inplace is not None:
            kwargs["inplace"] = inplace
    model = build_model(name, **kwargs)
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as error:
        raise CheckpointError(f"the checkpoint's weights do not fit {name} {kwargs}: {error}") from None
    return model.eval(), checkpoint
