"""Test configuration.

Triton's interpreter must be switched on before any kernel is defined, so this runs first:
on a machine without CUDA the fused kernels run on the CPU under ``TRITON_INTERPRET=1``.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

os.environ.pop("MOD_BACKEND", None)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_runtest_logreport(report):
    """With ``MOD_TESTS_EARLY_FAILURES=1`` (the GPU script sets it), print each failure's traceback
    as it happens: a run cut off at its time limit still shows why something failed."""
    if report.failed and os.environ.get("MOD_TESTS_EARLY_FAILURES") == "1":
        print(f"\n--- FAILED {report.nodeid} ({report.when})\n{report.longreprtext}\n", flush=True)


def pytest_collection_modifyitems(config, items):
    """With ``MOD_TESTS_EARLY_FAILURES=1`` (the GPU script), the GPU-only tests run first: a short
    lease spends its seconds on what only the GPU can check."""
    if os.environ.get("MOD_TESTS_EARLY_FAILURES") != "1":
        return

    def gpu_only(item) -> bool:
        return any(mark.name == "skipif" and "CUDA" in str(mark.kwargs.get("reason", "")) for mark in item.iter_markers())

    items.sort(key=lambda item: not gpu_only(item))
