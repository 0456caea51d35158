"""Data for training and analysing MoD models.

Two sources, both returning ``(image [3, H, W] float32, label int)``:

* :class:`SyntheticShapes`: a procedurally generated image-classification set made on
  the fly (no downloads). Each class is a shape (disk, square, triangle, ...) or a texture
  (stripes, checkerboard, dots, ...) drawn with random position, size, rotation, colours,
  background gradient and noise, so colour says nothing about the class and a network has
  to learn shape and texture. Sample ``i`` of a split depends only on ``(seed, split, i)``:
  the set is deterministic and needs no storage.
* :func:`image_folder`: a torchvision ``ImageFolder`` with the paper's (PyTorch reference
  ImageNet) preprocessing: ``RandomResizedCrop`` + horizontal flip for training, resize to
  ``size / 0.875`` (256 for 224) + center crop for evaluation, ImageNet normalisation.

``python -m mod_models.train.data DIR`` writes the synthetic set as an ``ImageFolder`` tree
(``DIR/train/<class>/*.png``, ``DIR/val/<class>/*.png``).
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder

from ..zoo import EVAL_CROP_RATIO, IMAGENET_MEAN, IMAGENET_STD
from .cli_args import (
    EXIT_INPUT_ERROR,
    MAX_IMAGE_SIZE,
    MIN_IMAGE_SIZE,
    CliParser,
    image_size_int,
    positive_int,
    print_error,
    seed_int,
)

SPLITS = ("train", "val")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class DataError(ValueError):
    """A data source that cannot be used (missing or empty folder, bad layout)."""


# ---------------------------------------------------------------------------------------------
# Synthetic shapes and textures
# ---------------------------------------------------------------------------------------------


def _fill(sdf: np.ndarray, pixel: float) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of the region ``sdf < 0`` (``pixel`` = one pixel in units)."""
    return np.clip(0.5 - sdf / (1.5 * pixel), 0.0, 1.0)


def _band(wave: np.ndarray, threshold: float, pixel: float, frequency: float) -> np.ndarray:
    """Anti-aliased coverage of ``wave > threshold`` for a periodic ``wave`` of the given angular frequency."""
    return np.clip(0.5 + (wave - threshold) / (1.5 * pixel * frequency), 0.0, 1.0)


@dataclass(frozen=True)
class _Frame:
    """Sample-specific coordinates: ``u, v`` rotated about the shape center, ``r`` the shape size."""

    x: np.ndarray
    y: np.ndarray
    u: np.ndarray
    v: np.ndarray
    r: float
    theta: float
    frequency: float
    pixel: float


def _box(f: _Frame, half_u: float, half_v: float) -> np.ndarray:
    return np.maximum(np.abs(f.u) - half_u, np.abs(f.v) - half_v)


def _disk(f: _Frame) -> np.ndarray:
    return _fill(np.hypot(f.u, f.v) - f.r, f.pixel)


def _square(f: _Frame) -> np.ndarray:
    return _fill(_box(f, 0.8 * f.r, 0.8 * f.r), f.pixel)


def _triangle(f: _Frame) -> np.ndarray:
    edges = [
        np.cos(a) * f.u + np.sin(a) * f.v
        for a in (math.pi / 2, math.pi / 2 + 2 * math.pi / 3, math.pi / 2 + 4 * math.pi / 3)
    ]
    return _fill(np.maximum.reduce(edges) - 0.5 * f.r, f.pixel)


def _plus(f: _Frame) -> np.ndarray:
    return _fill(np.minimum(_box(f, f.r, 0.28 * f.r), _box(f, 0.28 * f.r, f.r)), f.pixel)


def _ring(f: _Frame) -> np.ndarray:
    return _fill(np.abs(np.hypot(f.u, f.v) - 0.75 * f.r) - 0.2 * f.r, f.pixel)


def _stripes(f: _Frame) -> np.ndarray:
    return _band(np.sin(f.frequency * f.u), 0.0, f.pixel, f.frequency)


def _checkerboard(f: _Frame) -> np.ndarray:
    return _band(np.sin(f.frequency * f.u) * np.sin(f.frequency * f.v), 0.0, f.pixel, f.frequency)


def _dots(f: _Frame) -> np.ndarray:
    return _band(np.cos(f.frequency * f.u) + np.cos(f.frequency * f.v), 1.0, f.pixel, f.frequency)


def _concentric(f: _Frame) -> np.ndarray:
    return _band(np.sin(f.frequency * np.hypot(f.u, f.v)), 0.0, f.pixel, f.frequency)


def _crescent(f: _Frame) -> np.ndarray:
    outer = np.hypot(f.u, f.v) - f.r
    bite = np.hypot(f.u - 0.5 * f.r, f.v) - 0.8 * f.r
    return _fill(np.maximum(outer, -bite), f.pixel)


def _ellipse(f: _Frame) -> np.ndarray:
    a, b = 1.1 * f.r, 0.4 * f.r
    return _fill((np.hypot(f.u / a, f.v / b) - 1.0) * b, f.pixel)


def _two_disks(f: _Frame) -> np.ndarray:
    first = np.hypot(f.u - 0.55 * f.r, f.v) - 0.38 * f.r
    second = np.hypot(f.u + 0.55 * f.r, f.v) - 0.38 * f.r
    return _fill(np.minimum(first, second), f.pixel)


def _wavy_stripes(f: _Frame) -> np.ndarray:
    return _band(np.sin(f.frequency * (f.u + 0.15 * np.sin(0.6 * f.frequency * f.v))), 0.0, f.pixel, f.frequency)


def _grid_lines(f: _Frame) -> np.ndarray:
    lines = np.maximum(np.cos(f.frequency * f.u), np.cos(f.frequency * f.v))
    return _band(lines, 0.6, f.pixel, f.frequency)


def _half_plane(f: _Frame) -> np.ndarray:
    return _fill(f.u, f.pixel)


def _hollow_square(f: _Frame) -> np.ndarray:
    return _fill(np.abs(_box(f, 0.75 * f.r, 0.75 * f.r)) - 0.16 * f.r, f.pixel)


# (name, renderer). Order fixes the label: class i is SHAPE_CLASSES[i]; textures and shapes
# alternate so that a small num_classes still mixes both.
SHAPE_CLASSES: tuple[tuple[str, Callable[[_Frame], np.ndarray]], ...] = (
    ("stripes", _stripes),
    ("disk", _disk),
    ("checkerboard", _checkerboard),
    ("triangle", _triangle),
    ("concentric", _concentric),
    ("plus", _plus),
    ("dots", _dots),
    ("ring", _ring),
    ("square", _square),
    ("crescent", _crescent),
    ("grid_lines", _grid_lines),
    ("ellipse", _ellipse),
    ("wavy_stripes", _wavy_stripes),
    ("two_disks", _two_disks),
    ("half_plane", _half_plane),
    ("hollow_square", _hollow_square),
)
MAX_SYNTHETIC_CLASSES = len(SHAPE_CLASSES)


def _check_positive_int(name: str, value: object, minimum: int = 1, maximum: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return int(value)


class SyntheticShapes(Dataset):
    """Procedurally generated shapes-and-textures classification set, made on the fly.

    Args:
        num_samples: length of the split.
        image_size: side of the square images (8 .. 4096).
        num_classes: 2 .. ``MAX_SYNTHETIC_CLASSES`` (16); labels cycle ``0, 1, ..., n-1``
            over the indices, so every class is equally frequent.
        seed: the set is a function of ``(seed, split, index)``.
        split: ``"train"`` or ``"val"`` (disjoint random streams).
        noise: standard deviation of the additive pixel noise.
        transform: optional callable applied to the normalised ``[3, H, W]`` tensor.
        normalize: apply ImageNet mean/std normalisation (as :func:`image_folder` does).

    ``dataset[i]`` is ``(image [3, H, W] float32, label)``; :meth:`render` gives the raw
    ``[H, W, 3]`` image in ``[0, 1]``.
    """

    def __init__(
        self,
        num_samples: int = 10_000,
        *,
        image_size: int = 64,
        num_classes: int = 10,
        seed: int = 0,
        split: str = "train",
        noise: float = 0.06,
        transform: Optional[Callable[[Tensor], Tensor]] = None,
        normalize: bool = True,
    ) -> None:
        self.num_samples = _check_positive_int("num_samples", num_samples)
        self.image_size = _check_positive_int("image_size", image_size, MIN_IMAGE_SIZE, MAX_IMAGE_SIZE)
        self.num_classes = _check_positive_int("num_classes", num_classes, minimum=2)
        if self.num_classes > MAX_SYNTHETIC_CLASSES:
            raise ValueError(f"num_classes must be <= {MAX_SYNTHETIC_CLASSES} for the synthetic set, got {num_classes}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if not isinstance(noise, (int, float)) or not 0.0 <= noise <= 1.0:
            raise ValueError(f"noise must be a float in [0, 1], got {noise!r}")
        self.seed = int(seed)
        self.split = split
        self.noise = float(noise)
        self.transform = transform
        self.normalize = normalize
        self.classes = [name for name, _ in SHAPE_CLASSES[: self.num_classes]]
        grid = (np.arange(self.image_size, dtype=np.float32) + 0.5) / self.image_size * 2.0 - 1.0
        self._y, self._x = np.meshgrid(grid, grid, indexing="ij")
        self._mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self._std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def __len__(self) -> int:
        return self.num_samples

    def label(self, index: int) -> int:
        return index % self.num_classes

    @property
    def targets(self) -> list[int]:
        return [self.label(i) for i in range(self.num_samples)]

    def render(self, index: int) -> np.ndarray:
        """The raw image of sample ``index``: ``[H, W, 3]`` float32 in ``[0, 1]``."""
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for a split of {self.num_samples} samples")
        rng = np.random.default_rng([self.seed, SPLITS.index(self.split), index])
        label = self.label(index)
        theta = rng.uniform(0.0, 2.0 * math.pi)
        cx, cy = rng.uniform(-0.3, 0.3, size=2)
        x, y = self._x - cx, self._y - cy
        cos, sin = math.cos(theta), math.sin(theta)
        frame = _Frame(
            x=x,
            y=y,
            u=cos * x + sin * y,
            v=-sin * x + cos * y,
            r=float(rng.uniform(0.35, 0.65)),
            theta=theta,
            frequency=float(rng.uniform(7.0, 12.0)),
            pixel=2.0 / self.image_size,
        )
        mask = SHAPE_CLASSES[label][1](frame).astype(np.float32)[..., None]

        background = rng.uniform(0.0, 1.0, size=3)
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction) + 1e-8
        step = direction * rng.uniform(0.45, 0.8)
        foreground = np.clip(background + step, 0.0, 1.0)
        if np.linalg.norm(foreground - background) < 0.35:  # clipped at the colour cube's edge: go the other way
            foreground = np.clip(background - step, 0.0, 1.0)
        slope = rng.uniform(-0.15, 0.15, size=2)
        shading = (slope[0] * self._x + slope[1] * self._y)[..., None]
        image = background * (1.0 - mask) + foreground * mask + shading
        image = image + rng.normal(0.0, self.noise, size=image.shape)
        return np.clip(image, 0.0, 1.0).astype(np.float32)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image = torch.from_numpy(self.render(index)).permute(2, 0, 1).contiguous()
        if self.normalize:
            image = (image - self._mean) / self._std
        if self.transform is not None:
            image = self.transform(image)
        return image, self.label(index)

    def __repr__(self) -> str:
        return (
            f"SyntheticShapes(num_samples={self.num_samples}, image_size={self.image_size}, "
            f"num_classes={self.num_classes}, seed={self.seed}, split={self.split!r})"
        )


def write_image_folder(dataset: SyntheticShapes, root: str | os.PathLike) -> int:
    """Write ``dataset`` as ``root/<class>/<index>.png`` (an ``ImageFolder`` tree); returns the count."""
    from PIL import Image

    if not isinstance(dataset, SyntheticShapes):
        raise TypeError(f"dataset must be a SyntheticShapes, got {type(dataset).__name__}")
    for name in dataset.classes:
        os.makedirs(os.path.join(root, name), exist_ok=True)
    for index in range(len(dataset)):
        pixels = (dataset.render(index) * 255.0 + 0.5).astype(np.uint8)
        name = dataset.classes[dataset.label(index)]
        Image.fromarray(pixels).save(os.path.join(root, name, f"{index:06d}.png"))
    return len(dataset)


# ---------------------------------------------------------------------------------------------
# ImageFolder with the paper's ImageNet preprocessing
# ---------------------------------------------------------------------------------------------


def imagenet_transform(train: bool, image_size: int = 224):
    """The PyTorch reference ImageNet preprocessing the paper used.

    Train: ``RandomResizedCrop(image_size)``, ``RandomHorizontalFlip``; eval: ``Resize(image_size / 0.875)``
    (256 for 224), ``CenterCrop(image_size)``; then ``ToTensor`` and ImageNet normalisation.
    """
    from torchvision import transforms as T

    image_size = _check_positive_int("image_size", image_size, MIN_IMAGE_SIZE, MAX_IMAGE_SIZE)
    normalize = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    if train:
        return T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), T.ToTensor(), normalize])
    resize = int(round(image_size / EVAL_CROP_RATIO))
    return T.Compose([T.Resize(resize), T.CenterCrop(image_size), T.ToTensor(), normalize])


def _describe_empty(path: str) -> str:
    return f"data folder {path!r} has no class sub-folders with images (expected {path}/<class>/<image>)"


class UnreadableImage(DataError):
    """An image file that cannot be decoded; the message names the file.

    Raised in a DataLoader worker, it reaches the training process re-created from the worker's
    formatted traceback (``torch.utils.data`` passes the whole traceback as the message); the
    original one-line message is recovered from its last line, so the error still reads
    ``cannot read image '...': ...``.
    """

    def __init__(self, message: str) -> None:
        marker = f"{type(self).__name__}: "
        if "\nOriginal Traceback" in message and marker in message:
            message = message.rstrip().splitlines()[-1].partition(marker)[2] or message
        super().__init__(message)


_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_REFUSED_MODES = {"I": "32-bit integer", "F": "32-bit floating-point"}


def _rgb(image, path: str):
    """``image`` as 8-bit RGB: 16-bit grey levels scaled by 255/65535 (``convert("RGB")`` would clip
    them at 255, turning nearly every pixel white); 32-bit modes refused."""
    from PIL import Image

    if image.mode in _SIXTEEN_BIT_MODES:
        levels = np.asarray(image).astype(np.uint32)
        image = Image.fromarray(((levels * 255 + 32767) // 65535).astype(np.uint8), mode="L")
    elif image.mode in _REFUSED_MODES:
        raise UnreadableImage(
            f"cannot read image {path!r}: {_REFUSED_MODES[image.mode]} pixels (mode {image.mode}) have no agreed "
            "scale to 8 bits; convert the file to an 8- or 16-bit image"
        )
    return image.convert("RGB")


def load_rgb_image(path: str):
    """The data sets' image loader: the decoded image as 8-bit RGB (PIL), or :class:`UnreadableImage`
    naming the file (truncated, damaged, a decompression bomb, a dangling link, a 32-bit image)."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with open(path, "rb") as handle:
                image = Image.open(handle)
                image.load()
                return _rgb(image, path)
    except UnreadableImage:
        raise
    except Exception as error:  # PIL reports damaged files with many exception types
        raise UnreadableImage(f"cannot read image {path!r}: {_reason(error)}") from None


def _reason(error: BaseException) -> str:
    text = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def check_image_file(path: str) -> Optional[str]:
    """Why ``path`` cannot be used as an image (None when it can), from what is cheap to read: the
    file's size, its header (format, size, mode, the decompression-bomb limit
    ``PIL.Image.MAX_IMAGE_PIXELS``) and PIL's ``verify`` (which for PNG reads the chunks and their
    checksums, so a truncated or damaged PNG is found here; JPEG data is only checked when decoded).
    """
    from PIL import Image

    if os.path.islink(path) and not os.path.exists(path):
        return f"a symlink to a missing file ({os.readlink(path)!r})"
    try:
        if os.path.getsize(path) == 0:
            return "an empty file (0 bytes)"
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                mode = image.mode
                image.verify()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        return f"a decompression bomb ({_reason(error)})"
    except Exception as error:  # PIL reports damaged files with many exception types
        return f"not a readable image ({_reason(error)})"
    if mode in _REFUSED_MODES:
        return f"{_REFUSED_MODES[mode]} pixels (mode {mode}); convert it to an 8- or 16-bit image"
    return None


def _within(path: str, folder: str) -> bool:
    """``path`` is ``folder`` or inside it (both real paths)."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def find_image_samples(
    directory: str, class_to_idx: dict[str, int], extensions: tuple[str, ...]
) -> list[tuple[str, int]]:
    """``(path, class index)`` of every file with an image extension in a class folder or its
    sub-folders, in torchvision ``make_dataset``'s order: sub-folders and symlinks to files or folders
    followed, hidden files included, each folder's files sorted.

    Unlike torchvision, every folder is read once: a symlink that leads back to a folder already
    read (a loop, or a second way into the same folder), to the data folder or above it, or into
    another class's folder is refused by name (torchvision follows a loop until the path is too
    long, counting its images again and again, and labels another class's images as this one's).

    Raises:
        DataError: such a symlink, or a folder that cannot be listed.
    """
    root = os.path.realpath(directory)
    classes = {name: os.path.realpath(os.path.join(directory, name)) for name in class_to_idx}
    seen: dict[str, str] = {}  # real path of every folder read -> the path it was reached by
    samples: list[tuple[str, int]] = []
    for name in sorted(class_to_idx):
        top = os.path.join(directory, name)
        if not os.path.isdir(top):
            continue
        found: list[tuple[str, list[str]]] = []
        _read_once(top, classes[name], name, root, classes, seen)
        for folder, subfolders, files in os.walk(top, followlinks=True, onerror=_unlistable):
            for sub in subfolders:
                path = os.path.join(folder, sub)
                _read_once(path, os.path.realpath(path), name, root, classes, seen)
            found.append((folder, files))
        for folder, files in sorted(found):
            samples.extend(
                (os.path.join(folder, file), class_to_idx[name])
                for file in sorted(files)
                if file.lower().endswith(extensions)
            )
    return samples


def _read_once(path: str, real: str, label: str, root: str, classes: dict[str, str], seen: dict[str, str]) -> None:
    """Record that class ``label`` reads the folder ``path`` (real path ``real``), or refuse a link
    that would read a folder twice, the data folder itself, or another class's folder."""
    problem = None
    if real in seen:
        problem = f"which was already read as {seen[real]!r} (a symlink loop or a second link to it)"
    elif _within(root, real):
        problem = "which holds the data folder itself (a symlink loop)"
    else:
        for other, folder in classes.items():
            if other != label and _within(real, folder):
                problem = f"inside the folder of class {other!r}"
                break
    if problem is not None:
        raise DataError(
            f"{path!r} leads to {real!r}, {problem}: its images would be counted again under class {label!r}. "
            "Remove that link (each image must be in the data folder once, under its class)"
        )
    seen[real] = path


def _unlistable(error: OSError) -> None:
    raise DataError(f"cannot list folder {error.filename!r}: {error.strerror or error}")


class CheckedImageFolder(ImageFolder):
    """torchvision's ``ImageFolder`` (the same classes, samples, order and transforms) whose files were
    checked before use (:func:`check_image_file`) and whose loader names a file it cannot decode.

    An unusable file is an error listing it, or, with ``skip_bad_images``, left out and listed in
    :attr:`skipped` (``(path, reason)``). Symlink loops and links into other classes are refused
    (:func:`find_image_samples`). 16-bit grey images are scaled to 8 bits (:func:`load_rgb_image`).
    """

    def __init__(self, root: str, *, transform: Optional[Callable] = None, skip_bad_images: bool = False) -> None:
        self.skip_bad_images = skip_bad_images
        self.skipped: list[tuple[str, str]] = []
        super().__init__(root, transform=transform, loader=load_rgb_image)

    def make_dataset(  # an instance method: ImageFolder calls it as self.make_dataset(...)
        self,
        directory: str,
        class_to_idx: dict[str, int],
        extensions: Optional[tuple[str, ...]] = None,
        is_valid_file: Optional[Callable[[str], bool]] = None,
        allow_empty: bool = False,
    ) -> list[tuple[str, int]]:
        samples = find_image_samples(os.fspath(directory), class_to_idx, extensions or IMAGE_EXTENSIONS)
        good, bad = [], []
        for path, label in samples:
            problem = check_image_file(path)
            if problem is None:
                good.append((path, label))
            else:
                bad.append((path, problem))
        if bad and not self.skip_bad_images:
            shown = "; ".join(f"{path!r}: {problem}" for path, problem in bad[:3])
            more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
            raise DataError(
                f"{len(bad)} of the {len(samples)} images in {os.fspath(directory)!r} cannot be used: {shown}{more}. "
                "Fix or remove them (training can leave them out with --skip-bad-images)"
            )
        self.skipped = bad
        labels = {label for _, label in good}
        empty = sorted(name for name, index in class_to_idx.items() if index not in labels)
        if empty and not allow_empty:
            raise FileNotFoundError(f"Found no valid file for the classes {', '.join(empty)}")
        return good


def image_folder(
    root: str | os.PathLike, *, train: bool, image_size: int = 224, skip_bad_images: bool = False
) -> CheckedImageFolder:
    """A :class:`CheckedImageFolder` at ``root`` (``root/<class>/<image>``) with :func:`imagenet_transform`.

    Raises:
        DataError: ``root`` is missing, not a folder, holds no class folder with images, a symlink
            loop, or an image that cannot be used (unless ``skip_bad_images``: then it is left out and
            listed in the data set's ``skipped``).
    """
    path = os.fspath(root)
    if not os.path.exists(path):
        raise DataError(f"data folder {path!r} does not exist")
    if not os.path.isdir(path):
        raise DataError(f"data path {path!r} is not a folder")
    try:
        dataset = CheckedImageFolder(
            path, transform=imagenet_transform(train, image_size), skip_bad_images=skip_bad_images
        )
    except FileNotFoundError as error:
        raise DataError(f"{_describe_empty(path)}: {error}") from None
    if len(dataset) == 0:
        raise DataError(_describe_empty(path))
    return dataset


def _names(classes: list[str], limit: int = 10) -> str:
    if not classes:
        return "none"
    shown = ", ".join(repr(name) for name in classes[:limit])
    return shown + (f" and {len(classes) - limit} more" if len(classes) > limit else "")


def image_folder_splits(root: str | os.PathLike, *, image_size: int = 224, skip_bad_images: bool = False):
    """``(train, val)`` ImageFolders of an ImageNet-style tree ``root/train/<class>/...``, ``root/val/<class>/...``.

    Raises:
        DataError: a missing/empty folder, or train and val with different class lists.
    """
    path = os.fspath(root)
    if not os.path.exists(path):
        raise DataError(f"data folder {path!r} does not exist")
    if not os.path.isdir(path):
        raise DataError(f"data path {path!r} is not a folder")
    missing = [split for split in SPLITS if not os.path.isdir(os.path.join(path, split))]
    if missing:
        raise DataError(
            f"data folder {path!r} must contain {' and '.join(repr(s) for s in SPLITS)} sub-folders "
            f"(ImageNet layout {path}/train/<class>/<image>); missing: {', '.join(missing)}"
        )
    train = image_folder(os.path.join(path, "train"), train=True, image_size=image_size,
                         skip_bad_images=skip_bad_images)
    val = image_folder(os.path.join(path, "val"), train=False, image_size=image_size, skip_bad_images=skip_bad_images)
    if train.classes != val.classes:
        only_train = sorted(set(train.classes) - set(val.classes))
        only_val = sorted(set(val.classes) - set(train.classes))
        raise DataError(
            f"train and val folders of {path!r} have different classes: "
            f"only in train: {_names(only_train)}; only in val: {_names(only_val)}. "
            "They must match for the labels to agree"
        )
    return train, val


def main(argv: Optional[list[str]] = None) -> int:
    parser = CliParser(
        prog="python -m mod_models.train.data",
        description="Write the synthetic shapes set as an ImageFolder tree (DIR/train/<class>, DIR/val/<class>).",
    )
    parser.add_argument("out", help="output folder")
    parser.add_argument("--train-samples", type=positive_int, default=2000)
    parser.add_argument("--val-samples", type=positive_int, default=500)
    parser.add_argument("--image-size", type=image_size_int, default=64)
    parser.add_argument("--num-classes", type=positive_int, default=10)
    parser.add_argument("--seed", type=seed_int, default=0)
    args = parser.parse_args(argv)
    try:
        for split, count in (("train", args.train_samples), ("val", args.val_samples)):
            dataset = SyntheticShapes(
                count, image_size=args.image_size, num_classes=args.num_classes, seed=args.seed, split=split
            )
            write_image_folder(dataset, os.path.join(args.out, split))
            print(f"wrote {count} {split} images to {os.path.join(args.out, split)}")
    except (ValueError, TypeError, OSError) as error:
        print_error(error)
        return EXIT_INPUT_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
