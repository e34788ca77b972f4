#!/usr/bin/env python3
"""Benchmark: our SigV4 S3 client (sigv4.S3Client) against boto3 on the same moto server.

Measures, for both clients in one run:

  * client CPU per request (user + sys of the client process, request loop only)
    for PUT, GET and LIST, sequential and with 8 threads sharing one client;
  * requests per second of the same loops (bounded by the moto server: see README);
  * import time (`-X importtime` cumulative of the top-level module, and the wall
    time of `python -c "import X"` minus that of `python -c pass`);
  * time from process start to the first completed request (wall time of a child
    that imports the client, creates it, does one PUT and exits, measured from here,
    minus the bare interpreter start), with that child's CPU and peak RSS;
  * peak RSS (VmHWM from /proc; ru_maxrss elsewhere) of every child.

Every measurement runs in a child process of its own, so import time, RSS and CPU
belong to one client only; the moto server runs in yet another process, so its CPU
is never counted.  Children are started with a short `-c` program (not this file),
so their RSS holds the interpreter, the client and the loop, nothing of the harness.
Our modules are byte-compiled first (`compileall`) and children run without
PYTHONDONTWRITEBYTECODE, so both clients import from .pyc files, as installed.

    .venv/bin/python benchmarks/bench_client.py            # full run, about 2-3 minutes
    .venv/bin/python benchmarks/bench_client.py --quick    # smoke run, about 20 s
    .venv/bin/python benchmarks/bench_client.py --endpoint http://127.0.0.1:5000

Without --endpoint a moto server is started on a free port of 127.0.0.1 and stopped
by its PID at the end, also on error or Ctrl-C.  The parent creates the buckets and
objects with boto3 (never with the code under test).
"""

import os
import sys

# Nothing else at module level: the children do not import this file, but keep the
# parent's own imports inside main() anyway so that `import bench_client` is cheap.

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REGION = "us-east-1"
DEFAULT_ACCESS_KEY = "bench-access-key"
DEFAULT_SECRET_KEY = "bench-secret-key-not-a-real-credential"
CLIENTS = ("sigv4", "boto3")
OPS = ("PUT", "GET", "LIST")
LIST_KEYS = 100  # keys under the listed prefix
KEYSET = 100  # PUT overwrites and GET reads this many keys per thread, round robin

# A task document of about 200 bytes, like the ones buquet writes.
TASK_BODY = (
    b'{"id":"0192f3a4-7b1c-7d2e-9f00-1a2b3c4d5e6f","queue":"default",'
    b'"task_type":"send_email","input":{"to":"user@example.com","template":"welcome"},'
    b'"status":"pending","attempt":0,"max_retries":3,"created_at":"2025-01-01T00:00:00Z"}'
)

# ---------------------------------------------------------------------------
# The child programs (run with `python -c`, cwd = repository root)
# ---------------------------------------------------------------------------

# Shared prologue: makes a client and the three operations as plain callables.
_CLIENT_CODE = r'''
import sys
client_name, endpoint, ak, sk = sys.argv[1:5]
if client_name == "sigv4":
    import sigv4
    c = sigv4.S3Client(endpoint=endpoint, region="us-east-1",
                       credentials=sigv4.Credentials(ak, sk))
    def put(bucket, key, body):
        c.put_object(bucket, key, body)
    def get(bucket, key):
        return c.get_object(bucket, key).body
    def lst(bucket, prefix):
        return len(c.list_objects_v2(bucket, prefix=prefix, max_keys=1000).contents)
elif client_name == "boto3":
    import boto3
    import botocore.config
    c = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                     aws_access_key_id=ak, aws_secret_access_key=sk,
                     config=botocore.config.Config(s3={"addressing_style": "path"}))
    def put(bucket, key, body):
        c.put_object(Bucket=bucket, Key=key, Body=body)
    def get(bucket, key):
        return c.get_object(Bucket=bucket, Key=key)["Body"].read()
    def lst(bucket, prefix):
        return len(c.list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=1000)["Contents"])
else:
    raise SystemExit("unknown client %r" % client_name)
'''

# Peak RSS of this process, printed last by every child.  VmHWM, not ru_maxrss:
# on Linux ru_maxrss survives exec(), so a child would report at least the RSS its
# parent (this harness, with boto3 imported for the setup) had when it forked.
PEAK_RSS_CODE = r'''
def _peak_rss():
    import sys
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024
'''
PRINT_PEAK_RSS = PEAK_RSS_CODE + "print('PEAK_RSS', _peak_rss())\n"

# Import, create, one PUT, exit: the "process start to first request" child.
STARTUP_CODE = _CLIENT_CODE + r'''
put(sys.argv[5], sys.argv[6], sys.argv[7].encode())
''' + PRINT_PEAK_RSS

# The request loop child.  argv: client endpoint ak sk op bucket prefix n threads
# warmup rounds body.  Prints one JSON object on stdout.
LOOP_CODE = _CLIENT_CODE + PEAK_RSS_CODE + r'''
import threading, time
op, bucket, prefix = sys.argv[5:8]
n, threads, warmup, rounds = (int(x) for x in sys.argv[8:12])
body = sys.argv[12].encode()
KEYSET, LIST_KEYS = 100, 100

def worker_fn(tid):
    """The loop for one thread: `count` requests of `op`, checked in the warm-up."""
    if op == "PUT":
        keys = ["%s%d/%d" % (prefix, tid, i) for i in range(KEYSET)]
        def one(i):
            put(bucket, keys[i % KEYSET], body)
        def check():
            assert get(bucket, keys[0]) == body
    elif op == "GET":
        keys = ["%s%d" % (prefix, i) for i in range(KEYSET)]
        def one(i):
            get(bucket, keys[(i + tid * 13) % KEYSET])
        def check():
            assert get(bucket, keys[0]) == body, "GET returned the wrong body"
    elif op == "LIST":
        def one(i):
            lst(bucket, prefix)
        def check():
            got = lst(bucket, prefix)
            assert got == LIST_KEYS, "LIST returned %d keys, expected %d" % (got, LIST_KEYS)
    else:
        raise SystemExit("unknown op %r" % op)
    return one, check

per_thread = n // threads // rounds
ready = threading.Barrier(threads + 1)
go = [threading.Barrier(threads + 1) for _ in range(rounds)]
done = [threading.Barrier(threads + 1) for _ in range(rounds)]
errors = []

def thread_main(tid):
    try:
        one, check = worker_fn(tid)
        for i in range(warmup):
            one(i)
        check()
    except BaseException as exc:
        errors.append(repr(exc))
        ready.abort()
        raise
    ready.wait()
    for r in range(rounds):
        go[r].wait()
        try:
            for i in range(per_thread):
                one(i)
        except BaseException as exc:
            errors.append(repr(exc))
            done[r].abort()
            raise
        done[r].wait()

results = []
if threads == 1:
    one, check = worker_fn(0)
    for i in range(warmup):
        one(i)
    check()
    for r in range(rounds):
        c0, w0 = time.process_time(), time.perf_counter()
        for i in range(per_thread):
            one(i)
        results.append((time.process_time() - c0, time.perf_counter() - w0))
else:
    ts = [threading.Thread(target=thread_main, args=(t,), daemon=True) for t in range(threads)]
    for t in ts:
        t.start()
    try:
        ready.wait()
        for r in range(rounds):
            c0, w0 = time.process_time(), time.perf_counter()
            go[r].wait()
            done[r].wait()
            results.append((time.process_time() - c0, time.perf_counter() - w0))
    except threading.BrokenBarrierError:
        raise SystemExit("a worker thread failed: %s" % "; ".join(errors))
    for t in ts:
        t.join()

peak = _peak_rss()
import json
print(json.dumps({"requests": per_thread * threads * rounds, "per_round": per_thread * threads,
                  "rounds": results, "peak_rss": peak}))
'''


# ---------------------------------------------------------------------------
# Parent side
# ---------------------------------------------------------------------------


def _median(values):
    import statistics

    return statistics.median(values)


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MotoServer:
    """`python -m moto.server` on a free loopback port, stopped by its PID."""

    def __init__(self, workdir):
        import subprocess

        self.port = _free_port()
        self.endpoint = "http://127.0.0.1:%d" % self.port
        self.log_path = os.path.join(workdir, "moto.log")
        with open(self.log_path, "wb") as log:
            self.popen = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches us only; we stop it in order
            )

    def wait_ready(self, timeout=30.0):
        import time
        import urllib.error
        import urllib.request

        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise RuntimeError("moto server exited at startup:\n" + self.log_tail())
            try:
                opener.open(self.endpoint + "/", timeout=1).close()
                return
            except urllib.error.HTTPError:
                return  # it answered
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("moto server not ready after %.0f s:\n%s" % (timeout, self.log_tail()))

    def log_tail(self, lines=30):
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError as exc:
            return "(no log: %s)" % exc

    def stop(self):
        import signal
        import subprocess

        if self.popen.poll() is not None:
            return
        try:
            os.kill(self.popen.pid, signal.SIGTERM)
            self.popen.wait(10)
        except subprocess.TimeoutExpired:
            os.kill(self.popen.pid, signal.SIGKILL)
            self.popen.wait(10)
        except ProcessLookupError:
            pass


def _child_env():
    env = dict(os.environ)
    # Loopback never goes through a proxy, whatever HTTP(S)_PROXY says (both clients
    # honour NO_PROXY); and no AWS config file may change boto3's behaviour.
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    env["AWS_CONFIG_FILE"] = os.devnull
    env["AWS_SHARED_CREDENTIALS_FILE"] = os.devnull
    env["AWS_EC2_METADATA_DISABLED"] = "true"
    env.pop("PYTHONPATH", None)
    # With it set, nothing would stop `import sigv4` from recompiling a stale or missing
    # .pyc on every run, while boto3's .pyc files come from its install: unfair.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


# Modules of this repository that get byte-compiled before anything is timed.
REPO_MODULES = ("sigv4.py", "buquet.py", "cron.py")


def compile_repo_modules(env):
    """Write the .pyc files of this repository's modules, as an installed wheel would.

    boto3 and botocore in site-packages got theirs at install time; our modules are
    imported from the working tree, and with PYTHONDONTWRITEBYTECODE set (as on some
    machines) every `import sigv4` would recompile the source, which is most of its
    import time.  So: compileall first, children run without PYTHONDONTWRITEBYTECODE
    (see _child_env), and a child checks that sigv4 really loads from a current .pyc."""
    import subprocess

    subprocess.run([sys.executable, "-m", "compileall", "-q"] + list(REPO_MODULES),
                   cwd=REPO, env=env, check=True)
    check = ("import importlib.util, os, sigv4\n"
             "src, pyc = sigv4.__file__, sigv4.__spec__.cached\n"
             "print(src)\n"
             "assert os.path.dirname(src) == os.getcwd(), 'sigv4 not imported from the repo: ' + src\n"
             "assert pyc and os.path.exists(pyc), 'no .pyc for ' + src\n"
             "assert os.stat(pyc).st_mtime >= os.stat(src).st_mtime, 'stale .pyc for ' + src\n")
    proc = subprocess.run([sys.executable, "-c", check], cwd=REPO, env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError("byte-compiled sigv4 check failed:\n" + proc.stdout + proc.stderr)


def spawn_measured(argv, env):
    """Run argv (a `-c` program ending with PRINT_PEAK_RSS) to completion; return
    (wall seconds, cpu seconds, peak RSS bytes, output).  Wall time is from just
    before the spawn to the reaped exit; CPU comes from wait4(), so it is the child's
    own, interpreter start included; peak RSS is what the child printed."""
    import tempfile
    import time

    with tempfile.TemporaryFile() as out:
        actions = [
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
            (os.POSIX_SPAWN_DUP2, out.fileno(), 1),
            (os.POSIX_SPAWN_DUP2, out.fileno(), 2),
        ]
        prev = os.getcwd()
        os.chdir(REPO)  # posix_spawn has no cwd argument; `-c` puts the cwd on sys.path
        try:
            t0 = time.perf_counter()
            pid = os.posix_spawn(argv[0], argv, env, file_actions=actions)
            _, status, ru = os.wait4(pid, 0)
            wall = time.perf_counter() - t0
        finally:
            os.chdir(prev)
        out.seek(0)
        text = out.read().decode("utf-8", "replace")
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise RuntimeError("child failed (exit %d): %s\n%s" % (code, " ".join(argv[:3]), text))
    peak = [int(line.split()[1]) for line in text.splitlines() if line.startswith("PEAK_RSS ")]
    if not peak:
        raise RuntimeError("child printed no PEAK_RSS: %s\n%s" % (" ".join(argv[:3]), text))
    return wall, ru.ru_utime + ru.ru_stime, peak[-1], text


def run_loop_child(client, endpoint, ak, sk, op, bucket, prefix, n, threads, warmup, rounds, env):
    import json
    import subprocess

    argv = [sys.executable, "-c", LOOP_CODE, client, endpoint, ak, sk, op, bucket, prefix,
            str(n), str(threads), str(warmup), str(rounds), TASK_BODY.decode()]
    proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError("%s %s x%d child failed:\n%s%s" % (client, op, threads, proc.stdout, proc.stderr))
    data = json.loads(proc.stdout.strip().splitlines()[-1])
    cpu = sum(r[0] for r in data["rounds"])
    wall = sum(r[1] for r in data["rounds"])
    per_round = [r[0] / data["per_round"] for r in data["rounds"]]
    return {
        "requests": data["requests"],
        "cpu_s": cpu,
        "wall_s": wall,
        "cpu_per_req_us": cpu / data["requests"] * 1e6,
        "cpu_per_req_round_us": [x * 1e6 for x in per_round],
        "req_per_s": data["requests"] / wall,
        "maxrss": data["peak_rss"],
    }


def merge_children(parts):
    """One client's figures for a row from its children's."""
    requests = sum(p["requests"] for p in parts)
    cpu = sum(p["cpu_s"] for p in parts)
    wall = sum(p["wall_s"] for p in parts)
    return {
        "requests": requests,
        "cpu_s": cpu,
        "wall_s": wall,
        "cpu_per_req_us": cpu / requests * 1e6,
        "cpu_per_req_round_us": [x for p in parts for x in p["cpu_per_req_round_us"]],
        "cpu_per_req_child_us": [p["cpu_per_req_us"] for p in parts],
        "req_per_s": requests / wall,
        "maxrss": max(p["maxrss"] for p in parts),
    }


def importtime_cumulative(module, env, runs):
    """Median over runs of the cumulative `-X importtime` microseconds of `module`."""
    import re
    import subprocess

    values = []
    for _ in range(runs):
        proc = subprocess.run([sys.executable, "-X", "importtime", "-c", "import " + module],
                              cwd=REPO, env=env, capture_output=True, text=True, check=True)
        for line in proc.stderr.splitlines():
            m = re.match(r"import time:\s+(\d+)\s+\|\s+(\d+)\s+\|( *)(\S+)\s*$", line)
            if m and m.group(4) == module and len(m.group(3)) <= 1:  # top level: no indent
                values.append(int(m.group(2)))
                break
        else:
            raise RuntimeError("no importtime line for %s:\n%s" % (module, proc.stderr[-2000:]))
    return _median(values)


def server_keeps_alive(endpoint):
    """Whether the server keeps HTTP/1.1 connections open.  moto, being werkzeug's
    development server, answers `Connection: close` to everything, so there both
    clients open a new TCP connection for every request."""
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(endpoint)
    conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=10)
    try:
        conn.request("GET", "/")
        resp = conn.getresponse()
        resp.read()
        return not resp.will_close
    finally:
        conn.close()


def machine_info():
    import datetime
    import platform
    from importlib import metadata

    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    versions = {}
    for dist in ("boto3", "botocore", "moto", "urllib3"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "cpus": affinity,
        "cpu_model": model,
        "python": "%s (%s)" % (platform.python_version(), platform.python_implementation()),
        "platform": platform.platform(),
        "versions": versions,
        "loadavg_start": os.getloadavg(),
        "sigv4": _source_id(os.path.join(REPO, "sigv4.py")),
    }


def _source_id(path):
    """Which sigv4.py was measured: the git commit, and the file's own hash
    (it may differ from the commit's while work is in progress)."""
    import hashlib
    import subprocess

    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:12]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                              capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", path], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        head, dirty = "", ""
    return "sha256 %s (git %s%s)" % (digest, head or "?", ", modified" if dirty else "")


def setup_buckets(endpoint, ak, sk, suffix):
    """Create the buckets and the objects GET and LIST read, with boto3."""
    import boto3
    import botocore.config

    s3 = boto3.client("s3", endpoint_url=endpoint, region_name=REGION, aws_access_key_id=ak,
                      aws_secret_access_key=sk,
                      config=botocore.config.Config(s3={"addressing_style": "path"}, proxies={}))
    buckets = {op: "bench-%s-%s" % (op.lower(), suffix) for op in OPS + ("START",)}
    for b in buckets.values():
        s3.create_bucket(Bucket=b)
    for i in range(KEYSET):
        s3.put_object(Bucket=buckets["GET"], Key="get/%d" % i, Body=TASK_BODY)
    for i in range(LIST_KEYS):
        s3.put_object(Bucket=buckets["LIST"], Key="list/in/%04d.json" % i, Body=TASK_BODY)
    for i in range(20):  # outside the prefix: the server must filter
        s3.put_object(Bucket=buckets["LIST"], Key="list/out/%04d.json" % i, Body=TASK_BODY)
    return s3, buckets


def cleanup_buckets(s3, buckets):
    for b in buckets.values():
        try:
            while True:
                page = s3.list_objects_v2(Bucket=b)
                keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
                if keys:
                    s3.delete_objects(Bucket=b, Delete={"Objects": keys, "Quiet": True})
                if not page.get("IsTruncated"):
                    break
            s3.delete_bucket(Bucket=b)
        except Exception as exc:  # best effort on someone else's server
            print("warning: could not delete bucket %s: %s" % (b, exc), file=sys.stderr)


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------

TARGET_CPU = 0.25
TARGET_START = 0.25
TARGET_RSS = 0.5


def _ratio(a, b):
    return a / b if b else float("nan")


def _verdict(ratio, target):
    return "pass" if ratio <= target else "**FAIL**"


def render(res):
    info = res["machine"]
    cfg = res["config"]
    out = []
    w = out.append
    w("Run: %s; %d CPUs (%s); Python %s; %s" % (
        info["date_utc"], info["cpus"], info["cpu_model"], info["python"], info["platform"]))
    w("boto3 %(boto3)s, botocore %(botocore)s, urllib3 %(urllib3)s; moto %(moto)s" % info["versions"])
    w("sigv4.py measured: %s" % info["sigv4"])
    w("Load average (1, 5, 15 min) at start %s, at end %s: other work on the machine adds noise." % (
        "/".join("%.2f" % x for x in info["loadavg_start"]),
        "/".join("%.2f" % x for x in info.get("loadavg_end", ()))))
    w("Mode: %s; N = %d sequential, %d with %d threads (LIST: %g of that), per client and row, split over "
      "%d children run ABBA-interleaved with the other client's, %d rounds each, after %d warm-up "
      "requests per thread; %d runs for start-up and import." % (
          cfg["mode"], cfg["n_seq"], cfg["n_thr"], cfg["threads"], cfg["list_scale"], cfg["children"],
          cfg["rounds"], cfg["warmup"], cfg["runs"]))
    w("Bytecode: %s." % cfg["bytecode"])
    w("Server: %s, %s; %s." % (
        cfg["server"], cfg["endpoint"],
        "keeps connections alive" if cfg["keep_alive"] else
        "closes the connection after every reply, so every request of both clients opens a new TCP connection"))
    w("")
    w("### Client CPU per request (user+sys of the client process, request loop only)")
    w("")
    w("| operation | threads | requests | sigv4 µs/req | boto3 µs/req | ratio | target ≤ %.2f |" % TARGET_CPU)
    w("|---|---:|---:|---:|---:|---:|---|")
    for row in res["loops"]:
        a, b = row["sigv4"], row["boto3"]
        r = _ratio(a["cpu_per_req_us"], b["cpu_per_req_us"])
        spread = lambda x: "%.0f (%.0f–%.0f)" % (  # noqa: E731
            x["cpu_per_req_us"], min(x["cpu_per_req_round_us"]), max(x["cpu_per_req_round_us"]))
        w("| %s | %d | %d | %s | %s | %.2f | %s |" % (
            row["op"], row["threads"], a["requests"], spread(a), spread(b), r, _verdict(r, TARGET_CPU)))
    w("")
    w("(In parentheses: the lowest and highest of the %d rounds.)" % (cfg["rounds"] * cfg["children"]))
    w("")
    w("### Requests per second and peak RSS of the loop children")
    w("")
    w("| operation | threads | sigv4 req/s | boto3 req/s | sigv4 peak RSS | boto3 peak RSS | RSS ratio | target ≤ %.2f |" % TARGET_RSS)
    w("|---|---:|---:|---:|---:|---:|---:|---|")
    for row in res["loops"]:
        a, b = row["sigv4"], row["boto3"]
        r = _ratio(a["maxrss"], b["maxrss"])
        w("| %s | %d | %.0f | %.0f | %.1f MB | %.1f MB | %.2f | %s |" % (
            row["op"], row["threads"], a["req_per_s"], b["req_per_s"],
            a["maxrss"] / 2**20, b["maxrss"] / 2**20, r, _verdict(r, TARGET_RSS)))
    w("")
    w("### Start-up (medians of %d runs)" % cfg["runs"])
    w("")
    s, imp, bare = res["startup"], res["import"], res["bare"]
    w("| measurement | sigv4 | boto3 | ratio | target |")
    w("|---|---:|---:|---:|---|")
    w("| bare interpreter `python -c pass` (wall; the \"minus bare\" rows subtract it) | %.1f ms | (same) | | |" % (bare["wall"] * 1e3))
    w("| import, `-X importtime` cumulative | %.1f ms | %.1f ms | %.3f | |" % (
        imp["sigv4"]["importtime_us"] / 1e3, imp["boto3"]["importtime_us"] / 1e3,
        _ratio(imp["sigv4"]["importtime_us"], imp["boto3"]["importtime_us"])))
    ia = imp["sigv4"]["wall"] - bare["wall"]
    ib = imp["boto3"]["wall"] - bare["wall"]
    w("| import, wall of `python -c 'import X'` minus bare | %.1f ms | %.1f ms | %.3f | |" % (
        ia * 1e3, ib * 1e3, _ratio(ia, ib)))
    sa = s["sigv4"]["wall"] - bare["wall"]
    sb = s["boto3"]["wall"] - bare["wall"]
    rs = _ratio(sa, sb)
    w("| **process start → first PUT done, minus bare** | %.1f ms | %.1f ms | %.3f | ≤ %.2f %s |" % (
        sa * 1e3, sb * 1e3, rs, TARGET_START, _verdict(rs, TARGET_START)))
    w("| process start → first PUT done, total wall | %.1f ms | %.1f ms | %.3f | |" % (
        s["sigv4"]["wall"] * 1e3, s["boto3"]["wall"] * 1e3, _ratio(s["sigv4"]["wall"], s["boto3"]["wall"])))
    w("| CPU of that child (user+sys, whole process) | %.1f ms | %.1f ms | %.3f | |" % (
        s["sigv4"]["cpu"] * 1e3, s["boto3"]["cpu"] * 1e3, _ratio(s["sigv4"]["cpu"], s["boto3"]["cpu"])))
    rr = _ratio(s["sigv4"]["maxrss"], s["boto3"]["maxrss"])
    w("| **peak RSS, import + client + one PUT** | %.1f MB | %.1f MB | %.2f | ≤ %.2f %s |" % (
        s["sigv4"]["maxrss"] / 2**20, s["boto3"]["maxrss"] / 2**20, rr, TARGET_RSS, _verdict(rr, TARGET_RSS)))
    w("| peak RSS, bare interpreter | %.1f MB | (same) | | |" % (bare["maxrss"] / 2**20))
    w("| peak RSS, import only | %.1f MB | %.1f MB | %.2f | |" % (
        imp["sigv4"]["maxrss"] / 2**20, imp["boto3"]["maxrss"] / 2**20,
        _ratio(imp["sigv4"]["maxrss"], imp["boto3"]["maxrss"])))
    w("")
    w("### Targets")
    w("")
    checks = res["checks"]
    for name, ok in checks:
        w("- %s: %s" % (name, "pass" if ok else "**FAIL**"))
    return "\n".join(out)


def evaluate(res):
    checks = []
    worst_cpu = max(_ratio(r["sigv4"]["cpu_per_req_us"], r["boto3"]["cpu_per_req_us"]) for r in res["loops"])
    checks.append(("client CPU per request ≤ 1/4 of boto3's, every row (worst ratio %.2f)" % worst_cpu,
                   worst_cpu <= TARGET_CPU))
    bare = res["bare"]["wall"]
    rs = _ratio(res["startup"]["sigv4"]["wall"] - bare, res["startup"]["boto3"]["wall"] - bare)
    checks.append(("process start to first request ≤ 1/4 of boto3's (ratio %.3f)" % rs, rs <= TARGET_START))
    worst_rss = max([_ratio(r["sigv4"]["maxrss"], r["boto3"]["maxrss"]) for r in res["loops"]]
                    + [_ratio(res["startup"]["sigv4"]["maxrss"], res["startup"]["boto3"]["maxrss"])])
    checks.append(("peak RSS ≤ 1/2 of boto3's, every child (worst ratio %.2f)" % worst_rss, worst_rss <= TARGET_RSS))
    res["checks"] = checks
    return all(ok for _, ok in checks)


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------


def main(argv=None):
    import argparse
    import json
    import shutil
    import signal
    import tempfile
    import time
    import uuid

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="short smoke run (small N, 3 start-up runs)")
    p.add_argument("--endpoint", help="use this S3 endpoint instead of starting a moto server")
    p.add_argument("--access-key", default=DEFAULT_ACCESS_KEY)
    p.add_argument("--secret-key", default=DEFAULT_SECRET_KEY)
    p.add_argument("--n-seq", type=int, help="requests per sequential loop (default 2000; quick 200)")
    p.add_argument("--n-threaded", type=int, help="requests per threaded loop (default 4000; quick 400)")
    p.add_argument("--list-scale", type=float, default=0.25,
                   help="LIST does this fraction of N (a LIST of 100 keys is slow on moto; default 0.25)")
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--runs", type=int, help="runs of each start-up/import measurement (default 10; quick 3)")
    p.add_argument("--children", type=int, default=2,
                   help="children per client and row, run ABBA-interleaved (default 2)")
    p.add_argument("--rounds", type=int, default=2,
                   help="rounds each child's loop is split into, to show the spread (default 2)")
    p.add_argument("--json", metavar="PATH", help="also write the raw results as JSON to PATH")
    args = p.parse_args(argv)

    quick = args.quick
    n_seq = args.n_seq or (200 if quick else 2000)
    n_thr = args.n_threaded or (400 if quick else 4000)
    runs = args.runs or (3 if quick else 10)
    warmup = 10 if quick else 20
    rounds = args.rounds
    children = args.children
    if min(args.threads, rounds, children, runs) < 1 or not 0 < args.list_scale <= 1:
        p.error("--threads, --rounds, --children and --runs must be at least 1, --list-scale in (0, 1]")
    for n, threads in ((n_seq, 1), (n_thr, args.threads)):
        if int(n * args.list_scale) // children < threads * rounds:
            p.error("N = %d is too small: each of the %d children needs at least %d requests "
                    "(threads x rounds), LIST included (--list-scale %g)" % (
                        n, children, threads * rounds, args.list_scale))
    ak, sk = args.access_key, args.secret_key

    # SIGTERM ends us through the finally blocks, so the server is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    workdir = tempfile.mkdtemp(prefix="bench_client_")
    server = None
    s3 = buckets = None
    started = time.monotonic()
    try:
        if args.endpoint:
            endpoint = args.endpoint
        else:
            server = MotoServer(workdir)
            server.wait_ready()
            endpoint = server.endpoint
        print("endpoint %s%s" % (endpoint, "" if args.endpoint else " (moto, pid %d)" % server.popen.pid),
              file=sys.stderr)
        env = _child_env()
        s3, buckets = setup_buckets(endpoint, ak, sk, uuid.uuid4().hex[:8])

        res = {
            "machine": machine_info(),
            "config": {"mode": "quick" if quick else "full", "n_seq": n_seq, "n_thr": n_thr,
                       "threads": args.threads, "warmup": warmup, "rounds": rounds, "children": children, "runs": runs,
                       "list_scale": args.list_scale, "endpoint": endpoint,
                       "server": "moto, started by this script" if server else "given with --endpoint",
                       "keep_alive": server_keeps_alive(endpoint),
                       "bytecode": "repo modules compileall'd; children run without "
                                   "PYTHONDONTWRITEBYTECODE (parent had it %s)" % (
                                       "set" if os.environ.get("PYTHONDONTWRITEBYTECODE") else "unset")},
            "loops": [],
        }

        def progress(msg):
            print("[%5.1fs] %s" % (time.monotonic() - started, msg), file=sys.stderr, flush=True)

        # Compile both clients' .pyc files before anything is timed: ours explicitly
        # (boto3's were written at install time), then one untimed import of each.
        compile_repo_modules(env)
        for client in CLIENTS:
            spawn_measured([sys.executable, "-c", "import %s\n%s" % (client, PRINT_PEAK_RSS)], env)

        # --- start-up, import, bare interpreter: interleaved runs ---------------
        progress("start-up and import runs")
        samples = {k: {"wall": [], "cpu": [], "maxrss": []}
                   for k in ("bare", "import-sigv4", "import-boto3", "start-sigv4", "start-boto3")}
        for i in range(runs):
            jobs = [("bare", [sys.executable, "-c", "pass\n" + PRINT_PEAK_RSS])]
            for client in CLIENTS:
                jobs.append(("import-" + client, [sys.executable, "-c", "import %s\n%s" % (client, PRINT_PEAK_RSS)]))
                jobs.append(("start-" + client, [sys.executable, "-c", STARTUP_CODE, client, endpoint, ak, sk,
                                                 buckets["START"], "start/%s/%d" % (client, i),
                                                 TASK_BODY.decode()]))
            if i % 2:
                jobs.reverse()
            for name, argv_ in jobs:
                wall, cpu, rss, _ = spawn_measured(argv_, env)
                samples[name]["wall"].append(wall)
                samples[name]["cpu"].append(cpu)
                samples[name]["maxrss"].append(rss)
        med = {k: {m: _median(v) for m, v in d.items()} for k, d in samples.items()}
        res["bare"] = med["bare"]
        res["startup"] = {c: med["start-" + c] for c in CLIENTS}
        res["import"] = {c: dict(med["import-" + c]) for c in CLIENTS}
        for c in CLIENTS:
            res["import"][c]["importtime_us"] = importtime_cumulative(c, env, runs)
        res["startup_samples"] = samples

        # --- request loops --------------------------------------------------------
        # Each (op, threads) row runs `children` children per client, each doing its
        # share of N, in the order sigv4, boto3, boto3, sigv4, ... (ABBA), so that a
        # drift during the row (other load on the machine, TIME_WAIT sockets piling up
        # from moto's one-connection-per-request) falls on both clients alike.
        order = []
        for k in range(children):
            order += list(CLIENTS) if k % 2 == 0 else list(reversed(CLIENTS))
        for threads in (1, args.threads):
            for op in OPS:
                n = n_seq if threads == 1 else n_thr
                if op == "LIST":
                    n = int(n * args.list_scale)
                per_child = n // children
                per_child -= per_child % (threads * rounds)
                parts = {c: [] for c in CLIENTS}
                for client in order:
                    progress("%s %s x%d, %d requests" % (client, op, threads, per_child))
                    prefix = {"PUT": "put/%s/" % client, "GET": "get/", "LIST": "list/in/"}[op]
                    part = run_loop_child(client, endpoint, ak, sk, op, buckets[op], prefix,
                                          per_child, threads, warmup, rounds, env)
                    parts[client].append(part)
                    progress("  %.0f µs CPU/request, %.0f req/s" % (part["cpu_per_req_us"], part["req_per_s"]))
                row = {"op": op, "threads": threads}
                row.update((c, merge_children(parts[c])) for c in CLIENTS)
                res["loops"].append(row)

        res["machine"]["loadavg_end"] = os.getloadavg()
        ok = evaluate(res)
        progress("done")
        print(render(res))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(res, f, indent=1, default=str)
        return 0 if ok else 1
    finally:
        if s3 is not None and args.endpoint:
            cleanup_buckets(s3, buckets)
        if server is not None:
            server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
