"""The native CPU kernel of the deployed MoD block (backend ``"native"``, and ``"auto"`` on CPU tensors).

Every deployed block is compared with the block *before* ``optimize_for_inference`` (unfolded batch
norms, reference backend), as the Triton deploy block is in ``tests/test_deploy.py``:

* fp32: outputs within 1e-5; fp16/bf16: against a float64 run under the same selection, the native
  error at most twice the reference's own (plus one ulp of the output).
* Selections exactly, NaN positions exactly.
* The new tensors the kernel's wrapper allocates are poisoned (NaN) first, so an element the kernel
  fails to write shows up.

The extension is built once per machine (tens of seconds, then cached by torch).
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import assert_close, assert_teacher_forced_agreement, randomise_norms
from torch import nn

import mod_models
from mod_kernels import native_block as NB

FUSIONS = ("first_k", "last_k", "original")
FORMATS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
EPS = {torch.float16: 2**-10, torch.bfloat16: 2**-7}
BLOCKS = {
    "bottleneck": lambda c, **kw: mod_models.MoDBottleneck(c, **kw),
    "basic": lambda c, **kw: mod_models.MoDBasicBlock(c, **kw),
    "inverted": lambda c, **kw: mod_models.MoDInvertedResidual(c, **kw),
}
MID_SHAPES = {"bottleneck": (48, 4), "basic": (20, 4), "inverted": (24, 4)}  # k = 12, 5, 6
EXTREME_SHAPES = [
    ("bottleneck", 33, 33), ("bottleneck", 96, 1),  # k = 1 (width 1); k = 96 (width 24)
    ("basic", 17, 17), ("basic", 24, 1),  # k = 1; k = 24
    ("inverted", 20, 20), ("inverted", 32, 1),  # k = 1 (hidden 6); k = 32 (hidden 192)
]


@pytest.fixture(scope="module", autouse=True)
def extension():
    return NB.load_extension()


@pytest.fixture(autouse=True)
def poisoned_allocations(monkeypatch):
    """Every new output tensor of the native block starts as NaN."""
    def poisoned(x, fmt):
        return torch.empty(x.shape, dtype=x.dtype, memory_format=fmt).fill_(float("nan"))

    monkeypatch.setattr(NB, "_empty_like_format", poisoned)


def randomise(module: nn.Module, seed: int = 1) -> nn.Module:
    # Biases of both signs: a folded bias leaking into a convolution's zero padding must show.
    return randomise_norms(module, seed, bias_scale=0.5)


def deployed_pair(block: nn.Module, backend: str = "native") -> tuple[nn.Module, nn.Module]:
    """``(unfolded reference, deployed native)`` copies of ``block`` (eval mode)."""
    block = block.eval()
    reference = mod_models.set_backend(copy.deepcopy(block), "reference")
    deployed = mod_models.set_backend(mod_models.optimize_for_inference(copy.deepcopy(block)), backend)
    return reference, deployed


def run_block(block: nn.Module, x: torch.Tensor, seed: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """``(output, selection)`` of one forward under ``no_grad`` on a copy of ``x`` (same layout)."""
    block.record_selection = True
    torch.manual_seed(seed)  # the random router's keys
    with torch.no_grad():
        out = block(x.clone(memory_format=torch.preserve_format))
    return out, block.last_selection


def assert_deploy_matches(reference: nn.Module, deployed: nn.Module, x: torch.Tensor, label: str) -> None:
    assert deployed.deploy_plan("cpu").native, deployed.deploy_plan("cpu").reason
    ref_out, ref_selection = run_block(reference, x)
    out, selection = run_block(deployed, x)
    assert torch.equal(selection, ref_selection), f"{label}: selections differ"
    assert out.dtype == x.dtype, f"{label}: dtype changed"
    if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last):
        assert out.stride() == x.stride(), f"{label}: layout changed"
    assert torch.equal(torch.isnan(out), torch.isnan(ref_out)), f"{label}: NaN positions differ"
    if x.dtype == torch.float32:
        assert_close(out, ref_out, atol=1e-5, rtol=1e-5, name=label)
        return
    exact = copy.deepcopy(reference).double()
    exact.forced_selection = selection
    exact_out, _ = run_block(exact, x.double())
    native_error = (out.double() - exact_out).abs().nan_to_num()
    reference_error = (ref_out.double() - exact_out).abs().nan_to_num()
    bound = 2 * reference_error.max() + EPS[x.dtype] * exact_out.abs().nan_to_num()
    worst = float((native_error - bound).max())
    assert worst <= 0, (
        f"{label}: native error {float(native_error.max()):.3g} beyond twice the reference's "
        f"{float(reference_error.max()):.3g}"
    )


# ----------------------------------------------------------------------------------------------
# Equivalence with the unfolded reference
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("kind", list(BLOCKS))
def test_native_block_equals_the_unfolded_reference(kind, fusion, fmt, dtype):
    channels, capacity = MID_SHAPES[kind]
    reference, deployed = deployed_pair(randomise(BLOCKS[kind](channels, capacity=capacity, fusion=fusion)).to(dtype))
    x = torch.randn(2, channels, 5, 7).to(dtype).contiguous(memory_format=FORMATS[fmt])
    assert_deploy_matches(reference, deployed, x, f"{kind} {fusion} {fmt} {dtype}")


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("kind, channels, capacity", EXTREME_SHAPES,
                         ids=[f"{k}-C{c}-cap{p}" for k, c, p in EXTREME_SHAPES])
def test_native_block_at_extreme_widths(kind, channels, capacity, fusion):
    reference, deployed = deployed_pair(randomise(BLOCKS[kind](channels, capacity=capacity, fusion=fusion)))
    for fmt in FORMATS.values():
        x = torch.randn(3, channels, 3, 5).contiguous(memory_format=fmt)
        assert_deploy_matches(reference, deployed, x, f"{kind} C={channels} k={deployed.k} {fusion}")


@pytest.mark.parametrize("height, width", [(1, 9), (11, 1), (1, 1), (13, 6), (37, 30)])
@pytest.mark.parametrize("kind", list(BLOCKS))
def test_native_block_at_odd_spatial_sizes(kind, height, width):
    """H or W = 1, sizes not powers of two, and maps tall enough for several row tiles."""
    channels, capacity = MID_SHAPES[kind]
    reference, deployed = deployed_pair(randomise(BLOCKS[kind](channels, capacity=capacity, fusion="last_k")))
    for fmt in FORMATS.values():
        x = torch.randn(2, channels, height, width).contiguous(memory_format=fmt)
        assert_deploy_matches(reference, deployed, x, f"{kind} {height}x{width}")


@pytest.mark.parametrize("dilation", [2, 3])
@pytest.mark.parametrize("kind", ["bottleneck", "basic"])
def test_native_block_with_dilation(kind, dilation):
    reference, deployed = deployed_pair(randomise(BLOCKS[kind](40, capacity=8, dilation=dilation)))
    for fmt in FORMATS.values():
        x = torch.randn(2, 40, 7, 6).contiguous(memory_format=fmt)
        assert_deploy_matches(reference, deployed, x, f"{kind} dilation {dilation}")
    x = torch.randn(1, 40, 40, 29)  # tiles of rows whose halo crosses the tile border
    assert_deploy_matches(reference, deployed, x, f"{kind} dilation {dilation}, several tiles")


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("kind", list(BLOCKS))
def test_native_block_random_router(kind, fusion):
    channels, capacity = MID_SHAPES[kind]
    block = BLOCKS[kind](channels, capacity=capacity, fusion=fusion, router="random")
    reference, deployed = deployed_pair(randomise(block))
    assert_deploy_matches(reference, deployed, torch.randn(2, channels, 4, 3), f"{kind} random {fusion}")


@pytest.mark.parametrize("fusion", FUSIONS)
def test_native_block_without_expansion(fusion):
    block = randomise(mod_models.MoDInvertedResidual(24, capacity=4, expand_ratio=1, fusion=fusion))
    reference, deployed = deployed_pair(block)
    for fmt in FORMATS.values():
        x = torch.randn(2, 24, 5, 4).contiguous(memory_format=fmt)
        assert_deploy_matches(reference, deployed, x, "inverted residual, expand_ratio 1")


@pytest.mark.parametrize("poison", ["nan", "inf", "huge", "nan_channel", "ties"])
@pytest.mark.parametrize("kind", list(BLOCKS))
def test_native_block_nan_inf_and_ties_like_the_reference(kind, poison):
    channels, capacity = MID_SHAPES[kind]
    reference, deployed = deployed_pair(randomise(BLOCKS[kind](channels, capacity=capacity)))
    x = torch.randn(2, channels, 4, 5)
    if poison == "nan":
        x[0, 2, 1, 1] = float("nan")
    elif poison == "inf":
        x[1, 0, 0, 0] = float("inf")
    elif poison == "huge":
        x = x * 1e38
    elif poison == "nan_channel":
        x[:, -1] = float("nan")
    else:  # every channel the same: all scores tie, the lowest channels win
        x = x[:, :1].expand(2, channels, 4, 5).contiguous()
    ref_out, ref_selection = run_block(reference, x)
    out, selection = run_block(deployed, x)
    assert torch.equal(selection, ref_selection), f"selections differ: {selection.tolist()} vs {ref_selection.tolist()}"
    assert torch.equal(torch.isnan(out), torch.isnan(ref_out)), (
        f"NaN positions differ: {int(torch.isnan(out).sum())} native, {int(torch.isnan(ref_out).sum())} reference"
    )
    if poison != "huge":
        assert_close(out, ref_out, atol=1e-5, rtol=1e-5, name=f"{poison} output")


def test_native_top_k_ties_and_nan_scores_exactly():
    """Given keys (random router): ties go to the lower channel, NaN ranks first, -0.0 ties 0.0."""
    reference, deployed = deployed_pair(randomise(mod_models.MoDBottleneck(64, capacity=8, router="random")))
    keys = torch.tensor([[0.5] * 64, [float("nan")] * 3 + [0.5] * 61])
    keys[1, 40] = float("nan")
    keys[0, 10], keys[0, 20] = 0.0, -0.0
    keys[0, 30:34] = torch.tensor([0.9, float("inf"), -float("inf"), 0.9])
    convs = deployed.folded_convs()
    x = torch.randn(2, 64, 3, 3)
    with torch.no_grad():
        _, idx, w, _ = NB.native_block_forward(
            x, "bottleneck", [c.weight for c in convs], [c.bias for c in convs], 8, deployed.reduced_width, scores=keys
        )
    assert torch.equal(idx, mod_models.functional.select_top_k(keys, 8))
    assert torch.equal(w, torch.ones(2, 8))


@pytest.mark.parametrize("kind", list(BLOCKS))
def test_native_block_on_strided_and_sliced_views(kind):
    channels, capacity = MID_SHAPES[kind]
    reference, deployed = deployed_pair(randomise(BLOCKS[kind](channels, capacity=capacity)))
    nchw = torch.randn(3, channels + 5, 6, 12)
    nhwc = torch.randn(3, 6, 12, channels + 5).permute(0, 3, 1, 2)
    views = {
        "W sliced": nchw[:, :channels, :, :9],
        "H strided": nchw[:, 5:, ::2],
        "batch strided": nchw[::2, 2:channels + 2],
        "channels_last sliced": nhwc[:, 3:channels + 3, 1:, :11],
        "W reversed stride": nchw[:, :channels].transpose(2, 3),
    }
    for name, x in views.items():
        kept = x.clone()
        ref_out, ref_selection = run_block(reference, x.contiguous())
        deployed.record_selection = True
        with torch.no_grad():
            out = deployed(x)
        assert torch.equal(x, kept), f"{name}: a view that is not dense is never written"
        assert torch.equal(deployed.last_selection, ref_selection), f"{name}: selections differ"
        assert_close(out, ref_out, atol=1e-5, rtol=1e-5, name=name)


def test_native_block_is_batch_and_thread_count_invariant():
    """Bitwise: a sample's output does not depend on its batch, nor on torch's thread count."""
    threads = torch.get_num_threads()
    for kind, channels, capacity in [("bottleneck", 256, 64), ("inverted", 96, 16), ("basic", 64, 8)]:
        _, deployed = deployed_pair(randomise(BLOCKS[kind](channels, capacity=capacity)))
        x = torch.randn(5, channels, 33, 35)
        try:
            torch.set_num_threads(1)
            one, _ = run_block(deployed, x)
            torch.set_num_threads(2)
            two, _ = run_block(deployed, x)
            alone, _ = run_block(deployed, x[3:4])
        finally:
            torch.set_num_threads(threads)
        assert torch.equal(one, two), f"{kind}: 1 vs 2 threads differ"
        assert torch.equal(one[3:4], alone), f"{kind}: a sample's result depends on its batch"


# ----------------------------------------------------------------------------------------------
# In place, plans, errors
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("fusion", ["first_k", "last_k"])
def test_native_block_writes_only_the_targets_of_its_input(fusion, fmt):
    reference, deployed = deployed_pair(randomise(mod_models.MoDBottleneck(64, capacity=8, fusion=fusion)))
    x = torch.randn(2, 64, 5, 6).contiguous(memory_format=FORMATS[fmt])
    x[:, :8] += 3  # the first channels win the selection, so selected channels are also targets
    with torch.no_grad():
        expected = reference(x.clone())
        written = x.clone(memory_format=torch.preserve_format)
        version = written._version
        out = deployed(written)
    assert out.data_ptr() == written.data_ptr() and written._version > version
    targets = slice(0, 8) if fusion == "first_k" else slice(56, 64)
    untouched = torch.ones(64, dtype=torch.bool)
    untouched[targets] = False
    assert torch.equal(out[:, untouched], x[:, untouched]), "only the k = 8 target channels may change"
    assert_close(out, expected, atol=1e-5, rtol=1e-5, name="in-place native block")
    with torch.inference_mode():
        frozen = x.clone()
    with torch.no_grad():
        copied = deployed(frozen)  # an inference tensor outside inference mode is never written
    assert torch.equal(frozen, x) and copied.data_ptr() != frozen.data_ptr()
    assert_close(copied, expected, atol=1e-5, rtol=1e-5, name="inference tensor, out of place")


def test_original_fusion_returns_a_new_tensor_and_keeps_its_input():
    reference, deployed = deployed_pair(randomise(mod_models.MoDBasicBlock(24, capacity=4, fusion="original")))
    x = torch.randn(2, 24, 4, 5)
    kept = x.clone()
    with torch.no_grad():
        out = deployed(x)
        expected = reference(kept.clone())
    assert torch.equal(x, kept) and out.data_ptr() != x.data_ptr()
    assert_close(out, expected, atol=1e-5, rtol=1e-5, name="original fusion")


def test_auto_runs_the_native_kernel_for_deployed_blocks_on_the_cpu(monkeypatch):
    calls = []
    unchecked = NB.native_block_unchecked
    monkeypatch.setattr(NB, "native_block_unchecked", lambda *a: calls.append(1) or unchecked(*a))
    block = randomise(mod_models.MoDBottleneck(48, capacity=4, backend="auto")).eval()
    x = torch.randn(1, 48, 4, 4)
    with torch.no_grad():
        block(x.clone())  # as trained: the reference
        assert not calls
        mod_models.optimize_for_inference(block)
        assert block.deploy_plan().native, block.deploy_plan().reason
        block(x.clone())
    assert calls == [1]
    mod_models.set_backend(block, "reference")
    assert not block.deploy_plan().native and "reference" in block.deploy_plan().reason


def test_blocks_the_kernel_does_not_take_have_an_explicit_plan_and_run_the_reference(monkeypatch):
    monkeypatch.setattr(NB, "native_block_unchecked", lambda *a: pytest.fail("the native kernel ran"))
    group_norm = mod_models.MoDBasicBlock(32, capacity=4, norm_layer=lambda c: nn.GroupNorm(1, c))
    wide = mod_models.MoDBasicBlock(128, capacity=2)  # k = 64: 2 * 9 * 64^2 MACs per position
    double = mod_models.MoDBottleneck(32, capacity=4).double()
    for block, why, x in [
        (group_norm, "not folded", torch.randn(2, 32, 4, 4)),
        (wide, "multiply-accumulates per position", torch.randn(1, 128, 3, 3)),
        (double, "float64", torch.randn(2, 32, 4, 4, dtype=torch.float64)),
    ]:
        reference, deployed = deployed_pair(randomise(block))
        plan = deployed.deploy_plan()
        assert not plan.native and why in plan.reason, plan
        with torch.no_grad():
            assert_close(deployed(x.clone()), reference(x.clone()), atol=1e-5, rtol=1e-5, name=why)


def test_native_backend_refuses_other_devices_and_forced_selections():
    _, deployed = deployed_pair(randomise(mod_models.MoDBottleneck(48, capacity=4)))
    deployed.forced_selection = torch.arange(12).expand(1, 12).contiguous()
    with pytest.raises(ValueError, match="forced_selection"):
        with torch.no_grad():
            deployed(torch.randn(1, 48, 3, 3))
    assert "CPU tensors only" in deployed.deploy_plan("cuda").reason
    with pytest.raises(RuntimeError, match="runs on CPU tensors"):
        mod_models.backend.resolve_deployed_backend("native", torch.empty(1, device="meta"))


def test_native_block_forward_rejects_bad_input():
    block = mod_models.optimize_for_inference(randomise(mod_models.MoDBottleneck(48, capacity=4)).eval())
    convs = block.folded_convs()
    weights, biases = [c.weight for c in convs], [c.bias for c in convs]
    fc = dict(fc1_weight=block.router.fc1.weight, fc2_weight=block.router.fc2.weight)
    x = torch.randn(2, 48, 4, 4)

    def call(**changes):
        args = dict(x=x, kind="bottleneck", weights=weights, biases=biases, k=12, hidden=3, **fc)
        args.update(changes)
        with torch.no_grad():
            return NB.native_block_forward(**args)

    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        call(x=x.numpy())
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        call(x=x[0])
    with pytest.raises(TypeError, match="float64"):
        call(x=x.double())
    with pytest.raises(ValueError, match="unknown block kind"):
        call(kind="dense")
    with pytest.raises(ValueError, match="unknown fusion"):
        call(fusion="middle_k")
    with pytest.raises(ValueError, match="k must satisfy"):
        call(k=49)
    with pytest.raises(ValueError, match=r"weights\[1\] must be a floating tensor of shape \(3, 3, 3, 3\)"):
        call(weights=[weights[0], weights[0], weights[2]])
    with pytest.raises(ValueError, match="has 3 convolutions"):
        call(weights=weights[:2])
    with pytest.raises(ValueError, match="either both fc1_weight and fc2_weight, or scores"):
        call(fc2_weight=None)
    with pytest.raises(ValueError, match="float32 \\[B, C\\]"):
        call(fc1_weight=None, fc2_weight=None, scores=torch.rand(2, 47))
    with pytest.raises(ValueError, match="fc1_weight must be"):
        call(fc1_weight=fc["fc1_weight"][:, :40])
    with pytest.raises(ValueError, match="no dilation"):
        call(kind="inverted", dilation=2)
    with pytest.raises(ValueError, match="needs a dense x"):
        call(x=x[..., :3], inplace=True)
    with pytest.raises(ValueError, match="inference only"):
        with torch.enable_grad():
            NB.native_block_forward(x.clone().requires_grad_(), "bottleneck", weights, biases, 12, 3, **fc)


def test_a_missing_compiler_is_a_clear_error(monkeypatch):
    from torch.utils import cpp_extension

    def no_compiler(*args, **kwargs):
        raise RuntimeError("Error building extension: c++: command not found")

    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    NB.load_extension.cache_clear()
    try:
        with pytest.raises(RuntimeError, match="needs a C\\+\\+ compiler .* command not found"):
            NB.load_extension()
    finally:
        monkeypatch.undo()
        NB.load_extension.cache_clear()
        NB.load_extension()


# ----------------------------------------------------------------------------------------------
# torch.compile and custom-op checks
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fusion", ["first_k", "original"])
def test_deployed_block_under_torch_compile_is_one_op_and_equals_eager(fusion):
    _, deployed = deployed_pair(randomise(mod_models.MoDBottleneck(48, capacity=4, fusion=fusion)), backend="auto")
    import torch._dynamo.testing

    torch._dynamo.reset()
    counts = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    compiled = torch.compile(deployed, fullgraph=True, backend=counts)
    x = torch.randn(2, 48, 4, 5)
    with torch.no_grad():
        expected = deployed(x.clone())
        got = compiled(x.clone())
    assert torch.equal(got, expected)
    graph = counts.graphs[0]
    native_calls = [n for n in graph.graph.nodes if "native_block" in str(n.target)]
    assert len(native_calls) == 1, graph.graph


def test_native_ops_take_the_layout_inductor_chose():
    """Under Inductor's freezing the convolutions run on channels_last activations; a custom op
    without ``flexible_layout`` gets NCHW copies of its input made before and after each call (3.4 ms
    of copies per forward of resnet50_mod at batch 1, measured with torch.profiler)."""
    for op in (torch.ops.mod_kernels.native_block.default, torch.ops.mod_kernels.native_block_.default):
        assert torch.Tag.flexible_layout in op.tags, op


def test_opcheck_native_ops():
    from torch.library import opcheck

    block = mod_models.optimize_for_inference(randomise(mod_models.MoDInvertedResidual(24, capacity=4)).eval())
    convs = block.folded_convs()
    weights, biases = [c.weight for c in convs], [c.bias for c in convs]
    x = torch.randn(2, 24, 3, 5).contiguous(memory_format=torch.channels_last)
    fc1, fc2 = block.router.fc1.weight, block.router.fc2.weight
    opcheck(NB.native_block_op, (x, "inverted", weights, biases, 6, 36, 1, "original", False, fc1, fc2, None, True))
    opcheck(NB.native_block_inplace_op, (x.clone(), "inverted", weights, biases, 6, 36, 1, "last_k", False, None, None,
                                        torch.rand(2, 24), True))


# ----------------------------------------------------------------------------------------------
# Whole models
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(mod_models.MOD_BUILDERS))
def test_deployed_models_on_the_native_kernel_equal_the_unfolded_reference(name):
    model = randomise(mod_models.build_model(name, num_classes=10)).eval()
    x = torch.randn(2, 3, 32, 32)
    reference = mod_models.set_backend(copy.deepcopy(model), "reference")
    deployed = mod_models.optimize_for_inference(copy.deepcopy(model))
    blocks = [m for m in deployed.modules() if isinstance(m, mod_models.MoDBlock)]
    assert blocks and all(b.deploy_plan("cpu").native for b in blocks)
    # Folding and the kernel's summation order move results by ulps, which can flip a near-tie
    # selection of these fresh weights: checked by teacher forcing.
    assert_teacher_forced_agreement(deployed, x, f"{name} deploy (native)", reference=reference, backend="native")
