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


def _call(tokenizer, text: str, **kw):
    with tokenizer_lock(tokenizer):
        return tokenizer(text, **kw)


def encode(tokenizer, text: str, special: bool) -> list[int]:
    return list(_call(tokenizer, text, add_special_tokens=special)["input_ids"])


def tokenize(tokenizer, text: str, special: bool) -> Tokenized:
    enc = _call(tokenizer, text, add_special_tokens=special, return_offsets_mapping=True)
    return Tokenized(text, list(enc["input_ids"]), [s for s, _ in enc["offset_mapping"]])


def tokenize_from(tokenizer, text: str, offset: int) -> Tokenized:
    """tokenize(text[offset:]) without special tokens, with starts counted in `text`."""
    enc = _call(tokenizer, text[offset:], add_special_tokens=False, return_offsets_mapping=True)
    return Tokenized(text, list(enc["input_ids"]), [s + offset for s, _ in enc["offset_mapping"]])


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
