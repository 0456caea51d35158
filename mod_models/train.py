"""Train a MoD CNN (or its torchvision baseline): ``python -m mod_models.train``.

The defaults are the paper's ImageNet recipe (SPEC.md section 4): SGD with momentum 0.9 and
weight decay 1e-4, learning rate 0.1 divided by 10 every 30 epochs, global batch 256,
100 epochs; random-resized crop 224 and flip for ImageFolder data. Everything is overridable.

Examples::

    # the built-in synthetic shapes set, small and fast on a CPU
    python -m mod_models.train --model resnet18_mod --epochs 10 --batch-size 64 --lr 0.05 \\
        --image-size 32 --train-samples 4000 --val-samples 1000 --out runs/r18
    # continue it (options not given are taken from the checkpoint; --epochs may be raised)
    python -m mod_models.train --out runs/r18 --resume --epochs 15
    # ImageNet-style folder (DIR/train/<class>/..., DIR/val/<class>/...) on 8 GPUs
    torchrun --nproc-per-node 8 -m mod_models.train --model resnet50_mod --data /data/imagenet \\
        --amp bf16 --channels-last --out runs/r50

Outputs in ``--out``: ``checkpoint.pt`` (everything needed to resume, written atomically
after every epoch), ``best.pt`` (weights of the best validation top-1), ``metrics.csv`` and
``metrics.json`` (one row per epoch). Bad input (unknown model, missing or empty data folder,
a checkpoint of another model or run) ends with ``error: ...`` and exit status 2, before
anything is written.

Resuming continues exactly: model, optimizer, scheduler, AMP scaler, epoch, the RNG states of
every process and the data order (a function of seed and epoch) are restored, so an
interrupted run ends bitwise where an uninterrupted one would (on GPUs: with
``--deterministic``).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import io
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from .backend import BACKENDS, resolve_backend
from .checkpoint import CHECKPOINT_FORMAT, CheckpointError, atomic_save, load_checkpoint
from .data import DataError, MAX_SYNTHETIC_CLASSES, SyntheticShapes, image_folder_splits
from .functional import FUSIONS, ROUTERS
from .zoo import MOD_BUILDERS, build_model, model_names

AMP_MODES = ("none", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")
SYNTHETIC = "synthetic"
CHECKPOINT_NAME = "checkpoint.pt"
BEST_NAME = "best.pt"
METRICS_CSV = "metrics.csv"
METRICS_JSON = "metrics.json"
EXIT_INPUT_ERROR = 2
EXIT_TRAINING_FAILED = 3
EXIT_INTERRUPTED = 130

# Fields that define the run: a resumed run must agree on them.
IDENTITY_FIELDS = ("model", "capacity", "fusion", "router", "data", "image_size", "num_classes", "seed")
SYNTHETIC_IDENTITY_FIELDS = ("train_samples", "val_samples")
# Fields held by the optimizer / scheduler state: changing them on resume would be silently ignored.
OPTIMIZER_FIELDS = ("lr", "momentum", "weight_decay", "lr_step", "lr_gamma")
# Fields that change the numbers of a resumed run (allowed, with a warning).
RECIPE_FIELDS = ("batch_size", "label_smoothing", "amp")


class ConfigError(ValueError):
    """Bad command-line or :class:`TrainConfig` input."""


class TrainingFailed(RuntimeError):
    """Training cannot go on (e.g. the loss became NaN); the last good checkpoint is kept."""


@dataclass
class TrainConfig:
    """Everything that defines a training run (the CLI flags, one for one).

    ``batch_size`` is the global batch, split evenly over the processes of a distributed run.
    ``image_size`` None means 224 for a data folder and 64 for the synthetic set.
    ``capacity``/``fusion``/``router`` None keep the MoD builder's defaults (and must stay
    None for torchvision baselines).
    """

    model: str = "resnet18_mod"
    data: str = SYNTHETIC
    out: Optional[str] = None
    epochs: int = 100
    batch_size: int = 256
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    lr_step: int = 30
    lr_gamma: float = 0.1
    label_smoothing: float = 0.0
    amp: str = "none"
    channels_last: bool = False
    backend: str = "auto"
    compile: bool = False
    seed: int = 0
    deterministic: bool = False
    device: str = "auto"
    workers: int = 4
    image_size: Optional[int] = None
    num_classes: int = 10
    train_samples: int = 10_000
    val_samples: int = 2_000
    capacity: Optional[int] = None
    fusion: Optional[str] = None
    router: Optional[str] = None
    sync_bn: bool = False
    log_every: int = 50
    progress: bool = True

    def resolved_image_size(self) -> int:
        if self.image_size is not None:
            return self.image_size
        return 64 if self.data == SYNTHETIC else 224

    def resolved_out(self) -> str:
        return self.out if self.out is not None else os.path.join("runs", self.model)

    def model_kwargs(self, num_classes: int) -> dict[str, Any]:
        """Keywords for :func:`mod_models.zoo.build_model` (what a checkpoint records; no backend)."""
        kwargs: dict[str, Any] = {"num_classes": num_classes}
        for name in ("capacity", "fusion", "router"):
            value = getattr(self, name)
            if value is not None:
                kwargs[name] = value
        return kwargs


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate_config(config: TrainConfig) -> TrainConfig:
    """Raise :class:`ConfigError` with a clear message for any bad field; returns ``config``."""
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    if config.model not in model_names():
        raise ConfigError(f"unknown model {config.model!r}; expected one of: {', '.join(model_names())}")
    mod_only = [name for name in ("capacity", "fusion", "router") if getattr(config, name) is not None]
    if config.model not in MOD_BUILDERS and mod_only:
        raise ConfigError(
            f"{config.model} is a torchvision baseline; "
            f"{', '.join('--' + n for n in mod_only)} apply to MoD models only"
        )
    positive_ints = ("epochs", "batch_size", "lr_step", "log_every", "num_classes", "train_samples", "val_samples")
    for name in positive_ints:
        value = getattr(config, name)
        if not _is_int(value) or value < 1:
            raise ConfigError(f"{name} must be an int >= 1, got {value!r}")
    for name in ("workers", "seed"):
        value = getattr(config, name)
        if not _is_int(value) or value < 0:
            raise ConfigError(f"{name} must be an int >= 0, got {value!r}")
    if config.image_size is not None and (not _is_int(config.image_size) or config.image_size < 8):
        raise ConfigError(f"image_size must be an int >= 8, got {config.image_size!r}")
    if config.capacity is not None and (not _is_int(config.capacity) or config.capacity < 1):
        raise ConfigError(f"capacity must be an int >= 1, got {config.capacity!r}")
    for name, low, high in (("lr", 0.0, math.inf), ("lr_gamma", 0.0, math.inf)):
        value = getattr(config, name)
        if not isinstance(value, (int, float)) or not low < value < high:
            raise ConfigError(f"{name} must be a number > 0, got {value!r}")
    for name in ("momentum", "weight_decay"):
        value = getattr(config, name)
        if not isinstance(value, (int, float)) or not 0.0 <= value < math.inf:
            raise ConfigError(f"{name} must be a number >= 0, got {value!r}")
    if not isinstance(config.label_smoothing, (int, float)) or not 0.0 <= config.label_smoothing < 1.0:
        raise ConfigError(f"label_smoothing must be in [0, 1), got {config.label_smoothing!r}")
    choices = {"amp": AMP_MODES, "backend": BACKENDS, "device": DEVICES}
    for name, allowed in choices.items():
        if getattr(config, name) not in allowed:
            raise ConfigError(f"{name} must be one of {allowed}, got {getattr(config, name)!r}")
    if config.fusion is not None and config.fusion not in FUSIONS:
        raise ConfigError(f"fusion must be one of {FUSIONS}, got {config.fusion!r}")
    if config.router is not None and config.router not in ROUTERS:
        raise ConfigError(f"router must be one of {ROUTERS}, got {config.router!r}")
    if config.data == SYNTHETIC and not 2 <= config.num_classes <= MAX_SYNTHETIC_CLASSES:
        raise ConfigError(
            f"num_classes must be in [2, {MAX_SYNTHETIC_CLASSES}] for the synthetic set, got {config.num_classes}"
        )
    if not isinstance(config.data, str) or not config.data:
        raise ConfigError(f"data must be 'synthetic' or a folder path, got {config.data!r}")
    return config


# ---------------------------------------------------------------------------------------------
# Distributed setup
# ---------------------------------------------------------------------------------------------


@dataclass
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_process_group: bool = False  # created here, so destroyed here

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else default


def setup_distributed(device_choice: str) -> DistInfo:
    """Read torchrun's environment, pick the device and join the process group (NCCL on GPU, gloo on CPU)."""
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    use_cuda = device_choice == "cuda" or (device_choice == "auto" and torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda was requested but no CUDA device is available")
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA devices are visible")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    info = DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, device=device)
    if info.distributed and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", device_id=device if use_cuda else None)
        info.owns_process_group = True
    return info


def _all_reduce_sum(values: list[float], info: DistInfo) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=info.device if info.device.type == "cuda" else "cpu")
    if info.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def _all_gather_object(obj: Any, info: DistInfo) -> list[Any]:
    if not info.distributed:
        return [obj]
    gathered: list[Any] = [None] * info.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def state_digest(module: nn.Module) -> str:
    """SHA-256 of every parameter and buffer, bit for bit (replica and resume checks)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# RNG state
# ---------------------------------------------------------------------------------------------


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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """Seed of the data loader's generator (worker seeds, augmentation) for one epoch of one process."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1, dtype=np.uint64)[0] >> 1)


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world, ...``: every sample evaluated once across the processes, none twice."""

    def __init__(self, length: int, rank: int, world_size: int) -> None:
        self.indices = range(rank, length, world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


@dataclass
class DataBundle:
    train: Dataset
    val: Dataset
    num_classes: int
    classes: list[str]


def build_datasets(config: TrainConfig) -> DataBundle:
    """The train and val sets of ``config`` (synthetic, or an ImageNet-style folder)."""
    image_size = config.resolved_image_size()
    if config.data == SYNTHETIC:
        common = dict(image_size=image_size, num_classes=config.num_classes, seed=config.seed)
        train = SyntheticShapes(config.train_samples, split="train", **common)
        val = SyntheticShapes(config.val_samples, split="val", **common)
        return DataBundle(train, val, config.num_classes, list(train.classes))
    train, val = image_folder_splits(config.data, image_size=image_size)
    return DataBundle(train, val, len(train.classes), list(train.classes))


# ---------------------------------------------------------------------------------------------
# Progress and metrics
# ---------------------------------------------------------------------------------------------


class Progress:
    """A tqdm bar on a terminal; plain ``step i/n`` lines every ``log_every`` steps otherwise."""

    def __init__(self, total: int, description: str, *, enabled: bool, log_every: int, use_bar: bool) -> None:
        self.total = total
        self.description = description
        self.enabled = enabled
        self.log_every = log_every
        self.bar = None
        if enabled and use_bar and sys.stderr.isatty():
            try:
                from tqdm import tqdm
            except ImportError:  # plain lines then
                tqdm = None
            if tqdm is not None:
                self.bar = tqdm(total=total, desc=description, leave=False, dynamic_ncols=True)

    def wants_update(self, step: int) -> bool:
        """Whether step ``step`` (1-based) should report (so the caller syncs a loss value only then)."""
        if not self.enabled:
            return False
        if self.bar is not None:
            return step % max(1, min(self.log_every, 10)) == 0 or step == self.total
        return step % self.log_every == 0 or step == self.total

    def update(self, step: int, metrics: dict[str, str]) -> None:
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix(metrics, refresh=True)
        elif self.enabled:
            text = "  ".join(f"{key} {value}" for key, value in metrics.items())
            print(f"{self.description}  step {step}/{self.total}  {text}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


METRIC_COLUMNS = (
    "epoch",
    "lr",
    "train_loss",
    "train_top1",
    "val_loss",
    "val_top1",
    "val_top5",
    "train_images_per_s",
    "epoch_seconds",
)


def _atomic_write_text(path: str, text: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    tmp_path = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    with open(tmp_path, "w", encoding="utf-8", newline="") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp_path, path)


def write_metrics(out_dir: str, history: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    """Rewrite ``metrics.csv`` and ``metrics.json`` from the full history (atomically, so they match the checkpoint)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(METRIC_COLUMNS), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(history)
    _atomic_write_text(os.path.join(out_dir, METRICS_CSV), buffer.getvalue())
    _atomic_write_text(
        os.path.join(out_dir, METRICS_JSON), json.dumps({**summary, "history": history}, indent=2) + "\n"
    )


# ---------------------------------------------------------------------------------------------
# Model, optimizer, checkpoint
# ---------------------------------------------------------------------------------------------


def _unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "_orig_mod", model)  # torch.compile
    return getattr(model, "module", model) if isinstance(model, nn.parallel.DistributedDataParallel) else model


def build_training_model(config: TrainConfig, num_classes: int) -> nn.Module:
    kwargs = config.model_kwargs(num_classes)
    if config.model in MOD_BUILDERS:
        kwargs["backend"] = config.backend
    return build_model(config.model, **kwargs)


def _check_backend_usable(config: TrainConfig, device: torch.device) -> None:
    if config.model not in MOD_BUILDERS:
        return
    probe = torch.empty(1, 1, 1, 1, device=device)
    try:
        resolve_backend(config.backend, probe)
    except (RuntimeError, ImportError) as error:
        raise ConfigError(
            f"--backend {config.backend} cannot run on {device}: {error}. Use --backend reference."
        ) from None


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)


def make_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig):
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=config.lr_step, gamma=config.lr_gamma)


def check_resume_compatible(config: TrainConfig, checkpoint: dict, path: str) -> list[str]:
    """Raise :class:`CheckpointError` if ``checkpoint`` is not a run of ``config``; returns warnings."""
    if checkpoint["kind"] != "full":
        raise CheckpointError(f"{path!r} holds weights only; resume needs the full {CHECKPOINT_NAME} of a run")
    saved_model = checkpoint["model_name"]
    if saved_model != config.model:
        raise CheckpointError(
            f"checkpoint {path!r} was written for model {saved_model!r}, not {config.model!r}; "
            f"pass --model {saved_model} to resume it, or choose another --out for a new run"
        )
    saved = checkpoint.get("config", {})
    fields = list(IDENTITY_FIELDS) + list(OPTIMIZER_FIELDS)
    if config.data == SYNTHETIC:
        fields += list(SYNTHETIC_IDENTITY_FIELDS)
    for name in fields:
        if name in saved and saved[name] != getattr(config, name):
            if name == "data" and config.data != SYNTHETIC and saved[name] != SYNTHETIC:
                continue  # a folder may move; the class list is checked instead
            raise CheckpointError(
                f"checkpoint {path!r} was written with {name}={saved[name]!r}, "
                f"but this run has {name}={getattr(config, name)!r}; "
                "a resumed run must keep it"
            )
    notes = []
    for name in RECIPE_FIELDS:
        if name in saved and saved[name] != getattr(config, name):
            notes.append(
                f"resuming with {name}={getattr(config, name)!r} (the run used {saved[name]!r}): "
                "it will not continue exactly"
            )
    return notes


def _checkpoint_payload(
    config: TrainConfig,
    model: nn.Module,
    num_classes: int,
    classes: list[str],
    epoch: int,
    history: list[dict[str, Any]],
    kind: str,
) -> dict[str, Any]:
    return {
        "format": CHECKPOINT_FORMAT,
        "kind": kind,
        "model_name": config.model,
        "model_kwargs": config.model_kwargs(num_classes),
        "model": _unwrap(model).state_dict(),
        "epoch": epoch,
        "classes": list(classes),
        "config": asdict(config),
        "history": [dict(row) for row in history],
    }


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    """What :func:`train` returns (on every process)."""

    model: nn.Module
    history: list[dict[str, Any]]
    best_top1: float
    out_dir: str
    epochs_run: int


def _accuracy_counts(logits: Tensor, targets: Tensor, top: int) -> tuple[Tensor, Tensor]:
    top = min(top, logits.shape[1])
    predictions = logits.topk(top, dim=1).indices
    hits = predictions.eq(targets[:, None])
    return hits[:, :1].sum(), hits.any(dim=1).sum()


def evaluate(
    model: nn.Module,
    loader: DataLoader,
    *,
    device: torch.device,
    info: DistInfo,
    amp_dtype: Optional[torch.dtype] = None,
    channels_last: bool = False,
) -> dict[str, float]:
    """Loss, top-1 and top-5 accuracy (percent) over the whole (sharded) set."""
    model.eval()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    totals = torch.zeros(4, dtype=torch.float64)
    with torch.inference_mode():
        for images, targets in loader:
            images = images.to(device, non_blocking=True).contiguous(memory_format=memory_format)
            targets = targets.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                logits = model(images)
            loss = F.cross_entropy(logits.float(), targets, reduction="sum")
            top1, top5 = _accuracy_counts(logits, targets, 5)
            totals += torch.stack(
                [
                    loss.double().cpu(),
                    top1.double().cpu(),
                    top5.double().cpu(),
                    torch.tensor(float(len(targets)), dtype=torch.float64),
                ]
            )
    loss_sum, top1, top5, count = _all_reduce_sum(totals.tolist(), info)
    count = max(count, 1.0)
    return {"loss": loss_sum / count, "top1": 100.0 * top1 / count, "top5": 100.0 * top5 / count}


def _log(info: DistInfo, message: str, *, error: bool = False) -> None:
    if info.is_main:
        print(message, file=sys.stderr if error else sys.stdout, flush=True)


def train(
    config: TrainConfig,
    *,
    resume: Optional[str | os.PathLike] = None,
    checkpoint: Optional[dict] = None,
) -> TrainResult:
    """Run (or continue) a training run; see the module docstring.

    Args:
        config: the run.
        resume: path of a full checkpoint to continue from (it must be a run of ``config``).
        checkpoint: the already loaded checkpoint at ``resume`` (to avoid loading twice).

    Raises:
        ConfigError, DataError, CheckpointError: bad input, found before anything is written.
        TrainingFailed: the loss or the weights became non-finite; the last checkpoint is kept.
    """
    validate_config(config)
    info = setup_distributed(config.device)
    try:
        return _train(config, info, resume, checkpoint)
    finally:
        if info.owns_process_group and dist.is_initialized():
            dist.destroy_process_group()


def _train(
    config: TrainConfig, info: DistInfo, resume: Optional[str | os.PathLike], checkpoint: Optional[dict]
) -> TrainResult:
    device = info.device
    out_dir = config.resolved_out()
    checkpoint_path = os.path.join(out_dir, CHECKPOINT_NAME)
    if config.batch_size % info.world_size != 0:
        raise ConfigError(
            f"--batch-size {config.batch_size} must be divisible by the number of processes ({info.world_size})"
        )
    local_batch = config.batch_size // info.world_size

    # 1. Validate everything that can be wrong before writing anything.
    data = build_datasets(config)
    if resume is not None:
        resume = os.fspath(resume)
        if checkpoint is None:
            checkpoint = load_checkpoint(resume)
        for note in check_resume_compatible(config, checkpoint, resume):
            _log(info, f"warning: {note}", error=True)
        if checkpoint.get("classes") and checkpoint["classes"] != data.classes:
            raise CheckpointError(
                f"checkpoint {resume!r} was trained on classes {checkpoint['classes'][:5]}..., "
                f"not those of {config.data!r}"
            )
        if os.path.exists(checkpoint_path) and not os.path.samefile(checkpoint_path, resume):
            raise CheckpointError(
                f"{checkpoint_path!r} already exists and is not the checkpoint being resumed; choose another --out"
            )
    elif os.path.exists(checkpoint_path):
        raise CheckpointError(
            f"{checkpoint_path!r} already exists; pass --resume to continue that run or choose another --out"
        )
    if len(data.train) < config.batch_size:
        raise ConfigError(f"the training set has {len(data.train)} samples, fewer than one batch ({config.batch_size})")
    _check_backend_usable(config, device)

    # 2. Model, optimizer, scheduler, scaler (same initial weights on every process).
    seed_everything(config.seed)
    if config.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    model = build_training_model(config, data.num_classes)
    if config.sync_bn and info.distributed:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    model = model.to(device=device, memory_format=memory_format)
    optimizer = make_optimizer(model, config)
    scheduler = make_scheduler(optimizer, config)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.amp)
    scaler = torch.amp.GradScaler(device.type, enabled=config.amp == "fp16")
    history: list[dict[str, Any]] = []
    start_epoch = 0
    if checkpoint is not None:
        try:
            model.load_state_dict(checkpoint["model"])
            optimizer.load_state_dict(checkpoint["optimizer"])
            scheduler.load_state_dict(checkpoint["scheduler"])
            if checkpoint.get("scaler"):
                scaler.load_state_dict(checkpoint["scaler"])
        except (RuntimeError, ValueError, KeyError) as error:
            raise CheckpointError(f"checkpoint {resume!r} does not fit this run: {error}") from None
        history = [dict(row) for row in checkpoint.get("history", [])]
        start_epoch = int(checkpoint["epoch"])
        rng_states = checkpoint.get("rng") or []
        if len(rng_states) == info.world_size:
            restore_rng_state(rng_states[info.rank])
        else:
            _log(
                info,
                f"warning: the checkpoint holds RNG states of {len(rng_states)} processes, this run has "
                f"{info.world_size}; reseeding (the run will not continue exactly)",
                error=True,
            )
            seed_everything(config.seed + 1000 * start_epoch + info.rank)
        _log(info, f"resuming {config.model} from {resume} after epoch {start_epoch}")
    else:
        # Different streams per process (random router, dropout); the weights above are identical.
        seed_everything(config.seed + info.rank)
    if start_epoch >= config.epochs:
        _log(
            info, f"{config.model}: already trained for {start_epoch} epochs (--epochs {config.epochs}); nothing to do"
        )
        return TrainResult(model, history, max((r["val_top1"] for r in history), default=0.0), out_dir, 0)

    train_model: nn.Module = model
    if info.distributed:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if config.compile:
        train_model = torch.compile(train_model)

    train_sampler = DistributedSampler(
        data.train, num_replicas=info.world_size, rank=info.rank, shuffle=True, seed=config.seed
    )
    loader_generator = torch.Generator()
    pin = device.type == "cuda"
    train_loader = DataLoader(
        data.train,
        batch_size=local_batch,
        sampler=train_sampler,
        num_workers=config.workers,
        pin_memory=pin,
        drop_last=True,
        generator=loader_generator,
        persistent_workers=False,
    )
    val_loader = DataLoader(
        data.val,
        batch_size=local_batch,
        sampler=ShardSampler(len(data.val), info.rank, info.world_size),
        num_workers=config.workers,
        pin_memory=pin,
    )
    criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    if info.is_main:
        os.makedirs(out_dir, exist_ok=True)
        parameters = sum(p.numel() for p in model.parameters())
        _log(
            info,
            f"{config.model}: {parameters / 1e6:.2f} M parameters, {data.num_classes} classes, "
            f"{len(data.train)} train / {len(data.val)} val samples, batch {config.batch_size} "
            f"({info.world_size} process{'es' if info.world_size > 1 else ''}, {device}), "
            f"amp {config.amp}, backend {config.backend}",
        )
    best_top1 = max((row["val_top1"] for row in history), default=-1.0)

    for epoch in range(start_epoch, config.epochs):
        started = time.perf_counter()
        train_model.train()
        train_sampler.set_epoch(epoch)
        loader_generator.manual_seed(epoch_seed(config.seed, epoch, info.rank))
        lr = optimizer.param_groups[0]["lr"]
        steps = len(train_loader)
        progress = Progress(
            steps,
            f"epoch {epoch + 1}/{config.epochs}",
            enabled=info.is_main and config.progress,
            log_every=config.log_every,
            use_bar=True,
        )
        totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, top-1 hits, samples
        seen = 0
        for step, (images, targets) in enumerate(train_loader, start=1):
            images = images.to(device, non_blocking=True).contiguous(memory_format=memory_format)
            targets = targets.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                logits = train_model(images)
                loss = criterion(logits, targets)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            with torch.no_grad():
                hits = logits.argmax(dim=1).eq(targets).sum()
                totals += torch.stack(
                    [
                        loss.detach().double() * len(targets),
                        hits.double(),
                        torch.tensor(float(len(targets)), dtype=torch.float64, device=device),
                    ]
                )
            seen += len(targets)
            if progress.wants_update(step):
                loss_sum, hit_sum, count = totals.tolist()
                rate = seen * info.world_size / max(time.perf_counter() - started, 1e-9)
                progress.update(
                    step,
                    {
                        "loss": f"{loss_sum / count:.4f}",
                        "top1": f"{100 * hit_sum / count:.1f}%",
                        "img/s": f"{rate:.0f}",
                    },
                )
        progress.close()
        train_seconds = time.perf_counter() - started
        loss_sum, hit_sum, count = _all_reduce_sum(totals.tolist(), info)
        scheduler.step()
        if info.distributed:
            # DDP syncs buffers (BatchNorm statistics) from rank 0 at the start of each forward;
            # do it now so evaluation and the checkpoint see the same buffers on every process.
            _broadcast_buffers(model)

        evaluation = evaluate(
            model, val_loader, device=device, info=info, amp_dtype=amp_dtype, channels_last=config.channels_last
        )
        row = {
            "epoch": epoch + 1,
            "lr": lr,
            "train_loss": loss_sum / count,
            "train_top1": 100.0 * hit_sum / count,
            "val_loss": evaluation["loss"],
            "val_top1": evaluation["top1"],
            "val_top5": evaluation["top5"],
            "train_images_per_s": count / max(train_seconds, 1e-9),
            "epoch_seconds": time.perf_counter() - started,
        }
        _check_finite(model, row, config, checkpoint_path, epoch + 1)
        if info.distributed:
            digests = _all_gather_object(state_digest(model), info)
            if len(set(digests)) != 1:
                raise TrainingFailed(f"the replicas diverged in epoch {epoch + 1} (state digests {digests})")
        history.append(row)

        rng_states = _all_gather_object(capture_rng_state(), info)
        if info.is_main:
            payload = _checkpoint_payload(config, model, data.num_classes, data.classes, epoch + 1, history, "full")
            payload.update(
                optimizer=optimizer.state_dict(),
                scheduler=scheduler.state_dict(),
                scaler=scaler.state_dict() if scaler.is_enabled() else {},
                rng=rng_states,
                world_size=info.world_size,
            )
            atomic_save(payload, checkpoint_path)
            if row["val_top1"] > best_top1:
                best_top1 = row["val_top1"]
                atomic_save(
                    _checkpoint_payload(config, model, data.num_classes, data.classes, epoch + 1, history, "weights"),
                    os.path.join(out_dir, BEST_NAME),
                )
            summary = {
                "model": config.model,
                "config": asdict(config),
                "classes": data.classes,
                "world_size": info.world_size,
                "epochs_completed": epoch + 1,
                "best_val_top1": best_top1,
            }
            write_metrics(out_dir, history, summary)
            _log(
                info,
                f"epoch {epoch + 1}/{config.epochs}  lr {lr:.4g}  train loss {row['train_loss']:.4f} "
                f"top1 {row['train_top1']:.2f}%  val loss {row['val_loss']:.4f} top1 {row['val_top1']:.2f}% "
                f"top5 {row['val_top5']:.2f}%  {row['epoch_seconds']:.1f}s",
            )
        if info.distributed:
            dist.barrier()
    _log(info, f"done: best val top-1 {best_top1:.2f}% ({out_dir})")
    return TrainResult(model, history, best_top1, out_dir, config.epochs - start_epoch)


def _broadcast_buffers(model: nn.Module) -> None:
    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)


def _check_finite(model: nn.Module, row: dict[str, Any], config: TrainConfig, checkpoint_path: str, epoch: int) -> None:
    # With fp16 the scaler skips steps with inf/nan gradients, so a non-finite loss alone is not fatal there.
    loss_bad = not math.isfinite(row["train_loss"]) and config.amp != "fp16"
    weights_bad = any(not torch.isfinite(p).all() for p in model.parameters())
    if loss_bad or weights_bad:
        kept = f"; the last good checkpoint is kept at {checkpoint_path}" if os.path.exists(checkpoint_path) else ""
        raise TrainingFailed(
            f"training diverged in epoch {epoch} (train loss {row['train_loss']}){kept}. Try a lower --lr."
        )


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def _int_at_least(minimum: int):
    """An argparse type: an integer >= ``minimum``, with a clear message otherwise."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(
        prog="python -m mod_models.train",
        description="Train a MoD CNN or its torchvision baseline (paper recipe defaults; torchrun for several "
        "processes).",
        # Options not given are filled from the defaults or, on --resume, from the checkpoint.
        argument_default=argparse.SUPPRESS,
    )
    what = parser.add_argument_group("model and data")
    what.add_argument("--model", help=f"zoo name: {', '.join(model_names())} (default {defaults.model})")
    what.add_argument(
        "--data",
        help="'synthetic' (built-in shapes set) or an ImageNet-style folder with train/ and val/ (default synthetic)",
    )
    what.add_argument(
        "--image-size", type=_positive_int, help="training resolution (default 224 for folders, 64 synthetic)"
    )
    what.add_argument(
        "--num-classes",
        type=_positive_int,
        help=f"classes of the synthetic set, 2..{MAX_SYNTHETIC_CLASSES} (default {defaults.num_classes})",
    )
    what.add_argument(
        "--train-samples", type=_positive_int, help=f"synthetic train set size (default {defaults.train_samples})"
    )
    what.add_argument(
        "--val-samples", type=_positive_int, help=f"synthetic val set size (default {defaults.val_samples})"
    )
    what.add_argument(
        "--capacity",
        type=_positive_int,
        help="MoD capacity c (k = C // c); default: the model's (64 ResNet, 16 MobileNetV2)",
    )
    what.add_argument("--fusion", choices=FUSIONS, help="MoD fusion target (default first_k)")
    what.add_argument("--router", choices=ROUTERS, help="MoD router: learned, or random k channels (default learned)")
    recipe = parser.add_argument_group("recipe (the paper's ImageNet defaults)")
    recipe.add_argument("--epochs", type=_positive_int, help=f"total epochs (default {defaults.epochs})")
    recipe.add_argument(
        "--batch-size", type=_positive_int, help=f"global batch, split over processes (default {defaults.batch_size})"
    )
    recipe.add_argument("--lr", type=_float, help=f"initial learning rate (default {defaults.lr})")
    recipe.add_argument("--momentum", type=_float, help=f"SGD momentum (default {defaults.momentum})")
    recipe.add_argument("--weight-decay", type=_float, help=f"weight decay (default {defaults.weight_decay})")
    recipe.add_argument(
        "--lr-step", type=_positive_int, help=f"epochs between learning-rate steps (default {defaults.lr_step})"
    )
    recipe.add_argument("--lr-gamma", type=_float, help=f"learning-rate factor per step (default {defaults.lr_gamma})")
    recipe.add_argument("--label-smoothing", type=_float, help="cross-entropy label smoothing (default 0)")
    run = parser.add_argument_group("execution")
    run.add_argument("--out", help="output folder (default runs/<model>)")
    run.add_argument(
        "--resume",
        nargs="?",
        const="",
        metavar="CHECKPOINT",
        help=f"continue a run: from CHECKPOINT, or from <out>/{CHECKPOINT_NAME} when no path is given",
    )
    run.add_argument("--amp", choices=AMP_MODES, help="autocast dtype (default none)")
    run.add_argument("--channels-last", action="store_true", help="NHWC memory format for model and inputs")
    run.add_argument(
        "--backend",
        choices=BACKENDS,
        help="MoD backend: reference (PyTorch), triton (fused kernels), auto (triton on CUDA)",
    )
    run.add_argument("--compile", action="store_true", help="torch.compile the model")
    run.add_argument("--seed", type=_non_negative_int, help="seed of weights, data set and data order (default 0)")
    run.add_argument("--deterministic", action="store_true", help="deterministic algorithms (bitwise resume on GPUs)")
    run.add_argument("--device", choices=DEVICES, help="auto: CUDA when available")
    run.add_argument(
        "--workers",
        type=_non_negative_int,
        help=f"data loader processes per training process (default {defaults.workers})",
    )
    run.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across processes")
    run.add_argument(
        "--log-every",
        type=_positive_int,
        help=f"steps between progress lines when not on a terminal (default {defaults.log_every})",
    )
    run.add_argument("--no-progress", dest="progress", action="store_false", help="no per-step progress output")
    return parser


def config_from_args(argv: Optional[list[str]] = None) -> tuple[TrainConfig, Optional[str], Optional[dict]]:
    """Parse the command line into ``(config, resume_path, checkpoint)``.

    On ``--resume`` the checkpoint's config fills every option not given on the command line.
    """
    given = vars(build_parser().parse_args(argv))
    resume = given.pop("resume", None)
    if resume is None:
        return TrainConfig(**given), None, None
    out = given.get("out")
    if resume == "":
        if out is None:
            raise ConfigError("--resume without a path needs --out (the run folder holding checkpoint.pt)")
        resume = os.path.join(out, CHECKPOINT_NAME)
    checkpoint = load_checkpoint(resume)
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    saved = {key: value for key, value in checkpoint.get("config", {}).items() if key in known}
    if "model" not in given:
        saved.setdefault("model", checkpoint["model_name"])
    merged = {**saved, **given}
    if out is None:
        merged["out"] = os.path.dirname(os.path.abspath(resume))
    return TrainConfig(**merged), resume, checkpoint


def main(argv: Optional[list[str]] = None) -> int:
    """CLI entry: returns the exit status (0 ok, 2 bad input, 3 training failed, 130 interrupted)."""
    try:
        config, resume, checkpoint = config_from_args(argv)
        validate_config(config)
        train(config, resume=resume, checkpoint=checkpoint)
    except (ConfigError, DataError, CheckpointError) as error:
        if _env_int("RANK", 0) == 0:
            print(f"error: {error}", file=sys.stderr, flush=True)
        return EXIT_INPUT_ERROR
    except TrainingFailed as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return EXIT_TRAINING_FAILED
    except KeyboardInterrupt:
        print("interrupted; the last completed epoch's checkpoint is kept", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
