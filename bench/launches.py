"""Kernel launches of a forward pass, counted on any machine (a CPU too).

A launch is one Triton kernel grid (every ``@triton.jit`` kernel of :mod:`mod_kernels`, counted at
its launch whatever its grid size), or one ATen compute op dispatched outside those launches
(``aten.convolution``, ``aten.addmm``, ``aten.relu_``, ``aten.copy_``, ...). Views, metadata and
allocations (``view``, ``narrow``, ``as_strided``, ``empty``, ...) launch nothing and are not counted.
On a GPU each counted ATen op is one kernel or a small fixed number (cuDNN may split a
convolution); ``torch.profiler`` in the GPU script gives the device's own count beside this one.

Usage::

    with LaunchCounter() as counter:
        model(x)
    counter.total, counter.triton, counter.aten, counter.by_name
"""

from __future__ import annotations

from collections import Counter
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Ops that allocate or only describe memory: no kernel.
_NO_KERNEL = {
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "lift_fresh", "detach",
    "_to_copy_meta", "resize_", "set_", "_local_scalar_dense", "sym_size", "sym_stride", "sym_numel",
    "sym_storage_offset", "is_contiguous", "_has_compatible_shallow_copy_type", "size", "stride", "promote_types",
    "result_type",
}


def _kernels() -> list:
    """Every Triton kernel object of :mod:`mod_kernels` (JIT or interpreted)."""
    from mod_kernels import fused_block, fused_route_pack, fused_scale_fuse

    found = []
    for module in (fused_route_pack, fused_scale_fuse, fused_block):
        for name, value in vars(module).items():
            if name.endswith("_kernel") and hasattr(value, "run") and hasattr(value, "fn"):
                found.append((name, value))
    return found


class LaunchCounter(TorchDispatchMode):
    """Counts Triton kernel launches and ATen compute ops while active (see the module docstring).

    Attributes:
        triton: Triton launches; aten: ATen compute ops; by_name: both, by kernel/op name.
    """

    def __init__(self) -> None:
        super().__init__()
        self.triton = 0
        self.aten = 0
        self.by_name: Counter = Counter()
        self._inside_triton = 0
        self._patched: list = []

    @property
    def total(self) -> int:
        return self.triton + self.aten

    def __enter__(self) -> "LaunchCounter":
        for name, kernel in _kernels():
            original = kernel.__dict__.get("run")
            bound = kernel.run

            def counting_run(*args, _name=name, _bound=bound, **kwargs):
                self.triton += 1
                self.by_name[_name] += 1
                self._inside_triton += 1  # the interpreter's own tensor copies are not launches
                try:
                    return _bound(*args, **kwargs)
                finally:
                    self._inside_triton -= 1

            self._patched.append((kernel, original))
            kernel.run = counting_run
        return super().__enter__()

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        for kernel, original in self._patched:
            if original is None:
                del kernel.run
            else:
                kernel.run = original
        self._patched.clear()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self._inside_triton:
            name = func.overloadpacket.__name__
            if not (func.is_view or name in _NO_KERNEL):
                self.aten += 1
                self.by_name[f"aten.{name}"] += 1
        return func(*args, **kwargs)


def count_launches(fn: Callable[[], object]) -> LaunchCounter:
    """Run ``fn()`` once under a :class:`LaunchCounter` and return the counter."""
    with LaunchCounter() as counter:
        fn()
    return counter
