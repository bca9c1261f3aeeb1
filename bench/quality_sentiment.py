"""The paper's controlled-sentiment experiment in miniature: gold reward per method.

    python bench/quality_sentiment.py [--split test] [--prompts 50] [--seeds 0,1,2]
        [--methods base,bon16,cbs445,cbs285,cbs825,eft,bon16-rm,cbs445-rm]

Large: Gemma-3-270M (base). Small pair: SmolLM2-135M-Instruct + the sentiment DPO adapter
(tuned) and SmolLM2-135M-Instruct (untuned). max_new_tokens 50, temperature 0.7, top_k 50.
EFT needs one vocabulary, so it runs with the untuned small model as the large model.
The -rm methods score with the shipped sentiment reward model instead of the pair
(scorer=RewardModel("sentiment-rm"), a SmolLM2-135M classifier trained on VADER preferences:
it imitates the gold reward, which the search then optimises directly).
Gold reward: VADER compound of opening + continuation. Writes bench/results/quality_sentiment
(.jsonl with every row, .md with mean +- std per method, .png of gold reward against large
tokens sampled when matplotlib is installed).
"""

import argparse
import os
import json
import platform
import statistics
import subprocess
import time
from pathlib import Path

from w2s_engine import Engine, SearchParams
from w2s_engine.models.loader import BUNDLED_ADAPTERS
from w2s_engine.scoring import RewardModel
from w2s_engine.tasks.sentiment import (LARGE, SMALL, TEMPLATES, TUNED, adapter_fingerprint, gold_reward,
                             sentiment_prompts)

RESULTS = Path(__file__).parent / "results"
MACHINE = f"CPU {platform.machine()}, {os.cpu_count()} cores"
COMMON = dict(max_new_tokens=50, temperature=0.7, top_k=50)
METHODS = {
    "base": lambda s: SearchParams.base(seed=s, **COMMON),
    "bon16": lambda s: SearchParams.best_of_n(16, seed=s, **COMMON),
    "cbs445": lambda s: SearchParams.cbs(4, 4, 5, seed=s, **COMMON),
    "cbs285": lambda s: SearchParams.cbs(2, 8, 5, seed=s, **COMMON),
    "cbs825": lambda s: SearchParams.cbs(8, 2, 5, seed=s, **COMMON),
    "eft": lambda s: SearchParams.eft(1.0, seed=s, **COMMON),
    "bon16-rm": lambda s: SearchParams.best_of_n(16, seed=s, **COMMON),
    "cbs445-rm": lambda s: SearchParams.cbs(4, 4, 5, seed=s, **COMMON),
}
RM = "sentiment-rm"
RM_DIR = str(Path(__file__).resolve().parents[1] / "w2s_engine" / BUNDLED_ADAPTERS[RM])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--split", default="test", choices=["train", "dev", "test"])
    ap.add_argument("--prompts", type=int, default=50)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--max-new-tokens", type=int, default=50)
    ap.add_argument("--tag", default="", help="suffix of the result files")
    ap.add_argument("--tuned", default=TUNED, help="the tuned small model (adapter dir or spec)")
    args = ap.parse_args()
    COMMON["max_new_tokens"] = args.max_new_tokens
    prompts = sentiment_prompts(args.split)[:args.prompts]
    seeds = [int(s) for s in args.seeds.split(",")]
    methods = args.methods.split(",")
    engines = {}

    def engine_for(method):
        key = "eft" if method == "eft" else "rm" if method.endswith("-rm") else "main"
        if key not in engines:
            if key == "rm":
                engines[key] = Engine(large=LARGE, scorer=RewardModel(RM), templates=TEMPLATES)
            else:
                large = SMALL if key == "eft" else LARGE
                engines[key] = Engine(large=large, tuned=args.tuned, untuned=SMALL,
                                      templates=TEMPLATES)
        return engines[key]

    stem = RESULTS / f"quality_sentiment{args.tag}"
    setting = {"split": args.split, "prompts": len(prompts), "max_new_tokens": args.max_new_tokens,
               "adapter": adapter_fingerprint(args.tuned)}
    done = {(r["method"], r["seed"]) for r in read_rows(stem, setting)}
    for method in methods:
        for seed in seeds:
            if (method, seed) in done:  # resumable: a run cut short goes on where it stopped
                continue
            t = time.perf_counter()
            results = engine_for(method).search(prompts, METHODS[method](seed))
            gold = gold_reward([p + r.text for p, r in zip(prompts, results)])
            reward = statistics.mean(r.reward for r in results) \
                if results[0].reward is not None else None
            row = {"method": method, "seed": seed, **setting,
                   "gold_mean": statistics.mean(gold), "gold": [round(g, 4) for g in gold],
                   "implicit_mean": None if method.endswith("-rm") else reward,
                   "large_tokens_sampled": sum(r.stats.tokens_sampled for r in results) / len(prompts),
                   "seconds": round(time.perf_counter() - t, 1),
                   "machine": MACHINE, "commit": commit()}
            if method.endswith("-rm"):
                row.update(rm=adapter_fingerprint(RM_DIR), rm_reward_mean=reward)
            print(json.dumps(row), flush=True)
            with stem.with_suffix(".jsonl").open("a") as f:
                f.write(json.dumps(row) + "\n")
    report(stem, setting, [m for m in METHODS if m in methods])


def read_rows(stem, setting):
    path = stem.with_suffix(".jsonl")
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if all(r.get(k) == v for k, v in setting.items())]


def commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        return ""


def paired(rs, rows, other) -> str:
    """Prompt-by-prompt wins / losses of these rows against method `other` on the same seeds:
    paired, so the spread between prompts (much larger than between methods) cancels."""
    theirs = {r["seed"]: r.get("gold") for r in rows if r["method"] == other}
    win = loss = 0
    for r in rs:
        if r["method"] == other or r.get("gold") is None or theirs.get(r["seed"]) is None:
            continue
        win += sum(a > b for a, b in zip(r["gold"], theirs[r["seed"]]))
        loss += sum(a < b for a, b in zip(r["gold"], theirs[r["seed"]]))
    return f"{win} / {loss}" if win + loss else "-"


def report(stem, setting, methods):
    """Markdown table and plot from every row of this setting in the jsonl."""
    rows = read_rows(stem, setting)
    methods = [m for m in methods if any(r["method"] == m for r in rows)]
    lines = [f"Split {setting['split']}, {setting['prompts']} prompts, max_new_tokens "
             f"{setting['max_new_tokens']}, temperature 0.7, top_k 50; adapter "
             f"{setting['adapter']}; {MACHINE}.", "",
             "| method | seeds | gold reward (mean +- std over seeds) | wins / losses against "
             "best-of-16, per prompt and seed | its scorer's reward | large tokens / prompt | "
             "seconds / seed |",
             "|---|---|---|---|---|---|---|"]
    for method in methods:
        rs = [r for r in rows if r["method"] == method]
        g = [r["gold_mean"] for r in rs]
        imp = [r["implicit_mean"] for r in rs if r["implicit_mean"] is not None]
        rm = [r["rm_reward_mean"] for r in rs if r.get("rm_reward_mean") is not None]
        imp_cell = (f"{statistics.mean(imp):+.2f} (implicit)" if imp else
                    f"{statistics.mean(rm):+.2f} (reward model)" if rm else "-")
        lines.append(f"| {method} | {len(rs)} | {statistics.mean(g):+.3f} +- "
                     f"{statistics.pstdev(g):.3f} | {paired(rs, rows, 'bon16')} | {imp_cell} | "
                     f"{rs[0]['large_tokens_sampled']:.0f} | "
                     f"{statistics.mean(r['seconds'] for r in rs):.0f} |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[bench]'): no plot")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    same_compute = {}
    for method in methods:
        rs = [r for r in rows if r["method"] == method]
        eft = method == "eft"  # another large model: the untuned small model itself
        tokens = round(rs[0]["large_tokens_sampled"])
        same_compute[tokens] = same_compute.get(tokens, -1) + 1
        x = tokens * 1.03 ** same_compute[tokens]  # side by side where compute is equal
        ax.errorbar(x, statistics.mean(r["gold_mean"] for r in rs),
                    yerr=statistics.pstdev(r["gold_mean"] for r in rs), capsize=3,
                    fmt="s" if eft else "^" if method.endswith("-rm") else "o",
                    mfc="none" if eft else None,
                    label="eft (large = SmolLM2-135M)" if eft else method)
    ax.set_xscale("log")
    ticks = [50, 100, 200, 400, 800]
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("large-model tokens sampled per prompt")
    ax.set_ylabel("gold reward (VADER), mean +- std over seeds")
    ax.set_title(f"Gemma-3-270M steered by SmolLM2-135M DPO / base (triangles: by the sentiment "
                 f"reward model)\n{setting['split']} split, {setting['prompts']} prompts, "
                 f"{setting['max_new_tokens']} tokens", fontsize=8)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(stem.with_suffix(".png"), dpi=120)


if __name__ == "__main__":
    main()
