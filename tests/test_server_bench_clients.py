"""The serving benchmarks against `w2s serve`: the JSON they send and the way they read the
stream, re-written here by their rules (not their code), so that their figures come out right:

- vLLM's `vllm bench serve` (vllm/benchmarks/lib/endpoint_request_func.py:
  async_request_openai_completions and async_request_openai_chat_completions; the model from
  vllm/benchmarks/serve.py: get_first_model_from_server): SSE messages split at blank lines,
  `data: ` dropped, [DONE] skipped; a message with non-empty `choices` is a token: the first
  one's arrival is the time to first token, each later one's gap an inter-token latency;
  a message without choices but with `usage` gives the output tokens (completion_tokens) and
  the prompt length; the request succeeded when any message with choices came;
- SGLang's `python -m sglang.bench_serving` (python/sglang/bench_serving.py, backends vllm /
  sglang / sglang-oai: async_request_openai_completions and ..._chat_completions): line by
  line, `data: ` dropped; completions read choices[0].text of every message but [DONE] (a
  message with no choices would raise), chat reads choices[0].delta.content; a token is a
  message with non-empty text; output tokens from a message's usage, else the length asked.
"""

import http.client
import json
import time

import pytest
from live_server import LiveServer
from test_server import tiny_engine

N = 11   # the benchmark's output length (max_tokens), with ignore_eos


@pytest.fixture(scope="module")
def server():
    live = LiveServer(tiny_engine())
    yield live
    live.stop()


def stream_messages(port: int, path: str, payload: dict):
    """POST payload; yield (status, arrival time, SSE message) as the bytes come, messages
    split at blank lines as vLLM's StreamedResponseHandler splits them."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", path, json.dumps(payload), {"Content-Type": "application/json"})
    r = conn.getresponse()
    buffer = ""
    try:
        while True:
            data = r.read1(65536)
            if not data:
                break
            now = time.perf_counter()
            buffer += data.decode()
            while "\n\n" in buffer:
                message, buffer = buffer.split("\n\n", 1)
                if message.strip():
                    yield r.status, now, message.strip()
        if buffer.strip():
            yield r.status, time.perf_counter(), buffer.strip()
    finally:
        conn.close()


def vllm_bench_request(port: int, chat: bool, prompt: str, output_len: int, model="tiny",
                       ignore_eos=True, extra_body=None) -> dict:
    """One request of `vllm bench serve --backend openai(-chat)`, read by its rules."""
    if chat:
        path = "/v1/chat/completions"
        payload = {"model": model,
                   "messages": [{"role": "user", "content": [{"type": "text", "text": prompt}]}],
                   "max_completion_tokens": output_len, "stream": True,
                   "stream_options": {"include_usage": True}}
    else:
        path = "/v1/completions"
        payload = {"model": model, "prompt": prompt, "repetition_penalty": 1.0,
                   "max_tokens": output_len, "logprobs": None, "stream": True,
                   "stream_options": {"include_usage": True}}
    if ignore_eos:
        payload["ignore_eos"] = True
    payload.update({"temperature": 0.0, **(extra_body or {})})   # its default: greedy
    out = {"success": False, "ttft": 0.0, "itl": [], "generated_text": "", "output_tokens": 0,
           "prompt_len": None, "status": None}
    st = latest = time.perf_counter()
    first = False
    for status, now, message in stream_messages(port, path, payload):
        out["status"] = status
        if status != 200 or message.startswith(":"):
            continue
        chunk = message.removeprefix("data: ")
        if chunk == "[DONE]":
            continue
        data = json.loads(chunk)
        if choices := data.get("choices"):
            text = choices[0]["delta"].get("content") if chat else choices[0].get("text")
            if not first:
                first, out["ttft"] = True, now - st
            else:
                out["itl"].append(now - latest)
            latest = now
            out["generated_text"] += text or ""
        elif usage := data.get("usage"):
            out["output_tokens"] = usage.get("completion_tokens")
            out["prompt_len"] = usage.get("prompt_tokens")
    out["success"], out["latency"] = first, latest - st
    return out


def sglang_bench_request(port: int, chat: bool, prompt: str, output_len: int) -> dict:
    """One request of `python -m sglang.bench_serving --backend vllm` (completions) or its
    chat function, read by its rules (line by line; no stream_options sent)."""
    if chat:
        path = "/v1/chat/completions"
        payload = {"model": "tiny", "messages": [{"role": "user", "content": prompt}],
                   "temperature": 0.0, "max_tokens": output_len, "stream": True}
    else:
        path = "/v1/completions"
        payload = {"model": "tiny", "prompt": prompt, "temperature": 0.0, "best_of": 1,
                   "max_tokens": output_len, "stream": True, "ignore_eos": True}
    out = {"ttft": 0.0, "generated_text": "", "output_len": output_len, "status": None}
    st = time.perf_counter()
    for status, _, message in stream_messages(port, path, payload):
        out["status"] = status
        for line in message.splitlines():
            chunk = line.strip().removeprefix("data: ")
            if not chunk or chunk == "[DONE]":
                continue
            data = json.loads(chunk)
            text = (data["choices"][0]["text"] if not chat else
                    data.get("choices", [{}])[0].get("delta", {}).get("content", ""))
            if text:
                out["ttft"] = out["ttft"] or time.perf_counter() - st
                out["generated_text"] += text
            out["output_len"] = (data.get("usage") or {}).get("completion_tokens",
                                                               out["output_len"])
    return out


def get(port: int, path: str):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, json.loads(r.read())
    finally:
        conn.close()


def test_vllm_bench_serve_without_model_reads_id_and_root_from_v1_models(server):
    # vllm/benchmarks/serve.py: data["data"][0]["id"], data["data"][0]["root"] (the tokenizer)
    status, listed = get(server.port, "/v1/models")
    assert status == 200
    name, root = listed["data"][0]["id"], listed["data"][0]["root"]
    assert name == root == "tiny"
    status, card = get(server.port, f"/v1/models/{name}")
    assert status == 200 and card["root"] == "tiny" and card["parent"] is None
    # the name it read is the `model` it then sends
    assert vllm_bench_request(server.port, False, "I really", 3, model=name)["success"]


@pytest.mark.parametrize("chat", [False, True], ids=["openai", "openai-chat"])
@pytest.mark.parametrize("method, extra", [
    ("base", {}), ("base-n2", {"n": 2}), ("cbs", {"w": 2, "k": 2, "l": 3}),
    ("best_of_n", {"k": 3}), ("eft", {})])
def test_vllm_bench_with_ignore_eos_counts_exactly_max_tokens_and_the_whole_text(
        server, chat, method, extra):
    extra = {"method": method.split("-")[0], "seed": 3, "top_k": 20, **extra}
    got = vllm_bench_request(server.port, chat, "I really", N, extra_body=extra)
    assert got["status"] == 200 and got["success"], got
    n = extra.get("n", 1)
    assert got["output_tokens"] == N * n           # usage of all n choices, as vLLM's
    body = ({"messages": [{"role": "user", "content": "I really"}]} if chat
            else {"prompt": "I really"})
    status, whole = server.post("/v1/chat/completions" if chat else "/v1/completions",
                                json.dumps({**body, "model": "tiny", "max_tokens": N,
                                            "ignore_eos": True, "temperature": 0.0,
                                            **extra}).encode())[:2]
    assert status == 200
    assert whole["usage"]["completion_tokens"] == N * n
    assert got["prompt_len"] == whole["usage"]["prompt_tokens"]
    texts = [c["message"]["content"] if chat else c["text"] for c in whole["choices"]]
    if n == 1:
        assert got["generated_text"] == texts[0]
    else:   # its text is every chunk's choices[0]: here the n choices' chunks, interleaved
        assert sorted(got["generated_text"]) == sorted("".join(texts))
    assert all(c["finish_reason"] == "length" for c in whole["choices"])
    assert got["ttft"] > 0 and len(got["itl"]) >= (1 if method in ("cbs", "best_of_n") else 2)


def test_vllm_bench_chat_times_the_first_token_at_the_first_engine_output_not_at_the_role(
        server, monkeypatch):
    """The role chunk has choices, so vLLM's client takes it for the first token: sent when
    the request is taken, the time to first token would be the HTTP round trip (here it must
    wait for the engine's first step, held 0.4 s)."""
    engine = server.async_engine.engine
    step = engine.step
    held = []

    def slow_step():
        if not held:
            held.append(time.perf_counter())
            time.sleep(0.4)
        return step()
    monkeypatch.setattr(engine, "step", slow_step)
    got = vllm_bench_request(server.port, True, "Write a review.", 6,
                             extra_body={"method": "base", "seed": 1})
    assert got["success"] and got["output_tokens"] == 6
    assert held and got["ttft"] >= 0.4, got["ttft"]


def test_vllm_bench_chat_counts_a_search_that_fails_before_its_first_token_as_failed(
        server, monkeypatch):
    engine = server.async_engine.engine
    step = engine.step
    failed = []

    def failing_step():
        if not failed:
            failed.append(True)
            raise RuntimeError("a fault before the first token")
        return step()
    monkeypatch.setattr(engine, "step", failing_step)
    got = vllm_bench_request(server.port, True, "Write a review.", 6,
                             extra_body={"method": "base", "seed": 1})
    assert failed and got["status"] == 200
    assert not got["success"] and got["generated_text"] == ""


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
def test_sglang_bench_serving_reads_every_chunk_and_the_text(server, chat):
    got = sglang_bench_request(server.port, chat, "I really", N)
    assert got["status"] == 200 and got["generated_text"] and got["ttft"] > 0
    assert got["output_len"] == N     # no usage asked for: the length it sent
