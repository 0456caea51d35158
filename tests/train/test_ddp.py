"""DistributedDataParallel: 2 processes on the CPU with gloo, launched by torchrun."""

import os

import torch
from _training import REPO_ROOT, assert_same_tree, run_module, tiny_config, without_timings

from mod_models.train import seed_everything
from mod_models.zoo import build_model


def test_two_process_ddp_keeps_replicas_identical(tmp_path):
    out = tmp_path / "ddp"
    worker = os.path.join(REPO_ROOT, "tests", "train", "_ddp_worker.py")
    result = run_module(
        "torch.distributed.run",
        "--standalone",
        "--nnodes",
        "1",
        "--nproc-per-node",
        "2",
        worker,
        str(out),
        timeout=300,
        env_extra={"PYTHONPATH": REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "2 processes, cpu" in result.stdout
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    # Each rank trained on its own half of every batch; identical weights and BatchNorm
    # statistics after 8 steps mean the gradients and buffers were synchronised.
    assert_same_tree(ranks[0]["state"], ranks[1]["state"], "replica state")
    assert_same_tree(without_timings(ranks[0]["history"]), without_timings(ranks[1]["history"]), "history")
    # Only rank 0 writes the checkpoint, and it holds the replicas' weights.
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    assert checkpoint["world_size"] == 2 and len(checkpoint["rng"]) == 2
    assert_same_tree(checkpoint["model"], ranks[0]["state"], "checkpoint")
    # Training changed the weights (train() seeds with --seed before building the model).
    seed_everything(tiny_config(tmp_path).seed)
    initial = build_model("resnet18_mod", num_classes=4, backend="reference")
    moved = [
        name
        for name, value in initial.state_dict().items()
        if value.is_floating_point() and not torch.equal(value, ranks[0]["state"][name])
    ]
    assert "fc.weight" in moved and "layer1.1.router.fc1.weight" in moved
