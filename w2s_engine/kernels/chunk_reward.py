"""Chunk reward: log p_tuned(t) - log p_untuned(t) per chunk token, and its sum per segment.

Two forms:
- chunk_reward: from both models' logits [N, V];
- fused_lmhead_chunk_reward: from both models' final hidden states [N, H] and LM-head weights
  [V, H]; logits are formed tile by tile in registers and never stored, which is what keeps a
  262k vocabulary cheap.
Both kernels make one pass over the vocabulary, split across programs for parallelism (the
split count comes from the SM count, so a short chunk still fills the GPU): each (row, vocab
split) program keeps an online max and sum of exponentials (fp32). From logits, a second small
kernel merges the splits, gathers the target logits and adds each token's difference to its
segment: two launches and one device sync (the input checks) per call, nothing [N, V]. The
fused form merges in torch (a few numbers per row) and forms the target logit as one dot
product per row. On a GPU the block sizes are autotuned; fp32 dots are full fp32.
"""

import torch

from w2s_engine.kernels._common import (
    configs,
    dot_precision,
    lse_reduce,
    online_lse_step,
    sm_count,
)

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None


def _segment_sums(token_diff, segment_ids, num_segments):
    return torch.zeros(num_segments, dtype=torch.float32, device=token_diff.device).index_add_(
        0, segment_ids.long(), token_diff)


# ---- PyTorch references ------------------------------------------------------------------------

def chunk_reward_ref(logits_tuned, logits_untuned, targets, segment_ids, num_segments):
    t = targets.long()[:, None]
    diff = (logits_tuned.float().log_softmax(-1).gather(1, t)
            - logits_untuned.float().log_softmax(-1).gather(1, t))[:, 0]
    return diff, _segment_sums(diff, segment_ids, num_segments)


def _target_logprob_ref(hidden, weight, targets, softcap, rows=64):
    # Rows in chunks: the reference never holds more than [rows, V] logits.
    out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    for i in range(0, hidden.shape[0], rows):
        logits = (hidden[i:i + rows] @ weight.T).float()
        if softcap:
            logits = softcap * torch.tanh(logits / softcap)
        out[i:i + rows] = logits.log_softmax(-1).gather(1, targets[i:i + rows, None].long())[:, 0]
    return out


def fused_lmhead_chunk_reward_ref(hidden_tuned, weight_tuned, hidden_untuned, weight_untuned,
                                  targets, segment_ids, num_segments, softcap_tuned=None,
                                  softcap_untuned=None):
    diff = (_target_logprob_ref(hidden_tuned, weight_tuned, targets, softcap_tuned)
            - _target_logprob_ref(hidden_untuned, weight_untuned, targets, softcap_untuned))
    return diff, _segment_sums(diff, segment_ids, num_segments)


# ---- Triton ------------------------------------------------------------------------------------

if triton is not None:
    @triton.autotune(
        configs=configs([triton.Config({"BLOCK_V": 1024}, num_warps=4),
                         triton.Config({"BLOCK_V": 2048}, num_warps=8),
                         triton.Config({"BLOCK_V": 4096}, num_warps=8)],
                        interpret=triton.Config({"BLOCK_V": 1024})),
        key=["V"])
    @triton.jit
    def _two_model_lse_kernel(
        a_ptr, b_ptr,                 # [N, V] logits of the tuned / untuned model
        part_ptr,                     # [N, splits, 4] fp32: (max_a, sum_a, max_b, sum_b)
        V, stride_a, stride_b, split_size, splits,
        BLOCK_V: tl.constexpr,
    ):
        # grid: (N, splits). Both models' tiles stream through once, side by side; lane-wise
        # online log-sum-exp (one exp per element, no cross-lane reduction inside the loop).
        row = tl.program_id(0).to(tl.int64)
        split = tl.program_id(1)
        lo = split * split_size
        hi = tl.minimum(V, lo + split_size)
        m_a = tl.full([BLOCK_V], float("-inf"), tl.float32)
        s_a = tl.zeros([BLOCK_V], tl.float32)
        m_b = tl.full([BLOCK_V], float("-inf"), tl.float32)
        s_b = tl.zeros([BLOCK_V], tl.float32)
        for v0 in range(lo, hi, BLOCK_V):
            v = v0 + tl.arange(0, BLOCK_V)
            mask = v < hi
            x = tl.load(a_ptr + row * stride_a + v, mask=mask, other=float("-inf")).to(tl.float32)
            y = tl.load(b_ptr + row * stride_b + v, mask=mask, other=float("-inf")).to(tl.float32)
            m_a, s_a = online_lse_step(m_a, s_a, x)
            m_b, s_b = online_lse_step(m_b, s_b, y)
        ma, sa = lse_reduce(m_a, s_a)
        mb, sb = lse_reduce(m_b, s_b)
        base = part_ptr + (row * splits + split) * 4
        tl.store(base + 0, ma)
        tl.store(base + 1, sa)
        tl.store(base + 2, mb)
        tl.store(base + 3, sb)

    @triton.jit
    def _merge_splits_tl(m, s):
        """Splits' (max, sum of exp(. - max)) -> log-sum-exp (empty splits: -inf, 0)."""
        top = tl.max(m, 0)
        return top + tl.log(tl.sum(tl.where(m == float("-inf"), 0.0, s * tl.exp(m - top)), 0))

    @triton.jit
    def _reward_finish_kernel(
        a_ptr, b_ptr,                 # [N, V] logits of the tuned / untuned model
        part_ptr,                     # [N, splits, 4] fp32 from _two_model_lse_kernel
        targets_ptr, segment_ptr,     # [N] int
        diff_ptr,                     # [N] fp32 out: log p_tuned(t) - log p_untuned(t)
        sums_ptr,                     # [num_segments] fp32, zeroed: += diff of each segment
        stride_a, stride_b, splits,
        BLOCK_S: tl.constexpr,
    ):
        # grid: (N,): merge the splits, gather the target logits, one atomic add per token.
        row = tl.program_id(0).to(tl.int64)
        s = tl.arange(0, BLOCK_S)
        smask = s < splits
        base = part_ptr + (row * splits + s) * 4
        lse_a = _merge_splits_tl(tl.load(base + 0, mask=smask, other=float("-inf")),
                                 tl.load(base + 1, mask=smask, other=0.0))
        lse_b = _merge_splits_tl(tl.load(base + 2, mask=smask, other=float("-inf")),
                                 tl.load(base + 3, mask=smask, other=0.0))
        t = tl.load(targets_ptr + row).to(tl.int64)
        x = tl.load(a_ptr + row * stride_a + t).to(tl.float32)
        y = tl.load(b_ptr + row * stride_b + t).to(tl.float32)
        diff = (x - lse_a) - (y - lse_b)
        tl.store(diff_ptr + row, diff)
        tl.atomic_add(sums_ptr + tl.load(segment_ptr + row), diff)

    _LMHEAD_CONFIGS = configs(
        [triton.Config({"BLOCK_M": 64, "BLOCK_V": 128, "BLOCK_K": 64}, num_warps=4, num_stages=3),
         triton.Config({"BLOCK_M": 128, "BLOCK_V": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
         triton.Config({"BLOCK_M": 128, "BLOCK_V": 256, "BLOCK_K": 64}, num_warps=8, num_stages=3),
         triton.Config({"BLOCK_M": 64, "BLOCK_V": 256, "BLOCK_K": 64}, num_warps=8, num_stages=4)],
        interpret=triton.Config({"BLOCK_M": 16, "BLOCK_V": 64, "BLOCK_K": 32}))
    # Vocabulary splits are multiples of every config's BLOCK_V, so the split count (and the
    # partials' shape) does not depend on the config the autotuner picks.
    _LMHEAD_GRANULE = max(c.kwargs["BLOCK_V"] for c in _LMHEAD_CONFIGS)

    @triton.autotune(configs=_LMHEAD_CONFIGS, key=["n_bucket", "H"])
    @triton.jit
    def _lmhead_lse_kernel(
        h_ptr,                  # [N, H]
        w_ptr,                  # [V, H]
        part_ptr,               # [N, splits, 2] fp32: (max, sum of exp)
        N, V, H, stride_h, stride_w, split_size, splits, softcap,
        n_bucket,               # next power of two of N: the autotuning key, unused here
        BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
        BLOCK_K: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
        DOT_PRECISION: tl.constexpr,   # "ieee" for fp32 (no TF32), else "tf32" (ignored)
    ):
        # grid: (cdiv(N, BLOCK_M), splits), row tiles fastest, so the programs running together
        # share one split of the weight through L2. Logits [BLOCK_M, BLOCK_V] live only in
        # registers.
        pid_m = tl.program_id(0)
        split = tl.program_id(1)
        m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        mmask = m < N
        lo = split * split_size
        hi = tl.minimum(V, lo + split_size)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        for v0 in range(lo, hi, BLOCK_V):
            v = v0 + tl.arange(0, BLOCK_V)
            vmask = v < hi
            acc = tl.zeros([BLOCK_M, BLOCK_V], tl.float32)
            for k0 in range(0, H, BLOCK_K):
                k = k0 + tl.arange(0, BLOCK_K)
                kmask = k < H
                h = tl.load(h_ptr + m[:, None].to(tl.int64) * stride_h + k[None, :],
                            mask=mmask[:, None] & kmask[None, :], other=0.0)
                w = tl.load(w_ptr + v[:, None].to(tl.int64) * stride_w + k[None, :],
                            mask=vmask[:, None] & kmask[None, :], other=0.0)
                acc += tl.dot(h, tl.trans(w), input_precision=DOT_PRECISION)
            if HAS_SOFTCAP:
                acc = softcap * (2 * tl.sigmoid(2 * acc / softcap) - 1)
            acc = tl.where(vmask[None, :], acc, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(acc, 1))
            l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(acc - m_new[:, None]), 1)
            m_i = m_new
        base = part_ptr + (m.to(tl.int64) * splits + split) * 2
        tl.store(base + 0, m_i, mask=mmask)
        tl.store(base + 1, l_i, mask=mmask)


def _merge(max_, sum_):
    """Partial (max, sum of exp) over splits [N, S] -> log-sum-exp [N]."""
    m = max_.max(dim=1).values
    return m + torch.log((sum_ * torch.exp(max_ - m[:, None])).sum(dim=1))


def _vocab_splits(device, programs_per_split: int, v: int, granule: int):
    """(splits, split_size): enough programs (programs_per_split x splits) to give every SM
    about four when the chunk has few tokens; split_size a multiple of `granule`."""
    want = max(1, triton.cdiv(4 * sm_count(device), max(1, programs_per_split)))
    splits = max(1, min(triton.cdiv(v, granule), want))
    split_size = triton.cdiv(triton.cdiv(v, splits), granule) * granule
    return triton.cdiv(v, split_size), split_size


def _check_common(targets, segment_ids, num_segments, n, v, name, bounds: bool = True):
    if targets.shape != (n,) or targets.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name}: targets must be int32/int64 [{n}]; got {targets.dtype} "
                        f"{tuple(targets.shape)}")
    if segment_ids.shape != (n,) or segment_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name}: segment_ids must be int32/int64 [{n}]; got "
                        f"{segment_ids.dtype} {tuple(segment_ids.shape)}")
    if n and bounds:   # one device sync for all four bounds (a caller that knows them skips it)
        t_lo, t_hi, s_lo, s_hi = torch.stack([targets.min(), targets.max(), segment_ids.min(),
                                              segment_ids.max()]).tolist()
        if t_lo < 0 or t_hi >= v:
            raise ValueError(f"{name}: targets must lie in [0, {v}); got [{t_lo}, {t_hi}]")
        if s_lo < 0 or s_hi >= num_segments:
            raise ValueError(f"{name}: segment_ids must lie in [0, num_segments={num_segments}); "
                             f"got [{s_lo}, {s_hi}]")


def chunk_reward_triton(logits_tuned, logits_untuned, targets, segment_ids, num_segments):
    name = "chunk_reward"
    if logits_tuned.dim() != 2 or logits_tuned.shape != logits_untuned.shape:
        raise ValueError(f"{name}: logits must both be [N, V]; got {tuple(logits_tuned.shape)} "
                         f"and {tuple(logits_untuned.shape)}")
    for t in (logits_tuned, logits_untuned):
        if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"{name}: logits must be fp32, fp16 or bf16; got {t.dtype}")
        if t.stride(1) != 1:
            raise ValueError(f"{name}: logits need a contiguous last dimension")
    n, v = logits_tuned.shape
    _check_common(targets, segment_ids, num_segments, n, v, name)
    if n == 0:
        empty = torch.zeros(0, dtype=torch.float32, device=logits_tuned.device)
        return empty, _segment_sums(empty, segment_ids, num_segments)
    # Split over the vocabulary so that a short chunk still fills the GPU; a second small
    # kernel merges the splits, gathers the target logits and adds up the segments.
    splits, split_size = _vocab_splits(logits_tuned.device, n, v, 4096)
    part = torch.empty(n, splits, 4, dtype=torch.float32, device=logits_tuned.device)
    _two_model_lse_kernel[(n, splits)](
        logits_tuned, logits_untuned, part, v, logits_tuned.stride(0), logits_untuned.stride(0),
        split_size, splits)
    diff = torch.empty(n, dtype=torch.float32, device=logits_tuned.device)
    sums = torch.zeros(num_segments, dtype=torch.float32, device=logits_tuned.device)
    _reward_finish_kernel[(n,)](
        logits_tuned, logits_untuned, part, targets, segment_ids, diff, sums,
        logits_tuned.stride(0), logits_untuned.stride(0), splits,
        BLOCK_S=triton.next_power_of_2(splits))
    return diff, sums


def _lmhead_logprob(hidden, weight, targets, softcap):
    n, h = hidden.shape
    v = weight.shape[0]
    splits, split_size = _vocab_splits(hidden.device, triton.cdiv(n, 64), v, _LMHEAD_GRANULE)
    part = torch.empty(n, splits, 2, dtype=torch.float32, device=hidden.device)
    _lmhead_lse_kernel[lambda meta: (triton.cdiv(n, meta["BLOCK_M"]), splits)](
        hidden, weight, part, n, v, h, hidden.stride(0), weight.stride(0), split_size, splits,
        softcap or 0.0, min(triton.next_power_of_2(n), 1024),
        HAS_SOFTCAP=bool(softcap), DOT_PRECISION=dot_precision(hidden.dtype))
    # The target logit: one dot product per row, [N, H] of weight rows, no [N, V].
    target = (hidden.float() * weight[targets.long()].float()).sum(-1)
    if softcap:
        target = softcap * torch.tanh(target / softcap)
    return target - _merge(part[..., 0], part[..., 1])


def fused_lmhead_chunk_reward_triton(hidden_tuned, weight_tuned, hidden_untuned, weight_untuned,
                                     targets, segment_ids, num_segments, softcap_tuned=None,
                                     softcap_untuned=None, bounds_checked=False):
    name = "fused_lmhead_chunk_reward"
    n = hidden_tuned.shape[0]
    for h, w, role in ((hidden_tuned, weight_tuned, "tuned"), (hidden_untuned, weight_untuned, "untuned")):
        if h.dim() != 2 or w.dim() != 2 or h.shape[1] != w.shape[1] or h.shape[0] != n:
            raise ValueError(f"{name}: {role} hidden [N={n}, H] and weight [V, H] disagree: "
                             f"{tuple(h.shape)} and {tuple(w.shape)}")
        if h.dtype not in (torch.float32, torch.float16, torch.bfloat16) or w.dtype != h.dtype:
            raise TypeError(f"{name}: {role} hidden and weight must share a float dtype; got "
                            f"{h.dtype} and {w.dtype}")
        if h.stride(1) != 1 or w.stride(1) != 1:
            raise ValueError(f"{name}: {role} hidden and weight need a contiguous last dimension")
    if weight_tuned.shape[0] != weight_untuned.shape[0]:
        raise ValueError(f"{name}: the two LM heads have different vocabularies "
                         f"({weight_tuned.shape[0]} and {weight_untuned.shape[0]})")
    v = weight_tuned.shape[0]
    _check_common(targets, segment_ids, num_segments, n, v, name, not bounds_checked)
    if n == 0:
        empty = torch.zeros(0, dtype=torch.float32, device=hidden_tuned.device)
        return empty, _segment_sums(empty, segment_ids, num_segments)
    diff = (_lmhead_logprob(hidden_tuned, weight_tuned, targets, softcap_tuned)
            - _lmhead_logprob(hidden_untuned, weight_untuned, targets, softcap_untuned))
    return diff, _segment_sums(diff, segment_ids, num_segments)


def chunk_reward(logits_tuned, logits_untuned, targets, segment_ids, num_segments):
    if logits_tuned.is_cuda and triton is not None:
        return chunk_reward_triton(logits_tuned, logits_untuned, targets, segment_ids, num_segments)
    return chunk_reward_ref(logits_tuned, logits_untuned, targets, segment_ids, num_segments)


def fused_lmhead_chunk_reward(hidden_tuned, weight_tuned, hidden_untuned, weight_untuned, targets,
                              segment_ids, num_segments, softcap_tuned=None, softcap_untuned=None,
                              bounds_checked=False):
    """bounds_checked: the caller has checked targets in [0, V) and segment_ids in
    [0, num_segments) on the host, so the GPU path need not read them back to check."""
    args = (hidden_tuned, weight_tuned, hidden_untuned, weight_untuned, targets, segment_ids,
            num_segments, softcap_tuned, softcap_untuned)
    if hidden_tuned.is_cuda and triton is not None:
        return fused_lmhead_chunk_reward_triton(*args, bounds_checked=bounds_checked)
    return fused_lmhead_chunk_reward_ref(*args)
