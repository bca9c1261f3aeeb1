"""fp32 means fp32: an fp32 engine's matmuls run at full precision whatever the process set.

A process may let fp32 matmuls use TF32 (`torch.set_float32_matmul_precision("high")`,
`torch.backends.cuda.matmul.allow_tf32 = True`, or the per-backend
`torch.backends.cuda.matmul.fp32_precision = "tf32"`; training scripts and Lightning do):
cuBLAS then rounds fp32 inputs to a 10-bit mantissa (oneDNN on a CPU may use bf16), and an
fp32 engine's logits and rewards drift by about 1e-3 from an fp32 recompute. The engine's own
work (the load-time probe and the graphs' capture, every step, score) runs inside
full_fp32_matmuls, which asks for full precision and puts the process's setting back after.
It touches the settings through the API the process used: torch refuses to read them once
the legacy and the per-backend APIs are mixed. bf16 and fp16 matmuls do not read them.
"""

from collections.abc import Callable
from contextlib import contextmanager

import torch


@contextmanager
def full_fp32_matmuls(dtype: torch.dtype = torch.float32):
    """Within: fp32 matmuls at full precision (for an fp32 engine; others: no change)."""
    undo = _ask_full_precision() if dtype == torch.float32 else None
    try:
        yield
    finally:
        if undo is not None:
            undo()


def _ask_full_precision() -> Callable[[], None]:
    """Set full fp32 precision for matmuls; returns what puts the process's setting back."""
    try:
        before = torch.get_float32_matmul_precision()
    except RuntimeError:    # the process set precisions per backend: answer in that API
        knobs = [k for k in (torch.backends.cuda.matmul,
                             getattr(torch.backends.mkldnn, "matmul", None))
                 if hasattr(k, "fp32_precision")]
        saved = [k.fp32_precision for k in knobs]
        for k in knobs:
            k.fp32_precision = "ieee"

        def undo():
            for k, value in zip(knobs, saved):
                k.fp32_precision = value
        return undo
    if before == "highest":     # the default: nothing to change
        return lambda: None
    torch.set_float32_matmul_precision("highest")
    return lambda: torch.set_float32_matmul_precision(before)
