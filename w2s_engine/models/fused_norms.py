"""Run a model's RMSNorms of Llama's form through the one-kernel RMSNorm (kernels/rms_norm.py).

transformers owns the model math, so a norm is swapped only where it is provably Llama's: its
class's forward has the bytecode of LlamaRMSNorm.forward (the same instructions, constants and
attribute names: `weight`, `variance_epsilon`). transformers generates most architectures'
norms as copies of Llama's (Qwen2, Qwen3 with its per-head q/k norms, Mistral, ...); those
match. A norm of another form (Gemma's 1 + weight, OLMo's order, a LayerNorm) does not match
and is left as it is. The swap is per module instance (its `forward`), so other models of the
same class in the process, a reference baseline's say, keep transformers' own.
"""

import types

import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from w2s_engine.kernels.rms_norm import rms_norm


def _code_key(fn):
    code = fn.__code__
    return code.co_code, code.co_consts, code.co_names, code.co_varnames


_LLAMA_FORWARD = _code_key(LlamaRMSNorm.forward)


def is_llama_rms_norm(module: torch.nn.Module) -> bool:
    """Whether the module's forward is LlamaRMSNorm's, instruction for instruction."""
    forward = getattr(type(module), "forward", None)
    return (getattr(forward, "__code__", None) is not None
            and _code_key(forward) == _LLAMA_FORWARD
            and isinstance(getattr(module, "weight", None), torch.Tensor)
            and "forward" not in module.__dict__)   # no forward of its own already


def _fused_forward(self, hidden_states):
    return self._w2s_rms_norm(hidden_states, self.weight, self.variance_epsilon)


def fuse_rms_norms(model: torch.nn.Module, norm=rms_norm) -> int:
    """Route every Llama-form RMSNorm of `model` through `norm(x, weight, eps)`; returns how
    many. `norm`: the dispatching rms_norm (Triton on CUDA, the reference elsewhere), or
    rms_norm_triton to run the kernel under the interpreter."""
    count = 0
    for module in model.modules():
        if is_llama_rms_norm(module):
            module._w2s_rms_norm = norm
            module.forward = types.MethodType(_fused_forward, module)
            count += 1
    return count


def unfuse_rms_norms(model: torch.nn.Module) -> int:
    """Give the swapped norms transformers' forward back (a reference run on the same
    modules, say); returns how many."""
    count = 0
    for module in model.modules():
        if "_w2s_rms_norm" in module.__dict__:
            del module.forward, module._w2s_rms_norm
            count += 1
    return count
