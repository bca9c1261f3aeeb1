"""Time and stats of CBS(4,4,5), Best-of-16 and base on 8 prompts with the bundled models.

    python bench/search_methods.py [--large gemma-3-270m] [--max-new-tokens 50]

Large: Gemma-3-270M (or any spec); small pair: SmolLM2-135M-Instruct under the demo's tuned /
untuned templates. Appends one JSON line per method to bench/results/search_methods.jsonl.
"""

import argparse
import json
import time
from pathlib import Path

from runner_decode import machine

from w2s_engine import Engine, SearchParams
from w2s_engine.tasks.sentiment import PROMPTED_TEMPLATES as TEMPLATES, OPENINGS


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--large", default="gemma-3-270m")
    ap.add_argument("--small", default="smollm2-135m-instruct")
    ap.add_argument("--max-new-tokens", type=int, default=50)
    ap.add_argument("--prompts", type=int, default=8)
    args = ap.parse_args()
    t = time.perf_counter()
    # (no prefix caching: each method searches the same prompts, and is timed on its own)
    engine = Engine(large=args.large, tuned=args.small, untuned=args.small, templates=TEMPLATES,
                    progress=False, prefix_caching=False)
    load_s = time.perf_counter() - t
    prompts = OPENINGS[:args.prompts]
    common = dict(max_new_tokens=args.max_new_tokens, temperature=0.7, top_k=50, seed=1)
    methods = {"cbs(4,4,5)": SearchParams.cbs(4, 4, 5, **common),
               "best_of_16": SearchParams.best_of_n(16, **common),
               "base": SearchParams.base(**common)}
    out = Path(__file__).parent / "results" / "search_methods.jsonl"
    for name, params in methods.items():
        t = time.perf_counter()
        results = engine.search(prompts, params)
        seconds = time.perf_counter() - t
        tokens = {}
        for r in results:
            for role, n in r.stats.tokens_forwarded.items():
                tokens[role] = tokens.get(role, 0) + n
        row = {"method": name, "large": args.large, "small": args.small, "prompts": len(prompts),
               "max_new_tokens": args.max_new_tokens, "seconds": round(seconds, 2),
               "seconds_per_prompt": round(seconds / len(prompts), 2),
               "large_tokens_sampled": sum(r.stats.tokens_sampled for r in results),
               "tokens_forwarded": tokens,
               "peak_kv_blocks_max": {k: max(r.stats.peak_kv_blocks.get(k, 0) for r in results)
                                      for k in tokens},
               "chunks_mean": sum(r.stats.chunks for r in results) / len(results),
               "load_s": round(load_s, 1), "device": machine()}
        print(json.dumps(row))
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")
    engine.check_all_free()


if __name__ == "__main__":
    main()
