"""The deployed reduced block ``f_k``: its folded convolutions as ONE packed parameter.

:func:`mod_models.optimize_for_inference` folds the batch norms of a MoD block's reduced block
into its convolutions, then :func:`pack_reduced_block` moves the folded weights and biases into a
single flat parameter of the block, ``packed_weights``, in the layout the fused deploy kernel
reads (:func:`mod_kernels.pack_params`: each convolution's weight in its logical
``[out, in, kh, kw]`` order, then its bias), in the block's own dtype. The convolutions become
:class:`FoldedConv2d` modules without parameters of their own: their ``weight`` and ``bias`` are
views of ``packed_weights``. So there is one copy of the weights, which both backends compute
from (the triton kernel reads ``packed_weights``, the reference backend convolves with its
views), and every way of changing it reaches both:

* in place, through a view: ``block.conv2.weight.mul_(2)`` (under ``torch.no_grad``),
  ``block.conv2.weight.data.mul_(2)``, ``block.conv2.bias.copy_(b)``;
* by assignment: ``block.conv2.weight = t`` copies ``t`` (same shape) into the packed vector;
* ``load_state_dict``, ``model.to(dtype)``, ``model.half()``: they replace or rewrite
  ``packed_weights``, which the views are taken from at every access.

Rebinding the ``.data`` of a view (``block.conv2.weight.data = t``) changes only that temporary
view, never the block: assign the tensor instead.

State dict: a packed block holds ``<block>.packed_weights`` where an unpacked one holds
``<block>.conv1.weight``, ``<block>.conv1.bias``, ...; deploy-form state dicts with the per-
convolution keys (as written before the weights were packed) still load into a deployed block
(:func:`per_conv_keys_to_packed`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

PACKED = "packed_weights"

# What a Conv2d's forward reads besides its weight and bias.
_CONV_ATTRIBUTES = (
    "in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "transposed",
    "output_padding", "groups", "padding_mode", "_reversed_padding_repeated_twice",
)


class FoldedConv2d(nn.Conv2d):
    """A folded convolution of a deployed MoD block: an ``nn.Conv2d`` whose ``weight`` and ``bias``
    are views of its block's ``packed_weights`` (from ``offset``); it owns no parameters.

    Assigning ``weight`` or ``bias`` copies the tensor into the packed vector (same shape required).
    """

    def __init__(self, conv: nn.Conv2d, owner: nn.Module, offset: int) -> None:
        nn.Module.__init__(self)
        self.train(conv.training)
        for name in _CONV_ATTRIBUTES:
            setattr(self, name, getattr(conv, name))
        self.offset = offset
        self.weight_shape = tuple(conv.weight.shape)
        self.weight_numel = conv.weight.numel()
        # A plain reference (not a submodule): the block owns this module, not the other way round.
        self.__dict__["_owner"] = owner

    @property
    def weight(self) -> Tensor:  # type: ignore[override]
        return packed_weights(self._owner).narrow(0, self.offset, self.weight_numel).view(self.weight_shape)

    @property
    def bias(self) -> Tensor:  # type: ignore[override]
        return packed_weights(self._owner).narrow(0, self.offset + self.weight_numel, self.out_channels)

    def __setattr__(self, name: str, value) -> None:
        if name in ("weight", "bias") and "_owner" in self.__dict__:
            target = getattr(self, name)
            if not isinstance(value, Tensor):
                raise TypeError(
                    f"{name} of a deployed MoD block's folded convolution must be a tensor (it is copied into the "
                    f"block's packed_weights), got {type(value).__name__}"
                )
            if value.shape != target.shape:
                raise ValueError(
                    f"{name} of a deployed MoD block's folded convolution has shape {tuple(target.shape)}; "
                    f"got a tensor of shape {tuple(value.shape)}"
                )
            with torch.no_grad():
                target.copy_(value)
            return
        super().__setattr__(name, value)

    def __delattr__(self, name: str) -> None:
        if name in ("weight", "bias"):
            raise AttributeError(f"{name} of a deployed MoD block's folded convolution cannot be deleted")
        super().__delattr__(name)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", packed at {self.offset}"


def packed_numel(convs: list[nn.Conv2d]) -> int:
    return sum(conv.weight.numel() + conv.out_channels for conv in convs)


def packed_weights(block: nn.Module) -> Tensor:
    """``block.packed_weights``, checked: a contiguous 1-D floating tensor of the length its
    folded convolutions need (a clear error for one assigned by hand that is not)."""
    packed = block._parameters.get(PACKED)
    if packed is None:
        raise RuntimeError(f"{type(block).__name__} has no packed weights (it was not deployed)")
    expected = block._packed_numel
    if packed.dim() != 1 or packed.numel() != expected or not packed.is_floating_point() or not packed.is_contiguous():
        raise ValueError(
            f"{type(block).__name__}.{PACKED} must be a contiguous 1-D floating tensor of {expected} elements "
            f"(the folded convolutions of f_k), got shape {tuple(packed.shape)}, dtype {packed.dtype}"
        )
    return packed


def folded_weights(block: nn.Module) -> tuple[list[Tensor], list[Tensor]]:
    """``(weights, biases)`` of ``block``'s folded convolutions in the kernel's order: views of its
    ``packed_weights``, as the native kernel takes them.

    The views are kept between calls while ``packed_weights`` is the same memory (its address,
    dtype, device and shape): views alias the packed vector, so every in-place change reaches them,
    and they keep its storage alive, so a different tensor can never sit at the same address. Any
    other change of ``packed_weights`` (a new tensor, ``.data`` rebound, ``model.to``) makes new
    views. Taking six views costs about 10-20 us per call on a CPU, keeping them well under 1 us.
    """
    if torch.compiler.is_compiling():  # traced once into the graph: no addresses, nothing kept
        return _views(block)
    packed = block._parameters.get(PACKED)
    key = None if packed is None else (packed.data_ptr(), packed.dtype, packed.device, packed.shape)
    kept = block.__dict__.get("_folded_views")
    if kept is not None and kept[0] == key:
        return kept[1]
    views = _views(block)
    block.__dict__["_folded_views"] = (key, views)
    return views


def _views(block: nn.Module) -> tuple[list[Tensor], list[Tensor]]:
    packed = packed_weights(block)
    convs = sorted((m for m in block.modules() if isinstance(m, FoldedConv2d)), key=lambda conv: conv.offset)
    weights = [packed.narrow(0, conv.offset, conv.weight_numel).view(conv.weight_shape) for conv in convs]
    biases = [packed.narrow(0, conv.offset + conv.weight_numel, conv.out_channels) for conv in convs]
    return weights, biases


def is_packed(block: nn.Module) -> bool:
    return PACKED in block._parameters


def pack_reduced_block(block: nn.Module, convs: list[nn.Conv2d]) -> None:
    """Move the folded convolutions ``convs`` of ``block``'s reduced block (in the kernel's order)
    into one parameter ``block.packed_weights`` (in their dtype and device) and put a
    :class:`FoldedConv2d` in the place of each. Nothing to do when the block is packed already."""
    if is_packed(block):
        return
    dtype, device = convs[0].weight.dtype, convs[0].weight.device
    with torch.no_grad():
        parts = []
        for conv in convs:
            parts.append(conv.weight.detach().reshape(-1).to(dtype))
            bias = conv.bias
            parts.append(bias.detach().to(dtype) if bias is not None
                         else torch.zeros(conv.out_channels, dtype=dtype, device=device))
        packed = torch.cat(parts)
    block._packed_numel = packed.numel()
    block.register_parameter(PACKED, nn.Parameter(packed, requires_grad=False))
    offset = 0
    for conv in convs:
        folded = FoldedConv2d(conv, block, offset)
        for parent in block.modules():
            for name, child in parent._modules.items():
                if child is conv:
                    parent._modules[name] = folded
        offset += conv.weight.numel() + conv.out_channels


def per_conv_keys_to_packed(block, state_dict: dict, prefix: str) -> None:
    """In place on ``state_dict``: when it holds the per-convolution keys of ``block``'s folded
    convolutions (``conv1.weight``, ``conv1.bias``, ...: a deploy-form state dict written before the
    weights were packed) and no ``packed_weights``, pack them into that key."""
    key = prefix + PACKED
    if key in state_dict:
        return
    names = sorted(
        ((name, module) for name, module in block.named_modules() if isinstance(module, FoldedConv2d)),
        key=lambda item: item[1].offset,
    )
    wanted = [f"{prefix}{name}.{part}" for name, _ in names for part in ("weight", "bias")]
    if not names or not all(k in state_dict for k in wanted):
        return  # not this format: load_state_dict reports what is missing
    packed = packed_weights(block)
    parts = []
    for name, conv in names:
        weight, bias = state_dict[f"{prefix}{name}.weight"], state_dict[f"{prefix}{name}.bias"]
        if tuple(weight.shape) != conv.weight_shape or tuple(bias.shape) != (conv.out_channels,):
            return  # a shape mismatch: load_state_dict reports the keys it could not place
        parts += [weight.detach().reshape(-1).to(packed.dtype), bias.detach().to(packed.dtype)]
    for k in wanted:
        del state_dict[k]
    state_dict[key] = torch.cat([p.to(packed.device) for p in parts])

