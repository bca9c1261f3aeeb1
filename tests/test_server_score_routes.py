"""The score, rerank and tokenize routes under load and misuse: a client that leaves a score
request stops its job; score calls take turns a slice at a time; a bad pair is named by its
field and place; these POST routes take JSON bodies only, as the generation routes do."""

import http.client
import json
import threading
import time

import pytest
import torch
from live_server import LiveServer
from test_server import tiny_engine

import w2s_engine.serve.async_engine as async_engine_module


@pytest.fixture(scope="module")
def server():
    live = LiveServer(tiny_engine())
    yield live
    live.stop()


def test_a_client_that_disconnects_mid_score_stops_its_job_at_the_next_slice(server, monkeypatch):
    slices, lock = [], threading.Lock()
    run_slice = async_engine_module.ScoreJob.run_slice

    def slow_slice(self, engine):      # 16 slices of ~0.15 s: the job would take ~2.4 s
        with lock:
            slices.append(len(self.rewards))
        time.sleep(0.15)
        return run_slice(self, engine)
    monkeypatch.setattr(async_engine_module.ScoreJob, "run_slice", slow_slice)
    pairs = 16 * async_engine_module.SCORE_SLICE_PAIRS
    responses = [f" I really like it {i}" for i in range(pairs)]
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("POST", "/v1/score", body=json.dumps({"text_1": "I really",
                                                        "text_2": responses}),
                 headers={"Content-Type": "application/json"})
    deadline = time.time() + 10
    while not slices and time.time() < deadline:
        time.sleep(0.01)
    conn.close()                       # the client goes away part-way
    deadline = time.time() + 10
    while server.async_engine._scoring and time.time() < deadline:
        time.sleep(0.05)
    assert not server.async_engine._scoring
    # The job stopped well before its 16 slices (the disconnect is seen within ~0.25 s).
    assert len(slices) < 10, f"{len(slices)} slices ran for a client that had gone"
    server.async_engine.engine.check_all_free()
    c = server.client.completions.create(model="tiny", prompt="I really", max_tokens=2, seed=1)
    assert c.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("path, body", [
    ("/v1/score", {"text_1": "a", "text_2": "x"}), ("/score", {"text_1": "a", "text_2": "x"}),
    ("/v1/rerank", {"query": "a", "documents": ["x"]}),
    ("/rerank", {"query": "a", "documents": ["x"]}),
    ("/tokenize", {"prompt": "a"}), ("/detokenize", {"tokens": [3]})])
def test_new_post_routes_refuse_a_text_plain_body_as_the_generation_routes_do(server, path, body):
    """A browser page posts text/plain cross-site without a CORS preflight: 415, not a
    scoring run for anyone's page (the Guard's rule for the generation routes)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "text/plain"})
        r = conn.getresponse()
        payload = json.loads(r.read())
    finally:
        conn.close()
    assert r.status == 415, payload


def test_an_empty_prompt_in_a_score_or_rerank_request_is_named_by_its_field_and_place(server):
    from test_server import raw_post
    body = {"text_1": ["I really"] * 39 + [""] + ["I really"] * 10, "text_2": [" a dog"] * 50}
    code, payload = raw_post(server.port, "/v1/score", json.dumps(body).encode())
    assert code == 400 and payload["error"]["param"] == "text_1.39", payload
    code, payload = raw_post(server.port, "/v1/rerank",
                             json.dumps({"query": "", "documents": ["x"]}).encode())
    assert code == 400 and payload["error"]["param"] == "query", payload


def test_a_pair_past_the_context_is_named_in_the_error_param_as_well_as_its_message(server):
    from test_server import raw_post
    responses = [" a dog"] * 50
    responses[40] = " x" * 600
    code, payload = raw_post(server.port, "/v1/score", json.dumps(
        {"text_1": "I really", "text_2": responses}).encode())
    assert code == 400 and payload["error"]["message"].startswith("text_2[40]: "), payload
    assert payload["error"]["param"] == "text_2.40", payload
    server.async_engine.engine.check_all_free()


def test_a_small_score_call_is_not_held_up_by_a_big_one_queued_before_it(monkeypatch):
    """The slices of the score calls queued take turns: a call of one pair behind one of 256
    ends after a slice or two of the big one, not after all 16."""
    import asyncio

    from w2s_engine.serve.async_engine import AsyncEngine
    run_slice = async_engine_module.ScoreJob.run_slice
    order = []

    def slow_slice(self, engine):
        time.sleep(0.05)
        done = run_slice(self, engine)
        if done:
            order.append(len(self.prompts))
        return done
    monkeypatch.setattr(async_engine_module.ScoreJob, "run_slice", slow_slice)

    async def main():
        with AsyncEngine(tiny_engine()) as a:
            big = asyncio.ensure_future(a.score(["I really"] * 256, [" a dog"] * 256))
            await asyncio.sleep(0.2)         # the big call is part-way
            small = await a.score(["I really"], [" a cat"])
            assert not big.done()
            assert len(await big) == 256 and len(small) == 1
            a.engine.check_all_free()
    asyncio.run(main())
    assert order == [1, 256]


def strict_json(text: str):
    """JSON as JavaScript's JSON.parse reads it: no NaN or Infinity."""
    def refuse(word):
        raise ValueError(f"{word} is not JSON")
    return json.loads(text, parse_constant=refuse)


def test_a_nan_reward_is_null_in_every_answer_and_ranks_last_not_a_500():
    """A small model whose forward overflows gives a NaN reward. JSON has no NaN: the
    answers carry null there (strict parsers read them), rerank puts it last, and the
    searches, the score and the streams are not lost to a 500."""
    from tiny_models import clone, make_tokenizer, tiny_llama, tuned_from
    from w2s_engine import Engine
    tok = make_tokenizer(300)
    untuned = tiny_llama(len(tok), seed=2)
    tuned = tuned_from(untuned, seed=3, scale=0.3)
    bad = tok(" dog", add_special_tokens=False).input_ids[-1]
    with torch.no_grad():      # the tuned model breaks on one token's embedding
        tuned.model.embed_tokens.weight[bad] = float("nan")
    engine = Engine((tiny_llama(len(tok), seed=1, layers=3), tok), (tuned, tok),
                    (clone(untuned), tok), block_size=4, progress=False, num_kv_blocks=3000)
    live = LiveServer(engine)

    def post(path, body):
        conn = http.client.HTTPConnection("127.0.0.1", live.port, timeout=120)
        try:
            conn.request("POST", path, body=json.dumps(body),
                         headers={"Content-Type": "application/json"})
            r = conn.getresponse()
            return r.status, r.read().decode()
        finally:
            conn.close()
    try:
        docs = [" a cat", " a dog", " the man"]
        code, text = post("/v1/score", {"text_1": "I really", "text_2": docs})
        assert code == 200, text
        scores = [d["score"] for d in strict_json(text)["data"]]
        assert scores[1] is None and all(isinstance(s, float) for s in scores[::2])
        code, text = post("/v1/rerank", {"query": "I really", "documents": docs})
        assert code == 200, text
        ranked = strict_json(text)["results"]
        assert [r["index"] for r in ranked][-1] == 1 and ranked[-1]["relevance_score"] is None
        # A prompt with the token: every candidate's reward is NaN, the search still answers.
        body = {"prompt": "I really like a dog", "max_tokens": 6, "seed": 1, "w": 2, "k": 2,
                "l": 3, "method": "cbs"}
        code, text = post("/v1/completions", body)
        assert code == 200, text
        whole = strict_json(text)
        assert whole["w2s"]["reward"] is None and whole["choices"][0]["text"] is not None
        code, text = post("/v1/completions", {**body, "stream": True})
        assert code == 200, text
        events = [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        chunks = [strict_json(e) for e in events[:-1]]
        assert chunks[-1]["w2s"]["reward"] is None
        assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]
        live.async_engine.engine.check_all_free()
    finally:
        live.stop()
