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


# Every kernel code path the session launched (mod_models.tools.launch_plan.specialisation), for
# tests/test_kernel_coverage.py, which runs last and compares it with what the real models launch.
LAUNCHED_SPECIALISATIONS: set = set()


@pytest.fixture(scope="session", autouse=True)
def _record_kernel_specialisations():
    try:
        from mod_models.tools import launch_plan
    except ImportError:  # no Triton: nothing to record
        yield
        return
    saved = {}
    for name, kernel in launch_plan.all_kernels().items():
        saved[name] = (kernel, kernel.__dict__.get("run"))
        launch = kernel.run

        def recording_run(*args, _kernel=kernel, _launch=launch, **kwargs):
            arguments = {key: value for key, value in kwargs.items() if key not in ("grid", "warmup")}
            LAUNCHED_SPECIALISATIONS.add(launch_plan.specialisation(_kernel, args, arguments))
            return _launch(*args, **kwargs)

        kernel.run = recording_run
    yield
    for kernel, original in saved.values():
        if original is None:
            del kernel.run
        else:
            kernel.run = original


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
    """Tests marked slow are skipped (and reported as skipped) unless ``MOD_SLOW_TESTS=1`` or a ``-m``
    expression asks for them. The kernel-coverage test runs last (it reads what the whole session
    launched). With ``MOD_TESTS_EARLY_FAILURES=1`` (the GPU script), the GPU-only tests run first: a
    short lease spends its seconds on what only the GPU can check."""
    if os.environ.get("MOD_SLOW_TESTS") != "1" and "slow" not in (config.getoption("markexpr") or ""):
        skip = pytest.mark.skip(reason="slow: run with MOD_SLOW_TESTS=1 (or select it with -m slow)")
        for item in items:
            if item.get_closest_marker("slow") is not None:
                item.add_marker(skip)
    items.sort(key=lambda item: item.module.__name__.endswith("test_kernel_coverage"))
    if os.environ.get("MOD_TESTS_EARLY_FAILURES") != "1":
        return

    def gpu_only(item) -> bool:
        return any(mark.name == "skipif" and "CUDA" in str(mark.kwargs.get("reason", ""))
                   for mark in item.iter_markers())

    items.sort(key=lambda item: not gpu_only(item))


def pytest_sessionfinish(session, exitstatus):
    """With ``MOD_KERNEL_COVERAGE=1``, print the model kernel paths this (possibly partial) run
    did not launch: the quick way to see what a new test still has to reach."""
    if os.environ.get("MOD_KERNEL_COVERAGE") != "1":
        return
    from test_kernel_coverage import _describe

    from mod_models.tools import launch_plan

    required = {launch_plan.specialisation(launch.kernel, launch.args, launch.kwargs)
                for launch in launch_plan.record_model_launches()}
    missing = sorted(required - LAUNCHED_SPECIALISATIONS)
    print(f"\nkernel paths the models launch: {len(required)}; not launched by this run: {len(missing)}")
    for path in missing:
        print("  ", _describe(path))
