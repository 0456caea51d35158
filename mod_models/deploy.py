"""The deploy form of a network: :func:`optimize_for_inference`.

A trained model is turned, once, into the form that serves it, as inference optimisers across the
ecosystem do (``torch.jit.freeze``, TensorRT's builder, timm's ``reparameterize``):

1. every batch norm that follows a convolution is folded into that convolution
   (:func:`fold_batch_norms`; ``W' = W * g / sqrt(v + eps)``, ``b' = (b - m) * g / sqrt(v + eps) + beta``,
   computed in float64 and stored in the convolution's dtype): the stem, the standard blocks, the
   downsample branches and the MoD blocks' reduced blocks alike. The same utility folds torchvision's
   own ResNets and MobileNetV2, so benchmarks compare deploy form with deploy form;
2. every MoD block is switched to in-place fusion (it writes only its ``k`` target channels into its
   input tensor; ``"original"`` fusion returns a new tensor) and marked deployed, which on the
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

from typing import Optional

import torch
from torch import Tensor, nn
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

_DEPLOY_HOOK_ATTR = "_mod_deploy_hook"


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


def _conv_norm_pairs(module: nn.Module) -> dict[str, nn.Conv2d]:
    """The norms ``module`` owns directly that directly follow a convolution: ``{norm name: conv}``."""
    pairs = {}
    for kind, named in NAMED_CONV_NORM_PAIRS.items():
        if type(module) is kind:
            for conv_name, norm_name in named:
                conv = getattr(module, conv_name)
                if isinstance(conv, nn.Conv2d):
                    pairs[norm_name] = conv
    if isinstance(module, nn.Sequential):
        children = list(module.named_children())
        for (_, first), (norm_name, _) in zip(children, children[1:]):
            if isinstance(first, nn.Conv2d):
                pairs[norm_name] = first
    return pairs


def fold_batch_norms(model: nn.Module) -> nn.Module:
    """Fold every batch norm that directly follows a convolution into it (in place; returns ``model``).

    Recognised: consecutive ``Conv2d`` -> norm inside any ``nn.Sequential`` (torchvision's
    ``Conv2dNormActivation``, ResNet downsample branches, MobileNetV2's inverted residuals), and the
    ``convN`` -> ``bnN`` pairs of torchvision's ``ResNet``/``BasicBlock``/``Bottleneck`` and of the MoD
    ResNet blocks. Every norm is checked before any is folded: a batch norm left anywhere else, one
    without running statistics (``track_running_stats=False``) or one whose width differs from its
    convolution's raises ``ValueError`` naming it (e.g. ``layer2.0.bn2``), and nothing is changed then.

    Args:
        model: in eval mode (the running statistics are what gets folded).
    """
    _check_eval(model, "fold_batch_norms")
    folds = []
    for name, module in model.named_modules():
        pairs = _conv_norm_pairs(module)
        for norm_name, norm in module.named_children():
            if not isinstance(norm, FOLDABLE_NORMS):
                continue
            path = f"{name}.{norm_name}" if name else norm_name
            if norm_name not in pairs:
                raise ValueError(
                    f"fold_batch_norms: {path} ({type(norm).__name__}) does not directly follow a convolution "
                    "that this utility can fold it into; nothing was changed"
                )
            problem = _fold_problem(pairs[norm_name], norm)
            if problem is not None:
                raise ValueError(
                    f"fold_batch_norms: cannot fold {path} ({type(norm).__name__}) {problem}; nothing was changed"
                )
            folds.append((module, pairs[norm_name], norm_name, norm))
    for module, conv, norm_name, norm in folds:
        fold_conv_bn(conv, norm)
        setattr(module, norm_name, nn.Identity().eval())
    return model


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
    Works on models without MoD blocks too (torchvision's ResNet and MobileNetV2).

    Args:
        model: in eval mode.

    Returns:
        ``model`` itself. Afterwards its forward raises in training mode or on an input that
        requires grad. MoD blocks write into their input tensor: a tensor passed straight into a
        deployed MoD block (not through a standard layer first) is overwritten.
    """
    _check_eval(model, "optimize_for_inference")
    fold_batch_norms(model)
    for module in model.modules():
        if isinstance(module, MoDBlock):
            module.inplace = True
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
