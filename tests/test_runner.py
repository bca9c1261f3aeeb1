"""The model runner on paged KV equals the model's own transformers forward (sdpa, no paging)."""

import copy
import random

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

from w2s_engine.cache.block_manager import BlockManager
from w2s_engine.models.runner import ModelRunner

VOCAB = 211

TINY_CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(
        num_hidden_layers=2, hidden_size=64, intermediate_size=96, num_attention_heads=8,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256),
    "mistral": lambda: transformers.MistralConfig(
        num_hidden_layers=2, hidden_size=64, intermediate_size=96, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=VOCAB, sliding_window=11, max_position_embeddings=256),
    "qwen2": lambda: transformers.Qwen2Config(
        num_hidden_layers=2, hidden_size=64, intermediate_size=96, num_attention_heads=8,
        num_key_value_heads=1, vocab_size=VOCAB, max_position_embeddings=256),
    "qwen3": lambda: transformers.Qwen3Config(
        num_hidden_layers=2, hidden_size=64, intermediate_size=96, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, vocab_size=VOCAB, max_position_embeddings=256),
    "gpt2": lambda: transformers.GPT2Config(
        n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=256,
        bos_token_id=0, eos_token_id=0),
    "phi": lambda: transformers.PhiConfig(     # partial rotary; the LM head has a bias
        num_hidden_layers=2, hidden_size=64, intermediate_size=96, num_attention_heads=4,
        vocab_size=VOCAB, max_position_embeddings=256),
    "gemma2": lambda: transformers.Gemma2Config(    # soft-capped attention and final logits
        num_hidden_layers=2, hidden_size=64, intermediate_size=96, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, vocab_size=VOCAB, sliding_window=6,
        max_position_embeddings=256),
    "gpt_neox": lambda: transformers.GPTNeoXConfig(     # Pythia: a quarter of each head rotates
        num_hidden_layers=2, hidden_size=64, intermediate_size=96, num_attention_heads=4,
        rotary_pct=0.25, vocab_size=VOCAB, max_position_embeddings=256),
    "stablelm": lambda: transformers.StableLmConfig(    # its layers drop the forward's keywords
        num_hidden_layers=2, hidden_size=64, intermediate_size=96, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256),
    "cohere": lambda: transformers.CohereConfig(        # logits * logit_scale
        num_hidden_layers=2, hidden_size=64, intermediate_size=96, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256,
        logit_scale=0.25),
    "granite": lambda: transformers.GraniteConfig(      # logits / logits_scaling
        num_hidden_layers=2, hidden_size=64, intermediate_size=96, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256,
        logits_scaling=4.0, embedding_multiplier=2.0, residual_multiplier=0.5,
        attention_multiplier=0.2),
    "qwen2_moe": lambda: transformers.Qwen2MoeConfig(   # its layers keep their window
        num_hidden_layers=2, hidden_size=64, intermediate_size=96, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256, num_experts=4,
        num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32,
        use_sliding_window=True, sliding_window=5, max_window_layers=1),
    "gpt_oss": lambda: transformers.GptOssConfig(       # attention sinks; alternating windows
        num_hidden_layers=2, hidden_size=64, intermediate_size=64, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, vocab_size=VOCAB, max_position_embeddings=256,
        num_local_experts=4, num_experts_per_tok=2, sliding_window=5,
        layer_types=["sliding_attention", "full_attention"]),
    "gemma3": lambda: transformers.Gemma3TextConfig(
        num_hidden_layers=3, hidden_size=64, intermediate_size=96, num_attention_heads=4,
        num_key_value_heads=1, head_dim=16, vocab_size=VOCAB, sliding_window=6,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        max_position_embeddings=256),
}


def tiny_model(arch: str):
    torch.manual_seed(0)
    # The reference attention: sdpa, or eager where sdpa has no soft-cap (Gemma 2) or sinks.
    model = AutoModelForCausalLM.from_config(
        TINY_CONFIGS[arch](), attn_implementation="eager" if arch in EAGER else "sdpa",
        dtype=torch.float32).eval()
    if arch == "gpt_oss":   # sinks that matter (they start at zero)
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.sinks.copy_(torch.linspace(-2.0, 3.0, 4))
    return model


EAGER = {"gemma2", "gpt_oss"}


class Harness:
    """A block manager and a runner over a copy of `model`; `model` stays the sdpa reference."""

    def __init__(self, model, block_size=4, num_blocks=256):
        paged = AutoModelForCausalLM.from_config(copy.deepcopy(model.config), dtype=torch.float32)
        paged.load_state_dict(model.state_dict())
        self.ref = model
        self.blocks = BlockManager(num_blocks, block_size)
        self.runner = ModelRunner(paged, num_blocks=num_blocks, block_size=block_size)

    def feed(self, items):
        """items: [(table, new_ids)] -> logits of every new token, one [n, V] tensor per item."""
        copies = []
        for table, ids in items:
            copies += self.blocks.append(table, len(ids))
        self.runner.copy_blocks(copies)
        hidden, cu = self.runner.run(items)
        logits = self.runner.compute_logits(hidden)
        return [logits[cu[i]:cu[i + 1]] for i in range(len(items))]

    @torch.no_grad()
    def reference(self, ids):
        return self.ref(torch.tensor([ids])).logits[0].float()


ARCHS = list(TINY_CONFIGS)


@pytest.mark.parametrize("arch", ARCHS)
def test_prefill_then_20_decode_steps_match_transformers(arch):
    h = Harness(tiny_model(arch))
    rng = random.Random(1)
    prompts = [[rng.randrange(VOCAB) for _ in range(n)] for n in (13, 5, 1)]
    tables = [h.blocks.new_table() for _ in prompts]
    outs = h.feed(list(zip(tables, prompts)))
    for ids, out in zip(prompts, outs):
        torch.testing.assert_close(out, h.reference(ids), atol=1e-4, rtol=1e-4)
    seqs = [list(p) for p in prompts]
    for _ in range(20):
        nxt = [[rng.randrange(VOCAB)] for _ in seqs]
        outs = h.feed(list(zip(tables, nxt)))
        for s, n, out in zip(seqs, nxt, outs):
            s.extend(n)
            torch.testing.assert_close(out[0], h.reference(s)[-1], atol=1e-4, rtol=1e-4)
    for t in tables:
        h.blocks.free(t)
    h.blocks.check_all_free()


@pytest.mark.parametrize("arch", ARCHS)
def test_extend_of_7_tokens_after_cached_prefix_matches_transformers(arch):
    h = Harness(tiny_model(arch))
    rng = random.Random(2)
    prompt = [rng.randrange(VOCAB) for _ in range(10)]
    chunk = [rng.randrange(VOCAB) for _ in range(7)]
    table = h.blocks.new_table()
    h.feed([(table, prompt)])
    # The extend shares the forward with a fresh prefill and a decode of another sequence.
    other = h.blocks.new_table()
    h.feed([(other, prompt[:3])])
    fresh = h.blocks.new_table()
    out, out_other, out_fresh = h.feed([(table, chunk), (other, [5]), (fresh, chunk)])
    torch.testing.assert_close(out, h.reference(prompt + chunk)[-7:], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out_other[0], h.reference(prompt[:3] + [5])[-1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out_fresh, h.reference(chunk), atol=1e-4, rtol=1e-4)
    for t in (table, other, fresh):
        h.blocks.free(t)
    h.blocks.check_all_free()


@pytest.mark.parametrize("arch", ARCHS)
def test_beams_forked_at_several_points_diverge_like_independent_recomputes(arch):
    h = Harness(tiny_model(arch), block_size=4)
    rng = random.Random(3)
    root_ids = [rng.randrange(VOCAB) for _ in range(9)]
    root = h.blocks.new_table()
    h.feed([(root, root_ids)])
    beams = [(root, list(root_ids))]
    for step in range(12):
        if step in (0, 3, 7):  # fork every beam, mid-block and at block edges
            beams += [(h.blocks.fork(t), list(ids)) for t, ids in beams]
        nxt = [[rng.randrange(VOCAB)] if i % 2 else [rng.randrange(VOCAB) for _ in range(2)]
               for i in range(len(beams))]
        outs = h.feed([(t, n) for (t, _), n in zip(beams, nxt)])
        for (t, ids), n, out in zip(beams, nxt, outs):
            ids.extend(n)
            torch.testing.assert_close(out, h.reference(ids)[-len(n):], atol=1e-4, rtol=1e-4)
    # No two live beams share the block they write next.
    writable = [t.blocks[t.num_tokens // 4] for t, _ in beams if t.num_tokens % 4]
    assert all(h.blocks.refcount[b] == 1 for b in writable)
    for t, _ in beams:
        h.blocks.free(t)
    h.blocks.check_all_free()


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen3", "gemma3", "gpt_oss"])
def test_a_compiled_forward_gives_the_eager_outputs_with_no_graph_break(arch):
    """EngineConfig(torch_compile=...): the decoder runs through torch.compile, the paged
    attention as one opaque op (w2s::paged_attention). aot_eager here: the tracing and the op
    without inductor's code generation (the gpu tests compile with inductor)."""
    from torch._dynamo.utils import counters
    model = tiny_model(arch)
    eager, compiled = Harness(model), Harness(model)
    compiled.runner = ModelRunner(compiled.runner.model, num_blocks=256, block_size=4,
                                  compile="aot_eager")
    torch._dynamo.reset()
    counters.clear()
    rng = random.Random(4)
    prompts = [[rng.randrange(VOCAB) for _ in range(n)] for n in (13, 5, 1)]
    tables = {h: [h.blocks.new_table() for _ in prompts] for h in (eager, compiled)}
    feeds = [prompts] + [[[rng.randrange(VOCAB)] for _ in prompts] for _ in range(3)] \
        + [[[rng.randrange(VOCAB) for _ in range(4)] for _ in prompts]]   # an extend
    for feed in feeds:
        want = eager.feed(list(zip(tables[eager], feed)))
        got = compiled.feed(list(zip(tables[compiled], feed)))
        for w, g in zip(want, got):
            torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-6)
    assert not counters["graph_break"], dict(counters["graph_break"])


def _model(config, attn="sdpa"):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn,
                                            dtype=torch.float32).eval()


SMALL = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=96, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256)


def test_a_model_whose_attention_bypasses_the_engine_is_refused_at_load():
    # Falcon's attention is its own code: it would attend over each forward's new tokens alone
    # and never see the paged cache, silently wrong from the second forward on.
    falcon = _model(transformers.FalconConfig(
        num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_kv_heads=2,
        new_decoder_architecture=True, vocab_size=VOCAB))
    with pytest.raises(ValueError, match=r"FalconForCausalLM does not attend through the "
                                         r"engine's paged attention in every layer \(it did in 0 of 2\)"):
        ModelRunner(falcon, num_blocks=8, block_size=4)


@pytest.mark.parametrize("config, says", [
    # MPT takes the engine's attention at load, then needs a mask tensor the engine does not
    # build; Mamba has no attention at all.
    (lambda: transformers.MptConfig(n_layers=2, d_model=64, n_heads=4, vocab_size=VOCAB,
                                    max_seq_len=256),
     "MptForCausalLM cannot run on the engine: its forward fails on the engine's paged"),
    (lambda: transformers.MambaConfig(num_hidden_layers=2, hidden_size=64, vocab_size=VOCAB),
     "MambaForCausalLM has no attention heads"),
], ids=["mpt", "mamba"])
def test_models_whose_own_code_cannot_run_on_the_engine_are_refused_with_the_reason(
        tmp_path, config, says):
    from tiny_models import make_tokenizer
    from w2s_engine import Engine
    AutoModelForCausalLM.from_config(config()).save_pretrained(tmp_path)
    make_tokenizer(VOCAB).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=says):
        Engine(str(tmp_path), num_kv_blocks=20, progress=False)


def test_a_recurrent_hybrid_whose_layers_all_attend_is_refused_at_load():
    # Falcon-H1 runs mamba heads beside attention in every layer: each layer calls the
    # engine's attention, but the recurrent state is not in the paged cache, so a decode
    # after a cached token differs from the model's own forward.
    # On two tokens its error can stay within the probe's tolerance (transformers' own
    # initialisation with these mamba sizes did): it is refused by its structure.
    for config in (SMALL, dict(SMALL, mamba_d_state=4, mamba_n_heads=8, mamba_d_head=16,
                               mamba_n_groups=1, mamba_chunk_size=8, mamba_d_ssm=128)):
        hybrid = _model(transformers.FalconH1Config(**config))
        with pytest.raises(ValueError, match="mixes tokens through a recurrent state"):
            ModelRunner(hybrid, num_blocks=8, block_size=4)


def test_llama4_attention_temperature_tuning_is_refused_at_load():
    # It scales queries by their row in the forward, which packs many sequences.
    config = transformers.Llama4TextConfig(**dict(LLAMA4, attn_temperature_tuning=True),
                                           attention_chunk_size=4096, floor_scale=4)
    with pytest.raises(ValueError, match="attn_temperature_tuning"):
        ModelRunner(_model(config), num_blocks=8, block_size=4)


def test_longrope_runs_within_its_original_length_the_same_whatever_it_is_batched_with():
    """Phi-3 128k's longrope switches its rotary factors by a forward's longest position: the
    engine runs it within the original length, where transformers' short factors hold, so a
    request's tokens do not depend on its batch."""
    from tiny_models import make_tokenizer
    from w2s_engine import Engine, SearchParams
    head, tok = 16, make_tokenizer(300)
    config = transformers.Phi3Config(
        **dict(SMALL, max_position_embeddings=128, vocab_size=len(tok)), pad_token_id=0,
        bos_token_id=0,
        eos_token_id=1, original_max_position_embeddings=64,
        rope_parameters=dict(rope_type="longrope", rope_theta=10000.0,
                             original_max_position_embeddings=64,
                             short_factor=[1.0] * (head // 2),
                             long_factor=[float(4 + i) for i in range(head // 2)]))
    model = _model(config)
    engine = Engine((copy.deepcopy(model), tok), num_kv_blocks=200, block_size=4,
                    progress=False)
    assert engine.max_prompt_tokens == 64
    params = SearchParams.base(max_new_tokens=8, temperature=0.0, ignore_eos=True)
    short, long_ = "I really", "This film is great " * 4
    alone = engine.search([short], params)[0].token_ids
    assert engine.search([short, long_], params)[0].token_ids == alone
    ids = tok(short, return_tensors="pt")["input_ids"]
    model.generation_config.eos_token_id = None
    want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                          do_sample=False, pad_token_id=0)
    assert alone == want[0, ids.shape[1]:].tolist()
    with pytest.raises(ValueError, match="context is 64 tokens"):
        engine.search([long_ * 4], params)


@pytest.mark.parametrize("graphs", [False, True])
def test_per_layer_mlp_widths_and_a_narrower_decoder_output_load_and_score(graphs):
    """Gemma 3n's intermediate_size is a list per layer; OPT-350m's decoder projects its
    output to word_embed_proj_dim: both size the static buffers (cuda_graphs=True runs them
    eagerly on a CPU)."""
    from tiny_models import clone, make_tokenizer, tuned_from
    from w2s_engine import Engine
    tok = make_tokenizer(300)
    opt = _model(transformers.OPTConfig(
        num_hidden_layers=2, hidden_size=64, ffn_dim=96, num_attention_heads=4,
        vocab_size=len(tok), max_position_embeddings=128, word_embed_proj_dim=32,
        do_layer_norm_before=False, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    engine = Engine((clone(opt), tok), (tuned_from(opt, seed=3), tok), (clone(opt), tok),
                    num_kv_blocks=200, block_size=4, progress=False, cuda_graphs=graphs)
    plain = Engine((clone(opt), tok), (tuned_from(opt, seed=3), tok), (clone(opt), tok),
                   num_kv_blocks=200, block_size=4, progress=False, cuda_graphs=False)
    assert engine.score(["I really"], [" liked it."]) == pytest.approx(
        plain.score(["I really"], [" liked it."]), abs=1e-5)
    from w2s_engine.models.runner import ModelShape
    shape = ModelShape.of(_model(transformers.Gemma3nTextConfig(
        num_hidden_layers=2, hidden_size=64, intermediate_size=[96, 128],
        num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB, num_kv_shared_layers=0,
        layer_types=["sliding_attention", "full_attention"], hidden_size_per_layer_input=16,
        vocab_size_per_layer_input=VOCAB, laurel_rank=8, altup_num_inputs=2,
        activation_sparsity_pattern=[0.0, 0.0])))
    assert shape.intermediate_size == 128
    assert shape.decode_activation_bytes(4, torch.float32) > 0


def test_hyperclovax_multiplies_its_logits_by_logits_scaling_where_granite_divides():
    # The same config name, opposite operations: the probe holds the engine's LM head to the
    # model's own logits, so a wrong rule would refuse the model.
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    config = CONFIG_MAPPING["hyperclovax"](**SMALL, logits_scaling=0.5)
    runner = ModelRunner(_model(config), num_blocks=8, block_size=4)
    assert runner.lm_head.scale == 0.5


def test_a_logit_transform_the_engine_does_not_know_is_refused_at_load(monkeypatch):
    # Without its rule for Granite's logits_scaling, the engine's LM head would give logits
    # 4x too large: sampling and rewards silently wrong. The probe compares with the model's
    # own forward.
    import w2s_engine.models.runner as runner
    granite = _model(TINY_CONFIGS["granite"]())
    assert ModelRunner(granite, num_blocks=8, block_size=4).lm_head.scale == 0.25
    monkeypatch.setattr(runner, "logit_scale", lambda config: 1.0)
    with pytest.raises(ValueError, match="transforms its logits in a way the engine's LM head "
                                         "does not know"):
        ModelRunner(granite, num_blocks=8, block_size=4)


def test_keys_and_values_of_different_sizes_are_refused_at_load_naming_them():
    # DeepSeek-V2's multi-head latent attention: keys of 24 per head (16 + 8 rotary), values
    # of 16; the pool holds one size for both.
    mla = _model(transformers.DeepseekV2Config(
        **SMALL, q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=16, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32))
    with pytest.raises(ValueError, match=r"DeepseekV2Attention gives keys of \(4, 24\) and values "
                                         r"of \(4, 16\)"):
        ModelRunner(mla, num_blocks=8, block_size=4)
    # JetMoE's keys and values are of one size, but its layers repeat the kv heads per expert
    jetmoe = _model(transformers.JetMoeConfig(
        num_hidden_layers=2, hidden_size=64, num_key_value_heads=2, kv_channels=16,
        intermediate_size=96, num_local_experts=4, num_experts_per_tok=2, vocab_size=VOCAB,
        max_position_embeddings=128), attn="eager")
    with pytest.raises(ValueError, match="more kv heads than its config names"):
        ModelRunner(jetmoe, num_blocks=8, block_size=4)


LLAMA4 = dict(SMALL, head_dim=16, num_local_experts=2, intermediate_size_mlp=96,
              no_rope_layers=[1, 0], attn_temperature_tuning=False)   # (refused: see below)


@pytest.mark.parametrize("config, error", [
    # PhiMoE's window reaches its attention only through the mask the engine does not build:
    # past 5 tokens it would attend to everything. Llama 4's chunks likewise.
    (lambda: transformers.PhimoeConfig(**SMALL, sliding_window=5, num_local_experts=4,
                                       num_experts_per_tok=2),
     r"PhimoeAttention limits attention by sliding_window=5 through the model's mask alone"),
    (lambda: transformers.Llama4TextConfig(**LLAMA4, attention_chunk_size=5),
     r"Llama4TextAttention limits attention by attention_chunk_size=5 through the model's mask"),
], ids=["phimoe", "llama4"])
def test_a_window_only_the_models_mask_applies_is_refused_at_load(config, error):
    with pytest.raises(ValueError, match=error):
        ModelRunner(_model(config()), num_blocks=8, block_size=4)


def test_a_model_whose_decoder_is_not_its_base_model_runs_like_transformers():
    # Llama 4's base_model_prefix names no attribute: the runner finds the decoder below it.
    model = _model(transformers.Llama4TextConfig(**LLAMA4, attention_chunk_size=None))
    h = Harness(model)
    ids = [5, 9, 13, 2, 7, 11]
    table = h.blocks.new_table()
    out = h.feed([(table, ids[:4])])[0]
    torch.testing.assert_close(out, h.reference(ids[:4]), atol=1e-4, rtol=1e-4)
    for i in (4, 5):
        out = h.feed([(table, ids[i:i + 1])])[0]
        torch.testing.assert_close(out[0], h.reference(ids[:i + 1])[-1], atol=1e-4, rtol=1e-4)


def test_gemma_in_float16_is_refused_at_load_saying_which_dtype_to_use():
    gemma = _model(transformers.Gemma2Config(**SMALL, head_dim=16), attn="eager").half()
    with pytest.raises(ValueError, match="overflows float16 .* bfloat16 or float32"):
        ModelRunner(gemma, num_blocks=8, block_size=4)


def test_two_engines_stepped_from_two_threads_each_run_their_own_batch():
    # StableLM's decoder layer drops the forward's keywords, so its attention finds the batch
    # the runner published; two engines in one process, each stepped by its own thread (two
    # AsyncEngines), must not read each other's.
    import sys
    import threading

    from tiny_models import make_tokenizer
    from w2s_engine import Engine, SearchParams
    tok = make_tokenizer(300)

    def stablelm(seed, layers):
        torch.manual_seed(seed)
        cfg = transformers.StableLmConfig(
            num_hidden_layers=layers, hidden_size=64, intermediate_size=128, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=512,
            bos_token_id=0, eos_token_id=1)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
        with torch.no_grad():
            model.lm_head.weight.mul_(8.0)
        return model
    engines = [Engine((stablelm(s, layers), tok), progress=False, block_size=4,
                      num_kv_blocks=200) for s, layers in ((1, 2), (5, 3))]
    params = SearchParams.base(n=4, max_new_tokens=24, temperature=0.0, ignore_eos=True)
    prompts = ["I really liked this movie", "The plot of this film"]
    alone = [[r.token_ids for r in e.search(prompts, params)] for e in engines]
    got, errors = [[], []], []

    def run(i):
        try:
            for _ in range(4):
                got[i].append([r.token_ids for r in engines[i].search(prompts, params)])
        except Exception as e:     # a batch of the other engine's shape fails the search
            errors.append(e)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)    # switch threads often, inside forwards
    try:
        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert not errors
    assert got == [[alone[0]] * 4, [alone[1]] * 4]
    for e in engines:
        e.check_all_free()
