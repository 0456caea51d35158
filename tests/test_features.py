"""MoD models as backbones: torchvision.models.feature_extraction (mod_models.features)."""

import pytest
import torch

from mod_models import build_model
from mod_models.blocks import MoDBlock
from mod_models.features import disable_inplace, mod_feature_extractor, mod_graph_node_names


def _manual_resnet_features(model, x):
    """Stage by stage forward, cloning every stored feature (ground truth, immune to in-place writes)."""
    features = {}
    h = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    for stage in ("layer1", "layer2", "layer3", "layer4"):
        for index, block in enumerate(getattr(model, stage)):
            h = block(h)
            features[f"{stage}.{index}"] = h.clone()
    return features


@pytest.mark.parametrize("name", ["resnet18_mod", "resnet50_mod"])
def test_feature_extractor_returns_intact_features(name):
    torch.manual_seed(0)
    model = build_model(name, num_classes=10, backend="reference").eval()
    nodes = ["layer1.0", "layer1.1", "layer2.0", "layer3.1", "layer4"]
    extractor = mod_feature_extractor(model, nodes)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        features = extractor(x)
        expected = _manual_resnet_features(model, x)
    assert list(features) == nodes
    # "layer1.0" feeds the MoD block "layer1.1"; it must not carry that block's in-place update.
    for node in nodes:
        key = node if node != "layer4" else f"layer4.{len(model.layer4) - 1}"
        torch.testing.assert_close(features[node], expected[key], rtol=0, atol=0)
    assert not torch.equal(features["layer1.0"], features["layer1.1"])
    assert all(not m.inplace for m in model.modules() if isinstance(m, MoDBlock))


def test_feature_extractor_trains():
    torch.manual_seed(0)
    model = build_model("resnet18_mod", num_classes=10, backend="reference")
    extractor = mod_feature_extractor(model, {"layer2.1": "c3", "layer4": "c5"}).train()
    out = extractor(torch.randn(2, 3, 64, 64))
    assert out["c3"].shape == (2, 128, 8, 8) and out["c5"].shape == (2, 512, 2, 2)
    (out["c3"].mean() + out["c5"].mean()).backward()
    router = model.layer2[1].router.fc1.weight
    assert router.grad is not None and router.grad.abs().sum() > 0  # shared parameters, gradients reach the router


def test_graph_node_names_treat_mod_blocks_as_leaves():
    model = build_model("mobilenet_v2_mod", num_classes=10, backend="reference")
    train_nodes, eval_nodes = mod_graph_node_names(model)
    assert train_nodes == eval_nodes
    assert "features.3" in eval_nodes  # a MoD block: one node
    assert not any(node.startswith("features.3.") for node in eval_nodes)
    assert any(node.startswith("features.2.conv.") for node in eval_nodes)  # a standard block: traced through
    extractor = mod_feature_extractor(model, ["features.3", "features.13"])
    with torch.no_grad():
        out = extractor(torch.randn(1, 3, 64, 64))
    assert out["features.3"].shape[1] == 24 and out["features.13"].shape[1] == 96


def test_disable_inplace_and_type_errors():
    model = build_model("resnet18_mod", backend="reference")
    assert disable_inplace(model) is model
    assert all(not m.inplace for m in model.modules() if isinstance(m, MoDBlock))
    with pytest.raises(TypeError):
        mod_feature_extractor("resnet18_mod", ["layer1"])
