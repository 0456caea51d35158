"""``python -m bench.gpu``: the whole GPU check in one budgeted call (default 375 s on one H100/H200).

Sections, each a child process with its own time budget (a crash or a hung kernel in one
cannot take the others down; each child saves its records every few seconds, so a child
killed at its deadline still leaves what it measured), in this order by default:

1. kernels  ``python -m bench --kernels``      (default 75 s)  copy bandwidth, then the kernel
   microbenchmarks in priority order (first the whole inference block, deploy form vs the
   reference eval block and its torch.compile, B=64 and B=1 bf16 channels_last; then B=64 bf16
   channels_last eager reference + triton of every other op, each timed as CUDA graph replays
   and as eager calls; torch.compile of the route+fuse chain; the other dtype/format
   combinations; B=256 and B=1; more compiles) until the budget is spent;
2. models   ``python -m bench --models-only --no-train`` (default 100 s) bf16 channels_last: batch 64
   eager, batch 64 as CUDA graph replays, batch 1 as CUDA graph replays (the resnet50 family
   first), the deploy rows first (triton+deploy and reference+deploy beside torchvision's
   deploy form), then eager reference and triton as trained, baseline and floors; then
   torch.compile for resnet75_mod / resnet50_mod, then fp32 and the rest; then the kernel
   launch counts of the key models;
3. train    ``python -m bench --train-only``   (default 60 s) the model table's training-step rows:
   one optimizer step (bf16 AMP, channels_last, 224x224) of resnet50_mod and resnet75_mod (then
   resnet18_mod, mobilenet_v2_mod) beside their baselines and floors, reference and triton, each
   checked against the reference before it is timed: batch 64 eager, then the whole step as CUDA
   graph replays, then the other families, batch 128, and torch.compile where the budget still
   allows;
4. profile  ``python -m bench.profile_gpu``    (default 20 s) where an eager model's time goes;
5. tests    ``python -m pytest -q -m "not slow" tests/test_kernels.py`` (default 50 s; GPU-only
   tests first, failures printed as they happen; ``--tests tests`` runs the whole suite but
   tests/test_bench.py, the CPU smoke test of this package).

Everything lands in ``--out-dir`` (default ``$OUT``, else ``runs/bench`` under the current directory):
``<device>.json``, ``<device>.md``, ``<device>.png``, ``pytest.log`` (and ``gpu.log`` when run
through ``bench/gpu.sh``): at most 5 files. Cases the budget did not reach are recorded as
skipped. ``--dry-run`` runs the same sections with tiny shapes (on the CPU too) to check the
script before a lease; its files are named ``*-dry-run``.

The budget: 375 s with the children's start-ups, so that one 15-minute lease holds a machine's
start (a minute or two) and the script twice (a rerun).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
STARTUP_S = 15.0  # a benchmark child's interpreter start, imports and CUDA init, outside its own budget
SECTIONS = ("kernels", "models", "train", "profile", "tests")
# The training-step rows of the GPU script, in priority order (its budget cuts the tail): the
# resnet50 family (the paper's speed and accuracy headlines), then one variant of each other family.
TRAIN_MODELS = ("resnet50_mod", "resnet75_mod", "resnet18_mod", "mobilenet_v2_mod")


def log(message: str) -> None:
    print(message, flush=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.splitlines()[0])
    default_out = os.environ.get("OUT") or str(Path("runs", "bench"))
    p.add_argument("--out-dir", type=Path, default=Path(default_out))
    p.add_argument("--budget", type=float, default=375.0,
                   help="total seconds for all sections, child start-ups included (each ~15 s)")
    p.add_argument("--kernel-budget", type=float, default=75.0)
    p.add_argument("--model-budget", type=float, default=100.0)
    p.add_argument("--train-budget", type=float, default=60.0)
    p.add_argument("--test-budget", type=float, default=50.0)
    # Tests first: they are the correctness half of the check, and the Triton kernels they compile
    # land in Triton's cache, so the benchmark children that follow start warm.
    p.add_argument("--profile-budget", type=float, default=20.0)
    p.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS, help="in the order given")
    p.add_argument("--dry-run", action="store_true", help="tiny shapes, any device: check the script")
    p.add_argument("--bench-args", default="", help="extra arguments for both benchmark children, one string")
    p.add_argument("--tests", nargs="+", default=None,
                   help="pytest targets (default: tests/test_kernels.py, the tests that "
                        "need the GPU; 'tests' for the whole suite)")
    return p


def _run(cmd: list[str], timeout: float, log_path: Path | None = None,
         extra_env: dict[str, str] | None = None) -> tuple[int, float, str]:
    """Run a child with a hard timeout (its whole process group is killed at the limit).

    Its output is echoed (or written to ``log_path``). Returns (exit code, 124 if killed;
    seconds; its last 40 lines).
    """
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(extra_env or {}))
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    log("$ " + " ".join(cmd) + f"   (timeout {timeout:.0f} s)")
    start = time.monotonic()
    tail: list[str] = []
    killed = threading.Event()
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1, start_new_session=True)

    def kill() -> None:
        killed.set()
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    watchdog = threading.Timer(timeout, kill)
    watchdog.start()
    try:
        with open(log_path, "w") if log_path else contextlib.nullcontext() as sink:
            assert proc.stdout is not None
            for line in proc.stdout:
                if sink is not None:
                    sink.write(line)
                else:
                    print(line, end="", flush=True)
                tail = (tail + [line.rstrip("\n")])[-40:]
        proc.wait()
    finally:
        watchdog.cancel()
    if killed.is_set():
        log(f"  killed at its {timeout:.0f} s limit")
        return 124, time.monotonic() - start, "\n".join(tail)
    return proc.returncode, time.monotonic() - start, "\n".join(tail)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    started = time.monotonic()
    out_dir: Path = args.out_dir.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob("part-*.json"):
        stale.unlink()
    try:
        smi = subprocess.run(
            ["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20, check=False
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        smi = "nvidia-smi not available"
    log(f"bench.gpu: {time.strftime('%Y-%m-%d %H:%M:%S %Z')} | {smi} | budget {args.budget:.0f} s"
        f" | sections {args.sections}{' | DRY RUN' if args.dry_run else ''}")

    extra = args.bench_args.split() + (["--dry-run"] if args.dry_run else ["--full"])
    section_budgets = {"kernels": args.kernel_budget, "models": args.model_budget, "train": args.train_budget,
                       "tests": args.test_budget, "profile": args.profile_budget}
    elapsed: dict[str, float] = {}
    tests_info: dict = {}
    startup_s = STARTUP_S
    for position, section in enumerate(args.sections):
        later = sum(section_budgets[s] + (startup_s if s != "tests" else 10) for s in args.sections[position + 1:])
        left = args.budget - (time.monotonic() - started)
        own = min(section_budgets[section], left - later - (startup_s if section != "tests" else 10))
        if own < 10:
            log(f"[{section}] skipped: {left:.0f} s left of the budget")
            elapsed[section] = 0.0
            continue
        log(f"\n[{section}] budget {own:.0f} s (total left {left:.0f} s)")
        if section == "profile":
            if args.dry_run:
                log("[profile] skipped in a dry run (it needs CUDA)")
                continue
            code, seconds, _ = _run([sys.executable, "-m", "bench.profile_gpu"], timeout=own + 10)
        elif section in ("kernels", "models", "train"):
            flags = {"kernels": ["--kernels"], "models": ["--models-only", "--no-train"],
                     "train": ["--train-only"]}[section]
            if section == "train" and not args.dry_run and "--models" not in extra:
                flags += ["--models", *TRAIN_MODELS]
            cmd = [sys.executable, "-m", "bench", *flags, "--part", section, "--out-dir", str(out_dir),
                   "--budget", f"{own:.0f}", "--no-plot", *extra]
            code, seconds, _ = _run(cmd, timeout=own + startup_s + 30)
        else:
            targets = args.tests or ["tests/test_kernels.py"]  # test_kernel_compile.py is CPU work
            cmd = [sys.executable, "-m", "pytest", "-q", "-rfE", "--durations=8", "-m", "not slow",
                   *(targets or ["tests"]), "--ignore=tests/test_bench.py", "-p",
                   "no:cacheprovider"] + (["--collect-only"] if args.dry_run else [])
            # Failures are printed as they happen (tests/conftest.py): a run cut off at its limit still says why.
            code, seconds, tail = _run(cmd, timeout=own, log_path=out_dir / "pytest.log",
                                       extra_env={"MOD_TESTS_EARLY_FAILURES": "1"})
            summary = [line for line in tail.splitlines()
                       if re.search(r"\b(passed|failed|error|skipped|tests? collected)\b", line)]
            tests_info = {"command": "python " + shlex.join(cmd[1:]), "exit_code": code, "seconds": round(seconds, 1),
                          "summary": summary[-1] if summary else (
                              "killed at the time limit" if code == 124 else tail[-200:])}
            log(tail if code != 0 else (summary[-1] if summary else tail[-500:]))
        elapsed[section] = seconds
        log(f"[{section}] exit {code}, {seconds:.0f} s (total {time.monotonic() - started:.0f} s)")

    # Merge the parts into one result set named by the device.
    from . import report as R
    from .cli import print_summary

    parts = sorted(out_dir.glob("part-*.json"))
    if not parts:
        log("no benchmark results were written")
        return 1
    records, meta = R.load(parts)
    meta["command"] = "python -m bench.gpu " + " ".join(argv if argv is not None else sys.argv[1:])
    meta.setdefault("sections", {}).update({f"{k} (wall)": v for k, v in elapsed.items()})
    meta["sections"]["gpu script total"] = time.monotonic() - started
    if tests_info:
        meta["tests"] = tests_info
        meta.setdefault("notes", []).append(f"tests: `{tests_info['command']}` -> exit {tests_info['exit_code']}, "
                                             f"{tests_info['summary']}")
    from .env import result_stem

    device = meta.get("env", {}).get("device", "device")
    stem = result_stem(meta["env"]["device_slug"], "dry-run" if args.dry_run else "full")
    paths = R.write(records, meta, out_dir, stem)
    from .plot import plot

    png = plot(records, out_dir / f"{stem}.png", title=f"{device} (bench.gpu{' dry run' if args.dry_run else ''})")
    for part in parts:
        part.unlink()
    print_summary(records, meta)
    for path in [*paths.values(), png]:
        if path:
            log(f"wrote {path}")
    log(f"bench.gpu: done in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
