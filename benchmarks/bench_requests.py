#!/usr/bin/env python3
"""Benchmark: S3 requests per task for submit, claim and complete.

Submits N tasks, then drains them with a worker loop (`claim_next` until it
returns None, completing each task), and counts every HTTP request the
queue's S3 client sends, by type (PUT, GET, HEAD, LIST, DELETE) and by
phase.  Discovery (the LISTs of `claim_next`, including the final empty
poll) is counted in the claim phase.  `--mode worker` drains with
`buquet.Worker(drain=True)` instead (its own discovery, background index
upkeep; monitor and scheduler off), counted as one phase.  The issue's target: at most 8.2
requests per task on average, discovery included.

    .venv/bin/python benchmarks/bench_requests.py                    # moto, 200 tasks
    .venv/bin/python benchmarks/bench_requests.py --server seaweedfs
    .venv/bin/python benchmarks/bench_requests.py --tasks 1000 --workers 4
    .venv/bin/python benchmarks/bench_requests.py --mode worker     # buquet.Worker(drain=True)
    .venv/bin/python benchmarks/bench_requests.py --endpoint http://127.0.0.1:9000 \\
        --access-key K --secret-key S

Without --endpoint the chosen server is started on free loopback ports and
stopped by its PID at the end (also on error or Ctrl-C).  The bucket is
created fresh for each run.  Requests are counted below the queue, at the
client's request method, so retries inside the client are not hidden
behind one store call and nothing is double counted.
"""

import argparse
import os
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import buquet  # noqa: E402
import sigv4  # noqa: E402

REGION = "us-east-1"
ACCESS_KEY = "bench-access-key"
SECRET_KEY = "bench-secret-key-not-a-real-credential"
TARGET = 8.2  # requests per task, discovery included (the target)
OPS = ("PUT", "GET", "HEAD", "LIST", "DELETE")


# ---------------------------------------------------------------------------
# Servers
# ---------------------------------------------------------------------------


def start_server(name):
    """(process, S3Server): the test suite's launcher (free loopback ports,
    SeaweedFS with credentials), stopped by PID with process.stop()."""
    sys.path.insert(0, os.path.join(REPO, "tests"))
    import conftest

    workdir = Path(tempfile.mkdtemp(prefix="bench-requests-"))
    return (conftest._start_moto if name == "moto" else conftest._start_seaweedfs)(workdir)


# ---------------------------------------------------------------------------
# Counting
# ---------------------------------------------------------------------------


class Tally:
    """Requests by (phase, type), shared by every queue of a run."""

    def __init__(self):
        self.counts = Counter()
        self.prefixes = Counter()  # (type, first key component) -> requests
        self.lock = threading.Lock()
        self.local = threading.local()
        self.default = "other"  # the phase of threads that set none (a Worker's own threads)

    def phase(self, name):
        self.local.phase = name

    def attach(self, queue):
        client = queue.store.client
        original = client._request

        def counted(method, bucket, key=None, params=(), **kwargs):
            kind, where = method, (key or "").split("/")[0]
            if method == "GET" and key is None and any(name in ("list-type", "versions") for name, _ in params):
                kind = "LIST"
                where = (dict(params).get("prefix") or "").split("/")[0] or "(all)"
            with self.lock:
                self.counts[(getattr(self.local, "phase", self.default), kind)] += 1
                self.prefixes[(kind, where + "/")] += 1
            return original(method, bucket, key, params, **kwargs)

        client._request = counted
        return queue


def run(endpoint, access_key, secret_key, tasks, workers, mode="loop", bucket=None):
    tally = Tally()
    credentials = sigv4.Credentials(access_key, secret_key)
    bucket = bucket or "bench-requests-%s" % uuid.uuid4().hex[:12]
    sigv4.S3Client(endpoint=endpoint, region=REGION, credentials=credentials).create_bucket(bucket)

    def make_queue():
        return tally.attach(buquet.connect(bucket=bucket, endpoint=endpoint, region=REGION,
                                           credentials=credentials))

    producer = make_queue()
    tally.phase("submit")
    started = time.monotonic()
    for i in range(tasks):
        producer.submit("bench", {"n": i})
    submit_s = time.monotonic() - started

    done = Counter()
    errors = []

    def worker(n):
        queue = make_queue()
        try:
            while True:
                tally.phase("claim")
                task = queue.claim_next(worker_id="bench-%d" % n)
                if task is None:
                    break
                tally.phase("complete")
                queue.complete(task, {"n": task.doc["input"]["n"]})
                done[n] += 1
        except Exception as exc:  # reported, never hidden
            errors.append(exc)
        finally:
            queue.close()

    def buquet_worker(n):
        queue = make_queue()
        w = buquet.Worker(queue, "bench-%d" % n, drain=True, monitor=False, scheduler=False, concurrency=1)

        @w.task("bench")
        def handle(input):
            done[n] += 1
            return {"n": input["n"]}

        tally.phase("worker")
        try:
            w.run(install_signal_handlers=False)
        except Exception as exc:
            errors.append(exc)
        finally:
            queue.close()

    if mode == "worker":
        tally.default = "worker"
    started = time.monotonic()
    target = worker if mode == "loop" else buquet_worker
    threads = [threading.Thread(target=target, args=(n,)) for n in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    drain_s = time.monotonic() - started
    producer.close()
    if errors:
        raise SystemExit("bench_requests: a worker failed: %r" % (errors[0],))
    completed = sum(done.values())
    return tally, completed, submit_s, drain_s


def report(server, tally, tasks, completed, workers, submit_s, drain_s, mode):
    counts = tally.counts
    phases = ("submit", "claim", "complete") if mode == "loop" else ("submit", "worker")
    lines = ["## Requests per task: %s, %d tasks, %d %s%s" % (
                 server, tasks, workers, "claim_next loop" if mode == "loop" else "buquet.Worker",
                 "" if workers == 1 else "s (threads)"),
             "",
             "| phase | " + " | ".join(OPS) + " | total | per task |",
             "|---|" + "---:|" * (len(OPS) + 2)]
    grand = 0
    for phase in phases + ("other",):
        row = [counts.get((phase, op), 0) for op in OPS]
        if phase == "other" and not any(row):
            continue
        total = sum(row)
        grand += total
        lines.append("| %s | %s | %d | %.2f |" % (phase, " | ".join(str(v) for v in row), total, total / tasks))
    per_op = [sum(counts.get((p, op), 0) for p in phases + ("other",)) for op in OPS]
    lines.append("| **all** | %s | %d | **%.2f** |" % (" | ".join(str(v) for v in per_op), grand, grand / tasks))
    lines.append("")
    lines.append("per task by type: " + ", ".join("%s %.2f" % (op, v / tasks) for op, v in zip(OPS, per_op)))
    if mode == "loop":
        discovery = counts.get(("claim", "LIST"), 0)
        lines.append("discovery LISTs: %d (%.2f per task); claim without discovery: %.2f per task" % (
            discovery, discovery / tasks, (sum(counts.get(("claim", op), 0) for op in OPS) - discovery) / tasks))
    lines.append("by key prefix: " + ", ".join(
        "%s %s %d" % (op, where, n) for (op, where), n in sorted(tally.prefixes.items())))
    lines.append("completed %d of %d tasks; submit %.2f s, drain %.2f s" % (completed, tasks, submit_s, drain_s))
    verdict = "meets" if grand / tasks <= TARGET else "MISSES"
    lines.append("target <= %.1f requests per task: %s (%.2f)" % (TARGET, verdict, grand / tasks))
    return "\n".join(lines), grand / tasks


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", choices=("moto", "seaweedfs"), default="moto")
    parser.add_argument("--tasks", type=int, default=200)
    parser.add_argument("--workers", type=int, default=1, help="worker threads draining the queue (default 1)")
    parser.add_argument("--mode", choices=("loop", "worker"), default="loop",
                        help="loop: claim_next + complete until empty (default); worker: buquet.Worker(drain=True)")
    parser.add_argument("--endpoint", help="use this running server instead of starting one")
    parser.add_argument("--access-key", default=ACCESS_KEY)
    parser.add_argument("--secret-key", default=SECRET_KEY)
    args = parser.parse_args(argv)
    if args.tasks < 1 or args.workers < 1:
        parser.error("--tasks and --workers must be at least 1")

    process = None
    try:
        access_key, secret_key = args.access_key, args.secret_key
        if args.endpoint:
            endpoint, name = args.endpoint, args.endpoint
        else:
            process, server = start_server(args.server)
            endpoint, name = server.endpoint, args.server
            access_key, secret_key = server.access_key, server.secret_key
        tally, completed, submit_s, drain_s = run(endpoint, access_key, secret_key, args.tasks,
                                                  args.workers, args.mode)
    finally:
        if process is not None:
            process.stop()
    text, per_task = report(name, tally, args.tasks, completed, args.workers, submit_s, drain_s, args.mode)
    print(text)
    return 0 if completed == args.tasks and per_task <= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
