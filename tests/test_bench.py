"""The benchmark package: a CPU smoke run, speedups only where outputs agree, the byte formulas.

``python -m bench --quick`` must stay fast (seconds) and write JSON and Markdown whose every
record names the device, versions, dtype, batch, memory format, threads and date, under
``runs/bench`` of the directory it runs in (never into the project's published results).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from bench import agreement as A
from bench import cli
from bench import kernels as K
from bench import models as M
from bench import report as R
from bench import traffic as T
from bench.env import collect_env
from bench.floors import StaticSelectionBlock, identity_floor, static_floor
from bench.models import ModelCache, ModelConfig, TimerSettings, bench_family, run_models
from bench.providers import ONNXRUNTIME, REFERENCE, ModelProvider
from bench.timing import Progress, format_duration, percentile, time_cpu_interleaved
from mod_models import MoDBasicBlock, MoDBottleneck, __version__, build_model
from mod_models.blocks import MoDBlock

REPO_ROOT = Path(__file__).resolve().parent.parent
RECORD_KEYS = ("device", "torch", "triton", "cuda", "dtype", "batch", "memory_format", "threads", "date", "mod_cnn")
NON_NULL_KEYS = ("device", "torch", "dtype", "date", "threads", "mod_cnn")
PUBLISHED = REPO_ROOT / "bench" / "results"


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> dict:
    """``python -m bench --quick`` as a user types it (no --out-dir), in a fresh directory."""
    cwd = tmp_path_factory.mktemp("bench_quick_cwd")
    published_before = _digests(PUBLISHED)
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("MOD_BACKEND", None)
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--device", "cpu"],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out_dir = cwd / "runs" / "bench"
    stems = {p.stem for p in out_dir.glob("*.json")}
    assert len(stems) == 1, sorted(out_dir.glob("*"))
    return {"out_dir": out_dir, "stem": stems.pop(), "stdout": result.stdout, "cwd": cwd,
            "published_before": published_before}


def test_quick_run_writes_under_the_working_directory_not_the_published_results(quick_run: dict) -> None:
    out_dir, stem = quick_run["out_dir"], quick_run["stem"]
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(f"{stem}.{ext}" for ext in ("json", "md", "png"))
    assert _digests(PUBLISHED) == quick_run["published_before"], "the run changed the project's bench/results"
    assert sorted(p.name for p in quick_run["cwd"].iterdir()) == ["runs"]  # nothing else left behind
    payload = json.loads((out_dir / f"{stem}.json").read_text())
    assert stem == payload["meta"]["env"]["device_slug"] + "-quick"


def test_quick_run_prints_progress_and_a_time_split_that_adds_up(quick_run: dict) -> None:
    stdout = quick_run["stdout"]
    payload = json.loads((quick_run["out_dir"] / f"{quick_run['stem']}.json").read_text())
    # One count for the whole run: the model table's inference and training-step rows.
    n_cases = sum(r["section"] in ("model", "train") for r in payload["records"])
    counted = [line for line in stdout.splitlines() if re.match(r"\[\s*\d+/\d+\] ", line)]
    counters = [tuple(map(int, re.match(r"\[\s*(\d+)/(\d+)\]", line).groups())) for line in counted]
    assert counters == [(i, n_cases) for i in range(1, n_cases + 1)], stdout[-2000:]
    assert re.search(r"\(\d+s elapsed, done\)$", counted[-1]), counted[-1]
    line = next(line for line in stdout.splitlines() if line.startswith("time: "))
    parts, total = line.removeprefix("time: ").split("; total ")
    # 0.1 s steps under a minute, whole seconds from a minute on (a loaded machine takes that long)
    shown = [float(m) for m in re.findall(r" (\d+(?:\.\d)?) s", parts)]
    assert len(shown) >= 2 and math.isclose(sum(shown), float(total.removesuffix(" s")), abs_tol=1e-9), line


def test_quick_run_says_what_cuda_is(quick_run: dict) -> None:
    env = json.loads((quick_run["out_dir"] / f"{quick_run['stem']}.json").read_text())["meta"]["env"]
    header = quick_run["stdout"].splitlines()[0]
    markdown = (quick_run["out_dir"] / f"{quick_run['stem']}.md").read_text()
    if env["device_type"] == "cpu" and env["cuda"]:
        expected = f"torch built with CUDA {env['cuda']}; " + (
            "GPU present, not used" if env["gpu_available"] else "no GPU")
        assert expected in header and expected in markdown
        assert f"| CUDA {env['cuda']} |" not in header and f"CUDA {env['cuda']}," not in markdown


def test_quick_run_writes_json_and_markdown_with_metadata(quick_run: dict) -> None:
    payload = json.loads((quick_run["out_dir"] / f"{quick_run['stem']}.json").read_text())
    records = payload["records"]
    sections = {r["section"] for r in records}
    assert {"copy", "kernel", "model"} <= sections
    for record in records:
        missing = [k for k in RECORD_KEYS if k not in record]
        assert not missing, f"{record.get('section')} record lacks {missing}"
        empty = [k for k in NON_NULL_KEYS if record[k] is None]
        assert not empty, f"{record.get('section')} record has no {empty}"
    models = [r for r in records if r["section"] == "model" and r["status"] == "ok"]
    assert {r["role"] for r in models} == {"baseline", "mod", "floor_identity", "floor_static"}
    for r in models:
        assert 0 < r["p20_ms"] <= r["median_ms"] <= r["p80_ms"] and r["n"] >= 2
    kernels = [r for r in records if r["section"] == "kernel" and r["status"] == "ok"]
    assert kernels and all(r["agreement"]["ok"] for r in kernels if r["provider"] == "reference")
    for r in kernels:
        if r.get("gbps") is not None:
            assert math.isclose(r["gbps"], r["bytes"] / (r["median_ms"] * 1e-3) / 1e9, rel_tol=1e-9)
    assert {r["mod_cnn"] for r in records} == {__version__}
    if (REPO_ROOT / ".git").exists():  # a source checkout records its commit (an unpacked sdist has none)
        assert payload["meta"]["env"]["git_commit"]
    markdown = (quick_run["out_dir"] / f"{quick_run['stem']}.md").read_text()
    assert "# MoD benchmark" in markdown and "| resnet18_mod |" in markdown and "identity floor" in markdown
    assert payload["meta"]["env"]["device"] in markdown and f"mod-cnn {__version__}" in markdown


def test_quick_run_counts_launches_and_has_deploy_rows(quick_run: dict) -> None:
    payload = json.loads((quick_run["out_dir"] / f"{quick_run['stem']}.json").read_text())
    records = payload["records"]
    deploy = [r for r in records if r["section"] == "model" and r["status"] == "ok" and r["mode"] == "deploy"]
    assert {r["role"] for r in deploy} == {"baseline", "mod", "floor_identity", "floor_static"}
    assert all(r["agreement"]["ok"] for r in deploy if r["role"] == "mod")
    launches = [r for r in records if r["section"] == "launches"]
    blocks = [r for r in launches if r["scope"] == "block" and r["path"] == "triton+deploy"]
    fused = [r for r in blocks if r["fused"]]
    fallback = [r for r in blocks if r["fused"] is False]  # capacity 2: routing kernels + convolutions + fuse
    assert {r["kind"] for r in fused} == {r["kind"] for r in fallback} == {"bottleneck", "basic", "inverted"}
    assert max(r["launches"] for r in fused) <= 3 and all(r["capacity"] == 2 for r in fallback)
    assert all(r["triton"] >= 3 for r in fallback), (
        "the fallback runs the routing and fusion kernels, not the reference"
    )
    (model,) = [r for r in launches if r["scope"] == "model" and r["path"] == "triton+deploy"]
    baseline_deploy = [r for r in launches
                       if r["scope"] == "model" and r["network"] == "torchvision" and r["path"] == "deploy"]
    assert model["max_per_mod_block"] <= 3 and model["launches"] < baseline_deploy[0]["launches"]
    markdown = (quick_run["out_dir"] / f"{quick_run['stem']}.md").read_text()
    assert "## Kernel launches" in markdown and "| resnet18_mod (resnet18) |" in markdown


def test_quick_run_has_the_cpu_runtime_rows_and_the_native_block_section(quick_run: dict) -> None:
    payload = json.loads((quick_run["out_dir"] / f"{quick_run['stem']}.json").read_text())
    models = [r for r in payload["records"] if r["section"] == "model" and r.get("runtime")]
    runtimes = {r["runtime"] for r in models}
    assert {"eager", "compile"} <= runtimes and runtimes <= {"eager", "compile", "onnxruntime"}
    for runtime in runtimes:
        cases = {r["role"]: r for r in models if r["runtime"] == runtime}
        assert set(cases) >= {"mod", "baseline", "floor_identity"}, runtime
        assert all(r["status"] == "ok" and r["agreement"]["ok"] for r in cases.values()), runtime
    compiled = [r for r in models if r["runtime"] == "compile"]
    assert all(r["freezing"] and r["compiled"] for r in compiled)
    (mod,) = [r for r in compiled if r["role"] == "mod"]
    assert mod["agreement"]["method"] == "teacher_forcing"  # the compiled graph's selections, read back
    blocks = [r for r in payload["records"] if r["section"] == "native_block"]
    assert blocks and all(r["status"] == "ok" and r["native_vs_read"] > 0 for r in blocks)
    markdown = (quick_run["out_dir"] / f"{quick_run['stem']}.md").read_text()
    assert "## CPU runtimes" in markdown and "| resnet18_mod (resnet18) | torch.compile + freezing |" in markdown
    assert "best vs best" in markdown and "## Native block microbenchmark" in markdown


def _disagreeing(model: torch.nn.Module):
    return lambda x: model(x) * 1.5


class DisagreeingProvider(ModelProvider):
    """The reference backend with its logits scaled: a provider whose outputs differ."""

    def prepare(self, model):
        return _disagreeing(REFERENCE.prepare(model))


def test_model_speedup_only_where_outputs_agree() -> None:
    bad = DisagreeingProvider("bad-provider", backend="reference")
    records = run_models(
        ["resnet18_mod"], [ModelConfig("cpu", batch=1, resolution=32, threads=1)], [REFERENCE, bad],
        env=collect_env(torch.device("cpu")), timer=TimerSettings(cpu_rounds=1, cpu_samples_per_round=2, cpu_warmup=1),
        floors=("identity",), log=lambda message: None,
    )
    by_provider = {r["provider"]: r for r in records if r["role"] == "mod"}
    assert by_provider["reference"]["agreement"]["ok"]
    assert not by_provider["bad-provider"]["agreement"]["ok"]
    assert by_provider["bad-provider"]["median_ms"] > 0  # timed, but its ratios are withheld
    assert by_provider["bad-provider"]["agreement"]["method"] == "relative_l2"  # a wrapped callable: no selections
    planned = M.plan_cases(["resnet18_mod"], [ModelConfig("cpu", batch=1, resolution=32, threads=1)], [REFERENCE, bad],
                           floors=("identity",))
    assert [(r["model"], r["role"], r["provider"]) for r in records] == [case[1:] for case in planned]
    rows = {row["record"]["provider"]: row for rows in R.model_derived(records).values() for row in rows}
    assert rows["reference"]["speedup"] is not None and rows["reference"]["overhead"] is not None
    assert rows["bad-provider"]["speedup"] is None and rows["bad-provider"]["overhead"] is None
    (_, body), = R.model_tables(records)
    bad_line = next(line for line in body.splitlines() if "bad-provider" in line)
    assert R.OUTPUTS_DIFFER in bad_line and "x |" not in bad_line.split("bad-provider")[1].split("|")[3]


# ------------------------------------------------------------------------- teacher forcing

NEAR_TIE = 0.6 + 1e-7  # fp32: 2 ulps above 0.6


class FixedScores(nn.Module):
    """A router whose scores ignore the input: channel 3 beats channel 4 by ~1e-7 for the last of k = 4 slots."""

    def __init__(self) -> None:
        super().__init__()
        scores = torch.tensor([0.9, 0.85, 0.8, NEAR_TIE, 0.6] + [0.5 - 0.03 * i for i in range(11)])
        self.register_buffer("scores", scores)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scores.expand(x.shape[0], -1).clone()


class TinyMoD(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.block = MoDBasicBlock(16, capacity=4, backend="reference")
        self.block.router = FixedScores()
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.stem(x)).mean(dim=(2, 3)))


class ForcingProvider(ModelProvider):
    """The eager reference routing every sample to ``channels`` (None: its own top-k), logits times ``scale``."""

    def __init__(self, name: str, channels: list[int] | None, scale: float = 1.0) -> None:
        super().__init__(name, backend="reference")
        object.__setattr__(self, "channels", channels)
        object.__setattr__(self, "scale", scale)

    def prepare(self, model):
        model = REFERENCE.prepare(model)
        if self.channels is not None:
            model.block.forced_selection = torch.tensor([self.channels] * 2)
        if self.scale != 1.0:
            model.register_forward_hook(lambda module, inputs, out: out * self.scale)
        return model


def _tiny_family(providers: list[ModelProvider], batch: int = 2) -> dict[str, dict]:
    """Run the tiny model (planted under the name resnet18_mod) with ``providers``; records by provider."""
    torch.manual_seed(0)
    cache = ModelCache()
    cache._models[("resnet18_mod", "model")] = TinyMoD().eval()
    cache._facts[("resnet18_mod", "model", 8)] = {"params_m": 0.0, "gmacs": 0.0}
    records = bench_family(
        "resnet18", ["resnet18_mod"], ModelConfig("cpu", batch=batch, resolution=8, threads=1), providers,
        cache=cache, env=collect_env(torch.device("cpu")), floors=(), include_baseline=False,
        timer=TimerSettings(cpu_rounds=1, cpu_samples_per_round=1, cpu_warmup=0), log=lambda message: None,
    )
    return {r["provider"]: r for r in records}


def test_teacher_forcing_accepts_near_tie_flip_and_rejects_wrong_providers() -> None:
    records = _tiny_family([
        REFERENCE,
        ForcingProvider("near-tie-flip", [0, 1, 2, 4]),  # channel 4 for channel 3: 1.2e-7 apart
        ForcingProvider("wrong-channel", [0, 1, 2, 15]),  # channel 15 for channel 3: 0.3 apart
        ForcingProvider("wrong-order", [0, 1, 3, 2]),  # the right set, slots out of score order
        ForcingProvider("perturbed", None, scale=1.001),  # right selections, logits off by 1e-3
    ])
    flip = records["near-tie-flip"]["agreement"]
    assert flip["ok"] and flip["method"] == "teacher_forcing", flip
    assert flip["flipped_selections"] == 2 and flip["selections"] == 2 and flip["invalid_selections"] == 0
    assert 0 < flip["max_flip_gap"] <= 2e-7 and flip["rel_err"] <= 1e-6
    assert flip["rel_err_unforced"] > A.model_tolerance(torch.float32)  # the plain logits check would reject it
    assert records["near-tie-flip"]["selection_agreement"] == 0.0
    assert R.agreed(records["near-tie-flip"])

    wrong = records["wrong-channel"]["agreement"]
    assert not wrong["ok"] and wrong["invalid_selections"] == 2 and wrong["worst_selection_gap"] > 0.1
    assert "no top-k within score tolerance" in wrong["detail"]
    order = records["wrong-order"]["agreement"]
    assert not order["ok"] and order["invalid_selections"] == 2 and order["rel_err"] <= 1e-6
    perturbed = records["perturbed"]["agreement"]
    assert not perturbed["ok"] and perturbed["flipped_selections"] == 0
    assert 5e-4 < perturbed["rel_err"] < A.model_tolerance(torch.float32)  # within the old tolerance, not the new
    assert "logits under forced selections" in perturbed["detail"]
    assert all(records[p]["median_ms"] > 0 for p in records)  # timed; ratios withheld where outputs differ
    (_, body), = R.model_tables(list(records.values()))
    assert "near-tie-flip: 2 of 2 selections flipped at near-ties" in body
    assert f"perturbed: {R.OUTPUTS_DIFFER}" in body


def test_teacher_forcing_through_onnxruntime() -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    records = _tiny_family([REFERENCE, ONNXRUNTIME], batch=1)  # the provider exports batch 1
    assert records["onnxruntime"]["status"] == "ok", records["onnxruntime"]["reason"]
    result = records["onnxruntime"]["agreement"]
    assert result["ok"] and result["method"] == "teacher_forcing" and result["selections"] == 1, result
    assert result["timed_vs_checked_rel_err"] <= 1e-6 and result["rel_err"] <= 1e-6


def test_selection_gap_on_given_scores() -> None:
    scores = torch.tensor([[0.9, 0.5, 0.7, 0.5, 0.1]])

    def gap(*channels: int) -> float:
        return float(A.selection_gap(torch.tensor([list(channels)]), scores)[0])

    assert gap(0, 2) == 0.0 and gap(0, 2, 1) == gap(0, 2, 3) == 0.0  # an exact tie may go either way
    assert gap(0, 1) == pytest.approx(0.2)  # channel 2 (0.7) left out for 0.5
    assert gap(2, 0) == pytest.approx(0.2)  # right set, wrong slot order
    assert gap(0, 2, 1, 3, 4) == 0.0 and gap(4, 0, 2, 1, 3) == pytest.approx(0.8)
    assert A.selection_gap(torch.tensor([[0, 1]]), torch.tensor([[float("nan"), 0.5]]))[0] == float("inf")


def test_kernel_speedup_only_where_outputs_agree(monkeypatch) -> None:
    def wrong_route_pack(x, fc1, fc2, k):  # packs the right channels of the wrong samples
        xs, idx, w, _ = K.reference_route_pack(x, fc1, fc2, k)
        return xs.flip(0), idx, w, K.slots_of(idx, x.shape[1])

    def plain_scale_fuse(x, y, w, idx, slot, inplace):
        return K.reference_scale_fuse(x, y, w, idx, slot, inplace)

    def wrong_route_fuse(x, fc1, fc2, k, y, inplace):  # fuses into the wrong samples
        out, xs = K.reference_route_fuse(x, fc1, fc2, k, y, inplace)
        return out.flip(0), xs

    monkeypatch.setattr(K, "triton_route_pack", wrong_route_pack)
    monkeypatch.setattr(K, "triton_scale_fuse", plain_scale_fuse)
    monkeypatch.setattr(K, "triton_route_fuse", wrong_route_fuse)
    shape = K.KernelShape(2, 128, 4, 4, 64, "fp32", "nchw")
    records = K.run_tasks(K.simple_plan([shape], ("reference", "triton"), ("route_fuse.fwd", "scale_fuse.fwd")),
                          device=torch.device("cpu"), env=collect_env(torch.device("cpu")), copy_gbps=10.0,
                          log=lambda message: None)
    status = {(r["op"], r["provider"]): r for r in records}
    assert not status[("route_fuse.fwd", "triton")]["agreement"]["ok"]
    assert status[("scale_fuse.fwd", "triton")]["agreement"]["ok"]
    for record in records:  # pretend they were measured on a GPU: only the agreeing op gets a ratio
        record["interpreter"] = False
    (_, body), = R.kernel_tables(records)
    route_line = next(line for line in body.splitlines() if line.startswith("| route_fuse.fwd"))
    fuse_line = next(line for line in body.splitlines() if line.startswith("| scale_fuse.fwd"))
    assert route_line.count(R.OUTPUTS_DIFFER) == 3  # fused/eager, fused/compile, fused/eager over eager calls
    assert R.OUTPUTS_DIFFER not in fuse_line and fuse_line.split("|")[11].strip() == "-"  # no compile run
    assert fuse_line.split("|")[10].strip().endswith("x")


def test_gpu_plan_starts_with_the_deploy_block_and_times_its_fallback_apart() -> None:
    stages = [(256, 56, 56, 64), (512, 28, 28, 64)]
    tasks = K.gpu_plan(stages, batches=(64, 256, 1))
    deploy = [t for t in tasks if t.op == "block.deploy"]
    assert tasks[:len(deploy)] == deploy, "the deploy block comes first"
    fused = [t for t in deploy if t.shape.capacity == 64]
    assert [(t.shape.batch, t.shape.channels) for t in fused] == [(64, 256), (64, 512), (1, 256), (1, 512)]
    assert all((t.shape.dtype, t.shape.memory_format) == ("bf16", "channels_last") for t in deploy)
    assert all("reference+compile" in t.providers for t in fused)
    (fallback,) = [t for t in deploy if t.shape.capacity != 64]
    assert (fallback.shape.batch, fallback.shape.channels, fallback.shape.capacity, fallback.providers) == (
        64, 256, 2, ("reference", "triton"))
    assert (K._deploy_path(MoDBottleneck(256, capacity=2)) == "fallback"
            and K._deploy_path(MoDBottleneck(256)) == "fused")
    # A fallback row at the same shape is reported as such and never judged by the fused block's target.
    row = {"section": "kernel", "op": "block.deploy", "batch": 64, "channels": 256, "height": 56, "width": 56,
           "dtype": "bf16", "memory_format": "channels_last", "status": "ok",
           "median_ms": 1.0, "p20_ms": 0.9, "p80_ms": 1.1, "k": 4,
           "capacity": 64, "deploy_path": "fused", "agreement": {"ok": True}, "device_type": "cuda"}
    records = [{**row, "provider": "triton", "median_ms": 1.0},
               {**row, "provider": "reference+compile", "median_ms": 3.0},
               {**row, "provider": "triton", "capacity": 2, "k": 128, "deploy_path": "fallback", "median_ms": 9.0},
               {**row, "provider": "reference+compile", "capacity": 2, "k": 128, "deploy_path": "fallback",
                "median_ms": 1.0}]
    (_, body), = R.kernel_tables(records)
    assert ("| block.deploy | 64x256x56x56 (k=4) |" in body
            and "| block.deploy (fallback) | 64x256x56x56 (k=128) |" in body)
    (target,) = [t for t in R._kernel_targets(records) if "2x torch.compile of the reference eval block" in t["target"]]
    assert target["status"] == "met", target


def test_markdown_table_writer() -> None:
    from mod_models.tools.markdown import table

    assert table(["a", "b"], [[1, "x|y"], ["-", 2.5]], "lr") == (
        "| a | b |\n| --- | ---: |\n| 1 | x\\|y |\n| - | 2.5 |")
    assert R.table is table, "one writer: the benchmark report uses the same function"
    with pytest.raises(ValueError, match="one 'l' or 'r' per column"):
        table(["a", "b"], [], "l")
    with pytest.raises(ValueError, match="every row needs 2 cells"):
        table(["a", "b"], [[1]])


def test_byte_formulas_match_hand_counts() -> None:
    # resnet50_mod stage 1 at batch 64 in bf16: C=256, 56x56, k=4, C_h=16, 2-byte elements and weights.
    s = T.FeatureShape.of(64, 256, 56, 56, capacity=64, dtype=torch.bfloat16)
    assert (s.k, s.router_hidden, s.element_bytes, s.weight_bytes) == (4, 16, 2, 2)
    plane = 64 * 56 * 56 * 2  # one channel of the whole batch: 401,408 bytes
    assert T.route_pack_forward(s) == plane * 264 + 16_384 + 3_072 + 65_536 == 106_056_704
    assert T.route_pack_backward(s) == plane * 260 + 32_768 + 1_024 + 131_072 == 104_530_944
    assert T.scale_fuse_forward(s, inplace=True) == plane * 12 + 1_024 == 4_817_920
    assert T.scale_fuse_forward(s, inplace=False) == plane * 516 + 1_024 == 207_127_552
    assert T.scale_fuse_forward(s, inplace=True, fusion="original") == 4_817_920 + 2_048
    assert T.scale_fuse_backward(s) == plane * 524 + 2_048 == 210_339_840
    assert T.scale_fuse_backward(s, activation="none") == plane * 520 + 2_048 == 208_734_208
    assert T.route_fuse_forward(s) == 106_056_704 + 4_817_920 == 110_874_624
    # the chain's backward reads grad_out and writes grad_x once: 2C + 3k + k (ReLU mask) channels
    assert T.route_fuse_backward(s) == plane * 528 + 32_768 + 2_048 + 131_072 == 212_109_312
    assert T.route_fuse_forward_backward(s) == 106_056_704 + 207_127_552 + 212_109_312 == 525_293_568
    assert T.op_bytes("block.fwd", s) is None
    # Stage 4 at batch 1 in fp32: C=2048, 7x7, k=32, C_h=128; the router weights outweigh the map.
    s4 = T.FeatureShape.of(1, 2048, 7, 7, capacity=64, dtype=torch.float32)
    assert T.route_pack_forward(s4) == 4 * 49 * 2112 + 2 * 4 * 2048 * 128 + 12 * 32 + 4 * 2048 == 2_519_680


def test_floors_replace_every_mod_block() -> None:
    model = build_model("resnet18_mod", backend="reference").eval()
    n_mod = sum(isinstance(m, MoDBlock) for m in model.modules())
    identity, static = identity_floor(model), static_floor(model)
    assert not any(isinstance(m, MoDBlock) for m in identity.modules())
    assert sum(isinstance(m, StaticSelectionBlock) for m in static.modules()) == n_mod
    assert sum(isinstance(m, MoDBlock) for m in model.modules()) == n_mod  # the original is untouched
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        assert static(x).shape == identity(x).shape == model(x).shape == (2, 1000)


def test_overhead_definition_on_given_times() -> None:
    def record(role, model, ms, provider="eager", of_model=None, baseline=None):
        return {"section": "model", "device_type": "cpu", "batch": 1, "dtype": "fp32", "memory_format": "nchw",
                "resolution": 224, "cuda_graph": False, "threads": 1,
                "role": role, "model": model, "of_model": of_model,
                "baseline": baseline, "provider": provider, "mode": "eager", "status": "ok", "median_ms": ms,
                "p20_ms": ms, "p80_ms": ms, "agreement": {"ok": True} if role == "mod" else None}

    records = [
        record("baseline", "resnet50", 150.0),
        record("mod", "resnet50_mod", 110.0, "reference", baseline="resnet50"),
        record("floor_identity", "resnet50_mod", 100.0, of_model="resnet50_mod", baseline="resnet50"),
        record("floor_static", "resnet50_mod", 104.0, of_model="resnet50_mod", baseline="resnet50"),
    ]
    (row,), = R.model_derived(records).values()
    assert row["speedup"] == pytest.approx(150 / 110)
    assert row["overhead"] == pytest.approx(0.10)
    assert row["overhead_fk"] == pytest.approx(0.04) and row["overhead_routing"] == pytest.approx(0.06)


def test_percentile_interpolates() -> None:
    assert percentile([4.0, 1.0, 3.0, 2.0], 0.5) == 2.5
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 0.2) == pytest.approx(1.8)
    with pytest.raises(ValueError):
        percentile([], 0.5)
    with pytest.raises(ValueError):
        percentile([1.0], 1.5)


def test_progress_estimates_the_time_left_from_the_speed_so_far() -> None:
    now = [100.0]
    progress = Progress(4, 10.0, clock=lambda: now[0])
    now[0] = 110.0
    assert progress.advance(2.5) == ("[1/4]", "10s elapsed, ETA ~30s")  # 2.5 of 10 in 10 s: 7.5 left take 30 s
    now[0] = 300.0
    assert progress.advance(2.5) == ("[2/4]", "3m20s elapsed, ETA ~3m20s")
    assert progress.seconds_for(1.0) == pytest.approx(40.0)
    now[0] = 310.0
    progress.advance(2.5)
    assert progress.advance(2.5) == ("[4/4]", "3m30s elapsed, done")
    assert [format_duration(s) for s in (0, 59.4, 60, 190, 3725)] == ["0s", "59s", "1m00s", "3m10s", "1h02m"]
    with pytest.raises(ValueError):
        Progress(3, 0.0)


def test_time_split_adds_up_after_rounding() -> None:
    # Rounded one by one these read "kernels 4 s; models 2 s; total 5 s".
    assert R.sections_text({"kernels": 3.5, "models": 1.5, "total": 5.0}) == "kernels 3.5 s, models 1.5 s; total 5.0 s"
    text = R.sections_text({"kernels": 3.46, "models": 1.46, "total": 5.44})
    assert text == "kernels 3.5 s, models 1.4 s, other 0.5 s; total 5.4 s"
    text = R.sections_text({"kernels": 100.6, "models": 200.6, "total": 301.7})
    assert text == "kernels 101 s, models 200 s, other 1 s; total 302 s"
    assert R.sections_text({"kernels (wall)": 2.0, "gpu script total": 70.0}) == (
        "kernels (wall) 2.0 s, gpu script total 70 s")
    with pytest.raises(ValueError):
        R.sections_text({"models": 6.0, "total": 5.0})


def test_cuda_is_named_for_what_it_is() -> None:
    from bench.env import cuda_text

    assert cuda_text({"device_type": "cpu", "cuda": "13.0", "gpu_available": False}) == \
        "torch built with CUDA 13.0; no GPU"
    assert cuda_text({"device_type": "cpu", "cuda": "13.0", "gpu_available": True}) == \
        "torch built with CUDA 13.0; GPU present, not used"
    assert cuda_text({"device_type": "cpu", "cuda": None, "gpu_available": False}) == "CPU-only torch build"
    assert cuda_text({"device_type": "cuda", "cuda": "13.0", "cuda_driver": "580.1"}) == "CUDA 13.0 (driver 580.1)"


def test_one_naming_rule_for_bench_and_the_gpu_script(quick_run: dict, tmp_path: Path, monkeypatch) -> None:
    """bench.gpu merges its children's parts under the same name python -m bench gives the same machine."""
    from bench import gpu
    from bench.env import result_stem

    payload = json.loads((quick_run["out_dir"] / f"{quick_run['stem']}.json").read_text())
    slug = payload["meta"]["env"]["device_slug"]
    assert quick_run["stem"] == result_stem(slug, "quick")

    def fake_child(cmd, timeout, log_path=None, extra_env=None):  # a benchmark child that wrote its part
        assert "--dry-run" in cmd and "--full" not in cmd
        R.write(payload["records"], payload["meta"], tmp_path, f"part-{cmd[cmd.index('--part') + 1]}")
        return 0, 1.0, ""

    monkeypatch.setattr(gpu, "_run", fake_child)
    assert gpu.main(["--out-dir", str(tmp_path), "--sections", "models", "--dry-run"]) == 0
    assert sorted(p.name for p in tmp_path.glob("*.json")) == [f"{slug}-dry-run.json"]
    assert result_stem(slug, "full") == slug and result_stem(slug, "short") == slug + "-short"
    with pytest.raises(ValueError):
        result_stem(slug, "fast")


def _planned_runs(monkeypatch, tmp_path: Path, *argv: str) -> tuple[list[tuple], str]:
    """``python -m bench ARGV`` with the model runs recorded instead of measured: (names, configs, providers) per
    call, and what it printed."""
    calls = []

    def fake_run_models(names, configs, providers, **kwargs):
        calls.append((list(names), list(configs), [p.name for p in providers]))
        return []

    monkeypatch.setattr(M, "run_models", fake_run_models)
    from bench import launches

    monkeypatch.setattr(launches, "measure", lambda names, **kwargs: ([], "not counted (test)"))
    lines = []
    monkeypatch.setattr(cli, "log", lines.append)
    assert cli.main(["--device", "cpu", "--models-only", "--no-train", "--no-plot", "--out-dir", str(tmp_path),
                     *argv]) == 0
    return calls, "\n".join(lines)


def test_default_is_the_short_table_and_says_how_to_run_the_full_one(monkeypatch, tmp_path: Path) -> None:
    calls, printed = _planned_runs(monkeypatch, tmp_path)
    # One family run per family with every provider, so that the CPU runtimes are timed side by side:
    # the eager reference (what the others are checked against), the deploy form on the native kernel,
    # its torch.compile with freezing, and ONNX Runtime where installed.
    ((names, configs, providers),) = calls
    runtimes = ["native+deploy", "native+deploy+freezing"] + (["onnxruntime"] if "onnxruntime" in providers else [])
    assert providers[0] == "reference" and sorted(providers[1:]) == sorted(runtimes)
    assert names == list(cli.SHORT_MODELS) and [(c.batch, c.threads) for c in configs] == [(1, 1)]
    assert "The whole table: python -m bench --full" in printed
    assert (tmp_path / f"{collect_env(torch.device('cpu'))['device_slug']}-short.json").exists()

    calls, printed = _planned_runs(monkeypatch, tmp_path, "--full")
    ((names, configs, providers),) = calls
    assert names == list(M.MOD_BUILDERS) and "reference+deploy" in providers
    threads = list(dict.fromkeys([1, torch.get_num_threads()]))
    assert [(c.batch, c.threads) for c in configs] == [(b, t) for b in (1, 8) for t in threads]
    assert "The whole table" not in printed  # nothing more to suggest after the whole table


@pytest.mark.parametrize("argv, message", [
    (["--models", "resnet19_mod"], "unknown MoD model"),
    (["--providers", "tensorrt"], "unknown provider"),
    (["--threads", "0"], "positive integer"),
    (["--full", "--quick"], "not allowed with"),
    (["--budget", "-3"], "budget must be positive"),
    (["--name", "../../escaped"], "plain name"),  # a file stem must not leave --out-dir
    (["--part", "../x"], "plain name"),
])
def test_cli_rejects_bad_input_with_exit_2(argv, message, capsys) -> None:
    with pytest.raises(SystemExit) as stop:
        cli.main(argv)
    assert stop.value.code == 2 and message in capsys.readouterr().err


def test_cpu_timer_keeps_the_thread_count_and_samples_every_round() -> None:
    seen = []

    def case() -> None:
        seen.append(torch.get_num_threads())
        sum(range(2000))

    with M.thread_setting(2):
        timings = time_cpu_interleaved({"a": case, "b": case}, rounds=3, samples_per_round=2, warmup=2)
    assert set(seen) == {2}  # torch.utils.benchmark's Timer defaults to one thread: it must be told
    for timing in timings.values():
        assert timing.n >= 3 and 0 < timing.p20_ms <= timing.median_ms <= timing.p80_ms
        assert timing.method.startswith("torch.utils.benchmark blocked_autorange")


def _model_record(provider, model, ms, *, role="mod", mode="eager", agreed=True, of_model=None, baseline="resnet18",
                  interpreter=False):
    return {"section": "model", "device_type": "cpu", "batch": 1, "dtype": "fp32", "memory_format": "nchw",
            "resolution": 224, "cuda_graph": False, "threads": 1, "role": role, "model": model, "of_model": of_model,
            "baseline": None if role == "baseline" else baseline, "provider": provider, "mode": mode,
            "status": "ok", "median_ms": ms, "p20_ms": ms, "p80_ms": ms, "interpreter": interpreter,
            "agreement": {"ok": agreed} if role == "mod" else None}


def test_plot_draws_only_providers_with_ratios_and_keeps_the_legend_off_the_bars() -> None:
    pytest.importorskip("matplotlib")
    from bench import plot as P

    records = [
        _model_record("eager", "resnet18", 60.0, role="baseline"),
        _model_record("reference", "resnet18_mod", 40.0),
        _model_record("reference", "resnet26_mod", 50.0),
        _model_record("onnxruntime", "resnet18_mod", 20.0, mode="onnxruntime"),  # no baseline in its mode
        _model_record("triton", "resnet18_mod", 900.0, interpreter=True),  # the interpreter: not a speed
    ]
    fig = P.figure(records, "test")
    (ax,) = fig.axes
    legend = ax.get_legend()
    assert {t.get_text() for t in legend.get_texts()} == {"reference", "paper"}  # resnet26 has no paper ratio
    assert len(ax.patches) == 2 and [round(p.get_height(), 3) for p in ax.patches] == [1.5, 1.2]
    note = ax.get_xlabel()
    assert "onnxruntime (no baseline in its mode" in note and "triton (Triton interpreter" in note
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    assert legend.get_window_extent(renderer).x0 >= ax.get_window_extent(renderer).x1  # beside the axes
    import matplotlib.pyplot as plt

    plt.close(fig)

    records.append(_model_record("reference", "resnet34_mod", 70.0, agreed=False, baseline="resnet34"))
    records.append(_model_record("eager", "resnet34", 90.0, role="baseline"))
    fig = P.figure(records)
    labels = {t.get_text() for t in fig.axes[0].get_legend().get_texts()}
    assert labels == {"reference", "paper", "no ratio"}  # resnet34_mod's outputs differed: marked, not drawn
    plt.close(fig)


def test_a_fresh_process_without_cuda_runs_the_triton_kernels_under_the_interpreter(tmp_path):
    """``python -m bench`` switches Triton's interpreter on before anything imports Triton (parsing
    ``--name`` imports mod_models, which imports Triton through torch._dynamo): the triton rows of a
    kernel dry run are measured, not 'unavailable', in a process that did not set TRITON_INTERPRET."""
    if torch.cuda.is_available():
        pytest.skip("with CUDA the kernels run on the GPU; this checks the CPU's interpreter switch")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    out_dir = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--kernels", "--dry-run", "--device", "cpu", "--kernel-ops", "route_pack.fwd",
         "--no-plot", "--name", "interpreter-check", "--out-dir", str(out_dir)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    records = json.loads((out_dir / "interpreter-check.json").read_text())["records"]
    triton = [r for r in records if r["section"] == "kernel" and r["provider"] == "triton"]
    assert triton and all(r["status"] == "ok" for r in triton), [(r["status"], r.get("reason")) for r in triton]
