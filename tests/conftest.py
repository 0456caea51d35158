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
