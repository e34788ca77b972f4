"""The command line through `main([...])`: every command on the local
directory store, a few end to end on real S3 servers (moto and SeaweedFS),
bad input (one line on stderr, exit 2, nothing written), and `python -m
buquet` as the same program.

Exit codes: 0 success, 1 the operation failed, 2 bad input (README).
"""

import json
import os
import subprocess
import sys
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from helpers import isolate_environment

import buquet
import sigv4
from buquet import LocalStore, Queue, main, parse_duration, parse_rfc3339, parse_timestamp

ROOT = Path(__file__).resolve().parent.parent
SECRET = "cli-test-secret-do-not-print-0123456789"


# ============================================================================
# Helpers
# ============================================================================


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch, tmp_path):
    """No bucket, profile or user file from the machine running the tests."""
    isolate_environment(monkeypatch, tmp_path)


@pytest.fixture
def store_dir(tmp_path):
    return tmp_path / "store"


@pytest.fixture
def queue(store_dir):
    """A Queue on the same local directory the commands use."""
    return Queue(LocalStore(str(store_dir)))


@pytest.fixture
def cli(capsys, store_dir):
    """cli(*argv) -> (exit code, stdout, stderr) of `buquet --local-dir STORE ...`."""

    def run(*argv):
        code = main(["--local-dir", str(store_dir)] + [str(a) for a in argv])
        captured = capsys.readouterr()
        return code, captured.out, captured.err
    return run


def cli_json(cli, *argv):
    code, out, err = cli(*argv, "--json")
    assert code == 0, err
    return json.loads(out)


def objects_in(store_dir):
    """The object files of a local store (its lock file is not an object)."""
    if not store_dir.exists():
        return []
    return sorted(str(p.relative_to(store_dir)) for p in store_dir.rglob("*") if p.is_file() and p.name != ".lock")


def use_bucket(monkeypatch, target):
    monkeypatch.setenv("S3_BUCKET", target.bucket)
    monkeypatch.setenv("S3_ENDPOINT", target.endpoint)
    monkeypatch.setenv("S3_REGION", target.region)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", target.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", target.secret_key)


def bucket_keys(target):
    client = target.client()
    return [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=target.bucket)
            for o in page.get("Contents", [])]


def s3_queue(target):
    return buquet.connect(bucket=target.bucket, endpoint=target.endpoint, region=target.region,
                          credentials=sigv4.Credentials(target.access_key, target.secret_key), use_config=False)


def clean_subprocess_env(tmp_path, **extra):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("S3_", "BUQUET_", "AWS_", "PYTEST_")) and "proxy" not in k.lower()}
    env.update(PYTHONPATH=str(ROOT), XDG_CONFIG_HOME=str(tmp_path / "xdg"), AWS_EC2_METADATA_DISABLED="true")
    env.update(extra)
    return env


# ============================================================================
# Durations and timestamps
# ============================================================================


@pytest.mark.parametrize("text, seconds", [
    ("30s", 30), ("15m", 900), ("1h", 3600), ("2d", 172800), ("1h30m", 5400), ("90", 90),
    ("2 hours", 7200), ("1 week", 604800), ("1h 30m", 5400), ("1.5h", 5400), ("45 minutes", 2700),
    (" 10s ", 10), ("1w2d", 777600), ("0s", 0),
])
def test_parse_duration_reads_every_documented_spelling(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["1x", "h", "-5m", "", "   ", "1h-5m", "5 fortnights", "1e3", "m30", "1,5h"])
def test_parse_duration_refuses_malformed_durations_naming_them(text):
    with pytest.raises(buquet.UsageError) as info:
        parse_duration(text)
    assert str(info.value) == "expected a duration like 30s, 15m, 1h, 2d or 1h30m, got %r" % text


def test_parse_rfc3339_needs_an_offset_and_a_real_date():
    assert parse_rfc3339("2026-01-28T10:00:00+01:00") == parse_timestamp("2026-01-28T09:00:00Z")
    for bad in ("2026-01-28T09:00:00", "2026-13-01T00:00:00Z", "tomorrow", ""):
        with pytest.raises(buquet.UsageError, match="expected an RFC 3339 timestamp with an offset"):
            parse_rfc3339(bad)


@pytest.fixture
def local_zone():
    """set_zone(zone): make `zone` the process's local time zone for this test."""
    import time

    if not hasattr(time, "tzset"):
        pytest.skip("time.tzset() is POSIX only")
    saved = os.environ.get("TZ")

    def set_zone(zone):
        os.environ["TZ"] = zone
        time.tzset()
    yield set_zone
    if saved is None:
        os.environ.pop("TZ", None)
    else:
        os.environ["TZ"] = saved
    time.tzset()


def test_times_are_shown_in_local_time_with_utc_alongside(local_zone):
    from zoneinfo import ZoneInfo

    nine_utc = parse_timestamp("2026-01-28T09:00:00Z")
    local_zone("UTC")
    assert buquet._when("2026-01-28T09:00:00Z") == "2026-01-28 09:00:00 UTC"
    # An aware time of another zone is converted, not relabelled.
    assert buquet._when(nine_utc.astimezone(ZoneInfo("Europe/Berlin"))) == "2026-01-28 09:00:00 UTC"
    local_zone("Asia/Kolkata")
    assert buquet._when(nine_utc) == "2026-01-28 14:30:00 IST (09:00:00 UTC)"
    assert buquet._when(None) == "-"


# ============================================================================
# submit
# ============================================================================


def test_submit_with_every_flag_prints_the_task_as_json(cli):
    doc = cli_json(cli, "submit", "-t", "report", "-i", '{"day": "2026-01-28"}', "--delay", "1h30m", "--ttl", "2d",
                   "--timeout", "60", "--retries", "2", "--max-reschedules", "4", "--idempotency-key", "r-0128")
    created = parse_timestamp(doc["created_at"])
    assert doc["task_type"] == "report" and doc["input"] == {"day": "2026-01-28"}
    assert doc["status"] == "pending"
    assert parse_timestamp(doc["available_at"]) - created == timedelta(hours=1, minutes=30)
    assert parse_timestamp(doc["expires_at"]) - created == timedelta(days=2)
    assert (doc["timeout_seconds"], doc["max_retries"], doc["max_reschedules"]) == (60, 2, 4)
    # The same idempotency key yields the same task.
    again = cli_json(cli, "submit", "-t", "report", "-i", '{"day": "2026-01-28"}', "--idempotency-key", "r-0128")
    assert again["id"] == doc["id"]


def test_submit_at_and_expires_at_take_rfc3339_times_with_offsets(cli):
    doc = cli_json(cli, "submit", "-t", "report", "--at", "2030-01-28T10:00:00+01:00",
                   "--expires-at", "2030-01-29T09:00:00Z")
    assert parse_timestamp(doc["available_at"]) == parse_timestamp("2030-01-28T09:00:00Z")
    assert parse_timestamp(doc["expires_at"]) == parse_timestamp("2030-01-29T09:00:00Z")


def test_submit_prints_one_line_for_people(cli, queue):
    code, out, err = cli("submit", "-t", "send_email", "-i", '{"to": "user@example.com"}')
    assert code == 0 and err == ""
    task_id, task_type, status, rest = out.split(None, 3)
    assert (task_type, status) == ("send_email", "pending") and rest.startswith("available ")
    assert queue.get(task_id).input == {"to": "user@example.com"}


def test_submit_refuses_delay_together_with_at(cli, store_dir):
    code, out, err = cli("submit", "-t", "a", "--delay", "1h", "--at", "2030-01-01T00:00:00Z")
    assert code == 2 and "not allowed with argument" in err
    assert objects_in(store_dir) == []


# ============================================================================
# Reading tasks: list, get, status, history
# ============================================================================


def test_list_reads_one_shard_or_all_and_filters_by_status_and_type(cli, queue):
    tasks = [queue.submit("a", {"n": n}) for n in range(4)] + [queue.submit("b", {})]
    queue.cancel(tasks[0].id)
    ids = {t.id for t in tasks}

    code, out, err = cli("list")
    assert code == 0 and err == ""
    assert out.splitlines()[0].split() == ["ID", "TYPE", "STATUS", "ATTEMPT", "RETRIES", "UPDATED"]
    assert {line.split()[0] for line in out.splitlines()[1:]} == ids

    shard = tasks[1].shard
    listed = cli_json(cli, "list", shard)
    assert {d["id"] for d in listed} == {t.id for t in tasks if t.shard == shard}
    assert {d["shard"] for d in listed} == {shard}
    assert [d["id"] for d in cli_json(cli, "list", "-s", shard)] == [d["id"] for d in listed]

    assert [d["id"] for d in cli_json(cli, "list", "--status", "cancelled")] == [tasks[0].id]
    assert [d["id"] for d in cli_json(cli, "list", "-t", "b")] == [tasks[4].id]
    assert {d["id"] for d in cli_json(cli, "list", "-t", "a", "--status", "pending")} == {t.id for t in tasks[1:4]}


def test_get_and_status_show_a_task_in_full(cli, queue):
    task = queue.submit("a", {"x": 1})
    code, out, err = cli("get", task.id)
    assert code == 0 and err == ""
    fields = dict(line.split(None, 1) for line in out.splitlines())
    assert fields["id:"] == task.id and fields["status:"] == "pending" and fields["input:"] == '{"x":1}'
    assert fields["created_at:"].endswith("UTC") or "UTC)" in fields["created_at:"]
    assert cli_json(cli, "status", task.id) == task.to_dict()


def test_get_of_an_unknown_task_fails_and_a_malformed_id_is_bad_input(cli):
    missing = str(uuid.uuid4())
    assert cli("get", missing) == (1, "", "buquet: error: task %s not found\n" % missing)
    assert cli("status", "nope") == (2, "", "buquet: error: task id must be a UUID, got 'nope'\n")


def test_history_without_versions_shows_the_current_state_and_says_why(cli, queue):
    task = queue.submit("a", {})
    code, out, err = cli("history", task.id)
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "note: the bucket keeps no object versions: only the current state is known"
    assert lines[1].split() == ["STATUS", "ATTEMPT", "RETRIES", "UPDATED", "ERROR"]
    assert lines[2].split()[:3] == ["pending", "0", "0"]
    data = cli_json(cli, "history", task.id)
    assert data["versioned"] is False and [v["status"] for v in data["versions"]] == ["pending"]


# ============================================================================
# Changing tasks: cancel, replay, archive
# ============================================================================


def test_cancel_by_ids_reports_each_and_exits_1_when_one_fails(cli, queue):
    a, b = queue.submit("a", {}), queue.submit("a", {})
    code, out, err = cli("cancel", a.id, b.id, "-r", "not needed", "-b", "user:alice")
    assert code == 0 and out.splitlines() == ["%s  cancelled" % a.id, "%s  cancelled" % b.id, "2 cancelled, 0 failed"]
    assert queue.get(a.id).cancelled_by == "user:alice"

    c, missing = queue.submit("a", {}), str(uuid.uuid4())
    code, out, err = cli("cancel", c.id, missing, a.id)
    assert code == 1
    assert out.splitlines() == [
        "%s  cancelled" % c.id,
        "error: task %s not found" % missing,
        "error: %s" % buquet.InvalidTransition(a.id, "cancelled", "cancel", ["pending"]),
        "1 cancelled, 2 failed",
    ]


def test_cancel_by_type_cancels_every_pending_task_of_that_type_only(cli, queue):
    reports = [queue.submit("report", {"n": n}) for n in range(3)]
    other = queue.submit("email", {})
    data = cli_json(cli, "cancel", "-t", "report")
    assert sorted(d["id"] for d in data) == sorted(t.id for t in reports)
    assert {queue.get(t.id).status for t in reports} == {"cancelled"}
    assert queue.get(other.id).status == "pending"
    assert cli("cancel") == (2, "", "buquet: error: name task ids to cancel, or a task type with -t\n")


def test_replay_runs_a_failed_task_again_and_archive_files_a_finished_one(cli, queue):
    task = queue.submit("a", {})
    queue.fail(queue.claim_next(worker_id="w-1"), "boom")
    code, out, err = cli("replay", task.id)
    assert (code, out, err) == (0, "%s  pending\n" % task.id, "")
    assert queue.get(task.id).attempt == 0

    code, out, err = cli("archive", task.id)  # pending: not finished
    assert code == 1 and out == ""
    assert err == "buquet: error: %s\n" % buquet.InvalidTransition(
        task.id, "pending", "archive", ["completed", "failed", "cancelled", "expired"])

    queue.complete(queue.claim_next(worker_id="w-1"), {"ok": True})
    assert cli_json(cli, "archive", task.id)["status"] == "archived"


# ============================================================================
# Workers, stats, sweep
# ============================================================================


def test_workers_lists_heartbeats_alive_or_stale(cli, queue):
    now = queue.now()
    for worker_id, age in (("w-fresh", 5), ("w-old", 3600)):
        doc = {"worker_id": worker_id, "last_heartbeat": buquet.format_timestamp(now - timedelta(seconds=age)),
               "shards": ["0", "1"], "current_task": None, "tasks_completed": 7, "tasks_failed": 1}
        queue.store.put(buquet.worker_key(worker_id), json.dumps(doc).encode())
    code, out, err = cli("workers")
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:]}
    assert code == 0 and rows["w-fresh"][1] == "alive" and rows["w-old"][1] == "stale"
    assert rows["w-fresh"][4:] == ["0,1", "-", "7", "1"]
    assert sorted(w["worker_id"] for w in cli_json(cli, "workers")) == ["w-fresh", "w-old"]


def test_stats_counts_ready_scheduled_and_running_per_shard(cli, queue):
    ready = [queue.submit("a", {}) for _ in range(3)]
    queue.submit("a", {}, delay=3600)
    queue.claim(ready[0].id, "w-1")
    data = cli_json(cli, "stats")
    assert set(data) == {"now", "totals", "shards", "oldest_ready_age_seconds", "workers_alive",
                         "workers_registered"}
    assert data["totals"] == {"ready": 2, "scheduled": 1, "running": 1}
    assert sorted(data["shards"]) == list("0123456789abcdef")
    assert data["oldest_ready_age_seconds"] >= 0 and data["workers_alive"] == 0
    full = cli_json(cli, "stats", "--full")
    assert full["totals"]["status:pending"] == 3 and full["totals"]["status:running"] == 1
    code, out, err = cli("stats")
    assert code == 0 and out.splitlines()[-1].startswith("(completed and other finished tasks")
    assert out.splitlines()[-3].startswith("oldest ready task: ") and out.splitlines()[-3].endswith("s waiting")
    assert out.splitlines()[-2] == "workers: 0 alive, 0 registered"


def test_sweep_recreates_a_lost_ready_index_entry(cli, queue):
    task = queue.submit("a", {})
    (ready_key,) = buquet.index_keys(task.doc)
    queue.store.delete(ready_key)
    code, out, err = cli("sweep")
    assert (code, out) == (0, "checked 1, deleted 0, created 1, expired 0, skipped 0\n")
    assert queue.store.get(ready_key) is not None
    assert cli_json(cli, "sweep")["counts"]["created"] == 0


def test_tail_shows_each_change_once_and_nothing_that_did_not_change(capsys, queue, store_dir):
    import threading
    import time

    untouched, cancelled = queue.submit("a", {}), queue.submit("a", {})
    result = {}

    def tail():
        result["code"] = main(["--local-dir", str(store_dir), "tail", "--interval", "0.05s", "--limit", "2",
                               "--json"])
    thread = threading.Thread(target=tail, daemon=True)
    thread.start()
    time.sleep(0.4)  # several looks at an unchanged queue: nothing to show
    queue.cancel(cancelled.id)
    new = queue.submit("b", {})
    thread.join(10)
    assert not thread.is_alive() and result["code"] == 0
    shown = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert sorted((d["id"], d["status"]) for d in shown) == sorted([(cancelled.id, "cancelled"),
                                                                   (new.id, "pending")])
    assert untouched.id not in {d["id"] for d in shown}


# ============================================================================
# config
# ============================================================================


def test_config_commands_never_print_the_secret(cli, tmp_path, monkeypatch, store_dir):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDCLITEST")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    (tmp_path / ".buquet.toml").write_text(
        '[default]\nbucket = "cfg-bucket"\nregion = "eu-west-1"\nmystery = 1\n'
        '[profiles.dev]\nbucket = "dev-bucket"\n')
    seen = []
    for argv in (("config", "show"), ("config", "show", "--json"), ("config", "validate"),
                 ("config", "validate", "--json"), ("config", "paths"), ("config", "paths", "--json")):
        code, out, err = cli(*argv)
        assert code == 0, err
        seen.append(out + err)
    assert not any(SECRET in text for text in seen)
    show = json.loads(seen[1])
    assert show["credentials"] == "environment"
    assert show["settings"]["region"] == {"value": "eu-west-1", "source": str(tmp_path / ".buquet.toml")}
    assert show["settings"]["local_dir"] == {"value": str(store_dir), "source": "--local-dir"}
    validate = json.loads(seen[3])
    assert validate["files"] == [str(tmp_path / ".buquet.toml")]
    assert validate["warnings"] == ["%s: unknown key default.mystery (ignored)" % (tmp_path / ".buquet.toml")]
    assert "warning: %s: unknown key default.mystery (ignored)" % (tmp_path / ".buquet.toml") in seen[2]
    paths = json.loads(seen[5])
    assert [(p["role"], p["exists"]) for p in paths] == [("user", False), ("project", True)]
    assert paths[0]["path"] == str(tmp_path / "xdg" / "buquet" / "config.toml")


# ============================================================================
# schedule
# ============================================================================


def test_schedule_lifecycle_create_list_show_disable_enable_trigger_delete(cli, queue):
    code, out, err = cli("schedule", "create", "daily", "-t", "report", "-c", "0 9 * * *", "--tz", "Europe/Berlin",
                         "-i", '{"kind": "daily"}')
    assert code == 0 and out.startswith("created daily: report '0 9 * * *', next run ")
    # 09:00 in Berlin is 07:00 or 08:00 UTC, never shown as 09:00 UTC.
    assert "09:00:00 UTC" not in out

    code, out, err = cli("schedule", "list")
    assert out.splitlines()[1].split()[:8] == ["daily", "report", "0", "9", "*", "*", "*", "Europe/Berlin"]

    shown = cli_json(cli, "schedule", "show", "daily")
    assert len(shown["next_runs"]) == len(shown["next_runs_utc"]) == 5
    for local, utc in zip(shown["next_runs"], shown["next_runs_utc"]):
        assert local[10:] in ("T09:00:00+01:00", "T09:00:00+02:00")
        assert parse_timestamp(local) == parse_timestamp(utc) and utc.endswith("Z")
    code, out, err = cli("schedule", "show", "daily")
    lines = out.splitlines()
    start = lines.index("next runs (Europe/Berlin, and UTC):")
    assert [line.split() for line in lines[start + 1:]] == [
        [a, b] for a, b in zip(shown["next_runs"], shown["next_runs_utc"])]

    assert cli("schedule", "disable", "daily")[:2] == (0, "daily disabled\n")
    assert cli_json(cli, "schedule", "list")[0]["enabled"] is False
    assert cli("schedule", "enable", "daily")[:2] == (0, "daily enabled\n")

    code, out, err = cli("schedule", "trigger", "daily")
    task_id = out.split()[1]
    assert code == 0 and queue.get(task_id).input == {"kind": "daily"}

    assert cli("schedule", "delete", "daily")[:2] == (0, "daily deleted\n")
    assert cli("schedule", "show", "daily") == (1, "", "buquet: error: no schedule 'daily'\n")
    code, out, err = cli("schedule", "create", "daily", "-t", "x", "-c", "@hourly")
    assert code == 0
    assert cli("schedule", "create", "daily", "-t", "x", "-c", "@hourly") == (
        1, "", "buquet: error: Schedule already exists: daily\n")


# ============================================================================
# worker APP
# ============================================================================

APP = '''
import buquet

queue = buquet.connect()
worker = buquet.Worker(queue, "cli-app", poll_min=0.01, poll_max=0.05, monitor=False, scheduler=False)
not_a_worker = queue


@worker.task("double")
def double(input):
    return {"n": input["n"] * 2}
'''


@pytest.fixture
def app_module(tmp_path, monkeypatch, store_dir):
    """A module with a Worker, importable from the current directory."""
    name = "bqapp_%s" % uuid.uuid4().hex[:8]
    (tmp_path / (name + ".py")).write_text(APP)
    monkeypatch.setenv("BUQUET_LOCAL_DIR", str(store_dir))
    monkeypatch.setattr(sys, "path", list(sys.path))  # _load_app may add the current directory
    yield name
    sys.modules.pop(name, None)


def test_worker_runs_the_handlers_of_the_named_app_until_drained(cli, queue, app_module):
    tasks = [queue.submit("double", {"n": n}) for n in range(3)]
    code, out, err = cli("worker", app_module + ":worker", "--drain", "--concurrency", "2")
    assert code == 0, err
    assert err.startswith("buquet: worker cli-app on LocalStore(")
    assert err.rstrip().endswith("handlers: double")
    assert [(queue.get(t.id).status, queue.get(t.id).output) for t in tasks] == [
        ("completed", {"n": 0}), ("completed", {"n": 2}), ("completed", {"n": 4})]


@pytest.mark.parametrize("spec, message", [
    ("not a spec!", "expected module:attribute like myapp.tasks:worker, got 'not a spec!'"),
    ("no_such_module_bq:worker", "cannot import no_such_module_bq: No module named 'no_such_module_bq'"),
    ("{app}:not_a_worker", "{app}:not_a_worker must name a buquet.Worker, got Queue"),
    ("{app}:missing", "{app} has no attribute missing"),
])
def test_worker_with_a_bad_app_is_one_line_and_exit_2(cli, app_module, spec, message):
    assert cli("worker", spec.format(app=app_module)) == (2, "", "buquet: error: %s\n" % message.format(
        app=app_module))


# ============================================================================
# Bad input: one line, exit 2, nothing written
# ============================================================================

# Whole messages: what was given and what was expected, on one line.
DURATION = "expected a duration like 30s, 15m, 1h, 2d or 1h30m, got %r"
RFC3339 = ("expected an RFC 3339 timestamp with an offset, like 2026-01-28T09:00:00Z or 2026-01-28T10:00:00+01:00, "
           "got %r")
NAME = "%s must be a non-empty string without '/' or control characters, got %r"
SHARD = "shard must be one of 0..f, got %r"
NOT_UUID = "task id must be a UUID, got %r"
BAD_JSON = "--input must be JSON, got %r (%s)"
CREATE = ["schedule", "create", "s", "-t", "a", "-c"]

BAD_INPUT = [
    # durations
    (["submit", "-t", "a", "--delay", "1x"], DURATION % "1x"),
    (["submit", "-t", "a", "--delay", "h"], DURATION % "h"),
    (["submit", "-t", "a", "--delay=-5m"], DURATION % "-5m"),
    (["submit", "-t", "a", "--delay", ""], DURATION % ""),
    (["submit", "-t", "a", "--delay", "1e999"], DURATION % "1e999"),
    (["submit", "-t", "a", "--delay", "99999999999999999999d"],
     "delay must be at most 3153600000 seconds (100 years), got 8.64e+24"),
    (["submit", "-t", "a", "--ttl", "2 fortnights"], DURATION % "2 fortnights"),
    (["submit", "-t", "a", "--ttl", ""], DURATION % ""),
    (["submit", "-t", "a", "--ttl", "0s"],
     "ttl must be positive (a TTL in the past expires the task at once), got 0.0"),
    (["tail", "--interval", "1x"], DURATION % "1x"),
    (["tail", "--interval=-1s"], DURATION % "-1s"),
    (["tail", "--interval", ""], DURATION % ""),
    (["schedule", "run", "--interval", "1x"], DURATION % "1x"),
    # timestamps
    (["submit", "-t", "a", "--at", "2026-01-28T09:00:00"], RFC3339 % "2026-01-28T09:00:00"),
    (["submit", "-t", "a", "--at", "2026-13-01T00:00:00Z"], RFC3339 % "2026-13-01T00:00:00Z"),
    (["submit", "-t", "a", "--at", "2026-02-30T09:00:00Z"], RFC3339 % "2026-02-30T09:00:00Z"),
    (["submit", "-t", "a", "--at", "yesterday"], RFC3339 % "yesterday"),
    (["submit", "-t", "a", "--at", "9999-12-31T23:59:59-01:00"], RFC3339 % "9999-12-31T23:59:59-01:00"),
    # An offset's minutes run to 59 and its hours to 23 (RFC 3339; chrono refuses the rest too).
    (["submit", "-t", "a", "--at", "2026-01-28T09:00:00+01:60"], RFC3339 % "2026-01-28T09:00:00+01:60"),
    (["submit", "-t", "a", "--at", "2026-01-28T09:00:00+25:00"], RFC3339 % "2026-01-28T09:00:00+25:00"),
    (["submit", "-t", "a", "--expires-at", "soon"], RFC3339 % "soon"),
    (["submit", "-t", "a", "--expires-at", ""], RFC3339 % ""),
    (["submit", "-t", "a", "--expires-at", "2000-01-01T00:00:00Z"], "expires_at is in the past: 2000-01-01T00:00:00Z"),
    # JSON (a task's input may be any JSON value: no top-level type is required)
    (["submit", "-t", "a", "-i", "{bad"],
     BAD_JSON % ("{bad", "Expecting property name enclosed in double quotes: line 1 column 2 (char 1)")),
    (["submit", "-t", "a", "-i", '{"a": 1} trailing'],
     BAD_JSON % ('{"a": 1} trailing', "Extra data: line 1 column 10 (char 9)")),
    (["submit", "-t", "a", "-i", ""], BAD_JSON % ("", "Expecting value: line 1 column 1 (char 0)")),
    (["submit", "-t", "a", "-i", "NaN"], "input: nan at input is not valid JSON"),
    (["submit", "-t", "a", "-i", '{"a": 1e999}'], "input: inf at input['a'] is not valid JSON"),
    (["submit", "-t", "a", "-i", '{"a": 99999999999999999999999}'],
     "input: integer out of the 64-bit range at input['a']"),
    (CREATE + ["0 9 * * *", "-i", "{bad"],
     BAD_JSON % ("{bad", "Expecting property name enclosed in double quotes: line 1 column 2 (char 1)")),
    (CREATE + ["@hourly", "-i", "NaN"], "input: nan at input is not valid JSON"),
    # integers out of range
    (["submit", "-t", "a", "--retries=-1"], "max_retries must be an integer 0..4294967295, got -1"),
    (["submit", "-t", "a", "--retries", "99999999999"],
     "max_retries must be an integer 0..4294967295, got 99999999999"),
    (["submit", "-t", "a", "--timeout", "0"], "timeout must be an integer 1..18446744073709551615, got 0"),
    (["submit", "-t", "a", "--max-reschedules=-1"], "max_reschedules must be an integer 0..4294967295, got -1"),
    (["list", "--limit", "0"], "limit must be an integer 1..1000000000, got 0"),
    (CREATE + ["@hourly", "--timeout", "0"], "timeout must be an integer 1..18446744073709551615, got 0"),
    (CREATE + ["@hourly", "--retries=-1"], "max_retries must be an integer 0..4294967295, got -1"),
    (["serve", "--port", "70000"], "--port must be 0..65535, got 70000"),
    (["serve", "--port=-1"], "--port must be 0..65535, got -1"),
    # names
    (["submit", "-t", "a/b"], NAME % ("task_type", "a/b")),
    (["submit", "-t", ""], NAME % ("task_type", "")),
    (["submit", "-t", "a\nb"], NAME % ("task_type", "a\nb")),
    (["submit", "-t", "a", "--idempotency-key", ""], "idempotency_key must be a non-empty string, got ''"),
    (["schedule", "create", "a/b", "-t", "a", "-c", "@hourly"], NAME % ("schedule id", "a/b")),
    (["schedule", "create", "s", "-t", "", "-c", "@hourly"], NAME % ("task_type", "")),
    # shards
    (["list", "g"], SHARD % "g"),
    (["list", "00"], SHARD % "00"),
    (["list", "0,,1"], SHARD % "0,,1"),
    (["list", "-s", "g"], SHARD % "g"),
    (["list", ""], SHARD % ""),
    (["list", "-s", ""], SHARD % ""),
    # task ids
    (["get", "not-a-uuid"], NOT_UUID % "not-a-uuid"),
    (["history", "nope"], NOT_UUID % "nope"),
    (["replay", "nope"], NOT_UUID % "nope"),
    (["archive", "nope"], NOT_UUID % "nope"),
    (["cancel", "not-a-uuid"], NOT_UUID % "not-a-uuid"),
    # A good id before a bad one: nothing is cancelled.
    (["cancel", "00000000-0000-4000-8000-000000000000", "nope"], NOT_UUID % "nope"),
    # schedule ids: no schedule can have such an id, so it is bad input, not "no schedule"
    (["schedule", "show", "a/b"], NAME % ("schedule id", "a/b")),
    (["schedule", "show", ""], NAME % ("schedule id", "")),
    (["schedule", "delete", "a/b"], NAME % ("schedule id", "a/b")),
    (["schedule", "trigger", "a/b"], NAME % ("schedule id", "a/b")),
    (["schedule", "disable", "a/b"], NAME % ("schedule id", "a/b")),
    # cron expressions and time zones
    (CREATE + ["61 * * * *"], "bad minute field '61' in '61 * * * *': expected 0-59"),
    (CREATE + ["* * *"], "bad cron expression '* * *': expected 5 fields (minute hour day-of-month month day-of-week) "
                         "or a macro such as @daily, got 3 fields"),
    (CREATE + ["*/0 * * * *"], "bad minute field '*/0' in '*/0 * * * *': step must be 1-59"),
    (CREATE + [""], "bad cron expression '': expected 5 fields (minute hour day-of-month month day-of-week) or a "
                    "macro such as @daily, got nothing"),
    (CREATE + ["0 9 * * *", "--tz", "Mars/Olympus"], "bad time zone 'Mars/Olympus': not an IANA time zone name such "
                                                      "as 'Europe/Berlin' (without /usr/share/zoneinfo, install the "
                                                      "tzdata package)"),
    (CREATE + ["0 9 * * *", "--tz", ""], "bad time zone '': not an IANA time zone name such as 'Europe/Berlin' "
                                         "(without /usr/share/zoneinfo, install the tzdata package)"),
    # demo: nothing is submitted for a count or a time limit that cannot work
    (["demo", "--tasks", "0"], "--tasks must be at least 1, got 0"),
    (["demo", "--tasks=-3"], "--tasks must be at least 1, got -3"),
    # global options: an empty value is a mistake (an unset variable), never "use the default"
    (["--local-dir", "", "submit", "-t", "a"], "--local-dir must not be empty"),
    (["--bucket", "", "submit", "-t", "a"], "--bucket must not be empty"),
    (["--config", "", "submit", "-t", "a"], "--config must not be empty"),
    (["--config", "missing.toml", "submit", "-t", "a"], "config file missing.toml does not exist"),
    (["--bucket", "b", "--endpoint", "ftp://x", "submit", "-t", "a"],
     "endpoint must be an http:// or https:// URL, got 'ftp://x'"),
    (["--bucket", "b", "--endpoint", "http://127.0.0.1:abc", "submit", "-t", "a"],
     "bad port in URL 'http://127.0.0.1:abc'"),
    (["--bucket", "b", "--endpoint", "http://127.0.0.1:99999", "submit", "-t", "a"],
     "bad port in URL 'http://127.0.0.1:99999'"),
]


def _case_id(argv):
    return " ".join(repr(a) if not a or " " in a or "\n" in a else a for a in argv)


@pytest.mark.parametrize("argv, message", BAD_INPUT, ids=[_case_id(a) for a, _ in BAD_INPUT])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(cli, store_dir, tmp_path, monkeypatch, argv, message):
    # Credentials, so that a bucket given here fails on its input, not on a missing key.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDCLITEST")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    assert cli(*argv) == (2, "", "buquet: error: %s\n" % message)
    assert objects_in(store_dir) == [] and objects_in(tmp_path / ".buquet") == []


@pytest.mark.parametrize("text", ["[" * 100000, "[" * 5000 + "]" * 5000], ids=["unclosed", "balanced"])
def test_input_nested_too_deeply_is_one_line_exit_2(cli, store_dir, text):
    """json.loads raises RecursionError (not a ValueError) for deep nesting,
    or, on Python 3.13, reads it and leaves checking and writing it to hit
    the recursion limit."""
    for argv in (["submit", "-t", "a", "-i", text], CREATE + ["@hourly", "-i", text]):
        code, out, err = cli(*argv)
        assert (code, out) == (2, ""), err[-300:]
        assert err == "buquet: error: --input must be JSON, got %r (nested too deeply)\n" % (text[:20] + "...")
    assert objects_in(store_dir) == []


WORKER_BAD_OPTIONS = [
    (["--concurrency", "0"], "concurrency must be an integer 1..1024, got 0"),
    (["--concurrency=-1"], "concurrency must be an integer 1..1024, got -1"),
    (["--max-tasks", "0"], "max_tasks must be an integer 1..1000000000000, got 0"),
    (["--max-tasks=-1"], "max_tasks must be an integer 1..1000000000000, got -1"),
    (["--shards", "g"], SHARD % "g"),
    (["--shards", "00"], SHARD % "00"),
    (["--shards", ","], "expected shards like 0,1,2,3, got ','"),
    (["--shards", ""], "expected shards like 0,1,2,3, got ''"),
    (["--shards", "0,,1"], "expected shards like 0,1,2,3, got '0,,1'"),
    (["--grace-period", "5x"], DURATION % "5x"),
    (["--grace-period", ""], DURATION % ""),
    (["--poll-min", "0s"], "poll interval bounds must satisfy 0 < poll_min <= poll_max, got 0.0 and 0.05"),
    (["--poll-min", ""], DURATION % ""),
    (["--poll-max", ""], DURATION % ""),
    (["--poll-min", "3s", "--poll-max", "1s"],
     "poll interval bounds must satisfy 0 < poll_min <= poll_max, got 3.0 and 1.0"),
    (["--id", "a/b"], NAME % ("worker_id", "a/b")),
    (["--id", ""], NAME % ("worker_id", "")),
]


@pytest.mark.parametrize("option, message", WORKER_BAD_OPTIONS, ids=[_case_id(o) for o, _ in WORKER_BAD_OPTIONS])
def test_worker_with_a_bad_option_is_one_line_exit_2_and_does_not_run(cli, queue, store_dir, app_module, option,
                                                                      message):
    # --drain: should the option be taken, the worker exits instead of running on.
    task = queue.submit("double", {"n": 1})
    before = objects_in(store_dir)
    assert cli("worker", app_module + ":worker", "--drain", *option) == (2, "", "buquet: error: %s\n" % message)
    assert objects_in(store_dir) == before and queue.get(task.id).status == "pending"


class _Looping(Exception):
    """Raised where a command would loop on: it took the bad value."""


WOULD_LOOP = [
    (["tail", "--limit", "0"], "--limit must be at least 1, got 0", "_list_with_etags"),
    (["tail", "--limit=-1"], "--limit must be at least 1, got -1", "_list_with_etags"),
    (["tail", "--interval", "0s"], "--interval must be more than 0s, got '0s'", "_list_with_etags"),
    (["schedule", "run", "--interval", "0s"], "--interval must be more than 0s, got '0s'", "Scheduler.run"),
    (["demo", "--timeout", "0"], "--timeout must be a positive number of seconds, got 0.0", "Worker.run"),
    (["demo", "--timeout=-1"], "--timeout must be a positive number of seconds, got -1.0", "Worker.run"),
    (["demo", "--timeout", "nan"], "--timeout must be a positive number of seconds, got nan", "Worker.run"),
]


@pytest.mark.parametrize("argv, message, loop", WOULD_LOOP, ids=[_case_id(a) for a, _, _ in WOULD_LOOP])
def test_values_that_would_loop_or_hang_are_refused_first(cli, store_dir, monkeypatch, argv, message, loop):
    """tail --limit 0 would follow forever, --interval 0s polls the bucket
    without pause, and a demo worker stopped before it starts runs forever."""
    def looping(*args, **kwargs):
        raise _Looping(" ".join(argv))
    owner, _, name = loop.rpartition(".")
    monkeypatch.setattr(getattr(buquet, owner) if owner else buquet, name, looping)
    assert cli(*argv) == (2, "", "buquet: error: %s\n" % message)
    assert objects_in(store_dir) == []


@pytest.mark.parametrize("argv, named, prog", [
    (["list", "--status", "done"], ("--status", "invalid choice: 'done'"), "buquet list"),
    (["submit", "-t", "a", "--timeout", "ten"], ("--timeout", "invalid int value: 'ten'"), "buquet submit"),
    (["config", "edit"], ("action", "invalid choice: 'edit'"), "buquet config"),
    (["frobnicate"], ("COMMAND", "invalid choice: 'frobnicate'"), "buquet"),
    (["submit"], ("arguments are required", "--task-type"), "buquet submit"),
])
def test_argument_errors_are_one_line_naming_the_value_and_exit_2(cli, store_dir, argv, named, prog):
    # (argparse's wording differs a little between Python versions)
    code, out, err = cli(*argv)
    assert (code, out) == (2, "")
    assert err.startswith("buquet: error: argument" if named[0] != "arguments are required" else "buquet: error: ")
    assert all(part in err for part in named) and err.endswith(" (see: %s --help)\n" % prog), err
    assert err.count("\n") == 1
    assert objects_in(store_dir) == []


def test_debug_shows_the_traceback(store_dir):
    with pytest.raises(buquet.UsageError, match="got '1x'"):
        main(["--debug", "--local-dir", str(store_dir), "submit", "-t", "a", "--delay", "1x"])


# ============================================================================
# On real S3 servers
# ============================================================================


def test_commands_end_to_end_on_a_bucket(s3, cli, capsys, monkeypatch, store_dir):
    use_bucket(monkeypatch, s3)

    def run(*argv):
        code = main([str(a) for a in argv])
        captured = capsys.readouterr()
        assert SECRET not in captured.out + captured.err
        return code, captured.out, captured.err

    code, out, err = run("submit", "-t", "email", "-i", '{"to": "a@example.com"}', "--json")
    assert code == 0 and err == "", err
    task = json.loads(out)
    assert bucket_keys(s3) == sorted([buquet.task_key(task["shard"], task["id"])] + buquet.index_keys(task))
    code, out, err = run("list", "--json")
    assert [d["id"] for d in json.loads(out)] == [task["id"]]
    code, out, err = run("get", task["id"], "--json")
    assert json.loads(out)["input"] == {"to": "a@example.com"}
    assert json.loads(run("stats", "--json")[1])["totals"] == {"ready": 1}
    code, out, err = run("cancel", "-t", "email")
    assert code == 0 and out.splitlines()[-1] == "1 cancelled, 0 failed"
    code, out, err = run("history", task["id"], "--json")
    assert [v["status"] for v in json.loads(out)["versions"]] == ["cancelled"]
    # Bad input writes nothing to the bucket either.
    before = bucket_keys(s3)
    for argv in (["submit", "-t", "x", "--delay", "1x"], ["submit", "-t", "x", "-i", "{bad"],
                 ["schedule", "create", "s", "-t", "x", "-c", "61 * * * *"]):
        code, out, err = run(*argv)
        assert code == 2 and err.startswith("buquet: error: ") and err.count("\n") == 1
    assert bucket_keys(s3) == before
    assert objects_in(store_dir) == []  # and the local store was never used


def test_a_bucket_name_with_a_slash_is_bad_input_and_writes_nothing(s3, capsys, monkeypatch):
    """With path-style addressing `bucket/sub` would put every key under
    sub/ in `bucket`, where no listing of the queue finds it."""
    use_bucket(monkeypatch, s3)
    name = s3.bucket + "/sub"
    assert main(["--bucket", name, "submit", "-t", "a"]) == 2
    assert capsys.readouterr() == ("", "buquet: error: bucket must be a bucket name without '/', spaces or control "
                                       "characters, got %r\n" % name)
    assert bucket_keys(s3) == []


@pytest.mark.versioned
def test_history_on_a_versioned_bucket_shows_every_version_newest_first(s3, capsys, monkeypatch):
    use_bucket(monkeypatch, s3)
    queue = s3_queue(s3)
    task = queue.submit("a", {})
    queue.complete(queue.claim(task.id, "w-1"), {"ok": True})
    assert main(["history", task.id, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["versioned"] is True and data["note"] is None
    assert [v["status"] for v in data["versions"]] == ["completed", "running", "pending"]


# ============================================================================
# python -m buquet
# ============================================================================


def test_python_dash_m_buquet_is_the_same_program(tmp_path):
    env = clean_subprocess_env(tmp_path)
    store = str(tmp_path / "pm-store")

    def run(*argv):
        return subprocess.run([sys.executable, "-m", "buquet", "--local-dir", store] + list(argv),
                              cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=60)

    submitted = run("submit", "-t", "hello", "-i", '{"n": 1}', "--json")
    assert submitted.returncode == 0 and submitted.stderr == ""
    task_id = json.loads(submitted.stdout)["id"]
    listed = run("list", "--json")
    assert [d["id"] for d in json.loads(listed.stdout)] == [task_id]

    bad = run("submit", "-t", "a", "--delay", "1x")
    assert (bad.returncode, bad.stderr) == (2, "buquet: error: expected a duration like 30s, 15m, 1h, 2d or "
                                                "1h30m, got '1x'\n")
    debug = run("--debug", "submit", "-t", "a", "--delay", "1x")
    assert debug.returncode == 1 and "Traceback (most recent call last)" in debug.stderr
    assert debug.stderr.rstrip().splitlines()[-1].startswith("buquet.UsageError: expected a duration")
