"""ScoringGraphs: an extend forward on static buffers, a CUDA graph per shape: a small model's
scoring chunks, and any model's prompt chunks.

Scoring a chunk forwards each candidate's new tokens through each small model: an extend of B
sequences with a few new tokens each (the chunk length L when every candidate extends its
stream by L tokens of one tokenizer; fewer for a beam that stopped inside the chunk; a varying
number when the small models re-tokenize the large model's text). That is a few hundred kernel
launches through transformers' modules for a few hundred rows, as launch-bound on a GPU as a
decode step. A prefill chunk (a few rows of up to max_batch_tokens tokens) is the same
forward with longer rows: eager, three models' chunks are some 700 launches, which on an H200
left the GPU idle through most of each prefill (11 ms a step with requests arriving every 2
steps, at 111ea9f). Here such a forward, when its longest row has 2 <= q <= max_q new tokens
and all of them fit max_tokens:
1. is padded to a shape (rows bucket, tokens bucket, q cap): the smallest batch bucket >= B
   (the decode graphs' buckets), the smallest token bucket >= the tokens, the longest row's q
   rounded up within the attention's query tile (q_cap: it costs the kernel nothing). The
   rows' tokens lie packed from the start, as in the eager path;
   padding rows have no tokens and no keys; the dead tokens after the last row's (id 0,
   position 0) write their keys and values to the pool's scratch block, which no real row
   reads, and no row attends to them;
2. goes to the device in one upload: per token its id, position and cache slot, per row its
   length and query offset, then the block tables (the columns in use), which one device copy
   moves into the static [max_batch, width] table;
3. replays the shape's graph: unpack, embeddings -> layers with the paged extend attention
   (its grid fixed by the rows bucket and the q cap) -> final norm, into a static hidden-state
   buffer, of which the caller gets a copy of the real tokens' rows (it keeps rows of it
   across steps).
A shape's graph is captured the first time it is seen, after that forward has run eagerly on
the static buffers (the kernels compiled and tuned, and its result used): the chunk lengths
of the requests to come are not known when the engine starts. All graphs share one memory
pool, which the engine counts in the KV budget at start (extend_activation_bytes of
max_tokens, and the static tables: static_bytes). A shape whose capture fails stays on the
eager static path, logged once.
Without capture (on CPU, or cuda_graphs off) the same static path runs eagerly: the tests
compare it with the eager path on packed lists.
"""

import logging
import time
from itertools import chain

import numpy as np
import torch

from w2s_engine.cache.block_manager import BlockTable, blocks_for
from w2s_engine.models.attention import ForwardBatch
from w2s_engine.models.decode_graphs import batch_buckets

logger = logging.getLogger(__name__)

# Graphs a scorer captures at most: shapes come as traffic brings them (rows, tokens, longest
# row), and each graph holds its kernels' parameters on the device for the process's life.
MAX_GRAPHS = 256


def token_buckets(max_tokens: int) -> list[int]:
    """Token counts that get a graph: powers of two to 256, then every 256, then max_tokens."""
    assert max_tokens >= 2
    out = [t for t in (16, 32, 64, 128, 256) if t < max_tokens]
    out += list(range(512, max_tokens, 256))
    return out + [max_tokens]


# A model that names no context (no max_position_embeddings): its static tables cover this
# many tokens, and a row with a longer table runs eagerly (the tables would otherwise be as
# wide as the whole pool, which the engine's memory budget, made before the pool, cannot know).
UNBOUNDED_CONTEXT_TOKENS = 32768


def context_blocks(max_positions: int | None, block_size: int) -> int:
    """Block-table columns of the static tables: the model's context, or
    UNBOUNDED_CONTEXT_TOKENS where it names none."""
    return blocks_for(max_positions or UNBOUNDED_CONTEXT_TOKENS, block_size)


class ScoringGraphs:

    def __init__(self, runner, max_tokens: int, max_q: int, max_batch: int, capture: bool):
        """runner: the scorer's ModelRunner; max_tokens: tokens of a forward at most; max_q:
        new tokens of a row at most; max_batch: rows at most; capture: record CUDA graphs
        (else the static path runs eagerly)."""
        assert max_tokens >= 2 and max_q >= 2 and max_batch >= 1
        self.runner = runner
        self.max_tokens = max_tokens
        self.max_q = max_q
        self.max_batch = max_batch
        self.buckets = batch_buckets(self.max_batch)
        self.token_buckets = token_buckets(max_tokens)
        self.block_size = runner.block_size
        self.width = min(context_blocks(runner.shape.max_positions, runner.block_size),
                         runner.num_blocks)
        dev = runner.device
        self.staging = torch.zeros(self.static_words(max_tokens, max_batch, self.width),
                                   dtype=torch.int32, device=dev)
        self.tables = torch.full((self.max_batch, self.width), runner.scratch_block,
                                 dtype=torch.int32, device=dev)
        self.hidden = torch.zeros(max_tokens, runner.shape.output_size, dtype=runner.dtype,
                                  device=dev)
        self.capture = capture
        self.graphs: dict[tuple[int, int, int], torch.cuda.CUDAGraph] = {}
        self.failed: dict[tuple[int, int, int], str] = {}   # shapes whose capture failed, why
        self.pool = None
        self.capture_seconds = 0.0
        self.max_graphs = MAX_GRAPHS
        self.said_full = False

    @staticmethod
    def static_words(max_tokens: int, max_batch: int, context_blocks: int) -> int:
        """int32 words of the staging buffer: ids, positions, slots; lengths, query offsets;
        the tables."""
        return 3 * max_tokens + 2 * max_batch + 1 + max_batch * context_blocks

    @staticmethod
    def static_bytes(max_tokens: int, max_batch: int, context_blocks: int) -> int:
        """The int32 staging buffer and block tables of a ScoringGraphs of these sizes."""
        return 4 * (ScoringGraphs.static_words(max_tokens, max_batch, context_blocks)
                    + max_batch * context_blocks)

    def shape(self, seqs: list[tuple[BlockTable, list[int]]]) -> tuple[int, int, int] | None:
        """(rows bucket, tokens bucket, q cap) when the static path takes this batch, else
        None."""
        if not seqs:
            return None
        lengths = [len(ids) for _, ids in seqs]
        q = max(lengths)
        if not 2 <= q <= self.max_q or min(lengths) < 1:
            return None
        if max(len(t.blocks) for t, _ in seqs) > self.width:   # (a model naming no context)
            return None
        bucket = next((b for b in self.buckets if b >= len(seqs)), None)
        tokens = next((t for t in self.token_buckets if t >= sum(lengths)), None)
        if bucket is None or tokens is None:
            return None
        return bucket, tokens, self.q_cap(q)

    def q_cap(self, q: int) -> int:
        """The longest row q rounded up as far as the extend attention's query tile allows:
        the tile holds the next power of two of q x (query heads per kv head) rows, so a cap
        up to that many rows costs the kernel nothing and keeps its choice of kernel (the
        short-chunk one up to GROUPED_EXTEND_ROWS rows), while one graph serves a range of q."""
        group = self.runner.shape.heads_per_kv_head
        return min(max(q, (1 << (q * group - 1).bit_length()) // group), self.max_q)

    def pack(self, seqs, bucket: int, tokens: int) -> tuple[np.ndarray, int]:
        """(int32 words of the padded batch and its tables, table columns in use)."""
        bs = self.block_size
        scratch = self.runner.scratch_block
        n = len(seqs)
        used = max(len(t.blocks) for t, _ in seqs)
        assert used <= self.width, "a sequence is longer than the model's context"
        tables = np.full((bucket, used), scratch, dtype=np.int32)
        seq_lens = np.zeros(bucket, dtype=np.int32)          # padding rows: no keys
        # The tables in one scatter, not a numpy row assignment per sequence (each converts
        # its list on its own: ~2 us, hundreds of rows a scoring): every table's blocks
        # flattened in C (chain), placed by (row, column) indices.
        n_blocks = np.fromiter(map(len, (t.blocks for t, _ in seqs)), dtype=np.int64, count=n)
        flat = np.fromiter(chain.from_iterable(t.blocks for t, _ in seqs), dtype=np.int32,
                           count=int(n_blocks.sum()))
        brow = np.repeat(np.arange(n), n_blocks)
        bstart = np.cumsum(n_blocks) - n_blocks
        tables[brow, np.arange(flat.size) - bstart[brow]] = flat
        seq_lens[:n] = np.fromiter((t.num_tokens for t, _ in seqs), dtype=np.int32, count=n)
        q_lens = np.fromiter(map(len, (ids for _, ids in seqs)), dtype=np.int32, count=n)
        assert (seq_lens[:n] >= q_lens).all(), "append the new tokens to the block table first"
        cu = np.zeros(bucket + 1, dtype=np.int32)
        np.cumsum(q_lens, out=cu[1:n + 1])
        cu[n + 1:] = cu[n]                                   # padding rows: no queries
        real = int(cu[n])
        row = np.repeat(np.arange(n), q_lens)
        # each row's new tokens end at its length; the dead tokens sit at position 0
        pos = seq_lens[row] - q_lens[row] + (np.arange(real, dtype=np.int32) - cu[row])
        words = np.zeros((3, tokens), dtype=np.int32)
        # chain flattens the ids in C: a generator's frame per token cost ~80 ns each
        words[0, :real] = np.fromiter(chain.from_iterable(ids for _, ids in seqs),
                                      dtype=np.int32, count=real)
        words[1, :real] = pos
        words[2, :real] = tables[row, pos // bs] * bs + pos % bs
        words[2, real:] = scratch * bs
        return np.concatenate([words.ravel(), seq_lens, cu, tables.ravel()]), used

    def run(self, seqs: list[tuple[BlockTable, list[int]]], shape: tuple[int, int, int],
            packed: dict | None = None):
        """Hidden states [T, H] of the batch's new tokens (a copy) and its cu_seqlens as host
        ints. shape: what shape() said of this batch; packed: as load() takes it."""
        bucket, tokens, q_cap = shape
        cu = self.load(seqs, bucket, tokens, packed)
        if shape in self.graphs:
            self.graphs[shape].replay()
        else:
            self._forward(bucket, tokens, q_cap)
            if self.capture and shape not in self.failed:
                if len(self.graphs) < self.max_graphs:
                    self._capture(bucket, tokens, q_cap)
                elif not self.said_full:
                    self.said_full = True
                    logger.warning("%d scoring graphs captured; new shapes run on the static "
                                   "buffers without one", self.max_graphs)
        return self.hidden[:cu[-1]].clone(), cu

    def load(self, seqs, bucket: int, tokens: int, packed: dict | None = None) -> list[int]:
        """The batch into the static inputs: one upload, one device copy of the tables.
        Returns the real rows' cu_seqlens as host ints. packed: pack()'s words of this batch,
        kept for the next model that forwards it (both models of a small pair forward the
        same tables and tokens: packed once, not once per model), by what else they depend on."""
        key = (bucket, tokens, self.runner.scratch_block, self.block_size)
        if packed is None or key not in packed:
            words, used = self.pack(seqs, bucket, tokens)
            if packed is not None:
                packed[key] = words, used
        else:
            words, used = packed[key]
            assert used <= self.width, "a sequence is longer than the model's context"
        self.staging[:words.size].copy_(self.runner.pinned(words), non_blocking=True)
        start = 3 * tokens + 2 * bucket + 1
        self.tables[:bucket, :used].copy_(self.staging[start:start + bucket * used]
                                          .view(bucket, used))
        return words[3 * tokens + bucket:3 * tokens + bucket + len(seqs) + 1].tolist()

    @torch.inference_mode()
    def _forward(self, bucket: int, tokens: int, q_cap: int):
        """The captured region: unpack the rows, forward into the static hidden buffer."""
        t = tokens
        st = self.staging
        batch = ForwardBatch(input_ids=st[:t].long(), positions=st[t:2 * t].long(),
                             slot_mapping=st[2 * t:3 * t].long(),
                             block_tables=self.tables[:bucket],
                             cu_seqlens_q=st[3 * t + bucket:3 * t + 2 * bucket + 1],
                             seq_lens=st[3 * t:3 * t + bucket], max_query_len=q_cap,
                             kv_pool=self.runner.kv_pool)
        self.hidden[:t].copy_(self.runner.forward(batch))

    def _capture(self, bucket: int, tokens: int, q_cap: int):
        """Record the shape's forward on the static buffers as they are (the inputs are read
        at each replay, so what they hold now does not matter: nothing runs while a graph is
        recorded)."""
        t = time.perf_counter()
        shape = (bucket, tokens, q_cap)
        try:
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                self._forward(bucket, tokens, q_cap)
            self.graphs[shape] = graph
            logger.info("captured the scoring graph of %d rows, %d tokens, rows of up to %d "
                        "in %.2f s", *shape, time.perf_counter() - t)
        except Exception as e:
            # The static path still runs, eagerly: slower, not wrong. Say so once per shape.
            self.failed[shape] = f"{type(e).__name__}: {e}"
            logger.exception("CUDA graph capture of the scoring forward (%d rows, %d tokens, "
                             "rows of up to %d) failed; that shape runs on the static buffers "
                             "without a graph", *shape)
        self.capture_seconds += time.perf_counter() - t
