"""Fused scale + fuse (the scatter-add residual) and its backward.

``out[b, t[b, j]] = act(x[b, t[b, j]] + w[b, j] * y[b, j])``, every other channel of ``out``
equals ``x``. The target ``t[b, j]`` is ``j`` (``"first_k"``), ``C - k + j`` (``"last_k"``) or
``idx[b, j]`` (``"original"``); targets are distinct within a sample, so no kernel needs atomics
and every result is bitwise deterministic. ``act`` is ReLU (ResNet blocks) or nothing
(MobileNetV2), a constexpr switch.

Forward kernels:

* ``_fuse_inplace_kernel`` writes into ``x`` and touches only the ``k`` target channels
  (used when autograd does not need ``x``): grid ``(B, k / BLOCK_K, HW / BLOCK_HW)``.
* ``_fuse_copy_kernel`` writes a new tensor in one pass over ``x``: grid ``(B, C / BLOCK_C, HW / BLOCK_HW)``.

Backward kernels:

* ``_fuse_backward_slots_kernel``: ``grad_y[b, j] = g[b, t] * act'(out[b, t]) * w[b, j]``,
  ``grad_w[b, j] = sum_hw g[b, t] * act'(out[b, t]) * y[b, j]`` and (for the MoD blocks' paired
  path) the targets' own gradient ``g[b, t] * act'``; it reads the k target channels only.
* ``_fuse_backward_input_kernel`` (standalone :func:`scale_fuse` with ReLU): ``grad_x = g`` with
  the target channels masked where ``out <= 0`` (``torch.relu``'s rule: a NaN output passes its
  gradient). Without an activation ``grad_x`` is ``g`` itself.

The fused ReLU is ``torch.relu`` exactly: NaN stays NaN forward, and its gradient passes.

Two autograd paths share these kernels. The standalone op ``mod_kernels::scale_fuse`` has a
self-contained backward (the dense ``grad_x`` above). :class:`ScaleFuseRoutedFunction`, used by
the MoD blocks through :func:`mod_kernels.fuse_routed`, leaves the dense input gradient to the
routing's single pass (:class:`~mod_kernels.fused_route_pack.RoutePackFunction`), so a block's
backward touches the full feature map exactly twice: read ``g``, write ``grad_x``.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from mod_models.functional import check_index_rows

from ._utils import (
    cdiv,
    check_backward_once,
    check_dtype,
    check_feature_map,
    check_in_place_input,
    check_same_device,
    check_shape,
    dense_tiles,
    empty_like_format,
    hw_is_flat,
    is_channels_last,
    relu_grad,
    relu_keep_nan,
    runs_eagerly,
    spatial_offset,
    strides,
)

FUSIONS = ("first_k", "last_k", "original")
ACTIVATIONS = ("relu", "none")


@triton.jit
def _slot_targets(idx_ptr, b, j, j_mask, K, target_start, GATHER_TARGETS: tl.constexpr):
    """Target channel of each slot ``j`` of sample ``b``: ``idx[b, j]`` or ``target_start + j``."""
    if GATHER_TARGETS:
        return tl.load(idx_ptr + b * K + j, mask=j_mask, other=0).to(tl.int32)
    else:
        return target_start + j


@triton.jit
def _channel_slots(slot_ptr, b, c, c_mask, C, K, target_start, GATHER_TARGETS: tl.constexpr):
    """Slot whose result lands in each channel ``c`` of sample ``b`` (-1: none)."""
    if GATHER_TARGETS:
        return tl.load(slot_ptr + b * C + c, mask=c_mask, other=-1)
    else:
        return tl.where((c >= target_start) & (c < target_start + K), c - target_start, -1)


@triton.jit(do_not_specialize=["K", "target_start", "stride_wb", "stride_wk"])
def _fuse_inplace_kernel(
    x_ptr,  # [B, C, H, W] input, updated in place at the target channels
    y_ptr,  # [B, K, H, W] reduced-block output
    w_ptr,  # [B, K] fp32 selected scores
    idx_ptr,  # [B, K] int64 selected channels (GATHER_TARGETS: fusion "original")
    C, K, HW, W, target_start,  # target_start: first target channel (first_k: 0, last_k: C - K)
    stride_xb, stride_xc, stride_xh, stride_xw,
    stride_yb, stride_yc, stride_yh, stride_yw,
    stride_wb, stride_wk,
    GATHER_TARGETS: tl.constexpr, RELU: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_HW: tl.constexpr, HW_FLAT: tl.constexpr,
):
    b = tl.program_id(0)
    j = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    hw = tl.program_id(2) * BLOCK_HW + tl.arange(0, BLOCK_HW)
    j_mask = j < K
    mask = j_mask[:, None] & (hw < HW)[None, :]
    target = _slot_targets(idx_ptr, b, j, j_mask, K, target_start, GATHER_TARGETS)
    x_at = x_ptr + b.to(tl.int64) * stride_xb + target[:, None] * stride_xc
    x_at += spatial_offset(hw, W, stride_xh, stride_xw, HW_FLAT)[None, :]
    y_at = y_ptr + b.to(tl.int64) * stride_yb + j[:, None] * stride_yc
    y_at += spatial_offset(hw, W, stride_yh, stride_yw, HW_FLAT)[None, :]
    scale = tl.load(w_ptr + b * stride_wb + j * stride_wk, mask=j_mask, other=0.0)
    fused = tl.load(x_at, mask=mask, other=0.0).to(tl.float32)
    fused += scale[:, None] * tl.load(y_at, mask=mask, other=0.0).to(tl.float32)
    if RELU:
        fused = relu_keep_nan(fused)
    tl.store(x_at, fused.to(x_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["K", "target_start", "stride_wb", "stride_wk"])
def _fuse_copy_kernel(
    x_ptr,  # [B, C, H, W] input
    y_ptr,  # [B, K, H, W] reduced-block output
    w_ptr,  # [B, K] fp32 selected scores
    slot_ptr,  # [B, C] int32 slot of each channel (GATHER_TARGETS: fusion "original")
    out_ptr,  # [B, C, H, W] output
    C, K, HW, W, target_start,  # target_start: first target channel (first_k: 0, last_k: C - K)
    stride_xb, stride_xc, stride_xh, stride_xw,
    stride_yb, stride_yc, stride_yh, stride_yw,
    stride_ob, stride_oc, stride_oh, stride_ow,
    stride_wb, stride_wk,
    GATHER_TARGETS: tl.constexpr, RELU: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, HW_FLAT: tl.constexpr,
):
    b = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    hw = tl.program_id(2) * BLOCK_HW + tl.arange(0, BLOCK_HW)
    c_mask = c < C
    mask = c_mask[:, None] & (hw < HW)[None, :]
    slot = _channel_slots(slot_ptr, b, c, c_mask, C, K, target_start, GATHER_TARGETS)
    is_target = (slot >= 0)[:, None] & mask
    x_in = tl.load(
        x_ptr + b.to(tl.int64) * stride_xb + c[:, None] * stride_xc
        + spatial_offset(hw, W, stride_xh, stride_xw, HW_FLAT)[None, :],
        mask=mask, other=0.0,
    )
    y_in = tl.load(
        y_ptr + b.to(tl.int64) * stride_yb + slot[:, None] * stride_yc
        + spatial_offset(hw, W, stride_yh, stride_yw, HW_FLAT)[None, :],
        mask=is_target, other=0.0,
    )
    scale = tl.load(w_ptr + b * stride_wb + slot * stride_wk, mask=c_mask & (slot >= 0), other=0.0)
    fused = x_in.to(tl.float32) + scale[:, None] * y_in.to(tl.float32)
    if RELU:
        fused = relu_keep_nan(fused)
    result = tl.where(is_target, fused.to(out_ptr.dtype.element_ty), x_in)
    out_at = out_ptr + b.to(tl.int64) * stride_ob + c[:, None] * stride_oc
    tl.store(out_at + spatial_offset(hw, W, stride_oh, stride_ow, HW_FLAT)[None, :], result, mask=mask)


@triton.jit(do_not_specialize=["K", "target_start", "stride_wb", "stride_wk"])
def _fuse_backward_slots_kernel(
    grad_out_ptr,  # [B, C, H, W]
    out_ptr,  # [B, C, H, W] forward output (RELU: its sign is the ReLU mask)
    y_ptr,  # [B, K, H, W]
    w_ptr,  # [B, K] fp32
    idx_ptr,  # [B, K] int64 (GATHER_TARGETS: fusion "original")
    grad_y_ptr,  # [B, K, H, W] output
    grad_w_ptr,  # [B, K] fp32 output, contiguous
    grad_target_ptr,  # [B, K, H, W] output: gradient of the target channels' input (WRITE_TARGET_GRAD)
    C, K, HW, W, target_start,  # target_start: first target channel (first_k: 0, last_k: C - K)
    stride_gb, stride_gc, stride_gh, stride_gw,
    stride_ob, stride_oc, stride_oh, stride_ow,
    stride_yb, stride_yc, stride_yh, stride_yw,
    stride_dyb, stride_dyc, stride_dyh, stride_dyw,
    stride_wb, stride_wk,
    GATHER_TARGETS: tl.constexpr, RELU: tl.constexpr, WRITE_TARGET_GRAD: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_HW: tl.constexpr, HW_FLAT: tl.constexpr,
):
    b = tl.program_id(0)
    j = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    j_mask = j < K
    target = _slot_targets(idx_ptr, b, j, j_mask, K, target_start, GATHER_TARGETS)
    scale = tl.load(w_ptr + b * stride_wb + j * stride_wk, mask=j_mask, other=0.0)
    b64 = b.to(tl.int64)
    acc = tl.zeros([BLOCK_K, BLOCK_HW], dtype=tl.float32)
    for hw_start in range(0, HW, BLOCK_HW):
        hw = hw_start + tl.arange(0, BLOCK_HW)
        mask = j_mask[:, None] & (hw < HW)[None, :]
        grad = tl.load(
            grad_out_ptr + b64 * stride_gb + target[:, None] * stride_gc
            + spatial_offset(hw, W, stride_gh, stride_gw, HW_FLAT)[None, :],
            mask=mask, other=0.0,
        ).to(tl.float32)
        if RELU:
            out = tl.load(
                out_ptr + b64 * stride_ob + target[:, None] * stride_oc
                + spatial_offset(hw, W, stride_oh, stride_ow, HW_FLAT)[None, :],
                mask=mask, other=0.0,
            )
            grad = relu_grad(grad, out)
        y = tl.load(
            y_ptr + b64 * stride_yb + j[:, None] * stride_yc
            + spatial_offset(hw, W, stride_yh, stride_yw, HW_FLAT)[None, :],
            mask=mask, other=0.0,
        ).to(tl.float32)
        acc += grad * y
        grad_y_at = grad_y_ptr + b64 * stride_dyb + j[:, None] * stride_dyc
        grad_y_at += spatial_offset(hw, W, stride_dyh, stride_dyw, HW_FLAT)[None, :]
        tl.store(grad_y_at, (grad * scale[:, None]).to(grad_y_ptr.dtype.element_ty), mask=mask)
        if WRITE_TARGET_GRAD:
            # grad_target has y's shape and memory format, so it shares y's strides.
            grad_target_at = grad_target_ptr + b64 * stride_dyb + j[:, None] * stride_dyc
            grad_target_at += spatial_offset(hw, W, stride_dyh, stride_dyw, HW_FLAT)[None, :]
            tl.store(grad_target_at, grad.to(grad_target_ptr.dtype.element_ty), mask=mask)
    tl.store(grad_w_ptr + b * K + j, tl.sum(acc, axis=1), mask=j_mask)


@triton.jit(do_not_specialize=["K", "target_start"])
def _fuse_backward_input_kernel(
    grad_out_ptr,  # [B, C, H, W]
    out_ptr,  # [B, C, H, W] forward output
    slot_ptr,  # [B, C] int32 (GATHER_TARGETS: fusion "original")
    grad_x_ptr,  # [B, C, H, W] output
    C, K, HW, W, target_start,  # target_start: first target channel (first_k: 0, last_k: C - K)
    stride_gb, stride_gc, stride_gh, stride_gw,
    stride_ob, stride_oc, stride_oh, stride_ow,
    stride_xb, stride_xc, stride_xh, stride_xw,
    GATHER_TARGETS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, HW_FLAT: tl.constexpr,
):
    b = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    hw = tl.program_id(2) * BLOCK_HW + tl.arange(0, BLOCK_HW)
    c_mask = c < C
    mask = c_mask[:, None] & (hw < HW)[None, :]
    slot = _channel_slots(slot_ptr, b, c, c_mask, C, K, target_start, GATHER_TARGETS)
    is_target = (slot >= 0)[:, None] & mask
    b64 = b.to(tl.int64)
    grad = tl.load(
        grad_out_ptr + b64 * stride_gb + c[:, None] * stride_gc
        + spatial_offset(hw, W, stride_gh, stride_gw, HW_FLAT)[None, :],
        mask=mask, other=0.0,
    )
    out = tl.load(
        out_ptr + b64 * stride_ob + c[:, None] * stride_oc
        + spatial_offset(hw, W, stride_oh, stride_ow, HW_FLAT)[None, :],
        mask=is_target, other=1.0,
    )
    grad = relu_grad(grad, out).to(grad_x_ptr.dtype.element_ty)
    grad_x_at = grad_x_ptr + b64 * stride_xb + c[:, None] * stride_xc
    tl.store(grad_x_at + spatial_offset(hw, W, stride_xh, stride_xw, HW_FLAT)[None, :], grad, mask=mask)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def check_fuse_inputs(
    x: Tensor, y: Tensor, w: Tensor, idx: Tensor, selected_slot: Tensor, fusion: str, inplace: bool = False
) -> None:
    """Shapes, dtypes, devices and layouts of the fusion's inputs (no values are read)."""
    check_feature_map(x, "x")
    batch, channels, height, width = x.shape
    for name, t in (("idx", idx), ("w", w), ("selected_slot", selected_slot)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if idx.dim() != 2 or idx.shape[0] != batch:
        raise ValueError(f"idx must have shape [B, k] = [{batch}, k], got {tuple(idx.shape)}")
    check_dtype(idx, torch.int64, "idx")
    k = idx.shape[1]
    if not 1 <= k <= channels:
        raise ValueError(f"idx selects {k} channels per sample; it must be 1 <= k <= C = {channels}")
    check_feature_map(y, "y")
    check_shape(y, (batch, k, height, width), "y")
    check_shape(w, (batch, k), "w")
    check_dtype(w, torch.float32, "w")
    check_shape(selected_slot, (batch, channels), "selected_slot")
    check_dtype(selected_slot, torch.int32, "selected_slot")
    if not selected_slot.is_contiguous() or not idx.is_contiguous():
        raise ValueError("idx and selected_slot must be contiguous (as route_pack returns them)")
    check_same_device(x, y=y, w=w, idx=idx, selected_slot=selected_slot)
    if fusion not in FUSIONS:
        raise ValueError(f"unknown fusion {fusion!r}; expected one of {FUSIONS}")
    if inplace:
        check_in_place_input(x)


def check_fuse_selection(idx: Tensor, selected_slot: Tensor, channels: int) -> None:
    """The values of a selection the kernels index with: ``idx [B, k]`` distinct channels in
    ``[0, C)`` per row, and ``selected_slot [B, C]`` its inverse (``slot[b, idx[b, j]] == j``,
    -1 on every other channel). Reads the values: a device sync on CUDA, so the MoD blocks, whose
    selections come from the routing kernels, skip it."""
    check_index_rows(idx, channels, "idx")
    k = idx.shape[1]
    if bool(((selected_slot < -1) | (selected_slot >= k)).any()):
        raise ValueError(
            f"selected_slot holds slots outside [-1, {k}): min {int(selected_slot.min())}, "
            f"max {int(selected_slot.max())}"
        )
    slots = torch.arange(k, device=idx.device, dtype=selected_slot.dtype).expand_as(idx)
    agrees = (selected_slot.gather(1, idx) == slots).all(dim=1) & ((selected_slot >= 0).sum(dim=1) == k)
    if not bool(agrees.all()):
        row = int((~agrees).nonzero()[0, 0])
        raise ValueError(
            f"selected_slot does not match idx in row {row}: selected_slot must be -1 except "
            f"selected_slot[b, idx[b, j]] = j (idx row {row}: {idx[row].tolist()})"
        )


def check_not_in_place_on_autograd_inputs(op: str, **tensors: Tensor) -> None:
    """In place is only for inputs autograd does not need: a write into them would lose gradients."""
    needing = [name for name, t in tensors.items() if t.requires_grad]
    if torch.is_grad_enabled() and needing:
        raise ValueError(
            f"{op}: in place (inplace=True) is only for inputs autograd does not need, but "
            f"{', '.join(needing)} require{'s' if len(needing) == 1 else ''} grad; pass inplace=False, "
            "or run under torch.no_grad()"
        )


def _target_start(fusion: str, channels: int, k: int) -> int:
    """First target channel of the affine fusions (unused by ``"original"``)."""
    return channels - k if fusion == "last_k" else 0


def _check_activation(activation: str) -> bool:
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")
    return activation == "relu"


def launch_fuse_inplace(x: Tensor, y: Tensor, w: Tensor, idx: Tensor, selected_slot: Tensor, fusion: str,
                        relu: bool) -> None:
    """Write ``act(x[t] + w * y)`` into the ``k`` target channels of ``x``."""
    check_fuse_inputs(x, y, w, idx, selected_slot, fusion, inplace=True)
    fuse_inplace_unchecked(x, y, w, idx, fusion, relu)


def fuse_inplace_unchecked(x: Tensor, y: Tensor, w: Tensor, idx: Tensor, fusion: str, relu: bool) -> None:
    """:func:`launch_fuse_inplace` without its input checks (callers have checked). Bumps ``x``'s
    version counter: a tensor autograd saved before this write then fails loudly in backward."""
    batch, channels, height, width = x.shape
    k = y.shape[1]
    block_k, block_hw, num_warps = dense_tiles(k, height * width, is_channels_last(x))
    grid = (batch, cdiv(k, block_k), cdiv(height * width, block_hw))
    _fuse_inplace_kernel[grid](
        x, y, w, idx, channels, k, height * width, width, _target_start(fusion, channels, k),
        *strides(x), *strides(y), w.stride(0), w.stride(1),
        GATHER_TARGETS=fusion == "original", RELU=relu, BLOCK_K=block_k, BLOCK_HW=block_hw,
        HW_FLAT=hw_is_flat(x, y), num_warps=num_warps,
    )
    torch.autograd.graph.increment_version(x)


def launch_fuse_copy(x: Tensor, y: Tensor, w: Tensor, idx: Tensor, selected_slot: Tensor, fusion: str,
                     relu: bool) -> Tensor:
    """A new ``[B, C, H, W]`` tensor (``x``'s dtype and memory format): ``x`` with the targets fused."""
    check_fuse_inputs(x, y, w, idx, selected_slot, fusion)
    return fuse_copy_unchecked(x, y, w, selected_slot, fusion, relu)


def fuse_copy_unchecked(x: Tensor, y: Tensor, w: Tensor, selected_slot: Tensor, fusion: str, relu: bool) -> Tensor:
    """:func:`launch_fuse_copy` without its input checks (callers have checked)."""
    batch, channels, height, width = x.shape
    k = y.shape[1]
    out = empty_like_format(x, tuple(x.shape))
    block_c, block_hw, num_warps = dense_tiles(channels, height * width, is_channels_last(x))
    grid = (batch, cdiv(channels, block_c), cdiv(height * width, block_hw))
    _fuse_copy_kernel[grid](
        x, y, w, selected_slot, out, channels, k, height * width, width, _target_start(fusion, channels, k),
        *strides(x), *strides(y), *strides(out), w.stride(0), w.stride(1),
        GATHER_TARGETS=fusion == "original", RELU=relu, BLOCK_C=block_c, BLOCK_HW=block_hw,
        HW_FLAT=hw_is_flat(x, y, out), num_warps=num_warps,
    )
    return out


def launch_fuse_backward_slots(
    grad_out: Tensor, out: Tensor, y: Tensor, w: Tensor, idx: Tensor, fusion: str, relu: bool,
    target_dtype: Optional[torch.dtype] = None,
) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """``(grad_y [B, k, H, W] in y's dtype/format, grad_w [B, k] fp32, grad_target)``.

    ``grad_target = grad_out[t] * act'(out[t])``, the gradient of the target channels' input, is
    written (in ``target_dtype``, y's memory format) only when ``target_dtype`` is given.
    """
    batch, channels, height, width = grad_out.shape
    k = y.shape[1]
    grad_y = empty_like_format(y, tuple(y.shape))
    grad_w = torch.empty((batch, k), device=y.device, dtype=torch.float32)
    grad_target = None if target_dtype is None else empty_like_format(y, tuple(y.shape), dtype=target_dtype)
    channels_last = is_channels_last(y)
    block_k, block_hw, _ = dense_tiles(k, height * width, channels_last)
    # Five tile-sized tensors stay live across the H x W loop: keep them at 8 elements per thread
    # (2048-element tiles, 8 warps), shortening the non-contiguous side first.
    while block_k * block_hw > 2048:
        if (block_hw > 2 and channels_last) or block_k == 2:
            block_hw //= 2
        else:
            block_k //= 2
    num_warps = 8 if block_k * block_hw >= 2048 else 4
    _fuse_backward_slots_kernel[(batch, cdiv(k, block_k))](
        grad_out, out, y, w, idx, grad_y, grad_w, grad_target if grad_target is not None else grad_y,
        channels, k, height * width, width, _target_start(fusion, channels, k),
        *strides(grad_out), *strides(out), *strides(y), *strides(grad_y), w.stride(0), w.stride(1),
        GATHER_TARGETS=fusion == "original", RELU=relu, WRITE_TARGET_GRAD=grad_target is not None,
        BLOCK_K=block_k, BLOCK_HW=block_hw, HW_FLAT=hw_is_flat(grad_out, out, y, grad_y), num_warps=num_warps,
    )
    return grad_y, grad_w, grad_target


def launch_fuse_backward_input(grad_out: Tensor, out: Tensor, selected_slot: Tensor, k: int, fusion: str) -> Tensor:
    """``grad_x``: ``grad_out`` with the target channels zeroed where ``out <= 0`` (ReLU fusion)."""
    batch, channels, height, width = grad_out.shape
    grad_x = empty_like_format(out, tuple(out.shape), dtype=grad_out.dtype)
    block_c, block_hw, num_warps = dense_tiles(channels, height * width, is_channels_last(out))
    grid = (batch, cdiv(channels, block_c), cdiv(height * width, block_hw))
    _fuse_backward_input_kernel[grid](
        grad_out, out, selected_slot, grad_x, channels, k, height * width, width, _target_start(fusion, channels, k),
        *strides(grad_out), *strides(out), *strides(grad_x),
        GATHER_TARGETS=fusion == "original", BLOCK_C=block_c, BLOCK_HW=block_hw,
        HW_FLAT=hw_is_flat(grad_out, out, grad_x), num_warps=num_warps,
    )
    return grad_x


# --------------------------------------------------------------------------------------------
# torch.library ops and autograd
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("mod_kernels::scale_fuse", mutates_args=())
def scale_fuse_op(x: Tensor, y: Tensor, w: Tensor, idx: Tensor, selected_slot: Tensor, fusion: str,
                  relu: bool) -> Tensor:
    return launch_fuse_copy(x, y, w, idx, selected_slot, fusion, relu)


@scale_fuse_op.register_fake
def _(x, y, w, idx, selected_slot, fusion, relu):
    return empty_like_format(x, tuple(x.shape))


@torch.library.custom_op("mod_kernels::scale_fuse_", mutates_args=("x",))
def scale_fuse_inplace_op(
    x: Tensor, y: Tensor, w: Tensor, idx: Tensor, selected_slot: Tensor, fusion: str, relu: bool
) -> None:
    launch_fuse_inplace(x, y, w, idx, selected_slot, fusion, relu)


@scale_fuse_inplace_op.register_fake
def _(x, y, w, idx, selected_slot, fusion, relu):
    return None


@torch.library.custom_op("mod_kernels::scale_fuse_backward_slots", mutates_args=())
def scale_fuse_backward_slots_op(
    grad_out: Tensor, out: Tensor, y: Tensor, w: Tensor, idx: Tensor, fusion: str, relu: bool,
    target_dtype: Optional[torch.dtype],
) -> tuple[Tensor, Tensor, Tensor]:
    grad_y, grad_w, grad_target = launch_fuse_backward_slots(grad_out, out, y, w, idx, fusion, relu, target_dtype)
    return grad_y, grad_w, grad_target if grad_target is not None else y.new_empty(0)


@scale_fuse_backward_slots_op.register_fake
def _(grad_out, out, y, w, idx, fusion, relu, target_dtype):
    grad_target = y.new_empty(0) if target_dtype is None else empty_like_format(y, tuple(y.shape), dtype=target_dtype)
    return empty_like_format(y, tuple(y.shape)), w.new_empty(tuple(w.shape), dtype=torch.float32), grad_target


@torch.library.custom_op("mod_kernels::scale_fuse_backward_input", mutates_args=())
def scale_fuse_backward_input_op(grad_out: Tensor, out: Tensor, selected_slot: Tensor, k: int, fusion: str) -> Tensor:
    return launch_fuse_backward_input(grad_out, out, selected_slot, k, fusion)


@scale_fuse_backward_input_op.register_fake
def _(grad_out, out, selected_slot, k, fusion):
    return empty_like_format(out, tuple(out.shape), dtype=grad_out.dtype)


def _scale_fuse_setup_context(ctx, inputs, output):
    _, y, w, idx, selected_slot, fusion, relu = inputs
    ctx.save_for_backward(output if relu else None, y, w, idx, selected_slot)
    ctx.fusion, ctx.relu = fusion, relu


def _scale_fuse_backward(ctx, grad_out):
    check_backward_once("scale_fuse")
    out, y, w, idx, selected_slot = ctx.saved_tensors
    needs_x, needs_y, needs_w = ctx.needs_input_grad[:3]
    grad_x = grad_y = grad_w = None
    if needs_y or needs_w:
        grad_y, grad_w, _ = scale_fuse_backward_slots_op(
            grad_out, out if ctx.relu else grad_out, y, w, idx, ctx.fusion, ctx.relu, None
        )
    if needs_x:
        if ctx.relu:
            grad_x = scale_fuse_backward_input_op(grad_out, out, selected_slot, y.shape[1], ctx.fusion)
        else:
            grad_x = grad_out
    return grad_x, grad_y if needs_y else None, grad_w if needs_w else None, None, None, None, None


scale_fuse_op.register_autograd(_scale_fuse_backward, setup_context=_scale_fuse_setup_context)


class ScaleFuseRoutedFunction(torch.autograd.Function):
    """Scale + fuse paired with :class:`~mod_kernels.fused_route_pack.RoutePackFunction`.

    Inputs ``(x_pass, target_carrier, y, w, idx, selected_slot, fusion, relu)`` with ``x_pass`` and
    ``target_carrier`` from the routing (``target_carrier`` is ``xs`` for ``"original"``). The
    backward reads only the k target channels: it returns ``grad_out`` itself for ``x_pass`` (no
    copy; the routing's backward replaces its target channels) and ``grad_out[t] * act'`` for the
    carrier, beside ``grad_y`` and ``grad_w``.
    """

    @staticmethod
    def forward(ctx, x_pass, target_carrier, y, w, idx, selected_slot, fusion, relu):
        if runs_eagerly(x_pass):
            out = fuse_copy_unchecked(x_pass, y, w, selected_slot, fusion, relu)
        else:
            out = scale_fuse_op(x_pass, y, w, idx, selected_slot, fusion, relu)
        ctx.save_for_backward(out if relu else None, y, w, idx)
        ctx.fusion, ctx.relu, ctx.dtype = fusion, relu, x_pass.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        check_backward_once("fuse_routed")
        out, y, w, idx = ctx.saved_tensors
        needs_x, _, needs_y, needs_w = ctx.needs_input_grad[:4]
        backward_slots = launch_fuse_backward_slots if runs_eagerly(grad_out) else scale_fuse_backward_slots_op
        grad_y, grad_w, grad_target = backward_slots(
            grad_out, out if ctx.relu else grad_out, y, w, idx, ctx.fusion, ctx.relu, ctx.dtype if needs_x else None
        )
        return (
            grad_out if needs_x else None,
            grad_target if needs_x else None,
            grad_y if needs_y else None,
            grad_w if needs_w else None,
            None, None, None, None,
        )
