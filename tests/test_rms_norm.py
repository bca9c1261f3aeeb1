"""The one-kernel RMSNorm against transformers' LlamaRMSNorm and GemmaRMSNorm, and the swap of
a model's norms: only norms of those forms are swapped, and a swapped model computes the same
logits.

On CPU the kernel runs under TRITON_INTERPRET=1 (tests/conftest.py) on small fp32/fp16 shapes.
"""

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from tiny_models import clone, make_tokenizer, tiny_gemma2, tiny_llama, tuned_from
from w2s_engine import Engine, SearchParams
from w2s_engine.kernels.rms_norm import MAX_ONE_TILE, rms_norm_ref, rms_norm_triton
from w2s_engine.models.fused_norms import fuse_rms_norms, rms_norm_form, unfuse_rms_norms


def transformers_norm(hidden: int, eps: float, weight: torch.Tensor, gemma: bool = False):
    norm = (GemmaRMSNorm if gemma else LlamaRMSNorm)(hidden, eps)
    with torch.no_grad():
        norm.weight = torch.nn.Parameter(weight.clone())
    return norm


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(3, 64), (2, 3, 100), (2, MAX_ONE_TILE + 200)],
                         ids=["rows", "leading-dims-odd-width", "wider-than-one-tile"])
@pytest.mark.parametrize("gemma", [False, True], ids=["llama-form", "gemma-form"])
def test_kernel_matches_transformers_norm(dtype, shape, gemma):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=g) * 3).to(dtype)
    weight = (1 + torch.randn(shape[-1], generator=g) / 4).to(dtype)
    want = transformers_norm(shape[-1], 1e-5, weight, gemma).to(dtype)(x)
    got = rms_norm_triton(x, weight, 1e-5, unit_offset=gemma)
    assert got.dtype == want.dtype and got.shape == want.shape
    tol = 1e-6 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    torch.testing.assert_close(rms_norm_ref(x, weight, 1e-5, gemma), want, atol=0, rtol=0)


def test_kernel_keeps_transformers_dtype_promotion_and_reads_strided_rows():
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


def test_kernel_refuses_a_weight_of_the_wrong_width():
    with pytest.raises(ValueError, match=r"weight must be \[64\]"):
        rms_norm_triton(torch.randn(2, 64), torch.ones(32), 1e-6)


def tiny_qwen3(vocab_size: int, seed: int, layers: int = 2, hidden: int = 64):
    """Qwen3: RMSNorms on every head's queries and keys as well."""
    torch.manual_seed(seed)
    cfg = transformers.Qwen3Config(
        num_hidden_layers=layers, hidden_size=hidden, intermediate_size=2 * hidden,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=vocab_size,
        max_position_embeddings=512, bos_token_id=0, eos_token_id=1, tie_word_embeddings=False)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


def tiny_olmo2(vocab_size: int, seed: int, layers: int = 2, hidden: int = 64):
    """OLMo 2: an RMSNorm of neither form (the weight multiplies before the rounding)."""
    torch.manual_seed(seed)
    cfg = transformers.Olmo2Config(
        num_hidden_layers=layers, hidden_size=hidden, intermediate_size=2 * hidden,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab_size,
        max_position_embeddings=512, bos_token_id=0, eos_token_id=1, pad_token_id=0)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


def test_only_norms_of_the_kernels_forms_are_swapped():
    # Mistral: two per layer and the final one; Qwen3: the per-head q/k norms too
    assert fuse_rms_norms(tiny_llama(64, seed=0, layers=2)) == 5
    assert fuse_rms_norms(tiny_qwen3(64, seed=0, layers=2)) == 9
    # Gemma 2: four per layer (around attention and around the MLP) and the final one
    gemma = tiny_gemma2(64, seed=0)
    assert {rms_norm_form(m) for m in gemma.modules()} - {None} == {("eps", True)}
    assert fuse_rms_norms(gemma) == 9
    # OLMo 2's norms are of another form: left to transformers
    olmo = tiny_olmo2(64, seed=0)
    assert all(rms_norm_form(m) is None for m in olmo.modules())
    assert fuse_rms_norms(olmo) == 0
    # a module swapped once is not swapped again, and unswapped it is transformers' again
    model = tiny_llama(64, seed=0)
    assert fuse_rms_norms(model) == 5 and fuse_rms_norms(model) == 0
    assert unfuse_rms_norms(model) == 5
    assert sum(rms_norm_form(m) == ("variance_epsilon", False) for m in model.modules()) == 5


@pytest.mark.parametrize("make", [tiny_llama, tiny_qwen3, tiny_gemma2],
                         ids=["mistral", "qwen3", "gemma2"])
def test_swapped_model_gives_transformers_logits(make):
    model = make(96, seed=3)
    ids = torch.randint(2, 96, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(ids).logits
        fuse_rms_norms(model, norm=rms_norm_triton)   # the kernel, under the interpreter
        got = model(ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_engine_with_fused_norms_searches_as_without():
    tok = make_tokenizer(200)
    large = tiny_llama(len(tok), seed=10, layers=3)
    untuned = tiny_llama(len(tok), seed=11)
    tuned = tuned_from(untuned, seed=12, scale=0.3)
    params = SearchParams(w=2, k=2, l=3, max_new_tokens=9, temperature=1.0, seed=5)
    results = []
    for fused in (False, True):
        engine = Engine((clone(large), tok), (clone(tuned), tok), (clone(untuned), tok),
                        device="cpu", fused_rms_norm=fused, num_kv_blocks=200, block_size=4,
                        progress=False)
        assert engine.runners["large"].fused_norms == (7 if fused else 0)
        assert engine.runners["tuned"].fused_norms == (5 if fused else 0)
        results.append(engine.search(["The plot of this film", "I really"], params))
    for without, with_fused in zip(*results):
        assert with_fused.token_ids == without.token_ids
        assert with_fused.reward == pytest.approx(without.reward, abs=1e-5)


def test_a_norm_the_kernel_gets_wrong_is_put_back_at_load(monkeypatch, caplog):
    """The load-time probe holds the swapped model to transformers' own norms: a norm that
    computes something else goes back to transformers' (logged), the model runs right."""
    import w2s_engine.models.runner as runner_module
    from w2s_engine.models.runner import ModelRunner

    def wrong(x, weight, eps, unit_offset=False):
        return rms_norm_ref(x, weight, eps, unit_offset) * 2

    monkeypatch.setattr(runner_module, "fuse_rms_norms",
                        lambda model: fuse_rms_norms(model, norm=wrong))
    model = tiny_llama(96, seed=3)
    ids = torch.randint(2, 96, (1, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(ids).logits
    runner = ModelRunner(model, num_blocks=16, block_size=4, fuse_norms=True)
    assert runner.fused_norms == 0
    assert "running it with transformers' norms instead" in caplog.text
    assert sum(rms_norm_form(m) is not None for m in model.modules()) == 5   # unswapped
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, want)
    # a right kernel stays swapped
    monkeypatch.setattr(runner_module, "fuse_rms_norms",
                        lambda model: fuse_rms_norms(model, norm=rms_norm_triton))
    assert ModelRunner(tiny_llama(96, seed=3), num_blocks=16, block_size=4,
                       fuse_norms=True).fused_norms == 5


@pytest.mark.gpu
@pytest.mark.parametrize("gemma", [False, True], ids=["llama-form", "gemma-form"])
def test_kernel_matches_transformers_in_bf16_on_cuda(gemma):
    x = torch.randn(256, 4096, device="cuda", dtype=torch.bfloat16) * 3
    weight = (1 + torch.randn(4096, device="cuda") / 4).to(torch.bfloat16)
    want = transformers_norm(4096, 1e-5, weight, gemma).cuda().to(torch.bfloat16)(x)
    got = rms_norm_triton(x, weight, 1e-5, unit_offset=gemma)
    # the sum of squares runs in another order: at most one bf16 rounding apart
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=8e-3)
