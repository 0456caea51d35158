"""The training loop of :mod:`mod_models.train`: check everything, build the run, then one epoch
after another (train, evaluate, save atomically).

:func:`train` runs in stages, each a function here: :func:`_check_before_writing` (data, resume
checkpoint, run folder, backend: every input error before anything is written),
:func:`_build_run` (model, optimizer, scheduler, scaler, and the state restored from a
checkpoint), :func:`_make_loaders`, then per epoch :func:`train_one_epoch`, :func:`evaluate`
and :func:`_save_epoch`. :func:`main` is the command line.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from ..zoo import MOD_BUILDERS, build_model
from .checkpoint import CheckpointError, check_training_checkpoint, load_checkpoint
from .cli_args import EXIT_INPUT_ERROR, check_backend_usable, print_error
from .config import (
    CHECKPOINT_NAME,
    IDENTITY_FIELDS,
    OPTIMIZER_FIELDS,
    RECIPE_FIELDS,
    SYNTHETIC,
    SYNTHETIC_IDENTITY_FIELDS,
    ConfigError,
    TrainConfig,
    config_from_args,
    validate_config,
)
from .data import DataError, SyntheticShapes, image_folder_splits
from .distributed import (
    DistInfo,
    all_gather_object,
    all_reduce_sum,
    broadcast_buffers,
    env_int,
    setup_distributed,
    state_digest,
)
from .finetune import InitPlan, apply_init, plan_init, read_init_source, summary_lines
from .progress import Progress
from .run_folder import BestWeights, OutputError, RunFolder, RunLock, best_from_checkpoint, check_run_folder
from .seeding import capture_rng_state, epoch_seed, restore_rng_state, seed_everything

EXIT_TRAINING_FAILED = 3
EXIT_INTERRUPTED = 130
TOP5 = 5


class TrainingFailed(RuntimeError):
    """Training cannot go on (e.g. the loss became NaN); the last good checkpoint is kept."""


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
    warnings: list[str] = field(default_factory=list)


def build_datasets(config: TrainConfig) -> DataBundle:
    """The train and val sets of ``config`` (synthetic, or an ImageNet-style folder)."""
    image_size = config.resolved_image_size()
    if config.data == SYNTHETIC:
        common = dict(image_size=image_size, num_classes=config.num_classes, seed=config.seed)
        train = SyntheticShapes(config.train_samples, split="train", **common)
        val = SyntheticShapes(config.val_samples, split="val", **common)
        return DataBundle(train, val, config.num_classes, list(train.classes))
    train, val = image_folder_splits(config.data, image_size=image_size, skip_bad_images=config.skip_bad_images)
    notes = [
        f"left out {len(split.skipped)} of the {len(split.skipped) + len(split)} images in {split.root!r} "
        f"(--skip-bad-images); first: {split.skipped[0][0]!r}: {split.skipped[0][1]}"
        for split in (train, val)
        if split.skipped
    ]
    return DataBundle(train, val, len(train.classes), list(train.classes), notes)


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
    loss_sum, top1, top5, count = all_reduce_sum(totals.tolist(), info)
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
    failure = all_gather_object(failure, info)[0]
    if failure is not None:
        kinds = {cls.__name__: cls for cls in (ConfigError, CheckpointError, DataError)}
        raise kinds[failure[0]](failure[1])


def train(
    config: TrainConfig,
    *,
    resume: Optional[str | os.PathLike] = None,
    checkpoint: Optional[dict] = None,
) -> TrainResult:
    """Run (or continue) a training run; see :mod:`mod_models.train`.

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


@dataclass
class _Run:
    """Everything one training run carries from epoch to epoch."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    folder: RunFolder
    amp_dtype: Optional[torch.dtype]
    memory_format: torch.memory_format
    history: list[dict[str, Any]] = field(default_factory=list)
    start_epoch: int = 0
    best: Optional[BestWeights] = None


def _train(
    config: TrainConfig, info: DistInfo, resume: Optional[str | os.PathLike], checkpoint: Optional[dict]
) -> TrainResult:
    out_dir = config.resolved_out()
    data, checkpoint, init = _check_before_writing(config, info, resume, checkpoint)
    resume = None if resume is None else os.fspath(resume)
    # The first write: the main process locks the run folder (a second run on it is refused).
    lock = RunLock(out_dir)
    _checked_on_main(info, lambda: lock.locked(resume))
    try:
        return _run_epochs(config, info, data, checkpoint, init, resume, out_dir)
    finally:
        lock.release()


def _run_epochs(
    config: TrainConfig,
    info: DistInfo,
    data: DataBundle,
    checkpoint: Optional[dict],
    init: Optional[InitPlan],
    resume: Optional[str],
    out_dir: str,
) -> TrainResult:
    """Build the run (from ``init``'s weights, or restored from ``checkpoint``), then train, evaluate
    and save epoch by epoch."""
    run = _build_run(config, info, data, out_dir, init)
    if checkpoint is not None:
        _restore_run(run, checkpoint, resume, config, info)
    else:
        # Different streams per process (random router, dropout); the weights above are identical.
        seed_everything(config.seed + info.rank)

    # From here on the run folder is written (by the main process only).
    if info.is_main:
        run.folder.prepare(lambda message: _log(info, message))
        if checkpoint is not None:
            run.folder.restore(run.history, run.best, lambda message: _log(info, message))
        elif run.folder.init is not None:
            for line in summary_lines(run.folder.init):
                _log(info, line)
    best_top1 = max((row["val_top1"] for row in run.history), default=-1.0)
    if run.start_epoch >= config.epochs:
        _log(
            info,
            f"{config.model}: already trained for {run.start_epoch} epochs (--epochs {config.epochs}); nothing to do",
        )
        return TrainResult(run.model, run.history, max(best_top1, 0.0), out_dir, 0)

    train_model: nn.Module = run.model
    if info.distributed:
        device = info.device
        train_model = nn.parallel.DistributedDataParallel(
            run.model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if config.compile:
        train_model = torch.compile(train_model)
    loaders = _make_loaders(config, info, data)
    if info.is_main:
        _log(info, _run_summary(config, info, data, run.model, loaders.workers))

    checkpoint_path = os.path.join(out_dir, CHECKPOINT_NAME)
    for epoch in range(run.start_epoch, config.epochs):
        started = time.perf_counter()
        lr = run.optimizer.param_groups[0]["lr"]
        loss_sum, hit_sum, count = train_one_epoch(train_model, run, loaders, config, info, epoch)
        train_seconds = time.perf_counter() - started
        run.scheduler.step()
        if info.distributed:
            # DDP syncs buffers (BatchNorm statistics) from rank 0 at the start of each forward;
            # do it now so evaluation and the checkpoint see the same buffers on every process.
            broadcast_buffers(run.model)

        evaluation = evaluate(
            run.model,
            loaders.val,
            device=info.device,
            info=info,
            num_classes=data.num_classes,
            amp_dtype=run.amp_dtype,
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
        _check_finite(run.model, row, config, checkpoint_path, epoch + 1)
        if info.distributed:
            digests = all_gather_object(state_digest(run.model), info)
            if len(set(digests)) != 1:
                raise TrainingFailed(f"the replicas diverged in epoch {epoch + 1} (state digests {digests})")
        run.history.append(row)
        best_top1 = max(best_top1, row["val_top1"])
        _save_epoch(run, row, config, info)
    _log(info, f"done: best val top-1 {best_top1:.2f}% ({out_dir})")
    return TrainResult(run.model, run.history, best_top1, out_dir, config.epochs - run.start_epoch)


def _check_before_writing(
    config: TrainConfig, info: DistInfo, resume: Optional[str | os.PathLike], checkpoint: Optional[dict]
) -> tuple[DataBundle, Optional[dict], Optional[InitPlan]]:
    """Everything that can be wrong with the input, found before anything is written: the batch
    split, the data, the checkpoint to resume (loaded here unless given) or the weights to start
    from (``--init``: read, and planned against the model built on the meta device), the run folder
    and the backend. Returns the data, the checkpoint and the init plan."""
    if config.batch_size % info.world_size != 0:
        raise ConfigError(
            f"--batch-size {config.batch_size} must be divisible by the number of processes ({info.world_size})"
        )
    data = build_datasets(config)
    for note in data.warnings:
        _log(info, f"warning: {note}", error=True)
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
    init = None
    if resume is None and config.init is not None:
        source = read_init_source(config.init)
        with torch.device("meta"):
            shapes_only = build_training_model(config, data.num_classes)
        init = plan_init(shapes_only, config.model, source)
    out_dir = config.resolved_out()
    _checked_on_main(info, lambda: check_run_folder(out_dir, resume=resume))
    if len(data.train) < config.batch_size:
        raise ConfigError(f"the training set has {len(data.train)} samples, fewer than one batch ({config.batch_size})")
    _check_backend_usable(config, info.device)
    return data, checkpoint, init


def _build_run(
    config: TrainConfig, info: DistInfo, data: DataBundle, out_dir: str, init: Optional[InitPlan] = None
) -> _Run:
    """Model (with ``init``'s weights loaded), optimizer, scheduler and scaler, with the same initial
    weights on every process."""
    device = info.device
    seed_everything(config.seed)
    if config.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    model = build_training_model(config, data.num_classes)
    if init is not None:
        apply_init(model, init)
    if config.sync_bn and info.distributed:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    model = model.to(device=device, memory_format=memory_format)
    optimizer = make_optimizer(model, config)
    folder = RunFolder(out_dir, config, data.num_classes, data.classes, info.world_size)
    folder.init = init.record() if init is not None else None
    return _Run(
        model=model,
        optimizer=optimizer,
        scheduler=make_scheduler(optimizer, config),
        scaler=torch.amp.GradScaler(device.type, enabled=config.amp == "fp16"),
        folder=folder,
        amp_dtype={"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.amp),
        memory_format=memory_format,
    )


def _restore_run(run: _Run, checkpoint: dict, resume: str, config: TrainConfig, info: DistInfo) -> None:
    """Load a checked resume checkpoint into ``run``: weights, optimizer, scheduler, scaler, history,
    epoch, this process's RNG state and (on the main process) the best epoch's record."""
    try:
        run.model.load_state_dict(checkpoint["model"])
        run.optimizer.load_state_dict(checkpoint["optimizer"])
        run.scheduler.load_state_dict(checkpoint["scheduler"])
        if checkpoint.get("scaler"):
            run.scaler.load_state_dict(checkpoint["scaler"])
    except (RuntimeError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"checkpoint {resume!r} does not fit this run: {error}") from None
    run.history = [dict(row) for row in checkpoint["history"]]
    run.start_epoch = checkpoint["epoch"]
    run.folder.init = checkpoint.get("init")
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
        seed_everything(config.seed + 1000 * run.start_epoch + info.rank)
    if info.is_main:
        run.best, warning = best_from_checkpoint(checkpoint, run.folder.best_path)
        if warning:
            _log(info, f"warning: {warning}", error=True)
    _log(info, f"resuming {config.model} from {resume} after epoch {run.start_epoch}")


@dataclass
class _Loaders:
    train: DataLoader
    val: DataLoader
    sampler: DistributedSampler
    generator: torch.Generator  # reseeded every epoch (epoch_seed): the data order is a function of seed and epoch
    workers: int


def _make_loaders(config: TrainConfig, info: DistInfo, data: DataBundle) -> _Loaders:
    """The sharded train loader (shuffled, whole batches) and val loader (every sample once)."""
    workers = config.resolved_workers(info.world_size)
    local_batch = config.batch_size // info.world_size
    sampler = DistributedSampler(data.train, num_replicas=info.world_size, rank=info.rank, shuffle=True,
                                 seed=config.seed)
    generator = torch.Generator()
    pin = info.device.type == "cuda"
    train_loader = DataLoader(
        data.train,
        batch_size=local_batch,
        sampler=sampler,
        num_workers=workers,
        pin_memory=pin,
        drop_last=True,
        generator=generator,
        persistent_workers=False,
    )
    val_loader = DataLoader(
        data.val,
        batch_size=local_batch,
        sampler=ShardSampler(len(data.val), info.rank, info.world_size),
        num_workers=workers,
        pin_memory=pin,
    )
    return _Loaders(train_loader, val_loader, sampler, generator, workers)


def _run_summary(config: TrainConfig, info: DistInfo, data: DataBundle, model: nn.Module, workers: int) -> str:
    parameters = sum(p.numel() for p in model.parameters())
    return (
        f"{config.model}: {parameters / 1e6:.2f} M parameters, {data.num_classes} classes, "
        f"{len(data.train)} train / {len(data.val)} val samples, batch {config.batch_size} "
        f"({info.world_size} process{'es' if info.world_size > 1 else ''}, {info.device}), "
        f"amp {config.amp}, backend {config.backend}, {workers} data worker{'s' if workers != 1 else ''}"
        f"{' per process' if info.distributed else ''}"
    )


def train_one_epoch(
    train_model: nn.Module, run: _Run, loaders: _Loaders, config: TrainConfig, info: DistInfo, epoch: int
) -> tuple[float, float, float]:
    """One pass over the (sharded) training set. Returns the loss sum, the top-1 hits and the sample
    count, summed over every process."""
    device = info.device
    started = time.perf_counter()
    train_model.train()
    loaders.sampler.set_epoch(epoch)
    loaders.generator.manual_seed(epoch_seed(config.seed, epoch, info.rank))
    steps = len(loaders.train)
    progress = Progress(
        steps,
        f"epoch {epoch + 1}/{config.epochs}",
        enabled=info.is_main and config.progress,
        log_seconds=config.log_seconds,
        log_every=config.log_every,
    )
    criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    amp_dtype = run.amp_dtype
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, top-1 hits, samples
    seen = 0
    for step, (images, targets) in enumerate(loaders.train, start=1):
        images = images.to(device, non_blocking=True).contiguous(memory_format=run.memory_format)
        targets = targets.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = train_model(images)
            loss = criterion(logits, targets)
        run.optimizer.zero_grad(set_to_none=True)
        run.scaler.scale(loss).backward()
        run.scaler.step(run.optimizer)
        run.scaler.update()
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
    loss_sum, hit_sum, count = all_reduce_sum(totals.tolist(), info)
    return loss_sum, hit_sum, count


def _save_epoch(run: _Run, row: dict[str, Any], config: TrainConfig, info: DistInfo) -> None:
    """The main process writes the epoch (checkpoint, best weights, metrics) atomically; every
    process learns whether it could, instead of waiting for it forever."""
    epoch = row["epoch"]
    rng_states = all_gather_object(capture_rng_state(), info)
    failure: Optional[str] = None
    if info.is_main:
        improved = run.best is None or row["val_top1"] > run.best.val_top1
        if improved:
            run.best = BestWeights.snapshot(epoch, row["val_top1"], _unwrap(run.model))
        training_state = {
            "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(),
            "scaler": run.scaler.state_dict() if run.scaler.is_enabled() else {},
            "rng": rng_states,
            "world_size": info.world_size,
        }
        try:
            run.folder.save_epoch(_unwrap(run.model).state_dict(), training_state, run.history, run.best, improved)
        except OutputError as error:
            failure = str(error)
        else:
            top5 = f" top5 {row['val_top5']:.2f}%" if row["val_top5"] is not None else ""
            _log(
                info,
                f"epoch {epoch}/{config.epochs}  lr {row['lr']:.4g}  train loss {row['train_loss']:.4f} "
                f"top1 {row['train_top1']:.2f}%  val loss {row['val_loss']:.4f} top1 {row['val_top1']:.2f}%"
                f"{top5}  {row['epoch_seconds']:.1f}s",
            )
    failure = all_gather_object(failure, info)[0]
    if failure is not None:
        raise OutputError(failure)


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
        if env_int("RANK", 0) == 0:
            print_error(error)
        return EXIT_INPUT_ERROR
    except TrainingFailed as error:
        print_error(error)
        return EXIT_TRAINING_FAILED
    except KeyboardInterrupt:
        if env_int("RANK", 0) == 0:
            print(_interrupted_message(config), file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    return 0
