"""Fused Triton kernels for MoD blocks.

One file per fused op:

* :mod:`mod_kernels.fused_route_pack`: pool + router MLP + stable top-k + channel gather, and backward.
* :mod:`mod_kernels.fused_scale_fuse`: the score-scaled scatter-add residual (+ ReLU), and backward.

Each op is a ``torch.library.custom_op`` (``mod_kernels::...``) with a fake implementation and
an autograd formula, so ``torch.compile(fullgraph=True)`` traces models that use them and CUDA
graphs can capture them (no host syncs, nothing on the host depends on the data).

On CUDA tensors the kernels run compiled. On CPU tensors they run under Triton's interpreter,
which must be switched on (``TRITON_INTERPRET=1``) before this package is imported; otherwise
they raise. They never fall back to another implementation.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from ._utils import INTERPRETER, check_device_supported, runs_eagerly
from .fused_route_pack import (
    RoutePackFunction,
    affine_targets,
    check_route_pack_inputs,
    check_select_pack_inputs,
    route_and_pack,
)
from .fused_scale_fuse import (
    ACTIVATIONS,
    FUSIONS,
    ScaleFuseRoutedFunction,
    check_fuse_inputs,
    fuse_copy_unchecked,
    fuse_inplace_unchecked,
    scale_fuse_inplace_op,
    scale_fuse_op,
)

__all__ = ["INTERPRETER", "RoutedChannels", "check_device_supported", "fuse_routed", "route_pack", "scale_fuse"]


class RoutedChannels(NamedTuple):
    """Result of :func:`route_pack`.

    Attributes:
        xs: ``[B, k, H, W]`` packed channels, ``x``'s dtype and memory format.
        idx: ``[B, k]`` int64 selected channels, slot order (descending score, ties to lower index).
        w: ``[B, k]`` float32 selected scores (ones for the random router).
        selected_slot: ``[B, C]`` int32 slot of each channel, -1 where not selected.
        x_pass: ``x`` itself (a view), for :func:`fuse_routed` only.
        target_carrier: the fusion targets' input (a view of ``x``, or ``xs`` for ``"original"``),
            for :func:`fuse_routed` only.
        fusion: the fusion target this routing was made for.
    """

    xs: Tensor
    idx: Tensor
    w: Tensor
    selected_slot: Tensor
    x_pass: Tensor
    target_carrier: Tensor
    fusion: str


def route_pack(
    x: Tensor,
    k: int,
    *,
    fc1_weight: Optional[Tensor] = None,
    fc2_weight: Optional[Tensor] = None,
    scores: Optional[Tensor] = None,
    fusion: str = "first_k",
) -> RoutedChannels:
    """Select and pack the top-``k`` channels of each sample.

    Either the learned router (``fc1_weight: [C_h, C]``, ``fc2_weight: [C, C_h]``; scores are
    ``sigmoid(fc2 relu(fc1 mean_hw(x)))`` in fp32) or given keys (``scores: [B, C]`` fp32, the
    random router; ``w`` is then all ones).

    Args:
        x: ``[B, C, H, W]`` float32/float16/bfloat16, NCHW or channels_last.
        k: channels per sample, ``1 <= k <= C``.
        fusion: the fusion target :func:`fuse_routed` will add into (``"first_k"``, ``"last_k"``,
            ``"original"``).

    Returns:
        :class:`RoutedChannels`. Differentiable w.r.t. ``x`` (through ``xs``, the pooling of the
        learned router and, via :func:`fuse_routed`, the residual) and the router weights (through
        ``w``). Its backward writes the gradient of ``x`` in one pass over the fusion's output
        gradient.
    """
    check_device_supported(x.device)
    learned = fc1_weight is not None or fc2_weight is not None
    if learned == (scores is not None) or (learned and (fc1_weight is None or fc2_weight is None)):
        raise ValueError("route_pack needs either both fc1_weight and fc2_weight, or scores")
    if fusion not in FUSIONS:
        raise ValueError(f"unknown fusion {fusion!r}; expected one of {FUSIONS}")
    # Checked here, before dispatch: a tensor on another device would otherwise pick another kernel.
    if learned:
        check_route_pack_inputs(x, fc1_weight, fc2_weight, k)
    else:
        check_select_pack_inputs(x, scores, k)
    if _needs_autograd(x, fc1_weight, fc2_weight) or not runs_eagerly(x):
        x_pass, target_carrier, xs, w, idx, slot = RoutePackFunction.apply(x, fc1_weight, fc2_weight, scores, k, fusion)
    else:  # inference: the same launches without the autograd.Function's host overhead
        xs, idx, w, slot, _ = route_and_pack(x, fc1_weight, fc2_weight, scores, k)
        x_pass = x
        target_carrier = None if fusion == "original" else affine_targets(x, k, fusion)
    if fusion == "original":
        target_carrier = xs
    return RoutedChannels(xs, idx, w, slot, x_pass, target_carrier, fusion)


def _needs_autograd(*tensors: Optional[Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def fuse_routed(routed: RoutedChannels, y: Tensor, *, activation: str = "relu", inplace: bool = False) -> Tensor:
    """The MoD residual for a :func:`route_pack` result: ``scale_fuse`` with ``routed``'s fusion,
    whose backward only reads the k target channels and leaves the dense input gradient to the
    routing's single pass.

    Args:
        routed: the routing of the block input ``x``.
        y: ``[B, k, H, W]`` reduced-block output.
        activation: ``"relu"`` or ``"none"``.
        inplace: write into ``x`` (only when autograd does not need it) and return it.

    Returns:
        ``[B, C, H, W]`` in ``x``'s dtype and memory format.
    """
    if not isinstance(routed, RoutedChannels):
        raise TypeError(f"routed must be the RoutedChannels that route_pack returned, got {type(routed).__name__}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")
    x_pass = routed.x_pass
    check_fuse_inputs(x_pass, y, routed.w, routed.idx, routed.selected_slot, routed.fusion, inplace)
    relu = activation == "relu"
    if inplace:
        if runs_eagerly(x_pass):
            fuse_inplace_unchecked(x_pass, y, routed.w, routed.idx, routed.fusion, relu)
        else:
            scale_fuse_inplace_op(x_pass, y, routed.w, routed.idx, routed.selected_slot, routed.fusion, relu)
        return x_pass
    if not _needs_autograd(x_pass, y, routed.w) and runs_eagerly(x_pass):
        return fuse_copy_unchecked(x_pass, y, routed.w, routed.selected_slot, routed.fusion, relu)
    return ScaleFuseRoutedFunction.apply(
        x_pass, routed.target_carrier, y, routed.w, routed.idx, routed.selected_slot, routed.fusion, relu
    )


def scale_fuse(
    x: Tensor,
    y: Tensor,
    w: Tensor,
    idx: Tensor,
    selected_slot: Tensor,
    *,
    fusion: str = "first_k",
    activation: str = "relu",
    inplace: bool = False,
) -> Tensor:
    """``out[b, t[b, j]] = act(x[b, t[b, j]] + w[b, j] * y[b, j])``; other channels equal ``x``.

    Args:
        x: ``[B, C, H, W]`` block input.
        y: ``[B, k, H, W]`` reduced-block output (any of float32/float16/bfloat16).
        w: ``[B, k]`` float32 selected scores.
        idx: ``[B, k]`` int64 selected channels; selected_slot: ``[B, C]`` int32 (from :func:`route_pack`).
        fusion: ``"first_k"``, ``"last_k"`` or ``"original"`` (targets ``j``, ``C - k + j``, ``idx``).
        activation: ``"relu"`` or ``"none"``.
        inplace: write into ``x`` (touching only the k target channels) and return it; only for
            inputs autograd does not need.

    Returns:
        ``[B, C, H, W]`` in ``x``'s dtype and memory format.
    """
    check_device_supported(x.device)
    if fusion not in FUSIONS:
        raise ValueError(f"unknown fusion {fusion!r}; expected one of {FUSIONS}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")
    check_fuse_inputs(x, y, w, idx, selected_slot, fusion, inplace)
    relu = activation == "relu"
    if inplace:
        scale_fuse_inplace_op(x, y, w, idx, selected_slot, fusion, relu)
        return x
    return scale_fuse_op(x, y, w, idx, selected_slot, fusion, relu)
