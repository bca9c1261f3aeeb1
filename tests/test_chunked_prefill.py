"""Long prompts are prefilled in chunks of max_batch_tokens, so that a new long prompt delays
the decode of running requests by one chunk at most, and the search comes out the same."""

import pytest

from tiny_models import clone, make_tokenizer, tiny_llama, tuned_from
from w2s_engine import Engine, SearchParams
from w2s_engine.search.request import RequestStatus

LONG = "The plot of this film is simple, but the characters are wonderful. " * 6


@pytest.fixture(scope="module")
def parts():
    tok = make_tokenizer(300)
    untuned = tiny_llama(len(tok), seed=2)
    return tok, tiny_llama(len(tok), seed=1, layers=3), tuned_from(untuned, seed=3, scale=0.3), \
        untuned


def make(parts, max_batch_tokens):
    tok, large, tuned, untuned = parts
    return Engine((clone(large), tok), (clone(tuned), tok), (clone(untuned), tok),
                  num_kv_blocks=600, block_size=4, progress=False,
                  max_batch_tokens=max_batch_tokens)


def test_a_prompt_prefilled_in_chunks_gives_the_same_search(parts):
    params = SearchParams.cbs(2, 2, 3, max_new_tokens=9, temperature=1.0, seed=3)
    whole = make(parts, 8192).search([LONG], params)[0]
    chunked_engine = make(parts, 16)
    chunked = chunked_engine.search([LONG], params)[0]
    assert chunked.stats.prompt_tokens > 4 * 16     # several chunks
    assert [h.token_ids for h in chunked.hypotheses] == [h.token_ids for h in whole.hypotheses]
    assert [h.reward for h in chunked.hypotheses] == pytest.approx(
        [h.reward for h in whole.hypotheses], abs=1e-4)
    assert chunked.stats.tokens_forwarded == whole.stats.tokens_forwarded
    chunked_engine.check_all_free()


def test_running_requests_decode_every_step_while_a_long_prompt_is_prefilled(parts):
    engine = make(parts, 16)
    params = SearchParams.cbs(2, 2, 4, max_new_tokens=40, seed=1, ignore_eos=True)
    short = engine.add_request("I really", params)
    engine.step()
    assert short.status is RequestStatus.RUNNING
    long = engine.add_request(LONG, params)
    steps = 0
    while long.status is RequestStatus.PREFILLING or steps == 0:
        before = short.stats.tokens_sampled
        engine.step()
        steps += 1
        assert short.stats.tokens_sampled == before + 4    # every beam sampled a token
        assert long.prefilled <= 16 * steps                # one chunk a step, at most
    assert steps == -(-len(long.large_prompt_ids) // 16)
    assert long.status is RequestStatus.RUNNING
    while engine.has_unfinished():
        engine.step()
    assert short.status is long.status is RequestStatus.DONE
    engine.check_all_free()


def test_a_request_cancelled_while_its_prompt_is_prefilled_frees_its_blocks(parts):
    engine = make(parts, 16)
    req = engine.add_request(LONG, SearchParams.cbs(2, 2, 4, max_new_tokens=8, seed=1))
    engine.step()
    assert req.status is RequestStatus.PREFILLING and req.prefilled == 16
    engine.cancel(req)
    assert req.status is RequestStatus.CANCELLED and not engine.has_unfinished()
    engine.check_all_free()


def test_every_model_forwards_at_most_max_batch_tokens_of_prompt_a_step(parts):
    # The small models' prompts go in chunk by chunk beside the large model's, not whole in the
    # step the large prompt completes (which stalled every running request for that step).
    engine = make(parts, 16)
    per_step = {}
    req = engine.make_request(LONG, SearchParams.cbs(2, 2, 4, max_new_tokens=8, seed=1))
    for role, runner in engine.runners.items():
        def counting(items, *rest, _run=runner.run, _role=role):
            if req.status is RequestStatus.PREFILLING:    # not the first decode after it
                per_step[_role] = per_step.get(_role, 0) + sum(len(ids) for _, ids in items)
            return _run(items, *rest)
        runner.run = counting
    engine.enqueue(req)
    steps = 0
    while req.status is not RequestStatus.RUNNING:
        per_step.clear()
        engine.step()
        steps += 1
        assert set(per_step) == {"large", "tuned", "untuned"}
        assert max(per_step.values()) <= 16, per_step
    longest = max(len(req.large_prompt_ids), *(len(sp.ids) for sp in req.small_prompts))
    assert steps == -(-longest // 16)
    while engine.has_unfinished():
        engine.step()
    assert req.status is RequestStatus.DONE
    engine.check_all_free()


@pytest.mark.parametrize("role", ["large", "untuned"])
def test_a_prompt_whose_later_chunk_fails_fails_alone_and_the_batch_goes_on(parts, role):
    # The failing batch puts every request back to admitted and runs each alone: each whole
    # prompt, so the culprit fails now (run alone for one chunk it passed, and the next step's
    # batch failed again: no request ever started).
    params = SearchParams.cbs(2, 2, 3, max_new_tokens=6, seed=3, temperature=1.0)
    alone = make(parts, 16).search([LONG, "This film"], params)
    engine = make(parts, 16)
    reqs = [engine.add_request(p, params) for p in ("POISON " + LONG, LONG, "This film")]
    poison, run = reqs[0], engine.runners[role].run

    def table(r):
        if r.root is None:
            return None
        return r.root.large if role == "large" else (r.root.small[0].table if r.root.small
                                                     else None)

    def failing(items, *rest):     # any chunk of the culprit's prompt but its first
        t = table(poison)
        if poison.status is RequestStatus.PREFILLING and any(
                tb is t and t.num_tokens > len(ids) for tb, ids in items):
            raise RuntimeError("this chunk cannot run")
        return run(items, *rest)
    engine.runners[role].run = failing
    for _ in range(60):
        if not engine.has_unfinished():
            break
        engine.step()
    assert [r.status for r in reqs] == [RequestStatus.FAILED, RequestStatus.DONE,
                                        RequestStatus.DONE]
    assert "this chunk cannot run" in poison.error
    for r, want in zip(reqs[1:], alone):
        assert r.result.token_ids == want.token_ids
        assert r.result.reward == pytest.approx(want.reward, abs=1e-4)
    engine.check_all_free()


def counting_forwards(engine) -> dict:
    """role -> tokens its runner forwarded (updated as the engine runs)."""
    forwarded = {}
    for role, runner in engine.runners.items():
        def counting(items, *rest, _run=runner.run, _role=role):
            forwarded[_role] = forwarded.get(_role, 0) + sum(len(ids) for _, ids in items)
            return _run(items, *rest)
        runner.run = counting
    return forwarded


def test_a_request_cancelled_mid_prefill_counts_the_prompt_tokens_it_forwarded(parts):
    engine = make(parts, 16)
    forwarded = counting_forwards(engine)
    req = engine.add_request(LONG, SearchParams.cbs(2, 2, 4, max_new_tokens=8, seed=1))
    for _ in range(3):
        engine.step()
    assert req.status is RequestStatus.PREFILLING
    engine.cancel(req)
    assert forwarded == {"large": 48, "tuned": 48, "untuned": 48}
    assert req.stats.tokens_forwarded == forwarded == engine.stats()["tokens"]
    engine.check_all_free()


def test_with_async_scheduling_a_scoring_read_after_its_request_ended_is_counted_once(parts):
    tok, large, tuned, untuned = parts
    engine = Engine((clone(large), tok), (clone(tuned), tok), (clone(untuned), tok),
                    num_kv_blocks=600, block_size=4, progress=False, async_scheduling=True)
    forwarded = counting_forwards(engine)
    params = SearchParams.cbs(2, 2, 3, max_new_tokens=12, ignore_eos=True)
    reqs = [engine.add_request("I really", params.copy(seed=1))]
    engine.step()
    reqs.append(engine.add_request("This film", params.copy(seed=2)))
    for _ in range(100):
        engine.step()
        if engine.scoring_ahead:
            break
    assert engine.scoring_ahead, "a scoring should be queued behind a decode step"
    engine.cancel(engine.scoring_ahead.requests[0])    # read at the next step, after it ended
    while engine.has_unfinished():
        engine.step()
    totals = engine.stats()["tokens"]
    assert all(totals[role] == forwarded[role] for role in ("tuned", "untuned"))
    assert totals == {role: sum(r.stats.tokens_forwarded.get(role, 0) for r in reqs)
                      for role in totals}
    engine.check_all_free()
