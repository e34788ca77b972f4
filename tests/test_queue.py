"""The queue's logic on the in-memory store, with a clock the tests advance
and a fixed random source: no network, no sleeping.

Request counts come from MemoryStore.requests (operation -> count), which
counts one per store call, the way S3 would bill it.
"""

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from helpers import Clock

import buquet
from buquet import (
    ConflictError,
    IdempotencyConflict,
    InvalidTaskDocument,
    InvalidTransition,
    LeaseMismatch,
    MemoryStore,
    Queue,
    RetryPolicy,
    StoreError,
    TaskNotFound,
    idempotency_key,
    lease_key,
    ready_key,
    task_key,
)

UTC = timezone.utc
GOLDEN = Path(__file__).resolve().parent / "golden"
START = datetime(2026, 1, 27, 12, 0, 5, tzinfo=UTC)
FAST = RetryPolicy(100, 1000, 2.0, 0.0)
IDS = [
    "3f2b8c1e-5a7d-4e9b-8c21-0d6f4a1b2c3d",
    "b7e1c2d3-0a4f-4c5d-9e6f-7a8b9c0d1e2f",
    "c0ffee00-1111-4222-8333-444455556666",
]
MISSING = "0a7f9e3c-2b1d-4c6e-9f80-1a2b3c4d5e6f"


@pytest.fixture
def clock():
    return Clock(START)


@pytest.fixture
def store(clock):
    return MemoryStore(clock=clock)


@pytest.fixture
def queue(store):
    q = Queue(store, rand=lambda: 0.5)  # 0.5: jitter factor exactly 1, first shard "8"
    yield q
    q.close()


def keys(store, prefix=""):
    """Every key under prefix, without counting a request."""
    return sorted(k for k in store._objects if k.startswith(prefix))


def body(store, key):
    return store._objects[key].body


def doc(store, task):
    return json.loads(body(store, task.key))


def fresh(store):
    store.requests.clear()
    return store


def ts(moment):
    return buquet.format_timestamp(moment)


# ============================================================================
# Submit
# ============================================================================


def test_submit_writes_the_task_and_its_ready_entry_with_two_puts(queue, store):
    task = queue.submit("send_email", {"to": "a@example.com"})

    assert store.requests == {"PUT": 2}
    assert keys(store) == [ready_key(task.shard, START, task.id), task_key(task.shard, task.id)]
    assert (task.status, task.available_at, task.created_at) == ("pending", START, START)
    assert doc(store, task) == task.doc


class _LearningStore(MemoryStore):
    """A store that, like S3Store, learns its clock from replies: submit may
    stamp with a provisional time, checked by `agreed` after the first PUT."""

    def __init__(self, clock, provisional, agreed):
        super().__init__(clock=clock)
        self._provisional, self._agreed = provisional, agreed

    def provisional_now(self):
        return self._provisional, self._agreed


def test_a_provisional_time_the_store_agrees_with_costs_nothing_extra(clock):
    early = START - timedelta(seconds=0.3)
    store = _LearningStore(clock, early, lambda: True)

    task = Queue(store).submit("t", {})

    assert store.requests == {"PUT": 2}
    assert (task.created_at, task.available_at) == (early, early)
    assert keys(store, "ready/") == [ready_key(task.shard, early, task.id)]


def test_a_provisional_time_the_store_disagrees_with_is_rewritten_with_its_ready_entry(clock):
    store = _LearningStore(clock, START + timedelta(hours=1), lambda: False)

    task = Queue(store).submit("t", {}, delay=10)

    # ready entry and task at the local time, again at the server's, the first entry deleted
    assert store.requests == {"PUT": 4, "DELETE": 1}
    assert (task.created_at, task.available_at) == (START, START + timedelta(seconds=10))
    assert doc(store, task) == task.doc
    assert keys(store, "ready/") == [ready_key(task.shard, START + timedelta(seconds=10), task.id)]


def test_a_task_changed_before_its_restamp_is_left_to_whoever_changed_it(clock):
    def claimed_meanwhile():  # a sweeper indexed the new task and a worker claimed it
        (key,) = keys(store, "tasks/")
        Queue(store).claim(key.rsplit("/", 1)[1][:-5], "w1")
        return False

    store = _LearningStore(clock, START, claimed_meanwhile)

    task = Queue(store).submit("t", {})

    assert task.status == "running"
    assert doc(store, task) == task.doc


def test_a_submitted_document_matches_the_spec_example_byte_for_byte(queue, store):
    task = queue.submit("send_email", {"to": "a@example.com"})

    expected = _golden("pending").read_bytes().rstrip(b"\n")
    expected = expected.replace(b"3f2b8c1e-5a7d-4e9b-8c21-0d6f4a1b2c3d", task.id.encode())
    expected = expected.replace(b'"shard":"3"', b'"shard":"%s"' % task.shard.encode())
    assert body(store, task.key) == expected
    assert task.shard == task.id[0]


def _golden(name):
    return GOLDEN / ("%s.json" % name)


def test_submit_with_a_delay_is_claimable_after_it(queue, store, clock):
    task = queue.submit("t", {}, delay=90)

    assert task.available_at == START + timedelta(seconds=90)
    assert keys(store, "ready/") == ["ready/%s/%s/%s" % (task.shard, "0029491921", task.id)]
    assert queue.claim_next() is None
    clock.advance(89)
    assert queue.claim_next() is None
    clock.advance(1)
    assert queue.claim_next().id == task.id


def test_submit_with_a_timedelta_delay_and_with_an_instant(queue):
    a = queue.submit("t", {}, delay=timedelta(minutes=2, milliseconds=500))
    b = queue.submit("t", {}, at="2026-01-27T13:00:00+01:00")
    c = queue.submit("t", {}, at=datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC))
    d = queue.submit("t", {}, at="2020-01-01T00:00:00Z")  # the past is accepted, as by the original

    assert a.doc["available_at"] == "2026-01-27T12:02:05.500Z"
    assert b.doc["available_at"] == "2026-01-27T12:00:00Z"
    assert c.doc["available_at"] == "2030-01-02T03:04:05Z"
    assert d.doc["available_at"] == "2020-01-01T00:00:00Z"
    assert buquet.ready_key(c.shard, c.available_at, c.id) == "ready/%s/0031559224/%s" % (c.shard, c.id)


def test_submit_with_a_ttl_or_an_expiry_instant_sets_expires_at(queue):
    a = queue.submit("t", {}, ttl=600)
    b = queue.submit("t", {}, expires_at="2026-01-27T12:10:05Z")

    assert a.doc["expires_at"] == "2026-01-27T12:10:05Z"
    assert b.doc["expires_at"] == "2026-01-27T12:10:05Z"
    assert list(a.doc)[-1] == "expires_at"


def test_submit_writes_every_option(queue, store):
    task = queue.submit("t", {"n": 1}, timeout=30, max_retries=0, retry_policy=FAST, max_reschedules=5)

    written = doc(store, task)
    assert (written["timeout_seconds"], written["max_retries"], written["max_reschedules"]) == (30, 0, 5)
    assert written["retry_policy"] == {"initial_interval_ms": 100, "max_interval_ms": 1000, "multiplier": 2.0,
                                       "jitter_percent": 0.0}
    assert list(written).index("max_reschedules") == list(written).index("reschedule_count") + 1
    policy_as_dict = queue.submit("t", {}, retry_policy={"initial_interval_ms": 5, "multiplier": 3})
    assert policy_as_dict.doc["retry_policy"] == {"initial_interval_ms": 5, "max_interval_ms": 60000,
                                                  "multiplier": 3.0, "jitter_percent": 0.25}


def test_the_input_is_written_as_given_with_raw_non_ascii(queue, store):
    task = queue.submit("t", {"z": "é", "a": [1, 2.5, None, True]})
    assert b'"input":{"z":"\xc3\xa9","a":[1,2.5,null,true]}' in body(store, task.key)


_T = datetime(2026, 1, 27, 13, 0, tzinfo=UTC)


@pytest.mark.parametrize("call, message", [
    (lambda q: q.submit("t", {"x": object()}), "input must be JSON-serialisable: object at input['x'] is not"),
    (lambda q: q.submit("t", {1, 2}), "input must be JSON-serialisable, got set"),
    (lambda q: q.submit("t", {"x": [float("nan")]}), "input: nan at input['x'][0] is not valid JSON"),
    (lambda q: q.submit("t", {"x": float("inf")}), "input: inf at input['x'] is not valid JSON"),
    (lambda q: q.submit("t", {1: "a"}), "input: object keys must be strings, got 1 at input"),
    (lambda q: q.submit("t", {"big": 2 ** 64}), "input: integer out of the 64-bit range at input['big']"),
    (lambda q: q.submit("t", {}, delay=-1), "delay must not be negative, got -1"),
    (lambda q: q.submit("t", {}, delay=timedelta(seconds=-1)),
     "delay must not be negative, got datetime.timedelta(days=-1, seconds=86399)"),
    (lambda q: q.submit("t", {}, delay="soon"), "delay must be a number of seconds or a timedelta, got 'soon'"),
    (lambda q: q.submit("t", {}, delay=5, at=_T), "give either delay or at, not both"),
    (lambda q: q.submit("t", {}, at="tomorrow"),
     "at must be an RFC 3339 timestamp with an offset (2026-01-28T09:00:00Z), got 'tomorrow'"),
    (lambda q: q.submit("t", {}, at=datetime(2026, 1, 28)),
     "at must be an aware datetime or an RFC 3339 string, got datetime.datetime(2026, 1, 28, 0, 0)"),
    (lambda q: q.submit("t", {}, ttl=0),
     "ttl must be positive (a TTL in the past expires the task at once), got 0"),
    (lambda q: q.submit("t", {}, ttl=-60),
     "ttl must be positive (a TTL in the past expires the task at once), got -60"),
    (lambda q: q.submit("t", {}, expires_at="2026-01-27T12:00:00Z"), "expires_at is in the past: 2026-01-27T12:00:00Z"),
    (lambda q: q.submit("t", {}, expires_at=START), "expires_at is in the past: 2026-01-27T12:00:05Z"),
    (lambda q: q.submit("t", {}, ttl=60, expires_at=_T), "give either ttl or expires_at, not both"),
    (lambda q: q.submit("", {}), "task_type must be a non-empty string without '/' or control characters, got ''"),
    (lambda q: q.submit("a/b", {}),
     "task_type must be a non-empty string without '/' or control characters, got 'a/b'"),
    (lambda q: q.submit(None, {}),
     "task_type must be a non-empty string without '/' or control characters, got None"),
    (lambda q: q.submit("t", {}, timeout=0), "timeout must be an integer 1..18446744073709551615, got 0"),
    (lambda q: q.submit("t", {}, timeout=1.5), "timeout must be an integer 1..18446744073709551615, got 1.5"),
    (lambda q: q.submit("t", {}, max_retries=-1), "max_retries must be an integer 0..4294967295, got -1"),
    (lambda q: q.submit("t", {}, max_reschedules=2 ** 32),
     "max_reschedules must be an integer 0..4294967295, got 4294967296"),
    (lambda q: q.submit("t", {}, retry_policy="fast"), "retry_policy must be a RetryPolicy or a dict, got 'fast'"),
    (lambda q: q.submit("t", {}, retry_policy={"multiplier": 0.5}),
     "retry_policy: multiplier must be a number >= 1, got 0.5"),
    (lambda q: q.submit("t", {}, idempotency_key=""), "idempotency_key must be a non-empty string, got ''"),
    (lambda q: q.submit("t", {}, idempotency_key="k", idempotency_scope="a/b"),
     "idempotency_scope must be a non-empty string without '/' or control characters, got 'a/b'"),
    (lambda q: q.submit("t", {}, idempotency_key="k", idempotency_ttl_days=0),
     "idempotency_ttl_days must be an integer 1..4294967295, got 0"),
    (lambda q: q.submit_many([("t", {}), ("t", {"x": object()})]),
     "input must be JSON-serialisable: object at input['x'] is not"),
    (lambda q: q.submit_many([{"input": {}}]), "submit_many: item 0 has no task_type"),
    (lambda q: q.list("g"), "shard must be one of 0..f, got 'g'"),
    (lambda q: q.list("00"), "shard must be one of 0..f, got '00'"),
    (lambda q: q.list("0", status="done"),
     "status must be one of pending, running, completed, failed, cancelled, archived, expired, got 'done'"),
    (lambda q: q.list("0", status="PENDING"),
     "status must be one of pending, running, completed, failed, cancelled, archived, expired, got 'PENDING'"),
    (lambda q: q.list("0", limit=0), "limit must be an integer 1..1000000000, got 0"),
    (lambda q: q.list_ready("x"), "shard must be one of 0..f, got 'x'"),
    (lambda q: q.claim_next(shards=["0", "g"]), "shard must be one of 0..f, got 'g'"),
    (lambda q: q.get("not-a-uuid"), "task id must be a UUID, got 'not-a-uuid'"),
    (lambda q: q.claim("not-a-uuid", "w"), "task id must be a UUID, got 'not-a-uuid'"),
    (lambda q: q.cancel("42"), "task id must be a UUID, got '42'"),
    (lambda q: q.cancel_many([IDS[0], "nope"]), "task id must be a UUID, got 'nope'"),
    (lambda q: q.request_cancellation(None), "task id must be a UUID, got None"),
    (lambda q: q.mark_expired("x"), "task id must be a UUID, got 'x'"),
    (lambda q: q.archive("x"), "task id must be a UUID, got 'x'"),
    (lambda q: q.replay("x"), "task id must be a UUID, got 'x'"),
    (lambda q: q.history("x"), "task id must be a UUID, got 'x'"),
])
def test_an_invalid_argument_fails_before_any_request_naming_the_argument(queue, store, call, message):
    with pytest.raises(ValueError) as exc:
        call(queue)
    assert str(exc.value) == message
    assert store.requests == {}
    assert keys(store) == []


# ============================================================================
# Claim
# ============================================================================


def test_claim_costs_get_put_lease_put_and_ready_delete(queue, store):
    task = queue.submit("t", {})
    fresh(store)

    claimed = queue.claim(task.id, "worker-1")

    assert store.requests == {"GET": 1, "PUT": 2, "DELETE": 1}
    assert claimed.status == "running"
    assert (claimed.worker_id, claimed.attempt) == ("worker-1", 1)
    assert claimed.lease_expires_at == START + timedelta(seconds=300)
    assert keys(store, "ready/") == []
    assert keys(store, "leases/") == [lease_key(task.shard, claimed.lease_expires_at, task.id)]
    assert claimed.etag == store._objects[task.key].etag


def test_claim_next_claims_with_lists_plus_the_claim_requests(queue, store):
    task = queue.submit("t", {})
    fresh(store)

    claimed = queue.claim_next(worker_id="worker-1")

    assert claimed.id == task.id
    assert store.requests == {"LIST": 1, "GET": 1, "PUT": 2, "DELETE": 1}


def test_an_empty_queue_costs_one_list_for_all_shards_and_claims_nothing(queue, store):
    assert queue.claim_next() is None
    assert store.requests == {"LIST": 1}
    fresh(store)
    assert queue.claim_next(shards=["3", "a"]) is None
    assert store.requests == {"LIST": 1}


def test_claim_next_skips_tasks_of_other_types_without_writing(queue, store):
    task = queue.submit("send_email", {})
    fresh(store)

    assert queue.claim_next(task_types=["resize_image"]) is None

    assert store.requests == {"LIST": 1, "GET": 1}
    assert doc(store, task)["status"] == "pending"
    assert queue.claim_next(task_types=["send_email"]).id == task.id


def test_claim_next_does_not_read_tasks_of_a_future_minute(queue, store):
    queue.submit("t", {}, delay=3600)
    fresh(store)

    assert queue.claim_next() is None
    assert store.requests == {"LIST": 1}


def test_a_task_due_later_in_the_current_minute_is_read_but_not_claimed(queue, store, clock):
    task = queue.submit("t", {}, delay=30)
    fresh(store)

    assert queue.claim_next() is None
    assert store.requests == {"LIST": 1, "GET": 1}
    clock.advance(30)
    assert queue.claim_next().id == task.id


def test_a_task_whose_ttl_passed_is_marked_expired_instead_of_claimed(queue, store, clock):
    task = queue.submit("t", {}, ttl=60)
    clock.advance(60)

    assert queue.claim_next() is None

    expired = doc(store, task)
    assert (expired["status"], expired["expired_at"]) == ("expired", "2026-01-27T12:01:05Z")
    assert keys(store, "ready/") == []
    assert keys(store, "leases/") == []


def test_a_task_claimed_by_another_worker_is_not_claimed_twice(queue, store):
    task = queue.submit("t", {})
    first = queue.claim(task.id, "w1")

    assert queue.claim(task.id, "w2") is None
    assert queue.claim_next() is None
    assert doc(store, first)["worker_id"] == "w1"


def test_a_claim_that_loses_the_race_returns_none_and_writes_nothing_else(queue, store):
    task = queue.submit("t", {})
    original_put = store.put

    def racing_put(key, body, **kw):
        if key == task.key and kw.get("if_match"):
            store.put = original_put
            original_put(key, body.replace(b'"w1"', b'"w-other"'), if_match=kw["if_match"])
        return original_put(key, body, **kw)

    store.put = racing_put
    fresh(store)
    assert queue.claim(task.id, "w1") is None
    winner = doc(store, task)
    assert winner["worker_id"] == "w-other"
    # The lease entry went first; here it is the winner's own (same minute): it stays.
    assert store.requests == {"GET": 2, "PUT": 3}  # read, entry, rival's and our task PUT, re-read
    assert keys(store, "leases/") == buquet.index_keys(winner)
    assert keys(store, "ready/") == [ready_key(task.shard, START, task.id)]  # not ours to delete


def test_a_claim_that_loses_the_race_to_another_minute_deletes_its_lease_entry(queue, store, clock):
    task = queue.submit("t", {}, timeout=30)
    original_put = store.put

    def racing_put(key, body, **kw):
        if key == task.key and kw.get("if_match"):
            store.put = original_put
            rival = json.loads(body)  # a rival whose clock read 40 s later: its lease ends a minute on
            rival.update(worker_id="w-other", lease_expires_at="2026-01-27T12:01:15Z")
            original_put(key, buquet.encode_task(rival), if_match=kw["if_match"])
            original_put(buquet.index_keys(rival)[0], b"")
        return original_put(key, body, **kw)

    store.put = racing_put
    assert queue.claim(task.id, "w1") is None
    assert keys(store, "leases/") == buquet.index_keys(doc(store, task))  # the rival's only


class _OrderedStore(MemoryStore):
    """A MemoryStore that logs (operation, key) in order and can die (raise
    SystemExit, as a SIGKILL would cut the process) at a chosen write."""

    def __init__(self, clock):
        super().__init__(clock=clock)
        self.log, self.die_at = [], None

    def put(self, key, body, **kwargs):
        if self.die_at and self.die_at(key, kwargs):
            raise SystemExit("killed")
        self.log.append(("PUT", key))
        return super().put(key, body, **kwargs)

    def delete(self, key):
        self.log.append(("DELETE", key))
        return super().delete(key)


def test_transitions_write_the_entry_the_new_state_needs_before_the_task(clock):
    store = _OrderedStore(clock)
    queue = Queue(store, rand=lambda: 0.5)
    task = queue.submit("t", {}, timeout=30, retry_policy=FAST)
    store.log.clear()

    claimed = queue.claim(task.id, "w1")
    lease_entry = buquet.index_keys(claimed.doc)[0]
    assert store.log[:2] == [("PUT", lease_entry), ("PUT", task.key)]
    store.log.clear()

    retried = queue.retry(claimed, "boom")  # pending again, after a backoff
    ready_entry = buquet.index_keys(retried.doc)[0]
    assert retried.status == "pending"
    assert store.log == [("PUT", ready_entry), ("PUT", task.key), ("DELETE", lease_entry)]


class _IndexOutage(MemoryStore):
    """Every PUT under a prefix fails (the client's retries spent)."""

    failing = None

    def put(self, key, body, **kwargs):
        if self.failing and key.startswith(self.failing):
            raise StoreError("PUT %s: 503 SlowDown (simulated, after 5 attempts)" % key)
        return super().put(key, body, **kwargs)


def test_an_index_entry_that_cannot_be_written_stops_the_transition_that_needed_it(clock):
    store = _IndexOutage(clock=clock)
    queue = Queue(store, rand=lambda: 0.5)
    store.failing = "ready/"
    with pytest.raises(StoreError):
        queue.submit("t", {})  # no task without its ready entry
    assert keys(store) == []

    store.failing = None
    task = queue.submit("t", {}, retry_policy=FAST)
    store.failing = "leases/"
    with pytest.raises(StoreError):
        queue.claim(task.id, "w1")
    assert doc(store, task) == task.doc  # still pending, still indexed
    assert keys(store, "ready/") == buquet.index_keys(task.doc)

    store.failing = None
    claimed = queue.claim(task.id, "w1")
    store.failing = "ready/"
    with pytest.raises(StoreError):
        queue.retry(claimed, "boom")
    assert doc(store, task) == claimed.doc  # still running under its lease: the monitor's
    assert keys(store, "leases/") == buquet.index_keys(claimed.doc)


def test_a_worker_killed_between_the_entry_and_the_task_leaves_nothing_the_monitor_cannot_mend(clock):
    store = _OrderedStore(clock)
    queue = Queue(store, rand=lambda: 0.5)
    task = queue.submit("t", {}, timeout=30, retry_policy=FAST)
    store.die_at = lambda key, kw: key == task.key  # dies at the claim's task PUT
    with pytest.raises(SystemExit):
        queue.claim(task.id, "w1")
    store.die_at = None
    (entry,) = keys(store, "leases/")

    # The monitor leaves the entry while a claim could still be in flight...
    clock.advance(40)  # (the monitor looks at entries of minutes that have begun)
    assert queue.recover_expired_leases() == [] and keys(store, "leases/") == [entry]
    assert queue.sweeper().run_pass() and keys(store, "leases/") == [entry]
    # ... and drops it once that cannot be; the task was claimable throughout.
    clock.advance(buquet.INDEX_SETTLE)
    assert queue.recover_expired_leases() == [] and keys(store, "leases/") == []
    assert queue.claim(task.id, "w2").worker_id == "w2"


def test_a_worker_killed_after_the_claim_is_found_by_the_monitor(clock):
    store = _OrderedStore(clock)
    queue = Queue(store, rand=lambda: 0.5)
    task = queue.submit("t", {}, timeout=30, retry_policy=FAST)
    claimed = queue.claim(task.id, "w1")  # the process then dies running the handler

    clock.advance(31)
    (recovered,) = queue.recover_expired_leases()

    assert (recovered.id, recovered.status, recovered.retry_count) == (claimed.id, "pending", 1)


# ============================================================================
# Finishing a claimed task
# ============================================================================


def test_complete_costs_one_put_and_one_delete(queue, store, clock):
    queue.submit("t", {})
    task = queue.claim_next(worker_id="w1")
    clock.advance(2.5)
    fresh(store)

    done = queue.complete(task, {"sent": True})

    assert store.requests == {"PUT": 1, "DELETE": 1}
    assert (done.status, done.output, done.completed_at) == ("completed", {"sent": True},
                                                              START + timedelta(seconds=2.5))
    assert (done.lease_id, done.worker_id, done.lease_expires_at) == (None, None, None)
    assert keys(store, "leases/") == [] and keys(store, "ready/") == []


def test_a_failing_task_is_retried_with_backoff_then_failed_when_retries_run_out(queue, store, clock):
    task = queue.submit("t", {}, max_retries=2, retry_policy=FAST)

    first = queue.claim_next(worker_id="w1")
    retried = queue.retry(first, "Retryable error: 503")
    assert (retried.status, retried.retry_count, retried.last_error) == ("pending", 1, "Retryable error: 503")
    assert retried.available_at == START + timedelta(milliseconds=100)
    assert keys(store, "leases/") == []
    assert keys(store, "ready/") == [ready_key(task.shard, retried.available_at, task.id)]
    assert queue.claim_next() is None  # 100 ms not yet passed

    clock.advance(0.1)
    second = queue.claim_next(worker_id="w1")
    assert second.attempt == 2
    retried = queue.retry(second, "Retryable error: 503 again")
    assert retried.available_at == clock.now + timedelta(milliseconds=200)
    assert retried.retry_count == 2

    clock.advance(0.2)
    third = queue.claim_next(worker_id="w1")
    failed = queue.retry(third, "Retryable error: still 503")

    assert (failed.status, failed.retry_count, failed.attempt) == ("failed", 2, 3)
    assert failed.last_error == "Retryable error: still 503"
    assert failed.completed_at == clock.now
    assert keys(store, "leases/") == [] and keys(store, "ready/") == []


def test_the_default_retry_policy_waits_a_jittered_second(store, clock):
    q = Queue(store, rand=lambda: 0.0)
    q.submit("t", {})
    task = q.claim_next()
    retried = q.retry(task, "x")
    assert retried.available_at == START + timedelta(milliseconds=750)


def test_fail_ends_a_task_at_once_whatever_its_retries(queue, store):
    queue.submit("t", {}, max_retries=5)
    task = queue.claim_next()

    failed = queue.fail(task, ValueError("bad input"))

    assert (failed.status, failed.last_error, failed.retry_count) == ("failed", "bad input", 0)
    assert keys(store, "leases/") == []


def test_reschedule_runs_the_task_again_later_without_consuming_a_retry(queue, store, clock):
    task = queue.submit("t", {}, max_retries=1, max_reschedules=1)
    claimed = queue.claim_next()

    again = queue.reschedule(claimed, 10)

    assert (again.status, again.reschedule_count, again.retry_count) == ("pending", 1, 0)
    assert again.available_at == START + timedelta(seconds=10)
    assert keys(store, "ready/") == [ready_key(task.shard, again.available_at, task.id)]
    assert queue.claim_next() is None
    clock.advance(10)
    claimed = queue.claim_next()
    failed = queue.reschedule(claimed, 10)
    assert (failed.status, failed.last_error, failed.reschedule_count) == (
        "failed", "Max reschedules (1) exceeded", 1)


def test_reschedule_with_a_negative_delay_is_refused_before_any_request(queue, store):
    queue.submit("t", {})
    task = queue.claim_next()
    fresh(store)
    with pytest.raises(ValueError) as exc:
        queue.reschedule(task, -5)
    assert str(exc.value) == "delay must not be negative, got -5"
    assert store.requests == {}


def test_extend_lease_moves_the_lease_entry_to_the_new_expiry(queue, store, clock):
    task = queue.submit("t", {})
    claimed = queue.claim_next()
    clock.advance(60)
    fresh(store)

    extended = queue.extend_lease(claimed, 120)

    assert extended.lease_expires_at == START + timedelta(seconds=420)
    assert store.requests == {"PUT": 2, "DELETE": 1}
    assert keys(store, "leases/") == [lease_key(task.shard, extended.lease_expires_at, task.id)]
    assert queue.complete(extended, None).status == "completed"


def test_extend_lease_with_zero_seconds_is_refused(queue):
    queue.submit("t", {})
    task = queue.claim_next()
    with pytest.raises(ValueError) as exc:
        queue.extend_lease(task, 0)
    assert str(exc.value) == "seconds must be an integer 1..3153600000, got 0"


def test_requeue_puts_a_claimed_task_back_at_once_without_counting_a_retry(queue, store, clock):
    task = queue.submit("t", {}, max_retries=0)
    claimed = queue.claim_next()
    clock.advance(5)

    back = queue.requeue(claimed)

    assert (back.status, back.retry_count, back.attempt, back.last_error) == ("pending", 0, 1, None)
    assert back.available_at == clock.now
    assert keys(store, "leases/") == []
    assert keys(store, "ready/") == [ready_key(task.shard, clock.now, task.id)]
    assert queue.claim_next().attempt == 2


def test_output_that_is_not_json_is_refused_before_any_request(queue, store):
    queue.submit("t", {})
    task = queue.claim_next()
    fresh(store)
    with pytest.raises(ValueError) as exc:
        queue.complete(task, {"when": datetime(2026, 1, 1)})
    assert str(exc.value) == "output must be JSON-serialisable: datetime at output['when'] is not"
    assert store.requests == {}


def _nested(depth):
    value = []
    for _ in range(depth - 1):
        value = [value]
    return value


def test_inputs_and_outputs_nest_at_most_as_deep_as_the_original_can_read(queue, store):
    # serde_json stops at a document's 128th level; the task document is the first.
    queue.submit("t", _nested(126))
    task = queue.claim_next()
    queue.complete(task, {"deep": _nested(125)})
    fresh(store)

    with pytest.raises(ValueError) as exc:
        queue.submit("t", {"deep": _nested(126)})
    assert str(exc.value).startswith("input is nested more than 126 levels deep at input['deep'][0][0]")
    assert str(exc.value).endswith("... (the original cannot read that)")
    with pytest.raises(ValueError):
        queue.submit("t", _nested(10000))  # far beyond the interpreter's recursion limit
    assert store.requests == {}


# ============================================================================
# Expired leases
# ============================================================================


def test_a_worker_whose_lease_expired_cannot_finish_after_recovery(queue, store, clock):
    task = queue.submit("t", {}, timeout=10, retry_policy=FAST)
    stale = queue.claim_next(worker_id="slow")
    clock.advance(11)

    recovered = queue.recover_expired_leases()

    assert [t.id for t in recovered] == [task.id]
    back = doc(store, task)
    assert (back["status"], back["retry_count"], back["last_error"], back["worker_id"]) == (
        "pending", 1, "Timeout - task exceeded lease duration", None)
    assert back["available_at"] == ts(clock.now + timedelta(milliseconds=100))
    assert keys(store, "leases/") == []
    assert keys(store, "ready/") == [ready_key(task.shard, clock.now, task.id)]
    message = ("lease %s no longer holds task %s: the lease expired and another attempt took over"
               % (stale.lease_id, task.id))
    for finish in (lambda: queue.complete(stale, {}), lambda: queue.retry(stale, "x"),
                   lambda: queue.fail(stale, "x"), lambda: queue.extend_lease(stale, 60),
                   lambda: queue.reschedule(stale, 1), lambda: queue.requeue(stale)):
        with pytest.raises(LeaseMismatch) as exc:
            finish()
        assert str(exc.value) == message
    assert json.loads(body(store, task.key)) == back

    clock.advance(1)
    fresh_claim = queue.claim_next(worker_id="fast")
    with pytest.raises(LeaseMismatch):
        queue.complete(stale, {})
    assert queue.complete(fresh_claim, {"ok": 1}).status == "completed"


def test_recovery_with_no_retries_left_fails_the_task_with_the_original_message(queue, store, clock):
    task = queue.submit("t", {}, timeout=10, max_retries=0)
    queue.claim_next(worker_id="gone")
    clock.advance(11)

    queue.recover_expired_leases()

    failed = doc(store, task)
    assert (failed["status"], failed["last_error"]) == ("failed", "Timeout after max retries (0 attempts)")
    assert (failed["completed_at"], failed["lease_id"], failed["worker_id"]) == (ts(clock.now), None, None)
    assert keys(store, "leases/") == [] and keys(store, "ready/") == []


def test_recovery_leaves_leases_that_have_not_run_out(queue, store, clock):
    task = queue.submit("t", {}, timeout=10)
    queue.claim_next()
    clock.advance(10)  # strictly after the expiry only

    assert queue.recover_expired_leases() == []
    assert doc(store, task)["status"] == "running"


def test_recovery_drops_lease_entries_of_missing_and_finished_tasks(queue, store, clock):
    done = queue.submit("t", {})
    queue.complete(queue.claim(done.id, "w"), None)
    stale_finished = lease_key(done.shard, START, done.id)
    orphan = lease_key(MISSING[0], START, MISSING)
    store.put(stale_finished, b"")
    store.put(orphan, b"")
    clock.advance(120)

    assert queue.recover_expired_leases() == []
    assert keys(store, "leases/") == []


# ============================================================================
# Conflicts resolved by re-reading
# ============================================================================


def test_complete_after_a_cancellation_request_changed_the_etag_rereads_and_ends_cancelled(queue, store):
    task = queue.submit("t", {})
    claimed = queue.claim_next()
    flagged = queue.request_cancellation(task.id)
    assert (flagged.status, flagged.cancel_requested) == ("running", True)
    fresh(store)

    result = queue.complete(claimed, {"ok": True})

    # 412 on the held ETag, re-read (the lease is still ours), write again.
    assert store.requests == {"PUT": 2, "GET": 1, "DELETE": 1}
    assert (result.status, result.cancel_requested, result.output) == ("cancelled", True, None)
    assert keys(store, "leases/") == []


def test_complete_after_another_handle_extended_the_lease_rereads_and_completes(queue, store):
    queue.submit("t", {})
    claimed = queue.claim_next()
    queue.extend_lease(claimed, 600)  # the held `claimed` now has an old ETag
    fresh(store)

    result = queue.complete(claimed, {"ok": True})

    assert (result.status, result.output) == ("completed", {"ok": True})
    assert store.requests == {"PUT": 2, "GET": 1, "DELETE": 1}
    assert keys(store, "leases/") == []


def test_a_task_that_keeps_changing_gives_up_with_a_conflict(queue, store):
    task = queue.submit("t", {})
    claimed = queue.claim_next()
    original_put = store.put

    def always_behind(key, body, **kw):
        if key == task.key and kw.get("if_match"):
            original_put(key, store._objects[key].body + b" ", if_match=store._objects[key].etag)
        return original_put(key, body, **kw)

    store.put = always_behind
    with pytest.raises(ConflictError) as exc:
        queue.complete(claimed, None)
    assert str(exc.value) == "task %s kept changing under complete (8 attempts); gave up" % task.id


# ============================================================================
# Cancellation, expiry, archive, replay
# ============================================================================


def test_cancel_ends_a_pending_task_and_drops_its_ready_entry(queue, store):
    task = queue.submit("t", {}, delay=7200)
    fresh(store)

    cancelled = queue.cancel(task.id, reason="No longer needed", cancelled_by="user:alice")

    assert store.requests == {"GET": 1, "PUT": 1, "DELETE": 1}
    assert (cancelled.status, cancelled.last_error, cancelled.cancelled_by) == (
        "cancelled", "No longer needed", "user:alice")
    assert cancelled.cancelled_at == START
    assert keys(store, "ready/") == []


def test_cancel_of_a_running_or_missing_task_says_why(queue):
    task = queue.submit("t", {})
    queue.claim_next()

    with pytest.raises(InvalidTransition) as exc:
        queue.cancel(task.id)
    assert str(exc.value) == "task %s is running: cancel is not allowed (allowed from: pending)" % task.id
    with pytest.raises(TaskNotFound) as exc:
        queue.cancel(MISSING)
    assert str(exc.value) == "task %s not found" % MISSING


def test_cancel_many_reports_each_outcome_in_order(queue):
    a = queue.submit("t", {})
    b = queue.submit("t", {})
    queue.claim(b.id, "w")

    results = queue.cancel_many([a.id, b.id, MISSING], reason="bulk")

    assert results[0].status == "cancelled" and results[0].last_error == "bulk"
    assert isinstance(results[1], InvalidTransition)
    assert str(results[2]) == "task %s not found" % MISSING


def test_cancel_by_type_cancels_every_pending_task_of_the_type_only(queue, store):
    wanted = [queue.submit("report", {"n": i}) for i in range(20)]
    other = queue.submit("email", {})
    running = queue.submit("report", {"n": "run"})
    queue.claim(running.id, "w")

    results = queue.cancel_by_type("report", cancelled_by="user:ops")

    assert sorted(t.id for t in results) == sorted(t.id for t in wanted)
    assert all(t.status == "cancelled" and t.cancelled_by == "user:ops" for t in results)
    assert doc(store, other)["status"] == "pending"
    assert doc(store, running)["status"] == "running"
    assert keys(store, "ready/") == [ready_key(other.shard, START, other.id)]


def test_request_cancellation_of_a_pending_task_cancels_it_at_once(queue, store):
    task = queue.submit("t", {})

    cancelled = queue.request_cancellation(task.id, reason="stop", cancelled_by="user:bob")

    assert (cancelled.status, cancelled.last_error, cancelled.cancelled_by) == ("cancelled", "stop", "user:bob")
    assert keys(store, "ready/") == []


def test_request_cancellation_of_a_running_task_flags_it_and_the_worker_ends_it_cancelled(queue, store):
    task = queue.submit("t", {})
    claimed = queue.claim_next()

    flagged = queue.request_cancellation(task.id)

    assert (flagged.status, flagged.cancel_requested) == ("running", True)
    assert keys(store, "leases/") == [lease_key(task.shard, claimed.lease_expires_at, task.id)]
    ended = queue.finish_cancelled(claimed)  # the held ETag is stale: re-read, lease still ours
    assert (ended.status, ended.cancelled_at, ended.lease_id) == ("cancelled", START, None)
    assert keys(store, "leases/") == []


def test_request_cancellation_of_a_finished_task_is_refused(queue):
    task = queue.submit("t", {})
    queue.complete(queue.claim_next(), None)
    with pytest.raises(InvalidTransition) as exc:
        queue.request_cancellation(task.id)
    assert str(exc.value) == \
        "task %s is completed: request_cancellation is not allowed (allowed from: running)" % task.id


def test_mark_expired_ends_a_pending_task_even_without_a_ttl(queue, store):
    task = queue.submit("t", {})

    expired = queue.mark_expired(task.id)

    assert (expired.status, expired.expired_at, expired.expires_at) == ("expired", START, None)
    assert keys(store, "ready/") == []
    with pytest.raises(InvalidTransition) as exc:
        queue.mark_expired(task.id)
    assert str(exc.value) == "task %s is expired: expire is not allowed (allowed from: pending)" % task.id


def test_archive_keeps_a_finished_task_out_of_the_way(queue, store, clock):
    task = queue.submit("t", {})
    queue.complete(queue.claim_next(), {"r": 1})
    clock.advance(3600)
    fresh(store)

    archived = queue.archive(task.id)

    assert store.requests == {"GET": 1, "PUT": 1}
    assert (archived.status, archived.output, archived.updated_at) == ("archived", {"r": 1}, clock.now)
    with pytest.raises(InvalidTransition) as exc:
        queue.archive(queue.submit("t", {}).id)
    assert str(exc.value).endswith("is pending: archive is not allowed (allowed from: completed, failed, cancelled, expired)")


def test_replay_runs_a_failed_task_again_from_scratch(queue, store, clock):
    task = queue.submit("t", {}, max_retries=0)
    queue.fail(queue.claim_next(), "boom")
    clock.advance(60)

    replayed = queue.replay(task.id)

    assert (replayed.status, replayed.retry_count, replayed.attempt, replayed.last_error,
            replayed.completed_at) == ("pending", 0, 0, None, None)
    assert replayed.available_at == clock.now
    assert keys(store, "ready/") == [ready_key(task.shard, clock.now, task.id)]
    assert queue.claim_next().id == task.id


# ============================================================================
# History
# ============================================================================


def test_history_on_a_versioned_store_lists_every_version_newest_first(clock):
    store = MemoryStore(clock=clock, versioned=True)
    queue = Queue(store, rand=lambda: 0.5)
    task = queue.submit("t", {})
    clock.advance(1)
    claimed = queue.claim_next()
    clock.advance(1)
    queue.retry(claimed, "oops")
    clock.advance(1)
    queue.complete(queue.claim_next(), {"done": True})

    history = queue.history(task.id)

    assert history.versioned is True and history.note is None
    assert [t.status for t in history] == ["completed", "running", "pending", "running", "pending"]
    assert [t.attempt for t in history] == [2, 2, 1, 1, 0]
    assert history[0].output == {"done": True}


def test_history_without_versions_gives_the_current_state_and_says_why(queue):
    task = queue.submit("t", {})
    queue.claim_next()

    history = queue.history(task.id)

    assert history.versioned is False
    assert history.note == "the bucket keeps no object versions: only the current state is known"
    assert [t.status for t in history] == ["running"]
    with pytest.raises(TaskNotFound) as exc:
        queue.history(MISSING)
    assert str(exc.value) == "task %s not found" % MISSING


# ============================================================================
# Reading
# ============================================================================


def test_get_returns_the_task_or_none(queue):
    task = queue.submit("t", {"a": 1})
    assert queue.get(task.id) == task
    assert queue.get(task.id.upper()).id == task.id
    assert queue.get(MISSING) is None


def test_list_filters_by_status_and_type_in_id_order(queue):
    tasks = [queue.submit("a" if i % 2 else "b", {"i": i}) for i in range(40)]
    claimed = queue.claim_next()
    for shard in "0123456789abcdef":
        listed = queue.list(shard)
        assert [t.id for t in listed] == sorted(t.id for t in tasks if t.shard == shard)
    everything = [t for s in "0123456789abcdef" for t in queue.list(s, status="pending", task_type="a")]
    assert sorted(t.id for t in everything) == sorted(t.id for t in tasks if t.task_type == "a" and t.id != claimed.id)
    assert [t.id for t in queue.list(claimed.shard, status="running")] == [claimed.id]


def test_list_stops_at_the_limit(queue, store):
    for _ in range(40):
        queue.submit("t", {})
    biggest = max("0123456789abcdef", key=lambda s: len(keys(store, "tasks/%s/" % s)))
    assert len(queue.list(biggest, limit=2)) == 2


def test_list_ready_gives_the_due_ids_of_a_shard(queue, store):
    tasks = [queue.submit("t", {}) for _ in range(30)]
    later = queue.submit("t", {}, delay=3600)
    shard = later.shard
    assert sorted(queue.list_ready(shard)) == sorted(t.id for t in tasks if t.shard == shard)


# ============================================================================
# Unreadable task documents: skipped, reported, never deleted
# ============================================================================

JUNK_ID = "5a5a5a5a-0000-4000-8000-000000000001"
SHAPE_ID = "5b5b5b5b-0000-4000-8000-000000000002"


def _plant_unreadable(store):
    junk_key, shape_key = task_key("5", JUNK_ID), task_key("5", SHAPE_ID)
    store.put(junk_key, b"\x00junk{")
    store.put(shape_key, b'{"id":"%s","shard":"5","status":"pending"}' % SHAPE_ID.encode())
    for tid in (JUNK_ID, SHAPE_ID):
        store.put(ready_key("5", START, tid), b"")
    store.requests.clear()
    return junk_key, shape_key


def test_claim_next_skips_unreadable_documents_and_reports_them(queue, store):
    junk_key, shape_key = _plant_unreadable(store)
    good = queue.submit("t", {})

    assert queue.claim_next(shards=["5", good.shard]).id == good.id
    assert queue.claim_next() is None

    assert queue.skipped == {
        junk_key: "not JSON: Expecting value: line 1 column 1 (char 0)",
        shape_key: "missing required field task_type",
    }
    assert junk_key in store._objects and shape_key in store._objects
    assert ready_key("5", START, JUNK_ID) in store._objects


def test_list_skips_unreadable_documents(queue, store):
    junk_key, shape_key = _plant_unreadable(store)
    good_in_5 = next(t for t in iter(lambda: queue.submit("t", {}), None) if t.shard == "5")

    assert [t.id for t in queue.list("5")] == [good_in_5.id]
    assert set(queue.skipped) == {junk_key, shape_key}
    assert junk_key in store._objects and shape_key in store._objects


def test_get_of_an_unreadable_document_raises_naming_it(queue, store):
    _plant_unreadable(store)
    with pytest.raises(InvalidTaskDocument) as exc:
        queue.get(SHAPE_ID)
    assert str(exc.value) == "task %s: missing required field task_type" % SHAPE_ID


def test_the_sweeper_skips_unreadable_documents_and_keeps_them(queue, store):
    junk_key, shape_key = _plant_unreadable(store)

    sweeper = queue.sweeper()
    assert sweeper.run_pass()

    assert sweeper.skipped == {
        ready_key("5", START, JUNK_ID): "its task document is unreadable: "
                                        "not JSON: Expecting value: line 1 column 1 (char 0)",
        ready_key("5", START, SHAPE_ID): "its task document is unreadable: missing required field task_type",
        junk_key: "not JSON: Expecting value: line 1 column 1 (char 0)",
        shape_key: "missing required field task_type",
    }
    assert sweeper.counts["skipped"] == 4
    assert set(keys(store)) == {junk_key, shape_key, ready_key("5", START, JUNK_ID), ready_key("5", START, SHAPE_ID)}
    assert set(queue.skipped) == {junk_key, shape_key}


# ============================================================================
# The index sweeper
# ============================================================================


def test_the_sweeper_gives_a_pending_task_without_a_ready_entry_one(queue, store):
    task = queue.submit("t", {})
    store.delete(ready_key(task.shard, START, task.id))

    sweeper = queue.sweeper()
    sweeper.run_pass()

    assert keys(store, "ready/") == [ready_key(task.shard, START, task.id)]
    assert sweeper.counts["created"] == 1


def test_the_sweeper_gives_a_running_task_without_a_lease_entry_one(queue, store):
    task = queue.submit("t", {})
    claimed = queue.claim_next()
    store.delete(lease_key(task.shard, claimed.lease_expires_at, task.id))

    queue.sweeper().run_pass()

    assert keys(store, "leases/") == [lease_key(task.shard, claimed.lease_expires_at, task.id)]


def test_the_sweeper_deletes_the_ready_entry_of_a_completed_task(queue, store):
    task = queue.submit("t", {})
    queue.complete(queue.claim_next(), None)
    store.put(ready_key(task.shard, START, task.id), b"")

    sweeper = queue.sweeper()
    sweeper.run_pass()

    assert keys(store, "ready/") == []
    assert sweeper.counts["deleted"] == 1


def test_the_sweeper_moves_a_ready_entry_in_the_wrong_minute(queue, store):
    task = queue.submit("t", {}, delay=600)
    right = ready_key(task.shard, task.available_at, task.id)
    wrong = ready_key(task.shard, START, task.id)
    store.delete(right)
    store.put(wrong, b"")

    queue.sweeper().run_pass()

    assert keys(store, "ready/") == [right]


def test_the_sweeper_moves_a_lease_entry_in_the_wrong_minute(queue, store):
    task = queue.submit("t", {})
    claimed = queue.claim_next()
    right = lease_key(task.shard, claimed.lease_expires_at, task.id)
    wrong = lease_key(task.shard, START, task.id)
    store.delete(right)
    store.put(wrong, b"")

    queue.sweeper().run_pass()

    assert keys(store, "leases/") == [right]


def test_the_sweeper_deletes_index_entries_of_missing_tasks(queue, store, clock):
    store.put(ready_key(MISSING[0], START, MISSING), b"")
    store.put(lease_key(MISSING[0], START, MISSING), b"")

    queue.sweeper().run_pass()
    # A ready entry of this minute may be a submit's first half (its task comes next).
    assert keys(store) == [ready_key(MISSING[0], START, MISSING)]
    clock.advance(buquet.INDEX_SETTLE)
    queue.sweeper().run_pass()
    assert keys(store) == []


def test_the_sweeper_reports_junk_keys_under_ready_and_keeps_them(queue, store):
    junk = ["ready/0/0000000001/not-a-uuid", "ready/zz/0000000001/" + MISSING, "ready/stray"]
    for key in junk:
        store.put(key, b"")

    sweeper = queue.sweeper()
    sweeper.run_pass()

    assert keys(store) == sorted(junk)
    assert sweeper.skipped == {key: "not an index key of this queue" for key in junk}


def test_the_sweeper_expires_a_pending_task_past_its_ttl(queue, store, clock):
    task = queue.submit("t", {}, ttl=30)
    clock.advance(30)

    sweeper = queue.sweeper()
    sweeper.run_pass()

    assert doc(store, task)["status"] == "expired"
    assert keys(store, "ready/") == []
    assert sweeper.counts["expired"] == 1


def test_the_sweeper_changes_nothing_in_a_consistent_bucket(queue, store, clock):
    for i in range(30):
        queue.submit("t", {"i": i}, delay=i * 30)
    queue.claim_next()
    before = {k: v.etag for k, v in store._objects.items()}
    fresh(store)

    sweeper = queue.sweeper(page_size=7)
    assert sweeper.run_pass()

    assert {k: v.etag for k, v in store._objects.items()} == before
    assert "DELETE" not in store.requests and "PUT" not in store.requests
    assert sweeper.counts["deleted"] == sweeper.counts["created"] == 0
    assert sweeper.passes == 1


# ============================================================================
# Idempotent submit
# ============================================================================


def test_the_same_idempotency_key_gives_the_same_task(queue, store):
    first = queue.submit("charge", {"order_id": "ORD-123", "amount": 100}, idempotency_key="charge-ORD-123")
    assert store.requests == {"PUT": 3}
    fresh(store)

    again = queue.submit("charge", {"amount": 100, "order_id": "ORD-123"}, idempotency_key="charge-ORD-123",
                         max_retries=9)

    assert again.id == first.id and again.max_retries == 3
    assert store.requests == {"PUT": 1, "GET": 2}
    assert len(keys(store, "tasks/")) == 1


def test_the_idempotency_record_has_the_original_format(queue, store):
    task = queue.submit("charge_customer", {"order_id": "ORD-123", "amount": 100}, idempotency_key="charge-ORD-123")

    record_key, _ = idempotency_key("charge_customer", "charge-ORD-123")
    assert record_key in store._objects
    expected = (
        '{"key":"charge-ORD-123","key_hash":"sha256:c16719dc40dc60cc79d7a0dbe8e090c1b2a0efd6fdc45629311f0c2c5ce5782c",'
        '"task_id":"%s","task_key":"tasks/%s/%s.json","created_at":"2026-01-27T12:00:05Z",'
        '"expires_at":"2026-02-26T12:00:05Z","task_type":"charge_customer",'
        '"input_hash":"sha256:2fbd763354e9633c92364158a4924eeedbfde09167f79b876fcf4e37551a5543"}'
    ) % (task.id, task.shard, task.id)
    assert body(store, record_key).decode() == expected


def test_an_idempotency_key_reused_with_another_input_is_a_conflict_and_writes_nothing(queue, store):
    first = queue.submit("charge", {"amount": 100}, idempotency_key="k1")
    before = dict(store._objects)
    fresh(store)

    with pytest.raises(IdempotencyConflict) as exc:
        queue.submit("charge", {"amount": 200}, idempotency_key="k1")

    assert str(exc.value) == (
        "Idempotency conflict: Idempotency key 'k1' was used with different input. Existing task: %s. "
        "Input hash mismatch: expected %s, got %s" % (
            first.id, buquet.sha256_tag('{"amount":100}'), buquet.sha256_tag('{"amount":200}')))
    assert store.requests == {"PUT": 1, "GET": 1}
    assert store._objects == before


def test_an_expired_idempotency_record_gives_a_new_task(queue, store, clock):
    first = queue.submit("charge", {"amount": 100}, idempotency_key="k1", idempotency_ttl_days=1)
    clock.advance(86400)
    assert queue.submit("charge", {"amount": 100}, idempotency_key="k1").id == first.id  # not after, yet
    clock.advance(1)

    second = queue.submit("charge", {"amount": 999}, idempotency_key="k1")

    assert second.id != first.id and second.input == {"amount": 999}
    record = json.loads(body(store, idempotency_key("charge", "k1")[0]))
    assert record["task_id"] == second.id
    assert record["created_at"] == ts(clock.now)
    assert len(keys(store, "tasks/")) == 2


def test_a_record_whose_task_is_missing_gets_its_task_under_the_record_id(queue, store):
    # A racer wrote the record and has not written its task yet (or died).
    record_key, key_hash = idempotency_key("charge", "k1")
    record = {"key": "k1", "key_hash": key_hash, "task_id": MISSING, "task_key": task_key("0", MISSING),
              "created_at": "2026-01-27T12:00:00Z", "expires_at": "2026-02-26T12:00:00Z", "task_type": "charge",
              "input_hash": buquet.sha256_tag('{"amount":100}')}
    store.put(record_key, json.dumps(record).encode())
    fresh(store)

    task = queue.submit("charge", {"amount": 100}, idempotency_key="k1")

    assert (task.id, task.shard) == (MISSING, "0")
    assert keys(store, "tasks/") == [task_key("0", MISSING)]
    assert keys(store, "ready/") == [ready_key("0", START, MISSING)]
    assert json.loads(body(store, record_key)) == record  # the record is left as it was
    # The racer's own task PUT now loses and it returns the same task.
    assert queue.submit("charge", {"amount": 100}, idempotency_key="k1").id == MISSING


def test_the_queue_scope_shares_a_key_across_task_types(queue, store):
    a = queue.submit("charge", {"x": 1}, idempotency_key="k", idempotency_scope="queue")
    b = queue.submit("refund", {"x": 1}, idempotency_key="k", idempotency_scope="Queue")
    c = queue.submit("refund", {"x": 1}, idempotency_key="k")
    d = queue.submit("refund", {"x": 1}, idempotency_key="k", idempotency_scope="tenant-7")

    assert b.id == a.id and b.task_type == "charge"
    assert len({a.id, c.id, d.id}) == 3
    assert keys(store, "idempotency/") == sorted([
        idempotency_key("queue", "k")[0], idempotency_key("refund", "k")[0], idempotency_key("tenant-7", "k")[0]])


def test_the_task_type_scope_keeps_keys_of_different_types_apart(queue):
    a = queue.submit("charge", {}, idempotency_key="k", idempotency_scope="task_type")
    b = queue.submit("refund", {}, idempotency_key="k", idempotency_scope="TaskType")
    assert a.id != b.id


def test_an_unreadable_idempotency_record_is_reported(queue, store):
    store.put(idempotency_key("charge", "k1")[0], b"{}")
    with pytest.raises(IdempotencyConflict) as exc:
        queue.submit("charge", {}, idempotency_key="k1")
    assert str(exc.value) == ("idempotency record %s is unreadable ('expires_at'); delete it to reuse the key"
                              % idempotency_key("charge", "k1")[0])


def test_a_single_attempt_write_that_loses_its_race_reads_nothing_more(queue, store):
    queue.submit("t", {})
    claimed = queue.claim_next(worker_id="w")
    queue.extend_lease(claimed, 30)  # moves the ETag: `claimed` is now stale
    fresh(store)

    with pytest.raises(ConflictError) as exc:
        queue._write(claimed, "extend_lease", lease_id=claimed.lease_id, seconds=10, attempts=1)

    assert str(exc.value) == "task %s kept changing under extend_lease (1 attempts); gave up" % claimed.id
    assert store.requests == {"PUT": 1}  # the losing write, and no re-read nothing would use
