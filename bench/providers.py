"""Who runs a model: the providers of the model table.

A provider turns a model (already on its device, dtype and memory format) into a callable
``x -> logits``. MoD models have the pure PyTorch ``reference`` backend and the fused ``triton``
backend, each as trained (eager or under ``torch.compile``) or in the deploy form
(``+deploy``: :func:`mod_models.optimize_for_inference`). Networks without MoD blocks (the
torchvision baselines and the floors) run ``eager``, ``compile``, ``deploy`` (batch norms
folded by the same utility) or ``deploy+compile``; a MoD provider is compared with the baseline
and floors of its own mode.

A provider that cannot run raises :class:`Unavailable` (or whatever the backend raises, which
the benchmark reports as unavailable); nothing falls back silently.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mod_models import optimize_for_inference, set_backend
from mod_models.blocks import MoDBlock
from mod_models.tools.analysis import recording_selections

Selections = dict[str, Tensor]  # MoD block name -> [B, k] int64 selected channels (slot order)


class Unavailable(RuntimeError):
    """A provider cannot run here (the reason is reported in place of a number)."""


def error_text(error: BaseException) -> str:
    """First line of ``Type: message`` (at most 300 characters), for a record's ``reason``."""
    text = f"{type(error).__name__}: {error}".strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:300]


def has_mod_blocks(model: nn.Module) -> bool:
    return any(isinstance(m, MoDBlock) for m in model.modules())


def configure_dynamo() -> None:
    """Let every compiled case compile (no silent fall back to eager at a recompile limit)."""
    import torch._dynamo.config as dynamo_config

    for name, value in (("recompile_limit", 64), ("cache_size_limit", 64), ("accumulated_recompile_limit", 4096),
                        ("accumulated_cache_size_limit", 4096), ("fail_on_recompile_limit_hit", True)):
        try:
            if hasattr(dynamo_config, name):
                setattr(dynamo_config, name, value)
        except (AttributeError, TypeError):  # pragma: no cover - depends on the torch version
            pass


def graph_break_count() -> int:
    from torch._dynamo.utils import counters

    return int(sum(counters["graph_break"].values()))


@dataclass(frozen=True)
class ModelProvider:
    """How a model runs.

    Attributes:
        name: label in the tables (``"reference"``, ``"triton+deploy"``, ``"eager"``, ...).
        backend: MoD backend to set (``None`` for networks without MoD blocks).
        compiled: wrap the model in ``torch.compile`` (static shapes).
        deploy: run the deploy form (:func:`mod_models.optimize_for_inference`: batch norms folded,
            in-place fusion, the fused three-launch MoD block on the triton backend).
    """

    name: str
    backend: str | None = None
    compiled: bool = False
    deploy: bool = False

    @property
    def mode(self) -> str:
        """``"eager"``, ``"compile"``, ``"deploy"`` or ``"deploy+compile"``: what a MoD provider is
        compared with (the baseline and floors of the same mode)."""
        if self.deploy:
            return "deploy+compile" if self.compiled else "deploy"
        return "compile" if self.compiled else "eager"

    @property
    def mode_key(self) -> tuple[bool, bool]:
        return self.compiled, self.deploy

    @property
    def runs_torch_modules(self) -> bool:
        """True when the prepared callable runs the PyTorch modules (so MoD blocks record selections)."""
        return True

    def selection_call(self, fn: Callable[[Tensor], Tensor]) -> Callable[[Tensor], tuple[Tensor, Selections]] | None:
        """For the output check: ``x -> (logits, selections)`` computed as the prepared ``fn`` computes
        them, or None where the selections cannot be read (``torch.compile``, a wrapped callable)."""
        if self.compiled or not isinstance(fn, nn.Module) or not has_mod_blocks(fn):
            return None
        return lambda x: run_recording(fn, x)

    def prepare(self, model: nn.Module) -> Callable[[Tensor], Tensor]:
        """The callable to time; ``model`` is owned by this provider from now on."""
        if self.backend is not None:
            if not has_mod_blocks(model):
                raise ValueError(f"provider {self.name!r} sets a MoD backend, but the model has no MoD blocks")
            set_backend(model, self.backend)
        if self.deploy:
            optimize_for_inference(model.eval())
        if self.compiled:
            configure_dynamo()
            return torch.compile(model, dynamic=False)
        return model


def run_recording(model: nn.Module, x: Tensor) -> tuple[Tensor, Selections]:
    """``model(x)`` with every MoD block's selection recorded: ``(logits, {block name: [B, k]})``."""
    with recording_selections(model) as blocks:
        out = model(x)
        return out, {name: block.last_selection for name, block in blocks}


class _OrtRun:
    """The timed callable of :class:`OnnxRuntimeProvider` (a logits-only session) and, for the
    output check, :meth:`with_selections` (a second session of an export with the selection outputs,
    made on first use)."""

    def __init__(self, session, input_name: str, selections_export: Callable[[], object]) -> None:
        self.session = session
        self.input_name = input_name
        self._selections_export = selections_export
        self._checked = None

    def __call__(self, x: Tensor) -> Tensor:
        return torch.from_numpy(self.session.run(None, {self.input_name: x.detach().numpy()})[0])

    def with_selections(self, x: Tensor) -> tuple[Tensor, Selections]:
        from mod_models.tools.export import SELECTION_PREFIX, ort_session

        if self._checked is None:
            exported = self._selections_export()
            self._selections_export = None  # drops the model it exported
            self._checked = (ort_session(exported.path, threads=torch.get_num_threads()), exported)
        session, exported = self._checked
        outputs = session.run(None, {exported.input_name: x.detach().numpy()})
        names = exported.output_names
        selections = {name: torch.from_numpy(outputs[names.index(SELECTION_PREFIX + name)]).long()
                      for name in exported.block_names}
        return torch.from_numpy(outputs[0]), selections


class OnnxRuntimeProvider(ModelProvider):
    """The reference path exported to ONNX (``mod_models.tools.export``) and run by ONNX Runtime on the
    CPU with as many intra-op threads as torch uses in the timed configuration. Its mode is its own,
    so it gets no ratio against the PyTorch baseline; ``vs ref`` is ORT time beside PyTorch's.

    The timed session runs an export without selection outputs; the output check runs a second
    export with them (``with_selections=True``), made only when the check asks for it."""

    _exports: dict = {}  # (fingerprint of the weights, with selections) -> exported file (one export each)

    @property
    def mode(self) -> str:
        return "onnxruntime"

    @property
    def runs_torch_modules(self) -> bool:
        return False

    def prepare(self, model: nn.Module) -> Callable[[Tensor], Tensor]:
        import tempfile

        try:
            import onnxruntime  # noqa: F401

            from mod_models.tools.export import export_onnx, ort_session
        except ImportError as error:
            raise Unavailable(f"onnxruntime provider needs the export extra: {error}") from error
        if next(model.parameters()).device.type != "cpu" or next(model.parameters()).dtype != torch.float32:
            raise Unavailable("the onnxruntime provider runs fp32 models on the CPU")
        fingerprint = (type(model).__name__, sum(float(p.detach().double().sum()) for p in model.parameters()))
        resolution = _input_resolution(model)

        def export(with_selections: bool):
            key = (fingerprint, with_selections)
            if key not in self._exports:
                folder = tempfile.TemporaryDirectory(prefix="mod-bench-onnx-")
                exported = export_onnx(model, f"{folder.name}/model.onnx", (1, 3, resolution, resolution),
                                       with_selections=with_selections, dynamic_batch=False)
                self._exports[key] = (folder, exported)
            return self._exports[key][1]

        exported = export(False)
        session = ort_session(exported.path, threads=torch.get_num_threads())
        return _OrtRun(session, exported.input_name, lambda: export(True) if has_mod_blocks(model) else exported)

    def selection_call(self, fn: Callable[[Tensor], Tensor]) -> Callable[[Tensor], tuple[Tensor, Selections]] | None:
        return getattr(fn, "with_selections", None)


def _input_resolution(model: nn.Module) -> int:
    resolution = getattr(model, "bench_resolution", None)
    if resolution is None:
        raise Unavailable("the onnxruntime provider needs the model's input resolution (bench_resolution)")
    return resolution


REFERENCE = ModelProvider("reference", backend="reference")
REFERENCE_COMPILED = ModelProvider("reference+compile", backend="reference", compiled=True)
TRITON = ModelProvider("triton", backend="triton")
TRITON_COMPILED = ModelProvider("triton+compile", backend="triton", compiled=True)
REFERENCE_DEPLOY = ModelProvider("reference+deploy", backend="reference", deploy=True)
TRITON_DEPLOY = ModelProvider("triton+deploy", backend="triton", deploy=True)
REFERENCE_DEPLOY_COMPILED = ModelProvider("reference+deploy+compile", backend="reference", compiled=True, deploy=True)
TRITON_DEPLOY_COMPILED = ModelProvider("triton+deploy+compile", backend="triton", compiled=True, deploy=True)
ONNXRUNTIME = OnnxRuntimeProvider("onnxruntime")
MOD_PROVIDERS = {p.name: p for p in (
    REFERENCE, REFERENCE_COMPILED, TRITON, TRITON_COMPILED, REFERENCE_DEPLOY, TRITON_DEPLOY,
    REFERENCE_DEPLOY_COMPILED, TRITON_DEPLOY_COMPILED, ONNXRUNTIME,
)}

EAGER = ModelProvider("eager")
COMPILED = ModelProvider("compile", compiled=True)
DEPLOY = ModelProvider("deploy", deploy=True)
DEPLOY_COMPILED = ModelProvider("deploy+compile", compiled=True, deploy=True)
# The baseline and floors of each mode, keyed by (compiled, deploy).
PLAIN_PROVIDERS = {p.mode_key: p for p in (EAGER, COMPILED, DEPLOY, DEPLOY_COMPILED)}


def parse_providers(names: list[str]) -> list[ModelProvider]:
    unknown = [n for n in names if n not in MOD_PROVIDERS]
    if unknown:
        raise ValueError(f"unknown provider(s) {unknown}; expected some of {list(MOD_PROVIDERS)}")
    return [MOD_PROVIDERS[n] for n in names]
