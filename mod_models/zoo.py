"""The model zoo: every MoD variant, its torchvision baseline, the paper's speed ratios, and the
input preprocessing every model of the zoo expects (ImageNet normalisation, evaluation crop)."""

from __future__ import annotations

from typing import Any, Callable

import torchvision.models as tvm
from torch import nn

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

# The preprocessing of the zoo (torchvision's ImageNet recipe): the training data and timm's
# pretrained_cfg both read it from here.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EVAL_CROP_RATIO = 0.875  # resize 256 -> crop 224

MOD_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "resnet18_mod": resnet18_mod,
    "resnet26_mod": resnet26_mod,
    "resnet34_mod": resnet34_mod,
    "resnet42_mod": resnet42_mod,
    "resnet50_mod": resnet50_mod,
    "resnet75_mod": resnet75_mod,
    "resnet86_mod": resnet86_mod,
    "resnet101_mod": resnet101_mod,
    "resnet152_mod": resnet152_mod,
    "mobilenet_v2_mod": mobilenet_v2_mod,
    "mobilenet_v2_mod_l": mobilenet_v2_mod_l,
}

BASELINE_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "resnet18": tvm.resnet18,
    "resnet34": tvm.resnet34,
    "resnet50": tvm.resnet50,
    "resnet101": tvm.resnet101,
    "resnet152": tvm.resnet152,
    "mobilenet_v2": tvm.mobilenet_v2,
}

# The torchvision network each MoD variant is compared with (the paper's speed table; resnet26_mod
# and resnet42_mod are not in it and are compared with the next smaller ResNet, as resnet75_mod is
# with resnet50).
BASELINE_OF: dict[str, str] = {
    "resnet18_mod": "resnet18",
    "resnet26_mod": "resnet18",
    "resnet34_mod": "resnet34",
    "resnet42_mod": "resnet34",
    "resnet50_mod": "resnet50",
    "resnet75_mod": "resnet50",
    "resnet86_mod": "resnet50",
    "resnet101_mod": "resnet101",
    "resnet152_mod": "resnet101",
    "mobilenet_v2_mod": "mobilenet_v2",
    "mobilenet_v2_mod_l": "mobilenet_v2",
}

# The paper's speed ratios, baseline time / MoD time, (CPU, GPU): Cakaj et al., "CNN Mixture-of-Depths",
# ACCV 2024, measured with torch.utils.benchmark (likely batch 1, 224x224) on a laptop CPU
# (i7-10850H) and GPU (Quadro RTX 3000). Its accuracy headline: ResNet75-MoD matches ResNet50 on
# ImageNet (76.27 vs 76.25 top-1), ResNet86-MoD beats it by 0.45.
PAPER_SPEEDUP: dict[str, tuple[float, float]] = {
    "resnet50_mod": (1.48, 1.44),
    "resnet75_mod": (1.25, 1.15),
    "resnet86_mod": (1.06, 1.05),
    "resnet101_mod": (1.55, 1.57),
    "resnet152_mod": (1.20, 1.12),
    "resnet18_mod": (1.60, 1.58),
    "resnet34_mod": (1.63, 1.53),
    "mobilenet_v2_mod": (1.43, 1.39),
    "mobilenet_v2_mod_l": (1.11, 1.10),
}


def model_names() -> list[str]:
    return list(MOD_BUILDERS) + list(BASELINE_BUILDERS)


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a MoD variant or a torchvision baseline by name (MoD keywords go to MoD variants only)."""
    if name in MOD_BUILDERS:
        return MOD_BUILDERS[name](**kwargs)
    if name in BASELINE_BUILDERS:
        mod_only = {"capacity", "fusion", "router", "backend", "inplace"} & set(kwargs)
        if mod_only:
            raise ValueError(f"{name} is a torchvision baseline; MoD keywords {sorted(mod_only)} do not apply")
        return BASELINE_BUILDERS[name](**kwargs)
    raise ValueError(f"unknown model {name!r}; expected one of {model_names()}")
