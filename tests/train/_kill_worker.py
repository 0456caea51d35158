"""A training run that kills itself with SIGKILL halfway through writing one of its files
(launched by tests/train/test_train_robustness.py; not a test module).

``python tests/train/_kill_worker.py KIND SCRIPT -- TRAIN_ARGS...`` runs ``mod_models.train.main``
with the validation top-1 of each epoch taken from ``SCRIPT`` (comma-separated percentages) and
dies, like ``kill -9``, after writing half of the first checkpoint of kind ``KIND`` (``full``:
checkpoint.pt, ``weights``: best.pt) to its temporary file.
"""

import io
import os
import signal
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: _training

from _training import ScriptedTop1  # noqa: E402

from mod_models.train import loop as train_module  # noqa: E402


def main() -> None:
    kind, script = sys.argv[1], [float(value) for value in sys.argv[2].split(",")]
    train_args = sys.argv[sys.argv.index("--") + 1 :]
    real_save = torch.save

    def save_then_die(obj, handle, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("kind") == kind:
            buffer = io.BytesIO()
            real_save(obj, buffer, *args, **kwargs)
            handle.write(buffer.getvalue()[: buffer.tell() // 2])
            handle.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return real_save(obj, handle, *args, **kwargs)

    torch.save = save_then_die
    train_module.evaluate = ScriptedTop1(script, train_module.evaluate)
    sys.exit(train_module.main(train_args))


if __name__ == "__main__":
    main()
