"""Model facts: parameters and GMACs at 224x224 of every MoD variant beside its baseline.

``python -m mod_models.tools.facts`` prints the table.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..zoo import BASELINE_OF, MOD_BUILDERS, build_model
from .markdown import table


@dataclass(frozen=True)
class ModelFacts:
    name: str
    params_m: float
    gmacs: float


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, resolution: int = 224) -> int:
    """Multiply-accumulates of one forward pass at ``[1, 3, r, r]`` (convs and linears)."""
    model = model.to("meta").eval()
    x = torch.empty(1, 3, resolution, resolution, device="meta")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return counter.get_total_flops() // 2


def model_facts(name: str, resolution: int = 224) -> ModelFacts:
    """Parameters (millions) and GMACs at ``resolution`` of a zoo model, by name."""
    model = build_model(name, backend="reference") if name in MOD_BUILDERS else build_model(name)
    params = count_params(model)
    return ModelFacts(name, params / 1e6, count_macs(model, resolution) / 1e9)


def facts_table(names: list[str] | None = None, resolution: int = 224) -> list[dict]:
    """One row per MoD variant: its facts, its baseline's, and the MAC ratio."""
    rows = []
    cache: dict[str, ModelFacts] = {}
    for name in names or list(MOD_BUILDERS):
        baseline = BASELINE_OF[name]
        for n in (name, baseline):
            if n not in cache:
                cache[n] = model_facts(n, resolution)
        mod, base = cache[name], cache[baseline]
        rows.append(
            {
                "model": name,
                "params_m": round(mod.params_m, 3),
                "gmacs": round(mod.gmacs, 3),
                "baseline": baseline,
                "baseline_params_m": round(base.params_m, 3),
                "baseline_gmacs": round(base.gmacs, 3),
                "mac_ratio": round(base.gmacs / mod.gmacs, 3),
            }
        )
    return rows


def format_table(rows: list[dict]) -> str:
    header = ["model", "params (M)", "GMACs", "baseline", "params (M)", "GMACs", "baseline/MoD MACs"]
    body = [[r["model"], f"{r['params_m']:.2f}", f"{r['gmacs']:.2f}", r["baseline"], f"{r['baseline_params_m']:.2f}",
             f"{r['baseline_gmacs']:.2f}", f"{r['mac_ratio']:.2f}x"] for r in rows]
    return table(header, body, "lrrlrrr")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", choices=list(MOD_BUILDERS), default=None)
    parser.add_argument("--resolution", type=int, default=224)
    args = parser.parse_args(argv)
    print(format_table(facts_table(args.models, args.resolution)))


if __name__ == "__main__":
    main()
