"""MoD MobileNetV2: inside every ``[t, c, n, s]`` group, blocks 1, 3, ... are MoD (``capacity = 16``).

As in the paper (Cakaj et al., ACCV 2024): ``mobilenet_v2_mod`` is torchvision's MobileNetV2
setting with MoD blocks alternating inside each group; ``mobilenet_v2_mod_l`` the paper's wider
setting (both tables below).

Everything else is torchvision's ``MobileNetV2``; the standard inverted residuals keep
their module names (``features.N``), so their weights load from a torchvision checkpoint.
"""

from __future__ import annotations

from typing import Any, Optional

from torchvision.models.mobilenetv2 import MobileNetV2

from .blocks import MoDInvertedResidual, init_conv_and_norm
from .builder_args import annotate_weights, check_builder_args

MOBILENET_V2_SETTING = [
    # t, c, n, s
    [1, 16, 1, 1],
    [6, 24, 2, 2],
    [6, 32, 3, 2],
    [6, 64, 4, 2],
    [6, 96, 3, 1],
    [6, 160, 3, 2],
    [6, 320, 1, 1],
]

MOBILENET_V2_L_SETTING = [
    # t, c, n, s
    [1, 16, 1, 1],
    [6, 32, 2, 2],
    [6, 64, 3, 2],
    [6, 96, 4, 2],
    [6, 128, 3, 1],
    [6, 160, 3, 2],
    [6, 320, 1, 1],
]


def _mobilenet_v2_mod(
    name: str,
    setting: list[list[int]],
    *,
    weights: None,
    progress: bool,
    capacity: int,
    fusion: str,
    router: str,
    backend: Optional[str],
    inplace: bool,
    model_class: type[MobileNetV2] = MobileNetV2,
    **kwargs: Any,
) -> MobileNetV2:
    check_builder_args(name, weights=weights, progress=progress, num_classes=kwargs["num_classes"])
    if "inverted_residual_setting" in kwargs or "block" in kwargs:
        raise ValueError(f"{name}: inverted_residual_setting and block are fixed by the variant")
    model = model_class(inverted_residual_setting=setting, **kwargs)
    norm_layer = kwargs.get("norm_layer")
    position = 1  # features[0] is the stem
    for expand_ratio, _, repeats, _ in setting:
        for index_in_group in range(repeats):
            if index_in_group % 2 == 1:
                standard = model.features[position]
                mod = MoDInvertedResidual(
                    standard.out_channels,
                    capacity=capacity,
                    expand_ratio=expand_ratio,
                    fusion=fusion,
                    router=router,
                    backend=backend,
                    norm_layer=norm_layer,
                    inplace=inplace,
                )
                init_conv_and_norm(mod)
                model.features[position] = mod
            position += 1
    return model


def mobilenet_v2_stage_info(model: MobileNetV2) -> list[dict[str, Any]]:
    """Where a torchvision MobileNetV2's feature maps are, in timm's ``feature_info`` format.

    Returns ``[{"module": "features.N", "num_chs": C, "reduction": r}, ...]`` for the last block
    before every stride-2 block and the last inverted residual (reductions 2, 4, 8, 16, 32; for
    the standard setting 16, 24, 32, 96 and 320 channels). ``features[0]`` is the stem (stride 2),
    ``features[-1]`` the 1x1 head convolution; MoD blocks have stride 1.
    """
    blocks = list(model.features)[1:-1]
    info = []
    reduction = 2
    for index, block in enumerate(blocks):
        reduction *= getattr(block, "stride", 1)
        following = blocks[index + 1] if index + 1 < len(blocks) else None
        if following is None or getattr(following, "stride", 1) != 1:
            info.append(dict(module=f"features.{index + 1}", num_chs=block.out_channels, reduction=reduction))
    return info


def _make_builder(name: str, setting: list[list[int]], model_class: type[MobileNetV2] = MobileNetV2):
    """The builder of variant ``name``; ``model_class`` is the ``MobileNetV2`` (sub)class it constructs."""

    def builder(
        *,
        weights: None = None,
        progress: bool = True,
        num_classes: int = 1000,
        capacity: int = 16,
        fusion: str = "first_k",
        router: str = "learned",
        backend: Optional[str] = None,
        inplace: bool = False,
        **kwargs: Any,
    ) -> MobileNetV2:
        return _mobilenet_v2_mod(
            name, setting, weights=weights, progress=progress, num_classes=num_classes, capacity=capacity,
            fusion=fusion, router=router, backend=backend, inplace=inplace, model_class=model_class, **kwargs,
        )

    builder.__name__ = builder.__qualname__ = name
    annotate_weights(builder)
    builder.__doc__ = (
        f"{name}: torchvision MobileNetV2 with setting (t, c, n, s) {setting}, every second block of a group MoD.\n\n"
        "Args: as the ResNet builders (capacity defaults to 16); **kwargs go to torchvision's MobileNetV2\n"
        "(width_mult, round_nearest, norm_layer, dropout).\n"
    )
    return builder


MOBILENET_V2_MOD_SETTINGS = {"mobilenet_v2_mod": MOBILENET_V2_SETTING, "mobilenet_v2_mod_l": MOBILENET_V2_L_SETTING}

mobilenet_v2_mod = _make_builder("mobilenet_v2_mod", MOBILENET_V2_SETTING)
mobilenet_v2_mod_l = _make_builder("mobilenet_v2_mod_l", MOBILENET_V2_L_SETTING)
