"""The deploy form: folded batch norms, in-place fusion, and the fused three-launch MoD block.

The fused block (triton backend, under Triton's interpreter on a CPU) is compared with the model
*before* ``optimize_for_inference`` (unfolded batch norms, reference backend): the folding, the
kernel's fp32 arithmetic and its selection all have to agree with the method as first written.

* fp32: outputs within 1e-5 (folding a batch norm and reordering sums move results by ulps).
* fp16/bf16: the reference rounds after every convolution and batch norm, the fused kernel only
  once at the end, so both are compared with a float64 run of the same model under the same
  selection: the fused error may be at most twice the reference's own (plus one ulp).
* Selections exactly (random inputs keep score gaps far above rounding), and NaN positions exactly.
* New tensors the launcher allocates are poisoned (NaN, -1) first, so an element the kernels fail
  to write shows up as a mismatch.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from helpers import assert_close, assert_teacher_forced_agreement, randomise_norms
from torch import nn

import mod_kernels
import mod_models
from bench.launches import LaunchCounter, count_launches
from mod_kernels import fused_block as FB

# The CPU interpreter suite: its tensors are CPU tensors, which the triton backend takes only under
# Triton's interpreter (tests/conftest.py switches it on where there is no GPU). On a GPU machine
# tests/test_kernels.py runs the kernels compiled, the deployed block included.
pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(), reason="CPU interpreter suite (CUDA machine: see test_kernels.py)"
)

FUSIONS = ("first_k", "last_k", "original")
FORMATS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
EPS = {torch.float16: 2**-10, torch.bfloat16: 2**-7}
BLOCKS = {
    "bottleneck": lambda c, **kw: mod_models.MoDBottleneck(c, **kw),
    "basic": lambda c, **kw: mod_models.MoDBasicBlock(c, **kw),
    "inverted": lambda c, **kw: mod_models.MoDInvertedResidual(c, **kw),
}
# (kind, C, capacity): k not a power of two, and the widths' extremes the fused kernel takes.
MID_SHAPES = {"bottleneck": (48, 4), "basic": (20, 4), "inverted": (24, 4)}  # k = 12, 5, 6
EXTREME_SHAPES = [
    ("bottleneck", 32, 32), ("bottleneck", 32, 1),  # k = 1 (width 1), k = 32 (width 8)
    ("basic", 16, 16), ("basic", 16, 1),  # k = 1, k = 16
    ("inverted", 20, 20), ("inverted", 32, 1),  # k = 1 (hidden 6), k = 32 (hidden 192)
]


@pytest.fixture(autouse=True)
def poisoned_allocations(monkeypatch):
    """Every tensor the fused launcher allocates starts as NaN (floats) or -1 (integers)."""
    def poison(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-1)

    monkeypatch.setattr(FB, "_empty", lambda *a, **kw: poison(torch.empty(*a, **kw)))
    monkeypatch.setattr(FB, "_empty_like_format",
                        lambda *a, **kw: poison(mod_kernels._utils.empty_like_format(*a, **kw)))


@pytest.fixture
def unpoisoned(poisoned_allocations, monkeypatch):
    """Plain allocations (for launch counts: poisoning is itself a launch)."""
    monkeypatch.undo()


def randomise(module: nn.Module, seed: int = 1) -> nn.Module:
    # Biases of both signs and some size: a folded bias that leaks into a convolution's zero padding
    # (relu(b) where 0 belongs) must show.
    return randomise_norms(module, seed, bias_scale=0.5)


def deployed_pair(block: nn.Module) -> tuple[nn.Module, nn.Module]:
    """``(unfolded reference, deployed triton)`` copies of ``block`` (eval mode)."""
    block = block.eval()
    reference = mod_models.set_backend(copy.deepcopy(block), "reference") if _has_mod(block) else copy.deepcopy(block)
    deployed = mod_models.optimize_for_inference(copy.deepcopy(block))
    if _has_mod(deployed):
        mod_models.set_backend(deployed, "triton")
    return reference, deployed


def _has_mod(model: nn.Module) -> bool:
    return any(isinstance(m, mod_models.MoDBlock) for m in model.modules())


def run_block(block: nn.Module, x: torch.Tensor, seed: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """``(output, selection)`` of one forward under ``no_grad`` on a copy of ``x``."""
    block.record_selection = True
    torch.manual_seed(seed)  # the random router's keys
    with torch.no_grad():
        out = block(x.clone(memory_format=torch.preserve_format))
    return out, block.last_selection


def assert_deploy_matches(reference: nn.Module, deployed: nn.Module, x: torch.Tensor, label: str) -> None:
    ref_out, ref_selection = run_block(reference, x)
    out, selection = run_block(deployed, x)
    assert torch.equal(selection, ref_selection), f"{label}: selections differ"
    assert out.dtype == x.dtype and out.stride() == x.stride(), f"{label}: dtype/layout changed"
    assert torch.equal(torch.isnan(out), torch.isnan(ref_out)), f"{label}: NaN positions differ"
    if x.dtype == torch.float32:
        assert_close(out, ref_out, atol=1e-5, rtol=1e-5, name=label)
        return
    exact = copy.deepcopy(reference).double()
    exact.forced_selection = selection
    exact_out, _ = run_block(exact, x.double())
    fused_error = (out.double() - exact_out).abs().nan_to_num()
    reference_error = (ref_out.double() - exact_out).abs().nan_to_num()
    bound = 2 * reference_error.max() + EPS[x.dtype] * exact_out.abs().nan_to_num()
    worst = float((fused_error - bound).max())
    assert worst <= 0, (
        f"{label}: fused error {float(fused_error.max()):.3g} beyond twice the reference's "
        f"{float(reference_error.max()):.3g}"
    )


# ----------------------------------------------------------------------------------------------
# Folding
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("build", [
    lambda: torchvision.models.resnet18(num_classes=10),
    lambda: torchvision.models.mobilenet_v2(num_classes=10),
    lambda: mod_models.resnet50_mod(num_classes=10, backend="reference"),
    lambda: mod_models.mobilenet_v2_mod(num_classes=10, backend="reference"),
], ids=["resnet18", "mobilenet_v2", "resnet50_mod", "mobilenet_v2_mod"])
def test_folding_keeps_the_output_and_removes_every_batch_norm(build):
    model = randomise(build()).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    mod_models.fold_batch_norms(model)
    assert not [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(m.bias is not None for m in convs)
    with torch.no_grad():
        assert_close(model(x), expected, atol=1e-4, rtol=1e-4, name="folded model output")


def test_fold_conv_bn_matches_the_formula_and_frozen_batch_norm():
    conv = nn.Conv2d(3, 4, 3, bias=True)
    norm = randomise(nn.BatchNorm2d(4)).eval()
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        expected = norm(conv(x))
        scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
        weight = conv.weight * scale[:, None, None, None]
        bias = (conv.bias - norm.running_mean) * scale + norm.bias
    mod_models.deploy.fold_conv_bn(conv, norm)
    assert_close(conv.weight, weight, atol=1e-6, rtol=1e-6, name="folded weight")
    assert_close(conv.bias, bias, atol=1e-6, rtol=1e-6, name="folded bias")
    with torch.no_grad():
        assert_close(conv(x), expected, atol=1e-5, rtol=1e-5, name="folded conv")
    frozen_model = nn.Sequential(nn.Conv2d(3, 4, 1, bias=False), torchvision.ops.misc.FrozenBatchNorm2d(4)).eval()
    frozen_model[1].running_var.fill_(2.0)
    with torch.no_grad():
        expected = frozen_model(x)
        mod_models.fold_batch_norms(frozen_model)
        assert isinstance(frozen_model[1], nn.Identity)
        assert_close(frozen_model(x), expected, atol=1e-6, rtol=1e-6, name="frozen batch norm folded")


def test_folding_refuses_what_it_cannot_fold():
    with pytest.raises(ValueError, match="eval mode"):
        mod_models.fold_batch_norms(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)))
    odd = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.BatchNorm2d(4)).eval()
    with pytest.raises(ValueError, match=r"2 \(BatchNorm2d\) does not directly follow a convolution"):
        mod_models.fold_batch_norms(odd)
    assert isinstance(odd[2], nn.BatchNorm2d), "a refused fold must change nothing"
    batch_stats = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, track_running_stats=False)).eval()
    with pytest.raises(ValueError, match="without running statistics"):
        mod_models.fold_batch_norms(batch_stats)
    with pytest.raises(TypeError, match="takes an nn.Module"):
        mod_models.optimize_for_inference("resnet50")


@pytest.mark.parametrize("fold", [mod_models.fold_batch_norms, mod_models.optimize_for_inference],
                         ids=["fold_batch_norms", "optimize_for_inference"])
def test_a_norm_that_cannot_fold_mid_model_names_itself_and_changes_nothing(fold):
    """A batch norm without running statistics in the middle of a model: the error names it, and
    no norm before it (in module order) has been folded."""
    model = randomise(mod_models.resnet18_mod(num_classes=10, backend="reference"))
    model.layer2[0].bn2 = nn.BatchNorm2d(128, track_running_stats=False)
    model.eval()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    kinds = [(name, type(module)) for name, module in model.named_modules()]
    with pytest.raises(ValueError, match=r"layer2\.0\.bn2 \(BatchNorm2d\).*running statistics"):
        fold(model)
    assert [(name, type(module)) for name, module in model.named_modules()] == kinds, "modules were replaced"
    after = model.state_dict()
    assert list(after) == list(before), "state_dict keys changed"
    assert all(torch.equal(after[name], before[name]) for name in before), "a tensor changed"
    assert not mod_models.is_deployed(model)
    assert not any(m.deployed or m.inplace for m in model.modules() if isinstance(m, mod_models.MoDBlock))


# ----------------------------------------------------------------------------------------------
# The deploy form's contract
# ----------------------------------------------------------------------------------------------


def test_optimize_for_inference_freezes_and_refuses_training_and_autograd():
    model = randomise(mod_models.resnet18_mod(num_classes=10, backend="reference")).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    with pytest.raises(ValueError, match="eval mode"):
        mod_models.optimize_for_inference(copy.deepcopy(model).train())
    assert mod_models.optimize_for_inference(model) is model and mod_models.is_deployed(model)
    assert not any(p.requires_grad for p in model.parameters())
    blocks = [m for m in model.modules() if isinstance(m, mod_models.MoDBlock)]
    assert blocks and all(b.deployed and b.inplace for b in blocks)
    assert mod_models.optimize_for_inference(model) is model  # idempotent
    with torch.no_grad():
        assert_close(model(x), expected, atol=1e-4, rtol=1e-4, name="deployed reference model")
    assert_close(model(x), expected, atol=1e-4, rtol=1e-4, name="grad mode, nothing requires grad")
    with pytest.raises(RuntimeError, match="does not support autograd"):
        model(x.requires_grad_())
    model.train()
    with pytest.raises(RuntimeError, match="inference only"):
        with torch.no_grad():
            model(torch.randn(2, 3, 32, 32))
    block = blocks[0]
    with pytest.raises(RuntimeError, match="inference only"):
        block(torch.randn(2, block.channels, 4, 4))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_deployed_block_writes_only_the_targets_of_its_input(backend):
    block = randomise(mod_models.MoDBottleneck(64, capacity=8)).eval()
    reference, deployed = deployed_pair(block)
    mod_models.set_backend(deployed, backend)
    x = torch.randn(2, 64, 5, 6)
    with torch.no_grad():
        expected = reference(x.clone())
        written = x.clone()
        version = written._version
        out = deployed(written)
    assert out.data_ptr() == written.data_ptr() and written._version > version
    assert torch.equal(out[:, 8:], x[:, 8:]), "only the k = 8 target channels may change"
    assert_close(out, expected, atol=1e-5, rtol=1e-5, name="in-place deployed block")
    with torch.inference_mode():
        frozen = x.clone()
    with torch.no_grad():
        copied = deployed(frozen)  # an inference tensor outside inference mode is never written
    assert torch.equal(frozen, x) and copied.data_ptr() != frozen.data_ptr()
    assert_close(copied, expected, atol=1e-5, rtol=1e-5, name="inference tensor, out of place")


@pytest.mark.parametrize("backend, channels, capacity", [
    ("triton", 24, 4), ("reference", 24, 4), ("native", 24, 4),
    ("triton", 40, 2),  # k = 20 > 16: outside the fused kernel (routing kernels, convolutions, fusion kernel)
], ids=["triton-fused", "reference", "native", "triton-fallback"])
def test_original_fusion_returns_a_new_tensor_and_keeps_its_input(backend, channels, capacity):
    """The documented behaviour of a deployed block with "original" fusion, on every path."""
    block = randomise(mod_models.MoDBasicBlock(channels, capacity=capacity, fusion="original"))
    reference, deployed = deployed_pair(block)
    mod_models.set_backend(deployed, backend)
    if backend == "triton":
        assert deployed.deploy_plan().fused == (capacity == 4)
    if backend == "native":
        assert deployed.deploy_plan().native, deployed.deploy_plan().reason
    x = torch.randn(2, channels, 4, 5)
    kept = x.clone()
    with torch.no_grad():
        out = deployed(x)
        expected = reference(kept.clone())
    assert torch.equal(x, kept) and out.data_ptr() != x.data_ptr(), f"{backend}: the input was written"
    assert_close(out, expected, atol=1e-5, rtol=1e-5, name=f"original fusion, {backend}")


# ----------------------------------------------------------------------------------------------
# Changing a deployed model's weights: one copy, which both backends compute from
# ----------------------------------------------------------------------------------------------

# A folded convolution of f_k and the norm folded into it: scaling the folded weight equals scaling
# the unfolded convolution's weight, and adding to the folded bias equals adding to the norm's bias.
EDITED = {"bottleneck": ("conv2", "bn2"), "basic": ("conv1", "bn1"), "inverted": ("conv.1.0", "conv.1.1")}


def _edit_unfolded(reference: nn.Module, kind: str) -> None:
    conv_name, norm_name = EDITED[kind]
    with torch.no_grad():
        reference.get_submodule(conv_name).weight.mul_(2)
        reference.get_submodule(norm_name).bias.add_(0.25)
        reference.router.fc2.weight.mul_(-1)


@pytest.mark.parametrize("backend", ["triton", "reference", "native"])
@pytest.mark.parametrize("kind", list(BLOCKS))
def test_weights_changed_in_place_after_a_forward_are_used(kind, backend):
    """``.data`` edits of the folded weights and of the router after the deployed block has run: the
    deployed block equals the unfolded block with the same edits, on both backends."""
    channels, capacity = MID_SHAPES[kind]
    reference, deployed = deployed_pair(randomise(BLOCKS[kind](channels, capacity=capacity)))
    mod_models.set_backend(deployed, backend)
    x = torch.randn(2, channels, 4, 5)
    assert_deploy_matches(reference, deployed, x, f"{kind} {backend} before the edit")
    conv = deployed.get_submodule(EDITED[kind][0])
    conv.weight.data.mul_(2)
    conv.bias.data.add_(0.25)
    deployed.router.fc2.weight.data.mul_(-1)
    _edit_unfolded(reference, kind)
    assert_deploy_matches(reference, deployed, x, f"{kind} {backend} after the edit")


@pytest.mark.parametrize("backend", ["triton", "reference", "native"])
def test_a_new_weight_at_an_old_weights_address_is_used(backend):
    """A new tensor where the old weight was (its address reused; here deterministically: the same
    memory, a tensor with a fresh version counter), written without a version bump and assigned."""
    reference, deployed = deployed_pair(randomise(mod_models.MoDBottleneck(48, capacity=4)))
    mod_models.set_backend(deployed, backend)
    x = torch.randn(2, 48, 4, 5)
    assert_deploy_matches(reference, deployed, x, f"{backend} before")
    old = deployed.conv2.weight
    new = torch.from_numpy(old.detach().numpy())
    assert new.data_ptr() == old.data_ptr() and new._version == 0
    new.numpy()[...] *= 2
    deployed.conv2.weight = nn.Parameter(new, requires_grad=False)
    with torch.no_grad():
        reference.conv2.weight.mul_(2)
    assert_deploy_matches(reference, deployed, x, f"{backend} after")
    # Assignment copies into the block's one copy of the weights (any tensor of the right shape).
    deployed.conv2.weight = reference.conv2.weight.detach() * 0  # a zero folded weight: f_k's 3x3 output is its bias
    with torch.no_grad():
        reference.conv2.weight.zero_()
    assert_deploy_matches(reference, deployed, x, f"{backend} after assigning zeros")
    with pytest.raises(ValueError, match=r"has shape \(3, 3, 3, 3\); got a tensor of shape \(2, 3, 3, 3\)"):
        deployed.conv2.weight = torch.zeros(2, 3, 3, 3)


@pytest.mark.parametrize("backend", ["triton", "reference", "native"])
def test_load_state_dict_into_a_compiled_deployed_block_is_used(backend):
    """``load_state_dict`` into a deployed block that ``torch.compile`` has already run: the compiled
    forward computes with the loaded weights. (The reference backend's graph is traced by Dynamo and
    AOTAutograd, where a captured copy would go stale, but not compiled by Inductor, to keep the CPU
    suite short.)"""
    _, deployed = deployed_pair(randomise(mod_models.MoDBottleneck(48, capacity=4), seed=1))
    other_reference, other = deployed_pair(randomise(mod_models.MoDBottleneck(48, capacity=4), seed=2))
    mod_models.set_backend(deployed, backend)
    compiled = torch.compile(deployed, fullgraph=True, backend="inductor" if backend == "triton" else "aot_eager")
    x = torch.randn(2, 48, 4, 4)
    with torch.no_grad():
        compiled(x.clone())
        deployed.load_state_dict(other.state_dict())
        got = compiled(x.clone())
        expected = other_reference(x.clone())
    assert_close(got, expected, atol=1e-5, rtol=1e-5, name="compiled deployed block after load_state_dict")


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_packed_weights_replaced_after_a_forward_are_used(backend):
    """The native path keeps its views of ``packed_weights`` between calls; a new packed tensor
    (``.data`` rebound, a new parameter, the same memory written in place) must reach it."""
    reference, deployed = deployed_pair(randomise(mod_models.MoDBottleneck(48, capacity=4)))
    mod_models.set_backend(deployed, backend)
    x = torch.randn(2, 48, 4, 5)
    assert_deploy_matches(reference, deployed, x, f"{backend} before")
    with torch.no_grad():
        reference.conv2.weight.mul_(2)
    conv2 = deployed.conv2
    doubled = deployed.packed_weights.detach().clone()
    doubled[conv2.offset:conv2.offset + conv2.weight_numel] *= 2
    deployed.packed_weights.data = doubled
    assert_deploy_matches(reference, deployed, x, f"{backend} after rebinding .data")
    with torch.no_grad():
        reference.conv2.weight.mul_(2)
    doubled = deployed.packed_weights.detach().clone()
    doubled[conv2.offset:conv2.offset + conv2.weight_numel] *= 2
    deployed.packed_weights = nn.Parameter(doubled, requires_grad=False)
    assert_deploy_matches(reference, deployed, x, f"{backend} after a new parameter")
    with torch.no_grad():
        reference.conv2.weight.mul_(-1)
        deployed.packed_weights[conv2.offset:conv2.offset + conv2.weight_numel].mul_(-1)
    assert_deploy_matches(reference, deployed, x, f"{backend} after an in-place edit")


@pytest.mark.parametrize("kind", list(BLOCKS))
def test_deploy_form_state_dict_keys_and_loading(kind):
    """A packed block's state dict: ``packed_weights`` in place of f_k's folded convolutions. It loads
    into a deployed block of the same variant, as does the per-convolution form; a trained (unfolded)
    state dict does not (keep the trained checkpoint and deploy again)."""
    channels, capacity = MID_SHAPES[kind]
    reference, deployed = deployed_pair(randomise(BLOCKS[kind](channels, capacity=capacity), seed=3))
    keys = list(deployed.state_dict())
    assert sorted(keys) == ["packed_weights", "router.fc1.weight", "router.fc2.weight"], keys
    assert [name for name, _ in deployed.named_parameters()] == keys
    packed = deployed.packed_weights
    convs = deployed.folded_convs()
    assert packed.numel() == sum(c.weight.numel() + c.out_channels for c in convs)
    assert all(c.weight.untyped_storage().data_ptr() == packed.untyped_storage().data_ptr() for c in convs)
    x = torch.randn(2, channels, 4, 5)
    expected, _ = run_block(reference, x)
    fresh = BLOCKS[kind](channels, capacity=capacity).eval()
    with pytest.raises(RuntimeError, match="packed_weights"):
        mod_models.optimize_for_inference(copy.deepcopy(fresh)).load_state_dict(reference.state_dict())
    per_conv = {f"{name}.{part}": getattr(module, part).clone() for name, module in deployed.named_modules()
                if module in convs for part in ("weight", "bias")}
    per_conv.update({k: v for k, v in deployed.state_dict().items() if k.startswith("router.")})
    for state in (deployed.state_dict(), per_conv):
        for backend in ("triton", "reference"):
            loaded = mod_models.set_backend(mod_models.optimize_for_inference(copy.deepcopy(fresh)), backend)
            loaded.load_state_dict(state)
            out, _ = run_block(loaded, x)
            assert_close(out, expected, atol=1e-5, rtol=1e-5, name=f"loaded {kind}, {backend}")


# ----------------------------------------------------------------------------------------------
# Equivalence of the fused block
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("kind", list(BLOCKS))
def test_fused_block_equals_the_unfolded_reference(kind, fusion, fmt, dtype):
    channels, capacity = MID_SHAPES[kind]
    block = randomise(BLOCKS[kind](channels, capacity=capacity, fusion=fusion)).to(dtype)
    reference, deployed = deployed_pair(block)
    assert deployed.deploy_plan().fused
    x = torch.randn(2, channels, 5, 7).to(dtype).contiguous(memory_format=FORMATS[fmt])
    assert_deploy_matches(reference, deployed, x, f"{kind} {fusion} {fmt} {dtype}")


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize(
    "kind, channels, capacity", EXTREME_SHAPES, ids=[f"{k}-C{c}-cap{p}" for k, c, p in EXTREME_SHAPES]
)
def test_fused_block_at_the_extreme_widths(kind, channels, capacity, fusion):
    block = randomise(BLOCKS[kind](channels, capacity=capacity, fusion=fusion))
    reference, deployed = deployed_pair(block)
    assert deployed.deploy_plan().fused, deployed.deploy_plan().reason
    for fmt in FORMATS.values():
        x = torch.randn(3, channels, 3, 5).contiguous(memory_format=fmt)
        assert_deploy_matches(reference, deployed, x, f"{kind} C={channels} k={deployed.k} {fusion}")


@pytest.mark.parametrize("dilation", [2, 3])
@pytest.mark.parametrize("kind", ["bottleneck", "basic"])
def test_fused_block_with_dilation(kind, dilation):
    block = randomise(BLOCKS[kind](40, capacity=8, dilation=dilation))
    reference, deployed = deployed_pair(block)
    x = torch.randn(2, 40, 7, 6).contiguous(memory_format=torch.channels_last)
    assert_deploy_matches(reference, deployed, x, f"{kind} dilation {dilation}")


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("kind", list(BLOCKS))
def test_fused_block_random_router(kind, fusion):
    channels, capacity = MID_SHAPES[kind]
    reference, deployed = deployed_pair(
        randomise(BLOCKS[kind](channels, capacity=capacity, fusion=fusion, router="random")))
    assert_deploy_matches(reference, deployed, torch.randn(2, channels, 4, 3), f"{kind} random {fusion}")


def test_fused_block_without_expansion():
    block = randomise(mod_models.MoDInvertedResidual(24, capacity=4, expand_ratio=1))
    reference, deployed = deployed_pair(block)
    assert_deploy_matches(reference, deployed, torch.randn(2, 24, 5, 4), "inverted residual, expand_ratio 1")


@pytest.mark.parametrize("poison", ["nan", "inf", "huge", "nan_channel"])
@pytest.mark.parametrize("kind", list(BLOCKS))
def test_fused_block_nan_and_inf_like_the_reference(kind, poison):
    channels, capacity = MID_SHAPES[kind]
    reference, deployed = deployed_pair(randomise(BLOCKS[kind](channels, capacity=capacity)))
    x = torch.randn(2, channels, 4, 5)
    if poison == "nan":
        x[0, 2, 1, 1] = float("nan")
    elif poison == "inf":
        x[1, 0, 0, 0] = float("inf")
    elif poison == "huge":
        x = x * 1e38
    else:
        x[:, -1] = float("nan")
    ref_out, ref_selection = run_block(reference, x)
    out, selection = run_block(deployed, x)
    assert torch.equal(selection, ref_selection), "selections differ"
    assert torch.equal(torch.isnan(out), torch.isnan(ref_out)), (
        f"NaN positions differ: {int(torch.isnan(out).sum())} fused, {int(torch.isnan(ref_out).sum())} reference"
    )
    if poison in ("nan", "inf", "nan_channel"):
        assert_close(out, ref_out, atol=1e-5, rtol=1e-5, name=f"{poison} output")


def test_fused_block_on_a_strided_view():
    reference, deployed = deployed_pair(randomise(mod_models.MoDBottleneck(48, capacity=4)))
    base = torch.randn(2, 48, 6, 12)
    x = base[..., :9]  # H x W is not flat: stride_h != W * stride_w
    assert x.stride(2) != x.shape[3] * x.stride(3)
    ref_out, _ = run_block(reference, x)
    with torch.no_grad():
        out = deployed(x)
    assert out.data_ptr() != x.data_ptr(), "a non-dense view is never written in place"
    assert_close(out, ref_out, atol=1e-5, rtol=1e-5, name="strided view")


@pytest.mark.parametrize("fusion", ["first_k", "original"])  # in place (snapshot programs) and a new tensor
def test_fused_block_at_a_batch_of_several_router_tiles(fusion):
    """B = 40: the pooling and router kernels tile the batch by ROUTER_BLOCK_B = 16 samples (three
    tiles, the last one partial); every sample must get its own scores, selection and output."""
    assert FB.ROUTER_BLOCK_B == 16
    reference, deployed = deployed_pair(randomise(mod_models.MoDBottleneck(32, capacity=4, fusion=fusion)))
    x = torch.randn(40, 32, 2, 3)
    assert_deploy_matches(reference, deployed, x, f"batch 40, {fusion}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", list(BLOCKS))
def test_reference_deploy_in_low_precision(kind, dtype):
    """The deploy form on the reference backend in fp16/bf16: every tensor stays in the model's dtype,
    and the error against float64 (same selection) is at most twice the unfolded block's own."""
    channels, capacity = MID_SHAPES[kind]
    block = randomise(BLOCKS[kind](channels, capacity=capacity, fusion="last_k")).to(dtype)
    reference, deployed = deployed_pair(block)
    mod_models.set_backend(deployed, "reference")
    dtypes = {name: t.dtype for name, t in [*deployed.named_parameters(), *deployed.named_buffers()]}
    assert dtypes.pop("router.fc1.weight") == dtypes.pop("router.fc2.weight") == torch.float32
    assert set(dtypes.values()) == {dtype}, dtypes
    x = torch.randn(2, channels, 5, 7).to(dtype).contiguous(memory_format=torch.channels_last)
    assert_deploy_matches(reference, deployed, x, f"reference deploy {kind} {dtype}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", ["resnet18_mod", "mobilenet_v2_mod"])
def test_reference_deploy_of_a_whole_model_in_low_precision(name, dtype):
    """Every folded layer of a whole model (stem, standard blocks, downsample branches, MoD blocks) in
    fp16/bf16 on the reference backend: all tensors in the model's dtype (but the MoD routers' weights:
    fp32, as the router computes), and the logits under the deployed model's own selections agree with
    the unfolded model's."""
    model = randomise(mod_models.build_model(name, num_classes=10, backend="reference")).eval().to(dtype)
    reference = copy.deepcopy(model)
    deployed = mod_models.optimize_for_inference(model)
    tensors = [*deployed.named_parameters(), *deployed.named_buffers()]
    dtypes = {n: t.dtype for n, t in tensors if t.is_floating_point() and ".router." not in n}
    assert set(dtypes.values()) == {dtype}, {n: d for n, d in dtypes.items() if d != dtype}
    assert {t.dtype for n, t in tensors if ".router." in n} == {torch.float32}
    x = torch.randn(2, 3, 32, 32).to(dtype)
    assert_teacher_forced_agreement(deployed, x, f"{name} {dtype} reference deploy", reference=reference,
                                    backend="reference")


def test_fused_block_is_bitwise_deterministic_and_batch_invariant():
    _, deployed = deployed_pair(randomise(mod_models.MoDBottleneck(256, capacity=64)))  # C_h = 16: the tl.dot path
    x = torch.randn(3, 256, 9, 9)
    first, _ = run_block(deployed, x)
    second, _ = run_block(deployed, x)
    alone, _ = run_block(deployed, x[1:2])
    assert torch.equal(first, second)
    assert torch.equal(first[1:2], alone), "a sample's result must not depend on its batch"


# ----------------------------------------------------------------------------------------------
# Dispatch rule and launch budget
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind, k, hidden", [("bottleneck", 32, 8), ("basic", 16, 16), ("inverted", 32, 192)])
def test_dispatch_rule_at_the_channel_limit(kind, k, hidden):
    """The fused kernel takes C = 4096 (with k and the inner width at their limits too) and nothing wider."""
    assert FB.MAX_FUSED_CHANNELS == 4096
    plan = mod_kernels.fused_block_plan(kind, 4096, k, hidden)
    assert plan.fused, plan.reason
    for channels in (4097, 4104, 8192):
        plan = mod_kernels.fused_block_plan(kind, channels, k, hidden)
        assert not plan.fused and f"C = {channels} > 4096" in plan.reason, plan
    assert not mod_kernels.fused_block_plan(kind, 4096, k + 1, hidden).fused
    if kind == "inverted":
        assert not mod_kernels.fused_block_plan(kind, 4096, k, hidden + 1).fused


def test_fused_block_at_4096_channels(unpoisoned):
    """A deployed block at the widest C the fused kernel takes: three launches (one top-k over 4096
    keys per program), equal to the unfolded reference; one channel more runs the fallback."""
    reference, deployed = deployed_pair(randomise(mod_models.MoDBottleneck(4096, capacity=128)))
    assert deployed.k == 32 and deployed.deploy_plan("cuda").fused
    x = torch.randn(1, 4096, 1, 2)
    assert_deploy_matches(reference, deployed, x, "C = 4096")
    with torch.no_grad():
        inputs = x.clone()
        counter = count_launches(lambda: deployed(inputs))
    assert counter.total == 3 and counter.triton == 3, dict(counter.by_name)
    wider = mod_models.optimize_for_inference(mod_models.MoDBottleneck(4160, capacity=130).eval())
    assert wider.k == 32 and not wider.deploy_plan("cuda").fused


def test_wide_reduced_blocks_run_the_routing_kernels_and_folded_convolutions(unpoisoned):
    """capacity = 2 makes f_k wide (k = 64): the documented fallback, still exact."""
    block = randomise(mod_models.MoDBottleneck(128, capacity=2))
    reference, deployed = deployed_pair(block)
    plan = deployed.deploy_plan()
    assert not plan.fused and "k = 64 > 32" in plan.reason
    x = torch.randn(2, 128, 3, 3)
    assert_deploy_matches(reference, deployed, x, "capacity 2 fallback")
    with torch.no_grad():
        counter = count_launches(lambda: deployed(x))
    assert counter.triton >= 3 and counter.by_name["aten.convolution"] == 3


def test_group_norm_blocks_are_never_fused_wrongly():
    """A norm that does not fold stays in f_k; the fused kernel (which has no norm) must not run."""
    block = mod_models.MoDBasicBlock(32, capacity=4, norm_layer=lambda c: nn.GroupNorm(1, c))
    reference, deployed = deployed_pair(block)
    assert not deployed.deploy_plan().fused
    assert_deploy_matches(reference, deployed, torch.randn(2, 32, 4, 4), "GroupNorm block")


PAPER_BLOCKS = [
    ("bottleneck", 256, 64), ("bottleneck", 2048, 64), ("basic", 64, 64), ("basic", 512, 64),
    ("inverted", 24, 16), ("inverted", 160, 16),
]


@pytest.mark.parametrize("router", ["learned", "random"])
@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("kind, channels, capacity", PAPER_BLOCKS, ids=[f"{k}-C{c}" for k, c, _ in PAPER_BLOCKS])
def test_at_most_three_launches_per_deployed_block(kind, channels, capacity, fusion, router, unpoisoned):
    _, deployed = deployed_pair(BLOCKS[kind](channels, capacity=capacity, fusion=fusion, router=router))
    x = torch.randn(1, channels, 2, 2)
    with torch.no_grad():
        deployed(x.clone())  # packs the folded weights once
        inputs = x.clone()
        counter = count_launches(lambda: deployed(inputs))
    assert counter.total <= 3, f"{counter.total} launches: {dict(counter.by_name)}"


def test_deployed_router_stays_fp32_and_a_16_bit_one_still_computes(unpoisoned):
    """The deploy form keeps a bf16 block's router in fp32 (the router computes in fp32; 16-bit weight
    tiles make the router kernel spill its registers) and its folded weights in bf16: the same
    selection and output as the unfolded bf16 block, in three launches. A router made 16-bit again
    afterwards is converted by the launcher: still the same."""
    channels, capacity = MID_SHAPES["bottleneck"]
    block = randomise(mod_models.MoDBottleneck(channels, capacity=capacity)).to(torch.bfloat16)
    reference, deployed = deployed_pair(block)
    assert deployed.router.fc1.weight.dtype == deployed.router.fc2.weight.dtype == torch.float32
    assert deployed.packed_weights.dtype == torch.bfloat16
    x = torch.randn(2, channels, 4, 5).to(torch.bfloat16)
    assert_deploy_matches(reference, deployed, x, "bf16 block, fp32 router")
    with torch.no_grad():
        inputs = x.clone()
        counter = count_launches(lambda: deployed(inputs))
    assert counter.total == 3, dict(counter.by_name)
    deployed.router.to(torch.bfloat16)
    assert_deploy_matches(reference, deployed, x, "bf16 router after deploying")


def test_launch_counter_counts_kernels_not_views():
    x = torch.randn(4, 4)
    with LaunchCounter() as counter:
        y = x.view(2, 8).t().contiguous()
        torch.empty(3)
        (y + 1).relu_()
    assert counter.aten == 3 and counter.triton == 0, dict(counter.by_name)  # clone (contiguous), add, relu_


# ----------------------------------------------------------------------------------------------
# Whole models
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(mod_models.MOD_BUILDERS))
def test_deployed_models_equal_the_unfolded_reference(name, unpoisoned):
    model = randomise(mod_models.build_model(name, num_classes=10)).eval().to(memory_format=torch.channels_last)
    x = torch.randn(1, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    reference = mod_models.set_backend(copy.deepcopy(model), "reference")
    deployed = mod_models.optimize_for_inference(copy.deepcopy(model))
    # Folding moves convolution outputs by ulps, which can flip a near-tie selection of these
    # fresh weights: the folded model is checked by teacher forcing too.
    assert_teacher_forced_agreement(deployed, x, f"{name} deploy (reference)", reference=copy.deepcopy(reference),
                                    backend="reference")
    mod_models.set_backend(deployed, "triton")
    blocks = [m for m in deployed.modules() if isinstance(m, mod_models.MoDBlock)]
    assert all(b.deploy_plan().fused for b in blocks)
    per_block = []
    counter = LaunchCounter()

    def before(module, args):
        module._launches_before = counter.total

    def after(module, args, output):
        per_block.append(counter.total - module._launches_before)

    for block in blocks:
        block.register_forward_pre_hook(before)
        block.register_forward_hook(after)
    with counter:
        assert_teacher_forced_agreement(deployed, x, f"{name} deploy", reference=reference)
    assert per_block and max(per_block) <= 3, f"launches per MoD block: {per_block}"


def test_deployed_block_under_torch_compile_equals_eager():
    _, deployed = deployed_pair(randomise(mod_models.MoDBottleneck(48, capacity=4)))
    compiled = torch.compile(deployed, fullgraph=True)
    x = torch.randn(2, 48, 4, 4)
    with torch.no_grad():
        expected = deployed(x.clone())
        got = compiled(x.clone())
    assert_close(got, expected, atol=1e-6, rtol=1e-6, name="compiled deployed block")


def test_deploying_under_inference_mode_gives_an_ordinary_model():
    """``optimize_for_inference`` called inside ``torch.inference_mode`` (also on a model built
    there, whose parameters are inference tensors): the deployed model runs in inference mode and
    under ``no_grad`` and equals the reference. The whole model on the reference backend (every
    folded layer), one block on the triton backend (its packed operands)."""
    torch.manual_seed(3)
    cases = [
        (lambda: mod_models.resnet18_mod(num_classes=5, backend="reference"), torch.randn(2, 3, 32, 32)),
        (lambda: mod_models.MoDBottleneck(32, capacity=4, backend="triton"), torch.randn(2, 32, 5, 4)),
    ]
    for build, x in cases:
        built = randomise_norms(build()).eval()
        reference = mod_models.set_backend(copy.deepcopy(built), "reference")
        with torch.no_grad():
            expected = reference(x.clone())
        with torch.inference_mode():
            deployed = mod_models.optimize_for_inference(copy.deepcopy(built))
            rebuilt = build().eval()
            rebuilt.load_state_dict(built.state_dict())
            mod_models.optimize_for_inference(rebuilt)
        for model in (deployed, rebuilt):
            assert not any(t.is_inference() for t in [*model.parameters(), *model.buffers()])
            with torch.inference_mode():
                out_inference = model(x.clone())
            with torch.no_grad():
                out_no_grad = model(x.clone())
            assert_close(out_inference, expected, atol=1e-4, rtol=1e-4, name="deployed in inference mode")
            assert torch.equal(out_inference, out_no_grad)
    # A weight assigned inside inference mode (an inference tensor) is copied into the block's one
    # copy of its weights, which stays ordinary: used in inference mode and under no_grad alike.
    block, unfolded = deployed, reference
    with torch.inference_mode():
        block.conv1.weight = block.conv1.weight * 2
    assert not block.packed_weights.is_inference()
    with torch.no_grad():
        unfolded.conv1.weight.mul_(2)
        expected = unfolded(x.clone())
    for mode in (torch.inference_mode, torch.no_grad):
        with mode():
            assert_close(block(x.clone()), expected, atol=1e-5, rtol=1e-5, name=f"assigned weight, {mode.__name__}")
