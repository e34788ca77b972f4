"""Schedules on the in-memory store: documents, operations, and the scheduler tick.

The store's clock is moved by hand and ticks get their `now` injected, so nothing here
waits for a minute to pass. Request counts come from MemoryStore.requests. Real servers,
racing processes and the original buquet are in test_schedules_s3.py.

What a tick promises (buquet.py, "Schedules"; README "Schedules"):
  * each due time is submitted once, with the original's idempotency key
    `schedule:{id}:{due unix seconds}` (scope = task type), however many schedulers run;
  * a new schedule waits for its first due time after creation;
  * after downtime the latest missed due time fires once and the earlier ones are
    skipped; the last-run record's `last_due_at` says which time fired;
  * a disabled schedule does not fire; enabled again, it fires at its next due time
    (not for the times missed while it was disabled).
"""

import asyncio
import hashlib
import json
import logging
import threading
import time
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest
from helpers import Clock

from buquet import (
    AsyncQueue,
    MemoryStore,
    Queue,
    Schedule,
    SCHEDULE_RETRY,
    ScheduleError,
    Scheduler,
    StoreError,
    Worker,
    idempotency_key,
)

UTC = timezone.utc
START = datetime(2026, 1, 27, 8, 59, 30, tzinfo=UTC)  # a Tuesday, 30 s before 09:00
NINE = datetime(2026, 1, 27, 9, 0, tzinfo=UTC)


@pytest.fixture
def clock():
    return Clock(START)


@pytest.fixture
def store(clock):
    return MemoryStore(clock=clock)


@pytest.fixture
def queue(store):
    q = Queue(store, rand=lambda: 0.5)
    yield q
    q.close()


def at(hour, minute=0, second=0, day=27, month=1, year=2026):
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC)


def stored(store, key):
    return json.loads(store._objects[key].body)


def task_docs(store):
    return [json.loads(b.body) for k, b in sorted(store._objects.items()) if k.startswith("tasks/")]


def due_times(store, schedule_id):
    """The due times (UTC) that got a task, from the idempotency records' keys."""
    prefix = "schedule:%s:" % schedule_id
    out = []
    for k, b in store._objects.items():
        if k.startswith("idempotency/"):
            key = json.loads(b.body)["key"]
            if key.startswith(prefix):
                out.append(datetime.fromtimestamp(int(key[len(prefix):]), UTC))
    return sorted(out)


def fire(scheduler, now):
    """Tick at `now`; the ids of the schedules whose runs were submitted."""
    tasks, _ = scheduler.tick(now)
    return sorted(t.task_type for t in tasks)


# ============================================================================
# Documents (spec 8.1, 8.2) and the operations
# ============================================================================


def test_create_writes_the_originals_document_with_one_conditional_put(queue, store):
    schedule = queue.create_schedule("daily-report", "generate_report", {"report_type": "daily"}, "0 9 * * 2-6")
    # Field order and nulls as the original writes them; no `timezone` when none was given;
    # timestamps from the store's clock (S3's time), not the local one.
    assert store._objects["schedules/daily-report.json"].body == (
        b'{"id":"daily-report","task_type":"generate_report","input":{"report_type":"daily"},'
        b'"cron":"0 9 * * 2-6","enabled":true,"timeout_seconds":null,"max_retries":null,'
        b'"created_at":"2026-01-27T08:59:30Z","updated_at":"2026-01-27T08:59:30Z"}')
    assert store.requests == {"PUT": 1}
    assert isinstance(schedule, Schedule)
    assert (schedule.id, schedule.task_type, schedule.input, schedule.cron, schedule.enabled) == (
        "daily-report", "generate_report", {"report_type": "daily"}, "0 9 * * 2-6", True)
    assert (schedule.timeout_seconds, schedule.max_retries, schedule.timezone) == (None, None, None)
    assert schedule.created_at == schedule.updated_at == START
    assert schedule.etag == store._objects["schedules/daily-report.json"].etag


def test_timezone_timeout_and_retries_are_stored_with_timezone_last(queue, store):
    queue.create_schedule("berlin", "t", {"b": "é", "a": [1]}, "30 2 * * *", timezone="Europe/Berlin",
                          timeout=60, max_retries=0)
    assert store._objects["schedules/berlin.json"].body == (
        '{"id":"berlin","task_type":"t","input":{"b":"é","a":[1]},"cron":"30 2 * * *","enabled":true,'
        '"timeout_seconds":60,"max_retries":0,"created_at":"2026-01-27T08:59:30Z",'
        '"updated_at":"2026-01-27T08:59:30Z","timezone":"Europe/Berlin"}').encode("utf-8")
    schedule = queue.get_schedule("berlin")
    assert (schedule.timezone, schedule.timeout_seconds, schedule.max_retries) == ("Europe/Berlin", 60, 0)
    assert schedule.cron_schedule.tz == ZoneInfo("Europe/Berlin")


def test_a_tzinfo_is_stored_by_its_name_and_one_without_a_name_is_refused(queue, store):
    queue.create_schedule("zone", "t", {}, "0 9 * * *", timezone=ZoneInfo("America/New_York"))
    assert stored(store, "schedules/zone.json")["timezone"] == "America/New_York"
    store.requests.clear()
    # A fixed offset has no IANA name: it would be stored as "UTC+02:00", which no one
    # could read back, so it is refused up front.
    with pytest.raises(ScheduleError, match="time zone"):
        queue.create_schedule("offset", "t", {}, "0 9 * * *", timezone=timezone(timedelta(hours=2)))
    assert store.requests == {}


def test_a_second_create_of_the_same_id_is_refused_and_changes_nothing(queue, store):
    queue.create_schedule("daily-report", "generate_report", {}, "0 9 * * *")
    before = store._objects["schedules/daily-report.json"]
    with pytest.raises(ScheduleError) as e:
        queue.create_schedule("daily-report", "other", {"x": 1}, "*/5 * * * *")
    assert str(e.value) == "Schedule already exists: daily-report"  # the original's message
    assert store._objects["schedules/daily-report.json"] == before


@pytest.mark.parametrize("args, options, error, match", [
    (("a/b", "t", {}, "0 9 * * *"), {}, ValueError, "schedule id must be"),
    (("", "t", {}, "0 9 * * *"), {}, ValueError, "schedule id must be"),
    (("a\nb", "t", {}, "0 9 * * *"), {}, ValueError, "schedule id must be"),
    (("a", "t/x", {}, "0 9 * * *"), {}, ValueError, "task_type must be"),
    (("a", "t", {1, 2}, "0 9 * * *"), {}, ValueError, "input must be JSON"),
    (("a", "t", {}, None), {}, ValueError, "cron must be"),
    (("a", "t", {}, "0 9 * *"), {}, ScheduleError, "expected 5 fields"),
    (("a", "t", {}, "61 * * * *"), {}, ScheduleError, "minute"),
    (("a", "t", {}, "0 0 * * 8"), {}, ScheduleError, "day-of-week"),
    (("a", "t", {}, "0 0 30 2 *"), {}, ScheduleError, "never"),
    (("a", "t", {}, "@reboot"), {}, ScheduleError, "reboot"),
    (("a", "t", {}, "0 30 9 * * *"), {}, ScheduleError, "got 6 fields"),  # Quartz seconds field
    (("a", "t", {}, "0 9 * * *"), {"timezone": "Mars/Olympus"}, ScheduleError, "time zone"),
    (("a", "t", {}, "0 9 * * *"), {"timezone": ""}, ScheduleError, "time zone"),
    (("a", "t", {}, "0 9 * * *"), {"timeout": 0}, ValueError, "timeout"),
    (("a", "t", {}, "0 9 * * *"), {"max_retries": -1}, ValueError, "max_retries"),
    (("a", "t", {}, "0 9 * * *"), {"max_retries": 2 ** 32}, ValueError, "max_retries"),
])
def test_bad_arguments_are_refused_before_any_request(queue, store, args, options, error, match):
    with pytest.raises(error, match=match):
        queue.create_schedule(*args, **options)
    assert store.requests == {}


def test_crontab_features_the_original_lacks_are_accepted(queue):
    # Macros, 0 = Sunday and day-of-month/day-of-week OR are standard crontab(5); the
    # original rejects the first two and reads the third with AND (spec 8.3).
    for i, expr in enumerate(("@daily", "@hourly", "0 0 * * 0", "30 4 1,15 * 5", "0 9 * * MON-FRI")):
        queue.create_schedule("s%d" % i, "t", {}, expr)
    assert len(queue.list_schedules()) == 5


def test_get_schedule_reads_a_document_and_a_missing_one_is_none(queue, store):
    assert queue.get_schedule("nope") is None
    # As the original writes it: 9-digit fractions; `enabled` missing means true.
    store.put("schedules/orig.json", (
        b'{"id":"orig","task_type":"generate_report","input":{"a":[1,2],"z":1},"cron":"0 9 * * 2-6",'
        b'"timeout_seconds":null,"max_retries":null,"created_at":"2026-01-27T12:00:00.123456789Z",'
        b'"updated_at":"2026-01-27T12:00:00.123456789Z","extra":"kept"}'))
    schedule = queue.get_schedule("orig")
    assert (schedule.id, schedule.enabled, schedule.input) == ("orig", True, {"a": [1, 2], "z": 1})
    assert schedule.created_at == datetime(2026, 1, 27, 12, 0, 0, 123456, tzinfo=UTC)
    assert schedule.to_dict()["extra"] == "kept"
    assert "orig" in repr(schedule)


def test_list_schedules_reads_every_schedule_and_skips_the_rest(queue, store):
    queue.create_schedule("a", "t", {}, "0 9 * * *")
    queue.create_schedule("b", "t", {"n": 1}, "*/5 * * * *", enabled=False)
    store.put("schedules/a/last_run.json", b'{"schedule_id":"a"}')  # not a schedule
    store.put("schedules/notes.txt", b"not a schedule")
    store.put("schedules/broken.json", b"{not json")
    store.put("schedules/partial.json", b'{"id":"partial","task_type":"t","input":{}}')  # no cron
    store.requests.clear()
    found = queue.list_schedules()
    assert [(s.id, s.enabled) for s in found] == [("a", True), ("b", False)]
    assert set(queue.skipped) == {"schedules/broken.json", "schedules/partial.json"}
    # One LIST, then one GET per .json key other than last_run.json (as the original).
    assert store.requests == {"LIST": 1, "GET": 4}
    assert queue.skipped["schedules/partial.json"] == "schedule field cron must be a string"


def test_list_schedules_follows_pages(queue, store):
    for i in range(1003):
        store.put("schedules/s%04d.json" % i,
                  json.dumps({"id": "s%04d" % i, "task_type": "t", "input": None, "cron": "0 9 * * *",
                              "created_at": "2026-01-27T08:00:00Z", "updated_at": "2026-01-27T08:00:00Z"}).encode())
    store.requests.clear()
    ids = [s.id for s in queue.list_schedules()]
    assert ids == ["s%04d" % i for i in range(1003)]
    assert store.requests["LIST"] == 2


def test_disable_and_enable_change_only_enabled_and_updated_at(queue, store, clock):
    queue.create_schedule("s", "t", {"k": "v"}, "0 9 * * *", timezone="Europe/Berlin", timeout=60)
    doc = stored(store, "schedules/s.json")
    doc["from_a_newer_writer"] = {"x": 1}
    store.put("schedules/s.json", json.dumps(doc).encode())
    store.requests.clear()
    clock.set(at(10))
    disabled = queue.disable_schedule("s")
    assert store.requests == {"GET": 1, "PUT": 1}  # GET + PUT If-Match, like the original
    after = stored(store, "schedules/s.json")
    assert after == dict(doc, enabled=False, updated_at="2026-01-27T10:00:00Z")
    assert list(after) == list(doc)  # same field order, unknown field and timezone kept
    assert disabled.enabled is False and queue.get_schedule("s").enabled is False
    clock.set(at(11))
    assert queue.enable_schedule("s").enabled is True
    assert stored(store, "schedules/s.json") == dict(doc, enabled=True, updated_at="2026-01-27T11:00:00Z")
    with pytest.raises(ScheduleError, match="nope"):
        queue.enable_schedule("nope")
    with pytest.raises(ScheduleError, match="nope"):
        queue.disable_schedule("nope")


def test_delete_removes_the_schedule_and_its_last_run(queue, store, clock):
    queue.create_schedule("s", "t", {}, "0 9 * * *")
    queue.create_schedule("keep", "t", {}, "0 9 * * *")
    clock.set(at(9, 0, 5))
    Scheduler(queue).tick()
    assert "schedules/s/last_run.json" in store._objects
    queue.delete_schedule("s")
    assert sorted(k for k in store._objects if k.startswith("schedules/")) == [
        "schedules/keep.json", "schedules/keep/last_run.json"]
    assert queue.get_schedule("s") is None and queue.get_last_run("s") is None
    with pytest.raises(ScheduleError, match="'s'"):
        queue.delete_schedule("s")
    # The id is free again; the new schedule waits for its own first due time.
    queue.create_schedule("s", "t", {}, "0 9 * * *")
    assert Scheduler(queue).tick(at(9, 0, 10))[0] == []


def test_trigger_submits_one_task_now_and_leaves_the_schedule_alone(queue, store, clock):
    queue.create_schedule("plain", "report", {"kind": "daily"}, "0 9 * * *")
    queue.create_schedule("tuned", "report", {"kind": "hourly"}, "0 * * * *", timeout=45, max_retries=0,
                          enabled=False)
    before = dict(store._objects)
    store.requests.clear()
    plain = queue.trigger_schedule("plain")
    assert store.requests == {"GET": 1, "PUT": 2}  # GET schedule + a plain submit
    assert (plain.task_type, plain.input, plain.status) == ("report", {"kind": "daily"}, "pending")
    assert (plain.timeout_seconds, plain.max_retries) == (300, 3)  # the original's fallbacks for null
    assert plain.available_at == START  # runs now, not at the due time
    tuned = queue.trigger_schedule("tuned")  # disabled schedules can still be triggered by hand
    assert (tuned.timeout_seconds, tuned.max_retries) == (45, 0)
    new = set(store._objects) - set(before)
    assert not any(k.startswith(("idempotency/", "schedules/")) for k in new)  # no key, no last_run
    assert all(store._objects[k] == v for k, v in before.items())
    with pytest.raises(ScheduleError, match="nope"):
        queue.trigger_schedule("nope")
    # The schedule's own run still fires at its due time.
    assert fire(Scheduler(queue), at(9)) == ["report"]


def test_get_last_run_is_none_until_a_run_and_tolerates_a_broken_record(queue, store, clock):
    queue.create_schedule("s", "t", {}, "0 9 * * *")
    assert queue.get_last_run("s") is None
    assert queue.get_last_run("nope") is None
    store.put("schedules/s/last_run.json", b"garbage")
    assert queue.get_last_run("s") is None


def test_the_schedulers_idempotency_key_is_the_originals():
    # Spec 8.4: the record for `0 9 * * *`'s first run in the original's scheduler.
    record, key_hash = idempotency_key("generate_report", "schedule:daily-report:32400")
    assert record == ("idempotency/generate_report/"
                      "e3d217deb753672d87e0f3cc6711b707b4263fa2711beeda752583f354cb9a56.json")
    assert key_hash == "sha256:" + hashlib.sha256(b"generate_report:schedule:daily-report:32400").hexdigest()


# ============================================================================
# The tick: when runs fire
# ============================================================================


def test_a_new_schedule_waits_for_its_first_due_time(queue, store, clock):
    queue.create_schedule("daily-report", "generate_report", {"kind": "daily"}, "0 9 * * *")  # at 08:59:30
    scheduler = Scheduler(queue)
    # Right after creation: nothing (the original would fire at once, for 1970's first 09:00).
    tasks, wait = scheduler.tick(START)
    assert tasks == [] and wait == 30.0  # the next look is when the run is due
    assert scheduler.tick(at(8, 59, 59) + timedelta(microseconds=999999))[0] == []
    assert queue.get_last_run("daily-report") is None
    assert not any(k.startswith(("tasks/", "idempotency/")) for k in store._objects)

    store.requests.clear()
    tasks, wait = scheduler.tick(at(9, 0, 0))
    assert len(tasks) == 1 and wait == 60.0
    task = tasks[0]
    assert (task.task_type, task.input, task.timeout_seconds, task.max_retries) == (
        "generate_report", {"kind": "daily"}, 300, 3)
    # LIST + GET schedule + GET last_run; submit = PUT record + PUT task + PUT ready; PUT last_run.
    assert store.requests == {"LIST": 1, "GET": 2, "PUT": 4}
    due = int(NINE.timestamp())
    record_key, _ = idempotency_key("generate_report", "schedule:daily-report:%d" % due)
    assert stored(store, record_key)["task_id"] == task.id
    assert store._objects["schedules/daily-report/last_run.json"].body == (
        '{"schedule_id":"daily-report","last_run_at":"2026-01-27T09:00:00Z","last_task_id":"%s",'
        '"next_run_at":"2026-01-28T09:00:00Z","last_due_at":"2026-01-27T09:00:00Z"}' % task.id).encode()
    assert queue.get_last_run("daily-report")["last_task_id"] == task.id
    # Later ticks the same day fire nothing; the next day's 09:00 fires once.
    for now in (at(9, 0, 0), at(9, 0, 30), at(17), at(8, 59, 59, day=28)):
        assert scheduler.tick(now)[0] == []
    assert fire(scheduler, at(9, 0, 20, day=28)) == ["generate_report"]
    assert due_times(store, "daily-report") == [NINE, NINE + timedelta(days=1)]
    assert scheduler.fired == 2


def test_a_tick_without_now_uses_the_stores_clock(queue, store, clock):
    # The store's clock (S3's time) is years away from this machine's clock: only it counts.
    clock.set(datetime(2031, 5, 5, 11, 59, 50, tzinfo=UTC))
    queue.create_schedule("noon", "t", {}, "0 12 * * *")
    assert Scheduler(queue).tick()[0] == []
    clock.set(datetime(2031, 5, 5, 12, 0, 1, 500000, tzinfo=UTC))
    tasks, _ = Scheduler(queue).tick()
    assert len(tasks) == 1
    assert queue.get_last_run("noon") == {
        "schedule_id": "noon", "last_run_at": "2031-05-05T12:00:01.500Z", "last_task_id": tasks[0].id,
        "next_run_at": "2031-05-06T12:00:00Z", "last_due_at": "2031-05-05T12:00:00Z"}


def test_each_due_time_fires_exactly_once_over_frequent_ticks(queue, store):
    queue.create_schedule("five", "t", {}, "*/5 * * * *")  # at 08:59:30
    scheduler = Scheduler(queue)
    now = START
    while now <= at(9, 30, 10):
        scheduler.tick(now)
        now += timedelta(seconds=20)
    assert due_times(store, "five") == [at(9, m) for m in range(0, 31, 5)]
    assert len(task_docs(store)) == 7


def test_after_downtime_only_the_latest_missed_run_fires(queue, store):
    queue.create_schedule("hourly", "t", {}, "0 * * * *")
    scheduler = Scheduler(queue)
    assert fire(scheduler, at(9, 0, 2)) == ["t"]
    # Down from 09:00:02 to 13:20: 10:00, 11:00 and 12:00 are skipped, 13:00 fires once.
    assert fire(scheduler, at(13, 20)) == ["t"]
    last = queue.get_last_run("hourly")
    assert (last["last_due_at"], last["last_run_at"], last["next_run_at"]) == (
        "2026-01-27T13:00:00Z", "2026-01-27T13:20:00Z", "2026-01-27T14:00:00Z")
    assert fire(scheduler, at(13, 40)) == []
    assert fire(scheduler, at(14, 0, 1)) == ["t"]
    assert due_times(store, "hourly") == [at(9), at(13), at(14)]


def test_after_a_year_of_downtime_an_every_minute_schedule_fires_once(queue, store, clock):
    queue.create_schedule("minutely", "t", {}, "* * * * *")
    scheduler = Scheduler(queue)
    assert fire(scheduler, at(9, 0, 0)) == ["t"]
    later = at(9, 0, 30, year=2027)  # 525,600 due times later
    started = time.perf_counter()
    assert fire(scheduler, later) == ["t"]
    assert time.perf_counter() - started < 1.0
    assert queue.get_last_run("minutely")["last_due_at"] == "2027-01-27T09:00:00Z"
    assert fire(scheduler, later + timedelta(seconds=20)) == []  # no second catch-up run
    assert due_times(store, "minutely") == [at(9), at(9, year=2027)]


def test_a_disabled_schedule_does_not_fire_and_enabled_again_waits_for_its_next_due_time(queue, store, clock):
    queue.create_schedule("hourly", "t", {}, "0 * * * *")
    queue.create_schedule("off", "t", {}, "* * * * *", enabled=False)  # never enabled: never fires
    scheduler = Scheduler(queue)
    assert fire(scheduler, at(9, 0, 1)) == ["t"]
    clock.set(at(9, 10))
    queue.disable_schedule("hourly")
    for now in (at(10, 0, 5), at(11, 0, 5)):
        assert fire(scheduler, now) == []
    clock.set(at(11, 30))
    queue.enable_schedule("hourly")
    # 10:00 and 11:00 were missed while disabled: they do not fire late on enabling.
    assert fire(scheduler, at(11, 30, 1)) == []
    assert fire(scheduler, at(12, 0, 0)) == ["t"]
    assert due_times(store, "hourly") == [at(9), at(12)]
    assert due_times(store, "off") == []


def test_the_originals_last_run_record_is_honoured(queue, store):
    queue.create_schedule("hourly", "t", {}, "0 * * * *")
    # Written by the original's scheduler (spec 8.2): no last_due_at, 9-digit fraction;
    # `last_run_at` (the tick time) is where the original's next due time counts from.
    original = (b'{"schedule_id":"hourly","last_run_at":"2026-01-27T09:00:41.318123456Z",'
                b'"last_task_id":"5d1f0e2a-3b4c-4d5e-8f60-718293a4b5c6","next_run_at":"2026-01-27T10:00:00Z"}')
    store.put("schedules/hourly/last_run.json", original)
    scheduler = Scheduler(queue)
    assert fire(scheduler, at(9, 30)) == []
    assert fire(scheduler, at(10, 0, 2)) == ["t"]
    last = queue.get_last_run("hourly")
    assert (last["last_due_at"], last["next_run_at"]) == ("2026-01-27T10:00:00Z", "2026-01-27T11:00:00Z")
    assert due_times(store, "hourly") == [at(10)]


def test_an_unreadable_last_run_record_is_replaced(queue, store):
    queue.create_schedule("s", "t", {}, "0 9 * * *")
    store.put("schedules/s/last_run.json", b"\xff not json")
    assert fire(Scheduler(queue), at(9, 0, 1)) == ["t"]  # counted from the schedule's creation
    assert queue.get_last_run("s")["last_due_at"] == "2026-01-27T09:00:00Z"


class FailingStore(MemoryStore):
    """Fails the next PUT of a key with a given prefix (a network error)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.fail_prefix = None

    def put(self, key, body, **kwargs):
        if self.fail_prefix and key.startswith(self.fail_prefix):
            self.fail_prefix = None
            raise StoreError("PUT %s: connection reset (simulated)" % key)
        return super().put(key, body, **kwargs)


@pytest.mark.parametrize("fail", ["schedules/s/last_run.json", "tasks/", "idempotency/"])
def test_a_failed_write_during_a_tick_never_yields_a_second_task(clock, caplog, fail):
    store = FailingStore(clock=clock)
    queue = Queue(store)
    queue.create_schedule("s", "t", {"n": 1}, "0 9 * * *")
    scheduler = Scheduler(queue)
    store.fail_prefix = fail
    with caplog.at_level(logging.WARNING, logger="buquet"):
        _, wait = scheduler.tick(at(9, 0, 1))
    assert "schedule s:" in caplog.text and "simulated" in caplog.text
    assert wait == SCHEDULE_RETRY  # soon: the next day's 09:00 must not be the next look
    tasks, _ = scheduler.tick(at(9, 0, 6))  # the same due time again, now without a fault
    assert [t.task_type for t in tasks] == ["t"]
    docs = task_docs(store)
    assert [d["id"] for d in docs] == [tasks[0].id]
    assert queue.get_last_run("s")["last_task_id"] == tasks[0].id
    assert scheduler.tick(at(9, 1))[0] == []


def test_schedulers_racing_in_threads_submit_each_due_time_once(store):
    queue = Queue(store)
    queue.create_schedule("every", "t", {}, "* * * * *")
    queue.create_schedule("pair", "u", {"x": 1}, "*/2 * * * *")
    n = 8
    barrier = threading.Barrier(n)
    seen = [[] for _ in range(n)]

    def run(i):
        scheduler = Scheduler(Queue(store))  # a scheduler of its own, as in another process
        for minute in range(1, 5):
            barrier.wait()
            seen[i].append(sorted((t.task_type, t.id) for t in scheduler.tick(at(9, minute, 1))[0]))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert due_times(store, "every") == [at(9, m) for m in range(1, 5)]
    # Created at 08:59:30, first looked at 09:01:01: its 09:00 run is the latest one due.
    assert due_times(store, "pair") == [at(9, 0), at(9, 2), at(9, 4)]
    assert len(task_docs(store)) == 7
    # A scheduler that returned a run (it submitted it or found it submitted) returned the
    # same task as every other; one that came after the last-run record moved returned none.
    for minute in range(4):
        for task_type in ("t", "u"):
            assert len({i for s in seen for t, i in s[minute] if t == task_type}) <= 1


def test_one_broken_schedule_does_not_stop_the_others(queue, store, caplog):
    queue.create_schedule("good", "t", {}, "0 9 * * *")
    base = {"task_type": "t", "input": {}, "enabled": True, "timeout_seconds": None, "max_retries": None,
            "created_at": "2026-01-27T08:00:00Z", "updated_at": "2026-01-27T08:00:00Z"}
    # The original accepts a 6th (year) field; standard cron does not, so it never fires here.
    store.put("schedules/year.json", json.dumps(dict(base, id="year", cron="0 9 * * 1-5 2030")).encode())
    store.put("schedules/zone.json", json.dumps(dict(base, id="zone", cron="0 9 * * *",
                                                     timezone="Nowhere/Land")).encode())
    # An unreadable updated_at: counted from created_at instead.
    store.put("schedules/stamp.json", json.dumps(dict(base, id="stamp", task_type="s", cron="0 9 * * *",
                                                      updated_at="yesterday")).encode())
    with caplog.at_level(logging.WARNING, logger="buquet"):
        assert fire(Scheduler(queue), at(9, 0, 1)) == ["s", "t"]
    assert due_times(store, "good") == due_times(store, "stamp") == [at(9)]
    for sid in ("year", "zone"):
        assert "schedule %s:" % sid in caplog.text
    assert "stamp" not in caplog.text


def test_tick_says_how_long_to_wait(queue, clock):
    scheduler = Scheduler(queue, interval=120)
    assert scheduler.tick(START) == ([], 120)  # no schedules: the interval
    queue.create_schedule("off", "t", {}, "* * * * *", enabled=False)  # disabled: ignored
    assert scheduler.tick(START) == ([], 120)
    queue.create_schedule("nine", "t", {}, "0 9 * * *")
    assert scheduler.tick(START) == ([], 30.0)
    assert scheduler.tick(at(8, 59, 59) + timedelta(microseconds=750000)) == ([], 0.25)


def test_scheduler_run_loops_until_stopped(queue, store, clock):
    queue.create_schedule("nine", "t", {}, "0 9 * * *")
    scheduler = Scheduler(queue, interval=0.02)
    stop = threading.Event()
    thread = threading.Thread(target=scheduler.run, args=(stop,))
    thread.start()
    try:
        time.sleep(0.1)
        assert scheduler.fired == 0
        clock.set(at(9, 0, 3))
        deadline = time.monotonic() + 5
        while scheduler.fired == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert scheduler.fired == 1
    finally:
        stop.set()
        thread.join(5)
    assert not thread.is_alive()
    assert due_times(store, "nine") == [NINE]


def test_schedules_through_the_async_queue(store):
    async def main():
        aqueue = AsyncQueue(Queue(store))
        await aqueue.create_schedule("s", "t", {"a": 1}, "0 9 * * *", timezone="UTC")
        assert [s.id for s in await aqueue.list_schedules()] == ["s"]
        assert (await aqueue.get_schedule("s")).timezone == "UTC"
        tasks, _ = Scheduler(aqueue).tick(at(9, 0, 1))
        assert (await aqueue.get_last_run("s"))["last_task_id"] == tasks[0].id
        await aqueue.disable_schedule("s")
        assert (await aqueue.trigger_schedule("s")).input == {"a": 1}
        await aqueue.delete_schedule("s")
        assert await aqueue.list_schedules() == []

    asyncio.run(main())


# ============================================================================
# Time zones and daylight saving time (cron.py: fixed-time jobs as cronie runs them)
# ============================================================================


def ticks(scheduler, start, end, step=timedelta(minutes=10)):
    now = start
    while now <= end:
        scheduler.tick(now)
        now += step


def test_a_berlin_schedule_across_the_spring_forward_day_fires_once_a_day(store, clock):
    queue = Queue(store)
    clock.set(datetime(2024, 3, 29, 12, 0, tzinfo=UTC))
    queue.create_schedule("nightly", "t", {}, "30 2 * * *", timezone="Europe/Berlin")
    ticks(Scheduler(queue), clock.now, datetime(2024, 4, 1, 12, 0, tzinfo=UTC))
    assert due_times(store, "nightly") == [
        datetime(2024, 3, 30, 1, 30, tzinfo=UTC),  # 02:30 CET
        # 2024-03-31 has no 02:30 in Berlin (02:00 CET -> 03:00 CEST): it runs right
        # after the jump, at 03:00 CEST, as cron does.
        datetime(2024, 3, 31, 1, 0, tzinfo=UTC),
        datetime(2024, 4, 1, 0, 30, tzinfo=UTC),  # 02:30 CEST
    ]
    assert len(task_docs(store)) == 3


def test_a_berlin_schedule_across_the_fall_back_day_fires_once_a_day(store, clock):
    queue = Queue(store)
    clock.set(datetime(2024, 10, 25, 12, 0, tzinfo=UTC))
    queue.create_schedule("nightly", "t", {}, "30 2 * * *", timezone="Europe/Berlin")
    ticks(Scheduler(queue), clock.now, datetime(2024, 10, 28, 12, 0, tzinfo=UTC))
    assert due_times(store, "nightly") == [
        datetime(2024, 10, 26, 0, 30, tzinfo=UTC),  # 02:30 CEST
        # 2024-10-27 has 02:30 twice (03:00 CEST -> 02:00 CET): once, at the first one.
        datetime(2024, 10, 27, 0, 30, tzinfo=UTC),
        datetime(2024, 10, 28, 1, 30, tzinfo=UTC),  # 02:30 CET
    ]
    last = Queue(store).get_last_run("nightly")
    assert (last["last_due_at"], last["next_run_at"]) == ("2024-10-28T01:30:00Z", "2024-10-29T01:30:00Z")


def test_a_zone_moves_the_utc_time_of_a_fixed_time_schedule(store, clock):
    queue = Queue(store)
    clock.set(datetime(2024, 3, 30, 0, 0, tzinfo=UTC))
    queue.create_schedule("nine", "t", {}, "0 9 * * *", timezone="Europe/Berlin")
    queue.create_schedule("nine-utc", "t", {}, "0 9 * * *")
    ticks(Scheduler(queue), clock.now, datetime(2024, 4, 1, 0, 0, tzinfo=UTC), step=timedelta(minutes=30))
    assert due_times(store, "nine") == [datetime(2024, 3, 30, 8, 0, tzinfo=UTC),
                                        datetime(2024, 3, 31, 7, 0, tzinfo=UTC)]
    assert due_times(store, "nine-utc") == [datetime(2024, 3, 30, 9, 0, tzinfo=UTC),
                                            datetime(2024, 3, 31, 9, 0, tzinfo=UTC)]


# ============================================================================
# The worker runs the scheduler
# ============================================================================


def run_worker_briefly(worker, until, timeout=5.0):
    """Run the worker in a thread until `until()` is true (or timeout), then stop it."""
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("code", worker.run(install_signal_handlers=False)),
                              daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    try:
        while not until() and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        worker.stop()
        thread.join(10)
    assert not thread.is_alive() and result.get("code") == 0


def test_a_worker_fires_due_schedules_by_default(queue, store, clock):
    assert Worker(queue, "w").scheduler is True
    queue.create_schedule("nine", "greet", {"name": "Ada"}, "0 9 * * *")
    clock.set(at(9, 0, 2))
    done = []
    worker = Worker(queue, "w", monitor=False, heartbeat_interval=0.02, poll_min=0.01, poll_max=0.05)

    @worker.task("greet")
    def greet(input):
        done.append(input["name"])
        return {"hello": input["name"]}

    run_worker_briefly(worker, lambda: done)
    assert done == ["Ada"]
    assert due_times(store, "nine") == [NINE]
    [doc] = task_docs(store)
    assert (doc["status"], doc["output"]) == ("completed", {"hello": "Ada"})


def test_a_worker_with_scheduler_false_fires_nothing(queue, store, clock):
    queue.create_schedule("nine", "greet", {}, "0 9 * * *")
    clock.set(at(9, 0, 2))
    worker = Worker(queue, "w", monitor=False, scheduler=False, heartbeat_interval=0.02, poll_min=0.01,
                    poll_max=0.05)
    worker.task("greet")(lambda input: None)
    started = time.monotonic()
    run_worker_briefly(worker, lambda: time.monotonic() - started > 0.4)
    assert task_docs(store) == [] and queue.get_last_run("nine") is None
