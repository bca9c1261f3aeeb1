"""Chunk ends scored in parts (EngineConfig.scoring_parts): with no decode step in flight, the
requests whose chunks end in one step are scored in groups, each launched before the one
before it is read, so that a device computes one group while the host plans or selects
another. Each request's scoring and selection are its own: the searches must be those of one
batch, with one vocabulary or two; a group whose scoring fails loses nothing but its culprit;
every block comes back.
"""

from types import SimpleNamespace

import pytest
import torch

import w2s_engine.search.small_stream as small_stream
from tiny_models import search_engines
from w2s_engine import SearchParams
from w2s_engine.models.runner import BatchFailed
from w2s_engine.scheduler import MIN_PART_TOKENS, scoring_parts
from w2s_engine.search.request import RequestStatus
from w2s_engine.search.scorer import Scorer

PROMPTS = ["I really", "The plot of this film", "What a", "This movie", "Honestly the",
           "A long and", "My friends", "The actors in it"]
# 8 requests x 16 candidates x 8 tokens = 1,024 scoring tokens at each chunk end: two parts
PARAMS = SearchParams.cbs(4, 4, 8, max_new_tokens=16, seed=3, ignore_eos=True)
# EOS made likely: beams stop inside chunks, finished survivors are carried, the parts' work
# differs from chunk to chunk (12 requests, so that a chunk end still has work for two parts)
MORE_PROMPTS = PROMPTS + ["It was", "Nobody in", "The ending", "Why would"]
STOPPING = SearchParams.cbs(4, 4, 8, max_new_tokens=24, seed=5, logit_bias={1: 3.0})
TEMPLATES = {"large": "Here is a movie review: {prompt}", "small": "Review: {prompt}"}


def make_engine(cross=False, **config):
    """An engine over the tiny models (tiny_models.search_engines), fp32 on the CPU."""
    config = {"num_kv_blocks": 3000, "dtype": torch.float32, "device": "cpu", **config}
    return search_engines(TEMPLATES, **config)["cross" if cross else "shared"]


def launches(monkeypatch) -> list[int]:
    """The number of requests in each scoring launch, as they happen."""
    sizes = []
    launch = Scorer.launch

    def counted(self, plans):
        sizes.append(len(plans))
        return launch(self, plans)
    monkeypatch.setattr(Scorer, "launch", counted)
    return sizes


def run(engine, prompts=PROMPTS, params=PARAMS):
    reqs = [engine.add_request(p, params) for p in prompts]
    while engine.has_unfinished():
        engine.step()
    engine.check_all_free()
    return reqs


def assert_same(want, got):
    for w, g in zip(want, got):
        assert (g.status, g.error) == (w.status, w.error) == (RequestStatus.DONE, None)
        assert [(h.token_ids, h.text) for h in g.result.hypotheses] == \
               [(h.token_ids, h.text) for h in w.result.hypotheses]
        assert [h.reward for h in g.result.hypotheses] == \
               pytest.approx([h.reward for h in w.result.hypotheses], abs=1e-5)


def fake_request(tokens: int):
    return SimpleNamespace(beams=[SimpleNamespace(chunk_tokens=tokens)])


def test_scoring_parts_group_requests_in_order_by_their_work():
    reqs = [fake_request(t) for t in (300, 300, 300, 300, 100, 100)]
    parts = scoring_parts(reqs, 2)
    assert [r for p in parts for r in p] == reqs
    assert [sum(r.beams[0].chunk_tokens for r in p) for p in parts] == [600, 800]
    assert [len(p) for p in scoring_parts([fake_request(300)] * 8, 4)] == [2, 2, 2, 2]
    # too little work for two parts, one request, or one part asked for: one batch
    assert len(scoring_parts([fake_request(MIN_PART_TOKENS // 4)] * 4, 2)) == 1
    assert len(scoring_parts([fake_request(10 * MIN_PART_TOKENS)], 4)) == 1
    assert len(scoring_parts(reqs, 1)) == 1
    # never more parts than asked for, nor than requests; none empty
    assert len(scoring_parts([fake_request(4 * MIN_PART_TOKENS)] * 3, 8)) == 3
    big = [fake_request(5000), fake_request(10), fake_request(10)]
    assert scoring_parts(big, 3) == [big[:1], big[1:]]


@pytest.mark.parametrize("params", [PARAMS, STOPPING], ids=["full-chunks", "stopping"])
@pytest.mark.parametrize("cross", [False, True], ids=["one-vocabulary", "two-vocabularies"])
@pytest.mark.parametrize("async_scheduling", [False, True], ids=["waiting", "async"])
def test_chunk_ends_scored_in_parts_give_the_searches_of_one_batch(monkeypatch, cross,
                                                                  async_scheduling, params):
    prompts = PROMPTS if params is PARAMS else MORE_PROMPTS
    want = run(make_engine(cross=cross, scoring_parts=1, async_scheduling=async_scheduling),
               prompts, params)
    sizes = launches(monkeypatch)
    got = run(make_engine(cross=cross, async_scheduling=async_scheduling), prompts, params)
    assert sizes[0] < len(prompts), "the first chunk end was scored in parts"
    if params is PARAMS:
        assert all(n == 4 for n in sizes), "each chunk end was scored in two parts of 4"
    else:
        assert any(h.finish_reason == "stop" and len(h.token_ids) % 8
                   for r in want for h in r.result.hypotheses), "beams stopped inside chunks"
    assert_same(want, got)


def test_a_part_whose_scoring_read_fails_is_scored_again_per_request_the_other_part_goes_on(
        monkeypatch):
    """The read of the second part fails once (rolled back, as a device error would): its
    requests are scored again one at a time, and every search ends as when nothing failed."""
    want = run(make_engine(scoring_parts=1))
    read = small_stream.Launched.read
    reads, failed = [0], []

    def flaky(self, blocks):
        reads[0] += 1
        if reads[0] == 2 and not failed:       # the second part's read, at the first chunk end
            failed.append(True)
            with small_stream.failing_as_batch(blocks, self.keep):
                raise RuntimeError("an illegal memory access was encountered")
        return read(self, blocks)
    monkeypatch.setattr(small_stream.Launched, "read", flaky)
    sizes = launches(monkeypatch)
    got = run(make_engine())
    assert failed and sizes[:2] == [4, 4] and sizes[2:6] == [1, 1, 1, 1], \
        "the failed part's four requests were scored again one by one"
    assert_same(want, got)


def test_a_request_whose_scoring_fails_in_a_part_fails_alone(monkeypatch):
    """One request's scoring forward fails whenever it is in the batch: it fails with the
    error, the three others of its part and the other part's four end as when nothing
    failed, and every block comes back."""
    want = run(make_engine(scoring_parts=1))
    engine = make_engine()
    culprit = []
    launch = small_stream.SmallStream.launch

    def failing(self, updates):
        if {id(u.state) for u in updates} & {id(b.small[0]) for b in culprit[0].beams}:
            # as the forward fails (nothing changed yet: retryable)
            raise BatchFailed(retryable=True) from RuntimeError("a row this kernel cannot take")
        return launch(self, updates)
    monkeypatch.setattr(small_stream.SmallStream, "launch", failing)
    reqs = [engine.add_request(p, PARAMS) for p in PROMPTS]
    culprit.append(reqs[5])
    while engine.has_unfinished():
        engine.step()
    engine.check_all_free()
    assert reqs[5].status is RequestStatus.FAILED and "cannot take" in reqs[5].error
    assert_same([w for i, w in enumerate(want) if i != 5],
                [r for i, r in enumerate(reqs) if i != 5])
