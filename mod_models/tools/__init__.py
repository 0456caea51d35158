"""Command-line tools on the models and trained runs (each also a ``python -m`` module):

* :mod:`~mod_models.tools.export`: ``torch.export`` / ONNX export of a trained checkpoint, with an
  ONNX Runtime parity check and latency (``mod-export``);
* :mod:`~mod_models.tools.analysis`: which channels the routers pick, per block and class
  (``mod-analysis``);
* :mod:`~mod_models.tools.facts`: parameters and GMACs of every model (``mod-facts``);
* :mod:`~mod_models.tools.launch_plan` and :mod:`~mod_models.tools.compile_check`: every kernel
  launch the models make, recorded, and each one compiled for sm_80/sm_90 (no GPU needed);
* :mod:`~mod_models.tools.markdown`: the one Markdown-table writer of the reports.

They read what :mod:`mod_models.train` writes (checkpoints, data sets, its argument conventions);
nothing below them imports them.
"""

import importlib

# ``mod_models.tools.export`` etc. after ``import mod_models``, imported on first use.
_LAZY_SUBMODULES = ("analysis", "compile_check", "export", "facts", "launch_plan", "markdown")


def __getattr__(name: str):
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
