"""Do two providers compute the same thing? A speedup is printed only when they do.

Comparisons are made on identical inputs and identical parameters (same ``state_dict``), in
float64, NaN never passing. The relative L2 error ``||out - ref|| / ||ref||`` is always
reported; what decides depends on the level:

* Kernel ops (:data:`KERNEL_TOLERANCE`): one op on one input, elementwise
  ``|out - ref| <= atol + rtol * |ref|`` (as ``tests/helpers.assert_close``). The selection
  ``idx`` must match exactly; floats agree to float32 rounding (fp32) or a couple of
  bf16/fp16 rounding steps (gradients are rounded more often by the unfused reference).
  Ops that run convolutions on CUDA in fp32 with TF32 allowed get :data:`TF32_TOLERANCE`.
* Whole models, selections readable (:func:`teacher_forced`; eager reference/triton, ONNX
  Runtime): hard top-k legitimately flips a selection where two channel scores are within
  rounding of each other (convolution algorithms, TF32, fusion order), and from there the
  logits differ by O(1), so the logits alone cannot tell a near-tie flip from a broken kernel.
  Instead the eager reference is rerun with every block forced to the provider's selection
  ("teacher forcing"), and (a) its logits must match the provider's within
  :func:`forced_model_tolerance` (same selections: the arithmetic agrees up to rounding), and
  (b) in every block and sample the provider's selection must be a stable top-k of the forced
  run's own scores up to :func:`score_tolerance` (every difference from the reference's own
  choice is a near-tie). Measured with fresh weights (batch 1, CPU, 224 px): ONNX Runtime vs
  the reference, fp32, resnet101_mod/resnet152_mod/mobilenet_v2_mod: logits under forced
  selections within 5e-7 (relative L2), near-tie flips with score gaps <= 1.2e-7 (2 fp32 ulps
  at 1.0: saturated scores tie exactly); the reference in channels_last vs NCHW in bf16 (other
  convolution rounding in every layer, a harsher case than fused vs unfused routing, which
  share the convolutions; resnet101_mod/resnet152_mod, batch 1-8): logits within 3.5e-3, flip
  gaps <= 1.9e-4. Scores of freshly initialised models cluster (mobilenet_v2_mod: within ~1e-5
  per sample), so there check (b) can only confirm a near-tie; check (a) still catches any
  error in packing, f_k, scaling or fusion.
* Whole models, selections not readable (torch.compile, CUDA graph replays;
  :data:`MODEL_TOLERANCE`, relative L2 of the logits vs the eager reference's): set between a
  near-tie flip's effect on a shallow network (a few percent) and a wrong kernel's (O(1)); a
  deep network can still exceed it after a legitimate flip (then "outputs differ": no ratio).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Union

import torch
from torch import Tensor

# dtype -> (rtol, atol)
KERNEL_TOLERANCE = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-4, 1e-5),
    torch.float16: (1e-2, 1e-3),
    torch.bfloat16: (2e-2, 2e-2),
}
TF32_TOLERANCE = (5e-3, 5e-3)
MODEL_TOLERANCE = {torch.float32: 1e-2, torch.float64: 1e-6, torch.bfloat16: 5e-2, torch.float16: 5e-2}
# Teacher forcing, (a): relative L2 of the logits, provider vs the reference forced to its selections.
# fp32: 200x the measured 5e-7, 100x below MODEL_TOLERANCE. fp64 models route on fp32 scores (w
# differs by fp32 ulps), hence fp32-level. bf16: ~6x the 3.5e-3 measured with different convolution
# rounding in every layer (resnet101_mod/resnet152_mod, batch 1-8); fp16 (3.8e-4 measured) and
# TF32 convolutions (10 mantissa bits against bf16's 7) round less and share it.
FORCED_MODEL_TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-2}
FORCED_TF32_TOLERANCE = 2e-2
# Teacher forcing, (b): score tolerance tau. Scores are fp32 in (0, 1) whatever the model dtype.
# fp32: ~8 fp32 eps (16 ulps at 0.5), 8x the measured 1.2e-7 and below the spread of the scores
# in most blocks, so a wrong selection is not waved through. bf16/fp16/TF32: once the paths
# diverge the block inputs differ by low-precision rounding (eps 3.9e-3 / 9.8e-4), which moves
# scores by up to 1.9e-4 measured (resnet152_mod, bf16, batch 8); 1e-3 is 5x that and still
# far below the ResNets' score spread (0.08 to 0.85 per sample).
SCORE_TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-6, torch.bfloat16: 1e-3, torch.float16: 1e-3}
SCORE_TF32_TOLERANCE = 1e-3

Outputs = Union[Tensor, Sequence[Tensor]]  # noqa: UP007 - a runtime alias, Python 3.10 has no `type`


@dataclass(frozen=True)
class Agreement:
    """Result of one comparison: ``ok`` when every compared tensor is within tolerance.

    ``tolerance`` is the relative tolerance (rtol); ``atol`` is set for elementwise comparisons.
    """

    ok: bool
    rel_err: float
    tolerance: float
    detail: str = ""
    atol: float | None = None
    max_tensor_rel_err: float | None = None

    def as_dict(self) -> dict:
        out = asdict(self)
        for key in ("rel_err", "max_tensor_rel_err"):
            if out[key] is not None and not math.isfinite(out[key]):
                out[key] = None
        return out


def relative_error(out: Tensor, ref: Tensor) -> float:
    """``||out - ref||_2 / ||ref||_2`` in float64 (``nan`` if anything is non-finite)."""
    if out.shape != ref.shape:
        return float("nan")
    out64 = out.detach().to(torch.float64)
    ref64 = ref.detach().to(torch.float64)
    if not bool(torch.isfinite(out64).all()) or not bool(torch.isfinite(ref64).all()):
        return float("nan")
    denom = float(torch.linalg.vector_norm(ref64))
    num = float(torch.linalg.vector_norm(out64 - ref64))
    if denom == 0.0:
        return 0.0 if num == 0.0 else float("inf")
    return num / denom


def _as_list(outputs: Outputs) -> list[Tensor]:
    if isinstance(outputs, Tensor):
        return [outputs]
    return list(outputs)


def _elementwise_failure(out: Tensor, ref: Tensor, rtol: float, atol: float) -> str:
    """Empty when ``|out - ref| <= atol + rtol |ref|`` everywhere; else where and how much it is not."""
    a = out.detach().to(torch.float64)
    e = ref.detach().to(torch.float64)
    diff = (a - e).abs()
    allowed = atol + rtol * e.abs()
    bad = ~(torch.isfinite(a) & torch.isfinite(e) & (diff <= allowed))
    count = int(bad.sum())
    if count == 0:
        return ""
    excess = torch.where(bad, torch.nan_to_num(diff - allowed, nan=math.inf), torch.full_like(diff, -math.inf))
    flat = int(torch.argmax(excess.reshape(-1)))
    where = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), a.shape))
    return (f"{count} of {a.numel()} elements beyond atol={atol:g}, rtol={rtol:g}; worst at {where}: "
            f"{a[where].item():.6g} vs {e[where].item():.6g}")


def compare(outputs: Outputs, reference: Outputs, tolerance: float, *, atol: float | None = None,
            exact: Sequence[int] = ()) -> Agreement:
    """Compare tensors pairwise.

    Args:
        outputs, reference: a tensor or a sequence of tensors each.
        tolerance: rtol. With ``atol`` None: the relative L2 error of each tensor must be
            ``<= tolerance``; with ``atol``: elementwise ``|out - ref| <= atol + rtol |ref|``.
        exact: positions (e.g. ``idx``) that must be equal; integer tensors always are.

    Returns:
        ``rel_err``: the relative L2 error of all floating tensors together (one vector), and
        ``max_tensor_rel_err``: the worst single tensor's (large for a tensor near zero, such as
        a BatchNorm weight gradient, where elementwise ``atol`` decides); a note on the first failure.
    """
    outs, refs = _as_list(outputs), _as_list(reference)
    if len(outs) != len(refs):
        return Agreement(False, float("nan"), tolerance, f"{len(outs)} outputs vs {len(refs)} in the reference", atol)
    worst = 0.0
    num2 = den2 = 0.0
    detail = ""
    ok = True
    for position, (out, ref) in enumerate(zip(outs, refs)):
        if out.shape != ref.shape:
            return Agreement(False, float("nan"), tolerance,
                             f"output {position}: shape {tuple(out.shape)} vs {tuple(ref.shape)}", atol)
        if ref.is_floating_point() and position not in exact:
            diff = (out.detach().to(torch.float64) - ref.detach().to(torch.float64))
            num2 += float(torch.linalg.vector_norm(diff)) ** 2
            den2 += float(torch.linalg.vector_norm(ref.detach().to(torch.float64))) ** 2
        if position in exact or not ref.is_floating_point():
            mismatched = (out.reshape(out.shape[0], -1) != ref.reshape(ref.shape[0], -1)).any(dim=1)
            rows = int(mismatched.sum())
            if rows:
                ok = False
                detail = detail or f"output {position}: differs in {rows} of {out.shape[0]} rows"
            continue
        err = relative_error(out, ref)
        if atol is None:
            failure = "" if err <= tolerance else f"relative error {err:.3g} > {tolerance:g}"
        else:
            failure = _elementwise_failure(out, ref, tolerance, atol)
        if failure:
            ok = False
            detail = detail or f"output {position}: {failure}"
        worst = err if (math.isnan(err) or err > worst) else worst
    overall = math.sqrt(num2) / math.sqrt(den2) if den2 > 0 else (0.0 if num2 == 0 else float("inf"))
    if math.isnan(worst):
        overall = float("nan")
    return Agreement(ok, overall, tolerance, detail, atol, worst)


def kernel_tolerance(dtype: torch.dtype, *, tf32_convs: bool = False) -> tuple[float, float]:
    """``(rtol, atol)`` of a kernel op in ``dtype``; ``tf32_convs`` for fp32 ops that run TF32 convolutions."""
    if dtype == torch.float32 and tf32_convs:
        return TF32_TOLERANCE
    return KERNEL_TOLERANCE[dtype]


def model_tolerance(dtype: torch.dtype) -> float:
    return MODEL_TOLERANCE[dtype]


def forced_model_tolerance(dtype: torch.dtype, *, tf32_convs: bool = False) -> float:
    """Relative L2 tolerance of the logits under forced selections (teacher forcing, check (a))."""
    if dtype == torch.float32 and tf32_convs:
        return FORCED_TF32_TOLERANCE
    return FORCED_MODEL_TOLERANCE[dtype]


def score_tolerance(dtype: torch.dtype, *, tf32_convs: bool = False) -> float:
    """Score tolerance tau of a near-tie (teacher forcing, check (b)) for a model in ``dtype``."""
    if dtype == torch.float32 and tf32_convs:
        return SCORE_TF32_TOLERANCE
    return SCORE_TOLERANCE[dtype]


def selection_gap(selection: Tensor, scores: Tensor) -> Tensor:
    """``[B]`` float64: how far each row of ``selection`` is from a stable top-k of ``scores``.

    ``selection: [B, k]`` int64 channels in slot order, ``scores: [B, C]``. The gap is the larger
    of ``max(unselected) - min(selected)`` (the set) and ``max_j s[j+1] - s[j]`` over the slots
    (the order, which decides the fusion target of each slot), clamped at 0: 0 means a valid
    top-k (ties in any order), ``g > 0`` that it is one if scores may move by ``g``. Non-finite
    scores give ``inf``.
    """
    s = scores.detach().to(torch.float64)
    idx = selection.to(device=s.device, dtype=torch.int64)
    chosen = s.gather(1, idx)
    gap = torch.zeros(s.shape[0], dtype=torch.float64, device=s.device)
    if idx.shape[1] < s.shape[1]:
        unselected = torch.ones_like(s, dtype=torch.bool).scatter_(1, idx, False)
        best_left = torch.where(unselected, s, torch.full_like(s, -math.inf)).amax(dim=1)
        gap = torch.maximum(gap, best_left - chosen.amin(dim=1))
    if idx.shape[1] > 1:
        gap = torch.maximum(gap, (chosen[:, 1:] - chosen[:, :-1]).amax(dim=1))
    finite = torch.isfinite(s).all(dim=1)
    return torch.where(finite, gap.clamp(min=0.0), torch.full_like(gap, math.inf))


@dataclass(frozen=True)
class SelectionCheck:
    """Check (b) of teacher forcing over every (block, sample) row.

    ``flipped``: rows whose selection (slot order) differs from the forced run's own stable
    top-k; ``max_flip_gap``: the largest :func:`selection_gap` among them; ``invalid``: rows
    whose gap exceeds the score tolerance (no near-tie); ``worst``: where the largest gap is.
    """

    rows: int
    flipped: int
    max_flip_gap: float
    invalid: int
    worst_gap: float
    worst: str
    flips_by_block: dict

    @property
    def ok(self) -> bool:
        return self.invalid == 0


def check_selections(selections: dict[str, Tensor], scores: dict[str, Tensor], score_tol: float) -> SelectionCheck:
    """Check (b): each ``selections[block]`` ``[B, k]`` against ``scores[block]`` ``[B, C]`` (the forced run's)."""
    from mod_models.functional import select_top_k

    rows = flipped = invalid = 0
    max_flip_gap = worst_gap = 0.0
    worst = ""
    by_block: dict[str, int] = {}
    for name, selection in selections.items():
        block_scores = scores[name].detach()
        selection = selection.to(block_scores.device)
        gap = selection_gap(selection, block_scores)
        own = select_top_k(block_scores, selection.shape[1])
        flips = (own != selection).any(dim=1)
        rows += selection.shape[0]
        invalid += int((gap > score_tol).sum())
        if bool(flips.any()):
            flipped += int(flips.sum())
            by_block[name] = int(flips.sum())
            max_flip_gap = max(max_flip_gap, float(gap[flips].max()))
        top = int(torch.argmax(gap))
        if float(gap[top]) > worst_gap:
            worst_gap, worst = float(gap[top]), f"{name} sample {top}"
    return SelectionCheck(rows, flipped, max_flip_gap, invalid, worst_gap, worst, by_block)


def teacher_forced(
    provider_logits: Tensor,
    forced_logits: Tensor,
    check: SelectionCheck,
    *,
    tolerance: float,
    score_tol: float,
) -> dict:
    """The model agreement record of teacher forcing: (a) logits and (b) selections, both must pass.

    Returns a JSON-ready dict: ``ok``, ``method`` ("teacher_forcing"), ``rel_err`` (logits error
    under forced selections) with its ``tolerance``, ``score_tolerance``, ``selections`` (rows
    checked), ``flipped_selections``, ``max_flip_gap``, ``invalid_selections``,
    ``worst_selection_gap`` (and where), ``flips_by_block`` and a ``detail`` line.
    """
    logits = compare(provider_logits.float(), forced_logits.float(), tolerance)
    problems = []
    if not logits.ok:
        problems.append(f"logits under forced selections: {logits.detail or 'differ'}")
    if not check.ok:
        problems.append(
            f"{check.invalid} of {check.rows} selections are no top-k within score tolerance {score_tol:g} "
            f"(worst gap {check.worst_gap:.3g} at {check.worst})"
        )
    if problems:
        detail = "; ".join(problems)
    elif check.flipped:
        detail = (f"{check.flipped} of {check.rows} selections differ from the reference's own top-k, "
                  f"all near-ties (largest score gap {check.max_flip_gap:.3g})")
    else:
        detail = f"all {check.rows} selections equal the reference's own top-k"
    return {
        "ok": not problems, "method": "teacher_forcing",
        "rel_err": logits.as_dict()["rel_err"], "tolerance": tolerance, "detail": detail,
        "score_tolerance": score_tol, "selections": check.rows, "flipped_selections": check.flipped,
        "max_flip_gap": check.max_flip_gap, "invalid_selections": check.invalid,
        "worst_selection_gap": check.worst_gap if math.isfinite(check.worst_gap) else None,
        "worst_selection": check.worst, "flips_by_block": dict(check.flips_by_block),
    }
