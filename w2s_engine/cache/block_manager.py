"""Reference-counted paged KV blocks: fork shares, append copies on write, free returns.

A beam's KV lives in fixed-size blocks listed in its BlockTable. Forking a beam shares every
block (refcount + 1) and copies nothing. The only block a beam ever writes is the one holding
its next position; if that block is shared (a fork happened after it was partly filled), it
is copied first, and the (src, dst) pair is handed to the caller, who copies all such blocks
in one batched kernel before the forward that writes them.

With a prefix cache, a prompt's full blocks are kept by their content after the request ends
(cache/prefix_cache.py): free, on the free list, until an allocation needs them for other
tokens; a later prompt that starts with the same tokens takes them back (take_cached_prefix).
"""

from collections import deque
from dataclasses import dataclass, field

from w2s_engine.cache.prefix_cache import PrefixCache


class OutOfBlocks(RuntimeError):
    """Raised when an append needs more free blocks than there are; callers reserve first."""


def blocks_for(num_tokens: int, block_size: int) -> int:
    """Blocks that hold num_tokens positions."""
    return -(-num_tokens // block_size)


def shared_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two block lists. Two tables of one request
    share the prompt's blocks and their lineages' older ones and differ in their last few:
    scanned back from the end to the last equal block, the prefix before it checked with one
    slice compare (in C), not a Python loop over a long prompt's tens of blocks."""
    n = min(len(a), len(b))
    while n and a[n - 1] != b[n - 1]:
        n -= 1
    if a[:n] == b[:n]:
        return n
    n = 0                   # they differ before their last equal block too: scan forward
    while a[n] == b[n]:
        n += 1
    return n


@dataclass
class BlockTable:
    """The blocks of one beam in one KV pool and how many token positions are filled."""

    blocks: list[int] = field(default_factory=list)
    num_tokens: int = 0

    def slots(self, start: int, end: int, block_size: int) -> list[int]:
        """Cache slot of each position in [start, end) (positions must already be appended)."""
        assert 0 <= start <= end <= self.num_tokens
        return [self.blocks[p // block_size] * block_size + p % block_size
                for p in range(start, end)]


class BlockManager:

    def __init__(self, num_blocks: int, block_size: int = 16, prefix_caching: bool = False):
        """prefix_caching: keep prompts' full blocks by their content for later prompts."""
        assert num_blocks > 0 and block_size > 0
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.refcount = [0] * num_blocks
        # Free blocks, the least recently freed first: a freed prompt block stays cached the
        # longest. A prefix hit takes a free block out of the middle: its entry stays in the
        # deque, marked taken (_taken_early), and is skipped when reached, or is valid again
        # if the block is freed first (a deque's ends cost a sixth of an ordered dict's).
        self._free: deque[int] = deque(range(num_blocks))
        self._taken_early: set[int] = set()
        self.peak_used = 0
        self.prefix_cache = PrefixCache(block_size) if prefix_caching else None

    @property
    def num_free(self) -> int:
        return len(self._free) - len(self._taken_early)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    @property
    def free_blocks(self) -> list[int]:
        """The free blocks, the next to be taken first."""
        return [b for b in self._free if b not in self._taken_early]

    def blocks_for(self, num_tokens: int) -> int:
        return blocks_for(num_tokens, self.block_size)

    def new_table(self) -> BlockTable:
        return BlockTable()

    def _take(self) -> int:
        if len(self._free) == len(self._taken_early):     # (no num_free call: hot path)
            raise OutOfBlocks(f"all {self.num_blocks} KV blocks are in use")
        block = self._free.popleft()
        while block in self._taken_early:       # a prefix hit took it: its entry is stale
            self._taken_early.remove(block)
            block = self._free.popleft()
        assert self.refcount[block] == 0
        if self.prefix_cache is not None:
            self.prefix_cache.forget(block)     # taken for other tokens
        self.refcount[block] = 1
        used = self.num_blocks - len(self._free) + len(self._taken_early)
        if used > self.peak_used:
            self.peak_used = used
        return block

    def _release_all(self, blocks: list[int]):
        """One reference less to each block; a block none holds goes back to the free list
        (one loop, no call per block: a chunk's end frees hundreds of tables)."""
        refcount, free, early = self.refcount, self._free, self._taken_early
        for block in blocks:
            count = refcount[block]
            assert count > 0, f"block {block} released more often than taken"
            refcount[block] = count - 1
            if count == 1:
                if early and block in early:   # its old entry, still in the deque, holds
                    early.remove(block)
                else:
                    free.append(block)

    def _share_all(self, blocks: list[int]):
        """One more reference to each block (every one is held already)."""
        refcount = self.refcount
        for block in blocks:
            assert refcount[block] > 0
            refcount[block] += 1

    def blocks_needed(self, table: BlockTable, num_new_tokens: int) -> int:
        """Free blocks an append of num_new_tokens would take (new blocks plus a copy-on-write)."""
        grow, cow = self._growth(table, num_new_tokens)
        return grow + cow

    def _growth(self, table: BlockTable, num_new_tokens: int) -> tuple[int, bool]:
        """(new blocks, whether the partly filled last block is shared and must be copied)
        for an append of num_new_tokens. Blocks past num_tokens may exist after a truncate;
        only the partly filled one is written."""
        if num_new_tokens <= 0:
            return 0, False
        n, bs = table.num_tokens, self.block_size
        cow = n % bs != 0 and self.refcount[table.blocks[n // bs]] > 1
        return max(0, (n + num_new_tokens + bs - 1) // bs - len(table.blocks)), cow

    def append(self, table: BlockTable, num_new_tokens: int) -> list[tuple[int, int]]:
        """Make room for num_new_tokens more positions; returns copy-on-write (src, dst) pairs.

        The caller must copy each src block to dst (all layers) before writing the new tokens.
        """
        grow, cow = self._growth(table, num_new_tokens)
        if grow + cow > len(self._free) - len(self._taken_early):    # (num_free, inline)
            raise OutOfBlocks(f"append of {num_new_tokens} tokens needs {grow + cow} blocks, "
                              f"{self.num_free} free")
        copies = []
        if cow:
            last = table.num_tokens // self.block_size
            src, dst = table.blocks[last], self._take()
            self._release_all([src])
            table.blocks[last] = dst
            copies.append((src, dst))
        elif self.prefix_cache is not None and num_new_tokens > 0 \
                and table.num_tokens % self.block_size:
            # written in place past the cut a truncate left in it: no longer the prefix it named
            self.prefix_cache.forget(table.blocks[table.num_tokens // self.block_size])
        table.num_tokens += max(num_new_tokens, 0)
        for _ in range(grow):
            table.blocks.append(self._take())
        return copies

    def take_cached_prefix(self, table: BlockTable, ids: list[int]) -> int:
        """An empty table takes the cached blocks of the longest prefix of the prompt ids,
        leaving at least its last token to forward (whose logits or hidden state the caller
        needs); returns the tokens it holds now (0 without a prefix cache or a hit)."""
        assert not table.blocks and table.num_tokens == 0, "a prompt's table starts empty"
        if self.prefix_cache is None:
            return 0
        blocks = self.prefix_cache.lookup(ids, len(ids) - 1)
        for block in blocks:
            if self.refcount[block] == 0:
                self._taken_early.add(block)    # out of the free list (its entry skipped)
            self.refcount[block] += 1
        used = self.num_blocks - self.num_free
        self.peak_used = max(self.peak_used, used)
        table.blocks = list(blocks)
        table.num_tokens = len(blocks) * self.block_size
        return table.num_tokens

    def cache_prompt(self, table: BlockTable, ids: list[int]):
        """The prompt ids are all in the table: name its full blocks for later prompts."""
        if self.prefix_cache is not None:
            assert table.num_tokens >= len(ids), "cache a prompt once it is all forwarded"
            self.prefix_cache.register(ids, table.blocks)

    def fork(self, table: BlockTable) -> BlockTable:
        self._share_all(table.blocks)
        return BlockTable(list(table.blocks), table.num_tokens)

    def fork_into(self, table: BlockTable, parent: BlockTable):
        """free(table), then make it fork(parent), in place. At a chunk's end the losers' tables
        become the survivors' children's: all of a request's beams share the prompt's blocks
        and their lineages' older ones, so only the blocks past the run the two tables share
        change counts, not every block of a long history twice."""
        old, new = table.blocks, parent.blocks
        shared = shared_prefix(old, new)
        self._share_all(new[shared:])      # before the release: a block in both stays held
        self._release_all(old[shared:])
        old[shared:] = new[shared:]
        table.num_tokens = parent.num_tokens

    def truncate(self, table: BlockTable, num_tokens: int):
        """Roll the table back to its first num_tokens positions, releasing blocks past them."""
        assert 0 <= num_tokens <= table.num_tokens
        keep = self.blocks_for(num_tokens)
        self._release_all(table.blocks[keep:][::-1])    # last first, as free()
        del table.blocks[keep:]
        table.num_tokens = num_tokens

    def free(self, table: BlockTable):
        # Last block first: the free list hands out the least recently freed, and a cached
        # prompt is found from its beginning (chained keys), so its end should go first.
        self._release_all(table.blocks[::-1])
        table.blocks.clear()
        table.num_tokens = 0

    def slots(self, table: BlockTable, start: int, end: int) -> list[int]:
        return table.slots(start, end, self.block_size)

    def check_all_free(self):
        """The end-of-request invariant: nothing is held, no count went negative."""
        # Raised, not asserted: a public check that must hold under `python -O` too.
        held = sum(c != 0 for c in self.refcount)
        if held:
            raise RuntimeError(f"KV blocks still referenced: {held} of {self.num_blocks}")
        if self._taken_early or len(self._free) != self.num_blocks or \
                len(set(self._free)) != self.num_blocks:
            raise RuntimeError(f"the free list holds {len(self._free)} entries "
                               f"({len(set(self._free))} distinct, {len(self._taken_early)} "
                               f"taken) of {self.num_blocks} "
                               "blocks")
