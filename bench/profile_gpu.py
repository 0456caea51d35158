"""``python -m bench.profile_gpu``: where a MoD model's time goes on the GPU (diagnostic).

For each model and backend: one eager forward (batch 64, bf16, channels_last, inference) under
``torch.profiler``, printing the wall time of the call, the summed device time of its kernels
(their ratio says whether the eager model is bound by the host or by the GPU), and the kernels
with the most device time. Also prints how ``torch.sort`` on this device orders signed zeros
and NaN signs, beside the CPU's order (the rule the fused selection follows everywhere).
"""

from __future__ import annotations

import argparse
import time

import torch

import mod_models

KERNEL_ROWS = 8


def profile_model(name: str, backend: str, batch: int, dtype: torch.dtype) -> None:
    model = mod_models.build_model(name, backend=backend).cuda().eval().to(
        dtype=dtype, memory_format=torch.channels_last)
    x = torch.randn(batch, 3, 224, 224, device="cuda", dtype=dtype).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        for _ in range(3):
            model(x)
        torch.cuda.synchronize()
        activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=activities) as prof:
            start = time.perf_counter()
            model(x)
            torch.cuda.synchronize()
            wall_ms = (time.perf_counter() - start) * 1e3
    kernels: dict[str, list[float]] = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            entry = kernels.setdefault(event.name, [0.0, 0])
            entry[0] += (event.time_range.end - event.time_range.start) / 1e3
            entry[1] += 1
    device_ms = sum(v[0] for v in kernels.values())
    launches = sum(v[1] for v in kernels.values())
    print(f"\n{name} backend={backend} batch={batch} {dtype}: wall {wall_ms:.2f} ms (profiled), "
          f"device {device_ms:.2f} ms in {launches} kernels ({device_ms / wall_ms:.0%} of wall)")
    for kernel, (ms, count) in sorted(kernels.items(), key=lambda kv: -kv[1][0])[:KERNEL_ROWS]:
        print(f"  {ms:8.3f} ms  {count:4d}x  {kernel[:110]}")
    mod = [(k, v) for k, v in kernels.items() if k.startswith("_") and "kernel" in k]
    if mod:
        print(f"  MoD Triton kernels: {sum(v[0] for _, v in mod):.3f} ms in {sum(v[1] for _, v in mod)} launches")


def sort_semantics() -> None:
    nan, inf = float("nan"), float("inf")
    keys = torch.tensor([[0.5, nan, 0.7, -inf, inf, -0.0, 0.0, -nan]])
    cpu = torch.sort(keys, dim=1, descending=True, stable=True).indices.tolist()
    cuda = torch.sort(keys.cuda(), dim=1, descending=True, stable=True).indices.cpu().tolist()
    print(f"\ntorch.sort(stable, descending) of {keys.tolist()}: CPU {cpu}, CUDA {cuda}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.profile_gpu", description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["resnet18_mod", "resnet50_mod", "mobilenet_v2_mod"])
    p.add_argument("--batch", type=int, default=64)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench.profile_gpu needs a CUDA device")
    sort_semantics()
    for name in args.models:
        for backend in ("reference", "triton"):
            profile_model(name, backend, args.batch, torch.bfloat16)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
