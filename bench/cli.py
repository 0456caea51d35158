"""``python -m bench`` (from the repository root): the benchmark on the machine at hand.

What runs (flags such as ``--models`` and ``--threads`` override each part):

* default, the short table: one MoD variant per baseline family (resnet18_mod, resnet50_mod,
  mobilenet_v2_mod); on a CPU at one thread, a few minutes on 2 cores.
* ``--full``: the whole table. CPU: every MoD variant at one thread and at all threads.
  CUDA: kernel microbenchmarks (resnet50_mod stage shapes, B = 64, 256, 1, bf16 and fp32,
  channels_last and NCHW) and every variant at batch 64 and batch 1 with CUDA graphs.
* ``--quick``: a smoke run in seconds (tiny shapes; the numbers mean little).

The model table has training-step rows too (:mod:`bench.training`): one optimizer step of each
MoD variant beside its baseline and floors. CPU: fp32, 64x64, batch 8 (``--full``: 8 and 32, one
thread and all); CUDA: bf16 AMP, channels_last, 224x224, batch 64 and 128, eager and as CUDA graph
replays of the whole step, then torch.compile. ``--train-only`` runs them alone, ``--no-train``
leaves them out.

Each MoD model runs beside its torchvision baseline and both floors: on a CPU with the
reference backend and (with the export extra) ONNX Runtime; on CUDA reference and triton,
eager and compiled. Kernel microbenchmarks are GPU work; on a CPU they run only as a smoke test
(``--kernels``/``--quick``).

Results: ``<out-dir>/<device>[-short|-quick|-dry-run].json`` (every record, with device,
versions, dtype, batch, memory format, threads and date), ``.md`` and ``.png``. The default
out-dir is ``runs/bench`` under the current directory (git-ignored in this repository), so a
run never overwrites the project's published results in ``bench/results``; publishing a run
is a separate, explicit step: ``python -m bench --full --out-dir bench/results``.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .env import enable_triton_interpreter_without_cuda

DEFAULT_OUT_DIR = Path("runs", "bench")  # relative: under the directory the command runs in
PUBLISHED_DIR = Path("bench", "results")  # the project's committed results (in a source checkout)
KEY_MODELS = ("resnet75_mod", "resnet50_mod")  # the targets' models: compiled first when time is short
SHORT_MODELS = ("resnet18_mod", "resnet50_mod", "mobilenet_v2_mod")  # the default: one per baseline family
# Training steps on a CPU at 64x64: a resnet50 step at batch 8 and 224 px takes several seconds on
# one core, so the short table would take minutes more; 64 px is 1/12 of the work (the last stage
# is 2x2). --train-resolution 224 measures the full size.
CPU_TRAIN_RESOLUTION = 64


def path_component(value: str) -> str:
    """``--name`` / ``--part``: one safe file-name component (:func:`mod_models.train.cli_args.path_component`).

    Imported when the argument is parsed, not with this module: importing :mod:`mod_models` imports
    ``torch._dynamo``, which imports Triton, and Triton's interpreter must be switched on before that
    (:func:`bench.env.enable_triton_interpreter_without_cuda`, called first thing in :func:`main`).
    """
    from mod_models.train.cli_args import path_component as check

    return check(value)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description="MoD benchmarks on the machine at hand.",
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 2)[2])
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu or cuda")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--kernels", action="store_true", help="kernel microbenchmarks only")
    what.add_argument("--models-only", action="store_true",
                      help="model table only (inference and training-step rows)")
    what.add_argument("--train-only", action="store_true", help="the model table's training-step rows only")
    p.add_argument("--no-train", action="store_true", help="no training-step rows")
    p.add_argument("--no-native-block", action="store_true",
                   help="CPU: no native block microbenchmark (part of --full and --quick)")
    p.add_argument("--train-batch-sizes", nargs="+", type=_positive_int, default=None,
                   help="training-step batch sizes (CPU 8, with --full 8 32; CUDA 64 128)")
    p.add_argument("--train-resolution", type=_positive_int, default=None,
                   help=f"training-step input size (CPU {CPU_TRAIN_RESOLUTION}, to keep the table short; CUDA 224)")
    p.add_argument("--models", nargs="+", default=None,
                   help=f"MoD variants (default: {' '.join(SHORT_MODELS)}; with --full all)")
    p.add_argument("--providers", nargs="+", default=None,
                   help="MoD model providers: reference, reference+compile, triton, triton+compile "
                        "(default: CPU reference; CUDA all four)")
    p.add_argument("--compile", dest="compile", action="store_true", default=None,
                   help="add the torch.compile providers (default on CUDA only)")
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--batch-sizes", nargs="+", type=_positive_int, default=None,
                   help="model batch sizes (CPU 1; CUDA 64 1)")
    p.add_argument("--dtype", nargs="+", default=None, choices=["fp32", "bf16", "fp16"],
                   help="model dtypes (CPU fp32; CUDA bf16 fp32)")
    p.add_argument("--memory-format", nargs="+", default=None, choices=["nchw", "channels_last"],
                   help="model memory formats (CPU nchw; CUDA channels_last)")
    p.add_argument("--resolution", type=_positive_int, default=None, help="input height and width (224)")
    p.add_argument("--threads", nargs="+", default=None, type=_thread_count,
                   help="CPU thread counts, positive integers or 'all' (default: 1; with --full: 1 all)")
    p.add_argument("--floors", nargs="*", default=None, choices=["identity", "static"],
                   help="floors to measure (default both; none: pass the flag alone)")
    p.add_argument("--no-cuda-graphs", action="store_true",
                   help="CUDA: no CUDA graphs (default: batches <= 8 are timed as graph replays, "
                        "larger ones eagerly and then again as graph replays)")
    p.add_argument("--rounds", type=_positive_int, default=None, help="CPU: interleaved rounds per model family (5)")
    p.add_argument("--kernel-batches", nargs="+", type=_positive_int, default=None,
                   help="kernel batch sizes (CUDA 64 256 1)")
    p.add_argument("--kernel-dtypes", nargs="+", default=None, choices=["fp32", "bf16", "fp16"])
    p.add_argument("--kernel-formats", nargs="+", default=None, choices=["nchw", "channels_last"])
    p.add_argument("--kernel-model", default="resnet50_mod", help="model whose MoD stage shapes are benchmarked")
    p.add_argument("--kernel-ops", nargs="+", default=None, help="subset of the kernel ops")
    p.add_argument("--budget", type=_budget, default="default",
                   help="seconds, or 'none'; cases that no longer fit are recorded as skipped "
                        "(default: none on CPU, 1200 on CUDA)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--full", action="store_true", help="the whole table (default: the short table)")
    mode.add_argument("--quick", action="store_true", help="CI smoke run: tiny shapes, seconds")
    mode.add_argument("--dry-run", action="store_true",
                      help="exercise the GPU plan's code paths with tiny shapes on any device (no results to keep)")
    p.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR,
                   help=f"where results go (default: {DEFAULT_OUT_DIR}/ under the current directory; "
                        f"{PUBLISHED_DIR} in a checkout publishes them as the project's)")
    p.add_argument("--name", default=None, type=path_component,
                   help="file stem (default: the device, plus -short / -quick / -dry-run)")
    p.add_argument("--part", default=None, type=path_component,
                   help="write only <out-dir>/part-<PART>.json (used by bench.gpu)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    return p


def _budget(text: str):
    if text in ("default", "none"):
        return text
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("the budget must be positive seconds, or 'none'")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, not {text!r}")
    return value


def out_dir_problem(out_dir: Path) -> str | None:
    """Why results cannot be written into ``out_dir`` (None when they can): checked before a run,
    so that a long run never ends unable to write what it measured."""
    if out_dir.exists():
        if not out_dir.is_dir():
            return f"--out-dir {out_dir} is a file, not a folder"
        if not os.access(out_dir, os.W_OK | os.X_OK):
            return f"--out-dir {out_dir} is not writable"
        return None
    parent = out_dir.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        return f"--out-dir {out_dir} cannot be made: {parent} is a file, not a folder"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"--out-dir {out_dir} cannot be made: {parent} is not writable"
    return None


def _thread_count(text: str) -> str:
    if text != "all" and not (text.isdigit() and int(text) > 0):
        raise argparse.ArgumentTypeError(f"a thread count is a positive integer or 'all', not {text!r}")
    return text


def log(message: str) -> None:
    print(message, flush=True)


def _threads(values: list[str], default_all: int) -> list[int]:
    out = []
    for v in values:
        n = default_all if v == "all" else int(v)
        if n not in out:
            out.append(n)
    return out


def main(argv: list[str] | None = None) -> int:
    started = time.monotonic()
    # Before anything imports Triton (parsing --name imports mod_models, which imports it through
    # torch._dynamo): its own @jit helpers (tl.sort, reductions) must be created in interpreter
    # mode too, or interpreted kernels cannot call them.
    enable_triton_interpreter_without_cuda()
    parser = build_parser()
    args = parser.parse_args(argv)
    problem = out_dir_problem(args.out_dir)
    if problem:  # one line, before anything is measured
        parser.exit(2, f"{parser.prog}: error: {problem}\n")

    import torch

    from .kernels import OPS

    unknown_ops = sorted(set(args.kernel_ops or ()) - set(OPS))
    if unknown_ops:
        parser.error(f"unknown kernel op(s) {unknown_ops}; expected some of {list(OPS)}")

    from . import kernels as K
    from . import models as M
    from . import plot as P
    from . import report as R
    from .env import collect_env, cuda_text, resolve_device, result_stem, stamp
    from .providers import MOD_PROVIDERS, parse_providers
    from .timing import Budget, Progress, copy_bandwidth, format_duration

    unknown_models = [name for name in args.models or () if name not in M.MOD_BUILDERS]
    if unknown_models:
        parser.error(f"unknown MoD model(s) {unknown_models}; expected some of {list(M.MOD_BUILDERS)}")
    try:
        chosen_providers = parse_providers(args.providers) if args.providers else None
        device = resolve_device(args.device)
    except (ValueError, RuntimeError) as error:
        parser.error(str(error))
    all_threads = torch.get_num_threads()
    on_cuda = device.type == "cuda"
    if on_cuda:
        torch.backends.cudnn.benchmark = True
    small = args.quick or args.dry_run
    mode = "dry-run" if args.dry_run else "quick" if args.quick else "full" if args.full else "short"
    if args.budget == "default":
        args.budget = 1200.0 if on_cuda and not small else None
    elif args.budget == "none":
        args.budget = None
    budget = Budget(args.budget)
    env = collect_env(device)
    meta: dict = {
        "env": env, "command": " ".join(["python -m bench", *(shlex.quote(a) for a in (argv or sys.argv[1:]))]),
        "mode": mode,
        "load_average": [list(os.getloadavg())] if hasattr(os, "getloadavg") else None,
        "notes": [], "sections": {},
    }
    if args.dry_run:
        meta["notes"].append("DRY RUN: tiny shapes to exercise the code paths; the numbers mean nothing.")
    elif args.quick:
        meta["notes"].append("QUICK (smoke) run: tiny shapes; the numbers mean little.")
    elif mode == "short" and not args.models:
        meta["notes"].append(f"SHORT table (the default): {', '.join(SHORT_MODELS)}; `python -m bench --full` "
                             "measures every variant.")
    if args.train_only and args.no_train:
        parser.error("--train-only and --no-train contradict each other")
    sections = ["kernels"] if args.kernels else ["models", "train"] if args.models_only else ["train"] if (
        args.train_only) else (["kernels", "models", "train"] if on_cuda or small else ["models", "train"])
    if args.no_train and "train" in sections:
        sections.remove("train")
    # The native CPU block's microbenchmark: its own section of the whole CPU table (and of the smoke run).
    if not on_cuda and not args.dry_run and (args.full or args.quick) and "models" in sections and not (
            args.models_only or args.no_native_block):
        sections.append("native_block")
    if not on_cuda and "kernels" not in sections and not (args.models_only or args.train_only):
        note = ("kernel microbenchmarks skipped: they time GPU kernels (no CUDA device here); "
                "`python -m bench --kernels` runs a CPU smoke version")
        log(note)
        meta["notes"].append(note)
    compile_default = (on_cuda and not args.quick) or args.dry_run
    use_compile = compile_default if args.compile is None else args.compile
    records: list[dict] = []
    stem = args.name or result_stem(env["device_slug"], mode)
    out_dir: Path = args.out_dir
    part_path = out_dir / f"part-{args.part}.json" if args.part else None
    last_save = [time.monotonic()]

    def save(force: bool = False) -> None:
        if part_path is None or (not force and time.monotonic() - last_save[0] < 10):
            return
        meta["load_average"] = (meta["load_average"] or [])[:1] + [list(os.getloadavg())]
        R.write(records, meta, out_dir, part_path.stem)
        (out_dir / f"{part_path.stem}.md").unlink(missing_ok=True)
        last_save[0] = time.monotonic()

    log(f"bench ({mode}): {env['device']} | mod-cnn {env['mod_cnn']} | torch {env['torch']} | triton {env['triton']} | "
        f"{cuda_text(env)} | sections {sections} | budget {f'{args.budget:.0f} s' if args.budget else 'none'} | "
        f"results -> {out_dir}")

    # ------------------------------------------------------------------------------ kernels
    if "kernels" in sections:
        section_start = time.monotonic()
        copy = copy_bandwidth(device, quick=small)
        meta["copy_bandwidth"] = copy
        log(f"copy bandwidth: {copy['gbps']:.1f} GB/s ({copy['what']})")
        records.append(stamp({"section": "copy", "dtype": "fp32", "batch": None, "memory_format": None,
                              **{k: v for k, v in copy.items() if k != "timing"}, **copy["timing"]}, env))
        ops = tuple(args.kernel_ops or K.OPS)
        if small:
            shapes = [K.KernelShape(2, 128, 8, 8, 64, d, f) for d in (args.kernel_dtypes or ["fp32"])
                      for f in (args.kernel_formats or ["nchw"])]
            providers = ["reference"]
            if on_cuda or args.dry_run:
                providers.append("triton")
            else:
                meta["notes"].append("kernels, CPU quick run: triton provider not run (Triton on CPU is its "
                                     "interpreter, a correctness tool; --dry-run exercises it)")
            tasks = K.simple_plan(shapes, tuple(providers), ops)
            if "block.deploy" in ops and "triton" in providers:  # the deploy form's fallback (k = 64)
                tasks.append(K.KernelTask(K.KernelShape(2, 128, 8, 8, 2, shapes[0].dtype, shapes[0].memory_format),
                                          "block.deploy", tuple(providers), 0))
            if use_compile or args.dry_run:
                tasks += [K.KernelTask(s, op, ("reference+compile",), 1) for s in shapes[:1]
                          for op in ("route_fuse.fwd",) if op in ops]
        else:
            stages = K.stage_shapes(args.kernel_model, args.resolution or 224)
            if on_cuda:
                tasks = K.gpu_plan(
                    stages, batches=tuple(args.kernel_batches or (64, 256, 1)),
                    dtypes=tuple(args.kernel_dtypes or ("bf16", "fp32")),
                    formats=tuple(args.kernel_formats or ("channels_last", "nchw")), ops=ops, compile=use_compile,
                )
            else:
                shapes = [K.KernelShape(b, c, h, w, cap, d, f) for b in (args.kernel_batches or [1])
                          for d in (args.kernel_dtypes or ["fp32"]) for f in (args.kernel_formats or ["nchw"])
                          for c, h, w, cap in stages]
                tasks = K.simple_plan(shapes, ("reference",) + (("reference+compile",) if use_compile else ()), ops)
                meta["notes"].append("kernels on CPU: perf_counter smoke timing of the reference; triton not timed "
                                     "(interpreter only)")
        log(f"kernels: {len(tasks)} task(s)")
        timer = K.KernelTimer(rep_ms=5 if small else 20, warmup_ms=2 if small else 5, graph_rep_ms=5 if small else 10,
                              cpu_reps=3 if small else 5, cpu_warmup_ms=50.0 if small else 200.0)
        # CPU smoke: one thread (the first --threads value), so a busy machine's descheduled
        # OpenMP worker does not turn microsecond ops into scheduler ticks.
        kernel_threads = None if on_cuda else _threads(args.threads or ["1"], all_threads)[0]
        first = len(records)

        def keep(so_far: list[dict]) -> None:
            records[first:] = so_far
            save()

        with M.thread_setting(kernel_threads):
            kernel_records = K.run_tasks(tasks, device=device, env=env, copy_gbps=copy["gbps"], budget=budget,
                                         timer=timer, seed=args.seed, log=log, on_task=keep)
        records[first:] = kernel_records
        meta["sections"]["kernels"] = time.monotonic() - section_start
        log("section " + R.sections_text({"kernels": meta["sections"]["kernels"]}))
        save(force=True)

    # ------------------------------------------------------------------- model table: the plan
    names = args.models or (
        ["resnet18_mod"] if small else list(M.MOD_BUILDERS) if args.full else list(SHORT_MODELS))
    if not args.models and on_cuda:  # the targets' family (resnet50 baseline) first, when time is short
        names = sorted(names, key=lambda name: M.BASELINE_OF[name] != M.BASELINE_OF[KEY_MODELS[0]])
    floors = tuple(args.floors) if args.floors is not None else ("identity", "static")
    cache = M.ModelCache(args.seed)
    progress = None
    train = None
    if "train" in sections:
        train = _train_plan(args, names, floors=floors, on_cuda=on_cuda, small=small, all_threads=all_threads,
                            use_compile=use_compile, chosen_providers=chosen_providers, meta=meta)
        if not train.phases:
            sections.remove("train")

    # ------------------------------------------------------------------------------- models
    if "models" in sections:
        section_start = time.monotonic()
        resolution = args.resolution or (32 if args.dry_run else 64 if args.quick else 224)
        if chosen_providers:
            providers = chosen_providers
        elif on_cuda or args.dry_run:
            providers = [MOD_PROVIDERS[name] for name in ("triton+deploy", "reference+deploy", "reference", "triton")]
        else:
            providers = cpu_providers(args.full, meta)
        eager = [p for p in providers if not p.compiled]
        compiled = [p for p in providers if p.compiled]
        if use_compile and not args.providers:
            extra = [MOD_PROVIDERS["reference+compile"]]
            if on_cuda or args.dry_run:
                extra[:0] = [MOD_PROVIDERS["triton+deploy+compile"], MOD_PROVIDERS["triton+compile"]]
            compiled = extra + [p for p in compiled if p not in extra]
        if on_cuda:
            batches = args.batch_sizes or ([2, 1] if small else [64, 1])
            dtypes = args.dtype or (["bf16"] if small else ["bf16", "fp32"])
            formats = args.memory_format or ["channels_last"]
            threads: list = [None]
        else:
            batches = args.batch_sizes or ([1, 8] if args.full else [1])
            dtypes = args.dtype or ["fp32"]
            formats = args.memory_format or ["nchw"]
            threads = _threads(args.threads or (["1", "all"] if args.full else ["1"]), all_threads)
        configs = M.default_configs(
            device.type, batch_sizes=batches, dtypes=dtypes, memory_formats=formats, resolution=resolution,
            threads=threads, cuda_graph_max_batch=0 if args.no_cuda_graphs else 8,
            also_graphs=on_cuda and not args.no_cuda_graphs and not small,
        )
        timer = M.TimerSettings(
            cpu_rounds=args.rounds or (2 if small else 5), cpu_samples_per_round=2 if small else 3,
            cpu_warmup=1 if small else 2, cuda_reps=5 if small else 15, cuda_warmup=2 if small else 3,
            compile_estimate_s=60.0,
        )
        first_dtype = [c for c in configs if c.dtype == configs[0].dtype]
        other_configs = [c for c in configs if c.dtype != configs[0].dtype]
        key_models = [m for m in KEY_MODELS if m in names] or names[:1]
        # Priority order (a budget cuts the tail): eager at the first dtype; compiled key models at
        # the first config; eager at the other dtypes; compiled key models at the other first-dtype
        # configs; compiled everything else.
        # The deploy rows come first (the deploy form is what serves a trained model).
        deployed = [p for p in eager if p.deploy]
        as_trained = [p for p in eager if not p.deploy]
        phases: list[tuple[list, list, list, tuple]] = [(first_dtype, deployed, names, floors),
                                                        (first_dtype, as_trained, names, floors)]
        if compiled:
            phases.append((first_dtype[:1], compiled, key_models, ("identity",)))
        phases.append((other_configs, eager, names, floors))
        if compiled:
            phases.append((first_dtype[1:], compiled, key_models, ("identity",)))
            rest = [m for m in names if m not in key_models]
            phases.append((first_dtype, compiled, rest, ("identity",)))
            phases.append((other_configs, compiled, names, ("identity",)))
        if not on_cuda and not args.dry_run:
            # On a CPU every provider of a family runs in one family run, so that all its cases (the
            # runtimes, compiled ones included) are timed side by side in interleaved rounds.
            phases = [(configs, eager + compiled, names, floors)]
        phases = [phase for phase in phases if all(phase[:3])]
        plan = [case for configs_, providers_, names_, floors_ in phases
                for case in M.plan_cases(names_, configs_, providers_, floors_)]
        progress = Progress(len(plan) + (len(train.plan) if train else 0),
                            sum(M.case_weight(net, prov, c.batch, c.resolution) for c, net, _, prov in plan)
                            + (train.weight if train else 0.0))
        log(f"models: {len(plan)} case(s) (network x provider x config), "
            f"{len({(c, M.BASELINE_OF[net] if role != 'baseline' else net) for c, net, role, _ in plan})} "
            "family run(s)")

        def on_case(record: dict) -> tuple[str, str]:
            return progress.advance(M.case_weight(record["model"], record["provider"], record["batch"],
                                                  record["resolution"]))

        for phase_configs, phase_providers, phase_names, phase_floors in phases:
            first = len(records)

            def keep_models(so_far: list[dict], first: int = first) -> None:
                records[first:] = so_far
                save()

            records[first:] = M.run_models(phase_names, phase_configs, phase_providers, env=env, cache=cache,
                                           budget=budget, timer=timer, floors=phase_floors, seed=args.seed, log=log,
                                           on_family=keep_models, on_case=on_case)
            save()
        meta["sections"]["models"] = time.monotonic() - section_start
        log("section " + R.sections_text({"models": meta["sections"]["models"]}))
        if mode == "short" and not on_cuda:
            full_configs = M.default_configs("cpu", batch_sizes=[1, 8], dtypes=dtypes, memory_formats=formats,
                                             resolution=resolution, threads=_threads(["1", "all"], all_threads))
            full_providers = cpu_providers(True, {"notes": []})
            full_weight = sum(M.case_weight(net, prov, c.batch, c.resolution) for c, net, _, prov
                              in M.plan_cases(list(M.MOD_BUILDERS), full_configs, full_providers, floors))
            if train:
                full_weight += train.full_weight
            estimate = progress.seconds_for(full_weight)
            meta["full_estimate_s"] = estimate

    # ------------------------------------------------------------------------ training step
    if "train" in sections:
        from . import training as T

        section_start = time.monotonic()
        if progress is None:
            progress = Progress(len(train.plan), train.weight)
        log(f"training step: {len(train.plan)} case(s) (network x provider x config); {train.what}")

        def on_train_case(record: dict) -> tuple[str, str]:
            return progress.advance(T.train_case_weight(record["model"], record["provider"], record["batch"],
                                                        record["resolution"]))

        for phase_configs, phase_providers, phase_names, phase_floors in train.phases:
            first = len(records)

            def keep_train(so_far: list[dict], first: int = first) -> None:
                records[first:] = so_far
                save()

            records[first:] = T.run_train(phase_names, phase_configs, phase_providers, env=env, cache=cache,
                                          budget=budget, timer=train.timer, floors=phase_floors, seed=args.seed,
                                          log=log, on_family=keep_train, on_case=on_train_case)
            save()
        meta["sections"]["train"] = time.monotonic() - section_start
        log("section " + R.sections_text({"train": meta["sections"]["train"]}))

    # ----------------------------------------------------------------------------- launches
    if "models" in sections:
        from . import launches as L

        section_start = time.monotonic()
        # On a GPU the key models (every launch compiles its kernel once); on a CPU every model shown.
        launch_models = (["resnet18_mod"] if small
                         else ([m for m in KEY_MODELS if m in names] or names[:1]) if on_cuda else names)
        log(f"kernel launches: per block type and per forward of {', '.join(launch_models)} and their baselines")
        try:
            launch_records, note = L.measure(launch_models, on_cuda=on_cuda, log=log, every_variant=not small)
            # Counted at batch 1 in fp32 NCHW (the count does not depend on the dtype or the layout).
            records += [stamp({"dtype": "fp32", "batch": 1, "memory_format": "nchw", **record}, env)
                        for record in launch_records]
            meta["notes"].append(f"kernel launches {note}")
            for record in launch_records:
                if record["scope"] == "model" and record["network"] == "mod" and record["path"] == "triton+deploy":
                    log(f"  {record['model']}: {record['launches']} launches per forward deployed on triton, "
                        f"at most {record['max_per_mod_block']} per MoD block")
        except Exception as error:  # noqa: BLE001 - reported in the results, never faked
            meta["notes"].append(f"kernel launches not counted: {error}")
            log(f"kernel launches not counted: {error}")
        meta["sections"]["launches"] = time.monotonic() - section_start
        save()

    # -------------------------------------------------------------- native block microbenchmark
    if "native_block" in sections:
        from . import native_block as NB

        section_start = time.monotonic()
        shapes, block_batches, block_threads = ((NB.QUICK_SHAPES, (1,), [1]) if small
                                                else (NB.SHAPES, (1, 8), _threads(["1", "all"], all_threads)))
        log(f"native block: {len(shapes)} shape(s) x batch {block_batches} x threads {block_threads}: native vs "
            "reference deploy block vs one read of the input")
        block_records, load_s = NB.measure(batches=block_batches, threads=block_threads, shapes=shapes,
                                           rounds=2 if small else 5, env=env, log=log)
        records += block_records
        meta["notes"].append("native block: extension " + ("not loaded" if load_s is None else
                                                            f"loaded in {load_s:.1f} s (a build when not cached)"))
        meta["sections"]["native_block"] = time.monotonic() - section_start
        save()

    if meta["load_average"] is not None:
        meta["load_average"] = meta["load_average"][:1] + [list(os.getloadavg())]
    if part_path is None:
        meta["sections"]["total"] = time.monotonic() - started
    if part_path is not None:
        save(force=True)
        log(f"wrote {part_path}")
        return 0
    paths = R.write(records, meta, out_dir, stem)
    if not args.no_plot:
        png = P.plot(records, out_dir / f"{stem}.png", title=f"{env['device']} ({meta['mode']})")
        if png:
            paths["png"] = png
    print_summary(records, meta)
    for path in paths.values():
        log(f"wrote {path}")
    for line in closing_lines(mode, meta, out_dir, n_models=len(M.MOD_BUILDERS), format_duration=format_duration):
        log(line)
    return 0


def cpu_providers(full: bool, meta: dict) -> list:
    """The MoD providers of the CPU model table: the eager reference as trained (what every other
    provider is checked against), then the three CPU runtimes (eager deploy form on the native
    kernel, torch.compile with freezing of the deploy form, ONNX Runtime where installed); with
    ``full`` also the deploy form on the reference backend (what the native kernel replaces)."""
    from .providers import MOD_PROVIDERS

    names = ["reference"] + (["reference+deploy"] if full else []) + ["native+deploy", "native+deploy+freezing"]
    if importlib.util.find_spec("onnxruntime") and importlib.util.find_spec("onnxscript"):
        names.append("onnxruntime")
    else:
        meta["notes"].append("onnxruntime runtime not run: install the export extra (onnxruntime, onnxscript)")
    meta["notes"].append("models on CPU: triton providers not run (Triton on CPU is its interpreter, a correctness "
                         "tool, not a fast path)")
    return [MOD_PROVIDERS[name] for name in names]


@dataclass
class TrainPlan:
    """The training-step rows to measure: phases in priority order (a budget cuts the tail)."""

    phases: list[tuple[list, list, list, tuple]]
    plan: list[tuple]
    weight: float
    full_weight: float  # what the whole table's training rows would weigh (the short run's estimate)
    timer: object
    what: str


def _train_plan(args, names: list[str], *, floors: tuple[str, ...], on_cuda: bool, small: bool, all_threads: int,
                use_compile: bool, chosen_providers, meta: dict) -> TrainPlan:
    from mod_models import BASELINE_OF, MOD_BUILDERS

    from . import training as T

    if chosen_providers:
        providers = [T.TRAIN_PROVIDERS[p.name] for p in chosen_providers if p.name in T.TRAIN_PROVIDERS]
        if not providers:
            meta["notes"].append(f"training-step rows not run: none of the providers asked for takes a training "
                                 f"step ({', '.join(T.TRAIN_PROVIDERS)} do)")
    elif on_cuda or args.dry_run:
        providers = [T.REFERENCE_STEP, T.TRITON_STEP]
    else:
        providers = [T.REFERENCE_STEP]
    eager = [p for p in providers if not p.compiled]
    compiled = [p for p in providers if p.compiled]
    if use_compile and not args.providers:
        compiled = [T.REFERENCE_COMPILED_STEP] + ([T.TRITON_COMPILED_STEP] if on_cuda or args.dry_run else [])
    asked = args.dtype or (["bf16"] if on_cuda or args.dry_run else ["fp32"])
    dtypes = [d for d in asked if d in T.TRAIN_DTYPES]
    if len(dtypes) < len(asked):
        meta["notes"].append(f"training-step rows: {sorted(set(asked) - set(dtypes))} not run (training steps run in "
                             f"{', '.join(T.TRAIN_DTYPES)}; fp16 AMP needs a GradScaler, whose inf check syncs)")
    if on_cuda:
        batches = args.train_batch_sizes or ([2] if small else [64, 128])
        formats = args.memory_format or ["channels_last"]
        threads: list = [None]
    else:
        # A dry run at batch 4: at batch 2 a train-mode batch norm over the 1x1 maps of a 32 px
        # input normalises two values to -1 and +1, so rounding decides its output's sign.
        batches = args.train_batch_sizes or ([4] if args.dry_run else [2] if small else [8, 32] if args.full else [8])
        formats = args.memory_format or (["channels_last"] if args.dry_run else ["nchw"])
        threads = _threads(args.threads or (["1", "all"] if args.full else ["1"]), all_threads)
    resolution = args.train_resolution or (32 if small else 224 if on_cuda else CPU_TRAIN_RESOLUTION)
    configs = T.default_train_configs("cuda" if on_cuda else "cpu", batch_sizes=batches, dtypes=dtypes,
                                      memory_formats=formats, resolution=resolution, threads=threads,
                                      graphs=on_cuda and not args.no_cuda_graphs)
    timer = T.TrainTimer(cpu_rounds=args.rounds or (2 if small else 3), cpu_samples_per_round=1 if small else 2,
                         cpu_warmup=2, cuda_warmup=1 if small else 2, cuda_reps=5 if small else 10)
    # Priority (a budget cuts the tail): the first batch size (eager, then CUDA graphs) for the
    # targets' family, then for the others; the other batch sizes; then torch.compile (eager calls;
    # no whole-step capture of a compiled model) of the targets' models, then the rest.
    first = [c for c in configs if (c.batch, c.dtype) == (configs[0].batch, configs[0].dtype)] if configs else []
    later = [c for c in configs if c not in first]
    key_family = [n for n in names if BASELINE_OF[n] == BASELINE_OF[names[0]]] if names else []
    others = [n for n in names if n not in key_family]
    key_models = [m for m in KEY_MODELS if m in names] or names[:1]
    rest = [n for n in names if n not in key_models]
    not_graph = [c for c in configs if not c.cuda_graph]
    phases = [(first, eager, key_family, floors), (first, eager, others, floors), (later, eager, names, floors),
              (not_graph[:1], compiled, key_models, ("identity",)), (not_graph[:1], compiled, rest, ("identity",)),
              (not_graph[1:], compiled, names, ("identity",))]
    phases = [phase for phase in phases if all(phase[:3])]
    plan = [case for configs_, providers_, names_, floors_ in phases
            for case in T.plan_train_cases(names_, configs_, providers_, floors_)]
    weight = sum(T.train_case_weight(net, prov, c.batch, c.resolution) for c, net, _, prov in plan)
    full_weight = 0.0
    if not on_cuda and eager:
        full = T.default_train_configs("cpu", batch_sizes=args.train_batch_sizes or [8, 32], dtypes=dtypes,
                                       memory_formats=formats, resolution=resolution,
                                       threads=_threads(["1", "all"], all_threads), graphs=False)
        full_weight = sum(T.train_case_weight(net, prov, c.batch, c.resolution)
                          for c, net, _, prov in T.plan_train_cases(list(MOD_BUILDERS), full, eager, floors))
    what = (f"{'/'.join(dtypes)}{' AMP' if dtypes != ['fp32'] else ''}, {resolution}x{resolution}, batch "
            f"{' and '.join(map(str, batches))}, providers {[p.name for p in eager + compiled]}")
    if phases:
        meta["notes"].append(f"training-step rows: {what}" + (
            f"; on the CPU at {resolution}x{resolution} to keep the table short (--train-resolution 224 for the "
            "full size)" if not on_cuda and resolution != 224 and not small else ""))
    return TrainPlan(phases, plan, weight, full_weight, timer, what)


def closing_lines(mode: str, meta: dict, out_dir: Path, *, n_models: int, format_duration) -> list[str]:
    """What to do next: the whole table after the short one, and how a run becomes the project's results."""
    lines = []
    if mode == "short":
        estimate = meta.get("full_estimate_s")
        about = f", about {format_duration(estimate)} here at this run's speed" if estimate else ""
        lines.append(f"This was the short table ({len(SHORT_MODELS)} of {n_models} MoD variants). "
                     f"The whole table: python -m bench --full{about}.")
    if out_dir.resolve() != PUBLISHED_DIR.resolve() and PUBLISHED_DIR.is_dir() and mode in ("short", "full"):
        lines.append(f"Results stay in {out_dir}/ (not tracked by git). To publish a run as the project's results: "
                     f"python -m bench --full --out-dir {PUBLISHED_DIR}, then commit them.")
    return lines


def print_summary(records: list[dict], meta: dict) -> None:
    from . import report as R

    print()
    target_rows = R.targets(records)
    if target_rows:
        rows = [[t["target"], t["status"], t["measured"]] for t in target_rows]
        print(R.table(["target", "status", "measured"], rows))
        print()
    for title, body in R.runtime_tables(records):
        print(f"## CPU runtimes, {title}\n{body}\n")
    for title, body in R.model_tables(records):
        print(f"## {title}\n{body}\n")
    for title, body in R.train_tables(records):
        print(f"## {title}\n{body}\n")
    for title, body in R.native_block_tables(records):
        print(f"## {title}\n{body}\n")
    chain = [r for r in records if r.get("section") == "kernel" and r.get("op", "").startswith("route_fuse")]
    for title, body in R.kernel_tables(chain):
        print(f"## kernels (route+pack+fuse only; all ops in the .md), {title}\n{body}\n")
    if meta.get("sections"):
        print("time: " + R.sections_text(meta["sections"]))


if __name__ == "__main__":
    raise SystemExit(main())
