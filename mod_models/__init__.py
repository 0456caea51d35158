"""CNN Mixture-of-Depths: reference blocks and torchvision-style models.

See ``mod_models.functional`` for the method as small ops, ``mod_models.blocks`` for the
modules, and the builders below for the paper's model zoo.
"""

__version__ = "0.1.0"  # the single source of the version: pyproject.toml reads it from here

from . import features  # noqa: F401  (``mod_models.features.mod_feature_extractor`` after ``import mod_models``)
from .backend import BACKENDS, default_backend
from .blocks import ChannelRouter, MoDBasicBlock, MoDBlock, MoDBottleneck, MoDInvertedResidual, set_backend
from .deploy import fold_batch_norms, is_deployed, optimize_for_inference
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
from .torchvision_api import WeightLoadReport, load_torchvision_weights, register_with_torchvision
from .zoo import BASELINE_OF, MOD_BUILDERS, PAPER_SPEEDUP, build_model


def _register_with_torchvision() -> None:
    """``torchvision.models.get_model("resnet50_mod")`` works once ``mod_models`` is imported."""
    import warnings

    try:
        register_with_torchvision()
    except RuntimeError as error:  # torchvision changed its private registry: say so, keep the package usable
        warnings.warn(str(error), RuntimeWarning, stacklevel=2)


_register_with_torchvision()

# Submodules reachable as attributes after a plain ``import mod_models`` without importing them
# up front (``mod_models.detection.fasterrcnn_resnet50_mod_fpn(...)``). ``mod_models.timm`` is not
# among them: importing it registers the models with timm, so it stays an explicit import.
_LAZY_SUBMODULES = ("analysis", "data", "detection", "export", "facts", "segmentation", "train")


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
