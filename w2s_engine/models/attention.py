"""The engine's attention function, plugged into transformers models.

transformers owns the model math; the engine owns the memory. We register one attention
function under ATTN_IMPLEMENTATION; every layer of a model loaded with it calls this with
q/k/v after RoPE. It writes k/v into the paged pool through the slot mapping and attends
through the block tables. The batch description travels as the `w2s_batch` keyword of the
model's forward call, which transformers hands to each attention call unchanged.
"""

import threading
from dataclasses import dataclass

import torch
from transformers import AttentionInterface

from w2s_engine.kernels.cascade_attention import SharedPrefixes, cascade_decode_attention
from w2s_engine.kernels.kv_cache import store_kv
from w2s_engine.kernels.paged_attention import paged_decode_attention, paged_extend_attention

ATTN_IMPLEMENTATION = "w2s_paged"


@dataclass
class ForwardBatch:
    """A packed batch of B sequences, T new tokens in all (prefill, extend and decode mixed)."""

    input_ids: torch.Tensor      # [T] int64
    positions: torch.Tensor      # [T] int64, position of each new token in its sequence
    slot_mapping: torch.Tensor   # [T] int64, cache slot each new token's k/v goes to
    block_tables: torch.Tensor   # [B, max_blocks] int32
    cu_seqlens_q: torch.Tensor   # [B + 1] int32, new tokens of sequence b: [cu[b], cu[b+1])
    seq_lens: torch.Tensor       # [B] int32, tokens in cache after this forward
    max_query_len: int
    kv_pool: torch.Tensor | None = None  # [layers, 2, blocks, block_size, kv_heads, head_dim]
    shared_prefixes: SharedPrefixes | None = None  # decode: groups reading shared blocks once
    attended: list[int] | None = None  # the runner's probe: the layers that called attend

    @property
    def is_decode(self) -> bool:
        return self.max_query_len == 1 and self.input_ids.numel() == self.seq_lens.numel()


# Attention features some architectures pass that the paged kernels do not implement: a model
# that uses one fails at load (the runner's probe) instead of running silently wrong. (A head's
# learned sink, `s_aux`, is implemented: GPT-OSS.)
UNSUPPORTED = {"sinks": "attention sinks computed per token",
               "position_bias": "an additive position bias"}


_ABSENT = object()   # a keyword transformers did not pass


def paged_attention_forward(module, query, key, value, attention_mask, scaling=None,
                            dropout=0.0, sliding_window=_ABSENT, softcap=None, w2s_batch=None,
                            **kwargs):
    # Some architectures' layers drop the forward's keywords on the way (StableLM's decoder
    # layer): the runner publishes the batch of the forward in flight for them.
    batch = w2s_batch if w2s_batch is not None else current_batch.batch
    assert batch is not None, (
        f"a model loaded with attn_implementation='{ATTN_IMPLEMENTATION}' must be run by the "
        "engine's ModelRunner")
    # query: [1, Hq, T, D]; key, value: [1, Hkv, T, D] -> [T, H, D]
    q = query[0].transpose(0, 1)
    k = key[0].transpose(0, 1)
    v = value[0].transpose(0, 1)
    if batch.attended is not None:      # the runner's probe, once per model at start
        check_supported(module, batch, q, k, v, kwargs)
        batch.attended.append(module.layer_idx)
    if sliding_window is _ABSENT:
        sliding_window = window_of(module)
    if scaling is None:
        scaling = q.shape[-1] ** -0.5
    sinks = kwargs.get("s_aux")     # GPT-OSS's: a learned logit per query head
    if sinks is not None:
        sinks = sinks.float().contiguous()
    if torch.compiler.is_compiling():
        # One opaque call for torch.compile: it reads the batch from current_batch.
        out = paged_attention_op(q.contiguous(), k.contiguous(), v.contiguous(),
                                 module.layer_idx, scaling, sliding_window or 0, softcap or 0.0,
                                 sinks)
    else:
        out = attend(batch, q, k, v, module.layer_idx, scaling, sliding_window, softcap, sinks)
    return out.unsqueeze(0), None  # [1, T, Hq, D], as transformers' own functions return


def check_supported(module, batch: ForwardBatch, q, k, v, kwargs):
    """What a layer passes that the paged kernels do not implement. A layer passes the same
    kinds of arguments at every call, so the runner's probe checks them once, at start."""
    name = type(module).__name__
    for key, feature in UNSUPPORTED.items():
        if kwargs.get(key) is not None:
            raise NotImplementedError(
                f"{name} uses {feature} ({key}), which the engine's paged attention does not "
                "implement: this architecture cannot run on the engine")
    if kwargs.get("is_causal") is False:
        raise NotImplementedError(f"{name} attends bidirectionally; the engine runs causal "
                                  "decoders only")
    if k.shape[1:] != batch.kv_pool.shape[-2:] or v.shape[1:] != batch.kv_pool.shape[-2:]:
        why = ("keys and values of different sizes, as in multi-head latent attention, do "
               "not fit it" if k.shape[-1] != v.shape[-1] else
               "its layers pass more kv heads than its config names (JetMoE repeats them per "
               "expert)" if k.shape[1] != batch.kv_pool.shape[-2] else
               "the head size differs from the config's")
        raise NotImplementedError(
            f"{name} gives keys of {tuple(k.shape[1:])} and values of {tuple(v.shape[1:])} "
            f"(heads, size) per token; the engine's pool, sized from the config, holds "
            f"{tuple(batch.kv_pool.shape[-2:])} for both ({why})")
    sinks = kwargs.get("s_aux")
    if sinks is not None and sinks.shape != q.shape[1:2]:
        raise NotImplementedError(
            f"{name} passes attention sinks (s_aux) of shape {tuple(sinks.shape)}; the "
            f"engine's attention takes one per query head ({q.shape[1]})")


def window_of(module) -> int | None:
    """The sliding window of an attention layer whose model does not pass one: the layer's own
    attribute, or what the model's mask would apply, by the layer's type in the config
    (Qwen2-MoE). A window or chunking that the engine cannot tell from a full layer's (PhiMoE,
    Doge: the mask's, for every layer; Llama 4's chunks) is refused where it could matter:
    sequences longer than it."""
    if getattr(module, "sliding_window", None) is not None:
        return module.sliding_window
    config = getattr(module, "config", None)
    kinds = getattr(config, "layer_types", None)
    if kinds is not None and kinds[module.layer_idx] == "full_attention":
        return None
    if kinds is not None and kinds[module.layer_idx] == "sliding_attention":
        return config.sliding_window
    longest = getattr(config, "max_position_embeddings", None) or float("inf")
    for name in ("sliding_window", "attention_chunk_size"):
        size = getattr(config, name, None)
        if size is not None and size < longest:
            raise NotImplementedError(
                f"{type(module).__name__} limits attention by {name}={size} through the "
                "model's mask alone, which the engine's paged attention does not build")
    return None


def attend(batch: ForwardBatch, q, k, v, layer: int, scaling: float, sliding_window=None,
           softcap=None, sinks=None) -> torch.Tensor:
    """Store the new tokens' k/v [T, Hkv, D] in the pool and attend: out [T, Hq, D].
    sinks: [Hq] fp32 attention sinks, or None."""
    k_cache, v_cache = batch.kv_pool[layer, 0], batch.kv_pool[layer, 1]
    store_kv(k, v, k_cache, v_cache, batch.slot_mapping)
    if batch.is_decode and batch.shared_prefixes is not None:
        out, _ = cascade_decode_attention(q.contiguous(), k_cache, v_cache, batch.block_tables,
                                          batch.seq_lens, scaling, sliding_window, softcap,
                                          batch.shared_prefixes, sinks=sinks)
    elif batch.is_decode:
        out, _ = paged_decode_attention(q.contiguous(), k_cache, v_cache, batch.block_tables,
                                        batch.seq_lens, scaling, sliding_window, softcap,
                                        sinks=sinks)
    else:
        out = paged_extend_attention(q.contiguous(), k_cache, v_cache, batch.block_tables,
                                     batch.cu_seqlens_q, batch.seq_lens, scaling,
                                     sliding_window, softcap, batch.max_query_len, sinks)
    return out


# ---- the batch of the forward in flight ------------------------------------------------------
# The runner puts each forward's batch here. Under torch.compile the attention is one custom
# op that compile does not trace into (the kernels' launch logic and the CPU references'
# data-dependent shapes would break its graph), and its batch is not an argument: the op
# reads it here (a CUDA graph replays the static one it was captured with). The op writes the
# pool as a side effect, declared pure as vLLM's attention op is: only the same op of the same
# layer reads those slots, and each layer's call depends on the previous layer's output, so
# compile cannot reorder them. Eager layers that drop the forward's keywords read it too.
# One per thread: two engines stepped from two threads (two AsyncEngines in one process) each
# see their own forward's batch.
class _CurrentBatch(threading.local):
    batch: ForwardBatch | None = None


current_batch = _CurrentBatch()


@torch.library.custom_op("w2s::paged_attention", mutates_args=())
def paged_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int,
                       scaling: float, sliding_window: int, softcap: float,
                       sinks: torch.Tensor | None) -> torch.Tensor:
    batch = current_batch.batch
    assert batch is not None, "a compiled forward runs with attention.current_batch set"
    return attend(batch, q, k, v, layer, scaling, sliding_window or None,
                  softcap or None, sinks).contiguous()


@paged_attention_op.register_fake
def _(q, k, v, layer, scaling, sliding_window, softcap, sinks):
    return torch.empty_like(q)


# Causality and windows come from positions and block tables, not from a dense mask. No mask
# function is registered for this implementation on purpose: transformers then returns no mask
# straight away (its rule for vLLM/TGI-style attention). With one registered, it first checks
# the position ids for packed sequences, a read of the device in every forward: a wait in
# every eager forward, and a failed CUDA graph capture in a transformers that does not skip
# it while capturing (tests/test_device_reads.py holds the forwards free of device reads).
AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention_forward)
