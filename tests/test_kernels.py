"""Fused Triton kernels against the reference: ops, blocks and whole models, forward and backward.

On a machine without CUDA the kernels run under Triton's interpreter (tests/conftest.py sets
``TRITON_INTERPRET=1``), so shapes stay small; with CUDA the same tests run compiled, and the
``gpu`` cases add larger shapes and fp16/bf16 models.

Tolerances (absolute, relative), justified:

* fp32 outputs ``(1e-5, 1e-5)``: the kernels and the reference compute the same fp32 math in a
  different order (pooling over H*W, the router dot products, ``x + w*y`` with or without FMA);
  each differs by a few ulps (~1e-7 relative) and a block output is one such sum away.
* fp32 gradients ``(1e-4, 1e-4)``: the same ulp-level differences pass through BatchNorm's
  backward in train mode, which divides by the batch standard deviation and amplifies them.
* fp16 / bf16 outputs: one rounding step of the result, so one ulp of the format: ``rtol`` of
  ``2**-10`` (fp16) and ``2**-7`` (bf16), with ``atol`` at the same scale for values near zero.
* Indices (top-k selection, slot maps) must match exactly. Inputs are random with score gaps far
  above fp32 noise, so a mismatch is a bug, not a near-tie.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch
from helpers import assert_close, assert_teacher_forced_agreement, randomise_norms

import mod_kernels
import mod_models
from mod_models import functional as MF

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
gpu_only = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device")

FP32_OUT = dict(atol=1e-5, rtol=1e-5)
FP32_GRAD = dict(atol=1e-4, rtol=1e-4)
LOW_PRECISION = {
    torch.float16: dict(atol=2**-10, rtol=2**-10),
    torch.bfloat16: dict(atol=2**-7, rtol=2**-7),
}
FUSIONS = ("first_k", "last_k", "original")
FORMATS = ("nchw", "channels_last")
BLOCKS = {
    "bottleneck": mod_models.MoDBottleneck,
    "basic": mod_models.MoDBasicBlock,
    "inverted": mod_models.MoDInvertedResidual,
}


@pytest.fixture(autouse=True)
def _exact_fp32_convolutions():
    """Both backends run the same convolutions; TF32 would round their (ulp-different) inputs to
    10-bit mantissas and turn fp32 noise into 1e-3 differences on a GPU."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def feature_map(batch, channels, height, width, fmt="nchw", dtype=torch.float32, device=DEVICE):
    x = torch.randn(batch, channels, height, width, dtype=dtype, device=device)
    return x.contiguous(memory_format=torch.channels_last) if fmt == "channels_last" else x


def randomise(module: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial norm statistics/affine so eval mode and gradients are not degenerate."""
    return randomise_norms(module, 1)


def run_with_backend(model, backend, x, grad_out=None):
    """Output, recorded selections, input gradient and parameter gradients under ``backend``."""
    model = copy.deepcopy(model)
    mod_models.set_backend(model, backend)
    blocks = [m for m in model.modules() if isinstance(m, mod_models.MoDBlock)]
    for block in blocks:
        block.record_selection = True
    x = x.detach().clone().requires_grad_(True)
    out = model(x)
    grad_out = torch.randn_like(out) if grad_out is None else grad_out
    out.backward(grad_out)
    selections = [block.last_selection for block in blocks]
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    return out.detach(), selections, x.grad, grads, grad_out


def assert_backends_agree(model, x, out_tol=FP32_OUT, grad_tol=FP32_GRAD, label=""):
    torch.manual_seed(123)  # the same dropout masks and random-router draws in both runs
    ref = run_with_backend(model, "reference", x)
    torch.manual_seed(123)
    fused = run_with_backend(model, "triton", x, grad_out=ref[4])
    assert_close(fused[0], ref[0], **out_tol, name=f"{label} output")
    for i, (a, b) in enumerate(zip(fused[1], ref[1])):
        assert torch.equal(a, b), f"{label}: MoD block {i} selected {a.tolist()} but the reference {b.tolist()}"
    assert_close(fused[2], ref[2], **grad_tol, name=f"{label} grad x")
    assert fused[3].keys() == ref[3].keys()
    for name in ref[3]:
        assert_close(fused[3][name], ref[3][name], **grad_tol, name=f"{label} grad {name}")
    return ref, fused


# ------------------------------------------------------------------------------------------------
# route_pack against the reference ops
# ------------------------------------------------------------------------------------------------

ROUTE_SHAPES = [  # (B, C, H, W, k)
    (1, 48, 1, 1, 1),
    (3, 48, 7, 7, 48),
    (3, 96, 9, 9, 6),
    (1, 200, 7, 9, 3),
    (3, 200, 9, 7, 200),
]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", ROUTE_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_route_pack_matches_reference(shape, fmt):
    batch, channels, height, width, k = shape
    x = feature_map(batch, channels, height, width, fmt).requires_grad_(True)
    hidden = MF.router_hidden_channels(channels)
    fc1 = (torch.randn(hidden, channels, device=DEVICE) * 0.3).requires_grad_(True)
    fc2 = (torch.randn(channels, hidden, device=DEVICE) * 0.3).requires_grad_(True)

    routed = mod_kernels.route_pack(x, k, fc1_weight=fc1, fc2_weight=fc2)
    scores = MF.router_scores(x, fc1, fc2)
    idx = MF.select_top_k(scores, k)
    w = scores.gather(1, idx)
    xs = MF.gather_channels(x, idx)

    assert torch.equal(routed.idx, idx), "selected channels differ from the reference"
    assert routed.idx.dtype == torch.int64 and routed.w.dtype == torch.float32
    assert_close(routed.w, w, **FP32_OUT, name="selected scores")
    assert torch.equal(routed.xs, xs.detach()), "packed channels are a copy and must be bit-identical"
    assert routed.xs.stride() == xs.stride(), "xs must be in x's memory format"
    expected_slot = torch.full((batch, channels), -1, dtype=torch.int32, device=DEVICE)
    expected_slot.scatter_(1, idx, torch.arange(k, dtype=torch.int32, device=DEVICE).expand(batch, k).contiguous())
    assert torch.equal(routed.selected_slot, expected_slot)

    grad_xs, grad_w = torch.randn_like(xs), torch.randn_like(w)
    fused_grads = torch.autograd.grad((routed.xs, routed.w), (x, fc1, fc2), (grad_xs, grad_w))
    ref_grads = torch.autograd.grad((xs, w), (x, fc1, fc2), (grad_xs, grad_w))
    for name, a, b in zip(("x", "fc1", "fc2"), fused_grads, ref_grads):
        assert_close(a, b, **FP32_GRAD, name=f"grad {name}")
    assert fused_grads[0].stride() == x.stride(), "grad x must be in x's memory format"


@pytest.mark.parametrize("activation", ["relu", "none"])
@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_route_and_fuse_pair_matches_reference(fmt, fusion, activation):
    """route_pack + fuse_routed (the MoD blocks' path, single-pass input backward) against the
    reference ops, with y a differentiable function of xs as in a block."""
    batch, channels, height, width, k = 3, 96, 7, 9, 6
    x = feature_map(batch, channels, height, width, fmt).requires_grad_(True)
    fc1 = (torch.randn(6, channels, device=DEVICE) * 0.3).requires_grad_(True)
    fc2 = (torch.randn(channels, 6, device=DEVICE) * 0.3).requires_grad_(True)
    mix = torch.randn(k, k, device=DEVICE, requires_grad=True)

    def reduced_block(xs):
        return torch.nn.functional.conv2d(xs, mix[:, :, None, None])

    routed = mod_kernels.route_pack(x, k, fc1_weight=fc1, fc2_weight=fc2, fusion=fusion)
    fused = mod_kernels.fuse_routed(routed, reduced_block(routed.xs), activation=activation)
    scores = MF.router_scores(x, fc1, fc2)
    idx = MF.select_top_k(scores, k)
    ref = MF.scale_and_fuse(
        x, reduced_block(MF.gather_channels(x, idx)), scores.gather(1, idx), idx, fusion=fusion, activation=activation
    )
    assert torch.equal(routed.idx, idx)
    assert_close(fused, ref, **FP32_OUT, name="output")
    grad_out = torch.randn_like(ref)
    fused_grads = torch.autograd.grad(fused, (x, fc1, fc2, mix), grad_out)
    ref_grads = torch.autograd.grad(ref, (x, fc1, fc2, mix), grad_out)
    for name, a, b in zip(("x", "fc1", "fc2", "reduced block"), fused_grads, ref_grads):
        assert_close(a, b, **FP32_GRAD, name=f"grad {name}")
    assert fused_grads[0].stride() == x.stride()


@gpu_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("stage", [(256, 56), (512, 28), (1024, 14), (2048, 7)], ids=str)
def test_pair_on_gpu_at_resnet50_stage_shapes(stage, fmt, dtype):
    """route_pack + fuse_routed at resnet50_mod's stage shapes (k = C / 64), batch 16."""
    channels, size = stage
    k = channels // 64
    x = feature_map(16, channels, size, size, fmt, dtype=dtype).requires_grad_(True)
    hidden = channels // 16
    fc1 = (torch.randn(hidden, channels, device=DEVICE) * 0.3).requires_grad_(True)
    fc2 = (torch.randn(channels, hidden, device=DEVICE) * 0.3).requires_grad_(True)
    routed = mod_kernels.route_pack(x, k, fc1_weight=fc1, fc2_weight=fc2)
    fused = mod_kernels.fuse_routed(routed, routed.xs * 0.5)
    scores = MF.router_scores(x, fc1, fc2)
    idx = MF.select_top_k(scores, k)
    ref = MF.scale_and_fuse(x, MF.gather_channels(x, idx) * 0.5, scores.gather(1, idx), idx)
    assert torch.equal(routed.idx, idx)
    out_tol = FP32_OUT if dtype == torch.float32 else LOW_PRECISION[dtype]
    assert_close(fused, ref, **out_tol, name="output")
    grad_out = torch.randn_like(ref)
    fused_grads = torch.autograd.grad(fused, (x, fc1, fc2), grad_out)
    ref_grads = torch.autograd.grad(ref, (x, fc1, fc2), grad_out)
    for name, a, b in zip(("x", "fc1", "fc2"), fused_grads, ref_grads):
        if dtype == torch.float32:
            assert_close(a, b, **FP32_GRAD, name=f"grad {name}")
        else:
            relative = ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()
            assert relative < 1e-2, f"grad {name}: relative L2 difference {relative:.3g}"


@pytest.mark.parametrize("fmt", FORMATS)
def test_random_router_select_pack(fmt):
    x = feature_map(3, 96, 7, 9, fmt).requires_grad_(True)
    keys = torch.rand(3, 96, device=DEVICE)
    routed = mod_kernels.route_pack(x, 6, scores=keys)
    idx = MF.select_top_k(keys, 6)
    assert torch.equal(routed.idx, idx)
    assert torch.equal(routed.w, torch.ones(3, 6, device=DEVICE))
    xs = MF.gather_channels(x, idx)
    assert torch.equal(routed.xs, xs.detach())
    grad_xs = torch.randn_like(xs)
    (fused,) = torch.autograd.grad(routed.xs, x, grad_xs)
    (ref,) = torch.autograd.grad(xs, x, grad_xs)
    assert torch.equal(fused, ref), "the unpack gradient is a pure scatter and must be exact"


def test_selection_ties_go_to_the_lower_channel():
    keys = torch.tensor([[0.5, 0.9, 0.9, 0.1, 0.9, 0.5], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]], device=DEVICE)
    routed = mod_kernels.route_pack(feature_map(2, 6, 2, 2), 4, scores=keys)
    assert routed.idx.tolist() == [[1, 2, 4, 0], [0, 1, 2, 3]]


def test_non_finite_scores_give_distinct_in_range_indices():
    nan, inf = float("nan"), float("inf")
    keys = torch.tensor(
        [[0.5, nan, 0.7, -inf, inf, -0.0, 0.0, -nan], [nan] * 8, [inf, -inf] * 4], device=DEVICE
    )
    for k in (1, 3, 8):
        routed = mod_kernels.route_pack(feature_map(3, 8, 2, 2), k, scores=keys)
        # The rule is the CPU comparison sort's: -0.0 == 0.0, every NaN ranks first, ties to the lower
        # channel, on every device (torch.sort on CUDA ranks a NaN with its sign bit set last:
        # bench/results/nvidia-h200-gpu.log, "torch.sort(stable, descending)").
        expected = MF.select_top_k(keys.cpu(), k).to(routed.idx.device)
        assert torch.equal(routed.idx, expected), "must equal torch.sort's order on the CPU (NaN first)"
        for row in routed.idx.tolist():
            assert len(set(row)) == k and all(0 <= c < 8 for c in row)


def test_non_finite_feature_maps_route_safely():
    x = feature_map(2, 48, 3, 3)
    x[0, 5] = float("nan")
    x[1, :, 0, 0] = float("inf")
    x[1, 7, 1, 1] = -float("inf")
    block = mod_models.MoDBottleneck(48, capacity=4, backend="triton").to(DEVICE)
    block.record_selection = True
    with torch.no_grad():
        block(x.clone())
    idx = block.last_selection
    for row in idx.tolist():
        assert len(set(row)) == 12 and all(0 <= c < 48 for c in row)


# ------------------------------------------------------------------------------------------------
# scale_fuse against the reference op
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("activation", ["relu", "none"])
@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", [(1, 48, 1, 1, 48), (3, 96, 7, 9, 6), (3, 200, 9, 9, 1)], ids=str)
def test_scale_fuse_matches_reference(shape, fmt, fusion, activation):
    batch, channels, height, width, k = shape
    x = feature_map(batch, channels, height, width, fmt).requires_grad_(True)
    y = feature_map(batch, k, height, width, fmt).requires_grad_(True)
    w = torch.rand(batch, k, device=DEVICE).requires_grad_(True)
    idx = torch.stack([torch.randperm(channels, device=DEVICE)[:k] for _ in range(batch)])
    slot = torch.full((batch, channels), -1, dtype=torch.int32, device=DEVICE)
    slot.scatter_(1, idx, torch.arange(k, dtype=torch.int32, device=DEVICE).expand(batch, k).contiguous())

    fused = mod_kernels.scale_fuse(x, y, w, idx, slot, fusion=fusion, activation=activation)
    ref = MF.scale_and_fuse(x, y, w, idx, fusion=fusion, activation=activation)
    assert_close(fused, ref, **FP32_OUT, name="output")
    assert fused.stride() == x.stride()
    targets = MF.fusion_targets(idx, channels, fusion)
    untouched = torch.ones(batch, channels, dtype=torch.bool, device=DEVICE)
    untouched.scatter_(1, targets, False)
    assert torch.equal(fused.detach()[untouched], x.detach()[untouched]), "non-target channels must equal x bitwise"

    grad_out = torch.randn_like(ref)
    fused_grads = torch.autograd.grad(fused, (x, y, w), grad_out)
    ref_grads = torch.autograd.grad(ref, (x, y, w), grad_out)
    for name, a, b in zip(("x", "y", "w"), fused_grads, ref_grads):
        assert_close(a, b, **FP32_GRAD, name=f"grad {name}")

    with torch.no_grad():
        x_inplace = x.detach().clone()
        returned = mod_kernels.scale_fuse(x_inplace, y, w, idx, slot, fusion=fusion, activation=activation,
                                          inplace=True)
    assert returned is x_inplace
    assert torch.equal(x_inplace, fused.detach()), "in-place and copy results must be bit-identical"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_scale_fuse_low_precision_and_mixed_dtypes(dtype):
    x = feature_map(2, 96, 5, 5, dtype=dtype)
    y = feature_map(2, 6, 5, 5, dtype=dtype)
    w = torch.rand(2, 6, device=DEVICE)
    idx = torch.stack([torch.randperm(96, device=DEVICE)[:6] for _ in range(2)])
    slot = torch.full((2, 96), -1, dtype=torch.int32, device=DEVICE)
    slot.scatter_(1, idx, torch.arange(6, dtype=torch.int32, device=DEVICE).expand(2, 6).contiguous())
    fused = mod_kernels.scale_fuse(x, y, w, idx, slot, fusion="original")
    ref = MF.scale_and_fuse(x, y, w, idx, fusion="original")
    assert fused.dtype == dtype
    assert_close(fused, ref, **LOW_PRECISION[dtype], name=f"{dtype} output")
    # autocast: fp32 residual stream, low-precision conv output
    x32 = x.float()
    mixed = mod_kernels.scale_fuse(x32, y, w, idx, slot, fusion="first_k")
    assert mixed.dtype == torch.float32
    assert_close(mixed, MF.scale_and_fuse(x32, y, w, idx, fusion="first_k"), **FP32_OUT, name="mixed dtypes")


# ------------------------------------------------------------------------------------------------
# Blocks: reference and fused backends with one state_dict
# ------------------------------------------------------------------------------------------------

BLOCK_CASES = [  # (block, C, capacity, B, H, W, fusion, format)
    ("bottleneck", 48, 48, 1, 1, 1, "first_k", "nchw"),  # k = 1, H = W = 1
    ("bottleneck", 48, 1, 3, 7, 7, "original", "channels_last"),  # k = C
    ("bottleneck", 96, 16, 3, 9, 9, "last_k", "nchw"),
    ("bottleneck", 200, 8, 1, 7, 9, "original", "nchw"),
    ("bottleneck", 200, 8, 3, 9, 7, "first_k", "channels_last"),
    ("basic", 48, 4, 3, 7, 7, "first_k", "nchw"),
    ("basic", 96, 96, 1, 9, 9, "original", "channels_last"),  # k = 1
    ("basic", 200, 25, 3, 1, 1, "last_k", "channels_last"),
    ("basic", 48, 1, 1, 7, 9, "last_k", "nchw"),  # k = C
    ("inverted", 48, 16, 3, 9, 9, "original", "nchw"),
    ("inverted", 96, 16, 1, 7, 7, "first_k", "channels_last"),
    ("inverted", 200, 200, 3, 9, 7, "last_k", "nchw"),  # k = 1
    ("inverted", 48, 1, 3, 1, 1, "first_k", "channels_last"),  # k = C
]


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("case", BLOCK_CASES, ids=lambda c: "-".join(map(str, c)))
def test_block_backends_agree(case, mode):
    name, channels, capacity, batch, height, width, fusion, fmt = case
    block = randomise(BLOCKS[name](channels, capacity=capacity, fusion=fusion)).to(DEVICE)
    block.train(mode == "train")
    if mode == "train" and batch * height * width == 1:
        batch = 2  # BatchNorm cannot take training statistics of a single value
    x = feature_map(batch, channels, height, width, fmt)
    ref, fused = assert_backends_agree(block, x, label=f"{name} {mode}")
    assert fused[0].stride() == ref[0].stride() == x.stride()


@pytest.mark.parametrize("name", list(BLOCKS))
def test_block_random_router_backends_agree(name):
    block = randomise(BLOCKS[name](96, capacity=16, router="random")).to(DEVICE)
    assert_backends_agree(block, feature_map(3, 96, 5, 5), label=f"{name} random router")


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("name", list(BLOCKS))
def test_block_inference_is_in_place_and_equal(name, fusion):
    block = randomise(BLOCKS[name](96, capacity=16, fusion=fusion, inplace=True)).to(DEVICE).eval()
    x = feature_map(2, 96, 5, 7, "channels_last")
    with torch.no_grad():
        expected = mod_models.set_backend(copy.deepcopy(block), "reference")(x.clone())
        x_fused = x.clone()
        out = mod_models.set_backend(block, "triton")(x_fused)
    assert out.data_ptr() == x_fused.data_ptr(), "under no_grad the fused block must write into its input"
    assert_close(out, expected, **FP32_OUT, name="in-place output")


@pytest.mark.parametrize("name", ["bottleneck", "inverted"])
def test_amp_training_step_matches_reference(name):
    """Autocast (bf16 convolutions, fp32 residual stream) and an SGD step on both backends. (SGD:
    its update is proportional to the gradient; Adam's first step is lr * sign(grad), which turns
    a rounding-level difference of a near-zero gradient into a 2 * lr jump.)"""
    device_type = "cuda" if ON_GPU else "cpu"
    results = {}
    for backend in ("reference", "triton"):
        torch.manual_seed(0)
        block = randomise(BLOCKS[name](96, capacity=16, backend=backend)).to(DEVICE)
        optimizer = torch.optim.SGD(block.parameters(), lr=0.1, momentum=0.9)
        x = feature_map(4, 96, 7, 7, "channels_last").requires_grad_(True)
        with torch.autocast(device_type, dtype=torch.bfloat16):
            out = block(x)
        assert out.dtype == torch.float32, "the residual stream keeps the input's dtype"
        out.float().square().mean().backward()
        optimizer.step()
        results[backend] = (out.detach(), x.grad, [p.detach().clone() for p in block.parameters()])
    ref, fused = results["reference"], results["triton"]
    assert_close(fused[0], ref[0], **LOW_PRECISION[torch.bfloat16], name="autocast output")
    relative = ((fused[1] - ref[1]).norm() / ref[1].norm()).item()
    assert relative < 1e-2, f"grad x relative L2 {relative:.3g}"
    for a, b in zip(fused[2], ref[2]):
        assert_close(a, b, atol=1e-3, rtol=1e-3, name="parameters after an SGD step")


def test_state_dict_is_backend_independent():
    model = mod_models.resnet18_mod(num_classes=10, backend="reference")
    keys = list(model.state_dict())
    mod_models.set_backend(model, "triton")
    assert list(model.state_dict()) == keys
    other = mod_models.resnet18_mod(num_classes=10, backend="triton")
    other.load_state_dict(model.state_dict())


# ------------------------------------------------------------------------------------------------
# Whole models
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", ["resnet18_mod", "resnet50_mod", "mobilenet_v2_mod"])
def test_model_backends_agree(name, fmt):
    """Whole models: outputs, every MoD block's selection, and every gradient.

    BatchNorm runs on its (randomised) running statistics here. In train mode at test sizes the
    last stages normalise 2 samples x 1x1 maps, which amplifies fp32 rounding without bound (the
    fp32 reference disagrees with itself run in float64 there); train-mode equivalence is held
    at the block level above, on well-conditioned shapes."""
    model = randomise(mod_models.build_model(name, num_classes=10)).to(DEVICE).eval()
    memory_format = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    x = feature_map(2, 3, 32, 32, fmt)
    assert_backends_agree(model, x, label=name)
    with torch.no_grad():
        ref = mod_models.set_backend(copy.deepcopy(model), "reference")(x)
        fused = mod_models.set_backend(model, "triton")(x)
    assert_close(fused, ref, **FP32_OUT, name=f"{name} no-grad output")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_model_selections_are_top_k_up_to_near_ties(dtype):
    model = randomise(mod_models.build_model("resnet18_mod", num_classes=10)).to(DEVICE, dtype).eval()
    model = model.to(memory_format=torch.channels_last)
    assert_teacher_forced_agreement(model, feature_map(2, 3, 32, 32, "channels_last", dtype=dtype),
                                    f"resnet18_mod {dtype}")


@gpu_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["resnet50_mod", "mobilenet_v2_mod"])
def test_model_backends_agree_on_gpu_at_224(name, dtype):
    model = randomise(mod_models.build_model(name)).to(DEVICE, dtype).to(memory_format=torch.channels_last).eval()
    x = feature_map(8, 3, 224, 224, "channels_last", dtype=dtype)
    assert_teacher_forced_agreement(model, x, f"{name} {dtype}")


# ------------------------------------------------------------------------------------------------
# Determinism, safety, errors
# ------------------------------------------------------------------------------------------------


def test_two_runs_are_bitwise_equal():
    block = randomise(mod_models.MoDBottleneck(96, capacity=8, fusion="original", backend="triton")).to(DEVICE)
    x = feature_map(3, 96, 7, 7)
    results = []
    for _ in range(2):
        block.zero_grad()
        xi = x.clone().requires_grad_(True)
        out = block(xi)
        out.backward(torch.ones_like(out))
        results.append([out.detach(), xi.grad] + [p.grad.clone() for p in block.parameters()])
    for a, b in zip(*results):
        assert torch.equal(a, b)


def _slot_for(idx, channels):
    batch, k = idx.shape
    slot = torch.full((batch, channels), -1, dtype=torch.int32, device=idx.device)
    return slot.scatter_(1, idx, torch.arange(k, dtype=torch.int32, device=idx.device).expand(batch, k).contiguous())


def test_launchers_reject_bad_arguments():
    x = feature_map(2, 48, 3, 3)
    y = feature_map(2, 4, 3, 3)
    w = torch.rand(2, 4, device=DEVICE)
    idx = torch.stack([torch.randperm(48, device=DEVICE)[:4] for _ in range(2)])
    slot = _slot_for(idx, 48)
    fc1, fc2 = torch.randn(3, 48, device=DEVICE), torch.randn(48, 3, device=DEVICE)
    fuse = mod_kernels.scale_fuse
    cases = [
        (TypeError, "dtype", lambda: fuse(x, y, w.double(), idx, slot)),
        (TypeError, "dtype", lambda: fuse(x, y, w, idx.int(), slot)),
        (ValueError, "shape", lambda: fuse(x, feature_map(2, 5, 3, 3), w, idx, slot)),
        (ValueError, "shape", lambda: fuse(x, feature_map(2, 4, 3, 4), w, idx, slot)),
        (ValueError, "shape", lambda: fuse(x[0], y, w, idx, slot)),
        (TypeError, "float32, float16 and bfloat16", lambda: fuse(x.double(), y, w, idx, slot)),
        (ValueError, "fusion", lambda: fuse(x, y, w, idx, slot, fusion="middle")),
        (ValueError, "activation", lambda: fuse(x, y, w, idx, slot, activation="gelu")),
        (ValueError, "device", lambda: fuse(x, y, w.to("meta"), idx, slot)),
        (ValueError, "k must satisfy", lambda: mod_kernels.route_pack(x, 49, fc1_weight=fc1, fc2_weight=fc2)),
        (ValueError, "k must satisfy", lambda: mod_kernels.route_pack(x, 0, fc1_weight=fc1, fc2_weight=fc2)),
        (ValueError, "fc2_weight", lambda: mod_kernels.route_pack(x, 4, fc1_weight=fc1, fc2_weight=fc1)),
        (ValueError, "either both", lambda: mod_kernels.route_pack(x, 4, fc1_weight=fc1)),
        (ValueError, "either both", lambda: mod_kernels.route_pack(x, 4, fc1_weight=fc1, fc2_weight=fc2, scores=w)),
        (TypeError, "dtype", lambda: mod_kernels.route_pack(x, 4, scores=torch.rand(2, 48, device=DEVICE).double())),
        (ValueError, "shape", lambda: mod_kernels.route_pack(x, 4, scores=torch.rand(2, 47, device=DEVICE))),
        (TypeError, "float32, float16 and bfloat16", lambda: mod_kernels.route_pack(x.int(), 4, scores=w)),
    ]
    for error, words, call in cases:
        with pytest.raises(error, match=words):
            call()
    with pytest.raises(ValueError, match="contiguous"):
        with torch.no_grad():
            fuse(torch.randn(2, 48, 1, 1, device=DEVICE).expand(2, 48, 3, 3), y, w, idx, slot, inplace=True)


@pytest.mark.skipif(ON_GPU, reason="checks the CPU error raised without the interpreter")
def test_triton_on_cpu_without_interpreter_raises_clearly():
    code = (
        "import torch, mod_models\n"
        "block = mod_models.MoDBottleneck(64, capacity=8, backend='triton')\n"
        "try:\n"
        "    block(torch.randn(1, 64, 4, 4))\n"
        "except RuntimeError as e:\n"
        "    print('ERR', e)\n"
        "auto = mod_models.MoDBottleneck(64, capacity=8, backend='auto')\n"
        "print('AUTO', tuple(auto(torch.randn(1, 64, 4, 4)).shape))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "ERR backend 'triton' got a CPU tensor" in result.stdout and "TRITON_INTERPRET=1" in result.stdout
    assert "AUTO (1, 64, 4, 4)" in result.stdout


# ------------------------------------------------------------------------------------------------
# torch.library registration: opcheck, torch.compile, CUDA graphs
# ------------------------------------------------------------------------------------------------


def test_opcheck_every_op():
    """Schema, fake tensors and (where registered) autograd of every mod_kernels op. The routing ops
    are forward-only ops whose autograd lives in RoutePackFunction, so they get plain inputs."""
    from torch.library import opcheck

    ops = torch.ops.mod_kernels
    x = feature_map(2, 48, 3, 5, "channels_last")
    fc1 = torch.randn(3, 48, device=DEVICE)
    fc2 = torch.randn(48, 3, device=DEVICE)
    opcheck(ops.route_pack.default, (x, fc1, fc2, 4))
    opcheck(ops.select_pack.default, (x, torch.rand(2, 48, device=DEVICE), 4))
    xs, idx, w, slot, pooled, hidden, scores = ops.route_pack(x, fc1, fc2, 4)
    opcheck(ops.router_backward.default, (torch.randn(2, 4, device=DEVICE), slot, pooled, hidden, scores, fc1, fc2, 15))
    grad_xs = torch.randn_like(xs)
    for fusion in FUSIONS:
        target = None if fusion == "original" else torch.randn_like(xs)
        opcheck(ops.input_backward.default, (torch.randn_like(x), target, grad_xs, slot, pooled, list(x.shape),
                                              x.dtype, True, fusion))
        for relu in (True, False):
            y = torch.randn_like(xs).requires_grad_(True)
            w_leaf = w.clone().requires_grad_(True)
            x_leaf = x.clone().requires_grad_(True)
            opcheck(ops.scale_fuse.default, (x_leaf, y, w_leaf, idx, slot, fusion, relu))
            opcheck(ops.scale_fuse_.default, (x.clone(), y.detach(), w, idx, slot, fusion, relu))
            out = ops.scale_fuse(x, y.detach(), w, idx, slot, fusion, relu)
            opcheck(ops.scale_fuse_backward_slots.default, (torch.randn_like(x), out, y.detach(), w, idx, fusion, relu,
                                                            x.dtype))
        opcheck(ops.scale_fuse_backward_input.default, (torch.randn_like(x), out, slot, 4, fusion))


@pytest.mark.parametrize("fusion", ["original", "last_k"])
def test_torch_compile_fullgraph_forward_and_backward(fusion):
    """fullgraph compile through both autograd functions ("last_k": the target carrier is a view of x)."""
    block = randomise(mod_models.MoDBottleneck(96, capacity=16, fusion=fusion, backend="triton")).to(DEVICE)
    compiled = torch.compile(copy.deepcopy(block), fullgraph=True)
    x = feature_map(2, 96, 5, 5)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    eager_out, compiled_out = block(x1), compiled(x2)
    assert_close(compiled_out, eager_out, **FP32_OUT, name="compiled output")
    eager_out.sum().backward()
    compiled_out.sum().backward()
    assert_close(x2.grad, x1.grad, **FP32_GRAD, name="compiled grad x")
    eager_params = dict(block.named_parameters())
    for name, p in compiled.named_parameters():
        assert_close(p.grad, eager_params[name.removeprefix("_orig_mod.")].grad, **FP32_GRAD, name=f"compiled {name}")
    compiled.eval()
    block.eval()
    with torch.no_grad():
        assert_close(compiled(x.clone()), block(x.clone()), **FP32_OUT, name="compiled in-place inference")


@gpu_only
def test_cuda_graph_captures_the_fused_forward():
    model = mod_models.resnet50_mod(backend="triton").to(DEVICE).eval().to(memory_format=torch.channels_last)
    static_x = feature_map(4, 3, 224, 224, "channels_last")
    with torch.no_grad():
        expected = model(static_x.clone())
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                model(static_x)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = model(static_x)
    graph.replay()
    torch.cuda.synchronize()
    assert_close(static_out, expected, **FP32_OUT, name="graph replay")


# ----------------------------------------------------------------------------------------------
# The deploy form (on a GPU: the fused block's kernels compiled; here: under the interpreter)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("name", list(BLOCKS))
def test_deployed_block_equals_the_unfolded_reference(name, fusion):
    block = randomise(BLOCKS[name](96, capacity=16, fusion=fusion)).to(DEVICE).eval()
    reference = mod_models.set_backend(copy.deepcopy(block), "reference")
    deployed = mod_models.set_backend(mod_models.optimize_for_inference(copy.deepcopy(block)), "triton")
    x = feature_map(2, 96, 5, 7, "channels_last")
    deployed.record_selection = reference.record_selection = True
    with torch.no_grad():
        expected = reference(x.clone())
        written = x.clone()
        out = deployed(written)
    assert torch.equal(deployed.last_selection, reference.last_selection)
    assert out.stride() == x.stride() and (out.data_ptr() == written.data_ptr()) == (fusion != "original")
    assert_close(out, expected, **FP32_OUT, name=f"deployed {name} {fusion}")


@gpu_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["resnet50_mod", "resnet75_mod", "mobilenet_v2_mod"])
def test_deployed_model_on_gpu_at_224(name, dtype):
    """The deploy form at the real stage shapes, every fused kernel compiled: the deployed model's
    selections forced on the unfolded reference reproduce its logits."""
    model = randomise(mod_models.build_model(name)).to(DEVICE, dtype).to(memory_format=torch.channels_last).eval()
    x = feature_map(8, 3, 224, 224, "channels_last", dtype=dtype)
    reference = copy.deepcopy(model)
    deployed = mod_models.optimize_for_inference(model)
    assert_teacher_forced_agreement(deployed, x, f"{name} {dtype} deployed", reference=reference)
