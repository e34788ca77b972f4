"""The worker end to end on real S3 servers (moto and SeaweedFS, see
conftest.py): the seed's example verbatim, handler outcomes, cancellation,
lease extension, recovery after kill -9, graceful shutdown on signals, drain
mode, and many worker processes racing over one backlog (SeaweedFS only:
moto's conditional PUT is not atomic under concurrency).

Workers that must be signalled or killed run in their own process
(tests/worker_app.py or the seed's program); the others run in a thread of
the test.  Short poll intervals and leases keep every test to a few seconds.
"""

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from helpers import running
from helpers import wait_for as _wait_for

import buquet
import sigv4
from buquet import PermanentError, RescheduleError, RetryableError, RetryPolicy, Worker, worker_key

ROOT = Path(__file__).resolve().parent.parent
APP = Path(__file__).resolve().parent / "worker_app.py"
FAST = RetryPolicy(100, 200, 2.0, 0.0)


# ============================================================================
# Helpers
# ============================================================================


def queue_for(target):
    return buquet.connect(bucket=target.bucket, endpoint=target.endpoint, region=target.region,
                          credentials=sigv4.Credentials(target.access_key, target.secret_key))


def env_for(target, **extra):
    """A clean environment naming the bucket the way a deployment would."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AWS_", "S3_", "BUQUET_", "WORKER_APP_")) and "proxy" not in k.lower()}
    env.update(S3_BUCKET=target.bucket, S3_ENDPOINT=target.endpoint, S3_REGION=target.region,
               AWS_ACCESS_KEY_ID=target.access_key, AWS_SECRET_ACCESS_KEY=target.secret_key,
               PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def make_worker(queue, worker_id="w-test", shards=None, **options):
    settings = dict(poll_min=0.02, poll_max=0.2, monitor=False, scheduler=False, heartbeat_interval=60.0,
                    grace_period=5.0, concurrency=1)
    settings.update(options)
    return Worker(queue, worker_id, shards, **settings)


def wait_for(predicate, timeout=10.0, interval=0.05, what="condition"):
    return _wait_for(predicate, timeout, interval, what)


def status_of(queue, task_id):
    task = queue.get(task_id)
    return task.status if task else None


def submit_in(queue, shards, task_type, input=None, **options):
    """Submit a task whose (random) id falls in one of `shards`."""
    while True:
        task_id = str(uuid.uuid4())
        if task_id[0] in shards:
            break
    build = queue._new_document(task_type, input, **options)
    return queue._create(build(task_id, queue.now()))


class Process:
    """A child Python process whose stdout is collected by a thread; waits
    for the "ready" line worker_app prints from on_startup."""

    def __init__(self, argv, env, cwd):
        self.popen = subprocess.Popen(argv, env=env, cwd=str(cwd), stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True)
        self.lines = []
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.popen.stdout:
            self.lines.append(line)
            if line.startswith("ready"):
                self._ready.set()

    @property
    def output(self):
        return "".join(self.lines)

    def wait_ready(self, timeout=20):
        if not self._ready.wait(timeout):
            self.kill()
            raise AssertionError("worker did not start:\n" + self.output)

    def signal(self, signum):
        self.popen.send_signal(signum)

    def wait(self, timeout):
        try:
            code = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError("worker did not exit within %.0f s:\n%s" % (timeout, self.output))
        self._reader.join(5)
        return code

    def kill(self):
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(10)


@pytest.fixture
def processes():
    started = []

    def start(argv, env, cwd):
        proc = Process(argv, env, cwd)
        started.append(proc)
        return proc

    yield start
    for proc in started:  # by PID, whatever happened in the test
        proc.kill()


def start_app(processes, target, tmp_path, *args, **env):
    proc = processes([sys.executable, str(APP), *args], env_for(target, WORKER_APP_OUT=tmp_path, **env), tmp_path)
    proc.wait_ready()
    return proc


# ============================================================================
# The seed's example, verbatim
# ============================================================================

SEED_ASYNC = '''\
import asyncio

from buquet import connect, Worker


async def main():
    queue = await connect()
    task = await queue.submit("send_email", {"to": "user@example.com"})
    worker = Worker(queue, "worker-1", ["0", "1", "2", "3"])

    @worker.task("send_email")
    async def handle(input):
        return {"sent": True}

    await worker.run()


asyncio.run(main())
'''

SEED_SYNC = '''\
from buquet import connect, Worker

queue = connect()
task = queue.submit("send_email", {"to": "user@example.com"})
worker = Worker(queue, "worker-1", ["0", "1", "2", "3"])


@worker.task("send_email")
def handle(input):
    return {"sent": True}


worker.run()

import sys  # not part of the seed: proves the synchronous form never needed asyncio
assert "asyncio" not in sys.modules
'''


@pytest.mark.parametrize("program", [SEED_ASYNC, SEED_SYNC], ids=["async", "sync"])
def test_the_seed_example_runs_verbatim(s3, tmp_path, processes, program):
    queue = queue_for(s3)
    (tmp_path / "seed.py").write_text(program)
    proc = processes([sys.executable, "seed.py"], env_for(s3), tmp_path)
    # The example submits one task with a random id: it lands in the worker's
    # shards 0-3 one time in four.  Find it in the bucket.
    keys = wait_for(lambda: queue.store.list("tasks/")[0], timeout=20, what="the example's submit")
    assert len(keys) == 1
    example_id = keys[0].split("/")[2][:-5]
    ours = [example_id] if example_id[0] in "0123" else []
    # A task of ours in the example's shards proves the worker serves them.
    ours.append(submit_in(queue, "0123", "send_email", {"to": "test@example.com"}).id)
    for task_id in ours:
        wait_for(lambda: status_of(queue, task_id) == "completed", timeout=15, what="completion")
        assert queue.get(task_id).output == {"sent": True}
    assert queue.store.get(worker_key("worker-1")) is not None
    proc.signal(signal.SIGTERM)
    assert proc.wait(15) == 0, proc.output
    assert queue.store.get(worker_key("worker-1")) is None
    if example_id[0] not in "0123":
        assert status_of(queue, example_id) == "pending"  # not the worker's shard


# ============================================================================
# Handler outcomes on a real bucket
# ============================================================================


def test_retries_back_off_then_succeed(s3):
    queue = queue_for(s3)
    calls = []

    def handler(input, ctx):
        calls.append((time.monotonic(), ctx.attempt))
        if ctx.attempt < 3:
            raise RetryableError("upstream 503")
        return {"attempt": ctx.attempt}

    worker = make_worker(queue)
    worker.task("flaky")(handler)
    delays = []
    worker.on_error(lambda task, exc: delays.append((task.available_at - task.updated_at).total_seconds()))
    task = queue.submit("flaky", {}, retry_policy=RetryPolicy(300, 1000, 2.0, 0.0))
    with running(worker):
        wait_for(lambda: status_of(queue, task.id) == "completed", what="completion")
    final = queue.get(task.id)
    assert (final.retry_count, final.attempt, final.output, final.last_error) == (2, 3, {"attempt": 3}, None)
    assert [a for _, a in calls] == [1, 2, 3]
    # The backoff, in the server's time the documents are written in: 300
    # ms, then 600 ms.  (Local gaps between calls are not compared: the
    # queue's estimate of the server clock, from whole-second Date headers,
    # may still move by a fraction of a second.)
    assert delays == [0.3, 0.6]
    assert calls[2][0] - calls[0][0] > 0.4


def test_retries_run_out_and_the_task_fails_with_the_last_error(s3):
    queue = queue_for(s3)
    worker = make_worker(queue)

    @worker.task("down")
    def handler(input):
        raise ConnectionError("net down")

    task = queue.submit("down", {}, max_retries=1, retry_policy=FAST)
    with running(worker):
        wait_for(lambda: status_of(queue, task.id) == "failed", what="failure")
    final = queue.get(task.id)
    assert (final.retry_count, final.attempt, final.last_error) == (1, 2, "ConnectionError: net down")


def test_a_permanent_error_fails_at_once(s3):
    queue = queue_for(s3)
    worker = make_worker(queue)

    @worker.task("bad")
    def handler(input):
        raise PermanentError("bad input")

    task = queue.submit("bad", {})
    with running(worker):
        wait_for(lambda: status_of(queue, task.id) == "failed", what="failure")
    final = queue.get(task.id)
    assert (final.retry_count, final.attempt, final.last_error) == (0, 1, "PermanentError: bad input")
    assert s3_keys(queue, "leases/") == [] and s3_keys(queue, "ready/") == []


def s3_keys(queue, prefix):
    return queue.store.list(prefix)[0]


def test_a_reschedule_runs_the_task_again_after_the_delay(s3):
    queue = queue_for(s3)
    calls = []

    def handler(input, ctx):
        calls.append(time.monotonic())
        if ctx.attempt == 1:
            raise RescheduleError(1)
        return {"attempt": ctx.attempt}

    worker = make_worker(queue)
    worker.task("later")(handler)
    delays = []
    worker.on_error(lambda task, exc: delays.append((task.available_at - task.updated_at).total_seconds()))
    task = queue.submit("later", {})
    with running(worker):
        wait_for(lambda: status_of(queue, task.id) == "completed", what="completion")
    final = queue.get(task.id)
    assert (final.reschedule_count, final.retry_count, final.attempt) == (1, 0, 2)
    assert delays == [1.0]  # in server time; the local gap may differ by the clock estimate's error
    assert calls[1] - calls[0] > 0.4


def test_a_running_task_is_cancelled_when_its_handler_sees_the_request(s3):
    queue = queue_for(s3)
    started = threading.Event()

    def handler(input, ctx):
        started.set()
        deadline = time.monotonic() + 20
        while not ctx.is_cancellation_requested() and time.monotonic() < deadline:
            time.sleep(0.05)
        return {"stopped": True}

    worker = make_worker(queue)
    worker.task("long")(handler)
    task = queue.submit("long", {})
    with running(worker):
        assert started.wait(10)
        queue.request_cancellation(task.id, reason="user asked", cancelled_by="test")
        wait_for(lambda: status_of(queue, task.id) == "cancelled", what="cancellation")
    final = queue.get(task.id)
    assert (final.cancelled_by, final.last_error, final.output, final.lease_id) == ("test", "user asked", None, None)
    assert s3_keys(queue, "leases/") == []


def test_a_handler_extending_its_lease_keeps_the_task_past_its_timeout(s3):
    queue = queue_for(s3)

    def handler(input, ctx):
        end = time.monotonic() + 3.5
        while time.monotonic() < end:
            ctx.extend_lease(2)
            time.sleep(0.5)
        return {"attempt": ctx.attempt}

    # The monitor runs every ~0.2 s: without the extensions it would take
    # the task back after 2 s.
    worker = make_worker(queue, monitor=True, monitor_interval=0.2, heartbeat_interval=0.2)
    worker.task("long")(handler)
    task = queue.submit("long", {}, timeout=2, retry_policy=FAST)
    with running(worker):
        wait_for(lambda: status_of(queue, task.id) == "completed", timeout=15, what="completion")
    final = queue.get(task.id)
    assert (final.attempt, final.retry_count, final.output) == (1, 0, {"attempt": 1})
    wait_for(lambda: s3_keys(queue, "leases/") == [], timeout=5, what="no lease key left")


def test_drain_mode_works_through_the_backlog_and_returns(s3):
    queue = queue_for(s3)
    tasks = queue.submit_many([("job", {"n": i}) for i in range(20)])
    worker = make_worker(queue, drain=True, concurrency=4, worker_id="drainer")
    worker.task("job")(lambda input: {"n": input["n"]})
    started = time.monotonic()
    assert worker.run(install_signal_handlers=False) == 0
    assert time.monotonic() - started < 20
    for task in tasks:
        final = queue.get(task.id)
        assert (final.status, final.output, final.attempt) == ("completed", {"n": task.input["n"]}, 1)
    assert worker.completed == 20
    assert s3_keys(queue, "ready/") == [] and s3_keys(queue, "leases/") == []
    assert queue.store.get(worker_key("drainer")) is None


# ============================================================================
# Processes: kill -9, signals
# ============================================================================


def test_a_task_of_a_killed_worker_is_recovered_after_its_lease_and_completed_by_another(s3, tmp_path, processes):
    queue = queue_for(s3)
    victim = start_app(processes, s3, tmp_path, "--worker-id", "victim", "--no-monitor")
    task = queue.submit("sleep", {"seconds": 60}, timeout=2, retry_policy=FAST)
    wait_for(lambda: (tmp_path / ("started-%s-1" % task.id)).exists(), what="the handler's start")
    # The lease key is written in the background right after the claim.
    wait_for(lambda: s3_keys(queue, "leases/"), timeout=5, what="the lease key")
    victim.popen.kill()  # SIGKILL: no requeue, no deregistration
    assert victim.wait(10) == -signal.SIGKILL
    assert status_of(queue, task.id) == "running"

    rescuer = make_worker(queue, "rescuer", monitor=True, monitor_interval=0.2, heartbeat_interval=0.2)
    rescuer.task("sleep")(lambda input, ctx: {"attempt": ctx.attempt, "by": ctx.worker_id})
    with running(rescuer):
        wait_for(lambda: status_of(queue, task.id) == "completed", timeout=15, what="recovery")
    final = queue.get(task.id)
    assert (final.output, final.attempt, final.retry_count) == ({"attempt": 2, "by": "rescuer"}, 2, 1)
    assert queue.store.get(worker_key("victim")) is not None  # a SIGKILLed worker cannot deregister


@pytest.mark.parametrize("signum, mode", [(signal.SIGTERM, "sync"), (signal.SIGINT, "async")])
def test_a_signal_requeues_a_task_that_outlives_the_grace_period_and_the_worker_exits_0(
        s3, tmp_path, processes, signum, mode):
    queue = queue_for(s3)
    args = ["--worker-id", "graceful", "--grace-period", "0.5", "--no-monitor"]
    if mode == "async":
        args.append("--async")
    proc = start_app(processes, s3, tmp_path, *args)
    task = queue.submit("sleep", {"seconds": 60})
    wait_for(lambda: (tmp_path / ("started-%s-1" % task.id)).exists(), what="the handler's start")
    assert queue.store.get(worker_key("graceful")) is not None
    sent = time.monotonic()
    proc.signal(signum)
    assert proc.wait(15) == 0, proc.output
    assert time.monotonic() - sent < 5  # the grace period, then the requeue
    assert "stopped 0" in proc.output
    final = queue.get(task.id)
    assert (final.status, final.retry_count, final.attempt, final.lease_id, final.worker_id) == (
        "pending", 0, 1, None, None)
    assert len(s3_keys(queue, "ready/")) == 1 and s3_keys(queue, "leases/") == []
    assert queue.store.get(worker_key("graceful")) is None


def test_a_handler_that_ends_within_the_grace_period_completes_before_exit(s3, tmp_path, processes):
    queue = queue_for(s3)
    proc = start_app(processes, s3, tmp_path, "--worker-id", "patient", "--grace-period", "10", "--no-monitor")
    task = queue.submit("sleep", {"seconds": 1})
    wait_for(lambda: (tmp_path / ("started-%s-1" % task.id)).exists(), what="the handler's start")
    proc.signal(signal.SIGTERM)
    assert proc.wait(15) == 0, proc.output
    assert status_of(queue, task.id) == "completed"


def test_a_second_signal_exits_at_once(s3, tmp_path, processes):
    queue = queue_for(s3)
    proc = start_app(processes, s3, tmp_path, "--worker-id", "impatient", "--grace-period", "30", "--no-monitor")
    task = queue.submit("sleep", {"seconds": 60})
    wait_for(lambda: (tmp_path / ("started-%s-1" % task.id)).exists(), what="the handler's start")
    proc.signal(signal.SIGTERM)
    time.sleep(0.3)
    sent = time.monotonic()
    proc.signal(signal.SIGTERM)
    assert proc.wait(10) == 128 + signal.SIGTERM
    assert time.monotonic() - sent < 2
    # Nothing was written on the way out: the lease brings the task back.
    assert status_of(queue, task.id) == "running"


# ============================================================================
# Many workers in separate processes (SeaweedFS: atomic conditional writes)
# ============================================================================

PROCESSES = 4
PER_PROCESS = 4
TASKS = 300


def test_many_worker_processes_run_every_task_exactly_once(seaweed_s3, tmp_path, processes):
    queue = queue_for(seaweed_s3)
    workers = [start_app(processes, seaweed_s3, tmp_path, "--worker-id", "many-%d" % i,
                         "--concurrency", str(PER_PROCESS), "--poll-max", "0.2", "--no-monitor")
               for i in range(PROCESSES)]
    tasks = queue.submit_many([("record", {"n": i}) for i in range(TASKS)])  # default 300 s leases

    def lines():
        out = []
        for path in tmp_path.glob("*.log"):
            out.extend(line.split(",") for line in path.read_text().splitlines())
        return out

    started = time.monotonic()
    wait_for(lambda: len({line[0] for line in lines()}) >= TASKS, timeout=90, interval=0.2, what="every task run")
    # Every handler has returned; wait for the last completions to be written.
    wait_for(lambda: not s3_keys(queue, "leases/") and not s3_keys(queue, "ready/"), timeout=30,
             what="empty indexes")
    elapsed = time.monotonic() - started
    for proc in workers:
        proc.signal(signal.SIGTERM)
    for proc in workers:
        assert proc.wait(20) == 0, proc.output

    runs = lines()
    by_task = {}
    for task_id, attempt, pid in runs:
        by_task.setdefault(task_id, []).append((int(attempt), int(pid)))
    duplicates = sum(len(v) - 1 for v in by_task.values())
    per_process = sorted(sum(1 for _, _, pid in runs if pid == str(p.popen.pid)) for p in workers)
    print("\n%d tasks, %d processes x %d: %.1f s, %d duplicate executions, per process %s"
          % (TASKS, PROCESSES, PER_PROCESS, elapsed, duplicates, per_process))
    assert set(by_task) == {t.id for t in tasks}
    # No lease expired (300 s leases), so no task may have run twice.
    assert duplicates == 0, {k: v for k, v in by_task.items() if len(v) > 1}
    finals = queue._map(lambda t: queue.get(t.id), tasks)
    for task, final in zip(tasks, finals):
        assert (final.status, final.attempt, final.retry_count) == ("completed", 1, 0), final.doc
        assert final.output == {"pid": by_task[task.id][0][1]}
    assert sum(1 for n in per_process if n > 0) >= 2  # the work was shared
    for i in range(PROCESSES):
        assert queue.store.get(worker_key("many-%d" % i)) is None
