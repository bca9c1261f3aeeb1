"""The OpenAI-compatible server: a live uvicorn on 127.0.0.1 driven by the stock openai client."""

import json
import socket
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from live_server import LiveServer
from tiny_models import clone, make_tokenizer, tiny_llama, tuned_from
from w2s_engine import Engine, SearchParams


def tiny_engine(**kw):
    tok = make_tokenizer(300)
    untuned = tiny_llama(len(tok), seed=2)
    tuned = tuned_from(untuned, seed=3, scale=0.3)
    large = tiny_llama(len(tok), seed=1, layers=3)
    kw.setdefault("num_kv_blocks", 3000)
    return Engine((large, tok), (tuned, tok), (clone(untuned), tok), block_size=4,
                  progress=False, **kw)


@pytest.fixture(scope="module")
def server():
    live = LiveServer(tiny_engine())
    yield live
    live.stop()


@pytest.mark.parametrize("method, extra", [
    ("cbs", {"w": 2, "k": 2, "l": 3}), ("best_of_n", {"k": 4}), ("base", {}),
    ("eft", {"beta": 1.0})])
def test_completions_and_chat_completions_with_each_method(server, method, extra):
    body = {"method": method, "top_k": 20, **extra}
    c = server.client.completions.create(model="tiny", prompt="I really", max_tokens=8, seed=1,
                                         extra_body=body)
    assert c.choices[0].finish_reason in ("stop", "length")
    assert c.usage.completion_tokens <= 8 and c.usage.prompt_tokens > 0
    w2s = c.model_extra["w2s"]
    if method == "base":
        assert w2s["reward"] is None
    else:
        assert isinstance(w2s["reward"], float)
        assert w2s["hypotheses"][0]["reward"] == w2s["reward"]
        # The chunk rewards of its lineage, the last being its reward.
        assert w2s["hypotheses"][0]["chunk_rewards"][-1] == w2s["reward"]
    chat = server.client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Write a review."}], max_tokens=6,
        seed=2, extra_body=body)
    assert chat.choices[0].message.role == "assistant"
    assert isinstance(chat.choices[0].message.content, str)


def test_32_concurrent_requests_are_answered_and_batched_together(server):
    before = server.metrics()

    def one(i):
        c = server.client.completions.create(model="tiny", prompt=f"Review {i}:", max_tokens=12,
                                             seed=i, extra_body={"w": 2, "k": 2, "l": 4})
        return i, c
    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(one, range(32)))
    for i, c in answers:
        assert c.choices[0].text is not None and c.usage.completion_tokens >= 1
        # The same request alone gives the same text: batching changes nothing.
    i, c = answers[5]
    alone = server.client.completions.create(model="tiny", prompt="Review 5:", max_tokens=12,
                                             seed=5, extra_body={"w": 2, "k": 2, "l": 4})
    assert alone.choices[0].text == c.choices[0].text
    after = server.metrics()
    assert after["w2s_requests_finished_total"] - before["w2s_requests_finished_total"] >= 33
    assert after["w2s_max_running_requests"] >= 8
    assert after["w2s_batched_steps_total"] > before["w2s_batched_steps_total"]
    assert after['w2s_kv_blocks_used{model="large"}'] == 0


def test_client_that_disconnects_cancels_its_search_and_frees_blocks(server):
    before = server.metrics()
    body = json.dumps({"prompt": "A very long review", "max_tokens": 400, "w": 4, "k": 4, "l": 1,
                       "seed": 3}).encode()
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        time.sleep(1.0)   # the search is running now; then the client goes away
    deadline = time.time() + 30
    while time.time() < deadline:
        m = server.metrics()
        if m["w2s_requests_cancelled_total"] > before["w2s_requests_cancelled_total"] and \
                m['w2s_kv_blocks_used{model="large"}'] == 0 and m['w2s_kv_blocks_used{model="tuned"}'] == 0:
            break
        time.sleep(0.2)
    assert m["w2s_requests_cancelled_total"] == before["w2s_requests_cancelled_total"] + 1
    assert m['w2s_kv_blocks_used{model="large"}'] == 0
    assert m['w2s_kv_blocks_used{model="tuned"}'] == 0
    assert m["w2s_requests_running"] == 0


@pytest.mark.parametrize("body, status, field", [
    (b"{not json", 400, None),
    (json.dumps({"prompt": "x", "w": "four"}).encode(), 400, "w"),
    (json.dumps({"prompt": "x", "top_p": 1.5}).encode(), 400, "top_p"),
    (json.dumps({"prompt": "x", "max_tokens": 0}).encode(), 400, "max_tokens"),
    (json.dumps({"prompt": "x", "n": 5}).encode(), 400, "n"),  # n > w
    (json.dumps({"prompt": "x", "n": 300, "method": "base"}).encode(), 400, "n"),
    (json.dumps({"prompt": "x", "method": "magic"}).encode(), 400, "method"),
    (json.dumps({"w": 2}).encode(), 400, "prompt"),
    (json.dumps({"prompt": "word " * 600, "max_tokens": 4}).encode(), 400, None),
    (json.dumps({"prompt": "", "max_tokens": 4}).encode(), 400, None),
    (json.dumps({"prompt": "x", "method": "best_of_n", "w": 2}).encode(), 400, "w"),
])
def test_malformed_requests_get_4xx_naming_the_field_and_the_server_keeps_serving(server, body,
                                                                                  status, field):
    code, payload, _ = server.post("/v1/completions", body)
    assert code == status, payload
    assert payload["error"]["message"]
    if field:
        assert field in payload["error"]["message"]
    ok = server.client.completions.create(model="tiny", prompt="Still", max_tokens=3,
                                          extra_body={"method": "base"})
    assert ok.choices[0].text is not None


def test_models_health_and_metrics(server):
    models = server.client.models.list().data
    assert [m.id for m in models] == ["tiny"]
    assert abs(models[0].created - time.time()) < 3600   # when the server began, not 1970
    c = server.client.chat.completions.create(model="tiny", max_tokens=2, messages=[
        {"role": "user", "content": "Hi"}], extra_body={"method": "base"})
    assert "system_fingerprint" in c.model_dump(exclude_unset=True)   # null, as OpenAI's
    assert json.loads(urllib.request.urlopen(server.url + "/health").read())["status"] == "ok"
    # Load balancers probe with HEAD.
    head = urllib.request.urlopen(urllib.request.Request(server.url + "/health", method="HEAD"))
    assert head.status == 200
    m = server.metrics()
    assert {"w2s_requests_total", "w2s_queue_length", 'w2s_kv_blocks_used{model="large"}',
            'w2s_tokens_forwarded_total{model="tuned"}', "w2s_decode_steps_total"} <= set(m)


def test_past_the_queue_bound_requests_get_429_with_retry_after():
    # A pool that fits one search at a time, and a queue of one: the rest are turned away.
    engine = tiny_engine(num_kv_blocks=60, max_waiting=1)
    live = LiveServer(engine)
    try:
        body = json.dumps({"prompt": "I really", "max_tokens": 40, "w": 2, "k": 2, "l": 2}).encode()
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda _: live.post("/v1/completions", body), range(8)))
        codes = [r[0] for r in results]
        assert 429 in codes and 200 in codes
        assert all(r[2].get("retry-after") or r[2].get("Retry-After") for r in results if r[0] == 429)
        assert set(codes) <= {200, 429}
        engine_ok = live.post("/v1/completions", body)
        assert engine_ok[0] == 200
    finally:
        live.stop()
    engine.check_all_free()


def test_a_request_of_more_prompts_than_the_queue_bound_runs_them_all_on_an_idle_server():
    # The bound counts requests: a list of prompts longer than it starts together (it was
    # refused with 429 for ever, on an idle server, and the client's retries with it).
    engine = tiny_engine(num_kv_blocks=60, max_waiting=1)
    live = LiveServer(engine)
    try:
        prompts = ["I really", "This film", "What a", "The plot", "Hmm"]
        status, answer, _ = live.post("/v1/completions", json.dumps(
            {"prompt": prompts, "max_tokens": 30, "method": "base", "n": 4,
             "seed": 1}).encode())
        assert status == 200, answer
        assert len(answer["choices"]) == 4 * len(prompts)
    finally:
        live.stop()
    engine.check_all_free()


def test_the_engines_own_server_is_a_black_box_large_model_for_another_engine():
    from w2s_engine import SearchParams
    from w2s_engine.large.openai_completions import CompletionJob, OpenAICompletions
    tok = make_tokenizer(300)
    large_only = Engine((tiny_llama(len(tok), seed=1, layers=3), tok), num_kv_blocks=800,
                        block_size=4, progress=False)
    live = LiveServer(large_only)
    backend = OpenAICompletions(live.url + "/v1", model="tiny")
    try:
        choices = backend.complete_many([CompletionJob(
            prompt="I really", n=3, max_tokens=4, temperature=1.0, top_p=1.0, seed=1)])[0]
        assert len(choices) == 3  # our server honours n with plain sampling
        untuned = tiny_llama(len(tok), seed=2)
        searcher = Engine(backend, (tuned_from(untuned, seed=3, scale=0.3), tok),
                          (clone(untuned), tok), num_kv_blocks=800, block_size=4, progress=False)
        res = searcher.search(["I really", "This film"],
                              SearchParams(w=2, k=2, l=3, max_new_tokens=9, seed=4))
        for r in res:
            for h in r.hypotheses:
                assert h.reward == pytest.approx(
                    searcher.score([r.prompt], [h.text], finished=h.finished)[0], abs=1e-4)
        # A stop string the server cut (it names it, vLLM's stop_reason) or one across two
        # chunks' calls (cut here): either way the hypothesis names it.
        free = searcher.search(["I really"], SearchParams(w=1, k=3, l=3, max_new_tokens=9,
                                                          seed=5, temperature=1.0))[0]
        stops = sorted({c for h in free.hypotheses for c in h.text[1:] if c.isalpha()})[:6]
        stopped = searcher.search(["I really"], SearchParams(
            w=1, k=3, l=3, max_new_tokens=9, seed=5, temperature=1.0, stop=stops))[0]
        named = [h.stop_reason for h in stopped.hypotheses if h.finish_reason == "stop"]
        assert named and all(s in stops for s in named), (stops, named)
        # logit_bias goes to the server, in its own token ids (the same tokenizer here).
        forced = searcher.search(["I really"], SearchParams(
            w=2, k=2, l=3, max_new_tokens=6, seed=4, logit_bias={77: 100.0}))[0]
        assert forced.text == tok.decode([77] * 6)
        assert forced.hypotheses[0].num_tokens == 6     # the server's count (no ids here)
        # A server's penalties would count only the chunk each call writes: refused.
        for field, value in [("presence_penalty", 0.5), ("repetition_penalty", 1.2),
                             ("min_p", 0.1), ("min_tokens", 2), ("stop_token_ids", [5]),
                             ("include_stop_str_in_output", True)]:
            with pytest.raises(ValueError, match=f"{field}=.*black box"):
                searcher.search(["I really"], SearchParams(**{field: value}))
        searcher.check_all_free()
    finally:
        backend.close()
        live.stop()


# ---- hostile input (issue 20) ---------------------------------------------------------------------

def raw_post(port, path, body: bytes, headers=None, method="POST"):
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json",
                                                       **(headers or {})})
        r = conn.getresponse()
        return r.status, json.loads(r.read())
    finally:
        conn.close()


def is_envelope(payload, status):
    error = payload["error"]
    return (set(error) == {"message", "type", "param", "code"} and error["message"]
            and error["code"] == status
            and error["type"] == ("invalid_request_error" if status < 500 else "server_error"))


@pytest.mark.parametrize("path, body, status, param", [
    ("/v1/completions", b'{"prompt": "x", "top_k": 3000000000}', 400, "top_k"),
    ("/v1/completions", b'{"prompt": "x", "temperature": Infinity}', 400, "temperature"),
    ("/v1/completions", b'{"prompt": "x", "temperature": 1e308}', 400, "temperature"),
    ("/v1/completions", b'{"prompt": "x", "temperature": 1e400}', 400, "temperature"),
    ("/v1/completions", b'{"prompt": "x", "method": "eft", "beta": NaN}', 400, "beta"),
    ("/v1/completions", b'{"prompt": "x", "method": "eft", "beta": 1e308}', 400, "beta"),
    ("/v1/completions", b'{"prompt": "x", "w": true}', 400, "w"),
    ("/v1/completions", b'{"prompt": "x", "method": "base", "k": 0}', 400, "k"),
    ("/v1/completions", b'{"prompt": "x", "seed": -1}', 400, "seed"),
    ("/v1/completions", b'{"prompt": "x", "seed": 9223372036854775808}', 400, "seed"),
    ("/v1/completions", b'{"prompt": "I \\ud800 really"}', 400, "prompt"),
    ("/v1/completions", b'{"prompt": "x", "stop": ["a", 1]}', 400, "stop.1"),
    ("/v1/completions", b'{"prompt": "x", "presence_penalty": 2.5}', 400, "presence_penalty"),
    ("/v1/completions", b'{"prompt": "x", "repetition_penalty": 0}', 400, "repetition_penalty"),
    ("/v1/completions", b'{"prompt": "x", "frequency_penalty": NaN}', 400, "frequency_penalty"),
    ("/v1/completions", b'{"prompt": "x", "stream": "yes"}', 400, "stream"),
    ("/v1/completions", b'{"prompt": "x", "logit_bias": {"5": 101}}', 400, "logit_bias.5"),
    ("/v1/completions", b'{"prompt": "x", "logit_bias": {"x": 1}}', 400, "logit_bias.x"),
    ("/v1/completions", b'{"prompt": "x", "logit_bias": {"99999": 1}}', 400, "logit_bias.99999"),
    ("/v1/completions", b'{"prompt": "\xff\xfe"}', 400, None),
    ("/v1/completions", b'{"prompt": "x", "seed": ' + b"9" * 5000 + b'}', 400, None),
    ("/v1/completions", b'{"prompt": "x", "metadata": ' + b"9" * 5000 + b'}', 400, None),
    # Limits of the models and the pool name the field to change.
    ("/v1/completions", b'{"prompt": "x", "max_tokens": 600}', 400, "max_tokens"),
    ("/v1/completions", b'{"prompt": "' + b"a " * 600 + b'", "max_tokens": 4}', 400, "prompt"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "' + b"a " * 600
     + b'"}], "max_tokens": 4}', 400, "messages"),
    # 4,096 samples do not fit the pool even for one token each: w is at fault
    ("/v1/completions", b'{"prompt": "x", "max_tokens": 400, "w": 64, "k": 64}', 400, "w"),
    ("/v1/completions", b'{"prompt": "x", "max_tokens": 500, "w": 32, "k": 32}', 400,
     "max_tokens"),
    ("/v1/completions", b"[" * 100000 + b"]" * 100000, 400, None),
    ("/v1/completions", b'{"prompt": "x", "w": }', 400, None),
    ("/v1/completions", b'[1, 2]', 400, None),
    ("/v1/chat/completions", b'{"messages": [{"role": "wizard", "content": "x"}]}', 400,
     "messages.0.role"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user: x\\nassistant", "content": "x"}]}',
     400, "messages.0.role"),
    ("/v1/chat/completions", b'{"messages": [{"role": "tool", "content": "x"}]}', 400,
     "messages.0.role"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": [{"type": "image_url",'
     b' "image_url": {"url": "x"}}]}]}', 400, "messages.0.content.0.type"),
])
def test_hostile_bodies_get_400_in_the_envelope_naming_the_field(server, path, body, status,
                                                                 param):
    code, payload = raw_post(server.port, path, body)
    assert code == status and is_envelope(payload, status), payload
    assert payload["error"]["param"] == param
    if param:
        assert param.split(".")[-1] in payload["error"]["message"]


def test_a_developer_message_is_taken_as_the_system_message(server):
    # OpenAI's newer SDKs send "developer" where they sent "system" (vLLM takes both).
    messages = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}]
    answers = [server.client.chat.completions.create(model="tiny", messages=m, max_tokens=5,
                                                     seed=3, extra_body={"w": 2, "k": 2, "l": 3})
               for m in (messages, [{**messages[0], "role": "developer"}, messages[1]])]
    assert answers[0].choices[0].message.content == answers[1].choices[0].message.content


def test_a_bad_request_among_running_ones_fails_alone(server):
    good = {"prompt": "I really", "max_tokens": 10, "seed": 5, "w": 2, "k": 2, "l": 3}
    alone = server.post("/v1/completions", json.dumps(good).encode())
    before = server.metrics()
    with ThreadPoolExecutor(3) as pool:
        runs = [pool.submit(server.post, "/v1/completions", json.dumps(good).encode())
                for _ in range(2)]
        time.sleep(0.2)
        bad = server.post("/v1/completions", json.dumps({**good, "top_k": 3_000_000_000}).encode())
        answers = [r.result() for r in runs]
    assert bad[0] == 400 and bad[1]["error"]["param"] == "top_k"
    assert [a[0] for a in answers] == [200, 200]
    assert all(a[1]["choices"][0]["text"] == alone[1]["choices"][0]["text"] for a in answers)
    after = server.metrics()
    assert after["w2s_requests_failed_total"] == before["w2s_requests_failed_total"]
    assert after["w2s_requests_rejected_total"] == before["w2s_requests_rejected_total"] + 1
    server.async_engine.engine.check_all_free()


def test_host_check_404_405_and_413_answer_in_the_envelope():
    live = LiveServer(tiny_engine(), max_body_bytes=4096)
    anyhost = LiveServer(tiny_engine(num_kv_blocks=200), allowed_hosts=("*",))
    try:
        body = json.dumps({"prompt": "I really", "max_tokens": 2, "method": "base"}).encode()
        code, payload = raw_post(live.port, "/v1/completions", body, {"Host": "attacker.example"})
        assert code == 400 and is_envelope(payload, 400) and "attacker.example" in \
            payload["error"]["message"] and "--allowed-hosts" in payload["error"]["message"]
        assert raw_post(live.port, "/v1/completions", body, {"Host": "localhost:8000"})[0] == 200
        assert raw_post(live.port, "/v1/completions", body, {"Host": "[::1]:8000"})[0] == 200
        assert raw_post(anyhost.port, "/v1/completions", body, {"Host": "attacker.example"})[0] \
            == 200
        code, payload = raw_post(live.port, "/v1/nothing", b"", method="GET")
        assert code == 404 and is_envelope(payload, 404) and "/v1/completions" in \
            payload["error"]["message"]
        code, payload = raw_post(live.port, "/v1/completions", b"", method="GET")
        assert code == 405 and is_envelope(payload, 405) and "POST" in payload["error"]["message"]
        big = json.dumps({"prompt": "x" * 5000}).encode()
        code, payload = raw_post(live.port, "/v1/completions", big)
        assert code == 413 and is_envelope(payload, 413) and "4096" in payload["error"]["message"]
        m = live.metrics()   # 404 and 405 are not generation requests; the rest add up
        assert m["w2s_requests_total"] == 4 and m["w2s_requests_finished_total"] == 2
        assert m['w2s_requests_rejected_by_reason_total{reason="host"}'] == 1
        assert m['w2s_requests_rejected_by_reason_total{reason="too_large"}'] == 1
    finally:
        live.stop()
        anyhost.stop()


def test_a_prompt_past_the_character_limit_is_refused_before_tokenizing(monkeypatch):
    engine = tiny_engine(num_kv_blocks=200)
    live = LiveServer(engine, max_prompt_chars=100)
    calls = []
    real = engine.make_request
    monkeypatch.setattr(engine, "make_request",
                        lambda *a, **kw: calls.append(threading.current_thread().name)
                        or real(*a, **kw))
    try:
        code, payload = raw_post(live.port, "/v1/completions",
                                 json.dumps({"prompt": "y" * 101}).encode())
        assert code == 400 and payload["error"]["param"] == "prompt" and not calls
        code, payload = raw_post(live.port, "/v1/chat/completions", json.dumps(
            {"messages": [{"role": "user", "content": "y" * 60}] * 2}).encode())
        assert code == 400 and payload["error"]["param"] == "messages" and not calls
        ok = raw_post(live.port, "/v1/completions",
                      json.dumps({"prompt": "y" * 100, "max_tokens": 2}).encode())
        assert ok[0] == 200
        # Tokenizing runs in the preparation pool, never on the engine loop's thread.
        assert calls and all(name.startswith("w2s-prepare") for name in calls)
    finally:
        live.stop()


def test_the_character_limit_holds_each_prompt_of_a_list_not_their_sum():
    engine = tiny_engine(num_kv_blocks=400)
    live = LiveServer(engine, max_prompt_chars=100)
    try:
        # Four prompts of 80 characters: 320 in all, each under the limit.
        code, payload = raw_post(live.port, "/v1/completions", json.dumps(
            {"prompt": ["y " * 40] * 4, "max_tokens": 2, "method": "base"}).encode())
        assert code == 200 and len(payload["choices"]) == 4
        code, payload = raw_post(live.port, "/v1/completions", json.dumps(
            {"prompt": ["y " * 40, "y" * 101], "max_tokens": 2}).encode())
        assert code == 400 and payload["error"]["param"] == "prompt.1"
        assert payload["error"]["message"].startswith("prompt.1: 101 characters")
    finally:
        live.stop()
    engine.check_all_free()


def test_a_search_that_cannot_start_is_a_5xx_and_cancels_the_requests_other_prompts(monkeypatch):
    engine = tiny_engine(num_kv_blocks=400)
    live = LiveServer(engine)
    real, queued = engine.enqueue, []

    def enqueue(req, **kwargs):   # the engine refuses a list's second prompt
        if queued:
            raise RuntimeError("the engine refused it")
        queued.append(req)
        return real(req, **kwargs)
    monkeypatch.setattr(engine, "enqueue", enqueue)
    try:
        code, payload = raw_post(live.port, "/v1/completions", json.dumps(
            {"prompt": ["I really", "What a"], "max_tokens": 200, "ignore_eos": True,
             "method": "base"}).encode())
        assert code == 500 and is_envelope(payload, 500)
        assert "could not start" in payload["error"]["message"]
        deadline = time.time() + 10        # the engine loop ends the first prompt's search
        while not queued[0].status.ended and time.time() < deadline:
            time.sleep(0.05)
        assert queued[0].status.ended and queued[0].status.name == "CANCELLED"
        monkeypatch.setattr(engine, "enqueue", real)
        live.async_engine.shutdown()                 # the HTTP server still answers
        code, payload = raw_post(live.port, "/v1/completions", json.dumps(
            {"prompt": "I really", "max_tokens": 2}).encode())
        assert code == 503 and "shutting down" in payload["error"]["message"]
        m = live.metrics()
        assert m["w2s_requests_failed_total"] == 2 and m["w2s_requests_total"] == 2
    finally:
        live.stop()
    assert not engine.has_unfinished()
    engine.check_all_free()


def test_a_burst_that_fits_the_kv_cache_is_admitted_whatever_the_queue_bound():
    engine = tiny_engine(max_waiting=2)
    live = LiveServer(engine)
    try:
        body = json.dumps({"prompt": "I really", "max_tokens": 6, "w": 2, "k": 2, "l": 3}).encode()
        with ThreadPoolExecutor(32) as pool:
            codes = [r[0] for r in pool.map(lambda _: live.post("/v1/completions", body),
                                             range(32))]
        assert codes == [200] * 32
    finally:
        live.stop()
    engine.check_all_free()


def test_a_search_the_engine_fails_is_a_500_counted_as_failed_and_the_rest_go_on(server,
                                                                                 monkeypatch):
    from test_validation import poison
    poison(monkeypatch, server.async_engine.engine.scorer, "plan",
           RuntimeError("cannot score this one"))
    before = server.metrics()
    code, payload, _ = server.post("/v1/completions", json.dumps(
        {"prompt": "POISON", "max_tokens": 4}).encode())
    assert code == 500 and is_envelope(payload, 500) and "cannot score" in \
        payload["error"]["message"]
    assert server.post("/v1/completions", json.dumps({"prompt": "Fine", "max_tokens": 4})
                       .encode())[0] == 200
    after = server.metrics()
    assert after["w2s_requests_failed_total"] == before["w2s_requests_failed_total"] + 1
    assert after["w2s_requests_finished_total"] == before["w2s_requests_finished_total"] + 1
    server.async_engine.engine.check_all_free()


def test_the_public_model_name_is_never_a_local_path(tmp_path):
    from w2s_engine.serve.server import default_allowed_hosts, served_name
    (tmp_path / "my-model").mkdir()
    assert served_name(str(tmp_path / "my-model")) == "my-model"
    assert served_name(str(tmp_path / "weights" / "smol.Q4.gguf")) == "smol.Q4"
    assert served_name("./relative/dir") == "dir"
    assert served_name("smollm2-135m-instruct") == "smollm2-135m-instruct"
    assert served_name("org/name") == "org/name"
    assert default_allowed_hosts("127.0.0.1") == ("localhost", "127.0.0.1", "::1")
    assert default_allowed_hosts("0.0.0.0") == ("*",)


def test_building_a_heavy_logprobs_answer_does_not_hold_up_other_requests(server,
                                                                          monkeypatch):
    """A whole answer's log-probs (every token's and alternatives' strings: seconds for 64
    prompts x 4 choices x 256 tokens x 20) are built off the event loop: /health and other
    requests are answered meanwhile."""
    from w2s_engine.serve.answers import Answer
    whole = Answer.whole

    def slow_whole(self, result, tokenizer):
        time.sleep(2.0)                       # a heavy build, holding its thread
        return whole(self, result, tokenizer)
    monkeypatch.setattr(Answer, "whole", slow_whole)
    body = json.dumps({"prompt": "I really", "max_tokens": 3, "method": "base",
                       "logprobs": 2}).encode()
    heavy = threading.Thread(target=raw_post, args=(server.port, "/v1/completions", body))
    heavy.start()
    time.sleep(1.0)                           # its answer is being built now
    started = time.time()
    code, _ = raw_post(server.port, "/health", b"", method="GET")
    waited = time.time() - started
    heavy.join()
    assert code == 200 and waited < 0.8, waited


def test_a_chat_past_the_context_names_the_messages_or_max_tokens_in_plain_words(server):
    # The tiny models' context is 512 tokens; "good " is 5 of make_tokenizer's.
    def chat(words, **extra):
        return raw_post(server.port, "/v1/chat/completions", json.dumps(
            {"messages": [{"role": "user", "content": "good " * words}], **extra}).encode())
    code, payload = chat(200)
    assert code == 400 and payload["error"]["param"] == "messages"
    assert "the messages' prompt has" in payload["error"]["message"]
    assert "shorten the messages" in payload["error"]["message"]
    code, payload = chat(20, max_tokens=450)
    assert code == 400 and payload["error"]["param"] == "max_tokens"
    assert "the messages' prompt has" in payload["error"]["message"]
    assert "max_tokens is 450" in payload["error"]["message"]


def test_without_max_tokens_a_prompt_near_the_context_gets_the_room_left_as_vllm_gives(server):
    # The tiny models' context is 512 tokens: "good " * 100 leaves fewer than the default 128.
    prompt = "good " * 100
    c = server.client.completions.create(model="tiny", prompt=prompt, seed=1, extra_body={
        "method": "base", "ignore_eos": True})
    room = 512 - c.usage.prompt_tokens
    assert 0 < room < 128
    assert c.usage.completion_tokens == room and c.choices[0].finish_reason == "length"
    cbs = server.client.completions.create(model="tiny", prompt=prompt, seed=1, extra_body={
        "w": 2, "k": 2, "l": 8, "ignore_eos": True})           # the small models' contexts too
    assert cbs.usage.completion_tokens == room
    code, payload = raw_post(server.port, "/v1/completions", json.dumps(
        {"prompt": prompt, "max_tokens": 128}).encode())      # sent: still refused
    assert code == 400 and payload["error"]["param"] == "max_tokens"
    code, payload = raw_post(server.port, "/v1/completions", json.dumps(
        {"prompt": "good " * 103}).encode())                   # the prompt alone fills it
    assert code == 400 and payload["error"]["param"] == "prompt"


def test_an_error_in_one_prompt_of_a_list_names_that_prompt_in_param_and_message(server):
    for prompts, where in [(["", "a"], "prompt.0"), (["a", ""], "prompt.1")]:
        code, payload = raw_post(server.port, "/v1/completions", json.dumps(
            {"prompt": prompts, "max_tokens": 2}).encode())
        assert code == 400 and payload["error"]["param"] == where
        assert payload["error"]["message"].startswith(f"{where}=''")


def test_a_stop_cut_text_that_re_tokenizes_past_the_reservation_fails_alone_saying_so():
    # Random models sample invalid UTF-8, and the text a stop string leaves holds U+FFFD for
    # it: three byte tokens each when the small models re-tokenize the text returned. Past
    # the reservation with no room left, the request fails alone, saying what happened.
    engine = tiny_engine(num_kv_blocks=36)
    params = SearchParams(method="cbs", w=2, k=4, l=2, max_new_tokens=26, seed=73543, top_k=50,
                          stop=["e", "a", "the"])
    req = engine.enqueue(engine.make_request("Hmm", params))
    while engine.has_unfinished():
        engine.step()
    assert req.status.name == "FAILED"
    assert "the text a stop string left re-tokenizes to" in req.error
    assert "were sampled (KV was reserved for those)" in req.error
    engine.check_all_free()
    assert engine.search(["Hmm"], params.copy(stop=[]))[0].hypotheses   # the engine goes on
    engine.check_all_free()
