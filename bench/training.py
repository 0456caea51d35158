"""Training-step rows of the model table: one optimizer step of every MoD variant beside its
torchvision baseline and its floors.

**The step** is the training CLI's (``mod_models.train``, one batch of ``train_one_epoch``) on a
fixed batch: forward and cross-entropy loss under ``torch.autocast`` (bf16 on a GPU; none in
fp32), ``zero_grad(set_to_none=True)``, backward, and an SGD step with the CLI's recipe
(:func:`mod_models.train.loop.make_optimizer`: lr 0.1, momentum 0.9, weight decay 1e-4; the
model's parameters stay fp32 under AMP, as in the CLI). The model is in train mode: batch norms
normalise with the batch's statistics and update their running statistics, dropout draws masks.
The labels (1000 classes) are drawn with the input.

For one :class:`~bench.models.ModelConfig` and one baseline family, :func:`bench_train_family`
builds every case (network x provider): a copy of the model on the device, its optimizer, the
batch and one warm-up step (which also compiles, autotunes and creates the momentum buffers),
all outside the timed region. Then, per case:

1. one checked step from a saved state: the agreement of a MoD provider (below), and the peak
   memory of a step (CUDA: ``torch.cuda.max_memory_allocated`` after resetting the peak; CPU:
   the tensors live at the step's peak, from the CPU allocator's events under
   ``torch.profiler(profile_memory=True)`` plus the tensors that existed before the step);
2. with ``config.cuda_graph``, the whole step (forward, loss, backward, optimizer step) captured
   into one CUDA graph as PyTorch documents whole-network capture (warm-up on a side stream,
   grads set to None before the capture so that backward allocates them from the graph's pool,
   autocast without its weight cache), and one replay from the saved state checked against the
   eager step (a case that cannot be captured says why, in place of a time);
3. the timing of the step: on the CPU all cases of the family in interleaved rounds
   (:func:`bench.timing.time_cpu_interleaved`), on CUDA each with CUDA events.

**Agreement.** The provider and the eager reference backend take the same step from the same
state (state_dict, optimizer state, batch, RNG seed). Where the provider's selections can be read
(eager reference and triton), the reference is forced to them (teacher forcing, as for
inference: :mod:`bench.agreement`) and must give the same loss, the same optimizer update
(momentum buffer: gradient plus momentum and weight decay) for every parameter tensor, the same
parameters and batch-norm statistics after the step; every selection must be a top-k of the
forced run's scores up to a near-tie. Compiled providers, whose selections cannot be read, are
compared with the unforced reference at a looser tolerance. A provider that skips the backward of
the router or of ``f_k`` leaves those parameters' updates off by O(1) and fails.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mod_models import BASELINE_OF, set_backend
from mod_models.tools.analysis import recording_selections
from mod_models.train.config import TrainConfig
from mod_models.train.loop import make_optimizer

from . import agreement
from .env import stamp
from .models import (
    DTYPES,
    MEMORY_FORMATS,
    Log,
    ModelCache,
    ModelConfig,
    OnCase,
    _free,
    _mod_blocks,
    _put_timing,
    case_weight,
    families,
    thread_setting,
)
from .providers import configure_dynamo, error_text, graph_break_count, has_mod_blocks
from .timing import Budget, time_cpu_interleaved, time_cuda_events

RECIPE = TrainConfig()  # the training CLI's defaults: SGD lr 0.1, momentum 0.9, weight decay 1e-4
NUM_CLASSES = 1000  # the zoo's default head
STEP = (f"forward + cross-entropy, zero_grad(set_to_none), backward, SGD(lr={RECIPE.lr}, momentum={RECIPE.momentum}, "
        f"weight_decay={RECIPE.weight_decay}); train mode")
TRAIN_DTYPES = ("fp32", "bf16")  # fp16 AMP needs a GradScaler, whose inf check syncs with the host

# Agreement of a training step (see the module docstring). Loss: relative difference. Updates:
# per parameter tensor, ||b_provider - b_reference|| / ||b_reference|| of the momentum buffers
# after the step, the denominator floored at 1% of the tensor's share of all updates (a tensor
# whose update is far below the model's average per element is judged against that average).
# Parameters after the step, all together: ||p_provider - p_reference|| / ||p_reference - p_before||.
# Batch-norm statistics: relative L2 of their change, all together.
# Measured on this CPU, fp32, teacher-forced, fresh weights: the triton backend (Triton's
# interpreter) against the reference, resnet18_mod, batch 2 at 32 px: loss 1.3e-5, worst update
# tensor 4.0e-4 (a batch norm of f_k, normalising 32 values), parameters 9.6e-5; batch 8 at 64 px:
# loss 0, 4.5e-5, 6.9e-7. The reference in channels_last against NCHW (other convolution rounding
# in every layer, a harsher case), batch 2 at 32 px: loss 5.4e-5, 1.1e-3, 2.9e-4. The tolerances
# are about 10x the harsher case and 2 orders of magnitude below what a skipped backward does
# (O(1) in the tensors it starves). bf16: see train_agreement (the loss is judged, at the model
# table's teacher-forcing tolerance; triton vs reference 1.8e-3 measured, batch 4 at 32 px).
LOSS_TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 2e-2}
UPDATE_TOLERANCE = {torch.float32: 1e-2}
# Selections of a bf16 step: train-mode batch norms over small maps amplify rounding between the
# blocks (the forced run's scores at layer4 of resnet18_mod moved by up to 7e-3 from the triton
# backend's, 32 px at batch 2 and 4: 1x1 maps, a batch norm over 2-4 values), so its near-ties
# are judged at 1e-2, still 8x below the smallest per-sample score spread of the ResNets (0.08);
# the fp32 step (see train_agreement) is judged at the model table's fp32 score tolerance.
AMP_SCORE_TOLERANCE = {torch.bfloat16: 1e-2}
# Without teacher forcing (torch.compile) a near-tie flip changes f_k's gradient in one sample:
UNFORCED_UPDATE_TOLERANCE = 5e-2
UNFORCED_LOSS_TOLERANCE = {torch.float32: 1e-2, torch.bfloat16: 5e-2}
# A CUDA graph replay against the eager step it captured (same kernels): fp32 as the forced check;
# bf16 judges the loss and the parameters (a replay without its backward or optimizer step leaves
# them where they were: 1.0), not the updates tensor by tensor.
REPLAY_TOLERANCE = {torch.float32: 1e-2, torch.bfloat16: 0.5}
FLOOR_SHARE = 1e-2


@dataclass(frozen=True)
class TrainTimer:
    """Warm-up and samples of the timed steps (a step takes 10-1000x an inference call)."""

    cpu_rounds: int = 3
    cpu_samples_per_round: int = 2
    cpu_warmup: int = 2
    cuda_warmup: int = 2
    cuda_reps: int = 10
    cuda_max_ms: float = 1500.0
    compile_estimate_s: float = 120.0  # assumed cost of compiling a forward and backward before one was measured


# ------------------------------------------------------------------------------------ the step


class TrainStep:
    """One training step of ``model`` on a fixed batch, as the training CLI takes it.

    ``forward`` is ``model`` or its ``torch.compile``; the optimizer steps ``model``'s parameters.
    Calling the object takes a step and returns the loss (detached; no host sync).
    """

    def __init__(self, model: nn.Module, forward: Callable[[Tensor], Tensor], x: Tensor, y: Tensor,
                 amp_dtype: torch.dtype | None) -> None:
        self.model = model.train()
        self.forward = forward
        self.optimizer = make_optimizer(model, RECIPE)
        self.x, self.y = x, y
        self.amp_dtype = amp_dtype
        self.last_loss: Tensor | None = None
        self.graph = None

    def loss(self, cache_enabled: bool = True) -> Tensor:
        with torch.autocast(self.x.device.type, dtype=self.amp_dtype or torch.float32,
                            enabled=self.amp_dtype is not None, cache_enabled=cache_enabled):
            return F.cross_entropy(self.forward(self.x), self.y)

    def __call__(self) -> Tensor:
        loss = self.loss()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.last_loss = loss.detach()
        return self.last_loss

    def capture(self, warmup: int = 3) -> tuple[Callable[[], None], int]:
        """Capture the whole step into a CUDA graph (PyTorch's whole-network capture); returns
        ``(replay, peak bytes allocated during the capture)``. Every replay steps the same tensors."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                self.optimizer.zero_grad(set_to_none=True)
                loss = self.loss(cache_enabled=False)
                loss.backward()
                self.optimizer.step()
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        self.optimizer.zero_grad(set_to_none=True)  # backward allocates the grads from the graph's pool
        torch.cuda.reset_peak_memory_stats()
        with torch.cuda.graph(graph):
            loss = self.loss(cache_enabled=False)
            loss.backward()
            self.optimizer.step()
        torch.cuda.synchronize()
        self.graph, self.last_loss = graph, loss.detach()
        return graph.replay, torch.cuda.max_memory_allocated()

    # The state a step starts from: parameters, buffers and the optimizer's momentum buffers, copied
    # to the host (a copy on the device would count in the device's peak memory).
    def snapshot(self) -> dict[str, Tensor]:
        state = {f"model.{k}": v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
        for name, p in self.model.named_parameters():
            buf = self.optimizer.state.get(p, {}).get("momentum_buffer")
            if buf is not None:
                state[f"momentum.{name}"] = buf.detach().to("cpu", copy=True)
        return state

    def restore(self, state: dict[str, Tensor]) -> None:
        """Copy ``state`` into the tensors in place (a captured graph keeps reading the same memory)."""
        with torch.no_grad():
            for k, v in self.model.state_dict().items():
                v.copy_(state[f"model.{k}"])
            for name, p in self.model.named_parameters():
                saved = state.get(f"momentum.{name}")
                slot = self.optimizer.state[p]
                if saved is None:
                    slot.pop("momentum_buffer", None)
                elif slot.get("momentum_buffer") is not None:
                    slot["momentum_buffer"].copy_(saved)
                else:
                    slot["momentum_buffer"] = saved.to(p.device, copy=True)

    def persistent_bytes(self) -> int:
        """Bytes of the tensors that live across steps: parameters, their grads, buffers, optimizer
        state, the batch (each storage once)."""
        tensors = [*self.model.parameters(), *self.model.buffers(), self.x, self.y]
        tensors += [p.grad for p in self.model.parameters() if p.grad is not None]
        tensors += [t for state in self.optimizer.state.values() for t in state.values() if isinstance(t, Tensor)]
        seen: dict[int, int] = {}
        for t in tensors:
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        return sum(seen.values())


# ------------------------------------------------------------------------------- providers


@dataclass(frozen=True)
class TrainProvider:
    """Who takes a training step: a MoD backend (``None`` for networks without MoD blocks), eager
    or under ``torch.compile`` (the model compiled, the optimizer step eager, as the CLI's
    ``--compile``). A MoD provider is compared with the baseline and floors of its mode."""

    name: str
    backend: str | None = None
    compiled: bool = False

    @property
    def mode(self) -> str:
        return "compile" if self.compiled else "eager"

    @property
    def selections_readable(self) -> bool:
        return not self.compiled

    def prepare(self, model: nn.Module, x: Tensor, y: Tensor, amp_dtype: torch.dtype | None) -> TrainStep:
        """The step to time; ``model`` (on its device, memory format, fp32) is owned by it from now on."""
        if self.backend is not None:
            if not has_mod_blocks(model):
                raise ValueError(f"provider {self.name!r} sets a MoD backend, but the model has no MoD blocks")
            set_backend(model, self.backend)
        forward: Callable[[Tensor], Tensor] = model
        if self.compiled:
            configure_dynamo()
            import torch._inductor.config as inductor_config

            # Dropout (mobilenet_v2's head) draws from the eager RNG stream, so that the compiled
            # step can be compared with the eager reference from the same seed.
            inductor_config.fallback_random = True
            forward = torch.compile(model, dynamic=False)
        return TrainStep(model, forward, x, y, amp_dtype)


REFERENCE_STEP = TrainProvider("reference", backend="reference")
TRITON_STEP = TrainProvider("triton", backend="triton")
REFERENCE_COMPILED_STEP = TrainProvider("reference+compile", backend="reference", compiled=True)
TRITON_COMPILED_STEP = TrainProvider("triton+compile", backend="triton", compiled=True)
TRAIN_PROVIDERS = {p.name: p for p in (REFERENCE_STEP, TRITON_STEP, REFERENCE_COMPILED_STEP, TRITON_COMPILED_STEP)}
# The baseline and floors of each mode, keyed by ``compiled``.
PLAIN_STEPS = {False: TrainProvider("eager"), True: TrainProvider("compile", compiled=True)}


# ---------------------------------------------------------------------------------- batches


def make_batch(config: ModelConfig, seed: int) -> tuple[Tensor, Tensor]:
    """Input (in the config's memory format, fp32: autocast casts) and labels, drawn together."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(config.batch, 3, config.resolution, config.resolution, generator=generator)
    y = torch.randint(0, NUM_CLASSES, (config.batch,), generator=generator)
    x = x.to(config.device).contiguous(memory_format=MEMORY_FORMATS[config.memory_format])
    return x, y.to(config.device)


def amp_dtype(config: ModelConfig) -> torch.dtype | None:
    if config.dtype not in TRAIN_DTYPES:
        raise ValueError(f"training steps run in {TRAIN_DTYPES}, not {config.dtype!r} "
                         "(fp16 AMP needs a GradScaler, whose inf check syncs with the host)")
    return None if config.dtype == "fp32" else DTYPES[config.dtype]


def materialize(cache: ModelCache, name: str, role: str, config: ModelConfig) -> nn.Module:
    """A fresh fp32 copy in train mode on the config's device and memory format."""
    model = copy.deepcopy(cache.get(name, role)).to(config.device)
    if config.memory_format == "channels_last":
        model = model.to(memory_format=torch.channels_last)
    return model.train()


# ---------------------------------------------------------------------------------- memory


def peak_memory(train_step: TrainStep, device: torch.device) -> tuple[Tensor, dict]:
    """Take one step and measure the bytes live at its peak: ``(the loss, fields)``."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        result = train_step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        return result, {"peak_mem_mib": peak / 2**20, "state_mib": before / 2**20,
                        "peak_mem_method": "torch.cuda.max_memory_allocated over one step (everything allocated "
                                           "on the device, the model's state included)"}
    # The previous step's grads live until this step's zero_grad (after the forward). They are freed
    # here instead, before the profiler starts (a block it did not see allocated would be freed
    # without an event), and counted as live until the step's zero_grad ends.
    grads = sum(p.grad.untyped_storage().nbytes() for p in train_step.model.parameters() if p.grad is not None)
    train_step.optimizer.zero_grad(set_to_none=True)
    train_step.last_loss = None
    before = train_step.persistent_bytes() + grads
    result, excess = _cpu_transient_peak(train_step, grads)
    if excess is None:
        return result, {"peak_mem_mib": None, "state_mib": before / 2**20,
                        "peak_mem_method": "n/a: the profiler recorded no CPU allocation"}
    # What the events say is live after the step, against what is: more means tensors the step
    # keeps beyond the model's state (caches), or blocks made before the profiler started that it
    # freed without an event (then the peak is overestimated by up to that much).
    unaccounted = before + excess[1] - train_step.persistent_bytes()
    return result, {"peak_mem_mib": (before + excess[0]) / 2**20, "state_mib": before / 2**20,
                    "peak_mem_unaccounted_mib": unaccounted / 2**20,
                    "peak_mem_method": "CPU allocator events of one step (torch.profiler, profile_memory=True): "
                                       "the largest sum of live tensors, the parameters, grads, buffers, optimizer "
                                       "state and batch that existed before the step included"}


def _cpu_transient_peak(train_step: TrainStep, freed_by_zero_grad: int) -> tuple[Tensor, tuple[int, int] | None]:
    """``(the loss, (peak, end))``: the largest excess over the bytes live before the step, and the
    excess at its end. The running sum of the CPU allocator's events in time order, less the
    previous step's grads (``freed_by_zero_grad``, already freed by the caller) from the moment the
    step's ``zero_grad`` ends (a record_function marks it)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    previous_level = os.environ.get("KINETO_LOG_LEVEL")
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # the profiler's start/stop lines say nothing here
    optimizer = train_step.optimizer
    zero_grad = optimizer.zero_grad

    def marked_zero_grad(*args, **kwargs):
        with record_function("bench.zero_grad"):
            return zero_grad(*args, **kwargs)

    optimizer.zero_grad = marked_zero_grad
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            result = train_step()
    finally:
        del optimizer.zero_grad
        if previous_level is None:
            os.environ.pop("KINETO_LOG_LEVEL", None)
    events = list(prof.profiler.kineto_results.events())
    memory = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]" and e.device_type() ==
                    torch.profiler.DeviceType.CPU)
    if not memory:
        return result, None
    marks = [e.end_ns() for e in events if e.name() == "bench.zero_grad"]
    freed_at = min(marks) if marks else None
    running = peak = live = 0
    for start, nbytes in memory:
        running += nbytes
        live = running - (freed_by_zero_grad if freed_at is not None and start >= freed_at else 0)
        peak = max(peak, live)
    return result, (peak, live)


# ------------------------------------------------------------------------------- agreement


def _param_names(model: nn.Module) -> set[str]:
    return {f"model.{name}" for name, _ in model.named_parameters()}


def compare_steps(before: dict[str, Tensor], ours: dict[str, Tensor], reference: dict[str, Tensor],
                  loss: float, reference_loss: float, *, param_names: set[str], loss_tolerance: float,
                  update_tolerance: float) -> dict:
    """Agreement of two steps taken from the state ``before``: loss, the optimizer's update of each
    parameter (its momentum buffer), the parameters after the step and the batch-norm statistics.
    ``problems`` lists ``(kind, text)``, kind one of loss, updates, params, buffers."""
    problems = []
    loss_err = abs(loss - reference_loss) / max(abs(reference_loss), 1e-12)
    if not (math.isfinite(loss) and math.isfinite(reference_loss)) or not loss_err <= loss_tolerance:
        problems.append(("loss", f"loss {loss:.6g} vs {reference_loss:.6g} (relative {loss_err:.3g} > "
                                 f"{loss_tolerance:g})"))
    # Optimizer updates, tensor by tensor.
    names = sorted(param_names)
    updates = {}
    for name in names:
        key = "momentum." + name.removeprefix("model.")
        r = reference.get(key)
        o = ours.get(key)
        if r is None:
            problems.append(("updates", f"the reference has no momentum buffer for {name.removeprefix('model.')}"))
            continue
        updates[name] = (o, r)
    total = math.sqrt(sum(float(r.double().pow(2).sum()) for _, r in updates.values()))
    count = sum(r.numel() for _, r in updates.values()) or 1
    worst, worst_name, beyond = 0.0, "", 0
    for name, (o, r) in updates.items():
        floor = FLOOR_SHARE * total * math.sqrt(r.numel() / count)
        if o is None:  # the provider never stepped this parameter (no gradient)
            err = float(r.double().norm()) / max(float(r.double().norm()), floor, 1e-30)
            err = max(err, 1.0)
        else:
            err = float((o.double() - r.double()).norm()) / max(float(r.double().norm()), floor, 1e-30)
            if not math.isfinite(err):
                err = math.inf
        if err > update_tolerance:
            beyond += 1
        if err > worst or not math.isfinite(err):
            worst, worst_name = err, name.removeprefix("model.")
    if beyond:
        problems.append(("updates", f"optimizer updates of {beyond} of {len(updates)} parameter tensors beyond "
                                    f"{update_tolerance:g} (worst {worst:.3g} at {worst_name})"))
    # Parameters after the step, all together, against the reference's change.
    num = den = 0.0
    for name in names:
        num += float((ours[name].double() - reference[name].double()).pow(2).sum())
        den += float((reference[name].double() - before[name].double()).pow(2).sum())
    params_err = math.sqrt(num) / max(math.sqrt(den), 1e-30)
    if not params_err <= update_tolerance:
        problems.append(("params", f"parameters after the step: relative {params_err:.3g} > {update_tolerance:g}"))
    # Buffers: floating ones (running statistics) by their change, integer ones equal.
    num = den = 0.0
    for key, r in reference.items():
        if not key.startswith("model.") or key in param_names:
            continue
        o = ours.get(key)
        if o is None or o.shape != r.shape:
            problems.append(("buffers", f"buffer {key.removeprefix('model.')} missing or of another shape"))
            continue
        if not r.is_floating_point():
            if not torch.equal(o, r):
                problems.append(("buffers", f"buffer {key.removeprefix('model.')}: {o.tolist()} vs {r.tolist()}"))
            continue
        num += float((o.double() - r.double()).pow(2).sum())
        den += float((r.double() - before[key].double()).pow(2).sum())
    buffers_err = math.sqrt(num) / math.sqrt(den) if den > 0 else (0.0 if num == 0 else math.inf)
    if not buffers_err <= update_tolerance:
        problems.append(("buffers", f"batch-norm statistics after the step: relative {buffers_err:.3g} > "
                                    f"{update_tolerance:g}"))
    return {
        "ok": not problems, "loss": loss, "reference_loss": reference_loss, "loss_rel_err": _finite(loss_err),
        "loss_tolerance": loss_tolerance, "update_rel_err": _finite(worst), "worst_update": worst_name,
        "updates_beyond": beyond, "update_tensors": len(updates), "update_tolerance": update_tolerance,
        "params_rel_err": _finite(params_err), "buffers_rel_err": _finite(buffers_err),
        "problems": problems,
    }


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


@contextlib.contextmanager
def forcing(model: nn.Module, selections: dict[str, Tensor] | None):
    """Every MoD block of ``model`` forced to ``selections[block]`` (None: its own top-k), recording its
    selection and scores; yields the blocks. Raises ``KeyError`` when the names do not match."""
    blocks = _mod_blocks(model)
    if selections is not None:
        missing = [block_name for block_name, _ in blocks if selections.get(block_name) is None]
        if missing or len(selections) != len(blocks):
            raise KeyError(f"selections for blocks {sorted(selections)} do not match the model's MoD blocks "
                           f"(missing {missing[:3]})")
    try:
        for block_name, block in blocks:
            if selections is not None:
                block.forced_selection = selections[block_name].to(next(model.parameters()).device)
            block.record_selection = True
        yield blocks
    finally:
        for _, block in blocks:
            block.forced_selection = None
            block.record_selection = False
            block.last_selection = block.last_scores = None


def reference_step(cache: ModelCache, name: str, config: ModelConfig, batch: tuple[Tensor, Tensor],
                   state: dict[str, Tensor], seed: int, forced: dict[str, Tensor] | None = None,
                   ) -> tuple[float, dict[str, Tensor], dict[str, Tensor]]:
    """The eager reference of MoD model ``name`` takes one step from ``state`` (every MoD block
    forced to ``forced[block]`` when given): ``(loss, state after, {block: its router scores})``."""
    model = materialize(cache, name, "model", config)
    step = REFERENCE_STEP.prepare(model, *batch, amp_dtype(config))
    step.restore(state)
    with forcing(model, forced) as blocks:
        torch.manual_seed(seed)
        loss = float(step())
        scores = {block_name: block.last_scores for block_name, block in blocks}
    after = step.snapshot()
    return loss, after, scores


@contextlib.contextmanager
def exact_fp32(step: TrainStep):
    """``step`` without autocast, and CUDA's TF32 convolutions and matmuls off, for the duration."""
    saved = (step.amp_dtype, torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    step.amp_dtype = None
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        step.amp_dtype, torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def checked_step(step: TrainStep, model: nn.Module, *, record: bool, seed: int,
                 measure: torch.device | None = None) -> tuple[float, dict[str, Tensor] | None, dict, dict]:
    """One step from the current state with the RNG seeded: ``(loss, selections or None, state after,
    memory fields)``; ``measure`` takes the step's peak memory on that device."""
    torch.manual_seed(seed)
    recording = recording_selections(model) if record else contextlib.nullcontext(None)
    with recording as blocks:
        if measure is not None:
            loss, memory = peak_memory(step, measure)
        else:
            loss, memory = step(), {}
        selections = {block_name: block.last_selection for block_name, block in blocks} if blocks else None
    return float(loss), selections, step.snapshot(), memory


def step_agreement(*, name: str, config: ModelConfig, cache: ModelCache, batch: tuple[Tensor, Tensor],
                   before: dict[str, Tensor], after: dict[str, Tensor], loss: float,
                   selections: dict[str, Tensor] | None, param_names: set[str], seed: int, judge_updates: bool,
                   ) -> dict:
    """One step of a provider against the eager reference's from the same state ``before``, in
    ``config.dtype`` (teacher forcing where ``selections`` are given and the routers learned).
    ``judge_updates`` False: only the loss and the selections decide (the updates are reported)."""
    dtype = torch.float32 if config.dtype == "fp32" else DTYPES[config.dtype]
    learned = all(block.router is not None for _, block in _mod_blocks(cache.get(name)))
    forced = selections is not None and learned
    if forced:
        try:
            ref_loss, ref_after, scores = reference_step(cache, name, config, batch, before, seed, forced=selections)
        except (ValueError, TypeError, KeyError) as error:
            return {"ok": False, "method": "teacher_forcing", "rel_err": None, "problems": [
                ("selections", "the provider's selections cannot be forced on the reference: " + error_text(error))]}
        loss_tol, update_tol = LOSS_TOLERANCE[dtype], UPDATE_TOLERANCE[torch.float32]
    else:
        ref_loss, ref_after, _ = reference_step(cache, name, config, batch, before, seed)
        loss_tol, update_tol = UNFORCED_LOSS_TOLERANCE[dtype], UNFORCED_UPDATE_TOLERANCE
    result = compare_steps(before, after, ref_after, loss, ref_loss, param_names=param_names,
                           loss_tolerance=loss_tol, update_tolerance=update_tol)
    result["method"] = "teacher_forcing" if forced else "relative_l2"
    result["dtype"] = config.dtype
    if not judge_updates:
        result["problems"] = [(kind, text) for kind, text in result["problems"] if kind == "loss"]
        result["updates_judged"] = False
    if forced:
        tf32 = config.device.startswith("cuda") and dtype == torch.float32 and torch.backends.cudnn.allow_tf32
        score_tol = max(agreement.score_tolerance(dtype, tf32_convs=tf32), AMP_SCORE_TOLERANCE.get(dtype, 0.0))
        check = agreement.check_selections(selections, scores, score_tol)
        if not check.ok:
            result["problems"].append((
                "selections", f"{check.invalid} of {check.rows} selections are no top-k within score tolerance "
                              f"{score_tol:g} (worst gap {check.worst_gap:.3g} at {check.worst})"))
        result.update(score_tolerance=score_tol, selections=check.rows, flipped_selections=check.flipped,
                      max_flip_gap=check.max_flip_gap, invalid_selections=check.invalid,
                      worst_selection_gap=check.worst_gap if math.isfinite(check.worst_gap) else None,
                      worst_selection=check.worst, flips_by_block=dict(check.flips_by_block))
    elif selections is None:
        result["why_not_forced"] = "selections not readable"
    else:
        result["why_not_forced"] = "random routers: selections are random draws, not a top-k of scores"
    result["ok"] = not result["problems"]
    return result


def train_agreement(provider: TrainProvider, step: TrainStep, model: nn.Module, *, name: str, config: ModelConfig,
                    cache: ModelCache, batch: tuple[Tensor, Tensor], before: dict[str, Tensor],
                    after: dict[str, Tensor], loss: float, selections: dict[str, Tensor] | None, seed: int) -> dict:
    """The agreement record of one MoD provider (see the module docstring).

    fp32: the timed step itself decides (loss, updates, parameters, statistics, selections). Under
    bf16 AMP, gradients of two correct implementations differ step to step by O(10%) and more
    (measured on this CPU: the reference in channels_last against NCHW, resnet50_mod at 224 px,
    batch 8: parameters 0.30, worst update tensor 2.9; the triton backend against the forced
    reference, resnet18_mod at 32 px, batch 4: 0.46 and 1.5), which would hide a skipped
    backward. There the timed bf16 step is judged on its loss and selections, and the same
    provider takes the same step again in fp32 (no autocast, no TF32) from the same state, which
    is judged on everything. Compiled providers would need a second compilation for that, so
    under AMP they are judged on the loss alone, and the record says so.
    """
    param_names = _param_names(model)
    common = dict(name=name, cache=cache, batch=batch, before=before, param_names=param_names, seed=seed)
    amp = config.dtype != "fp32"
    timed = step_agreement(config=config, after=after, loss=loss, selections=selections, judge_updates=not amp,
                           **common)
    parts = {"timed": timed}
    if amp and not provider.compiled:
        config32 = dataclasses.replace(config, dtype="fp32")
        step.restore(before)
        with exact_fp32(step):
            loss32, selections32, after32, _ = checked_step(step, model, record=provider.selections_readable,
                                                            seed=seed)
            parts["fp32"] = step_agreement(config=config32, after=after32, loss=loss32, selections=selections32,
                                           judge_updates=True, **common)
        step.restore(after)
    problems = [f"{label}: {text}" if len(parts) > 1 else text for label, part in parts.items()
                for _, text in part["problems"]]
    decisive = parts.get("fp32", timed)
    if problems:
        detail = "; ".join(problems)
    else:
        flips = decisive.get("flipped_selections") or 0
        judged = ("loss and selections (bf16), loss, updates, parameters and statistics (fp32 step)" if "fp32" in parts
                  else "loss only (bf16 AMP, compiled: see the docstring)" if amp
                  else "loss, updates, parameters and statistics")
        flipped = (f"{flips} of {decisive['selections']} selections differ from the reference's own top-k, all "
                   f"near-ties (largest score gap {decisive['max_flip_gap']:.3g}); " if flips else "")
        if not flipped and decisive.get("selections"):
            flipped = f"all {decisive['selections']} selections equal the reference's own top-k; "
        detail = f"{flipped}agree: {judged}"
        if decisive.get("why_not_forced"):
            detail += f" ({decisive['why_not_forced']})"
    out = {k: v for k, v in decisive.items() if k != "problems"}
    out.update(ok=not problems, detail=detail, rel_err=decisive.get("update_rel_err"),
               tolerance=decisive.get("update_tolerance"))
    if "fp32" in parts:
        out["timed_step"] = {k: v for k, v in timed.items() if k != "problems"}
    return out


# ---------------------------------------------------------------------------------- families


class _Case:
    def __init__(self, record: dict, run: Callable[[], object] | None = None, step: TrainStep | None = None) -> None:
        self.record, self.run, self.step = record, run, step


def train_case_weight(network: str, provider: str, batch: int, resolution: int) -> float:
    """Expected cost of one training case relative to the model table's (progress estimates): a
    step is a forward and a backward (about 3x a forward), and a MoD case also takes the checked
    step on the reference."""
    return 3.0 * case_weight(network, provider, batch, resolution)


def train_family_cases(baseline: str, mod_names: list[str], providers: list[TrainProvider],
                       floors: tuple[str, ...] = ("identity", "static"),
                       include_baseline: bool = True) -> list[tuple[str, str, str]]:
    """``(network, role, provider)`` of every case :func:`bench_train_family` measures, in its order."""
    modes = sorted({p.compiled for p in providers})
    cases = [(baseline, "baseline", PLAIN_STEPS[c].name) for c in modes] if include_baseline else []
    for name in mod_names:
        cases += [(name, "mod", p.name) for p in sorted(providers, key=lambda p: p.name != REFERENCE_STEP.name)]
        cases += [(name, f"floor_{floor}", PLAIN_STEPS[c].name) for floor in floors for c in modes]
    return cases


def plan_train_cases(names: list[str], configs: list[ModelConfig], providers: list[TrainProvider],
                     floors: tuple[str, ...] = ("identity", "static")) -> list[tuple[ModelConfig, str, str, str]]:
    return [(config, *case) for config in configs for baseline, mod_names in families(names).items()
            for case in train_family_cases(baseline, mod_names, providers, floors)]


def bench_train_family(
    baseline: str,
    mod_names: list[str],
    config: ModelConfig,
    providers: list[TrainProvider],
    *,
    cache: ModelCache,
    env: dict,
    budget: Budget | None = None,
    timer: TrainTimer = TrainTimer(),
    floors: tuple[str, ...] = ("identity", "static"),
    include_baseline: bool = True,
    seed: int = 0,
    log: Log = print,
    on_case: OnCase | None = None,
) -> list[dict]:
    """Training steps of one baseline family under one config; one record per case, in the order of
    :func:`train_family_cases`."""
    budget = budget or Budget(None)
    device = torch.device(config.device)
    on_cuda = device.type == "cuda"
    if config.cuda_graph and not on_cuda:
        raise ValueError("CUDA graphs need a CUDA device")
    batch = make_batch(config, seed)
    amp = amp_dtype(config)
    dtype = amp or torch.float32
    modes = sorted({p.compiled for p in providers})
    compile_cost = [timer.compile_estimate_s]

    def finished(record: dict) -> tuple[str, str]:
        before, after = on_case(record) if on_case is not None else ("", "")
        return f"{before:>2s}", f"   ({after})" if after else ""

    def give_up(record: dict, status: str, reason: str, label: str) -> _Case:
        record.update(status=status, reason=reason)
        before, after = finished(record)
        log(f"{before} {'n/a  ' if status == 'unavailable' else status:5s} {label}: {reason}{after}")
        _free(device)
        return _Case(record)

    def run_case(name: str, role: str, provider: TrainProvider, *, of_model: str | None = None) -> _Case:
        facts = cache.facts(name, "model", config.resolution) if not of_model else {"params_m": None, "gmacs": None}
        record = stamp({
            "section": "train", "model": name, "role": role, "of_model": of_model,
            "baseline": None if role == "baseline" else BASELINE_OF[of_model or name],
            "provider": provider.name, "mode": provider.mode, "compiled": provider.compiled,
            **config.fields(), "amp": None if amp is None else config.dtype, "step": STEP, **facts,
            "status": "ok", "reason": "", "interpreter": provider.backend == "triton" and not on_cuda,
        }, env)
        shown = f"{role.removeprefix('floor_')} floor of {of_model}" if of_model else name
        label = f"training step | {shown} | {provider.name}"
        cost = compile_cost[0] if provider.compiled else 3.0
        if not budget.allows(cost):
            record.update(status="skipped", reason="time budget", budget_left_s=round(max(budget.left(), 0.0), 1),
                          estimated_cost_s=round(cost, 1))
            before, after = finished(record)
            log(f"{before} skip  {label}: {record['reason']}{after}")
            return _Case(record)
        source = (of_model, role) if of_model else (name, "model")
        checked = role == "mod" and provider.name != REFERENCE_STEP.name
        try:
            setup_start = time.perf_counter()
            model = materialize(cache, *source, config)
            step = provider.prepare(model, *batch, amp)
            breaks_before = graph_break_count() if provider.compiled else 0
            start = time.perf_counter()
            step()  # warm-up: compiles, autotunes, creates the momentum buffers
            _sync(device)
            if provider.compiled:
                record["compile_s"] = round(time.perf_counter() - start, 2)
                record["graph_breaks"] = graph_break_count() - breaks_before
                compile_cost[0] = max(record["compile_s"] * 1.2, 5.0)
            before = step.snapshot()
            loss, selections, after, memory = checked_step(
                step, model, record=checked and provider.selections_readable, seed=seed, measure=device)
            record.update(memory)
            record["loss"] = _finite(loss)
            if checked:
                try:
                    record["agreement"] = train_agreement(
                        provider, step, model, name=name, config=config, cache=cache, batch=batch, before=before,
                        after=after, loss=loss, selections=selections, seed=seed)
                except Exception as error:  # noqa: BLE001 - a check that cannot run is a failed check
                    record["agreement"] = {"ok": False, "method": "teacher_forcing", "rel_err": None,
                                           "detail": "the check failed to run: " + error_text(error)}
                if not record["agreement"]["ok"]:
                    log(f"  differ {label}: {record['agreement']['detail'][:300]}")
            elif role == "mod":
                record["agreement"] = {"ok": True, "method": "reference", "rel_err": 0.0, "tolerance": 0.0,
                                       "detail": "the reference itself"}
        except Exception as error:  # noqa: BLE001 - a provider that raises is reported, never faked
            return give_up(record, "unavailable", error_text(error), label)
        run: Callable[[], object] = step
        if config.cuda_graph:
            try:
                replay, capture_peak = step.capture()
            except Exception as error:  # noqa: BLE001
                return give_up(record, "error", "CUDA graph capture failed: " + error_text(error), label)
            record.update(peak_mem_eager_mib=record.get("peak_mem_mib"), peak_mem_mib=capture_peak / 2**20,
                          peak_mem_method="torch.cuda.max_memory_allocated during the capture of the step "
                                          "(the graph's pool keeps these allocations for its replays)")
            step.restore(before)
            torch.manual_seed(seed)
            replay()
            torch.cuda.synchronize()
            replayed = compare_steps(before, step.snapshot(), after, float(step.last_loss), loss,
                                     param_names=_param_names(model), loss_tolerance=LOSS_TOLERANCE[dtype],
                                     update_tolerance=REPLAY_TOLERANCE[dtype])
            # Under bf16 the updates of two runs may part by rounding (see train_agreement); a replay
            # that skipped the backward or the optimizer step leaves the parameters where they were.
            judged = ("loss", "updates", "params", "buffers") if dtype == torch.float32 else ("loss", "params")
            problems = [text for kind, text in replayed.pop("problems") if kind in judged]
            record["graph_check"] = {**replayed, "judged": list(judged), "ok": not problems}
            if problems:
                reason = "CUDA graph replay differs from the eager step: " + "; ".join(problems)
                if "agreement" in record:
                    record["agreement"] = {**record["agreement"], "ok": False, "detail": reason}
                else:
                    return give_up(record, "error", reason, label)
            run = replay
        record["setup_s"] = round(time.perf_counter() - setup_start, 2)
        if record["interpreter"]:  # checked above; its time would say nothing (and take minutes)
            record.update(status="not timed", reason="Triton's interpreter on the CPU: checked, not timed")
            before_text, after_text = finished(record)
            log(f"{before_text} check {label}: {record['agreement']['detail'][:120]}{after_text}")
            return _Case(record)
        if not on_cuda:
            return _Case(record, run, step)
        try:
            timing = time_cuda_events(run, warmup=timer.cuda_warmup, reps=timer.cuda_reps, max_ms=timer.cuda_max_ms,
                                      min_reps=min(5, timer.cuda_reps))
            _put_timing(record, timing, "CUDA graph replay of the whole step, " if config.cuda_graph else "")
            _loss_check(record, step)
            before_text, after_text = finished(record)
            log(f"{before_text} {timing.median_ms:9.3f} ms [{timing.p20_ms:.3f}, {timing.p80_ms:.3f}]  {label}"
                f"{after_text}")
        except Exception as error:  # noqa: BLE001
            record.update(status="error", reason=error_text(error))
            before_text, after_text = finished(record)
            log(f"{before_text} error {label}: {record['reason']}{after_text}")
        step = run = model = None  # release the model (and its graph) before the next case
        if provider.compiled:
            torch._dynamo.reset()
        _free(device)
        return _Case(record)

    cases: list[_Case] = []
    with thread_setting(config.threads):
        log(f" training-step family {baseline}: {config.label()}")
        for mode in modes if include_baseline else ():
            cases.append(run_case(baseline, "baseline", PLAIN_STEPS[mode]))
        for name in mod_names:
            for provider in sorted(providers, key=lambda p: p.name != REFERENCE_STEP.name):
                cases.append(run_case(name, "mod", provider))
            for floor in floors:
                for mode in modes:
                    cases.append(run_case(name, f"floor_{floor}", PLAIN_STEPS[mode], of_model=name))
        pending = {i: c.run for i, c in enumerate(cases) if c.run is not None}
        if pending:
            log(f"  timing {len(pending)} training step(s): {timer.cpu_rounds} interleaved rounds x "
                f"{timer.cpu_samples_per_round} samples")
            timings = time_cpu_interleaved(pending, rounds=timer.cpu_rounds,
                                           samples_per_round=timer.cpu_samples_per_round, warmup=timer.cpu_warmup,
                                           budget=budget)
            for i, timing in timings.items():
                _put_timing(cases[i].record, timing, "")
                _loss_check(cases[i].record, cases[i].step)
            marks = [finished(cases[i].record) for i in timings]
            for n, (i, timing) in enumerate(timings.items()):
                r = cases[i].record
                shown = f"{r['role'].removeprefix('floor_')} floor of {r['of_model']}" if r["of_model"] else r["model"]
                before_text, after_text = marks[n]
                mem = f", peak {r['peak_mem_mib']:.0f} MiB" if r.get("peak_mem_mib") else ""
                log(f"{before_text} {timing.median_ms:9.3f} ms [{timing.p20_ms:.3f}, {timing.p80_ms:.3f}]  "
                    f"training step | {shown} | {r['provider']}{mem}{after_text if n == len(marks) - 1 else ''}")
    for case in cases:
        case.run = case.step = None
    _free(device)
    return [case.record for case in cases]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _loss_check(record: dict, step: TrainStep | None) -> None:
    """The loss of the last timed step: a step that diverged to NaN/inf is reported (its time may not be a speed)."""
    if step is None or step.last_loss is None:
        return
    value = float(step.last_loss)
    record["loss_after_timing"] = _finite(value)
    if not math.isfinite(value):
        record["reason"] = "the loss became non-finite during timing"


def default_train_configs(device: str, *, batch_sizes: list[int], dtypes: list[str], memory_formats: list[str],
                          resolution: int, threads: list[int | None], graphs: bool) -> list[ModelConfig]:
    """Configs in priority order: per batch size eager then (on CUDA with ``graphs``) CUDA graph replays."""
    configs = []
    for dtype in dtypes:
        for batch in batch_sizes:
            for memory_format in memory_formats:
                for n_threads in threads if device == "cpu" else [None]:
                    for graph in ([False, True] if device == "cuda" and graphs else [False]):
                        configs.append(ModelConfig(device=device, batch=batch, dtype=dtype,
                                                   memory_format=memory_format, resolution=resolution,
                                                   cuda_graph=graph, threads=n_threads))
    return configs


def run_train(
    names: list[str],
    configs: list[ModelConfig],
    providers: list[TrainProvider],
    *,
    env: dict,
    cache: ModelCache | None = None,
    budget: Budget | None = None,
    timer: TrainTimer = TrainTimer(),
    floors: tuple[str, ...] = ("identity", "static"),
    seed: int = 0,
    log: Log = print,
    on_family: Callable[[list[dict]], None] | None = None,
    on_case: OnCase | None = None,
) -> list[dict]:
    """Training steps of every family of ``names`` under every config (in the order given)."""
    cache = cache or ModelCache(seed)
    records: list[dict] = []
    for config in configs:
        log(f"training step: {config.label()}; providers {[p.name for p in providers]}")
        for baseline, mod_names in families(names).items():
            records += bench_train_family(baseline, mod_names, config, providers, cache=cache, env=env,
                                          budget=budget, timer=timer, floors=floors, seed=seed, log=log,
                                          on_case=on_case)
            if on_family is not None:
                on_family(records)
    return records


