"""Shared pieces of the MoD kernels: input checks, tile choices, strided addressing."""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

# Triton decides at kernel-definition time whether kernels run under its interpreter.
INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") == "1"

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INT32_LIMIT = 2**31 - 1


def check_device_supported(device: torch.device) -> None:
    """Raise a clear error unless the fused kernels can run on ``device``."""
    device = torch.device(device)
    if device.type == "cuda":
        if INTERPRETER:
            raise RuntimeError(
                "backend 'triton': TRITON_INTERPRET=1 was set when mod_kernels was imported, so the kernels "
                "run under Triton's CPU interpreter and cannot take CUDA tensors; unset it for GPU runs"
            )
        return
    if device.type == "cpu":
        if not INTERPRETER:
            raise RuntimeError(
                "backend 'triton' got a CPU tensor: the fused kernels run on CUDA GPUs, or on the CPU only "
                "under Triton's interpreter (set TRITON_INTERPRET=1 before importing mod_kernels). "
                "Use backend='reference' or 'auto' for CPU tensors"
            )
        return
    raise RuntimeError(f"backend 'triton' does not support device {device}; use backend='reference'")


def check_plain_autograd(op: str, *tensors: Tensor) -> None:
    """Raise a clear error under ``torch.func`` transforms (``grad``, ``vmap``, ``jvp``, ...) and
    forward-mode AD: the fused kernels have reverse-mode formulas for plain autograd only (a
    transform would otherwise fail deep inside PyTorch, or miss the kernels' contribution).
    Skipped while a compiler traces (it sees the custom ops, not the transforms' state)."""
    if torch.compiler.is_compiling():
        return
    interpreter = torch._C._functorch.peek_interpreter_stack()
    if interpreter is not None:
        transform = str(interpreter.key()).rsplit(".", 1)[-1].lower()
        raise RuntimeError(
            f"backend 'triton' ({op}): the fused MoD kernels do not support the torch.func transform "
            f"{transform!r}; use backend='reference' (plain PyTorch) under torch.func transforms"
        )
    if torch.autograd.forward_ad._current_level >= 0 and any(
        t is not None and torch.autograd.forward_ad.unpack_dual(t).tangent is not None for t in tensors
    ):
        raise RuntimeError(
            f"backend 'triton' ({op}): the fused MoD kernels do not support forward-mode AD (dual tensors); "
            "use backend='reference'"
        )


def check_backward_once(op: str) -> None:
    """Call at the start of a kernel backward: with ``create_graph=True`` (double backward) grad
    mode is on, and the kernels' gradients would silently carry no graph of their own."""
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        raise RuntimeError(
            f"backend 'triton' ({op}): double backward (create_graph=True, e.g. gradient penalties or "
            "Hessian-vector products) through the fused MoD kernels is not supported; use backend='reference'"
        )


def check_feature_map(t: Tensor, name: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"{name} must have shape [B, C, H, W], got shape {tuple(t.shape)}")
    if t.dtype not in KERNEL_DTYPES:
        raise TypeError(
            f"{name} has dtype {t.dtype}; the fused kernels support float32, float16 and bfloat16 "
            "(use backend='reference' for other dtypes)"
        )
    if t.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(t.shape)}")
    span = sum((size - 1) * abs(stride) for size, stride in zip(t.shape[1:], t.stride()[1:]))
    if span > INT32_LIMIT:
        raise ValueError(f"{name}: one sample spans {span} elements, more than the kernels' 32-bit in-sample offsets")


def check_in_place_input(x: Tensor) -> None:
    """Raise ``ValueError`` unless a kernel may write into ``x`` element by element: ``x`` owns its
    memory densely (NCHW or channels_last; not an expanded or overlapping view, whose channels
    share memory) and is not an inference tensor outside inference mode (PyTorch forbids updating
    those). The in-place entry points (``scale_fuse``, ``fuse_routed``, ``routed_block``,
    ``fused_block_forward``) all check this one rule. While a compiler traces, the graph's mutation
    of an inference tensor is PyTorch's to check."""
    if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
        raise ValueError("in-place fusion needs x contiguous (NCHW or channels_last); got a strided or expanded view")
    if not torch.compiler.is_compiling() and x.is_inference() and not torch.is_inference_mode_enabled():
        raise ValueError(
            "in-place fusion cannot write x: it is an inference tensor and inference mode is off (PyTorch "
            "forbids updating inference tensors outside torch.inference_mode); pass inplace=False, or run "
            "under torch.inference_mode()"
        )


def check_same_device(reference: Tensor, **tensors: Tensor) -> None:
    for name, t in tensors.items():
        if t.device != reference.device:
            raise ValueError(f"{name} is on {t.device} but x is on {reference.device}; all inputs must share a device")


def check_shape(t: Tensor, shape: tuple[int, ...], name: str) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def check_dtype(t: Tensor, dtype: torch.dtype, name: str) -> None:
    if t.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, got {t.dtype}")


def is_channels_last(t: Tensor) -> bool:
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def empty_like_format(x: Tensor, shape: tuple[int, ...], dtype: torch.dtype | None = None) -> Tensor:
    """A new ``shape`` tensor in ``x``'s memory format (channels_last stays channels_last)."""
    fmt = torch.channels_last if is_channels_last(x) else torch.contiguous_format
    return torch.empty(shape, device=x.device, dtype=dtype or x.dtype, memory_format=fmt)


def hw_is_flat(*tensors: Tensor) -> bool:
    """True when ``h * stride_h + w * stride_w == (h * W + w) * stride_w`` for every tensor."""
    return all(t.shape[2] == 1 or t.stride(2) == t.shape[3] * t.stride(3) for t in tensors)


def strides(t: Tensor) -> tuple[int, int, int, int]:
    return tuple(t.stride())  # type: ignore[return-value]


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for host code (``triton.cdiv`` is a slower JIT-aware wrapper)."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """Smallest power of two ``>= n`` (``n >= 1``), for host code."""
    return 1 << (n - 1).bit_length()


def runs_eagerly(x: Tensor) -> bool:
    """True when a launcher may launch kernels directly: ``x`` is a plain tensor and no compiler is
    tracing. Under ``torch.compile``/``torch.export`` (fake or functional tensors) the
    ``torch.library`` custom ops must be called instead, so that tracing sees one opaque op."""
    return type(x) is Tensor and not torch.compiler.is_compiling()


@functools.lru_cache(maxsize=None)
def dense_tiles(channels: int, hw: int, channels_last: bool) -> tuple[int, int, int]:
    """``(BLOCK_C, BLOCK_HW, num_warps)`` for a kernel that streams a ``[C, HW]`` slab.

    The contiguous axis (HW for NCHW, C for channels_last) gets the long side of the tile so
    that loads coalesce; a tile holds at most 4096 elements (16 per thread at 8 warps).
    """
    if channels_last:
        block_c = max(2, min(next_pow2(channels), 128))
        block_hw = max(2, min(next_pow2(hw), 4096 // block_c, 1024))
    else:
        block_hw = max(2, min(next_pow2(hw), 1024))
        block_c = max(2, min(next_pow2(channels), 4096 // block_hw))
    num_warps = 8 if block_c * block_hw >= 4096 else 4
    return block_c, block_hw, num_warps


@triton.jit
def spatial_offset(hw, W, stride_h, stride_w, HW_FLAT: tl.constexpr):
    """Element offset of flattened spatial position ``hw = h * W + w``."""
    if HW_FLAT:
        return hw * stride_w
    else:
        return (hw // W) * stride_h + (hw % W) * stride_w


@triton.jit
def relu_keep_nan(x):
    """``torch.relu``: negatives become 0, NaN stays NaN (``tl.maximum`` would return 0 for NaN)."""
    return tl.where(x < 0.0, 0.0, x)


@triton.jit
def relu_grad(grad, out):
    """``torch.relu``'s backward from its output: 0 where ``out <= 0``; passes through NaN outputs."""
    return tl.where(out <= 0.0, 0.0, grad)


@triton.jit
def relu6_keep_nan(x):
    """``torch.nn.functional.relu6``: clamps to [0, 6], NaN stays NaN."""
    return tl.where(x < 0.0, 0.0, tl.where(x > 6.0, 6.0, x))
