"""The large model's decode on static buffers (models/decode_graphs.py): bucketing, padding,
one upload, and CUDA graph replay.

On CPU the padded static path runs eagerly (no graphs exist there) and must give the eager
path's logits and the same searches; the `gpu` tests capture the graphs and replay them.
"""

import random

import pytest
import torch

from tiny_models import clone, make_tokenizer, tiny_llama, tuned_from
from w2s_engine import Engine, SearchParams
from w2s_engine.cache.block_manager import BlockManager
from w2s_engine.kernels.cascade_attention import static_shared_prefixes
from w2s_engine.models.decode_graphs import DecodeGraphs, batch_buckets
from w2s_engine.models.runner import ModelRunner

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_buckets_cover_every_batch_up_to_the_maximum():
    assert batch_buckets(512)[:10] == [1, 2, 4, 8, 16, 24, 32, 48, 64, 96]
    assert batch_buckets(512)[-2:] == [480, 512]
    assert batch_buckets(40) == [1, 2, 4, 8, 16, 24, 32, 40]
    assert batch_buckets(1) == [1]
    for max_batch in (1, 7, 64, 100, 300):
        buckets = batch_buckets(max_batch)
        assert buckets == sorted(set(buckets)) and buckets[-1] == max_batch


def prompt_roots(runner, blocks, rng, count=3):
    """count prompts of ragged lengths (1 to 20 random tokens), forwarded: tables to fork."""
    vocab = runner.shape.vocab_size
    roots = []
    for _ in range(count):
        t = blocks.new_table()
        ids = [rng.randrange(vocab) for _ in range(rng.randint(1, 20))]
        blocks.append(t, len(ids))
        runner.run([(t, ids)])
        roots.append(t)
    return roots


def ragged_beams(runner, blocks, n, seed):
    """n beams forked from a few prompts at ragged lengths, each with one new token appended
    (copy-on-write done): what a decode step sees after selections."""
    rng = random.Random(seed)
    vocab = runner.shape.vocab_size
    roots = prompt_roots(runner, blocks, rng)
    beams = []
    for i in range(n):
        t = blocks.fork(roots[i % 3])
        extra = [rng.randrange(vocab) for _ in range(rng.randint(0, 6))]
        if extra:
            runner.copy_blocks(blocks.append(t, len(extra)))
            runner.run([(t, extra)])
        beams.append(t)
    for t in roots:
        blocks.free(t)
    copies = []
    for t in beams:
        copies += blocks.append(t, 1)
    runner.copy_blocks(copies)
    return [(t, rng.randrange(vocab)) for t in beams]


def static_against_eager(model, capture: bool, sizes, cascade: bool = False):
    """Logits of decode_logits on static buffers (graphs when capture; shared-prefix attention
    when cascade) against eager runs."""
    runner = ModelRunner(model.to(DEVICE), num_blocks=400, block_size=4)
    blocks = BlockManager(400, 4)
    graphs = DecodeGraphs(runner, max_batch=max(sizes), capture=capture, cascade=cascade)
    for n in sizes:
        seqs = ragged_beams(runner, blocks, n, seed=n)
        pool_before = runner.kv_pool.clone()
        runner.graphs = graphs
        logits, extra = runner.decode_logits(seqs, torch.arange(5 * n).numpy().astype("int32"))
        logits = logits.clone()
        assert extra.tolist() == list(range(5 * n))
        static_pool = runner.kv_pool.clone()
        runner.kv_pool.copy_(pool_before)
        runner.graphs = None
        eager, _ = runner.decode_logits(seqs)
        torch.testing.assert_close(logits, eager, atol=1e-4, rtol=1e-4)
        # Both wrote the same KV, and padding rows wrote only the scratch block.
        torch.testing.assert_close(static_pool[:, :, :400], runner.kv_pool[:, :, :400])
        for t, _ in seqs:
            blocks.free(t)
        blocks.check_all_free()


def test_static_padded_decode_gives_the_eager_logits_for_every_bucket():
    model = tiny_llama(97, seed=5, layers=2)
    static_against_eager(model, capture=False, sizes=[1, 2, 3, 5, 8, 13, 16])


def test_a_capture_that_fails_leaves_the_static_path_running_without_graphs(caplog):
    """A model whose decode cannot be captured (here: a CPU device, which has no graphs)
    still decodes, on the static buffers, and the engine says why graphs are off."""
    if DEVICE != "cpu":
        pytest.skip("the failing capture is a CPU one")
    model = tiny_llama(97, seed=5, layers=2)
    runner = ModelRunner(model, num_blocks=64, block_size=4)
    with caplog.at_level("ERROR"):
        graphs = DecodeGraphs(runner, max_batch=4, capture=True)
    assert graphs.graphs == {} and "CUDA" in graphs.capture_error
    assert "CUDA graph capture failed" in caplog.text
    static_against_eager(model, capture=True, sizes=[1, 3])


def test_static_padded_decode_works_with_a_sliding_window_model():
    model = tiny_llama(97, seed=6, layers=2, sliding_window=5)
    static_against_eager(model, capture=False, sizes=[3, 7])


@pytest.mark.parametrize("window", [None, 5])
def test_cascade_attention_on_the_static_path_gives_the_eager_logits(window):
    # ragged_beams forks 3 prompts: groups share their prompt's full blocks, loners have none.
    model = tiny_llama(97, seed=5, layers=2, sliding_window=window)
    static_against_eager(model, capture=False, sizes=[1, 2, 5, 13, 16], cascade=True)


@pytest.mark.parametrize("cascade", [False, True], ids=["per-beam", "cascade"])
def test_a_model_with_attention_sinks_decodes_on_the_static_path_like_eager(cascade):
    # GPT-OSS: sinks in every softmax, alternating windows of 5; the cascade merges its
    # prefix and suffix parts before the sink joins.
    from test_runner import tiny_model
    static_against_eager(tiny_model("gpt_oss"), capture=False, sizes=[1, 5, 13], cascade=cascade)


@pytest.mark.parametrize("cascade", [False, True], ids=["per-beam", "cascade"])
def test_the_capture_warmup_reads_long_rows_writes_only_scratch_and_leaves_decodes_exact(
        cascade):
    # The kernels are tuned on the warm-up's rows (TUNE_TOKENS long), not on length-1 padding.
    model = tiny_llama(97, seed=5, layers=2)
    runner = ModelRunner(model.to(DEVICE), num_blocks=400, block_size=4)
    blocks = BlockManager(400, 4)
    graphs = DecodeGraphs(runner, max_batch=32, capture=False, cascade=cascade)
    seqs = ragged_beams(runner, blocks, 13, seed=1)
    pool = runner.kv_pool.clone()
    runner.graphs = graphs
    for bucket in graphs.buckets:
        graphs._warmup_rows(bucket)
        assert int(graphs.staging[3 * bucket]) == min(1024, graphs.width * 4)
        graphs._forward(bucket)
        assert torch.isfinite(graphs.logits[:bucket]).all()
    # Only the scratch block was written; real decodes afterwards are the eager ones.
    torch.testing.assert_close(runner.kv_pool[:, :, :400], pool[:, :, :400])
    logits, _ = runner.decode_logits(seqs)
    logits = logits.clone()
    runner.kv_pool.copy_(pool)
    runner.graphs = None
    eager, _ = runner.decode_logits(seqs)
    torch.testing.assert_close(logits, eager, atol=1e-4, rtol=1e-4)


def make_models():
    """Two tokenizers, and a tuned/untuned small pair of the first's vocabulary."""
    tok, other = make_tokenizer(300), make_tokenizer(420)
    untuned = tiny_llama(len(tok), seed=2)
    return tok, other, tuned_from(untuned, seed=3, scale=0.3), untuned


@pytest.fixture(scope="module")
def models():
    return make_models()


def engine_pair(models, large_tok_index, max_batch, cascade=False, torch_compile=False):
    """The same models with and without the static decode path (and cascade attention, and
    torch.compile)."""
    tok, other, tuned, untuned = models
    large_tok = (tok, other)[large_tok_index]
    large = tiny_llama(len(large_tok), seed=1 + 3 * large_tok_index, layers=3)
    make = lambda graphs: Engine(  # noqa: E731
        (clone(large), large_tok), (clone(tuned), tok), (clone(untuned), tok),
        templates={"large": "Here is a movie review: {prompt}", "small": "Review: {prompt}"},
        num_kv_blocks=800, block_size=4, progress=False, device=DEVICE, dtype=torch.float32,
        cuda_graphs=graphs, cuda_graph_max_batch=max_batch,
        cascade_attention=graphs and cascade, torch_compile=graphs and torch_compile)
    return make(False), make(True)


PROMPTS = ["I really", "The plot of this film", "What a"]


def same_results(eager, other, params, prompts=PROMPTS, rewards=True):
    """Both engines search the prompts: the same hypotheses' tokens, and (rewards) the same
    rewards to 1e-5 (None where one has none)."""
    want, got = eager.search(prompts, params), other.search(prompts, params)
    for w, g in zip(want, got):
        assert [h.token_ids for h in g.hypotheses] == [h.token_ids for h in w.hypotheses]
        for hw, hg in zip(w.hypotheses, g.hypotheses) if rewards else ():
            assert hg.reward == pytest.approx(hw.reward, abs=1e-5) if hw.reward is not None \
                else hg.reward is None
    return want, got


@pytest.mark.parametrize("cascade", [False, True], ids=["per-beam", "cascade"])
@pytest.mark.parametrize("params", [
    SearchParams.cbs(2, 3, 4, max_new_tokens=14, temperature=1.0, seed=5),
    SearchParams.cbs(4, 4, 3, max_new_tokens=10, top_k=30, seed=7, stop=["e"]),
    SearchParams.best_of_n(5, max_new_tokens=9, seed=2),
    SearchParams.base(n=3, max_new_tokens=9, temperature=0.9, seed=3),
    SearchParams.eft(beta=1.5, max_new_tokens=10, seed=4),
], ids=["cbs", "cbs-16-beams", "best-of-n", "base", "eft"])
def test_a_search_on_the_static_path_gives_the_same_results(models, params, cascade):
    # max_batch 16: 3 prompts of CBS(4,4) are 48 beams, past it: those steps run eagerly.
    eager, static = engine_pair(models, 0, max_batch=16, cascade=cascade)
    same_results(eager, static, params)
    static.check_all_free()


def test_a_beam_search_with_cascade_attention_reads_shared_prefixes_and_gives_the_same_results(
        models, monkeypatch):
    import w2s_engine.models.decode_graphs as decode_graphs
    grouped = []
    find = decode_graphs.shared_prefix_words

    def spy(tables, lens, block_size, bucket, group, requests=None):
        words = find(tables, lens, block_size, bucket, group, requests)
        suffix_starts = static_shared_prefixes(torch.from_numpy(words), bucket, 1,
                                               group).suffix_starts
        grouped.append(int((suffix_starts[:len(lens)] > 0).sum()))   # rows with a prefix
        return words
    monkeypatch.setattr(decode_graphs, "shared_prefix_words", spy)
    eager, cascade = engine_pair(models, 0, max_batch=64, cascade=True)
    params = SearchParams.cbs(4, 4, 3, max_new_tokens=12, temperature=1.0, seed=11)
    want, got = same_results(eager, cascade, params)
    assert [r.reward for r in got] == pytest.approx([r.reward for r in want], abs=1e-5)
    assert grouped and max(grouped) == 48   # every beam of the 3 requests read a shared run
    cascade.check_all_free()


def test_eft_steps_the_small_models_on_their_static_path_with_the_same_results(models,
                                                                              monkeypatch):
    """EFT forwards one token per sample per step on both small models: with graphs on, a
    decode on their own static buffers (graph replays on a GPU), the LM head in it."""
    eager, static = engine_pair(models, 0, max_batch=16)
    runners = list(static.scorer.eft_stream.runners.values())
    assert all(r.graphs is not None for r in runners)
    calls = []
    for r in runners:
        run = r.graphs.run
        monkeypatch.setattr(r.graphs, "run", lambda seqs, extra=None, tokens_from=None,
                            requests=None, run=run:
                            calls.append(len(seqs)) or run(seqs, extra, tokens_from, requests))
    params = SearchParams.eft(beta=1.5, n=3, max_new_tokens=10, seed=4)
    same_results(eager, static, params, PROMPTS[:2])
    assert calls and max(calls) == 6      # both prompts' 3 samples in one decode per model
    static.check_all_free()


def test_a_cross_vocabulary_search_on_the_static_path_gives_the_same_results(models):
    eager, static = engine_pair(models, 1, max_batch=64)
    params = SearchParams.cbs(2, 2, 3, max_new_tokens=13, temperature=1.0, seed=9)
    want = eager.search(["I really", "This film"], params)
    got = static.search(["I really", "This film"], params)
    assert [r.text for r in got] == [r.text for r in want]
    assert [r.reward for r in got] == pytest.approx([r.reward for r in want], abs=1e-5)


def test_a_search_with_torch_compile_on_the_static_path_gives_the_same_results(models):
    """EngineConfig(torch_compile=...): every model's forward compiled (aot_eager here: the
    tracing and the attention op; the gpu test runs inductor under the graphs)."""
    torch._dynamo.reset()
    eager, compiled = engine_pair(models, 0, max_batch=16, torch_compile="aot_eager")
    params = SearchParams.cbs(2, 3, 4, max_new_tokens=14, temperature=1.0, seed=5)
    want, got = same_results(eager, compiled, params)
    assert [r.reward for r in got] == pytest.approx([r.reward for r in want], abs=1e-5)
    compiled.check_all_free()


@pytest.mark.gpu
class TestGraphsOnGPU:

    def test_replay_gives_the_eager_logits_for_every_bucket_after_forks_and_copy_on_write(self):
        model = tiny_llama(97, seed=5, layers=2)
        static_against_eager(model, capture=True, sizes=[1, 2, 3, 5, 8, 13, 16, 24, 40, 64])

    def test_replay_with_a_sliding_window_model(self):
        model = tiny_llama(97, seed=6, layers=2, sliding_window=5)
        static_against_eager(model, capture=True, sizes=[3, 7, 20])

    @pytest.mark.parametrize("cascade", [False, True], ids=["per-beam", "cascade"])
    def test_replay_with_attention_sinks(self, cascade):
        from test_runner import tiny_model
        static_against_eager(tiny_model("gpt_oss"), capture=True, sizes=[1, 5, 13, 24],
                             cascade=cascade)

    def test_replay_with_cascade_attention(self):
        model = tiny_llama(97, seed=5, layers=2)
        static_against_eager(model, capture=True, sizes=[1, 2, 3, 5, 8, 13, 16, 24, 40, 64],
                             cascade=True)

    def test_eft_on_the_small_models_graphs_gives_the_same_tokens(self, models):
        eager, graphed = engine_pair(models, 0, max_batch=64)
        assert all(r.graphs.graphs for r in graphed.scorer.eft_stream.runners.values())
        params = SearchParams.eft(beta=1.5, n=3, max_new_tokens=10, seed=4)
        same_results(eager, graphed, params, PROMPTS[:2], rewards=False)

    @staticmethod
    def same_beam_search(eager, graphed):
        assert graphed.runners["large"].graphs.graphs, "graphs were captured"
        params = SearchParams.cbs(4, 4, 3, max_new_tokens=12, temperature=1.0, seed=11)
        return same_results(eager, graphed, params, rewards=False)

    def test_a_search_with_torch_compile_under_the_graphs_gives_the_same_tokens(self, models):
        torch._dynamo.reset()
        self.same_beam_search(*engine_pair(models, 0, max_batch=64, torch_compile=True))

    @pytest.mark.parametrize("cascade", [False, True], ids=["per-beam", "cascade"])
    def test_a_whole_search_gives_the_same_tokens_with_and_without_graphs(self, models, cascade):
        self.same_beam_search(*engine_pair(models, 0, max_batch=64, cascade=cascade))
