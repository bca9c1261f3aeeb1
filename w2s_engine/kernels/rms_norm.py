"""RMSNorm as one kernel, in transformers' two forms:
    Llama's: out = weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)
    Gemma's: out = (x * rsqrt(mean(x^2) + eps) * (1 + weight)).to(x.dtype)   (unit_offset)

transformers runs it as eight torch ops per norm (to fp32, pow, mean, add, rsqrt, mul, cast,
mul by the weight), two norms per layer and one at the end: 65 norms and 520 kernels in each
decode step of an 8B Llama. Inside a CUDA graph the launches cost nothing, but each op is
still its own kernel of a few microseconds on a batch of a few rows: on an H200 the small
reduction and elementwise kernels, these and the rotary embedding's among them, were about a
fifth of a CBS step's device time (bench/results/gpu-check-NVIDIA-H200.md). One program per
row reads the row once and writes it once.

The arithmetic is transformers' (LlamaRMSNorm, GemmaRMSNorm and every copy of them): the mean
and rsqrt in fp32; Llama's rounds the normalised row to the input's dtype and then multiplies
by the weight in the promoted dtype of the two, Gemma's multiplies by 1 + weight in fp32 and
rounds once at the end. Only the order of the sum of squares differs, so results match to a
rounding of the input dtype.
"""

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the PyTorch reference needs no Triton
    triton = None


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float,
                 unit_offset: bool = False) -> torch.Tensor:
    """transformers' LlamaRMSNorm.forward (GemmaRMSNorm.forward with unit_offset), op for op."""
    input_dtype = x.dtype
    h = x.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + eps)
    if unit_offset:
        return (h * (1.0 + weight.float())).type_as(x)
    return weight * h.to(input_dtype)


if triton is not None:
    @triton.jit
    def _scaled(x, rstd, w, x_ptr, UNIT_OFFSET: tl.constexpr):
        """fp32 row x, its rstd, fp32 weight -> the normalised, weighted row (fp32)."""
        if UNIT_OFFSET:
            return x * rstd * (1.0 + w)
        # rounded to the input's dtype before the weight, as transformers' Llama form does
        return w * (x * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)

    @triton.jit
    def _rms_norm_kernel(
        x_ptr,               # [R, H], unit stride along H
        w_ptr,               # [H]
        out_ptr,             # [R, H] contiguous
        stride_xr,
        H, eps,
        BLOCK: tl.constexpr,
        ONE_TILE: tl.constexpr,   # H <= BLOCK: the row stays in registers between passes
        UNIT_OFFSET: tl.constexpr,  # Gemma's form: times 1 + weight in fp32, one rounding
    ):
        # grid: (R,). One program per row: the sum of squares, then the scaled row.
        row = tl.program_id(0).to(tl.int64)
        x_row = x_ptr + row * stride_xr
        out_row = out_ptr + row * H
        offs = tl.arange(0, BLOCK)
        if ONE_TILE:
            mask = offs < H
            x = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.rsqrt(tl.sum(x * x, 0) / H + eps)
            w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(out_row + offs, _scaled(x, rstd, w, x_ptr, UNIT_OFFSET)
                     .to(out_ptr.dtype.element_ty), mask=mask)
        else:
            acc = tl.zeros([BLOCK], dtype=tl.float32)
            for start in range(0, H, BLOCK):
                mask = start + offs < H
                x = tl.load(x_row + start + offs, mask=mask, other=0.0).to(tl.float32)
                acc += x * x
            rstd = tl.rsqrt(tl.sum(acc, 0) / H + eps)
            for start in range(0, H, BLOCK):
                mask = start + offs < H
                x = tl.load(x_row + start + offs, mask=mask, other=0.0).to(tl.float32)
                w = tl.load(w_ptr + start + offs, mask=mask, other=0.0).to(tl.float32)
                tl.store(out_row + start + offs, _scaled(x, rstd, w, x_ptr, UNIT_OFFSET)
                         .to(out_ptr.dtype.element_ty), mask=mask)


# A row of up to this many elements is held in registers (8 warps: 32 fp32 per thread).
MAX_ONE_TILE = 8192


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float,
                    unit_offset: bool = False) -> torch.Tensor:
    """x [..., H], weight [H] -> [..., H]: in the promoted dtype of x and weight (Llama's
    form), in x's dtype (Gemma's, unit_offset)."""
    h = x.shape[-1]
    if weight.shape != (h,):
        raise ValueError(f"weight must be [{h}] for x of shape {tuple(x.shape)}; got "
                         f"{tuple(weight.shape)}")
    if not (x.is_floating_point() and weight.is_floating_point()):
        raise TypeError(f"x and weight must be floating point; got {x.dtype} and {weight.dtype}")
    rows = x.reshape(-1, h)              # a view wherever the leading dims allow one
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out_dtype = x.dtype if unit_offset else torch.promote_types(x.dtype, weight.dtype)
    out = torch.empty(rows.shape, dtype=out_dtype, device=x.device)
    if rows.shape[0] == 0:
        return out.view(x.shape)
    weight = weight if weight.is_contiguous() else weight.contiguous()
    block = min(triton.next_power_of_2(h), MAX_ONE_TILE)
    _rms_norm_kernel[(rows.shape[0],)](
        rows, weight, out, rows.stride(0), h, eps,
        BLOCK=block, ONE_TILE=h <= block, UNIT_OFFSET=unit_offset,
        num_warps=max(1, min(8, block // 256)))
    return out.view(x.shape)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             unit_offset: bool = False) -> torch.Tensor:
    if x.is_cuda and triton is not None:
        return rms_norm_triton(x, weight, eps, unit_offset)
    return rms_norm_ref(x, weight, eps, unit_offset)
