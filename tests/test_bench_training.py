"""The training-step rows of the benchmark (bench/training.py): the step is the training CLI's
optimizer step, its check catches a provider that skips a backward, its timing excludes setup,
its CPU peak memory counts what a step allocates. Tiny models at 8x8: seconds in all."""

from __future__ import annotations

import copy
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bench import cli
from bench import report as R
from bench import training as T
from bench.env import collect_env
from bench.models import ModelCache, ModelConfig
from mod_models import MoDBasicBlock
from mod_models.blocks import MoDBlock

ENV = collect_env(torch.device("cpu"))


class TinyTrainMoD(nn.Module):
    """Stem with a batch norm, one MoD block with a learned router (k = 4 of 16 channels), a head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.block = MoDBasicBlock(16, capacity=4, backend="reference")
        self.head = nn.Linear(16, T.NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.stem(x)).mean(dim=(2, 3)))


def _batch(batch: int = 4, resolution: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    return T.make_batch(ModelConfig("cpu", batch=batch, resolution=resolution), seed)


def test_the_step_is_one_sgd_momentum_step_with_weight_decay_in_train_mode() -> None:
    torch.manual_seed(0)
    x, y = _batch()
    model = TinyTrainMoD()
    step = T.REFERENCE_STEP.prepare(model, x, y, None)
    step()  # the first step makes the momentum buffers
    params = dict(model.named_parameters())
    assert all("momentum_buffer" in step.optimizer.state[p] for p in params.values()), "momentum buffers exist"
    before = {name: p.detach().clone() for name, p in params.items()}
    momentum = {name: step.optimizer.state[p]["momentum_buffer"].clone() for name, p in params.items()}
    stats = model.stem[1].running_mean.clone(), int(model.stem[1].num_batches_tracked)

    # The same step by hand on a copy: loss, gradients, p - lr (0.9 m + g + wd p).
    twin = copy.deepcopy(model)
    expected_loss = F.cross_entropy(twin(x), y)
    grads = torch.autograd.grad(expected_loss, list(twin.parameters()))
    loss = step()

    assert float(loss) == pytest.approx(float(expected_loss.detach()), rel=1e-6)
    for (name, p), g in zip(params.items(), grads):
        expected = before[name] - 0.1 * (0.9 * momentum[name] + g + 1e-4 * before[name])
        torch.testing.assert_close(p.detach(), expected, rtol=1e-5, atol=1e-7, msg=name)
        assert not torch.equal(p.detach(), before[name]), f"{name} did not change"
    assert not torch.equal(model.stem[1].running_mean, stats[0]), "batch-norm statistics update (train mode)"
    assert int(model.stem[1].num_batches_tracked) == stats[1] + 1


# --------------------------------------------------------------------- the check before timing


class NoRouterBackward(T.TrainProvider):
    """The reference backend with the router's scores detached: same forward, no router gradient."""

    def prepare(self, model, x, y, amp_dtype):
        for block in model.modules():
            if isinstance(block, MoDBlock):
                block.router.register_forward_hook(lambda module, inputs, out: out.detach())
        return super().prepare(model, x, y, amp_dtype)


class NoFkBackward(T.TrainProvider):
    """The reference backend with f_k's output detached: same forward, no gradient into f_k."""

    def prepare(self, model, x, y, amp_dtype):
        for block in model.modules():
            if isinstance(block, MoDBlock):
                block.process = (lambda process: lambda xs: process(xs).detach())(block.process)
        return super().prepare(model, x, y, amp_dtype)


class SlowSetup(T.TrainProvider):
    def prepare(self, model, x, y, amp_dtype):
        time.sleep(0.6)
        return super().prepare(model, x, y, amp_dtype)


class SlowStep(T.TrainProvider):
    def prepare(self, model, x, y, amp_dtype):
        step = super().prepare(model, x, y, amp_dtype)
        forward = step.forward

        def slow(inputs):
            time.sleep(0.05)
            return forward(inputs)

        step.forward = slow
        return step


def _tiny_family(providers, *, dtype: str = "fp32", floors=(), rounds: int = 1) -> dict[str, dict]:
    """The tiny model (planted under the name resnet18_mod) through bench_train_family; records by provider."""
    torch.manual_seed(0)
    cache = ModelCache()
    cache._models[("resnet18_mod", "model")] = TinyTrainMoD().eval()
    cache._facts[("resnet18_mod", "model", 8)] = {"params_m": 0.0, "gmacs": 0.0}
    records = T.bench_train_family(
        "resnet18", ["resnet18_mod"], ModelConfig("cpu", batch=4, resolution=8, dtype=dtype, threads=1), providers,
        cache=cache, env=ENV, floors=floors, include_baseline=False,
        timer=T.TrainTimer(cpu_rounds=rounds, cpu_samples_per_round=1, cpu_warmup=2), log=lambda message: None,
    )
    return {(r["role"], r["provider"]): r for r in records}


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_the_check_fails_providers_that_skip_the_router_or_f_k_backward(dtype) -> None:
    records = _tiny_family([T.REFERENCE_STEP, T.TrainProvider("reference-again", backend="reference"),
                            NoRouterBackward("no-router-backward", backend="reference"),
                            NoFkBackward("no-f_k-backward", backend="reference")], dtype=dtype)
    again = records[("mod", "reference-again")]["agreement"]
    assert again["ok"] and again["method"] == "teacher_forcing", again
    assert again["selections"] == 4 and again["loss_rel_err"] == 0.0
    f_k = tuple(f"block.{name}." for name, _ in TinyTrainMoD().block.named_children() if name != "router")
    for name, starved in (("no-router-backward", ("block.router.",)), ("no-f_k-backward", f_k)):
        record = records[("mod", name)]
        check = record["agreement"]
        assert not check["ok"], check
        assert check["loss_rel_err"] <= T.LOSS_TOLERANCE[torch.float32], "the forward is the same"
        assert "optimizer updates" in check["detail"] and check["worst_update"].startswith(starved), check
        assert check["update_rel_err"] > 0.3
        if dtype == "bf16":  # decided by the same provider's step in fp32 from the same state
            assert check["dtype"] == "fp32" and check["timed_step"]["dtype"] == "bf16"
        assert record["median_ms"] > 0  # timed; its ratios are withheld
    rows = {row["record"]["provider"]: row for rows in R.model_derived(list(records.values()), "train").values()
            for row in rows}
    assert rows["reference-again"]["vs_reference"] is not None and rows["no-router-backward"]["vs_reference"] is None
    ((_, body),) = R.train_tables(list(records.values()))
    assert f"no-router-backward: {R.OUTPUTS_DIFFER}" in body


def test_the_triton_backend_passes_the_check() -> None:
    pytest.importorskip("triton")
    records = _tiny_family([T.REFERENCE_STEP, T.TRITON_STEP])
    record = records[("mod", "triton")]
    check = record["agreement"]
    assert check["ok"] and check["method"] == "teacher_forcing", check
    assert check["update_rel_err"] < T.UPDATE_TOLERANCE[torch.float32] / 10
    if record["interpreter"]:  # on the CPU: checked, not timed
        assert record["status"] == "not timed" and "median_ms" not in record


def test_timing_excludes_setup_and_includes_the_step() -> None:
    records = _tiny_family([T.REFERENCE_STEP, SlowSetup("slow-setup", backend="reference"),
                            SlowStep("slow-step", backend="reference")], floors=("identity", "static"), rounds=2)
    reference, setup, slow = (records[("mod", name)] for name in ("reference", "slow-setup", "slow-step"))
    assert setup["setup_s"] >= 0.6 and setup["median_ms"] < 300, setup
    assert setup["agreement"]["ok"] and slow["agreement"]["ok"]
    assert slow["median_ms"] >= 50 > reference["median_ms"]
    assert {role for role, _ in records} == {"mod", "floor_identity", "floor_static"}
    for record in records.values():
        assert record["status"] == "ok" and record["p20_ms"] <= record["median_ms"] <= record["p80_ms"]
        assert record["peak_mem_mib"] > record["state_mib"] > 0


class Allocates(nn.Module):
    """A head that makes one known temporary in its forward: 4 Mi fp32 zeros (16 MiB), freed at once."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(3, T.NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        temporary = torch.zeros(4 * 2**20)
        return self.head(x.mean(dim=(2, 3))) + temporary[:1].sum()


def test_cpu_peak_memory_counts_the_state_and_what_the_step_allocates() -> None:
    x, y = _batch()
    model = Allocates()
    step = T.TrainStep(model, model, x, y, None)
    step()
    loss, memory = T.peak_memory(step, torch.device("cpu"))
    assert torch.isfinite(loss)
    params = sum(p.numel() for p in model.parameters()) * 4
    state = 3 * params + x.numel() * 4 + y.numel() * 8  # parameters, grads, momentum buffers, batch
    assert memory["state_mib"] * 2**20 == state
    temporary = 16 * 2**20
    assert temporary <= (memory["peak_mem_mib"] - memory["state_mib"]) * 2**20 <= temporary + 2**16, memory
    assert "profile_memory" in memory["peak_mem_method"]


# ------------------------------------------------------------------------------ the GPU plan


def _plan(*argv: str, on_cuda: bool) -> cli.TrainPlan:
    args = cli.build_parser().parse_args(list(argv))
    from bench.providers import parse_providers

    return cli._train_plan(args, ["resnet75_mod", "resnet50_mod", "resnet18_mod"], floors=("identity", "static"),
                           on_cuda=on_cuda, small=False, all_threads=2, use_compile=on_cuda,
                           chosen_providers=parse_providers(args.providers) if args.providers else None,
                           meta={"notes": []})


def test_gpu_training_plan_bf16_graphs_first_family_first_compile_last() -> None:
    plan = _plan("--full", on_cuda=True)
    configs = [(c.batch, c.dtype, c.memory_format, c.resolution, c.cuda_graph) for c in plan.phases[0][0]]
    assert configs == [(64, "bf16", "channels_last", 224, False), (64, "bf16", "channels_last", 224, True)]
    assert plan.phases[0][2] == ["resnet75_mod", "resnet50_mod"] and plan.phases[1][2] == ["resnet18_mod"]
    assert [p.name for p in plan.phases[0][1]] == ["reference", "triton"]
    assert {c.batch for c in plan.phases[2][0]} == {128}
    compiled = [phase for phase in plan.phases if phase[1][0].compiled]
    assert compiled and plan.phases[-len(compiled):] == compiled, "compile comes last"
    assert all(not c.cuda_graph for phase in compiled for c in phase[0])
    assert [p.name for p in compiled[0][1]] == ["reference+compile", "triton+compile"]
    assert not _plan("--providers", "reference+deploy", on_cuda=True).phases  # no provider takes a step


def test_gpu_script_runs_the_training_rows_after_the_model_table_within_its_budget(monkeypatch, tmp_path) -> None:
    from bench import gpu

    commands = []

    def fake_child(cmd, timeout, log_path=None, extra_env=None):
        commands.append((cmd, timeout))
        return 0, 1.0, ""

    monkeypatch.setattr(gpu, "_run", fake_child)
    gpu.main(["--out-dir", str(tmp_path), "--dry-run"])
    sections = [cmd[cmd.index("--part") + 1] for cmd, _ in commands if "--part" in cmd]
    assert sections == ["kernels", "models", "train"]
    (models,) = [cmd for cmd, _ in commands if "models" in cmd]
    (train,) = [cmd for cmd, _ in commands if "train" in cmd]
    assert "--no-train" in models and "--train-only" in train
    commands.clear()
    gpu.main(["--out-dir", str(tmp_path), "--sections", "models", "train"])
    (train,) = [cmd for cmd, _ in commands if "train" in cmd]
    assert "--full" in train and train[train.index("--models") + 1:][:4] == list(gpu.TRAIN_MODELS)
    assert gpu.TRAIN_MODELS[0] == "resnet50_mod"
    parser = gpu.build_parser()
    defaults = parser.parse_args([])
    budget_of = {"kernels": "kernel", "models": "model", "train": "train", "profile": "profile", "tests": "test"}
    sections_s = sum(getattr(defaults, f"{budget_of[s]}_budget") for s in defaults.sections)
    assert sections_s + gpu.STARTUP_S * (len(defaults.sections) - 1) + 10 <= defaults.budget
    assert 2 * defaults.budget + 120 <= 15 * 60, "one 15-minute lease holds the script twice and a machine start"
