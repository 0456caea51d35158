"""Routing analysis (mod_models.tools.analysis): channel-usage counts, CSV and heatmap outputs, CLI."""

import csv

import pytest
import torch
from _training import run_module, tiny_config
from torch import nn
from torch.utils.data import DataLoader

from mod_models import build_model
from mod_models.blocks import MoDBlock
from mod_models.tools.analysis import (
    HEATMAP_PNG,
    SUMMARY_CSV,
    USAGE_CSV,
    channel_usage,
    main,
    plot_heatmap,
    write_report,
)
from mod_models.train import train
from mod_models.train.checkpoint import CHECKPOINT_FORMAT
from mod_models.train.data import SyntheticShapes


def _batches(num_classes=3, n=24, size=32, batch=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, size, size, generator=generator)
    labels = torch.arange(n) % num_classes
    return [(images[i : i + batch], labels[i : i + batch]) for i in range(0, n, batch)]


def _model(**kwargs):
    torch.manual_seed(0)
    return build_model("resnet18_mod", num_classes=3, backend="reference", **kwargs)


def test_counts_match_the_blocks_own_selections():
    model = _model().eval()
    batches = _batches()
    blocks = [m for m in model.modules() if isinstance(m, MoDBlock)]
    usage = channel_usage(model, batches, num_classes=3, classes=["a", "b", "c"])
    # The analysis restored the recording flags it found (off) and cleared the last selections.
    assert all(not block.record_selection and block.last_selection is None for block in blocks)
    assert usage.block_names == ["layer1.1", "layer2.1", "layer3.1", "layer4.1"]
    assert usage.k == [1, 2, 4, 8] and usage.channels == [64, 128, 256, 512]
    assert usage.class_counts.tolist() == [8, 8, 8]
    # Recount independently from the blocks' recorded selections.
    expected = [torch.zeros(3, block.channels, dtype=torch.int64) for block in blocks]
    for block in blocks:
        block.record_selection = True
    with torch.no_grad():
        for images, labels in batches:
            model(images)
            for counts, block in zip(expected, blocks):
                for label, row in zip(labels.tolist(), block.last_selection.tolist()):
                    for channel in row:
                        counts[label, channel] += 1
    for got, want in zip(usage.counts, expected):
        assert torch.equal(got, want)
    for block in range(4):
        assert usage.frequency(block).sum().item() == pytest.approx(usage.k[block])
        assert usage.class_frequency(block).sum(1).tolist() == pytest.approx([usage.k[block]] * 3)


def test_tied_router_selects_the_first_channels():
    model = _model()
    for module in model.modules():
        if isinstance(module, MoDBlock):
            nn.init.zeros_(module.router.fc2.weight)  # every score 0.5: ties -> lowest channels
    model.train()
    usage = channel_usage(model, _batches(), num_classes=3, max_samples=20)
    assert model.training  # mode restored
    assert usage.num_samples == 20
    for block in range(4):
        k = usage.k[block]
        assert torch.equal(usage.frequency(block)[:k], torch.ones(k, dtype=torch.float64))
        assert usage.frequency(block)[k:].sum() == 0
        summary = usage.summary(block)
        assert summary["used_channels"] == k and summary["top_k_share"] == pytest.approx(1.0)
        assert summary["effective_channels"] == pytest.approx(k) and summary["class_divergence"] == pytest.approx(0.0)


def test_report_files(tmp_path):
    usage = channel_usage(_model(), _batches(), num_classes=3, classes=["a", "b", "c"])
    paths = write_report(usage, str(tmp_path / "routing"))
    with open(paths["usage_csv"], newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == (64 + 128 + 256 + 512) * (1 + 3)
    layer4_all = [r for r in rows if r["block"] == "layer4.1" and r["class"] == "all"]
    assert sum(int(r["selected"]) for r in layer4_all) == 24 * 8
    with open(paths["summary_csv"], newline="") as handle:
        summary = list(csv.DictReader(handle))
    assert [r["block"] for r in summary] == usage.block_names
    with open(paths["heatmap_png"], "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "routing" / HEATMAP_PNG).stat().st_size > 5000


def test_bad_arguments():
    with pytest.raises(ValueError, match="no MoD blocks"):
        channel_usage(build_model("resnet18", num_classes=3), _batches(), num_classes=3)
    with pytest.raises(ValueError, match="labels must lie"):
        channel_usage(_model(), _batches(num_classes=3), num_classes=2)
    with pytest.raises(ValueError):
        channel_usage(_model(), _batches(), num_classes=0)
    with pytest.raises(ValueError):
        channel_usage(_model(), _batches(), num_classes=3, classes=["a"])
    with pytest.raises(ValueError, match="no samples"):
        channel_usage(_model(), [], num_classes=3)


def test_analysis_cli_on_a_trained_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    train(tiny_config(run, epochs=1))
    assert main(["--checkpoint", str(run / "best.pt"), "--samples", "20", "--batch-size", "8"]) == 0
    out = capsys.readouterr().out
    assert "layer4.1" in out
    for name in (USAGE_CSV, SUMMARY_CSV, HEATMAP_PNG):
        assert (run / "routing" / name).stat().st_size > 0
    with open(run / "routing" / USAGE_CSV, newline="") as handle:
        rows = list(csv.DictReader(handle))
    classes = {r["class"] for r in rows}
    assert classes == {"all"} | set(SyntheticShapes(4, num_classes=4).classes)
    assert main(["--checkpoint", str(tmp_path / "missing.pt")]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_analysis_runs_on_a_dataloader():
    dataset = SyntheticShapes(16, image_size=32, num_classes=4)
    usage = channel_usage(_model(), DataLoader(dataset, batch_size=8), num_classes=4, classes=dataset.classes)
    assert usage.class_counts.tolist() == [4, 4, 4, 4]


def test_heatmap_shows_every_block_and_keeps_its_labels_inside(tmp_path, monkeypatch):
    """One panel per block with the right data and row labels, one colorbar with its label, and no
    text (the colorbar label included) cut off at the figure's edge; the PNG is the figure's size."""
    import matplotlib.figure
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from PIL import Image

    usage = channel_usage(_model(), _batches(), num_classes=3, classes=["a", "b", "c"])
    saved = []
    real_savefig = matplotlib.figure.Figure.savefig

    def keep_figure(self, *args, **kwargs):
        saved.append(self)
        return real_savefig(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", keep_figure)
    path = tmp_path / "heatmap.png"
    plot_heatmap(usage, str(path))
    (figure,) = saved
    panels = [axis for axis in figure.axes if axis.images]
    assert [axis.get_title(loc="left").split()[0] for axis in panels] == usage.block_names
    for axis, channels in zip(panels, usage.channels):
        assert axis.images[0].get_array().shape == (4, channels)
        assert [label.get_text() for label in axis.get_yticklabels()] == ["all", "a", "b", "c"]
    colorbars = [axis for axis in figure.axes if axis not in panels]
    assert len(colorbars) == 1 and colorbars[0].get_ylabel() == "fraction of samples selecting the channel"

    canvas = FigureCanvasAgg(figure)  # pyplot detached the figure from its canvas when closing it
    canvas.draw()
    renderer = canvas.get_renderer()
    edge = figure.bbox  # display units (pixels)

    def inside(box):
        return edge.x0 - 1 <= box.x0 and box.x1 <= edge.x1 + 1 and edge.y0 - 1 <= box.y0 and box.y1 <= edge.y1 + 1

    label = colorbars[0].yaxis.label.get_window_extent(renderer)
    assert inside(label), f"the colorbar label at {label} is cut off by the figure {edge}"
    drawn = figure.get_tightbbox(renderer).transformed(figure.dpi_scale_trans)  # everything drawn: inches -> pixels
    assert inside(drawn), f"something drawn at {drawn} lies outside the figure {edge}"
    with Image.open(path) as image:  # saved at 110 dpi, without cropping
        expected = (figure.get_figwidth() * 110, figure.get_figheight() * 110)
        assert all(abs(got - want) <= 1 for got, want in zip(image.size, expected)), (image.size, expected)


@pytest.fixture(scope="module")
def weights_checkpoint(tmp_path_factory):
    """best.pt-style weights of an untrained resnet18_mod for 4 synthetic classes at 16 px."""
    path = tmp_path_factory.mktemp("weights") / "best.pt"
    torch.manual_seed(0)
    model = build_model("resnet18_mod", num_classes=4, backend="reference")
    config = {"data": "synthetic", "image_size": 16, "num_classes": 4, "val_samples": 8, "seed": 0}
    torch.save(
        {
            "format": CHECKPOINT_FORMAT,
            "kind": "weights",
            "model_name": "resnet18_mod",
            "model_kwargs": {"num_classes": 4},
            "model": model.state_dict(),
            "epoch": 1,
            "classes": list(SyntheticShapes(4, num_classes=4).classes),
            "config": config,
            "history": [],
        },
        path,
    )
    return path


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--samples", "0"], "argument --samples: expected an integer >= 1, got 0"),
        (["--image-size", "0"], "argument --image-size: expected an integer >= 8, got 0"),
        (["--max-samples", "0"], "argument --max-samples: expected an integer >= 1, got 0"),
        (["--batch-size", "0"], "argument --batch-size: expected an integer >= 1, got 0"),
    ],
)
def test_analysis_zero_counts_are_errors_not_defaults(weights_checkpoint, tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["--checkpoint", str(weights_checkpoint), "--out", str(tmp_path / "routing"), *flags])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith(f"error: {message}")
    assert not (tmp_path / "routing").exists()


@pytest.mark.parametrize(
    "device, message",
    [
        ("foo", "unknown device 'foo'; expected cpu, cuda or cuda:N"),
        ("cuda", "device 'cuda' was requested, but this machine has no usable CUDA device"),
        ("cuda:0", "device 'cuda:0' was requested, but this machine has no usable CUDA device"),
    ],
)
def test_analysis_device_errors(weights_checkpoint, tmp_path, capsys, monkeypatch, device, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same answer on a GPU machine
    assert main(["--checkpoint", str(weights_checkpoint), "--out", str(tmp_path / "r"), "--device", device]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"error: {message}"), error
    assert not (tmp_path / "r").exists()


def test_analysis_triton_backend_on_a_cpu_without_the_interpreter(weights_checkpoint, tmp_path):
    result = run_module(
        "mod_models.tools.analysis",
        "--checkpoint",
        str(weights_checkpoint),
        "--out",
        str(tmp_path / "r"),
        "--backend",
        "triton",
        "--device",
        "cpu",
        env_remove=("TRITON_INTERPRET",),
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.startswith("error: --backend triton cannot run on cpu"), result.stderr
    assert "TRITON_INTERPRET=1" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "r").exists()


def test_analysis_out_naming_a_file_is_an_error(weights_checkpoint, tmp_path, capsys):
    target = tmp_path / "routing"
    target.write_text("keep")
    assert main(["--checkpoint", str(weights_checkpoint), "--out", str(target), "--samples", "8"]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert target.read_text() == "keep"
