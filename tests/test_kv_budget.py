"""The KV budget on plain numbers: pool sizing, search-tree reservations, growth. No model."""

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from w2s_engine.cache.block_manager import BlockManager
from w2s_engine.cache.kv_budget import SMALL_TOKENS_PER_LARGE, KVBudget, pool_blocks, tree_blocks


def simulate_search(bs, w, k, chunk, prompt_len, max_new, seed) -> int:
    """Run CBS(w, k, chunk)'s forks, appends and frees on a real block manager, with random
    survivors and random early finishes; returns the most blocks held at once."""
    rng = random.Random(seed)
    m = BlockManager(100_000, bs)
    root = m.new_table()
    m.append(root, prompt_len)
    beams = [(m.fork(root) if i < w * k - 1 else root, False) for i in range(w * k)]
    length = 0
    while True:
        n = min(chunk, max_new - length)
        grown = []
        for table, finished in beams:
            if not finished:
                stop = rng.randint(1, n) if rng.random() < 0.2 else n
                for _ in range(stop):          # one token a step, as decoding appends
                    m.append(table, 1)
                finished = stop < n
            grown.append((table, finished))
        length += n
        rng.shuffle(grown)
        survivors, losers = grown[:w], grown[w:]
        for table, _ in losers:
            m.free(table)
        if length >= max_new or all(f for _, f in survivors):
            break
        beams = []
        for table, finished in survivors:
            if finished:
                beams.append((table, True))   # carried once, never forked
            else:
                beams += [(m.fork(table) if j < k - 1 else table, False) for j in range(k)]
    for table, _ in survivors:
        m.free(table)
    m.check_all_free()
    return m.peak_used


@settings(max_examples=150, deadline=None)
@given(bs=st.sampled_from([1, 2, 4, 16]), w=st.integers(1, 4), k=st.integers(1, 4),
       chunk=st.integers(1, 9), prompt_len=st.integers(1, 40), max_new=st.integers(1, 40),
       seed=st.integers(0, 10**6))
def test_a_search_tree_never_holds_more_blocks_than_its_reservation(bs, w, k, chunk, prompt_len,
                                                                     max_new, seed):
    reserved = tree_blocks(bs, w, k, prompt_len, max_new, min(chunk, max_new))
    assert simulate_search(bs, w, k, chunk, prompt_len, max_new, seed) <= reserved


def test_the_tree_reservation_is_far_below_w_k_full_copies_for_long_responses():
    # CBS(4,4,8), prompt 512, 1024 new tokens, blocks of 16: the prompt once, 4 lineages, 16 chunks.
    assert tree_blocks(16, 4, 4, 512, 1024, 8) == 32 + 4 * (64 + 1) + 16 * (1 + 1)
    assert tree_blocks(16, 4, 4, 512, 1024, 8) < 16 * (512 + 1024) // 16
    # Best-of-N forks once: N full copies of the response are its real worst case.
    assert tree_blocks(16, 1, 8, 100, 64, 64) == -(-100 // 16) + 1 + 8 * (4 + 1)


def test_reservation_names_every_pool_the_request_uses():
    budget = KVBudget(num_blocks=1000, block_size=4)
    shared = budget.reservation(2, 2, 12, 3, large_prompt_len=10, small=[(7, True, 0)])
    assert shared == {"large": tree_blocks(4, 2, 2, 10, 12, 3), 0: tree_blocks(4, 2, 2, 7, 12, 3)}
    # A black-box large model has no pool here; two vocabularies reserve more small tokens.
    cross = budget.reservation(2, 2, 12, 3, large_prompt_len=None,
                               small=[(7, False, 0), (9, False, 0)])
    assert set(cross) == {0, 1}
    assert cross[0] == tree_blocks(4, 2, 2, 7, SMALL_TOKENS_PER_LARGE * 12 + 8,
                                   SMALL_TOKENS_PER_LARGE * 3 + 8)
    # A reward model's suffix is part of every candidate's stream.
    rm = budget.reservation(2, 2, 12, 3, large_prompt_len=10, small=[(7, True, 2)])
    assert rm[0] == tree_blocks(4, 2, 2, 7, 14, 5)


def test_requests_fit_until_the_pool_is_reserved_and_release_gives_it_back():
    budget = KVBudget(num_blocks=100, block_size=4)
    budget.add_pool("large")
    budget.add_pool(0)
    a, b = {"large": 60, 0: 30}, {"large": 50, 0: 10}
    assert budget.fits(a)
    budget.reserve(a)
    assert not budget.fits(b)        # the large pool would hold 110
    budget.release(a)
    assert budget.reserved == {"large": 0, 0: 0} and budget.fits(b)
    with pytest.raises(AssertionError, match="released more"):
        budget.release(b)


def test_growth_takes_unreserved_room_or_says_how_much_is_missing():
    budget = KVBudget(num_blocks=100, block_size=4)
    budget.add_pool(0)
    mine, other = {0: 30}, {0: 50}
    budget.reserve(mine)
    budget.reserve(other)
    assert budget.grow(mine, 0, 25) == 0 and mine == {0: 30}   # within the reservation
    assert budget.grow(mine, 0, 45) == 0 and mine == {0: 45}   # 15 of the 20 free blocks
    assert budget.reserved[0] == 95
    assert budget.grow(mine, 0, 60) == 15 and mine == {0: 45}  # only 5 left: nothing taken
    assert budget.reserved[0] == 95


def test_pool_size_comes_from_blocks_then_bytes_and_a_tiny_budget_says_what_to_raise():
    assert pool_blocks(1000, num_kv_blocks=7) == 7
    assert pool_blocks(1000, budget_bytes=64_500) == 63       # and each pool's scratch block
    assert pool_blocks(1000, device="cpu", cpu_budget_bytes=10_000) == 9
    with pytest.raises(ValueError, match="raise kv_cache_memory_bytes, or set num_kv_blocks"):
        pool_blocks(1000, budget_bytes=4_999)
    with pytest.raises(ValueError, match="raise cpu_kv_cache_bytes, or set num_kv_blocks"):
        pool_blocks(1000, cpu_budget_bytes=4_999)


def test_the_pools_fit_the_memory_budget_in_their_models_own_dtype():
    """A (model, tokenizer) pair keeps its dtype: an fp32 model under a bf16 config still
    has fp32 pools, and the pools with their scratch blocks fit kv_cache_memory_bytes."""
    from tiny_models import make_tokenizer, tiny_llama
    from w2s_engine import Engine
    tok = make_tokenizer(300)
    for dtype in ("float32", "bfloat16"):
        engine = Engine((tiny_llama(len(tok), seed=1), tok), kv_cache_memory_bytes=1 << 20,
                        dtype=dtype, progress=False, block_size=4)
        pool = engine.runners["large"].kv_pool
        assert pool.dtype == torch.float32
        assert pool.numel() * pool.element_size() <= 1 << 20, dtype


def test_check_all_free_raises_while_a_request_holds_blocks_even_without_asserts():
    from tiny_models import make_tokenizer, tiny_llama
    from w2s_engine import Engine, SearchParams
    tok = make_tokenizer(300)
    engine = Engine((tiny_llama(len(tok), seed=1), tok), num_kv_blocks=50, block_size=4,
                    progress=False)
    engine.add_request("I really", SearchParams.base(max_new_tokens=8))
    engine.step()
    with pytest.raises(RuntimeError, match="KV blocks still referenced"):
        engine.check_all_free()
    while engine.has_unfinished():
        engine.step()
    engine.check_all_free()


def test_a_prompt_past_the_whole_pool_is_refused_naming_the_prompt():
    from tiny_models import make_tokenizer, tiny_llama
    from w2s_engine import Engine, SearchParams
    from w2s_engine.params import InvalidParam
    tok = make_tokenizer(300)
    engine = Engine((tiny_llama(len(tok), seed=1), tok), num_kv_blocks=10, block_size=4,
                    progress=False)
    with pytest.raises(InvalidParam, match="the prompt .* needs up to .* KV blocks") as e:
        engine.make_request("word " * 60, SearchParams.base(max_new_tokens=1))
    assert e.value.field == "prompt"
    for words in range(1, 40):   # one sample of one token: only the prompt can be at fault
        try:
            engine.make_request("word " * words, SearchParams.base(max_new_tokens=1))
        except InvalidParam as e:
            assert e.field == "prompt", (words, str(e))
    engine.warm_up()    # a pool too small for the usual warm-up search runs a smaller one



def test_a_request_past_the_pool_names_the_samples_or_max_new_tokens_whichever_is_at_fault():
    from tiny_models import make_tokenizer, tiny_llama
    from w2s_engine import Engine, SearchParams
    from w2s_engine.params import InvalidParam
    tok = make_tokenizer(300)
    engine = Engine((tiny_llama(len(tok), seed=1), tok), num_kv_blocks=60, block_size=4,
                    progress=False)
    # 200 samples need a block each even for one token: n is at fault, not max_new_tokens.
    with pytest.raises(InvalidParam, match=r"lower n \(200\), which does not fit even for one "
                                           "token") as e:
        engine.make_request("I really", SearchParams.base(n=200, max_new_tokens=4))
    assert e.value.field == "n"
    # Two samples of 400 tokens: their length is.
    with pytest.raises(InvalidParam, match=r"lower n \(2\) or max_new_tokens \(400\)") as e:
        engine.make_request("I really", SearchParams.base(n=2, max_new_tokens=400))
    assert e.value.field == "max_new_tokens"
