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
RECORD_ENV_KEYS = ("device", "device_type", "torch", "torchvision", "triton", "cuda", "date", "git_commit", "mod_cnn")
# File-name suffix of each kind of run (python -m bench's modes); a full run has none.
MODE_SUFFIX = {"full": "", "short": "-short", "quick": "-quick", "dry-run": "-dry-run"}


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


def result_stem(slug: str, mode: str) -> str:
    """The one naming rule of result files: the device's slug, then the mode's suffix
    (``cpu-amd-epyc-2cpu``, ``cpu-amd-epyc-2cpu-short``, ``nvidia-h200-dry-run``, ...)."""
    if mode not in MODE_SUFFIX:
        raise ValueError(f"unknown run mode {mode!r}; expected one of {list(MODE_SUFFIX)}")
    return slug + MODE_SUFFIX[mode]


def package_version() -> str:
    """The installed mod-cnn version (``mod_models.__version__``)."""
    from mod_models import __version__

    return __version__


def cuda_text(env: dict[str, Any]) -> str:
    """What a reader should know about CUDA: the runtime in use on a GPU run; elsewhere the CUDA
    version torch was built with, said as such (``torch built with CUDA 13.0; no GPU``)."""
    built = env.get("cuda")
    if env.get("device_type") == "cuda":
        return f"CUDA {built}" + (f" (driver {env['cuda_driver']})" if env.get("cuda_driver") else "")
    if not built:
        return "CPU-only torch build"
    where = "GPU present, not used" if env.get("gpu_available") else "no GPU"
    return f"torch built with CUDA {built}; {where}"


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
        # An installed copy (site-packages) may sit inside some other repository: only a source
        # checkout of this project, whose top level holds this package, has a commit to report.
        top = subprocess.run(
            ["git", "rev-parse", "--show-toplevel"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10,
            check=False,
        )
        if top.returncode != 0 or Path(top.stdout.strip()).resolve() != REPO_ROOT:
            return None
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
        "device_slug": device_slug(device),
        "mod_cnn": package_version(),
        "torch": torch.__version__,
        "torchvision": _version("torchvision"),
        "triton": _version("triton"),
        "cuda": torch.version.cuda,  # the CUDA version torch was built with (None: a CPU-only build)
        "gpu_available": torch.cuda.is_available(),
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
