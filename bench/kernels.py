"""Kernel microbenchmarks: route+pack, scale+fuse, their backwards, and the whole MoD block.

Ops (``OPS``), each at one feature shape ``[B, C, H, W]`` with ``k = C // capacity``:

* ``route_pack.fwd``     pooled router scores, stable top-k, gather -> ``xs, idx, w`` (inference)
* ``route_pack.bwd``     its backward from ``(grad_xs, grad_w)`` to ``(x, W1, W2)``
* ``scale_fuse.fwd``     ``x[t] = act(x[t] + w * y)`` in place (inference)
* ``scale_fuse.bwd``     backward of the out-of-place form to ``(x, y, w)``
* ``route_fuse.fwd``     the MoD block minus its convolutions, inference: route+pack, then
                         scale+fuse in place of a stand-in ``y`` (a fixed tensor; ``xs`` is
                         returned too, so a compiler cannot drop the packing)
* ``route_fuse.fwdbwd``  the same with ``y = xs``, out of place, forward + backward
* ``block.fwd``          the whole :class:`~mod_models.blocks.MoDBottleneck` (eval, in place)
* ``block.bwd``          its backward (train mode), from a stored forward
* ``block.fwdbwd``       forward + backward (train mode)
* ``block.deploy``       the whole block at inference: ``reference`` is the eval block as trained
                         (unfolded batch norms, in place), ``reference+compile`` its
                         ``torch.compile``, ``triton`` the deploy form
                         (:func:`mod_models.optimize_for_inference`: three launches)

Providers: ``reference`` (the unfused ops of :mod:`mod_models.functional`, eager),
``reference+compile`` (the same under ``torch.compile``, static shapes) and ``triton`` (the
fused kernels of :mod:`mod_kernels`). Every provider's outputs (and gradients) are compared
with the eager reference on identical inputs before it is timed.

Timing on CUDA, two numbers per case: the main one replays a CUDA graph of the op
(``triton.testing.do_bench_cudagraph``): device time, Python and launch overhead removed, no L2
flush, so working sets under the L2 size (60 MB on an H200: the late stages at B=64) may be served
from L2. Backward-only ops (``BACKWARD_ONLY_OPS``) cannot be captured apart from their forward and
are timed eagerly. The second, ``host_median_ms``, is ``triton.testing.do_bench`` of the eager call
(L2 flushed before each call): what an eager PyTorch program waits, host overhead included.
CPU: ``time.perf_counter`` (smoke only). GB/s from :mod:`bench.traffic` over the main timing, also
as a fraction of the copy bandwidth measured in the same run.

In-place ops are timed repeatedly on one buffer; to keep its values finite over thousands of
calls the whole-block case scales its last BatchNorm by 1e-3 for timing (after the
comparison, which uses the initialised weights). Costs do not depend on these values.
"""

from __future__ import annotations

import copy
import gc
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

import mod_models
from mod_models import build_model
from mod_models import functional as MF
from mod_models.blocks import MoDBlock, MoDBottleneck, last_norm

from . import agreement, traffic
from .env import stamp
from .models import DTYPES, MEMORY_FORMATS
from .providers import configure_dynamo, error_text
from .timing import Budget, Timing, time_cpu, time_do_bench

OPS = (
    "route_pack.fwd", "route_pack.bwd", "scale_fuse.fwd", "scale_fuse.bwd",
    "route_fuse.fwd", "route_fuse.fwdbwd", "block.fwd", "block.bwd", "block.fwdbwd", "block.deploy",
)
GRAD_OPS = {"route_pack.bwd", "scale_fuse.bwd", "route_fuse.fwdbwd", "block.bwd", "block.fwdbwd"}
# Backward-only ops replay a graph recorded outside the timed call, on the default stream, so
# autograd would launch them there: they are not captured into a CUDA graph.
BACKWARD_ONLY_OPS = {"route_pack.bwd", "scale_fuse.bwd", "block.bwd"}
PROVIDERS = ("reference", "reference+compile", "triton")
FUSION = "first_k"
ACTIVATION = "relu"  # the Bottleneck blocks of resnet50_mod / resnet75_mod
BLOCK_TIMING_NORM_SCALE = 1e-3

Log = Callable[[str], None]


@dataclass(frozen=True)
class KernelShape:
    """A MoD block input ``[batch, channels, height, width]`` in one dtype and memory format."""

    batch: int
    channels: int
    height: int
    width: int
    capacity: int = 64
    dtype: str = "fp32"
    memory_format: str = "nchw"

    @property
    def k(self) -> int:
        return MF.selected_channels(self.channels, self.capacity)

    def traffic(self) -> traffic.FeatureShape:
        return traffic.FeatureShape.of(self.batch, self.channels, self.height, self.width,
                                       capacity=self.capacity, dtype=DTYPES[self.dtype])

    def label(self) -> str:
        return f"B={self.batch} {self.channels}x{self.height}x{self.width} k={self.k} {self.dtype} {self.memory_format}"

    def fields(self) -> dict:
        return {"batch": self.batch, "channels": self.channels, "height": self.height, "width": self.width,
                "capacity": self.capacity, "k": self.k, "dtype": self.dtype, "memory_format": self.memory_format}


@dataclass(frozen=True)
class KernelTask:
    """One op at one shape, for some providers (timed in this order)."""

    shape: KernelShape
    op: str
    providers: tuple[str, ...]
    tier: int = 0


def stage_shapes(model_name: str = "resnet50_mod", resolution: int = 224) -> list[tuple[int, int, int, int]]:
    """``(C, H, W, capacity)`` of the inputs of the MoD blocks of a zoo model, one per distinct shape."""
    model = build_model(model_name, backend="reference").to("meta").eval()
    seen: list[tuple[int, int, int, int]] = []

    def hook(module: MoDBlock, args) -> None:
        _, c, h, w = args[0].shape
        shape = (int(c), int(h), int(w), module.capacity)
        if shape not in seen:
            seen.append(shape)

    handles = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, MoDBlock)]
    with torch.no_grad():
        model(torch.empty(1, 3, resolution, resolution, device="meta"))
    for handle in handles:
        handle.remove()
    return seen


# ------------------------------------------------------------------------------ implementations


def reference_route_pack(x: Tensor, fc1: Tensor, fc2: Tensor, k: int):
    """Unfused reference: ``(xs, idx, w, None)``."""
    scores = MF.router_scores(x, fc1, fc2)
    idx = MF.select_top_k(scores, k)
    return MF.gather_channels(x, idx), idx, scores.gather(1, idx), None


def reference_scale_fuse(x: Tensor, y: Tensor, w: Tensor, idx: Tensor, slot: Tensor | None, inplace: bool) -> Tensor:
    return MF.scale_and_fuse(x, y, w, idx, fusion=FUSION, activation=ACTIVATION, inplace=inplace)


def triton_route_pack(x: Tensor, fc1: Tensor, fc2: Tensor, k: int):
    import mod_kernels

    routed = mod_kernels.route_pack(x, k, fc1_weight=fc1, fc2_weight=fc2)
    return routed.xs, routed.idx, routed.w, routed.selected_slot


def triton_scale_fuse(x: Tensor, y: Tensor, w: Tensor, idx: Tensor, slot: Tensor | None, inplace: bool) -> Tensor:
    import mod_kernels

    return mod_kernels.scale_fuse(x, y, w, idx, slot, fusion=FUSION, activation=ACTIVATION, inplace=inplace)


def reference_route_fuse(x: Tensor, fc1: Tensor, fc2: Tensor, k: int, y: Tensor | None, inplace: bool):
    """The MoD block minus its convolutions (``y = xs`` when not given): ``(out, xs)``."""
    xs, idx, w, _ = reference_route_pack(x, fc1, fc2, k)
    y = xs if y is None else y
    return MF.scale_and_fuse(x, y, w, idx, fusion=FUSION, activation=ACTIVATION, inplace=inplace), xs


def triton_route_fuse(x: Tensor, fc1: Tensor, fc2: Tensor, k: int, y: Tensor | None, inplace: bool):
    """The fused path the MoD blocks run: route_pack + fuse_routed (single-pass input backward)."""
    import mod_kernels

    routed = mod_kernels.route_pack(x, k, fc1_weight=fc1, fc2_weight=fc2, fusion=FUSION)
    y = routed.xs if y is None else y
    return mod_kernels.fuse_routed(routed, y, activation=ACTIVATION, inplace=inplace), routed.xs


def slots_of(idx: Tensor, channels: int) -> Tensor:
    """``selected_slot [B, C]`` int32 of a selection ``idx [B, k]``: slot of each channel, -1 if unselected."""
    slot = torch.full((idx.shape[0], channels), -1, dtype=torch.int32, device=idx.device)
    slot.scatter_(1, idx, torch.arange(idx.shape[1], dtype=torch.int32, device=idx.device).expand_as(idx).contiguous())
    return slot


@dataclass
class Inputs:
    """Tensors of one task, built once, outside every timed region."""

    x: Tensor
    fc1: Tensor
    fc2: Tensor
    y: Tensor
    w: Tensor
    idx: Tensor
    slot: Tensor
    grad_x: Tensor
    grad_xs: Tensor
    grad_w: Tensor
    block: nn.Module | None = None


def make_inputs(shape: KernelShape, device: torch.device, seed: int, with_block: bool) -> Inputs:
    generator = torch.Generator(device=device).manual_seed(seed)
    dtype = DTYPES[shape.dtype]
    fmt = MEMORY_FORMATS[shape.memory_format]
    b, c, h, w, k = shape.batch, shape.channels, shape.height, shape.width, shape.k
    hidden = MF.router_hidden_channels(c)

    def randn(*size: int, scale: float = 1.0, dtype: torch.dtype = dtype) -> Tensor:
        return (torch.randn(*size, device=device, generator=generator) * scale).to(dtype)

    def feature(*size: int) -> Tensor:
        return randn(*size).contiguous(memory_format=fmt)

    idx = MF.select_top_k(torch.rand(b, c, device=device, generator=generator), k).contiguous()
    block = None
    if with_block:
        torch.manual_seed(seed)
        block = MoDBottleneck(c, capacity=shape.capacity, backend="reference")
        for m in block.modules():  # non-trivial running statistics, so eval-mode BN is not the identity
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
        block = block.to(device=device, dtype=dtype, memory_format=fmt)
    return Inputs(
        x=feature(b, c, h, w),
        fc1=randn(hidden, c, scale=c ** -0.5),
        fc2=randn(c, hidden, scale=hidden ** -0.5),
        y=feature(b, k, h, w),
        w=torch.rand(b, k, device=device, generator=generator),
        idx=idx,
        slot=slots_of(idx, c),
        grad_x=feature(b, c, h, w),
        grad_xs=feature(b, k, h, w),
        grad_w=torch.randn(b, k, device=device, generator=generator),
        block=block,
    )


def _deploy_path(block: MoDBlock) -> str:
    """``"fused"`` when the deploy form runs ``block`` as the fused three-launch kernel, else
    ``"fallback"`` (:func:`mod_kernels.fused_block.fused_block_plan`; Triton is imported here only)."""
    try:
        import mod_kernels
    except ImportError:  # no Triton: the triton provider reports itself unavailable
        return "unknown"
    plan = mod_kernels.fused_block_plan(block.fused_kind, block.channels, block.k, block.reduced_width)
    return "fused" if plan.fused else "fallback"


def _leaf(t: Tensor) -> Tensor:
    return t.detach().clone(memory_format=torch.preserve_format).requires_grad_(True)


@dataclass
class Prepared:
    """``run`` is timed; ``check()`` returns the outputs compared with the reference (fresh state)."""

    run: Callable[[], object]
    check: Callable[[], tuple]
    exact: tuple[int, ...] = ()


def prepare(op: str, provider: str, inputs: Inputs, k: int) -> Prepared:
    """Build the callable of ``op`` for ``provider`` (compiles lazily, on the first call)."""
    compiled = provider.endswith("+compile")
    if compiled:
        configure_dynamo()
    wrap = (lambda fn: torch.compile(fn, dynamic=False)) if compiled else (lambda fn: fn)
    triton = provider == "triton"
    route_pack_impl = triton_route_pack if triton else reference_route_pack
    scale_fuse_impl = triton_scale_fuse if triton else reference_scale_fuse
    route_fuse_impl = triton_route_fuse if triton else reference_route_fuse
    i = inputs

    if op == "route_pack.fwd":
        fn = wrap(lambda x, fc1, fc2: route_pack_impl(x, fc1, fc2, k)[:3])
        return Prepared(lambda: fn(i.x, i.fc1, i.fc2), lambda: fn(i.x, i.fc1, i.fc2), exact=(1,))

    if op == "route_pack.bwd":
        fn = wrap(lambda x, fc1, fc2: route_pack_impl(x, fc1, fc2, k))
        leaves = (_leaf(i.x), _leaf(i.fc1), _leaf(i.fc2))
        xs, _, w, _ = fn(*leaves)
        def run():
            return torch.autograd.grad((xs, w), leaves, (i.grad_xs, i.grad_w), retain_graph=True)

        return Prepared(run, run)

    if op == "scale_fuse.fwd":
        fn = wrap(lambda x, y, w, idx, slot: scale_fuse_impl(x, y, w, idx, slot, True))
        buffer = i.x.clone(memory_format=torch.preserve_format)
        return Prepared(lambda: fn(buffer, i.y, i.w, i.idx, i.slot),
                        lambda: (fn(i.x.clone(memory_format=torch.preserve_format), i.y, i.w, i.idx, i.slot),))

    if op == "scale_fuse.bwd":
        fn = wrap(lambda x, y, w, idx, slot: scale_fuse_impl(x, y, w, idx, slot, False))
        leaves = (_leaf(i.x), _leaf(i.y), _leaf(i.w))
        out = fn(*leaves, i.idx, i.slot)
        def run():
            return torch.autograd.grad(out, leaves, i.grad_x, retain_graph=True)

        return Prepared(run, run)

    if op == "route_fuse.fwd":
        def chain(x, fc1, fc2, y):
            return route_fuse_impl(x, fc1, fc2, k, y, True)

        fn = wrap(chain)
        buffer = i.x.clone(memory_format=torch.preserve_format)
        return Prepared(lambda: fn(buffer, i.fc1, i.fc2, i.y),
                        lambda: fn(i.x.clone(memory_format=torch.preserve_format), i.fc1, i.fc2, i.y))

    if op == "route_fuse.fwdbwd":
        def chain_train(x, fc1, fc2):
            return route_fuse_impl(x, fc1, fc2, k, None, False)[0]

        fn = wrap(chain_train)
        leaves = (_leaf(i.x), _leaf(i.fc1), _leaf(i.fc2))

        def step():
            out = fn(*leaves)
            return (out.detach(), *torch.autograd.grad(out, leaves, i.grad_x))

        return Prepared(step, step)

    if op == "block.deploy":
        block = copy.deepcopy(i.block).eval()
        block.inplace = True
        if triton:
            mod_models.optimize_for_inference(block)
        block.backend = "triton" if triton else "reference"
        fn = wrap(block)
        checked = (fn(i.x.clone(memory_format=torch.preserve_format)).detach().clone(),)
        timed = copy.deepcopy(i.block).eval()  # keep the in-place timing loop finite (module docstring)
        timed.inplace = True
        with torch.no_grad():
            last_norm(timed).weight.mul_(BLOCK_TIMING_NORM_SCALE)
        if triton:
            mod_models.optimize_for_inference(timed)
        timed.backend = block.backend
        timed_fn = wrap(timed)
        buffer = i.x.clone(memory_format=torch.preserve_format)
        return Prepared(lambda: timed_fn(buffer), lambda: checked)

    if op.startswith("block."):
        block = copy.deepcopy(i.block)
        block.backend = "triton" if triton else "reference"
        if op == "block.fwd":
            block.eval()
            block.inplace = True
            fn = wrap(block)
            checked = (fn(i.x.clone(memory_format=torch.preserve_format)).detach().clone(),)
            with torch.no_grad():  # keep the in-place timing loop finite (module docstring)
                last_norm(block).weight.mul_(BLOCK_TIMING_NORM_SCALE)
            buffer = i.x.clone(memory_format=torch.preserve_format)
            return Prepared(lambda: fn(buffer), lambda: checked)
        block.train()
        fn = wrap(block)
        params = list(block.parameters())
        x_leaf = _leaf(i.x)
        if op == "block.bwd":
            out = fn(x_leaf)
            def run():
                return torch.autograd.grad(out, [x_leaf, *params], i.grad_x, retain_graph=True)

            return Prepared(run, run)

        def step_block():
            out = fn(x_leaf)
            return (out.detach(), *torch.autograd.grad(out, [x_leaf, *params], i.grad_x))

        return Prepared(step_block, step_block)
    raise ValueError(f"unknown op {op!r}; expected one of {OPS}")


# -------------------------------------------------------------------------------------- runner


@dataclass(frozen=True)
class KernelTimer:
    warmup_ms: int = 5
    rep_ms: int = 20  # do_bench's time per case, raised to 10 calls of slow cases (at most max_rep_ms)
    max_rep_ms: int = 250
    graph_rep_ms: int = 10
    graphs: bool = True  # CUDA: the main timing replays a CUDA graph (device time); see _time
    cpu_reps: int = 5
    cpu_warmup_ms: float = 200.0
    compile_estimate_s: float = 10.0


def run_tasks(
    tasks: list[KernelTask],
    *,
    device: torch.device,
    env: dict,
    copy_gbps: float | None,
    budget: Budget | None = None,
    timer: KernelTimer = KernelTimer(),
    seed: int = 0,
    log: Log = print,
    on_task: Callable[[list[dict]], None] | None = None,
) -> list[dict]:
    """Run ``tasks`` in order (skipping, with a record, what the budget no longer allows).

    ``on_task(records)`` is called after every task with the records so far (periodic saving).
    """
    budget = budget or Budget(None)
    records: list[dict] = []
    compile_cost = [timer.compile_estimate_s]
    interpreter = device.type == "cpu"
    for number, task in enumerate(tasks, 1):
        shape = task.shape
        base = {"section": "kernel", "op": task.op, **shape.fields(), "fusion": FUSION, "activation": ACTIVATION}
        nbytes = traffic.op_bytes(task.op, shape.traffic(), activation=ACTIVATION, fusion=FUSION)
        if not budget.allows(1.0):
            for provider in task.providers:
                records.append(stamp({**base, "provider": provider, "status": "skipped", "bytes": nbytes,
                                      "reason": "time budget", "tier": task.tier}, env))
            continue
        try:
            inputs = make_inputs(shape, device, seed, with_block=task.op.startswith("block."))
        except torch.OutOfMemoryError as error:
            for provider in task.providers:
                records.append(stamp({**base, "provider": provider, "status": "error", "bytes": nbytes,
                                      "reason": error_text(error), "tier": task.tier}, env))
            continue
        if task.op == "block.deploy":
            base["deploy_path"] = _deploy_path(inputs.block)
        grad = task.op in GRAD_OPS
        tf32_convs = (task.op.startswith("block.") and device.type == "cuda" and torch.backends.cudnn.allow_tf32)
        rtol, atol = agreement.kernel_tolerance(DTYPES[shape.dtype], tf32_convs=tf32_convs)
        reference_outputs = None
        try:
            with torch.inference_mode(not grad):
                reference_outputs = _detach(prepare(task.op, "reference", inputs, shape.k).check())
        except Exception as error:  # noqa: BLE001
            log(f"  reference {task.op} {shape.label()} failed: {error_text(error)}")
        for provider in task.providers:
            record = stamp({**base, "provider": provider, "status": "ok", "reason": "", "bytes": nbytes,
                            "tier": task.tier, "interpreter": interpreter and provider == "triton"}, env)
            records.append(record)
            label = f"[{number}/{len(tasks)}] {task.op:18s} {shape.label():40s} {provider}"
            compiled = provider.endswith("+compile")
            cost = compile_cost[0] if compiled else 0.5
            if not budget.allows(cost):
                record.update(status="skipped", reason="time budget", budget_left_s=round(max(budget.left(), 0.0), 1),
                              estimated_cost_s=round(cost, 1))
                continue
            try:
                start = time.perf_counter()
                with torch.inference_mode(not grad):
                    prepared = prepare(task.op, provider, inputs, shape.k)
                    outputs = _detach(prepared.check())
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if compiled:
                    record["compile_s"] = round(time.perf_counter() - start, 2)
                    compile_cost[0] = max(record["compile_s"] * 1.2, 2.0)
            except Exception as error:  # noqa: BLE001 - reported, never faked
                record.update(status="unavailable", reason=error_text(error))
                log(f"  n/a   {label}: {record['reason']}")
                _cleanup(device, compiled)
                continue
            if reference_outputs is None:
                record["agreement"] = {"ok": False, "rel_err": None, "tolerance": rtol, "atol": atol,
                                       "detail": "reference failed"}
            elif provider == "reference":
                record["agreement"] = {"ok": True, "rel_err": 0.0, "tolerance": rtol, "atol": atol,
                                       "detail": "the reference itself"}
            else:
                record["agreement"] = agreement.compare(outputs, reference_outputs, rtol, atol=atol,
                                                        exact=prepared.exact).as_dict()
            try:
                with torch.inference_mode(not grad):
                    timing, host_timing = _time(prepared.run, device, shape, task.op, timer,
                                                interpreter and provider == "triton")
            except Exception as error:  # noqa: BLE001
                record.update(status="error", reason=error_text(error))
                log(f"  error {label}: {record['reason']}")
                _cleanup(device, compiled)
                continue
            record.update(median_ms=timing.median_ms, p20_ms=timing.p20_ms, p80_ms=timing.p80_ms, n=timing.n,
                          method=timing.method)
            if host_timing is not None:
                record.update(host_median_ms=host_timing.median_ms, host_p20_ms=host_timing.p20_ms,
                              host_p80_ms=host_timing.p80_ms, host_method=host_timing.method)
            if nbytes is not None:
                record["gbps"] = nbytes / (timing.median_ms * 1e-3) / 1e9
                if copy_gbps:
                    record["copy_fraction"] = record["gbps"] / copy_gbps
            agreed = record["agreement"]["ok"]
            gbps = f"{record['gbps']:8.1f} GB/s" if "gbps" in record else " " * 13
            log(f"  {timing.median_ms:9.4f} ms {gbps} {'' if agreed else 'OUTPUTS DIFFER '}{label}")
            del prepared
            _cleanup(device, compiled)
        del inputs
        _cleanup(device, False)
        if on_task is not None:
            on_task(records)
    return records


def _detach(outputs) -> tuple:
    if isinstance(outputs, Tensor):
        outputs = (outputs,)
    return tuple(t.detach().clone() if isinstance(t, Tensor) else t for t in outputs)


def _cleanup(device: torch.device, compiled: bool) -> None:
    if compiled:
        torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _time(run: Callable[[], object], device: torch.device, shape: KernelShape, op: str, timer: KernelTimer,
          interpreter: bool) -> tuple[Timing, Timing | None]:
    """``(timing, host-inclusive timing or None)``.

    CUDA: the main timing replays a CUDA graph of the op (``do_bench_cudagraph``): device time,
    the kernels' own speed, without Python and launch overhead. Backward-only ops cannot be
    captured apart from their forward, so they (and ops whose capture fails) are timed eagerly
    with ``do_bench``; every op is also timed eagerly (host overhead included), the second value.
    CPU: ``time.perf_counter`` (smoke only).
    """
    if device.type == "cuda":
        # Enough repetitions for a median with spread also for slow cases: rep >= 10 calls (capped).
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        torch.cuda.synchronize()
        rep_ms = int(min(max(timer.rep_ms, 10 * start.elapsed_time(end)), timer.max_rep_ms))
        eager = time_do_bench(run, warmup_ms=timer.warmup_ms, rep_ms=rep_ms)
        eager = Timing(eager.median_ms, eager.p20_ms, eager.p80_ms, eager.n, eager.method + ", host overhead included")
        if not timer.graphs or op in BACKWARD_ONLY_OPS:
            return eager, None
        try:
            graph = time_do_bench(run, cudagraph=True, rep_ms=timer.graph_rep_ms)  # unrolled: keep it short
        except Exception as error:  # noqa: BLE001 - e.g. an op that cannot be captured
            torch.cuda.synchronize()
            return Timing(eager.median_ms, eager.p20_ms, eager.p80_ms, eager.n,
                          eager.method + f" (CUDA graph capture failed: {error_text(error)[:80]})"), None
        return graph, eager
    if interpreter:
        timing = time_cpu(run, reps=2, warmup=1, warmup_ms=0.0)
    else:
        timing = time_cpu(run, reps=timer.cpu_reps, warmup_ms=timer.cpu_warmup_ms)
    if interpreter:
        return Timing(timing.median_ms, timing.p20_ms, timing.p80_ms, timing.n,
                      timing.method + ", Triton interpreter"), None
    return timing, None


# ---------------------------------------------------------------------------------------- plans


def gpu_plan(
    stages: list[tuple[int, int, int, int]],
    *,
    batches: tuple[int, ...] = (64, 256, 1),
    dtypes: tuple[str, ...] = ("bf16", "fp32"),
    formats: tuple[str, ...] = ("channels_last", "nchw"),
    ops: tuple[str, ...] = OPS,
    compile_ops: tuple[str, ...] = ("route_fuse.fwd", "route_fuse.fwdbwd", "block.fwd", "block.fwdbwd",
                                    "route_pack.fwd", "scale_fuse.fwd"),
    compile: bool = True,
    fallback_capacity: int | None = 2,
) -> list[KernelTask]:
    """Tasks in priority order (a time budget cuts the tail):

    deploy. the whole inference block (``block.deploy``: the deploy form vs the reference eval block
       and its torch.compile) at the first dtype/format (bf16 channels_last), at B = 64 and B = 1;
       then the first stage at ``fallback_capacity`` (2: ``f_k`` too wide for the fused kernel, so
       the deploy form's fallback: routing kernels, folded convolutions, fusion kernel), eager only;
    0. the first batch size (64: the targets' shapes) at the first dtype/format (bf16
       channels_last): every other op, eager reference + triton;
    1. torch.compile of the route+fuse chain there;
    2. the first batch size at the other dtype/format combinations, eager reference + triton;
    3. the other batch sizes, eager reference + triton;
    4. torch.compile of the chain for the other combinations at the first batch;
    5. torch.compile of the whole block and the single ops at the first batch;
    6. torch.compile at the other batch sizes.
    """
    combos = [(d, f) for d in dtypes for f in formats]

    def shapes(batch: int, combo_list) -> list[KernelShape]:
        return [KernelShape(batch, c, h, w, cap, d, f) for d, f in combo_list for c, h, w, cap in stages]

    first, rest = batches[0], batches[1:]
    chain = tuple(op for op in compile_ops if op.startswith("route_fuse") and op in ops)
    others = tuple(op for op in compile_ops if not op.startswith("route_fuse") and op in ops)
    eager = ("reference", "triton")
    deploy_providers = ("reference", "triton") + (("reference+compile",) if compile else ())
    tasks = []
    if "block.deploy" in ops:
        tasks += [KernelTask(s, "block.deploy", deploy_providers, -1)
                  for b in dict.fromkeys((first, 1)) for s in shapes(b, combos[:1])]
        if fallback_capacity is not None and stages:
            c, h, w, _ = stages[0]
            d, f = combos[0]
            tasks.append(KernelTask(KernelShape(first, c, h, w, fallback_capacity, d, f), "block.deploy", eager, -1))
        ops = tuple(op for op in ops if op != "block.deploy")
    tasks += [KernelTask(s, op, eager, 0) for s in shapes(first, combos[:1]) for op in ops]
    if compile:
        tasks += [KernelTask(s, op, ("reference+compile",), 1) for s in shapes(first, combos[:1]) for op in chain]
    tasks += [KernelTask(s, op, eager, 2) for s in shapes(first, combos[1:]) for op in ops]
    tasks += [KernelTask(s, op, eager, 3) for b in rest for s in shapes(b, combos) for op in ops]
    if compile:
        tasks += [KernelTask(s, op, ("reference+compile",), 4) for s in shapes(first, combos[1:]) for op in chain]
        tasks += [KernelTask(s, op, ("reference+compile",), 5) for s in shapes(first, combos) for op in others]
        tasks += [KernelTask(s, op, ("reference+compile",), 6) for b in rest for s in shapes(b, combos)
                  for op in chain + others]
    return tasks


def simple_plan(shapes: list[KernelShape], providers: tuple[str, ...], ops: tuple[str, ...] = OPS) -> list[KernelTask]:
    """Every op at every shape for the given providers (CPU smoke runs, dry runs)."""
    return [KernelTask(s, op, providers, 0) for s in shapes for op in ops]
