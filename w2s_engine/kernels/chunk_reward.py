"""Chunk reward: log p_tuned(t) - log p_untuned(t) per chunk token, and its sum per segment.

Three forms:
- chunk_reward: from both models' logits [N, V];
- fused_lmhead_chunk_reward: from both models' final hidden states [N, H] and output layers
  (LMHead: weight [V, H], bias, soft-cap); the logits are formed a vocabulary chunk at a
  time (cuBLAS) and reduced at once, so a 262k vocabulary never costs an [N, V] tensor;
- lmhead_chunk_logprob: one model's log p(t) the same way (when the tuned and untuned models
  score separate streams, under different templates).
All make one pass over the logits with one kernel, _logits_lse_kernel, split across programs
for parallelism (the split count comes from the SM count, so a short chunk still fills the
GPU): each (row, vocabulary split) program keeps an online max and sum of exponentials
(fp32) per model and picks up the target logits when its range holds them. A second small
kernel merges the splits and adds each token's difference (or log-prob) to its segment.
chunk_reward skips the split and the second launch where that wins (small logits, or rows
enough to fill the GPU): one program per row ends its row itself. Nothing reads the device
back except the wrapper's optional bounds check.

Why GEMMs and not one kernel that forms logit tiles in registers: such a kernel (this file's
first form) ran 2.9x slower than cuBLAS logits plus the reduction on an H200 (5.93 ms against
2.06 ms at N 512, V 262,144, H 2048; main at dc77002). Chunking keeps cuBLAS's speed and
bounds the logits held at once to LMHEAD_CHUNK_BYTES per model.
"""

from dataclasses import dataclass

import torch

from w2s_engine.kernels._common import (
    LSE_FLOOR,
    configs,
    lse_reduce,
    online_lse_step_finite,
    quick_bench,
    sm_count,
)

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None


# Vocabulary splits are multiples of the largest BLOCK_V of _logits_lse_kernel, so a split's
# range does not depend on the configuration the autotuner picks.
SPLIT_GRANULE = 4096
# The LM-head form forms each model's logits in vocabulary chunks of at most this many bytes:
# big enough that each chunk is one efficient cuBLAS GEMM, small enough that a 2,048-row
# scoring batch of a 128k vocabulary needs 64 MiB per model instead of 512 MiB.
LMHEAD_CHUNK_BYTES = 64 << 20


def _segment_sums(token_diff, segment_ids, num_segments):
    return torch.zeros(num_segments, dtype=torch.float32, device=token_diff.device).index_add_(
        0, segment_ids.long(), token_diff)


# ---- PyTorch references ------------------------------------------------------------------------

def chunk_reward_ref(logits_tuned, logits_untuned, targets, segment_ids, num_segments):
    t = targets.long()[:, None]
    diff = (logits_tuned.float().log_softmax(-1).gather(1, t)
            - logits_untuned.float().log_softmax(-1).gather(1, t))[:, 0]
    return diff, _segment_sums(diff, segment_ids, num_segments)


@dataclass(frozen=True, eq=False)   # tensors: compared by identity
class LMHead:
    """A model's output layer: logits = softcap(scale * (hidden @ weight.T + bias))."""
    weight: torch.Tensor                    # [V, H]
    bias: torch.Tensor | None = None        # [V] (Phi, GPT-J); most models have none
    softcap: float | None = None            # final_logit_softcapping (Gemma 2)
    scale: float = 1.0                      # Cohere's logit_scale, 1 / Granite's logits_scaling

    def columns(self, hidden: torch.Tensor, lo: int = 0, hi: int | None = None,
                out: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of vocabulary ids [lo, hi) before the soft-cap, scaled, in the weight's dtype
        (into `out`, a contiguous [N, hi - lo] buffer, if given). The scale rides in the GEMM
        (alpha, beta), never a pass of its own."""
        hi = self.weight.shape[0] if hi is None else hi
        w = self.weight[lo:hi]
        if self.scale == 1.0 and out is None:
            return torch.nn.functional.linear(hidden, w, None if self.bias is None
                                              else self.bias[lo:hi])
        if self.scale == 1.0 and self.bias is None:
            return torch.mm(hidden, w.T, out=out)
        # beta 0 ignores the input (no bias: a zero; NaN in it would not propagate either)
        bias = hidden.new_zeros(()) if self.bias is None else self.bias[lo:hi]
        beta = 0.0 if self.bias is None else self.scale
        if out is None:
            return torch.addmm(bias, hidden, w.T, beta=beta, alpha=self.scale)
        return torch.addmm(bias, hidden, w.T, beta=beta, alpha=self.scale, out=out)

    def logits(self, hidden: torch.Tensor, lo: int = 0, hi: int | None = None) -> torch.Tensor:
        """[N, H] -> fp32 [N, hi - lo] (all V by default), soft-capped: what the model's
        forward returns."""
        logits = self.columns(hidden, lo, hi).float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


# The reference (the CPU's path) takes the vocabulary in chunks of about this many bytes of
# fp32 logits [N, width], as the GPU path does: the weight is read once, and each chunk is
# still in cache for its log-sum-exp, done in place in one buffer that every chunk reuses.
# One model's 2,048 rows of a 49k vocabulary, H 576, on the 2-core CPU machine: 563 ms, where
# rows in chunks of 64 (the weight read again per chunk) took 857 ms and 64 MiB chunks of the
# vocabulary (out of cache) about 830 ms.
REF_CHUNK_BYTES = 4 << 20


@torch.no_grad()   # writes into a buffer (out=), which autograd cannot record
def _target_logprob_ref(hidden, head: LMHead, targets):
    n, v = hidden.shape[0], head.weight.shape[0]
    width = min(v, max(256, REF_CHUNK_BYTES // (4 * max(1, n))))
    t = targets.long()
    lse = torch.full((n,), float("-inf"), dtype=torch.float32, device=hidden.device)
    target = torch.zeros(n, dtype=torch.float32, device=hidden.device)
    buffer = torch.empty(n * width, dtype=head.weight.dtype, device=hidden.device)
    for lo in range(0, v, width):
        hi = min(v, lo + width)
        logits = head.columns(hidden, lo, hi, out=buffer[:n * (hi - lo)].view(n, hi - lo))
        logits = logits.float()        # itself when fp32
        if head.softcap:
            logits.div_(head.softcap).tanh_().mul_(head.softcap)
        at = logits.gather(1, (t - lo).clamp(0, hi - lo - 1)[:, None])[:, 0]
        target = torch.where((t >= lo) & (t < hi), at, target)
        top = logits.amax(-1)
        chunk_lse = top + logits.sub_(top[:, None]).exp_().sum(-1).log()
        lse = torch.logaddexp(lse, chunk_lse)
    return target - lse


def fused_lmhead_chunk_reward_ref(hidden_tuned, head_tuned: LMHead, hidden_untuned,
                                  head_untuned: LMHead, targets, segment_ids, num_segments):
    diff = (_target_logprob_ref(hidden_tuned, head_tuned, targets)
            - _target_logprob_ref(hidden_untuned, head_untuned, targets))
    return diff, _segment_sums(diff, segment_ids, num_segments)


def lmhead_chunk_logprob_ref(hidden, head: LMHead, targets, segment_ids, num_segments):
    logp = _target_logprob_ref(hidden, head, targets)
    return logp, _segment_sums(logp, segment_ids, num_segments)


# ---- Triton ------------------------------------------------------------------------------------

if triton is not None:
    @triton.jit
    def _softcap(x, cap):
        """cap * tanh(x / cap), written with a sigmoid (Triton has no tanh on every backend)."""
        return cap * (2 * tl.sigmoid(2 * x / cap) - 1)

    def _zero_direct_sums(nargs, reset_only=False):
        """The autotuner's hook before each timed run and before the real one: a DIRECT launch
        adds into the segment sums, so each run starts them from zero again (else the first
        call of a key returns its sums times the hundreds of timed runs). Not the other
        form's placeholder (a buffer other chunks wrote)."""
        if nargs["DIRECT"]:
            nargs["sums_ptr"].zero_()

    @triton.autotune(
        configs=configs([triton.Config({"BLOCK_V": 1024}, num_warps=4),
                         triton.Config({"BLOCK_V": 2048}, num_warps=8),
                         triton.Config({"BLOCK_V": 4096}, num_warps=8)],
                        interpret=triton.Config({"BLOCK_V": 1024})),
        key=["v_bucket", "TWO", "DIRECT"], do_bench=quick_bench, pre_hook=_zero_direct_sums)
    # (The split counts follow the rows: Triton would compile again for 1 or a multiple of 16.)
    @triton.jit(do_not_specialize=["split_base", "total_splits"])
    def _logits_lse_kernel(
        a_ptr, b_ptr,                 # [N, V] logits of the tuned / untuned model for the
                                      #   vocabulary ids [v_offset, v_offset + V) (b: only TWO)
        targets_ptr,                  # [N] int: each row's target id in the whole vocabulary
        part_ptr,                     # [N, total_splits, 4] fp32 out, columns split_base + split:
                                      #   (max_a, sum_a, max_b, sum_b)
        target_ptr,                   # [N, 2] fp32 out: both (capped) target logits, written by
                                      #   the one program whose range holds the target
        segment_ptr,                  # [N] int (DIRECT)
        diff_ptr,                     # [N] fp32 out (DIRECT): as _reward_finish_kernel's
        sums_ptr,                     # [num_segments] fp32, zeroed (DIRECT): += diff
        V, v_offset, stride_a, stride_b, split_size, split_base, total_splits, cap_a, cap_b,
        v_bucket,                     # next power of two of V: the autotuning key, unused here
                                      #   (the LM-head chunks' widths vary with the rows; a
                                      #   key per width would tune again for each)
        TWO: tl.constexpr,            # both models' logits, or only a's (one model's log-prob)
        HAS_CAP_A: tl.constexpr, HAS_CAP_B: tl.constexpr,
        DIRECT: tl.constexpr,         # one split over the whole vocabulary: the program ends
                                      #   the row itself (diff, segment sum), no finish launch
        BLOCK_V: tl.constexpr,
    ):
        # grid: (N, splits). Both models' tiles stream through once, side by side; lane-wise
        # online log-sum-exp (one exp per element, no cross-lane reduction inside the loop).
        row = tl.program_id(0).to(tl.int64)
        split = tl.program_id(1)
        lo = split * split_size
        hi = tl.minimum(V, lo + split_size)
        m_a = tl.full([BLOCK_V], LSE_FLOOR, tl.float32)
        s_a = tl.zeros([BLOCK_V], tl.float32)
        m_b = tl.full([BLOCK_V], LSE_FLOOR, tl.float32)
        s_b = tl.zeros([BLOCK_V], tl.float32)
        for v0 in range(lo, hi, BLOCK_V):
            v = v0 + tl.arange(0, BLOCK_V)
            mask = v < hi
            x = tl.load(a_ptr + row * stride_a + v, mask=mask, other=float("-inf")).to(tl.float32)
            if HAS_CAP_A:   # capped before masking: a cap maps -inf to -cap
                x = tl.where(mask, _softcap(x, cap_a), float("-inf"))
            m_a, s_a = online_lse_step_finite(m_a, s_a, x)
            if TWO:
                y = tl.load(b_ptr + row * stride_b + v, mask=mask,
                            other=float("-inf")).to(tl.float32)
                if HAS_CAP_B:
                    y = tl.where(mask, _softcap(y, cap_b), float("-inf"))
                m_b, s_b = online_lse_step_finite(m_b, s_b, y)
        ma, sa = lse_reduce(m_a, s_a)
        mb, sb = lse_reduce(m_b, s_b)
        # the target logits, read by the program whose range holds the target (DIRECT: all)
        t = tl.load(targets_ptr + row).to(tl.int64) - v_offset
        here = (t >= lo) & (t < hi)
        x = tl.load(a_ptr + row * stride_a + t, mask=here, other=0.0).to(tl.float32)
        if HAS_CAP_A:
            x = _softcap(x, cap_a)
        y = 0.0
        if TWO:
            y = tl.load(b_ptr + row * stride_b + t, mask=here, other=0.0).to(tl.float32)
            if HAS_CAP_B:
                y = _softcap(y, cap_b)
        if DIRECT:
            diff = x - (ma + tl.log(sa))
            if TWO:
                diff -= y - (mb + tl.log(sb))
            tl.store(diff_ptr + row, diff)
            tl.atomic_add(sums_ptr + tl.load(segment_ptr + row), diff)
        else:
            base = part_ptr + (row * total_splits + split_base + split) * 4
            tl.store(base + 0, ma)
            tl.store(base + 1, sa)
            tl.store(base + 2, mb)
            tl.store(base + 3, sb)
            tl.store(target_ptr + row * 2, x, mask=here)
            if TWO:
                tl.store(target_ptr + row * 2 + 1, y, mask=here)

    @triton.jit
    def _merge_splits_tl(m, s):
        """Splits' (max, sum of exp(. - max)) -> log-sum-exp (empty splits: -inf, 0)."""
        top = tl.max(m, 0)
        return top + tl.log(tl.sum(tl.where(m == float("-inf"), 0.0, s * tl.exp(m - top)), 0))

    @triton.jit(do_not_specialize=["splits"])
    def _reward_finish_kernel(
        part_ptr,                     # [N, splits, 4] fp32 from _logits_lse_kernel
        target_ptr,                   # [N, 2] fp32 target logits from _logits_lse_kernel
        segment_ptr,                  # [N] int
        diff_ptr,                     # [N] fp32 out: log p_tuned(t) - log p_untuned(t), or
                                      #   log p_a(t) (not TWO)
        sums_ptr,                     # [num_segments] fp32, zeroed: += diff of each segment
        splits,
        TWO: tl.constexpr,
        BLOCK_S: tl.constexpr,
    ):
        # grid: (N,): merge the splits, one atomic add per token.
        row = tl.program_id(0).to(tl.int64)
        s = tl.arange(0, BLOCK_S)
        smask = s < splits
        base = part_ptr + (row * splits + s) * 4
        lse_a = _merge_splits_tl(tl.load(base + 0, mask=smask, other=float("-inf")),
                                 tl.load(base + 1, mask=smask, other=0.0))
        diff = tl.load(target_ptr + row * 2) - lse_a
        if TWO:
            lse_b = _merge_splits_tl(tl.load(base + 2, mask=smask, other=float("-inf")),
                                     tl.load(base + 3, mask=smask, other=0.0))
            diff -= tl.load(target_ptr + row * 2 + 1) - lse_b
        tl.store(diff_ptr + row, diff)
        tl.atomic_add(sums_ptr + tl.load(segment_ptr + row), diff)


def _vocab_splits(device, rows: int, v: int):
    """(splits, split_size) of a [rows, v] pass: enough programs (rows x splits) to give every
    SM about four when the chunk has few tokens; split_size a multiple of SPLIT_GRANULE."""
    want = max(1, triton.cdiv(4 * sm_count(device), max(1, rows)))
    splits = max(1, min(triton.cdiv(v, SPLIT_GRANULE), want))
    split_size = triton.cdiv(triton.cdiv(v, splits), SPLIT_GRANULE) * SPLIT_GRANULE
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


class _Partials:
    """One pass over a vocabulary taken in column chunks, for two models' logits (the reward)
    or one's (its log-probs): each chunk's logits [N, width] add their splits' log-sum-exp
    partials, and the chunk holding a row's target writes that row's target logits. `finish`
    merges them into each token's difference (or log-prob) and the segments' sums."""

    def __init__(self, targets, device, n: int, v: int, width: int, two: bool = True):
        self.targets = targets
        self.two = two
        self.chunks = []                  # (lo, hi, splits, split_size, split_base)
        base = 0
        for lo in range(0, v, width):
            hi = min(v, lo + width)
            splits, size = _vocab_splits(device, n, hi - lo)
            self.chunks.append((lo, hi, splits, size, base))
            base += splits
        self.part = torch.empty(n, base, 4, dtype=torch.float32, device=device)
        self.target = torch.empty(n, 2, dtype=torch.float32, device=device)

    def add(self, chunk, a, b=None, cap_a=None, cap_b=None):
        lo, hi, splits, size, base = chunk
        assert (b is not None) == self.two
        b = a if b is None else b     # not read when one model
        assert a.shape == b.shape == (self.part.shape[0], hi - lo)
        _logits_lse_kernel[(a.shape[0], splits)](
            a, b, self.targets, self.part, self.target, self.targets, self.part, self.part,
            hi - lo, lo, a.stride(0), b.stride(0), size, base, self.part.shape[1], cap_a or 0.0,
            cap_b or 0.0, triton.next_power_of_2(hi - lo),
            TWO=self.two, HAS_CAP_A=bool(cap_a), HAS_CAP_B=bool(cap_b), DIRECT=False)

    def finish(self, segment_ids, num_segments):
        n, splits = self.part.shape[:2]
        diff = torch.empty(n, dtype=torch.float32, device=self.part.device)
        sums = torch.zeros(num_segments, dtype=torch.float32, device=self.part.device)
        # BLOCK_S a power of two >= 16: few compiled variants as the split counts vary
        _reward_finish_kernel[(n,)](self.part, self.target, segment_ids, diff, sums, splits,
                                    TWO=self.two, BLOCK_S=max(16, triton.next_power_of_2(splits)))
        return diff, sums


def chunk_reward_triton(logits_tuned, logits_untuned, targets, segment_ids, num_segments,
                        bounds_checked=False):
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
    _check_common(targets, segment_ids, num_segments, n, v, name, not bounds_checked)
    if n == 0:
        empty = torch.zeros(0, dtype=torch.float32, device=logits_tuned.device)
        return empty, _segment_sums(empty, segment_ids, num_segments)
    if _direct(logits_tuned.device, n, v):
        diff = torch.empty(n, dtype=torch.float32, device=logits_tuned.device)
        sums = torch.zeros(num_segments, dtype=torch.float32, device=logits_tuned.device)
        _logits_lse_kernel[(n, 1)](
            logits_tuned, logits_untuned, targets, diff, diff, segment_ids, diff, sums, v, 0,
            logits_tuned.stride(0), logits_untuned.stride(0), v, 0, 1, 0.0, 0.0,
            triton.next_power_of_2(v), TWO=True, HAS_CAP_A=False, HAS_CAP_B=False, DIRECT=True)
        return diff, sums
    # The whole vocabulary is one chunk, split for parallelism: two launches in all.
    partials = _Partials(targets, logits_tuned.device, n, v, v)
    partials.add(partials.chunks[0], logits_tuned, logits_untuned)
    return partials.finish(segment_ids, num_segments)


# Logits of at most this many elements take the one-launch form at any row count: so small
# that the host's cost of a launch outweighs the GPU parallelism of splitting each row (the
# split form's two launches took 0.19-0.21 ms eager on an H200 up to 64 x 262,144, slower
# than the torch path's 0.12-0.18 ms; main at 024353a).
DIRECT_MAX_ELEMENTS = 1 << 24


def _direct(device, n: int, v: int) -> bool:
    """Whether a [n, v] chunk reward runs as one launch, a program per row ending its own
    row: when the rows alone fill the GPU (two programs an SM), or the logits are small."""
    return n >= 2 * sm_count(device) or n * v <= DIRECT_MAX_ELEMENTS


def lmhead_chunk_width(n: int, v: int, element_size: int) -> int:
    """Vocabulary columns per GEMM: a multiple of SPLIT_GRANULE whose [n, width] logits take at
    most LMHEAD_CHUNK_BYTES (one granule at the least), or the whole vocabulary."""
    width = LMHEAD_CHUNK_BYTES // max(1, n * element_size) // SPLIT_GRANULE * SPLIT_GRANULE
    return min(v, max(SPLIT_GRANULE, width))


def _check_heads(name, n, pairs):
    """pairs: (hidden [N, H], LMHead, role) -> the vocabulary size they share."""
    for h, head, role in pairs:
        w, b = head.weight, head.bias
        if h.dim() != 2 or w.dim() != 2 or h.shape[1] != w.shape[1] or h.shape[0] != n:
            raise ValueError(f"{name}: {role} hidden [N={n}, H] and weight [V, H] disagree: "
                             f"{tuple(h.shape)} and {tuple(w.shape)}")
        if b is not None and b.shape != w.shape[:1]:
            raise ValueError(f"{name}: {role} bias must be [V={w.shape[0]}]; got "
                             f"{tuple(b.shape)}")
        if h.dtype not in (torch.float32, torch.float16, torch.bfloat16) or w.dtype != h.dtype:
            raise TypeError(f"{name}: {role} hidden and weight must share a float dtype; got "
                            f"{h.dtype} and {w.dtype}")
        if h.stride(1) != 1 or w.stride(1) != 1:
            raise ValueError(f"{name}: {role} hidden and weight need a contiguous last dimension")
    sizes = [head.weight.shape[0] for _, head, _ in pairs]
    if len(set(sizes)) > 1:
        raise ValueError(f"{name}: the two LM heads have different vocabularies "
                         f"({sizes[0]} and {sizes[1]})")
    return sizes[0]


def _lmhead_pass(name, pairs, targets, segment_ids, num_segments, bounds_checked, vocab_chunk):
    """The LM heads of `pairs` as cuBLAS GEMMs over vocabulary chunks (vocab_chunk columns;
    None: sized by lmhead_chunk_width), each chunk's logits reduced by _logits_lse_kernel
    before the next is formed: the GEMMs are the logits path's, and no [N, V] tensor exists."""
    hidden = pairs[0][0]
    n = hidden.shape[0]
    v = _check_heads(name, n, pairs)
    _check_common(targets, segment_ids, num_segments, n, v, name, not bounds_checked)
    if n == 0:
        empty = torch.zeros(0, dtype=torch.float32, device=hidden.device)
        return empty, _segment_sums(empty, segment_ids, num_segments)
    width = vocab_chunk or lmhead_chunk_width(n, v, hidden.element_size())
    partials = _Partials(targets, hidden.device, n, v, width, two=len(pairs) == 2)
    for chunk in partials.chunks:
        lo, hi = chunk[:2]
        # Each GEMM's output is the model's own logits dtype, as compute_logits gives them.
        logits = [head.columns(h, lo, hi) for h, head, _ in pairs]
        caps = [head.softcap for _, head, _ in pairs]
        partials.add(chunk, logits[0], logits[1] if len(pairs) == 2 else None, *caps)
    return partials.finish(segment_ids, num_segments)


def fused_lmhead_chunk_reward_triton(hidden_tuned, head_tuned: LMHead, hidden_untuned,
                                     head_untuned: LMHead, targets, segment_ids, num_segments,
                                     bounds_checked=False, vocab_chunk=None):
    return _lmhead_pass("fused_lmhead_chunk_reward",
                        [(hidden_tuned, head_tuned, "tuned"),
                         (hidden_untuned, head_untuned, "untuned")],
                        targets, segment_ids, num_segments, bounds_checked, vocab_chunk)


def lmhead_chunk_logprob_triton(hidden, head: LMHead, targets, segment_ids, num_segments,
                                bounds_checked=False, vocab_chunk=None):
    return _lmhead_pass("lmhead_chunk_logprob", [(hidden, head, "the")], targets, segment_ids,
                        num_segments, bounds_checked, vocab_chunk)


def chunk_reward(logits_tuned, logits_untuned, targets, segment_ids, num_segments,
                 bounds_checked=False):
    """Per-token reward [N] and its sums per segment from both models' logits.
    bounds_checked as for fused_lmhead_chunk_reward: without it the GPU path reads the
    bounds back to check them (one device sync)."""
    args = (logits_tuned, logits_untuned, targets, segment_ids, num_segments)
    if logits_tuned.is_cuda and triton is not None:
        return chunk_reward_triton(*args, bounds_checked=bounds_checked)
    return chunk_reward_ref(*args)


def fused_lmhead_chunk_reward(hidden_tuned, head_tuned: LMHead, hidden_untuned,
                              head_untuned: LMHead, targets, segment_ids, num_segments,
                              bounds_checked=False):
    """bounds_checked: the caller has checked targets in [0, V) and segment_ids in
    [0, num_segments) on the host, so the GPU path need not read them back to check."""
    args = (hidden_tuned, head_tuned, hidden_untuned, head_untuned, targets, segment_ids,
            num_segments)
    if hidden_tuned.is_cuda and triton is not None:
        return fused_lmhead_chunk_reward_triton(*args, bounds_checked=bounds_checked)
    return fused_lmhead_chunk_reward_ref(*args)


def lmhead_chunk_logprob(hidden, head: LMHead, targets, segment_ids, num_segments,
                         bounds_checked=False):
    """One model's log p(target) per token [N] and its sums per segment, from the hidden
    states, without an [N, V] tensor (a reward term when the tuned and untuned models score
    separate streams). bounds_checked as for fused_lmhead_chunk_reward."""
    args = (hidden, head, targets, segment_ids, num_segments)
    if hidden.is_cuda and triton is not None:
        return lmhead_chunk_logprob_triton(*args, bounds_checked=bounds_checked)
    return lmhead_chunk_logprob_ref(*args)
