"""Property-based comparison of the triton backend (under Triton's interpreter on a CPU) with the
reference, over random configurations: block type, shape (C and H x W not powers of two), capacity,
fusion, router, dtype, memory format, NaN/inf placement, and how the block is run (training step,
``no_grad``, explicit in-place inference, activation checkpointing reentrant or not).

Checked each time: outputs (NaN positions exactly, values to the dtype's rounding), the selected
channels exactly, and every gradient (input and parameters) where a backward runs. Hypothesis runs
with a fixed seed per case, so CI sees the same examples every time; a failure prints the example to replay.
"""

from __future__ import annotations

import copy
import zlib

import pytest
import torch
import torch.utils.checkpoint
from helpers import assert_close
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

import mod_models

# The CPU interpreter suite: its tensors are CPU tensors, which the triton backend takes only under
# Triton's interpreter (tests/conftest.py switches it on where there is no GPU). On a GPU machine
# tests/test_kernels.py runs the kernels compiled, the deployed block included.
pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(), reason="CPU interpreter suite (CUDA machine: see test_kernels.py)"
)

BLOCK_TYPES = {
    "bottleneck": mod_models.MoDBottleneck,
    "basic": mod_models.MoDBasicBlock,
    "inverted": mod_models.MoDInvertedResidual,
}
TOLERANCE = {
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.bfloat16: dict(atol=2**-6, rtol=2**-6),
    torch.float16: dict(atol=2**-9, rtol=2**-9),
}
GRAD_TOLERANCE = dict(atol=2e-4, rtol=2e-4)
EXAMPLES_PER_CASE = 3


MODES = ("train_backward", "no_grad", "inplace_no_grad", "checkpoint", "checkpoint_reentrant")
POISONS = ("none", "nan", "inf", "nan_everywhere_in_one_channel")


@st.composite
def configurations(draw, mode=None, poison=None):
    block = draw(st.sampled_from(sorted(BLOCK_TYPES)))
    channels = draw(st.integers(6, 40))
    capacity = draw(st.integers(1, max(1, channels // 2)))
    return dict(
        block=block,
        channels=channels,
        capacity=capacity,
        batch=draw(st.integers(1, 3)),
        height=draw(st.integers(1, 6)),
        width=draw(st.integers(1, 7)),
        fusion=draw(st.sampled_from(["first_k", "last_k", "original"])),
        router=draw(st.sampled_from(["learned", "learned", "random"])),
        dtype=draw(st.sampled_from([torch.float32, torch.float32, torch.bfloat16, torch.float16])),
        channels_last=draw(st.booleans()),
        poison=poison if poison is not None else draw(st.sampled_from(POISONS)),
        mode=mode if mode is not None else draw(st.sampled_from(MODES)),
        seed=draw(st.integers(0, 2**16)),
    )


def _build(cfg):
    torch.manual_seed(cfg["seed"])
    cls = BLOCK_TYPES[cfg["block"]]
    block = cls(cfg["channels"], capacity=cfg["capacity"], fusion=cfg["fusion"], router=cfg["router"],
                backend="reference", inplace=cfg["mode"] == "inplace_no_grad")
    generator = torch.Generator().manual_seed(cfg["seed"])
    for m in block.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=generator) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
    block = block.to(cfg["dtype"])
    block.train(cfg["mode"] in ("train_backward", "checkpoint", "checkpoint_reentrant") and cfg["batch"] > 1)
    block.record_selection = True
    x = torch.randn(cfg["batch"], cfg["channels"], cfg["height"], cfg["width"], generator=generator).to(cfg["dtype"])
    if cfg["poison"] == "nan":
        x[0, cfg["channels"] // 2, 0, 0] = float("nan")
    elif cfg["poison"] == "inf":
        x[-1, 0, -1, -1] = float("inf")
    elif cfg["poison"] == "nan_everywhere_in_one_channel":
        x[:, -1] = float("nan")
    if cfg["channels_last"]:
        x = x.contiguous(memory_format=torch.channels_last)
    return block, x


def _run(block, x, cfg):
    """``(out, selection, input gradient or None, parameter gradients)`` with the RNG reset."""
    torch.manual_seed(cfg["seed"] + 1)  # the random router draws its keys here
    mode = cfg["mode"]
    if mode in ("no_grad", "inplace_no_grad"):
        with torch.no_grad():
            out = block(x.clone(memory_format=torch.preserve_format))
        return out, block.last_selection, None, []
    block.zero_grad(set_to_none=True)
    leaf = x.clone(memory_format=torch.preserve_format).requires_grad_()
    h = leaf * 1  # a non-leaf input, as inside a network
    if mode == "checkpoint":
        out = torch.utils.checkpoint.checkpoint(block, h, use_reentrant=False)
    elif mode == "checkpoint_reentrant":
        out = torch.utils.checkpoint.checkpoint(block, h, use_reentrant=True)
    else:
        out = block(h)
    selection = block.last_selection
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(cfg["seed"] + 2)).to(out.dtype)
    out.backward(grad_out)
    grads = [p.grad for p in block.parameters() if p.grad is not None]
    return out.detach(), selection, leaf.grad, grads


@pytest.mark.parametrize("poison", POISONS)
@pytest.mark.parametrize("mode", MODES)
def test_triton_backend_equals_reference(mode, poison):
    """Every run mode x poison, each over a few random configurations of everything else."""

    @seed(zlib.crc32(f"{mode}/{poison}".encode()))  # a fixed, different stream per case
    @settings(max_examples=EXAMPLES_PER_CASE, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(cfg=configurations(mode=mode, poison=poison))
    def check(cfg):
        _check_backends_agree(cfg)

    check()


def _check_backends_agree(cfg):
    block, x = _build(cfg)
    expected = _run(block, x, cfg)
    fused_block = copy.deepcopy(block)
    fused_block.backend = "triton"
    got = _run(fused_block, x, cfg)
    label = ", ".join(f"{k}={v}" for k, v in cfg.items())

    out, selection, grad_x, grads = got
    ref_out, ref_selection, ref_grad_x, ref_grads = expected
    assert torch.equal(selection, ref_selection), f"selections differ ({label})"
    assert torch.equal(torch.isnan(out), torch.isnan(ref_out)), f"NaN positions differ ({label})"
    assert_close(out, ref_out, **TOLERANCE[cfg["dtype"]], name=f"output ({label})")
    if ref_grad_x is not None and cfg["dtype"] == torch.float32:
        assert_close(grad_x, ref_grad_x, **GRAD_TOLERANCE, name=f"input gradient ({label})")
        assert len(grads) == len(ref_grads)
        for g, e in zip(grads, ref_grads):
            assert_close(g, e, **GRAD_TOLERANCE, name=f"parameter gradient ({label})")
    elif ref_grad_x is not None:  # low precision: NaN pattern and finiteness agree
        assert torch.equal(torch.isnan(grad_x), torch.isnan(ref_grad_x)), (
            f"input-gradient NaN positions differ ({label})"
        )


def test_property_strategy_covers_every_fusion_block_dtype_and_router():
    """The strategy reaches each fusion, block type, dtype and router within the examples the test
    above draws (a cheap guard that the property test is not silently narrower than its docstring)."""
    seen = {"fusion": set(), "block": set(), "dtype": set(), "router": set(), "channels_last": set()}

    for mode in MODES:
        for poison in POISONS:
            @seed(zlib.crc32(f"{mode}/{poison}".encode()))
            @settings(max_examples=EXAMPLES_PER_CASE, deadline=None, database=None)
            @given(cfg=configurations(mode=mode, poison=poison))
            def collect(cfg):
                for key in seen:
                    seen[key].add(cfg[key])

            collect()
    assert seen["fusion"] == {"first_k", "last_k", "original"} and seen["block"] == set(BLOCK_TYPES)
    assert seen["dtype"] == {torch.float32, torch.bfloat16, torch.float16}
    assert seen["router"] == {"learned", "random"} and seen["channels_last"] == {False, True}
