"""Schedules on real S3 servers: the operations on moto and SeaweedFS, schedulers in
several processes racing on SeaweedFS, and schedules shared with the original buquet.

Ticks get their `now` injected (due times a few minutes after the schedule's creation on
the server's clock), so no test waits for a minute to pass. The bucket is inspected with
boto3, never with buquet.

The original (PyPI `buquet` 0.1.0, Python 3.12 only) is installed once per session in a
venv under pytest's temporary directory and driven through tests/original_app.py; without
a Python 3.12 (pyenv or PATH) those tests are skipped (CI fails instead). It needs bucket versioning, hence
@pytest.mark.versioned, and SeaweedFS (it cannot connect to moto).
"""

import json
import multiprocessing
import os
import subprocess
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from helpers import bucket_keys, connect, read_doc

import buquet
import cron
from buquet import ScheduleError, Scheduler

UTC = timezone.utc
ORIGINAL_APP = Path(__file__).resolve().parent / "original_app.py"


@pytest.fixture
def queue(s3):
    q = connect(s3)
    yield q
    q.close()


def put_raw(t, key, body):
    t.client().put_object(Bucket=t.bucket, Key=key, Body=body)


def due_times(t, scope, schedule_id):
    """Due times that got a task, from the idempotency records under a scope."""
    prefix = "schedule:%s:" % schedule_id
    out = []
    for key in bucket_keys(t, "idempotency/%s/" % scope):
        record = read_doc(t, key)
        if record["key"].startswith(prefix):
            out.append((datetime.fromtimestamp(int(record["key"][len(prefix):]), UTC), record["task_id"]))
    return sorted(out)


def next_due(expr, after, tz=None):
    return cron.Cron(expr, tz).next_after(after)


# ============================================================================
# The operations on both servers
# ============================================================================


def test_a_schedules_life_on_a_real_server(s3, queue):
    created = queue.create_schedule("nightly", "report", {"b": 2, "a": "é"}, "*/10 * * * *",
                                    timezone="Europe/Berlin", timeout=30)
    doc = read_doc(s3, "schedules/nightly.json")
    assert list(doc) == ["id", "task_type", "input", "cron", "enabled", "timeout_seconds", "max_retries",
                         "created_at", "updated_at", "timezone"]
    assert (doc["input"], doc["timeout_seconds"], doc["max_retries"], doc["timezone"]) == (
        {"b": 2, "a": "é"}, 30, None, "Europe/Berlin")
    with pytest.raises(ScheduleError, match="^Schedule already exists: nightly$"):
        queue.create_schedule("nightly", "report", {}, "0 9 * * *")
    assert [s.id for s in queue.list_schedules()] == ["nightly"]
    assert queue.get_schedule("nightly").created_at == created.created_at
    assert queue.get_schedule("missing") is None

    scheduler = Scheduler(queue)
    first = next_due("*/10 * * * *", created.created_at)
    assert scheduler.tick(created.created_at + timedelta(seconds=1))[0] == []  # waits for its first due time
    [task] = scheduler.tick(first + timedelta(seconds=1))[0]
    assert (task.task_type, task.input, task.timeout_seconds, task.max_retries) == ("report", {"b": 2, "a": "é"},
                                                                                     30, 3)
    assert due_times(s3, "report", "nightly") == [(first, task.id)]
    last = read_doc(s3, "schedules/nightly/last_run.json")
    assert (last["last_task_id"], last["last_due_at"]) == (task.id, buquet.format_timestamp(first))
    assert scheduler.tick(first + timedelta(seconds=30))[0] == []

    queue.disable_schedule("nightly")
    assert read_doc(s3, "schedules/nightly.json")["enabled"] is False
    assert scheduler.tick(first + timedelta(minutes=10, seconds=1))[0] == []
    queue.enable_schedule("nightly")
    manual = queue.trigger_schedule("nightly")
    assert manual.id != task.id and len(bucket_keys(s3, "tasks/")) == 2
    assert len(bucket_keys(s3, "idempotency/")) == 1  # the trigger has no key

    queue.delete_schedule("nightly")
    assert bucket_keys(s3, "schedules/") == []
    assert queue.list_schedules() == []


# ============================================================================
# Exactly once across scheduler processes (SeaweedFS: its conditional writes hold)
# ============================================================================


def _race_ticks(target, instants, barrier, results):
    """A child process: one scheduler ticking at the given instants in step with the others."""
    q = connect(target)
    q.now()  # learn the server's clock before the race, not during it
    scheduler = Scheduler(q)
    fired = []
    for now in instants:
        barrier.wait(60)
        fired.append(sorted((t.task_type, t.id) for t in scheduler.tick(now)[0]))
    results.put(fired)
    q.close()


def test_schedulers_in_four_processes_submit_each_due_time_exactly_once(seaweed_s3):
    setup = connect(seaweed_s3)
    created = setup.create_schedule("every", "beat", {"n": 1}, "* * * * *")
    dues = [next_due("* * * * *", created.created_at) + timedelta(minutes=i) for i in range(3)]
    # Every process ticks at the same instants: right after each due time (all racing to
    # submit it), and once more half a minute later (when there is nothing to do).
    instants = [d + timedelta(seconds=s) for d in dues for s in (1, 31)]
    processes = 4
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(processes)
    results = ctx.Queue()
    children = [ctx.Process(target=_race_ticks, args=(seaweed_s3, instants, barrier, results))
                for _ in range(processes)]
    for child in children:
        child.start()
    try:
        reported = [results.get(timeout=120) for _ in children]
    finally:
        for child in children:
            child.join(30)
    assert [child.exitcode for child in children] == [0] * processes

    tasks = bucket_keys(seaweed_s3, "tasks/")
    assert len(tasks) == len(dues)
    records = due_times(seaweed_s3, "beat", "every")
    assert [due for due, _ in records] == dues
    assert sorted("tasks/%s/%s.json" % (i[0], i) for _, i in records) == tasks
    # Each process that returned a run for a due time returned the same task; nothing
    # fired half a minute later.
    for n, (due, task_id) in enumerate(records):
        assert {i for fired in reported for _, i in fired[2 * n]} <= {task_id}
        assert any(fired[2 * n] for fired in reported)
        assert all(fired[2 * n + 1] == [] for fired in reported)
    # The race did happen: for some due time several processes got the run back (each
    # submitted it, or found it submitted, before the last-run record moved on).
    assert max(sum(1 for fired in reported if fired[2 * n]) for n in range(len(dues))) >= 2
    last = read_doc(seaweed_s3, "schedules/every/last_run.json")
    assert (last["last_due_at"], last["last_task_id"]) == (buquet.format_timestamp(dues[-1]), records[-1][1])
    setup.close()


# ============================================================================
# Shared with the original buquet 0.1.0
# ============================================================================


def run_original(python, target, commands, cwd):
    """Run commands with the original's Python API (tests/original_app.py); their results."""
    env = dict(os.environ, S3_ENDPOINT=target.endpoint, S3_BUCKET=target.bucket, S3_REGION=target.region,
               AWS_ACCESS_KEY_ID=target.access_key, AWS_SECRET_ACCESS_KEY=target.secret_key)
    env.pop("AWS_PROFILE", None)
    # -I and a directory without buquet.py: the port must not shadow the original.
    done = subprocess.run([python, "-I", str(ORIGINAL_APP), json.dumps(commands)], capture_output=True,
                          text=True, timeout=120, env=env, cwd=str(cwd))
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def ts(text):
    """A timestamp as the original's to_dict() shows it ("+00:00"), as a datetime."""
    return buquet.parse_timestamp(text)


@pytest.mark.versioned
def test_a_schedule_the_original_created_is_read_and_served(seaweed_s3, original_python, tmp_path):
    t = seaweed_s3
    queue = connect(t)
    # An hour 12 hours away from now: this schedule cannot come due in the minutes ticked here.
    far = (queue.now().hour + 12) % 24
    created = run_original(original_python, t, [
        ["create", "orig-every", "beat", {"z": 1, "a": {"y": 2, "b": 3}}, "*/5 * * * *", 60, 1],
        ["create", "orig-daily", "report", {}, "0 %d * * *" % far],
        # The original's dialect numbers weekdays 1-7 from Sunday: `2-6` is Monday-Friday
        # there and Tuesday-Saturday here (crontab(5): 0 or 7 = Sunday). Expressions
        # without a day-of-week restriction mean the same in both.
        ["create", "orig-weekdays", "report", {}, "0 %d * * 2-6" % far],
        # A year field: the original accepts it; standard cron does not.
        ["create", "orig-year", "report", {}, "0 9 * * 1-5 2030"],
        ["create", "orig-every", "beat", {}, "* * * * *"],
        ["create", "orig-sunday", "report", {}, "0 0 * * 0"],  # 0 = Sunday: only ours accepts it
    ], tmp_path)
    assert created[4] == {"error": "RuntimeError: Schedule already exists: orig-every"}
    assert "Days of Week must be greater than or equal to 1" in created[5]["error"]

    schedules = {s.id: s for s in queue.list_schedules()}
    assert sorted(schedules) == ["orig-daily", "orig-every", "orig-weekdays", "orig-year"]
    every = queue.get_schedule("orig-every")
    assert (every.task_type, every.input, every.cron, every.enabled) == (
        "beat", {"a": {"b": 3, "y": 2}, "z": 1}, "*/5 * * * *", True)
    assert (every.timeout_seconds, every.max_retries, every.timezone) == (60, 1, None)
    assert every.created_at == ts(created[0]["created_at"])  # 9-digit fraction, local clock
    # The weekday expression as we read it: from Sunday 2026-01-25, next Tuesday (the
    # original would say Monday 2026-01-26).
    sunday = datetime(2026, 1, 25, tzinfo=UTC)
    assert schedules["orig-weekdays"].cron_schedule.next_after(sunday).date().isoformat() == "2026-01-27"

    # Our scheduler serves it: its first due time after creation fires once; the schedule
    # with a year field is skipped (reported), the others are not due.
    scheduler = Scheduler(queue)
    first = next_due("*/5 * * * *", every.created_at)
    assert scheduler.tick(every.created_at + timedelta(seconds=1))[0] == []
    [task] = scheduler.tick(first + timedelta(seconds=1))[0]
    assert (task.task_type, task.input, task.timeout_seconds, task.max_retries) == (
        "beat", {"a": {"b": 3, "y": 2}, "z": 1}, 60, 1)
    assert due_times(t, "beat", "orig-every") == [(first, task.id)]

    # The original reads the last run we wrote (and the task we submitted).
    seen = run_original(original_python, t, [["last_run", "orig-every"], ["get_task", task.id]], tmp_path)
    assert (seen[0]["schedule_id"], seen[0]["last_task_id"]) == ("orig-every", task.id)
    assert ts(seen[0]["next_run_at"]) == first + timedelta(minutes=5)
    assert (seen[1]["id"], seen[1]["status"], seen[1]["task_type"]) == (task.id, "pending", "beat")

    # A last run in the original's format (its scheduler fired first + 5 min, 41 s late)
    # is honoured: that due time does not fire again, the next one does.
    second = first + timedelta(minutes=5)
    fired_at = buquet.format_timestamp(second + timedelta(seconds=41))[:-1] + ".318123456Z"
    put_raw(t, "schedules/orig-every/last_run.json", json.dumps({
        "schedule_id": "orig-every", "last_run_at": fired_at,
        "last_task_id": "5d1f0e2a-3b4c-4d5e-8f60-718293a4b5c6",
        "next_run_at": buquet.format_timestamp(second + timedelta(minutes=5))}, separators=(",", ":")).encode())
    assert scheduler.tick(second + timedelta(seconds=50))[0] == []
    [again] = scheduler.tick(second + timedelta(minutes=5, seconds=1))[0]
    assert [due for due, _ in due_times(t, "beat", "orig-every")] == [first, second + timedelta(minutes=5)]

    # Disabled by the original: not served; deleted by the original: the schedule and our
    # last-run record are gone.
    run_original(original_python, t, [["disable", "orig-every"]], tmp_path)
    assert queue.get_schedule("orig-every").enabled is False
    assert scheduler.tick(second + timedelta(minutes=10, seconds=1))[0] == []
    assert run_original(original_python, t, [["delete", "orig-every"]], tmp_path) == [None]
    assert not any(k.startswith("schedules/orig-every") for k in bucket_keys(t, "schedules/"))
    assert again.id != task.id
    queue.close()


@pytest.mark.versioned
def test_a_schedule_we_created_is_read_by_the_original(seaweed_s3, original_python, tmp_path):
    t = seaweed_s3
    queue = connect(t)
    ours = queue.create_schedule("ours", "greet", {"b": "é", "a": [1, 2]}, "30 2 * * *",
                                 timezone="Europe/Berlin", timeout=45, max_retries=2)
    plain = queue.create_schedule("plain", "beat", None, "*/5 * * * *")
    due = next_due("*/5 * * * *", plain.created_at)
    [task] = Scheduler(queue).tick(due + timedelta(seconds=1))[0]
    assert task.task_type == "beat"

    seen = run_original(original_python, t, [
        ["list"], ["get", "ours"], ["last_run", "plain"], ["last_run", "ours"], ["trigger", "ours"],
    ], tmp_path)
    listed = {s["id"]: s for s in seen[0]}
    assert sorted(listed) == ["ours", "plain"]
    got = seen[1]
    assert (got["task_type"], got["input"], got["cron"], got["enabled"]) == (
        "greet", {"a": [1, 2], "b": "é"}, "30 2 * * *", True)
    assert (got["timeout_seconds"], got["max_retries"]) == (45, 2)
    assert ts(got["created_at"]) == ours.created_at and ts(got["updated_at"]) == ours.updated_at
    assert "timezone" not in got  # the original has no such field; it ignores ours
    assert listed["plain"]["input"] is None and listed["plain"]["timeout_seconds"] is None
    # Our last-run record (with its extra last_due_at) reads as the original's.
    last = seen[2]
    assert (last["schedule_id"], last["last_task_id"]) == ("plain", task.id)
    assert ts(last["next_run_at"]) == due + timedelta(minutes=5)
    assert seen[3] is None
    triggered = seen[4]
    assert (triggered["task_type"], triggered["input"], triggered["timeout_seconds"],
            triggered["max_retries"]) == ("greet", {"a": [1, 2], "b": "é"}, 45, 2)
    assert queue.get(triggered["id"]).status == "pending"

    # Beware: the original rewrites the whole document on enable/disable and drops the
    # fields it does not know, `timezone` included. Our 02:30 Berlin schedule becomes
    # 02:30 UTC after the original toggles it.
    run_original(original_python, t, [["disable", "ours"], ["enable", "ours"]], tmp_path)
    doc = read_doc(t, "schedules/ours.json")
    assert doc["enabled"] is True and "timezone" not in doc
    assert queue.get_schedule("ours").timezone is None

    # The original's delete removes our last-run record too.
    run_original(original_python, t, [["delete", "plain"]], tmp_path)
    assert bucket_keys(t, "schedules/") == ["schedules/ours.json"]
    queue.close()
