"""Architectures the engine cannot run are refused at load with a clear ValueError that names
the model and what is unsupported, never with an error from inside transformers."""

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

from tiny_models import make_tokenizer
from w2s_engine import Engine


def engine_of(model, tok):
    return Engine((model, tok), dtype=torch.float32, device="cpu", num_kv_blocks=64,
                  block_size=4, progress=False)


@pytest.mark.skipif(not hasattr(transformers, "Gemma4TextConfig"), reason="no Gemma 4")
def test_gemma4_with_per_layer_head_sizes_is_refused_by_name():
    """Gemma 4's full-attention layers have their own head size (global_head_dim): its config
    is heterogeneous, and a global read of head_dim raises transformers' own error."""
    tok = make_tokenizer(300)
    torch.manual_seed(0)
    cfg = transformers.Gemma4TextConfig(
        num_hidden_layers=2, hidden_size=64, intermediate_size=96, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, global_head_dim=32, vocab_size=len(tok),
        max_position_embeddings=256, sliding_window=8,
        layer_types=["sliding_attention", "full_attention"])
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with pytest.raises(ValueError, match=r"Gemma4ForCausalLM.*head_dim per layer \(16, 32\)"):
        engine_of(model, tok)


def test_nan_logits_in_float32_name_the_weights_not_a_wider_dtype():
    """In float32 there is no wider dtype to load a model in: NaN logits come from its weights
    (a broken checkpoint or merge), which the refusal names, not 'load it in float32'."""
    from tiny_models import tiny_llama
    tok = make_tokenizer(300)
    model = tiny_llama(len(tok), seed=0)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"NaN logits in float32.*model\.layers\.1\.mlp\.up_proj"
                                         r"\.weight.*check the checkpoint") as e:
        engine_of(model, tok)
    assert "load it in" not in str(e.value)


def test_a_head_that_transforms_the_hidden_state_first_is_refused_by_name():
    """ELECTRA's generator head (dense, activation, norm, then the output layer of the
    embedding width): the engine's LM head is the output layer alone."""
    tok = make_tokenizer(300)
    torch.manual_seed(0)
    cfg = transformers.ElectraConfig(
        num_hidden_layers=2, hidden_size=64, intermediate_size=96, num_attention_heads=4,
        embedding_size=128, vocab_size=len(tok), max_position_embeddings=256, is_decoder=True)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with pytest.raises(ValueError, match=r"ElectraForCausalLM's output layer takes vectors of "
                                         r"128, but its decoder gives 64"):
        engine_of(model, tok)
