"""Rotary position embedding of queries and keys as one kernel, in transformers' Llama form:
    q' = q * cos + rotate_half(q) * sin,   rotate_half(x) = cat(-x[..., D/2:], x[..., :D/2])
and the same for k (transformers' apply_rotary_pos_emb, which most architectures copy).

transformers runs it as five torch ops per tensor (a multiply, a negation, a cat, a multiply,
an add), ten per layer: 320 kernels in each decode step of an 8B Llama, each a few
microseconds on a batch of a few rows even inside a CUDA graph. One program per (token, head)
of both tensors reads the head's row and its token's cos and sin once.

The arithmetic is torch's: each of the five ops rounds to the output dtype (the promoted dtype
of the inputs, bf16 for a bf16 model, whose cos and sin come cast to it), and so does the
kernel, op for op, so results are the same bit for bit up to the rounding of fp32 products
(which torch computes in fp32 as well). That needs the kernel compiled without floating-point
contraction: with it (Triton's default), LLVM narrows each rounded product to a bf16 multiply
and the GPU fuses it with the add into one fma, which rounds once where torch rounds twice (on
an H200, 23% of an 8B Llama's bf16 rotated values were one ulp off transformers').
"""

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the PyTorch reference needs no Triton
    triton = None


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotary_ref(q, k, cos, sin, unsqueeze_dim: int = 1):
    """transformers' apply_rotary_pos_emb, op for op."""
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    return (q * cos) + (_rotate_half(q) * sin), (k * cos) + (_rotate_half(k) * sin)


if triton is not None:
    # T (tokens) follows the batch: Triton would compile again for T of 1 or a multiple of
    # 16, and it only divides the program index.
    @triton.jit(do_not_specialize=["T"])
    def _rotary_kernel(
        q_ptr, k_ptr,              # [B, Hq, T, D], [B, Hk, T, D] (any strides, unit along D)
        cos_ptr, sin_ptr,          # [B or 1, T, D] (unit stride along D)
        q_out_ptr, k_out_ptr,      # the shapes of q and k (any strides, unit along D)
        T,
        stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
        stride_qob, stride_qoh, stride_qot, stride_kob, stride_koh, stride_kot,
        stride_cb, stride_ct,
        HQ: tl.constexpr, HALF: tl.constexpr, BLOCK: tl.constexpr,
    ):
        # grid: (B * T, Hq + Hk). One program rotates one head's row of one token.
        bt = tl.program_id(0)
        h = tl.program_id(1)
        b = (bt // T).to(tl.int64)
        t = (bt % T).to(tl.int64)
        if h < HQ:
            src = q_ptr + b * stride_qb + h * stride_qh + t * stride_qt
            dst = q_out_ptr + b * stride_qob + h * stride_qoh + t * stride_qot
        else:
            src = k_ptr + b * stride_kb + (h - HQ) * stride_kh + t * stride_kt
            dst = k_out_ptr + b * stride_kob + (h - HQ) * stride_koh + t * stride_kot
        d = tl.arange(0, BLOCK)
        mask = d < HALF
        trig = b * stride_cb + t * stride_ct
        c1 = tl.load(cos_ptr + trig + d, mask=mask, other=0.0).to(tl.float32)
        c2 = tl.load(cos_ptr + trig + HALF + d, mask=mask, other=0.0).to(tl.float32)
        s1 = tl.load(sin_ptr + trig + d, mask=mask, other=0.0).to(tl.float32)
        s2 = tl.load(sin_ptr + trig + HALF + d, mask=mask, other=0.0).to(tl.float32)
        x1 = tl.load(src + d, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF + d, mask=mask, other=0.0).to(tl.float32)
        out_ty = q_out_ptr.dtype.element_ty
        # each torch op rounds to the output dtype: x * cos, rotate_half(x) * sin, their sum
        lo = (x1 * c1).to(out_ty).to(tl.float32) + (-x2 * s1).to(out_ty).to(tl.float32)
        hi = (x2 * c2).to(out_ty).to(tl.float32) + (x1 * s2).to(out_ty).to(tl.float32)
        tl.store(dst + d, lo.to(out_ty), mask=mask)
        tl.store(dst + HALF + d, hi.to(out_ty), mask=mask)


def rotary_layout_ok(q, k, cos, sin, unsqueeze_dim: int = 1) -> bool:
    """Whether the kernel takes these arguments: [B, H, T, D] queries and keys, [B or 1, T, D]
    cos and sin broadcast over the heads (unsqueeze_dim 1, transformers' default), an even D,
    unit strides along D. Anything else goes to the reference."""
    if unsqueeze_dim != 1 or q.dim() != 4 or k.dim() != 4 or cos.dim() != 3:
        return False
    b, _, t, d = q.shape
    return (d % 2 == 0 and k.shape[0] == b and k.shape[2:] == (t, d)
            and cos.shape == sin.shape and cos.shape[0] in (1, b) and cos.shape[1:] == (t, d)
            and cos.stride() == sin.stride()
            and all(x.stride(-1) == 1 for x in (q, k, cos, sin))
            and q.dtype == k.dtype and cos.dtype == sin.dtype
            and q.is_floating_point() and cos.is_floating_point())


def rotary_triton(q, k, cos, sin, unsqueeze_dim: int = 1):
    """(q', k') as transformers' apply_rotary_pos_emb gives them: new tensors with q's and k's
    shapes, laid out as torch's elementwise ops lay them out (dense, in q's and k's order of
    strides), in the promoted dtype of q and cos."""
    if not rotary_layout_ok(q, k, cos, sin, unsqueeze_dim):
        raise ValueError(f"rotary: the kernel takes [B, H, T, D] q and k and [B or 1, T, D] cos "
                         f"and sin with unit strides along an even D; got q "
                         f"{tuple(q.shape)}, k {tuple(k.shape)}, cos {tuple(cos.shape)}")
    return _rotary_launch(q, k, cos, sin)


def _rotary_launch(q, k, cos, sin):
    """The kernel on arguments rotary_layout_ok accepted."""
    out_dtype = torch.promote_types(q.dtype, cos.dtype)
    # Laid out as torch's ops lay out q * cos + ...: q's strides where q is dense (a transposed
    # view of the projection), dense in q's order where it is not (the slices of one merged
    # q/k/v projection, models/fused_ops.py; Phi's rotated part of each head), so that the
    # attention reads [T, H, D] rows with no copy and no output spans the merged row.
    q_out = torch.empty_like(q, dtype=out_dtype)
    k_out = torch.empty_like(k, dtype=out_dtype)
    b, hq, t, d = q.shape
    if b * t == 0:
        return q_out, k_out
    _rotary_kernel[(b * t, hq + k.shape[1])](
        q, k, cos, sin, q_out, k_out, t,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        q_out.stride(0), q_out.stride(1), q_out.stride(2),
        k_out.stride(0), k_out.stride(1), k_out.stride(2),
        cos.stride(0) if cos.shape[0] > 1 else 0, cos.stride(1),
        HQ=hq, HALF=d // 2, BLOCK=triton.next_power_of_2(d // 2),
        num_warps=1 if d <= 256 else 4,
        enable_fp_fusion=False)    # each product rounded on its own, as torch's ops round it
    return q_out, k_out


def rotary(q, k, cos, sin, unsqueeze_dim: int = 1):
    """A drop-in for transformers' apply_rotary_pos_emb: the kernel on CUDA where it takes
    the layout, the reference elsewhere."""
    if q.is_cuda and triton is not None and rotary_layout_ok(q, k, cos, sin, unsqueeze_dim):
        return _rotary_launch(q, k, cos, sin)     # checked once, not again in rotary_triton
    return rotary_ref(q, k, cos, sin, unsqueeze_dim)
