"""Test helpers: one tensor comparison that says where and how much, and a naive MoD reference.

The naive reference below is written from the method (mod_models/functional.py's docstring) with per-sample, per-slot
Python loops and row/scalar torch ops, deliberately *not* reusing :mod:`mod_models.functional`, so
the tests compare the library against an independent statement of the method. It is slow and
only meant for small shapes. Every function is differentiable (plain torch ops, no in-place
writes into its inputs), so gradients can be compared too.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import Tensor

__all__ = [
    "assert_close",
    "naive_router_scores",
    "naive_top_k",
    "naive_gather",
    "naive_targets",
    "naive_fuse",
    "naive_mod_forward",
    "assert_teacher_forced_agreement",
    "assert_selections_explain_logits",
    "randomise_norms",
]


def assert_close(actual: Tensor, expected: Tensor, *, atol: float, rtol: float, name: str) -> None:
    """Assert ``|actual - expected| <= atol + rtol * |expected|`` elementwise, explaining any failure.

    ``torch.testing.assert_close`` on both tensors in float64 on the CPU (so they may differ in
    dtype and device), with the project's conventions: shapes must be equal (no broadcasting), NaN
    matches NaN at the same position, an infinity matches only the same infinity, and the failure
    message starts with ``name`` and the two dtypes.

    Args:
        actual: the tensor under test.
        expected: the reference tensor, same shape.
        atol: absolute tolerance.
        rtol: tolerance relative to ``|expected|``.
        name: what is compared; starts the failure message.

    Raises:
        AssertionError: naming the number of mismatches, the largest absolute and relative
            difference, and where they are.
    """
    if not isinstance(actual, Tensor) or not isinstance(expected, Tensor):
        raise TypeError(
            f"{name}: assert_close compares tensors, got {type(actual).__name__} and {type(expected).__name__}"
        )
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected shape {tuple(expected.shape)}")
    if actual.is_complex() or expected.is_complex():
        raise TypeError(f"{name}: complex tensors are not supported")
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    try:
        torch.testing.assert_close(a, e, atol=atol, rtol=rtol, equal_nan=True)
    except AssertionError as error:
        raise AssertionError(
            f"{name}: differs beyond atol={atol:g}, rtol={rtol:g} (actual {actual.dtype}, expected "
            f"{expected.dtype}, shape {tuple(a.shape)}).\n{error}"
        ) from None


# ----------------------------------------------------------------------------------------------
# Naive reference of the MoD routing / packing / fusion.
# ----------------------------------------------------------------------------------------------


def naive_router_scores(x: Tensor, fc1_weight: Tensor, fc2_weight: Tensor) -> Tensor:
    """``s[b] = sigmoid(W2 @ relu(W1 @ mean_hw(x[b])))`` one sample at a time, in float64.

    Args:
        x: ``[B, C, H, W]``.
        fc1_weight: ``[C_h, C]``.
        fc2_weight: ``[C, C_h]``.

    Returns:
        ``[B, C]`` float64 scores.
    """
    batch, channels = x.shape[:2]
    w1 = fc1_weight.double()
    w2 = fc2_weight.double()
    rows = []
    for b in range(batch):
        pooled = torch.stack([x[b, c].double().sum() / x[b, c].numel() for c in range(channels)])
        hidden = torch.stack([torch.clamp(torch.dot(w1[h], pooled), min=0.0) for h in range(w1.shape[0])])
        logits = torch.stack([torch.dot(w2[c], hidden) for c in range(channels)])
        rows.append(1.0 / (1.0 + torch.exp(-logits)))
    return torch.stack(rows)


def naive_top_k(scores: Tensor, k: int) -> Tensor:
    """``[B, k]`` int64: per row, channels by descending score, ties to the lower index.

    NaN ranks above every number (then by channel index); ``+inf`` above finite values.
    """
    out = []
    for row in scores.detach().to("cpu", torch.float64).tolist():

        def key(c: int, row=row):
            value = row[c]
            if math.isnan(value):
                return (0, 0.0, c)
            return (1, -value, c)

        out.append(sorted(range(len(row)), key=key)[:k])
    return torch.tensor(out, dtype=torch.int64, device=scores.device)


def naive_gather(x: Tensor, idx: Tensor) -> Tensor:
    """``xs[b, j] = x[b, idx[b, j]]`` -> ``[B, k, H, W]`` (NCHW-contiguous), slot by slot."""
    batch, k = idx.shape
    return torch.stack(
        [torch.stack([x[b, int(idx[b, j])] for j in range(k)]) for b in range(batch)]
    )


def naive_targets(idx: Tensor, channels: int, fusion: str) -> list[list[int]]:
    """Target channel of every slot: ``j`` (first_k), ``C - k + j`` (last_k) or ``idx[b, j]`` (original)."""
    batch, k = idx.shape
    if fusion == "first_k":
        return [[j for j in range(k)] for _ in range(batch)]
    if fusion == "last_k":
        return [[channels - k + j for j in range(k)] for _ in range(batch)]
    if fusion == "original":
        return [[int(idx[b, j]) for j in range(k)] for b in range(batch)]
    raise ValueError(f"naive_targets: unknown fusion {fusion!r}")


def naive_fuse(
    x: Tensor,
    y: Tensor,
    w: Tensor,
    idx: Tensor,
    *,
    fusion: str,
    activation: str,
    compute_dtype: torch.dtype = torch.float64,
) -> Tensor:
    """``out[b, t] = act(x[b, t] + w[b, j] * y[b, j])`` for each slot's target ``t``; other channels ``x``.

    Target channels are computed in ``compute_dtype`` and rounded once to ``x.dtype``; every
    other channel is ``x[b, c]`` itself.

    Args:
        x: ``[B, C, H, W]``.
        y: ``[B, k, H, W]``.
        w: ``[B, k]``.
        idx: ``[B, k]`` selected channels.
        fusion: ``"first_k"``, ``"last_k"`` or ``"original"``.
        activation: ``"relu"`` or ``"none"``.

    Returns:
        ``[B, C, H, W]`` in ``x.dtype`` (NCHW-contiguous).
    """
    batch, channels = x.shape[:2]
    k = idx.shape[1]
    targets = naive_targets(idx, channels, fusion)
    samples = []
    for b in range(batch):
        slot_of = {targets[b][j]: j for j in range(k)}
        if len(slot_of) != k:
            raise AssertionError(f"naive_fuse: targets of sample {b} are not distinct: {targets[b]}")
        planes = []
        for c in range(channels):
            if c not in slot_of:
                planes.append(x[b, c])
                continue
            j = slot_of[c]
            value = x[b, c].to(compute_dtype) + w[b, j].to(compute_dtype) * y[b, j].to(compute_dtype)
            if activation == "relu":
                value = torch.clamp(value, min=0.0)
            elif activation != "none":
                raise ValueError(f"naive_fuse: unknown activation {activation!r}")
            planes.append(value.to(x.dtype))
        samples.append(torch.stack(planes))
    return torch.stack(samples)


def naive_mod_forward(
    x: Tensor,
    scores: Tensor,
    k: int,
    process: Callable[[Tensor], Tensor],
    *,
    fusion: str,
    activation: str,
    idx: Optional[Tensor] = None,
    unit_scores: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """The whole non-conv path of a MoD block around a given ``f_k``.

    ``idx = top-k(scores)`` (or the given ``idx``), ``w = scores[b, idx[b, j]]`` (or 1 when
    ``unit_scores``), ``y = process(xs)``, then the fusion.

    Returns:
        ``(out [B, C, H, W], idx [B, k], w [B, k])``.
    """
    if idx is None:
        idx = naive_top_k(scores, k)
    batch = x.shape[0]
    if unit_scores:
        w = torch.ones(batch, k, dtype=torch.float64, device=x.device)
    else:
        w = torch.stack([torch.stack([scores[b, int(idx[b, j])] for j in range(k)]) for b in range(batch)])
    y = process(naive_gather(x, idx))
    out = naive_fuse(x, y, w, idx, fusion=fusion, activation=activation)
    return out, idx, w


# Teacher forcing (bench/agreement.py explains the numbers): logits under the fused selections, and
# the score gap a flipped selection may have. Scores are fp32 whatever the model's dtype.
FORCED_LOGITS_RTOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 2e-2}
NEAR_TIE = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1e-3}


def assert_teacher_forced_agreement(
    model: torch.nn.Module, x: torch.Tensor, label: str, reference: Optional[torch.nn.Module] = None,
    backend: str = "triton",
) -> None:
    """The fused model's selections, forced on the reference backend, reproduce its logits, and
    each selection is a stable top-k of the reference's own scores up to a near-tie.

    ``model`` runs on ``backend`` (default ``"triton"``); ``reference`` (default: a copy of ``model``) runs
    on the ``"reference"`` backend with each MoD block forced to the fused block's selection (the
    deploy-form tests pass the unfolded model the deploy form was made from).

    Through ~20 blocks in 16-bit a one-ulp difference of a block output can flip a near-tie
    selection downstream and change the logits legitimately; this check passes such flips and
    fails a wrong selection or a wrong fusion."""
    import copy

    import mod_models

    reference = mod_models.set_backend(copy.deepcopy(model) if reference is None else reference, "reference")
    fused_model = mod_models.set_backend(model, backend)
    fused_blocks = [m for m in fused_model.modules() if isinstance(m, mod_models.MoDBlock)]
    for block in fused_blocks:
        block.record_selection = True
    with torch.no_grad():
        fused = fused_model(x)
    assert_selections_explain_logits(reference, [b.last_selection.clone() for b in fused_blocks], fused, x, label)


def assert_selections_explain_logits(
    reference: torch.nn.Module, selections: list, logits: torch.Tensor, x: torch.Tensor, label: str
) -> None:
    """Teacher forcing with selections from anywhere (a fused backend, a compiled model): ``reference``
    (run on the ``"reference"`` backend, each MoD block forced to its entry of ``selections``, in
    module order) reproduces ``logits``, and each selection is a stable top-k of the reference's own
    scores up to a near-tie. ``reference`` is changed (backend, forced selections, recording)."""
    import mod_models

    dtype = x.dtype
    reference = mod_models.set_backend(reference, "reference")
    reference_blocks = [m for m in reference.modules() if isinstance(m, mod_models.MoDBlock)]
    assert len(selections) == len(reference_blocks), (
        f"{label}: {len(selections)} selections for {len(reference_blocks)} blocks"
    )
    for block, selection in zip(reference_blocks, selections):
        block.forced_selection = selection
        block.record_selection = True
    with torch.no_grad():
        forced = reference(x).float()
    fused = logits.float()
    relative = ((fused - forced).norm() / forced.norm()).item()
    assert relative <= FORCED_LOGITS_RTOL[dtype], f"{label}: logits under the fused selections differ by {relative:.3g}"
    tie = NEAR_TIE[dtype]
    for number, block in enumerate(reference_blocks):
        scores, selection = block.last_scores.float(), block.forced_selection
        chosen = scores.gather(1, selection)
        kth_best = scores.topk(selection.shape[1], dim=1).values[:, -1]
        assert (chosen.min(dim=1).values >= kth_best - tie).all(), (
            f"{label}: block {number} selected a non-top-k channel"
        )
        if selection.shape[1] > 1:
            rises = (chosen[:, 1:] - chosen[:, :-1]).max().item()
            assert rises <= tie, f"{label}: block {number} slot order is not descending (rise {rises:.3g})"


def randomise_norms(module: torch.nn.Module, seed: int = 1, *, bias_scale: float = 0.1,
                    affine: bool = True) -> torch.nn.Module:
    """Non-trivial batch-norm statistics (and affine parameters) so that eval mode, folding and
    gradients are not degenerate; returns ``module``. ``bias_scale``: standard deviation of the
    biases; ``affine=False`` leaves the weights and biases at their initial values."""
    generator = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=generator) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
            if affine:
                m.weight.data.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
                m.bias.data.copy_(torch.randn(m.num_features, generator=generator) * bias_scale)
    return module
