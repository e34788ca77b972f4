"""The worker on the in-memory store: polling, discovery, handler outcomes,
hooks, heartbeats, the embedded monitor, shutdown, drain, max_tasks and the
Lambda entry point.  No network; a few tests sleep a little (short poll
intervals keep each one well under two seconds).

Signals, kill -9 and many processes need real processes and real servers:
they are in test_worker_e2e.py.
"""

import asyncio
import json
import random
import subprocess
import sys
import threading
import time
import uuid
from datetime import timedelta, timezone
from pathlib import Path

import pytest
from helpers import running, wait_for

import buquet
from buquet import (
    AsyncQueue,
    BuquetError,
    MemoryStore,
    PermanentError,
    Queue,
    RescheduleError,
    RetryableError,
    RetryPolicy,
    StoreError,
    Worker,
    task_key,
    worker_key,
)
from buquet import _Discovery, _Poller  # the pure parts are tested directly

ROOT = Path(__file__).resolve().parent.parent
FAST = RetryPolicy(100, 200, 2.0, 0.0)  # retries after 100 ms, then 200 ms
UTC = timezone.utc


# ============================================================================
# Helpers
# ============================================================================


class RecordingStore(MemoryStore):
    """A MemoryStore that also records which key each request touched, and
    can be told to fail LISTs (a store outage)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.log = []
        self.failing_lists = 0

    def get(self, key):
        self.log.append(("GET", key))
        return super().get(key)

    def put(self, key, body, **kwargs):
        self.log.append(("PUT", key))
        return super().put(key, body, **kwargs)

    def delete(self, key):
        self.log.append(("DELETE", key))
        return super().delete(key)

    def list(self, prefix, **kwargs):
        self.log.append(("LIST", prefix))
        if self.failing_lists:
            self.failing_lists -= 1
            raise StoreError("LIST ready/: connection refused (simulated)")
        return super().list(prefix, **kwargs)

    def count(self, op, key=None):
        return sum(1 for o, k in self.log if o == op and (key is None or k == key))


def make_worker(queue, worker_id="w1", shards=None, **options):
    """A worker with fast test settings: short polls, no monitor, no
    scheduler, a heartbeat only at start and stop unless asked."""
    settings = dict(poll_min=0.01, poll_max=0.05, monitor=False, scheduler=False, heartbeat_interval=60.0,
                    grace_period=5.0, concurrency=1)
    settings.update(options)
    return Worker(queue, worker_id, shards, **settings)


def status_of(queue, task):
    return queue.get(task.id).status


def submit_in(queue, shard, task_type="t", input=None, **options):
    """Submit a task whose id falls in `shard` (ids are random: pick one)."""
    while True:
        task_id = str(uuid.uuid4())
        if task_id[0] == shard:
            break
    build = queue._new_document(task_type, input, **options)
    return queue._create(build(task_id, queue.now()))


@pytest.fixture
def store():
    return RecordingStore()


@pytest.fixture
def queue(store):
    return Queue(store)


# ============================================================================
# _Poller: the adaptive sleep between empty polls
# ============================================================================


def test_the_first_sleep_is_the_floor_and_each_empty_poll_grows_it_by_half_up_to_the_cap():
    poller = _Poller(0.1, 1.0, rand=lambda: 0.5)  # 0.5: no jitter
    sleeps = [round(poller.next_sleep(), 6) for _ in range(8)]
    assert sleeps == [0.1, 0.15, 0.225, 0.3375, 0.50625, 0.759375, 1.0, 1.0]


def test_a_claim_resets_the_sleep_to_the_floor():
    poller = _Poller(0.1, 1.0, rand=lambda: 0.5)
    for _ in range(5):
        poller.next_sleep()
    poller.reset()
    assert poller.next_sleep() == pytest.approx(0.1)


def test_the_sleep_is_jittered_by_at_most_ten_percent_either_way():
    low = _Poller(1.0, 1.0, rand=lambda: 0.0)
    high = _Poller(1.0, 1.0, rand=lambda: 0.999999)
    assert low.next_sleep() == pytest.approx(0.9)
    assert high.next_sleep() == pytest.approx(1.1, abs=1e-5)


@pytest.mark.parametrize("floor, cap", [(0, 1), (-1, 1), (2, 1)])
def test_poll_bounds_must_be_positive_and_ordered(floor, cap):
    with pytest.raises(ValueError) as e:
        _Poller(floor, cap)
    assert str(e.value) == ("poll interval bounds must satisfy 0 < poll_min <= poll_max, got %r and %r"
                            % (floor, cap))


def test_the_worker_checks_its_poll_bounds():
    with pytest.raises(ValueError, match="0 < poll_min <= poll_max, got 3.0 and 1.0"):
        Worker(Queue(MemoryStore()), "w", poll_min=3, poll_max=1)


# ============================================================================
# _Discovery: few LISTs, only our shards, only due keys, our own order
# ============================================================================


def test_one_list_covers_every_shard_while_the_index_is_small(queue, store):
    tasks = [submit_in(queue, s) for s in "0123456789abcdef" for _ in range(2)]
    discovery = _Discovery(queue, list("0123"), random.Random(1).random)
    store.log.clear()
    found = discovery.refill(queue.now())
    assert store.count("LIST") == 1
    assert store.count("GET") == 0
    ours = {t.id for t in tasks if t.shard in "0123"}
    taken = set()
    while True:
        candidate = discovery.take()
        if candidate is None:
            break
        taken.add(candidate[1])
    assert found == 8 and taken == ours


def test_tasks_not_due_before_a_later_minute_are_not_candidates(queue):
    due = submit_in(queue, "0")
    submit_in(queue, "0", delay=3600)
    discovery = _Discovery(queue, ["0"], random.random)
    assert discovery.refill(queue.now()) == 1
    assert discovery.take()[1] == due.id
    assert discovery.take() is None


def test_a_page_full_of_other_shards_is_jumped_over_with_start_after(queue, store):
    for _ in range(6):
        submit_in(queue, "1")
    wanted = [submit_in(queue, "2") for _ in range(2)]
    discovery = _Discovery(queue, ["0", "2"], random.random, page_size=4)
    store.log.clear()
    assert discovery.refill(queue.now()) == 2
    lists = [entry for entry in store.log if entry[0] == "LIST"]
    assert len(lists) == 2  # the page of shard 1, then straight to shard 2
    assert {discovery.take()[1], discovery.take()[1]} == {t.id for t in wanted}


def test_two_workers_try_a_shared_backlog_in_different_orders(queue):
    for _ in range(20):
        queue.submit("t", {})
    orders = []
    for seed in (1, 2):
        discovery = _Discovery(queue, list(buquet.ALL_SHARDS), random.Random(seed).random)
        discovery.refill(queue.now())
        orders.append([discovery.take()[1] for _ in range(20)])
    assert sorted(orders[0]) == sorted(orders[1])
    assert orders[0] != orders[1]
    assert orders[0][0] != orders[1][0]  # not even the same first key


def test_a_skipped_id_is_not_offered_until_its_time_is_up(queue):
    task = queue.submit("t", {})
    discovery = _Discovery(queue, list(buquet.ALL_SHARDS), random.random)
    discovery.skip(task.id, 60)
    assert discovery.refill(queue.now()) == 0
    discovery.skip(task.id, -1)
    assert discovery.refill(queue.now()) == 1


# ============================================================================
# step(): claim and run at most one task
# ============================================================================


def test_step_with_nothing_to_do_says_how_long_to_wait(queue):
    worker = make_worker(queue, poll_min=0.2, poll_max=1.0)
    worker.task("t")(lambda input: None)
    ran, wait = worker.step()
    assert ran is False and 0.17 < wait <= 0.22


def test_step_runs_one_task_and_keeps_the_index_right_without_run(queue, store):
    worker = make_worker(queue)
    seen = []
    worker.task("t")(lambda input: seen.append(input) or {"ok": True})
    a = queue.submit("t", {"n": 1})
    b = queue.submit("t", {"n": 2})
    assert worker.step() == (True, 0.0)
    assert worker.step() == (True, 0.0)
    assert sorted(x["n"] for x in seen) == [1, 2]
    assert [status_of(queue, t) for t in (a, b)] == ["completed", "completed"]
    assert queue.get(a.id).output == {"ok": True}
    # Used alone (Lambda-style), step() still moves the index: no ready or
    # lease key is left behind.
    assert store.list("ready/")[0] == [] and store.list("leases/")[0] == []


def test_the_happy_path_costs_the_requests_the_design_promises(queue, store):
    worker = make_worker(queue)
    worker.task("t")(lambda input: {"ok": True})
    task = queue.submit("t", {})
    worker.step()  # lists, finds nothing claimable yet? no: the task is due
    ops = [op for op, key in store.log if key.startswith(("tasks/", "ready/", "leases/"))]
    # submit: PUT task + PUT ready; poll: LIST; claim: GET + PUT + PUT lease +
    # DELETE ready; complete: PUT + DELETE lease.
    assert ops == ["PUT", "PUT", "LIST", "GET", "PUT", "PUT", "DELETE", "PUT", "DELETE"]
    assert status_of(queue, task) == "completed"


# ============================================================================
# Handler outcomes
# ============================================================================


def run_one(queue, handler, task_type="t", input=None, **submit_options):
    worker = make_worker(queue)
    worker.task(task_type)(handler)
    task = queue.submit(task_type, input or {}, **submit_options)
    assert worker.step()[0] is True
    return queue.get(task.id), worker


def test_a_returned_value_completes_the_task_with_it_as_output(queue):
    task, worker = run_one(queue, lambda input: {"sent": True, "to": input["to"]}, input={"to": "a@b.c"})
    assert (task.status, task.output, task.last_error, task.lease_id) == (
        "completed", {"sent": True, "to": "a@b.c"}, None, None)
    assert worker.completed == 1


def test_a_handler_returning_none_completes_with_null_output(queue):
    task, _ = run_one(queue, lambda input: None)
    assert task.status == "completed" and task.output is None


def test_retryable_error_retries_with_backoff_and_the_error_text(queue):
    def handler(input):
        raise RetryableError("upstream 503")

    before = queue.now()
    task, _ = run_one(queue, handler, retry_policy=RetryPolicy(5000, 60000, 2.0, 0.0))
    assert (task.status, task.retry_count, task.attempt, task.last_error) == (
        "pending", 1, 1, "RetryableError: upstream 503")
    delay = (task.available_at - before).total_seconds()
    assert 4.9 < delay < 6.0


def test_any_other_exception_is_retried_with_its_name_and_message(queue):
    def handler(input):
        raise ValueError("bad input")

    task, worker = run_one(queue, handler)
    assert (task.status, task.retry_count, task.last_error) == ("pending", 1, "ValueError: bad input")
    assert worker.failed == 0


def test_an_exception_without_a_message_is_recorded_by_its_name(queue):
    def handler(input):
        raise KeyError()

    task, _ = run_one(queue, handler)
    assert task.last_error == "KeyError"


def test_permanent_error_fails_the_task_at_once(queue):
    def handler(input):
        raise PermanentError("bad input")

    task, worker = run_one(queue, handler, max_retries=5)
    assert (task.status, task.retry_count, task.last_error) == ("failed", 0, "PermanentError: bad input")
    assert task.completed_at is not None and worker.failed == 1


def test_a_retryable_failure_with_no_retries_left_fails_the_task(queue):
    def handler(input):
        raise RetryableError("still down")

    task, worker = run_one(queue, handler, max_retries=0)
    assert (task.status, task.last_error) == ("failed", "RetryableError: still down")
    assert worker.failed == 1


def test_reschedule_error_runs_the_task_again_later_without_using_a_retry(queue):
    def handler(input):
        raise RescheduleError(30)

    before = queue.now()
    task, _ = run_one(queue, handler)
    assert (task.status, task.retry_count, task.reschedule_count, task.attempt) == ("pending", 0, 1, 1)
    delay = (task.available_at - before).total_seconds()
    assert 29.9 < delay < 31


def test_reschedule_error_needs_a_whole_number_of_seconds():
    with pytest.raises(ValueError) as e:
        RescheduleError(1.5)
    assert str(e.value) == "RescheduleError: delay_seconds must be a non-negative int, got 1.5"


def test_a_result_that_is_not_json_fails_the_task_permanently_with_a_clear_error(queue):
    task, _ = run_one(queue, lambda input: {"when": object()}, max_retries=3)
    assert task.status == "failed"
    assert task.last_error == ("PermanentError: handler result must be JSON-serialisable: "
                               "object at handler result['when'] is not")
    assert task.retry_count == 0


def test_a_nan_result_is_not_json_either(queue):
    task, _ = run_one(queue, lambda input: float("nan"))
    assert (task.status, task.last_error) == ("failed", "PermanentError: handler result: nan at handler result "
                                                        "is not valid JSON")


def test_handler_errors_are_not_buquet_errors():
    # `except BuquetError` in user code must not swallow handler control flow.
    for cls in (RetryableError, PermanentError, RescheduleError):
        assert not issubclass(cls, BuquetError)


# ============================================================================
# Handlers: plain, coroutine, with a context
# ============================================================================


def test_a_coroutine_handler_runs_under_a_synchronous_worker(queue):
    async def handler(input):
        await asyncio.sleep(0.01)
        return {"doubled": input["n"] * 2}

    task, _ = run_one(queue, handler, input={"n": 21})
    assert (task.status, task.output) == ("completed", {"doubled": 42})


def test_a_handler_with_two_parameters_gets_the_task_context(queue):
    seen = {}

    def handler(input, ctx):
        seen.update(task_id=ctx.task_id, attempt=ctx.attempt, retry_count=ctx.retry_count,
                    worker_id=ctx.worker_id, cancelled=ctx.is_cancellation_requested())
        return None

    task, _ = run_one(queue, handler)
    assert seen == {"task_id": task.id, "attempt": 1, "retry_count": 0, "worker_id": "w1", "cancelled": False}


def test_a_bound_method_and_a_callable_object_are_handlers_too(queue):
    class Handlers:
        def with_ctx(self, input, ctx):
            return {"attempt": ctx.attempt}

        def __call__(self, input):
            return {"called": True}

    h = Handlers()
    a, _ = run_one(queue, h.with_ctx, task_type="a")
    b, _ = run_one(queue, h, task_type="b")
    assert a.output == {"attempt": 1} and b.output == {"called": True}


def test_the_attempt_counts_up_across_retries(queue):
    attempts = []

    def handler(input, ctx):
        attempts.append((ctx.attempt, ctx.retry_count))
        if ctx.attempt < 3:
            raise RetryableError("again")
        return "done"

    worker = make_worker(queue)
    worker.task("t")(handler)
    task = queue.submit("t", {}, retry_policy=FAST)
    with running(worker):
        wait_for(lambda: status_of(queue, task) == "completed", timeout=5)
    assert attempts == [(1, 0), (2, 1), (3, 2)]


def test_extend_lease_from_the_context_moves_the_lease_and_its_index_key(queue, store):
    result = {}

    def handler(input, ctx):
        before = queue.get(ctx.task_id).lease_expires_at
        result["returned"] = ctx.extend_lease(600)
        result["before"], result["after"] = before, queue.get(ctx.task_id).lease_expires_at

    task, _ = run_one(queue, handler, timeout=60)
    assert task.status == "completed"
    grown = result["after"] - result["before"]
    assert timedelta(seconds=599) < grown < timedelta(seconds=601)
    assert result["returned"] == result["after"]
    assert store.list("leases/")[0] == []  # the moved key went with the completion


def test_a_handler_sees_a_cancellation_request_and_the_task_ends_cancelled(queue):
    started, seen = threading.Event(), []

    def handler(input, ctx):
        started.set()
        while not ctx.is_cancellation_requested():
            time.sleep(0.01)
        seen.append(True)
        return {"stopped": "early"}

    worker = make_worker(queue)
    worker.task("t")(handler)
    task = queue.submit("t", {})
    with running(worker):
        assert started.wait(5)
        queue.request_cancellation(task.id, reason="not needed", cancelled_by="ops")
        final = wait_for(lambda: (lambda t: t if t.status == "cancelled" else None)(queue.get(task.id)))
    assert seen == [True]
    assert (final.cancelled_by, final.last_error, final.lease_id, final.output) == ("ops", "not needed", None, None)
    assert final.cancelled_at is not None
    assert worker.completed == 0


def test_a_cancellation_request_wins_over_a_handler_failure(queue):
    def handler(input, ctx):
        queue.request_cancellation(ctx.task_id)
        raise RetryableError("would retry")

    task, _ = run_one(queue, handler)
    assert task.status == "cancelled"


# ============================================================================
# Claiming: only our types, without re-reading what is not ours
# ============================================================================


def test_only_tasks_with_a_handler_are_claimed_and_a_foreign_one_is_not_reread_every_poll(queue, store):
    worker = make_worker(queue, poll_min=0.01, poll_max=0.01)
    worker.task("mine")(lambda input: None)
    foreign = queue.submit("theirs", {})
    with running(worker):
        time.sleep(0.5)  # ~50 polls
        mine = queue.submit("mine", {})
        wait_for(lambda: status_of(queue, mine) == "completed")
    assert store.count("LIST", "ready/") > 20
    assert store.count("GET", task_key(foreign.shard, foreign.id)) == 1
    after = queue.get(foreign.id)
    assert (after.status, after.attempt, after.worker_id) == ("pending", 0, None)


def test_only_the_worker_s_shards_are_served(queue):
    worker = make_worker(queue, shards=["0", "1"])
    worker.task("t")(lambda input: None)
    ours, other = submit_in(queue, "1"), submit_in(queue, "5")
    with running(worker):
        wait_for(lambda: status_of(queue, ours) == "completed")
        time.sleep(0.1)
    assert status_of(queue, other) == "pending"


def test_a_retry_with_a_short_backoff_is_claimed_again_soon_by_the_same_worker(queue):
    # Regression: the skip cache once hid a task that was not yet due for a
    # whole minute, and a task seen running by a sibling slot likewise.
    calls = []

    def handler(input):
        calls.append(time.monotonic())
        if len(calls) == 1:
            raise RetryableError("once")

    worker = make_worker(queue, concurrency=4)
    worker.task("t")(handler)
    task = queue.submit("t", {}, retry_policy=FAST)
    with running(worker):
        wait_for(lambda: status_of(queue, task) == "completed", timeout=3)
    assert len(calls) == 2 and calls[1] - calls[0] < 1.5  # 100 ms backoff, at most a 1 s busy skip


def test_a_rescheduled_task_runs_again_when_its_delay_is_over(queue):
    calls = []

    def handler(input):
        calls.append(time.monotonic())
        if len(calls) == 1:
            raise RescheduleError(1)
        return "later"

    worker = make_worker(queue)
    worker.task("t")(handler)
    task = queue.submit("t", {})
    with running(worker):
        wait_for(lambda: status_of(queue, task) == "completed", timeout=4)
    final = queue.get(task.id)
    assert (final.reschedule_count, final.retry_count, final.attempt) == (1, 0, 2)
    assert 0.9 < calls[1] - calls[0] < 2.0


def test_a_store_outage_during_polls_does_not_stop_the_worker(queue, store):
    worker = make_worker(queue, concurrency=2)
    worker.task("t")(lambda input: "ok")
    store.failing_lists = 5
    with running(worker):
        wait_for(lambda: store.failing_lists == 0)
        task = queue.submit("t", {})
        wait_for(lambda: status_of(queue, task) == "completed", timeout=3)


def test_concurrency_runs_that_many_handlers_at_once(queue):
    barrier = threading.Barrier(4, timeout=5)

    def handler(input):
        barrier.wait()  # passes only when four handlers run together
        return None

    worker = make_worker(queue, concurrency=4)
    worker.task("t")(handler)
    tasks = [queue.submit("t", {}) for _ in range(8)]
    with running(worker):
        wait_for(lambda: all(status_of(queue, t) == "completed" for t in tasks), timeout=10)


def test_an_idle_worker_lists_about_once_per_poll_interval_whatever_its_concurrency(queue, store):
    worker = make_worker(queue, concurrency=8, poll_min=0.1, poll_max=0.1)
    worker.task("t")(lambda input: None)
    with running(worker):
        time.sleep(0.3)
        store.log.clear()
        time.sleep(1.0)
        lists = store.count("LIST", "ready/")
    assert 5 <= lists <= 13  # one per 0.09-0.11 s (fewer on a loaded machine), not one per slot


def test_idle_polling_slows_down_to_poll_max(queue, store):
    worker = make_worker(queue, poll_min=0.01, poll_max=0.2)
    worker.task("t")(lambda input: None)
    with running(worker):
        time.sleep(0.5)  # the sleep has grown to the cap by now
        store.log.clear()
        time.sleep(1.0)
        lists = store.count("LIST", "ready/")
    assert 3 <= lists <= 7  # one per 0.18-0.22 s


# ============================================================================
# Index upkeep under run(): new keys at once, stale ones in the background
# ============================================================================


def test_the_lease_key_is_in_the_bucket_before_the_handler_starts(queue, store):
    # A worker killed while its handler runs must leave a lease key for the
    # monitor to find: it cannot wait in a background queue.
    seen = []
    worker = make_worker(queue)
    worker.task("t")(lambda input, ctx: seen.append(store.list("leases/")[0]))
    task = queue.submit("t", {})
    with running(worker):
        wait_for(lambda: status_of(queue, task) == "completed")
    assert len(seen) == 1 and len(seen[0]) == 1 and seen[0][0].endswith("/" + task.id)


def test_a_retried_task_s_ready_key_is_written_before_the_worker_moves_on(queue, store):
    seen = []
    worker = make_worker(queue)

    @worker.task("t")
    def handler(input):
        raise RetryableError("again")

    worker.on_error(lambda task, exc: seen.append(store.list("ready/")[0]))
    task = queue.submit("t", {}, retry_policy=RetryPolicy(60000, 60000, 2.0, 0.0))
    with running(worker):
        wait_for(lambda: seen)
    after = queue.get(task.id)
    assert buquet.ready_key(after.shard, after.available_at, task.id) in seen[0]


class SlowDeleteStore(RecordingStore):
    def delete(self, key):
        if key.startswith("ready/"):
            time.sleep(1.0)
        return super().delete(key)


def test_a_stale_delete_still_queued_does_not_remove_a_key_written_after_it():
    # Claim (delete ready/{minute}/{id} in the background, slowly here), then
    # a requeue on shutdown in the same minute (write that same key now): the
    # late delete must not win, or the pending task would be invisible.
    store = SlowDeleteStore()
    queue = Queue(store)
    release = threading.Event()
    started = []
    worker = make_worker(queue, grace_period=0)

    @worker.task("t")
    def handler(input, ctx):
        started.append(ctx.task_id)
        release.wait(10)

    task = queue.submit("t", {})
    with running(worker):
        wait_for(lambda: started)
    release.set()
    # run() has returned: every queued delete has been done.
    after = queue.get(task.id)
    assert after.status == "pending"
    assert store.list("ready/")[0] == [buquet.ready_key(after.shard, after.available_at, task.id)]
    assert store.list("leases/")[0] == []


# ============================================================================
# Hooks
# ============================================================================


def test_hooks_see_startup_each_outcome_and_shutdown(queue):
    events = []
    worker = make_worker(queue)

    @worker.task("t")
    def handler(input):
        if input.get("fail"):
            raise PermanentError("no")
        return {"ok": input["n"]}

    worker.on_startup(lambda w: events.append(("startup", w.worker_id)))
    worker.on_success(lambda task, output: events.append(("success", task.status, output)))
    worker.on_error(lambda task, exc: events.append(("error", task.status, type(exc).__name__, str(exc))))

    @worker.on_shutdown
    async def bye(w):  # hooks may be coroutines too
        events.append(("shutdown", w.worker_id))

    ok = queue.submit("t", {"n": 1})
    with running(worker):
        wait_for(lambda: status_of(queue, ok) == "completed")
        bad = queue.submit("t", {"fail": True})
        wait_for(lambda: status_of(queue, bad) == "failed")
    assert events == [
        ("startup", "w1"),
        ("success", "completed", {"ok": 1}),
        ("error", "failed", "PermanentError", "no"),
        ("shutdown", "w1"),
    ]


def test_a_failing_hook_does_not_take_the_worker_down(queue, caplog):
    worker = make_worker(queue)
    worker.task("t")(lambda input: None)

    @worker.on_success
    def broken(task, output):
        raise RuntimeError("hook bug")

    tasks = [queue.submit("t", {}) for _ in range(2)]
    with running(worker):
        wait_for(lambda: all(status_of(queue, t) == "completed" for t in tasks))
    assert any("on_success hook" in r.getMessage() and "RuntimeError: hook bug" in r.getMessage()
               for r in caplog.records)


# ============================================================================
# Heartbeats
# ============================================================================


def test_the_heartbeat_shows_the_running_task_and_is_deleted_on_shutdown(queue, store):
    started, release = threading.Event(), threading.Event()

    def handler(input):
        started.set()
        release.wait(10)

    worker = make_worker(queue, heartbeat_interval=0.05, shards=["0", "1", "2", "3"], worker_id="worker-hb")
    worker.task("t")(handler)
    task = submit_in(queue, "2")
    key = worker_key("worker-hb")
    with running(worker):
        assert started.wait(5)

        def beat_with_task():
            blob = store.get(key)
            doc = json.loads(blob.body) if blob else {}
            return doc if doc.get("current_task") == task.id else None

        doc = wait_for(beat_with_task, timeout=3)
        first = doc["last_heartbeat"]
        later = wait_for(lambda: (lambda d: d if d["last_heartbeat"] != first else None)(
            json.loads(store.get(key).body)), timeout=3)  # it keeps beating while the handler runs
        release.set()
        wait_for(lambda: status_of(queue, task) == "completed")
        wait_for(lambda: json.loads(store.get(key).body)["tasks_completed"] == 1, timeout=3)
    assert list(doc)[:7] == ["worker_id", "started_at", "last_heartbeat", "shards", "current_task",
                             "tasks_completed", "tasks_failed"]
    assert (doc["worker_id"], doc["shards"], doc["running_tasks"]) == ("worker-hb", ["0", "1", "2", "3"], [task.id])
    assert later["current_task"] == task.id
    assert store.get(key) is None


# ============================================================================
# The embedded monitor: lease recovery
# ============================================================================


def claim_and_abandon(queue, **submit_options):
    """A task claimed by a worker that then died (its lease runs out)."""
    task = queue.submit("t", {}, **submit_options)
    claimed = queue.claim(task.id, "dead-worker")
    assert claimed is not None
    return claimed


def test_the_monitor_recovers_an_expired_lease_and_the_task_runs_again(queue):
    abandoned = claim_and_abandon(queue, timeout=1, retry_policy=FAST)
    attempts = []
    worker = make_worker(queue, monitor=True, monitor_interval=0.1, heartbeat_interval=0.1)
    worker.task("t")(lambda input, ctx: attempts.append(ctx.attempt))
    with running(worker):
        wait_for(lambda: status_of(queue, abandoned) == "completed", timeout=5)
    final = queue.get(abandoned.id)
    assert attempts == [2]
    assert (final.retry_count, final.attempt) == (1, 2)


def test_with_the_monitor_off_an_expired_lease_stays_until_someone_recovers_it(queue):
    abandoned = claim_and_abandon(queue, timeout=1, retry_policy=FAST)
    worker = make_worker(queue, monitor=False, heartbeat_interval=0.1)
    worker.task("t")(lambda input: None)
    with running(worker):
        time.sleep(2.2)
        assert status_of(queue, abandoned) == "running"
        assert [t.id for t in queue.recover_expired_leases()] == [abandoned.id]
        wait_for(lambda: status_of(queue, abandoned) == "completed", timeout=3)


def test_a_handler_that_outlives_its_lease_loses_the_task_and_its_late_result_is_refused(queue, caplog):
    first_done = threading.Event()
    outputs = []

    def handler(input, ctx):
        if ctx.attempt == 1:
            time.sleep(2.5)  # past the 1 s lease: the monitor takes the task back
            outputs.append("late")
            first_done.set()
            return {"attempt": 1}
        outputs.append("second")
        return {"attempt": ctx.attempt}

    worker = make_worker(queue, concurrency=2, monitor=True, monitor_interval=0.1, heartbeat_interval=0.1)
    worker.task("t")(handler)
    task = queue.submit("t", {}, timeout=1, retry_policy=FAST)
    with running(worker):
        wait_for(lambda: status_of(queue, task) == "completed", timeout=5)
        assert first_done.wait(5)
        time.sleep(0.1)
    final = queue.get(task.id)
    assert outputs == ["second", "late"]
    assert (final.status, final.output, final.attempt, final.retry_count) == ("completed", {"attempt": 2}, 2, 1)
    assert worker.completed == 1
    assert any("result dropped" in r.getMessage() and "lease" in r.getMessage() for r in caplog.records)


# ============================================================================
# Stopping: grace period and requeue, max_tasks, drain
# ============================================================================


def test_stop_lets_a_handler_finish_within_the_grace_period(queue):
    started = threading.Event()

    def handler(input):
        started.set()
        time.sleep(0.3)
        return "finished"

    worker = make_worker(queue, grace_period=5)
    worker.task("t")(handler)
    task = queue.submit("t", {})
    with running(worker):
        assert started.wait(5)
    assert (queue.get(task.id).status, queue.get(task.id).output) == ("completed", "finished")


def test_a_handler_still_running_after_the_grace_period_is_requeued_without_losing_a_retry(queue, store):
    started, release = threading.Event(), threading.Event()

    def handler(input):
        started.set()
        release.wait(10)
        return "too late"

    worker = make_worker(queue, grace_period=0.3, worker_id="w-grace")
    worker.task("t")(handler)
    task = queue.submit("t", {})
    with running(worker):
        assert started.wait(5)
        stop_at = time.monotonic()
    assert time.monotonic() - stop_at < 2.0
    requeued = queue.get(task.id)
    assert (requeued.status, requeued.retry_count, requeued.attempt, requeued.lease_id, requeued.worker_id) == (
        "pending", 0, 1, None, None)
    assert requeued.available_at <= queue.now()
    assert len(store.list("ready/")[0]) == 1 and store.list("leases/")[0] == []
    assert store.get(worker_key("w-grace")) is None
    release.set()  # the abandoned handler returns: its result must not count
    time.sleep(0.2)
    assert queue.get(task.id).status == "pending"
    # Another worker picks it up at once.
    other = make_worker(queue, worker_id="w2")
    other.task("t")(lambda input, ctx: {"attempt": ctx.attempt})
    assert other.step()[0] is True
    assert queue.get(task.id).output == {"attempt": 2}


def test_max_tasks_makes_run_return_after_that_many_claims(queue):
    worker = make_worker(queue, max_tasks=3, concurrency=2)
    worker.task("t")(lambda input: None)
    tasks = [queue.submit("t", {}) for _ in range(5)]
    assert worker.run(install_signal_handlers=False) == 0
    statuses = sorted(status_of(queue, t) for t in tasks)
    assert statuses == ["completed"] * 3 + ["pending"] * 2


def test_drain_mode_returns_once_the_queue_is_empty(queue, store):
    worker = make_worker(queue, drain=True, concurrency=3, worker_id="drainer")
    worker.task("t")(lambda input: time.sleep(0.01))
    tasks = [queue.submit("t", {}) for _ in range(10)]
    started = time.monotonic()
    assert worker.run(install_signal_handlers=False) == 0
    assert time.monotonic() - started < 3
    assert all(status_of(queue, t) == "completed" for t in tasks)
    assert worker.completed == 10
    assert store.get(worker_key("drainer")) is None


def test_drain_mode_on_an_empty_queue_returns_at_once(queue):
    worker = make_worker(queue, drain=True)
    worker.task("t")(lambda input: None)
    started = time.monotonic()
    assert worker.run(install_signal_handlers=False) == 0
    assert time.monotonic() - started < 1


def test_drain_mode_fails_when_a_poll_fails_instead_of_calling_the_queue_empty(queue, store):
    # A cron job or Lambda must not report success when it could not look at the queue
    # (a wrong secret, a missing bucket); the S3 client has already retried by then.
    worker = make_worker(queue, drain=True, worker_id="drainer")
    worker.task("t")(lambda input: None)
    task = queue.submit("t", {})
    store.failing_lists = 1

    with pytest.raises(StoreError) as e:
        worker.run(install_signal_handlers=False)

    assert str(e.value) == "LIST ready/: connection refused (simulated)"
    assert status_of(queue, task) == "pending"
    assert store.get(worker_key("drainer")) is None  # deregistered all the same
    assert worker.run(install_signal_handlers=False) == 0  # the next run starts afresh
    assert status_of(queue, task) == "completed"


def test_a_stop_before_run_ends_that_run_at_once_and_the_next_one_runs(queue):
    worker = make_worker(queue)  # not drain: only stop() can end its run
    worker.task("t")(lambda input: None)
    task = queue.submit("t", {})
    worker.stop()

    assert worker.run(install_signal_handlers=False) == 0
    assert status_of(queue, task) == "pending"
    with running(worker):
        wait_for(lambda: status_of(queue, task) == "completed")


def test_run_without_handlers_is_an_error_that_says_what_to_do(queue):
    worker = make_worker(queue, worker_id="w-none")
    with pytest.raises(BuquetError) as e:
        worker.run(install_signal_handlers=False)
    assert str(e.value) == 'worker w-none has no handlers: register one with @worker.task("type")'


# ============================================================================
# AWS Lambda
# ============================================================================


class FakeLambdaContext:
    def __init__(self, milliseconds):
        self.deadline = time.monotonic() + milliseconds / 1000.0

    def get_remaining_time_in_millis(self):
        return int((self.deadline - time.monotonic()) * 1000)


def test_the_lambda_handler_drains_the_queue_and_returns_early_when_it_is_empty(queue):
    worker = make_worker(queue, concurrency=2)
    worker.task("t")(lambda input: {"n": input["n"]})
    tasks = [queue.submit("t", {"n": i}) for i in range(5)]
    started = time.monotonic()
    result = worker.lambda_handler({}, FakeLambdaContext(30000))
    assert time.monotonic() - started < 3
    assert result == {"worker_id": "w1", "completed": 5, "failed": 0, "stopped_early": False}
    assert all(status_of(queue, t) == "completed" for t in tasks)


def test_a_warm_lambda_invoked_again_at_once_looks_at_the_queue_again(queue):
    # The worker object outlives an invocation in a warm Lambda; the last empty poll's
    # back-off (up to poll_max) must not make the next invocation return without a look.
    worker = make_worker(queue, poll_min=5.0, poll_max=5.0)
    worker.task("t")(lambda input: input)
    assert worker.lambda_handler({}, FakeLambdaContext(30000))["completed"] == 0
    task = queue.submit("t", {"n": 1})

    started = time.monotonic()
    result = worker.lambda_handler({}, FakeLambdaContext(30000))

    assert time.monotonic() - started < 3
    assert result["completed"] == 1 and status_of(queue, task) == "completed"


def test_max_tasks_and_the_counts_are_per_run(queue):
    worker = make_worker(queue, max_tasks=2)
    worker.task("t")(lambda input: input)
    tasks = [queue.submit("t", {"n": n}) for n in range(4)]

    assert worker.lambda_handler({}, FakeLambdaContext(30000))["completed"] == 2
    assert worker.lambda_handler({}, FakeLambdaContext(30000))["completed"] == 2
    assert all(status_of(queue, t) == "completed" for t in tasks)


def test_the_lambda_handler_requeues_what_still_runs_before_the_deadline(queue):
    release = threading.Event()

    def handler(input):
        if input.get("slow"):
            release.wait(20)
        return "done"

    worker = make_worker(queue, concurrency=2, grace_period=30)
    worker.task("t")(handler)
    slow = queue.submit("t", {"slow": True})
    quick = [queue.submit("t", {}) for _ in range(3)]
    context = FakeLambdaContext(3000)
    started = time.monotonic()
    result = worker.lambda_handler({}, context, margin=1.5)
    elapsed = time.monotonic() - started
    remaining = context.get_remaining_time_in_millis()
    release.set()
    # Claiming stops at deadline - margin; the grace is at most half the
    # margin (0.75 s), so the function returns with time to spare.
    assert 1.5 <= elapsed < 2.9
    assert remaining > 100
    assert result == {"worker_id": "w1", "completed": 3, "failed": 0, "stopped_early": True}
    assert all(status_of(queue, t) == "completed" for t in quick)
    back = queue.get(slow.id)
    assert (back.status, back.retry_count, back.lease_id) == ("pending", 0, None)
    assert worker.grace_period == 30  # restored for the next invocation


# ============================================================================
# The worker's construction
# ============================================================================


@pytest.mark.parametrize("kwargs, message", [
    ({"shards": ["g"]}, "shard must be one of 0..f, got 'g'"),
    ({"shards": []}, "shards must name at least one shard"),
    ({"concurrency": 0}, "concurrency must be an integer 1..1024, got 0"),
    ({"max_tasks": 0}, "max_tasks must be an integer 1..1000000000000, got 0"),
    ({"grace_period": "30"}, "grace_period must be a number of seconds or a timedelta, got '30'"),
    ({"worker_id": "a/b"}, "worker_id must be a non-empty string without '/' or control characters, got 'a/b'"),
])
def test_bad_worker_options_are_refused_with_a_message_naming_them(kwargs, message):
    kwargs = dict(kwargs)
    worker_id = kwargs.pop("worker_id", "w")
    shards = kwargs.pop("shards", None)
    with pytest.raises(ValueError) as e:
        Worker(Queue(MemoryStore()), worker_id, shards, **kwargs)
    assert str(e.value) == message


def test_a_worker_needs_a_queue():
    with pytest.raises(TypeError) as e:
        Worker("my-bucket", "w")
    assert str(e.value) == "Worker needs a Queue (from buquet.connect()), got 'my-bucket'"


def test_a_worker_without_an_id_gets_a_random_one_like_the_cli():
    worker = Worker(Queue(MemoryStore()))
    assert worker.worker_id.startswith("worker-") and len(worker.worker_id) == 15
    assert worker.shards == list(buquet.ALL_SHARDS)


def test_a_handler_must_be_callable_and_its_type_a_valid_name():
    worker = Worker(Queue(MemoryStore()), "w")
    with pytest.raises(TypeError, match="a handler must be callable"):
        worker.task("t")("not a function")
    with pytest.raises(ValueError, match="task_type must be a non-empty string"):
        worker.task("")


# ============================================================================
# asyncio: the seed's form, on the memory store
# ============================================================================


def test_the_async_form_runs_coroutine_handlers_on_the_caller_s_loop():
    seen = {}

    async def main():
        queue = await buquet.connect(store=MemoryStore())
        assert isinstance(queue, AsyncQueue)
        task = await queue.submit("send_email", {"to": "user@example.com"})
        worker = Worker(queue, "worker-1", ["0", "1", "2", "3"], max_tasks=1, poll_min=0.01, poll_max=0.05,
                        monitor=False, scheduler=False)
        seen["loop"] = asyncio.get_running_loop()
        if task.shard not in "0123":  # the seed's shards: make sure the task is in one of them
            worker = Worker(queue, "worker-1", max_tasks=1, poll_min=0.01, poll_max=0.05, monitor=False,
                            scheduler=False)

        @worker.task("send_email")
        async def handle(input):
            seen["handler_loop"] = asyncio.get_running_loop()
            return {"sent": True}

        code = await worker.run()
        return code, await queue.get(task.id)

    code, task = asyncio.run(main())
    assert code == 0
    assert (task.status, task.output) == ("completed", {"sent": True})
    assert seen["handler_loop"] is seen["loop"]


def test_a_worker_run_under_asyncio_can_later_run_coroutine_handlers_without_it():
    store = MemoryStore()
    worker = Worker(Queue(store), "w", max_tasks=1, poll_min=0.01, poll_max=0.05, monitor=False, scheduler=False)

    @worker.task("t")
    async def handler(input):
        await asyncio.sleep(0)
        return input

    queue = Queue(store)
    first = queue.submit("t", 1)

    async def main():
        return await worker.run()

    assert asyncio.run(main()) == 0  # that loop is closed now
    second = queue.submit("t", 2)
    worker.max_tasks = None  # max_tasks counts claims over the worker's life
    worker.drain = True
    assert worker.run(install_signal_handlers=False) == 0
    assert [queue.get(t.id).output for t in (first, second)] == [1, 2]


# ============================================================================
# Import cost
# ============================================================================


def test_importing_buquet_and_running_a_synchronous_worker_never_imports_asyncio(tmp_path):
    program = (
        "import sys\n"
        "import buquet\n"
        "assert 'asyncio' not in sys.modules, 'import buquet'\n"
        "queue = buquet.connect(local_dir='store')  # the embedded local store\n"
        "task = queue.submit('t', {'n': 1})\n"
        "worker = buquet.Worker(queue, 'w', drain=True, poll_min=0.01, poll_max=0.05, scheduler=False)\n"
        "worker.task('t')(lambda input: input)\n"
        "assert worker.run() == 0\n"
        "assert queue.get(task.id).status == 'completed'\n"
        "assert 'asyncio' not in sys.modules, 'a synchronous run'\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", program], cwd=str(tmp_path), capture_output=True, text=True,
                          timeout=60, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    assert done.stdout == "ok\n"
