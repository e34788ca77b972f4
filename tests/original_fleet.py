"""Drive the original buquet (PyPI `buquet` 0.1.0, Rust core + PyO3) for the
mixed-fleet tests (tests/test_mixed_fleet.py).

This script runs under the *original's* interpreter (Python 3.12, in a venv
with `buquet==0.1.0` installed), never under ours: it imports the original's
`buquet` package.  The bucket comes from the environment the original reads
(S3_ENDPOINT, S3_BUCKET, S3_REGION, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY).

    python -I original_fleet.py ops      < ops.json      # a JSON list of operations
    python -I original_fleet.py worker   < worker.json   # run a worker

(-I keeps the current directory, which may hold our buquet.py, off sys.path.)

`ops`: each operation is an object {"op": NAME, ...arguments}; the script
prints one JSON line per operation, {"ok": result} or {"error": "Type: msg"},
in order (one process, one connect, many calls: a process costs ~0.3 s).

    submit            task_type, input, n (default 1), and the original's
                      submit options (timeout_seconds, max_retries,
                      retry_policy as a dict, idempotency_key,
                      idempotency_scope, idempotency_ttl_days,
                      max_reschedules, ttl_seconds, use_payload_refs,
                      payload_ref_threshold_bytes): a list of tasks
    get               task_id: the task or null
    history           task_id: the versions, newest first
    list              shard, status (optional), limit
    cancel            task_id, reason, cancelled_by
    request_cancellation   task_id
    mark_expired      task_id
    create_schedule   id, task_type, input, cron, timeout_seconds, max_retries
    get_schedule      id
    list_schedules
    get_schedule_last_run  id
    trigger_schedule  id
    enable_schedule / disable_schedule / delete_schedule   id
    now

A task is printed as the original's `Task.to_dict()` plus `retry_policy`
(which to_dict leaves out); timestamps are then the original's rendering
(`+00:00`), not the stored text: the tests read the stored documents
themselves with boto3.

`worker`: {"worker_id", "handlers": {task_type: behaviour}, "max_tasks",
"seconds", "stop_file", "poll_ms", "monitor": bool, "monitor_check_s",
"sweep_s"}.  It stops after max_tasks claims (the original's own stop, which
also deregisters it), or when `seconds` have passed or `stop_file` exists
(then its run() is cancelled: only safe while no handler runs).
Prints JSON event lines: {"event": "ready"}, {"event": "started", "task_id",
"task_type"} when a handler starts, {"event": "done", "task_id", "outcome"}
when it returns or raises, and {"event": "stopped", "why": "max_tasks" |
"seconds" | "stop_file", "result": ...} at the end.  Behaviours:

    "echo"          returns {"by": "original", "worker": id, "input": input}
    "retryable"     raises RetryableError("original refuses")
    "permanent"     raises PermanentError("original gives up")
    "value_error"   raises ValueError("original bad input")
    {"sleep": s}    sleeps s seconds, then echoes (the kill tests)
    "wait_cancel"   refreshes and polls is_cancellation_requested() every
                    0.1 s (up to 20 s) and returns {"by": "original",
                    "saw_cancel": true/false}
"""

import asyncio
import json
import os
import sys
import time

import buquet


def emit(obj):
    sys.stdout.write(json.dumps(obj, sort_keys=True) + "\n")
    sys.stdout.flush()


def task_dict(task):
    if task is None:
        return None
    d = task.to_dict()
    p = task.retry_policy
    d["retry_policy"] = {
        "initial_interval_ms": p.initial_interval_ms, "max_interval_ms": p.max_interval_ms,
        "multiplier": p.multiplier, "jitter_percent": p.jitter_percent,
    }
    d["status"] = str(task.status)
    return d


def schedule_dict(s):
    if s is None:
        return None
    d = s.to_dict()
    d.update(id=s.id, task_type=s.task_type, input=s.input, cron=s.cron, enabled=s.enabled,
             timeout_seconds=s.timeout_seconds, max_retries=s.max_retries,
             created_at=s.created_at, updated_at=s.updated_at)
    return d


SUBMIT_OPTIONS = ("timeout_seconds", "max_retries", "idempotency_key", "idempotency_scope",
                  "idempotency_ttl_days", "max_reschedules", "ttl_seconds", "use_payload_refs",
                  "payload_ref_threshold_bytes")


async def run_op(q, op):
    name = op["op"]
    if name == "submit":
        kwargs = {k: op[k] for k in SUBMIT_OPTIONS if k in op}
        if "retry_policy" in op:
            kwargs["retry_policy"] = buquet.RetryPolicy(**op["retry_policy"])
        out = []
        for _ in range(op.get("n", 1)):
            out.append(task_dict(await q.submit(op["task_type"], op.get("input"), **kwargs)))
        return out
    if name == "get":
        return task_dict(await q.get(op["task_id"]))
    if name == "history":
        return [task_dict(t) for t in await q.get_history(op["task_id"])]
    if name == "list":
        status = getattr(buquet.TaskStatus, op["status"].capitalize()) if op.get("status") else None
        return [task_dict(t) for t in await q.list(op["shard"], status, op.get("limit", 100))]
    if name == "cancel":
        return task_dict(await q.cancel(op["task_id"], op.get("reason"), op.get("cancelled_by")))
    if name == "request_cancellation":
        return task_dict(await q.request_cancellation(op["task_id"]))
    if name == "mark_expired":
        return task_dict(await q.mark_expired(op["task_id"]))
    if name == "create_schedule":
        return schedule_dict(await q.create_schedule(
            op["id"], op["task_type"], op.get("input"), op["cron"],
            op.get("timeout_seconds"), op.get("max_retries")))
    if name == "get_schedule":
        return schedule_dict(await q.get_schedule(op["id"]))
    if name == "list_schedules":
        return [schedule_dict(s) for s in await q.list_schedules()]
    if name == "get_schedule_last_run":
        r = await q.get_schedule_last_run(op["id"])
        if r is None:
            return None
        return {"schedule_id": r.schedule_id, "last_run_at": r.last_run_at,
                "last_task_id": r.last_task_id, "next_run_at": r.next_run_at}
    if name == "trigger_schedule":
        return task_dict(await q.trigger_schedule(op["id"]))
    if name in ("enable_schedule", "disable_schedule", "delete_schedule"):
        await getattr(q, name)(op["id"])
        return True
    if name == "now":
        return await q.now()
    raise ValueError("unknown op %r" % name)


async def ops(spec):
    q = await buquet.connect()
    for op in spec:
        try:
            emit({"ok": await run_op(q, op)})
        except Exception as exc:  # reported to the test, which decides
            emit({"error": "%s: %s" % (type(exc).__name__, exc)})


def make_handler(worker_id, task_type, behaviour):
    async def handler(input, ctx):
        task_id = ctx.task_id
        emit({"event": "started", "task_id": task_id, "task_type": task_type})
        outcome = "returned"
        try:
            if behaviour == "echo":
                return {"by": "original", "worker": worker_id, "input": input}
            if behaviour == "retryable":
                outcome = "raised"
                raise buquet.RetryableError("original refuses")
            if behaviour == "permanent":
                outcome = "raised"
                raise buquet.PermanentError("original gives up")
            if behaviour == "value_error":
                outcome = "raised"
                raise ValueError("original bad input")
            if behaviour == "wait_cancel":
                deadline = time.monotonic() + 20
                while time.monotonic() < deadline:
                    await ctx.refresh()
                    if await ctx.is_cancellation_requested():
                        return {"by": "original", "saw_cancel": True}
                    await asyncio.sleep(0.1)
                return {"by": "original", "saw_cancel": False}
            if isinstance(behaviour, dict) and "sleep" in behaviour:
                await asyncio.sleep(behaviour["sleep"])
                return {"by": "original", "worker": worker_id, "input": input, "slept": behaviour["sleep"]}
            raise ValueError("unknown behaviour %r" % (behaviour,))
        finally:
            emit({"event": "done", "task_id": task_id, "outcome": outcome})
    return handler


async def worker(spec):
    q = await buquet.connect()
    w = buquet.Worker(q, spec["worker_id"], q.all_shards())
    for task_type, behaviour in spec["handlers"].items():
        w.task(task_type)(make_handler(spec["worker_id"], task_type, behaviour))
    options = buquet.WorkerRunOptions(
        poll_interval_ms=spec.get("poll_ms", 100),
        max_tasks=spec.get("max_tasks"),
        with_monitor=spec.get("monitor", False),
        monitor_check_interval_s=spec.get("monitor_check_s", 30),
        monitor_sweep_interval_s=spec.get("sweep_s", 300),
    )
    emit({"event": "ready"})
    # run() returns only after max_tasks; "seconds" and "stop_file" end it
    # from outside by cancelling it, which the tests do only while it idles.
    run = asyncio.ensure_future(w.run(options))
    deadline = time.monotonic() + spec.get("seconds", 30)
    stop_file = spec.get("stop_file")
    why = None
    while why is None:
        done, _ = await asyncio.wait({run}, timeout=0.05)
        if done:
            emit({"event": "stopped", "why": "max_tasks", "result": run.result()})
            return
        if stop_file and os.path.exists(stop_file):
            why = "stop_file"
        elif time.monotonic() >= deadline:
            why = "seconds"
    run.cancel()
    try:
        await run
    except asyncio.CancelledError:
        pass
    emit({"event": "stopped", "why": why, "result": None})


def main(argv):
    spec = json.loads(sys.stdin.read() or "null")
    if argv[1:] == ["ops"]:
        asyncio.run(ops(spec))
    elif argv[1:] == ["worker"]:
        asyncio.run(worker(spec))
    else:
        sys.stderr.write(__doc__)
        return 2
    return 0


if __name__ == "__main__":
    code = main(sys.argv)
    sys.stdout.flush()
    sys.stderr.flush()
    # Not sys.exit: the original's extension aborts (SIGABRT, exit 134, no
    # message) during interpreter shutdown in about a third of the runs,
    # after its work is done.  Leave without finalization.
    os._exit(code)
