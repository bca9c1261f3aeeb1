"""SearchParams: which search to run and how to sample, with presets for the paper's methods."""

import json
import math
import numbers
from dataclasses import dataclass, field, replace

METHODS = ("cbs", "best_of_n", "base", "eft")

# What the step can run, checked once at the boundary (validate) so that no step ever sees a
# value it cannot: integers go to int32 kernels, seeds are int64, temperatures and beta are
# fp32 factors (1e308 overflows fp32 to inf: uniform noise, or NaN logits).
MAX_INT = 2**31 - 1          # w, k, l, max_new_tokens, top_k (top_k past the vocabulary: off)
MAX_SEED = 2**63             # seeds are in [0, 2**63)
MAX_TEMPERATURE = 100.0      # a sanity bound: OpenAI allows 2, sampling from fp32 needs < 3e38
GREEDY_BELOW = 1e-5          # a temperature below it samples greedily (vLLM's _SAMPLING_EPS)
MAX_ABS_BETA = 100.0
MAX_REPETITION_PENALTY = 10.0
# Below it the step's fp32 division of a positive logit overflows to inf, and every seen
# token ties at inf (a greedy sample of 1e-45 repeated the lowest seen id).
MIN_REPETITION_PENALTY = 1e-6
MAX_LOGIT_BIAS = 1024        # token ids one request may bias (OpenAI allows 300)
MAX_LOGPROBS = 20            # alternatives per token (OpenAI's and vLLM's default bound)
MAX_STOP_STRINGS = 16        # each is searched for after every sampled token
MAX_STOP_CHARS = 256
MAX_STOP_TOKEN_IDS = 64      # vLLM's stop_token_ids: looked up per sampled token
MAX_ALLOWED_TOKEN_IDS = 1024  # vLLM's allowed_token_ids: sent with every beam's step
MAX_BAD_WORDS = 64           # vLLM's bad_words: matched against every beam's last tokens
MAX_BAD_WORD_CHARS = 256
# Structured outputs (vLLM's kinds): a JSON schema, any JSON object, a regex, one of some
# strings, an EBNF grammar (large/guide.py compiles them)
STRUCTURED_KINDS = ("json", "json_object", "regex", "choice", "grammar")
MAX_STRUCTURE_CHARS = 1 << 16
MAX_CHOICES = 256


class InvalidParam(ValueError):
    """A value the engine cannot run: `field` names it ('top_k', 'prompt', 'messages.0.role'),
    `why` says what to change. `owner` prefixes the name in the message ('SearchParams.')."""

    def __init__(self, field: str, value, why: str, owner: str = "", message: str | None = None):
        self.field, self.value, self.why = field, value, why
        super().__init__(message or f"{owner}{field}={_short(value)}: {why}")


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def is_int(value) -> bool:
    """A true integer: bool is not one (`w=True` is a mistake, not 1)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_text(field: str, value: str):
    """A str that is valid Unicode (a lone surrogate such as '\\ud800' is not)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidParam(field, value, f"holds a lone UTF-16 surrogate "
                           f"({value[e.start]!a} at character {e.start}), which is not a "
                           "Unicode character: send valid UTF-8 text") from None


@dataclass
class SearchParams:
    """Chunk-level beam search CBS(W, K, L) and its special cases.

    cbs:        keep the top `w` of w·k candidates every `l` sampled tokens.
    best_of_n:  N full samples (k), the best `w` by reward kept (1 by default; OpenAI's n
                with best_of).
    base:       `k` plain samples from the large model, no small model runs.
    eft:        token-level proxy-tuning, logits_large + beta * (logits_tuned - logits_untuned);
                `k` samples; needs one shared vocabulary.
    """

    method: str = "cbs"
    w: int = 4
    k: int = 4
    l: int | None = 5            # chunk length in large-model tokens; None = until the end
    max_new_tokens: int = 128
    temperature: float = 0.7
    top_k: int = 0               # 0 = off
    top_p: float = 1.0           # 1.0 = off
    min_p: float = 0.0           # 0.0 = off; keeps tokens >= min_p x the most likely one's
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    # vLLM's: large-model token ids that end a response as its EOS does (the token is not
    # in the text, and is scored as the response's end where the small models share the
    # vocabulary); ignore_eos leaves them on.
    stop_token_ids: list[int] = field(default_factory=list)
    # vLLM's: the stop string that ended a response stays at its text's end (and is scored
    # with it); by default the text is cut before it.
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    min_tokens: int = 0          # vLLM's: no EOS, stop token or stop string before this many
    # Penalties on tokens already there (vLLM's and OpenAI's rules, before temperature):
    # presence and frequency on the response's tokens (logit - presence - frequency * count),
    # repetition on the prompt's and the response's (a logit > 0 divided by it, < 0 times it).
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    # OpenAI's logit_bias: large-model token id -> a bias in [-100, 100] added to its logit
    # after the penalties, before temperature (-100 bans a token, 100 all but forces it).
    logit_bias: dict[int, float] = field(default_factory=dict)
    # vLLM's: the large-model token ids a response may hold, no other (empty: every id).
    allowed_token_ids: list[int] = field(default_factory=list)
    # vLLM's: words the response never holds, by the large model's tokens of the word and of
    # the word after a space: the last token of one is banned where the response's tokens
    # end with the rest of it (a one-token word: always).
    bad_words: list[str] = field(default_factory=list)
    # A structure every response follows (vLLM's structured outputs; OpenAI's response_format):
    # one of {"json": a JSON schema (a dict or its text)}, {"json_object": True}, {"regex":
    # str}, {"choice": [str, ...]}, {"grammar": EBNF str}; a JSON one may add "any_whitespace":
    # False (JSON without free whitespace between its tokens: vLLM's disable_any_whitespace,
    # for models that would pad it for ever). A response ends where its structure does, with
    # the model's EOS. None: free text.
    structured_output: dict | None = None
    beta: float = 1.0            # eft only
    trace: bool = False          # record every selection (candidates, rewards, survivors)

    @classmethod
    def cbs(cls, w: int = 4, k: int = 4, l: int = 5, **kw) -> "SearchParams":
        return cls(method="cbs", w=w, k=k, l=l, **kw)

    @classmethod
    def best_of_n(cls, n: int = 16, keep: int = 1, **kw) -> "SearchParams":
        """N full samples; the `keep` best by reward are the results, best first."""
        return cls(method="best_of_n", w=keep, k=n, l=None, **kw)

    @classmethod
    def base(cls, n: int = 1, **kw) -> "SearchParams":
        return cls(method="base", w=1, k=n, l=None, **kw)

    @classmethod
    def eft(cls, beta: float = 1.0, n: int = 1, **kw) -> "SearchParams":
        return cls(method="eft", w=1, k=n, l=None, beta=beta, **kw)

    @property
    def samples(self) -> bool:
        """k independent samples, each a result in sampling order (base and EFT): no
        selection among them."""
        return self.method in ("base", "eft")

    @property
    def candidates(self) -> int:
        """The prompt's children: N for best_of_n (w of them kept), W*K otherwise."""
        return self.k if self.method == "best_of_n" else self.w * self.k

    @property
    def tree(self) -> tuple[int, int]:
        """(W, K) of the search tree the KV reservation sizes: a search without chunks (l None)
        is one fork of the prompt into all its candidates."""
        return (self.w, self.k) if self.l is not None else (1, self.candidates)

    @property
    def chunk_len(self) -> int:
        return self.max_new_tokens if self.l is None else min(self.l, self.max_new_tokens)

    @property
    def adjusts_logits(self) -> bool:
        """Penalties or biases change this request's logits before sampling."""
        return bool(self.presence_penalty or self.frequency_penalty
                    or self.repetition_penalty != 1.0 or self.logit_bias
                    or self.allowed_token_ids or self.bad_words)

    @property
    def stops_on_a_token(self) -> bool:
        """Some token ends a response when sampled: the model's EOS (unless ignore_eos), or a
        stop token id."""
        return not self.ignore_eos or bool(self.stop_token_ids)

    @property
    def uses_small_models(self) -> bool:
        return self.method != "base"

    def copy(self, **changes) -> "SearchParams":
        return replace(self, **changes)

    def validate(self):
        """Raise InvalidParam (a ValueError) naming the field and what to change. Afterwards
        every field holds a value the step can run (stop a list, numbers plain floats)."""
        def bad(name, why):
            raise InvalidParam(name, getattr(self, name), why, "SearchParams.")

        def integer(name, low, why_low):
            value = getattr(self, name)
            if not is_int(value) or not low <= value <= MAX_INT:
                bad(name, f"must be an integer in [{low}, {MAX_INT}]{why_low}")
            setattr(self, name, int(value))

        def real(name, low, high, rule):
            value = getattr(self, name)
            if not is_real(value) or not math.isfinite(value) or not rule(value):
                bad(name, f"must be a finite number in {low}, {high}")
            setattr(self, name, float(value))

        if not isinstance(self.method, str) or self.method not in METHODS:
            bad("method", f"must be one of {', '.join(METHODS)}")
        for name in ("w", "k", "max_new_tokens"):
            integer(name, 1, "")
        if self.l is not None:
            integer("l", 1, ", or None for no chunking")
        integer("min_tokens", 0, "")
        if self.min_tokens > self.max_new_tokens:
            bad("min_tokens", f"must be at most max_new_tokens ({self.max_new_tokens})")
        if self.method == "best_of_n" and self.w > self.k:
            bad("w", f"best_of_n keeps the best w of its k={self.k} samples: use w <= k")
        if self.method in ("base", "eft") and self.w != 1:
            bad("w", f"{self.method} runs no selection: use w=1")
        if self.method != "cbs" and self.l is not None:
            # (else each chunk's samples would fork k ways again, past the KV reserved)
            bad("l", f"{self.method} draws whole samples, not chunks: use l=None "
                     f"(SearchParams.{self.method}(...) sets it) or method='cbs'")
        real("temperature", "[0", f"{MAX_TEMPERATURE:g}] (0 = greedy)",
             lambda t: 0 <= t <= MAX_TEMPERATURE)
        if self.temperature < GREEDY_BELOW:
            # Greedy, as vLLM takes it: fp32 logits divided by it would overflow to ties.
            self.temperature = 0.0
        integer("top_k", 0, " (0 = off; past the vocabulary it keeps every token)")
        real("top_p", "(0", "1] (1 = off)", lambda p: 0 < p <= 1)
        real("min_p", "[0", "1] (0 = off)", lambda p: 0 <= p <= 1)
        real("beta", f"[-{MAX_ABS_BETA:g}", f"{MAX_ABS_BETA:g}]", lambda b: abs(b) <= MAX_ABS_BETA)
        for name in ("presence_penalty", "frequency_penalty"):
            real(name, "[-2", "2] (0 = off), as OpenAI's", lambda x: abs(x) <= 2)
        real("repetition_penalty", f"[{MIN_REPETITION_PENALTY:g}",
             f"{MAX_REPETITION_PENALTY:g}] (1 = off)",
             lambda x: MIN_REPETITION_PENALTY <= x <= MAX_REPETITION_PENALTY)
        if not isinstance(self.logit_bias, dict) or len(self.logit_bias) > MAX_LOGIT_BIAS:
            bad("logit_bias", f"must be a dict of at most {MAX_LOGIT_BIAS} token ids to biases")
        for token, value in self.logit_bias.items():
            if not is_int(token) or not 0 <= token <= MAX_INT:
                raise InvalidParam(f"logit_bias.{token}", token, "a token id must be an "
                                   "integer >= 0 (of the large model's vocabulary)",
                                   "SearchParams.")
            if not is_real(value) or not math.isfinite(value) or abs(value) > 100:
                raise InvalidParam(f"logit_bias.{token}", value, "a bias must be a finite "
                                   "number in [-100, 100]", "SearchParams.")
        self.logit_bias = {int(t): float(v) for t, v in self.logit_bias.items()}
        if self.seed is not None and (not is_int(self.seed) or not 0 <= self.seed < MAX_SEED):
            bad("seed", "must be an integer in [0, 2**63), or None for a random one")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.stop, (list, tuple)) or len(self.stop) > MAX_STOP_STRINGS or any(
                not isinstance(s, str) or not 0 < len(s) <= MAX_STOP_CHARS for s in self.stop):
            bad("stop", f"must be a list of at most {MAX_STOP_STRINGS} non-empty strings of at "
                        f"most {MAX_STOP_CHARS} characters")
        self.stop = list(self.stop)
        for s in self.stop:
            check_text("stop", s)
        if not isinstance(self.stop_token_ids, (list, tuple)) or len(
                self.stop_token_ids) > MAX_STOP_TOKEN_IDS or not all(
                is_int(t) and 0 <= t <= MAX_INT for t in self.stop_token_ids):
            bad("stop_token_ids", f"must be a list of at most {MAX_STOP_TOKEN_IDS} token ids "
                                  "(integers >= 0, of the large model's vocabulary)")
        self.stop_token_ids = sorted({int(t) for t in self.stop_token_ids})
        if not isinstance(self.allowed_token_ids, (list, tuple)) or len(
                self.allowed_token_ids) > MAX_ALLOWED_TOKEN_IDS or not all(
                is_int(t) and 0 <= t <= MAX_INT for t in self.allowed_token_ids):
            bad("allowed_token_ids", f"must be a list of at most {MAX_ALLOWED_TOKEN_IDS} token "
                                     "ids (integers >= 0, of the large model's vocabulary; "
                                     "empty: every id)")
        self.allowed_token_ids = sorted({int(t) for t in self.allowed_token_ids})
        if not isinstance(self.bad_words, (list, tuple)) or len(self.bad_words) > MAX_BAD_WORDS \
                or any(not isinstance(w, str) or not 0 < len(w.strip()) <= MAX_BAD_WORD_CHARS
                       for w in self.bad_words):
            bad("bad_words", f"must be a list of at most {MAX_BAD_WORDS} words (strings with "
                             f"some text, of at most {MAX_BAD_WORD_CHARS} characters)")
        self.bad_words = list(self.bad_words)
        for w in self.bad_words:
            check_text("bad_words", w)
        for name in ("ignore_eos", "include_stop_str_in_output", "trace"):
            if not isinstance(getattr(self, name), bool):
                bad(name, "must be True or False")
        if self.structured_output is not None:
            self._check_structure()

    def _check_structure(self):
        def bad(why):
            raise InvalidParam("structured_output", self.structured_output, why, "SearchParams.")
        spec = self.structured_output
        kinds = [k for k in spec if k in STRUCTURED_KINDS] if isinstance(spec, dict) else []
        if len(kinds) != 1 or len(spec) != 1 + ("any_whitespace" in spec):
            bad(f"must be a dict of one of {', '.join(STRUCTURED_KINDS)} (or None)")
        kind, value = kinds[0], spec[kinds[0]]
        if "any_whitespace" in spec and (kind not in ("json", "json_object")
                                         or not isinstance(spec["any_whitespace"], bool)):
            bad("any_whitespace (True or False) is a JSON structure's option")
        text = value if isinstance(value, str) else None
        if kind == "json" and isinstance(value, dict):
            try:
                text = json.dumps(value)
            except (TypeError, ValueError):
                bad("a JSON schema must be JSON (a dict of JSON values, or its text)")
        if kind == "json_object" and value is not True:
            bad("json_object takes True")
        elif kind == "choice":
            if not isinstance(value, (list, tuple)) or not 0 < len(value) <= MAX_CHOICES or \
                    not all(isinstance(c, str) and c for c in value):
                bad(f"choice takes a list of 1 to {MAX_CHOICES} non-empty strings")
            text = "".join(value)
        elif kind != "json_object" and (not isinstance(text, str) or not text.strip()):
            bad(f"{kind} takes a non-empty string{' or a dict' if kind == 'json' else ''}")
        if text is not None:
            if len(text) > MAX_STRUCTURE_CHARS:
                bad(f"at most {MAX_STRUCTURE_CHARS} characters")
            check_text("structured_output", text)
        # A finished structure leaves only the end tokens: these would leave no token at all.
        if self.ignore_eos:
            bad("ignore_eos samples past the end, where a finished structure allows no token: "
                "leave ignore_eos out")
        if self.min_tokens:
            bad("min_tokens bans the end, which a structure finished sooner needs: leave "
                "min_tokens out")


# The one set of defaults: the Python API (SearchParams()), `w2s search` and the server's
# request fields all read them from here (read-only).
DEFAULTS = SearchParams()
