"""RemoteLarge: a black-box large model behind an OpenAI-compatible completions endpoint.

Text in, text out, no KV here: every chunk asks the server for continuations of at most L
tokens of prompt + response text (large/openai_completions.py). Children of one parent share
its text, so each family is one request for n=K continuations, and all families of all
requests go out at once. The server tokenizes, checks its own context and cuts the stop
strings inside each continuation it writes; the engine cuts one that spans two chunks (or one
a server left in). A beam keeps its response as text and the server's token count.
"""

from w2s_engine.large.openai_completions import CompletionJob, OpenAICompletions
from w2s_engine.params import InvalidParam, SearchParams
from w2s_engine.search.request import SearchRequest, mix_seed
from w2s_engine.search.sequence import Beam


def first_stop(text: str, stops, new_from: int) -> int | None:
    """Where the first stop string in text starts, among those that end past new_from (the
    text a call added): the server cuts the stop strings inside one continuation, not one
    that spans two chunks' calls, and some servers leave the match in. None: no stop."""
    hits = [i for stop in stops
            if (i := text.find(stop, max(0, new_from - len(stop) + 1))) >= 0]
    return min(hits) if hits else None


class RemoteLarge:

    tokenizer = None    # the server's, unknown here
    eos_ids: set[int] = set()
    blocks = None       # no KV pool
    eft = None          # EFT needs the large model's logits
    decode_steps = 0    # no decode here: the server samples
    runs_ahead = False  # each chunk is waited for

    def __init__(self, client: OpenAICompletions):
        self.client = client

    def check_params(self, params: SearchParams):
        """Refuse what a completions API cannot do as the search means it, never ignore it."""
        for name in ("top_k", "min_p", "min_tokens", "ignore_eos"):
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
        """Ask for every pending chunk of these requests at once (one whole chunk per beam).
        Returns the requests whose server calls failed, with why."""
        families = {}
        for r in requests:
            for b in r.generating:
                families.setdefault((r.request_id, b.parent_id), (r, []))[1].append(b)
        if not families:
            return []
        jobs = []
        for r, beams in families.values():
            p, b = r.params, beams[0]
            jobs.append(CompletionJob(
                prompt=r.large_prompt_text + b.text, n=len(beams),
                max_tokens=min(p.chunk_len, p.max_new_tokens - b.num_large_tokens),
                temperature=p.temperature, top_p=p.top_p, stop=list(p.stop),
                logit_bias=dict(p.logit_bias),
                seed=mix_seed(r.seed, b.beam_id) if p.seed is not None else None))
        answers = self.client.complete_many(jobs)
        failed = {}
        for (r, beams), answer in zip(families.values(), answers):
            if r.request_id in failed:
                continue
            if isinstance(answer, Exception):
                failed[r.request_id] = (r, f"{type(answer).__name__}: {answer}")
                continue
            for b, choice in zip(beams, answer):
                before = len(b.text)
                b.text += choice.text
                b.num_large_tokens += choice.num_tokens
                r.stats.tokens_sampled += choice.num_tokens
                b.chunk_tokens = r.params.chunk_len  # one call is one whole chunk
                if choice.finish_reason == "stop":
                    b.finished, b.finish_reason = True, "stop"
                elif b.num_large_tokens >= r.params.max_new_tokens:
                    b.finished, b.finish_reason = True, "length"
                cut = first_stop(b.text, r.params.stop, before)
                if cut is not None:
                    b.text = b.text[:cut]
                    b.finished, b.finish_reason = True, "stop"
        return list(failed.values())

    def response_text(self, b: Beam) -> str:
        return b.text  # cut at its first stop string

    def num_tokens(self, b: Beam) -> int:
        return b.num_large_tokens
