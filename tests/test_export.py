"""torch.export and ONNX export of MoD models, checked against ONNX Runtime on the CPU."""

import copy
import json

import pytest
import torch
from torch import nn

pytest.importorskip("onnxruntime", reason="ONNX tests need the 'export' extra (onnx, onnxscript, onnxruntime)")
pytest.importorskip("onnxscript", reason="ONNX tests need the 'export' extra (onnx, onnxscript, onnxruntime)")

from mod_models import build_model  # noqa: E402
from mod_models.blocks import MoDBlock  # noqa: E402
from mod_models.export import (  # noqa: E402
    SELECTION_PREFIX,
    WithSelections,
    export_onnx,
    export_program,
    main,
    onnx_ready_program,
    onnx_parity,
    ort_cpu_latency,
    ort_session,
    torch_cpu_latency,
)


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
    """resnet18_mod (seed 0, 10 classes, 32 px) exported by the CLI with --check: (folder, model)."""
    out = tmp_path_factory.mktemp("export")
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
        ]
    )
    assert status == 0
    torch.manual_seed(0)
    model = build_model("resnet18_mod", num_classes=10, backend="reference").eval()
    return out, model


def test_export_cli_writes_checked_models(cli_export, tmp_path, capsys):
    out, model = cli_export
    report = json.loads((out / "export.json").read_text())
    assert report["parity"]["ok"] is True and report["parity"]["selections_equal"] is True
    assert report["outputs"] == ["logits"] + [SELECTION_PREFIX + f"layer{i}.1" for i in (1, 2, 3, 4)]
    assert (out / "model.onnx").stat().st_size > 0 and (out / "model.pt2").stat().st_size > 0
    assert main(["--model", "resnet19_mod", "--out", str(tmp_path)]) == 2
    assert "unknown model" in capsys.readouterr().err
    assert main(["--checkpoint", str(tmp_path / "missing.pt"), "--out", str(tmp_path)]) == 2


def test_onnx_matches_pytorch_on_another_batch_size(cli_export):
    out, model = cli_export
    report = onnx_parity(model, out / "model.onnx", torch.randn(5, 3, 32, 32), score_tol=0.0)
    assert report.outputs_close and report.selections_equal, report
    assert report.batch == 5 and report.max_abs_diff < 1e-3


def test_parity_detects_a_different_model(cli_export):
    out, model = cli_export
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
    out, model = cli_export
    x = torch.randn(1, 3, 32, 32)
    for stats in (
        ort_cpu_latency(out / "model.onnx", x, warmup=1, iterations=5, threads=1),
        torch_cpu_latency(model, x, warmup=1, iterations=5, threads=1),
    ):
        assert 0 < stats.p20_ms <= stats.median_ms <= stats.p80_ms and stats.iterations == 5
    with pytest.raises(ValueError):
        ort_cpu_latency(out / "model.onnx", x, iterations=0)


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
