"""The model table: every MoD variant beside its torchvision baseline and its floors.

For one :class:`ModelConfig` (device, batch, dtype, memory format, resolution, CUDA graphs,
threads) and one baseline family (e.g. resnet50 with resnet50_mod, resnet75_mod,
resnet86_mod), :func:`bench_family` builds every network once (seeded, eval mode), runs each
provider once to compile/warm it and check its output, then times it:

* CPU: all cases of the family round-robin (:func:`bench.timing.time_cpu_interleaved`);
* CUDA: one case after the other with CUDA events; with ``cuda_graph`` the call is first
  recorded into a CUDA graph and the replay is timed.

Every MoD provider's output is compared with the eager reference backend's output of the
same model (same state_dict, same input); the report prints a speedup only for providers
that agreed. Where the provider's selections can be read (eager reference/triton, ONNX
Runtime) the check is selection-aware (:func:`bench.agreement.teacher_forced`: the reference
rerun on the provider's selections must give its logits, and every selection must be a top-k
up to a near-tie); elsewhere (torch.compile, CUDA graph replays) it is the relative L2 of the
logits. ``agreement["method"]`` says which. A provider that raises is recorded as unavailable,
with the message.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import gc
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mod_models import BASELINE_OF, MOD_BUILDERS, build_model
from mod_models.blocks import MoDBlock
from mod_models.tools.facts import count_macs, count_params

from . import agreement
from .env import stamp
from .floors import FLOORS
from .providers import (
    REFERENCE,
    ModelProvider,
    OnnxRuntimeProvider,
    Selections,
    error_text,
    graph_break_count,
    plain_provider,
    provider_modes,
)
from .timing import Budget, Timing, capture_cuda_graph, time_cpu_interleaved, time_cuda_events

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
MEMORY_FORMATS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}

Log = Callable[[str], None]
# Called once per finished case (timed, skipped, unavailable or failed) with its record; returns the
# text to put before and after the case's log line (overall progress, see bench.timing.Progress).
OnCase = Callable[[dict], tuple[str, str]]


@dataclass(frozen=True)
class ModelConfig:
    """One column group of the model table."""

    device: str
    batch: int
    dtype: str = "fp32"
    memory_format: str = "nchw"
    resolution: int = 224
    cuda_graph: bool = False
    threads: int | None = None

    def label(self) -> str:
        parts = [self.device, f"batch {self.batch}", self.dtype, self.memory_format, f"{self.resolution}px"]
        if self.cuda_graph:
            parts.append("CUDA graph")
        if self.threads is not None:
            parts.append(f"{self.threads} thread{'s' if self.threads != 1 else ''}")
        return ", ".join(parts)

    def fields(self) -> dict:
        return {
            "batch": self.batch, "dtype": self.dtype, "memory_format": self.memory_format,
            "resolution": self.resolution, "cuda_graph": self.cuda_graph, "threads": self.threads,
        }


@dataclass(frozen=True)
class TimerSettings:
    cpu_rounds: int = 5
    cpu_samples_per_round: int = 3
    cpu_warmup: int = 2
    cuda_warmup: int = 3
    cuda_reps: int = 15
    cuda_max_ms: float = 600.0
    compile_estimate_s: float = 60.0  # assumed cost of a whole-model compile before one was measured


def _plain_cases(providers: list[ModelProvider], floors: tuple[str, ...]) -> tuple[list[ModelProvider],
                                                                                    list[tuple[str, ModelProvider]]]:
    """The baseline's providers and the ``(floor, provider)`` pairs of a family: one per mode of
    ``providers``; the static floor only in modes that cost no compilation or export (it splits the
    eager overhead into f_k and routing; a compiled or exported copy of every model would double
    those costs)."""
    plain = [plain_provider(p) for p in providers]
    by_mode = {p.mode: p for p in plain}
    modes = provider_modes(plain)
    floor_cases = [(floor, by_mode[mode]) for floor in floors for mode in modes
                   if floor != "static" or not by_mode[mode].expensive]
    return [by_mode[mode] for mode in modes], floor_cases


def _ordered(providers: list[ModelProvider]) -> list[ModelProvider]:
    """The reference first (its output is what the others are checked against)."""
    return sorted(providers, key=lambda p: p.name != REFERENCE.name)


def family_cases(baseline: str, mod_names: list[str], providers: list[ModelProvider],
                 floors: tuple[str, ...] = ("identity", "static"),
                 include_baseline: bool = True) -> list[tuple[str, str, str]]:
    """``(network, role, provider)`` of every case :func:`bench_family` measures, in its order; a
    floor's network is its MoD model."""
    baseline_providers, floor_cases = _plain_cases(providers, floors)
    cases = [(baseline, "baseline", p.name) for p in baseline_providers] if include_baseline else []
    for name in mod_names:
        cases += [(name, "mod", p.name) for p in _ordered(providers)]
        cases += [(name, f"floor_{floor}", p.name) for floor, p in floor_cases]
    return cases


@functools.lru_cache(maxsize=None)
def network_size(name: str, resolution: int) -> tuple[int, float]:
    """``(modules, GMACs at batch 1)`` of zoo network ``name`` (built on the meta device: no weights)."""
    with torch.device("meta"):
        model = build_model(name, backend="reference") if name in MOD_BUILDERS else build_model(name)
    return sum(1 for _ in model.modules()), count_macs(model, resolution) / 1e9


def case_weight(network: str, provider: str, batch: int, resolution: int) -> float:
    """Expected cost of one case relative to others, for progress estimates. At the CPU model table's
    batch 1 a case's time (building, checks, warm-up, timed calls, an export) follows the network's
    number of modules far more than its MACs (a 2-core VM: mobilenet_v2's family, 0.3 GMACs, took
    as long as resnet50's, 4.1 GMACs); MACs times the batch take over at large batches. ONNX
    Runtime counts double (two exports), a compiled case triple (a compilation)."""
    modules, gmacs = network_size(network, resolution)
    weight = modules / 50 + 0.1 * gmacs * batch
    if provider == "onnxruntime":
        return 2 * weight
    return 3 * weight if "compile" in provider or "freezing" in provider else weight


def plan_cases(names: list[str], configs: list[ModelConfig], providers: list[ModelProvider],
               floors: tuple[str, ...] = ("identity", "static")) -> list[tuple[ModelConfig, str, str, str]]:
    """``(config, network, role, provider)`` of every case :func:`run_models` measures, in its order."""
    return [(config, *case) for config in configs for baseline, mod_names in families(names).items()
            for case in family_cases(baseline, mod_names, providers, floors)]


def families(names: list[str]) -> dict[str, list[str]]:
    """MoD variants grouped by their torchvision baseline, in the order given."""
    groups: dict[str, list[str]] = {}
    for name in names:
        if name not in MOD_BUILDERS:
            raise ValueError(f"unknown MoD model {name!r}; expected some of {list(MOD_BUILDERS)}")
        groups.setdefault(BASELINE_OF[name], []).append(name)
    return groups


class ModelCache:
    """Builds each network once on the CPU in fp32 (seeded by name) and hands out copies."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self._models: dict[tuple[str, str], nn.Module] = {}
        self._facts: dict[tuple[str, str, int], dict] = {}

    def get(self, name: str, role: str = "model") -> nn.Module:
        """``role`` is ``"model"`` (the network ``name``) or ``"floor_identity"`` / ``"floor_static"``
        of MoD model ``name``."""
        key = (name, role)
        if key not in self._models:
            if role == "model":
                torch.manual_seed(self.seed + zlib.crc32(name.encode()))
                model = build_model(name, backend="reference") if name in MOD_BUILDERS else build_model(name)
            else:
                model = FLOORS[role.removeprefix("floor_")](self.get(name))
            self._models[key] = model.eval()
        return self._models[key]

    def facts(self, name: str, role: str, resolution: int) -> dict:
        """Parameters (M) and GMACs at ``resolution`` (convs and linears, as :mod:`mod_models.tools.facts`)."""
        key = (name, role, resolution)
        if key not in self._facts:
            model = self.get(name, role)
            params = count_params(model)
            macs = count_macs(copy.deepcopy(model), resolution)
            blocks = sum(isinstance(m, MoDBlock) for m in model.modules())
            self._facts[key] = {"params_m": params / 1e6, "gmacs": macs / 1e9, "mod_blocks": blocks}
        return self._facts[key]

    def materialize(self, name: str, role: str, config: ModelConfig) -> nn.Module:
        """A fresh copy on the config's device, dtype and memory format."""
        model = copy.deepcopy(self.get(name, role))
        model = model.to(device=config.device, dtype=DTYPES[config.dtype])
        if config.memory_format == "channels_last":
            model = model.to(memory_format=torch.channels_last)
        # For providers that export the model: its input size, and a name for their caches.
        model.bench_resolution, model.bench_batch = config.resolution, config.batch
        model.bench_name = f"{name}:{role}"
        return model.eval()


def make_input(config: ModelConfig, seed: int) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(config.batch, 3, config.resolution, config.resolution, generator=generator)
    x = x.to(device=config.device, dtype=DTYPES[config.dtype])
    return x.contiguous(memory_format=MEMORY_FORMATS[config.memory_format])


@contextlib.contextmanager
def thread_setting(threads: int | None) -> Iterator[None]:
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _mod_blocks(model: nn.Module) -> list[tuple[str, MoDBlock]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoDBlock)]


def _selections(model: nn.Module) -> Selections:
    return {name: m.last_selection for name, m in _mod_blocks(model)}


def _set_record_selection(model: nn.Module, on: bool) -> None:
    for _, m in _mod_blocks(model):
        m.record_selection = on
        if not on:
            m.last_selection = m.last_scores = None


def _selection_agreement(ours: Selections | None, reference: Selections | None) -> float | None:
    """Fraction of (block, sample) selections identical to the reference's (slot order included)."""
    if not ours or not reference or ours.keys() != reference.keys():
        return None
    if any(t is None for t in [*ours.values(), *reference.values()]):
        return None
    same = total = 0
    for name, a in ours.items():
        b = reference[name]
        if a.shape != b.shape:
            return None
        rows = (a.cpu() == b.cpu()).all(dim=1)
        same += int(rows.sum())
        total += rows.numel()
    return same / total


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class _Case:
    """One network x provider of a family: its record, and the callable to time once probed."""

    def __init__(self, record: dict, run: Callable[[], object] | None = None) -> None:
        self.record = record
        self.run = run


def bench_family(
    baseline: str,
    mod_names: list[str],
    config: ModelConfig,
    providers: list[ModelProvider],
    *,
    cache: ModelCache,
    env: dict,
    budget: Budget | None = None,
    timer: TimerSettings = TimerSettings(),
    floors: tuple[str, ...] = ("identity", "static"),
    include_baseline: bool = True,
    seed: int = 0,
    log: Log = print,
    on_case: OnCase | None = None,
) -> list[dict]:
    """Measure one baseline family under one config; returns one record per (network, provider), in
    the order of :func:`family_cases`. ``on_case`` is called as each case finishes."""
    budget = budget or Budget(None)
    device = torch.device(config.device)
    on_cuda = device.type == "cuda"
    if config.cuda_graph and not on_cuda:
        raise ValueError("CUDA graphs need a CUDA device")
    x = make_input(config, seed)
    baseline_providers, floor_cases = _plain_cases(providers, floors)
    compile_cost = [timer.compile_estimate_s]
    eager_outputs: dict[tuple[str, str], Tensor | None] = {}

    def eager_output(source: tuple[str, str]) -> Tensor | None:
        """The eager eval-mode output of a network without MoD blocks (what its other modes must compute)."""
        if source not in eager_outputs:
            try:
                model = cache.materialize(*source, config)
                with torch.inference_mode():
                    eager_outputs[source] = model(x).float().clone()
            except Exception as error:  # noqa: BLE001
                log(f"  eager output of {source[0]} ({source[1]}) failed: {error_text(error)}")
                eager_outputs[source] = None
        return eager_outputs[source]

    def finished(record: dict) -> tuple[str, str]:
        before, after = on_case(record) if on_case is not None else ("", "")
        return f"{before:>2s}", f"   ({after})" if after else ""

    def run_case(name: str, role: str, provider: ModelProvider, *, of_model: str | None = None,
                 keep_reference: bool = False, reference_output: Tensor | None = None,
                 reference_selection: list | None = None) -> _Case:
        # Parameters and MACs of the MoD models and baselines (the table's columns); floors skip the count.
        facts = (cache.facts(name, "model", config.resolution) if not of_model
                 else {"params_m": None, "gmacs": None, "mod_blocks": None})
        record = stamp({
            "section": "model", "model": name, "role": role, "of_model": of_model,
            "baseline": None if role == "baseline" else BASELINE_OF[of_model or name],
            "provider": provider.name, "mode": provider.mode, "compiled": provider.compiled,
            "freezing": provider.freezing, "runtime": provider.runtime,
            **config.fields(), **facts, "status": "ok", "reason": "",
            # Triton on the CPU is its interpreter: a correctness tool whose times are not speeds.
            "interpreter": provider.backend == "triton" and not on_cuda,
        }, env)
        shown = f"{role.removeprefix('floor_')} floor of {of_model}" if of_model else name
        label = f"{shown} | {provider.name}"
        cost = compile_cost[0] if provider.compiled else 2.0
        source = (of_model, role) if of_model else (name, "model")
        expected = None
        if role != "mod" and provider.mode != "eager":
            expected = eager_output(source)
        if not budget.allows(cost):
            record.update(status="skipped", reason="time budget", budget_left_s=round(max(budget.left(), 0.0), 1),
                          estimated_cost_s=round(cost, 1))
            before, after = finished(record)
            log(f"{before} skip  {label}: {record['reason']}{after}")
            return _Case(record)
        track_selection = keep_reference and not provider.compiled and provider.runs_torch_modules
        try:
            model = cache.materialize(*source, config)
            fn = provider.prepare(model)
            breaks_before = graph_break_count() if provider.compiled else 0
            if track_selection:
                _set_record_selection(model, True)
            start = time.perf_counter()
            with torch.inference_mode(), provider.compiling():
                out = fn(x)
            if on_cuda:
                torch.cuda.synchronize()
            first_call_s = time.perf_counter() - start
            if provider.compiled:
                record["compile_s"] = round(first_call_s, 2)
                record["graph_breaks"] = graph_break_count() - breaks_before
                compile_cost[0] = max(first_call_s * 1.2, 5.0)
            selection = _selections(model) if track_selection else None
            if track_selection:
                _set_record_selection(model, False)
        except Exception as error:  # noqa: BLE001 - a provider that raises is reported, never faked
            record.update(status="unavailable", reason=error_text(error))
            before, after = finished(record)
            log(f"{before} n/a   {label}: {record['reason']}{after}")
            _free(device)
            return _Case(record)

        def run() -> object:
            return fn(x)

        if config.cuda_graph:
            try:
                with torch.inference_mode():
                    replay, static_out = capture_cuda_graph(run)
                    replay()
                torch.cuda.synchronize()
                out, run = static_out, replay
            except Exception as error:  # noqa: BLE001
                record.update(status="error", reason="CUDA graph capture failed: " + error_text(error))
                before, after = finished(record)
                log(f"{before} error {label}: {record['reason']}{after}")
                _free(device)
                return _Case(record)
        if keep_reference:
            record["agreement"] = {"ok": True, "method": "reference", "rel_err": 0.0, "tolerance": 0.0,
                                   "detail": "the reference itself"}
            record["_output"], record["_selection"] = out.detach().float().clone(), selection
        elif role != "mod":
            if provider.mode != "eager":
                record["agreement"] = _plain_agreement(out, expected, config)
                if not record["agreement"]["ok"]:
                    log(f"  differ {label}: {record['agreement']['detail']}")
        else:
            try:
                with provider.compiling():
                    record["agreement"] = _model_agreement(
                        provider, fn, out, x, name=name, config=config, cache=cache, record=record,
                        reference_output=reference_output, reference_selection=reference_selection)
            except Exception as error:  # noqa: BLE001 - a check that cannot run is a failed check, never a pass
                record["agreement"] = {"ok": False, "method": "teacher_forcing", "rel_err": None, "tolerance": None,
                                       "detail": "selection-aware check failed: " + error_text(error)}
            if not record["agreement"]["ok"]:
                log(f"  differ {label}: {record['agreement']['detail']}")
            _free(device)
        if not on_cuda:
            return _Case(record, run)
        try:
            with torch.inference_mode():
                timing = time_cuda_events(run, warmup=timer.cuda_warmup, reps=timer.cuda_reps, max_ms=timer.cuda_max_ms,
                                          min_reps=min(6, timer.cuda_reps))
            _put_timing(record, timing, "CUDA graph replay, " if config.cuda_graph else "")
            before, after = finished(record)
            log(f"{before} {timing.median_ms:9.3f} ms [{timing.p20_ms:.3f}, {timing.p80_ms:.3f}]  {label}{after}")
        except Exception as error:  # noqa: BLE001
            record.update(status="error", reason=error_text(error))
            before, after = finished(record)
            log(f"{before} error {label}: {record['reason']}{after}")
        fn = run = model = None  # release the model (and its graph) before the next case
        if provider.compiled:
            torch._dynamo.reset()
        _free(device)
        return _Case(record)

    cases: list[_Case] = []
    with thread_setting(config.threads):
        log(f" family {baseline}: {config.label()}")
        if include_baseline:
            for plain in baseline_providers:
                cases.append(run_case(baseline, "baseline", plain))
        for name in mod_names:
            reference_output = reference_selection = None
            for provider in _ordered(providers):
                if provider.name == REFERENCE.name:
                    case = run_case(name, "mod", provider, keep_reference=True)
                    reference_output = case.record.pop("_output", None)
                    reference_selection = case.record.pop("_selection", None)
                else:
                    if reference_output is None:
                        reference_output, reference_selection = _reference_output(cache, name, config, x, log)
                    case = run_case(name, "mod", provider, reference_output=reference_output,
                                    reference_selection=reference_selection)
                cases.append(case)
            for floor, plain in floor_cases:
                cases.append(run_case(name, f"floor_{floor}", plain, of_model=name))
        eager_outputs.clear()

        pending = {i: c.run for i, c in enumerate(cases) if c.run is not None}
        if pending:
            log(f"  timing {len(pending)} case(s): {timer.cpu_rounds} interleaved rounds x "
                f"{timer.cpu_samples_per_round} samples")
            # A compiled case must run the graph its first call compiled (with freezing, when asked): a
            # recompilation while timing is an error, not a silent new graph.
            compiled = any(cases[i].record["compiled"] for i in pending)
            try:
                with torch.inference_mode(), (torch.compiler.set_stance("fail_on_recompile") if compiled
                                              else contextlib.nullcontext()):
                    timings = time_cpu_interleaved(
                        pending, rounds=timer.cpu_rounds, samples_per_round=timer.cpu_samples_per_round,
                        warmup=timer.cpu_warmup, budget=budget,
                    )
            except Exception as error:  # noqa: BLE001 - reported in the records, never faked
                timings = {}
                for i in pending:
                    cases[i].record.update(status="error", reason="timing failed: " + error_text(error))
                    before, after = finished(cases[i].record)
                    log(f"{before} error {cases[i].record['model']} | {cases[i].record['provider']}: "
                        f"{cases[i].record['reason']}{after}")
            for i, timing in timings.items():
                _put_timing(cases[i].record, timing, "")
            # The family's timed cases finish together: each line gets its count, the last the time estimate.
            marks = [finished(cases[i].record) for i in timings]
            for n, (i, timing) in enumerate(timings.items()):
                r = cases[i].record
                shown = f"{r['role'].removeprefix('floor_')} floor of {r['of_model']}" if r["of_model"] else r["model"]
                before, after = marks[n]
                log(f"{before} {timing.median_ms:9.3f} ms [{timing.p20_ms:.3f}, {timing.p80_ms:.3f}]  "
                    f"{shown} | {r['provider']}{after if n == len(marks) - 1 else ''}")
    for case in cases:
        case.run = None
    OnnxRuntimeProvider.release()
    if any(p.compiled for p in providers):
        torch._dynamo.reset()
    _free(device)
    return [case.record for case in cases]


def _plain_agreement(out: Tensor, expected: Tensor | None, config: ModelConfig) -> dict:
    """A network without MoD blocks in another mode (deploy, compiled, ONNX Runtime) against its eager
    eval-mode output: relative L2 of the logits. Nothing routes, so only rounding differs: the tight
    teacher-forcing tolerance on the CPU, the logits tolerance on CUDA (TF32, bf16)."""
    dtype = DTYPES[config.dtype]
    tolerance = (agreement.model_tolerance(dtype) if config.device.startswith("cuda")
                 else agreement.forced_model_tolerance(dtype))
    if expected is None:
        return {"ok": False, "method": "relative_l2", "rel_err": None, "tolerance": tolerance,
                "detail": "no eager output to compare with"}
    result = agreement.compare(out.float(), expected, tolerance).as_dict()
    return {**result, "method": "relative_l2", "detail": result.get("detail") or "vs the same network in eager mode"}


def _model_agreement(provider: ModelProvider, fn: Callable[[Tensor], object], out: Tensor, x: Tensor, *, name: str,
                     config: ModelConfig, cache: ModelCache, record: dict, reference_output: Tensor | None,
                     reference_selection: Selections | None) -> dict:
    """The agreement of one MoD provider with the eager reference (see :mod:`bench.agreement`).

    Teacher forcing where the provider's selections can be read and the model routes with its
    learned routers; otherwise the relative L2 of the logits against ``reference_output``.
    """
    dtype = DTYPES[config.dtype]
    unforced = None
    if reference_output is not None:
        unforced = agreement.compare(out.float(), reference_output, agreement.model_tolerance(dtype)).as_dict()
    # Under CUDA graphs ``fn`` is still the eager callable whose launches were captured: its
    # checked call runs eagerly, and the replay's output must then match that call's.
    call = provider.selection_call(fn)
    learned = all(block.router is not None for _, block in _mod_blocks(cache.get(name)))
    if call is None or not learned:
        why = ("selections not readable" if call is None
               else "random routers: selections are random draws, not a top-k of scores")
        if unforced is None:
            return {"ok": False, "method": "relative_l2", "rel_err": None, "tolerance": None,
                    "detail": f"no reference output ({why})"}
        return {**unforced, "method": "relative_l2", "detail": "; ".join(t for t in (unforced["detail"], why) if t)}

    with torch.inference_mode():
        checked_out, selections = call(x)
    record["selection_agreement"] = _selection_agreement(selections, reference_selection)
    tf32 = config.device.startswith("cuda") and dtype == torch.float32 and torch.backends.cudnn.allow_tf32
    tolerance = agreement.forced_model_tolerance(dtype, tf32_convs=tf32)
    score_tol = agreement.score_tolerance(dtype, tf32_convs=tf32)
    try:
        forced_out, scores = forced_reference(cache, name, config, x, selections)
    except (ValueError, TypeError, KeyError) as error:  # the provider's selections are no selections
        return {"ok": False, "method": "teacher_forcing", "rel_err": None, "tolerance": tolerance,
                "score_tolerance": score_tol,
                "detail": "the provider's selections cannot be forced on the reference: " + error_text(error)}
    check = agreement.check_selections(selections, scores, score_tol)
    result = agreement.teacher_forced(checked_out, forced_out, check, tolerance=tolerance, score_tol=score_tol)
    # The timed callable must compute what was checked (ONNX Runtime checks a second session).
    timed = agreement.compare(out.float(), checked_out.float(), tolerance)
    result["timed_vs_checked_rel_err"] = timed.as_dict()["rel_err"]
    if not timed.ok:
        result["ok"] = False
        result["detail"] = f"timed output vs the checked call's: {timed.detail}; " + result["detail"]
    result["rel_err_unforced"] = None if unforced is None else unforced["rel_err"]
    result["unforced_tolerance"] = agreement.model_tolerance(dtype)
    return result


def forced_reference(cache: ModelCache, name: str, config: ModelConfig, x: Tensor,
                     selections: Selections) -> tuple[Tensor, dict[str, Tensor]]:
    """The eager reference of ``name`` with every MoD block forced to ``selections[block]``:
    ``(logits as float32, {block: its own router scores [B, C]})``. Raises ``KeyError`` for a
    block without a selection and ``ValueError``/``TypeError`` for a selection that is none."""
    model = cache.materialize(name, "model", config)
    REFERENCE.prepare(model)
    blocks = _mod_blocks(model)
    missing = [block_name for block_name, _ in blocks if selections.get(block_name) is None]
    if missing or len(selections) != len(blocks):
        raise KeyError(f"selections for blocks {sorted(selections)} do not match the model's MoD blocks "
                       f"(missing {missing[:3]})")
    try:
        for block_name, block in blocks:
            block.forced_selection = selections[block_name].to(x.device)
        _set_record_selection(model, True)
        with torch.inference_mode():
            out = model(x).float().clone()
        return out, {block_name: block.last_scores for block_name, block in blocks}
    finally:
        for _, block in blocks:
            block.forced_selection = None
            block.record_selection = False


def _reference_output(cache: ModelCache, name: str, config: ModelConfig, x: Tensor,
                      log: Log) -> tuple[Tensor | None, Selections | None]:
    """Untimed eager reference output (and selections) of ``name``, for providers compared without a timed reference."""
    try:
        model = cache.materialize(name, "model", config)
        REFERENCE.prepare(model)
        _set_record_selection(model, True)
        with torch.inference_mode():
            out = model(x).float().clone()
        return out, _selections(model)
    except Exception as error:  # noqa: BLE001
        log(f"  reference output of {name} failed: {error_text(error)}")
        return None, None


def _put_timing(record: dict, timing: Timing, method_prefix: str) -> None:
    record.update(
        median_ms=timing.median_ms, p20_ms=timing.p20_ms, p80_ms=timing.p80_ms, n=timing.n,
        method=method_prefix + timing.method,
    )


def default_configs(device: str, *, batch_sizes: list[int], dtypes: list[str], memory_formats: list[str],
                    resolution: int, threads: list[int | None], cuda_graph_max_batch: int = 8,
                    also_graphs: bool = False) -> list[ModelConfig]:
    """Configs in priority order: on CUDA batch sizes up to ``cuda_graph_max_batch`` use CUDA graphs;
    with ``also_graphs`` the larger ones are timed eagerly and then again as CUDA graph replays
    (device time without host overhead)."""
    configs = []
    for dtype in dtypes:
        for batch in batch_sizes:
            for memory_format in memory_formats:
                for n_threads in threads if device == "cpu" else [None]:
                    graph = device == "cuda" and batch <= cuda_graph_max_batch
                    modes = [graph, True] if device == "cuda" and also_graphs and not graph else [graph]
                    configs += [ModelConfig(
                        device=device, batch=batch, dtype=dtype, memory_format=memory_format, resolution=resolution,
                        cuda_graph=mode, threads=n_threads,
                    ) for mode in modes]
    return configs


def run_models(
    names: list[str],
    configs: list[ModelConfig],
    providers: list[ModelProvider],
    *,
    env: dict,
    cache: ModelCache | None = None,
    budget: Budget | None = None,
    timer: TimerSettings = TimerSettings(),
    floors: tuple[str, ...] = ("identity", "static"),
    seed: int = 0,
    log: Log = print,
    on_family: Callable[[list[dict]], None] | None = None,
    on_case: OnCase | None = None,
) -> list[dict]:
    """Every family of ``names`` under every config (configs in the order given).

    ``on_family(records)`` is called after every family with the records so far (periodic saving),
    ``on_case(record)`` after every case (progress).
    """
    cache = cache or ModelCache(seed)
    records: list[dict] = []
    groups = families(names)
    for config in configs:
        log(f"models: {config.label()}; providers {[p.name for p in providers]}")
        for baseline, mod_names in groups.items():
            records += bench_family(
                baseline, mod_names, config, providers, cache=cache, env=env, budget=budget, timer=timer,
                floors=floors, seed=seed, log=log, on_case=on_case,
            )
            if on_family is not None:
                on_family(records)
    return records
