"""CBS with Gemma-3-270M as a black box (llama.cpp's OpenAI server) versus in-process.

    python bench/blackbox_vs_inprocess.py [--prompts 8] [--w 2 --k 2 --l 10] [--max-new-tokens 40]

Starts llama.cpp's server (scripts/llama_cpp_server.py) on 127.0.0.1 with the bundled Gemma
GGUF, runs the same search through it and through the engine's own paged runner, and appends a JSON line per
mode to bench/results/blackbox_vs_inprocess.jsonl. Same small pair in both: SmolLM2 under the
demo's templates. (llama.cpp runs Q4_K_M weights; the engine runs the fp32 dequantized copy.)
"""

import argparse
import json
import sys
import time
from pathlib import Path

from runner_decode import machine

from w2s_engine import Engine, SearchParams
from w2s_engine.large.openai_completions import OpenAICompletions
from w2s_engine.tasks.sentiment import PROMPTED_TEMPLATES as TEMPLATES, OPENINGS
from w2s_engine.models.loader import resolve_bundled

# llama.cpp's own server, with its AMX weight repacking off (it crashes; see the script)
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from llama_cpp_server import start_server  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--w", type=int, default=2)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--l", type=int, default=10)
    ap.add_argument("--max-new-tokens", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    prompts = OPENINGS[:args.prompts]
    params = SearchParams.cbs(args.w, args.k, args.l, max_new_tokens=args.max_new_tokens,
                              temperature=0.7, top_k=50, seed=1)
    small = "smollm2-135m-instruct"
    out = Path(__file__).parent / "results" / "blackbox_vs_inprocess.jsonl"
    proc, url = start_server(resolve_bundled("gemma-3-270m"), n_ctx=2048,
                             threads=args.threads)
    try:
        backend = OpenAICompletions(url, model="gemma")
        modes = {
            # (no prefix caching: the in-process engine would skip prefills the server does)
            "black-box (llama.cpp server)": lambda: Engine(backend, small, small, templates=TEMPLATES,
                                                           progress=False, prefix_caching=False),
            "in-process (paged runner)": lambda: Engine("gemma-3-270m", small, small,
                                                        templates=TEMPLATES, progress=False,
                                                        prefix_caching=False),
        }
        for mode, make in modes.items():
            engine = make()
            t = time.perf_counter()
            results = engine.search(prompts, params)
            seconds = time.perf_counter() - t
            row = {"mode": mode, "search": f"cbs({args.w},{args.k},{args.l})",
                   "prompts": len(prompts), "max_new_tokens": args.max_new_tokens,
                   "seconds": round(seconds, 2),
                   "seconds_per_request": round(seconds / len(prompts), 2),
                   "mean_request_latency_s": round(sum(r.stats.seconds for r in results) / len(results), 2),
                   "mean_reward": round(sum(r.reward for r in results) / len(results), 3),
                   "device": machine()}
            print(json.dumps(row), flush=True)
            with out.open("a") as f:
                f.write(json.dumps(row) + "\n")
            engine.check_all_free()
            del engine
        backend.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)


if __name__ == "__main__":
    main()
