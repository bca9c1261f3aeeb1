"""Run a model's RMSNorms, rotary embeddings and gated-MLP activations through the engine's
one-kernel versions (kernels/rms_norm.py, kernels/rotary.py, kernels/activation.py) instead of
transformers' chains of small torch ops.

transformers owns the model math, so an op is swapped only where its code is provably the one
the kernel computes, compared by bytecode (the same instructions, constants and names):
- a norm module whose class's forward (and Gemma's `_norm`) is LlamaRMSNorm's or
  GemmaRMSNorm's. transformers generates most architectures' norms as copies of these two
  (Qwen2, Qwen3 with its per-head q/k norms, Mistral, Phi-3, ...; Gemma 1-3, ...); a norm of
  another form (OLMo 2's order, GPT-OSS's, Gemma 3n's, a LayerNorm) is left as it is;
- an attention module whose forward calls its modeling file's `apply_rotary_pos_emb`, where
  that function and its `rotate_half` are Llama's (Qwen2/3, Mistral, Gemma 1-3, Granite,
  DeepSeek-V3, ...). Its forward is transformers' own code, run with that one global name
  resolved to the kernel (a function built from the same code object, with the decorators'
  wrappers rebuilt around it); nothing else about it changes;
- an MLP module whose forward is LlamaMLP's (down(act(gate(x)) * up(x)): Qwen2/3, Mistral,
  Granite, DeepSeek-V3's dense layers, ...) with a SiLU activation: silu(gate) * up as one
  kernel between the same GEMMs (Gemma's GELU stays transformers').
Every swap is per module instance (its `forward`), so other models of the same classes in the
process, a reference baseline's say, keep transformers' own; unfuse_ops gives them back.
"""

import types
from dataclasses import dataclass

import torch
from transformers import activations
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.llama import modeling_llama

from w2s_engine.kernels.activation import silu_mul
from w2s_engine.kernels.rms_norm import rms_norm
from w2s_engine.kernels.rotary import rotary


def _code_key(fn):
    code = fn.__code__
    return code.co_code, code.co_consts, code.co_names, code.co_varnames


@dataclass(frozen=True)
class FusedOps:
    """How many of a model's modules run each kernel."""
    norms: int = 0
    rotary: int = 0
    mlps: int = 0

    def __bool__(self) -> bool:
        return bool(self.norms or self.rotary or self.mlps)


# ---- RMSNorm ------------------------------------------------------------------------------

# (forward's code, `_norm`'s code or None, the attribute holding eps, Gemma's 1 + weight form)
_NORM_FORMS = (
    (_code_key(modeling_llama.LlamaRMSNorm.forward), None, "variance_epsilon", False),
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
    for forward_key, norm_key, eps_name, unit_offset in _NORM_FORMS:
        if _code_key(forward) != forward_key:
            continue
        if norm_key is not None:
            helper = getattr(cls, "_norm", None)
            if getattr(helper, "__code__", None) is None or _code_key(helper) != norm_key:
                continue
        if isinstance(getattr(module, eps_name, None), (int, float)):
            return eps_name, unit_offset
    return None


def _fused_norm_forward(self, hidden_states):
    eps_name, unit_offset = self._w2s_rms_norm_form
    return self._w2s_rms_norm(hidden_states, self.weight, getattr(self, eps_name), unit_offset)


# ---- rotary embedding ---------------------------------------------------------------------

_ROTARY = "apply_rotary_pos_emb"
_LLAMA_ROTARY = (_code_key(modeling_llama.apply_rotary_pos_emb),
                 _code_key(modeling_llama.rotate_half))


def _innermost(fn):
    while getattr(fn, "__wrapped__", None) is not None:
        fn = fn.__wrapped__
    return fn


def calls_llama_rotary(module: torch.nn.Module) -> bool:
    """Whether the module's forward calls its modeling file's apply_rotary_pos_emb and that
    function (with its rotate_half) is Llama's, instruction for instruction."""
    forward = getattr(type(module), "forward", None)
    inner = _innermost(forward) if forward is not None else None
    if getattr(inner, "__code__", None) is None or "forward" in module.__dict__ \
            or _ROTARY not in inner.__code__.co_names:
        return False
    apply = inner.__globals__.get(_ROTARY)
    rotate = inner.__globals__.get("rotate_half")
    return (getattr(apply, "__code__", None) is not None
            and getattr(rotate, "__code__", None) is not None
            and (_code_key(apply), _code_key(rotate)) == _LLAMA_ROTARY)


def _rebound(fn, name: str, value):
    """fn run with the global `name` resolved to `value`: the innermost function rebuilt from
    its own code object with that one global replaced, each decorator's wrapper rebuilt around
    it (a wrapper holds what it wraps in a closure cell, functools.wraps style). None when a
    wrapper does not hold it that way."""
    inner = getattr(fn, "__wrapped__", None)
    if inner is None:
        new = types.FunctionType(fn.__code__, {**fn.__globals__, name: value}, fn.__name__,
                                 fn.__defaults__, fn.__closure__)
    else:
        new_inner = _rebound(inner, name, value)
        cells = fn.__closure__ or ()
        if new_inner is None or not any(_holds(c, inner) for c in cells):
            return None
        closure = tuple(types.CellType(new_inner) if _holds(c, inner) else c for c in cells)
        new = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__,
                                 closure)
    new.__kwdefaults__ = fn.__kwdefaults__
    new.__dict__.update(fn.__dict__)
    if inner is not None:
        new.__wrapped__ = new_inner
    return new


def _holds(cell, value) -> bool:
    try:
        return cell.cell_contents is value
    except ValueError:     # an empty cell
        return False


# ---- gated MLP ----------------------------------------------------------------------------

_LLAMA_MLP = _code_key(modeling_llama.LlamaMLP.forward)
# transformers' own SiLU module where this version has one (others use torch's nn.SiLU)
_SILU_MODULE = getattr(activations, "SiLUActivation", None)
_SILU = _code_key(_SILU_MODULE.forward) if _SILU_MODULE is not None else None


def is_silu_gated_mlp(module: torch.nn.Module) -> bool:
    """Whether the module's forward is LlamaMLP's, instruction for instruction, with a SiLU
    activation (torch's module or transformers' SiLUActivation, neither with a forward of its
    own)."""
    forward = getattr(type(module), "forward", None)
    act = getattr(module, "act_fn", None)
    if getattr(forward, "__code__", None) is None or "forward" in module.__dict__ \
            or _code_key(forward) != _LLAMA_MLP or not isinstance(act, torch.nn.Module) \
            or "forward" in act.__dict__:
        return False
    return type(act) is torch.nn.SiLU or (
        _SILU_MODULE is not None and isinstance(act, _SILU_MODULE)
        and _code_key(type(act).forward) == _SILU)


def _fused_mlp_forward(self, x):
    return self.down_proj(self._w2s_silu_mul(self.gate_proj(x), self.up_proj(x)))


# ---- the swap -----------------------------------------------------------------------------

def fuse_ops(model: torch.nn.Module, norm=rms_norm, rope=rotary, act=silu_mul) -> FusedOps:
    """Route every op of `model` that the kernels compute through them: each RMSNorm of
    Llama's or Gemma's form through `norm(x, weight, eps, unit_offset)`, each Llama-form
    rotary embedding through `rope(q, k, cos, sin, unsqueeze_dim)`, each SiLU-gated MLP's
    activation through `act(gate, up)`. The defaults dispatch (Triton on CUDA, the reference
    elsewhere); the tests pass the Triton functions to run the kernels under the interpreter.
    Returns how many modules of each were swapped."""
    norms = ropes = mlps = 0
    for module in model.modules():
        form = rms_norm_form(module)
        if form is not None:
            module._w2s_rms_norm = norm
            module._w2s_rms_norm_form = form
            module.forward = types.MethodType(_fused_norm_forward, module)
            norms += 1
        elif calls_llama_rotary(module):
            forward = _rebound(type(module).forward, _ROTARY, rope)
            if forward is not None:
                module._w2s_rotary = rope
                module.forward = types.MethodType(forward, module)
                ropes += 1
        elif is_silu_gated_mlp(module):
            module._w2s_silu_mul = act
            module.forward = types.MethodType(_fused_mlp_forward, module)
            mlps += 1
    return FusedOps(norms, ropes, mlps)


def unfuse_ops(model: torch.nn.Module) -> FusedOps:
    """Give the swapped modules transformers' forward back (a reference run on the same
    modules, say); returns how many of each."""
    norms = ropes = mlps = 0
    for module in model.modules():
        if "_w2s_rms_norm" in module.__dict__:
            del module.forward, module._w2s_rms_norm, module._w2s_rms_norm_form
            norms += 1
        elif "_w2s_rotary" in module.__dict__:
            del module.forward, module._w2s_rotary
            ropes += 1
        elif "_w2s_silu_mul" in module.__dict__:
            del module.forward, module._w2s_silu_mul
            mlps += 1
    return FusedOps(norms, ropes, mlps)


def fused_with(model: torch.nn.Module) -> tuple:
    """(norm, rope, act): the functions a fused model's modules were given (to fuse it again
    the same way after an unfuse)."""
    def given(attr, default):
        return next((m.__dict__[attr] for m in model.modules() if attr in m.__dict__), default)
    return (given("_w2s_rms_norm", rms_norm), given("_w2s_rotary", rotary),
            given("_w2s_silu_mul", silu_mul))
