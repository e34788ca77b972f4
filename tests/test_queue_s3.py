"""The queue on real S3 servers (moto and SeaweedFS, see conftest.py).

Every test connects with buquet.connect() exactly as a user would; the
bucket is inspected with boto3 (the fixtures' client), never with buquet.
Races run on SeaweedFS only: moto's conditional PUT is not atomic.
"""

import multiprocessing
import socket
import threading
import time
from collections import Counter
from datetime import timedelta
from email.utils import parsedate_to_datetime

import pytest
from helpers import bucket_keys, connect, read_doc

import buquet
import sigv4
from buquet import InvalidTransition, LeaseMismatch, RetryPolicy

FAST = RetryPolicy(100, 1000, 2.0, 0.0)


@pytest.fixture
def queue(s3):
    q = connect(s3)
    yield q
    q.close()


def wait_until_due(queue, task):
    """Sleep until the queue's clock (the server's) reaches the task's
    available_at.  Not a fixed sleep: in a process's first second the clock
    is known to within half a second only."""
    deadline = time.monotonic() + 5
    while queue.now() < task.available_at and time.monotonic() < deadline:
        time.sleep(0.05)


def _closed_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ============================================================================
# connect and the clock
# ============================================================================


def test_connect_performs_no_request_even_to_an_endpoint_that_does_not_answer():
    port = _closed_port()
    queue = buquet.connect(bucket="nowhere", endpoint="http://127.0.0.1:%d" % port, region="us-east-1",
                           credentials=sigv4.Credentials("k", "s"), max_attempts=1)

    assert isinstance(queue, buquet.Queue)
    assert queue.store.clock.synced is False
    with pytest.raises(buquet.StoreError) as exc:
        queue.now()  # the first thing that needs the server reaches it, and says it cannot
    assert str(exc.value) == "cannot read the server's clock: no reply from http://127.0.0.1:%d" % port


def test_connect_to_a_live_server_sends_nothing_until_the_first_operation(s3):
    queue = connect(s3)
    assert queue.store.clock.synced is False  # no reply seen: no request was made
    assert bucket_keys(s3) == []

    task = queue.submit("t", {})

    assert queue.store.clock.synced is True
    assert bucket_keys(s3, "tasks/") == ["tasks/%s/%s.json" % (task.shard, task.id)]


def test_now_follows_the_server_clock(queue, s3):
    for _ in range(4):  # any reply teaches the clock; a few pin it well below a second
        queue.get("3f2b8c1e-5a7d-4e9b-8c21-0d6f4a1b2c3d")
        time.sleep(0.25)
    for _ in range(3):
        reply = s3.client().list_objects_v2(Bucket=s3.bucket)
        server = parsedate_to_datetime(reply["ResponseMetadata"]["HTTPHeaders"]["date"])
        ours = queue.now()
        # The Date header is truncated to the second: the server's true time is in [server, server + 1).
        assert timedelta(seconds=-0.5) <= ours - server <= timedelta(seconds=1.5), (ours, server)
        time.sleep(0.3)


def test_the_first_now_probes_the_server_once(s3):
    queue = connect(s3)
    replies = []
    observe = queue.store.client._on_reply
    queue.store.client._on_reply = lambda *a: (replies.append(a), observe(*a))

    first = queue.now()
    second = queue.now()

    assert len(replies) == 1
    assert timedelta(0) <= second - first < timedelta(seconds=1)


def _count_replies(queue):
    replies = []
    observe = queue.store.client._on_reply
    queue.store.client._on_reply = lambda *a: (replies.append(a), observe(*a))
    return replies


def test_a_first_submit_stamps_with_the_local_clock_and_needs_no_probe(s3):
    queue = connect(s3)
    replies = _count_replies(queue)

    task = queue.submit("t", {"n": 1})

    assert len(replies) == 2  # the task and its ready entry: no clock probe
    server = replies[0][0]  # the Date of the task PUT's reply
    assert timedelta(seconds=-2) <= task.created_at - server <= timedelta(seconds=2)
    assert read_doc(s3, task.key)["created_at"] == buquet.format_timestamp(task.created_at)


def test_a_first_submit_from_a_host_whose_clock_is_off_restamps_the_task_before_indexing_it(s3):
    queue = connect(s3)
    queue.store.clock._wall = lambda: time.time() + 3600  # an hour ahead of the server
    replies = _count_replies(queue)

    task = queue.submit("t", {"n": 1}, ttl=60)

    assert len(replies) == 5  # ready entry and task, both again with the server's time, a delete
    server = replies[0][0]
    assert timedelta(seconds=-2) <= task.created_at - server <= timedelta(seconds=2)
    assert task.expires_at - task.created_at == timedelta(seconds=60)
    assert read_doc(s3, task.key) == task.doc
    assert bucket_keys(s3, "ready/") == [buquet.ready_key(task.shard, task.available_at, task.id)]
    assert queue.claim(task.id, "w1") is not None  # due now by the server's clock, not in an hour


# ============================================================================
# The lifecycle on both servers
# ============================================================================


def test_submit_claim_complete_leaves_only_the_task_document(queue, s3):
    task = queue.submit("send_email", {"to": "a@example.com", "name": "é"})
    assert bucket_keys(s3) == sorted([task.key, buquet.ready_key(task.shard, task.available_at, task.id)])

    claimed = queue.claim_next(worker_id="worker-1")
    assert (claimed.id, claimed.status, claimed.worker_id) == (task.id, "running", "worker-1")
    assert bucket_keys(s3) == sorted([task.key, buquet.lease_key(task.shard, claimed.lease_expires_at, task.id)])

    done = queue.complete(claimed, {"sent": True})

    assert bucket_keys(s3) == [task.key]
    stored = read_doc(s3, task.key)
    assert stored == done.doc
    assert (stored["status"], stored["output"], stored["lease_id"]) == ("completed", {"sent": True}, None)
    assert queue.claim_next() is None


def test_a_task_is_retried_after_its_backoff_then_fails(queue, s3):
    task = queue.submit("t", {}, max_retries=1, retry_policy=FAST)

    retried = queue.retry(queue.claim_next(), "Retryable error: 503")
    assert (retried.status, retried.retry_count) == ("pending", 1)
    assert retried.available_at - retried.updated_at == timedelta(milliseconds=100)
    wait_until_due(queue, retried)
    failed = queue.retry(queue.claim_next(), "Retryable error: 503 again")

    assert (failed.status, failed.retry_count, failed.attempt) == ("failed", 1, 2)
    assert read_doc(s3, task.key)["last_error"] == "Retryable error: 503 again"
    assert bucket_keys(s3) == [task.key]


def test_cancel_and_request_cancellation(queue, s3):
    pending = queue.submit("t", {}, delay=3600)
    running = queue.submit("t", {})

    cancelled = queue.cancel(pending.id, reason="No longer needed", cancelled_by="user:alice")
    claimed = queue.claim_next()
    flagged = queue.request_cancellation(running.id)
    ended = queue.finish_cancelled(claimed)

    assert (cancelled.status, cancelled.cancelled_by) == ("cancelled", "user:alice")
    assert flagged.cancel_requested is True
    assert ended.status == "cancelled"
    assert bucket_keys(s3) == sorted([pending.key, running.key])
    with pytest.raises(InvalidTransition) as exc:
        queue.cancel(running.id)
    assert str(exc.value) == "task %s is cancelled: cancel is not allowed (allowed from: pending)" % running.id


def test_an_expired_lease_is_recovered_and_the_late_worker_is_refused(queue, s3):
    task = queue.submit("t", {}, timeout=1, retry_policy=FAST)
    stale = queue.claim_next()
    time.sleep(1.3)
    while queue.now() <= stale.lease_expires_at:
        time.sleep(0.1)

    recovered = queue.recover_expired_leases()

    assert [t.id for t in recovered] == [task.id]
    with pytest.raises(LeaseMismatch):
        queue.complete(stale, {})
    stored = read_doc(s3, task.key)
    assert (stored["status"], stored["last_error"]) == ("pending", "Timeout - task exceeded lease duration")
    assert bucket_keys(s3, "leases/") == []


def test_an_unreadable_task_document_is_skipped_and_kept(queue, s3):
    junk_id = "5a5a5a5a-0000-4000-8000-000000000001"
    junk_key = "tasks/5/%s.json" % junk_id
    client = s3.client()
    client.put_object(Bucket=s3.bucket, Key=junk_key, Body=b"not json")
    client.put_object(Bucket=s3.bucket, Key="ready/5/0000000001/" + junk_id, Body=b"")

    assert queue.claim_next() is None
    assert queue.list("5") == []

    assert queue.skipped == {junk_key: "not JSON: Expecting value: line 1 column 1 (char 0)"}
    assert junk_key in bucket_keys(s3)


def test_idempotent_submit_returns_the_first_task_and_refuses_other_input(queue, s3):
    first = queue.submit("charge", {"amount": 100}, idempotency_key="ORD-1")
    again = queue.submit("charge", {"amount": 100}, idempotency_key="ORD-1")

    assert again.id == first.id
    with pytest.raises(buquet.IdempotencyConflict):
        queue.submit("charge", {"amount": 1}, idempotency_key="ORD-1")
    assert bucket_keys(s3, "tasks/") == [first.key]
    record_key = buquet.idempotency_key("charge", "ORD-1")[0]
    assert read_doc(s3, record_key)["task_id"] == first.id


@pytest.mark.versioned
def test_history_lists_every_version_newest_first(queue, s3):
    task = queue.submit("t", {}, retry_policy=FAST)
    wait_until_due(queue, queue.retry(queue.claim_next(), "oops"))
    queue.complete(queue.claim_next(), {"ok": True})

    history = queue.history(task.id)

    assert history.versioned is True and history.note is None
    assert [t.status for t in history] == ["completed", "running", "pending", "running", "pending"]
    assert [t.attempt for t in history] == [2, 2, 1, 1, 0]


def test_history_without_versions_gives_the_current_state_and_says_why(queue, s3):
    task = queue.submit("t", {})
    queue.claim_next()

    history = queue.history(task.id)

    assert history.versioned is False
    assert history.note == "the bucket keeps no object versions: only the current state is known"
    assert [t.status for t in history] == ["running"]


def test_the_sweeper_repairs_a_missing_ready_entry(queue, s3):
    task = queue.submit("t", {})
    ready = buquet.ready_key(task.shard, task.available_at, task.id)
    s3.client().delete_object(Bucket=s3.bucket, Key=ready)

    queue.sweeper().run_pass()

    assert ready in bucket_keys(s3, "ready/")


# ============================================================================
# Races (SeaweedFS: conditional writes hold under concurrency)
# ============================================================================


def test_eight_threads_claim_fifty_tasks_each_exactly_once(seaweed_s3):
    t = seaweed_s3
    setup = connect(t)
    submitted = setup.submit_many([("race", {"n": i}) for i in range(50)])
    claimed = []
    lock = threading.Lock()
    errors = []

    def work(n):
        q = connect(t)
        misses = 0
        try:
            while misses < 3:
                task = q.claim_next(worker_id="w%d" % n)
                if task is None:
                    misses += 1
                    continue
                misses = 0
                with lock:
                    claimed.append(task.id)
                q.complete(task, {"by": n})
        except Exception as exc:  # reported below
            errors.append(exc)
        finally:
            q.close()

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)

    assert errors == []
    counts = Counter(claimed)
    assert sorted(counts) == sorted(task.id for task in submitted)
    assert set(counts.values()) == {1}
    assert bucket_keys(t, "ready/") == []
    # A claim writes its lease entry first; a loser's differs from the winner's when the
    # two straddle a minute, and stays for the monitor or sweeper (its task is finished).
    setup.sweeper().run_pass()
    assert bucket_keys(t, "leases/") == []
    for task in submitted:
        assert read_doc(t, task.key)["status"] == "completed"
    setup.close()


def _submit_keys(target, keys, barrier, results):
    """A child process: submit one task per idempotency key, report the ids."""
    q = connect(target)
    q.now()  # learn the clock before the race, not during it
    ids = []
    for key in keys:
        barrier.wait(60)  # all processes submit each key at the same moment
        ids.append(q.submit("charge", {"key": key}, idempotency_key=key).id)
    results.put(ids)
    q.close()


# SeaweedFS makes each loser of a conditional-write race wait about a second,
# so the wider race gets fewer keys.
@pytest.mark.parametrize("processes, n_keys", [(2, 30), (4, 8)])
def test_processes_racing_on_idempotency_keys_create_exactly_one_task_per_key(seaweed_s3, processes, n_keys):
    ctx = multiprocessing.get_context("spawn")
    keys = ["order-%02d" % i for i in range(n_keys)]
    barrier = ctx.Barrier(processes)
    results = ctx.Queue()
    children = [ctx.Process(target=_submit_keys, args=(seaweed_s3, keys, barrier, results))
                for _ in range(processes)]
    for child in children:
        child.start()
    try:
        reported = [results.get(timeout=120) for _ in children]
    finally:
        for child in children:
            child.join(30)
    assert [child.exitcode for child in children] == [0] * processes

    for ids in reported[1:]:
        assert ids == reported[0]
    assert len(set(reported[0])) == len(keys)
    tasks = bucket_keys(seaweed_s3, "tasks/")
    assert len(tasks) == len(keys)
    assert sorted(tasks) == sorted("tasks/%s/%s.json" % (i[0], i) for i in reported[0])
    for key, task_id in zip(keys, reported[0]):
        record = read_doc(seaweed_s3, buquet.idempotency_key("charge", key)[0])
        assert record["task_id"] == task_id
        assert read_doc(seaweed_s3, "tasks/%s/%s.json" % (task_id[0], task_id))["input"] == {"key": key}
