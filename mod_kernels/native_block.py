"""A whole deployed MoD block on the CPU in one call: the ``"native"`` backend.

The deploy form (:func:`mod_models.optimize_for_inference`) folds every batch norm into its
convolution. On CPU tensors a deployed block then runs :func:`native_block_forward`: one call of a
C++ extension (``native_block.cpp`` beside this file) that computes, for ``x: [B, C, H, W]``,

1. the spatial means ``[B, C]`` (fp32 sums in a fixed order) and the router's first layer
   ``relu(W1 mean)`` (``W1: [C_h, C]``), its second layer and the sigmoid: ``scores [B, C]`` fp32
   (or takes the random router's ``scores`` and scales by 1);
2. the stable top-k of each sample's scores: higher score first, ties to the lower channel index,
   NaN above every number (the distinct 64-bit keys of :mod:`mod_kernels.fused_route_pack`);
3. per sample and tile of rows: the selected channels with the halo the 3x3 convolutions need,
   the whole folded reduced block ``f_k`` in fp32 (bottleneck 1x1 k->m, ReLU, 3x3 with dilation,
   ReLU, 1x1 m->k; basic 3x3 ReLU 3x3; inverted residual 1x1 k->6k, ReLU6, 3x3 depthwise, ReLU6,
   1x1 ->k, or without the expansion), scaled by the selected score and added into the fusion
   targets (``first_k``, ``last_k``, ``original``) with the block's activation (ReLU as
   ``torch.relu``: NaN stays NaN; none for MobileNetV2).

float32, float16 and bfloat16 (fp32 arithmetic, one rounding at the store), any strides (NCHW,
channels_last, sliced views: read in place, never copied whole), any batch, parallel over samples,
channel chunks and row tiles on torch's intra-op threads. The work split depends on the shape
only, so results are bitwise the same for any thread count and for a sample in any batch.
channels_last inputs (what a block sees under Inductor's freezing) are pooled in runs of at least 64
channels per position and gathered and fused position by position, the k channels of a position
together (per call, thread CPU time, B = 1, one thread, under a load of 3: resnet50_mod layer1
C=256 56x56 551 -> 172 us, layer2 176 -> 112 us, layer3 125 -> 90 us; NCHW 100, 82, 86 us).
In place for affine fusions (the ``k`` targets of ``x`` are overwritten; a snapshot of them taken
while pooling feeds the gather, so no tile reads what another writes); ``"original"`` fusion
returns a new tensor.

Registered as ``torch.library.custom_op`` ``mod_kernels::native_block`` (and the in-place
``mod_kernels::native_block_``) with fake implementations, so ``torch.compile(fullgraph=True)``
keeps one call per MoD block. Both carry ``torch.Tag.flexible_layout``: under Inductor's freezing
the convolutions run on channels_last activations, and without the tag Inductor copies a block's
input to NCHW before the call and back after it (resnet50_mod, batch 1, one thread: 3.4 ms of such
copies per forward, 6 % of the compiled model; with the tag the op runs in place on Inductor's
layout: 59.5 -> 56.0 ms, torch.profiler thread CPU time under a load of 3).

Why a C++ extension. Measured 2026-12-04 on the project's 2-vCPU AMD EPYC VM (AVX-512), which other
jobs kept at a load of 4-8, so as per-call *thread CPU time*, one thread, median of 15 samples; fp32
NCHW, B = 1; the deployed block in place; "read" is ``x.sum()``; "reference" is the deployed block on
the reference backend (folded convolutions in plain PyTorch, about 16 ATen calls).

Prototypes of the bottleneck block, the raw kernel call (same algorithm: chunked pool with the
router's first layer, second layer, per-tile top-k, gather, direct convolutions on padded tiles):

=================================  ========  =====  ======================  ====================
shape                              ref (us)  read   C++ prototype (us)      numba prototype (us)
=================================  ========  =====  ======================  ====================
C=256 56x56 k=4 (resnet75 layer1)     295      41          86                     323
C=1024 14x14 k=16 (layer3)            337      13         125 (62 after        252
                                                          lane / tree fixes)
C=2048 7x7 k=32 (layer4)              446       8         216 (130 after)        602
=================================  ========  =====  ======================  ====================

* numba (``@njit(parallel=True, cache=True)``, bottleneck fp32 only): 2-4x slower than the C++
  prototype, 48 s to compile one signature cold and 0.8 s from its on-disk cache, one signature per
  dtype / layout / block type, no bfloat16 in NumPy, and its own thread pool beside torch's.
* C++ extension (``torch.utils.cpp_extension.load`` at first use, ``-O3`` and the machine's own
  instruction set, OpenMP through ATen's ``parallel_for``, so torch's intra-op threads): one build
  for every dtype, layout and block type, 33 s cold on the quiet machine (50-130 s at a load of
  6-8), 0.02-0.2 s from torch's extension cache afterwards (rebuilt when the source, the flags or the
  CPU change). It needs a C++ compiler (as ``torch.compile`` on a CPU does) and ``ninja`` (a PyPI
  dependency of this project). Chosen.

The final kernel, through the deployed block's forward (Python overhead included, about 15-25 us
here), B = 1 / B = 8 per call:

=====================================  ==============  ==============  ============  ===================
shape                                  native (us)     reference (us)  read (us)     native / read
=====================================  ==============  ==============  ============  ===================
resnet75_mod layer1 C=256 56x56 k=4     107 / 1692      268 / 2121      37 / 738      2.9x / 2.3x
resnet75_mod layer2 C=512 28x28 k=8      88 / 764       248 / 1209      20 / 180      4.4x / 4.3x
resnet75_mod layer3 C=1024 14x14 k=16    88 / 614       218 / 1229      11 / 76       8.3x / 8.1x
resnet75_mod layer4 C=2048 7x7 k=32     142 / 1253      358 / 2177       5 / 37        26x / 34x
mobilenet_v2 C=24 56x56 k=1              58 / 353       425 / 1730       6 / 30        9x / 12x
mobilenet_v2 C=96 14x14 k=6              50 / 170       352 / 526        2 / 8        21x / 22x
mobilenet_v2 C=160 7x7 k=10              52 / 172       343 / 436        2 / 4        28x / 45x
=====================================  ==============  ==============  ============  ===================

1.3-7.4x faster than the reference deploy block; the target of one read of the input times two is
met only where the input dominates (layer1, batch 8). What stays above it: the router's weights
(``2 C C_h`` floats: 2 MB at C = 2048, five times layer4's input, read per call), the per-call
Python of the block (most of a small block's time at B = 1), and ``f_k``'s arithmetic for
MobileNetV2's expanded widths. ``python -m bench.native_block`` measures wall time on the machine at
hand.

Without a compiler (or when the build fails) the ``"native"`` backend raises a ``RuntimeError``
that says so; it never falls back to another implementation. ``$MOD_NATIVE_CFLAGS`` replaces the
instruction-set flags (default ``-march=native`` on x86-64, ``-mcpu=native`` on Linux aarch64).

:func:`native_block_plan` is the dispatch rule: the blocks the kernel takes (its loops are direct
convolutions, so it takes reduced blocks up to a size bound above the paper's zoo) and why the
others run the reference (``block.deploy_plan()`` says which path a block takes).
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import shlex
import sys
from pathlib import Path
from typing import NamedTuple, Optional

import torch
from torch import Tensor

SOURCE = Path(__file__).with_name("native_block.cpp")
BLOCK_KINDS = {"bottleneck": 0, "basic": 1, "inverted": 2}
FUSIONS = ("first_k", "last_k", "original")
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CFLAGS_ENV_VAR = "MOD_NATIVE_CFLAGS"
# Largest reduced block the kernel takes, in multiply-accumulates per output position of f_k: above
# every block of the paper's zoo at its capacities (direct loops grow with the width; where oneDNN's
# convolutions on the reference path start to win has not been measured).
MAX_MACS_PER_POSITION = 16384


# --------------------------------------------------------------------------------------------
# Building the extension
# --------------------------------------------------------------------------------------------


def _instruction_set_flags() -> list[str]:
    override = os.environ.get(CFLAGS_ENV_VAR)
    if override is not None:
        return shlex.split(override)
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64"):
        return ["-march=native"]
    if machine in ("aarch64", "arm64") and sys.platform.startswith("linux"):
        return ["-mcpu=native"]
    return []


def _openmp_flags() -> list[str]:
    # ATen's parallel_for uses OpenMP where torch was built with it (Linux wheels); the kernel's
    # own fallback otherwise splits its items over torch's thread pool (e.g. Apple clang).
    return ["-fopenmp"] if sys.platform.startswith("linux") else []


def _machine_fingerprint() -> str:
    """What the compiled code depends on besides its source and flags: the CPU (``-march=native``)."""
    parts = [platform.machine(), platform.system(), torch.__version__]
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            parts += sorted({line for line in cpuinfo if line.startswith(("model name", "flags", "Features"))})
    except OSError:
        parts.append(platform.processor())
    return "".join(parts)


def build_flags() -> tuple[list[str], list[str]]:
    """``(extra_cflags, extra_ldflags)`` of the extension build."""
    openmp = _openmp_flags()
    return ["-O3", "-fno-math-errno", *openmp, *_instruction_set_flags()], openmp


@functools.lru_cache(maxsize=None)
def load_extension():
    """The compiled extension: built at first use (tens of seconds), then loaded from torch's
    extension cache (``$TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``).

    Raises:
        RuntimeError: no C++ compiler or ``ninja``, or the build failed; the message says which.
    """
    cflags, ldflags = build_flags()
    digest = hashlib.sha256(
        "\0".join([SOURCE.read_text(encoding="utf-8"), *cflags, *ldflags, _machine_fingerprint()]).encode()
    ).hexdigest()[:16]
    try:
        from torch.utils import cpp_extension

        return cpp_extension.load(
            name=f"mod_native_block_{digest}", sources=[str(SOURCE)], extra_cflags=cflags, extra_ldflags=ldflags,
            verbose=False,
        )
    except (RuntimeError, OSError, ImportError, SystemExit) as error:  # compiler, ninja or build errors
        raise RuntimeError(
            "backend 'native' builds a C++ extension at first use, which needs a C++ compiler (g++ or clang++; "
            f"on macOS the Xcode command line tools) and the ninja package (pip install ninja); the build failed: "
            f"{error}. Set ${CFLAGS_ENV_VAR} to change the instruction-set flags {_instruction_set_flags()}, or use "
            "backend='reference'"
        ) from error


# --------------------------------------------------------------------------------------------
# Dispatch rule
# --------------------------------------------------------------------------------------------


class NativeBlockPlan(NamedTuple):
    """Whether the native kernel runs a deployed block on the CPU (``native``), and why (``reason``)."""

    native: bool
    reason: str


def reduced_block_macs(kind: str, k: int, hidden: int, has_expand: bool = True) -> int:
    """Multiply-accumulates per output position of the reduced block (halo recomputation aside)."""
    if kind == "bottleneck":
        return k * hidden + 9 * hidden * hidden + hidden * k
    if kind == "basic":
        return 2 * 9 * k * k
    return (k * hidden if has_expand else 0) + 9 * hidden + hidden * k


def native_block_plan(
    kind: str, channels: int, k: int, hidden: int, dtype: torch.dtype, *, folded: bool = True, has_expand: bool = True
) -> NativeBlockPlan:
    """The documented dispatch rule of a deployed block on the CPU (``"native"`` and ``"auto"`` backends).

    Args:
        kind: ``"bottleneck"``, ``"basic"`` or ``"inverted"``.
        channels: ``C``; k: channels per sample; hidden: the reduced block's inner width.
        dtype: the block's parameter dtype (the dtype it computes in).
        folded: ``f_k`` is exactly folded convolutions and the activations the kernel computes.

    Returns:
        ``native=True`` when the kernel takes the block: ``f_k`` folded, float32/float16/bfloat16,
        and at most :data:`MAX_MACS_PER_POSITION` multiply-accumulates per position (every block at
        the paper's capacities is far inside). Otherwise the deployed block runs the reference path
        (the folded convolutions in plain PyTorch) and ``reason`` says why.
    """
    if kind not in BLOCK_KINDS:
        raise ValueError(f"unknown block kind {kind!r}; expected one of {tuple(BLOCK_KINDS)}")
    if not folded:
        return NativeBlockPlan(False, "f_k is not folded convolutions (a norm that does not fold?): reference path")
    if dtype not in KERNEL_DTYPES:
        return NativeBlockPlan(
            False, f"dtype {dtype}: the native kernel computes float32/float16/bfloat16; reference path"
        )
    macs = reduced_block_macs(kind, k, hidden, has_expand)
    if macs > MAX_MACS_PER_POSITION:
        return NativeBlockPlan(
            False, f"k = {k}: f_k needs {macs} > {MAX_MACS_PER_POSITION} multiply-accumulates per position, "
            "where oneDNN's convolutions are faster: reference path"
        )
    return NativeBlockPlan(True, "native CPU kernel, one call per block")


# --------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------


def _expected_conv_shapes(kind: str, k: int, hidden: int, has_expand: bool) -> list[tuple[int, ...]]:
    if kind == "bottleneck":
        return [(hidden, k, 1, 1), (hidden, hidden, 3, 3), (k, hidden, 1, 1)]
    if kind == "basic":
        return [(k, k, 3, 3), (k, k, 3, 3)]
    expand = [(hidden, k, 1, 1)] if has_expand else []
    return expand + [(hidden, 1, 3, 3), (k, hidden, 1, 1)]


def check_native_block_inputs(
    x: Tensor, kind: str, weights: list[Tensor], biases: list[Optional[Tensor]], k: int, hidden: int,
    dilation: int, fusion: str, activation: str, fc1_weight: Optional[Tensor], fc2_weight: Optional[Tensor],
    scores: Optional[Tensor], inplace: bool, has_expand: bool,
) -> None:
    """Raise ``TypeError``/``ValueError`` naming the problem unless the inputs fit the kernel."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"x must have shape [B, C, H, W], got shape {tuple(x.shape)}")
    if x.dtype not in KERNEL_DTYPES:
        raise TypeError(f"x has dtype {x.dtype}; the native kernel takes float32, float16 and bfloat16")
    if x.device.type != "cpu":
        raise ValueError(f"the native kernel runs on CPU tensors, x is on {x.device}")
    if x.numel() == 0:
        raise ValueError(f"x must not be empty, got shape {tuple(x.shape)}")
    if kind not in BLOCK_KINDS:
        raise ValueError(f"unknown block kind {kind!r}; expected one of {tuple(BLOCK_KINDS)}")
    if fusion not in FUSIONS:
        raise ValueError(f"unknown fusion {fusion!r}; expected one of {FUSIONS}")
    if activation not in ("relu", "none"):
        raise ValueError(f"unknown activation {activation!r}; expected 'relu' or 'none'")
    for name, flag in (("inplace", inplace), ("has_expand", has_expand)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be True or False, got {flag!r}")
    for name, value in (("k", k), ("hidden", hidden), ("dilation", dilation)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    channels = x.shape[1]
    if k > channels:
        raise ValueError(f"k must satisfy 1 <= k <= C = {channels}, got {k}")
    if kind == "inverted" and dilation != 1:
        raise ValueError("the inverted residual's depthwise convolution has no dilation")
    if not has_expand and kind != "inverted":
        raise ValueError("has_expand=False is for inverted residuals (expand_ratio 1) only")
    if not has_expand and hidden != k:
        raise ValueError(f"an inverted residual without expansion has hidden == k, got hidden={hidden}, k={k}")
    shapes = _expected_conv_shapes(kind, k, hidden, has_expand)
    if not isinstance(weights, (list, tuple)) or not isinstance(biases, (list, tuple)):
        raise TypeError("weights and biases must be lists of tensors (biases may hold None)")
    if len(weights) != len(shapes) or len(biases) != len(shapes):
        raise ValueError(
            f"a {kind} block has {len(shapes)} convolutions, got {len(weights)} weights and {len(biases)} biases"
        )
    for number, (weight, bias, shape) in enumerate(zip(weights, biases, shapes)):
        if not isinstance(weight, Tensor) or not weight.is_floating_point() or tuple(weight.shape) != shape:
            raise ValueError(f"weights[{number}] must be a floating tensor of shape {shape}")
        bad_bias = not isinstance(bias, Tensor) or not bias.is_floating_point() or tuple(bias.shape) != shape[:1]
        if bias is not None and bad_bias:
            raise ValueError(f"biases[{number}] must be None or a floating tensor of shape {shape[:1]}")
        for t in (weight, bias):
            if t is not None and t.device != x.device:
                raise ValueError(f"the convolutions must be on {x.device} like x")
    learned = fc1_weight is not None or fc2_weight is not None
    if learned == (scores is not None) or (learned and (fc1_weight is None or fc2_weight is None)):
        raise ValueError("the native block needs either both fc1_weight and fc2_weight, or scores")
    if learned:
        for name, weight in (("fc1_weight", fc1_weight), ("fc2_weight", fc2_weight)):
            if not isinstance(weight, Tensor) or weight.dim() != 2 or weight.dtype not in KERNEL_DTYPES:
                raise TypeError(f"{name} must be a 2-D float32/float16/bfloat16 tensor")
            if weight.device != x.device:
                raise ValueError(f"{name} is on {weight.device} but x is on {x.device}")
        c_hidden = fc1_weight.shape[0]
        if tuple(fc1_weight.shape) != (c_hidden, channels) or tuple(fc2_weight.shape) != (channels, c_hidden):
            raise ValueError(
                f"fc1_weight must be [C_h, {channels}] and fc2_weight [{channels}, C_h], got "
                f"{tuple(fc1_weight.shape)} and {tuple(fc2_weight.shape)}"
            )
    else:
        if not isinstance(scores, Tensor):
            raise TypeError(f"scores must be a torch.Tensor, got {type(scores).__name__}")
        if tuple(scores.shape) != tuple(x.shape[:2]) or scores.dtype != torch.float32 or scores.device != x.device:
            raise ValueError(f"scores must be a float32 [B, C] = {tuple(x.shape[:2])} tensor on {x.device}")


# --------------------------------------------------------------------------------------------
# The call
# --------------------------------------------------------------------------------------------

# Allocation of the new output tensor (tests poison it to catch unwritten elements).
_empty_like_format = None


def _new_output(x: Tensor) -> Tensor:
    """A new tensor of ``x``'s shape and dtype, channels_last when ``x`` is, else contiguous."""
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    if _empty_like_format is not None:
        return _empty_like_format(x, fmt)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=fmt)


def _router_operands(
    fc1: Optional[Tensor], fc2: Optional[Tensor], x: Tensor
) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """The extension reads both router weights contiguous, in fp32 or both in x's dtype."""
    if fc1 is None:
        return None, None
    if not (fc1.dtype == fc2.dtype and fc1.dtype in (torch.float32, x.dtype)):
        fc1, fc2 = fc1.float(), fc2.float()
    return (fc1 if fc1.is_contiguous() else fc1.contiguous()), (fc2 if fc2.is_contiguous() else fc2.contiguous())


def native_block_unchecked(
    x: Tensor, kind: str, weights: list[Tensor], biases: list[Optional[Tensor]], k: int, hidden: int,
    dilation: int, fusion: str, relu: bool, fc1_weight: Optional[Tensor], fc2_weight: Optional[Tensor],
    scores: Optional[Tensor], inplace: bool, has_expand: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The extension's call on checked inputs: ``(out, idx [B, k] int64, w [B, k] fp32, scores [B, C] fp32)``."""
    inplace = inplace and fusion != "original"
    out = x if inplace else _new_output(x)
    channels = x.shape[1]
    target_start = -1 if fusion == "original" else (0 if fusion == "first_k" else channels - k)
    if scores is not None and not scores.is_contiguous():
        scores = scores.contiguous()
    idx, w, new_scores = load_extension().native_block(
        x, out, BLOCK_KINDS[kind], list(weights), list(biases), k, hidden, dilation, target_start, relu, has_expand,
        *_router_operands(fc1_weight, fc2_weight, x), scores,
    )
    if inplace:
        torch.autograd.graph.increment_version(x)
    return out, idx, w, new_scores


@torch.library.custom_op("mod_kernels::native_block", mutates_args=(), tags=(torch.Tag.flexible_layout,))
def native_block_op(
    x: Tensor, kind: str, weights: list[Tensor], biases: list[Optional[Tensor]], k: int, hidden: int, dilation: int,
    fusion: str, relu: bool, fc1_weight: Optional[Tensor], fc2_weight: Optional[Tensor], scores: Optional[Tensor],
    has_expand: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    out, idx, w, new_scores = native_block_unchecked(
        x, kind, weights, biases, k, hidden, dilation, fusion, relu, fc1_weight, fc2_weight, scores, False, has_expand
    )
    return out, idx, w, new_scores.clone() if new_scores is scores else new_scores


@native_block_op.register_fake
def _(x, kind, weights, biases, k, hidden, dilation, fusion, relu, fc1_weight, fc2_weight, scores, has_expand):
    batch, channels = x.shape[:2]
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return (
        torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=fmt),
        x.new_empty((batch, k), dtype=torch.int64),
        x.new_empty((batch, k), dtype=torch.float32),
        x.new_empty((batch, channels), dtype=torch.float32),
    )


@torch.library.custom_op("mod_kernels::native_block_", mutates_args=("x",), tags=(torch.Tag.flexible_layout,))
def native_block_inplace_op(
    x: Tensor, kind: str, weights: list[Tensor], biases: list[Optional[Tensor]], k: int, hidden: int, dilation: int,
    fusion: str, relu: bool, fc1_weight: Optional[Tensor], fc2_weight: Optional[Tensor], scores: Optional[Tensor],
    has_expand: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    _, idx, w, new_scores = native_block_unchecked(
        x, kind, weights, biases, k, hidden, dilation, fusion, relu, fc1_weight, fc2_weight, scores, True, has_expand
    )
    return idx, w, new_scores.clone() if new_scores is scores else new_scores


@native_block_inplace_op.register_fake
def _(x, kind, weights, biases, k, hidden, dilation, fusion, relu, fc1_weight, fc2_weight, scores, has_expand):
    batch, channels = x.shape[:2]
    return (
        x.new_empty((batch, k), dtype=torch.int64),
        x.new_empty((batch, k), dtype=torch.float32),
        x.new_empty((batch, channels), dtype=torch.float32),
    )


def native_block_forward(
    x: Tensor,
    kind: str,
    weights: list[Tensor],
    biases: list[Optional[Tensor]],
    k: int,
    hidden: int,
    *,
    dilation: int = 1,
    fusion: str = "first_k",
    activation: str = "relu",
    fc1_weight: Optional[Tensor] = None,
    fc2_weight: Optional[Tensor] = None,
    scores: Optional[Tensor] = None,
    inplace: bool = False,
    has_expand: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A whole deployed MoD block (folded batch norms) on CPU tensors in one native call.
    Inference only: inputs autograd needs are an error.

    Args:
        x: ``[B, C, H, W]`` float32/float16/bfloat16 on the CPU, any strides.
        kind: ``"bottleneck"`` (1x1 k->hidden, ReLU, 3x3, ReLU, 1x1 ->k), ``"basic"`` (3x3 k->k, ReLU,
            3x3) or ``"inverted"`` (1x1 k->hidden, ReLU6, 3x3 depthwise, ReLU6, 1x1 ->k; without the
            first layer when ``has_expand`` is False).
        weights: the folded convolutions' weights in order, ``[out, in, kh, kw]`` (any float dtype);
        biases: their biases ``[out]`` (None for none).
        k: channels per sample; hidden: the inner width (bottleneck width, expanded width, or k).
        dilation: of the 3x3 convolutions (ResNet blocks).
        fusion: ``"first_k"``, ``"last_k"`` or ``"original"``; activation: ``"relu"`` or ``"none"``.
        fc1_weight, fc2_weight: the learned router (``[C_h, C]``, ``[C, C_h]``), or
        scores: ``[B, C]`` fp32 keys of the random router (``w`` is then all ones).
        inplace: write the targets into ``x`` and return it (affine fusions; ``"original"`` fusion
            always returns a new tensor). Only for a dense ``x`` that nothing else reads afterwards.

    Returns:
        ``(out [B, C, H, W], idx [B, k] int64, w [B, k] fp32, scores [B, C] fp32)``; ``out`` has
        ``x``'s dtype, and ``x``'s memory format (a new tensor is channels_last when ``x`` is).
    """
    check_native_block_inputs(
        x, kind, weights, biases, k, hidden, dilation, fusion, activation, fc1_weight, fc2_weight, scores, inplace,
        has_expand,
    )
    if torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, fc1_weight, fc2_weight, scores, *weights, *biases)
    ):
        raise ValueError(
            "native_block_forward is inference only, but an input requires grad; run under torch.no_grad() / "
            "torch.inference_mode()"
        )
    if inplace and not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
        raise ValueError("inplace=True needs a dense x (NCHW or channels_last); pass inplace=False for views")
    return native_block_dispatch(
        x, kind, weights, biases, k, hidden, dilation, fusion, activation == "relu", fc1_weight, fc2_weight, scores,
        inplace, has_expand,
    )


def native_block_dispatch(
    x: Tensor, kind: str, weights: list[Tensor], biases: list[Optional[Tensor]], k: int, hidden: int,
    dilation: int, fusion: str, relu: bool, fc1_weight: Optional[Tensor], fc2_weight: Optional[Tensor],
    scores: Optional[Tensor], inplace: bool, has_expand: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`native_block_forward` of checked inputs (a deployed block's own, checked when it was
    built): the extension directly in eager mode, the custom ops while a compiler traces."""
    inplace = inplace and fusion != "original"
    if type(x) is Tensor and not torch.compiler.is_compiling():
        return native_block_unchecked(
            x, kind, weights, biases, k, hidden, dilation, fusion, relu, fc1_weight, fc2_weight, scores, inplace,
            has_expand,
        )
    args = (x, kind, list(weights), list(biases), k, hidden, dilation, fusion, relu, fc1_weight, fc2_weight, scores,
            has_expand)
    if inplace:
        idx, w, new_scores = native_block_inplace_op(*args)
        return x, idx, w, new_scores
    return native_block_op(*args)
