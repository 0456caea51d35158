"""The CPU runtimes of the model table (bench/providers.py, bench/records.py, bench/report.py): the
eager deploy form, torch.compile with Inductor's freezing and ONNX Runtime, each for the MoD model,
its identity floor and its baseline; the best-vs-best ratio; no ratio for outputs that differ; the
native block section. Tiny models and hand-made records: seconds, but for two compilations of a
two-layer network."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bench import native_block as NB
from bench import report as R
from bench.env import collect_env
from bench.models import ModelConfig, TimerSettings, run_models
from bench.providers import (
    DEPLOY_COMPILED,
    DEPLOY_FREEZING,
    NATIVE_DEPLOY,
    NATIVE_DEPLOY_FREEZING,
    ONNXRUNTIME,
    REFERENCE,
    RUNTIMES,
    ModelProvider,
    plain_provider,
)
from bench.records import runtime_derived

ENV = collect_env(torch.device("cpu"))


# ----------------------------------------------------------------------------- the providers


def test_each_runtime_pairs_the_mod_model_with_its_baseline_in_the_same_runtime() -> None:
    for runtime, (mod, plain) in RUNTIMES.items():
        assert mod.runtime == plain.runtime == runtime
        assert plain_provider(mod) is plain
    assert NATIVE_DEPLOY.deploy and NATIVE_DEPLOY.backend == "native" and not NATIVE_DEPLOY.compiled
    assert NATIVE_DEPLOY_FREEZING.freezing and NATIVE_DEPLOY_FREEZING.deploy and NATIVE_DEPLOY_FREEZING.compiled
    assert DEPLOY_FREEZING.mode == "deploy+freezing" != DEPLOY_COMPILED.mode  # freezing is a mode of its own
    assert plain_provider(ONNXRUNTIME) is ONNXRUNTIME  # the baseline runs in ONNX Runtime too, not eager


def _two_layers() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()


def _output_after_weight_change(provider: ModelProvider, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The prepared model's output, then again after its last convolution's weight was doubled in place
    (a frozen graph holds the weights as constants: its output does not move)."""
    torch._dynamo.reset()
    model = _two_layers()
    fn = provider.prepare(model)
    with torch.inference_mode(), provider.compiling():
        before = fn(x).clone()
    with torch.no_grad():
        model[3].weight.mul_(2.0)
    with torch.inference_mode(), provider.compiling():
        after = fn(x).clone()
    return before, after


def test_the_freezing_provider_really_compiles_with_freezing_and_restores_the_config() -> None:
    import torch._inductor.config as inductor_config

    x = torch.randn(1, 3, 8, 8)
    previous = inductor_config.freezing
    with DEPLOY_FREEZING.compiling():
        assert inductor_config.freezing is True
    assert inductor_config.freezing == previous, "the global config is restored"
    with DEPLOY_COMPILED.compiling():
        assert inductor_config.freezing == previous, "compile without freezing leaves it alone"

    frozen_before, frozen_after = _output_after_weight_change(DEPLOY_FREEZING, x)
    assert torch.equal(frozen_before, frozen_after), "freezing: the weights are constants of the compiled graph"
    plain_before, plain_after = _output_after_weight_change(DEPLOY_COMPILED, x)
    assert not torch.equal(plain_before, plain_after), "without freezing the graph reads the weights"
    assert inductor_config.freezing == previous
    torch._dynamo.reset()


# ------------------------------------------------------------------- records and the report


def _record(provider: str, model: str, ms: float | None, *, role: str = "mod", runtime: str = "eager",
            agreed: bool = True, baseline: str = "resnet50", of_model: str | None = None, batch: int = 1,
            threads: int = 1, resolution: int = 224, blocks: int | None = None) -> dict:
    mode = {"eager": "deploy", "compile": "deploy+freezing", "onnxruntime": "onnxruntime"}[runtime]
    return {
        "section": "model", "device_type": "cpu", "batch": batch, "dtype": "fp32", "memory_format": "nchw",
        "resolution": resolution, "cuda_graph": False, "threads": threads, "role": role, "model": model,
        "of_model": of_model, "baseline": None if role == "baseline" else baseline, "provider": provider,
        "mode": mode, "runtime": runtime, "status": "ok" if ms is not None else "unavailable",
        "reason": "" if ms is not None else "test", "median_ms": ms, "p20_ms": ms, "p80_ms": ms,
        "agreement": {"ok": agreed, "method": "teacher_forcing" if role == "mod" else "relative_l2",
                      "detail": "" if agreed else "made to differ"},
        "mod_blocks": blocks,
    }


def _family(model: str, baseline: str, times: dict[str, tuple[float, float, float]], *,
            differ: tuple[str, ...] = (), baseline_differ: tuple[str, ...] = (), **config) -> list[dict]:
    """Records of one MoD model in the three runtimes: ``times[runtime] = (MoD, identity floor, baseline)``."""
    names = {"eager": ("native+deploy", "deploy"), "compile": ("native+deploy+freezing", "deploy+freezing"),
             "onnxruntime": ("onnxruntime", "onnxruntime")}
    out = []
    for runtime, (mod_ms, floor_ms, base_ms) in times.items():
        mod_name, plain_name = names[runtime]
        out += [
            _record(plain_name, baseline, base_ms, role="baseline", runtime=runtime,
                    agreed=runtime not in baseline_differ, **config),
            _record(mod_name, model, mod_ms, runtime=runtime, agreed=runtime not in differ, baseline=baseline,
                    blocks=7, **config),
            _record(plain_name, model, floor_ms, role="floor_identity", runtime=runtime, of_model=model,
                    baseline=baseline, **config),
        ]
    return out


def test_best_vs_best_takes_each_network_in_its_fastest_runtime_where_its_outputs_agreed() -> None:
    # MoD fastest in ONNX Runtime (45 ms), but its outputs differ there: its best is compile (50 ms).
    # The baseline's fastest is compile (70 ms); the identity floor's ONNX Runtime (40 ms).
    records = _family("resnet50_mod", "resnet50", {
        "eager": (60.0, 55.0, 85.0), "compile": (50.0, 47.0, 70.0), "onnxruntime": (45.0, 40.0, 72.0),
    }, differ=("onnxruntime",))
    (rows,) = runtime_derived(records).values()
    (row,) = rows
    assert row["best_mod"] == ("compile", 50.0)
    assert row["best_baseline"] == ("compile", 70.0) and row["best_floor"] == ("onnxruntime", 40.0)
    assert row["best_vs_best"] == pytest.approx(70.0 / 50.0)
    assert row["best_ceiling"] == pytest.approx(70.0 / 40.0)
    assert row["paper"] == pytest.approx(1.48)
    eager, compiled, ort = (row["runtimes"][r] for r in ("eager", "compile", "onnxruntime"))
    assert eager["speedup"] == pytest.approx(85.0 / 60.0) and eager["overhead"] == pytest.approx(5.0 / 55.0)
    assert compiled["speedup"] == pytest.approx(70.0 / 50.0) and compiled["overhead"] == pytest.approx(3.0 / 47.0)
    assert ort["speedup"] is None and ort["overhead"] is None  # outputs differ: no ratio

    (title, body), = R.runtime_tables(records)
    assert "1 thread" in title
    ort_line = next(line for line in body.splitlines() if "| ONNX Runtime |" in line)
    assert ort_line.count(R.OUTPUTS_DIFFER) == 3  # the ratio, the overhead and the check
    best_line = next(line for line in body.splitlines() if "(torch.compile + freezing) |" in line)
    assert "| 1.40x | 1.75x | 1.48x | >= 1.40x: met |" in best_line

    targets = {t["target"]: t for t in R.targets(records)}
    (best,) = [t for name, t in targets.items() if name.startswith("CPU best vs best") and "resnet50_mod" in name]
    assert best["status"] == "met" and "ceiling 1.75x" in best["measured"] and "paper 1.48x" in best["measured"]
    (eager_target,) = [t for name, t in targets.items()
                       if name.startswith("CPU eager, deploy form") and "ResNet" in name]
    assert eager_target["status"] == "missed by 6.1 points"  # 9.1% against 3%
    assert "714 us per MoD block x 7" in eager_target["reason"]
    (ort_target,) = [t for name, t in targets.items() if name.startswith("CPU ONNX Runtime") and "ResNet" in name]
    assert ort_target["status"] == "not measured" and "1 case(s) without a value" in ort_target["measured"]


def test_a_baseline_that_disagrees_with_its_eager_self_gives_no_ratio() -> None:
    records = _family("resnet75_mod", "resnet50", {
        "eager": (75.0, 60.0, 85.0), "compile": (66.0, 55.0, 60.0),
    }, baseline_differ=("compile",))
    ((row,),) = runtime_derived(records).values()
    assert row["runtimes"]["compile"]["speedup"] is None  # its baseline computed something else
    assert row["best_baseline"] == ("eager", 85.0) and row["best_vs_best"] == pytest.approx(85.0 / 66.0)
    (_, body), = R.runtime_tables(records)
    compile_line = next(line for line in body.splitlines() if "| torch.compile + freezing |" in line)
    assert f"60.00 [60.00, 60.00] ({R.OUTPUTS_DIFFER})" in compile_line
    target = next(t for t in R.targets(records) if "resnet75_mod" in t["target"])
    assert target["status"] == "met" and target["worst"] == pytest.approx(85.0 / 66.0)


def test_runtime_targets_are_judged_only_at_one_thread_batch_one_224px() -> None:
    records = _family("mobilenet_v2_mod", "mobilenet_v2", {"eager": (10.0, 9.0, 12.0)}, batch=8, threads=2)
    assert runtime_derived(records) and R.runtime_tables(records)
    assert R._runtime_targets(records) == []
    markdown = R.markdown(records, {"env": {}})
    assert "## CPU runtimes" in markdown and "batch 8" in markdown


class _Scaled(ModelProvider):
    """The native deploy form with its logits scaled: a runtime provider whose outputs differ."""

    def prepare(self, model):
        fn = NATIVE_DEPLOY.prepare(model)
        return lambda x: fn(x) * 1.5


def test_a_runtime_provider_whose_outputs_differ_gets_no_ratio() -> None:
    bad = _Scaled("bad+deploy", backend="native", deploy=True, runtime="eager")
    records = run_models(
        ["resnet18_mod"], [ModelConfig("cpu", batch=1, resolution=32, threads=1)], [REFERENCE, bad],
        env=ENV, timer=TimerSettings(cpu_rounds=1, cpu_samples_per_round=1, cpu_warmup=1), floors=("identity",),
        log=lambda message: None,
    )
    mod = next(r for r in records if r["provider"] == "bad+deploy")
    assert mod["median_ms"] > 0 and not mod["agreement"]["ok"]
    baseline = next(r for r in records if r["role"] == "baseline" and r["provider"] == "deploy")
    assert baseline["agreement"]["ok"] and baseline["agreement"]["method"] == "relative_l2"  # folded = eager
    ((row,),) = runtime_derived(records).values()
    assert row["runtimes"]["eager"]["speedup"] is None and row["best_vs_best"] is None
    (_, body), = R.runtime_tables(records)
    line = next(line for line in body.splitlines() if "| eager, deploy form |" in line)
    assert line.count(R.OUTPUTS_DIFFER) == 3


# --------------------------------------------------------------- the native block section


def test_native_block_section_records_a_disagreement_and_judges_the_read_target(monkeypatch) -> None:
    monkeypatch.setattr(NB, "_agree", lambda native, reference, x: "selections differ")
    records, load_s = NB.measure(batches=(1,), threads=[1], shapes=NB.QUICK_SHAPES[:1], env=ENV,
                                 log=lambda message: None)
    (record,) = records
    assert load_s is not None and record["status"] == "error" and "selections differ" in record["reason"]
    assert "median_ms" not in record and "native_us" not in record  # not timed

    def row(shape: str, native: float, read: float) -> dict:
        return {"section": "native_block", "shape": shape, "kind": "bottleneck", "channels": 256, "size": 56, "k": 4,
                "batch": 1, "threads": 1, "status": "ok", "native_us": [native] * 3, "reference_us": [300.0] * 3,
                "read_us": [read] * 3, "native_vs_read": native / read, "reference_vs_native": 300.0 / native}

    judged = [row("a", 60.0, 40.0), row("b", 90.0, 30.0), record]
    (target,) = [t for t in R.targets(judged) if "read of its input" in t["target"]]
    assert target["status"] == "missed by 1.50x"
    assert target["worst"] == pytest.approx(3.0) and "1 case(s) without a value" in target["measured"]
    assert "met in 1 of 2 case(s) (a b1 1t)" in target["reason"]
    (_, body), = R.native_block_tables(judged)
    assert "| 1.50x |" in body and "| 3.00x |" in body and "error" in body
