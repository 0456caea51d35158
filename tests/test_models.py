"""The model zoo: every builder runs, MoD blocks sit where the paper puts them, facts table.

All expected placements and sizes below are written out by hand from the paper's description
(Cakaj et al., ACCV 2024; restated in mod_models/resnet.py and mobilenetv2.py), not read back
from the code's configuration tables.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision.models as tvm
from torch import nn
from torchvision.models.mobilenetv2 import InvertedResidual
from torchvision.models.resnet import BasicBlock, Bottleneck

import mod_models
from mod_models import MOD_BUILDERS, MoDBasicBlock, MoDBlock, MoDBottleneck, MoDInvertedResidual
from mod_models.tools.facts import facts_table, model_facts

REPO_ROOT = Path(__file__).resolve().parent.parent

ALL_BUILDERS = [
    "resnet18_mod", "resnet26_mod", "resnet34_mod", "resnet42_mod", "resnet50_mod", "resnet75_mod",
    "resnet86_mod", "resnet101_mod", "resnet152_mod", "mobilenet_v2_mod", "mobilenet_v2_mod_l",
]

# name: (block kind, blocks per stage, number of MoD blocks = sum of n // 2 over the stages)
RESNETS = {
    "resnet18_mod": ("basic", (2, 2, 2, 2), 4),
    "resnet26_mod": ("basic", (2, 2, 3, 4), 5),
    "resnet34_mod": ("basic", (3, 4, 6, 3), 7),
    "resnet42_mod": ("basic", (3, 3, 6, 6), 8),
    "resnet50_mod": ("bottleneck", (3, 4, 6, 3), 7),
    "resnet75_mod": ("bottleneck", (3, 4, 14, 3), 11),
    "resnet86_mod": ("bottleneck", (3, 4, 18, 3), 13),
    "resnet101_mod": ("bottleneck", (3, 4, 23, 3), 15),
    "resnet152_mod": ("bottleneck", (3, 8, 36, 3), 24),
}
# Per stage, for capacity 64: block width C, k = C // 64, router hidden = C // 16, and for
# Bottlenecks the inner width max(k // 4, 1).
STAGE_CHANNELS = {"basic": (64, 128, 256, 512), "bottleneck": (256, 512, 1024, 2048)}
STAGE_K = {"basic": (1, 2, 4, 8), "bottleneck": (4, 8, 16, 32)}
STAGE_ROUTER_HIDDEN = {"basic": (4, 8, 16, 32), "bottleneck": (16, 32, 64, 128)}
BOTTLENECK_INNER = (1, 2, 4, 8)

# features index: (C, k = C // 16, router hidden = max(C // 16, 1)); every MoD block has t = 6.
MOBILENET_MOD_FEATURES = {
    "mobilenet_v2_mod": {3: (24, 1, 1), 5: (32, 2, 2), 8: (64, 4, 4), 10: (64, 4, 4), 12: (96, 6, 6),
                         15: (160, 10, 10)},
    "mobilenet_v2_mod_l": {3: (32, 2, 2), 5: (64, 4, 4), 8: (96, 6, 6), 10: (96, 6, 6), 12: (128, 8, 8),
                           15: (160, 10, 10)},
}
# Output channels of the standard inverted residuals features[1..17] (the first of every group, etc.).
MOBILENET_STANDARD_OUT = {
    "mobilenet_v2_mod": {1: 16, 2: 24, 4: 32, 6: 32, 7: 64, 9: 64, 11: 96, 13: 96, 14: 160, 16: 160, 17: 320},
    "mobilenet_v2_mod_l": {1: 16, 2: 32, 4: 64, 6: 64, 7: 96, 9: 96, 11: 128, 13: 128, 14: 160, 16: 160, 17: 320},
}


def _conv_signature(block: nn.Module) -> list[tuple]:
    return [
        (m.in_channels, m.out_channels, m.kernel_size[0], m.groups)
        for m in block.modules()
        if isinstance(m, nn.Conv2d)
    ]


def _mod_blocks(model: nn.Module) -> list[MoDBlock]:
    return [m for m in model.modules() if isinstance(m, MoDBlock)]


def test_builder_names_are_exported():
    assert sorted(MOD_BUILDERS) == sorted(ALL_BUILDERS)
    for name in ALL_BUILDERS:
        assert getattr(mod_models, name) is MOD_BUILDERS[name]
        assert name in mod_models.__all__


# ----------------------------------------------------------------------------------------------
# Every builder: forward, train / eval, backward
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_BUILDERS)
def test_builder_forward_backward(name):
    model = MOD_BUILDERS[name](num_classes=10)
    x = torch.randn(2, 3, 32, 32)

    model.train()
    logits = model(x)
    assert logits.shape == (2, 10)
    assert bool(torch.isfinite(logits).all())
    (logits * torch.randn(2, 10)).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"parameters without gradient: {missing[:5]}"
    assert all(bool(torch.isfinite(p.grad).all()) for p in model.parameters())
    router_grads = [p.grad for n, p in model.named_parameters() if ".router." in n]
    assert len(router_grads) == 2 * len(_mod_blocks(model))
    assert any(torch.count_nonzero(g) > 0 for g in router_grads), "no router received any gradient"

    model.eval()
    with_grad = model(x)
    assert with_grad.shape == (2, 10)
    x_before = x.clone()
    with torch.no_grad():
        without_grad = model(x)  # the MoD blocks take their in-place path here
    assert torch.equal(without_grad, with_grad.detach())
    assert torch.equal(x, x_before), "the model must never write into its own input"


@pytest.mark.parametrize("name", ["resnet18_mod", "resnet50_mod", "mobilenet_v2_mod"])
def test_builder_keywords_reach_every_mod_block(name):
    model = MOD_BUILDERS[name](num_classes=10, capacity=8, fusion="last_k", router="random", backend="reference")
    blocks = _mod_blocks(model)
    assert blocks
    for block in blocks:
        assert block.k == block.channels // 8
        assert block.fusion == "last_k"
        assert block.router is None
        assert block.backend == "reference"
    assert not [n for n, _ in model.named_parameters() if ".router." in n]
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_resnet_dilation_and_norm_layer_reach_mod_blocks():
    model = mod_models.resnet50_mod(num_classes=10, replace_stride_with_dilation=[False, True, True])
    dilations = {name: block.conv2.dilation[0] for name, block in model.named_modules() if isinstance(block, MoDBlock)}
    assert dilations == {"layer1.1": 1, "layer2.1": 1, "layer2.3": 1, "layer3.1": 2, "layer3.3": 2, "layer3.5": 2,
                         "layer4.1": 4}
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)

    def group_norm(channels):
        return nn.GroupNorm(1, channels)

    for model in (mod_models.resnet18_mod(num_classes=10, norm_layer=group_norm),
                  mod_models.mobilenet_v2_mod(num_classes=10, norm_layer=group_norm)):
        for block in _mod_blocks(model):
            norms = [m for m in block.modules() if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm))]
            assert norms and all(isinstance(m, nn.GroupNorm) for m in norms)
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("name", ALL_BUILDERS)
def test_pretrained_weights_rejected(name):
    with pytest.raises(ValueError, match="weights=None"):
        MOD_BUILDERS[name](weights="IMAGENET1K_V1")


def test_unsupported_torchvision_keywords_rejected():
    with pytest.raises(ValueError, match="groups and width_per_group"):
        mod_models.resnet50_mod(groups=32, width_per_group=4)
    with pytest.raises(ValueError, match="inverted_residual_setting and block"):
        mod_models.mobilenet_v2_mod(inverted_residual_setting=[[1, 16, 1, 1]])


def test_build_model_by_name():
    assert isinstance(mod_models.build_model("resnet18_mod", num_classes=10).layer1[1], MoDBasicBlock)
    assert isinstance(mod_models.build_model("resnet18", num_classes=10).layer1[1], BasicBlock)
    with pytest.raises(ValueError, match=r"MoD keywords \['capacity'\]"):
        mod_models.build_model("resnet18", capacity=8)
    with pytest.raises(ValueError, match="unknown model 'resnet19_mod'"):
        mod_models.build_model("resnet19_mod")


# ----------------------------------------------------------------------------------------------
# Placement
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(RESNETS))
def test_resnet_placement(name):
    kind, blocks_per_stage, mod_count = RESNETS[name]
    model = MOD_BUILDERS[name](num_classes=10)
    standard_cls, mod_cls = (BasicBlock, MoDBasicBlock) if kind == "basic" else (Bottleneck, MoDBottleneck)
    assert len(_mod_blocks(model)) == mod_count
    for stage_index, stage_name in enumerate(("layer1", "layer2", "layer3", "layer4")):
        stage = getattr(model, stage_name)
        assert len(stage) == blocks_per_stage[stage_index]
        channels = STAGE_CHANNELS[kind][stage_index]
        k = STAGE_K[kind][stage_index]
        for position, block in enumerate(stage):
            where = f"{name}.{stage_name}[{position}]"
            if position % 2 == 0:
                assert type(block) is standard_cls, f"{where} should be a standard block"
                continue
            assert type(block) is mod_cls, f"{where} should be a MoD block"
            assert block.channels == channels and block.k == k and block.capacity == 64, where
            assert tuple(block.router.fc1.weight.shape) == (STAGE_ROUTER_HIDDEN[kind][stage_index], channels)
            assert block.router.fc1.bias is None and block.router.fc2.bias is None
            if kind == "basic":
                assert _conv_signature(block) == [(k, k, 3, 1), (k, k, 3, 1)], where
            else:
                inner = BOTTLENECK_INNER[stage_index]
                assert _conv_signature(block) == [(k, inner, 1, 1), (inner, inner, 3, 1), (inner, k, 1, 1)], where


@pytest.mark.parametrize("name", list(MOBILENET_MOD_FEATURES))
def test_mobilenet_placement(name):
    model = MOD_BUILDERS[name](num_classes=10)
    assert len(model.features) == 19
    expected_mod = MOBILENET_MOD_FEATURES[name]
    assert len(_mod_blocks(model)) == len(expected_mod)
    for position in range(1, 18):
        block = model.features[position]
        if position not in expected_mod:
            assert type(block) is InvertedResidual, f"features[{position}] should be standard"
            assert block.out_channels == MOBILENET_STANDARD_OUT[name][position]
            continue
        channels, k, hidden = expected_mod[position]
        assert type(block) is MoDInvertedResidual, f"features[{position}] should be a MoD block"
        assert (block.channels, block.k, block.capacity, block.expand_ratio) == (channels, k, 16, 6)
        assert tuple(block.router.fc1.weight.shape) == (hidden, channels)
        assert block.router.fc1.bias is None and block.router.fc2.bias is None
        assert _conv_signature(block) == [(k, 6 * k, 1, 1), (6 * k, 6 * k, 3, 6 * k), (6 * k, k, 1, 1)]
    assert model.features[18][0].out_channels == 1280


@pytest.mark.parametrize(
    "mod_name, torchvision_builder, is_mod_key",
    [
        ("resnet50_mod", tvm.resnet50, lambda key: re.match(r"layer\d\.\d*[13579]\.", key) is not None),
        ("resnet18_mod", tvm.resnet18, lambda key: re.match(r"layer\d\.\d*[13579]\.", key) is not None),
        ("mobilenet_v2_mod", tvm.mobilenet_v2, lambda key: re.match(r"features\.(3|5|8|10|12|15)\.", key) is not None),
    ],
    ids=["resnet50", "resnet18", "mobilenet_v2"],
)
def test_torchvision_checkpoint_loads_into_standard_blocks(mod_name, torchvision_builder, is_mod_key):
    torchvision_state = torchvision_builder(num_classes=10).state_dict()
    model = MOD_BUILDERS[mod_name](num_classes=10)
    mod_state = model.state_dict()
    standard = {key: value for key, value in torchvision_state.items() if not is_mod_key(key)}
    for key, value in standard.items():
        assert key in mod_state, f"torchvision key {key} missing from {mod_name}"
        assert mod_state[key].shape == value.shape, f"{key}: {tuple(mod_state[key].shape)} != {tuple(value.shape)}"
    extra = [key for key in mod_state if key not in standard and not is_mod_key(key)]
    assert not extra, f"{mod_name} has renamed or extra standard keys: {extra[:5]}"

    result = model.load_state_dict(standard, strict=False)
    assert not result.unexpected_keys
    assert result.missing_keys and all(is_mod_key(key) for key in result.missing_keys)
    for key, value in standard.items():
        assert torch.equal(model.state_dict()[key], value), key


@pytest.mark.parametrize("name, last_norm", [("resnet18_mod", "bn2"), ("resnet50_mod", "bn3")])
def test_zero_init_residual(name, last_norm):
    zeroed = MOD_BUILDERS[name](num_classes=10, zero_init_residual=True)
    plain = MOD_BUILDERS[name](num_classes=10)
    for model, expected in ((zeroed, 0.0), (plain, 1.0)):
        blocks = _mod_blocks(model)
        assert blocks
        for block in blocks:
            weight = getattr(block, last_norm).weight
            assert bool((weight == expected).all()), f"{name} zero_init_residual: {last_norm} weight {weight[:4]}"
            assert bool((block.bn1.weight == 1).all()), "only the last norm of a MoD block is zeroed"
    # With the last BN zeroed a MoD block is ReLU on its target channels at initialisation.
    block = _mod_blocks(zeroed)[0].eval()
    x = torch.randn(2, block.channels, 5, 5)
    with torch.no_grad():
        out = block(x.clone())
    expected = x.clone()
    expected[:, : block.k] = torch.relu(x[:, : block.k])
    assert torch.equal(out, expected)


# ----------------------------------------------------------------------------------------------
# Model facts
# ----------------------------------------------------------------------------------------------


def test_facts_match_torchvision_published_numbers():
    resnet50 = model_facts("resnet50")
    assert resnet50.params_m == pytest.approx(25.557, abs=0.001)  # torchvision: 25,557,032 params
    assert resnet50.gmacs == pytest.approx(4.09, abs=0.01)  # torchvision: 4.09 GFLOPS (i.e. GMACs)
    mobilenet = model_facts("mobilenet_v2")
    assert mobilenet.params_m == pytest.approx(3.505, abs=0.001)  # torchvision: 3,504,872 params
    assert mobilenet.gmacs == pytest.approx(0.30, abs=0.01)  # torchvision: 0.3 GFLOPS
    resnet50_mod = model_facts("resnet50_mod")
    assert resnet50_mod.gmacs < resnet50.gmacs
    assert resnet50_mod.params_m < resnet50.params_m


def test_facts_table_rows():
    (row,) = facts_table(["resnet18_mod"])
    assert row["model"] == "resnet18_mod" and row["baseline"] == "resnet18"
    assert row["baseline_params_m"] == pytest.approx(11.690, abs=0.001)  # torchvision: 11,689,512 params
    assert row["baseline_gmacs"] == pytest.approx(1.81, abs=0.01)  # torchvision: 1.81 GFLOPS
    assert row["gmacs"] < row["baseline_gmacs"]
    assert row["mac_ratio"] == pytest.approx(row["baseline_gmacs"] / row["gmacs"], rel=1e-2)


def test_facts_cli_prints_table():
    result = subprocess.run(
        [sys.executable, "-m", "mod_models.tools.facts", "--models", "resnet18_mod"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith("| model |")
    assert len(lines) == 3, result.stdout
    assert lines[2].startswith("| resnet18_mod |") and "| resnet18 |" in lines[2]
