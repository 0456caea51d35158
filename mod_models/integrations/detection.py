"""Object detection with a MoD backbone: torchvision's Faster R-CNN (FPN) on a MoD ResNet.

The paper's detection experiment (Faster R-CNN on Pascal VOC) in torchvision's form:
``fasterrcnn_resnet50_fpn`` with the ResNet replaced by a MoD ResNet. Nothing is downloaded
(``weights=None``, ``weights_backbone=None``)::

    from mod_models.integrations.detection import fasterrcnn_resnet50_mod_fpn

    model = fasterrcnn_resnet50_mod_fpn(num_classes=21)              # VOC: 20 classes + background
    losses = model(images, targets)                                   # train mode: dict of losses
    detections = model(images)                                        # eval mode: boxes, labels, scores
"""

from __future__ import annotations

from typing import Any, Optional

from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.resnet import ResNet
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from ..resnet import resnet_stage_info
from .features import mod_resnet_backbone

FPN_CHANNELS = 256  # torchvision's FPN width

# torchvision's freezing order: trainable_backbone_layers = n trains the first n of these.
TRAINABLE_LAYER_ORDER = ("layer4", "layer3", "layer2", "layer1", "conv1")


def freeze_backbone_layers(backbone: nn.Module, trainable_layers: int) -> None:
    """torchvision's rule: train the last ``trainable_layers`` (0-5) of ``conv1, layer1 .. layer4``
    (with all 5, also the stem's ``bn1``); every other backbone parameter gets ``requires_grad=False``."""
    if isinstance(trainable_layers, bool) or not isinstance(trainable_layers, int) or not 0 <= trainable_layers <= 5:
        raise ValueError(f"trainable_backbone_layers must be an int in [0, 5], got {trainable_layers!r}")
    trained = list(TRAINABLE_LAYER_ORDER[:trainable_layers]) + (["bn1"] if trainable_layers == 5 else [])
    for name, parameter in backbone.named_parameters():
        if not any(name.startswith(layer) for layer in trained):
            parameter.requires_grad_(False)


def resnet_fpn(
    backbone: ResNet,
    *,
    trainable_layers: int = 5,
    returned_layers: Optional[list[int]] = None,
) -> BackboneWithFPN:
    """torchvision's FPN on ``backbone`` (a MoD or plain ResNet), as ``fasterrcnn_resnet50_fpn`` builds it.

    Args:
        backbone: the ResNet; its parameters outside the trained layers are frozen in place.
        trainable_layers: see :func:`freeze_backbone_layers` (5, the default: everything trains,
            torchvision's choice without pretrained weights).
        returned_layers: stages (1-4) that feed the FPN (default all four).

    Returns:
        ``BackboneWithFPN``: image ``[B, 3, H, W]`` -> ``{"0": [B, 256, H/4, W/4], "1": .. H/8 ..,
        "2": .. H/16 .., "3": .. H/32 .., "pool": .. H/64 ..}`` for the default four stages.
    """
    if not isinstance(backbone, ResNet):
        raise TypeError(
            f"backbone must be a torchvision ResNet (e.g. mod_models.resnet50_mod()), got {type(backbone).__name__}"
        )
    freeze_backbone_layers(backbone, trainable_layers)
    if returned_layers is None:
        returned_layers = [1, 2, 3, 4]
    if (
        not isinstance(returned_layers, (list, tuple))
        or not returned_layers
        or any(isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= 4 for k in returned_layers)
    ):
        raise ValueError(f"returned_layers must be a list of stage numbers in [1, 4], got {returned_layers!r}")
    channels = {info["module"]: info["num_chs"] for info in resnet_stage_info(backbone)}
    return_layers = {f"layer{k}": str(index) for index, k in enumerate(returned_layers)}
    return BackboneWithFPN(
        backbone,
        return_layers,
        [channels[f"layer{k}"] for k in returned_layers],
        FPN_CHANNELS,
        extra_blocks=LastLevelMaxPool(),
    )


def fasterrcnn_mod_fpn(
    backbone_name: str = "resnet50_mod",
    *,
    weights: None = None,
    progress: bool = True,
    num_classes: int = 91,
    weights_backbone: None = None,
    trainable_backbone_layers: Optional[int] = None,
    returned_layers: Optional[list[int]] = None,
    backbone_kwargs: Optional[dict[str, Any]] = None,
    **kwargs: Any,
) -> FasterRCNN:
    """torchvision's Faster R-CNN with FPN on a MoD ResNet (``fasterrcnn_resnet50_fpn`` for MoD).

    Args:
        backbone_name: a MoD ResNet variant (``"resnet18_mod"`` ... ``"resnet152_mod"``).
        weights, weights_backbone: must be None (nothing pretrained exists).
        progress: accepted for torchvision compatibility and ignored.
        num_classes: including the background (torchvision's default 91 is COCO; 21 for VOC).
        trainable_backbone_layers: 0-5, default 5 (all; torchvision's default without pretrained weights).
        returned_layers: stages (1-4) that feed the FPN (default all four).
        backbone_kwargs: keywords of the MoD builder (``capacity``, ``fusion``, ``router``, ``backend``,
            ``norm_layer``, ...).
        **kwargs: torchvision ``FasterRCNN`` keywords (``min_size``, ``max_size``, ``box_detections_per_img``, ...).

    Returns:
        ``FasterRCNN``: train mode ``model(images, targets)`` -> dict of the four losses; eval mode
        ``model(images)`` -> per image ``{"boxes": [N, 4], "labels": [N], "scores": [N]}``.
    """
    task = f"fasterrcnn_mod_fpn({backbone_name!r})"
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"{task}: num_classes must be an int >= 2 (background included), got {num_classes!r}")
    backbone = mod_resnet_backbone(
        backbone_name, task=task, weights=weights, weights_backbone=weights_backbone, progress=progress,
        backbone_kwargs=backbone_kwargs,
    )
    body = resnet_fpn(
        backbone,
        trainable_layers=5 if trainable_backbone_layers is None else trainable_backbone_layers,
        returned_layers=returned_layers,
    )
    return FasterRCNN(body, num_classes=num_classes, **kwargs)


def fasterrcnn_resnet50_mod_fpn(**kwargs: Any) -> FasterRCNN:
    """:func:`fasterrcnn_mod_fpn` on ``resnet50_mod`` (torchvision's ``fasterrcnn_resnet50_fpn`` for MoD)."""
    return fasterrcnn_mod_fpn("resnet50_mod", **kwargs)
