"""The weights a new training run starts from (``python -m mod_models.train --init PATH``).

``--init`` starts a new run (fresh optimizer, schedule and epoch count) from trained weights;
``--resume`` continues an interrupted run exactly. ``PATH`` may hold:

* a checkpoint of :mod:`mod_models.train` (``checkpoint.pt`` or ``best.pt``; validated like every
  checkpoint), or a plain state dict of a MoD model of the same architecture: every tensor loads,
  MoD blocks included;
* the state dict of a torchvision or timm baseline (ResNet, MobileNetV2; also wrapped as
  ``{"model": ...}`` by torchvision's reference scripts or ``{"state_dict": ...}`` by timm's):
  the stem, the standard blocks and the head load through
  :func:`mod_models.integrations.torchvision.load_torchvision_weights`; the MoD blocks start fresh.

In both cases the head is re-initialised when its class count differs from the run's. The plan
(:func:`plan_init`) is made and checked before the run writes anything, against the model built
on the meta device; a file that does not fit (another architecture, other MoD settings, a
deployed model with folded batch norms, a damaged file) is refused whole, naming the problem.
What was loaded, skipped and left fresh is printed and kept in ``metrics.json`` (``"init"``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor, nn

from ..blocks import MoDBlock
from ..folded import PACKED
from ..integrations.torchvision import load_torchvision_weights
from ..zoo import MOD_BUILDERS
from .checkpoint import CHECKPOINT_FORMAT, CheckpointError, validate_checkpoint

# Keys under which training scripts wrap a state dict: torchvision's references ("model"), timm ("state_dict").
WRAPPER_KEYS = ("model", "state_dict", "model_state_dict")
PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel, torch.compile


class InitError(CheckpointError):
    """An ``--init`` file that cannot start this run (unreadable, damaged, or it does not fit the model)."""


@dataclass
class InitSource:
    """A state dict read from an ``--init`` file: ``description`` says what the file held;
    ``model_name`` is the zoo name when the file is a checkpoint of ours."""

    path: str
    state: dict[str, Tensor]
    description: str
    model_name: Optional[str] = None


@dataclass
class InitPlan:
    """What :func:`apply_init` loads into the model (``tensors``, all of which fit), and the report:
    ``skipped`` file keys and ``fresh`` model keys, each with the reason."""

    source: InitSource
    model_name: str
    tensors: dict[str, Tensor]
    skipped: dict[str, str] = field(default_factory=dict)
    fresh: dict[str, str] = field(default_factory=dict)
    through_torchvision: bool = False

    def record(self) -> dict[str, Any]:
        """The ``"init"`` entry of metrics.json and of the run's checkpoints (plain JSON values)."""
        return {
            "path": os.path.abspath(self.source.path),
            "source": self.source.description,
            "loaded": list(self.tensors),
            "skipped": dict(self.skipped),
            "fresh": dict(self.fresh),
        }

    def summary(self) -> list[str]:
        return summary_lines(self.record())


def summary_lines(record: dict[str, Any]) -> list[str]:
    """Lines for the log: what an ``"init"`` record says, grouped by reason."""
    lines = [f"init from {record['path']} ({record['source']}): loaded {len(record['loaded'])} tensors"]
    for title, entries in (("left fresh", record["fresh"]), ("skipped from the file", record["skipped"])):
        by_reason: dict[str, list[str]] = {}
        for key, reason in entries.items():
            by_reason.setdefault(reason, []).append(key)
        for reason, keys in by_reason.items():
            lines.append(f"  {title}: {len(keys)} tensor{'s' if len(keys) != 1 else ''} ({reason})")
    return lines


def _owner(key: str) -> str:
    return key.rsplit(".", 1)[0] if "." in key else ""


def _is_state_dict(value: Any) -> bool:
    return (
        isinstance(value, dict)
        and bool(value)
        and all(isinstance(key, str) and isinstance(tensor, Tensor) for key, tensor in value.items())
    )


def read_init_source(path: str | os.PathLike) -> InitSource:
    """Read an ``--init`` file (see the module docstring).

    Raises:
        InitError: a missing, unreadable or damaged file, or one that holds no state dict.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InitError(f"--init {path!r}: {'not a file' if os.path.exists(path) else 'no such file'}")
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a damaged or foreign file
        first_line = str(error).splitlines()[0] if str(error) else ""
        raise InitError(f"--init {path!r} cannot be read: {type(error).__name__}: {first_line}") from None
    model_name = None
    if isinstance(content, dict) and content.get("format") == CHECKPOINT_FORMAT:
        try:
            validate_checkpoint(content, path)
        except CheckpointError as error:
            raise InitError(f"--init: {error}") from None
        state, model_name = content["model"], content["model_name"]
        description = f"{content['kind']} checkpoint of {model_name}, epoch {content['epoch']}"
    elif _is_state_dict(content):
        state, description = content, "a state dict"
    else:
        wrapped = [key for key in WRAPPER_KEYS if isinstance(content, dict) and _is_state_dict(content.get(key))]
        if not wrapped:
            raise InitError(
                f"--init {path!r} holds neither a checkpoint of mod_models.train nor a state dict (names to "
                f"tensors) nor one under {', '.join(repr(key) for key in WRAPPER_KEYS)}; got "
                f"{type(content).__name__}"
            )
        state, description = content[wrapped[0]], f"the state dict under {wrapped[0]!r}"
    for prefix in PREFIXES:
        if all(key.startswith(prefix) for key in state):
            state = {key[len(prefix) :]: tensor for key, tensor in state.items()}
            description += f", prefix {prefix!r} removed"
    return InitSource(path, dict(state), description, model_name)


def _head_name(model: nn.Module) -> Optional[str]:
    """The classifier: the model's last ``nn.Linear`` (``fc`` for ResNets, ``classifier.1`` for MobileNetV2)."""
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    return linears[-1] if linears else None


def _looks_deployed(state: dict[str, Tensor], target: dict[str, Tensor]) -> bool:
    """A state dict of ``optimize_for_inference``: no batch-norm statistics, and biases on
    convolutions that have none in the trained form, or a MoD block's ``packed_weights``."""
    if any(key.rpartition(".")[2] == PACKED for key in state):
        return True
    if not any(key.endswith(".running_mean") for key in target):
        return False
    if any(key.endswith(".running_mean") for key in state):
        return False
    return any(
        key.endswith(".bias") and key not in target and key[: -len("bias")] + "weight" in target for key in state
    )


def plan_init(model: nn.Module, model_name: str, source: InitSource) -> InitPlan:
    """Decide what of ``source`` loads into ``model`` (a fresh model, on any device, ``meta`` included).

    Raises:
        InitError: the file does not fit: a deployed model, another architecture, other MoD settings,
            or nothing that loads.
    """
    path = source.path
    state = source.state
    target = model.state_dict()
    if _looks_deployed(state, target):
        raise InitError(
            f"--init {path!r} holds a deployed model (optimize_for_inference: batch norms folded into the "
            "convolutions, no batch-norm entries): it cannot be trained further; start from the checkpoint it "
            "was made from"
        )
    if source.model_name in MOD_BUILDERS and source.model_name != model_name:
        raise InitError(
            f"--init {path!r} is a checkpoint of {source.model_name}, another architecture than {model_name}; "
            f"pass --model {source.model_name}"
        )
    blocks = tuple(name + "." for name, module in model.named_modules() if isinstance(module, MoDBlock))
    head = _head_name(model)

    def is_head(key: str) -> bool:
        return head is not None and _owner(key) == head

    def in_mod_block(key: str) -> bool:
        return bool(blocks) and key.startswith(blocks)

    mod_source = source.model_name in MOD_BUILDERS or any(".router." in key and in_mod_block(key) for key in state)

    head_reason = "the head"
    if head is not None and f"{head}.weight" in state and f"{head}.weight" in target:
        file_classes, classes = state[f"{head}.weight"].shape[0], target[f"{head}.weight"].shape[0]
        if file_classes != classes:
            head_reason = f"head {head}: {file_classes} classes in the file, {classes} here; re-initialised"
    tensors: dict[str, Tensor] = {}
    fresh: dict[str, str] = {}
    skipped: dict[str, str] = {}
    problems: list[str] = []
    problem_keys: list[str] = []
    for key, value in target.items():
        fits = key in state and tuple(state[key].shape) == tuple(value.shape)
        if is_head(key):
            if fits:
                tensors[key] = state[key]
            else:
                fresh[key] = head_reason if key in state else f"head {head}: not in the file"
        elif in_mod_block(key) and not mod_source:
            fresh[key] = "MoD blocks, which start fresh (the file is a baseline's)"
        elif fits:
            tensors[key] = state[key]
        elif key.endswith(".num_batches_tracked") and key not in state:
            fresh[key] = "batch-norm step counters the file lacks: start at 0"
        else:
            problem_keys.append(key)
            problems.append(
                f"{key} is missing"
                if key not in state
                else f"{key} has shape {tuple(state[key].shape)} in the file, {tuple(value.shape)} here"
            )
    extra = []
    for key in state:
        if key in tensors:
            continue
        if is_head(key):
            skipped[key] = head_reason
        elif in_mod_block(key) and not mod_source:
            skipped[key] = "standard blocks where the model has MoD blocks"
        elif key not in target:
            extra.append(key)
    if problems or extra:
        parts = []
        if problems:
            parts.append(
                f"{len(problems)} of the model's tensors are missing or of another shape (first: {problems[0]})"
            )
        if extra:
            parts.append(f"the file holds {len(extra)} tensors the model does not have (first: {extra[0]})")
        settings = mod_source and all(in_mod_block(key) for key in problem_keys + extra)
        hint = (
            "were its MoD blocks trained with another capacity, fusion or router?"
            if settings
            else "is it another architecture?"
        )
        raise InitError(f"--init {path!r} ({source.description}) does not fit {model_name}: {'; '.join(parts)}; {hint}")
    if not any(not is_head(key) for key in tensors):
        raise InitError(f"--init {path!r} ({source.description}): nothing of it fits {model_name}")
    return InitPlan(source, model_name, tensors, skipped, fresh, through_torchvision=not mod_source)


def apply_init(model: nn.Module, plan: InitPlan) -> None:
    """Load ``plan.tensors`` into ``model`` (all of them, or raise :class:`InitError` before training).

    A baseline's weights go through :func:`load_torchvision_weights`, which loads whole modules; the
    report must list exactly the planned tensors.
    """
    if plan.through_torchvision:
        try:
            report = load_torchvision_weights(model, plan.tensors)
        except (TypeError, ValueError) as error:
            raise InitError(f"--init {plan.source.path!r}: {error}") from None
        if sorted(report.loaded) != sorted(plan.tensors):
            not_loaded = sorted(set(plan.tensors) - set(report.loaded))
            raise InitError(
                f"--init {plan.source.path!r}: load_torchvision_weights did not load {len(not_loaded)} planned "
                f"tensors (first: {not_loaded[:1]})"
            )
        return
    with torch.no_grad():
        result = model.load_state_dict(plan.tensors, strict=False)
    if result.unexpected_keys:  # cannot happen: the plan holds model keys only
        raise InitError(f"--init {plan.source.path!r}: unexpected keys {result.unexpected_keys[:3]}")
