"""The files of one training run in its ``--out`` folder, written so that no crash loses them.

``checkpoint.pt`` (everything needed to resume), ``best.pt`` (weights of the best validation
top-1), ``metrics.csv`` and ``metrics.json``. The checkpoint is the source of truth: it records
the best epoch, its top-1 and, when that epoch is not its own, the best weights. After every
epoch the files are written in the order checkpoint, best, metrics, each atomically
(:func:`mod_models.train.checkpoint.atomic_save`) and with Ctrl-C held until they are all written.
A run killed at any point therefore leaves a loadable checkpoint whose best record is never
behind ``best.pt``; on resume, :meth:`RunFolder.restore` removes the temporary files a killed
write left behind and rewrites ``best.pt`` and the metrics from the checkpoint where they are
missing or behind.

:class:`RunLock` keeps a second run off a folder while one is writing it: the run holds an
exclusive lock on ``.mod-train.lock`` (which names its pid) from the moment it starts writing
until it ends; the kernel releases the lock when a process dies, so a killed run never blocks the
next one.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional

try:
    import fcntl
except ImportError:  # not a POSIX system: no flock
    fcntl = None  # type: ignore[assignment]

from torch import Tensor, nn

from .checkpoint import (
    CHECKPOINT_FORMAT,
    CheckpointError,
    atomic_save,
    atomic_write_text,
    interrupts_deferred,
    load_checkpoint,
    stale_temporary_files,
)
from .cli_args import check_writable_folder
from .config import CHECKPOINT_NAME, ConfigError, TrainConfig

BEST_NAME = "best.pt"
METRICS_CSV = "metrics.csv"
METRICS_JSON = "metrics.json"
RUN_FILES = (CHECKPOINT_NAME, BEST_NAME, METRICS_CSV, METRICS_JSON)
LOCK_NAME = ".mod-train.lock"
METRIC_COLUMNS = (
    "epoch",
    "lr",
    "train_loss",
    "train_top1",
    "val_loss",
    "val_top1",
    "val_top5",
    "train_images_per_s",
    "epoch_seconds",
)


class OutputError(RuntimeError):
    """The run folder could not be written (disk full, folder removed, ...); what is on disk stays loadable."""


def _listing(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} entries)" if len(names) > limit else "")


def check_run_folder(out_dir: str, *, resume: Optional[str], locked: bool = False) -> None:
    """Raise unless ``out_dir`` can take this run's files without overwriting another run's.

    A new run needs a new or empty folder; a resumed run the folder of the checkpoint it
    continues, or a new or empty one. Temporary files left by a killed write do not count (they
    are removed when the run starts). The folder must be writable (checked by writing a probe file),
    and no other run may hold its lock (:class:`RunLock`; ``locked``: this process holds it).

    Raises:
        ConfigError: ``out_dir`` is a file, not writable, in use by another run, or holds files of another run.
        CheckpointError: ``out_dir`` holds a checkpoint this run would overwrite.
    """
    try:
        check_writable_folder(out_dir)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if not os.path.isdir(out_dir):
        return  # created when the run starts
    if not locked:
        RunLock(out_dir).check_free()
    stale = {os.path.basename(path) for path in stale_temporary_files(out_dir, RUN_FILES)} | {LOCK_NAME}
    entries = sorted(set(os.listdir(out_dir)) - stale)
    checkpoint_path = os.path.join(out_dir, CHECKPOINT_NAME)
    if resume is not None:
        if os.path.exists(checkpoint_path):
            if os.path.samefile(checkpoint_path, resume):
                return
            raise CheckpointError(
                f"{checkpoint_path!r} already exists and is not the checkpoint being resumed; choose another --out"
            )
        if entries:
            raise ConfigError(
                f"--out {out_dir!r} holds files of another run ({_listing(entries)}) that the resumed run would "
                "overwrite; choose a new or empty folder"
            )
        return
    if os.path.exists(checkpoint_path):
        raise CheckpointError(
            f"{checkpoint_path!r} already exists; pass --resume to continue that run or choose another --out"
        )
    if entries:
        raise ConfigError(
            f"--out {out_dir!r} is not empty ({_listing(entries)}): a new run would overwrite another run's "
            "files; choose a new or empty folder"
        )


class RunLock:
    """The exclusive lock a training run holds on its ``--out`` folder while it writes there.

    ``flock`` on ``<out>/.mod-train.lock``, whose content is the holder's pid (for the message a
    refused run prints). The kernel drops the lock with its process, so the file a killed run
    leaves behind (naming a dead pid) does not block anyone; :meth:`release` removes the file.
    Without ``fcntl`` (not a POSIX system) runs are not locked.
    """

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir
        self.path = os.path.join(out_dir, LOCK_NAME)
        self._fd: Optional[int] = None

    def _busy(self) -> ConfigError:
        try:
            with open(self.path, encoding="utf-8") as handle:
                pid = handle.read().strip() or "unknown"
        except OSError:
            pid = "unknown"
        return ConfigError(
            f"--out {self.out_dir!r} is in use by another training run (pid {pid}, lock {self.path}); "
            "wait for it to end, or choose another --out"
        )

    def check_free(self) -> None:
        """Raise :class:`ConfigError` naming the holder when another run holds the lock (writes nothing)."""
        if fcntl is None:
            return
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return  # no lock file: nobody holds it
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise self._busy() from None
        finally:
            os.close(fd)

    def acquire(self) -> None:
        """Take the lock (creating the folder if needed) and write this process's pid into it.

        Raises:
            ConfigError: another run holds it, or the folder or the lock file cannot be written.
        """
        if fcntl is None:
            return
        try:
            os.makedirs(self.out_dir, exist_ok=True)
            while True:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    raise self._busy() from None
                # The previous holder removes the file when it ends; if it did so between our open
                # and flock, we hold a lock on a removed file: open the new one instead.
                try:
                    current = os.stat(self.path)
                except FileNotFoundError:
                    current = None
                if current is not None and os.path.samestat(os.fstat(fd), current):
                    break
                os.close(fd)
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except OSError as error:
            raise ConfigError(f"cannot lock --out {self.out_dir!r}: {error.strerror or error}") from None
        self._fd = fd

    def locked(self, resume: Optional[str]) -> None:
        """:meth:`acquire`, then :func:`check_run_folder` again (the folder may have changed between
        the first check and the lock); on failure nothing stays locked."""
        self.acquire()
        try:
            check_run_folder(self.out_dir, resume=resume, locked=True)
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        """Remove the lock file and drop the lock (idempotent)."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        os.close(self._fd)
        self._fd = None


@dataclass
class BestWeights:
    """The best validation epoch so far: its number, top-1 (percent) and weights (CPU tensors)."""

    epoch: int
    val_top1: float
    state: dict[str, Tensor]

    @classmethod
    def snapshot(cls, epoch: int, val_top1: float, model: nn.Module) -> "BestWeights":
        """A copy of ``model``'s weights now (the training loop goes on changing the model)."""
        state = {name: tensor.detach().to("cpu", copy=True) for name, tensor in model.state_dict().items()}
        return cls(epoch, float(val_top1), state)

    def record(self, checkpoint_epoch: int) -> dict[str, Any]:
        """The checkpoint's ``best`` entry; the weights are left out when they are the checkpoint's own."""
        return {
            "epoch": self.epoch,
            "val_top1": self.val_top1,
            "model": None if self.epoch == checkpoint_epoch else self.state,
        }


def best_from_checkpoint(checkpoint: dict, best_path: str) -> tuple[Optional[BestWeights], Optional[str]]:
    """The best weights a (validated) full checkpoint holds: ``(best, warning)``.

    Checkpoints written before best records existed are read from their history, with the
    weights taken from the checkpoint (best epoch = last epoch) or from ``best_path``; when
    neither has them, ``best`` is None and ``warning`` says so.
    """
    record = checkpoint.get("best")
    if record is not None:
        state = record["model"] if record["model"] is not None else checkpoint["model"]
        return BestWeights(record["epoch"], float(record["val_top1"]), state), None
    history = checkpoint["history"]
    if not history:
        return None, None
    best_index = max(range(len(history)), key=lambda index: history[index]["val_top1"])
    epoch, top1 = best_index + 1, float(history[best_index]["val_top1"])
    if epoch == checkpoint["epoch"]:
        return BestWeights(epoch, top1, checkpoint["model"]), None
    try:
        saved = load_checkpoint(best_path)
    except CheckpointError:
        saved = None
    if saved is not None and saved["kind"] == "weights" and saved["epoch"] == epoch:
        return BestWeights(epoch, top1, saved["model"]), None
    return None, (
        f"the best weights (epoch {epoch}, val top-1 {top1:.2f}%) are lost: the checkpoint predates best-weight "
        f"records and {best_path} does not hold them; best.pt will hold the best epoch from now on"
    )


class RunFolder:
    """Writes (and repairs) the files of one run; only the main process of a run uses it."""

    def __init__(
        self, out_dir: str, config: TrainConfig, num_classes: int, classes: list[str], world_size: int
    ) -> None:
        self.out_dir = out_dir
        self.config = config
        self.num_classes = num_classes
        self.classes = list(classes)
        self.world_size = world_size
        self.checkpoint_path = os.path.join(out_dir, CHECKPOINT_NAME)
        self.best_path = os.path.join(out_dir, BEST_NAME)
        self.init: Optional[dict[str, Any]] = None  # what --init loaded (kept in checkpoints and metrics.json)

    def payload(self, state: dict[str, Tensor], epoch: int, history: list[dict], kind: str) -> dict[str, Any]:
        """A checkpoint dict (see :mod:`mod_models.train.checkpoint`) of weights ``state`` after ``epoch`` epochs."""
        return {
            "format": CHECKPOINT_FORMAT,
            "kind": kind,
            "model_name": self.config.model,
            "model_kwargs": self.config.model_kwargs(self.num_classes),
            "model": state,
            "epoch": epoch,
            "classes": list(self.classes),
            "config": asdict(self.config),
            "history": [dict(row) for row in history if row["epoch"] <= epoch],
            **({"init": self.init} if self.init is not None else {}),
        }

    def prepare(self, log: Callable[[str], None]) -> None:
        """Create the folder and remove the temporary files a killed write left behind."""
        try:
            os.makedirs(self.out_dir, exist_ok=True)
            stale = stale_temporary_files(self.out_dir, RUN_FILES)
            for path in stale:
                os.unlink(path)
        except OSError as error:
            raise OutputError(f"cannot prepare --out {self.out_dir!r}: {error.strerror or error}") from None
        if stale:
            log(f"removed {len(stale)} temporary file(s) left by an interrupted write: {_listing(stale)}")

    def restore(self, history: list[dict], best: Optional[BestWeights], log: Callable[[str], None]) -> None:
        """On resume: rewrite ``best.pt`` (when missing, unreadable or of another epoch) and the metrics."""
        with interrupts_deferred():
            if best is not None and not self._best_file_matches(best):
                self._write(self.best_path, self._best_payload(best, history), kept=len(history))
                log(f"restored {BEST_NAME} (epoch {best.epoch}, val top-1 {best.val_top1:.2f}%) from the checkpoint")
            self._write_metrics(history, best, kept=len(history))

    def save_epoch(
        self,
        state: dict[str, Tensor],
        training_state: dict[str, Any],
        history: list[dict],
        best: BestWeights,
        best_improved: bool,
    ) -> None:
        """After an epoch: checkpoint (with the best record), then best.pt when it improved, then the metrics.

        Ctrl-C is held until all three are written. Raises :class:`OutputError` when a write fails
        (the files on disk stay as they were before that write).
        """
        epoch = len(history)
        checkpoint = self.payload(state, epoch, history, "full")
        checkpoint.update(training_state, best=best.record(epoch))
        with interrupts_deferred():
            self._write(self.checkpoint_path, checkpoint, kept=epoch - 1)
            if best_improved:
                self._write(self.best_path, self._best_payload(best, history), kept=epoch)
            self._write_metrics(history, best, kept=epoch)

    # -- helpers ---------------------------------------------------------------------------------

    def _best_payload(self, best: BestWeights, history: list[dict]) -> dict[str, Any]:
        return self.payload(best.state, best.epoch, history, "weights")

    def _best_file_matches(self, best: BestWeights) -> bool:
        if not os.path.exists(self.best_path):
            return False
        try:
            saved = load_checkpoint(self.best_path)
        except CheckpointError:
            return False
        history = saved.get("history")
        return (
            saved["kind"] == "weights"
            and saved["epoch"] == best.epoch
            and isinstance(history, list)
            and bool(history)
            and isinstance(history[-1], dict)
            and history[-1].get("val_top1") == best.val_top1
        )

    def _write_metrics(self, history: list[dict], best: Optional[BestWeights], *, kept: int) -> None:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(METRIC_COLUMNS), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(history)
        summary = {
            "model": self.config.model,
            "config": asdict(self.config),
            "classes": self.classes,
            "world_size": self.world_size,
            "epochs_completed": len(history),
            "best_epoch": best.epoch if best is not None else None,
            "best_val_top1": best.val_top1 if best is not None else None,
            "init": self.init,
            "history": history,
        }
        self._write(os.path.join(self.out_dir, METRICS_CSV), buffer.getvalue(), kept=kept)
        self._write(os.path.join(self.out_dir, METRICS_JSON), json.dumps(summary, indent=2) + "\n", kept=kept)

    def _write(self, path: str, content: Any, *, kept: int) -> None:
        """Atomically write ``content`` (text or a checkpoint dict); an OSError becomes :class:`OutputError`."""
        try:
            if isinstance(content, str):
                atomic_write_text(path, content)
            else:
                atomic_save(content, path)
        except OSError as error:
            reason = error.strerror or str(error)
            if kept > 0:
                state = (
                    f"{self.checkpoint_path} still holds epoch {kept} and the best weights; free some space "
                    f"(or fix the folder), then continue with --resume"
                )
            else:
                state = "no epoch was saved yet; free some space (or fix the folder) and start the run again"
            raise OutputError(f"could not write {path}: {reason}. {state}") from None
