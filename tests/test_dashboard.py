"""`buquet serve`: the web dashboard.

Handlers are tested through a real server (`make_server` on a free loopback
port, a MemoryStore-backed queue) fetched with urllib: pages, escaping of
everything that comes from the bucket, security headers, the S3 request count
each page shows (checked against the store's own count), the bounds on it,
the action checks (token, Origin, POST only, read-only mode), error pages,
and shutdown of the command on SIGTERM and SIGINT.  The end-to-end test
drives headless Chromium over the DevTools protocol (a small RFC 6455 client
below): live refresh without reload, pausing while hidden, the status filter,
a task page, and an action posted from the page.  It is skipped when
/usr/bin/chromium is missing (CI installs it: `apt-get install -y chromium`).
"""

import argparse
import base64
import contextlib
import gc
import hashlib
import io
import json
import os
import re
import signal
import socket
import socketserver
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import pytest

import buquet

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import buquet as dashboard  # noqa: E402  (the dashboard section of buquet.py)

XSS_SCRIPT = "<script>alert(1)</script>"
XSS_ATTR = '"><img src=x onerror=alert(2)>'
XSS_NAME = "x\"><img src=x onerror=alert(3)>"  # no "/": a valid task type and schedule id
RAW = (XSS_SCRIPT, XSS_ATTR, XSS_NAME, "<img")


# ============================================================================
# Helpers
# ============================================================================


def seed(queue):
    """A small queue with every interesting thing in it; returns the tasks."""
    t = {}
    t["pending"] = queue.submit("email", {"to": XSS_SCRIPT, "note": XSS_ATTR})
    t["completed"] = queue.submit("resize", {"x": XSS_ATTR})
    queue.complete(queue.claim(t["completed"].doc["id"], "worker-a"), {"echo": XSS_SCRIPT})
    t["failed"] = queue.submit(XSS_NAME, {"n": 1})
    queue.fail(queue.claim(t["failed"].doc["id"], "worker-a"), "boom " + XSS_ATTR + XSS_SCRIPT)
    t["running"] = queue.submit("long", {"n": 2})
    t["running"] = queue.claim(t["running"].doc["id"], "worker-a")
    t["later"] = queue.submit("later", {}, delay=3600)
    now = buquet.format_timestamp(queue.now())
    heartbeat = {"worker_id": XSS_SCRIPT, "last_heartbeat": now, "shards": list("0123"),
                 "current_task": t["running"].doc["id"], "tasks_completed": 7, "tasks_failed": 1}
    queue.store.put("workers/evil.json", json.dumps(heartbeat).encode())
    queue.store.put("workers/w1.json", json.dumps(dict(heartbeat, worker_id="worker-a")).encode())
    queue.create_schedule(XSS_NAME, "report", {"q": XSS_SCRIPT}, "*/5 * * * *")
    return t


@pytest.fixture
def store():
    return buquet.MemoryStore(versioned=True)


@pytest.fixture
def queue(store):
    return buquet.connect(store=store)


@contextlib.contextmanager
def running(queue, **options):
    log = options.pop("log", io.StringIO())
    server = dashboard.make_server(queue, "127.0.0.1", 0, log=log, **options)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


_opener = urllib.request.build_opener(NoRedirect)


class Reply:
    def __init__(self, status, headers, body):
        self.status, self.headers, self.body = status, headers, body

    @property
    def json(self):
        return json.loads(self.body)


def fetch(server, path, method="GET", data=None, headers=None):
    url = server.url.rstrip("/") + path
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with _opener.open(request, timeout=10) as r:
            return Reply(r.status, r.headers, r.read().decode("utf-8"))
    except urllib.error.HTTPError as e:
        return Reply(e.code, e.headers, e.read().decode("utf-8"))


def post(server, path, token=None, origin="same", headers=None, accept=None):
    form = b"" if token is None else ("token=" + token).encode()
    h = {"Content-Type": "application/x-www-form-urlencoded"}
    if origin == "same":
        h["Origin"] = server.url.rstrip("/")
    elif origin is not None:
        h["Origin"] = origin
    if accept:
        h["Accept"] = accept
    h.update(headers or {})
    return fetch(server, path, "POST", form, h)


def shown_cost(body):
    m = re.search(r"this refresh: (\d+) S3 requests? ?(?:\(([^)]*)\))?", body)
    assert m, "no request count on the page"
    ops = dict((k, int(v)) for k, v in (p.split() for p in m.group(2).split(", "))) if m.group(2) else {}
    return int(m.group(1)), ops


def total(store):
    return sum(store.requests.values())


def attributes(page):
    """Every attribute name of every element, as a browser's parser sees them."""
    from html.parser import HTMLParser

    names = []

    class Collect(HTMLParser):
        def handle_starttag(self, tag, attrs):
            names.extend(name for name, _ in attrs)
    Collect().feed(page)
    return names


def assert_escaped(body):
    for raw in RAW:
        assert raw not in body, "unescaped %r in the page" % raw


# ============================================================================
# Pages
# ============================================================================


def test_overview_shows_backlog_shards_workers_schedules_and_the_chart(queue):
    tasks = seed(queue)
    with running(queue) as server:
        r = fetch(server, "/")
    assert r.status == 200
    assert r.headers["Content-Type"] == "text/html; charset=utf-8"
    body = r.body
    assert "<title>buquet \u00b7 Overview</title>" in body
    assert re.search(r'<div class="value"><a href="/tasks\?status=pending">1</a></div><div class="label">Ready now',
                     body)
    assert '<div class="value">1</div><div class="label">Scheduled later' in body
    assert re.search(r'<a href="/tasks\?status=running">1</a></div><div class="label">Running', body)
    assert '<div class="value">2 of 2</div><div class="label">Workers alive' in body
    assert "/tasks/%s" % tasks["pending"].doc["id"] in body  # the oldest ready task links to itself
    assert "worker-a" in body and "/tasks/%s" % tasks["running"].doc["id"] in body
    assert "*/5 * * * *" in body and body.count("<time", body.index('id="schedules"')) >= 3  # next runs
    assert '<svg class="chart"' in body and "1 completed" in body and "1 failed" in body
    assert '<a href="/tasks?shard=%s">%s</a>' % ((tasks["pending"].doc["shard"],) * 2) in body
    assert_escaped(body)


def test_pages_send_the_security_headers_and_no_inline_script(queue):
    seed(queue)
    with running(queue) as server:
        for path in ("/", "/tasks", "/api/overview", "/static/dashboard.js", "/nope"):
            r = fetch(server, path)
            csp = r.headers["Content-Security-Policy"]
            assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp
            assert r.headers["X-Content-Type-Options"] == "nosniff"
            assert r.headers["X-Frame-Options"] == "DENY"
            assert r.headers["Referrer-Policy"] == "no-referrer"
        page = fetch(server, "/").body
    # The only <script> elements: the external file and a JSON data block.
    scripts = re.findall(r"<script[^>]*>", page)
    assert scripts == ['<script type="application/json" id="buquet-config">',
                       '<script src="/static/dashboard.js" defer>']
    assert not [a for a in attributes(page) if a.startswith("on") or a == "style"]


def test_task_list_filters_by_status_type_and_shard(queue):
    tasks = seed(queue)
    with running(queue) as server:
        failed = fetch(server, "/tasks?status=failed").body
        assert tasks["failed"].doc["id"] in failed and tasks["pending"].doc["id"] not in failed
        assert failed.count('<span class="badge s-failed">failed</span>') == 1
        by_type = fetch(server, "/tasks?type=email").body
        assert tasks["pending"].doc["id"] in by_type and tasks["completed"].doc["id"] not in by_type
        shard = tasks["running"].doc["shard"]
        in_shard = fetch(server, "/tasks?shard=" + shard).body
        assert tasks["running"].doc["id"] in in_shard
        assert all(t.doc["id"] not in in_shard for t in tasks.values() if t.doc["shard"] != shard)
        assert '<option value="%s" selected>shard %s</option>' % (shard, shard) in in_shard
        assert fetch(server, "/tasks?status=bogus").status == 400
        assert fetch(server, "/tasks?shard=zz").status == 400
        assert fetch(server, "/tasks?after=../../etc").status == 400
        data = fetch(server, "/api/tasks?status=failed").json
    assert [t["id"] for t in data["data"]["tasks"]] == [tasks["failed"].doc["id"]]
    assert set(data["parts"]) == {"task-table", "cost"}  # not the filter form, which may be in use


def test_task_list_pages_by_50_with_one_list_and_a_get_per_task(queue, store):
    ids = sorted(t.doc["id"] for t in queue.submit_many([("bulk", {"i": i}) for i in range(120)]))
    seen = []
    path = "/tasks"
    with running(queue) as server:
        for expected in (50, 50, 20):
            before = dict(store.requests)
            r = fetch(server, path)
            spent = {k: v - before.get(k, 0) for k, v in store.requests.items() if v != before.get(k, 0)}
            assert spent == {"LIST": 1, "GET": expected}
            assert shown_cost(r.body) == (1 + expected, {"GET": expected, "LIST": 1})
            page = re.findall(r'<a class="id" href="/tasks/([0-9a-f-]{36})">', r.body)
            assert len(page) == expected
            seen.extend(page)
            nxt = re.search(r'<a class="next" href="([^"]+)">Next page', r.body)
            if expected == 20:
                assert nxt is None
            else:
                path = nxt.group(1).replace("&amp;", "&")
    assert sorted(seen) == ids  # every task once, in key order across shards


def test_task_page_shows_fields_payloads_and_the_history_timeline(queue):
    tasks = seed(queue)
    tid = tasks["completed"].doc["id"]
    with running(queue) as server:
        body = fetch(server, "/tasks/" + tid).body
        assert "<title>buquet \u00b7 Task %s</title>" % tid[:8] in body
        assert '<span class="badge s-completed">completed</span>' in body
        assert "&quot;echo&quot;" in body  # output, pretty-printed and escaped
        for label in ("Created", "Available", "Updated", "Finished", "Attempts"):
            assert "<dt>%s</dt>" % label in body
        timeline = body[body.index('<ol class="timeline">'):]
        assert timeline.index("completed") < timeline.index("claimed by worker-a (attempt 1)") < \
            timeline.index("submitted")
        failed = fetch(server, "/tasks/" + tasks["failed"].doc["id"]).body
        assert "boom &quot;&gt;&lt;img src=x onerror=alert(2)&gt;&lt;script&gt;" in failed
        assert fetch(server, "/tasks/not-a-uuid").status == 400
        missing = fetch(server, "/tasks/00000000-0000-4000-8000-000000000000")
        assert missing.status == 404 and "task 00000000-0000-4000-8000-000000000000 not found" in missing.body
        api = fetch(server, "/api/tasks/" + tid).json
    assert api["data"]["versioned"] is True and len(api["data"]["versions"]) == 3
    assert api["data"]["task"]["output"] == {"echo": XSS_SCRIPT}


def test_without_versioning_the_task_page_says_so():
    queue = buquet.connect(store=buquet.MemoryStore())
    task = queue.submit("email", {})
    with running(queue) as server:
        body = fetch(server, "/tasks/" + task.doc["id"]).body
    assert "This bucket keeps no object versions, so only the current state is known." in body
    assert '<ol class="timeline plain">' in body and "submitted" in body


def test_versions_are_read_once_then_come_from_the_cache(queue, store):
    tasks = seed(queue)
    with running(queue) as server:
        first = fetch(server, "/api/tasks/" + tasks["completed"].doc["id"]).json["requests"]
        again = fetch(server, "/api/tasks/" + tasks["completed"].doc["id"]).json["requests"]
    assert first["by_operation"] == {"GET": 4, "LIST": 1}  # the task, then 3 versions
    assert again["by_operation"] == {"GET": 1, "LIST": 1}


# ============================================================================
# Escaping
# ============================================================================


def test_nothing_from_the_bucket_reaches_a_page_unescaped(queue):
    tasks = seed(queue)
    paths = ["/", "/tasks", "/tasks?status=failed", "/api/overview", "/api/chart", "/api/tasks"]
    paths += ["/tasks/" + t.doc["id"] for t in tasks.values()]
    paths += ["/api/tasks/" + t.doc["id"] for t in tasks.values()]
    with running(queue, allow_actions=True) as server:
        for path in paths:
            r = fetch(server, path)
            assert r.status == 200, path
            if path.startswith("/api/"):
                for html in r.json["parts"].values():
                    assert_escaped(html)
            else:
                assert_escaped(r.body)
        overview = fetch(server, "/").body
        detail = fetch(server, "/tasks/" + tasks["pending"].doc["id"]).body
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in overview  # the worker id, as text
    assert "x&quot;&gt;&lt;img src=x onerror=alert(3)&gt;" in overview  # the schedule id
    assert "/schedules/x%22%3E%3Cimg%20src%3Dx%20onerror%3Dalert%283%29%3E/trigger" in overview
    assert "&quot;to&quot;: &quot;&lt;script&gt;alert(1)&lt;/script&gt;&quot;" in detail


def test_json_in_the_page_cannot_close_its_script_element(queue):
    with running(queue) as server:
        body = fetch(server, "/tasks?type=" + urllib.request.quote("</script><script>alert(1)</script><!--")).body
    block = re.search(r'<script type="application/json" id="buquet-config">(.*?)</script>', body, re.S).group(1)
    assert "<" not in block and ">" not in block
    assert json.loads(block)["poll"][0]["url"] == (
        "/api/tasks?type=%3C%2Fscript%3E%3Cscript%3Ealert%281%29%3C%2Fscript%3E%3C%21--")
    assert dashboard._script_json({"a": "</script>&\u2028"}) == '{"a": "\\u003c/script\\u003e\\u0026\\u2028"}'


# ============================================================================
# Cost: counted, shown, bounded
# ============================================================================


def test_the_request_count_shown_is_the_stores_own_count(queue, store):
    seed(queue)
    with running(queue) as server:
        for path in ("/", "/tasks", "/tasks?status=failed"):
            before = total(store)
            r = fetch(server, path)
            assert shown_cost(r.body)[0] == total(store) - before, path
        before = total(store)
        api = fetch(server, "/api/overview").json
    spent = total(store) - before
    assert api["requests"]["total"] == spent
    assert api["parts"]["cost"].startswith("this refresh: %d S3 requests" % spent)
    # LIST ready/, leases/, workers/, schedules/; GET 2 heartbeats, 1 schedule, the oldest ready task.
    assert api["requests"]["by_operation"] == {"LIST": 4, "GET": 4}


def test_the_overview_refresh_is_bounded_however_big_the_fleet(queue, store):
    seed(queue)
    now = buquet.format_timestamp(queue.now())
    for i in range(70):
        store.put("workers/w%03d.json" % i, json.dumps({"worker_id": "w%d" % i, "last_heartbeat": now}).encode())
        queue.create_schedule("s%03d" % i, "report", {}, "0 9 * * *")
    with running(queue) as server:
        api = fetch(server, "/api/overview").json
    assert api["requests"]["by_operation"] == {"LIST": 4, "GET": 50 + 50 + 1}
    assert "22 more heartbeat files not read (at most 50 per refresh)." in api["parts"]["workers"]
    assert "21 more schedules not read." in api["parts"]["schedules"]
    assert "at most 50" in api["bound"]


def test_the_chart_counts_finished_tasks_per_minute_and_caches_them(queue, store):
    for i in range(6):
        task = queue.submit("t", {"i": i})
        claimed = queue.claim(task.doc["id"], "w")
        queue.complete(claimed, {}) if i % 3 else queue.fail(claimed, "no")
    with running(queue) as server:
        first = fetch(server, "/api/chart").json
        again = fetch(server, "/api/chart").json
    minutes = first["data"]["minutes"]
    assert len(minutes) == 60 and minutes[-1]["completed"] == 4 and minutes[-1]["failed"] == 2
    assert first["requests"]["by_operation"] == {"LIST": 1, "GET": 6}
    assert again["requests"]["by_operation"] == {"LIST": 1}  # finished documents are cached
    assert again["data"]["completed"] == 4 and "<rect class=\"bad\"" in again["parts"]["chart"]
    shards = {t.doc["shard"] for s in queue.shards for t in queue.list(s, status="completed")}
    one = sorted(shards)[0]
    expected = sum(1 for t in queue.list(one, status="completed"))
    with running(queue) as server:
        alone = fetch(server, "/api/chart?chart_shard=" + one).json
        page = fetch(server, "/?chart_shard=" + one).body
    assert alone["data"]["shard"] == one and alone["data"]["completed"] == expected
    assert '"url": "/api/chart?chart_shard=%s"' % one in page  # the refresh keeps the shard


@pytest.mark.versioned
def test_on_a_versioned_s3_bucket_the_count_shown_is_the_http_requests_made(moto_s3):
    import sigv4

    t = moto_s3
    queue = buquet.connect(bucket=t.bucket, endpoint=t.endpoint, region=t.region,
                           credentials=sigv4.Credentials(t.access_key, t.secret_key))
    task = queue.submit("email", {"to": XSS_SCRIPT})
    queue.complete(queue.claim(task.doc["id"], "worker-a"), {"sent": True})
    queue.submit("later", {}, delay=600)
    replies = []
    client = queue.store.client
    theirs = client._on_reply
    client._on_reply = lambda *a: (replies.append(a), theirs(*a))  # every reply from the server
    with running(queue) as server:
        for path in ("/", "/tasks", "/tasks/" + task.doc["id"], "/tasks/" + task.doc["id"]):
            before = len(replies)
            r = fetch(server, path)
            assert r.status == 200
            assert shown_cost(r.body)[0] == len(replies) - before, path
            assert_escaped(r.body)
        api = fetch(server, "/api/tasks/" + task.doc["id"]).json
    assert [v["status"] for v in api["data"]["versions"]] == ["completed", "running", "pending"]
    assert api["requests"]["by_operation"] == {"GET": 1, "LIST": 1}  # versions came from the cache
    queue.close()


# ============================================================================
# Actions
# ============================================================================


def token_of(page):
    m = re.search(r'name="token" value="([^"]+)"', page)
    return m.group(1) if m else None


def test_actions_need_the_token_a_same_origin_post_and_change_nothing_otherwise(queue):
    tasks = seed(queue)
    tid = tasks["pending"].doc["id"]
    path = "/tasks/%s/cancel" % tid
    with running(queue, allow_actions=True) as server:
        token = token_of(fetch(server, "/tasks/" + tid).body)
        assert token == server.dashboard.token and len(token) >= 40
        refusals = [
            post(server, path),  # no token
            post(server, path, "wrong-token"),
            post(server, path, token[:-1]),
            post(server, path, token, origin="http://evil.example"),
            post(server, path, token, origin="null"),  # a sandboxed frame, or a form under no-referrer
            post(server, path, token, origin=None),  # neither Origin nor Referer
            post(server, path, token, origin=None, headers={"Referer": "http://evil.example/x"}),
        ]
        assert [r.status for r in refusals] == [403] * len(refusals)
        assert "the token is missing or wrong" in refusals[0].body
        assert "Origin http://evil.example is not this server" in refusals[3].body
        assert queue.get(tid).doc["status"] == "pending"
        got = fetch(server, path)
        assert got.status == 405 and got.headers["Allow"] == "POST"
        assert queue.get(tid).doc["status"] == "pending"
        done = post(server, path, token)
        assert done.status == 303 and done.headers["Location"] == "/tasks/" + tid
        assert queue.get(tid).doc["status"] == "cancelled"
        assert queue.get(tid).doc["cancelled_by"] == "dashboard"
        # Referer stands in for Origin; Accept: application/json gets JSON.
        replay = post(server, "/tasks/%s/replay" % tid, token, origin=None, accept="application/json",
                      headers={"Referer": server.url + "tasks/" + tid})
        assert replay.status == 200 and replay.json["location"] == "/tasks/" + tid
        assert queue.get(tid).doc["status"] == "pending"
        again = post(server, "/tasks/%s/archive" % tid, token, accept="application/json")
        assert again.status == 409 and "is pending: archive is not allowed" in again.json["error"]


def test_actions_on_running_and_finished_tasks_and_schedules(queue):
    tasks = seed(queue)
    with running(queue, allow_actions=True) as server:
        token = server.dashboard.token
        page = fetch(server, "/tasks/" + tasks["running"].doc["id"]).body
        assert "Request cancellation" in page and "Replay" not in page
        assert post(server, "/tasks/%s/cancel" % tasks["running"].doc["id"], token).status == 303
        assert queue.get(tasks["running"].doc["id"]).doc["cancel_requested"] is True
        assert post(server, "/tasks/%s/archive" % tasks["completed"].doc["id"], token).status == 303
        assert queue.get(tasks["completed"].doc["id"]).doc["status"] == "archived"
        trigger = post(server, "/schedules/%s/trigger" % urllib.request.quote(XSS_NAME, safe=""), token)
        assert trigger.status == 303
        new = queue.get(trigger.headers["Location"].rsplit("/", 1)[1])
        assert new.doc["task_type"] == "report" and new.doc["input"] == {"q": XSS_SCRIPT}
        assert post(server, "/schedules/nope/trigger", token).status == 404


def test_read_only_mode_shows_no_actions_and_refuses_them(queue):
    tasks = seed(queue)
    tid = tasks["pending"].doc["id"]
    with running(queue) as server:
        page = fetch(server, "/tasks/" + tid).body
        assert token_of(page) is None and "<form class=\"action\"" not in page
        assert "Read-only: start with <code>buquet serve --allow-actions</code>" in page
        r = post(server, "/tasks/%s/cancel" % tid, server.dashboard.token)
        assert r.status == 403 and "read-only" in r.body
        assert fetch(server, "/tasks/%s/cancel" % tid).status == 405
        assert fetch(server, "/", "POST", b"", {"Origin": server.url.rstrip("/")}).status == 405
    assert queue.get(tid).doc["status"] == "pending"


# ============================================================================
# Errors, hosts, logging
# ============================================================================


class BrokenStore(buquet.MemoryStore):
    def list(self, prefix, **kwargs):
        raise buquet.StoreError("S3 GET 503 SlowDown (request id abc)")


def test_errors_are_small_pages_without_tracebacks():
    log = io.StringIO()
    with running(buquet.connect(store=BrokenStore()), log=log) as server:
        page = fetch(server, "/")
        api = fetch(server, "/api/overview")
        missing = fetch(server, "/no/such/page")
        put = fetch(server, "/", "PUT", b"x")
    assert page.status == 502 and "the store failed: S3 GET 503 SlowDown (request id abc)" in page.body
    assert "Traceback" not in page.body and "File \"" not in page.body
    assert api.status == 502 and api.json == {"error": "the store failed: S3 GET 503 SlowDown (request id abc)"}
    assert missing.status == 404 and put.status == 501
    assert put.headers["X-Frame-Options"] == "DENY"
    assert "Traceback" not in log.getvalue()


def test_a_rebound_dns_name_is_refused_on_loopback(queue):
    with running(queue) as server:
        port = server.server_address[1]
        assert fetch(server, "/", headers={"Host": "evil.example:%d" % port}).status == 400
        assert fetch(server, "/", headers={"Host": "localhost:%d" % port}).status == 200


def test_the_access_log_has_one_line_per_request_with_its_cost(queue):
    seed(queue)
    log = io.StringIO()
    with running(queue, log=log) as server:
        fetch(server, "/tasks")
        fetch(server, "/nope")
        head = fetch(server, "/", "HEAD")
    assert head.status == 200 and head.body == ""
    lines = log.getvalue().splitlines()
    assert len(lines) == 3
    assert re.fullmatch(r'127\.0\.0\.1 "GET /tasks HTTP/1\.1" 200 \d+B \d+ms s3=6', lines[0])
    assert re.fullmatch(r'127\.0\.0\.1 "GET /nope HTTP/1\.1" 404 \d+B \d+ms s3=0 error: no page at /nope', lines[1])


# ============================================================================
# The command: `buquet serve`, stopped by SIGTERM or Ctrl-C
# ============================================================================


SERVE_SCRIPT = """
import sys
sys.path.insert(0, %r)
import buquet
sys.exit(buquet.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_command_stops_cleanly_on_a_signal(tmp_path, sig):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("S3_", "BUQUET_", "AWS_"))}
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVE_SCRIPT % str(ROOT), "--local-dir", str(tmp_path / "store"), "serve",
         "--port", "0", "--allow-actions"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = proc.stderr.readline()
        m = re.match(r"buquet: dashboard on (http://127\.0\.0\.1:\d+/) over LocalStore\(.*\) \(actions allowed\); "
                     r"Ctrl-C stops it$", first.strip())
        assert m, first
        with urllib.request.urlopen(m.group(1), timeout=10) as r:
            assert r.status == 200
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
    assert re.search(r'"GET / HTTP/1\.1" 200 \d+B \d+ms s3=\d+\n', err)
    assert err.endswith("buquet: dashboard stopped\n")


def test_serve_sets_ready_once_listening_and_stops_on_shutdown(queue):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ready = threading.Event()
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("server", dashboard.serve(
        queue, "127.0.0.1", port, ready=ready, log=io.StringIO())), daemon=True)
    thread.start()
    assert ready.wait(5)
    with urllib.request.urlopen("http://127.0.0.1:%d/tasks" % port, timeout=10) as r:
        assert r.status == 200
    # serve() keeps its server to itself (a signal stops it); find it to stop it here.
    server = next(o for o in gc.get_objects() if isinstance(o, socketserver.BaseServer)
                  and o.server_address[1] == port)
    server.shutdown()
    thread.join(5)
    assert not thread.is_alive() and result["server"] is server


def test_serve_command_says_when_the_port_is_taken(tmp_path, monkeypatch):
    for name in [n for n in os.environ if n.startswith(("S3_", "BUQUET_", "AWS_"))]:
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        args = argparse.Namespace(profile=None, config=None, bucket=None, endpoint=None, region=None,
                                  local_dir=str(tmp_path / "store"), debug=False, host="127.0.0.1", port=port,
                                  allow_actions=False)
        with pytest.raises(OSError) as caught:
            dashboard._cmd_serve(args, io.StringIO())
    assert str(caught.value) == ("cannot listen on 127.0.0.1:%d: Address already in use "
                                 "(choose another with --host/--port)" % port)


def test_the_serve_subcommand_parses_its_flags():
    parser = argparse.ArgumentParser()
    dashboard._add_serve_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve"])
    assert (args.host, args.port, args.allow_actions) == ("127.0.0.1", 8080, False)
    args = parser.parse_args(["serve", "--host", "0.0.0.0", "--port", "9000", "--allow-actions"])
    assert (args.host, args.port, args.allow_actions) == ("0.0.0.0", 9000, True)


# ============================================================================
# End to end in headless Chromium, over the DevTools protocol
# ============================================================================

CHROMIUM = "/usr/bin/chromium"


class WebSocket:
    """A minimal RFC 6455 client: the handshake, masked text frames out,
    frames in (fragmented or not), ping answered, close noticed."""

    GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

    def __init__(self, url, timeout=15):
        parts = urlsplit(url)
        self.sock = socket.create_connection((parts.hostname, parts.port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(("GET %s HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                           "Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n"
                           % (parts.path, parts.netloc, key)).encode())
        self.buffer = bytearray()
        while b"\r\n\r\n" not in self.buffer:
            self._fill()
        head, _, rest = bytes(self.buffer).partition(b"\r\n\r\n")
        self.buffer = bytearray(rest)
        lines = head.decode("latin-1").split("\r\n")
        assert lines[0].split()[1] == "101", lines[0]
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        expected = base64.b64encode(hashlib.sha1((key + self.GUID).encode()).digest()).decode()
        assert headers.get("sec-websocket-accept") == expected

    def _fill(self):
        chunk = self.sock.recv(1 << 16)
        if not chunk:
            raise ConnectionError("the browser closed the connection")
        self.buffer += chunk

    def _take(self, n):
        while len(self.buffer) < n:
            self._fill()
        out = bytes(self.buffer[:n])
        del self.buffer[:n]
        return out

    def _frame(self, opcode, payload):
        n = len(payload)
        if n < 126:
            head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
        elif n < 1 << 16:
            head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
        else:
            head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(head + mask + masked)

    def send(self, text):
        self._frame(0x1, text.encode("utf-8"))

    def recv(self):
        message = bytearray()
        while True:
            b1, b2 = self._take(2)
            n = b2 & 0x7F
            if n == 126:
                n = struct.unpack("!H", self._take(2))[0]
            elif n == 127:
                n = struct.unpack("!Q", self._take(8))[0]
            mask = self._take(4) if b2 & 0x80 else None
            data = self._take(n)
            if mask:
                data = bytes(b ^ mask[i % 4] for i, b in enumerate(data))
            opcode = b1 & 0x0F
            if opcode == 0x8:
                raise ConnectionError("the browser closed the WebSocket")
            if opcode == 0x9:
                self._frame(0xA, data)
                continue
            if opcode == 0xA:
                continue
            message += data
            if b1 & 0x80:
                return message.decode("utf-8")

    def close(self):
        try:
            self._frame(0x8, b"")
        except OSError:
            pass
        self.sock.close()


class Browser:
    """One headless Chromium page, driven over the DevTools protocol."""

    def __init__(self, profile_dir):
        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
             "--no-default-browser-check", "--user-data-dir=%s" % profile_dir, "--window-size=1280,900",
             "--remote-debugging-port=0", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        port_file = Path(profile_dir) / "DevToolsActivePort"
        deadline = time.monotonic() + 20
        while not (port_file.exists() and len(port_file.read_text().splitlines()) >= 2):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.quit()
                raise RuntimeError("chromium did not start its DevTools endpoint")
            time.sleep(0.05)
        port = int(port_file.read_text().splitlines()[0])
        with urllib.request.urlopen("http://127.0.0.1:%d/json/list" % port, timeout=10) as r:
            page = next(t for t in json.load(r) if t["type"] == "page")
        self.ws = WebSocket(page["webSocketDebuggerUrl"])
        self.next_id = 0
        self.events = []
        for domain in ("Page", "Runtime", "Log"):
            self.call(domain + ".enable")

    def quit(self):
        if getattr(self, "ws", None):
            self.ws.close()
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # the group we started: browser, renderer, GPU
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def call(self, method, **params):
        self.next_id += 1
        mid = self.next_id
        self.ws.send(json.dumps({"id": mid, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == mid:
                if "error" in msg:
                    raise RuntimeError("%s: %s" % (method, msg["error"]))
                return msg.get("result", {})
            self.events.append(msg)

    def evaluate(self, expression):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError("%s: %s" % (expression, result["exceptionDetails"]))
        return result["result"].get("value")

    def wait_for(self, expression, timeout=10.0):
        deadline = time.monotonic() + timeout
        while True:
            try:
                value = self.evaluate(expression)
                if value:
                    return value
            except RuntimeError:
                pass  # the page is navigating: its context went away
            if time.monotonic() > deadline:
                raise AssertionError("timed out waiting for %s" % expression)
            time.sleep(0.1)

    def goto(self, url):
        self.call("Page.navigate", url=url)
        self.wait_loaded(urlsplit(url).path)

    def wait_loaded(self, path_prefix):
        self.wait_for("location.pathname.startsWith(%s) && document.readyState === 'complete' && "
                      "!!document.getElementById('cost')" % json.dumps(path_prefix))

    def screenshot(self, path):
        data = self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)["data"]
        Path(path).write_bytes(base64.b64decode(data))
        print("screenshot: %s" % path)
        return path

    def problems(self):
        """Script errors, CSP violations, console errors and dialogs so far."""
        out = []
        for e in self.events:
            m, p = e.get("method"), e.get("params", {})
            if m == "Runtime.exceptionThrown" or m == "Page.javascriptDialogOpening":
                out.append(e)
            elif m == "Log.entryAdded" and p["entry"]["level"] == "error":
                out.append(e)
            elif m == "Runtime.consoleAPICalled" and p.get("type") == "error":
                out.append(e)
        return out


@pytest.fixture
def browser(tmp_path):
    if not os.path.exists(CHROMIUM):
        pytest.skip("headless Chromium is not installed (%s); CI installs it with "
                    "`apt-get install -y chromium`" % CHROMIUM)
    b = Browser(tmp_path / "chromium-profile")
    try:
        yield b
    finally:
        b.quit()


def test_end_to_end_in_headless_chromium(queue, browser, tmp_path):
    tasks = seed(queue)
    with running(queue, allow_actions=True, refresh=0.5) as server:
        base = server.url.rstrip("/")

        # Overview: rendered, counted, then refreshed in place without a reload.
        browser.goto(base + "/")
        assert browser.evaluate("document.querySelector('#backlog .value').textContent") == "1"
        assert re.match(r"this refresh: \d+ S3 requests", browser.evaluate("document.getElementById('cost')"
                                                                            ".textContent"))
        assert browser.evaluate("document.querySelectorAll('svg.chart rect.ok').length") == 1
        browser.screenshot(tmp_path / "dashboard-overview.png")
        browser.evaluate("window.marker = 42")
        queue.submit_many([("email", {"i": i}) for i in range(3)])
        browser.wait_for("document.querySelector('#backlog .value').textContent === '4'", timeout=8)
        assert browser.evaluate("window.marker") == 42  # same document: no reload
        assert browser.evaluate("document.getElementById('live').textContent").startswith("live: updated")

        # Hidden tab: polling stops; visible again: it refreshes at once.
        browser.evaluate("Object.defineProperty(document, 'hidden', {configurable: true, get: () => true});"
                         "document.dispatchEvent(new Event('visibilitychange'))")
        time.sleep(0.6)  # let a refresh already in flight land
        hits = server.dashboard.hits.get("/api/overview", 0)
        time.sleep(2.0)  # four refresh periods
        assert server.dashboard.hits.get("/api/overview", 0) == hits
        assert browser.evaluate("document.getElementById('live').textContent") == "paused while the tab is hidden"
        browser.evaluate("Object.defineProperty(document, 'hidden', {configurable: true, get: () => false});"
                         "document.dispatchEvent(new Event('visibilitychange'))")
        browser.wait_for("document.getElementById('live').textContent.startsWith('live: updated')", timeout=5)
        assert server.dashboard.hits.get("/api/overview", 0) > hits

        # Task list: pick "failed" in the filter and submit it.
        browser.goto(base + "/tasks")
        browser.evaluate("document.getElementById('status-filter').value = 'failed';"
                         "document.querySelector('form.filters button').click()")
        browser.wait_for("location.search.includes('status=failed') && document.readyState === 'complete'")
        statuses = browser.evaluate("[...document.querySelectorAll('table.tasks .badge')].map(b => b.textContent)")
        assert statuses == ["failed"]
        assert browser.evaluate("document.querySelector('table.tasks').textContent").count(XSS_NAME) == 1
        assert browser.evaluate("document.querySelectorAll('img').length") == 0
        browser.screenshot(tmp_path / "dashboard-tasks-failed.png")

        # Open that task from the list.
        browser.evaluate("document.querySelector('table.tasks a.id').click()")
        browser.wait_loaded("/tasks/" + tasks["failed"].doc["id"])
        assert XSS_ATTR in browser.evaluate("document.querySelector('#error pre').textContent")
        assert browser.evaluate("document.querySelectorAll('#timeline li').length") == 3
        browser.screenshot(tmp_path / "dashboard-task.png")

        # An action from the page: the script posts it with the token and the
        # page's Origin; the server cancels the task and the page reloads.
        tid = tasks["pending"].doc["id"]
        browser.goto(base + "/tasks/" + tid)
        assert XSS_SCRIPT in browser.evaluate("document.querySelector('#input pre').textContent")
        browser.evaluate("document.querySelector('form.action button.danger').click()")
        browser.wait_for("!!document.querySelector('#task .badge.s-cancelled')")
        assert queue.get(tid).doc["status"] == "cancelled"
        browser.screenshot(tmp_path / "dashboard-task-cancelled.png")

        # The same form posted natively (no script) carries `Origin: null`
        # under Referrer-Policy: no-referrer, and is refused.
        replay = "form.action[action$='/replay']"
        browser.evaluate("HTMLFormElement.prototype.submit.call(document.querySelector(%s))" % json.dumps(replay))
        browser.wait_for("document.readyState === 'complete' && !!document.querySelector('.error-message')")
        assert "Origin null is not this server" in browser.evaluate("document.body.textContent")
        assert queue.get(tid).doc["status"] == "cancelled"

        problems = [p for p in browser.problems() if "403" not in json.dumps(p)]
        assert problems == []
