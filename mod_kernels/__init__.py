"""Fused Triton kernels for MoD blocks.

One file per fused op (its kernels, their launchers and its autograd Function):

* :mod:`mod_kernels.fused_route_pack`: pool + router MLP + stable top-k + channel gather, and backward.
* :mod:`mod_kernels.fused_scale_fuse`: the score-scaled scatter-add residual (+ ReLU), and backward.
* :mod:`mod_kernels.fused_block`: a whole deployed MoD block (folded batch norms) at inference in
  three launches: pool with the router's first layer, the router's second layer, and one kernel
  for top-k, gather, the reduced convolutions, scaling and fusion.

:mod:`mod_kernels.ops` holds the public, input-checking entry points over them (re-exported here):
:func:`route_pack`, :func:`fuse_routed`, :func:`routed_block`, :func:`scale_fuse`,
:func:`fused_block_forward`.

Each op is a ``torch.library.custom_op`` (``mod_kernels::...``) with a fake implementation and
an autograd formula, so ``torch.compile(fullgraph=True)`` traces models that use them and CUDA
graphs can capture them (no host syncs, nothing on the host depends on the data).

On CUDA tensors the kernels run compiled. On CPU tensors they run under Triton's interpreter,
which must be switched on (``TRITON_INTERPRET=1``) before this package is imported; otherwise
they raise. They never fall back to another implementation.
"""

from ._utils import INTERPRETER, check_device_supported
from .fused_block import FusedBlockPlan, fused_block_plan, pack_params
from .ops import RoutedChannels, fuse_routed, fused_block_forward, route_pack, routed_block, scale_fuse

__all__ = [
    "INTERPRETER",
    "FusedBlockPlan",
    "RoutedChannels",
    "check_device_supported",
    "fuse_routed",
    "fused_block_forward",
    "fused_block_plan",
    "pack_params",
    "route_pack",
    "routed_block",
    "scale_fuse",
]
