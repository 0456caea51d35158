"""Do two providers compute the same thing? A speedup is printed only when they do.

Comparisons are made on identical inputs and identical parameters (same ``state_dict``), in
float64, NaN never passing. The relative L2 error ``||out - ref|| / ||ref||`` is always
reported; what decides depends on the level:

* Kernel ops (:data:`KERNEL_TOLERANCE`): one op on one input, elementwise
  ``|out - ref| <= atol + rtol * |ref|`` (as ``tests/helpers.assert_close``). The selection
  ``idx`` must match exactly; floats agree to float32 rounding (fp32) or a couple of
  bf16/fp16 rounding steps (gradients are rounded more often by the unfused reference).
  Ops that run convolutions on CUDA in fp32 with TF32 allowed get :data:`TF32_TOLERANCE`.
* Whole models (:data:`MODEL_TOLERANCE`, relative L2 of the logits): hard top-k can
  legitimately flip one selection when
  two channel scores are within rounding of each other (convolution algorithms, TF32, fusion
  order), which changes that sample's output by a few percent; a wrong kernel changes it by
  O(1). The model tolerances are set between the two.
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
