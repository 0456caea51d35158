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
import dataclasses
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

    Every entry is checked by :func:`validate_checkpoint` before anything is built from it.

    Raises:
        CheckpointError: missing file, unreadable or torn file, not one of our checkpoints, or an
            entry that is damaged or contradicts the others (named in the message).
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
    validate_checkpoint(checkpoint, path)
    return checkpoint


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_state_dict(value: Any) -> bool:
    return isinstance(value, dict) and all(
        isinstance(key, str) and isinstance(tensor, torch.Tensor) for key, tensor in value.items()
    )


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60] + '...' if len(text) > 60 else text}"


def _is_init_record(record: Any) -> bool:
    def names(value: Any) -> bool:
        return isinstance(value, list) and all(isinstance(item, str) for item in value)

    def reasons(value: Any) -> bool:
        return isinstance(value, dict) and names(list(value)) and names(list(value.values()))

    return (
        isinstance(record, dict)
        and isinstance(record.get("path"), str)
        and isinstance(record.get("source"), str)
        and names(record.get("loaded"))
        and reasons(record.get("skipped"))
        and reasons(record.get("fresh"))
    )


# The model keywords mod_models.train records (TrainConfig.model_kwargs); nothing else is built from a file.
MOD_MODEL_KWARGS = ("num_classes", "capacity", "fusion", "router")
BASELINE_MODEL_KWARGS = ("num_classes",)


def validate_checkpoint(checkpoint: Any, path: str | os.PathLike) -> None:
    """Raise :class:`CheckpointError` unless ``checkpoint`` is one of ours and every entry in it is
    what its readers (``--resume``, the export and analysis tools) will use it as.

    The one check of a file's content, run by :func:`load_checkpoint` (and by
    :func:`check_training_checkpoint` and :func:`model_from_checkpoint` for a dict handed over
    directly), before anything is built from it:

    * ``format``, ``kind``, a known ``model_name``;
    * ``model_kwargs``: a dict of the keywords training records (``num_classes``, and ``capacity``,
      ``fusion``, ``router`` for MoD models) with which the model builds; it is built on the
      ``meta`` device (no memory, no RNG), so a huge ``num_classes`` costs nothing;
    * ``model`` (and the best record's weights): exactly the names and shapes of that model;
    * ``config``: a dict of valid training settings for that model (the same check as the
      command line's); ``classes``: as many names as the model has outputs; ``epoch``, ``history``;
    * a ``"full"`` checkpoint also: optimizer state (parameter indices, momentum buffers of the
      parameters' shapes, finite hyperparameters), scheduler (``last_epoch`` = ``epoch``), scaler,
      per-process RNG states (each restored for real and put back), world size, best record.
    """
    path = os.fspath(path)
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path!r} is not a checkpoint written by mod_models.train (expected format {CHECKPOINT_FORMAT!r})"
        )
    for key in ("kind", "model_name", "model_kwargs", "model", "epoch"):
        if key not in checkpoint:
            raise CheckpointError(f"checkpoint {path!r} lacks the entry {key!r}")
    if checkpoint["kind"] not in CHECKPOINT_KINDS:
        raise CheckpointError(f"checkpoint {path!r} has unknown kind {checkpoint['kind']!r}")
    name = checkpoint["model_name"]
    if not isinstance(name, str) or name not in model_names():
        raise CheckpointError(f"checkpoint {path!r} is for unknown model {name!r}")

    def bad(entry: str, expected: str) -> CheckpointError:
        return CheckpointError(
            f"checkpoint {path!r} is damaged: its {entry!r} entry must be {expected}, "
            f"got {_describe(checkpoint.get(entry))}"
        )

    epoch = checkpoint["epoch"]
    if not _is_int(epoch) or epoch < 0:
        raise bad("epoch", "the number of completed epochs (an int >= 0)")
    shapes, parameters = _model_shapes(checkpoint, path, bad)
    _check_weights(checkpoint["model"], shapes, "model", path, bad)
    _check_config(checkpoint, path, bad)
    classes = checkpoint.get("classes", [])
    if not isinstance(classes, list) or not all(isinstance(label, str) for label in classes):
        raise bad("classes", "a list of class names")
    outputs = checkpoint["model_kwargs"].get("num_classes")
    if classes and outputs is not None and len(classes) != outputs:
        raise bad("classes", f"{outputs} class names (model_kwargs num_classes={outputs})")
    history = checkpoint.get("history", [])
    if not isinstance(history, list) or not all(isinstance(row, dict) for row in history):
        raise bad("history", "a list of per-epoch metric rows")
    if "init" in checkpoint and not _is_init_record(checkpoint["init"]):
        raise bad("init", "a record {path, source, loaded, skipped, fresh} of the weights the run started from")
    if checkpoint["kind"] == "full":
        _check_training_state(checkpoint, path, shapes, parameters, bad)


def _model_shapes(
    checkpoint: dict, path: str, bad: Callable[[str, str], CheckpointError]
) -> tuple[dict[str, tuple], list[tuple[str, tuple]]]:
    """``(state_dict shapes, [(name, shape)] of the parameters in optimizer order)`` of the model
    ``model_kwargs`` describe, built on the meta device."""
    name, kwargs = checkpoint["model_name"], checkpoint["model_kwargs"]
    allowed = MOD_MODEL_KWARGS if name in MOD_BUILDERS else BASELINE_MODEL_KWARGS
    if not isinstance(kwargs, dict) or not all(isinstance(key, str) for key in kwargs):
        raise bad("model_kwargs", "a dict of model keywords")
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise CheckpointError(
            f"checkpoint {path!r} is damaged: its model_kwargs hold {', '.join(map(repr, unknown))}, which "
            f"training never records (for {name} it records only {', '.join(allowed)})"
        )
    num_classes = kwargs.get("num_classes")
    if not _is_int(num_classes) or num_classes < 1:
        raise bad("model_kwargs", "a dict whose num_classes is an int >= 1")
    try:
        with torch.device("meta"):
            model = build_model(name, **kwargs)
    except Exception as error:  # a builder rejects bad keywords with several types
        raise CheckpointError(
            f"checkpoint {path!r} is damaged: {name} cannot be built from its model_kwargs {kwargs!r} "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})"
        ) from None
    shapes = {key: tuple(tensor.shape) for key, tensor in model.state_dict().items()}
    return shapes, [(key, tuple(parameter.shape)) for key, parameter in model.named_parameters()]


def _check_weights(
    weights: Any, shapes: dict[str, tuple], entry: str, path: str, bad: Callable[[str, str], CheckpointError]
) -> None:
    if not _is_state_dict(weights):
        raise bad(entry, "a state dict (names to tensors)")
    missing = [key for key in shapes if key not in weights]
    extra = [key for key in weights if key not in shapes]
    wrong = [
        f"{key} has shape {tuple(weights[key].shape)}, the model {shapes[key]}"
        for key in shapes
        if key in weights and tuple(weights[key].shape) != shapes[key]
    ]
    if missing or extra or wrong:
        problems = [f"{len(missing)} missing (first: {missing[0]})"] if missing else []
        problems += [f"{len(extra)} unexpected (first: {extra[0]})"] if extra else []
        problems += wrong[:1] + ([f"{len(wrong) - 1} more shapes differ"] if len(wrong) > 1 else [])
        raise CheckpointError(
            f"checkpoint {path!r} is damaged: its {entry!r} weights do not fit the model its model_name and "
            f"model_kwargs describe ({len(weights)} tensors in the file, {len(shapes)} in the model): "
            f"{'; '.join(problems)}"
        )


def _check_config(checkpoint: dict, path: str, bad: Callable[[str, str], CheckpointError]) -> None:
    """The run's settings, as the command line would check them (``validate_config``)."""
    if "config" not in checkpoint:
        return
    saved = checkpoint["config"]
    if not isinstance(saved, dict) or not all(isinstance(key, str) for key in saved):
        raise bad("config", "a dict of the run's settings")
    # Imported here: config.py reads checkpoints (for --resume), so it imports this module.
    from .config import ConfigError, TrainConfig, validate_config

    known = {field.name for field in dataclasses.fields(TrainConfig)}
    settings = {key: value for key, value in saved.items() if key in known}
    settings.setdefault("model", checkpoint["model_name"])
    if settings["model"] != checkpoint["model_name"]:
        raise CheckpointError(
            f"checkpoint {path!r} is damaged: its config names model {settings['model']!r}, "
            f"its weights are for {checkpoint['model_name']!r}"
        )
    try:
        validate_config(TrainConfig(**settings))
    except (ConfigError, TypeError, ValueError) as error:
        raise CheckpointError(f"checkpoint {path!r} holds an invalid setting: {error}") from None


def _check_training_state(
    checkpoint: dict,
    path: str,
    shapes: dict[str, tuple],
    parameters: list[tuple[str, tuple]],
    bad: Callable[[str, str], CheckpointError],
) -> None:
    """The entries only ``--resume`` reads: history, optimizer, scheduler, scaler, RNG, best record."""
    epoch = checkpoint["epoch"]
    history = checkpoint.get("history", [])
    if len(history) != epoch or not all(_is_number(row.get("val_top1")) for row in history):
        raise bad("history", f"a list of {epoch} per-epoch metric rows with val_top1")
    _check_optimizer(checkpoint.get("optimizer"), parameters, path, bad)
    _check_scheduler(checkpoint.get("scheduler"), epoch, len(checkpoint["optimizer"]["param_groups"]), path, bad)
    scaler = checkpoint.get("scaler", {})
    if not isinstance(scaler, dict) or not all(_is_number(value) for value in scaler.values()):
        raise bad("scaler", "a dict of numbers (empty without fp16)")
    rng = checkpoint.get("rng", [])
    if not isinstance(rng, list) or not all(isinstance(state, dict) for state in rng):
        raise bad("rng", "a list of per-process RNG states")
    world_size = checkpoint.get("world_size", 1)
    if not _is_int(world_size) or world_size < 1:
        raise bad("world_size", "an int >= 1")
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
        if best["model"] is not None:
            _check_weights(best["model"], shapes, "best", path, bad)
    # Imported here: seeding reports damaged states as CheckpointError, defined in this module.
    from .seeding import check_rng_states

    check_rng_states(rng, path)


def _check_optimizer(
    state: Any, parameters: list[tuple[str, tuple]], path: str, bad: Callable[[str, str], CheckpointError]
) -> None:
    """An SGD state dict of the model's parameters: every index once, momentum buffers of their shapes."""
    if not isinstance(state, dict) or not isinstance(state.get("state"), dict):
        raise bad("optimizer", "an optimizer state dict {state, param_groups}")
    groups = state.get("param_groups")
    if not isinstance(groups, list) or not groups or not all(isinstance(group, dict) for group in groups):
        raise bad("optimizer", "an optimizer state dict whose param_groups is a list of dicts")
    indices: list[Any] = []
    for group in groups:
        params = group.get("params")
        if not isinstance(params, list) or not all(_is_int(index) for index in params):
            raise bad("optimizer", "an optimizer state dict whose param groups list parameter indices")
        indices += params
        for key in ("lr", "momentum", "dampening", "weight_decay"):
            if key in group and not (_is_number(group[key]) and group[key] >= 0):
                raise CheckpointError(
                    f"checkpoint {path!r} is damaged: its optimizer's {key} must be a finite number >= 0, "
                    f"got {_describe(group[key])}"
                )
    count = len(parameters)
    if sorted(indices) != list(range(count)):
        raise bad("optimizer", f"the state of the model's {count} parameters (indices 0..{count - 1}, each once)")
    for index, entry in state["state"].items():
        if not _is_int(index) or not 0 <= index < count or not isinstance(entry, dict):
            raise bad("optimizer", f"an optimizer state dict whose state maps indices 0..{count - 1} to dicts")
        name, shape = parameters[index]
        for key, value in entry.items():
            if value is None or _is_number(value):
                continue
            if not isinstance(value, torch.Tensor) or not value.is_floating_point():
                raise CheckpointError(
                    f"checkpoint {path!r} is damaged: its optimizer's {key} of parameter {index} ({name}) "
                    f"must be a float tensor, got {_describe(value)}"
                )
            if (key == "momentum_buffer" or value.dim() > 0) and tuple(value.shape) != shape:
                raise CheckpointError(
                    f"checkpoint {path!r} is damaged: its optimizer's {key} of parameter {index} ({name}) has "
                    f"shape {tuple(value.shape)}, the parameter {shape}"
                )
            if not torch.isfinite(value).all():
                raise CheckpointError(
                    f"checkpoint {path!r} is damaged: its optimizer's {key} of parameter {index} ({name}) "
                    "holds NaN or infinite values"
                )


def _check_scheduler(
    state: Any, epoch: int, groups: int, path: str, bad: Callable[[str, str], CheckpointError]
) -> None:
    """A StepLR state dict that has stepped once per completed epoch."""
    if not isinstance(state, dict):
        raise bad("scheduler", "a state dict")
    last_epoch = state.get("last_epoch")
    if not _is_int(last_epoch) or last_epoch != epoch:
        raise CheckpointError(
            f"checkpoint {path!r} is damaged: its scheduler's last_epoch must be the checkpoint's epoch ({epoch}), "
            f"got {_describe(last_epoch)}"
        )
    for key, valid in (
        ("step_size", lambda value: _is_int(value) and value >= 1),
        ("gamma", lambda value: _is_number(value) and value > 0),
        ("base_lrs", lambda value: isinstance(value, list) and len(value) == groups and all(map(_is_number, value))),
        ("_last_lr", lambda value: isinstance(value, list) and len(value) == groups and all(map(_is_number, value))),
    ):
        if key in state and not valid(state[key]):
            raise CheckpointError(
                f"checkpoint {path!r} is damaged: its scheduler's {key} is not valid: {_describe(state[key])}"
            )


def check_training_checkpoint(checkpoint: dict, path: str | os.PathLike) -> None:
    """Raise :class:`CheckpointError` unless ``checkpoint`` can continue a run: a valid checkpoint
    (:func:`validate_checkpoint`, which checks every entry a resumed run reads) of kind ``"full"``."""
    path = os.fspath(path)
    validate_checkpoint(checkpoint, path)
    if checkpoint["kind"] != "full":
        raise CheckpointError(f"{path!r} holds weights only; resume needs the full checkpoint.pt of a run")


def model_from_checkpoint(
    checkpoint: dict | str | os.PathLike,
    *,
    backend: Optional[str] = None,
    inplace: Optional[bool] = None,
) -> tuple[nn.Module, dict]:
    """Rebuild the model a checkpoint was written for and load its weights.

    Args:
        checkpoint: a loaded checkpoint or a path to one (validated either way).
        backend: backend of the MoD blocks (ignored for torchvision baselines); None keeps the default.
        inplace: override the MoD blocks' ``inplace`` (None keeps the builder's default).

    Returns:
        ``(model, checkpoint)``; the model is on the CPU in eval mode.
    """
    if isinstance(checkpoint, dict):
        validate_checkpoint(checkpoint, "<checkpoint dict>")
    else:
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
