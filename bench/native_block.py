"""CPU microbenchmark of one deployed MoD block: the native kernel vs the reference vs one read.

``python -m bench.native_block`` times, at the stage shapes of resnet50_mod and resnet75_mod (the
same Bottleneck shapes, capacity 64) and the MoD groups of mobilenet_v2_mod (inverted residual,
capacity 16), batch 1 and 8, one thread and all of torch's threads:

* ``native``: the deployed block (:func:`mod_models.optimize_for_inference`) on the ``"native"``
  backend: one call of :mod:`mod_kernels.native_block`;
* ``reference``: the same deployed block on the ``"reference"`` backend (plain PyTorch, folded
  convolutions);
* ``read``: ``x.sum()``, one read of the block's input: the floor a block that must pool its whole
  input cannot beat.

The deployed blocks run in place, as in a deployed model (each case on its own copy of the input).
Before timing, both blocks run once on the same input and must agree (selections equal, outputs
within 1e-5); a case that disagrees is reported and not timed. Medians with [p20, p80] in
microseconds, timed in interleaved rounds (:func:`bench.timing.time_cpu_interleaved`), plus the
time of the first call's extension load (a build when torch's extension cache lacks it).

Results go to stdout (and, with ``--json PATH``, to a JSON file); :func:`run` returns them.
``python -m bench --full`` on a CPU runs it as its own section (:func:`measure`: records of
section ``"native_block"``, judged against the target of at most twice one read of the input).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import asdict, dataclass

import torch

# (label, block kind, C, H = W, capacity)
SHAPES = (
    ("resnet50/75_mod layer1", "bottleneck", 256, 56, 64),
    ("resnet50/75_mod layer2", "bottleneck", 512, 28, 64),
    ("resnet50/75_mod layer3", "bottleneck", 1024, 14, 64),
    ("resnet50/75_mod layer4", "bottleneck", 2048, 7, 64),
    ("mobilenet_v2 24", "inverted", 24, 56, 16),
    ("mobilenet_v2 32", "inverted", 32, 28, 16),
    ("mobilenet_v2 64", "inverted", 64, 14, 16),
    ("mobilenet_v2 96", "inverted", 96, 14, 16),
    ("mobilenet_v2 160", "inverted", 160, 7, 16),
)
QUICK_SHAPES = (SHAPES[2], SHAPES[7])


@dataclass(frozen=True)
class BlockTiming:
    """One shape, batch and thread count: medians and [p20, p80] in microseconds."""

    shape: str
    kind: str
    channels: int
    size: int
    k: int
    batch: int
    threads: int
    native_us: tuple[float, float, float]
    reference_us: tuple[float, float, float]
    read_us: tuple[float, float, float]

    @property
    def native_vs_read(self) -> float:
        return self.native_us[0] / self.read_us[0]

    @property
    def speedup_vs_reference(self) -> float:
        return self.reference_us[0] / self.native_us[0]


def _deployed_blocks(kind: str, channels: int, capacity: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    import mod_models

    build = mod_models.MoDBottleneck if kind == "bottleneck" else mod_models.MoDInvertedResidual
    torch.manual_seed(0)
    block = build(channels, capacity=capacity).eval()
    generator = torch.Generator().manual_seed(1)
    for module in block.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.copy_(torch.randn(module.num_features, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
    deployed = mod_models.optimize_for_inference(block)
    native = mod_models.set_backend(deployed, "native")
    reference = mod_models.set_backend(copy.deepcopy(deployed), "reference")
    return native, reference


def _agree(native: torch.nn.Module, reference: torch.nn.Module, x: torch.Tensor) -> str | None:
    """None when both blocks give the same selection and outputs within 1e-5, else what differs."""
    native.record_selection = reference.record_selection = True
    with torch.inference_mode():
        out_native = native(x.clone())
        out_reference = reference(x.clone())
    native.record_selection = reference.record_selection = False
    if not torch.equal(native.last_selection, reference.last_selection):
        return "selections differ"
    error = float((out_native - out_reference).abs().max())
    return None if error <= 1e-5 * max(1.0, float(out_reference.abs().max())) else f"outputs differ by {error:.3g}"


def time_shape(label: str, kind: str, channels: int, size: int, capacity: int, batch: int, threads: int, *,
               rounds: int = 5) -> BlockTiming:
    """Time one case (see the module docstring); raises ``RuntimeError`` when the outputs disagree."""
    from .timing import time_cpu_interleaved

    native, reference = _deployed_blocks(kind, channels, capacity)
    x = torch.randn(batch, channels, size, size)
    problem = _agree(native, reference, x)
    if problem is not None:
        raise RuntimeError(f"{label}, batch {batch}: native and reference {problem}; not timed")
    inputs = {name: x.clone() for name in ("native", "reference", "read")}
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            timings = time_cpu_interleaved(
                {
                    "native": lambda: native(inputs["native"]),
                    "reference": lambda: reference(inputs["reference"]),
                    "read": lambda: inputs["read"].sum(),
                },
                rounds=rounds, warmup=5, warmup_ms=50.0, min_sample_ms=0.5,
            )
    finally:
        torch.set_num_threads(previous)

    def microseconds(name: str) -> tuple[float, float, float]:
        t = timings[name]
        return (t.median_ms * 1e3, t.p20_ms * 1e3, t.p80_ms * 1e3)

    return BlockTiming(label, kind, channels, size, native.k, batch, threads, microseconds("native"),
                       microseconds("reference"), microseconds("read"))


def extension_load_seconds() -> float:
    """Wall time of loading the native extension in this process (a build when not cached)."""
    from mod_kernels import native_block

    start = time.perf_counter()
    native_block.load_extension()
    return time.perf_counter() - start


def run(*, batches=(1, 8), threads=None, shapes=SHAPES, rounds: int = 5, progress=print) -> dict:
    """Every shape x batch x thread count: ``{"extension_load_s": ..., "timings": [BlockTiming, ...]}``."""
    load_s = extension_load_seconds()
    if threads is None:
        threads = sorted({1, torch.get_num_threads()})
    results = []
    for label, kind, channels, size, capacity in shapes:
        for batch in batches:
            for count in threads:
                timing = time_shape(label, kind, channels, size, capacity, batch, count, rounds=rounds)
                results.append(timing)
                if progress is not None:
                    progress(format_row(timing))
    return {"extension_load_s": load_s, "timings": results}


def measure(*, batches=(1, 8), threads=None, shapes=SHAPES, rounds: int = 5, env: dict | None = None,
            log=print) -> tuple[list[dict], float | None]:
    """The benchmark's ``native_block`` section: one record per shape x batch x thread count (a case
    whose blocks disagree, or that cannot run, is recorded with its reason, not timed), and the
    extension's load time (None when it cannot load)."""
    from .env import stamp
    from .providers import error_text

    env = env or {}
    if threads is None:
        threads = sorted({1, torch.get_num_threads()})
    try:
        load_s = extension_load_seconds()
    except Exception as error:  # noqa: BLE001 - reported in the records, never faked
        reason = error_text(error)
        return [stamp({"section": "native_block", "shape": label, "kind": kind, "channels": channels, "size": size,
                       "batch": batch, "threads": count, "dtype": "fp32", "memory_format": "nchw",
                       "status": "unavailable", "reason": reason}, env)
                for label, kind, channels, size, _ in shapes for batch in batches for count in threads], None
    records = []
    for label, kind, channels, size, capacity in shapes:
        for batch in batches:
            for count in threads:
                base = {"section": "native_block", "shape": label, "kind": kind, "channels": channels, "size": size,
                        "capacity": capacity, "batch": batch, "threads": count, "dtype": "fp32",
                        "memory_format": "nchw"}
                try:
                    t = time_shape(label, kind, channels, size, capacity, batch, count, rounds=rounds)
                except Exception as error:  # noqa: BLE001
                    records.append(stamp({**base, "status": "error", "reason": error_text(error)}, env))
                    log(f"  error {label} b{batch} {count}t: {error_text(error)}")
                    continue
                records.append(stamp({
                    **base, "k": t.k, "status": "ok", "reason": "", "native_us": list(t.native_us),
                    "reference_us": list(t.reference_us), "read_us": list(t.read_us),
                    "native_vs_read": t.native_vs_read, "reference_vs_native": t.speedup_vs_reference,
                    "agreement": {"ok": True, "method": "selections equal, outputs within 1e-5"},
                    "method": "torch.utils.benchmark blocked_autorange, interleaved rounds (native, reference, read)",
                }, env))
                log(format_row(t))
    return records, load_s


def format_row(t: BlockTiming) -> str:
    def cell(values: tuple[float, float, float]) -> str:
        return f"{values[0]:8.1f} [{values[1]:.1f}, {values[2]:.1f}]"

    return (f"| {t.shape} ({t.kind} C={t.channels} {t.size}x{t.size} k={t.k}) | {t.batch} | {t.threads} | "
            f"{cell(t.native_us)} | {cell(t.reference_us)} | {cell(t.read_us)} | {t.native_vs_read:.2f}x | "
            f"{t.speedup_vs_reference:.2f}x |")


HEADER = ("| shape | B | threads | native us | reference deploy us | read (x.sum) us | native / read | "
          "reference / native |\n|---|---:|---:|---:|---:|---:|---:|---:|")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.native_block", description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", default="1,8", help="comma-separated batch sizes (default 1,8)")
    parser.add_argument("--threads", default=None, help="comma-separated thread counts (default: 1 and all)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (default 5)")
    parser.add_argument("--quick", action="store_true", help="batch 1, one thread, two shapes, two rounds")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    batches = tuple(int(b) for b in args.batch_sizes.split(","))
    threads = None if args.threads is None else [int(t) for t in args.threads.split(",")]
    shapes, rounds = SHAPES, args.rounds
    if args.quick:
        batches, threads, shapes, rounds = (1,), [1], QUICK_SHAPES, 2
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads available")
    printed = []

    def progress(row: str) -> None:
        if not printed:
            print(HEADER)
        printed.append(row)
        print(row, flush=True)

    results = run(batches=batches, threads=threads, shapes=shapes, rounds=rounds, progress=progress)
    print(f"native extension load: {results['extension_load_s']:.2f} s (a build when it was not cached)")
    if args.json:
        payload = {"extension_load_s": results["extension_load_s"],
                   "timings": [asdict(t) for t in results["timings"]], "torch": torch.__version__}
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump(payload, out, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
