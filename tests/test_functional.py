"""The reference MoD ops of ``mod_models.functional`` against the naive loops in ``helpers``."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import assert_close, naive_fuse, naive_gather, naive_router_scores, naive_top_k
from hypothesis import given, settings
from hypothesis import strategies as st

from mod_models import functional as MF

FUSIONS = ("first_k", "last_k", "original")
ACTIVATIONS = ("relu", "none")
MEMORY_FORMATS = (torch.contiguous_format, torch.channels_last)

# Output dtype -> tolerance of one rounding to that dtype (compared with a float64 naive loop).
ROUNDING_TOL = {
    torch.float64: dict(atol=1e-12, rtol=1e-12),
    torch.float32: dict(atol=1e-6, rtol=1e-6),
    torch.float16: dict(atol=1e-3, rtol=1e-3),
    torch.bfloat16: dict(atol=1e-2, rtol=8e-3),
}


def _layout_name(memory_format: torch.memory_format) -> str:
    return "channels_last" if memory_format == torch.channels_last else "nchw"


def _is_layout(t: torch.Tensor, memory_format: torch.memory_format) -> bool:
    return t.is_contiguous(memory_format=memory_format)


def _random_selection(batch: int, channels: int, k: int) -> torch.Tensor:
    """``[B, k]`` distinct random channels per sample, in random slot order."""
    return torch.stack([torch.randperm(channels)[:k] for _ in range(batch)])


# ----------------------------------------------------------------------------------------------
# Sizes
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "channels, hidden", [(1, 1), (8, 1), (16, 1), (31, 1), (32, 2), (40, 2), (64, 4), (256, 16), (2048, 128)]
)
def test_router_hidden_channels(channels, hidden):
    assert MF.router_hidden_channels(channels) == hidden


@pytest.mark.parametrize(
    "channels, capacity, k",
    [(64, 64, 1), (127, 64, 1), (128, 64, 2), (2048, 64, 32), (24, 16, 1), (160, 16, 10), (5, 1, 5)],
)
def test_selected_channels(channels, capacity, k):
    assert MF.selected_channels(channels, capacity) == k


def test_selected_channels_rejects_k_zero():
    with pytest.raises(ValueError, match=r"k = channels // capacity"):
        MF.selected_channels(8, 16)


# ----------------------------------------------------------------------------------------------
# Selection: stable top-k
# ----------------------------------------------------------------------------------------------


def test_select_top_k_tie_rule_and_slot_order_example():
    scores = torch.tensor(
        [
            [0.5, 0.9, 0.5, 0.9, 0.1, 0.7],
            [0.2, 0.2, 0.2, 0.2, 0.2, 0.2],
            [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],
        ]
    )
    idx = MF.select_top_k(scores, 4)
    assert idx.dtype == torch.int64
    assert idx.tolist() == [[1, 3, 5, 0], [0, 1, 2, 3], [5, 4, 3, 2]]


@pytest.mark.parametrize("batch, channels, k", [(1, 1, 1), (3, 7, 3), (2, 33, 33), (4, 96, 6), (2, 250, 17)])
def test_select_top_k_matches_naive_with_many_ties(batch, channels, k):
    # Scores on a coarse grid so most rows have ties (as sigmoid saturation produces).
    scores = torch.randint(0, 5, (batch, channels)).float() / 4
    idx = MF.select_top_k(scores, k)
    assert idx.shape == (batch, k)
    assert torch.equal(idx, naive_top_k(scores, k))
    picked = scores.gather(1, idx)
    assert bool((picked[:, :-1] >= picked[:, 1:]).all()), "slots must be in descending score order"


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 3).flatmap(
        lambda b: st.integers(1, 24).flatmap(
            lambda c: st.lists(
                st.lists(st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0, 0.3333]), min_size=c, max_size=c),
                min_size=b,
                max_size=b,
            )
        )
    ),
    k_fraction=st.floats(0.0, 1.0),
)
def test_select_top_k_property(rows, k_fraction):
    scores = torch.tensor(rows, dtype=torch.float32)
    channels = scores.shape[1]
    k = max(1, math.ceil(k_fraction * channels))
    assert torch.equal(MF.select_top_k(scores, k), naive_top_k(scores, k))


@pytest.mark.parametrize(
    "row",
    [
        [float("nan")] * 6,
        [0.3, float("nan"), 0.9, float("nan"), 0.1, 0.9],
        [float("inf"), 0.5, float("-inf"), float("inf"), 0.5, float("-inf")],
        [float("-inf")] * 6,
        [float("nan"), float("inf"), float("-inf"), 0.0, float("nan"), 1.0],
    ],
)
@pytest.mark.parametrize("k", [1, 4, 6])
def test_select_top_k_nonfinite_scores_give_distinct_in_range_indices(row, k):
    scores = torch.tensor([row, row[::-1]])
    idx = MF.select_top_k(scores, k)
    assert idx.shape == (2, k)
    assert idx.dtype == torch.int64
    for b in range(2):
        picked = idx[b].tolist()
        assert len(set(picked)) == k, f"sample {b}: repeated channels {picked}"
        assert all(0 <= c < 6 for c in picked), f"sample {b}: out-of-range channels {picked}"
    # Documented order: NaN above every number, then descending, ties to the lower index.
    assert torch.equal(idx, naive_top_k(scores, k))


# ----------------------------------------------------------------------------------------------
# Gather
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("memory_format", MEMORY_FORMATS, ids=_layout_name)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape, k", [((2, 10, 3, 5), 4), ((3, 7, 1, 6), 7), ((1, 33, 4, 4), 1)])
def test_gather_channels_matches_naive(shape, k, dtype, memory_format):
    x = torch.randn(shape).to(dtype).contiguous(memory_format=memory_format)
    idx = _random_selection(shape[0], shape[1], k)
    xs = MF.gather_channels(x, idx)
    assert xs.shape == (shape[0], k, shape[2], shape[3])
    assert xs.dtype == dtype
    assert _is_layout(xs, memory_format), f"output strides {xs.stride()} are not {_layout_name(memory_format)}"
    assert torch.equal(xs, naive_gather(x, idx))


@pytest.mark.parametrize("memory_format", MEMORY_FORMATS, ids=_layout_name)
def test_gather_channels_gradient(memory_format):
    x = torch.randn(2, 9, 3, 4).contiguous(memory_format=memory_format).requires_grad_()
    idx = _random_selection(2, 9, 5)
    upstream = torch.randn(2, 5, 3, 4)
    (grad,) = torch.autograd.grad((MF.gather_channels(x, idx) * upstream).sum(), x)
    x_naive = x.detach().clone().requires_grad_()
    (grad_naive,) = torch.autograd.grad((naive_gather(x_naive, idx) * upstream).sum(), x_naive)
    assert_close(grad, grad_naive, atol=0, rtol=0, name="d gather / dx")
    # Unselected channels get exactly zero gradient.
    for b in range(2):
        for c in set(range(9)) - set(idx[b].tolist()):
            assert torch.count_nonzero(grad[b, c]) == 0


# ----------------------------------------------------------------------------------------------
# Fusion
# ----------------------------------------------------------------------------------------------


def test_fusion_targets_literal():
    idx = torch.tensor([[4, 0, 2], [1, 5, 3]])
    assert MF.fusion_targets(idx, 6, "first_k").tolist() == [[0, 1, 2], [0, 1, 2]]
    assert MF.fusion_targets(idx, 6, "last_k").tolist() == [[3, 4, 5], [3, 4, 5]]
    assert MF.fusion_targets(idx, 6, "original").tolist() == [[4, 0, 2], [1, 5, 3]]
    with pytest.raises(ValueError, match="unknown fusion 'middle'"):
        MF.fusion_targets(idx, 6, "middle")


def _fusion_inputs(shape, k, dtype, memory_format, y_dtype=None):
    batch, channels, height, width = shape
    x = torch.randn(shape).to(dtype).contiguous(memory_format=memory_format)
    y = torch.randn(batch, k, height, width).to(y_dtype or dtype).contiguous(memory_format=memory_format)
    w = torch.rand(batch, k, dtype=torch.float32)
    idx = _random_selection(batch, channels, k)
    return x, y, w, idx


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("memory_format", MEMORY_FORMATS, ids=_layout_name)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_scale_and_fuse_matches_naive(dtype, memory_format, fusion, activation):
    shape, k = (3, 10, 3, 5), 4
    x, y, w, idx = _fusion_inputs(shape, k, dtype, memory_format)
    x_before = x.clone()
    out = MF.scale_and_fuse(x, y, w, idx, fusion=fusion, activation=activation)
    assert out.dtype == dtype
    assert out.shape == x.shape
    assert _is_layout(out, memory_format), f"output strides {out.stride()} are not {_layout_name(memory_format)}"
    assert torch.equal(x, x_before), "out-of-place fusion modified its input"
    expected = naive_fuse(x, y, w, idx, fusion=fusion, activation=activation)
    assert_close(out, expected, name=f"scale_and_fuse {fusion}/{activation}/{dtype}", **ROUNDING_TOL[dtype])


@pytest.mark.parametrize("fusion", FUSIONS)
def test_scale_and_fuse_mixed_precision_y(fusion):
    # Under autocast the reduced block returns bf16 while the block input stays fp32.
    x, y, w, idx = _fusion_inputs((2, 12, 4, 3), 3, torch.float32, torch.contiguous_format, y_dtype=torch.bfloat16)
    out = MF.scale_and_fuse(x, y, w, idx, fusion=fusion, activation="relu")
    assert out.dtype == torch.float32
    assert_close(out, naive_fuse(x, y, w, idx, fusion=fusion, activation="relu"), atol=1e-6, rtol=1e-6, name="mixed y")


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("memory_format", MEMORY_FORMATS, ids=_layout_name)
def test_scale_and_fuse_untouched_channels_and_relu_placement(memory_format, fusion, activation):
    batch, channels, k = 4, 11, 3
    x, y, w, idx = _fusion_inputs((batch, channels, 3, 4), k, torch.float32, memory_format)
    x = x - 0.5  # plenty of negative values in every channel
    out = MF.scale_and_fuse(x, y, w, idx, fusion=fusion, activation=activation)
    target_values = []
    for b in range(batch):
        if fusion == "first_k":
            targets = set(range(k))
        elif fusion == "last_k":
            targets = set(range(channels - k, channels))
        else:
            targets = set(idx[b].tolist())
        for c in range(channels):
            if c in targets:
                target_values.append(out[b, c].flatten())
            else:
                assert torch.equal(out[b, c], x[b, c]), f"sample {b}: non-target channel {c} changed"
                assert bool((out[b, c] < 0).any()), f"sample {b}: ReLU leaked onto non-target channel {c}"
    target_values = torch.cat(target_values)
    if activation == "relu":
        assert bool((target_values >= 0).all()), "target channels must be rectified"
    else:
        assert bool((target_values < 0).any()), "activation='none' must not rectify"


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("memory_format", MEMORY_FORMATS, ids=_layout_name)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scale_and_fuse_inplace_equals_out_of_place(dtype, memory_format, fusion, activation):
    x, y, w, idx = _fusion_inputs((2, 9, 5, 3), 4, dtype, memory_format)
    expected = MF.scale_and_fuse(x, y, w, idx, fusion=fusion, activation=activation, inplace=False)
    x_inplace = x.clone(memory_format=torch.preserve_format)
    out = MF.scale_and_fuse(x_inplace, y, w, idx, fusion=fusion, activation=activation, inplace=True)
    assert out is x_inplace
    assert _is_layout(out, memory_format)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("memory_format", MEMORY_FORMATS, ids=_layout_name)
def test_scale_and_fuse_gradients_match_naive(memory_format, fusion, activation):
    x, y, w, idx = _fusion_inputs((3, 8, 4, 3), 3, torch.float32, memory_format)
    upstream = torch.randn(x.shape)
    leaves = [t.clone().requires_grad_() for t in (x, y, w)]
    out = MF.scale_and_fuse(*leaves, idx, fusion=fusion, activation=activation)
    grads = torch.autograd.grad((out * upstream).sum(), leaves)
    naive_leaves = [t.detach().double().requires_grad_() for t in (x, y, w)]
    out_naive = naive_fuse(*naive_leaves, idx, fusion=fusion, activation=activation)
    grads_naive = torch.autograd.grad((out_naive * upstream.double()).sum(), naive_leaves)
    for name, g, g_naive in zip(("x", "y", "w"), grads, grads_naive):
        assert_close(g, g_naive, atol=1e-5, rtol=1e-5, name=f"d out / d {name}")


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("fusion", FUSIONS)
def test_scale_and_fuse_gradcheck_float64(fusion, activation):
    x, y, w, idx = _fusion_inputs((2, 6, 2, 3), 3, torch.float64, torch.contiguous_format)
    w = w.double()

    def fuse(x, y, w):
        return MF.scale_and_fuse(x, y, w, idx, fusion=fusion, activation=activation)

    assert torch.autograd.gradcheck(fuse, [t.requires_grad_() for t in (x, y, w)])


def test_scale_and_fuse_rejects_unknown_names():
    x, y, w, idx = _fusion_inputs((1, 4, 2, 2), 2, torch.float32, torch.contiguous_format)
    with pytest.raises(ValueError, match="unknown fusion 'sideways'"):
        MF.scale_and_fuse(x, y, w, idx, fusion="sideways")
    with pytest.raises(ValueError, match="unknown activation 'gelu'"):
        MF.scale_and_fuse(x, y, w, idx, activation="gelu")


# ----------------------------------------------------------------------------------------------
# Router scores
# ----------------------------------------------------------------------------------------------


def _router_weights(channels, dtype=torch.float32):
    hidden = max(channels // 16, 1)
    return torch.randn(hidden, channels).to(dtype) * 0.5, torch.randn(channels, hidden).to(dtype) * 0.5


@pytest.mark.parametrize("memory_format", MEMORY_FORMATS, ids=_layout_name)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_router_scores_fp32_and_match_naive(dtype, memory_format):
    channels = 40
    x = torch.randn(3, channels, 5, 3).to(dtype).contiguous(memory_format=memory_format)
    fc1, fc2 = _router_weights(channels, dtype)
    scores = MF.router_scores(x, fc1, fc2)
    assert scores.dtype == torch.float32
    assert scores.shape == (3, channels)
    assert bool(((scores >= 0) & (scores <= 1)).all())
    assert_close(scores, naive_router_scores(x, fc1, fc2), atol=2e-6, rtol=2e-6, name=f"router scores {dtype}")


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_router_scores_fp32_under_autocast(x_dtype):
    x = torch.randn(2, 48, 4, 4).to(x_dtype)
    fc1, fc2 = _router_weights(48)
    plain = MF.router_scores(x, fc1, fc2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = MF.router_scores(x, fc1, fc2)
    assert autocast.dtype == torch.float32
    assert torch.equal(autocast, plain), "autocast leaked into the router"


def test_router_scores_gradients_match_naive():
    channels = 36
    x = torch.randn(2, channels, 3, 5, requires_grad=True)
    fc1, fc2 = (t.requires_grad_() for t in _router_weights(channels))
    upstream = torch.randn(2, channels)
    grads = torch.autograd.grad((MF.router_scores(x, fc1, fc2) * upstream).sum(), (x, fc1, fc2))
    leaves = [t.detach().double().requires_grad_() for t in (x, fc1, fc2)]
    grads_naive = torch.autograd.grad((naive_router_scores(*leaves) * upstream.double()).sum(), leaves)
    for name, g, g_naive in zip(("x", "fc1", "fc2"), grads, grads_naive):
        assert g.dtype == torch.float32
        assert torch.count_nonzero(g) > 0, f"router gradient w.r.t. {name} is all zero"
        assert_close(g, g_naive, atol=1e-6, rtol=1e-5, name=f"d scores / d {name}")


def test_random_scores():
    x = torch.randn(3, 20, 2, 2).half()
    keys = MF.random_scores(x)
    assert keys.shape == (3, 20)
    assert keys.dtype == torch.float32
    assert bool(((keys >= 0) & (keys < 1)).all())
    generator = torch.Generator().manual_seed(7)
    again = torch.Generator().manual_seed(7)
    assert torch.equal(MF.random_scores(x, generator), MF.random_scores(x, again))


# ----------------------------------------------------------------------------------------------
# The helper itself must be able to fail
# ----------------------------------------------------------------------------------------------


def test_assert_close_reports_location_and_size():
    expected = torch.zeros(2, 3, 4)
    actual = expected.clone()
    actual[1, 2, 3] = 0.5
    actual[0, 0, 0] = 1e-3
    with pytest.raises(AssertionError) as error:
        assert_close(actual, expected, atol=1e-2, rtol=0, name="probe")
    message = str(error.value)
    assert "probe" in message
    assert "1 / 24" in message
    assert "(1, 2, 3)" in message
    assert "0.5" in message
    assert_close(actual, expected, atol=0.5, rtol=0, name="within tolerance")
    with pytest.raises(AssertionError, match="shape"):
        assert_close(actual, expected[0], atol=1, rtol=1, name="shape")
    nan = torch.tensor([float("nan"), 1.0])
    assert_close(nan, nan.clone(), atol=0, rtol=0, name="nan matches nan")
    with pytest.raises(AssertionError):
        assert_close(nan, torch.tensor([0.0, 1.0]), atol=1, rtol=1, name="nan vs number")
    with pytest.raises(AssertionError):
        assert_close(torch.tensor([float("inf")]), torch.tensor([float("-inf")]), atol=1, rtol=1, name="inf")
    with pytest.raises(AssertionError):
        assert_close(torch.tensor([1e30]), torch.tensor([float("inf")]), atol=1, rtol=1, name="finite vs inf")
    assert_close(torch.tensor([float("-inf"), 2.0]), torch.tensor([float("-inf"), 2.0]), atol=0, rtol=0, name="inf")
