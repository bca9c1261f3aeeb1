"""The engine's one-kernel RMSNorm (with and without the residual add before it), rotary
embedding and SiLU-gated activation against transformers' own (LlamaRMSNorm, GemmaRMSNorm,
apply_rotary_pos_emb, ...), and the swap of a model's ops: only ops of those forms are
swapped, merged q/k/v and gate/up projections share their weights with the modules, a swapped
model computes transformers' logits, and the load-time probe puts back an op a kernel gets
wrong.

On CPU the kernels run under TRITON_INTERPRET=1 (tests/conftest.py) on small fp32/fp16 shapes.
"""

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

from tiny_models import clone, make_tokenizer, tiny_gemma2, tiny_llama, tiny_phi, tuned_from
from w2s_engine import Engine, SearchParams
from w2s_engine.kernels.activation import silu_mul_ref, silu_mul_triton
from w2s_engine.kernels.rms_norm import (MAX_ONE_TILE, add_rms_norm_ref, add_rms_norm_triton,
                                         rms_norm_ref, rms_norm_triton)
from w2s_engine.kernels.rotary import rotary, rotary_ref, rotary_triton
from w2s_engine.models.fused_ops import (FusedOps, calls_llama_rotary, fuse_ops,
                                         is_llama_decoder_layer, is_silu_gated_mlp,
                                         rms_norm_form, unfuse_ops)

# the kernels, under the interpreter
TRITON = {"norm": rms_norm_triton, "rope": rotary_triton, "act": silu_mul_triton,
          "add_norm": add_rms_norm_triton}
# a tiny Llama-form model of two layers, every op swapped: five norms (two of them as the
# layers' residual add + norm), two rotary embeddings, two activations, two merged q/k/v and
# two merged gate/up projections
ALL_OF_TWO_LAYERS = FusedOps(norms=5, rotary=2, mlps=2, qkv=2, gate_up=2, residual_norms=2)


def transformers_norm(hidden: int, eps: float, weight: torch.Tensor, gemma: bool = False):
    norm = (GemmaRMSNorm if gemma else LlamaRMSNorm)(hidden, eps)
    with torch.no_grad():
        norm.weight = torch.nn.Parameter(weight.clone())
    return norm


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(3, 64), (2, 3, 100), (2, MAX_ONE_TILE + 200)],
                         ids=["rows", "leading-dims-odd-width", "wider-than-one-tile"])
@pytest.mark.parametrize("gemma", [False, True], ids=["llama-form", "gemma-form"])
def test_norm_kernel_matches_transformers_norm(dtype, shape, gemma):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=g) * 3).to(dtype)
    weight = (1 + torch.randn(shape[-1], generator=g) / 4).to(dtype)
    want = transformers_norm(shape[-1], 1e-5, weight, gemma).to(dtype)(x)
    got = rms_norm_triton(x, weight, 1e-5, unit_offset=gemma)
    assert got.dtype == want.dtype and got.shape == want.shape
    tol = 1e-6 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    torch.testing.assert_close(rms_norm_ref(x, weight, 1e-5, gemma), want, atol=0, rtol=0)


def test_norm_kernel_keeps_transformers_dtype_promotion_and_reads_strided_rows():
    """An fp32 weight on fp16 activations gives fp32 (transformers promotes), and rows that
    are a strided slice of a wider tensor are read where they lie."""
    g = torch.Generator().manual_seed(1)
    wide = torch.randn(4, 5, 96, generator=g).to(torch.float16)
    x = wide[:, :, :80]                       # not viewable as [20, 80]
    weight = 1 + torch.randn(80, generator=g) / 4
    want = transformers_norm(80, 1e-6, weight)(x)
    got = rms_norm_triton(x, weight, 1e-6)
    assert want.dtype == got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=2e-6, rtol=2e-6)
    # Qwen3's per-head norm of the queries, a slice of a merged q/k/v projection viewed as
    # [1, T, heads, D]: rows in runs of one token's heads
    qkv = torch.randn(1, 5, 128, generator=g)
    q = qkv[..., :64].view(1, 5, 4, 16)
    weight = 1 + torch.randn(16, generator=g) / 4
    got = rms_norm_triton(q, weight, 1e-6)
    torch.testing.assert_close(got, transformers_norm(16, 1e-6, weight)(q), atol=2e-6, rtol=2e-6)
    assert got.is_contiguous()


def test_norm_kernel_refuses_a_weight_of_the_wrong_width():
    with pytest.raises(ValueError, match=r"weight must be \[64\]"):
        rms_norm_triton(torch.randn(2, 64), torch.ones(32), 1e-6)
    with pytest.raises(ValueError, match=r"x and residual must share a shape and dtype"):
        add_rms_norm_triton(torch.randn(2, 64), torch.randn(2, 64).half(), torch.ones(64), 1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("width", [100, MAX_ONE_TILE + 200], ids=["one-tile", "looped"])
@pytest.mark.parametrize("gemma", [False, True], ids=["llama-form", "gemma-form"])
def test_add_norm_kernel_matches_a_decoder_layers_residual_add_then_norm(dtype, width, gemma):
    """`hidden = residual + hidden; norm(hidden)` as a Llama decoder layer runs it: the sum
    rounded as torch's add rounds it (the same values), the norm of that sum."""
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(2, 3, width, generator=g) * 3).to(dtype)
    wide = (torch.randn(2, 3, width + 8, generator=g) * 3).to(dtype)
    residual = wide[..., :width]          # rows read where they lie
    if width < 1000:        # both strided, in runs of 3 rows 4 rows apart (the kernel's
        # [A, B, H] indexing)
        x = (torch.randn(2, 4, width + 4, generator=g) * 3).to(dtype)[:, :3, :width]
        residual = (torch.randn(2, 4, width + 8, generator=g) * 3).to(dtype)[:, :3, :width]
    weight = (1 + torch.randn(width, generator=g) / 4).to(dtype)
    want_sum = residual + x
    want = transformers_norm(width, 1e-5, weight, gemma).to(dtype)(want_sum)
    got, got_sum = add_rms_norm_triton(x, residual, weight, 1e-5, unit_offset=gemma)
    torch.testing.assert_close(got_sum, want_sum, atol=0, rtol=0)
    assert got.dtype == want.dtype and got.shape == want.shape
    tol = 1e-6 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    if dtype == torch.float16:
        # the norm of the rounded sum, as the layer takes it: the same values but where the
        # order of the sum of squares moves a rounding (of the unrounded sum: a fifth differ)
        assert (got == want).float().mean() > 0.99
    ref, ref_sum = add_rms_norm_ref(x, residual, weight, 1e-5, gemma)
    torch.testing.assert_close(ref, want, atol=0, rtol=0)
    torch.testing.assert_close(ref_sum, want_sum, atol=0, rtol=0)


def rope_inputs(dtype, batch=1, tokens=5, hq=4, hk=2, d=16, cos_batch=None, seed=0):
    """q and k as a transformers attention layer makes them ([B, T, H, D] projections viewed
    as [B, H, T, D]), and cos / sin as its rotary embedding does (cast to the model's dtype)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, tokens, hq, d, generator=g).to(dtype).transpose(1, 2)
    k = torch.randn(batch, tokens, hk, d, generator=g).to(dtype).transpose(1, 2)
    angles = torch.rand(cos_batch or batch, tokens, d // 2, generator=g) * 20
    angles = torch.cat((angles, angles), dim=-1)
    return q, k, angles.cos().to(dtype), angles.sin().to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", ["decode-batch", "batched-prompts", "cos-broadcast", "sliced",
                                  "merged-qkv"])
def test_rotary_kernel_matches_transformers_apply_rotary_pos_emb(dtype, case):
    if case == "sliced":    # Phi's partial rotary: the first half of each head, a strided view
        q, k, cos, sin = rope_inputs(dtype, d=32)
        q, k = q[..., :16], k[..., :16]
        cos, sin = cos[..., :16].contiguous(), sin[..., :16].contiguous()
    elif case == "merged-qkv":  # q and k as slices of one [B, T, (4 + 2 + 2) * 16] projection
        _, _, cos, sin = rope_inputs(dtype)
        qkv = torch.randn(1, 5, 128, generator=torch.Generator().manual_seed(4)).to(dtype)
        q = qkv[..., :64].view(1, 5, 4, 16).transpose(1, 2)
        k = qkv[..., 64:96].view(1, 5, 2, 16).transpose(1, 2)
    else:
        q, k, cos, sin = rope_inputs(dtype, batch=1 if case == "decode-batch" else 3,
                                     cos_batch=1 if case == "cos-broadcast" else None)
    want_q, want_k = apply_rotary_pos_emb(q, k, cos, sin)
    got_q, got_k = rotary_triton(q, k, cos, sin)
    ref_q, ref_k = rotary_ref(q, k, cos, sin)
    for got, ref, want in ((got_q, ref_q, want_q), (got_k, ref_k, want_k)):
        # laid out as torch's ops lay it out: the attention reads [T, H, D] rows with no copy
        assert got.dtype == want.dtype and got.shape == want.shape
        assert got.stride() == want.stride()
        # each op rounds as torch's does: the same values (fp32 to its last bit)
        torch.testing.assert_close(got, want, atol=1e-6 if dtype == torch.float32 else 0,
                                   rtol=1e-6 if dtype == torch.float32 else 0)
        torch.testing.assert_close(ref, want, atol=0, rtol=0)


def test_rotary_takes_other_layouts_to_the_reference():
    q, k, cos, sin = rope_inputs(torch.float32)
    qt, kt = q.transpose(1, 2), k.transpose(1, 2)        # [B, T, H, D]: unsqueeze_dim 2
    want = apply_rotary_pos_emb(qt, kt, cos, sin, unsqueeze_dim=2)
    for got, ref in zip(rotary(qt, kt, cos, sin, unsqueeze_dim=2), want):
        torch.testing.assert_close(got, ref, atol=0, rtol=0)
    with pytest.raises(ValueError, match=r"the kernel takes \[B, H, T, D\]"):
        rotary_triton(qt, kt, cos, sin, unsqueeze_dim=2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_silu_mul_kernel_matches_transformers_activation_times_up(dtype):
    g = torch.Generator().manual_seed(0)
    wide = (torch.randn(2, 3, 1500, generator=g) * 4).to(dtype)
    gate, up = wide[..., :1300], (torch.randn(2, 3, 1300, generator=g) * 2).to(dtype)
    want = transformers.activations.ACT2FN["silu"](gate) * up
    got = silu_mul_triton(gate, up)       # gate a strided slice; two column tiles
    assert got.dtype == want.dtype and got.shape == want.shape
    tol = 1e-6 if dtype == torch.float32 else 1e-3
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    if dtype == torch.float16:
        # the activation rounded before the product, as torch's two ops do: the same values
        # but where the two exps' last fp32 bit moves a rounding
        assert (got == want).float().mean() > 0.999
    torch.testing.assert_close(silu_mul_ref(gate, up), want, atol=0, rtol=0)


def tiny_qwen3(vocab_size: int, seed: int, layers: int = 2, hidden: int = 64):
    """Qwen3: RMSNorms on every head's queries and keys as well."""
    torch.manual_seed(seed)
    cfg = transformers.Qwen3Config(
        num_hidden_layers=layers, hidden_size=hidden, intermediate_size=2 * hidden,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=vocab_size,
        max_position_embeddings=512, bos_token_id=0, eos_token_id=1, tie_word_embeddings=False)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


def tiny_olmo2(vocab_size: int, seed: int, layers: int = 2, hidden: int = 64):
    """OLMo 2: an RMSNorm of neither form (the weight multiplies before the rounding), and
    its own rotary function."""
    torch.manual_seed(seed)
    cfg = transformers.Olmo2Config(
        num_hidden_layers=layers, hidden_size=hidden, intermediate_size=2 * hidden,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab_size,
        max_position_embeddings=512, bos_token_id=0, eos_token_id=1, pad_token_id=0)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


def test_only_ops_of_the_kernels_forms_are_swapped():
    # Mistral: two norms per layer and the final one, a rotary embedding, plain q/k/v
    # projections, a Llama-form decoder layer and a SiLU-gated MLP of plain gate/up per layer;
    # Qwen3: the per-head q/k norms too
    assert fuse_ops(tiny_llama(64, seed=0, layers=2)) == ALL_OF_TWO_LAYERS
    assert fuse_ops(tiny_qwen3(64, seed=0, layers=2)) == FusedOps(
        norms=9, rotary=2, mlps=2, qkv=2, gate_up=2, residual_norms=2)
    # Gemma 2: four norms per layer (around attention and around the MLP) and the final one,
    # so a decoder layer of its own (left to transformers); its MLP's activation is GELU
    # (transformers' own, between the merged gate/up GEMM and down)
    gemma = tiny_gemma2(64, seed=0)
    assert {rms_norm_form(m) for m in gemma.modules()} - {None} == {("eps", True)}
    assert not any(is_llama_decoder_layer(m) or is_silu_gated_mlp(m) for m in gemma.modules())
    assert fuse_ops(gemma) == FusedOps(norms=9, rotary=2, qkv=2, gate_up=2)
    # Phi: LayerNorms, Llama's rotary on the first part of each head, a plain MLP
    assert fuse_ops(tiny_phi(64, seed=0)) == FusedOps(rotary=2, qkv=2)
    # OLMo 2's norms and rotary function are of other forms: left to transformers
    olmo = tiny_olmo2(64, seed=0)
    assert not any(rms_norm_form(m) or calls_llama_rotary(m) for m in olmo.modules())
    assert fuse_ops(olmo) == FusedOps(mlps=2, qkv=2, gate_up=2)
    # a module swapped once is not swapped again, and unswapped it is transformers' again
    model = tiny_llama(64, seed=0)
    assert fuse_ops(model) == ALL_OF_TWO_LAYERS and not fuse_ops(model)
    assert unfuse_ops(model) == ALL_OF_TWO_LAYERS
    assert sum(is_silu_gated_mlp(m) for m in model.modules()) == 2
    assert sum(is_llama_decoder_layer(m) for m in model.modules()) == 2
    assert fuse_ops(model) == ALL_OF_TWO_LAYERS


def parameter_bytes(model) -> int:
    """The bytes the model's parameters hold, each storage once."""
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes()
                for p in model.parameters()}
    return sum(storages.values())


def test_merged_projections_share_the_modules_weights_and_compute_as_they_do():
    """One GEMM for q/k/v and for gate/up: the modules' weights become row slices of the
    merged ones (no second copy), transformers' own modules compute as before on them, and
    nothing of a forward is held after it."""
    model = tiny_llama(96, seed=3)
    ids = torch.randint(2, 96, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(ids).logits
    before = parameter_bytes(model)
    fuse_ops(model)
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    merged = attn._w2s_qkv.weight
    assert merged.shape[0] == sum(getattr(attn, n).out_features for n in ("q_proj", "k_proj",
                                                                          "v_proj"))
    assert attn.k_proj.weight.untyped_storage().data_ptr() == merged.untyped_storage().data_ptr()
    assert mlp.up_proj.weight.data_ptr() == mlp._w2s_gate_up.weight[mlp.gate_proj.out_features]\
        .data_ptr()
    assert parameter_bytes(model) == before
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, want, atol=1e-5, rtol=1e-5)
    assert attn._w2s_qkv.in_flight is None
    # k_proj called on another input than q_proj's runs its own GEMM
    x, other = torch.randn(3, 64), torch.randn(3, 64)
    with torch.no_grad():
        q = attn.q_proj(x)
        torch.testing.assert_close(attn.k_proj(other), other @ attn.k_proj.weight.T)
        torch.testing.assert_close(attn.k_proj(x), x @ attn.k_proj.weight.T)
        torch.testing.assert_close(q, x @ attn.q_proj.weight.T)
    # unswapped, the merge is kept (the weights are its slices) and taken again as it is
    unfuse_ops(model)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, want, atol=1e-5, rtol=1e-5)
    fuse_ops(model)
    assert attn._w2s_qkv.weight is merged and parameter_bytes(model) == before
    # a weight assigned since is merged anew
    unfuse_ops(model)
    with torch.no_grad():
        attn.v_proj.weight = torch.nn.Parameter(attn.v_proj.weight * 2)
        want = model(ids).logits
    fuse_ops(model)
    assert attn._w2s_qkv.weight is not merged
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, want, atol=1e-5, rtol=1e-5)


def test_projections_one_gemm_cannot_compute_are_left_alone():
    """A LoRA layer, a projection with a hook, or a bias on some of them only: no merge."""
    from peft import LoraConfig, get_peft_model
    lora = get_peft_model(tiny_llama(64, seed=0), LoraConfig(r=2, target_modules=["q_proj",
                                                                                 "up_proj"]))
    swapped = fuse_ops(lora)
    assert (swapped.qkv, swapped.gate_up, swapped.mlps) == (0, 0, 2)
    hooked = tiny_llama(64, seed=0)
    hooked.model.layers[1].self_attn.v_proj.register_forward_hook(lambda *args: None)
    assert fuse_ops(hooked).qkv == 1
    biased = tiny_llama(64, seed=0)
    biased.model.layers[0].mlp.gate_proj.bias = torch.nn.Parameter(torch.zeros(128))
    assert fuse_ops(biased).gate_up == 1
def test_a_swapped_layer_calls_the_kernels_in_its_own_code():
    """The attention's forward is transformers' code with apply_rotary_pos_emb resolved to the
    kernel: each layer calls it once per forward, and transformers' module is untouched."""
    import transformers.models.mistral.modeling_mistral as modeling_mistral
    calls = []

    def spy_rope(*args, **kwargs):
        calls.append("rope")
        return rotary_ref(*args, **kwargs)

    def spy_norm(*args):
        calls.append("norm")
        return rms_norm_ref(*args)

    def spy_act(*args):
        calls.append("act")
        return silu_mul_ref(*args)

    def spy_add_norm(*args):
        calls.append("add_norm")
        return add_rms_norm_ref(*args)

    model = tiny_llama(64, seed=0, layers=3)
    fuse_ops(model, norm=spy_norm, rope=spy_rope, act=spy_act, add_norm=spy_add_norm)
    with torch.no_grad():
        model(torch.tensor([[3, 4, 5]]))
    # per layer: the input norm, the rotary, the residual add with the post-attention norm,
    # the activation; and the final norm
    assert [calls.count(op) for op in ("rope", "norm", "add_norm", "act")] == [3, 4, 3, 3]
    # another model of the same classes runs transformers' own
    assert modeling_mistral.apply_rotary_pos_emb.__module__ == modeling_mistral.__name__
    with torch.no_grad():
        tiny_llama(64, seed=0, layers=3)(torch.tensor([[3, 4, 5]]))
    assert len(calls) == 13


def tiny_biased_llama(vocab_size: int, seed: int, layers: int = 2, hidden: int = 64):
    """Llama with biases on its q/k/v/o and MLP projections (merged with theirs)."""
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        num_hidden_layers=layers, hidden_size=hidden, intermediate_size=2 * hidden,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab_size,
        attention_bias=True, mlp_bias=True, max_position_embeddings=512, bos_token_id=0,
        eos_token_id=1)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():       # random init gives zero biases
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.5)
    return model


@pytest.mark.parametrize("make", [tiny_llama, tiny_qwen3, tiny_gemma2, tiny_phi,
                                  tiny_biased_llama],
                         ids=["mistral", "qwen3", "gemma2", "phi", "llama-with-biases"])
def test_swapped_model_gives_transformers_logits(make):
    model = make(96, seed=3)
    ids = torch.randint(2, 96, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(ids).logits
        assert fuse_ops(model, **TRITON)
        got = model(ids).logits
        assert unfuse_ops(model)
        again = model(ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(again, want, atol=0, rtol=0)


def test_engine_with_fused_ops_searches_as_without():
    tok = make_tokenizer(200)
    large = tiny_llama(len(tok), seed=10, layers=3)
    untuned = tiny_llama(len(tok), seed=11)
    tuned = tuned_from(untuned, seed=12, scale=0.3)
    params = SearchParams(w=2, k=2, l=3, max_new_tokens=9, temperature=1.0, seed=5)
    results = []
    for fused in (False, True):
        engine = Engine((clone(large), tok), (clone(tuned), tok), (clone(untuned), tok),
                        device="cpu", fused_ops=fused, num_kv_blocks=200, block_size=4,
                        progress=False)
        assert engine.runners["large"].fused_ops == (
            FusedOps(7, 3, 3, 3, 3, 3) if fused else FusedOps())
        assert engine.runners["tuned"].fused_ops == (ALL_OF_TWO_LAYERS if fused else FusedOps())
        results.append(engine.search(["The plot of this film", "I really"], params))
    for without, with_fused in zip(*results):
        assert with_fused.token_ids == without.token_ids
        assert with_fused.reward == pytest.approx(without.reward, abs=1e-5)


def wrong_norm(x, weight, eps, unit_offset=False):
    return rms_norm_ref(x, weight, eps, unit_offset) * 2


def wrong_rope(q, k, cos, sin, unsqueeze_dim=1):
    return rotary_ref(q, k, sin, cos, unsqueeze_dim)     # cos and sin swapped


def wrong_act(gate, up):
    return torch.sigmoid(gate) * up


def wrong_add_norm(x, residual, weight, eps, unit_offset=False):
    return rms_norm_ref(x, weight, eps, unit_offset), residual + x    # the norm before the add


def failing_act(gate, up):
    raise RuntimeError("this kernel does not compile for this device")


@pytest.mark.parametrize("wrong", [{"norm": wrong_norm}, {"rope": wrong_rope}, {"act": wrong_act},
                                   {"add_norm": wrong_add_norm}, {"act": failing_act}],
                         ids=["norm", "rotary", "activation", "residual-norm", "a-kernel-fails"])
def test_an_op_a_kernel_gets_wrong_is_put_back_at_load(monkeypatch, caplog, wrong):
    """The load-time probe holds the swapped model to transformers' own ops: where they
    differ, transformers' go back (logged) and the model runs right."""
    import w2s_engine.models.runner as runner_module
    from w2s_engine.models.runner import ModelRunner

    monkeypatch.setattr(runner_module, "fuse_ops", lambda model: fuse_ops(model, **wrong))
    model = tiny_llama(96, seed=3)
    ids = torch.randint(2, 96, (1, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(ids).logits
    runner = ModelRunner(model, num_blocks=16, block_size=4, fuse=True)
    assert not runner.fused_ops
    assert "running it with transformers' ops instead" in caplog.text
    assert sum(rms_norm_form(m) is not None for m in model.modules()) == 5   # unswapped
    assert sum(calls_llama_rotary(m) for m in model.modules()) == 2
    assert sum(is_silu_gated_mlp(m) for m in model.modules()) == 2
    assert sum(is_llama_decoder_layer(m) for m in model.modules()) == 2
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, want)
    # the right kernels stay swapped
    monkeypatch.setattr(runner_module, "fuse_ops", lambda model: fuse_ops(model, **TRITON))
    assert ModelRunner(tiny_llama(96, seed=3), num_blocks=16, block_size=4,
                       fuse=True).fused_ops == ALL_OF_TWO_LAYERS


@pytest.mark.gpu
@pytest.mark.parametrize("gemma", [False, True], ids=["llama-form", "gemma-form"])
def test_norm_kernel_matches_transformers_in_bf16_on_cuda(gemma):
    x = torch.randn(256, 4096, device="cuda", dtype=torch.bfloat16) * 3
    weight = (1 + torch.randn(4096, device="cuda") / 4).to(torch.bfloat16)
    want = transformers_norm(4096, 1e-5, weight, gemma).cuda().to(torch.bfloat16)(x)
    got = rms_norm_triton(x, weight, 1e-5, unit_offset=gemma)
    # the sum of squares runs in another order: at most one bf16 rounding apart
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=8e-3)


@pytest.mark.gpu
def test_silu_mul_kernel_matches_transformers_in_bf16_on_cuda():
    """An 8B Llama's MLP width, 256 tokens: the same bf16 values but where the two exps'
    last fp32 bit moves a rounding."""
    gate = torch.randn(256, 14336, device="cuda", dtype=torch.bfloat16) * 4
    up = torch.randn(256, 14336, device="cuda", dtype=torch.bfloat16) * 2
    want = transformers.activations.ACT2FN["silu"](gate) * up
    got = silu_mul_triton(gate, up)
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=8e-3)
    assert (got == want).float().mean() > 0.999


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32],
                         ids=["bf16", "fp16", "fp32"])
def test_rotary_kernel_matches_transformers_bit_for_bit_on_cuda(dtype):
    """An 8B Llama's shapes (32 query and 8 kv heads of 128), 256 tokens of a decode batch:
    each op rounds as torch's does, so the same values (compiled with a multiply and add
    contracted into one fma, 23% of bf16 values were one ulp off on an H200)."""
    q, k, cos, sin = (t.cuda() for t in rope_inputs(dtype, tokens=256, hq=32, hk=8, d=128))
    for got, want in zip(rotary_triton(q, k, cos, sin), apply_rotary_pos_emb(q, k, cos, sin)):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("gemma", [False, True], ids=["llama-form", "gemma-form"])
def test_add_norm_kernel_matches_a_layers_add_then_norm_in_bf16_on_cuda(gemma):
    x = torch.randn(256, 4096, device="cuda", dtype=torch.bfloat16) * 3
    residual = torch.randn(256, 4096, device="cuda", dtype=torch.bfloat16) * 3
    weight = (1 + torch.randn(4096, device="cuda") / 4).to(torch.bfloat16)
    want_sum = residual + x
    want = transformers_norm(4096, 1e-5, weight, gemma).cuda().to(torch.bfloat16)(want_sum)
    got, got_sum = add_rms_norm_triton(x, residual, weight, 1e-5, unit_offset=gemma)
    torch.testing.assert_close(got_sum, want_sum, atol=0, rtol=0)
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=8e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("make", [tiny_llama, tiny_qwen3, tiny_biased_llama],
                         ids=["mistral", "qwen3", "llama-with-biases"])
def test_swapped_model_gives_transformers_logits_in_bf16_on_cuda(make):
    """Every kernel and both merged GEMMs on the GPU in bf16: transformers' logits to the
    rounding of bf16 (a merged GEMM may round in another order)."""
    model = make(96, seed=3).cuda().to(torch.bfloat16)
    ids = torch.randint(2, 96, (4, 17), generator=torch.Generator().manual_seed(0)).cuda()
    with torch.no_grad():
        want = model(ids).logits.float()
        assert fuse_ops(model) == FusedOps(norms=9 if make is tiny_qwen3 else 5, rotary=2,
                                           mlps=2, qkv=2, gate_up=2, residual_norms=2)
        got = model(ids).logits.float()
    assert (got - want).abs().max().item() <= 0.02 * want.abs().max().item()
