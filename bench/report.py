"""Tables and files: Markdown for people, JSON for machines, the project's targets checked.

Everything shown is derived from the measured records; a ratio is printed only where both of
its times were measured and, for two implementations of the same MoD model or op, their
outputs agreed. The paper's ratios (Cakaj, Mehnert, Yang, ACCV 2024) are quoted beside,
labelled as such. :func:`table` is the package's one Markdown-table writer.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mod_models.tools.markdown import table
from mod_models.train.cli_args import path_component

from . import RESULTS_SCHEMA
from .env import cuda_text
from .records import (
    RUNTIME_ORDER,
    agreed,
    config_title,
    model_derived,
    ok,
    paper_ratio,
    runtime_derived,
    short_config,
    status_text,
    usable,
)

OUTPUTS_DIFFER = "outputs differ"

MODEL_LEGEND = """\
- **latency**: median [p20, p80] in ms over all samples (see `method` in the JSON).
- **speedup**: torchvision baseline time / MoD time, both in the same mode (eager with eager,
  compiled with compiled). It is a *timing* ratio: the two networks compute different
  functions, so there is nothing to compare between their outputs. A provider other than the
  eager reference gets any ratio only if its outputs agreed with the eager reference backend's
  on the same input with the same state_dict; otherwise the row says "outputs differ". Where
  its selections can be read (eager triton, onnxruntime) the check is *teacher forcing*: the
  reference rerun on the provider's selections must give its logits (tight tolerance), and
  every selection must be a top-k of that run's scores up to a near-tie (score tolerance), so a
  legitimate flip at a near-tie passes and a broken kernel does not. A CUDA graph replay of
  the eager triton model is checked through the eager call that was captured, whose output the
  replay must reproduce; torch.compile, whose selections cannot be read, by the relative L2 of
  the logits. `agreement.method` in the JSON says which; near-tie flips are listed below the
  table.
- **paper**: baseline/MoD ratio reported by the paper (Cakaj, Mehnert, Yang, ACCV 2024) on its CPU or GPU.
- **ceiling**: baseline time / identity-floor time, the best ratio any MoD implementation could
  reach on this machine (the floor has no MoD cost at all); a paper ratio above it cannot be
  reproduced here, whatever the kernels.
- **overhead**: MoD overhead over the identity floor, `(t_model - t_identity) / t_identity`,
  where the identity floor is the same network with every MoD block replaced by `nn.Identity`
  (no MoD implementation can be faster). Split with the same denominator into
  **f_k** `(t_static - t_identity) / t_identity` (the reduced convolutions, run on a fixed
  selection by the static floor) and **routing** `(t_model - t_static) / t_identity`
  (router, top-k, pack, scale, fuse: what a fused kernel can remove).
- **vs ref**: eager reference time / this provider's time, same model (outputs agreed)."""

TRAIN_LEGEND = """\
- **step**: one optimizer step as the training CLI takes it: forward and cross-entropy loss (labels
  drawn with the input), `zero_grad(set_to_none=True)`, backward, SGD (lr 0.1, momentum 0.9, weight
  decay 1e-4); train mode (batch norms update their running statistics). bf16 is autocast (AMP)
  with fp32 weights, as `--amp bf16`. Median [p20, p80] ms per step; building, the optimizer, the
  batch, warm-up steps, the checks and any compilation or CUDA-graph capture happen before timing.
  "CUDA graphs": the whole step captured into one graph and replayed.
- **speedup**: torchvision baseline step time / MoD step time, same mode; **ceiling**: baseline /
  identity floor; **overhead**, **f_k**, **routing**: as for inference, over the identity floor's step.
- **check**: the provider's step against the eager reference's from the same state (parameters,
  buffers, momentum buffers, batch, RNG seed): teacher forcing (the reference forced to the
  provider's selections) must give the same loss, the same optimizer update of every parameter
  tensor, the same parameters and batch-norm statistics after the step, and every selection must
  be a top-k up to a near-tie. Under bf16 AMP the timed step is judged on its loss and selections,
  and the same provider's step in fp32 from the same state on everything (bf16 gradients of two
  correct implementations part by O(10%) in one step). A CUDA graph replay must reproduce the eager
  step it captured. No ratio where the check failed.
- **peak MiB**: memory live at the peak of one step, the model's parameters, grads, buffers,
  optimizer state and batch included: CUDA `torch.cuda.max_memory_allocated` (of the capture, for
  CUDA graphs); CPU the CPU allocator's events under `torch.profiler` (`peak_mem_method` in the JSON)."""

KERNEL_LEGEND = """\
- times: median [p20, p80] ms; GB/s: bytes the op must move (bench/traffic.py) / median time;
  % copy: that as a fraction of the device-to-device copy bandwidth measured in the same run.
- timing "graph": CUDA graph replays of the op (device time: no Python or launch overhead; no
  L2 flush, so working sets below the L2 size may be served from it); "eager": eager calls
  (backward-only ops cannot be captured apart from their forward). "fused/eager, host incl."
  is the same ratio over eager calls, host overhead included: what an eager program waits.
- fused/eager, fused/compile: reference time / triton time, printed only when the triton
  outputs (and gradients) matched the eager reference on the same inputs."""


# ------------------------------------------------------------------------------------ helpers


def fmt_ms(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    if value >= 100:
        return f"{value:.1f}"
    if value >= 1:
        return f"{value:.2f}"
    if value >= 0.01:
        return f"{value:.3f}"
    return f"{value:.4f}"


def fmt_latency(record: dict | None) -> str:
    if record is None:
        return "-"
    if record.get("status") != "ok" or record.get("median_ms") is None:
        return status_text(record)
    return f"{fmt_ms(record['median_ms'])} [{fmt_ms(record['p20_ms'])}, {fmt_ms(record['p80_ms'])}]"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def sections_text(sections: dict[str, float]) -> str:
    """``kernels 3.6 s, models 1.4 s, other 0.9 s; total 5.9 s``: where a run's time went.

    With a ``total`` entry the other entries are its parts, and the time they do not cover is
    shown as ``other`` (start-up and setup). The parts are rounded so that the
    printed parts add up to the printed total exactly: each is the difference of the rounded
    running sums (0.1 s steps under a minute, else 1 s)."""
    total = sections.get("total")
    parts = [(name, float(seconds)) for name, seconds in sections.items() if name != "total"]
    if total is None:
        return ", ".join(f"{name} {_seconds(seconds, 1.0 if seconds >= 60 else 0.1)}" for name, seconds in parts)
    step = 1.0 if total >= 60 else 0.1
    other = total - sum(seconds for _, seconds in parts)
    if other < -1e-6:
        raise ValueError(f"the parts ({sum(s for _, s in parts):.3f} s) exceed the total ({total:.3f} s)")
    shown, running, previous = [], 0.0, 0
    for name, seconds in parts:
        running += seconds
        steps = round(running / step)
        shown.append(f"{name} {_seconds((steps - previous) * step, step)}")
        previous = steps
    total_steps = round(total / step)  # >= previous: the parts add up to no more than the total
    if total_steps > previous:
        shown.append(f"other {_seconds((total_steps - previous) * step, step)}")
    return ", ".join(shown) + f"; total {_seconds(total_steps * step, step)}"


def _seconds(value: float, step: float) -> str:
    return f"{value:.0f} s" if step >= 1 else f"{value:.1f} s"


def fmt_ratio(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.2f}x"


def fmt_pct(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{100 * value:+.1f}%"


# ------------------------------------------------------------------------------- model tables


def model_tables(records: list[dict]) -> list[tuple[str, str]]:
    out = []
    for key, rows in model_derived(records).items():
        device_type = key[0]
        body = []
        for row in rows:
            r = row["record"]
            base = row["baseline_record"]
            failed_agreement = ok(r) and not agreed(r)
            if failed_agreement:
                speed = OUTPUTS_DIFFER
            elif r.get("interpreter") and ok(r):
                speed = "interpreter, not a speed"
            else:
                speed = fmt_ratio(row["speedup"])
            paper = paper_ratio(r["model"], device_type)
            body.append([
                r["model"], _num(r.get("params_m")), _num(r.get("gmacs")), r["provider"], fmt_latency(r),
                f"{r['baseline']} {fmt_latency(base)}" if base else r["baseline"] or "-",
                speed, "-" if paper is None else f"{paper:.2f}x", fmt_ratio(row["ceiling"]),
                fmt_latency(row["identity"]), fmt_latency(row["static"]),
                OUTPUTS_DIFFER if failed_agreement else fmt_pct(row["overhead"]),
                fmt_pct(row["overhead_fk"]), fmt_pct(row["overhead_routing"]),
                OUTPUTS_DIFFER if failed_agreement else fmt_ratio(row["vs_reference"]),
            ])
        header = ["model", "params (M)", "GMACs", "provider", "latency ms", "baseline, ms", "speedup", "paper",
                  "ceiling", "identity floor ms", "static floor ms", "overhead", "f_k", "routing", "vs ref"]
        text = table(header, body, "lrrllllrrllrrrr")
        notes = agreement_notes([row["record"] for row in rows])
        out.append((config_title(key), text + ("\n\n" + "\n".join(notes) if notes else "")))
    return out


def _mib(record: dict | None) -> str:
    value = (record or {}).get("peak_mem_mib")
    return "-" if value is None else f"{value:.0f}"


def _check_text(record: dict) -> str:
    a = record.get("agreement") or {}
    if not a:
        return "-"
    if a.get("method") == "reference":
        return "reference"
    method = f" ({a['method'].replace('_', ' ')})" if a.get("method") else ""
    return ("ok" if a.get("ok") else OUTPUTS_DIFFER) + method


def train_tables(records: list[dict]) -> list[tuple[str, str]]:
    """The training-step rows: one table per config."""
    out = []
    for key, rows in model_derived(records, "train").items():
        body = []
        for row in rows:
            r = row["record"]
            base = row["baseline_record"]
            failed_agreement = ok(r) and not agreed(r)
            speed = OUTPUTS_DIFFER if failed_agreement else fmt_ratio(row["speedup"])
            body.append([
                r["model"], r["provider"], fmt_latency(r),
                f"{r['baseline']} {fmt_latency(base)}" if base else r["baseline"] or "-",
                speed, fmt_ratio(row["ceiling"]), fmt_latency(row["identity"]), fmt_latency(row["static"]),
                OUTPUTS_DIFFER if failed_agreement else fmt_pct(row["overhead"]),
                fmt_pct(row["overhead_fk"]), fmt_pct(row["overhead_routing"]),
                f"{_mib(r)} / {_mib(base)} / {_mib(row['identity'])}",
                OUTPUTS_DIFFER if failed_agreement else fmt_ratio(row["vs_reference"]), _check_text(r),
            ])
        header = ["model", "provider", "step ms", "baseline, step ms", "speedup", "ceiling", "identity floor ms",
                  "static floor ms", "overhead", "f_k", "routing", "peak MiB (MoD / baseline / identity)", "vs ref",
                  "check"]
        text = table(header, body, "llllrrllrrrrrl")
        seen = {id(r): r for row in rows for r in (row["record"], row["baseline_record"], row["identity"],
                                                   row["static"]) if r}
        notes = train_notes([row["record"] for row in rows]) + memory_notes(list(seen.values()))
        out.append((f"training step, {config_title(key)}", text + ("\n\n" + "\n".join(notes) if notes else "")))
    return out


def train_notes(records: list[dict]) -> list[str]:
    """A line per checked training-step provider that failed its check or flipped a selection at a near-tie."""
    notes = []
    for r in records:
        a = r.get("agreement") or {}
        if a.get("method") in (None, "reference"):
            continue
        if not a.get("ok"):
            notes.append(f"- {r['model']} | {r['provider']}: {OUTPUTS_DIFFER}: {(a.get('detail') or '')[:300]}")
        elif a.get("flipped_selections") or r.get("interpreter"):
            notes.append(f"- {r['model']} | {r['provider']}: {(a.get('detail') or '')[:300]}")
    return notes


def memory_notes(records: list[dict]) -> list[str]:
    """A line per CPU training-step record whose allocator events do not add up to the state after the step."""
    notes = []
    for r in records:
        unaccounted = r.get("peak_mem_unaccounted_mib")
        if unaccounted is not None and abs(unaccounted) > 1.0:
            shown = f"{r['role'].removeprefix('floor_')} floor of {r['of_model']}" if r.get("of_model") else r["model"]
            notes.append(f"- {shown} | {r['provider']}: peak memory uncertain by {unaccounted:.0f} MiB (allocator "
                         "events that do not add up to the state after the step; see the JSON)")
    return notes


def agreement_notes(records: list[dict]) -> list[str]:
    """One line per teacher-forced provider whose selections differed from the reference's (or that failed)."""
    notes = []
    for r in records:
        a = r.get("agreement") or {}
        if a.get("method") != "teacher_forcing" or not ok(r) or (a.get("ok") and not a.get("flipped_selections")):
            continue
        if a.get("ok"):
            notes.append(f"- {r['model']} | {r['provider']}: {a['flipped_selections']} of {a['selections']} selections "
                         f"flipped at near-ties (largest score gap {a['max_flip_gap']:.2g}, tolerance "
                         f"{a['score_tolerance']:g}); logits under forced selections within {a['rel_err']:.2g}.")
        else:
            notes.append(f"- {r['model']} | {r['provider']}: {OUTPUTS_DIFFER}: {(a.get('detail') or '')[:200]}")
    return notes


# --------------------------------------------------------------------------- CPU runtime tables

RUNTIME_TITLES = {"eager": "eager, deploy form", "compile": "torch.compile + freezing", "onnxruntime": "ONNX Runtime"}
# The CPU targets (1 thread, batch 1, 224x224 fp32): MoD overhead over the identity floor in every
# runtime, by family; and the MoD model in its fastest runtime against its baseline in its fastest.
RUNTIME_OVERHEAD_TARGETS = (("ResNet", "resnet", 0.03), ("MobileNetV2", "mobilenet", 0.06))
BEST_VS_BEST_TARGETS = {"resnet75_mod": 1.15, "mobilenet_v2_mod": 1.33, "resnet50_mod": 1.40}

RUNTIME_LEGEND = """\
- **runtimes**: what a CPU deployer runs a trained model in, the same for the MoD model, its identity
  floor and its torchvision baseline. *eager, deploy form*: `optimize_for_inference` (batch norms
  folded; MoD blocks on the native kernel, one call each) in eager PyTorch. *torch.compile +
  freezing*: the deploy form under `torch.compile` with Inductor's freezing
  (`torch._inductor.config.freezing = True`: parameters become constants, convolutions prepacked),
  each MoD block one call of the native kernel in the compiled graph. *ONNX Runtime*: the network
  exported with `mod_models.tools.export` (a MoD block as its reference path in ONNX's ops) on
  ONNX Runtime's CPU provider, as many intra-op threads as torch uses.
- **MoD vs baseline**: baseline / MoD in the same runtime; **overhead**: MoD over its identity floor in
  that runtime (`(t_MoD - t_floor) / t_floor`).
- **best vs best**: the baseline in its fastest runtime / the MoD model in its fastest runtime, what a
  deployer who picks the fastest runtime for each gets; **ceiling**: the baseline's fastest / the
  identity floor's fastest, the most any MoD implementation could reach with these runtimes;
  **paper**: the paper's CPU ratio (ResNet75-MoD 1.25x ResNet50, ResNet50-MoD 1.48x,
  MobileNetV2-MoD 1.43x).
- **check**: each MoD time counts only where its outputs agreed with the eager reference (teacher
  forcing: eager and compiled models record their selections, ONNX Runtime returns them as extra
  outputs of a second export of the same weights), and each baseline and floor time only where it
  agreed with the same network in eager mode (relative L2 of the logits); otherwise "outputs differ"
  and no ratio."""


def _runtime_cell(record: dict | None) -> str:
    if record is None:
        return "-"
    text = fmt_latency(record)
    if ok(record) and not usable(record) and record.get("role") != "mod":
        text += " (" + OUTPUTS_DIFFER + ")"
    return text


def _best_cell(best: tuple[str | None, float | None]) -> str:
    runtime, ms = best
    return "-" if runtime is None else f"{fmt_ms(ms)} ({RUNTIME_TITLES.get(runtime, runtime)})"


def runtime_tables(records: list[dict]) -> list[tuple[str, str]]:
    """The CPU runtimes tables, one per config: every MoD model, its identity floor and its baseline in
    each runtime, then the best-vs-best ratio beside its ceiling and the paper's."""
    out = []
    for key, rows in runtime_derived(records).items():
        body, best = [], []
        judged = _judged_config(key)
        for row in rows:
            label = f"{row['model']} ({row['baseline']})"
            for runtime in RUNTIME_ORDER:
                cell = row["runtimes"].get(runtime)
                if cell is None:
                    continue
                mod = cell["mod"]
                differ = ok(mod) and not cell["agreed"]
                body.append([
                    label, RUNTIME_TITLES[runtime], _runtime_cell(mod), _runtime_cell(cell["floor"]),
                    _runtime_cell(cell["baseline"]),
                    OUTPUTS_DIFFER if differ else fmt_ratio(cell["speedup"]),
                    OUTPUTS_DIFFER if differ else fmt_pct(cell["overhead"]), _check_text(mod),
                ])
            target = BEST_VS_BEST_TARGETS.get(row["model"]) if judged else None
            best.append([
                label, _best_cell(row["best_mod"]), _best_cell(row["best_baseline"]), _best_cell(row["best_floor"]),
                fmt_ratio(row["best_vs_best"]), fmt_ratio(row["best_ceiling"]),
                "-" if row["paper"] is None else f"{row['paper']:.2f}x",
                "-" if target is None else f">= {target:.2f}x: " + (
                    "not measured" if row["best_vs_best"] is None
                    else "met" if row["best_vs_best"] >= target else f"missed by {target / row['best_vs_best']:.2f}x"),
            ])
        text = table(["model (baseline)", "runtime", "MoD ms", "identity floor ms", "baseline ms", "MoD vs baseline",
                      "overhead over floor", "check"], body, "llllllrl")
        text += "\n\n" + table(["model (baseline)", "MoD, fastest ms (runtime)", "baseline, fastest ms (runtime)",
                                 "identity floor, fastest ms (runtime)", "best vs best", "ceiling", "paper (CPU)",
                                 "target"], best, "llllrrrl")
        notes = agreement_notes([cell["mod"] for row in rows for cell in row["runtimes"].values()])
        out.append((config_title(key), text + ("\n\n" + "\n".join(notes) if notes else "")))
    return out


def _judged_config(key: tuple) -> bool:
    """The configuration the CPU runtime targets are judged in: CPU, batch 1, fp32, 224x224, 1 thread."""
    device_type, batch, dtype, _, resolution, _, threads = key
    return device_type == "cpu" and batch == 1 and dtype == "fp32" and resolution == 224 and threads == 1


# ---------------------------------------------------------------------- native block microbenchmark

NATIVE_BLOCK_TARGET = 2.0  # a deployed block in at most twice the time of one read of its input

NATIVE_BLOCK_LEGEND = """\
- one deployed MoD block (`optimize_for_inference`, in place) at the stage shapes of resnet50_mod /
  resnet75_mod (Bottleneck, capacity 64) and the MoD groups of mobilenet_v2_mod (inverted residual,
  capacity 16): **native** (backend "native": one call of the C++ kernel), **reference deploy** (the
  same deployed block in plain PyTorch) and **read** (`x.sum()`, one read of the block's input: the
  floor a block that pools its whole input cannot beat). Median [p20, p80] microseconds, the three
  timed in interleaved rounds; native and reference agreed (same selections, outputs within 1e-5)
  before timing. Warm caches: the block runs back to back on the same input (in a model the
  previous layers evict its input, weights and the Python objects of its forward)."""


def native_block_tables(records: list[dict]) -> list[tuple[str, str]]:
    rows = [r for r in records if r.get("section") == "native_block"]
    if not rows:
        return []
    body = []
    for r in rows:
        if r.get("status") != "ok":
            body.append([r.get("shape", "?"), str(r.get("batch")), str(r.get("threads")), status_text(r),
                         "-", "-", "-", "-"])
            continue
        body.append([
            f"{r['shape']} ({r['kind']} C={r['channels']} {r['size']}x{r['size']} k={r['k']})", str(r["batch"]),
            str(r["threads"]), _us(r["native_us"]), _us(r["reference_us"]), _us(r["read_us"]),
            f"{r['native_vs_read']:.2f}x", f"{r['reference_vs_native']:.2f}x",
        ])
    header = ["shape", "B", "threads", "native us", "reference deploy us", "read (x.sum) us", "native / read",
              "reference / native"]
    return [("deployed MoD block on the CPU", table(header, body, "lrrlllrr"))]


def _us(values: list[float]) -> str:
    median, p20, p80 = values
    return f"{median:.1f} [{p20:.1f}, {p80:.1f}]"


# ------------------------------------------------------------------------------ kernel tables


def kernel_tables(records: list[dict]) -> list[tuple[str, str]]:
    kernel = [r for r in records if r.get("section") == "kernel"]
    groups: dict[tuple, dict[str, dict]] = {}
    order: list[tuple] = []
    for r in kernel:
        if r.get("status") == "skipped":  # cases the time budget did not reach: counted under "Not measured"
            continue
        key = (r["dtype"], r["memory_format"], r["batch"], r["op"], r["channels"], r["height"], r["width"],
               r.get("capacity") or 0)
        if key not in groups:
            groups[key] = {}
            order.append(key)
        groups[key][r["provider"]] = r
    tables: dict[tuple, list[list[str]]] = {}
    for key in sorted(order, key=lambda k: (k[0], k[1], k[2], _op_rank(k[3]), -k[4], -k[7])):
        dtype, memory_format, batch, op, c, h, w, _ = key
        providers = groups[key]
        ref, comp, fused = providers.get("reference"), providers.get("reference+compile"), providers.get("triton")
        any_record = ref or comp or fused
        nbytes = any_record.get("bytes")
        fused_ok = agreed(fused) and not fused.get("interpreter")
        vs_eager = ref["median_ms"] / fused["median_ms"] if fused_ok and ok(ref) else None
        vs_compile = comp["median_ms"] / fused["median_ms"] if fused_ok and agreed(comp) else None
        host = (ref["host_median_ms"] / fused["host_median_ms"]
                if fused_ok and ok(ref) and ref.get("host_median_ms") and fused.get("host_median_ms") else None)
        differ = ok(fused) and not agreed(fused)
        row = [
            op + (" (fallback)" if any_record.get("deploy_path") == "fallback" else ""),
            f"{batch}x{c}x{h}x{w} (k={any_record.get('k')})",
            "-" if nbytes is None else f"{nbytes / 1e6:.2f}",
            fmt_latency(ref), _compile_cell(comp),
            fmt_latency(fused) + (" (Triton interpreter)" if fused and fused.get("interpreter") and ok(fused) else ""),
            _gbps(ref), "-" if fused and fused.get("interpreter") else _gbps(fused),
            f"{100 * fused['copy_fraction']:.0f}%" if fused_ok and fused.get("copy_fraction") else "-",
            OUTPUTS_DIFFER if differ else fmt_ratio(vs_eager),
            OUTPUTS_DIFFER if differ else fmt_ratio(vs_compile),
            _timing_kind(fused or ref),
            OUTPUTS_DIFFER if differ else fmt_ratio(host),
        ]
        tables.setdefault((dtype, memory_format), []).append(row)
    header = ["op", "B x C x H x W", "MB moved", "reference ms", "reference+compile ms", "triton ms",
              "reference GB/s", "triton GB/s", "triton % copy", "fused/eager", "fused/compile", "timing",
              "fused/eager, host incl."]
    return [(f"{d}, {f}", table(header, rows, "llrlllrrrrrlr")) for (d, f), rows in tables.items()]


def _timing_kind(record: dict | None) -> str:
    """How a kernel row's main times were taken: CUDA graph replay (device time) or eager calls."""
    method = (record or {}).get("method") or ""
    if "graph" in method and "capture failed" not in method:
        return "graph"
    if "host overhead included" in method:
        return "eager"
    return "-"


def _gbps(record: dict | None) -> str:
    if not ok(record) or not record.get("gbps"):
        return "-"
    value = record["gbps"]
    return f"{value:.0f}" if value >= 10 else f"{value:.2f}"


def _compile_cell(record: dict | None) -> str:
    if record is None:
        return "-"
    text = fmt_latency(record)
    if ok(record) and not agreed(record):
        text += " (" + OUTPUTS_DIFFER + ")"
    return text


def _op_rank(op: str) -> int:
    from .kernels import OPS

    return OPS.index(op) if op in OPS else len(OPS)


# ------------------------------------------------------------------------------------ targets


def _target(name: str, values: list[tuple[str, float]], threshold: float, *, higher_is_better: bool = True,
            unit: str = "x", without: int = 0) -> dict:
    """Check ``values`` (label, measured) against ``threshold``; the worst one decides.

    ``without`` counts the cases of this target that have no value (unavailable, skipped or
    outputs differ); they are named in the text, not hidden.
    """
    lacking = f"; {without} case(s) without a value (unavailable, skipped or outputs differ)" if without else ""
    if not values:
        return {"target": name, "status": "not measured", "measured": "no case measured" + lacking, "worst": None}
    worst_label, worst = (min if higher_is_better else max)(values, key=lambda v: v[1])
    met = worst >= threshold if higher_is_better else worst <= threshold
    show = (lambda v: f"{v:.2f}x") if unit == "x" else (lambda v: f"{100 * v:.1f}%")
    if met:
        status = "met"
    elif unit == "%":
        status = f"missed by {100 * abs(worst - threshold):.1f} points"
    elif worst > 0:
        status = f"missed by {(threshold / worst if higher_is_better else worst / threshold):.2f}x"
    else:
        status = "missed"
    below = [f"{label} {show(v)}" for label, v in values if (v < threshold if higher_is_better else v > threshold)]
    return {
        "target": name, "status": status, "worst": worst,
        "measured": f"worst {show(worst)} ({worst_label}) over {len(values)} case(s)"
                    + (f"; short: {', '.join(below[:6])}{' ...' if len(below) > 6 else ''}" if below else "")
                    + lacking,
    }


def targets(records: list[dict]) -> list[dict]:
    """The project's performance targets, each checked on what was measured (or marked not measured)."""
    out: list[dict] = []
    kernel = [r for r in records if r.get("section") == "kernel" and not r.get("interpreter")]
    on_gpu = any(r.get("device_type") == "cuda" for r in records)
    if on_gpu:
        out += _kernel_targets(kernel)
    out += _model_targets(records, on_gpu)
    out += _runtime_targets(records)
    out += _native_block_targets(records)
    return out


def _runtime_targets(records: list[dict]) -> list[dict]:
    """The CPU runtime targets, judged at 1 thread, batch 1, 224x224 fp32 (see :func:`runtime_tables`)."""
    derived = {key: rows for key, rows in runtime_derived(records).items() if _judged_config(key)}
    if not derived:
        return []
    rows = [row for key_rows in derived.values() for row in key_rows]
    static = {(row["record"]["model"]): row for key, key_rows in model_derived(records).items()
              if _judged_config(key) for row in key_rows if row["record"]["provider"] == "native+deploy"}
    out = []
    for runtime in RUNTIME_ORDER:
        for family, prefix, threshold in RUNTIME_OVERHEAD_TARGETS:
            values, without, reasons = [], 0, []
            for row in rows:
                cell = row["runtimes"].get(runtime)
                if cell is None or not row["model"].startswith(prefix):
                    continue
                if cell["overhead"] is None:
                    without += 1
                    continue
                values.append((row["model"], cell["overhead"]))
                if cell["overhead"] > threshold:
                    reasons.append(_overhead_reason(row, cell, runtime, static.get(row["model"])))
            if not values and not without:
                continue
            target = _target(f"CPU {RUNTIME_TITLES[runtime]}, 1 thread, batch 1: MoD overhead over the identity floor "
                             f"<= {100 * threshold:.0f}% ({family} variants)", values, threshold,
                             higher_is_better=False, unit="%", without=without)
            if reasons:
                target["reason"] = "; ".join(reasons)
            out.append(target)
    for model, threshold in BEST_VS_BEST_TARGETS.items():
        row = next((row for row in rows if row["model"] == model), None)
        if row is None:
            continue
        baseline = row["baseline"]
        name = (f"CPU best vs best, 1 thread, batch 1: {model} (fastest runtime) >= {threshold:.2f}x "
                f"{baseline} (fastest)")
        if row["best_vs_best"] is None:
            out.append(_target(name, [], threshold, without=1))
            continue
        label = (f"{_best_cell(row['best_mod'])} vs {_best_cell(row['best_baseline'])}; ceiling "
                 f"{fmt_ratio(row['best_ceiling'])}; paper {fmt_ratio(row['paper'])}")
        target = _target(name, [(label, row["best_vs_best"])], threshold)
        if row["best_vs_best"] < threshold:
            ceiling, fastest = row["best_ceiling"], row["runtimes"][row["best_mod"][0]]
            if ceiling is not None and ceiling < threshold:
                why = "below the target: no MoD implementation reaches it with these runtimes"
            else:
                why = f"the MoD overhead over its floor in its fastest runtime is {fmt_pct(fastest['overhead'])}"
            target["reason"] = f"{model}: ceiling {fmt_ratio(ceiling)}, {why}"
        out.append(target)
    return out


def _overhead_reason(row: dict, cell: dict, runtime: str, eager_row: dict | None) -> str:
    """What a missed overhead is made of, from the measurements at hand: the eager split into f_k and
    routing (static floor), and the time per MoD block."""
    blocks = cell["mod"].get("mod_blocks")
    extra_ms = cell["mod"]["median_ms"] - cell["floor"]["median_ms"]
    text = f"{row['model']} {fmt_pct(cell['overhead'])}"
    if blocks:
        text += f" = {1e3 * extra_ms / blocks:.0f} us per MoD block x {blocks}"
    if runtime == "eager" and eager_row and eager_row.get("overhead_fk") is not None:
        text += f" (f_k {fmt_pct(eager_row['overhead_fk'])}, routing {fmt_pct(eager_row['overhead_routing'])})"
    return text


def _native_block_targets(records: list[dict]) -> list[dict]:
    rows = [r for r in records if r.get("section") == "native_block"]
    if not rows:
        return []
    values = [(f"{r['shape']} b{r['batch']} {r['threads']}t", r["native_vs_read"]) for r in rows
              if r.get("status") == "ok"]
    target = _target(f"CPU deployed MoD block (native kernel): <= {NATIVE_BLOCK_TARGET:.0f}x one read of its input",
                     values, NATIVE_BLOCK_TARGET, higher_is_better=False,
                     without=sum(r.get("status") != "ok" for r in rows))
    if values and target["worst"] > NATIVE_BLOCK_TARGET:
        met = [label for label, v in values if v <= NATIVE_BLOCK_TARGET]
        target["reason"] = (f"met in {len(met)} of {len(values)} case(s)"
                            + (f" ({', '.join(met[:4])})" if met else "")
                            + "; a small block's time is the fixed cost of the call (Python forward, router "
                            "weights, f_k), not its input's size")
    return [target]


def _kernel_targets(kernel: list[dict]) -> list[dict]:
    # The deploy form's fallback rows (f_k too wide for the fused block) are reported, not judged.
    index = {(r["op"], r["batch"], r["channels"], r["height"], r["width"], r["dtype"], r["memory_format"],
              r["provider"], r.get("capacity")): r for r in kernel if r.get("deploy_path") != "fallback"}

    def ratios(op: str, other: str, batch: int = 64, field: str = "median_ms") -> tuple[list[tuple[str, float]], int]:
        values, without = [], 0
        for key, fused in index.items():
            if key[0] != op or key[1] != batch or key[7] != "triton":
                continue
            base = index.get(key[:7] + (other, key[8]))
            if agreed(fused) and agreed(base) and fused.get(field) and base.get(field):
                values.append((f"{key[2]}x{key[3]}x{key[4]} {key[5]} {key[6]}", base[field] / fused[field]))
            else:
                without += 1
        return values, without

    fractions = [
        (f"{r['op']} {r['channels']}x{r['height']}x{r['width']} {r['dtype']} {r['memory_format']}", r["copy_fraction"])
        for r in kernel
        if r["provider"] == "triton" and r["batch"] == 64 and agreed(r) and r.get("copy_fraction")
        and r["op"] in ("route_pack.fwd", "route_pack.bwd", "scale_fuse.fwd", "scale_fuse.bwd")
    ]
    def check(name: str, op: str, other: str, threshold: float, field: str = "median_ms") -> dict:
        values, without = ratios(op, other, field=field)
        return _target(name, values, threshold, without=without)

    host = "host_median_ms"

    return [
        check("GPU whole inference block, B=64: deploy form (fused) >= 2x torch.compile of the reference eval block",
              "block.deploy", "reference+compile", 2.0),
        check("GPU whole inference block, B=64: deploy form (fused) vs the eager reference eval block (speedup)",
              "block.deploy", "reference", 1.0),
        check("GPU route+pack+fuse forward, B=64: fused >= 3x eager reference", "route_fuse.fwd", "reference", 3.0),
        check("GPU route+pack+fuse forward+backward, B=64: fused >= 2x eager reference",
              "route_fuse.fwdbwd", "reference", 2.0),
        check("GPU route+pack+fuse forward, B=64: fused >= 1.3x torch.compile(reference)",
              "route_fuse.fwd", "reference+compile", 1.3),
        check("GPU route+pack+fuse forward+backward, B=64: fused >= 1.3x torch.compile(reference)",
              "route_fuse.fwdbwd", "reference+compile", 1.3),
        _target("GPU fused kernels (route+pack, scale+fuse, fwd and bwd), B=64: >= 70% of copy bandwidth",
                fractions, 0.70, unit="%"),
        check("(eager calls, host overhead included) route+pack+fuse forward, B=64: fused >= 3x eager reference",
              "route_fuse.fwd", "reference", 3.0, host),
        check("(eager calls, host overhead included) route+pack+fuse forward+backward, B=64: fused >= 2x eager "
              "reference", "route_fuse.fwdbwd", "reference", 2.0, host),
    ]


def _model_targets(records: list[dict], on_gpu: bool) -> list[dict]:
    out = []
    derived = model_derived(records)
    if on_gpu:
        overheads, r75, r75_graph, paper_short = [], [], [], []
        d75, d75_graph = [], []
        fused_without = 0
        for key, rows in derived.items():
            if key[0] != "cuda":
                continue
            title = short_config(key)
            for row in rows:
                r = row["record"]
                if not r["provider"].startswith("triton"):
                    continue
                if row["speedup"] is None:
                    fused_without += 1
                if row["overhead"] is not None:
                    overheads.append((f"{r['model']} {r['provider']} ({title})", row["overhead"]))
                if row["speedup"] is not None:
                    paper = paper_ratio(r["model"], "cuda")
                    if paper is not None:
                        reachable = f", floor allows {row['ceiling'] / paper:.2f}x" if row["ceiling"] else ""
                        paper_short.append((f"{r['model']} {r['provider']} ({title}{reachable})",
                                            row["speedup"] / paper))
                    if r["model"] == "resnet75_mod" and r["baseline"] == "resnet50":
                        deployed = r["provider"] == "triton+deploy"
                        floor = f", floor allows {row['ceiling']:.2f}x" if row["ceiling"] else ""
                        if key[1] == 64 and key[2] == "bf16" and key[3] == "channels_last":
                            r75.append((f"{r['provider']} ({title})", row["speedup"]))
                            if deployed and key[5]:
                                d75.append((f"{r['provider']} vs resnet50 deploy ({title}{floor})", row["speedup"]))
                        if key[1] == 1 and key[5]:
                            r75_graph.append((f"{r['provider']} ({title})", row["speedup"]))
                            if deployed and key[2] == "bf16":
                                d75_graph.append((f"{r['provider']} vs resnet50 deploy ({title}{floor})",
                                                  row["speedup"]))
        out += [
            _target("GPU resnet75_mod deploy vs resnet50 deploy, batch 64 bf16 channels_last, "
                    "CUDA graph replays: >= 1.15x",
                    d75, 1.15),
            _target("GPU resnet75_mod deploy vs resnet50 deploy, batch 1 bf16, CUDA graph replays: >= 1.0x",
                    d75_graph, 1.0),
            _target("GPU models, fused backend: MoD overhead over the identity floor <= 5%", overheads, 0.05,
                    higher_is_better=False, unit="%", without=fused_without),
            _target("GPU resnet75_mod vs resnet50, batch 64 bf16 channels_last (fused, best mode): >= 1.20x",
                    [max(r75, key=lambda v: v[1])] if r75 else [], 1.20),
            _target("GPU resnet75_mod vs resnet50, batch 1 CUDA graphs (fused, best mode): >= 1.20x",
                    [max(r75_graph, key=lambda v: v[1])] if r75_graph else [], 1.20),
            _target("GPU every variant (fused) at or above the paper's GPU ratio (measured / paper)", paper_short, 1.0,
                    without=fused_without),
        ]
    cpu_overheads, cpu_paper = [], []
    for key, rows in derived.items():
        if key[0] != "cpu" or key[1] != 1 or key[6] != 1:
            continue
        for row in rows:
            r = row["record"]
            if r["provider"] != "reference":
                continue
            if row["overhead"] is not None:
                cpu_overheads.append((r["model"], row["overhead"]))
            paper = paper_ratio(r["model"], "cpu")
            if row["speedup"] is not None and paper is not None:
                reachable = f" (floor allows {row['ceiling'] / paper:.2f}x)" if row["ceiling"] else ""
                cpu_paper.append((r["model"] + reachable, row["speedup"] / paper))
    if cpu_overheads or (not on_gpu and any(r.get("section") == "model" for r in records)):
        out += [
            _target("CPU reference, 1 thread, batch 1: MoD overhead over the identity floor <= 5%", cpu_overheads,
                    0.05, higher_is_better=False, unit="%"),
            _target("CPU reference, 1 thread, batch 1: measured ratio / paper's CPU ratio (>= 1 matches the paper)",
                    cpu_paper, 1.0),
        ]
    return out


# ------------------------------------------------------------------------------------ documents


def markdown(records: list[dict], meta: dict) -> str:
    env = meta.get("env", {})
    lines = [f"# MoD benchmark: {env.get('device', '?')}", ""]
    lines.append(
        f"Measured {env.get('date', '?')} on **{env.get('device', '?')}**"
        + (f" with mod-cnn {env['mod_cnn']}" if env.get("mod_cnn") else "") + "; "
        f"torch {env.get('torch')}, torchvision {env.get('torchvision')}, triton {env.get('triton')}, {cuda_text(env)}"
        + (f", cuDNN {env.get('cudnn')}" if env.get("device_type") == "cuda" else "")
        + f", Python {env.get('python')}, commit {env.get('git_commit')}."
    )
    if meta.get("command"):
        lines.append(f"Command: `{meta['command']}`.")
    if meta.get("load_average"):
        loads = " / ".join(", ".join(f"{v:.2f}" for v in triple) for triple in meta["load_average"])
        lines.append(f"Load average (1, 5, 15 min) at start / end: {loads}.")
        peak, cpus = max(triple[0] for triple in meta["load_average"]), env.get("cpu_count") or 1
        if env.get("device_type") == "cpu" and peak > 0.5 * cpus:
            lines.append(f"- **The machine was busy** (1-minute load average up to {peak:.1f} on {cpus} logical CPUs, "
                         "other processes included): CPU timings are noisy, multi-threaded ones most; the [p20, p80] "
                         "spread shows how much.")
    for note in meta.get("notes", []):
        lines.append(f"- {note}")
    copy = meta.get("copy_bandwidth")
    if copy:
        lines.append(f"Copy bandwidth ({copy['what']}): **{copy['gbps']:.0f} GB/s**.")
    if meta.get("sections"):
        lines.append("Time: " + sections_text(meta["sections"]) + ".")
    lines.append("")

    target_rows = targets(records)
    if target_rows:
        if any(t.get("reason") for t in target_rows):
            lines += ["## Targets", "", table(["target", "status", "measured", "why (measured)"],
                      [[t["target"], t["status"], t["measured"], t.get("reason", "")] for t in target_rows]), ""]
        else:
            lines += ["## Targets", "", table(["target", "status", "measured"],
                      [[t["target"], t["status"], t["measured"]] for t in target_rows]), ""]
        if meta.get("notes_file") and any(t["status"].startswith("missed") for t in target_rows):
            lines += [f"Profiles behind the missed targets: `{meta['notes_file']}`.", ""]

    runtimes = runtime_tables(records)
    if runtimes:
        lines += ["## CPU runtimes", "", RUNTIME_LEGEND, ""]
        for title, body in runtimes:
            lines += [f"### {title}", "", body, ""]
    blocks = native_block_tables(records)
    if blocks:
        lines += ["## Native block microbenchmark", "", NATIVE_BLOCK_LEGEND, ""]
        for title, body in blocks:
            lines += [f"### {title}", "", body, ""]

    models = model_tables(records)
    if models:
        lines += ["## Models", "", MODEL_LEGEND, ""]
        for title, body in models:
            lines += [f"### {title}", "", body, ""]
    trains = train_tables(records)
    if trains:
        lines += ["## Training step", "", TRAIN_LEGEND, ""]
        for title, body in trains:
            lines += [f"### {title}", "", body, ""]
    launch_records = [r for r in records if r.get("section") == "launches"]
    if launch_records:
        from .launches import launch_markdown

        lines += ["## Kernel launches", "", launch_markdown(launch_records), ""]
    kernels = kernel_tables(records)
    if kernels:
        lines += ["## Kernel microbenchmarks", "", KERNEL_LEGEND, ""]
        for title, body in kernels:
            lines += [f"### {title}", "", body, ""]

    problems = [r for r in records if r.get("status") not in ("ok", None)]
    if problems:
        lines += ["## Not measured", ""]
        reasons: dict[str, int] = {}
        for r in problems:
            reasons[status_text(r)] = reasons.get(status_text(r), 0) + 1
        lines += [f"- {count} case(s): {reason}" for reason, count in sorted(reasons.items(), key=lambda kv: -kv[1])]
        lines.append("")
    return "\n".join(lines)


def write(records: list[dict], meta: dict, out_dir: Path, stem: str) -> dict[str, Path]:
    """Write ``<stem>.json`` and ``<stem>.md`` into ``out_dir``; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    notes = out_dir / f"{stem}-notes.md"
    if notes.is_file():  # the analysis beside a published result (profiles of what missed a target)
        meta = {**meta, "notes_file": notes.name}
    payload = {"schema": RESULTS_SCHEMA, "meta": meta, "targets": targets(records), "records": records}
    json_path.write_text(json.dumps(_clean(payload), indent=1, allow_nan=False) + "\n")
    md_path.write_text(markdown(records, meta))
    return {"json": json_path, "md": md_path}


def load(paths: Iterable[Path]) -> tuple[list[dict], dict]:
    """Records and merged meta of several result JSON files (e.g. the parts of a GPU run)."""
    records: list[dict] = []
    meta: dict[str, Any] = {}
    for path in paths:
        payload = json.loads(Path(path).read_text())
        records += payload.get("records", [])
        part = payload.get("meta", {})
        for key, value in part.items():
            if key == "sections":
                meta.setdefault("sections", {}).update(value)
            elif key == "notes":
                meta.setdefault("notes", []).extend(v for v in value if v not in meta.get("notes", []))
            else:
                meta.setdefault(key, value)
    return records, meta


def _clean(value: Any) -> Any:
    """JSON-safe: non-finite floats become None, tuples lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.report FILE.json [...]``: merge result files and render JSON, Markdown and PNG again."""
    import argparse

    from .plot import plot

    parser = argparse.ArgumentParser(prog="python -m bench.report", description=main.__doc__)
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--out-dir", type=Path, default=None, help="default: the first file's folder")
    parser.add_argument("--name", default=None, type=path_component, help="file stem (default: the first file's)")
    args = parser.parse_args(argv)
    records, meta = load(args.files)
    out_dir = args.out_dir or args.files[0].parent
    stem = args.name or args.files[0].stem
    for path in write(records, meta, out_dir, stem).values():
        print(f"wrote {path}")
    png = plot(records, out_dir / f"{stem}.png",
               title=f"{meta.get('env', {}).get('device', '')} ({meta.get('mode', '')})")
    if png:
        print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
