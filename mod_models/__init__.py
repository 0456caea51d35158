"""CNN Mixture-of-Depths: the method, its blocks and the paper's torchvision-style models.

The rooms of the package, bottom to top (a module imports only from rooms below it):

* :mod:`mod_models.functional`: the method as small functional ops, the reference every other
  implementation is checked against (the fused kernels of :mod:`mod_kernels` sit above it);
* the blocks and models: :mod:`~mod_models.backend` (the backend switch),
  :mod:`~mod_models.blocks` (MoD blocks), :mod:`~mod_models.deploy` (the inference form),
  :mod:`~mod_models.resnet`, :mod:`~mod_models.mobilenetv2` and :mod:`~mod_models.zoo` (builders);
* the applications: :mod:`mod_models.train` (the training application), :mod:`mod_models.integrations`
  (timm, torchvision, feature extraction, detection and segmentation) and :mod:`mod_models.tools`
  (command-line tools: export, routing analysis, model facts, the kernels' compile check).

``import mod_models`` gives the method and the models; the three application packages are
reachable as attributes (imported on first use).
"""

__version__ = "0.1.0"  # the single source of the version: pyproject.toml reads it from here

from .backend import BACKENDS, default_backend
from .blocks import ChannelRouter, MoDBasicBlock, MoDBlock, MoDBottleneck, MoDInvertedResidual, set_backend
from .deploy import fold_batch_norms, is_deployed, optimize_for_inference
from .integrations.torchvision import WeightLoadReport, load_torchvision_weights, register_with_torchvision
from .mobilenetv2 import mobilenet_v2_mod, mobilenet_v2_mod_l
from .resnet import (
    resnet18_mod,
    resnet26_mod,
    resnet34_mod,
    resnet42_mod,
    resnet50_mod,
    resnet75_mod,
    resnet86_mod,
    resnet101_mod,
    resnet152_mod,
)
from .zoo import BASELINE_OF, MOD_BUILDERS, PAPER_SPEEDUP, build_model


def _register_with_torchvision() -> None:
    """``torchvision.models.get_model("resnet50_mod")`` works once ``mod_models`` is imported."""
    import warnings

    try:
        register_with_torchvision()
    except RuntimeError as error:  # torchvision changed its private registry: say so, keep the package usable
        warnings.warn(str(error), RuntimeWarning, stacklevel=2)


_register_with_torchvision()

# The application packages, reachable as attributes after a plain ``import mod_models`` without
# importing them up front (``mod_models.integrations.detection.fasterrcnn_resnet50_mod_fpn(...)``).
_LAZY_SUBMODULES = ("integrations", "tools", "train")


def __getattr__(name: str):
    if name in _LAZY_SUBMODULES:
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "BACKENDS",
    "BASELINE_OF",
    "ChannelRouter",
    "MOD_BUILDERS",
    "MoDBasicBlock",
    "MoDBlock",
    "MoDBottleneck",
    "MoDInvertedResidual",
    "PAPER_SPEEDUP",
    "WeightLoadReport",
    "__version__",
    "build_model",
    "default_backend",
    "fold_batch_norms",
    "is_deployed",
    "load_torchvision_weights",
    "mobilenet_v2_mod",
    "mobilenet_v2_mod_l",
    "optimize_for_inference",
    "resnet101_mod",
    "resnet152_mod",
    "resnet18_mod",
    "resnet26_mod",
    "resnet34_mod",
    "resnet42_mod",
    "resnet50_mod",
    "resnet75_mod",
    "resnet86_mod",
    "register_with_torchvision",
    "set_backend",
]
