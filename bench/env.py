"""The machine a benchmark ran on: device name, versions, date; stamped on every record."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent

# Keys copied into every record (record-specific keys such as dtype, batch, memory format
# and threads are set by the benchmark that makes the record).
RECORD_ENV_KEYS = ("device", "device_type", "torch", "torchvision", "triton", "cuda", "date", "git_commit")


def enable_triton_interpreter_without_cuda() -> None:
    """Without CUDA, Triton kernels can only run in its interpreter, which must be switched on
    before Triton is first imported (its own ``@jit`` helpers are made at import) and before
    :mod:`mod_kernels` defines its kernels, as ``tests/conftest.py`` does."""
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


def resolve_device(name: str = "auto") -> torch.device:
    """``"auto"`` is CUDA where available, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but torch sees no CUDA device")
    return device


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} ({os.cpu_count()} logical CPUs)"


def device_slug(device: torch.device) -> str:
    """File-name stem for results of this device, e.g. ``nvidia-h100-80gb-hbm3`` or ``cpu-amd-epyc-2cpu``."""
    if device.type == "cuda":
        base = torch.cuda.get_device_name(device)
    else:
        base = f"cpu {cpu_name()} {os.cpu_count()}cpu"
    return re.sub(r"[^a-z0-9]+", "-", base.lower()).strip("-")


def _version(module_name: str) -> str | None:
    try:
        module = __import__(module_name)
    except Exception:  # noqa: BLE001 - any import failure means "not usable here"
        return None
    return getattr(module, "__version__", "unknown")


def git_commit() -> str | None:
    """``HEAD`` of the repository, with ``+dirty`` when tracked files differ (None outside git).

    ``$MOD_BENCH_COMMIT`` overrides it: a copy of the tree whose git metadata is stale (a remote
    device machine's) can be told which commit it runs."""
    if os.environ.get("MOD_BENCH_COMMIT"):
        return os.environ["MOD_BENCH_COMMIT"]
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10,
            check=False,
        )
        if head.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT, capture_output=True, text=True,
            timeout=10, check=False,
        )
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def collect_env(device: torch.device) -> dict[str, Any]:
    """Everything a reader needs to know about where and with what a result was measured."""
    env: dict[str, Any] = {
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "torchvision": _version("torchvision"),
        "triton": _version("triton"),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads_default": torch.get_num_threads(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", ""),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            {
                "gpu_memory_gib": round(props.total_memory / 2**30, 1),
                "gpu_multiprocessors": props.multi_processor_count,
                "gpu_capability": f"{props.major}.{props.minor}",
                "cudnn_benchmark": torch.backends.cudnn.benchmark,
                "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
                "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            }
        )
        try:
            driver = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=20, check=False,
            )
            env["cuda_driver"] = driver.stdout.strip().splitlines()[0] if driver.returncode == 0 else None
        except (OSError, subprocess.SubprocessError, IndexError):
            env["cuda_driver"] = None
    return env


def stamp(record: dict[str, Any], env: dict[str, Any]) -> dict[str, Any]:
    """``record`` with the environment keys every record carries (record keys win), and the
    number of CPU threads torch uses now where the record does not set one."""
    stamped = {key: env.get(key) for key in RECORD_ENV_KEYS}
    stamped.update(record)
    if stamped.get("threads") is None:
        stamped["threads"] = torch.get_num_threads()
    return stamped
