"""The training application: train a MoD CNN (or its torchvision baseline) with
``python -m mod_models.train`` (also installed as ``mod-train``).

The defaults are the paper's ImageNet recipe: SGD with momentum 0.9 and weight decay 1e-4,
learning rate 0.1 divided by 10 every 30 epochs, global batch 256, 100 epochs; random-resized
crop 224 and flip for ImageFolder data. Everything is overridable.

Examples::

    # the built-in synthetic shapes set, small and fast on a CPU
    python -m mod_models.train --model resnet18_mod --epochs 10 --batch-size 64 --lr 0.05 \\
        --image-size 32 --train-samples 4000 --val-samples 1000 --out runs/r18
    # continue it (options not given are taken from the checkpoint; --epochs may be raised)
    python -m mod_models.train --out runs/r18 --resume --epochs 15
    # a new run from its weights on another class count (fine-tuning; the head is re-initialised)
    python -m mod_models.train --num-classes 5 --init runs/r18/best.pt --out runs/r18-ft
    # ImageNet-style folder (DIR/train/<class>/..., DIR/val/<class>/...) on 8 GPUs
    torchrun --nproc-per-node 8 -m mod_models.train --model resnet50_mod --data /data/imagenet \\
        --amp bf16 --channels-last --out runs/r50

Outputs in ``--out`` (a new or empty folder unless resuming): ``checkpoint.pt`` (everything
needed to resume, including the best epoch's record and weights), ``best.pt`` (weights of the
best validation top-1), ``metrics.csv`` and ``metrics.json`` (one row per epoch; ``val_top5`` is
empty / null when the model has 5 classes or fewer, where it would be 100% by definition). They
are written atomically after every epoch (see :mod:`mod_models.train.run_folder`): a run killed at any
point resumes with its best weights intact. Bad input (unknown model, missing or empty data
folder, an ``--out`` that is a file, read-only or holds another run, a damaged checkpoint or one
of another model or run) ends with ``error: ...`` and exit status 2, before anything is written;
a disk that fills up mid-run also exits 2, keeping the last checkpoint. Exit status 3: training
diverged; 130: interrupted (Ctrl-C lets the checkpoint being written finish).

Resuming continues exactly: model, optimizer, scheduler, AMP scaler, epoch, the RNG states of
every process and the data order (a function of seed and epoch) are restored, so an
interrupted run ends bitwise where an uninterrupted one would (on GPUs: with
``--deterministic``).

Where things are: :mod:`~mod_models.train.loop` (the loop and the command line, stage by stage),
:mod:`~mod_models.train.config` (the run's definition and its arguments),
:mod:`~mod_models.train.run_folder` (its files and its lock), :mod:`~mod_models.train.checkpoint`
(atomic, validated checkpoints, models rebuilt from them), :mod:`~mod_models.train.finetune`
(``--init``: the weights a new run starts from), :mod:`~mod_models.train.data` (the generated data set and
image folders), :mod:`~mod_models.train.distributed`, :mod:`~mod_models.train.seeding`,
:mod:`~mod_models.train.progress`, and :mod:`~mod_models.train.cli_args` (argument checks and exit
codes shared with the command-line tools of :mod:`mod_models.tools`).
"""


from .config import (
    AMP_MODES,
    CHECKPOINT_NAME,
    DEVICES,
    ConfigError,
    TrainConfig,
    build_parser,
    config_from_args,
    validate_config,
)
from .loop import TrainingFailed, TrainResult, evaluate, main, train
from .progress import Progress
from .run_folder import BEST_NAME, METRIC_COLUMNS, METRICS_CSV, METRICS_JSON, OutputError
from .seeding import seed_everything

__all__ = [
    "AMP_MODES", "BEST_NAME", "CHECKPOINT_NAME", "DEVICES", "METRIC_COLUMNS", "METRICS_CSV", "METRICS_JSON",
    "ConfigError", "OutputError", "Progress", "TrainConfig", "TrainResult", "TrainingFailed", "build_parser",
    "config_from_args", "evaluate", "main", "seed_everything", "train", "validate_config",
]
