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
