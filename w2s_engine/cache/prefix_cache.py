"""PrefixCache: prompt blocks kept by their content, so that a later prompt that starts the same
way reads them instead of forwarding those tokens again (vLLM's automatic prefix caching).

Requests often share a prefix: a system prompt, few-shot examples, a chat template's header,
or the same prompt searched again (another method, seed or setting). A full block of a prompt
is named by a chained digest of every token up to its end, key_i = sha256(key_{i-1} ||
tokens of block i): equal keys mean equal tokens at equal positions, hence equal keys and
values in the cache (one model, one pool). A cryptographic digest, not Python's hash: a
request whose prompt collided with another's would read the other's KV (and could learn of
its text from what it is answered).

A block is named once its prompt is all forwarded (register) and stays named while its
content holds: after its last holder frees it, it waits on the free list (the least recently
freed first to be taken) until a prefix hit takes it back or an allocation takes it for other
tokens (forget). The only writes to a named block would come from a table cut back into it
and appended again (a small model's re-tokenized prompt edge): the block manager copies it on
write when another holds it, and forgets its name otherwise. Only full blocks are named; a
prompt's last partial block is its own.
"""

import hashlib
from array import array


def block_keys(ids: list[int], n_blocks: int, block_size: int):
    """The keys of the first n_blocks full blocks of ids, one at a time (a lookup stops at its
    first miss)."""
    key = b""
    for i in range(n_blocks):
        tokens = array("q", ids[i * block_size:(i + 1) * block_size]).tobytes()
        key = hashlib.sha256(key + tokens).digest()
        yield key


class PrefixCache:
    """The names of one block manager's full prompt blocks: key -> block and block -> key."""

    def __init__(self, block_size: int):
        self.block_size = block_size
        self.block_of: dict[bytes, int] = {}
        self.key_of: dict[int, bytes] = {}

    def lookup(self, ids: list[int], max_tokens: int) -> list[int]:
        """The named blocks that hold the longest prefix of ids of at most max_tokens tokens
        (whole blocks), in order."""
        out = []
        for key in block_keys(ids, max(0, max_tokens) // self.block_size, self.block_size):
            block = self.block_of.get(key)
            if block is None:
                break
            out.append(block)
        return out

    def register(self, ids: list[int], blocks: list[int]):
        """Name the full blocks of a prompt whose tokens ids are all in blocks. A block named
        already keeps its name; a key named by another block (the same prompt forwarded twice
        at once) keeps that one."""
        n = min(len(ids) // self.block_size, len(blocks))
        for key, block in zip(block_keys(ids, n, self.block_size), blocks):
            if key not in self.block_of and block not in self.key_of:
                self.block_of[key] = block
                self.key_of[block] = key

    def forget(self, block: int):
        """The block's content is about to change: it no longer names a prefix."""
        key = self.key_of.pop(block, None)
        if key is not None:
            del self.block_of[key]

    def __len__(self) -> int:
        return len(self.key_of)
