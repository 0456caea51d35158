"""Fused kernels for MoD blocks: Triton kernels for CUDA, and a native CPU kernel for the deploy form.

One file per fused op (its kernels, their launchers and its autograd Function):

* :mod:`mod_kernels.fused_route_pack`: pool + router MLP + stable top-k + channel gather, and backward.
* :mod:`mod_kernels.fused_scale_fuse`: the score-scaled scatter-add residual (+ ReLU), and backward.
* :mod:`mod_kernels.fused_block`: a whole deployed MoD block (folded batch norms) at inference in
  three launches: pool with the router's first layer, the router's second layer, and one kernel
  for top-k, gather, the reduced convolutions, scaling and fusion.
* :mod:`mod_kernels.native_block`: the same deployed block on the CPU in one call of a C++
  extension built at first use (no Triton needed; the ``"native"`` backend).

:mod:`mod_kernels.ops` holds the public, input-checking entry points over the Triton kernels
(re-exported here): :func:`route_pack`, :func:`fuse_routed`, :func:`routed_block`,
:func:`scale_fuse`, :func:`fused_block_forward`.

Each op is a ``torch.library.custom_op`` (``mod_kernels::...``) with a fake implementation and
an autograd formula, so ``torch.compile(fullgraph=True)`` traces models that use them and CUDA
graphs can capture them (no host syncs, nothing on the host depends on the data).

On CUDA tensors the Triton kernels run compiled. On CPU tensors they run under Triton's
interpreter, which must be switched on (``TRITON_INTERPRET=1``) before the Triton modules are
imported; otherwise they raise. They never fall back to another implementation.

Where Triton is not installed, importing this package still works (so does
:mod:`mod_kernels.native_block`); the names re-exported from the Triton modules then raise the
``ImportError`` that importing Triton raised.
"""

# Every name re-exported here comes from a Triton module.
__all__ = [
    "INTERPRETER", "check_device_supported", "FusedBlockPlan", "fused_block_plan", "pack_params",
    "RoutedChannels", "fuse_routed", "fused_block_forward", "route_pack", "routed_block", "scale_fuse",
]

try:
    from ._utils import INTERPRETER, check_device_supported
    from .fused_block import FusedBlockPlan, fused_block_plan, pack_params
    from .ops import RoutedChannels, fuse_routed, fused_block_forward, route_pack, routed_block, scale_fuse
except ImportError as error:
    if error.name is None or error.name.partition(".")[0] != "triton":
        raise
    TRITON_IMPORT_ERROR: ImportError | None = error

    def __getattr__(name: str):
        if name in __all__:
            raise ImportError(f"mod_kernels.{name} needs Triton, which failed to import: {TRITON_IMPORT_ERROR}")
        raise AttributeError(f"module 'mod_kernels' has no attribute {name!r}")
else:
    TRITON_IMPORT_ERROR = None
