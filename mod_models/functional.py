"""The MoD method as small functional reference ops.

CNN Mixture-of-Depths (R. Cakaj, J. Mehnert, B. Yang, "CNN Mixture-of-Depths", ACCV 2024,
arXiv:2409.17016), as this project implements it. A MoD block's input is ``x: [B, C, H, W]``;
with capacity ``c``, it processes ``k = C // c`` channels per sample (``k >= 1``):

1. **Router** (squeeze-excitation style, both layers without bias, computed in fp32 even under
   autocast): ``z = mean_hw(x) [B, C]``, ``h = relu(z W1^T)`` with ``W1: [C_h, C]``,
   ``C_h = max(C // 16, 1)``, and scores ``s = sigmoid(h W2^T) [B, C]`` with ``W2: [C, C_h]``.
   No auxiliary loss, noise or temperature. The paper's random-routing baseline replaces ``s``
   by uniform random keys and scales by 1.
2. **Selection**: per sample the ``k`` highest scores, in slot order of a stable descending sort
   (``torch.sort(s, descending=True, stable=True)[:, :k]``): higher score first, ties to the
   lower channel index, NaN above every number (so every row gets ``k`` distinct in-range
   channels whatever the input holds). ``idx: [B, k]``, ``w = s.gather(1, idx)``. The selection
   is not differentiated; gradients reach the router through ``w``.
3. **Pack**: ``xs[b, j] = x[b, idx[b, j]]`` ``[B, k, H, W]``.
4. **Reduced block** ``f_k`` on ``xs`` (stride 1, no downsample; convolutions without bias, each
   followed by batch norm): ResNet Bottleneck 1x1 ``k -> max(k // 4, 1)``, ReLU, 3x3, ReLU,
   1x1 ``-> k``; ResNet BasicBlock 3x3 ``k -> k``, ReLU, 3x3; MobileNetV2 inverted residual 1x1
   ``k -> 6k``, ReLU6, 3x3 depthwise, ReLU6, 1x1 ``-> k`` (linear bottleneck).
5. **Scale and fuse**: ``y = f_k(xs) * w``; each slot ``j`` is added into a target channel
   ``t[b, j]`` and every other channel passes through: ``out[b, t] = act(x[b, t] + y[b, j])``.
   Targets: ``"first_k"`` (``t = j``, the paper's default), ``"last_k"`` (``t = C - k + j``) or
   ``"original"`` (``t = idx[b, j]``, each processed channel goes home). ``act`` is ReLU for the
   ResNet blocks (as after a standard residual add) and none for MobileNetV2. Targets are
   distinct within a sample, so the fusion needs no atomics and is deterministic.

Shapes never depend on the data (``k`` is fixed), so a MoD network keeps a static graph. While a
graph is captured (``torch.compile``, ``torch.export``, ONNX export) the same values are computed
with ops that the graph compilers take: the fusion writes its targets with one ``index_put``, and an
ONNX export spells the stable sort as ``TopK`` and the gather as an advanced index (see
:func:`scale_and_fuse`, :func:`select_top_k`, :func:`gather_channels`).

This module is the single source of truth for what a MoD block computes. The modules in
:mod:`mod_models.blocks`, the tests and the benchmarks import these functions; the fused Triton
kernels in :mod:`mod_kernels` are checked against them.

Shapes: ``x`` is a feature map ``[B, C, H, W]``; ``k = C // capacity`` channels are processed per
sample; ``idx`` and ``w`` are ``[B, k]``.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

FUSIONS = ("first_k", "last_k", "original")
ACTIVATIONS = ("relu", "none")
ROUTERS = ("learned", "random")
ROUTER_REDUCTION = 16
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def router_hidden_channels(channels: int, reduction: int = ROUTER_REDUCTION) -> int:
    """Width ``C_h = max(C // r, 1)`` of the router's hidden layer."""
    return max(channels // reduction, 1)


def selected_channels(channels: int, capacity: int) -> int:
    """``k = C // capacity``, validated: the number of channels a MoD block processes."""
    if isinstance(capacity, bool) or not isinstance(capacity, int):
        raise TypeError(f"capacity must be an int, got {type(capacity).__name__}")
    if isinstance(channels, bool) or not isinstance(channels, int):
        raise TypeError(f"channels must be an int, got {type(channels).__name__}")
    if channels < 1:
        raise ValueError(f"channels must be >= 1, got {channels}")
    if capacity < 1:
        raise ValueError(f"capacity must be >= 1, got {capacity}")
    k = channels // capacity
    if k < 1:
        raise ValueError(
            f"k = channels // capacity = {channels} // {capacity} = 0: a MoD block must "
            f"process at least one channel; use capacity <= {channels}"
        )
    return k


def check_fusion(fusion: str) -> str:
    if fusion not in FUSIONS:
        raise ValueError(f"unknown fusion {fusion!r}; expected one of {FUSIONS}")
    return fusion


def check_activation(activation: str) -> str:
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")
    return activation


def check_router(router: str) -> str:
    if router not in ROUTERS:
        raise ValueError(f"unknown router {router!r}; expected one of {ROUTERS}")
    return router


def check_feature_map(x: Tensor, channels: int | None = None, name: str = "x") -> None:
    """Raise a clear error unless ``x`` is a floating ``[B, C, H, W]`` tensor (with ``C == channels``)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} must have shape [B, C, H, W] (rank 4), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if channels is not None and x.shape[1] != channels:
        raise ValueError(f"{name} has {x.shape[1]} channels but the block was built for {channels}")
    if min(x.shape) < 1:
        raise ValueError(f"{name} must not be empty, got shape {tuple(x.shape)}")


def is_channels_last(x: Tensor) -> bool:
    """True when ``x`` is laid out NHWC (and that differs from NCHW). Under ``torch.func.vmap``,
    which cannot report layouts, False: the layout only picks how the reference gathers."""
    if torch._C._functorch.is_batchedtensor(x):
        return False
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def fp32_region(device_type: str):
    """A context that switches autocast off where it is on (entering a no-op context is cheaper)."""
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


def router_scores(x: Tensor, fc1_weight: Tensor, fc2_weight: Tensor) -> Tensor:
    """SE-style channel scores ``s = sigmoid(W2 relu(W1 mean_hw(x)))`` in fp32.

    Args:
        x: ``[B, C, H, W]`` feature map, any floating dtype.
        fc1_weight: ``[C_h, C]`` first router layer (no bias).
        fc2_weight: ``[C, C_h]`` second router layer (no bias).

    Returns:
        ``[B, C]`` float32 scores in ``[0, 1]``. Computed in fp32 even under autocast.
    """
    with fp32_region(x.device.type):
        pooled = x.mean(dim=(2, 3), dtype=torch.float32)
        hidden = F.relu(F.linear(pooled, fc1_weight.float()))
        return torch.sigmoid(F.linear(hidden, fc2_weight.float()))


def random_scores(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """``[B, C]`` float32 uniform random keys for the random-routing baseline."""
    return torch.rand(x.shape[:2], device=x.device, dtype=torch.float32, generator=generator)


def select_top_k(scores: Tensor, k: int) -> Tensor:
    """Indices ``[B, k]`` (int64) of the ``k`` highest scores of each row.

    Slot order is a stable descending sort: higher score first, ties to the lower
    channel index. NaN ranks above every number (as in :func:`torch.sort`), so
    every row still gets ``k`` distinct, in-range indices. In an ONNX export the sort is
    spelled :func:`stable_sort_via_topk` (the same order; ONNX has no stable sort).
    """
    if exporting_onnx():
        return stable_sort_via_topk(scores, dim=1, descending=True)[1][:, :k]
    return torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]


def stable_sort_via_topk(
    x: Tensor, *, stable: Optional[bool] = None, dim: int = -1, descending: bool = False
) -> tuple[Tensor, Tensor]:
    """``torch.sort(x, dim=dim, descending=descending, stable=True)`` as ``topk`` over the whole axis:
    the ONNX form of the reference sort (the signature of ``aten.sort.stable``).

    ONNX ``TopK`` is specified to order equal values by lower index first (ONNX Runtime also
    puts NaN first when ``largest=1``), which is the stable sort's order. Only for graphs that
    become ONNX: eager ``torch.topk`` does not promise this tie order.
    """
    length = x.shape[dim]
    result = torch.topk(x, length, dim=dim, largest=descending, sorted=True)
    return result.values, result.indices


def exporting_onnx() -> bool:
    """True while ``torch.onnx.export`` traces the caller (either exporter); never under ``torch.compile``."""
    if torch.compiler.is_compiling() and not torch.compiler.is_exporting():
        return False
    onnx = sys.modules.get("torch.onnx")  # not imported: no export is running (and none is imported here)
    if onnx is None:
        return False
    if onnx.is_in_onnx_export():
        return True
    # Dynamo answers False for torch.onnx.is_in_onnx_export() (torch 2.14.1), so when the exporter falls
    # back to torch.export(strict=True) only its own flag tells.
    flags = sys.modules.get("torch.onnx._internal.exporter._flags")
    return bool(getattr(flags, "_is_onnx_exporting", False))


def capturing_graph() -> bool:
    """True while a graph is captured from the caller: ``torch.compile``, ``torch.export`` or an ONNX export."""
    return torch.compiler.is_compiling() or exporting_onnx()


def gather_channels(x: Tensor, idx: Tensor) -> Tensor:
    """Pack the selected channels: ``xs[b, j] = x[b, idx[b, j]]``.

    Args:
        x: ``[B, C, H, W]``, NCHW or channels_last.
        idx: ``[B, k]`` int64 channel indices.

    Returns:
        ``[B, k, H, W]`` in the memory format of ``x`` (no extra copy).
    """
    batch, _, height, width = x.shape
    k = idx.shape[1]
    if exporting_onnx():  # whole [H, W] planes by (sample, channel): one GatherND, no expanded index
        return x[batch_rows(idx), idx]
    if is_channels_last(x):
        nhwc = x.permute(0, 2, 3, 1)
        packed = nhwc.gather(3, idx[:, None, None, :].expand(batch, height, width, k))
        return packed.permute(0, 3, 1, 2)
    return x.gather(1, idx[:, :, None, None].expand(batch, k, height, width))


def batch_rows(idx: Tensor) -> Tensor:
    """``rows[b, j] = b``, ``[B, k]``: with ``idx`` the advanced index of ``(sample, channel)`` pairs."""
    batch, k = idx.shape
    return torch.arange(batch, device=idx.device)[:, None].expand(batch, k)


def check_index_rows(idx: Tensor, channels: int, name: str = "idx") -> None:
    """Raise ``ValueError`` unless every row of ``idx: [B, k]`` holds distinct channels in ``[0, channels)``.

    Reads the values (a device sync on CUDA); shapes and dtypes are the caller's to check.
    """
    if idx.numel() == 0:
        return
    if bool(((idx < 0) | (idx >= channels)).any()):
        raise ValueError(
            f"{name} holds channel indices outside [0, {channels}): min {int(idx.min())}, max {int(idx.max())}"
        )
    ordered = idx.sort(dim=1).values
    repeated = (ordered[:, 1:] == ordered[:, :-1]).any(dim=1)
    if bool(repeated.any()):
        row = int(repeated.nonzero()[0, 0])
        raise ValueError(f"{name} row {row} selects a channel twice: {idx[row].tolist()}")


def fusion_targets(idx: Tensor, channels: int, fusion: str) -> Tensor:
    """Target channel ``t[b, j]`` that slot ``j``'s result is added to, ``[B, k]`` int64."""
    check_fusion(fusion)
    k = idx.shape[1]
    if fusion == "original":
        return idx
    start = 0 if fusion == "first_k" else channels - k
    return torch.arange(start, start + k, device=idx.device).expand_as(idx)


def scale_and_fuse(
    x: Tensor,
    y: Tensor,
    w: Tensor,
    idx: Tensor,
    *,
    fusion: str = "first_k",
    activation: str = "relu",
    inplace: bool = False,
) -> Tensor:
    """``out[b, t[b, j]] = act(x[b, t[b, j]] + w[b, j] * y[b, j])``; every other channel is ``x``.

    Args:
        x: ``[B, C, H, W]`` block input.
        y: ``[B, k, H, W]`` output of the reduced conv block (any floating dtype).
        w: ``[B, k]`` float32 selected scores.
        idx: ``[B, k]`` int64 selected channels (used by ``fusion="original"``).
        fusion: ``"first_k"``, ``"last_k"`` or ``"original"``.
        activation: ``"relu"`` (ResNet blocks) or ``"none"`` (MobileNetV2).
        inplace: write into ``x`` (only legal when autograd does not need ``x``).

    Returns:
        ``[B, C, H, W]`` in ``x``'s dtype and memory format; ``x`` itself when ``inplace``.
    """
    check_fusion(fusion)
    check_activation(activation)
    batch, channels, height, width = x.shape
    k = idx.shape[1]
    start = 0 if fusion == "first_k" else channels - k
    x_target = gather_channels(x, idx) if fusion == "original" else x.narrow(1, start, k)
    compute_dtype = torch.promote_types(x.dtype, torch.float32)  # fp32, or fp64 for fp64 input
    fused = torch.addcmul(x_target.to(compute_dtype), y.to(compute_dtype), w[:, :, None, None].to(compute_dtype))
    if activation == "relu":
        fused = fused.relu_()
    fused = fused.to(x.dtype)

    if capturing_graph():
        # One index_put of the k target planes per sample (ONNX: one ScatterND). Not the slice
        # copy below: with Inductor's freezing (torch 2.14.1), a slice_scatter that two or more
        # convolutions read fails to compile ("FakeTensorUpdater cannot recompute metadata for
        # tracked _inductor_lowering_function nodes"). The same values land in the same places.
        targets = (batch_rows(idx), fusion_targets(idx, channels, fusion))
        return x.index_put_(targets, fused) if inplace else x.index_put(targets, fused)
    out = x if inplace else x.clone(memory_format=torch.preserve_format)
    if fusion == "original":
        out.scatter_(1, idx[:, :, None, None].expand(batch, k, height, width), fused)
    else:
        out.narrow(1, start, k).copy_(fused)
    return out


def may_write_in_place(x: Tensor) -> bool:
    """True when ``x`` can legally be updated element by element: it owns its memory densely
    (NCHW or channels_last; not an expanded or overlapping view) and is not an inference tensor
    outside inference mode (PyTorch forbids updating those)."""
    dense = x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)
    if torch.compiler.is_compiling():  # the traced graph's mutation is PyTorch's to check
        return dense
    return dense and not (x.is_inference() and not torch.is_inference_mode_enabled())


def autograd_needs(*tensors: Tensor) -> bool:
    """True when the current op will be recorded by autograd."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
