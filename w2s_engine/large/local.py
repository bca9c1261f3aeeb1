"""LocalLarge: the large model in this process, on its own paged KV pool.

prefill() forwards every new prompt once, in one batch, and keeps its last logits: the
W*K first children of a prompt all sample their first token from them, with no forward.
advance() samples one token for every beam that is still generating, in every running
request: one batched decode forward (the beams' last tokens over their block tables), the
EFT rows steered by the small models (search/eft.py), and one sampling call for all rows,
each seeded by (request seed, beam, position). The detokenizer turns each beam's tokens
into text incrementally, for stop strings, the bridge to other tokenizers and the result.
"""

import torch

from w2s_engine.cache.block_manager import BlockManager, BlockTable
from w2s_engine.kernels.sampling import sample
from w2s_engine.models.runner import ModelRunner
from w2s_engine.search.bridge import Detokenizer
from w2s_engine.search.eft import EFT
from w2s_engine.search.prompts import check_context
from w2s_engine.search.request import SearchRequest
from w2s_engine.search.sequence import Beam
from w2s_engine.search.tokens import encode


class LocalLarge:

    def __init__(self, runner: ModelRunner, tokenizer, eos_ids: set[int], blocks: BlockManager):
        self.runner = runner
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.blocks = blocks
        self.detokenizer = Detokenizer(tokenizer)
        self.eft: EFT | None = None   # set by the engine when its models can run EFT

    def encode_prompt(self, text: str, special: bool, max_new_tokens: int) -> list[int]:
        ids = encode(self.tokenizer, text, special)
        check_context("large", self.runner.shape.max_positions, len(ids), max_new_tokens)
        return ids

    def new_table(self) -> BlockTable:
        return self.blocks.new_table()

    def prefill(self, requests: list[SearchRequest]):
        """One forward for all new prompts; keep each prompt's last logits."""
        items = [(r.root.large, r.large_prompt_ids) for r in requests]
        for table, ids in items:
            self.blocks.append(table, len(ids))
        hidden, cu = self.runner.run(items)
        last = self.runner.compute_logits(hidden[(cu[1:] - 1).long()])
        for i, r in enumerate(requests):
            r.root_logits = last[i]
            r.stats.tokens_forwarded["large"] = len(r.large_prompt_ids)

    def advance(self, requests: list[SearchRequest]) -> list[tuple[SearchRequest, str]]:
        """One token for every generating beam of every running request. Returns the requests
        that failed, with why (none: a local model fails the whole step or nothing)."""
        work = [(r, b) for r in requests for b in r.generating]
        if not work:
            return []
        fed = [(r, b) for r, b in work if b.token_ids]
        rows, steered = [], []
        if fed:
            copies = []
            for _, b in fed:
                copies += self.blocks.append(b.large, 1)
            self.runner.copy_blocks(copies)
            hidden, _ = self.runner.run([(b.large, b.token_ids[-1:]) for _, b in fed])
            logits = self.runner.compute_logits(hidden)
            for r, _ in fed:
                r.stats.tokens_forwarded["large"] += 1
            rows.append(self._steer(logits, fed, 0, steered))
        first = [(r, b) for r, b in work if not b.token_ids]
        if first:
            # Beams with no token yet sample from their root's prompt logits: no forward.
            logits = torch.stack([r.root_logits for r, _ in first])
            rows.append(self._steer(logits, first, len(fed), steered))
        order = fed + first
        logits = torch.cat(rows) if len(rows) > 1 else rows[0]
        tokens = self._sample(logits, order)
        for (r, b), tok in zip(order, tokens):
            r.record_token(b, tok, self.eos_ids, self.response_text)
        if steered:
            self.eft.record(steered, tokens)
        return []

    def _steer(self, logits, items, row_offset: int, steered: list):
        if self.eft is None:
            return logits
        logits, rows = self.eft.steer(logits, items, row_offset)
        steered += rows
        return logits

    @staticmethod
    def _sample(logits, order) -> list[int]:
        dev = logits.device
        params = [r.params for r, _ in order]
        return sample(
            logits,
            torch.tensor([p.temperature for p in params], dtype=torch.float32, device=dev),
            torch.tensor([p.top_k for p in params], dtype=torch.int32, device=dev),
            torch.tensor([p.top_p for p in params], dtype=torch.float32, device=dev),
            torch.tensor([r.beam_seed(b) for r, b in order], dtype=torch.int64, device=dev),
            torch.tensor([len(b.token_ids) for _, b in order], dtype=torch.int64, device=dev),
        ).tolist()

    def response_text(self, b: Beam) -> str:
        """The response as text (incrementally decoded), cut before a matched stop string."""
        text = self.detokenizer.update(b.detok, b.token_ids, flush=b.finished)
        return text if b.stop_text_len is None else text[:b.stop_text_len]

    def num_tokens(self, b: Beam) -> int:
        return len(b.token_ids)
