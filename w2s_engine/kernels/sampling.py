"""Sampling by Gumbel-max with counter-based noise: temperature, top-k, top-p, greedy.

token = argmax over allowed v of logits[v] / T + g(seed, position, v), g = -log(-log(u)), where
u comes from an integer hash of (seed, position, v). The noise depends on nothing but the
row's own seed and position, so a seeded beam draws the same token whatever batch it is in;
the Triton kernel and the PyTorch reference compute the same hash bit for bit.

The hash (all arithmetic mod 2^32): fmix32 is murmur3's finaliser;
    key = fmix32(seed_lo ^ fmix32(seed_hi ^ fmix32(position_lo + 0x9E3779B9)))
    bits = fmix32(key ^ (v * 0x27D4EB2F mod 2^32))
    u = ((bits >> 9) + 0.5) / 2^23            in (0, 1), exact in fp32 (never 1.0)
Allowed tokens, in transformers' order (TopKLogitsWarper, then TopPLogitsWarper): the logits
>= the k-th largest of logits / T, then the top-p nucleus of what top-k kept, renormalised (the
smallest set of most likely tokens whose mass reaches top_p; never empty). The per-row
threshold logit for top-k / top-p is found with torch (topk / sort) in the wrapper, only for
rows that use them; the kernel then does temperature, threshold, noise and argmax in one pass.
"""

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

M32 = 0xFFFFFFFF


def _fmix32(x):
    """murmur3 fmix32 on int64 tensors holding uint32 values."""
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & M32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & M32
    return x ^ (x >> 16)


def gumbel_noise_ref(seeds, positions, vocab: int):
    """[B] seeds and positions -> [B, vocab] fp32 Gumbel noise."""
    index = torch.arange(vocab, device=seeds.device)[None].expand(seeds.shape[0], vocab)
    return _noise_at(seeds, positions, index)


def _thresholds(scaled, top_k, top_p):
    """Per-row lowest allowed scaled logit ([B] fp32, -inf where nothing is cut).

    transformers' order (TopKLogitsWarper, then TopPLogitsWarper): top-k keeps the logits >= the
    k-th largest; top-p then takes the nucleus of what top-k kept, renormalised."""
    b, v = scaled.shape
    thr = torch.full((b,), float("-inf"), dtype=torch.float32, device=scaled.device)
    use_k = (top_k > 0) & (top_k < v)
    use_p = top_p < 1.0
    rows = torch.nonzero(use_k | use_p).flatten()
    if rows.numel() == 0:
        return thr
    x = scaled[rows]
    sorted_x, _ = torch.sort(x, dim=-1, descending=True)
    k = torch.where(use_k[rows], top_k[rows].long(), torch.full_like(rows, v)).clamp(1, v)
    no_cut = torch.full((rows.numel(),), float("-inf"), device=scaled.device)
    kth = torch.where(use_k[rows], sorted_x.gather(1, (k - 1)[:, None])[:, 0], no_cut)
    # The nucleus of the top-k survivors (a row without top-k masks nothing here).
    probs = torch.softmax(sorted_x.masked_fill(sorted_x < kth[:, None], float("-inf")), dim=-1)
    # Keep token i while the mass before it is below top_p: the nucleus, always >= 1 token.
    before = torch.cumsum(probs, dim=-1) - probs
    n_keep = (before < top_p[rows, None]).sum(-1).clamp_min(1)
    pth = torch.where(use_p[rows], sorted_x.gather(1, (n_keep - 1)[:, None])[:, 0], no_cut)
    thr[rows] = torch.maximum(kth, pth)
    return thr


def _scaled(logits, temperature):
    t = temperature.float()
    return logits.float() / torch.where(t > 0, t, torch.ones_like(t))[:, None]


def _noise_at(seeds, positions, index):
    """The Gumbel noise of each row's tokens `index` [B, n] (only those are computed)."""
    seeds = seeds.long()
    lo, hi = seeds & M32, (seeds >> 32) & M32
    pos = (positions.long() + 0x9E3779B9) & M32
    key = _fmix32(lo ^ _fmix32(hi ^ _fmix32(pos)))
    bits = _fmix32(key[:, None] ^ ((index.long() * 0x27D4EB2F) & M32))
    u = ((bits >> 9).float() + 0.5) * (1.0 / 8388608.0)
    return -torch.log(-torch.log(u))


def _top_k_candidates(scaled, top_k, top_p):
    """When every row has a top-k, only its k best tokens can win. -> (values, token ids, kept):
    [B, max k] each, values sorted descending; `kept` marks the top-k-then-top-p survivors."""
    vals, idx = scaled.topk(int(top_k.max()), dim=-1)                  # sorted, descending
    rank = torch.arange(vals.shape[1], device=vals.device)[None]
    keep = rank < top_k[:, None].long()
    probs = torch.softmax(vals.masked_fill(~keep, float("-inf")), dim=-1)
    before = torch.cumsum(probs, dim=-1) - probs
    keep &= (before < top_p[:, None]) | (rank == 0)
    return vals, idx, keep


def _sample_top_k_ref(scaled, temperature, top_k, top_p, seeds, positions):
    """Noise for the top-k candidates alone (the CPU path's cost drops from O(V log V) to
    O(V + k log k) per row). Same tokens as the full path, except that the full path also keeps
    ties with the k-th."""
    vals, idx, keep = _top_k_candidates(scaled, top_k, top_p)
    greedy = (temperature <= 0)[:, None]
    score = torch.where(greedy, vals, vals + _noise_at(seeds, positions, idx))
    best = score.masked_fill(~keep, float("-inf")).argmax(-1)
    return idx.gather(1, best[:, None])[:, 0]


def sample_ref(logits, temperature, top_k, top_p, seeds, positions):
    scaled = _scaled(logits, temperature)
    if scaled.shape[0] and bool(((top_k > 0) & (top_k < scaled.shape[1])).all()):
        return _sample_top_k_ref(scaled, temperature, top_k, top_p, seeds, positions)
    return _sample_full_ref(scaled, temperature, top_k, top_p, seeds, positions)


def _sample_full_ref(scaled, temperature, top_k, top_p, seeds, positions):
    logits = scaled
    thr = _thresholds(scaled, top_k, top_p)
    noise = gumbel_noise_ref(seeds, positions, logits.shape[1])
    greedy = (temperature <= 0)[:, None]
    score = torch.where(greedy, scaled, scaled + noise)
    score = score.masked_fill(scaled < thr[:, None], float("-inf"))
    return score.argmax(-1)


if triton is not None:
    @triton.jit
    def _fmix32_tl(x):
        x = x ^ (x >> 16)
        x = x * 0x85EBCA6B
        x = x ^ (x >> 13)
        x = x * 0xC2B2AE35
        return x ^ (x >> 16)

    @triton.jit
    def _gumbel_argmax_kernel(
        logits_ptr,              # [B, V]
        temp_ptr, thr_ptr,       # [B] fp32: temperature (0 = greedy), lowest allowed scaled logit
        seed_ptr, pos_ptr,       # [B] int64
        out_ptr,                 # [B] int64
        V, stride_l,
        BLOCK_V: tl.constexpr,
    ):
        # grid: (B,): one pass over the row keeps the best (score, index) per lane.
        row = tl.program_id(0).to(tl.int64)
        t = tl.load(temp_ptr + row)
        greedy = t <= 0
        t = tl.where(greedy, 1.0, t)
        thr = tl.load(thr_ptr + row)
        seed = tl.load(seed_ptr + row)
        pos = tl.load(pos_ptr + row)
        lo = (seed & 0xFFFFFFFF).to(tl.uint32)
        hi = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
        p = ((pos + 0x9E3779B9) & 0xFFFFFFFF).to(tl.uint32)
        key = _fmix32_tl(lo ^ _fmix32_tl(hi ^ _fmix32_tl(p)))
        best = tl.full([BLOCK_V], float("-inf"), tl.float32)
        best_i = tl.zeros([BLOCK_V], tl.int64)
        for v0 in range(0, V, BLOCK_V):
            v = v0 + tl.arange(0, BLOCK_V)
            mask = v < V
            x = tl.load(logits_ptr + row * stride_l + v, mask=mask, other=float("-inf")).to(tl.float32)
            x = tl.math.div_rn(x, t)      # IEEE division, as the reference's logits / T
            bits = _fmix32_tl(key ^ (v.to(tl.uint32) * 0x27D4EB2F))
            u = ((bits >> 9).to(tl.float32) + 0.5) * (1.0 / 8388608.0)
            g = -tl.log(-tl.log(u))
            score = tl.where(greedy, x, x + g)
            score = tl.where(mask & (x >= thr), score, float("-inf"))
            take = score > best
            best = tl.where(take, score, best)
            best_i = tl.where(take, v.to(tl.int64), best_i)
        # Ties between lanes go to the lowest index, as torch.argmax does.
        top = tl.max(best, 0)
        cand = tl.where(best == top, best_i, V)
        tl.store(out_ptr + row, tl.min(cand, 0))


def _check(logits, temperature, top_k, top_p, seeds, positions):
    if logits.dim() != 2 or not logits.is_floating_point():
        raise TypeError(f"sample: logits must be a floating-point [B, V] tensor; got "
                        f"{logits.dtype} {tuple(logits.shape)}")
    b = logits.shape[0]
    for name, t, kinds in (("temperature", temperature, (torch.float32,)),
                           ("top_k", top_k, (torch.int32, torch.int64)),
                           ("top_p", top_p, (torch.float32,)),
                           ("seeds", seeds, (torch.int64,)),
                           ("positions", positions, (torch.int64, torch.int32))):
        if t.shape != (b,) or t.dtype not in kinds:
            raise TypeError(f"sample: {name} must be {kinds[0]} [{b}]; got {t.dtype} {tuple(t.shape)}")
    if logits.stride(1) != 1:
        raise ValueError("sample: logits need a contiguous last dimension")


def sample_triton(logits, temperature, top_k, top_p, seeds, positions):
    _check(logits, temperature, top_k, top_p, seeds, positions)
    b, v = logits.shape
    thr = _thresholds(_scaled(logits, temperature), top_k, top_p)
    out = torch.empty(b, dtype=torch.int64, device=logits.device)
    if b == 0:
        return out
    _gumbel_argmax_kernel[(b,)](logits, temperature, thr, seeds, positions.long(), out, v,
                                logits.stride(0), BLOCK_V=1024)
    return out


def sample(logits, temperature, top_k, top_p, seeds, positions):
    if logits.is_cuda and triton is not None:
        return sample_triton(logits, temperature, top_k, top_p, seeds, positions)
    _check(logits, temperature, top_k, top_p, seeds, positions)
    return sample_ref(logits, temperature, top_k, top_p, seeds, positions)
