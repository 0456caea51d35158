"""One process of the 2-process DDP test (launched by torchrun from tests/train/test_ddp.py; not a test module).

Trains a tiny run with :func:`mod_models.train.train` and writes its own final weights to
``<out>/rank<r>.pt`` so that the test can compare the replicas itself.
"""

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: _training

from _training import tiny_config  # noqa: E402

from mod_models.train import train  # noqa: E402


def main() -> None:
    out = sys.argv[1]
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    result = train(tiny_config(out, epochs=2, batch_size=16, train_samples=64, val_samples=30))
    assert not dist.is_initialized(), "train() must leave the process group it created"
    torch.save(
        {"state": result.model.state_dict(), "history": result.history, "rank": rank, "world": world},
        os.path.join(out, f"rank{rank}.pt"),
    )


if __name__ == "__main__":
    main()
