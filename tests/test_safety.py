"""Silent wrong answers that must be impossible: in-place writes, NaN/inf, dropped gradients, bad indices.

Every test here was written against the code before its fix and failed there:

* in-place writes hidden from autograd (the block wrote into a tensor autograd had saved, and
  ``backward`` returned wrong gradients without an error);
* reentrant activation checkpointing: the first, ``no_grad`` forward wrote into the block input,
  so the recomputation saw a different input;
* NaN and inf vanished behind the fused ReLU (``maximum(x, 0)`` returns 0 for NaN on a GPU and in
  the interpreter; ``torch.relu`` keeps NaN);
* ``scale_fuse(inplace=True)`` on inputs that require grad returned a result without gradients;
* out-of-range or repeated indices reached the kernels and wrote outside the tensor.
"""

from __future__ import annotations

import pytest
import torch
import torch.utils.checkpoint
from helpers import assert_close, randomise_norms

import mod_kernels
import mod_models
from mod_models import functional as MF

# The CPU interpreter suite: its tensors are CPU tensors, which the triton backend takes only under
# Triton's interpreter (tests/conftest.py switches it on where there is no GPU). On a GPU machine
# tests/test_kernels.py runs the kernels compiled, the deployed block included.
pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(), reason="CPU interpreter suite (CUDA machine: see test_kernels.py)"
)

BACKENDS = ("reference", "triton")
BLOCKS = (
    (mod_models.MoDBasicBlock, 16, 4),
    (mod_models.MoDBottleneck, 32, 4),
    (mod_models.MoDInvertedResidual, 16, 4),
)
BLOCK_IDS = [cls.__name__ for cls, _, _ in BLOCKS]


def _randomised(block: torch.nn.Module) -> torch.nn.Module:
    return randomise_norms(block, 3)


# ----------------------------------------------------------------------------------------------
# In-place writes
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls, channels, capacity", BLOCKS, ids=BLOCK_IDS)
def test_default_block_never_writes_into_its_input(cls, channels, capacity, backend):
    block = _randomised(cls(channels, capacity=capacity, backend=backend)).eval()
    assert block.inplace is False
    x = torch.randn(2, channels, 5, 4)
    kept = x.clone()
    with torch.no_grad():
        out = block(x)
    with torch.inference_mode():
        out_inference = block(x)
    assert torch.equal(x, kept), "a default MoD block wrote into its input"
    assert out.data_ptr() != x.data_ptr() and out_inference.data_ptr() != x.data_ptr()


@pytest.mark.parametrize("backend", BACKENDS)
def test_saved_tensor_modified_in_place_is_an_error_not_a_wrong_gradient(backend):
    """The reproducer: autograd saved ``x``; a block that writes into ``x`` under ``no_grad`` must
    make the later backward raise (version counter), not return wrong gradients."""
    block = _randomised(mod_models.MoDBasicBlock(16, capacity=4, backend=backend, inplace=True)).eval()
    x = torch.randn(2, 16, 5, 4)
    w = torch.randn(2, 16, 5, 4, requires_grad=True)
    loss = (x * w).sum()
    version = x._version
    with torch.no_grad():
        out = block(x)
    assert out.data_ptr() == x.data_ptr(), "inplace=True under no_grad should write into the input"
    assert x._version > version, "the in-place write did not bump the version counter"
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_default_block_keeps_saved_tensors_valid(backend):
    block = _randomised(mod_models.MoDBasicBlock(16, capacity=4, backend=backend)).eval()
    x = torch.randn(2, 16, 5, 4)
    kept = x.clone()
    w = torch.randn(2, 16, 5, 4, requires_grad=True)
    loss = (x * w).sum()
    with torch.no_grad():
        block(x)
    loss.backward()
    assert torch.equal(w.grad, kept)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls, channels, capacity", BLOCKS, ids=BLOCK_IDS)
def test_reentrant_checkpoint_gradients_equal_plain_backward(cls, channels, capacity, backend):
    block = _randomised(cls(channels, capacity=capacity, backend=backend)).train()
    x = torch.randn(3, channels, 5, 4)

    def grads(run):
        block.zero_grad()
        h = (x * 1.5).requires_grad_()
        run(h).square().sum().backward()
        return [p.grad.clone() for p in block.parameters()] + [h.grad.clone()]

    state = torch.get_rng_state()
    plain = grads(block)
    torch.set_rng_state(state)
    checkpointed = grads(lambda h: torch.utils.checkpoint.checkpoint(block, h, use_reentrant=True))
    for got, want in zip(checkpointed, plain):
        assert_close(got, want, atol=1e-5, rtol=1e-5, name="checkpointed gradient")


@pytest.mark.parametrize("backend", BACKENDS)
def test_inference_tensor_outside_inference_mode_is_never_written(backend):
    block = _randomised(mod_models.MoDBasicBlock(16, capacity=4, backend=backend, inplace=True)).eval()
    with torch.inference_mode():
        x = torch.randn(2, 16, 5, 4)
    kept = x.clone()
    with torch.no_grad():
        out = block(x)
    assert torch.equal(x, kept)
    assert out.data_ptr() != x.data_ptr()


# ----------------------------------------------------------------------------------------------
# NaN and inf propagate as in the reference
# ----------------------------------------------------------------------------------------------


def _poisoned(kind: str, channels: int) -> torch.Tensor:
    x = torch.randn(2, channels, 5, 4)
    if kind == "one_nan":
        x[0, 3, 2, 1] = float("nan")
    elif kind == "inf":
        x[1, 0, 0, 0] = float("inf")
        x[1, 5, 3, 2] = float("-inf")
    elif kind == "huge":
        x = x * 1e38
    return x


@pytest.mark.parametrize("kind", ["one_nan", "inf", "huge"])
@pytest.mark.parametrize("cls, channels, capacity", BLOCKS, ids=BLOCK_IDS)
def test_nan_and_inf_propagate_like_the_reference(cls, channels, capacity, kind):
    block = _randomised(cls(channels, capacity=capacity, backend="reference")).eval()
    x = _poisoned(kind, channels)
    with torch.no_grad():
        expected = block(x)
        block.backend = "triton"
        got = block(x)
    assert torch.equal(torch.isnan(got), torch.isnan(expected)), (
        f"NaN positions differ: {int(torch.isnan(got).sum())} on triton, "
        f"{int(torch.isnan(expected).sum())} on the reference"
    )
    if kind != "huge":  # fp32 overflow makes the non-NaN values themselves rounding-sensitive
        assert_close(got, expected, atol=1e-5, rtol=1e-5, name=f"{kind} output")


@pytest.mark.parametrize("fusion", ["first_k", "last_k", "original"])
@pytest.mark.parametrize("activation", ["relu", "none"])
def test_scale_fuse_nan_forward_and_backward_like_torch_relu(fusion, activation):
    """``relu(NaN) = NaN`` and its gradient passes where the output is NaN (``torch.relu``'s rule)."""
    torch.manual_seed(1)
    x = torch.randn(2, 8, 3, 3)
    x[0, :, 1, 1] = float("nan")
    x[1, 2, 0, 2] = float("inf")
    y = torch.randn(2, 2, 3, 3)
    y[1, 0, 2, 2] = float("nan")
    w = torch.rand(2, 2)
    idx = torch.tensor([[5, 1], [2, 7]])
    slot = torch.full((2, 8), -1, dtype=torch.int32)
    for b in range(2):
        for j in range(2):
            slot[b, idx[b, j]] = j
    grad_out = torch.randn(2, 8, 3, 3)

    def run(fn):
        xr, yr, wr = (t.clone().requires_grad_() for t in (x, y, w))
        out = fn(xr, yr, wr)
        out.backward(grad_out)
        return out.detach(), xr.grad, yr.grad, wr.grad

    expected = run(lambda a, b_, c: MF.scale_and_fuse(a, b_, c, idx, fusion=fusion, activation=activation))
    got = run(lambda a, b_, c: mod_kernels.scale_fuse(a, b_, c, idx, slot, fusion=fusion, activation=activation))
    for name, g, e in zip(("out", "grad_x", "grad_y", "grad_w"), got, expected):
        assert_close(g, e, atol=1e-5, rtol=1e-5, name=name)
    with torch.no_grad():
        x_in_place = x.clone()
        mod_kernels.scale_fuse(x_in_place, y, w, idx, slot, fusion=fusion, activation=activation, inplace=True)
    assert torch.equal(torch.isnan(x_in_place), torch.isnan(got[0]))
    assert_close(x_in_place, got[0], atol=0, rtol=0, name="in-place out equals the copy bitwise")


# ----------------------------------------------------------------------------------------------
# Gradients are never dropped; bad indices never reach a kernel
# ----------------------------------------------------------------------------------------------


def _fuse_inputs(channels=8, k=2, batch=2):
    x = torch.randn(batch, channels, 3, 3)
    y = torch.randn(batch, k, 3, 3)
    w = torch.rand(batch, k)
    idx = torch.stack([torch.randperm(channels)[:k] for _ in range(batch)])
    slot = torch.full((batch, channels), -1, dtype=torch.int32)
    for b in range(batch):
        slot[b, idx[b]] = torch.arange(k, dtype=torch.int32)
    return x, y, w, idx, slot


@pytest.mark.parametrize("needs_grad", ["x", "y", "w"])
def test_scale_fuse_in_place_on_inputs_autograd_needs_is_an_error(needs_grad):
    x, y, w, idx, slot = _fuse_inputs()
    tensors = {"x": x, "y": y, "w": w}
    tensors[needs_grad].requires_grad_()
    with pytest.raises(ValueError, match="in place.*autograd"):
        mod_kernels.scale_fuse(tensors["x"], tensors["y"], tensors["w"], idx, slot, inplace=True)


def _bottleneck_params(k: int = 2) -> torch.Tensor:
    """Packed folded convolutions of a bottleneck f_k with k = 2 (width 1)."""
    generator = torch.Generator().manual_seed(4)
    shapes = [((1, k, 1, 1), 1), ((1, 1, 3, 3), 1), ((k, 1, 1, 1), k)]
    return mod_kernels.pack_params([(torch.randn(w, generator=generator), torch.randn(b, generator=generator))
                                    for w, b in shapes])


@pytest.mark.parametrize("fusion", ["first_k", "last_k", "original"])
def test_fused_block_in_place_refuses_inputs_it_cannot_write(fusion):
    """``fused_block_forward(inplace=True)`` (affine fusions write their targets into ``x``): an input
    whose channels overlap in memory, or an inference tensor outside inference mode, is a
    ValueError and stays unwritten. ``"original"`` fusion never writes ``x``, so it takes both; out
    of place every input is fine and equals the dense copy's result."""
    params, scores = _bottleneck_params(), torch.rand(2, 8)

    def call(x, inplace):
        return mod_kernels.fused_block_forward(x, "bottleneck", params, 2, 1, fusion=fusion, scores=scores,
                                               inplace=inplace)[0]

    overlapping = torch.randn(2, 1, 4, 4).expand(2, 8, 4, 4)
    with torch.inference_mode():
        frozen = torch.randn(2, 8, 4, 4)
    cases = ((overlapping, "needs x contiguous.*expanded"), (frozen, "inference tensor.*inference mode is off"))
    for x, problem in cases:
        kept = x.clone()
        with torch.no_grad():
            expected = call(x.contiguous().clone(), inplace=False)
            assert torch.equal(call(x, inplace=False), expected)
            if fusion == "original":
                assert torch.equal(call(x, inplace=True), expected)
            else:
                with pytest.raises(ValueError, match=problem):
                    call(x, inplace=True)
        assert torch.equal(x, kept)
    with torch.inference_mode():  # where PyTorch allows the write, it happens
        written = frozen.clone()
        out = call(written, inplace=True)
        assert torch.equal(out, call(frozen, inplace=False))
        assert (out.data_ptr() == written.data_ptr()) == (fusion != "original")


def test_scale_fuse_in_place_refuses_an_inference_tensor_outside_inference_mode():
    x, y, w, idx, slot = _fuse_inputs()
    with torch.inference_mode():
        frozen = x.clone()
    with pytest.raises(ValueError, match="inference tensor"):
        mod_kernels.scale_fuse(frozen, y, w, idx, slot, inplace=True)
    assert torch.equal(frozen, x)
    with pytest.raises(ValueError, match="needs x contiguous"):
        mod_kernels.scale_fuse(x[:, :1].expand(x.shape), y, w, idx, slot, inplace=True)


def test_fuse_routed_in_place_on_inputs_autograd_needs_is_an_error():
    x = torch.randn(2, 16, 3, 3, requires_grad=True)
    fc1, fc2 = torch.randn(1, 16), torch.randn(16, 1)
    routed = mod_kernels.route_pack(x, 4, fc1_weight=fc1, fc2_weight=fc2)
    with pytest.raises(ValueError, match="in place.*autograd"):
        mod_kernels.fuse_routed(routed, routed.xs * 2, inplace=True)


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda idx, slot: idx.__setitem__((0, 0), 8 + 2), r"idx.*outside \[0, 8\)"),
        (lambda idx, slot: idx.__setitem__((1, 1), 10**8), r"idx.*outside \[0, 8\)"),
        (lambda idx, slot: idx.__setitem__((0, 1), -1), r"idx.*outside \[0, 8\)"),
        (lambda idx, slot: idx.__setitem__((0, 1), int(idx[0, 0])), r"idx row 0 selects a channel twice"),
        (lambda idx, slot: slot.__setitem__((0, int(idx[0, 0])), 5), r"selected_slot.*outside \[-1, 2\)"),
        (lambda idx, slot: slot.__setitem__((1, int(idx[1, 0])), 1), r"selected_slot.*does not match idx"),
        (lambda idx, slot: slot.__setitem__((1, int(idx[1, 0])), -1), r"selected_slot.*does not match idx"),
    ],
)
@pytest.mark.parametrize("inplace", [False, True])
def test_scale_fuse_validates_indices(corrupt, message, inplace):
    x, y, w, idx, slot = _fuse_inputs()
    corrupt(idx, slot)
    for fusion in ("first_k", "original"):
        with pytest.raises(ValueError, match=message):
            mod_kernels.scale_fuse(x.clone(), y, w, idx, slot, fusion=fusion, inplace=inplace)


def test_fuse_routed_validates_a_tampered_routing():
    x = torch.randn(2, 16, 3, 3)
    fc1, fc2 = torch.randn(1, 16), torch.randn(16, 1)
    routed = mod_kernels.route_pack(x, 4, fc1_weight=fc1, fc2_weight=fc2)
    bad = routed._replace(idx=routed.idx.clone().fill_(99))
    with pytest.raises(ValueError, match=r"idx.*outside \[0, 16\)"):
        mod_kernels.fuse_routed(bad, routed.xs)


# ----------------------------------------------------------------------------------------------
# Clear errors instead of crashes deep in torch or Triton
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls, channels, capacity", BLOCKS, ids=BLOCK_IDS)
def test_block_construction_rejects_bad_keywords(cls, channels, capacity):
    with pytest.raises(TypeError, match="inplace must be True or False, got 'no'"):
        cls(channels, capacity=capacity, inplace="no")
    block = cls(channels, capacity=capacity)
    with pytest.raises(TypeError, match="inplace must be True or False"):
        block.inplace = 1
    if cls is not mod_models.MoDInvertedResidual:
        for dilation in (0, -1, 1.5, True):
            with pytest.raises(ValueError, match="dilation must be an int >= 1"):
                cls(channels, capacity=capacity, dilation=dilation)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls, channels, capacity", BLOCKS, ids=BLOCK_IDS)
def test_input_dtype_other_than_the_parameters_is_our_error(cls, channels, capacity, backend):
    block = cls(channels, capacity=capacity, backend=backend).eval()
    with pytest.raises(TypeError, match=r"input has dtype torch.float16 but the block's parameters are torch.float32"):
        block(torch.randn(2, channels, 4, 4, dtype=torch.float16))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts for the convolutions: allowed
        assert block(torch.randn(2, channels, 4, 4)).dtype == torch.float32


def test_kernel_ops_blame_the_right_argument():
    x, y, w, idx, slot = _fuse_inputs()
    with pytest.raises(TypeError, match="x must be a torch.Tensor, got list"):
        mod_kernels.route_pack([1], 2, scores=torch.rand(2, 8))
    with pytest.raises(TypeError, match="x must be a torch.Tensor, got list"):
        mod_kernels.scale_fuse([1], y, w, idx, slot)
    with pytest.raises(ValueError, match=r"^y must have shape \(2, 2, 3, 3\), got \(2, 3, 3, 3\)"):
        mod_kernels.scale_fuse(x, torch.randn(2, 3, 3, 3), w, idx, slot)
    routed = mod_kernels.route_pack(x, 2, scores=torch.rand(2, 8))
    with pytest.raises(ValueError, match=r"^y must have shape \(2, 2, 3, 3\)"):
        mod_kernels.fuse_routed(routed, torch.randn(2, 3, 3, 3))
    with pytest.raises(TypeError, match="inplace must be True or False"):
        mod_kernels.scale_fuse(x, y, w, idx, slot, inplace="yes")


def _transforms(block, x):
    from torch.func import functional_call, grad, jvp, vmap

    params = dict(block.named_parameters())
    return {
        "grad": lambda: grad(lambda p: functional_call(block, p, (x,)).sum())(params),
        "vmap": lambda: vmap(lambda xi: block(xi[None]))(x),
        "jvp": lambda: jvp(block, (x,), (torch.ones_like(x),)),
    }


@pytest.mark.parametrize("transform", ["grad", "vmap", "jvp"])
def test_torch_func_transforms_work_on_the_reference_and_are_a_clear_error_on_triton(transform):
    block = _randomised(mod_models.MoDBasicBlock(16, capacity=4, backend="reference")).eval()
    x = torch.randn(2, 16, 4, 4)
    _transforms(block, x)[transform]()  # the reference is plain PyTorch: every transform works
    block.backend = "triton"
    with pytest.raises(RuntimeError, match=rf"backend 'triton'.*torch.func transform '{transform}'"):
        _transforms(block, x)[transform]()


def test_forward_mode_ad_is_a_clear_error_on_triton():
    import torch.autograd.forward_ad as fwAD

    block = _randomised(mod_models.MoDBasicBlock(16, capacity=4, backend="triton")).eval()
    with fwAD.dual_level():
        dual = fwAD.make_dual(torch.randn(2, 16, 4, 4), torch.randn(2, 16, 4, 4))
        with pytest.raises(RuntimeError, match="backend 'triton'.*forward-mode AD"):
            block(dual)


@pytest.mark.parametrize("op", ["block", "scale_fuse"])
def test_double_backward_is_a_clear_error_on_triton(op):
    if op == "block":
        block = _randomised(mod_models.MoDBasicBlock(16, capacity=4, backend="triton")).train()
        x = torch.randn(2, 16, 4, 4, requires_grad=True)
        loss = block(x).square().sum()
    else:
        x, y, w, idx, slot = _fuse_inputs()
        x.requires_grad_()
        loss = mod_kernels.scale_fuse(x, y, w, idx, slot).square().sum()
    with pytest.raises(RuntimeError, match="backend 'triton'.*double backward"):
        torch.autograd.grad(loss, x, create_graph=True)
