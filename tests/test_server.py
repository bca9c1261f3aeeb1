"""The OpenAI-compatible server: a live uvicorn on 127.0.0.1 driven by the stock openai client."""

import json
import socket
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from live_server import LiveServer
from tiny_models import clone, make_tokenizer, tiny_llama, tuned_from
from w2s_engine import Engine


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
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
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
    (json.dumps({"prompt": "x", "w": "four"}).encode(), 422, "w"),
    (json.dumps({"prompt": "x", "top_p": 1.5}).encode(), 422, "top_p"),
    (json.dumps({"prompt": "x", "max_tokens": 0}).encode(), 422, "max_tokens"),
    (json.dumps({"prompt": "x", "n": 3}).encode(), 400, "n"),
    (json.dumps({"prompt": "x", "n": 300, "method": "base"}).encode(), 422, "n"),
    (json.dumps({"prompt": "x", "method": "magic"}).encode(), 422, "method"),
    (json.dumps({"w": 2}).encode(), 422, "prompt"),
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
    assert [m.id for m in server.client.models.list().data] == ["tiny"]
    assert json.loads(urllib.request.urlopen(server.url + "/health").read())["status"] == "ok"
    m = server.metrics()
    assert {"w2s_requests_total", "w2s_queue_length", 'w2s_kv_blocks_used{model="large"}',
            'w2s_tokens_forwarded_total{model="tuned"}'} <= set(m)


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
        searcher.check_all_free()
    finally:
        backend.close()
        live.stop()
