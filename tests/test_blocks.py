"""MoD blocks: sizes, the whole forward against the naive loop, gradients, errors, backend switch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import assert_close, naive_mod_forward, naive_router_scores, naive_top_k
from torch import nn

import mod_models
from mod_models import MoDBasicBlock, MoDBottleneck, MoDInvertedResidual, set_backend

FUSIONS = ("first_k", "last_k", "original")
MEMORY_FORMATS = (torch.contiguous_format, torch.channels_last)

# (block class, channels, capacity, k, activation after fusion): small, not powers of two.
SMALL_BLOCKS = [
    pytest.param(MoDBottleneck, 48, 4, 12, "relu", id="bottleneck"),
    pytest.param(MoDBasicBlock, 40, 8, 5, "relu", id="basic"),
    pytest.param(MoDInvertedResidual, 36, 6, 6, "none", id="inverted_residual"),
]
BLOCK_CLASSES = [
    pytest.param(MoDBottleneck, id="bottleneck"),
    pytest.param(MoDBasicBlock, id="basic"),
    pytest.param(MoDInvertedResidual, id="inverted_residual"),
]


def _layout_name(memory_format: torch.memory_format) -> str:
    return "channels_last" if memory_format == torch.channels_last else "nchw"


def _randomise_norms(block: nn.Module) -> nn.Module:
    """Non-trivial BN affine parameters and running statistics, so eval mode is not an identity."""
    with torch.no_grad():
        for m in block.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    return block


def _live_router(block: nn.Module) -> nn.Module:
    """Positive first router layer: with non-negative inputs no hidden unit is dead, so router grads flow."""
    with torch.no_grad():
        block.router.fc1.weight.abs_()
    return block


def _conv_signature(block: nn.Module) -> list[tuple]:
    """``(in, out, kernel, groups, has_bias)`` of every conv of the block, in definition order."""
    return [
        (m.in_channels, m.out_channels, m.kernel_size[0], m.groups, m.bias is not None)
        for m in block.modules()
        if isinstance(m, nn.Conv2d)
    ]


# ----------------------------------------------------------------------------------------------
# Sizes (hand-derived from the method, mod_models/functional.py's docstring)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "block, k, convs",
    [
        # Bottleneck: 1x1 k -> max(k // 4, 1), 3x3 same, 1x1 -> k.
        (lambda: MoDBottleneck(256), 4, [(4, 1, 1, 1, False), (1, 1, 3, 1, False), (1, 4, 1, 1, False)]),
        (lambda: MoDBottleneck(512), 8, [(8, 2, 1, 1, False), (2, 2, 3, 1, False), (2, 8, 1, 1, False)]),
        (lambda: MoDBottleneck(2048), 32, [(32, 8, 1, 1, False), (8, 8, 3, 1, False), (8, 32, 1, 1, False)]),
        (lambda: MoDBottleneck(64), 1, [(1, 1, 1, 1, False), (1, 1, 3, 1, False), (1, 1, 1, 1, False)]),
        (lambda: MoDBottleneck(48, capacity=4), 12, [(12, 3, 1, 1, False), (3, 3, 3, 1, False), (3, 12, 1, 1, False)]),
        # BasicBlock: 3x3 k -> k, 3x3 k -> k.
        (lambda: MoDBasicBlock(64), 1, [(1, 1, 3, 1, False), (1, 1, 3, 1, False)]),
        (lambda: MoDBasicBlock(512), 8, [(8, 8, 3, 1, False), (8, 8, 3, 1, False)]),
        (lambda: MoDBasicBlock(40, capacity=8), 5, [(5, 5, 3, 1, False), (5, 5, 3, 1, False)]),
        # Inverted residual: 1x1 k -> t*k, 3x3 depthwise, 1x1 t*k -> k.
        (lambda: MoDInvertedResidual(96), 6, [(6, 36, 1, 1, False), (36, 36, 3, 36, False), (36, 6, 1, 1, False)]),
        (lambda: MoDInvertedResidual(24), 1, [(1, 6, 1, 1, False), (6, 6, 3, 6, False), (6, 1, 1, 1, False)]),
        (lambda: MoDInvertedResidual(64, expand_ratio=4), 4,
         [(4, 16, 1, 1, False), (16, 16, 3, 16, False), (16, 4, 1, 1, False)]),
        (lambda: MoDInvertedResidual(64, expand_ratio=1), 4, [(4, 4, 3, 4, False), (4, 4, 1, 1, False)]),
    ],
)
def test_k_and_reduced_block_widths(block, k, convs):
    block = block()
    assert block.k == k
    assert _conv_signature(block) == convs


@pytest.mark.parametrize(
    "block, hidden",
    [
        (lambda: MoDBottleneck(256), 16),
        (lambda: MoDBottleneck(2048), 128),
        (lambda: MoDBasicBlock(64), 4),
        (lambda: MoDBasicBlock(40, capacity=8), 2),
        (lambda: MoDInvertedResidual(24), 1),
        (lambda: MoDInvertedResidual(160), 10),
        (lambda: MoDInvertedResidual(8, capacity=8), 1),
    ],
)
def test_router_hidden_size_and_no_bias(block, hidden):
    block = block()
    channels = block.channels
    assert tuple(block.router.fc1.weight.shape) == (hidden, channels)
    assert tuple(block.router.fc2.weight.shape) == (channels, hidden)
    assert block.router.fc1.bias is None
    assert block.router.fc2.bias is None
    router_params = {name for name, _ in block.named_parameters() if name.startswith("router.")}
    assert router_params == {"router.fc1.weight", "router.fc2.weight"}


def test_norm_layer_and_dilation_are_used():
    block = MoDBottleneck(64, capacity=4, dilation=2, norm_layer=lambda c: nn.GroupNorm(1, c))
    assert block.conv2.dilation == (2, 2) and block.conv2.padding == (2, 2)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in block.modules())
    assert sum(isinstance(m, nn.GroupNorm) for m in block.modules()) == 3
    x = torch.randn(2, 64, 5, 7)
    assert block(x).shape == x.shape


# ----------------------------------------------------------------------------------------------
# Forward against the naive loop
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("memory_format", MEMORY_FORMATS, ids=_layout_name)
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("cls, channels, capacity, k, activation", SMALL_BLOCKS)
def test_shape_dtype_and_layout_preserved(cls, channels, capacity, k, activation, training, memory_format):
    block = cls(channels, capacity=capacity).train(training)
    x = torch.randn(3, channels, 5, 7).contiguous(memory_format=memory_format)
    out = block(x)
    assert out.shape == x.shape
    assert out.dtype == x.dtype
    assert out.is_contiguous(memory_format=memory_format)


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("memory_format", MEMORY_FORMATS, ids=_layout_name)
@pytest.mark.parametrize("cls, channels, capacity, k, activation", SMALL_BLOCKS)
def test_block_matches_naive(cls, channels, capacity, k, activation, memory_format, fusion):
    block = _randomise_norms(cls(channels, capacity=capacity, fusion=fusion)).eval()
    block.record_selection = True
    x = torch.randn(3, channels, 5, 7).contiguous(memory_format=memory_format)
    with torch.no_grad():
        out = block(x.clone(memory_format=torch.preserve_format))
        scores = naive_router_scores(x, block.router.fc1.weight, block.router.fc2.weight)
        expected, idx, _ = naive_mod_forward(
            x, scores, k, lambda xs: block.process(xs.float()), fusion=fusion, activation=activation
        )
    assert torch.equal(block.last_selection, idx), "selection differs from the naive stable top-k"
    assert_close(out, expected, atol=1e-5, rtol=1e-5, name=f"{cls.__name__} {fusion}")


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("cls, channels, capacity, k, activation", SMALL_BLOCKS)
def test_block_gradients_match_hand_written_path(cls, channels, capacity, k, activation, fusion):
    """Every gradient of the block equals the one through ``w = s.gather(idx)`` with ``idx`` detached."""
    torch.manual_seed(1)
    block = _randomise_norms(cls(channels, capacity=capacity, fusion=fusion)).train()
    block.record_selection = True
    x = torch.randn(3, channels, 5, 7, requires_grad=True)
    upstream = torch.randn(3, channels, 5, 7)
    params = dict(block.named_parameters())
    leaves = [x, *params.values()]

    grads = torch.autograd.grad((block(x) * upstream).sum(), leaves)

    scores = naive_router_scores(x, block.router.fc1.weight, block.router.fc2.weight)
    idx = naive_top_k(scores, k)  # a constant: the selection is not differentiated
    assert torch.equal(block.last_selection, idx)
    expected, _, _ = naive_mod_forward(
        x, scores, k, lambda xs: block.process(xs.float()), fusion=fusion, activation=activation, idx=idx
    )
    grads_expected = torch.autograd.grad((expected * upstream.double()).sum(), leaves)

    for name, g, g_expected in zip(["x", *params], grads, grads_expected):
        assert_close(g, g_expected, atol=2e-5, rtol=1e-4, name=f"d loss / d {name}")
    router_grads = [g for name, g in zip(["x", *params], grads) if name.startswith("router.")]
    assert len(router_grads) == 2 and all(torch.count_nonzero(g) > 0 for g in router_grads)


@pytest.mark.parametrize("cls, channels, capacity, k, activation", SMALL_BLOCKS)
def test_router_gets_gradient_only_through_scores(cls, channels, capacity, k, activation):
    """With ``f_k`` forced to 0, ``dL/dw = 0``: the router must then get exactly zero gradient."""
    torch.manual_seed(2)
    block = _live_router(cls(channels, capacity=capacity)).train()
    block.record_selection = True
    x = torch.rand(2, channels, 4, 5)  # non-negative, like a post-ReLU feature map
    upstream = torch.randn(2, channels, 4, 5)

    (block(x) * upstream).sum().backward()
    selection = block.last_selection.clone()
    assert all(torch.count_nonzero(p.grad) > 0 for p in block.router.parameters()), "control: router grads must flow"

    block.zero_grad(set_to_none=True)
    last_bn = mod_models.blocks.last_norm(block)
    with torch.no_grad():
        last_bn.weight.zero_()
        last_bn.bias.zero_()
    (block(x) * upstream).sum().backward()
    assert torch.equal(block.last_selection, selection), "zeroing f_k must not change the selection"
    for name, p in block.router.named_parameters():
        assert p.grad is not None, f"router.{name} lost its gradient path"
        assert torch.count_nonzero(p.grad) == 0, f"router.{name} got gradient not through the scores"


# ----------------------------------------------------------------------------------------------
# Random routing
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("cls, channels, capacity, k, activation", SMALL_BLOCKS)
def test_random_router(cls, channels, capacity, k, activation, fusion):
    block = _randomise_norms(cls(channels, capacity=capacity, fusion=fusion, router="random")).eval()
    block.record_selection = True
    assert block.router is None
    assert not [name for name, _ in block.named_parameters() if "router" in name]
    assert not [key for key in block.state_dict() if "router" in key]

    x = torch.randn(4, channels, 3, 5)
    with torch.no_grad():
        torch.manual_seed(5)
        out = block(x.clone())
        idx = block.last_selection
        torch.manual_seed(5)
        again = block(x.clone())
        expected, _, _ = naive_mod_forward(
            x, None, k, lambda xs: block.process(xs.float()), fusion=fusion, activation=activation,
            idx=idx, unit_scores=True,
        )
    assert torch.equal(out, again), "same seed must give the same random routing"
    for b in range(4):
        assert len(set(idx[b].tolist())) == k and all(0 <= c < channels for c in idx[b].tolist())
    assert_close(out, expected, atol=1e-5, rtol=1e-5, name="random router with scores of 1")


def test_random_router_is_random():
    block = MoDBasicBlock(64, capacity=4, router="random").eval()
    block.record_selection = True
    x = torch.randn(3, 64, 2, 2)
    with torch.no_grad():
        block(x.clone())
        first = block.last_selection.clone()
        block(x.clone())
    assert not torch.equal(first, block.last_selection)
    assert not all(torch.equal(first[0], first[b]) for b in range(1, 3)), "samples should not share a selection"


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", BLOCK_CLASSES)
@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(channels=64, capacity=0), ValueError, r"capacity must be >= 1, got 0"),
        (dict(channels=64, capacity=-4), ValueError, r"capacity must be >= 1, got -4"),
        (dict(channels=8, capacity=16), ValueError, r"k = channels // capacity = 8 // 16 = 0"),
        (dict(channels=64, capacity=4.0), TypeError, r"capacity must be an int, got float"),
        (dict(channels=64, capacity="4"), TypeError, r"capacity must be an int, got str"),
        (dict(channels=64, capacity=True), TypeError, r"capacity must be an int, got bool"),
        (dict(channels=0, capacity=1), ValueError, r"channels must be >= 1"),
        (dict(channels=64.0, capacity=4), TypeError, r"channels must be an int"),
        (dict(channels=64, capacity=4, fusion="middle"), ValueError, r"unknown fusion 'middle'"),
        (dict(channels=64, capacity=4, router="topk"), ValueError, r"unknown router 'topk'"),
        (dict(channels=64, capacity=4, backend="cuda"), ValueError, r"unknown backend 'cuda'"),
    ],
)
def test_bad_construction_raises_clear_error(cls, kwargs, error, message):
    kwargs = dict(kwargs)
    channels = kwargs.pop("channels")
    with pytest.raises(error, match=message):
        cls(channels, **kwargs)


def test_bad_expand_ratio():
    for ratio in (0, 2.5, True):
        with pytest.raises(ValueError, match="expand_ratio must be an int >= 1"):
            MoDInvertedResidual(64, expand_ratio=ratio)


@pytest.mark.parametrize("cls", BLOCK_CLASSES)
@pytest.mark.parametrize(
    "make_input, error, message",
    [
        (lambda: torch.randn(16, 4, 4), ValueError, r"rank 4.*\(16, 4, 4\)"),
        (lambda: torch.randn(2, 16), ValueError, r"rank 4"),
        (lambda: torch.randn(1, 2, 16, 4, 4), ValueError, r"rank 4"),
        (lambda: torch.randn(2, 12, 4, 4), ValueError, r"12 channels but the block was built for 16"),
        (lambda: torch.randint(0, 5, (2, 16, 4, 4)), TypeError, r"floating-point.*torch.int64"),
        (lambda: torch.zeros(2, 16, 4, 4, dtype=torch.uint8), TypeError, r"floating-point.*torch.uint8"),
        (lambda: torch.zeros(2, 16, 4, 4, dtype=torch.bool), TypeError, r"floating-point.*torch.bool"),
        (lambda: torch.randn(0, 16, 4, 4), ValueError, r"must not be empty"),
        (lambda: torch.randn(2, 16, 0, 4), ValueError, r"must not be empty"),
        (lambda: np.zeros((2, 16, 4, 4), dtype=np.float32), TypeError, r"must be a torch.Tensor, got ndarray"),
    ],
)
def test_bad_input_raises_clear_error(cls, make_input, error, message):
    block = cls(16, capacity=4)
    with pytest.raises(error, match=message):
        block(make_input())


# ----------------------------------------------------------------------------------------------
# In-place behaviour
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("memory_format", MEMORY_FORMATS, ids=_layout_name)
@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("cls, channels, capacity, k, activation", SMALL_BLOCKS)
def test_inplace_only_without_autograd(cls, channels, capacity, k, activation, fusion, memory_format):
    block = _randomise_norms(cls(channels, capacity=capacity, fusion=fusion)).eval()
    x = torch.randn(2, channels, 4, 3).contiguous(memory_format=memory_format)

    expected = block(x)  # grad enabled (parameters require grad): never in place
    assert expected.requires_grad
    assert expected.data_ptr() != x.data_ptr()

    x_leaf = x.clone(memory_format=torch.preserve_format).requires_grad_()
    out_leaf = block(x_leaf)
    assert torch.equal(x_leaf.detach(), x), "grad mode with an input that requires grad mutated the input"
    assert torch.equal(out_leaf, expected)

    block.inplace = False
    x_kept = x.clone(memory_format=torch.preserve_format)
    with torch.no_grad():
        out_kept = block(x_kept)
    assert torch.equal(x_kept, x), "inplace=False mutated the input under no_grad"
    assert out_kept.data_ptr() != x_kept.data_ptr()
    assert torch.equal(out_kept, expected.detach())

    block.inplace = True
    x_written = x.clone(memory_format=torch.preserve_format)
    with torch.no_grad():
        out_written = block(x_written)
    assert out_written.data_ptr() == x_written.data_ptr(), "inplace=True under no_grad must reuse the input"
    assert torch.equal(out_written, expected.detach())
    assert not torch.equal(x_written, x), "the input should now hold the result"

    with torch.inference_mode():
        x_inference = x.clone(memory_format=torch.preserve_format)
        assert torch.equal(block(x_inference), expected.detach())


@pytest.mark.parametrize("cls, channels, capacity, k, activation", SMALL_BLOCKS)
def test_strided_view_input(cls, channels, capacity, k, activation):
    """A non-dense view (every second column) works in both the grad and the in-place path."""
    block = _randomise_norms(cls(channels, capacity=capacity)).eval()
    x = torch.randn(2, channels, 4, 10)[..., ::2]
    expected = block(x.contiguous())
    with torch.no_grad():
        out = block(x)
    assert_close(out, expected, atol=1e-6, rtol=1e-6, name="strided view input")


@pytest.mark.parametrize("cls, channels, capacity, k, activation", SMALL_BLOCKS)
def test_no_grad_accepts_expanded_input(cls, channels, capacity, k, activation):
    block = _randomise_norms(cls(channels, capacity=capacity)).eval()
    x = torch.randn(1, channels, 1, 1).expand(2, channels, 4, 5)
    expected = block(x)  # grad enabled: out of place, works
    with torch.no_grad():
        out = block(x)
    assert torch.equal(out, expected.detach())


@pytest.mark.parametrize("cls, channels, capacity, k, activation", SMALL_BLOCKS)
def test_train_mode_with_grad_never_mutates_input(cls, channels, capacity, k, activation):
    block = cls(channels, capacity=capacity, inplace=True).train()
    x = torch.randn(2, channels, 4, 3)
    x_before = x.clone()
    block(x).sum().backward()
    assert torch.equal(x, x_before)


# ----------------------------------------------------------------------------------------------
# Dtypes
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls, channels, capacity, k, activation", SMALL_BLOCKS)
def test_autocast_leaves_router_and_output_dtype(cls, channels, capacity, k, activation):
    block = _randomise_norms(cls(channels, capacity=capacity)).eval()
    block.record_selection = True
    x = torch.randn(2, channels, 4, 5)
    with torch.no_grad():
        plain = block(x.clone())
        selection = block.last_selection
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = block(x.clone())
    assert torch.equal(block.last_selection, selection), "autocast changed the (fp32) routing"
    assert mixed.dtype == torch.float32
    assert_close(mixed, plain, atol=5e-2, rtol=5e-2, name="autocast bf16 vs fp32")


@pytest.mark.parametrize("cls, channels, capacity, k, activation", SMALL_BLOCKS)
def test_bfloat16_block(cls, channels, capacity, k, activation):
    block = cls(channels, capacity=capacity).eval()
    x = torch.randn(2, channels, 4, 5)
    with torch.no_grad():
        reference = block(x.clone())
        block_bf16 = block.to(torch.bfloat16)
        out = block_bf16(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    assert_close(out, reference, atol=0.1, rtol=0.05, name="bf16 block vs fp32")


# ----------------------------------------------------------------------------------------------
# Backend switch and state_dict
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("cls, channels, capacity, k, activation", SMALL_BLOCKS)
def test_auto_on_cpu_equals_reference(cls, channels, capacity, k, activation, fusion):
    block = cls(channels, capacity=capacity, fusion=fusion, backend="reference").train()
    x = torch.randn(3, channels, 4, 5, requires_grad=True)
    upstream = torch.randn(3, channels, 4, 5)
    leaves = [x, *block.parameters()]
    reference = block(x)
    reference_grads = torch.autograd.grad((reference * upstream).sum(), leaves)
    block.backend = "auto"
    auto = block(x)
    auto_grads = torch.autograd.grad((auto * upstream).sum(), leaves)
    assert torch.equal(auto, reference)
    for g_auto, g_reference in zip(auto_grads, reference_grads):
        assert torch.equal(g_auto, g_reference)


def test_set_backend_sets_every_mod_block():
    model = mod_models.resnet18_mod(num_classes=10, backend="reference")
    mod_blocks = [m for m in model.modules() if isinstance(m, mod_models.MoDBlock)]
    assert len(mod_blocks) == 4
    assert set_backend(model, "triton") is model
    assert [m.backend for m in mod_blocks] == ["triton"] * 4
    set_backend(model, "auto")
    assert [m.backend for m in mod_blocks] == ["auto"] * 4
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        set_backend(model, "cuda")
    assert [m.backend for m in mod_blocks] == ["auto"] * 4
    with pytest.raises(ValueError, match="no MoD blocks"):
        set_backend(nn.Sequential(nn.Conv2d(3, 3, 1)), "reference")
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        mod_blocks[0].backend = "fast"


def test_model_auto_on_cpu_equals_reference():
    model = mod_models.mobilenet_v2_mod(num_classes=10, backend="reference").eval()
    x = torch.randn(2, 3, 32, 32)
    reference = model(x)
    set_backend(model, "auto")
    assert torch.equal(model(x), reference)


def test_mod_backend_environment_variable(monkeypatch):
    monkeypatch.delenv("MOD_BACKEND", raising=False)
    assert MoDBasicBlock(64).backend == "auto"
    assert mod_models.default_backend() == "auto"

    monkeypatch.setenv("MOD_BACKEND", "reference")
    assert MoDBasicBlock(64).backend == "reference"
    assert MoDBottleneck(256, backend=None).backend == "reference"
    assert MoDInvertedResidual(32, backend="auto").backend == "auto", "an explicit backend wins over the variable"
    model = mod_models.resnet18_mod(num_classes=10)
    assert {m.backend for m in model.modules() if isinstance(m, mod_models.MoDBlock)} == {"reference"}

    monkeypatch.setenv("MOD_BACKEND", "triton")
    assert MoDInvertedResidual(32).backend == "triton"

    monkeypatch.setenv("MOD_BACKEND", "cuda")
    with pytest.raises(ValueError, match=r"MOD_BACKEND='cuda'"):
        MoDBasicBlock(64)
    with pytest.raises(ValueError, match=r"MOD_BACKEND"):
        mod_models.resnet18_mod(num_classes=10)
    assert MoDBasicBlock(64, backend="reference").backend == "reference"


@pytest.mark.parametrize("router", ["learned", "random"])
@pytest.mark.parametrize("cls, channels, capacity, k, activation", SMALL_BLOCKS)
def test_state_dict_round_trip(cls, channels, capacity, k, activation, router):
    torch.manual_seed(10)
    source = cls(channels, capacity=capacity, router=router).train()
    with torch.no_grad():
        for _ in range(3):  # move the BN running statistics away from their defaults
            source(torch.randn(4, channels, 3, 5) * 2 + 1)
    torch.manual_seed(11)
    target = cls(channels, capacity=capacity, router=router)
    x = torch.randn(2, channels, 3, 5)
    source.eval()
    target.eval()
    with torch.no_grad():
        torch.manual_seed(12)
        expected = source(x.clone())
        torch.manual_seed(12)
        before = target(x.clone())
        assert not torch.equal(before, expected), "control: differently initialised blocks must differ"
        target.load_state_dict(source.state_dict())
        torch.manual_seed(12)
        after = target(x.clone())
    assert torch.equal(after, expected)


@pytest.mark.parametrize("cls, channels, capacity, k, activation", SMALL_BLOCKS)
def test_state_dict_same_for_every_backend(cls, channels, capacity, k, activation):
    torch.manual_seed(3)
    blocks = {name: cls(channels, capacity=capacity, backend=name) for name in ("reference", "auto", "triton")}
    keys = {name: list(block.state_dict()) for name, block in blocks.items()}
    assert keys["reference"] == keys["auto"] == keys["triton"]

    block = blocks["reference"]
    before = {key: value.clone() for key, value in block.state_dict().items()}
    for name in ("triton", "auto", "reference"):
        block.backend = name
        after = block.state_dict()
        assert list(after) == list(before)
        assert all(torch.equal(after[key], before[key]) for key in before)

    model = mod_models.resnet18_mod(num_classes=10, backend="reference")
    model_keys = {key: tuple(v.shape) for key, v in model.state_dict().items()}
    set_backend(model, "triton")
    assert {key: tuple(v.shape) for key, v in model.state_dict().items()} == model_keys


# ----------------------------------------------------------------------------------------------
# Forced selection (teacher forcing)
# ----------------------------------------------------------------------------------------------


def _other_selection(batch: int, channels: int, k: int, seed: int = 7) -> torch.Tensor:
    """Per sample, ``k`` distinct channels in a random order (almost surely not the router's top-k)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(channels, generator=generator)[:k] for _ in range(batch)])


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("cls, channels, capacity, k, activation", SMALL_BLOCKS)
def test_forced_selection_is_used_and_gradients_flow_through_w(cls, channels, capacity, k, activation, fusion):
    """The forced selection replaces the top-k; ``w = s.gather(forced)``; gradients as the hand-written path."""
    torch.manual_seed(4)
    block = _randomise_norms(cls(channels, capacity=capacity, fusion=fusion)).train()
    block.record_selection = True
    x = torch.randn(3, channels, 4, 5, requires_grad=True)
    upstream = torch.randn(3, channels, 4, 5)
    forced = _other_selection(3, channels, k)
    params = dict(block.named_parameters())
    leaves = [x, *params.values()]

    block.forced_selection = forced
    grads = torch.autograd.grad((block(x) * upstream).sum(), leaves)
    assert torch.equal(block.last_selection, forced)

    scores = naive_router_scores(x, block.router.fc1.weight, block.router.fc2.weight)
    assert not torch.equal(naive_top_k(scores, k), forced), "control: the router's own choice differs"
    assert_close(block.last_scores, scores, atol=1e-6, rtol=1e-6, name="last_scores")
    assert block.last_scores.dtype == torch.float32 and not block.last_scores.requires_grad
    expected, _, _ = naive_mod_forward(
        x, scores, k, lambda xs: block.process(xs.float()), fusion=fusion, activation=activation, idx=forced
    )
    grads_expected = torch.autograd.grad((expected * upstream.double()).sum(), leaves)
    for name, g, g_expected in zip(["x", *params], grads, grads_expected):
        assert_close(g, g_expected, atol=2e-5, rtol=1e-4, name=f"forced: d loss / d {name}")
    assert all(torch.count_nonzero(g) > 0 for name, g in zip(["x", *params], grads) if name.startswith("router."))


@pytest.mark.parametrize("cls, channels, capacity, k, activation", SMALL_BLOCKS)
def test_forcing_the_own_selection_changes_nothing(cls, channels, capacity, k, activation):
    torch.manual_seed(5)
    block = _randomise_norms(cls(channels, capacity=capacity)).train()
    block.record_selection = True
    x = torch.randn(2, channels, 3, 4, requires_grad=True)
    out = block(x)
    grads = torch.autograd.grad(out.square().sum(), [x, *block.parameters()])
    block.forced_selection = block.last_selection.clone()
    forced_out = block(x)
    forced_grads = torch.autograd.grad(forced_out.square().sum(), [x, *block.parameters()])
    assert torch.equal(out, forced_out)
    assert all(torch.equal(a, b) for a, b in zip(grads, forced_grads))
    block.forced_selection = None
    assert block.forced_selection is None and torch.equal(block(x), out)


def test_forced_selection_with_random_router():
    block = MoDBasicBlock(16, capacity=4, router="random").eval()
    block.record_selection = True
    forced = _other_selection(2, 16, 4)
    x = torch.randn(2, 16, 3, 3)
    block.forced_selection = forced
    with torch.no_grad():
        torch.manual_seed(9)
        out = block(x.clone())
        expected, _, _ = naive_mod_forward(x, None, 4, lambda xs: block.process(xs.float()), fusion="first_k",
                                           activation="relu", idx=forced, unit_scores=True)
    assert torch.equal(block.last_selection, forced) and block.last_scores.shape == (2, 16)
    assert_close(out, expected, atol=1e-5, rtol=1e-5, name="random router, forced selection")


@pytest.mark.parametrize(
    "make, error, message",
    [
        (lambda: [[0, 1, 2, 3]], TypeError, r"torch.Tensor or None, got list"),
        (lambda: torch.tensor([[0, 1, 2, 3]], dtype=torch.int32), TypeError, r"int64 tensor, got dtype torch.int32"),
        (lambda: torch.tensor([[0.0, 1, 2, 3]]), TypeError, r"int64"),
        (lambda: torch.tensor([0, 1, 2, 3]), ValueError, r"shape \[B, k\] with k=4, got shape \(4,\)"),
        (lambda: torch.tensor([[0, 1, 2]]), ValueError, r"k=4, got shape \(1, 3\)"),
        (lambda: torch.tensor([[0, 1, 2, 16]]), ValueError, r"outside \[0, 16\)"),
        (lambda: torch.tensor([[0, -1, 2, 3]]), ValueError, r"outside \[0, 16\)"),
        (lambda: torch.tensor([[0, 1, 2, 3], [5, 6, 5, 7]]), ValueError, r"row 1 selects a channel twice"),
    ],
)
def test_bad_forced_selection_raises_clear_error(make, error, message):
    block = MoDBasicBlock(16, capacity=4)
    with pytest.raises(error, match=message):
        block.forced_selection = make()
    assert block.forced_selection is None


def test_forced_selection_must_match_the_batch():
    block = MoDBasicBlock(16, capacity=4).eval()
    block.forced_selection = torch.tensor([[0, 1, 2, 3]])
    with pytest.raises(ValueError, match=r"forced_selection has 1 rows but the input batch is 2"):
        block(torch.randn(2, 16, 3, 3))


def test_forced_selection_on_the_fused_path_raises():
    device = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: Triton's interpreter (tests/conftest.py)
    block = MoDBasicBlock(16, capacity=4, backend="triton").eval().to(device)
    block.forced_selection = torch.tensor([[0, 1, 2, 3]], device=device)
    with pytest.raises(ValueError, match=r"forced_selection is set, but the backend 'triton'.*backend='reference'"):
        block(torch.randn(1, 16, 3, 3, device=device))
    block.record_selection = True
    x = torch.randn(1, 16, 3, 3, device=device)
    with torch.no_grad():
        block.backend = "reference"
        block(x.clone())
        assert block.last_selection.tolist() == [[0, 1, 2, 3]] and block.last_scores.shape == (1, 16)
        block.forced_selection = None
        block.backend = "triton"
        block(x.clone())
    assert block.last_selection.shape == (1, 4) and block.last_scores is None  # the kernels keep their scores
