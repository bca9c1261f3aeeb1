"""Async scheduling (EngineConfig(async_scheduling=True)): the host launches decode step n+1,
fed step n's tokens on the device, before it reads step n's tokens, and records them while
the device computes.

The searches must not change: the same tokens, texts, finish reasons, rewards and log-probs
as the engine that waits for every step's tokens, with EOS and stop strings (a beam that
stops computes one token more, dropped, and gives its slot back), min_tokens, biases,
penalties (the token in flight counted on the device), EFT (its small models fed the token
in flight) and chunk ends (the next chunk waits for the read); a cancelled request or a
failing batch or read with a step in flight loses nothing; every block comes back.

A scoring queued while a decode step of other requests is in flight is read the next step
(EngineConfig.scoring_ahead, on by default): the same results again, with a request cancelled
or a read failing while it is in flight.
"""

import pytest
import torch

import w2s_engine.large.local as local
import w2s_engine.search.small_stream as small_stream
from tiny_models import clone, make_tokenizer, tiny_llama, tuned_from
from w2s_engine import Engine, SearchParams
from w2s_engine.search.request import RequestStatus

PROMPTS = ["I really", "The plot of this film", "What a"]
EOS = 1   # the tiny models' EOS id
TEMPLATES = {"large": "Here is a movie review: {prompt}", "small": "Review: {prompt}"}


@pytest.fixture(scope="module")
def models():
    tok, other = make_tokenizer(300), make_tokenizer(420)
    untuned = tiny_llama(len(tok), seed=2)
    return {"tok": tok, "other": other, "tuned": tuned_from(untuned, seed=3, scale=0.3),
            "untuned": untuned, "large": tiny_llama(len(tok), seed=1, layers=3),
            "large_other": tiny_llama(len(other), seed=4, layers=3)}


def make_engine(models, cross=False, **config):
    large, large_tok = ((models["large_other"], models["other"]) if cross
                        else (models["large"], models["tok"]))
    config = {"device": "cpu", **config}
    return Engine((clone(large), large_tok), (clone(models["tuned"]), models["tok"]),
                  (clone(models["untuned"]), models["tok"]), templates=TEMPLATES,
                  num_kv_blocks=800, block_size=4, progress=False, dtype=torch.float32,
                  **config)


def run(engine, params, prompts=PROMPTS, logprobs=None):
    """The prompts' requests stepped to the end (log-probs with `logprobs` alternatives)."""
    reqs = []
    for p in prompts:
        r = engine.make_request(p, params)
        r.logprobs = logprobs       # as the server sets it
        reqs.append(engine.enqueue(r))
    while engine.has_unfinished():
        engine.step()
    assert [r.error for r in reqs] == [None] * len(reqs)
    engine.check_all_free()
    return [r.result for r in reqs]


def assert_same(want, got, tol=1e-5):
    """The same hypotheses (tokens, texts, finish reasons), rewards and log-probs to `tol`:
    a step's batch may hold the stopped beams' extra rows, which moves fp32 sums slightly."""
    for w, g in zip(want, got):
        pairs = list(zip(w.hypotheses, g.hypotheses))
        assert len(w.hypotheses) == len(g.hypotheses)
        assert [(h.token_ids, h.text, h.finish_reason) for h, _ in pairs] == \
               [(h.token_ids, h.text, h.finish_reason) for _, h in pairs]
        for hw, hg in pairs:
            assert (hg.reward is None) == (hw.reward is None)
            if hw.reward is not None:
                assert hg.reward == pytest.approx(hw.reward, abs=tol)
            if hw.logprobs is not None:
                assert [(e.token_id, [t for t, _ in e.top]) for e in hg.logprobs] == \
                       [(e.token_id, [t for t, _ in e.top]) for e in hw.logprobs]
                assert [e.logprob for e in hg.logprobs] == \
                       pytest.approx([e.logprob for e in hw.logprobs], abs=tol)


SEARCHES = {
    # EOS made likely, so that beams stop mid-chunk while the next step is in flight
    "cbs-eos": SearchParams.cbs(2, 3, 4, max_new_tokens=24, seed=5, logit_bias={EOS: 3.0}),
    "cbs-stop-strings": SearchParams.cbs(2, 2, 5, max_new_tokens=24, seed=9, stop=["a"],
                                         logit_bias={EOS: 2.0}),
    "best-of-n": SearchParams.best_of_n(4, max_new_tokens=20, seed=2, logit_bias={EOS: 2.5}),
    "base-min-tokens": SearchParams.base(n=4, max_new_tokens=40, seed=3, min_tokens=6,
                                         logit_bias={EOS: 3.0}),
    # penalties count the token in flight on the device
    "cbs-penalties": SearchParams.cbs(2, 2, 4, max_new_tokens=16, seed=4, presence_penalty=0.5,
                                      frequency_penalty=0.4, repetition_penalty=1.3,
                                      logit_bias={EOS: 1.0}),
    "base-penalties-min-tokens": SearchParams.base(n=3, max_new_tokens=24, seed=8,
                                                   repetition_penalty=2.0, min_tokens=5,
                                                   frequency_penalty=1.5, logit_bias={EOS: 2.5}),
    # EFT's small models are fed the token in flight too
    "eft": SearchParams.eft(beta=1.5, n=2, max_new_tokens=12, seed=6, logit_bias={EOS: 2.0}),
    # stop token ids (vLLM's) end beams as EOS does, and min_tokens bans them until then
    "cbs-stop-token-ids": SearchParams.cbs(2, 3, 4, max_new_tokens=24, seed=5, ignore_eos=True,
                                           stop_token_ids=[7], logit_bias={7: 3.0}),
    "eft-stop-token-ids-min-tokens": SearchParams.eft(beta=1.5, n=3, max_new_tokens=16, seed=6,
                                                      min_tokens=4, stop_token_ids=[7],
                                                      logit_bias={7: 3.0}),
}


@pytest.mark.parametrize("static", [False, True], ids=["eager", "static-buffers"])
@pytest.mark.parametrize("search", list(SEARCHES))
def test_async_scheduling_gives_the_same_search_results(models, search, static):
    params = SEARCHES[search]
    config = {"cuda_graphs": static, "cuda_graph_max_batch": 16}
    want = run(make_engine(models, **config), params, logprobs=2)
    got = run(make_engine(models, async_scheduling=True, **config), params, logprobs=2)
    assert_same(want, got)
    if search.startswith(("cbs-eos", "cbs-stop-token")):   # the case it is for did happen
        assert any(h.finish_reason == "stop" and 0 < len(h.token_ids) for r in want
                   for h in r.hypotheses)


def test_async_scheduling_with_another_tokenizer_gives_the_same_search_results(models):
    params = SearchParams.cbs(2, 2, 4, max_new_tokens=16, seed=8, logit_bias={EOS: 2.0})
    assert_same(run(make_engine(models, cross=True), params),
                run(make_engine(models, cross=True, async_scheduling=True), params))


def test_a_streamed_search_with_async_scheduling_streams_its_result(models):
    """The text streamed step by step (a step behind the device) adds up to the result's."""
    engine = make_engine(models, async_scheduling=True)
    params = SearchParams.cbs(2, 2, 4, max_new_tokens=20, seed=1, logit_bias={EOS: 1.0})
    deltas = list(engine.search_stream("I really", params))
    result = deltas[-1].result
    assert "".join(d.text for d in deltas) == result.text
    assert result.token_ids == run(make_engine(models), params, ["I really"])[0].token_ids
    engine.check_all_free()


@pytest.mark.gpu
@pytest.mark.parametrize("search", ["cbs-eos", "cbs-stop-strings", "base-min-tokens",
                                    "cbs-penalties", "eft"])
def test_async_scheduling_on_a_gpu_with_graphs_gives_the_same_search_results(models, search):
    """fp32 on CUDA with the decode graphs captured (EFT's small models' too): the carried
    rows' tokens are gathered into the staged rows outside the graph, before its replay."""
    config = {"device": "cuda", "cuda_graph_max_batch": 64}
    waits = make_engine(models, async_scheduling=False, **config)   # (on with CUDA if left out)
    assert waits.runners["large"].graphs.graphs, "graphs were captured"
    want = run(waits, SEARCHES[search], logprobs=2)
    got = run(make_engine(models, async_scheduling=True, **config), SEARCHES[search],
              logprobs=2)
    assert_same(want, got, tol=1e-4)


def launch_and_read_order(engine, monkeypatch, params):
    """One request searched; the order of the decode steps' launches (L: sampling queued)
    and reads of their tokens (R)."""
    events = []
    sample, result = local.sample, local.DeviceRead.result
    monkeypatch.setattr(local, "sample", lambda *a: events.append("L") or sample(*a))
    monkeypatch.setattr(local.DeviceRead, "result",
                        lambda self: events.append("R") or result(self))
    run(engine, params, prompts=["I really"])
    return "".join(events)


@pytest.mark.parametrize("penalties", [False, True], ids=["no-penalties", "penalties"])
@pytest.mark.parametrize("asynchronous", [False, True], ids=["waits", "async"])
def test_the_host_launches_the_next_step_before_it_reads_the_tokens_within_a_chunk(
        models, monkeypatch, asynchronous, penalties):
    """CBS(1,2,4) over 8 tokens: two chunks of four steps. Waiting, each step's tokens are
    read before the next launch. Async, every step is left in flight and step n+1 is
    launched before step n's tokens are read; after a chunk's last step nothing of the
    request can go until that step is read and scored, so the next engine step reads it
    with no launch between, and the next chunk's first step is fed from the host.
    Penalties do not change that (they count the token in flight on the device)."""
    more = {"presence_penalty": 0.5, "repetition_penalty": 1.2} if penalties else {}
    params = SearchParams.cbs(1, 2, 4, max_new_tokens=8, seed=3, ignore_eos=True, **more)
    engine = make_engine(models, async_scheduling=asynchronous)
    order = launch_and_read_order(engine, monkeypatch, params)
    assert order == ("LLRLRLRR" * 2 if asynchronous else "LR" * 8)
    stats = engine.stats()     # what /metrics reports of it
    assert stats["decode_steps"] == 8


def test_eft_runs_ahead_its_small_models_fed_the_token_in_flight(models, monkeypatch):
    """EFT steps the small models with each token: with async scheduling they are fed it on
    the device too, so every step is launched before the previous one is read."""
    params = SearchParams.eft(beta=1.0, n=2, max_new_tokens=8, seed=3, ignore_eos=True)
    engine = make_engine(models, async_scheduling=True)
    assert launch_and_read_order(engine, monkeypatch, params) == "L" + "LR" * 7 + "R"
    assert engine.stats()["decode_steps"] == 8


@pytest.mark.parametrize("method", ["cbs", "eft"])
def test_a_beam_that_stops_gives_back_the_slot_the_step_in_flight_took(models, method):
    """A beam that samples EOS while the next step is in flight was fed EOS there; once its
    EOS is read that slot goes back: a stopped beam's large-model table holds the prompt and
    the tokens it fed (its response), as when the engine waits; with EFT its small models'
    table holds no more than its ids (EOS is no token of theirs)."""
    engine = make_engine(models, async_scheduling=True)
    params = (SearchParams.cbs(2, 3, 6, max_new_tokens=30, seed=5, logit_bias={EOS: 3.0})
              if method == "cbs" else
              SearchParams.eft(beta=1.0, n=4, max_new_tokens=30, seed=5, logit_bias={EOS: 3.0}))
    reqs = [engine.add_request(p, params) for p in PROMPTS]
    stopped = 0
    while engine.has_unfinished():
        engine.step()
        for r in reqs:
            for b in r.beams if r.status is RequestStatus.RUNNING else ():
                if b.finish_reason == "stop" and b.token_ids:
                    stopped += 1
                    assert b.large.num_tokens == len(r.large_prompt_ids) + len(b.token_ids)
                    if method == "eft":
                        assert b.small[0].table.num_tokens <= len(b.small[0].ids)
    assert stopped
    engine.check_all_free()


def test_a_request_cancelled_with_its_step_in_flight_leaves_the_others_as_they_were(models):
    params = SearchParams.cbs(2, 2, 6, max_new_tokens=18, seed=2, logit_bias={EOS: 1.5})
    want = run(make_engine(models), params, prompts=PROMPTS[:2])
    engine = make_engine(models, async_scheduling=True)
    reqs = [engine.add_request(p, params) for p in PROMPTS]
    while engine.large.in_flight is None or not any(
            r is reqs[2] for r, _ in engine.large.in_flight.order):
        engine.step()
    engine.cancel(reqs[2])
    while engine.has_unfinished():
        engine.step()
    assert reqs[2].status is RequestStatus.CANCELLED
    assert_same(want, [r.result for r in reqs[:2]])
    engine.check_all_free()


def test_a_decode_batch_that_fails_with_a_step_in_flight_fails_only_its_culprit(
        models, monkeypatch):
    """The batch fails after the step before it was launched: that step's tokens are
    recorded, each request runs again alone (waiting for its tokens), only the culprit fails,
    the others end as they would have, and every block comes back."""
    params = SearchParams.cbs(2, 2, 5, max_new_tokens=15, seed=4, logit_bias={EOS: 1.5})
    want = run(make_engine(models), params, prompts=["I really", "What a"])
    engine = make_engine(models, async_scheduling=True)
    reqs = [engine.add_request(p, params) for p in ("I really", "POISON", "What a")]
    real = engine.large.runner.decode_logits
    failures = []

    def decode_logits(items, words, tokens_from=None, requests=None):
        poisoned = any(table is b.large for table, _ in items for b in reqs[1].beams)
        if poisoned and len(reqs[1].beams[0].token_ids) >= 3:
            failures.append(tokens_from is not None)
            raise RuntimeError("a row this kernel cannot take")
        return real(items, words, tokens_from, requests)
    monkeypatch.setattr(engine.large.runner, "decode_logits", decode_logits)
    while engine.has_unfinished():
        engine.step()
    assert failures[0], "the first failing batch was launched on a step in flight"
    assert [r.status for r in reqs] == [RequestStatus.DONE, RequestStatus.FAILED,
                                        RequestStatus.DONE]
    assert "RuntimeError: a row this kernel cannot take" in reqs[1].error
    assert_same(want, [reqs[0].result, reqs[2].result])
    engine.check_all_free()



def random_params(rng) -> SearchParams:
    common = dict(max_new_tokens=rng.randint(4, 20), seed=rng.randrange(1000),
                  logit_bias={EOS: rng.choice([0.0, 1.5, 3.0])},
                  min_tokens=rng.choice([0, 0, 3]), stop=rng.choice([[], ["a"], ["e", "th"]]),
                  temperature=rng.choice([1.0, 0.7]), top_k=rng.choice([0, 20]),
                  presence_penalty=rng.choice([0.0, 0.0, 0.8]),
                  repetition_penalty=rng.choice([1.0, 1.0, 1.5]))
    kind = rng.choice(["cbs", "cbs", "bon", "base", "eft"])
    if kind == "eft":
        return SearchParams.eft(beta=rng.choice([0.5, 1.5]), n=rng.randint(1, 3), **common)
    if kind == "cbs":
        return SearchParams.cbs(rng.randint(1, 3), rng.randint(1, 3), rng.randint(1, 5), **common)
    if kind == "bon":
        return SearchParams.best_of_n(rng.randint(1, 4), **common)
    return SearchParams.base(n=rng.randint(1, 3), **common)


@pytest.mark.parametrize("scenario", range(12))
def test_requests_that_arrive_and_leave_at_random_steps_search_as_when_the_engine_waits(
        models, scenario):
    """A property: requests of random methods and parameters admitted at random steps (so
    that their chunk ends fall on different steps), one cancelled part-way; each other
    request's result is the one the waiting engine gives, and every block comes back."""
    import random
    rng = random.Random(scenario)
    arrivals = sorted([(rng.randint(0, 12), PROMPTS[i % 3], random_params(rng))
                       for i in range(5)], key=lambda a: a[0])
    cancel_at = (rng.randrange(5), rng.randint(1, 10))   # (request, steps after its arrival)
    results = []
    for asynchronous, ahead in ((False, False), (True, True), (True, False)):
        engine = make_engine(models, async_scheduling=asynchronous, scoring_ahead=ahead)
        reqs, step = [], 0
        while len(reqs) < len(arrivals) or engine.has_unfinished():
            for at, prompt, params in arrivals[len(reqs):]:
                if at > step:
                    break
                reqs.append((engine.add_request(prompt, params), step))
            if len(reqs) > cancel_at[0] and step == reqs[cancel_at[0]][1] + cancel_at[1]:
                engine.cancel(reqs[cancel_at[0]][0])
            engine.step()
            step += 1
        engine.check_all_free()
        results.append([r for r, _ in reqs])
    waits = results[0]
    for overlapped in results[1:]:     # scorings read a step later, and at once
        for i, (w, o) in enumerate(zip(waits, overlapped)):
            # (async ends a request a step later when its last tokens were in flight: the
            # cancel may find it running in one engine and done in the other)
            if i == cancel_at[0] and RequestStatus.CANCELLED in (w.status, o.status):
                continue
            assert (w.status, w.error) == (RequestStatus.DONE, None) == (o.status, o.error)
            assert_same([w.result], [o.result])


@pytest.mark.parametrize("failing_read", [2, 4, 6, 9, 12])
def test_a_read_that_fails_puts_both_steps_back_and_the_requests_run_again(
        models, monkeypatch, failing_read):
    """A device error surfaces where the host waits: at a step's read, with the next step
    maybe launched on top (requests admitted a step apart, so that one forks its next chunk
    while another's step is in flight). Both steps' slots go back, the tokens are not
    recorded, and the engine runs each request again alone: the searches end as when
    nothing failed, and every block comes back."""
    params = SearchParams.cbs(2, 2, 4, max_new_tokens=12, seed=6, logit_bias={EOS: 1.5},
                              presence_penalty=0.3)
    want = run(make_engine(models), params)
    engine = make_engine(models, async_scheduling=True)
    reads = []
    result = local.DeviceRead.result

    def flaky(self):
        reads.append(self)
        if len(reads) == failing_read:
            raise RuntimeError("an illegal memory access was encountered")
        return result(self)
    monkeypatch.setattr(local.DeviceRead, "result", flaky)
    reqs = []
    while len(reqs) < len(PROMPTS) or engine.has_unfinished():
        if len(reqs) < len(PROMPTS):
            reqs.append(engine.add_request(PROMPTS[len(reqs)], params))
        engine.step()
    assert len(reads) > failing_read
    assert [r.error for r in reqs] == [None] * len(reqs)
    assert_same(want, [r.result for r in reqs])
    engine.check_all_free()


def run_staggered(engine, params, prompts=PROMPTS, every=1, on_step=None):
    """The prompts admitted one every `every` steps (their chunks end on different steps),
    stepped to the end; on_step(engine, requests) before each step."""
    reqs, step = [], 0
    while len(reqs) < len(prompts) or engine.has_unfinished():
        if step % every == 0 and len(reqs) < len(prompts):
            reqs.append(engine.add_request(prompts[len(reqs)], params))
        if on_step is not None:
            on_step(engine, reqs)
        engine.step()
        step += 1
    engine.check_all_free()
    return reqs


STAGGERED = SearchParams.cbs(2, 2, 4, max_new_tokens=14, seed=7, logit_bias={EOS: 1.0})


def test_a_scoring_behind_another_requests_step_is_read_the_next_step(models):
    """Requests a step apart: each one's scoring is queued behind the others' decode step and
    read the step after (the request starts its next chunk a step later); read at once
    instead, and with the engine waiting, the results are the same."""
    want = run(make_engine(models), STAGGERED)
    steps = {}
    for ahead in (True, False):
        engine = make_engine(models, async_scheduling=True, scoring_ahead=ahead)
        reqs = run_staggered(engine, STAGGERED)
        assert [r.error for r in reqs] == [None] * len(reqs)
        assert_same(want, [r.result for r in reqs])
        assert (engine.stats()["scorings_ahead"] > 0) == ahead
        steps[ahead] = engine.stats()["decode_steps"]
    assert steps[True] > steps[False]     # what it costs: a step per chunk end read ahead


def test_a_request_cancelled_with_its_scoring_in_flight_leaves_the_others_as_they_were(models):
    want = run(make_engine(models), STAGGERED, prompts=PROMPTS[:2])
    cancelled = []

    def cancel_in_flight(engine, reqs):
        ahead = engine.scoring_ahead
        if not cancelled and ahead is not None and len(reqs) == 3 \
                and reqs[2] in ahead.requests:
            engine.cancel(reqs[2])
            cancelled.append(reqs[2])
    engine = make_engine(models, async_scheduling=True)
    reqs = run_staggered(engine, STAGGERED, on_step=cancel_in_flight)
    assert cancelled and reqs[2].status is RequestStatus.CANCELLED
    assert [r.error for r in reqs[:2]] == [None, None]
    assert_same(want, [r.result for r in reqs[:2]])


@pytest.mark.parametrize("together", [1, 2], ids=["one-request", "two-requests"])
def test_a_scoring_read_that_fails_a_step_later_is_handled_as_a_failed_batch(
        models, monkeypatch, together):
    """The read of a scoring launched the step before fails (rolled back): as for any failed
    batch, each request in it runs again alone, or, alone in it, fails; the others end as
    when nothing failed and every block comes back."""
    prompts = ["I really", "What a", "The plot of this film"]
    want = run(make_engine(models), STAGGERED, prompts=prompts)
    engine = make_engine(models, async_scheduling=True)
    failing, failed = [False], []
    read = small_stream.Launched.read

    def flaky_read(self, blocks):
        if failing[0]:
            failing[0] = False
            with small_stream.failing_as_batch(blocks, self.keep):
                raise RuntimeError("an illegal memory access was encountered")
        return read(self, blocks)
    monkeypatch.setattr(small_stream.Launched, "read", flaky_read)
    finish_scoring = engine._finish_scoring

    def fail_once(ahead):
        if not failed and len(ahead.requests) == together:
            failing[0] = True
            failed.append(list(ahead.requests))
        return finish_scoring(ahead)
    monkeypatch.setattr(engine, "_finish_scoring", fail_once)
    # two requests admitted together (their chunks end on the same steps, scored in one
    # batch) or a step apart, and a third two steps after the first, whose decode steps the
    # others' scorings queue behind
    engine_reqs = []
    step = 0
    admit = {0: [prompts[0], prompts[1]] if together == 2 else [prompts[0]],
             1: [] if together == 2 else [prompts[1]], 2: [prompts[2]]}
    while step in admit or engine.has_unfinished():
        for p in admit.get(step, []):
            engine_reqs.append(engine.add_request(p, STAGGERED))
        engine.step()
        step += 1
    engine.check_all_free()
    assert failed and not failing[0], "a scoring read a step later failed"
    hit = failed[0]
    for r, w in zip(engine_reqs, want):
        if together == 1 and r in hit:
            assert r.status is RequestStatus.FAILED and "illegal memory access" in r.error
        else:
            assert r.error is None
            assert_same([w], [r.result])
