"""MoD models as backbones: torch.fx and torchvision.models.feature_extraction (mod_models.integrations.features)."""

import copy

import pytest
import torch
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import mod_models
from mod_models import build_model
from mod_models.blocks import MoDBlock
from mod_models.integrations.features import disable_inplace, mod_feature_extractor, mod_graph_node_names


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
    # inplace=True: unless the graph gives "layer1.1" a copy of its input, it would write into "layer1.0".
    model = build_model(name, num_classes=10, backend="reference", inplace=True).eval()
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
    assert all(m.inplace for m in model.modules() if isinstance(m, MoDBlock))  # the model is left as it was


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


# ----------------------------------------------------------------------------------------------
# torch.fx directly: MoD blocks trace as leaf nodes
# ----------------------------------------------------------------------------------------------


def _hooked_features(model: nn.Module, names: list[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Outputs of the named submodules in one eager forward, captured by forward hooks (cloned at once)."""
    captured = {}
    modules = dict(model.named_modules())
    handles = [
        modules[name].register_forward_hook(lambda _m, _i, out, name=name: captured.__setitem__(name, out.clone()))
        for name in names
    ]
    try:
        model(x)
    finally:
        for handle in handles:
            handle.remove()
    return captured


@pytest.mark.parametrize(
    "name, nodes",
    [
        # "layer1.0" (standard) feeds the MoD block "layer1.1"; "layer4" ends in the MoD block "layer4.1".
        ("resnet18_mod", ["layer1.0", "layer1.1", "layer2", "layer3.1", "layer4"]),
        ("resnet50_mod", ["layer1.0", "layer1.1", "layer2.3", "layer4"]),
        ("mobilenet_v2_mod", ["features.2", "features.3", "features.12", "features.13", "features.18"]),
    ],
)
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_torchvision_feature_extractor_matches_forward_hooks(name, nodes, train):
    model = build_model(name, num_classes=10, backend="reference").train(train)
    extractor = create_feature_extractor(model, nodes)  # torchvision's own, no MoD-specific arguments
    for block_name, block in model.named_modules():
        if isinstance(block, MoDBlock):  # the graph calls the model's own MoD blocks
            assert extractor.get_submodule(block_name) is block
    x = torch.randn(2, 3, 64, 64)
    with torch.set_grad_enabled(train):
        expected = _hooked_features(model, nodes, x)
        features = extractor(x)
    assert list(features) == nodes
    for node in nodes:
        torch.testing.assert_close(features[node], expected[node], rtol=0, atol=0, msg=f"{name} {node}")
    if train:  # gradients reach the MoD routers through the extracted features
        sum(feature.mean() for feature in features.values()).backward()
        routers = [m.router.fc1.weight.grad for m in model.modules() if isinstance(m, MoDBlock)]
        assert any(grad is not None and bool(grad.abs().sum() > 0) for grad in routers)


def test_graph_node_names_have_mod_blocks_as_single_nodes():
    model = build_model("resnet18_mod", num_classes=10)
    train_nodes, eval_nodes = get_graph_node_names(model)
    assert train_nodes == eval_nodes
    mod_blocks = [name for name, m in model.named_modules() if isinstance(m, MoDBlock)]
    assert mod_blocks == ["layer1.1", "layer2.1", "layer3.1", "layer4.1"]
    for block in mod_blocks:
        assert block in eval_nodes and not any(node.startswith(block + ".") for node in eval_nodes)
    assert "layer1.0.conv1" in eval_nodes and eval_nodes[-1] == "fc"  # standard blocks are traced through


def test_symbolic_trace_matches_eager_forward_and_backward():
    model = build_model("resnet18_mod", num_classes=10, backend="reference")
    graph_module = torch.fx.symbolic_trace(model)
    calls = [node for node in graph_module.graph.nodes if node.op == "call_module" and node.target == "layer2.1"]
    assert len(calls) == 1  # one node for the whole MoD block
    x = torch.randn(2, 3, 32, 32)
    grads = []
    for module in (model, graph_module):
        model.zero_grad()
        torch.manual_seed(1)
        out = module(x)
        out.square().sum().backward()
        grads.append((out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=0, atol=0)
    for key, grad in grads[0][1].items():
        torch.testing.assert_close(grads[1][1][key], grad, rtol=0, atol=0, msg=key)


def _modes(model: nn.Module) -> dict[str, tuple[bool, object]]:
    """Every module's training flag, and each MoD block's ``inplace`` and ``deployed`` flags."""
    return {name: (m.training, (m.inplace, m.deployed) if isinstance(m, MoDBlock) else None)
            for name, m in model.named_modules()}


@pytest.mark.parametrize("deployed", [False, True], ids=["inplace", "deployed"])
def test_torchvisions_feature_extractor_on_in_place_blocks_changes_nothing_and_returns_intact_features(deployed):
    torch.manual_seed(0)
    model = build_model("resnet18_mod", num_classes=10, backend="reference", inplace=True).eval()
    if deployed:
        mod_models.optimize_for_inference(model)
    before = _modes(model)
    nodes = ["layer1.0", "layer1.1", "layer3.1", "layer4"]  # "layer1.0" feeds the in-place MoD block "layer1.1"
    extractor = create_feature_extractor(model, nodes)  # torchvision's own
    assert _modes(model) == before  # still eval mode, still in place
    assert not extractor.training
    clones = [n for n in extractor.graph.nodes if n.target is torch.clone]
    assert len(clones) == 4  # every in-place block the graph calls (layer1.1 .. layer4.1) gets a copy of its input
    x = torch.randn(2, 3, 64, 64)
    expected_model = copy.deepcopy(model)
    disable_inplace(expected_model)
    with torch.no_grad():
        features = extractor(x)
        expected = _manual_resnet_features(expected_model, x)
    for node in nodes:
        key = node if node != "layer4" else f"layer4.{len(model.layer4) - 1}"
        torch.testing.assert_close(features[node], expected[key], rtol=0, atol=0, msg=node)
    with torch.no_grad():  # the model itself still writes in place
        torch.testing.assert_close(model(x), expected_model(x), rtol=0, atol=0)


def test_mod_feature_extractor_keeps_every_modules_mode_and_a_refusal_changes_nothing():
    model = build_model("resnet18_mod", num_classes=10, backend="reference", inplace=True).train()
    model.bn1.eval()  # mixed modes: a frozen stem norm inside a model that trains
    before = _modes(model)
    state = {key: value.clone() for key, value in model.state_dict().items()}
    with pytest.raises(ValueError, match="node: 'layer9' is not present in model"):
        mod_feature_extractor(model, ["layer2", "layer9"])
    assert _modes(model) == before
    assert all(torch.equal(value, state[key]) for key, value in model.state_dict().items())
    extractor = mod_feature_extractor(model, ["layer2"])
    assert _modes(model) == before and extractor.training  # torchvision would leave every module in train mode
    assert not model.bn1.training
    train_nodes, _ = mod_graph_node_names(model)
    assert "layer1.1" in train_nodes and _modes(model) == before


def test_tracing_in_place_blocks_and_refusing_a_bare_block():
    model = build_model("resnet18_mod", num_classes=10)
    model.layer3[1].inplace = True
    traced = torch.fx.symbolic_trace(model)
    assert [n.args[0].target for n in traced.graph.nodes if n.target == "layer3.1"] == [torch.clone]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x), rtol=0, atol=0)
    extractor = mod_feature_extractor(model, ["layer3.0"])
    assert model.layer3[1].inplace and extractor(torch.randn(1, 3, 32, 32))["layer3.0"].shape == (1, 256, 2, 2)
    with pytest.raises(TypeError, match="cannot be traced on its own"):
        torch.fx.symbolic_trace(model.layer1[1])
    wrapped = torch.fx.symbolic_trace(nn.Sequential(model.layer1[1]))
    x = torch.randn(2, 64, 8, 8)
    torch.testing.assert_close(wrapped(x), model.layer1[1](x), rtol=0, atol=0)
