"""engine.search_stream(): text as soon as it is final, deltas that add up to the result."""

import pytest

from tiny_models import search_engines
from w2s_engine import SearchParams
from w2s_engine.search.stream import FinalText, SearchDelta, common_prefix_text

PROMPTS = ["I really", "The plot of this film"]


@pytest.fixture(scope="module")
def engines():
    return search_engines({"large": "Here is a movie review: {prompt}",
                           "small": "Review: {prompt}"}, num_kv_blocks=800)


def collect(engine, prompt, params) -> tuple[dict[int, str], list[SearchDelta]]:
    deltas = list(engine.search_stream(prompt, params))
    texts = {}
    for d in deltas:
        texts[d.index] = texts.get(d.index, "") + d.text
    return texts, deltas


@pytest.mark.parametrize("which, params", [
    ("shared", SearchParams.cbs(2, 3, 4, max_new_tokens=14, temperature=1.0, seed=5)),
    ("shared", SearchParams.cbs(3, 2, 2, max_new_tokens=12, temperature=1.2, seed=11,
                                stop=["e", "th"])),
    ("shared", SearchParams.best_of_n(4, max_new_tokens=9, seed=2)),
    ("shared", SearchParams.base(max_new_tokens=12, seed=3)),
    ("shared", SearchParams.base(n=3, max_new_tokens=9, seed=3, stop=["an"])),
    ("shared", SearchParams.eft(beta=1.5, max_new_tokens=10, seed=4)),
    ("shared", SearchParams.eft(beta=1.0, n=3, max_new_tokens=9, seed=6, stop=["an"])),
    ("cross", SearchParams.cbs(2, 2, 3, max_new_tokens=13, temperature=1.0, seed=9)),
], ids=["cbs", "cbs-stop-strings", "best-of-n", "base", "base-3-stop", "eft", "eft-3-stop",
        "cross-vocab"])
def test_the_deltas_concatenate_to_the_result_of_the_same_search(engines, which, params):
    engine = engines[which]
    for prompt in PROMPTS:
        texts, deltas = collect(engine, prompt, params)
        result = deltas[-1].result
        assert result is not None and all(d.result is None for d in deltas[:-1])
        answers = result.hypotheses if params.samples else result.hypotheses[:1]
        assert texts == {i: h.text for i, h in enumerate(answers)}
        # Streaming changes nothing about the search itself.
        alone = engine.search([prompt], params)[0]
        assert [h.token_ids for h in alone.hypotheses] == [h.token_ids for h in result.hypotheses]
    engine.check_all_free()


def test_a_chunk_ending_inside_a_character_is_scored_alike_streamed_or_not(engines):
    # With another tokenizer the scorer reads each candidate's text at its chunk's end. A
    # first chunk here decodes to 'c' and half a character: the complete 'c' must be scored
    # whether or not a stream read the text token by token on the way.
    params = SearchParams.cbs(2, 3, 2, max_new_tokens=10, seed=0, trace=True)
    engine = engines["cross"]
    whole = engine.search(["This film"], params)[0]
    streamed = list(engine.search_stream("This film", params))[-1].result
    # (to rounding: the second search reads the prompt's keys and values the first cached)
    assert streamed.token_ids == whole.token_ids
    assert streamed.reward == pytest.approx(whole.reward, abs=1e-5)

    def rewards(trace):
        return [c.pop("reward") for e in trace for c in e["candidates"]]
    assert rewards(streamed.trace) == pytest.approx(rewards(whole.trace), abs=1e-5)
    assert streamed.trace == whole.trace     # all but the rewards, exactly
    engine.check_all_free()


def test_a_cbs_stream_sends_text_before_the_search_ends_when_survivors_agree(engines):
    # Greedy candidates agree, so their common prefix grows as they sample.
    params = SearchParams.cbs(2, 2, 3, max_new_tokens=12, temperature=0.0, seed=1,
                              ignore_eos=True)
    _, deltas = collect(engines["shared"], "I really", params)
    early = [d for d in deltas[:-1] if d.text]
    assert len(early) >= 3, "text arrived only at the end"
    assert sum(len(d.text) for d in early) > 0.5 * len(deltas[-1].result.text)


def test_plain_sampling_and_eft_stream_as_they_sample(engines):
    # The tiny models sample raw bytes: text grows when a character is complete, so a delta
    # comes with most tokens, not with every one.
    for params in (SearchParams.base(max_new_tokens=12, seed=3, ignore_eos=True),
                   SearchParams.eft(max_new_tokens=12, seed=4, ignore_eos=True)):
        _, deltas = collect(engines["shared"], "What a", params)
        assert len([d for d in deltas[:-1] if d.text]) >= 2


def test_a_consumer_that_stops_early_frees_every_block(engines):
    engine = engines["shared"]
    stream = engine.search_stream("I really", SearchParams.base(max_new_tokens=40, seed=1,
                                                                ignore_eos=True))
    first = next(d for d in stream if d.text)
    assert first.text and first.result is None
    stream.close()
    assert not engine.has_unfinished()
    engine.check_all_free()


def test_an_unfinished_beam_holds_back_what_a_stop_string_could_still_cut():
    class Beam:
        def __init__(self, text, finished=False):
            self.text, self.finished = text, finished
    stream = FinalText("cbs", stop=["\n\n", "END"])
    text_of = lambda b: b.text  # noqa: E731
    # "abc\n" could become "abc" + "\n\n": the last two characters wait.
    assert [d.text for d in stream.update([Beam("abc\nE"), Beam("abc\nEN")], text_of)] == ["abc"]
    assert stream.update([Beam("abc\nEN")], text_of)[0].text == "\n"
    assert stream.update([Beam("abc\nEND", finished=True)], text_of)[0].text == "END"
    assert common_prefix_text(["abd", "abc", "ab"]) == "ab" and common_prefix_text([]) == ""


def test_a_stop_string_that_spans_two_tokens_is_never_streamed_in_part(engines):
    engine = engines["shared"]
    params = SearchParams.base(max_new_tokens=20, seed=3, temperature=0.8, ignore_eos=True)
    free = engine.search(["I really"], params)[0]
    tok = engine.large_tokenizer
    # Character offsets where a token's text ends, in the middle of the response.
    ends = [len(tok.decode(free.token_ids[:j])) for j in range(1, len(free.token_ids))]
    text = free.text
    spans = [p for p in ends if 2 < p < len(text) - 2 and text.find(text[p - 1:p + 1]) == p - 1
             and "\ufffd" not in text[p - 1:p + 1]]
    assert spans, "no token boundary to put a stop string across"
    p = spans[len(spans) // 2]
    stop = text[p - 1:p + 1]
    texts, deltas = collect(engine, "I really", params.copy(stop=[stop]))
    assert deltas[-1].result.text == text[:p - 1]
    assert texts[0] == text[:p - 1]


def test_a_stream_whose_last_text_fails_still_ends_with_its_result_and_logs_why(
        engines, monkeypatch, caplog):
    # An engine error finishing the text of a search that is already done loses no result: the
    # stream's last delta still carries it (it was dropped without a word).
    engine = engines["shared"]
    params = SearchParams.cbs(2, 2, 3, max_new_tokens=9, seed=1)
    want = engine.search(["I really"], params)[0]

    def broken(self, result):
        raise RuntimeError("finish broke")

    monkeypatch.setattr(FinalText, "finish", broken)
    with caplog.at_level("ERROR", logger="w2s_engine.engine"):
        deltas = list(engine.search_stream("I really", params))
    assert deltas[-1].result is not None
    assert [h.token_ids for h in deltas[-1].result.hypotheses] == \
        [h.token_ids for h in want.hypotheses]
    assert "finish broke" in caplog.text
    engine.check_all_free()
