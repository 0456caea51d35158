"""MoD networks as backbones: ``torchvision.models.feature_extraction`` on MoD models.

torchvision's FX tracer cannot look inside a MoD block (its input checks and data-dependent
routing are Python control flow), so MoD blocks are traced as leaf modules: their outputs
(e.g. ``"layer1.1"``) can be returned, nodes inside them cannot.

MoD blocks built with ``inplace=True`` (or deployed by :func:`mod_models.optimize_for_inference`)
write their result into their input tensor under ``torch.no_grad``. When that input is itself a
returned feature (``"layer1.0"`` feeding the MoD block ``"layer1.1"``), the returned tensor would
be overwritten. The helpers here switch ``inplace`` off on every MoD block of the model they are
given (the extractor shares those modules), so every feature stays intact.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

from .blocks import MoDBlock

# torchvision's tracer tests leaves with isinstance, so the base class covers every MoD block.
MOD_LEAF_MODULES = (MoDBlock,)

ReturnNodes = Optional[Union[Sequence[str], dict[str, str]]]


def disable_inplace(model: nn.Module) -> nn.Module:
    """Set ``inplace = False`` on every MoD block of ``model`` (returns ``model``)."""
    for module in model.modules():
        if isinstance(module, MoDBlock):
            module.inplace = False
    return model


def _tracer_kwargs(tracer_kwargs: Optional[dict[str, Any]]) -> dict[str, Any]:
    merged = dict(tracer_kwargs or {})
    leaves = list(merged.get("leaf_modules", []))
    merged["leaf_modules"] = leaves + [cls for cls in MOD_LEAF_MODULES if cls not in leaves]
    return merged


def mod_graph_node_names(
    model: nn.Module, *, tracer_kwargs: Optional[dict[str, Any]] = None, **kwargs: Any
) -> tuple[list[str], list[str]]:
    """``get_graph_node_names`` for a MoD model: ``(train_nodes, eval_nodes)``, MoD blocks as single nodes."""
    return get_graph_node_names(model, tracer_kwargs=_tracer_kwargs(tracer_kwargs), **kwargs)


def mod_feature_extractor(
    model: nn.Module,
    return_nodes: ReturnNodes = None,
    *,
    train_return_nodes: ReturnNodes = None,
    eval_return_nodes: ReturnNodes = None,
    tracer_kwargs: Optional[dict[str, Any]] = None,
    **kwargs: Any,
) -> nn.Module:
    """``create_feature_extractor`` that works on MoD models (and on any other model).

    Switches ``inplace`` off on the MoD blocks of ``model`` (see the module docstring), traces
    MoD blocks as leaves, and otherwise takes the arguments of
    :func:`torchvision.models.feature_extraction.create_feature_extractor`. The returned
    ``GraphModule`` shares parameters with ``model`` and returns ``{name: feature}``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    disable_inplace(model)
    return create_feature_extractor(
        model,
        return_nodes=return_nodes,
        train_return_nodes=train_return_nodes,
        eval_return_nodes=eval_return_nodes,
        tracer_kwargs=_tracer_kwargs(tracer_kwargs),
        **kwargs,
    )
