"""Benchmarks of CNN Mixture-of-Depths: whole models and the fused kernels, on the machine at hand.

``python -m bench``, from the repository root, runs the short table on the device it finds (one MoD
variant per baseline family; ``--full`` for every variant, on a GPU with the kernel
microbenchmarks) and writes JSON, Markdown and a PNG under ``runs/bench/`` of the current
directory; ``bench/results/`` holds the project's published results, written only when asked
(``--out-dir bench/results``). ``python -m bench.gpu`` is the budgeted GPU script (tests
included). The benchmarks are part of the source tree, not of the installed package (like
torchvision's ``references/``): they measure the library and the checkout they sit in. The modules,
from the bottom up:

* :mod:`bench.env`       -- device, versions, date: the metadata stamped on every record.
* :mod:`bench.timing`    -- latency samples (CUDA events, ``triton.testing.do_bench``,
  ``torch.utils.benchmark``), medians with spread, CUDA-graph capture, copy bandwidth, time
  budgets, overall progress with an estimate of the time left.
* :mod:`bench.agreement` -- output comparison and the tolerances a speedup is conditional on.
* :mod:`bench.traffic`   -- the bytes each fused op must move (for GB/s).
* :mod:`bench.floors`    -- the identity floor and the static-selection floor of a MoD model.
* :mod:`bench.providers` -- who runs a model: reference / triton backend, eager / torch.compile.
* :mod:`bench.models`    -- the model table (paper's Tables 1-2 shape).
* :mod:`bench.training`  -- the model table's training-step rows: the training CLI's optimizer
  step, checked against the reference before it is timed, with its peak memory.
* :mod:`bench.kernels`   -- route+pack, scale+fuse, their backwards and the whole MoD block.
* :mod:`bench.records`   -- reading result records: status, agreement, derived ratios.
* :mod:`bench.report`    -- tables (console, Markdown), JSON, target checks;
  ``python -m bench.report FILE.json`` renders a result file again.
* :mod:`bench.plot`      -- the speedup PNG.
* :mod:`bench.cli`       -- ``python -m bench``; :mod:`bench.gpu` (``bash bench/gpu.sh``) -- the
  budgeted GPU run: kernels, models and the GPU tests in one call.
"""

RESULTS_SCHEMA = 1
