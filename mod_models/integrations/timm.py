"""timm integration: every MoD variant in timm's model registry, with timm's model interface.

Importing this module (it needs ``timm``; the rest of ``mod_models`` does not) registers
``resnet18_mod ... resnet152_mod, mobilenet_v2_mod, mobilenet_v2_mod_l`` with timm::

    import timm
    import mod_models.integrations.timm  # noqa: F401  (registers the MoD variants)

    model = timm.create_model("resnet50_mod", num_classes=10, drop_rate=0.1)
    backbone = timm.create_model("resnet50_mod", features_only=True, out_indices=(1, 2, 3, 4))

The models are torchvision's ``ResNet`` / ``MobileNetV2`` (subclasses :class:`TimmMoDResNet`,
:class:`TimmMoDMobileNetV2`) with the MoD blocks of the plain builders, the same module names
and state_dict keys (a checkpoint moves freely between ``timm.create_model("resnet50_mod")`` and
``mod_models.resnet50_mod()``; with the same seed and default keywords both build the same
weights), plus timm's interface: ``pretrained_cfg``, ``num_classes``, ``num_features``,
``get_classifier`` / ``reset_classifier``, ``forward_features`` / ``forward_head``,
``forward_intermediates`` / ``prune_intermediate_layers``, ``feature_info`` (``features_only=True``,
every ``feature_cls``), ``set_grad_checkpointing``, ``group_matcher`` and ``load_pretrained``.

timm keywords: ``pretrained`` (no pretrained MoD weights exist: ``pretrained=True`` needs a local
file, ``pretrained_cfg_overlay=dict(file=PATH)`` as timm's train.py ``--pretrained-path`` passes it,
holding a state_dict of the variant or of its torchvision/timm baseline; see
:meth:`TimmMoDResNet.load_pretrained`; ``checkpoint_path=`` loads a whole checkpoint of the
variant); ``in_chans``, ``num_classes`` (0: no classifier), ``global_pool`` (timm's pool types),
``drop_rate`` (dropout before the classifier), ``bn_momentum`` / ``bn_eps``, ``output_stride``
(ResNets: 32, 16 or 8), ``device`` / ``dtype``, ``feature_cfg``; ``drop_path_rate`` and
``drop_block_rate`` must be 0 (neither torchvision's blocks nor the MoD blocks have stochastic depth
or DropBlock). The MoD keywords (``capacity``, ``fusion``, ``router``, ``backend``, ``inplace``) and
torchvision's (``zero_init_residual``, ``replace_stride_with_dilation``, ``norm_layer``,
``width_mult``, ...) pass through to the builders.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from functools import lru_cache, partial
from typing import Any, Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

try:
    from timm.layers import SelectAdaptivePool2d
    from timm.models import (
        FeatureDictNet,
        FeatureHookNet,
        adapt_input_conv,
        build_model_with_cfg,
        checkpoint,
        checkpoint_seq,
        generate_default_cfgs,
        load_state_dict,
        register_model,
        resolve_pretrained_cfg,
    )
except ImportError as error:  # the rest of mod_models works without timm
    raise ImportError(f"mod_models.integrations.timm needs timm (pip install timm): {error}") from error
from torchvision.models.mobilenetv2 import MobileNetV2
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from .. import mobilenetv2 as _mobilenetv2
from .. import resnet as _resnet
from ..blocks import MoDBlock, init_conv_and_norm
from ..deploy import NAMED_CONV_NORM_PAIRS, register_conv_norm_pairs, register_sequential_container
from ..folded import PACKED
from ..zoo import BASELINE_OF, EVAL_CROP_RATIO, IMAGENET_MEAN, IMAGENET_STD, MOD_BUILDERS
from .torchvision import WeightLoadReport, check_not_deployed, check_state_dict, load_torchvision_weights

__all__ = ["TimmMoDMobileNetV2", "TimmMoDResNet", "POOL_TYPES"]

_logger = logging.getLogger(__name__)

# Every pool type of timm's SelectAdaptivePool2d ("" = no pooling, only without a classifier).
POOL_TYPES = ("", "avg", "max", "avgmax", "catavgmax", "fast", "fastavg", "fastmax", "fastavgmax", "fastcatavgmax")


# ----------------------------------------------------------------------------------------------
# Checks of timm's keywords
# ----------------------------------------------------------------------------------------------


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _check_rate(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be a float in [0, 1), got {value!r}")
    return float(value)


def _check_pool(global_pool: object, num_classes: int) -> str:
    if global_pool not in POOL_TYPES:
        raise ValueError(f"global_pool must be one of {POOL_TYPES}, got {global_pool!r}")
    if global_pool == "" and num_classes > 0:
        raise ValueError(
            f"global_pool='' (no pooling) needs num_classes=0 (no classifier), got num_classes={num_classes}"
        )
    return global_pool


def _global_pool(pool_type: str) -> SelectAdaptivePool2d:
    """timm's pooling: ``[B, C, H, W]`` -> ``[B, C * multiplier]``; ``""`` keeps ``[B, C, H, W]``."""
    return SelectAdaptivePool2d(pool_type=pool_type, flatten=bool(pool_type))


def _check_unsupported_regularisers(drop_path_rate: object, drop_block_rate: object) -> None:
    for name, value in (("drop_path_rate", drop_path_rate), ("drop_block_rate", drop_block_rate)):
        if _check_rate(name, value) != 0.0:
            what = "stochastic depth (drop path)" if name == "drop_path_rate" else "DropBlock"
            raise ValueError(
                f"{name}={value!r}: MoD models have no {what} (neither torchvision's blocks nor the MoD blocks "
                f"implement it); pass {name}=0 or leave it unset"
            )


def _norm_layer_with(norm_layer: Optional[Callable[..., nn.Module]], bn_momentum: object, bn_eps: object):
    """``norm_layer``, or BatchNorm2d with timm's ``bn_momentum`` / ``bn_eps`` when either is given."""
    if bn_momentum is None and bn_eps is None:
        return norm_layer
    if norm_layer is not None:
        raise ValueError("pass either norm_layer or bn_momentum/bn_eps, not both")
    options: dict[str, float] = {}
    if bn_momentum is not None:
        if isinstance(bn_momentum, bool) or not isinstance(bn_momentum, (int, float)) or not 0.0 < bn_momentum <= 1.0:
            raise ValueError(f"bn_momentum must be a float in (0, 1], got {bn_momentum!r}")
        options["momentum"] = float(bn_momentum)
    if bn_eps is not None:
        if isinstance(bn_eps, bool) or not isinstance(bn_eps, (int, float)) or not bn_eps > 0.0:
            raise ValueError(f"bn_eps must be a float > 0, got {bn_eps!r}")
        options["eps"] = float(bn_eps)
    return partial(nn.BatchNorm2d, **options)


# output stride -> torchvision's replace_stride_with_dilation (layer2, layer3, layer4), as timm's ResNet dilates.
_DILATED_STAGES = {32: [False, False, False], 16: [False, False, True], 8: [False, True, True]}


def _dilated_stages(output_stride: object, replace_stride_with_dilation: object) -> list[bool]:
    """The stages to dilate instead of stride: from timm's ``output_stride`` or torchvision's flags."""
    if output_stride is not None and (isinstance(output_stride, bool) or output_stride not in _DILATED_STAGES):
        raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride!r}")
    if replace_stride_with_dilation is None:
        return list(_DILATED_STAGES[output_stride or 32])
    flags = replace_stride_with_dilation
    if not isinstance(flags, (list, tuple)) or len(flags) != 3 or not all(isinstance(f, bool) for f in flags):
        raise ValueError(f"replace_stride_with_dilation must be a list of 3 bools, got {flags!r}")
    if output_stride is not None and list(flags) != _DILATED_STAGES[output_stride]:
        raise ValueError(
            f"output_stride={output_stride} asks for replace_stride_with_dilation={_DILATED_STAGES[output_stride]}, "
            f"got replace_stride_with_dilation={list(flags)}; pass one of the two"
        )
    return list(flags)


def _set_conv(conv: nn.Conv2d, *, dilation: int, stride: Optional[int] = None) -> None:
    """Dilate a 3x3 convolution in place (padding = dilation keeps the size); its weights are unchanged."""
    conv.dilation = (dilation, dilation)
    conv.padding = (dilation, dilation)
    if stride is not None:
        conv.stride = (stride, stride)


def _dilate_basic_blocks(model: ResNet, dilated: list[bool]) -> None:
    """Dilate the BasicBlock stages of a strided ResNet as ``replace_stride_with_dilation=dilated`` would.

    torchvision's ``BasicBlock`` refuses dilation, so the model is built strided and its convolutions
    are then dilated in place (same modules, names and weights), as timm's ResNet builds them: in a
    dilated stage the first block's strided 3x3 convolution and its downsample get stride 1, that
    convolution keeps the previous dilation and every later 3x3 convolution of the stage takes the
    doubled one."""
    dilation = 1
    for stage_name, dilate in zip(_resnet.STAGES[1:], dilated):
        stage = getattr(model, stage_name)
        previous = dilation
        first = stage[0]
        if dilate:
            dilation *= first.stride
            first.stride = 1
            if first.downsample is not None:
                first.downsample[0].stride = (1, 1)
            _set_conv(first.conv1, dilation=previous, stride=1)
        elif previous > 1:
            _set_conv(first.conv1, dilation=previous)
        if dilation > 1:
            _set_conv(first.conv2, dilation=dilation)
            for block in stage[1:]:
                _set_conv(block.conv1, dilation=dilation)
                _set_conv(block.conv2, dilation=dilation)


def _check_checkpointing_allowed(model: nn.Module) -> None:
    """Activation checkpointing reruns each block's forward in backward from the block's saved input.
    Reentrant checkpointing runs the first forward under ``no_grad``, where a MoD block with
    ``inplace=True`` overwrites that input, and the rerun then returns wrong gradients without any
    error; so checkpointing is refused for such blocks (reentrant or not: timm's setting can change
    between calls)."""
    writers = [name for name, module in model.named_modules() if isinstance(module, MoDBlock) and module.inplace]
    if writers:
        raise ValueError(
            f"gradient checkpointing needs MoD blocks that do not write into their input, but {writers[:3]} have "
            "inplace=True; set inplace=False first (mod_models.integrations.features.disable_inplace(model))"
        )


def _take_indices(count: int, indices: object) -> tuple[list[int], int]:
    """timm's ``indices`` of ``forward_intermediates`` / ``prune_intermediate_layers`` among ``count``
    feature maps: None (all), an int n (the last n) or a sequence of indices (negative from the end).
    Returns the absolute indices and the largest."""
    def is_int(i: object) -> bool:
        return isinstance(i, int) and not isinstance(i, bool)

    if not (
        indices is None
        or (is_int(indices) and 1 <= indices <= count)
        or (isinstance(indices, (list, tuple)) and indices and all(is_int(i) and -count <= i < count for i in indices))
    ):
        raise ValueError(
            f"indices must be None (all {count} feature maps), an int n in [1, {count}] (the last n) or a list of "
            f"indices in [{-count}, {count - 1}] (negative from the end) of the {count} feature maps, got {indices!r}"
        )
    if indices is None:
        take = list(range(count))
    elif isinstance(indices, int):
        take = list(range(count - indices, count))
    else:
        take = [i % count for i in indices]
    return take, max(take)


def _check_not_pruned(model: nn.Module, pruned: list[int]) -> None:
    if pruned:
        modules = [model.feature_info[i]["module"] for i in pruned]
        raise ValueError(
            f"feature maps {pruned} ({modules}) were removed by prune_intermediate_layers; ask for kept ones only"
        )


def _check_output_fmt(output_fmt: object) -> None:
    if output_fmt != "NCHW":  # timm passes its Format enum, a str
        raise ValueError(f"output_fmt must be 'NCHW' (the layout of these models' feature maps), got {output_fmt!r}")


# ----------------------------------------------------------------------------------------------
# Pretrained weights from a file (timm's pretrained=True with pretrained_cfg_overlay=dict(file=...))
# ----------------------------------------------------------------------------------------------


@lru_cache(maxsize=None)
def _baseline_keys(variant: str) -> frozenset[str]:
    """The state_dict keys of torchvision's baseline of ``variant`` (timm's ResNets use the same)."""
    import torchvision

    with torch.device("meta"):
        return frozenset(torchvision.models.get_model(BASELINE_OF[variant], weights=None).state_dict())


def _first(keys: Any, count: int = 3) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:count]) + (f" (+{len(keys) - count} more)" if len(keys) > count else "")


def _shape_mismatches(model_state: Mapping[str, Tensor], state_dict: Mapping[str, Tensor]) -> list[str]:
    return [
        f"{key} has shape {tuple(value.shape)} in the checkpoint, {tuple(model_state[key].shape)} in the model"
        for key, value in state_dict.items()
        if key in model_state and tuple(value.shape) != tuple(model_state[key].shape)
    ]


def _looks_deployed(model: nn.Module, state_dict: Mapping[str, Tensor], model_state: Mapping[str, Tensor]) -> list[str]:
    """Convolution biases the checkpoint has and the model's bias-free convolutions lack (batch norms
    folded into them by optimize_for_inference), and MoD blocks' ``packed_weights``."""
    modules = dict(model.named_modules())
    return [key for key in state_dict if key.rpartition(".")[2] == PACKED] + [
        key for key in state_dict
        if key.endswith(".bias") and key not in model_state
        and isinstance(modules.get(key[: -len(".bias")]), nn.Conv2d) and modules[key[: -len(".bias")]].bias is None
    ]


def _load_pretrained(model: nn.Module, state_dict: Mapping[str, Tensor], source: str) -> WeightLoadReport:
    """Load ``state_dict`` into ``model`` (see :meth:`_TimmInterface.load_pretrained`); all checks first."""
    check_not_deployed(model, "load_pretrained")
    state_dict = dict(check_state_dict(state_dict))
    cfg = getattr(model, "pretrained_cfg", None) or {}
    variant = cfg.get("architecture")
    model_state = model.state_dict()
    classifier = model.get_classifier(name_only=True)
    head = {f"{classifier}.weight", f"{classifier}.bias"}

    # timm's rule: the classifier loads when the model's class count (0 for features_only) equals the
    # class count the pretrained cfg declares (-1: never); otherwise it is dropped and stays as drawn.
    target_classes = 0 if getattr(model, "_timm_features_only", False) else model.num_classes
    cfg_classes = cfg.get("num_classes", 1000)
    drop_head = target_classes != cfg_classes
    skipped: dict[str, str] = {}
    if drop_head:
        for key in sorted(head & set(state_dict)):
            del state_dict[key]
            skipped[key] = (
                f"classifier dropped: the model has {target_classes} classes, pretrained_cfg num_classes is "
                f"{cfg_classes} (left as initialised)"
            )

    if set(state_dict) - head == set(model_state) - head:
        kind = "mod"
    elif variant in BASELINE_OF and set(state_dict) - head == set(_baseline_keys(variant)) - head:
        kind = "baseline"
    else:
        deployed = _looks_deployed(model, state_dict, model_state)
        if deployed:
            raise ValueError(
                f"{source}: is the deploy form of a model (optimize_for_inference folded its batch norms into "
                f"convolution biases: {_first(deployed)}); load the checkpoint saved before optimize_for_inference"
            )
        missing, unexpected = set(model_state) - set(state_dict) - head, set(state_dict) - set(model_state) - head
        hint = ""
        if any(".router." in key for key in unexpected):
            hint = " (a MoD state_dict of another variant?)"
        baseline = f"torchvision's/timm's {BASELINE_OF[variant]} state_dict" if variant in BASELINE_OF else "a baseline"
        raise ValueError(
            f"{source}: is neither a {variant or type(model).__name__} state_dict nor {baseline}{hint}: "
            f"{len(missing)} of the model's tensors are not in it ({_first(missing)}), {len(unexpected)} of its "
            f"tensors are not in the model ({_first(unexpected)}); nothing was loaded"
        )

    # in_chans: adapt the stem's weights as timm does (adapt_input_conv) when the channel counts differ.
    weight_key = f"{cfg.get('first_conv') or model.first_conv_name}.weight"
    pretrained_in_chans = (cfg.get("input_size") or (3,))[0]
    weight, in_chans = state_dict.get(weight_key), model.in_chans
    if weight is not None and weight.dim() == 4 and weight.shape[1] != in_chans:
        if weight.shape[1] != pretrained_in_chans:
            raise ValueError(
                f"{source}: {weight_key} takes {weight.shape[1]} input channels, but pretrained_cfg input_size "
                f"declares {pretrained_in_chans}; set pretrained_cfg_overlay=dict(..., input_size=("
                f"{weight.shape[1]}, H, W)) to adapt it to the model's in_chans={in_chans}"
            )
        state_dict[weight_key] = adapt_input_conv(in_chans, weight, base_chans=pretrained_in_chans)
        _logger.info("%s: %s adapted from %d to %d input channels", source, weight_key, pretrained_in_chans, in_chans)

    if not drop_head:
        head_in_model, head_in_file = head & set(model_state), head & set(state_dict)
        mismatched = _shape_mismatches(model_state, {k: state_dict[k] for k in head_in_file})
        if head_in_model != head_in_file or mismatched:
            raise ValueError(
                f"{source}: the classifier must load (the model's {target_classes} classes equal pretrained_cfg "
                f"num_classes), but it does not fit: "
                + ("; ".join(mismatched) or f"the checkpoint has {_first(head_in_file) or 'no classifier'}")
                + "; pass pretrained_cfg_overlay=dict(file=..., num_classes=-1) for a fresh classifier, or the "
                "checkpoint's num_classes"
            )

    if kind == "baseline":
        report = load_torchvision_weights(model, state_dict)
        report = WeightLoadReport(loaded=report.loaded, skipped={**skipped, **report.skipped}, missing=report.missing)
        by_reason: dict[str, list[str]] = {}
        for key, reason in report.skipped.items():
            by_reason.setdefault(reason, []).append(key)
        _logger.info(
            "%s: %s's baseline weights: %s; the MoD blocks start fresh. Skipped: %s", source, variant, report,
            "; ".join(f"{len(keys)} tensors ({_first(keys, 2)}): {reason}" for reason, keys in by_reason.items()),
        )
        return report

    mismatched = _shape_mismatches(model_state, state_dict)
    if mismatched:
        raise ValueError(
            f"{source}: a {variant or type(model).__name__} state_dict built with other keywords (capacity, "
            f"router, widths?): {'; '.join(mismatched[:3])}{' ...' if len(mismatched) > 3 else ''}; nothing was loaded"
        )
    with torch.no_grad():
        model.load_state_dict(state_dict, strict=False)
    loaded = list(state_dict)
    report = WeightLoadReport(loaded=loaded, skipped=skipped, missing=[k for k in model_state if k not in state_dict])
    _logger.info("%s: %s", source, report)
    return report


class _TimmInterface:
    """The parts of timm's model interface shared by :class:`TimmMoDResNet` and :class:`TimmMoDMobileNetV2`."""

    num_classes: int
    num_features: int
    head_hidden_size: int
    grad_checkpointing: bool

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Checkpoint every block in ``forward_features`` (timm's ``checkpoint_seq``; reentrant or not as
        ``timm.layers.set_reentrant_ckpt`` says). Gradients equal those without checkpointing."""
        if not isinstance(enable, bool):
            raise TypeError(f"enable must be True or False, got {enable!r}")
        if enable:
            _check_checkpointing_allowed(self)
        self.grad_checkpointing = enable

    def load_pretrained(self, checkpoint: Union[str, os.PathLike, Mapping[str, Tensor]]) -> WeightLoadReport:
        """Start from a checkpoint: what ``timm.create_model(name, pretrained=True,
        pretrained_cfg_overlay=dict(file=PATH))`` (timm's train.py ``--pretrained-path``) calls.

        ``checkpoint``: a file (read by timm's ``load_state_dict``: a state_dict, or a training
        checkpoint with ``state_dict`` / ``model`` / EMA weights) or a state_dict, either

        * a MoD state_dict of the same variant: every tensor loads;
        * torchvision's (or timm's) baseline of the variant (``mod_models.BASELINE_OF``): its stem,
          standard blocks and head load through :func:`mod_models.load_torchvision_weights` (the MoD
          blocks start fresh; the report is logged).

        As timm loads its own models' weights: the classifier is dropped (left as initialised) when the
        model's ``num_classes`` differs from ``pretrained_cfg["num_classes"]`` (-1: always), otherwise it
        must fit; the stem is adapted with timm's ``adapt_input_conv`` when ``in_chans`` differs from
        ``pretrained_cfg["input_size"][0]``. Anything else (another variant or configuration, a deployed
        model's state_dict, a foreign one) raises ``ValueError`` and nothing is loaded; so does a model
        deployed by ``optimize_for_inference`` (load before deploying).

        Returns the :class:`~mod_models.WeightLoadReport`.
        """
        if isinstance(checkpoint, (str, os.PathLike)):
            path = os.fspath(checkpoint)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"load_pretrained: no file {path}")
            return _load_pretrained(self, load_state_dict(path), path)
        return _load_pretrained(self, checkpoint, "load_pretrained")

    def _checkpointing(self) -> bool:
        """True when a forward checkpoints its blocks: gradient checkpointing is on and autograd records
        (under ``no_grad`` there is nothing to save)."""
        if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
            _check_checkpointing_allowed(self)  # inplace may have been switched on after set_grad_checkpointing
            return True
        return False

    def _run_stages(self, stages: list[nn.Sequential], x: Tensor) -> Tensor:
        """Run ``stages`` (Sequentials of blocks) in order. Each stage is called as a module, so forward
        hooks on it fire as in the plain model; with gradient checkpointing (see :meth:`_checkpointing`)
        one checkpoint per block, as timm's own models do (hooks on the blocks fire, those on the stage
        containers do not, in timm's models too)."""
        if self._checkpointing():
            return checkpoint_seq(stages, x, flatten=True)
        for stage in stages:
            x = stage(x)
        return x

    def _new_classifier(self, num_classes: int, pool: SelectAdaptivePool2d) -> nn.Module:
        """A fresh ``Linear(num_features * pool multiplier, num_classes)`` (``Identity`` for 0 classes) on
        the device and dtype of the model's parameters."""
        if num_classes == 0:
            return nn.Identity()
        reference = next(self.parameters())
        width = self.num_features * pool.feat_mult()
        return nn.Linear(width, num_classes, device=reference.device, dtype=reference.dtype)

    def _set_head_size(self, pool: SelectAdaptivePool2d) -> None:
        self.head_hidden_size = self.num_features * pool.feat_mult()


# ----------------------------------------------------------------------------------------------
# ResNet
# ----------------------------------------------------------------------------------------------


class TimmMoDResNet(_TimmInterface, ResNet):
    """torchvision ``ResNet`` with timm's model interface (the MoD builders then insert the MoD blocks).

    Args:
        block, layers: as torchvision's ``ResNet``.
        num_classes: classifier outputs; 0 for none (``forward`` returns the pooled features
            ``[B, num_features]``).
        in_chans: input channels of the stem convolution.
        global_pool: one of :data:`POOL_TYPES`; ``"catavgmax"`` doubles the classifier input.
        drop_rate: dropout before the classifier (training only).
        drop_path_rate, drop_block_rate: must be 0.
        output_stride: 32 (default), 16 or 8: timm's way to dilate the last stages instead of striding
            them (``replace_stride_with_dilation`` ``[False, False, True]`` / ``[False, True, True]``);
            BasicBlock stages are dilated as timm's ResNet dilates them.
        **kwargs: torchvision ``ResNet`` keywords.

    (timm's ``bn_momentum`` / ``bn_eps`` are turned into ``norm_layer`` by the timm entry points.)
    """

    first_conv_name = "conv1"  # the stem convolution (pretrained_cfg["first_conv"])

    def __init__(
        self,
        block: type[Union[BasicBlock, Bottleneck]],
        layers: list[int],
        *,
        num_classes: int = 1000,
        in_chans: int = 3,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        drop_block_rate: float = 0.0,
        output_stride: Optional[int] = None,
        **kwargs: Any,
    ) -> None:
        _check_int("num_classes", num_classes, 0)
        _check_int("in_chans", in_chans, 1)
        _check_pool(global_pool, num_classes)
        drop_rate = _check_rate("drop_rate", drop_rate)
        _check_unsupported_regularisers(drop_path_rate, drop_block_rate)
        dilated = _dilated_stages(output_stride, kwargs.pop("replace_stride_with_dilation", None))
        # With num_classes >= 1 this draws exactly the weights torchvision's ResNet (the plain builder) draws.
        if issubclass(block, Bottleneck):
            super().__init__(block, layers, num_classes=max(num_classes, 1), replace_stride_with_dilation=dilated,
                             **kwargs)
        else:  # torchvision's BasicBlock refuses dilation: built strided, then dilated in place
            super().__init__(block, layers, num_classes=max(num_classes, 1), **kwargs)
            _dilate_basic_blocks(self, dilated)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        self.num_features = self.fc.in_features
        if in_chans != 3:
            stem = self.conv1
            self.conv1 = nn.Conv2d(in_chans, stem.out_channels, kernel_size=7, stride=2, padding=3, bias=False)
            init_conv_and_norm(self.conv1)
        self.feature_info = _resnet.resnet_stage_info(self)
        self.avgpool = _global_pool(global_pool)
        if num_classes == 0 or self.avgpool.feat_mult() != 1:
            self.fc = self._new_classifier(num_classes, self.avgpool)
        self._set_head_size(self.avgpool)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, str]:
        """Parameter groups for timm's layer-wise learning rate decay: the stem, then stages or blocks."""
        return dict(stem=r"^conv1|bn1|maxpool", blocks=r"^layer(\d+)" if coarse else r"^layer(\d+)\.(\d+)")

    @torch.jit.ignore
    def get_classifier(self, name_only: bool = False) -> Union[str, nn.Module]:
        return "fc" if name_only else self.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Replace the classifier by a fresh one with ``num_classes`` outputs (0: none) and, if given,
        the pooling by ``global_pool``."""
        _check_int("num_classes", num_classes, 0)
        pool_type = self.avgpool.pool_type if global_pool is None else global_pool
        _check_pool(pool_type, num_classes)
        self.num_classes = num_classes
        self.avgpool = _global_pool(pool_type)
        self.fc = self._new_classifier(num_classes, self.avgpool).train(self.training)
        self._set_head_size(self.avgpool)

    def forward_intermediates(
        self,
        x: Tensor,
        indices: Optional[Union[int, list[int], tuple[int, ...]]] = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> Union[list[Tensor], tuple[Tensor, list[Tensor]]]:
        """timm's feature API: the feature maps of :attr:`feature_info` (the stem's ReLU, ``layer1`` ..
        ``layer4``) picked by ``indices`` (None: all five; n: the last n; a list: those, negative from the
        end), and the final map.

        ``norm`` is accepted and has no effect (a ResNet has no final norm); ``stop_early`` runs no stage
        after the last one picked (the final map is then that stage's); ``output_fmt`` must be ``"NCHW"``.
        Returns ``(final map, [feature maps])``, or only the list with ``intermediates_only``. The final
        map equals :meth:`forward_features`. With gradient checkpointing each stage's blocks are
        checkpointed as in :meth:`forward_features`.
        """
        take, last = _take_indices(len(self.feature_info), indices)
        _check_output_fmt(output_fmt)
        stages = [self.layer1, self.layer2, self.layer3, self.layer4]
        _check_not_pruned(self, [i for i in take if i > 0 and len(stages[i - 1]) == 0])
        intermediates = []
        x = self.relu(self.bn1(self.conv1(x)))
        if 0 in take:
            intermediates.append(x)
        x = self.maxpool(x)
        checkpointing = self._checkpointing()
        for index, stage in enumerate(stages[:last] if stop_early else stages, start=1):
            x = checkpoint_seq(stage, x) if checkpointing else stage(x)
            if index in take:
                intermediates.append(x)
        return intermediates if intermediates_only else (x, intermediates)

    def prune_intermediate_layers(
        self,
        indices: Union[int, list[int], tuple[int, ...]] = 1,
        prune_norm: bool = False,
        prune_head: bool = True,
    ) -> list[int]:
        """Drop what the feature maps ``indices`` (as in :meth:`forward_intermediates`) do not need, as
        timm's ResNet does: later stages become empty ``nn.Sequential`` (module names of the kept ones
        unchanged), the max pool goes when only the stem's map is kept, and the head goes (``prune_head``,
        or when a stage was dropped: ``num_features`` is then the last kept stage's width). Returns the
        absolute indices kept. ``prune_norm`` has no effect (no final norm)."""
        take, last = _take_indices(len(self.feature_info), indices)
        for stage_name in _resnet.STAGES[last:]:
            setattr(self, stage_name, nn.Sequential())
        if last == 0:
            self.maxpool = nn.Identity()
        prune_end = last < len(self.feature_info) - 1
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[last]["num_chs"]
        if prune_head or prune_end:
            self.reset_classifier(0, "")
        return take

    def forward_features(self, x: Tensor) -> Tensor:
        """``[B, in_chans, H, W]`` -> the last stage's map ``[B, num_features, H/32, W/32]``
        (``H/8`` with ``replace_stride_with_dilation=[False, True, True]``)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self._run_stages([self.layer1, self.layer2, self.layer3, self.layer4], x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """``[B, num_features, h, w]`` -> logits ``[B, num_classes]`` (pooled features with ``pre_logits``)."""
        x = self.avgpool(x)
        if self.drop_rate:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


# ----------------------------------------------------------------------------------------------
# MobileNetV2
# ----------------------------------------------------------------------------------------------


class TimmMoDMobileNetV2(_TimmInterface, MobileNetV2):
    """torchvision ``MobileNetV2`` with timm's model interface (the MoD builders then insert the MoD blocks).

    Args:
        num_classes, in_chans, global_pool, drop_path_rate, drop_block_rate: as :class:`TimmMoDResNet`.
        drop_rate: dropout before the classifier (torchvision's ``dropout``, default 0.2).
        output_stride: None or 32 (there is no dilated MobileNetV2).
        **kwargs: torchvision ``MobileNetV2`` keywords (``width_mult``, ``round_nearest``, ...).
    """

    first_conv_name = "features.0.0"  # the stem convolution (pretrained_cfg["first_conv"])

    def __init__(
        self,
        *,
        num_classes: int = 1000,
        in_chans: int = 3,
        global_pool: str = "avg",
        drop_rate: float = 0.2,
        drop_path_rate: float = 0.0,
        drop_block_rate: float = 0.0,
        output_stride: Optional[int] = None,
        **kwargs: Any,
    ) -> None:
        if output_stride not in (None, 32):
            raise ValueError(
                f"output_stride={output_stride!r}: only 32 is possible, torchvision's MobileNetV2 has no dilated form "
                "(neither have the MoD inverted residuals); use a MoD ResNet for a dilated backbone"
            )
        if "dropout" in kwargs:
            raise ValueError(
                f"pass drop_rate (timm's name for the classifier dropout), not dropout={kwargs['dropout']!r}"
            )
        _check_int("num_classes", num_classes, 0)
        _check_int("in_chans", in_chans, 1)
        _check_pool(global_pool, num_classes)
        drop_rate = _check_rate("drop_rate", drop_rate)
        _check_unsupported_regularisers(drop_path_rate, drop_block_rate)
        super().__init__(num_classes=max(num_classes, 1), dropout=drop_rate, **kwargs)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        self.num_features = self.last_channel
        if in_chans != 3:
            stem = self.features[0][0]
            self.features[0][0] = nn.Conv2d(in_chans, stem.out_channels, kernel_size=3, stride=2, padding=1, bias=False)
            init_conv_and_norm(self.features[0][0])
        self.feature_info = _mobilenetv2.mobilenet_v2_stage_info(self)
        self.global_pool = _global_pool(global_pool)
        if num_classes == 0 or self.global_pool.feat_mult() != 1:
            self.classifier[1] = self._new_classifier(num_classes, self.global_pool)
        self._set_head_size(self.global_pool)

    def _new_classifier(self, num_classes: int, pool: SelectAdaptivePool2d) -> nn.Module:
        classifier = super()._new_classifier(num_classes, pool)
        if isinstance(classifier, nn.Linear):  # torchvision's MobileNetV2 initialisation of its classifier
            nn.init.normal_(classifier.weight, 0, 0.01)
            nn.init.zeros_(classifier.bias)
        return classifier

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, str]:
        """Parameter groups for timm's layer-wise learning rate decay: the stem, then one group per block."""
        return dict(stem=r"^features\.0\.", blocks=r"^features\.(\d+)\.")  # features are one flat sequence

    @torch.jit.ignore
    def get_classifier(self, name_only: bool = False) -> Union[str, nn.Module]:
        return "classifier.1" if name_only else self.classifier[1]

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """As :meth:`TimmMoDResNet.reset_classifier`; the dropout before it is kept."""
        _check_int("num_classes", num_classes, 0)
        pool_type = self.global_pool.pool_type if global_pool is None else global_pool
        _check_pool(pool_type, num_classes)
        self.num_classes = num_classes
        self.global_pool = _global_pool(pool_type)
        self.classifier[1] = self._new_classifier(num_classes, self.global_pool).train(self.training)
        self._set_head_size(self.global_pool)

    def _stage_ends(self) -> list[int]:
        """The ``features`` index of every :attr:`feature_info` map (its last block)."""
        return [int(info["module"].split(".")[1]) for info in self.feature_info]

    def forward_intermediates(
        self,
        x: Tensor,
        indices: Optional[Union[int, list[int], tuple[int, ...]]] = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> Union[list[Tensor], tuple[Tensor, list[Tensor]]]:
        """timm's feature API, as :meth:`TimmMoDResNet.forward_intermediates`: the five maps of
        :attr:`feature_info` (the last block before every stride-2 block and the last inverted residual;
        reductions 2 .. 32) and the final map, which equals :meth:`forward_features` (the head
        convolution is applied when every block ran, as in timm's MobileNetV2). ``norm`` has no effect."""
        take, last = _take_indices(len(self.feature_info), indices)
        _check_output_fmt(output_fmt)
        ends = self._stage_ends()
        built = len(self.features) - 1  # the last module's index (fewer after prune_intermediate_layers)
        _check_not_pruned(self, [i for i in take if ends[i] > built])
        take_blocks = {ends[i] for i in take}
        final_block = min(ends[last] if stop_early else ends[-1], built)
        checkpointing = self._checkpointing()
        intermediates = []
        x = self.features[0](x)  # the stem (never checkpointed: the checkpointed blocks need an input with grad)
        for index in range(1, final_block + 1):
            block = self.features[index]
            x = checkpoint(block, x) if checkpointing else block(x)
            if index in take_blocks:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        if final_block == ends[-1] and len(self.features) > final_block + 1:  # the head convolution
            x = self.features[final_block + 1](x)
        return x, intermediates

    def prune_intermediate_layers(
        self,
        indices: Union[int, list[int], tuple[int, ...]] = 1,
        prune_norm: bool = False,
        prune_head: bool = True,
    ) -> list[int]:
        """Drop what the feature maps ``indices`` do not need, as timm's MobileNetV2 does: ``features`` is
        cut after the last block needed (module names of the kept blocks unchanged); the head convolution
        and the classifier go with ``prune_head`` or ``prune_norm`` or when blocks were cut
        (``num_features`` is then the last kept map's width). Returns the absolute indices kept."""
        take, last = _take_indices(len(self.feature_info), indices)
        ends = self._stage_ends()
        prune_end = prune_norm or prune_head or last < len(ends) - 1
        if prune_end:
            self.features = self.features[: ends[last] + 1]
            self.num_features = self.head_hidden_size = self.feature_info[last]["num_chs"]
        if prune_head or prune_end:
            self.reset_classifier(0, "")
        return take

    def forward_features(self, x: Tensor) -> Tensor:
        """``[B, in_chans, H, W]`` -> the head conv's map ``[B, num_features, H/32, W/32]``."""
        if not self._checkpointing():
            return self.features(x)
        x = self.features[0](x)  # the stem is not checkpointed: the checkpointed blocks need an input with grad
        return checkpoint_seq(self.features[1:], x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """``[B, num_features, h, w]`` -> logits ``[B, num_classes]`` (pooled features with ``pre_logits``)."""
        x = self.global_pool(x)
        # classifier = (dropout, linear), called whole as in the plain model (its forward hooks fire)
        return self.classifier[0](x) if pre_logits else self.classifier(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


# ----------------------------------------------------------------------------------------------
# Registration
# ----------------------------------------------------------------------------------------------


def _pretrained_cfg(name: str, *, first_conv: str, classifier: str) -> dict[str, Any]:
    """The data config timm's scripts resolve for a variant: the paper's ImageNet preprocessing
    (224 px, bilinear, center crop 0.875 = resize 256, ImageNet mean/std); no weights."""
    return dict(
        url="",
        num_classes=1000,
        input_size=(3, 224, 224),
        pool_size=(7, 7),
        crop_pct=EVAL_CROP_RATIO,
        crop_mode="center",
        interpolation="bilinear",
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        first_conv=first_conv,
        classifier=classifier,
        paper_ids="arXiv:2409.17016",
        paper_name="CNN Mixture-of-Depths",
        description=f"{name}: torchvision architecture, every second block of a stage MoD; no pretrained weights",
    )


def _timm_builder(name: str) -> tuple[Callable[..., nn.Module], dict[str, Any], dict[str, Any]]:
    """(builder constructing the timm subclass, pretrained cfg, feature cfg) of variant ``name``."""
    if name in _resnet.RESNET_MOD_CONFIGS:
        cfg = _pretrained_cfg(name, first_conv="conv1", classifier="fc")
        return _resnet._make_builder(name, model_class=TimmMoDResNet), cfg, {}
    cfg = _pretrained_cfg(name, first_conv="features.0.0", classifier="classifier.1")
    setting = _mobilenetv2.MOBILENET_V2_MOD_SETTINGS[name]
    builder = _mobilenetv2._make_builder(name, setting, model_class=TimmMoDMobileNetV2)
    return builder, cfg, {"flatten_sequential": True}  # feature modules are features.N


def _check_dtype(dtype: object) -> Optional[torch.dtype]:
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating torch.dtype or None, got {dtype!r}")
    return dtype


def _pretrained_file_cfg(name: str, kwargs: dict[str, Any]) -> Any:
    """For ``pretrained=True``: the resolved pretrained cfg, which must name a local file, set to load
    it with the model's own ``load_pretrained`` (timm's ``custom_load``). Raises when there is none."""
    cfg = resolve_pretrained_cfg(
        name, pretrained_cfg=kwargs.pop("pretrained_cfg", None), pretrained_cfg_overlay=kwargs.pop(
            "pretrained_cfg_overlay", None),
    )
    if not cfg.file:
        others = {key: getattr(cfg, key) for key in ("url", "hf_hub_id", "state_dict") if getattr(cfg, key)}
        if others:
            shown = ", ".join(f"{key}={value!r}" for key, value in others.items() if key != "state_dict")
            raise ValueError(
                f"{name}: pretrained=True loads only a local file for MoD models, got {shown or 'a state_dict'}; "
                "save or download it and pass pretrained_cfg_overlay=dict(file=PATH), or call "
                "model.load_pretrained(state_dict) on the built model"
            )
        raise ValueError(
            f"{name}: pretrained=True, but no pretrained weights exist for MoD models; pass pretrained=False, or "
            f"start from a file: pretrained_cfg_overlay=dict(file=PATH) (a {name} state_dict, or torchvision's "
            f"{BASELINE_OF[name]} weights; add num_classes=-1 for a fresh classifier, as timm's train.py "
            "--pretrained-path does), or checkpoint_path=PATH for a whole checkpoint"
        )
    return dataclasses.replace(cfg, custom_load=True)  # timm then calls model.load_pretrained(file)


def _make_entrypoint(name: str, builder: Callable[..., nn.Module], feature_cfg: dict[str, Any]):
    def entrypoint(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        if not isinstance(pretrained, bool):
            raise TypeError(f"{name}: pretrained must be True or False, got {pretrained!r}")
        build = builder
        if pretrained:
            kwargs["pretrained_cfg"] = _pretrained_file_cfg(name, kwargs)
            if kwargs.get("features_only", False):  # timm's rule: a feature extractor never loads a classifier

                def build(**model_kwargs: Any) -> nn.Module:
                    model = builder(**model_kwargs)
                    model._timm_features_only = True
                    return model

        device = kwargs.pop("device", None)
        dtype = _check_dtype(kwargs.pop("dtype", None))
        device = torch.device(device) if device is not None else None
        norm_layer = _norm_layer_with(
            kwargs.pop("norm_layer", None), kwargs.pop("bn_momentum", None), kwargs.pop("bn_eps", None)
        )
        if norm_layer is not None:
            kwargs["norm_layer"] = norm_layer
        merged_feature_cfg = dict(feature_cfg)
        user_feature_cfg = kwargs.pop("feature_cfg", None)
        if user_feature_cfg is not None:  # timm's build_model_with_cfg: the caller's entries win over the model's
            if not isinstance(user_feature_cfg, dict):
                raise TypeError(f"feature_cfg must be a dict, got {type(user_feature_cfg).__name__}")
            merged_feature_cfg.update(user_feature_cfg)
        model = build_model_with_cfg(build, name, pretrained=pretrained, feature_cfg=merged_feature_cfg, **kwargs)
        if device is not None or dtype is not None:
            model.to(device=device, dtype=dtype)
        return model

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = (
        f"timm entry point of {name} (see mod_models.integrations.timm): timm.create_model({name!r}, **kwargs)."
    )
    return entrypoint


# optimize_for_inference folds the stem of a timm MoD ResNet as torchvision's (forward_features runs
# conv1 -> bn1), and the children of timm's feature extractors, which run them in order.
register_conv_norm_pairs(TimmMoDResNet, NAMED_CONV_NORM_PAIRS[ResNet])
for _container in (FeatureDictNet, FeatureHookNet):
    register_sequential_container(_container)
del _container

_BUILDERS = {name: _timm_builder(name) for name in MOD_BUILDERS}
# timm's register_model reads each variant's pretrained cfg from this module's default_cfgs.
default_cfgs = generate_default_cfgs({name: cfg for name, (_, cfg, _) in _BUILDERS.items()})
for _name, (_builder, _, _feature_cfg) in _BUILDERS.items():
    globals()[_name] = register_model(_make_entrypoint(_name, _builder, _feature_cfg))
del _name, _builder, _feature_cfg
