"""Routing analysis: which channels each MoD block selects, overall and per class.

The paper's channel-usage study. For a model and a data set, every MoD block's selection
``idx: [B, k]`` (see :attr:`mod_models.blocks.MoDBlock.record_selection`) is counted per
channel and per true class. Outputs:

* ``channel_usage.csv``: one row per (block, class, channel): how many samples of that class
  selected the channel, out of how many, and the frequency (class ``all`` = every sample);
* ``routing_summary.csv``: one row per block: used / never-selected channels, effective
  number of channels, how concentrated and how class-specific the routing is;
* ``channel_usage.png``: a heatmap per block, channels across, ``all`` and each class down.

``python -m mod_models.tools.analysis --checkpoint runs/r18/best.pt --out runs/r18/routing``
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import math
import os
import sys
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from ..backend import BACKENDS
from ..blocks import MoDBlock
from ..train.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
from ..train.cli_args import (
    EXIT_INPUT_ERROR,
    CliParser,
    check_backend_usable,
    check_writable_folder,
    image_size_int,
    int_at_least,
    parse_device,
    positive_int,
    print_error,
    seed_int,
)
from ..train.data import DataError, SyntheticShapes, image_folder

USAGE_CSV = "channel_usage.csv"
SUMMARY_CSV = "routing_summary.csv"
HEATMAP_PNG = "channel_usage.png"


@dataclass
class ChannelUsage:
    """Selection counts of every MoD block of a model over a data set.

    Attributes:
        block_names: qualified module names of the MoD blocks, in forward order of ``named_modules``.
        channels: ``C`` of each block.
        k: channels selected per sample in each block.
        counts: per block, ``[num_classes, C]`` int64: samples of class ``y`` that selected channel ``c``.
        class_counts: ``[num_classes]`` int64 samples per class.
        classes: class names.
    """

    block_names: list[str]
    channels: list[int]
    k: list[int]
    counts: list[Tensor]
    class_counts: Tensor
    classes: list[str]

    @property
    def num_samples(self) -> int:
        return int(self.class_counts.sum())

    def frequency(self, block: int) -> Tensor:
        """``[C]`` fraction of all samples that selected each channel of ``block`` (sums to ``k``)."""
        return self.counts[block].sum(0).double() / max(self.num_samples, 1)

    def class_frequency(self, block: int) -> Tensor:
        """``[num_classes, C]`` fraction of each class's samples that selected each channel (0 for absent classes)."""
        return self.counts[block].double() / self.class_counts.clamp(min=1).double()[:, None]

    def summary(self, block: int) -> dict[str, float | int | str]:
        """Routing statistics of one block.

        ``effective_channels`` is ``exp(entropy)`` of the selection distribution (``k`` for a fixed
        choice, ``C`` for uniform use); ``top_k_share`` the share of selections that go to the k
        most used channels (1.0 = the same k channels for every sample, ``k / C`` = uniform);
        ``class_divergence`` the mean total-variation distance between a class's and the overall
        selection distribution (0 = every class uses the channels alike).
        """
        k = self.k[block]
        overall = self.frequency(block)
        distribution = overall / k
        nonzero = distribution[distribution > 0]
        entropy = float(-(nonzero * nonzero.log()).sum())
        top_share = float(overall.topk(k).values.sum() / k) if self.num_samples else 0.0
        present = self.class_counts > 0
        per_class = self.class_frequency(block)[present] / k
        divergence = float(0.5 * (per_class - distribution[None]).abs().sum(1).mean()) if bool(present.any()) else 0.0
        return {
            "block": self.block_names[block],
            "channels": self.channels[block],
            "k": k,
            "samples": self.num_samples,
            "used_channels": int((overall > 0).sum()),
            "never_selected": int((overall == 0).sum()),
            "effective_channels": math.exp(entropy),
            "top_k_share": top_share,
            "class_divergence": divergence,
        }


def mod_blocks(model: nn.Module) -> list[tuple[str, MoDBlock]]:
    """``(name, block)`` of every MoD block in ``model``."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, MoDBlock)]


@contextlib.contextmanager
def recording_selections(model: nn.Module) -> Iterator[list[tuple[str, MoDBlock]]]:
    """Switch ``record_selection`` on for every MoD block of ``model``; restore it (and clear) on exit."""
    blocks = mod_blocks(model)
    previous = [block.record_selection for _, block in blocks]
    for _, block in blocks:
        block.record_selection = True
        block.last_selection = block.last_scores = None
    try:
        yield blocks
    finally:
        for (_, block), flag in zip(blocks, previous):
            block.record_selection = flag
            block.last_selection = block.last_scores = None


def channel_usage(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    *,
    num_classes: int,
    classes: Optional[list[str]] = None,
    device: str | torch.device = "cpu",
    max_samples: Optional[int] = None,
) -> ChannelUsage:
    """Count the channels every MoD block of ``model`` selects over ``batches`` of ``(images, labels)``.

    The model runs in eval mode under ``torch.inference_mode`` (its mode is restored afterwards).

    Args:
        model: any model holding :class:`~mod_models.blocks.MoDBlock` modules.
        batches: iterable of ``(images [B, 3, H, W], labels [B])``, e.g. a ``DataLoader``.
        num_classes: number of classes (labels must lie in ``[0, num_classes)``).
        classes: class names (default ``"0", "1", ...``).
        device: where the model runs.
        max_samples: stop after this many samples (None: the whole iterable).
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")
    if classes is None:
        classes = [str(i) for i in range(num_classes)]
    if len(classes) != num_classes:
        raise ValueError(f"got {len(classes)} class names for {num_classes} classes")
    if max_samples is not None and (
        isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1
    ):
        raise ValueError(f"max_samples must be None or an int >= 1, got {max_samples!r}")
    device = torch.device(device)
    blocks = mod_blocks(model)
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no MoD blocks; routing analysis needs a MoD model")
    counts = [torch.zeros(num_classes, block.channels, dtype=torch.int64) for _, block in blocks]
    class_counts = torch.zeros(num_classes, dtype=torch.int64)
    was_training = model.training
    model.eval()
    seen = 0
    try:
        with recording_selections(model), torch.inference_mode():
            for images, labels in batches:
                if max_samples is not None and seen >= max_samples:
                    break
                if max_samples is not None and seen + len(labels) > max_samples:
                    images, labels = images[: max_samples - seen], labels[: max_samples - seen]
                labels = torch.as_tensor(labels, dtype=torch.int64)
                if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
                    raise ValueError(
                        f"labels must lie in [0, {num_classes}), got range [{int(labels.min())}, {int(labels.max())}]"
                    )
                model(images.to(device))
                for block_index, (name, block) in enumerate(blocks):
                    selection = block.last_selection
                    if selection is None:
                        raise RuntimeError(f"MoD block {name} did not run in the forward pass")
                    chosen = torch.zeros(len(labels), block.channels, dtype=torch.int64)
                    chosen.scatter_(1, selection.cpu(), 1)
                    counts[block_index].index_add_(0, labels, chosen)
                    block.last_selection = None
                class_counts += torch.bincount(labels, minlength=num_classes)
                seen += len(labels)
    finally:
        model.train(was_training)
    if seen == 0:
        raise ValueError("no samples were analysed (empty data)")
    return ChannelUsage(
        block_names=[name for name, _ in blocks],
        channels=[block.channels for _, block in blocks],
        k=[block.k for _, block in blocks],
        counts=counts,
        class_counts=class_counts,
        classes=list(classes),
    )


def write_usage_csv(usage: ChannelUsage, path: str, *, per_class: bool = True) -> None:
    """Long-format CSV: ``block, class_index, class, channel, selected, samples, frequency`` (class ``all`` = -1)."""
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["block", "class_index", "class", "channel", "selected", "samples", "frequency"])
        for block in range(len(usage.block_names)):
            name = usage.block_names[block]
            overall = usage.counts[block].sum(0)
            for channel, selected in enumerate(overall.tolist()):
                writer.writerow(
                    [
                        name,
                        -1,
                        "all",
                        channel,
                        selected,
                        usage.num_samples,
                        f"{selected / max(usage.num_samples, 1):.6g}",
                    ]
                )
            if not per_class:
                continue
            for class_index, class_name in enumerate(usage.classes):
                samples = int(usage.class_counts[class_index])
                for channel, selected in enumerate(usage.counts[block][class_index].tolist()):
                    writer.writerow(
                        [name, class_index, class_name, channel, selected, samples, f"{selected / max(samples, 1):.6g}"]
                    )


def write_summary_csv(usage: ChannelUsage, path: str) -> None:
    rows = [usage.summary(block) for block in range(len(usage.block_names))]
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({key: f"{value:.6g}" if isinstance(value, float) else value for key, value in row.items()})


COLORBAR_LABEL = "fraction of samples selecting the channel"


def heatmap_figure(usage: ChannelUsage, *, max_classes: int = 40, title: Optional[str] = None):
    """The routing heatmap as a matplotlib ``Figure``: one panel per MoD block, channels across,
    ``all`` and (up to ``max_classes``) classes down, one shared colorbar. Constrained layout
    keeps every label (the colorbar's included) inside the figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = min(len(usage.classes), max_classes)
    row_labels = ["all"] + usage.classes[:shown]
    n_blocks = len(usage.block_names)
    panel_height = 0.9 + 0.18 * len(row_labels)
    figure, axes = plt.subplots(
        n_blocks, 1, figsize=(11, panel_height * n_blocks + 0.6), squeeze=False, layout="constrained"
    )
    image = None
    for block, axis in enumerate(axes[:, 0]):
        values = torch.cat([usage.frequency(block)[None], usage.class_frequency(block)[:shown]]).numpy()
        image = axis.imshow(values, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0.0, vmax=1.0)
        axis.set_title(
            f"{usage.block_names[block]}  (C={usage.channels[block]}, k={usage.k[block]})", fontsize=9, loc="left"
        )
        axis.set_yticks(range(len(row_labels)))
        axis.set_yticklabels(row_labels, fontsize=6)
        axis.set_xlabel("channel", fontsize=7)
        axis.tick_params(axis="x", labelsize=6)
    figure.suptitle(title or f"MoD channel selection frequency ({usage.num_samples} samples)", fontsize=10)
    figure.colorbar(image, ax=axes[:, 0].tolist(), label=COLORBAR_LABEL, fraction=0.025, pad=0.01)
    return figure


def plot_heatmap(usage: ChannelUsage, path: str, *, max_classes: int = 40, title: Optional[str] = None) -> None:
    """Save :func:`heatmap_figure` as a PNG at ``path``."""
    import matplotlib.pyplot as plt

    figure = heatmap_figure(usage, max_classes=max_classes, title=title)
    try:
        figure.savefig(path, dpi=110)
    finally:
        plt.close(figure)


def write_report(usage: ChannelUsage, out_dir: str, *, per_class: bool = True, max_classes: int = 40) -> dict[str, str]:
    """Write the two CSVs and the heatmap into ``out_dir``; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {
        "usage_csv": os.path.join(out_dir, USAGE_CSV),
        "summary_csv": os.path.join(out_dir, SUMMARY_CSV),
        "heatmap_png": os.path.join(out_dir, HEATMAP_PNG),
    }
    write_usage_csv(usage, paths["usage_csv"], per_class=per_class)
    write_summary_csv(usage, paths["summary_csv"])
    plot_heatmap(usage, paths["heatmap_png"], max_classes=max_classes)
    return paths


def _evaluation_dataset(args: argparse.Namespace, config: dict) -> tuple[Dataset, int, list[str]]:
    data = args.data if args.data is not None else config.get("data", "synthetic")
    image_size = _given_or(args.image_size, config.get("image_size"), 64 if data == "synthetic" else 224)
    if data == "synthetic":
        num_classes = _given_or(args.num_classes, config.get("num_classes"), 10)
        dataset = SyntheticShapes(
            _given_or(args.samples, config.get("val_samples"), 2000),
            image_size=image_size,
            num_classes=num_classes,
            seed=_given_or(args.seed, config.get("seed"), 0),
            split="val",
        )
        return dataset, num_classes, list(dataset.classes)
    folder = os.path.join(data, "val") if os.path.isdir(os.path.join(data, "val")) else data
    dataset = image_folder(folder, train=False, image_size=image_size)
    return dataset, len(dataset.classes), list(dataset.classes)


def _given_or(given, *fallbacks):
    """``given`` unless it is None, else the first fallback that is not None (0 is a value, not a gap)."""
    for value in (given, *fallbacks):
        if value is not None:
            return value
    return None


def build_parser() -> CliParser:
    parser = CliParser(
        prog="python -m mod_models.tools.analysis",
        description="Channel-usage study of a trained MoD model: selection frequency per block, overall and per class.",
    )
    parser.add_argument("--checkpoint", required=True, help="checkpoint.pt or best.pt written by mod_models.train")
    parser.add_argument("--data", help="'synthetic' or a folder (DIR/val or an ImageFolder); default: the run's data")
    parser.add_argument("--out", help="output folder (default: <checkpoint folder>/routing)")
    parser.add_argument(
        "--samples", type=positive_int, help="synthetic: samples of the val split (default: the run's)"
    )
    parser.add_argument("--max-samples", type=positive_int, help="stop after this many samples")
    parser.add_argument("--image-size", type=image_size_int, help="default: the run's")
    parser.add_argument("--num-classes", type=int_at_least(2), help="synthetic: default the run's")
    parser.add_argument("--seed", type=seed_int, help="synthetic: default the run's")
    parser.add_argument("--batch-size", type=positive_int, default=64)
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default="reference",
        help="MoD backend (triton on a CPU needs TRITON_INTERPRET=1)",
    )
    parser.add_argument("--no-per-class", action="store_true", help="only the overall rows in channel_usage.csv")
    parser.add_argument("--max-classes", type=positive_int, default=40, help="classes shown in the heatmap")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    """CLI entry: 0 ok, 2 bad input (``error: ...``; nothing written)."""
    args = build_parser().parse_args(argv)
    try:
        device = parse_device(args.device)
        check_backend_usable(args.backend, device)
        checkpoint = load_checkpoint(args.checkpoint)
        model, _ = model_from_checkpoint(checkpoint, backend=args.backend)
        out_dir = args.out or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), "routing")
        check_writable_folder(out_dir)
        dataset, num_classes, classes = _evaluation_dataset(args, checkpoint.get("config") or {})
        if checkpoint.get("classes") and len(checkpoint["classes"]) != num_classes:
            raise DataError(
                f"the model was trained on {len(checkpoint['classes'])} classes, the data has {num_classes}"
            )
        loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=False)
        usage = channel_usage(
            model.to(device),
            loader,
            num_classes=num_classes,
            classes=classes,
            device=device,
            max_samples=args.max_samples,
        )
        paths = write_report(usage, out_dir, per_class=not args.no_per_class, max_classes=args.max_classes)
    except (CheckpointError, DataError, ValueError, TypeError) as error:
        print_error(error)
        return EXIT_INPUT_ERROR
    for block in range(len(usage.block_names)):
        row = usage.summary(block)
        print(
            f"{row['block']:<12} C={row['channels']:<5} k={row['k']:<3} used {row['used_channels']:>4}  "
            f"effective {row['effective_channels']:7.1f}  top-k share {row['top_k_share']:.2f}  "
            f"class divergence {row['class_divergence']:.2f}"
        )
    for path in paths.values():
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
