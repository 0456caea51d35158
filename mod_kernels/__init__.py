"""Fused Triton kernels for MoD blocks.

Public API (used by :class:`mod_models.blocks.MoDBlock` when its backend resolves to ``"triton"``):

* ``route_pack(x, k, *, fc1_weight=None, fc2_weight=None, scores=None) -> RoutedChannels``
  pools ``x: [B, C, H, W]``, runs the router MLP (or takes given ``scores: [B, C]`` fp32 for the
  random router, with ``w = 1``), selects the stable top-k and packs ``xs: [B, k, H, W]``.
  ``RoutedChannels`` has fields ``xs``, ``idx [B, k] int64``, ``w [B, k] fp32`` and
  ``selected_slot [B, C] int32`` (slot of each channel, -1 if unselected). Differentiable
  w.r.t. ``x``, the router weights (through ``w``) and ``xs``.
* ``scale_fuse(x, y, w, idx, selected_slot, *, fusion, activation, inplace) -> out``
  ``out[b, t[b, j]] = act(x[b, t[b, j]] + w[b, j] * y[b, j])``; every other channel is ``x``.
  Differentiable w.r.t. ``x``, ``y`` and ``w``.
* ``check_device_supported(device)`` raises a clear error where the kernels cannot run.

(Kernels land in the kernel issue; until then every entry point raises.)
"""

from typing import NamedTuple

from torch import Tensor


class RoutedChannels(NamedTuple):
    xs: Tensor
    idx: Tensor
    w: Tensor
    selected_slot: Tensor


def check_device_supported(device) -> None:
    raise RuntimeError("backend 'triton': the fused kernels are not built yet; use backend='reference'")


def route_pack(x, k, *, fc1_weight=None, fc2_weight=None, scores=None) -> RoutedChannels:
    check_device_supported(x.device)


def scale_fuse(x, y, w, idx, selected_slot, *, fusion, activation, inplace) -> Tensor:
    check_device_supported(x.device)
