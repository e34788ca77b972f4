"""Issue 7, "Bad input": a bucket with junk under every prefix.

`plant()` seeds a fresh bucket (with boto3, never with the code under test)
with a small valid queue (three pending tasks, a running task whose lease
ran out, a completed task, their index entries, a live worker heartbeat, a
schedule) and, beside it, junk under every prefix buquet uses and at the top
level: bodies that are not JSON (binary, empty, truncated, nested past any
parser's depth), JSON of the wrong shape, wrong types in known fields, unknown
statuses, NaN, a lone surrogate, a 3 MB document, documents at keys that
disagree with them, and keys that do not parse (wrong depth, bad shard, bad
minute bucket, no .json, spaces, %, non-ASCII).  Each test runs one part of buquet on such a bucket
and checks that it

* keeps working: the documented exit code (README: 0 ok, 1 failed, 2 bad
  input, 3 unsafe), no traceback, no dead thread, the valid work done;
* reports what it skipped: every junk key it looked at and could not use is
  named, on stderr (buquet's warnings, which caplog sees in-process) or in its
  output (the sweeper's `skipped`, the dashboard's "could not be read");
* deletes nothing it does not own: every junk key is still there byte for
  byte, and the only keys that may go are buquet's own stale index entries.

What buquet owns, from spec sections 2, 4 and 7.5 and design/decisions.md:
a ready/ or leases/ key of this queue's shape (`{ready|leases}/{shard}/
{minute}/{uuid}`) whose task document is missing, or readable and not in that
state: the sweeper and the lease monitor are documented to drop those.
Everything else is not buquet's to delete: a key that does not parse, an
index entry whose task document cannot be read (decisions.md: "A task
document we cannot parse is skipped and reported, never fatal to a poll and
never deleted"; the sweeper's docstring: "Keys it cannot read are reported in
`skipped`, never deleted"), and any non-index object.

A document is junk (not a task buquet may run or rewrite) when the original
could not use it: spec 3.2's reader rules, plus what makes it unreachable or
dangerous in a mixed fleet: an `id` or `shard` that disagrees with its key
(the original writes every transition to tasks/{shard}/{id}.json, so its CAS
on such a task can never succeed), NaN and a lone surrogate escape
(serde_json rejects both; Python's json reads them, and buquet cannot write
them back: the claim's encode raises).
"""

import hashlib
import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

import buquet
from buquet import main
from helpers import connect, isolate_environment, wait_for

ROOT = Path(__file__).resolve().parent.parent
SHARDS = "0123456789abcdef"
ECHO = "echo"  # the valid tasks' type; the workers here handle it and nothing else
HUGE = 3 * 1024 * 1024  # bytes of the big document: a reader must not choke on it
DEEP = b"[" * 100000  # nested far past json's recursion limit


# ============================================================================
# The planted bucket
# ============================================================================


def _ts(dt):
    return dt.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _minute(dt):
    return "%010d" % (int(dt.timestamp()) // 60)


def _uid(shard):
    """A random UUID whose first hex digit (its shard) is `shard`."""
    return shard + str(uuid.uuid4())[1:]


def _sha(text):
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def task_doc(task_id, shard, status="pending", *, now, **fields):
    """A task document in the original's field order (spec 3.2, 3.6)."""
    doc = {
        "id": task_id, "shard": shard, "task_type": ECHO, "input": {"id": task_id}, "output": None,
        "timeout_seconds": 300, "max_retries": 3, "retry_count": 0,
        "retry_policy": {"initial_interval_ms": 100, "max_interval_ms": 1000, "multiplier": 2.0,
                         "jitter_percent": 0.0},
        "status": status, "created_at": _ts(now - timedelta(minutes=30)),
        "available_at": _ts(now - timedelta(minutes=5)), "lease_expires_at": None, "lease_id": None,
        "attempt": 0, "updated_at": _ts(now - timedelta(minutes=5)), "completed_at": None, "worker_id": None,
        "last_error": None, "reschedule_count": 0, "cancel_requested": False,
    }
    doc.update(fields)
    return doc


def _json(value):
    return json.dumps(value, separators=(",", ":")).encode("utf-8")


def is_index_entry(key):
    """Whether a key has the shape of one of this queue's index entries."""
    parts = key.split("/")
    if len(parts) != 4 or parts[0] not in ("ready", "leases") or parts[1] not in SHARDS or len(parts[1]) != 1:
        return False
    if not parts[2].isdigit():
        return False
    try:
        uuid.UUID(parts[3])
    except ValueError:
        return False
    return True


@dataclass
class Seed:
    target: object
    now: datetime
    objects: dict = field(default_factory=dict)  # every planted key -> body
    junk: set = field(default_factory=set)  # must survive byte for byte
    owned: set = field(default_factory=set)  # buquet's stale index entries: may go
    valid: dict = field(default_factory=dict)  # name -> task document
    unreadable: set = field(default_factory=set)  # tasks/{s}/{id}.json keys holding junk
    ready_targets: set = field(default_factory=set)  # ... of those, the ones a due ready/ entry points at
    lease_targets: set = field(default_factory=set)  # ... and the ones a leases/ entry points at

    def put(self, key, body, kind):
        assert key not in self.objects, key
        self.objects[key] = body
        if kind == "junk":
            self.junk.add(key)
        elif kind == "owned":
            self.owned.add(key)

    def valid_keys(self):
        return set(self.objects) - self.junk - self.owned

    def ids(self, *names):
        return {self.valid[n]["id"] for n in names}

    def key(self, name):
        d = self.valid[name]
        return "tasks/%s/%s.json" % (d["shard"], d["id"])

    def ready(self, name):
        return "ready/%s/%s/%s" % (self.valid[name]["shard"], _minute(self.now - timedelta(minutes=5)),
                                   self.valid[name]["id"])

    def lease(self, name):
        d = self.valid[name]
        expiry = datetime.strptime(d["lease_expires_at"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
        return "leases/%s/%s/%s" % (d["shard"], _minute(expiry), d["id"])

    def under(self, *prefixes):
        return {k for k in self.junk if k.startswith(prefixes)}

    def task_junk_in_shards(self):
        """Junk `list` and the dashboard look at: .json keys under tasks/{shard}/."""
        return {k for k in self.junk if k.endswith(".json") and k.split("/")[0] == "tasks"
                and len(k.split("/")) >= 3 and k.split("/")[1] in SHARDS and len(k.split("/")[1]) == 1}

    def bad_index_keys(self):
        return {k for k in self.junk if k.startswith(("ready/", "leases/")) and not is_index_entry(k)}


def plant(target):
    """Seed `target`'s bucket; returns the Seed describing it."""
    now = datetime.now(timezone.utc).replace(microsecond=0)
    s = Seed(target, now)
    old = _minute(now - timedelta(minutes=5))
    older = _minute(now - timedelta(hours=1))

    # -- the valid queue ------------------------------------------------------
    for name, shard in (("P1", "1"), ("P2", "2"), ("P3", "3")):
        tid = _uid(shard)
        s.valid[name] = task_doc(tid, shard, now=now, input={"n": name})
        s.put(s.key(name), _json(s.valid[name]), "valid")
        s.put(s.ready(name), b"", "valid")
    tid = _uid("4")
    s.valid["R1"] = task_doc(
        tid, "4", "running", now=now, attempt=1, worker_id="worker-that-died", lease_id=str(uuid.uuid4()),
        lease_expires_at=_ts(now - timedelta(minutes=2)), updated_at=_ts(now - timedelta(minutes=7)))
    s.put(s.key("R1"), _json(s.valid["R1"]), "valid")
    s.put(s.lease("R1"), b"", "valid")
    tid = _uid("5")
    s.valid["C1"] = task_doc(tid, "5", "completed", now=now, attempt=1, output={"done": True},
                             completed_at=_ts(now - timedelta(minutes=4)))
    s.put(s.key("C1"), _json(s.valid["C1"]), "valid")
    s.put("workers/seed-worker.json", _json({
        "worker_id": "seed-worker", "started_at": _ts(now - timedelta(hours=1)), "last_heartbeat": _ts(now),
        "shards": list(SHARDS), "current_task": None, "tasks_completed": 17, "tasks_failed": 1}), "valid")
    s.put("schedules/nightly.json", _json({
        "id": "nightly", "task_type": ECHO, "input": {"from": "nightly"}, "cron": "0 0 1 1 *", "enabled": True,
        "timeout_seconds": None, "max_retries": None, "created_at": _ts(now), "updated_at": _ts(now)}), "valid")

    # -- buquet's own stale index entries (the sweeper and monitor may drop them)
    s.put("ready/6/%s/%s" % (old, _uid("6")), b"", "owned")  # task missing
    s.put("ready/7/9999999999/%s" % _uid("7"), b"", "owned")  # task missing, not due
    s.put("ready/5/%s/%s" % (old, s.valid["C1"]["id"]), b"", "owned")  # task completed
    s.put("leases/8/%s/%s" % (old, _uid("8")), b"", "owned")  # task missing
    s.put("leases/1/%s/%s" % (old, s.valid["P1"]["id"]), b"", "owned")  # task pending

    # -- task documents no reader can use, at their proper keys -----------------
    shards = iter(SHARDS * 4)

    def junk_task(body_for, *, ready=True, lease=False, bucket=older):
        shard = next(shards)
        tid = _uid(shard)
        key = "tasks/%s/%s.json" % (shard, tid)
        body = body_for(tid, shard)
        s.put(key, body if isinstance(body, bytes) else _json(body), "junk")
        s.unreadable.add(key)
        if ready:
            s.put("ready/%s/%s/%s" % (shard, bucket, tid), b"", "junk")
            s.ready_targets.add(key)
        if lease:
            s.put("leases/%s/%s/%s" % (shard, older, tid), b"", "junk")
            s.lease_targets.add(key)
        return key

    def doc(**fields):
        return lambda tid, shard: task_doc(tid, shard, now=now, **fields)

    junk_task(lambda t, sh: b"\x89PNG\r\n\x1a\n\x00\xff\xfe binary", lease=True, bucket="0000000001")
    junk_task(lambda t, sh: b"")
    junk_task(lambda t, sh: _json(task_doc(t, sh, now=now))[:60])  # truncated
    junk_task(lambda t, sh: [1, 2, 3])
    junk_task(lambda t, sh: "pending", ready=False)
    junk_task(lambda t, sh: 42, ready=False)
    junk_task(lambda t, sh: None)
    junk_task(lambda t, sh: {"id": t, "shard": sh, "task_type": ECHO})  # required fields missing
    junk_task(doc(status=7), lease=True)
    junk_task(doc(attempt="x"))
    junk_task(doc(available_at="yesterday"))
    junk_task(doc(created_at="2026-13-45T99:99:99Z"))
    junk_task(lambda t, sh: task_doc("not-a-uuid", sh, now=now))
    junk_task(doc(retry_count=None))
    junk_task(doc(task_type=5))
    junk_task(doc(status="paused"))
    junk_task(doc(status="PENDING"))
    junk_task(doc(retry_policy={"initial_interval_ms": 1000}))
    junk_task(lambda t, sh: DEEP)
    junk_task(lambda t, sh: {"id": t, "shard": sh, "task_type": ECHO, "input": "x" * HUGE})
    # Valid by the field rules, junk all the same (see the module docstring):
    junk_task(lambda t, sh: task_doc(t, "f" if sh != "f" else "e", now=now))  # shard field disagrees
    junk_task(lambda t, sh: task_doc(_uid(sh), sh, now=now))  # id disagrees with the key
    junk_task(lambda t, sh: _json(task_doc(t, sh, now=now)).replace(b'"input":{', b'"input":{"x":NaN,'))
    junk_task(lambda t, sh: _json(task_doc(t, sh, now=now)).replace(b'"input":{', b'"input":{"x":"\\ud800",'))

    # -- keys under tasks/ that are not task keys (valid-looking bodies) --------
    def valid_body(shard="9"):
        tid = _uid(shard)
        return tid, _json(task_doc(tid, shard, now=now))
    tid, body = valid_body()
    s.put("tasks/9/sub/%s.json" % tid, body, "junk")  # one level too deep
    tid, body = valid_body()
    s.put("tasks/zz/%s.json" % tid, body, "junk")  # not a shard
    tid, body = valid_body()
    s.put("tasks/%s.json" % tid, body, "junk")  # no shard at all
    tid, body = valid_body("a")
    s.put("tasks/9/%s.json" % tid, body, "junk")  # the id's shard is a, not 9
    tid, body = valid_body()
    s.put("tasks/9/%s" % tid, body, "junk")  # no .json
    tid, body = valid_body()
    s.put("tasks/9/%s.txt" % tid, body, "junk")
    s.put("tasks/9/name with space %41.json", b"{}", "junk")
    s.put("tasks/9/\u00fcn\u00ef\u00e7\u00f8d\u00e9 \u2603.json", b"{}", "junk")
    s.put("tasks/readme.txt", b"hello", "junk")

    # -- keys under ready/ and leases/ that are not index entries ---------------
    a = _uid("a")
    for prefix in ("ready", "leases"):
        for key in ("%s/a/%s/not-a-uuid" % (prefix, old), "%s/a/%s/%s.json" % (prefix, old, a),
                    "%s/a/abcdefghij/%s" % (prefix, a), "%s/zz/%s/%s" % (prefix, old, a),
                    "%s/a/%s" % (prefix, a), "%s/a/%s/%s/extra" % (prefix, old, a),
                    "%s/a/%s/with space %%41" % (prefix, old), "%s/a/%s/\u00fcn\u00ef\u2603" % (prefix, old),
                    "%s/readme.txt" % prefix):
            s.put(key, b"hello" if key.endswith(".txt") else b"", "junk")
    s.put("ready/a/%s/not-a-uuid-with-a-body" % old, b"\x00junk", "junk")

    # -- workers/ -------------------------------------------------------------
    for key, body in (
            ("workers/binary.json", b"\xff\xfe\x00"), ("workers/empty.json", b""), ("workers/list.json", b"[1]"),
            ("workers/string.json", b'"worker"'), ("workers/deep.json", DEEP),
            ("workers/no-heartbeat.json", _json({"worker_id": "no-heartbeat"})),
            ("workers/wrong-types.json", _json({"worker_id": 5, "last_heartbeat": "yesterday", "shards": [1, 2],
                                                "current_task": 7, "tasks_completed": "x"})),
            ("workers/number-heartbeat.json", _json({"worker_id": "n", "last_heartbeat": 12345, "shards": 5})),
            ("workers/readme.txt", b"hello"), ("workers/sub/dir.json", b"{}"),
            ("workers/space %41.json", b"{}")):
        s.put(key, body, "junk")

    # -- schedules/ -----------------------------------------------------------
    long_ago = _ts(now - timedelta(days=2))

    def schedule(sid, **fields):
        d = {"id": sid, "task_type": ECHO, "input": {}, "cron": "* * * * *", "enabled": True,
             "timeout_seconds": None, "max_retries": None, "created_at": long_ago, "updated_at": long_ago}
        d.update(fields)
        return _json(d)
    for key, body in (
            ("schedules/binary.json", b"\x00\xff"), ("schedules/empty.json", b""), ("schedules/list.json", b"[1]"),
            ("schedules/deep.json", DEEP), ("schedules/missing-fields.json", _json({"id": "missing-fields"})),
            ("schedules/bad-cron.json", schedule("bad-cron", cron="61 * * * *")),
            ("schedules/bad-tz.json", schedule("bad-tz", timezone="Mars/Olympus_Mons")),
            ("schedules/tz-number.json", schedule("tz-number", timezone=5)),
            # Meant disabled; a string is not a boolean, and "false" is truthy.
            ("schedules/enabled-string.json", schedule("enabled-string", enabled="false")),
            ("schedules/readme.txt", b"hello"),
            ("schedules/orphan/last_run.json", b"\x00"),
            ("schedules/nightly/last_run.json", DEEP)):
        s.put(key, body, "junk")

    # -- idempotency records, payloads and the rest ------------------------------
    for name, body in (("junk-list", b"[1, 2]"), ("junk-deep", DEEP),
                       ("junk-fields", _json({"key": "junk-fields", "task_id": "nope", "expires_at": "never"}))):
        s.put("idempotency/%s/%s.json" % (ECHO, _sha("%s:%s" % (ECHO, name))), body, "junk")
    for key, body in (
            ("idempotency/x.json", b"\xff"), ("payloads/%s/input.json" % _uid("b"), b"\xff"),
            ("payloads/junk.json", b"[["), ("shard-leases/a.json", b"not json"), ("schemas/echo.json", b"["),
            ("clock/now", b"junk"), (".doctor-test/old/leftover", b"x"), ("workflow/wf/state.json", b"{}"),
            ("junk", b"\x00"), ("junk.json", b"{"), ("tasks.json", b"[]"), ("ready-not-a-prefix", b""),
            ("\u2603 snow man %41.txt", b"x"), ("a+b=c?d#e", b"x")):
        s.put(key, body, "junk")

    client = target.client()
    items = sorted(s.objects.items(), key=lambda kv: not kv[1])
    # One write first: SeaweedFS gives a bucket its volume on the first
    # non-empty write, and writes racing for it wait about a second.
    client.put_object(Bucket=target.bucket, Key=items[0][0], Body=items[0][1])
    with ThreadPoolExecutor(10) as pool:
        list(pool.map(lambda kv: client.put_object(Bucket=target.bucket, Key=kv[0], Body=kv[1]), items[1:]))
    return s


def snapshot(target):
    """{key: body} of the whole bucket, read with boto3."""
    client = target.client()
    keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=target.bucket)
            for o in page.get("Contents", ())]
    with ThreadPoolExecutor(10) as pool:
        bodies = pool.map(lambda k: client.get_object(Bucket=target.bucket, Key=k)["Body"].read(), keys)
        return dict(zip(keys, bodies))


def damage(seed, after, *, may_go=(), may_come=()):
    """What happened to the bucket that should not have: junk changed or
    gone, keys gone that buquet does not own, keys created that it should
    not have.  Empty when all is well."""
    problems = []
    for key in sorted(seed.junk):
        if key not in after:
            problems.append("junk deleted: %r" % key)
        elif after[key] != seed.objects[key]:
            problems.append("junk rewritten: %r (was %r..., now %r...)" % (key, seed.objects[key][:60],
                                                                           after[key][:60]))
    gone = set(seed.objects) - set(after) - seed.junk
    for key in sorted(gone - seed.owned - set(may_go)):
        problems.append("deleted a key it does not own: %r" % key)
    for key in sorted(set(after) - set(seed.objects) - set(may_come)):
        problems.append("created %r" % key)
    return problems


class Problems(list):
    """Checks that collect their failures, so one run reports them all."""

    def check(self, ok, message):
        if not ok:
            self.append(message)
        return ok

    def done(self):
        assert not self, "%d problems:\n  %s" % (len(self), "\n  ".join(self))


def warned(caplog):
    return "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("buquet"))


def named(keys, text):
    """The keys that `text` does not name."""
    return sorted(k for k in keys if k not in text)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch, tmp_path):
    isolate_environment(monkeypatch, tmp_path)
    # The planted stale entries are seconds old, and an entry that young may be the first
    # half of a transition in flight (buquet.index_key_in_flight), left alone for
    # INDEX_SETTLE seconds; in a real bucket these would have settled long ago.
    monkeypatch.setattr(buquet, "INDEX_SETTLE", 0.0)


def use_bucket(monkeypatch, target):
    for name, value in (("S3_BUCKET", target.bucket), ("S3_ENDPOINT", target.endpoint),
                        ("S3_REGION", target.region), ("AWS_ACCESS_KEY_ID", target.access_key),
                        ("AWS_SECRET_ACCESS_KEY", target.secret_key)):
        monkeypatch.setenv(name, value)


# Most tests run on SeaweedFS only (it enforces SigV4; the suite runs three
# times in CI and this file must stay cheap); the tests whose outcome depends
# on how a server lists odd key names (the sweep, everything together) run on
# both servers.


@pytest.fixture
def seed(seaweed_s3, monkeypatch, caplog):
    """A planted bucket on SeaweedFS, and the environment pointing at it."""
    caplog.set_level(logging.WARNING, logger="buquet")
    use_bucket(monkeypatch, seaweed_s3)
    return plant(seaweed_s3)


@pytest.fixture
def seed_each(s3, monkeypatch, caplog):
    """A planted bucket on each server in turn."""
    caplog.set_level(logging.WARNING, logger="buquet")
    use_bucket(monkeypatch, s3)
    return plant(s3)


@pytest.fixture
def thread_crashes(monkeypatch):
    """The exceptions that ended threads during the test."""
    crashed = []
    monkeypatch.setattr(threading, "excepthook", lambda args: crashed.append(
        "%s in thread %s: %s" % (args.exc_type.__name__, args.thread.name if args.thread else "?", args.exc_value)))
    return crashed


def cli(capsys, *argv):
    """(exit code, stdout, stderr) of `buquet ARGV`; an exception escaping
    main() (a traceback for the user) comes back as the code "raised ..."."""
    try:
        code = main([str(a) for a in argv])
    except Exception as exc:  # noqa: BLE001 (any exception here is the finding)
        code = "raised %s: %s" % (type(exc).__name__, str(exc)[:200])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def no_traceback(problems, text, what):
    problems.check("Traceback" not in text and "Exception in thread" not in text,
                   "%s printed a traceback:\n%s" % (what, text[-3000:]))


# ============================================================================
# Workers
# ============================================================================

APP = '''
import buquet

worker = buquet.Worker(buquet.connect(), "junk-drain", concurrency=4, poll_min=0.05, poll_max=0.2)


@worker.task("echo")
def echo(input):
    return input
'''


def test_a_drained_worker_runs_exactly_the_valid_pending_tasks_and_leaves_the_junk(seed, tmp_path):
    """`buquet worker APP --drain` in its own process, as a cron job runs it:
    every due ready/ entry is tried (half of them lead to junk), the three
    valid pending tasks are completed, the worker exits 0 without a
    traceback, names each junk document it was led to, and changes nothing
    but the tasks it ran and their index entries."""
    (tmp_path / "junkapp.py").write_text(APP)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(tmp_path)])
    run = subprocess.run([sys.executable, "-m", "buquet", "worker", "junkapp:worker", "--drain", "--no-monitor",
                          "--no-scheduler"], cwd=str(tmp_path), env=env, capture_output=True, text=True,
                         timeout=30)
    p = Problems()
    p.check(run.returncode == 0, "exit %r, stderr:\n%s" % (run.returncode, run.stderr[-3000:]))
    no_traceback(p, run.stderr, "the worker")
    after = snapshot(seed.target)
    for name in ("P1", "P2", "P3"):
        doc = json.loads(after[seed.key(name)])
        p.check((doc["status"], doc["output"]) == ("completed", {"n": name}),
                "%s (valid, pending) ended %s, output %r" % (name, doc["status"], doc["output"]))
    for name in ("R1", "C1"):
        p.check(after.get(seed.key(name)) == seed.objects[seed.key(name)], "%s was changed" % name)
    p.extend(damage(seed, after, may_go=[seed.ready(n) for n in ("P1", "P2", "P3")]))
    # Every junk document a ready entry led it to is named, once is enough.
    p.check(not named(seed.ready_targets, run.stderr),
            "unreadable documents it met and did not name on stderr: %s" % named(seed.ready_targets, run.stderr))
    p.done()


def test_a_drain_does_not_end_on_a_stale_ready_entry():
    """The smallest form of what the junk does to a drained worker: a ready/
    entry of a finished task (a crash between a completion and its index
    delete leaves one: spec 4 calls the index hints) must not end the run
    while a pending task waits.  A worker that tried the stale entry first
    exited with the task pending, in about half the runs; twenty runs on the
    memory store take a few milliseconds."""
    left = 0
    for _ in range(20):
        queue = buquet.connect(store=buquet.MemoryStore(), use_config=False)
        done = queue.submit(ECHO, {})
        queue.complete(queue.claim(done.doc["id"], "w-0"), {})
        queue.store.put(buquet.ready_key(done.doc["shard"], done.available_at, done.doc["id"]), b"")
        pending = queue.submit(ECHO, {})
        worker = buquet.Worker(queue, "w-1", concurrency=1, drain=True, monitor=False, scheduler=False)
        worker.task(ECHO)(lambda input: input)
        assert worker.run(install_signal_handlers=False) == 0
        left += queue.get(pending.doc["id"]).doc["status"] != "completed"
    assert left == 0, "%d of 20 drained runs ended with the pending task not run" % left


def test_a_running_worker_keeps_its_heartbeat_monitor_sweeper_and_scheduler_alive(seed, thread_crashes):
    """Housekeeping (heartbeat, lease recovery, sweeper, scheduler) every
    0.2 s for a few seconds on the junk: the thread must survive it, recover
    the expired lease (and the worker then run that task again), fire none of
    the junk schedules, and touch no junk."""
    queue = connect(seed.target, use_config=False)
    worker = buquet.Worker(queue, "junk-housekeeper", concurrency=2, poll_min=0.05, poll_max=0.2,
                           heartbeat_interval=0.2, monitor_interval=0.2, sweep_interval=0.2)
    worker.task(ECHO)(lambda input: input)
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("code", worker.run(install_signal_handlers=False)),
                              daemon=True)
    heartbeats, seen_alive = set(), []

    def housekeeping_alive():
        return any(t.name == "buquet-housekeeping" and t.is_alive() for t in threading.enumerate())

    def r1_done_or_housekeeping_dead():  # no use waiting for a dead thread
        blob = queue.store.get("workers/junk-housekeeper.json")
        if blob is not None:
            heartbeats.add(json.loads(blob.body)["last_heartbeat"])
        doc = json.loads(queue.store.get(seed.key("R1")).body)
        alive = housekeeping_alive()
        seen_alive.append(alive)
        return (doc["status"] == "completed" and len(heartbeats) >= 3) or (any(seen_alive) and not alive)
    thread.start()
    p = Problems()
    try:
        try:
            wait_for(r1_done_or_housekeeping_dead, timeout=6, interval=0.2,
                     what="R1 recovered and run again, three heartbeats")
        except AssertionError as exc:
            p.append(str(exc))
        p.check(housekeeping_alive(), "the housekeeping thread died")
    finally:
        worker.stop()
        thread.join(20)
    p.check(not thread.is_alive() and result.get("code") == 0, "the worker did not stop cleanly: %r" % result)
    p.check(not thread_crashes, "threads died: %s" % thread_crashes)
    after = snapshot(seed.target)
    for name in ("P1", "P2", "P3", "R1"):
        p.check(json.loads(after[seed.key(name)])["status"] == "completed", "%s not completed" % name)
    r1 = json.loads(after[seed.key("R1")])
    p.check(r1["attempt"] == 2 and r1["retry_count"] == 1, "R1 not recovered once and rerun: %r" % r1)
    fired = [k for k in set(after) - set(seed.objects) if k.startswith(("tasks/", "idempotency/", "schedules/"))]
    p.check(not fired, "the scheduler fired junk schedules: %s" % fired)
    p.extend(damage(seed, after, may_go=[seed.ready(n) for n in ("P1", "P2", "P3")] + [seed.lease("R1")],
                    may_come=[k for k in after if k.startswith("ready/4/") and k.endswith(seed.valid["R1"]["id"])]))
    p.done()


# ============================================================================
# The lease monitor, the scheduler, idempotent submits
# ============================================================================


def test_the_lease_monitor_recovers_the_expired_lease_and_ignores_the_junk(seed, caplog):
    """recover_expired_leases: the valid expired lease is recovered (back to
    pending, a retry used, a new ready entry); lease keys that do not parse
    are left alone, entries of missing or not-running tasks may go, entries
    whose document is unreadable stay and the document is named."""
    queue = connect(seed.target, use_config=False)
    p = Problems()
    recovered = queue.recover_expired_leases()
    p.check([t.doc["id"] for t in recovered] == [seed.valid["R1"]["id"]],
            "recovered %r, expected only R1" % [t.doc["id"] for t in recovered])
    after = snapshot(seed.target)
    r1 = json.loads(after[seed.key("R1")])
    p.check((r1["status"], r1["retry_count"], r1["lease_id"]) == ("pending", 1, None), "R1 after: %r" % r1)
    r1_ready = [k for k in after if k.startswith("ready/4/") and k.endswith(r1["id"])]
    p.check(len(r1_ready) == 1, "R1's new ready entry: %r" % r1_ready)
    p.extend(damage(seed, after, may_go=[seed.lease("R1")], may_come=r1_ready))
    p.check(not named(seed.lease_targets, warned(caplog)), "lease entries to unreadable documents, not named: %s"
            % named(seed.lease_targets, warned(caplog)))
    p.done()


def test_the_scheduler_fires_no_junk_schedule_and_names_what_it_skipped(seed, caplog):
    """One tick over junk schedules (not JSON, nested past the parser's
    depth, fields missing, a time zone that is a number, `enabled` "false"
    as a string, the valid schedule's last_run.json nested past the depth):
    nothing fires, nothing raises, each unusable schedule is named."""
    queue = connect(seed.target, use_config=False)
    p = Problems()
    try:
        fired, wait = buquet.Scheduler(queue).tick()
        p.check(fired == [], "fired %r" % [t.doc for t in fired])
    except Exception as exc:  # noqa: BLE001 (any exception here is the finding)
        p.append("tick raised %s: %s" % (type(exc).__name__, exc))
    p.extend(damage(seed, snapshot(seed.target)))
    unusable = {"schedules/%s.json" % n for n in ("binary", "empty", "list", "deep", "missing-fields",
                                                   "tz-number", "enabled-string")}
    p.check(not named(unusable, warned(caplog)), "unreadable schedules not named: %s"
            % named(unusable, warned(caplog)))
    p.done()


def test_schedule_list_and_show_survive_the_junk(seed, capsys, caplog):
    """`schedule list` shows the valid schedule and names every schedule it
    could not read; `schedule show` works although its last_run.json is junk."""
    p = Problems()
    code, out, err = cli(capsys, "schedule", "list", "--json")
    p.check(code == 0, "schedule list --json: exit %r: %s" % (code, err))
    if code == 0:
        ids = {d["id"] for d in json.loads(out)}
        p.check("nightly" in ids, "the valid schedule is not listed: %s" % ids)
        listed = {"schedules/%s.json" % i for i in ids}
        text = warned(caplog) + err
        silent = sorted(k for k in seed.under("schedules/") if k.endswith(".json")
                        and not k.endswith("/last_run.json") and k not in listed and k not in text)
        p.check(not silent, "schedules neither listed nor named as skipped: %s" % silent)
    code, out, err = cli(capsys, "schedule", "list")
    p.check(code == 0, "schedule list: exit %r: %s" % (code, err))
    code, out, err = cli(capsys, "schedule", "show", "nightly")
    p.check(code == 0, "schedule show nightly (its last_run.json is junk): exit %r: %s" % (code, err))
    p.extend(damage(seed, snapshot(seed.target)))
    p.done()


def test_an_idempotent_submit_over_a_junk_record_fails_naming_it_and_writes_nothing(seed):
    """A submit whose idempotency key hashes to a junk record (a list, JSON
    nested past the depth, wrong types) raises IdempotencyConflict naming
    the record, creates no task and leaves the record as it is."""
    queue = connect(seed.target, use_config=False)
    p = Problems()
    for name in ("junk-list", "junk-deep", "junk-fields"):
        record = "idempotency/%s/%s.json" % (ECHO, _sha("%s:%s" % (ECHO, name)))
        try:
            queue.submit(ECHO, {}, idempotency_key=name)
            p.append("%s: submitted a task" % name)
        except buquet.IdempotencyConflict as exc:
            p.check(str(exc).startswith("idempotency record %s is unreadable (" % record), "%s: %s" % (name, exc))
        except Exception as exc:  # noqa: BLE001
            p.append("%s: raised %s: %s" % (name, type(exc).__name__, str(exc)[:200]))
    p.extend(damage(seed, snapshot(seed.target)))
    p.done()


# ============================================================================
# The command line
# ============================================================================


def test_list_shows_the_valid_tasks_and_names_the_junk_it_skipped(seed, capsys, caplog):
    """`buquet list` (JSON, filtered, table) shows exactly the five valid
    tasks, never a document whose key is not its own, and names every junk
    document under tasks/{shard}/ that it read."""
    p = Problems()
    code, out, err = cli(capsys, "list", "--json")
    p.check(code == 0, "list: exit %r: %s" % (code, err))
    if code == 0:
        ids = {d["id"] for d in json.loads(out)}
        p.check(ids == seed.ids("P1", "P2", "P3", "R1", "C1"), "list showed %d tasks, not only the 5 valid ones:"
                " extra %s" % (len(ids), sorted(ids - seed.ids("P1", "P2", "P3", "R1", "C1"))))
    text = warned(caplog) + err
    p.check(not named(seed.task_junk_in_shards(), text), "junk documents list read and did not name: %s"
            % named(seed.task_junk_in_shards(), text))
    code, out, err = cli(capsys, "list", "--status", "pending", "--json")
    p.check(code == 0 and {d["id"] for d in json.loads(out)} == seed.ids("P1", "P2", "P3"),
            "list --status pending: exit %r, %s" % (code, out[:300]))
    code, out, err = cli(capsys, "list")
    p.check(code == 0, "list (table): exit %r: %s" % (code, err))
    p.extend(damage(seed, snapshot(seed.target)))
    p.done()


def test_stats_counts_the_index_and_survives_an_unreadable_oldest_task(seed, capsys, caplog):
    """`buquet stats` counts the well-formed index entries (it reads no
    documents but the oldest ready one, here junk); `--full` counts the
    valid documents by status and names the junk ones."""
    p = Problems()
    entries = [k for k in seed.objects if is_index_entry(k)]
    due = lambda k: k.split("/")[2] <= _minute(seed.now)  # noqa: E731
    expected = {"ready": sum(1 for k in entries if k.startswith("ready/") and due(k)),
                "scheduled": sum(1 for k in entries if k.startswith("ready/") and not due(k)),
                "running": sum(1 for k in entries if k.startswith("leases/"))}
    code, out, err = cli(capsys, "stats", "--json")
    p.check(code == 0, "stats --json: exit %r: %s" % (code, err))
    if code == 0:
        data = json.loads(out)
        p.check(data["totals"] == expected, "totals %r, expected %r" % (data["totals"], expected))
        p.check(data["workers_alive"] == 1, "workers alive: %r" % data["workers_alive"])
    code, out, err = cli(capsys, "stats", "--full", "--json")
    p.check(code == 0, "stats --full: exit %r: %s" % (code, err))
    if code == 0:
        totals = json.loads(out)["totals"]
        p.check({k: v for k, v in totals.items() if k.startswith("status:")} ==
                {"status:pending": 3, "status:running": 1, "status:completed": 1},
                "stats --full counted %r" % totals)
    p.check(not named(seed.task_junk_in_shards(), warned(caplog) + err),
            "junk documents stats --full read and did not name: %s"
            % named(seed.task_junk_in_shards(), warned(caplog) + err))
    p.extend(damage(seed, snapshot(seed.target)))
    p.done()


def test_stats_says_how_many_keys_under_ready_and_leases_it_ignored(seed, capsys, caplog):
    """A count, in any wording: a queue depth that leaves keys out should
    say so (the sweep names them)."""
    code, out, err = cli(capsys, "stats")
    assert code == 0, err
    n = len(seed.bad_index_keys())
    text = out + err + warned(caplog)
    assert re.search(r"\b%d\b[^\n]*\b(ignored|skipped)|\b(ignored|skipped)\b[^\n]*\b%d\b" % (n, n), text), (
        "stats should say that it ignored %d keys that are not index entries; it printed:\n%s" % (n, text))


def test_tail_shows_a_change_and_nothing_of_the_junk(seed, capsys, caplog):
    """`buquet tail --limit 1` looks at the junk every 0.1 s without
    crashing or showing it, names each junk document once (not at every
    look), and shows the one real change, then exits 0."""
    queue = connect(seed.target, use_config=False)
    result = {}

    def tail():
        try:
            result["code"] = main(["tail", "--interval", "0.1s", "--limit", "1", "--json"])
        except BaseException as exc:  # noqa: BLE001
            result["error"] = "%s: %s" % (type(exc).__name__, exc)
    thread = threading.Thread(target=tail, daemon=True)
    thread.start()
    time.sleep(0.5)  # a few looks at the junk
    p = Problems()
    p.check(thread.is_alive(), "tail stopped before anything changed: %r" % result)
    queue.cancel(seed.valid["P2"]["id"], reason="tail test")
    thread.join(15)
    p.check(not thread.is_alive() and result.get("code") == 0, "tail: %r" % result)
    out = capsys.readouterr().out
    shown = [json.loads(line) for line in out.splitlines() if line.strip()]
    p.check([(d["id"], d["status"]) for d in shown] == [(seed.valid["P2"]["id"], "cancelled")],
            "tail showed %r" % [(d.get("id"), d.get("status")) for d in shown])
    text = warned(caplog)
    view = {k for k in seed.junk if k.startswith("tasks/") and k.endswith(".json")}
    p.check(not named(view, text), "junk documents tail read and did not name: %s" % named(view, text))
    lines = text.splitlines()
    repeated = sorted(k for k in view if sum(k in line for line in lines) > 1)
    p.check(not repeated, "tail named these again at every look: %s" % repeated)
    p.extend(damage(seed, snapshot(seed.target), may_go=[seed.ready("P2")]))
    p.done()


def test_workers_lists_the_live_worker_and_names_the_junk_heartbeats(seed, capsys, caplog):
    """`buquet workers` (JSON and table) shows the live worker; every other
    file under workers/ is either shown (tolerantly: a heartbeat is only
    information) or named as skipped, none vanishes silently."""
    p = Problems()
    heartbeat_files = {k for k in seed.objects if k.startswith("workers/") and k.endswith(".json")}
    for argv in (("workers", "--json"), ("workers",)):
        code, out, err = cli(capsys, *argv)
        p.check(code == 0, "%s: exit %r: %s" % (" ".join(argv), code, err))
        if code != 0:
            continue
        if "--json" in argv:
            shown = json.loads(out)
            p.check(any(w.get("worker_id") == "seed-worker" for w in shown), "seed-worker not shown")
            text = warned(caplog) + err
            skipped = [k for k in heartbeat_files if k in text]
            p.check(len(shown) + len(skipped) == len(heartbeat_files),
                    "%d heartbeat files, %d shown, %d named as skipped (%s): the rest vanished silently"
                    % (len(heartbeat_files), len(shown), len(skipped), sorted(skipped)))
        else:
            p.check(re.search(r"^seed-worker\s+alive\b", out, re.M), "seed-worker not shown alive:\n%s" % out)
    p.extend(damage(seed, snapshot(seed.target)))
    p.done()


def test_sweep_names_every_junk_key_and_drops_only_stale_index_entries(seed_each, capsys):
    """`buquet sweep` is the tool that reports index problems: it names every
    junk key under tasks/, ready/ and leases/ (JSON and text), deletes
    exactly the stale index entries, creates nothing, and a second sweep
    finds nothing more to do."""
    seed = seed_each
    p = Problems()
    code, out, err = cli(capsys, "sweep", "--json")
    p.check(code == 0, "sweep: exit %r: %s" % (code, err))
    if code == 0:
        data = json.loads(out)
        view = seed.under("tasks/", "ready/", "leases/")
        skipped = set(data["skipped"])
        p.check(not sorted(view - skipped), "junk the sweep did not name: %s" % sorted(view - skipped))
        p.check(not sorted(skipped - view), "named as skipped but not junk: %s" % sorted(skipped - view))
        counts = data["counts"]
        p.check((counts["deleted"], counts["created"], counts["expired"], counts["skipped"]) ==
                (len(seed.owned), 0, 0, len(view)), "counts %r; expected deleted %d, created 0, expired 0, "
                "skipped %d" % (counts, len(seed.owned), len(view)))
    after = snapshot(seed.target)
    p.check(not (seed.owned & set(after)), "stale entries left: %s" % sorted(seed.owned & set(after)))
    code, out, err = cli(capsys, "sweep")
    p.check(code == 0 and out.startswith("checked ") and ", deleted 0, created 0," in out,
            "second sweep: exit %r:\n%s" % (code, out[:300]))
    p.check(all("skipped %s: " % k in out for k in seed.under("tasks/", "ready/", "leases/")),
            "the human output does not list every skipped key")
    p.extend(damage(seed, snapshot(seed.target)))
    p.done()


def test_doctor_checks_the_bucket_and_leaves_every_key_alone(moto_s3, monkeypatch, capsys):
    """On moto: SeaweedFS makes each loser of doctor's write race wait a second."""
    use_bucket(monkeypatch, moto_s3)
    seed = plant(moto_s3)
    original = buquet.doctor
    monkeypatch.setattr(buquet, "doctor", lambda store: original(store, race_threads=2, race_rounds=1, samples=3))
    code, out, err = cli(capsys, "doctor", "--json")
    assert code == 0, out + err
    assert json.loads(out)["safe"] is True
    assert damage(seed, snapshot(moto_s3)) == []


# ============================================================================
# The dashboard
# ============================================================================


def _get(server, path):
    try:
        with urllib.request.urlopen(server.url.rstrip("/") + path, timeout=30) as r:
            return r.status, r.read().decode("utf-8")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode("utf-8", "replace")


def test_the_dashboard_serves_every_view_over_the_junk(seed):
    """`buquet serve`: the overview, chart and task list answer 200, the task
    list shows exactly the valid tasks and counts every junk document as
    unreadable, a junk task's page is an error page but not a 500."""
    queue = connect(seed.target, use_config=False)
    server = buquet.make_server(queue, "127.0.0.1", 0, log=open(os.devnull, "w"))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    p = Problems()
    try:
        for path in ("/", "/tasks", "/api/overview", "/api/chart"):
            status, body = _get(server, path)
            p.check(status == 200, "GET %s: %d %s" % (path, status, body[:300]))
        ids, unreadable, after = set(), 0, ""
        for _ in range(10):
            status, body = _get(server, "/api/tasks" + ("?after=" + urllib.request.quote(after) if after else ""))
            if not p.check(status == 200, "GET /api/tasks after %r: %d %s" % (after, status, body[:300])):
                break
            data = json.loads(body)["data"]
            ids |= {t["id"] for t in data["tasks"]}
            unreadable += data["unreadable"]
            if not data["next"]:
                break
            after = data["next"]
        p.check(ids == seed.ids("P1", "P2", "P3", "R1", "C1"), "the task list showed %d tasks: extra %s"
                % (len(ids), sorted(ids - seed.ids("P1", "P2", "P3", "R1", "C1"))))
        view = {k for k in seed.junk if k.startswith("tasks/") and k.endswith(".json")}
        p.check(unreadable == len(view), "documents counted as unreadable: %d; junk documents under tasks/: %d"
                % (unreadable, len(view)))
        junk_id = sorted(seed.ready_targets)[0].split("/")[2][:-len(".json")]
        status, body = _get(server, "/tasks/" + junk_id)
        p.check(status != 500, "GET /tasks/<unreadable>: %d %s" % (status, body[:300]))
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
    p.extend(damage(seed, snapshot(seed.target)))
    p.done()


# ============================================================================
# Everything, one after the other, on one bucket
# ============================================================================


def test_after_every_command_the_junk_is_intact_and_only_stale_index_entries_are_gone(seed_each, capsys,
                                                                                       thread_crashes):
    """list, stats, workers, schedule list, sweep, a drained worker, the lease
    monitor, the scheduler, the dashboard's data, on one bucket: afterwards the
    junk is byte for byte what was planted, and what is gone is exactly
    buquet's stale index entries and the entries of the tasks it moved."""
    seed = seed_each
    queue = connect(seed.target, use_config=False)
    p = Problems()
    for argv in (["list"], ["stats"], ["stats", "--full"], ["workers"], ["schedule", "list"], ["sweep"]):
        code, out, err = cli(capsys, *argv)
        p.check(code == 0, "buquet %s: exit %r: %s" % (" ".join(argv), code, err[-300:]))
    worker = buquet.Worker(queue, "junk-all", concurrency=2, poll_min=0.05, poll_max=0.2, drain=True,
                           monitor=False, scheduler=False)
    worker.task(ECHO)(lambda input: input)
    p.check(worker.run(install_signal_handlers=False) == 0, "the drained worker did not exit 0")
    recovered = [t.doc["id"] for t in queue.recover_expired_leases()]
    p.check(recovered == [seed.valid["R1"]["id"]], "the monitor recovered %r" % recovered)
    try:
        fired = buquet.Scheduler(queue).tick()[0]
        p.check(fired == [], "the scheduler fired %r" % [t.doc for t in fired])
    except Exception as exc:  # noqa: BLE001
        p.append("the scheduler raised %s: %s" % (type(exc).__name__, exc))
    r = buquet._Request(buquet._Dashboard(queue))
    for name, view in (("overview", buquet._overview_data), ("chart", buquet._chart_data),
                       ("tasks", lambda r: buquet._tasks_data(r, {}))):
        try:
            view(r)
        except Exception as exc:  # noqa: BLE001
            p.append("the dashboard's %s data raised %s: %s" % (name, type(exc).__name__, exc))
    after = snapshot(seed.target)
    r1_ready = [k for k in after if k.startswith("ready/4/") and k.endswith(seed.valid["R1"]["id"])]
    p.check(len(r1_ready) == 1, "R1's new ready entry: %r" % r1_ready)
    moved = {seed.ready(n) for n in ("P1", "P2", "P3")} | {seed.lease("R1")}
    p.extend(damage(seed, after, may_go=moved, may_come=r1_ready))
    gone = set(seed.objects) - set(after)
    p.check(not sorted((seed.owned | moved) - gone), "still there, expected gone: %s" % sorted(
        (seed.owned | moved) - gone))
    for name in ("P1", "P2", "P3"):
        p.check(json.loads(after[seed.key(name)])["status"] == "completed", "%s not completed" % name)
    p.check(not thread_crashes, "threads died: %s" % thread_crashes)
    p.done()
