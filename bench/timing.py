"""Latency measurement: warm-up, many samples, the median with its spread.

Every timer here takes a zero-argument callable whose inputs were built before the call (no
tensor is created in the timed region by the benchmark itself) and returns a :class:`Timing`.

* CPU: :func:`time_cpu_interleaved` -- ``torch.utils.benchmark.Timer.blocked_autorange`` for
  each case in turn, the cases of one comparison timed round-robin so that a drift of the
  machine hits all of them alike (:func:`time_cpu` is the same for one case).
* CUDA, whole models: :func:`time_cuda_events` -- one pair of CUDA events per call.
* CUDA, kernels: :func:`time_do_bench` -- ``triton.testing.do_bench`` (L2 flushed before each
  call) or, for small cases, ``do_bench_cudagraph`` (calls replayed from one CUDA graph).
* :func:`capture_cuda_graph` records a callable into a CUDA graph (batch-1 model latency).
* :func:`copy_bandwidth` measures the device's copy bandwidth, the yardstick for GB/s.
* :func:`percentile` is the one quantile helper of the package; :class:`Budget` a deadline,
  :class:`Progress` the overall progress of a run with an estimate of the time left.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Hashable
from dataclasses import asdict, dataclass

import numpy as np
import torch

# torch.utils.benchmark imports torch.utils.cpp_extension, which warns "No CUDA runtime is found" on
# a machine with a CUDA toolkit but no GPU; nothing here compiles C++, so that one import is muted.
_cpp_logger = logging.getLogger("torch.utils.cpp_extension")
_cpp_level = _cpp_logger.level
_cpp_logger.setLevel(logging.ERROR)
try:
    from torch.utils import benchmark as torch_benchmark
finally:
    _cpp_logger.setLevel(_cpp_level)

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
    """Linear-interpolated quantile ``q`` in [0, 1] of ``samples`` (``numpy.quantile``)."""
    if not samples:
        raise ValueError("percentile of no samples")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile must be in [0, 1], got {q}")
    return float(np.quantile(np.asarray(samples, dtype=np.float64), q))


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

    Each case gets a ``torch.utils.benchmark.Timer`` (``time.perf_counter``, as many threads as
    torch uses now). In a round, ``blocked_autorange`` first sizes a block of back-to-back calls so
    that the timer's own overhead is negligible (untimed calls that also bring the case's weights
    back into the caches the previous case evicted), then times blocks for ``samples_per_round -
    0.5`` times one call's time (at least ``min_sample_ms`` each: sub-millisecond calls get
    several calls per block); a sample is one block's time per call, so a round adds about
    ``samples_per_round`` samples of a slow case and at least one of any case. Interleaving makes
    a drift of the machine (clock, other load) hit all cases of a comparison alike.

    Args:
        cases: key -> callable.
        rounds: number of rounds (stops early, after at least 2, when ``budget`` runs out).
        warmup: untimed calls per case before the first round (at least 2; see ``warmup_ms``).
        warmup_ms: keep warming a case until this much time has passed (at most 5 s).
    """
    if rounds < 1 or samples_per_round < 1:
        raise ValueError(f"rounds and samples_per_round must be >= 1, got {rounds} and {samples_per_round}")
    threads = torch.get_num_threads()
    timers: dict[Hashable, torch_benchmark.Timer] = {}
    block_s: dict[Hashable, float] = {}
    for key, fn in cases.items():
        for _ in range(warmup - 2):
            fn()
        timer = torch_benchmark.Timer("fn()", globals={"fn": fn}, timer=time.perf_counter, num_threads=threads)
        # The rest of the warm-up (two calls at least, ``warmup_ms`` in all) also estimates one call's time.
        warm = timer.blocked_autorange(min_run_time=min(warmup_ms, 5000.0) * 1e-3)
        timers[key] = timer
        block_s[key] = max(warm.median, min_sample_ms * 1e-3)
    samples: dict[Hashable, list[float]] = {key: [] for key in cases}
    calls: dict[Hashable, set[int]] = {key: set() for key in cases}
    for round_index in range(rounds):
        if round_index >= 2 and budget is not None and not budget.allows():
            break
        for key, timer in timers.items():
            # Half a block short of the target, so a block slightly faster than the estimate adds no extra block.
            measurement = timer.blocked_autorange(min_run_time=(samples_per_round - 0.5) * block_s[key])
            samples[key] += [t * 1e3 for t in measurement.times]
            calls[key].add(measurement.number_per_run)
        if progress is not None:
            progress(f"round {round_index + 1}/{rounds}")
    return {
        key: Timing.from_samples(values, "torch.utils.benchmark blocked_autorange, interleaved rounds, "
                                 f"{'/'.join(str(c) for c in sorted(calls[key]))} call(s) per sample")
        for key, values in samples.items()
    }


def time_cpu(fn: Callable[[], object], *, reps: int = 10, warmup: int = 10, warmup_ms: float = 200.0,
             min_sample_ms: float = 1.0) -> Timing:
    """A single CPU case (:func:`time_cpu_interleaved` with one round): about ``reps`` samples after at
    least ``warmup`` calls and ``warmup_ms`` of calls (the first calls of small ops are often many
    times slower)."""
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
        def run(**kw):
            return triton.testing.do_bench_cudagraph(fn, rep=rep_ms, **kw)

        method = f"triton do_bench_cudagraph(rep={rep_ms} ms)"
    else:
        def run(**kw):
            return triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, **kw)

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


# ------------------------------------------------------------------------------------ progress


def format_duration(seconds: float) -> str:
    """``42s``, ``3m10s``, ``1h02m``: a duration for a progress line (whole seconds)."""
    if seconds < 0 or not math.isfinite(seconds):
        raise ValueError(f"a duration must be finite and >= 0, got {seconds}")
    total = round(seconds)
    if total < 60:
        return f"{total}s"
    if total < 3600:
        return f"{total // 60}m{total % 60:02d}s"
    return f"{total // 3600}h{total % 3600 // 60:02d}m"


class Progress:
    """Overall progress of a run of ``total`` cases and an estimate of the time left.

    Every case has a weight, its expected cost relative to the others (``total_weight`` in all).
    The estimate assumes the weight still to run goes at the speed measured so far:
    ``elapsed * (total_weight - done_weight) / done_weight``.
    """

    def __init__(self, total: int, total_weight: float, clock: Callable[[], float] = time.monotonic) -> None:
        if total < 0 or not total_weight > 0:
            raise ValueError("progress needs total >= 0 cases and a positive total weight, "
                             f"got {total}, {total_weight}")
        self.total, self.total_weight, self.clock = total, total_weight, clock
        self.start = clock()
        self.done = 0
        self.done_weight = 0.0

    def elapsed(self) -> float:
        return self.clock() - self.start

    def seconds_for(self, weight: float) -> float | None:
        """Seconds ``weight`` takes at the speed measured so far (None before any case finished)."""
        if self.done_weight <= 0:
            return None
        return self.elapsed() * weight / self.done_weight

    def eta(self) -> float | None:
        return self.seconds_for(max(self.total_weight - self.done_weight, 0.0))

    def advance(self, weight: float) -> tuple[str, str]:
        """One more case of ``weight`` finished: ``("[12/40]", "1m05s elapsed, ETA ~3m10s")``."""
        self.done += 1
        self.done_weight += weight
        eta = self.eta()
        width = len(str(self.total))
        left = "done" if self.done >= self.total else f"ETA ~{format_duration(eta)}" if eta is not None else "ETA ?"
        return f"[{self.done:>{width}}/{self.total}]", f"{format_duration(self.elapsed())} elapsed, {left}"
