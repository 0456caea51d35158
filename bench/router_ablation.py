"""Learned router vs random routing at the same training budget (the paper's ablation, on the synthetic set).

Trains the same MoD model twice per seed, once with ``router="learned"`` and once with
``router="random"`` (k random channels per sample, in training and in evaluation), with
identical data, recipe and epochs, and reports the validation top-1 of both.

    python bench/router_ablation.py --model resnet18_mod --epochs 6 --seeds 0 1 2 --out runs/router_ablation

Writes ``results.csv`` (one row per run) and ``results.json`` (runs and per-router mean/std)
into ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import sys
import time

import torch

from mod_models.train import TrainConfig, train

ROUTERS = ("learned", "random")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18_mod")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--lr-step", type=int, default=30)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--train-samples", type=int, default=4000)
    parser.add_argument("--val-samples", type=int, default=1000)
    parser.add_argument("--capacity", type=int, help="MoD capacity (default: the model's)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument(
        "--routers",
        nargs="+",
        choices=ROUTERS,
        default=list(ROUTERS),
        help="run only these (e.g. one router per process on a multi-core machine)",
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--backend", default="reference")
    parser.add_argument("--out", default="runs/router_ablation")
    args = parser.parse_args(argv)

    rows = []
    for seed in args.seeds:
        for router in args.routers:
            out = os.path.join(args.out, f"{router}_seed{seed}")
            config = TrainConfig(
                model=args.model,
                data="synthetic",
                out=out,
                epochs=args.epochs,
                batch_size=args.batch_size,
                lr=args.lr,
                lr_step=args.lr_step,
                image_size=args.image_size,
                num_classes=args.num_classes,
                train_samples=args.train_samples,
                val_samples=args.val_samples,
                capacity=args.capacity,
                router=router,
                seed=seed,
                workers=args.workers,
                device=args.device,
                backend=args.backend,
                progress=False,
            )
            started = time.perf_counter()
            result = train(config)
            last = result.history[-1]
            rows.append(
                {
                    "router": router,
                    "seed": seed,
                    "epochs": args.epochs,
                    "final_val_top1": last["val_top1"],
                    "best_val_top1": result.best_top1,
                    "final_val_top5": last["val_top5"],
                    "final_train_loss": last["train_loss"],
                    "seconds": time.perf_counter() - started,
                }
            )
            print(
                f"{router:>8} seed {seed}: final val top-1 {last['val_top1']:.2f}%  best {result.best_top1:.2f}%",
                flush=True,
            )

    summary = {}
    for router in args.routers:
        finals = [row["final_val_top1"] for row in rows if row["router"] == router]
        summary[router] = {
            "mean_final_val_top1": statistics.mean(finals),
            "std_final_val_top1": statistics.stdev(finals) if len(finals) > 1 else 0.0,
            "runs": len(finals),
        }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.csv"), "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    environment = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
    }
    with open(os.path.join(args.out, "results.json"), "w") as handle:
        json.dump({"args": vars(args), "environment": environment, "runs": rows, "summary": summary}, handle, indent=2)
    for router in args.routers:
        s = summary[router]
        print(
            f"{router:>8}: val top-1 {s['mean_final_val_top1']:.2f} +- {s['std_final_val_top1']:.2f} % "
            f"over {s['runs']} seed(s)"
        )
    if set(ROUTERS) <= set(args.routers):
        difference = summary["learned"]["mean_final_val_top1"] - summary["random"]["mean_final_val_top1"]
        print(f"learned - random: {difference:+.2f} points")
    return 0


if __name__ == "__main__":
    sys.exit(main())
