"""ScoringGraphs: a small model's scoring forward on static buffers, a CUDA graph per shape.

Scoring a chunk forwards each candidate's new tokens through each small model: an extend of B
sequences with q tokens each (q = the chunk length L when every candidate extends its stream,
as with one tokenizer). That is a few hundred kernel launches through transformers' modules for
a few hundred rows, as launch-bound on a GPU as a decode step. Here such a forward, when every
sequence has the same q new tokens (2 <= q <= max_q) and the padded batch fits max_tokens:
1. is padded to the smallest batch bucket >= B (the decode graphs' buckets); a padding row
   holds q tokens at positions 0..q-1 in the pool's scratch block, which it alone reads and
   writes;
2. goes to the device in one upload: per token its id, position and cache slot, per row its
   length, then the block tables (the columns in use), which one device copy moves into the
   static [max_batch, width] table;
3. replays the (bucket, q) graph: unpack, embeddings -> layers with the paged extend attention
   (its grid fixed by bucket and q) -> final norm, into a static hidden-state buffer, of which
   the caller gets a copy (it keeps rows of it across steps).
A shape's graph is captured the first time it is seen, after that forward has run eagerly on
the static buffers (the kernels compiled and tuned, and its result used): the chunk lengths
of the requests to come are not known when the engine starts. All graphs share one memory
pool, which the engine counts in the KV budget at start (extend_activation_bytes of
max_tokens, and the static tables: static_bytes). A shape whose capture fails stays on the eager static path, logged once.
Without capture (on CPU, or cuda_graphs off) the same static path runs eagerly: the tests
compare it with the eager path on packed lists.
"""

import logging
import time

import numpy as np
import torch

from w2s_engine.cache.block_manager import BlockTable, blocks_for
from w2s_engine.models.attention import ForwardBatch
from w2s_engine.models.decode_graphs import batch_buckets

logger = logging.getLogger(__name__)


class ScoringGraphs:

    def __init__(self, runner, max_tokens: int, max_q: int, max_batch: int, capture: bool):
        """runner: the scorer's ModelRunner; max_tokens: padded rows x q at most; max_batch:
        rows at most; capture: record CUDA graphs (else the static path runs eagerly)."""
        assert max_tokens >= 2 and max_q >= 2 and max_batch >= 1
        self.runner = runner
        self.max_tokens = max_tokens
        self.max_q = max_q
        self.max_batch = max_batch
        self.buckets = batch_buckets(self.max_batch)
        self.block_size = runner.block_size
        limit = runner.shape.max_positions or runner.num_blocks * runner.block_size
        self.width = min(blocks_for(limit, runner.block_size), runner.num_blocks)
        dev = runner.device
        self.staging = torch.zeros(3 * max_tokens + self.max_batch * (1 + self.width),
                                   dtype=torch.int32, device=dev)
        self.tables = torch.full((self.max_batch, self.width), runner.scratch_block,
                                 dtype=torch.int32, device=dev)
        self.cu: dict[int, torch.Tensor] = {}   # q -> [0, q, 2q, ...], made once per q
        self.hidden = torch.zeros(max_tokens, runner.shape.hidden_size, dtype=runner.dtype,
                                  device=dev)
        self.capture = capture
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.failed: dict[tuple[int, int], str] = {}   # shapes whose capture failed, and why
        self.pool = None
        self.capture_seconds = 0.0

    @staticmethod
    def static_bytes(max_tokens: int, max_batch: int, context_blocks: int) -> int:
        """The int32 staging buffer and block tables of a ScoringGraphs of these sizes."""
        return 4 * (3 * max_tokens + max_batch * (1 + 2 * context_blocks))

    def shape(self, seqs: list[tuple[BlockTable, list[int]]]) -> tuple[int, int] | None:
        """(bucket, q) when the static path takes this batch, else None."""
        if not seqs:
            return None
        q = len(seqs[0][1])
        if not 2 <= q <= self.max_q or any(len(ids) != q for _, ids in seqs):
            return None
        bucket = next((b for b in self.buckets if b >= len(seqs)), None)
        if bucket is None or bucket * q > self.max_tokens:
            return None
        return bucket, q

    def pack(self, seqs, bucket: int, q: int) -> tuple[np.ndarray, int]:
        """(int32 words of the padded rows and their tables, table columns in use)."""
        bs = self.block_size
        scratch = self.runner.scratch_block
        n = len(seqs)
        used = max(len(t.blocks) for t, _ in seqs)
        assert used <= self.width, "a sequence is longer than the model's context"
        tables = np.full((bucket, used), scratch, dtype=np.int32)
        lengths = np.full(bucket, q, dtype=np.int32)        # padding rows: q tokens
        for i, (table, _) in enumerate(seqs):
            tables[i, :len(table.blocks)] = table.blocks
            lengths[i] = table.num_tokens
        assert (lengths[:n] >= q).all(), "append the new tokens to the block table first"
        # positions [bucket, q]: each row's new tokens end at its length
        pos = lengths[:, None] - q + np.arange(q, dtype=np.int32)[None, :]
        tokens = np.zeros((3, bucket, q), dtype=np.int32)
        tokens[0, :n] = np.array([ids for _, ids in seqs], dtype=np.int32)
        tokens[1] = pos
        tokens[2] = np.take_along_axis(tables, pos // bs, axis=1) * bs + pos % bs
        return np.concatenate([tokens.ravel(), lengths, tables.ravel()]), used

    def run(self, seqs: list[tuple[BlockTable, list[int]]], shape: tuple[int, int]):
        """Hidden states [B * q, H] of the batch's new tokens (a copy) and its cu_seqlens as
        host ints. shape: what shape() said of this batch."""
        bucket, q = shape
        self.load(seqs, bucket, q)
        if shape in self.graphs:
            self.graphs[shape].replay()
        else:
            self._forward(bucket, q)
            if self.capture and shape not in self.failed:
                self._capture(bucket, q)
        n = len(seqs) * q
        return self.hidden[:n].clone(), list(range(0, n + 1, q))

    def load(self, seqs, bucket: int, q: int):
        """The batch into the static inputs: one upload, one device copy of the tables."""
        if q not in self.cu:
            self.cu[q] = torch.arange(0, self.max_tokens + 1, q, dtype=torch.int32,
                                      device=self.runner.device)
        words, used = self.pack(seqs, bucket, q)
        self.staging[:words.size].copy_(self.runner.pinned(words), non_blocking=True)
        start = 3 * bucket * q + bucket
        self.tables[:bucket, :used].copy_(self.staging[start:start + bucket * used]
                                          .view(bucket, used))

    @torch.inference_mode()
    def _forward(self, bucket: int, q: int):
        """The captured region: unpack the rows, forward into the static hidden buffer."""
        t = bucket * q
        st = self.staging
        batch = ForwardBatch(input_ids=st[:t].long(), positions=st[t:2 * t].long(),
                             slot_mapping=st[2 * t:3 * t].long(),
                             block_tables=self.tables[:bucket],
                             cu_seqlens_q=self.cu[q][:bucket + 1],
                             seq_lens=st[3 * t:3 * t + bucket], max_query_len=q,
                             kv_pool=self.runner.kv_pool)
        self.hidden[:t].copy_(self.runner.forward(batch))

    def _capture(self, bucket: int, q: int):
        """Record the (bucket, q) forward on the static buffers as they are (the inputs are
        read at each replay, so what they hold now does not matter: nothing runs while a
        graph is recorded)."""
        t = time.perf_counter()
        try:
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                self._forward(bucket, q)
            self.graphs[(bucket, q)] = graph
            logger.info("captured the scoring graph of %d rows x %d tokens in %.2f s",
                        bucket, q, time.perf_counter() - t)
        except Exception as e:
            # The static path still runs, eagerly: slower, not wrong. Say so once per shape.
            self.failed[(bucket, q)] = f"{type(e).__name__}: {e}"
            logger.exception("CUDA graph capture of the scoring forward (%d rows x %d tokens) "
                             "failed; that shape runs on the static buffers without a graph",
                             bucket, q)
        self.capture_seconds += time.perf_counter() - t
