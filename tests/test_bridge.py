"""The cross-tokenizer bridge equals full decoding and full re-tokenization at every step."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tiny_models import make_tokenizer
from w2s_engine.search.bridge import DetokState, Detokenizer, retokenize
from w2s_engine.search.tokens import tokenize

PIECES = ["I", " really", " liked", " it", ".", "  ", "   ", "\n", "\n\n", "🎬", "电影", "é",
          "don't", " the", "plot", "!", "?", " ", "ab", "x", "—", "👍🏽"]


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer(300)


@pytest.fixture(scope="module")
def other():
    return make_tokenizer(420)


@settings(max_examples=150, deadline=None)
@given(pieces=st.lists(st.sampled_from(PIECES), min_size=1, max_size=30),
       cuts=st.lists(st.integers(1, 6), min_size=1, max_size=12), special=st.booleans())
def test_tail_retokenization_equals_full_tokenization_at_every_chunk(tok, pieces, cuts, special):
    text = "Review: " + "".join(pieces)
    state = tokenize(tok, "Review: ", special)
    pos = len("Review: ")
    for cut in cuts + [len(text)]:
        pos = min(len(text), pos + cut)
        state = retokenize(tok, special, state, text[:pos])
        full = tokenize(tok, text[:pos], special)
        assert state.ids == full.ids and state.starts == full.starts


@settings(max_examples=150, deadline=None)
@given(pieces=st.lists(st.sampled_from(PIECES), min_size=1, max_size=30),
       chunk=st.integers(1, 5))
def test_incremental_detokenization_equals_full_decode(other, pieces, chunk):
    ids = other("".join(pieces), add_special_tokens=False)["input_ids"]
    d = Detokenizer(other)
    state = DetokState()
    for end in range(chunk, len(ids) + chunk, chunk):
        text = d.update(state, ids[:end])
        assert d.decode(ids[:end]).startswith(text)
        assert "\ufffd" not in text or "\ufffd" in d.decode(ids)
    assert d.update(state, ids, flush=True) == d.decode(ids)


def test_fork_of_detokenizer_state_is_independent(other):
    d = Detokenizer(other)
    ids = other("I really liked it", add_special_tokens=False)["input_ids"]
    a = DetokState()
    d.update(a, ids[:3])
    b = a.copy()
    d.update(b, ids)
    assert a.text == d.decode(ids[:3]) and b.text == d.decode(ids)
