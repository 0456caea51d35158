"""The speedup PNG: MoD vs baseline per model config (paper's ratio marked), fused vs unfused per kernel shape.

Needs matplotlib (the ``bench`` extra); without it :func:`plot` prints why and returns ``None``.
Only ratios the report would print are drawn (measured, and outputs agreed). A provider without
any ratio in a panel gets no legend entry; the panel's note says why it is not drawn, and an
``x`` on the axis marks a model whose ratio is missing where its provider has others.
Legends sit beside the axes, so they never cover a bar.
"""

from __future__ import annotations

from pathlib import Path

from .records import RUNTIME_ORDER, agreed, config_title, model_derived, ok, paper_ratio, runtime_derived, status_text

PROVIDER_COLORS = {
    "reference": "#7f7f7f", "reference+compile": "#1f77b4", "triton": "#d62728", "triton+compile": "#ff7f0e",
    "onnxruntime": "#2ca02c", "native+deploy": "#9467bd", "native+deploy+freezing": "#8c564b",
}
RUNTIME_LABELS = {"eager": "eager deploy form", "compile": "torch.compile + freezing", "onnxruntime": "ONNX Runtime",
                  "best": "best vs best"}
RUNTIME_COLORS = {"eager": "#9467bd", "compile": "#8c564b", "onnxruntime": "#2ca02c", "best": "#17becf"}
MAX_BAR_WIDTH = 0.3  # in units of one model's slot: a panel of one model gets a bar, not a wall


def plot(records: list[dict], path: Path, title: str = "") -> Path | None:
    """Write the PNG of ``records`` to ``path``; None (and a printed reason) when there is nothing to draw."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot skipped: matplotlib is not installed (pip install -e '.[bench]')")
        return None
    fig = figure(records, title)
    if fig is None:
        print("plot skipped: no ratio was measured")
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def figure(records: list[dict], title: str = ""):
    """The matplotlib figure :func:`plot` saves (None when no ratio was measured)."""
    import matplotlib.pyplot as plt

    runtime_panels = [(key, rows) for key, rows in runtime_derived(records).items()
                      if any(r["best_vs_best"] for r in rows)]
    model_panels = [(key, rows, "") for key, rows in model_derived(records).items() if any(r["speedup"] for r in rows)]
    model_panels += [(key, rows, "training step, ") for key, rows in model_derived(records, "train").items()
                     if any(r["speedup"] for r in rows)]
    kernel_panel = _kernel_series(records)
    panels = len(runtime_panels) + len(model_panels) + (1 if kernel_panel else 0)
    if panels == 0:
        return None
    slots = max([len({r["record"]["model"] for r in rows}) for _, rows, _ in model_panels]
                + [len(rows) for _, rows in runtime_panels] + [len(kernel_panel[0]) if kernel_panel else 0])
    width = 11 if slots >= 6 else 4.5 + 1.1 * slots  # a panel of one or two models needs no wide canvas
    fig, axes = plt.subplots(panels, 1, figsize=(width, 3.4 * panels), squeeze=False, layout="constrained")
    for ax, (key, rows) in zip(axes[:, 0], runtime_panels):
        _runtime_panel(ax, key, rows)
    for ax, (key, rows, prefix) in zip(axes[len(runtime_panels):, 0], model_panels):
        _model_panel(ax, key, rows, prefix)
    if kernel_panel:
        ax = axes[-1, 0]
        labels, series = kernel_panel
        width = min(0.8 / len(series), MAX_BAR_WIDTH)
        for j, (name, values) in enumerate(series.items()):
            positions = [i + (j - (len(series) - 1) / 2) * width for i in range(len(labels))]
            ax.bar(positions, [v or 0.0 for v in values], width, label=name)
            _mark_missing(ax, [p for p, v in zip(positions, values) if not v])
        ax.axhline(1.0, color="black", linewidth=0.6)
        _x_axis(ax, labels)
        ax.set_ylabel("reference / fused")
        ax.set_title("route+pack+fuse (MoD block minus its convolutions): fused speedup", fontsize=9)
        _legend(ax)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def _model_panel(ax, key: tuple, rows: list[dict], prefix: str = "") -> None:
    models = list(dict.fromkeys(r["record"]["model"] for r in rows))
    providers = list(dict.fromkeys(r["record"]["provider"] for r in rows))
    values = {(r["record"]["model"], r["record"]["provider"]): r["speedup"] for r in rows}
    drawn = [p for p in providers if any(values.get((m, p)) for m in models)]
    not_drawn = {p: _why_no_ratio([r for r in rows if r["record"]["provider"] == p])
                 for p in providers if p not in drawn}
    width = min(0.8 / len(drawn), MAX_BAR_WIDTH)
    for j, provider in enumerate(drawn):
        heights = [values.get((m, provider)) or 0.0 for m in models]
        positions = [i + (j - (len(drawn) - 1) / 2) * width for i in range(len(models))]
        ax.bar(positions, heights, width, label=provider, color=PROVIDER_COLORS.get(provider))
        _mark_missing(ax, [p for p, h in zip(positions, heights) if not h])
    # The paper's ratios are inference times: marked on the inference panels only.
    paper = [None if prefix else paper_ratio(m, key[0]) for m in models]
    marked = [(i, p) for i, p in enumerate(paper) if p]
    if marked:
        half = min(0.45, (len(drawn) * width) / 2 + 0.08)
        ax.hlines([p for _, p in marked], [i - half for i, _ in marked], [i + half for i, _ in marked],
                  colors="black", linewidth=2, label="paper", zorder=3)
    ax.axhline(1.0, color="black", linewidth=0.6)
    _x_axis(ax, models)
    ax.set_ylabel("baseline / MoD")
    ax.set_title(prefix + config_title(key), fontsize=9)
    if not_drawn:
        note = "not drawn: " + "; ".join(f"{p} ({why})" for p, why in not_drawn.items())
        ax.set_xlabel(note, fontsize=7, color="#555555", loc="left")
    _legend(ax)


def _runtime_panel(ax, key: tuple, rows: list[dict]) -> None:
    """Per MoD model: baseline / MoD in each CPU runtime, then best vs best; its ceiling (dashed) and the
    paper's ratio (solid) marked over the group."""
    models = [row["model"] for row in rows]
    series = {runtime: [(row["runtimes"].get(runtime) or {}).get("speedup") for row in rows]
              for runtime in RUNTIME_ORDER}
    series["best"] = [row["best_vs_best"] for row in rows]
    series = {name: values for name, values in series.items() if any(values)}
    width = min(0.8 / len(series), MAX_BAR_WIDTH)
    for j, (name, values) in enumerate(series.items()):
        positions = [i + (j - (len(series) - 1) / 2) * width for i in range(len(models))]
        ax.bar(positions, [v or 0.0 for v in values], width, label=RUNTIME_LABELS[name], color=RUNTIME_COLORS[name])
        _mark_missing(ax, [p for p, v in zip(positions, values) if not v])
    half = min(0.45, (len(series) * width) / 2 + 0.08)
    for values, style, label in (([row["best_ceiling"] for row in rows], "--", "ceiling (best runtimes)"),
                                 ([row["paper"] for row in rows], "-", "paper")):
        marked = [(i, v) for i, v in enumerate(values) if v]
        if marked:
            ax.hlines([v for _, v in marked], [i - half for i, _ in marked], [i + half for i, _ in marked],
                      colors="black", linewidth=2 if style == "-" else 1.2, linestyles=style, label=label, zorder=3)
    ax.axhline(1.0, color="black", linewidth=0.6)
    _x_axis(ax, models)
    ax.set_ylabel("baseline / MoD")
    ax.set_title("CPU runtimes, " + config_title(key), fontsize=9)
    _legend(ax)


def _why_no_ratio(rows: list[dict]) -> str:
    """Why a provider has no ratio in a panel, in a few words."""
    records = [r["record"] for r in rows]
    if any(r.get("interpreter") for r in records):
        return "Triton interpreter, not a speed"
    if any(ok(r) and not agreed(r) for r in records):
        return "outputs differ"
    if any(ok(r) for r in records) and not any(ok(r["baseline_record"]) for r in rows):
        return "no baseline in its mode; see 'vs ref' in the table"
    reasons = list(dict.fromkeys(status_text(r) for r in records if not ok(r)))
    return ", ".join(reasons[:2]) if reasons else "not measured"


def _mark_missing(ax, positions: list[float]) -> None:
    if positions:
        ax.plot(positions, [0.0] * len(positions), "x", color="#555555", markersize=5, clip_on=False, zorder=4)


def _x_axis(ax, labels: list[str]) -> None:
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=20, ha="right", fontsize=8)
    ax.set_xlim(-0.6, len(labels) - 0.4)


def _legend(ax) -> None:
    handles, labels = ax.get_legend_handles_labels()
    missing = [line for line in ax.get_lines() if line.get_marker() == "x"]
    if missing:
        handles.append(missing[0])
        labels.append("no ratio")
    ax.legend(handles, labels, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)


def _kernel_series(records: list[dict]):
    """Labels (shape) and series ("vs eager fwd", ...) of fused speedups of the route+fuse chain."""
    kernel = [r for r in records if r.get("section") == "kernel" and not r.get("interpreter")]
    index = {(r["op"], r["batch"], r["channels"], r["height"], r["width"], r["dtype"], r["memory_format"],
              r["provider"]): r for r in kernel}
    shapes = sorted({k[1:7] for k in index if k[0].startswith("route_fuse")}, key=lambda s: (s[4], s[5], s[0], -s[1]))
    series: dict[str, list] = {}
    labels = []
    for shape in shapes:
        row = {}
        for op, short in (("route_fuse.fwd", "fwd"), ("route_fuse.fwdbwd", "fwd+bwd")):
            fused = index.get((op, *shape, "triton"))
            for other, name in (("reference", "eager"), ("reference+compile", "compile")):
                base = index.get((op, *shape, other))
                if agreed(fused) and agreed(base) and ok(base):
                    row[f"{short} vs {name}"] = base["median_ms"] / fused["median_ms"]
        if row:
            labels.append(f"B{shape[0]} {shape[1]}x{shape[2]} {shape[4]} "
                          f"{'CL' if shape[5] == 'channels_last' else 'NCHW'}")
            for name in ("fwd vs eager", "fwd+bwd vs eager", "fwd vs compile", "fwd+bwd vs compile"):
                series.setdefault(name, []).append(row.get(name))
    series = {k: v for k, v in series.items() if any(v)}
    return (labels, series) if labels and series else None
