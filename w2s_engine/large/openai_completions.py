"""A large model behind an OpenAI-compatible completions endpoint (vLLM, SGLang, llama.cpp).

The engine asks it for K continuations of at most L tokens of prompt + response text and
scores them locally with the small models. All chunks of one engine step go out at once, on
an event loop owned by this backend (async HTTP, at most max_in_flight calls in flight for
all requests together); the openai client retries 408 / 409 / 429 / 5xx and connection errors
with exponential backoff, and each call, its retries included, has `timeout` seconds in all
(httpx's own timeout restarts with every byte a slow server sends).
"""

import asyncio
import concurrent.futures
import threading
from dataclasses import dataclass, field


class RemoteModelError(RuntimeError):
    """The server kept failing (after retries) or answered something unusable; refused: it
    answered that the call itself is invalid (a prompt past its context, a parameter it does
    not take), which the request's sender has to change rather than retry."""

    def __init__(self, message: str, refused: bool = False):
        super().__init__(message)
        self.refused = refused


@dataclass
class CompletionJob:
    prompt: str                  # prompt + response text so far
    n: int                       # continuations wanted
    max_tokens: int
    temperature: float
    top_p: float
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    logit_bias: dict[int, float] = field(default_factory=dict)   # the server's token ids


@dataclass
class Choice:
    text: str
    finish_reason: str           # "stop" (EOS or stop string) or "length"
    num_tokens: int              # the server's tokens in this continuation
    prompt_tokens: int = 0       # the server's tokens in the call's prompt (0: it did not say)
    stop_reason: str | None = None   # the stop string it ended on, where the server says


# What the openai client retries: connection errors and timeouts, and these statuses.
RETRIED_STATUSES = {408, 409, 429} | set(range(500, 600))
# What a server answers for a call it takes as invalid (vLLM: 400 for a prompt past the
# model's context; 413 a body too large; 422 a field it cannot parse).
REFUSED_STATUSES = {400, 413, 422}


def _failure(e, base_url: str, max_retries: int) -> str:
    """The message of a call that failed: what the server said, and what to change."""
    import openai
    status = getattr(e, "status_code", None)
    retried = status is None or status in RETRIED_STATUSES
    tried = f" (after {max_retries} retries)" if retried and max_retries else ""
    hint = {401: ": check the API key (--large-api-key, or api_key=)",
            403: ": check the API key (--large-api-key, or api_key=)",
            404: ": check the model name (--large-model) and that the URL is the server's "
                 "/v1 base (http://host:port/v1)"}.get(status, "")
    if isinstance(e, openai.APIConnectionError) and not isinstance(e, openai.APITimeoutError):
        hint = ": is the server up at that URL?"
    return f"the large-model server at {base_url} failed{tried}: {e}{hint}"


class OpenAICompletions:

    def __init__(self, base_url: str, model: str, api_key: str | None = None,
                 timeout: float = 120.0, max_retries: int = 4, max_in_flight: int = 32):
        """timeout: seconds one call may take in all, retries included (then the request it
        belongs to fails); max_in_flight: calls at once, for all requests together."""
        try:
            import openai  # noqa: F401
        except ImportError as e:
            raise ImportError("the black-box backend needs the openai client: "
                              "pip install openai") from e
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api_key = api_key or "not-needed"
        self.timeout = timeout
        self.max_retries = max_retries
        self.max_in_flight = max_in_flight
        self._closed = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="w2s-openai-backend")
        self._thread.start()
        self._client = self._run(self._make_client())
        self._limit = self._run(self._make_semaphore())

    def __repr__(self):
        return f"OpenAICompletions({self.base_url!r}, model={self.model!r})"

    async def _make_client(self):
        import openai
        return openai.AsyncOpenAI(base_url=self.base_url, api_key=self.api_key,
                                  timeout=self.timeout, max_retries=self.max_retries)

    async def _make_semaphore(self):
        return asyncio.Semaphore(self.max_in_flight)

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def complete_many(self, jobs: list[CompletionJob]) -> list[list[Choice] | Exception]:
        """Run all jobs concurrently; each gives its choices or the exception that ended it."""
        return self.submit(jobs).result()

    def submit(self, jobs: list[CompletionJob]) -> concurrent.futures.Future:
        """Start all jobs concurrently -> a future of complete_many's list; cancelling it
        aborts the calls still in flight."""
        if self._closed:   # its loop is stopped: the future would never resolve
            raise RemoteModelError(f"this backend for {self.base_url} was closed: make a new "
                                   "OpenAICompletions")
        async def gather():
            return await asyncio.gather(*(self._complete(j) for j in jobs), return_exceptions=True)
        return asyncio.run_coroutine_threadsafe(gather(), self._loop)

    async def _complete(self, job: CompletionJob) -> list[Choice]:
        import openai
        choices: list[Choice] = []
        while len(choices) < job.n:
            want = job.n - len(choices)
            kwargs = dict(model=self.model, prompt=job.prompt, n=want, max_tokens=job.max_tokens,
                          temperature=job.temperature, top_p=job.top_p)
            if job.stop:
                kwargs["stop"] = job.stop
            if job.logit_bias:
                kwargs["logit_bias"] = {str(t): v for t, v in job.logit_bias.items()}
            if job.seed is not None:
                # Servers that ignore n answer one choice per request: vary the seed per try.
                kwargs["seed"] = (job.seed + len(choices)) % (1 << 31)
            try:
                async with self._limit:   # (the deadline counts from the call, not the queue)
                    resp = await asyncio.wait_for(self._client.completions.create(**kwargs),
                                                  self.timeout)
            except asyncio.TimeoutError as e:
                raise RemoteModelError(
                    f"the large-model server at {self.base_url} did not answer a call within "
                    f"{self.timeout:g} s, retries included: raise the timeout "
                    "(--large-timeout, or timeout=) if it is busy rather than stuck") from e
            except openai.APIError as e:
                refused = getattr(e, "status_code", None) in REFUSED_STATUSES
                raise RemoteModelError(_failure(e, self.base_url, self.max_retries),
                                       refused) from e
            except ValueError as e:    # a 200 whose body is not JSON
                raise RemoteModelError(f"the large-model server at {self.base_url} answered "
                                       f"with a body that is not JSON ({e})") from e
            if not isinstance(getattr(resp, "choices", None), list):
                error = (getattr(resp, "model_extra", None) or {}).get("error")
                got = f"the error {error}" if error else repr(str(resp)[:80])
                raise RemoteModelError(
                    f"the large-model server at {self.base_url} answered with no completion "
                    f"object (got {got}): is it an OpenAI-compatible /v1 URL?")
            if not resp.choices:
                raise RemoteModelError(f"the large-model server at {self.base_url} returned no choices")
            choices += _choices(resp, job, want, self.base_url)
        return choices

    def close(self):
        """Close the connections and stop the loop; later searches over it fail, saying so."""
        self._closed = True
        if self._loop.is_running():
            self._run(self._client.close())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)


# finish_reason values that mean the continuation ended (EOS or a stop string): OpenAI's and
# vLLM's "stop", and older TGI's and other servers' names for the same.
STOPPED = {"stop", "eos_token", "stop_sequence", "eos"}
# ... and that it was cut by max_tokens (None: a server that does not say).
CUT = {"length", "max_tokens", None}


def _finish(reason, base_url: str) -> str:
    """'stop' (the continuation ended) or 'length' (cut by max_tokens); a continuation the
    server aborted or filtered is no sample of the model: the request fails."""
    if reason in STOPPED:
        return "stop"
    if reason in CUT:
        return "length"
    raise RemoteModelError(f"the large-model server at {base_url} ended a continuation with "
                           f"finish_reason={reason!r} (not a sample the search can use)")


def _choices(resp, job: CompletionJob, want: int, base_url: str = "") -> list[Choice]:
    """Per-choice token counts without asking for logprobs (which some servers make slow):
    a continuation cut by length used max_tokens; the rest share what usage reports."""
    got = resp.choices[:want]
    for c in got:
        if not isinstance(getattr(c, "text", None), str):
            raise RemoteModelError(f"the large-model server at {base_url} returned a choice "
                                   f"without text ({getattr(c, 'text', None)!r})")
        try:
            c.text.encode("utf-8")
        except UnicodeEncodeError as e:   # a lone surrogate (\ud800) in its JSON
            raise RemoteModelError(f"the large-model server at {base_url} returned text that "
                                   f"is not valid Unicode ({e.reason} at {e.start})") from None
    reasons = [_finish(c.finish_reason, base_url) for c in got]
    n_stop = reasons.count("stop")
    usage = getattr(resp, "usage", None)
    total = getattr(usage, "completion_tokens", None) if len(resp.choices) == len(got) else None
    if isinstance(total, int) and not isinstance(total, bool) and n_stop:
        # (a count past max_tokens is the server's mistake: a continuation has at most that)
        per_stop = min(job.max_tokens,
                       max(1, (total - job.max_tokens * (len(got) - n_stop)) // n_stop))
    else:
        per_stop = 1
    prompt_tokens = getattr(usage, "prompt_tokens", None)
    prompt_tokens = prompt_tokens if isinstance(prompt_tokens, int) else 0
    return [Choice(c.text, r, job.max_tokens if r == "length" else per_stop, prompt_tokens,
                   _stop_string(c, job) if r == "stop" else None)
            for c, r in zip(got, reasons)]


def _stop_string(choice, job: CompletionJob) -> str | None:
    """The stop string a continuation ended on, where its server names it (vLLM's
    stop_reason, one of the job's stop strings); None for EOS or a server that does not say."""
    reason = (getattr(choice, "model_extra", None) or {}).get("stop_reason")
    return reason if isinstance(reason, str) and reason in job.stop else None
