"""The engine embedded in a host program: what a host sees of it besides its answers.

No threads it did not ask for; bad arguments refused at the call (search_stream too, before
its generator is handed on) and never replaced by the defaults; errors that say what to
change (several prompts where one goes, a half-read stream holding the engine, a second
AsyncEngine); AsyncEngine taking the defaults as Engine does; and an AsyncEngine whose loop
thread ended by a BaseException refusing its searches rather than leaving them awaited
forever."""

import asyncio
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from tqdm.auto import tqdm

from test_server import tiny_engine
from w2s_engine import SearchParams
from w2s_engine.one_thread import EngineBusy
from w2s_engine.search.request import FailedBy, RequestStatus
from w2s_engine.serve.async_engine import AsyncEngine, SearchFailed

PARAMS = SearchParams.cbs(2, 2, 3, max_new_tokens=6, seed=3)


@pytest.fixture(scope="module")
def engine():
    return tiny_engine(num_kv_blocks=400)


def tqdm_monitors():
    return [t for t in threading.enumerate() if t.name == "tqdm_monitor" and t.is_alive()]


def test_search_with_progress_off_starts_no_tqdm_monitor_thread(engine):
    # tqdm starts its monitor thread for any bar, a disabled one too: with progress=False the
    # engine makes none.
    for monitor in tqdm_monitors():   # earlier tests' bars, of any tqdm class
        monitor.exit()
    tqdm.monitor = None
    assert not tqdm_monitors()
    engine.search(["I really", "This film"], PARAMS)
    assert not tqdm_monitors()


def test_search_stream_of_a_list_of_texts_says_it_takes_one_prompt(engine):
    with pytest.raises(TypeError, match=r"a list of texts is several prompts.*Engine\.search"):
        engine.search_stream(["I really", "This film"], PARAMS)
    with pytest.raises(TypeError, match="a list of texts is several prompts"):
        engine.score([["I really", "This film"]], [" liked it"])
    engine.check_all_free()


def test_async_engine_search_and_stream_take_default_params_when_none(engine):
    async def run(async_engine):
        result = await async_engine.search("I really")
        deltas = [d async for d in async_engine.stream("I really", None)]
        return result, deltas

    async_engine = AsyncEngine(engine)
    try:
        result, deltas = asyncio.run(run(async_engine))
    finally:
        async_engine.shutdown()
    assert result.text is not None and deltas[-1].result is not None
    engine.check_all_free()


def test_a_second_async_engine_is_refused_naming_the_first(engine):
    first = AsyncEngine(engine)
    try:
        with pytest.raises(EngineBusy, match="another AsyncEngine.*shutdown"):
            AsyncEngine(engine)
    finally:
        first.shutdown()
    AsyncEngine(engine).shutdown()    # once the first is shut down, fine


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_async_engine_loop_ended_by_a_base_exception_fails_searches_instead_of_hanging(engine):
    def interrupted():
        raise KeyboardInterrupt   # as a hook raising SystemExit would, on the loop thread

    async def run(async_engine):
        with pytest.raises(SearchFailed):
            await asyncio.wait_for(async_engine.search("I really", PARAMS), 10)
        with pytest.raises(SearchFailed):   # and later searches are refused, not queued
            await asyncio.wait_for(async_engine.search("I really", PARAMS), 10)

    engine.step = interrupted
    async_engine = AsyncEngine(engine)
    try:
        asyncio.run(run(async_engine))
    finally:
        del engine.step          # the class's again
        async_engine.shutdown()
    engine.check_all_free()
    assert engine.search("I really", PARAMS)[0].text is not None   # the caller's again


def test_another_thread_blocked_by_a_half_read_stream_is_told_to_close_it(engine):
    stream = engine.search_stream("I really", SearchParams(max_new_tokens=40, seed=1))
    next(stream)
    refused = []

    def other():
        try:
            engine.search("This film", PARAMS)
        except EngineBusy as e:
            refused.append(str(e))

    thread = threading.Thread(target=other)
    thread.start()
    thread.join()
    stream.close()
    assert refused and "exhausted or closed" in refused[0]
    engine.check_all_free()
    engine.search("This film", PARAMS)   # any thread's once it is closed


@pytest.mark.parametrize("params", [{}, 0, "", []])
def test_falsy_params_of_a_wrong_type_are_refused_not_replaced_by_the_defaults(engine, params):
    with pytest.raises(TypeError, match="params: expected a SearchParams"):
        engine.search("I really", params)
    with pytest.raises(TypeError, match="params: expected a SearchParams"):
        engine.search_stream("I really", params)
    async_engine = AsyncEngine(engine)
    try:
        with pytest.raises(TypeError, match="params: expected a SearchParams"):
            asyncio.run(async_engine.search("I really", params))
    finally:
        async_engine.shutdown()
    engine.check_all_free()


def test_search_stream_refuses_bad_arguments_at_the_call_not_at_the_first_delta(engine):
    with pytest.raises(ValueError, match="SearchParams.w=0"):
        engine.search_stream("I really", SearchParams(w=0))
    with pytest.raises(ValueError, match="logprobs"):
        engine.search_stream("I really", PARAMS, logprobs=-1)
    stream = engine.search_stream("I really", PARAMS)    # nothing runs until asked
    assert not engine.has_unfinished()
    assert list(stream)[-1].result.text == engine.search("I really", PARAMS)[0].text
    engine.check_all_free()


def test_an_embedded_async_engine_after_shutdown_says_the_engine_shut_down_not_a_server(engine):
    # (it said "the server is shutting down" to a program with no server)
    async_engine = AsyncEngine(engine)
    async_engine.shutdown()
    with pytest.raises(SearchFailed, match="the engine is shutting down") as e:
        asyncio.run(async_engine.search("I really", SearchParams.base(max_new_tokens=2)))
    assert e.value.by is FailedBy.SHUTDOWN     # which the server answers 503 for


def test_async_engine_score_runs_on_its_thread_and_says_what_to_change_or_that_it_shut_down(
        engine):
    async def run(async_engine):
        rewards = await async_engine.score(["I really"] * 2, [" a dog", " a cat"])
        with pytest.raises(ValueError, match="2 prompts but 1 responses"):
            await async_engine.score(["I really"] * 2, [" a dog"])
        return rewards

    with AsyncEngine(engine) as async_engine:
        rewards = asyncio.run(run(async_engine))
    assert rewards == pytest.approx(engine.score(["I really"] * 2, [" a dog", " a cat"]),
                                    abs=1e-5)
    with pytest.raises(SearchFailed, match="the engine is shutting down"):
        asyncio.run(async_engine.score(["I really"], [" a dog"]))
    engine.check_all_free()


def test_a_big_async_score_runs_in_slices_between_the_steps_of_the_searches_in_flight(
        engine, monkeypatch):
    """A score() of many pairs holds up the searches in flight one slice at a time, gives the
    rewards of the whole call, and names a bad pair by its place in the whole call."""
    from w2s_engine.serve import async_engine as module
    calls = []
    score, step = engine.score, engine.step
    monkeypatch.setattr(engine, "score", lambda *a, **k: calls.append(("score", len(a[0])))
                        or score(*a, **k))
    monkeypatch.setattr(engine, "step", lambda: calls.append(("step",)) or step())
    n = 2 * module.SCORE_SLICE_PAIRS + 3
    responses = [f" response number {i}" for i in range(n)]

    async def run(async_engine):
        search = asyncio.ensure_future(async_engine.search(
            "I really", SearchParams.base(max_new_tokens=40, seed=1, ignore_eos=True)))
        while not any(c[0] == "step" for c in calls):
            await asyncio.sleep(0.01)
        rewards = await async_engine.score(["I really"] * n, responses)
        bad = responses[:-1] + [[10**6]]
        with pytest.raises(ValueError, match=rf"responses\[{n - 1}\]: token id 1000000"):
            await async_engine.score(["I really"] * n, bad)
        await search
        return rewards

    with AsyncEngine(engine) as async_engine:
        rewards = asyncio.run(run(async_engine))
    at = [i for i, c in enumerate(calls) if c[0] == "score"]
    assert [calls[i][1] for i in at[:3]] == [module.SCORE_SLICE_PAIRS] * 2 + [3]
    assert ("step",) in calls[at[0]:at[1]] and ("step",) in calls[at[1]:at[2]], \
        "the search steps between the slices"
    monkeypatch.undo()
    assert rewards == pytest.approx(engine.score(["I really"] * n, responses), abs=1e-5)
    engine.check_all_free()


def test_a_score_slice_of_long_responses_holds_about_one_prefill_chunk_of_text():
    """Slices of long responses are cut by their text too, as a long prompt's prefill is cut
    into chunks: about max_batch_tokens tokens of new text at a time, one pair at least."""
    engine = tiny_engine(num_kv_blocks=400, max_batch_tokens=64)    # ~256 characters a slice
    sizes = []
    score = engine.score
    engine.score = lambda *a, **k: sizes.append(len(a[0])) or score(*a, **k)
    responses = [" " + "a b c d e " * 10] * 6 + [" short"] * 8     # 101 characters, then 6
    with AsyncEngine(engine) as async_engine:
        rewards = asyncio.run(async_engine.score(["I really"] * len(responses), responses))
    # 8 + 101 + 101 (the prompt counted once, with the first pair), 101 + 101, 101 + 101 + 8 x 6
    assert sizes == [2, 2, 10]
    engine.score = score       # (to rounding: the slices read the prompt from the cache)
    assert rewards == pytest.approx(engine.score(["I really"] * len(responses), responses),
                                    abs=1e-4)
    engine.check_all_free()


def test_an_async_score_that_needs_the_blocks_a_search_holds_waits_for_them_not_fails():
    """A response that fits the scorer's pool but not beside a running search's blocks: the
    synchronous score() says so (NoRoomYet), AsyncEngine.score waits until the search gives
    them back and then scores it; one past the whole pool is refused at once."""
    from w2s_engine.search.scorer import NoRoomYet
    engine = tiny_engine(num_kv_blocks=100)      # 400 tokens a pool; the context is 512
    long = " x" * 175                            # 357 tokens for the scorer, with the prompt
    # A search whose long prompt holds most of each small model's pool while it runs.
    hog = SearchParams.cbs(1, 2, 4, max_new_tokens=40, seed=1, ignore_eos=True)
    hog_prompt = "I really" + " y" * 150
    req = engine.add_request(hog_prompt, hog)
    while req.status.name != "RUNNING":
        engine.step()
    with pytest.raises(NoRoomYet, match=r"responses\[0\]: 357 tokens .* holds 400 in all"):
        engine.score(["I really"], [long])
    engine.cancel(req)
    engine.step()
    refused = []
    score = engine.score

    def counting(*args, **kwargs):
        try:
            return score(*args, **kwargs)
        except NoRoomYet:
            refused.append(1)
            raise
    engine.score = counting
    step = engine.step
    engine.step = lambda: time.sleep(0.02) or step()   # the search outlasts the wait below

    async def run(async_engine):
        handle = await async_engine.submit(hog_prompt, hog)
        while handle.request.status is not RequestStatus.RUNNING:
            await asyncio.sleep(0.01)
        scoring = asyncio.ensure_future(async_engine.score(["I really"], [long]))
        await asyncio.sleep(0.5)
        assert refused and not scoring.done(), "it waits while the search holds the blocks"
        handle.cancel()                 # the search's blocks come back
        (reward,) = await scoring
        with pytest.raises(ValueError, match="holds 400 in all"):
            await async_engine.score(["I really"], [" x" * 250])   # past the pool: at once
        return reward

    with AsyncEngine(engine) as async_engine:
        reward = asyncio.run(run(async_engine))
    engine.score, engine.step = score, step
    assert reward == pytest.approx(engine.score(["I really"], [long])[0], abs=1e-4)
    engine.check_all_free()


def test_a_score_whose_prompt_needs_the_blocks_a_search_holds_waits_and_one_past_the_pool_is_refused():
    """As a long response does (the test above), a long prompt that fits the scorer's pool but
    not beside a running search's blocks is NoRoomYet (AsyncEngine.score waits for it), and one
    past the whole pool a ValueError naming it: not the block manager's OutOfBlocks, which the
    server answers as an engine error."""
    from w2s_engine.search.scorer import NoRoomYet
    engine = tiny_engine(num_kv_blocks=100)      # 400 tokens a pool; the context is 512
    hog = SearchParams.cbs(1, 2, 4, max_new_tokens=40, seed=1, ignore_eos=True)
    req = engine.add_request("I really" + " y" * 150, hog)
    while req.status.name != "RUNNING":
        engine.step()
    with pytest.raises(NoRoomYet, match=r"responses\[0\]: .* tokens for the scorer"):
        engine.score(["I really" + " x" * 175], [" ok"])
    engine.cancel(req)
    engine.step()
    engine.check_all_free()
    with pytest.raises(ValueError, match=r"responses\[0\]: .* holds 400 in all") as e:
        engine.score(["I really" + " x" * 240], [" ok"])
    assert not isinstance(e.value, NoRoomYet)
    engine.check_all_free()
    assert engine.score(["I really" + " x" * 175], [" ok"])    # alone, it fits


def test_dir_of_the_package_lists_its_lazily_imported_names():
    import w2s_engine
    assert {"Engine", "SearchError", "OpenAICompletions", "SearchParams"} <= set(dir(w2s_engine))


def test_async_engine_as_a_context_manager_shuts_down_and_gives_the_engine_back(engine):
    async def run():
        async with AsyncEngine(engine) as async_engine:
            result = await async_engine.search("I really", SearchParams.base(max_new_tokens=3))
        return async_engine, result

    async_engine, result = asyncio.run(run())
    assert result.text is not None and not async_engine._thread.is_alive()
    with AsyncEngine(engine) as again:     # the engine is free for the next one
        assert asyncio.run(again.search("I really", SearchParams.base(max_new_tokens=2)))
    assert not again._thread.is_alive()
    engine.search(["I really"], SearchParams.base(max_new_tokens=2))   # and for plain use
    engine.check_all_free()


def test_an_engine_told_to_freeze_what_it_loaded_out_of_full_collections(tmp_path):
    # A full collection walked the ~400k loaded objects every few seconds of searching (0.2 s
    # a stall on a 2-core CPU); frozen, none of them is walked. And the process still exits
    # without triton's bindings' "leaked function" lines (the freeze is undone at exit).
    script = tmp_path / "freeze.py"
    script.write_text(
        "import gc, sys\n"
        "sys.path.insert(0, %r)\n"
        "from test_server import tiny_engine\n"
        "before = gc.get_freeze_count()\n"
        "tiny_engine(**({'freeze_gc': True} if sys.argv[1] == 'on' else {}))\n"
        "print(before, gc.get_freeze_count())\n" % str(Path(__file__).parent))
    for setting in ("on", "off"):
        out = subprocess.run([sys.executable, str(script), setting], capture_output=True,
                             text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        before, after = map(int, out.stdout.split()[-2:])
        assert (after > 100_000) if setting == "on" else (after == before == 0)   # default
        assert "leaked" not in out.stderr
