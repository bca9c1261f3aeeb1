"""DecodeGraphs: one model's decode step on static buffers, captured as a CUDA graph per bucket.

A decode step is a few hundred kernel launches through transformers' modules; at the batch
sizes of a search the GPU would wait on the host between them. Here a decode of B sequences
(one new token each):
1. is padded to the smallest bucket >= B (1, 2, 4, 8, 16, 24, 32, 48, 64, then every 32 up to
   max_batch); padding rows hold token 0 at position 0 and read and write the pool's scratch
   block, so they touch no sequence's KV;
2. goes to the device in one upload into a static staging buffer: per row the token, its
   position, its cache slot and the sequence length, then the block tables (only the columns
   in use), then any int32 words the caller adds (the sampling parameters); one device copy
   moves the tables into the static [max_batch, width] table (columns past a row's length are
   stale and never read: the kernels stop at the length);
3. replays the bucket's graph: unpack the rows, embeddings -> layers with the paged attention
   -> final norm -> LM head, into a static logits buffer.
Nothing inside a graph syncs with the host, branches in Python on tensor data or builds a
tensor from a list; the table width is fixed, so the attention's split count is fixed per
bucket. All graphs share one memory pool, captured from the largest bucket down.
Without capture (on CPU, or cuda_graphs off) the same static path runs eagerly: the tests
compare it with the eager path on packed lists.

With cascade, the upload also carries the batch's shared-prefix groups (found on the host from
the tables it packs, kernels/cascade_attention.py), in a fixed layout per bucket, and the
attention reads each group's shared run of blocks once (cascade_decode_attention).
"""

import logging
import time

import numpy as np
import torch

from w2s_engine.cache.block_manager import BlockTable, blocks_for
from w2s_engine.kernels.cascade_attention import (shared_prefix_words, static_shared_prefixes,
                                                  static_words)
from w2s_engine.models.attention import ForwardBatch

logger = logging.getLogger(__name__)

SMALL_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64)
ROW_WORDS = 4     # token, position, slot, length
EXTRA_WORDS = 16  # per row, for the caller's words that ride along in the same upload
TUNE_TOKENS = 1024  # the length of the rows the kernels are tuned on at capture


def batch_buckets(max_batch: int) -> list[int]:
    """Batch sizes that get a graph: the small ones, then every 32, then max_batch itself."""
    assert max_batch >= 1
    out = [b for b in SMALL_BUCKETS if b < max_batch]
    out += list(range(96, max_batch, 32))
    return out + [max_batch]


class DecodeGraphs:

    def __init__(self, runner, max_batch: int, capture: bool, cascade: bool = False):
        """runner: the ModelRunner whose model and pool the graphs run; capture: record CUDA
        graphs (else the static path runs eagerly); cascade: shared-prefix decode attention."""
        self.runner = runner
        self.max_batch = max_batch
        self.buckets = batch_buckets(max_batch)
        self.block_size = runner.block_size
        limit = runner.shape.max_positions or runner.num_blocks * runner.block_size
        self.width = min(blocks_for(limit, runner.block_size), runner.num_blocks)
        dev = runner.device
        # Room for the rows, their tables and EXTRA_WORDS more per row (sampling parameters).
        self.cascade = cascade
        # query heads per kv head: the cascade's prefix tiles hold rows_per_tile(group) rows
        self.group = runner.shape.heads_per_kv_head
        cascade_words = static_words(max_batch, self.group) if cascade else 0
        self.staging = torch.zeros(max_batch * (ROW_WORDS + self.width + EXTRA_WORDS)
                                   + cascade_words, dtype=torch.int32, device=dev)
        self.groups_buffer = torch.zeros(cascade_words, dtype=torch.int32, device=dev)
        # Each bucket's view of it (fixed bounds, so fixed grids), made once.
        self.groups = {b: static_shared_prefixes(self.groups_buffer, b,
                                                 self.width * self.block_size, self.group)
                       for b in self.buckets} if cascade else {}
        self.tables = torch.full((max_batch, self.width), runner.scratch_block,
                                 dtype=torch.int32, device=dev)
        self.cu = torch.arange(max_batch + 1, dtype=torch.int32, device=dev)
        self.logits = torch.zeros(max_batch, runner.shape.vocab_size, dtype=torch.float32,
                                  device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.capture_seconds = 0.0
        self.capture_error: str | None = None
        self.memory_bytes = 0
        if capture:
            try:
                self._capture()
            except Exception as e:
                # The static path still runs, eagerly: slower, not wrong. Say so loudly.
                self.graphs = {}
                self.capture_error = f"{type(e).__name__}: {e}"
                logger.exception("CUDA graph capture failed; the decode runs on the static "
                                 "buffers without graphs (slower). cuda_graphs=False skips "
                                 "the attempt")

    # ---- a step --------------------------------------------------------------------------

    def bucket(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)

    def pack(self, seqs: list[tuple[BlockTable, int]], bucket: int,
             requests: np.ndarray | None = None) -> tuple[np.ndarray, int]:
        """(int32 words of the padded rows and their tables, table columns in use).
        requests: each row's request, which the cascade's groups may follow."""
        bs = self.block_size
        scratch = self.runner.scratch_block
        used = max(len(t.blocks) for t, _ in seqs)
        assert used <= self.width, "a sequence is longer than the model's context"
        n = len(seqs)
        lengths = np.fromiter((t.num_tokens for t, _ in seqs), dtype=np.int32, count=n)
        assert lengths.min() >= 1, "append the new token to the block table before the decode"
        tables = np.full((bucket, used), scratch, dtype=np.int32)
        for i, (table, _) in enumerate(seqs):
            tables[i, :len(table.blocks)] = table.blocks
        pos = lengths - 1
        rows = np.zeros((ROW_WORDS, bucket), dtype=np.int32)
        rows[2] = scratch * bs          # padding rows: slot 0 of the scratch block, length 1
        rows[3] = 1
        rows[0, :n] = np.fromiter((token for _, token in seqs), dtype=np.int32, count=n)
        rows[1, :n] = pos
        rows[2, :n] = tables[np.arange(n), pos // bs] * bs + pos % bs
        rows[3, :n] = lengths
        parts = [rows.ravel(), tables.ravel()]
        if self.cascade:
            parts.append(shared_prefix_words(tables[:n], rows[3, :n], bs, bucket, self.group,
                                             requests))
        return np.concatenate(parts), used

    def run(self, seqs: list[tuple[BlockTable, int]], extra: np.ndarray | None = None,
            tokens_from: tuple[torch.Tensor, np.ndarray] | None = None,
            requests: np.ndarray | None = None):
        """Logits [B, V] of each sequence's new token (a view of the static buffer, valid until
        the next run) and the `extra` words on the device (None if none). tokens_from:
        (tokens [P] on the device, rows [m]): the first m rows' tokens are tokens[rows]; the
        rows ride in the upload after the extra words, and one gather writes the tokens
        into the staged rows before the replay. requests: as pack takes them."""
        n = len(seqs)
        assert 0 < n <= self.max_batch
        bucket = self.bucket(n)
        words, used = self.pack(seqs, bucket, requests)
        head = words.size
        extra_size = 0 if extra is None else extra.size
        rows = None if tokens_from is None else tokens_from[1].astype(np.int32)
        tail = [p.ravel().astype(np.int32) for p in (extra, rows) if p is not None]
        size = sum(p.size for p in tail)
        separate = head + size > self.staging.numel()
        if tail and not separate:
            words = np.concatenate([words] + tail)
        self.staging[:words.size].copy_(self.runner.pinned(words), non_blocking=True)
        if tail and separate:   # more than the staging buffer holds: their own upload
            more = self.runner.upload(np.concatenate(tail))
        else:
            more = self.staging[head:head + size]
        if rows is not None:
            self.staging[:rows.size].copy_(tokens_from[0][more[extra_size:].long()])
        start = ROW_WORDS * bucket
        self.tables[:bucket, :used].copy_(self.staging[start:start + bucket * used]
                                          .view(bucket, used))
        if self.cascade:
            start += bucket * used
            groups = static_words(bucket, self.group)
            self.groups_buffer[:groups].copy_(self.staging[start:start + groups])
        if bucket in self.graphs:
            self.graphs[bucket].replay()
        else:
            self._forward(bucket)
        return self.logits[:n], None if extra is None else more[:extra_size]

    @torch.inference_mode()
    def _forward(self, bucket: int):
        """The captured region: unpack the rows, forward, LM head into the static logits."""
        st = self.staging
        ids = st[:bucket].long()
        positions = st[bucket:2 * bucket].long()
        slots = st[2 * bucket:3 * bucket].long()
        batch = ForwardBatch(input_ids=ids, positions=positions, slot_mapping=slots,
                             block_tables=self.tables[:bucket], cu_seqlens_q=self.cu[:bucket + 1],
                             seq_lens=st[3 * bucket:4 * bucket], max_query_len=1,
                             kv_pool=self.runner.kv_pool,
                             shared_prefixes=self.groups.get(bucket))
        hidden = self.runner.forward(batch)
        self.logits[:bucket].copy_(self.runner.compute_logits(hidden))

    # ---- capture -------------------------------------------------------------------------

    def _warmup_rows(self, bucket: int):
        """Fill a bucket's static inputs with a typical decode to capture on: every row
        TUNE_TOKENS long, reading real pool blocks (empty at capture: their values do not
        matter), with cascade in groups of 16 rows that share all but their last 64 tokens;
        every new token written to the scratch block. Triton tunes the attention kernels at
        their first call, and the graph keeps that choice: on padding rows of length 1 every
        configuration looks the same."""
        bs = self.block_size
        length = min(TUNE_TOKENS, self.width * bs)
        width = blocks_for(length, bs)
        own = min(width, blocks_for(64, bs)) if self.cascade else width
        shared = width - own
        tables = np.empty((bucket, width), dtype=np.int64)
        at = 0
        for i in range(bucket):
            if i % 16 == 0:                 # a new group: its shared run
                prefix = np.arange(at, at + shared)
                at += shared
            tables[i, :shared] = prefix
            tables[i, shared:] = np.arange(at, at + own)
            at += own
        tables = (tables % self.runner.num_blocks).astype(np.int32)   # a small pool: reuse
        rows = np.zeros((ROW_WORDS, bucket), dtype=np.int32)
        rows[1] = length - 1
        rows[2] = self.runner.scratch_block * bs
        rows[3] = length
        self.staging[:rows.size].copy_(torch.from_numpy(rows.ravel()))
        self.tables[:bucket, :width].copy_(torch.from_numpy(tables))
        if self.cascade:
            words = shared_prefix_words(tables, rows[3], bs, bucket, self.group)
            self.groups_buffer[:words.size].copy_(torch.from_numpy(words))

    def _capture(self):
        assert self.runner.device.type == "cuda", "CUDA graphs need a CUDA device"
        t = time.perf_counter()
        free_before = torch.cuda.mem_get_info(self.runner.device)[0]
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.runner.device)
        for bucket in reversed(self.buckets):   # the largest first: the others reuse its pool
            self._warmup_rows(bucket)
            self._forward(bucket)               # warm-up: compiles and tunes the kernels
            torch.cuda.synchronize(self.runner.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=stream):
                self._forward(bucket)
            self.graphs[bucket] = graph
        torch.cuda.synchronize(self.runner.device)
        self.capture_seconds = time.perf_counter() - t
        self.memory_bytes = max(0, free_before - torch.cuda.mem_get_info(self.runner.device)[0])
        logger.info("captured %d decode graphs (batch 1..%d) in %.1f s, %.0f MiB",
                    len(self.graphs), self.max_batch, self.capture_seconds,
                    self.memory_bytes / 2**20)
