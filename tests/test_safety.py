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

import mod_kernels
import mod_models
from mod_models import functional as MF

from helpers import assert_close

BACKENDS = ("reference", "triton")
BLOCKS = (
    (mod_models.MoDBasicBlock, 16, 4),
    (mod_models.MoDBottleneck, 32, 4),
    (mod_models.MoDInvertedResidual, 16, 4),
)
BLOCK_IDS = [cls.__name__ for cls, _, _ in BLOCKS]


def _randomised(block: torch.nn.Module) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(3)
    for m in block.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=generator) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=generator) * 0.1)
    return block


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
