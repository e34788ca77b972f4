"""buquet under faults: each test puts tests/s3proxy.py between the client and
SeaweedFS, aims one fault at chosen requests (`proxy.fail_next`), and checks
what buquet returned and what the bucket holds afterwards.

What is expected of each fault:

    503 SlowDown, 500 InternalError,   the client retries the same request:
    409 ConditionalRequestConflict,    the operation succeeds with one effect
    a reset before the server saw it   (a 409'd write was not applied, and S3
                                       says to try again)
    the reply lost (reset after the    the retry loses to the first attempt
    server applied it, or a stall      (412), buquet re-reads and finds its own
    past the client's read timeout)    write: one task, one claim, one completion

SeaweedFS only: its conditional writes hold under races (moto's do not), and
it enforces SigV4, so every test also proves that the proxy forwards requests
intact.  Versioned buckets count the writes the server applied: a completion
recorded twice would leave a fourth version.

These faults found four bugs, fixed since: a 409 on a plain submit reached the
caller (and a 409 on create_schedule read as "already exists"), and a lost
reply to a schedule write raised although the write was applied.
"""

import json
import threading
from collections import Counter

import pytest
from helpers import bucket_keys, read_doc, running, wait_for
from s3proxy import FAULTS, S3Proxy, key_of, parse_faults

import buquet
import sigv4
from buquet import Worker, index_keys

# The client's read timeout, except in the stall tests: long enough that a
# slow request on a loaded CI machine is never mistaken for a fault.
READ_TIMEOUT = 10.0
# In the stall tests: the client gives up after STALL_READ_TIMEOUT, well before
# the proxy's STALL_S has passed.
STALL_READ_TIMEOUT = 1.0
STALL_S = 3.0


@pytest.fixture
def proxy(seaweedfs_server):
    port = int(seaweedfs_server.endpoint.rsplit(":", 1)[1])
    p = S3Proxy("127.0.0.1", port, stall_s=STALL_S, seed=7, track_keys=True).start()
    yield p
    p.stop()


def connect_via(proxy, target, **options):
    """Our queue on the target's bucket, through the proxy; retries back off
    for at most 50 ms so that the retried faults cost little."""
    settings = dict(read_timeout=READ_TIMEOUT, backoff_base=0.01, backoff_cap=0.05)
    settings.update(options)
    return buquet.connect(bucket=target.bucket, endpoint=proxy.endpoint, region=target.region,
                          credentials=sigv4.Credentials(target.access_key, target.secret_key), **settings)


@pytest.fixture
def queue(proxy, seaweed_s3):
    q = connect_via(proxy, seaweed_s3)
    yield q
    q.close()


def lossy_queue(proxy, target, fault):
    """A queue whose read timeout the fault's stall outlasts, for the faulted
    operation only (the setup goes through `queue`, with the long timeout)."""
    return connect_via(proxy, target, read_timeout=STALL_READ_TIMEOUT if fault == "stall" else READ_TIMEOUT)


def warm_up(target):
    """SeaweedFS takes a while over the first write to a new bucket (it
    allocates the bucket's volume): done here, so that nothing but a stall
    outlasts the stall tests' short read timeout."""
    client = target.client()
    client.put_object(Bucket=target.bucket, Key="warm-up", Body=b"")
    client.delete_object(Bucket=target.bucket, Key="warm-up")


# ---------------------------------------------------------------------------
# Aiming and reading back
# ---------------------------------------------------------------------------


def task_writes(method, path, headers):
    """match: a PUT of a task document."""
    return method == "PUT" and key_of(path).startswith("tasks/")


def first_attempts(accept=None):
    """match: the first attempt of each distinct request (method, target and
    condition) that `accept` takes; its retries pass."""
    seen = set()
    lock = threading.Lock()

    def match(method, path, headers):
        if accept is not None and not accept(method, path, headers):
            return False
        request = (method, path, headers.get("if-match"), headers.get("if-none-match"))
        with lock:
            if request in seen:
                return False
            seen.add(request)
            return True
    return match


def statuses(proxy, kind, key):
    """What the client saw for each request of `kind` to `key`, in order:
    the status, or the fault that cut the reply off."""
    return [status for _, k, path, status in list(proxy.log) if k == kind and key_of(path) == key]


def version_statuses(target, key):
    """The status of every stored version of a task document, sorted."""
    client = target.client()
    listing = client.list_object_versions(Bucket=target.bucket, Prefix=key)
    out = []
    for version in listing.get("Versions", ()):
        if version["Key"] == key:
            body = client.get_object(Bucket=target.bucket, Key=key, VersionId=version["VersionId"])["Body"]
            out.append(json.loads(body.read())["status"])
    return sorted(out)


def make_worker(queue, **options):
    settings = dict(poll_min=0.02, poll_max=0.2, monitor=False, scheduler=False, heartbeat_interval=60.0,
                    grace_period=5.0, concurrency=1)
    settings.update(options)
    return Worker(queue, "w-faults", None, **settings)


class Calls:
    """A handler that counts its runs by task number."""

    def __init__(self):
        self.counts = Counter()
        self._lock = threading.Lock()

    def __call__(self, input):
        with self._lock:
            self.counts[input["n"]] += 1
        return {"n": input["n"]}


# ============================================================================
# The proxy itself: what a client sees of each fault
# ============================================================================


@pytest.mark.parametrize("faults, message", [
    ({"slowdown": 1.5}, "fault rate slowdown=1.5 is not a probability between 0 and 1"),
    ({"stall": -0.1}, "fault rate stall=-0.1 is not a probability between 0 and 1"),
    ({"internal": "0.1"}, "fault rate internal='0.1' is not a probability between 0 and 1"),
    ({"internal": float("nan")}, "fault rate internal=nan is not a probability between 0 and 1"),
    ({"timeout": 0.1}, "unknown fault 'timeout': the faults are " + ", ".join(FAULTS)),
    ({"slowdown": 0.6, "reset_after": 0.5}, "fault rates add up to 1.1, more than 1: reset_after=0.5, slowdown=0.6"),
])
def test_bad_fault_rates_are_refused_naming_the_bad_value(faults, message):
    with pytest.raises(ValueError) as info:
        S3Proxy("127.0.0.1", 9, faults=faults)
    assert str(info.value) == message


def test_the_command_line_takes_faults_as_kind_equals_rate():
    assert parse_faults("slowdown=0.02, reset_after=0.01,") == {"slowdown": 0.02, "reset_after": 0.01}
    assert parse_faults("") == {}
    with pytest.raises(ValueError) as info:
        parse_faults("slowdown")
    assert str(info.value) == "fault 'slowdown': expected KIND=RATE, e.g. slowdown=0.02"
    with pytest.raises(ValueError) as info:
        parse_faults("stall=often")
    assert str(info.value) == "fault stall: rate 'often' is not a number"


@pytest.mark.parametrize("fault, error, status, code, applied", [
    ("slowdown", sigv4.S3Error, 503, "SlowDown", False),
    ("internal", sigv4.S3Error, 500, "InternalError", False),
    ("conflict", sigv4.S3Error, 409, "ConditionalRequestConflict", False),  # not a lost race
    # The client cannot tell a reset before the server from one after it: either may
    # have been applied, so a conditional write says so.
    ("reset_before", sigv4.UncertainWriteError, None, "ConnectionResetError", False),  # an RST, not a FIN
    ("reset_after", sigv4.UncertainWriteError, None, "ConnectionResetError", True),
    ("stall", sigv4.UncertainWriteError, None, ("TimeoutError", "timeout"), True),
])
def test_each_fault_reaches_the_client_as_s3_would_send_it(proxy, seaweed_s3, fault, error, status, code, applied):
    warm_up(seaweed_s3)
    client = sigv4.S3Client(endpoint=proxy.endpoint, region=seaweed_s3.region, max_attempts=1,
                            read_timeout=STALL_READ_TIMEOUT if fault == "stall" else READ_TIMEOUT,
                            credentials=sigv4.Credentials(seaweed_s3.access_key, seaweed_s3.secret_key))
    aim = proxy.fail_next(fault)

    with pytest.raises(error) as info:
        client.put_object(seaweed_s3.bucket, "k", b"body", if_none_match="*")

    assert aim.hits == [("PUT", "/%s/k" % seaweed_s3.bucket)]
    assert not isinstance(info.value, sigv4.ConflictError) or error is sigv4.UncertainWriteError
    codes = (code,) if isinstance(code, str) else code  # socket.timeout is TimeoutError from 3.10
    assert info.value.status == status and info.value.code in codes
    if status is not None:
        assert str(info.value).startswith("PUT s3://%s/k: %d %s: " % (seaweed_s3.bucket, status, code))
        assert info.value.request_id.startswith("S3PROXY")
    assert bucket_keys(seaweed_s3) == (["k"] if applied else [])
    assert proxy.snapshot()["faults"] == {fault: 1}
    assert proxy.fault_log[0][1:] == (fault, "PUT", "/%s/k" % seaweed_s3.bucket, 200 if applied else None)


def test_a_conflict_answers_only_conditional_writes(proxy, seaweed_s3):
    client = sigv4.S3Client(endpoint=proxy.endpoint, region=seaweed_s3.region, max_attempts=1,
                            credentials=sigv4.Credentials(seaweed_s3.access_key, seaweed_s3.secret_key))
    proxy.set_faults({"conflict": 1.0})

    client.put_object(seaweed_s3.bucket, "plain", b"1")
    assert client.get_object(seaweed_s3.bucket, "plain").body == b"1"
    with pytest.raises(sigv4.S3Error) as info:
        client.put_object(seaweed_s3.bucket, "plain", b"2", if_match='"whatever"')
    assert info.value.code == "ConditionalRequestConflict"
    proxy.set_faults({})
    client.put_object(seaweed_s3.bucket, "new", b"3", if_none_match="*")

    assert bucket_keys(seaweed_s3) == ["new", "plain"]
    assert proxy.snapshot()["faults"] == {"conflict": 1}


def test_random_faults_at_rate_one_hit_every_request_until_turned_off(proxy, seaweed_s3):
    client = sigv4.S3Client(endpoint=proxy.endpoint, region=seaweed_s3.region, max_attempts=3,
                            backoff_base=0.01, credentials=sigv4.Credentials(seaweed_s3.access_key,
                                                                             seaweed_s3.secret_key))
    proxy.set_faults({"slowdown": 0.5, "internal": 0.5})

    with pytest.raises(sigv4.S3Error) as info:
        client.put_object(seaweed_s3.bucket, "k", b"x")
    proxy.set_faults(None)
    client.put_object(seaweed_s3.bucket, "k", b"y")

    assert info.value.status in (500, 503)
    assert sum(proxy.snapshot()["faults"].values()) == 3  # every attempt
    assert statuses(proxy, "PUT", "k")[-1] == 200
    assert client.get_object(seaweed_s3.bucket, "k").body == b"y"


# ============================================================================
# Faults before the server sees the request: retried, one effect
# ============================================================================


@pytest.mark.parametrize("fault, seen", [("slowdown", 503), ("internal", 500), ("reset_before", "reset_before")])
def test_every_request_failing_once_before_the_server_leaves_one_effect_each(proxy, queue, seaweed_s3, fault, seen):
    aim = proxy.fail_next(fault, n=1000, match=first_attempts())

    task = queue.submit("t", {"n": 1})
    claimed = queue.claim(task.id, "w1")
    done = queue.complete(claimed, {"ok": True})
    proxy.clear_aims()

    # Each write of the task document failed once and its retry passed: no
    # retry lost to its own first attempt, so the server saw each write once.
    assert statuses(proxy, "PUT", task.key) == [seen, 200] * 3
    assert statuses(proxy, "GET", task.key) == [seen, 200]
    outcomes = [status for _, _, _, status in proxy.log]
    assert outcomes.count(seen) == len(aim.hits) == len(outcomes) // 2
    assert (done.status, done.attempt, done.output, done.worker_id) == ("completed", 1, {"ok": True}, None)
    assert read_doc(seaweed_s3, task.key) == done.doc
    assert bucket_keys(seaweed_s3) == [task.key]  # no index key left behind


def test_a_slowdown_on_every_attempt_fails_the_submit_and_leaves_nothing(proxy, queue, seaweed_s3):
    aim = proxy.fail_next("slowdown", n=5, match=task_writes)  # the client makes 5 attempts

    with pytest.raises(buquet.StoreError) as info:
        queue.submit("t", {"n": 1})

    assert aim.done
    key = key_of(aim.hits[0][1])
    assert str(info.value).startswith(
        "PUT s3://%s/%s: 503 SlowDown: Please reduce your request rate. [request id S3PROXY" % (seaweed_s3.bucket, key))
    assert statuses(proxy, "PUT", key) == [503] * 5
    assert bucket_keys(seaweed_s3) == []


# ============================================================================
# 409 ConditionalRequestConflict: retried, never a lost race or a lost task
# ============================================================================


def test_a_conflict_on_a_claim_is_retried_and_the_claim_holds(proxy, queue, seaweed_s3):
    task = queue.submit("t", {"n": 1})
    aim = proxy.fail_next("conflict", match=task_writes)

    claimed = queue.claim(task.id, "w1")

    assert aim.done
    assert statuses(proxy, "PUT", task.key) == [200, 409, 200]
    assert statuses(proxy, "GET", task.key) == [200]  # the claim's one read: no re-read
    assert (claimed.status, claimed.attempt, claimed.worker_id) == ("running", 1, "w1")
    assert read_doc(seaweed_s3, task.key) == claimed.doc
    assert bucket_keys(seaweed_s3, "ready/") == []
    assert bucket_keys(seaweed_s3, "leases/") == index_keys(claimed.doc)


def test_a_conflict_on_a_completion_is_retried(proxy, queue, seaweed_s3):
    task = queue.submit("t", {"n": 1})
    claimed = queue.claim(task.id, "w1")
    aim = proxy.fail_next("conflict", match=task_writes)

    done = queue.complete(claimed, {"ok": True})

    assert aim.done
    assert statuses(proxy, "PUT", task.key) == [200, 200, 409, 200]
    assert statuses(proxy, "GET", task.key) == [200]  # the claim's read; none between the writes
    assert (done.status, done.output, done.attempt) == ("completed", {"ok": True}, 1)
    assert read_doc(seaweed_s3, task.key) == done.doc
    assert bucket_keys(seaweed_s3) == [task.key]


def test_a_conflict_on_a_submit_still_creates_the_task(proxy, queue, seaweed_s3):
    aim = proxy.fail_next("conflict", match=task_writes)

    task = queue.submit("t", {"n": 1})

    assert aim.done
    assert bucket_keys(seaweed_s3, "tasks/") == [task.key]
    assert read_doc(seaweed_s3, task.key) == task.doc
    assert bucket_keys(seaweed_s3, "ready/") == index_keys(task.doc)


def test_a_worker_whose_claim_met_a_conflict_runs_the_task_once_soon_after(proxy, queue, seaweed_s3):
    task = queue.submit("t", {"n": 1})
    aim = proxy.fail_next("conflict", match=task_writes)
    calls = Calls()
    worker = make_worker(queue)
    worker.task("t")(calls)

    with running(worker):
        wait_for(lambda: worker.completed == 1, timeout=10, what="the task completed")

    assert aim.done
    assert calls.counts == {1: 1}
    assert statuses(proxy, "PUT", task.key) == [200, 409, 200, 200]
    assert read_doc(seaweed_s3, task.key)["status"] == "completed"
    assert bucket_keys(seaweed_s3) == [task.key]


# ============================================================================
# Lost replies: the server applied the write, the client never heard
# ============================================================================

LOST = pytest.mark.parametrize("fault", ["reset_after", "stall"])


@pytest.mark.versioned
@LOST
def test_a_submit_whose_reply_was_lost_creates_exactly_one_task(proxy, queue, seaweed_s3, fault):
    warm_up(seaweed_s3)
    lossy = lossy_queue(proxy, seaweed_s3, fault)
    aim = proxy.fail_next(fault, match=task_writes)

    task = lossy.submit("t", {"n": 1})

    assert aim.done
    # Applied, then the retry lost to it (412), and the re-read found our own document.
    assert statuses(proxy, "PUT", task.key) == [fault, 412]
    assert bucket_keys(seaweed_s3, "tasks/") == [task.key]
    assert read_doc(seaweed_s3, task.key) == task.doc
    assert version_statuses(seaweed_s3, task.key) == ["pending"]
    assert bucket_keys(seaweed_s3, "ready/") == index_keys(task.doc)
    assert queue.claim(task.id, "w1").attempt == 1


@pytest.mark.versioned
@LOST
def test_a_claim_whose_reply_was_lost_is_owned_by_its_claimer(proxy, queue, seaweed_s3, fault):
    task = queue.submit("t", {"n": 1})
    aim = proxy.fail_next(fault, match=task_writes)

    claimed = lossy_queue(proxy, seaweed_s3, fault).claim(task.id, "w1")

    assert aim.done
    assert statuses(proxy, "PUT", task.key) == [200, fault, 412]
    assert (claimed.status, claimed.worker_id, claimed.attempt) == ("running", "w1", 1)
    assert read_doc(seaweed_s3, task.key) == claimed.doc  # the same lease id: the claim is ours
    assert version_statuses(seaweed_s3, task.key) == ["pending", "running"]
    assert bucket_keys(seaweed_s3, "ready/") == []
    assert bucket_keys(seaweed_s3, "leases/") == index_keys(claimed.doc)
    assert queue.complete(claimed, {"ok": True}).status == "completed"  # the lease works


@pytest.mark.versioned
@LOST
def test_a_completion_whose_reply_was_lost_is_recorded_once(proxy, queue, seaweed_s3, fault):
    task = queue.submit("t", {"n": 1})
    claimed = queue.claim(task.id, "w1")
    aim = proxy.fail_next(fault, match=task_writes)

    done = lossy_queue(proxy, seaweed_s3, fault).complete(claimed, {"ok": True})

    assert aim.done
    assert statuses(proxy, "PUT", task.key) == [200, 200, fault, 412]
    assert (done.status, done.output, done.attempt) == ("completed", {"ok": True}, 1)
    assert read_doc(seaweed_s3, task.key) == done.doc
    assert version_statuses(seaweed_s3, task.key) == ["completed", "pending", "running"]
    assert bucket_keys(seaweed_s3) == [task.key]


def test_a_claim_that_never_arrived_and_lost_its_retry_to_a_rival_is_cleanly_lost(proxy, queue, seaweed_s3):
    # The rival claims straight at the server while our first attempt is
    # held in the proxy, which then resets it: our retry meets the rival's
    # claim (412), and only a re-read can tell that the task is not ours.
    task = queue.submit("t", {"n": 1})
    rival = buquet.connect(bucket=seaweed_s3.bucket, endpoint=seaweed_s3.endpoint, region=seaweed_s3.region,
                           credentials=sigv4.Credentials(seaweed_s3.access_key, seaweed_s3.secret_key))
    won = []

    def rival_claims_first(method, path, headers):
        if task_writes(method, path, headers) and not won:
            won.append(rival.claim(task.id, "rival"))
            return True
        return False
    aim = proxy.fail_next("reset_before", match=rival_claims_first)

    lost = queue.claim(task.id, "w1")

    assert aim.done
    assert lost is None
    assert won[0] is not None and won[0].worker_id == "rival"
    assert statuses(proxy, "PUT", task.key) == [200, "reset_before", 412]
    assert read_doc(seaweed_s3, task.key) == won[0].doc
    assert bucket_keys(seaweed_s3, "ready/") == []
    assert bucket_keys(seaweed_s3, "leases/") == index_keys(won[0].doc)


@pytest.mark.parametrize("fault", ["reset_after", "conflict"])
def test_an_idempotent_submit_whose_record_write_failed_creates_one_task(proxy, queue, seaweed_s3, fault):
    aim = proxy.fail_next(fault, match=lambda m, p, h: m == "PUT" and key_of(p).startswith("idempotency/"))

    task = queue.submit("t", {"n": 1}, idempotency_key="once")
    again = queue.submit("t", {"n": 1}, idempotency_key="once")

    assert aim.done
    assert again.id == task.id
    assert bucket_keys(seaweed_s3, "tasks/") == [task.key]
    assert len(bucket_keys(seaweed_s3, "idempotency/")) == 1
    assert read_doc(seaweed_s3, task.key) == task.doc


# ============================================================================
# Schedules: the same faults on their conditional writes
# ============================================================================


def schedule_writes(method, path, headers):
    return method == "PUT" and key_of(path).startswith("schedules/")


def test_a_conflict_on_create_schedule_still_creates_it(proxy, queue, seaweed_s3):
    aim = proxy.fail_next("conflict", match=schedule_writes)

    schedule = queue.create_schedule("nightly", "t", {"n": 1}, "0 3 * * *")

    assert aim.done
    assert queue.get_schedule("nightly").doc == schedule.doc


def test_create_schedule_whose_reply_was_lost_returns_the_schedule(proxy, queue, seaweed_s3):
    aim = proxy.fail_next("reset_after", match=schedule_writes)

    schedule = queue.create_schedule("nightly", "t", {"n": 1}, "0 3 * * *")

    assert aim.done
    assert queue.get_schedule("nightly").doc == schedule.doc


def test_disable_schedule_whose_reply_was_lost_returns_the_schedule(proxy, queue, seaweed_s3):
    queue.create_schedule("nightly", "t", {"n": 1}, "0 3 * * *")
    aim = proxy.fail_next("reset_after", match=schedule_writes)

    schedule = queue.disable_schedule("nightly")

    assert aim.done
    assert schedule.doc["enabled"] is False
    assert queue.get_schedule("nightly").doc == schedule.doc


# ============================================================================
# Workers
# ============================================================================


@pytest.mark.versioned
def test_a_worker_whose_claim_and_completion_replies_are_all_lost_runs_each_task_once(proxy, queue, seaweed_s3):
    tasks = queue.submit_many([("t", {"n": n}) for n in range(3)])
    conditional_task_writes = first_attempts(lambda m, p, h: task_writes(m, p, h) and "if-match" in h)
    aim = proxy.fail_next("reset_after", n=6, match=conditional_task_writes)
    calls = Calls()
    worker = make_worker(queue, concurrency=2)
    worker.task("t")(calls)

    with running(worker):
        wait_for(lambda: worker.completed == 3, timeout=15, what="3 tasks completed")

    assert aim.done  # every claim and every completion lost its reply
    assert calls.counts == {0: 1, 1: 1, 2: 1}
    for task in tasks:
        doc = read_doc(seaweed_s3, task.key)
        assert (doc["status"], doc["attempt"], doc["output"]) == ("completed", 1, task.input)
        assert version_statuses(seaweed_s3, task.key) == ["completed", "pending", "running"]
    assert bucket_keys(seaweed_s3) == sorted(t.key for t in tasks)


def test_with_latency_and_jitter_a_small_worker_run_completes_every_task_once(proxy, queue, seaweed_s3):
    proxy.set_latency(10, 10)  # 0 to 20 ms before each request
    tasks = queue.submit_many([("t", {"n": n}) for n in range(8)])
    calls = Calls()
    worker = make_worker(queue, concurrency=4)
    worker.task("t")(calls)

    with running(worker):
        wait_for(lambda: worker.completed == 8, timeout=20, what="8 tasks completed")

    assert calls.counts == {n: 1 for n in range(8)}
    for task in tasks:
        doc = read_doc(seaweed_s3, task.key)
        assert (doc["status"], doc["attempt"], doc["output"]) == ("completed", 1, task.input)
    assert bucket_keys(seaweed_s3) == sorted(t.key for t in tasks)
    snapshot = proxy.snapshot()
    assert snapshot["faults"] == {} and snapshot["errors"] == 0
    assert 0 < snapshot["upstream_ms_avg"]["PUT"] < 1000
