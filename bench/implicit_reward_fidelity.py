"""How well does a small pair's implicit reward rank continuations by the gold reward?

    python bench/implicit_reward_fidelity.py [--split dev] [--prompts 50] [--samples 8]

CBS selects on the implicit reward of partial responses (every L tokens), Best-of-N on that
of whole responses, so a pair steers only as well as its reward ranks the large model's own
samples. This samples `samples` continuations per opening from the large model (Gemma-3-270M,
50 tokens, temperature 0.7, top_k 50), scores every prefix of 5, 10, 25 and 50 large tokens
with each small pair, and reports per pair and prefix length:
- agreement: over all pairs of samples of one opening, the fraction the implicit reward of
  the prefixes orders as the gold reward (VADER) of the whole continuations (0.5 = chance);
- bon_gold: the mean gold reward of the sample with the highest implicit reward (whole
  continuations; Best-of-N within these samples) beside the mean and the oracle maximum.
Pairs: "dpo" (SmolLM2 + the shipped DPO adapter vs SmolLM2) and "prompted" (SmolLM2 after a
positive vs a neutral instruction). Writes bench/results/implicit_reward_fidelity.jsonl.
Run it on the dev split: the test split is for the quality experiment only.
"""

import argparse
import itertools
import json
import os
import platform
import statistics
import time
from pathlib import Path

from w2s_engine import Engine, SearchParams
from w2s_engine.tasks.sentiment import (LARGE, PROMPTED_TEMPLATES, SMALL, TEMPLATES, TUNED,
                             adapter_fingerprint, gold_reward, sentiment_prompts)

RESULTS = Path(__file__).parent / "results"
PREFIXES = (5, 10, 25, 50)


def agreement(implicit: list[list[float]], gold: list[list[float]]) -> float:
    """Fraction of within-prompt sample pairs whose implicit order matches the gold order."""
    agree = total = 0
    for imp, g in zip(implicit, gold):
        for i, j in itertools.combinations(range(len(g)), 2):
            if g[i] == g[j] or imp[i] == imp[j]:
                continue
            total += 1
            agree += (imp[i] > imp[j]) == (g[i] > g[j])
    return agree / max(total, 1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--split", default="dev", choices=["train", "dev", "test"])
    ap.add_argument("--prompts", type=int, default=50)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tuned", default=TUNED, help="the DPO pair's tuned model spec")
    ap.add_argument("--pairs", default="dpo,prompted")
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    prompts = sentiment_prompts(args.split)[:args.prompts]

    t0 = time.perf_counter()
    engine = Engine(large=LARGE, tuned=args.tuned, untuned=SMALL, templates=TEMPLATES)
    params = SearchParams.base(n=args.samples, max_new_tokens=50, temperature=0.7, top_k=50,
                               seed=args.seed)
    results = engine.search(prompts, params)
    large_tok = engine.models["large"].tokenizer
    samples = [[h for h in r.hypotheses] for r in results]
    gold = [gold_reward([p + h.text for h in hs]) for p, hs in zip(prompts, samples)]
    print(f"sampled {len(prompts)} x {args.samples} in {time.perf_counter() - t0:.0f}s", flush=True)

    pairs = {name: engine if name == "dpo" else
             Engine(large=SMALL, tuned=SMALL, untuned=SMALL, templates=PROMPTED_TEMPLATES)
             for name in args.pairs.split(",")}
    rows = []
    for name, scorer in pairs.items():
        for length in PREFIXES:
            implicit = []
            for p, hs in zip(prompts, samples):
                texts = [large_tok.decode(h.token_ids[:length], skip_special_tokens=True)
                         for h in hs]
                done = [h.finished and len(h.token_ids) <= length for h in hs]
                implicit.append(scorer.score([p] * len(hs), texts, finished=done))
            row = {"pair": name, "prefix_tokens": length, "split": args.split,
                   "prompts": len(prompts), "samples": args.samples, "seed": args.seed,
                   "agreement": round(agreement(implicit, gold), 4),
                   "implicit_mean": round(statistics.mean(itertools.chain(*implicit)), 3)}
            if length == PREFIXES[-1]:
                picked = [g[max(range(len(g)), key=imp.__getitem__)]
                          for imp, g in zip(implicit, gold)]
                row.update(bon_gold=round(statistics.mean(picked), 4),
                           sample_gold=round(statistics.mean(itertools.chain(*gold)), 4),
                           oracle_gold=round(statistics.mean(max(g) for g in gold), 4))
            row.update(tuned=adapter_fingerprint(args.tuned) if name == "dpo" else "prompted",
                       machine=f"CPU {platform.machine()}, {os.cpu_count()} cores")
            rows.append(row)
            print(json.dumps(row), flush=True)
    with (RESULTS / f"implicit_reward_fidelity{args.tag}.jsonl").open("a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
