"""FP8 weights for the large model's linear layers (vLLM's `--quantization fp8`).

A decode step of a search's few hundred rows reads every weight once, and reading them is most
of its time (issue 16's floor: weight bytes / HBM bandwidth). Stored in float8 (e4m3) the
weights are half the bytes of bfloat16: the floor halves, and the memory they free goes to
the KV pools. The scheme is vLLM's dynamic FP8 (and the FP8 checkpoints' "channel-wise
weights, dynamic per-token activations"): each output row of a weight has its own fp32 scale
(its largest magnitude maps to e4m3's 448), each input row (token) is quantized with its own
scale as it arrives, and one scaled GEMM (torch._scaled_mm: the Hopper and Ada FP8 tensor
cores on CUDA, a reference on CPU) multiplies the two and rescales. A row's result depends
only on that row, so a search gives the same tokens whatever it is batched with.

Only the large model: the small pair's rewards are log-probability differences that a
coarser tuned or untuned model would change. The LM head keeps its dtype (vLLM's too), and a
layer whose sizes the FP8 GEMM cannot take (not multiples of 16) stays as it is.
"""

import torch
import torch.nn.functional as F

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max         # 448
MIN_SCALE = 1e-12                      # (an all-zero row: any scale reads it back as zeros)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (float8 [M, K], fp32 scales [M, 1]) with x ~= q * scale, row by row (each
    row's largest magnitude maps to FP8_MAX)."""
    scale = (x.abs().amax(dim=-1, keepdim=True).float() / FP8_MAX).clamp_min(MIN_SCALE)
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear for an FP8 weight: x [..., K] in the model's dtype; weight [N, K] float8;
    scale [N, 1] fp32 (weight ~= weight * scale row by row) -> [..., N] in x's dtype. Each row
    of x is quantized with its own scale, then one scaled GEMM."""
    rows = x.reshape(-1, x.shape[-1])
    q, x_scale = quantize_rows(rows)
    # (CUDA's row-wise scaled GEMM writes bfloat16 only: the engine refuses other dtypes there)
    out = torch._scaled_mm(q, weight.t(), scale_a=x_scale, scale_b=scale.t(),
                           out_dtype=x.dtype)
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], weight.shape[0])


def fp8_linear_ref(x, weight, scale, bias=None):
    """fp8_linear in plain fp32 arithmetic on the dequantized operands: the reference."""
    q, x_scale = quantize_rows(x.reshape(-1, x.shape[-1]))
    out = (q.float() * x_scale) @ (weight.float() * scale).t()
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])


def apply_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 scale: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, or fp8_linear where the weight is float8 (scale: its row scales)."""
    if scale is None:
        return F.linear(x, weight, bias)
    return fp8_linear(x, weight, scale, bias)


class Fp8Linear(torch.nn.Module):
    """An nn.Linear whose weight is float8 with a scale per output row. weight and bias
    are parameters as nn.Linear's (a merged projection makes them slices of its own);
    weight_scale [out, 1] fp32 a buffer."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = torch.nn.Parameter(weight, requires_grad=False)
        self.register_buffer("weight_scale", scale)
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)

    @classmethod
    def of(cls, linear: torch.nn.Linear) -> "Fp8Linear":
        with torch.no_grad():
            weight, scale = quantize_rows(linear.weight)
        return cls(weight, scale, None if linear.bias is None else linear.bias.detach())

    def forward(self, x):
        return fp8_linear(x, self.weight, self.weight_scale, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, fp8=e4m3 per-channel")


def fp8_fits(linear: torch.nn.Module) -> bool:
    """Whether the FP8 GEMM takes this layer: torch's own nn.Linear (not a LoRA or an already
    quantized layer), unhooked, in a floating dtype, with sizes that are multiples of 16."""
    return (type(linear) is torch.nn.Linear and not linear._forward_hooks
            and not linear._forward_pre_hooks and not hasattr(linear, "_hf_hook")
            and "forward" not in linear.__dict__ and linear.weight.is_floating_point()
            and not linear.weight.is_meta
            and linear.in_features % 16 == 0 and linear.out_features % 16 == 0)


def quantize_fp8(model: torch.nn.Module) -> dict:
    """Every nn.Linear of the model but its LM head becomes an Fp8Linear, in place (its
    weights freed one layer at a time). Returns {"layers": quantized, "kept": left as they
    were (sizes the FP8 GEMM cannot take), "bytes_before", "bytes_after"} of the weights."""
    head = model.get_output_embeddings()
    count = {"layers": 0, "kept": 0, "bytes_before": 0, "bytes_after": 0}
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, torch.nn.Linear) or child is head:
                continue
            if not fp8_fits(child):
                count["kept"] += 1
                continue
            quantized = Fp8Linear.of(child)
            count["bytes_before"] += child.weight.numel() * child.weight.element_size()
            count["bytes_after"] += (quantized.weight.numel() * quantized.weight.element_size()
                                     + quantized.weight_scale.numel() * 4)
            setattr(parent, name, quantized)
            count["layers"] += 1
    return count
