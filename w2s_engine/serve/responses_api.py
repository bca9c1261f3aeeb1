"""OpenAI's Responses API (POST /v1/responses) over the chat endpoint's search.

A Responses body is a chat request in other words: `instructions` is a system message, `input`
the messages (or one user message), `max_output_tokens` the token limit; the search fields
(method, w, k, l, beta, top_k, seed, ...) are the chat endpoint's. ResponsesRequest reads it
strictly and becomes a ChatCompletionRequest; ResponseShape turns the chat answer into a
Response object, and a chat stream into the Responses API's typed events (response.created,
response.output_text.delta, ..., response.completed). One message per response: OpenAI's
Responses API has no `n` (the chat endpoint has). Nothing is stored: `store` and
`previous_response_id` are refused (send the conversation in `input`), as are tools and
reasoning options; text.format (json_object, json_schema) is the chat's response_format.
"""

import json
import time
from collections.abc import AsyncIterator
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from w2s_engine.serve.finite_json import dumps
from w2s_engine.serve.protocol import (CHAT_NEUTRAL, NEUTRAL, ChatCompletionRequest,
                                       RequestError, SearchFields)
from w2s_engine.serve.protocol import _validation_error as validation_error

# The Responses API's features the engine does not implement, at their neutral values only
# (protocol.NEUTRAL's rule: an empty tuple takes only null).
RESPONSES_NEUTRAL = {"store": (False,), "previous_response_id": (), "conversation": (),
                     "reasoning": (), "include": ([],),
                     "background": (False,), "truncation": ("disabled",),
                     "tool_choice": ("auto", "none"), "max_tool_calls": (), "prompt": (),
                     "top_logprobs": (0,)}
# Taken and changing nothing here: a cache hint (the prefix cache works on its own), the
# service tier, and OpenAI's safety identifier (written in the access log as `user` is not).
IGNORED = ("prompt_cache_key", "service_tier", "safety_identifier", "parallel_tool_calls")


class InputText(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    # input_text in a user's or system's message, output_text in an assistant's earlier reply
    type: Literal["input_text", "output_text", "text"]
    text: str


class InputMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)   # (an earlier output's id, status)

    type: Literal["message"] | None = None
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[InputText]


class ResponsesRequest(SearchFields):
    input: str | list[InputMessage]
    instructions: str | None = None
    max_output_tokens: int | None = None
    metadata: dict[str, str] | None = None
    text: dict[str, Any] | None = None    # {"format": text, json_object or json_schema}

    neutral: ClassVar[dict] = {**NEUTRAL, **CHAT_NEUTRAL, **RESPONSES_NEUTRAL}

    def chat(self) -> ChatCompletionRequest:
        """The same request as the chat endpoint reads it."""
        self.check_neutral()
        for name in ("max_tokens", "max_completion_tokens"):
            if name in self.model_fields_set:
                raise RequestError(400, f"{name}: the Responses API's token limit is "
                                        "max_output_tokens: send that", name)
        if self.n not in (None, 1):
            raise RequestError(400, f"n={self.n}: a response holds one message; for n choices "
                                    "use POST /v1/chat/completions", "n")
        messages = [{"role": "system", "content": self.instructions}] \
            if self.instructions is not None else []
        if isinstance(self.input, str):
            messages.append({"role": "user", "content": self.input})
        else:
            if not self.input:
                raise RequestError(400, "input: an empty list: send at least one message",
                                   "input")
            messages += [{"role": m.role, "content": m.content if isinstance(m.content, str)
                          else [{"type": "text", "text": p.text} for p in m.content]}
                         for m in self.input]
        fields = {name: getattr(self, name) for name in self.model_fields_set
                  if name in SearchFields.model_fields}
        body = {**fields, "messages": messages, "max_completion_tokens": self.max_output_tokens}
        response_format = self.chat_response_format()
        if response_format is not None:
            if "response_format" in fields:
                raise RequestError(400, "response_format: the Responses API's is text.format: "
                                        "send that", "response_format")
            body["response_format"] = response_format
        if self.stream:       # the usage comes in the last event's response
            body["stream_options"] = {"include_usage": True}
        try:
            return ResponsesChat.model_validate(body)
        except ValidationError as e:
            raise validation_error(e) from None


    def text_format(self) -> dict:
        fmt = (self.text or {}).get("format")
        return {"type": "text"} if fmt is None else fmt

    def chat_response_format(self) -> dict | None:
        """text.format as the chat endpoint's response_format (its json_schema is flat here:
        name, schema and strict beside the type)."""
        fmt = self.text_format()
        other = sorted(set(self.text or {}) - {"format", "verbosity"})
        if other:
            raise RequestError(400, f"text.{other[0]}: not supported by this server; leave it "
                                    "out", f"text.{other[0]}")
        kind = fmt.get("type") if isinstance(fmt, dict) else None
        if kind == "text":
            return None
        if kind == "json_object":
            return {"type": "json_object"}
        if kind == "json_schema":
            if not isinstance(fmt.get("schema"), dict):
                raise RequestError(400, "text.format.schema: a JSON schema (an object) is "
                                        "needed with type json_schema", "text.format.schema")
            return {"type": "json_schema", "json_schema": {"name": fmt.get("name", "schema"),
                                                           "schema": fmt["schema"]}}
        raise RequestError(400, "text.format.type: give text, json_object or json_schema",
                           "text.format.type")


class ResponsesChat(ChatCompletionRequest):
    """A chat request made of a Responses body: its errors name the Responses fields."""

    def _max_tokens(self):
        return self.max_completion_tokens, "max_output_tokens"

    def structured(self):
        """Its response_format is the body's text.format (a Responses body has no
        response_format: ResponsesRequest.chat refuses one): its errors name that."""
        try:
            spec, name = super().structured()
        except RequestError as e:
            raise RequestError(e.status, e.message.replace("response_format", "text.format"),
                               e.param and e.param.replace("response_format",
                                                           "text.format")) from None
        return spec, "text.format" if name == "response_format" else name


def _usage(chat_usage: dict | None, cached: int) -> dict | None:
    if chat_usage is None:
        return None
    return {"input_tokens": chat_usage["prompt_tokens"],
            "input_tokens_details": {"cached_tokens": cached},
            "output_tokens": chat_usage["completion_tokens"],
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": chat_usage["total_tokens"]}


def _cached(w2s: dict | None) -> int:
    """The large model's prompt tokens read from the prefix cache (OpenAI's cached_tokens)."""
    stats = (w2s or {}).get("stats") or {}
    return (stats.get("cached_prompt_tokens") or {}).get("large", 0)


class ResponseShape:
    """The chat endpoint's answer as a Response: the whole object, or the stream's events."""

    def __init__(self, body: ResponsesRequest, request_id: str, model: str):
        self.body, self.model = body, model
        self.id, self.message_id = f"resp_{request_id}", f"msg_{request_id}"
        self.created = int(time.time())

    def response(self, status: str, text: str = "", finish_reason: str | None = None,
                 usage: dict | None = None, w2s=None) -> dict:
        """The Response object; status: in_progress, completed or incomplete (the token
        limit cut the message: incomplete_details.reason max_output_tokens)."""
        b = self.body
        # (a message's statuses are in_progress, completed and incomplete: a failed
        # response's message is incomplete)
        output = [] if status == "in_progress" else [
            self._item("incomplete" if status == "failed" else status, text)]
        out = {"id": self.id, "object": "response", "created_at": self.created,
               "status": status, "error": None,
               "incomplete_details": {"reason": "max_output_tokens"}
               if status == "incomplete" else None,
               "instructions": b.instructions, "max_output_tokens": b.max_output_tokens,
               "model": self.model, "output": output, "parallel_tool_calls": True,
               "temperature": b.temperature, "top_p": b.top_p, "tool_choice": "auto",
               "tools": [], "text": {"format": b.text_format()}, "truncation": "disabled",
               "store": False, "background": False, "metadata": b.metadata or {},
               "usage": _usage(usage, _cached(w2s)), "user": b.user}
        if w2s is not None:
            out["w2s"] = w2s
        return out

    def _item(self, status: str, text: str) -> dict:
        return {"type": "message", "id": self.message_id, "status": status,
                "role": "assistant", "content": [self._part(text)]}

    @staticmethod
    def _part(text: str) -> dict:
        return {"type": "output_text", "text": text, "annotations": []}

    def whole(self, chat: dict) -> dict:
        choice = chat["choices"][0]
        reason = choice["finish_reason"]
        return self.response("incomplete" if reason == "length" else "completed",
                             choice["message"]["content"] or "", reason, chat["usage"],
                             chat.get("w2s"))

    async def events(self, chunks: AsyncIterator[str], handles=()) -> AsyncIterator[str]:
        """The chat stream's chunks ("data: {...}" lines, then [DONE]) as the Responses
        API's events, each with its sequence_number; a failed search is an `error` event
        (and response.failed), as OpenAI's stream ends on one. handles: the searches, which
        a client gone before the chat stream started (its own finally never runs) cancels."""
        seq = 0
        text, reason, usage, w2s, opened = [], None, None, None, False

        def event(kind: str, **fields) -> str:
            nonlocal seq
            seq += 1
            body = dumps({"type": kind, "sequence_number": seq - 1, **fields})
            return f"event: {kind}\ndata: {body}\n\n"

        where = {"item_id": self.message_id, "output_index": 0, "content_index": 0}
        try:
            yield event("response.created", response=self.response("in_progress"))
            yield event("response.in_progress", response=self.response("in_progress"))
            async for chunk in chunks:
                payload = chunk[len("data: "):].strip()
                if payload == "[DONE]":
                    break
                data = json.loads(payload)
                if "error" in data:     # the search failed (the chat stream's error event)
                    error = data["error"]
                    yield event("error", code=str(error.get("code")), message=error["message"],
                                param=error.get("param"))
                    failed = self.response("failed", "".join(text))
                    if not opened:     # (no message was announced: none failed)
                        failed["output"] = []
                    failed["error"] = {"code": "server_error", "message": error["message"]}
                    yield event("response.failed", response=failed)
                    return
                if data.get("usage"):
                    usage = data["usage"]
                w2s = data.get("w2s", w2s)
                for choice in data.get("choices", ()):
                    if not opened:
                        opened = True
                        yield event("response.output_item.added", output_index=0,
                                    item={**self._item("in_progress", ""), "content": []})
                        yield event("response.content_part.added", **where,
                                    part=self._part(""))
                    delta = choice.get("delta", {}).get("content")
                    if delta:
                        text.append(delta)
                        yield event("response.output_text.delta", **where, delta=delta,
                                    logprobs=[])
                    if choice.get("finish_reason"):
                        reason = choice["finish_reason"]
        finally:     # (its own finally cancels the searches of a client that went away)
            await chunks.aclose()
            for h in handles:
                h.cancel()
        whole = "".join(text)
        status = "incomplete" if reason == "length" else "completed"
        if opened:
            yield event("response.output_text.done", **where, text=whole, logprobs=[])
            yield event("response.content_part.done", **where, part=self._part(whole))
            yield event("response.output_item.done", output_index=0,
                        item=self._item(status, whole))
        yield event(f"response.{status}",
                    response=self.response(status, whole, reason, usage, w2s))
