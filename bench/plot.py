"""The speedup PNG: MoD vs baseline per model config (paper's ratio marked), fused vs unfused per kernel shape.

Needs matplotlib (the ``bench`` extra); without it :func:`plot` prints why and returns ``None``.
Only ratios the report would print are drawn (measured, and outputs agreed).
"""

from __future__ import annotations

from pathlib import Path

from .report import agreed, config_title, model_derived, ok, paper_ratio

PROVIDER_COLORS = {
    "reference": "#7f7f7f", "reference+compile": "#1f77b4", "triton": "#d62728", "triton+compile": "#ff7f0e",
}


def plot(records: list[dict], path: Path, title: str = "") -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot skipped: matplotlib is not installed (pip install -e '.[bench]')")
        return None

    model_panels = [(key, rows) for key, rows in model_derived(records).items() if any(r["speedup"] for r in rows)]
    kernel_panel = _kernel_series(records)
    panels = len(model_panels) + (1 if kernel_panel else 0)
    if panels == 0:
        print("plot skipped: no ratio was measured")
        return None
    fig, axes = plt.subplots(panels, 1, figsize=(11, 3.2 * panels), squeeze=False)
    for ax, (key, rows) in zip(axes[:, 0], model_panels):
        models = list(dict.fromkeys(r["record"]["model"] for r in rows))
        providers = list(dict.fromkeys(r["record"]["provider"] for r in rows))
        width = 0.8 / max(len(providers), 1)
        for j, provider in enumerate(providers):
            values = []
            for model in models:
                match = [r for r in rows if r["record"]["model"] == model and r["record"]["provider"] == provider]
                values.append(match[0]["speedup"] if match and match[0]["speedup"] else 0.0)
            positions = [i + (j - (len(providers) - 1) / 2) * width for i in range(len(models))]
            ax.bar(positions, values, width, label=provider, color=PROVIDER_COLORS.get(provider))
        paper = [paper_ratio(m, key[0]) for m in models]
        marked = [(i, p) for i, p in enumerate(paper) if p]
        if marked:
            ax.hlines([p for _, p in marked], [i - 0.45 for i, _ in marked], [i + 0.45 for i, _ in marked],
                      colors="black", linewidth=2, label="paper", zorder=3)
        ax.axhline(1.0, color="black", linewidth=0.6)
        ax.set_xticks(range(len(models)))
        ax.set_xticklabels(models, rotation=20, ha="right", fontsize=8)
        ax.set_ylabel("baseline / MoD")
        ax.set_title(config_title(key), fontsize=9)
        ax.legend(fontsize=7, ncol=5)
    if kernel_panel:
        ax = axes[-1, 0]
        labels, series = kernel_panel
        width = 0.8 / max(len(series), 1)
        for j, (name, values) in enumerate(series.items()):
            positions = [i + (j - (len(series) - 1) / 2) * width for i in range(len(labels))]
            ax.bar(positions, [v or 0.0 for v in values], width, label=name)
        ax.axhline(1.0, color="black", linewidth=0.6)
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=20, ha="right", fontsize=8)
        ax.set_ylabel("reference / fused")
        ax.set_title("route+pack+fuse (MoD block minus its convolutions): fused speedup", fontsize=9)
        ax.legend(fontsize=7, ncol=4)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


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
            labels.append(f"B{shape[0]} {shape[1]}x{shape[2]} {shape[4]} {'CL' if shape[5] == 'channels_last' else 'NCHW'}")
            for name in ("fwd vs eager", "fwd+bwd vs eager", "fwd vs compile", "fwd+bwd vs compile"):
                series.setdefault(name, []).append(row.get(name))
    series = {k: v for k, v in series.items() if any(v)}
    return (labels, series) if labels and series else None
