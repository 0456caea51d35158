"""Export and deployment: ``torch.export``, ONNX (checked against ONNX Runtime), CPU latency.

* :func:`export_program` traces a model with :func:`torch.export.export` (reference backend,
  eval mode, optional dynamic batch); :func:`torch.export.save` stores it as ``.pt2``.
* :func:`export_onnx` writes an ONNX model of the reference path. The reference top-k is a
  stable descending ``torch.sort``, which the ONNX exporter cannot translate; the exported
  program is rewritten so that every ``aten.sort.stable`` becomes ``TopK`` over the full axis
  (:func:`stable_sort_via_topk`). ONNX defines ``TopK`` to break ties by the lower index and
  ONNX Runtime ranks NaN first, exactly as the stable sort does, so the selection is the same.
  With ``with_selections=True`` the ONNX model also returns each MoD block's selected channels
  ``[B, k]`` (outputs ``selection.<block>``), so deployments can check routing too.
* :func:`onnx_parity` runs the ONNX model in ONNX Runtime on the CPU and compares logits
  (within a tolerance) and every block's selection (exactly) with PyTorch.
* :func:`ort_cpu_latency` / :func:`torch_cpu_latency`: median and spread of CPU latency.

``python -m mod_models.export --checkpoint runs/r18/best.pt --out runs/r18/export --check --latency``
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn

from .backend import set_backend
from .blocks import MoDBlock

LOGITS_NAME = "logits"
INPUT_NAME = "images"
SELECTION_PREFIX = "selection."


def _mod_blocks(model: nn.Module) -> list[tuple[str, MoDBlock]]:
    return [(name, module) for name, module in model.named_modules() if isinstance(module, MoDBlock)]


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
        dynamic_batch: export the batch dimension as dynamic (the example's batch must then be >= 2).
        with_selections: also return every MoD block's selection (see :class:`WithSelections`).
    """
    x = _example_input(example)
    prepared = prepare_for_export(model)
    module: nn.Module = WithSelections(prepared) if with_selections else prepared
    dynamic_shapes = None
    if dynamic_batch:
        if x.shape[0] < 2:
            raise ValueError("dynamic_batch needs an example batch of at least 2 (torch.export specialises size 1)")
        dynamic_shapes = ({0: torch.export.Dim("batch", min=1, max=4096)},)
    with warnings.catch_warnings():
        # WithSelections reads selections that the blocks keep as plain attributes; they are
        # cleared before forward returns, so the program holds no stale state.
        warnings.filterwarnings("ignore", message=".*were assigned during export.*")
        return torch.export.export(module, (x,), dynamic_shapes=dynamic_shapes)


def stable_sort_via_topk(
    x: Tensor, *, stable: Optional[bool] = None, dim: int = -1, descending: bool = False
) -> tuple[Tensor, Tensor]:
    """``aten.sort.stable`` as ``topk`` over the whole axis: the ONNX-exportable form of the reference sort.

    ONNX ``TopK`` is specified to order equal values by lower index first (ONNX Runtime also
    puts NaN first when ``largest=1``), which is the stable sort's order. Only used to rewrite
    programs for ONNX; eager ``torch.topk`` does not promise this tie order.
    """
    length = x.shape[dim]
    result = torch.topk(x, length, dim=dim, largest=descending, sorted=True)
    return result.values, result.indices


def onnx_ready_program(program: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """``program`` with every stable sort replaced by :func:`stable_sort_via_topk`."""
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
    """
    try:
        import onnxscript  # noqa: F401  (the ONNX exporter needs it)
    except ImportError as error:
        raise ImportError(
            "ONNX export needs the packages onnx and onnxscript: pip install 'mod-cnn[export]'"
        ) from error
    path = os.fspath(path)
    program = export_program(model, example, dynamic_batch=dynamic_batch, with_selections=with_selections)
    block_names = [name for name, _ in _mod_blocks(model)] if with_selections else []
    output_names = [LOGITS_NAME] + [SELECTION_PREFIX + name for name in block_names]
    kwargs: dict[str, Any] = {"input_names": [INPUT_NAME], "output_names": output_names, "dynamo": True}
    if opset is not None:
        kwargs["opset_version"] = opset
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):  # the exporter prints its steps
        onnx_program = torch.onnx.export(onnx_ready_program(program), **kwargs)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    onnx_program.save(path)
    return OnnxExport(path=path, input_name=INPUT_NAME, output_names=output_names, block_names=block_names)


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

    Logits must agree within ``atol + rtol * |reference|``. Every block's selection must be
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
    difference = (logits - reference[0]).abs()
    outputs_close = bool((difference <= atol + rtol * reference[0].abs()).all())
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
        max_abs_diff=float(difference.max()),
        outputs_close=outputs_close,
        selections_equal=not mismatched,
        mismatched_selections=mismatched,
        near_tie_selections=near_ties,
        atol=atol,
        rtol=rtol,
        score_tol=score_tol,
        batch=int(x.shape[0]),
    )


@dataclass
class LatencyStats:
    """Latency in milliseconds: median with the 20th and 80th percentiles."""

    median_ms: float
    p20_ms: float
    p80_ms: float
    iterations: int
    runtime: str
    threads: Optional[int]


def _stats(samples: list[float], runtime: str, threads: Optional[int]) -> LatencyStats:
    ordered = sorted(samples)
    quantiles = statistics.quantiles(ordered, n=10, method="inclusive") if len(ordered) > 1 else [ordered[0]] * 9
    return LatencyStats(
        median_ms=1e3 * statistics.median(ordered),
        p20_ms=1e3 * quantiles[1],
        p80_ms=1e3 * quantiles[7],
        iterations=len(ordered),
        runtime=runtime,
        threads=threads,
    )


def _check_timing_args(warmup: int, iterations: int) -> None:
    for name, value, minimum in (("warmup", warmup, 0), ("iterations", iterations, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def ort_cpu_latency(
    model: str | os.PathLike | Any,
    inputs: Tensor,
    *,
    warmup: int = 5,
    iterations: int = 30,
    threads: Optional[int] = None,
) -> LatencyStats:
    """ONNX Runtime CPU latency of one ``run`` on ``inputs``.

    Args:
        model: an ``.onnx`` path or an ``onnxruntime.InferenceSession``.
        inputs: ``[B, 3, H, W]`` input (built once, outside the timed region).
        warmup, iterations: untimed and timed runs.
        threads: ORT intra-op threads (None: ORT's default, all cores); ignored for a session.
    """
    _check_timing_args(warmup, iterations)
    session = model if hasattr(model, "run") and hasattr(model, "get_inputs") else ort_session(model, threads=threads)
    feed = {session.get_inputs()[0].name: inputs.detach().cpu().float().numpy()}
    for _ in range(warmup):
        session.run(None, feed)
    samples = []
    for _ in range(iterations):
        start = time.perf_counter()
        session.run(None, feed)
        samples.append(time.perf_counter() - start)
    return _stats(samples, "onnxruntime-cpu", threads)


def torch_cpu_latency(
    model: nn.Module,
    inputs: Tensor,
    *,
    warmup: int = 5,
    iterations: int = 30,
    threads: Optional[int] = None,
) -> LatencyStats:
    """PyTorch eager CPU latency of ``model(inputs)`` under ``inference_mode`` (measured as :func:`ort_cpu_latency`)."""
    _check_timing_args(warmup, iterations)
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        model = model.eval()
        x = inputs.detach().cpu()
        with torch.inference_mode():
            for _ in range(warmup):
                model(x)
            samples = []
            for _ in range(iterations):
                start = time.perf_counter()
                model(x)
                samples.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(previous)
    return _stats(samples, "pytorch-cpu", threads)


def main(argv: Optional[list[str]] = None) -> int:
    from .checkpoint import CheckpointError, model_from_checkpoint
    from .zoo import MOD_BUILDERS, build_model, model_names

    parser = argparse.ArgumentParser(
        prog="python -m mod_models.export",
        description="Export a MoD model (torch.export .pt2 and ONNX), check ONNX Runtime against PyTorch, "
        "time both on the CPU.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="checkpoint.pt / best.pt written by mod_models.train")
    source.add_argument("--model", help="a zoo model with freshly initialised weights")
    parser.add_argument("--num-classes", type=int, default=1000, help="with --model")
    parser.add_argument("--seed", type=int, default=0, help="with --model: seed of the initial weights")
    parser.add_argument("--image-size", type=int, help="default: the run's (or 224)")
    parser.add_argument("--batch", type=int, default=2, help="example batch (the exported batch is dynamic)")
    parser.add_argument("--out", required=True, help="output folder: model.onnx, model.pt2, export.json")
    parser.add_argument("--opset", type=int)
    parser.add_argument("--no-selections", action="store_true", help="ONNX model without the selection outputs")
    parser.add_argument(
        "--check", action="store_true", help="compare ONNX Runtime with PyTorch (logits and selections)"
    )
    parser.add_argument("--latency", action="store_true", help="time ONNX Runtime and PyTorch on the CPU at batch 1")
    parser.add_argument("--threads", type=int, help="CPU threads for the latency runs")
    args = parser.parse_args(argv)
    try:
        if args.checkpoint:
            model, checkpoint = model_from_checkpoint(args.checkpoint, backend="reference")
            config = checkpoint.get("config", {})
            trained_size = config.get("image_size") or (64 if config.get("data") == "synthetic" else 224)
            image_size = args.image_size or trained_size
        else:
            if args.model not in model_names():
                raise ValueError(f"unknown model {args.model!r}; expected one of: {', '.join(model_names())}")
            kwargs = {"num_classes": args.num_classes}
            if args.model in MOD_BUILDERS:
                kwargs["backend"] = "reference"
            torch.manual_seed(args.seed)
            model = build_model(args.model, **kwargs).eval()
            image_size = args.image_size or 224
        if args.batch < 2:
            raise ValueError("--batch must be >= 2 (the exported batch dimension is dynamic)")
        os.makedirs(args.out, exist_ok=True)
        example = torch.randn(args.batch, 3, image_size, image_size)
        program = export_program(model, example)
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
        print(f"error: {error}", file=sys.stderr)
        return 2
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
        ort_stats = ort_cpu_latency(exported.path, one, threads=args.threads)
        torch_stats = torch_cpu_latency(prepare_for_export(model), one, threads=args.threads)
        report["latency"] = {"onnxruntime": asdict(ort_stats), "pytorch": asdict(torch_stats)}
        for stats in (torch_stats, ort_stats):
            print(
                f"{stats.runtime:<16} batch 1: median {stats.median_ms:.2f} ms "
                f"(p20 {stats.p20_ms:.2f}, p80 {stats.p80_ms:.2f})"
            )
    with open(os.path.join(args.out, "export.json"), "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=2)
    return status


if __name__ == "__main__":
    sys.exit(main())
