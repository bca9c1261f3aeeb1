"""OpenAI request bodies plus the search fields (method, w, k, l, beta, top_k), read strictly.

parse_body() turns the raw bytes of a request into one of the models below, or raises
RequestError (a 400 the server answers in OpenAI's error envelope), naming the field:
- the body is UTF-8 JSON: no other encoding, no NaN or Infinity, no number past a double,
  at most MAX_DEPTH levels of nesting, and no lone UTF-16 surrogate in any string;
- the models are strict: 4 is an integer, "4", 4.0 and true are not (a float field takes 4);
- the search parameters' ranges are SearchParams.validate's, checked when the request is
  prepared (Engine.make_request), so that the API, the command and the server agree.
Every OpenAI sampling field is honoured or refused: stream (+ stream_options.include_usage), n,
best_of, echo, logprobs / top_logprobs, stop, seed, max_tokens / max_completion_tokens,
presence / frequency / repetition penalties, logit_bias, min_p, vLLM's min_tokens, ignore_eos,
stop_token_ids, include_stop_str_in_output, allowed_token_ids and bad_words, and a chat's
continue_final_message / add_generation_prompt and chat_template_kwargs (vLLM's) are honoured
(SearchFields.plan); OpenAI and vLLM features the engine does not implement (suffix, tools,
response formats, vLLM's truncate_prompt_tokens, ...) are accepted only at their neutral values (NEUTRAL), and a search field the
method does not use only at the value it takes, so that a request never silently gets something
other than what it asked for. null is every field's default. `user` is written in the access
log; fields nobody defines (metadata, x_...) are ignored.
"""

import json
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from w2s_engine.params import DEFAULTS, MAX_LOGPROBS, METHODS, STRUCTURED_KINDS, InvalidParam, \
    SearchParams, is_real
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
    except ValueError:   # an integer past Python's 4,300-digit conversion limit
        raise RequestError(400, "the request body holds an integer of thousands of digits: "
                                "send numbers in the ranges the fields take") from None
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


def param_error(e: ValueError, prompt_field: str, names: dict | None = None) -> RequestError:
    """A preparation error (SearchParams.validate, the prompt checks, the model's context) as
    a 400 naming the request's field (names: SearchParams field -> request field)."""
    names = {**API_NAMES, **(names or {})}
    message = str(e).replace("SearchParams.", "").replace("max_new_tokens",
                                                          names["max_new_tokens"])
    if not isinstance(e, InvalidParam):
        return RequestError(400, message, None)
    field = names.get(e.field, e.field)
    if field == "prompt" or field.startswith("messages"):
        field = field if field.startswith(prompt_field) else prompt_field
    if field != e.field and message.startswith(f"{e.field}="):   # the name as sent
        message = field + message[len(e.field):]
    if prompt_field == "messages":   # a chat's prompt is its messages, rendered
        message = message.replace("the prompt has", "the messages' prompt has").replace(
            "the prompt (", "the messages' prompt (").replace("the prompt", "the messages")
    return RequestError(400, message, field)


# ---- the models ---------------------------------------------------------------------------------

# OpenAI and vLLM features the engine does not implement, accepted at these neutral values only
# (an empty tuple: only null). null is always taken: it means the default.
NEUTRAL = {"suffix": ("",), "tools": ([],), "tool_choice": ("none",),
           "functions": ([],), "function_call": ("none",),
           "length_penalty": (1,), "use_beam_search": (False,), "early_stopping": (False,),
           "prompt_logprobs": (),
           "guided_decoding_backend": (), "guided_whitespace_pattern": (),
           "modalities": (["text"],), "audio": (), "prediction": (),
           "reasoning_effort": (), "verbosity": (), "web_search_options": (),
           # vLLM's sampling and tokenization extensions
           "truncate_prompt_tokens": (),
           "skip_special_tokens": (True,), "spaces_between_special_tokens": (True,),
           "return_tokens_as_token_ids": (False,), "return_token_ids": (False,),
           "prompt_embeds": (), "priority": (0,), "mm_processor_kwargs": ()}
# Chat: the template renders the messages and opens the assistant's turn, or continues the
# last message (continue_final_message with add_generation_prompt false, vLLM's pair).
CHAT_NEUTRAL = {"echo": (False,), "best_of": (1,),   # completions' fields, not chat's
                "chat_template": (), "documents": ()}
COMPLETION_NEUTRAL = {"top_logprobs": (0,)}          # chat's field
# (vLLM's add_special_tokens: checked by the server, which knows the template in effect)
# Fields whose null means the default (OpenAI's clients send null for an argument left None).
NULL_IS_DEFAULT = ("temperature", "top_p", "top_k", "min_p", "min_tokens", "w", "k", "l", "beta",
                   "presence_penalty", "frequency_penalty", "repetition_penalty")
MAX_PROMPTS = 64   # searches one completions request may start


def _same(value, neutral) -> bool:
    """value is the neutral value: numbers by value (bool is not a number), the rest by type
    and value."""
    if neutral is None or isinstance(neutral, bool):
        return value is neutral
    if isinstance(neutral, int):
        return is_real(value) and value == neutral
    return type(value) is type(neutral) and value == neutral


def refuse_unless_neutral(extra: dict | None, neutral: dict):
    """A field the engine does not implement, sent at another value than its neutral ones
    (`neutral`: name -> the values taken; none: only null): a 400 naming it."""
    for name, values in neutral.items():
        value = (extra or {}).get(name)
        if value is not None and not any(_same(value, v) for v in values):
            hint = "".join(f" or send {_brief(v)}" for v in values[:1])
            raise RequestError(400, f"{name}: not supported by this server; leave it out"
                                    f"{hint} (got {_brief(value)})", name)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    include_usage: bool | None = None            # a last chunk with the usage
    continuous_usage_stats: bool | None = None   # vLLM's: not supported (refused when true)
    # OpenAI's random padding against a length side channel: taken, and none is added (it
    # changes no content).
    include_obfuscation: bool | None = None


@dataclass
class Plan:
    """What a request asks for, checked: the search, and how to answer."""

    params: SearchParams
    n: int                       # choices: the n best hypotheses (n samples for base)
    stream: bool
    include_usage: bool
    logprobs: int | None         # alternatives per token (None: no logprobs)
    echo: bool
    names: dict                  # SearchParams field -> the request field that set it
    continue_final: bool = False  # the response continues the last (assistant) message
    fit_max_tokens: bool = False  # no token limit sent: the default, lowered to fit the context


class SearchFields(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    model: str | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None   # OpenAI's newer name (chat); it wins over max_tokens
    temperature: float = DEFAULTS.temperature
    top_p: float = DEFAULTS.top_p
    top_k: int = Field(default=DEFAULTS.top_k, description="0 or -1 = off (vLLM's -1 is taken)")
    min_p: float = DEFAULTS.min_p                # vLLM's
    n: int | None = Field(default=None, ge=1, le=128,
                          description="choices: the n best hypotheses (n samples with base)")
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = None                   # written in the access log
    ignore_eos: bool | None = None            # vLLM's: sample past EOS
    min_tokens: int = DEFAULTS.min_tokens     # vLLM's: no EOS, stop id or stop string before
    stop_token_ids: list[int] | None = None   # vLLM's: large-model token ids that end a response
    include_stop_str_in_output: bool | None = None   # vLLM's: the stop string stays in the text
    # None: cbs, or base when the engine has no scorer
    method: Literal[METHODS] | None = None
    w: int = DEFAULTS.w
    k: int = DEFAULTS.k
    l: int | None = DEFAULTS.l
    beta: float = DEFAULTS.beta
    presence_penalty: float = DEFAULTS.presence_penalty
    frequency_penalty: float = DEFAULTS.frequency_penalty
    repetition_penalty: float = DEFAULTS.repetition_penalty   # vLLM's
    logit_bias: dict[str, float] | None = None   # token id (a JSON key: a string) -> bias
    allowed_token_ids: list[int] | None = None   # vLLM's: the large-model ids a response may hold
    bad_words: list[str] | None = None           # vLLM's: words a response never holds
    # A structure the response follows: OpenAI's response_format (json_object, json_schema),
    # vLLM's structured_outputs and its older guided_* fields (structured())
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    neutral: ClassVar[dict] = NEUTRAL

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data):
        if isinstance(data, dict):
            data = {k: v for k, v in data.items() if not (v is None and k in NULL_IS_DEFAULT)}
        return data

    def check_neutral(self):
        refuse_unless_neutral(self.model_extra, self.neutral)

    def _logit_bias(self) -> dict[int, float]:
        """OpenAI's logit_bias: its keys are token ids written as strings."""
        bias = {}
        for key, value in (self.logit_bias or {}).items():
            # (a token id has at most 10 digits; int() of thousands of them raises)
            if not key.isascii() or not key.isdigit() or len(key) > 10:
                raise RequestError(400, f"logit_bias: the key {key[:40]!r} is not a token id "
                                        "(a non-negative integer, as a string)",
                                   f"logit_bias.{key[:40]}")
            bias[int(key)] = value
        return bias

    def structured(self) -> tuple[dict | None, str]:
        """SearchParams.structured_output from whichever field asks for one, and that field's
        name (for its errors): OpenAI's response_format, vLLM's structured_outputs or a
        guided_* field; two of them are refused."""
        asked = [(name, value) for name, value in (
            ("response_format", self.response_format),
            ("structured_outputs", self.structured_outputs),
            ("guided_json", self.guided_json), ("guided_regex", self.guided_regex),
            ("guided_choice", self.guided_choice), ("guided_grammar", self.guided_grammar))
            if value is not None and value != {"type": "text"}]
        if len(asked) > 1:
            raise RequestError(400, f"{asked[0][0]} and {asked[1][0]} both ask for a "
                                    "structured output: send one", asked[1][0])
        if not asked:
            return None, "response_format"
        name, value = asked[0]
        if name.startswith("guided_"):
            return {name[len("guided_"):]: value}, name
        if name == "structured_outputs":
            kinds = [k for k in STRUCTURED_KINDS if value.get(k) not in (None, False)]
            # (vLLM's other options, disable_fallback and the like: at their defaults)
            other = sorted(k for k, v in value.items() if k not in STRUCTURED_KINDS
                           and k != "disable_any_whitespace" and v not in (None, False))
            if other:
                raise RequestError(400, f"{name}.{other[0]}: not supported by this server; "
                                        "leave it out", f"{name}.{other[0]}")
            if len(kinds) != 1:
                raise RequestError(400, f"{name}: send exactly one of "
                                        f"{', '.join(STRUCTURED_KINDS)}", name)
            spec = {kinds[0]: value[kinds[0]]}
            if value.get("disable_any_whitespace") not in (None, False):
                spec["any_whitespace"] = not value["disable_any_whitespace"]
            return spec, name
        kind = value.get("type")
        if kind == "json_object":
            return {"json_object": True}, name
        if kind == "json_schema":
            schema = (value.get("json_schema") or {}).get("schema") \
                if isinstance(value.get("json_schema"), dict) else None
            if schema is None:
                raise RequestError(400, "response_format.json_schema.schema: a JSON schema "
                                        "is needed with type json_schema",
                                   "response_format.json_schema.schema")
            return {"json": schema}, name
        raise RequestError(400, f"response_format.type: {_brief(kind)} is not one of text, "
                                "json_object, json_schema", "response_format.type")

    # Which fields ask for logprobs, echo, best_of and the token limit: per endpoint.
    def _logprobs(self) -> tuple[int | None, str]:
        return None, "logprobs"

    def _best_of(self) -> int | None:
        return None

    def _echo(self) -> bool:
        return False

    def _continue_final(self) -> bool:
        return False

    def _max_tokens(self) -> tuple[int | None, str]:
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        return self.max_tokens, "max_tokens"

    def plan(self, default_method: str = "cbs", has_scorer: bool = True,
             local_large: bool = True) -> Plan:
        """The search this body asks for and how to answer it; raises RequestError naming the
        field (SearchParams.validate's ranges included)."""
        self.check_neutral()
        sent = self.model_fields_set
        max_tokens, max_field = self._max_tokens()
        names = {"max_new_tokens": max_field}
        common = dict(max_new_tokens=DEFAULTS.max_new_tokens if max_tokens is None else max_tokens,
                      temperature=self.temperature, top_p=self.top_p, min_p=self.min_p,
                      top_k=0 if self.top_k == -1 else self.top_k, seed=self.seed,
                      stop=[self.stop] if isinstance(self.stop, str) else list(self.stop or []),
                      ignore_eos=bool(self.ignore_eos), min_tokens=self.min_tokens,
                      stop_token_ids=list(self.stop_token_ids or []),
                      include_stop_str_in_output=bool(self.include_stop_str_in_output),
                      presence_penalty=self.presence_penalty,
                      frequency_penalty=self.frequency_penalty,
                      repetition_penalty=self.repetition_penalty,
                      logit_bias=self._logit_bias(),
                      allowed_token_ids=list(self.allowed_token_ids or []),
                      bad_words=list(self.bad_words or []))
        common["structured_output"], names["structured_output"] = self.structured()
        try:
            # Every search field is checked, also those this method does not use (k=0 with
            # method=base is a mistake too): SearchParams.validate's ranges, field by field.
            SearchParams(w=self.w, k=self.k, l=self.l, beta=self.beta, **common).validate()
        except InvalidParam as e:
            raise param_error(e, "prompt", names) from None
        n = 1 if self.n is None else self.n
        method = self.method or default_method
        best_of = self._best_of()
        if best_of is not None and best_of < n:
            raise RequestError(400, f"best_of={best_of} is less than n={n}: best_of is how many "
                                    "samples the n choices are the best of", "best_of")
        if best_of is not None and best_of > 1:
            if self.method not in (None, "best_of_n"):
                raise RequestError(400, f"best_of={best_of} asks for Best-of-N, but method="
                                        f"{self.method!r}: leave one of them out", "best_of")
            if "k" in sent and self.k != best_of:
                raise RequestError(400, f"best_of={best_of} and k={self.k} both set Best-of-N's "
                                        "N: leave one of them out", "best_of")
            method, names["k"] = "best_of_n", "best_of"
        if method != "base" and not has_scorer:
            field = "best_of" if names.get("k") == "best_of" else "method"
            raise RequestError(400, f"method={method!r} needs a scorer, and this server runs "
                                    "the large model alone: use method='base'", field)
        self._check_unused(method, n, sent)
        params = self._params(method, n, best_of or self.k, common)
        stream = bool(self.stream)
        options = self.stream_options or StreamOptions()
        if self.stream_options is not None and not stream:
            raise RequestError(400, "stream_options: only with stream=true", "stream_options")
        if options.continuous_usage_stats:
            raise RequestError(400, "stream_options.continuous_usage_stats: not supported by "
                                    "this server (include_usage is)",
                               "stream_options.continuous_usage_stats")
        logprobs, lp_field = self._logprobs()
        if logprobs is not None:
            if not local_large:
                raise RequestError(400, f"{lp_field}: the large model is a black box behind "
                                        "another server here; its log-probs are not available",
                                   lp_field)
        echo = self._echo()
        if echo and logprobs is not None:
            raise RequestError(400, "echo with logprobs would need the prompt's log-probs, "
                                    "which this server does not compute: leave one out", "echo")
        return Plan(params, n, stream, bool(options.include_usage), logprobs, echo, names,
                    self._continue_final(), fit_max_tokens=max_tokens is None)

    def _check_unused(self, method: str, n: int, sent: set):
        """A search field the method does not use, sent at another value than the one the
        method takes, is refused: saying so rather than ignoring it."""
        if method != "cbs" and "w" in sent and self.w != 1:
            raise RequestError(400, f"w={self.w}: method={method!r} keeps one beam; use w=1 or "
                                    "method='cbs'", "w")
        if method != "cbs" and "l" in sent and self.l is not None:
            raise RequestError(400, f"l={self.l}: method={method!r} scores whole responses, not "
                                    "chunks; leave l out or use method='cbs'", "l")
        if method in ("base", "eft") and "k" in sent and self.k != n:
            raise RequestError(400, f"k={self.k}: method={method!r} draws n={n} samples; set n, "
                                    "not k", "k")
        if method != "eft" and "beta" in sent and self.beta != DEFAULTS.beta:
            raise RequestError(400, f"beta={self.beta:g}: only method='eft' uses beta (the "
                                    "weight of the small pair's logits); leave it out or use "
                                    "method='eft'", "beta")

    def _params(self, method: str, n: int, big_n: int, common: dict) -> SearchParams:
        if method == "base":
            return SearchParams.base(n=n, **common)
        if method == "eft":
            return SearchParams.eft(self.beta, n=n, **common)
        if method == "best_of_n":
            if n > big_n:
                raise RequestError(400, f"n={n}: Best-of-N returns the n best of its N={big_n} "
                                        "samples: ask for at most N choices, or a larger N", "n")
            return SearchParams.best_of_n(big_n, keep=n, **common)
        if n > self.w:
            raise RequestError(400, f"n={n}: a search returns its w={self.w} survivors; ask for "
                                    f"at most w choices, or a larger w", "n")
        return SearchParams.cbs(self.w, self.k, self.l, **common)


class CompletionRequest(SearchFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = None
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    best_of: int | None = Field(default=None, ge=1, le=128)

    neutral: ClassVar[dict] = {**NEUTRAL, **COMPLETION_NEUTRAL}

    def _logprobs(self):
        return self.logprobs, "logprobs"

    def _best_of(self):
        return self.best_of

    def _echo(self):
        return bool(self.echo)

    def the_prompts(self) -> list[str | list[int]]:
        """The prompts: a string or token ids, or a list of either (one search each, answered
        as choices index * n ... index * n + n - 1, as OpenAI's API does)."""
        p = self.prompt
        many = isinstance(p, list) and p and isinstance(p[0], (str, list)) or p == []
        prompts = p if many else [p]
        if not prompts:
            raise RequestError(400, "prompt: an empty list: send at least one prompt", "prompt")
        if len(prompts) > MAX_PROMPTS:
            raise RequestError(400, f"prompt: {len(prompts)} prompts in one request, past "
                                    f"{MAX_PROMPTS}: split them over several requests", "prompt")
        for i, one in enumerate(prompts):
            if isinstance(one, list) and not one:
                where = f"prompt.{i}" if many else "prompt"
                raise RequestError(400, f"{where}: no token ids: send a non-empty prompt", where)
        return prompts

    def prompt_chars(self) -> list[int]:
        """Characters of each prompt (a token id counts as one), in the_prompts' order: the
        limit is a prompt's, as each prompt is its own search."""
        return [len(p) for p in self.the_prompts()]


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    role: Literal[(*CHAT_ROLES, "developer")]   # developer: OpenAI's newer name for system
    content: str | list[TextPart]
    name: str | None = None


class ChatCompletionRequest(SearchFields):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    # vLLM's: continue the last message (an assistant prefill) instead of opening a new turn
    continue_final_message: bool | None = None
    add_generation_prompt: bool | None = None
    # vLLM's: the chat templates' own variables, e.g. {"enable_thinking": false} (Qwen3)
    chat_template_kwargs: dict[str, Any] | None = None

    neutral: ClassVar[dict] = {**NEUTRAL, **CHAT_NEUTRAL}

    def _logprobs(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise RequestError(400, "top_logprobs: needs logprobs=true", "top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None, "logprobs"

    def _continue_final(self) -> bool:
        """vLLM's pair: continue_final_message=true needs add_generation_prompt=false (a new
        turn and a continued message are two different prompts); add_generation_prompt=false
        is taken only with it. (That the messages end with the assistant's, the engine
        checks.)"""
        cont = bool(self.continue_final_message)
        opens = self.add_generation_prompt is not False
        if cont and opens:
            raise RequestError(400, "continue_final_message=true continues the last message, "
                                    "add_generation_prompt opens a new turn: send "
                                    "add_generation_prompt=false with it", "add_generation_prompt")
        if not cont and not opens:
            raise RequestError(400, "add_generation_prompt=false: taken only with "
                                    "continue_final_message=true (the last message continued); "
                                    "leave it out", "add_generation_prompt")
        return cont

    def the_prompts(self) -> list[list[dict]]:
        """One prompt: the messages."""
        return [[{"role": m.role, "content": m.content if isinstance(m.content, str) else
                  [p.model_dump() for p in m.content]} for m in self.messages]]

    def prompt_chars(self) -> list[int]:
        """Characters of the one prompt: every message's text."""
        return [sum(len(m.content) if isinstance(m.content, str) else
                    sum(len(p.text) for p in m.content) for m in self.messages)]


MAX_SCORE_PAIRS = 256   # (prompt, response) pairs one score request may hold
# vLLM's score and rerank fields the engine does not implement: at their neutral values only
SCORE_NEUTRAL = {"truncate_prompt_tokens": (), "encoding_format": (), "priority": (0,),
                 "mm_processor_kwargs": (), "activation": (), "use_activation": ()}


class ScoreRequest(BaseModel):
    """vLLM's score API (POST /score, /v1/score), here the engine's scorer: the reward of each
    response (text_2) to its prompt (text_1), what a search ranks its candidates by (the
    small pair's log-likelihood ratio, or the reward models'). Pairs as vLLM's: one prompt
    and one response, one prompt and many responses, or as many prompts as responses."""
    model_config = ConfigDict(extra="allow", strict=True)

    model: str | None = None
    text_1: str | list[str]
    text_2: str | list[str]
    # w2s's: the response ended (its EOS is scored too, as a search scores a response that
    # stopped), one flag for all or one per response; null: true
    finished: bool | list[bool] | None = None
    user: str | None = None

    def pairs(self) -> tuple[list[str], list[str], list[bool]]:
        """(prompts, responses, finished), one entry per pair; raises RequestError."""
        refuse_unless_neutral(self.model_extra, SCORE_NEUTRAL)
        prompts = [self.text_1] if isinstance(self.text_1, str) else list(self.text_1)
        responses = [self.text_2] if isinstance(self.text_2, str) else list(self.text_2)
        for name, texts in (("text_1", prompts), ("text_2", responses)):
            if not texts:
                raise RequestError(400, f"{name}: an empty list: send at least one text", name)
        if len(prompts) == 1:
            prompts = prompts * len(responses)
        elif len(prompts) != len(responses):
            raise RequestError(400, f"text_1 has {len(prompts)} prompts and text_2 "
                                    f"{len(responses)} responses: send one prompt, or one per "
                                    "response", "text_2")
        if len(responses) > MAX_SCORE_PAIRS:
            raise RequestError(400, f"text_2: {len(responses)} responses in one request, past "
                                    f"{MAX_SCORE_PAIRS}: split them over several requests",
                               "text_2")
        finished = True if self.finished is None else self.finished
        flags = [finished] * len(responses) if isinstance(finished, bool) else list(finished)
        if len(flags) != len(responses):
            raise RequestError(400, f"finished: {len(flags)} flags for {len(responses)} "
                                    "responses: send one flag, or one per response", "finished")
        return prompts, responses, flags


class RerankRequest(BaseModel):
    """vLLM's rerank API (Jina's and Cohere's shape): documents (responses) ranked by the
    scorer's reward for the query (the prompt), best first; top_n: that many (null: all)."""
    model_config = ConfigDict(extra="allow", strict=True)

    model: str | None = None
    query: str
    documents: list[str] = Field(min_length=1, max_length=MAX_SCORE_PAIRS)
    top_n: int | None = Field(default=None, ge=1)
    return_documents: bool | None = None      # Cohere's: the text beside each result
    finished: bool | None = None              # w2s's: as ScoreRequest's, one for all
    user: str | None = None

    def check(self):
        refuse_unless_neutral(self.model_extra, SCORE_NEUTRAL)


class TokenizeRequest(BaseModel):
    """vLLM's /tokenize: the large model's token ids of a prompt, as /v1/completions (a
    `prompt`: the text templates) or /v1/chat/completions (`messages`) would feed it."""
    model_config = ConfigDict(extra="allow", strict=True)

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    add_generation_prompt: bool | None = None
    continue_final_message: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    add_special_tokens: bool | None = None
    return_token_strs: bool | None = None

    def the_prompt(self) -> tuple[str | list[dict], bool, int]:
        """(the prompt, whether it is chat messages, its characters); raises RequestError."""
        if (self.prompt is None) == (self.messages is None):
            raise RequestError(400, "send a `prompt` (text) or `messages` (a chat), one of them",
                               "prompt" if self.prompt is None else "messages")
        if self.prompt is not None:
            for name in ("add_generation_prompt", "continue_final_message",
                         "chat_template_kwargs"):
                if getattr(self, name) is not None:
                    raise RequestError(400, f"{name}: for `messages` only", name)
            return self.prompt, False, len(self.prompt)
        chat = ChatCompletionRequest(messages=self.messages,
                                     add_generation_prompt=self.add_generation_prompt,
                                     continue_final_message=self.continue_final_message)
        chat._continue_final()      # vLLM's pair, checked as the chat endpoint checks it
        return chat.the_prompts()[0], True, chat.prompt_chars()[0]


class DetokenizeRequest(BaseModel):
    """vLLM's /detokenize: the large model's text of token ids."""
    model_config = ConfigDict(extra="allow", strict=True)

    model: str | None = None
    tokens: list[int]
