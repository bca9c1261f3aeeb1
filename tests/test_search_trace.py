"""Search traces pinned: the same seed gives the same tokens, rewards and selections, release
after release. tests/data/search_traces.json was written by the engine before the redesign
of the step (issue 15); a refactor that changes any search's result fails here.

Each case runs one search with trace=True and compares every selection (candidates' ids,
parents, tokens, rewards, finish reasons, survivors), every hypothesis and the work counters.
Token ids, texts and counters must match exactly; rewards to 1e-5.

To re-pin after a deliberate change of behaviour (say why in the commit):
    W2S_WRITE_TRACES=1 python -m pytest tests/test_search_trace.py
"""

import json
import os
from pathlib import Path

import pytest

from live_server import LiveServer
from tiny_models import clone, search_engines, tiny_llama
from w2s_engine import Engine, SearchParams

PINNED = Path(__file__).parent / "data" / "search_traces.json"
PROMPTS = ["I really", "The plot of this film"]
TEMPLATES = {"large": "Here is a movie review: {prompt}", "small": "Review: {prompt}"}

CASES = {
    "cbs": ("shared", SearchParams.cbs(2, 3, 4, max_new_tokens=14, temperature=1.0, seed=5)),
    "cbs-stop-top-k": ("shared", SearchParams.cbs(3, 2, 2, max_new_tokens=12, temperature=1.2,
                                                  top_k=40, seed=11, stop=["e", "a"])),
    "cbs-top-p": ("shared", SearchParams.cbs(2, 2, 3, max_new_tokens=10, top_p=0.9, seed=6)),
    "best-of-n": ("shared", SearchParams.best_of_n(5, max_new_tokens=9, seed=2)),
    "base": ("shared", SearchParams.base(n=3, max_new_tokens=9, temperature=0.9, seed=3)),
    "eft": ("shared", SearchParams.eft(beta=1.5, max_new_tokens=10, seed=4)),
    "cross-vocabulary": ("cross", SearchParams.cbs(2, 2, 3, max_new_tokens=13, temperature=1.0,
                                                   seed=9)),
    "black-box": ("remote", SearchParams.cbs(2, 2, 3, max_new_tokens=9, temperature=1.0,
                                             seed=4)),
}


@pytest.fixture(scope="module")
def engines():
    made = search_engines(TEMPLATES, num_kv_blocks=600)
    tok, (tuned, untuned) = made["tok"], made["pair"]
    # A black-box large model: the engine's own server over a large-only engine.
    from w2s_engine.large.openai_completions import OpenAICompletions
    live = LiveServer(Engine((tiny_llama(len(tok), seed=1, layers=3), tok), num_kv_blocks=800,
                             block_size=4, progress=False))
    backend = OpenAICompletions(live.url + "/v1", model="tiny")
    made["remote"] = Engine(backend, (clone(tuned), tok), (clone(untuned), tok),
                            templates=TEMPLATES, num_kv_blocks=600, block_size=4,
                            progress=False)
    yield made
    backend.close()
    live.stop()


def run_case(engine, params) -> list[dict]:
    out = []
    for res in engine.search(PROMPTS, params.copy(trace=True)):
        s = res.stats
        out.append({
            "hypotheses": [{"text": h.text, "token_ids": h.token_ids,
                            "small_token_ids": h.small_token_ids, "reward": h.reward,
                            "finish_reason": h.finish_reason} for h in res.hypotheses],
            "trace": res.trace,
            # the work: tokens forwarded, or read from the prefix cache (an earlier case's
            # prompt), as the pinned runs forwarded them
            "stats": {"tokens_forwarded": {role: n + s.cached_prompt_tokens.get(role, 0)
                                           for role, n in s.tokens_forwarded.items()},
                      "tokens_scored": s.tokens_scored,
                      "tokens_sampled": s.tokens_sampled, "chunks": s.chunks,
                      "peak_kv_blocks": s.peak_kv_blocks},
        })
    engine.check_all_free()
    return json.loads(json.dumps(out))  # the JSON form: tuples become lists, keys strings


def assert_same(got, want, where="result"):
    """Equal structure and values; floats (rewards) to 1e-5."""
    if isinstance(want, float) or isinstance(got, float):
        assert got == pytest.approx(want, abs=1e-5), where
    elif isinstance(want, dict):
        assert isinstance(got, dict) and sorted(got) == sorted(want), where
        for key in want:
            assert_same(got[key], want[key], f"{where}.{key}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same(g, w, f"{where}[{i}]")
    else:
        assert got == want, where


def test_every_method_gives_the_pinned_trace_for_its_seed(engines):
    got = {name: run_case(engines[which], params) for name, (which, params) in CASES.items()}
    if os.environ.get("W2S_WRITE_TRACES"):
        PINNED.write_text(json.dumps(got, indent=1) + "\n")
    pinned = json.loads(PINNED.read_text())
    assert sorted(pinned) == sorted(CASES)
    for name in CASES:
        assert_same(got[name], pinned[name], name)
