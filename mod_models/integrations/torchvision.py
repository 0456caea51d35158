"""torchvision conventions: the MoD builders in torchvision's model registry, and torchvision weights.

* :func:`register_with_torchvision` (run by ``import mod_models``) makes
  ``torchvision.models.get_model("resnet50_mod")``, ``get_model_builder`` and ``list_models``
  find every MoD variant (``list_models(module=mod_models)`` lists exactly them).
* :func:`load_torchvision_weights` copies what fits from a torchvision checkpoint (stem,
  standard blocks, head) into a MoD model and reports what it loaded and skipped.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from ..blocks import MoDBlock
from ..deploy import is_deployed
from ..zoo import MOD_BUILDERS

# ----------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------


def torchvision_model_registry() -> dict[str, Callable[..., nn.Module]]:
    """torchvision's model registry: the dict that ``get_model``, ``get_model_builder`` and
    ``list_models`` read.

    torchvision has no public way to add a model to it; its own builders are registered with the
    private ``torchvision.models._api.register_model`` decorator, which writes into the private
    dict ``torchvision.models._api.BUILTIN_MODELS``. This function is the only place that touches
    that private API (``tests/integrations/test_torchvision.py`` checks it still behaves as assumed).

    Raises:
        RuntimeError: torchvision no longer has the registry in that form.
    """
    from torchvision.models import _api

    registry = getattr(_api, "BUILTIN_MODELS", None)
    if not isinstance(registry, dict):
        raise RuntimeError(
            f"torchvision {_torchvision_version()} has no dict torchvision.models._api.BUILTIN_MODELS (got "
            f"{type(registry).__name__}); mod_models cannot register its builders with torchvision.models.get_model"
        )
    return registry


def _torchvision_version() -> str:
    import torchvision

    return torchvision.__version__


def _same_builder(a: Callable, b: Callable) -> bool:
    """True for the same builder, also across a reload of its module (equal module and name)."""
    return a is b or (
        getattr(a, "__module__", None) == getattr(b, "__module__", None)
        and getattr(a, "__qualname__", None) == getattr(b, "__qualname__", None)
    )


def register_with_torchvision(builders: Mapping[str, Callable[..., nn.Module]] = MOD_BUILDERS) -> list[str]:
    """Add ``builders`` (name -> builder; default: every MoD variant) to torchvision's model registry.

    Idempotent. Returns the names now registered to these builders. A name torchvision already
    registers to a different builder is left alone, with a ``RuntimeWarning``: ``get_model`` keeps
    returning torchvision's model for it.
    """
    registry = torchvision_model_registry()
    registered = []
    for name, builder in builders.items():
        existing = registry.get(name)
        if existing is not None and not _same_builder(existing, builder):
            warnings.warn(
                f"torchvision already registers a model named {name!r} "
                f"({existing.__module__}.{existing.__qualname__}); "
                f"mod_models leaves it, so torchvision.models.get_model({name!r}) does not build the MoD variant",
                RuntimeWarning,
                stacklevel=2,
            )
            continue
        registry[name] = builder
        registered.append(name)
    return registered


# ----------------------------------------------------------------------------------------------
# torchvision checkpoints
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WeightLoadReport:
    """What :func:`load_torchvision_weights` did.

    Attributes:
        loaded: checkpoint keys copied into the model, in checkpoint order.
        skipped: checkpoint key -> why it was not loaded.
        missing: model keys the checkpoint did not fill (left as initialised), in model order.
    """

    loaded: list[str]
    skipped: dict[str, str]
    missing: list[str]

    def __str__(self) -> str:
        return (
            f"loaded {len(self.loaded)} tensors, skipped {len(self.skipped)}, "
            f"left {len(self.missing)} model tensors as initialised"
        )


def _owner(key: str) -> str:
    """The module a state_dict key belongs to: ``"layer1.0.bn1"`` for ``"layer1.0.bn1.weight"``."""
    return key.rsplit(".", 1)[0] if "." in key else ""


def check_state_dict(state_dict: object) -> Mapping[str, Tensor]:
    """``state_dict`` if it is a mapping of str to tensors, else a ``TypeError`` saying what it is."""
    if isinstance(state_dict, nn.Module):
        raise TypeError(
            f"state_dict must be a mapping of names to tensors, got a {type(state_dict).__name__}; "
            "pass its .state_dict()"
        )
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping of names to tensors, got {type(state_dict).__name__}")
    for key, value in state_dict.items():
        if not isinstance(key, str):
            raise TypeError(f"state_dict keys must be str, got {key!r}")
        if not isinstance(value, Tensor):
            hint = f"; is it a training checkpoint? pass state_dict[{key!r}]" if isinstance(value, Mapping) else ""
            raise TypeError(f"state_dict[{key!r}] must be a torch.Tensor, got {type(value).__name__}{hint}")
    return state_dict


def _mod_block_reason(block: str) -> str:
    return (
        f"MoD block {block!r}: its reduced block f_k sees the k selected channels in score order, not a standard "
        "block's channels, so a standard block's tensors mean nothing there (left as initialised)"
    )


def check_not_deployed(model: nn.Module, what: str) -> None:
    """Refuse a model that ``optimize_for_inference`` deployed: its batch norms are folded into the
    convolutions, so a checkpoint's tensors no longer mean what they meant."""
    if is_deployed(model) or any(isinstance(m, MoDBlock) and m.deployed for m in model.modules()):
        raise ValueError(
            f"{what}: the model was deployed by optimize_for_inference (batch norms folded into the convolutions, "
            "which changed its tensors and state_dict); load the weights into the model before "
            "optimize_for_inference, then deploy it"
        )


def load_torchvision_weights(model: nn.Module, state_dict: Mapping[str, Tensor]) -> WeightLoadReport:
    """Load every tensor of a torchvision checkpoint whose name and shape fit ``model``, outside its MoD blocks.

    A MoD model keeps torchvision's module names for its stem, standard blocks and head, but
    its MoD blocks reuse names like ``layer1.1.conv1``. Those are never loaded, whatever their
    shapes (with ``capacity=1`` they are a standard block's): a MoD block's reduced block ``f_k``
    sees the selected channels in the order of their scores, so the tensors of a standard block
    at that position mean nothing there; they are reported as skipped and the block stays as
    initialised. Everything else loads what fits, one module at a time: a module's tensors
    (e.g. a BatchNorm's weight, bias and running statistics) are loaded together or not at all,
    so no module mixes checkpoint and initial values. A module is loaded when every tensor it
    shares by name with the checkpoint has the same shape; checkpoint tensors the model does not
    have (e.g. ``num_batches_tracked`` for a model with ``FrozenBatchNorm2d``) are skipped. Values
    are cast to the model's dtype and device.

    Args:
        model: the MoD (or any) model to fill.
        state_dict: name -> tensor, e.g. ``torchvision.models.resnet50(...).state_dict()`` or a
            downloaded torchvision checkpoint.

    Returns:
        A :class:`WeightLoadReport`: ``loaded`` and ``skipped`` checkpoint keys (with the reason),
        and the ``missing`` model keys (MoD blocks, a head of another size, ...).

    Raises:
        TypeError: ``model`` is not a module, or ``state_dict`` is not a mapping of str to tensors.
        ValueError: ``model`` was deployed by ``optimize_for_inference`` (load before deploying), or
            no tensor of the checkpoint fits the model. Nothing is loaded then.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_not_deployed(model, "load_torchvision_weights")
    checkpoint = check_state_dict(state_dict)
    target = model.state_dict()
    mod_blocks = [name for name, module in model.named_modules() if isinstance(module, MoDBlock)]

    def mod_block_of(key: str) -> Optional[str]:
        return next((block for block in mod_blocks if key.startswith(block + ".")), None)

    misfits: dict[str, str] = {}  # owner module -> first shape mismatch
    for key, value in checkpoint.items():
        if mod_block_of(key) is not None:
            continue
        if key in target and tuple(target[key].shape) != tuple(value.shape):
            misfits.setdefault(
                _owner(key),
                f"module {_owner(key)!r} does not fit: {key} has shape {tuple(value.shape)} in the checkpoint, "
                f"{tuple(target[key].shape)} in the model",
            )

    loaded: list[str] = []
    skipped: dict[str, str] = {}
    for key in checkpoint:
        block = mod_block_of(key)
        if block is not None:
            skipped[key] = _mod_block_reason(block)
        elif key not in target:
            skipped[key] = "not in the model"
        elif _owner(key) in misfits:
            skipped[key] = misfits[_owner(key)]
        else:
            loaded.append(key)
    if not loaded:
        hint = ""
        if checkpoint and all(key.startswith("module.") for key in checkpoint):
            hint = " (every key starts with 'module.': strip the DistributedDataParallel prefix first)"
        raise ValueError(f"none of the {len(checkpoint)} tensors of the checkpoint fits {type(model).__name__}{hint}")

    with torch.no_grad():
        model.load_state_dict({key: checkpoint[key] for key in loaded}, strict=False)
    loaded_set = set(loaded)
    missing = [key for key in target if key not in loaded_set]
    return WeightLoadReport(loaded=loaded, skipped=skipped, missing=missing)
