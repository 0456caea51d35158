"""The backend switch: which implementation a MoD block's routing and fusion run on.

* ``"reference"``: the pure PyTorch ops of :mod:`mod_models.functional`.
* ``"triton"``: the fused kernels of :mod:`mod_kernels`. On CUDA tensors they run
  compiled; on CPU tensors they run under Triton's interpreter, which needs
  ``TRITON_INTERPRET=1`` in the environment before :mod:`mod_kernels` is imported.
  Anything else raises: there is never a silent fallback.
* ``"native"``: CPU tensors only. A deployed block (:func:`mod_models.optimize_for_inference`) runs
  the native CPU kernel of :mod:`mod_kernels.native_block` (one call per block; a C++ extension
  built at first use, which needs a C++ compiler), or the reference where
  ``block.deploy_plan()`` says the kernel does not take the block. Blocks that are not deployed
  run the reference (the native kernel computes inference with folded batch norms only). CUDA
  tensors raise.
* ``"auto"``: ``"triton"`` for CUDA tensors; on CPU tensors ``"native"`` for deployed blocks and
  ``"reference"`` for blocks as trained; ``"reference"`` on every other device.

The environment variable ``MOD_BACKEND`` sets the default for blocks built with
``backend=None``. :func:`mod_models.blocks.set_backend` switches a whole model; switching never
changes parameters or state_dict keys.
"""

from __future__ import annotations

import os

from torch import Tensor

BACKENDS = ("reference", "triton", "native", "auto")
BACKEND_ENV_VAR = "MOD_BACKEND"


def check_backend(name: str) -> str:
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")
    return name


def default_backend() -> str:
    """``$MOD_BACKEND`` if set (validated), else ``"auto"``."""
    name = os.environ.get(BACKEND_ENV_VAR, "").strip()
    if not name:
        return "auto"
    if name not in BACKENDS:
        raise ValueError(
            f"environment variable {BACKEND_ENV_VAR}={name!r} is not a backend; expected one of {BACKENDS}"
        )
    return name


def resolve_backend(name: str, x: Tensor) -> str:
    """The implementation (``"reference"`` or ``"triton"``) that runs a block as trained for input ``x``."""
    if name == "reference":
        return "reference"
    if name == "native":
        _require_cpu(x)
        return "reference"
    if name == "auto":
        if x.device.type != "cuda":
            return "reference"
        _require_kernels(x)
        return "triton"
    if name == "triton":
        _require_kernels(x)
        return "triton"
    raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")


def resolve_deployed_backend(name: str, x: Tensor) -> str:
    """The implementation (``"native"``, ``"triton"`` or ``"reference"``) that runs a deployed block
    (:func:`mod_models.optimize_for_inference`) for input ``x``."""
    if name == "native" or (name == "auto" and x.device.type == "cpu"):
        _require_cpu(x)
        return "native"
    return resolve_backend(name, x)


def _require_cpu(x: Tensor) -> None:
    if x.device.type != "cpu":
        raise RuntimeError(
            f"backend 'native' runs on CPU tensors, got a tensor on {x.device}; use backend 'triton' or 'auto' there"
        )


def _require_kernels(x: Tensor) -> None:
    try:
        from mod_kernels import check_device_supported  # imports Triton
    except ImportError as error:  # pragma: no cover - depends on the install
        raise RuntimeError(
            f"backend 'triton' needs the Triton package, which failed to import: {error}"
        ) from error
    check_device_supported(x.device)
