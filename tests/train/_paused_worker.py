"""A real training run that stops at a chosen point and waits until its stdin is closed
(launched by tests/train/test_train_robustness.py; not a test module).

``python tests/train/_paused_worker.py WHERE -- TRAIN_ARGS...`` runs ``mod_models.train.main``;
after ``RunFolder.prepare`` (``WHERE=prepare``: the run folder was just made) or after the first
``RunFolder.save_epoch`` (``WHERE=first-epoch``: epoch 1 is saved) it prints ``paused <pid>`` and
blocks until stdin is closed, then goes on. Its exit status is the training's.
"""

import os
import sys

from mod_models.train import loop as train_module
from mod_models.train.run_folder import RunFolder


def pause_after(method_name: str) -> None:
    original = getattr(RunFolder, method_name)
    paused = []

    def wrapper(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        if not paused:
            paused.append(True)
            print(f"paused {os.getpid()}", flush=True)
            sys.stdin.read()
        return result

    setattr(RunFolder, method_name, wrapper)


def main() -> None:
    where = sys.argv[1]
    pause_after({"prepare": "prepare", "first-epoch": "save_epoch"}[where])
    sys.exit(train_module.main(sys.argv[sys.argv.index("--") + 1 :]))


if __name__ == "__main__":
    main()
