"""`w2s demo`: steer the bundled Gemma-3-270M toward positive movie reviews with small models.

The small pair, as in the paper: SmolLM2-135M-Instruct after DPO toward positive sentiment
(the LoRA adapter in w2s_engine/data/sentiment-dpo-lora, made by
scripts/train_sentiment_adapter.py) and the same model untouched. Their log-likelihood ratio
is the implicit reward. PROMPTED_TEMPLATES give a pair that needs no adapter: one model read
after a positive versus a neutral instruction.
The gold reward is VADER's compound sentiment of prompt + continuation, as in the paper.
"""

import hashlib
import time
from importlib.resources import files
from pathlib import Path

LARGE = "gemma-3-270m"
SMALL = "smollm2-135m-instruct"
TUNED = str(files("w2s_engine").joinpath("data/sentiment-dpo-lora"))
TEMPLATES = {"large": "Here is a movie review: {prompt}", "small": "{prompt}"}
PROMPTED_TEMPLATES = {
    "large": "Here is a movie review: {prompt}",
    "tuned": "The following is a glowing, enthusiastic, positive movie review.\n\n{prompt}",
    "untuned": "The following is a movie review.\n\n{prompt}",
}
# Openings the benchmarks of prompted pairs (no adapter) run on; some are in the adapter's
# training split, so the demo, which steers with the adapter, runs on held-out ones.
OPENINGS = [
    "I really",
    "The plot of this film",
    "This movie was",
    "After watching it twice, I",
    "The acting in this picture",
    "Honestly, the director",
    "My friends dragged me to see this, and",
    "The soundtrack",
]


def sentiment_prompts(split: str) -> list[str]:
    """Openings of movie reviews written for the project: split is train, dev or test."""
    import json
    from importlib.resources import files
    data = json.loads(files("w2s_engine").joinpath("data/sentiment_prompts.json").read_text())
    if split not in ("train", "dev", "test"):
        raise ValueError(f"split {split!r}: use train, dev or test")
    return data[split]


# The demo's prompts: held out from the adapter's training (the data's test split).
DEMO_PROMPTS = sentiment_prompts("test")[:8]


def adapter_fingerprint(spec: str) -> str:
    """First 12 hex digits of a LoRA adapter's weights' sha256 (the spec itself otherwise):
    benchmark rows name the adapter they were measured with, not a path."""
    weights = Path(spec) / "adapter_model.safetensors"
    if not weights.is_file():
        return str(spec)
    return hashlib.sha256(weights.read_bytes()).hexdigest()[:12]


def gold_reward(texts: list[str]) -> list[float]:
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError as e:
        raise ImportError("the demo's gold reward needs vaderSentiment: "
                          "pip install 'w2s-engine[demo]'") from e
    analyzer = SentimentIntensityAnalyzer()
    return [analyzer.polarity_scores(t)["compound"] for t in texts]


def run_demo(num_prompts: int = 4, max_new_tokens: int = 30, seed: int = 1, engine=None):
    from w2s_engine.engine import Engine
    from w2s_engine.params import SearchParams

    prompts = DEMO_PROMPTS[:num_prompts]
    t0 = time.perf_counter()
    if engine is None:
        print(f"loading {LARGE} (large), {SMALL} + its sentiment DPO adapter (tuned) and {SMALL} "
              "(untuned); the first run converts the GGUF files, later runs load the cached "
              "copies", flush=True)
        engine = Engine(large=LARGE, tuned=TUNED, untuned=SMALL, templates=TEMPLATES)
    print(f"models ready in {time.perf_counter() - t0:.1f}s", flush=True)
    common = dict(max_new_tokens=max_new_tokens, temperature=0.7, top_k=50, seed=seed)
    methods = {
        "base": SearchParams.base(**common),
        "best-of-16": SearchParams.best_of_n(16, **common),
        "cbs(4,4,5)": SearchParams.cbs(4, 4, 5, **common),
    }
    summary = []
    for name, params in methods.items():
        t = time.perf_counter()
        results = engine.search(prompts, params)
        seconds = time.perf_counter() - t
        golds = gold_reward([p + r.text for p, r in zip(prompts, results)])
        implicit = [r.reward for r in results if r.reward is not None]
        print(f"\n== {name} ({seconds:.1f}s)")
        for p, r, g in zip(prompts, results, golds):
            text = (p + r.text).replace("\n", " ")
            print(f"  [gold {g:+.2f}] {text}")
        summary.append((name, sum(golds) / len(golds),
                        sum(implicit) / len(implicit) if implicit else None, seconds))
    print("\n| method | mean gold reward (VADER) | mean implicit reward | seconds |")
    print("|---|---|---|---|")
    for name, gold, implicit, seconds in summary:
        imp = "-" if implicit is None else f"{implicit:+.3f}"
        print(f"| {name} | {gold:+.3f} | {imp} | {seconds:.1f} |")
    # (at seed 1 the first 4 prompts put base first: one sample's gold reward swings by more
    # than the methods differ, so a few prompts do not rank them)
    print(f"\n{len(prompts)} prompts, one seed: too few to rank the methods (one sample's gold "
          "reward varies more than they differ); bench/quality_sentiment.py runs all 50 test "
          "prompts over 3 seeds (README: base +0.525, Best-of-16 +0.683, CBS(4,4,5) +0.789).")
    engine.check_all_free()
    return summary
