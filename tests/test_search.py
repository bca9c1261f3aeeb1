"""engine.search(): rewards, selection, Best-of-N, base, EFT, seeding, batching and memory.

Tiny random models with real BPE tokenizers run the search; an independent sdpa copy of each
small model recomputes every reward from scratch, the way the reference scorer does.
"""

import pytest
import torch

from tiny_models import (clone, make_tokenizer, tiny_gemma2, tiny_granite, tiny_llama, tiny_phi,
                         tuned_from)
from w2s_engine import Engine, SearchParams
from w2s_engine.params import InvalidParam
from w2s_engine.search.tokens import common_prefix

PROMPTS = ["I really", "This film", "The plot of this film", "What a"]
SMALL_TEMPLATE = "Review: {prompt}"
LARGE_TEMPLATE = "Here is a movie review: {prompt}"


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer(300)


@pytest.fixture(scope="module")
def other_tok():
    return make_tokenizer(420)


@pytest.fixture(scope="module")
def small_pair(tok):
    untuned = tiny_llama(len(tok), seed=2)
    return tuned_from(untuned, seed=3, scale=0.3), untuned


def make_engine(tok, small_pair, large_tok=None, large_seed=1, **kw):
    large_tok = large_tok or tok
    large = tiny_llama(len(large_tok), seed=large_seed, layers=3)
    tuned, untuned = small_pair
    kw.setdefault("num_kv_blocks", 600)
    kw.setdefault("block_size", 4)
    kw.setdefault("progress", False)
    kw.setdefault("templates", {"large": LARGE_TEMPLATE, "small": SMALL_TEMPLATE})
    return Engine((large, large_tok), (clone(tuned), tok), (clone(untuned), tok), **kw)


@pytest.fixture(scope="module")
def engine(tok, small_pair):
    return make_engine(tok, small_pair)


@pytest.fixture(scope="module")
def cross_engine(tok, other_tok, small_pair):
    return make_engine(tok, small_pair, large_tok=other_tok, large_seed=4)


@torch.no_grad()
def scratch_reward(small_pair, tok, prompt, response, finished,
                   templates=(SMALL_TEMPLATE, SMALL_TEMPLATE)):
    """Full forward of prompt + response through each small model (under its template):
    log-softmax, gather, sum."""
    total = 0.0
    for model, sign, template in zip(small_pair, (1.0, -1.0), templates):
        prompt_ids = tok(template.replace("{prompt}", prompt), add_special_tokens=False)["input_ids"]
        if isinstance(response, str):
            full = tok(template.replace("{prompt}", prompt) + response,
                       add_special_tokens=False)["input_ids"]
            start = max(1, common_prefix(full, prompt_ids))   # nothing predicts position 0
        else:
            full, start = prompt_ids + list(response), len(prompt_ids)
        if finished:
            full = full + [tok.eos_token_id]
        logp = model(torch.tensor([full])).logits[0].float().log_softmax(-1)
        total += sign * sum(logp[i - 1, full[i]].item() for i in range(start, len(full)))
    return total


def test_every_hypothesis_reward_equals_score_and_scratch_recompute(engine, tok, small_pair):
    params = SearchParams(w=2, k=3, l=4, max_new_tokens=18, temperature=1.0, seed=5)
    results = engine.search(PROMPTS, params)
    for res in results:
        assert len(res.hypotheses) == 2 and res.reward == res.hypotheses[0].reward
        for h in res.hypotheses:
            by_ids = engine.score([res.prompt], [h.small_token_ids], finished=h.finished)[0]
            scratch = scratch_reward(small_pair, tok, res.prompt, h.small_token_ids, h.finished)
            assert h.reward == pytest.approx(by_ids, abs=1e-4)
            assert h.reward == pytest.approx(scratch, abs=1e-4)
            if tok(h.text, add_special_tokens=False)["input_ids"] == h.small_token_ids:
                by_text = engine.score([res.prompt], [h.text], finished=h.finished)[0]
                assert h.reward == pytest.approx(by_text, abs=1e-4)
    engine.check_all_free()


def test_a_response_that_merges_into_a_one_token_prompt_is_scored_from_its_next_token(
        tok, other_tok, small_pair):
    # "h" is one small token, and "h" + "e..." tokenizes from "he": the prompt's only token
    # changes. Nothing predicts position 0, so that token is context; the search runs (it
    # failed) and scores the later tokens, as score() and a full forward do.
    eng = make_engine(tok, small_pair, large_tok=other_tok, large_seed=4,
                      templates={"large": LARGE_TEMPLATE, "small": "{prompt}"})
    assert len(tok("h", add_special_tokens=False)["input_ids"]) == 1
    e = other_tok("e", add_special_tokens=False)["input_ids"]
    params = SearchParams(w=2, k=2, l=2, max_new_tokens=6, temperature=1.0, seed=0,
                          logit_bias={e[0]: 100.0})
    res = eng.search(["h"], params)[0]
    assert tok("h" + res.text, add_special_tokens=False)["input_ids"][0] != \
        tok("h", add_special_tokens=False)["input_ids"][0]
    for h in res.hypotheses:
        want = scratch_reward(small_pair, tok, "h", h.text, h.finished,
                              templates=("{prompt}", "{prompt}"))
        assert h.reward == pytest.approx(want, abs=1e-4)
        assert eng.score(["h"], [h.text], finished=h.finished)[0] == pytest.approx(want,
                                                                                     abs=1e-4)
    eng.check_all_free()


def test_stop_strings_and_min_tokens_see_the_text_of_sentencepiece_byte_tokens():
    # Gemma spells rare characters in byte tokens (<0xNN>); the detokenizer holds a run of
    # them back until it ends (a byte-fallback decoder turns a run cut inside a character into
    # U+FFFD), but a stop string in it is still found, at its token, and min_tokens' text
    # counts it (vLLM's rule: a stop string must end past the first min_tokens tokens' text).
    from tiny_models import make_byte_fallback_tokenizer
    tok = make_byte_fallback_tokenizer()
    eng = Engine((tiny_llama(len(tok), seed=1), tok), num_kv_blocks=200, block_size=4,
                 progress=False)
    a, small_a = tok.convert_tokens_to_ids(["<0x41>", "a"])
    for n in (1, 4):
        h = eng.search(["the film"], SearchParams.base(max_new_tokens=n, seed=0, stop=["A"],
                                                       logit_bias={a: 100.0}))[0].hypotheses[0]
        assert (h.text, h.finish_reason, h.token_ids) == ("", "stop", [a])
    params = SearchParams.base(max_new_tokens=6, seed=0, stop=["A"], min_tokens=2,
                               logit_bias={a: 5.0, small_a: 5.0})
    checked = 0
    for seed in range(12):
        h = eng.search(["the film"], params.copy(seed=seed))[0].hypotheses[0]
        tokens = tok.convert_ids_to_tokens(h.token_ids)
        text = tok.decode(h.token_ids)
        cut = text.find("A", len(tok.decode(h.token_ids[:2])))     # past min_tokens' text
        assert h.text == (text if cut < 0 else text[:cut]), (tokens, h.text)
        checked += "<0x41>" in tokens[2:]
    assert checked, "some samples should have a byte-token A past min_tokens"
    eng.check_all_free()


def test_a_stop_string_in_the_u_fffd_of_a_character_left_incomplete_at_max_new_tokens_cuts():
    # A response cut by max_new_tokens inside a character (or after invalid bytes) ends in
    # U+FFFD once flushed; the detokenizer held it back at every token, so a stop string
    # holding it must still be looked for in the final text, as in any other text returned.
    from tiny_models import make_byte_fallback_tokenizer
    tok = make_byte_fallback_tokenizer()
    eng = Engine((tiny_llama(len(tok), seed=1), tok), num_kv_blocks=200, block_size=4,
                 progress=False)
    e4 = tok.convert_tokens_to_ids("<0xE4>")
    for n in (1, 2):
        h = eng.search(["the film"], SearchParams.base(max_new_tokens=n, seed=0, stop=["\ufffd"],
                                                       logit_bias={e4: 100.0}))[0].hypotheses[0]
        assert h.token_ids == [e4] * n and tok.decode(h.token_ids).startswith("\ufffd")
        assert (h.text, h.finish_reason) == ("", "stop")
    eng.check_all_free()


def test_a_special_token_inside_a_run_of_byte_tokens_gives_the_same_text_with_stop_strings():
    # A special token the decode skips (<unk> here, <pad> or <mask> in Gemma's vocabulary)
    # does not end a run of byte tokens: <0x46><unk><0xE4> decodes to U+FFFD U+FFFD, the 'F'
    # too. Reading the text at every token (for a stop string) must not settle the 'F' early:
    # the same seed gives the same text with an unmatched stop string as without.
    from tiny_models import make_byte_fallback_tokenizer
    tok = make_byte_fallback_tokenizer()
    eng = Engine((tiny_llama(len(tok), seed=1), tok), num_kv_blocks=200, block_size=4,
                 progress=False)
    f, unk, e4 = tok.convert_tokens_to_ids(["<0x46>", "<unk>", "<0xE4>"])
    seen = 0
    for seed in (11, 22):
        texts = []
        for stop in ([], ["Z"]):
            params = SearchParams.base(max_new_tokens=3, seed=seed, stop=stop,
                                       logit_bias={f: 99.0, unk: 99.5, e4: 98.0})
            h = eng.search(["the film"], params)[0].hypotheses[0]
            texts.append(h.text)
            assert h.text == tok.decode(h.token_ids, skip_special_tokens=True)
            seen += h.token_ids == [f, unk, e4]
        assert texts[0] == texts[1]
    assert seen, "the workload should sample <0x46> <unk> <0xE4>"
    eng.check_all_free()


def test_a_response_a_stop_string_ended_is_scored_on_the_text_returned(engine, cross_engine):
    # The sampled tokens run past the stop string (its token, and what follows in it); the
    # text stops before it, and so does what is scored: with one tokenizer as with two.
    params = SearchParams(w=2, k=3, l=3, max_new_tokens=12, temperature=1.2, top_k=40,
                          seed=11, stop=["e", "a"])
    stopped = 0
    for eng in (engine, cross_engine):
        for res in eng.search(PROMPTS, params):
            for h in res.hypotheses:
                assert h.reward == pytest.approx(
                    eng.score([res.prompt], [h.small_token_ids], finished=h.finished)[0],
                    abs=1e-4)
                if h.finish_reason == "stop":   # (other texts need not round-trip: bytes)
                    assert h.reward == pytest.approx(
                        eng.score([res.prompt], [h.text], finished=True)[0], abs=1e-4)
                    stopped += eng is engine
        eng.check_all_free()
    assert stopped >= 2, "the workload should end responses on stop strings"


def test_score_of_many_responses_at_once_equals_scoring_each_alone(engine, cross_engine):
    # Mixed prompts, lengths, finished flags and an empty response: score() batches them.
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(7)]
    responses = [" and then", " the end of it all", "", " a", " more words here to score", "!", " ok"]
    finished = [True, False, True, False, True, False, True]
    for eng in (engine, cross_engine):
        together = eng.score(prompts, responses, finished=finished)
        alone = [eng.score([p], [r], finished=f)[0] for p, r, f in zip(prompts, responses, finished)]
        assert together == pytest.approx(alone, abs=1e-4)
        eng.check_all_free()


@pytest.mark.parametrize("l, seed", [(1, 7), (2, 8), (3, 9), (5, 10)])
def test_cross_tokenizer_rewards_equal_scratch_recompute_of_the_text(cross_engine, tok, small_pair,
                                                                     l, seed):
    # Random tiny models emit raw bytes: chunk edges split words and multi-byte characters.
    params = SearchParams(w=2, k=2, l=l, max_new_tokens=15, temperature=1.0, seed=seed)
    for res in cross_engine.search(PROMPTS, params):
        for h in res.hypotheses:
            scratch = scratch_reward(small_pair, tok, res.prompt, h.text, h.finished)
            assert h.reward == pytest.approx(scratch, abs=1e-4)
            assert h.reward == pytest.approx(
                cross_engine.score([res.prompt], [h.text], finished=h.finished)[0], abs=1e-4)
    cross_engine.check_all_free()


def test_rewards_of_small_models_whose_lm_head_has_a_bias_equal_scratch_recompute(tok):
    # Phi's output layer adds a bias to every logit; the reward's log-softmax must include it.
    untuned = tiny_phi(len(tok), seed=2)
    pair = tuned_from(untuned, seed=3, scale=0.3), untuned
    engine = make_engine(tok, pair)
    responses = [" and then", " the end of it all", " a"]
    got = engine.score(PROMPTS[:3], responses, finished=[True, False, False])
    want = [scratch_reward(pair, tok, p, r, f)
            for p, r, f in zip(PROMPTS[:3], responses, [True, False, False])]
    assert got == pytest.approx(want, abs=1e-4)
    result = engine.search(PROMPTS[:1], SearchParams(w=2, k=2, l=3, max_new_tokens=9, seed=1))[0]
    h = result.hypotheses[0]
    assert h.reward == pytest.approx(
        scratch_reward(pair, tok, PROMPTS[0], h.small_token_ids, h.finished), abs=1e-4)
    engine.check_all_free()


@pytest.mark.parametrize("arch", ["gemma2", "granite"])
@pytest.mark.parametrize("kernels", ["reference", "triton"])
def test_rewards_of_small_models_that_transform_their_logits_equal_scratch_recompute(
        tok, arch, kernels, monkeypatch):
    # Gemma 2 caps its final logits (30 * tanh(x / 30)); Granite divides them by
    # logits_scaling. The reward's log-softmax is of the logits the model's forward returns.
    # "triton": the GPU's kernels, interpreted.
    if kernels == "triton":
        pytest.importorskip("triton")
        import w2s_engine.search.small_stream as small_stream
        from w2s_engine.kernels.chunk_reward import fused_lmhead_chunk_reward_triton
        monkeypatch.setattr(small_stream, "fused_lmhead_chunk_reward",
                            fused_lmhead_chunk_reward_triton)
    untuned = {"gemma2": tiny_gemma2, "granite": tiny_granite}[arch](len(tok), seed=2)
    pair = tuned_from(untuned, seed=3, scale=0.3), untuned
    engine = make_engine(tok, pair)
    head = engine.runners["tuned"].lm_head
    assert (head.softcap, head.scale) == {"gemma2": (30.0, 1.0), "granite": (None, 4.0)}[arch]
    responses = [" and then", " the end of it all", " a"]
    got = engine.score(PROMPTS[:3], responses, finished=[True, False, False])
    want = [scratch_reward(pair, tok, p, r, f)
            for p, r, f in zip(PROMPTS[:3], responses, [True, False, False])]
    assert got == pytest.approx(want, abs=1e-4)
    engine.check_all_free()


def test_rewards_with_a_template_per_small_model_equal_scratch_recompute(tok, small_pair):
    # Two templates: each small model scores its own stream, one model's log-probs at a time.
    templates = ("Glowing review: {prompt}", SMALL_TEMPLATE)
    engine = make_engine(tok, small_pair, templates={"large": LARGE_TEMPLATE,
                                                      "tuned": templates[0],
                                                      "untuned": templates[1]})
    assert len(engine.scorer.streams) == 2
    responses = [" and then", " the end of it all", " a"]
    got = engine.score(PROMPTS[:3], responses, finished=[True, False, False])
    want = [scratch_reward(small_pair, tok, p, r, f, templates)
            for p, r, f in zip(PROMPTS[:3], responses, [True, False, False])]
    assert got == pytest.approx(want, abs=1e-4)
    engine.check_all_free()


def test_rewards_of_a_pair_whose_heads_differ_in_size_equal_scratch_recompute(tok, small_pair,
                                                                              monkeypatch):
    # The tuned model's embeddings resized (8 rows more, no new token): one stream still, each
    # model's log-probs over its own rows. The GPU's kernels (interpreted) take the two heads
    # together only when they are the same size.
    pytest.importorskip("triton")
    import w2s_engine.search.small_stream as small_stream
    from w2s_engine.kernels.chunk_reward import (fused_lmhead_chunk_reward_triton,
                                                 lmhead_chunk_logprob_triton)
    monkeypatch.setattr(small_stream, "fused_lmhead_chunk_reward",
                        fused_lmhead_chunk_reward_triton)
    monkeypatch.setattr(small_stream, "lmhead_chunk_logprob", lmhead_chunk_logprob_triton)
    tuned, untuned = clone(small_pair[0]), small_pair[1]
    tuned.resize_token_embeddings(len(tok) + 8)
    engine = make_engine(tok, (tuned, untuned))
    assert len(engine.scorer.streams) == 1
    responses = [" and then", " the end of it all", " a"]
    got = engine.score(PROMPTS[:3], responses, finished=[True, False, False])
    want = [scratch_reward((tuned, untuned), tok, p, r, f)
            for p, r, f in zip(PROMPTS[:3], responses, [True, False, False])]
    assert got == pytest.approx(want, abs=1e-4)
    engine.check_all_free()


def test_a_large_lm_head_padded_past_its_tokenizer_samples_only_real_tokens(tok, small_pair):
    # Rows 300..363 of the large model's head are no token of the shared tokenizer; the small
    # models (300 rows) could not embed them, and the detokenizer could not write them.
    large = tiny_llama(len(tok) + 64, seed=1, layers=3)
    reference = clone(large)      # transformers' own forward (the engine's runs paged)
    tuned, untuned = small_pair
    engine = Engine((large, tok), (clone(tuned), tok), (clone(untuned), tok),
                    templates={"large": LARGE_TEMPLATE, "small": SMALL_TEMPLATE},
                    num_kv_blocks=600, block_size=4, progress=False)
    for seed in range(3):
        for method in (SearchParams.cbs(2, 2, 4, max_new_tokens=16, seed=seed),
                       SearchParams.base(n=2, max_new_tokens=16, seed=seed)):
            for res in engine.search(PROMPTS[:2], method):
                assert all(t < len(tok) for h in res.hypotheses for t in h.token_ids)
    # Nor are they log-prob alternatives, or part of the softmax the log-probs come from.
    req = engine.add_request("I really", SearchParams.base(max_new_tokens=4, temperature=3.0,
                                                           seed=1))
    req.logprobs = 5      # as the server sets it
    while engine.has_unfinished():
        engine.step()
    first = req.result.hypotheses[0].logprobs[0]
    with torch.no_grad():
        logits = reference(torch.tensor([req.large_prompt_ids])).logits[0, -1, :len(tok)]
    assert first.logprob == pytest.approx(
        logits.log_softmax(-1)[first.token_id].item(), abs=1e-4)
    assert all(i < len(tok) for e in req.result.hypotheses[0].logprobs for i, _ in e.top)
    engine.check_all_free()


def test_survivors_are_the_top_w_candidates_and_finished_beams_are_never_duplicated(engine):
    params = SearchParams(w=3, k=2, l=2, max_new_tokens=20, temperature=1.2, seed=11, trace=True,
                          stop=list("aeiou"))  # stop strings make beams finish early
    saw_finished_survivor = False
    for res in engine.search(PROMPTS, params):
        carried = set()
        for entry in res.trace:
            cands = entry["candidates"]
            ids = [c["beam_id"] for c in cands]
            assert len(ids) == len(set(ids))
            order = sorted(range(len(cands)), key=lambda i: (-cands[i]["reward"], i))
            assert entry["survivors"] == [cands[i]["beam_id"] for i in order[:3]]
            # A finished survivor comes back alone: never as a parent of new children.
            assert not carried & {c["parent_id"] for c in cands}
            assert carried <= set(ids)
            carried = {c["beam_id"] for c in cands if c["finished"]
                       and c["beam_id"] in entry["survivors"]}
            saw_finished_survivor |= bool(carried) and entry is not res.trace[-1]
        assert [h.reward for h in res.hypotheses] == sorted((h.reward for h in res.hypotheses),
                                                            reverse=True)
    assert saw_finished_survivor, "the workload should carry a finished beam across a chunk"
    engine.check_all_free()


def test_beam_cut_by_max_new_tokens_is_scored_without_eos(engine, tok, small_pair):
    params = SearchParams(w=2, k=2, l=3, max_new_tokens=6, seed=3, ignore_eos=True)
    for res in engine.search(PROMPTS[:2], params):
        for h in res.hypotheses:
            assert h.finish_reason == "length" and not h.finished and len(h.token_ids) == 6
            assert h.reward == pytest.approx(
                scratch_reward(small_pair, tok, res.prompt, h.small_token_ids, False), abs=1e-4)


def test_best_of_n_draws_exactly_n_samples_and_returns_the_best(engine):
    params = SearchParams.best_of_n(6, max_new_tokens=10, seed=2, trace=True)
    res = engine.search(["I really"], params)[0]
    assert len(res.trace) == 1
    cands = res.trace[0]["candidates"]
    assert len(cands) == 6 and res.stats.chunks == 1
    # Every sampled token counts, the EOS of a beam that stopped too.
    assert res.stats.tokens_sampled == sum(c["num_tokens"] + (c["finish_reason"] == "stop")
                                           for c in cands)
    assert res.reward == max(c["reward"] for c in cands)


def test_best_of_n_keeping_several_returns_the_best_of_the_same_n_samples_in_order(engine):
    one = engine.search(["I really"], SearchParams.best_of_n(5, max_new_tokens=10, seed=2,
                                                             trace=True))[0]
    three = engine.search(["I really"], SearchParams.best_of_n(5, keep=3, max_new_tokens=10,
                                                               seed=2))[0]
    rewards = sorted((c["reward"] for c in one.trace[0]["candidates"]), reverse=True)
    assert [h.reward for h in three.hypotheses] == rewards[:3]      # 3 of 5: no multiple
    assert three.hypotheses[0].text == one.text
    assert three.stats.tokens_sampled == one.stats.tokens_sampled
    with pytest.raises(InvalidParam, match="use w <= k"):
        SearchParams.best_of_n(2, keep=3).validate()


def test_base_is_a_plain_sample_and_runs_no_small_model(engine, tok):
    res = engine.search(["I really"], SearchParams.base(max_new_tokens=12, temperature=0.0))[0]
    assert set(res.stats.tokens_forwarded) == {"large"} and res.reward is None
    # Greedy base equals transformers' own greedy generate on the large model.
    large = engine.runners["large"].model
    ref = clone(large)
    ref.set_attn_implementation("sdpa")
    ids = tok(LARGE_TEMPLATE.replace("{prompt}", "I really"), return_tensors="pt")["input_ids"]
    out = ref.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=1, pad_token_id=1)
    expected = out[0, ids.shape[1]:].tolist()
    if 1 in expected:
        expected = expected[:expected.index(1)]
    assert res.token_ids == expected


def test_eft_reward_equals_score_of_its_sample(engine, tok, small_pair):
    res = engine.search(PROMPTS[:2], SearchParams.eft(beta=1.5, max_new_tokens=10, seed=4))
    for r in res:
        assert r.reward == pytest.approx(
            scratch_reward(small_pair, tok, r.prompt, r.small_token_ids, r.finished), abs=1e-4)
    engine.check_all_free()


def test_eft_with_n_samples_gives_n_steered_samples_in_order_each_scored(engine, tok,
                                                                         small_pair):
    one = engine.search(["I really"], SearchParams.eft(beta=1.5, max_new_tokens=10, seed=4))[0]
    three = engine.search(["I really"], SearchParams.eft(beta=1.5, n=3, max_new_tokens=10,
                                                         seed=4))[0]
    assert len(three.hypotheses) == 3 and len({h.text for h in three.hypotheses}) > 1
    assert three.hypotheses[0].token_ids == one.token_ids   # sample 0 is the n=1 sample
    assert three.text == three.hypotheses[0].text            # in sampling order, not by reward
    for h in three.hypotheses:
        assert h.reward == pytest.approx(
            scratch_reward(small_pair, tok, "I really", h.small_token_ids, h.finished), abs=1e-4)
    engine.check_all_free()


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_eft_sample_a_stop_string_cut_is_scored_on_the_text_returned(tok, small_pair,
                                                                     async_scheduling):
    engine = make_engine(tok, small_pair, async_scheduling=async_scheduling)
    common = dict(beta=1.5, max_new_tokens=12, seed=4, ignore_eos=True)
    whole = engine.search(["I really"], SearchParams.eft(**common))[0]
    stop = whole.text[5:7]          # most likely inside a token: the cut text re-tokenizes
    cut = engine.search(["I really"], SearchParams.eft(stop=[stop], **common))[0]
    assert cut.finished and len(cut.text) < len(whole.text) and stop not in cut.text
    want = scratch_reward(small_pair, tok, "I really", cut.text, True)
    assert cut.reward == pytest.approx(want, abs=1e-4)
    assert cut.reward == pytest.approx(engine.score(["I really"], [cut.text], finished=True)[0],
                                       abs=1e-4)
    engine.check_all_free()


def test_eft_reward_with_padded_small_heads_equals_score_and_a_narrow_head_is_refused(tok):
    untuned = tiny_llama(len(tok) + 20, seed=2)     # Qwen-style: head rows past the tokenizer
    padded = (tuned_from(untuned, seed=3, scale=0.3), untuned)
    engine = make_engine(tok, padded)
    r = engine.search(["I really"], SearchParams.eft(beta=1.5, max_new_tokens=10, seed=4))[0]
    assert r.reward == pytest.approx(
        scratch_reward(padded, tok, "I really", r.small_token_ids, r.finished), abs=1e-4)
    narrow = tiny_llama(len(tok) - 1, seed=2)
    engine = make_engine(tok, (tuned_from(narrow, seed=3), narrow))
    with pytest.raises(ValueError, match="the tuned model's has 299 rows"):
        engine.search(["I really"], SearchParams.eft(max_new_tokens=4))


def test_a_response_another_eos_id_ended_scores_the_id_sampled(tok, small_pair):
    """A chat model's end of turn is often not its tokenizer's eos_token (gemma-3-it's
    <end_of_turn>, Llama-3's <|eot_id|>): the small models score the EOS id sampled."""
    large = tiny_llama(len(tok), seed=1, layers=3)
    large.generation_config.eos_token_id = [1, 7]
    tuned, untuned = small_pair
    engine = Engine((large, tok), (clone(tuned), tok), (clone(untuned), tok), block_size=4,
                    num_kv_blocks=600, progress=False,
                    templates={"large": LARGE_TEMPLATE, "small": SMALL_TEMPLATE})
    common = dict(max_new_tokens=9, seed=2, temperature=1.0, logit_bias={1: -100.0, 7: 4.0})
    for params in (SearchParams.cbs(2, 2, 3, **common), SearchParams.eft(beta=1.5, n=3,
                                                                         **common)):
        hyps = engine.search(["I really"], params)[0].hypotheses
        ended = [h for h in hyps if h.finish_reason == "stop"]
        assert ended, params.method
        for h in ended:   # the EOS term is that of 7, as if 7 were one more response token
            assert h.reward == pytest.approx(scratch_reward(
                small_pair, tok, "I really", h.small_token_ids + [7], False), abs=1e-4)
    engine.check_all_free()


def test_sampling_methods_refuse_a_chunk_length():
    for method in ("base", "eft", "best_of_n"):
        with pytest.raises(ValueError, match="l=5: .*use l=None"):
            SearchParams(method=method, w=1, k=2).validate()
        SearchParams(method=method, w=1, k=2, l=None).validate()


def test_eft_needs_one_vocabulary(cross_engine):
    with pytest.raises(ValueError, match="vocabulary"):
        cross_engine.search(["I really"], SearchParams.eft(max_new_tokens=5))


def test_same_seed_same_results_alone_or_batched(engine):
    params = SearchParams(w=2, k=2, l=3, max_new_tokens=12, temperature=1.0, seed=21)
    alone = engine.search(["This film"], params)[0]
    again = engine.search(["This film"], params)[0]
    batched = engine.search(["I really", "This film", "What a"], params)[1]
    assert alone.token_ids == again.token_ids == batched.token_ids
    assert alone.reward == pytest.approx(batched.reward, abs=1e-5)


def test_small_model_work_is_prompt_plus_every_candidate_chunk(engine, tok):
    params = SearchParams(w=2, k=2, l=3, max_new_tokens=9, seed=8, trace=True)
    res = engine.search(["I really"], params)[0]
    prompt_len = len(tok(SMALL_TEMPLATE.replace("{prompt}", "I really"),
                         add_special_tokens=False)["input_ids"])
    # Each candidate's chunk: its tokens beyond what its parent had.
    lengths = {}
    chunk_tokens = eos_terms = 0
    for entry in res.trace:
        for c in entry["candidates"]:
            if c["beam_id"] in lengths:
                continue  # a finished survivor carried over: not scored again
            chunk_tokens += c["num_tokens"] - lengths.get(c["parent_id"], 0)
            eos_terms += c["finish_reason"] == "stop"
            lengths[c["beam_id"]] = c["num_tokens"]
    for role in ("tuned", "untuned"):   # the prompt's blocks an earlier test cached are read
        cached = res.stats.cached_prompt_tokens[role]
        assert res.stats.tokens_forwarded[role] == prompt_len - cached + chunk_tokens
    assert res.stats.tokens_scored == chunk_tokens + eos_terms


@pytest.mark.parametrize("asynchronous", [False, True], ids=["waiting", "async"])
def test_a_survivors_children_take_one_large_forward_at_their_chunks_first_step(
        tok, small_pair, asynchronous):
    """The K children of a survivor feed its last token over its history: one row forwards it
    for all of them, and each samples its own token from it (LocalLarge: sibling_rows). The
    first chunk's children sample from the prompt's logits, with no forward at all."""
    w, k, l, chunks = 2, 3, 4, 3
    engine = make_engine(tok, small_pair, async_scheduling=asynchronous)
    params = SearchParams.cbs(w, k, l, max_new_tokens=l * chunks, seed=8, ignore_eos=True)
    res = engine.search(["I really"], params)[0]
    engine.check_all_free()
    prompt_len = len(engine.make_request("I really", params).large_prompt_ids)
    per_chunk = w * k * (l - 1)             # each candidate feeds its own tokens after the first
    assert res.stats.tokens_forwarded["large"] == \
        prompt_len + per_chunk + (chunks - 1) * (w + per_chunk)
    assert all(len(h.token_ids) == l * chunks for h in res.hypotheses)


def test_all_blocks_come_back_and_peak_kv_is_shared(engine):
    params = SearchParams(w=4, k=4, l=5, max_new_tokens=10, seed=1)
    res = engine.search(["The plot of this film"], params)[0]
    engine.check_all_free()
    # 16 beams share the prompt's blocks: far less than 16 full copies of the sequence.
    bs = engine.config.block_size
    prompt_blocks = -(-len(engine.large_tokenizer(LARGE_TEMPLATE.replace(
        "{prompt}", "The plot of this film"))["input_ids"]) // bs)
    own_blocks = -(-10 // bs) + 1
    assert res.stats.peak_kv_blocks["large"] <= prompt_blocks + 16 * own_blocks
    assert res.stats.peak_kv_blocks["large"] < 16 * (prompt_blocks + own_blocks - 1)


@pytest.mark.parametrize("params", [
    SearchParams.cbs(2, 3, 3, max_new_tokens=17),   # chunks end mid-block: copy-on-write
    SearchParams.cbs(3, 2, 4, max_new_tokens=16),
    SearchParams.cbs(1, 4, 1, max_new_tokens=9),
    SearchParams.best_of_n(4, max_new_tokens=9),
    SearchParams.base(n=3, max_new_tokens=9),
    SearchParams.eft(max_new_tokens=9),
], ids=["cbs-2-3-3", "cbs-3-2-4", "cbs-1-4-1", "bon-4", "base-3", "eft"])
def test_a_request_runs_in_pools_the_size_of_its_reservation(tok, small_pair, params):
    def make(num_kv_blocks):
        large = tiny_llama(len(tok), seed=1, layers=3)
        return Engine((large, tok), (clone(small_pair[0]), tok), (clone(small_pair[1]), tok),
                      templates={"large": SMALL_TEMPLATE, "small": SMALL_TEMPLATE},
                      num_kv_blocks=num_kv_blocks, block_size=4, progress=False)
    params = params.copy(seed=3, ignore_eos=True)
    reserved = make(1000).make_request("The plot of this film", params).reserved
    tight = make(max(reserved.values()))
    res = tight.search(["The plot of this film"], params)[0]
    tight.check_all_free()
    assert tight.kv.large.peak_used <= reserved["large"]
    if params.uses_small_models:
        assert tight.kv.small[0].peak_used <= reserved[0]
    assert all(len(h.token_ids) == params.max_new_tokens for h in res.hypotheses)
    if params.method == "cbs":  # beams share their history: well below W*K full copies
        prompt_len = len(tight.large_tokenizer("Review: The plot of this film")["input_ids"])
        copies = params.w * params.k * -(-(prompt_len + params.max_new_tokens) // 4)
        assert max(reserved.values()) < copies


@pytest.mark.parametrize("bad, match", [
    (dict(w=0), "w="), (dict(k=0), "k="), (dict(l=0), "l="), (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(top_p=0.0), "top_p"), (dict(temperature=-1.0), "temperature"), (dict(method="x"), "method"),
])
def test_bad_params_raise_a_clear_error_and_the_engine_goes_on(engine, bad, match):
    with pytest.raises(ValueError, match=match):
        engine.search(["I really"], SearchParams(**bad))
    assert engine.search(["I really"], SearchParams(w=1, k=2, l=2, max_new_tokens=4, seed=1))
    engine.check_all_free()


def test_bad_requests_raise_clear_errors(engine, tok, small_pair):
    with pytest.raises(ValueError, match="empty"):
        engine.search([], SearchParams())
    with pytest.raises(ValueError, match="prompt 1"):
        engine.search(["fine", ""], SearchParams(max_new_tokens=4))
    with pytest.raises(ValueError, match="context"):
        engine.search(["word " * 600], SearchParams(max_new_tokens=4))
    with pytest.raises(ValueError, match="KV blocks"):
        engine.search(["I really"], SearchParams(w=16, k=16, max_new_tokens=200))
    with pytest.raises(ValueError, match=r"\{prompt\}"):
        make_engine(tok, small_pair, num_kv_blocks=8).__class__(
            (tiny_llama(len(tok), 1), tok), templates={"large": "no placeholder"})
    assert not engine.has_unfinished()
    engine.check_all_free()


def test_a_request_failing_mid_search_fails_alone_and_frees_its_blocks(cross_engine):
    params = SearchParams(w=2, k=2, l=3, max_new_tokens=6, seed=1)
    good = cross_engine.make_request("I really", params)
    bad = cross_engine.make_request("This film", params)
    bad.small_prompts[0].tokenizer = None  # its re-tokenization at the first chunk will raise
    cross_engine.enqueue(good)
    cross_engine.enqueue(bad)
    while cross_engine.has_unfinished():
        cross_engine.step()
    assert good.status == "done" and good.result.hypotheses
    assert bad.status == "failed" and "TypeError" in bad.error
    cross_engine.check_all_free()
    assert cross_engine.search(["What a"], params)[0].hypotheses


def test_a_scoring_forward_failing_in_the_second_stream_fails_its_request_alone(tok, small_pair,
                                                                                 monkeypatch):
    """Tuned and untuned under different templates score on two streams; the scorer queues
    both streams' forwards before it reads either. When the second stream's forward fails for
    one request, the first stream's queued update rolls back, each request runs again alone,
    only that one fails, and the other ends as it does in an engine of its own."""
    import w2s_engine.search.small_stream as small_stream

    def two_streams():
        large = tiny_llama(len(tok), seed=1, layers=3)
        tuned, untuned = small_pair
        engine = Engine((large, tok), (clone(tuned), tok), (clone(untuned), tok),
                        templates={"large": LARGE_TEMPLATE, "tuned": "Glowing review: {prompt}",
                                   "untuned": SMALL_TEMPLATE},
                        num_kv_blocks=600, block_size=4, progress=False)
        assert len(engine.scorer.streams) == 2
        return engine
    params = SearchParams(w=2, k=2, l=3, max_new_tokens=7, seed=1)
    want = two_streams().search(["I really"], params)[0]

    engine = two_streams()
    good = engine.enqueue(engine.make_request("I really", params))
    bad = engine.enqueue(engine.make_request("This film", params))
    bad_ids = bad.small_prompts[1].ids
    second = engine.scorer.streams[1]
    forward = small_stream.SmallStream._forward

    def failing(self, feeds, plans):
        if self is second and any(u.state.ids[:len(bad_ids)] == bad_ids for u, *_ in plans):
            raise RuntimeError("injected failure in the untuned model's forward")
        return forward(self, feeds, plans)
    monkeypatch.setattr(small_stream.SmallStream, "_forward", failing)
    while engine.has_unfinished():
        engine.step()
    assert bad.status == "failed" and "injected failure" in bad.error
    assert good.status == "done", good.error
    assert [h.token_ids for h in good.result.hypotheses] == [h.token_ids for h in want.hypotheses]
    assert good.result.reward == pytest.approx(want.reward, abs=1e-5)
    engine.check_all_free()


def cjk_word_tokenizer(n_words: int = 40):
    """A whole-word large tokenizer whose words are 6 CJK characters each: one large token is
    18 bytes, which the small byte-level BPE (trained on English) spells out one byte a token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    words = ["".join(chr(0x4E00 + 6 * i + j) for j in range(6)) for i in range(n_words)]
    vocab = {"<bos>": 0, "<eos>": 1, "<unk>": 2, **{w: 3 + i for i, w in enumerate(words)}}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    t.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    return PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<bos>", eos_token="<eos>",
                                   unk_token="<unk>")


def test_a_response_past_the_reserved_small_tokens_per_large_token_grows_its_reservation(
        tok, small_pair):
    engine = make_engine(tok, small_pair, large_tok=cjk_word_tokenizer(), num_kv_blocks=400)
    params = SearchParams(w=2, k=2, l=2, max_new_tokens=6, seed=1, ignore_eos=True)
    req = engine.make_request("I really", params)
    admitted = dict(req.reserved)
    engine.enqueue(req)
    grown = 0
    while engine.has_unfinished():
        engine.step()
        grown = max(grown, req.reserved.get(0, 0))
    assert req.status == "done", req.error
    assert grown > admitted[0]
    stats = req.result.stats
    assert stats.tokens_forwarded["tuned"] > 4 * stats.tokens_forwarded["large"]
    engine.check_all_free()


def test_a_response_that_outgrows_the_pool_fails_alone_before_any_pool_runs_out(tok, small_pair):
    # 305 blocks per pool admit both (149 + 25 reserved) and leave room for the short request
    # to grow into; the long one's re-tokenized response (about 16 small tokens per large token)
    # comes to hold more than all the small models' blocks (321 with a pool of its own).
    pair = tuple(clone(m) for m in small_pair)
    for m in pair:  # about 1100 small tokens; the context is not what this test is about
        m.config.max_position_embeddings = 2048
    engine = make_engine(tok, pair, large_tok=cjk_word_tokenizer(), num_kv_blocks=305)
    long = engine.make_request("I really", SearchParams(w=2, k=2, l=2, max_new_tokens=60,
                                                        seed=1, ignore_eos=True))
    short = engine.make_request("This film", SearchParams(w=2, k=2, l=2, max_new_tokens=2,
                                                          seed=2, ignore_eos=True))
    engine.enqueue(long)
    engine.enqueue(short)
    while engine.has_unfinished():
        engine.step()
    assert short.status == "done" and short.result.hypotheses
    assert long.status == "failed"
    assert "small-model tokens per large-model token" in long.error
    assert "give the engine more KV memory" in long.error
    engine.check_all_free()


def mid_word_tokenizer():
    """A large tokenizer whose tokens are long phrases ending inside a word (" ... and th"):
    the small byte-level BPE spells each in many tokens and, at every chunk's end, re-splits
    the word the next chunk completes (' t', 'h' -> ' the'), rolling back across blocks."""
    import string

    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast
    chars = sorted(set(string.ascii_letters + string.digits + string.punctuation + " \n"))
    pieces = [("<bos>", 0.0), ("<eos>", 0.0), *((c, -5.0) for c in chars),
              *((p, -1.0) for p in MID_WORD_PIECES)]
    t = Tokenizer(models.Unigram(pieces, unk_id=None))
    t.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<bos>", eos_token="<eos>")


MID_WORD_PIECES = [" wonderful and th", "e plot of this film is simple but th",
                   "e characters are wonderful th", "e story made no sense at all and th",
                   "e acting was great and th", "e ending was awful but th"]


def mid_word_engine(tok, small_pair, num_kv_blocks: int):
    """(engine, logit_bias): a large model whose tokens are the mid-word pieces, which the
    bias makes it sample, so each re-tokenizes to ~15-20 small tokens."""
    large_tok = mid_word_tokenizer()
    bias = {large_tok.convert_tokens_to_ids(p): 40.0 for p in MID_WORD_PIECES}
    tuned, untuned = small_pair
    return Engine((tiny_llama(len(large_tok), seed=4), large_tok), (clone(tuned), tok),
                  (clone(untuned), tok), num_kv_blocks=num_kv_blocks, block_size=4,
                  progress=False), bias


@pytest.mark.parametrize("requests, num_kv_blocks", [(1, 86), (1, 88), (3, 216)])
def test_rollbacks_across_shared_blocks_stay_within_the_reservation_or_fail_alone(
        tok, small_pair, requests, num_kv_blocks):
    # Each chunk re-tokenizes to ~15 small tokens per large token and rolls back into blocks
    # the K siblings share: what a request holds while its streams are cut and regrown must
    # be reserved first, or the request fails alone with the growth error. The pool never
    # runs out under the requests (an OutOfBlocks here failed all three).
    engine, bias = mid_word_engine(tok, small_pair, num_kv_blocks)
    reqs = [engine.add_request(p, SearchParams.cbs(1, 8, 2, max_new_tokens=10, seed=s,
                                                   temperature=1.0, ignore_eos=True,
                                                   logit_bias=bias))
            for s, p in enumerate(["I really", "This film", "The plot"][:requests])]
    while engine.has_unfinished():
        engine.step()
        for r in reqs:     # a request never holds more small blocks than it reserved
            if r.status == "running" and r.small_prompts:
                held = len({blk for b in r.beams for blk in b.small[0].table.blocks})
                assert held <= r.reserved.get(0, 0), (held, r.reserved)
    for r in reqs:
        assert r.status == "done" or "small-model tokens per large-model token" in r.error, \
            r.error
    engine.check_all_free()


def test_a_response_past_the_whole_pool_fails_at_once_and_leaves_the_room_to_one_that_fits(
        tok, small_pair):
    # Both re-tokenize to ~18 small tokens per large token and outgrow their reservations.
    # The first admitted needs more small-model blocks than the pool has (it fails alone too);
    # the second fits the pool alone. The hopeless one must fail at once, saying what to
    # change (not "retry when the engine is less busy"), and the one that fits must end as
    # alone; it failed in its stead, as the last admitted of two requests waiting for room.
    solo, bias = mid_word_engine(tok, small_pair, 50)
    hopeless = SearchParams.cbs(3, 1, 5, max_new_tokens=8, seed=829, temperature=0.0,
                                min_tokens=1, logit_bias=bias)
    fits = SearchParams.best_of_n(1, max_new_tokens=4, seed=670, temperature=0.0,
                                  logit_bias=bias)
    alone = solo.search(["I really"], fits)[0]
    engine, _ = mid_word_engine(tok, small_pair, 50)
    first = engine.add_request("I really", hopeless)
    second = engine.add_request("I really", fits)
    while engine.has_unfinished():
        engine.step()
    assert second.status == "done", second.error
    assert first.status == "failed"
    assert "small-model tokens per large-model token" in first.error
    assert "give the engine more KV memory" in first.error
    assert "less busy" not in first.error
    assert [h.token_ids for h in second.result.hypotheses] == \
        [h.token_ids for h in alone.hypotheses]
    assert second.result.reward == pytest.approx(alone.reward, abs=1e-4)
    engine.check_all_free()


def test_two_responses_that_outgrow_their_reservations_at_once_both_end_as_alone(
        tok, small_pair):
    # Each fits the pool alone once grown, but not both: both wait for room, and neither can
    # end to free it. The last admitted is preempted and recomputed after the other (it
    # failed, "retry when the engine is less busy"), and ends as it does alone.
    _, bias = mid_word_engine(tok, small_pair, 27)
    params = [SearchParams.best_of_n(1, max_new_tokens=4, seed=s, temperature=0.0,
                                     logit_bias=bias) for s in (670, 671)]
    prompts = ["I really", "This film"]
    alone = [mid_word_engine(tok, small_pair, 27)[0].search([p], ps)[0]
             for p, ps in zip(prompts, params)]
    engine, _ = mid_word_engine(tok, small_pair, 27)
    reqs = [engine.add_request(p, ps) for p, ps in zip(prompts, params)]
    waited = False
    while engine.has_unfinished():
        engine.step()
        waited |= any(r.waits_for_room for r in reqs)
    assert waited, "the pool was meant to make them wait for room"
    for r, want in zip(reqs, alone):
        assert r.status == "done", r.error
        assert [h.token_ids for h in r.result.hypotheses] == \
            [h.token_ids for h in want.hypotheses]
        assert r.result.reward == pytest.approx(want.reward, abs=1e-4)
    engine.check_all_free()
    assert set(engine.budget.reserved.values()) == {0}


def test_a_stream_that_outgrows_its_reservation_beside_a_plain_search_is_not_failed(
        tok, small_pair):
    # Both outgrow their reservations at once and neither can end to free the room. The last
    # admitted has streamed text (it cannot be recomputed), the first has not: the first is
    # preempted and recomputed, and both end as alone (the stream failed, "retry when the
    # engine is less busy", though each fits the pool alone).
    _, bias = mid_word_engine(tok, small_pair, 48)
    plain = SearchParams.cbs(2, 2, 1, max_new_tokens=3, seed=600, temperature=1.0,
                             logit_bias=bias)
    streamed = SearchParams.cbs(1, 2, 1, max_new_tokens=3, seed=700, temperature=1.0,
                                logit_bias=bias)
    alone = [mid_word_engine(tok, small_pair, 48)[0].search([p], ps)[0]
             for p, ps in (("I really", plain), ("This film", streamed))]
    engine, _ = mid_word_engine(tok, small_pair, 48)
    first = engine.enqueue(engine.make_request("I really", plain))
    second = engine.enqueue(engine.make_request("This film", streamed, stream=True))
    text, waited = "", False
    while engine.has_unfinished():
        engine.step()
        waited |= bool(second.waits_for_room)
        text += "".join(d.text for d in second.deltas)
        second.deltas = []
    assert waited, "the pool was meant to make the stream wait for room"
    for r, want in zip((first, second), alone):
        assert r.status == "done", r.error
        assert [h.token_ids for h in r.result.hypotheses] == \
            [h.token_ids for h in want.hypotheses]
        assert r.result.reward == pytest.approx(want.reward, abs=1e-4)
    assert text == second.result.text
    engine.check_all_free()
    assert set(engine.budget.reserved.values()) == {0}


def test_a_response_that_outgrows_the_small_models_context_fails_alone(tok, small_pair):
    # Admission checked prompt + 60 tokens against the 512-token context; the response
    # re-tokenizes to about 16 small tokens per large token.
    engine = make_engine(tok, small_pair, large_tok=cjk_word_tokenizer(), num_kv_blocks=2000)
    long = engine.make_request("I really", SearchParams(w=2, k=2, l=4, max_new_tokens=60,
                                                        seed=1, ignore_eos=True))
    engine.enqueue(long)
    while engine.has_unfinished():
        engine.step()
    assert long.status == "failed"
    assert "past its context of 512: lower max_new_tokens" in long.error
    engine.check_all_free()
    params = SearchParams(w=2, k=2, l=2, max_new_tokens=4, seed=1, ignore_eos=True)
    assert engine.search(["This film"], params)[0].hypotheses


def test_each_hypothesis_carries_its_lineages_reward_at_every_selection(engine):
    params = SearchParams(w=2, k=3, l=3, max_new_tokens=12, temperature=1.0, seed=13, trace=True)
    for res in engine.search(PROMPTS[:2], params):
        first_seen = {}
        for entry in res.trace:
            for c in entry["candidates"]:
                first_seen.setdefault(c["beam_id"], c)
        # Hypotheses come in the last selection's survivor order (best first).
        for h, beam_id in zip(res.hypotheses, res.trace[-1]["survivors"]):
            lineage = []
            while beam_id in first_seen:
                lineage.append(first_seen[beam_id]["reward"])
                beam_id = first_seen[beam_id]["parent_id"]
            assert h.chunk_rewards == lineage[::-1]
            assert h.chunk_rewards[-1] == h.reward
    base = engine.search(["I really"], SearchParams.base(max_new_tokens=4, seed=1))[0]
    assert base.hypotheses[0].chunk_rewards is None


@torch.no_grad()
def greedy_with_penalties(model, prompt_ids, steps, presence, frequency, repetition,
                          bias=None):
    """Greedy decoding with a full forward per token, penalties written out here:
    transformers' repetition processor over prompt + response, then OpenAI's presence and
    frequency over the response, then OpenAI's logit bias."""
    from transformers import RepetitionPenaltyLogitsProcessor
    ids, out = list(prompt_ids), []
    for _ in range(steps):
        logits = model(torch.tensor([ids])).logits[:, -1].float()
        if repetition != 1.0:
            logits = RepetitionPenaltyLogitsProcessor(repetition)(torch.tensor([ids]), logits)
        for t in set(out):
            logits[0, t] -= presence + frequency * out.count(t)
        for t, b in (bias or {}).items():
            logits[0, t] += b
        token = int(logits.argmax())
        ids.append(token)
        out.append(token)
    return out


@pytest.mark.parametrize("presence, frequency, repetition", [
    (1.5, 0.0, 1.0), (0.0, 0.7, 1.0), (0.0, 0.0, 1.8), (0.5, 0.3, 0.6), (-1.0, 0.0, 1.0)])
def test_penalties_give_the_tokens_of_greedy_decoding_with_the_same_penalties(
        tok, small_pair, presence, frequency, repetition):
    engine = make_engine(tok, small_pair)
    reference = clone(tiny_llama(len(tok), seed=1, layers=3))   # the engine's large model
    # Greedy decoding of this model loops from the 14th token (150, 186, 150, 186, ...).
    params = SearchParams.base(max_new_tokens=24, top_k=1, ignore_eos=True, seed=1,
                               presence_penalty=presence, frequency_penalty=frequency,
                               repetition_penalty=repetition)
    prompt_ids = engine.make_request("I really", params).large_prompt_ids
    got = engine.search(["I really"], params)[0].token_ids
    assert got == greedy_with_penalties(reference, prompt_ids, 24, presence, frequency,
                                        repetition)
    plain = engine.search(["I really"], params.copy(presence_penalty=0.0, frequency_penalty=0.0,
                                                    repetition_penalty=1.0))[0].token_ids
    assert got != plain   # the penalties changed what greedy decoding picks
    if presence >= 0 and frequency >= 0 and repetition >= 1:
        assert len(set(got)) > len(set(plain))   # and broke its loop
    engine.check_all_free()


@pytest.mark.parametrize("prompt", ["This film", "The plot of this film"])
def test_eft_with_a_repetition_penalty_is_greedy_decoding_of_the_mixed_logits(tok, small_pair,
                                                                             prompt):
    # DESIGN.md's EFT: logits_large + beta * (logits_tuned - logits_untuned). Sampling is the
    # same for log-probs in place of the small models' logits (a shift per row), but a
    # repetition penalty, which scales positive and negative logits apart, is not.
    engine = make_engine(tok, small_pair)
    large = clone(tiny_llama(len(tok), seed=1, layers=3))    # the engine's large model
    tuned, untuned = small_pair
    beta, steps, penalty = 3.0, 16, 1.3   # where the two rules part here
    params = SearchParams.eft(beta=beta, max_new_tokens=steps, top_k=1, ignore_eos=True,
                              seed=1, repetition_penalty=penalty)
    large_ids = engine.make_request(prompt, params).large_prompt_ids
    small_ids = tok(SMALL_TEMPLATE.replace("{prompt}", prompt),
                    add_special_tokens=False)["input_ids"]
    from transformers import RepetitionPenaltyLogitsProcessor
    out = []
    with torch.no_grad():
        for _ in range(steps):
            def last(model, ids):
                return model(torch.tensor([ids + out])).logits[:, -1].float()
            mixed = last(large, large_ids) + beta * (last(tuned, small_ids)
                                                     - last(untuned, small_ids))
            mixed = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor([large_ids + out]), mixed)
            out.append(int(mixed.argmax()))
    assert engine.search([prompt], params)[0].token_ids == out
    engine.check_all_free()


def test_penalties_apply_to_their_own_request_in_a_batch(engine):
    params = SearchParams.cbs(2, 2, 3, max_new_tokens=9, seed=3)
    penalised = params.copy(frequency_penalty=2.0, repetition_penalty=1.5)
    alone = engine.search(["I really", "This film"], params)
    mixed = [engine.add_request("I really", params), engine.add_request("This film", penalised)]
    while engine.has_unfinished():
        engine.step()
    assert mixed[0].result.token_ids == alone[0].token_ids
    assert mixed[1].result.token_ids != alone[1].token_ids
    engine.check_all_free()


def test_logit_bias_gives_the_tokens_of_greedy_decoding_with_the_same_bias(tok, small_pair):
    engine = make_engine(tok, small_pair)
    reference = clone(tiny_llama(len(tok), seed=1, layers=3))
    plain = SearchParams.base(max_new_tokens=16, top_k=1, ignore_eos=True, seed=1)
    unbiased = engine.search(["I really"], plain)[0].token_ids
    bias = {unbiased[0]: -100.0, unbiased[3]: -100.0, 77: 2.5}   # ban two, favour one
    params = plain.copy(logit_bias=bias, frequency_penalty=0.5)
    prompt_ids = engine.make_request("I really", params).large_prompt_ids
    got = engine.search(["I really"], params)[0].token_ids
    assert got == greedy_with_penalties(reference, prompt_ids, 16, 0.0, 0.5, 1.0, bias)
    assert unbiased[0] not in got and unbiased[3] not in got
    forced = engine.search(["I really"], SearchParams.base(
        max_new_tokens=5, ignore_eos=True, seed=2, temperature=1.0, logit_bias={77: 100}))[0]
    assert forced.token_ids == [77] * 5
    with pytest.raises(ValueError, match="logit_bias.300=300: not a token id"):
        engine.search(["I really"], plain.copy(logit_bias={300: 1.0}))
    engine.check_all_free()


def test_a_temperature_below_1e_5_samples_greedily_as_vllm_takes_it(engine):
    greedy = SearchParams.base(max_new_tokens=8, temperature=0.0, seed=3, ignore_eos=True)
    want = engine.search(["I really"], greedy)[0].token_ids
    for t in (1e-6, 1e-30, 1e-40):
        assert engine.search(["I really"], greedy.copy(temperature=t))[0].token_ids == want, t
    engine.check_all_free()


def test_min_p_of_one_keeps_only_the_most_likely_token_so_sampling_is_greedy(engine):
    greedy = SearchParams.base(n=2, max_new_tokens=10, top_k=1, ignore_eos=True, seed=1)
    hot = SearchParams.base(n=2, max_new_tokens=10, temperature=1.5, ignore_eos=True, seed=1)
    want = [h.token_ids for h in engine.search(["I really"], greedy)[0].hypotheses]
    got = [h.token_ids for h in engine.search(["I really"], hot.copy(min_p=1.0))[0].hypotheses]
    sampled = [h.token_ids for h in engine.search(["I really"], hot)[0].hypotheses]
    assert got == want and sampled != want
    engine.check_all_free()


def test_min_tokens_holds_back_eos_and_stop_strings_until_then(engine, tok):
    eos = min(engine.large.eos_ids)
    eager_to_end = SearchParams.cbs(2, 2, 3, max_new_tokens=10, seed=1, logit_bias={eos: 100.0})
    assert {len(h.token_ids) for h in engine.search(["I really"], eager_to_end)[0].hypotheses} \
        == {0}
    held = engine.search(["I really"], eager_to_end.copy(min_tokens=5))[0]
    assert [(len(h.token_ids), h.finish_reason) for h in held.hypotheses] == [(5, "stop")] * 2
    # vLLM's rule: a stop string counts once it ends past the text of the first min_tokens
    # tokens (as EOS may come at token min_tokens + 1).
    stop = tok.decode([77])
    repeat = SearchParams.base(max_new_tokens=10, seed=1, logit_bias={77: 100.0}, stop=[stop])
    assert engine.search(["I really"], repeat)[0].text == ""
    late = engine.search(["I really"], repeat.copy(min_tokens=4))[0]
    assert late.token_ids == [77] * 5 and late.finish_reason == "stop"
    assert late.text == tok.decode([77] * 4)   # the 5th token's stop string cut the text
    # min_tokens = max_new_tokens: the length cap still ends it.
    capped = engine.search(["I really"], repeat.copy(min_tokens=10))[0]
    assert capped.token_ids == [77] * 10 and capped.finish_reason == "length"
    with pytest.raises(ValueError, match="min_tokens=11: must be at most max_new_tokens"):
        engine.search(["I really"], repeat.copy(min_tokens=11))
    engine.check_all_free()


def test_a_stop_token_id_ends_a_response_as_eos_does_and_is_scored_as_its_end(engine, tok,
                                                                             small_pair):
    """vLLM's stop_token_ids (Llama-3's <|eot_id|> where the model's EOS is another): the
    token ends the response, is not in its tokens or text, and the small models score it as
    the response's end, as an EOS id sampled; ignore_eos leaves it on."""
    common = dict(max_new_tokens=9, seed=2, temperature=1.0, logit_bias={7: 4.0})
    for params in (SearchParams.cbs(2, 2, 3, **common),
                   SearchParams.eft(beta=1.5, n=3, **common)):
        free = engine.search(["I really"], params)[0].hypotheses
        assert any(7 in h.token_ids for h in free), params.method   # it is sampled
        for ignore_eos in (False, True):
            stopped = params.copy(stop_token_ids=[7], ignore_eos=ignore_eos)
            hyps = engine.search(["I really"], stopped)[0].hypotheses
            ended = [h for h in hyps if h.finish_reason == "stop"]
            assert ended, params.method
            for h in hyps:
                assert 7 not in h.token_ids and h.text == tok.decode(h.token_ids)
            for h in ended:
                assert h.reward == pytest.approx(scratch_reward(
                    small_pair, tok, "I really", h.small_token_ids + [7], False), abs=1e-4)
    engine.check_all_free()


def test_min_tokens_holds_back_stop_token_ids_until_then(engine):
    forced = SearchParams.cbs(2, 2, 3, max_new_tokens=10, seed=1, logit_bias={77: 100.0},
                              stop_token_ids=[77])
    assert {(len(h.token_ids), h.finish_reason)
            for h in engine.search(["I really"], forced)[0].hypotheses} == {(0, "stop")}
    for ignore_eos in (False, True):   # (ignore_eos bans no EOS, but the stop ids still)
        held = engine.search(["I really"], forced.copy(min_tokens=4, ignore_eos=ignore_eos))[0]
        assert [(len(h.token_ids), h.finish_reason) for h in held.hypotheses] == \
            [(4, "stop")] * 2
        assert all(77 not in h.token_ids for h in held.hypotheses)
    engine.check_all_free()


def test_include_stop_str_in_output_keeps_the_stop_string_and_scores_the_text_returned(
        engine, tok):
    """vLLM's include_stop_str_in_output: the text ends with the stop string that ended it,
    the rewards are score()'s of that text, and stop_reason names what ended each
    hypothesis."""
    free = SearchParams.base(n=3, max_new_tokens=12, seed=7, temperature=1.0, ignore_eos=True)
    texts = [h.text for h in engine.search(["I really"], free)[0].hypotheses]
    stop = next(c for c in texts[0][1:] if c.isalnum())
    longer = stop + texts[0][texts[0].find(stop) + 1:][:1]   # starts where `stop` does
    for stops in ([stop], [stop, longer], [longer, stop]):
        cut = engine.search(["I really"], free.copy(stop=stops))[0].hypotheses
        kept = engine.search(["I really"], free.copy(
            stop=stops, include_stop_str_in_output=True))[0].hypotheses
        for text, c, k in zip(texts, cut, kept):
            assert c.token_ids == k.token_ids and c.finish_reason == k.finish_reason
            if c.finish_reason == "stop":
                s = c.stop_reason
                assert s in stops and text.startswith(s, len(c.text)) and k.stop_reason == s
                assert k.text == c.text + s and text.startswith(k.text)
            else:
                assert k.text == c.text == text and c.stop_reason is None
        assert cut[0].finish_reason == "stop"
    common = sorted({c for t in texts for c in t if c.isascii() and c.isalnum()})[:8]
    params = SearchParams.cbs(2, 2, 3, max_new_tokens=12, seed=7, temperature=1.0,
                              stop=common, include_stop_str_in_output=True)
    res = engine.search(["I really"], params)[0]
    assert any(h.stop_reason in common and h.text.endswith(h.stop_reason)
               for h in res.hypotheses)
    for h in res.hypotheses:
        assert h.reward == pytest.approx(engine.score(
            ["I really"], [h.small_token_ids], finished=h.finished)[0], abs=1e-4)
        if h.stop_reason is not None:   # the tokens scored are those of the text returned
            assert h.small_token_ids == tok(h.text, add_special_tokens=False)["input_ids"]
    # a stop token id is its own stop_reason; EOS and the length cap have none (vLLM's)
    eos = min(engine.large.eos_ids)
    by_id = engine.search(["I really"], SearchParams.base(
        n=2, max_new_tokens=6, seed=1, logit_bias={9: 100.0}, stop_token_ids=[9]))[0]
    by_eos = engine.search(["I really"], SearchParams.base(
        n=2, max_new_tokens=6, seed=1, logit_bias={eos: 100.0}, stop_token_ids=[9]))[0]
    capped = engine.search(["I really"], SearchParams.base(max_new_tokens=3, seed=1,
                                                           ignore_eos=True))[0]
    assert [h.stop_reason for h in by_id.hypotheses] == [9, 9]
    assert [h.stop_reason for h in by_eos.hypotheses] == [None, None]
    assert by_eos.finish_reason == "stop" and capped.hypotheses[0].stop_reason is None
    engine.check_all_free()


def test_stop_token_ids_outside_the_large_vocabulary_or_not_ids_are_refused(engine):
    base = SearchParams.base(max_new_tokens=4)
    with pytest.raises(ValueError, match=r"stop_token_ids=300: not a token id of the large "
                                         r"model, whose vocabulary is \[0, 300\)"):
        engine.search(["I really"], base.copy(stop_token_ids=[5, 300]))
    for bad in ([-1], ["7"], [True], 7, list(range(65))):
        with pytest.raises(ValueError, match="stop_token_ids=.*must be a list of at most 64"):
            engine.search(["I really"], base.copy(stop_token_ids=bad))
    req = engine.make_request("I really", base.copy(stop_token_ids=(9, 9, 5)))
    assert req.params.stop_token_ids == [5, 9]
    engine.check_all_free()


def test_a_stop_string_inside_a_long_token_cuts_at_its_first_match():
    tok = make_tokenizer(300)
    tok.add_tokens(["\n" + " " * 40, "b" + "-" * 30])   # as real vocabularies' long runs
    long_run, dashes = tok.convert_tokens_to_ids(["\n" + " " * 40, "b" + "-" * 30])
    engine = Engine((tiny_llama(len(tok), seed=1), tok), num_kv_blocks=200, block_size=4,
                    progress=False)
    forced = SearchParams.base(max_new_tokens=3, temperature=0.0, logit_bias={long_run: 100.0})
    for stop, text in [("\n", ""), (" ", "\n"), ("  ", "\n")]:
        r = engine.search(["I really"], forced.copy(stop=[stop]))[0]
        assert (r.text, r.finish_reason) == (text, "stop"), stop
    # a stop string spanning into a long token: "xa" then "b---...": "ab" matches there
    from w2s_engine.search.request import SearchRequest
    from w2s_engine.search.sequence import Beam
    req = SearchRequest(0, "x", SearchParams.base(max_new_tokens=5, stop=["ab"]), 0, [1], [])
    beam, text = Beam(beam_id=0, large=None, token_ids=[]), ""
    for token, piece in enumerate(["xa", "b" + "-" * 30, "more"]):
        text += piece
        req.record_token(beam, token, set(), lambda b, t=text: t)
        if beam.finished:
            break
    assert (beam.finish_reason, beam.stop_text_len, len(beam.token_ids)) == ("stop", 1, 2)
    engine.check_all_free()


def test_beam_seeds_are_splitmix64_of_the_request_seed_and_the_beam():
    """A beam's sampling noise is seeded by splitmix64(seed, beam) (DESIGN.md): the vector
    form the local sampler uses and the scalar one a black-box request sends agree with the
    64-bit arithmetic written out."""
    import random

    import numpy as np

    from w2s_engine.search.request import mix_seed, mix_seeds
    mask = (1 << 64) - 1

    def splitmix(seed, beam):
        z = (seed * 0x9E3779B97F4A7C15 + beam + 1) & mask
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        return (z ^ (z >> 31)) & ((1 << 63) - 1)
    rng = random.Random(0)
    pairs = [(rng.getrandbits(63), rng.getrandbits(20)) for _ in range(500)] + [(0, 0),
                                                                                (2**63 - 1, 0)]
    want = [splitmix(s, b) for s, b in pairs]
    assert [mix_seed(s, b) for s, b in pairs] == want
    got = mix_seeds(np.array([s for s, _ in pairs], np.uint64),
                    np.array([b for _, b in pairs], np.uint64))
    assert [int(x) for x in got] == want


def test_the_steps_and_score_record_no_autograd(engine, monkeypatch):
    # The reward math multiplies hidden states by LM-head weights that require grad: with
    # autograd on, every scoring step would record a graph and keep its saved tensors.
    import w2s_engine.search.small_stream as small_stream
    seen = []
    fused = small_stream.fused_lmhead_chunk_reward

    def spy(*args, **kwargs):
        seen.append(torch.is_grad_enabled())
        return fused(*args, **kwargs)
    monkeypatch.setattr(small_stream, "fused_lmhead_chunk_reward", spy)
    engine.search(PROMPTS[:2], SearchParams.cbs(2, 2, 3, max_new_tokens=6, seed=1))
    engine.score(PROMPTS[:1], [" and then"])
    assert seen and not any(seen)
    assert any(p.requires_grad for p in engine.runners["tuned"].model.parameters())


@pytest.mark.gpu
@pytest.mark.parametrize("vocabularies", ["shared", "cross"])
def test_an_fp32_engine_on_a_gpu_scores_fp32_rewards_even_with_tf32_allowed(
        tok, other_tok, small_pair, vocabularies):
    """Issue 17: fp32 on CUDA is fp32: no TF32 in the kernels' tl.dot, nor in cuBLAS when the
    process allows it (precision.py). Rewards within 1e-4 of a scratch fp32 recompute on the
    CPU (TF32 was 1.8e-3 to 6.3e-3 off)."""
    cross = vocabularies == "cross"
    torch.set_float32_matmul_precision("high")    # the process allows TF32
    try:
        engine = make_engine(tok, small_pair, large_tok=other_tok if cross else None,
                             large_seed=4 if cross else 1, device="cuda", dtype=torch.float32,
                             cuda_graph_max_batch=32)   # 4 prompts x 6 beams: 5 graphs, not 23
        params = SearchParams(w=2, k=3, l=4, max_new_tokens=18, temperature=1.0, seed=5)
        results = engine.search(PROMPTS, params)
        engine.check_all_free()
    finally:
        torch.set_float32_matmul_precision("highest")
    for res in results:
        for h in res.hypotheses:
            response = h.text if cross else h.small_token_ids
            scratch = scratch_reward(small_pair, tok, res.prompt, response, h.finished)
            assert h.reward == pytest.approx(scratch, abs=1e-4)


def test_rewards_of_responses_ending_in_invalid_utf8_equal_score_with_the_hypothesis_finished_flag(
        cross_engine, other_tok):
    # The large model pushed toward lead and continuation bytes (and EOS): chunks end inside
    # or after invalid UTF-8, whose trailing U+FFFD the detokenizer holds back until the beam
    # ends (EOS or max_new_tokens). The reward is score() of the text returned with the
    # hypothesis's own finished flag (a response cut by max_new_tokens is scored without EOS,
    # score()'s default finished=True adds the EOS term).
    vocab = other_tok.get_vocab()
    alphabet = _byte_level_alphabet()
    bias = {vocab[alphabet[b]]: 3.0 for b in range(0x80, 0xf5) if alphabet[b] in vocab}
    bias[other_tok.eos_token_id] = 6.5
    seen = set()
    for params in [SearchParams(w=2, k=2, l=2, max_new_tokens=9, temperature=1.0, seed=3,
                                logit_bias=bias),
                   SearchParams.best_of_n(n=3, max_new_tokens=9, temperature=1.0, seed=5,
                                          logit_bias=bias)]:
        for res in cross_engine.search(PROMPTS, params):
            for h in res.hypotheses:
                seen.add((h.finish_reason, "\ufffd" in h.text))
                assert h.reward == pytest.approx(
                    cross_engine.score([res.prompt], [h.text], finished=h.finished)[0], abs=1e-4)
    assert {("stop", True), ("length", True)} <= seen
    cross_engine.check_all_free()


def _byte_level_alphabet() -> list[str]:
    """GPT-2's byte-level alphabet: the character each byte 0..255 is spelled with."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xa1, 0xad), *range(0xae, 0x100)]
    out, extra = {}, 0
    for b in range(256):
        if b in printable:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return [out[b] for b in range(256)]


def test_a_candidate_whose_reward_is_nan_never_outranks_one_with_a_number(tok, small_pair, engine):
    """A small model whose forward overflows (float16, broken weights) gives NaN rewards to
    the candidates it overflows on. Python's sort leaves a NaN where it stands, so the first
    candidate could win every selection with it, and the search return NaN; it ranks last."""
    params = SearchParams(w=2, k=4, l=4, max_new_tokens=12, seed=5, ignore_eos=True,
                          trace=True)
    healthy = engine.search("The plot of", params)[0]
    # The tuned model breaks on the first candidate's first token (a NaN embedding row), so
    # that the candidate every sort leaves first scores NaN, and so does any that samples it.
    bad = healthy.trace[0]["candidates"][0]["token_ids"][0]
    tuned, untuned = clone(small_pair[0]), small_pair[1]
    with torch.no_grad():
        tuned.model.embed_tokens.weight[bad] = float("nan")
    broken = make_engine(tok, (tuned, untuned))
    result = broken.search("The plot of", params)[0]
    chunks = result.trace
    assert any(c["reward"] != c["reward"] for c in chunks[0]["candidates"])   # NaN met
    for chunk in chunks:
        by_id = {c["beam_id"]: c["reward"] for c in chunk["candidates"]}
        numbers = sorted((r for r in by_id.values() if r == r), reverse=True)
        kept = [by_id[i] for i in chunk["survivors"]]
        assert kept[:len(numbers)] == numbers[:len(kept)]
    assert result.reward == result.reward
    rewards = [h.reward for h in result.hypotheses]
    assert rewards[0] == max(r for r in rewards if r == r)
    broken.check_all_free()


def occurs(word: tuple, tokens: list[int]) -> bool:
    return any(tuple(tokens[i:i + len(word)]) == word for i in range(len(tokens) - len(word) + 1))


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_allowed_token_ids_confine_every_sampled_token_and_bad_words_never_occur(
        tok, small_pair, async_scheduling):
    """vLLM's allowed_token_ids and bad_words: every token of every hypothesis (CBS, each
    beam, through forks) is an allowed one; no bad word's token sequence occurs in any, also
    where the beam's last token is still in flight when the next is drawn (async
    scheduling); the rewards are still the scorer's of what was written."""
    engine = make_engine(tok, small_pair, async_scheduling=async_scheduling)
    greedy = SearchParams.base(max_new_tokens=24, top_k=1, ignore_eos=True, seed=1)
    free = engine.search(["I really"], greedy)[0].token_ids
    # Two-token words from greedy decoding's own text: banning them changes what it picks.
    words = [tok.decode(free[i:i + 2]) for i in (3, 9)]
    banned = greedy.copy(bad_words=words)
    req = engine.make_request("I really", banned)
    assert any(occurs(w, free) for w in req.bad_word_ids if len(w) > 1)
    got = engine.search(["I really"], banned)[0].token_ids
    assert got != free and not any(occurs(w, got) for w in req.bad_word_ids)
    allowed = sorted(set(free[:12]) | {tok.eos_token_id})
    params = SearchParams(w=2, k=3, l=4, max_new_tokens=14, seed=4, temperature=1.5,
                          allowed_token_ids=allowed, bad_words=words)
    for res in engine.search(PROMPTS[:2], params):
        for h in res.hypotheses:
            assert set(h.token_ids) <= set(allowed)
            assert not any(occurs(w, h.token_ids) for w in req.bad_word_ids)
            want = engine.score([res.prompt], [h.small_token_ids], finished=h.finished)[0]
            assert h.reward == pytest.approx(want, abs=1e-4)
    engine.check_all_free()


def test_a_bad_word_is_banned_where_the_tokens_end_with_the_rest_of_it():
    from w2s_engine.large.sampling_words import bad_word_ban
    assert bad_word_ban((7,), [], None) is True                 # one token: always
    assert bad_word_ban((5, 7), [1, 5], None) is True
    assert bad_word_ban((5, 7), [5, 1], None) is None
    assert bad_word_ban((5, 7), [], None) is None
    assert bad_word_ban((4, 5, 7), [4, 5], None) is True
    assert bad_word_ban((4, 5, 7), [5], None) is None
    # the beam's last token in flight (row 3 of the step that sampled it): the device decides
    assert bad_word_ban((5, 7), [1], 3) == 3                     # if it is 5
    assert bad_word_ban((4, 5, 7), [2, 4], 0) == 0               # if it is 5, after a known 4
    assert bad_word_ban((4, 5, 7), [4, 2], 0) is None
    assert bad_word_ban((7,), [1], 2) is True


def test_allowed_token_ids_and_bad_words_are_checked_against_the_large_model(tok, small_pair,
                                                                             engine):
    with pytest.raises(InvalidParam, match="allowed_token_ids=300"):
        engine.make_request("x", SearchParams(allowed_token_ids=[3, 300]))
    with pytest.raises(InvalidParam, match="every allowed token ends the response"):
        engine.make_request("x", SearchParams(allowed_token_ids=[tok.eos_token_id],
                                              min_tokens=2))
    for bad in (["  "], "word", [3], ["x"] * 65):
        with pytest.raises(InvalidParam, match="bad_words"):
            SearchParams(bad_words=bad).validate()


def test_allowed_token_ids_that_bad_words_all_ban_are_refused_not_answered_with_other_ids(
        tok, engine):
    """Every allowed id a one-token bad word (banned at every step): no token is left to
    sample, and the sampler's pick of an all -inf row (token 0) is no allowed id."""
    y, z = tok.convert_tokens_to_ids(["y", "z"])
    for extra in ({}, {"min_tokens": 2}):
        with pytest.raises(InvalidParam, match="bad_words ban every allowed token"):
            engine.make_request("x", SearchParams(allowed_token_ids=[y], bad_words=["y"],
                                                  **extra))
    with pytest.raises(InvalidParam, match="bad_words ban every allowed token"):
        engine.make_request("x", SearchParams(allowed_token_ids=[y, tok.eos_token_id],
                                              bad_words=["y"], min_tokens=2))
    res = engine.search(["I really"], SearchParams.base(
        n=2, max_new_tokens=6, seed=1, allowed_token_ids=[y, z], bad_words=["y"]))[0]
    assert all(set(h.token_ids) <= {z} for h in res.hypotheses)
    engine.check_all_free()


def fail_eft_forward(monkeypatch, bad_ids: list[int], after: int = -1) -> list[int]:
    """EFT's small-model forward raises for the steps that hold the request whose small
    prompt is bad_ids, once some state has more than `after` tokens past it (-1: from its
    first step); returns the failed steps' state counts (filled as they fail)."""
    import w2s_engine.search.small_stream as small_stream
    next_logits = small_stream.SmallStream.next_logits
    failures = []

    def failing(self, states, tokens_from=None):
        if any(st.ids[:len(bad_ids)] == bad_ids for st in states) and \
                any(len(st.ids) > len(bad_ids) + after for st in states):
            failures.append(len(states))
            raise RuntimeError("injected failure in the EFT small models' forward")
        return next_logits(self, states, tokens_from)
    monkeypatch.setattr(small_stream.SmallStream, "next_logits", failing)
    return failures


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_an_eft_forward_failing_for_one_request_fails_it_alone_not_the_step(
        tok, small_pair, monkeypatch, async_scheduling):
    """EFT's small models step inside the large model's decode step. When their forward fails
    for one EFT request, the step gives every state back (the EFT states too) and each request
    runs again alone: only that one fails; a CBS, a plain sampling and another EFT request in
    the same step end as they do alone (the step failed them all)."""
    params = {"cbs": SearchParams(w=2, k=2, l=3, max_new_tokens=8, seed=1),
              "base": SearchParams.base(n=2, max_new_tokens=8, seed=2),
              "eft": SearchParams.eft(beta=1.5, n=2, max_new_tokens=8, seed=3)}
    prompts = {"cbs": "I really", "base": "This film", "eft": "The plot of"}
    alone = {k: make_engine(tok, small_pair, async_scheduling=async_scheduling).search(
        [prompts[k]], p)[0] for k, p in params.items()}
    engine = make_engine(tok, small_pair, async_scheduling=async_scheduling)
    good = {k: engine.enqueue(engine.make_request(prompts[k], p)) for k, p in params.items()}
    bad = engine.enqueue(engine.make_request("What a", params["eft"]))
    bad_ids = bad.small_prompts[0].ids
    failures = fail_eft_forward(monkeypatch, bad_ids, after=2)    # a few tokens in
    while engine.has_unfinished():
        engine.step()
    assert failures and bad.status.name == "FAILED" and "injected" in bad.error
    for k, r in good.items():
        assert r.status.name == "DONE", (k, r.error)
        assert [h.token_ids for h in r.result.hypotheses] == \
            [h.token_ids for h in alone[k].hypotheses], k
        assert r.result.reward == pytest.approx(alone[k].reward, abs=1e-4)
    engine.check_all_free()


@pytest.mark.parametrize("config", [dict(async_scheduling=True), dict(cuda_graphs=True),
                                    dict()])
def test_an_eft_request_steered_before_another_requests_failure_runs_on_alone(
        tok, small_pair, monkeypatch, config):
    """A decode step steers its forwarded EFT rows, then the rows of beams with no token yet
    (a request just prefilled): when the second steering fails, the step runs again each
    request alone, and the EFT request steered first must end as it does alone (its small
    models stepped once, not left a token ahead)."""
    params = SearchParams.eft(beta=1.5, n=1, max_new_tokens=8, seed=3)
    alone = make_engine(tok, small_pair, **config).search(["The plot of"], params)[0]
    engine = make_engine(tok, small_pair, **config)
    good = engine.enqueue(engine.make_request("The plot of", params))
    for _ in range(3):
        engine.step()
    bad = engine.enqueue(engine.make_request("What a", params))
    failures = fail_eft_forward(monkeypatch, bad.small_prompts[0].ids)
    while engine.has_unfinished():
        engine.step()
    assert failures and bad.status.name == "FAILED" and "injected" in bad.error
    assert good.status.name == "DONE", good.error
    assert [h.token_ids for h in good.result.hypotheses] == \
        [h.token_ids for h in alone.hypotheses]
    assert good.result.reward == pytest.approx(alone.reward, abs=1e-4)
    engine.check_all_free()


@pytest.mark.parametrize("config", [dict(async_scheduling=True), dict(cuda_graphs=True),
                                    dict()])
def test_an_eft_request_steered_before_a_failed_sampling_steers_the_same_way_again(
        tok, small_pair, monkeypatch, config):
    """A failure after the steering (in sampling) gives the step back and runs each request
    again alone: the EFT request's small models must be where they were, so that it ends as
    it does alone."""
    import w2s_engine.large.local as local
    params = SearchParams.eft(beta=1.5, n=1, max_new_tokens=8, seed=3)
    base = SearchParams.base(n=1, max_new_tokens=8, seed=2)
    alone = make_engine(tok, small_pair, **config).search(["The plot of"], params)[0]
    engine = make_engine(tok, small_pair, **config)
    good = engine.enqueue(engine.make_request("The plot of", params))
    other = engine.enqueue(engine.make_request("This film", base))
    sample, calls = local.sample, []

    def failing(logits, *args, **kw):
        calls.append(logits.shape[0])
        if len(calls) == 4:
            raise RuntimeError("injected failure in sampling")
        return sample(logits, *args, **kw)
    monkeypatch.setattr(local, "sample", failing)
    while engine.has_unfinished():
        engine.step()
    assert len(calls) > 4
    assert good.status.name == "DONE", good.error
    assert other.status.name == "DONE", other.error
    assert [h.token_ids for h in good.result.hypotheses] == \
        [h.token_ids for h in alone.hypotheses]
    assert good.result.reward == pytest.approx(alone.reward, abs=1e-4)
    engine.check_all_free()
