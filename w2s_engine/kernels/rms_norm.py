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

With a residual (add_rms_norm) the kernel also does the add before the norm, as a decoder
layer runs it between attention and MLP: s = residual + x, rounded to the dtype as torch's add
rounds it, is written out (the MLP's residual) and normalised in the same pass: one kernel and
one read of each row instead of an add kernel and a norm kernel.
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


def add_rms_norm_ref(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                     unit_offset: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """A decoder layer's `hidden = residual + hidden; norm(hidden)`, op for op ->
    (the normalised sum, the sum)."""
    total = residual + x
    return rms_norm_ref(total, weight, eps, unit_offset), total


if triton is not None:
    @triton.jit
    def _scaled(x, rstd, w, x_ptr, UNIT_OFFSET: tl.constexpr):
        """fp32 row x, its rstd, fp32 weight -> the normalised, weighted row (fp32)."""
        if UNIT_OFFSET:
            return x * rstd * (1.0 + w)
        # rounded to the input's dtype before the weight, as transformers' Llama form does
        return w * (x * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)

    @triton.jit
    def _row_tile(x_row, res_row, sum_row, offs, mask, x_ptr, HAS_RESIDUAL: tl.constexpr,
                  STORE_SUM: tl.constexpr):
        """One tile of a row in fp32: x, or residual + x rounded to x's dtype as torch's add
        rounds it (written to the sum's row when STORE_SUM)."""
        x = tl.load(x_row + offs, mask=mask, other=0.0)
        if HAS_RESIDUAL:
            total = (x.to(tl.float32) + tl.load(res_row + offs, mask=mask, other=0.0)
                     .to(tl.float32)).to(x_ptr.dtype.element_ty)
            if STORE_SUM:
                tl.store(sum_row + offs, total, mask=mask)
            return total.to(tl.float32)
        return x.to(tl.float32)

    # B (rows per slice) follows the batch: Triton would compile again for B of 1 or a
    # multiple of 16, and it only divides the row index.
    @triton.jit(do_not_specialize=["B"])
    def _rms_norm_kernel(
        x_ptr,               # [A, B, H], unit stride along H: row r = (r // B, r % B)
        res_ptr,             # [A, B, H], unit stride along H (HAS_RESIDUAL)
        w_ptr,               # [H]
        out_ptr,             # [A * B, H] contiguous
        sum_ptr,             # [A * B, H] contiguous: residual + x (HAS_RESIDUAL)
        stride_xa, stride_xb, stride_ra, stride_rb,
        B, H, eps,
        BLOCK: tl.constexpr,
        ONE_TILE: tl.constexpr,   # H <= BLOCK: the row stays in registers between passes
        UNIT_OFFSET: tl.constexpr,  # Gemma's form: times 1 + weight in fp32, one rounding
        HAS_RESIDUAL: tl.constexpr,  # normalise residual + x, and write that sum
    ):
        # grid: (A * B,). One program per row: the sum of squares, then the scaled row.
        row = tl.program_id(0).to(tl.int64)
        a, b = row // B, row % B
        x_row = x_ptr + a * stride_xa + b * stride_xb
        res_row = res_ptr + a * stride_ra + b * stride_rb
        out_row = out_ptr + row * H
        sum_row = sum_ptr + row * H
        offs = tl.arange(0, BLOCK)
        if ONE_TILE:
            mask = offs < H
            x = _row_tile(x_row, res_row, sum_row, offs, mask, x_ptr, HAS_RESIDUAL, True)
            rstd = tl.rsqrt(tl.sum(x * x, 0) / H + eps)
            w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(out_row + offs, _scaled(x, rstd, w, x_ptr, UNIT_OFFSET)
                     .to(out_ptr.dtype.element_ty), mask=mask)
        else:
            acc = tl.zeros([BLOCK], dtype=tl.float32)
            for start in range(0, H, BLOCK):
                mask = start + offs < H
                x = _row_tile(x_row, res_row, sum_row, start + offs, mask, x_ptr,
                              HAS_RESIDUAL, True)
                acc += x * x
            rstd = tl.rsqrt(tl.sum(acc, 0) / H + eps)
            for start in range(0, H, BLOCK):
                mask = start + offs < H
                # the sum again from its inputs, not read back from what this program wrote
                x = _row_tile(x_row, res_row, sum_row, start + offs, mask, x_ptr,
                              HAS_RESIDUAL, False)
                w = tl.load(w_ptr + start + offs, mask=mask, other=0.0).to(tl.float32)
                tl.store(out_row + start + offs, _scaled(x, rstd, w, x_ptr, UNIT_OFFSET)
                         .to(out_ptr.dtype.element_ty), mask=mask)


# A row of up to this many elements is held in registers (8 warps: 32 fp32 per thread).
MAX_ONE_TILE = 8192


def _check_norm(x: torch.Tensor, weight: torch.Tensor, name: str):
    h = x.shape[-1]
    if weight.shape != (h,):
        raise ValueError(f"{name}: weight must be [{h}] for x of shape {tuple(x.shape)}; got "
                         f"{tuple(weight.shape)}")
    if not (x.is_floating_point() and weight.is_floating_point()):
        raise TypeError(f"{name}: x and weight must be floating point; got {x.dtype} and "
                        f"{weight.dtype}")


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x [..., H] as [A, B, H] rows read where they lie: one run of rows, or runs of B rows
    (the heads of a token in Qwen3's per-head q/k norms, where q and k are slices of one
    merged projection); a copy only where neither view exists."""
    h = x.shape[-1]
    b = x.shape[-2] if x.dim() > 1 else 1
    for shape in ((1, -1, h), (-1, b, h)):
        try:
            rows = x.view(shape)
        except RuntimeError:
            continue
        if rows.stride(-1) == 1:
            return rows
    return x.contiguous().view(1, -1, h)


def _launch(rows, residual_rows, weight, out, total, eps, unit_offset):
    a, b, h = rows.shape
    weight = weight if weight.is_contiguous() else weight.contiguous()
    block = min(triton.next_power_of_2(h), MAX_ONE_TILE)
    has_residual = residual_rows is not None
    res = residual_rows if has_residual else rows
    _rms_norm_kernel[(a * b,)](
        rows, res, weight, out, total if has_residual else out,
        rows.stride(0), rows.stride(1), res.stride(0), res.stride(1), b, h, eps,
        BLOCK=block, ONE_TILE=h <= block, UNIT_OFFSET=unit_offset, HAS_RESIDUAL=has_residual,
        num_warps=max(1, min(8, block // 256)))


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float,
                    unit_offset: bool = False) -> torch.Tensor:
    """x [..., H], weight [H] -> [..., H]: in the promoted dtype of x and weight (Llama's
    form), in x's dtype (Gemma's, unit_offset)."""
    _check_norm(x, weight, "rms_norm")
    out_dtype = x.dtype if unit_offset else torch.promote_types(x.dtype, weight.dtype)
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    if x.numel():
        _launch(_rows(x), None, weight, out, None, eps, unit_offset)
    return out


def add_rms_norm_triton(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                        eps: float, unit_offset: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual [..., H] of one dtype, weight [H] -> (rms_norm(residual + x), residual + x),
    each [..., H], the sum in x's dtype."""
    _check_norm(x, weight, "add_rms_norm")
    if residual.shape != x.shape or residual.dtype != x.dtype:
        raise ValueError(f"add_rms_norm: x and residual must share a shape and dtype; got "
                         f"{x.dtype} {tuple(x.shape)} and {residual.dtype} "
                         f"{tuple(residual.shape)}")
    out_dtype = x.dtype if unit_offset else torch.promote_types(x.dtype, weight.dtype)
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    total = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.numel():
        rows, residual_rows = _rows(x), _rows(residual)
        if residual_rows.shape[:2] != rows.shape[:2]:     # two layouts: one run of rows each
            rows, residual_rows = rows.reshape(1, -1, x.shape[-1]), \
                residual_rows.reshape(1, -1, x.shape[-1])
        _launch(rows, residual_rows, weight, out, total, eps, unit_offset)
    return out, total


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             unit_offset: bool = False) -> torch.Tensor:
    if x.is_cuda and triton is not None:
        return rms_norm_triton(x, weight, eps, unit_offset)
    return rms_norm_ref(x, weight, eps, unit_offset)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                 unit_offset: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(residual + x), residual + x): one kernel on CUDA where the two share a shape
    and dtype, transformers' ops elsewhere."""
    if x.is_cuda and triton is not None and residual.shape == x.shape \
            and residual.dtype == x.dtype:
        return add_rms_norm_triton(x, residual, weight, eps, unit_offset)
    return add_rms_norm_ref(x, residual, weight, eps, unit_offset)
