"""Where a MoD model's CPU time goes beyond its identity floor, in each CPU runtime.

``python -m bench.profile_cpu`` (default resnet50_mod and mobilenet_v2_mod, batch 1, 224x224, fp32,
one thread) profiles the three runtimes of the model table (:mod:`bench.providers`):

* **eager, deploy form**: each MoD block timed inside the model's forward (forward hooks, the
  thread's CPU time), its extension call apart from the Python around it, and the same block run
  back to back on its recorded input (warm caches) for comparison;
* **torch.compile + freezing**: ``torch.profiler`` of the compiled deploy form beside its compiled
  identity floor, per op (the native block calls, oneDNN convolutions, Inductor's generated kernels);
* **ONNX Runtime**: ONNX Runtime's own per-node profile (``enable_profiling``) per op type, the
  exported MoD model beside its exported identity floor.

Times are the calling thread's CPU time (``time.thread_time``; with one thread the whole computation
runs on it), medians over ``--reps`` forwards after warm-up, so other processes on a shared machine
inflate them less than wall time (they still share the caches). Markdown on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections import defaultdict

import torch
from torch import nn

from mod_models import BASELINE_OF, build_model, optimize_for_inference, set_backend
from mod_models.blocks import MoDBlock

from .floors import identity_floor


def _cpu_ms(fn, reps: int) -> float:
    samples = []
    for _ in range(reps):
        start = time.thread_time_ns()
        fn()
        samples.append((time.thread_time_ns() - start) / 1e6)
    return statistics.median(samples)


def _build(name: str) -> nn.Module:
    torch.manual_seed(0)
    return build_model(name, backend="reference").eval()


def eager_blocks(name: str, x: torch.Tensor, reps: int) -> dict:
    """The deploy form on the native kernel: model and floor times, and per MoD block its time inside
    the forward, its extension call inside the forward, and its time run back to back (warm)."""
    from mod_kernels import native_block as NB

    model = optimize_for_inference(set_backend(_build(name), "native"))
    floor = optimize_for_inference(identity_floor(_build(name)).eval())
    extension = NB.load_extension()
    calls: list[float] = []

    class Timed:  # the extension's entry point, timed (the block's forward looks it up on every call)
        def native_block(self, *args):
            start = time.thread_time_ns()
            out = extension.native_block(*args)
            calls.append((time.thread_time_ns() - start) / 1e3)
            return out

    blocks = [(n, m) for n, m in model.named_modules() if isinstance(m, MoDBlock)]
    inside: dict[str, list[float]] = defaultdict(list)
    ext_inside: dict[str, list[float]] = defaultdict(list)
    inputs: dict[str, torch.Tensor] = {}

    def record(block, args):  # a first forward keeps every block's input (for the warm runs)
        inputs[block._profile_name] = args[0].clone()

    def pre(block, args):
        calls.clear()
        block._profile_start = time.thread_time_ns()

    def post(block, args, out):
        inside[block._profile_name].append((time.thread_time_ns() - block._profile_start) / 1e3)
        ext_inside[block._profile_name].append(sum(calls))

    for block_name, block in blocks:
        block._profile_name = block_name
    original = NB.load_extension
    NB.load_extension = lambda: Timed()
    try:
        with torch.inference_mode():
            handles = [block.register_forward_pre_hook(record) for _, block in blocks]
            model(x)
            for handle in handles:
                handle.remove()
            handles = [h for _, block in blocks
                       for h in (block.register_forward_pre_hook(pre), block.register_forward_hook(post))]
            for _ in range(3):
                model(x)
            inside.clear()
            ext_inside.clear()
            for _ in range(reps):
                model(x)
            for handle in handles:
                handle.remove()
            model_ms = _cpu_ms(lambda: model(x), reps)
            floor_ms = _cpu_ms(lambda: floor(x), reps)
            rows = []
            for block_name, block in blocks:
                warm_input = inputs[block_name]
                copies = [warm_input.clone() for _ in range(reps + 3)]
                for i in range(3):
                    block(copies[i])
                warm = []
                calls.clear()
                for i in range(3, reps + 3):
                    start = time.thread_time_ns()
                    block(copies[i])
                    warm.append((time.thread_time_ns() - start) / 1e3)
                warm_ext = statistics.median(calls[-reps:]) if calls else None
                rows.append({"block": block_name, "channels": block.channels, "k": block.k,
                             "size": warm_input.shape[-1], "in_model_us": statistics.median(inside[block_name]),
                             "in_model_call_us": statistics.median(ext_inside[block_name]),
                             "warm_us": statistics.median(warm), "warm_call_us": warm_ext})
    finally:
        NB.load_extension = original
    return {"model_ms": model_ms, "floor_ms": floor_ms, "blocks": rows}


def compiled_ops(name: str, x: torch.Tensor, reps: int) -> dict:
    """``torch.profiler`` of the deploy form and its identity floor under torch.compile with freezing."""
    import torch._inductor.config as inductor_config

    out = {}
    for label, model in (("mod", optimize_for_inference(set_backend(_build(name), "native"))),
                         ("floor", optimize_for_inference(identity_floor(_build(name)).eval()))):
        torch._dynamo.reset()
        with torch.inference_mode():
            with inductor_config.patch(freezing=True):
                compiled = torch.compile(model, dynamic=False)
                compiled(x)
            for _ in range(3):
                compiled(x)
            total_ms = _cpu_ms(lambda: compiled(x), reps)  # noqa: B023 - called right here
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                for _ in range(reps):
                    compiled(x)
        ops = {}
        for event in prof.key_averages():
            if event.self_cpu_time_total > 0:
                ops[event.key] = (event.self_cpu_time_total / reps / 1e3, event.count // reps)
        out[label] = {"total_ms": total_ms, "ops": ops}
    torch._dynamo.reset()
    return out


def ort_nodes(name: str, x: torch.Tensor, reps: int) -> dict:
    """ONNX Runtime's per-node profile of the exported model and floor, per op type (ONNX Runtime's
    graph optimisations fuse and rename nodes, so the difference per op type is what the MoD blocks add)."""
    import onnxruntime as ort

    from mod_models.tools.export import export_onnx

    model = _build(name)
    out = {}
    with tempfile.TemporaryDirectory(prefix="mod-profile-") as folder:
        for label, net in (("mod", model), ("floor", identity_floor(_build(name)).eval())):
            exported = export_onnx(net, os.path.join(folder, f"{label}.onnx"), tuple(x.shape), with_selections=False,
                                   dynamic_batch=False)
            options = ort.SessionOptions()
            options.intra_op_num_threads = torch.get_num_threads()
            options.inter_op_num_threads = 1
            plain = ort.InferenceSession(exported.path, sess_options=options, providers=["CPUExecutionProvider"])
            feed = {exported.input_name: x.numpy()}
            for _ in range(3):
                plain.run(None, feed)
            total_ms = _cpu_ms(lambda: plain.run(None, feed), reps)  # noqa: B023 - called right here
            options.enable_profiling = True
            options.profile_file_prefix = os.path.join(folder, label)
            session = ort.InferenceSession(exported.path, sess_options=options, providers=["CPUExecutionProvider"])
            for _ in range(3 + reps):
                session.run(None, feed)
            with open(session.end_profiling()) as trace:
                events = json.load(trace)
            per_type: dict[str, float] = defaultdict(float)
            counts: dict[str, int] = defaultdict(int)
            runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
            for event in events:
                if event.get("cat") != "Node" or not event["name"].endswith("_kernel_time"):
                    continue
                key = event.get("args", {}).get("op_name", "?")
                per_type[key] += event["dur"] / 1e3
                counts[key] += 1
            n_runs = max(len(runs), 1)
            out[label] = {"total_ms": total_ms,
                          "nodes": {k: (v / n_runs, counts[k] // n_runs) for k, v in per_type.items()}}
    return out


def report(name: str, batch: int, resolution: int, reps: int) -> str:
    x = torch.randn(batch, 3, resolution, resolution)
    lines = [f"## {name} ({BASELINE_OF[name]} family), batch {batch}, {resolution}x{resolution}, "
             f"{torch.get_num_threads()} thread(s)", ""]

    eager = eager_blocks(name, x, reps)
    extra = eager["model_ms"] - eager["floor_ms"]
    lines += [f"**eager, deploy form**: model {eager['model_ms']:.2f} ms, identity floor {eager['floor_ms']:.2f} ms, "
              f"MoD blocks {extra:+.2f} ms ({100 * extra / eager['floor_ms']:+.1f}%) over {len(eager['blocks'])} "
              "block(s). Per block, thread CPU time (us):", "",
              "| block | C | k | HxW | in the model | its extension call | warm (back to back) | its extension call |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in eager["blocks"]:
        lines.append(f"| {row['block']} | {row['channels']} | {row['k']} | {row['size']}x{row['size']} | "
                     f"{row['in_model_us']:.0f} | {row['in_model_call_us']:.0f} | {row['warm_us']:.0f} | "
                     f"{(row['warm_call_us'] or 0):.0f} |")
    sums = [sum(row[key] for row in eager["blocks"]) for key in ("in_model_us", "in_model_call_us", "warm_us")]
    lines += [f"| all | | | | {sums[0]:.0f} | {sums[1]:.0f} | {sums[2]:.0f} | |", ""]

    compiled = compiled_ops(name, x, reps)
    mod, floor = compiled["mod"], compiled["floor"]
    extra = mod["total_ms"] - floor["total_ms"]
    lines += [f"**torch.compile + freezing**: model {mod['total_ms']:.2f} ms, identity floor "
              f"{floor['total_ms']:.2f} ms ({100 * extra / floor['total_ms']:+.1f}%). torch.profiler self CPU time "
              "per forward (ms), MoD / floor:",
              "", "| op | MoD model ms (calls) | floor ms (calls) | difference ms |", "|---|---:|---:|---:|"]
    keys = sorted(set(mod["ops"]) | set(floor["ops"]), key=lambda k: -mod["ops"].get(k, (0, 0))[0])
    for key in keys:
        a, b = mod["ops"].get(key, (0.0, 0)), floor["ops"].get(key, (0.0, 0))
        if max(a[0], b[0]) >= 0.01:
            lines.append(f"| `{key}` | {a[0]:.2f} ({a[1]}) | {b[0]:.2f} ({b[1]}) | {a[0] - b[0]:+.2f} |")
    lines.append("")

    ort_profile = ort_nodes(name, x, reps)
    mod, floor = ort_profile["mod"], ort_profile["floor"]
    extra = mod["total_ms"] - floor["total_ms"]
    lines += [f"**ONNX Runtime**: model {mod['total_ms']:.2f} ms, identity floor {floor['total_ms']:.2f} ms "
              f"({100 * extra / floor['total_ms']:+.1f}%). ONNX Runtime's node profile per op type, ms per run "
              "(nodes; ONNX Runtime's fused nodes included), MoD / floor:", "",
              "| op type | MoD model ms (nodes) | floor ms (nodes) | difference ms |", "|---|---:|---:|---:|"]
    keys = sorted(set(mod["nodes"]) | set(floor["nodes"]), key=lambda k: -mod["nodes"].get(k, (0, 0))[0])
    for key in keys:
        a, b = mod["nodes"].get(key, (0.0, 0)), floor["nodes"].get(key, (0.0, 0))
        if max(a[0], b[0]) >= 0.005:
            lines.append(f"| {key} | {a[0]:.3f} ({a[1]}) | {b[0]:.3f} ({b[1]}) | {a[0] - b[0]:+.3f} |")
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile_cpu", description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet50_mod", "mobilenet_v2_mod"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=15)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"# Where the MoD blocks' CPU time goes (torch {torch.__version__}, load average "
          f"{', '.join(f'{v:.2f}' for v in os.getloadavg())})\n")
    for name in args.models:
        print(report(name, args.batch, args.resolution, args.reps), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
