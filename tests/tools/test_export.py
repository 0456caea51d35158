"""torch.export and ONNX export of MoD models, checked against ONNX Runtime on the CPU."""

import contextlib
import copy
import dataclasses
import io
import json
import os
import time
import warnings

import pytest
import torch
from torch import nn

pytest.importorskip("onnxruntime", reason="ONNX tests need the 'export' extra (onnx, onnxscript, onnxruntime)")
pytest.importorskip("onnxscript", reason="ONNX tests need the 'export' extra (onnx, onnxscript, onnxruntime)")

import mod_models  # noqa: E402
from mod_models import build_model  # noqa: E402
from mod_models.blocks import MoDBlock  # noqa: E402
from mod_models.tools import export as export_module  # noqa: E402
from mod_models.tools.export import (  # noqa: E402
    SELECTION_PREFIX,
    WithSelections,
    export_onnx,
    export_program,
    main,
    onnx_parity,
    onnx_ready_program,
    ort_cpu_latency,
    ort_session,
    torch_cpu_latency,
)
from mod_models.train.checkpoint import CHECKPOINT_FORMAT  # noqa: E402


class _StableSort(nn.Module):
    def forward(self, scores):
        return torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :7]


def test_stable_sort_exports_with_the_same_tie_and_nan_order(tmp_path):
    """The rewritten sort (ONNX TopK) orders ties by lower index and NaN first, like torch.sort(stable=True)."""
    scores = torch.tensor([0.5, 0.7, 0.5, float("nan"), 0.7, float("inf"), float("nan"), -0.0, 0.0, float("-inf"), 0.5])
    batch = torch.stack([scores, scores.flip(0), torch.full_like(scores, 0.25), torch.rand(11).round(decimals=1)])
    program = onnx_ready_program(torch.export.export(_StableSort(), (batch,)))
    assert not any("sort" in str(node.target) for node in program.graph.nodes)
    torch.onnx.export(program, dynamo=True).save(str(tmp_path / "sort.onnx"))
    session = ort_session(tmp_path / "sort.onnx")
    got = session.run(None, {session.get_inputs()[0].name: batch.numpy()})[0]
    expected = torch.sort(batch, dim=1, descending=True, stable=True).indices[:, :7]
    assert torch.equal(torch.from_numpy(got), expected), (got, expected)


def _mod_model(name, size=32, **kwargs):
    """A freshly built model whose BatchNorm statistics were set by a few forward passes.

    At initialisation the running statistics (mean 0, var 1) shrink the activations of deep
    MobileNetV2 blocks towards zero, so every router score is 0.5 up to fp32 rounding and the
    selection is decided by rounding noise; calibrated statistics give scores with real margins.
    """
    torch.manual_seed(0)
    model = build_model(name, num_classes=10, backend="reference", **kwargs)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = None  # cumulative average
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, size, size))
    return model.eval()


@pytest.fixture(scope="module")
def cli_export(tmp_path_factory):
    """resnet18_mod (seed 0, 10 classes, 32 px) exported by the CLI with --check and --latency:
    (folder, model, stdout, stderr). The ONNX Runtime timing is reported as unreliable (wrapped
    here), so the CLI's warning line shows up in stderr."""
    out = tmp_path_factory.mktemp("export")
    real_ort_latency = export_module.ort_cpu_latency

    def noisy_ort_latency(*args, **kwargs):
        return dataclasses.replace(real_ort_latency(*args, **kwargs), reliable=False, spread=0.5)

    stdout, stderr = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(export_module, "ort_cpu_latency", noisy_ort_latency)
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            status = main(
                [
                    "--model",
                    "resnet18_mod",
                    "--num-classes",
                    "10",
                    "--image-size",
                    "32",
                    "--seed",
                    "0",
                    "--out",
                    str(out),
                    "--check",
                    "--latency",
                    "--latency-seconds",
                    "0.3",
                    "--threads",
                    "1",
                ]
            )
    assert status == 0, stderr.getvalue()
    torch.manual_seed(0)
    model = build_model("resnet18_mod", num_classes=10, backend="reference").eval()
    return out, model, stdout.getvalue(), stderr.getvalue()


def test_export_cli_writes_checked_models(cli_export, tmp_path, capsys):
    out, model, _, _ = cli_export
    report = json.loads((out / "export.json").read_text())
    assert report["parity"]["ok"] is True and report["parity"]["selections_equal"] is True
    assert report["outputs"] == ["logits"] + [SELECTION_PREFIX + f"layer{i}.1" for i in (1, 2, 3, 4)]
    assert (out / "model.onnx").stat().st_size > 0 and (out / "model.pt2").stat().st_size > 0
    assert main(["--model", "resnet19_mod", "--out", str(tmp_path)]) == 2
    assert "unknown model" in capsys.readouterr().err
    assert main(["--checkpoint", str(tmp_path / "missing.pt"), "--out", str(tmp_path)]) == 2


def test_onnx_matches_pytorch_on_another_batch_size(cli_export):
    out, model, _, _ = cli_export
    report = onnx_parity(model, out / "model.onnx", torch.randn(5, 3, 32, 32), score_tol=0.0)
    assert report.outputs_close and report.selections_equal, report
    assert report.batch == 5 and report.max_abs_diff < 1e-3


def test_parity_detects_a_different_model(cli_export):
    out, model, _, _ = cli_export
    other = copy.deepcopy(model)
    with torch.no_grad():
        for module in other.modules():
            if isinstance(module, MoDBlock):
                module.router.fc2.weight.mul_(-1.0)  # reverses each block's channel ranking
        other.fc.weight.add_(0.1)
    report = onnx_parity(other, out / "model.onnx", torch.randn(4, 3, 32, 32))
    assert not report.outputs_close and not report.selections_equal and not report.ok
    assert set(report.mismatched_selections) == {"layer2.1", "layer3.1", "layer4.1", "layer1.1"}


def test_latency_functions_report_sane_statistics(cli_export):
    out, model, stdout, stderr = cli_export
    x = torch.randn(1, 3, 32, 32)
    budget = {"warmup": 2, "min_seconds": 0.1, "max_seconds": 0.3, "threads": 1}
    for stats in (ort_cpu_latency(out / "model.onnx", x, **budget), torch_cpu_latency(model, x, **budget)):
        assert 0 < stats.p20_ms <= stats.median_ms <= stats.p80_ms and stats.iterations >= 4
        assert stats.iqr_ms >= 0 and stats.warmup == 2
    with pytest.raises(ValueError):
        ort_cpu_latency(out / "model.onnx", x, max_seconds=0)
    with pytest.raises(ValueError):
        torch_cpu_latency(model, x, threads=0)
    # The CLI printed both timings, and the warning line for the (made) unreliable one.
    assert "pytorch-cpu      batch 1: median" in stdout and "onnxruntime-cpu  batch 1: median" in stdout
    assert "warning: onnxruntime-cpu latency varies too much to trust" in stderr
    report = json.loads((out / "export.json").read_text())
    assert report["latency"]["onnxruntime"]["reliable"] is False
    assert set(report["latency"]["pytorch"]) >= {"median_ms", "iqr_ms", "spread", "reliable", "iterations"}


class _Sleeper(nn.Module):
    """A "model" whose calls take ``slow_ms`` for the first ``slow_first`` calls (lazy setup), then
    ``ms``, except every ``spike_every``-th call, which takes ``spike_ms``."""

    def __init__(self, ms, *, slow_first=0, slow_ms=0.0, spike_every=0, spike_ms=0.0):
        super().__init__()
        self.ms, self.slow_first, self.slow_ms = ms, slow_first, slow_ms
        self.spike_every, self.spike_ms, self.calls = spike_every, spike_ms, 0

    def forward(self, x):
        self.calls += 1
        if self.calls <= self.slow_first:
            time.sleep(self.slow_ms / 1e3)
        elif self.spike_every and self.calls % self.spike_every == 0:
            time.sleep(self.spike_ms / 1e3)
        else:
            time.sleep(self.ms / 1e3)
        return x


def test_latency_warms_up_and_flags_a_spread_too_large_to_trust():
    x = torch.zeros(1)
    budget = {"warmup": 5, "min_seconds": 0.2, "max_seconds": 0.6}
    steady = torch_cpu_latency(_Sleeper(4.0, slow_first=3, slow_ms=60.0), x, **budget)
    assert steady.median_ms == pytest.approx(4.0, rel=0.5)  # the slow first calls were warm-up
    assert steady.reliable and steady.warning() is None, steady
    noisy = torch_cpu_latency(_Sleeper(2.0, spike_every=3, spike_ms=30.0), x, **budget)
    assert not noisy.reliable and noisy.spread > 1.0, noisy
    assert noisy.warning().startswith("warning: pytorch-cpu latency varies too much to trust")
    assert noisy.iterations >= 10  # it kept measuring until the time budget was spent


def test_nan_logits_agree_when_both_runtimes_give_nan(cli_export):
    """A sample full of NaN gives NaN logits in PyTorch and in ONNX Runtime: that is agreement."""
    out, model, _, _ = cli_export
    x = torch.randn(3, 3, 32, 32)
    x[1] = float("nan")
    report = onnx_parity(model, out / "model.onnx", x)
    assert report.outputs_close and report.selections_equal, report
    assert 0 < report.max_abs_diff < 1e-3  # over the finite logits


def test_outputs_agree_compares_nan_and_infinity_patterns():
    nan, inf = float("nan"), float("inf")
    reference = torch.tensor([1.0, nan, inf, -inf, 2.0])
    agree, worst = export_module.outputs_agree(reference, torch.tensor([1.00001, nan, inf, -inf, 2.0]),
                                               atol=1e-4, rtol=0)
    assert agree.all() and worst == pytest.approx(1e-5, rel=1e-2)  # float32 rounding of 1.00001
    agree, worst = export_module.outputs_agree(reference, torch.tensor([1.0, 3.0, inf, inf, nan]), atol=1e-4, rtol=0)
    assert agree.tolist() == [True, False, True, False, False] and worst == inf
    with pytest.raises(ValueError, match="shapes differ"):
        export_module.outputs_agree(reference, reference[:2], atol=0, rtol=0)


class _TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.conv(x).mean(dim=(2, 3)))


def test_every_exported_onnx_model_goes_through_the_checker(tmp_path, monkeypatch):
    import onnx

    checked = []
    real_check = onnx.checker.check_model
    monkeypatch.setattr(onnx.checker, "check_model",
                        lambda path, **kw: (checked.append((path, kw)), real_check(path, **kw)))
    exported = export_onnx(_TinyNet().eval(), tmp_path / "tiny.onnx", (2, 3, 8, 8))
    assert checked == [(exported.path, {"full_check": True})]

    def reject(path, **kwargs):
        raise onnx.checker.ValidationError("Field 'type' of 'value_info' is required but missing.")

    monkeypatch.setattr(onnx.checker, "check_model", reject)
    with pytest.raises(export_module.OnnxCheckError, match="fails onnx.checker and was removed: Field 'type'"):
        export_onnx(_TinyNet().eval(), tmp_path / "bad.onnx", (2, 3, 8, 8))
    assert not (tmp_path / "bad.onnx").exists()


def _random_router_checkpoint(path):
    torch.manual_seed(0)
    model = build_model("resnet18_mod", num_classes=4, backend="reference", router="random")
    torch.save(
        {
            "format": CHECKPOINT_FORMAT,
            "kind": "weights",
            "model_name": "resnet18_mod",
            "model_kwargs": {"num_classes": 4, "router": "random"},
            "model": model.state_dict(),
            "epoch": 1,
            "config": {"image_size": 32, "data": "synthetic"},
            "history": [],
        },
        path,
    )
    return model


def test_random_router_models_are_refused_before_anything_is_written(tmp_path, capsys):
    model = _random_router_checkpoint(tmp_path / "best.pt")
    out = tmp_path / "export"
    assert main(["--checkpoint", str(tmp_path / "best.pt"), "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: the model routes randomly (router='random'") and "learned router" in error, error
    assert not out.exists()
    with pytest.raises(ValueError, match="routes randomly"):
        export_onnx(model, tmp_path / "never.onnx", (2, 3, 32, 32))
    with pytest.raises(ValueError, match="routes randomly"):
        export_program(model, (2, 3, 32, 32))
    # A fixed batch traces (the draw then has a static shape), for torch.export only.
    program = export_program(model, (2, 3, 32, 32), dynamic_batch=False)
    assert program.module()(torch.randn(2, 3, 32, 32)).shape == (2, 4)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--image-size", "0"], "argument --image-size: expected an integer >= 8, got 0"),
        (["--image-size", "-3"], "argument --image-size: expected an integer >= 8, got -3"),
        (["--threads", "0", "--latency"], "argument --threads: expected an integer >= 1, got 0"),
        (["--batch", "1"], "argument --batch: expected an integer >= 2, got 1"),
    ],
)
def test_bad_export_flags_are_errors_before_anything_is_written(tmp_path, capsys, flags, message):
    out = tmp_path / "export"
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", "resnet18_mod", "--num-classes", "4", "--out", str(out), *flags])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith(f"error: {message}")
    assert not out.exists()


def test_export_out_naming_a_file_is_an_error(tmp_path, capsys):
    target = tmp_path / "model.onnx"
    target.write_text("keep")
    assert main(["--model", "resnet18_mod", "--num-classes", "4", "--image-size", "32", "--out", str(target)]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert target.read_text() == "keep"


def test_mobilenet_onnx_matches_pytorch(tmp_path):
    """Inverted-residual MoD blocks (linear fusion, last_k targets) through ONNX Runtime."""
    model = _mod_model("mobilenet_v2_mod", fusion="last_k")
    exported = export_onnx(model, tmp_path / "model.onnx", torch.randn(2, 3, 32, 32))
    n_blocks = sum(isinstance(m, MoDBlock) for m in model.modules())
    assert len(exported.output_names) == 1 + n_blocks
    report = onnx_parity(model, exported, torch.randn(3, 3, 32, 32))
    assert report.outputs_close and report.selections_equal, report
    assert sum(report.near_tie_selections.values()) <= 1, report  # near-ties are rare exceptions, not the rule


def test_onnx_selection_ties_go_to_the_lowest_channel(tmp_path):
    """Fusion 'original' (scatter back to the selected channels) and a router whose zero output
    weights score every channel 0.5: PyTorch and ONNX Runtime must both select channels 0..k-1."""
    model = _mod_model("resnet18_mod", fusion="original")
    for module in model.modules():
        if isinstance(module, MoDBlock):
            nn.init.zeros_(module.router.fc2.weight)
    exported = export_onnx(model, tmp_path / "ties.onnx", torch.randn(2, 3, 32, 32))
    x = torch.randn(3, 3, 32, 32)
    session = ort_session(exported.path)
    outputs = session.run(None, {exported.input_name: x.numpy()})
    blocks = [m for m in model.modules() if isinstance(m, MoDBlock)]
    assert len(outputs) == 1 + len(blocks) == 5
    for block, selection in zip(blocks, outputs[1:]):
        assert torch.equal(torch.from_numpy(selection), torch.arange(block.k).expand(3, block.k))
    report = onnx_parity(model, exported, x, score_tol=0.0)
    assert report.ok, report


def test_random_router_parity_is_refused(tmp_path):
    model = build_model("resnet18_mod", num_classes=10, backend="reference", router="random")
    with pytest.raises(ValueError, match="routes randomly"):
        onnx_parity(model, tmp_path / "never-written.onnx", torch.randn(2, 3, 32, 32))


def test_torch_export_roundtrip_with_dynamic_batch(tmp_path):
    torch.manual_seed(0)
    model = build_model("resnet18_mod", num_classes=10, backend="reference").eval()
    program = export_program(model, (2, 3, 32, 32), with_selections=True)
    torch.export.save(program, tmp_path / "model.pt2")
    loaded = torch.export.load(tmp_path / "model.pt2").module()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = WithSelections(model)(x)
    got = loaded(x)
    assert len(got) == len(expected) == 5
    torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-5)
    for a, b in zip(got[1:], expected[1:]):
        assert torch.equal(a, b)
    # The exported model is a copy: the original's blocks are not left recording.
    assert all(not m.record_selection for m in model.modules() if isinstance(m, MoDBlock))
    with pytest.raises(ValueError, match="at least 2"):
        export_program(model, (1, 3, 32, 32))
    with pytest.raises(ValueError):
        export_program(model, (2, 3, 32))


# ----------------------------------------------------------------------------------------------
# PyTorch's own export paths on MoD models: the standard torch.onnx.export call (dynamo=True), the
# legacy TorchScript-based exporter (dynamo=False), torch.jit.script and torch.jit.trace.
# ----------------------------------------------------------------------------------------------


def _standard_onnx_export(module, x, path, **kwargs):
    """``torch.onnx.export(module, (x,), path, dynamo=True, **kwargs)`` as every tutorial writes it
    (its progress lines silenced), then the full ``onnx.checker`` check."""
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        torch.onnx.export(module, (x,), str(path), dynamo=True, **kwargs)
    export_module.check_onnx_file(path)
    return path


def _nodes_by_block(path, model):
    """``{block name: [op types]}`` of an ONNX file exported from ``model``, read from the scopes the
    exporter records on each node."""
    import onnx

    blocks = [name for name, m in model.named_modules() if isinstance(m, MoDBlock)]
    nodes = {name: [] for name in blocks}
    for node in onnx.load(str(path)).graph.node:
        scopes = {p.key: p.value for p in node.metadata_props}.get("pkg.torch.onnx.name_scopes", "")
        owner = [name for name in blocks if f"'{name}'" in scopes]
        if owner:
            nodes[owner[0]].append(node.op_type)
    return nodes


def test_standard_onnx_export_of_a_mod_model_matches_pytorch(tmp_path):
    """The call every tutorial shows used to fail on every MoD model ("No ONNX function found for
    aten.sort.stable"); its graph is checked, and ONNX Runtime computes PyTorch's logits."""
    model = _mod_model("resnet18_mod")
    path = _standard_onnx_export(model, torch.randn(1, 3, 32, 32), tmp_path / "m.onnx")
    report = onnx_parity(model, path, torch.randn(1, 3, 32, 32))
    assert report.outputs_close, report


def test_standard_onnx_export_of_the_deploy_form_selects_like_pytorch(tmp_path):
    """Deploy form, 'original' fusion (targets = the selected channels), a dynamic batch, and the
    selections as outputs (``WithSelections``): ONNX Runtime selects what PyTorch selects."""
    model = mod_models.optimize_for_inference(_mod_model("mobilenet_v2_mod", fusion="original"))
    wrapped = WithSelections(model).eval()
    names = ["logits"] + [SELECTION_PREFIX + name for name in wrapped.block_names]
    path = _standard_onnx_export(wrapped, torch.randn(2, 3, 32, 32), tmp_path / "m.onnx", output_names=names,
                                 dynamic_shapes=({0: torch.export.Dim("batch")},))
    report = onnx_parity(model, path, torch.randn(3, 3, 32, 32))
    assert report.ok, report
    assert sum(report.near_tie_selections.values()) <= 1, report


def test_standard_onnx_export_breaks_ties_like_the_stable_sort(tmp_path):
    """Every score tied (zero router output weights): the selection is channels 0..k-1 in ONNX too."""
    model = _mod_model("resnet18_mod", fusion="original")
    for module in model.modules():
        if isinstance(module, MoDBlock):
            nn.init.zeros_(module.router.fc2.weight)
    wrapped = WithSelections(model).eval()
    path = _standard_onnx_export(wrapped, torch.randn(2, 3, 32, 32), tmp_path / "ties.onnx")
    session = ort_session(path)
    outputs = session.run(None, {session.get_inputs()[0].name: torch.randn(2, 3, 32, 32).numpy()})
    for block, selection in zip(wrapped._blocks, outputs[1:]):
        assert torch.equal(torch.from_numpy(selection), torch.arange(block.k).expand(2, block.k))


def test_onnx_export_of_a_mod_block_is_lean_and_never_traces_the_eager_backend(tmp_path, monkeypatch):
    """Each MoD block exports as the same small graph whatever its backend: the eager paths of the
    other backends (fused kernels, custom ops) are never traced. A deployed BasicBlock is at most 20
    nodes: router (5), TopK and the slot slice, the scores gathered, one GatherND of the k selected
    planes (and its index), f_k (3), scale and fuse (5) and one ScatterND of the k target planes;
    no Transpose, Concat or Expand of a feature map."""
    model = mod_models.optimize_for_inference(_mod_model("resnet18_mod"))
    x = torch.randn(1, 3, 32, 32)
    reference = _nodes_by_block(_standard_onnx_export(model, x, tmp_path / "reference.onnx"), model)

    def never(*args, **kwargs):
        raise AssertionError("an eager backend path was traced into the ONNX graph")

    monkeypatch.setattr(MoDBlock, "_forward_fused", never)
    monkeypatch.setattr(MoDBlock, "_forward_deployed", never)
    other = mod_models.set_backend(copy.deepcopy(model), "triton")
    assert _nodes_by_block(_standard_onnx_export(other, x, tmp_path / "triton.onnx"), other) == reference
    for name, ops in reference.items():
        assert 0 < len(ops) <= 20, (name, ops)
        assert ops.count("ScatterND") == ops.count("GatherND") == ops.count("TopK") == 1, (name, ops)
        assert not {"Transpose", "Expand", "Sort"} & set(ops), (name, ops)


def test_standard_onnx_export_refuses_random_routing_by_name(tmp_path):
    model = build_model("resnet18_mod", num_classes=4, backend="reference", router="random").eval()
    with pytest.raises(Exception, match="routes randomly") as error:
        _standard_onnx_export(model, torch.randn(1, 3, 32, 32), tmp_path / "never.onnx")
    assert "learned router" in str(error.value)


def test_legacy_onnx_export_matches_pytorch(tmp_path):
    """``torch.onnx.export(..., dynamo=False)`` (the TorchScript-based exporter, deprecated by PyTorch)
    used to export every MoD block as the identity (relative error 0.38, no error); it now records the
    same ONNX formulation. A dynamic batch, checked on another batch size, both forms."""
    for name, fusion, deploy in (("resnet18_mod", "first_k", False), ("mobilenet_v2_mod", "original", True)):
        model = _mod_model(name, fusion=fusion)
        if deploy:
            model = mod_models.optimize_for_inference(model)
        path = tmp_path / f"{name}.onnx"
        with warnings.catch_warnings(), open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
            warnings.simplefilter("ignore")  # the exporter's deprecation and tracer warnings
            torch.onnx.export(model, (torch.randn(2, 3, 32, 32),), str(path), dynamo=False, input_names=["x"],
                              dynamic_axes={"x": {0: "batch"}})
        export_module.check_onnx_file(path)
        report = onnx_parity(model, path, torch.randn(3, 3, 32, 32))
        assert report.outputs_close, (name, report)


def test_torchscript_scripting_is_refused_with_the_supported_ways():
    model = build_model("resnet18_mod", num_classes=4, backend="reference").eval()
    for module in (model, model.layer1[1]):
        with pytest.raises(RuntimeError, match="TorchScript") as error, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit.script's deprecation warning
            torch.jit.script(module)
        message = str(error.value)
        assert "torch.export" in message and "torch.onnx.export" in message and "mod_models.tools.export" in message


def test_torchscript_tracing_equals_eager_on_other_inputs():
    """``torch.jit.trace`` records the reference path's ops (the selection included), so the traced
    model computes what the model computes, at other batch sizes too, as trained and deployed."""
    for name, fusion, deploy in (("resnet18_mod", "first_k", False), ("mobilenet_v2_mod", "original", True)):
        model = _mod_model(name, fusion=fusion)
        if deploy:
            model = mod_models.optimize_for_inference(model)
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # torch.jit.trace's deprecation and tracer warnings
            traced = torch.jit.trace(model, torch.randn(2, 3, 32, 32))
        for batch in (1, 3):
            x = torch.randn(batch, 3, 32, 32)
            with torch.no_grad():
                torch.testing.assert_close(traced(x.clone()), model(x.clone()), rtol=1e-5, atol=1e-5)
