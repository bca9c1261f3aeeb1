"""AsyncEngine: one thread owns the Engine and runs its loop; asyncio handlers await results.

The Engine is not thread-safe, so every touch of it (validating and enqueuing a request,
cancelling one, stepping) happens on the loop thread. Handlers hand it commands through a
queue and get asyncio futures back; the thread sleeps while there is nothing to do.
"""

import asyncio
import queue
import threading
import traceback
from dataclasses import dataclass, field

from w2s_engine.engine import Engine
from w2s_engine.outputs import SearchResult
from w2s_engine.params import SearchParams
from w2s_engine.scheduler import QueueFull
from w2s_engine.search.request import RequestStatus


@dataclass
class Metrics:
    requests: int = 0
    finished: int = 0
    failed: int = 0
    cancelled: int = 0
    rejected: int = 0           # queue full
    steps: int = 0
    batched_steps: int = 0      # steps that ran more than one request at once
    max_running: int = 0        # most requests in one step
    tokens: dict = field(default_factory=dict)


@dataclass
class _Pending:
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    request: object = None


class AsyncEngine:

    def __init__(self, engine: Engine):
        self.engine = engine
        self.metrics = Metrics()
        self._inbox: queue.Queue = queue.Queue()
        self._wake = threading.Event()
        self._pending: dict[int, _Pending] = {}
        self._tickets: dict[int, int] = {}      # request id -> ticket of its handler
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="w2s-engine-loop", daemon=True)
        self._thread.start()

    # ---- called from asyncio handlers ---------------------------------------------------------

    def submit(self, prompt, params: SearchParams) -> tuple[asyncio.Future, int]:
        """Queue a search; the future resolves to a SearchResult or raises what went wrong."""
        loop = asyncio.get_running_loop()
        pending = _Pending(loop.create_future(), loop)
        ticket = id(pending)
        self._send(("add", ticket, pending, prompt, params))
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

    def _send(self, command):
        self._inbox.put(command)
        self._wake.set()

    # ---- the loop thread ---------------------------------------------------------------------

    def _run(self):
        while not self._stop:
            if not self.engine.has_unfinished() and self._inbox.empty():
                self._wake.wait()
                self._wake.clear()
                continue
            self._drain()
            if not self.engine.has_unfinished():
                continue
            try:
                running = self.engine.stats()["running"]
                ended = self.engine.step()
                self.metrics.steps += 1
                running = max(running, self.engine.stats()["running"])
                self.metrics.max_running = max(self.metrics.max_running, running)
                self.metrics.batched_steps += running > 1
            except Exception as e:  # an engine bug: fail what is in flight, keep serving
                traceback.print_exc()
                for pending in list(self._pending.values()):
                    if pending.request is not None:
                        self.engine.cancel(pending.request)
                for ticket in list(self._pending):
                    self._resolve(ticket, error=RuntimeError(f"engine error: {e}"))
                self._tickets.clear()
                continue
            for req in ended:
                ticket = self._tickets.pop(req.request_id, None)
                if ticket is None:
                    continue
                if req.status is RequestStatus.CANCELLED:
                    continue  # counted and answered when the cancel came in
                if req.status is RequestStatus.DONE:
                    self.metrics.finished += 1
                    self._resolve(ticket, result=req.result)
                else:
                    self.metrics.failed += 1
                    self._resolve(ticket, error=RuntimeError(req.error or "search failed"))

    def _drain(self):
        while True:
            try:
                command = self._inbox.get_nowait()
            except queue.Empty:
                return
            if command[0] == "add":
                _, ticket, pending, prompt, params = command
                self._pending[ticket] = pending
                self.metrics.requests += 1
                try:
                    req = self.engine.make_request(prompt, params)
                    self.engine.enqueue(req)
                    pending.request = req
                    self._tickets[req.request_id] = ticket
                except QueueFull as e:
                    self.metrics.rejected += 1
                    self._resolve(ticket, error=QueueFull(str(e)))
                except (ValueError, TypeError) as e:
                    self._resolve(ticket, error=ValueError(str(e)))
            elif command[0] == "cancel":
                pending = self._pending.get(command[1])
                if pending is not None and pending.request is not None:
                    self.engine.cancel(pending.request)
                    self._tickets.pop(pending.request.request_id, None)
                    self.metrics.cancelled += 1
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
        pending.loop.call_soon_threadsafe(settle)
