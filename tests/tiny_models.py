"""Tiny random models with real (trained on the spot) BPE tokenizers, for fast engine tests."""

import copy

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

CORPUS = [
    "I really liked this movie, the acting was great and the plot was fun.",
    "This film was a waste of time. The story made no sense at all!",
    "The plot of this film is simple, but the characters are wonderful.",
    "What a beautiful, moving and funny picture; I loved every minute.",
    "Terrible dialogue, bad actors, boring scenes and an awful ending.",
    "An emoji 🎬 and some CJK 电影 text, with  double  spaces and\nnew lines.",
] * 4


def make_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with <bos>/<eos>, trained on CORPUS (deterministic)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<bos>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    from tokenizers.processors import TemplateProcessing
    tok.post_processor = TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>")


def make_byte_fallback_tokenizer() -> PreTrainedTokenizerFast:
    """A SentencePiece-style tokenizer (Gemma's, Llama 2's kind): a few words, and byte tokens
    <0x00> ... <0xFF> for every other character, decoded by ByteFallback (a run of bytes that
    ends inside a character decodes to one U+FFFD a byte)."""
    words = ["<unk>", "<bos>", "<eos>", *(f"<0x{b:02X}>" for b in range(256)),
             "\u2581", "\u2581the", "\u2581film", "\u2581was", "a", "b", "c", "e", "i", "l"]
    tok = Tokenizer(models.BPE({w: i for i, w in enumerate(words)}, [], unk_token="<unk>",
                               byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                     decoders.Fuse()])
    tok.add_special_tokens(["<unk>", "<bos>", "<eos>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<bos>",
                                   eos_token="<eos>")


def tiny_llama(vocab_size: int, seed: int, layers: int = 2, hidden: int = 64,
               sliding_window: int | None = None):
    torch.manual_seed(seed)
    cfg = transformers.MistralConfig(
        num_hidden_layers=layers, hidden_size=hidden, intermediate_size=2 * hidden,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab_size,
        max_position_embeddings=512, sliding_window=sliding_window, bos_token_id=0,
        eos_token_id=1, tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    # Random init gives near-uniform logits; sharpen them so samples and rewards differ.
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    model.generation_config.eos_token_id = 1
    return model


def tiny_phi(vocab_size: int, seed: int, layers: int = 2, hidden: int = 64):
    """Phi: partial rotary, parallel attention and MLP, and an output layer with a bias."""
    torch.manual_seed(seed)
    cfg = transformers.PhiConfig(
        num_hidden_layers=layers, hidden_size=hidden, intermediate_size=2 * hidden,
        num_attention_heads=4, vocab_size=vocab_size, max_position_embeddings=512,
        bos_token_id=0, eos_token_id=1)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
        model.lm_head.bias.normal_(0.0, 1.0)
    model.generation_config.eos_token_id = 1
    return model


def tiny_gemma2(vocab_size: int, seed: int, layers: int = 2, hidden: int = 64):
    """Gemma 2: soft-capped attention scores and final logits (cap 30 on logits of a sharpened
    head, so the cap bends them), alternating sliding windows; eager attention (its sdpa has
    no soft-cap)."""
    torch.manual_seed(seed)
    cfg = transformers.Gemma2Config(
        num_hidden_layers=layers, hidden_size=hidden, intermediate_size=2 * hidden,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=vocab_size,
        max_position_embeddings=512, sliding_window=6, bos_token_id=0, eos_token_id=1,
        pad_token_id=0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32,
                                             attn_implementation="eager").eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)
    model.generation_config.eos_token_id = 1
    return model


def tiny_granite(vocab_size: int, seed: int, layers: int = 2, hidden: int = 64):
    """Granite: its forward divides the output layer's logits by logits_scaling (0.25 here:
    a sharper distribution), with multipliers on the embeddings, residuals and attention."""
    torch.manual_seed(seed)
    cfg = transformers.GraniteConfig(
        num_hidden_layers=layers, hidden_size=hidden, intermediate_size=2 * hidden,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab_size,
        max_position_embeddings=512, bos_token_id=0, eos_token_id=1, pad_token_id=0,
        tie_word_embeddings=False, logits_scaling=0.25, embedding_multiplier=2.0,
        residual_multiplier=0.5, attention_multiplier=0.2)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(2.0)
    model.generation_config.eos_token_id = 1
    return model


def clone(model):
    twin = AutoModelForCausalLM.from_config(copy.deepcopy(model.config), dtype=torch.float32).eval()
    twin.load_state_dict(model.state_dict())
    twin.generation_config = copy.deepcopy(model.generation_config)
    return twin


def tuned_from(model, seed: int, scale: float = 0.05):
    """A 'tuned' twin: the same model with small random weight changes."""
    twin = clone(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in twin.parameters():
            # (the std of a one-element parameter, xIELU's alpha say, is NaN)
            spread = p.std() if p.numel() > 1 else p.abs().reshape(())
            p.add_(torch.randn(p.shape, generator=g) * scale * spread.clamp_min(1e-3))
    return twin


def tiny_reward_model(vocab_size: int, seed: int, num_labels: int = 2, layers: int = 2,
                      hidden: int = 64, per_token: bool = False):
    """A random reward model: the tiny decoder with a classification head (fp32), read at
    the last token (a sequence classifier) or at every token (per_token)."""
    torch.manual_seed(seed)
    cfg = transformers.MistralConfig(
        num_hidden_layers=layers, hidden_size=hidden, intermediate_size=2 * hidden,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab_size,
        max_position_embeddings=512, bos_token_id=0, eos_token_id=1, num_labels=num_labels)
    auto = (transformers.AutoModelForTokenClassification if per_token
            else transformers.AutoModelForSequenceClassification)
    model = auto.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():   # spread the head's outputs so that rewards differ
        model.score.weight.mul_(20.0)
    return model.eval()


def search_engines(templates: dict, **config) -> dict:
    """Engines over the tiny models for search tests: "shared" (the large model has the small
    pair's tokenizer) and "cross" (another one); "pair" and "tok" to build more."""
    from w2s_engine import Engine
    tok, other = make_tokenizer(300), make_tokenizer(420)
    untuned = tiny_llama(len(tok), seed=2)
    tuned = tuned_from(untuned, seed=3, scale=0.3)
    config = {"block_size": 4, "progress": False, **config}

    def make(large, large_tok):
        return Engine((large, large_tok), (clone(tuned), tok), (clone(untuned), tok),
                      templates=templates, **config)
    return {"shared": make(tiny_llama(len(tok), seed=1, layers=3), tok),
            "cross": make(tiny_llama(len(other), seed=4, layers=3), other),
            "pair": (tuned, untuned), "tok": tok}
