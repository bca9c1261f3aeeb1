"""OpenAI-compatible HTTP server over one engine: `w2s serve`.

POST /v1/completions, POST /v1/chat/completions (the search is picked with extra body fields:
method, w, k, l, beta, top_k), POST /v1/score and /score (vLLM's score API: the scorer's reward
of given responses; POST /v1/rerank and /rerank ranks them), POST /tokenize and /detokenize
(vLLM's: the large model's tokens), GET /v1/models, GET /v1/models/{id}, GET /version, GET
/health, GET /metrics (Prometheus). Every handler awaits its search on the shared engine loop,
so concurrent requests are batched together; a list of prompts in one completions request runs
as that many searches, answered as OpenAI does (prompt i's choices at i * n ... i * n + n - 1).
`stream=true` sends the text that became final at each engine step as server-sent events in
OpenAI's chunk format (search/stream.py says what is final); a client that disconnects
cancels its searches and frees their KV blocks; past the queue bound (requests waiting for KV
memory) a request gets 429 with Retry-After.

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
import json
import logging
import re
import time
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware

import w2s_engine

from w2s_engine.frozen_heap import freeze_loaded_objects
from w2s_engine.outputs import SearchResult
from w2s_engine.scheduler import QueueFull
from w2s_engine.search.request import FailedBy, best_first
from w2s_engine.serve.answers import Answer, combine, sum_usage, usage
from w2s_engine.serve.async_engine import AsyncEngine, FirstText, SearchFailed
from w2s_engine.serve.finite_json import FiniteJSONResponse
from w2s_engine.serve.responses_api import ResponseShape, ResponsesRequest
from w2s_engine.serve.guard import (DEFAULT_BODY_TIMEOUT, DEFAULT_MAX_BODY_BYTES, LOOPBACK_HOSTS,
                                    Guard, default_allowed_hosts, envelope, error_response)
from w2s_engine.serve.metrics import ServerMetrics, parse_metrics  # noqa: F401 (re-exported)
from w2s_engine.serve.protocol import (ChatCompletionRequest, CompletionRequest,
                                       DetokenizeRequest, RequestError, RerankRequest,
                                       ScoreRequest, TokenizeRequest, param_error, parse_body)

log = logging.getLogger("w2s_engine.serve")

CHARS_PER_TOKEN = 32   # a prompt longer than this many characters per context token cannot fit
ROUTES = ("POST /v1/completions, POST /v1/chat/completions, POST /v1/responses, "
          "POST /v1/score, POST /score, "
          "POST /v1/rerank, POST /rerank, POST /tokenize, POST /detokenize, GET /v1/models, "
          "GET /v1/models/{id}, GET /version, GET /health, GET /metrics")


def served_name(spec) -> str:
    """The public model name for a model spec: never a local path (its base name instead)."""
    spec = str(spec)
    path = Path(spec).expanduser()
    if spec.startswith((".", "/", "~")) or path.exists():
        return path.stem if path.suffix == ".gguf" else path.name
    return spec   # a bundled name or a hub id


# A failed search's status: an error inside the engine (500), the black-box large model's
# server failing or answering something unusable (502, as a gateway answers), or that server
# refusing the request as invalid, a prompt past its context say (400: the sender's to change),
# or the shutdown ending it, queued or running (503: another server may take it).
FAILED_STATUS = {FailedBy.ENGINE: 500, FailedBy.LARGE_SERVER: 502, FailedBy.REQUEST: 400,
                 FailedBy.SHUTDOWN: 503}


def failed_status(e: SearchFailed) -> int:
    """A failed search's status; 503 for one the server's shutdown ended (queued or running)."""
    return FAILED_STATUS[e.by]


# ---- the app ----------------------------------------------------------------------------------

def create_app(async_engine: AsyncEngine, model_name="w2s", *,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, allowed_hosts=LOOPBACK_HOSTS,
               max_prompt_chars: int | None = None, api_key: str | None = None,
               allowed_origins=(), body_timeout: float = DEFAULT_BODY_TIMEOUT,
               root: str | None = None) -> FastAPI:
    """model_name: the served name, or several (the first in responses; a request may name
    any). root: the model the names serve, /v1/models' `root` as in vLLM's (a hub id, or a
    local path's base name, never the path; None: the first name). max_prompt_chars: None:
    CHARS_PER_TOKEN characters per token of the smallest context. api_key: None: no auth.
    allowed_origins: CORS origins ('*' for any)."""
    app = FastAPI(title="w2s-engine", version=w2s_engine.__version__,
                  default_response_class=FiniteJSONResponse)
    engine = async_engine.engine
    names = [model_name] if isinstance(model_name, str) else list(model_name)
    tokenizer = engine.large_tokenizer           # None: a black-box large model
    default_method = "cbs" if engine.has_scorer else "base"
    started = int(time.time())     # the models' "created": when this server began serving them
    if max_prompt_chars is None:
        context = engine.max_prompt_tokens
        max_prompt_chars = CHARS_PER_TOKEN * context if context else max_body_bytes
    app.add_middleware(Guard, metrics=async_engine.metrics, max_body_bytes=max_body_bytes,
                       allowed_hosts=allowed_hosts, api_key=api_key, body_timeout=body_timeout)
    if allowed_origins:   # outside the Guard: a preflight carries no API key
        app.add_middleware(CORSMiddleware, allow_origins=list(allowed_origins),
                           allow_methods=["*"], allow_headers=["*"],
                           expose_headers=["X-Request-Id"])

    @app.exception_handler(RequestError)
    async def requesterror_response(request, exc: RequestError):
        return error_response(exc.status, exc.message, exc.param)

    @app.exception_handler(StarletteHTTPException)
    async def httperror_response(request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            message = (f"no route {request.method} {request.url.path[:100]}: this server serves "
                       f"{ROUTES}")
        elif exc.status_code == 405:
            message = (f"method {request.method} is not allowed on {request.url.path}: use "
                       f"{exc.headers.get('Allow', 'another method') if exc.headers else 'another'}")
        else:
            message = str(exc.detail)
        return error_response(exc.status_code, message, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validationerror_response(request, exc: RequestValidationError):
        errors = exc.errors()
        where = ".".join(str(p) for p in errors[0]["loc"] if p != "body") if errors else None
        return error_response(400, f"{where or 'body'}: {errors[0]['msg'] if errors else 'invalid'}",
                      where or None)

    @app.exception_handler(Exception)
    async def servererror_response(request, exc: Exception):
        log.error("request %s: internal error", request.state.request_id,
                  exc_info=(type(exc), exc, exc.__traceback__))
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}")

    def check_model(model: str | None):
        if model is not None and model not in names:
            raise RequestError(404, f"The model `{model[:100]}` does not exist: this server "
                                    f"serves {', '.join(names)}", "model")

    async def token_prompt(ids: list[int], where: str = "prompt") -> tuple[str, list | None]:
        """A prompt of token ids: (its text, the ids). The large model reads the ids as they
        are where its template is '{prompt}' (else the template wraps their text, and the ids
        are None); the small models read the text, special tokens left out."""
        if tokenizer is None:
            raise RequestError(400, f"{where}: token ids need the large model's tokenizer, and "
                                    "the large model here is a black box: send text", where)
        vocab = len(tokenizer)
        bad = next((i for i, t in enumerate(ids) if not 0 <= t < vocab), None)
        if bad is not None:
            raise RequestError(400, f"{where}.{bad}: token id {ids[bad]} is outside the large "
                                    f"model's vocabulary [0, {vocab})", f"{where}.{bad}")
        as_is = engine.templates["large"].rendered_as(False).is_identity
        # Ids of special tokens alone (a BOS) have no plain text: their text is the tokens'.
        text = await asyncio.get_running_loop().run_in_executor(
            None, lambda: tokenizer.decode(ids, skip_special_tokens=True)
            or (tokenizer.decode(ids) if as_is else ""))
        if not text:
            raise RequestError(400, f"{where}: the token ids decode to no text", where)
        return text, ids if as_is else None

    async def generate(request: Request, body, chat: bool, prompt_field: str | None = None,
                       shape: ResponseShape | None = None):
        """A completion or chat completion; prompt_field: what errors call the prompt
        (default: messages or prompt); shape: the Responses API's answer instead."""
        state = request.state
        check_model(body.model)
        plan = body.plan(default_method, engine.has_scorer, tokenizer is not None)
        field = prompt_field or ("messages" if chat else "prompt")
        chars = body.prompt_chars()
        long = next((i for i, n in enumerate(chars) if n > max_prompt_chars), None)
        if long is not None:
            where = field if len(chars) == 1 else f"{field}.{long}"
            raise RequestError(400, f"{where}: {chars[long]} characters, past this server's "
                                    f"limit of {max_prompt_chars} a prompt "
                                    "(--max-prompt-chars): send a shorter prompt", where)
        # vLLM's add_special_tokens: what the engine does is fixed by the template in effect
        # (a chat template holds its own BOS; a text prompt gets the tokenizer's).
        special = not (chat and engine.templates["large"].chat)
        asked = (body.model_extra or {}).get("add_special_tokens")
        if asked is not None and asked is not special:
            raise RequestError(400, f"add_special_tokens: not supported by this server at "
                                    f"{str(asked).lower()}; leave it out or send "
                                    f"{str(special).lower()} (what this endpoint does here)",
                               "add_special_tokens")
        prompts = body.the_prompts()
        ids = [None] * len(prompts)
        if not chat:
            where = (lambda i: field) if len(prompts) == 1 else (lambda i: f"{field}.{i}")
            for i, p in enumerate(prompts):
                if isinstance(p, list):
                    prompts[i], ids[i] = await token_prompt(p, where(i))
        state.method, state.user = plan.params.method, body.user
        prepared, handles = [], []
        first_text = FirstText()       # time to first token: once for the whole request
        try:
            # Every prompt prepared before any is queued: a bad one starts none of them.
            # Completions' prompts are text: no chat template, as OpenAI's API and vLLM.
            for i, prompt in enumerate(prompts):
                prepared.append(await async_engine.prepare_request(
                    prompt, plan.params, chat=None if chat else False, prompt_ids=ids[i],
                    continue_final_message=plan.continue_final, logprobs=plan.logprobs,
                    chat_template_kwargs=body.chat_template_kwargs if chat else None,
                    fit_max_new_tokens=plan.fit_max_tokens))
            for i, req in enumerate(prepared):
                label = state.request_id if len(prompts) == 1 else f"{state.request_id}/{i}"
                # The queue bound is the request's: once its first prompt is taken, the
                # others follow past it (a list longer than the bound is never refused for
                # ever with 429s no retry can pass).
                handles.append(await async_engine.queue(req, label, state.arrived,
                                                        past_bound=i > 0,
                                                        first_text=first_text))
        except (ValueError, TypeError, QueueFull, SearchFailed) as e:
            for h in handles:   # one prompt refused: the request starts nothing
                h.cancel()
            if isinstance(e, QueueFull):
                return error_response(429, str(e), headers={"Retry-After": "1"})
            if isinstance(e, SearchFailed):   # shutting down, or the engine refused it
                return error_response(failed_status(e), f"the search could not start: {e}")
            if len(prompts) == 1:
                raise param_error(e, field, plan.names) from None
            where = f"{field}.{len(prepared)}"   # which prompt it was
            error = param_error(e, where, plan.names)
            if error.param is None:
                error = RequestError(400, f"{where}: {error.message}", where)
            raise error from None
        # echo: the prompt as sent (token ids: the large model's text of them)
        answers = [Answer(chat, names[0], state.request_id, plan,
                          "" if not plan.echo else prompt if ids[i] is None
                          else h.request.large_prompt_text, first_index=i * plan.n)
                   for i, (prompt, h) in enumerate(zip(prompts, handles))]
        if plan.stream:
            events = stream(request, handles, answers)
            return StreamingResponse(events if shape is None else shape.events(events, handles),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        results = await wait_for(request, handles)
        if not isinstance(results, list):
            return results
        state.tokens = total_tokens(results, plan.n)
        def build():
            whole = combine([a.whole(r, tokenizer) for a, r in zip(answers, results)])
            return whole if shape is None else shape.whole(whole)
        if plan.logprobs is None:
            return build()
        # Log-probs: every token's and alternatives' strings (64 prompts x 4 choices x 256
        # tokens x 20 took seconds): built off the event loop, which serves everyone else.
        return await asyncio.to_thread(build)

    def total_tokens(results: list[SearchResult], n: int) -> tuple[int, int]:
        """(prompt, completion) tokens of a request's searches, for the access log."""
        return (sum(r.stats.prompt_tokens for r in results),
                sum(usage(r, n)["completion_tokens"] for r in results))

    async def unless_client_leaves(request: Request, awaitable):
        """The awaitable's result, or the 499 response once the client went away (it is
        cancelled then: its searches, or its score job at the next slice)."""
        task = asyncio.ensure_future(awaitable)
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=0.25)
                if done:
                    return task.result()
                if await request.is_disconnected():
                    request.state.outcome = "cancelled"
                    return error_response(499, "the client closed the request")
        finally:
            task.cancel()
            # A cancelled task ends with an exception no one awaits: read it (asyncio logs an
            # unread one as an error, and a client that leaves is no error).
            task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def wait_for(request: Request, handles):
        """The searches' results, or the response that answers the request instead."""
        try:
            return await unless_client_leaves(
                request, asyncio.gather(*(h.result() for h in handles)))
        except SearchFailed as e:
            return error_response(failed_status(e), f"the search failed: {e}")
        finally:
            for h in handles:
                h.cancel()

    async def stream(request: Request, handles, answers: list[Answer]):
        """Server-sent events: the chunks of every search as its steps come (several prompts
        interleave, each under its own choice indices; a prompt's opening, chat's role or
        echo's prompt, with its first text), the usage of all, then [DONE].
        Leaving early (the client went away) cancels the searches."""
        state = request.state
        plan = answers[0].plan
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int):
            try:
                while not handles[i].ended:
                    await queue.put((i, await handles[i].next_batch()))
            except SearchFailed as e:
                await queue.put((i, e))
            await queue.put((i, None))

        pumps = [asyncio.ensure_future(pump(i)) for i in range(len(handles))]
        results, open_streams, ended = {}, len(handles), False
        opened = set()   # the prompts whose opening chunks (chat's role, echo's prompt) went
        try:
            while open_streams:
                i, item = await queue.get()
                if item is None:
                    open_streams -= 1
                    continue
                if isinstance(item, SearchFailed):
                    state.outcome = "failed"
                    ended = True
                    failure = envelope(failed_status(item), f"the search failed: {item}")
                    yield f"data: {json.dumps(failure)}\n\n"
                    break
                result = next((d.result for d in item if d.result is not None), None)
                if i not in opened and (result is not None or any(d.text for d in item)):
                    # A prompt's opening goes with its first text (when the server's
                    # w2s_time_to_first_token_seconds is timed), not when the request is taken
                    # (vLLM too sends the role only once a token is out): benchmarks (vllm
                    # bench serve, ...) take the first chunk with choices for the first
                    # token, and a role chunk sent up front would make their time to first
                    # token the HTTP round trip, and a search that fails before any text a
                    # success.
                    opened.add(i)
                    for chunk in answers[i].opening():
                        yield chunk
                if result is None or plan.logprobs is None:
                    chunks = answers[i].step(item, tokenizer)
                else:   # the last step builds every choice's log-probs (seconds for many
                    # choices of many tokens): off the event loop, which serves everyone else
                    chunks = await asyncio.to_thread(answers[i].step, item, tokenizer)
                for chunk in chunks:
                    yield chunk
                if result is not None:
                    results[i] = result
            else:
                ended = True
                state.tokens = total_tokens(list(results.values()), plan.n)
                if plan.include_usage:
                    yield answers[0].chunk([], usage=sum_usage(
                        [usage(r, plan.n) for r in results.values()]))
        except Exception as e:
            # A bug past the headers: the 500 handler cannot answer any more (the status is
            # sent), and raising would cut the connection mid-body; say so as an error event,
            # then [DONE], as for a failed search.
            log.error("request %s: internal error mid-stream", state.request_id,
                      exc_info=(type(e), e, e.__traceback__))
            state.outcome, ended = "failed", True
            error = envelope(500, f"internal error: {type(e).__name__}: {e}")
            yield f"data: {json.dumps(error)}\n\n"
        finally:
            for p in pumps:
                p.cancel()
            for h in handles:
                h.cancel()
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

    @app.post("/v1/responses")
    async def responses(request: Request):
        # OpenAI's Responses API: the chat endpoint's search, answered as a Response object
        # or the Responses API's stream events (serve/responses_api.py).
        body = parse_body(await request.body(), ResponsesRequest)
        shape = ResponseShape(body, request.state.request_id, body.model or names[0])
        return await generate(request, body.chat(), True, "input", shape)

    async def rewards_of(request: Request, body, prompts, responses, finished, names_of):
        """The scorer's rewards and the tokens it read for them (Engine.score on the engine's
        thread, between two steps), the RequestError that says what to change, or the 499
        response answering a client that went away (its job stopped). names_of: (prompts'
        field, responses')."""
        check_model(body.model)
        if not engine.has_scorer:
            raise RequestError(400, "this server runs the large model alone: it has no scorer "
                                    "(the tuned and untuned small models, or reward models) to "
                                    "score with", "model")
        for name, texts in zip(names_of, (prompts, responses)):
            long = next((i for i, t in enumerate(texts) if len(t) > max_prompt_chars), None)
            if long is not None:
                where = name if name == "query" else f"{name}.{long}"
                raise RequestError(400, f"{where}: {len(texts[long])} characters, past this "
                                        f"server's limit of {max_prompt_chars} a text "
                                        "(--max-prompt-chars): send a shorter one", where)
        empty = next((i for i, t in enumerate(prompts) if not t), None)
        if empty is not None:   # (Engine.score would name it 'prompt', not where it is)
            where = names_of[0] if names_of[0] == "query" else f"{names_of[0]}.{empty}"
            raise RequestError(400, f"{where}: an empty text: send a prompt", where)
        request.state.method, request.state.user = "score", body.user
        # A client that goes away cancels the call, and its job stops at its next slice (it
        # would otherwise score hundreds of pairs for nobody, holding up the calls behind it).
        try:
            return await unless_client_leaves(
                request, async_engine.score_counted(prompts, responses, finished))
        except (ValueError, TypeError) as e:
            message = str(e).replace("responses[", f"{names_of[1]}[")
            one = re.match(rf"{names_of[1]}\[(\d+)\]", message)   # one pair named: the param
            raise RequestError(400, message, f"{names_of[1]}.{one[1]}" if one else None) from None

    async def score(request: Request):
        """vLLM's score API over the engine's scorer: each response's reward, as a search
        ranks its candidates."""
        body = parse_body(await request.body(), ScoreRequest)
        prompts, responses, finished = body.pairs()
        try:
            scored = await rewards_of(request, body, prompts, responses, finished,
                                      ("text_1", "text_2"))
        except SearchFailed as e:
            return error_response(failed_status(e), f"the scoring failed: {e}")
        if not isinstance(scored, tuple):      # the client went away
            return scored
        rewards, tokens = scored
        request.state.tokens = (tokens, 0)
        return {"id": f"score-{request.state.request_id}", "object": "list",
                "created": int(time.time()), "model": names[0],
                "data": [{"index": i, "object": "score", "score": r}
                         for i, r in enumerate(rewards)],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens,
                          "completion_tokens": 0}}

    async def rerank(request: Request):
        """vLLM's rerank API: the documents (responses) by the scorer's reward for the query
        (the prompt), best first (ties in the order sent); top_n of them."""
        body = parse_body(await request.body(), RerankRequest)
        body.check()
        docs = body.documents
        finished = True if body.finished is None else body.finished
        try:
            scored = await rewards_of(request, body, [body.query] * len(docs), docs,
                                      [finished] * len(docs), ("query", "documents"))
        except SearchFailed as e:
            return error_response(failed_status(e), f"the scoring failed: {e}")
        if not isinstance(scored, tuple):      # the client went away
            return scored
        rewards, tokens = scored
        request.state.tokens = (tokens, 0)
        order = best_first(rewards)[:body.top_n or len(docs)]    # (a NaN reward last)
        return {"id": f"rerank-{request.state.request_id}", "model": names[0],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
                "results": [{"index": i, "relevance_score": rewards[i],
                             "document": {"text": docs[i]} if body.return_documents is not False
                             else None} for i in order]}

    for path in ("/v1/score", "/score"):       # vLLM serves both
        app.post(path)(score)
    for path in ("/v1/rerank", "/rerank"):
        app.post(path)(rerank)

    def large_tokenizer():
        if tokenizer is None:
            raise RequestError(400, "the large model is a black box behind another server, "
                                    "which tokenizes its prompts itself: there is no tokenizer "
                                    "here", None)
        return tokenizer

    @app.post("/tokenize")
    async def tokenize(request: Request):
        """vLLM's: the large model's token ids of a prompt as /v1/completions (a `prompt`) or
        /v1/chat/completions (`messages`) would feed it, its template applied."""
        body = parse_body(await request.body(), TokenizeRequest)
        check_model(body.model)
        tok = large_tokenizer()
        prompt, chat, chars = body.the_prompt()
        field = "messages" if chat else "prompt"
        if chars > max_prompt_chars:
            raise RequestError(400, f"{field}: {chars} characters, past this server's limit "
                                    f"of {max_prompt_chars} a prompt (--max-prompt-chars)",
                               field)
        special = not (chat and engine.templates["large"].chat)
        if body.add_special_tokens is not None and body.add_special_tokens is not special:
            raise RequestError(400, f"add_special_tokens: not supported at "
                                    f"{str(body.add_special_tokens).lower()}; leave it out or "
                                    f"send {str(special).lower()} (what the search does here)",
                               "add_special_tokens")
        try:
            ids = await asyncio.get_running_loop().run_in_executor(
                None, lambda: engine.large_prompt_ids(
                    prompt, chat=None if chat else False,
                    continue_final_message=bool(body.continue_final_message),
                    chat_template_kwargs=body.chat_template_kwargs))
        except (ValueError, TypeError) as e:
            raise param_error(e, field) from None
        strs = tok.convert_ids_to_tokens(ids) if body.return_token_strs else None
        return {"count": len(ids), "max_model_len": engine.runners["large"].shape.max_positions,
                "tokens": ids, "token_strs": strs}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        """vLLM's: the large model's text of token ids (special tokens included)."""
        body = parse_body(await request.body(), DetokenizeRequest)
        check_model(body.model)
        tok = large_tokenizer()
        bad = next((i for i, t in enumerate(body.tokens) if not 0 <= t < len(tok)), None)
        if bad is not None:
            raise RequestError(400, f"tokens.{bad}: token id {body.tokens[bad]} is outside the "
                                    f"large model's vocabulary [0, {len(tok)})", f"tokens.{bad}")
        text = await asyncio.get_running_loop().run_in_executor(
            None, lambda: tok.decode(body.tokens))
        return {"prompt": text}

    @app.get("/version")
    async def version():
        return {"version": w2s_engine.__version__}

    def model_card(name: str) -> dict:
        # root and parent as vLLM's cards have them: `vllm bench serve` without --model reads
        # data[0]["root"] (the model, for its tokenizer) and fails with a KeyError without it.
        return {"id": name, "object": "model", "created": started, "owned_by": "w2s-engine",
                "root": root or names[0], "parent": None}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card(n) for n in names]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        check_model(model_id)
        return model_card(model_id)

    @app.api_route("/health", methods=["GET", "HEAD"])   # HEAD: load balancers' probes
    async def health():
        alive = async_engine.is_alive()
        return JSONResponse({"status": "ok" if alive else "engine loop stopped"},
                            status_code=200 if alive else 503)

    @app.get("/metrics")
    async def metrics():
        return Response(async_engine.metrics.text(), media_type=CONTENT_TYPE_LATEST)

    return app


def bind(host: str, port: int):
    """The listening socket, bound before the models load: a port in use, or a host that is
    not this machine's, is said at once in one line, not after minutes of loading."""
    import errno
    import socket

    from w2s_engine.launch import UserError
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as uvicorn binds
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise UserError(f"--port {port}: {host}:{port} is in use (another server?): stop "
                            "what listens there or pick another --port") from None
        if e.errno == errno.EACCES:
            raise UserError(f"--port {port}: not allowed to bind it here ({e.strerror}): "
                            "pick a port from 1024 up") from None
        raise UserError(f"--host {host}: cannot bind it ({e.strerror or e}): give an address "
                        "of this machine, e.g. 127.0.0.1, or 0.0.0.0 for all") from None
    return sock


def graceful_server(config):
    """uvicorn's server, except that a SIGTERM or Ctrl-C that stopped it gracefully is a
    clean exit: uvicorn raises the signal again once it has shut down, which kills the
    process (143, the engine's shutdown skipped) or turns it into a KeyboardInterrupt (130)."""
    import contextlib

    import uvicorn

    if not hasattr(uvicorn.Server, "capture_signals"):   # (an older uvicorn raises none)
        return uvicorn.Server(config)

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            with super().capture_signals():
                try:
                    yield
                finally:
                    captured = getattr(self, "_captured_signals", None)
                    if isinstance(captured, list):
                        captured.clear()    # asked for: nothing to raise again

    return Server(config)


def serve(args):
    """`w2s serve`: load the models, start the engine loop and uvicorn."""
    import os
    import time

    import uvicorn

    from w2s_engine.launch import engine_from_args, remote_model_name
    sock = bind(args.host, args.port)
    port = sock.getsockname()[1]    # (--port 0: the one the system picked)
    try:
        engine = engine_from_args(args, need_small=bool(args.tuned or args.untuned),
                                  max_waiting=args.max_queue, progress=False)
    except BaseException:
        sock.close()
        raise
    if str(engine.config.device).startswith("cuda"):
        t = time.perf_counter()
        engine.warm_up()    # the kernels' compiles and autotuning, before the first request
        log.info("warmed up in %.1f s", time.perf_counter() - t)
    async_engine = AsyncEngine(engine)
    hosts = (tuple(h.strip() for h in args.allowed_hosts.split(",") if h.strip())
             if args.allowed_hosts else default_allowed_hosts(args.host))
    origins = tuple(o.strip() for o in (args.allowed_origins or "").split(",") if o.strip())
    names = args.served_model_name or [remote_model_name(engine) or served_name(args.large)]
    api_key = args.api_key or os.environ.get("W2S_API_KEY") or None
    app = create_app(async_engine, model_name=names, max_body_bytes=args.max_body_bytes,
                     allowed_hosts=hosts, max_prompt_chars=args.max_prompt_chars,
                     api_key=api_key, allowed_origins=origins, body_timeout=args.body_timeout,
                     root=remote_model_name(engine) or served_name(args.large))
    # What is loaded now lives as long as the server: frozen out of full collections, which
    # would otherwise stall every request in flight (frozen_heap.py).
    freeze_loaded_objects()
    log.info("serving %s on http://%s:%d/v1 (%s; API key %s; CORS origins: %s)",
             ", ".join(names), args.host, port,
             "search" if engine.has_scorer else "the large model alone",
             "required" if api_key else "off", ", ".join(origins) or "none")
    if not api_key and args.host not in LOOPBACK_HOSTS:
        log.warning("--host %s without --api-key: anyone who can reach this machine's port %d "
                    "can run searches on it; give --api-key (or W2S_API_KEY) unless a proxy "
                    "in front checks who calls", args.host, port)
    # Past the shutdown timeout uvicorn cancels the requests still running (a client that
    # stopped reading, or sent half a body, would hold the exit up for ever): their
    # searches are cancelled as when a client leaves.
    server = graceful_server(uvicorn.Config(
        app, host=args.host, port=port, log_level=args.log_level.lower(), access_log=False,
        log_config=None, timeout_graceful_shutdown=args.shutdown_timeout))
    try:
        server.run(sockets=[sock])
    finally:
        async_engine.shutdown()
