"""The benchmark's baseline (reference-style CBS) selects the same beams as the engine."""

import sys
from pathlib import Path

import pytest

from tiny_models import clone, make_tokenizer, tiny_llama, tuned_from
from w2s_engine import Engine, SearchParams

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.baselines.reference_cbs import full_text_rewards, reference_cbs, select  # noqa: E402

SMALL_TEMPLATE = "Review: {prompt}"


@pytest.fixture(scope="module")
def setup():
    tok, other = make_tokenizer(300), make_tokenizer(420)
    untuned = tiny_llama(len(tok), seed=2)
    tuned = tuned_from(untuned, seed=3, scale=0.3)
    large = tiny_llama(len(other), seed=4, layers=3)
    engine = Engine((clone(large), other), (clone(tuned), tok), (clone(untuned), tok),
                    templates={"small": SMALL_TEMPLATE}, num_kv_blocks=800, block_size=4,
                    progress=False)
    return engine, large, other, tuned, untuned, tok


def test_baseline_selects_the_engines_survivors_from_the_same_candidates(setup):
    engine, _, other, tuned, untuned, tok = setup
    params = SearchParams(w=2, k=3, l=3, max_new_tokens=12, temperature=1.0, seed=5,
                          ignore_eos=True, trace=True)
    compared = 0
    prompts = ["I really", "This film", "What a", "The plot", "My friends", "It", "Acting", "So"]
    for res in engine.search(prompts, params):
        for entry in res.trace:
            cands = entry["candidates"]
            texts = [other.decode(c["token_ids"], skip_special_tokens=True,
                                  clean_up_tokenization_spaces=False) for c in cands]
            if any(t.endswith("\ufffd") for t in texts):
                # The engine holds back a character whose bytes are not all sampled yet; the
                # baseline, like the reference, scores the replacement character.
                continue
            rewards = full_text_rewards(tuned, untuned, tok, SMALL_TEMPLATE.replace(
                "{prompt}", res.prompt), texts)
            assert rewards == pytest.approx([c["reward"] for c in cands], abs=1e-4)
            assert [cands[i]["beam_id"] for i in select(rewards, 2)] == entry["survivors"]
            compared += 1
    assert compared >= 4


def test_baseline_runs_a_whole_search_and_copies_the_cache(setup):
    _, large, other, tuned, untuned, tok = setup
    text, reward, stats = reference_cbs(large, other, tuned, untuned, tok, "I really", w=2, k=2,
                                        l=3, max_new_tokens=9, seed=1,
                                        small_template=SMALL_TEMPLATE)
    assert isinstance(text, str) and reward == pytest.approx(full_text_rewards(
        tuned, untuned, tok, "Review: I really", [text])[0], abs=1e-4)
    # Small models re-read the whole text every chunk: far more than prompt + response.
    assert stats.tokens_forwarded["tuned"] > 3 * 4 * 6


def test_baseline_time_budget_stops_after_the_chunk_that_crosses_it(setup):
    _, large, other, tuned, untuned, tok = setup
    _, _, stats = reference_cbs(large, other, tuned, untuned, tok, "I really", w=2, k=2, l=3,
                                max_new_tokens=9, seed=1, small_template=SMALL_TEMPLATE,
                                time_budget_s=0.0)
    assert not stats.completed
    assert stats.chunk_lengths == [3] and len(stats.chunk_seconds) == 1
    _, _, full = reference_cbs(large, other, tuned, untuned, tok, "I really", w=2, k=2, l=3,
                               max_new_tokens=9, seed=1, small_template=SMALL_TEMPLATE)
    assert full.completed and full.chunk_lengths == [3, 6, 9]


def test_baseline_projection_is_exact_for_linear_cost_and_low_for_convex_cost():
    from bench.e2e import project_baseline_seconds
    lengths = list(range(8, 1025, 8))                       # 128 chunks of 8 tokens
    linear = [2.0 + 0.01 * n for n in lengths]
    convex = [2.0 + 0.01 * n + 1e-5 * n * n for n in lengths]
    for cost in (linear, convex):
        measured = 40
        projected = project_baseline_seconds(1.5, cost[:measured], lengths[:measured], 1024, 8)
        if cost is linear:
            assert projected == pytest.approx(1.5 + sum(cost))
        else:
            assert sum(cost[:measured]) < projected < 1.5 + sum(cost)
