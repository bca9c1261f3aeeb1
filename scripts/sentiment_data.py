"""Data helpers shared by the sentiment training scripts (train_sentiment_adapter.py,
train_sentiment_rm.py): a bundled model's own continuations of the task's openings, sampled
with the engine's plain sampling, and a json cache of them so that reruns do not resample.
"""

import hashlib
import json
import time
from pathlib import Path


def sample_hypotheses(model, prompts, samples, max_new_tokens, seed, template=None,
                      temperature=1.0, top_k=None):
    """`samples` continuations of each prompt from `model` (a model spec), the engine's plain
    sampling; `template` is the model's prompt template ("...{prompt}") or None for the bare
    prompt. Returns one list of Hypothesis (.text, .token_ids, .finished) per prompt."""
    from w2s_engine import Engine, SearchParams
    engine = Engine(large=model, progress=True,
                    templates=None if template is None else {"large": template})
    extra = {} if top_k is None else {"top_k": top_k}
    params = SearchParams.base(n=samples, max_new_tokens=max_new_tokens,
                               temperature=temperature, seed=seed, **extra)
    return [r.hypotheses for r in engine.search(prompts, params)]


def sample_continuations(model, prompts, samples, max_new_tokens, seed):
    """The texts of `samples` continuations of each bare prompt at temperature 1.0."""
    return [[h.text for h in hs]
            for hs in sample_hypotheses(model, prompts, samples, max_new_tokens, seed)]


def cached_samples(cache_dir, model, prompts, samples, max_new_tokens, seed, template=None,
                   temperature=1.0, top_k=None) -> dict:
    """sample_hypotheses, remembered in `cache_dir` under a key of every setting and the
    prompts themselves. Returns {"settings", "seconds", "rows": [{"prompt", "texts",
    "token_ids", "finished"}]}; "seconds" is the time the sampling took when it ran."""
    settings = {"model": model, "template": template, "samples": samples,
                "max_new_tokens": max_new_tokens, "seed": seed, "temperature": temperature,
                "top_k": top_k}
    key = hashlib.sha256(json.dumps([settings, prompts]).encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"samples-{model}-{key}.json"
    if path.exists():
        data = json.loads(path.read_text())
        print(f"{len(data['rows'])} x {samples} samples of {model} from {path}", flush=True)
        return data
    t0 = time.time()
    hyps = sample_hypotheses(model, prompts, samples, max_new_tokens, seed, template,
                             temperature, top_k)
    data = {"settings": settings, "seconds": round(time.time() - t0, 1),
            "rows": [{"prompt": p, "texts": [h.text for h in hs],
                      "token_ids": [list(h.token_ids) for h in hs],
                      "finished": [bool(h.finished) for h in hs]}
                     for p, hs in zip(prompts, hyps)]}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)
    print(f"sampled {len(prompts)} x {samples} from {model} in {data['seconds']:.0f}s "
          f"-> {path}", flush=True)
    return data
