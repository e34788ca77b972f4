"""`buquet doctor` on real servers (moto, SeaweedFS): safe, every check in
the table, nothing left behind, no secret printed; and on a stand-in S3 that
ignores If-Match / If-None-Match (as Backblaze B2 and Garage do): unsafe,
exit 3, the verdict naming the broken guarantees."""

import hashlib
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote, unquote, urlsplit
from xml.sax.saxutils import escape

import pytest

import buquet
from buquet import main

CHECKS = ["credentials", "bucket reachable", "conditional create", "compare-and-swap",
          "If-Match on a missing key", "race (8 threads x 5)", "conditional delete", "list paging",
          "versioning", "clock skew", "latency", "cleanup"]
SECRET = "doctor-test-secret-never-print-me"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch, tmp_path):
    for name in list(os.environ):
        if name.startswith(("S3_", "BUQUET_", "AWS_")) or "proxy" in name.lower():
            monkeypatch.delenv(name)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.chdir(tmp_path)


def use_bucket(monkeypatch, bucket, endpoint, region, access_key, secret_key):
    for name, value in (("S3_BUCKET", bucket), ("S3_ENDPOINT", endpoint), ("S3_REGION", region),
                        ("AWS_ACCESS_KEY_ID", access_key), ("AWS_SECRET_ACCESS_KEY", secret_key)):
        monkeypatch.setenv(name, value)


def doctor(capsys, *extra):
    code = main(["doctor"] + list(extra))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def table(out):
    """{check: (verdict, detail)} from the human table."""
    lines = out.splitlines()
    header = lines[0]
    verdict_at, detail_at = header.index("VERDICT"), header.index("DETAIL")
    rows = {}
    for line in lines[1:]:
        if line.startswith("verdict: "):
            break
        rows[line[:verdict_at].strip()] = (line[verdict_at:detail_at].strip(), line[detail_at:].strip())
    return rows


@pytest.fixture
def small_race(monkeypatch):
    """doctor's race with 3 threads x 2 rounds instead of 8 x 5: SeaweedFS makes
    each loser of a conditional-write race wait about a second (its lock
    backoff), so the full race takes 10-20 s there.  The full race runs
    against the stand-in server below."""
    original = buquet.doctor
    monkeypatch.setattr(buquet, "doctor", lambda store: original(store, race_threads=3, race_rounds=2))
    return [name.replace("8 threads x 5", "3 threads x 2") for name in CHECKS]


def all_keys(target):
    client = target.client()
    return [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=target.bucket)
            for o in page.get("Contents", [])]


# ============================================================================
# Real servers
# ============================================================================


def test_doctor_finds_a_real_server_safe_and_leaves_nothing(s3, monkeypatch, capsys, small_race):
    use_bucket(monkeypatch, s3.bucket, s3.endpoint, s3.region, s3.access_key, s3.secret_key)
    code, out, err = doctor(capsys)
    assert code == 0, out + err
    rows = table(out)
    assert list(rows) == small_race
    assert {name: verdict for name, (verdict, _) in rows.items() if verdict == "FAIL"} == {}
    for name in ("credentials", "bucket reachable", "conditional create", "compare-and-swap",
                 "If-Match on a missing key", "race (3 threads x 2)", "list paging", "cleanup"):
        assert rows[name][0] == "ok", (name, rows[name])
    assert rows["credentials"][1] == "environment (access key %s...)" % s3.access_key[:4]
    assert rows["versioning"][1] == "never enabled: history shows the current state only"
    assert out.splitlines()[-1] == "verdict: this bucket can run the queue"
    assert s3.secret_key not in out + err
    assert all_keys(s3) == []


@pytest.mark.versioned
def test_doctor_removes_every_version_it_wrote(s3, monkeypatch, capsys, small_race):
    use_bucket(monkeypatch, s3.bucket, s3.endpoint, s3.region, s3.access_key, s3.secret_key)
    code, out, err = doctor(capsys, "--json")
    assert code == 0, out + err
    data = json.loads(out)
    assert data["safe"] is True and [c["check"] for c in data["checks"]] == small_race
    checks = {c["check"]: c for c in data["checks"]}
    assert checks["versioning"]["detail"] == "Enabled: history keeps every version"
    assert checks["cleanup"] == {"check": "cleanup", "verdict": "ok", "detail": "nothing left behind"}
    assert s3.secret_key not in out + err
    listing = s3.client().list_object_versions(Bucket=s3.bucket)
    left = [v["Key"] for v in listing.get("Versions", []) + listing.get("DeleteMarkers", [])]
    assert [k for k in left if k.startswith(".doctor-test/")] == []
    assert all_keys(s3) == []


# ============================================================================
# A stand-in S3 that ignores conditional headers
# ============================================================================


class _LaxS3(BaseHTTPRequestHandler):
    """Just enough S3 for doctor: objects in a dict, ListObjectsV2 and
    GetBucketVersioning; every conditional PUT succeeds (the unsafe part)."""

    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):
        pass

    def _target(self):
        url = urlsplit(self.path)
        bucket, _, key = url.path.lstrip("/").partition("/")
        return bucket, unquote(key), parse_qs(url.query, keep_blank_values=True)

    def _reply(self, status, body=b"", headers=()):
        self.send_response(status)  # adds Date and Server
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status, code):
        body = ("<?xml version=\"1.0\"?><Error><Code>%s</Code><Message>%s</Message></Error>" % (code, code))
        self._reply(status, body.encode())

    def do_PUT(self):
        bucket, key, _ = self._target()
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if not key:
            return self._reply(200)
        etag = '"%s"' % hashlib.md5(body).hexdigest()
        with self.server.lock:
            self.server.objects[key] = (body, etag)
        self._reply(200, headers=[("ETag", etag)])

    def do_HEAD(self):
        self.do_GET()

    def do_GET(self):
        bucket, key, query = self._target()
        if bucket != self.server.bucket:
            return self._error(404, "NoSuchBucket")
        if key:
            with self.server.lock:
                found = self.server.objects.get(key)
            if found is None:
                return self._error(404, "NoSuchKey")
            return self._reply(200, found[0], [("ETag", found[1])])
        if "versioning" in query:
            return self._reply(200, b'<VersioningConfiguration xmlns="http://s3.amazonaws.com/doc/2006-03-01/"/>')
        if query.get("list-type") == ["2"]:
            return self._list(query)
        self._error(501, "NotImplemented")

    def _list(self, query):
        first = lambda name, default=None: query.get(name, [default])[0]  # noqa: E731
        prefix = first("prefix", "")
        after = max(first("start-after", ""), first("continuation-token", ""))
        max_keys = int(first("max-keys", "1000"))
        with self.server.lock:
            keys = sorted(k for k in self.server.objects if k.startswith(prefix) and k > after)
        page, truncated = keys[:max_keys], len(keys) > max_keys
        encode = (lambda k: quote(k, safe="/")) if first("encoding-type") == "url" else (lambda k: k)
        parts = ['<?xml version="1.0" encoding="UTF-8"?>',
                 '<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">',
                 "<Name>%s</Name><Prefix>%s</Prefix><KeyCount>%d</KeyCount><MaxKeys>%d</MaxKeys>"
                 % (self.server.bucket, escape(encode(prefix)), len(page), max_keys),
                 "<IsTruncated>%s</IsTruncated>" % ("true" if truncated else "false")]
        if first("encoding-type") == "url":
            parts.append("<EncodingType>url</EncodingType>")
        if truncated:
            parts.append("<NextContinuationToken>%s</NextContinuationToken>" % escape(page[-1]))
        with self.server.lock:
            for key in page:
                body, etag = self.server.objects.get(key, (b"", '""'))
                parts.append("<Contents><Key>%s</Key><ETag>%s</ETag><Size>%d</Size>"
                             "<LastModified>2026-01-01T00:00:00.000Z</LastModified></Contents>"
                             % (escape(encode(key)), escape(etag), len(body)))
        parts.append("</ListBucketResult>")
        self._reply(200, "".join(parts).encode(), [("Content-Type", "application/xml")])

    def do_DELETE(self):
        _, key, _ = self._target()
        with self.server.lock:
            self.server.objects.pop(key, None)
        self._reply(204)


@pytest.fixture
def lax_s3():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _LaxS3)
    server.daemon_threads = True
    server.objects, server.lock, server.bucket = {}, threading.Lock(), "lax-bucket"
    thread = threading.Thread(target=server.serve_forever, name="lax-s3", daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def test_doctor_calls_a_store_that_ignores_conditions_unsafe(lax_s3, monkeypatch, capsys):
    endpoint = "http://127.0.0.1:%d" % lax_s3.server_address[1]
    use_bucket(monkeypatch, lax_s3.bucket, endpoint, "us-east-1", "AKIDLAXTEST", SECRET)
    code, out, err = doctor(capsys)
    assert code == 3, out + err
    rows = table(out)
    assert list(rows) == CHECKS
    assert rows["conditional create"] == ("FAIL", "a second If-None-Match: * write replaced the object: two "
                                                  "workers could both submit or claim")
    assert rows["compare-and-swap"] == ("FAIL", "a write with a stale If-Match ETag succeeded: claims are not "
                                                "exclusive")
    assert rows["If-Match on a missing key"][0] == "FAIL"
    assert rows["race (8 threads x 5)"] == ("FAIL", "35 extra winners: conditional writes are not atomic here")
    assert rows["list paging"][0] == "ok" and rows["cleanup"][0] == "ok"
    verdict = out.splitlines()[-1]
    assert verdict.startswith("verdict: this bucket cannot run the queue safely: conditional create: ")
    assert "compare-and-swap: a write with a stale If-Match ETag succeeded" in verdict
    assert SECRET not in out + err
    assert lax_s3.objects == {}

    code, out, err = doctor(capsys, "--json")
    data = json.loads(out)
    assert code == 3 and data["safe"] is False
    assert [c["check"] for c in data["checks"] if c["verdict"] == "FAIL"] == [
        "conditional create", "compare-and-swap", "If-Match on a missing key", "race (8 threads x 5)"]


def test_doctor_on_the_local_store_has_nothing_to_check(tmp_path, capsys):
    code = main(["--local-dir", str(tmp_path / "store"), "doctor"])
    out = capsys.readouterr().out
    assert code == 0
    assert table(out) == {"store": ("info", "LocalStore(%r): local stores have no provider to check"
                                    % str(tmp_path / "store"))}
