"""What an operator needs (issue 18): the API key, CORS, request ids, the access log and the
package's logs at each level, and Prometheus metrics whose request counters add up after a mix
of successes, failures, cancellations and 429s."""

import hmac
import json
import logging
import socket
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from live_server import LiveServer
from test_server import is_envelope, tiny_engine

KEY = "sekret-key"
GOOD = json.dumps({"prompt": "I really", "max_tokens": 4, "method": "base"}).encode()


@pytest.fixture(scope="module")
def server():
    # A pool that fits about one search at a time and a queue of one, so that a burst gets 429s.
    live = LiveServer(tiny_engine(num_kv_blocks=60, max_waiting=1), api_key=KEY,
                      allowed_origins=("https://app.example",))
    yield live
    live.stop()


def request(server, path, method="GET", body=None, headers=None):
    """(status, headers, body bytes) with urllib, errors included."""
    req = urllib.request.Request(server.url + path, data=body, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


AUTH = {"Authorization": f"Bearer {KEY}"}


def test_the_api_key_guards_every_route_but_health_compared_in_constant_time(server,
                                                                            monkeypatch):
    compared = []
    real = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: compared.append(1) or real(a, b))
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        for path, method, body in [("/v1/completions", "POST", GOOD), ("/v1/models", "GET", None),
                                   ("/metrics", "GET", None), ("/v1/nothing", "GET", None)]:
            code, h, data = request(server, path, method, body, headers)
            assert code == 401 and is_envelope(json.loads(data), 401), (path, headers)
            assert h["www-authenticate"] == "Bearer"
    assert compared
    assert request(server, "/health")[0] == 200
    assert request(server, "/v1/completions", "POST", GOOD, AUTH)[0] == 200
    ok = server.client.completions.create(model="tiny", prompt="I", max_tokens=2,
                                          extra_body={"method": "base"})
    assert ok.choices[0].text is not None
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    m = server.metrics()
    assert m['w2s_requests_rejected_by_reason_total{reason="auth"}'] >= 3


def test_cors_preflight_and_simple_requests(server):
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}
    code, h, _ = request(server, "/v1/completions", "OPTIONS", headers=preflight)
    assert code == 200   # no API key on a preflight
    assert h["access-control-allow-origin"] == "https://app.example"
    assert "POST" in h["access-control-allow-methods"]
    assert "authorization" in h["access-control-allow-headers"].lower()
    code, h, _ = request(server, "/v1/completions", "OPTIONS",
                         headers={**preflight, "Origin": "https://evil.example"})
    assert code == 400 and "access-control-allow-origin" not in h
    code, h, _ = request(server, "/v1/models", headers={**AUTH, "Origin": "https://app.example"})
    assert code == 200 and h["access-control-allow-origin"] == "https://app.example"
    assert "x-request-id" in h["access-control-expose-headers"].lower()
    # Without --allowed-origins a browser gets no CORS headers.
    plain = LiveServer(tiny_engine(num_kv_blocks=100))
    try:
        code, h, _ = request(plain, "/v1/models", headers={"Origin": "https://app.example"})
        assert code == 200 and "access-control-allow-origin" not in h
    finally:
        plain.stop()


def test_request_ids_are_echoed_or_made_and_written_in_the_access_log(server, caplog):
    caplog.set_level(logging.INFO, logger="w2s_engine.access")
    code, h, data = request(server, "/v1/completions", "POST", GOOD, {**AUTH,
                                                                      "X-Request-Id": "abc-123"})
    assert code == 200 and h["x-request-id"] == "abc-123"
    assert json.loads(data)["id"] == "cmpl-abc-123"
    code, h, _ = request(server, "/v1/models", headers=AUTH)
    made = h["x-request-id"]
    assert len(made) == 32 and int(made, 16) >= 0
    code, h, _ = request(server, "/v1/models", headers={**AUTH, "X-Request-Id": "x" * 200})
    assert h["x-request-id"] != "x" * 200
    code, h, _ = request(server, "/v1/completions", "POST", b"{", {"X-Request-Id": "no-key"})
    assert code == 401 and h["x-request-id"] == "no-key"
    lines = access_lines(caplog, "no-key ")
    line = next(ln for ln in lines if ln.startswith("abc-123 "))
    assert "POST /v1/completions 200 finished method=base" in line
    assert "completion_tokens=4" in line and "seconds=" in line
    assert any(ln.startswith(made + " ") and "GET /v1/models 200" in ln for ln in lines)
    assert any(ln.startswith("no-key ") and " 401 rejected" in ln for ln in lines)


def access_lines(caplog, waiting_for: str) -> list[str]:
    """The access log so far, once a line starting with `waiting_for` is in (it is written
    just after the response is sent)."""
    deadline = time.time() + 10
    while True:
        lines = [r.getMessage() for r in caplog.records if r.name == "w2s_engine.access"]
        if any(ln.startswith(waiting_for) for ln in lines) or time.time() > deadline:
            return lines
        time.sleep(0.02)


def test_logs_at_each_level(server, caplog, monkeypatch):
    from test_validation import poison
    caplog.set_level(logging.DEBUG, logger="w2s_engine")
    engine = server.async_engine.engine
    body = {"prompt": "POISON", "max_tokens": 3}
    poison(monkeypatch, engine.scorer, "plan", RuntimeError("cannot score"))
    assert request(server, "/v1/completions", "POST", json.dumps(body).encode(),
                   {**AUTH, "X-Request-Id": "bad-1"})[0] == 500
    monkeypatch.undo()
    real = engine.large.advance
    monkeypatch.setattr(engine.large, "advance", lambda rs: (_ for _ in ()).throw(
        RuntimeError("decode broke")) if any(r.prompt == "POISON" for r in rs) else real(rs))
    assert request(server, "/v1/completions", "POST", json.dumps(body).encode(), AUTH)[0] == 500
    monkeypatch.undo()
    by_level = {}
    for r in caplog.records:
        by_level.setdefault(r.levelno, []).append((r.name, r.getMessage()))
    assert any("queued" in m for _, m in by_level[logging.DEBUG])
    assert any(n == "w2s_engine.access" for n, _ in by_level[logging.INFO])
    assert any("bad-1" in m and "cannot score" in m for _, m in by_level[logging.WARNING])
    assert any("decode broke" in m or "large model's step" in m
               for _, m in by_level[logging.ERROR])
    engine.check_all_free()


def test_metrics_parse_and_the_request_counters_add_up_after_a_mix(server, monkeypatch):
    from test_validation import poison
    before = server.metrics()
    sent = 0
    # successes, and 429s from a burst past the queue bound
    burst = json.dumps({"prompt": "I really", "max_tokens": 30, "w": 2, "k": 2, "l": 2}).encode()
    with ThreadPoolExecutor(8) as pool:
        codes = [r[0] for r in pool.map(lambda _: request(server, "/v1/completions", "POST",
                                                          burst, AUTH), range(8))]
    sent += 8
    assert 429 in codes and 200 in codes and set(codes) <= {200, 429}
    # 400s and a 401
    for body, headers in [(b"{", AUTH), (b'{"prompt": "x", "w": 0}', AUTH), (GOOD, {})]:
        request(server, "/v1/completions", "POST", body, headers)
        sent += 1
    # a failure
    poison(monkeypatch, server.async_engine.engine.scorer, "plan", RuntimeError("x"))
    assert request(server, "/v1/completions", "POST", b'{"prompt": "POISON", "max_tokens": 3}',
                   AUTH)[0] == 500
    sent += 1
    # a cancellation: a streaming client that leaves
    body = json.dumps({"prompt": "Long", "max_tokens": 200, "method": "base", "stream": True,
                       "ignore_eos": True}).encode()
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                  + f"Authorization: Bearer {KEY}\r\nContent-Type: application/json\r\n".encode()
                  + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        got = b""
        while got.count(b"data: ") < 2:
            got += s.recv(65536)
    sent += 1
    deadline = time.time() + 30   # the handlers have ended, and the engine took the cancel
    while time.time() < deadline and any(server.metrics()[k] for k in (
            "w2s_requests_in_flight", "w2s_requests_running", "w2s_queue_length")):
        time.sleep(0.1)

    families = {f.name: f for f in text_string_to_metric_families(server.metrics_text())}
    assert families["w2s_requests"].type == "counter"
    assert families["w2s_time_to_first_token_seconds"].type == "histogram"
    m = server.metrics()
    delta = {k: m[k] - before.get(k, 0) for k in m}
    outcomes = {o: delta[f"w2s_requests_{o}_total"]
                for o in ("finished", "failed", "cancelled", "rejected")}
    assert delta["w2s_requests_total"] == sent == sum(outcomes.values())
    assert outcomes["failed"] == 1 and outcomes["cancelled"] == 1
    assert outcomes["finished"] == codes.count(200)
    reasons = {k: v for k, v in delta.items() if k.startswith("w2s_requests_rejected_by_reason_"
                                                                "total")}
    assert sum(reasons.values()) == outcomes["rejected"]
    assert reasons['w2s_requests_rejected_by_reason_total{reason="queue_full"}'] == \
        codes.count(429)
    assert reasons['w2s_requests_rejected_by_reason_total{reason="auth"}'] == 1
    assert m["w2s_requests_in_flight"] == 0 and m["w2s_queue_length"] == 0
    assert all(m[f'w2s_kv_blocks_used{{model="{p}"}}'] == 0 for p in ("large", "tuned"))
    assert delta['w2s_tokens_forwarded_total{model="large"}'] > 0
    assert delta["w2s_time_to_first_token_seconds_count"] >= codes.count(200)
    assert delta["w2s_time_per_chunk_seconds_count"] > 0
    assert delta["w2s_request_seconds_count"] == outcomes["finished"]
    assert m["w2s_max_running_requests"] >= 1
    server.async_engine.engine.check_all_free()


def test_a_body_that_does_not_arrive_in_time_gets_408_and_its_connection_closed():
    """A client that sends its headers and half a body, then waits (a slow or hostile one),
    is answered 408 once --body-timeout passes and its connection is closed, instead of
    holding it and its handler for ever; the server serves others meanwhile."""
    live = LiveServer(tiny_engine(), body_timeout=1.0)
    try:
        before = live.metrics()
        body = json.dumps({"prompt": "I really", "max_tokens": 3, "method": "base"}).encode()
        with socket.create_connection(("127.0.0.1", live.port)) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                      b"Content-Type: application/json\r\n"
                      + f"Content-Length: {len(body)}\r\n\r\n".encode() + body[:10])
            started = time.time()
            # meanwhile a whole request is answered
            other = live.client.completions.create(model="tiny", prompt="I really",
                                                   max_tokens=3, extra_body={"method": "base"})
            assert other.choices[0].text is not None
            s.settimeout(30)
            got = b""
            while True:
                part = s.recv(65536)
                if not part:            # closed by the server
                    break
                got += part
            waited = time.time() - started
        head, _, payload = got.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408"), got[:200]
        error = json.loads(payload)
        assert is_envelope(error, 408) and "--body-timeout" in error["error"]["message"]
        assert 0.5 < waited < 20
        after = live.metrics()
        key = 'w2s_requests_rejected_by_reason_total{reason="body_timeout"}'
        assert after.get(key, 0) - before.get(key, 0) == 1
    finally:
        live.stop()


def test_the_usage_clients_are_answered_with_adds_up_in_the_token_counters(server):
    """w2s_prompt_tokens_total and w2s_generation_tokens_total (vLLM's pair) count the usage
    of finished requests: several prompts, n of a Best-of-N, a stream with its usage chunk."""
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
    before = server.metrics()
    got = [client.completions.create(model="tiny", prompt=["I really", "The film"], max_tokens=3,
                                     extra_body={"method": "base"}).usage,
           client.completions.create(model="tiny", prompt="I really", max_tokens=4, best_of=3,
                                     n=2).usage]
    for chunk in client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
            stream=True, stream_options={"include_usage": True}, extra_body={"method": "base"}):
        if chunk.usage is not None:
            got.append(chunk.usage)
    deadline = time.time() + 30   # each request's outcome is counted as its handler ends
    while time.time() < deadline and server.metrics()["w2s_requests_in_flight"]:
        time.sleep(0.05)
    after = server.metrics()
    assert len(got) == 3
    assert after["w2s_prompt_tokens_total"] - before.get("w2s_prompt_tokens_total", 0) == \
        sum(u.prompt_tokens for u in got)
    assert after["w2s_generation_tokens_total"] - before.get("w2s_generation_tokens_total", 0) == \
        sum(u.completion_tokens for u in got)
    assert "w2s_kv_blocks_capacity" in after and "w2s_kv_blocks_total" not in after


def settled_metrics(server) -> dict:
    """/metrics once every request has ended (each is counted as its handler ends)."""
    deadline = time.time() + 30
    while time.time() < deadline and server.metrics()["w2s_requests_in_flight"]:
        time.sleep(0.05)
    return server.metrics()


def test_a_request_of_several_prompts_is_timed_once_and_a_bad_prompt_starts_none(server):
    """Time to first token is one observation per client request (not per prompt or choice),
    and a request whose later prompt is refused starts no search at all (its good prompts
    did run, and their text was timed, though the client got a 400)."""
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
    key = "w2s_time_to_first_token_seconds_count"
    work = 'w2s_tokens_forwarded_total{model="large"}'
    before = settled_metrics(server)
    client.completions.create(model="tiny", prompt=["I really", "The film", "It was"],
                              max_tokens=3, extra_body={"method": "base"})
    after = settled_metrics(server)
    assert after[key] - before[key] == 1
    too_long = "word " * 600                  # past the tiny models' 512-token context
    with pytest.raises(openai.BadRequestError) as refusal:
        client.completions.create(model="tiny", prompt=["I really", too_long, "It was"],
                                  max_tokens=3, extra_body={"method": "base"})
    assert refusal.value.body["param"] == "prompt.1"
    refused = settled_metrics(server)
    assert refused[key] == after[key] and refused[work] == after[work]
