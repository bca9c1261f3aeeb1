"""Chunk-level beam search as users run it today: the baseline the engine is measured against.

Written for this project from the paper and the reference implementation's published
behaviour (not its code):
- the large model runs through transformers with its own KV cache; the prompt is repeated
  W*K times (prefilled W*K times);
- after each selection the cache is reordered with index_select (every layer's K and V are
  copied: survivors repeated K times);
- both small models re-run over the whole prompt + response text at every chunk, with a
  full-vocabulary log-softmax, to score each candidate;
- every beam runs to max_new_tokens (EOS is not special-cased), so that selection is
  comparable with the engine's on the same samples.

Its cost per chunk grows with the response length, so a long run can be cut short with a time
budget: the stats then hold the chunks measured so far (seconds and response length of each),
from which bench/e2e.py projects the rest.
"""

import time
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache


@dataclass
class BaselineStats:
    tokens_forwarded: dict
    peak_kv_bytes_large: int
    seconds: float = 0.0
    prefill_seconds: float = 0.0
    chunk_seconds: list = field(default_factory=list)   # wall time of each chunk, in order
    chunk_lengths: list = field(default_factory=list)   # response tokens at each chunk's end
    completed: bool = True                               # False: stopped by the time budget


def _common_prefix(a, b):
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@torch.no_grad()
def full_text_rewards(tuned, untuned, small_tok, small_prompt: str, responses: list[str],
                      device="cpu") -> list[float]:
    """Score every response from scratch: tokenize prompt + text, forward both models over all
    of it, full log-softmax, gather the response tokens, sum, subtract."""
    prompt_ids = small_tok(small_prompt, add_special_tokens=False)["input_ids"]
    seqs, starts = [], []
    for text in responses:
        full = small_tok(small_prompt + text, add_special_tokens=False)["input_ids"]
        seqs.append(full)
        starts.append(_common_prefix(full, prompt_ids))
    width = max(len(s) for s in seqs)
    pad = small_tok.pad_token_id if small_tok.pad_token_id is not None else 0
    ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs], device=device)
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=device)
    rewards = torch.zeros(len(seqs), dtype=torch.float64)
    for model, sign in ((tuned, 1.0), (untuned, -1.0)):
        logp = model(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)
        for i, (s, start) in enumerate(zip(seqs, starts)):
            pos = torch.arange(start, len(s), device=device)
            rewards[i] += sign * logp[i, pos - 1, ids[i, pos]].sum().item()
    return rewards.tolist()


def select(rewards: list[float], w: int) -> list[int]:
    """Top-w candidate indices, ties to the lower index (as the engine)."""
    return sorted(range(len(rewards)), key=lambda i: (-rewards[i], i))[:w]


def _sample(logits, temperature, top_k, generator):
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


def _cache_bytes(cache) -> int:
    total = 0
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if t is not None:
                total += t.numel() * t.element_size()
    return total


@torch.no_grad()
def reference_cbs(large, large_tok, tuned, untuned, small_tok, prompt: str, w: int, k: int,
                  l: int, max_new_tokens: int, temperature=0.7, top_k=50, seed=0,
                  large_template="{prompt}", small_template="{prompt}", device="cpu",
                  time_budget_s: float | None = None):
    """Returns (best response text, its reward, BaselineStats). With time_budget_s, stops after
    the first chunk that ends past the budget (completed=False; the text is then partial)."""
    t0 = time.perf_counter()
    g = torch.Generator(device=device).manual_seed(seed)
    n = w * k
    large_text = large_template.replace("{prompt}", prompt)
    small_prompt = small_template.replace("{prompt}", prompt)
    ids = large_tok(large_text, return_tensors="pt")["input_ids"].to(device)
    ids = ids.repeat(n, 1)                      # the prompt, W*K times
    cache = DynamicCache()
    out = large(input_ids=ids, past_key_values=cache, use_cache=True)
    logits = out.logits[:, -1]
    forwarded = {"large": ids.numel(), "tuned": 0, "untuned": 0}
    responses = [[] for _ in range(n)]
    peak = _cache_bytes(cache)
    rewards = [0.0] * n
    stats = BaselineStats(forwarded, 0, prefill_seconds=time.perf_counter() - t0)
    while len(responses[0]) < max_new_tokens:
        t_chunk = time.perf_counter()
        for _ in range(min(l, max_new_tokens - len(responses[0]))):
            tok = _sample(logits, temperature, top_k, g)
            for r, t in zip(responses, tok.tolist()):
                r.append(t)
            out = large(input_ids=tok[:, None], past_key_values=cache, use_cache=True)
            logits = out.logits[:, -1]
            forwarded["large"] += n
        peak = max(peak, _cache_bytes(cache))
        texts = [large_tok.decode(r, skip_special_tokens=True) for r in responses]
        rewards = full_text_rewards(tuned, untuned, small_tok, small_prompt, texts, device)
        for role in ("tuned", "untuned"):
            forwarded[role] += sum(len(small_tok(small_prompt + t, add_special_tokens=False)
                                       ["input_ids"]) for t in texts)
        if len(responses[0]) < max_new_tokens:
            keep = select(rewards, w)
            index = torch.tensor([i for i in keep for _ in range(k)], device=device)
            cache.reorder_cache(index)          # index_select of every layer's K and V
            logits = logits[index]
            responses = [list(responses[i]) for i in index.tolist()]
        stats.chunk_seconds.append(time.perf_counter() - t_chunk)
        stats.chunk_lengths.append(len(responses[0]))
        if time_budget_s is not None and time.perf_counter() - t0 > time_budget_s \
                and len(responses[0]) < max_new_tokens:
            stats.completed = False
            break
    best = select(rewards, 1)[0]
    stats.peak_kv_bytes_large, stats.seconds = peak, time.perf_counter() - t0
    return large_tok.decode(responses[best], skip_special_tokens=True), rewards[best], stats
