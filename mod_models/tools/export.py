"""Export and deployment: ``torch.export``, ONNX (checked against ONNX Runtime), CPU latency.

* :func:`export_program` traces a model with :func:`torch.export.export` (reference backend,
  eval mode, optional dynamic batch); :func:`torch.export.save` stores it as ``.pt2``.
* :func:`export_onnx` writes an ONNX model with ``torch.onnx.export(..., dynamo=True)``, the
  exporter's standard call, which takes MoD models directly: while it traces, each MoD block
  records its reference path in ONNX's ops, whatever its backend (the stable descending sort as
  ``TopK`` over the full axis, :func:`mod_models.functional.stable_sort_via_topk`: ONNX defines
  ``TopK`` to break ties by the lower index and ONNX Runtime ranks NaN first, exactly as the stable
  sort does; the k selected and target planes as ``GatherND`` / ``ScatterND``).
  With ``with_selections=True`` the ONNX model also returns each MoD block's selected channels
  ``[B, k]`` (outputs ``selection.<block>``), so deployments can check routing too.
  Every written ONNX model passes ``onnx.checker.check_model`` (full check) or is removed.
* :func:`onnx_parity` runs the ONNX model in ONNX Runtime on the CPU and compares logits
  (within a tolerance; the same NaN / infinity in both counts as agreement) and every block's
  selection (exactly) with PyTorch.
* :func:`ort_cpu_latency` / :func:`torch_cpu_latency`: CPU latency measured with
  ``torch.utils.benchmark`` (warm-up, then repeated until the spread is small or a time budget is
  spent): median, 20th/80th percentiles and whether the spread is small enough to trust.

Models with ``router="random"`` draw their channels from PyTorch's RNG at every call: they are
refused by :func:`export_onnx` (ONNX cannot reproduce that draw, and ``torch.export`` cannot
trace it with a dynamic batch) and by :func:`export_program` with ``dynamic_batch=True``.

``python -m mod_models.tools.export --checkpoint runs/r18/best.pt --out runs/r18/export --check --latency``
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import statistics
import sys
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from ..blocks import MoDBlock, set_backend
from ..functional import stable_sort_via_topk
from ..train.cli_args import (
    EXIT_INPUT_ERROR,
    CliParser,
    check_writable_folder,
    image_size_int,
    int_at_least,
    positive_float,
    positive_int,
    print_error,
    seed_int,
)

LOGITS_NAME = "logits"
INPUT_NAME = "images"
SELECTION_PREFIX = "selection."


def _mod_blocks(model: nn.Module) -> list[tuple[str, MoDBlock]]:
    return [(name, module) for name, module in model.named_modules() if isinstance(module, MoDBlock)]


def check_exportable(model: nn.Module, *, dynamic_batch: bool = True) -> None:
    """Raise ``ValueError`` for a model whose MoD blocks route randomly (``router="random"``).

    Their selection is a fresh ``torch.rand`` draw at every call: ONNX has no counterpart of
    PyTorch's generator, and ``torch.export`` cannot trace the draw with a dynamic batch.
    """
    random_blocks = [name for name, block in _mod_blocks(model) if block.router is None]
    if random_blocks:
        what = "ONNX export or torch.export with a dynamic batch" if dynamic_batch else "ONNX export"
        raise ValueError(
            f"the model routes randomly (router='random', blocks {', '.join(random_blocks[:4])}"
            f"{', ...' if len(random_blocks) > 4 else ''}): it draws its channels from PyTorch's RNG at every "
            f"call, which {what} cannot reproduce; export a model trained with the learned router"
        )


def prepare_for_export(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` in eval mode with every MoD block on the reference backend."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    prepared = copy.deepcopy(model).eval()
    if _mod_blocks(prepared):
        set_backend(prepared, "reference")
    return prepared


class WithSelections(nn.Module):
    """Wraps a model so that ``forward(x)`` returns ``(logits, idx_0, idx_1, ...)``.

    ``idx_i: [B, k_i]`` int64 are the channels MoD block ``i`` selected (slot order), in the
    order of :attr:`block_names`. Works in eager mode, under ``torch.export`` and in ONNX.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        blocks = _mod_blocks(model)
        self.block_names = [name for name, _ in blocks]
        self._blocks = [block for _, block in blocks]  # plain list: not registered twice

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        for block in self._blocks:
            block.record_selection = True
        try:
            logits = self.model(x)
            selections = [block.last_selection for block in self._blocks]
        finally:
            for block in self._blocks:
                block.record_selection = False
                block.last_selection = block.last_scores = None
        return (logits, *selections)


def _example_input(example: Tensor | Sequence[int]) -> Tensor:
    if isinstance(example, Tensor):
        if example.dim() != 4 or not example.is_floating_point():
            raise ValueError(
                f"example input must be a floating [B, 3, H, W] tensor, got {example.dtype} {tuple(example.shape)}"
            )
        return example
    shape = tuple(example)
    if len(shape) != 4 or any(not isinstance(s, int) or s < 1 for s in shape):
        raise ValueError(f"example shape must be 4 positive ints [B, C, H, W], got {example!r}")
    return torch.randn(shape)


def _dynamic_batch(x: Tensor) -> tuple[dict[int, Any]]:
    if x.shape[0] < 2:
        raise ValueError("dynamic_batch needs an example batch of at least 2 (torch.export specialises size 1)")
    return ({0: torch.export.Dim("batch", min=1, max=4096)},)


def export_program(
    model: nn.Module,
    example: Tensor | Sequence[int],
    *,
    dynamic_batch: bool = True,
    with_selections: bool = False,
) -> torch.export.ExportedProgram:
    """``torch.export`` of ``model`` (a prepared copy: eval mode, reference backend).

    Args:
        model: a MoD model or a torchvision baseline.
        example: an example input ``[B, 3, H, W]`` or its shape.
        dynamic_batch: export the batch dimension as dynamic (the example's batch must then be >= 2;
            random-router models cannot, see :func:`check_exportable`).
        with_selections: also return every MoD block's selection (see :class:`WithSelections`).
    """
    x = _example_input(example)
    prepared = prepare_for_export(model)
    if dynamic_batch:
        check_exportable(prepared, dynamic_batch=True)
    module: nn.Module = WithSelections(prepared) if with_selections else prepared
    dynamic_shapes = _dynamic_batch(x) if dynamic_batch else None
    with warnings.catch_warnings():
        # WithSelections reads selections that the blocks keep as plain attributes; they are
        # cleared before forward returns, so the program holds no stale state.
        warnings.filterwarnings("ignore", message=".*were assigned during export.*")
        return torch.export.export(module, (x,), dynamic_shapes=dynamic_shapes)


def onnx_ready_program(program: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """``program`` (a ``torch.export`` of a MoD model, e.g. from :func:`export_program`) with every stable
    sort replaced by :func:`mod_models.functional.stable_sort_via_topk`, the form the MoD blocks take
    in an ONNX export: ``torch.onnx.export(onnx_ready_program(program), dynamo=True)`` then works."""
    table = torch.export.default_decompositions()
    table[torch.ops.aten.sort.stable] = stable_sort_via_topk
    return program.run_decompositions(table)


@dataclass
class OnnxExport:
    """Where an ONNX model was written and what its inputs/outputs are called."""

    path: str
    input_name: str
    output_names: list[str]
    block_names: list[str]


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    example: Tensor | Sequence[int],
    *,
    with_selections: bool = True,
    dynamic_batch: bool = True,
    opset: Optional[int] = None,
) -> OnnxExport:
    """Export the reference path of ``model`` to ONNX at ``path``.

    Args:
        model: a MoD model or a torchvision baseline (unchanged; a prepared copy is exported).
        path: output ``.onnx`` file.
        example: example input ``[B, 3, H, W]`` (or its shape; batch >= 2 with ``dynamic_batch``).
        with_selections: add one ``selection.<block>`` output ``[B, k]`` int64 per MoD block.
        dynamic_batch: make the batch dimension dynamic.
        opset: ONNX opset (None: the exporter's default).

    Raises:
        ValueError: a random-router model (see :func:`check_exportable`) or a bad example.
        OnnxCheckError: the written model fails ``onnx.checker.check_model`` (it is removed).
    """
    try:
        import onnxscript  # noqa: F401  (the ONNX exporter needs it)
    except ImportError as error:
        raise ImportError(
            "ONNX export needs the packages onnx and onnxscript: pip install 'mod-cnn[export]'"
        ) from error
    path = os.fspath(path)
    check_exportable(model, dynamic_batch=dynamic_batch)
    x = _example_input(example)
    prepared = prepare_for_export(model)
    module: nn.Module = WithSelections(prepared).eval() if with_selections else prepared
    block_names = [name for name, _ in _mod_blocks(model)] if with_selections else []
    output_names = [LOGITS_NAME] + [SELECTION_PREFIX + name for name in block_names]
    kwargs: dict[str, Any] = {"input_names": [INPUT_NAME], "output_names": output_names, "dynamo": True}
    if dynamic_batch:
        kwargs["dynamic_shapes"] = _dynamic_batch(x)
    if opset is not None:
        kwargs["opset_version"] = opset
    with warnings.catch_warnings(), open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        # The exporter prints its steps; WithSelections reads selections that the blocks keep as plain
        # attributes, cleared before forward returns, so the graph holds no stale state.
        warnings.filterwarnings("ignore", message=".*were assigned during export.*")
        onnx_program = torch.onnx.export(module, (x,), **kwargs)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    onnx_program.save(path)
    check_onnx_file(path)
    return OnnxExport(path=path, input_name=INPUT_NAME, output_names=output_names, block_names=block_names)


class OnnxCheckError(RuntimeError):
    """An exported ONNX model that ``onnx.checker`` rejects (the file is removed)."""


def check_onnx_file(path: str | os.PathLike) -> None:
    """``onnx.checker.check_model(path, full_check=True)``; on failure remove ``path`` and raise
    :class:`OnnxCheckError`."""
    import onnx

    path = os.fspath(path)
    try:
        onnx.checker.check_model(path, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
        with contextlib.suppress(OSError):
            os.unlink(path)
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise OnnxCheckError(f"the exported ONNX model fails onnx.checker and was removed: {first_line}") from None


def ort_session(path: str | os.PathLike, *, threads: Optional[int] = None):
    """An ONNX Runtime CPU session for ``path`` (``threads`` intra-op threads; None: ORT's default)."""
    try:
        import onnxruntime as ort
    except ImportError as error:
        raise ImportError("needs onnxruntime: pip install 'mod-cnn[export]'") from error
    options = ort.SessionOptions()
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads must be None or an int >= 1, got {threads!r}")
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(os.fspath(path), sess_options=options, providers=["CPUExecutionProvider"])


@dataclass
class ParityReport:
    """Result of :func:`onnx_parity`.

    ``mismatched_selections`` counts, per block, the samples whose ONNX selection differs from
    PyTorch's beyond ``score_tol``; ``near_tie_selections`` those that differ only by swapping
    channels whose router scores lie within ``score_tol`` of each other (fp32 rounding in a
    different runtime may legitimately order such near-ties either way).
    """

    max_abs_diff: float
    outputs_close: bool
    selections_equal: bool
    mismatched_selections: dict[str, int] = field(default_factory=dict)
    near_tie_selections: dict[str, int] = field(default_factory=dict)
    atol: float = 0.0
    rtol: float = 0.0
    score_tol: float = 0.0
    batch: int = 0

    @property
    def ok(self) -> bool:
        return self.outputs_close and self.selections_equal


def outputs_agree(reference: Tensor, other: Tensor, *, atol: float, rtol: float) -> tuple[Tensor, float]:
    """Elementwise agreement of ``other`` with ``reference`` and the largest finite difference.

    Finite values agree within ``atol + rtol * |reference|``; non-finite values agree when both
    sides hold the same one (NaN and NaN, +inf and +inf, -inf and -inf). ``max_abs_diff`` is taken
    over the finite pairs, and is ``inf`` when a non-finite value meets a different one.
    """
    if reference.shape != other.shape:
        raise ValueError(f"shapes differ: {tuple(reference.shape)} vs {tuple(other.shape)}")
    reference, other = reference.double(), other.double()
    finite = torch.isfinite(reference) & torch.isfinite(other)
    same_special = (torch.isnan(reference) & torch.isnan(other)) | (torch.isinf(reference) & (reference == other))
    difference = torch.where(finite, (other - reference).abs(), torch.zeros_like(reference))
    agree = (finite & (difference <= atol + rtol * reference.abs())) | same_special
    if bool((~finite & ~same_special).any()):
        return agree, float("inf")
    return agree, float(difference.max()) if difference.numel() else 0.0


def onnx_parity(
    model: nn.Module,
    exported: OnnxExport | str | os.PathLike,
    inputs: Tensor,
    *,
    atol: float = 1e-4,
    rtol: float = 1e-4,
    score_tol: float = 1e-6,
) -> ParityReport:
    """Run ``inputs`` through PyTorch (reference backend) and ONNX Runtime (CPU) and compare.

    Logits must agree within ``atol + rtol * |reference|`` (see :func:`outputs_agree`: the same
    NaN or infinity on both sides agrees; ``max_abs_diff`` is over the finite ones). Every block's selection must be
    identical, except where ONNX Runtime picked, slot for slot, channels whose PyTorch router
    scores are within ``score_tol`` of PyTorch's choice (a near-tie; see :class:`ParityReport`).
    Pass ``score_tol=0`` to demand identical selections. Random-router models cannot be compared
    (their selection is random) and raise ``ValueError``.
    """
    if not isinstance(inputs, Tensor) or inputs.dim() != 4:
        raise ValueError("inputs must be a [B, 3, H, W] tensor")
    for name, value in (("atol", atol), ("rtol", rtol), ("score_tol", score_tol)):
        if not isinstance(value, (int, float)) or value < 0:
            raise ValueError(f"{name} must be a number >= 0, got {value!r}")
    blocks = _mod_blocks(model)
    if any(block.router is None for _, block in blocks):
        raise ValueError(
            "the model routes randomly (router='random'); its ONNX outputs cannot be compared with PyTorch's"
        )
    path = exported.path if isinstance(exported, OnnxExport) else os.fspath(exported)
    session = ort_session(path)
    output_names = [output.name for output in session.get_outputs()]
    x = inputs.detach().cpu().float()
    onnx_outputs = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    reference_model = WithSelections(prepare_for_export(model))
    scores: dict[str, Tensor] = {}
    hooks = [
        block.router.register_forward_hook(lambda _m, _i, out, name=name: scores.__setitem__(name, out.detach()))
        for name, block in _mod_blocks(reference_model.model)
    ]
    try:
        with torch.no_grad():
            reference = reference_model(x)
    finally:
        for hook in hooks:
            hook.remove()
    logits = torch.from_numpy(onnx_outputs[0])
    agree, max_abs_diff = outputs_agree(reference[0], logits, atol=atol, rtol=rtol)
    outputs_close = bool(agree.all())
    mismatched: dict[str, int] = {}
    near_ties: dict[str, int] = {}
    for name, selection in zip(reference_model.block_names, reference[1:]):
        output_name = SELECTION_PREFIX + name
        if output_name not in output_names:
            continue
        onnx_selection = torch.from_numpy(onnx_outputs[output_names.index(output_name)]).long()
        if onnx_selection.shape != selection.shape or bool(
            ((onnx_selection < 0) | (onnx_selection >= scores[name].shape[1])).any()
        ):
            mismatched[name] = selection.shape[0]
            continue
        differs = (onnx_selection != selection).any(dim=1)
        if not bool(differs.any()):
            continue
        chosen = scores[name].gather(1, selection)
        onnx_chosen = scores[name].gather(1, onnx_selection)
        explained = ((chosen - onnx_chosen).abs() <= score_tol).all(dim=1)
        real = int((differs & ~explained).sum())
        tied = int((differs & explained).sum())
        if real:
            mismatched[name] = real
        if tied:
            near_ties[name] = tied
    return ParityReport(
        max_abs_diff=max_abs_diff,
        outputs_close=outputs_close,
        selections_equal=not mismatched,
        mismatched_selections=mismatched,
        near_tie_selections=near_ties,
        atol=atol,
        rtol=rtol,
        score_tol=score_tol,
        batch=int(x.shape[0]),
    )


# Latency whose interquartile range exceeds this fraction of its median is not to be trusted.
SPREAD_LIMIT = 0.1


@dataclass
class LatencyStats:
    """Latency of one call in milliseconds, from :mod:`torch.utils.benchmark` measurements.

    ``median_ms``, ``p20_ms``, ``p80_ms`` and ``iqr_ms`` (75th - 25th percentile) over the timed
    blocks (``iterations`` calls in all, after ``warmup`` untimed ones); ``spread`` is
    ``iqr_ms / median_ms`` and ``reliable`` says whether it is at most :data:`SPREAD_LIMIT` (a busy
    machine gives a large spread: such a median is not worth comparing).
    """

    median_ms: float
    p20_ms: float
    p80_ms: float
    iqr_ms: float
    iterations: int
    runtime: str
    threads: Optional[int]
    warmup: int = 0
    spread: float = 0.0
    reliable: bool = True

    def summary(self) -> str:
        return (
            f"{self.runtime:<16} batch 1: median {self.median_ms:.2f} ms "
            f"(p20 {self.p20_ms:.2f}, p80 {self.p80_ms:.2f}; {self.iterations} runs)"
        )

    def warning(self) -> Optional[str]:
        """A line saying why the numbers cannot be trusted, or None when they can."""
        if self.reliable:
            return None
        return (
            f"warning: {self.runtime} latency varies too much to trust (interquartile range {self.iqr_ms:.2f} ms = "
            f"{100 * self.spread:.0f}% of the median {self.median_ms:.2f} ms over {self.iterations} runs); "
            "the CPU is probably busy: measure again on an idle machine"
            f"{'' if self.threads == 1 else ', or with --threads 1'}"
        )


def _check_timing_args(warmup: int, min_seconds: float, max_seconds: float) -> None:
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an int >= 0, got {warmup!r}")
    for name, value in (("min_seconds", min_seconds), ("max_seconds", max_seconds)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
            raise ValueError(f"{name} must be a number of seconds > 0, got {value!r}")
    if min_seconds > max_seconds:
        raise ValueError(f"min_seconds ({min_seconds}) must not exceed max_seconds ({max_seconds})")


def _measure(
    call: Callable[[], Any],
    runtime: str,
    threads: Optional[int],
    *,
    warmup: int,
    min_seconds: float,
    max_seconds: float,
) -> LatencyStats:
    """Warm ``call`` up, then time it with ``Timer.adaptive_autorange``: blocks of calls until the
    interquartile range is within :data:`SPREAD_LIMIT` of the median (after ``min_seconds``) or
    ``max_seconds`` of timed calls were spent."""
    from torch.utils import benchmark

    _check_timing_args(warmup, min_seconds, max_seconds)
    for _ in range(warmup):
        call()
    timer = benchmark.Timer(stmt="call()", globals={"call": call}, num_threads=torch.get_num_threads())
    measurement = timer.adaptive_autorange(threshold=SPREAD_LIMIT, min_run_time=min_seconds, max_run_time=max_seconds)
    times = sorted(measurement.times)
    if len(times) > 1:
        deciles = statistics.quantiles(times, n=10, method="inclusive")
        p20, p80 = deciles[1], deciles[7]
    else:
        p20 = p80 = times[0]
    median, iqr = measurement.median, measurement.iqr
    spread = iqr / median if median > 0 else float("inf")
    return LatencyStats(
        median_ms=1e3 * median,
        p20_ms=1e3 * p20,
        p80_ms=1e3 * p80,
        iqr_ms=1e3 * iqr,
        iterations=len(measurement.raw_times) * measurement.number_per_run,
        runtime=runtime,
        threads=threads,
        warmup=warmup,
        spread=spread,
        reliable=spread <= SPREAD_LIMIT,
    )


def ort_cpu_latency(
    model: str | os.PathLike | Any,
    inputs: Tensor,
    *,
    warmup: int = 10,
    min_seconds: float = 1.0,
    max_seconds: float = 10.0,
    threads: Optional[int] = None,
) -> LatencyStats:
    """ONNX Runtime CPU latency of one ``run`` on ``inputs``.

    Args:
        model: an ``.onnx`` path or an ``onnxruntime.InferenceSession``.
        inputs: ``[B, 3, H, W]`` input (built once, outside the timed region).
        warmup: untimed runs first.
        min_seconds, max_seconds: timed runs go on for at least ``min_seconds`` and until the
            spread is small, for at most ``max_seconds``.
        threads: ORT intra-op threads (None: ORT's default, all cores); ignored for a session.
    """
    session = model if hasattr(model, "run") and hasattr(model, "get_inputs") else ort_session(model, threads=threads)
    feed = {session.get_inputs()[0].name: inputs.detach().cpu().float().numpy()}
    return _measure(
        lambda: session.run(None, feed),
        "onnxruntime-cpu",
        threads,
        warmup=warmup,
        min_seconds=min_seconds,
        max_seconds=max_seconds,
    )


def torch_cpu_latency(
    model: nn.Module,
    inputs: Tensor,
    *,
    warmup: int = 10,
    min_seconds: float = 1.0,
    max_seconds: float = 10.0,
    threads: Optional[int] = None,
) -> LatencyStats:
    """PyTorch eager CPU latency of ``model(inputs)`` under ``inference_mode`` (measured as :func:`ort_cpu_latency`)."""
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be None or an int >= 1, got {threads!r}")
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        model = model.eval()
        x = inputs.detach().cpu()

        def call() -> None:
            with torch.inference_mode():
                model(x)

        return _measure(
            call, "pytorch-cpu", threads, warmup=warmup, min_seconds=min_seconds, max_seconds=max_seconds
        )
    finally:
        torch.set_num_threads(previous)


def build_parser() -> CliParser:
    parser = CliParser(
        prog="python -m mod_models.tools.export",
        description="Export a MoD model (torch.export .pt2 and ONNX), check ONNX Runtime against PyTorch, "
        "time both on the CPU.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="checkpoint.pt / best.pt written by mod_models.train")
    source.add_argument("--model", help="a zoo model with freshly initialised weights")
    parser.add_argument("--num-classes", type=positive_int, default=1000, help="with --model")
    parser.add_argument("--seed", type=seed_int, default=0, help="with --model: seed of the initial weights")
    parser.add_argument("--image-size", type=image_size_int, help="default: the run's (or 224)")
    parser.add_argument(
        "--batch", type=int_at_least(2), default=2, help="example batch, >= 2 (the exported batch is dynamic)"
    )
    parser.add_argument("--out", required=True, help="output folder: model.onnx, model.pt2, export.json")
    parser.add_argument("--opset", type=positive_int)
    parser.add_argument("--no-selections", action="store_true", help="ONNX model without the selection outputs")
    parser.add_argument(
        "--check", action="store_true", help="compare ONNX Runtime with PyTorch (logits and selections)"
    )
    parser.add_argument("--latency", action="store_true", help="time ONNX Runtime and PyTorch on the CPU at batch 1")
    parser.add_argument("--threads", type=positive_int, help="CPU threads for the latency runs (default: all)")
    parser.add_argument(
        "--latency-seconds",
        type=positive_float,
        default=10.0,
        help="most seconds of timed runs per runtime (default 10; timing stops earlier once the spread is small)",
    )
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    """CLI entry: 0 ok, 1 ONNX Runtime disagrees with PyTorch (--check), 2 bad input (nothing written)."""
    from ..train.checkpoint import CheckpointError, model_from_checkpoint
    from ..zoo import MOD_BUILDERS, build_model, model_names

    args = build_parser().parse_args(argv)
    try:
        # Everything that can be wrong is checked before anything is written.
        if args.checkpoint:
            model, checkpoint = model_from_checkpoint(args.checkpoint, backend="reference")
            config = checkpoint.get("config") or {}
            trained_size = config.get("image_size") or (64 if config.get("data") == "synthetic" else 224)
            image_size = args.image_size if args.image_size is not None else trained_size
        else:
            if args.model not in model_names():
                raise ValueError(f"unknown model {args.model!r}; expected one of: {', '.join(model_names())}")
            kwargs = {"num_classes": args.num_classes}
            if args.model in MOD_BUILDERS:
                kwargs["backend"] = "reference"
            torch.manual_seed(args.seed)
            model = build_model(args.model, **kwargs).eval()
            image_size = args.image_size if args.image_size is not None else 224
        check_exportable(model)
        check_writable_folder(args.out)
        example = torch.randn(args.batch, 3, image_size, image_size)
        program = export_program(model, example)
        os.makedirs(args.out, exist_ok=True)
        pt2_path = os.path.join(args.out, "model.pt2")
        torch.export.save(program, pt2_path)
        exported = export_onnx(
            model,
            os.path.join(args.out, "model.onnx"),
            example,
            with_selections=not args.no_selections,
            opset=args.opset,
        )
    except (CheckpointError, ValueError, TypeError, ImportError) as error:
        print_error(error)
        return EXIT_INPUT_ERROR
    except OnnxCheckError as error:
        print_error(error)
        return 1
    report: dict[str, Any] = {
        "onnx": exported.path,
        "torch_export": pt2_path,
        "image_size": image_size,
        "outputs": exported.output_names,
    }
    print(f"wrote {pt2_path}\nwrote {exported.path}")
    status = 0
    if args.check:
        parity = onnx_parity(model, exported, torch.randn(args.batch + 1, 3, image_size, image_size))
        report["parity"] = {**asdict(parity), "ok": parity.ok}
        print(
            f"ONNX Runtime vs PyTorch: max |diff| {parity.max_abs_diff:.3g}, outputs close: {parity.outputs_close}, "
            f"selections equal: {parity.selections_equal}"
        )
        status = 0 if parity.ok else 1
    if args.latency:
        one = torch.randn(1, 3, image_size, image_size)
        budget = {"min_seconds": min(1.0, args.latency_seconds), "max_seconds": args.latency_seconds}
        torch_stats = torch_cpu_latency(prepare_for_export(model), one, threads=args.threads, **budget)
        ort_stats = ort_cpu_latency(exported.path, one, threads=args.threads, **budget)
        report["latency"] = {"onnxruntime": asdict(ort_stats), "pytorch": asdict(torch_stats)}
        for stats in (torch_stats, ort_stats):
            print(stats.summary())
        for stats in (torch_stats, ort_stats):
            if stats.warning():
                print(stats.warning(), file=sys.stderr)
    with open(os.path.join(args.out, "export.json"), "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=2)
    return status


if __name__ == "__main__":
    sys.exit(main())
