"""FP8 weights for the large model's linear layers (vLLM's `--quantization fp8`).

A decode step of a search's few hundred rows reads every weight once, and reading them is most
of its time (issue 16's floor: weight bytes / HBM bandwidth). Stored in float8 (e4m3) the
weights are half the bytes of bfloat16: the floor halves, and the memory they free goes to
the KV pools. The scheme is vLLM's dynamic FP8 (and the FP8 checkpoints' "channel-wise
weights, dynamic per-token activations"): each output row of a weight has its own fp32 scale
(its largest magnitude maps to e4m3's 448), each input row (token) is quantized with its own
scale as it arrives, and one scaled GEMM (torch._scaled_mm: the Hopper and Ada FP8 tensor
cores on CUDA, a reference on CPU) multiplies the two and rescales. A row's quantization
depends only on that row, so a search's tokens do not depend on its batch beyond the model's
own rounding, which FP8's coarse steps amplify (dequantized()).

A checkpoint the engine loads itself is quantized as it loads, one weight at a time, through
transformers' own loading (a quantizer of its kind, `streaming_config`): the bf16 model is
never whole in memory, so a model whose FP8 weights fit can load where its bf16 ones would
not (the case it is for, Llama-3-70B's 70 GB on one H200, is untried: no GPU was at hand). A
model passed in memory is quantized in place.

Only the large model: the small pair's rewards are log-probability differences that a
coarser tuned or untuned model would change. The LM head keeps its dtype (vLLM's too), and a
layer whose sizes the FP8 GEMM cannot take (not multiples of 16) stays as it is.
"""

from contextlib import contextmanager

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


_dequantized = [0]     # > 0: inside dequantized()


@contextmanager
def dequantized():
    """Fp8Linear layers compute with their weights dequantized and their inputs unquantized.
    For the load-time probe, which compares a decode with a full forward: their inputs differ
    by rounding (1e-5), which FP8's coarse steps turn into flips that compound over the
    layers (logits 2 apart on SmolLM2-135M), though each row is quantized on its own."""
    _dequantized[0] += 1
    try:
        yield
    finally:
        _dequantized[0] -= 1


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear for an FP8 weight: x [..., K] in the model's dtype; weight [N, K] float8;
    scale [N, 1] fp32 (weight ~= weight * scale row by row) -> [..., N] in x's dtype. Each row
    of x is quantized with its own scale, then one scaled GEMM."""
    if _dequantized[0]:
        return F.linear(x, (weight.float() * scale).to(x.dtype), bias)
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


def shell_for(linear: torch.nn.Module) -> Fp8Linear | None:
    """An Fp8Linear of the linear's sizes, with empty (meta) tensors for the loader to fill:
    None where the FP8 GEMM cannot take it (not torch's own nn.Linear, or sizes that are not
    multiples of 16)."""
    if type(linear) is not torch.nn.Linear or linear.in_features % 16 or \
            linear.out_features % 16:
        return None
    meta = {"device": "meta"}
    bias = None if linear.bias is None else torch.empty(linear.out_features,
                                                        dtype=linear.bias.dtype, **meta)
    return Fp8Linear(torch.empty(linear.out_features, linear.in_features, dtype=FP8, **meta),
                     torch.empty(linear.out_features, 1, **meta), bias)


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
    weights freed one layer at a time). Returns {"layers": in FP8 (those quantized as they
    loaded too), "kept": left as they were (sizes the FP8 GEMM cannot take), "bytes_before",
    "bytes_after"} of their weights (before: in the model's dtype)."""
    head = model.get_output_embeddings()
    dtype_size = torch.empty((), dtype=model.dtype).element_size()
    count = {"layers": 0, "kept": 0, "bytes_before": 0, "bytes_after": 0}
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Fp8Linear):      # quantized as it loaded
                count["layers"] += 1
                count["bytes_before"] += child.weight.numel() * dtype_size
                count["bytes_after"] += child.weight.numel() + 4 * child.out_features
                continue
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


_STREAMING = {}     # the transformers quantizer's classes, registered once


def streaming_config():
    """transformers' quantization_config that makes from_pretrained quantize the linears as
    it loads them (this module's scheme: Fp8Linear shells before loading, each weight
    quantized as it arrives); None where this transformers has no such hooks (the model is
    then quantized after loading, whole in memory first)."""
    if "config" not in _STREAMING:
        try:
            _STREAMING["config"] = _register_streaming()
        except (ImportError, AttributeError, TypeError, ValueError):
            _STREAMING["config"] = None
    config = _STREAMING["config"]
    return None if config is None else config()


def _register_streaming():
    from transformers.core_model_loading import ConversionOps
    from transformers.quantizers.auto import register_quantization_config, register_quantizer
    from transformers.quantizers.base import HfQuantizer
    from transformers.utils.quantization_config import QuantizationConfigMixin

    class Fp8Config(QuantizationConfigMixin):
        def __init__(self, **kwargs):
            self.quant_method = "w2s_fp8"

    class Quantize(ConversionOps):
        """A linear's weight as it loads -> its FP8 weight and row scales."""

        def convert(self, input_dict, *args, **kwargs):
            out = {}
            for key, value in input_dict.items():
                weight, scale = quantize_rows(value[0] if isinstance(value, list) else value)
                out[key] = weight
                out[key.rsplit(".", 1)[0] + ".weight_scale"] = scale
            return out

    class Fp8Quantizer(HfQuantizer):
        requires_calibration = False

        def validate_environment(self, *args, **kwargs):
            pass

        def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
            module, _, name = param_name.rpartition(".")
            return name == "weight" and isinstance(model.get_submodule(module), Fp8Linear)

        def _process_model_before_weight_loading(self, model, **kwargs):
            head = model.get_output_embeddings()
            for parent in list(model.modules()):
                for name, child in list(parent.named_children()):
                    shell = None if child is head else shell_for(child)
                    if shell is not None:
                        setattr(parent, name, shell)

        def _process_model_after_weight_loading(self, model, **kwargs):
            return model

        def get_quantize_ops(self):
            return Quantize()

        def is_serializable(self, *args, **kwargs):
            return False

        @property
        def is_trainable(self) -> bool:
            return False

    register_quantization_config("w2s_fp8")(Fp8Config)
    register_quantizer("w2s_fp8")(Fp8Quantizer)
    return Fp8Config
