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
  kernel between the GEMMs (Gemma's GELU stays transformers'); where gate and up are plain
  nn.Linears, one GEMM computes both (vLLM's merged gate-up projection), whatever the
  activation;
- the query, key and value projections of an attention module whose forward calls them in
  that order, where they are plain nn.Linears of one input: one GEMM for the three (vLLM's
  QKV projection; models/merged_linears.py), the attention's code untouched;
- a decoder layer whose forward is LlamaDecoderLayer's (Qwen2/3, Mistral, Gemma, SmolLM3,
  DeepSeek-V3, GLM, ...) with a post-attention norm of a kernel's form: the residual add after
  attention and that norm as one kernel (add_rms_norm).
In a decode step of a few rows each small kernel costs a few microseconds whatever its size:
an 8B Llama's step runs 10 kernels a layer instead of 14 besides attention, 4 of them GEMMs
instead of 7 (bench/op_count.py).
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
from w2s_engine.kernels.rms_norm import add_rms_norm, rms_norm
from w2s_engine.kernels.rotary import rotary
from w2s_engine.models.merged_linears import (install_merged_forwards, merged_for,
                                              plain_linears, remove_merged_forwards)


def _code_key(fn):
    code = fn.__code__
    return code.co_code, code.co_consts, code.co_names, code.co_varnames


@dataclass(frozen=True)
class FusedOps:
    """How many of a model's modules run each kernel (norms, rotary, mlps: the activation),
    run one GEMM for their projections (qkv, gate_up), or add the residual in the norm's
    kernel (residual_norms: decoder layers)."""
    norms: int = 0
    rotary: int = 0
    mlps: int = 0
    qkv: int = 0
    gate_up: int = 0
    residual_norms: int = 0

    def __bool__(self) -> bool:
        return any(vars(self).values())


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


def _norm_form(module) -> tuple[str, bool] | None:
    """rms_norm_form of a norm, swapped or not."""
    return module.__dict__.get("_w2s_rms_norm_form") or rms_norm_form(module)


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


def is_gated_mlp(module: torch.nn.Module) -> bool:
    """Whether the module's forward is LlamaMLP's, instruction for instruction:
    down(act_fn(gate(x)) * up(x)), whatever its activation (Gemma's is GELU)."""
    forward = getattr(type(module), "forward", None)
    return getattr(forward, "__code__", None) is not None and "forward" not in module.__dict__ \
        and _code_key(forward) == _LLAMA_MLP


def is_silu_gated_mlp(module: torch.nn.Module) -> bool:
    """Whether the module's forward is LlamaMLP's, instruction for instruction, with a SiLU
    activation (torch's module or transformers' SiLUActivation, neither with a forward of its
    own)."""
    act = getattr(module, "act_fn", None)
    if not is_gated_mlp(module) or not isinstance(act, torch.nn.Module) \
            or "forward" in act.__dict__:
        return False
    return type(act) is torch.nn.SiLU or (
        _SILU_MODULE is not None and isinstance(act, _SILU_MODULE)
        and _code_key(type(act).forward) == _SILU)


def _fused_mlp_forward(self, x):
    """LlamaMLP.forward with gate and up as one GEMM where they were merged, and a SiLU
    activation times up as one kernel (_w2s_silu_mul; None: the module's own act_fn)."""
    merged = self.__dict__.get("_w2s_gate_up")
    if merged is None:
        gate, up = self.gate_proj(x), self.up_proj(x)
    else:
        gate, up = merged.project(x).split(merged.sizes, dim=-1)
    silu_mul_fn = self._w2s_silu_mul
    if silu_mul_fn is None:
        return self.down_proj(self.act_fn(gate) * up)
    return self.down_proj(silu_mul_fn(gate, up))


# ---- merged projections -------------------------------------------------------------------

_QKV = ("q_proj", "k_proj", "v_proj")


def qkv_linears(module: torch.nn.Module) -> list | None:
    """The q, k, v projections of an attention module whose forward calls them in that order,
    when one GEMM can compute them; None otherwise."""
    forward = getattr(type(module), "forward", None)
    inner = _innermost(forward) if forward is not None else None
    names = getattr(getattr(inner, "__code__", None), "co_names", ())
    if not all(n in names for n in _QKV) or \
            sorted(_QKV, key=names.index) != list(_QKV):
        return None
    linears = [getattr(module, n, None) for n in _QKV]
    return linears if plain_linears(linears) else None


# ---- residual add + norm ------------------------------------------------------------------

_LLAMA_LAYER = _code_key(_innermost(modeling_llama.LlamaDecoderLayer.forward))


def is_llama_decoder_layer(module: torch.nn.Module) -> bool:
    """Whether the module's forward is LlamaDecoderLayer's, instruction for instruction (its
    decorators aside), with a post-attention norm of a kernel's form."""
    forward = getattr(type(module), "forward", None)
    inner = _innermost(forward) if forward is not None else None
    if getattr(inner, "__code__", None) is None or "forward" in module.__dict__ \
            or _code_key(inner) != _LLAMA_LAYER:
        return False
    norm = getattr(module, "post_attention_layernorm", None)
    return isinstance(norm, torch.nn.Module) and _norm_form(norm) is not None


def _fused_layer_forward(self, hidden_states, *args, **kwargs):
    """LlamaDecoderLayer.forward with `hidden = residual + hidden` and the post-attention
    norm as one kernel. Its arguments reach the attention as transformers' forward passes
    them, positional ones by name (a deprecated keyword too, which the attention's own
    decorator renames as the layer's would have)."""
    call = {**dict(zip(self._w2s_layer_params, args)), **kwargs}
    residual = hidden_states
    hidden_states = self.input_layernorm(hidden_states)
    hidden_states, _ = self.self_attn(hidden_states=hidden_states, **call)
    norm = self.post_attention_layernorm
    eps_name, unit_offset = _norm_form(norm)
    hidden_states, residual = self._w2s_add_rms_norm(hidden_states, residual, norm.weight,
                                                     getattr(norm, eps_name), unit_offset)
    hidden_states = self.mlp(hidden_states)
    return residual + hidden_states


def _layer_params(layer_class) -> tuple[str, ...]:
    """The names of the layer forward's positional parameters after hidden_states."""
    code = _innermost(layer_class.forward).__code__
    return code.co_varnames[2:code.co_argcount]


# ---- the swap -----------------------------------------------------------------------------

def fuse_ops(model: torch.nn.Module, norm=rms_norm, rope=rotary, act=silu_mul,
             add_norm=add_rms_norm) -> FusedOps:
    """Route every op of `model` that the kernels compute through them: each RMSNorm of
    Llama's or Gemma's form through `norm(x, weight, eps, unit_offset)`, each Llama-form
    rotary embedding through `rope(q, k, cos, sin, unsqueeze_dim)`, each SiLU-gated MLP's
    activation through `act(gate, up)`, each Llama-form decoder layer's residual add and
    post-attention norm through `add_norm(x, residual, weight, eps, unit_offset)`; merge the
    q/k/v and gate/up projections where they are plain nn.Linears. The defaults dispatch
    (Triton on CUDA, the reference elsewhere); the tests pass the Triton functions to run the
    kernels under the interpreter. Returns how many modules of each were swapped."""
    count = dict.fromkeys(("norms", "rotary", "mlps", "qkv", "gate_up", "residual_norms"), 0)
    merged_any = False
    for module in model.modules():
        if is_llama_decoder_layer(module):
            module._w2s_add_rms_norm = add_norm
            module._w2s_layer_params = _layer_params(type(module))
            module.forward = types.MethodType(_fused_layer_forward, module)
            count["residual_norms"] += 1
            continue
        form = rms_norm_form(module)
        if form is not None:
            module._w2s_rms_norm = norm
            module._w2s_rms_norm_form = form
            module.forward = types.MethodType(_fused_norm_forward, module)
            count["norms"] += 1
            continue
        linears = qkv_linears(module)
        if linears is not None:
            install_merged_forwards(linears, merged_for(module, "_w2s_qkv", linears))
            count["qkv"] += 1
            merged_any = True
        if calls_llama_rotary(module):
            forward = _rebound(type(module).forward, _ROTARY, rope)
            if forward is not None:
                module._w2s_rotary = rope
                module.forward = types.MethodType(forward, module)
                count["rotary"] += 1
        elif is_gated_mlp(module):
            silu = is_silu_gated_mlp(module)
            linears = [module.gate_proj, module.up_proj]
            merge = plain_linears(linears)
            if merge:
                merged_for(module, "_w2s_gate_up", linears)
                count["gate_up"] += 1
                merged_any = True
            else:       # a merge made before that no longer holds (a LoRA wraps them now)
                module.__dict__.pop("_w2s_gate_up", None)
            if silu or merge:
                module._w2s_silu_mul = act if silu else None
                module.forward = types.MethodType(_fused_mlp_forward, module)
                count["mlps"] += silu
    if merged_any and next(model.parameters()).is_cuda:
        # the projections' old weights were freed in pieces the caching allocator keeps;
        # give them back so the KV pool, allocated next, can have that memory
        torch.cuda.empty_cache()
    return FusedOps(**count)


def unfuse_ops(model: torch.nn.Module) -> FusedOps:
    """Give the swapped modules transformers' forward back (a reference run on the same
    modules, say); returns how many of each. Merged projections keep their shared weight
    (each module's own is a slice of it), so they compute as before, and a later fuse_ops
    merges them again at no cost."""
    count = dict.fromkeys(("norms", "rotary", "mlps", "qkv", "gate_up", "residual_norms"), 0)
    for module in model.modules():
        d = module.__dict__
        if "_w2s_add_rms_norm" in d:
            del module.forward, module._w2s_add_rms_norm, module._w2s_layer_params
            count["residual_norms"] += 1
        elif "_w2s_rms_norm" in d:
            del module.forward, module._w2s_rms_norm, module._w2s_rms_norm_form
            count["norms"] += 1
        else:
            remove_merged_forwards(module)
        if "_w2s_qkv" in d and "_w2s_merged" in module.q_proj.__dict__:
            count["qkv"] += 1
        if "_w2s_rotary" in d:
            del module.forward, module._w2s_rotary
            count["rotary"] += 1
        elif "_w2s_silu_mul" in d:
            count["mlps"] += d["_w2s_silu_mul"] is not None
            del module.forward, module._w2s_silu_mul
            count["gate_up"] += "_w2s_gate_up" in d and d["_w2s_gate_up"].backs(
                [module.gate_proj, module.up_proj])
    return FusedOps(**count)


def fused_with(model: torch.nn.Module) -> tuple:
    """(norm, rope, act, add_norm): the functions a fused model's modules were given (to fuse
    it again the same way after an unfuse)."""
    def given(attr, default):
        return next((m.__dict__[attr] for m in model.modules()
                     if m.__dict__.get(attr) is not None), default)
    return (given("_w2s_rms_norm", rms_norm), given("_w2s_rotary", rotary),
            given("_w2s_silu_mul", silu_mul), given("_w2s_add_rms_norm", add_rms_norm))
