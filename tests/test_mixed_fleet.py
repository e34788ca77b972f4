"""A mixed fleet: the original buquet (PyPI `buquet` 0.1.0, Rust core with
PyO3 bindings) and ours on one bucket, in both directions.

The original runs in its own interpreter (Python 3.12) in a venv made once
per session; tests/original_fleet.py is the script it runs (submit, get,
cancel, schedules, a worker that prints what its handlers do).  Ours runs in
this process.  The bucket is a fresh versioned SeaweedFS bucket per test
(the original runs only with versioning and does not work on moto).

After every scenario `check_bucket` reads every object back with boto3 and
checks it document by document: each task document (and every stored
version of it) against spec 3.2 (field order, null versus omitted, types,
timestamp form, a known status), the expected state of every task, and the
indexes (a ready/ key exactly for each pending task, a leases/ key exactly
for each running one, nothing left for finished tasks).

Differences between the two that these tests pin down (each is a product
decision of ours, decisions.md, or the original's behaviour per the spec):

* completion: the original keeps the last_error of an earlier attempt, ours
  clears it;
* a lease that ran out with no retries left: the original's monitor keeps
  the last claimer in worker_id, ours clears it;
* exceptions: the original's worker fails a task at once on an exception
  other than RetryableError/ConnectionError; ours retries it;
* cancellation of a running task: the original's worker ignores the flag
  (its handler may look at it, and the task then ends `completed` with
  cancel_requested true); ours ends it `cancelled`.  The original refuses
  request_cancellation of a pending task; ours cancels it at once;
* the original re-sorts the keys of `input` when it rewrites a task, and
  spells floats as serde_json does (0.00005, 1e-7) where ours writes
  Python's (5e-05, 1e-07): the same values to every reader;
* time: the original's "now" trails S3's by up to a second (spec 5), so a
  task ours makes due is due to the original up to a second later, and a
  version the original writes after one of ours may carry an earlier
  updated_at (versions are ordered by the store, not by updated_at);
* ours gives unfinished work back on SIGTERM; the original then runs it.

Skipped with a reason when no Python 3.12 is found or `pip install
buquet==0.1.0` fails; BUQUET_REQUIRE_ORIGINAL=1 turns that skip into a
failure (for CI, which has both).  BUQUET_ORIGINAL_PYTHON may name the
interpreter of a venv that already has the original installed.
"""

import hashlib
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import buquet  # noqa: E402
import sigv4  # noqa: E402

pytestmark = [pytest.mark.versioned]

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
FLEET_SCRIPT = HERE / "original_fleet.py"
NO_JITTER = {"initial_interval_ms": 100, "max_interval_ms": 1000, "multiplier": 2.0, "jitter_percent": 0.0}


# ==== The original (its venv: conftest.original_python) ========================


class OriginalError(Exception):
    """An operation the original refused (its exception text)."""


class OriginalWorker:
    """The original's worker in a process of its own; its event lines are
    collected as they come."""

    def __init__(self, popen, log):
        self.popen = popen
        self.log = log
        self.events = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.popen.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            with self._cond:
                self.events.append(event)
                self._cond.notify_all()

    def wait_event(self, kind, timeout=15.0, **match):
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for event in self.events:
                    if event.get("event") == kind and all(event.get(k) == v for k, v in match.items()):
                        return event
                left = deadline - time.monotonic()
                if left <= 0 or (self.popen.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError("the original's worker sent no %s event %r; events: %r; stderr: %s"
                                         % (kind, match, self.events, self.stderr_tail()))
                self._cond.wait(min(left, 0.1))

    def started(self):
        return [e["task_id"] for e in self.events if e.get("event") == "started"]

    def wait(self, timeout=20.0):
        """Wait for the process to end by itself (max_tasks, seconds)."""
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError("the original's worker did not stop; events: %r" % (self.events,))
        self._reader.join(5)
        assert self.popen.returncode == 0, "the original's worker failed: %s" % self.stderr_tail()
        return self.events[-1] if self.events else None

    def kill(self):
        if self.popen.poll() is None:
            self.popen.kill()  # SIGKILL, by pid: a crash, nothing runs after it
            self.popen.wait(10)

    def stderr_tail(self):
        try:
            return self.log.read_text()[-2000:]
        except OSError as exc:
            return "(no log: %s)" % exc


class Original:
    """Runs tests/original_fleet.py with the original's interpreter against
    one bucket."""

    def __init__(self, python, target, workdir):
        self.python = python
        self.workdir = workdir
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("AWS_", "S3_", "BUQUET_")) and k != "PYTHONPATH"}
        env.update(S3_ENDPOINT=target.endpoint, S3_BUCKET=target.bucket, S3_REGION=target.region,
                   AWS_ACCESS_KEY_ID=target.access_key, AWS_SECRET_ACCESS_KEY=target.secret_key,
                   AWS_EC2_METADATA_DISABLED="true", NO_PROXY="127.0.0.1,localhost", RUST_LOG="error")
        self.env = env
        self.workers = []

    def ops(self, *ops):
        """Run operations in one process; a list of {"ok": ...} / {"error": ...}."""
        done = subprocess.run([self.python, "-I", str(FLEET_SCRIPT), "ops"], input=json.dumps(list(ops)),
                              capture_output=True, text=True, env=self.env, cwd=str(self.workdir), timeout=60)
        assert done.returncode == 0, "original_fleet.py ops failed:\n%s" % done.stderr[-3000:]
        results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
        assert len(results) == len(ops), (results, done.stderr[-3000:])
        return results

    def op(self, name, **args):
        """One operation; its result, or OriginalError with the original's message."""
        (result,) = self.ops(dict(args, op=name))
        if "error" in result:
            raise OriginalError(result["error"])
        return result["ok"]

    def worker(self, handlers, *, worker_id="orig-worker", **spec):
        spec = dict(spec, worker_id=worker_id, handlers=handlers)
        log = self.workdir / ("%s-%d.log" % (worker_id, len(self.workers)))
        with open(log, "w") as stderr:  # a file: a full pipe would stall it
            popen = subprocess.Popen([self.python, "-I", str(FLEET_SCRIPT), "worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=stderr, text=True, env=self.env,
                                     cwd=str(self.workdir))
        popen.stdin.write(json.dumps(spec))
        popen.stdin.close()
        worker = OriginalWorker(popen, log)
        self.workers.append(worker)
        return worker

    def close(self):
        for worker in self.workers:
            worker.kill()


# ==== Ours ======================================================================


def connect_ours(target):
    return buquet.connect(bucket=target.bucket, endpoint=target.endpoint, region=target.region,
                          credentials=sigv4.Credentials(target.access_key, target.secret_key),
                          use_config=False, environ={})


def run_ours(q, handlers, *, max_tasks, timeout=20.0, worker_id="ours-worker", **options):
    """Run our worker (in a thread) until it has claimed max_tasks tasks."""
    settings = dict(concurrency=1, poll_min=0.05, poll_max=0.2, scheduler=False, monitor=False,
                    grace_period=2, max_tasks=max_tasks)
    settings.update(options)
    worker = buquet.Worker(q, worker_id, **settings)
    for task_type, fn in handlers.items():
        worker.task(task_type)(fn)
    errors = []

    def target():
        try:
            worker.run(install_signal_handlers=False)
        except BaseException as exc:  # reported below
            errors.append(exc)
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        worker.stop()
        thread.join(10)
        raise AssertionError("our worker did not finish %d tasks in %.0f s (completed %d, failed %d)"
                             % (max_tasks, timeout, worker.completed, worker.failed))
    assert not errors, errors
    return worker


def wait_for(predicate, timeout=20.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for " + what)
        time.sleep(0.1)


OUR_KILLABLE_WORKER = r"""
import sys, threading, time
sys.path.insert(0, sys.argv[1])
import buquet
lock = threading.Lock()
worker = buquet.Worker(buquet.connect(), sys.argv[2], concurrency=2, poll_min=0.05, poll_max=0.2,
                       scheduler=False, monitor=False, grace_period=float(sys.argv[3]))

@worker.task("slow")
def slow(input, ctx):
    with lock:  # two handler threads: whole lines
        sys.stdout.write("started %s\n" % ctx.task_id)
        sys.stdout.flush()
    time.sleep(60)
    return {"by": "ours"}

worker.run()
sys.stdout.write("stopped\n")
sys.stdout.flush()
"""


def start_ours(fleet, worker_id, grace_period=30.0):
    """Our worker in a process of its own (to kill or signal), serving
    "slow" (prints "started ID", sleeps a minute) with two handler slots.
    Returns (Popen, a queue of its stdout lines, the reader thread)."""
    log = fleet.orig.workdir / ("%s.log" % worker_id)
    env = dict(fleet.orig.env, PYTHONPATH="")
    with open(log, "w") as stderr:
        popen = subprocess.Popen([sys.executable, "-c", OUR_KILLABLE_WORKER, str(REPO), worker_id, str(grace_period)],
                                 stdout=subprocess.PIPE, stderr=stderr, text=True, env=env,
                                 cwd=str(fleet.orig.workdir))
    lines = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(line.strip()) for line in popen.stdout], daemon=True)
    reader.start()
    popen.log = log
    return popen, lines, reader


def next_line(popen, lines, timeout=15.0):
    try:
        return lines.get(timeout=timeout)
    except queue.Empty:
        return "(nothing in %.0f s; exit %r; log: %s)" % (timeout, popen.poll(), popen.log.read_text()[-2000:])


def wait_claimed(fleet):
    """Our claims delete ready keys in the background (within ms): wait
    for that before a crash, or the crash leaves a stale ready key."""
    wait_for(lambda: not fleet.s3.list_objects_v2(Bucket=fleet.target.bucket, Prefix="ready/").get("KeyCount"),
             timeout=5, what="the claims' ready keys to go")


# ==== Fixture ===================================================================


class Fleet:
    def __init__(self, target, original, ours):
        self.target = target
        self.orig = original
        self.ours = ours
        self.s3 = target.client()


@pytest.fixture
def fleet(original_python, seaweed_s3, tmp_path):  # the original first: no server started to be skipped
    original = Original(original_python, seaweed_s3, tmp_path)
    ours = connect_ours(seaweed_s3)
    try:
        yield Fleet(seaweed_s3, original, ours)
    finally:
        original.close()
        ours.close()


# ==== Reading the bucket back, document by document ================================

ALWAYS = ("id", "shard", "task_type", "input", "output", "timeout_seconds", "max_retries", "retry_count",
          "retry_policy", "status", "created_at", "available_at", "lease_expires_at", "lease_id", "attempt",
          "updated_at", "completed_at", "worker_id", "last_error", "reschedule_count", "cancel_requested")
OMITTED_IF_NULL = ("input_ref", "output_ref", "max_reschedules", "cancelled_at", "cancelled_by", "expires_at",
                   "expired_at")
assert set(ALWAYS) | set(OMITTED_IF_NULL) == set(buquet.TASK_FIELDS)
POLICY_FIELDS = ["initial_interval_ms", "max_interval_ms", "multiplier", "jitter_percent"]
RECORD_FIELDS = ["key", "key_hash", "task_id", "task_key", "created_at", "expires_at", "task_type", "input_hash"]
SCHEDULE_FIELDS = ["id", "task_type", "input", "cron", "enabled", "timeout_seconds", "max_retries", "created_at",
                   "updated_at"]
LAST_RUN_FIELDS = ["schedule_id", "last_run_at", "last_task_id", "next_run_at"]
WORKER_FIELDS = ["worker_id", "started_at", "last_heartbeat", "shards", "current_task", "tasks_completed",
                 "tasks_failed"]
PREFIXES = ("tasks/", "ready/", "leases/", "workers/", "idempotency/", "schedules/", "payloads/", "clock/")
TIMESTAMP = r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{3}|\.\d{6}|\.\d{9})?Z$"


def _pairs(pairs):
    return dict(pairs)  # dicts keep the order of the document


def _serde(value):
    """A value as serde_json writes it, in the given key order."""
    if isinstance(value, dict):
        return "{" + ",".join(json.dumps(k, ensure_ascii=False) + ":" + _serde(v) for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(_serde(v) for v in value) + "]"
    if isinstance(value, float):
        return buquet._serde_float(value)
    return json.dumps(value, ensure_ascii=False)


def _is_ts(value):
    return isinstance(value, str) and re.match(TIMESTAMP, value) is not None


def _uint(value):
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_task_document(key, body, where):
    """Spec 3.2 for one stored document (a current object or a version)."""
    text = body.decode("utf-8")
    doc = json.loads(text, object_pairs_hook=_pairs)
    what = "%s (%s)" % (key, where)
    # Compact, non-ASCII raw: byte for byte serde's rendering (the original)
    # or ours (the same apart from float spelling inside input/output).
    assert text in (_serde(doc), buquet.dumps(doc)), "%s is not compact JSON: %s" % (what, text)
    names = list(doc)
    unknown = set(names) - set(buquet.TASK_FIELDS)
    assert not unknown, "%s: unknown fields %s" % (what, unknown)
    assert names == [n for n in buquet.TASK_FIELDS if n in doc], "%s: field order %s" % (what, names)
    missing = [n for n in ALWAYS if n not in doc]
    assert not missing, "%s: fields always written are missing: %s" % (what, missing)
    nulls = [n for n in OMITTED_IF_NULL if n in doc and doc[n] is None]
    assert not nulls, "%s: written as null instead of omitted: %s" % (what, nulls)
    assert key == "tasks/%s/%s.json" % (doc["shard"], doc["id"]), what
    assert doc["shard"] == doc["id"][0] and doc["id"] == doc["id"].lower() and len(doc["id"]) == 36, what
    assert doc["status"] in buquet.STATUSES, "%s: unknown status %r" % (what, doc["status"])
    for name in ("timeout_seconds", "max_retries", "retry_count", "attempt", "reschedule_count"):
        assert _uint(doc[name]), "%s: %s=%r" % (what, name, doc[name])
    assert isinstance(doc["cancel_requested"], bool), what
    assert list(doc["retry_policy"]) == POLICY_FIELDS, what
    assert _uint(doc["retry_policy"]["initial_interval_ms"]) and _uint(doc["retry_policy"]["max_interval_ms"])
    assert isinstance(doc["retry_policy"]["multiplier"], float), "%s: multiplier must be written 2.0" % what
    assert isinstance(doc["retry_policy"]["jitter_percent"], float), what
    for name in buquet._TIMESTAMP_FIELDS:
        if doc.get(name) is not None:
            assert _is_ts(doc[name]), "%s: %s=%r" % (what, name, doc[name])
    buquet.validate_task_document(doc)  # our reader's rules (= the original's)
    # The state's own rules.
    status = doc["status"]
    running = status == "running"
    assert (doc["lease_id"] is not None) == running, "%s: lease_id in %s" % (what, status)
    assert (doc["lease_expires_at"] is not None) == running, "%s: lease_expires_at in %s" % (what, status)
    if running:
        assert doc["worker_id"] and doc["attempt"] >= 1, what
    elif doc["worker_id"] is not None:
        # Only the original's monitor leaves it, on a task it fails (spec 6.15).
        assert status == "failed" and doc["last_error"].startswith("Timeout after max retries"), what
    assert (doc["completed_at"] is not None) == (status in ("completed", "failed")), "%s: completed_at" % what
    assert ("cancelled_at" in doc) == (status == "cancelled"), what
    assert ("expired_at" in doc) == (status == "expired"), what
    if status != "completed":
        assert doc["output"] is None, "%s: output in %s" % (what, status)
    assert doc["retry_count"] <= doc["max_retries"], what
    # Every retry follows a claim; a running or finished task is claimed once more.
    claimed = 1 if status in ("completed", "failed", "running") else 0
    assert doc["attempt"] >= doc["retry_count"] + claimed, "%s: attempt %d, retry_count %d" % (
        what, doc["attempt"], doc["retry_count"])
    return doc


def list_keys(fleet, prefix=""):
    keys = []
    for page in fleet.s3.get_paginator("list_objects_v2").paginate(Bucket=fleet.target.bucket, Prefix=prefix):
        keys.extend(o["Key"] for o in page.get("Contents", ()))
    return keys


def check_bucket(fleet, expect):
    """Every object in the bucket, checked; `expect` maps each task id to the
    fields its document must have (every task in the bucket must be listed).
    Returns {task id: current document}."""
    s3, bucket = fleet.s3, fleet.target.bucket
    keys = list_keys(fleet)
    stray = [k for k in keys if not k.startswith(PREFIXES)]
    assert not stray, "objects outside the layout: %s" % stray
    docs = {}
    for key in (k for k in keys if k.startswith("tasks/")):
        body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        doc = check_task_document(key, body, "current")
        docs[doc["id"]] = doc
        versions = []
        for page in s3.get_paginator("list_object_versions").paginate(Bucket=bucket, Prefix=key):
            versions.extend(v for v in page.get("Versions", ()) if v["Key"] == key)
        assert versions, "%s has no versions" % key
        history = []
        # In the store's own order (S3 lists a key's versions newest first),
        # not by updated_at: each side writes its own clock's time and the
        # original's trails (a version it writes after one of ours may carry
        # an earlier updated_at).
        assert versions[0]["IsLatest"], key
        for v in reversed(versions):
            vbody = s3.get_object(Bucket=bucket, Key=key, VersionId=v["VersionId"])["Body"].read()
            history.append(check_task_document(key, vbody, "version %s" % v["VersionId"]))
        for older, newer in zip(history, history[1:]):
            assert newer["attempt"] >= older["attempt"] and newer["retry_count"] >= older["retry_count"], \
                "%s: counters went back between versions" % key
    assert sorted(docs) == sorted(expect), "tasks in the bucket %s, expected %s" % (sorted(docs), sorted(expect))
    for doc in docs.values():
        if "input_ref" in doc:  # offloaded: the input lives in its payload object
            assert doc["input"] is None and doc["input_ref"] == "payloads/%s/input.json" % doc["id"]
            assert doc["input_ref"] in keys
    for task_id, fields in expect.items():
        doc = docs[task_id]
        for name, value in fields.items():
            assert doc.get(name) == value, "task %s: %s is %r, expected %r\n%s" % (
                task_id, name, doc.get(name), value, json.dumps(doc, indent=1))
    # The indexes: exactly one ready key per pending task, one lease key per
    # running task, nothing for finished tasks.
    ready = {k for k in keys if k.startswith("ready/")}
    leases = {k for k in keys if k.startswith("leases/")}
    want_ready = {buquet.ready_key(d["shard"], buquet.parse_timestamp(d["available_at"]), d["id"])
                  for d in docs.values() if d["status"] == "pending"}
    want_leases = {buquet.lease_key(d["shard"], buquet.parse_timestamp(d["lease_expires_at"]), d["id"])
                   for d in docs.values() if d["status"] == "running"}
    assert ready == want_ready, "ready/ keys %s, expected %s" % (sorted(ready), sorted(want_ready))
    assert leases == want_leases, "leases/ keys %s, expected %s" % (sorted(leases), sorted(want_leases))
    for key in (k for k in keys if k.startswith("idempotency/")):
        record = json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read(), object_pairs_hook=_pairs)
        assert list(record) == RECORD_FIELDS, "%s: fields %s" % (key, list(record))
        scope, hexdigest = key[len("idempotency/"):-len(".json")].rsplit("/", 1)
        assert record["key_hash"] == "sha256:" + hexdigest == \
            "sha256:" + hashlib.sha256(("%s:%s" % (scope, record["key"])).encode()).hexdigest(), key
        assert record["task_id"] in docs and record["task_key"] == "tasks/%s/%s.json" % (
            record["task_id"][0], record["task_id"]), key
        assert _is_ts(record["created_at"]) and _is_ts(record["expires_at"]), key
        assert record["input_hash"] == buquet.sha256_tag(buquet.canonical_json(docs[record["task_id"]]["input"])), key
    for key in (k for k in keys if k.startswith("schedules/")):
        doc = json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read(), object_pairs_hook=_pairs)
        if key.endswith("/last_run.json"):
            assert list(doc)[:4] == LAST_RUN_FIELDS and set(doc) <= set(LAST_RUN_FIELDS) | {"last_due_at"}, key
        else:
            assert list(doc)[:9] == SCHEDULE_FIELDS and set(doc) <= set(SCHEDULE_FIELDS) | {"timezone"}, key
    for key in (k for k in keys if k.startswith("workers/")):
        doc = json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read(), object_pairs_hook=_pairs)
        assert list(doc)[:7] == WORKER_FIELDS, "%s: fields %s" % (key, list(doc))
        assert _is_ts(doc["started_at"]) and _is_ts(doc["last_heartbeat"]), key
    return docs


def assert_same_history(fleet, task_id):
    """Ours reads the versions the original wrote and the reverse: both see
    the same states, newest first."""
    ours = fleet.ours.history(task_id)
    theirs = fleet.orig.op("history", task_id=task_id)
    assert ours.versioned
    assert len(ours) == len(theirs) >= 2
    fields = ("status", "attempt", "retry_count", "last_error", "worker_id", "cancel_requested", "output")
    mine = [tuple(t.doc.get(f) for f in fields) for t in ours]
    other = [tuple(t.get(f) for f in fields) for t in theirs]
    assert mine == other
    for t, o in zip(ours, theirs):
        for name in ("updated_at", "available_at", "created_at"):
            a = buquet.parse_timestamp(t.doc[name])
            b = buquet.parse_timestamp(o[name])
            assert abs((a - b).total_seconds()) < 1e-6, (name, t.doc[name], o[name])
    return ours


def wait_until_due_everywhere(fleet, task_ids):
    """Wait until every task is due by both clocks.  The original's "now" is
    the Last-Modified of its clock/now object (whole seconds) carried forward
    (spec 5), so it trails S3's time, and ours, by up to about a second: a
    task ours made due now is not due to the original for up to a second.
    Without this wait a worker could claim a task it just retried (100 ms
    backoff) again before it sees one that is not yet due to it."""
    latest = max(buquet.parse_timestamp(fleet.ours.get(t).doc["available_at"]) for t in task_ids)
    while fleet.ours.now() < latest + timedelta(seconds=1.1):
        time.sleep(0.05)


def available_delay_ms(doc):
    gap = buquet.parse_timestamp(doc["available_at"]) - buquet.parse_timestamp(doc["updated_at"])
    return round(gap / timedelta(milliseconds=1), 3)


# ==== Scenarios ==================================================================


def test_each_side_completes_the_tasks_the_other_submitted(fleet):
    # Keys out of order and non-ASCII text: the original re-sorts input keys.
    ours_ids = [fleet.ours.submit("for_original", {"n": i, "b": "é✓", "a": [i, {"z": 1, "y": 2}]}).id
                for i in range(5)]
    theirs = fleet.orig.op("submit", task_type="for_ours", input={"from": "original"}, n=4)
    # One with its input offloaded to payloads/ (the original's handlers get
    # null for it; ours resolve it, decisions.md).
    theirs += fleet.orig.op("submit", task_type="for_ours", input={"from": "original"}, use_payload_refs=True,
                            payload_ref_threshold_bytes=10)
    offloaded = theirs[-1]["id"]
    assert theirs[-1]["input"] is None and theirs[-1]["input_ref"] == "payloads/%s/input.json" % offloaded
    theirs_ids = [t["id"] for t in theirs]

    worker = fleet.orig.worker({"for_original": "echo"}, max_tasks=5)
    ran = []
    run_ours(fleet.ours, {"for_ours": lambda input, ctx: ran.append(ctx.task_id) or {"by": "ours", "in": input}},
             max_tasks=5)
    assert worker.wait()["why"] == "max_tasks"
    assert sorted(worker.started()) == sorted(ours_ids)
    assert sorted(ran) == sorted(theirs_ids)

    expect = {}
    for i, task_id in enumerate(ours_ids):
        expect[task_id] = dict(status="completed", attempt=1, retry_count=0, last_error=None, worker_id=None,
                               output={"by": "original", "worker": "orig-worker",
                                       "input": {"a": [i, {"y": 2, "z": 1}], "b": "é✓", "n": i}})
    for task_id in theirs_ids:
        expect[task_id] = dict(status="completed", attempt=1, retry_count=0, last_error=None,
                               output={"by": "ours", "in": {"from": "original"}})
    expect[offloaded]["input_ref"] = "payloads/%s/input.json" % offloaded
    docs = check_bucket(fleet, expect)
    # The original rewrote our input with sorted keys (spec 3.1).
    assert list(docs[ours_ids[0]]["input"]) == ["a", "b", "n"]

    # get works both ways on what the other side wrote.
    for task_id in theirs_ids:
        assert fleet.ours.get(task_id).doc == docs[task_id]
    got = fleet.orig.ops(*({"op": "get", "task_id": t} for t in ours_ids + theirs_ids))
    for result, task_id in zip(got, ours_ids + theirs_ids):
        assert result["ok"]["status"] == "completed" and result["ok"]["output"] == docs[task_id]["output"]
        assert result["ok"]["attempt"] == 1
    # The original's list reads a shard holding documents both sides wrote.
    shard = theirs_ids[0][0]
    listed = fleet.orig.op("list", shard=shard, status="completed")
    assert sorted(t["id"] for t in listed) == sorted(t for t in docs if t[0] == shard)


def test_a_shared_backlog_runs_each_task_exactly_once(fleet):
    """Both workers serve one task type from one backlog: each task runs
    once (SeaweedFS's If-Match holds), on whichever side claimed it."""
    ours_ids = [t.id for t in fleet.ours.submit_many([("shared", {"i": i}) for i in range(12)])]
    theirs_ids = [t["id"] for t in fleet.orig.op("submit", task_type="shared", input={"i": "x"}, n=12)]
    everything = ours_ids + theirs_ids
    stop = fleet.orig.workdir / "stop"
    worker = fleet.orig.worker({"shared": {"sleep": 0.05}}, stop_file=str(stop), seconds=20)
    worker.wait_event("started")  # the original is serving the backlog: ours joins in
    ran = []
    lock = threading.Lock()

    def shared(input, ctx):
        with lock:
            ran.append(ctx.task_id)
        time.sleep(0.05)
        return {"by": "ours", "in": input}

    ours_worker = buquet.Worker(fleet.ours, "ours-shared", concurrency=2, poll_min=0.05, poll_max=0.2,
                                scheduler=False, monitor=False, grace_period=2)
    ours_worker.task("shared")(shared)
    thread = threading.Thread(target=ours_worker.run, kwargs={"install_signal_handlers": False}, daemon=True)
    thread.start()
    try:
        wait_for(lambda: all(fleet.ours.get(t).status == "completed" for t in everything),
                 what="the backlog to be done")
    finally:
        ours_worker.stop()
        thread.join(10)
        stop.write_text("stop")
    worker.wait()
    by_original = worker.started()
    # Exactly once: every task ran on one side, and once; both sides ran some.
    assert sorted(by_original + ran) == sorted(everything), (by_original, ran)
    assert by_original and ran, (by_original, ran)
    docs = check_bucket(fleet, {t: dict(status="completed", attempt=1, retry_count=0) for t in everything})
    for task_id in everything:
        assert docs[task_id]["output"]["by"] == ("original" if task_id in by_original else "ours")


def test_retries_cross_between_the_two(fleet):
    q, orig = fleet.ours, fleet.orig
    # a: original fails, ours fails, original completes.
    a = q.submit("flaky_a", {"task": "a"}, max_retries=3, retry_policy=NO_JITTER).id
    # b: ours fails, original fails: retries spent.
    b = orig.op("submit", task_type="flaky_b", input={"task": "b"}, max_retries=1, retry_policy=NO_JITTER)[0]["id"]
    # c: original fails, ours fails: retries spent, on our side.
    c = orig.op("submit", task_type="flaky_c", input={"task": "c"}, max_retries=1, retry_policy=NO_JITTER)[0]["id"]
    # d: a ValueError with retries left: the original fails it at once.
    d = q.submit("flaky_d", {"task": "d"}, max_retries=3, retry_policy=NO_JITTER).id

    def refuse(input):
        raise buquet.RetryableError("ours refuses")

    def bad_input(input):
        # Any exception but PermanentError is retried by ours (the original's
        # worker fails the task at once on anything but RetryableError, d).
        raise ValueError("ours bad input")

    # Each step's worker claims each of its tasks once: all are due to it
    # when it starts, so none it retries comes back before the others.
    wait_until_due_everywhere(fleet, [a, c, d])
    orig.worker({"flaky_a": "retryable", "flaky_c": "retryable", "flaky_d": "value_error"}, max_tasks=3).wait()
    after1 = {t: q.get(t).doc for t in (a, c, d)}
    assert after1[a]["status"] == "pending" and after1[a]["retry_count"] == 1
    assert after1[a]["last_error"] == "RetryableError: original refuses"
    assert available_delay_ms(after1[a]) == 100.0  # k = 0: the initial interval
    assert after1[d]["status"] == "failed" and after1[d]["last_error"] == "ValueError: original bad input"
    assert after1[d]["retry_count"] == 0

    wait_until_due_everywhere(fleet, [a, b, c])
    run_ours(q, {"flaky_a": refuse, "flaky_b": bad_input, "flaky_c": refuse}, max_tasks=3)
    after2 = {t: q.get(t).doc for t in (a, b, c)}
    assert after2[a]["status"] == "pending" and after2[a]["retry_count"] == 2
    assert after2[a]["last_error"] == "RetryableError: ours refuses"
    assert available_delay_ms(after2[a]) == 200.0  # k = 1: doubled
    assert after2[b]["status"] == "pending" and available_delay_ms(after2[b]) == 100.0
    assert after2[b]["last_error"] == "ValueError: ours bad input" and after2[b]["retry_count"] == 1
    assert after2[c]["status"] == "failed" and after2[c]["retry_count"] == 1

    wait_until_due_everywhere(fleet, [a, b])
    orig.worker({"flaky_a": "echo", "flaky_b": "retryable"}, max_tasks=2).wait()
    docs = check_bucket(fleet, {
        # The original keeps the error of an earlier attempt on completion.
        a: dict(status="completed", attempt=3, retry_count=2, last_error="RetryableError: ours refuses",
                output={"by": "original", "worker": "orig-worker", "input": {"task": "a"}}),
        b: dict(status="failed", attempt=2, retry_count=1, last_error="RetryableError: original refuses",
                worker_id=None),
        c: dict(status="failed", attempt=2, retry_count=1, last_error="RetryableError: ours refuses",
                worker_id=None),
        d: dict(status="failed", attempt=1, retry_count=0, last_error="ValueError: original bad input"),
    })
    assert docs[a]["available_at"] == after2[a]["available_at"]
    # History: both read every version, whoever wrote it.
    history = assert_same_history(fleet, a)
    assert [(t.status, t.doc["retry_count"]) for t in history] == [
        ("completed", 2), ("running", 2), ("pending", 2), ("running", 1), ("pending", 1), ("running", 0),
        ("pending", 0)]
    assert_same_history(fleet, b)
    assert_same_history(fleet, c)


def test_cancellation_across_the_two(fleet):
    q, orig = fleet.ours, fleet.orig
    theirs = orig.op("submit", task_type="later", input={"side": "original"}, n=2)
    p1, p3 = theirs[0]["id"], theirs[1]["id"]
    p2 = q.submit("later", {"side": "ours"}).id
    p4 = q.submit("later", {"side": "ours"}).id
    q.cancel(p1, reason="ours: not needed", cancelled_by="user:ours")
    cancelled = orig.op("cancel", task_id=p2, reason="original: not needed", cancelled_by="user:original")
    assert cancelled["status"] == "cancelled"
    q.cancel(p3)  # no reason, no author: last_error null, cancelled_by omitted
    orig.op("cancel", task_id=p4)
    # Cancelling twice is refused on both sides.
    with pytest.raises(OriginalError, match="Cannot cancel task with status Cancelled"):
        orig.op("cancel", task_id=p1)
    with pytest.raises(buquet.InvalidTransition):
        q.cancel(p2)
    # Expiry by hand, both ways, on tasks with a TTL and a reschedule cap
    # (fields written only when set).
    e1 = q.submit("later", {"side": "ours"}, ttl=600, max_reschedules=5).id
    e2 = orig.op("submit", task_type="later", input={"side": "original"}, ttl_seconds=600, max_reschedules=5)[0]["id"]
    assert orig.op("mark_expired", task_id=e1)["status"] == "expired"
    assert q.mark_expired(e2).status == "expired"
    # The original asks for cancellation of running tasks only; ours
    # cancels a pending one at once.
    p6 = q.submit("later", {"side": "ours"}).id
    with pytest.raises(OriginalError, match="Cannot request cancellation for task with status Pending"):
        orig.op("request_cancellation", task_id=p6)
    p5 = orig.op("submit", task_type="later", input={"side": "original"})[0]["id"]
    assert q.request_cancellation(p5).status == "cancelled"
    seen = {r["ok"]["id"]: r["ok"] for r in orig.ops(*({"op": "get", "task_id": t} for t in (p1, p2, p3, p4)))}
    assert seen[p1]["status"] == "cancelled" and seen[p1]["cancelled_by"] == "user:ours"
    assert seen[p1]["last_error"] == "ours: not needed"
    assert q.get(p2).doc["cancelled_by"] == "user:original"

    # A running task in the original's worker, cancellation requested by ours:
    # the flag is set, its handler sees it and returns, and the original
    # completes the task (it has no cancelled-while-running end).
    r1 = q.submit("watch", {"side": "ours"}).id
    worker = orig.worker({"watch": "wait_cancel"}, max_tasks=1)
    worker.wait_event("started", task_id=r1)
    flagged = q.request_cancellation(r1)
    assert flagged.status == "running" and flagged.doc["cancel_requested"] is True
    worker.wait()

    # The reverse: ours runs it, the original requests cancellation; our
    # worker ends the task `cancelled`.
    r2 = orig.op("submit", task_type="watch", input={"side": "original"})[0]["id"]
    started = threading.Event()

    def watch(input, ctx):
        started.set()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not ctx.is_cancellation_requested():
            time.sleep(0.05)
        return {"by": "ours", "saw_cancel": True}

    runner = threading.Thread(target=run_ours, args=(q, {"watch": watch}), kwargs={"max_tasks": 1}, daemon=True)
    runner.start()
    assert started.wait(15)
    assert orig.op("request_cancellation", task_id=r2)["cancel_requested"] is True
    runner.join(20)
    assert not runner.is_alive()

    docs = check_bucket(fleet, {
        p1: dict(status="cancelled", cancelled_by="user:ours", last_error="ours: not needed", attempt=0),
        p2: dict(status="cancelled", cancelled_by="user:original", last_error="original: not needed", attempt=0),
        p3: dict(status="cancelled", last_error=None), p4: dict(status="cancelled", last_error=None),
        p5: dict(status="cancelled", last_error=None), p6: dict(status="pending", cancel_requested=False),
        e1: dict(status="expired", max_reschedules=5), e2: dict(status="expired", max_reschedules=5),
        r1: dict(status="completed", cancel_requested=True, output={"by": "original", "saw_cancel": True}),
        r2: dict(status="cancelled", cancel_requested=True, output=None, attempt=1),
    })
    # Written by ours or by the original, the same fields are there.
    assert list(docs[p3]) == list(docs[p4]) and "cancelled_by" not in docs[p3]
    assert list(docs[p1]) == list(docs[p2])
    assert list(docs[e1]) == list(docs[e2]) and "expires_at" in docs[e1] and "expired_at" in docs[e1]
    assert orig.op("get", task_id=r2)["status"] == "cancelled"
    assert_same_history(fleet, r1)
    assert_same_history(fleet, r2)


def test_our_monitor_recovers_the_tasks_of_killed_original_workers(fleet):
    q, orig = fleet.ours, fleet.orig
    # k has retries left: back to pending, then our worker runs it; f has
    # none: failed by our monitor (which, unlike the original's, clears
    # worker_id: nobody holds the task).
    k = q.submit("slow", {"side": "ours"}, timeout=2, max_retries=2, retry_policy=NO_JITTER).id
    f = q.submit("slow", {"side": "ours"}, timeout=2, max_retries=0, retry_policy=NO_JITTER).id
    doomed = [orig.worker({"slow": {"sleep": 60}}, worker_id="orig-doomed-%d" % i, max_tasks=1) for i in (1, 2)]
    wait_for(lambda: len(set(doomed[0].started() + doomed[1].started())) == 2, what="both tasks to start")
    for worker in doomed:
        worker.kill()
    held = {t: q.get(t).doc for t in (k, f)}
    assert all(d["status"] == "running" and d["worker_id"].startswith("orig-doomed") for d in held.values())

    worker = run_ours(q, {"slow": lambda input: {"by": "ours"}}, max_tasks=1, monitor=True, monitor_interval=0.3,
                      heartbeat_interval=0.25, sweep_interval=0.5)
    assert worker.completed == 1
    # f's lease may end a moment after k's: the next pass of our monitor.
    wait_for(lambda: q.recover_expired_leases() is not None and q.get(f).status == "failed", what="f to fail")
    check_bucket(fleet, {
        # Ours clears the error of an earlier attempt on completion.
        k: dict(status="completed", attempt=2, retry_count=1, worker_id=None, last_error=None,
                output={"by": "ours"}),
        f: dict(status="failed", attempt=1, retry_count=0, worker_id=None,
                last_error="Timeout after max retries (0 attempts)"),
    })
    history = assert_same_history(fleet, k)
    recovered = history[2].doc  # completed, running, then the recovery
    assert recovered["status"] == "pending" and recovered["last_error"] == buquet.TIMEOUT_ERROR
    assert recovered["worker_id"] is None and available_delay_ms(recovered) == 100.0
    assert_same_history(fleet, f)


def test_the_original_monitor_recovers_the_tasks_of_a_killed_worker_of_ours(fleet):
    q, orig = fleet.ours, fleet.orig
    k, f = (orig.op("submit", task_type="slow", input={"side": "original"}, timeout_seconds=2, max_retries=n,
                    retry_policy=NO_JITTER)[0]["id"] for n in (2, 0))
    doomed, lines, reader = start_ours(fleet, "ours-doomed")
    try:
        started = [next_line(doomed, lines) for _ in range(2)]  # two slots: both tasks at once
        assert sorted(started) == sorted("started " + t for t in (k, f)), started
        wait_claimed(fleet)
    finally:
        doomed.kill()  # SIGKILL, by pid
        doomed.wait(10)
        reader.join(5)  # EOF once the process is gone
        doomed.stdout.close()
    assert all(q.get(t).doc["worker_id"] == "ours-doomed" for t in (k, f))

    stop = orig.workdir / "stop"
    worker = orig.worker({"slow": "echo"}, stop_file=str(stop), seconds=20, monitor=True, monitor_check_s=1,
                         sweep_s=1)
    wait_for(lambda: q.get(k).status == "completed" and q.get(f).status == "failed", what="the recovery")
    stop.write_text("stop")
    assert worker.wait()["why"] == "stop_file"
    check_bucket(fleet, {
        # The original keeps the error of the timed-out attempt on completion.
        k: dict(status="completed", attempt=2, retry_count=1, worker_id=None,
                last_error="Timeout - task exceeded lease duration"),
        # ... and its monitor keeps the last claimer on a task it fails.
        f: dict(status="failed", attempt=1, retry_count=0, worker_id="ours-doomed",
                last_error="Timeout after max retries (0 attempts)"),
    })
    history = assert_same_history(fleet, k)
    recovered = history[2].doc
    assert recovered["status"] == "pending" and recovered["last_error"] == buquet.TIMEOUT_ERROR
    assert available_delay_ms(recovered) == 100.0
    assert_same_history(fleet, f)


def test_a_task_our_worker_gives_back_on_sigterm_is_completed_by_the_original(fleet):
    """Ours requeues unfinished work on shutdown (decisions.md: no attempt
    lost, no wait for the lease); the original then runs it at once."""
    q, orig = fleet.ours, fleet.orig
    task_id = orig.op("submit", task_type="slow", input={"side": "original"}, max_retries=1)[0]["id"]
    ours, lines, reader = start_ours(fleet, "ours-leaving", grace_period=0.2)
    try:
        assert next_line(ours, lines) == "started " + task_id
        wait_claimed(fleet)
        ours.send_signal(signal.SIGTERM)
        assert next_line(ours, lines) == "stopped"
        assert ours.wait(10) == 0
    finally:
        ours.kill()
        ours.wait(10)
        reader.join(5)
        ours.stdout.close()
    given_back = q.get(task_id).doc
    assert given_back["status"] == "pending" and given_back["attempt"] == 1 and given_back["retry_count"] == 0
    orig.worker({"slow": "echo"}, max_tasks=1).wait()
    check_bucket(fleet, {task_id: dict(status="completed", attempt=2, retry_count=0, last_error=None,
                                       output={"by": "original", "worker": "orig-worker",
                                               "input": {"side": "original"}})})
    assert_same_history(fleet, task_id)
    assert not list_keys(fleet, "workers/ours-leaving")  # deregistered on the way out


def test_schedules_created_on_one_side_are_served_by_the_other(fleet):
    q, orig = fleet.ours, fleet.orig
    # The original's schedule; the original has no scheduler tick, ours fires it.
    created = orig.op("create_schedule", id="orig-minutely", task_type="from_schedule", input={"b": 1, "a": 2},
                      cron="* * * * *", timeout_seconds=60, max_retries=1)
    schedule = q.get_schedule("orig-minutely")
    assert schedule.cron == "* * * * *" and schedule.input == {"a": 2, "b": 1} and schedule.enabled
    assert [s.id for s in q.list_schedules()] == ["orig-minutely"]
    # A new schedule waits for its first due time (ours); instead of waiting
    # up to a minute the tick is told the time: just past that due time.
    due = schedule.cron_schedule.next_after(schedule.created_at)
    assert buquet.parse_timestamp(created["created_at"]) < due
    scheduler = buquet.Scheduler(q)
    fired, _ = scheduler.tick(now=due + timedelta(seconds=1))
    assert len(fired) == 1
    again, _ = scheduler.tick(now=due + timedelta(seconds=2))
    assert again == []
    task_id = fired[0].id
    # The original reads the last run ours wrote, and runs the task.
    last = orig.op("get_schedule_last_run", id="orig-minutely")
    assert last["last_task_id"] == task_id and last["schedule_id"] == "orig-minutely"
    orig.worker({"from_schedule": "echo"}, max_tasks=1).wait()
    record_key, _ = buquet.idempotency_key("from_schedule", "schedule:orig-minutely:%d" % int(due.timestamp()))
    record = json.loads(fleet.s3.get_object(Bucket=fleet.target.bucket, Key=record_key)["Body"].read())
    assert record["task_id"] == task_id

    # Ours, read and served by the original: list, get, trigger, disable.
    q.create_schedule("ours-nightly", "nightly", {"report": "daily"}, "0 3 * * *", timeout=30, max_retries=2)
    q.create_schedule("ours-berlin", "nightly", {"report": "berlin"}, "30 8 * * *", timezone="Europe/Berlin")
    listed = {s["id"]: s for s in orig.op("list_schedules")}
    assert sorted(listed) == ["orig-minutely", "ours-berlin", "ours-nightly"]
    assert listed["ours-nightly"]["cron"] == "0 3 * * *" and listed["ours-nightly"]["timeout_seconds"] == 30
    assert listed["ours-berlin"]["input"] == {"report": "berlin"}
    assert orig.op("get_schedule", id="ours-nightly")["max_retries"] == 2
    triggered = orig.op("trigger_schedule", id="ours-nightly")
    orig.op("disable_schedule", id="ours-nightly")
    assert q.get_schedule("ours-nightly").enabled is False
    q.enable_schedule("ours-nightly")
    assert orig.op("get_schedule", id="ours-nightly")["enabled"] is True
    run_ours(q, {"nightly": lambda input: {"by": "ours", "in": input}}, max_tasks=1)

    check_bucket(fleet, {
        task_id: dict(status="completed", task_type="from_schedule", timeout_seconds=60, max_retries=1,
                      input={"a": 2, "b": 1}, output={"by": "original", "worker": "orig-worker",
                                                      "input": {"a": 2, "b": 1}}),
        triggered["id"]: dict(status="completed", task_type="nightly", timeout_seconds=30, max_retries=2,
                              output={"by": "ours", "in": {"report": "daily"}}),
    })


def test_an_idempotency_key_yields_one_task_whichever_side_submits(fleet):
    q, orig = fleet.ours, fleet.orig
    # Floats whose spelling differs between Python and serde_json (spec 6.2).
    first = {"order": "ORD-1", "amount": 100.5, "tiny": 0.00005, "tinier": 1e-7, "huge": 1e16,
             "ü": [1, {"b": 1, "a": 2}]}
    second = {"order": "ORD-2", "amount": 7}
    mine = q.submit("charge", first, idempotency_key="order-1")
    theirs = orig.op("submit", task_type="charge", input=first, idempotency_key="order-1")[0]
    assert theirs["id"] == mine.id
    theirs2 = orig.op("submit", task_type="charge", input=second, idempotency_key="order-2")[0]
    assert q.submit("charge", second, idempotency_key="order-2").id == theirs2["id"]
    # Scope "queue": one key across task types, from either side.
    q_mine = q.submit("refund", {"x": 1}, idempotency_key="q-1", idempotency_scope="queue")
    q_theirs = orig.op("submit", task_type="other", input={"x": 1}, idempotency_key="q-1",
                       idempotency_scope="Queue")[0]
    assert q_theirs["id"] == q_mine.id and q_theirs["task_type"] == "refund"
    # The same key with another input is refused on both sides.
    with pytest.raises(OriginalError, match="Idempotency conflict"):
        orig.op("submit", task_type="charge", input={"order": "other"}, idempotency_key="order-1")
    with pytest.raises(buquet.IdempotencyConflict):
        q.submit("charge", {"order": "other"}, idempotency_key="order-2")

    bucket = fleet.target.bucket
    for scope, key, task_id, value in (("charge", "order-1", mine.id, first),
                                       ("charge", "order-2", theirs2["id"], second),
                                       ("queue", "q-1", q_mine.id, {"x": 1})):
        record_key, key_hash = buquet.idempotency_key(scope, key)
        record = json.loads(fleet.s3.get_object(Bucket=bucket, Key=record_key)["Body"].read())
        assert record["task_id"] == task_id and record["key_hash"] == key_hash
        assert record["input_hash"] == buquet.sha256_tag(buquet.canonical_json(value))
    records = [k for k in list_keys(fleet, "idempotency/")]
    assert len(records) == 3, records
    check_bucket(fleet, {
        mine.id: dict(status="pending", input=first, attempt=0),
        theirs2["id"]: dict(status="pending", input=second),
        q_mine.id: dict(status="pending", task_type="refund"),
    })
