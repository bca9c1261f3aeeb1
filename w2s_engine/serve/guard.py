"""Guard: what every request meets before a route, as one ASGI middleware.

- the Host header is checked (a DNS-rebinding page cannot reach a loopback server);
- Bearer auth with the API key on every route but /health, compared in constant time;
- a body must be JSON (415 for a form or text/plain, which a browser may send cross-site
  without a CORS preflight) and is bounded (413 past max_body_bytes, the rest read and
  dropped so that the client gets its answer), and must arrive whole within body_timeout
  seconds of the request (408 and the connection closed: a client that sends half a body
  and waits would otherwise hold its connection and handler for ever);
- an X-Request-Id is echoed or made, and one access-log line is written per request (logger
  `w2s_engine.access`) with its id, method, path, status, tokens and seconds; generation
  requests are counted by outcome in the metrics.
Every refusal is in OpenAI's error envelope (`error_response`).
"""

import asyncio
import hmac
import json
import logging
import time
import uuid

from fastapi.responses import JSONResponse

from w2s_engine.serve.metrics import ServerMetrics

access_log = logging.getLogger("w2s_engine.access")

DEFAULT_MAX_BODY_BYTES = 1 << 20
DEFAULT_BODY_TIMEOUT = 60.0           # seconds from a request's headers to its body's end
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/responses")
# The routes whose body is a JSON object (the others are refused by routing first)
JSON_BODY_PATHS = GENERATION_PATHS + ("/v1/score", "/score", "/v1/rerank", "/rerank",
                                      "/tokenize", "/detokenize")
OPEN_PATHS = ("/health",)             # answered without the API key
REASONS = {401: "auth", 404: "model", 408: "body_timeout", 413: "too_large",
           415: "content_type", 429: "queue_full"}


def _text(value: str | None) -> str | None:
    """Encodable as UTF-8: a lone surrogate echoed from the request becomes '\\ud800'."""
    if value is None or value.isascii():
        return value
    return value.encode("utf-8", "backslashreplace").decode("utf-8")


def envelope(status: int, message: str, param: str | None = None) -> dict:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": _text(message), "type": kind, "param": _text(param),
                      "code": status}}


def error_response(status: int, message: str, param: str | None = None, headers=None) -> JSONResponse:
    return JSONResponse(envelope(status, message, param), status_code=status, headers=headers)


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
                 api_key: str | None = None, body_timeout: float = DEFAULT_BODY_TIMEOUT):
        self.app = app
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        assert body_timeout > 0, "a body_timeout of 0 would cut every body, even a whole one"
        self.body_timeout = body_timeout
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
                self.metrics.ended(outcome, state.get("reason") or REASONS.get(status), seconds,
                                   state.get("tokens"))
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
            await error_response(400, f"Host header {host[:100]!r} is not allowed: this server answers "
                              f"to {', '.join(self.allowed_hosts)} (start it with "
                              "--allowed-hosts NAME to add one)")(scope, receive, send)
            return None
        if self.api_key is not None and scope["path"] not in OPEN_PATHS and \
                not self._authorized(headers):
            given = headers.get(b"authorization")
            await error_response(401, "this server needs an API key: send the header 'Authorization: "
                              "Bearer <key>'" if not given else
                              "the API key in the Authorization header is not this server's",
                         headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
            return None
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return None
        kind = headers.get(b"content-type", b"").decode("latin-1")
        if scope["path"] in JSON_BODY_PATHS and not json_content_type(kind):
            # A browser sends a form or text/plain cross-site without asking first (CORS's
            # simple requests): only JSON bodies are read, as FastAPI's body models do.
            await error_response(415, f"Content-Type {kind[:100]!r}: the body must be JSON; send "
                                      "the header 'Content-Type: application/json'")(
                scope, receive, send)
            return None
        # Read the whole body here, at most max_body_bytes of it; the app reads it from memory.
        limit = self.max_body_bytes
        length = headers.get(b"content-length", b"").decode("latin-1")
        too_large = length.isdigit() and int(length) > limit
        chunks, size, more = [], 0, True
        deadline = state["arrived"] + self.body_timeout
        while more:
            try:
                message = await asyncio.wait_for(receive(), deadline - time.perf_counter())
            except TimeoutError:
                state["reason"] = "body_timeout"
                await error_response(408, f"the request body did not arrive within "
                                          f"{self.body_timeout:g} s of its headers "
                                          "(--body-timeout): send the whole body at once",
                                     headers={"Connection": "close"})(scope, receive, send)
                return None
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
            await error_response(413, f"the request body is larger than this server's limit of {limit} "
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


def json_content_type(value: str) -> bool:
    """A body's Content-Type is JSON: absent, application/json or application/*+json (with
    any parameters, such as charset)."""
    kind = value.split(";")[0].strip().lower()
    return kind in ("", "application/json") or (kind.startswith("application/")
                                                and kind.endswith("+json"))


def default_allowed_hosts(bind_host: str) -> tuple[str, ...]:
    """Bound to loopback: the loopback names only (a DNS-rebinding page cannot reach it);
    bound elsewhere: any Host (the names it is reached by are not known here)."""
    return LOOPBACK_HOSTS if _host_name(bind_host) in LOOPBACK_HOSTS else ("*",)
