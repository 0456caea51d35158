"""Checks of the torchvision-style arguments every MoD builder takes (``weights``, ``progress``, ``num_classes``),
and the (empty) weights enum torchvision's ``get_model_weights`` returns for them."""

from __future__ import annotations

from typing import Optional

from torchvision.models import WeightsEnum

NO_WEIGHTS_ADVICE = (
    "no pretrained MoD weights exist; build the model with weights=None and start from the torchvision "
    "baseline's weights (mod_models.BASELINE_OF[name]): "
    "mod_models.load_torchvision_weights(model, torchvision.models.get_model(baseline, weights='DEFAULT')"
    ".state_dict()) loads its stem, standard blocks and head"
)


class _NoWeightsMeta(type(WeightsEnum)):
    """Enum metaclass whose missing members raise an error saying that no weights exist, and what to do."""

    def __getattr__(cls, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        raise AttributeError(f"{cls.__name__}.{name}: {NO_WEIGHTS_ADVICE}")

    def __getitem__(cls, name: str):
        raise KeyError(f"{cls.__name__}[{name!r}]: {NO_WEIGHTS_ADVICE}")


class NoPretrainedWeights(WeightsEnum, metaclass=_NoWeightsMeta):
    """Weights of the MoD builders: no pretrained MoD weights exist.

    ``torchvision.models.get_model_weights("resnet50_mod")`` returns this enum; it has no members, and
    ``NoPretrainedWeights.DEFAULT`` (or any other name) raises an error saying how to start from the
    torchvision baseline's weights instead (:func:`mod_models.load_torchvision_weights`).
    """


def annotate_weights(builder) -> None:
    """Give ``builder``'s ``weights`` parameter the annotation ``Optional[NoPretrainedWeights]``, the form
    torchvision's ``get_model_weights`` reads (the modules defining the builders postpone annotations,
    which leaves strings there)."""
    builder.__annotations__["weights"] = Optional[NoPretrainedWeights]


def check_builder_args(name: str, *, weights: object, progress: object, num_classes: object) -> None:
    """Raise a clear error for arguments a MoD builder ``name`` cannot honour.

    ``weights`` must be ``None`` (no pretrained MoD weights exist); ``progress`` must be a bool
    (accepted for torchvision compatibility and ignored, as torchvision does when nothing is
    downloaded); ``num_classes`` must be an int >= 0 (as in torchvision, 0 gives an empty classifier;
    the timm interface of :mod:`mod_models.integrations.timm` replaces it by none).
    """
    if weights is not None:
        raise ValueError(
            f"{name}: no pretrained weights exist for MoD models; pass weights=None, got {weights!r} "
            "(mod_models.load_torchvision_weights loads the torchvision baseline's weights into the standard blocks)"
        )
    if not isinstance(progress, bool):
        raise TypeError(f"{name}: progress must be True or False, got {progress!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
        raise ValueError(f"{name}: num_classes must be an int >= 0, got {num_classes!r}")
