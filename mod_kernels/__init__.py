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

from torch import Tensor

from ._utils import INTERPRETER, check_device_supported
from .fused_route_pack import check_route_pack_inputs, check_select_pack_inputs, route_pack_op, select_pack_op
from .fused_scale_fuse import ACTIVATIONS, FUSIONS, check_fuse_inputs, scale_fuse_inplace_op, scale_fuse_op

__all__ = ["INTERPRETER", "RoutedChannels", "check_device_supported", "route_pack", "scale_fuse"]


class RoutedChannels(NamedTuple):
    """Result of :func:`route_pack`.

    Attributes:
        xs: ``[B, k, H, W]`` packed channels, ``x``'s dtype and memory format.
        idx: ``[B, k]`` int64 selected channels, slot order (descending score, ties to lower index).
        w: ``[B, k]`` float32 selected scores (ones for the random router).
        selected_slot: ``[B, C]`` int32 slot of each channel, -1 where not selected.
    """

    xs: Tensor
    idx: Tensor
    w: Tensor
    selected_slot: Tensor


def route_pack(
    x: Tensor,
    k: int,
    *,
    fc1_weight: Optional[Tensor] = None,
    fc2_weight: Optional[Tensor] = None,
    scores: Optional[Tensor] = None,
) -> RoutedChannels:
    """Select and pack the top-``k`` channels of each sample.

    Either the learned router (``fc1_weight: [C_h, C]``, ``fc2_weight: [C, C_h]``; scores are
    ``sigmoid(fc2 relu(fc1 mean_hw(x)))`` in fp32) or given keys (``scores: [B, C]`` fp32, the
    random router; ``w`` is then all ones).

    Args:
        x: ``[B, C, H, W]`` float32/float16/bfloat16, NCHW or channels_last.
        k: channels per sample, ``1 <= k <= C``.

    Returns:
        :class:`RoutedChannels`. Differentiable w.r.t. ``x`` (through ``xs`` and, for the learned
        router, the pooling) and the router weights (through ``w``).
    """
    check_device_supported(x.device)
    learned = fc1_weight is not None or fc2_weight is not None
    if learned == (scores is not None) or (learned and (fc1_weight is None or fc2_weight is None)):
        raise ValueError("route_pack needs either both fc1_weight and fc2_weight, or scores")
    # Checked here, before dispatch: a tensor on another device would otherwise pick another kernel.
    if learned:
        check_route_pack_inputs(x, fc1_weight, fc2_weight, k)
        xs, idx, w, slot, *_ = route_pack_op(x, fc1_weight, fc2_weight, k)
    else:
        check_select_pack_inputs(x, scores, k)
        xs, idx, w, slot = select_pack_op(x, scores, k)
    return RoutedChannels(xs, idx, w, slot)


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
