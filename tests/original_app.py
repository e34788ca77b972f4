"""Drive the original buquet (PyPI `buquet` 0.1.0, Rust core, Python 3.12) from the tests.

    <venv>/bin/python -I tests/original_app.py '[["create", "daily", "report", {}, "0 9 * * *"], ...]'

Run it with the interpreter of a venv where the original is installed, with `-I` and
from a directory without a buquet.py (the port must not shadow the original). The
bucket comes from the environment, as for any program of the original: S3_ENDPOINT,
S3_BUCKET, S3_REGION, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (the original needs
bucket versioning enabled).

The argument is a JSON list of commands, run in order on one connection:

    ["create", id, task_type, input, cron]              + optional timeout_seconds, max_retries
    ["get", id]         ["list"]         ["last_run", id]
    ["enable", id]      ["disable", id]  ["delete", id]  ["trigger", id]
    ["get_task", task_id]

It prints one JSON list with a result per command: a schedule, last run or task as a
dict (None as null), a list of schedules, null for commands without a result, or
{"error": "<exception type>: <message>"} when the original raised.
"""

import asyncio
import json
import os
import sys


def _plain(value):
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if value == ():  # what a Rust method returning nothing gives (delete_schedule)
        return None
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if hasattr(value, "last_run_at"):  # ScheduleLastRun has no to_dict
        return {name: getattr(value, name)
                for name in ("schedule_id", "last_run_at", "last_task_id", "next_run_at")}
    return repr(value)


async def main(commands):
    import buquet

    if not hasattr(buquet, "ScheduleLastRun"):
        raise SystemExit("original_app.py: this is not the original buquet: %s" % buquet.__file__)
    queue = await buquet.connect()
    calls = {
        "create": lambda *a: queue.create_schedule(*a),
        "get": queue.get_schedule,
        "list": queue.list_schedules,
        "last_run": queue.get_schedule_last_run,
        "enable": queue.enable_schedule,
        "disable": queue.disable_schedule,
        "delete": queue.delete_schedule,
        "trigger": queue.trigger_schedule,
        "get_task": queue.get,
    }
    results = []
    for name, *args in commands:
        try:
            results.append(_plain(await calls[name](*args)))
        except Exception as exc:  # reported to the test, which decides
            results.append({"error": "%s: %s" % (type(exc).__name__, exc)})
    return results


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(json.loads(sys.argv[1])))), flush=True)
    # Leave without interpreter finalization: the original's Rust runtime sometimes
    # aborts (SIGABRT, no message) while Python tears down around its threads.
    os._exit(0)
