"""Prefix caching: a prompt that starts like an earlier one reads the earlier one's KV blocks,
in every model, and gets the search it would get without them; a cached block is never read
once its content changed, and gives way when the memory is needed."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from test_block_manager import ShadowPool, check_invariants
from test_search import LARGE_TEMPLATE, SMALL_TEMPLATE, make_engine, scratch_reward
from tiny_models import make_tokenizer, tiny_llama, tuned_from
from w2s_engine import SearchParams
from w2s_engine.cache.block_manager import BlockManager, OutOfBlocks

BS = 4


def kv_of(ids, start=0):
    """What the shadow pool stores for tokens: (position, token), as keys and values depend
    on both."""
    return [(start + i, t) for i, t in enumerate(ids)]


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_a_cached_prefix_reads_back_exactly_the_tokens_it_was_written_with(data):
    """Prompts from a two-token alphabet (so prefixes repeat), forks, tables cut back into their
    prompt and written with other tokens (a re-tokenized edge), frees, and allocations that
    take cached blocks for other tokens: every hit reads its own tokens, every table reads
    what it wrote, and the counts hold."""
    m = BlockManager(num_blocks=20, block_size=BS, prefix_caching=True)
    pool = ShadowPool(m)
    live = []    # [table, ids]
    for _ in range(data.draw(st.integers(5, 40))):
        op = data.draw(st.sampled_from(["prompt", "prompt", "fork", "rewrite", "free"]))
        if op == "prompt":
            ids = data.draw(st.lists(st.integers(0, 1), min_size=1, max_size=14))
            table = m.new_table()
            hit = m.take_cached_prefix(table, ids)
            assert hit % BS == 0 and hit < len(ids)
            assert pool.read(table) == kv_of(ids[:hit])
            try:
                pool.append(table, kv_of(ids[hit:], hit))
            except OutOfBlocks:
                m.free(table)
                continue
            m.cache_prompt(table, ids)
            live.append([table, ids])
        elif op == "fork" and live:
            table, ids = live[data.draw(st.integers(0, len(live) - 1))]
            live.append([m.fork(table), list(ids)])
        elif op == "rewrite" and live:
            entry = live[data.draw(st.integers(0, len(live) - 1))]
            table, ids = entry
            cut = data.draw(st.integers(0, len(ids)))
            new = data.draw(st.lists(st.integers(2, 3), min_size=1, max_size=6))
            m.truncate(table, cut)
            try:
                pool.append(table, kv_of(new, cut))
            except OutOfBlocks:
                m.free(table)
                live.remove(entry)
                continue
            entry[1] = ids[:cut] + new
        elif op == "free" and live:
            table, _ = live.pop(data.draw(st.integers(0, len(live) - 1)))
            m.free(table)
        for table, ids in live:
            assert pool.read(table) == kv_of(ids)
        check_invariants(m, [t for t, _ in live])
    for table, _ in live:
        m.free(table)
    m.check_all_free()    # cached blocks are free blocks


def test_cached_blocks_are_free_blocks_and_the_least_recently_freed_go_first():
    m = BlockManager(num_blocks=6, block_size=BS, prefix_caching=True)
    a = m.new_table()
    m.append(a, 9)                 # 3 blocks, 2 of them full
    m.cache_prompt(a, list(range(9)))
    m.free(a)
    assert m.num_free == 6 and len(m.prefix_cache) == 2
    b = m.new_table()
    m.append(b, 12)                # the 3 never-used blocks: the least recently freed
    assert len(m.prefix_cache) == 2
    c = m.new_table()
    assert m.take_cached_prefix(c, list(range(9))) == 8
    m.free(b)
    m.free(c)
    d = m.new_table()
    m.append(d, 24)                # all six: the cached ones are taken for other tokens
    assert len(m.prefix_cache) == 0
    m.free(d)
    m.check_all_free()


def test_a_freed_prompt_gives_its_last_blocks_first_so_its_beginning_stays_cached():
    m = BlockManager(num_blocks=4, block_size=BS, prefix_caching=True)
    a = m.new_table()
    m.append(a, 13)                # all 4 blocks; 3 full ones named
    m.cache_prompt(a, list(range(13)))
    m.free(a)
    b = m.new_table()
    m.append(b, 8)                 # 2 blocks: the partial last one and the third
    c = m.new_table()
    assert m.take_cached_prefix(c, list(range(13))) == 8    # the first two still read


def test_without_prefix_caching_no_block_is_kept_by_its_tokens():
    m = BlockManager(num_blocks=6, block_size=BS)
    a = m.new_table()
    m.append(a, 9)
    m.cache_prompt(a, list(range(9)))
    m.free(a)
    b = m.new_table()
    assert m.take_cached_prefix(b, list(range(9))) == 0 and b.blocks == []


# ---- the engine ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tok():
    return make_tokenizer(300)


@pytest.fixture(scope="module")
def small_pair(tok):
    untuned = tiny_llama(len(tok), seed=2)
    return tuned_from(untuned, seed=3, scale=0.3), untuned


PROMPT = "The plot of this film is about a man who finds a dog and the dog finds a man"
PARAMS = SearchParams(w=2, k=2, l=4, max_new_tokens=12, seed=5)


def blocks_below(n: int, block_size: int) -> int:
    """Tokens in the full blocks a prompt of n tokens can take from the cache (its last token
    is always forwarded)."""
    return (n - 1) // block_size * block_size


def test_a_prompt_searched_again_reads_every_models_prompt_blocks_and_gets_the_same_result(
        tok, small_pair):
    engine = make_engine(tok, small_pair)
    first = engine.search([PROMPT], PARAMS)[0]
    again = engine.search([PROMPT], PARAMS)[0]
    large_len = len(tok(LARGE_TEMPLATE.replace("{prompt}", PROMPT))["input_ids"])
    small_len = len(tok(SMALL_TEMPLATE.replace("{prompt}", PROMPT),
                        add_special_tokens=False)["input_ids"])
    assert first.stats.cached_prompt_tokens == {"large": 0, "tuned": 0, "untuned": 0}
    cached = again.stats.cached_prompt_tokens
    assert cached == {"large": blocks_below(large_len, 4), "tuned": blocks_below(small_len, 4),
                      "untuned": blocks_below(small_len, 4)}
    for role, n in cached.items():   # the work it saved, and no more
        assert again.stats.tokens_forwarded[role] == first.stats.tokens_forwarded[role] - n
    assert again.text == first.text
    assert [h.reward for h in again.hypotheses] == pytest.approx(
        [h.reward for h in first.hypotheses], abs=1e-4)
    for h in again.hypotheses:        # and the rewards are the response's, from scratch
        assert h.reward == pytest.approx(
            scratch_reward(small_pair, tok, PROMPT, h.small_token_ids, h.finished), abs=1e-4)
    engine.check_all_free()


def test_prompts_that_share_a_beginning_read_only_its_full_blocks(tok, small_pair):
    engine = make_engine(tok, small_pair)
    a, b = PROMPT + " and a cat", PROMPT + " in the rain today"
    engine.search([a], PARAMS)
    res = engine.search([b], PARAMS)[0]
    ids = [tok(LARGE_TEMPLATE.replace("{prompt}", p))["input_ids"] for p in (a, b)]
    common = next(i for i, (x, y) in enumerate(zip(*ids)) if x != y)
    assert res.stats.cached_prompt_tokens["large"] == min(common // 4 * 4,
                                                          blocks_below(len(ids[1]), 4))
    assert res.stats.cached_prompt_tokens["large"] > 0
    for h in res.hypotheses:
        assert h.reward == pytest.approx(
            scratch_reward(small_pair, tok, b, h.small_token_ids, h.finished), abs=1e-4)
    engine.check_all_free()


def test_with_prefix_caching_off_every_prompt_is_forwarded_whole(tok, small_pair):
    engine = make_engine(tok, small_pair, prefix_caching=False)
    engine.search([PROMPT], PARAMS)
    res = engine.search([PROMPT], PARAMS)[0]
    assert res.stats.cached_prompt_tokens == {"large": 0, "tuned": 0, "untuned": 0}
    assert engine.stats()["cached_tokens"] == {"large": 0, "tuned": 0, "untuned": 0}


def test_cached_blocks_give_way_to_a_request_that_needs_the_memory(tok, small_pair):
    """A pool that the ended requests' cached prompts fill: a new request still gets all the
    room it needs (they are free blocks), the one evicted prompt is forwarded again, and the
    results are the same."""
    engine = make_engine(tok, small_pair, num_kv_blocks=120)
    prompts = [f"{PROMPT} number {i} of many with some more words" for i in range(6)]
    alone = [engine.search([p], PARAMS)[0] for p in prompts]
    big = SearchParams(w=4, k=4, l=4, max_new_tokens=40, seed=1, ignore_eos=True)
    engine.search([PROMPT + " once more, at length"], big)
    again = engine.search(prompts[:1], PARAMS)[0]
    assert again.stats.cached_prompt_tokens["large"] < alone[0].stats.tokens_forwarded["large"]
    assert again.text == alone[0].text
    assert again.reward == pytest.approx(alone[0].reward, abs=1e-4)
    engine.check_all_free()


def test_a_cross_vocabulary_search_reads_each_models_own_cached_prompt(tok, small_pair):
    other = make_tokenizer(420)
    engine = make_engine(tok, small_pair, large_tok=other, large_seed=4)
    first = engine.search([PROMPT], PARAMS)[0]
    again = engine.search([PROMPT], PARAMS)[0]
    assert all(n > 0 for n in again.stats.cached_prompt_tokens.values())
    assert again.text == first.text
    assert again.reward == pytest.approx(first.reward, abs=1e-4)
    engine.check_all_free()



def count_forwarded(engine, monkeypatch) -> dict:
    """Tokens each small model forwards from now on: {role: count}."""
    counts = {}
    for stream in engine.scorer.streams:
        for role, runner in stream.runners.items():
            counts[role] = 0

            def forward(batch, runner=runner, role=role, original=runner.forward):
                counts[role] += batch.input_ids.numel()
                return original(batch)
            monkeypatch.setattr(runner, "forward", forward)
    return counts


def test_scoring_many_responses_to_one_prompt_forwards_the_prompt_once(
        tok, small_pair, monkeypatch):
    """score() of N responses to one prompt (reranking N samples): the prompt's full blocks are
    forwarded once, the other N - 1 read them, and every reward is the from-scratch one."""
    responses = [" a dog", " the man and his dog", " nothing at all", " a cat finds a dog"]
    engine = make_engine(tok, small_pair)
    forwarded = count_forwarded(engine, monkeypatch)
    rewards = engine.score([PROMPT] * len(responses), responses)
    uncached = make_engine(tok, small_pair, prefix_caching=False)
    forwarded_uncached = count_forwarded(uncached, monkeypatch)
    assert uncached.score([PROMPT] * len(responses), responses) == pytest.approx(rewards,
                                                                                 abs=1e-5)
    small_len = len(tok(SMALL_TEMPLATE.replace("{prompt}", PROMPT),
                        add_special_tokens=False)["input_ids"])
    saved = (len(responses) - 1) * blocks_below(small_len, 4)
    assert saved > 0
    for role in ("tuned", "untuned"):
        assert forwarded[role] == forwarded_uncached[role] - saved
    # stats() counts score()'s work as a search's: forwarded, read from the cache, read in all
    for eng, ran, cached in ((engine, forwarded, saved), (uncached, forwarded_uncached, 0)):
        stats = eng.stats()
        assert stats["score_tokens"] == ran["tuned"] + cached
        for role in ("tuned", "untuned"):
            assert stats["tokens"][role] == ran[role]
            assert stats["cached_tokens"][role] == cached
    for r, response in zip(rewards, responses):
        assert r == pytest.approx(scratch_reward(small_pair, tok, PROMPT, response, True),
                                  abs=1e-4)
    # A later call reads the prompt too, and a search after it.
    before = dict(forwarded)
    engine.score([PROMPT], [" one more"])
    assert forwarded["tuned"] - before["tuned"] < small_len
    res = engine.search([PROMPT], PARAMS)[0]
    assert res.stats.cached_prompt_tokens["tuned"] == blocks_below(small_len, 4)
    engine.check_all_free()
    uncached.check_all_free()
