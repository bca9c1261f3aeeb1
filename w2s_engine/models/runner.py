"""ModelRunner: runs one transformers decoder on packed batches over its own paged KV pool.

A forward takes any mix of prefills (a whole prompt), extends (a chunk of known tokens after a
cached prefix) and decodes (one token), one list entry per sequence, and returns the final
hidden states of every new token. The LM head is applied separately (compute_logits) so the
reward path can fuse it with log-softmax instead of materialising logits. A batch's metadata
goes to the device in one upload. A decode of many sequences (decode_logits) runs on static
buffers, replayed as a CUDA graph per batch-size bucket when the runner has them
(models/decode_graphs.py); so does an extend of the same number of new tokens for every
sequence, a scorer's forward of a chunk (models/scoring_graphs.py).

The pool has one block more than the block managers hand out: the scratch block, which the
padding rows of a bucketed batch read and write.
"""

from dataclasses import dataclass

import numpy as np
import torch
from transformers import PreTrainedModel

from w2s_engine.cache.block_manager import BlockTable
from w2s_engine.kernels.chunk_reward import LMHead
from w2s_engine.kernels.kv_cache import copy_blocks, ordered_runs
from w2s_engine.models.attention import ATTN_IMPLEMENTATION, ForwardBatch, current_batch
from w2s_engine.models.fused_ops import FusedOps, fuse_ops
from w2s_engine.models.probe import probe


class BatchFailed(Exception):
    """A batched forward over many requests' sequences failed (the error is its __cause__).
    retryable: every sequence of the batch is back as it was before it, so each request can
    run again alone and only the one that causes the error fails."""

    def __init__(self, retryable: bool):
        super().__init__("a batched forward failed")
        self.retryable = retryable


@dataclass(frozen=True)
class ModelShape:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    max_positions: int | None
    num_heads: int = 0
    intermediate_size: int = 0
    output_size: int = 0     # the decoder's output width (OPT-350m projects to a narrower one)

    @classmethod
    def of(cls, model: PreTrainedModel) -> "ModelShape":
        cfg = model.config.get_text_config()
        _refuse_per_layer_shapes(model, cfg)
        num_heads = getattr(cfg, "num_attention_heads", None)
        if not num_heads:
            raise ValueError(f"{type(model).__name__} has no attention heads "
                             "(num_attention_heads): the engine runs attention decoders, not "
                             "state-space models such as Mamba")
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // num_heads
        return cls(num_layers=cfg.num_hidden_layers,
                   num_kv_heads=getattr(cfg, "num_key_value_heads", None) or num_heads,
                   head_dim=head_dim, hidden_size=cfg.hidden_size,
                   vocab_size=(model.get_output_embeddings().weight.shape[0]
                               if model.get_output_embeddings() is not None else cfg.vocab_size),
                   max_positions=context_limit(cfg),
                   num_heads=num_heads,
                   intermediate_size=_widest(getattr(cfg, "intermediate_size", None))
                   or 4 * cfg.hidden_size,
                   output_size=getattr(cfg, "word_embed_proj_dim", None) or cfg.hidden_size)

    @property
    def heads_per_kv_head(self) -> int:
        """Query heads sharing one kv head (GQA's group; 1 where num_heads is unknown)."""
        return max(1, self.num_heads // self.num_kv_heads)

    def kv_bytes_per_block(self, block_size: int, dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return self.num_layers * 2 * block_size * self.num_kv_heads * self.head_dim * elem

    def decode_activation_bytes(self, batch: int, dtype: torch.dtype) -> int:
        """An upper estimate of the memory a decode of `batch` sequences holds at its peak
        (what a captured graph keeps in its pool): fp32 logits, the MLP's and attention's
        activations of one layer, split-K partials, and the static inputs."""
        elem = torch.empty((), dtype=dtype).element_size()
        per_row = (self.vocab_size * 4 * 2                       # logits and the static copy
                   + (6 * self.hidden_size + 3 * self.intermediate_size) * elem
                   + self.num_heads * 16 * (self.head_dim + 1) * 4)
        return batch * per_row

    def extend_activation_bytes(self, tokens: int, dtype: torch.dtype) -> int:
        """An upper estimate of the memory an extend of `tokens` new tokens holds at its peak
        without an LM head (what a captured scoring graph keeps in its pool), and the static
        hidden-state buffer it writes."""
        elem = torch.empty((), dtype=dtype).element_size()
        return tokens * (7 * self.hidden_size + 3 * self.intermediate_size) * elem


# What sizes the KV pool (one shape for every layer) and the engine's buffers.
POOL_SIZES = ("num_attention_heads", "num_key_value_heads", "head_dim", "hidden_size",
              "num_hidden_layers", "vocab_size", "max_position_embeddings",
              "intermediate_size", "word_embed_proj_dim")


def _refuse_per_layer_shapes(model, cfg):
    """A heterogeneous config (transformers' per_layer_config: Gemma 4's full-attention layers
    with their global_head_dim) raises on a global read of an attribute its layers set
    differently: refused here with what differs, not with transformers' error from inside."""
    for name in POOL_SIZES:
        try:
            getattr(cfg, name, None)
        except Exception as e:     # transformers' AmbiguousGlobalPerLayerAttributeError
            if type(e).__name__ != "AmbiguousGlobalPerLayerAttributeError":
                raise
            layers = getattr(cfg, "per_layer_config", None) or []
            sizes = sorted({getattr(c, name, None) for c in layers}, key=str)
            raise ValueError(
                f"{type(model).__name__} ({cfg.model_type}) sets {name} per layer"
                + (f" ({', '.join(map(str, sizes))})" if sizes else "")
                + ": the engine's paged KV cache holds one shape for every layer; the engine "
                "cannot run this architecture with layers of different attention shapes") from None


def _widest(size):
    """An MLP width, or the widest of per-layer widths (Gemma 3n's list)."""
    return max(size) if isinstance(size, (list, tuple)) else size


def context_limit(cfg) -> int | None:
    """The longest sequence the engine runs a model for: its max_position_embeddings, but for
    longrope (Phi-3/3.5/4-mini 128k) its original length. transformers picks longrope's long
    or short factors by the longest position of the whole forward, and the engine packs many
    sequences (and prompt chunks) into one: past the switch a sequence's result would depend
    on its batch; below it the short factors always hold, as in transformers."""
    limit = getattr(cfg, "max_position_embeddings", None)
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    per_layer_type = isinstance(rope, dict) and rope and all(isinstance(v, dict)
                                                             for v in rope.values())
    for r in rope.values() if per_layer_type else [rope]:
        if isinstance(r, dict) and r.get("rope_type", r.get("type")) == "longrope":
            original = (r.get("original_max_position_embeddings")
                        or getattr(cfg, "original_max_position_embeddings", None))
            if original and (limit is None or original < limit):
                limit = original
    return limit


def logit_scale(config) -> float:
    """What a model's forward multiplies its output layer's logits by: Cohere's logit_scale;
    Granite divides by logits_scaling, HyperCLOVA X multiplies by it. 1 for the rest."""
    kind = config.model_type
    if kind.startswith("cohere") and getattr(config, "logit_scale", None) is not None:
        return float(config.logit_scale)
    if getattr(config, "logits_scaling", None) is not None:
        if kind.startswith("granite"):
            return 1.0 / config.logits_scaling
        if kind.startswith("hyperclovax"):
            return float(config.logits_scaling)
    return 1.0


class ModelRunner:

    def __init__(self, model: PreTrainedModel, num_blocks: int, block_size: int = 16,
                 compile: bool | str = False, fuse: bool = False):
        """num_blocks: blocks the block managers hand out (the pool has one more: scratch).
        compile: run the decoder through torch.compile (the attention is one opaque op); a
        string names the backend (default inductor).
        fuse: the model's RMSNorms, rotary embeddings, MLP activations and residual adds of
        the forms the engine's kernels compute run as one kernel each, its q/k/v and gate/up
        projections as one GEMM each (models/fused_ops.py); not with compile, which fuses
        the small ops itself."""
        if model.config._attn_implementation != ATTN_IMPLEMENTATION:
            model.set_attn_implementation(ATTN_IMPLEMENTATION)
        self.model = model.eval()
        # what runs fused (the model's modules are swapped in place)
        self.fused_ops = fuse_ops(model) if fuse and not compile else FusedOps()
        self.decoder = model.base_model
        if self.decoder is model:   # a base_model_prefix that names no attribute (Llama 4's)
            self.decoder = next(m for m in model.children() if isinstance(m, PreTrainedModel))
        self.shape = ModelShape.of(model)
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.device = model.device
        self.dtype = model.dtype
        s = self.shape
        self.scratch_block = num_blocks
        self.kv_pool = torch.zeros(s.num_layers, 2, num_blocks + 1, block_size, s.num_kv_heads,
                                   s.head_dim, dtype=self.dtype, device=self.device)
        head = model.get_output_embeddings()   # None for a reward model (a classifier head)
        text_config = model.config.get_text_config()
        self.lm_head = None if head is None else LMHead(
            head.weight, getattr(head, "bias", None),
            getattr(text_config, "final_logit_softcapping", None), logit_scale(text_config))
        self.graphs = None      # DecodeGraphs, when decodes run on static buffers
        self.scoring_graphs = None  # ScoringGraphs, when scoring extends run on them
        self._decoder_call = self._decoder_forward
        if compile:
            self._decoder_call = torch.compile(
                self._decoder_forward, dynamic=True,
                backend=compile if isinstance(compile, str) else "inductor")
        probe(self)

    def pinned(self, words: np.ndarray) -> torch.Tensor:
        """int32 words in host memory a device copy can read asynchronously (pinned, from
        torch's caching host allocator, which keeps a block until the copies that read it are
        done: a new one per upload is cheap and never overwritten in flight)."""
        host = torch.empty(words.size, dtype=torch.int32, pin_memory=self.device.type == "cuda")
        host.numpy()[:] = words.ravel()
        return host

    def upload(self, words) -> torch.Tensor:
        """int32 words (an array or a list) to the device in one asynchronous copy; unlike
        torch.tensor(list, device=...), which waits for the work queued before it."""
        return self.pinned(np.asarray(words, dtype=np.int32)).to(self.device, non_blocking=True)

    def prepare(self, seqs: list[tuple[BlockTable, list[int]]]) -> tuple[ForwardBatch, list[int]]:
        """Pack sequences whose tables already hold room for their new tokens (appended):
        ids, positions, slots, cu_seqlens, lengths and block tables in one upload. Returns the
        batch and its cu_seqlens as host ints."""
        assert seqs, "empty batch"
        bs = self.block_size
        input_ids, positions, slots, cu, seq_lens = [], [], [], [0], []
        max_blocks = max(len(t.blocks) for t, _ in seqs)
        tables = np.zeros((len(seqs), max_blocks), dtype=np.int32)
        for i, (table, ids) in enumerate(seqs):
            start = table.num_tokens - len(ids)
            assert start >= 0, "append the new tokens to the block table before the forward"
            input_ids.extend(ids)
            positions.extend(range(start, table.num_tokens))
            slots.extend(table.slots(start, table.num_tokens, bs))
            cu.append(len(input_ids))
            seq_lens.append(table.num_tokens)
            tables[i, :len(table.blocks)] = table.blocks
        t, b = len(input_ids), len(seqs)
        words = self.upload(np.concatenate([
            np.asarray(input_ids + positions + slots + cu + seq_lens, dtype=np.int32),
            tables.ravel()]))
        ints = words[:3 * t].long()
        return ForwardBatch(
            input_ids=ints[:t], positions=ints[t:2 * t], slot_mapping=ints[2 * t:],
            cu_seqlens_q=words[3 * t:3 * t + b + 1],
            seq_lens=words[3 * t + b + 1:3 * t + 2 * b + 1],
            block_tables=words[3 * t + 2 * b + 1:].view(b, max_blocks),
            max_query_len=max(len(ids) for _, ids in seqs),
            kv_pool=self.kv_pool), cu

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """Final hidden states [T, H] of the batch's new tokens."""
        current_batch.batch = batch
        try:
            return self._decoder_call(batch.input_ids, batch.positions, batch)
        finally:
            current_batch.batch = None

    def _decoder_forward(self, input_ids, positions, batch: ForwardBatch) -> torch.Tensor:
        out = self.decoder(input_ids=input_ids[None], position_ids=positions[None],
                           use_cache=False, w2s_batch=batch)
        return out.last_hidden_state[0]

    def run(self, seqs: list[tuple[BlockTable, list[int]]], packed: dict | None = None) \
            -> tuple[torch.Tensor, list[int]]:
        """Forward a batch; returns (hidden [T, H], cu_seqlens [B + 1] as host ints: sequence
        b's new tokens are rows cu[b]:cu[b + 1]). The offsets come from the host, not from the
        device: reading them there would wait for the forward, and the host could not queue
        the next model's forward while the GPU runs this one. packed: where models that
        forward the same batch (a small pair on one stream) share its packed static inputs
        (ScoringGraphs.load)."""
        if self.scoring_graphs is not None:
            shape = self.scoring_graphs.shape(seqs)
            if shape is not None:
                return self.scoring_graphs.run(seqs, shape, packed)
        batch, offsets = self.prepare(seqs)
        return self.forward(batch), offsets

    def decode_logits(self, seqs: list[tuple[BlockTable, int]], extra: np.ndarray | None = None,
                      tokens_from: tuple[torch.Tensor, np.ndarray] | None = None,
                      requests: np.ndarray | None = None):
        """Logits [B, V] fp32 of one new token per sequence (tables already appended), and
        `extra` int32 words (sampling parameters, say) on the device, from the same upload.
        tokens_from: (tokens [P] on the device, rows [m]): the first m sequences' tokens are
        tokens[rows] (a step still in flight sampled them), not the ones in seqs.
        On static buffers (a CUDA graph per bucket) when the runner has DecodeGraphs and the
        batch fits them; else an eager forward. The logits are valid until the next decode.
        requests: each sequence's request (ints), which cascade attention's groups may follow
        (DecodeGraphs.pack)."""
        if self.graphs is not None and len(seqs) <= self.graphs.max_batch:
            return self.graphs.run(seqs, extra, tokens_from, requests)
        # The extra words and the carried rows' indices in one upload beside the batch's.
        extra_size = 0 if extra is None else extra.size
        rows = None if tokens_from is None else tokens_from[1]
        tail = [p.ravel() for p in (extra, rows) if p is not None]
        more = self.upload(np.concatenate(tail)) if tail else None
        batch, _ = self.prepare([(table, [token]) for table, token in seqs])
        if rows is not None:
            batch.input_ids[:rows.size] = tokens_from[0][more[extra_size:].long()]
        return self.compute_logits(self.forward(batch)), \
            None if extra is None else more[:extra_size]

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, H] -> fp32 [N, V], with the model's final soft-cap if it has one."""
        assert self.lm_head is not None, "this model has no LM head (a reward model)"
        return self.lm_head.logits(hidden)

    def copy_blocks(self, pairs: list[tuple[int, int]]):
        """Copy-on-write: copy each src block to dst, all layers, K and V, in one launch."""
        if not pairs:
            return
        # The kernel reads and writes in one launch, unordered: a block copied from and then
        # (freed and handed out again in the same pass) to is copied in two (ordered_runs).
        for run in ordered_runs(pairs):
            words = self.upload(np.asarray(run, dtype=np.int32).T)   # src row, then dst row
            copy_blocks(self.kv_pool, words[:len(run)], words[len(run):])
