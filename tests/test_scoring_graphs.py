"""The small models' scoring forward on static buffers (models/scoring_graphs.py): shapes,
padding, one upload, and CUDA graph replay.

On CPU the padded static path runs eagerly (no graphs exist there) and must give the eager
path's hidden states and KV writes, and the same searches; the `gpu` tests capture the graphs
and replay them.
"""

import dataclasses
import random

import numpy as np
import pytest
import torch

from test_decode_graphs import engine_pair, make_models, prompt_roots, same_results
from test_runner import TINY_CONFIGS, tiny_model
from tiny_models import tiny_llama
from w2s_engine import Engine, SearchParams
from w2s_engine.cache.block_manager import BlockManager
from w2s_engine.kernels.paged_attention import GROUPED_EXTEND_ROWS
from w2s_engine.models.runner import ModelRunner
from w2s_engine.models.scoring_graphs import ScoringGraphs, token_buckets

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def forked_streams(runner, blocks, n, q, seed):
    """n sequences forked from a few prompts at ragged lengths, each with q new tokens (or
    q[i], for a list) appended (copy-on-write done): what a scoring forward sees after a
    chunk."""
    rng = random.Random(seed)
    vocab = runner.shape.vocab_size
    roots = prompt_roots(runner, blocks, rng)
    seqs, copies = [], []
    for i in range(n):
        t = blocks.fork(roots[i % 3])
        new = q[i] if isinstance(q, list) else q
        copies += blocks.append(t, new)
        seqs.append((t, [rng.randrange(vocab) for _ in range(new)]))
    runner.copy_blocks(copies)
    for t in roots:
        blocks.free(t)
    return seqs


def static_against_eager(model, capture: bool, shapes, max_tokens=256):
    """Hidden states of runner.run on the scoring graphs' static buffers against eager runs,
    for each (rows, new tokens per row, or a list of each row's); both must write the same
    KV."""
    runner = ModelRunner(model.to(DEVICE), num_blocks=400, block_size=4)
    blocks = BlockManager(400, 4)
    graphs = ScoringGraphs(runner, max_tokens=max_tokens, max_q=32, max_batch=64,
                           capture=capture)
    for n, q in shapes:
        for _ in range(2 if capture else 1):       # on a GPU: the eager first run, then replay
            seqs = forked_streams(runner, blocks, n, q, seed=n * int(np.sum(q)))
            pool_before = runner.kv_pool.clone()
            runner.scoring_graphs = graphs
            assert graphs.shape(seqs) is not None
            hidden, cu = runner.run(seqs)
            static_pool = runner.kv_pool.clone()
            runner.kv_pool.copy_(pool_before)
            runner.scoring_graphs = None
            eager, eager_cu = runner.run(seqs)
            assert cu == eager_cu == [0, *np.cumsum([len(ids) for _, ids in seqs])]
            torch.testing.assert_close(hidden, eager, atol=1e-4, rtol=1e-4)
            # Both wrote the same KV, and the dead tokens wrote only the scratch block.
            torch.testing.assert_close(static_pool[:, :, :400], runner.kv_pool[:, :, :400])
            for t, _ in seqs:
                blocks.free(t)
    blocks.check_all_free()
    return graphs


def test_uniform_extends_on_the_static_path_give_the_eager_hidden_states_and_kv():
    # q 8 and 16 are past the block size (4): rows span blocks, padding rows wrap the scratch.
    model = tiny_llama(97, seed=5, layers=2)
    static_against_eager(model, capture=False, shapes=[(1, 2), (3, 3), (5, 8), (13, 4),
                                                       (16, 16)])


# Rows of different lengths: beams that stopped inside the chunk, or the small models'
# re-tokenization of the large model's text (a row of one token among longer ones too).
RAGGED = [(3, [2, 5, 3]), (5, [1, 8, 4, 7, 2]), (6, [9, 16, 1, 1, 12, 3]),
          (4, [27, 2, 5, 1])]


def test_ragged_extends_on_the_static_path_give_the_eager_hidden_states_and_kv():
    static_against_eager(tiny_llama(97, seed=5, layers=2), capture=False, shapes=RAGGED)


def test_ragged_extends_on_the_static_path_with_a_sliding_window_model():
    static_against_eager(tiny_llama(97, seed=6, layers=2, sliding_window=5), capture=False,
                         shapes=RAGGED)


@pytest.mark.parametrize("arch", list(TINY_CONFIGS))
def test_every_architecture_scores_on_the_static_path_as_it_does_eagerly(arch):
    static_against_eager(tiny_model(arch), capture=False, shapes=[(3, 5)])


def test_uniform_extends_on_the_static_path_with_a_sliding_window_model():
    model = tiny_llama(97, seed=6, layers=2, sliding_window=5)
    static_against_eager(model, capture=False, shapes=[(3, 8), (7, 3)])


def test_the_static_path_takes_extends_that_fit_and_leaves_the_rest_eager():
    runner = ModelRunner(tiny_llama(97, seed=5, layers=1), num_blocks=64, block_size=4)
    blocks = BlockManager(64, 4)
    graphs = ScoringGraphs(runner, max_tokens=64, max_q=8, max_batch=32, capture=False)
    t = [blocks.new_table() for _ in range(40)]

    def seqs(*lengths):
        return [(t[i], [1] * n) for i, n in enumerate(lengths)]
    # (rows bucket, tokens bucket, longest row rounded up to a power of two)
    assert graphs.shape(seqs(3, 3, 3)) == (4, 16, 4)
    assert graphs.shape(seqs(8, 8, 8, 8)) == (4, 32, 8)
    assert graphs.shape(seqs(3, 4)) == (2, 16, 4)          # ragged rows
    assert graphs.shape(seqs(1, 5, 2)) == (4, 16, 8)       # a row of one token among them
    assert graphs.shape(seqs(1, 1)) is None                # a decode: the decode graphs' work
    assert graphs.shape(seqs(9, 9)) is None                # past max_q
    assert graphs.shape(seqs(2, 9)) is None
    assert graphs.shape(seqs(*[2] * 32)) == (32, 64, 2)
    assert graphs.shape(seqs(*[3] * 24)) is None           # 72 tokens > 64
    assert graphs.shape(seqs(*[3] * 21, 1)) == (24, 64, 4)
    assert graphs.shape([]) is None
    few_rows = ScoringGraphs(runner, max_tokens=256, max_q=8, max_batch=16, capture=False)
    assert few_rows.shape(seqs(*[2] * 16)) == (16, 32, 2)
    assert few_rows.shape(seqs(*[2] * 17)) is None         # past max_batch rows
    assert token_buckets(2048) == [16, 32, 64, 128, 256, 512, 768, 1024, 1280, 1536, 1792,
                                   2048]
    # The cap stays within the query tile of q x (query heads per kv head) rows, so a chunk
    # short enough for the short-chunk kernel keeps it (64 rows): 7 heads a kv head, as in
    # Qwen2.5-0.5B, take q 9 as 9 (63 rows), not 16 (112).
    runner.shape = dataclasses.replace(runner.shape, num_heads=14, num_kv_heads=2)
    wide = ScoringGraphs(runner, max_tokens=256, max_q=64, max_batch=16, capture=False)
    assert [wide.q_cap(q) for q in (2, 3, 5, 9, 10, 19)] == [2, 4, 9, 9, 18, 36]
    assert all(wide.q_cap(q) * 7 <= GROUPED_EXTEND_ROWS
               for q in range(2, 10) if q * 7 <= GROUPED_EXTEND_ROWS)
    assert token_buckets(100) == [16, 32, 64, 100]


def test_a_scorer_captures_at_most_max_graphs_and_runs_later_shapes_on_the_static_buffers(
        monkeypatch, caplog):
    """Shapes come as traffic brings them; a long-running server must not keep capturing. Past
    max_graphs a new shape runs on the static buffers without a graph (said once), with the
    eager path's hidden states."""
    runner = ModelRunner(tiny_llama(97, seed=5, layers=1).to(DEVICE), num_blocks=200,
                         block_size=4)
    blocks = BlockManager(200, 4)
    graphs = ScoringGraphs(runner, max_tokens=256, max_q=32, max_batch=64, capture=True)
    graphs.max_graphs = 2
    captured = []       # (a capture here only records the shape: no CUDA on a CPU)
    monkeypatch.setattr(graphs, "_capture", lambda *shape: captured.append(shape))
    for n, q in [(1, 2), (3, 3), (5, 8), (13, 4), (2, 2)]:     # five shapes
        seqs = forked_streams(runner, blocks, n, q, seed=n)
        runner.scoring_graphs = graphs
        hidden, _ = runner.run(seqs)
        runner.scoring_graphs = None
        torch.testing.assert_close(hidden, runner.run(seqs)[0], atol=1e-4, rtol=1e-4)
        graphs.graphs.update({shape: None for shape in captured})   # as if captured
        for t, _ in seqs:
            blocks.free(t)
    assert captured == [(1, 16, 2), (4, 16, 4)]
    assert caplog.text.count("scoring graphs captured; new shapes run") == 1


@pytest.fixture(scope="module")
def models():
    return make_models()


def test_a_beam_search_scores_its_chunks_on_the_static_path_with_the_same_results(
        models, monkeypatch):
    eager, static = engine_pair(models, 0, max_batch=64)
    runners = [static.runners[r] for r in ("tuned", "untuned")]
    assert all(r.scoring_graphs is not None for r in runners)
    assert all(eager.runners[r].scoring_graphs is None for r in ("tuned", "untuned"))
    shapes = []
    for r in runners:
        run = r.scoring_graphs.run
        monkeypatch.setattr(r.scoring_graphs, "run", lambda seqs, shape, *rest, run=run:
                            shapes.append(shape) or run(seqs, shape, *rest))
    params = SearchParams.cbs(2, 3, 4, max_new_tokens=14, temperature=1.0, seed=5)
    want, got = same_results(eager, static, params)
    assert [r.reward for r in got] == pytest.approx([r.reward for r in want], abs=1e-5)
    # 3 prompts x 6 candidates, 4 new tokens each: padded to 24 rows, both models, each chunk.
    assert (24, 128, 4) in shapes
    static.check_all_free()


def test_every_models_prompt_chunks_take_the_static_path_with_the_eager_results(models,
                                                                              monkeypatch):
    """A prefill is an extend of long rows: eager, three models' modules are hundreds of
    launches a chunk, which leave a GPU idle. The large model's prompt chunks and the small
    models' take the extend graphs' static path (a graph per shape on a GPU), prompts chunked
    by max_batch_tokens, with the eager path's results."""
    eager, static = engine_pair(models, 0, max_batch=64)
    assert eager.runners["large"].scoring_graphs is None
    rows = {role: [] for role in static.runners}
    for role, r in static.runners.items():
        run = r.scoring_graphs.run
        monkeypatch.setattr(r.scoring_graphs, "run", lambda seqs, shape, *rest, run=run, role=role:
                            rows[role].append(max(len(ids) for _, ids in seqs))
                            or run(seqs, shape, *rest))
    for engine in (eager, static):
        engine.config.max_batch_tokens = 16       # every prompt in chunks of up to 16 tokens
    params = SearchParams.cbs(2, 2, 3, max_new_tokens=6, temperature=1.0, seed=3)
    want, got = same_results(eager, static, params)
    assert [r.reward for r in got] == pytest.approx([r.reward for r in want], abs=1e-5)
    # the large model runs only its prompts' chunks there (its decode has its own graphs)
    assert rows["large"] and max(rows["large"]) > 8
    assert all(max(rows[r]) > 8 for r in ("tuned", "untuned"))   # prompt chunks, not just L
    static.check_all_free()


def test_a_cross_vocabulary_search_scores_its_ragged_chunks_on_the_static_path(models,
                                                                               monkeypatch):
    """The small models re-tokenize the large model's text: a chunk of 4 large tokens is a
    varying number of small ones. Those forwards take the static path too (a CUDA graph per
    shape on a GPU), with the eager path's results."""
    eager, static = engine_pair(models, 1, max_batch=64)
    row_lengths = []
    for r in ("tuned", "untuned"):
        graphs = static.runners[r].scoring_graphs
        monkeypatch.setattr(graphs, "run", lambda seqs, shape, *rest, run=graphs.run:
                            row_lengths.append({len(ids) for _, ids in seqs})
                            or run(seqs, shape, *rest))
    params = SearchParams.cbs(2, 3, 4, max_new_tokens=16, temperature=1.0, seed=5)
    same_results(eager, static, params)
    assert any(len(lengths) > 1 for lengths in row_lengths), row_lengths
    static.check_all_free()


@pytest.mark.gpu
class TestScoringGraphsOnGPU:

    def test_replay_gives_the_eager_hidden_states_and_kv_for_each_shape(self):
        model = tiny_llama(97, seed=5, layers=2)
        graphs = static_against_eager(model, capture=True,
                                      shapes=[(1, 2), (3, 3), (5, 8), (13, 4), (16, 16)])
        assert len(graphs.graphs) == 5 and not graphs.failed

    def test_replay_of_ragged_rows_gives_the_eager_hidden_states_and_kv(self):
        graphs = static_against_eager(tiny_llama(97, seed=5, layers=2), capture=True,
                                      shapes=RAGGED)
        assert len(graphs.graphs) == 4 and not graphs.failed

    def test_replay_with_a_sliding_window_model(self):
        model = tiny_llama(97, seed=6, layers=2, sliding_window=5)
        graphs = static_against_eager(model, capture=True, shapes=[(3, 8), (7, 3)] + RAGGED)
        assert len(graphs.graphs) == 6 and not graphs.failed

    def test_a_whole_search_gives_the_same_tokens_with_scoring_graphs(self, models):
        eager, graphed = engine_pair(models, 0, max_batch=64)
        params = SearchParams.cbs(4, 4, 3, max_new_tokens=12, temperature=1.0, seed=11)
        same_results(eager, graphed, params, rewards=False)
        assert all(graphed.runners[r].scoring_graphs.graphs for r in ("tuned", "untuned"))


def test_warm_up_runs_a_prefill_decodes_and_a_scored_chunk_and_holds_nothing(models,
                                                                             monkeypatch):
    """What `w2s serve` runs on a GPU before it takes requests (the kernels' compiles and
    autotuning, a scoring graph shape): here on the static paths, run eagerly."""
    _, static = engine_pair(models, 0, max_batch=16)
    shapes = []
    run = static.runners["tuned"].scoring_graphs.run
    monkeypatch.setattr(static.runners["tuned"].scoring_graphs, "run",
                        lambda seqs, shape, *rest: shapes.append(shape) or run(seqs, shape, *rest))
    decodes = []
    decode = static.runners["large"].graphs.run
    monkeypatch.setattr(static.runners["large"].graphs, "run",
                        lambda seqs, *rest: decodes.append(len(seqs)) or decode(seqs, *rest))
    static.warm_up()
    assert (4, 16, 2) in shapes and decodes    # 4 candidates' chunks of 2 tokens, scored
    static.check_all_free()
    tok = models[0]
    alone = Engine((tiny_llama(len(tok), seed=1), tok), num_kv_blocks=100, block_size=4,
                   progress=False)
    alone.warm_up()                            # no scorer: plain sampling
    alone.check_all_free()


def test_a_model_naming_no_context_gets_tables_the_engine_counted_and_longer_rows_run_eager():
    """Without max_position_embeddings the static tables cover UNBOUNDED_CONTEXT_TOKENS (the
    engine's memory budget counts them before the pool exists; they were as wide as the whole
    pool), and a row whose table is wider runs eagerly, with the eager results."""
    from w2s_engine.models.scoring_graphs import UNBOUNDED_CONTEXT_TOKENS, context_blocks
    model = tiny_llama(97, seed=5, layers=1)
    runner = ModelRunner(model, num_blocks=40000, block_size=1)
    runner.shape = dataclasses.replace(runner.shape, max_positions=None)
    graphs = ScoringGraphs(runner, max_tokens=64, max_q=8, max_batch=4, capture=False)
    assert graphs.width == context_blocks(None, 1) == UNBOUNDED_CONTEXT_TOKENS
    counted = ScoringGraphs.static_bytes(64, 4, context_blocks(None, 1))
    assert 4 * (graphs.staging.numel() + graphs.tables.numel()) == counted
    narrow = ScoringGraphs(runner, max_tokens=64, max_q=8, max_batch=4, capture=False)
    narrow.width = 8          # (a small cap, so that a short row outgrows it here)
    blocks = BlockManager(40000, 1)
    short, long = blocks.new_table(), blocks.new_table()
    blocks.append(short, 4)
    blocks.append(long, 12)
    seqs = [(short, [3, 4, 5, 6]), (long, [7] * 12)]
    assert narrow.shape(seqs[:1]) is not None and narrow.shape(seqs) is None
    eager, _ = runner.run(seqs)
    runner.scoring_graphs = narrow
    again, _ = runner.run(seqs)       # (the static path declines it: the eager forward)
    torch.testing.assert_close(again, eager)
    for t, _ in seqs:
        blocks.free(t)
