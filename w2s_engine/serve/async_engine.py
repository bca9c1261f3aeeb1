"""AsyncEngine: one thread owns the Engine and runs its loop; asyncio code awaits searches.

A request is prepared (validated, templated, tokenized: Engine.make_request, which is
thread-safe) in a small thread pool, so that a long prompt never stalls the step for the
requests already running; only the cheap rest touches the Engine, on the loop thread:
enqueuing, cancelling, stepping. Coroutines hand the loop commands through a queue; the
thread sleeps while there is nothing to do.

Every search streams: after each step, the loop thread pushes the text that became final
(SearchDelta, search/stream.py) into the search's asyncio queue through
loop.call_soon_threadsafe, and the last delta carries the SearchResult. `stream()` iterates
the deltas, `search()` awaits the result; leaving either early cancels the search, and its
KV blocks come back at once.

A request that fails in the engine fails alone (Engine.step keeps an error to the requests it
touched); only an error that escapes the step altogether, an engine bug, fails what is in
flight. The loop thread itself never dies.
"""

import asyncio
import collections
import logging
import queue
import re
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial

from w2s_engine.engine import Engine
from w2s_engine.one_thread import EngineBusy
from w2s_engine.outputs import SearchResult
from w2s_engine.params import SearchParams
from w2s_engine.scheduler import QueueFull
from w2s_engine.search.request import FailedBy, RequestStatus, SearchRequest
from w2s_engine.search.scorer import NoRoomYet
from w2s_engine.search.stream import SearchDelta
from w2s_engine.serve.metrics import ServerMetrics

log = logging.getLogger("w2s_engine.serve")


class SearchFailed(RuntimeError):
    """The engine failed this request; the others went on. by: whose fault it was (the
    server answers 500 for the engine's, 502 for the large model's server's, 400 for a
    request that server refused)."""

    def __init__(self, message: str, by: FailedBy = FailedBy.ENGINE):
        super().__init__(message)
        self.by = by


# (an embedded AsyncEngine is no server: the engine is what shuts down, for both)
SHUTTING_DOWN = "the engine is shutting down"


# What an Engine.score() call takes at a time: the loop thread runs a score job in slices of at
# most this many pairs, and of new text about the tokens of one prefill chunk (CHARS_PER_TOKEN
# characters a token of max_batch_tokens; at least one pair), between the steps, so that a
# request of hundreds of long responses holds up the searches in flight as a long prompt
# does, a chunk at a time (a prompt the slices share is forwarded once all the same: the later
# slices read it from the prefix cache).
SCORE_SLICE_PAIRS = 16
CHARS_PER_TOKEN = 4
_INDEXED = re.compile(r"\b(responses|finished)\[(\d+)(?::(\d+))?\]")


def _chars(text) -> int:
    """A prompt's or response's size in characters (token ids: CHARS_PER_TOKEN each; chat
    messages: their text's)."""
    if isinstance(text, str):
        return len(text)
    if isinstance(text, (list, tuple)) and all(isinstance(t, int) for t in text):
        return CHARS_PER_TOKEN * len(text)
    return len(str(text))


def _offset_indices(message: str, offset: int) -> str:
    """'responses[3]' and 'responses[2:5]' in a slice's error, as indices of the whole call."""
    return _INDEXED.sub(lambda m: f"{m[1]}[{int(m[2]) + offset}"
                        + (f":{int(m[3]) + offset}" if m[3] else "") + "]", message)


class ScoreJob:
    """An Engine.score() call the loop thread runs between steps (the scorer's pools are the
    steps'), a slice of pairs at a time; its rewards or its error handed back to the awaiting
    coroutine."""

    def __init__(self, loop: asyncio.AbstractEventLoop, prompts, responses, finished,
                 kwargs: dict):
        self.prompts, self.responses, self.finished = prompts, responses, finished
        self.kwargs = kwargs
        self.rewards: list[float] = []
        self.tokens = 0          # what the scorer read for them (ScoreWork.tokens)
        self._loop = loop
        self.done = loop.create_future()
        # Waiting for room: the scorer pools' free blocks when a slice found too few (searches
        # held them); tried again once more are free.
        self.free_when_refused: list[int] | None = None

    def run_slice(self, engine: Engine) -> bool:
        """Score the next slice (all of it where the arguments are not lists of pairs, for
        Engine.score to check); True when the job is over (its result or error handed
        back, or its caller gone)."""
        if self.done.cancelled():      # (a read from this thread: at worst one slice late)
            return True
        free = [s.blocks.num_free for s in engine.scorer.streams]
        if self.free_when_refused is not None:
            if all(f <= was for f, was in zip(free, self.free_when_refused)):
                return False       # no search has given back a block since: not yet
            self.free_when_refused = None
        pairs = (isinstance(self.prompts, list) and isinstance(self.responses, list)
                 and len(self.prompts) == len(self.responses)
                 and (not isinstance(self.finished, list)
                      or len(self.finished) == len(self.prompts)))
        i = len(self.rewards)
        end = self._slice_end(i, CHARS_PER_TOKEN * engine.config.max_batch_tokens) \
            if pairs else None
        flags = self.finished[i:end] if isinstance(self.finished, list) else self.finished
        before = engine.scorer.scored.tokens
        try:
            self.rewards += (engine.score(self.prompts[i:end], self.responses[i:end], flags,
                                          **self.kwargs) if pairs else
                             engine.score(self.prompts, self.responses, flags, **self.kwargs))
        except NoRoomYet as e:
            if engine.has_unfinished():   # the searches' blocks: it fits once they end
                self.free_when_refused = free
                return False
            self._settle(error=ValueError(_offset_indices(str(e), i)))
            return True
        except (ValueError, TypeError) as e:   # the caller's to change
            if i:   # a slice's pairs are named from its first: name them in the whole call
                e = (TypeError if isinstance(e, TypeError) else ValueError)(
                    _offset_indices(str(e), i))
            self._settle(error=e)
            return True
        except Exception as e:
            log.exception("w2s engine loop: a score() call failed")
            self._settle(error=SearchFailed(f"engine error in score(): {type(e).__name__}: "
                                            f"{e}"))
            return True
        self.tokens += engine.scorer.scored.tokens - before
        if pairs and len(self.rewards) < len(self.prompts):
            return False
        self._settle((self.rewards, self.tokens))
        return True

    def _slice_end(self, start: int, chars: int) -> int:
        """The end of the slice from pair `start`: SCORE_SLICE_PAIRS pairs at most, and no
        more than `chars` characters of new text (a response, and its prompt where it is not
        the previous pair's), one pair at least."""
        end, used = start, 0
        while end < len(self.prompts) and end - start < SCORE_SLICE_PAIRS:
            new = _chars(self.responses[end])
            if end == 0 or self.prompts[end] != self.prompts[end - 1]:
                new += _chars(self.prompts[end])
            if end > start and used + new > chars:
                break
            used += new
            end += 1
        return end

    def _settle(self, rewards=None, error: BaseException | None = None):
        def settle():
            if not self.done.done():
                if error is None:
                    self.done.set_result(rewards)
                else:
                    self.done.set_exception(error)
        try:
            self._loop.call_soon_threadsafe(settle)
        except RuntimeError:  # the event loop is closed: nobody waits
            pass


class FirstText:
    """Whether a client request's first text has been timed (time to first token is one
    observation per request, whatever its searches: several prompts, n choices)."""

    def __init__(self):
        self.timed = False


class SearchHandle:
    """A queued search, seen from asyncio: its deltas as they become final (async iteration,
    the last one carries the result), `result()`, and `cancel()`.

    The loop thread writes to it only through call_soon_threadsafe."""

    def __init__(self, owner: "AsyncEngine", request: SearchRequest,
                 loop: asyncio.AbstractEventLoop, label: str, arrived: float):
        self.request = request
        self.label = label                    # the request id in the logs
        self.arrived = arrived                # time.perf_counter() at arrival
        self._owner = owner
        self._loop = loop
        self._queue: asyncio.Queue = asyncio.Queue()
        self.accepted = loop.create_future()  # set when queued (or QueueFull)
        self.past_bound = False               # queued past max_waiting (a request's later prompts)
        self.ended = False                    # the caller has seen the end, or cancelled
        self._buffer: list[SearchDelta] = []
        # the loop thread's bookkeeping
        self.sent_text = False
        self.first_text = FirstText()         # shared by the searches of one client request
        self.sent_result = False
        self.mark: float | None = None        # the last selection (or admission)
        self.chunks = 0

    def __aiter__(self):
        return self

    async def __anext__(self) -> SearchDelta:
        if not self._buffer:
            if self.ended:
                raise StopAsyncIteration
            self._buffer = await self.next_batch()
        return self._buffer.pop(0)

    async def next_batch(self) -> list[SearchDelta]:
        """The deltas of the next engine step that had any for this search (raises
        SearchFailed if the engine failed it; [] after the end)."""
        if self.ended:
            return []
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self.ended = True
            raise item
        if any(d.result is not None for d in item):
            self.ended = True
        return item

    async def result(self) -> SearchResult:
        async for delta in self:
            if delta.result is not None:
                return delta.result
        raise SearchFailed("the search ended without a result")

    def cancel(self):
        """Stop the search wherever it is (a no-op once it ended)."""
        if not self.ended:
            self.ended = True
            self._owner._send(("cancel", self))

    # ---- from the loop thread -----------------------------------------------------------

    def _call(self, fn, *args):
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the event loop is closed: nobody waits
            pass

    def _push(self, item: list[SearchDelta] | BaseException):
        """One step's deltas, or the error that ends the search."""
        if isinstance(item, list):
            self.sent_result = self.sent_result or any(d.result is not None for d in item)
        self._call(self._queue.put_nowait, item)

    def _accept(self, error: BaseException | None = None):
        self._call(_settle, self.accepted, error)


def _settle(future: asyncio.Future, error: BaseException | None):
    if not future.done():
        if error is None:
            future.set_result(True)
        else:
            future.set_exception(error)


class AsyncEngine:

    def __init__(self, engine: Engine, prepare_threads: int = 2):
        self.engine = engine
        self._thread = threading.Thread(target=self._run, name="w2s-engine-loop", daemon=True)
        self.metrics = ServerMetrics(engine.stats)
        self._prepare_pool = ThreadPoolExecutor(prepare_threads, thread_name_prefix="w2s-prepare")
        self._inbox: queue.Queue = queue.Queue()
        self._wake = threading.Event()
        self._pending: dict[int, SearchHandle] = {}   # request id -> its handle
        self._scoring: collections.deque[ScoreJob] = collections.deque()   # score() calls
        self._stop = False
        # Set by the loop thread as it exits, under the lock that _send takes: a command
        # sent after it is answered at once, never left in a queue nobody reads.
        self._closed = False
        self._inbox_lock = threading.Lock()
        # The loop thread drives the engine for the AsyncEngine's whole life: a search on
        # another thread meanwhile (engine.search via asyncio.to_thread, a second
        # AsyncEngine) is refused saying so, rather than failing every search in flight.
        try:
            engine.one_thread.acquire("an AsyncEngine", self._thread)
        except EngineBusy:
            if engine.one_thread.by != "an AsyncEngine":
                raise
            # (its message would name the same thread name twice: each loop's)
            raise EngineBusy("this Engine is driven by another AsyncEngine until that one's "
                             "shutdown(): share that AsyncEngine among your callers, or shut "
                             "it down before making a new one") from None
        self._thread.start()

    # ---- called from asyncio code -------------------------------------------------------------

    async def submit(self, prompt, params: SearchParams, label: str = "-",
                     arrived: float | None = None, prepare=None, past_bound: bool = False,
                     **request_options) -> SearchHandle:
        """prepare_request, then queue: a search prepared off the engine thread (raises
        ValueError or TypeError saying what to change) and queued (raises QueueFull past the
        queue bound, unless past_bound); returns its handle. prepare: called with the
        SearchRequest before it is queued. request_options: Engine.make_request's (chat,
        prompt_ids, continue_final_message, logprobs)."""
        arrived = time.perf_counter() if arrived is None else arrived
        req = await self.prepare_request(prompt, params, **request_options)
        return await self.queue(req, label, arrived, prepare, past_bound)

    async def prepare_request(self, prompt, params: SearchParams,
                              **request_options) -> SearchRequest:
        """Validate, template and tokenize a search off the engine thread (Engine.make_request;
        raises ValueError or TypeError saying what to change). Nothing runs until queue():
        a client request of several prompts prepares them all first, so that a bad one
        starts none."""
        loop = asyncio.get_running_loop()
        if self._stop:
            raise SearchFailed(SHUTTING_DOWN, FailedBy.SHUTDOWN)
        try:
            return await loop.run_in_executor(
                self._prepare_pool, partial(self.engine.make_request, prompt, params,
                                            stream=True, **request_options))
        except RuntimeError:
            if self._stop:      # the preparing pool was shut down on the way
                raise SearchFailed(SHUTTING_DOWN, FailedBy.SHUTDOWN) from None
            raise

    async def queue(self, req: SearchRequest, label: str = "-", arrived: float | None = None,
                    prepare=None, past_bound: bool = False,
                    first_text: FirstText | None = None) -> SearchHandle:
        """Queue a prepared search (raises QueueFull past the queue bound, unless past_bound:
        the later prompts of a request whose first was taken); returns its handle.
        first_text: shared by a client request's searches, whose first text is timed once."""
        loop = asyncio.get_running_loop()
        arrived = time.perf_counter() if arrived is None else arrived
        if prepare is not None:
            prepare(req)
        handle = SearchHandle(self, req, loop, label, arrived)
        handle.past_bound = past_bound
        if first_text is not None:
            handle.first_text = first_text
        self._send(("add", handle))
        try:
            await handle.accepted
        except asyncio.CancelledError:
            handle.cancel()
            raise
        except BaseException:
            handle.ended = True
            raise
        return handle

    async def stream(self, prompt, params: SearchParams | None = None,
                     **options) -> AsyncIterator[SearchDelta]:
        """Run one search and yield its text as it becomes final; the last delta carries the
        SearchResult (raises SearchFailed if the engine failed it). Leaving early cancels it.
        params: SearchParams() (the defaults) when None, as in Engine.search_stream."""
        handle = await self.submit(prompt, SearchParams() if params is None else params,
                                   **options)
        try:
            async for delta in handle:
                yield delta
        finally:
            handle.cancel()

    async def search(self, prompt, params: SearchParams | None = None,
                     **options) -> SearchResult:
        """Run one search -> its SearchResult (raises SearchFailed if the engine failed it);
        cancelling the awaiting task cancels it. params: SearchParams() when None, as in
        Engine.search."""
        handle = await self.submit(prompt, SearchParams() if params is None else params,
                                   **options)
        try:
            return await handle.result()
        finally:
            handle.cancel()

    async def score(self, prompts, responses, finished=True, **options) -> list[float]:
        """Engine.score() on the loop thread, between two steps (raises its ValueError or
        TypeError saying what to change; SearchFailed once shutting down)."""
        return (await self.score_counted(prompts, responses, finished, **options))[0]

    async def score_counted(self, prompts, responses, finished=True,
                            **options) -> tuple[list[float], int]:
        """score()'s rewards, and the tokens the scorer read for them (each pair's prompt
        and response in each scorer stream's tokens: the usage of vLLM's score API)."""
        if self._stop:
            raise SearchFailed(SHUTTING_DOWN, FailedBy.SHUTDOWN)
        job = ScoreJob(asyncio.get_running_loop(), prompts, responses, finished, options)
        self._send(("score", job))
        return await job.done

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def shutdown(self):
        """Stop the loop: every search in flight, queued or being prepared ends with
        SearchFailed and its KV blocks come back; later submits raise SearchFailed."""
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=10)
        # Preparations under way finish (tokenizing is quick) and are refused as they queue.
        self._prepare_pool.shutdown(wait=False)

    # `with AsyncEngine(engine) as a:` and `async with ...`: shut down on the way out, so
    # that the loop thread and the engine it holds do not outlive the block that used them.
    def __enter__(self) -> "AsyncEngine":
        return self

    def __exit__(self, *exc):
        self.shutdown()

    async def __aenter__(self) -> "AsyncEngine":
        return self

    async def __aexit__(self, *exc):
        # shutdown() joins the loop thread: off the event loop, which other tasks share
        await asyncio.get_running_loop().run_in_executor(None, self.shutdown)

    def _send(self, command):
        with self._inbox_lock:
            if not self._closed:
                self._inbox.put(command)
                self._wake.set()
                return
        if command[0] == "add":     # the loop has exited: refuse it here
            command[1]._accept(SearchFailed(SHUTTING_DOWN, FailedBy.SHUTDOWN))
        elif command[0] == "score":
            command[1]._settle(error=SearchFailed(SHUTTING_DOWN, FailedBy.SHUTDOWN))

    # ---- the loop thread ---------------------------------------------------------------------

    def _run(self):
        try:
            self._serve()
        finally:
            # Also when a BaseException (SystemExit, KeyboardInterrupt raised in a step)
            # ends the loop: its searches and later submits are refused, never left awaiting
            # a thread that is gone.
            self._stop = True
            try:
                self._close()
            finally:
                self.engine.one_thread.release(self._thread)   # the engine is the caller's again

    def _serve(self):
        while not self._stop:
            try:
                if (not self.engine.has_unfinished() and self._inbox.empty()
                        and not self._scoring):
                    self._wake.wait()
                    self._wake.clear()
                    continue
                self._drain()
                if self._scoring:
                    if self._scoring[0].run_slice(self.engine):
                        self._scoring.popleft()
                    else:   # the score calls take turns a slice at a time: a small one
                        self._scoring.rotate(-1)   # is not held up by a big one before it
                if self.engine.has_unfinished():
                    self._step()
            except Exception:  # a bug in this loop: log it, keep serving
                log.exception("w2s engine loop: unexpected error")

    def _close(self):
        """The loop has stopped: refuse what is queued and end what is in flight."""
        with self._inbox_lock:
            self._closed = True
        while True:     # commands sent before the loop closed: refuse the searches
            try:
                command, handle = self._inbox.get_nowait()
            except queue.Empty:
                break
            if command == "add":
                handle._accept(SearchFailed(SHUTTING_DOWN, FailedBy.SHUTDOWN))
            elif command == "score":
                handle._settle(error=SearchFailed(SHUTTING_DOWN, FailedBy.SHUTDOWN))
        while self._scoring:     # score() calls part-way or not begun
            self._scoring.popleft()._settle(error=SearchFailed(SHUTTING_DOWN, FailedBy.SHUTDOWN))
        for handle in list(self._pending.values()):   # nobody will step them now
            self.engine.cancel(handle.request)         # (their blocks come back)
            handle._push(SearchFailed(SHUTTING_DOWN, FailedBy.SHUTDOWN))
        self._pending.clear()

    def _step(self):
        started = time.perf_counter()
        try:
            running = self.engine.stats()["running"]
            ended = self.engine.step()
        except Exception as e:
            # The step keeps a request's error to that request; what escapes it is an engine
            # bug that no request can be blamed for: fail what is in flight, keep serving.
            log.exception("w2s engine: the step failed outside any request")
            for handle in list(self._pending.values()):
                self.engine.cancel(handle.request)
                handle._push(SearchFailed(f"engine error: {type(e).__name__}: {e}"))
            self._pending.clear()
            return
        now = time.perf_counter()
        self.metrics.stepped(max(running, self.engine.stats()["running"]))
        for handle in self._pending.values():
            self._after_step(handle, started, now)
        for req in ended:
            handle = self._pending.pop(req.request_id, None)
            if handle is None or req.status is RequestStatus.CANCELLED:
                continue  # the caller cancelled it
            if req.status is RequestStatus.DONE:
                if not handle.sent_result:   # (a stream that could not finish its text)
                    handle._push([SearchDelta("", 0, req.result)])
            else:
                log.warning("request %s failed: %s", handle.label, req.error)
                handle._push(SearchFailed(req.error or "search failed", req.failed_by))

    def _after_step(self, handle: SearchHandle, started: float, now: float):
        """Hand a search its new deltas; time its first text and its selections."""
        req = handle.request
        if handle.mark is None and req.status is not RequestStatus.WAITING:
            handle.mark = started   # admitted in this step
        if req.stats.chunks > handle.chunks:
            n = req.stats.chunks - handle.chunks
            for _ in range(n):
                self.metrics.chunk.observe((now - handle.mark) / n)
            handle.chunks, handle.mark = req.stats.chunks, now
        if req.deltas:
            deltas, req.deltas = req.deltas, []
            if not handle.sent_text and any(d.text for d in deltas):
                handle.sent_text = True
                if not handle.first_text.timed:   # once per client request
                    handle.first_text.timed = True
                    self.metrics.first_token.observe(now - handle.arrived)
            handle._push(deltas)

    def _drain(self):
        while True:
            try:
                command, handle = self._inbox.get_nowait()
            except queue.Empty:
                return
            if command == "add":
                try:
                    self.engine.enqueue(handle.request, bounded=not handle.past_bound)
                except QueueFull as e:
                    log.warning("request %s refused: %s", handle.label, e)
                    handle._accept(e)
                    continue
                except Exception as e:
                    log.exception("w2s engine loop: enqueue failed")
                    handle._accept(SearchFailed(f"{type(e).__name__}: {e}"))
                    continue
                self._pending[handle.request.request_id] = handle
                handle._accept()
                p = handle.request.params
                log.debug("request %s queued as search %d: method=%s w=%d k=%d l=%s "
                          "max_new_tokens=%d, %d prompt tokens", handle.label,
                          handle.request.request_id, p.method, p.w, p.k, p.l, p.max_new_tokens,
                          handle.request.stats.prompt_tokens)
            elif command == "score":
                self._scoring.append(handle)
            elif command == "cancel":
                req = handle.request
                if self._pending.get(req.request_id) is handle:   # queued, not ended
                    del self._pending[req.request_id]
                    self.engine.cancel(req)
                    log.info("request %s cancelled: its search stopped, its KV blocks are "
                             "free", handle.label)
