"""The one tokenizing helper: text -> ids (and where each token starts), special tokens or not.

Every place that turns text into ids goes through here (the large model's prompt, the small
models' prompts and responses, the cross-tokenizer bridge), so that a prompt is counted the
way it was encoded.
"""

from dataclasses import dataclass


@dataclass
class Tokenized:
    """A tokenization of `text` with the character offset where each token starts."""

    text: str
    ids: list[int]
    starts: list[int]


def encode(tokenizer, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def tokenize(tokenizer, text: str, special: bool) -> Tokenized:
    enc = tokenizer(text, add_special_tokens=special, return_offsets_mapping=True)
    return Tokenized(text, list(enc["input_ids"]), [s for s, _ in enc["offset_mapping"]])


def tokenize_from(tokenizer, text: str, offset: int) -> Tokenized:
    """tokenize(text[offset:]) without special tokens, with starts counted in `text`."""
    enc = tokenizer(text[offset:], add_special_tokens=False, return_offsets_mapping=True)
    return Tokenized(text, list(enc["input_ids"]), [s + offset for s, _ in enc["offset_mapping"]])


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
