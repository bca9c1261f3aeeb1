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
  QKV projection). The attention's code is untouched: q_proj's call runs the merged GEMM and
  hands k_proj's and v_proj's calls on the same input tensor their slices of it (a call on
  another input runs its own GEMM);
- a decoder layer whose forward is LlamaDecoderLayer's (Qwen2/3, Mistral, Gemma, SmolLM3,
  DeepSeek-V3, GLM, ...) with a post-attention norm of a kernel's form: the residual add after
  attention and that norm as one kernel (add_rms_norm).
In a decode step of a few rows each small kernel costs a few microseconds whatever its size
and each GEMM reads its whole weight: one GEMM of three (or two) outputs fills the GPU better
than three (or two) small ones, and an 8B Llama's step runs 4 GEMMs a layer instead of 7 and
10 kernels instead of 14 (bench/op_count.py).
The merged weights take no second copy: each projection's weight becomes a row slice of its
merged weight, so transformers' own modules compute the same when unswapped.
Every swap is per module instance (its `forward`), so other models of the same classes in the
process, a reference baseline's say, keep transformers' own; unfuse_ops gives them back.
"""

import types
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import activations
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.llama import modeling_llama

from w2s_engine.kernels.activation import silu_mul
from w2s_engine.kernels.rms_norm import add_rms_norm, rms_norm
from w2s_engine.kernels.rotary import rotary


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
        gate, up = F.linear(x, merged.weight, merged.bias).split(merged.sizes, dim=-1)
    silu_mul_fn = self._w2s_silu_mul
    if silu_mul_fn is None:
        return self.down_proj(self.act_fn(gate) * up)
    return self.down_proj(silu_mul_fn(gate, up))


# ---- merged projections -------------------------------------------------------------------

@dataclass(eq=False)
class MergedProjection:
    """Projections of one input as one GEMM. weight [sum(sizes), in] (and bias): the modules'
    own parameters are its row slices. in_flight: the input of the last merged call and the
    outputs of its later projections, until they are asked for."""
    weight: torch.Tensor
    bias: torch.Tensor | None
    sizes: tuple[int, ...]
    in_flight: list | None = field(default=None, repr=False)

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
        start = 0
        for m in linears:
            size = m.weight.shape[0]
            m.weight = torch.nn.Parameter(weight[start:start + size], requires_grad=False)
            if bias is not None:
                m.bias = torch.nn.Parameter(bias[start:start + size], requires_grad=False)
            start += size
    return MergedProjection(weight, bias, tuple(m.weight.shape[0] for m in linears))


def plain_linears(linears) -> bool:
    """Whether one GEMM can compute the modules: torch's own nn.Linear (not a LoRA or a
    quantized layer), unswapped and without hooks, of one input size, dtype and device, all
    with a bias or none, with real (not meta) weights."""
    first = linears[0]
    if not all(type(m) is torch.nn.Linear for m in linears):
        return False
    return all("forward" not in m.__dict__ and not m._forward_hooks
               and not m._forward_pre_hooks and not hasattr(m, "_hf_hook")
               and m.in_features == first.in_features and m.weight.dtype == first.weight.dtype
               and m.weight.device == first.weight.device and not m.weight.is_meta
               and (m.bias is None) == (first.bias is None) for m in linears)


def _merged(owner, attr: str, linears) -> MergedProjection:
    """The owner's merged projection of the modules: the one made before if it still backs
    them (a model fused again after unfuse_ops), else a new one."""
    merged = owner.__dict__.get(attr)
    if merged is None or not merged.backs(linears):
        merged = merge_linears(linears)
        setattr(owner, attr, merged)
    return merged


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


def _merged_first_forward(self, x):
    """q_proj's call: the one GEMM for q, k and v; k's and v's outputs wait for their calls."""
    merged = self._w2s_merged
    first, *rest = F.linear(x, merged.weight, merged.bias).split(merged.sizes, dim=-1)
    merged.in_flight = [x, *rest]
    return first


def _merged_later_forward(self, x):
    """k_proj's or v_proj's call: its slice of the merged GEMM on the same input tensor (the
    attention's code calls all three on one hidden_states), or a GEMM of its own on another."""
    merged, i = self._w2s_merged, self._w2s_merged_index
    in_flight = merged.in_flight
    if in_flight is None or in_flight[0] is not x or in_flight[i] is None:
        return F.linear(x, self.weight, self.bias)
    out, in_flight[i] = in_flight[i], None
    if all(o is None for o in in_flight[1:]):
        merged.in_flight = None      # nothing of the call is held past it
    return out


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
            merged = _merged(module, "_w2s_qkv", linears)
            for i, linear in enumerate(linears):
                linear._w2s_merged, linear._w2s_merged_index = merged, i
                linear.forward = types.MethodType(
                    _merged_later_forward if i else _merged_first_forward, linear)
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
                _merged(module, "_w2s_gate_up", linears)
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
        elif "_w2s_merged" in d:
            del module.forward, module._w2s_merged, module._w2s_merged_index
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
