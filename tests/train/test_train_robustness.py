"""The training CLI under crashes, kills, interrupts and bad input: no run's files are ever lost or
torn, and every failure is an ``error: ...`` line with a documented exit status."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import warnings

import pytest
import torch
from _training import REPO_ROOT, ScriptedTop1, assert_same_tree, file_digest, tiny_config, without_timings

from mod_models.train import ConfigError, Progress, TrainConfig, evaluate, main, train, validate_config
from mod_models.train import checkpoint as checkpoint_module
from mod_models.train import loop as train_module
from mod_models.train.checkpoint import load_checkpoint

RUN_FILES = ["best.pt", "checkpoint.pt", "metrics.csv", "metrics.json"]
# Epoch 1 is the best, epoch 2 is worse: checkpoint.pt of epoch 2 must carry epoch 1's weights.
TOP1_SCRIPT = [60.0, 50.0]


def tiny_args(out, *extra):
    """CLI flags of a run that takes a few seconds: 16 px, 16 train / 16 val samples, one step per epoch."""
    return [
        "--out",
        str(out),
        "--image-size",
        "16",
        "--num-classes",
        "4",
        "--train-samples",
        "16",
        "--val-samples",
        "16",
        "--batch-size",
        "16",
        "--lr",
        "0.02",
        "--backend",
        "reference",
        "--device",
        "cpu",
        "--no-progress",
        *extra,
    ]


def snapshot_files(folder):
    return {name: file_digest(os.path.join(folder, name)) for name in sorted(os.listdir(folder))}


def recoverable_best(folder):
    """The best val top-1 whose weights the folder holds: in best.pt, or in the checkpoint's best record."""
    candidates = [-1.0]
    if os.path.exists(os.path.join(folder, "best.pt")):
        best = load_checkpoint(os.path.join(folder, "best.pt"))
        assert best["kind"] == "weights"
        candidates.append(best["history"][-1]["val_top1"])
    if os.path.exists(os.path.join(folder, "checkpoint.pt")):
        saved = load_checkpoint(os.path.join(folder, "checkpoint.pt"))
        assert saved["kind"] == "full"
        if "best" in saved:
            candidates.append(saved["best"]["val_top1"])
    return max(candidates)


def assert_same_outputs(reference, folder):
    """Same files as the reference run, no temporary leftovers, the same checkpoint and best weights."""
    assert sorted(os.listdir(folder)) == sorted(os.listdir(reference))
    for name in ("checkpoint.pt", "best.pt"):
        a, b = (torch.load(os.path.join(d, name), weights_only=True) for d in (reference, folder))
        for key in ("model", "epoch", "kind", "model_name", "classes"):
            assert_same_tree(a[key], b[key], f"{name}/{key}")
        assert_same_tree(without_timings(a["history"]), without_timings(b["history"]), f"{name}/history")
    ref_metrics, metrics = (json.loads(open(os.path.join(d, "metrics.json")).read()) for d in (reference, folder))
    assert without_timings(metrics["history"]) == without_timings(ref_metrics["history"])
    assert metrics["best_val_top1"] == ref_metrics["best_val_top1"] == max(TOP1_SCRIPT)


@pytest.fixture
def scripted(monkeypatch):
    script = ScriptedTop1(TOP1_SCRIPT, train_module.evaluate)
    monkeypatch.setattr(train_module, "evaluate", script)
    return script


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """The uninterrupted 2-epoch run with the scripted top-1 (epoch 1 best)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_module, "evaluate", ScriptedTop1(TOP1_SCRIPT, train_module.evaluate))
        assert main(tiny_args(out, "--epochs", "2", "--workers", "0")) == 0
    return out


class KillPoints:
    """Before every atomic replace into ``folder``, keep a copy of the folder as a kill at that moment
    leaves it: the files written so far, plus the temporary file of the write in progress, cut to
    half its size (killed mid-write)."""

    def __init__(self, folder, store, real_replace):
        self.folder = os.path.abspath(folder)
        self.store = store
        self.real_replace = real_replace
        self.points = []

    def replace(self, src, dst):
        if os.path.dirname(os.path.abspath(dst)) == self.folder:
            snapshot = self.store / f"{len(self.points):02d}-{os.path.basename(dst)}"
            shutil.copytree(self.folder, snapshot, copy_function=os.link)  # files are only ever replaced
            torn = snapshot / os.path.basename(src)
            data = torn.read_bytes()
            torn.unlink()
            torn.write_bytes(data[: len(data) // 2])
            self.points.append((snapshot, os.path.basename(dst)))
        return self.real_replace(src, dst)


def test_a_kill_at_any_write_keeps_the_best_weights_and_resumes_to_the_same_run(
    tmp_path, monkeypatch, scripted, reference_run
):
    """Kill the run at every write (checkpoint, best, metrics of every epoch), restart it, compare.

    After each kill the folder's checkpoint and best.pt load, the best top-1 whose weights it holds
    never goes down and equals the best of the completed epochs; the restarted run (``--resume``,
    or the same command when no checkpoint was written yet) ends with exactly the reference run's
    files, best weights included, and no temporary files.
    """
    out = tmp_path / "run"
    store = tmp_path / "kills"
    store.mkdir()
    kills = KillPoints(out, store, os.replace)
    monkeypatch.setattr(os, "replace", kills.replace)
    assert main(tiny_args(out, "--epochs", "2", "--workers", "0")) == 0
    monkeypatch.setattr(os, "replace", kills.real_replace)
    writes = [target for _, target in kills.points]
    assert writes.count("checkpoint.pt") == 2 and writes.count("best.pt") == 1, writes
    assert_same_outputs(reference_run, out)

    best_so_far = -1.0
    for snapshot, target in kills.points:
        where = f"killed while writing {target} ({snapshot.name})"
        on_disk = recoverable_best(snapshot)
        assert on_disk >= best_so_far, where
        best_so_far = on_disk
        checkpoint_path = snapshot / "checkpoint.pt"
        if checkpoint_path.exists():
            saved = load_checkpoint(checkpoint_path)
            assert on_disk == max(row["val_top1"] for row in saved["history"]), where
            scripted.epochs_done = saved["epoch"]
            status = main(["--out", str(snapshot), "--resume"])
        else:
            scripted.epochs_done = 0
            status = main(tiny_args(snapshot, "--epochs", "2", "--workers", "0"))
        assert status == 0, where
        assert_same_outputs(reference_run, snapshot)


def test_sigkill_during_the_first_best_write_then_resume(tmp_path, scripted):
    """The real thing: ``kill -9`` while best.pt is half written in epoch 1, then ``--resume``:
    best.pt ends up holding exactly the epoch-1 weights the killed process had saved."""
    out = tmp_path / "run"
    worker = os.path.join(REPO_ROOT, "tests", "train", "_kill_worker.py")
    env = {**os.environ, "PYTHONPATH": REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    command = [sys.executable, worker, "weights", ",".join(map(str, TOP1_SCRIPT)), "--"]
    killed = subprocess.run(
        command + tiny_args(out, "--epochs", "2", "--workers", "0"),
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    leftovers = [name for name in os.listdir(out) if name.endswith(".tmp")]
    assert len(leftovers) == 1 and leftovers[0].startswith(".best.pt."), os.listdir(out)
    assert not (out / "best.pt").exists()
    epoch_1 = load_checkpoint(out / "checkpoint.pt")
    assert epoch_1["epoch"] == 1

    scripted.epochs_done = 1
    assert main(["--out", str(out), "--resume"]) == 0
    assert sorted(os.listdir(out)) == RUN_FILES
    best = load_checkpoint(out / "best.pt")
    assert best["epoch"] == 1 and best["history"][-1]["val_top1"] == 60.0
    assert_same_tree(best["model"], epoch_1["model"], "best.pt")
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 2
    assert json.loads((out / "metrics.json").read_text())["best_val_top1"] == 60.0


def test_a_new_run_never_overwrites_another_runs_files(tmp_path, reference_run, capsys):
    """A folder with best.pt and metrics but no checkpoint.pt (e.g. a copy without it) is refused."""
    other = tmp_path / "other"
    shutil.copytree(reference_run, other)
    (other / "checkpoint.pt").unlink()
    before = snapshot_files(other)
    assert main(tiny_args(other, "--epochs", "1", "--workers", "0")) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: --out") and "not empty" in error and "best.pt" in error, error
    assert snapshot_files(other) == before
    # Resuming a checkpoint from elsewhere into that folder is refused too.
    assert main(["--resume", str(reference_run / "checkpoint.pt"), "--out", str(other)]) == 2
    assert "holds files of another run" in capsys.readouterr().err
    assert snapshot_files(other) == before


# ---------------------------------------------------------------------------------------------
# Bad input and failures: error lines, exit statuses, nothing written
# ---------------------------------------------------------------------------------------------


def test_capacity_that_leaves_no_channel_is_an_input_error(tmp_path, capsys):
    assert main(tiny_args(tmp_path / "out", "--capacity", "1000")) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: --capacity 1000 does not fit resnet18_mod") and "capacity <= 64" in error, error
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match="capacity"):
        validate_config(TrainConfig(model="mobilenet_v2_mod", capacity=25))  # its narrowest MoD block: 24


def test_seed_beyond_64_bits_is_an_input_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(tiny_args(tmp_path / "out", "--seed", str(2**64)))
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith("error: argument --seed: expected an integer <= ")
    with pytest.raises(ConfigError, match="seed"):
        validate_config(TrainConfig(seed=2**64))
    assert not (tmp_path / "out").exists()


def test_out_naming_a_file_is_an_input_error(tmp_path, capsys):
    target = tmp_path / "notes.txt"
    target.write_text("keep me")
    assert main(tiny_args(target)) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: --out") and "is a file, not a folder" in error, error
    assert target.read_text() == "keep me"


@pytest.fixture
def read_only_folder(tmp_path, monkeypatch):
    """An empty folder nobody may write. Root ignores permission bits, so for root the kernel's
    answer (EACCES on creating anything inside) is given by patched os.open / os.mkdir."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    inside = str(folder) + os.sep
    real_open, real_mkdir = os.open, os.mkdir

    def guarded_open(path, flags, *args, **kwargs):
        if os.path.abspath(os.fspath(path)).startswith(inside) and flags & os.O_CREAT:
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return real_open(path, flags, *args, **kwargs)

    def guarded_mkdir(path, *args, **kwargs):
        if os.path.abspath(os.fspath(path)).startswith(inside):
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", guarded_open)
    monkeypatch.setattr(os, "mkdir", guarded_mkdir)
    yield folder
    folder.chmod(0o755)


def test_read_only_out_is_refused_before_training(read_only_folder, capsys):
    assert main(tiny_args(read_only_folder, "--workers", "0")) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: --out") and "is not writable" in captured.err, captured.err
    assert "epoch 1/" not in captured.out  # refused before training, not after an epoch
    assert os.listdir(read_only_folder) == []
    assert main(tiny_args(read_only_folder / "sub" / "run", "--workers", "0")) == 2
    assert "is not writable" in capsys.readouterr().err


def _save_hook(monkeypatch, hook):
    """Route torch.save (as the atomic writer calls it) through ``hook(real_save, obj, handle)``."""
    real_save = torch.save
    monkeypatch.setattr(checkpoint_module.torch, "save", lambda obj, handle, **kw: hook(real_save, obj, handle))


def test_disk_full_keeps_the_previous_checkpoint(tmp_path, monkeypatch, capsys):
    def disk_full_in_epoch_2(real_save, obj, handle):
        if isinstance(obj, dict) and obj.get("kind") == "full" and obj["epoch"] == 2:
            handle.write(b"PK\x03\x04 the first bytes")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, handle)

    _save_hook(monkeypatch, disk_full_in_epoch_2)
    out = tmp_path / "run"
    assert main(tiny_args(out, "--epochs", "3", "--workers", "0")) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: could not write") and "No space left on device" in error, error
    assert "still holds epoch 1" in error and "--resume" in error
    assert "Traceback" not in error
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 1
    assert sorted(os.listdir(out)) == RUN_FILES  # no temporary file left


class _InterruptingFile:
    """A file wrapper that sends this process SIGINT ``times`` times once ``after`` bytes were written."""

    def __init__(self, handle, times, after=1 << 16):
        self.handle, self.times, self.after, self.written = handle, times, after, 0

    def write(self, data):
        self.written += len(data)
        if self.times and self.written > self.after:
            for _ in range(self.times):
                signal.raise_signal(signal.SIGINT)
            self.times = 0
        return self.handle.write(data)

    def flush(self):
        self.handle.flush()


@pytest.mark.parametrize("presses, saved_epoch", [(1, 2), (2, 1)], ids=["ctrl-c", "ctrl-c-twice"])
def test_ctrl_c_during_a_checkpoint_write(tmp_path, monkeypatch, capsys, presses, saved_epoch):
    """One Ctrl-C while the epoch-2 checkpoint is written lets that write finish; a second aborts it,
    keeping epoch 1's. Either way: the documented message, status 130, loadable files, no leftovers."""

    def interrupt_epoch_2(real_save, obj, handle):
        if isinstance(obj, dict) and obj.get("kind") == "full" and obj["epoch"] == 2:
            handle = _InterruptingFile(handle, presses)
        return real_save(obj, handle)

    _save_hook(monkeypatch, interrupt_epoch_2)
    out = tmp_path / "run"
    assert main(tiny_args(out, "--epochs", "3", "--workers", "0")) == 130
    error = capsys.readouterr().err
    assert "interrupted; " in error and "holds the last completed epoch" in error and "--resume" in error, error
    assert "Traceback" not in error and "RuntimeError" not in error
    saved = load_checkpoint(out / "checkpoint.pt")
    assert saved["epoch"] == saved_epoch
    assert load_checkpoint(out / "best.pt")["kind"] == "weights"
    assert sorted(os.listdir(out)) == RUN_FILES
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epochs_completed"] == saved_epoch  # the metrics match the checkpoint


@pytest.fixture(scope="module")
def one_epoch_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("one-epoch") / "run"
    train(tiny_config(out, epochs=1, train_samples=16, val_samples=16))
    return out


def _break_rng(checkpoint):
    checkpoint["rng"][0]["torch"] = torch.zeros(3, dtype=torch.uint8)


def _break_python_rng(checkpoint):
    checkpoint["rng"][0]["python"] = ("not", "a", "state")


@pytest.mark.parametrize(
    "damage, entry",
    [
        (lambda c: c.update(config=None), "'config'"),
        (lambda c: c.update(epoch="two"), "'epoch'"),
        (lambda c: c.update(history=[]), "'history'"),
        (lambda c: c.update(best={"epoch": 5, "val_top1": 1.0, "model": None}), "'best'"),
        (lambda c: c["config"].update(epochs="many"), "invalid setting"),
        (_break_rng, "RNG state of process 0"),
        (_break_python_rng, "RNG state of process 0"),
    ],
    ids=["config-none", "epoch-str", "history", "best", "config-value", "torch-rng", "python-rng"],
)
def test_a_damaged_checkpoint_is_named_and_nothing_is_written(one_epoch_run, tmp_path, capsys, damage, entry):
    run = tmp_path / "run"
    shutil.copytree(one_epoch_run, run)
    checkpoint = torch.load(run / "checkpoint.pt", weights_only=True)
    damage(checkpoint)
    torch.save(checkpoint, run / "checkpoint.pt")
    before = snapshot_files(run)
    assert main(["--out", str(run), "--resume", "--epochs", "2", "--workers", "0"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: checkpoint ") and entry in error, error
    assert snapshot_files(run) == before


# ---------------------------------------------------------------------------------------------
# Output a person can read
# ---------------------------------------------------------------------------------------------


def test_default_workers_fit_the_machine_and_logs_start_at_step_1(tmp_path, monkeypatch, capsys):
    """On 2 CPUs: 2 loader processes (no PyTorch warning about too many), a progress line at step 1,
    and no top-5 with 4 classes (in the log, metrics.csv and metrics.json)."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    args = tiny_args(tmp_path / "run", "--epochs", "1", "--train-samples", "64")
    args.remove("--no-progress")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(args) == 0
    assert not [w for w in caught if "worker" in str(w.message)], [str(w.message) for w in caught]
    out = capsys.readouterr().out
    assert "2 data workers" in out
    assert "epoch 1/1  step 1/4  loss" in out and "step 4/4" in out
    summary = [line for line in out.splitlines() if line.startswith("epoch 1/1  lr")]
    assert len(summary) == 1 and "val loss" in summary[0] and "top5" not in summary[0]
    header, row = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    assert dict(zip(header.split(","), row.split(",")))["val_top5"] == ""
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["history"][0]["val_top5"] is None
    # Under torchrun the CPUs are shared by the processes of the machine.
    assert TrainConfig().resolved_workers(world_size=2) == 1
    assert TrainConfig().resolved_workers(world_size=4) == 0
    assert TrainConfig(workers=3).resolved_workers(world_size=4) == 3


def test_progress_lines_come_at_the_first_step_then_by_time(capsys):
    now = [0.0]
    progress = Progress(300, "epoch 1/1", enabled=True, log_seconds=30.0, use_bar=False, clock=lambda: now[0])
    shown = []
    for step in range(1, 301):
        now[0] += 2.5  # seconds per step
        if progress.wants_update(step):
            shown.append(step)
            progress.update(step, {"loss": "1.0"})
    assert shown[:3] == [1, 13, 25] and shown[-1] == 300
    assert all(b - a == 12 for a, b in zip(shown[:-1], shown[1:-1]))  # every 30 s (12 steps of 2.5 s)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "epoch 1/1  step 1/300  loss 1.0" and len(lines) == len(shown)
    quiet = Progress(300, "x", enabled=False, log_seconds=30.0, use_bar=False)
    assert not any(quiet.wants_update(step) for step in (1, 100, 300))


class _Scores(torch.nn.Module):
    """Logits given by the test: sample i gets ``rows[i]``."""

    def __init__(self, rows):
        super().__init__()
        self.rows = rows

    def forward(self, x):
        return self.rows[x[:, 0, 0, 0].long()]


def test_evaluate_reports_top5_only_with_more_than_5_classes():
    info = train_module.DistInfo()
    targets = torch.tensor([0, 1, 2, 3])
    # Ten classes: sample 0 right at rank 1, sample 1 at rank 3, samples 2 and 3 at rank 7 (outside the top 5).
    rows = torch.zeros(4, 10)
    for sample, (target, rank) in enumerate(zip(targets.tolist(), (1, 3, 7, 7))):
        order = [c for c in range(10) if c != target]
        order.insert(rank - 1, target)
        rows[sample, order] = torch.arange(10, 0, -1, dtype=torch.float32)
    images = torch.arange(4, dtype=torch.float32).view(4, 1, 1, 1).expand(4, 3, 2, 2)
    loader = [(images, targets)]
    result = evaluate(_Scores(rows), loader, device=torch.device("cpu"), info=info, num_classes=10)
    assert result["top1"] == pytest.approx(25.0) and result["top5"] == pytest.approx(50.0)
    few = evaluate(_Scores(rows[:, :4]), [(images, targets)], device=torch.device("cpu"), info=info, num_classes=4)
    assert few["top5"] is None


def test_checkpoint_records_the_best_weights_when_the_last_epoch_is_not_the_best(reference_run):
    saved = load_checkpoint(reference_run / "checkpoint.pt")
    best = load_checkpoint(reference_run / "best.pt")
    assert saved["epoch"] == 2 and best["epoch"] == 1
    assert saved["best"]["epoch"] == 1 and saved["best"]["val_top1"] == 60.0
    assert_same_tree(saved["best"]["model"], best["model"], "best weights")
    assert not torch.equal(saved["model"]["fc.weight"], best["model"]["fc.weight"])


def test_an_interrupted_text_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "metrics.json"
    checkpoint_module.atomic_write_text(target, "old\n")

    def torn(handle):
        handle.write(b"ne")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        checkpoint_module._atomic_write(target, torn)
    assert target.read_text() == "old\n" and os.listdir(tmp_path) == ["metrics.json"]


def test_atomic_writes_create_files_as_open_would(tmp_path):
    """Not mkstemp's private 0600: metrics and checkpoints get the mode the umask gives new files."""
    umask = os.umask(0)
    os.umask(umask)
    checkpoint_module.atomic_write_text(tmp_path / "metrics.csv", "epoch\n")
    checkpoint_module.atomic_save({"epoch": 1}, tmp_path / "checkpoint.pt")
    for name in ("metrics.csv", "checkpoint.pt"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


def test_checkpoints_from_before_best_records_still_resume(tmp_path, reference_run, capsys):
    """Without a best record the best epoch comes from the history, its weights from best.pt; when
    best.pt is gone too, the run says that those weights are lost instead of inventing them."""
    run = tmp_path / "run"
    shutil.copytree(reference_run, run)
    checkpoint = torch.load(run / "checkpoint.pt", weights_only=True)
    del checkpoint["best"]
    torch.save(checkpoint, run / "checkpoint.pt")
    best_before = file_digest(run / "best.pt")
    assert main(["--out", str(run), "--resume"]) == 0
    assert "warning" not in capsys.readouterr().err
    assert file_digest(run / "best.pt") == best_before  # best.pt of epoch 1 recognised and kept

    (run / "best.pt").unlink()
    assert main(["--out", str(run), "--resume"]) == 0
    error = capsys.readouterr().err
    assert "warning: the best weights (epoch 1, val top-1 60.00%) are lost" in error, error
    assert not (run / "best.pt").exists()


def test_an_image_size_beyond_the_bound_is_an_input_error(tmp_path, capsys):
    """A million-pixel side would need terabytes per image (a MemoryError deep in the data set):
    refused by the argument parser, by validate_config and by the generated set, naming the bound."""
    with pytest.raises(SystemExit) as exit_info:
        main(tiny_args(tmp_path / "out", "--image-size", "1000000"))
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith("error: argument --image-size: expected an integer <= 4096, got 1000000")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match="image_size must be an int in \\[8, 4096\\], got 1000000"):
        validate_config(TrainConfig(image_size=1_000_000))
    from mod_models.train.data import SyntheticShapes

    with pytest.raises(ValueError, match="image_size must be <= 4096"):
        SyntheticShapes(4, image_size=4097)


# ---------------------------------------------------------------------------------------------
# One run per folder
# ---------------------------------------------------------------------------------------------


def _paused_run(where, out, *extra):
    """A real training process on ``out`` that pauses at ``where`` (see _paused_worker.py); returns
    ``(process, pid)`` once it has paused."""
    worker = os.path.join(REPO_ROOT, "tests", "train", "_paused_worker.py")
    env = {**os.environ, "PYTHONPATH": REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, worker, where, "--", *tiny_args(out, "--workers", "0", *extra)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    for line in process.stdout:
        if line.startswith("paused "):
            return process, int(line.split()[1])
    process.wait(timeout=60)
    raise AssertionError(f"the training process ended before pausing: {process.stderr.read()[-2000:]}")


def test_a_second_run_on_the_same_out_is_refused_while_the_first_runs(tmp_path, capsys):
    """Two runs started on one --out both finished with status 0, their files mixed. The first
    holds a lock on the folder; the second is refused (status 2) naming the first one's pid, and
    writes nothing; the first then finishes alone."""
    out = tmp_path / "run"
    first, pid = _paused_run("prepare", out, "--epochs", "1")
    try:
        before = snapshot_files(out)
        assert main(tiny_args(out, "--epochs", "1", "--workers", "0")) == 2
        error = capsys.readouterr().err
        assert error.startswith(f"error: --out {str(out)!r} is in use by another training run (pid {pid}"), error
        assert error.count("\n") == 1
        assert snapshot_files(out) == before
    finally:
        _, stderr = first.communicate(timeout=240)  # closes stdin: the first run goes on
    assert first.returncode == 0, stderr[-2000:]
    assert sorted(os.listdir(out)) == RUN_FILES  # the lock is gone with its run


def test_a_lock_left_by_a_killed_run_does_not_block_its_resume(tmp_path, capsys):
    """While the run lives, resuming it elsewhere is refused; once it is killed (its lock file left
    behind, naming a dead pid) the resume goes ahead and ends with the run's files only."""
    out = tmp_path / "run"
    first, pid = _paused_run("first-epoch", out, "--epochs", "2")
    assert main(["--out", str(out), "--resume", "--workers", "0"]) == 2
    assert f"in use by another training run (pid {pid}" in capsys.readouterr().err
    first.kill()  # SIGKILL: no chance to release anything
    first.communicate(timeout=60)
    leftovers = set(os.listdir(out)) - set(RUN_FILES)
    assert len(leftovers) == 1, os.listdir(out)  # the lock file, naming the dead process
    assert str(pid) in (out / leftovers.pop()).read_text()
    assert main(["--out", str(out), "--resume", "--workers", "0"]) == 0
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 2
    assert sorted(os.listdir(out)) == RUN_FILES


@pytest.mark.parametrize("name", ["../..", "..", ".", "", "a/b", "/etc/passwd", ".hidden", "a\0b"])
def test_a_name_that_is_not_one_safe_path_component_is_refused(name):
    """Names that the tools put inside an output folder (file stems, run names): ``../..`` would
    write outside it."""
    import argparse

    from mod_models.train.cli_args import path_component

    with pytest.raises(argparse.ArgumentTypeError, match="expected a plain name"):
        path_component(name)
    assert path_component("resnet18-short_2") == "resnet18-short_2"
