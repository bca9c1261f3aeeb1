"""Run a model's RMSNorms through the one-kernel RMSNorm (kernels/rms_norm.py).

transformers owns the model math, so a norm is swapped only where its form is provably one the
kernel computes: its class's forward (and Gemma's `_norm`) has the bytecode of LlamaRMSNorm's
or GemmaRMSNorm's (the same instructions, constants and attribute names). transformers
generates most architectures' norms as copies of these two (Qwen2, Qwen3 with its per-head q/k
norms, Mistral, Phi-3, ...; Gemma 1-3, RecurrentGemma, ...); those match. A norm of another
form (OLMo 2's order, GPT-OSS's, Gemma 3n's, a LayerNorm) does not, and is left as it is. The
swap is per module instance (its `forward`), so other models of the same class in the process,
a reference baseline's say, keep transformers' own.
"""

import types

import torch
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from w2s_engine.kernels.rms_norm import rms_norm


def _code_key(fn):
    code = fn.__code__
    return code.co_code, code.co_consts, code.co_names, code.co_varnames


# (forward's code, `_norm`'s code or None, the attribute holding eps, Gemma's 1 + weight form)
_FORMS = (
    (_code_key(LlamaRMSNorm.forward), None, "variance_epsilon", False),
    (_code_key(GemmaRMSNorm.forward), _code_key(GemmaRMSNorm._norm), "eps", True),
)


def rms_norm_form(module: torch.nn.Module) -> tuple[str, bool] | None:
    """(eps attribute, unit_offset) when the module computes an RMSNorm the kernel computes,
    instruction for instruction; None otherwise (or when already swapped)."""
    cls = type(module)
    forward = getattr(cls, "forward", None)
    if (getattr(forward, "__code__", None) is None or "forward" in module.__dict__
            or not isinstance(getattr(module, "weight", None), torch.Tensor)):
        return None
    for forward_key, norm_key, eps_name, unit_offset in _FORMS:
        if _code_key(forward) != forward_key:
            continue
        if norm_key is not None:
            helper = getattr(cls, "_norm", None)
            if getattr(helper, "__code__", None) is None or _code_key(helper) != norm_key:
                continue
        if isinstance(getattr(module, eps_name, None), (int, float)):
            return eps_name, unit_offset
    return None


def _fused_forward(self, hidden_states):
    eps_name, unit_offset = self._w2s_rms_norm_form
    return self._w2s_rms_norm(hidden_states, self.weight, getattr(self, eps_name), unit_offset)


def fuse_rms_norms(model: torch.nn.Module, norm=rms_norm) -> int:
    """Route every RMSNorm of `model` in a form the kernel computes through
    `norm(x, weight, eps, unit_offset)`; returns how many. `norm`: the dispatching rms_norm
    (Triton on CUDA, the reference elsewhere), or rms_norm_triton to run the kernel under the
    interpreter."""
    count = 0
    for module in model.modules():
        form = rms_norm_form(module)
        if form is not None:
            module._w2s_rms_norm = norm
            module._w2s_rms_norm_form = form
            module.forward = types.MethodType(_fused_forward, module)
            count += 1
    return count


def unfuse_rms_norms(model: torch.nn.Module) -> int:
    """Give the swapped norms transformers' forward back (a reference run on the same
    modules, say); returns how many."""
    count = 0
    for module in model.modules():
        if "_w2s_rms_norm" in module.__dict__:
            del module.forward, module._w2s_rms_norm, module._w2s_rms_norm_form
            count += 1
    return count
