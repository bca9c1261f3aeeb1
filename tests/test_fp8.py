"""EngineConfig(quantization="fp8"): the large model's linear layers in float8 (vLLM's dynamic
FP8: a scale per weight row, each token's input quantized as it comes).

The GEMM's arithmetic against its reference on the dequantized operands; a row's output the
same alone or in any batch; the engine's large model in FP8 decoding as transformers runs the
same quantized model, with the fused ops and merged projections and without; the small models
and the LM head left as they are; the settings refused where they cannot hold.
"""

import pytest
import torch

from tiny_models import clone, make_tokenizer, tiny_llama, tuned_from
from w2s_engine import Engine, SearchParams
from w2s_engine.models.fp8_linear import (FP8, Fp8Linear, fp8_linear, fp8_linear_ref,
                                          quantize_fp8, quantize_rows)


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer(300)


@pytest.fixture(scope="module")
def small_pair(tok):
    untuned = tiny_llama(len(tok), seed=2)
    return tuned_from(untuned, seed=3, scale=0.3), untuned


def fp8_engine(tok, small_pair, large=None, **kw):
    tuned, untuned = small_pair
    large = large if large is not None else tiny_llama(len(tok), seed=1, layers=3)
    kw = {"block_size": 4, "progress": False, "quantization": "fp8", **kw}
    return Engine((large, tok), (clone(tuned), tok), (clone(untuned), tok), **kw)


def test_quantized_rows_read_back_within_e4m3_rounding():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 64, generator=g) * torch.logspace(-3, 2, 48)[:, None]  # rows of any size
    w[5] = 0.0                                                                  # and a zero row
    q, scale = quantize_rows(w)
    assert q.dtype == FP8 and scale.shape == (48, 1)
    back = q.float() * scale
    # e4m3: 3 mantissa bits (half a step is 2^-4 of the value), subnormals below 2^-6 of the
    # scale's 448 (steps of 2^-9 of it); each row's largest magnitude comes back (it maps to
    # 448), up to the fp32 rounding of the scale
    assert (back - w).abs().le(w.abs() * 2.0 ** -4 + scale * 2.0 ** -10).all()
    torch.testing.assert_close(back.abs().amax(1), w.abs().amax(1), rtol=1e-6, atol=0)
    assert back[5].eq(0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_fp8_gemm_is_the_product_of_the_quantized_operands_rescaled(dtype):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 7, 64, generator=g).to(dtype)
    w = torch.randn(48, 64, generator=g)
    bias = torch.randn(48, generator=g).to(dtype)
    q, scale = quantize_rows(w)
    got = fp8_linear(x, q, scale, bias)
    assert got.shape == (3, 7, 48) and got.dtype == dtype
    want = fp8_linear_ref(x, q, scale, bias)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, want, atol=tol * want.abs().max().item(), rtol=tol)
    # and near the unquantized product: e4m3 keeps a few percent of each operand
    exact = torch.nn.functional.linear(x.float(), w, bias.float())
    assert (got.float() - exact).norm() / exact.norm() < 0.05


def test_a_row_gives_the_same_output_alone_or_in_any_batch():
    """Each token's input has its own scale: a seeded search draws the same tokens whatever
    it is batched with."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(9, 64, generator=g)
    x[4] *= 1000.0                    # one loud row does not coarsen the others
    q, scale = quantize_rows(torch.randn(32, 64, generator=g))
    batch = fp8_linear(x, q, scale)
    for i in range(9):     # (up to the GEMM's own summation order for another batch size)
        torch.testing.assert_close(fp8_linear(x[i:i + 1], q, scale)[0], batch[i],
                                   rtol=1e-6, atol=1e-6 * batch[i].abs().max().item())


def test_the_large_model_in_fp8_leaves_its_lm_head_and_the_small_models_as_they_were(
        tok, small_pair):
    engine = fp8_engine(tok, small_pair)
    large = engine.models["large"].model
    linears = [m for m in large.modules() if isinstance(m, (torch.nn.Linear, Fp8Linear))]
    assert type(large.get_output_embeddings()) is torch.nn.Linear
    assert sum(isinstance(m, Fp8Linear) for m in linears) == len(linears) - 1
    assert all(m.weight.dtype == FP8 for m in linears if isinstance(m, Fp8Linear))
    # 1 byte a weight for 4 (fp32), and a 4-byte scale per row
    counts = engine.quantized
    assert counts["layers"] == len(linears) - 1 and counts["kept"] == 0
    rows = sum(m.out_features for m in linears if isinstance(m, Fp8Linear))
    assert counts["bytes_after"] == counts["bytes_before"] // 4 + 4 * rows
    for role in ("tuned", "untuned"):
        assert not any(isinstance(m, Fp8Linear) for m in engine.models[role].model.modules())
    engine.check_all_free()


@pytest.mark.parametrize("fused", [False, True])
def test_an_fp8_large_model_decodes_greedily_as_transformers_runs_the_same_quantized_model(
        tok, small_pair, fused):
    """The paged runner, with the merged q/k/v and gate/up GEMMs (fused) and without, gives
    the tokens that transformers' own forward of the quantized model gives."""
    reference = clone(tiny_llama(len(tok), seed=1, layers=3))
    assert quantize_fp8(reference)["layers"] > 0
    engine = fp8_engine(tok, small_pair, fused_ops=fused, cuda_graphs=fused)
    params = SearchParams.base(max_new_tokens=STEPS, top_k=1, ignore_eos=True, seed=1)
    ids = engine.make_request("The plot of", params).large_prompt_ids
    want = greedy(reference, ids)
    assert engine.search(["The plot of"], params)[0].token_ids == want
    # unquantized, greedy decoding of this model takes another path somewhere
    assert greedy(tiny_llama(len(tok), seed=1, layers=3), ids) != want
    engine.check_all_free()


STEPS = 32


@torch.no_grad()
def greedy(model, ids: list[int]) -> list[int]:
    """Greedy decoding by the model's own forward over the whole text at each step."""
    out = []
    for _ in range(STEPS):
        out.append(int(model(torch.tensor([ids + out])).logits[0, -1].argmax()))
    return out


def test_a_search_on_an_fp8_large_model_scores_with_the_small_models_unchanged(
        tok, small_pair):
    engine = fp8_engine(tok, small_pair)
    plain = fp8_engine(tok, small_pair, quantization=None)
    results = engine.search(["The plot of", "I really"],
                            SearchParams(w=2, k=2, l=4, max_new_tokens=12, seed=0))
    for r in results:
        for h in r.hypotheses:   # the pair's reward of what the FP8 model wrote
            want = plain.score([r.prompt], [h.small_token_ids], finished=h.finished)[0]
            assert h.reward == pytest.approx(want, abs=1e-4)
    engine.check_all_free()


def test_fp8_settings_that_cannot_hold_are_refused_saying_what_to_change(tok, small_pair):
    with pytest.raises(ValueError, match="quantization='int4'.*'fp8' or None"):
        fp8_engine(tok, small_pair, quantization="int4")
    with pytest.raises(TypeError, match="quantization"):
        fp8_engine(tok, small_pair, quantization=True)
    tuned, untuned = small_pair
    shared = clone(untuned)     # the large model is the untuned model's very module
    with pytest.raises(ValueError, match="same module as the untuned model"):
        Engine((shared, tok), (clone(tuned), tok), (shared, tok), block_size=4,
               progress=False, quantization="fp8")
    assert not any(isinstance(m, Fp8Linear) for m in shared.modules())   # left as it was


@pytest.mark.gpu
class TestFp8OnGPU:
    """The scaled FP8 GEMM on the tensor cores (compute capability 8.9 and up), bfloat16."""

    def test_the_scaled_fp8_gemm_on_cuda_is_its_reference(self):
        g = torch.Generator().manual_seed(3)
        x = torch.randn(2, 5, 128, generator=g).to("cuda", torch.bfloat16)
        q, scale = quantize_rows(torch.randn(256, 128, generator=g).cuda())
        bias = torch.randn(256, generator=g).to("cuda", torch.bfloat16)
        got, want = fp8_linear(x, q, scale, bias), fp8_linear_ref(x, q, scale, bias)
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2,
                                   atol=2e-2 * want.abs().max().item())

    @pytest.mark.parametrize("graphs", [False, True], ids=["eager", "cuda-graphs"])
    def test_an_fp8_large_model_on_cuda_picks_its_own_forwards_greedy_tokens(
            self, tok, small_pair, graphs):
        """Greedy decoding through the paged runner (eagerly, and replayed from CUDA graphs
        with the merged GEMMs): each token is the quantized model's own forward's best, up to
        bfloat16 rounding (within 1% of the logits' range of its best)."""
        large = tiny_llama(len(tok), seed=1, layers=3).to(torch.bfloat16)
        reference = clone(tiny_llama(len(tok), seed=1, layers=3)).to("cuda", torch.bfloat16)
        quantize_fp8(reference)
        pair = tuple(m.to(torch.bfloat16) for m in map(clone, small_pair))
        engine = fp8_engine(tok, pair, large=large, device="cuda", dtype=torch.bfloat16,
                            cuda_graphs=graphs, cuda_graph_max_batch=8)
        params = SearchParams.base(max_new_tokens=24, top_k=1, ignore_eos=True, seed=1)
        ids = engine.make_request("The plot of", params).large_prompt_ids
        got = engine.search(["The plot of"], params)[0].token_ids
        with torch.no_grad():
            logits = reference(torch.tensor([ids + got], device="cuda")).logits[0].float()
        picked = logits[len(ids) - 1:-1]
        best = picked.max(-1).values
        chosen = picked.gather(1, torch.tensor(got, device="cuda")[:, None])[:, 0]
        spread = picked.max(-1).values - picked.min(-1).values
        assert (best - chosen <= 0.01 * spread).all(), (best - chosen) / spread
        engine.check_all_free()


def test_dequantized_layers_compute_with_full_precision_inputs():
    """What the load-time probe runs FP8 layers with: the weight dequantized, the input as it
    is (no FP8 rounding of it), so that a decode and a full forward agree as in fp32."""
    from w2s_engine.models.fp8_linear import dequantized
    g = torch.Generator().manual_seed(4)
    x, w = torch.randn(5, 64, generator=g), torch.randn(32, 64, generator=g)
    q, scale = quantize_rows(w)
    with dequantized():
        got = fp8_linear(x, q, scale)
    torch.testing.assert_close(got, x @ (q.float() * scale).t())
    assert not torch.equal(fp8_linear(x, q, scale), got)     # outside: inputs quantized too
