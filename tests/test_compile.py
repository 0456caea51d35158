"""``torch.compile`` (Inductor, CPU) of MoD models, with and without Inductor's freezing.

Freezing (``torch._inductor.config.freezing = True``) is PyTorch's setting for CPU inference: under
``no_grad`` it turns parameters into constants and lets Inductor prepack the convolutions. Every
zoo model compiles with it on and off, as trained (eval mode) and in the deploy form, and computes
what eager PyTorch computes. Compiled selections are read back (``record_selection``) and checked by
teacher forcing, as the benchmark does: the eager reference forced to them reproduces the compiled
logits, and each one is a stable top-k of the reference's own scores up to a near-tie (fresh weights
put router scores within fp32 rounding of each other, so a compiled convolution may flip one).

Compiling costs about a minute of C++ compilation per model on a small CPU, so a quick set runs by
default (resnet18_mod, resnet50_mod and mobilenet_v2_mod, each with freezing on and off, the forms
alternating) and the rest of the sweep is marked slow.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import assert_close, assert_selections_explain_logits, randomise_norms
from torch import nn

import mod_models

QUICK = {
    ("resnet18_mod", "eval", False), ("resnet18_mod", "deploy", True),
    ("resnet50_mod", "deploy", False), ("resnet50_mod", "eval", True),
    ("mobilenet_v2_mod", "eval", False), ("mobilenet_v2_mod", "deploy", True),
}
CASES = [
    pytest.param(name, form, freezing, marks=() if (name, form, freezing) in QUICK else pytest.mark.slow,
                 id=f"{name}-{form}-{'freezing' if freezing else 'no-freezing'}")
    for name in sorted(mod_models.MOD_BUILDERS) for form in ("eval", "deploy") for freezing in (False, True)
]


def compile_and_run(module: nn.Module, x: torch.Tensor, *, freezing: bool) -> torch.Tensor:
    """``torch.compile(module, fullgraph=True)(x)`` under ``no_grad``, compiled afresh (Dynamo's cache
    reset: models of one class share ``forward``, and past its recompile limit Dynamo would run it
    eagerly)."""
    torch._dynamo.reset()
    with torch.no_grad(), torch._inductor.config.patch(freezing=freezing):
        return torch.compile(module, fullgraph=True)(x.clone())


def test_freezing_compiles_a_mod_block_that_feeds_a_strided_block():
    """A MoD block followed by a block whose downsample convolution reads the fused output failed to
    compile with freezing on ("FakeTensorUpdater cannot recompute metadata for tracked
    _inductor_lowering_function nodes", torch 2.14.1): the fusion wrote its k target channels with a
    slice copy (a ``slice_scatter`` in the graph), and Inductor's reinplacing pass rewrites that node
    after freezing has turned the two convolutions that read it into mkldnn lowerings, whose metadata
    it then refuses to recompute. Pure PyTorch, the same failure::

        torch._inductor.config.freezing = True
        conv_a, conv_b = nn.Conv2d(8, 16, 1).eval(), nn.Conv2d(8, 16, 1).eval()

        def f(x):
            out = torch.slice_scatter(x, x[:, :2] * 2, 1, 0, 2)  # or x.clone(); out[:, :2].copy_(...)
            return conv_a(out) + conv_b(out)

        with torch.no_grad():
            torch.compile(f)(torch.randn(1, 8, 8, 8))

    Under graph capture the fusion now writes its targets with ``index_put`` (same values, same places).
    """
    torch.manual_seed(0)
    model = randomise_norms(mod_models.resnet18_mod(backend="reference")).eval()
    pair = nn.Sequential(model.layer1[1], model.layer2[0])
    x = torch.randn(1, 64, 16, 16)
    block = model.layer1[1]
    block.record_selection = True
    with torch.no_grad():
        expected = pair(x.clone())
    scores = block.last_scores.sort(dim=1, descending=True).values
    assert (scores[:, block.k - 1] - scores[:, block.k]).min() > 1e-4, "the test input holds a near-tie"
    got = compile_and_run(pair, x, freezing=True)
    assert_close(got, expected, atol=1e-5, rtol=1e-5, name="compiled MoD block + strided block (freezing)")


@pytest.mark.parametrize("name, form, freezing", CASES)
def test_compiled_model_computes_what_eager_computes(name, form, freezing):
    torch.manual_seed(0)
    model = randomise_norms(mod_models.build_model(name, num_classes=10, backend="reference")).eval()
    if form == "deploy":
        model = mod_models.optimize_for_inference(model)
    reference = copy.deepcopy(model)
    blocks = [m for m in model.modules() if isinstance(m, mod_models.MoDBlock)]
    for block in blocks:
        block.record_selection = True
    x = torch.randn(1, 3, 32, 32)
    logits = compile_and_run(model, x, freezing=freezing)
    selections = [block.last_selection.clone() for block in blocks]
    assert all(type(s) is torch.Tensor for s in selections)  # read back from the compiled run
    label = f"{name} {form}, compiled{' with freezing' if freezing else ''}"
    assert_selections_explain_logits(reference, selections, logits, x, label)
