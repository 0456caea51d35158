"""Who runs a model: the providers of the model table.

A provider turns a model (already on its device, dtype and memory format) into a callable
``x -> logits``. MoD models have the pure PyTorch ``reference`` backend, the fused ``triton``
backend (GPU) and the ``native`` CPU kernel of the deploy form, each as trained (eager or under
``torch.compile``) or in the deploy form (``+deploy``: :func:`mod_models.optimize_for_inference`).
Networks without MoD blocks (the torchvision baselines and the floors) run ``eager``,
``compile``, ``deploy`` (batch norms folded by the same utility), ``deploy+compile``,
``deploy+freezing`` or ``onnxruntime``; a MoD provider is compared with the baseline and floors
of its own mode (:func:`plain_provider`).

**CPU runtimes.** What a CPU deployer can run a trained model in, each a ``runtime`` of the
model table, MoD model, identity floor and baseline alike:

* ``eager``: the deploy form in eager PyTorch (MoD blocks on the native kernel, one call each;
  the baseline with its batch norms folded): ``native+deploy`` / ``deploy``.
* ``compile``: ``torch.compile`` with Inductor's freezing (``torch._inductor.config.freezing``,
  PyTorch's setting for CPU inference: parameters become constants, convolutions are prepacked
  for oneDNN), of the deploy form: ``native+deploy+freezing`` / ``deploy+freezing``. The deploy
  form, not the eval form, because it is the form that serves a model (what
  ``optimize_for_inference`` hands a deployer), Inductor keeps each MoD block as one native call
  (a custom op with ``flexible_layout``: it runs on Inductor's channels_last activations in place),
  and freezing folds the baseline's batch norms itself, so its two forms compile to the same code
  (measured within 1 %; ``bench/results/cpu-amd-epyc-2cpu-notes.md`` has the comparison with
  the eval form, ``reference+freezing`` / ``freezing``, which ``--providers`` can add).
* ``onnxruntime``: the model exported to ONNX (``mod_models.tools.export``, the reference path in
  ONNX's ops) and run by ONNX Runtime's CPU provider: ``onnxruntime`` for every network.

A provider that cannot run raises :class:`Unavailable` (or whatever the backend raises, which
the benchmark reports as unavailable); nothing falls back silently.
"""

from __future__ import annotations

import contextlib
import shutil
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
    freezing: bool = False  # compiled with Inductor's freezing (torch._inductor.config.freezing)
    runtime: str | None = None  # the CPU runtime this provider stands for (RUNTIMES), if any

    @property
    def mode(self) -> str:
        """``"eager"``, ``"compile"``, ``"deploy"``, ``"deploy+compile"``, ``"freezing"`` or
        ``"deploy+freezing"``: what a MoD provider is compared with (the baseline and floors of the
        same mode)."""
        compiled = "freezing" if self.freezing else "compile"
        if self.deploy:
            return f"deploy+{compiled}" if self.compiled else "deploy"
        return compiled if self.compiled else "eager"

    @property
    def expensive(self) -> bool:
        """Preparing it costs a compilation or an export (the static floor is measured only where not)."""
        return self.compiled

    def compiling(self) -> contextlib.AbstractContextManager:
        """The context of the calls that may compile (the first call, the output check): Inductor's
        freezing on for a freezing provider, the global config restored afterwards."""
        if self.freezing:
            import torch._inductor.config as inductor_config

            return inductor_config.patch(freezing=True)
        return contextlib.nullcontext()

    @property
    def runs_torch_modules(self) -> bool:
        """True when the prepared callable runs the PyTorch modules (so MoD blocks record selections)."""
        return True

    def selection_call(self, fn: Callable[[Tensor], Tensor]) -> Callable[[Tensor], tuple[Tensor, Selections]] | None:
        """For the output check: ``x -> (logits, selections)`` computed as the prepared ``fn`` computes
        them, or None where the selections cannot be read (a wrapped callable, ``torch.compile``
        without :attr:`records_compiled_selections`)."""
        if self.compiled:
            model = getattr(fn, "_orig_mod", None)
            if not self.records_compiled_selections or model is None or not has_mod_blocks(model):
                return None
            return lambda x: (fn(x), {name: block.last_selection for name, block in mod_blocks(model)})
        if not isinstance(fn, nn.Module) or not has_mod_blocks(fn):
            return None
        return lambda x: run_recording(fn, x)

    @property
    def records_compiled_selections(self) -> bool:
        """A compiled MoD model whose blocks keep ``record_selection`` on in the compiled graph (their
        selections are outputs of the same graph, read back for the teacher-forced check): the CPU
        runtime providers. Costs one ``[B, k]`` and one ``[B, C]`` tensor and two attribute writes per
        block and call, which the timed calls pay too (a bias against MoD of a few microseconds)."""
        return self.compiled and self.runtime is not None

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
            if self.records_compiled_selections:
                for _, block in mod_blocks(model):
                    block.record_selection = True
            return torch.compile(model, dynamic=False)
        return model


def mod_blocks(model: nn.Module) -> list[tuple[str, MoDBlock]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoDBlock)]


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
    """A network exported to ONNX (``mod_models.tools.export``: a MoD block as its reference path in
    ONNX's ops) and run by ONNX Runtime on the CPU with as many intra-op threads as torch uses in the
    timed configuration, at the configuration's fixed batch. One provider for MoD models, floors and
    baselines alike (mode ``"onnxruntime"``: a MoD model is compared with its baseline and floor in
    ONNX Runtime).

    The timed session runs an export without selection outputs; the output check of a MoD model runs
    a second export with them (``with_selections=True``), made only when the check asks for it.
    Exports live in temporary folders until :meth:`release` (the model table calls it after each
    family)."""

    _exports: dict = {}  # (network, batch, resolution, weights fingerprint, with selections) -> (folder, export)

    @property
    def mode(self) -> str:
        return "onnxruntime"

    @property
    def expensive(self) -> bool:
        return True

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
        fingerprint = (getattr(model, "bench_name", type(model).__name__),
                       sum(float(p.detach().double().sum()) for p in model.parameters()))
        resolution = _input_resolution(model)
        batch = getattr(model, "bench_batch", 1)

        def export(with_selections: bool):
            key = (fingerprint, batch, resolution, with_selections)
            if key not in self._exports:
                folder = tempfile.mkdtemp(prefix="mod-bench-onnx-")
                exported = export_onnx(model, f"{folder}/model.onnx", (batch, 3, resolution, resolution),
                                       with_selections=with_selections, dynamic_batch=False)
                self._exports[key] = (folder, exported)
            return self._exports[key][1]

        exported = export(False)
        session = ort_session(exported.path, threads=torch.get_num_threads())
        return _OrtRun(session, exported.input_name, lambda: export(True) if has_mod_blocks(model) else exported)

    def selection_call(self, fn: Callable[[Tensor], Tensor]) -> Callable[[Tensor], tuple[Tensor, Selections]] | None:
        return getattr(fn, "with_selections", None)

    @classmethod
    def release(cls) -> None:
        """Delete every exported file (sessions already made keep running: ONNX Runtime holds the model)."""
        for folder, _ in cls._exports.values():
            shutil.rmtree(folder, ignore_errors=True)
        cls._exports.clear()


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
# The CPU runtimes (see the module docstring); the eval form under freezing for comparison.
NATIVE_DEPLOY = ModelProvider("native+deploy", backend="native", deploy=True, runtime="eager")
NATIVE_DEPLOY_FREEZING = ModelProvider("native+deploy+freezing", backend="native", compiled=True, deploy=True,
                                       freezing=True, runtime="compile")
REFERENCE_FREEZING = ModelProvider("reference+freezing", backend="reference", compiled=True, freezing=True)
ONNXRUNTIME = OnnxRuntimeProvider("onnxruntime", runtime="onnxruntime")
MOD_PROVIDERS = {p.name: p for p in (
    REFERENCE, REFERENCE_COMPILED, TRITON, TRITON_COMPILED, REFERENCE_DEPLOY, TRITON_DEPLOY,
    REFERENCE_DEPLOY_COMPILED, TRITON_DEPLOY_COMPILED, NATIVE_DEPLOY, NATIVE_DEPLOY_FREEZING, REFERENCE_FREEZING,
    ONNXRUNTIME,
)}

EAGER = ModelProvider("eager")
COMPILED = ModelProvider("compile", compiled=True)
DEPLOY = ModelProvider("deploy", deploy=True, runtime="eager")
DEPLOY_COMPILED = ModelProvider("deploy+compile", compiled=True, deploy=True)
FREEZING = ModelProvider("freezing", compiled=True, freezing=True)
DEPLOY_FREEZING = ModelProvider("deploy+freezing", compiled=True, deploy=True, freezing=True, runtime="compile")
# The baseline and floors of each mode.
PLAIN_PROVIDERS = {p.mode: p for p in (EAGER, COMPILED, DEPLOY, DEPLOY_COMPILED, FREEZING, DEPLOY_FREEZING,
                                       ONNXRUNTIME)}
# CPU runtime -> (its MoD provider, its plain provider), in the tables' order.
RUNTIMES = {"eager": (NATIVE_DEPLOY, DEPLOY), "compile": (NATIVE_DEPLOY_FREEZING, DEPLOY_FREEZING),
            "onnxruntime": (ONNXRUNTIME, ONNXRUNTIME)}
RUNTIME_TITLES = {"eager": "eager, deploy form", "compile": "torch.compile + freezing", "onnxruntime": "ONNX Runtime"}


def plain_provider(provider: ModelProvider) -> ModelProvider:
    """The provider of the baseline and floors a MoD provider is compared with (same mode)."""
    return PLAIN_PROVIDERS[provider.mode]


def provider_modes(providers: list[ModelProvider]) -> list[str]:
    """The modes of ``providers`` in order of first appearance (the order of the baseline and floor cases)."""
    return list(dict.fromkeys(p.mode for p in providers))


def parse_providers(names: list[str]) -> list[ModelProvider]:
    unknown = [n for n in names if n not in MOD_PROVIDERS]
    if unknown:
        raise ValueError(f"unknown provider(s) {unknown}; expected some of {list(MOD_PROVIDERS)}")
    return [MOD_PROVIDERS[n] for n in names]
