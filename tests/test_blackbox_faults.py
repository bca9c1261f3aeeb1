"""A black-box large model that misbehaves as real OpenAI-compatible servers do.

llama.cpp's server (tests/test_blackbox.py) is well behaved; others are not: TGI names EOS
"eos_token", vLLM aborts, a proxy answers an HTML error page with status 200, and every
server cuts stop strings only inside the continuation it writes. A scripted HTTP server plays
those answers here (the only way to produce them on demand): each misbehaving answer ends or
fails only the request it belongs to, with the server's address in the error, and every KV
block comes back.
"""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tiny_models import clone, make_tokenizer, tiny_llama, tuned_from
from w2s_engine import Engine, SearchParams
from w2s_engine.large.openai_completions import OpenAICompletions
from w2s_engine.search.request import RequestStatus


class ScriptedServer:
    """/v1/completions answered by answer(body) -> (status, content type, bytes or a dict)."""

    def __init__(self, answer):
        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                status, kind, data = answer(body)
                data = data if isinstance(data, bytes) else json.dumps(data).encode()
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def completion(texts, reason="length"):
    return 200, "application/json", {
        "id": "c", "object": "text_completion", "created": 0, "model": "m",
        "choices": [{"index": i, "text": t, "finish_reason": reason, "logprobs": None}
                    for i, t in enumerate(texts)],
        "usage": {"prompt_tokens": 1, "completion_tokens": 3 * len(texts), "total_tokens": 4}}


@pytest.fixture(scope="module")
def small():
    tok = make_tokenizer(300)
    untuned = tiny_llama(len(tok), seed=2)
    return tok, tuned_from(untuned, seed=3, scale=0.3), untuned


def engine_over(server, small):
    tok, tuned, untuned = small
    backend = OpenAICompletions(server.url, model="m", max_retries=0, timeout=10)
    return backend, Engine(backend, (clone(tuned), tok), (clone(untuned), tok),
                           num_kv_blocks=800, block_size=4, progress=False)


def run(small, answer, prompts, params):
    server = ScriptedServer(answer)
    backend, engine = engine_over(server, small)
    try:
        requests = [engine.add_request(p, params) for p in prompts]
        while engine.has_unfinished():
            engine.step()
        engine.check_all_free()
        return requests, server.url
    finally:
        backend.close()
        server.stop()


def test_a_stop_string_across_two_chunks_ends_the_response_before_it(small):
    story = "hello world. good film. the end"

    def answer(body):     # 4 characters a chunk; the server cuts stops inside its own only
        done = len(body["prompt"]) - len("Q:")
        return completion([story[done:done + 4]] * body["n"])
    params = SearchParams(w=1, k=2, l=4, max_new_tokens=40, seed=1, stop=[". "])
    (r,), _ = run(small, answer, ["Q:"], params)
    assert r.result.text == "hello world"
    assert all(h.finish_reason == "stop" and h.text == "hello world"
               for h in r.result.hypotheses)
    # A stream never sent the '.' that the next chunk showed to be the stop string's.
    server = ScriptedServer(answer)
    backend, engine = engine_over(server, small)
    try:
        assert "".join(d.text for d in engine.search_stream("Q:", params)) == "hello world"
        engine.check_all_free()
    finally:
        backend.close()
        server.stop()


@pytest.mark.parametrize("reason", ["stop", "eos_token", "stop_sequence"])
def test_every_servers_name_for_an_ended_continuation_finishes_the_beam(small, reason):
    def answer(body):
        if body["prompt"].endswith("The end."):   # a server would go on with new text
            return completion([" More"] * body["n"])
        return completion([" The end."] * body["n"], reason)
    (r,), _ = run(small, answer, ["Q:"], SearchParams(w=1, k=2, l=4, max_new_tokens=16, seed=1))
    assert r.result.text == " The end." and r.result.finished


@pytest.mark.parametrize("bad, says", [
    (completion([" x"], "abort"), "finish_reason='abort'"),
    (completion([" x"], "content_filter"), "finish_reason='content_filter'"),
    ((200, "text/html", b"<html>502 Bad Gateway</html>"), "no completion object"),
    ((200, "application/json", b'{"choices": [{"text": "x"'), "not JSON"),
    ((200, "application/json", {"error": {"message": "model overloaded"}}), "model overloaded"),
    ((200, "application/json", {"id": "c", "object": "text_completion", "created": 0,
                                "model": "m", "choices": [{"index": 0, "text": None,
                                                           "finish_reason": "length"}]}),
     "a choice without text"),
], ids=["abort", "content-filter", "html", "truncated-json", "error-in-a-200", "null-text"])
def test_an_answer_that_is_no_sample_fails_its_request_alone_naming_the_server(small, bad, says):
    def answer(body):
        return bad if "BAD" in body["prompt"] else completion([" ok"] * body["n"])
    (good, failed), url = run(small, answer, ["fine", "BAD"],
                              SearchParams(w=1, k=2, l=3, max_new_tokens=9, seed=1))
    assert good.status is RequestStatus.DONE and good.result.text == " ok ok ok"
    assert failed.status is RequestStatus.FAILED
    assert url in failed.error and says in failed.error


def test_a_slow_answer_holds_up_its_own_request_only_and_cancel_aborts_its_call(small):
    release = threading.Event()     # the slow request's call answers only when released

    def answer(body):
        if "SLOW" in body["prompt"]:
            release.wait(60)
        return completion([" ok"] * body["n"])
    server = ScriptedServer(answer)
    backend, engine = engine_over(server, small)
    try:
        params = SearchParams(w=1, k=2, l=3, max_new_tokens=9, seed=1)
        fast, slow = (engine.add_request(p, params) for p in ("fine", "SLOW"))
        for _ in range(1000):       # (each step waits at most remote.WAIT_S)
            engine.step()
            if fast.status.ended:
                break
        assert fast.status is RequestStatus.DONE and fast.result.text == " ok ok ok"
        assert slow.status is RequestStatus.RUNNING and not release.is_set()
        engine.cancel(slow)
        assert engine.large.in_flight == {} and not engine.has_unfinished()
        engine.check_all_free()
    finally:
        release.set()
        backend.close()
        server.stop()
