import os

import torch

# Triton kernels run on CPU only through the interpreter, and triton.jit reads this
# variable when a kernel module is imported: set it before any test imports the engine.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def pytest_runtest_logreport(report):
    """W2S_FAILURES_AT_ONCE=1 (bench/gpu_check.sh): print each failure, traceback and all, as
    it happens. pytest prints them at the end, and a run cut off by its time limit (a lent
    GPU's minutes) never gets there: an H200 run at 024353a saw one F and no name."""
    if report.failed and os.environ.get("W2S_FAILURES_AT_ONCE"):
        print(f"\n==== FAILED {report.nodeid} ({report.when})\n{report.longreprtext}\n====",
              flush=True)
