"""What a training run is: :class:`TrainConfig`, its validation, and the command line that fills it.

Used by :mod:`mod_models.train` (``python -m mod_models.train``); everything here is importable
from there too.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch

from ..backend import BACKENDS
from ..functional import FUSIONS, ROUTERS
from ..zoo import MOD_BUILDERS, build_model, model_names
from .checkpoint import CheckpointError, check_training_checkpoint, load_checkpoint
from .cli_args import (
    MAX_IMAGE_SIZE,
    MAX_SEED,
    MIN_IMAGE_SIZE,
    CliParser,
    finite_float,
    image_size_int,
    non_negative_int,
    positive_float,
    positive_int,
    seed_int,
)
from .data import MAX_SYNTHETIC_CLASSES

AMP_MODES = ("none", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")
SYNTHETIC = "synthetic"
CHECKPOINT_NAME = "checkpoint.pt"
MAX_DEFAULT_WORKERS = 4

# Fields that define the run: a resumed run must agree on them.
IDENTITY_FIELDS = ("model", "capacity", "fusion", "router", "data", "image_size", "num_classes", "seed")
SYNTHETIC_IDENTITY_FIELDS = ("train_samples", "val_samples")
# Fields held by the optimizer / scheduler state: changing them on resume would be silently ignored.
OPTIMIZER_FIELDS = ("lr", "momentum", "weight_decay", "lr_step", "lr_gamma")
# Fields that change the numbers of a resumed run (allowed, with a warning).
RECIPE_FIELDS = ("batch_size", "label_smoothing", "amp")

__all__ = [
    "AMP_MODES",
    "DEVICES",
    "SYNTHETIC",
    "ConfigError",
    "TrainConfig",
    "available_cpus",
    "build_parser",
    "config_from_args",
    "validate_config",
]


class ConfigError(ValueError):
    """Bad command-line or :class:`TrainConfig` input."""


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, which containers and ``taskset`` narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


@dataclass
class TrainConfig:
    """Everything that defines a training run (the CLI flags, one for one).

    ``batch_size`` is the global batch, split evenly over the processes of a distributed run.
    ``image_size`` None means 224 for a data folder and 64 for the synthetic set.
    ``capacity``/``fusion``/``router`` None keep the MoD builder's defaults (and must stay
    None for torchvision baselines). ``workers`` None means what the machine has:
    ``min(4, CPUs // processes)`` data-loading processes per training process (0 loads in the
    training process). Progress lines (when the output is not a terminal) come at the first
    step, every ``log_seconds`` seconds, every ``log_every`` steps if set, and at the last step.
    ``init``: a file of weights a new run starts from (:mod:`mod_models.train.finetune`); a resumed
    run ignores it (its weights are in the checkpoint).
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
    workers: Optional[int] = None
    image_size: Optional[int] = None
    num_classes: int = 10
    train_samples: int = 10_000
    val_samples: int = 2_000
    capacity: Optional[int] = None
    fusion: Optional[str] = None
    router: Optional[str] = None
    sync_bn: bool = False
    skip_bad_images: bool = False
    log_every: Optional[int] = None
    log_seconds: float = 30.0
    progress: bool = True
    init: Optional[str] = None

    def resolved_image_size(self) -> int:
        if self.image_size is not None:
            return self.image_size
        return 64 if self.data == SYNTHETIC else 224

    def resolved_out(self) -> str:
        return self.out if self.out is not None else os.path.join("runs", self.model)

    def resolved_workers(self, world_size: int = 1) -> int:
        """Data-loading processes per training process (``workers``, or the machine's share of CPUs)."""
        if self.workers is not None:
            return self.workers
        return min(MAX_DEFAULT_WORKERS, available_cpus() // max(world_size, 1))

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


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def validate_config(config: TrainConfig) -> TrainConfig:
    """Raise :class:`ConfigError` with a clear message for any bad field; returns ``config``."""
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    if not isinstance(config.model, str) or config.model not in model_names():
        raise ConfigError(f"unknown model {config.model!r}; expected one of: {', '.join(model_names())}")
    mod_only = [name for name in ("capacity", "fusion", "router") if getattr(config, name) is not None]
    if config.model not in MOD_BUILDERS and mod_only:
        raise ConfigError(
            f"{config.model} is a torchvision baseline; "
            f"{', '.join('--' + n.replace('_', '-') for n in mod_only)} apply to MoD models only"
        )
    positive_ints = ("epochs", "batch_size", "lr_step", "num_classes", "train_samples", "val_samples")
    for name in positive_ints:
        value = getattr(config, name)
        if not _is_int(value) or value < 1:
            raise ConfigError(f"{name} must be an int >= 1, got {value!r}")
    if not _is_int(config.seed) or not 0 <= config.seed <= MAX_SEED:
        raise ConfigError(f"seed must be an int in [0, 2**63 - 1], got {config.seed!r}")
    if config.workers is not None and (not _is_int(config.workers) or config.workers < 0):
        raise ConfigError(f"workers must be None (what the machine has) or an int >= 0, got {config.workers!r}")
    if config.log_every is not None and (not _is_int(config.log_every) or config.log_every < 1):
        raise ConfigError(f"log_every must be None or an int >= 1, got {config.log_every!r}")
    if not _is_number(config.log_seconds) or not 0 < config.log_seconds < math.inf:
        raise ConfigError(f"log_seconds must be a number > 0, got {config.log_seconds!r}")
    if config.image_size is not None and (
        not _is_int(config.image_size) or not MIN_IMAGE_SIZE <= config.image_size <= MAX_IMAGE_SIZE
    ):
        raise ConfigError(
            f"image_size must be an int in [{MIN_IMAGE_SIZE}, {MAX_IMAGE_SIZE}], got {config.image_size!r}"
        )
    if config.capacity is not None and (not _is_int(config.capacity) or config.capacity < 1):
        raise ConfigError(f"capacity must be an int >= 1, got {config.capacity!r}")
    for name in ("lr", "lr_gamma"):
        value = getattr(config, name)
        if not _is_number(value) or not 0.0 < value < math.inf:
            raise ConfigError(f"{name} must be a number > 0, got {value!r}")
    for name in ("momentum", "weight_decay"):
        value = getattr(config, name)
        if not _is_number(value) or not 0.0 <= value < math.inf:
            raise ConfigError(f"{name} must be a number >= 0, got {value!r}")
    if not _is_number(config.label_smoothing) or not 0.0 <= config.label_smoothing < 1.0:
        raise ConfigError(f"label_smoothing must be in [0, 1), got {config.label_smoothing!r}")
    choices = {"amp": AMP_MODES, "backend": BACKENDS, "device": DEVICES}
    for name, allowed in choices.items():
        if getattr(config, name) not in allowed:
            raise ConfigError(f"{name} must be one of {allowed}, got {getattr(config, name)!r}")
    if config.fusion is not None and config.fusion not in FUSIONS:
        raise ConfigError(f"fusion must be one of {FUSIONS}, got {config.fusion!r}")
    if config.router is not None and config.router not in ROUTERS:
        raise ConfigError(f"router must be one of {ROUTERS}, got {config.router!r}")
    if not isinstance(config.skip_bad_images, bool):
        raise ConfigError(f"skip_bad_images must be True or False, got {config.skip_bad_images!r}")
    if not isinstance(config.data, str) or not config.data:
        raise ConfigError(f"data must be 'synthetic' or a folder path, got {config.data!r}")
    if config.data == SYNTHETIC and not 2 <= config.num_classes <= MAX_SYNTHETIC_CLASSES:
        raise ConfigError(
            f"num_classes must be in [2, {MAX_SYNTHETIC_CLASSES}] for the synthetic set, got {config.num_classes}"
        )
    if config.init is not None and (not isinstance(config.init, str) or not config.init):
        raise ConfigError(f"init must be None or the path of a weights file, got {config.init!r}")
    if config.out is not None and (not isinstance(config.out, str) or not config.out):
        raise ConfigError(f"out must be a folder path, got {config.out!r}")
    if config.capacity is not None:
        _check_model_builds(config)
    return config


def _check_model_builds(config: TrainConfig) -> None:
    """Build the model on the meta device (no memory, no RNG): catches e.g. a capacity that leaves k = 0."""
    try:
        with torch.device("meta"):
            build_model(config.model, **config.model_kwargs(max(config.num_classes, 2)))
    except (ValueError, TypeError) as error:
        raise ConfigError(f"--capacity {config.capacity} does not fit {config.model}: {error}") from None


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def build_parser() -> CliParser:
    defaults = TrainConfig()
    parser = CliParser(
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
        "--skip-bad-images",
        action="store_true",
        help="image folders: leave out (with a warning that counts them) the images found unusable before training "
        "(empty, truncated or damaged PNG, decompression bomb, dangling link); by default they are an error",
    )
    what.add_argument(
        "--image-size",
        type=image_size_int,
        help=f"training resolution, {MIN_IMAGE_SIZE}..{MAX_IMAGE_SIZE} (default 224 for folders, 64 synthetic)",
    )
    what.add_argument(
        "--num-classes",
        type=positive_int,
        help=f"classes of the synthetic set, 2..{MAX_SYNTHETIC_CLASSES} (default {defaults.num_classes})",
    )
    what.add_argument(
        "--train-samples", type=positive_int, help=f"synthetic train set size (default {defaults.train_samples})"
    )
    what.add_argument(
        "--val-samples", type=positive_int, help=f"synthetic val set size (default {defaults.val_samples})"
    )
    what.add_argument(
        "--capacity",
        type=positive_int,
        help="MoD capacity c (k = C // c); default: the model's (64 ResNet, 16 MobileNetV2)",
    )
    what.add_argument("--fusion", choices=FUSIONS, help="MoD fusion target (default first_k)")
    what.add_argument("--router", choices=ROUTERS, help="MoD router: learned, or random k channels (default learned)")
    recipe = parser.add_argument_group("recipe (the paper's ImageNet defaults)")
    recipe.add_argument("--epochs", type=positive_int, help=f"total epochs (default {defaults.epochs})")
    recipe.add_argument(
        "--batch-size", type=positive_int, help=f"global batch, split over processes (default {defaults.batch_size})"
    )
    recipe.add_argument("--lr", type=finite_float, help=f"initial learning rate (default {defaults.lr})")
    recipe.add_argument("--momentum", type=finite_float, help=f"SGD momentum (default {defaults.momentum})")
    recipe.add_argument("--weight-decay", type=finite_float, help=f"weight decay (default {defaults.weight_decay})")
    recipe.add_argument(
        "--lr-step", type=positive_int, help=f"epochs between learning-rate steps (default {defaults.lr_step})"
    )
    recipe.add_argument(
        "--lr-gamma", type=finite_float, help=f"learning-rate factor per step (default {defaults.lr_gamma})"
    )
    recipe.add_argument("--label-smoothing", type=finite_float, help="cross-entropy label smoothing (default 0)")
    run = parser.add_argument_group("execution")
    run.add_argument("--out", help="output folder, new or empty unless resuming (default runs/<model>)")
    start = run.add_mutually_exclusive_group()
    start.add_argument(
        "--resume",
        nargs="?",
        const="",
        metavar="CHECKPOINT",
        help=f"continue an interrupted run exactly where it stopped (weights, optimizer, schedule, epoch, random "
        f"state, the same --out): from CHECKPOINT, or from <out>/{CHECKPOINT_NAME} when no path is given. "
        "To start a new run from trained weights, use --init",
    )
    start.add_argument(
        "--init",
        metavar="WEIGHTS",
        help="start a NEW run (fresh optimizer, schedule and epochs, a new or empty --out) from trained weights "
        f"(fine-tuning): a {CHECKPOINT_NAME} or best.pt of this tool or a MoD state dict of the same architecture "
        "(everything loads), or a torchvision/timm ResNet or MobileNetV2 state dict (stem, standard blocks and "
        "head load; MoD blocks start fresh). The head is re-initialised when the class count differs; what "
        "loaded is printed and kept in metrics.json. Not with --resume",
    )
    run.add_argument("--amp", choices=AMP_MODES, help="autocast dtype (default none)")
    run.add_argument("--channels-last", action="store_true", help="NHWC memory format for model and inputs")
    run.add_argument(
        "--backend",
        choices=BACKENDS,
        help="MoD backend: reference (PyTorch), triton (fused kernels), auto (triton on CUDA)",
    )
    run.add_argument("--compile", action="store_true", help="torch.compile the model")
    run.add_argument(
        "--seed", type=seed_int, help="seed of weights, data set and data order, 0..2**63-1 (default 0)"
    )
    run.add_argument("--deterministic", action="store_true", help="deterministic algorithms (bitwise resume on GPUs)")
    run.add_argument("--device", choices=DEVICES, help="auto: CUDA when available")
    run.add_argument(
        "--workers",
        type=non_negative_int,
        help=f"data loader processes per training process (default: min({MAX_DEFAULT_WORKERS}, CPUs // processes); "
        "0 loads in the training process)",
    )
    run.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across processes")
    run.add_argument(
        "--log-seconds",
        type=positive_float,
        help=f"seconds between progress lines when not on a terminal (default {defaults.log_seconds:g}; "
        "the first and last step of an epoch are always shown)",
    )
    run.add_argument(
        "--log-every", type=positive_int, help="also print a progress line every this many steps (default: off)"
    )
    run.add_argument("--no-progress", dest="progress", action="store_false", help="no per-step progress output")
    return parser


def config_from_args(argv: Optional[list[str]] = None) -> tuple[TrainConfig, Optional[str], Optional[dict]]:
    """Parse the command line into ``(config, resume_path, checkpoint)``.

    On ``--resume`` the checkpoint's config fills every option not given on the command line.

    Raises:
        ConfigError: bad options; CheckpointError: a missing, damaged or weights-only checkpoint.
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
    check_training_checkpoint(checkpoint, resume)
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    saved = {key: value for key, value in checkpoint["config"].items() if key in known}
    if "model" not in given:
        saved.setdefault("model", checkpoint["model_name"])
    try:
        validate_config(TrainConfig(**saved))
    except ConfigError as error:
        raise CheckpointError(f"checkpoint {resume!r} holds an invalid setting: {error}") from None
    merged = {**saved, **given}
    if out is None:
        merged["out"] = os.path.dirname(os.path.abspath(resume))
    return TrainConfig(**merged), resume, checkpoint

