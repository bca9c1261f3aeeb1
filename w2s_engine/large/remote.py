"""RemoteLarge: a black-box large model behind an OpenAI-compatible completions endpoint.

Text in, text out, no KV here: every chunk asks the server for continuations of at most L
tokens of prompt + response text (large/openai_completions.py). Children of one parent share
its text, so each family is one request for n=K continuations, and all families of a
request go out at once. The server tokenizes, checks its own context and cuts the stop
strings inside each continuation it writes; the engine cuts one that spans two chunks (or one
a server left in). A beam keeps its response as text and the server's token count.

A request's calls are not waited for together with the others': each step starts the calls
of the requests that need a chunk and takes the answers of those whose calls are all back
(waiting at most WAIT_S for one), so a slow answer holds up its own request only, and a
request that ends (cancelled, failed) has its calls in flight aborted. (Calls share the
backend's max_in_flight slots: slow calls that fill them all delay the others' calls too.)
"""

import concurrent.futures
from dataclasses import dataclass

from w2s_engine.large.openai_completions import CompletionJob, OpenAICompletions
from w2s_engine.params import InvalidParam, SearchParams
from w2s_engine.search.request import FailedBy, SearchRequest, mix_seed
from w2s_engine.search.sequence import Beam


def first_stop(text: str, stops, new_from: int) -> tuple[int, str] | None:
    """(where the first stop string in text starts, which), among those that end past
    new_from (the text a call added): the server cuts the stop strings inside one
    continuation, not one that spans two chunks' calls, and some servers leave the match in.
    None: no stop."""
    hits = [(i, j, stop) for j, stop in enumerate(stops)
            if (i := text.find(stop, max(0, new_from - len(stop) + 1))) >= 0]
    return min(hits)[::2] if hits else None


# How long a step waits for some request's calls to come back before it returns to the engine
# (which then takes cancels and new requests and steps again).
WAIT_S = 0.05


@dataclass
class Calls:
    """A request's chunk calls in flight: one job per family of siblings."""
    request: SearchRequest
    families: list[list[Beam]]
    answers: concurrent.futures.Future      # of a list: each job's choices, or its error


class RemoteLarge:

    tokenizer = None    # the server's, unknown here
    eos_ids: set[int] = set()
    blocks = None       # no KV pool
    eft = None          # EFT needs the large model's logits
    decode_steps = 0    # no decode here: the server samples
    runs_ahead = False  # no decode step of unread tokens (answers are taken as they come)

    def __init__(self, client: OpenAICompletions):
        self.client = client
        self.in_flight: dict[int, Calls] = {}    # request id -> its calls

    def check_params(self, params: SearchParams):
        """Refuse what a completions API cannot do as the search means it, never ignore it."""
        for name in ("top_k", "min_p", "min_tokens", "ignore_eos", "stop_token_ids",
                     "include_stop_str_in_output", "allowed_token_ids", "bad_words",
                     "structured_output"):
            if getattr(params, name):
                raise InvalidParam(name, getattr(params, name), "the large model is a black "
                                   "box behind an OpenAI completions API, which has no "
                                   f"{name}: leave it out")
        # Its penalties would count only the chunk each call writes (the response so far is
        # in its prompt): not the search's rule.
        for name, off in (("presence_penalty", 0.0), ("frequency_penalty", 0.0),
                          ("repetition_penalty", 1.0)):
            if getattr(params, name) != off:
                raise InvalidParam(name, getattr(params, name), "the large model is a black "
                                   "box, whose server would count only the chunk each call "
                                   f"writes: leave it out (or {off:g})")

    def encode_prompt(self, text: str, special: bool, max_new_tokens: int) -> list[int]:
        return []  # the server tokenizes, and checks its own context

    def new_table(self):
        return None

    def prefill(self, requests: list[SearchRequest], max_tokens: int) -> list[SearchRequest]:
        return requests  # the server sees the prompt with every chunk

    def advance(self, requests: list[SearchRequest]) -> list[tuple[SearchRequest, str]]:
        """Start the chunk calls of these requests' beams that need one (one whole chunk per
        beam, a call per family of siblings) and take the answers that are back. Returns the
        requests whose server calls failed, with why."""
        running = {r.request_id for r in requests}
        for rid in [rid for rid in self.in_flight if rid not in running]:
            self.drop(self.in_flight[rid].request)     # ended meanwhile
        for r in requests:
            if r.request_id not in self.in_flight:
                self._start(r)
        if not self.in_flight:
            return []
        concurrent.futures.wait([c.answers for c in self.in_flight.values()], timeout=WAIT_S,
                                return_when=concurrent.futures.FIRST_COMPLETED)
        failed = []
        for rid, calls in list(self.in_flight.items()):
            if calls.answers.done():
                del self.in_flight[rid]
                why = self._take(calls)
                if why is not None:
                    failed.append((calls.request, why))
        return failed

    def drop(self, r: SearchRequest):
        """Abort an ended request's calls in flight."""
        calls = self.in_flight.pop(r.request_id, None)
        if calls is not None:
            calls.answers.cancel()

    def _start(self, r: SearchRequest):
        families = {}
        for b in r.generating:
            families.setdefault(b.parent_id, []).append(b)
        if not families:
            return
        p = r.params
        jobs = [CompletionJob(
            prompt=r.large_prompt_text + beams[0].text, n=len(beams),
            max_tokens=min(p.chunk_len, p.max_new_tokens - beams[0].num_large_tokens),
            temperature=p.temperature, top_p=p.top_p, stop=list(p.stop),
            logit_bias=dict(p.logit_bias),
            seed=mix_seed(r.seed, beams[0].beam_id) if p.seed is not None else None)
            for beams in families.values()]
        self.in_flight[r.request_id] = Calls(r, list(families.values()),
                                             self.client.submit(jobs))

    def _take(self, calls: Calls) -> str | None:
        """Record a request's answered chunk in its beams -> why it failed, or None."""
        r = calls.request
        answers = calls.answers.result()
        for answer in answers:
            if isinstance(answer, Exception):
                r.failed_by = (FailedBy.REQUEST if getattr(answer, "refused", False)
                               else FailedBy.LARGE_SERVER)
                return f"{type(answer).__name__}: {answer}"
        for beams, answer in zip(calls.families, answers):
            for b, choice in zip(beams, answer):
                before = len(b.text)
                if not before and not b.num_large_tokens:
                    # The first chunk's call sent the prompt alone: its size as the server
                    # counts it is the request's prompt_tokens (usage), as it bills them.
                    r.stats.prompt_tokens = max(r.stats.prompt_tokens, choice.prompt_tokens)
                b.text += choice.text
                b.num_large_tokens += choice.num_tokens
                r.stats.tokens_sampled += choice.num_tokens
                b.chunk_tokens = r.params.chunk_len  # one call is one whole chunk
                if choice.finish_reason == "stop":
                    b.finished, b.finish_reason = True, "stop"
                    b.stop_reason = choice.stop_reason
                elif b.num_large_tokens >= r.params.max_new_tokens:
                    b.finished, b.finish_reason = True, "length"
                cut = first_stop(b.text, r.params.stop, before)
                if cut is not None:
                    b.text = b.text[:cut[0]]
                    b.finished, b.finish_reason, b.stop_reason = True, "stop", cut[1]
        return None

    def response_text(self, b: Beam) -> str:
        return b.text  # cut at its first stop string

    def num_tokens(self, b: Beam) -> int:
        return b.num_large_tokens
