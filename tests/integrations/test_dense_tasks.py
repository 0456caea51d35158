"""MoD ResNets under torchvision's dense-task heads (mod_models.integrations.detection,
mod_models.integrations.segmentation).

Both models train a few SGD steps on a tiny generated set (coloured rectangles on noise: boxes
for Faster R-CNN, masks for FCN) and must lower their loss; then inference must return outputs
of the documented form. One intra-op thread (tests/single_thread.py) keeps the steps fast on a shared CPU.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from single_thread import one_intra_op_thread  # noqa: F401  (fixture)
from torchvision.models.detection import FasterRCNN
from torchvision.models.segmentation.fcn import FCN

import mod_models
from mod_models import MoDBlock
from mod_models.integrations.detection import fasterrcnn_mod_fpn, fasterrcnn_resnet50_mod_fpn, resnet_fpn
from mod_models.integrations.segmentation import fcn_mod, fcn_resnet50_mod

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

IMAGE = 64  # detection image side
MASK_IMAGE = 32  # segmentation image side


def _rectangles(count: int, size: int, seed: int):
    """``count`` images ``[3, size, size]`` of dim noise, each with one bright rectangle.

    Image ``i`` holds a rectangle of class ``c = 1 + i % 2``, lit in colour channel ``c - 1``.
    Returns the images, the detection targets (``boxes`` as ``[[x1, y1, x2, y2]]``, ``labels``) and
    the ``[count, size, size]`` class masks (0 = background).
    """
    generator = torch.Generator().manual_seed(seed)
    images, targets, masks = [], [], []
    for index in range(count):
        label = 1 + index % 2
        image = torch.rand(3, size, size, generator=generator) * 0.2
        width, height = torch.randint(size // 4, size // 2, (2,), generator=generator).tolist()
        x0 = int(torch.randint(0, size - width, (1,), generator=generator))
        y0 = int(torch.randint(0, size - height, (1,), generator=generator))
        image[label - 1, y0 : y0 + height, x0 : x0 + width] = 1.0
        mask = torch.zeros(size, size, dtype=torch.int64)
        mask[y0 : y0 + height, x0 : x0 + width] = label
        images.append(image)
        targets.append({"boxes": torch.tensor([[x0, y0, x0 + width, y0 + height]], dtype=torch.float32),
                        "labels": torch.tensor([label])})
        masks.append(mask)
    return images, targets, torch.stack(masks)


def _small_fasterrcnn(**kwargs) -> FasterRCNN:
    """Faster R-CNN sized for 64 px images: few anchors sampled, few proposals, few detections."""
    return fasterrcnn_mod_fpn(
        "resnet18_mod", num_classes=3, min_size=IMAGE, max_size=IMAGE,
        rpn_batch_size_per_image=64, box_batch_size_per_image=32,
        rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=100,
        rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=50, box_detections_per_img=10,
        **kwargs,
    )


def test_fasterrcnn_loss_falls_and_detections_are_well_formed():
    images, targets, _ = _rectangles(2, IMAGE, seed=1)
    model = _small_fasterrcnn().train()
    assert sum(isinstance(m, MoDBlock) for m in model.backbone.body.modules()) == 4  # resnet18_mod's MoD blocks
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.005, momentum=0.9)
    history = []
    for _ in range(16):
        losses = model(images, targets)
        assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
        loss = sum(losses.values())
        optimizer.zero_grad()
        loss.backward()
        router = model.backbone.body.layer2[1].router.fc1.weight
        assert router.grad is not None and bool(router.grad.abs().sum() > 0), "no gradient reached a MoD router"
        optimizer.step()
        history.append({name: value.item() for name, value in losses.items()} | {"total": loss.item()})
    # Single steps are noisy (more proposals turn positive, so the box regression loss can rise for a
    # while); the mean of the last four steps ends at 0.32-0.42 of the first over five seeds tried.
    last = sum(step["total"] for step in history[-4:]) / 4
    assert last < 0.7 * history[0]["total"], [round(step["total"], 3) for step in history]

    model.eval()
    with torch.no_grad():
        detections = model(images)
    assert isinstance(detections, list) and len(detections) == len(images)
    for found in detections:
        assert set(found) == {"boxes", "labels", "scores"}
        boxes, labels, scores = found["boxes"], found["labels"], found["scores"]
        count = boxes.shape[0]
        assert boxes.shape == (count, 4) and labels.shape == (count,) and scores.shape == (count,)
        assert 0 < count <= 10
        assert boxes.dtype == torch.float32 and labels.dtype == torch.int64
        assert bool(torch.isfinite(boxes).all())
        assert bool((boxes[:, 0] >= 0).all() and (boxes[:, 2] <= IMAGE).all() and (boxes[:, 0] <= boxes[:, 2]).all())
        assert bool((boxes[:, 1] >= 0).all() and (boxes[:, 3] <= IMAGE).all() and (boxes[:, 1] <= boxes[:, 3]).all())
        assert bool(((labels >= 1) & (labels <= 2)).all()), labels  # never the background class 0
        assert bool(((scores >= 0) & (scores <= 1)).all()) and bool((scores[:-1] >= scores[1:]).all())


def test_fcn_loss_falls_and_logits_are_well_formed():
    images, _, masks = _rectangles(2, MASK_IMAGE, seed=2)
    x = torch.stack(images)
    model = fcn_resnet50_mod(num_classes=3, aux_loss=True).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    history = []
    for _ in range(8):
        out = model(x)
        assert set(out) == {"out", "aux"}
        loss = F.cross_entropy(out["out"], masks) + 0.5 * F.cross_entropy(out["aux"], masks)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(loss.item())
    assert history[-1] < 0.5 * history[0], [round(value, 3) for value in history]

    model.eval()
    with torch.no_grad():
        out = model(x)
    for key in ("out", "aux"):
        assert out[key].shape == (2, 3, MASK_IMAGE, MASK_IMAGE) and out[key].dtype == torch.float32
        assert bool(torch.isfinite(out[key]).all())
    # After training on them, most pixels of the training images get their class.
    accuracy = (out["out"].argmax(dim=1) == masks).float().mean()
    assert accuracy > 0.7, float(accuracy)


def test_fcn_backbone_is_dilated_with_torchvision_keys():
    model = fcn_mod("resnet50_mod", num_classes=19)
    assert isinstance(model, FCN) and model.aux_classifier is None
    blocks = {name: m for name, m in model.backbone.named_modules() if isinstance(m, MoDBlock)}
    dilations = {name: block.conv2.dilation[0] for name, block in blocks.items()}
    # torchvision's replace_stride_with_dilation=[False, True, True]: layer3 dilation 2, layer4 dilation 4.
    assert dilations == {
        "layer1.1": 1, "layer2.1": 1, "layer2.3": 1, "layer3.1": 2, "layer3.3": 2, "layer3.5": 2, "layer4.1": 4
    }
    keys = set(model.state_dict())
    assert "backbone.layer1.0.conv1.weight" in keys and "backbone.layer4.1.router.fc1.weight" in keys
    assert not any(key.startswith("backbone.fc.") for key in keys)
    with torch.no_grad():
        features = model.backbone(torch.randn(1, 3, 64, 64))
    assert features["out"].shape == (1, 2048, 8, 8)  # output stride 8
    assert model.eval()(torch.randn(1, 3, 64, 64))["out"].shape == (1, 19, 64, 64)


def test_fasterrcnn_builder_structure_and_frozen_layers():
    model = fasterrcnn_resnet50_mod_fpn(num_classes=21, trainable_backbone_layers=2, backbone_kwargs={"capacity": 32})
    body = model.backbone.body
    assert [block.k for name, block in body.named_modules() if isinstance(block, MoDBlock)][:1] == [256 // 32]
    trainable = {name.split(".")[0] for name, p in body.named_parameters() if p.requires_grad}
    assert trainable == {"layer3", "layer4"}  # torchvision's rule: the last 2 of conv1, layer1..layer4
    assert model.roi_heads.box_predictor.cls_score.out_features == 21
    everything = fasterrcnn_mod_fpn("resnet34_mod")  # default: nothing frozen, as torchvision without weights
    assert all(p.requires_grad for p in everything.parameters())
    assert everything.backbone.fpn.inner_blocks[0][0].in_channels == 64  # BasicBlock layer1 width


def test_dense_builders_reject_bad_arguments():
    with pytest.raises(ValueError, match="weights=None"):
        fasterrcnn_resnet50_mod_fpn(weights="COCO_V1")
    with pytest.raises(ValueError, match="weights_backbone=None"):
        fcn_resnet50_mod(weights_backbone="IMAGENET1K_V1")
    with pytest.raises(ValueError, match="Bottleneck ResNet"):
        fcn_mod("resnet18_mod")
    with pytest.raises(ValueError, match="MoD ResNet"):
        fasterrcnn_mod_fpn("mobilenet_v2_mod")
    with pytest.raises(ValueError, match=r"trainable_backbone_layers must be an int in \[0, 5\], got 6"):
        fasterrcnn_mod_fpn("resnet18_mod", trainable_backbone_layers=6)
    with pytest.raises(ValueError, match="returned_layers"):
        fasterrcnn_mod_fpn("resnet18_mod", returned_layers=[0, 5])
    with pytest.raises(ValueError, match="num_classes must be an int >= 2"):
        fasterrcnn_mod_fpn("resnet18_mod", num_classes=1)
    with pytest.raises(ValueError, match=r"must not set \['replace_stride_with_dilation'\]"):
        fcn_resnet50_mod(backbone_kwargs={"replace_stride_with_dilation": [False, False, True]})
    with pytest.raises(TypeError, match="progress must be True or False"):
        fcn_resnet50_mod(progress="no")
    with pytest.raises(TypeError, match="torchvision ResNet"):
        resnet_fpn(mod_models.mobilenet_v2_mod())


def test_fcn_on_a_backbone_that_writes_in_place_equals_the_default():
    # Its feature extractor's graph gives every in-place MoD block a copy of its input: same outputs.
    torch.manual_seed(0)
    in_place = fcn_resnet50_mod(num_classes=3, aux_loss=True, backbone_kwargs={"inplace": True}).eval()
    torch.manual_seed(0)
    default = fcn_resnet50_mod(num_classes=3, aux_loss=True).eval()
    assert any(node.target is torch.clone for node in in_place.backbone.graph.nodes)
    x = torch.randn(2, 3, MASK_IMAGE, MASK_IMAGE)
    with torch.no_grad():
        ours, expected = in_place(x), default(x)
    for key in ("out", "aux"):
        torch.testing.assert_close(ours[key], expected[key], rtol=0, atol=0, msg=key)
