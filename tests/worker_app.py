"""A small worker program for the tests that need a worker in its own process
(signals, kill -9, many processes).

    python tests/worker_app.py [--worker-id ID] [--shards 0,1,2] [--concurrency N]
        [--grace-period S] [--poll-max S] [--monitor-interval S]
        [--heartbeat-interval S] [--no-monitor] [--drain] [--max-tasks N]
        [--out DIR] [--async]

The bucket comes from the environment (S3_BUCKET, S3_ENDPOINT, S3_REGION,
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY), as for any buquet program.  Every
option has an environment twin (WORKER_APP_CONCURRENCY, ...).

Handlers (each leaves a trace under --out, default $WORKER_APP_OUT or .):

    record   appends "task_id,attempt,pid" to {out}/{pid}.log, sleeps
             input["sleep"] seconds if given, returns {"pid": pid}
    sleep    writes {out}/started-{task_id}-{attempt}, sleeps input["seconds"],
             returns {"attempt": attempt, "pid": pid}
    echo     returns its input

When the worker has started it prints "ready {pid}" on stdout; when run()
returns it prints "stopped {code}" and exits with that code.
"""

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import buquet  # noqa: E402


def _env(name, default=None):
    return os.environ.get("WORKER_APP_" + name.upper().replace("-", "_"), default)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worker-id", default=_env("worker_id"))
    p.add_argument("--shards", default=_env("shards"), help="comma-separated; default: all")
    p.add_argument("--concurrency", type=int, default=int(_env("concurrency", "1")))
    p.add_argument("--grace-period", type=float, default=float(_env("grace_period", "30")))
    p.add_argument("--poll-max", type=float, default=float(_env("poll_max", "0.2")))
    p.add_argument("--monitor-interval", type=float, default=float(_env("monitor_interval", "60")))
    p.add_argument("--heartbeat-interval", type=float, default=float(_env("heartbeat_interval", "30")))
    p.add_argument("--no-monitor", action="store_true", default=_env("no_monitor") == "1")
    p.add_argument("--drain", action="store_true", default=_env("drain") == "1")
    p.add_argument("--max-tasks", type=int, default=int(_env("max_tasks", "0")) or None)
    p.add_argument("--out", default=_env("out", "."))
    p.add_argument("--async", dest="use_async", action="store_true", default=_env("async") == "1")
    return p.parse_args(argv)


def build_worker(queue, args):
    out = Path(args.out)
    pid = os.getpid()
    worker = buquet.Worker(
        queue, args.worker_id, args.shards.split(",") if args.shards else None,
        concurrency=args.concurrency, poll_min=min(0.05, args.poll_max), poll_max=args.poll_max,
        grace_period=args.grace_period, monitor=not args.no_monitor, monitor_interval=args.monitor_interval,
        heartbeat_interval=args.heartbeat_interval, drain=args.drain, max_tasks=args.max_tasks,
        scheduler=False,
    )

    @worker.task("record")
    def record(input, ctx):
        with open(out / ("%d.log" % pid), "a") as f:
            f.write("%s,%d,%d\n" % (ctx.task_id, ctx.attempt, pid))
        if input and input.get("sleep"):
            time.sleep(input["sleep"])
        return {"pid": pid}

    @worker.task("sleep")
    def sleep(input, ctx):
        (out / ("started-%s-%d" % (ctx.task_id, ctx.attempt))).write_text(str(pid))
        time.sleep(input["seconds"])
        return {"attempt": ctx.attempt, "pid": pid}

    @worker.task("echo")
    def echo(input):
        return input

    @worker.on_startup
    def ready(w):
        print("ready %d" % pid, flush=True)

    return worker


def main(argv=None):
    args = parse_args(argv)
    if args.use_async:
        import asyncio

        async def amain():
            queue = await buquet.connect()
            return await build_worker(queue, args).run()

        code = asyncio.run(amain())
    else:
        code = build_worker(buquet.connect(), args).run()
    print("stopped %s" % code, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
