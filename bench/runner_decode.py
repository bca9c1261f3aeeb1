"""Runner decode throughput: 16 beams of a real model decoding one token each per step.

    python bench/runner_decode.py [--model smollm2-135m-instruct] [--beams 16] [--steps 32]

Prints load times and decode tokens/s; appends a JSON line to bench/results/runner_decode.jsonl
naming the machine.
"""

import argparse
import json
import platform
import subprocess
import time
from pathlib import Path

import torch

from w2s_engine.cache.block_manager import BlockManager
from w2s_engine.models.attention import ATTN_IMPLEMENTATION
from w2s_engine.models.loader import load_model
from w2s_engine.models.runner import ModelRunner


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} x{torch.get_num_threads()} threads (CPU)"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--beams", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--steps", type=int, default=32)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32

    t = time.perf_counter()
    loaded = load_model(args.model, dtype=dtype, device=device, attn_implementation=ATTN_IMPLEMENTATION)
    load_s = time.perf_counter() - t
    blocks = BlockManager(1024, 16)
    runner = ModelRunner(loaded.model, num_blocks=1024, block_size=16)
    vocab = runner.shape.vocab_size
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (args.prompt_len,), generator=g).tolist()
    root = blocks.new_table()
    blocks.append(root, len(prompt))
    runner.run([(root, prompt)])
    beams = [blocks.fork(root) for _ in range(args.beams)]
    blocks.free(root)

    def step():
        copies = []
        for b in beams:
            copies += blocks.append(b, 1)
        runner.copy_blocks(copies)
        hidden, _ = runner.run([(b, [int(torch.randint(0, vocab, (1,), generator=g))]) for b in beams])
        runner.compute_logits(hidden)

    step()  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    tok_s = args.beams * args.steps / seconds
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    row = {"model": args.model, "beams": args.beams, "prompt_len": args.prompt_len,
           "steps": args.steps, "load_s": round(load_s, 2), "decode_tokens_per_s": round(tok_s, 1),
           "step_ms": round(1000 * seconds / args.steps, 2), "device": machine(),
           "dtype": str(dtype), "torch": torch.__version__, "commit": commit}
    print(json.dumps(row))
    out = Path(__file__).parent / "results" / "runner_decode.jsonl"
    out.parent.mkdir(exist_ok=True)
    with out.open("a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
