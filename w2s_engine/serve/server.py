"""OpenAI-compatible HTTP server over one engine: `w2s serve`.

POST /v1/completions, POST /v1/chat/completions (the search is picked with extra body fields:
method, w, k, l, beta, top_k), GET /v1/models, GET /health, GET /metrics (Prometheus text).
Every handler awaits its search on the shared engine loop, so concurrent requests are batched
together; a client that disconnects cancels its search and frees its KV blocks; past the
queue bound (requests waiting for KV memory) a request gets 429 with Retry-After.

Hostile input hurts nobody else: the Host header is checked (DNS rebinding), the body is
bounded (413 past --max-body-bytes) and parsed strictly (serve/protocol.py), a prompt is
bounded in characters before it is tokenized, and tokenizing runs off the engine thread.
Every error is in OpenAI's envelope {"error": {"message", "type", "param", "code"}}.
"""

import asyncio
import time
import uuid
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from w2s_engine.outputs import SearchResult
from w2s_engine.scheduler import QueueFull
from w2s_engine.serve.async_engine import AsyncEngine, Metrics, SearchFailed
from w2s_engine.serve.protocol import (ChatCompletionRequest, CompletionRequest, RequestError,
                                       param_error, parse_body)

DEFAULT_MAX_TOKENS = 64
DEFAULT_MAX_BODY_BYTES = 1 << 20
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")
CHARS_PER_TOKEN = 32   # a prompt longer than this many characters per context token cannot fit


def _text(value: str | None) -> str | None:
    """Encodable as UTF-8: a lone surrogate echoed from the request becomes '\\ud800'."""
    if value is None or value.isascii():
        return value
    return value.encode("utf-8", "backslashreplace").decode("utf-8")


def _error(status: int, message: str, param: str | None = None, headers=None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": _text(message), "type": kind, "param": _text(param),
                                   "code": status}}, status_code=status, headers=headers)


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


class Guard:
    """Pure ASGI middleware in front of the app: the Host check, the body limit, and the
    outcome of every generation request (exactly one of Metrics' outcomes)."""

    def __init__(self, app, metrics: Metrics, max_body_bytes: int, allowed_hosts):
        self.app = app
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self.allowed_hosts = tuple(allowed_hosts)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        counted = scope["method"] == "POST" and scope["path"] in GENERATION_PATHS
        if counted:
            self.metrics.arrived()
        status, outcome = 500, None
        state = scope.setdefault("state", {})

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            outcome = await self._serve(scope, receive, send_status, state)
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        except Exception:
            outcome = "failed"
            raise
        finally:
            if counted:
                outcome = outcome or state.get("outcome") or (
                    "finished" if status < 400 else "failed" if status >= 500 else "rejected")
                self.metrics.ended(outcome, state.get("reason") or
                                   {413: "too_large", 429: "queue_full"}.get(status))

    async def _serve(self, scope, receive, send, state) -> str | None:
        """Serve the request; returns an outcome decided here (None: from the response)."""
        headers = dict(scope.get("headers") or [])
        host = headers.get(b"host", b"").decode("latin-1")
        if not host_allowed(host, self.allowed_hosts):
            state["reason"] = "host"
            await _error(400, f"Host header {host[:100]!r} is not allowed: this server answers "
                              f"to {', '.join(self.allowed_hosts)} (start it with "
                              "--allowed-hosts NAME to add one)")(scope, receive, send)
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


def create_app(async_engine: AsyncEngine, model_name: str = "w2s", *,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, allowed_hosts=LOOPBACK_HOSTS,
               max_prompt_chars: int | None = None) -> FastAPI:
    """max_prompt_chars: None: CHARS_PER_TOKEN characters per token of the smallest context."""
    app = FastAPI(title="w2s-engine", version="0.1.0")
    engine = async_engine.engine
    if max_prompt_chars is None:
        context = engine.max_prompt_tokens
        max_prompt_chars = CHARS_PER_TOKEN * context if context else max_body_bytes
    app.add_middleware(Guard, metrics=async_engine.metrics, max_body_bytes=max_body_bytes,
                       allowed_hosts=allowed_hosts)

    @app.exception_handler(RequestError)
    async def request_error(request, exc: RequestError):
        return _error(exc.status, exc.message, exc.param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            message = (f"no route {request.method} {request.url.path[:100]}: this server serves "
                       "POST /v1/completions, POST /v1/chat/completions, GET /v1/models, "
                       "GET /health, GET /metrics")
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
        return _error(500, f"internal error: {type(exc).__name__}: {exc}")

    async def run_search(request: Request, body, prompt, prompt_field: str):
        """The search's result, or the response that answers the request instead."""
        if body.prompt_chars > max_prompt_chars:
            raise RequestError(400, f"{prompt_field}: {body.prompt_chars} characters, past this "
                                    f"server's limit of {max_prompt_chars} (--max-prompt-chars):"
                                    " send a shorter prompt", prompt_field)
        try:
            params = body.params(DEFAULT_MAX_TOKENS, "cbs" if engine.has_scorer else "base")
            future, ticket = await async_engine.submit(prompt, params)
        except (ValueError, TypeError) as e:
            raise param_error(e, prompt_field) from None
        try:
            while True:
                done, _ = await asyncio.wait({future}, timeout=0.25)
                if done:
                    return future.result()
                if await request.is_disconnected():
                    async_engine.cancel(ticket)
                    request.state.outcome = "cancelled"
                    return _error(499, "the client closed the request")
        except asyncio.CancelledError:
            async_engine.cancel(ticket)
            raise
        except QueueFull as e:
            return _error(429, str(e), headers={"Retry-After": "1"})
        except SearchFailed as e:
            return _error(500, f"the search failed: {e}")

    def usage_and_extra(result, n=1):
        prompt_tokens = result.stats.prompt_tokens
        completion = sum(len(h.token_ids) for h in result.hypotheses[:n])
        return ({"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                 "total_tokens": prompt_tokens + completion},
                {"reward": result.reward, "finish_reason": result.finish_reason,
                 "hypotheses": [{"text": h.text, "reward": h.reward, "finished": h.finished,
                                 "finish_reason": h.finish_reason} for h in result.hypotheses],
                 "stats": {"tokens_forwarded": result.stats.tokens_forwarded,
                           "tokens_sampled": result.stats.tokens_sampled,
                           "peak_kv_blocks": result.stats.peak_kv_blocks,
                           "chunks": result.stats.chunks, "seconds": result.stats.seconds}})

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = parse_body(await request.body(), CompletionRequest)
        result = await run_search(request, body, body.the_prompt(), "prompt")
        if not isinstance(result, SearchResult):
            return result
        usage, extra = usage_and_extra(result, body.n)
        return {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion",
                "created": int(time.time()), "model": model_name,
                "choices": [{"index": i, "text": h.text, "logprobs": None,
                             "finish_reason": h.finish_reason}
                            for i, h in enumerate(result.hypotheses[:body.n])],
                "usage": usage, "w2s": extra}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        # Each model renders the messages with its own chat template when the engine runs
        # with chat=True; otherwise the messages become a plain transcript its template wraps.
        body = parse_body(await request.body(), ChatCompletionRequest)
        result = await run_search(request, body, body.the_prompt(), "messages")
        if not isinstance(result, SearchResult):
            return result
        usage, extra = usage_and_extra(result)
        return {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion",
                "created": int(time.time()), "model": model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                             "finish_reason": result.finish_reason}],
                "usage": usage, "w2s": extra}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model",
                                            "created": 0, "owned_by": "w2s-engine"}]}

    @app.get("/health")
    async def health():
        alive = async_engine.is_alive()
        return JSONResponse({"status": "ok" if alive else "engine loop stopped"},
                            status_code=200 if alive else 503)

    @app.get("/metrics")
    async def metrics():
        snap = async_engine.snapshot()
        m = snap["metrics"]
        lines = []

        def metric(name, kind, value, help_text):
            lines.extend([f"# HELP {name} {help_text}", f"# TYPE {name} {kind}",
                          f"{name} {value}"])
        metric("w2s_requests_total", "counter", m.requests,
               "generation requests received; each ends in exactly one outcome below")
        metric("w2s_requests_finished_total", "counter", m.finished, "answered 200")
        metric("w2s_requests_failed_total", "counter", m.failed, "answered 5xx")
        metric("w2s_requests_cancelled_total", "counter", m.cancelled, "the client went away")
        metric("w2s_requests_rejected_total", "counter", m.rejected,
               "answered 4xx: invalid, too large, wrong host, queue full")
        lines.append("# TYPE w2s_requests_rejected_by_reason_total counter")
        lines += [f'w2s_requests_rejected_by_reason_total{{reason="{k}"}} {v}'
                  for k, v in sorted(m.rejected_by.items())]
        metric("w2s_requests_in_flight", "gauge", m.in_flight, "received, not yet ended")
        metric("w2s_requests_running", "gauge", snap["running"], "searches in the engine")
        metric("w2s_queue_length", "gauge", snap["waiting"], "searches waiting for KV memory")
        metric("w2s_engine_steps_total", "counter", m.steps, "engine steps")
        metric("w2s_batched_steps_total", "counter", m.batched_steps,
               "steps that ran several requests")
        metric("w2s_max_running_requests", "gauge", m.max_running, "most requests in one step")
        metric("w2s_kv_blocks_total", "gauge", snap["kv_blocks_total"], "KV blocks per pool")
        lines.append("# TYPE w2s_kv_blocks_used gauge")
        lines += [f'w2s_kv_blocks_used{{model="{k}"}} {v}' for k, v in snap["kv_blocks_used"].items()]
        lines.append("# TYPE w2s_tokens_forwarded_total counter")
        lines += [f'w2s_tokens_forwarded_total{{model="{k}"}} {v}' for k, v in snap["tokens"].items()]
        return PlainTextResponse("\n".join(lines) + "\n")

    return app


def parse_metrics(text: str) -> dict[str, float]:
    """/metrics' text -> {'name{labels}': value} (for tests, benchmarks and scripts)."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def default_allowed_hosts(bind_host: str) -> tuple[str, ...]:
    """Bound to loopback: the loopback names only (a DNS-rebinding page cannot reach it);
    bound elsewhere: any Host (the names it is reached by are not known here)."""
    return LOOPBACK_HOSTS if _host_name(bind_host) in LOOPBACK_HOSTS else ("*",)


def serve(args):
    """`w2s serve`: load the models, start the engine loop and uvicorn."""
    import uvicorn

    from w2s_engine.launch import engine_from_args
    engine = engine_from_args(args, need_small=bool(args.tuned or args.untuned),
                              max_waiting=args.max_queue, progress=False)
    async_engine = AsyncEngine(engine)
    hosts = (tuple(h.strip() for h in args.allowed_hosts.split(",") if h.strip())
             if args.allowed_hosts else default_allowed_hosts(args.host))
    app = create_app(async_engine, model_name=args.served_model_name or served_name(args.large),
                     max_body_bytes=args.max_body_bytes, allowed_hosts=hosts,
                     max_prompt_chars=args.max_prompt_chars)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    finally:
        async_engine.shutdown()
