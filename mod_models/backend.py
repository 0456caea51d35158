"""The backend switch: which implementation a MoD block's routing and fusion run on.

* ``"reference"``: the pure PyTorch ops of :mod:`mod_models.functional`.
* ``"triton"``: the fused kernels of :mod:`mod_kernels`. On CUDA tensors they run
  compiled; on CPU tensors they run under Triton's interpreter, which needs
  ``TRITON_INTERPRET=1`` in the environment before :mod:`mod_kernels` is imported.
  Anything else raises: there is never a silent fallback.
* ``"auto"``: ``"triton"`` for CUDA tensors, ``"reference"`` everywhere else.

The environment variable ``MOD_BACKEND`` sets the default for blocks built with
``backend=None``. :func:`mod_models.blocks.set_backend` switches a whole model; switching never
changes parameters or state_dict keys.
"""

from __future__ import annotations

import os

from torch import Tensor

BACKENDS = ("reference", "triton", "auto")
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
    """The implementation (``"reference"`` or ``"triton"``) that runs for input ``x``."""
    if name == "reference":
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


def _require_kernels(x: Tensor) -> None:
    try:
        import mod_kernels  # noqa: F401  (imports Triton)
    except ImportError as error:  # pragma: no cover - depends on the install
        raise RuntimeError(
            f"backend 'triton' needs the Triton package, which failed to import: {error}"
        ) from error
    mod_kernels.check_device_supported(x.device)
