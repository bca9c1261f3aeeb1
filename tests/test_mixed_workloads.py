"""Mixed workloads through add_request + step: CBS of several shapes, Best-of-N, plain sampling
and EFT of several betas, each with its own length, stop strings, seed and sampling, arriving
at different steps into a KV pool that holds only some of them at once, one cancelled
part-way. Each request that ends must end as it does alone (the same tokens, texts, finish
reasons; rewards to 1e-4 in fp32), every reward must be score() of what it returned, and
every block and reservation must come back.
"""

import random
import signal

import pytest
import torch

from tiny_models import clone, make_tokenizer, tiny_llama, tuned_from
from w2s_engine import Engine, SearchError, SearchParams
from w2s_engine.search.request import RequestStatus

PROMPTS = ["I really", "The plot of this film", "What a", "This film was a waste"]
TEMPLATES = {"large": "Here is a movie review: {prompt}", "small": "Review: {prompt}"}
EOS = 1   # the tiny models' EOS id


@pytest.fixture(scope="module")
def models():
    tok = make_tokenizer(300)
    untuned = tiny_llama(len(tok), seed=2)
    return {"tok": tok, "tuned": tuned_from(untuned, seed=3, scale=0.3), "untuned": untuned,
            "large": tiny_llama(len(tok), seed=1, layers=3)}


@pytest.fixture
def deadline():
    """A scenario that hangs (a request never admitted) fails instead of blocking the suite."""
    def expired(*_):
        raise TimeoutError("the mixed workload did not finish in 60 s: a deadlock?")
    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def make_engine(models, **config):
    tok = models["tok"]
    return Engine((clone(models["large"]), tok), (clone(models["tuned"]), tok),
                  (clone(models["untuned"]), tok), templates=TEMPLATES, block_size=4,
                  progress=False, dtype=torch.float32, device="cpu",
                  **{"num_kv_blocks": 800, **config})


def random_params(rng) -> SearchParams:
    common = dict(max_new_tokens=rng.randint(3, 14), seed=rng.randrange(1000),
                  logit_bias={EOS: rng.choice([0.0, 1.5, 3.0])},
                  min_tokens=rng.choice([0, 0, 2]), stop=rng.choice([[], ["a"], ["e", "th"]]),
                  temperature=rng.choice([1.0, 0.7, 0.0]), top_k=rng.choice([0, 20]),
                  top_p=rng.choice([1.0, 0.9]))
    kind = rng.choice(["cbs", "cbs", "bon", "base", "eft", "eft"])
    if kind == "eft":
        return SearchParams.eft(beta=rng.choice([0.5, 1.5, -1.0]), n=rng.randint(1, 3), **common)
    if kind == "cbs":
        return SearchParams.cbs(rng.randint(1, 3), rng.randint(1, 3), rng.randint(1, 5), **common)
    if kind == "bon":
        return SearchParams.best_of_n(rng.randint(1, 4), **common)
    return SearchParams.base(n=rng.randint(1, 3), **common)


def assert_same(alone, batched):
    assert len(alone.hypotheses) == len(batched.hypotheses)
    for a, b in zip(alone.hypotheses, batched.hypotheses):
        assert (a.token_ids, a.text, a.finish_reason) == (b.token_ids, b.text, b.finish_reason)
        assert (a.reward is None) == (b.reward is None)
        if a.reward is not None:
            assert b.reward == pytest.approx(a.reward, abs=1e-4)


def assert_scored_as_returned(engine, tok, prompt, result):
    """A reward is score() of the response returned: the sampled ids, or the text where a stop
    string cut it (as the engine scores a cut response)."""
    for h in result.hypotheses:
        if h.reward is None:
            continue
        stopped = h.finish_reason == "stop"
        cut = stopped and h.text != tok.decode(h.token_ids, skip_special_tokens=True)
        response = h.text if cut else list(h.token_ids)
        assert engine.score([prompt], [response], finished=stopped)[0] == \
            pytest.approx(h.reward, abs=1e-4)


@pytest.mark.parametrize("scenario", range(8))
def test_a_mixed_workload_in_a_small_pool_ends_each_request_as_alone(models, scenario, deadline):
    rng = random.Random(scenario)
    spec = [(PROMPTS[rng.randrange(4)], random_params(rng), rng.randint(0, 6))
            for _ in range(5)]
    solo = make_engine(models)
    alone = [solo.search([p], params)[0] for p, params, _ in spec]
    # A pool that holds the largest request alone and little beside it: the others wait.
    largest = max(max(solo.make_request(p, params).reserved.values()) for p, params, _ in spec)
    engine = make_engine(models, num_kv_blocks=largest + scenario,
                         async_scheduling=scenario % 2 == 1, scoring_parts=1 + scenario % 2)
    victim, cancel_at = rng.randrange(len(spec)), rng.randint(1, 8)
    handles, step, waited = [None] * len(spec), 0, 0
    while step <= 6 or engine.has_unfinished():
        for i, (p, params, at) in enumerate(spec):
            if at == step:
                handles[i] = engine.add_request(p, params)
        if handles[victim] is not None and step == spec[victim][2] + cancel_at:
            engine.cancel(handles[victim])
        waited = max(waited, engine.stats()["waiting"])
        engine.step()
        step += 1
    assert waited > 0, "the pool was meant to make requests wait"
    engine.check_all_free()
    assert set(engine.budget.reserved.values()) == {0}
    for i, (h, want) in enumerate(zip(handles, alone)):
        if i == victim and h.status is RequestStatus.CANCELLED:
            continue
        assert (h.status, h.error) == (RequestStatus.DONE, None)
        assert_same(want, h.result)
        assert_scored_as_returned(engine, models["tok"], spec[i][0], h.result)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_a_stop_cut_that_outgrows_its_reservation_waits_for_room_and_ends_as_alone(
        models, async_scheduling, deadline):
    """A response a stop string cut re-tokenizes to more small tokens than were sampled (22
    for 13 here) and reserved: beside a request holding the rest of the pool, it waits for
    that one to end and then scores as it does alone (it failed, saying to retry when the
    engine is less busy); admissions pause meanwhile. Alone, past what the pool can ever
    give, it fails at once, saying what to change."""
    params = SearchParams.cbs(2, 3, 5, max_new_tokens=14, temperature=0.0, min_p=0.05, seed=70,
                              stop=["e", "th"], min_tokens=2, presence_penalty=0.8,
                              frequency_penalty=0.5, logit_bias={EOS: 1.5})
    other = SearchParams.cbs(2, 2, 4, max_new_tokens=16, seed=1, ignore_eos=True)
    solo = make_engine(models)
    alone = solo.search(["The plot of this film"], params)[0]
    assert len(alone.hypotheses[0].small_token_ids) > len(alone.hypotheses[0].token_ids)
    need = {k: solo.make_request("The plot of this film", params).reserved[k]
            + solo.make_request("I really", other).reserved[k] for k in ("large", 0)}
    engine = make_engine(models, num_kv_blocks=max(need.values()),
                         async_scheduling=async_scheduling)
    first = engine.add_request("I really", other)
    grows = engine.add_request("The plot of this film", params)
    late = engine.add_request("What a", other)     # queued: admitted after the wait
    waited = False
    while engine.has_unfinished():
        engine.step()
        waited |= bool(grows.waits_for_room)
        if grows.waits_for_room:
            assert late.status is RequestStatus.WAITING   # admissions pause for it
    assert waited, "the pool was meant to make the cut response wait for room"
    assert [r.status for r in (first, grows, late)] == [RequestStatus.DONE] * 3, grows.error
    assert_same(alone, grows.result)
    engine.check_all_free()
    tight = make_engine(models, num_kv_blocks=solo.make_request(
        "The plot of this film", params).reserved[0] + 4)
    with pytest.raises(SearchError, match="were sampled .KV was reserved for those.*pool of "
                                          r"\d+ blocks cannot hold the \d+ it needs: lower"):
        tight.search(["The plot of this film"], params)
    tight.check_all_free()
