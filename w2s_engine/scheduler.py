"""Scheduler: the waiting queue, admission, and how each request ends (done, failed, cancelled).

Admission is first come, first served: the head of the queue is admitted when its worst-case
KV reservation fits beside the running requests' (cache/kv_budget.py), and several are
admitted in one step while their prompts stay within max_batch_tokens, so that they prefill
together. A request that ends, however it ends, returns its blocks to every pool and its
reservation to the budget at once.
"""

from collections import deque
from dataclasses import dataclass, field

from w2s_engine.cache.kv_budget import KVBudget
from w2s_engine.search.request import KVSpace, RequestStatus, SearchRequest


class QueueFull(OverflowError):
    """The waiting queue is at its bound: try again later (the server answers 429)."""


@dataclass
class Totals:
    """Counters since the engine started."""

    requests: int = 0
    failed: int = 0
    tokens: dict[str, int] = field(default_factory=dict)   # forwarded, per model role
    cached: dict[str, int] = field(default_factory=dict)   # prompt tokens read from the cache


# Scoring tokens per part of a chunk end's scoring (scoring_parts), on average at least: with
# fewer, its forwards are a few hundred rows, and the device's time on them no longer covers
# the host's work on the next part.
MIN_PART_TOKENS = 512


def scoring_parts(ready: list[SearchRequest], parts: int) -> list[list[SearchRequest]]:
    """The requests whose chunks ended, in order, in at most `parts` groups of about equal
    scoring work (the tokens their candidates sampled in the chunk), MIN_PART_TOKENS or more
    on average: the engine launches each group's scoring before it reads the one before.
    A request goes to the group its work's midpoint falls in."""
    work = [sum(b.chunk_tokens for b in r.beams) for r in ready]
    total = sum(work)
    n = max(1, min(parts, len(ready), total // MIN_PART_TOKENS))
    groups = [[] for _ in range(n)]
    done = 0
    for r, w in zip(ready, work):
        groups[min(n - 1, int((done + w / 2) * n / total))].append(r)
        done += w
    return [g for g in groups if g]


class Scheduler:

    def __init__(self, budget: KVBudget, kv: KVSpace, roles: list[str],
                 max_waiting: int | None, max_batch_tokens: int):
        self.budget = budget
        self.kv = kv
        self.max_waiting = max_waiting
        self.max_batch_tokens = max_batch_tokens
        self.waiting: deque[SearchRequest] = deque()
        self.running: list[SearchRequest] = []
        self.totals = Totals(tokens={role: 0 for role in roles},
                             cached={role: 0 for role in roles})
        self._ended: list[SearchRequest] = []   # since the last take_ended()

    def add(self, req: SearchRequest, bounded: bool = True):
        """Queue a request. max_waiting bounds the requests waiting for KV memory, not those
        the next step admits: a burst that fits beside the running requests is all taken.
        Unbounded: taken past it (the later prompts of an HTTP request whose first was taken:
        its prompts start together or not at all)."""
        assert req.status is RequestStatus.WAITING
        if bounded and self.max_waiting is not None and len(self.waiting) >= self.max_waiting:
            blocked = len(self.waiting) + 1 - self._admissible([*self.waiting, req])
            if blocked > self.max_waiting:
                raise QueueFull(f"{blocked - 1} requests are waiting for KV memory, the bound "
                                f"is {self.max_waiting}: try again later")
        self.waiting.append(req)
        self.totals.requests += 1

    def _admissible(self, queue) -> int:
        """How many requests at the head of `queue` fit beside the running ones now (first
        come, first served: admission stops at the first that does not fit)."""
        taken = []
        for req in queue:
            if not self.budget.fits(req.reserved):
                break
            self.budget.reserve(req.reserved)
            taken.append(req)
        for req in taken:
            self.budget.release(req.reserved)
        return len(taken)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[SearchRequest]:
        """Admit waiting requests in order while their reservations fit; their prompts are
        prefilled from now (`prefilling`)."""
        admitted, tokens = [], 0
        if any(r.waits_for_room for r in self.running):
            # A running request's scoring waits for reservation room: what an ending request
            # frees goes to it, not to a new admission (which could take it for ever).
            return admitted
        while self.waiting:
            req = self.waiting[0]
            if not self.budget.fits(req.reserved):
                if not self.running and not admitted:  # cannot happen: make_request checked
                    raise RuntimeError("an admitted-size request does not fit an empty engine")
                break
            n = len(req.large_prompt_ids)
            if admitted and tokens + n > self.max_batch_tokens:
                break
            self.waiting.popleft()
            self.budget.reserve(req.reserved)
            req.status = RequestStatus.PREFILLING
            admitted.append(req)
            tokens += n
        self.running += admitted
        return admitted

    def prefilling(self) -> list[SearchRequest]:
        return [r for r in self.running if r.status is RequestStatus.PREFILLING]

    def finish(self, req: SearchRequest):
        """A request whose search is done: its result is set."""
        assert req.status is RequestStatus.DONE and req.result is not None
        self._end(req)

    def fail(self, req: SearchRequest, message: str):
        """A running request that cannot go on fails alone; the others go on."""
        req.status, req.error = RequestStatus.FAILED, message
        self.totals.failed += 1
        self._end(req)

    def cancel(self, req: SearchRequest):
        """Drop a request wherever it is; its blocks return to the pools."""
        if req in self.waiting:
            self.waiting.remove(req)
            req.status, req.error = RequestStatus.CANCELLED, "cancelled"
        elif req in self.running:
            req.status, req.error = RequestStatus.CANCELLED, "cancelled"
            self._end(req)

    def preempt(self, req: SearchRequest):
        """A running request gives back its blocks and reservation and waits at the head of
        the queue, to run again from its prompt (recomputed: its seed gives the same search).
        Its reservation keeps what it grew to, so that it is not stopped there again."""
        self.budget.release(req.reserved)
        self._count_work(req)     # the work done counts
        self.running.remove(req)
        req.start_over(self.kv)
        req.status = RequestStatus.WAITING
        self.waiting.appendleft(req)

    def _count_work(self, req: SearchRequest):
        for role, n in req.stats.tokens_forwarded.items():
            self.totals.tokens[role] = self.totals.tokens.get(role, 0) + n
        for role, n in req.stats.cached_prompt_tokens.items():
            self.totals.cached[role] = self.totals.cached.get(role, 0) + n

    @property
    def ended_in_step(self) -> bool:
        """Whether a request ended since the last take_ended() (its room is free)."""
        return bool(self._ended)

    def take_ended(self) -> list[SearchRequest]:
        """The requests that ended since the last call, in the order they ended."""
        ended, self._ended = self._ended, []
        return ended

    def _end(self, req: SearchRequest):
        req.free_all(self.kv)
        self.budget.release(req.reserved)
        req.reserved = {}
        self._count_work(req)
        if req in self.running:
            self.running.remove(req)
            self._ended.append(req)
