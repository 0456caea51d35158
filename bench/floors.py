"""The floors a MoD model is measured against.

* **Identity floor**: the same network with every MoD block replaced by
  ``nn.Identity``. No MoD implementation can beat it, since a MoD block's output is its input
  plus a correction; the MoD overhead of a backend is ``(t_model - t_identity) / t_identity``.
* **Static floor**: every MoD block replaced by :class:`StaticSelectionBlock`, which runs the
  block's own reduced convolutions ``f_k`` on a fixed selection (the first ``k`` channels,
  score 1) and adds the result back: ``x[:, :k] = act(x[:, :k] + f_k(x[:, :k]))``. No router,
  no top-k, no gather, no scaling. It splits the overhead in two parts with one denominator:

      (t_model - t_identity) / t_identity
          = (t_static - t_identity) / t_identity      # the reduced convolutions f_k
          + (t_model  - t_static)   / t_identity      # routing, packing, scaling, fusion

  The second term is what the fused kernels can remove; the first is the price of the
  convolutions the MoD block exists to run.
"""

from __future__ import annotations

import copy

from torch import Tensor, nn

from mod_models import functional as MF
from mod_models.blocks import MoDBlock


class StaticSelectionBlock(nn.Module):
    """A MoD block without routing: ``f_k`` on the first ``k`` channels, added back with score 1.

    Args:
        block: the MoD block whose ``f_k`` (its ``process``) is reused. It is taken over: its
            router is removed (pass a copy to keep the original intact).
    """

    def __init__(self, block: MoDBlock) -> None:
        super().__init__()
        block.router = None
        self.block = block
        self.k = block.k
        self.activation = block.activation

    def forward(self, x: Tensor) -> Tensor:
        target = x.narrow(1, 0, self.k)
        y = self.block.process(target)
        if MF.autograd_needs(x, y):
            fused = target + y
            if self.activation == "relu":
                fused = fused.relu()
            out = x.clone()
            out.narrow(1, 0, self.k).copy_(fused)
            return out
        target.add_(y)
        if self.activation == "relu":
            target.relu_()
        return x

    def extra_repr(self) -> str:
        return f"k={self.k}, activation={self.activation!r}"


def _replace_mod_blocks(model: nn.Module, make) -> int:
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, MoDBlock):
                setattr(parent, name, make(child))
                replaced += 1
    return replaced


def identity_floor(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every MoD block replaced by ``nn.Identity``."""
    floor = copy.deepcopy(model)
    if _replace_mod_blocks(floor, lambda block: nn.Identity()) == 0:
        raise ValueError(f"{type(model).__name__} has no MoD blocks: it has no floor")
    return floor


def static_floor(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every MoD block replaced by :class:`StaticSelectionBlock`."""
    floor = copy.deepcopy(model)
    if _replace_mod_blocks(floor, StaticSelectionBlock) == 0:
        raise ValueError(f"{type(model).__name__} has no MoD blocks: it has no floor")
    return floor


FLOORS = {"identity": identity_floor, "static": static_floor}
