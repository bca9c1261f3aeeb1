"""OpenAI-compatible HTTP server over one engine: `w2s serve`.

POST /v1/completions, POST /v1/chat/completions (the search is picked with extra body fields:
method, w, k, l, beta, top_k), GET /v1/models, GET /health, GET /metrics (Prometheus text).
Every handler awaits its search on the shared engine loop, so concurrent requests are batched
together; a client that disconnects cancels its search and frees its KV blocks; past the
queue bound a request gets 429 with Retry-After.
"""

import asyncio
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse

from w2s_engine.scheduler import QueueFull
from w2s_engine.serve.async_engine import AsyncEngine
from w2s_engine.serve.protocol import ChatCompletionRequest, CompletionRequest

DEFAULT_MAX_TOKENS = 64


def _error(status: int, message: str, param: str | None = None, headers=None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param,
                                   "code": status}}, status_code=status, headers=headers)


def create_app(async_engine: AsyncEngine, model_name: str = "w2s") -> FastAPI:
    app = FastAPI(title="w2s-engine", version="0.1.0")
    engine = async_engine.engine

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc: RequestValidationError):
        # One message naming the field(s), in OpenAI's error shape.
        errors = exc.errors()
        fields = [".".join(str(p) for p in e["loc"] if p != "body") or "body" for e in errors]
        detail = "; ".join(f"{f}: {e['msg']}" for f, e in zip(fields, errors))
        return _error(422 if errors and errors[0]["type"] != "json_invalid" else 400, detail,
                      fields[0] if fields else None)

    async def run_search(request: Request, prompt, body):
        try:
            params = body.params(DEFAULT_MAX_TOKENS, "cbs" if engine.has_small else "base")
            future, ticket = async_engine.submit(prompt, params)
            while True:
                done, _ = await asyncio.wait({future}, timeout=0.25)
                if done:
                    break
                if await request.is_disconnected():
                    async_engine.cancel(ticket)
                    return None
            return future.result()
        except QueueFull as e:
            return _error(429, str(e), headers={"Retry-After": "1"})
        except ValueError as e:
            field = next((f for f in ("w", "k", "l", "n", "max_tokens", "temperature", "top_p",
                                      "top_k", "seed", "stop", "method", "prompt", "messages")
                          if str(e).startswith(f"SearchParams.{f}")), None)
            return _error(400, str(e).replace("max_new_tokens", "max_tokens"), field)
        except asyncio.CancelledError:
            return None
        except RuntimeError as e:
            return _error(500, str(e))

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
    async def completions(body: CompletionRequest, request: Request):
        prompt = body.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                return _error(400, "prompt: one prompt per request (send several requests; "
                                   "they are batched together)", "prompt")
            prompt = prompt[0]
        result = await run_search(request, prompt, body)
        if not hasattr(result, "text"):
            return result
        usage, extra = usage_and_extra(result, body.n)
        return {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion",
                "created": int(time.time()), "model": body.model or model_name,
                "choices": [{"index": i, "text": h.text, "logprobs": None,
                             "finish_reason": h.finish_reason}
                            for i, h in enumerate(result.hypotheses[:body.n])],
                "usage": usage, "w2s": extra}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        # Each model renders the messages with its own chat template when the engine runs
        # with chat=True; otherwise the messages become a plain transcript its template wraps.
        messages = [m.model_dump() for m in body.messages]
        result = await run_search(request, messages, body)
        if not hasattr(result, "text"):
            return result
        usage, extra = usage_and_extra(result)
        return {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion",
                "created": int(time.time()), "model": body.model or model_name,
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
        lines = [
            "# TYPE w2s_requests_total counter", f"w2s_requests_total {m.requests}",
            "# TYPE w2s_requests_finished_total counter", f"w2s_requests_finished_total {m.finished}",
            "# TYPE w2s_requests_failed_total counter", f"w2s_requests_failed_total {m.failed}",
            "# TYPE w2s_requests_cancelled_total counter", f"w2s_requests_cancelled_total {m.cancelled}",
            "# TYPE w2s_requests_rejected_total counter", f"w2s_requests_rejected_total {m.rejected}",
            "# TYPE w2s_requests_running gauge", f"w2s_requests_running {snap['running']}",
            "# TYPE w2s_queue_length gauge", f"w2s_queue_length {snap['waiting']}",
            "# TYPE w2s_engine_steps_total counter", f"w2s_engine_steps_total {m.steps}",
            "# TYPE w2s_batched_steps_total counter", f"w2s_batched_steps_total {m.batched_steps}",
            "# TYPE w2s_max_running_requests gauge", f"w2s_max_running_requests {m.max_running}",
            "# TYPE w2s_kv_blocks_total gauge", f"w2s_kv_blocks_total {snap['kv_blocks_total']}",
            "# TYPE w2s_kv_blocks_used gauge",
        ]
        lines += [f'w2s_kv_blocks_used{{model="{k}"}} {v}' for k, v in snap["kv_blocks_used"].items()]
        lines.append("# TYPE w2s_tokens_forwarded_total counter")
        lines += [f'w2s_tokens_forwarded_total{{model="{k}"}} {v}' for k, v in snap["tokens"].items()]
        return PlainTextResponse("\n".join(lines) + "\n")

    return app


def serve(args):
    """`w2s serve`: load the models, start the engine loop and uvicorn."""
    import uvicorn

    from w2s_engine.launch import engine_from_args
    engine = engine_from_args(args, need_small=bool(args.tuned or args.untuned),
                              max_waiting=args.max_queue, progress=False)
    async_engine = AsyncEngine(engine)
    app = create_app(async_engine, model_name=args.large)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    finally:
        async_engine.shutdown()
