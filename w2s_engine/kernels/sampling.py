"""Sampling by Gumbel-max with counter-based noise: temperature, top-k, top-p, greedy.

token = argmax over allowed v of logits[v] / T + g(seed, position, v), g = -log(-log(u)), where
u comes from an integer hash of (seed, position, v). The noise depends on nothing but the
row's own seed and position, so a seeded beam draws the same token whatever batch it is in;
the Triton kernel and the PyTorch reference compute the same hash bit for bit.

The hash (all arithmetic mod 2^32): fmix32 is murmur3's finaliser;
    key = fmix32(seed_lo ^ fmix32(seed_hi ^ fmix32(position_lo + 0x9E3779B9)))
    bits = fmix32(key ^ (v * 0x27D4EB2F mod 2^32))
    u = ((bits >> 9) + 0.5) / 2^23            in (0, 1), exact in fp32 (never 1.0)
Allowed tokens, in transformers' order (TopKLogitsWarper, TopPLogitsWarper, MinPLogitsWarper):
the logits >= the k-th largest of logits / T, then the top-p nucleus of what top-k kept,
renormalised (the smallest set of most likely tokens whose mass reaches top_p; never empty),
then those whose probability is at least min_p times the largest (x >= max + log(min_p) for
x = logits / T; log(min_p) comes in computed once, so both paths add the same fp32 value).
Each row's cut is one threshold: the lowest allowed logit / T.

CPU (the reference): torch sort / topk find the threshold (only the k best tokens get noise
when every row has a top-k). GPU (Triton): no sort. Each row's vocabulary is cut into slices,
a program each (_sample_slices_kernel), so that a few rows (one request's beams) still fill
the GPU: a row with no cut draws its slice's Gumbel-max; a top-k row (or min-p alone) gathers
its slice's few tokens that can be allowed (each slice keeps at least its own k largest,
which include every global top-k token it holds). One program per row then ends the row
(_sample_kernel): the slices' best token; or, from the gathered tokens held in registers, a
radix select finds the k-th largest (by count) and then the top-p cutoff (by mass) exactly;
a top-p row without top-k (or a slice with too many candidates) takes passes over its whole
row instead: the first finds its max, softmax mass and a lower bound on the threshold (tight
where the lanes' maxima alone hold the nucleus; else one more pass weighs 16 levels), the
second packs the sort keys and ids of the tokens above the bound (the candidates), among whose
keys the selects find the threshold the same way, and the Gumbel-max of the tokens it allows
is drawn from the candidates (or, when they fill more than half the row, from a third pass
over it). The kernel's threshold is the reference's value bit for bit, except where the
top-p mass lands within rounding of top_p (sums run in another order). Scratch memory: one
int32 per logit. With an exact tie at the k-th logit both keep every tied token
(transformers' rule): the CPU's top-k fast path gives way to the full path for such a batch.
Equal scores (greedy rows' ties) go to the lowest token id, as argmax. A NaN logit (a model
that overflows in float16) is read as -inf by both paths, so it is never drawn and the CPU and
the GPU draw alike; a row with no finite logit draws token 0 on both.
"""

import torch

from w2s_engine.kernels._common import (
    configs,
    lse_reduce,
    online_lse_step,
    quick_bench,
    sm_count,
)

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


def _thresholds(scaled, top_k, top_p, log_min_p=None):
    """Per-row lowest allowed scaled logit ([B] fp32, -inf where nothing is cut).

    transformers' order (TopKLogitsWarper, TopPLogitsWarper, MinPLogitsWarper): top-k keeps the
    logits >= the k-th largest; top-p then takes the nucleus of what top-k kept, renormalised;
    min-p keeps those >= the largest + log(min_p) (a ratio of probabilities, the same before
    and after renormalising)."""
    b, v = scaled.shape
    thr = torch.full((b,), float("-inf"), dtype=torch.float32, device=scaled.device)
    if log_min_p is not None and b and v:
        thr = torch.maximum(thr, scaled.max(-1).values + log_min_p)
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
    thr[rows] = torch.maximum(thr[rows], torch.maximum(kth, pth))
    return thr


def _scaled(logits, temperature):
    """logits / T in fp32, a NaN logit read as -inf (the kernel's _no_nan)."""
    t = temperature.float()
    x = logits.float()
    x = x.masked_fill(x.isnan(), float("-inf"))
    return x / torch.where(t > 0, t, torch.ones_like(t))[:, None]


def _noise_at(seeds, positions, index):
    """The Gumbel noise of each row's tokens `index` [B, n] (only those are computed)."""
    seeds = seeds.long()
    lo, hi = seeds & M32, (seeds >> 32) & M32
    pos = (positions.long() + 0x9E3779B9) & M32
    key = _fmix32(lo ^ _fmix32(hi ^ _fmix32(pos)))
    bits = _fmix32(key[:, None] ^ ((index.long() * 0x27D4EB2F) & M32))
    u = ((bits >> 9).float() + 0.5) * (1.0 / 8388608.0)
    return -torch.log(-torch.log(u))


def _top_k_candidates(scaled, top_k, top_p, log_min_p=None):
    """When every row has a top-k, only its k best tokens can win. -> (values, token ids, kept):
    [B, max k] each, values sorted descending; `kept` marks the top-k, top-p, min-p survivors."""
    vals, idx = scaled.topk(int(top_k.max()), dim=-1)                  # sorted, descending
    rank = torch.arange(vals.shape[1], device=vals.device)[None]
    keep = rank < top_k[:, None].long()
    probs = torch.softmax(vals.masked_fill(~keep, float("-inf")), dim=-1)
    before = torch.cumsum(probs, dim=-1) - probs
    # The nucleus is a threshold, as the full path's and the kernel's: every token tied with
    # its last one is kept (topk ranks equal logits in an order of its own; a cut by rank
    # kept one of two tied best tokens, which then depended on the batch, and a greedy row
    # could take the higher id).
    # top_p 1 is off, as there (a mass that rounds to 1 before the k-th token cut the rest).
    n_keep = (before < top_p[:, None]).sum(-1).clamp_min(1)
    keep &= (vals >= vals.gather(1, (n_keep - 1)[:, None])) | (top_p >= 1.0)[:, None]
    if log_min_p is not None:
        keep &= vals >= vals[:, :1] + log_min_p[:, None]
    return vals, idx, keep


def _sample_top_k_ref(scaled, temperature, top_k, top_p, seeds, positions, log_min_p=None):
    """Noise for the top-k candidates alone (the CPU path's cost drops from O(V log V) to
    O(V + k log k) per row): the full path's tokens, or None where a row's k-th largest logit
    ties one outside its k best (transformers keeps every tied token; topk keeps k of them,
    in an order of its own), for the full path to draw."""
    vals, idx, keep = _top_k_candidates(scaled, top_k, top_p, log_min_p)
    kth = vals.gather(1, (top_k.long() - 1)[:, None])
    if not bool(((scaled >= kth).sum(-1) == top_k).all()):
        return None
    greedy = (temperature <= 0)[:, None]
    score = torch.where(greedy, vals, vals + _noise_at(seeds, positions, idx))
    score = score.masked_fill(~keep, float("-inf"))
    # The lowest id among equal best scores, as argmax over the whole row takes (topk's order
    # among equal logits is its own).
    best = score.max(-1, keepdim=True).values
    return idx.masked_fill(score != best, scaled.shape[1]).min(-1).values


def log_min_p_of(min_p) -> torch.Tensor | None:
    """[B] fp32 log(min_p) (-inf where off), computed once for both paths; None: all off."""
    return None if min_p is None else torch.log(min_p.float())


def sample_ref(logits, temperature, top_k, top_p, seeds, positions, min_p=None):
    scaled = _scaled(logits, temperature)
    log_min_p = log_min_p_of(min_p)
    if scaled.shape[0] and bool(((top_k > 0) & (top_k < scaled.shape[1])).all()):
        tokens = _sample_top_k_ref(scaled, temperature, top_k, top_p, seeds, positions,
                                   log_min_p)
        if tokens is not None:
            return tokens
    return _sample_full_ref(scaled, temperature, top_k, top_p, seeds, positions, log_min_p)


def _sample_full_ref(scaled, temperature, top_k, top_p, seeds, positions, log_min_p=None):
    logits = scaled
    thr = _thresholds(scaled, top_k, top_p, log_min_p)
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
    def _no_nan(x):
        """A NaN logit (a model that overflows in float16) read as -inf: never drawn, never
        counted in a cut, on both paths (the reference's _scaled)."""
        return tl.where(x == x, x, float("-inf"))

    @triton.jit
    def _sort_key(x):
        """fp32 -> uint32 whose unsigned order is the float order (-inf lowest, no NaN)."""
        bits = x.to(tl.uint32, bitcast=True)
        return tl.where((bits >> 31) != 0, ~bits, bits | 0x80000000)

    @triton.jit
    def _key_value(key):
        """The inverse of _sort_key."""
        bits = tl.where((key >> 31) != 0, key ^ 0x80000000, ~key)
        return bits.to(tl.float32, bitcast=True)

    @triton.jit
    def _digit_terms(key, w, prefix, SHIFT: tl.constexpr):
        """[N, 16]: each key's weight w where it is >= prefix + j << SHIFT (digit j), else 0."""
        j = tl.arange(0, 16).to(tl.uint32)
        pivot = prefix + (j << SHIFT)
        return tl.where(key[:, None] >= pivot[None, :], w[:, None], 0.0)

    @triton.jit
    def _digit_weights(key, w, prefix, SHIFT: tl.constexpr):
        """[16]: total weight w of the keys >= prefix + j << SHIFT, for the digits j = 0..15."""
        return tl.sum(_digit_terms(key, w, prefix, SHIFT), 0)

    @triton.jit
    def _next_prefix(weights, prefix, target, SHIFT: tl.constexpr):
        """Fix the digit at SHIFT: the largest j whose pivot still has weight >= target."""
        j = tl.arange(0, 16).to(tl.uint32)
        return prefix + (tl.max(tl.where(weights >= target, j, tl.zeros_like(j)), 0) << SHIFT)

    @triton.jit
    def _select_in_block(key, w, target):
        """Largest K with sum(w[key >= K]) >= target, over a block in registers -> (K, found).
        Eight rounds fix K four bits at a time (a radix select, no sort)."""
        prefix = tl.full((), 0, tl.uint32)
        for r in tl.static_range(8):
            prefix = _next_prefix(_digit_weights(key, w, prefix, 28 - 4 * r), prefix, target,
                                  28 - 4 * r)
        return prefix, tl.sum(w, 0) >= target

    @triton.jit
    def _candidate_digits(crow, n, m, floor, prefix, SHIFT: tl.constexpr,
                          MASS: tl.constexpr, BLOCK_C: tl.constexpr):
        """_digit_weights over a row's n candidates (their sort keys at crow, contiguous: no
        gather through token ids), weight 1 (a count) or exp(x - m) (a mass); candidates with
        a key below `floor` weigh nothing. The [BLOCK_C, 16] sums stay in registers across
        the steps and are reduced once (a reduction per step is a shared-memory round trip),
        and not at all where there are no candidates (most rows: the selects are called for
        every row, their counts 0 where a row does not need them)."""
        acc = tl.zeros([BLOCK_C, 16], tl.float32)
        for c0 in range(0, n, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            cmask = c < n
            key = tl.load(crow + c, mask=cmask, other=0).to(tl.uint32, bitcast=True)
            if MASS:
                w = tl.exp(_key_value(key) - m)
            else:
                w = tl.full([BLOCK_C], 1.0, tl.float32)
            w = tl.where(cmask & (key >= floor), w, 0.0)
            acc += _digit_terms(key, w, prefix, SHIFT)
        digits = tl.zeros([16], tl.float32)
        if n > 0:
            digits = tl.sum(acc, 0)
        return digits

    @triton.jit
    def _select_in_candidates(crow, n, m, floor, target, relative,
                              MASS: tl.constexpr, BLOCK_C: tl.constexpr):
        """Largest K with W(key >= K) >= target over the candidates -> (K, found). With
        `relative`, the target is target x the candidates' total weight (top-p of the top-k
        survivors). Eight passes over the candidates, four bits each."""
        j = tl.arange(0, 16)
        prefix = tl.full((), 0, tl.uint32)
        acc = _candidate_digits(crow, n, m, floor, prefix, 28, MASS, BLOCK_C)
        total = tl.sum(tl.where(j == 0, acc, 0.0), 0)
        target = tl.where(relative, target * total, target)
        prefix = _next_prefix(acc, prefix, target, 28)
        for r in tl.static_range(1, 8):
            acc = _candidate_digits(crow, n, m, floor, prefix, 28 - 4 * r, MASS, BLOCK_C)
            prefix = _next_prefix(acc, prefix, target, 28 - 4 * r)
        return prefix, (total >= target) & (total > 0)

    @triton.jit
    def _row_filters(temp_ptr, top_k_ptr, top_p_ptr, log_min_p_ptr, row, V,
                     HAS_MIN_P: tl.constexpr):
        """A row's sampling switches -> (t, greedy, k, p, use_k, use_p, use_min_p, log_min_p,
        cut_row, fast_row). t is 1 for greedy rows; a greedy row takes the argmax, kept by any
        cut, so it never cuts. fast_row: the row's allowed tokens are among each vocabulary
        slice's local candidates (top-k: the slice's k largest bound them; min-p alone: the
        slice's max + log(min_p) does), so the slices can gather them."""
        t = tl.load(temp_ptr + row)
        greedy = t <= 0
        t = tl.where(greedy, 1.0, t)
        k = tl.load(top_k_ptr + row)
        p = tl.load(top_p_ptr + row)
        use_k = (k > 0) & (k < V) & ~greedy
        use_p = (p < 1.0) & ~greedy
        log_min_p = tl.full((), float("-inf"), tl.float32)
        if HAS_MIN_P:
            log_min_p = tl.load(log_min_p_ptr + row)
        use_min_p = (log_min_p > float("-inf")) & ~greedy
        cut_row = use_k | use_p | use_min_p
        fast_row = use_k | (use_min_p & ~use_p)
        return t, greedy, k, p, use_k, use_p, use_min_p, log_min_p, cut_row, fast_row

    @triton.jit
    def _row_key(seed_ptr, pos_ptr, row):
        """The row's noise key: fmix32(seed_lo ^ fmix32(seed_hi ^ fmix32(position_lo + c)))."""
        seed = tl.load(seed_ptr + row)
        pos = tl.load(pos_ptr + row)
        lo = (seed & 0xFFFFFFFF).to(tl.uint32)
        hi = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
        return _fmix32_tl(lo ^ _fmix32_tl(hi ^ _fmix32_tl(
            ((pos + 0x9E3779B9) & 0xFFFFFFFF).to(tl.uint32))))

    @triton.jit
    def _gumbel_score(x, v, key, greedy):
        """x + Gumbel noise of token ids v (x itself for a greedy row)."""
        bits = _fmix32_tl(key ^ (v.to(tl.uint32) * 0x27D4EB2F))
        u = ((bits >> 9).to(tl.float32) + 0.5) * (1.0 / 8388608.0)
        return tl.where(greedy, x, x - tl.log(-tl.log(u)))

    @triton.jit
    def _gumbel_step(x, v, allowed, key, greedy, best, best_i):
        """One step of a Gumbel-max: the lanes' best (score, token) so far, updated with the
        tokens v (scaled logits x) that are allowed; a tie keeps the earlier, lower id."""
        score = tl.where(allowed, _gumbel_score(x, v, key, greedy), float("-inf"))
        better = score > best
        return tl.where(better, score, best), tl.where(better, v.to(tl.int64), best_i)

    @triton.jit
    def _gumbel_pick(best, best_i, V):
        """The lanes' best -> (its score, its token: the lowest id among equal scores)."""
        top = tl.max(best, 0)
        return top, tl.min(tl.where(best == top, best_i, V), 0)

    @triton.jit
    def _gumbel_best(lrow, key, t, greedy, thr, start, end, V, BLOCK_V: tl.constexpr):
        """Gumbel-max over token ids [start, end) -> (best score, its token; -inf and 0 when
        nothing there is allowed); a token is allowed when its logits / T >= thr. Ties go to
        the lowest id, as torch.argmax's."""
        best = tl.full([BLOCK_V], float("-inf"), tl.float32)
        best_i = tl.zeros([BLOCK_V], tl.int64)
        for v0 in range(start, end, BLOCK_V):
            v = v0 + tl.arange(0, BLOCK_V)
            mask = v < end
            x = _no_nan(tl.load(lrow + v, mask=mask, other=float("-inf")).to(tl.float32))
            x = tl.math.div_rn(x, t)                # IEEE division, as the reference's logits / T
            best, best_i = _gumbel_step(x, v, mask & (x >= thr), key, greedy, best, best_i)
        return _gumbel_pick(best, best_i, V)

    @triton.jit
    def _gumbel_best_packed(crow, key, greedy, thr, n, V, BLOCK_C: tl.constexpr):
        """_gumbel_best over n packed candidates: their sort keys at crow[0, n) and their
        token ids, in the same (ascending) order, at crow[V - 1], crow[V - 2], ... Both read
        in order, and a candidate's logits / T is its key's value: no pass over the row."""
        best = tl.full([BLOCK_C], float("-inf"), tl.float32)
        best_i = tl.zeros([BLOCK_C], tl.int64)
        for c0 in range(0, n, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            mask = c < n
            x = _key_value(tl.load(crow + c, mask=mask, other=0).to(tl.uint32, bitcast=True))
            v = tl.load(crow + (V - 1 - c), mask=mask, other=0)
            best, best_i = _gumbel_step(x, v, mask & (x >= thr), key, greedy, best, best_i)
        return _gumbel_pick(best, best_i, V)

    @triton.autotune(
        configs=configs(
            [triton.Config({"BLOCK_V": 1024, "BLOCK_L": 256}, num_warps=4),
             triton.Config({"BLOCK_V": 2048, "BLOCK_L": 256}, num_warps=8),
             triton.Config({"BLOCK_V": 4096, "BLOCK_L": 256}, num_warps=8)],
            interpret=triton.Config({"BLOCK_V": 1024, "BLOCK_L": 256})),
        key=["slice_size"], do_bench=quick_bench)
    @triton.jit(do_not_specialize=["slice_size"])
    def _sample_slices_kernel(
        logits_ptr,              # [B, V] fp32 / fp16 / bf16
        temp_ptr, top_p_ptr,     # [B] fp32: temperature (0 = greedy), top-p (1 = off)
        top_k_ptr,               # [B] int: top-k (0 or >= V = off)
        log_min_p_ptr,           # [B] fp32: log(min_p) (-inf = off)
        seed_ptr, pos_ptr,       # [B] int64
        cand_ptr,                # [B, V] int32 out: slice s's candidates from s * slice_size
        part_x_ptr,              # [B, S] fp32 out: the slice's best score, or its max
        part_n_ptr,              # [B, S] int32 out: its best token, or its candidate count
        V, slice_size, stride_l, stride_c,
        BLOCK_V: tl.constexpr,   # lanes of the passes
        BLOCK_L: tl.constexpr,   # groups of lanes whose maxima bound the slice's k-th largest
        HAS_MIN_P: tl.constexpr,
    ):
        # grid: (B, S). Program (row, s) reads only vocabulary slice s, so a few rows still
        # give every SM a program:
        #  - a row with no cut: Gumbel-max over the slice -> (best score, its token);
        #  - a fast row (top-k, or min-p alone): the slice's max m_s (x = logits / T), and the
        #    ids of its tokens >= a local bound, in order, to cand: the k-th largest of the
        #    slice's BLOCK_L group maxima (the global k-th largest is >= the slice's, so every
        #    top-k token of the slice is kept), or m_s + log(min_p) -> (m_s, count);
        #  - any other row (top-p without top-k) is left to _sample_kernel: (-inf, -1).
        row = tl.program_id(0).to(tl.int64)
        s = tl.program_id(1)
        t, greedy, k, p, use_k, use_p, use_min_p, log_min_p, cut_row, fast_row = _row_filters(
            temp_ptr, top_k_ptr, top_p_ptr, log_min_p_ptr, row, V, HAS_MIN_P)
        lrow = logits_ptr + row * stride_l
        lo = s * slice_size
        hi = tl.minimum(V, lo + slice_size)
        crow = cand_ptr + row * stride_c + lo       # this slice's part of the row's scratch
        out = row * tl.num_programs(1) + s

        top, token = _gumbel_best(lrow, _row_key(seed_ptr, pos_ptr, row), t, greedy,
                                  float("-inf"), lo, tl.where(cut_row, lo, hi), V, BLOCK_V)

        fast_hi = tl.where(fast_row, hi, lo)        # the passes below run only for fast rows
        lane_max = tl.full([BLOCK_V], float("-inf"), tl.float32)
        for v0 in range(lo, fast_hi, BLOCK_V):
            v = v0 + tl.arange(0, BLOCK_V)
            x = _no_nan(tl.load(lrow + v, mask=v < hi, other=float("-inf")).to(tl.float32))
            lane_max = tl.maximum(lane_max, tl.math.div_rn(x, t))
        m_s = tl.max(lane_max, 0)
        group_max = tl.max(tl.reshape(lane_max, [BLOCK_L, BLOCK_V // BLOCK_L]), 1)
        bound_k, found = _select_in_block(_sort_key(group_max),
                                          tl.full([BLOCK_L], 1.0, tl.float32), k.to(tl.float32))
        bound = tl.where(use_k, tl.where(found, bound_k, 0), _sort_key(m_s + log_min_p))
        n = 0
        for v0 in range(lo, fast_hi, BLOCK_V):
            v = v0 + tl.arange(0, BLOCK_V)
            x = _no_nan(tl.load(lrow + v, mask=v < hi, other=float("-inf")).to(tl.float32))
            take = (v < hi) & (_sort_key(tl.math.div_rn(x, t)) >= bound)
            at = n + tl.cumsum(take.to(tl.int32), 0) - 1
            tl.store(crow + at, v, mask=take)
            n += tl.sum(take.to(tl.int32), 0)

        tl.store(part_x_ptr + out, tl.where(cut_row, tl.where(fast_row, m_s, float("-inf")),
                                            top))
        tl.store(part_n_ptr + out, tl.where(cut_row, tl.where(fast_row, n, -1),
                                            token.to(tl.int32)))

    @triton.autotune(
        configs=configs(
            # (4 warps spill the fast path's [SLICE_SLOTS * SLICE_CANDIDATES, 16] digit counts
            # on sm_90 at 8 slots: 5 KB; bench/kernel_compile.py.)
            [triton.Config({"BLOCK_V": 2048, "BLOCK_L": 256, "BLOCK_C": 256}, num_warps=8),
             triton.Config({"BLOCK_V": 4096, "BLOCK_L": 256, "BLOCK_C": 512}, num_warps=8),
             # A few rows (one request's beams) leave most SMs idle, each program's passes
             # over the row a chain of loads: more warps in flight per row may pay there.
             # (8,192 lanes on 16 warps spill on sm_90: bench/kernel_compile.py.)
             triton.Config({"BLOCK_V": 4096, "BLOCK_L": 256, "BLOCK_C": 512}, num_warps=16)],
            interpret=triton.Config({"BLOCK_V": 1024, "BLOCK_L": 256, "BLOCK_C": 256})),
        key=["V", "FEW_ROWS", "SLICE_SLOTS"], do_bench=quick_bench)
    @triton.jit(do_not_specialize=["slices", "slice_size"])
    def _sample_kernel(
        logits_ptr,              # [B, V] fp32 / fp16 / bf16
        temp_ptr, top_p_ptr,     # [B] fp32: temperature (0 = greedy), top-p (1 = off)
        top_k_ptr,               # [B] int: top-k (0 or >= V = off)
        log_min_p_ptr,           # [B] fp32: log(min_p) (-inf = off)
        seed_ptr, pos_ptr,       # [B] int64
        cand_ptr,                # [B, V] int32 scratch: the slices' candidate token ids, or
                                 # the whole-row path's candidate sort keys (bitcast)
        part_x_ptr, part_n_ptr,  # [B, slices] fp32, int32: _sample_slices_kernel's results
        thr_ptr,                 # [B] fp32 out: the lowest allowed scaled logit (-inf: no cut)
        out_ptr,                 # [B] int64 out: the drawn token
        V, stride_l, stride_c,
        slices, slice_size,      # the vocabulary slices of _sample_slices_kernel
        BLOCK_V: tl.constexpr,   # lanes of the full-row passes
        BLOCK_L: tl.constexpr,   # groups of lanes whose maxima bound the k-th largest
        BLOCK_C: tl.constexpr,   # candidates per step of the selects
        SLICE_SLOTS: tl.constexpr,  # a power of 2 >= slices: the fast path's slots
        SLICE_CANDIDATES: tl.constexpr,  # a slice's candidates the fast path holds
        HAS_MIN_P: tl.constexpr,  # some row has a min_p (else log_min_p_ptr is not read)
        FEW_ROWS: tl.constexpr,   # fewer rows than SMs / 4 (an autotuning key, not read)
    ):
        # grid: (B,), after _sample_slices_kernel. Per row, no sort; one of three paths:
        #  - no cut: the slices' best (score, token) pairs -> the best, ties to the lowest id;
        #  - fast (top-k, or min-p alone), when every slice kept at most SLICE_CANDIDATES:
        #    all the slices' candidates in registers, m = the max of the slices' maxima; a
        #    radix select over them finds the k-th largest (by count), then the top-p cutoff
        #    of the top-k survivors (by mass, renormalised as transformers does); Gumbel-max
        #    over the allowed ones. No pass over the row;
        #  - otherwise the whole row here:
        #    1. one pass: row max m, Z = sum exp(x - m), lane maxima (x = logits / T);
        #    2. a lower bound L on the final threshold: the k-th largest of BLOCK_L group
        #       maxima (k distinct tokens are >= it), or for top-p alone
        #       m + log((1 - p) Z / V) - 1 (tokens below it together hold less than 1 - p of
        #       the mass), raised to where the BLOCK_V lane maxima alone reach p Z when they
        #       do, or else by one more pass to the lowest of 16 levels that holds p Z;
        #    3. one pass: the sort keys of the tokens >= L, packed into cand (the
        #       candidates: a few hundred to some 10k);
        #    4. radix selects over the candidates: the k-th largest, then the top-p cutoff;
        #    5. Gumbel-max over the candidates >= the cutoff (their keys and ids packed), or
        #       one pass over the row when there were too many to keep their ids.
        row = tl.program_id(0).to(tl.int64)
        t, greedy, k, p, use_k, use_p, use_min_p, log_min_p, cut_row, fast_row = _row_filters(
            temp_ptr, top_k_ptr, top_p_ptr, log_min_p_ptr, row, V, HAS_MIN_P)
        lrow = logits_ptr + row * stride_l
        crow = cand_ptr + row * stride_c
        key = _row_key(seed_ptr, pos_ptr, row)

        # The slices' results.
        s = tl.arange(0, SLICE_SLOTS)
        smask = s < slices
        part_x = tl.load(part_x_ptr + row * slices + s, mask=smask, other=float("-inf"))
        part_n = tl.load(part_n_ptr + row * slices + s, mask=smask, other=0)
        top = tl.max(part_x, 0)
        token_uncut = tl.min(tl.where(smask & (part_x == top), part_n, V), 0)

        # Fast path: the slices' candidates as one [SLICE_SLOTS * SLICE_CANDIDATES] block.
        fast = fast_row & (tl.max(part_n, 0) <= SLICE_CANDIDATES)
        c = tl.arange(0, SLICE_CANDIDATES)
        held = smask[:, None] & (c[None, :] < tl.where(fast, part_n, 0)[:, None])
        ids = tl.load(crow + s[:, None] * slice_size + c[None, :], mask=held, other=0)
        xs = _no_nan(tl.load(lrow + ids, mask=held, other=float("-inf")).to(tl.float32))
        ids = tl.reshape(ids, [SLICE_SLOTS * SLICE_CANDIDATES])
        held = tl.reshape(held, [SLICE_SLOTS * SLICE_CANDIDATES])
        xs = tl.math.div_rn(tl.reshape(xs, [SLICE_SLOTS * SLICE_CANDIDATES]), t)
        keys = tl.where(held, _sort_key(xs), 0)
        kth, found_k = _select_in_block(keys, tl.where(held, 1.0, 0.0), k.to(tl.float32))
        floor = tl.where(use_k & found_k, kth, 0)
        mass = tl.where(held & (keys >= floor), tl.exp(xs - top), 0.0)
        total = tl.sum(mass, 0)
        cut, found_p = _select_in_block(keys, mass, p * total)
        cut = tl.where(use_p & found_p & (total > 0), cut, floor)
        thr_fast = tl.where(cut > 0, _key_value(cut), float("-inf"))
        thr_fast = tl.where(use_min_p, tl.maximum(thr_fast, top + log_min_p), thr_fast)
        score = tl.where(held & (xs >= thr_fast), _gumbel_score(xs, ids, key, greedy),
                         float("-inf"))
        best = tl.max(score, 0)
        token_fast = tl.min(tl.where(score == best, ids.to(tl.int64), V), 0)

        # The whole row.
        full = cut_row & ~fast
        v_cut = tl.where(full, V, 0)                # the passes below run only for such rows
        lane_max = tl.full([BLOCK_V], float("-inf"), tl.float32)
        lane_sum = tl.zeros([BLOCK_V], tl.float32)  # sum of exp(x - lane_max)
        for v0 in range(0, v_cut, BLOCK_V):
            v = v0 + tl.arange(0, BLOCK_V)
            x = _no_nan(tl.load(lrow + v, mask=v < V, other=float("-inf")).to(tl.float32))
            lane_max, lane_sum = online_lse_step(lane_max, lane_sum, tl.math.div_rn(x, t))
        m, z = lse_reduce(lane_max, lane_sum)
        group_max = tl.max(tl.reshape(lane_max, [BLOCK_L, BLOCK_V // BLOCK_L]), 1)
        bound_k, found = _select_in_block(_sort_key(group_max), tl.full([BLOCK_L], 1.0, tl.float32),
                                          k.to(tl.float32))
        bound_k = tl.where(found, bound_k, 0)
        # top-p alone: a lower bound on the nucleus's threshold, as tight as can be had
        # cheaply (the selects below make eight passes over every token at or above it).
        # Loose: the tokens below lo_x together hold less than 1 - p of the mass.
        lo_x = m + tl.log((1.0 - p) * z / V) - 1.0
        bound_p = _sort_key(lo_x)
        target = p * z * 1.001     # a margin of 1e-3 of the mass for the sums' rounding
        # (Neither raise can succeed where the target exceeds the whole mass: p >= 0.999.)
        p_alone = full & use_p & ~use_k & (target < z)
        # Tight where the lanes' best tokens alone hold the nucleus's mass (a peaked
        # distribution, a trained model's usual one): the tokens >= e hold at least the mass
        # of the lane maxima >= e, so the nucleus lies at or above the largest e where those
        # reach p Z. (Gaussian logits x 3 over 128k at T 0.7: 400 candidates for a nucleus of
        # 325, where the loose bound leaves 12.9k: bench/top_p_candidates.py.) A select over
        # the BLOCK_V lane maxima, their keys parked in the scratch the candidates overwrite.
        lanes = tl.arange(0, BLOCK_V)
        tl.store(crow + lanes, _sort_key(lane_max).to(tl.int32, bitcast=True),
                 mask=lanes < tl.where(p_alone, V, 0))
        tl.debug_barrier()
        tight_p, found_tight = _select_in_candidates(
            crow, tl.where(p_alone, tl.minimum(V, BLOCK_V), 0), m, 0, target, False, True,
            BLOCK_C)
        found_tight = found_tight & (z > 0)
        bound_p = tl.where(found_tight, tl.maximum(bound_p, tight_p), bound_p)
        # Otherwise (a flat distribution: a nucleus of thousands) one pass weighs the mass at
        # or above 16 levels between lo_x and the max, and the lowest level that still holds
        # the nucleus's mass is the bound (the same logits at T 1: 6.9k candidates for a
        # nucleus of 5.7k, where the loose bound leaves 44.7k). Compared as sort keys, as the
        # packing compares (as floats -0.0 would weigh at a level of +0.0, then be left out).
        j = tl.arange(0, 16)
        level = _sort_key(m - (j + 1).to(tl.float32) * ((m - lo_x) / 16.0))
        level_acc = tl.zeros([BLOCK_C, 16], tl.float32)
        n_level = tl.where(p_alone & ~found_tight, V, 0)
        for v0 in range(0, n_level, BLOCK_C):
            v = v0 + tl.arange(0, BLOCK_C)
            x = tl.math.div_rn(_no_nan(tl.load(lrow + v, mask=v < V, other=float("-inf"))
                                       .to(tl.float32)), t)
            level_acc += tl.where(_sort_key(x)[:, None] >= level[None, :],
                                  tl.exp(x - m)[:, None], 0.0)
        level_mass = tl.zeros([16], tl.float32)
        if n_level > 0:
            level_mass = tl.sum(level_acc, 0)
        first = tl.min(tl.where(level_mass >= target, j, 16), 0)   # levels fall with j
        at_level = tl.max(tl.where(j == first, level, 0), 0)
        bound_p = tl.where(p_alone & ~found_tight & (first < 16) & (z > 0),
                           tl.maximum(bound_p, at_level), bound_p)
        bound = tl.where(use_k, bound_k, bound_p)
        tl.debug_barrier()         # the lane maxima's keys are read: the candidates go there

        # The candidates' sort keys, packed: the selects' eight passes then read them in
        # order (a gather through token ids is a chain of dependent loads per step: most of
        # a top-p row's time on an H200 at 111ea9f, with 11k candidates). Their token ids go
        # to the scratch's other end, from crow[V - 1] down, for the final draw, as long as
        # the two cannot meet: candidate a's id lands at V - 1 - a > V / 2 + BLOCK_V for
        # a < ids_room, where only a key written at least one step later can land (the
        # barrier orders the two), and a row with more candidates than that draws over its
        # whole row instead.
        ids_room = V // 2 - BLOCK_V
        n = 0
        for v0 in range(0, v_cut, BLOCK_V):
            v = v0 + tl.arange(0, BLOCK_V)
            x = _no_nan(tl.load(lrow + v, mask=v < V, other=float("-inf")).to(tl.float32))
            keys_v = _sort_key(tl.math.div_rn(x, t))
            take = (v < V) & (keys_v >= bound)
            at = n + tl.cumsum(take.to(tl.int32), 0) - 1
            tl.store(crow + at, keys_v.to(tl.int32, bitcast=True), mask=take)
            tl.store(crow + (V - 1 - at), v, mask=take & (at < ids_room))
            n += tl.sum(take.to(tl.int32), 0)
            tl.debug_barrier()

        kth, found_k = _select_in_candidates(crow, tl.where(use_k, n, 0), m, 0,
                                             k.to(tl.float32), False, False, BLOCK_C)
        floor = tl.where(use_k & found_k, kth, 0)
        cut, found_p = _select_in_candidates(crow, tl.where(use_p, n, 0), m, floor,
                                             tl.where(use_k, p, p * z), use_k, True, BLOCK_C)
        cut = tl.where(use_p & found_p, cut, floor)
        thr = tl.where(cut > 0, _key_value(cut), float("-inf"))
        # min-p: tokens >= the max + log(min_p); with top-k or top-p, all among the candidates.
        thr = tl.where(use_min_p, tl.maximum(thr, m + log_min_p), thr)
        # Gumbel-max over the allowed tokens (ties to the lowest id): with a cut they are all
        # among the candidates (thr >= bound), drawn from their packed keys and ids where
        # every id was kept; otherwise one pass over the row.
        packed = full & (cut > 0) & (n <= ids_room)
        _, token_packed = _gumbel_best_packed(crow, key, greedy, thr, tl.where(packed, n, 0),
                                              V, BLOCK_C)
        _, token_row = _gumbel_best(lrow, key, t, greedy, thr, 0,
                                    tl.where(full & ~packed, V, 0), V, BLOCK_V)
        token_full = tl.where(packed, token_packed, token_row)

        tl.store(thr_ptr + row, tl.where(cut_row, tl.where(fast, thr_fast, thr), float("-inf")))
        tl.store(out_ptr + row, tl.where(cut_row, tl.where(fast, token_fast, token_full),
                                         token_uncut.to(tl.int64)))


def _check(logits, temperature, top_k, top_p, seeds, positions, min_p=None):
    if logits.dim() != 2 or not logits.is_floating_point():
        raise TypeError(f"sample: logits must be a floating-point [B, V] tensor; got "
                        f"{logits.dtype} {tuple(logits.shape)}")
    b = logits.shape[0]
    for name, t, kinds in (("temperature", temperature, (torch.float32,)),
                           ("top_k", top_k, (torch.int32, torch.int64)),
                           ("top_p", top_p, (torch.float32,)),
                           ("seeds", seeds, (torch.int64,)),
                           ("positions", positions, (torch.int64, torch.int32)),
                           *((("min_p", min_p, (torch.float32,)),) if min_p is not None
                             else ())):
        if t.shape != (b,) or t.dtype not in kinds:
            raise TypeError(f"sample: {name} must be {kinds[0]} [{b}]; got {t.dtype} {tuple(t.shape)}")
    if logits.stride(1) != 1:
        raise ValueError("sample: logits need a contiguous last dimension")


# _sample_slices_kernel's vocabulary slices: at most MAX_SLICES a row (the fast path holds
# SLICE_CANDIDATES of each in registers), each a multiple of SLICE_GRANULE (the largest
# BLOCK_V) of at least MIN_SLICE tokens, as many as give every SM about four programs.
MAX_SLICES = 8
SLICE_CANDIDATES = 128
SLICE_GRANULE = 4096
MIN_SLICE = 16384


def vocab_slices(device, rows: int, v: int) -> tuple[int, int]:
    """(slices, slice_size) of a [rows, v] sampling: 16 rows of a 128k vocabulary take 8
    slices of 16k tokens (128 programs, not 16); 528 rows or more take one."""
    cdiv = triton.cdiv
    want = max(1, cdiv(4 * sm_count(device), max(1, rows)))
    slices = max(1, min(MAX_SLICES, want, cdiv(v, MIN_SLICE)))
    size = cdiv(cdiv(v, slices), SLICE_GRANULE) * SLICE_GRANULE
    return cdiv(v, size), size


def sample_triton(logits, temperature, top_k, top_p, seeds, positions, min_p=None,
                  return_thresholds: bool = False, slice_size: int | None = None):
    """The Triton path; with return_thresholds, also each row's lowest allowed scaled logit
    ([B] fp32, -inf where nothing is cut; greedy rows are never cut). slice_size: the
    vocabulary slices' size (by default vocab_slices')."""
    _check(logits, temperature, top_k, top_p, seeds, positions, min_p)
    b, v = logits.shape
    out = torch.empty(b, dtype=torch.int64, device=logits.device)
    thr = torch.empty(b, dtype=torch.float32, device=logits.device)
    if b:
        if slice_size is None:
            slices, slice_size = vocab_slices(logits.device, b, v)
        else:
            slices = triton.cdiv(v, slice_size)
        assert 1 <= slices <= MAX_SLICES, f"{slices} vocabulary slices; at most {MAX_SLICES}"
        # The fast path holds [slots, SLICE_CANDIDATES] candidates in registers; empty slots
        # cost the selects their work and registers all the same, so rows of 4 slices or
        # fewer (132 rows or more of a 128k vocabulary, on 132 SMs) take 4 slots, not 8
        # (256 rows take 3 slices: 8 slots did 8/3 of the work, at 255 registers a thread).
        # Two sizes only: each is a kernel variant, compiled and tuned when a batch bucket
        # first meets it (tests/test_kernel_compile.py counts them).
        slots = 4 if slices <= 4 else MAX_SLICES
        cand = torch.empty(b, v, dtype=torch.int32, device=logits.device)   # <= 2x the logits
        part_x = torch.empty(b, slices, dtype=torch.float32, device=logits.device)
        part_n = torch.empty(b, slices, dtype=torch.int32, device=logits.device)
        log_min_p = log_min_p_of(min_p)
        args = (logits, temperature, top_p, top_k,
                temperature if log_min_p is None else log_min_p, seeds, positions.long(), cand,
                part_x, part_n)
        _sample_slices_kernel[(b, slices)](*args, v, slice_size, logits.stride(0),
                                           cand.stride(0), HAS_MIN_P=log_min_p is not None)
        _sample_kernel[(b,)](*args, thr, out, v, logits.stride(0), cand.stride(0), slices,
                             slice_size, SLICE_SLOTS=slots,
                             SLICE_CANDIDATES=SLICE_CANDIDATES,
                             HAS_MIN_P=log_min_p is not None,
                             FEW_ROWS=b < sm_count(logits.device) // 4)
    return (out, thr) if return_thresholds else out


def adjust_logits(logits, rows, occurrences, presence, frequency, repetition, biased, bias,
                  allowed=None):
    """Penalties on tokens already there (vLLM's rules), then biases (OpenAI's logit_bias),
    then the allowed tokens (vLLM's allowed_token_ids), before temperature. PyTorch, any
    device.

    logits [B, V] fp32 -> a new [B, V] changed at `rows` [R] int64 (the rows that adjust);
    occurrences [3, N] int64: each token occurrence as (row in 0..R-1, token id, 1 if in the
    response else 0 for the prompt); presence, frequency, repetition [R] fp32;
    biased [2, M] int64 (row in 0..R-1, token id) and bias [M] fp32.
    Repetition: a logit > 0 of a token in the prompt or the response is divided by it, one
    < 0 multiplied (transformers' RepetitionPenaltyLogitsProcessor); then
    logit -= frequency * (times in the response) + presence * (in the response at all);
    then logit += bias; allowed [2, A] int64 (row in 0..R-1, token id): a row named there
    keeps those tokens' logits only, the others -inf."""
    R, V = rows.numel(), logits.shape[1]
    sub = logits[rows]
    row, token, in_response = occurrences
    if token.numel():   # (sizes are host metadata: no sync) only biases: no [R, V] counts
        counts = torch.zeros(R, V, dtype=torch.float32, device=logits.device)
        counts.index_put_((row, token), in_response.float(), accumulate=True)
        seen = torch.zeros(R, V, dtype=torch.bool, device=logits.device)
        seen[row, token] = True
        rep = repetition[:, None]
        sub = torch.where(seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
        sub = sub - frequency[:, None] * counts - presence[:, None] * (counts > 0).float()
    if bias.numel():
        sub = sub.index_put((biased[0], biased[1]), bias, accumulate=True)
    if allowed is not None and allowed.numel():
        keep = torch.zeros(R, V, dtype=torch.bool, device=logits.device)
        keep[allowed[0], allowed[1]] = True
        limited = torch.zeros(R, dtype=torch.bool, device=logits.device)
        limited[allowed[0]] = True
        sub = sub.masked_fill(limited[:, None] & ~keep, float("-inf"))
    return logits.index_copy(0, rows, sub)


def sample(logits, temperature, top_k, top_p, seeds, positions, min_p=None):
    """One token per row: logits [B, V]; temperature, top_p, min_p (None: off) [B] fp32;
    top_k [B] int; seeds [B] int64; positions [B] int. Values as SearchParams.validate
    leaves them (top_p in (0, 1]): they are not checked here, which would read them back
    from the device. A NaN logit is read as -inf."""
    if logits.is_cuda and triton is not None:
        return sample_triton(logits, temperature, top_k, top_p, seeds, positions, min_p)
    _check(logits, temperature, top_k, top_p, seeds, positions, min_p)
    return sample_ref(logits, temperature, top_k, top_p, seeds, positions, min_p)
