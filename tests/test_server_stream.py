"""Streaming over HTTP (issue 18): server-sent events in OpenAI's chunk format for every method,
driven by the stock openai client (sync and async) and by raw HTTP, and AsyncEngine.stream for
embedding. The streamed text equals the text the same request gets whole (same seed)."""

import asyncio
import http.client
import json
import socket
import threading
import time

import pytest

from live_server import LiveServer
from test_server import tiny_engine
from w2s_engine import SearchParams
from w2s_engine.serve.async_engine import AsyncEngine, SearchFailed

METHODS = [("cbs", {"w": 2, "k": 2, "l": 3}), ("cbs-n2", {"w": 2, "k": 2, "l": 3, "n": 2}),
           ("best_of_n", {"k": 3}), ("best_of-n2", {"best_of": 4, "n": 2}),
           ("base", {}), ("base-n3", {"n": 3}), ("eft", {"beta": 1.0})]
IDS = [m for m, _ in METHODS]


def body_of(name: str, extra: dict) -> dict:
    method = name.split("-")[0]
    return {"max_tokens": 9, "seed": 4, "top_k": 40, **extra,
            **({"method": method} if method != "best_of" else {})}


@pytest.fixture(scope="module")
def server():
    live = LiveServer(tiny_engine())
    yield live
    live.stop()


def sse(port: int, path: str, body: dict, headers=None):
    """POST and read the event stream: (status, headers, [parsed events], raw lines)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json",
                                                  **(headers or {})})
    r = conn.getresponse()
    raw = r.read().decode()
    conn.close()
    lines = [ln for ln in raw.split("\n") if ln]
    events = [ln[len("data: "):] for ln in lines]
    return r.status, dict(r.headers), events, lines


def joined(chunks, chat: bool) -> dict[int, str]:
    texts = {}
    for c in chunks:
        for choice in c.choices:
            piece = (choice.delta.content or "") if chat else choice.text
            texts[choice.index] = texts.get(choice.index, "") + piece
    return texts


@pytest.mark.parametrize("name, extra", METHODS, ids=IDS)
def test_streamed_completions_equal_the_whole_answer_for_every_method(server, name, extra):
    body = body_of(name, extra)
    n = body.pop("n", 1)
    kw = dict(model="tiny", prompt="I really", n=n, extra_body=body)
    whole = server.client.completions.create(**kw)
    chunks = list(server.client.completions.create(   # (OpenAI's obfuscation: none added)
        **kw, stream=True, stream_options={"include_usage": True,
                                           "include_obfuscation": False}))
    assert joined(chunks, chat=False) == {c.index: c.text for c in whole.choices}
    *content, usage = chunks
    assert usage.choices == [] and usage.usage == whole.usage
    assert all(c.usage is None for c in content)
    # finish_reason in the last content chunk of each choice, and nowhere else
    for c in whole.choices:
        mine = [ch.choices[0] for ch in content if ch.choices[0].index == c.index]
        assert mine[-1].finish_reason == c.finish_reason
        assert all(x.finish_reason is None for x in mine[:-1])
    assert all(ch.object == "text_completion" and ch.model == "tiny" for ch in content)


@pytest.mark.parametrize("name, extra", METHODS, ids=IDS)
def test_streamed_chat_sends_the_role_first_then_content_equal_to_the_whole_answer(server, name,
                                                                                    extra):
    body = body_of(name, extra)
    body.pop("best_of", None)
    n = body.pop("n", 1)
    if name == "best_of-n2":
        body.update(method="best_of_n", k=4)
    kw = dict(model="tiny", messages=[{"role": "user", "content": "Write a review."}], n=n,
              extra_body=body)
    whole = server.client.chat.completions.create(**kw)
    chunks = list(server.client.chat.completions.create(**kw, stream=True))
    assert joined(chunks, chat=True) == {c.index: c.message.content for c in whole.choices}
    for c in whole.choices:
        mine = [ch.choices[0] for ch in chunks if ch.choices[0].index == c.index]
        assert mine[0].delta.role == "assistant" and not mine[0].delta.content
        assert mine[-1].finish_reason == c.finish_reason
        assert all(x.finish_reason is None for x in mine[:-1])
    assert {ch.object for ch in chunks} == {"chat.completion.chunk"}
    assert len({ch.id for ch in chunks}) == 1


def test_the_async_client_streams_several_requests_at_once(server):
    async def run():
        client = server.async_client()
        prompts = ["I really", "This film", "The plot"]

        async def one(p):
            stream = await client.completions.create(
                model="tiny", prompt=p, max_tokens=8, seed=2, stream=True,
                extra_body={"w": 2, "k": 2, "l": 2})
            return "".join([c.choices[0].text async for c in stream])
        streamed = await asyncio.gather(*(one(p) for p in prompts))
        whole = [(await client.completions.create(
            model="tiny", prompt=p, max_tokens=8, seed=2,
            extra_body={"w": 2, "k": 2, "l": 2})).choices[0].text for p in prompts]
        await client.close()
        return streamed, whole
    streamed, whole = asyncio.run(run())
    assert streamed == whole


def test_raw_http_events_end_with_done_and_a_cbs_stream_sends_text_before_it_ends(server):
    # Greedy candidates agree, so their common prefix is final as they sample.
    body = {"prompt": "I really", "max_tokens": 12, "temperature": 0, "ignore_eos": True,
            "w": 2, "k": 2, "l": 3, "stream": True}
    status, headers, events, lines = sse(server.port, "/v1/completions", body,
                                         {"X-Request-Id": "stream-1"})
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    assert headers["x-request-id"] == "stream-1"
    assert all(ln.startswith("data: ") for ln in lines) and events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["id"] == "cmpl-stream-1" for c in chunks)
    early = [c for c in chunks if c["choices"][0]["finish_reason"] is None and
             c["choices"][0]["text"]]
    assert len(early) >= 3, "text arrived only at the end"
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert isinstance(chunks[-1]["w2s"]["reward"], float)


def test_echo_streams_the_prompt_first(server):
    chunks = list(server.client.completions.create(
        model="tiny", prompt="I really", max_tokens=5, seed=1, echo=True, stream=True,
        extra_body={"method": "base"}))
    assert chunks[0].choices[0].text == "I really"
    whole = server.client.completions.create(model="tiny", prompt="I really", max_tokens=5,
                                             seed=1, echo=True, extra_body={"method": "base"})
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text


def test_a_client_that_disconnects_mid_stream_cancels_its_search_and_frees_every_block(server):
    before = server.metrics()
    body = json.dumps({"prompt": "A very long review", "max_tokens": 400, "method": "base",
                       "ignore_eos": True, "seed": 3, "stream": True}).encode()
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                  b"Content-Type: application/json\r\n"
                  + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        got = b""
        while got.count(b"data: ") < 3:   # the search is streaming now; then the client leaves
            got += s.recv(65536)
    deadline = time.time() + 30
    while time.time() < deadline:
        m = server.metrics()
        if m["w2s_requests_cancelled_total"] > before["w2s_requests_cancelled_total"] and \
                m["w2s_requests_running"] == 0:
            break
        time.sleep(0.1)
    assert m["w2s_requests_cancelled_total"] == before["w2s_requests_cancelled_total"] + 1
    assert m["w2s_requests_finished_total"] == before["w2s_requests_finished_total"]
    assert m['w2s_kv_blocks_used{model="large"}'] == 0 and m["w2s_requests_in_flight"] == 0
    server.async_engine.engine.check_all_free()


def test_a_search_that_fails_mid_stream_ends_with_an_error_event_and_counts_as_failed(
        server, monkeypatch):
    from test_validation import poison
    poison(monkeypatch, server.async_engine.engine.scorer, "plan", RuntimeError("no score"))
    before = server.metrics()
    status, _, events, _ = sse(server.port, "/v1/completions",
                               {"prompt": "POISON", "max_tokens": 6, "stream": True})
    assert status == 200 and events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == 500 and "no score" in error["message"]
    after = server.metrics()
    assert after["w2s_requests_failed_total"] == before["w2s_requests_failed_total"] + 1
    server.async_engine.engine.check_all_free()


def settle_and_check_all_free(engine, seconds: float = 10):
    """The engine loop ends what was cancelled within a step or two; then every block is back."""
    deadline = time.time() + seconds
    while engine.has_unfinished() and time.time() < deadline:
        time.sleep(0.05)
    engine.check_all_free()


def test_async_engine_stream_for_embedding_yields_deltas_and_cancels_when_left_early():
    engine = tiny_engine(num_kv_blocks=400)
    async_engine = AsyncEngine(engine)
    params = SearchParams.cbs(2, 2, 3, max_new_tokens=10, seed=5)
    try:
        async def run():
            deltas = [d async for d in async_engine.stream("I really", params)]
            result = await async_engine.search("I really", params)
            early = async_engine.stream("I really", SearchParams.base(
                max_new_tokens=300, seed=1, ignore_eos=True))
            first = await anext(d async for d in early if d.text)
            await early.aclose()
            with pytest.raises(ValueError, match="w"):
                await async_engine.search("I really", params.copy(w=0))
            return deltas, result, first
        deltas, result, first = asyncio.run(run())
        assert "".join(d.text for d in deltas) == result.text == deltas[-1].result.text
        assert first.text and first.result is None
        settle_and_check_all_free(engine)
    finally:
        async_engine.shutdown()


def test_searches_in_flight_or_queued_at_shutdown_fail_and_give_back_every_block(monkeypatch):
    engine = tiny_engine(num_kv_blocks=400)
    async_engine = AsyncEngine(engine)
    real = engine.make_request

    def slow(prompt, *args, **kwargs):   # a long prompt still being tokenized at shutdown
        if prompt == "slow":
            time.sleep(0.5)
        return real(prompt, *args, **kwargs)
    monkeypatch.setattr(engine, "make_request", slow)

    async def run():
        stream = async_engine.stream("I really", SearchParams.base(max_new_tokens=400, seed=1,
                                                                   ignore_eos=True))
        await anext(stream)
        running = asyncio.create_task(async_engine.search("What a", SearchParams.cbs(
            2, 2, 3, max_new_tokens=300, seed=2, ignore_eos=True)))
        preparing = asyncio.create_task(async_engine.search("slow", SearchParams()))
        await asyncio.sleep(0.2)
        await asyncio.get_running_loop().run_in_executor(None, async_engine.shutdown)
        with pytest.raises(SearchFailed, match="shutting down"):
            async for _ in stream:
                pass
        for task in (running, preparing):
            with pytest.raises(SearchFailed, match="shutting down"):
                await task
        with pytest.raises(SearchFailed, match="shutting down"):   # and after it
            await async_engine.search("I really", SearchParams())
    asyncio.run(asyncio.wait_for(run(), 60))
    # The engine is clean to reuse: nothing left running, every block back.
    assert not engine.has_unfinished()
    engine.check_all_free()


@pytest.mark.parametrize("name, extra", [METHODS[1], METHODS[5]], ids=[IDS[1], IDS[5]])
def test_several_prompts_in_one_request_answer_as_each_alone_indexed_prompt_major(server, name,
                                                                                  extra):
    # OpenAI's list of prompts: prompt i's choices are i * n ... i * n + n - 1.
    body = body_of(name, extra)
    n = body.pop("n", 1)
    prompts = ["I really", "This film", "What a"]
    alone = [server.client.completions.create(model="tiny", prompt=p, n=n, extra_body=body)
             for p in prompts]
    kw = dict(model="tiny", prompt=prompts, n=n, extra_body=body)
    whole = server.client.completions.create(**kw)
    assert [c.index for c in whole.choices] == list(range(len(prompts) * n))
    assert [c.text for c in whole.choices] == [c.text for a in alone for c in a.choices]
    assert whole.usage.total_tokens == sum(a.usage.total_tokens for a in alone)
    assert [w["reward"] for w in whole.model_extra["w2s"]] == pytest.approx(
        [a.model_extra["w2s"]["reward"] for a in alone], abs=1e-5)
    chunks = list(server.client.completions.create(   # (OpenAI's obfuscation: none added)
        **kw, stream=True, stream_options={"include_usage": True,
                                           "include_obfuscation": False}))
    assert joined(chunks, chat=False) == {c.index: c.text for c in whole.choices}
    usage = [c for c in chunks if c.usage is not None]
    assert len(usage) == 1 and chunks[-1] is usage[0] and usage[0].usage == whole.usage
    server.async_engine.engine.check_all_free()


def test_a_refused_prompt_among_several_starts_none_of_them(server):
    engine = server.async_engine.engine
    before = engine.stats()["requests"]
    too_long = " a" * (engine.max_prompt_tokens + 10)   # past the context, within the chars
    code, _, _, lines = sse(server.port, "/v1/completions", {
        "prompt": ["I really", too_long], "max_tokens": 4, "stream": True})
    payload = json.loads(lines[0])   # an error before the stream starts: plain JSON
    assert code == 400 and payload["error"]["param"] == "prompt.1", payload
    assert "context" in payload["error"]["message"]
    time.sleep(0.5)   # the first prompt's search, cancelled, leaves the loop
    assert engine.stats()["requests"] <= before + 1
    engine.check_all_free()
    ok = server.client.completions.create(model="tiny", prompt=["I really"], max_tokens=3,
                                          extra_body={"ignore_eos": True})   # (no seed: EOS
    assert ok.choices[0].finish_reason == "length"               # could end it first)


@pytest.mark.parametrize("name, extra", [METHODS[1], METHODS[5], METHODS[6]],
                         ids=[IDS[1], IDS[5], IDS[6]])
def test_streamed_logprobs_concatenate_to_the_whole_answers(server, name, extra):
    body = {**body_of(name, extra), "ignore_eos": True}
    n = body.pop("n", 1)
    kw = dict(model="tiny", prompt="I really", n=n, logprobs=2, extra_body=body)
    whole = server.client.completions.create(**kw)
    chunks = list(server.client.completions.create(**kw, stream=True))
    tokens = {}
    for c in chunks:
        for choice in c.choices:
            if choice.logprobs is not None:
                tokens.setdefault(choice.index, []).extend(
                    zip(choice.logprobs.tokens, choice.logprobs.token_logprobs))
    assert tokens == {c.index: list(zip(c.logprobs.tokens, c.logprobs.token_logprobs))
                      for c in whole.choices}
    kw = dict(model="tiny", messages=[{"role": "user", "content": "Write a review."}], n=n,
              logprobs=True, top_logprobs=2, extra_body=body)
    whole = server.client.chat.completions.create(**kw)
    content = {}
    for c in server.client.chat.completions.create(**kw, stream=True):
        for choice in c.choices:
            if choice.logprobs is not None:
                content.setdefault(choice.index, []).extend(
                    (t.token, t.logprob) for t in choice.logprobs.content)
    assert content == {c.index: [(t.token, t.logprob) for t in c.logprobs.content]
                       for c in whole.choices}
    assert all(len(v) == 9 for v in content.values())   # max_tokens, EOS ignored


def test_a_refused_submit_cancelled_by_its_caller_never_takes_the_next_search_s_handle(
        monkeypatch):
    # A's add is refused (QueueFull) and its caller gives up (a timeout): its cancel arrives
    # after B was queued. A refused request takes no search id, so the cancel cannot end the
    # wait of B's caller, whose search runs on.
    from w2s_engine.scheduler import QueueFull
    engine = tiny_engine(num_kv_blocks=100, max_waiting=0)
    small = SearchParams.base(max_new_tokens=5, seed=3)
    expected = engine.search(["What a"], small)[0].text
    async_engine = AsyncEngine(engine)
    gate, in_step = threading.Event(), threading.Event()
    real_step = engine.step

    def held_step():      # the loop thread waits here while the three commands queue up
        in_step.set()
        gate.wait()
        return real_step()
    monkeypatch.setattr(engine, "step", held_step)
    made = {}
    try:
        async def run():
            hog = async_engine.stream("I really", SearchParams.base(
                n=4, max_new_tokens=60, seed=1, ignore_eos=True))
            gate.set()
            await anext(hog)               # holds most of the pool's reservations
            gate.clear()
            in_step.clear()
            await asyncio.get_running_loop().run_in_executor(None, in_step.wait)
            big = SearchParams.base(n=8, max_new_tokens=40, seed=2, ignore_eos=True)
            a = asyncio.create_task(async_engine.search(
                "This film", big, prepare=lambda r: made.setdefault("A", r)))
            while "A" not in made:         # seen once its add is in the inbox
                await asyncio.sleep(0.01)
            b = asyncio.create_task(async_engine.search(
                "What a", small, prepare=lambda r: made.setdefault("B", r)))
            while "B" not in made:
                await asyncio.sleep(0.01)
            a.cancel()                     # A's caller leaves: its cancel follows B's add
            await asyncio.sleep(0.05)
            gate.set()
            with pytest.raises((asyncio.CancelledError, QueueFull)):
                await a
            result = await asyncio.wait_for(b, 30)
            await hog.aclose()
            return result
        result = asyncio.run(asyncio.wait_for(run(), 60))
        assert made["A"].request_id == -1 and made["B"].request_id != -1
        assert result.text == expected
        settle_and_check_all_free(engine)
    finally:
        gate.set()
        async_engine.shutdown()
