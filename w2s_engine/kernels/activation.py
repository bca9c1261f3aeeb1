"""SiLU-and-multiply of a gated MLP as one kernel: silu(gate) * up, transformers' LlamaMLP form.

transformers runs it as two torch ops (the activation, then the product), each writing and
reading the [tokens, intermediate] activations: in each decode step of an 8B Llama, 64
kernels of a few microseconds; in a prefill or a scoring forward, a third of the traffic
between the MLP's GEMMs. One program per (row, column tile) reads gate and up once and writes
the product once.

The arithmetic is torch's: silu in fp32 as x / (1 + exp(-x)), rounded to the input dtype,
then the product rounded again, so results match up to the last bit of exp.
"""

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # the PyTorch reference needs no Triton
    triton = None


def silu_mul_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """transformers' act_fn(gate_proj(x)) * up_proj(x) with act_fn SiLU, op for op."""
    return F.silu(gate) * up


if triton is not None:
    @triton.jit
    def _silu_mul_kernel(
        gate_ptr, up_ptr,       # [R, I], unit stride along I
        out_ptr,                # [R, I] contiguous
        stride_g, stride_u, I,
        BLOCK: tl.constexpr,
    ):
        # grid: (R, cdiv(I, BLOCK))
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < I
        g = tl.load(gate_ptr + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(up_ptr + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
        out_ty = out_ptr.dtype.element_ty
        # each torch op rounds to the dtype: the activation, then the product
        act = (g / (1.0 + tl.exp(-g))).to(out_ty).to(tl.float32)
        tl.store(out_ptr + row * I + cols, (act * u).to(out_ty), mask=mask)


def silu_mul_triton(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up [..., I] of one dtype -> silu(gate) * up [..., I]."""
    if gate.shape != up.shape or gate.dtype != up.dtype or not gate.is_floating_point():
        raise ValueError(f"silu_mul: gate and up must be floating point of one shape and dtype; "
                         f"got {gate.dtype} {tuple(gate.shape)} and {up.dtype} "
                         f"{tuple(up.shape)}")
    width = gate.shape[-1]
    g, u = gate.reshape(-1, width), up.reshape(-1, width)   # views where the dims allow
    g = g if g.stride(-1) == 1 else g.contiguous()
    u = u if u.stride(-1) == 1 else u.contiguous()
    out = torch.empty(g.shape, dtype=gate.dtype, device=gate.device)
    if g.numel() == 0:
        return out.view(gate.shape)
    block = min(1024, triton.next_power_of_2(width))
    _silu_mul_kernel[(g.shape[0], triton.cdiv(width, block))](
        g, u, out, g.stride(0), u.stride(0), width, BLOCK=block,
        num_warps=max(1, min(4, block // 256)))
    return out.view(gate.shape)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    if gate.is_cuda and triton is not None:
        return silu_mul_triton(gate, up)
    return silu_mul_ref(gate, up)
