"""Semantic segmentation with a MoD backbone: torchvision's FCN on a dilated MoD ResNet.

The paper's segmentation experiment (FCN on Cityscapes) in torchvision's form:
``fcn_resnet50`` with the ResNet replaced by a MoD ResNet whose ``layer3`` and ``layer4``
are dilated instead of strided (``replace_stride_with_dilation=[False, True, True]``, output
stride 8; the MoD blocks of those stages get the same dilation). Nothing is downloaded::

    from mod_models.integrations.segmentation import fcn_resnet50_mod

    model = fcn_resnet50_mod(num_classes=19, aux_loss=True)   # Cityscapes: 19 classes
    out = model(images)["out"]                                 # [B, 19, H, W] logits
"""

from __future__ import annotations

from typing import Any, Optional

from torchvision.models.feature_extraction import create_feature_extractor
from torchvision.models.resnet import Bottleneck
from torchvision.models.segmentation.fcn import FCN, FCNHead

from ..resnet import RESNET_MOD_CONFIGS, resnet_stage_info
from .features import mod_resnet_backbone

DILATED_STAGES = [False, True, True]  # layer2 strided; layer3, layer4 dilated (output stride 8)


def fcn_mod(
    backbone_name: str = "resnet50_mod",
    *,
    weights: None = None,
    progress: bool = True,
    num_classes: int = 21,
    aux_loss: Optional[bool] = None,
    weights_backbone: None = None,
    backbone_kwargs: Optional[dict[str, Any]] = None,
) -> FCN:
    """torchvision's FCN on a dilated MoD ResNet (``fcn_resnet50`` for MoD).

    Args:
        backbone_name: a Bottleneck MoD ResNet (``"resnet50_mod"``, ``"resnet75_mod"``,
            ``"resnet86_mod"``, ``"resnet101_mod"``, ``"resnet152_mod"``): torchvision's
            BasicBlock cannot be dilated.
        weights, weights_backbone: must be None (nothing pretrained exists).
        progress: accepted for torchvision compatibility and ignored.
        num_classes: output classes (torchvision's default 21 is VOC; 19 for Cityscapes).
        aux_loss: also return ``"aux"`` logits from ``layer3`` (an FCN head on it), for the auxiliary loss.
        backbone_kwargs: keywords of the MoD builder (``capacity``, ``fusion``, ``router``, ``backend``, ...).

    Returns:
        ``FCN``: image ``[B, 3, H, W]`` -> ``{"out": [B, num_classes, H, W]}`` (and ``"aux"``, same
        shape, with ``aux_loss``). The backbone is a ``torch.fx`` feature extractor of the MoD ResNet
        (MoD blocks are single nodes); its state_dict keys are torchvision's (``backbone.layer1.0...``).
    """
    task = f"fcn_mod({backbone_name!r})"
    if backbone_name in RESNET_MOD_CONFIGS and RESNET_MOD_CONFIGS[backbone_name][0] is not Bottleneck:
        bottlenecks = [name for name, (block, _) in RESNET_MOD_CONFIGS.items() if block is Bottleneck]
        raise ValueError(
            f"{task}: FCN dilates layer3 and layer4, which needs a Bottleneck ResNet, one of {bottlenecks}"
        )
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"{task}: num_classes must be an int >= 1, got {num_classes!r}")
    if aux_loss is not None and not isinstance(aux_loss, bool):
        raise TypeError(f"{task}: aux_loss must be True, False or None, got {aux_loss!r}")
    backbone = mod_resnet_backbone(
        backbone_name, task=task, weights=weights, weights_backbone=weights_backbone, progress=progress,
        backbone_kwargs=backbone_kwargs, replace_stride_with_dilation=DILATED_STAGES,
    )
    channels = {info["module"]: info["num_chs"] for info in resnet_stage_info(backbone)}
    return_nodes = {"layer4": "out"}
    if aux_loss:
        return_nodes["layer3"] = "aux"
    features = create_feature_extractor(backbone, return_nodes)
    classifier = FCNHead(channels["layer4"], num_classes)
    aux_classifier = FCNHead(channels["layer3"], num_classes) if aux_loss else None
    return FCN(features, classifier, aux_classifier)


def fcn_resnet50_mod(**kwargs: Any) -> FCN:
    """:func:`fcn_mod` on ``resnet50_mod`` (torchvision's ``fcn_resnet50`` for MoD)."""
    return fcn_mod("resnet50_mod", **kwargs)


def fcn_resnet101_mod(**kwargs: Any) -> FCN:
    """:func:`fcn_mod` on ``resnet101_mod`` (torchvision's ``fcn_resnet101`` for MoD)."""
    return fcn_mod("resnet101_mod", **kwargs)
