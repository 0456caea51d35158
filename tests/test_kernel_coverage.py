"""Every kernel code path the zoo models launch is launched by the CPU suite at least once.

``mod_models.tools.launch_plan.record_model_launches`` records, without running them, the launches of
every MoD stage shape of resnet18_mod, resnet50_mod and both MobileNets at 224x224 (fp32, bf16,
fp16; NCHW and channels_last; every fusion; both routers; forward, backward, in-place inference,
the deployed block). Each launch's code path (``launch_plan.specialisation``: kernel, non-tile
constexpr flags such as ``HW_FLAT``/``RELU``/``IN_PLACE``, argument dtypes, memory format, and for
the pooling kernels whether H x W spans more than one chunk) must be among the paths the rest of
this session launched (``tests/conftest.py`` records them). A new kernel path that no CPU test
reaches fails here. Tile *sizes* are the compile check's: every value the models use is compiled
for sm_80/sm_90 (tests/tools/test_kernel_compile.py).

This test runs last and only in a run of the whole suite (a partial run launches less: it skips,
and says so).
"""

from __future__ import annotations

import conftest
import pytest
import torch

from mod_models.tools import launch_plan


def _whole_suite(config) -> bool:
    option = config.option
    return (
        config.args_source == pytest.Config.ArgsSource.TESTPATHS
        and not option.keyword
        and not option.markexpr
        and not getattr(option, "lf", False)
        and not getattr(option, "deselect", None)
    )


def _describe(path: tuple) -> str:
    name, flags, dtypes, layout, multi_chunk = path
    flag_text = ", ".join(f"{k}={v}" for k, v in flags)
    return f"{name}({flag_text}) dtypes={'/'.join(dtypes)} {layout}{' multi-chunk' if multi_chunk else ''}"


def test_interpreter_suite_launches_every_model_kernel_path(request):
    if torch.cuda.is_available():
        pytest.skip("the CPU suite's coverage is measured where kernels run under the interpreter")
    if not _whole_suite(request.config):
        pytest.skip("kernel-path coverage needs the whole suite (this run selected a part of it)")
    required = {
        launch_plan.specialisation(launch.kernel, launch.args, launch.kwargs)
        for launch in launch_plan.record_model_launches()
    }
    launched = conftest.LAUNCHED_SPECIALISATIONS
    missing = sorted(required - launched)
    assert not missing, (
        f"{len(missing)} of {len(required)} kernel paths the models launch were never launched by the CPU suite:\n  "
        + "\n  ".join(_describe(path) for path in missing[:40])
    )
