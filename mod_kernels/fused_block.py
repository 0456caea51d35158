"""A whole MoD block at inference in three kernel launches: pool, router, fused reduced block.

The deploy form (:func:`mod_models.optimize_for_inference`) folds every batch norm into its
convolution; a deployed MoD block on the ``"triton"`` backend then runs as

1. ``_pool_hidden_kernel``, grid ``(B / BLOCK_B, C / BLOCK_C, chunks of H x W)``: partial means
   of ``x`` over a chunk of positions, multiplied by the matching columns of the router's first
   layer, so that ``W1`` (linear) rides on the pool's partial sums and is spread over all the
   pooling programs; a program keeps its ``W1`` tile in registers for its ``BLOCK_B`` samples, so
   every weight tile is read once per ``BLOCK_B`` samples.
2. ``_router_scores_kernel``, grid ``(B / BLOCK_B, channel groups + snapshot tiles)``: the partial
   hidden vectors summed in a fixed order, ReLU, the second router layer for the program's
   channels (one ``tl.dot`` per ``BLOCK_B`` samples) and the sigmoid: ``scores [B, C]`` fp32. For
   in-place affine fusions, extra programs of the same launch copy the ``k`` target channels to a
   small snapshot.
3. ``_bottleneck_kernel`` / ``_basic_kernel`` / ``_inverted_kernel``, grid ``(B, H x W / BLOCK_P)``:
   each program takes the stable top-k of its sample's scores (``tl.topk`` of the same distinct
   64-bit keys as the routing kernels: ties to the lower channel, NaN first), gathers the k
   selected channels at its positions plus the halo its 3x3 convolutions need, computes the whole
   reduced block with the folded weights in fp32 registers, scales by the selected scores and
   adds into the fusion targets (ReLU after the fusion for the ResNet blocks, as ``torch.relu``:
   NaN stays NaN).

Why a snapshot: writing the targets in place while other programs still read the selected
channels' halo would race whenever a selected channel is also a target. The affine targets
(``first_k``, ``last_k``) are known before the selection, so launch 2 copies them and launch 3
reads a selected target channel from that copy; ``"original"`` fusion (targets = the selection)
cannot be copied before the selection exists, so it writes a new output tensor instead (every
program copies its positions of the other channels). Without a snapshot the kernels read only
``x``, and write either ``x``'s target channels or a new tensor: no program reads what another
writes, no atomics, bitwise deterministic, and a sample's result does not depend on the batch it
comes in (tiles and chunks depend on the shape only).

The widths are tiny (k = 1..32 channels), below what ``tl.dot`` takes (16 in every dimension),
so the reduced convolutions are broadcast multiply-accumulates over ``[out, in, positions]``
tiles in fp32 (the folded weights reach the kernels as one packed vector, the deployed block's own
parameter, in the model's dtype; they and the router's weights are converted to fp32 as they are
loaded); the 3x3 convolutions recompute the layer before them at each of the nine shifted
positions (cheap at these widths) instead of exchanging a halo between threads. The random
router draws its keys with ``torch.rand`` (one launch) and, for in-place affine fusions, copies
the targets with one ``copy_``: three launches as well.

:func:`fused_block_plan` says which blocks the fused kernel takes (the paper's capacities and
up to a bound on the reduced widths); the others run the routing kernels, the folded
convolutions and the fusion kernel (:func:`mod_kernels.routed_block`).
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._utils import (
    cdiv,
    check_dtype,
    check_feature_map,
    check_in_place_input,
    check_same_device,
    check_shape,
    empty_like_format,
    hw_is_flat,
    is_channels_last,
    next_pow2,
    relu6_keep_nan,
    relu_keep_nan,
    runs_eagerly,
    spatial_offset,
    strides,
)
from .fused_route_pack import _key_scores, _score_keys

BLOCK_KINDS = ("bottleneck", "basic", "inverted")
FUSIONS = ("first_k", "last_k", "original")
# Allocation of the launcher's new tensors (tests poison them to catch unwritten elements).
_empty = torch.empty
_empty_like_format = empty_like_format
# Samples per router program: the rows of its tl.dot (tl.dot needs at least 16).
ROUTER_BLOCK_B = 16
POOL_STEPS_PER_PROGRAM = 4
# Largest reduced widths the fused kernel takes (beyond them its register tiles would spill):
MAX_FUSED_K = {"bottleneck": 32, "basic": 16, "inverted": 32}
MAX_FUSED_CHANNELS = 4096  # the per-program top-k sorts next_pow2(C) keys in registers
MAX_FUSED_HIDDEN = 192  # inverted residual: expanded width t * k
PARAM_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # of the packed folded weights


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["HW_CHUNK"])
def _pool_hidden_kernel(
    x_ptr,  # [B, C, H, W] block input, any float dtype
    fc1_ptr,  # [C_h, C] the router's first layer
    partial_ptr,  # [B, P, BLOCK_H] fp32 output: partial hidden pre-activations, P = chunks * C / BLOCK_C
    B, C, C_H, HW, W, HW_CHUNK,  # HW_CHUNK: positions per program, a multiple of BLOCK_HW
    stride_xb, stride_xc, stride_xh, stride_xw,
    stride_f1h, stride_f1c,
    inv_hw,  # 1 / (H * W)
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_H: tl.constexpr,
    HW_FLAT: tl.constexpr,
):
    b_block = tl.program_id(0)
    c_block = tl.program_id(1)
    chunk = tl.program_id(2)
    c = c_block * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    h = tl.arange(0, BLOCK_H)
    h_mask = h < C_H
    # W1 transposed, [BLOCK_C, BLOCK_H]: the columns of this program's channels.
    fc1_t = tl.load(
        fc1_ptr + c[:, None] * stride_f1c + h[None, :] * stride_f1h, mask=c_mask[:, None] & h_mask[None, :], other=0.0
    ).to(tl.float32)
    first = b_block * BLOCK_B
    n_partials = tl.num_programs(1) * tl.num_programs(2)
    p = chunk * tl.num_programs(1) + c_block
    for i in range(0, tl.minimum(BLOCK_B, B - first)):
        b64 = (first + i).to(tl.int64)
        acc = tl.zeros([BLOCK_C, BLOCK_HW], dtype=tl.float32)
        for offset in range(0, HW_CHUNK, BLOCK_HW):
            hw = chunk * HW_CHUNK + offset + tl.arange(0, BLOCK_HW)
            mask = c_mask[:, None] & (hw < HW)[None, :]
            values = tl.load(
                x_ptr + b64 * stride_xb + c[:, None] * stride_xc
                + spatial_offset(hw, W, stride_xh, stride_xw, HW_FLAT)[None, :],
                mask=mask, other=0.0,
            )
            acc += values.to(tl.float32)
        means = tl.sum(acc, axis=1) * inv_hw
        partial = tl.sum(fc1_t * means[:, None], axis=0)
        # Padded hidden entries stay exactly 0 (an infinite mean times a padded 0 would be NaN).
        partial = tl.where(h_mask, partial, 0.0)
        tl.store(partial_ptr + (b64 * n_partials + p) * BLOCK_H + h, partial)


@triton.jit(do_not_specialize=["CHANNELS_PER_PROGRAM", "K", "target_start"])
def _router_scores_kernel(
    partial_ptr,  # [B, P, BLOCK_H] fp32 partial hidden pre-activations (from _pool_hidden_kernel)
    fc2_ptr,  # [C, C_h] the router's second layer
    scores_ptr,  # [B, C] fp32 output: sigmoid(W2 relu(W1 mean_hw(x)))
    x_ptr,  # [B, C, H, W] block input (SNAPSHOT programs)
    snapshot_ptr,  # [B, K, H, W] output of the SNAPSHOT programs: x's fusion target channels
    B, C, C_H, P, CHANNELS_PER_PROGRAM,  # CHANNELS_PER_PROGRAM: a multiple of BLOCK_C
    HW, W, K, target_start,
    stride_f2c, stride_f2h,
    stride_xb, stride_xc, stride_xh, stride_xw,
    stride_sb, stride_sc, stride_sh, stride_sw,
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr,
    SNAPSHOT: tl.constexpr, K_POW2: tl.constexpr, SNAPSHOT_P: tl.constexpr, HW_FLAT: tl.constexpr,
):
    score_programs = tl.cdiv(C, CHANNELS_PER_PROGRAM)
    if SNAPSHOT:
        if tl.program_id(1) >= score_programs:
            # The extra programs copy the K target channels, SNAPSHOT_P positions each, per sample.
            hw = (tl.program_id(1) - score_programs) * SNAPSHOT_P + tl.arange(0, SNAPSHOT_P)
            j = tl.arange(0, K_POW2)
            mask = (j < K)[:, None] & (hw < HW)[None, :]
            first = tl.program_id(0) * BLOCK_B
            for i in range(0, tl.minimum(BLOCK_B, B - first)):
                b64 = (first + i).to(tl.int64)
                values = tl.load(
                    x_ptr + b64 * stride_xb + (target_start + j)[:, None] * stride_xc
                    + spatial_offset(hw, W, stride_xh, stride_xw, HW_FLAT)[None, :], mask=mask,
                )
                tl.store(
                    snapshot_ptr + b64 * stride_sb + j[:, None] * stride_sc
                    + spatial_offset(hw, W, stride_sh, stride_sw, HW_FLAT)[None, :], values, mask=mask,
                )
            return
    b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    b_mask = b < B
    h = tl.arange(0, BLOCK_H)
    h_mask = h < C_H
    rows = partial_ptr + b.to(tl.int64)[:, None] * P * BLOCK_H + h[None, :]
    hidden = tl.zeros([BLOCK_B, BLOCK_H], dtype=tl.float32)
    for p in range(0, P):
        hidden += tl.load(rows + p * BLOCK_H, mask=b_mask[:, None], other=0.0)
    hidden = relu_keep_nan(hidden)
    start = tl.program_id(1) * CHANNELS_PER_PROGRAM
    for c0 in range(start, tl.minimum(start + CHANNELS_PER_PROGRAM, C), BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_mask = c < C
        fc2_t = tl.load(
            fc2_ptr + c[None, :] * stride_f2c + h[:, None] * stride_f2h,
            mask=h_mask[:, None] & c_mask[None, :], other=0.0
        ).to(tl.float32)
        logits = tl.dot(hidden, fc2_t, input_precision="ieee")
        tl.store(scores_ptr + b.to(tl.int64)[:, None] * C + c[None, :], tl.sigmoid(logits),
                 mask=b_mask[:, None] & c_mask[None, :])


@triton.jit
def _select_top_k(scores_ptr, idx_ptr, w_ptr, b, C, K, write, C_POW2: tl.constexpr, K_POW2: tl.constexpr,
                  LEARNED: tl.constexpr):
    """Stable top-k of sample ``b``'s scores: ``(channel [K_POW2] int32, w [K_POW2] fp32, valid)``;
    slots in descending score order, ties to the lower channel, NaN first. ``write``: also store
    ``idx`` and ``w``."""
    c = tl.arange(0, C_POW2)
    scores = tl.load(scores_ptr + b.to(tl.int64) * C + c, mask=c < C, other=0.0)
    top = tl.topk(_score_keys(scores, c, C), K_POW2)
    slot = tl.arange(0, K_POW2)
    valid = slot < K
    channel = (C - 1) - (top & 0xFFFFFFFF).to(tl.int32)
    if LEARNED:
        w = _key_scores(top)
    else:
        w = tl.full([K_POW2], 1.0, tl.float32)
    tl.store(idx_ptr + b.to(tl.int64) * K + slot, channel.to(tl.int64), mask=valid & write)
    tl.store(w_ptr + b.to(tl.int64) * K + slot, w, mask=valid & write)
    return channel, w, valid


@triton.jit
def _load_selected(x_base, snapshot_base, channel, from_x, from_snapshot, snapshot_slot, hh, ww, inside,
                   stride_xc, stride_xh, stride_xw, stride_sc, stride_sh, stride_sw, SNAPSHOT: tl.constexpr):
    """``[K_POW2, BLOCK_P]`` fp32: the selected channels at positions ``(hh, ww)``, 0 outside the
    image (the convolution's zero padding); targets from the snapshot when there is one."""
    values = tl.load(
        x_base + channel[:, None] * stride_xc + (hh * stride_xh + ww * stride_xw)[None, :],
        mask=from_x[:, None] & inside[None, :], other=0.0,
    )
    if SNAPSHOT:
        copied = tl.load(
            snapshot_base + snapshot_slot[:, None] * stride_sc + (hh * stride_sh + ww * stride_sw)[None, :],
            mask=from_snapshot[:, None] & inside[None, :], other=0.0,
        )
        values = tl.where(from_snapshot[:, None], copied, values)
    return values.to(tl.float32)


@triton.jit
def _mac(weight, inputs):
    """``[O, P] = sum_i weight[O, I] * inputs[I, P]`` (broadcast multiply-accumulate in fp32)."""
    return tl.sum(weight[:, :, None] * inputs[None, :, :], axis=1)


@triton.jit
def _fuse_epilogue(
    y, w, channel, valid, x_base, out_base, snapshot_base, C, K, target_start, ph, pw, p_mask,
    stride_xc, stride_xh, stride_xw, stride_oc, stride_oh, stride_ow, stride_sc, stride_sh, stride_sw,
    K_POW2: tl.constexpr, ORIGINAL: tl.constexpr, IN_PLACE: tl.constexpr, RELU: tl.constexpr,
    BLOCK_COPY: tl.constexpr,
):
    """``act(x[t] + w * y)`` into the targets at this program's positions; out of place, also
    every other channel of ``x`` at these positions."""
    slot = tl.arange(0, K_POW2)
    rows = valid[:, None] & p_mask[None, :]
    own_x = (ph * stride_xh + pw * stride_xw)[None, :]
    if ORIGINAL:
        target = channel
    else:
        target = target_start + slot
    if IN_PLACE:  # affine targets, whose input the snapshot holds
        residual = tl.load(snapshot_base + slot[:, None] * stride_sc + (ph * stride_sh + pw * stride_sw)[None, :],
                           mask=rows, other=0.0)
    else:
        residual = tl.load(x_base + target[:, None] * stride_xc + own_x, mask=rows, other=0.0)
    fused = residual.to(tl.float32) + w[:, None] * y
    if RELU:
        fused = relu_keep_nan(fused)
    if IN_PLACE:
        tl.store(x_base + target[:, None] * stride_xc + own_x, fused.to(x_base.dtype.element_ty), mask=rows)
    else:
        own_out = (ph * stride_oh + pw * stride_ow)[None, :]
        tl.store(out_base + target[:, None] * stride_oc + own_out, fused.to(out_base.dtype.element_ty), mask=rows)
        marked = tl.where(valid, target, -1)
        for c0 in range(0, C, BLOCK_COPY):
            cc = c0 + tl.arange(0, BLOCK_COPY)
            if ORIGINAL:
                is_target = tl.sum((cc[:, None] == marked[None, :]).to(tl.int32), axis=1) > 0
            else:
                is_target = (cc >= target_start) & (cc < target_start + K)
            keep = ((cc < C) & (is_target == 0))[:, None] & p_mask[None, :]
            values = tl.load(x_base + cc[:, None] * stride_xc + own_x, mask=keep)
            tl.store(out_base + cc[:, None] * stride_oc + own_out, values, mask=keep)


@triton.jit
def _program_setup(scores_ptr, idx_ptr, w_ptr, x_ptr, out_ptr, snapshot_ptr, C, K, H, W, target_start,
                   stride_xb, stride_ob, stride_sb,
                   C_POW2: tl.constexpr, K_POW2: tl.constexpr, BLOCK_P: tl.constexpr,
                   LEARNED: tl.constexpr, ORIGINAL: tl.constexpr, SNAPSHOT: tl.constexpr):
    """Selection, positions and base pointers of program ``(b, tile)``."""
    b = tl.program_id(0)
    tile = tl.program_id(1)
    channel, w, valid = _select_top_k(scores_ptr, idx_ptr, w_ptr, b, C, K, tile == 0, C_POW2, K_POW2, LEARNED)
    p = tile * BLOCK_P + tl.arange(0, BLOCK_P)
    p_mask = p < H * W
    ph = p // W
    pw = p % W
    b64 = b.to(tl.int64)
    snapshot_slot = channel - target_start
    if SNAPSHOT:
        from_snapshot = valid & (snapshot_slot >= 0) & (snapshot_slot < K)
    else:
        from_snapshot = tl.zeros([K_POW2], dtype=tl.int1)
    from_x = valid & (from_snapshot == 0)
    return (channel, w, valid, ph, pw, p_mask, snapshot_slot, from_x, from_snapshot,
            x_ptr + b64 * stride_xb, out_ptr + b64 * stride_ob, snapshot_ptr + b64 * stride_sb)


@triton.jit
def _inside(hh, ww, H, W, p_mask):
    return p_mask & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)


@triton.jit(do_not_specialize=["K", "M", "target_start", "dilation"])
def _bottleneck_kernel(
    x_ptr,  # [B, C, H, W] block input; its target channels are written when IN_PLACE
    out_ptr,  # [B, C, H, W] output when not IN_PLACE (else unused)
    snapshot_ptr,  # [B, K, H, W] the targets' input, copied before (SNAPSHOT = IN_PLACE)
    scores_ptr,  # [B, C] fp32 router scores (or the random router's keys)
    idx_ptr,  # [B, K] int64 output: selected channels, slot order
    w_ptr,  # [B, K] fp32 output: selected scores (1 for the random router)
    # params_ptr: folded weights (fp32/fp16/bf16, computed in fp32):
    # W1 [M, K], b1 [M], W2 [M, M, 3, 3], b2 [M], W3 [K, M], b3 [K]
    params_ptr,
    C, K, M, H, W, target_start, dilation,  # M: the bottleneck width max(K // 4, 1)
    stride_xb, stride_xc, stride_xh, stride_xw,
    stride_ob, stride_oc, stride_oh, stride_ow,
    stride_sb, stride_sc, stride_sh, stride_sw,
    C_POW2: tl.constexpr, K_POW2: tl.constexpr, M_POW2: tl.constexpr, BLOCK_P: tl.constexpr,
    LEARNED: tl.constexpr, ORIGINAL: tl.constexpr, IN_PLACE: tl.constexpr, RELU: tl.constexpr,
    BLOCK_COPY: tl.constexpr,
):
    (channel, w, valid, ph, pw, p_mask, snapshot_slot, from_x, from_snapshot, x_base, out_base,
     snapshot_base) = _program_setup(scores_ptr, idx_ptr, w_ptr, x_ptr, out_ptr, snapshot_ptr, C, K, H, W,
                                     target_start, stride_xb, stride_ob, stride_sb, C_POW2, K_POW2, BLOCK_P,
                                     LEARNED, ORIGINAL, IN_PLACE)
    m = tl.arange(0, M_POW2)
    m_mask = m < M
    j = tl.arange(0, K_POW2)
    w1 = tl.load(
        params_ptr + m[:, None] * K + j[None, :], mask=m_mask[:, None] & valid[None, :], other=0.0
    ).to(tl.float32)
    b1 = tl.load(params_ptr + M * K + m, mask=m_mask, other=0.0).to(tl.float32)
    w2_at = params_ptr + M * K + M
    b2 = tl.load(w2_at + M * M * 9 + m, mask=m_mask, other=0.0).to(tl.float32)
    w3_at = w2_at + M * M * 9 + M
    w3 = tl.load(w3_at + j[:, None] * M + m[None, :], mask=valid[:, None] & m_mask[None, :], other=0.0).to(tl.float32)
    b3 = tl.load(w3_at + K * M + j, mask=valid, other=0.0).to(tl.float32)
    pair = m_mask[:, None] & m_mask[None, :]
    acc = tl.zeros([M_POW2, BLOCK_P], dtype=tl.float32)
    for tap in tl.static_range(9):
        hh = ph + (tap // 3 - 1) * dilation
        ww = pw + (tap % 3 - 1) * dilation
        inside = _inside(hh, ww, H, W, p_mask)
        xs = _load_selected(x_base, snapshot_base, channel, from_x, from_snapshot, snapshot_slot, hh, ww, inside,
                            stride_xc, stride_xh, stride_xw, stride_sc, stride_sh, stride_sw, IN_PLACE)
        h1 = relu_keep_nan(_mac(w1, xs) + b1[:, None])
        h1 = tl.where(m_mask[:, None] & inside[None, :], h1, 0.0)  # conv2 pads h1 with zeros
        w2 = tl.load(w2_at + (m[:, None] * M + m[None, :]) * 9 + tap, mask=pair, other=0.0).to(tl.float32)
        acc += _mac(w2, h1)
    h2 = tl.where(m_mask[:, None], relu_keep_nan(acc + b2[:, None]), 0.0)
    y = _mac(w3, h2) + b3[:, None]
    _fuse_epilogue(y, w, channel, valid, x_base, out_base, snapshot_base, C, K, target_start, ph, pw, p_mask,
                   stride_xc, stride_xh, stride_xw, stride_oc, stride_oh, stride_ow, stride_sc, stride_sh, stride_sw,
                   K_POW2, ORIGINAL, IN_PLACE, RELU, BLOCK_COPY)


@triton.jit(do_not_specialize=["K", "target_start", "dilation"])
def _basic_kernel(
    x_ptr,  # [B, C, H, W] block input; its target channels are written when IN_PLACE
    out_ptr,  # [B, C, H, W] output when not IN_PLACE (else unused)
    snapshot_ptr,  # [B, K, H, W] the targets' input, copied before (SNAPSHOT = IN_PLACE)
    scores_ptr,  # [B, C] fp32 router scores (or the random router's keys)
    idx_ptr,  # [B, K] int64 output: selected channels, slot order
    w_ptr,  # [B, K] fp32 output: selected scores (1 for the random router)
    params_ptr,  # folded weights (fp32/fp16/bf16, computed in fp32): W1 [K, K, 3, 3], b1 [K], W2 [K, K, 3, 3], b2 [K]
    C, K, H, W, target_start, dilation,
    stride_xb, stride_xc, stride_xh, stride_xw,
    stride_ob, stride_oc, stride_oh, stride_ow,
    stride_sb, stride_sc, stride_sh, stride_sw,
    C_POW2: tl.constexpr, K_POW2: tl.constexpr, BLOCK_P: tl.constexpr,
    LEARNED: tl.constexpr, ORIGINAL: tl.constexpr, IN_PLACE: tl.constexpr, RELU: tl.constexpr,
    BLOCK_COPY: tl.constexpr,
):
    (channel, w, valid, ph, pw, p_mask, snapshot_slot, from_x, from_snapshot, x_base, out_base,
     snapshot_base) = _program_setup(scores_ptr, idx_ptr, w_ptr, x_ptr, out_ptr, snapshot_ptr, C, K, H, W,
                                     target_start, stride_xb, stride_ob, stride_sb, C_POW2, K_POW2, BLOCK_P,
                                     LEARNED, ORIGINAL, IN_PLACE)
    j = tl.arange(0, K_POW2)
    pair = valid[:, None] & valid[None, :]
    b1 = tl.load(params_ptr + K * K * 9 + j, mask=valid, other=0.0).to(tl.float32)
    w2_at = params_ptr + K * K * 9 + K
    b2 = tl.load(w2_at + K * K * 9 + j, mask=valid, other=0.0).to(tl.float32)
    acc = tl.zeros([K_POW2, BLOCK_P], dtype=tl.float32)
    for tap2 in range(9):  # conv2's taps; conv1 is recomputed at each shifted position (both loops
        # stay loops: unrolling the 81 tap pairs costs twice the registers)
        hh2 = ph + (tap2 // 3 - 1) * dilation
        ww2 = pw + (tap2 % 3 - 1) * dilation
        acc1 = tl.zeros([K_POW2, BLOCK_P], dtype=tl.float32)
        for tap1 in range(9):
            hh = hh2 + (tap1 // 3 - 1) * dilation
            ww = ww2 + (tap1 % 3 - 1) * dilation
            inside = _inside(hh, ww, H, W, p_mask)
            xs = _load_selected(x_base, snapshot_base, channel, from_x, from_snapshot, snapshot_slot, hh, ww,
                                inside, stride_xc, stride_xh, stride_xw, stride_sc, stride_sh, stride_sw, IN_PLACE)
            w1 = tl.load(params_ptr + (j[:, None] * K + j[None, :]) * 9 + tap1, mask=pair, other=0.0).to(tl.float32)
            acc1 += _mac(w1, xs)
        inside2 = _inside(hh2, ww2, H, W, p_mask)
        h1 = tl.where(valid[:, None] & inside2[None, :], relu_keep_nan(acc1 + b1[:, None]), 0.0)
        w2 = tl.load(w2_at + (j[:, None] * K + j[None, :]) * 9 + tap2, mask=pair, other=0.0).to(tl.float32)
        acc += _mac(w2, h1)
    y = acc + b2[:, None]
    _fuse_epilogue(y, w, channel, valid, x_base, out_base, snapshot_base, C, K, target_start, ph, pw, p_mask,
                   stride_xc, stride_xh, stride_xw, stride_oc, stride_oh, stride_ow, stride_sc, stride_sh, stride_sw,
                   K_POW2, ORIGINAL, IN_PLACE, RELU, BLOCK_COPY)


@triton.jit(do_not_specialize=["K", "E", "target_start"])
def _inverted_kernel(
    x_ptr,  # [B, C, H, W] block input; its target channels are written when IN_PLACE
    out_ptr,  # [B, C, H, W] output when not IN_PLACE (else unused)
    snapshot_ptr,  # [B, K, H, W] the targets' input, copied before (SNAPSHOT = IN_PLACE)
    scores_ptr,  # [B, C] fp32 router scores (or the random router's keys)
    idx_ptr,  # [B, K] int64 output: selected channels, slot order
    w_ptr,  # [B, K] fp32 output: selected scores (1 for the random router)
    # params_ptr: folded weights (fp32/fp16/bf16, computed in fp32):
    # (HAS_EXPAND) We [E, K], be [E]; Wd [E, 3, 3], bd [E]; Wp [K, E], bp [K]
    params_ptr,
    C, K, E, H, W, target_start,  # E: the expanded width t * K (K when not HAS_EXPAND)
    stride_xb, stride_xc, stride_xh, stride_xw,
    stride_ob, stride_oc, stride_oh, stride_ow,
    stride_sb, stride_sc, stride_sh, stride_sw,
    C_POW2: tl.constexpr, K_POW2: tl.constexpr, E_BLOCK: tl.constexpr, BLOCK_P: tl.constexpr,
    LEARNED: tl.constexpr, ORIGINAL: tl.constexpr, IN_PLACE: tl.constexpr, HAS_EXPAND: tl.constexpr,
    BLOCK_COPY: tl.constexpr,
):
    (channel, w, valid, ph, pw, p_mask, snapshot_slot, from_x, from_snapshot, x_base, out_base,
     snapshot_base) = _program_setup(scores_ptr, idx_ptr, w_ptr, x_ptr, out_ptr, snapshot_ptr, C, K, H, W,
                                     target_start, stride_xb, stride_ob, stride_sb, C_POW2, K_POW2, BLOCK_P,
                                     LEARNED, ORIGINAL, IN_PLACE)
    j = tl.arange(0, K_POW2)
    if HAS_EXPAND:
        depthwise_at = params_ptr + E * K + E
    else:
        depthwise_at = params_ptr
    project_at = depthwise_at + E * 9 + E
    y = tl.zeros([K_POW2, BLOCK_P], dtype=tl.float32)
    for e0 in range(0, E, E_BLOCK):
        e = e0 + tl.arange(0, E_BLOCK)
        e_mask = e < E
        if HAS_EXPAND:
            we = tl.load(
                params_ptr + e[:, None] * K + j[None, :], mask=e_mask[:, None] & valid[None, :], other=0.0
            ).to(tl.float32)
            be = tl.load(params_ptr + E * K + e, mask=e_mask, other=0.0).to(tl.float32)
        else:
            # Without expansion the depthwise convolution reads the selected channels themselves:
            # one chunk (E_BLOCK = K_POW2) whose rows are the slots.
            we = tl.where(e[:, None] == j[None, :], 1.0, 0.0)
            be = tl.zeros([E_BLOCK], dtype=tl.float32)
        depthwise = tl.zeros([E_BLOCK, BLOCK_P], dtype=tl.float32)
        for tap in tl.static_range(9):
            hh = ph + (tap // 3 - 1)
            ww = pw + (tap % 3 - 1)
            inside = _inside(hh, ww, H, W, p_mask)
            xs = _load_selected(x_base, snapshot_base, channel, from_x, from_snapshot, snapshot_slot, hh, ww, inside,
                                stride_xc, stride_xh, stride_xw, stride_sc, stride_sh, stride_sw, IN_PLACE)
            if HAS_EXPAND:
                expanded = relu6_keep_nan(_mac(we, xs) + be[:, None])
            else:
                expanded = _mac(we, xs)
            expanded = tl.where(e_mask[:, None] & inside[None, :], expanded, 0.0)  # the depthwise conv's padding
            wd = tl.load(depthwise_at + e * 9 + tap, mask=e_mask, other=0.0).to(tl.float32)
            depthwise += wd[:, None] * expanded
        bd = tl.load(depthwise_at + E * 9 + e, mask=e_mask, other=0.0).to(tl.float32)
        depthwise = tl.where(e_mask[:, None], relu6_keep_nan(depthwise + bd[:, None]), 0.0)
        wp = tl.load(
            project_at + j[:, None] * E + e[None, :], mask=valid[:, None] & e_mask[None, :], other=0.0
        ).to(tl.float32)
        y += _mac(wp, depthwise)
    y += tl.load(project_at + K * E + j, mask=valid, other=0.0).to(tl.float32)[:, None]
    _fuse_epilogue(y, w, channel, valid, x_base, out_base, snapshot_base, C, K, target_start, ph, pw, p_mask,
                   stride_xc, stride_xh, stride_xw, stride_oc, stride_oh, stride_ow, stride_sc, stride_sh, stride_sw,
                   K_POW2, ORIGINAL, IN_PLACE, False, BLOCK_COPY)


# --------------------------------------------------------------------------------------------
# Dispatch rule, tiles and launchers
# --------------------------------------------------------------------------------------------


class FusedBlockPlan(NamedTuple):
    """Whether :func:`mod_kernels.fused_block_forward` takes a block (``fused``), and if not, why (``reason``)."""

    fused: bool
    reason: str


def fused_block_plan(kind: str, channels: int, k: int, hidden: int) -> FusedBlockPlan:
    """The documented dispatch rule of the deploy form on the triton backend.

    Args:
        kind: ``"bottleneck"``, ``"basic"`` or ``"inverted"``.
        channels: ``C``; k: channels per sample; hidden: the reduced block's inner width
            (bottleneck ``max(k // 4, 1)``, inverted residual ``t * k``, basic ``k``).

    Returns:
        ``fused=True`` when the fused kernel takes the block: ``C <= 4096`` (its top-k holds
        ``next_pow2(C)`` keys per program), ``k`` at most 32 (bottleneck, inverted residual) or 16
        (basic: two 3x3 convolutions on ``k`` channels) and an inverted residual's expanded width
        at most 192. The paper's capacities (``k = C / 64`` for ResNets, ``C / 16`` for MobileNetV2)
        are all inside. Otherwise the block runs the routing kernels, its folded convolutions and
        the fusion kernel (:func:`mod_kernels.routed_block`), and ``reason`` says which bound it passed.
    """
    if kind not in BLOCK_KINDS:
        raise ValueError(f"unknown block kind {kind!r}; expected one of {BLOCK_KINDS}")
    if channels > MAX_FUSED_CHANNELS:
        return FusedBlockPlan(False, f"C = {channels} > {MAX_FUSED_CHANNELS} channels (the per-program top-k)")
    if k > MAX_FUSED_K[kind]:
        return FusedBlockPlan(False, f"k = {k} > {MAX_FUSED_K[kind]}: the reduced {kind} block is too wide")
    if kind == "inverted" and hidden > MAX_FUSED_HIDDEN:
        return FusedBlockPlan(False, f"expanded width {hidden} > {MAX_FUSED_HIDDEN}")
    return FusedBlockPlan(True, "fused")


def params_numel(kind: str, k: int, hidden: int, has_expand: bool = True) -> int:
    """Length of the packed parameter vector of a reduced block (see :func:`pack_params`)."""
    if kind == "bottleneck":
        return hidden * k + hidden + hidden * hidden * 9 + hidden + k * hidden + k
    if kind == "basic":
        return 2 * (k * k * 9 + k)
    expand = hidden * k + hidden if has_expand else 0
    return expand + hidden * 9 + hidden + k * hidden + k


def pack_params(convs: list[tuple[Tensor, Optional[Tensor]]], dtype: torch.dtype = torch.float32) -> Tensor:
    """One ``dtype`` vector (float32, float16 or bfloat16; the kernels compute in fp32 either way)
    of the reduced block's folded convolutions, in order: each weight in its logical
    ``[out, in, kh, kw]`` order, then its bias (zeros when it has none)."""
    if dtype not in PARAM_DTYPES:
        raise TypeError(f"dtype must be one of {PARAM_DTYPES}, got {dtype}")
    parts = []
    for weight, bias in convs:
        parts.append(weight.detach().to(dtype).reshape(-1))
        parts.append(bias.detach().to(dtype).reshape(-1) if bias is not None
                     else weight.new_zeros(weight.shape[0], dtype=dtype))
    return torch.cat(parts)


@functools.lru_cache(maxsize=None)
def _pool_tiles(channels: int, hw: int, block_h: int, channels_last: bool) -> tuple[int, int, int]:
    """``(BLOCK_C, BLOCK_HW, num_warps)`` of ``_pool_hidden_kernel``: the contiguous axis gets the
    long side of a tile of at most 2048 elements (8 per thread at 8 warps: the tile's 64-bit
    pointers cost more registers than its values), and the ``[BLOCK_C, BLOCK_H]`` weight tile at
    most 8192 elements."""
    cap_c = max(16, min(128, 8192 // block_h))
    if channels_last:
        block_c = max(16, min(next_pow2(channels), cap_c))
        block_hw = max(2, min(next_pow2(hw), 2048 // block_c))
    else:
        block_hw = max(2, min(next_pow2(hw), 128))
        block_c = max(16, min(next_pow2(channels), cap_c, 2048 // block_hw))
    return block_c, block_hw, 8 if block_c * block_hw >= 2048 else 4


def _block_tiles(kind: str, k_pow2: int, hidden_pow2: int, hw: int, channels: int) -> tuple[int, int, int]:
    """``(BLOCK_P, BLOCK_COPY, num_warps)``: positions per program of the fused block kernels, the
    channels per step of their out-of-place copy, and their warps.

    Chosen from ptxas's register counts for sm_80/sm_90 (``python -m mod_models.tools.compile_check``):
    at most ~128 registers and no spills at 4 warps. The ``[k, BLOCK_P]`` gathered tiles (64-bit
    pointers) and the ``[out, in, BLOCK_P]`` multiply-accumulate tiles set the budget: bottleneck
    ``k * BLOCK_P <= 512`` and ``max(width * k, width^2) * BLOCK_P <= 4096``; basic (81 tap pairs,
    the inner nine as a loop, not unrolled) ``k^2 * BLOCK_P <= 1024``; inverted residual
    ``E_BLOCK * k * BLOCK_P <= 1024``. The out-of-place copy moves ``[BLOCK_COPY, BLOCK_P]`` tiles of
    at most 1024 elements, and the widest tiles (4096 elements: the k = 32 bottleneck) get 8 warps.
    """
    if kind == "bottleneck":
        widest = max(hidden_pow2 * k_pow2, hidden_pow2 * hidden_pow2)
        block_p = min(512 // k_pow2, 4096 // widest)
    elif kind == "basic":
        widest = k_pow2 * k_pow2
        block_p = 1024 // widest
    else:
        widest = _expand_block(hidden_pow2) * k_pow2
        block_p = 1024 // widest
    block_p = max(16, min(256, block_p, next_pow2(hw)))
    block_copy = max(2, min(next_pow2(channels), 1024 // block_p))
    return block_p, block_copy, 8 if widest * block_p >= 4096 else 4


def _expand_block(hidden_pow2: int) -> int:
    return min(16, hidden_pow2)


def check_fused_block_inputs(
    x: Tensor, kind: str, params: Tensor, k: int, hidden: int, dilation: int, fusion: str,
    fc1_weight: Optional[Tensor], fc2_weight: Optional[Tensor], scores: Optional[Tensor], has_expand: bool,
    inplace: bool = False,
) -> None:
    """Shapes, dtypes, devices and layouts of the deployed block's inputs; with ``inplace`` (an
    affine fusion, which writes its targets into ``x``), that ``x`` may be written in place."""
    check_feature_map(x, "x")
    channels = x.shape[1]
    if kind not in BLOCK_KINDS:
        raise ValueError(f"unknown block kind {kind!r}; expected one of {BLOCK_KINDS}")
    if fusion not in FUSIONS:
        raise ValueError(f"unknown fusion {fusion!r}; expected one of {FUSIONS}")
    if inplace and fusion != "original":  # "original" fusion never writes x
        check_in_place_input(x)
    for name, value, low in (("k", k, 1), ("hidden", hidden, 1), ("dilation", dilation, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if k > channels:
        raise ValueError(f"k must satisfy 1 <= k <= C = {channels}, got {k}")
    if kind == "inverted" and dilation != 1:
        raise ValueError("the inverted residual's depthwise convolution has no dilation")
    plan = fused_block_plan(kind, channels, k, hidden)
    if not plan.fused:
        raise ValueError(f"fused_block_forward does not take this block ({plan.reason}); run mod_kernels.routed_block")
    if not isinstance(params, Tensor) or params.dim() != 1 or params.dtype not in PARAM_DTYPES:
        raise TypeError("params must be the 1-D float32/float16/bfloat16 vector pack_params returns")
    expected = params_numel(kind, k, hidden, has_expand)
    if params.numel() != expected or not params.is_contiguous():
        raise ValueError(
            f"params must be a contiguous vector of {expected} floats for this block, got {params.numel()}"
        )
    learned = fc1_weight is not None or fc2_weight is not None
    if learned == (scores is not None) or (learned and (fc1_weight is None or fc2_weight is None)):
        raise ValueError("fused_block needs either both fc1_weight and fc2_weight, or scores")
    if learned:
        for name, weight in (("fc1_weight", fc1_weight), ("fc2_weight", fc2_weight)):
            if not isinstance(weight, Tensor) or weight.dim() != 2 or weight.dtype not in (
                torch.float32, torch.float16, torch.bfloat16
            ):
                raise TypeError(f"{name} must be a 2-D float32/float16/bfloat16 tensor")
        check_shape(fc1_weight, (fc1_weight.shape[0], channels), "fc1_weight")
        check_shape(fc2_weight, (channels, fc1_weight.shape[0]), "fc2_weight")
        check_same_device(x, fc1_weight=fc1_weight, fc2_weight=fc2_weight, params=params)
    else:
        if not isinstance(scores, Tensor):
            raise TypeError(f"scores must be a torch.Tensor, got {type(scores).__name__}")
        check_shape(scores, tuple(x.shape[:2]), "scores")
        check_dtype(scores, torch.float32, "scores")
        if not scores.is_contiguous():
            raise ValueError("scores must be contiguous")
        check_same_device(x, scores=scores, params=params)


def fused_block_unchecked(
    x: Tensor, kind: str, params: Tensor, k: int, hidden: int, dilation: int, fusion: str, relu: bool,
    fc1_weight: Optional[Tensor], fc2_weight: Optional[Tensor], scores: Optional[Tensor], inplace: bool,
    has_expand: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`fused_block` of checked inputs: ``(out, idx, w, scores)``."""
    if fc1_weight is not None and (fc1_weight.dtype != torch.float32 or fc2_weight.dtype != torch.float32):
        # The router kernels compute in fp32; 16-bit weight tiles would cost _router_scores_kernel its
        # registers (ptxas: 190-255, spills). The deploy form keeps its routers in fp32: no copy there.
        fc1_weight, fc2_weight = fc1_weight.float(), fc2_weight.float()
    batch, channels, height, width = x.shape
    hw = height * width
    original = fusion == "original"
    inplace = inplace and not original
    target_start = channels - k if fusion == "last_k" else 0
    snapshot = _empty_like_format(x, (batch, k, height, width)) if inplace else x
    learned = scores is None
    if learned:
        c_hidden = fc1_weight.shape[0]
        block_h = max(16, next_pow2(c_hidden))
        block_c, block_hw, num_warps = _pool_tiles(channels, hw, block_h, is_channels_last(x))
        chunk = block_hw * POOL_STEPS_PER_PROGRAM
        chunks, c_blocks = cdiv(hw, chunk), cdiv(channels, block_c)
        b_blocks = cdiv(batch, ROUTER_BLOCK_B)
        partial = _empty((batch, chunks * c_blocks, block_h), device=x.device, dtype=torch.float32)
        _pool_hidden_kernel[(b_blocks, c_blocks, chunks)](
            x, fc1_weight, partial, batch, channels, c_hidden, hw, width, chunk,
            *strides(x), fc1_weight.stride(0), fc1_weight.stride(1), 1.0 / hw,
            BLOCK_B=ROUTER_BLOCK_B, BLOCK_C=block_c, BLOCK_HW=block_hw, BLOCK_H=block_h,
            HW_FLAT=hw_is_flat(x), num_warps=num_warps,
        )
        scores = _empty((batch, channels), device=x.device, dtype=torch.float32)
        block_c2 = max(16, min(64, next_pow2(channels)))
        groups = max(1, min(cdiv(channels, block_c2), cdiv(256, b_blocks)))
        per_program = cdiv(cdiv(channels, groups), block_c2) * block_c2
        k_pow2 = max(2, next_pow2(k))
        snapshot_p = max(16, min(next_pow2(hw), 2048 // k_pow2))
        snapshot_programs = cdiv(hw, snapshot_p) if inplace else 0
        _router_scores_kernel[(b_blocks, cdiv(channels, per_program) + snapshot_programs)](
            partial, fc2_weight, scores, x, snapshot, batch, channels, c_hidden, chunks * c_blocks, per_program,
            hw, width, k, target_start, fc2_weight.stride(0), fc2_weight.stride(1), *strides(x), *strides(snapshot),
            BLOCK_B=ROUTER_BLOCK_B, BLOCK_C=block_c2, BLOCK_H=block_h, SNAPSHOT=inplace, K_POW2=k_pow2,
            SNAPSHOT_P=snapshot_p, HW_FLAT=hw_is_flat(x, snapshot), num_warps=4,
        )
    elif inplace:
        snapshot.copy_(x.narrow(1, target_start, k))
    idx = _empty((batch, k), device=x.device, dtype=torch.int64)
    w = _empty((batch, k), device=x.device, dtype=torch.float32)
    out = x if inplace else _empty_like_format(x, tuple(x.shape))
    k_pow2 = max(2, next_pow2(k))  # tl.topk needs at least two slots
    hidden_pow2 = next_pow2(hidden)
    block_p, block_copy, num_warps = _block_tiles(kind, k_pow2, hidden_pow2, hw, channels)
    common = dict(
        C_POW2=max(2, next_pow2(channels)), K_POW2=k_pow2, BLOCK_P=block_p, LEARNED=learned,
        ORIGINAL=original, IN_PLACE=inplace, BLOCK_COPY=block_copy, num_warps=num_warps,
    )
    grid = (batch, cdiv(hw, block_p))
    tensors = (x, out, snapshot, scores, idx, w, params)
    layout = (*strides(x), *strides(out), *strides(snapshot))
    if kind == "bottleneck":
        _bottleneck_kernel[grid](
            *tensors, channels, k, hidden, height, width, target_start, dilation, *layout,
            M_POW2=hidden_pow2, RELU=relu, **common,
        )
    elif kind == "basic":
        _basic_kernel[grid](
            *tensors, channels, k, height, width, target_start, dilation, *layout, RELU=relu, **common,
        )
    else:
        _inverted_kernel[grid](
            *tensors, channels, k, hidden, height, width, target_start, *layout,
            E_BLOCK=_expand_block(hidden_pow2) if has_expand else k_pow2, HAS_EXPAND=has_expand, **common,
        )
    if inplace:
        torch.autograd.graph.increment_version(x)
    return out, idx, w, scores


@torch.library.custom_op("mod_kernels::fused_block", mutates_args=())
def fused_block_op(
    x: Tensor, kind: str, params: Tensor, k: int, hidden: int, dilation: int, fusion: str, relu: bool,
    fc1_weight: Optional[Tensor], fc2_weight: Optional[Tensor], scores: Optional[Tensor], has_expand: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return fused_block_unchecked(
        x, kind, params, k, hidden, dilation, fusion, relu, fc1_weight, fc2_weight, scores, False, has_expand
    )


@fused_block_op.register_fake
def _(x, kind, params, k, hidden, dilation, fusion, relu, fc1_weight, fc2_weight, scores, has_expand):
    batch, channels = x.shape[:2]
    return (
        empty_like_format(x, tuple(x.shape)),
        x.new_empty((batch, k), dtype=torch.int64),
        x.new_empty((batch, k), dtype=torch.float32),
        x.new_empty((batch, channels), dtype=torch.float32),
    )


@torch.library.custom_op("mod_kernels::fused_block_", mutates_args=("x",))
def fused_block_inplace_op(
    x: Tensor, kind: str, params: Tensor, k: int, hidden: int, dilation: int, fusion: str, relu: bool,
    fc1_weight: Optional[Tensor], fc2_weight: Optional[Tensor], scores: Optional[Tensor], has_expand: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    _, idx, w, new_scores = fused_block_unchecked(
        x, kind, params, k, hidden, dilation, fusion, relu, fc1_weight, fc2_weight, scores, True, has_expand
    )
    return idx, w, new_scores


@fused_block_inplace_op.register_fake
def _(x, kind, params, k, hidden, dilation, fusion, relu, fc1_weight, fc2_weight, scores, has_expand):
    batch, channels = x.shape[:2]
    return (
        x.new_empty((batch, k), dtype=torch.int64),
        x.new_empty((batch, k), dtype=torch.float32),
        x.new_empty((batch, channels), dtype=torch.float32),
    )


def fused_block_dispatch(
    x: Tensor, kind: str, params: Tensor, k: int, hidden: int, dilation: int, fusion: str, relu: bool,
    fc1_weight: Optional[Tensor], fc2_weight: Optional[Tensor], scores: Optional[Tensor], inplace: bool,
    has_expand: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Checked inputs to the launches: directly in eager mode, through the custom ops while a
    compiler traces. ``"original"`` fusion is never in place (see the module docstring)."""
    inplace = inplace and fusion != "original"
    if runs_eagerly(x):
        return fused_block_unchecked(
            x, kind, params, k, hidden, dilation, fusion, relu, fc1_weight, fc2_weight, scores, inplace, has_expand
        )
    if inplace:
        idx, w, new_scores = fused_block_inplace_op(
            x, kind, params, k, hidden, dilation, fusion, relu, fc1_weight, fc2_weight, scores, has_expand
        )
        return x, idx, w, new_scores
    return fused_block_op(
        x, kind, params, k, hidden, dilation, fusion, relu, fc1_weight, fc2_weight, scores, has_expand
    )
