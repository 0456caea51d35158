"""Kernel paths the zoo models take at real sizes, reached at small sizes on the CPU.

Each test below was checked to fail with a deliberate bug put back (``tests/mutations.py`` holds
the bug and the command; ``python tests/mutations.py`` runs them all):

* pooling over more than one chunk of H x W (``pool-drops-last-chunk``,
  ``deploy-pool-drops-last-chunk``): every real stage shape pools in several chunks, tests at
  8 x 8 maps never did;
* feature maps whose H x W is not flat in memory (``spatial-offset-swaps-strides``): a view such
  as ``x[..., :9]`` of a W = 12 tensor through the triton backend;
* in-place fusion in fp16/bf16 equal to the copy path bitwise (``inplace-rounds-product``);
* the reference fusion in fp16/bf16 computed in fp32 and rounded once
  (``reference-fuses-in-low-precision``), checked bitwise on inputs whose exact result fits in fp32.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import assert_close, naive_fuse, randomise_norms

import mod_kernels
import mod_models
from mod_kernels import fused_block, fused_route_pack
from mod_kernels._utils import dense_tiles, next_pow2
from mod_models import functional as MF

# The CPU interpreter suite: its tensors are CPU tensors, which the triton backend takes only under
# Triton's interpreter (tests/conftest.py switches it on where there is no GPU). On a GPU machine
# tests/test_kernels.py runs the kernels compiled, the deployed block included.
pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(), reason="CPU interpreter suite (CUDA machine: see test_kernels.py)"
)

FUSIONS = ("first_k", "last_k", "original")
BLOCKS = {
    "bottleneck": mod_models.MoDBottleneck,
    "basic": mod_models.MoDBasicBlock,
    "inverted": mod_models.MoDInvertedResidual,
}


def randomise(module: torch.nn.Module) -> torch.nn.Module:
    return randomise_norms(module, 2, affine=False)


def _chunks_of_route_pack_pool(x: torch.Tensor) -> int:
    channels, hw = x.shape[1], x.shape[2] * x.shape[3]
    _, block_hw, _ = dense_tiles(channels, hw, MF.is_channels_last(x))
    return -(-hw // (block_hw * fused_route_pack.POOL_STEPS_PER_PROGRAM))


def _chunks_of_deploy_pool(x: torch.Tensor, hidden: int) -> int:
    channels, hw = x.shape[1], x.shape[2] * x.shape[3]
    _, block_hw, _ = fused_block._pool_tiles(channels, hw, max(16, next_pow2(hidden)), MF.is_channels_last(x))
    return -(-hw // (block_hw * fused_block.POOL_STEPS_PER_PROGRAM))


# ----------------------------------------------------------------------------------------------
# Pooling over several chunks
# ----------------------------------------------------------------------------------------------


LOW_PRECISION_ROUTERS = [  # (feature-map dtype, router weight dtype): converted models and autocast
    (torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
    (torch.float16, torch.float16), (torch.float16, torch.float32),
]
ROUTER_IDS = [f"x-{str(a)[6:]}-router-{str(b)[6:]}" for a, b in LOW_PRECISION_ROUTERS]


@pytest.mark.parametrize("dtype, router_dtype", LOW_PRECISION_ROUTERS, ids=ROUTER_IDS)
@pytest.mark.parametrize("shape, channels_last", [
    ((2, 96, 16, 16), True), ((2, 200, 12, 12), True), ((2, 8, 65, 65), False),
], ids=["96ch-16x16-nhwc", "200ch-12x12-nhwc", "8ch-65x65-nchw"])
def test_route_pack_pools_over_several_chunks(shape, channels_last, dtype, router_dtype):
    torch.manual_seed(3)
    x = torch.randn(*shape).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    assert _chunks_of_route_pack_pool(x) > 1, "the shape no longer spans several pooling chunks"
    channels = shape[1]
    hidden = MF.router_hidden_channels(channels)
    fc1 = (torch.randn(hidden, channels) * 0.3).to(router_dtype)
    fc2 = (torch.randn(channels, hidden) * 0.3).to(router_dtype)
    k = max(1, channels // 8)
    routed = mod_kernels.route_pack(x, k, fc1_weight=fc1, fc2_weight=fc2)
    scores = MF.router_scores(x, fc1, fc2)
    idx = MF.select_top_k(scores, k)
    assert torch.equal(routed.idx, idx)
    assert_close(routed.w, scores.gather(1, idx), atol=1e-6, rtol=1e-6, name="selected scores")
    assert torch.equal(routed.xs, MF.gather_channels(x, idx))


@pytest.mark.parametrize("dtype, router_dtype", LOW_PRECISION_ROUTERS, ids=ROUTER_IDS)
@pytest.mark.parametrize("fmt", ["nchw", "channels_last"])
def test_deployed_block_pools_over_several_chunks(fmt, dtype, router_dtype):
    shape = (2, 96, 16, 16) if fmt == "channels_last" else (2, 16, 24, 24)
    channels = shape[1]
    block = randomise(mod_models.MoDBottleneck(channels, capacity=8)).eval().to(dtype)
    block.router.to(router_dtype)
    reference = copy.deepcopy(block)
    mod_models.optimize_for_inference(block)
    mod_models.set_backend(block, "triton")
    x = torch.randn(*shape).to(dtype)
    if fmt == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    assert _chunks_of_deploy_pool(x, reference.router.fc1.out_features) > 1
    block.record_selection = reference.record_selection = True
    with torch.no_grad():
        expected = reference(x.clone())
        got = block(x.clone())
    assert torch.equal(block.last_selection, reference.last_selection)
    if dtype == torch.float32:
        assert_close(got, expected, atol=1e-5, rtol=1e-5, name="multi-chunk deployed block")
    else:  # the reference rounds after every layer of f_k, the fused kernel once at the end
        error = float((got.double() - expected.double()).norm() / expected.double().norm())
        assert error <= (2**-7 if dtype == torch.bfloat16 else 2**-10), f"multi-chunk deployed block: {error:.3g}"


# ----------------------------------------------------------------------------------------------
# H x W not flat in memory
# ----------------------------------------------------------------------------------------------


def _views():
    base = torch.randn(2, 40, 6, 12)
    yield "columns :9 of 12", base[..., :9]
    yield "every second row", torch.randn(2, 40, 10, 5)[:, :, ::2]
    yield "channels_last, columns :9 of 12", base.contiguous(memory_format=torch.channels_last)[..., :9]


@pytest.mark.parametrize("name", list(BLOCKS))
def test_triton_blocks_on_views_whose_spatial_layout_is_not_flat(name):
    for label, view in _views():
        assert view.stride(2) != view.shape[3] * view.stride(3), f"{label} is flat"
        block = randomise(BLOCKS[name](40, capacity=8)).train()
        fused = copy.deepcopy(block)
        fused.backend = "triton"
        results = []
        for model in (block, fused):
            inputs = _same_view(view).requires_grad_()
            out = model(inputs)
            out.backward(torch.ones_like(out))
            results.append((out.detach(), inputs.grad, [p.grad for p in model.parameters()]))
        (ref_out, ref_grad, ref_params), (out, grad, params) = results
        assert_close(out, ref_out, atol=1e-5, rtol=1e-5, name=f"{name} {label} output")
        assert_close(grad, ref_grad, atol=1e-4, rtol=1e-4, name=f"{name} {label} input gradient")
        for g, e in zip(params, ref_params):
            assert_close(g, e, atol=1e-4, rtol=1e-4, name=f"{name} {label} parameter gradient")


def _same_view(view: torch.Tensor) -> torch.Tensor:
    """A fresh leaf with the same values and the same (non-flat) strides as ``view``."""
    storage = torch.empty(view.untyped_storage().size() // view.element_size(), dtype=view.dtype)
    copy_view = storage.as_strided(view.shape, view.stride(), view.storage_offset())
    copy_view.copy_(view)
    return copy_view.detach()


@pytest.mark.parametrize("fusion", FUSIONS)
def test_scale_fuse_on_non_flat_views(fusion):
    torch.manual_seed(4)
    x = torch.randn(2, 8, 5, 12)[..., :7]
    y = torch.randn(2, 3, 5, 9)[..., 1:8]
    w = torch.rand(2, 3)
    idx = torch.tensor([[6, 0, 3], [1, 7, 2]])
    slot = torch.full((2, 8), -1, dtype=torch.int32)
    for b in range(2):
        slot[b, idx[b]] = torch.arange(3, dtype=torch.int32)
    expected = MF.scale_and_fuse(x, y, w, idx, fusion=fusion, activation="relu")
    assert_close(mod_kernels.scale_fuse(x, y, w, idx, slot, fusion=fusion), expected, atol=1e-6, rtol=1e-6,
                 name="non-flat scale_fuse")


# ----------------------------------------------------------------------------------------------
# Low precision: in place equals copy bitwise; the reference rounds once
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("activation", ["relu", "none"])
@pytest.mark.parametrize("fusion", FUSIONS)
def test_low_precision_in_place_fusion_equals_the_copy_bitwise(fusion, activation, dtype):
    torch.manual_seed(5)
    for fmt in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(2, 24, 4, 5).to(dtype).contiguous(memory_format=fmt)
        fc1, fc2 = torch.randn(1, 24), torch.randn(24, 1)
        routed = mod_kernels.route_pack(x, 6, fc1_weight=fc1, fc2_weight=fc2, fusion=fusion)
        y = (torch.randn(2, 6, 4, 5) * 3).to(dtype).contiguous(memory_format=fmt)
        copied = mod_kernels.fuse_routed(routed, y, activation=activation)
        standalone = mod_kernels.scale_fuse(x, y, routed.w, routed.idx, routed.selected_slot, fusion=fusion,
                                            activation=activation)
        in_place = x.clone()
        mod_kernels.scale_fuse(in_place, y, routed.w, routed.idx, routed.selected_slot, fusion=fusion,
                               activation=activation, inplace=True)
        assert torch.equal(copied, standalone)
        assert torch.equal(in_place, copied), f"{dtype} in-place fusion differs from the copy"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", list(BLOCKS))
def test_low_precision_deployed_block_in_place_equals_out_of_place_bitwise(kind, dtype):
    block = randomise(BLOCKS[kind](24, capacity=4)).to(dtype).eval()
    mod_models.optimize_for_inference(block)
    mod_models.set_backend(block, "triton")
    x = torch.randn(2, 24, 5, 4).to(dtype)
    with torch.no_grad():
        written = x.clone()
        in_place = block(written)
        assert in_place.data_ptr() == written.data_ptr()
        block.inplace = False
        out_of_place = block(x.clone())
    assert torch.equal(in_place, out_of_place)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("activation", ["relu", "none"])
@pytest.mark.parametrize("fusion", FUSIONS)
def test_low_precision_reference_fusion_rounds_once(fusion, activation, dtype):
    """Inputs whose exact ``x + w * y`` fits in fp32: the reference (fp32 arithmetic, one rounding
    to ``dtype``) must equal the float64 result rounded once, bit for bit. ``x`` and ``y`` hold
    ``dtype`` values of magnitude [1, 2), the scores 12 significant bits in [0.5, 1): the product
    has at most 23 bits and the sum at most 24, so fp32 holds it exactly, while a fusion computed
    in ``dtype`` rounds the scores (and products) first and differs."""
    generator = torch.Generator().manual_seed(6)

    def unit_magnitude(*shape):
        magnitude = torch.rand(*shape, generator=generator) + 1.0
        sign = torch.where(torch.rand(*shape, generator=generator) < 0.5, -1.0, 1.0)
        return (magnitude * sign).to(dtype)

    x, y = unit_magnitude(2, 12, 4, 4), unit_magnitude(2, 4, 4, 4)
    w = (2048 + torch.randint(0, 2048, (2, 4), generator=generator)).float() / 4096
    idx = torch.stack([torch.randperm(12, generator=generator)[:4] for _ in range(2)])
    expected = naive_fuse(x, y, w, idx, fusion=fusion, activation=activation)
    got = MF.scale_and_fuse(x, y, w, idx, fusion=fusion, activation=activation)
    assert torch.equal(got, expected), f"{dtype} reference fusion is not the exact result rounded once"
    assert not torch.equal(
        naive_fuse(x, y, w, idx, fusion=fusion, activation=activation, compute_dtype=dtype), expected
    ), (
        "these inputs must tell rounding once from rounding in the low-precision format"
    )
