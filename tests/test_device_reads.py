"""What a GPU would wait on: the engine's forwards read nothing back from the device.

A CUDA graph capture fails on any read of the device (`.item()`, `.tolist()`, a tensor in an
`if`, `nonzero`, a boolean mask, a tensor built from a list), and in an eager forward each
such read makes the host wait for the GPU before it can queue more work. On the CPU nothing
waits, so these tests record the reads instead: every architecture's decode on the static
buffers (the region a graph captures) and an eager extend (prefill, scoring), with the
attention and KV store through the GPU's Triton wrappers (run by the interpreter, whose own
host work is not counted, nor the filling of the pinned host buffers), must make none.
"""

import traceback

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import w2s_engine.models.attention as attention
from test_runner import TINY_CONFIGS, tiny_model
from w2s_engine.cache.block_manager import BlockManager
from w2s_engine.models.decode_graphs import DecodeGraphs
from w2s_engine.models.runner import ModelRunner

triton = pytest.importorskip("triton")
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from w2s_engine.kernels.kv_cache import store_kv_triton  # noqa: E402
from w2s_engine.kernels.paged_attention import (paged_decode_attention_triton,  # noqa: E402
                                                paged_extend_attention_triton)

READ_METHODS = {"item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__",
                "nonzero"}
READ_OPS = ("_local_scalar_dense", "nonzero", "masked_select", "is_nonzero")


class DeviceReads(TorchFunctionMode):
    """Records reads of tensor data by the host (with where they happened), outside the
    Triton interpreter's launches."""

    def __init__(self):
        super().__init__()
        self.reads, self.paused = [], 0
        self.ops = _OpReads(self)

    def note(self, what: str):
        if not self.paused:
            self.reads.append((what, "".join(traceback.format_stack(limit=7)[:-2])))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in READ_METHODS or func is torch.tensor:
            self.note(name or str(func))
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        self.ops.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        return self.ops.__exit__(*exc)


class _OpReads(TorchDispatchMode):
    def __init__(self, owner):
        super().__init__()
        self.owner = owner

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(op in str(func) for op in READ_OPS) or (
                "aten.index" in str(func) and any(
                    isinstance(i, torch.Tensor) and i.dtype == torch.bool
                    for i in (args[1] if len(args) > 1 and isinstance(args[1], (list, tuple))
                              else []))):
            self.owner.note(str(func))
        return func(*args, **(kwargs or {}))


@pytest.fixture
def reads(monkeypatch):
    """The attention through the GPU's wrappers; the interpreter's launches not counted."""
    mode = DeviceReads()
    launch = InterpretedFunction.run

    def run(self, *args, **kwargs):
        mode.paused += 1
        try:
            return launch(self, *args, **kwargs)
        finally:
            mode.paused -= 1
    monkeypatch.setattr(InterpretedFunction, "run", run)
    pinned = ModelRunner.pinned

    def host_buffer(self, words):    # a host (pinned) buffer on a GPU too: not a device read
        mode.paused += 1
        try:
            return pinned(self, words)
        finally:
            mode.paused -= 1
    monkeypatch.setattr(ModelRunner, "pinned", host_buffer)

    def attend(batch, q, k, v, layer, scaling, sliding_window=None, softcap=None, sinks=None):
        k_cache, v_cache = batch.kv_pool[layer, 0], batch.kv_pool[layer, 1]
        store_kv_triton(k, v, k_cache, v_cache, batch.slot_mapping)
        if batch.is_decode:
            out, _ = paged_decode_attention_triton(q.contiguous(), k_cache, v_cache,
                                                   batch.block_tables, batch.seq_lens, scaling,
                                                   sliding_window, softcap, sinks=sinks)
            return out
        return paged_extend_attention_triton(q.contiguous(), k_cache, v_cache, batch.block_tables,
                                             batch.cu_seqlens_q, batch.seq_lens, scaling,
                                             sliding_window, softcap, batch.max_query_len, sinks)
    monkeypatch.setattr(attention, "attend", attend)
    return mode


def where(mode) -> str:
    return "\n".join(f"{what} at:\n{stack}" for what, stack in mode.reads[:3])


@pytest.mark.parametrize("arch", list(TINY_CONFIGS))
def test_the_decode_a_graph_captures_reads_nothing_from_the_device(arch, reads):
    runner = ModelRunner(tiny_model(arch), num_blocks=64, block_size=4)
    graphs = DecodeGraphs(runner, max_batch=4, capture=False)
    graphs._warmup_rows(4)     # the rows a capture runs on: long, in real blocks
    with reads:
        graphs._forward(4)     # the captured region: unpack, forward, LM head
    assert not reads.reads, where(reads)


@pytest.mark.parametrize("arch", list(TINY_CONFIGS))
def test_the_scoring_forward_a_graph_captures_reads_nothing_from_the_device(arch, reads):
    from test_scoring_graphs import forked_streams
    from w2s_engine.models.scoring_graphs import ScoringGraphs
    runner = ModelRunner(tiny_model(arch), num_blocks=64, block_size=4)
    graphs = ScoringGraphs(runner, max_tokens=64, max_q=8, max_batch=32, capture=False)
    seqs = forked_streams(runner, BlockManager(64, 4), 3, 5, seed=1)
    bucket, tokens, q_cap = graphs.shape(seqs)
    graphs.load(seqs, bucket, tokens)
    with reads:
        graphs._forward(bucket, tokens, q_cap)     # the captured region: unpack, forward
    assert not reads.reads, where(reads)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_an_eager_extend_reads_nothing_from_the_device(arch, reads):
    """Prefill and the small models' scoring: the host can queue the next model's forward
    while the GPU runs this one."""
    runner = ModelRunner(tiny_model(arch), num_blocks=64, block_size=4)
    blocks = BlockManager(64, 4)
    tables = [blocks.new_table() for _ in range(3)]
    for t, n in zip(tables, (9, 5, 12)):
        blocks.append(t, n)
    runner.run([(t, list(range(1, t.num_tokens + 1))) for t in tables])
    feeds = [(t, [7, 8, 9][:i + 1]) for i, t in enumerate(tables)]
    for t, ids in feeds:
        blocks.append(t, len(ids))
    with reads:
        hidden, offsets = runner.run(feeds)
    assert not reads.reads, where(reads)
    assert offsets == [0, 1, 3, 6] and hidden.shape[0] == 6


def gpu_kernels(monkeypatch):
    """Sampling, the chunk reward and copy-on-write through their Triton wrappers, as on a
    GPU (the attention and KV store already are: the `reads` fixture)."""
    import w2s_engine.large.local as local
    import w2s_engine.models.runner as runner_module
    import w2s_engine.search.small_stream as small_stream
    from w2s_engine.kernels.chunk_reward import (fused_lmhead_chunk_reward_triton,
                                                 lmhead_chunk_logprob_triton)
    from w2s_engine.kernels.kv_cache import copy_blocks_triton
    from w2s_engine.kernels.sampling import sample_triton
    monkeypatch.setattr(local, "sample", sample_triton)
    monkeypatch.setattr(small_stream, "fused_lmhead_chunk_reward",
                        fused_lmhead_chunk_reward_triton)
    monkeypatch.setattr(small_stream, "lmhead_chunk_logprob", lmhead_chunk_logprob_triton)
    monkeypatch.setattr(runner_module, "copy_blocks", copy_blocks_triton)


def reads_per_step(monkeypatch, reads, max_new_tokens, logprobs=None, params=None,
                   **engine_options):
    """A search (CBS(2,2,3) unless params say otherwise) run as on a GPU (static decode,
    every kernel through its Triton wrapper), returning `logprobs` alternatives per token if
    given: per step after the first, whether it scored and what it read, in order."""
    from tiny_models import clone, make_tokenizer, tiny_llama, tuned_from
    from w2s_engine import Engine, SearchParams
    gpu_kernels(monkeypatch)
    tok = make_tokenizer(300)
    untuned = tiny_llama(len(tok), seed=2)
    engine = Engine((tiny_llama(len(tok), seed=1), tok), (tuned_from(untuned, 3, 0.3), tok),
                    (clone(untuned), tok), num_kv_blocks=200, block_size=4, progress=False,
                    device="cpu", dtype=torch.float32, cuda_graphs=True, **engine_options)
    params = params or SearchParams.cbs(2, 2, 3)
    params.max_new_tokens, params.seed = max_new_tokens, 1
    req = engine.add_request("I really", params)
    req.logprobs = logprobs        # as the server sets it
    engine.step()                  # admission and prefill, and the first tokens
    per_step = []
    while not req.status.ended:
        scored = req.stats.tokens_scored
        reads.reads.clear()
        with reads:
            engine.step()
        per_step.append((req.stats.tokens_scored > scored, [w for w, _ in reads.reads]))
    assert req.error is None
    if logprobs is not None:
        assert all(len(entries) == len(h.token_ids) and all(len(e.top) == logprobs
                                                             for e in entries)
                   for h, entries in ((h, h.logprobs) for h in req.result.hypotheses))
    return engine, per_step


@pytest.mark.parametrize("asynchronous", [False, True], ids=["waits", "async-scheduling"])
def test_a_beam_search_step_reads_the_device_once_and_a_scoring_step_twice(reads, monkeypatch,
                                                                          asynchronous):
    """Issue 16's one copy back per step: a decode step reads the sampled tokens and nothing
    else; a step that also scores a chunk adds the rewards (the token ids are checked on the
    host, not read back). With async scheduling too, where a step is fed the tokens of the
    step before it on the device."""
    _, per_step = reads_per_step(monkeypatch, reads, max_new_tokens=9,
                                 async_scheduling=asynchronous)
    decode = [r for s, r in per_step if not s]
    scoring = [r for s, r in per_step if s]
    if asynchronous:
        # CBS(2,2,3): every step is left in flight and read in the next engine step; a
        # chunk's first step reads nothing (the chunk before it was read to be scored), and
        # the scoring step reads the chunk's last tokens, then the rewards: still one read
        # of each step's tokens. (The steps here start at a chunk's second step.)
        assert decode and all(r == ([] if i % 3 == 2 else ["tolist"])
                              for i, r in enumerate(decode)), decode
    else:
        assert decode and all(r == ["tolist"] for r in decode), decode
    assert scoring and all(r == ["tolist", "tolist"] for r in scoring), scoring


def test_a_step_that_returns_logprobs_reads_them_with_the_sampled_tokens(reads, monkeypatch):
    """The log-probs and their alternatives come back in the tokens' copy: still one read
    per decode step."""
    _, per_step = reads_per_step(monkeypatch, reads, max_new_tokens=9, logprobs=3)
    decode = [r for s, r in per_step if not s]
    assert decode and all(r == ["tolist"] for r in decode), decode


def test_an_eft_step_reads_its_reward_terms_with_the_sampled_tokens(reads, monkeypatch):
    """EFT steers with both small models' log-probs each step, then records each sample's
    term at its token: uploaded rows and betas, and the terms read in the tokens' copy (with
    the log-probs the request asked for)."""
    from w2s_engine import SearchParams
    engine, per_step = reads_per_step(monkeypatch, reads, max_new_tokens=6, logprobs=2,
                                      params=SearchParams.eft(beta=0.5, n=2))
    assert per_step and all(r == ["tolist"] for _, r in per_step), per_step


def test_a_scoring_step_queues_every_streams_forward_before_it_reads_any(reads, monkeypatch):
    """Tuned and untuned under different templates score on two streams: both forwards are
    queued, then both rewards read (so the host queues the second while the GPU runs the
    first)."""
    forward = ModelRunner.forward

    def noted(self, batch):
        reads.reads.append(("forward", ""))
        return forward(self, batch)
    monkeypatch.setattr(ModelRunner, "forward", noted)
    engine, per_step = reads_per_step(
        monkeypatch, reads, max_new_tokens=6,
        templates={"tuned": "Glowing review: {prompt}", "untuned": "{prompt}"})
    assert len(engine.scorer.streams) == 2
    scoring = [r for s, r in per_step if s]
    # the decode and its tokens, then both streams' forwards, then both streams' rewards
    assert scoring and all(s == ["forward", "tolist", "forward", "forward", "tolist", "tolist"]
                           for s in scoring), scoring
