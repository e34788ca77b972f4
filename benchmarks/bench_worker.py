#!/usr/bin/env python3
"""Benchmark: what a buquet worker costs and how fast it reacts, on one local SeaweedFS.

Measures, each with workers in processes of their own:

  * idle cost: requests per second of one idle worker at default settings,
    by kind (LIST ready/, PUT workers/, LIST leases/, ...), over --idle seconds
    after a warm-up (the poll sleep has reached its cap by then);
  * pickup latency: tasks submitted to an idle worker (default settings) at
    random times, gaps uniform in 0-5 s; latency = handler start - submit
    return (CLOCK_MONOTONIC is one clock for every process of the host);
  * requests per task and 412s per task: four worker processes (default
    settings, drain mode) on a backlog of --tasks tasks; the submits are not
    counted, everything the workers send is (heartbeats, polls, monitor, ...);
  * throughput of one process (default settings, drain mode) on the same
    backlog size, with its requests per task.

Requests are counted inside each worker process by wrapping its S3 client's
methods (one count per call, so a call the client retried internally counts
once); a 412 is a conditional write that lost (sigv4.ConflictError).

    .venv/bin/python benchmarks/bench_worker.py             # about 4 minutes
    .venv/bin/python benchmarks/bench_worker.py --quick     # about 1 minute
    .venv/bin/python benchmarks/bench_worker.py --json /tmp/bench-worker.json

SeaweedFS (`weed`, from the test extra) is started on free ports of 127.0.0.1
with tests/conftest.py's launcher and stopped by its PID at the end.
"""

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


# ============================================================================
# The child: one worker process that counts its requests
# ============================================================================

def child(config):
    sys.path.insert(0, str(REPO))
    import buquet
    import sigv4

    events = []  # (monotonic, operation, first key component, outcome)
    lock = threading.Lock()
    queue = buquet.connect(bucket=config["bucket"], endpoint=config["endpoint"], region="us-east-1",
                           credentials=sigv4.Credentials(config["access_key"], config["secret_key"]),
                           use_config=False)
    client = queue.store.client

    def counted(name, fn):
        def call(bucket, key_or_prefix=None, *args, **kwargs):
            where = (kwargs.get("prefix") if key_or_prefix is None else key_or_prefix) or ""
            outcome = "ok"
            try:
                return fn(bucket, key_or_prefix, *args, **kwargs) if key_or_prefix is not None \
                    else fn(bucket, *args, **kwargs)
            except sigv4.ConflictError:
                outcome = "412"
                raise
            except sigv4.NoSuchKey:
                outcome = "404"
                raise
            except sigv4.S3Error as exc:
                outcome = str(getattr(exc, "status", "error"))
                raise
            finally:
                with lock:
                    events.append((time.monotonic(), name, where.split("/")[0] + "/", outcome))
        return call

    for attr, name in (("get_object", "GET"), ("put_object", "PUT"), ("delete_object", "DELETE"),
                       ("list_objects_v2", "LIST"), ("head_object", "HEAD")):
        setattr(client, attr, counted(name, getattr(client, attr)))

    worker = buquet.Worker(queue, config["worker_id"], drain=config.get("drain", False))

    @worker.task("bench")
    def handle(input):
        return {"started": time.monotonic(), "pid": os.getpid()}

    @worker.on_startup
    def ready(w):
        print("ready", flush=True)

    started = time.monotonic()
    code = worker.run()
    result = {"code": code, "started": started, "ended": time.monotonic(), "completed": worker.completed,
              "events": events}
    print("RESULT " + json.dumps(result), flush=True)
    return code


# ============================================================================
# The parent
# ============================================================================

class Child:
    def __init__(self, config):
        config = {k: v for k, v in config.items() if not callable(v)}
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE" and "proxy" not in k.lower()}
        env["NO_PROXY"] = "127.0.0.1,localhost"
        self.popen = subprocess.Popen([sys.executable, __file__, "--child", json.dumps(config)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(REPO))
        self.ready = threading.Event()
        self.result = None
        self.stderr = ""
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        threading.Thread(target=self._read_err, daemon=True).start()

    def _read(self):
        for line in self.popen.stdout:
            if line.startswith("ready"):
                self.ready.set()
            elif line.startswith("RESULT "):
                self.result = json.loads(line[7:])

    def _read_err(self):
        self.stderr = self.popen.stderr.read()

    def wait_ready(self, timeout=30):
        if not self.ready.wait(timeout):
            self.kill()
            raise RuntimeError("worker did not start: " + self.stderr)

    def finish(self, timeout=120, terminate=False):
        if terminate:
            self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise RuntimeError("worker did not finish")
        self._reader.join(10)
        if self.result is None:
            raise RuntimeError("worker reported nothing: " + self.stderr[-2000:])
        return self.result

    def kill(self):
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(10)


def breakdown(events, start=None, end=None):
    out = {}
    for t, op, where, outcome in events:
        if (start is None or t >= start) and (end is None or t < end):
            key = "%s %s" % (op, where)
            out[key] = out.get(key, 0) + 1
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def percentile(values, p):
    values = sorted(values)
    k = (len(values) - 1) * p
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def measure_idle(target, seconds, warmup):
    config = dict(target, bucket=target["new_bucket"](), worker_id="idle")
    proc = Child(config)
    proc.wait_ready()
    t0 = time.monotonic()
    time.sleep(warmup + seconds)
    result = proc.finish(terminate=True)
    window = (t0 + warmup, t0 + warmup + seconds)
    counts = breakdown(result["events"], *window)
    total = sum(counts.values())
    return {"seconds": seconds, "warmup": warmup, "requests": total, "per_second": total / seconds,
            "by_kind": counts}


def measure_latency(target, n, max_gap):
    sys.path.insert(0, str(REPO))
    import buquet
    import sigv4

    bucket = target["new_bucket"]()
    queue = buquet.connect(bucket=bucket, endpoint=target["endpoint"], region="us-east-1",
                           credentials=sigv4.Credentials(target["access_key"], target["secret_key"]),
                           use_config=False)
    proc = Child(dict(target, bucket=bucket, worker_id="latency"))
    proc.wait_ready()
    rng = random.Random(7)
    submitted = []
    time.sleep(rng.uniform(0, max_gap))
    for _ in range(n):
        task = queue.submit("bench", {})
        submitted.append((task.id, time.monotonic()))
        time.sleep(rng.uniform(0, max_gap))
    deadline = time.monotonic() + 30
    latencies = []
    for task_id, at in submitted:
        while True:
            task = queue.get(task_id)
            if task.status == "completed" or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        if task.status == "completed":
            latencies.append(task.output["started"] - at)
    result = proc.finish(terminate=True)
    return {"tasks": n, "completed": len(latencies), "median": statistics.median(latencies),
            "p90": percentile(latencies, 0.9), "max": max(latencies), "min": min(latencies),
            "worker_requests": len(result["events"])}


def measure_fleet(target, processes, tasks):
    sys.path.insert(0, str(REPO))
    import buquet
    import sigv4

    bucket = target["new_bucket"]()
    queue = buquet.connect(bucket=bucket, endpoint=target["endpoint"], region="us-east-1",
                           credentials=sigv4.Credentials(target["access_key"], target["secret_key"]),
                           use_config=False)
    submitted = queue.submit_many([("bench", {"n": i}) for i in range(tasks)])
    queue.close()
    started = time.monotonic()
    procs = [Child(dict(target, bucket=bucket, worker_id="fleet-%d" % i, drain=True)) for i in range(processes)]
    results = [p.finish(timeout=600) for p in procs]
    # Throughput from the first handler start to the last, which leaves out
    # the interpreters' start-up.
    finals = queue._map(lambda t: queue.get(t.id), submitted)
    elapsed_total = time.monotonic() - started
    not_done = [t.id for t in finals if t.status != "completed"]
    runs_over_once = sum(t.attempt - 1 for t in finals)
    starts = [t.output["started"] for t in finals if t.status == "completed"]
    first_event = min(e[0] for r in results for e in r["events"])
    last_event = max(e[0] for r in results for e in r["events"])
    events = [e for r in results for e in r["events"]]
    counts = breakdown(events)
    total = sum(counts.values())
    conflicts = sum(1 for e in events if e[3] == "412")
    span = max(starts) - min(starts) if len(starts) > 1 else float("nan")
    return {
        "processes": processes, "tasks": tasks, "not_completed": len(not_done),
        "extra_attempts": runs_over_once, "requests": total, "requests_per_task": total / tasks,
        "412": conflicts, "412_per_task": conflicts / tasks, "by_kind": counts,
        "tasks_per_second": (len(starts) - 1) / span if span == span and span > 0 else None,
        "wall_seconds_first_to_last_request": last_event - first_event, "wall_seconds_total": elapsed_total,
        "per_process_completed": [r["completed"] for r in results],
    }


def render(res):
    lines = ["# bench_worker.py results", "", "Machine: %s" % res["machine"], ""]
    idle = res["idle"]
    lines += ["## Idle worker (default settings)", "",
              "%.3f requests/s over %d s (%d requests, after a %d s warm-up)"
              % (idle["per_second"], idle["seconds"], idle["requests"], idle["warmup"]), ""]
    lines += ["| kind | requests |", "|---|---|"] + ["| %s | %d |" % kv for kv in idle["by_kind"].items()] + [""]
    lat = res["latency"]
    lines += ["## Pickup latency (idle worker, default settings, gaps uniform 0-%g s)" % res["max_gap"], "",
              "%d tasks: median %.3f s, p90 %.3f s, min %.3f s, max %.3f s"
              % (lat["completed"], lat["median"], lat["p90"], lat["min"], lat["max"]), ""]
    for key, title in (("fleet", "Four worker processes"), ("single", "One worker process")):
        f = res[key]
        lines += ["## %s (default settings, drain) on %d tasks" % (title, f["tasks"]), "",
                  "- not completed: %d; attempts beyond the first: %d" % (f["not_completed"], f["extra_attempts"]),
                  "- requests per task: %.2f (%d in all)" % (f["requests_per_task"], f["requests"]),
                  "- 412s per task: %.3f (%d)" % (f["412_per_task"], f["412"]),
                  "- throughput: %s tasks/s (first to last handler start); %.1f s from spawn to all done"
                  % ("%.1f" % f["tasks_per_second"] if f["tasks_per_second"] else "n/a", f["wall_seconds_total"]),
                  "- completed per process: %s" % f["per_process_completed"], "",
                  "| kind | requests |", "|---|---|"]
        lines += ["| %s | %d |" % kv for kv in f["by_kind"].items()] + [""]
    return "\n".join(lines)


def machine_info():
    import platform

    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return "%s, Python %s, %d CPUs, load %s" % (platform.platform(), platform.python_version(), os.cpu_count() or 0,
                                                 "%.1f %.1f %.1f" % load if load else "?")


def main(argv=None):
    p = argparse.ArgumentParser(description="buquet worker benchmark on a local SeaweedFS")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--quick", action="store_true", help="shorter runs (about a minute)")
    p.add_argument("--idle", type=float, default=60.0, help="seconds of idle measurement (default 60)")
    p.add_argument("--latency-tasks", type=int, default=40, help="tasks for the pickup latency (default 40)")
    p.add_argument("--max-gap", type=float, default=5.0, help="largest gap between submits (default 5 s)")
    p.add_argument("--tasks", type=int, default=500, help="backlog for the fleet and single runs (default 500)")
    p.add_argument("--json", help="also write the raw numbers here")
    args = p.parse_args(argv)
    if args.child:
        return child(json.loads(args.child))
    if args.quick:
        args.idle, args.latency_tasks, args.tasks = 15.0, 8, 200

    sys.path.insert(0, str(REPO / "tests"))
    import conftest  # the test suite's SeaweedFS launcher

    workdir = Path(tempfile.mkdtemp(prefix="bench-worker-"))
    proc, server = conftest._start_seaweedfs(workdir)
    try:
        counter = iter(range(10 ** 6))
        target = {
            "endpoint": server.endpoint, "access_key": server.access_key, "secret_key": server.secret_key,
            "new_bucket": lambda: server.create_bucket("bench-worker-%d-%d" % (os.getpid(), next(counter))).bucket,
        }
        res = {"machine": machine_info(), "max_gap": args.max_gap}
        print("idle worker, %g s ..." % args.idle, file=sys.stderr)
        res["idle"] = measure_idle(target, args.idle, warmup=10.0)
        print("pickup latency, %d tasks ..." % args.latency_tasks, file=sys.stderr)
        res["latency"] = measure_latency(target, args.latency_tasks, args.max_gap)
        print("four processes, %d tasks ..." % args.tasks, file=sys.stderr)
        res["fleet"] = measure_fleet(target, 4, args.tasks)
        print("one process, %d tasks ..." % args.tasks, file=sys.stderr)
        res["single"] = measure_fleet(target, 1, args.tasks)
    finally:
        proc.stop()
    print(render(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
