"""A stream under load and under faults (a streaming audit): a heavy log-probs stream builds
its chunks off the event loop, and an error past the headers ends the stream with an error
event and [DONE], never a cut connection."""

import http.client
import json
import threading
import time

import openai
import pytest

from live_server import LiveServer
from test_server import raw_post, tiny_engine
from w2s_engine.serve.answers import Answer


@pytest.fixture(scope="module")
def server():
    live = LiveServer(tiny_engine(num_kv_blocks=400))
    yield live
    live.stop()


def sse(port: int, path: str, body: dict):
    """POST and read the event stream (20 s at most): (status, headers, events, raw lines)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    try:
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        r = conn.getresponse()
        raw = r.read().decode()
    finally:
        conn.close()
    lines = [ln for ln in raw.split("\n") if ln]
    return r.status, dict(r.headers), [ln[len("data: "):] for ln in lines], lines


def slow_last_step(monkeypatch, seconds: float):
    """Answer.step holds its thread for `seconds` on a search's last step (where a choice's
    log-probs are built: seconds for many choices of many tokens)."""
    step = Answer.step

    def slow_step(self, deltas, tokenizer=None):
        if any(d.result is not None for d in deltas):
            time.sleep(seconds)
        return step(self, deltas, tokenizer)
    monkeypatch.setattr(Answer, "step", slow_step)


def test_a_streamed_heavy_logprobs_answer_does_not_hold_up_other_requests(server,
                                                                          monkeypatch):
    slow_last_step(monkeypatch, 2.0)
    body = {"prompt": "I really", "max_tokens": 3, "method": "base", "logprobs": 2,
            "stream": True}
    got = {}
    heavy = threading.Thread(target=lambda: got.update(
        answer=sse(server.port, "/v1/completions", body)))
    heavy.start()
    time.sleep(1.0)                           # its last chunk is being built now
    started = time.time()
    code, _ = raw_post(server.port, "/health", b"", method="GET")
    waited = time.time() - started
    heavy.join(timeout=30)
    assert code == 200 and waited < 0.8, waited
    status, _, events, _ = got["answer"]
    assert status == 200 and events[-1] == "[DONE]"
    assert json.loads(events[-2])["choices"][0]["logprobs"]["tokens"]


def test_an_unexpected_error_mid_stream_is_an_error_event_then_done_not_a_cut_connection(
        server, monkeypatch):
    def broken_step(self, deltas, tokenizer=None):
        raise KeyError("a bug in building the chunks")
    monkeypatch.setattr(Answer, "step", broken_step)
    before = server.metrics()
    body = {"prompt": "I really", "max_tokens": 4, "method": "base", "stream": True}
    status, _, events, lines = sse(server.port, "/v1/completions", body)
    assert status == 200 and events[-1] == "[DONE]"
    assert all(ln.startswith("data: ") for ln in lines)
    error = json.loads(events[-2])["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == 500 and error["type"] == "server_error"
    assert "KeyError" in error["message"]
    # The openai client reads it as the API's error, not as a broken connection.
    client = server.client.with_options(timeout=20)
    with pytest.raises(openai.APIError, match="KeyError") as raised:
        list(client.completions.create(model="tiny", prompt="I really", max_tokens=4,
                                       stream=True, extra_body={"method": "base"}))
    assert not isinstance(raised.value, openai.APIConnectionError)
    after = server.metrics()
    assert after["w2s_requests_failed_total"] == before["w2s_requests_failed_total"] + 2
    deadline = time.time() + 10
    while server.async_engine.engine.has_unfinished() and time.time() < deadline:
        time.sleep(0.05)
    server.async_engine.engine.check_all_free()


def test_a_search_the_shutdown_ends_mid_flight_is_a_503_whole_or_streamed():
    """A search running when the engine shuts down fails with 503 (retry elsewhere), as one
    still queued does, not with 500 (a fault of this server's); streamed, its error event
    says 503."""
    live = LiveServer(tiny_engine(num_kv_blocks=400))
    body = {"prompt": "I really", "max_tokens": 400, "ignore_eos": True, "method": "base"}
    got = {}
    try:
        whole = threading.Thread(target=lambda: got.update(whole=raw_post(
            live.port, "/v1/completions", json.dumps(body).encode())))
        streamed = threading.Thread(target=lambda: got.update(streamed=sse(
            live.port, "/v1/completions", {**body, "stream": True})))
        whole.start(), streamed.start()
        deadline = time.time() + 20
        while live.async_engine.engine.stats()["running"] < 2 and time.time() < deadline:
            time.sleep(0.02)
        live.async_engine.shutdown()
        whole.join(timeout=20), streamed.join(timeout=20)
        code, payload = got["whole"]
        assert code == 503 and payload["error"]["code"] == 503, payload
        _, _, events, _ = got["streamed"]
        assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == 503
    finally:
        live.stop()
    live.async_engine.engine.check_all_free()


def test_a_streamed_response_the_shutdown_ends_says_so_in_an_error_event_and_response_failed():
    """The Responses API's stream of a search that fails mid-flight: an `error` event with the
    status, then `response.failed` carrying the text sent so far (OpenAI's stream ends so),
    and every KV block comes back."""
    live = LiveServer(tiny_engine(num_kv_blocks=400))
    body = {"input": "I really", "max_output_tokens": 400, "ignore_eos": True,
            "method": "base", "stream": True}
    got = {}
    try:
        streamed = threading.Thread(target=lambda: got.update(streamed=sse(
            live.port, "/v1/responses", body)))
        streamed.start()
        deadline = time.time() + 20
        while live.async_engine.engine.stats()["running"] < 1 and time.time() < deadline:
            time.sleep(0.02)
        live.async_engine.shutdown()
        streamed.join(timeout=20)
        code, _, _, lines = got["streamed"]
        assert code == 200
        kinds = [ln[len("event: "):] for ln in lines if ln.startswith("event: ")]
        payloads = [json.loads(ln[len("data: "):]) for ln in lines if ln.startswith("data: ")]
        assert [p["type"] for p in payloads] == kinds      # each event named twice, alike
        assert kinds[:2] == ["response.created", "response.in_progress"]
        assert kinds[-2:] == ["error", "response.failed"]
        assert payloads[-2]["code"] == "503" and "shutting down" in payloads[-2]["message"]
        failed = payloads[-1]["response"]
        sent = "".join(p["delta"] for p in payloads if p["type"] == "response.output_text.delta")
        assert failed["status"] == "failed" and failed["output"][0]["content"][0]["text"] == sent
    finally:
        live.stop()
    live.async_engine.engine.check_all_free()
