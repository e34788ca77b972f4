#!/usr/bin/env python3
"""The chaos run of issue 7: a fleet under faults, kills and restarts, then
the queue's invariants checked from the bucket.

    .venv/bin/python tests/chaos.py --tasks 3000 --workers 4 --producers 2 --seed 7 \\
        [--faults slowdown=0.02,internal=0.01,...] [--kill-interval 3] [--json out.json]

What runs (every process of its own, all on this host):

  * SeaweedFS, started with tests/conftest.py's launcher (moto's conditional
    writes are not atomic, so races belong on SeaweedFS), a fresh versioned
    bucket, and the fault proxy (tests/s3proxy.py) in front of it: 503
    SlowDown, 500 InternalError, 409 ConditionalRequestConflict, connection
    reset before the request reaches the server and after the server applied
    it, latency and jitter, and replies stalled past the client's read timeout;
  * N worker processes (this file, `worker` mode: a buquet.Worker with a short
    lease, a short client read timeout, the embedded monitor, sweeper and
    scheduler on), SIGKILLed at random every few seconds and restarted, under
    the same worker id or a new one;
  * M producer processes (`producer` mode) submitting the tasks: plain ones,
    idempotent ones (each key submitted twice, by two producers, racing), ones
    that fail once then succeed (a retry), permanent failures, ones that
    reschedule themselves once, delayed ones; and two `* * * * *` schedules
    served by the workers' embedded schedulers.

When the producers are done the killing stops, the faults are turned off and
the fleet finishes the backlog; then the schedules are disabled and the fleet
finishes what they fired last.  A worker
killed between a task's write and its index write (claim -> lease key,
retry -> ready key) leaves a task that no worker or monitor can see: only the
tasks/ phase of a sweeper finds it (the workers' embedded sweeper does one
page per sweep interval, so on a big bucket that can take hours).  So while
draining, when a running task is overdue without its lease key, or when the
backlog stops moving, a sweeper pass runs; each rescue is reported with the
kill that explains it (`--no-rescue`: no such pass and the embedded sweeper at
its production interval, so the tasks stay stuck and the invariants fail).  Then the workers
are stopped with SIGTERM, a last sweeper pass runs, and the bucket is read
with boto3 (not with the code under test).  Every handler execution
appends JSON lines (start, raise/return with its output, and the outcome the
worker recorded) to a file of its own process, opened with O_APPEND, so that
executions can be counted and matched against the bucket.

Invariants (each one a line of the summary; any failure exits 1):

  task_documents       every tasks/ key is tasks/{id[0]}/{id}.json holding a
                       readable document of that id and shard
  submitted_once       every task id a submit returned exists, exactly once;
                       every job has exactly one task (a job whose submit
                       raised may leave a stray task, which is counted and must
                       end terminal too); no task nobody submitted
  idempotent_once      both submits of an idempotency key returned the same
                       task, and the bucket holds one task for the key
  terminal_as_designed every task ended as its kind says: completed, or failed
                       with "PermanentError: ..." for the permanent ones
  no_expired_lease     no task is running with a lease that has run out
  one_completion       no task completed twice: at most one execution recorded
                       a completion, the output in the bucket is the output the
                       execution holding the final attempt returned, and (from
                       the bucket's version history) one version is completed
  one_run_per_claim    no two executions of one task share an attempt number
                       (two workers never held the same claim)
  reruns_after_expiry  a task ran again only after a designed retry or
                       reschedule, or once the previous run's lease had ended
                       (its process killed, or its result lost)
  index_consistent     after the sweep, every ready/ and leases/ key points to
                       an existing task in the matching state (pending /
                       running) under the key its document implies, and every
                       pending / running task has its key
  schedules_once       every due time of each schedule between its creation
                       and its disabling (less a margin) was submitted exactly
                       once (the `schedule:{id}:{due seconds}` idempotency
                       record names an existing task), and no other task of
                       the schedules' type exists
  producers_done       every job was submitted (no producer gave up) and every
                       producer exited 0
  workers_clean        no worker died unless killed by us, and every worker
                       exited 0 on SIGTERM at the end

Reported as well: tasks, kills, faults injected by kind (the proxy's
counters), requests, duplicate executions (each explained: the previous run's
process was killed, or its result was lost and its lease ran out), tasks the
sweeper had to rescue and why, and the wall time.

Only the standard library, plus boto3 (from the test extra) to read the
bucket.  Every process started here is stopped by its PID, also on failure.
"""

import argparse
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
for _path in (str(ROOT), str(TESTS)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

__all__ = ["DEFAULT_FAULTS", "Options", "format_summary", "main", "run"]

# ============================================================================
# Settings (each says why)
# ============================================================================

# The mix: a few percent of requests fail, one in 500 stalls.
DEFAULT_FAULTS = {"slowdown": 0.02, "internal": 0.01, "conflict": 0.01,
                  "reset_before": 0.01, "reset_after": 0.01, "stall": 0.002}
FAULT_KINDS = tuple(DEFAULT_FAULTS)
LEASE_SECONDS = 4  # a killed worker's tasks come back within ~5 s (lease + one monitor tick)
READ_TIMEOUT = 2.0  # the client's read timeout: a stalled reply costs 2 s, not 30
STALL_SECONDS = 5.0  # how long the proxy holds a stalled reply: past the read timeout
# Kills and lost results each spend a retry: with plenty left, every task's
# end state depends on its kind only, not on how often it was hit.
MAX_RETRIES = 25
RETRY_POLICY = {"initial_interval_ms": 200, "max_interval_ms": 1000, "multiplier": 2.0, "jitter_percent": 0.1}
# Job kinds and their weights (percent of the tasks).
KINDS = (("plain", 70), ("idem", 10), ("flaky", 7), ("perm", 5), ("resched", 5), ("delayed", 3))
TASK_TYPE = "chaos"
CRON_TYPE = "chaos_cron"
SCHEDULES = ("cron-a", "cron-b")
CRON = "* * * * *"
# A due time this close to the disabling of the schedules may or may not have
# fired (a scheduler wakes 50 ms after the minute, then needs a few requests).
SCHEDULE_MARGIN = 5.0
SUBMIT_TRIES = 10  # a producer's attempts per job before it gives up (each is 5 client attempts)
PRODUCER_THREADS = 4
# Worker settings: fast polls and housekeeping so a short run sees everything.
WORKER_SETTINGS = dict(poll_min=0.05, poll_max=0.5, grace_period=5.0, monitor=True, monitor_interval=1.0,
                       heartbeat_interval=2.0, scheduler=True)
# Lease ends are written in the server's time as the client tracks it (the
# local clock here, within the bounds the Date headers allow), handler starts
# in the local clock: a re-run less early than this is not a violation.
CLOCK_SLACK = 0.5
STOP_TIMEOUT = 20.0  # seconds a worker gets to exit after SIGTERM (grace 5 s + requeues)


class Options:
    """The knobs of a run (the command line's options)."""

    def __init__(self, tasks=600, workers=4, producers=2, seed=None, faults=None, kill_interval=3.0,
                 duration=None, concurrency=4, latency_ms=1.0, jitter_ms=1.0, lease=LEASE_SECONDS,
                 read_timeout=READ_TIMEOUT, stall_s=STALL_SECONDS, drain_timeout=180.0, history="all",
                 rescue=True, worker_sweep=None, keep=False, verbose=True):
        self.tasks = int(tasks)
        self.workers = int(workers)
        self.producers = int(producers)
        self.seed = random.randrange(1 << 30) if seed is None else int(seed)
        self.faults = dict(DEFAULT_FAULTS if faults is None else faults)
        self.kill_interval = float(kill_interval)
        # Producers spread their submits over this long, so that kills land
        # on a fleet that is busy (about 50 tasks a second by default).
        self.duration = max(5.0, self.tasks / 50.0) if duration is None else float(duration)
        self.concurrency = int(concurrency)
        self.latency_ms = float(latency_ms)
        self.jitter_ms = float(jitter_ms)
        self.lease = int(lease)
        self.read_timeout = float(read_timeout)
        self.stall_s = float(stall_s)
        self.drain_timeout = float(drain_timeout)
        self.history = history  # "all", "reruns" (tasks run more than once) or "none"
        # While draining, run a sweeper pass for tasks overdue without their
        # index key, or when the backlog stops moving (else: give up waiting,
        # and let the invariants say which tasks are stranded).
        self.rescue = bool(rescue)
        # The workers' embedded sweeper: a page every 5 s here (every 300 s by
        # default in production, which is what --no-rescue runs with).
        self.worker_sweep = float(worker_sweep if worker_sweep is not None else 5.0 if self.rescue else 300.0)
        self.keep = keep
        self.verbose = verbose
        if self.workers < 1 or self.producers < 1 or self.tasks < 1:
            raise ValueError("tasks, workers and producers must be at least 1")
        if history not in ("all", "reruns", "none"):
            raise ValueError("history must be all, reruns or none, got %r" % (history,))

    def to_dict(self):
        return dict(vars(self))


def parse_faults(text):
    """`slowdown=0.02,internal=0.01` -> dict (kinds not named are off);
    `none` -> {}; `default` -> DEFAULT_FAULTS."""
    text = text.strip()
    if text in ("", "none", "off"):
        return {}
    if text == "default":
        return dict(DEFAULT_FAULTS)
    out = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or name not in FAULT_KINDS:
            raise ValueError("--faults: expected KIND=P with KIND one of %s, got %r" % (", ".join(FAULT_KINDS), part))
        p = float(value)
        if not 0.0 <= p <= 1.0:
            raise ValueError("--faults: %s must be a probability, got %r" % (name, value))
        out[name] = p
    return out


# ============================================================================
# Records: JSON lines appended by every process, one file each
# ============================================================================


class _Records:
    """Appends one JSON line per call with a single write(2) on an O_APPEND
    descriptor: lines never interleave, and a SIGKILL leaves whole lines."""

    def __init__(self, path):
        self.fd = os.open(str(path), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, **fields):
        fields["time"] = time.time()
        os.write(self.fd, (json.dumps(fields, sort_keys=True) + "\n").encode("utf-8"))


def _read_records(directory, pattern="*.jsonl"):
    out = []
    for path in sorted(Path(directory).glob(pattern)):
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass  # a line cut by a kill (cannot happen with one write, but cheap to tolerate)
    return out


# ============================================================================
# Child processes: a worker, a producer
# ============================================================================


def _connect(args, read_timeout):
    import buquet
    import sigv4

    return buquet.connect(bucket=args.bucket, endpoint=args.endpoint, region=args.region,
                          credentials=sigv4.Credentials(os.environ["AWS_ACCESS_KEY_ID"],
                                                        os.environ["AWS_SECRET_ACCESS_KEY"]),
                          use_config=False, read_timeout=read_timeout, connect_timeout=read_timeout)


def _exit_with_parent():
    """Children die with the harness, even when it is SIGKILLed."""
    parent = os.getppid()

    def watch():
        while True:
            time.sleep(0.5)
            if os.getppid() != parent:
                os._exit(3)
    threading.Thread(target=watch, name="chaos-parent-watch", daemon=True).start()


def worker_child(args):
    import buquet

    import logging

    _exit_with_parent()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s " + args.id + " %(name)s: %(message)s")
    queue = _connect(args, args.read_timeout)
    pid = os.getpid()
    records = _Records(Path(args.records) / ("worker-%s-%d.jsonl" % (args.id, pid)))
    worker = buquet.Worker(queue, args.id, concurrency=args.concurrency, sweep_interval=args.sweep_interval,
                           **WORKER_SETTINGS)

    def handle(input, ctx):
        doc = ctx.task.doc
        base = dict(t=ctx.task_id, a=ctx.attempt, w=args.id, p=pid)
        records.write(e="start", lease=doc.get("lease_expires_at"), **base)
        input = input if isinstance(input, dict) else {}
        time.sleep(input.get("sleep_ms", 0) / 1000.0)
        kind = input.get("kind")
        if kind == "flaky" and doc.get("retry_count", 0) == 0:
            records.write(e="raise", how="retry", **base)
            raise buquet.RetryableError("failing once by design")
        if kind == "perm":
            records.write(e="raise", how="permanent", **base)
            raise buquet.PermanentError("failing for good by design")
        if kind == "resched" and doc.get("reschedule_count", 0) == 0:
            records.write(e="raise", how="reschedule", **base)
            raise buquet.RescheduleError(1)
        output = {"job": input.get("job"), "attempt": ctx.attempt, "worker": args.id, "pid": pid,
                  "nonce": uuid.uuid4().hex}
        records.write(e="return", out=output, **base)
        return output

    worker.task(TASK_TYPE)(handle)
    worker.task(CRON_TYPE)(handle)

    @worker.on_success
    def recorded(task, output):
        records.write(e="recorded", t=task.doc["id"], a=task.doc.get("attempt"), w=args.id, p=pid,
                      status=task.doc.get("status"))

    @worker.on_error
    def recorded_error(task, exc):
        records.write(e="recorded", t=task.doc["id"], a=task.doc.get("attempt"), w=args.id, p=pid,
                      status=task.doc.get("status"), error=type(exc).__name__)

    @worker.on_startup
    def ready(w):
        (Path(args.records) / ("ready-%d" % pid)).write_text(args.id)

    def dump_state(signum, frame):
        # SIGUSR1: what this worker thinks of the queue, for a task that
        # stays unclaimed (the harness asks when one is stuck at the end).
        d = worker._discovery
        now = time.monotonic()
        state = {"worker": args.id, "pid": pid, "time": time.time(),
                 "skipped": {t: round(until - now, 2) for t, until in list(d._skip.items()) if until > now},
                 "candidates": [c[1] for c in list(d._candidates)], "lists": d.lists,
                 "quiet_for": round(worker._quiet_until - now, 2), "running": list(worker._running)}
        (Path(args.records) / ("state-%s-%d.json" % (args.id, pid))).write_text(json.dumps(state))
    signal.signal(signal.SIGUSR1, dump_state)

    return worker.run()


def _submit(queue, job, lease):
    options = dict(timeout=lease, max_retries=MAX_RETRIES, retry_policy=RETRY_POLICY)
    if job["kind"] == "idem":
        options["idempotency_key"] = "chaos:" + job["job"]
    if job["kind"] == "delayed":
        options["delay"] = job["delay"]
    if job["kind"] == "resched":
        options["max_reschedules"] = 5
    return queue.submit(TASK_TYPE, job["input"], **options)


def producer_child(args):
    _exit_with_parent()
    queue = _connect(args, args.read_timeout)
    with open(args.plan, encoding="utf-8") as f:
        plan = json.load(f)
    records = _Records(args.out)
    lock = threading.Lock()
    cursor = [0]
    started = time.monotonic()
    gaps = args.duration / max(1, len(plan))

    def work():
        while True:
            with lock:
                i = cursor[0]
                cursor[0] += 1
            if i >= len(plan):
                return
            job = plan[i]
            pause = started + i * gaps - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            errors = []
            for attempt in range(1, SUBMIT_TRIES + 1):
                try:
                    task = _submit(queue, job, args.lease)
                except Exception as exc:  # noqa: BLE001 - every failure is counted and retried
                    errors.append("%s: %s" % (type(exc).__name__, exc))
                    time.sleep(0.2 * attempt)
                    continue
                records.write(e="submitted", job=job["job"], kind=job["kind"], task_id=task.doc["id"],
                              tries=attempt, errors=errors)
                break
            else:
                records.write(e="gave_up", job=job["job"], kind=job["kind"], errors=errors)

    threads = [threading.Thread(target=work, name="producer-%d" % i) for i in range(PRODUCER_THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return 0


# ============================================================================
# The plan: which jobs, for which producer
# ============================================================================


def make_plan(tasks, producers, seed):
    """[jobs of producer 0, jobs of producer 1, ...].  Every job is one task;
    an idempotent job is submitted twice (by two producers when there are
    two or more), with the same key and input."""
    rand = random.Random(seed)
    names = [k for k, _ in KINDS]
    weights = [w for _, w in KINDS]
    jobs = []
    for n in range(tasks):
        kind = rand.choices(names, weights)[0]
        job = {"job": "j%06d" % n, "kind": kind,
               "input": {"job": "j%06d" % n, "kind": kind, "sleep_ms": rand.randint(0, 150)}}
        if kind == "delayed":
            job["delay"] = rand.randint(1, 3)
        jobs.append(job)
    per = [[] for _ in range(producers)]
    for n, job in enumerate(jobs):
        p = n % producers
        per[p].append(job)
        if job["kind"] == "idem":
            per[(p + 1) % producers].append(job)
    for lst in per:
        rand.shuffle(lst)
    return jobs, per


# ============================================================================
# The harness
# ============================================================================


def _log(options, message, *args):
    if options.verbose:
        sys.stderr.write("chaos %s %s\n" % (time.strftime("%H:%M:%S"), message % args if args else message))
        sys.stderr.flush()


def _make_proxy(server, options):
    from urllib.parse import urlsplit

    from s3proxy import S3Proxy  # tests/s3proxy.py

    u = urlsplit(server.endpoint)
    # Faults stay off while the harness sets up; they are turned on with the fleet.
    return S3Proxy(u.hostname, u.port, latency_ms=options.latency_ms, jitter_ms=options.jitter_ms,
                   faults={}, stall_s=options.stall_s, seed=options.seed).start()


def _child_env(server):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AWS_", "S3_", "BUQUET_")) and "proxy" not in k.lower()}
    env.update(AWS_ACCESS_KEY_ID=server.access_key, AWS_SECRET_ACCESS_KEY=server.secret_key,
               PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    return env


class _Fleet:
    """The worker and producer processes, the killer, and their bookkeeping."""

    def __init__(self, options, server, bucket, endpoint, workdir):
        self.options = options
        self.bucket = bucket
        self.endpoint = endpoint
        self.region = server.region
        self.workdir = Path(workdir)
        self.records = self.workdir / "records"
        self.logs = self.workdir / "logs"
        self.records.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        self.env = _child_env(server)
        self.rand = random.Random(options.seed + 1)
        self.lock = threading.Lock()
        self.workers = {}  # slot -> (worker id, Popen)
        self.generation = 0
        self.producers = []
        self.kills = []  # {"time", "worker", "pid", "slot"}
        self.crashes = []  # workers that exited without being killed
        self.stops = []  # {"worker", "pid", "code"} at the end
        self.all_procs = []
        self._counted = set()  # pids of crashed workers already recorded
        self._stop_killing = threading.Event()
        self._killer = None

    def _common(self):
        return ["--endpoint", self.endpoint, "--bucket", self.bucket, "--region", self.region,
                "--read-timeout", str(self.options.read_timeout), "--lease", str(self.options.lease)]

    def _spawn(self, argv, log_name):
        with open(self.logs / log_name, "ab") as log:
            proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve())] + argv, env=self.env,
                                    cwd=str(self.workdir), stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT)
        self.all_procs.append(proc)
        return proc

    def start_worker(self, slot, worker_id):
        proc = self._spawn(["worker", "--id", worker_id, "--records", str(self.records),
                            "--concurrency", str(self.options.concurrency),
                            "--sweep-interval", str(self.options.worker_sweep)] + self._common(),
                           "worker-%s.log" % worker_id)
        with self.lock:
            self.workers[slot] = (worker_id, proc)
        return proc

    def wait_ready(self, procs, timeout=30.0):
        deadline = time.monotonic() + timeout
        for proc in procs:
            while not (self.records / ("ready-%d" % proc.pid)).exists():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("worker %d did not start (exit %s); see %s"
                                       % (proc.pid, proc.poll(), self.logs))
                time.sleep(0.05)

    def start_producers(self, plans):
        for i, plan in enumerate(plans):
            path = self.workdir / ("plan-%d.json" % i)
            path.write_text(json.dumps(plan), encoding="utf-8")
            self.producers.append(self._spawn(
                ["producer", "--plan", str(path), "--out", str(self.records / ("producer-%d.jsonl" % i)),
                 "--duration", str(self.options.duration)] + self._common(), "producer-%d.log" % i))

    def start_killing(self):
        self._killer = threading.Thread(target=self._kill_loop, name="chaos-killer", daemon=True)
        self._killer.start()

    def stop_killing(self):
        self._stop_killing.set()
        if self._killer is not None:
            self._killer.join(30)

    def _kill_loop(self):
        interval = self.options.kill_interval
        while not self._stop_killing.wait(interval * self.rand.uniform(0.5, 1.5)):
            self.check_crashes()
            slot = self.rand.randrange(self.options.workers)
            with self.lock:
                worker_id, proc = self.workers[slot]
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                self.kills.append({"time": time.time(), "worker": worker_id, "pid": proc.pid, "slot": slot})
            self.generation += 1
            new_id = worker_id if self.rand.random() < 0.5 else "w%d-%d" % (slot, self.generation)
            self.start_worker(slot, new_id)

    def check_crashes(self, restart=True):
        """Workers that exited without being killed: recorded, restarted."""
        with self.lock:
            slots = list(self.workers.items())
        for slot, (worker_id, proc) in slots:
            code = proc.poll()
            if code is not None and proc.pid not in self._counted:
                self._counted.add(proc.pid)
                self.crashes.append({"time": time.time(), "worker": worker_id, "pid": proc.pid, "code": code})
                if restart:
                    self.start_worker(slot, worker_id)

    def wait_producers(self, timeout):
        deadline = time.monotonic() + timeout
        codes = []
        for proc in self.producers:
            try:
                codes.append(proc.wait(max(0.1, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                codes.append("timeout")
        return codes

    def stop_workers(self):
        self.check_crashes(restart=False)
        with self.lock:
            running = list(self.workers.values())
        # A worker restarted moments ago must have its signal handlers first.
        try:
            self.wait_ready([proc for _, proc in running if proc.poll() is None])
        except RuntimeError:
            pass  # reported below by its exit code
        for _, proc in running:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        for worker_id, proc in running:
            try:
                code = proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                code = "timeout"
            self.stops.append({"worker": worker_id, "pid": proc.pid, "code": code})

    def worker_states(self):
        """Each live worker's view (skip cache, candidates), by SIGUSR1."""
        with self.lock:
            running = [(wid, p) for wid, p in self.workers.values() if p.poll() is None]
        for _, proc in running:
            proc.send_signal(signal.SIGUSR1)
        time.sleep(1.0)
        states = []
        for wid, proc in running:
            path = self.records / ("state-%s-%d.json" % (wid, proc.pid))
            if path.exists():
                states.append(json.loads(path.read_text()))
        return states

    def kill_everything(self):
        """By PID, whatever happened: the last line of defence."""
        self._stop_killing.set()
        for proc in self.all_procs:
            if proc.poll() is None:
                try:
                    proc.kill()
                    proc.wait(10)
                except (OSError, subprocess.TimeoutExpired):
                    pass


class _Bucket:
    """Reads the bucket with boto3 (not with the code under test), many
    requests at once."""

    def __init__(self, server, bucket, threads=16):
        self.client = server.client(max_pool_connections=threads * 2)
        self.bucket = bucket
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="chaos-read")

    def close(self):
        self.pool.shutdown(wait=True)

    def keys(self, prefix):
        out = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            out.extend(obj["Key"] for obj in page.get("Contents", ()))
        return out

    def get(self, key, version_id=None):
        from botocore.exceptions import ClientError

        args = dict(Bucket=self.bucket, Key=key)
        if version_id:
            args["VersionId"] = version_id
        try:
            return self.client.get_object(**args)["Body"].read()
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NoSuchVersion"):
                return None
            raise

    def get_json(self, key, version_id=None):
        """(document, None), (None, None) when absent, (None, why) when unreadable."""
        body = self.get(key, version_id)
        if body is None:
            return None, None
        try:
            doc = json.loads(body)
        except ValueError as exc:
            return None, "not JSON: %s" % exc
        if not isinstance(doc, dict):
            return None, "not a JSON object"
        return doc, None

    def get_many(self, keys):
        return dict(zip(keys, self.pool.map(self.get_json, keys)))

    def versions(self, prefix):
        out = []
        for page in self.client.get_paginator("list_object_versions").paginate(Bucket=self.bucket, Prefix=prefix):
            out.extend(page.get("Versions", ()))
        return out


def _direct_queue(server, bucket):
    import buquet
    import sigv4

    return buquet.connect(bucket=bucket, endpoint=server.endpoint, region=server.region,
                          credentials=sigv4.Credentials(server.access_key, server.secret_key), use_config=False)


def _parse_ts(text):
    """RFC 3339 (as the queue writes it) -> aware datetime; independent of buquet."""
    text = text.strip().replace("z", "Z")
    if text.endswith("Z"):
        text = text[:-1] + "+00:00"
    main, _, offset = text.partition("+")
    if "." in main:
        head, frac = main.split(".", 1)
        main = head + "." + (frac + "000000")[:6]
    return datetime.fromisoformat(main + "+" + offset).astimezone(timezone.utc)


def _minute(dt):
    return "%010d" % (int(dt.timestamp()) // 60)


def _expected_index(doc):
    status = doc.get("status", "pending")
    if status == "pending":
        return ["ready/%s/%s/%s" % (doc["shard"], _minute(_parse_ts(doc["available_at"])), doc["id"])]
    if status == "running" and doc.get("lease_expires_at"):
        return ["leases/%s/%s/%s" % (doc["shard"], _minute(_parse_ts(doc["lease_expires_at"])), doc["id"])]
    return []


def _scan_tasks(bucket, known=None):
    """{task key: (doc, why)}; documents already known to be terminal are
    not read again."""
    keys = bucket.keys("tasks/")
    known = known or {}
    todo = [k for k in keys if not (k in known and known[k][0] and
                                    known[k][0].get("status") in ("completed", "failed"))]
    fresh = bucket.get_many(todo)
    return {k: (fresh[k] if k in fresh else known[k]) for k in keys}


def _unfinished(docs):
    return {k: d for k, (d, why) in docs.items() if d is None or d.get("status") not in ("completed", "failed")}


def _brief(doc):
    """What says why a task did not move: its state, who held it, since when."""
    out = {k: doc.get(k) for k in ("id", "status", "attempt", "retry_count", "worker_id", "updated_at",
                                   "available_at", "lease_expires_at", "last_error")}
    out["kind"] = doc["input"].get("kind") if isinstance(doc.get("input"), dict) else None
    return out


def _overdue(doc, slack=3.0):
    """A running task whose lease ended, or a pending one due, `slack` s ago."""
    field = {"running": "lease_expires_at", "pending": "available_at"}.get(doc.get("status"))
    return bool(field and doc.get(field)) and _parse_ts(doc[field]).timestamp() + slack < time.time()


def _sweep(queue, settled=False):
    """A sweeper pass.  settled: every process has stopped, so no index
    entry can be the first half of a write in flight (buquet.INDEX_SETTLE):
    a young one that does not fit its task is stale (e.g. the ready entry
    of a submit whose task write failed and whose clean-up failed too)."""
    import buquet

    saved = buquet.INDEX_SETTLE
    if settled:
        buquet.INDEX_SETTLE = 0.0
    try:
        sweeper = queue.sweeper(page_size=1000)
        sweeper.run_pass()
    finally:
        buquet.INDEX_SETTLE = saved
    return dict(sweeper.counts, skipped_keys=sorted(sweeper.skipped))


def _stranded(bucket, left):
    """Running tasks whose lease ended a while ago and that have no lease
    key: no monitor can see them, only a sweeper.  Each is read again, so a
    task that moved since the scan is not counted."""
    candidates = [d for d in left.values() if d is not None and d.get("status") == "running" and _overdue(d)]

    def check(doc):
        if all(bucket.get(k) is not None for k in _expected_index(doc)):
            return None
        again, _ = bucket.get_json("tasks/%s/%s.json" % (doc["shard"], doc["id"]))
        return again if again is not None and again.get("updated_at") == doc.get("updated_at") else None
    return [d for d in bucket.pool.map(check, candidates) if d is not None]


def _drain(options, bucket, queue, deadline, report):
    """Wait until every task in the bucket is completed or failed.  A
    sweeper pass runs when a running task is overdue without its lease key
    (invisible to every monitor), or when nothing has finished for a while
    (then whatever is left is stuck: a pending task without its ready key is
    invisible to workers too)."""
    docs = {}
    last_change = time.monotonic()
    last_left = None
    sweeps = report.setdefault("drain_sweeps", [])
    while True:
        scan_started = time.monotonic()
        docs = _scan_tasks(bucket, docs)
        left = _unfinished(docs)
        if not left:
            return docs, {}
        if last_left is None or len(left) != last_left:
            last_change = time.monotonic()
            last_left = len(left)
        if time.monotonic() > deadline:
            return docs, left
        quiet = time.monotonic() - last_change
        idle = quiet > options.lease + 4  # nothing finished for a while: whatever is left is stuck
        if not options.rescue and idle:
            _log(options, "drain: %d unfinished tasks idle for %.0f s; no rescue (--no-rescue)", len(left), quiet)
            return docs, left
        stranded = _stranded(bucket, left) if options.rescue else []
        if options.rescue and (stranded or idle):
            stuck = [d for d in left.values() if d is not None] if idle else stranded
            present = list(bucket.pool.map(
                lambda doc: all(bucket.get(k) is not None for k in _expected_index(doc)), stuck))
            briefs = [dict(_brief(doc), index_key_present=p) for doc, p in zip(stuck, present)]
            counts = _sweep(queue)
            counts["left"] = len(left)
            counts["stuck"] = briefs
            sweeps.append(counts)
            _log(options, "drain: %d unfinished tasks, %d running without a lease key%s: sweeper pass %s",
                 len(left), len(stranded), ", idle for %.0f s" % quiet if idle else "",
                 {k: v for k, v in counts.items() if k not in ("stuck", "skipped_keys")})
            last_change = time.monotonic()
        # Scans of a big backlog compete with the fleet for the CPUs: space them.
        time.sleep(max(1.0, 2 * (time.monotonic() - scan_started)))


def run(options, server=None, workdir=None):
    """One chaos run; returns the report (a JSON-ready dict).  `server` is an
    S3Server (tests/conftest.py); without one, SeaweedFS is started here."""
    import conftest

    started = time.monotonic()
    report = {"options": options.to_dict(), "phases": {}}
    tmp = None
    if workdir is None:
        tmp = workdir = tempfile.mkdtemp(prefix="buquet-chaos-")
    workdir = Path(workdir)
    server_proc = None
    proxy = None
    fleet = None
    bucket_reader = None
    try:
        if server is None:
            _log(options, "starting SeaweedFS")
            server_proc, server = conftest._start_seaweedfs(workdir)
        name = conftest._unique_bucket_name("chaos")
        target = server.create_bucket(name, versioned=True)
        bucket_reader = _Bucket(server, target.bucket)
        direct = _direct_queue(server, target.bucket)
        proxy = _make_proxy(server, options)
        created = {}
        for sid in SCHEDULES:
            sched = direct.create_schedule(sid, CRON_TYPE, {"job": sid, "kind": "cron", "sleep_ms": 20}, CRON,
                                           timeout=options.lease, max_retries=MAX_RETRIES)
            created[sid] = _parse_ts(sched.doc["created_at"])
        jobs, plans = make_plan(options.tasks, options.producers, options.seed)
        _log(options, "bucket %s at %s via proxy %s; seed %d; %d tasks, %d workers, %d producers",
             target.bucket, server.endpoint, proxy.endpoint, options.seed, options.tasks, options.workers,
             options.producers)

        fleet = _Fleet(options, server, target.bucket, proxy.endpoint, workdir)
        procs = [fleet.start_worker(slot, "w%d" % slot) for slot in range(options.workers)]
        fleet.wait_ready(procs)
        report["phases"]["setup"] = round(time.monotonic() - started, 1)

        # -- chaos: faults on, producers and the killer running ---------------
        t0 = time.monotonic()
        proxy.set_faults(options.faults)
        fleet.start_producers(plans)
        fleet.start_killing()
        codes = fleet.wait_producers(options.duration * 3 + 300)
        fleet.stop_killing()
        report["producer_exit_codes"] = codes
        report["phases"]["chaos"] = round(time.monotonic() - t0, 1)
        _log(options, "producers done (%s) after %.1f s; %d kills", codes, time.monotonic() - t0, len(fleet.kills))

        # -- calm: faults off, the fleet finishes; schedules off, it finishes again
        t1 = time.monotonic()
        proxy.set_faults({})
        deadline = time.monotonic() + options.drain_timeout
        _drain(options, bucket_reader, direct, deadline, report)
        for sid in SCHEDULES:
            direct.disable_schedule(sid)
        disabled_at = direct.now()
        docs, left = _drain(options, bucket_reader, direct, deadline, report)
        if left:
            report["worker_states"] = fleet.worker_states()
        report["phases"]["drain"] = round(time.monotonic() - t1, 1)
        report["unfinished_after_drain"] = len(left)
        _log(options, "drain: %d tasks, %d unfinished after %.1f s", len(docs), len(left), time.monotonic() - t1)
        fleet.check_crashes()
        fleet.stop_workers()
        report["final_sweep"] = _sweep(direct, settled=True)
        snapshot = proxy.snapshot()
        proxy.stop()
        proxy = None

        # -- the verdict -------------------------------------------------------
        t2 = time.monotonic()
        records = _read_records(fleet.records, "worker-*.jsonl")
        submissions = _read_records(fleet.records, "producer-*.jsonl")
        now = direct.now()
        check = _check(options, bucket_reader, jobs, submissions, records, fleet, created, disabled_at, now,
                       report.get("drain_sweeps", ()), report.get("worker_states", ()))
        report.update(check)
        report["phases"]["check"] = round(time.monotonic() - t2, 1)
        report["kills"] = len(fleet.kills)
        report["kill_log"] = fleet.kills
        report["crash_log"] = fleet.crashes
        report["restarts"] = len(fleet.kills) + len(fleet.crashes)
        report["faults"] = snapshot.get("faults", {})
        report["requests"] = {"total": snapshot.get("total"), "statuses": snapshot.get("statuses"),
                              "kinds": snapshot.get("kinds")}
        report["wall_seconds"] = round(time.monotonic() - started, 1)
        report["ok"] = all(i["ok"] for i in report["invariants"])
        if not report["ok"] or options.keep:
            report["workdir"] = str(workdir)
            tmp = None  # keep the logs and records of a failed run
        return report
    finally:
        if fleet is not None:
            fleet.kill_everything()
        if proxy is not None:
            proxy.stop()
        if bucket_reader is not None:
            bucket_reader.close()
        if server_proc is not None:
            server_proc.stop()
        if tmp is not None:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)


# ============================================================================
# The invariants
# ============================================================================


class _Invariant:
    def __init__(self, name, what):
        self.name = name
        self.what = what
        self.problems = []
        self.checked = 0

    def fail(self, message):
        self.problems.append(message)

    def to_dict(self):
        return {"name": self.name, "what": self.what, "ok": not self.problems, "checked": self.checked,
                "problems": len(self.problems), "examples": self.problems[:20]}


def _cron_record_key(schedule_id, due):
    key = "schedule:%s:%d" % (schedule_id, int(due.timestamp()))
    digest = hashlib.sha256(("%s:%s" % (CRON_TYPE, key)).encode("utf-8")).hexdigest()
    return "idempotency/%s/%s.json" % (CRON_TYPE, digest)


def _check(options, bucket, jobs, submissions, records, fleet, created, disabled_at, now, rescue_sweeps=(),
           worker_states=()):
    inv = {name: _Invariant(name, what) for name, what in (
        ("task_documents", "every tasks/ key is tasks/{id[0]}/{id}.json with a readable document of that id"),
        ("submitted_once", "every submitted task exists exactly once; one task per job; no unknown task"),
        ("idempotent_once", "both submits of an idempotency key got the same task, the only one for the key"),
        ("terminal_as_designed", "every task completed, or failed with PermanentError when designed to"),
        ("no_expired_lease", "no task running with an expired lease"),
        ("one_completion", "no task completed twice; its output is the final attempt's"),
        ("one_run_per_claim", "no two executions of one task with the same attempt number"),
        ("reruns_after_expiry", "a task ran again only after a designed retry, or once the previous run's "
                                "lease had ended (its process killed, or its result lost)"),
        ("index_consistent", "after the sweep every ready/ and leases/ key points to its task in that state"),
        ("schedules_once", "every due time of each schedule submitted exactly once"),
        ("producers_done", "every job submitted; producers exited 0"),
        ("workers_clean", "no worker died unless killed; every worker exited 0 on SIGTERM"),
    )}
    stats = {}

    # -- the bucket ----------------------------------------------------------
    task_keys = bucket.keys("tasks/")
    docs_by_key = bucket.get_many(task_keys)
    ready_keys = bucket.keys("ready/")
    lease_keys = bucket.keys("leases/")
    tasks = {}  # id -> doc
    seen = {}
    inv["task_documents"].checked = len(task_keys)
    for key in task_keys:
        doc, why = docs_by_key[key]
        parts = key.split("/")
        if len(parts) != 3 or not parts[2].endswith(".json"):
            inv["task_documents"].fail("%s: not a task key" % key)
            continue
        shard, task_id = parts[1], parts[2][:-5]
        seen.setdefault(task_id, []).append(key)
        if doc is None:
            inv["task_documents"].fail("%s: %s" % (key, why or "vanished"))
            continue
        if doc.get("id") != task_id or doc.get("shard") != shard or shard != task_id.replace("-", "")[:1]:
            inv["task_documents"].fail("%s: holds id %r shard %r" % (key, doc.get("id"), doc.get("shard")))
        tasks[task_id] = doc
    for task_id, keys in seen.items():
        if len(keys) > 1:
            inv["task_documents"].fail("task %s stored %d times: %s" % (task_id, len(keys), keys))

    by_job = {}
    for task_id, doc in tasks.items():
        job = doc.get("input", {}).get("job") if isinstance(doc.get("input"), dict) else None
        by_job.setdefault(job, []).append(task_id)

    # -- producers ---------------------------------------------------------
    job_of = {j["job"]: j for j in jobs}
    submitted = {}  # job -> [task ids returned]
    errored = set()
    stats["submit_errors"] = 0
    for r in submissions:
        if r.get("e") == "submitted":
            submitted.setdefault(r["job"], []).append(r["task_id"])
        if r.get("errors"):
            errored.add(r["job"])
            stats["submit_errors"] += len(r["errors"])
        if r.get("e") == "gave_up":
            inv["producers_done"].fail("job %s: gave up after %d errors, last: %s"
                                       % (r["job"], len(r["errors"]), r["errors"][-1]))
    inv["producers_done"].checked = len(jobs)
    for code in fleet_codes(fleet):
        if code != 0:
            inv["producers_done"].fail("a producer exited with %s" % (code,))
    expected_submits = {j["job"]: (2 if j["kind"] == "idem" else 1) for j in jobs}
    for job, n in expected_submits.items():
        got = len(submitted.get(job, ()))
        if got != n:
            inv["producers_done"].fail("job %s: %d successful submits, expected %d" % (job, got, n))

    # -- submitted_once, idempotent_once ------------------------------------
    strays = []
    inv["submitted_once"].checked = len(jobs)
    for job in jobs:
        name = job["job"]
        returned = set(submitted.get(name, ()))
        in_bucket = set(by_job.get(name, ()))
        for task_id in returned - in_bucket:
            inv["submitted_once"].fail("job %s: submit returned %s, which is not in the bucket" % (name, task_id))
        extra = in_bucket - returned
        if job["kind"] == "idem":
            inv["idempotent_once"].checked += 1
            if len(returned) > 1:
                inv["idempotent_once"].fail("key chaos:%s: the submits returned different tasks %s"
                                            % (name, sorted(returned)))
            if len(in_bucket) != 1:
                inv["idempotent_once"].fail("key chaos:%s: %d tasks in the bucket" % (name, len(in_bucket)))
        elif extra:
            if name in errored and returned:
                strays.extend(extra)  # a submit that raised may have written its task: at-least-once
            else:
                inv["submitted_once"].fail("job %s: %d tasks in the bucket, submit returned %s"
                                           % (name, len(in_bucket), sorted(returned)))
    stats["stray_tasks_from_failed_submits"] = len(strays)
    cron_tasks = set()
    for job, ids in by_job.items():
        if job in SCHEDULES:
            cron_tasks.update(ids)
        elif job not in job_of:
            inv["submitted_once"].fail("%d task(s) nobody submitted (job %r): %s" % (len(ids), job, ids[:3]))

    # -- terminal_as_designed, no_expired_lease ------------------------------
    kind_of = {}
    for task_id, doc in tasks.items():
        inp = doc.get("input") if isinstance(doc.get("input"), dict) else {}
        kind_of[task_id] = inp.get("kind")
    inv["terminal_as_designed"].checked = len(tasks)
    inv["no_expired_lease"].checked = len(tasks)
    statuses = {}
    for task_id, doc in tasks.items():
        status = doc.get("status")
        kind = kind_of[task_id]
        statuses[status] = statuses.get(status, 0) + 1
        if status == "running" and doc.get("lease_expires_at") and _parse_ts(doc["lease_expires_at"]) < now:
            inv["no_expired_lease"].fail("task %s (%s) running with a lease that ended %s (worker %s)"
                                         % (task_id, kind, doc["lease_expires_at"], doc.get("worker_id")))
        if kind == "perm":
            ok = status == "failed" and str(doc.get("last_error", "")).startswith("PermanentError")
        else:
            ok = status == "completed"
            if ok and kind == "resched" and not doc.get("reschedule_count"):
                ok = False
        if not ok:
            inv["terminal_as_designed"].fail("task %s (%s): %s, attempt %s, retries %s, last_error %r"
                                             % (task_id, kind, status, doc.get("attempt"),
                                                doc.get("retry_count"), doc.get("last_error")))
    stats["tasks"] = len(tasks)
    stats["tasks_by_status"] = statuses
    counts = {}
    for kind in kind_of.values():
        counts[kind] = counts.get(kind, 0) + 1
    stats["tasks_by_kind"] = counts

    # -- executions: one_run_per_claim, one_completion, duplicates -----------
    runs = {}  # task -> attempt -> {"start": [...], "return": rec, "recorded": [...], "raise": rec}
    for r in records:
        if "t" not in r:
            continue
        slot = runs.setdefault(r["t"], {}).setdefault(r.get("a"), {"start": [], "recorded": []})
        if r["e"] == "start":
            slot["start"].append(r)
        elif r["e"] == "recorded":
            slot["recorded"].append(r)
        else:
            slot[r["e"]] = r
    executions = sum(len(s["start"]) for a in runs.values() for s in a.values())
    inv["one_run_per_claim"].checked = executions
    for task_id, attempts in runs.items():
        for attempt, slot in attempts.items():
            if len(slot["start"]) > 1:
                inv["one_run_per_claim"].fail("task %s attempt %s ran %d times: %s" % (
                    task_id, attempt, len(slot["start"]), [(s["w"], s["p"]) for s in slot["start"]]))
    killed = {k["pid"]: k["time"] for k in fleet.kills}
    dup = {"killed": 0, "lost_result": 0, "unexplained": 0}
    ran_after_finish = []
    for task_id, attempts in runs.items():
        order = sorted(a for a in attempts if isinstance(a, int))
        for prev, nxt in zip(order, order[1:]):
            p = attempts[prev]
            outcome = [r.get("status") for r in p["recorded"]]
            if "pending" in outcome:
                continue  # a designed re-run: retried or rescheduled
            if "completed" in outcome or "failed" in outcome:
                ran_after_finish.append("task %s ran again (attempt %s) after attempt %s recorded %s"
                                        % (task_id, nxt, prev, outcome))
                continue
            starts = p["start"]
            pid = starts[0]["p"] if starts else None
            later = attempts[nxt]["start"]
            early = 0.0
            if starts and later and starts[0].get("lease"):
                early = _parse_ts(starts[0]["lease"]).timestamp() - later[0]["time"]
            if early > CLOCK_SLACK:
                if (p.get("raise") or {}).get("how") in ("retry", "reschedule"):
                    continue  # designed: its write landed, the process died before the hook said so
                inv["reruns_after_expiry"].fail(
                    "task %s: attempt %s started %.2f s before the lease of attempt %s ended (%s)"
                    % (task_id, nxt, early, prev, starts[0]["lease"]))
            if pid in killed and (p.get("return") is None or killed[pid] - p["return"]["time"] < 30):
                dup["killed"] += 1
            elif p.get("return") is not None or p.get("raise") is not None:
                dup["lost_result"] += 1
            else:
                dup["unexplained"] += 1
    stats["executions"] = executions
    stats["duplicate_executions"] = dict(dup, total=sum(dup.values()))
    inv["reruns_after_expiry"].checked = sum(dup.values())
    if dup["unexplained"]:
        inv["reruns_after_expiry"].fail("%d re-runs followed a run that neither finished, nor was killed, nor "
                                        "lost its result" % dup["unexplained"])

    inv["one_completion"].checked = len(tasks)
    for problem in ran_after_finish:
        inv["one_completion"].fail(problem)
    for task_id, doc in tasks.items():
        attempts = runs.get(task_id, {})
        completions = [r for s in attempts.values() for r in s["recorded"] if r.get("status") == "completed"]
        if len(completions) > 1:
            inv["one_completion"].fail("task %s: %d executions recorded a completion: %s" % (
                task_id, len(completions), [(r["a"], r["w"]) for r in completions]))
        if doc.get("status") != "completed":
            continue
        final = attempts.get(doc.get("attempt"), {})
        returned = final.get("return")
        if returned is None:
            inv["one_completion"].fail("task %s completed at attempt %s, which returned nothing (runs: %s)"
                                       % (task_id, doc.get("attempt"), sorted(attempts)))
        elif returned["out"] != doc.get("output"):
            inv["one_completion"].fail("task %s: output %r is not attempt %s's %r"
                                       % (task_id, doc.get("output"), doc.get("attempt"), returned["out"]))
    if options.history != "none":
        _check_history(options, bucket, tasks, runs, inv["one_completion"], stats)

    # -- index_consistent ------------------------------------------------------
    inv["index_consistent"].checked = len(ready_keys) + len(lease_keys) + len(tasks)
    present = set(ready_keys) | set(lease_keys)
    for key in ready_keys + lease_keys:
        task_id = key.rsplit("/", 1)[-1]
        doc = tasks.get(task_id)
        want = "pending" if key.startswith("ready/") else "running"
        if doc is None:
            inv["index_consistent"].fail("%s points to no task" % key)
        elif doc.get("status") != want:
            inv["index_consistent"].fail("%s points to a %s task" % (key, doc.get("status")))
        elif key not in _expected_index(doc):
            inv["index_consistent"].fail("%s is not the key of its task (%s)" % (key, _expected_index(doc)))
    for task_id, doc in tasks.items():
        for key in _expected_index(doc):
            if key not in present:
                inv["index_consistent"].fail("%s task %s has no %s" % (doc.get("status"), task_id, key))

    # -- schedules_once --------------------------------------------------------
    found_cron = set()
    due_checked = 0
    must_end = disabled_at - timedelta(seconds=SCHEDULE_MARGIN)
    may_end = disabled_at + timedelta(seconds=5)
    for sid, since in created.items():
        due = since.replace(second=0, microsecond=0) + timedelta(minutes=1)
        while due <= may_end:
            record, why = bucket.get_json(_cron_record_key(sid, due))
            if record is None:
                if due <= must_end:
                    inv["schedules_once"].fail("schedule %s: due time %s never submitted%s"
                                               % (sid, due.isoformat(), " (%s)" % why if why else ""))
            else:
                task_id = record.get("task_id")
                if task_id not in tasks:
                    inv["schedules_once"].fail("schedule %s due %s: record names task %s, not in the bucket"
                                               % (sid, due.isoformat(), task_id))
                elif tasks[task_id].get("input", {}).get("job") != sid:
                    inv["schedules_once"].fail("schedule %s due %s: record names task %s of job %r"
                                               % (sid, due.isoformat(), task_id, tasks[task_id]["input"]))
                found_cron.add(task_id)
            if due <= must_end:
                due_checked += 1
            due += timedelta(minutes=1)
    inv["schedules_once"].checked = due_checked
    for task_id in sorted(cron_tasks - found_cron):
        inv["schedules_once"].fail("task %s of a schedule matches none of its due times (created %s)"
                                   % (task_id, tasks[task_id].get("created_at")))
    stats["schedule_runs"] = len(found_cron)
    stats["schedule_due_times_checked"] = due_checked

    # -- workers_clean ---------------------------------------------------------
    inv["workers_clean"].checked = len(fleet.stops) + len(fleet.kills)
    for crash in fleet.crashes:
        inv["workers_clean"].fail("worker %s (pid %d) exited with %s without being killed"
                                  % (crash["worker"], crash["pid"], crash["code"]))
    for stop in fleet.stops:
        if stop["code"] != 0:
            inv["workers_clean"].fail("worker %s (pid %d) exited with %s on SIGTERM"
                                      % (stop["worker"], stop["pid"], stop["code"]))

    stats["index_keys_left"] = {"ready": len(ready_keys), "leases": len(lease_keys)}
    stats["rescued_by_sweeper"] = [dict(d, why=_why_stuck(d, runs, fleet.kills))
                                   for sweep in rescue_sweeps for d in sweep.get("stuck", ())]
    why = {}
    for d in stats["rescued_by_sweeper"]:
        reason = ("killed after a claim" if d["why"].startswith("claimed") else
                  "killed after a write that made it pending" if d["why"].startswith("moved") else
                  d["why"].split(":")[0])
        why[reason] = why.get(reason, 0) + 1
    stats["rescued_by_sweeper_why"] = why
    stats["stuck_at_end"] = [dict(_brief(d), why=_why_stuck(_brief(d), runs, fleet.kills))
                             for d in tasks.values() if d.get("status") not in ("completed", "failed")]
    for d in stats["stuck_at_end"]:
        d["workers_skipping"] = {st["worker"]: st["skipped"][d["id"]] for st in worker_states
                                 if d["id"] in st["skipped"]}
        d["workers_with_candidate"] = [st["worker"] for st in worker_states if d["id"] in st["candidates"]]
    return {"invariants": [i.to_dict() for i in inv.values()], "stats": stats}


def _why_stuck(doc, runs, kills):
    """Why a task needed the sweeper: which process died between writing the
    task and writing its index entry (the one window the design leaves to the
    sweeper), or "unexplained"."""
    if doc.get("index_key_present"):
        return "unexplained: its index key exists, yet no worker, monitor or scheduler moved it"
    updated = _parse_ts(doc["updated_at"]).timestamp() if doc.get("updated_at") else None
    attempts = runs.get(doc["id"], {})
    last = attempts.get(doc.get("attempt"))  # the execution that wrote what the sweeper found
    pid = last["start"][0]["p"] if last and last["start"] else None
    for kill in kills:
        if updated is None or not -1.0 <= kill["time"] - updated <= 5.0:
            continue
        if doc["status"] == "running" and kill["worker"] == doc.get("worker_id"):
            return "claimed by %s, which was killed %.2f s later, before its lease key was written" % (
                kill["worker"], kill["time"] - updated)
        if kill["pid"] == pid:
            return "moved to %s by %s (pid %d), killed %.2f s later, before its index key was written" % (
                doc["status"], kill["worker"], pid, kill["time"] - updated)
    if not attempts:
        return "never claimed: submitted without its ready key?"
    near = [k for k in kills if updated is not None and 0.0 <= k["time"] - updated <= 2.0]
    if near and doc["status"] == "pending":
        # Written by a monitor (a lease recovery) or a retry of another
        # process: the writer is not in the document, a kill right after is.
        return "moved to pending (last_error %r); %s killed %.2f s later, maybe its writer, before its ready key " \
               "was written" % (doc.get("last_error"), near[0]["worker"], near[0]["time"] - updated)
    return "unexplained"


def fleet_codes(fleet):
    return [p.returncode for p in fleet.producers]


def _check_history(options, bucket, tasks, runs, invariant, stats):
    """From the bucket's versions: a completed task has exactly one completed
    version (nothing rewrote it after it finished), a failed one none."""
    wanted = {}
    for task_id, doc in tasks.items():
        if doc.get("status") not in ("completed", "failed"):
            continue
        if options.history == "reruns" and len(runs.get(task_id, {})) < 2:
            continue
        wanted["tasks/%s/%s.json" % (doc["shard"], task_id)] = doc
    versions = [v for v in bucket.versions("tasks/") if v["Key"] in wanted]
    bodies = list(bucket.pool.map(lambda v: bucket.get_json(v["Key"], v["VersionId"])[0], versions))
    completed = {}
    for v, body in zip(versions, bodies):
        if body is not None and body.get("status") == "completed":
            completed.setdefault(v["Key"], []).append(body)
    for key, doc in wanted.items():
        found = completed.get(key, [])
        want = 1 if doc.get("status") == "completed" else 0
        if len(found) != want:
            outputs = [b.get("output") for b in found]
            invariant.fail("%s (%s): %d completed versions in its history, outputs %s"
                           % (key, doc.get("status"), len(found), outputs))
    stats["history_checked"] = {"tasks": len(wanted), "versions": len(versions)}


# ============================================================================
# Summary and command line
# ============================================================================


def format_summary(report):
    s = report.get("stats", {})
    o = report["options"]
    lines = [
        "chaos run: %s" % ("OK" if report.get("ok") else "FAILED"),
        "  seed %s; %d tasks (%s), %d workers x %d threads, %d producers; wall %.1f s (%s)"
        % (o["seed"], o["tasks"], ", ".join("%s %s" % kv for kv in sorted(s.get("tasks_by_kind", {}).items())),
           o["workers"], o["concurrency"], o["producers"], report.get("wall_seconds", 0),
           ", ".join("%s %.1f s" % kv for kv in report.get("phases", {}).items())),
        "  in the bucket: %s tasks %s; %s schedule runs (%s due times checked)"
        % (s.get("tasks"), s.get("tasks_by_status"), s.get("schedule_runs"), s.get("schedule_due_times_checked")),
        "  kills %s, faults %s (%s), requests %s %s"
        % (report.get("kills"), sum(report.get("faults", {}).values()), report.get("faults"),
           report.get("requests", {}).get("total"), report.get("requests", {}).get("statuses")),
        "  executions %s, duplicates %s; submit errors %s, stray tasks %s"
        % (s.get("executions"), s.get("duplicate_executions"), s.get("submit_errors"),
           s.get("stray_tasks_from_failed_submits")),
        "  sweeper: %d rescue pass(es) while draining %s; final %s"
        % (len(report.get("drain_sweeps", [])),
           [{k: v for k, v in d.items() if k in ("created", "deleted", "left")} for d in report.get("drain_sweeps", [])],
           {k: v for k, v in report.get("final_sweep", {}).items() if k != "skipped_keys"}),
    ]
    rescued = s.get("rescued_by_sweeper", ())
    for d in rescued[:10]:
        lines.append("  rescued by the sweeper: task %s (%s, %s, attempt %s): %s"
                     % (d["id"], d["kind"], d["status"], d["attempt"], d["why"]))
    if len(rescued) > 10:
        lines.append("  ... %d rescued in all" % len(rescued))
    if rescued:
        lines.append("  rescues by cause: %s" % s.get("rescued_by_sweeper_why"))
    for d in s.get("stuck_at_end", ())[:10]:
        lines.append("  stuck at the end: task %s (%s, %s, attempt %s): %s; skipped by %s"
                     % (d["id"], d["kind"], d["status"], d["attempt"], d["why"], d.get("workers_skipping")))
    if s.get("history_checked"):
        lines.append("  history: %s" % s["history_checked"])
    for inv in report.get("invariants", []):
        lines.append("  %-4s %-21s %s (%d checked)" % ("ok" if inv["ok"] else "FAIL", inv["name"], inv["what"],
                                                      inv["checked"]))
        for example in inv["examples"][:10]:
            lines.append("         - %s" % example)
        if inv["problems"] > 10:
            lines.append("         ... %d problems in all" % inv["problems"])
    if report.get("workdir"):
        lines.append("  logs and records kept in %s" % report["workdir"])
    return "\n".join(lines)


def _child_parser(p):
    p.add_argument("--endpoint", required=True)
    p.add_argument("--bucket", required=True)
    p.add_argument("--region", default="us-east-1")
    p.add_argument("--read-timeout", type=float, default=READ_TIMEOUT)
    p.add_argument("--lease", type=int, default=LEASE_SECONDS)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("worker", "producer"):
        p = argparse.ArgumentParser(prog="chaos.py " + argv[0])
        _child_parser(p)
        if argv[0] == "worker":
            p.add_argument("--id", required=True)
            p.add_argument("--records", required=True)
            p.add_argument("--concurrency", type=int, default=4)
            p.add_argument("--sweep-interval", type=float, default=5.0)
            return worker_child(p.parse_args(argv[1:]))
        p.add_argument("--plan", required=True)
        p.add_argument("--out", required=True)
        p.add_argument("--duration", type=float, default=0.0)
        return producer_child(p.parse_args(argv[1:]))

    p = argparse.ArgumentParser(prog="chaos.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", type=int, default=3000, help="tasks the producers submit (3000)")
    p.add_argument("--workers", type=int, default=4, help="worker processes (4)")
    p.add_argument("--producers", type=int, default=2, help="producer processes (2)")
    p.add_argument("--concurrency", type=int, default=4, help="handler threads per worker (4)")
    p.add_argument("--seed", type=int, help="seeds the plan, the killer and the proxy (default: random)")
    p.add_argument("--faults", type=parse_faults, default=None,
                   help="KIND=P,... with KIND in %s; 'none' for no faults (default: %s)"
                   % (", ".join(FAULT_KINDS), ",".join("%s=%s" % kv for kv in DEFAULT_FAULTS.items())))
    p.add_argument("--kill-interval", type=float, default=3.0, help="mean seconds between SIGKILLs (3)")
    p.add_argument("--duration", type=float, help="seconds the producers spread their submits over (tasks/50)")
    p.add_argument("--latency-ms", type=float, default=1.0, help="proxy latency per request (1)")
    p.add_argument("--jitter-ms", type=float, default=1.0, help="proxy latency jitter (1)")
    p.add_argument("--lease", type=int, default=LEASE_SECONDS, help="task lease seconds (%d)" % LEASE_SECONDS)
    p.add_argument("--drain-timeout", type=float, default=180.0, help="seconds to wait for the backlog (180)")
    p.add_argument("--history", choices=("all", "reruns", "none"), default="all",
                   help="tasks whose version history is read (all)")
    p.add_argument("--no-rescue", action="store_true",
                   help="no sweeper pass while draining, and the workers' embedded sweeper at its production "
                        "interval: tasks stranded by a kill stay stuck (and fail the run)")
    p.add_argument("--worker-sweep-interval", type=float,
                   help="seconds between the workers' embedded sweeper steps (5; 300 with --no-rescue)")
    p.add_argument("--keep", action="store_true", help="keep the working directory (logs, records)")
    p.add_argument("--json", help="write the report here")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    options = Options(tasks=args.tasks, workers=args.workers, producers=args.producers, seed=args.seed,
                      faults=args.faults, kill_interval=args.kill_interval, duration=args.duration,
                      concurrency=args.concurrency, latency_ms=args.latency_ms, jitter_ms=args.jitter_ms,
                      lease=args.lease, drain_timeout=args.drain_timeout, history=args.history,
                      rescue=not args.no_rescue, worker_sweep=args.worker_sweep_interval, keep=args.keep,
                      verbose=not args.quiet)
    report = run(options)
    print(format_summary(report))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1, sort_keys=True, default=str)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
