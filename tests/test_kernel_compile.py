"""Every Triton kernel compiles for an H100/H200 (sm_90) in every autotune configuration, here,
with no GPU: bench/kernel_compile.py runs the wrappers with launches intercepted and compiles
each launch for the target (Triton's CUDA backend ships its own ptxas). A kernel that does not
compile would otherwise first fail on a lent GPU, in the middle of bench/gpu_check.sh."""

import ast
import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[1]


def compile_check_applies() -> str | None:
    """Why the check cannot run with the Triton installed here, or None."""
    nvidia = Path(triton.__file__).parent / "backends" / "nvidia"
    if not (nvidia / "bin" / "ptxas").exists():
        return "this Triton has no CUDA backend to compile with"
    from triton.runtime.jit import JITFunction
    if "warmup" not in inspect.signature(JITFunction.run).parameters:
        return "this Triton's launch path differs from the one the check intercepts"
    return None


@pytest.mark.skipif(compile_check_applies() is not None, reason=str(compile_check_applies()))
def test_every_triton_kernel_compiles_for_sm90_in_every_autotune_configuration():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "kernel_compile.py")],
                         capture_output=True, text=True, env=env, timeout=1200)
    out = run.stdout
    assert run.returncode == 0, out[-4000:] + run.stderr[-4000:]
    for kernel in ("_store_kv_kernel", "_copy_blocks_kernel", "_decode_split_kernel",
                   "_decode_merge_kernel", "_extend_kernel", "_shared_prefix_kernel",
                   "_logits_lse_kernel", "_reward_finish_kernel", "_sample_slices_kernel",
                   "_sample_kernel"):
        assert kernel in out, f"{kernel} was not compiled"
    assert "FAILED" not in out


@pytest.mark.skipif(compile_check_applies() is not None, reason=str(compile_check_applies()))
def test_a_decode_step_and_a_scoring_chunk_compile_the_same_kernels_for_every_batch_bucket():
    """A switch, or an argument Triton specializes, that varies with the batch (a split count
    as a constexpr; a row count of 1 or a multiple of 16) compiles (and autotunes) a kernel
    again for each bucket that changes it: at the engine's start, when it captures its
    graphs, and mid-serving for a scoring batch of a new size. Over the 23 buckets to 512 a
    kernel takes only the variants its batch-independent switches make: one split written
    directly or several merged (attention), the large and the small model's head sizes (the
    merge), a residual or none (norm), few rows or many and 8 candidate slots or 4 (sampling:
    8 for few rows, and for many either), up to 16 splits merged or more (the reward's). At b67ec04 the decode, merge,
    scoring extend, norm, rotary, reward and reward-merge kernels took 5, 8, 5, 6, 3, 6
    and 5."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = "from bench.kernel_compile import variants_over_buckets as v; print(v()[0])"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    counts = ast.literal_eval(run.stdout.strip().splitlines()[-1])
    assert counts == {"_rms_norm_kernel": 2, "_rotary_kernel": 1, "_store_kv_kernel": 1,
                      "_decode_split_kernel": 2, "_decode_merge_kernel": 2,
                      "_silu_mul_kernel": 1, "_sample_slices_kernel": 1, "_sample_kernel": 3,
                      "_extend_grouped_kernel": 2,
                      "_logits_lse_kernel": 1, "_reward_finish_kernel": 2}
