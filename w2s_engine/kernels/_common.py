"""What the kernel wrappers share: the interpreter switch, tl.dot precision, the SM count.

- Under TRITON_INTERPRET=1 (CPU tests) autotuning cannot time anything, so each kernel gets
  one configuration there and a few on a GPU (`configs`).
- tl.dot on fp32 inputs uses TF32 on a GPU unless told otherwise; an fp32 engine must be fp32
  everywhere, so the wrappers pass input_precision="ieee" for fp32 (`dot_precision`).
- Split counts (decode split-K, vocabulary splits) are sized from the number of SMs.
"""

import functools
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# A device with no SM count to read (the interpreter) plans as an H100 SXM would.
DEFAULT_SM_COUNT = 132


def dot_precision(dtype: torch.dtype) -> str:
    """input_precision for tl.dot: full fp32 for fp32 inputs (no TF32); fp16/bf16 ignore it."""
    return "ieee" if dtype == torch.float32 else "tf32"


@functools.cache
def _sm_count(device_type: str, index) -> int:
    if device_type != "cuda":
        return DEFAULT_SM_COUNT
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of `device` (cached); DEFAULT_SM_COUNT off CUDA."""
    index = device.index if device.index is not None else (
        torch.cuda.current_device() if device.type == "cuda" else None)
    return _sm_count(device.type, index)


def configs(gpu, interpret):
    """Autotune configurations: the list `gpu` on a GPU, [interpret] under the interpreter."""
    return [interpret] if INTERPRET else list(gpu)


def quick_bench(kernel_call, quantiles=None):
    """Autotuning's timing of one configuration (`do_bench=` of every triton.autotune here):
    5 ms of warm-up and 20 ms of timed runs, where Triton's default spends 25 and 100. A shape
    first met while serving (a scoring batch of a new size, a new split count) stalls every
    request while its configurations are timed: about 0.15 s for five configurations, not
    0.65 s, for kernels that run for microseconds (hundreds of timed runs still)."""
    import triton.testing
    return triton.testing.do_bench(kernel_call, warmup=5, rep=20, quantiles=quantiles)


online_lse_step = online_lse_step_finite = lse_reduce = None   # Triton helpers (if installed)
LSE_FLOOR = None

if triton is not None:
    # The lanes' starting max for online_lse_step_finite: the most negative finite fp32. Every
    # x - m is then defined (-inf - m is -inf; no -inf - -inf), so the step needs no -inf
    # guard. (A constexpr: a compiled kernel reads no other globals.)
    LSE_FLOOR = tl.constexpr(-3.4028234663852886e38)

    @triton.jit
    def online_lse_step(m, s, x):
        """Lane-wise online log-sum-exp, one exp per element: (m, s) are each lane's running
        max and sum of exp(. - m); x the next values (-inf adds nothing) -> new (m, s)."""
        up = x > m
        e = tl.exp(tl.where(up, m - x, x - m))
        e = tl.where(x == float("-inf"), 0.0, e)
        return tl.where(up, x, m), tl.where(up, s * e + 1.0, s + e)

    @triton.jit
    def online_lse_step_finite(m, s, x):
        """online_lse_step for lanes whose max starts at LSE_FLOOR, not -inf: one exp of
        -|x - m| serves both branches, and a max replaces a select: 8 ops an element where
        online_lse_step takes 12 (for a pass as ALU-bound as the chunk reward's). The sum is
        the same: a lane that sees only -inf keeps (LSE_FLOOR, 0), which adds nothing."""
        d = x - m
        e = tl.math.exp2(-tl.abs(d) * 1.4426950408889634)
        return tl.maximum(m, x), tl.where(d > 0, s * e + 1.0, s + e)

    @triton.jit
    def lse_reduce(m, s):
        """Lanes' (max, sum of exp(. - max)) [N] -> the block's (max, sum) scalars."""
        top = tl.max(m, 0)
        return top, tl.sum(tl.where(m == float("-inf"), 0.0, s * tl.exp(m - top)), 0)
