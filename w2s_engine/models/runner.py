"""ModelRunner: runs one transformers decoder on packed batches over its own paged KV pool.

A forward takes any mix of prefills (a whole prompt), extends (a chunk of known tokens after a
cached prefix) and decodes (one token), one list entry per sequence, and returns the final
hidden states of every new token. The LM head is applied separately (compute_logits) so the
reward path can fuse it with log-softmax instead of materialising logits.
"""

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from w2s_engine.cache.block_manager import BlockTable
from w2s_engine.kernels.kv_cache import copy_blocks
from w2s_engine.models.attention import ATTN_IMPLEMENTATION, ForwardBatch


@dataclass(frozen=True)
class ModelShape:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    max_positions: int | None

    @classmethod
    def of(cls, model: PreTrainedModel) -> "ModelShape":
        cfg = model.config.get_text_config()
        num_heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // num_heads
        return cls(num_layers=cfg.num_hidden_layers,
                   num_kv_heads=getattr(cfg, "num_key_value_heads", None) or num_heads,
                   head_dim=head_dim, hidden_size=cfg.hidden_size,
                   vocab_size=model.get_output_embeddings().weight.shape[0],
                   max_positions=getattr(cfg, "max_position_embeddings", None))

    def kv_bytes_per_block(self, block_size: int, dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return self.num_layers * 2 * block_size * self.num_kv_heads * self.head_dim * elem


class ModelRunner:

    def __init__(self, model: PreTrainedModel, num_blocks: int, block_size: int = 16):
        if model.config._attn_implementation != ATTN_IMPLEMENTATION:
            model.set_attn_implementation(ATTN_IMPLEMENTATION)
        self.model = model.eval()
        self.decoder = model.base_model
        self.shape = ModelShape.of(model)
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.device = model.device
        self.dtype = model.dtype
        s = self.shape
        self.kv_pool = torch.zeros(s.num_layers, 2, num_blocks, block_size, s.num_kv_heads,
                                   s.head_dim, dtype=self.dtype, device=self.device)
        head = model.get_output_embeddings()
        self.lm_head_weight = head.weight                       # [V, H]
        self.lm_head_bias = getattr(head, "bias", None)
        self.final_logit_softcap = getattr(model.config.get_text_config(),
                                           "final_logit_softcapping", None)

    def prepare(self, seqs: list[tuple[BlockTable, list[int]]]) -> ForwardBatch:
        """Pack sequences whose tables already hold room for their new tokens (appended)."""
        assert seqs, "empty batch"
        bs = self.block_size
        input_ids, positions, slots, cu, seq_lens = [], [], [], [0], []
        max_blocks = max(len(t.blocks) for t, _ in seqs)
        tables = []
        for table, ids in seqs:
            start = table.num_tokens - len(ids)
            assert start >= 0, "append the new tokens to the block table before the forward"
            input_ids.extend(ids)
            positions.extend(range(start, table.num_tokens))
            slots.extend(table.slots(start, table.num_tokens, bs))
            cu.append(len(input_ids))
            seq_lens.append(table.num_tokens)
            tables.append(table.blocks + [0] * (max_blocks - len(table.blocks)))
        dev = self.device
        return ForwardBatch(
            input_ids=torch.tensor(input_ids, dtype=torch.long, device=dev),
            positions=torch.tensor(positions, dtype=torch.long, device=dev),
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
            block_tables=torch.tensor(tables, dtype=torch.int32, device=dev),
            cu_seqlens_q=torch.tensor(cu, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            max_query_len=max(len(ids) for _, ids in seqs),
            kv_pool=self.kv_pool)

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """Final hidden states [T, H] of the batch's new tokens."""
        out = self.decoder(input_ids=batch.input_ids[None], position_ids=batch.positions[None],
                           use_cache=False, w2s_batch=batch)
        return out.last_hidden_state[0]

    def run(self, seqs: list[tuple[BlockTable, list[int]]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward a batch; returns (hidden [T, H], cu_seqlens_q [B + 1])."""
        batch = self.prepare(seqs)
        return self.forward(batch), batch.cu_seqlens_q

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, H] -> fp32 [N, V], with the model's final soft-cap if it has one."""
        logits = torch.nn.functional.linear(hidden, self.lm_head_weight, self.lm_head_bias).float()
        if self.final_logit_softcap:
            logits = torch.tanh(logits / self.final_logit_softcap) * self.final_logit_softcap
        return logits

    def copy_blocks(self, pairs: list[tuple[int, int]]):
        """Copy-on-write: copy each src block to dst, all layers, K and V, in one launch."""
        if not pairs:
            return
        src = torch.tensor([s for s, _ in pairs], dtype=torch.long, device=self.device)
        dst = torch.tensor([d for _, d in pairs], dtype=torch.long, device=self.device)
        copy_blocks(self.kv_pool, src, dst)
