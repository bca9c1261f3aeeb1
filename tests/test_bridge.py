"""The cross-tokenizer bridge equals full decoding and full re-tokenization at every step."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tiny_models import make_byte_fallback_tokenizer, make_tokenizer
from w2s_engine.search.bridge import DetokState, Detokenizer, retokenize
from w2s_engine.search.prompts import SmallPrompt
from w2s_engine.search.tokens import _backend, _encode, common_prefix, common_prefix_after, \
    encode, tokenize

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
@given(prompt=st.lists(st.sampled_from(PIECES), min_size=1, max_size=20),
       chunks=st.lists(st.lists(st.lists(st.sampled_from(PIECES), max_size=4), min_size=1,
                                max_size=4), min_size=1, max_size=6),
       special=st.booleans())
def test_extend_many_of_siblings_sharing_a_parent_equals_full_ids(tok, prompt, chunks,
                                                                  special):
    # A chunk's candidates share their parent's lists (SmallState.fork): the prompt prefix
    # found once per list must be each candidate's own.
    text = "Review: I really liked the plot. " + "".join(prompt)   # tokens kept before it
    sp = SmallPrompt(tok, text, *(lambda t: (t.ids, t.starts))(tokenize(tok, text, special)),
                     special)
    parent, response = tokenize(tok, text, special), ""
    for candidates in chunks:
        responses = [response + "".join(c) for c in candidates]
        news = sp.extend_many([parent] * len(responses), responses)
        for (new, start, _), r in zip(news, responses):
            assert (new.ids, start) == sp.full_ids(r)
        parent, response = news[-1][0], responses[-1]


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


@settings(max_examples=100, deadline=None)
@given(pieces=st.lists(st.sampled_from(PIECES), min_size=1, max_size=30),
       chunk=st.integers(2, 6))
def test_detokenized_text_depends_on_the_tokens_not_on_how_often_it_was_read(other, pieces,
                                                                               chunk):
    # The scorer reads a beam's text at chunk ends, a stream after every token: a search
    # must score the same text either way (a window ending inside a character held back
    # the complete characters before it too, so the two saw different chunk texts).
    ids = other("".join(pieces), add_special_tokens=False)["input_ids"]
    d = Detokenizer(other)
    every_token, chunk_ends = DetokState(), DetokState()
    for end in range(1, len(ids) + 1):
        d.update(every_token, ids[:end])
        if end % chunk == 0:
            assert d.update(chunk_ends, ids[:end]) == every_token.text
            assert every_token.text == d.decode(ids[:end]).rstrip("\ufffd") or \
                "\ufffd" in d.decode(ids)
    assert d.update(chunk_ends, ids, flush=True) == d.update(every_token, ids, flush=True)


@settings(max_examples=200, deadline=None)
@given(pieces=st.lists(st.sampled_from(PIECES + ["𠀀", "\u00e9"]), min_size=1, max_size=12),
       cut=st.integers(0, 3), stray=st.lists(st.integers(0x80, 0xFF), max_size=3),
       reads=st.lists(st.booleans(), min_size=60, max_size=60))
def test_byte_fallback_text_is_the_decode_however_often_it_was_read(pieces, cut, stray, reads):
    # SentencePiece's byte tokens: a run that ends inside a character decodes to U+FFFD for
    # every byte of it, the complete characters before the cut too (Gemma's tokenizer). A
    # stream reading every token and a search reading at chunk ends must get the same text,
    # the decode of the tokens (a stream's text equal to the whole answer's).
    tok = make_byte_fallback_tokenizer()
    ids = tok("".join(pieces), add_special_tokens=False)["input_ids"]
    ids = ids[:max(1, len(ids) - cut)]                     # maybe inside a character
    ids += tok.convert_tokens_to_ids([f"<0x{b:02X}>" for b in stray])   # maybe invalid bytes
    d = Detokenizer(tok)
    every_token, some = DetokState(), DetokState()
    for end in range(1, len(ids) + 1):
        d.update(every_token, ids[:end])
        if reads[end % len(reads)]:
            assert d.update(some, ids[:end]) == every_token.text
        assert tok.decode(ids).startswith(every_token.text)     # what is read is final
    assert d.update(some, ids, flush=True) == d.update(every_token, ids, flush=True) \
        == tok.decode(ids)


def test_fork_of_detokenizer_state_is_independent(other):
    d = Detokenizer(other)
    ids = other("I really liked it", add_special_tokens=False)["input_ids"]
    a = DetokState()
    d.update(a, ids[:3])
    b = a.copy()
    d.update(b, ids)
    assert a.text == d.decode(ids[:3]) and b.text == d.decode(ids)


TEXTS = ["", "Review: I really liked it.", "<bos>hello<eos> there", "  电影 🎬 don't\n\nstop!",
         "x" * 300, "👍🏽é—"]


def wrapper_encoding(tokenizer, texts, special):
    enc = tokenizer(texts, add_special_tokens=special, return_offsets_mapping=True)
    return [(list(ids), [s for s, _ in offsets])
            for ids, offsets in zip(enc["input_ids"], enc["offset_mapping"])]


@pytest.mark.parametrize("special", [False, True])
def test_rust_backend_path_gives_the_transformers_call_ids_and_offsets(tok, special):
    assert _backend(tok) is not None     # the test tokenizer takes the fast path
    assert _encode(tok, TEXTS, special) == wrapper_encoding(tok, TEXTS, special)
    assert [encode(tok, t, special) for t in TEXTS] == \
        [ids for ids, _ in wrapper_encoding(tok, TEXTS, special)]


def test_a_backend_with_stored_truncation_is_encoded_as_transformers_does_untruncated():
    tok = make_tokenizer(300)
    tok._tokenizer.enable_truncation(max_length=3)
    assert _backend(tok) is None
    ids, _ = _encode(tok, ["Review: I really liked it a lot."], True)[0]
    assert len(ids) > 3
    assert _backend(tok) is not None     # the transformers call turned truncation off


@settings(max_examples=200, deadline=None)
@given(a=st.lists(st.integers(0, 3), max_size=40), b=st.lists(st.integers(0, 3), max_size=40))
def test_common_prefix_is_the_first_position_where_the_lists_differ(a, b):
    n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    assert common_prefix(a, b) == common_prefix(b, a) == n
    assert common_prefix(a, a + b) == len(a)
    # and of two texts (the bridge: where a re-decoded response first differs)
    chars = "ab\u00e9\U0001F600"
    assert common_prefix("".join(chars[x] for x in a), "".join(chars[x] for x in b)) == n
    # told a known equal prefix (the bridge's kept tokens), however long (a list cut shorter)
    for same in {0, n // 2, n, len(a), len(a) + 2}:
        if a[:min(same, len(b))] == b[:min(same, len(a))]:
            assert common_prefix_after(a, b, same) == n


@settings(max_examples=100, deadline=None)
@given(ids=st.lists(st.integers(0, 299), max_size=40))
def test_rust_backend_decode_gives_the_transformers_decode(other, ids):
    d = Detokenizer(other)
    assert d.backend is not None
    assert d.decode(ids) == other.decode(ids, skip_special_tokens=True,
                                         clean_up_tokenization_spaces=False)


@settings(max_examples=50, deadline=None)
@given(pieces=st.lists(st.sampled_from(PIECES), min_size=1, max_size=20))
def test_tokens_own_bytes_join_into_the_text_even_where_a_character_is_split(other, pieces):
    # OpenAI's logprobs `bytes`: the UTF-8 of '电' is three byte-level tokens here, each of
    # which decodes alone to U+FFFD; their bytes must still join into the text.
    from w2s_engine.search.tokens import token_bytes
    text = "".join(pieces)
    ids = other(text, add_special_tokens=False)["input_ids"]
    texts = other.batch_decode([[i] for i in ids])
    assert b"".join(token_bytes(other, ids, texts)) == text.encode("utf-8")


@settings(max_examples=200, deadline=None)
@given(pieces=st.lists(st.sampled_from(["a", "the", " film", "电", "🎬", "\u00e9", "<bos>",
                                        "<eos>", "<unk>"]), min_size=1, max_size=12),
       cut=st.integers(0, 3), reads=st.lists(st.booleans(), min_size=40, max_size=40))
def test_byte_fallback_run_across_a_skipped_special_token_reads_the_same_however_often(
        pieces, cut, reads):
    # A special token the decode skips (a model may sample <pad>, <bos> ... mid-response) does
    # not end a run of byte tokens for the decoder: <0x46><bos><0xE4> then a word decodes to
    # U+FFFD U+FFFD, the 'F' too. Text read at every token and at chunk ends must agree, and
    # be the decode of the tokens.
    tok = make_byte_fallback_tokenizer()
    specials = {"<bos>", "<eos>", "<unk>"}
    ids = []
    for p in pieces:
        ids += (tok.convert_tokens_to_ids([p]) if p in specials else
                tok(p, add_special_tokens=False)["input_ids"])
    ids = ids[:max(1, len(ids) - cut)]
    d = Detokenizer(tok)
    every_token, some = DetokState(), DetokState()
    for end in range(1, len(ids) + 1):
        d.update(every_token, ids[:end])
        if reads[end % len(reads)]:
            assert d.update(some, ids[:end]) == every_token.text
        assert tok.decode(ids, skip_special_tokens=True).startswith(every_token.text)
    assert d.update(some, ids, flush=True) == d.update(every_token, ids, flush=True) \
        == tok.decode(ids, skip_special_tokens=True)


def test_text_before_a_skipped_special_token_inside_a_byte_run_is_not_sent_early():
    tok = make_byte_fallback_tokenizer()
    ids = tok.convert_tokens_to_ids(["<0x46>", "<bos>", "<0xE4>", "\u2581the"])
    d = Detokenizer(tok)
    every_token, at_end = DetokState(), DetokState()
    for end in range(1, len(ids) + 1):
        d.update(every_token, ids[:end])
    assert d.update(at_end, ids) == every_token.text == tok.decode(ids, skip_special_tokens=True) \
        == "\ufffd\ufffd the"
