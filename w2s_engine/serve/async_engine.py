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


class QueueFull(Exception):
    """The waiting queue is at its bound: the client should retry later (HTTP 429)."""


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
        e = self.engine
        used = {"large": e.large_blocks.num_used if e.large_blocks else 0}
        for roles, stream in zip(e.stream_roles, e.streams):
            for role in roles:
                used[role] = stream.blocks.num_used
        return {"metrics": self.metrics, "waiting": len(e.waiting), "running": len(e.running),
                "kv_blocks_used": used, "kv_blocks_total": e.num_blocks,
                "tokens": dict(e.total["tokens"])}

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
                running = len(self.engine.running)
                ended = self.engine.step()
                self.metrics.steps += 1
                running = max(running, len(self.engine.running))
                self.metrics.max_running = max(self.metrics.max_running, running)
                self.metrics.batched_steps += running > 1
            except Exception as e:  # an engine bug: fail what is in flight, keep serving
                traceback.print_exc()
                for req in list(self.engine.running) + list(self.engine.waiting):
                    self.engine.cancel(req)
                for ticket in list(self._pending):
                    self._resolve(ticket, error=RuntimeError(f"engine error: {e}"))
                continue
            for req in ended:
                ticket = getattr(req, "ticket", None)
                if ticket is None:
                    continue
                if req.error == "cancelled":
                    continue  # counted and answered when the cancel came in
                if req.status == "done":
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
                    req.ticket = ticket
                    pending.request = req
                    self.engine.enqueue(req)
                except OverflowError as e:
                    self.metrics.rejected += 1
                    self._resolve(ticket, error=QueueFull(str(e)))
                except (ValueError, TypeError) as e:
                    self._resolve(ticket, error=ValueError(str(e)))
            elif command[0] == "cancel":
                pending = self._pending.get(command[1])
                if pending is not None and pending.request is not None:
                    self.engine.cancel(pending.request)
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
