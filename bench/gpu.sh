#!/usr/bin/env bash
# The GPU check in one call: kernel microbenchmarks, the model table (inference, then training
# steps) and the GPU tests, in a 375 s budget on one H100/H200. Results (JSON, Markdown, PNG,
# pytest.log, gpu.log) go to the folder given as first argument, else $OUT, else runs/bench
# (git-ignored). Further arguments go to
# `python -m bench.gpu` (e.g. --dry-run, --budget 300, --sections kernels models).
#
#   bash bench/gpu.sh "$OUT"              # on the device machine
#   MOD_BENCH_COMMIT=<hash> bash bench/gpu.sh "$OUT"   # where the copy's git metadata is stale
#   bash bench/gpu.sh /tmp/dry --dry-run  # rehearsal with tiny shapes, any machine
set -uo pipefail
out_dir="${1:-${OUT:-runs/bench}}"
shift || true
mkdir -p "$out_dir"
out_dir="$(cd "$out_dir" && pwd)"  # a relative folder is the caller's, not the repository's
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 -m bench.gpu --out-dir "$out_dir" "$@" 2>&1 | tee "$out_dir/gpu.log"
exit "${PIPESTATUS[0]}"
