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

from mod_models.tools.markdown import table

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


# ------------------------------------------------------------------------------ launch tables

BLOCK_CASES = (  # (kind, C, capacity) at the paper's capacities: the fused deploy block
    ("bottleneck", 256, 64),
    ("basic", 64, 64),
    ("inverted", 96, 16),
)
# capacity 2 makes f_k too wide for the fused kernel: the deploy form's documented fallback (routing
# kernels, folded convolutions, fusion kernel; mod_kernels.fused_block.fused_block_plan).
FALLBACK_CASES = (
    ("bottleneck", 256, 2),
    ("basic", 64, 2),
    ("inverted", 96, 2),
)
PATHS = ("reference", "triton", "reference+deploy", "triton+deploy")
MODEL_PATHS = ("reference", "reference+deploy", "triton+deploy")


def _mod_block(kind: str, channels: int, capacity: int, fusion: str, router: str):
    import mod_models

    cls = {"bottleneck": mod_models.MoDBottleneck, "basic": mod_models.MoDBasicBlock,
           "inverted": mod_models.MoDInvertedResidual}[kind]
    return cls(channels, capacity=capacity, fusion=fusion, router=router)


def _standard_block(kind: str, channels: int):
    from torchvision.models.mobilenetv2 import InvertedResidual
    from torchvision.models.resnet import BasicBlock, Bottleneck

    if kind == "bottleneck":
        return Bottleneck(channels, channels // 4)
    if kind == "basic":
        return BasicBlock(channels, channels)
    return InvertedResidual(channels, channels, 1, 6)


def _prepared(model, path: str, device: str = "cpu"):
    """A copy of ``model`` (eval, on ``device``) on ``path``: backend, and the deploy form for ``+deploy``."""
    import copy

    import mod_models

    model = copy.deepcopy(model).eval().to(device)
    backend = path.removesuffix("+deploy")
    if any(isinstance(m, mod_models.MoDBlock) for m in model.modules()):
        mod_models.set_backend(model, backend)
    if path.endswith("+deploy"):
        mod_models.optimize_for_inference(model)
    return model


def _count_forward(model, x) -> LaunchCounter:
    with torch.inference_mode():
        model(x.clone())  # first call: the deploy form packs its weights, caches fill
        inputs = x.clone()
        return count_launches(lambda: model(inputs))


def block_launch_records(triton: bool = True, device: str = "cpu", every_variant: bool = True) -> list[dict]:
    """Launches of one forward of each MoD block type (every fusion and both routers on the deploy
    paths, unless ``every_variant`` is False) on each path, beside the torchvision block it
    replaces (eval and deploy form). Batch 1, 4 x 4."""
    records = []
    paths = PATHS if triton else tuple(p for p in PATHS if not p.startswith("triton"))
    for kind, channels, capacity in BLOCK_CASES + FALLBACK_CASES:
        x = torch.randn(1, channels, 4, 4, device=device)
        if capacity == dict((k, c) for k, _, c in BLOCK_CASES)[kind]:  # the torchvision block, once per kind
            standard = _standard_block(kind, channels)
            for path in ("eval", "deploy"):
                counter = _count_forward(_prepared(standard, "reference+deploy" if path == "deploy" else "reference",
                                                   device), x)
                records.append({"section": "launches", "scope": "block", "kind": kind, "channels": channels,
                                "network": "torchvision", "path": path, "fusion": None, "router": None,
                                "launches": counter.total, "triton": counter.triton, "aten": counter.aten})
        for fusion in ("first_k", "last_k", "original"):
            for router in ("learned", "random"):
                block = _mod_block(kind, channels, capacity, fusion, router)
                # Every fusion and router on the deploy path (the budget); the default block elsewhere.
                default = (fusion, router) == ("first_k", "learned")
                if not (default or every_variant):
                    continue
                chosen = paths if default else [p for p in paths if p.endswith("deploy")]
                for path in chosen:
                    prepared = _prepared(block, path, device)
                    counter = _count_forward(prepared, x)
                    records.append({"section": "launches", "scope": "block", "kind": kind, "channels": channels,
                                    "capacity": capacity, "network": "mod", "path": path, "fusion": fusion,
                                    "router": router, "launches": counter.total, "triton": counter.triton,
                                    "aten": counter.aten,
                                    "fused": prepared.deploy_plan().fused if path == "triton+deploy" else None})
    return records


def model_launch_records(names: list[str], resolution: int = 32, triton: bool = True,
                         device: str = "cpu") -> list[dict]:
    """Launches of one batch-1 forward of each MoD variant on each path (the most any one MoD block
    makes beside it) and of its torchvision baseline, eval and deploy form."""
    import mod_models

    records = []
    x = torch.randn(1, 3, resolution, resolution, device=device)
    paths = MODEL_PATHS if triton else tuple(p for p in MODEL_PATHS if not p.startswith("triton"))
    for baseline in dict.fromkeys(mod_models.BASELINE_OF[name] for name in names):
        model = mod_models.build_model(baseline)
        for path in ("eval", "deploy"):
            counter = _count_forward(
                _prepared(model, "reference+deploy" if path == "deploy" else "reference", device), x)
            records.append({"section": "launches", "scope": "model", "model": baseline, "network": "torchvision",
                            "path": path, "launches": counter.total, "triton": counter.triton, "aten": counter.aten})
    for name in names:
        model = mod_models.build_model(name)
        for path in paths:
            counter, per_block = _count_model(_prepared(model, path, device), x)
            records.append({"section": "launches", "scope": "model", "model": name, "network": "mod", "path": path,
                            "launches": counter.total, "triton": counter.triton, "aten": counter.aten,
                            "mod_blocks": len(per_block), "max_per_mod_block": max(per_block)})
    return records


def _count_model(model, x) -> tuple[LaunchCounter, list[int]]:
    """One warm-up forward, then one counted: the whole forward's launches and each MoD block's."""
    import mod_models

    counter = LaunchCounter()
    per_block: list[int] = []
    handles = []
    for block in (m for m in model.modules() if isinstance(m, mod_models.MoDBlock)):
        handles.append(block.register_forward_pre_hook(lambda m, a: setattr(m, "_launch_mark", counter.total)))
        handles.append(block.register_forward_hook(lambda m, a, o: per_block.append(counter.total - m._launch_mark)))
    with torch.inference_mode():
        model(x.clone())
        per_block.clear()
        inputs = x.clone()
        with counter:
            model(inputs)
    for handle in handles:
        handle.remove()
    return counter, per_block


def launch_markdown(records: list[dict]) -> str:
    """The launch tables (Markdown) of :func:`block_launch_records` / :func:`model_launch_records`."""
    lines = []
    blocks = [r for r in records if r.get("section") == "launches" and r["scope"] == "block"]
    if blocks:
        lines += ["### Kernel launches per block (batch 1, one forward)", "",
                  "Counted on this machine: Triton grid launches plus ATen compute ops (views and allocations "
                  "excluded). MoD blocks at the paper's capacities, and at capacity 2 (the deploy form's fallback); "
                  "`deploy` = `optimize_for_inference` "
                  "(batch norms folded, in-place fusion; the fused three-launch block on the triton backend).", ""]
        header = ["block", "torchvision eval", "torchvision deploy", *(f"MoD {p}" for p in PATHS), "triton deploy path"]
        rows = []
        for kind, channels, capacity in BLOCK_CASES + FALLBACK_CASES:
            tv = {r["path"]: r["launches"] for r in blocks if r["network"] == "torchvision" and r["kind"] == kind}
            mods = [r for r in blocks if r["network"] == "mod" and r["kind"] == kind
                    and r.get("capacity", capacity) == capacity]
            if not mods:
                continue
            cells = []
            for path in PATHS:
                values = sorted({r["launches"] for r in mods if r["path"] == path})
                cells.append("-" if not values else (
                    str(values[0]) if len(values) == 1 else f"{values[0]}-{values[-1]}"))
            fused = {r["fused"] for r in mods if r.get("fused") is not None}
            route = ("-" if not fused else "fused block" if fused == {True}
                     else "fallback: routing kernels + folded convolutions + fusion kernel" if fused == {False}
                     else "mixed")
            rows.append([f"{kind} C={channels} k={channels // capacity} (capacity {capacity})", tv.get("eval", "-"),
                         tv.get("deploy", "-"), *cells, route])
        lines.append(table(header, rows, "l" + "r" * (2 + len(PATHS)) + "l"))
        lines += ["", "(Deploy columns: the range over the fusions first_k / last_k / original and the learned / "
                  "random router; the other columns: first_k, learned router. Capacity 2 makes the reduced block "
                  "too wide for the fused kernel: the documented fallback.)", ""]
    models = [r for r in records if r.get("section") == "launches" and r["scope"] == "model"]
    if models:
        import mod_models

        lines += ["### Kernel launches per model forward (batch 1)", ""]
        header = ["model", "baseline eval", "baseline deploy", *(f"MoD {p}" for p in MODEL_PATHS),
                  "most per MoD block (triton+deploy)"]
        rows = []
        for name in dict.fromkeys(r["model"] for r in models if r["network"] == "mod"):
            base = mod_models.BASELINE_OF[name]
            tv = {r["path"]: r["launches"] for r in models if r["network"] == "torchvision" and r["model"] == base}
            mine = {r["path"]: r for r in models if r["network"] == "mod" and r["model"] == name}
            cells = [str(mine[p]["launches"]) if p in mine else "-" for p in MODEL_PATHS]
            most = mine.get("triton+deploy", {}).get("max_per_mod_block", "-")
            rows.append([f"{name} ({base})", tv.get("eval", "-"), tv.get("deploy", "-"), *cells, most])
        lines.append(table(header, rows, "l" + "r" * (3 + len(MODEL_PATHS))))
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json
    import os

    parser = argparse.ArgumentParser(prog="python -m bench.launches",
                                     description="Kernel launches per MoD block and per model forward.")
    parser.add_argument("--models", nargs="*", default=None, help="zoo variants (default: all)")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--json", help="also write the records here")
    parser.add_argument("--default-variants", action="store_true",
                        help="block table: only fusion first_k with the learned router (quick runs)")
    args = parser.parse_args(argv)
    import mod_models

    names = args.models if args.models is not None else list(mod_models.MOD_BUILDERS)
    unknown = [n for n in names if n not in mod_models.MOD_BUILDERS]
    if unknown:
        parser.error(f"unknown MoD model(s) {unknown}")
    if args.resolution < 32:
        parser.error("--resolution must be >= 32 (the ResNets downsample by 32)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    triton = device == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
    torch.manual_seed(0)
    records = (block_launch_records(triton, device, every_variant=not args.default_variants)
               + model_launch_records(names, args.resolution, triton, device))
    print(launch_markdown(records))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(records, handle, indent=1)
    return 0



def measure(names: list[str], *, on_cuda: bool, log=print, timeout_s: float = 1200.0,
            every_variant: bool = True) -> tuple[list[dict], str]:
    """The launch records of :func:`block_launch_records` and :func:`model_launch_records` for
    ``names``, and a note. On CUDA they are counted here; on a CPU in a child process under
    Triton's interpreter (it must be on before Triton is imported), or for the reference paths
    alone where Triton is missing."""
    import importlib.util
    import json
    import os
    import subprocess
    import sys
    import tempfile

    if on_cuda:
        return block_launch_records(True, "cuda", every_variant) + model_launch_records(names, 32, True, "cuda"), \
            "counted on the GPU (compiled kernels)"
    if importlib.util.find_spec("triton") is None:
        return block_launch_records(False, every_variant=every_variant) + model_launch_records(names, 32, False), \
            "triton paths not counted (Triton is not installed)"
    with tempfile.TemporaryDirectory(prefix="mod-launches-") as tmp:
        path = os.path.join(tmp, "launches.json")
        env = dict(os.environ, TRITON_INTERPRET="1")
        variants = [] if every_variant else ["--default-variants"]
        result = subprocess.run([sys.executable, "-m", "bench.launches", "--models", *names, "--json", path, *variants],
                                env=env, capture_output=True, text=True, timeout=timeout_s)
        if result.returncode != 0:
            raise RuntimeError(f"bench.launches failed: {result.stderr.strip().splitlines()[-1:]}")
        with open(path) as handle:
            return json.load(handle), "counted on this CPU, the triton paths under Triton's interpreter (same launches)"


if __name__ == "__main__":
    raise SystemExit(main())
