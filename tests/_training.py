"""Helpers shared by the training, DDP, analysis and export tests (not a test module)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import torch

from mod_models.train import TrainConfig

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(out, **overrides) -> TrainConfig:
    """A run that takes a few seconds on a CPU: 16x16 synthetic images, 64 samples, batch 16."""
    fields = dict(
        model="resnet18_mod",
        data="synthetic",
        out=str(out),
        epochs=2,
        batch_size=16,
        lr=0.02,
        image_size=16,
        num_classes=4,
        train_samples=64,
        val_samples=32,
        workers=0,
        backend="reference",
        device="cpu",
        progress=False,
    )
    fields.update(overrides)
    return TrainConfig(**fields)


TIMING_KEYS = ("train_images_per_s", "epoch_seconds")


def without_timings(history: list[dict]) -> list[dict]:
    """Metric rows without the wall-clock fields (which differ between otherwise identical runs)."""
    return [{key: value for key, value in row.items() if key not in TIMING_KEYS} for row in history]


def file_digest(path) -> str:
    with open(path, "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()


def run_module(
    module: str,
    *args: str,
    timeout: float = 240,
    env_extra: dict | None = None,
    env_remove: tuple[str, ...] = (),
) -> subprocess.CompletedProcess:
    """``python -m module args...`` from the repository root, output captured.

    The child imports this checkout (``PYTHONPATH`` starts with the repository root).
    """
    env = dict(os.environ)
    env.pop("MOD_BACKEND", None)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.update(env_extra or {})
    for name in env_remove:
        env.pop(name, None)
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


class ScriptedTop1:
    """Stands in for :func:`mod_models.train.evaluate`: the real evaluation, but the validation top-1
    of epoch ``e`` (1-based) is ``script[e - 1]``, so a test decides which epochs are the best.

    Set :attr:`epochs_done` to the checkpoint's epoch before resuming a run with it.
    """

    def __init__(self, script: list[float], evaluate) -> None:
        self.script = list(script)
        self.evaluate = evaluate
        self.epochs_done = 0

    def __call__(self, *args, **kwargs):
        result = self.evaluate(*args, **kwargs)
        top1 = self.script[self.epochs_done]
        self.epochs_done += 1
        return {**result, "top1": top1}


def assert_same_tree(a, b, where="") -> None:
    """Bitwise equality of nested dicts / lists / tuples of tensors and plain values."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), where
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"tensors differ at {where}"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"keys differ at {where}: {set(a) ^ set(b)}"
        for key in a:
            assert_same_tree(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for index, (x, y) in enumerate(zip(a, b)):
            assert_same_tree(x, y, f"{where}[{index}]")
    else:
        assert a == b, f"values differ at {where}: {a!r} != {b!r}"
