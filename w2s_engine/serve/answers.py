"""OpenAI's response shapes for a search: a whole completion or chat completion, and the
server-sent event chunks of a streamed one (text deltas per choice, finish reasons, usage),
with the large model's log-probabilities in OpenAI's format."""

import time

from w2s_engine.outputs import SearchResult
from w2s_engine.search.tokens import token_bytes
from w2s_engine.serve.finite_json import dumps
from w2s_engine.serve.protocol import Plan


# ---- responses --------------------------------------------------------------------------------

def usage(result: SearchResult, n: int) -> dict:
    prompt = result.stats.prompt_tokens
    completion = sum(h.num_tokens for h in result.hypotheses[:n])
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def sum_usage(usages: list[dict]) -> dict:
    return {key: sum(u[key] for u in usages) for key in usages[0]}


def combine(answers: list[dict]) -> dict:
    """The whole answers to a request's prompts as one: their choices in order, usage summed;
    the w2s extra is the one search's view, or a list of them, one per prompt."""
    if len(answers) == 1:
        return answers[0]
    return {**answers[0], "choices": [c for a in answers for c in a["choices"]],
            "usage": sum_usage([a["usage"] for a in answers]),
            "w2s": [a["w2s"] for a in answers]}


def _extra(result: SearchResult) -> dict:
    """The search's own view, under 'w2s': rewards, every survivor, the work it took."""
    return {"reward": result.reward, "finish_reason": result.finish_reason,
            "hypotheses": [{"text": h.text, "reward": h.reward, "finished": h.finished,
                            "finish_reason": h.finish_reason, "chunk_rewards": h.chunk_rewards}
                           for h in result.hypotheses],
            "stats": {"tokens_forwarded": result.stats.tokens_forwarded,
                      "cached_prompt_tokens": result.stats.cached_prompt_tokens,
                      "tokens_sampled": result.stats.tokens_sampled,
                      "peak_kv_blocks": result.stats.peak_kv_blocks,
                      "chunks": result.stats.chunks, "seconds": result.stats.seconds}}


class Logprobs:
    """OpenAI's logprobs objects from Hypothesis.logprobs (token strings from the large
    model's tokenizer, one token at a time, as vLLM shows them)."""

    def __init__(self, tokenizer, hypotheses):
        ids = sorted({i for h in hypotheses for e in h.logprobs or ()
                      for i in (e.token_id, *(t for t, _ in e.top))})
        texts = tokenizer.batch_decode([[i] for i in ids]) if ids else []
        self.text = dict(zip(ids, texts))
        self.bytes = dict(zip(ids, token_bytes(tokenizer, ids, texts)))

    def completion(self, entries) -> dict:
        tokens = [self.text[e.token_id] for e in entries]
        offsets, at = [], 0
        for t in tokens:
            offsets.append(at)
            at += len(t)
        return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
                "top_logprobs": [{**{self.text[t]: lp for t, lp in e.top},
                                  self.text[e.token_id]: e.logprob} for e in entries],
                "text_offset": offsets}

    def _token(self, token_id: int, logprob: float) -> dict:
        text = self.text[token_id]
        return {"token": text, "logprob": logprob, "bytes": list(self.bytes[token_id])}

    def chat(self, entries) -> dict:
        return {"content": [{**self._token(e.token_id, e.logprob),
                             "top_logprobs": [self._token(t, lp) for t, lp in e.top]}
                            for e in entries], "refusal": None}


class Answer:
    """One request's response: OpenAI's completion or chat completion object, whole or as
    stream chunks."""

    def __init__(self, chat: bool, model: str, rid: str, plan: Plan, echo_text: str = "",
                 first_index: int = 0):
        self.chat, self.model, self.plan, self.echo_text = chat, model, plan, echo_text
        self.first_index = first_index   # this prompt's choices: first_index ... + n - 1
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{rid}"
        self.object = "chat.completion" if chat else "text_completion"
        self.created = int(time.time())

    def _head(self, obj: str) -> dict:
        # system_fingerprint: OpenAI's field for the backend's configuration; none here (null,
        # as OpenAI sends it where it has none)
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": None}

    def whole(self, result: SearchResult, tokenizer) -> dict:
        hyps = result.hypotheses[:self.plan.n]
        lp = Logprobs(tokenizer, hyps) if self.plan.logprobs is not None else None
        if self.chat:
            choices = [{"index": self.first_index + i,
                        "message": {"role": "assistant", "content": h.text},
                        "logprobs": lp.chat(h.logprobs) if lp else None,
                        "finish_reason": h.finish_reason, "stop_reason": h.stop_reason}
                       for i, h in enumerate(hyps)]
        else:
            choices = [{"index": self.first_index + i, "text": self.echo_text + h.text,
                        "logprobs": lp.completion(h.logprobs) if lp else None,
                        "finish_reason": h.finish_reason, "stop_reason": h.stop_reason}
                       for i, h in enumerate(hyps)]
        return {**self._head(self.object), "choices": choices,
                "usage": usage(result, self.plan.n), "w2s": _extra(result)}

    # ---- streaming -----------------------------------------------------------------------

    def chunk(self, choices: list[dict], **more) -> str:
        body = {**self._head("chat.completion.chunk" if self.chat else "text_completion"),
                "choices": choices, **more}
        if self.plan.include_usage and "usage" not in body:
            body["usage"] = None
        return f"data: {dumps(body)}\n\n"

    def piece(self, index: int, text: str | None, finish_reason=None, role=False,
              logprobs=None, stop_reason=None) -> dict:
        index += self.first_index
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else (
                {} if text is None else {"content": text})
            return {"index": index, "delta": delta, "logprobs": logprobs,
                    "finish_reason": finish_reason, "stop_reason": stop_reason}
        return {"index": index, "text": text or "", "logprobs": logprobs,
                "finish_reason": finish_reason, "stop_reason": stop_reason}

    def opening(self) -> list[str]:
        """Chat: the role first; completions with echo: the prompt first."""
        n = self.plan.n
        if self.chat:
            return [self.chunk([self.piece(i, None, role=True)]) for i in range(n)]
        if self.echo_text:
            return [self.chunk([self.piece(i, self.echo_text)]) for i in range(n)]
        return []

    def step(self, deltas, tokenizer=None) -> list[str]:
        """One engine step's deltas as chunks; the step that carries the result finishes every
        choice: its rest of the text and its finish_reason in one last content chunk each (the
        usage chunk, with stream_options.include_usage, is the server's, after every prompt).
        Log-probs, when asked for, come whole in each choice's last chunk: until a search ends,
        the text its candidates share is final, but not the tokens behind it (a concatenation
        of the chunks' log-probs is the choice's, as OpenAI's clients build it)."""
        result = next((d.result for d in deltas if d.result is not None), None)
        if result is None:
            return [self.chunk([self.piece(d.index, d.text)]) for d in deltas if d.text]
        rest = {}
        for d in deltas:
            rest[d.index] = rest.get(d.index, "") + d.text
        hyps = result.hypotheses[:self.plan.n]
        lp = Logprobs(tokenizer, hyps) if self.plan.logprobs is not None else None
        out = []
        per_beam = self.plan.params.samples   # n samples (base, EFT) stream side by side
        for i, h in enumerate(hyps):
            # a search streams its best answer; the other n-1 best come whole at the end
            text = h.text if i and not per_beam else rest.get(i, "")
            logprobs = None if lp is None else (lp.chat(h.logprobs) if self.chat
                                                else lp.completion(h.logprobs))
            out.append(self.chunk([self.piece(i, text or None, h.finish_reason,
                                              logprobs=logprobs, stop_reason=h.stop_reason)],
                                  **({"w2s": _extra(result)} if i == len(hyps) - 1 else {})))
        return out
