"""Checks of the torchvision-style arguments every MoD builder takes (``weights``, ``progress``, ``num_classes``)."""

from __future__ import annotations


def check_builder_args(name: str, *, weights: object, progress: object, num_classes: object) -> None:
    """Raise a clear error for arguments a MoD builder ``name`` cannot honour.

    ``weights`` must be ``None`` (no pretrained MoD weights exist); ``progress`` must be a bool
    (accepted for torchvision compatibility and ignored, as torchvision does when nothing is
    downloaded); ``num_classes`` must be an int >= 0 (as in torchvision, 0 gives an empty classifier;
    the timm interface of :mod:`mod_models.integrations.timm` replaces it by none).
    """
    if weights is not None:
        raise ValueError(f"{name}: no pretrained weights exist for MoD models; pass weights=None, got {weights!r}")
    if not isinstance(progress, bool):
        raise TypeError(f"{name}: progress must be True or False, got {progress!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
        raise ValueError(f"{name}: num_classes must be an int >= 0, got {num_classes!r}")
