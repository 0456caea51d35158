"""Command-line pieces shared by ``python -m mod_models.{train,export,analysis,data}``.

* :class:`CliParser`: an ``argparse`` parser whose errors read ``error: <message>`` (exit status 2),
  like every other input error of these tools.
* :func:`int_at_least`, :func:`finite_float`, :func:`path_component`: argparse types with messages
  naming the bad value.
* :func:`parse_device`, :func:`check_backend_usable`, :func:`check_writable_folder`: input checks
  that must pass before a tool writes anything. They raise ``ValueError``.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import tempfile
from typing import Callable, NoReturn, Optional

import torch

EXIT_INPUT_ERROR = 2
# torch.manual_seed takes 64-bit seeds and the training loop adds the process rank and epoch to
# the seed, so seeds stay below 2**63 to leave that headroom.
MAX_SEED = 2**63 - 1
# The largest image side the tools accept: one 4096 x 4096 RGB image is 200 MB as float32, and a
# batch of them already fills a large GPU. Far larger sides only end in a MemoryError.
MIN_IMAGE_SIZE = 8
MAX_IMAGE_SIZE = 4096


def print_error(message: object) -> None:
    """``error: <message>`` on stderr: how every tool here reports bad input."""
    print(f"error: {message}", file=sys.stderr, flush=True)


class CliParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` that reports bad arguments as ``error: <message>`` and exits with status 2."""

    def error(self, message: str) -> NoReturn:
        print_error(message)
        print(f"(run {self.prog} --help for the options)", file=sys.stderr, flush=True)
        self.exit(EXIT_INPUT_ERROR)


def int_at_least(minimum: int, maximum: Optional[int] = None) -> Callable[[str], int]:
    """An argparse type: an integer in ``[minimum, maximum]``, with a clear message otherwise."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"expected an integer <= {maximum}, got {value}")
        return value

    return parse


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)
seed_int = int_at_least(0, MAX_SEED)
image_size_int = int_at_least(MIN_IMAGE_SIZE, MAX_IMAGE_SIZE)


def path_component(text: str) -> str:
    """An argparse type: a name that is one safe component of a path (a file stem or run name put
    inside an output folder): not empty, not ``.`` or ``..``, no path separator, no NUL, not hidden.
    ``../..`` or ``/etc/x`` would otherwise write outside the folder the command was given."""
    separators = {os.sep, "/"} | ({os.altsep} if os.altsep else set())
    if (
        not text
        or text in (".", "..")
        or text.startswith(".")
        or "\0" in text
        or any(separator in text for separator in separators)
    ):
        raise argparse.ArgumentTypeError(
            f"expected a plain name (letters, digits, '-', '_', no path separators and not starting with '.'), "
            f"got {text!r}"
        )
    return text


def finite_float(text: str) -> float:
    """An argparse type: a finite number."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """An argparse type: a finite number > 0."""
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def parse_device(text: str) -> torch.device:
    """``cpu``, ``cuda`` or ``cuda:N`` (or ``mps``), checked against what this machine has.

    Raises:
        ValueError: an unknown device string, or a device this machine does not have.
    """
    try:
        device = torch.device(text)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {text!r}; expected cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {text!r} was requested, but this machine has no usable CUDA device; use cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(f"device {text!r} does not exist: this machine has {count} CUDA device(s)")
        return device
    if device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"device {text!r} was requested, but MPS is not available on this machine")
        return device
    raise ValueError(f"unsupported device {text!r}; expected cpu, cuda or cuda:N")


def check_backend_usable(backend: str, device: torch.device) -> None:
    """Raise ``ValueError`` unless MoD blocks on ``backend`` can run on ``device``.

    The fused kernels (``triton``) run on CUDA, or on the CPU only under Triton's interpreter
    (``TRITON_INTERPRET=1`` set before :mod:`mod_kernels` is imported).
    """
    from ..backend import resolve_backend

    probe = torch.empty(1, 1, 1, 1, device=device)
    try:
        resolve_backend(backend, probe)
    except (RuntimeError, ImportError) as error:
        raise ValueError(f"--backend {backend} cannot run on {device}: {error}. Use --backend reference.") from None


def check_writable_folder(path: str | os.PathLike, *, flag: str = "--out") -> None:
    """Raise ``ValueError`` unless ``path`` is (or can be created as) a folder this process can write.

    Checks the nearest existing folder on the way to ``path`` by creating and removing a
    temporary file there, which also catches read-only file systems (``os.access`` does not,
    for root). Writes nothing that stays.
    """
    path = os.fspath(path)
    if not path:
        raise ValueError(f"{flag} must name a folder, got an empty path")
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{flag} {path!r} is a file, not a folder; choose a folder for the outputs")
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(f"{flag} {path!r} cannot be created: {existing!r} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".mod-write-test.", dir=existing)
    except OSError as error:
        reason = error.strerror or str(error)
        raise ValueError(f"{flag} {path!r} is not writable ({existing!r}: {reason})") from None
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(probe)
