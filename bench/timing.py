"""Latency measurement: warm-up, many samples, the median with its spread.

Every timer here takes a zero-argument callable whose inputs were built before the call (no
tensor is created in the timed region by the benchmark itself) and returns a :class:`Timing`.

* CPU: :func:`time_cpu_interleaved` -- ``time.perf_counter`` around each call, the cases of one
  comparison timed round-robin so that a drift of the machine hits all of them alike.
* CUDA, whole models: :func:`time_cuda_events` -- one pair of CUDA events per call.
* CUDA, kernels: :func:`time_do_bench` -- ``triton.testing.do_bench`` (L2 flushed before each
  call) or, for small cases, ``do_bench_cudagraph`` (calls replayed from one CUDA graph).
* :func:`capture_cuda_graph` records a callable into a CUDA graph (batch-1 model latency).
* :func:`copy_bandwidth` measures the device's copy bandwidth, the yardstick for GB/s.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Hashable
from dataclasses import asdict, dataclass

import torch

QUANTILES = (0.5, 0.2, 0.8)


@dataclass(frozen=True)
class Timing:
    """Latency of one case in milliseconds: median and the 20th/80th percentiles of ``n`` samples."""

    median_ms: float
    p20_ms: float
    p80_ms: float
    n: int
    method: str

    @classmethod
    def from_samples(cls, samples_ms: list[float], method: str) -> Timing:
        if not samples_ms:
            raise ValueError("no timing samples")
        return cls(
            median_ms=percentile(samples_ms, 0.5),
            p20_ms=percentile(samples_ms, 0.2),
            p80_ms=percentile(samples_ms, 0.8),
            n=len(samples_ms),
            method=method,
        )

    def as_dict(self) -> dict:
        return asdict(self)


def percentile(samples: list[float], q: float) -> float:
    """Linear-interpolated quantile ``q`` in [0, 1] (numpy's default method)."""
    ordered = sorted(samples)
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


class Budget:
    """A wall-clock deadline; ``None`` seconds means no limit."""

    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds
        self.start = time.monotonic()
        self.end = None if seconds is None else self.start + seconds

    def left(self) -> float:
        return math.inf if self.end is None else self.end - time.monotonic()

    def allows(self, cost_s: float = 0.0) -> bool:
        """True when ``cost_s`` more seconds still fit before the deadline."""
        return self.left() > cost_s

    def elapsed(self) -> float:
        return time.monotonic() - self.start


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------- CPU


def time_cpu_interleaved(
    cases: dict[Hashable, Callable[[], object]],
    *,
    rounds: int = 5,
    samples_per_round: int = 3,
    warmup: int = 2,
    warmup_ms: float = 0.0,
    min_sample_ms: float = 1.0,
    budget: Budget | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[Hashable, Timing]:
    """Time CPU callables in interleaved rounds: each round visits every case in turn.

    In a round a case gets one untimed call (its weights and buffers back into the caches the
    previous case evicted), then ``samples_per_round`` timed samples. A sample is the mean of
    ``m`` back-to-back calls, ``m`` chosen per case so a sample lasts at least ``min_sample_ms``
    (sub-millisecond calls are otherwise dominated by timer noise). Interleaving makes a drift
    of the machine (clock, other load) hit all cases of a comparison alike.

    Args:
        cases: key -> callable.
        rounds: number of rounds (stops early, after at least 2, when ``budget`` runs out).
        warmup: untimed calls per case before the first round (at least; see ``warmup_ms``).
        warmup_ms: keep warming a case until this much time has passed (at most 5 s).
    """
    calls: dict[Hashable, int] = {}
    for key, fn in cases.items():
        warm_start = time.perf_counter()
        done = 0
        while done < warmup - 1 or (time.perf_counter() - warm_start) * 1e3 < min(warmup_ms, 5000.0):
            fn()
            done += 1
        start = time.perf_counter()
        fn()
        once_ms = (time.perf_counter() - start) * 1e3
        calls[key] = max(1, min(10000, math.ceil(min_sample_ms / max(once_ms, 1e-6))))
    samples: dict[Hashable, list[float]] = {key: [] for key in cases}
    for round_index in range(rounds):
        if round_index >= 2 and budget is not None and not budget.allows():
            break
        for key, fn in cases.items():
            m = calls[key]
            for _ in range(m):
                fn()
            for _ in range(samples_per_round):
                start = time.perf_counter()
                for _ in range(m):
                    fn()
                samples[key].append((time.perf_counter() - start) * 1e3 / m)
        if progress is not None:
            progress(f"round {round_index + 1}/{rounds}")
    return {
        key: Timing.from_samples(values, f"perf_counter, interleaved rounds, {calls[key]} call(s) per sample")
        for key, values in samples.items()
    }


def time_cpu(fn: Callable[[], object], *, reps: int = 10, warmup: int = 10, warmup_ms: float = 200.0,
             min_sample_ms: float = 1.0) -> Timing:
    """A single CPU case (``time.perf_counter``): ``reps`` samples after at least ``warmup`` calls and
    ``warmup_ms`` of calls (the first calls of small ops are often many times slower)."""
    return time_cpu_interleaved({0: fn}, rounds=1, samples_per_round=reps, warmup=warmup, warmup_ms=warmup_ms,
                                min_sample_ms=min_sample_ms)[0]


# ---------------------------------------------------------------------------------------- CUDA


def time_cuda_events(
    fn: Callable[[], object], *, warmup: int = 3, reps: int = 20, max_ms: float = 1500.0, min_reps: int = 8
) -> Timing:
    """CUDA-event time of each call of ``fn`` (no cache flush: a whole model's working set
    exceeds L2 anyway). Takes ``reps`` samples, or fewer (at least ``min_reps``) if they would
    take longer than ``max_ms``."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    estimate = max(start.elapsed_time(end), 1e-3)
    n = max(min_reps, min(reps, int(max_ms / estimate)))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for i in range(n):
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    return Timing.from_samples([s.elapsed_time(e) for s, e in zip(starts, ends)], "cuda events")


def time_do_bench(fn: Callable[[], object], *, cudagraph: bool = False, warmup_ms: int = 5, rep_ms: int = 20) -> Timing:
    """``triton.testing.do_bench`` (L2 flushed before every call) or ``do_bench_cudagraph``.

    ``do_bench_cudagraph`` replays ``fn`` unrolled in one CUDA graph (no launch gaps, no cache
    flush) and returns 10 samples, each the mean over one replay.
    """
    import triton.testing

    if cudagraph:
        run = lambda **kw: triton.testing.do_bench_cudagraph(fn, rep=rep_ms, **kw)
        method = f"triton do_bench_cudagraph(rep={rep_ms} ms)"
    else:
        run = lambda **kw: triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, **kw)
        method = f"triton do_bench(warmup={warmup_ms} ms, rep={rep_ms} ms, L2 flushed)"
    try:
        samples = run(return_mode="all")
    except (AssertionError, ValueError, TypeError):  # older Triton: no "all"; quantiles only
        median, p20, p80 = run(quantiles=list(QUANTILES))
        return Timing(median, p20, p80, n=-1, method=method)
    if isinstance(samples, torch.Tensor):
        samples = samples.tolist()
    return Timing.from_samples([float(s) for s in samples], method)


def capture_cuda_graph(fn: Callable[[], object], *, warmup: int = 3) -> tuple[Callable[[], None], object]:
    """Record ``fn`` into a CUDA graph after ``warmup`` calls on a side stream.

    Returns ``(replay, static_output)``: ``replay()`` re-runs the recorded work and refreshes
    ``static_output`` in place.
    """
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_output = fn()
    torch.cuda.synchronize()
    return graph.replay, static_output


# ------------------------------------------------------------------------------ copy bandwidth


def copy_bandwidth(device: torch.device, *, nbytes: int = 1 << 30, quick: bool = False) -> dict:
    """GB/s of a plain device-to-device (or host memory) copy, counting bytes read plus written.

    Uses ``nbytes`` per buffer (1 GiB on GPU; 64 MiB on CPU or in quick mode), random data.
    """
    if device.type != "cuda" or quick:
        nbytes = min(nbytes, 64 << 20)
    numel = nbytes // 4
    buffers = {"src": torch.randn(numel, device=device)}
    buffers["dst"] = torch.empty_like(buffers["src"])

    def copy() -> None:
        buffers["dst"].copy_(buffers["src"])

    if device.type == "cuda":
        timing = time_do_bench(copy, warmup_ms=10, rep_ms=50 if not quick else 10)
    else:
        timing = time_cpu(copy, reps=10 if not quick else 3)
    moved = 2 * numel * 4
    buffers.clear()
    return {
        "bytes_moved": moved,
        "gbps": moved / (timing.median_ms * 1e-3) / 1e9,
        "timing": timing.as_dict(),
        "what": f"dst.copy_(src), fp32 buffers of {numel * 4 / 2**20:.0f} MiB, bytes read + written",
    }
