"""Train a MoD CNN (or its torchvision baseline): ``python -m mod_models.train``.

The defaults are the paper's ImageNet recipe: SGD with momentum 0.9 and weight decay 1e-4,
learning rate 0.1 divided by 10 every 30 epochs, global batch 256, 100 epochs; random-resized
crop 224 and flip for ImageFolder data. Everything is overridable.

Examples::

    # the built-in synthetic shapes set, small and fast on a CPU
    python -m mod_models.train --model resnet18_mod --epochs 10 --batch-size 64 --lr 0.05 \\
        --image-size 32 --train-samples 4000 --val-samples 1000 --out runs/r18
    # continue it (options not given are taken from the checkpoint; --epochs may be raised)
    python -m mod_models.train --out runs/r18 --resume --epochs 15
    # ImageNet-style folder (DIR/train/<class>/..., DIR/val/<class>/...) on 8 GPUs
    torchrun --nproc-per-node 8 -m mod_models.train --model resnet50_mod --data /data/imagenet \\
        --amp bf16 --channels-last --out runs/r50

Outputs in ``--out`` (a new or empty folder unless resuming): ``checkpoint.pt`` (everything
needed to resume, including the best epoch's record and weights), ``best.pt`` (weights of the
best validation top-1), ``metrics.csv`` and ``metrics.json`` (one row per epoch; ``val_top5`` is
empty / null when the model has 5 classes or fewer, where it would be 100% by definition). They
are written atomically after every epoch (see :mod:`mod_models.run_folder`): a run killed at any
point resumes with its best weights intact. Bad input (unknown model, missing or empty data
folder, an ``--out`` that is a file, read-only or holds another run, a damaged checkpoint or one
of another model or run) ends with ``error: ...`` and exit status 2, before anything is written;
a disk that fills up mid-run also exits 2, keeping the last checkpoint. Exit status 3: training
diverged; 130: interrupted (Ctrl-C lets the checkpoint being written finish).

Resuming continues exactly: model, optimizer, scheduler, AMP scaler, epoch, the RNG states of
every process and the data order (a function of seed and epoch) are restored, so an
interrupted run ends bitwise where an uninterrupted one would (on GPUs: with
``--deterministic``).

The run's definition and command line live in :mod:`mod_models.train_args`, its files in
:mod:`mod_models.run_folder`; this module holds the loop.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from .checkpoint import CheckpointError, check_training_checkpoint, load_checkpoint
from .cli_args import EXIT_INPUT_ERROR, check_backend_usable, print_error
from .data import DataError, SyntheticShapes, image_folder_splits
from .run_folder import (
    BEST_NAME,
    METRIC_COLUMNS,
    METRICS_CSV,
    METRICS_JSON,
    BestWeights,
    OutputError,
    RunFolder,
    best_from_checkpoint,
    check_run_folder,
)
from .train_args import (
    AMP_MODES,
    CHECKPOINT_NAME,
    DEVICES,
    IDENTITY_FIELDS,
    OPTIMIZER_FIELDS,
    RECIPE_FIELDS,
    SYNTHETIC,
    SYNTHETIC_IDENTITY_FIELDS,
    ConfigError,
    TrainConfig,
    build_parser,
    config_from_args,
    validate_config,
)
from .zoo import MOD_BUILDERS, build_model

__all__ = [
    "AMP_MODES",
    "BEST_NAME",
    "CHECKPOINT_NAME",
    "DEVICES",
    "METRIC_COLUMNS",
    "METRICS_CSV",
    "METRICS_JSON",
    "ConfigError",
    "OutputError",
    "TrainConfig",
    "TrainResult",
    "TrainingFailed",
    "build_parser",
    "config_from_args",
    "evaluate",
    "main",
    "seed_everything",
    "train",
    "validate_config",
]

EXIT_TRAINING_FAILED = 3
EXIT_INTERRUPTED = 130
TOP5 = 5


class TrainingFailed(RuntimeError):
    """Training cannot go on (e.g. the loss became NaN); the last good checkpoint is kept."""


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
# Progress
# ---------------------------------------------------------------------------------------------


class Progress:
    """A tqdm bar on a terminal; plain ``step i/n`` lines otherwise.

    Plain lines come at the first step, then whenever ``log_seconds`` have passed since the last
    line, every ``log_every`` steps if that is set, and at the last step: a log file shows that
    the run is alive within seconds, and then about twice a minute.
    """

    def __init__(
        self,
        total: int,
        description: str,
        *,
        enabled: bool,
        log_seconds: float,
        log_every: Optional[int] = None,
        use_bar: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total = total
        self.description = description
        self.enabled = enabled
        self.log_seconds = log_seconds
        self.log_every = log_every
        self.clock = clock
        self.last_line = clock()
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
        if step == 1 or step == self.total:
            return True
        if self.bar is not None:
            return step % 10 == 0
        if self.log_every is not None and step % self.log_every == 0:
            return True
        return self.clock() - self.last_line >= self.log_seconds

    def update(self, step: int, metrics: dict[str, str]) -> None:
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix(metrics, refresh=True)
        elif self.enabled:
            text = "  ".join(f"{key} {value}" for key, value in metrics.items())
            print(f"{self.description}  step {step}/{self.total}  {text}", flush=True)
            self.last_line = self.clock()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------------------------------------
# Model, optimizer, resume checks
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
    try:
        check_backend_usable(config.backend, device)
    except ValueError as error:
        raise ConfigError(str(error)) from None


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)


def make_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig):
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=config.lr_step, gamma=config.lr_gamma)


def check_resume_compatible(config: TrainConfig, checkpoint: dict, path: str) -> list[str]:
    """Raise :class:`CheckpointError` if ``checkpoint`` is not an intact run of ``config``; returns warnings."""
    check_training_checkpoint(checkpoint, path)
    saved_model = checkpoint["model_name"]
    if saved_model != config.model:
        raise CheckpointError(
            f"checkpoint {path!r} was written for model {saved_model!r}, not {config.model!r}; "
            f"pass --model {saved_model} to resume it, or choose another --out for a new run"
        )
    saved = checkpoint["config"]
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


def top5_applies(num_classes: int) -> bool:
    """Top-5 accuracy means something only with more than 5 classes (otherwise it is 100% by definition)."""
    return num_classes > TOP5


def _accuracy_counts(logits: Tensor, targets: Tensor, top: int) -> tuple[Tensor, Tensor]:
    """Top-1 hits and top-``top`` hits of a batch."""
    predictions = logits.topk(min(top, logits.shape[1]), dim=1).indices
    hits = predictions.eq(targets[:, None])
    return hits[:, :1].sum(), hits.any(dim=1).sum()


def evaluate(
    model: nn.Module,
    loader: DataLoader,
    *,
    device: torch.device,
    info: DistInfo,
    num_classes: int,
    amp_dtype: Optional[torch.dtype] = None,
    channels_last: bool = False,
) -> dict[str, Optional[float]]:
    """Loss, top-1 and top-5 accuracy (percent) over the whole (sharded) set.

    ``top5`` is None when ``num_classes`` <= 5 (it would be 100% by definition).
    """
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
            top1, top5 = _accuracy_counts(logits, targets, TOP5)
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
    return {
        "loss": loss_sum / count,
        "top1": 100.0 * top1 / count,
        "top5": 100.0 * top5 / count if top5_applies(num_classes) else None,
    }


def _log(info: DistInfo, message: str, *, error: bool = False) -> None:
    if info.is_main:
        print(message, file=sys.stderr if error else sys.stdout, flush=True)


def _checked_on_main(info: DistInfo, check: Callable[[], None]) -> None:
    """Run ``check`` on the main process and raise its input error on every process.

    File-system checks run where the files are written; the other processes must stop too
    instead of waiting for the main one in the first collective.
    """
    failure: Optional[tuple[str, str]] = None
    if info.is_main:
        try:
            check()
        except (ConfigError, CheckpointError, DataError) as error:
            failure = (type(error).__name__, str(error))
    failure = _all_gather_object(failure, info)[0]
    if failure is not None:
        kinds = {cls.__name__: cls for cls in (ConfigError, CheckpointError, DataError)}
        raise kinds[failure[0]](failure[1])


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
        OutputError: the run folder could not be written (e.g. disk full); the last checkpoint is kept.
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
        check_rng_states(checkpoint.get("rng") or [], resume)
    _checked_on_main(info, lambda: check_run_folder(out_dir, resume=resume))
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
    folder = RunFolder(out_dir, config, data.num_classes, data.classes, info.world_size)
    best: Optional[BestWeights] = None
    if checkpoint is not None:
        try:
            model.load_state_dict(checkpoint["model"])
            optimizer.load_state_dict(checkpoint["optimizer"])
            scheduler.load_state_dict(checkpoint["scheduler"])
            if checkpoint.get("scaler"):
                scaler.load_state_dict(checkpoint["scaler"])
        except (RuntimeError, ValueError, KeyError, TypeError) as error:
            raise CheckpointError(f"checkpoint {resume!r} does not fit this run: {error}") from None
        history = [dict(row) for row in checkpoint["history"]]
        start_epoch = checkpoint["epoch"]
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
        if info.is_main:
            best, warning = best_from_checkpoint(checkpoint, folder.best_path)
            if warning:
                _log(info, f"warning: {warning}", error=True)
        _log(info, f"resuming {config.model} from {resume} after epoch {start_epoch}")
    else:
        # Different streams per process (random router, dropout); the weights above are identical.
        seed_everything(config.seed + info.rank)

    # 3. From here on the run folder is written (by the main process only).
    if info.is_main:
        folder.prepare(lambda message: _log(info, message))
        if checkpoint is not None:
            folder.restore(history, best, lambda message: _log(info, message))
    best_top1 = max((row["val_top1"] for row in history), default=-1.0)
    if start_epoch >= config.epochs:
        _log(
            info, f"{config.model}: already trained for {start_epoch} epochs (--epochs {config.epochs}); nothing to do"
        )
        return TrainResult(model, history, max(best_top1, 0.0), out_dir, 0)

    train_model: nn.Module = model
    if info.distributed:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if config.compile:
        train_model = torch.compile(train_model)

    workers = config.resolved_workers(info.world_size)
    train_sampler = DistributedSampler(
        data.train, num_replicas=info.world_size, rank=info.rank, shuffle=True, seed=config.seed
    )
    loader_generator = torch.Generator()
    pin = device.type == "cuda"
    train_loader = DataLoader(
        data.train,
        batch_size=local_batch,
        sampler=train_sampler,
        num_workers=workers,
        pin_memory=pin,
        drop_last=True,
        generator=loader_generator,
        persistent_workers=False,
    )
    val_loader = DataLoader(
        data.val,
        batch_size=local_batch,
        sampler=ShardSampler(len(data.val), info.rank, info.world_size),
        num_workers=workers,
        pin_memory=pin,
    )
    criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    if info.is_main:
        parameters = sum(p.numel() for p in model.parameters())
        _log(
            info,
            f"{config.model}: {parameters / 1e6:.2f} M parameters, {data.num_classes} classes, "
            f"{len(data.train)} train / {len(data.val)} val samples, batch {config.batch_size} "
            f"({info.world_size} process{'es' if info.world_size > 1 else ''}, {device}), "
            f"amp {config.amp}, backend {config.backend}, {workers} data worker{'s' if workers != 1 else ''}"
            f"{' per process' if info.distributed else ''}",
        )

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
            log_seconds=config.log_seconds,
            log_every=config.log_every,
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
            model,
            val_loader,
            device=device,
            info=info,
            num_classes=data.num_classes,
            amp_dtype=amp_dtype,
            channels_last=config.channels_last,
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
        best_top1 = max(best_top1, row["val_top1"])

        rng_states = _all_gather_object(capture_rng_state(), info)
        failure: Optional[str] = None
        if info.is_main:
            improved = best is None or row["val_top1"] > best.val_top1
            if improved:
                best = BestWeights.snapshot(epoch + 1, row["val_top1"], _unwrap(model))
            training_state = {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler.is_enabled() else {},
                "rng": rng_states,
                "world_size": info.world_size,
            }
            try:
                folder.save_epoch(_unwrap(model).state_dict(), training_state, history, best, improved)
            except OutputError as error:
                failure = str(error)
            else:
                top5 = f" top5 {row['val_top5']:.2f}%" if row["val_top5"] is not None else ""
                _log(
                    info,
                    f"epoch {epoch + 1}/{config.epochs}  lr {lr:.4g}  train loss {row['train_loss']:.4f} "
                    f"top1 {row['train_top1']:.2f}%  val loss {row['val_loss']:.4f} top1 {row['val_top1']:.2f}%"
                    f"{top5}  {row['epoch_seconds']:.1f}s",
                )
        # Every process learns whether the main one could save (instead of waiting for it forever).
        failure = _all_gather_object(failure, info)[0]
        if failure is not None:
            raise OutputError(failure)
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


def _interrupted_message(config: Optional[TrainConfig]) -> str:
    if config is None:
        return "interrupted"
    out = config.resolved_out()
    if not os.path.exists(os.path.join(out, CHECKPOINT_NAME)):
        return "interrupted before the first epoch was saved; nothing to resume"
    return (
        f"interrupted; {os.path.join(out, CHECKPOINT_NAME)} holds the last completed epoch "
        f"(continue with: python -m mod_models.train --out {out} --resume)"
    )


def main(argv: Optional[list[str]] = None) -> int:
    """CLI entry: returns the exit status (0 ok, 2 bad input or unwritable output, 3 training failed,
    130 interrupted)."""
    config: Optional[TrainConfig] = None
    try:
        config, resume, checkpoint = config_from_args(argv)
        validate_config(config)
        train(config, resume=resume, checkpoint=checkpoint)
    except (ConfigError, DataError, CheckpointError, OutputError) as error:
        if _env_int("RANK", 0) == 0:
            print_error(error)
        return EXIT_INPUT_ERROR
    except TrainingFailed as error:
        print_error(error)
        return EXIT_TRAINING_FAILED
    except KeyboardInterrupt:
        if _env_int("RANK", 0) == 0:
            print(_interrupted_message(config), file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
