"""The public ops of :mod:`mod_kernels`: checked entry points over the fused kernels.

* :func:`route_pack` / :func:`fuse_routed`: the training path's two halves (routing and packing,
  then the score-scaled residual), each differentiable.
* :func:`routed_block`: a whole MoD block around a reduced block ``f_k`` given as a callable.
* :func:`scale_fuse`: the residual alone, for a selection made elsewhere.
* :func:`fused_block_forward`: a deployed block (folded batch norms) in three launches.

Each function checks its inputs (a ``ValueError``/``TypeError`` naming the problem), then calls the
launchers of the one-file-per-op modules (:mod:`~mod_kernels.fused_route_pack`,
:mod:`~mod_kernels.fused_scale_fuse`, :mod:`~mod_kernels.fused_block`).
"""


from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor

from ._utils import check_device_supported, check_plain_autograd, runs_eagerly
from .fused_block import check_fused_block_inputs, fused_block_dispatch
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
    check_fuse_selection,
    check_not_in_place_on_autograd_inputs,
    fuse_copy_unchecked,
    fuse_inplace_unchecked,
    scale_fuse_inplace_op,
    scale_fuse_op,
)


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
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    check_device_supported(x.device)
    check_plain_autograd("route_pack", x, fc1_weight, fc2_weight, scores)
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

    The selection in ``routed`` is validated (in eager mode; a device sync on CUDA) before any
    kernel indexes with it. :func:`routed_block` runs the same fusion on a routing it made itself
    and skips that check.

    Args:
        routed: the routing of the block input ``x``.
        y: ``[B, k, H, W]`` reduced-block output.
        activation: ``"relu"`` or ``"none"``.
        inplace: write into ``x`` and return it; only for inputs autograd does not need
            (a ``ValueError`` otherwise).

    Returns:
        ``[B, C, H, W]`` in ``x``'s dtype and memory format.
    """
    if not isinstance(routed, RoutedChannels):
        raise TypeError(f"routed must be the RoutedChannels that route_pack returned, got {type(routed).__name__}")
    _check_activation_and_mode(activation, inplace)
    check_fuse_inputs(routed.x_pass, y, routed.w, routed.idx, routed.selected_slot, routed.fusion, inplace)
    check_plain_autograd("fuse_routed", routed.x_pass, y, routed.w)
    if inplace:
        check_not_in_place_on_autograd_inputs("fuse_routed", x=routed.x_pass, y=y, w=routed.w)
    if runs_eagerly(routed.x_pass):
        check_fuse_selection(routed.idx, routed.selected_slot, routed.x_pass.shape[1])
    return _fuse_routed(routed, y, activation == "relu", inplace)


def _check_activation_and_mode(activation: str, inplace: bool) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be True or False, got {inplace!r}")


def _fuse_routed(routed: RoutedChannels, y: Tensor, relu: bool, inplace: bool) -> Tensor:
    """:func:`fuse_routed` of checked inputs."""
    x_pass = routed.x_pass
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


def routed_block(
    x: Tensor,
    k: int,
    process: Callable[[Tensor], Tensor],
    *,
    fc1_weight: Optional[Tensor] = None,
    fc2_weight: Optional[Tensor] = None,
    scores: Optional[Tensor] = None,
    fusion: str = "first_k",
    activation: str = "relu",
    inplace: bool = False,
) -> tuple[Tensor, Tensor]:
    """A whole MoD block around ``process`` (its reduced conv block ``f_k``) on the fused kernels:
    :func:`route_pack`, ``y = process(xs)``, :func:`fuse_routed`. The selection never leaves this
    function before the fusion has used it, so it needs no validation (no device sync).

    Args:
        x: ``[B, C, H, W]`` block input.
        k: channels per sample.
        process: ``[B, k, H, W] -> [B, k, H, W]``.
        fc1_weight, fc2_weight, scores: the router, as for :func:`route_pack`.
        fusion, activation: as for :func:`fuse_routed`.
        inplace: write into ``x`` (a ``ValueError`` where autograd needs ``x``).

    Returns:
        ``(out [B, C, H, W], idx [B, k] int64)``.
    """
    _check_activation_and_mode(activation, inplace)
    routed = route_pack(x, k, fc1_weight=fc1_weight, fc2_weight=fc2_weight, scores=scores, fusion=fusion)
    y = process(routed.xs)
    check_fuse_inputs(routed.x_pass, y, routed.w, routed.idx, routed.selected_slot, fusion, inplace)
    check_plain_autograd("routed_block", y)
    if inplace:
        check_not_in_place_on_autograd_inputs("routed_block", x=routed.x_pass, y=y, w=routed.w)
    return _fuse_routed(routed, y, activation == "relu", inplace), routed.idx


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
            inputs autograd does not need, and an ``x`` that is dense (not an expanded or
            overlapping view) and not an inference tensor outside inference mode.

    Returns:
        ``[B, C, H, W]`` in ``x``'s dtype and memory format.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    check_device_supported(x.device)
    check_plain_autograd("scale_fuse", x, y, w)
    if fusion not in FUSIONS:
        raise ValueError(f"unknown fusion {fusion!r}; expected one of {FUSIONS}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be True or False, got {inplace!r}")
    check_fuse_inputs(x, y, w, idx, selected_slot, fusion, inplace)
    if inplace:
        check_not_in_place_on_autograd_inputs("scale_fuse", x=x, y=y, w=w)
    if runs_eagerly(x):
        check_fuse_selection(idx, selected_slot, x.shape[1])
    relu = activation == "relu"
    if inplace:
        scale_fuse_inplace_op(x, y, w, idx, selected_slot, fusion, relu)
        return x
    return scale_fuse_op(x, y, w, idx, selected_slot, fusion, relu)


def fused_block_forward(
    x: Tensor,
    kind: str,
    params: Tensor,
    k: int,
    hidden: int,
    *,
    dilation: int = 1,
    fusion: str = "first_k",
    activation: str = "relu",
    fc1_weight: Optional[Tensor] = None,
    fc2_weight: Optional[Tensor] = None,
    scores: Optional[Tensor] = None,
    inplace: bool = False,
    has_expand: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A whole MoD block with folded batch norms at inference, in three kernel launches
    (:mod:`mod_kernels.fused_block`). Inference only: inputs autograd needs are an error.

    Args:
        x: ``[B, C, H, W]`` float32/float16/bfloat16, NCHW or channels_last (any strides).
        kind: ``"bottleneck"`` (1x1 k->hidden, ReLU, 3x3, ReLU, 1x1 ->k), ``"basic"`` (3x3 k->k, ReLU,
            3x3) or ``"inverted"`` (1x1 k->hidden, ReLU6, 3x3 depthwise, ReLU6, 1x1 ->k).
        params: :func:`pack_params` of the reduced block's folded convolutions (float32, float16 or
            bfloat16; the kernels compute in fp32 either way).
        k: channels per sample; hidden: the inner width (bottleneck width, expanded width, or k).
        dilation: of the 3x3 convolutions (ResNet blocks).
        fusion: ``"first_k"``, ``"last_k"`` or ``"original"``; activation: ``"relu"`` or ``"none"``.
        fc1_weight, fc2_weight: the learned router (``[C_h, C]``, ``[C, C_h]``), or
        scores: ``[B, C]`` fp32 keys of the random router (``w`` is then all ones).
        inplace: write the targets into ``x`` and return it (affine fusions; ``"original"`` fusion
            always returns a new tensor); ``x`` must then be dense (not an expanded or overlapping
            view) and not an inference tensor outside inference mode (a ``ValueError`` otherwise).
        has_expand: the inverted residual has its expansion layer (``expand_ratio != 1``).

    Returns:
        ``(out [B, C, H, W], idx [B, k] int64, w [B, k] fp32, scores [B, C] fp32)``.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    check_device_supported(x.device)
    check_plain_autograd("fused_block_forward", x, fc1_weight, fc2_weight, scores)
    _check_activation_and_mode(activation, inplace)
    check_fused_block_inputs(
        x, kind, params, k, hidden, dilation, fusion, fc1_weight, fc2_weight, scores, has_expand, inplace
    )
    if _needs_autograd(x, params, fc1_weight, fc2_weight, scores):
        raise ValueError(
            "fused_block_forward is inference only, but an input requires grad; run under torch.no_grad() / "
            "torch.inference_mode(), or use the training path (routed_block)"
        )
    return fused_block_dispatch(
        x, kind, params, k, hidden, dilation, fusion, activation == "relu", fc1_weight, fc2_weight, scores,
        inplace, has_expand,
    )
