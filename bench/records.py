"""Reading benchmark result records: status, agreement, configurations and the derived ratios
(speedup, ceiling, overhead over the floors) that the report and the plot both show."""

from __future__ import annotations

from mod_models import PAPER_SPEEDUP


def status_text(record: dict) -> str:
    status = record.get("status", "?")
    reason = (record.get("reason") or "").replace("|", "/")
    if len(reason) > 70:
        reason = reason[:67] + "..."
    return f"{status}: {reason}" if reason else status


def ok(record: dict | None) -> bool:
    return bool(record) and record.get("status") == "ok" and record.get("median_ms") is not None


def agreed(record: dict | None) -> bool:
    return ok(record) and bool((record.get("agreement") or {}).get("ok"))


def usable(record: dict | None) -> bool:
    """A baseline or floor time a ratio may use: measured, and where it was checked (a mode other than
    eager: deploy, compiled, ONNX Runtime) it computed what the eager network computes."""
    return ok(record) and (record.get("agreement") is None or bool(record["agreement"].get("ok")))


CONFIG_KEYS = ("device_type", "batch", "dtype", "memory_format", "resolution", "cuda_graph", "threads")


def config_key(record: dict) -> tuple:
    return tuple(record.get(k) for k in CONFIG_KEYS)


def config_title(key: tuple) -> str:
    device_type, batch, dtype, memory_format, resolution, cuda_graph, threads = key
    parts = [
        device_type.upper() if device_type else "?",
        f"batch {batch}",
        dtype,
        memory_format,
        f"{resolution}x{resolution}",
    ]
    if cuda_graph:
        parts.append("CUDA graphs")
    if threads is not None and device_type != "cuda":  # host threads mean nothing to a GPU model's time
        parts.append(f"{threads} thread{'s' if threads != 1 else ''}")
    return ", ".join(str(p) for p in parts)


def short_config(key: tuple) -> str:
    """``b64 bf16 channels_last`` / ``b1 bf16 graph``: a config in a few words (targets' lists)."""
    device_type, batch, dtype, memory_format, _, cuda_graph, threads = key
    text = f"b{batch} {dtype} {memory_format}" + (" graph" if cuda_graph else "")
    return text + (f" {threads}t" if device_type == "cpu" and threads is not None else "")


def model_derived(records: list[dict], section: str = "model") -> dict[tuple, list[dict]]:
    """Per config: one derived row per MoD (model, provider) with speedups and overheads, for the
    inference rows (``section="model"``) or the training-step rows (``"train"``)."""
    by_config: dict[tuple, list[dict]] = {}
    for r in records:
        if r.get("section") == section:
            by_config.setdefault(config_key(r), []).append(r)
    derived: dict[tuple, list[dict]] = {}
    for key, rs in by_config.items():
        baselines = {(r["model"], r["mode"]): r for r in rs if r["role"] == "baseline"}
        floors = {(r["of_model"], r["role"], r["mode"]): r for r in rs if r["role"].startswith("floor_")}
        references = {r["model"]: r for r in rs if r["role"] == "mod" and r["provider"] == "reference"}
        rows = []
        for r in rs:
            if r["role"] != "mod":
                continue
            base = baselines.get((r["baseline"], r["mode"]))
            identity = floors.get((r["model"], "floor_identity", r["mode"]))
            static = floors.get((r["model"], "floor_static", r["mode"]))
            checked = agreed(r) and not r.get("interpreter")
            t = r.get("median_ms")
            row = {
                "record": r,
                "baseline_record": base,
                "identity": identity,
                "static": static,
                "agreed": checked,
                "speedup": None,
                "overhead": None,
                "overhead_fk": None,
                "overhead_routing": None,
                "vs_reference": None,
                # The best ratio any MoD implementation could reach here: baseline / identity floor.
                "ceiling": base["median_ms"] / identity["median_ms"] if usable(base) and usable(identity) else None,
            }
            if checked and usable(base):
                row["speedup"] = base["median_ms"] / t
            if checked and usable(identity):
                t0 = identity["median_ms"]
                row["overhead"] = (t - t0) / t0
                if usable(static):
                    row["overhead_fk"] = (static["median_ms"] - t0) / t0
                    row["overhead_routing"] = (t - static["median_ms"]) / t0
            ref = references.get(r["model"])
            if checked and ok(ref):
                row["vs_reference"] = ref["median_ms"] / t
            rows.append(row)
        derived[key] = rows
    return derived


def paper_ratio(model: str, device_type: str | None) -> float | None:
    pair = PAPER_SPEEDUP.get(model)
    if pair is None:
        return None
    return pair[1] if device_type == "cuda" else pair[0]


RUNTIME_ORDER = ("eager", "compile", "onnxruntime")


def runtime_derived(records: list[dict]) -> dict[tuple, list[dict]]:
    """Per config: one row per MoD model measured in the CPU runtimes (records with a ``runtime``):
    per runtime its MoD, identity-floor and baseline records with the ratios of that runtime, and
    the best of each network over the runtimes where it was measured and checked:

    * ``speedup`` (per runtime): baseline / MoD in that runtime; ``overhead``: MoD over its identity
      floor in that runtime;
    * ``best_vs_best``: the baseline's fastest runtime / the MoD model's fastest runtime (a MoD time
      counts only where its outputs agreed with the eager reference, a baseline or floor time only
      where it agreed with its eager network);
    * ``ceiling``: the baseline's fastest / the identity floor's fastest, the best ratio any MoD
      implementation could reach with these runtimes;
    * ``paper``: the paper's CPU ratio.
    """
    by_config: dict[tuple, list[dict]] = {}
    for r in records:
        if r.get("section") == "model" and r.get("runtime"):
            by_config.setdefault(config_key(r), []).append(r)
    derived: dict[tuple, list[dict]] = {}
    for key, rs in by_config.items():
        baselines = {(r["model"], r["runtime"]): r for r in rs if r["role"] == "baseline"}
        floors = {(r["of_model"], r["runtime"]): r for r in rs if r["role"] == "floor_identity"}
        mods = [r for r in rs if r["role"] == "mod"]
        rows = []
        for model in dict.fromkeys(r["model"] for r in mods):
            row = {"model": model, "baseline": None, "runtimes": {}, "paper": paper_ratio(model, "cpu")}
            for runtime in RUNTIME_ORDER:
                mod = next((r for r in mods if r["model"] == model and r["runtime"] == runtime), None)
                if mod is None:
                    continue
                row["baseline"] = mod["baseline"]
                base = baselines.get((mod["baseline"], runtime))
                floor = floors.get((model, runtime))
                checked = agreed(mod) and not mod.get("interpreter")
                row["runtimes"][runtime] = {
                    "mod": mod, "baseline": base, "floor": floor, "agreed": checked,
                    "speedup": base["median_ms"] / mod["median_ms"] if checked and usable(base) else None,
                    "overhead": (mod["median_ms"] - floor["median_ms"]) / floor["median_ms"]
                    if checked and usable(floor) else None,
                }
            row.update(_best(row["runtimes"]))
            rows.append(row)
        derived[key] = rows
    return derived


def _best(runtimes: dict[str, dict]) -> dict:
    def fastest(role: str, good) -> tuple[str | None, float | None]:
        times = [(runtime, cell[role]["median_ms"]) for runtime, cell in runtimes.items() if good(cell)]
        return min(times, key=lambda rt: rt[1]) if times else (None, None)

    mod_runtime, mod_ms = fastest("mod", lambda cell: cell["agreed"])
    base_runtime, base_ms = fastest("baseline", lambda cell: usable(cell["baseline"]))
    floor_runtime, floor_ms = fastest("floor", lambda cell: usable(cell["floor"]))
    return {
        "best_mod": (mod_runtime, mod_ms), "best_baseline": (base_runtime, base_ms),
        "best_floor": (floor_runtime, floor_ms),
        "best_vs_best": base_ms / mod_ms if base_ms and mod_ms else None,
        "best_ceiling": base_ms / floor_ms if base_ms and floor_ms else None,
    }
