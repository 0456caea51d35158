"""MoD networks as backbones: ``torchvision.models.feature_extraction`` on MoD models.

Every MoD block records itself as one leaf node when ``torch.fx`` traces it (see
:func:`mod_models.blocks.trace_as_leaf`): its forward is data-dependent Python (input checks,
backend dispatch, in-place legality), so the tracer cannot look inside. torchvision's
``create_feature_extractor`` and ``get_graph_node_names`` therefore work on a MoD model
directly; a block's output (e.g. ``"layer1.1"``) can be returned, nodes inside it cannot.

By default a MoD block never writes into its input, so no returned feature is overwritten by a
later block. A block with ``inplace=True`` (built so, or deployed by ``optimize_for_inference``)
is traced as a call on a copy of its input (a ``clone`` node), because the graph may return
or read that input elsewhere (``"layer1.0"`` feeding the MoD block ``"layer1.1"``); tracing
changes nothing in the model.

torchvision's ``create_feature_extractor`` and ``get_graph_node_names`` switch the whole model
to train mode and then to eval mode to trace it, and set every module to the model's former
mode afterwards (or leave it in train mode when they raise). :func:`mod_feature_extractor` and
:func:`mod_graph_node_names` are the same calls that put every module back in its own former
mode, whether they return or raise: a refusal changes nothing.

:func:`mod_resnet_backbone` builds the MoD ResNet that :mod:`mod_models.integrations.detection` and
:mod:`mod_models.integrations.segmentation` put under torchvision's Faster R-CNN and FCN heads.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Optional, Sequence, Union

from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names
from torchvision.models.resnet import ResNet

from ..blocks import MoDBlock

ReturnNodes = Optional[Union[Sequence[str], dict[str, str]]]


def disable_inplace(model: nn.Module) -> nn.Module:
    """Set ``inplace = False`` on every MoD block of ``model`` (returns ``model``)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for module in model.modules():
        if isinstance(module, MoDBlock):
            module.inplace = False
    return model


@contextmanager
def _modes_kept(model: nn.Module) -> Iterator[None]:
    """Put every module of ``model`` back in its own training mode on leaving, also on an error."""
    modes = [(module, module.training) for module in model.modules()]
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def mod_graph_node_names(model: nn.Module, **kwargs: Any) -> tuple[list[str], list[str]]:
    """``get_graph_node_names`` for a MoD model: ``(train_nodes, eval_nodes)``, MoD blocks as single nodes.

    torchvision's ``get_graph_node_names(model, **kwargs)`` that leaves every module in its former
    training mode (torchvision sets all of them to the model's).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    with _modes_kept(model):
        return get_graph_node_names(model, **kwargs)


def mod_feature_extractor(
    model: nn.Module,
    return_nodes: ReturnNodes = None,
    *,
    train_return_nodes: ReturnNodes = None,
    eval_return_nodes: ReturnNodes = None,
    tracer_kwargs: Optional[dict[str, Any]] = None,
    **kwargs: Any,
) -> nn.Module:
    """``create_feature_extractor`` that changes nothing in ``model``, also when it raises.

    Takes the arguments of :func:`torchvision.models.feature_extraction.create_feature_extractor`
    and returns its ``GraphModule``, which shares parameters with ``model`` and returns
    ``{name: feature}``, e.g. ``{"layer2": [B, 128, H/8, W/8]}`` for a BasicBlock ResNet. Every module
    of ``model`` keeps its own training mode (torchvision sets all of them to the model's, or leaves
    them in train mode when it raises, e.g. for a node name the model does not have); MoD blocks
    with ``inplace=True`` stay so (the graph gives them a copy of their input).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    with _modes_kept(model):
        return create_feature_extractor(
            model,
            return_nodes=return_nodes,
            train_return_nodes=train_return_nodes,
            eval_return_nodes=eval_return_nodes,
            tracer_kwargs=tracer_kwargs,
            **kwargs,
        )


def mod_resnet_backbone(
    backbone_name: str,
    *,
    task: str,
    weights: object = None,
    weights_backbone: object = None,
    progress: object = True,
    backbone_kwargs: Optional[Mapping[str, Any]] = None,
    **fixed: Any,
) -> ResNet:
    """A MoD ResNet to put under a dense-task head (``task`` names the caller in errors).

    Args:
        backbone_name: a MoD ResNet variant (``"resnet50_mod"``, ...).
        weights, weights_backbone: must be None (no pretrained MoD weights exist; load torchvision
            weights into the standard blocks with :func:`mod_models.load_torchvision_weights`).
        progress: accepted for torchvision compatibility and ignored.
        backbone_kwargs: keywords of the MoD builder (``capacity``, ``fusion``, ``router``,
            ``backend``, ``inplace``, ``norm_layer``, ...).
        **fixed: keywords the task sets itself (e.g. ``replace_stride_with_dilation``); passing
            one of them in ``backbone_kwargs`` too is an error.
    """
    from ..resnet import RESNET_MOD_CONFIGS
    from ..zoo import MOD_BUILDERS

    if weights is not None:
        raise ValueError(f"{task}: no pretrained MoD weights exist; pass weights=None, got {weights!r}")
    if weights_backbone is not None:
        raise ValueError(
            f"{task}: no pretrained MoD backbone weights exist; pass weights_backbone=None, got {weights_backbone!r} "
            "(mod_models.load_torchvision_weights loads a torchvision checkpoint into the standard blocks)"
        )
    if not isinstance(progress, bool):
        raise TypeError(f"{task}: progress must be True or False, got {progress!r}")
    if backbone_name not in RESNET_MOD_CONFIGS:
        raise ValueError(
            f"{task}: backbone_name must be a MoD ResNet, one of {list(RESNET_MOD_CONFIGS)}, got {backbone_name!r}"
        )
    if backbone_kwargs is None:
        backbone_kwargs = {}
    if not isinstance(backbone_kwargs, Mapping):
        raise TypeError(
            f"{task}: backbone_kwargs must be a dict of builder keywords, got {type(backbone_kwargs).__name__}"
        )
    clashes = sorted(set(fixed) & set(backbone_kwargs)) + sorted({"weights", "progress"} & set(backbone_kwargs))
    if clashes:
        raise ValueError(f"{task}: backbone_kwargs must not set {clashes}: {task} sets them itself")
    return MOD_BUILDERS[backbone_name](**fixed, **backbone_kwargs)
