"""Shared-prefix (cascade) decode attention: read each shared run of KV blocks once per group.

The W*K beams of a search share the prompt's blocks, and siblings share their history: their
block tables start with the same block ids. Per-beam decode reads that run once per beam.
Here each row's attention splits at its group's prefix length P:
    prefix part: keys [0, P) through the group leader's table, read once for all the group's
                 queries (rows x query heads of one kv head form the M dimension of tl.dot);
    suffix part: keys [P, seq_len) through the row's own table (the split-K decode kernel
                 with a start offset);
and the two are merged by their log-sum-exp (softmax over the union of disjoint key sets):
    lse = log(exp(lse_p) + exp(lse_s)),  out = (exp(lse_p) out_p + exp(lse_s) out_s) / exp(lse).
The result, (out, lse), is that of paged_decode_attention, sliding window and soft-cap included
(the window is a per-query mask inside the prefix kernel too).

Groups come from the block tables (`find_shared_prefixes`): rows whose tables begin with the
same id share that block; the group's run is the longest leading run of ids common to all its
rows, cut to blocks every row has filled. Find them where the batch is built (host-side tables
need no device sync) and pass them in `groups=`.
"""

from dataclasses import dataclass

import numpy as np
import torch

from w2s_engine.kernels._common import dot_precision, quick_bench, sm_count
from w2s_engine.kernels.paged_attention import (
    _ATTN_CONFIGS,
    FP32_PRUNE,
    _attend_all,
    _attend_keys,
    _check,
    _check_sinks,
    _gather,
    _launch_decode_merge,
    _launch_decode_splits,
    _masked_softmax_attention,
    _partials,
    _store_partial,
    paged_decode_attention_ref,
    paged_decode_attention_triton,
)

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None


# ---- groups from block tables -------------------------------------------------------------------

@dataclass(frozen=True)
class SharedPrefixes:
    """Groups of rows (sequences of a decode batch) sharing a leading run of full KV blocks.

    group_rows    [R] int32    the rows of every group, group after group, ascending in a group
    group_starts  [G + 1] int32  group g is group_rows[group_starts[g]:group_starts[g + 1]]
    prefix_lens   [G] int32    tokens in group g's shared run (a multiple of the block size)
    leaders       [G] int32    a row of group g (its first); its table holds the shared run
    suffix_starts [B] int32    where each row's own part begins: its group's prefix length,
                               0 for a row in no group (all of its keys are its own)
    max_group_rows, max_prefix_len, max_suffix_len: host ints that size the launch grids.
    The fixed layout of a CUDA graph's bucket (static_shared_prefixes) also lists the prefix
    kernel's tiles, so that its grid is the tiles a bucket can have, not every group slot
    times the tiles of a group of every row:
    tile_groups   [T] int32    the group of each tile of up to rows_per_tile rows; -1: none
    tile_starts   [T] int32    its first row within its group
    """
    group_rows: torch.Tensor
    group_starts: torch.Tensor
    prefix_lens: torch.Tensor
    leaders: torch.Tensor
    suffix_starts: torch.Tensor
    max_group_rows: int
    max_prefix_len: int
    max_suffix_len: int
    tile_groups: torch.Tensor | None = None
    tile_starts: torch.Tensor | None = None
    rows_per_tile: int = 0

    @property
    def num_groups(self) -> int:
        return self.prefix_lens.numel()


def find_shared_prefixes(block_tables, seq_lens, block_size: int, min_group_rows: int = 2,
                         min_prefix_blocks: int = 1) -> SharedPrefixes:
    """block_tables [B, max_blocks] int32, seq_lens [B] -> SharedPrefixes.

    Rows whose first block id is the same (consecutive in the batch or not) form a group when
    there are at least `min_group_rows` of them; the group's run is the longest leading run of
    block ids all its rows have in common, counting only blocks every row has filled (a
    partly written last block is never shared), and must be `min_prefix_blocks` long.
    Pure tensor code; on CUDA tensors it syncs (group counts size the output)."""
    if block_tables.dim() != 2 or seq_lens.shape != (block_tables.shape[0],):
        raise ValueError(f"find_shared_prefixes: block_tables must be [B, max_blocks] and "
                         f"seq_lens [B]; got {tuple(block_tables.shape)} and "
                         f"{tuple(seq_lens.shape)}")
    dev = block_tables.device
    B = block_tables.shape[0]
    rows = torch.arange(B, device=dev)
    full = (seq_lens.long() // block_size).clamp_max(block_tables.shape[1])
    eligible = full >= max(1, min_prefix_blocks)
    # One key per candidate group: the first block id; a row that cannot share gets its own.
    key = torch.where(eligible, block_tables[:, 0].long(), -1 - rows)
    _, inv, counts = torch.unique(key, return_inverse=True, return_counts=True)
    leader = torch.full((counts.numel(),), B, dtype=torch.long, device=dev)
    leader = leader.scatter_reduce(0, inv, rows, "amin")
    # Leading ids each row has in common with its group's leader, cut to its filled blocks.
    same = (block_tables == block_tables[leader[inv]]).int().cumprod(dim=1).sum(dim=1)
    run = torch.minimum(same.long(), full)
    run_of_key = torch.full_like(leader, block_tables.shape[1]).scatter_reduce(0, inv, run, "amin")
    keep_key = (counts >= min_group_rows) & (run_of_key >= max(1, min_prefix_blocks))
    in_group = keep_key[inv] & eligible
    gid_of_key = torch.cumsum(keep_key.long(), 0) - 1
    gid = gid_of_key[inv]
    members = rows[in_group]
    order = torch.argsort(gid[in_group] * max(B, 1) + members)
    group_rows = members[order]
    sizes = counts[keep_key]
    group_starts = torch.zeros(sizes.numel() + 1, dtype=torch.long, device=dev)
    group_starts[1:] = torch.cumsum(sizes, 0)
    prefix_lens = run_of_key[keep_key] * block_size
    suffix_starts = torch.zeros_like(rows)
    suffix_starts[in_group] = prefix_lens[gid[in_group]]
    suffix = seq_lens.long() - suffix_starts
    i32 = torch.int32
    return SharedPrefixes(
        group_rows=group_rows.to(i32), group_starts=group_starts.to(i32),
        prefix_lens=prefix_lens.to(i32), leaders=leader[keep_key].to(i32),
        suffix_starts=suffix_starts.to(i32),
        max_group_rows=int(sizes.max()) if sizes.numel() else 0,
        max_prefix_len=int(prefix_lens.max()) if sizes.numel() else 0,
        max_suffix_len=int(suffix.max()) if B else 0)


# ---- groups on the host, in a fixed layout per batch bucket (CUDA graphs) ----------------------

# A static tile holds up to this many (row, query head) pairs: a tile of rows_per_tile rows.
STATIC_TILE_PAIRS = 64


def rows_per_tile(group: int) -> int:
    """Rows of a static prefix tile for `group` query heads per kv head."""
    return max(1, STATIC_TILE_PAIRS // group)


def static_tiles(bucket: int, group: int) -> int:
    """Prefix tiles a bucket's groups can need: each group's rows in tiles of rows_per_tile,
    at most cdiv(bucket, rows_per_tile) full ones and one partly filled per group."""
    return -(-bucket // rows_per_tile(group)) + max(1, bucket // 2)


def static_words(bucket: int, group: int) -> int:
    """int32 words of a bucket's groups: group_rows and suffix_starts [bucket] each, and
    group_starts [G + 1], prefix_lens and leaders [G], G = bucket // 2 (a group has 2+ rows);
    then tile_groups and tile_starts [static_tiles] each."""
    return 2 * bucket + 3 * max(1, bucket // 2) + 1 + 2 * static_tiles(bucket, group)


def _common_runs(key: np.ndarray, tables: np.ndarray, full: np.ndarray):
    """Rows grouped by key: (group of each row, rows per group, leader per group, the leading
    blocks every row of a group shares with its leader, cut to the rows' filled blocks)."""
    n, used = tables.shape
    _, inv, counts = np.unique(key, return_inverse=True, return_counts=True)
    leader = np.full(counts.size, n, dtype=np.int64)
    np.minimum.at(leader, inv, np.arange(n))
    same = np.cumprod(tables == tables[leader[inv]], axis=1).sum(axis=1)
    run_of_key = np.full(counts.size, used, dtype=np.int64)
    np.minimum.at(run_of_key, inv, np.minimum(same, full))
    return inv, counts, leader, run_of_key


def _by_request_where_it_reads_less(key: np.ndarray, requests: np.ndarray,
                                    tables: np.ndarray, full: np.ndarray) -> np.ndarray:
    """Group keys that split a first-block group by request where that saves more reads.
    Requests share their first blocks when one prompt's beginning is another's (prefix
    caching): grouped by first block, the group's run is only what they all share, and each
    request's beams read the rest of their own prompt once each; grouped by request, the
    shared beginning is read once per request. A group's reads saved per step are (rows - 1)
    x run blocks: each first-block group takes whichever of the two saves more."""
    inv0, counts0, _, run0 = _common_runs(key, tables, full)
    sub = inv0 * (int(requests.max()) + 1) + requests      # request groups within each
    inv1, counts1, leader1, run1 = _common_runs(sub, tables, full)
    saved_split = np.zeros(counts0.size, dtype=np.int64)
    np.add.at(saved_split, inv0[leader1], (counts1 - 1) * run1)   # into each one's parent
    split = saved_split > (counts0 - 1) * run0
    return np.where(split[inv0], counts0.size + inv1, inv0)


def shared_prefix_words(tables: np.ndarray, seq_lens: np.ndarray, block_size: int,
                        bucket: int, group: int, requests: np.ndarray | None = None) \
        -> np.ndarray:
    """find_shared_prefixes on host arrays (tables [n, used] int32, seq_lens [n]) for a batch
    padded to `bucket` rows, as static_words(bucket, group) int32 words; padding groups are
    empty, padding rows have no prefix, padding tiles no group. Numpy, so a decode step finds
    its groups without a device op; the same groups as find_shared_prefixes (tested).
    requests: [n] ints >= 0, each row's request; with them a first-block group that spans
    requests is split by request where that reads less (_by_request_where_it_reads_less)."""
    n, used = tables.shape
    g_max = max(1, bucket // 2)
    rows = np.arange(n)
    full = np.minimum(seq_lens.astype(np.int64) // block_size, used)
    eligible = full >= 1
    key = np.where(eligible, tables[:, 0].astype(np.int64), -1 - rows)
    if requests is not None and n:
        key = np.where(eligible, _by_request_where_it_reads_less(
            key, np.asarray(requests, dtype=np.int64), tables, full), -1 - rows)
    inv, counts, leader, run_of_key = _common_runs(key, tables, full)
    keep_key = (counts >= 2) & (run_of_key >= 1)
    in_group = keep_key[inv] & eligible
    gid = (np.cumsum(keep_key) - 1)[inv]
    members = rows[in_group]
    group_rows = members[np.argsort(gid[in_group] * max(n, 1) + members, kind="stable")]
    sizes = counts[keep_key]
    g = sizes.size
    assert g <= g_max
    words = np.zeros(static_words(bucket, group), dtype=np.int32)
    at = 0
    words[at:at + group_rows.size] = group_rows
    at += bucket
    words[at + 1:at + 1 + g] = np.cumsum(sizes)
    words[at + 1 + g:at + 1 + g_max] = sizes.sum()      # empty padding groups
    at += g_max + 1
    prefix_lens = run_of_key[keep_key] * block_size
    words[at:at + g] = prefix_lens
    at += g_max
    words[at:at + g] = leader[keep_key]
    at += g_max
    suffix = np.zeros(n, dtype=np.int64)
    suffix[in_group] = prefix_lens[gid[in_group]]
    words[at:at + n] = suffix
    at += bucket
    rpt, tiles = rows_per_tile(group), static_tiles(bucket, group)
    per_group = -(-sizes // rpt)
    t = int(per_group.sum())
    assert t <= tiles
    words[at:at + tiles] = -1                            # padding tiles: no group
    words[at:at + t] = np.repeat(np.arange(g), per_group)
    first_tile = np.cumsum(per_group) - per_group
    words[at + tiles:at + tiles + t] = (np.arange(t) - np.repeat(first_tile, per_group)) * rpt
    return words


def static_shared_prefixes(words: torch.Tensor, bucket: int, max_len: int,
                           group: int) -> SharedPrefixes:
    """SharedPrefixes over a device buffer laid out by shared_prefix_words, with the host
    bounds fixed per bucket (a group may hold every row), so launch grids never change."""
    g_max = max(1, bucket // 2)
    tiles = static_tiles(bucket, group)
    at = [0, bucket, bucket + g_max + 1, bucket + 2 * g_max + 1, bucket + 3 * g_max + 1,
          2 * bucket + 3 * g_max + 1]
    return SharedPrefixes(
        group_rows=words[at[0]:at[0] + bucket], group_starts=words[at[1]:at[2]],
        prefix_lens=words[at[2]:at[3]], leaders=words[at[3]:at[4]],
        suffix_starts=words[at[4]:at[4] + bucket],
        max_group_rows=bucket, max_prefix_len=max_len, max_suffix_len=max_len,
        tile_groups=words[at[5]:at[5] + tiles], tile_starts=words[at[5] + tiles:at[5] + 2 * tiles],
        rows_per_tile=rows_per_tile(group))


# ---- PyTorch reference ---------------------------------------------------------------------------

def merge_attention_states_ref(out_a, lse_a, out_b, lse_b):
    """Attention over two disjoint key sets -> attention over their union.
    out_* [..., D], lse_* [...] (-inf where a set is empty) -> (out fp32, lse)."""
    m = torch.maximum(lse_a, lse_b)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    wa, wb = torch.exp(lse_a - m), torch.exp(lse_b - m)
    total = wa + wb
    out = (out_a.float() * wa[..., None] + out_b.float() * wb[..., None]) / total[..., None]
    return out, m + torch.log(total)


def shared_prefix_attention_ref(q, k_cache, v_cache, block_tables, seq_lens, scale, groups,
                                sliding_window=None, softcap=None):
    """The prefix part alone: (out [B, Hq, D] fp32, lse [B, Hq]); rows in no group get 0, -inf.
    Each group's run is gathered once, through its leader's table, for all its queries."""
    B, hq, d = q.shape
    out = torch.zeros(B, hq, d, dtype=torch.float32, device=q.device)
    lse = torch.full((B, hq), float("-inf"), dtype=torch.float32, device=q.device)
    starts = groups.group_starts.tolist()
    for g, (plen, leader) in enumerate(zip(groups.prefix_lens.tolist(), groups.leaders.tolist())):
        if starts[g + 1] == starts[g]:
            continue    # an empty group: padding of a static layout
        rows = groups.group_rows[starts[g]:starts[g + 1]].long()
        table = block_tables[leader:leader + 1]
        k, v = _gather(k_cache, table, plen), _gather(v_cache, table, plen)
        qpos = (seq_lens[rows].long() - 1)[None]                 # the group's queries as M
        kv_len = torch.tensor([plen], device=q.device)
        o, l = _masked_softmax_attention(q[rows][None], k, v, qpos, kv_len, scale,
                                         sliding_window, softcap)
        out[rows], lse[rows] = o[0], l[0]
    return out, lse


def cascade_decode_attention_ref(q, k_cache, v_cache, block_tables, seq_lens, scale,
                                 sliding_window=None, softcap=None, groups=None, sinks=None):
    if groups is None:
        groups = find_shared_prefixes(block_tables, seq_lens, k_cache.shape[1])
    out_p, lse_p = shared_prefix_attention_ref(q, k_cache, v_cache, block_tables, seq_lens,
                                               scale, groups, sliding_window, softcap)
    out_s, lse_s = paged_decode_attention_ref(q, k_cache, v_cache, block_tables, seq_lens, scale,
                                              sliding_window, softcap,
                                              kv_start=groups.suffix_starts)
    out, lse = merge_attention_states_ref(out_p, lse_p, out_s, lse_s)
    if sinks is not None:   # one more logit per head, without a value: a set of its own
        out, lse = merge_attention_states_ref(out, lse, torch.zeros_like(out),
                                              sinks.float()[None].expand_as(lse))
    return out.to(q.dtype), lse


# ---- Triton ------------------------------------------------------------------------------------

if triton is not None:
    @triton.autotune(configs=_ATTN_CONFIGS, key=["GROUP", "HEAD_DIM", "BLOCK_SIZE", "BLOCK_M",
                                                 "TILED"], do_bench=quick_bench,
                     prune_configs_by=FP32_PRUNE)
    @triton.jit(do_not_specialize=["part_splits"])
    def _shared_prefix_kernel(
        q_ptr,                      # [B, Hq, D]
        k_cache_ptr, v_cache_ptr,   # [num_blocks, BLOCK_SIZE, Hkv, D]
        block_tables_ptr,           # [B, max_blocks] int32
        seq_lens_ptr,               # [B] int32
        group_rows_ptr,             # [R] int32: rows of every group, group after group
        group_starts_ptr,           # [G + 1] int32
        prefix_lens_ptr,            # [G] int32: tokens of each group's shared run
        leaders_ptr,                # [G] int32: the row whose table is read for the run
        tile_groups_ptr,            # [T] int32 (TILED): each program's group, -1 for none
        tile_starts_ptr,            # [T] int32 (TILED): its first row within the group
        part_out_ptr,               # [B, Hq, part_splits, D] fp32: partials [0, splits)
        part_lse_ptr,               # [B, Hq, part_splits] fp32
        scale, softcap, window, m_tiles,
        min_span,                   # keys a split takes at least (later splits stay empty)
        stride_qb, stride_qh,
        stride_cb, stride_cs, stride_ch,
        stride_bt,
        part_splits,                # partials per (row, head): the prefix's and the suffix's
        GROUP: tl.constexpr,        # Hq // Hkv
        BLOCK_M: tl.constexpr,      # (row, query head) pairs per program, >= 16 for tl.dot
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
        HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
        TILED: tl.constexpr,        # programs from tile_groups / tile_starts (a fixed layout)
        ROWS_PER_TILE: tl.constexpr,  # (TILED) rows a tile holds, x GROUP <= BLOCK_M
    ):
        # grid: (G * m_tiles, or T when TILED, Hkv, splits). One program reads one split
        # of its group's shared run for one kv head once, for up to BLOCK_M (row, query head)
        # pairs: pair r is row r // GROUP of the group and query head kvh * GROUP + r % GROUP.
        if TILED:
            g = tl.load(tile_groups_ptr + tl.program_id(0))
            if g < 0:
                return
            lo_pair = tl.load(tile_starts_ptr + tl.program_id(0)) * GROUP
            first = tl.load(group_starts_ptr + g)
            n_pairs = tl.minimum((tl.load(group_starts_ptr + g + 1) - first) * GROUP,
                                 lo_pair + ROWS_PER_TILE * GROUP)
        else:
            g = tl.program_id(0) // m_tiles
            lo_pair = (tl.program_id(0) % m_tiles) * BLOCK_M
            first = tl.load(group_starts_ptr + g)
            n_pairs = (tl.load(group_starts_ptr + g + 1) - first) * GROUP
        kvh = tl.program_id(1)
        split = tl.program_id(2)
        if lo_pair >= n_pairs:
            return
        r = lo_pair + tl.arange(0, BLOCK_M)
        rmask = r < n_pairs
        row = tl.load(group_rows_ptr + first + r // GROUP, mask=rmask, other=0)
        qh = kvh * GROUP + r % GROUP
        d = tl.arange(0, BLOCK_D)
        dmask = d < HEAD_DIM
        q = tl.load(q_ptr + row[:, None] * stride_qb + qh[:, None] * stride_qh + d[None, :],
                    mask=rmask[:, None] & dmask[None, :], other=0.0)
        plen = tl.load(prefix_lens_ptr + g)
        leader = tl.load(leaders_ptr + g)
        lo = 0
        if HAS_WINDOW:
            qpos = tl.load(seq_lens_ptr + row, mask=rmask, other=1) - 1
            # Keys before every pair's window are skipped; the rest is masked per pair.
            lo = tl.maximum(tl.min(tl.where(rmask, qpos - window + 1, plen), 0), 0)
        span = tl.maximum(tl.cdiv(tl.maximum(plen - lo, 0), tl.num_programs(2)), min_span)
        start = lo + split * span
        end = tl.minimum(start + span, plen)

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        if HAS_WINDOW:
            for n0 in range(start, end, BLOCK_N):
                n = n0 + tl.arange(0, BLOCK_N)
                nmask = n < end
                visible = nmask[None, :] & (n[None, :] > qpos[:, None] - window)
                acc, m_i, l_i = _attend_keys(
                    q, acc, m_i, l_i, n, nmask, visible, block_tables_ptr + leader * stride_bt,
                    k_cache_ptr, v_cache_ptr, kvh, d, dmask, scale, softcap,
                    stride_cb, stride_cs, stride_ch, BLOCK_SIZE, HAS_SOFTCAP, DOT_PRECISION)
        else:   # every pair sees the whole shared run
            acc, m_i, l_i = _attend_all(
                q, acc, m_i, l_i, start, end, block_tables_ptr + leader * stride_bt,
                k_cache_ptr, v_cache_ptr, kvh, d, dmask, scale, softcap, stride_cb, stride_cs,
                stride_ch, BLOCK_SIZE, BLOCK_N, HAS_SOFTCAP, DOT_PRECISION)
        base = (row.to(tl.int64) * (tl.num_programs(1) * GROUP) + qh) * part_splits + split
        _store_partial(part_out_ptr, part_lse_ptr, base, acc, m_i, l_i, d, rmask, dmask, HEAD_DIM)


def _check_groups(groups, B, name):
    if not isinstance(groups, SharedPrefixes):
        raise TypeError(f"{name}: groups must come from find_shared_prefixes; got {type(groups)}")
    if groups.suffix_starts.shape != (B,):
        raise ValueError(f"{name}: groups were found for {groups.suffix_starts.numel()} rows, "
                         f"the batch has {B}; find them again for this batch")


def cascade_decode_attention_triton(q, k_cache, v_cache, block_tables, seq_lens, scale,
                                    sliding_window=None, softcap=None, groups=None,
                                    prefix_splits=None, suffix_splits=None, sinks=None):
    name = "cascade_decode_attention"
    hq, hkv, d, bs = _check(q, k_cache, v_cache, block_tables, seq_lens, name)
    B = q.shape[0]
    if groups is None:
        groups = find_shared_prefixes(block_tables, seq_lens, bs)
    _check_groups(groups, B, name)
    if groups.num_groups == 0:
        return paged_decode_attention_triton(q, k_cache, v_cache, block_tables, seq_lens, scale,
                                             sliding_window, softcap, suffix_splits,
                                             sinks=sinks)
    group = hq // hkv
    sms = sm_count(q.device)
    tiled = groups.tile_groups is not None
    if tiled:
        # A fixed layout: a program per tile a bucket can have; how many hold rows is known
        # only on the device, so the splits assume every row in a group (full tiles).
        rpt = groups.rows_per_tile
        assert rpt == rows_per_tile(group), "the tiles were laid out for another GROUP"
        block_m = max(16, triton.next_power_of_2(rpt * group))
        m_tiles, programs = 1, groups.tile_groups.numel()
        busy = triton.cdiv(B, rpt)
    else:
        rpt = 1
        pairs = groups.max_group_rows * group
        # (fp32's full-precision dots hold the tile in registers: 64 rows spilled 6 KB a
        # thread, bench/kernel_compile.py)
        block_m = max(16, min(32 if q.dtype == torch.float32 else 64,
                              triton.next_power_of_2(pairs)))
        m_tiles = triton.cdiv(pairs, block_m)
        programs = busy = groups.num_groups * m_tiles
    # A split reads at least 128 keys (a short prefix leaves later splits empty), unless the
    # caller chose the splits.
    min_span = 128 if prefix_splits is None else 1
    if prefix_splits is None:
        want = max(1, 2 * sms // (busy * hkv))
        prefix_splits = max(1, min(want, triton.cdiv(groups.max_prefix_len, 128),
                                   16 if tiled else 64))
    if suffix_splits is None:
        want = max(1, 2 * sms // max(1, B * hkv))
        suffix_splits = max(1, min(want, triton.cdiv(max(1, groups.max_suffix_len), 256), 16))
    part_out, part_lse = _partials(q, prefix_splits + suffix_splits)
    tile_groups = groups.tile_groups if tiled else groups.group_starts   # (not read)
    tile_starts = groups.tile_starts if tiled else groups.group_starts
    _shared_prefix_kernel[(programs, hkv, prefix_splits)](
        q, k_cache, v_cache, block_tables, seq_lens, groups.group_rows, groups.group_starts,
        groups.prefix_lens, groups.leaders, tile_groups, tile_starts, part_out, part_lse,
        scale, softcap or 0.0, sliding_window or 0, m_tiles, min_span,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0), prefix_splits + suffix_splits,
        GROUP=group, BLOCK_M=block_m, HEAD_DIM=d, BLOCK_D=triton.next_power_of_2(d),
        BLOCK_SIZE=bs,
        HAS_WINDOW=bool(sliding_window), HAS_SOFTCAP=bool(softcap),
        DOT_PRECISION=dot_precision(q.dtype), TILED=tiled, ROWS_PER_TILE=rpt)
    _launch_decode_splits(q, k_cache, v_cache, block_tables, seq_lens, part_out, part_lse,
                          scale, sliding_window, softcap, suffix_splits,
                          split_base=prefix_splits, kv_start=groups.suffix_starts)
    return _launch_decode_merge(q, part_out, part_lse, prefix_splits, groups.suffix_starts,
                                _check_sinks(sinks, q))


def cascade_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale,
                             sliding_window=None, softcap=None, groups=None, sinks=None):
    """Drop-in for paged_decode_attention -> (out [B, Hq, D], lse [B, Hq] fp32) that reads each
    shared prefix once per group. groups: from find_shared_prefixes (found here if None);
    sinks as for paged_decode_attention."""
    if q.is_cuda and triton is not None:
        return cascade_decode_attention_triton(q, k_cache, v_cache, block_tables, seq_lens,
                                               scale, sliding_window, softcap, groups,
                                               sinks=sinks)
    return cascade_decode_attention_ref(q, k_cache, v_cache, block_tables, seq_lens, scale,
                                        sliding_window, softcap, groups, sinks)
