"""AsyncEngine: one thread owns the Engine and runs its loop; asyncio handlers await results.

A request is prepared (validated, templated, tokenized: Engine.make_request, which is
thread-safe) in a small thread pool, so that a long prompt never stalls the step for the
requests already running; only the cheap rest touches the Engine, on the loop thread:
enqueuing, cancelling, stepping. Handlers hand the loop commands through a queue and get
asyncio futures back; the thread sleeps while there is nothing to do.

A request that fails in the engine fails alone (Engine.step keeps an error to the requests it
touched); only an error that escapes the step altogether, an engine bug, fails what is in
flight. The loop thread itself never dies.
"""

import asyncio
import logging
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from w2s_engine.engine import Engine
from w2s_engine.outputs import SearchResult
from w2s_engine.params import SearchParams
from w2s_engine.scheduler import QueueFull
from w2s_engine.search.request import RequestStatus, SearchRequest

log = logging.getLogger("w2s_engine.serve")

OUTCOMES = ("finished", "failed", "cancelled", "rejected")


class SearchFailed(RuntimeError):
    """The engine failed this request (the server answers 500); the others went on."""


@dataclass
class Metrics:
    """Every generation request counts once in `requests` when it arrives and once, when it
    ends, in exactly one outcome: finished (200), failed (5xx), cancelled (the client went
    away) or rejected (4xx: invalid, too large, wrong host, queue full). At rest,
    requests == finished + failed + cancelled + rejected."""

    requests: int = 0
    finished: int = 0
    failed: int = 0
    cancelled: int = 0
    rejected: int = 0
    rejected_by: dict = field(default_factory=dict)   # reason -> count, summing to rejected
    steps: int = 0
    batched_steps: int = 0      # steps that ran more than one request at once
    max_running: int = 0        # most requests in one step
    tokens: dict = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def arrived(self):
        with self._lock:
            self.requests += 1

    def ended(self, outcome: str, reason: str | None = None):
        assert outcome in OUTCOMES, outcome
        with self._lock:
            setattr(self, outcome, getattr(self, outcome) + 1)
            if outcome == "rejected":
                key = reason or "invalid"
                self.rejected_by[key] = self.rejected_by.get(key, 0) + 1

    @property
    def in_flight(self) -> int:
        return self.requests - sum(getattr(self, o) for o in OUTCOMES)


@dataclass
class _Pending:
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    request: SearchRequest | None = None


class AsyncEngine:

    def __init__(self, engine: Engine, prepare_threads: int = 2):
        self.engine = engine
        self.metrics = Metrics()
        self._prepare_pool = ThreadPoolExecutor(prepare_threads, thread_name_prefix="w2s-prepare")
        self._inbox: queue.Queue = queue.Queue()
        self._wake = threading.Event()
        self._pending: dict[int, _Pending] = {}
        self._tickets: dict[int, int] = {}      # request id -> ticket of its handler
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="w2s-engine-loop", daemon=True)
        self._thread.start()

    # ---- called from asyncio handlers ---------------------------------------------------------

    async def submit(self, prompt, params: SearchParams) -> tuple[asyncio.Future, int]:
        """Prepare a search off the engine thread (raises ValueError or TypeError saying what to
        change) and queue it; the future resolves to a SearchResult, or raises QueueFull or
        SearchFailed."""
        loop = asyncio.get_running_loop()
        req = await loop.run_in_executor(self._prepare_pool, self.engine.make_request, prompt,
                                         params)
        pending = _Pending(loop.create_future(), loop, req)
        ticket = id(pending)
        self._send(("add", ticket, pending))
        return pending.future, ticket

    def cancel(self, ticket: int):
        self._send(("cancel", ticket))

    def snapshot(self) -> dict:
        """Counters and gauges for /metrics (read without locking: a scrape may lag a step)."""
        return {"metrics": self.metrics, **self.engine.stats()}

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def shutdown(self):
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=10)
        self._prepare_pool.shutdown(wait=False, cancel_futures=True)

    def _send(self, command):
        self._inbox.put(command)
        self._wake.set()

    # ---- the loop thread ---------------------------------------------------------------------

    def _run(self):
        while not self._stop:
            try:
                if not self.engine.has_unfinished() and self._inbox.empty():
                    self._wake.wait()
                    self._wake.clear()
                    continue
                self._drain()
                if self.engine.has_unfinished():
                    self._step()
            except Exception:  # a bug in this loop: log it, keep serving
                log.exception("w2s engine loop: unexpected error")

    def _step(self):
        try:
            running = self.engine.stats()["running"]
            ended = self.engine.step()
        except Exception as e:
            # The step keeps a request's error to that request; what escapes it is an engine
            # bug that no request can be blamed for: fail what is in flight, keep serving.
            log.exception("w2s engine: the step failed outside any request")
            for ticket, pending in list(self._pending.items()):
                if pending.request is not None:
                    self.engine.cancel(pending.request)
                self._resolve(ticket, error=SearchFailed(f"engine error: {type(e).__name__}: {e}"))
            self._tickets.clear()
            return
        self.metrics.steps += 1
        running = max(running, self.engine.stats()["running"])
        self.metrics.max_running = max(self.metrics.max_running, running)
        self.metrics.batched_steps += running > 1
        for req in ended:
            ticket = self._tickets.pop(req.request_id, None)
            if ticket is None or req.status is RequestStatus.CANCELLED:
                continue  # answered when the cancel came in
            if req.status is RequestStatus.DONE:
                self._resolve(ticket, result=req.result)
            else:
                self._resolve(ticket, error=SearchFailed(req.error or "search failed"))

    def _drain(self):
        while True:
            try:
                command = self._inbox.get_nowait()
            except queue.Empty:
                return
            if command[0] == "add":
                _, ticket, pending = command
                self._pending[ticket] = pending
                try:
                    self.engine.enqueue(pending.request)
                    self._tickets[pending.request.request_id] = ticket
                except QueueFull as e:
                    self._resolve(ticket, error=e)
                except Exception as e:
                    log.exception("w2s engine loop: enqueue failed")
                    self._resolve(ticket, error=SearchFailed(f"{type(e).__name__}: {e}"))
            elif command[0] == "cancel":
                pending = self._pending.get(command[1])
                if pending is not None and pending.request is not None:
                    self.engine.cancel(pending.request)
                    self._tickets.pop(pending.request.request_id, None)
                    self._resolve(command[1], cancelled=True)

    def _resolve(self, ticket: int, result: SearchResult | None = None, error=None,
                 cancelled: bool = False):
        pending = self._pending.pop(ticket, None)
        if pending is None:
            return

        def settle():
            if pending.future.done():
                return
            if cancelled:
                pending.future.cancel()
            elif error is not None:
                pending.future.set_exception(error)
            else:
                pending.future.set_result(result)
        try:
            pending.loop.call_soon_threadsafe(settle)
        except RuntimeError:  # the handler's event loop is closed: nobody waits
            pass
