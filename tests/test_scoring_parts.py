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
from tiny_models import clone, make_tokenizer, tiny_llama, tuned_from
from w2s_engine import Engine, SearchParams
from w2s_engine.models.runner import BatchFailed
from w2s_engine.scheduler import MIN_PART_TOKENS, scoring_parts
from w2s_engine.search.request import RequestStatus
from w2s_engine.search.scorer import Scorer

PROMPTS = ["I really", "The plot of this film", "What a", "This movie", "Honestly the",
           "A long and", "My friends", "The actors in it"]
# 8 requests x 16 candidates x 8 tokens = 1,024 scoring tokens at each chunk end: two parts
PARAMS = SearchParams.cbs(4, 4, 8, max_new_tokens=16, seed=3, ignore_eos=True)
TEMPLATES = {"large": "Here is a movie review: {prompt}", "small": "Review: {prompt}"}


@pytest.fixture(scope="module")
def models():
    tok, other = make_tokenizer(300), make_tokenizer(420)
    untuned = tiny_llama(len(tok), seed=2)
    return {"tok": tok, "other": other, "tuned": tuned_from(untuned, seed=3, scale=0.3),
            "untuned": untuned, "large": tiny_llama(len(tok), seed=1, layers=2),
            "large_other": tiny_llama(len(other), seed=4, layers=2)}


def make_engine(models, cross=False, **config):
    large, large_tok = ((models["large_other"], models["other"]) if cross
                        else (models["large"], models["tok"]))
    return Engine((clone(large), large_tok), (clone(models["tuned"]), models["tok"]),
                  (clone(models["untuned"]), models["tok"]), templates=TEMPLATES,
                  num_kv_blocks=3000, block_size=4, progress=False, dtype=torch.float32,
                  device="cpu", **config)


def launches(monkeypatch) -> list[int]:
    """The number of requests in each scoring launch, as they happen."""
    sizes = []
    launch = Scorer.launch

    def counted(self, plans):
        sizes.append(len(plans))
        return launch(self, plans)
    monkeypatch.setattr(Scorer, "launch", counted)
    return sizes


def run(engine, prompts=PROMPTS):
    reqs = [engine.add_request(p, PARAMS) for p in prompts]
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


@pytest.mark.parametrize("cross", [False, True], ids=["one-vocabulary", "two-vocabularies"])
@pytest.mark.parametrize("async_scheduling", [False, True], ids=["waiting", "async"])
def test_chunk_ends_scored_in_parts_give_the_searches_of_one_batch(models, monkeypatch, cross,
                                                                  async_scheduling):
    want = run(make_engine(models, cross=cross, scoring_parts=1,
                           async_scheduling=async_scheduling))
    sizes = launches(monkeypatch)
    got = run(make_engine(models, cross=cross, async_scheduling=async_scheduling))
    assert sizes and all(n == 4 for n in sizes), "each chunk end was scored in two parts of 4"
    assert_same(want, got)


def test_a_part_whose_scoring_read_fails_is_scored_again_per_request_the_other_part_goes_on(
        models, monkeypatch):
    """The read of the second part fails once (rolled back, as a device error would): its
    requests are scored again one at a time, and every search ends as when nothing failed."""
    want = run(make_engine(models, scoring_parts=1))
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
    got = run(make_engine(models))
    assert failed and sizes[:2] == [4, 4] and sizes[2:6] == [1, 1, 1, 1], \
        "the failed part's four requests were scored again one by one"
    assert_same(want, got)


def test_a_request_whose_scoring_fails_in_a_part_fails_alone(models, monkeypatch):
    """One request's scoring forward fails whenever it is in the batch: it fails with the
    error, the three others of its part and the other part's four end as when nothing
    failed, and every block comes back."""
    want = run(make_engine(models, scoring_parts=1))
    engine = make_engine(models)
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
