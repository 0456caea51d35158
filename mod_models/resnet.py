"""MoD ResNets: torchvision's ResNet with every second block of a stage a MoD block.

The paper's placement (Cakaj et al., ACCV 2024): in every stage (``layer1`` .. ``layer4``) blocks
alternate standard / MoD starting with a standard block, so the first block of a stage (stride
and width change) is always standard; MoD blocks replace blocks, the depth is unchanged, and
``capacity = 64`` (``k = C / 64``). The variant names are the paper's; they do not follow the
usual layer-count formula, and the stage lists below are authoritative.

=============  ===========  ===============
variant        block        blocks per stage
=============  ===========  ===============
resnet18_mod   BasicBlock   2, 2, 2, 2
resnet26_mod   BasicBlock   2, 2, 3, 4
resnet34_mod   BasicBlock   3, 4, 6, 3
resnet42_mod   BasicBlock   3, 3, 6, 6
resnet50_mod   Bottleneck   3, 4, 6, 3
resnet75_mod   Bottleneck   3, 4, 14, 3
resnet86_mod   Bottleneck   3, 4, 18, 3
resnet101_mod  Bottleneck   3, 4, 23, 3
resnet152_mod  Bottleneck   3, 8, 36, 3
=============  ===========  ===============


Blocks 0, 2, 4, ... of each stage are torchvision's own ``BasicBlock`` / ``Bottleneck``
(same module names, so a torchvision checkpoint's standard blocks load by name);
blocks 1, 3, 5, ... are :class:`~mod_models.blocks.MoDBasicBlock` /
:class:`~mod_models.blocks.MoDBottleneck` with ``capacity`` 64 by default.
"""

from __future__ import annotations

from typing import Any, Optional, Union

from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from .blocks import MoDBasicBlock, MoDBottleneck, init_conv_and_norm, last_norm
from .builder_args import annotate_weights, check_builder_args

STAGES = ("layer1", "layer2", "layer3", "layer4")

# name: (standard block, blocks per stage), the table in the module docstring.
RESNET_MOD_CONFIGS: dict[str, tuple[type[Union[BasicBlock, Bottleneck]], tuple[int, int, int, int]]] = {
    "resnet18_mod": (BasicBlock, (2, 2, 2, 2)),
    "resnet26_mod": (BasicBlock, (2, 2, 3, 4)),
    "resnet34_mod": (BasicBlock, (3, 4, 6, 3)),
    "resnet42_mod": (BasicBlock, (3, 3, 6, 6)),
    "resnet50_mod": (Bottleneck, (3, 4, 6, 3)),
    "resnet75_mod": (Bottleneck, (3, 4, 14, 3)),
    "resnet86_mod": (Bottleneck, (3, 4, 18, 3)),
    "resnet101_mod": (Bottleneck, (3, 4, 23, 3)),
    "resnet152_mod": (Bottleneck, (3, 8, 36, 3)),
}


def _resnet_mod(
    name: str,
    *,
    weights: None,
    progress: bool,
    capacity: int,
    fusion: str,
    router: str,
    backend: Optional[str],
    inplace: bool,
    model_class: type[ResNet] = ResNet,
    **kwargs: Any,
) -> ResNet:
    check_builder_args(name, weights=weights, progress=progress, num_classes=kwargs["num_classes"])
    if kwargs.get("groups", 1) != 1 or kwargs.get("width_per_group", 64) != 64:
        raise ValueError(f"{name}: groups and width_per_group are not supported by MoD blocks (ResNeXt/wide variants)")
    block, layers = RESNET_MOD_CONFIGS[name]
    mod_block = MoDBasicBlock if block is BasicBlock else MoDBottleneck
    model = model_class(block, list(layers), **kwargs)
    for stage_name in STAGES:
        stage = getattr(model, stage_name)
        for position in range(1, len(stage), 2):
            standard = stage[position]
            mod = mod_block(
                standard.conv1.in_channels,
                capacity=capacity,
                fusion=fusion,
                router=router,
                backend=backend,
                norm_layer=model._norm_layer,
                dilation=standard.conv2.dilation[0],
                inplace=inplace,
            )
            init_conv_and_norm(mod)
            if kwargs.get("zero_init_residual", False):
                nn.init.zeros_(last_norm(mod).weight)
            stage[position] = mod
    return model


def resnet_stage_info(model: ResNet) -> list[dict[str, Any]]:
    """Where a torchvision ResNet's feature maps are, in timm's ``feature_info`` format.

    Returns ``[{"module": name, "num_chs": C, "reduction": r}, ...]`` for the stem's ReLU
    (``"relu"``, reduction 2) and ``layer1`` .. ``layer4``: a stage's output is
    ``[B, C, H / r, W / r]``. Channels and strides are read from each stage's first block, a
    standard block (stride 1 where ``replace_stride_with_dilation`` dilates the stage).
    """
    info = [dict(module="relu", num_chs=model.conv1.out_channels, reduction=2)]
    reduction = 4
    for stage_name in STAGES:
        first = getattr(model, stage_name)[0]
        reduction *= first.stride
        channels = first.conv1.out_channels * type(first).expansion
        info.append(dict(module=stage_name, num_chs=channels, reduction=reduction))
    return info


def _make_builder(name: str, model_class: type[ResNet] = ResNet):
    """The builder of variant ``name``; ``model_class`` is the ``ResNet`` (sub)class it constructs."""
    block, layers = RESNET_MOD_CONFIGS[name]

    def builder(
        *,
        weights: None = None,
        progress: bool = True,
        num_classes: int = 1000,
        capacity: int = 64,
        fusion: str = "first_k",
        router: str = "learned",
        backend: Optional[str] = None,
        inplace: bool = False,
        **kwargs: Any,
    ) -> ResNet:
        return _resnet_mod(
            name, weights=weights, progress=progress, num_classes=num_classes, capacity=capacity, fusion=fusion,
            router=router, backend=backend, inplace=inplace, model_class=model_class, **kwargs,
        )

    builder.__name__ = builder.__qualname__ = name
    annotate_weights(builder)
    builder.__doc__ = (
        f"{name}: torchvision ResNet with {block.__name__} stages {list(layers)}, every second block MoD.\n\n"
        "Args:\n"
        "    weights: must be None (no pretrained MoD weights exist).\n"
        "    progress: accepted for torchvision compatibility and ignored (there is nothing to download).\n"
        "    num_classes: classifier outputs.\n"
        "    capacity: ``c`` of every MoD block (k = C // c).\n"
        "    fusion: ``'first_k'``, ``'last_k'`` or ``'original'``.\n"
        "    router: ``'learned'`` or ``'random'``.\n"
        "    backend: ``'reference'``, ``'triton'``, ``'auto'`` or None for $MOD_BACKEND.\n"
        "    inplace: False (default): MoD blocks never write into their input; True: they may, where legal.\n"
        "    **kwargs: torchvision ResNet keywords (zero_init_residual, norm_layer, replace_stride_with_dilation).\n"
    )
    return builder


resnet18_mod = _make_builder("resnet18_mod")
resnet26_mod = _make_builder("resnet26_mod")
resnet34_mod = _make_builder("resnet34_mod")
resnet42_mod = _make_builder("resnet42_mod")
resnet50_mod = _make_builder("resnet50_mod")
resnet75_mod = _make_builder("resnet75_mod")
resnet86_mod = _make_builder("resnet86_mod")
resnet101_mod = _make_builder("resnet101_mod")
resnet152_mod = _make_builder("resnet152_mod")
