"""Prefix caching: searches whose prompts share a long beginning (few-shot examples, a system
prompt), one after another as a server gets them, with EngineConfig.prefix_caching off and on.

    python bench/prefix_cache.py [--preset cpu-shared] [--prefix-len 512] [--requests 8]
    python bench/prefix_cache.py --score 16     # Engine.score() of 16 responses to one prompt

Each prompt is the same prefix of about --prefix-len tokens and a question of its own (about
--question-len tokens); the first search warms up (with the cache, it forwards the prefix),
the other --requests - 1 are timed. Reports the median seconds per search and the prompt
tokens each model read from the cache, for both settings, with the texts of the two runs compared (the cached keys and
values were computed in another batch: equal up to rounding, so a text may differ where two
candidates' rewards nearly tie); appends a JSON line to <out>/prefix_cache.jsonl naming the
machine and the commit. With --score N: Engine.score() of N responses (about --max-new tokens
each) to one prompt of about --prefix-len tokens (reranking N samples), off and on, after a
warm-up on another prompt: the first call's seconds (on: the prompt forwarded once for the N)
and the median of two more (on: the prompt read from the cache). The presets are bench/e2e.py's (cpu-shared: SmolLM2-135M for all three
models; gpu: random Llama-3-8B steered by random Llama-3.2-1B).
"""

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.e2e import RESULTS, build, commit, machine, parse_search, prompt_of  # noqa: E402


def run(engine, prompts, params) -> tuple[list[float], list]:
    """Each prompt searched alone, in order: the seconds of each, and the results."""
    seconds, results = [], []
    for p in prompts:
        t = time.perf_counter()
        results.append(engine.search([p], params)[0])
        seconds.append(time.perf_counter() - t)
    return seconds, results


def score_row(args) -> dict:
    """Engine.score() of --score responses to one prompt, the cache off and on."""
    row = {"preset": args.preset, "mode": "score", "prefix_len": args.prefix_len,
           "responses": args.score, "response_len": args.max_new}
    rewards = {}
    for caching in (False, True):
        engine, names = build(args.preset, prefix_caching=caching)
        tok = engine.large_tokenizer
        prompt = prompt_of(tok, args.prefix_len, seed=0)
        responses = [" " + prompt_of(tok, args.max_new, seed=i + 1) for i in range(args.score)]
        engine.score([prompt_of(tok, args.prefix_len, seed=99)], responses[:1])   # warm-up
        seconds = []
        for _ in range(3):
            t = time.perf_counter()
            got = engine.score([prompt] * len(responses), responses)
            seconds.append(time.perf_counter() - t)
        key = "on" if caching else "off"
        row[f"first_call_seconds_{key}"] = round(seconds[0], 3)
        row[f"seconds_{key}"] = round(statistics.median(seconds[1:]), 3)
        rewards[key] = got
        row["models"] = names
        del engine
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    row["max_reward_difference"] = max(abs(a - b) for a, b in zip(rewards["off"], rewards["on"]))
    row["first_call_speedup"] = round(row["first_call_seconds_off"]
                                      / row["first_call_seconds_on"], 2)
    row["speedup"] = round(row["seconds_off"] / row["seconds_on"], 2)
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="cpu-shared", choices=["cpu", "cpu-shared", "gpu"])
    ap.add_argument("--prefix-len", type=int, default=512)
    ap.add_argument("--question-len", type=int, default=32)
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--search", default="cbs-4-4-8")
    ap.add_argument("--max-new", type=int, default=32)
    ap.add_argument("--score", type=int, default=0,
                    help="time Engine.score() of this many responses to one prompt instead")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    if args.score:
        row = score_row(args)
        row.update(device=machine(), torch=torch.__version__, commit=commit())
        print(json.dumps(row))
        args.out.mkdir(parents=True, exist_ok=True)
        with (args.out / "prefix_cache.jsonl").open("a") as f:
            f.write(json.dumps(row) + "\n")
        return
    params = parse_search(args.search, args.max_new)
    row = {"preset": args.preset, "search": args.search, "prefix_len": args.prefix_len,
           "question_len": args.question_len, "requests": args.requests,
           "max_new_tokens": args.max_new}
    texts = {}
    for caching in (False, True):
        engine, names = build(args.preset, prefix_caching=caching)
        tok = engine.large_tokenizer
        prefix = prompt_of(tok, args.prefix_len, seed=0)
        prompts = [f"{prefix}\n{prompt_of(tok, args.question_len, seed=i + 1)}"
                   for i in range(args.requests)]
        # The first search warms up (and, with the cache, is the one that forwards the
        # prefix); the others are timed.
        run(engine, prompts[:1], params.copy(max_new_tokens=8))
        seconds, results = run(engine, prompts[1:], params)
        key = "on" if caching else "off"
        row[f"seconds_per_search_{key}"] = round(statistics.median(seconds), 3)
        row[f"cached_prompt_tokens_{key}"] = {
            role: sum(r.stats.cached_prompt_tokens.get(role, 0) for r in results)
            for role in results[0].stats.cached_prompt_tokens}
        texts[key] = [r.text for r in results]
        row["models"] = names
        del engine, results
        gc.collect()                    # the first engine's pools go before the second's
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    row["same_texts"] = sum(a == b for a, b in zip(texts["off"], texts["on"]))
    row["speedup"] = round(row["seconds_per_search_off"] / row["seconds_per_search_on"], 2)
    row.update(device=machine(), torch=torch.__version__, commit=commit())
    print(json.dumps(row))
    args.out.mkdir(parents=True, exist_ok=True)
    with (args.out / "prefix_cache.jsonl").open("a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
