"""The models inside other libraries:

* :mod:`~mod_models.integrations.timm`: ``import mod_models.integrations.timm`` registers every
  variant with timm (``timm.create_model``, features, pretrained_cfg, ...); needs timm;
* :mod:`~mod_models.integrations.torchvision`: torchvision's model registry and loading
  torchvision's weights into the standard blocks of a MoD model;
* :mod:`~mod_models.integrations.features`: torchvision feature extraction of MoD models;
* :mod:`~mod_models.integrations.detection` and :mod:`~mod_models.integrations.segmentation`:
  Faster R-CNN (FPN) and FCN on MoD ResNet backbones.
"""

import importlib

# ``mod_models.integrations.detection`` etc. after ``import mod_models``, imported on first use;
# ``timm`` is not among them: importing it registers the models with timm, so it stays explicit.
_LAZY_SUBMODULES = ("detection", "features", "segmentation", "torchvision")


def __getattr__(name: str):
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
