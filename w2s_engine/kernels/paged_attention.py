"""Paged attention over block tables: decode (split-K flash-decoding) and extend (causal chunk).

Caches: k_cache, v_cache [num_blocks, block_size, Hkv, D]; a sequence's token p lives at
block_tables[b, p // block_size], row p % block_size. New tokens' k/v are stored before the
attention call, so both kernels read only the cache. Sliding window: key j is visible to
the query at position i iff i - window < j <= i (transformers' sliding_window_overlay).
Soft-cap: score = cap * tanh(score / cap), after scaling, before masking.

Decode is split-K (flash-decoding): each (sequence, kv head) program row is cut into splits,
sized from the SM count so that a small batch still fills the GPU, and a merge kernel combines
the splits' partial outputs by their log-sum-exp. kv_start restricts a sequence to its keys at
positions >= kv_start (the suffix half of cascade_attention, which also reuses the merge). On a
GPU the keys per step, warps and stages are autotuned per shape; fp32 inputs use full fp32 dots.
"""

import torch

from w2s_engine.kernels._common import INTERPRET, configs, dot_precision, quick_bench, sm_count

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None


# ---- PyTorch references (the CPU path) ---------------------------------------------------------

def _gather(cache, block_tables, max_len):
    """[num_blocks, bs, Hkv, D] through [B, max_blocks] -> [B, max_len, Hkv, D]."""
    bs = cache.shape[1]
    nb = -(-max_len // bs)
    blocks = block_tables[:, :nb].long().clamp_min(0)
    return cache[blocks].reshape(blocks.shape[0], nb * bs, *cache.shape[2:])[:, :max_len]


def _visible(qpos, kv_len, L, sliding_window, kpos=None):
    """qpos [B, M], kv_len [B] -> [B, M, L] bool: key j is visible to the query at position i.
    kpos [B, L]: the keys' positions (default: 0 .. L - 1 in every row)."""
    kpos = (torch.arange(L, device=qpos.device)[None] if kpos is None else kpos)[:, None, :]
    mask = (kpos <= qpos[:, :, None]) & (kpos < kv_len[:, None, None])
    if sliding_window:
        mask &= kpos > qpos[:, :, None] - sliding_window
    return mask


def _masked_softmax_attention(q, k, v, qpos, kv_len, scale, sliding_window, softcap,
                              kv_start=None, kpos=None, sinks=None):
    """q [B, M, Hq, D], k/v [B, L, Hkv, D], qpos [B, M] -> (out [B, M, Hq, D], lse [B, M, Hq]).
    Keys at positions < kv_start [B] (if given) are left out; kpos [B, L]: the keys' positions
    (default: 0 .. L - 1); sinks [Hq] fp32: one more logit per head, without a value, in each
    softmax (GPT-OSS's attention sinks; lse includes it)."""
    B, M, Hq, D = q.shape
    L, Hkv = k.shape[1], k.shape[2]
    g = Hq // Hkv
    qf = q.float().view(B, M, Hkv, g, D)
    s = torch.einsum("bmhgd,blhd->bhgml", qf, k.float()) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    mask = _visible(qpos, kv_len, L, sliding_window, kpos)
    if kv_start is not None:
        kp = torch.arange(L, device=q.device)[None] if kpos is None else kpos
        mask &= kp[:, None, :] >= kv_start.long()[:, None, None]
    s = s.masked_fill(~mask[:, None, None], float("-inf"))
    lse = torch.logsumexp(s, dim=-1)                                    # [B, Hkv, g, M]
    if sinks is not None:
        lse = torch.logaddexp(lse, sinks.float().view(1, Hkv, g, 1))
    p = torch.exp(s - lse[..., None]).nan_to_num(0.0)
    out = torch.einsum("bhgml,blhd->bmhgd", p, v.float()).reshape(B, M, Hq, D)
    return out, lse.permute(0, 3, 1, 2).reshape(B, M, Hq)


def paged_decode_attention_ref(q, k_cache, v_cache, block_tables, seq_lens, scale,
                               sliding_window=None, softcap=None, num_splits=None, kv_start=None,
                               sinks=None):
    """kv_start [B] int32 (optional): each query sees only positions >= kv_start[b] (the suffix
    of a cascade); a row that sees nothing gets out 0 and lse -inf.
    Each row gathers only the blocks it can see: from its kv_start's block, or its sliding
    window's first block, to its last (a cascade's suffix reads its own few blocks, not the
    shared prompt again)."""
    bs = k_cache.shape[1]
    lens = seq_lens.long()
    first = torch.zeros_like(lens)
    if kv_start is not None:
        first = kv_start.long() // bs
    if sliding_window:
        first = torch.maximum(first, (lens - sliding_window).clamp_min(0) // bs)
    first = torch.minimum(first, ((lens - 1) // bs).clamp_min(0))
    width = int((-(-lens // bs) - first).max()) if lens.numel() else 0
    cols = first[:, None] + torch.arange(max(width, 1), device=q.device)[None]   # [B, width]
    blocks = block_tables.gather(1, cols.clamp_max(block_tables.shape[1] - 1)).long().clamp_min(0)
    k = k_cache[blocks].flatten(1, 2)                                   # [B, width * bs, H, D]
    v = v_cache[blocks].flatten(1, 2)
    kpos = first[:, None] * bs + torch.arange(k.shape[1], device=q.device)[None]
    qpos = (lens - 1)[:, None]
    out, lse = _masked_softmax_attention(q[:, None], k, v, qpos, lens, scale,
                                         sliding_window, softcap, kv_start, kpos, sinks)
    return out[:, 0].to(q.dtype), lse[:, 0]


def _padded_batch(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens):
    """Packed queries [T, Hq, D] -> (idx [B, max_q] rows of q, valid [B, max_q], qpos [B, max_q],
    k, v [B, L, Hkv, D] gathered), so that all sequences run in one batched product; None when
    there are no queries."""
    cu = cu_seqlens_q.long()
    qlens = cu[1:] - cu[:-1]
    max_q = int(qlens.max()) if qlens.numel() else 0
    if max_q == 0:
        return None
    steps = torch.arange(max_q, device=q.device)[None]
    idx = (cu[:-1, None] + steps).clamp_max(q.shape[0] - 1)
    valid = steps < qlens[:, None]
    qpos = seq_lens.long()[:, None] - qlens[:, None] + steps
    max_len = int(seq_lens.max())
    k = _gather(k_cache, block_tables, max_len)
    v = _gather(v_cache, block_tables, max_len)
    return idx, valid, qpos, k, v


def paged_extend_attention_ref(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, scale,
                               sliding_window=None, softcap=None, sinks=None):
    out = torch.zeros_like(q)
    padded = _padded_batch(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens)
    if padded is None:
        return out
    idx, valid, qpos, k, v = padded
    o, _ = _masked_softmax_attention(q[idx] * valid[..., None, None], k, v, qpos, seq_lens.long(),
                                     scale, sliding_window, softcap, sinks=sinks)
    out[idx[valid]] = o[valid].to(q.dtype)
    return out


def paged_extend_attention_sdpa(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, scale,
                                sliding_window=None):
    """The CPU path of extend: torch's fused SDPA over the gathered blocks with a boolean mask.
    Same visibility as the reference, without its fp32 [B, H, M, L] score tensor: 6.7x faster on
    2 CPU cores for 16 chunks of 256 tokens over a 390-token cache, 7x for a 2,048-token prefill.
    No soft-cap (SDPA has none)."""
    out = torch.zeros_like(q)
    padded = _padded_batch(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens)
    if padded is None:
        return out
    idx, valid, qpos, k, v = padded
    # A padding row's qpos is past its sequence's end, so it sees every key: never an empty row.
    mask = _visible(qpos, seq_lens.long(), k.shape[1], sliding_window)[:, None]  # [B, 1, M, L]
    o = torch.nn.functional.scaled_dot_product_attention(
        q[idx].transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
        scale=scale, enable_gqa=True)
    out[idx[valid]] = o.transpose(1, 2)[valid]
    return out


# ---- Triton kernels (the CUDA path) --------------------------------------------------------------

# Keys per step (BLOCK_N), warps and pipeline depth: tuned on the GPU per shape (configs too
# big for a head size fail to compile and are skipped); the interpreter runs one.
_ATTN_CONFIGS = [] if triton is None else configs(
    [triton.Config({"BLOCK_N": 32}, num_warps=4, num_stages=2),
     triton.Config({"BLOCK_N": 64}, num_warps=4, num_stages=2),
     triton.Config({"BLOCK_N": 64}, num_warps=4, num_stages=3),
     triton.Config({"BLOCK_N": 64}, num_warps=8, num_stages=3),
     triton.Config({"BLOCK_N": 128}, num_warps=8, num_stages=2)],
    interpret=triton.Config({"BLOCK_N": 32}))
# The short-chunk extend holds up to 64 query rows: also smaller key steps on more warps,
# where fp32's full-precision dots would otherwise spill (bench/kernel_compile.py).
_GROUPED_CONFIGS = [] if triton is None else configs(
    [triton.Config({"BLOCK_N": 16}, num_warps=8, num_stages=2),
     triton.Config({"BLOCK_N": 32}, num_warps=8, num_stages=2)] + list(_ATTN_CONFIGS),
    interpret=triton.Config({"BLOCK_N": 32}))


def fp32_small_key_steps(configs, named_args, **kwargs):
    """The autotuner's early prune: fp32's full-precision dots (DOT_PRECISION "ieee") run on
    the FMA units with their tiles in registers, and key steps over 32 spill kilobytes a
    thread (bench/kernel_compile.py); timing those on a GPU took minutes. fp32 tunes over the
    small steps; bf16/fp16 over all."""
    if kwargs.get("DOT_PRECISION") != "ieee":
        return configs
    return [c for c in configs if c.kwargs["BLOCK_N"] <= 32] or configs[:1]


FP32_PRUNE = {"early_config_prune": fp32_small_key_steps}

if triton is not None:
    # The attention kernels keep their online softmax in base 2 (exp2 with the scale folded in).
    LOG2E = tl.constexpr(1.4426950408889634)   # (a compiled kernel reads only constexpr globals)
    LN2 = tl.constexpr(0.6931471805599453)

    @triton.jit
    def _attend_keys(q, acc, m_i, l_i, n, nmask, visible, table_ptr, k_cache_ptr, v_cache_ptr,
                     kvh, d, dmask, scale, softcap, stride_cb, stride_cs, stride_ch,
                     BLOCK_SIZE: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                     DOT_PRECISION: tl.constexpr, MASKED: tl.constexpr = True):
        """One online-softmax step of queries q [M, BLOCK_D] over the keys at positions
        n [BLOCK_N] (nmask: in range) of one sequence's block table row (table_ptr), kv head
        kvh; visible [M, BLOCK_N] masks per query. MASKED False: every key is in range and
        visible to every query (the callers' whole steps before the causal edge), so neither
        mask is applied: three fewer ops per score. A query that sees nothing yet keeps
        m = -inf without NaNs. -> (acc [M, BLOCK_D], m_i, l_i).
        The state is in base 2 (m_i: the running max of score * log2(e)), so each score's
        exponential is one ex2 with the scale folded in; _store_partial and the callers'
        lse stores convert back to natural log."""
        if MASKED:
            block = tl.load(table_ptr + n // BLOCK_SIZE, mask=nmask, other=0)
        else:
            block = tl.load(table_ptr + n // BLOCK_SIZE)
        off = block.to(tl.int64) * stride_cb + (n % BLOCK_SIZE) * stride_cs + kvh * stride_ch
        kv_mask = dmask[None, :]
        if MASKED:
            kv_mask = nmask[:, None] & kv_mask
        k = tl.load(k_cache_ptr + off[:, None] + d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)           # [M, BLOCK_N]
        if HAS_SOFTCAP:     # tanh from sigmoid, on the natural-scale score
            s = s * scale
            s = softcap * (2 * tl.sigmoid(2 * s / softcap) - 1) * LOG2E
        else:
            s = s * (scale * LOG2E)
        if MASKED:
            s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_safe)
        p = tl.math.exp2(s - m_safe[:, None])
        v = tl.load(v_cache_ptr + off[:, None] + d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        return acc, m_new, l_i * alpha + tl.sum(p, 1)

    @triton.jit
    def _natural_lse(m_i, l_i):
        """The base-2 online state (max, sum) -> natural log-sum-exp (-inf where empty)."""
        return tl.where(l_i > 0, (m_i + tl.math.log2(l_i)) * LN2, float("-inf"))

    @triton.jit
    def _store_partial(part_out_ptr, part_lse_ptr, base, acc, m_i, l_i, d, mask, dmask,
                       HEAD_DIM: tl.constexpr):
        """Normalised output and log-sum-exp of one split (-inf where it saw no key)."""
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        lse = _natural_lse(m_i, l_i)
        tl.store(part_out_ptr + base[:, None] * HEAD_DIM + d[None, :], out,
                 mask=mask[:, None] & dmask[None, :])
        tl.store(part_lse_ptr + base, lse, mask=mask)

    @triton.jit
    def _attend_whole_steps(q, acc, m_i, l_i, lo, full, table_ptr, k_cache_ptr, v_cache_ptr,
                            kvh, d, dmask, scale, softcap, stride_cb, stride_cs, stride_ch,
                            BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                            HAS_SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr):
        """_attend_keys over keys [lo, full), whole BLOCK_N steps every query sees: no masks."""
        for n0 in range(lo, full, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            acc, m_i, l_i = _attend_keys(
                q, acc, m_i, l_i, n, n < full, n[None, :] < full, table_ptr, k_cache_ptr,
                v_cache_ptr, kvh, d, dmask, scale, softcap, stride_cb, stride_cs, stride_ch,
                BLOCK_SIZE, HAS_SOFTCAP, DOT_PRECISION, False)
        return acc, m_i, l_i

    @triton.jit
    def _attend_causal(q, acc, m_i, l_i, lo, hi, first_qpos, qpos, window, table_ptr,
                       k_cache_ptr, v_cache_ptr, kvh, d, dmask, scale, softcap, stride_cb,
                       stride_cs, stride_ch, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                       HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                       DOT_PRECISION: tl.constexpr):
        """_attend_keys over keys [lo, hi), each query row seeing the keys at or before its
        position qpos [M] (and within its window) -> (acc, m_i, l_i). Without a window, the
        whole steps up to the earliest query's position first_qpos are seen by every row and
        run unmasked; only the steps at the causal edge mask."""
        full = lo
        if not HAS_WINDOW:
            full = lo + tl.maximum(tl.minimum(hi, first_qpos + 1) - lo, 0) // BLOCK_N * BLOCK_N
        acc, m_i, l_i = _attend_whole_steps(
            q, acc, m_i, l_i, lo, full, table_ptr, k_cache_ptr, v_cache_ptr, kvh, d, dmask,
            scale, softcap, stride_cb, stride_cs, stride_ch, BLOCK_SIZE, BLOCK_N, HAS_SOFTCAP,
            DOT_PRECISION)
        for n0 in range(full, hi, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            nmask = n < hi
            visible = nmask[None, :] & (n[None, :] <= qpos[:, None])
            if HAS_WINDOW:
                visible = visible & (n[None, :] > qpos[:, None] - window)
            acc, m_i, l_i = _attend_keys(
                q, acc, m_i, l_i, n, nmask, visible, table_ptr, k_cache_ptr, v_cache_ptr, kvh,
                d, dmask, scale, softcap, stride_cb, stride_cs, stride_ch, BLOCK_SIZE,
                HAS_SOFTCAP, DOT_PRECISION)
        return acc, m_i, l_i

    @triton.jit
    def _attend_all(q, acc, m_i, l_i, start, end, table_ptr, k_cache_ptr, v_cache_ptr, kvh, d,
                    dmask, scale, softcap, stride_cb, stride_cs, stride_ch,
                    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                    HAS_SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr):
        """_attend_keys over keys [start, end), all visible to every query (decode; a
        shared prefix without a window): whole steps unmasked, the last partial one masked."""
        full = start + tl.maximum(end - start, 0) // BLOCK_N * BLOCK_N
        acc, m_i, l_i = _attend_whole_steps(
            q, acc, m_i, l_i, start, full, table_ptr, k_cache_ptr, v_cache_ptr, kvh, d, dmask,
            scale, softcap, stride_cb, stride_cs, stride_ch, BLOCK_SIZE, BLOCK_N, HAS_SOFTCAP,
            DOT_PRECISION)
        for n0 in range(full, end, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            nmask = n < end
            acc, m_i, l_i = _attend_keys(
                q, acc, m_i, l_i, n, nmask, nmask[None, :], table_ptr, k_cache_ptr,
                v_cache_ptr, kvh, d, dmask, scale, softcap, stride_cb, stride_cs, stride_ch,
                BLOCK_SIZE, HAS_SOFTCAP, DOT_PRECISION)
        return acc, m_i, l_i

    @triton.jit
    def _with_sink(acc, m_i, l_i, sink):
        """The (base-2) online softmax state with one more logit per row, natural scale (an
        attention sink), which has no value -> (acc, m_i, l_i)."""
        sink = sink * LOG2E
        m_new = tl.maximum(m_i, sink)
        alpha = tl.math.exp2(m_i - m_new)
        return acc * alpha[:, None], m_new, l_i * alpha + tl.math.exp2(sink - m_new)

    @triton.autotune(configs=_ATTN_CONFIGS,
                     key=["GROUP", "HEAD_DIM", "BLOCK_SIZE", "HAS_START", "DIRECT"],
                     do_bench=quick_bench, prune_configs_by=FP32_PRUNE)
    # (Triton would compile again for a count of 1 or a multiple of 16: not for these.)
    @triton.jit(do_not_specialize=["part_splits", "split_base"])
    def _decode_split_kernel(
        q_ptr,                 # [B, Hq, D]
        k_cache_ptr, v_cache_ptr,   # [num_blocks, BLOCK_SIZE, Hkv, D]
        block_tables_ptr,      # [B, max_blocks] int32
        seq_lens_ptr,          # [B] int32
        kv_start_ptr,          # [B] int32: first position each query sees (if HAS_START)
        part_out_ptr,          # [B, Hq, part_splits, D] fp32
        part_lse_ptr,          # [B, Hq, part_splits] fp32
        out_ptr, lse_ptr,      # [B, Hq, D], [B, Hq] fp32: written instead when DIRECT
        sinks_ptr,             # [Hq] fp32 (DIRECT and HAS_SINKS)
        scale, softcap, window,
        stride_qb, stride_qh, stride_ob, stride_oh,
        stride_cb, stride_cs, stride_ch,     # cache strides: block, slot in block, kv head
        stride_bt,
        part_splits,           # partials per (sequence, head) in part_out / part_lse
        split_base,            # this launch writes partials split_base + [0, splits)
        GROUP: tl.constexpr,        # Hq // Hkv query heads share one kv head
        BLOCK_H: tl.constexpr,      # >= GROUP, >= 16 for tl.dot
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
        HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_START: tl.constexpr,
        DOT_PRECISION: tl.constexpr,   # "ieee" for fp32 (no TF32), else "tf32" (ignored)
        DIRECT: tl.constexpr,  # one split: the output and lse themselves, no merge launch
        HAS_SINKS: tl.constexpr,
    ):
        # grid: (B, Hkv, splits). One program reads one split of one kv head's cache once for
        # all GROUP query heads that share it. The split count is the grid's, not a constexpr:
        # one compiled kernel (and one autotuning) serves every count.
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        split = tl.program_id(2)
        seq_len = tl.load(seq_lens_ptr + b)
        qpos = seq_len - 1
        lo = 0
        if HAS_WINDOW:
            lo = tl.maximum(qpos - window + 1, 0)
        if HAS_START:
            lo = tl.maximum(lo, tl.load(kv_start_ptr + b))
        span = tl.cdiv(tl.maximum(seq_len - lo, 0), tl.num_programs(2))
        start = lo + split * span
        end = tl.minimum(start + span, seq_len)

        h = tl.arange(0, BLOCK_H)
        d = tl.arange(0, BLOCK_D)
        hmask = h < GROUP
        dmask = d < HEAD_DIM
        qh = kvh * GROUP + h
        q = tl.load(q_ptr + b * stride_qb + qh[:, None] * stride_qh + d[None, :],
                    mask=hmask[:, None] & dmask[None, :], other=0.0)

        m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_H], tl.float32)
        acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
        acc, m_i, l_i = _attend_all(
            q, acc, m_i, l_i, start, end, block_tables_ptr + b * stride_bt, k_cache_ptr,
            v_cache_ptr, kvh, d, dmask, scale, softcap, stride_cb, stride_cs, stride_ch,
            BLOCK_SIZE, BLOCK_N, HAS_SOFTCAP, DOT_PRECISION)
        if DIRECT:
            if HAS_SINKS:   # one more logit in the softmax, without a value
                acc, m_i, l_i = _with_sink(acc, m_i, l_i,
                                           tl.load(sinks_ptr + qh, mask=hmask, other=0.0))
            out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
            tl.store(out_ptr + b * stride_ob + qh[:, None] * stride_oh + d[None, :],
                     out.to(out_ptr.dtype.element_ty), mask=hmask[:, None] & dmask[None, :])
            tl.store(lse_ptr + b * (tl.num_programs(1) * GROUP) + qh,
                     _natural_lse(m_i, l_i), mask=hmask)
        else:
            base = (b * (tl.num_programs(1) * GROUP) + qh) * part_splits + split_base + split
            _store_partial(part_out_ptr, part_lse_ptr, base, acc, m_i, l_i, d, hmask, dmask,
                           HEAD_DIM)

    @triton.jit(do_not_specialize=["num_splits", "prefix_splits"])
    def _decode_merge_kernel(
        part_out_ptr, part_lse_ptr,   # [B * Hq, num_splits, D], [B * Hq, num_splits]
        prefix_len_ptr,               # [B] int32: > 0 where the prefix_splits partials are used
        out_ptr, lse_ptr,             # [B, Hq, D] (rows contiguous), [B, Hq]
        sinks_ptr,                    # [Hq] fp32 (HAS_SINKS): one more logit, without a value
        stride_ob, stride_oh, num_heads,
        num_splits,                   # partials per row (<= BLOCK_S)
        prefix_splits,                # (HAS_PREFIX) the first ones: a shared prefix's
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_S: tl.constexpr,        # a power of two >= 16: few compiled variants
        HAS_PREFIX: tl.constexpr,
        HAS_SINKS: tl.constexpr,
    ):
        # grid: (B, Hq): combine the splits by their log-sum-exp. A row outside every shared
        # prefix group (prefix_len 0) skips the prefix partials, which nobody wrote for it.
        b = tl.program_id(0)
        h = tl.program_id(1)
        row = b * num_heads + h
        s = tl.arange(0, BLOCK_S)
        d = tl.arange(0, BLOCK_D)
        smask = s < num_splits
        if HAS_PREFIX:
            first = tl.where(tl.load(prefix_len_ptr + b) > 0, 0, prefix_splits)
            smask = smask & (s >= first)
        lse = tl.load(part_lse_ptr + row * num_splits + s, mask=smask, other=float("-inf"))
        m = tl.max(lse, 0)
        if HAS_SINKS:   # a partial with the sink's logit and no value
            sink = tl.load(sinks_ptr + h)
            m = tl.maximum(m, sink)
        w = tl.where(smask & (lse > float("-inf")), tl.exp(lse - m), 0.0)
        total = tl.sum(w, 0)
        if HAS_SINKS:
            total += tl.exp(sink - m)
        part = tl.load(part_out_ptr + (row * num_splits + s[:, None]) * HEAD_DIM + d[None, :],
                       mask=smask[:, None] & (d[None, :] < HEAD_DIM), other=0.0)
        # A row that sees no keys (no sink): 0 and lse -inf, as with one split (not 0 / 0).
        out = tl.sum(part * w[:, None], 0) / tl.where(total > 0, total, 1.0)
        tl.store(out_ptr + b * stride_ob + h * stride_oh + d,
                 out.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM)
        tl.store(lse_ptr + row, m + tl.log(total))

    @triton.autotune(configs=_ATTN_CONFIGS, key=["GROUP", "HEAD_DIM", "BLOCK_SIZE", "BLOCK_M"],
                     do_bench=quick_bench, prune_configs_by=FP32_PRUNE)
    @triton.jit
    def _extend_kernel(
        q_ptr, out_ptr,            # [Nq, Hq, D]
        k_cache_ptr, v_cache_ptr,  # [num_blocks, BLOCK_SIZE, Hkv, D]
        block_tables_ptr, cu_seqlens_ptr, seq_lens_ptr,
        sinks_ptr,                 # [Hq] fp32 (HAS_SINKS)
        scale, softcap, window,
        stride_qn, stride_qh, stride_on, stride_oh,
        stride_cb, stride_cs, stride_ch, stride_bt,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_SINKS: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
    ):
        # grid: (B, Hq, query tiles): a tile of one sequence's new queries over its whole
        # paged context (prefix and the chunk itself), causal, online softmax.
        b = tl.program_id(0)
        h = tl.program_id(1)
        tile = tl.program_id(2)
        q_start = tl.load(cu_seqlens_ptr + b)
        q_len = tl.load(cu_seqlens_ptr + b + 1) - q_start
        if tile * BLOCK_M >= q_len:
            return
        seq_len = tl.load(seq_lens_ptr + b)
        m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        mmask = m < q_len
        qpos = seq_len - q_len + m                                   # absolute positions
        d = tl.arange(0, BLOCK_D)
        dmask = d < HEAD_DIM
        kvh = h // GROUP
        q = tl.load(q_ptr + (q_start + m)[:, None] * stride_qn + h * stride_qh + d[None, :],
                    mask=mmask[:, None] & dmask[None, :], other=0.0)

        hi = tl.minimum(seq_len, seq_len - q_len + (tile + 1) * BLOCK_M)  # causal limit
        lo = 0
        if HAS_WINDOW:
            lo = tl.maximum(seq_len - q_len + tile * BLOCK_M - window + 1, 0)
            lo = (lo // BLOCK_N) * BLOCK_N
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        acc, m_i, l_i = _attend_causal(
            q, acc, m_i, l_i, lo, hi, seq_len - q_len + tile * BLOCK_M, qpos, window,
            block_tables_ptr + b * stride_bt,
            k_cache_ptr, v_cache_ptr, kvh, d, dmask, scale, softcap, stride_cb, stride_cs,
            stride_ch, BLOCK_SIZE, BLOCK_N, HAS_WINDOW, HAS_SOFTCAP, DOT_PRECISION)
        if HAS_SINKS:   # one more logit in the softmax, without a value
            acc, m_i, l_i = _with_sink(acc, m_i, l_i, tl.load(sinks_ptr + h))
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(out_ptr + (q_start + m)[:, None] * stride_on + h * stride_oh + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=mmask[:, None] & dmask[None, :])


    @triton.autotune(configs=_GROUPED_CONFIGS,
                     key=["GROUP", "HEAD_DIM", "BLOCK_SIZE", "BLOCK_M", "DIRECT"],
                     do_bench=quick_bench, prune_configs_by=FP32_PRUNE)
    @triton.jit
    def _extend_grouped_kernel(
        q_ptr, out_ptr,            # [Nq, Hq, D]; out written when DIRECT
        part_out_ptr,              # [Nq, Hq, splits, D] fp32 (not DIRECT)
        part_lse_ptr,              # [Nq, Hq, splits] fp32 (not DIRECT)
        k_cache_ptr, v_cache_ptr,  # [num_blocks, BLOCK_SIZE, Hkv, D]
        block_tables_ptr, cu_seqlens_ptr, seq_lens_ptr,
        sinks_ptr,                 # [Hq] fp32 (HAS_SINKS, DIRECT)
        scale, softcap, window,
        stride_qn, stride_qh, stride_on, stride_oh,
        stride_cb, stride_cs, stride_ch, stride_bt,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,
        BLOCK_M: tl.constexpr,     # >= the longest chunk * GROUP, >= 16 for tl.dot
        BLOCK_N: tl.constexpr,
        DIRECT: tl.constexpr,      # one split: the output itself, no partials, no merge
        HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_SINKS: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
    ):
        # grid: (B, Hkv, splits). One program reads one split of one kv head's keys once
        # for all of the sequence's new queries and the GROUP query heads that share the kv
        # head: row r of the tile is query r // GROUP of the chunk, query head
        # kvh * GROUP + r % GROUP; each row masks the keys after its own position (causal).
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        split = tl.program_id(2)
        q_start = tl.load(cu_seqlens_ptr + b)
        q_len = tl.load(cu_seqlens_ptr + b + 1) - q_start
        if q_len == 0:
            return
        seq_len = tl.load(seq_lens_ptr + b)
        r = tl.arange(0, BLOCK_M)
        i = r // GROUP
        qh = kvh * GROUP + r % GROUP
        rmask = i < q_len
        qpos = seq_len - q_len + i                                   # absolute positions
        d = tl.arange(0, BLOCK_D)
        dmask = d < HEAD_DIM
        tok = (q_start + i).to(tl.int64)
        q = tl.load(q_ptr + tok[:, None] * stride_qn + qh[:, None] * stride_qh + d[None, :],
                    mask=rmask[:, None] & dmask[None, :], other=0.0)
        lo = 0
        if HAS_WINDOW:      # the first query's window; later queries mask more
            lo = tl.maximum(seq_len - q_len - window + 1, 0)
        span = tl.cdiv(tl.maximum(seq_len - lo, 0), tl.num_programs(2))
        start = lo + split * span
        end = tl.minimum(start + span, seq_len)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        acc, m_i, l_i = _attend_causal(
            q, acc, m_i, l_i, start, end, seq_len - q_len, qpos, window,
            block_tables_ptr + b * stride_bt,
            k_cache_ptr, v_cache_ptr, kvh, d, dmask, scale, softcap, stride_cb, stride_cs,
            stride_ch, BLOCK_SIZE, BLOCK_N, HAS_WINDOW, HAS_SOFTCAP, DOT_PRECISION)
        if DIRECT:
            if HAS_SINKS:   # one more logit in the softmax, without a value
                acc, m_i, l_i = _with_sink(acc, m_i, l_i,
                                           tl.load(sinks_ptr + qh, mask=rmask, other=0.0))
            out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
            tl.store(out_ptr + tok[:, None] * stride_on + qh[:, None] * stride_oh + d[None, :],
                     out.to(out_ptr.dtype.element_ty), mask=rmask[:, None] & dmask[None, :])
        else:
            base = (tok * (tl.num_programs(1) * GROUP) + qh) * tl.num_programs(2) + split
            _store_partial(part_out_ptr, part_lse_ptr, base, acc, m_i, l_i, d, rmask, dmask,
                           HEAD_DIM)


def _check(q, k_cache, v_cache, block_tables, seq_lens, name):
    if not q.is_floating_point() or q.dim() != 3:
        raise TypeError(f"{name}: q must be a floating-point [tokens, Hq, D] tensor; got "
                        f"{q.dtype} {tuple(q.shape)}")
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"{name}: k_cache and v_cache must be [num_blocks, block_size, Hkv, D] "
                         f"of one shape; got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise TypeError(f"{name}: q, k_cache, v_cache must share a dtype; got {q.dtype}, "
                        f"{k_cache.dtype}, {v_cache.dtype}")
    hq, d = q.shape[1:]
    hkv = k_cache.shape[2]
    if k_cache.shape[3] != d:
        raise ValueError(f"{name}: head_dim of q ({d}) and of the cache ({k_cache.shape[3]}) differ")
    if hq % hkv:
        raise ValueError(f"{name}: Hq={hq} is not a multiple of Hkv={hkv}")
    if not (k_cache.stride(3) == 1 and v_cache.stride(3) == 1 and q.stride(2) == 1):
        raise ValueError(f"{name}: q, k_cache and v_cache need a contiguous last dimension")
    if k_cache.stride() != v_cache.stride():
        raise ValueError(f"{name}: k_cache and v_cache must have the same strides")
    if block_tables.dtype != torch.int32 or block_tables.dim() != 2:
        raise TypeError(f"{name}: block_tables must be int32 [B, max_blocks]; got "
                        f"{block_tables.dtype} {tuple(block_tables.shape)}")
    if seq_lens.dtype != torch.int32 or seq_lens.shape != (block_tables.shape[0],):
        raise TypeError(f"{name}: seq_lens must be int32 [B={block_tables.shape[0]}]; got "
                        f"{seq_lens.dtype} {tuple(seq_lens.shape)}")
    if block_tables.stride(1) != 1:
        raise ValueError(f"{name}: block_tables must be contiguous in its last dimension")
    bs = k_cache.shape[1]
    if bs & (bs - 1):
        raise ValueError(f"{name}: block_size {bs} must be a power of two")
    return hq, hkv, d, bs


def _check_sinks(sinks, q):
    """sinks: None, or one fp32 logit per query head, contiguous."""
    if sinks is None:
        return None
    if sinks.shape != (q.shape[1],) or sinks.dtype != torch.float32 or not sinks.is_contiguous():
        raise ValueError(f"attention sinks must be contiguous fp32 [Hq={q.shape[1]}]; got "
                         f"{sinks.dtype} {tuple(sinks.shape)}")
    return sinks


def _decode_num_splits(q, batch_programs: int, max_len: int, cap: int = 16) -> int:
    """Splits of the key range per program row: enough programs to fill every SM about twice
    when the batch is small, one split when it is large, no split under 256 keys."""
    want = max(1, 2 * sm_count(q.device) // max(1, batch_programs))
    return max(1, min(want, triton.cdiv(max(1, max_len), 256), cap))


def _launch_decode_splits(q, k_cache, v_cache, block_tables, seq_lens, part_out, part_lse,
                          scale, sliding_window, softcap, num_splits, split_base=0,
                          kv_start=None, direct=None, sinks=None):
    """The split-K pass: partials split_base + [0, num_splits) of part_out / part_lse; or,
    with direct = (out, lse) and one split, the output and lse themselves (sinks too)."""
    B, hq, d = q.shape
    hkv, bs = k_cache.shape[2], k_cache.shape[1]
    group = hq // hkv
    assert direct is None or (num_splits == 1 and split_base == 0)
    out, lse = direct if direct is not None else (part_out, part_lse)
    _decode_split_kernel[(B, hkv, num_splits)](
        q, k_cache, v_cache, block_tables, seq_lens,
        kv_start if kv_start is not None else seq_lens, part_out, part_lse, out, lse,
        sinks if sinks is not None else lse,
        scale, softcap or 0.0, sliding_window or 0,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0), 1 if direct is not None else part_out.shape[2], split_base,
        GROUP=group, BLOCK_H=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=d, BLOCK_D=triton.next_power_of_2(d), BLOCK_SIZE=bs,
        HAS_WINDOW=bool(sliding_window), HAS_SOFTCAP=bool(softcap),
        HAS_START=kv_start is not None, DOT_PRECISION=dot_precision(q.dtype),
        DIRECT=direct is not None, HAS_SINKS=direct is not None and sinks is not None)


def _launch_decode_merge(q, part_out, part_lse, prefix_splits=0, prefix_lens=None, sinks=None):
    """Merge all partials of each (sequence, head) by log-sum-exp, and the heads' sinks if
    given -> (out [B, Hq, D], lse)."""
    B, hq, d = q.shape
    splits = part_out.shape[2]
    out = torch.empty_like(q)
    lse = torch.empty(B, hq, dtype=torch.float32, device=q.device)
    _decode_merge_kernel[(B, hq)](
        part_out, part_lse, prefix_lens if prefix_lens is not None else part_lse,
        out, lse, sinks if sinks is not None else lse, out.stride(0), out.stride(1), hq,
        splits, prefix_splits, HEAD_DIM=d, BLOCK_D=triton.next_power_of_2(d),
        BLOCK_S=max(16, triton.next_power_of_2(splits)), HAS_PREFIX=prefix_splits > 0,
        HAS_SINKS=sinks is not None)
    return out, lse


def _partials(q, splits):
    """Split-K scratch: (part_out [B, Hq, splits, D], part_lse [B, Hq, splits]) fp32."""
    B, hq, d = q.shape
    return (torch.empty(B, hq, splits, d, dtype=torch.float32, device=q.device),
            torch.empty(B, hq, splits, dtype=torch.float32, device=q.device))


def paged_decode_attention_triton(q, k_cache, v_cache, block_tables, seq_lens, scale,
                                  sliding_window=None, softcap=None, num_splits=None,
                                  kv_start=None, sinks=None):
    _, hkv, _, bs = _check(q, k_cache, v_cache, block_tables, seq_lens, "paged_decode_attention")
    B = q.shape[0]
    if q.shape[0] != block_tables.shape[0]:
        raise ValueError(f"paged_decode_attention: q has {q.shape[0]} sequences, block_tables "
                         f"{block_tables.shape[0]}")
    if kv_start is not None and (kv_start.dtype != torch.int32 or kv_start.shape != (B,)):
        raise TypeError(f"paged_decode_attention: kv_start must be int32 [B={B}]; got "
                        f"{kv_start.dtype} {tuple(kv_start.shape)}")
    if num_splits is None:
        num_splits = _decode_num_splits(q, B * hkv, block_tables.shape[1] * bs)
    sinks = _check_sinks(sinks, q)
    if num_splits == 1:     # a batch that fills the GPU by itself: no partials, no merge
        out = torch.empty_like(q)
        lse = torch.empty(B, q.shape[1], dtype=torch.float32, device=q.device)
        _launch_decode_splits(q, k_cache, v_cache, block_tables, seq_lens, out, lse, scale,
                              sliding_window, softcap, 1, kv_start=kv_start, direct=(out, lse),
                              sinks=sinks)
        return out, lse
    part_out, part_lse = _partials(q, num_splits)
    _launch_decode_splits(q, k_cache, v_cache, block_tables, seq_lens, part_out, part_lse,
                          scale, sliding_window, softcap, num_splits, kv_start=kv_start)
    return _launch_decode_merge(q, part_out, part_lse, sinks=sinks)


def paged_extend_attention_triton(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens,
                                  scale, sliding_window=None, softcap=None, max_query_len=None,
                                  sinks=None, grouped: bool | None = None):
    """grouped: the short-chunk kernel (paged_extend_attention_grouped_triton); None picks it
    where the longest chunk times the query heads per kv head fits GROUPED_EXTEND_ROWS, else
    one program per (sequence, query head, tile of queries)."""
    hq, hkv, d, bs = _check(q, k_cache, v_cache, block_tables, seq_lens, "paged_extend_attention")
    B = block_tables.shape[0]
    if cu_seqlens_q.dtype != torch.int32 or cu_seqlens_q.shape != (B + 1,):
        raise TypeError(f"paged_extend_attention: cu_seqlens_q must be int32 [B + 1 = {B + 1}]")
    out = torch.empty_like(q)
    if q.shape[0] == 0:
        return out
    # The longest chunk sizes the grid. From the caller, who knows it on the host: reading it
    # from cu_seqlens_q waits for the device, at every layer of an eager forward.
    max_q = max_query_len if max_query_len is not None else \
        int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())
    if grouped is None:     # (fp32's full-precision dots spill at 64 rows: 32 there)
        limit = GROUPED_EXTEND_ROWS // (2 if q.dtype == torch.float32 else 1)
        grouped = max_q * (hq // hkv) <= limit
    if grouped:
        return paged_extend_attention_grouped_triton(
            q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, scale, sliding_window,
            softcap, max_q, sinks)
    # Query tile: 128 rows for prefill-sized chunks (more reuse of each K/V tile; 64 under
    # the interpreter, which is slow with big tiles); no larger than the longest chunk needs.
    # From 64 rows tl.dot is Hopper's wgmma (bench/kernel_compile.py reads it in the PTX).
    # fp32's full-precision dots have no tensor cores and hold the tile in registers: 128
    # rows spilled 14-32 KB a thread; 32 there.
    block_m = (128 if not INTERPRET and max_q >= 128 else 64) \
        if d <= 128 and q.dtype != torch.float32 else 32
    block_m = min(block_m, max(16, triton.next_power_of_2(max_q)))
    grid = (B, hq, triton.cdiv(max_q, block_m))
    sinks = _check_sinks(sinks, q)
    _extend_kernel[grid](
        q, out, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens,
        sinks if sinks is not None else seq_lens, scale, softcap or 0.0, sliding_window or 0,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        GROUP=hq // hkv, HEAD_DIM=d, BLOCK_D=triton.next_power_of_2(d), BLOCK_SIZE=bs,
        BLOCK_M=block_m,
        HAS_WINDOW=bool(sliding_window), HAS_SOFTCAP=bool(softcap), HAS_SINKS=sinks is not None,
        DOT_PRECISION=dot_precision(q.dtype))
    return out


# A chunk's queries times the query heads of a kv head, up to which an extend runs with them
# all in one tile per (sequence, kv head): a scorer's chunk of 8 tokens on a Llama-3 model
# (4 query heads a kv head) is 32 rows.
GROUPED_EXTEND_ROWS = 64


def paged_extend_attention_grouped_triton(q, k_cache, v_cache, block_tables, cu_seqlens_q,
                                          seq_lens, scale, sliding_window=None, softcap=None,
                                          max_query_len=None, sinks=None, num_splits=None):
    """paged_extend_attention for short chunks over long contexts (a scorer's chunk of each
    beam): one program per (sequence, kv head, split of the keys) attends all of the chunk's
    queries of all the query heads sharing that kv head, so each key and value is read once
    per split, not once per query head and query tile; the keys are split (as in decode) so
    that a batch of few sequences still fills the GPU, the splits merged by log-sum-exp.
    Needs max_query_len * (Hq // Hkv) <= GROUPED_EXTEND_ROWS."""
    hq, hkv, d, bs = _check(q, k_cache, v_cache, block_tables, seq_lens, "paged_extend_attention")
    B = block_tables.shape[0]
    if cu_seqlens_q.dtype != torch.int32 or cu_seqlens_q.shape != (B + 1,):
        raise TypeError(f"paged_extend_attention: cu_seqlens_q must be int32 [B + 1 = {B + 1}]")
    if q.shape[0] == 0:
        return torch.empty_like(q)
    group = hq // hkv
    max_q = max_query_len if max_query_len is not None else \
        int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())
    rows = max_q * group
    if rows > GROUPED_EXTEND_ROWS:
        raise ValueError(f"paged_extend_attention_grouped: a chunk of {max_q} queries times "
                         f"{group} query heads per kv head is {rows} rows, past "
                         f"{GROUPED_EXTEND_ROWS}; use paged_extend_attention")
    if num_splits is None:
        num_splits = _decode_num_splits(q, B * hkv, block_tables.shape[1] * bs)
    sinks = _check_sinks(sinks, q)
    out = torch.empty_like(q)
    part_out, part_lse = _partials(q, num_splits) if num_splits > 1 else (out, out)
    _extend_grouped_kernel[(B, hkv, num_splits)](
        q, out, part_out, part_lse, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens,
        sinks if sinks is not None and num_splits == 1 else seq_lens,
        scale, softcap or 0.0, sliding_window or 0,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        GROUP=group, HEAD_DIM=d, BLOCK_D=triton.next_power_of_2(d), BLOCK_SIZE=bs,
        BLOCK_M=max(16, triton.next_power_of_2(rows)), DIRECT=num_splits == 1,
        HAS_WINDOW=bool(sliding_window), HAS_SOFTCAP=bool(softcap),
        HAS_SINKS=sinks is not None and num_splits == 1, DOT_PRECISION=dot_precision(q.dtype))
    if num_splits == 1:
        return out
    # each query token is a row of the decode merge: [Nq, Hq] partials -> [Nq, Hq, D]
    return _launch_decode_merge(q, part_out, part_lse, sinks=sinks)[0]


def paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale,
                           sliding_window=None, softcap=None, num_splits=None, kv_start=None,
                           sinks=None):
    """-> (out [B, Hq, D], lse [B, Hq] fp32) of each sequence's last position over its cache.
    sinks [Hq] fp32: attention sinks, one more logit per head without a value (GPT-OSS)."""
    if q.is_cuda and triton is not None:
        return paged_decode_attention_triton(q, k_cache, v_cache, block_tables, seq_lens, scale,
                                             sliding_window, softcap, num_splits, kv_start,
                                             sinks)
    return paged_decode_attention_ref(q, k_cache, v_cache, block_tables, seq_lens, scale,
                                      sliding_window, softcap, kv_start=kv_start, sinks=sinks)


def paged_extend_attention(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, scale,
                           sliding_window=None, softcap=None, max_query_len=None, sinks=None):
    """max_query_len: the longest sequence's new tokens, if the caller knows it (saves the
    GPU path a device read). sinks as for paged_decode_attention."""
    if q.is_cuda and triton is not None:
        return paged_extend_attention_triton(q, k_cache, v_cache, block_tables, cu_seqlens_q,
                                             seq_lens, scale, sliding_window, softcap,
                                             max_query_len, sinks)
    if softcap or sinks is not None:    # SDPA has neither
        return paged_extend_attention_ref(q, k_cache, v_cache, block_tables, cu_seqlens_q,
                                          seq_lens, scale, sliding_window, softcap, sinks)
    return paged_extend_attention_sdpa(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens,
                                       scale, sliding_window)

