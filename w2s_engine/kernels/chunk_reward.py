"""Chunk reward: log p_tuned(t) - log p_untuned(t) per chunk token, and its sum per segment.

Two forms:
- chunk_reward: from both models' logits [N, V];
- fused_lmhead_chunk_reward: from both models' final hidden states [N, H] and LM-head weights
  [V, H]; logits are formed tile by tile in registers and never stored, which is what keeps a
  262k vocabulary cheap.
Both kernels make one pass over the vocabulary, split across programs for parallelism: each
(row, vocab split) program keeps an online max and sum of exponentials (fp32); the wrapper
merges the splits (a few numbers per row) and gathers the target logit directly.
"""

import torch

from w2s_engine.kernels._common import dot_precision

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
    @triton.jit
    def _two_model_lse_kernel(
        a_ptr, b_ptr,                 # [N, V] logits of the tuned / untuned model
        part_ptr,                     # [N, SPLITS, 4] fp32: (max_a, sum_a, max_b, sum_b)
        V, stride_a, stride_b, split_size,
        SPLITS: tl.constexpr, BLOCK_V: tl.constexpr,
    ):
        # grid: (N, SPLITS). Both models' tiles stream through once, side by side.
        row = tl.program_id(0).to(tl.int64)
        split = tl.program_id(1)
        lo = split * split_size
        m_a = tl.full([BLOCK_V], float("-inf"), tl.float32)
        s_a = tl.zeros([BLOCK_V], tl.float32)
        m_b = tl.full([BLOCK_V], float("-inf"), tl.float32)
        s_b = tl.zeros([BLOCK_V], tl.float32)
        for v0 in range(lo, lo + split_size, BLOCK_V):
            v = v0 + tl.arange(0, BLOCK_V)
            mask = v < tl.minimum(V, lo + split_size)
            x = tl.load(a_ptr + row * stride_a + v, mask=mask, other=float("-inf")).to(tl.float32)
            y = tl.load(b_ptr + row * stride_b + v, mask=mask, other=float("-inf")).to(tl.float32)
            # Lane-wise online log-sum-exp: no cross-lane reduction inside the loop.
            n_a = tl.maximum(m_a, x)
            s_a = s_a * tl.exp(tl.where(n_a == float("-inf"), 0.0, m_a - n_a)) + \
                tl.where(mask, tl.exp(x - tl.where(n_a == float("-inf"), 0.0, n_a)), 0.0)
            m_a = n_a
            n_b = tl.maximum(m_b, y)
            s_b = s_b * tl.exp(tl.where(n_b == float("-inf"), 0.0, m_b - n_b)) + \
                tl.where(mask, tl.exp(y - tl.where(n_b == float("-inf"), 0.0, n_b)), 0.0)
            m_b = n_b
        ma = tl.max(m_a, 0)
        sa = tl.sum(s_a * tl.exp(tl.where(m_a == float("-inf"), float("-inf"), m_a - ma)), 0)
        mb = tl.max(m_b, 0)
        sb = tl.sum(s_b * tl.exp(tl.where(m_b == float("-inf"), float("-inf"), m_b - mb)), 0)
        base = part_ptr + (row * SPLITS + split) * 4
        tl.store(base + 0, ma)
        tl.store(base + 1, sa)
        tl.store(base + 2, mb)
        tl.store(base + 3, sb)

    @triton.jit
    def _lmhead_lse_kernel(
        h_ptr,                  # [N, H]
        w_ptr,                  # [V, H]
        part_ptr,               # [N, SPLITS, 2] fp32: (max, sum of exp)
        N, V, H, stride_h, stride_w, split_size, softcap,
        SPLITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
        BLOCK_K: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
        DOT_PRECISION: tl.constexpr,   # "ieee" for fp32 (no TF32), else "tf32" (ignored)
    ):
        # grid: (cdiv(N, BLOCK_M), SPLITS). Logits [BLOCK_M, BLOCK_V] live only in registers.
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
        base = part_ptr + (m.to(tl.int64) * SPLITS + split) * 2
        tl.store(base + 0, m_i, mask=mmask)
        tl.store(base + 1, l_i, mask=mmask)


def _merge(max_, sum_):
    """Partial (max, sum of exp) over splits [N, S] -> log-sum-exp [N]."""
    m = max_.max(dim=1).values
    return m + torch.log((sum_ * torch.exp(max_ - m[:, None])).sum(dim=1))


def _num_splits(n_rows: int, v: int, block: int) -> int:
    # Enough programs to fill the GPU (~132 SMs x a few) when the chunk has few tokens.
    return max(1, min(triton.cdiv(v, block), triton.cdiv(528, max(1, n_rows))))


def _check_common(targets, segment_ids, num_segments, n, v, name):
    if targets.shape != (n,) or targets.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name}: targets must be int32/int64 [{n}]; got {targets.dtype} "
                        f"{tuple(targets.shape)}")
    if segment_ids.shape != (n,) or segment_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name}: segment_ids must be int32/int64 [{n}]; got "
                        f"{segment_ids.dtype} {tuple(segment_ids.shape)}")
    if n and (int(targets.min()) < 0 or int(targets.max()) >= v):
        raise ValueError(f"{name}: targets must lie in [0, {v})")
    if n and (int(segment_ids.min()) < 0 or int(segment_ids.max()) >= num_segments):
        raise ValueError(f"{name}: segment_ids must lie in [0, num_segments={num_segments})")


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
    BLOCK_V = 1024
    splits = _num_splits(n, v, BLOCK_V)
    split_size = triton.cdiv(triton.cdiv(v, splits), BLOCK_V) * BLOCK_V
    splits = triton.cdiv(v, split_size)
    part = torch.empty(n, splits, 4, dtype=torch.float32, device=logits_tuned.device)
    _two_model_lse_kernel[(n, splits)](
        logits_tuned, logits_untuned, part, v, logits_tuned.stride(0), logits_untuned.stride(0),
        split_size, SPLITS=splits, BLOCK_V=BLOCK_V)
    t = targets.long()[:, None]
    diff = ((logits_tuned.gather(1, t)[:, 0].float() - _merge(part[..., 0], part[..., 1]))
            - (logits_untuned.gather(1, t)[:, 0].float() - _merge(part[..., 2], part[..., 3])))
    return diff, _segment_sums(diff, segment_ids, num_segments)


def _lmhead_logprob(hidden, weight, targets, softcap):
    n, h = hidden.shape
    v = weight.shape[0]
    BLOCK_M = 16 if n <= 16 else 32
    BLOCK_V, BLOCK_K = 64, 64
    splits = _num_splits(triton.cdiv(n, BLOCK_M), v, BLOCK_V)
    split_size = triton.cdiv(triton.cdiv(v, splits), BLOCK_V) * BLOCK_V
    splits = triton.cdiv(v, split_size)
    part = torch.empty(n, splits, 2, dtype=torch.float32, device=hidden.device)
    _lmhead_lse_kernel[(triton.cdiv(n, BLOCK_M), splits)](
        hidden, weight, part, n, v, h, hidden.stride(0), weight.stride(0), split_size,
        softcap or 0.0, SPLITS=splits, BLOCK_M=BLOCK_M, BLOCK_V=BLOCK_V, BLOCK_K=BLOCK_K,
        HAS_SOFTCAP=bool(softcap), DOT_PRECISION=dot_precision(hidden.dtype))
    # The target logit: one dot product per row, [N, H] of weight rows, no [N, V].
    target = (hidden.float() * weight[targets.long()].float()).sum(-1)
    if softcap:
        target = softcap * torch.tanh(target / softcap)
    return target - _merge(part[..., 0], part[..., 1])


def fused_lmhead_chunk_reward_triton(hidden_tuned, weight_tuned, hidden_untuned, weight_untuned,
                                     targets, segment_ids, num_segments, softcap_tuned=None,
                                     softcap_untuned=None):
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
    _check_common(targets, segment_ids, num_segments, n, v, name)
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
                              segment_ids, num_segments, softcap_tuned=None, softcap_untuned=None):
    args = (hidden_tuned, weight_tuned, hidden_untuned, weight_untuned, targets, segment_ids,
            num_segments, softcap_tuned, softcap_untuned)
    if hidden_tuned.is_cuda and triton is not None:
        return fused_lmhead_chunk_reward_triton(*args)
    return fused_lmhead_chunk_reward_ref(*args)
