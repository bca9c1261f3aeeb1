"""Peak memory of loading a model for quantization='fp8': as it loads, or whole then after.

    python bench/fp8_load.py [--model smollm2-135m-instruct] [--dtype float32] [--out DIR]

Each way loads in a fresh process (the peak resident memory is a process's): the plain model,
the model loaded whole then quantized (a model passed in memory), and the checkpoint
quantized weight by weight as transformers loads it (models/fp8_linear.streaming_config).
On a GPU the last is what lets a model whose FP8 weights fit load where its bf16 ones would
not; on a CPU it shows as the peak of the process's anonymous memory. Appends JSON lines to <out>/fp8_load.jsonl
naming the machine and the commit.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.e2e import RESULTS, commit, machine  # noqa: E402

# The peak of the process's anonymous memory (RssAnon), sampled every millisecond: what the
# loading holds, not the checkpoint's pages the kernel maps in and may drop (which RSS counts).
CHILD = """
import sys, threading, time, torch
from w2s_engine.models.loader import load_model
from w2s_engine.models.fp8_linear import quantize_fp8

def anon_kb():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("RssAnon:"))

peak, done = [anon_kb()], threading.Event()
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], anon_kb())
        time.sleep(0.001)
spec, dtype, way = sys.argv[1], getattr(torch, sys.argv[2]), sys.argv[3]
base = anon_kb()
threading.Thread(target=sample, daemon=True).start()
t = time.perf_counter()
model = load_model(spec, dtype=dtype, quantization="fp8" if way == "streamed" else None).model
if way == "after":
    quantize_fp8(model)
seconds = time.perf_counter() - t
done.set()
weights = sum(p.numel() * p.element_size() for p in model.parameters())
print(max(peak[0], anon_kb()) - base, seconds, weights)
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    root = str(Path(__file__).resolve().parents[1])
    for way in ("plain", "after", "streamed"):
        out = subprocess.run([sys.executable, "-c", CHILD, args.model, args.dtype, way],
                             capture_output=True, text=True, check=True,
                             env={**__import__("os").environ, "PYTHONPATH": root})
        peak_kb, seconds, weights = out.stdout.split()[-3:]
        row = {"model": args.model, "dtype": args.dtype, "way": way,
               "peak_anon_growth_mb": round(int(peak_kb) / 1024, 1),
               "load_seconds": round(float(seconds), 2),
               "parameter_mb": round(int(weights) / 2**20, 1),
               "machine": machine(), "commit": commit()}
        print(json.dumps(row), flush=True)
        with (args.out / "fp8_load.jsonl").open("a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
