"""Projections of one input as one GEMM, as vLLM's QKV and merged gate-up projections are.

In a decode step of a few rows each GEMM reads its whole weight, and the small ones (an 8B
Llama's k and v projections: 8 MB each) cannot fill the GPU: one GEMM of the three (or two)
outputs reads the same bytes in one well-sized kernel. transformers' modules stay as they are:
each projection's weight becomes a row slice of the merged weight (no second copy), so they
compute the same unswapped, and the code that calls them runs unchanged:
- a module that owns the merged projections (an MLP whose forward the engine runs) calls
  F.linear on the merged weight and splits the result;
- an attention whose own code calls q_proj, k_proj and v_proj on one input gets the merge
  through those modules' forwards (install_merged_forwards): q_proj's call runs the GEMM,
  and k_proj's and v_proj's calls on the same input tensor take their slices of it; a call
  on another input runs its own GEMM on its own weight.
"""

import types
from dataclasses import dataclass, field

import torch

from w2s_engine.models.fp8_linear import Fp8Linear, apply_linear


@dataclass(eq=False)
class MergedProjection:
    """Projections of one input as one GEMM. weight [sum(sizes), in] (and bias): the modules'
    own parameters are its row slices; scale [sum(sizes), 1]: their FP8 row scales (None:
    not FP8). in_flight: the input of the last merged call and the outputs of its later
    projections, until they are asked for."""
    weight: torch.Tensor
    bias: torch.Tensor | None
    sizes: tuple[int, ...]
    scale: torch.Tensor | None = None
    in_flight: list | None = field(default=None, repr=False)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """The one GEMM: every projection's output, side by side [..., sum(sizes)]."""
        return apply_linear(x, self.weight, self.bias, self.scale)

    def backs(self, linears) -> bool:
        """Whether the modules' parameters are still the slices of this weight (a weight
        assigned since then is not)."""
        start = 0
        for linear, size in zip(linears, self.sizes):
            parts = [(linear.weight, self.weight)] + (
                [(linear.bias, self.bias)] if self.bias is not None else [])
            if any(p.data_ptr() != whole[start].data_ptr() or p.shape[0] != size
                   for p, whole in parts):
                return False
            start += size
        return True


def merge_linears(linears) -> MergedProjection:
    """One weight (and bias) for the modules, their own parameters becoming its row slices
    (no second copy: the old tensors are freed)."""
    with torch.no_grad():
        weight = torch.cat([m.weight for m in linears])
        bias = torch.cat([m.bias for m in linears]) if linears[0].bias is not None else None
        fp8 = isinstance(linears[0], Fp8Linear)
        scale = torch.cat([m.weight_scale for m in linears]) if fp8 else None
        start = 0
        for m in linears:
            size = m.weight.shape[0]
            m.weight = torch.nn.Parameter(weight[start:start + size], requires_grad=False)
            if bias is not None:
                m.bias = torch.nn.Parameter(bias[start:start + size], requires_grad=False)
            if fp8:
                m.weight_scale = scale[start:start + size]
            start += size
    return MergedProjection(weight, bias, tuple(m.weight.shape[0] for m in linears), scale)


def plain_linears(linears) -> bool:
    """Whether one GEMM can compute the modules: torch's own nn.Linear, or all the engine's
    Fp8Linear (not a LoRA or another quantized layer), unswapped and without hooks, of one
    input size, dtype and device, all with a bias or none, with real (not meta) weights."""
    first = linears[0]
    if type(first) not in (torch.nn.Linear, Fp8Linear) or \
            not all(type(m) is type(first) for m in linears):
        return False
    return all("forward" not in m.__dict__ and not m._forward_hooks
               and not m._forward_pre_hooks and not hasattr(m, "_hf_hook")
               and m.in_features == first.in_features and m.weight.dtype == first.weight.dtype
               and m.weight.device == first.weight.device and not m.weight.is_meta
               and (m.bias is None) == (first.bias is None) for m in linears)


def merged_for(owner, attr: str, linears) -> MergedProjection:
    """The owner's merged projection of the modules: the one made before if it still backs
    them (a model fused again after unfuse_ops), else a new one."""
    merged = owner.__dict__.get(attr)
    if merged is None or not merged.backs(linears):
        merged = merge_linears(linears)
        setattr(owner, attr, merged)
    return merged


def _merged_first_forward(self, x):
    """q_proj's call: the one GEMM for q, k and v; k's and v's outputs wait for their calls."""
    merged = self._w2s_merged
    first, *rest = merged.project(x).split(merged.sizes, dim=-1)
    merged.in_flight = [x, *rest]
    return first


def _merged_later_forward(self, x):
    """k_proj's or v_proj's call: its slice of the merged GEMM on the same input tensor (the
    attention's code calls all three on one hidden_states), or a GEMM of its own on another."""
    merged, i = self._w2s_merged, self._w2s_merged_index
    in_flight = merged.in_flight
    if in_flight is None or in_flight[0] is not x or in_flight[i] is None:
        return apply_linear(x, self.weight, self.bias, getattr(self, "weight_scale", None))
    out, in_flight[i] = in_flight[i], None
    if all(o is None for o in in_flight[1:]):
        merged.in_flight = None      # nothing of the call is held past it
    return out


def install_merged_forwards(linears, merged: MergedProjection) -> None:
    """Route the modules' calls through the merged GEMM: the first runs it, the others take
    their slices of its output for the same input."""
    for i, linear in enumerate(linears):
        linear._w2s_merged, linear._w2s_merged_index = merged, i
        linear.forward = types.MethodType(
            _merged_later_forward if i else _merged_first_forward, linear)


def remove_merged_forwards(linear) -> bool:
    """Give a module its own forward back (its weight stays a slice of the merged one);
    whether it had the merged one."""
    if "_w2s_merged" not in linear.__dict__:
        return False
    del linear.forward, linear._w2s_merged, linear._w2s_merged_index
    return True
