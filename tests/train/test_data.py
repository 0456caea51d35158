"""The synthetic shapes set and ImageFolder loading (mod_models.train.data)."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from mod_models.train.data import (
    EVAL_CROP_RATIO,
    MAX_SYNTHETIC_CLASSES,
    DataError,
    SyntheticShapes,
    image_folder,
    image_folder_splits,
    imagenet_transform,
    write_image_folder,
)


def test_synthetic_is_deterministic_per_seed_split_and_index():
    a = SyntheticShapes(40, image_size=24, num_classes=8, seed=3)
    b = SyntheticShapes(40, image_size=24, num_classes=8, seed=3)
    for index in (0, 7, 39):
        image_a, label_a = a[index]
        image_b, label_b = b[index]
        assert torch.equal(image_a, image_b) and label_a == label_b
    other_seed = SyntheticShapes(40, image_size=24, num_classes=8, seed=4)
    val = SyntheticShapes(40, image_size=24, num_classes=8, seed=3, split="val")
    assert not torch.equal(a[5][0], other_seed[5][0])
    assert not torch.equal(a[5][0], val[5][0])


def test_synthetic_shapes_labels_and_range():
    dataset = SyntheticShapes(32, image_size=20, num_classes=MAX_SYNTHETIC_CLASSES)
    image, label = dataset[17]
    assert image.shape == (3, 20, 20) and image.dtype == torch.float32
    assert label == 17 % MAX_SYNTHETIC_CLASSES
    assert np.bincount(dataset.targets).tolist() == [2] * MAX_SYNTHETIC_CLASSES
    raw = dataset.render(3)
    assert raw.shape == (20, 20, 3) and raw.min() >= 0.0 and raw.max() <= 1.0
    # Every class draws something: the image is not a flat colour.
    for index in range(MAX_SYNTHETIC_CLASSES):
        assert dataset.render(index).std() > 0.05, dataset.classes[index]


def test_synthetic_classes_differ_in_shape_not_colour():
    # The mean colour of an image says nothing about its class: colours are drawn per sample.
    dataset = SyntheticShapes(400, image_size=16, num_classes=4, noise=0.0, normalize=False)
    means = torch.stack([dataset[i][0].mean(dim=(1, 2)) for i in range(len(dataset))])
    labels = torch.tensor(dataset.targets)
    per_class = torch.stack([means[labels == c].mean(0) for c in range(4)])
    assert (per_class.max(0).values - per_class.min(0).values).max() < 0.12


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"num_samples": 0}, ValueError),
        ({"num_samples": 2.5}, TypeError),
        ({"image_size": 4}, ValueError),
        ({"num_classes": 1}, ValueError),
        ({"num_classes": MAX_SYNTHETIC_CLASSES + 1}, ValueError),
        ({"split": "test"}, ValueError),
        ({"seed": -1}, ValueError),
        ({"noise": 2.0}, ValueError),
    ],
)
def test_synthetic_rejects_bad_arguments(kwargs, error):
    arguments = {"num_samples": 8, **kwargs}
    with pytest.raises(error):
        SyntheticShapes(**arguments)


def test_synthetic_index_out_of_range():
    with pytest.raises(IndexError):
        SyntheticShapes(4, image_size=8).render(4)


def test_imagenet_transforms_follow_the_reference_recipe():
    train = imagenet_transform(True, 224)
    evaluation = imagenet_transform(False, 224)
    names = [type(t).__name__ for t in train.transforms]
    assert names == ["RandomResizedCrop", "RandomHorizontalFlip", "ToTensor", "Normalize"]
    assert train.transforms[0].size == (224, 224)
    assert [type(t).__name__ for t in evaluation.transforms] == ["Resize", "CenterCrop", "ToTensor", "Normalize"]
    assert evaluation.transforms[0].size == 256 and evaluation.transforms[1].size == (224, 224)
    assert round(64 / EVAL_CROP_RATIO) == imagenet_transform(False, 64).transforms[0].size
    image = Image.fromarray((np.random.rand(300, 200, 3) * 255).astype(np.uint8))
    assert train(image).shape == (3, 224, 224)
    assert evaluation(image).shape == (3, 224, 224)


def test_image_folder_roundtrip(tmp_path):
    synthetic = SyntheticShapes(12, image_size=16, num_classes=3, seed=1)
    assert write_image_folder(synthetic, tmp_path / "train") == 12
    assert write_image_folder(SyntheticShapes(6, image_size=16, num_classes=3, split="val"), tmp_path / "val") == 6
    train, val = image_folder_splits(tmp_path, image_size=16)
    assert train.classes == sorted(synthetic.classes)  # ImageFolder sorts class folders
    assert len(train) == 12 and len(val) == 6
    image, label = val[0]
    assert image.shape == (3, 16, 16)
    path, _ = val.samples[0]
    assert os.path.basename(os.path.dirname(path)) == val.classes[label]


def test_image_folder_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        image_folder(tmp_path / "missing", train=True)
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(DataError, match="not a folder"):
        image_folder(tmp_path / "file.txt", train=True)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no class sub-folders"):
        image_folder(empty, train=True)
    (empty / "cat").mkdir()  # a class folder without images
    with pytest.raises(DataError, match="no class sub-folders"):
        image_folder(empty, train=True)
    with pytest.raises(DataError, match="'train' and 'val'"):
        image_folder_splits(empty)
    assert issubclass(DataError, ValueError)


def test_image_folder_splits_need_matching_classes(tmp_path):
    write_image_folder(SyntheticShapes(6, image_size=16, num_classes=3), tmp_path / "train")
    write_image_folder(SyntheticShapes(4, image_size=16, num_classes=2, split="val"), tmp_path / "val")
    with pytest.raises(DataError, match="different classes"):
        image_folder_splits(tmp_path, image_size=16)


def test_different_class_folders_are_named(tmp_path):
    """Same number of classes, different names: the error says which ones differ."""
    write_image_folder(SyntheticShapes(6, image_size=16, num_classes=3), tmp_path / "train")
    write_image_folder(SyntheticShapes(6, image_size=16, num_classes=3, split="val"), tmp_path / "val")
    os.rename(tmp_path / "val" / "disk", tmp_path / "val" / "disc")
    with pytest.raises(DataError) as error:
        image_folder_splits(tmp_path, image_size=16)
    message = str(error.value)
    assert "only in train: 'disk'" in message and "only in val: 'disc'" in message, message
    assert "stripes" not in message  # the classes both have are not listed


def test_data_cli_writes_image_folder(tmp_path):
    from mod_models.train.data import main

    assert (
        main([str(tmp_path), "--train-samples", "6", "--val-samples", "3", "--image-size", "12", "--num-classes", "3"])
        == 0
    )
    assert sum(len(files) for _, _, files in os.walk(tmp_path / "train")) == 6
    assert sum(len(files) for _, _, files in os.walk(tmp_path / "val")) == 3
    assert main([str(tmp_path / "x"), "--num-classes", "99"]) == 2


# ---------------------------------------------------------------------------------------------
# Image folders: what a sample is, 16-bit images, unusable files
# ---------------------------------------------------------------------------------------------


def _png(path, value=128, size=8):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(path)
    return path


def _two_classes(root):
    """root/a/1.png (dark), root/b/2.png (light): two images, two classes."""
    _png(root / "a" / "1.png", 10)
    _png(root / "b" / "2.png", 200)
    return root


def _bomb_png(path):
    """A PNG whose header claims 20000 x 20000 pixels (more than twice PIL's decompression-bomb limit)."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)


@pytest.mark.parametrize(
    "link, target, problem",
    [
        ("a/up", "..", "holds the data folder itself (a symlink loop)"),
        ("b/self", ".", "already read as"),
        ("a/theirs", "../b", "inside the folder of class 'b'"),
    ],
    ids=["loop-to-the-data-folder", "loop-to-itself", "into-another-class"],
)
def test_symlink_loops_and_links_into_other_classes_are_refused_by_name(tmp_path, link, target, problem):
    """torchvision follows such links until the path is too long: 3 images became hundreds of samples,
    b's images labelled a. Each folder is read once; a link that would read one again is named."""
    root = _two_classes(tmp_path / "data")
    os.symlink(target, root / link)
    with pytest.raises(DataError) as error:
        image_folder(root, train=False, image_size=8)
    message = str(error.value)
    assert f"{str(root / link)!r} leads to" in message and problem in message, message


def test_samples_are_those_of_torchvision_image_folder(tmp_path):
    """Sub-folders, links to folders outside the data folder and links to files are followed as
    torchvision does, in its order; only image extensions count."""
    from torchvision.datasets import ImageFolder

    root = _two_classes(tmp_path / "data")
    _png(root / "a" / "deeper" / "3.PNG")
    _png(tmp_path / "elsewhere" / "4.png")
    os.symlink(tmp_path / "elsewhere", root / "b" / "linked")
    os.symlink(root / "a" / "1.png", root / "b" / "5.png")
    (root / "a" / "notes.txt").write_text("not an image")
    ours = image_folder(root, train=False, image_size=8)
    assert ours.samples == ImageFolder(str(root)).samples
    assert [os.path.relpath(path, root) for path, _ in ours.samples] == [
        "a/1.png", "a/deeper/3.PNG", "b/2.png", "b/5.png", "b/linked/4.png"
    ]


def test_a_16_bit_png_is_scaled_not_saturated(tmp_path):
    """PIL's convert("RGB") clips 16-bit grey levels at 255 (almost every pixel white); the loader
    scales them by 255 / 65535."""
    root = _two_classes(tmp_path / "data")
    levels = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)
    Image.fromarray(levels).save(root / "a" / "sixteen.png")
    assert Image.open(root / "a" / "sixteen.png").mode == "I;16"
    dataset = image_folder(root, train=False, image_size=8)
    path = str(root / "a" / "sixteen.png")
    pixels = np.asarray(dataset.loader(path))
    assert pixels.shape == (8, 8, 3) and pixels.dtype == np.uint8
    expected = np.round(levels / 257.0).astype(np.uint8)
    assert np.array_equal(pixels[..., 0], expected) and np.array_equal(pixels[..., 2], expected)
    # Through the data set: not one saturated pixel in a picture whose brightest level is 63000 / 65535.
    image, _ = dataset[[p for p, _ in dataset.samples].index(path)]
    assert image.shape == (3, 8, 8)


def _truncated(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


BAD_FILES = {
    "empty": (lambda path: path.write_bytes(b""), "an empty file (0 bytes)"),
    "truncated-png": (lambda path: (_png(path, size=32), _truncated(path)), "not a readable image"),
    "decompression-bomb": (_bomb_png, "a decompression bomb"),
    "dangling-symlink": (lambda path: os.symlink(path.parent / "gone.png", path), "a symlink to a missing file"),
}


@pytest.mark.parametrize("kind", list(BAD_FILES))
def test_an_unusable_image_is_named_before_training_or_skipped_when_asked(tmp_path, kind):
    root = _two_classes(tmp_path / "data")
    _png(root / "a" / "3.png")
    make, problem = BAD_FILES[kind]
    bad = root / "a" / "bad.png"
    make(bad)
    with pytest.raises(DataError) as error:
        image_folder(root, train=True, image_size=8)
    message = str(error.value)
    assert f"1 of the 4 images in {str(root)!r} cannot be used: {str(bad)!r}: {problem}" in message, message
    assert "--skip-bad-images" in message
    skipping = image_folder(root, train=True, image_size=8, skip_bad_images=True)
    assert len(skipping) == 3 and str(bad) not in [path for path, _ in skipping.samples]
    assert [path for path, _ in skipping.skipped] == [str(bad)] and problem in skipping.skipped[0][1]
    for index in range(len(skipping)):
        assert skipping[index][0].shape == (3, 8, 8)


def _folder_args(data, out, *extra):
    return [
        "--data", str(data), "--out", str(out), "--image-size", "8", "--batch-size", "2", "--epochs", "1",
        "--lr", "0.01", "--backend", "reference", "--device", "cpu", "--no-progress", *extra,
    ]


def _image_tree(root):
    for split in ("train", "val"):
        for label, value in (("a", 10), ("b", 200)):
            for index in range(2):
                _png(root / split / label / f"{index}.png", value + index)
    return root


def test_training_refuses_an_unusable_image_before_writing_and_skips_it_on_request(tmp_path, capsys):
    from mod_models.train import main

    data = _image_tree(tmp_path / "data")
    (data / "train" / "a" / "empty.png").write_bytes(b"")
    out = tmp_path / "run"
    assert main(_folder_args(data, out, "--workers", "0")) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: 1 of the 5 images in ") and "empty.png" in error and error.count("\n") == 1, error
    assert not out.exists()
    assert main(_folder_args(data, out, "--workers", "0", "--skip-bad-images")) == 0
    error = capsys.readouterr().err
    assert "warning: left out 1 of the 5 images in " in error and "empty.png" in error, error


@pytest.mark.parametrize("workers", ["0", "1"])
def test_an_image_that_fails_to_decode_mid_epoch_is_named(tmp_path, capsys, workers):
    """A truncated JPEG passes the header check (PIL verifies only PNG data without decoding): when it
    is decoded, training stops with one error line naming it, from a loader worker process too."""
    from mod_models.train import main

    data = _image_tree(tmp_path / "data")
    jpeg = data / "train" / "b" / "cut.jpg"
    Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)).save(jpeg, quality=95)
    _truncated(jpeg, 0.4)
    assert main(_folder_args(data, tmp_path / "run", "--workers", workers)) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"error: cannot read image {str(jpeg)!r}: OSError: image file is truncated"), error
    assert error.count("\n") == 1 and "Traceback" not in error, error
