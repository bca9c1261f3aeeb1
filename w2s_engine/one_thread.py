"""OneThread: an Engine is driven by one thread at a time, and a second is refused, clearly.

A step changes the scheduler, the block tables and the KV pools with no lock (a lock per
step would serialize two callers' steps, but each step returns the requests that ended in
it, and a caller would miss those another caller's step ended). Two threads stepping one
engine interleave inside a step and fail every search in flight with errors that say
nothing of the cause. So the engine's driving methods (step, enqueue, cancel, search,
search_stream, score) claim it for their thread, re-entrantly (a search inside a stream's
loop, on the same thread, is fine), and an AsyncEngine claims it for its loop thread for
its whole life; a claim by another thread meanwhile raises EngineBusy saying what to do.
"""

import threading
from contextlib import contextmanager


class EngineBusy(RuntimeError):
    """The Engine is being driven by another thread."""


class OneThread:

    def __init__(self):
        self._lock = threading.Lock()       # guards the three fields, never held long
        self.thread: threading.Thread | None = None
        self.by = ""                        # what holds it, for the error
        self.depth = 0

    def acquire(self, by: str, thread: threading.Thread | None = None):
        """Claim for `thread` (this one by default), re-entrantly; raises EngineBusy if
        another thread holds it."""
        thread = thread or threading.current_thread()
        with self._lock:
            if self.thread is not None and self.thread is not thread:
                raise EngineBusy(
                    f"this Engine is being driven by {self.by} on thread "
                    f"{self.thread.name!r}, and {by} was called on thread {thread.name!r}: "
                    "an Engine runs on one thread at a time. For many callers, threads or "
                    "asyncio tasks, create one AsyncEngine (w2s_engine.serve.async_engine) "
                    "and await its search()/stream() from each; or give each thread its own "
                    "Engine")
            if self.thread is None:
                self.thread, self.by = thread, by
            self.depth += 1

    def release(self, thread: threading.Thread | None = None):
        thread = thread or threading.current_thread()
        with self._lock:
            assert self.thread is thread and self.depth > 0, "released by a thread not holding it"
            self.depth -= 1
            if self.depth == 0:
                self.thread, self.by = None, ""

    @contextmanager
    def claim(self, by: str):
        thread = threading.current_thread()
        self.acquire(by, thread)
        try:
            yield
        finally:
            # The thread that claimed: a stream's generator may be closed by the garbage
            # collector on another thread.
            self.release(thread)
