"""OpenAI-compatible HTTP server over one engine: `w2s serve`.

POST /v1/completions, POST /v1/chat/completions (the search is picked with extra body fields:
method, w, k, l, beta, top_k), GET /v1/models, GET /v1/models/{id}, GET /health, GET /metrics
(Prometheus). Every handler awaits its search on the shared engine loop, so concurrent
requests are batched together. `stream=true` sends the text that became final at each engine
step as server-sent events in OpenAI's chunk format (search/stream.py says what is final);
a client that disconnects cancels its search and frees its KV blocks; past the queue bound
(requests waiting for KV memory) a request gets 429 with Retry-After.

For operators: `--api-key` (Bearer auth on every route but /health, compared in constant
time), `--allowed-origins` (CORS), an X-Request-Id echoed or made per request and written in
every log line about it, one access-log line per request (logger `w2s_engine.access`), and
Prometheus metrics (serve/metrics.py).

Hostile input hurts nobody else: the Host header is checked (DNS rebinding), the body is
bounded (413 past --max-body-bytes) and parsed strictly (serve/protocol.py), a prompt is
bounded in characters before it is tokenized, and tokenizing runs off the engine thread.
Every error is in OpenAI's envelope {"error": {"message", "type", "param", "code"}}.
"""

import asyncio
import hmac
import json
import logging
import time
import uuid
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware

import w2s_engine

from w2s_engine.outputs import SearchResult
from w2s_engine.scheduler import QueueFull
from w2s_engine.serve.async_engine import AsyncEngine, SearchFailed
from w2s_engine.serve.metrics import ServerMetrics, parse_metrics  # noqa: F401 (re-exported)
from w2s_engine.serve.protocol import (ChatCompletionRequest, CompletionRequest, Plan,
                                       RequestError, param_error, parse_body)

log = logging.getLogger("w2s_engine.serve")
access_log = logging.getLogger("w2s_engine.access")

DEFAULT_MAX_BODY_BYTES = 1 << 20
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")
OPEN_PATHS = ("/health",)             # answered without the API key
CHARS_PER_TOKEN = 32   # a prompt longer than this many characters per context token cannot fit
REASONS = {401: "auth", 404: "model", 413: "too_large", 429: "queue_full"}
ROUTES = ("POST /v1/completions, POST /v1/chat/completions, GET /v1/models, "
          "GET /v1/models/{id}, GET /health, GET /metrics")


def _text(value: str | None) -> str | None:
    """Encodable as UTF-8: a lone surrogate echoed from the request becomes '\\ud800'."""
    if value is None or value.isascii():
        return value
    return value.encode("utf-8", "backslashreplace").decode("utf-8")


def _envelope(status: int, message: str, param: str | None = None) -> dict:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": _text(message), "type": kind, "param": _text(param),
                      "code": status}}


def _error(status: int, message: str, param: str | None = None, headers=None) -> JSONResponse:
    return JSONResponse(_envelope(status, message, param), status_code=status, headers=headers)


def _host_name(host: str) -> str:
    """'127.0.0.1:8000' -> '127.0.0.1', '[::1]:8000' -> '::1', lower case."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def host_allowed(host: str, allowed) -> bool:
    name = _host_name(host)
    for pattern in allowed:
        pattern = _host_name(pattern)
        if pattern == "*" or name == pattern or (
                pattern.startswith("*.") and name.endswith(pattern[1:])):
            return True
    return False


def request_id_from(header: bytes | None) -> str:
    """The client's X-Request-Id when it is 1 to 128 visible ASCII characters, else a new one."""
    if header and len(header) <= 128 and all(0x21 <= c <= 0x7E for c in header):
        return header.decode("ascii")
    return uuid.uuid4().hex


class Guard:
    """Pure ASGI middleware in front of the app: the request id, the Host check, the API key,
    the body limit, the access log, and the outcome of every generation request (exactly one
    of ServerMetrics' outcomes)."""

    def __init__(self, app, metrics: ServerMetrics, max_body_bytes: int, allowed_hosts,
                 api_key: str | None = None):
        self.app = app
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self.allowed_hosts = tuple(allowed_hosts)
        self.api_key = None if api_key is None else b"Bearer " + api_key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        headers = dict(scope.get("headers") or [])
        counted = scope["method"] == "POST" and scope["path"] in GENERATION_PATHS
        if counted:
            self.metrics.arrived()
        status, outcome = 500, None
        state = scope.setdefault("state", {})
        state["request_id"] = rid = request_id_from(headers.get(b"x-request-id"))
        state["arrived"] = started

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []),
                                                  (b"x-request-id", rid.encode())]}
            await send(message)

        try:
            outcome = await self._serve(scope, receive, send_status, state, headers)
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        except Exception:
            outcome = "failed"
            raise
        finally:
            seconds = time.perf_counter() - started
            if counted:
                outcome = outcome or state.get("outcome") or (
                    "finished" if status < 400 else "failed" if status >= 500 else "rejected")
                self.metrics.ended(outcome, state.get("reason") or REASONS.get(status), seconds)
            self._access(scope, state, status, outcome, seconds)

    def _access(self, scope, state, status, outcome, seconds):
        client = scope.get("client")
        tokens = state.get("tokens") or ("-", "-")
        access_log.info(
            "%s %s %s %s %d %s method=%s prompt_tokens=%s completion_tokens=%s seconds=%.3f"
            " user=%s", state["request_id"], client[0] if client else "-", scope["method"],
            scope["path"], status, outcome or "-", state.get("method", "-"), tokens[0],
            tokens[1], seconds, json.dumps(state.get("user")) if state.get("user") else "-")

    def _authorized(self, headers) -> bool:
        given = headers.get(b"authorization", b"")
        return hmac.compare_digest(given, self.api_key)

    async def _serve(self, scope, receive, send, state, headers) -> str | None:
        """Serve the request; returns an outcome decided here (None: from the response)."""
        host = headers.get(b"host", b"").decode("latin-1")
        if not host_allowed(host, self.allowed_hosts):
            state["reason"] = "host"
            await _error(400, f"Host header {host[:100]!r} is not allowed: this server answers "
                              f"to {', '.join(self.allowed_hosts)} (start it with "
                              "--allowed-hosts NAME to add one)")(scope, receive, send)
            return None
        if self.api_key is not None and scope["path"] not in OPEN_PATHS and \
                not self._authorized(headers):
            given = headers.get(b"authorization")
            await _error(401, "this server needs an API key: send the header 'Authorization: "
                              "Bearer <key>'" if not given else
                              "the API key in the Authorization header is not this server's",
                         headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
            return None
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return None
        # Read the whole body here, at most max_body_bytes of it; the app reads it from memory.
        limit = self.max_body_bytes
        length = headers.get(b"content-length", b"").decode("latin-1")
        too_large = length.isdigit() and int(length) > limit
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return "cancelled"
            body = message.get("body", b"")
            size += len(body)
            more = message.get("more_body", False)
            if too_large or size > limit:
                too_large = True
                if size > 64 * limit:  # stop reading a body that does not end
                    break
                continue               # drain it, so that the client reads the answer
            chunks.append(body)
        if too_large:
            await _error(413, f"the request body is larger than this server's limit of {limit} "
                              "bytes (--max-body-bytes): send a smaller request")(
                scope, receive, send)
            return None
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()   # after the body: the disconnect, when it comes
        await self.app(scope, replay, send)
        return None


def served_name(spec) -> str:
    """The public model name for a model spec: never a local path (its base name instead)."""
    spec = str(spec)
    path = Path(spec).expanduser()
    if spec.startswith((".", "/", "~")) or path.exists():
        return path.stem if path.suffix == ".gguf" else path.name
    return spec   # a bundled name or a hub id


# ---- responses --------------------------------------------------------------------------------

def _usage(result: SearchResult, n: int) -> dict:
    prompt = result.stats.prompt_tokens
    completion = sum(len(h.token_ids) for h in result.hypotheses[:n])
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def _extra(result: SearchResult) -> dict:
    """The search's own view, under 'w2s': rewards, every survivor, the work it took."""
    return {"reward": result.reward, "finish_reason": result.finish_reason,
            "hypotheses": [{"text": h.text, "reward": h.reward, "finished": h.finished,
                            "finish_reason": h.finish_reason} for h in result.hypotheses],
            "stats": {"tokens_forwarded": result.stats.tokens_forwarded,
                      "tokens_sampled": result.stats.tokens_sampled,
                      "peak_kv_blocks": result.stats.peak_kv_blocks,
                      "chunks": result.stats.chunks, "seconds": result.stats.seconds}}


class Logprobs:
    """OpenAI's logprobs objects from Hypothesis.logprobs (token strings from the large
    model's tokenizer, one token at a time, as vLLM shows them)."""

    def __init__(self, tokenizer, hypotheses):
        ids = sorted({i for h in hypotheses for e in h.logprobs or ()
                      for i in (e.token_id, *(t for t, _ in e.top))})
        self.text = dict(zip(ids, tokenizer.batch_decode([[i] for i in ids]))) if ids else {}

    def completion(self, entries) -> dict:
        tokens = [self.text[e.token_id] for e in entries]
        offsets, at = [], 0
        for t in tokens:
            offsets.append(at)
            at += len(t)
        return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
                "top_logprobs": [{**{self.text[t]: lp for t, lp in e.top},
                                  self.text[e.token_id]: e.logprob} for e in entries],
                "text_offset": offsets}

    def _token(self, token_id: int, logprob: float) -> dict:
        text = self.text[token_id]
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    def chat(self, entries) -> dict:
        return {"content": [{**self._token(e.token_id, e.logprob),
                             "top_logprobs": [self._token(t, lp) for t, lp in e.top]}
                            for e in entries], "refusal": None}


class Answer:
    """One request's response: OpenAI's completion or chat completion object, whole or as
    stream chunks."""

    def __init__(self, chat: bool, model: str, rid: str, plan: Plan, echo_text: str = ""):
        self.chat, self.model, self.plan, self.echo_text = chat, model, plan, echo_text
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{rid}"
        self.object = "chat.completion" if chat else "text_completion"
        self.created = int(time.time())

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def whole(self, result: SearchResult, tokenizer) -> dict:
        hyps = result.hypotheses[:self.plan.n]
        lp = Logprobs(tokenizer, hyps) if self.plan.logprobs is not None else None
        if self.chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": h.text},
                        "logprobs": lp.chat(h.logprobs) if lp else None,
                        "finish_reason": h.finish_reason} for i, h in enumerate(hyps)]
        else:
            choices = [{"index": i, "text": self.echo_text + h.text,
                        "logprobs": lp.completion(h.logprobs) if lp else None,
                        "finish_reason": h.finish_reason} for i, h in enumerate(hyps)]
        return {**self._head(self.object), "choices": choices,
                "usage": _usage(result, self.plan.n), "w2s": _extra(result)}

    # ---- streaming -----------------------------------------------------------------------

    def chunk(self, choices: list[dict], **more) -> str:
        body = {**self._head("chat.completion.chunk" if self.chat else "text_completion"),
                "choices": choices, **more}
        if self.plan.include_usage and "usage" not in body:
            body["usage"] = None
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    def piece(self, index: int, text: str | None, finish_reason=None, role=False) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else (
                {} if text is None else {"content": text})
            return {"index": index, "delta": delta, "logprobs": None,
                    "finish_reason": finish_reason}
        return {"index": index, "text": text or "", "logprobs": None,
                "finish_reason": finish_reason}

    def opening(self) -> list[str]:
        """Chat: the role first; completions with echo: the prompt first."""
        n = self.plan.n
        if self.chat:
            return [self.chunk([self.piece(i, None, role=True)]) for i in range(n)]
        if self.echo_text:
            return [self.chunk([self.piece(i, self.echo_text)]) for i in range(n)]
        return []

    def step(self, deltas) -> list[str]:
        """One engine step's deltas as chunks; the step that carries the result finishes every
        choice: its rest of the text and its finish_reason in one last content chunk each."""
        result = next((d.result for d in deltas if d.result is not None), None)
        if result is None:
            return [self.chunk([self.piece(d.index, d.text)]) for d in deltas if d.text]
        rest = {}
        for d in deltas:
            rest[d.index] = rest.get(d.index, "") + d.text
        hyps = result.hypotheses[:self.plan.n]
        out = []
        per_beam = self.plan.params.method == "base"   # n samples stream side by side
        for i, h in enumerate(hyps):
            # a search streams its best answer; the other n-1 best come whole at the end
            text = h.text if i and not per_beam else rest.get(i, "")
            out.append(self.chunk([self.piece(i, text or None, h.finish_reason)],
                                  **({"w2s": _extra(result)} if i == len(hyps) - 1 else {})))
        if self.plan.include_usage:
            out.append(self.chunk([], usage=_usage(result, self.plan.n)))
        return out


def default_allowed_hosts(bind_host: str) -> tuple[str, ...]:
    """Bound to loopback: the loopback names only (a DNS-rebinding page cannot reach it);
    bound elsewhere: any Host (the names it is reached by are not known here)."""
    return LOOPBACK_HOSTS if _host_name(bind_host) in LOOPBACK_HOSTS else ("*",)


# ---- the app ----------------------------------------------------------------------------------

def create_app(async_engine: AsyncEngine, model_name="w2s", *,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, allowed_hosts=LOOPBACK_HOSTS,
               max_prompt_chars: int | None = None, api_key: str | None = None,
               allowed_origins=()) -> FastAPI:
    """model_name: the served name, or several (the first in responses; a request may name
    any). max_prompt_chars: None: CHARS_PER_TOKEN characters per token of the smallest
    context. api_key: None: no auth. allowed_origins: CORS origins ('*' for any)."""
    app = FastAPI(title="w2s-engine", version=w2s_engine.__version__)
    engine = async_engine.engine
    names = [model_name] if isinstance(model_name, str) else list(model_name)
    tokenizer = engine.large_tokenizer           # None: a black-box large model
    default_method = "cbs" if engine.has_scorer else "base"
    if max_prompt_chars is None:
        context = engine.max_prompt_tokens
        max_prompt_chars = CHARS_PER_TOKEN * context if context else max_body_bytes
    app.add_middleware(Guard, metrics=async_engine.metrics, max_body_bytes=max_body_bytes,
                       allowed_hosts=allowed_hosts, api_key=api_key)
    if allowed_origins:   # outside the Guard: a preflight carries no API key
        app.add_middleware(CORSMiddleware, allow_origins=list(allowed_origins),
                           allow_methods=["*"], allow_headers=["*"],
                           expose_headers=["X-Request-Id"])

    @app.exception_handler(RequestError)
    async def request_error(request, exc: RequestError):
        return _error(exc.status, exc.message, exc.param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            message = (f"no route {request.method} {request.url.path[:100]}: this server serves "
                       f"{ROUTES}")
        elif exc.status_code == 405:
            message = (f"method {request.method} is not allowed on {request.url.path}: use "
                       f"{exc.headers.get('Allow', 'another method') if exc.headers else 'another'}")
        else:
            message = str(exc.detail)
        return _error(exc.status_code, message, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc: RequestValidationError):
        errors = exc.errors()
        where = ".".join(str(p) for p in errors[0]["loc"] if p != "body") if errors else None
        return _error(400, f"{where or 'body'}: {errors[0]['msg'] if errors else 'invalid'}",
                      where or None)

    @app.exception_handler(Exception)
    async def server_error(request, exc: Exception):
        log.error("request %s: internal error", request.state.request_id,
                  exc_info=(type(exc), exc, exc.__traceback__))
        return _error(500, f"internal error: {type(exc).__name__}: {exc}")

    def check_model(model: str | None):
        if model is not None and model not in names:
            raise RequestError(404, f"The model `{model[:100]}` does not exist: this server "
                                    f"serves {', '.join(names)}", "model")

    async def token_prompt(ids: list[int]) -> str:
        """A prompt of token ids, as the large model's text (it re-tokenizes it under its
        template, as the small models do)."""
        if tokenizer is None:
            raise RequestError(400, "prompt: token ids need the large model's tokenizer, and "
                                    "the large model here is a black box: send text", "prompt")
        vocab = len(tokenizer)
        bad = next((i for i, t in enumerate(ids) if not 0 <= t < vocab), None)
        if bad is not None:
            raise RequestError(400, f"prompt.{bad}: token id {ids[bad]} is outside the large "
                                    f"model's vocabulary [0, {vocab})", f"prompt.{bad}")
        text = await asyncio.get_running_loop().run_in_executor(
            None, lambda: tokenizer.decode(ids, skip_special_tokens=True))
        if not text:
            raise RequestError(400, "prompt: the token ids decode to no text", "prompt")
        return text

    async def generate(request: Request, body, chat: bool):
        state = request.state
        check_model(body.model)
        plan = body.plan(default_method, engine.has_scorer, tokenizer is not None)
        field = "messages" if chat else "prompt"
        if body.prompt_chars > max_prompt_chars:
            raise RequestError(400, f"{field}: {body.prompt_chars} characters, past this "
                                    f"server's limit of {max_prompt_chars} (--max-prompt-chars):"
                                    " send a shorter prompt", field)
        prompt = body.the_prompt()
        if isinstance(prompt, list) and not chat:
            prompt = await token_prompt(prompt)
        state.method, state.user = plan.params.method, body.user
        try:
            handle = await async_engine.submit(
                prompt, plan.params, label=state.request_id, arrived=state.arrived,
                prepare=lambda req: setattr(req, "logprobs", plan.logprobs))
        except (ValueError, TypeError) as e:
            raise param_error(e, field, plan.names) from None
        except QueueFull as e:
            return _error(429, str(e), headers={"Retry-After": "1"})
        answer = Answer(chat, names[0], state.request_id, plan,
                        prompt if plan.echo and isinstance(prompt, str) else "")
        if plan.stream:
            return StreamingResponse(stream(request, handle, answer),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        result = await wait_for(request, handle)
        if not isinstance(result, SearchResult):
            return result
        state.tokens = (result.stats.prompt_tokens, _usage(result, plan.n)["completion_tokens"])
        return answer.whole(result, tokenizer)

    async def wait_for(request: Request, handle):
        """The search's result, or the response that answers the request instead."""
        task = asyncio.ensure_future(handle.result())
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=0.25)
                if done:
                    return task.result()
                if await request.is_disconnected():
                    request.state.outcome = "cancelled"
                    return _error(499, "the client closed the request")
        except SearchFailed as e:
            return _error(500, f"the search failed: {e}")
        finally:
            task.cancel()
            handle.cancel()

    async def stream(request: Request, handle, answer: Answer):
        """Server-sent events: the chunks, then [DONE]. Leaving early (the client went away)
        cancels the search."""
        state = request.state
        ended = False
        try:
            for chunk in answer.opening():
                yield chunk
            while not handle.ended:
                deltas = await handle.next_batch()
                for chunk in answer.step(deltas):
                    yield chunk
                result = next((d.result for d in deltas if d.result is not None), None)
                if result is not None:
                    state.tokens = (result.stats.prompt_tokens,
                                    _usage(result, answer.plan.n)["completion_tokens"])
            ended = True
        except SearchFailed as e:
            state.outcome = "failed"
            ended = True
            yield f"data: {json.dumps(_envelope(500, f'the search failed: {e}'))}\n\n"
        finally:
            handle.cancel()
            if not ended:
                state.outcome = "cancelled"
        yield "data: [DONE]\n\n"

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, parse_body(await request.body(), CompletionRequest), False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        # Each model renders the messages with its own chat template when the engine runs
        # with chat=True; otherwise the messages become a plain transcript its template wraps.
        return await generate(request, parse_body(await request.body(), ChatCompletionRequest),
                              True)

    def model_card(name: str) -> dict:
        return {"id": name, "object": "model", "created": 0, "owned_by": "w2s-engine"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card(n) for n in names]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        check_model(model_id)
        return model_card(model_id)

    @app.get("/health")
    async def health():
        alive = async_engine.is_alive()
        return JSONResponse({"status": "ok" if alive else "engine loop stopped"},
                            status_code=200 if alive else 503)

    @app.get("/metrics")
    async def metrics():
        return Response(async_engine.metrics.text(), media_type=CONTENT_TYPE_LATEST)

    return app


def serve(args):
    """`w2s serve`: load the models, start the engine loop and uvicorn."""
    import os

    import uvicorn

    from w2s_engine.launch import engine_from_args, remote_model_name
    engine = engine_from_args(args, need_small=bool(args.tuned or args.untuned),
                              max_waiting=args.max_queue, progress=False)
    async_engine = AsyncEngine(engine)
    hosts = (tuple(h.strip() for h in args.allowed_hosts.split(",") if h.strip())
             if args.allowed_hosts else default_allowed_hosts(args.host))
    origins = tuple(o.strip() for o in (args.allowed_origins or "").split(",") if o.strip())
    names = args.served_model_name or [remote_model_name(engine) or served_name(args.large)]
    api_key = args.api_key or os.environ.get("W2S_API_KEY") or None
    app = create_app(async_engine, model_name=names, max_body_bytes=args.max_body_bytes,
                     allowed_hosts=hosts, max_prompt_chars=args.max_prompt_chars,
                     api_key=api_key, allowed_origins=origins)
    log.info("serving %s on http://%s:%d/v1 (%s; API key %s; CORS origins: %s)",
             ", ".join(names), args.host, args.port,
             "search" if engine.has_scorer else "the large model alone",
             "required" if api_key else "off", ", ".join(origins) or "none")
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level.lower(),
                    access_log=False, log_config=None)
    finally:
        async_engine.shutdown()
