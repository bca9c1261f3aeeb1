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
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import openai
import pytest

from live_server import LiveServer
from tiny_models import clone, make_tokenizer, tiny_llama, tuned_from
from w2s_engine import Engine, SearchError, SearchParams
from w2s_engine.large.openai_completions import OpenAICompletions
from w2s_engine.search.request import RequestStatus


class ScriptedServer:
    """/v1/completions answered by answer(body) -> (status, content type, bytes or a dict),
    or with a fourth item, seconds between the body's bytes (a server that trickles)."""

    def __init__(self, answer):
        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                status, kind, data, *trickle = answer(body)
                data = data if isinstance(data, bytes) else json.dumps(data).encode()
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                try:
                    for i in range(0, len(data), 1 if trickle else len(data)):
                        self.wfile.write(data[i:i + 1] if trickle else data)
                        self.wfile.flush()
                        if trickle:
                            time.sleep(trickle[0])
                except (BrokenPipeError, ConnectionResetError):   # the client gave up
                    pass

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


def engine_over(server, small, **backend_options):
    tok, tuned, untuned = small
    backend_options = {"max_retries": 0, "timeout": 10, **backend_options}
    backend = OpenAICompletions(server.url, model="m", **backend_options)
    return backend, Engine(backend, (clone(tuned), tok), (clone(untuned), tok),
                           num_kv_blocks=800, block_size=4, progress=False)


def run(small, answer, prompts, params, **backend_options):
    server = ScriptedServer(answer)
    backend, engine = engine_over(server, small, **backend_options)
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
    (completion([" a\ud800b"]), "text that is not valid Unicode"),
], ids=["abort", "content-filter", "html", "truncated-json", "error-in-a-200", "null-text",
        "lone-surrogate"])
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


def test_a_call_that_trickles_past_the_timeout_fails_its_request_alone_in_time(small):
    """httpx's timeout restarts with every byte: a server that sends a byte a second would
    hold a request for ever. The backend's timeout is each call's, retries included."""
    def answer(body):
        if "SLOW" in body["prompt"]:
            return (*completion([" ok"] * body["n"]), 0.5)
        return completion([" ok"] * body["n"])
    started = time.perf_counter()
    (good, slow), url = run(small, answer, ["fine", "SLOW"],
                            SearchParams(w=1, k=2, l=3, max_new_tokens=9, seed=1), timeout=1.5)
    assert time.perf_counter() - started < 30
    assert good.status is RequestStatus.DONE and good.result.text == " ok ok ok"
    assert slow.status is RequestStatus.FAILED
    assert f"{url} did not answer a call within 1.5 s" in slow.error
    assert "--large-timeout" in slow.error


@pytest.mark.parametrize("status, says", [
    (401, "check the API key (--large-api-key"),
    (404, "check the model name (--large-model) and that the URL is the server's /v1 base"),
])
def test_a_refusal_the_client_does_not_retry_is_not_called_retried_and_says_what_to_check(
        small, status, says):
    def answer(body):
        return status, "application/json", {"error": {"message": "no", "type": "x"}}
    (r,), url = run(small, answer, ["fine"], SearchParams(w=1, k=2, l=3, max_new_tokens=9,
                                                          seed=1), max_retries=2)
    assert r.status is RequestStatus.FAILED and url in r.error and says in r.error
    assert "retries" not in r.error


def test_token_counts_from_usage_are_capped_at_max_tokens_and_a_count_as_text_is_ignored(small):
    def answer(body):
        count = "7" if "TEXT" in body["prompt"] else 10**6
        return (200, "application/json", {**completion([" end"] * body["n"], "stop")[2],
                                          "usage": {"prompt_tokens": 1,
                                                    "completion_tokens": count}})
    params = SearchParams(w=1, k=2, l=3, max_new_tokens=9, seed=1)
    huge, text = run(small, answer, ["fine", "TEXT"], params)[0]
    for r in (huge, text):
        assert r.status is RequestStatus.DONE and r.result.text == " end"
        assert all(1 <= h.num_tokens <= 3 for h in r.result.hypotheses)
        assert r.stats.tokens_sampled <= 2 * 3


def test_a_search_over_a_closed_backend_fails_saying_so_rather_than_waiting_for_ever(small):
    server = ScriptedServer(lambda body: completion([" ok"] * body["n"]))
    backend, engine = engine_over(server, small)
    params = SearchParams(w=1, k=2, l=3, max_new_tokens=9, seed=1)
    try:
        assert engine.search("fine", params)[0].text == " ok ok ok"
        backend.close()
        with pytest.raises(SearchError, match="was closed: make a new OpenAICompletions"):
            engine.search("fine", params)
        engine.check_all_free()
    finally:
        server.stop()


@pytest.mark.parametrize("status, page, says", [
    (200, b"<html>hello</html>", "is --large the server's OpenAI-compatible /v1 base URL"),
    (404, b'{"error": "not found"}', "is --large the server's OpenAI-compatible /v1 base URL"),
], ids=["an-html-page", "not-found"])
def test_w2s_over_a_url_that_is_no_models_endpoint_says_so_in_one_line(capsys, tmp_path, status,
                                                                       page, says):
    from w2s_engine.cli import main

    class Page(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            self.send_response(status)
            self.send_header("Content-Type", "text/html" if page.startswith(b"<") else
                             "application/json")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Page)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    try:
        with pytest.raises(SystemExit) as e:
            # (directories, as the small models' flags are checked before the URL is read)
            main(["search", "hi", "--large", url, "--tuned", str(tmp_path), "--untuned",
                  str(tmp_path)])
    finally:
        httpd.shutdown()
        httpd.server_close()
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(f"w2s: error: --large {url}: cannot list")
    assert says in err and "--large-model" in err and "Traceback" not in err


def test_w2s_serve_answers_400_for_a_request_the_large_server_refuses_and_502_when_it_fails(
        small):
    """A w2s server fronting a black box: the large server's 400 (a prompt past its context)
    is the client's to change, so the client gets a 400 with the large server's words; the
    large server failing is a gateway's 502, not w2s's own 500; the other requests go on."""

    def answer(body):
        if "LONG" in body["prompt"]:
            return 400, "application/json", {"error": {
                "message": "This model's maximum context length is 8 tokens", "type": "x"}}
        if "BROKEN" in body["prompt"]:
            return 500, "application/json", {"error": {"message": "CUDA error", "type": "x"}}
        return completion([" ok"] * body["n"], "stop")
    server = ScriptedServer(answer)
    backend, engine = engine_over(server, small)
    live = LiveServer(engine)
    try:
        options = dict(model="tiny", max_tokens=6, seed=1)
        with pytest.raises(openai.BadRequestError, match="maximum context length is 8") as e:
            live.client.completions.create(prompt="LONG", **options)
        assert e.value.status_code == 400
        with pytest.raises(openai.InternalServerError, match="CUDA error") as e:
            live.client.completions.create(prompt="BROKEN", **options)
        assert e.value.status_code == 502
        streamed = live.client.completions.create(prompt="LONG", stream=True, **options)
        with pytest.raises(openai.APIError, match="maximum context length is 8"):
            list(streamed)
        assert live.client.completions.create(prompt="fine", **options).choices[0].text == " ok"
        deadline = time.time() + 10    # the engine loop ends the stream's search in a step
        while engine.has_unfinished() and time.time() < deadline:
            time.sleep(0.05)
        engine.check_all_free()
    finally:
        live.stop()
        backend.close()
        server.stop()


def test_a_server_that_ignores_max_tokens_is_named_when_its_long_chunks_outgrow_the_kv(small):
    """A server sending far more text than max_tokens a call (its tokens counted as
    max_tokens) outgrows the small models' reservation: the request fails alone, and the
    error names the server's max_tokens rather than only the request's max_new_tokens."""
    def answer(body):
        return completion(["abcdefghij" * 8] * body["n"])   # 80 characters for 3 tokens
    server = ScriptedServer(answer)
    backend = OpenAICompletions(server.url, model="m", max_retries=0, timeout=10)
    tok, tuned, untuned = small
    engine = Engine(backend, (clone(tuned), tok), (clone(untuned), tok), num_kv_blocks=120,
                    block_size=4, progress=False)
    try:
        with pytest.raises(SearchError, match="its chunks are longer than counted: check that "
                                              "it honours max_tokens"):
            engine.search("Q:", SearchParams(w=2, k=2, l=3, max_new_tokens=30, seed=1))
        engine.check_all_free()
    finally:
        backend.close()
        server.stop()


def test_search_of_several_prompts_keeps_the_others_results_when_one_fails(small):
    """engine.search([...]) where one prompt fails: the SearchError says which, and carries
    every other prompt's result (None for the failed one), so no finished search is lost."""
    def answer(body):
        if "LONG" in body["prompt"]:
            return 400, "application/json", {"error": {"message": "too long", "type": "x"}}
        return completion([" ok"] * body["n"], "stop")
    server = ScriptedServer(answer)
    backend, engine = engine_over(server, small)
    try:
        params = SearchParams(w=1, k=2, l=3, max_new_tokens=9, seed=1)
        with pytest.raises(SearchError, match="prompt 1 failed: .*too long.*the other prompts' "
                                              "results are in this error's .results") as e:
            engine.search(["fine", "LONG", "fine too"], params)
        assert [r is None for r in e.value.results] == [False, True, False]
        assert e.value.results[2].text == " ok" and list(e.value.errors) == [1]
        engine.check_all_free()
    finally:
        backend.close()
        server.stop()
