"""The deploy form (mod_models.optimize_for_inference) of the models the integrations build: timm's MoD
models and their feature extractors, torch.fx feature extractors, Faster R-CNN and FCN.

Each deployed model is compared with the model it was made from (unfolded batch norms, reference
backend) by teacher forcing (tests/helpers.py): folding moves convolution outputs by ulps, which can
flip a near-tie selection of fresh weights, so the deployed model's selections are forced on the
unfolded one, which must then reproduce its outputs (fp32: relative L2 1e-4).
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from helpers import assert_teacher_forced_agreement, randomise_norms
from single_thread import one_intra_op_thread  # noqa: F401  (fixture)
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor
from torchvision.ops.misc import FrozenBatchNorm2d

import mod_models
import mod_models.integrations.timm  # noqa: F401  (registers the MoD variants with timm)
from mod_models import MoDBlock
from mod_models.integrations.detection import fasterrcnn_mod_fpn
from mod_models.integrations.segmentation import fcn_mod

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


class _Flat(nn.Module):
    """One tensor out of a model that returns a list or dict of them (what teacher forcing compares)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        values = list(out.values()) if isinstance(out, dict) else list(out) if isinstance(out, (list, tuple)) else [out]
        return torch.cat([v.flatten(1) for v in values], dim=1)


def _norms(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d))]


def _deploy_and_check(model: nn.Module, x: torch.Tensor, label: str) -> nn.Module:
    """Deploy a copy of ``model`` (eval mode), check it as the module docstring says, return it."""
    model = randomise_norms(model).eval()
    # (a deep copy of a torch.fx GraphModule comes back in training mode: eval() again)
    reference = mod_models.set_backend(copy.deepcopy(model).eval(), "reference")
    deployed = mod_models.optimize_for_inference(copy.deepcopy(model).eval())
    assert mod_models.is_deployed(deployed)
    assert not _norms(deployed), f"{label}: batch norms left: {_norms(deployed)[:3]}"
    blocks = [m for m in deployed.modules() if isinstance(m, MoDBlock)]
    assert blocks and all(b.deployed for b in blocks)
    assert_teacher_forced_agreement(_Flat(deployed), x, label, reference=_Flat(reference), backend="reference")
    return deployed


@pytest.mark.parametrize("name, kwargs", [
    ("resnet18_mod", {}),
    ("resnet50_mod", {"global_pool": "catavgmax"}),
    ("resnet18_mod", {"output_stride": 8}),  # BasicBlocks dilated in place
    ("mobilenet_v2_mod", {}),
    ("resnet18_mod", {"features_only": True}),
    ("resnet18_mod", {"features_only": True, "feature_cls": "hook"}),
    ("resnet18_mod", {"features_only": True, "feature_cls": "getter", "out_indices": (1, 3)}),
    ("resnet18_mod", {"features_only": True, "feature_cls": "fx"}),
    ("mobilenet_v2_mod", {"features_only": True}),
])
def test_timm_models_deploy(name, kwargs):
    model = timm.create_model(name, **({} if kwargs.get("features_only") else {"num_classes": 5}), **kwargs)
    _deploy_and_check(model, torch.randn(2, 3, 64, 64), f"{name} {kwargs}")


def test_fx_feature_extractor_deploys_without_overwriting_a_returned_feature():
    model = mod_models.resnet18_mod(num_classes=5)  # not in place: the graph has no copies before its MoD blocks
    extractor = create_feature_extractor(model, ["layer1.0", "layer1.1", "layer4"])
    x = torch.randn(2, 3, 64, 64)
    deployed = _deploy_and_check(extractor, x, "feature extractor")
    # "layer1.0" is returned and feeds "layer1.1": that block must not write into it; the others may.
    assert not deployed.get_submodule("layer1.1").inplace
    assert all(deployed.get_submodule(b).inplace for b in ("layer2.1", "layer3.1", "layer4.1"))
    with torch.inference_mode():
        features = deployed(x)
        expected = mod_models.set_backend(extractor, "reference")(x)  # the unfolded extractor it was made from
    torch.testing.assert_close(features["layer1.0"], expected["layer1.0"], rtol=1e-5, atol=1e-5)


def test_fasterrcnn_deploys():
    model = fasterrcnn_mod_fpn("resnet18_mod", num_classes=3, min_size=64, max_size=64,
                               rpn_pre_nms_top_n_test=50, rpn_post_nms_top_n_test=20, box_detections_per_img=5)
    model = randomise_norms(model).eval()
    reference_backbone = mod_models.set_backend(copy.deepcopy(model.backbone), "reference")
    assert mod_models.optimize_for_inference(model) is model and mod_models.is_deployed(model)
    assert not _norms(model)
    assert_teacher_forced_agreement(_Flat(model.backbone), torch.randn(2, 3, 64, 64), "Faster R-CNN backbone",
                                    reference=_Flat(reference_backbone), backend="reference")
    with torch.inference_mode():
        detections = model([torch.rand(3, 64, 64), torch.rand(3, 64, 64)])
    assert len(detections) == 2 and all(set(d) == {"boxes", "labels", "scores"} for d in detections)
    model.train()
    with pytest.raises(RuntimeError, match="inference only"):
        model([torch.rand(3, 64, 64)], [{"boxes": torch.tensor([[1.0, 1.0, 9.0, 9.0]]), "labels": torch.tensor([1])}])


@pytest.mark.parametrize("aux_loss", [False, True])
def test_fcn_deploys(aux_loss):
    model = fcn_mod("resnet50_mod", num_classes=3, aux_loss=aux_loss)
    _deploy_and_check(model, torch.randn(2, 3, 32, 32), f"FCN aux_loss={aux_loss}")


def test_a_norm_in_an_unknown_container_is_refused_with_what_to_do():
    class Unknown(nn.Module):  # its forward may use its children in any order
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.norm = nn.BatchNorm2d(4)

        def forward(self, x):
            return self.norm(self.conv(x))

    model = nn.Sequential(Unknown()).eval()
    with pytest.raises(ValueError, match=r"0.norm \(BatchNorm2d\) does not directly follow a convolution .* "
                                         r"Unknown.*register_conv_norm_pairs"):
        mod_models.optimize_for_inference(model)
    assert isinstance(model[0].norm, nn.BatchNorm2d)
    mod_models.deploy.register_conv_norm_pairs(Unknown, [("conv", "norm")])
    try:
        x = torch.randn(2, 3, 4, 4)
        with torch.no_grad():
            expected = model(x)
        mod_models.optimize_for_inference(model)
        assert isinstance(model[0].norm, nn.Identity)
        with torch.no_grad():
            torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    finally:
        del mod_models.deploy.NAMED_CONV_NORM_PAIRS[Unknown]
