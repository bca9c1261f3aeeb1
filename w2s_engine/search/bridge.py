"""The cross-tokenizer bridge: large-model tokens -> text -> small-model tokens, incrementally.

When the tokenizers differ, the small models score tokenize(small prompt + response text).
Appending text can only change the tail of that tokenization (a word split at a chunk
boundary, a multi-byte character completed), so:
- Detokenizer turns new large-model tokens into text by decoding a short window of tokens
  (never the whole response), holding back an incomplete UTF-8 character;
- retokenize() re-tokenizes only a tail window of the small stream, anchored on a few
  committed tokens before it that must come back unchanged (else the window widens), and
  splices the result onto the committed prefix. The scorer then keeps the longest common
  prefix in the KV cache and rolls back the rest.
"""

import bisect
from dataclasses import dataclass

import tokenizers

from w2s_engine.search.tokens import Tokenized, common_prefix, tokenize_many, tokenize_many_from

REPLACEMENT = "\ufffd"  # what a decoder yields for an incomplete UTF-8 sequence


@dataclass
class DetokState:
    text: str = ""
    prefix_offset: int = 0   # first token of the decode window
    read_offset: int = 0     # tokens before this are already in `text`
    held: int = 0            # characters of the tokens from read_offset on already in `text`

    def copy(self) -> "DetokState":
        return DetokState(self.text, self.prefix_offset, self.read_offset, self.held)


class Detokenizer:
    """Incremental decode: equal to tokenizer.decode(all ids) once flushed. Before that, the
    text of ids is their decode less a trailing incomplete character, however often update
    ran on the way (the scorer reads it at chunk ends, a stream at every token: a search
    must see the same text either way).

    A byte-fallback decoder (SentencePiece's: Gemma, Llama 2) decodes a run of byte tokens
    (<0xF0>...) as a whole, and where the run ends inside a character every byte of it
    becomes U+FFFD, complete characters before the cut too. So the text of a run is final
    only once a token that is no byte ends it: until then it is held back, and `unsettled`
    gives its complete characters as they stand (where stop strings are looked for)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.backend = rust_decoder(tokenizer)
        self.byte_tokens = byte_fallback_ids(tokenizer)
        # Tokens the decode skips (skip_special_tokens) vanish before the decoder sees the
        # rest: a run of byte tokens goes on across them (<0xE4><pad><0xB8><0xAD> is one
        # character), so they end no run.
        self.skipped = skipped_ids(tokenizer) if self.byte_tokens else frozenset()

    def decode(self, ids: list[int]) -> str:
        if self.backend is not None:
            return self.backend.decode(ids, skip_special_tokens=True)
        return self.tokenizer.decode(ids, skip_special_tokens=True,
                                     clean_up_tokenization_spaces=False)

    def update(self, state: DetokState, ids: list[int], flush: bool = False) -> str:
        """Bring state.text up to ids; keeps a trailing partial character back unless flush."""
        if state.read_offset >= len(ids):
            return state.text
        # Decoding from one token earlier keeps tokenizer-specific leading-space rules right.
        prefix = self.decode(ids[state.prefix_offset:state.read_offset])
        full = self.decode(ids[state.prefix_offset:])
        if len(full) <= len(prefix):
            return state.text
        new = full[len(prefix):]
        run = self._byte_run_start(ids, state.read_offset)
        if flush or (run == len(ids) and not new.endswith(REPLACEMENT)):
            state.text += new[state.held:]
            state.prefix_offset = state.read_offset
            state.read_offset = len(ids)
            state.held = 0
        else:
            # The tokens end inside a character, or in a run of byte tokens: what comes
            # before it is final already.
            if run < len(ids):
                new = self.decode(ids[state.prefix_offset:run])[len(prefix):]
            complete = new.rstrip(REPLACEMENT)
            if len(complete) > state.held:
                state.text += complete[state.held:]
                state.held = len(complete)
        return state.text

    def unsettled(self, state: DetokState, ids: list[int]) -> str:
        """state.text (after update) and the complete characters of a run of byte tokens it
        holds back: the text as it stands now. A stop string is looked for in it, at every
        token (the rare run that turns invalid later reads as U+FFFD once flushed)."""
        if self._byte_run_start(ids, state.read_offset) == len(ids):
            return state.text      # nothing held back but a partial character
        prefix = self.decode(ids[state.prefix_offset:state.read_offset])
        now = self.decode(ids[state.prefix_offset:])[len(prefix):].rstrip(REPLACEMENT)
        return state.text + now[state.held:]

    def _byte_run_start(self, ids: list[int], start: int) -> int:
        """Where the run of byte tokens that ends ids begins (len(ids): ids end in no byte
        token, skipped tokens aside); not before start, where the unread tokens begin."""
        i, run = len(ids), len(ids)
        while i > start and (ids[i - 1] in self.byte_tokens or ids[i - 1] in self.skipped):
            i -= 1
            if ids[i] in self.byte_tokens:
                run = i
        return run


def byte_fallback_ids(tokenizer) -> frozenset[int]:
    """The ids of a SentencePiece vocabulary's byte tokens <0x00> ... <0xFF> (none in a
    byte-level BPE's, whose tokens are bytes already)."""
    ids = tokenizer.convert_tokens_to_ids([f"<0x{b:02X}>" for b in range(256)])
    unknown = tokenizer.unk_token_id
    return frozenset(i for i in ids if i is not None and i != unknown)


def skipped_ids(tokenizer) -> frozenset[int]:
    """The ids decode(skip_special_tokens=True) leaves out: the special tokens (more at
    worst: such a token only holds a run's text back until a token that is no byte)."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return frozenset(i for i, t in added.items() if getattr(t, "special", False)) | \
        frozenset(getattr(tokenizer, "all_special_ids", ()))


def rust_decoder(tokenizer):
    """The Rust tokenizer behind a fast tokenizer, where transformers' decode (with
    clean_up_tokenization_spaces=False) is its decode and nothing else: the class takes decode
    and _decode from transformers' fast-tokenizer base classes, which only convert the ids and
    call it. Straight, it saves ~10 us of Python a call, and streaming and stop strings
    decode every beam at every step. None otherwise (a slow tokenizer, or a class with its
    own decode)."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if not isinstance(backend, tokenizers.Tokenizer):
        return None

    def owner(name):
        return next((k.__module__ for k in type(tokenizer).__mro__ if name in vars(k)), None)

    if owner("decode") != "transformers.tokenization_utils_base" or owner("_decode") not in (
            "transformers.tokenization_utils_tokenizers", "transformers.tokenization_utils_fast"):
        return None
    return backend


def retokenize(tokenizer, special: bool, old: Tokenized, text: str, tail: int = 6,
               anchor: int = 2) -> Tokenized:
    """tokenize(text), computed from `old` by re-tokenizing a tail window only."""
    return retokenize_many(tokenizer, special, [old], [text], tail, anchor)[0][0]


def retokenize_many(tokenizer, special: bool, olds: list[Tokenized], texts: list[str],
                    tail: int = 6, anchor: int = 2) -> list[tuple[Tokenized, int]]:
    """retokenize() of many streams (every candidate of a chunk), their tail windows in one
    call into the tokenizer per round; a stream whose anchor moved widens its window and goes
    again in the next round. Each with how many of its old tokens it kept as they are (its
    ids[:kept] are old.ids[:kept]; 0 where the text was tokenized whole): what the old
    tokenization already tells of the new one need not be compared again (extend_many)."""
    out: list[tuple[Tokenized, int] | None] = [None] * len(texts)
    todo = []                   # (stream, tokens of old that start before the change, tail)
    for i, (old, text) in enumerate(zip(olds, texts)):
        # First character where the texts differ; tokens starting well before it are kept.
        # (Token starts never decrease: the tokens before it are a bisection away, not a scan
        # of the prompt's and response's every token, per candidate and chunk.)
        d = common_prefix(old.text, text)
        todo.append((i, bisect.bisect_left(old.starts, d), tail))
    while todo:
        whole, windows = [], []
        for i, touched, t in todo:
            first = touched - t - anchor   # window start: anchor tokens, then the tail
            if first <= 0 or (special and first <= 1):
                whole.append(i)
            else:
                windows.append((i, touched, t, first))
        for i, tok in zip(whole, tokenize_many(tokenizer, [texts[i] for i in whole], special)):
            out[i] = (tok, 0)
        tails = tokenize_many_from(tokenizer, [texts[i] for i, *_ in windows],
                                   [olds[i].starts[first] for i, _, _, first in windows])
        todo = []
        for (i, touched, t, first), tail_tok in zip(windows, tails):
            old, keep = olds[i], touched - t          # tokens kept as they are
            if (tail_tok.ids[:anchor] == old.ids[first:keep]
                    and tail_tok.starts[:anchor] == old.starts[first:keep]):
                ids, starts = old.ids[:keep], old.starts[:keep]   # one copy each, extended
                ids += tail_tok.ids[anchor:]
                starts += tail_tok.starts[anchor:]
                out[i] = (Tokenized(texts[i], ids, starts), keep)
            else:
                todo.append((i, touched, 2 * t))   # the anchor moved: the change reaches back
    return out
