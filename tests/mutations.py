"""Check that the test suite can fail: put deliberate bugs back, one at a time, and run the tests
that must catch each.

Usage (from the repository root; each mutant runs in a temporary copy of the tracked files, the
working tree is never touched)::

    python tests/mutations.py              # every mutant: CAUGHT or SURVIVED, exit 1 if one survived
    python tests/mutations.py --list       # the mutants and the tests that must catch them
    python tests/mutations.py --only relu-drops-nan spatial-offset-swaps-strides

When you change a kernel, add the bug you were most afraid of here with the tests that catch it,
and run it once: a test that never failed has not shown it can. The whole list takes a few minutes
on 2 CPU cores (the selections are small; the Triton interpreter runs the kernels).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str  # file the bug goes into, relative to the repository root
    original: str  # text that must occur exactly once
    mutated: str
    tests: tuple[str, ...]  # pytest arguments that must fail with the bug
    what: str
    more: tuple[tuple[str, str, str], ...] = ()  # further (path, original, mutated) edits of the same bug


MUTANTS = (
    Mutant(
        "pool-drops-last-chunk", "mod_kernels/fused_route_pack.py",
        "return partial[:, 0] if chunks == 1 else partial.sum(dim=1)",
        "return partial[:, 0] if chunks == 1 else partial[:, :-1].sum(dim=1)",
        ("tests/test_kernel_paths.py", "-k", "route_pack_pools"),
        "the pooled mean loses the last chunk of H x W",
    ),
    Mutant(
        "deploy-pool-drops-last-chunk", "mod_kernels/fused_block.py",
        "partial, fc2_weight, scores, x, snapshot, batch, channels, c_hidden, chunks * c_blocks, per_program,",
        ("partial, fc2_weight, scores, x, snapshot, batch, channels, c_hidden, max(1, chunks - 1) * c_blocks, "
         "per_program,"),
        ("tests/test_kernel_paths.py", "-k", "deployed_block_pools"),
        "the deployed router sums the partial hidden vectors of all chunks but the last",
    ),
    Mutant(
        "spatial-offset-swaps-strides", "mod_kernels/_utils.py",
        "return (hw // W) * stride_h + (hw % W) * stride_w",
        "return (hw // W) * stride_w + (hw % W) * stride_h",
        ("tests/test_kernel_paths.py", "-k", "non_flat"),
        "non-flat H x W addressed with the H and W strides swapped",
    ),
    Mutant(
        "inplace-rounds-product", "mod_kernels/fused_scale_fuse.py",
        "    fused += scale[:, None] * tl.load(y_at, mask=mask, other=0.0).to(tl.float32)\n",
        ("    fused += (scale[:, None] * tl.load(y_at, mask=mask, other=0.0).to(tl.float32))"
         ".to(x_ptr.dtype.element_ty).to(tl.float32)\n"),
        ("tests/test_kernel_paths.py", "-k", "low_precision_in_place_fusion"),
        "the in-place kernel rounds w * y to the input dtype before the add",
    ),
    Mutant(
        "reference-fuses-in-low-precision", "mod_models/functional.py",
        "compute_dtype = torch.promote_types(x.dtype, torch.float32)",
        "compute_dtype = x.dtype",
        ("tests/test_kernel_paths.py", "-k", "rounds_once"),
        "the reference fusion computes in fp16/bf16 instead of fp32",
    ),
    Mutant(
        "relu-drops-nan", "mod_kernels/_utils.py",
        "    return tl.where(x < 0.0, 0.0, x)\n",
        "    return tl.maximum(x, 0.0)\n",
        ("tests/test_safety.py", "-k", "nan"),
        "the fused ReLU turns NaN into 0",
    ),
    Mutant(
        "in-place-write-hidden-from-autograd", "mod_kernels/fused_scale_fuse.py",
        "    torch.autograd.graph.increment_version(x)\n\n\ndef launch_fuse_copy(",
        "\n\ndef launch_fuse_copy(",
        ("tests/test_safety.py", "-k", "saved_tensor_modified"),
        "an in-place kernel write does not bump the version counter",
    ),
    Mutant(
        "fused-block-reads-overwritten-targets", "mod_kernels/fused_block.py",
        "        from_snapshot = valid & (snapshot_slot >= 0) & (snapshot_slot < K)\n",
        "        from_snapshot = valid & (snapshot_slot < -C)\n",
        ("tests/test_deploy.py", "-k", "equals_the_unfolded and float32 and not original"),
        "the fused block reads selected target channels from x, which other programs already wrote",
    ),
    Mutant(
        "fused-block-pads-with-bias", "mod_kernels/fused_block.py",
        "        h1 = tl.where(m_mask[:, None] & inside[None, :], h1, 0.0)  # conv2 pads h1 with zeros\n",
        "        h1 = tl.where(m_mask[:, None], h1, 0.0)\n",
        ("tests/test_deploy.py", "-k",
         "(equals_the_unfolded or extreme_widths) and bottleneck and not float16 and not bfloat16"),
        "the bottleneck's 3x3 convolution pads its input with relu(b1) instead of zeros",
    ),
    Mutant(
        "fused-block-forgets-the-score", "mod_kernels/fused_block.py",
        "    fused = residual.to(tl.float32) + w[:, None] * y\n",
        "    fused = residual.to(tl.float32) + y\n",
        ("tests/test_deploy.py", "-k", "equals_the_unfolded and float32"),
        "the fused block adds f_k without scaling it by the router score",
    ),
    Mutant(
        "resume-skips-numpy-rng", "mod_models/train/seeding.py",
        """    np_state = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            np_state["key"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
""",
        "",
        ("tests/train/test_train.py", "-k", "restores_the_python_and_numpy_random_state"),
        "a resumed run restores torch's random state but not NumPy's",
    ),
    Mutant(
        "resume-skips-python-rng", "mod_models/train/seeding.py",
        "    random.setstate((python_state[0], tuple(python_state[1]), python_state[2]))\n",
        "",
        ("tests/train/test_train.py", "-k", "restores_the_python_and_numpy_random_state"),
        "a resumed run restores torch's random state but not Python's",
    ),
    Mutant(
        "atomic-write-renames-before-fsync", "mod_models/train/checkpoint.py",
        "            handle.flush()\n            os.fsync(handle.fileno())\n",
        "            handle.flush()\n",
        ("tests/train/test_train.py", "-k", "reach_the_disk_before_the_rename"),
        "the atomic checkpoint write renames the temporary file without flushing it to disk first",
    ),
    Mutant(
        "deploy-router-batch-tile-offset", "mod_kernels/fused_block.py",
        "    b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)\n",
        "    b = tl.program_id(0) * (BLOCK_B // 2) + tl.arange(0, BLOCK_B)\n",
        ("tests/test_deploy.py", "-k", "several_router_tiles"),
        "the deployed router's batch tiles start BLOCK_B / 2 samples apart: the last samples get no scores",
    ),
    Mutant(
        "deploy-pool-batch-tile-offset", "mod_kernels/fused_block.py",
        "    first = b_block * BLOCK_B\n",
        "    first = b_block * (BLOCK_B // 2)\n",
        ("tests/test_deploy.py", "-k", "several_router_tiles"),
        "the deployed pooling kernel's batch tiles start BLOCK_B / 2 samples apart: the last samples are never pooled",
    ),
    Mutant(
        "fused-plan-rejects-4096-channels", "mod_kernels/fused_block.py",
        "    if channels > MAX_FUSED_CHANNELS:\n",
        "    if channels >= MAX_FUSED_CHANNELS:\n",
        ("tests/test_deploy.py", "-k", "channel_limit or 4096"),
        "the dispatch rule sends a C = 4096 block (inside the documented rule) to the fallback",
    ),
    Mutant(
        "folded-bias-kept-in-fp32", "mod_models/deploy.py",
        "        conv.bias = nn.Parameter(bias.to(device=device, dtype=dtype), requires_grad=False)\n",
        "        conv.bias = nn.Parameter(bias.to(device=device, dtype=torch.float32), requires_grad=False)\n",
        ("tests/test_deploy.py", "-k", "reference_deploy"),
        "folding keeps the new bias in fp32 in an fp16/bf16 model",
    ),
    *(Mutant(
        f"deployed-kernel-reads-a-stale-copy-{case}", "mod_models/blocks.py",
        "        params = folded.packed_weights(self)\n",
        "        params = self._packed_copy\n",
        ("tests/test_deploy.py", "-k", test),
        f"the fused kernel reads a copy of the packed weights made by the deploy step ({what})",
        (("mod_models/deploy.py", "                pack_reduced_block(module, convs)\n",
          "                pack_reduced_block(module, convs)\n"
          "                module._packed_copy = module.packed_weights.detach().clone()\n"),),
    ) for case, test, what in (
        ("data-edit", "changed_in_place_after_a_forward and triton", "weights changed through .data"),
        ("reused-address", "old_weights_address and triton", "a new weight at the old one's address"),
        ("compiled-load", "load_state_dict_into_a_compiled and triton", "load_state_dict after torch.compile"),
    )),
    Mutant(
        "native-views-keyed-by-the-parameter-object", "mod_models/folded.py",
        "    key = None if packed is None else (packed.data_ptr(), packed.dtype, packed.device, packed.shape)\n",
        "    key = None if packed is None else (id(packed),)\n",
        ("tests/test_deploy.py", "-k", "packed_weights_replaced and native"),
        "the native path keeps views of packed_weights while the parameter object is the same, missing a rebound .data",
    ),
    Mutant(
        "input-gradient-drops-the-pooled-term", "mod_kernels/fused_route_pack.py",
        "        grad += tl.load(grad_pool_ptr + b * C + c, mask=c_mask, other=0.0)[:, None]\n",
        "        grad += 0.0 * tl.load(grad_pool_ptr + b * C + c, mask=c_mask, other=0.0)[:, None]\n",
        ("tests/test_kernel_sweep.py", "-k", "test_every_block_path and bfloat16"),
        "the block input's gradient misses the router's pooling term (caught by the derived bf16 bound alone)",
    ),
    Mutant(
        "ties-go-to-the-higher-channel", "mod_kernels/fused_route_pack.py",
        "    keys = (ordered.to(tl.int64) << 32) | (C - 1 - c).to(tl.int64)\n",
        "    keys = (ordered.to(tl.int64) << 32) | c.to(tl.int64)\n",
        ("tests/test_kernels.py", "-k", "tie"),
        "equal scores select the higher channel first",
    ),
    Mutant(
        "timm-resnet-dropout-in-eval", "mod_models/integrations/timm.py",
        "x = F.dropout(x, p=self.drop_rate, training=self.training)",
        "x = F.dropout(x, p=self.drop_rate, training=True)",
        ("tests/integrations/test_timm.py", "-k", "drop_rate_is_off_in_eval_mode and resnet"),
        "a timm MoD ResNet's classifier dropout stays on in eval mode",
    ),
    Mutant(
        "timm-mobilenet-dropout-in-eval", "mod_models/integrations/timm.py",
        "        x = self.global_pool(x)\n",
        "        x = F.dropout(self.global_pool(x), p=self.drop_rate, training=True)\n",
        ("tests/integrations/test_timm.py", "-k", "drop_rate_is_off_in_eval_mode and mobilenet"),
        "a timm MoD MobileNetV2 drops features before its classifier in eval mode",
    ),
    Mutant(
        "native-drops-last-tile", "mod_kernels/native_block.cpp",
        "for_items(B * n_tiles, work, [&](int64_t item) {",
        "for_items(B * n_tiles - 1, work, [&](int64_t item) {",
        ("tests/test_native_block.py", "-k", "odd_spatial_sizes and bottleneck"),
        "the native block skips the last row tile of the last sample",
    ),
    Mutant(
        "native-ties-to-higher-channel", "mod_kernels/native_block.cpp",
        "inline int64_t tie_rank(int64_t channel, int64_t channels) { return channels - 1 - channel; }",
        "inline int64_t tie_rank(int64_t channel, int64_t channels) { return channel; }",
        ("tests/test_native_block.py", "-k", "ties"),
        "the native top-k breaks score ties towards the higher channel",
    ),
    Mutant(
        "native-halo-padded-with-bias", "mod_kernels/native_block.cpp",
        "  zero_pad_columns(t1.data + first, t1.stride, m, hi - lo, pitch, d, W);\n",
        "",
        ("tests/test_native_block.py", "-k", "equals_the_unfolded and bottleneck and float32"),
        "the native bottleneck's 3x3 convolution reads relu(bias) instead of zeros in its left/right padding",
    ),
    Mutant(
        "native-relu-drops-nan", "mod_kernels/native_block.cpp",
        "inline float relu_keep_nan(float v) { return v < 0.f ? 0.f : v; }",
        "inline float relu_keep_nan(float v) { return std::max(0.f, v); }",
        ("tests/test_native_block.py", "-k", "nan_inf_and_ties"),
        "the native kernel's ReLU turns NaN into 0 (std::max) instead of keeping it like torch.relu",
    ),
    Mutant(
        "training-check-ignores-updates", "bench/training.py",
        "        if err > update_tolerance:\n            beyond += 1\n",
        "        if err > update_tolerance and False:\n            beyond += 1\n",
        ("tests/test_bench_training.py", "-k", "skip_the_router_or_f_k"),
        "the training-step check passes a provider whose optimizer updates differ (a skipped backward)",
    ),
)


def _tracked_files() -> list[str]:
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=True)
    return [line for line in listed.stdout.splitlines() if line]


def run_mutant(mutant: Mutant, files: list[str]) -> tuple[bool, float, str]:
    """``(caught, seconds, last output lines)`` of the mutant's tests in a mutated copy."""
    with tempfile.TemporaryDirectory(prefix=f"mutant-{mutant.name}-") as tmp:
        for name in files:
            target = Path(tmp) / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, target)
        for path, original, mutated in ((mutant.path, mutant.original, mutant.mutated), *mutant.more):
            source = Path(tmp) / path
            text = source.read_text()
            if text.count(original) != 1:
                raise SystemExit(f"{mutant.name}: the original text occurs {text.count(original)} times in "
                                 f"{path}; update the mutant to the current code")
            source.write_text(text.replace(original, mutated))
        env = dict(os.environ, PYTHONPATH=tmp)
        start = time.perf_counter()
        result = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:warnings", "-p", "no:cacheprovider", *mutant.tests],
            cwd=tmp, env=env, capture_output=True, text=True,
        )
        seconds = time.perf_counter() - start
    tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-3:])
    caught = result.returncode not in (0, 5)  # 5: no tests collected, which catches nothing
    return caught, seconds, tail


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--list", action="store_true", help="list the mutants and their tests")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these mutants")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTANTS if not args.only or m.name in args.only]
    unknown = set(args.only or ()) - {m.name for m in MUTANTS}
    if unknown:
        parser.error(f"unknown mutants: {sorted(unknown)}")
    if args.list:
        for m in chosen:
            print(f"{m.name}: {m.what}\n    {m.path}; caught by: pytest {' '.join(m.tests)}")
        return 0
    files = _tracked_files()
    survived = 0
    for mutant in chosen:
        caught, seconds, tail = run_mutant(mutant, files)
        survived += not caught
        print(f"{'CAUGHT  ' if caught else 'SURVIVED'} {mutant.name} ({seconds:.0f} s): {mutant.what}")
        if not caught:
            print("    " + tail.replace("\n", "\n    "))
    print(f"{len(chosen) - survived} of {len(chosen)} mutants caught")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
