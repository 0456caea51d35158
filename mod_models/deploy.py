"""The deploy form of a network: :func:`optimize_for_inference`.

A trained model is turned, once, into the form that serves it, as inference optimisers across the
ecosystem do (``torch.jit.freeze``, TensorRT's builder, timm's ``reparameterize``):

1. every batch norm that follows a convolution is folded into that convolution
   (:func:`fold_batch_norms`; ``W' = W * g / sqrt(v + eps)``, ``b' = (b - m) * g / sqrt(v + eps) + beta``,
   computed in float64 and stored in the convolution's dtype): the stem, the standard blocks, the
   downsample branches and the MoD blocks' reduced blocks alike. The same utility folds torchvision's
   own ResNets and MobileNetV2, so benchmarks compare deploy form with deploy form;
2. every MoD block is switched to in-place fusion (it writes only its ``k`` target channels into its
   input tensor; ``"original"`` fusion returns a new tensor; no block that a ``torch.fx`` graph, e.g. a
   feature extractor, calls on a tensor other nodes read or return) and marked deployed, which on the
   ``"triton"`` backend runs the whole block as three kernel launches (:mod:`mod_kernels.fused_block`);
   the ``"reference"`` backend runs the same folded convolutions in plain PyTorch and stays the source
   of truth;
3. the model is frozen for inference: parameters stop requiring grad, and a forward in training mode
   or with an input that requires grad raises instead of computing something that cannot be trained.

The model is changed in place and returned. Its ``state_dict`` changes too (no batch-norm entries,
convolution biases, MoD routers' weights in fp32, and each MoD block's folded reduced block packed
into one parameter, ``packed_weights``: :mod:`mod_models.folded`, which also says how to change a
deployed model's weights), so keep the trained checkpoint; the deploy form is made from it in
milliseconds.
"""

from __future__ import annotations

from collections import Counter
from typing import Iterable, Iterator, Optional

import torch
from torch import Tensor, fx, nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet
from torchvision.ops.misc import FrozenBatchNorm2d

from .blocks import MoDBasicBlock, MoDBlock, MoDBottleneck
from .folded import pack_reduced_block

FOLDABLE_NORMS = (nn.BatchNorm2d, FrozenBatchNorm2d)

# Modules whose forward applies ``bnN`` directly to the output of ``convN`` (torchvision's ResNet
# stem and blocks, and the MoD ResNet blocks).
NAMED_CONV_NORM_PAIRS = {
    ResNet: (("conv1", "bn1"),),
    BasicBlock: (("conv1", "bn1"), ("conv2", "bn2")),
    Bottleneck: (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")),
    MoDBasicBlock: (("conv1", "bn1"), ("conv2", "bn2")),
    MoDBottleneck: (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")),
}

# Containers whose forward runs their children in order, each on the previous one's output
# (subclasses included): a convolution followed by a norm among their children is a pair.
SEQUENTIAL_CONTAINERS: tuple[type[nn.Module], ...] = (nn.Sequential, IntermediateLayerGetter)

_DEPLOY_HOOK_ATTR = "_mod_deploy_hook"


def register_conv_norm_pairs(module_type: type[nn.Module], pairs: Iterable[tuple[str, str]]) -> None:
    """Tell :func:`fold_batch_norms` that ``module_type``'s forward applies each norm child directly to
    the output of its convolution child: ``pairs`` of ``(conv name, norm name)``, e.g. a ResNet
    subclass with torchvision's stem (``[("conv1", "bn1")]``). Only that exact type is affected."""
    NAMED_CONV_NORM_PAIRS[module_type] = tuple((conv, norm) for conv, norm in pairs)


def register_sequential_container(container_type: type[nn.Module]) -> None:
    """Tell :func:`fold_batch_norms` that ``container_type`` (and its subclasses) runs its children in
    order, each on the previous one's output, as ``nn.Sequential`` does."""
    global SEQUENTIAL_CONTAINERS
    if not issubclass(container_type, SEQUENTIAL_CONTAINERS):
        SEQUENTIAL_CONTAINERS = (*SEQUENTIAL_CONTAINERS, container_type)


def fold_conv_bn(conv: nn.Conv2d, norm: nn.Module) -> None:
    """Fold ``norm`` (eval-mode statistics) into ``conv`` in place: ``norm(conv(x)) == conv'(x)``.

    Args:
        conv: a ``Conv2d`` with ``out_channels == norm.num_features``; gains a bias if it had none.
        norm: ``BatchNorm2d`` with running statistics, or torchvision's ``FrozenBatchNorm2d``.

    Raises:
        ValueError: the norm has no running statistics (it would normalise by batch statistics) or
            its width differs from the convolution's.
    """
    problem = _fold_problem(conv, norm)
    if problem is not None:
        raise ValueError(f"cannot fold {type(norm).__name__} {problem}")
    with torch.no_grad():
        mean = norm.running_mean.double()
        var = norm.running_var.double()
        gamma = norm.weight.double() if norm.weight is not None else torch.ones_like(mean)
        beta = norm.bias.double() if norm.bias is not None else torch.zeros_like(mean)
        scale = gamma / torch.sqrt(var + norm.eps)
        weight = conv.weight.double() * scale.view(-1, *([1] * (conv.weight.dim() - 1)))
        bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(mean)
        bias = (bias - mean) * scale + beta
        dtype, device = conv.weight.dtype, conv.weight.device
        conv.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
        conv.bias = nn.Parameter(bias.to(device=device, dtype=dtype), requires_grad=False)


def _pairs_of(module: nn.Module) -> Iterator[tuple[str, str]]:
    """The ``(conv, norm)`` pairs ``module``'s forward applies one after the other, as paths relative to
    it (not yet checked to be a convolution and a norm)."""
    for conv_name, norm_name in NAMED_CONV_NORM_PAIRS.get(type(module), ()):
        yield conv_name, norm_name
    if isinstance(module, SEQUENTIAL_CONTAINERS):
        children = [name for name, _ in module.named_children()]
        yield from zip(children, children[1:])
    if isinstance(module, fx.GraphModule):
        yield from _graph_pairs(module)


def _graph_pairs(graph_module: fx.GraphModule) -> Iterator[tuple[str, str]]:
    """Pairs of a ``torch.fx`` graph (a feature extractor, say): a module called once on the output of
    another module called once, which nothing else reads."""
    calls = Counter(node.target for node in graph_module.graph.nodes if node.op == "call_module")
    for node in graph_module.graph.nodes:
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs or calls[node.target] != 1:
            continue
        source = node.args[0]
        if (isinstance(source, fx.Node) and source.op == "call_module" and calls[source.target] == 1
                and len(source.users) == 1):
            yield source.target, node.target


def _plan_folds(model: nn.Module) -> dict[int, tuple[nn.Conv2d, nn.Module, nn.Module, str]]:
    """Every norm of ``model`` that directly follows a convolution: ``id(norm) -> (conv, norm, the
    module holding the norm, its attribute name there)``."""
    plan: dict[int, tuple[nn.Conv2d, nn.Module, nn.Module, str]] = {}
    for module in model.modules():
        for conv_path, norm_path in _pairs_of(module):
            conv, norm = module.get_submodule(conv_path), module.get_submodule(norm_path)
            if isinstance(conv, nn.Conv2d) and isinstance(norm, FOLDABLE_NORMS):
                parent_path, _, attribute = norm_path.rpartition(".")
                plan.setdefault(id(norm), (conv, norm, module.get_submodule(parent_path), attribute))
    return plan


def _fold_problem(conv: nn.Conv2d, norm: nn.Module) -> Optional[str]:
    """Why ``norm`` cannot be folded into ``conv`` (the end of a sentence), or None when it can."""
    if getattr(norm, "running_mean", None) is None or getattr(norm, "running_var", None) is None:
        return (
            "without running statistics (track_running_stats=False normalises by batch statistics even in "
            "eval mode)"
        )
    if conv.out_channels != norm.running_mean.numel():
        return f"with {norm.running_mean.numel()} channels into a convolution with {conv.out_channels} outputs"
    return None


def fold_batch_norms(model: nn.Module) -> nn.Module:
    """Fold every batch norm that directly follows a convolution into it (in place; returns ``model``).

    Recognised: consecutive ``Conv2d`` -> norm children of any ``nn.Sequential`` (torchvision's
    ``Conv2dNormActivation``, ResNet downsample branches, MobileNetV2's inverted residuals) and of
    the other containers that run their children in order (torchvision's ``IntermediateLayerGetter``
    under detection backbones, and those added by :func:`register_sequential_container`); the
    ``convN`` -> ``bnN`` pairs of torchvision's ``ResNet``/``BasicBlock``/``Bottleneck``, of the MoD
    ResNet blocks and of the types added by :func:`register_conv_norm_pairs`; and in a ``torch.fx``
    ``GraphModule`` (a feature extractor), a norm called on the output of a convolution that
    nothing else reads. A batch norm left anywhere else cannot be folded safely and raises
    ``ValueError`` naming it. Every norm is checked before any is folded: one without running
    statistics (``track_running_stats=False``) or whose width differs from its convolution's raises
    ``ValueError`` naming it too (e.g. ``layer2.0.bn2``); nothing is changed then.

    Args:
        model: in eval mode (the running statistics are what gets folded).
    """
    _check_eval(model, "fold_batch_norms")
    plan = _plan_folds(model)
    for name, module in model.named_modules():
        for norm_name, norm in module.named_children():
            if not isinstance(norm, FOLDABLE_NORMS):
                continue
            path = f"{name}.{norm_name}" if name else norm_name
            if id(norm) not in plan:
                raise ValueError(
                    f"fold_batch_norms: {path} ({type(norm).__name__}) does not directly follow a convolution "
                    f"that this utility can fold it into: it does not know in which order a {type(module).__name__} "
                    "runs its children (mod_models.deploy.register_conv_norm_pairs or register_sequential_container "
                    "tell it); nothing was changed"
                )
            problem = _fold_problem(plan[id(norm)][0], norm)
            if problem is not None:
                raise ValueError(
                    f"fold_batch_norms: cannot fold {path} ({type(norm).__name__}) {problem}; nothing was changed"
                )
    for conv, norm, parent, attribute in plan.values():
        fold_conv_bn(conv, norm)
        setattr(parent, attribute, nn.Identity().eval())
    return model


def _writes_in_place_safely(model: nn.Module) -> dict[int, bool]:
    """``id(block) -> False`` for the MoD blocks a ``torch.fx`` graph of ``model`` calls on a tensor that
    other nodes read too (a feature extractor returning a MoD block's input): those must not write into
    their input."""
    safe: dict[int, bool] = {}
    for graph_module in (m for m in model.modules() if isinstance(m, fx.GraphModule)):
        for node in graph_module.graph.nodes:
            if node.op == "call_module" and isinstance(graph_module.get_submodule(node.target), MoDBlock):
                source = node.args[0] if node.args else None
                if isinstance(source, fx.Node) and len(source.users) > 1:
                    safe[id(graph_module.get_submodule(node.target))] = False
    return safe


def _check_eval(model: nn.Module, what: str) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{what} takes an nn.Module, got {type(model).__name__}")
    training = [name or type(model).__name__ for name, m in model.named_modules() if m.training]
    if training:
        raise ValueError(
            f"{what} needs the model in eval mode (call model.eval() first); in training mode: {training[:3]}"
            + (" ..." if len(training) > 3 else "")
        )


def _refuse_training_and_autograd(module: nn.Module, args: tuple) -> None:
    if module.training:
        raise RuntimeError(
            f"{type(module).__name__} was deployed by mod_models.optimize_for_inference (batch norms folded, "
            "in-place fusion): it runs inference only; call .eval(), and train the original model instead"
        )
    if torch.is_grad_enabled() and any(isinstance(a, Tensor) and a.requires_grad for a in args):
        raise RuntimeError(
            f"{type(module).__name__} was deployed by mod_models.optimize_for_inference: its forward does not "
            "support autograd; run it under torch.inference_mode() or torch.no_grad() on inputs that do not "
            "require grad"
        )


def optimize_for_inference(model: nn.Module) -> nn.Module:
    """Turn a trained model into its deploy form, in place, and return it.

    Folds every conv -> batch norm pair (:func:`fold_batch_norms`), switches every MoD block to
    in-place fusion in deploy mode (on the ``"triton"`` backend: pooling, router and the whole
    reduced block with its fusion in at most three kernel launches; blocks whose reduced block is
    too wide for the fused kernel run the routing kernels, the folded convolutions and the fusion
    kernel: see :func:`mod_kernels.fused_block.fused_block_plan`), and freezes the model for inference.
    Works on models without MoD blocks too (torchvision's ResNet and MobileNetV2), and on the models
    built around MoD networks: timm's (``mod_models.integrations.timm`` registers its types) and their
    feature extractors, ``torch.fx`` feature extractors, Faster R-CNN and FCN. A MoD block that a
    ``torch.fx`` graph calls on a tensor other nodes also read keeps writing a new tensor.

    Args:
        model: in eval mode.

    Returns:
        ``model`` itself. Afterwards its forward raises in training mode or on an input that
        requires grad. MoD blocks write into their input tensor: a tensor passed straight into a
        deployed MoD block (not through a standard layer first) is overwritten.
    """
    _check_eval(model, "optimize_for_inference")
    fold_batch_norms(model)
    safe = _writes_in_place_safely(model)
    for module in model.modules():
        if isinstance(module, MoDBlock):
            module.inplace = safe.get(id(module), True)
            module.deployed = True
            convs = module.folded_convs()
            if convs is not None:  # one parameter holds f_k's folded weights (mod_models.folded)
                pack_reduced_block(module, convs)
            _router_in_fp32(module)
    _make_ordinary(model)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    if getattr(model, _DEPLOY_HOOK_ATTR, None) is None:
        setattr(model, _DEPLOY_HOOK_ATTR, model.register_forward_pre_hook(_refuse_training_and_autograd))
    return model


def _router_in_fp32(block: MoDBlock) -> None:
    """Keep a deployed block's router weights in fp32: the router computes in fp32 on every backend
    (the same scores from the same values), and the fused router kernel's tiles need fp32 weights to
    stay in registers (16-bit ones make ptxas spill: 190-255 registers)."""
    if block.router is None:
        return
    for linear in (block.router.fc1, block.router.fc2):
        if linear.weight.dtype != torch.float32:
            linear.weight = nn.Parameter(linear.weight.detach().float(), requires_grad=False)


def _make_ordinary(model: nn.Module) -> None:
    """Replace parameters and buffers that are inference tensors (a model built or loaded inside
    ``torch.inference_mode``, or packed there) by ordinary copies, so the deployed model runs both in
    inference mode and under ``no_grad``, and its weights can still be changed in place afterwards."""
    with torch.inference_mode(False), torch.no_grad():
        for module in model.modules():
            for name, parameter in module._parameters.items():
                if parameter is not None and parameter.is_inference():
                    module._parameters[name] = nn.Parameter(parameter.clone(), requires_grad=False)
            for name, buffer in module._buffers.items():
                if buffer is not None and buffer.is_inference():
                    module._buffers[name] = buffer.clone()


def is_deployed(model: nn.Module) -> bool:
    """True when :func:`optimize_for_inference` has been applied to ``model``."""
    return getattr(model, _DEPLOY_HOOK_ATTR, None) is not None
