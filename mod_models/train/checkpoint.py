"""Checkpoints of :mod:`mod_models.train`: atomic writes, validated loads, models rebuilt by name.

A checkpoint is a ``dict`` saved with :func:`torch.save` holding only tensors and plain
Python values (it loads with ``weights_only=True``)::

    {"format": CHECKPOINT_FORMAT, "kind": "full" | "weights",
     "model_name": "resnet18_mod", "model_kwargs": {"num_classes": 10, ...},
     "model": state_dict, "epoch": epochs completed, "config": {...}, "history": [...],
     # "full" only:
     "optimizer": ..., "scheduler": ..., "scaler": ..., "rng": [per-rank RNG states], "world_size": n,
     "best": {"epoch": e, "val_top1": x, "model": state_dict or None}}

``best`` records the best validation epoch so far; its ``model`` is None when that epoch is the
checkpoint's own (the weights are ``model`` then). With it the checkpoint alone can rebuild
``best.pt`` after any crash.

:func:`atomic_save` writes to a temporary file in the same folder, fsyncs it and renames it
over the target with :func:`os.replace`, so a run killed at any moment leaves either the old
or the new file, never a torn one (plus, after a kill, a stale ``.<name>.*.tmp`` file, which
:func:`stale_temporary_files` finds). :func:`interrupts_deferred` holds Ctrl-C until a write is done.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import tempfile
import threading
from typing import Any, BinaryIO, Callable, Iterable, Iterator, Optional

import torch
from torch import nn

from ..zoo import MOD_BUILDERS, build_model, model_names

CHECKPOINT_FORMAT = "mod-cnn-checkpoint/1"
CHECKPOINT_KINDS = ("full", "weights")
TEMPORARY_SUFFIX = ".tmp"
_UMASK = os.umask(0)  # read the process's umask (there is no getter) ...
os.umask(_UMASK)  # ... and put it back


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, or does not fit the requested run."""


def _atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Write ``path`` through ``write(handle)`` such that ``path`` is never left half-written.

    Writes ``.<name>.*.tmp`` beside ``path``, flushes it to disk, then ``os.replace``-s it
    over ``path``; on any error the temporary file is removed and ``path`` is untouched. A
    process killed mid-write leaves the temporary file behind (never a torn ``path``); see
    :func:`stale_temporary_files`.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=TEMPORARY_SUFFIX, dir=directory)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # as open() would create it (mkstemp makes it private: 0600)
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_path)
        raise
    _fsync_directory(directory)


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` such that ``path`` is never left half-written (see :func:`_atomic_write`)."""
    _atomic_write(path, lambda handle: torch.save(obj, handle))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically, like :func:`atomic_save`."""
    data = text.encode("utf-8")
    _atomic_write(path, lambda handle: handle.write(data))


def stale_temporary_files(directory: str | os.PathLike, names: Iterable[str]) -> list[str]:
    """Paths of the temporary files that atomic writes of ``names`` in ``directory`` left behind
    (a process killed while writing). Only a crashed writer leaves them, so they are safe to remove
    when no other process writes that folder."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        return []
    prefixes = tuple(f".{name}." for name in names)
    return sorted(
        os.path.join(directory, entry)
        for entry in os.listdir(directory)
        if entry.startswith(prefixes) and entry.endswith(TEMPORARY_SUFFIX)
    )


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Let a write finish before Ctrl-C takes effect.

    A SIGINT that arrives inside the block is held until the block ends, then raised as
    ``KeyboardInterrupt`` (so a checkpoint is never cut off mid-write: the zip writer would
    otherwise turn the interrupt into a ``RuntimeError`` and leave the write half done). A second
    SIGINT aborts the block at once; the atomic writes then keep the previous files, and the
    error is raised as ``KeyboardInterrupt`` too. Outside the main thread (where Python delivers
    signals) this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    if previous is signal.SIG_IGN or previous is None:  # interrupts ignored (or not ours to handle)
        yield
        return
    received: list[int] = []

    def hold(signum: int, frame: Any) -> None:
        received.append(signum)
        if len(received) > 1:
            raise KeyboardInterrupt
        os.write(2, b"interrupt received: finishing the checkpoint write (press Ctrl-C again to abort it)\n")

    signal.signal(signal.SIGINT, hold)
    try:
        yield
    except BaseException as error:
        if len(received) > 1 and not isinstance(error, KeyboardInterrupt):
            raise KeyboardInterrupt from error  # the abort surfaced as the zip writer's RuntimeError
        raise
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


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


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_state_dict(value: Any) -> bool:
    return isinstance(value, dict) and all(
        isinstance(key, str) and isinstance(tensor, torch.Tensor) for key, tensor in value.items()
    )


def check_training_checkpoint(checkpoint: dict, path: str | os.PathLike) -> None:
    """Raise :class:`CheckpointError` unless ``checkpoint`` (from :func:`load_checkpoint`) can continue a run.

    Checks the kind and the type of every entry a resumed run reads (``config``, ``epoch``,
    ``history``, optimizer, scheduler and scaler states, RNG states, the best-weights record), so
    a damaged or hand-edited file is reported by name instead of failing halfway through.
    """
    path = os.fspath(path)
    if checkpoint["kind"] != "full":
        raise CheckpointError(f"{path!r} holds weights only; resume needs the full checkpoint.pt of a run")

    def bad(entry: str, expected: str) -> CheckpointError:
        value = checkpoint.get(entry)
        return CheckpointError(
            f"checkpoint {path!r} is damaged: its {entry!r} entry must be {expected}, got {_describe(value)}"
        )

    if not isinstance(checkpoint.get("config"), dict):
        raise bad("config", "a dict of the run's settings")
    if not isinstance(checkpoint.get("model_kwargs"), dict):
        raise bad("model_kwargs", "a dict of model keywords")
    if not _is_state_dict(checkpoint.get("model")):
        raise bad("model", "a state dict (names to tensors)")
    epoch = checkpoint.get("epoch")
    if not _is_int(epoch) or epoch < 0:
        raise bad("epoch", "the number of completed epochs (an int >= 0)")
    history = checkpoint.get("history", [])
    if (
        not isinstance(history, list)
        or len(history) != epoch
        or not all(isinstance(row, dict) and _is_number(row.get("val_top1")) for row in history)
    ):
        raise bad("history", f"a list of {epoch} per-epoch metric rows with val_top1")
    for entry in ("optimizer", "scheduler"):
        if not isinstance(checkpoint.get(entry), dict):
            raise bad(entry, "a state dict")
    if not isinstance(checkpoint.get("scaler", {}), dict):
        raise bad("scaler", "a dict (empty without fp16)")
    rng = checkpoint.get("rng", [])
    if not isinstance(rng, list) or not all(isinstance(state, dict) for state in rng):
        raise bad("rng", "a list of per-process RNG states")
    world_size = checkpoint.get("world_size", 1)
    if not _is_int(world_size) or world_size < 1:
        raise bad("world_size", "an int >= 1")
    classes = checkpoint.get("classes", [])
    if not isinstance(classes, list) or not all(isinstance(name, str) for name in classes):
        raise bad("classes", "a list of class names")
    if "best" in checkpoint:
        best = checkpoint["best"]
        if (
            not isinstance(best, dict)
            or not _is_int(best.get("epoch"))
            or not 1 <= best["epoch"] <= epoch
            or not _is_number(best.get("val_top1"))
            or not (best.get("model") is None or _is_state_dict(best["model"]))
            or (best.get("model") is None and best["epoch"] != epoch)
        ):
            raise bad(
                "best",
                f"a record {{epoch in [1, {epoch}], val_top1, model}} whose model is a state dict, "
                f"or None when the best epoch is the checkpoint's own ({epoch})",
            )


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60] + '...' if len(text) > 60 else text}"


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
