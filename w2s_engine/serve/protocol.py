"""OpenAI request bodies plus the search fields (method, w, k, l, beta, top_k), read strictly.

parse_body() turns the raw bytes of a request into one of the models below, or raises
RequestError (a 400 the server answers in OpenAI's error envelope), naming the field:
- the body is UTF-8 JSON: no other encoding, no NaN or Infinity, no number past a double,
  at most MAX_DEPTH levels of nesting, and no lone UTF-16 surrogate in any string;
- the models are strict: 4 is an integer, "4", 4.0 and true are not (a float field takes 4);
- the search parameters' ranges are SearchParams.validate's, checked when the request is
  prepared (Engine.make_request), so that the API, the command and the server agree.
Fields the engine does not use (user, metadata, ...) are accepted and ignored, as OpenAI
clients send them; OpenAI features it does not implement (penalties, logprobs, logit_bias,
echo, best_of, suffix, tools, streaming) are accepted only at their neutral values, so that
a request never silently gets something other than what it asked for.
"""

import json
import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from w2s_engine.params import METHODS, InvalidParam, SearchParams, is_real
from w2s_engine.search.prompts import CHAT_ROLES

MAX_DEPTH = 32
API_NAMES = {"max_new_tokens": "max_tokens"}   # SearchParams field -> request field


class RequestError(Exception):
    """A request the server refuses: HTTP status, a message saying what to change, the field."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


class _Constant:
    """NaN, Infinity or -Infinity where JSON has none: refused with its field's name."""

    def __init__(self, name: str):
        self.name = name


def _brief(value) -> str:
    try:
        text = json.dumps(value, ensure_ascii=True)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


# ---- the body ----------------------------------------------------------------------------------

def parse_json(raw: bytes):
    """The request body as a JSON object (a dict) of plain, finite, valid values."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RequestError(400, f"the request body is not UTF-8 (byte 0x{raw[e.start]:02x} at "
                                f"offset {e.start}): send JSON text encoded as UTF-8") from None
    try:
        obj = json.loads(text, parse_constant=_Constant)
    except json.JSONDecodeError as e:
        raise RequestError(400, f"the request body is not valid JSON: {e.msg} at line "
                                f"{e.lineno} column {e.colno}") from None
    except RecursionError:
        raise RequestError(400, f"the request body nests deeper than {MAX_DEPTH} levels") from None
    if not isinstance(obj, dict):
        raise RequestError(400, f"the request body must be a JSON object {{...}}, not "
                                f"{_json_kind(obj)}")
    _check_values(obj)
    return obj


def _json_kind(value) -> str:
    return {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number")


def _check_values(obj):
    """Depth, finite numbers and valid strings, iteratively (no recursion on hostile input)."""
    stack = [(obj, (), 1)]
    while stack:
        value, path, depth = stack.pop()
        where = ".".join(map(str, path)) or None
        if isinstance(value, (dict, list)):
            if depth > MAX_DEPTH:
                raise RequestError(400, f"{where}: nests deeper than {MAX_DEPTH} levels", where)
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for key, item in items:
                if isinstance(key, str):
                    _check_string(key, path + (key,), "a key")
                stack.append((item, path + (key,), depth + 1))
        elif isinstance(value, str):
            _check_string(value, path, "a string")
        elif isinstance(value, _Constant):
            raise RequestError(400, f"{where}: {value.name} is not a JSON number: send a finite "
                                    "number", where)
        elif isinstance(value, float) and not math.isfinite(value):
            raise RequestError(400, f"{where}: the number is too large for a double: send a "
                                    "finite number", where)


def _check_string(text: str, path: tuple, what: str):
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        where = ".".join(map(str, path)) or None
        raise RequestError(400, f"{where}: {what} with a lone UTF-16 surrogate "
                                f"({text[e.start]!a} at character {e.start}), which is not a "
                                "Unicode character: send valid UTF-8 text", where) from None


def parse_body(raw: bytes, model: type[BaseModel]) -> BaseModel:
    obj = parse_json(raw)
    try:
        return model.model_validate(obj)
    except ValidationError as e:
        raise _validation_error(e) from None


# ---- pydantic's errors, in our words ------------------------------------------------------------

_EXPECTED = {
    "int_type": "must be an integer", "int_from_float": "must be an integer",
    "float_type": "must be a number", "string_type": "must be a string",
    "bool_type": "must be true or false", "list_type": "must be an array",
    "dict_type": "must be an object", "model_type": "must be an object",
    "missing": "is required", "finite_number": "must be a finite number",
    "none_required": "must be null",
}


def _field_path(loc) -> str:
    # Union members show up in the location as type names ('str', 'list[str]'): drop them.
    parts = [str(p) for p in loc
             if not (isinstance(p, str) and (p in ("str", "int", "float", "bool", "none")
                                             or "[" in p or "-" in p))]
    return ".".join(parts) or "body"


def _validation_error(e: ValidationError) -> RequestError:
    # The deepest location is the most specific (for a union, the member that came closest).
    err = max(e.errors(include_url=False), key=lambda x: len(x["loc"]))
    where = _field_path(err["loc"])
    msg = err["msg"]
    why = _EXPECTED.get(err["type"]) or (
        "must be " + msg[len("Input should be "):] if msg.startswith("Input should be ")
        else msg[0].lower() + msg[1:])
    got = "" if err["type"] == "missing" else f" (got {_brief(err.get('input'))})"
    return RequestError(400, f"{where}: {why}{got}", where)


def param_error(e: ValueError, prompt_field: str) -> RequestError:
    """A preparation error (SearchParams.validate, the prompt checks, the model's context) as
    a 400 naming the request's field."""
    message = str(e).replace("max_new_tokens", "max_tokens").replace("SearchParams.", "")
    if isinstance(e, InvalidParam):
        field = API_NAMES.get(e.field, e.field)
        if field == "prompt" or field.startswith("messages"):
            field = field if field.startswith(prompt_field) else prompt_field
        return RequestError(400, message, field)
    return RequestError(400, message, None)


# ---- the models ---------------------------------------------------------------------------------

# OpenAI features the engine does not implement, accepted at these neutral values only.
# (null is always taken: it means the default)
NEUTRAL = {"presence_penalty": (0,), "frequency_penalty": (0,), "repetition_penalty": (1,),
           "logprobs": (False, 0), "top_logprobs": (0,), "echo": (False,), "best_of": (1,),
           "logit_bias": ({},), "suffix": ("",), "tools": ([],), "tool_choice": ("none",),
           "functions": ([],), "stream": (False,)}


def _same(value, neutral) -> bool:
    """value is the neutral value: numbers by value (bool is not a number), the rest by type
    and value."""
    if neutral is None or isinstance(neutral, bool):
        return value is neutral
    if isinstance(neutral, int):
        return is_real(value) and value == neutral
    return type(value) is type(neutral) and value == neutral


class SearchFields(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    model: str | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None   # OpenAI's newer name for max_tokens
    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = Field(default=0, description="0 or -1 = off (vLLM's -1 is taken too)")
    n: int = Field(default=1, ge=1, le=128, description="choices: n plain samples with method=base")
    stop: str | list[str] | None = None
    seed: int | None = None
    # None: cbs, or base when the engine has no small models
    method: Literal[METHODS] | None = None
    w: int = 4
    k: int = 4
    l: int | None = 5
    beta: float = 1.0

    def check_neutral(self):
        for name, neutral in NEUTRAL.items():
            value = (self.model_extra or {}).get(name)
            if value is not None and not any(_same(value, v) for v in neutral):
                hint = " or ".join(_brief(v) for v in neutral)
                raise RequestError(400, f"{name}: not supported by this server; leave it out "
                                        f"(or send {hint}), got {_brief(value)}", name)

    def params(self, default_max_tokens: int, default_method: str = "cbs") -> SearchParams:
        """The SearchParams this body asks for; raises RequestError, or InvalidParam for a
        value out of SearchParams.validate's ranges."""
        self.check_neutral()
        method = self.method or default_method
        max_tokens = self.max_tokens if self.max_tokens is not None else \
            self.max_completion_tokens
        common = dict(max_new_tokens=default_max_tokens if max_tokens is None else max_tokens,
                      temperature=self.temperature, top_p=self.top_p,
                      top_k=0 if self.top_k == -1 else self.top_k, seed=self.seed,
                      stop=[self.stop] if isinstance(self.stop, str) else list(self.stop or []))
        # Every search field is checked, also those this method does not use (k=0 with
        # method=base is a mistake too): SearchParams.validate's ranges, field by field.
        SearchParams(w=self.w, k=self.k, l=self.l, beta=self.beta, **common).validate()
        if method != "cbs" and "w" in self.model_fields_set and self.w != 1:
            # Say so rather than ignore it: only CBS keeps several beams.
            raise RequestError(400, f"w={self.w}: method={method!r} keeps one beam; use w=1 or "
                                    "method='cbs'", "w")
        if self.n > 1 and method != "base":
            raise RequestError(400, f"n={self.n}: several choices come only from method='base' "
                                    "(n samples); a search returns its best, with the W "
                                    "survivors under 'w2s.hypotheses'", "n")
        if method == "best_of_n":
            return SearchParams.best_of_n(self.k, **common)
        if method == "base":
            return SearchParams.base(n=self.n, **common)
        if method == "eft":
            return SearchParams.eft(self.beta, **common)
        return SearchParams.cbs(self.w, self.k, self.l, **common)


class CompletionRequest(SearchFields):
    prompt: str | list[str]

    def the_prompt(self) -> str:
        if isinstance(self.prompt, list):
            if len(self.prompt) != 1:
                raise RequestError(400, f"prompt: {len(self.prompt)} prompts in one request; "
                                        "send one per request (they are batched together)",
                                   "prompt")
            return self.prompt[0]
        return self.prompt

    @property
    def prompt_chars(self) -> int:
        return sum(map(len, self.prompt)) if isinstance(self.prompt, list) else len(self.prompt)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    role: Literal[CHAT_ROLES]
    content: str | list[TextPart]
    name: str | None = None


class ChatCompletionRequest(SearchFields):
    messages: list[ChatMessage] = Field(min_length=1)

    def the_prompt(self) -> list[dict]:
        return [{"role": m.role, "content": m.content if isinstance(m.content, str) else
                 [p.model_dump() for p in m.content]} for m in self.messages]

    @property
    def prompt_chars(self) -> int:
        return sum(len(m.content) if isinstance(m.content, str) else
                   sum(len(p.text) for p in m.content) for m in self.messages)
