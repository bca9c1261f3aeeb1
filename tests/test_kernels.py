"""Every Triton kernel against its PyTorch reference, and each reference against plain torch.

On CPU the kernels run under TRITON_INTERPRET=1 (tests/conftest.py) on tiny fp32/fp16 shapes;
the `gpu` class repeats the comparisons at realistic bf16 shapes on CUDA.
"""

import pytest
import numpy as np
import torch
import torch.nn.functional as F

from w2s_engine.kernels.cascade_attention import (
    cascade_decode_attention,
    cascade_decode_attention_ref,
    cascade_decode_attention_triton,
    shared_prefix_words,
    static_shared_prefixes,
    find_shared_prefixes,
)
from w2s_engine.kernels.chunk_reward import (
    LMHead,
    chunk_reward_ref,
    chunk_reward_triton,
    fused_lmhead_chunk_reward_ref,
    fused_lmhead_chunk_reward_triton,
    lmhead_chunk_logprob_ref,
    lmhead_chunk_logprob_triton,
)
from w2s_engine.kernels.kv_cache import (
    copy_blocks_ref,
    copy_blocks_triton,
    store_kv_ref,
    store_kv_triton,
)
from w2s_engine.kernels.paged_attention import (
    paged_decode_attention_ref,
    paged_decode_attention_triton,
    paged_extend_attention,
    paged_extend_attention_grouped_triton,
    paged_extend_attention_ref,
    paged_extend_attention_sdpa,
    paged_extend_attention_triton,
)
from w2s_engine.kernels.sampling import gumbel_noise_ref, sample_ref, sample_triton

TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def paged_setup(dtype, hq, hkv, block_size, seq_lens, head_dim=32, device="cpu", seed=0):
    """A shuffled pool and block tables for the given sequence lengths."""
    g = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(blocks_per_seq) + 3
    perm = torch.randperm(num_blocks, generator=g)   # tables not in order
    tables, at = [], 0
    width = max(blocks_per_seq)
    for n in blocks_per_seq:
        row = perm[at:at + n].tolist()
        at += n
        tables.append(row + [0] * (width - n))
    k = torch.randn(num_blocks, block_size, hkv, head_dim, generator=g).to(dtype).to(device)
    v = torch.randn(num_blocks, block_size, hkv, head_dim, generator=g).to(dtype).to(device)
    bt = torch.tensor(tables, dtype=torch.int32, device=device)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    return k, v, bt, lens


def contiguous_kv(cache, table, n):
    bs = cache.shape[1]
    pos = torch.arange(n)
    return cache[table[pos // bs].long(), pos % bs]          # [n, Hkv, D]


def sdpa_reference(q, k, v, qpos, scale, window, softcap):
    """Plain attention over an unpaged K/V with an explicit mask: q [M, Hq, D], k/v [L, Hkv, D]."""
    g = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(g, 1).float()
    v = v.repeat_interleave(g, 1).float()
    s = torch.einsum("mhd,lhd->hml", q.float(), k) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    kpos = torch.arange(k.shape[0])
    mask = kpos[None, :] <= qpos[:, None]
    if window:
        mask &= kpos[None, :] > qpos[:, None] - window
    if not softcap:
        return F.scaled_dot_product_attention(q.float().transpose(0, 1), k.transpose(0, 1),
                                              v.transpose(0, 1), attn_mask=mask,
                                              scale=scale).transpose(0, 1)
    return torch.einsum("hml,lhd->mhd", s.masked_fill(~mask, float("-inf")).softmax(-1), v)


CASES = [  # (Hq, Hkv, block_size, sliding_window, softcap)
    (4, 4, 16, None, None),
    (8, 2, 8, 5, None),
    (8, 1, 16, None, 30.0),
    (16, 2, 4, 7, 20.0),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("splits", [1, 3], ids=["one-split-no-merge", "three-splits-merged"])
@pytest.mark.parametrize("hq, hkv, bs, window, softcap", CASES)
def test_paged_decode_triton_matches_reference_with_lse(dtype, hq, hkv, bs, window, softcap,
                                                        splits):
    lens = [1, 7, 33, 20]
    k, v, bt, sl = paged_setup(dtype, hq, hkv, bs, lens)
    q = torch.randn(len(lens), hq, 32).to(dtype)
    out, lse = paged_decode_attention_triton(q, k, v, bt, sl, 0.2, window, softcap,
                                             num_splits=splits)
    ref, ref_lse = paged_decode_attention_ref(q, k, v, bt, sl, 0.2, window, softcap)
    torch.testing.assert_close(out.float(), ref.float(), atol=TOL[dtype], rtol=TOL[dtype])
    torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("splits", [1, 2], ids=["one-split-no-merge", "two-splits-merged"])
def test_paged_decode_of_a_row_that_sees_no_keys_is_zero_with_lse_minus_inf(splits):
    """A row of length 0 (or whose keys all lie before kv_start) attends to nothing: 0 and
    -inf, as the reference gives, however many splits (merging was 0 / 0, NaN)."""
    k, v, bt, sl = paged_setup(torch.float32, 4, 2, 4, [5, 9])
    sl = torch.tensor([5, 0], dtype=torch.int32)
    q = torch.randn(2, 4, 32)
    for kv_start in (None, torch.tensor([0, 0], dtype=torch.int32)):
        out, lse = paged_decode_attention_triton(q, k, v, bt, sl, 0.2, num_splits=splits,
                                                 kv_start=kv_start)
        ref, ref_lse = paged_decode_attention_ref(q, k, v, bt, sl, 0.2)
        assert not out.isnan().any() and (out[1] == 0).all() and (lse[1] == float("-inf")).all()
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse, ref_lse)


def mixed_extend(dtype, hq, hkv, bs):
    """Five sequences whose new queries are nothing, a decode, a chunk after a prefix, a
    whole prefill and a chunk of two query tiles after a prefix (whose second tile has whole
    key steps before its first query, which run unmasked): (q, k_cache, v_cache,
    block_tables, cu_seqlens_q, seq_lens)."""
    lens, qlens = [3, 7, 33, 20, 100], [0, 1, 5, 20, 70]
    k, v, bt, sl = paged_setup(dtype, hq, hkv, bs, lens)
    cu = torch.tensor([0] + torch.tensor(qlens).cumsum(0).tolist(), dtype=torch.int32)
    return torch.randn(sum(qlens), hq, 32).to(dtype), k, v, bt, cu, sl


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("hq, hkv, bs, window, softcap", CASES)
def test_paged_extend_triton_matches_reference_for_mixed_query_lengths(dtype, hq, hkv, bs, window,
                                                                       softcap):
    q, k, v, bt, cu, sl = mixed_extend(dtype, hq, hkv, bs)
    out = paged_extend_attention_triton(q, k, v, bt, cu, sl, 0.2, window, softcap)
    ref = paged_extend_attention_ref(q, k, v, bt, cu, sl, 0.2, window, softcap)
    torch.testing.assert_close(out.float(), ref.float(), atol=TOL[dtype], rtol=TOL[dtype])
    # The longest chunk from the caller (the engine knows it on the host): the same grid.
    given = paged_extend_attention_triton(q, k, v, bt, cu, sl, 0.2, window, softcap,
                                          max_query_len=70)
    assert torch.equal(given, out)


def scoring_extend(dtype, hq, hkv, bs):
    """A scorer's chunks: six sequences of 1-8 new queries (one with none) after contexts of
    up to 75 tokens (whole key steps before the first query run unmasked), as a chunk of
    each beam scores."""
    lens, qlens = [12, 40, 9, 33, 25, 75], [8, 3, 0, 8, 1, 6]
    k, v, bt, sl = paged_setup(dtype, hq, hkv, bs, lens)
    cu = torch.tensor([0] + torch.tensor(qlens).cumsum(0).tolist(), dtype=torch.int32)
    return torch.randn(sum(qlens), hq, 32).to(dtype), k, v, bt, cu, sl


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("hq, hkv, bs, window, softcap", CASES)
def test_grouped_extend_for_short_chunks_matches_reference(dtype, hq, hkv, bs, window, softcap,
                                                           splits):
    """Each program attends a chunk's queries of all the query heads of one kv head (up to
    8 x 8 rows here), causal per row, over one split of the keys; splits merged."""
    q, k, v, bt, cu, sl = scoring_extend(dtype, hq, hkv, bs)
    out = paged_extend_attention_grouped_triton(q, k, v, bt, cu, sl, 0.2, window, softcap,
                                                max_query_len=8, num_splits=splits)
    ref = paged_extend_attention_ref(q, k, v, bt, cu, sl, 0.2, window, softcap)
    torch.testing.assert_close(out.float(), ref.float(), atol=TOL[dtype], rtol=TOL[dtype])
    # the dispatcher takes it for chunks this short, the per-head kernel gives the same
    routed = paged_extend_attention_triton(q, k, v, bt, cu, sl, 0.2, window, softcap, 8)
    per_head = paged_extend_attention_triton(q, k, v, bt, cu, sl, 0.2, window, softcap, 8,
                                             grouped=False)
    torch.testing.assert_close(per_head.float(), ref.float(), atol=TOL[dtype], rtol=TOL[dtype])
    limit = 32 if dtype == torch.float32 else 64     # (fp32's dots would spill at 64 rows)
    assert torch.equal(routed, paged_extend_attention_grouped_triton(
        q, k, v, bt, cu, sl, 0.2, window, softcap, max_query_len=8)
        if 8 * hq // hkv <= limit else per_head)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("kernel", ["grouped", "grouped-3-splits", "per-head"])
def test_extend_of_a_padded_scoring_batch_gives_the_real_rows_what_they_get_alone(dtype, kernel):
    """The scoring graphs' padded batch (models/scoring_graphs.py): rows of different lengths
    under one query cap; padding rows with no queries and no keys; their tables and the real
    rows' unused columns on a scratch block; dead query tokens after the last row's. The
    scratch block's keys and values and the dead queries are NaN: the real rows' outputs are
    still the reference's for the real rows alone."""
    hq, hkv, bs = 8, 2, 4
    lens, qlens = [12, 40, 9], [3, 8, 1]
    k, v, bt, sl = paged_setup(dtype, hq, hkv, bs, lens)
    q = torch.randn(sum(qlens), hq, 32).to(dtype)
    cu = torch.tensor([0, *np.cumsum(qlens)], dtype=torch.int32)
    want = paged_extend_attention_ref(q, k, v, bt, cu, sl, 0.2)
    scratch = k.shape[0]
    k, v = (torch.cat([c, torch.full_like(c[:1], float("nan"))]) for c in (k, v))
    tables = torch.full((5, bt.shape[1]), scratch, dtype=torch.int32)
    for i, n in enumerate(lens):
        tables[i, :-(-n // bs)] = bt[i, :-(-n // bs)]
    seq_lens = torch.tensor(lens + [0, 0], dtype=torch.int32)
    cu_padded = torch.cat([cu, cu[-1:], cu[-1:]])
    q_padded = torch.cat([q, torch.full((5, hq, 32), float("nan")).to(dtype)])
    if kernel == "per-head":
        out = paged_extend_attention_triton(q_padded, k, v, tables, cu_padded, seq_lens, 0.2,
                                            max_query_len=8, grouped=False)
    else:
        out = paged_extend_attention_grouped_triton(
            q_padded, k, v, tables, cu_padded, seq_lens, 0.2, max_query_len=8,
            num_splits=3 if kernel == "grouped-3-splits" else 1)
    torch.testing.assert_close(out[:len(q)].float(), want.float(), atol=TOL[dtype],
                               rtol=TOL[dtype])


def test_every_autotuned_kernel_times_its_configurations_briefly():
    """A shape first met while serving is autotuned then, with every request waiting: each
    kernel times its configurations with quick_bench (about 25 ms each), not Triton's default
    (125 ms each)."""
    import importlib
    import pkgutil

    import triton

    import w2s_engine.kernels as kernels
    from w2s_engine.kernels._common import quick_bench
    tuned = {}
    for info in pkgutil.iter_modules(kernels.__path__):
        module = importlib.import_module(f"w2s_engine.kernels.{info.name}")
        tuned.update({f"{info.name}.{name}": obj for name, obj in vars(module).items()
                      if isinstance(obj, triton.runtime.Autotuner)})
    assert {"paged_attention._extend_kernel", "sampling._sample_kernel",
            "chunk_reward._logits_lse_kernel"} <= set(tuned)
    assert {name: k.do_bench for name, k in tuned.items()} == \
        {name: quick_bench for name in tuned}


def test_grouped_extend_refuses_chunks_that_do_not_fit_its_tile():
    q, k, v, bt, cu, sl = scoring_extend(torch.float32, 16, 2, 4)
    with pytest.raises(ValueError, match="past 64; use paged_extend_attention"):
        paged_extend_attention_grouped_triton(q, k, v, bt, cu, sl, 0.2, max_query_len=9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hq, hkv, bs, window, softcap", CASES)
def test_cpu_extend_path_matches_reference_for_mixed_query_lengths(dtype, hq, hkv, bs, window,
                                                                   softcap):
    # The CPU engine's extend (SDPA over the gathered blocks; the reference where soft-capped).
    q, k, v, bt, cu, sl = mixed_extend(dtype, hq, hkv, bs)
    ref = paged_extend_attention_ref(q, k, v, bt, cu, sl, 0.2, window, softcap)
    out = paged_extend_attention(q, k, v, bt, cu, sl, 0.2, window, softcap)
    torch.testing.assert_close(out.float(), ref.float(), atol=TOL[dtype], rtol=TOL[dtype])
    if not softcap:
        out = paged_extend_attention_sdpa(q, k, v, bt, cu, sl, 0.2, window)
        torch.testing.assert_close(out.float(), ref.float(), atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("hq, hkv, bs, window, softcap", CASES)
def test_attention_references_equal_plain_attention_on_contiguous_kv(hq, hkv, bs, window, softcap):
    lens, qlens = [9, 25], [4, 25]
    k, v, bt, sl = paged_setup(torch.float32, hq, hkv, bs, lens)
    cu = torch.tensor([0, 4, 29], dtype=torch.int32)
    q = torch.randn(29, hq, 32)
    out = paged_extend_attention_ref(q, k, v, bt, cu, sl, 0.2, window, softcap)
    dec, _ = paged_decode_attention_ref(q[[3, 28]], k, v, bt, sl, 0.2, window, softcap)
    for b, (n, m) in enumerate(zip(lens, qlens)):
        kk, vv = contiguous_kv(k, bt[b], n), contiguous_kv(v, bt[b], n)
        qpos = torch.arange(n - m, n)
        expected = sdpa_reference(q[cu[b]:cu[b + 1]], kk, vv, qpos, 0.2, window, softcap)
        torch.testing.assert_close(out[cu[b]:cu[b + 1]], expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(dec[b], expected[-1], atol=1e-5, rtol=1e-5)


def sink_reference(q, k, v, qpos, scale, window, sinks):
    """Attention with a sink per head, as GPT-OSS's eager attention writes it: the sink is one
    more logit in the softmax, dropped before the values."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1).float(), v.repeat_interleave(g, 1).float()
    s = torch.einsum("mhd,lhd->hml", q.float(), k) * scale
    kpos = torch.arange(k.shape[0])
    mask = kpos[None, :] <= qpos[:, None]
    if window:
        mask &= kpos[None, :] > qpos[:, None] - window
    s = s.masked_fill(~mask, float("-inf"))
    logits = torch.cat([s, sinks[:, None, None].expand(-1, s.shape[1], 1)], -1)
    return torch.einsum("hml,lhd->mhd", logits.softmax(-1)[..., :-1], v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("hq, hkv, bs, window", [(4, 4, 16, None), (8, 2, 8, 5)])
def test_attention_sinks_are_one_more_logit_in_every_kernels_softmax(dtype, hq, hkv, bs, window):
    # GPT-OSS: a learned logit per head, without a value. Decode (split-K, merged), extend and
    # the cascade's merge, on both paths, against the eager formula on contiguous keys.
    lens, qlens = [9, 25, 1], [4, 25, 1]
    k, v, bt, sl = paged_setup(dtype, hq, hkv, bs, lens)
    cu = torch.tensor([0, 4, 29, 30], dtype=torch.int32)
    q = torch.randn(30, hq, 32).to(dtype)
    sinks = torch.linspace(-2.0, 3.0, hq)
    tol = TOL[dtype]
    extend = paged_extend_attention_ref(q, k, v, bt, cu, sl, 0.2, window, None, sinks)
    extend_t = paged_extend_attention_triton(q, k, v, bt, cu, sl, 0.2, window, None, None, sinks)
    # the short-chunk kernel, where 25 queries of each kv head's query heads fit its tile:
    # the sink in the kernel (one split) and in the merge (three)
    grouped = [paged_extend_attention_grouped_triton(q, k, v, bt, cu, sl, 0.2, window, None,
                                                     25, sinks, num_splits=n)
               for n in (1, 3)] if 25 * (hq // hkv) <= 64 else []
    last = q[[3, 28, 29]]
    dec, dec_lse = paged_decode_attention_ref(last, k, v, bt, sl, 0.2, window, None, sinks=sinks)
    dec_t, dec_t_lse = paged_decode_attention_triton(last, k, v, bt, sl, 0.2, window, None, 3,
                                                     sinks=sinks)
    # one split: the sink in the kernel itself (no merge)
    dec_1, dec_1_lse = paged_decode_attention_triton(last, k, v, bt, sl, 0.2, window, None, 1,
                                                     sinks=sinks)
    for b, (n, m) in enumerate(zip(lens, qlens)):
        kk, vv = contiguous_kv(k, bt[b], n), contiguous_kv(v, bt[b], n)
        expected = sink_reference(q[cu[b]:cu[b + 1]], kk, vv, torch.arange(n - m, n), 0.2,
                                  window, sinks)
        for out in (extend, extend_t, *grouped):
            torch.testing.assert_close(out[cu[b]:cu[b + 1]].float(), expected, atol=tol, rtol=tol)
        for out in (dec, dec_t, dec_1):
            torch.testing.assert_close(out[b].float(), expected[-1], atol=tol, rtol=tol)
    torch.testing.assert_close(dec_t_lse, dec_lse, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(dec_1_lse, dec_lse, atol=1e-4, rtol=1e-4)
    plain, plain_lse = paged_decode_attention_ref(last, k, v, bt, sl, 0.2, window)
    torch.testing.assert_close(dec_lse, torch.logaddexp(plain_lse, sinks[None]), atol=1e-5,
                               rtol=1e-5)


@pytest.mark.parametrize("layout", ["beams", "unshared"])
def test_cascade_decode_with_attention_sinks_equals_per_beam_decode(layout):
    table, lens, num_blocks = shared_prefix_tables(layout, 4)
    g = torch.Generator().manual_seed(7)
    k = torch.randn(num_blocks, 4, 2, 16, generator=g)
    v = torch.randn(num_blocks, 4, 2, 16, generator=g)
    q = torch.randn(table.shape[0], 8, 16, generator=g)
    sinks = torch.linspace(-1.0, 2.0, 8)
    args = (q, k, v, table, lens, 0.3, 6, None)
    expected, expected_lse = paged_decode_attention_ref(*args, sinks=sinks)
    groups = find_shared_prefixes(table, lens, 4)
    out, lse = cascade_decode_attention_triton(*args, groups, 3, 2, sinks=sinks)
    ref, ref_lse = cascade_decode_attention(*args, sinks=sinks)     # on CPU: the reference
    for o, l in ((out, lse), (ref, ref_lse)):
        torch.testing.assert_close(o, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(l, expected_lse, atol=1e-5, rtol=1e-5)


def shared_prefix_tables(layout, bs):
    """Block tables [B, max_blocks] and lengths for a decode batch whose rows share blocks."""
    if layout == "beams":           # 6 beams on a 5-block prompt; own parts ragged, one empty
        prompt = list(range(5))
        own = [0, 1, 9, bs, 2 * bs + 3, 3 * bs]
        rows, lens, nxt = [], [], 5
        for n in own:
            mine = -(-n // bs)
            rows.append(prompt + list(range(nxt, nxt + mine)))
            nxt += mine
            lens.append(5 * bs + n)
    elif layout == "two_requests":  # groups {0, 2, 5} and {1, 4}, siblings 0 and 2 share more,
        rows = [[0, 1, 2, 3, 20], [10, 11, 12], [0, 1, 2, 3, 21], [30, 31],   # a loner (3),
                [10, 11, 13, 14], [0, 1, 2, 22], [0]]                         # a short row (6)
        lens = [4 * bs + bs // 2 + 1, 3 * bs - 2, 5 * bs, 2 * bs, 4 * bs, 3 * bs + 1, bs - 3]
    else:                           # "unshared": every row its own blocks
        rows = [[3, 7, 1], [5, 0], [2, 6, 4, 8]]
        lens = [3 * bs - 1, bs + 1, 4 * bs]
    width = max(map(len, rows))
    table = torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.int32)
    return table, torch.tensor(lens, dtype=torch.int32), int(table.max()) + 1


def test_find_shared_prefixes_groups_rows_by_their_common_leading_full_blocks():
    table, lens, _ = shared_prefix_tables("two_requests", 16)
    groups = find_shared_prefixes(table, lens, 16)
    starts = groups.group_starts.tolist()
    found = {tuple(groups.group_rows[a:b].tolist()): (plen, leader) for a, b, plen, leader in
             zip(starts, starts[1:], groups.prefix_lens.tolist(), groups.leaders.tolist())}
    # {0, 2, 5}: blocks 0, 1, 2 in common, all full in each (row 2's sibling block 3 is not
    # row 5's); {1, 4}: blocks 10, 11 (row 1 has filled two of its three blocks).
    assert found == {(0, 2, 5): (48, 0), (1, 4): (32, 1)}
    assert groups.suffix_starts.tolist() == [48, 32, 48, 0, 32, 48, 0]
    assert (groups.max_group_rows, groups.max_prefix_len) == (3, 48)
    assert groups.max_suffix_len == int((lens - groups.suffix_starts).max())
    alone = find_shared_prefixes(*shared_prefix_tables("unshared", 16)[:2], 16)
    assert alone.num_groups == 0 and alone.suffix_starts.tolist() == [0, 0, 0]


@pytest.mark.parametrize("layout", ["beams", "two_requests", "unshared"])
@pytest.mark.parametrize("hq, hkv, bs, window, softcap", CASES)
def test_cascade_decode_equals_per_beam_decode(layout, hq, hkv, bs, window, softcap):
    table, lens, num_blocks = shared_prefix_tables(layout, bs)
    g = torch.Generator().manual_seed(bs + hq)
    k = torch.randn(num_blocks, bs, hkv, 16, generator=g)
    v = torch.randn(num_blocks, bs, hkv, 16, generator=g)
    q = torch.randn(table.shape[0], hq, 16, generator=g)
    args = (q, k, v, table, lens, 0.3, window, softcap)
    expected, expected_lse = paged_decode_attention_triton(*args)
    groups = find_shared_prefixes(table, lens, bs)
    assert (groups.num_groups > 0) == (layout != "unshared")
    for splits in ((3, 2), (None, None)):
        out, lse = cascade_decode_attention_triton(*args, groups, *splits)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse, expected_lse, atol=1e-5, rtol=1e-5)
    ref, ref_lse = cascade_decode_attention(*args)           # on CPU: the reference
    per_beam, per_beam_lse = paged_decode_attention_ref(*args)
    torch.testing.assert_close(ref, per_beam, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ref_lse, per_beam_lse, atol=1e-5, rtol=1e-5)


def test_host_groups_follow_requests_where_that_reads_fewer_blocks():
    """Prefix caching lets requests share their first blocks. Two requests of four beams on a
    cached 2-block beginning and 4 blocks of their own prompts: one group by first block
    would save 7 x 2 block reads a step, one per request 2 x 3 x 6, so the groups follow the
    requests (as they did before requests shared blocks). Eight one-beam requests on that
    beginning save nothing apart, so they stay one group. Either way the cascade gives the
    per-beam attention."""
    bs = 4
    rows = [[0, 1, *range(10 + 10 * r, 14 + 10 * r), 100 + 4 * r + b]
            for r in range(2) for b in range(4)]
    tables, lens = np.array(rows, dtype=np.int32), np.full(8, 6 * bs + 2, dtype=np.int32)

    def groups(tables, lens, requests):
        words = shared_prefix_words(tables, lens, bs, 8, 2, requests)
        return static_shared_prefixes(torch.from_numpy(words), 8, 7 * bs, 2)
    by_request = groups(tables, lens, np.repeat([0, 1], 4))
    assert by_request.suffix_starts[:8].tolist() == [6 * bs] * 8
    assert groups(tables, lens, None).suffix_starts[:8].tolist() == [2 * bs] * 8
    singles = np.array([[0, 1, 100 + i] for i in range(8)], dtype=np.int32)
    single_lens = np.full(8, 2 * bs + 3, dtype=np.int32)
    assert groups(singles, single_lens, np.arange(8)).suffix_starts[:8].tolist() == [2 * bs] * 8
    g = torch.Generator().manual_seed(3)
    k = torch.randn(200, bs, 2, 16, generator=g)
    v = torch.randn(200, bs, 2, 16, generator=g)
    q = torch.randn(8, 4, 16, generator=g)
    args = (q, k, v, torch.from_numpy(tables), torch.from_numpy(lens), 0.3, None, None)
    expected, expected_lse = paged_decode_attention_ref(*args)
    out, lse = cascade_decode_attention_triton(*args, by_request, 2, 2)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, expected_lse, atol=1e-5, rtol=1e-5)


def test_host_groups_of_a_bucket_are_find_shared_prefixes_groups_padded():
    rng = np.random.default_rng(0)
    for _ in range(300):
        n, used, bs = int(rng.integers(1, 12)), int(rng.integers(1, 6)), 4
        tables = rng.integers(0, 50, size=(3, used))[rng.integers(0, 3, size=n)]
        for i in range(n):          # each row keeps a random leading run of its prompt's ids
            cut = int(rng.integers(0, used + 1))
            tables[i, cut:] = rng.integers(50, 200, size=used - cut)
        tables = tables.astype(np.int32)
        lens = rng.integers(1, used * bs + 1, size=n).astype(np.int32)
        bucket = n + int(rng.integers(0, 4))
        group = int(rng.choice([1, 4, 7, 32]))
        got = static_shared_prefixes(torch.from_numpy(shared_prefix_words(tables, lens, bs,
                                                                          bucket, group)),
                                     bucket, used * bs, group)
        want = find_shared_prefixes(torch.from_numpy(tables), torch.from_numpy(lens), bs)
        G, R = want.num_groups, want.group_rows.numel()
        assert got.group_rows[:R].tolist() == want.group_rows.tolist()
        assert got.group_starts[:G + 1].tolist() == want.group_starts.tolist()
        assert set(got.group_starts[G:].tolist()) == {R}          # the padding groups: empty
        assert got.prefix_lens[:G].tolist() == want.prefix_lens.tolist()
        assert got.leaders[:G].tolist() == want.leaders.tolist()
        assert got.suffix_starts[:n].tolist() == want.suffix_starts.tolist()
        assert not got.suffix_starts[n:].any()
        # The prefix tiles: each group's rows in order, rows_per_tile at a time, then none.
        rpt, starts = got.rows_per_tile, want.group_starts.tolist()
        tiles = [(g, r) for g in range(G) for r in range(0, starts[g + 1] - starts[g], rpt)]
        assert rpt == max(1, 64 // group)
        assert list(zip(got.tile_groups.tolist(), got.tile_starts.tolist()))[:len(tiles)] == tiles
        assert set(got.tile_groups[len(tiles):].tolist()) <= {-1}


@pytest.mark.parametrize("layout", ["beams", "two_requests", "unshared"])
@pytest.mark.parametrize("window", [None, 6])
@pytest.mark.parametrize("hq", [8, 64], ids=["one-tile-a-group", "two-rows-a-tile"])
def test_cascade_on_a_padded_buckets_static_groups_equals_per_beam_decode(layout, window, hq):
    # The layout a CUDA graph replays: groups found on the host, padded to the bucket (empty
    # groups, padding rows on a scratch block at length 1), the prefix kernel's tiles listed
    # (32 query heads a kv head: 2 rows a tile, so a group spans tiles), grids sized by the
    # bucket alone.
    bs, hkv, pad = 8, 2, 3
    table, lens, num_blocks = shared_prefix_tables(layout, bs)
    n, width = table.shape
    bucket = n + pad
    g = torch.Generator().manual_seed(n)
    k = torch.randn(num_blocks + 1, bs, hkv, 16, generator=g)    # the last: scratch
    v = torch.randn(num_blocks + 1, bs, hkv, 16, generator=g)
    q = torch.randn(bucket, hq, 16, generator=g)
    padded = torch.cat([table, torch.full((pad, width), num_blocks, dtype=torch.int32)])
    padded_lens = torch.cat([lens, torch.ones(pad, dtype=torch.int32)])
    words = shared_prefix_words(table.numpy(), lens.numpy(), bs, bucket, hq // hkv)
    groups = static_shared_prefixes(torch.from_numpy(words), bucket, width * bs, hq // hkv)
    args = (q, k, v, padded, padded_lens, 0.3, window, None)
    expected, expected_lse = paged_decode_attention_triton(*args)
    for out, lse in (cascade_decode_attention_triton(*args, groups),
                     cascade_decode_attention_triton(*args, groups, 3, 2),   # splits merged
                     cascade_decode_attention_ref(*args, groups)):
        torch.testing.assert_close(out[:n], expected[:n], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse[:n], expected_lse[:n], atol=1e-5, rtol=1e-5)


def test_store_kv_triton_skips_padding_slots_and_accepts_strided_k():
    kv = torch.randn(5, 4, 4)                    # [N, 2 * Hkv, D]: k and v as strided halves
    k, v = kv[:, :2], kv[:, 2:4]
    slots = torch.tensor([3, -1, 0, 15, 9])
    caches = [torch.zeros(4, 4, 2, 4) for _ in range(4)]
    store_kv_triton(k, v, caches[0], caches[1], slots)
    store_kv_ref(k, v, caches[2], caches[3], slots)
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])
    assert torch.equal(caches[0].view(-1, 2, 4)[15], k[3])
    assert caches[0].view(-1, 2, 4)[[1, 2, 4]].abs().sum() == 0


def test_copy_blocks_triton_copies_every_layer_k_and_v_in_one_launch():
    pool = torch.randn(3, 2, 10, 4, 2, 8, dtype=torch.float16)
    expected = pool.clone()
    src, dst = torch.tensor([1, 2, 1]), torch.tensor([5, 7, 9])
    copy_blocks_triton(pool, src, dst)
    copy_blocks_ref(expected, src, dst)
    assert torch.equal(pool, expected)
    assert torch.equal(pool[:, :, 9], pool[:, :, 1])


def plain_reward(a, b, t, seg, n):
    diff = (a.float().log_softmax(-1).gather(1, t[:, None]) -
            b.float().log_softmax(-1).gather(1, t[:, None]))[:, 0]
    return diff, torch.zeros(n).index_add_(0, seg, diff)


@pytest.fixture(params=["one-launch", "split"])
def reward_form(request, monkeypatch):
    """chunk_reward_triton's two forms: one program per row that ends the row itself (small
    logits, or rows enough to fill the GPU), and rows split over the vocabulary, merged by a
    second launch (forced here by leaving no logits small enough for the first)."""
    import w2s_engine.kernels.chunk_reward as cr
    if request.param == "split":
        monkeypatch.setattr(cr, "DIRECT_MAX_ELEMENTS", 0)
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("vocab", [1000, 4099])
def test_chunk_reward_triton_matches_reference_and_plain_torch(dtype, vocab, reward_form):
    g = torch.Generator().manual_seed(vocab)
    a = (torch.randn(7, vocab, generator=g) * 3).to(dtype)
    b = (torch.randn(7, vocab, generator=g) * 3).to(dtype)
    t = torch.randint(0, vocab, (7,), generator=g)
    seg = torch.tensor([0, 3, 0, 1, 3, 3, 0])     # segment 2 is empty, segments interleave
    diff, sums = chunk_reward_triton(a, b, t, seg, 4)
    rdiff, rsums = chunk_reward_ref(a, b, t, seg, 4)
    pdiff, psums = plain_reward(a, b, t, seg, 4)
    torch.testing.assert_close(diff, rdiff, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(rdiff, pdiff, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sums, psums, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(rsums, psums, atol=1e-5, rtol=1e-5)
    assert sums[2] == 0


def test_chunk_reward_triton_handles_a_32k_vocab_and_sliced_rows(reward_form):
    big = torch.randn(4, 32768 + 100)
    a, b = big[:, :32000], torch.randn(4, 32000)    # a: row stride larger than V
    t = torch.tensor([0, 31999, 5, 17])
    seg = torch.tensor([0, 0, 1, 1])
    torch.testing.assert_close(chunk_reward_triton(a, b, t, seg, 2)[0],
                               plain_reward(a, b, t, seg, 2)[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_chunk_reward_of_masked_logits_matches_log_softmax(dtype, reward_form):
    """Models mask tokens with -inf or the dtype's most negative value: whole vocabulary
    splits of them, a row masked but for its target, a row mostly at the floor value. The
    reward is log_softmax's, with no NaN from -inf minus -inf."""
    vocab = 9000                          # three 4,096-id splits under the interpreter's grid
    g = torch.Generator().manual_seed(3)
    a, b = (torch.randn(5, vocab, generator=g) * 3 for _ in range(2))
    low = torch.finfo(dtype).min
    a[0, :4096] = float("-inf")           # a whole split of -inf
    b[1, 4096:] = low                     # two splits of the floor value
    t = torch.tensor([5000, 17, 8999, 8500, 4200])
    a[2] = float("-inf")
    a[2, 8999] = 1.0                      # only the target is left: log p = 0
    b[3, :8000] = low                     # most of the vocabulary at the floor
    a, b = a.to(dtype), b.to(dtype)
    seg = torch.tensor([0, 1, 2, 3, 4])
    diff, _ = chunk_reward_triton(a, b, t, seg, 5)
    want, _ = plain_reward(a, b, t, seg, 5)
    assert torch.isfinite(diff).all()
    torch.testing.assert_close(diff, want, atol=1e-4, rtol=1e-4)


def test_chunk_reward_checks_its_bounds_unless_the_caller_has():
    """Out-of-range targets or segments are a clear error, not a device fault; a caller that
    checked them on the host (the engine) skips the device read-back and gets the same sums."""
    a, b = torch.randn(3, 50), torch.randn(3, 50)
    seg = torch.tensor([0, 1, 1])
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 50\)"):
        chunk_reward_triton(a, b, torch.tensor([0, 50, 1]), seg, 2)
    with pytest.raises(ValueError, match=r"segment_ids must lie in \[0, num_segments=2\)"):
        chunk_reward_triton(a, b, torch.tensor([0, 5, 1]), torch.tensor([0, 2, 1]), 2)
    t = torch.tensor([0, 49, 7])
    torch.testing.assert_close(chunk_reward_triton(a, b, t, seg, 2, bounds_checked=True)[1],
                               chunk_reward_triton(a, b, t, seg, 2)[1], atol=0, rtol=0)


def test_chunk_reward_sums_survive_the_autotuners_timed_runs(reward_form, monkeypatch):
    """On a GPU the autotuner times every configuration on the call's own arguments, hundreds
    of runs each, the first time a key is met: the one-launch form adds into the segment sums
    at each run, so they must start from zero before each (and before the real run), and the
    split form's placeholder for them (a buffer its other vocabulary chunks wrote) must not
    be zeroed. Here the interpreter's one configuration is made two, each timed by running
    it three times."""
    import triton

    import w2s_engine.kernels.chunk_reward as cr
    kernel = cr._logits_lse_kernel
    monkeypatch.setattr(kernel, "configs", [triton.Config({"BLOCK_V": 1024}),
                                            triton.Config({"BLOCK_V": 2048})])
    monkeypatch.setattr(kernel, "cache", {})

    def timed_three_times(kernel_call, quantiles=None):
        for _ in range(3):
            kernel_call()
        return [1.0, 1.0, 1.0]
    monkeypatch.setattr(kernel, "do_bench", timed_three_times, raising=False)
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(7, 1000, generator=g) * 3, torch.randn(7, 1000, generator=g) * 3
    t = torch.randint(0, 1000, (7,), generator=g)
    seg = torch.tensor([0, 3, 0, 1, 3, 3, 0])
    diff, sums = chunk_reward_triton(a, b, t, seg, 4)
    pdiff, psums = plain_reward(a, b, t, seg, 4)
    torch.testing.assert_close(diff, pdiff, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(sums, psums, atol=1e-4, rtol=1e-4)
    # The LM-head form over three vocabulary chunks: each chunk's launch is tuned anew (its
    # width's key) after the chunks before it wrote their partials.
    h = torch.randn(5, 16, generator=g)
    heads = LMHead(torch.randn(9000, 16, generator=g)), LMHead(torch.randn(9000, 16, generator=g))
    t, seg = torch.tensor([0, 4100, 8999, 17, 8300]), torch.tensor([0, 1, 1, 0, 2])
    monkeypatch.setattr(kernel, "cache", {})
    got = fused_lmhead_chunk_reward_triton(h, heads[0], h, heads[1], t, seg, 3,
                                           vocab_chunk=4096)
    want = fused_lmhead_chunk_reward_ref(h, heads[0], h, heads[1], t, seg, 3)
    torch.testing.assert_close(got[0], want[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got[1], want[1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("softcap, bias", [(None, False), (None, True), (30.0, True)])
@pytest.mark.parametrize("vocab_chunk", [None, 300])
def test_one_models_lmhead_logprob_matches_log_softmax_in_vocabulary_chunks(dtype, softcap,
                                                                           bias, vocab_chunk):
    g = torch.Generator().manual_seed(2)
    vocab, n = 1000, 5
    w = (torch.randn(vocab, 48, generator=g) * 0.3).to(dtype)
    b = (torch.randn(vocab, generator=g) * 2).to(dtype) if bias else None
    h = torch.randn(n, 48, generator=g).to(dtype)
    t = torch.tensor([299, 300, 999, 0, 512])
    seg = torch.tensor([1, 0, 1, 1, 0])
    head = LMHead(w, b, softcap)
    logp, sums = lmhead_chunk_logprob_triton(h, head, t, seg, 2, vocab_chunk=vocab_chunk)
    ref, _ = lmhead_chunk_logprob_ref(h, head, t, seg, 2)
    logits = (h @ w.T + (b if bias else 0)).float()
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    plain = logits.log_softmax(-1).gather(1, t[:, None])[:, 0]
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(logp, ref, atol=tol, rtol=tol)
    torch.testing.assert_close(ref, plain, atol=tol, rtol=tol)
    torch.testing.assert_close(sums, torch.zeros(2).index_add_(0, seg, plain), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("softcaps", [(None, None), (None, 5.0), (30.0, 30.0)])
@pytest.mark.parametrize("vocab_chunk", [None, 300])    # 300: four GEMMs, the last narrower
def test_fused_lmhead_reward_matches_logits_path_in_vocabulary_chunks(dtype, softcaps,
                                                                        vocab_chunk):
    g = torch.Generator().manual_seed(1)
    vocab, n = 1000, 5
    w1 = (torch.randn(vocab, 48, generator=g) * 0.3).to(dtype)
    w2 = (torch.randn(vocab, 32, generator=g) * 0.3).to(dtype)   # another hidden size
    bias = (torch.randn(vocab, generator=g) * 2).to(dtype)       # the tuned head has a bias
    h1 = torch.randn(n, 48, generator=g).to(dtype)
    h2 = torch.randn(n, 32, generator=g).to(dtype)
    t = torch.tensor([299, 300, 999, 0, 512])      # either side of a chunk's edge, both ends
    seg = torch.tensor([1, 0, 1, 1, 0])
    heads = LMHead(w1, bias, softcaps[0]), LMHead(w2, None, softcaps[1])
    diff, sums = fused_lmhead_chunk_reward_triton(h1, heads[0], h2, heads[1], t, seg, 2,
                                                  vocab_chunk=vocab_chunk)
    rdiff, _ = fused_lmhead_chunk_reward_ref(h1, heads[0], h2, heads[1], t, seg, 2)

    def capped(x, c):
        return c * torch.tanh(x / c) if c else x
    pdiff, psums = plain_reward(capped((h1 @ w1.T + bias).float(), softcaps[0]),
                                capped((h2 @ w2.T).float(), softcaps[1]), t, seg, 2)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(diff, rdiff, atol=tol, rtol=tol)
    torch.testing.assert_close(rdiff, pdiff, atol=tol, rtol=tol)
    torch.testing.assert_close(sums, psums, atol=tol, rtol=tol)


def sampling_rows(b=6, vocab=1000, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, vocab, generator=g) * 3
    temperature = torch.tensor([0.0, 1.0, 0.7, 1.0, 2.0, 1.0])[:b]
    top_k = torch.tensor([0, 0, 50, 10, 0, 3], dtype=torch.int32)[:b]
    top_p = torch.tensor([1.0, 0.9, 1.0, 0.5, 1.0, 0.95])[:b]
    seeds = torch.tensor([1, 2, 3, 4, 2 ** 40 + 5, 6])[:b]
    positions = torch.tensor([0, 5, 9, 100, 7, 3])[:b]
    return logits, temperature, top_k, top_p, seeds, positions


def sampling_batch(mode, b=8, vocab=3000, seed=0):
    """Rows of one filter kind (or all kinds mixed) with varied temperatures, seeds, positions."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, vocab, generator=g) * 3
    temperature = torch.tensor([0.7, 1.0, 1.3, 0.5, 2.0, 0.9, 1.0, 0.8])[:b]
    top_k = torch.zeros(b, dtype=torch.int32)
    top_p = torch.ones(b)
    if mode in ("top_k", "top_k_and_top_p"):
        top_k = torch.tensor([1, 5, 50, 200, 7, 3, 40, 1000], dtype=torch.int32)[:b]
    if mode in ("top_p", "top_k_and_top_p"):
        top_p = torch.tensor([0.9, 0.5, 0.95, 0.3, 0.99, 0.8, 0.7, 0.6])[:b]
    if mode == "greedy":
        temperature = torch.zeros(b)
        top_k = torch.tensor([0, 5, 0, 50, 0, 3, 0, 9], dtype=torch.int32)[:b]
    if mode == "mixed":   # none, greedy, top-k, top-p, both, k >= V, both again, greedy + both
        temperature = torch.tensor([1.0, 0.0, 0.7, 1.2, 0.9, 1.0, 1.5, 0.0])[:b]
        top_k = torch.tensor([0, 0, 20, 0, 30, vocab, 4, 10], dtype=torch.int32)[:b]
        top_p = torch.tensor([1.0, 1.0, 1.0, 0.8, 0.9, 1.0, 0.5, 0.6])[:b]
    seeds = torch.randint(0, 2 ** 40, (b,), generator=g)
    positions = torch.randint(0, 10_000, (b,), generator=g)
    return logits, temperature, top_k, top_p, seeds, positions


# Vocabulary slices of the Triton path: one for the whole row, or 3 and 6 of a 3,000-token
# row, as a few rows of a real vocabulary take (kernels/sampling.py vocab_slices).
SLICE_SIZES = [None, 1024, 500]


@pytest.mark.parametrize("slice_size", SLICE_SIZES)
@pytest.mark.parametrize("mode", ["top_k", "top_p", "top_k_and_top_p", "greedy", "mixed"])
def test_sampling_triton_draws_the_references_tokens(mode, slice_size):
    from w2s_engine.kernels.sampling import _scaled, _thresholds
    for seed in range(3):
        args = sampling_batch(mode, seed=seed)
        tokens, thr = sample_triton(*args, return_thresholds=True, slice_size=slice_size)
        assert tokens.tolist() == sample_ref(*args).tolist()
        # The kernel's cut (a radix select, no sort) is the sorted reference's, bit for bit.
        logits, temperature, top_k, top_p = args[:4]
        sampled = temperature > 0
        assert torch.equal(thr[sampled], _thresholds(_scaled(logits, temperature), top_k,
                                                     top_p)[sampled])
    if mode == "greedy":
        assert torch.equal(sample_ref(*args), args[0].argmax(-1))


@pytest.mark.parametrize("slice_size", SLICE_SIZES)
def test_top_p_on_peaked_rows_draws_the_references_tokens_and_cut(slice_size):
    """A trained model's rows: a few tokens hold most of the mass over a long flat tail. The
    kernel bounds the nucleus by the group maxima there (not the loose bound of a flat row);
    the tokens and the cut are still the sorted reference's, bit for bit, for nuclei of one
    token to a few hundred."""
    from w2s_engine.kernels.sampling import _scaled, _thresholds
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(8, 3000, generator=g)
    for row, (lifted, by) in enumerate([(1, 12.0), (3, 8.0), (10, 6.0), (40, 5.0), (200, 4.0),
                                        (5, 2.0), (1, 1.0), (600, 3.0)]):
        logits[row, torch.randperm(3000, generator=g)[:lifted]] += by
    temperature = torch.tensor([0.7, 1.0, 1.3, 0.5, 2.0, 0.9, 1.0, 0.8])
    top_k = torch.zeros(8, dtype=torch.int32)
    top_p = torch.tensor([0.9, 0.5, 0.95, 0.3, 0.99, 0.8, 0.7, 0.6])
    for shift in range(2):
        args = (logits, temperature, top_k, top_p, torch.arange(8) + 11, torch.arange(8) + shift)
        tokens, thr = sample_triton(*args, return_thresholds=True, slice_size=slice_size)
        assert tokens.tolist() == sample_ref(*args).tolist()
        assert torch.equal(thr, _thresholds(_scaled(logits, temperature), top_k, top_p))


def test_top_p_alone_over_a_vocabulary_of_many_lanes_draws_the_references_tokens_and_cut():
    """top-p without top-k reads its whole row (no vocabulary slices can bound it), and bounds
    the nucleus from below before its selects: by the lanes' maxima where those alone hold the
    nucleus's mass (peaked rows), else by the mass above 16 levels (flat rows: a nucleus of
    thousands). Over a vocabulary of 23 lanes' worth of tokens each kind comes up (checked
    here against the kernel's lane count), and every row still draws the sorted reference's
    token and cut, bit for bit."""
    from w2s_engine.kernels.sampling import _sample_kernel, _scaled, _thresholds
    vocab = 24_000
    g = torch.Generator().manual_seed(3)
    scale = torch.tensor([0.3, 1.0, 3.0, 3.0, 6.0, 1.0, 0.3, 3.0])[:, None]
    logits = torch.randn(8, vocab, generator=g) * scale
    rank = torch.rand(vocab, generator=g).argsort().float() + 1
    logits[5] = -1.1 * rank.log()                               # zipf: a trained model's shape
    temperature = torch.tensor([1.0, 1.0, 0.7, 1.0, 1.0, 0.7, 1.0, 1.3])
    top_k = torch.zeros(8, dtype=torch.int32)
    top_p = torch.tensor([0.9, 0.5, 0.9, 0.98, 0.3, 0.9, 0.05, 0.95])
    args = (logits, temperature, top_k, top_p, torch.arange(8) + 101, torch.arange(8) * 3)
    tokens, thr = sample_triton(*args, return_thresholds=True)
    assert tokens.tolist() == sample_ref(*args).tolist()
    scaled = _scaled(logits, temperature)
    assert torch.equal(thr, _thresholds(scaled, top_k, top_p))
    # Which bound each row took: do its lanes' maxima hold the nucleus's mass?
    lanes = _sample_kernel.configs[0].kwargs["BLOCK_V"]
    pad = torch.full((8, (-vocab) % lanes), float("-inf"))
    lane_max = torch.cat([scaled, pad], 1).view(8, -1, lanes).amax(1)
    mass = (scaled - scaled.amax(1, keepdim=True)).exp()
    lanes_hold = ((lane_max - scaled.amax(1, keepdim=True)).exp().sum(1)
                  >= top_p * mass.sum(1) * 1.001)
    assert 0 < int(lanes_hold.sum()) < 8, lanes_hold


def test_top_p_bound_counts_negative_zero_logits_as_their_sort_key_does():
    """The flat-row bound weighs 16 levels; a level can land exactly on +0.0 while the row's
    tokens sit at -0.0, which float compares count at that level and the candidates' sort
    keys leave below it. The levels are compared as keys, so every top_p around that point
    (one float step apart) keeps the reference's cut: a nucleus short of its mass would have
    left the row uncut."""
    import math

    import numpy as np

    from w2s_engine.kernels.sampling import _scaled, _thresholds
    vocab, top = 3072, 0.5625
    row = torch.full((vocab,), -0.0)
    row[100] = top
    row[torch.arange(8) * 300 + 7] = -3.0
    z = 1 + 3063 * math.exp(-top) + 8 * math.exp(-3.0 - top)
    ps = [np.float32(1 - math.exp(1 - 4 * top) * vocab / z)]   # level 3 is exactly +0.0
    for _ in range(8):
        ps = [np.nextafter(ps[0], np.float32(0)), *ps, np.nextafter(ps[-1], np.float32(1))]
    b = len(ps)
    logits = row[None].repeat(b, 1)
    args = (logits, torch.ones(b), torch.zeros(b, dtype=torch.int32),
            torch.tensor(np.array(ps, np.float32)), torch.arange(b) + 5, torch.arange(b))
    tokens, thr = sample_triton(*args, return_thresholds=True)
    assert tokens.tolist() == sample_ref(*args).tolist()
    assert torch.equal(thr, _thresholds(_scaled(logits, args[1]), args[2], args[3]))


@pytest.mark.parametrize("slice_size", SLICE_SIZES)
def test_sampling_triton_keeps_ties_and_skips_minus_inf_logits_like_the_full_reference(
        slice_size):
    g = torch.Generator().manual_seed(5)
    logits = (torch.randn(8, 2500, generator=g) * 2).round().half()   # many ties at every cut
    logits[:, ::3] = float("-inf")                                     # a masked vocabulary
    _, temperature, _, _, seeds, positions = sampling_batch("mixed")
    top_k = torch.tensor([0, 0, 20, 0, 30, 600, 4, 10], dtype=torch.int32)
    top_p = torch.tensor([1.0, 1.0, 1.0, 0.8, 0.9, 1.0, 0.5, 0.6])
    args = (logits, temperature, top_k, top_p, seeds, positions)
    for shift in range(3):
        moved = (*args[:5], positions + shift)
        tokens = sample_triton(*moved, slice_size=slice_size)
        assert tokens.tolist() == sample_ref(*moved).tolist()
        assert torch.isfinite(logits[torch.arange(8), tokens]).all()


@pytest.mark.parametrize("slice_size", [None, 500])
@pytest.mark.parametrize("mode", ["top_k", "mixed"])   # mixed: every kind of row
def test_sampling_never_draws_a_nan_logit_and_both_paths_draw_the_same_token(mode, slice_size):
    """A model that overflows (float16) writes NaN logits: both paths read them as -inf, so
    the CPU and the GPU draw the same token, never a NaN one; a row with no finite logit at
    all draws token 0 on both."""
    for seed in range(2):
        logits, *rest = sampling_batch(mode, seed=seed)
        g = torch.Generator().manual_seed(seed)
        logits[torch.rand(logits.shape, generator=g) < 0.3] = float("nan")
        logits[:, 7] = float("nan")                     # (the unmasked argmax, if NaN won)
        logits[3] = float("nan")                        # nothing finite in this row
        logits[5, :2000] = float("nan")                 # the first slices all NaN
        args = (logits, *rest)
        tokens = sample_triton(*args, slice_size=slice_size)
        assert tokens.tolist() == sample_ref(*args).tolist()
        finite = [i for i in range(logits.shape[0]) if i != 3]
        assert torch.isfinite(logits[finite, tokens[finite]]).all()
        assert tokens[3] == 0


def transformers_kept(scaled, k, p):
    """The tokens transformers' TopKLogitsWarper then TopPLogitsWarper leave finite, one row."""
    from transformers.generation.logits_process import (
        TopKLogitsWarper,
        TopPLogitsWarper,
    )
    x = scaled[None].clone()
    if 0 < k < x.shape[1]:
        x = TopKLogitsWarper(top_k=k)(None, x)
    if p < 1.0:
        x = TopPLogitsWarper(top_p=p)(None, x)
    return torch.isfinite(x[0])


def test_kept_set_equals_transformers_top_k_then_top_p_warpers():
    from w2s_engine.kernels.sampling import _thresholds, _top_k_candidates
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(12, 2000, generator=g) * torch.tensor([0.5, 1, 2, 4] * 3)[:, None]
    top_k = torch.tensor([10, 100, 50, 3, 0, 0, 0, 0, 40, 400, 5, 1], dtype=torch.int32)
    top_p = torch.tensor([0.9, 0.5, 0.95, 0.2, 0.9, 0.5, 0.95, 0.2, 1.0, 1.0, 1.0, 0.3])
    thr = _thresholds(logits, top_k, top_p)                                  # the full path
    with_k = top_k > 0
    _, idx, keep = _top_k_candidates(logits[with_k], top_k[with_k], top_p[with_k])  # fast path
    fast = torch.zeros(int(with_k.sum()), 2000, dtype=torch.bool).scatter_(1, idx, keep)
    ones = torch.ones(12)
    kernel_thrs = [sample_triton(logits, ones, top_k, top_p, torch.arange(12), torch.arange(12),
                                 return_thresholds=True, slice_size=size)[1]
                   for size in (None, 500)]     # one vocabulary slice, four
    for i in range(12):
        expected = transformers_kept(logits[i], int(top_k[i]), float(top_p[i]))
        assert 1 <= int(expected.sum()) < 2000
        assert torch.equal(logits[i] >= thr[i], expected), i
        for kernel_thr in kernel_thrs:
            assert torch.equal(logits[i] >= kernel_thr[i], expected), i
        if with_k[i]:
            assert torch.equal(fast[int(with_k[:i].sum())], expected), i


def test_min_p_kept_set_equals_transformers_top_k_top_p_then_min_p_warpers():
    from transformers.generation.logits_process import MinPLogitsWarper

    from w2s_engine.kernels.sampling import _thresholds, _top_k_candidates, log_min_p_of
    g = torch.Generator().manual_seed(9)
    logits = torch.randn(10, 2000, generator=g) * torch.tensor([0.5, 1, 2, 4, 8] * 2)[:, None]
    top_k = torch.tensor([0, 0, 0, 50, 10, 200, 40, 5, 100, 30], dtype=torch.int32)
    top_p = torch.tensor([1.0, 1.0, 0.9, 1.0, 0.95, 0.8, 1.0, 1.0, 0.7, 0.99])
    min_p = torch.tensor([0.05, 0.3, 0.1, 0.02, 0.2, 0.5, 0.0, 0.9, 0.01, 0.15])
    log_min_p = log_min_p_of(min_p)
    thr = _thresholds(logits, top_k, top_p, log_min_p)
    with_k = top_k > 0
    _, idx, keep = _top_k_candidates(logits[with_k], top_k[with_k], top_p[with_k],
                                     log_min_p[with_k])
    fast = torch.zeros(int(with_k.sum()), 2000, dtype=torch.bool).scatter_(1, idx, keep)
    ones = torch.ones(10)
    kernel_thrs = [sample_triton(logits, ones, top_k, top_p, torch.arange(10), torch.arange(10),
                                 min_p, return_thresholds=True, slice_size=size)[1]
                   for size in (None, 500)]     # one vocabulary slice, four
    for i in range(10):
        x = logits[i][None].clone()
        x[0, ~transformers_kept(logits[i], int(top_k[i]), float(top_p[i]))] = float("-inf")
        if min_p[i] > 0:
            x = MinPLogitsWarper(min_p=float(min_p[i]))(None, x)
        expected = torch.isfinite(x[0])
        assert torch.equal(logits[i] >= thr[i], expected), i
        for kernel_thr in kernel_thrs:
            assert torch.equal(logits[i] >= kernel_thr[i], expected), i
        if with_k[i]:
            assert torch.equal(fast[int(with_k[:i].sum())], expected), i


@pytest.mark.parametrize("slice_size", SLICE_SIZES)
@pytest.mark.parametrize("mode", ["none", "top_k", "top_p", "mixed"])
def test_sampling_with_min_p_draws_the_same_tokens_on_both_paths(mode, slice_size):
    for seed in range(3):
        logits, temperature, top_k, top_p, seeds, positions = sampling_batch(mode, seed=seed)
        b = logits.shape[0]
        min_p = torch.tensor([0.0, 0.05, 0.2, 0.5, 0.01, 0.1, 0.3, 0.9])[:b]
        tokens = sample_triton(logits, temperature, top_k, top_p, seeds, positions, min_p,
                               slice_size=slice_size)
        assert tokens.tolist() == sample_ref(logits, temperature, top_k, top_p, seeds,
                                             positions, min_p).tolist()
        scaled = logits.float() / torch.where(temperature > 0, temperature, 1.0)[:, None]
        chosen = scaled[torch.arange(b), tokens]
        assert (chosen >= scaled.max(-1).values + torch.log(min_p) - 1e-6).all()


def test_top_k_fast_path_draws_the_same_tokens_as_the_full_vocabulary_path():
    from w2s_engine.kernels.sampling import _sample_full_ref, _sample_top_k_ref, _scaled
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(8, 5000, generator=g) * 3
    t = torch.tensor([0.0, 0.5, 1.0, 1.5, 0.7, 1.0, 2.0, 0.9])
    k = torch.tensor([1, 5, 50, 50, 20, 3, 40, 50], dtype=torch.int32)
    p = torch.tensor([1.0, 1.0, 0.9, 0.5, 1.0, 0.8, 0.95, 1.0])
    seeds, pos = torch.arange(8) * 31, torch.arange(8) + 4
    scaled = _scaled(logits, t)
    fast = _sample_top_k_ref(scaled, t, k, p, seeds, pos)
    assert torch.equal(fast, _sample_full_ref(scaled, t, k, p, seeds, pos))
    assert torch.equal(fast, sample_triton(logits, t, k, p, seeds, pos))


@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "sampled"])
def test_with_ties_at_the_kth_logit_the_cpu_and_the_kernel_keep_every_tied_token(temperature):
    """transformers' top-k keeps every token tied with the k-th largest; so do the kernel and
    the CPU's full path, and the CPU's top-k fast path gives way to it when a tie crosses the
    k-th (bf16 logits of a 32k vocabulary tie there in about half the rows). Greedy ties go to
    the lowest id, as argmax."""
    from w2s_engine.kernels.sampling import _sample_full_ref, _scaled
    g = torch.Generator().manual_seed(5)
    flat = torch.zeros(6, 16)
    flat[0, [3, 9, 12]] = 1.0      # k=4: the 4th is a 0 tied with 12 others
    flat[1] = 0.5                  # all tied
    flat[2, [2, 7]] = 2.0          # the two best tied, k=1
    rounded = (torch.randn(3, 16, generator=g) * 2).round() / 2   # coarse: many ties
    logits = torch.cat([flat[:3], rounded])
    b = logits.shape[0]
    t = torch.full((b,), temperature)
    k = torch.tensor([4, 4, 1, 3, 5, 2], dtype=torch.int32)
    p = torch.ones(b)
    for seed in range(4):
        seeds, pos = torch.arange(b) * 7 + seed, torch.arange(b)
        cpu = sample_ref(logits, t, k, p, seeds, pos)
        assert cpu.tolist() == sample_triton(logits, t, k, p, seeds, pos).tolist()
        assert torch.equal(cpu, _sample_full_ref(_scaled(logits, t), t, k, p, seeds, pos))
        if temperature == 0:
            assert cpu.tolist() == logits.argmax(-1).tolist()


@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "sampled"])
def test_top_k_fast_path_keeps_every_token_tied_at_the_top_p_cut_whatever_the_batch(
        temperature):
    """With a top-k and a top-p, two best tokens tied (bf16 logits tie often) are both in the
    nucleus on the full path and in the kernel (one threshold); the CPU's top-k fast path cut
    by topk's rank, keeping one of them: a seeded row drew another token alone (every row has
    a top-k: the fast path) than batched with a row without one (the full path), and a greedy
    row could take the higher id where vLLM's argmax takes the lowest."""
    g = torch.Generator().manual_seed(11)
    rows = torch.randn(24, 40, generator=g)
    ties = torch.stack([torch.randperm(40, generator=g)[:2] for _ in range(24)])
    rows.scatter_(1, ties, 9.0)     # each holding ~half the mass: top_p=0.3 keeps the best
    t = torch.full((24,), temperature)
    k, p = torch.full((24,), 3, dtype=torch.int32), torch.full((24,), 0.3)
    seeds, pos = torch.arange(24) * 13, torch.arange(24)
    alone = sample_ref(rows, t, k, p, seeds, pos)                       # the fast path
    mixed = sample_ref(torch.cat([rows, rows[:1]]), torch.cat([t, t[:1]]),
                       torch.cat([k, torch.zeros(1, dtype=torch.int32)]), torch.cat([p, p[:1]]),
                       torch.cat([seeds, seeds[:1]]), torch.cat([pos, pos[:1]]))[:24]
    assert alone.tolist() == mixed.tolist()
    assert set(alone.tolist()) <= set(ties.flatten().tolist())
    if temperature == 0:
        assert alone.tolist() == ties.min(-1).values.tolist()     # argmax: the lowest id
    else:
        assert alone.tolist() != ties.min(-1).values.tolist()     # both tied tokens drawn
    assert alone.tolist() == sample_triton(rows, t, k, p, seeds, pos).tolist()


def test_top_k_fast_path_with_top_p_off_keeps_all_k_tokens_of_a_peaked_row():
    """top_p=1 is off on the full path and in the kernel; the fast path still cut where the
    mass before a token rounds to 1 in fp32 (one token holding all but ~1e-8 of it), so the
    k-th token was allowed or not depending on the batch."""
    from w2s_engine.kernels.sampling import _thresholds, _top_k_candidates
    x = torch.tensor([[20.0, 0.0, -1.0, 3.0], [17.0, 0.5, 9.0, -4.0]])
    k, p = torch.tensor([3, 4], dtype=torch.int32), torch.ones(2)
    _, idx, keep = _top_k_candidates(x, k, p)
    fast = torch.zeros(2, 4, dtype=torch.bool).scatter_(1, idx, keep)
    assert fast.tolist() == (x >= _thresholds(x, k, p)[:, None]).tolist()
    assert fast.sum(-1).tolist() == [3, 4]


def test_sampled_token_depends_only_on_its_own_row():
    logits, temperature, top_k, top_p, seeds, positions = sampling_rows()
    batched = sample_ref(logits, temperature, top_k, top_p, seeds, positions)
    for i in range(len(seeds)):
        alone = sample_ref(logits[i:i + 1], temperature[i:i + 1], top_k[i:i + 1], top_p[i:i + 1],
                           seeds[i:i + 1], positions[i:i + 1])
        assert alone[0] == batched[i]
    moved = sample_ref(logits, temperature, top_k, top_p, seeds, positions + 1)
    assert not torch.equal(moved[1:], batched[1:])            # new position, new draw


def test_gumbel_max_draws_follow_the_filtered_softmax():
    vocab, draws = 12, 6000
    logits = torch.linspace(-2, 2, vocab)[None].repeat(draws, 1)
    t = torch.full((draws,), 0.8)
    k = torch.full((draws,), 6, dtype=torch.int32)
    p = torch.full((draws,), 0.9)
    tokens = sample_ref(logits, t, k, p, torch.arange(draws) * 7919, torch.zeros(draws, dtype=torch.long))
    probs = torch.softmax(logits[0] / 0.8, -1)
    top6 = probs.topk(6).indices
    kept = torch.zeros(vocab, dtype=torch.bool)
    kept[top6] = True
    ranked = probs[top6].sort(descending=True).values
    n_keep = int(((ranked.cumsum(0) - ranked) < 0.9).sum())
    allowed = probs.topk(n_keep).indices
    expected = torch.zeros(vocab)
    expected[allowed] = probs[allowed] / probs[allowed].sum()
    freq = torch.bincount(tokens, minlength=vocab).float() / draws
    assert set(tokens.unique().tolist()) <= set(allowed.tolist())
    torch.testing.assert_close(freq, expected, atol=0.02, rtol=0)
    noise = gumbel_noise_ref(torch.tensor([3]), torch.tensor([1]), 50000)
    assert torch.isfinite(noise).all()


@pytest.mark.parametrize("call, error", [
    (lambda: paged_decode_attention_triton(torch.zeros(2, 4, 8, dtype=torch.int32),
                                           *paged_setup(torch.float32, 4, 4, 16, [3, 4],
                                                        head_dim=8), 0.1), TypeError),
    (lambda: paged_decode_attention_triton(torch.zeros(2, 6, 8),
                                           *paged_setup(torch.float32, 6, 4, 16, [3, 4],
                                                        head_dim=8), 0.1), ValueError),
    (lambda: paged_decode_attention_triton(torch.zeros(2, 4, 16),
                                           *paged_setup(torch.float32, 4, 4, 16, [3, 4],
                                                        head_dim=8), 0.1), ValueError),
    (lambda: store_kv_triton(torch.zeros(3, 2, 4), torch.zeros(3, 2, 4),
                             torch.zeros(4, 4, 2, 8)[..., :4], torch.zeros(4, 4, 2, 4),
                             torch.tensor([0, 1, 2])), ValueError),
    (lambda: chunk_reward_triton(torch.zeros(3, 10, dtype=torch.int64), torch.zeros(3, 10),
                                 torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.long),
                                 1), TypeError),
    (lambda: chunk_reward_triton(torch.zeros(3, 10), torch.zeros(3, 10),
                                 torch.zeros(3), torch.zeros(3, dtype=torch.long), 1), TypeError),
    (lambda: chunk_reward_triton(torch.zeros(3, 10), torch.zeros(3, 10),
                                 torch.tensor([0, 1, 10]), torch.zeros(3, dtype=torch.long), 1),
     ValueError),
    (lambda: fused_lmhead_chunk_reward_triton(torch.zeros(2, 8), LMHead(torch.zeros(10, 8)),
                                              torch.zeros(2, 8), LMHead(torch.zeros(11, 8)),
                                              torch.zeros(2, dtype=torch.long),
                                              torch.zeros(2, dtype=torch.long), 1), ValueError),
    (lambda: fused_lmhead_chunk_reward_triton(torch.zeros(2, 8),
                                              LMHead(torch.zeros(10, 8), torch.zeros(11)),
                                              torch.zeros(2, 8), LMHead(torch.zeros(10, 8)),
                                              torch.zeros(2, dtype=torch.long),
                                              torch.zeros(2, dtype=torch.long), 1), ValueError),
    (lambda: sample_triton(torch.zeros(2, 10), torch.zeros(3), torch.zeros(2, dtype=torch.int32),
                           torch.ones(2), torch.zeros(2, dtype=torch.long),
                           torch.zeros(2, dtype=torch.long)), TypeError),
])
def test_wrappers_reject_bad_input_with_a_clear_error(call, error):
    with pytest.raises(error):
        call()


def test_cascade_wrappers_reject_groups_of_another_batch_and_bad_offsets():
    table, lens, num_blocks = shared_prefix_tables("beams", 16)
    k = torch.zeros(num_blocks, 16, 2, 16)
    q = torch.zeros(table.shape[0], 4, 16)
    other = find_shared_prefixes(table[:3], lens[:3], 16)
    with pytest.raises(ValueError, match="find them again"):
        cascade_decode_attention_triton(q, k, k, table, lens, 0.1, groups=other)
    with pytest.raises(TypeError, match="kv_start"):
        paged_decode_attention_triton(q, k, k, table, lens, 0.1, kv_start=lens.long())
    with pytest.raises(ValueError, match="seq_lens"):
        find_shared_prefixes(table, lens[:2], 16)


@pytest.mark.gpu
class TestOnGPU:
    """The same comparisons on CUDA at realistic shapes, in bf16."""

    def test_decode_32_sequences_up_to_4k_tokens(self):
        lens = torch.randint(1000, 4096, (32,)).tolist()
        k, v, bt, sl = paged_setup(torch.bfloat16, 32, 8, 16, lens, head_dim=128, device="cuda")
        q = torch.randn(32, 32, 128, device="cuda", dtype=torch.bfloat16)
        sinks = torch.linspace(-3.0, 8.0, 32, device="cuda")    # GPT-OSS's
        for window, sink in ((None, None), (128, sinks)):
            out, lse = paged_decode_attention_triton(q, k, v, bt, sl, 128 ** -0.5, window,
                                                     sinks=sink)
            ref, ref_lse = paged_decode_attention_ref(q, k, v, bt, sl, 128 ** -0.5, window,
                                                      sinks=sink)
            torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)
            torch.testing.assert_close(lse, ref_lse, atol=1e-2, rtol=1e-3)

    def test_extend_of_scoring_chunks_over_long_contexts(self):
        """A scorer's chunks: 64 beams of 8 new tokens (some shorter) after 600-2,000 tokens,
        Llama-3's 32 query / 8 kv heads: the short-chunk kernel, split and merged."""
        lens = torch.randint(600, 2048, (64,)).tolist()
        qlens = [8] * 60 + [1, 3, 5, 0]
        k, v, bt, sl = paged_setup(torch.bfloat16, 32, 8, 16, lens, head_dim=128, device="cuda")
        cu = torch.tensor([0] + torch.tensor(qlens).cumsum(0).tolist(), dtype=torch.int32,
                          device="cuda")
        q = torch.randn(sum(qlens), 32, 128, device="cuda", dtype=torch.bfloat16)
        ref = paged_extend_attention_ref(q, k, v, bt, cu, sl, 128 ** -0.5)
        for splits in (None, 1, 4):
            out = paged_extend_attention_grouped_triton(q, k, v, bt, cu, sl, 128 ** -0.5,
                                                        max_query_len=8, num_splits=splits)
            torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)

    def test_extend_chunks_and_prefills(self):
        lens = [600, 1500, 64, 2048]
        qlens = [8, 8, 64, 512]
        k, v, bt, sl = paged_setup(torch.bfloat16, 32, 8, 16, lens, head_dim=128, device="cuda")
        cu = torch.tensor([0] + torch.tensor(qlens).cumsum(0).tolist(), dtype=torch.int32,
                          device="cuda")
        q = torch.randn(sum(qlens), 32, 128, device="cuda", dtype=torch.bfloat16)
        sinks = torch.linspace(-3.0, 8.0, 32, device="cuda")    # GPT-OSS's
        for window, sink in ((None, None), (512, None), (128, sinks)):
            out = paged_extend_attention_triton(q, k, v, bt, cu, sl, 128 ** -0.5, window,
                                                sinks=sink)
            ref = paged_extend_attention_ref(q, k, v, bt, cu, sl, 128 ** -0.5, window,
                                             sinks=sink)
            torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)

    @pytest.mark.parametrize("vocab", [128256, 262144])
    def test_chunk_reward_and_fused_lmhead_at_real_vocabularies(self, vocab):
        a = torch.randn(256, vocab, device="cuda", dtype=torch.bfloat16) * 3
        b = torch.randn(256, vocab, device="cuda", dtype=torch.bfloat16) * 3
        t = torch.randint(0, vocab, (256,), device="cuda")
        seg = torch.randint(0, 16, (256,), device="cuda")
        torch.testing.assert_close(chunk_reward_triton(a, b, t, seg, 16)[0],
                                   chunk_reward_ref(a, b, t, seg, 16)[0], atol=1e-2, rtol=1e-3)
        h1 = torch.randn(64, 2048, device="cuda", dtype=torch.bfloat16)
        w1 = torch.randn(vocab, 2048, device="cuda", dtype=torch.bfloat16) * 0.02
        heads = LMHead(w1), LMHead(w1 * 1.1)
        ref = fused_lmhead_chunk_reward_ref(h1, heads[0], h1, heads[1], t[:64], seg[:64], 16)[0]
        for vocab_chunk in (None, 32768):      # one GEMM per model; chunks of 32k columns
            torch.testing.assert_close(
                fused_lmhead_chunk_reward_triton(h1, heads[0], h1, heads[1], t[:64], seg[:64],
                                                 16, vocab_chunk=vocab_chunk)[0],
                ref, atol=5e-2, rtol=1e-2)

    @pytest.mark.parametrize("mode", ["top_k", "top_p", "top_k_and_top_p", "greedy", "mixed"])
    def test_sampling_matches_reference(self, mode):
        # 256 and 16 rows of a 128k vocabulary (3 and 8 vocabulary slices): the batch of
        # sampling_batch repeated with new seeds.
        for copies in (32, 2):
            rows = [sampling_batch(mode, vocab=128256, seed=s) for s in range(copies)]
            args = [torch.cat(parts).cuda() for parts in zip(*rows)]
            tokens, thr = sample_triton(*args, return_thresholds=True)
            assert torch.equal(tokens, sample_ref(*args))
            assert thr.shape == (8 * copies,)

    def test_store_kv_4096_tokens(self):
        k = torch.randn(4096, 8, 128, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        slots = torch.randperm(2048 * 16, device="cuda")[:4096]
        slots[::7] = -1
        caches = [torch.zeros(2048, 16, 8, 128, device="cuda", dtype=torch.bfloat16)
                  for _ in range(4)]
        store_kv_triton(k, v, caches[0], caches[1], slots)
        store_kv_ref(k, v, caches[2], caches[3], slots)
        assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])

    def test_fp32_kernels_use_full_fp32_not_tf32(self):
        # References on the CPU in fp32 (no TF32 there); TF32 in tl.dot would be ~1e-3 off.
        def cpu(*ts):
            return [t.cpu() if isinstance(t, torch.Tensor) else t for t in ts]

        lens = [1, 300, 777, 1024]
        k, v, bt, sl = paged_setup(torch.float32, 16, 4, 16, lens, head_dim=128, device="cuda")
        q = torch.randn(len(lens), 16, 128, device="cuda")
        for window, softcap in ((None, None), (200, 30.0)):
            args = (q, k, v, bt, sl, 128 ** -0.5, window, softcap)
            out, lse = paged_decode_attention_triton(*args)
            ref, ref_lse = paged_decode_attention_ref(*cpu(*args))
            torch.testing.assert_close(out.cpu(), ref, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(lse.cpu(), ref_lse, atol=1e-4, rtol=1e-4)
        qlens = [1, 64, 300, 1024]
        cu = torch.tensor([0] + torch.tensor(qlens).cumsum(0).tolist(), dtype=torch.int32,
                          device="cuda")
        qx = torch.randn(sum(qlens), 16, 128, device="cuda")
        args = (qx, k, v, bt, cu, sl, 128 ** -0.5)
        torch.testing.assert_close(paged_extend_attention_triton(*args).cpu(),
                                   paged_extend_attention_ref(*cpu(*args)), atol=1e-4, rtol=1e-4)
        h = torch.randn(48, 1024, device="cuda")
        w1 = torch.randn(32000, 1024, device="cuda") * 0.05
        w2 = torch.randn(32000, 1024, device="cuda") * 0.05
        t = torch.randint(0, 32000, (48,), device="cuda")
        seg = torch.arange(48, device="cuda") % 4
        torch.testing.assert_close(
            fused_lmhead_chunk_reward_triton(h, LMHead(w1), h, LMHead(w2), t, seg, 4)[0].cpu(),
            fused_lmhead_chunk_reward_ref(h.cpu(), LMHead(w1.cpu()), h.cpu(), LMHead(w2.cpu()),
                                          t.cpu(), seg.cpu(), 4)[0],
            atol=1e-4, rtol=1e-4)

    def test_cascade_decode_at_the_beam_search_shape(self):
        beams, pb, ob, bs = 16, 128, 4, 16           # prompt 2,048, 64 own tokens per beam
        k = torch.randn(pb + beams * ob, bs, 8, 128, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        own = pb + torch.randperm(beams * ob, device="cuda").view(beams, ob)
        bt = torch.cat([torch.arange(pb, device="cuda").expand(beams, pb), own], 1).int()
        lens = torch.randint(pb * bs + 1, (pb + ob) * bs + 1, (beams,), device="cuda").int()
        q = torch.randn(beams, 32, 128, device="cuda", dtype=torch.bfloat16)
        for window in (None, 1000):
            out, lse = cascade_decode_attention_triton(q, k, v, bt, lens, 128 ** -0.5, window)
            ref, ref_lse = paged_decode_attention_triton(q, k, v, bt, lens, 128 ** -0.5, window)
            torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)
            torch.testing.assert_close(lse, ref_lse, atol=1e-2, rtol=1e-3)
