"""Random state of a training run: seeding, and capturing / restoring / checking the Python, NumPy,
torch and CUDA generator states a checkpoint carries (so a resumed run continues exactly)."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

from .checkpoint import CheckpointError


def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU and CUDA generator states, in types ``torch.load(weights_only=True)`` accepts."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "key": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    python_state = state["python"]
    random.setstate((python_state[0], tuple(python_state[1]), python_state[2]))
    np_state = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            np_state["key"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def check_rng_states(states: list[dict[str, Any]], path: str) -> None:
    """Raise :class:`CheckpointError` unless every RNG state in ``states`` can be restored.

    Each state is restored for real (CUDA states only type-checked) and the current state put back
    afterwards, so whatever Python, NumPy or torch would reject is found before the run writes anything.
    """
    current = capture_rng_state()
    try:
        for rank, state in enumerate(states):
            try:
                # CUDA states are only type-checked: restoring them needs the GPUs they were saved on.
                cuda = state.get("cuda", [])
                if not isinstance(cuda, list) or not all(isinstance(item, torch.Tensor) for item in cuda):
                    raise TypeError(f"the CUDA states must be a list of tensors, got {type(cuda).__name__}")
                restore_rng_state({key: value for key, value in state.items() if key != "cuda"})
            except (KeyError, IndexError, TypeError, ValueError, RuntimeError, AttributeError) as error:
                raise CheckpointError(
                    f"checkpoint {path!r} is damaged: the RNG state of process {rank} cannot be restored "
                    f"({type(error).__name__}: {error})"
                ) from None
    finally:
        restore_rng_state(current)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (seeds of any size: NumPy takes 32 bits, torch 64)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed % 2**64)


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """Seed of the data loader's generator (worker seeds, augmentation) for one epoch of one process."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1, dtype=np.uint64)[0] >> 1)
