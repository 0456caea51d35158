"""Compile every MoD kernel, as the models launch it, for real NVIDIA targets, on any machine.

Triton's interpreter forgives what a GPU does not (tile shapes, unsupported ops, register
pressure). This module runs the MoD models' forward and backward on the CPU with every kernel
launch *recorded instead of executed*, then compiles each distinct specialisation with Triton's
bundled compiler for ``sm_80`` and ``sm_90`` (``triton.compile`` + ``GPUTarget``), and reports
registers and spills from ``ptxas -v``.

Run it without ``TRITON_INTERPRET`` (the kernels must be real ``JITFunction`` objects)::

    python -m mod_models.tools.compile_check --out bench/results/kernel_compile.md
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    raise SystemExit("mod_models.tools.compile_check must run without TRITON_INTERPRET=1")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

from mod_models.tools.markdown import table  # noqa: E402

from .launch_plan import RecordedLaunch, all_kernels, record_model_launches  # noqa: E402


@dataclass
class CompileResult:
    kernel: str
    arch: int
    constexprs: dict
    registers: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    shared_bytes: int | None = None
    num_warps: int = 4
    seconds: float = 0.0
    error: str | None = None
    signature: dict = field(default_factory=dict)


def specialise(launch: RecordedLaunch, target: GPUTarget):
    """Triton's own launch-time specialisation of recorded arguments, for ``target``."""
    backend = make_backend(target)
    binder = create_function_from_signature(launch.kernel.signature, launch.kernel.params, backend)
    bound_args, specialization, options = binder(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = launch.kernel._pack_args(
        backend, launch.kwargs, bound_args, specialization, options
    )
    return options, signature, constexprs, attrs


def ptxas_report(ptx: str, arch: int) -> tuple[int | None, int | None, int | None]:
    """``(registers, spill store bytes, spill load bytes)`` from ``ptxas -v``."""
    from triton.backends.nvidia.compiler import get_ptxas

    gpu_name = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as handle:
            handle.write(ptx)
        run = subprocess.run(
            [get_ptxas(arch).path, "-v", f"--gpu-name={gpu_name}", src, "-o", os.path.join(tmp, "kernel.cubin")],
            capture_output=True, text=True,
        )
    log = run.stdout + run.stderr
    registers = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return (
        int(registers.group(1)) if registers else None,
        int(spills.group(1)) if spills else None,
        int(spills.group(2)) if spills else None,
    )


def distinct_specialisations(launches: list[RecordedLaunch], archs: tuple[int, ...]) -> list[tuple]:
    """``(arch, launch)`` pairs, one per distinct compiled kernel (alignment hints aside: they only
    change vectorisation, not whether the kernel compiles)."""
    work, seen = [], set()
    for arch in archs:
        target = GPUTarget("cuda", arch, 32)
        for launch in launches:
            options, signature, constexprs, _ = specialise(launch, target)
            key = (launch.kernel.fn.__name__, arch, str(sorted(signature.items())),
                   str(sorted(constexprs.items())), options.num_warps)
            if key not in seen:
                seen.add(key)
                work.append((arch, launch))
    return work


def _features(arch: int, launch: RecordedLaunch) -> frozenset:
    options, signature, constexprs, _ = specialise(launch, GPUTarget("cuda", arch, 32))
    named = {launch.kernel.arg_names[path[0]]: value for path, value in constexprs.items()}
    return frozenset(
        [("arg", name, kind) for name, kind in signature.items()]
        + [("constexpr", name, str(value)) for name, value in named.items()]
        + [("warps", options.num_warps)]
    )


def covering_subset(work: list[tuple]) -> list[tuple]:
    """A small subset of ``work`` in which every kernel meets every value of every argument type,
    constexpr and warp count that the full set holds, per arch (greedy set cover)."""
    chosen = []
    groups: dict[tuple, list[tuple]] = {}
    for arch, launch in work:
        groups.setdefault((arch, launch.kernel.fn.__name__), []).append((arch, launch, _features(arch, launch)))
    for items in groups.values():
        uncovered = set().union(*(features for _, _, features in items))
        while uncovered:
            arch, launch, features = max(items, key=lambda item: len(item[2] & uncovered))
            chosen.append((arch, launch))
            uncovered -= features
    return chosen


def compile_one(arch: int, launch: RecordedLaunch) -> CompileResult:
    target = GPUTarget("cuda", arch, 32)
    options, signature, constexprs, attrs = specialise(launch, target)
    named = {launch.kernel.arg_names[path[0]]: value for path, value in constexprs.items()}
    result = CompileResult(launch.kernel.fn.__name__, arch, named, num_warps=options.num_warps, signature=signature)
    start = time.perf_counter()
    try:
        compiled = triton.compile(
            ASTSource(launch.kernel, signature, constexprs, attrs), target=target, options=options.__dict__
        )
        result.shared_bytes = compiled.metadata.shared
        result.registers, result.spill_stores, result.spill_loads = ptxas_report(compiled.asm["ptx"], arch)
    except Exception as error:  # noqa: BLE001 - reported, and the run fails
        message = str(error).strip().splitlines()
        result.error = f"{type(error).__name__}: {message[0] if message else ''}"
    result.seconds = time.perf_counter() - start
    return result


_WORK: list[tuple] = []


def _compile_shard(shard: int, shards: int) -> list[CompileResult]:
    return [compile_one(arch, launch) for i, (arch, launch) in enumerate(_WORK) if i % shards == shard]


def compile_launches(
    launches: list[RecordedLaunch], archs: tuple[int, ...], jobs: int = 1, cover: bool = False
) -> list[CompileResult]:
    """Compile each distinct specialisation (or, with ``cover``, a covering subset) for each arch,
    in ``jobs`` forked processes."""
    global _WORK
    _WORK = distinct_specialisations(launches, archs)
    if cover:
        _WORK = covering_subset(_WORK)
    if jobs <= 1:
        return _compile_shard(0, 1)
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(jobs) as pool:
        shards = pool.starmap(_compile_shard, [(shard, jobs) for shard in range(jobs)])
    return sorted((r for shard in shards for r in shard), key=lambda r: (r.arch, r.kernel, str(r.constexprs)))


def format_report(results: list[CompileResult]) -> str:
    lines = [
        "# MoD kernels compiled for NVIDIA targets",
        "",
        f"Triton {triton.__version__}, torch {torch.__version__}, `python -m mod_models.tools.compile_check` "
        f"({time.strftime('%Y-%m-%d')}). One row per distinct launch specialisation of the zoo models "
        "(resnet50_mod/resnet18_mod/mobilenet_v2_mod/mobilenet_v2_mod_l, fp32, bf16 and fp16, NCHW and "
        "channels_last, all fusions, learned and random router, forward + backward + in-place inference + "
        "the deployed block). `pointer dtypes`: the element types of the kernel's pointer arguments, in order.",
        "",
    ]
    rows = []
    for r in results:
        constexprs = ", ".join(f"{k}={v}" for k, v in r.constexprs.items() if k != "num_warps")
        pointers = ",".join(kind[1:] for kind in r.signature.values() if isinstance(kind, str) and kind.startswith("*"))
        spills = "-" if r.spill_stores is None else f"{r.spill_stores}/{r.spill_loads}"
        status = "ok" if r.error is None else f"FAILED: {r.error}"
        rows.append([r.kernel, r.arch, constexprs, pointers, r.num_warps, "-" if r.registers is None else r.registers,
                     spills, r.shared_bytes or 0, f"{r.seconds:.1f}", status])
    header = ["kernel", "sm", "constexprs", "pointer dtypes", "warps", "registers", "spill st/ld (B)", "shared (B)",
              "compile (s)", "status"]
    return "\n".join(lines) + "\n" + table(header, rows, "llllrrrrrl") + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Compile every MoD kernel specialisation for sm_80/sm_90.")
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--out", help="write the Markdown report here")
    parser.add_argument(
        "--cover", action="store_true",
        help="compile a covering subset: every kernel with every tile/flag/dtype/layout value at least once",
    )
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compiler processes")
    args = parser.parse_args(argv)
    launches = record_model_launches(resolution=args.resolution)
    used = {launch.kernel.fn.__name__ for launch in launches}
    missing = sorted(set(all_kernels()) - used)
    start = time.perf_counter()
    results = compile_launches(launches, tuple(args.arch), jobs=args.jobs, cover=args.cover)
    report = format_report(results)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(report)
    print(report)
    failed = [r for r in results if r.error]
    spilled = [r for r in results if r.spill_stores]
    print(f"{len(results)} compilations in {time.perf_counter() - start:.0f} s, {len(failed)} failed, "
          f"{len(spilled)} with spills; kernels never launched: {missing or 'none'}")
    return 1 if failed or missing else 0


if __name__ == "__main__":
    sys.exit(main())
