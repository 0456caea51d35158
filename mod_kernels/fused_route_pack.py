"""Fused route + pack: pool, router MLP, stable top-k and channel gather, with its backward.

Forward (learned router): two Triton kernels around the router's two small GEMMs.

1. ``_pool_kernel``: partial means of ``x`` over chunks of H x W (fp32), grid
   ``(B, C / BLOCK_C, chunks)``, so that even batch 1 fills the GPU; their sum (one small
   reduction, skipped when H x W is one chunk) is ``pooled [B, C]``. Chunking depends on the
   shape only, never on the batch size, and uses no atomics: deterministic.
2. The router MLP ``logits = W2 relu(W1 pooled)`` as two fp32 GEMMs (cuBLAS on the GPU), as the
   reference computes it: one program per sample could not spread the ``C x C_h`` weights over
   the GPU (at C = 2048 that serialised ~1 MB of weight reads per sample).
3. ``_select_kernel``, one program per sample: ``scores = sigmoid(logits)`` (or given random
   keys), a stable descending sort of ``(score, -channel)`` keys, the ``k`` winners' indices and
   scores, and the inverse map ``selected_slot[b, c]``.
4. ``_pack_kernel``: ``xs[b, j] = x[b, idx[b, j]]``, grid ``(B, k / BLOCK_K, HW / BLOCK_HW)``.

Backward (:class:`RoutePackFunction`):

1. ``_router_grad_logits_kernel``, one program per sample: ``grad_w`` through the selection
   and the sigmoid to ``grad_logits [B, C]``; then the router's backward as four small fp32
   GEMMs (``grad_hidden``, ``grad_pool = W1^T grad_hidden / (H * W)``, and the two weight
   gradients over the batch).
2. ``_input_backward_kernel``: the one pass over the block's output gradient that writes
   ``grad_x = (grad_out off the fusion targets | the targets' own gradient on them)
   + grad_pool + scatter(grad_xs)``.

In eager mode the launchers are called directly (no ``torch.library`` dispatch); while a
compiler traces (``torch.compile``, ``torch.export``) the same work goes through the custom ops
below, which tracing sees as opaque.

Selection keys: a score's fp32 bits mapped to a signed int that orders like the float (NaN
canonicalised above +inf, -0.0 folded into +0.0), shifted up 32 bits, with ``C - 1 - c`` in the
low bits. Keys are distinct, so a descending sort is the stable descending sort of the
reference: ties go to the lower channel index, NaN ranks first, and every sample gets ``k``
distinct in-range indices whatever the input holds.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from mod_models.functional import fp32_region

from ._utils import (
    cdiv,
    check_backward_once,
    check_dtype,
    check_feature_map,
    check_same_device,
    check_shape,
    dense_tiles,
    empty_like_format,
    hw_is_flat,
    is_channels_last,
    next_pow2,
    runs_eagerly,
    spatial_offset,
    strides,
)

INT64_MIN = -(2**63)


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["HW_CHUNK"])
def _pool_kernel(
    x_ptr,  # [B, C, H, W] input, any float dtype
    partial_ptr,  # [B, S, C] fp32 output: partial means over S chunks of H x W, contiguous
    C, HW, W, HW_CHUNK,  # channels, H * W, width, positions per chunk (a multiple of BLOCK_HW)
    stride_xb, stride_xc, stride_xh, stride_xw,
    inv_hw,  # 1 / (H * W)
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, HW_FLAT: tl.constexpr,
):
    b = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    chunk = tl.program_id(2)
    c_mask = c < C
    x_base = x_ptr + b.to(tl.int64) * stride_xb
    acc = tl.zeros([BLOCK_C, BLOCK_HW], dtype=tl.float32)
    for offset in range(0, HW_CHUNK, BLOCK_HW):
        hw = chunk * HW_CHUNK + offset + tl.arange(0, BLOCK_HW)
        offsets = c[:, None] * stride_xc + spatial_offset(hw, W, stride_xh, stride_xw, HW_FLAT)[None, :]
        mask = c_mask[:, None] & (hw < HW)[None, :]
        acc += tl.load(x_base + offsets, mask=mask, other=0.0).to(tl.float32)
    row = b.to(tl.int64) * tl.num_programs(2) + chunk
    tl.store(partial_ptr + row * C + c, tl.sum(acc, axis=1) * inv_hw, mask=c_mask)


@triton.jit
def _score_keys(scores, c, C):
    """Distinct int64 keys whose descending order is the stable descending order of ``scores``."""
    bits = scores.to(tl.int32, bitcast=True)
    ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    ordered = tl.where(scores == 0.0, 0, ordered)
    ordered = tl.where(scores != scores, 0x7FC00000, ordered)
    keys = (ordered.to(tl.int64) << 32) | (C - 1 - c).to(tl.int64)
    return tl.where(c < C, keys, -9223372036854775808)


@triton.jit
def _key_scores(keys):
    """Inverse of the score part of ``_score_keys`` (NaN stays NaN)."""
    ordered = (keys >> 32).to(tl.int32)
    bits = tl.where(ordered >= 0, ordered, ordered ^ 0x7FFFFFFF)
    return bits.to(tl.float32, bitcast=True)


@triton.jit(do_not_specialize=["K", "stride_vb", "stride_vc"])
def _select_kernel(
    values_ptr,  # [B, C] fp32: router logits (LEARNED) or the random router's keys
    scores_ptr,  # [B, C] fp32 output: sigmoid of the logits (LEARNED)
    idx_ptr,  # [B, K] int64 output: selected channels, slot order
    w_ptr,  # [B, K] fp32 output: selected scores (1 for the random router)
    slot_ptr,  # [B, C] int32 output: slot of each channel, -1 if not selected
    C, K,
    stride_vb, stride_vc,
    LEARNED: tl.constexpr, C_POW2: tl.constexpr,
):
    b = tl.program_id(0)
    c = tl.arange(0, C_POW2)
    c_mask = c < C
    values = tl.load(values_ptr + b * stride_vb + c * stride_vc, mask=c_mask, other=0.0)
    if LEARNED:
        scores = tl.sigmoid(values)
        tl.store(scores_ptr + b * C + c, scores, mask=c_mask)
    else:
        scores = values

    ranked = tl.sort(_score_keys(scores, c, C), descending=True)
    rank = tl.arange(0, C_POW2)
    channel = (C - 1) - (ranked & 0xFFFFFFFF).to(tl.int32)
    selected = rank < K
    tl.store(idx_ptr + b * K + rank, channel.to(tl.int64), mask=selected)
    if LEARNED:
        tl.store(w_ptr + b * K + rank, _key_scores(ranked), mask=selected)
    else:
        tl.store(w_ptr + b * K + rank, tl.full([C_POW2], 1.0, tl.float32), mask=selected)
    tl.store(slot_ptr + b * C + channel, tl.where(selected, rank, -1), mask=rank < C)


@triton.jit(do_not_specialize=["K"])
def _pack_kernel(
    x_ptr,  # [B, C, H, W] input
    idx_ptr,  # [B, K] int64 selected channels
    xs_ptr,  # [B, K, H, W] output: xs[b, j] = x[b, idx[b, j]]
    K, HW, W,
    stride_xb, stride_xc, stride_xh, stride_xw,
    stride_xsb, stride_xsc, stride_xsh, stride_xsw,
    BLOCK_K: tl.constexpr, BLOCK_HW: tl.constexpr, HW_FLAT: tl.constexpr,
):
    b = tl.program_id(0)
    j = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    hw = tl.program_id(2) * BLOCK_HW + tl.arange(0, BLOCK_HW)
    j_mask = j < K
    mask = j_mask[:, None] & (hw < HW)[None, :]
    channel = tl.load(idx_ptr + b * K + j, mask=j_mask, other=0)
    src = x_ptr + b.to(tl.int64) * stride_xb + channel[:, None] * stride_xc
    src += spatial_offset(hw, W, stride_xh, stride_xw, HW_FLAT)[None, :]
    dst = xs_ptr + b.to(tl.int64) * stride_xsb + j[:, None] * stride_xsc
    dst += spatial_offset(hw, W, stride_xsh, stride_xsw, HW_FLAT)[None, :]
    tl.store(dst, tl.load(src, mask=mask), mask=mask)


@triton.jit(do_not_specialize=["stride_gw_b", "stride_gw_k"])
def _router_grad_logits_kernel(
    grad_w_ptr,  # [B, K] gradient of the selected scores
    slot_ptr,  # [B, C] int32 slot of each channel, -1 if not selected
    scores_ptr,  # [B, C] fp32 router scores
    grad_logits_ptr,  # [B, C] fp32 output: the selected scores' gradient through the sigmoid, 0 elsewhere
    C,
    stride_gw_b, stride_gw_k,
    C_POW2: tl.constexpr,
):
    b = tl.program_id(0)
    c = tl.arange(0, C_POW2)
    c_mask = c < C
    slot = tl.load(slot_ptr + b * C + c, mask=c_mask, other=-1)
    is_selected = slot >= 0
    grad_score = tl.load(grad_w_ptr + b * stride_gw_b + slot * stride_gw_k, mask=is_selected, other=0.0).to(tl.float32)
    scores = tl.load(scores_ptr + b * C + c, mask=c_mask, other=0.0)
    tl.store(grad_logits_ptr + b * C + c, grad_score * scores * (1.0 - scores), mask=c_mask)


@triton.jit(do_not_specialize=["K", "target_start"])
def _input_backward_kernel(
    grad_pass_ptr,  # [B, C, H, W] gradient of x_pass, i.e. of the fusion output (HAS_PASS)
    grad_target_ptr,  # [B, K, H, W] gradient of the fused target channels (HAS_PASS, affine targets)
    grad_xs_ptr,  # [B, K, H, W] gradient of the packed channels (HAS_XS)
    slot_ptr,  # [B, C] int32 slot of each channel, -1 if not selected
    grad_pool_ptr,  # [B, C] fp32 gradient through the mean, already / (H * W) (HAS_POOL)
    grad_x_ptr,  # [B, C, H, W] output
    C, K, HW, W, target_start,  # target_start: first target channel of affine fusions
    stride_pb, stride_pc, stride_ph, stride_pw,
    stride_tb, stride_tc, stride_th, stride_tw,
    stride_sb, stride_sc, stride_sh, stride_sw,
    stride_ob, stride_oc, stride_oh, stride_ow,
    HAS_PASS: tl.constexpr, GATHER_TARGETS: tl.constexpr, HAS_XS: tl.constexpr, HAS_POOL: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, HW_FLAT: tl.constexpr,
):
    b = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    hw = tl.program_id(2) * BLOCK_HW + tl.arange(0, BLOCK_HW)
    c_mask = c < C
    mask = c_mask[:, None] & (hw < HW)[None, :]
    b64 = b.to(tl.int64)
    slot = tl.load(slot_ptr + b * C + c, mask=c_mask, other=-1)
    is_selected = (slot >= 0)[:, None]
    grad = tl.zeros([BLOCK_C, BLOCK_HW], dtype=tl.float32)
    if HAS_XS:
        grad_xs = tl.load(
            grad_xs_ptr + b64 * stride_sb + slot[:, None] * stride_sc
            + spatial_offset(hw, W, stride_sh, stride_sw, HW_FLAT)[None, :],
            mask=mask & is_selected, other=0.0,
        )
        grad += grad_xs.to(tl.float32)
    if HAS_POOL:
        grad += tl.load(grad_pool_ptr + b * C + c, mask=c_mask, other=0.0)[:, None]
    if HAS_PASS:
        grad_pass = tl.load(
            grad_pass_ptr + b64 * stride_pb + c[:, None] * stride_pc
            + spatial_offset(hw, W, stride_ph, stride_pw, HW_FLAT)[None, :],
            mask=mask, other=0.0,
        ).to(tl.float32)
        if GATHER_TARGETS:
            # The targets are the selected channels; their fused gradient arrived inside grad_xs.
            grad += tl.where(is_selected, 0.0, grad_pass)
        else:
            target_slot = c - target_start
            is_target = ((target_slot >= 0) & (target_slot < K))[:, None]
            grad_target = tl.load(
                grad_target_ptr + b64 * stride_tb + target_slot[:, None] * stride_tc
                + spatial_offset(hw, W, stride_th, stride_tw, HW_FLAT)[None, :],
                mask=mask & is_target, other=0.0,
            ).to(tl.float32)
            grad += tl.where(is_target, grad_target, grad_pass)
    out = grad_x_ptr + b64 * stride_ob + c[:, None] * stride_oc
    out += spatial_offset(hw, W, stride_oh, stride_ow, HW_FLAT)[None, :]
    tl.store(out, grad.to(grad_x_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


# Chunks of at most this many tile steps per pooling program: enough programs to fill the GPU
# even at batch 1, and a split that depends on the shape only (a sample's pooled value does not
# depend on the batch it came in).
POOL_STEPS_PER_PROGRAM = 4


def _select_tiles(channels: int) -> tuple[int, int]:
    """``(C_POW2, num_warps)`` of the per-sample selection programs (one sort of C_POW2 keys)."""
    c_pow2 = max(16, next_pow2(channels))
    return c_pow2, 8 if c_pow2 >= 512 else 4


def _check_k(k: int, channels: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if not 1 <= k <= channels:
        raise ValueError(f"k must satisfy 1 <= k <= C = {channels}, got {k}")


def _check_router_weights(x: Tensor, fc1_weight: Tensor, fc2_weight: Tensor) -> None:
    channels = x.shape[1]
    for name, weight in (("fc1_weight", fc1_weight), ("fc2_weight", fc2_weight)):
        if not isinstance(weight, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(weight).__name__}")
        if weight.dim() != 2 or not weight.is_floating_point() or weight.dtype == torch.float64:
            raise TypeError(
                f"{name} must be a 2-D float32/float16/bfloat16 tensor, got {weight.dtype} {tuple(weight.shape)}"
            )
    hidden = fc1_weight.shape[0]
    check_shape(fc1_weight, (hidden, channels), "fc1_weight")
    check_shape(fc2_weight, (channels, hidden), "fc2_weight")
    check_same_device(x, fc1_weight=fc1_weight, fc2_weight=fc2_weight)


def check_route_pack_inputs(x: Tensor, fc1_weight: Tensor, fc2_weight: Tensor, k: int) -> None:
    check_feature_map(x, "x")
    _check_k(k, x.shape[1])
    _check_router_weights(x, fc1_weight, fc2_weight)


def check_select_pack_inputs(x: Tensor, scores: Tensor, k: int) -> None:
    check_feature_map(x, "x")
    _check_k(k, x.shape[1])
    if not isinstance(scores, Tensor):
        raise TypeError(f"scores must be a torch.Tensor, got {type(scores).__name__}")
    check_shape(scores, tuple(x.shape[:2]), "scores")
    check_dtype(scores, torch.float32, "scores")
    check_same_device(x, scores=scores)


def _launch_select_pack(x: Tensor, k: int, values: Tensor, scores: Tensor, learned: bool) -> tuple[Tensor, ...]:
    batch, channels, height, width = x.shape
    xs = empty_like_format(x, (batch, k, height, width))
    idx = torch.empty((batch, k), device=x.device, dtype=torch.int64)
    w = torch.empty((batch, k), device=x.device, dtype=torch.float32)
    slot = torch.empty((batch, channels), device=x.device, dtype=torch.int32)
    c_pow2, num_warps = _select_tiles(channels)
    _select_kernel[(batch,)](
        values, scores, idx, w, slot, channels, k, values.stride(0), values.stride(1),
        LEARNED=learned, C_POW2=c_pow2, num_warps=num_warps,
    )
    channels_last = is_channels_last(x)
    block_k, block_hw, num_warps = dense_tiles(k, height * width, channels_last)
    grid = (batch, cdiv(k, block_k), cdiv(height * width, block_hw))
    _pack_kernel[grid](
        x, idx, xs, k, height * width, width, *strides(x), *strides(xs),
        BLOCK_K=block_k, BLOCK_HW=block_hw, HW_FLAT=hw_is_flat(x, xs), num_warps=num_warps,
    )
    return xs, idx, w, slot


def pool(x: Tensor) -> Tensor:
    """``[B, C]`` fp32 spatial means of ``x: [B, C, H, W]`` (deterministic, no atomics): chunked
    partial means, then their sum when H x W spans more than one chunk."""
    batch, channels, height, width = x.shape
    hw = height * width
    block_c, block_hw, num_warps = dense_tiles(channels, hw, is_channels_last(x))
    chunk = block_hw * POOL_STEPS_PER_PROGRAM
    chunks = cdiv(hw, chunk)
    partial = torch.empty((batch, chunks, channels), device=x.device, dtype=torch.float32)
    _pool_kernel[(batch, cdiv(channels, block_c), chunks)](
        x, partial, channels, hw, width, chunk, *strides(x), 1.0 / hw,
        BLOCK_C=block_c, BLOCK_HW=block_hw, HW_FLAT=hw_is_flat(x), num_warps=num_warps,
    )
    return partial[:, 0] if chunks == 1 else partial.sum(dim=1)


def route_pack_unchecked(x: Tensor, fc1_weight: Tensor, fc2_weight: Tensor, k: int) -> tuple[Tensor, ...]:
    """:func:`launch_route_pack` without its input checks (callers have checked)."""
    pooled = pool(x)
    with fp32_region(x.device.type):
        hidden = torch.mm(pooled, fc1_weight.float().t()).relu_()
        logits = torch.mm(hidden, fc2_weight.float().t())
    scores = torch.empty_like(logits)
    xs, idx, w, slot = _launch_select_pack(x, k, logits, scores, learned=True)
    return xs, idx, w, slot, pooled, hidden, scores


def launch_route_pack(x: Tensor, fc1_weight: Tensor, fc2_weight: Tensor, k: int) -> tuple[Tensor, ...]:
    """Learned routing and packing (no autograd).

    The pooling and the selection are Triton kernels; the router's two small GEMMs
    (``[B, C] x [C, C_h]``, ``[B, C_h] x [C_h, C]``, fp32) go to cuBLAS, which spreads them over
    the whole GPU where one program per sample could not.

    Args:
        x: ``[B, C, H, W]`` float32/float16/bfloat16, NCHW or channels_last.
        fc1_weight: ``[C_h, C]``; fc2_weight: ``[C, C_h]`` router weights.
        k: channels to select per sample, ``1 <= k <= C``.

    Returns:
        ``(xs [B, k, H, W], idx [B, k] int64, w [B, k] fp32, selected_slot [B, C] int32,
        pooled [B, C] fp32, hidden [B, C_h] fp32, scores [B, C] fp32)``.
    """
    check_route_pack_inputs(x, fc1_weight, fc2_weight, k)
    return route_pack_unchecked(x, fc1_weight, fc2_weight, k)


def select_pack_unchecked(x: Tensor, scores: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`launch_select_pack` without its input checks (callers have checked)."""
    return _launch_select_pack(x, k, scores, scores, learned=False)


def launch_select_pack(x: Tensor, scores: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Top-k of given ``scores: [B, C]`` fp32 and packing; ``w`` is all ones (random router)."""
    check_select_pack_inputs(x, scores, k)
    return select_pack_unchecked(x, scores, k)


def launch_router_backward(
    grad_w: Tensor, selected_slot: Tensor, pooled: Tensor, hidden: Tensor, scores: Tensor,
    fc1_weight: Tensor, fc2_weight: Tensor, hw: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(grad_pool [B, C] fp32 (already / HW), grad_fc1 [C_h, C], grad_fc2 [C, C_h])``.

    A Triton kernel takes ``grad_w`` through the selection and the sigmoid; the rest of the
    router's backward is four small fp32 GEMMs.
    """
    batch, channels = scores.shape
    grad_logits = torch.empty_like(scores)
    c_pow2, num_warps = _select_tiles(channels)
    _router_grad_logits_kernel[(batch,)](
        grad_w, selected_slot, scores, grad_logits, channels, grad_w.stride(0), grad_w.stride(1),
        C_POW2=c_pow2, num_warps=num_warps,
    )
    with fp32_region(scores.device.type):
        grad_hidden = torch.mm(grad_logits, fc2_weight.float()).masked_fill_(hidden <= 0.0, 0.0)
        grad_pool = torch.mm(grad_hidden, fc1_weight.float()).mul_(1.0 / hw)
        grad_fc1 = torch.mm(grad_hidden.t(), pooled).to(fc1_weight.dtype)
        grad_fc2 = torch.mm(grad_logits.t(), hidden).to(fc2_weight.dtype)
    return grad_pool, grad_fc1, grad_fc2


def launch_input_backward(
    grad_pass: Optional[Tensor], grad_target: Optional[Tensor], grad_xs: Optional[Tensor],
    selected_slot: Tensor, grad_pool: Optional[Tensor], shape: list[int], dtype: torch.dtype,
    channels_last: bool, fusion: str,
) -> Tensor:
    """``grad_x`` of a MoD block's input in one pass (``[B, C, H, W]``, ``dtype``, x's format):

    ``grad_pass`` (the fusion output's gradient) on channels that are not fusion targets, the
    targets' own gradient ``grad_target`` on affine targets (``"original"``: it arrives inside
    ``grad_xs``), plus ``grad_xs`` scattered home and ``grad_pool`` broadcast over H x W. Any
    term may be None.
    """
    batch, channels, height, width = shape
    k = grad_xs.shape[1] if grad_xs is not None else (grad_target.shape[1] if grad_target is not None else 1)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    grad_x = torch.empty(shape, device=selected_slot.device, dtype=dtype, memory_format=fmt)
    gather_targets = fusion == "original"
    has_target = grad_pass is not None and not gather_targets
    if has_target and grad_target is None:
        raise ValueError("affine fusions need the target gradient beside the pass-through gradient")
    placeholder = grad_x  # never read: its constexpr switch is off
    tensors = [t if t is not None else placeholder for t in (grad_pass, grad_target, grad_xs)]
    block_c, block_hw, num_warps = dense_tiles(channels, height * width, channels_last)
    grid = (batch, cdiv(channels, block_c), cdiv(height * width, block_hw))
    _input_backward_kernel[grid](
        *tensors, selected_slot, grad_pool if grad_pool is not None else selected_slot, grad_x,
        channels, k, height * width, width, channels - k if fusion == "last_k" else 0,
        *strides(tensors[0]), *strides(tensors[1]), *strides(tensors[2]), *strides(grad_x),
        HAS_PASS=grad_pass is not None, GATHER_TARGETS=gather_targets, HAS_XS=grad_xs is not None,
        HAS_POOL=grad_pool is not None, BLOCK_C=block_c, BLOCK_HW=block_hw,
        HW_FLAT=hw_is_flat(*tensors, grad_x), num_warps=num_warps,
    )
    return grad_x


# --------------------------------------------------------------------------------------------
# torch.library ops and autograd
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("mod_kernels::route_pack", mutates_args=())
def route_pack_op(
    x: Tensor, fc1_weight: Tensor, fc2_weight: Tensor, k: int
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return launch_route_pack(x, fc1_weight, fc2_weight, k)


@route_pack_op.register_fake
def _(x, fc1_weight, fc2_weight, k):
    batch, channels, height, width = x.shape
    f32 = dict(device=x.device, dtype=torch.float32)
    return (
        empty_like_format(x, (batch, k, height, width)),
        x.new_empty((batch, k), dtype=torch.int64),
        x.new_empty((batch, k), dtype=torch.float32),
        x.new_empty((batch, channels), dtype=torch.int32),
        torch.empty((batch, channels), **f32),
        torch.empty((batch, fc1_weight.shape[0]), **f32),
        torch.empty((batch, channels), **f32),
    )


@torch.library.custom_op("mod_kernels::select_pack", mutates_args=())
def select_pack_op(x: Tensor, scores: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return launch_select_pack(x, scores, k)


@select_pack_op.register_fake
def _(x, scores, k):
    batch, channels, height, width = x.shape
    return (
        empty_like_format(x, (batch, k, height, width)),
        x.new_empty((batch, k), dtype=torch.int64),
        x.new_empty((batch, k), dtype=torch.float32),
        x.new_empty((batch, channels), dtype=torch.int32),
    )


@torch.library.custom_op("mod_kernels::router_backward", mutates_args=())
def router_backward_op(
    grad_w: Tensor, selected_slot: Tensor, pooled: Tensor, hidden: Tensor, scores: Tensor,
    fc1_weight: Tensor, fc2_weight: Tensor, hw: int,
) -> tuple[Tensor, Tensor, Tensor]:
    return launch_router_backward(grad_w, selected_slot, pooled, hidden, scores, fc1_weight, fc2_weight, hw)


@router_backward_op.register_fake
def _(grad_w, selected_slot, pooled, hidden, scores, fc1_weight, fc2_weight, hw):
    return torch.empty_like(scores), torch.empty_like(fc1_weight), torch.empty_like(fc2_weight)


@torch.library.custom_op("mod_kernels::input_backward", mutates_args=())
def input_backward_op(
    grad_pass: Optional[Tensor], grad_target: Optional[Tensor], grad_xs: Optional[Tensor], selected_slot: Tensor,
    grad_pool: Optional[Tensor], shape: list[int], dtype: torch.dtype, channels_last: bool, fusion: str,
) -> Tensor:
    return launch_input_backward(
        grad_pass, grad_target, grad_xs, selected_slot, grad_pool, shape, dtype, channels_last, fusion
    )


@input_backward_op.register_fake
def _(grad_pass, grad_target, grad_xs, selected_slot, grad_pool, shape, dtype, channels_last, fusion):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(shape, device=selected_slot.device, dtype=dtype, memory_format=fmt)


def affine_targets(x: Tensor, k: int, fusion: str) -> Tensor:
    """The ``k`` fusion target channels of ``x`` (a view) for ``"first_k"`` / ``"last_k"``."""
    return x.narrow(1, x.shape[1] - k if fusion == "last_k" else 0, k)


def route_and_pack(
    x: Tensor, fc1_weight: Optional[Tensor], fc2_weight: Optional[Tensor], scores: Optional[Tensor], k: int
) -> tuple[Tensor, Tensor, Tensor, Tensor, tuple[Tensor, ...]]:
    """``(xs, idx, w, selected_slot, tensors the backward needs)`` of checked inputs: learned
    routing when ``scores`` is None, else the given keys. Launches directly in eager mode and
    through the ``torch.library`` ops while a compiler traces."""
    eager = runs_eagerly(x)
    if scores is None:
        op = route_pack_unchecked if eager else route_pack_op
        xs, idx, w, slot, pooled, hidden, router_scores = op(x, fc1_weight, fc2_weight, k)
        return xs, idx, w, slot, (slot, pooled, hidden, router_scores, fc1_weight, fc2_weight)
    xs, idx, w, slot = (select_pack_unchecked if eager else select_pack_op)(x, scores, k)
    return xs, idx, w, slot, (slot,)


class RoutePackFunction(torch.autograd.Function):
    """Routing and packing of a MoD block, paired with :class:`ScaleFuseRoutedFunction`.

    Forward returns ``(x_pass, target_carrier, xs, w, idx, selected_slot)``. ``x_pass`` is ``x``
    itself (a view) and ``target_carrier`` is ``x``'s k target channels (a view; an unused
    placeholder for ``"original"``, whose targets are ``xs``): the fusion consumes both, so that
    the backward of this function receives the fusion's output gradient and the targets'
    gradient and writes the input gradient in ONE pass
    (``grad_x = grad_out off the targets | grad_targets on them + grad_pool / HW + scatter(grad_xs)``)
    instead of summing three full-size tensors. The contract: ``x_pass``'s gradient is the
    fusion output's gradient, whose target channels this backward replaces by the targets' own
    gradient. ``mod_kernels.route_pack`` / ``fuse_routed`` keep the pair together.
    """

    @staticmethod
    def forward(ctx, x, fc1_weight, fc2_weight, scores, k, fusion):
        ctx.set_materialize_grads(False)
        ctx.learned = scores is None
        xs, idx, w, slot, saved = route_and_pack(x, fc1_weight, fc2_weight, scores, k)
        ctx.save_for_backward(*saved)
        if not ctx.learned:
            ctx.mark_non_differentiable(w)
        if fusion == "original":
            target_carrier = x.new_empty(0)
            ctx.mark_non_differentiable(target_carrier)
        else:
            target_carrier = affine_targets(x, k, fusion)
        ctx.mark_non_differentiable(idx, slot)
        ctx.fusion = fusion
        ctx.k = k
        ctx.shape = list(x.shape)
        ctx.dtype = x.dtype
        ctx.channels_last = is_channels_last(x)
        return x.view_as(x), target_carrier, xs, w, idx, slot

    @staticmethod
    def backward(ctx, grad_pass, grad_target, grad_xs, grad_w, grad_idx, grad_slot):
        check_backward_once("route_pack")
        grad_pool = grad_fc1 = grad_fc2 = None
        if ctx.learned:
            slot, pooled, hidden, router_scores, fc1_weight, fc2_weight = ctx.saved_tensors
            if grad_w is not None:
                router_backward = launch_router_backward if runs_eagerly(slot) else router_backward_op
                grad_pool, grad_fc1, grad_fc2 = router_backward(
                    grad_w, slot, pooled, hidden, router_scores, fc1_weight, fc2_weight, ctx.shape[2] * ctx.shape[3]
                )
        else:
            (slot,) = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            if ctx.fusion == "original":
                grad_target = None
            elif grad_pass is None and grad_target is not None:
                grad_pass = torch.zeros(ctx.shape, dtype=grad_target.dtype, device=grad_target.device)
            elif grad_pass is not None and grad_target is None:
                batch, _, height, width = ctx.shape
                k = grad_xs.shape[1] if grad_xs is not None else ctx.k
                grad_target = grad_pass.new_zeros((batch, k, height, width))
            input_backward = launch_input_backward if runs_eagerly(slot) else input_backward_op
            grad_x = input_backward(
                grad_pass, grad_target, grad_xs, slot, grad_pool, ctx.shape, ctx.dtype, ctx.channels_last, ctx.fusion
            )
        needs_fc1, needs_fc2 = ctx.needs_input_grad[1:3]
        return grad_x, grad_fc1 if needs_fc1 else None, grad_fc2 if needs_fc2 else None, None, None, None
