"""SearchRequest: the chunk-level beam search of one prompt, as a state machine.

It owns its beams and their block tables but runs no model: the engine batches the forwards
of all requests and calls back into here to fork children, record samples and select.

CBS(W, K, L), as DESIGN.md specifies it:
- the root (the prefilled prompt) is forked into W*K children;
- every live child samples up to L tokens, then all candidates are scored;
- the top W survive (ties: lower candidate index first); an unfinished survivor is forked into
  K children, a finished one is carried once as a final hypothesis; losers are freed at once;
- the search ends when every survivor is finished (EOS, stop string or max_new_tokens).
"""

import logging
import math
import time
from dataclasses import dataclass, field
from enum import Enum

import numpy as np

from w2s_engine.cache.block_manager import BlockManager
from w2s_engine.outputs import Hypothesis, SearchResult, SearchStats, TokenLogprob
from w2s_engine.params import SearchParams
from w2s_engine.search.sequence import Beam
from w2s_engine.search.stream import FinalText, SearchDelta

log = logging.getLogger("w2s_engine")


def best_first(rewards: list[float]) -> list[int]:
    """Indices by reward, best first, ties in their order. A NaN reward (a small model's
    forward that overflowed: float16, broken weights) ranks below every number: Python's
    sort would leave it wherever it stood, where it could win the selection, and keep its
    NaN in every descendant's reward."""
    return sorted(range(len(rewards)),
                  key=lambda i: (True, 0.0, i) if math.isnan(rewards[i]) else
                  (False, -rewards[i], i))

def mix_seeds(seeds: np.ndarray, beam_ids: np.ndarray) -> np.ndarray:
    """splitmix64 of (seed, beam) pairs, uint64 arrays in (arithmetic wraps mod 2**64), uint64
    out below 2**63: a beam's noise depends on nothing else."""
    with np.errstate(over="ignore"):
        z = seeds * np.uint64(0x9E3779B97F4A7C15) + beam_ids + np.uint64(1)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return (z ^ (z >> np.uint64(31))) & np.uint64((1 << 63) - 1)


def mix_seed(seed: int, beam_id: int) -> int:
    """mix_seeds of one pair."""
    return int(mix_seeds(np.array([seed], np.uint64), np.array([beam_id], np.uint64))[0])


class RequestStatus(str, Enum):
    """Where a request is; it ends in exactly one of DONE, FAILED, CANCELLED.
    (A str, so that `status == "done"` reads as it did.)"""

    WAITING = "waiting"
    PREFILLING = "prefilling"    # admitted: its prompt goes through the large model in chunks
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def ended(self) -> bool:
        return self in (RequestStatus.DONE, RequestStatus.FAILED, RequestStatus.CANCELLED)


class FailedBy(str, Enum):
    """Whose fault a failed request's end is (a server answers 500, 502 or 400 for it)."""

    ENGINE = "engine"                # an error inside this engine
    LARGE_SERVER = "large server"    # the black-box large model's server failed or answered
                                     # something unusable
    REQUEST = "request"              # that server refused what the request asks of it as
                                     # invalid (a prompt past its context, a parameter it refuses)
    SHUTDOWN = "shutdown"            # the engine's driver shut down before the request ended


@dataclass
class KVSpace:
    """The block managers a request's beams live in: the large pool and one per small stream."""

    large: BlockManager | None
    small: list[BlockManager]


# eq=False: a request is itself, not its fields' values (the scheduler finds it in its queues
# by identity: comparing some 25 fields per queued request made cancelling a deep queue O(N^2)
# tuple builds, seconds with the engine loop stalled)
@dataclass(eq=False)
class SearchRequest:
    request_id: int
    prompt: str
    params: SearchParams
    seed: int
    large_prompt_ids: list[int]
    small_prompts: list = field(default_factory=list)   # SmallPrompt per small stream
    reserved: dict = field(default_factory=dict)        # pool name -> blocks reserved
    status: RequestStatus = RequestStatus.WAITING
    error: str | None = None
    failed_by: FailedBy = FailedBy.ENGINE   # (when FAILED)
    # Why its chunk's scoring waits for KV room that another request's end frees (its
    # response re-tokenized longer than reserved: Scorer.NoRoomYet); None: it does not.
    waits_for_room: str | None = None
    root: Beam | None = None
    root_logits: object = None   # [V] logits after the prompt, shared by the first children
    beams: list[Beam] = field(default_factory=list)     # the current candidates
    next_beam_id: int = 0
    stats: SearchStats = field(default_factory=SearchStats)
    trace: list[dict] = field(default_factory=list)
    result: SearchResult | None = None
    large_prompt_text: str = ""
    reported_stream: int | None = 0    # whose response tokens are small_token_ids (Scorer's)
    prefilled: int = 0           # large-model prompt tokens in the cache so far
    stream: FinalText | None = None                     # set when the request streams
    deltas: list[SearchDelta] = field(default_factory=list)  # streamed, not yet taken
    started: float = field(default_factory=time.perf_counter)
    # The large model's log-probs of the sampled tokens, with this many alternatives each
    # (None: not recorded); per beam id, inherited on fork (a local large model only).
    logprobs: int | None = None
    token_logprobs: dict[int, list[TokenLogprob]] = field(default_factory=dict)
    warned_nan: bool = False     # a NaN reward was logged (once a request)
    # params.bad_words as the large model's token sequences (LocalLarge.bad_word_ids)
    bad_word_ids: tuple[tuple[int, ...], ...] = ()
    grammar: object = None        # params.structured_output compiled (large/guide.py)

    # ---- beams -------------------------------------------------------------------------

    def new_beam_id(self) -> int:
        self.next_beam_id += 1
        return self.next_beam_id - 1

    def _fork(self, parent: Beam, kv: KVSpace, take_over: bool, reuse: Beam | None = None) \
            -> Beam:
        """A child with the parent's history; `take_over` hands it the parent's own tables;
        `reuse`: a beam being dropped, whose tables become the child's (fork_into)."""
        if take_over:
            large, small = parent.large, parent.small
        elif reuse is not None:
            large = reuse.large
            if parent.large is not None:
                kv.large.fork_into(large, parent.large)
            small = [s.fork(m, into=mine) for s, m, mine in zip(parent.small, kv.small,
                                                                 reuse.small)]
        else:
            large = kv.large.fork(parent.large) if parent.large is not None else None
            small = [s.fork(m) for s, m in zip(parent.small, kv.small)]
        child = Beam(beam_id=self.new_beam_id(), large=large, token_ids=list(parent.token_ids),
                     small=small, reward=parent.reward, parent_id=parent.beam_id,
                     chunk_rewards=list(parent.chunk_rewards),
                     text=parent.text, num_large_tokens=parent.num_large_tokens,
                     detok=parent.detok.copy(), min_text_len=parent.min_text_len,
                     stop_checked_len=parent.stop_checked_len,
                     guide=None if parent.guide is None else parent.guide.fork())
        if self.logprobs is not None:
            self.token_logprobs[child.beam_id] = list(self.token_logprobs.get(parent.beam_id, ()))
        return child

    def start(self, kv: KVSpace):
        """After the prefill: the root becomes its candidates, W*K children (N for Best-of-N;
        the root's tables go to the last)."""
        p = self.params
        n = p.candidates
        self.beams = [self._fork(self.root, kv, take_over=(i == n - 1)) for i in range(n)]
        self.root = None    # its tables are the last child's now
        self.status = RequestStatus.RUNNING

    @property
    def generating(self) -> list[Beam]:
        """Beams that still sample in this chunk."""
        L = self.params.chunk_len
        return [b for b in self.beams if not b.finished and b.chunk_tokens < L]

    @property
    def chunk_complete(self) -> bool:
        return self.status is RequestStatus.RUNNING and not self.generating

    def record_token(self, beam: Beam, token: int, eos_ids: set[int], text_of) -> None:
        """Add a sampled token; mark the beam finished on EOS or a stop token id (neither is
        added: it is not text, and the scorer scores it as the end), a stop string or the
        length cap."""
        p = self.params
        beam.chunk_tokens += 1
        self.stats.tokens_sampled += 1
        eos = token in eos_ids and not p.ignore_eos
        if eos or token in p.stop_token_ids:
            beam.finished, beam.finish_reason, beam.eos_token = True, "stop", token
            beam.stop_reason = None if eos else token   # (vLLM's: None for EOS)
            return
        beam.token_ids.append(token)
        if beam.guide is not None and not beam.guide.accept_token(token):
            # (a step masks every token that would not: none was left to sample)
            raise ValueError(f"no token could continue the structured output here (token "
                             f"{token} was drawn from none): allowed_token_ids, bad_words or "
                             "the token limit leave the structure no token; allow more")
        n = len(beam.token_ids)
        if p.stop and p.min_tokens and n == p.min_tokens:
            # vLLM's rule: a stop string counts from token min_tokens + 1 on, and must end
            # past the text of the first min_tokens tokens.
            beam.min_text_len = len(text_of(beam))
        elif p.stop and n > p.min_tokens and self._stop_string(beam, text_of(beam)):
            return
        if len(beam.token_ids) >= p.max_new_tokens:
            beam.finished, beam.finish_reason = True, "length"
            if p.stop and n > p.min_tokens:
                # Finished, the text is flushed: a character left incomplete reads as U+FFFD
                # now, which a stop string may hold (the detokenizer held it back till now).
                self._stop_string(beam, text_of(beam))

    def _stop_string(self, beam: Beam, text: str) -> bool:
        """Whether a stop string ends in the text added since the last look; if so the beam
        ends there (its text cut at the first match)."""
        p = self.params
        if beam.min_text_len is None:
            beam.min_text_len = 0
        # A new match ends in the text added since the last look (one token's, or more
        # where the detokenizer held back a partial character; a token may be long).
        seen = max(beam.stop_checked_len, beam.min_text_len)
        hits = [(i, j, s) for j, s in enumerate(p.stop)
                if (i := text.find(s, max(0, seen - len(s) + 1))) >= 0]
        beam.stop_checked_len = len(text)
        if not hits:
            return False
        at, _, s = min(hits)   # the earliest (of two starting there, the one listed first)
        beam.finished, beam.finish_reason, beam.stop_reason = True, "stop", s
        beam.stop_text_len = at + len(s) if p.include_stop_str_in_output else at
        return True

    def record_logprob(self, beam: Beam, entry: TokenLogprob):
        """The log-prob of the token record_token just appended to the beam."""
        self.token_logprobs.setdefault(beam.beam_id, []).append(entry)

    # ---- selection ---------------------------------------------------------------------

    def select(self, kv: KVSpace) -> bool:
        """Keep the top W candidates, free the losers, fork the next chunk. True when done."""
        p = self.params
        cands = self.beams
        if p.samples:
            order = list(range(len(cands)))  # no selection: every sample is a result
            keep = len(cands)
        else:
            order = best_first([b.reward for b in cands])
            keep = p.w
            if not self.warned_nan and math.isnan(cands[order[-1]].reward):
                self.warned_nan = True
                log.warning("request %s: a candidate's reward is NaN (a small model's forward "
                            "overflowed? float16 overflows where bfloat16 does not); such "
                            "candidates rank below every other", self.request_id)
        survivors = [cands[i] for i in order[:keep]]
        losers = [cands[i] for i in order[keep:]]   # their tables go to the next children
        if p.uses_small_models:
            for b in survivors:
                if b.chunk_tokens:   # scored at this chunk (not a finished beam carried over)
                    b.chunk_rewards.append(b.reward)
        self.stats.chunks += 1
        if p.trace:
            self.trace.append({
                "chunk": self.stats.chunks,
                "candidates": [{"beam_id": b.beam_id, "parent_id": b.parent_id,
                                "reward": b.reward, "finished": b.finished,
                                "finish_reason": b.finish_reason,
                                "num_tokens": len(b.token_ids),
                                "token_ids": list(b.token_ids)} for b in cands],
                "survivors": [b.beam_id for b in survivors],
            })
        if all(b.finished for b in survivors):
            for b in losers:
                self.free_beam(b, kv)
            self.beams = survivors
            return True
        nxt = []
        for b in survivors:
            if b.finished:
                nxt.append(b)  # a final hypothesis: carried once, never duplicated
            else:
                for j in range(p.k):
                    last = j == p.k - 1
                    nxt.append(self._fork(b, kv, take_over=last,
                                          reuse=losers.pop() if losers and not last else None))
        for b in losers:
            self.free_beam(b, kv)
        for b in nxt:
            b.chunk_tokens = 0
        self.beams = nxt
        if self.logprobs is not None:   # only the current candidates' lists are needed
            self.token_logprobs = {b.beam_id: self.token_logprobs.get(b.beam_id, [])
                                   for b in nxt}
        return False

    def free_beam(self, beam: Beam, kv: KVSpace):
        if beam.large is not None and kv.large is not None:
            kv.large.free(beam.large)
        for s, m in zip(beam.small, kv.small):
            m.free(s.table)

    def free_all(self, kv: KVSpace):
        for b in self.beams:
            self.free_beam(b, kv)
        self.beams = []
        if self.root is not None:    # ended while its prompt was prefilled
            self.free_beam(self.root, kv)
        self.root = None
        self.root_logits = None
        self.token_logprobs = {}

    def start_over(self, kv: KVSpace):
        """Back to before its prefill, to run again from its prompt (a failed prefill batch, a
        preemption): no blocks, beam ids (which seed sampling) from 0, no work counted."""
        self.free_all(kv)
        self.prefilled, self.next_beam_id, self.trace, self.waits_for_room = 0, 0, [], None
        self.stats = SearchStats(prompt_tokens=self.stats.prompt_tokens)

    def record_peak(self, stream_roles: list[tuple[str, ...]]):
        """Blocks held by the current candidates, per model (shared blocks counted once).
        Called when every candidate holds its whole chunk in every model: the peak moment."""
        # set().union(*lists) walks the tables in C: hundreds of beams' tens of blocks each
        peak = self.stats.peak_kv_blocks
        if any(b.large is not None for b in self.beams):  # not with a black-box large model
            large = set().union(*(b.large.blocks for b in self.beams))
            peak["large"] = max(peak.get("large", 0), len(large))
        if self.params.uses_small_models:
            for si, roles in enumerate(stream_roles):
                n = len(set().union(*(b.small[si].table.blocks for b in self.beams)))
                for role in roles:
                    peak[role] = max(peak.get(role, 0), n)

    # ---- result ------------------------------------------------------------------------

    def finish(self, response_text) -> SearchResult:
        scored = self.params.uses_small_models
        hyps = []
        for b in self.beams:
            text = response_text(b)
            # The reported stream's response tokens (a reward model's suffix left out).
            si = self.reported_stream
            small_ids = b.small[si].ids[b.small[si].response_start:
                                        len(b.small[si].ids) - len(self.small_prompts[si].suffix_ids)] \
                if b.small and si is not None else []
            hyps.append(Hypothesis(text=text, token_ids=list(b.token_ids),
                                   num_tokens=max(len(b.token_ids), b.num_large_tokens),
                                   small_token_ids=list(small_ids),
                                   reward=b.reward if scored else None, finished=b.finish_reason == "stop",
                                   finish_reason=b.finish_reason or "length",
                                   stop_reason=b.stop_reason,
                                   logprobs=None if self.logprobs is None else
                                   self.token_logprobs.get(b.beam_id, []),
                                   chunk_rewards=list(b.chunk_rewards) if scored else None))
        if scored and not self.params.samples:
            hyps = [hyps[i] for i in best_first([h.reward for h in hyps])]
        best = hyps[0]
        self.stats.seconds = time.perf_counter() - self.started
        self.result = SearchResult(
            prompt=self.prompt, text=best.text, token_ids=best.token_ids,
            small_token_ids=best.small_token_ids, reward=best.reward, finished=best.finished,
            finish_reason=best.finish_reason, hypotheses=hyps, stats=self.stats,
            trace=self.trace if self.params.trace else None)
        self.status = RequestStatus.DONE
        return self.result
