"""The one tokenizing helper: text -> ids (and where each token starts), special tokens or not.

Every place that turns text into ids goes through here (the large model's prompt, the small
models' prompts and responses, the cross-tokenizer bridge), so that a prompt is counted the
way it was encoded.

Requests are tokenized off the engine thread (the server prepares them in a thread pool) while
the engine thread tokenizes too (the bridge). A Hugging Face fast tokenizer used from several
threads at once can fail with "Already borrowed" when one call changes its settings, so each
tokenizer is used by one thread at a time (a lock per tokenizer instance).
"""

import threading
import weakref
from dataclasses import dataclass

import tokenizers

_locks: "weakref.WeakKeyDictionary[object, threading.Lock]" = weakref.WeakKeyDictionary()
_locks_guard = threading.Lock()


def tokenizer_lock(tokenizer) -> threading.Lock:
    """The lock that serializes calls into one tokenizer instance."""
    with _locks_guard:
        lock = _locks.get(tokenizer)
        if lock is None:
            lock = _locks[tokenizer] = threading.Lock()
        return lock


@dataclass
class Tokenized:
    """A tokenization of `text` with the character offset where each token starts."""

    text: str
    ids: list[int]
    starts: list[int]


def _backend(tokenizer):
    """The Rust tokenizer behind a fast tokenizer, where calling it straight gives what the
    transformers call gives (and saves that call's ~20 us of Python, per beam and chunk in
    the bridge): the call only turns off a truncation or padding stored in the backend and
    sets its encode_special_tokens from split_special_tokens, then encodes. None where the
    backend's settings differ from those (the transformers call then sets them) or there is
    no Rust backend (a slow tokenizer)."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if not isinstance(backend, tokenizers.Tokenizer) or backend.truncation is not None \
            or backend.padding is not None or backend.encode_special_tokens != \
            bool(getattr(tokenizer, "split_special_tokens", False)):
        return None
    return backend


def _encode(tokenizer, texts: list[str], special: bool) -> list[tuple[list[int], list[int]]]:
    """(ids, character offset where each token starts) of each text, in one call."""
    if not texts:
        return []
    with tokenizer_lock(tokenizer):
        backend = _backend(tokenizer)
        if backend is not None:
            return [(enc.ids, [s for s, _ in enc.offsets])
                    for enc in backend.encode_batch(texts, add_special_tokens=special)]
        enc = tokenizer(texts, add_special_tokens=special, return_offsets_mapping=True)
    return [(list(ids), [s for s, _ in offsets])
            for ids, offsets in zip(enc["input_ids"], enc["offset_mapping"])]


def encode(tokenizer, text: str, special: bool) -> list[int]:
    with tokenizer_lock(tokenizer):
        backend = _backend(tokenizer)
        if backend is not None:
            return backend.encode(text, add_special_tokens=special).ids
        return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def tokenize(tokenizer, text: str, special: bool) -> Tokenized:
    return tokenize_many(tokenizer, [text], special)[0]


def tokenize_many(tokenizer, texts: list[str], special: bool) -> list[Tokenized]:
    return [Tokenized(text, ids, starts)
            for text, (ids, starts) in zip(texts, _encode(tokenizer, texts, special))]


def tokenize_from(tokenizer, text: str, offset: int) -> Tokenized:
    """tokenize(text[offset:]) without special tokens, with starts counted in `text`."""
    return tokenize_many_from(tokenizer, [text], [offset])[0]


def tokenize_many_from(tokenizer, texts: list[str], offsets: list[int]) -> list[Tokenized]:
    """tokenize_from of many texts in one call into the tokenizer."""
    out = _encode(tokenizer, [t[o:] for t, o in zip(texts, offsets)], False)
    return [Tokenized(t, ids, [s + o for s in starts])
            for t, o, (ids, starts) in zip(texts, offsets, out)]


def common_prefix(a: list[int] | str, b: list[int] | str) -> int:
    """Length of the longest common prefix of two lists or strings: slice compares (in C),
    bisected."""
    if a is b:
        return len(a)
    if len(a) > len(b):
        a, b = b, a
    n = len(a)
    if a == b[:n]:          # the usual case (a stream extended): one slice, not two
        return n
    lo, hi = 0, n          # a[:lo] == b[:lo] and a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo


def common_prefix_after(a: list[int], b: list[int], same: int) -> int:
    """common_prefix(a, b) where a[:same] == b[:same] is known (the bridge kept those tokens):
    only the rest is compared, not a prompt's hundreds of tokens per beam and chunk."""
    same = min(same, len(a), len(b))
    return same + common_prefix(a[same:], b[same:]) if same else common_prefix(a, b)


def _byte_alphabet() -> dict[str, int]:
    """Byte-level BPE's (GPT-2's) printable stand-in for each byte -> the byte: the
    printable Latin-1 bytes stand for themselves, the others for 256 + their rank."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return {c: b for b, c in chars.items()}


BYTE_OF = _byte_alphabet()


def token_bytes(tokenizer, ids: list[int], texts: list[str]) -> list[bytes]:
    """Each token's own bytes (OpenAI's logprobs `bytes`: a character split over tokens is
    whole again when theirs are joined). Byte-level BPE tokens map their characters back to
    bytes; SentencePiece's byte tokens <0xNN> are that byte; any other token (a special one,
    a piece of whole characters) is its text's UTF-8 (`texts`: each decoded alone)."""
    pieces = tokenizer.convert_ids_to_tokens(ids)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    byte_level = type(getattr(backend, "decoder", None)).__name__ == "ByteLevel"
    special = set(getattr(tokenizer, "all_special_ids", ()))
    out = []
    for i, piece, text in zip(ids, pieces, texts):
        if (byte_level and i not in special and isinstance(piece, str)
                and all(c in BYTE_OF for c in piece)):
            out.append(bytes(BYTE_OF[c] for c in piece))
        elif isinstance(piece, str) and len(piece) == 6 and piece.startswith("<0x") \
                and piece.endswith(">"):
            out.append(bytes([int(piece[3:5], 16)]))
        else:
            out.append(text.encode("utf-8"))
    return out
