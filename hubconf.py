"""torch.hub entry points: every MoD variant, e.g.

    model = torch.hub.load("path/to/this/repository", "resnet50_mod", source="local", num_classes=10)

Each entry point is the builder of :mod:`mod_models` (keyword arguments as there; ``weights``
must be None, ``progress`` is accepted and ignored).
"""

from mod_models import (  # noqa: F401  (torch.hub lists the public callables of this module)
    mobilenet_v2_mod,
    mobilenet_v2_mod_l,
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

dependencies = ["torch", "torchvision"]
