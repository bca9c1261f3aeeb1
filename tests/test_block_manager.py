"""Block manager: refcounts, fork sharing, copy-on-write, truncate, free."""

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from w2s_engine.cache.block_manager import BlockManager, OutOfBlocks, shared_prefix


class ShadowPool:
    """A fake KV pool: one value per slot, so a test can read back what each beam wrote."""

    def __init__(self, manager: BlockManager):
        self.m = manager
        self.slots = {}

    def append(self, table, values):
        copies = self.m.append(table, len(values))
        bs = self.m.block_size
        for src, dst in copies:
            for i in range(bs):
                if src * bs + i in self.slots:
                    self.slots[dst * bs + i] = self.slots[src * bs + i]
        start = table.num_tokens - len(values)
        for slot, value in zip(self.m.slots(table, start, table.num_tokens), values):
            self.slots[slot] = value
        return copies

    def read(self, table):
        return [self.slots[s] for s in self.m.slots(table, 0, table.num_tokens)]


def check_invariants(m: BlockManager, tables):
    counts = Counter(b for t in tables for b in t.blocks)
    for block in range(m.num_blocks):
        assert m.refcount[block] == counts.get(block, 0) >= 0
    assert set(m.free_blocks) == {b for b in range(m.num_blocks) if counts.get(b, 0) == 0}
    assert len(m.free_blocks) == len(set(m.free_blocks))
    for t in tables:
        assert len(t.blocks) == m.blocks_for(t.num_tokens)


def test_fork_shares_every_block_and_copies_nothing():
    m = BlockManager(num_blocks=8, block_size=4)
    pool = ShadowPool(m)
    parent = m.new_table()
    pool.append(parent, list(range(6)))
    child = m.fork(parent)
    assert child.blocks == parent.blocks and m.num_used == 2
    assert all(m.refcount[b] == 2 for b in parent.blocks)


def test_append_to_shared_partial_block_copies_it_once():
    m = BlockManager(num_blocks=8, block_size=4)
    pool = ShadowPool(m)
    parent = m.new_table()
    pool.append(parent, [1, 2, 3, 4, 5, 6])
    child = m.fork(parent)
    copies = pool.append(child, [70])
    assert len(copies) == 1 and copies[0][0] == parent.blocks[1]
    assert child.blocks[0] == parent.blocks[0] and child.blocks[1] != parent.blocks[1]
    assert pool.append(parent, [80]) == []  # the parent's block is no longer shared
    assert pool.read(parent) == [1, 2, 3, 4, 5, 6, 80]
    assert pool.read(child) == [1, 2, 3, 4, 5, 6, 70]


def test_append_on_full_shared_block_needs_no_copy():
    m = BlockManager(num_blocks=8, block_size=4)
    pool = ShadowPool(m)
    parent = m.new_table()
    pool.append(parent, [1, 2, 3, 4])
    child = m.fork(parent)
    assert pool.append(child, [5]) == []
    assert m.refcount[parent.blocks[0]] == 2


def test_fork_into_makes_a_dropped_table_the_parents_fork():
    m = BlockManager(num_blocks=16, block_size=4)
    pool = ShadowPool(m)
    root = m.new_table()
    pool.append(root, list(range(8)))          # a prompt of two full blocks
    parent, loser = m.fork(root), m.fork(root)
    pool.append(parent, [100, 101, 102, 103, 104])
    pool.append(loser, [200, 201, 202, 203, 204, 205])
    own = loser.blocks[2:]
    m.free(root)
    m.fork_into(loser, parent)
    assert loser.blocks == parent.blocks and loser is not parent
    assert pool.read(loser) == list(range(8)) + [100, 101, 102, 103, 104]
    assert all(m.refcount[b] == 2 for b in parent.blocks)
    assert set(own) <= set(m.free_blocks)      # the loser's own blocks went back
    check_invariants(m, [parent, loser])


def test_truncate_releases_blocks_past_the_new_length():
    m = BlockManager(num_blocks=8, block_size=4)
    pool = ShadowPool(m)
    t = m.new_table()
    pool.append(t, list(range(10)))
    m.truncate(t, 5)
    assert m.num_used == 2 and t.num_tokens == 5
    pool.append(t, [99])
    assert pool.read(t) == [0, 1, 2, 3, 4, 99]


def test_out_of_blocks_raises_and_changes_nothing():
    m = BlockManager(num_blocks=2, block_size=4)
    t = m.new_table()
    m.append(t, 8)
    with pytest.raises(OutOfBlocks):
        m.append(t, 1)
    assert t.num_tokens == 8 and m.num_free == 0
    m.free(t)
    m.check_all_free()


ops = st.lists(
    st.tuples(st.sampled_from(["fork", "fork_into", "append", "truncate", "free"]),
              st.integers(0, 1000), st.integers(1, 9)),
    max_size=60)


@settings(max_examples=200, deadline=None)
@given(ops=ops, block_size=st.sampled_from([1, 2, 4, 16]))
def test_random_fork_append_truncate_free_keeps_invariants(ops, block_size):
    m = BlockManager(num_blocks=64, block_size=block_size)
    pool = ShadowPool(m)
    tables, contents = [m.new_table()], [[]]
    next_value = 0
    for op, pick, n in ops:
        if not tables:
            tables.append(m.new_table())
            contents.append([])
        i = pick % len(tables)
        if op == "fork":
            tables.append(m.fork(tables[i]))
            contents.append(list(contents[i]))
        elif op == "fork_into":   # table j becomes a fork of table i, its old blocks let go
            j = n % len(tables)
            if j != i:
                m.fork_into(tables[j], tables[i])
                contents[j] = list(contents[i])
        elif op == "append":
            values = list(range(next_value, next_value + n))
            next_value += n
            if m.blocks_needed(tables[i], n) > m.num_free:
                with pytest.raises(OutOfBlocks):
                    m.append(tables[i], n)
                continue
            pool.append(tables[i], values)
            contents[i].extend(values)
        elif op == "truncate":
            keep = pick % (tables[i].num_tokens + 1)
            m.truncate(tables[i], keep)
            del contents[i][keep:]
        else:
            m.free(tables.pop(i))
            contents.pop(i)
        check_invariants(m, tables)
        # Every beam reads back exactly what it wrote: no beam ever wrote into another's block.
        for t, c in zip(tables, contents):
            assert pool.read(t) == c
    for t in tables:
        m.free(t)
    m.check_all_free()


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 3), max_size=8), st.lists(st.integers(0, 3), max_size=8))
def test_shared_prefix_is_the_longest_common_prefix(a, b):
    """fork_into's shortcut (scan back to the last equal block, check the rest in C) agrees
    with a forward scan, also where lists differ before an equal block."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    assert shared_prefix(a, b) == n


def test_a_block_copied_from_then_handed_out_again_in_one_pass_keeps_both_copies_right():
    """A prefix hit takes cached blocks out of the middle of the free list; one freed again is
    valid where it stood, maybe first. Within one pass of appends (a scorer's _make_room), a
    cached prompt block can be copied from (one beam writes into it), released by a beam cut
    before it, and handed to the next copy-on-write as its destination: the batched copy must
    read it before it overwrites it (the runner asserted, failing the batch)."""
    import torch

    from tiny_models import make_tokenizer, tiny_llama
    from w2s_engine.models.runner import ModelRunner

    bm = BlockManager(10, 2, prefix_caching=True)
    prompt, other, rest = bm.new_table(), bm.new_table(), bm.new_table()
    bm.append(prompt, 4)
    bm.cache_prompt(prompt, [1, 2, 3, 4])
    bm.append(other, 4)
    bm.append(rest, 12)
    for t in (other, prompt, rest):          # the prompt's blocks behind two free ones
        bm.free(t)
    root = bm.new_table()
    assert bm.take_cached_prefix(root, [1, 2, 3, 4, 5]) == 4
    bm.append(root, 1)
    a, c = bm.fork(root), bm.fork(root)
    bm.free(root)
    copies = []
    bm.truncate(a, 3)                        # a writes into the cached block at position 3
    copies += bm.append(a, 1)
    bm.truncate(c, 1)                        # c cuts before it: the block is free again
    copies += bm.append(c, 1)
    src, dst = {s for s, _ in copies}, {d for _, d in copies}
    assert src & dst, f"the pass was meant to copy from and to one block: {copies}"

    runner = ModelRunner(tiny_llama(len(make_tokenizer(300)), seed=1), num_blocks=10,
                         block_size=2)
    with torch.no_grad():
        for b in range(10):
            runner.kv_pool[:, :, b] = b
    want = runner.kv_pool.clone()
    for s, d in copies:                      # as queued, one at a time
        want[:, :, d] = want[:, :, s]
    runner.copy_blocks(copies)
    assert torch.equal(runner.kv_pool, want)
    for t in (a, c):
        bm.free(t)
    bm.check_all_free()
