"""The scheduler: admission order, reservations, and every way a request ends. No model."""

import pytest

from w2s_engine.cache.block_manager import BlockManager
from w2s_engine.cache.kv_budget import KVBudget
from w2s_engine.params import SearchParams
from w2s_engine.scheduler import QueueFull, Scheduler
from w2s_engine.search.request import KVSpace, RequestStatus, SearchRequest


def make_scheduler(num_blocks=100, max_waiting=None, max_batch_tokens=1000):
    budget = KVBudget(num_blocks, block_size=4)
    budget.add_pool("large")
    budget.add_pool(0)
    kv = KVSpace(BlockManager(num_blocks, 4), [BlockManager(num_blocks, 4)])
    return Scheduler(budget, kv, ["large", "tuned", "untuned"], max_waiting, max_batch_tokens)


def request(i, large_blocks, small_blocks=1, prompt_tokens=10):
    req = SearchRequest(i, f"prompt {i}", SearchParams(), seed=i,
                        large_prompt_ids=list(range(prompt_tokens)))
    req.reserved = {"large": large_blocks, 0: small_blocks}
    return req


def run(s: Scheduler, *reqs: SearchRequest):
    """Queue and admit requests, then what the engine does after admission: their beams start
    (none are needed here)."""
    for req in reqs:
        s.add(req)
    assert s.schedule() == list(reqs)
    for req in reqs:
        req.status = RequestStatus.RUNNING


def test_requests_are_admitted_in_order_while_their_reservations_fit():
    s = make_scheduler(num_blocks=100)
    a, b, c = request(0, 60), request(1, 50), request(2, 10)
    for r in (a, b, c):
        s.add(r)
    assert s.schedule() == [a]
    # b does not fit beside a, and c waits behind it: first come, first served.
    assert s.schedule() == [] and list(s.waiting) == [b, c]
    assert s.budget.reserved == {"large": 60, 0: 1}


def test_an_ended_request_returns_its_reservation_and_the_next_is_admitted():
    s = make_scheduler(num_blocks=100)
    a, b = request(0, 60), request(1, 50)
    run(s, a)
    s.add(b)
    s.fail(a, "the server went away")
    assert a.status is RequestStatus.FAILED and a.error == "the server went away"
    assert s.budget.reserved == {"large": 0, 0: 0} and a.reserved == {}
    assert s.schedule() == [b]
    assert s.take_ended() == [a] and s.take_ended() == []


def test_one_step_admits_prompts_up_to_max_batch_tokens_together():
    s = make_scheduler(num_blocks=1000, max_batch_tokens=25)
    reqs = [request(i, 10, prompt_tokens=10) for i in range(4)]
    for r in reqs:
        s.add(r)
    assert s.schedule() == reqs[:2]
    assert s.schedule() == reqs[2:]
    # A prompt longer than the cap is still admitted, alone.
    big = request(9, 10, prompt_tokens=500)
    s.add(big)
    assert s.schedule() == [big]


def test_past_max_waiting_a_request_is_refused_with_queue_full():
    s = make_scheduler(max_waiting=2)
    s.add(request(0, 200))   # cannot run until the pool grows: it waits
    s.add(request(1, 1))
    with pytest.raises(QueueFull, match="try again later"):
        s.add(request(2, 1))
    assert s.totals.requests == 2


def test_cancel_drops_a_waiting_or_running_request_and_counts_no_failure():
    s = make_scheduler(num_blocks=100)
    running, waiting = request(0, 60), request(1, 60)
    run(s, running)
    s.add(waiting)
    assert s.schedule() == []
    s.cancel(waiting)
    s.cancel(running)
    assert running.status is waiting.status is RequestStatus.CANCELLED
    assert not s.has_unfinished() and s.budget.reserved == {"large": 0, 0: 0}
    assert s.take_ended() == [running]   # a waiting request never ran: nothing to answer
    assert s.totals.failed == 0


def test_every_request_ends_in_exactly_one_outcome_and_tokens_add_up():
    s = make_scheduler(num_blocks=1000)
    reqs = [request(i, 10) for i in range(3)]
    run(s, *reqs)
    for r in reqs:
        r.stats.tokens_forwarded = {"large": 5, "tuned": 3, "untuned": 3}
    reqs[0].status, reqs[0].result = RequestStatus.DONE, object()
    s.finish(reqs[0])
    s.fail(reqs[1], "bad")
    s.cancel(reqs[2])
    assert [r.status for r in s.take_ended()] == [RequestStatus.DONE, RequestStatus.FAILED,
                                                  RequestStatus.CANCELLED]
    assert all(r.status.ended for r in reqs)
    assert s.totals.tokens == {"large": 15, "tuned": 9, "untuned": 9}
    assert (s.totals.requests, s.totals.failed) == (3, 1)
