"""S3Client against real servers, and against scripted local stand-ins for the faults
real servers do not produce on demand.

  - Real servers (fixtures from conftest.py): every call on moto and SeaweedFS.  moto
    accepts any signature; SeaweedFS enforces SigV4, so a passing call there also proves
    the signature (query, headers, odd keys) is what a real server computes.
  - Stand-ins: a tiny HTTP/1.1 server on 127.0.0.1 in a thread, answering each request
    with the next step of a script (reply, reset the connection, stall, close after
    replying).  Retries, backoff, uncertain writes, clock skew, keep-alive.
  - Proxy and TLS: a local forward/CONNECT proxy and a self-signed certificate.

Every client here gets `environ={}` (or an explicit one), so the developer's own proxy
or CA variables cannot change what is tested.
"""

import base64
import email.utils
import hashlib
import http.client
import http.server
import shutil
import socket
import socketserver
import struct
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections import deque, namedtuple
from datetime import datetime, timedelta, timezone
from urllib.parse import urlsplit

import pytest

import sigv4
from sigv4 import (
    ConflictError,
    Credentials,
    NoSuchKey,
    S3Client,
    S3Error,
    TransportError,
    UncertainWriteError,
)

UTC = timezone.utc
CREDS = Credentials("AKIDSTANDIN", "stand-in-secret/never+printed")


# ==== Real servers ===========================================================

# Keys that break naive encoders: reserved characters, spaces, non-ASCII, percent signs.
ODD_KEYS = [
    "a b/c  d",
    "plus+sign",
    "percent%20literal",
    "percent%",
    "equals=and&ampersand",
    "dollar$at@colon:semi;comma,",
    "tilde~star*quote'paren()",
    "unicodé/ключ/任务/😀",
    "question?hash#",
    "brackets[]{}",
    "caret^pipe|backtick`",
]
# SeaweedFS stores `//` as `/` and drops the body of a key ending in `/`: moto only.
MOTO_ONLY_KEYS = ["double//slash", "trailing/"]


def _client_for(target, **options):
    settings = dict(
        endpoint=target.endpoint, region=target.region,
        credentials=Credentials(target.access_key, target.secret_key),
        environ={}, max_attempts=2, connect_timeout=5, read_timeout=30,
    )
    settings.update(options)
    return S3Client(**settings)


@pytest.fixture
def client(s3):
    c = _client_for(s3)
    yield c
    c.close()


def _all_keys(client, bucket, **options):
    keys, token = [], None
    while True:
        page = client.list_objects_v2(bucket, continuation_token=token, **options)
        keys += page.keys
        if not page.is_truncated:
            return keys
        token = page.next_continuation_token


def test_an_object_round_trips_through_put_get_head_and_delete(s3, client):
    put = client.put_object(s3.bucket, "tasks/a.json", b'{"x": 1}', content_type="application/json",
                            metadata={"Owner": "me"})

    got = client.get_object(s3.bucket, "tasks/a.json")
    head = client.head_object(s3.bucket, "tasks/a.json")
    deleted = client.delete_object(s3.bucket, "tasks/a.json")

    assert put.status == 200 and put.etag.startswith('"')
    assert (got.status, got.body, got.etag) == (200, b'{"x": 1}', put.etag)
    assert got.content_type == "application/json"
    assert got.metadata == {"owner": "me"}
    assert (head.status, head.body, head.etag) == (200, b"", put.etag)
    assert head.headers["content-length"] == "8"
    assert abs(got.last_modified - datetime.now(UTC)) < timedelta(minutes=5)
    assert deleted.status == 204
    with pytest.raises(NoSuchKey) as info:
        client.get_object(s3.bucket, "tasks/a.json")
    assert str(info.value).startswith("GET s3://%s/tasks/a.json: 404 NoSuchKey: " % s3.bucket)
    with pytest.raises(NoSuchKey):
        client.head_object(s3.bucket, "tasks/a.json")


def test_a_str_body_is_sent_as_utf8(s3, client):
    client.put_object(s3.bucket, "k", "été")

    assert client.get_object(s3.bucket, "k").body == "été".encode("utf-8")


def test_a_second_create_only_put_is_a_conflict_and_keeps_the_first_body(s3, client):
    client.put_object(s3.bucket, "lock", b"first", if_none_match="*")

    with pytest.raises(ConflictError) as info:
        client.put_object(s3.bucket, "lock", b"second", if_none_match="*")

    assert not isinstance(info.value, UncertainWriteError)
    assert (info.value.status, info.value.code) == (412, "PreconditionFailed")
    assert str(info.value).startswith(
        "PUT s3://%s/lock: 412 PreconditionFailed: precondition failed: " % s3.bucket)
    assert client.get_object(s3.bucket, "lock").body == b"first"


def test_compare_and_swap_succeeds_once_per_etag(s3, client):
    first = client.put_object(s3.bucket, "counter", b"1")
    second = client.put_object(s3.bucket, "counter", b"2", if_match=first.etag)

    with pytest.raises(ConflictError) as info:
        client.put_object(s3.bucket, "counter", b"3", if_match=first.etag)

    assert second.etag != first.etag
    assert info.value.status == 412
    assert client.get_object(s3.bucket, "counter").body == b"2"


def test_if_match_on_a_missing_key_is_a_conflict_on_both_servers(s3, client):
    # AWS and moto answer 404, SeaweedFS (and Ceph) 412: both mean the write lost.
    with pytest.raises(ConflictError) as info:
        client.put_object(s3.bucket, "gone", b"x", if_match='"0123456789abcdef0123456789abcdef"')

    assert info.value.status == {"moto": 404, "seaweedfs": 412}[s3.server]
    with pytest.raises(NoSuchKey):
        client.get_object(s3.bucket, "gone")


def test_get_with_the_current_etag_answers_304_and_with_another_200(s3, client):
    put = client.put_object(s3.bucket, "k", b"body")

    same = client.get_object(s3.bucket, "k", if_none_match=put.etag)
    other = client.get_object(s3.bucket, "k", if_none_match='"0123456789abcdef0123456789abcdef"')

    assert (same.status, same.not_modified, same.body) == (304, True, b"")
    assert (other.status, other.not_modified, other.body) == (200, False, b"body")


def test_a_range_get_answers_206_with_the_slice(s3, client):
    client.put_object(s3.bucket, "k", b"0123456789")

    got = client.get_object(s3.bucket, "k", range="bytes=2-4")

    assert (got.status, got.body) == (206, b"234")


def test_listing_follows_continuation_tokens_start_after_and_delimiter(s3, client):
    keys = ["k%02d" % i for i in range(7)] + ["dir/a", "dir/b", "dir/sub/c"]
    for key in keys:
        client.put_object(s3.bucket, key, b"x")

    first = client.list_objects_v2(s3.bucket, max_keys=3)
    second = client.list_objects_v2(s3.bucket, max_keys=3, continuation_token=first.next_continuation_token)
    after = client.list_objects_v2(s3.bucket, start_after="k04")
    top = client.list_objects_v2(s3.bucket, delimiter="/")
    under = client.list_objects_v2(s3.bucket, prefix="dir/", delimiter="/")

    assert (first.keys, first.is_truncated, first.key_count) == (["dir/a", "dir/b", "dir/sub/c"], True, 3)
    assert first.next_continuation_token
    assert second.keys == ["k00", "k01", "k02"]
    assert _all_keys(client, s3.bucket, max_keys=3) == sorted(keys)
    assert (after.keys, after.is_truncated) == (["k05", "k06"], False)
    assert top.keys == ["k%02d" % i for i in range(7)]
    assert top.common_prefixes == ["dir/"]
    assert under.keys == ["dir/a", "dir/b"]
    assert under.common_prefixes == ["dir/sub/"]
    assert isinstance(first.date, datetime)


def test_odd_keys_round_trip_through_put_get_head_and_list(s3, client):
    keys = ODD_KEYS + (MOTO_ONLY_KEYS if s3.server == "moto" else [])
    for i, key in enumerate(keys):
        client.put_object(s3.bucket, "odd/" + key, b"body %d" % i)

    bodies = [client.get_object(s3.bucket, "odd/" + key).body for key in keys]
    heads = [client.head_object(s3.bucket, "odd/" + key).status for key in keys]
    listed = _all_keys(client, s3.bucket, prefix="odd/", max_keys=4)

    assert bodies == [b"body %d" % i for i in range(len(keys))]
    assert heads == [200] * len(keys)
    assert listed == sorted(("odd/" + k for k in keys), key=lambda k: k.encode("utf-8"))


@pytest.mark.parametrize("prefix", ["a b/", "plus+", "percent%", "equals=and&", "unicodé/ключ/"])
def test_a_prefix_with_odd_characters_lists_exactly_its_keys(s3, client, prefix):
    for key in ("odd/" + k for k in ODD_KEYS):
        client.put_object(s3.bucket, key, b"x")

    listed = client.list_objects_v2(s3.bucket, prefix="odd/" + prefix).keys

    assert listed == ["odd/" + k for k in sorted(ODD_KEYS) if k.startswith(prefix)]


def test_versioning_reads_none_then_enabled_then_suspended(s3, client):
    never = client.get_bucket_versioning(s3.bucket)
    client.put_bucket_versioning(s3.bucket, "Enabled")
    enabled = client.get_bucket_versioning(s3.bucket)
    client.put_bucket_versioning(s3.bucket, "Suspended")
    suspended = client.get_bucket_versioning(s3.bucket)

    assert (never, enabled, suspended) == (None, "Enabled", "Suspended")


def test_put_bucket_versioning_refuses_an_unknown_status(s3, client):
    with pytest.raises(ValueError, match="versioning status must be 'Enabled' or 'Suspended', got 'On'"):
        client.put_bucket_versioning(s3.bucket, "On")


@pytest.mark.versioned
def test_versions_and_delete_markers_are_listed_and_readable_by_id(s3, client):
    puts = [client.put_object(s3.bucket, "v/k", b"body %d" % i) for i in range(3)]
    client.put_object(s3.bucket, "v/other", b"o")
    client.delete_object(s3.bucket, "v/k")

    listed = client.list_object_versions(s3.bucket, prefix="v/k").versions
    old = client.get_object(s3.bucket, "v/k", version_id=puts[0].version_id)
    old_head = client.head_object(s3.bucket, "v/k", version_id=puts[1].version_id)

    markers = [v for v in listed if v.is_delete_marker]
    versions = [v for v in listed if not v.is_delete_marker]
    assert all(p.version_id for p in puts)
    assert [(m.key, m.is_latest) for m in markers] == [("v/k", True)]
    assert [(v.key, v.is_latest) for v in versions] == [("v/k", False)] * 3
    assert [v.version_id for v in versions] == [p.version_id for p in reversed(puts)]
    assert [v.etag for v in versions] == [p.etag for p in reversed(puts)]
    if s3.server != "moto":  # moto lists every version first, then every delete marker
        assert listed[0].is_delete_marker
    assert (old.body, old.version_id) == (b"body 0", puts[0].version_id)
    assert old_head.etag == puts[1].etag
    with pytest.raises(NoSuchKey):
        client.get_object(s3.bucket, "v/k")


@pytest.mark.versioned
def test_deleting_a_version_by_id_removes_only_that_version(s3, client):
    puts = [client.put_object(s3.bucket, "k", b"body %d" % i) for i in range(2)]

    client.delete_object(s3.bucket, "k", version_id=puts[1].version_id)

    assert [v.version_id for v in client.list_object_versions(s3.bucket).versions] == [puts[0].version_id]
    assert client.get_object(s3.bucket, "k").body == b"body 0"


def test_odd_keys_are_listed_by_list_object_versions(s3, client):
    keys = ["odd/" + k for k in ODD_KEYS]
    for key in keys:
        client.put_object(s3.bucket, key, b"x")

    listed = client.list_object_versions(s3.bucket, prefix="odd/").versions

    assert sorted(v.key for v in listed) == sorted(keys)


def test_on_reply_receives_the_servers_date_for_successes_and_errors(s3):
    replies = []
    c = _client_for(s3, on_reply=lambda *args: replies.append(args))
    before = time.monotonic()

    c.put_object(s3.bucket, "k", b"x")
    with pytest.raises(NoSuchKey) as info:
        c.get_object(s3.bucket, "missing")
    c.close()

    assert len(replies) == 2
    for date, sent, received in replies:
        assert date.tzinfo is not None
        assert abs(date - datetime.now(UTC)) < timedelta(minutes=5)
        assert before <= sent <= received <= time.monotonic()
    assert info.value.date == replies[1][0]


def test_create_bucket_makes_a_bucket_that_takes_objects(s3, client):
    name = s3.bucket[:50] + "-new"

    client.create_bucket(name)
    client.put_object(name, "k", b"x")

    assert client.get_object(name, "k").body == b"x"
    assert client.get_bucket_versioning(name) is None


def test_eight_threads_share_one_client(s3, client):
    errors, results = [], {}

    def work(n):
        try:
            for i in range(8):
                key = "t%d/%d" % (n, i)
                client.put_object(s3.bucket, key, key.encode())
                results[key] = client.get_object(s3.bucket, key).body
        except Exception as exc:  # reported below with the thread's number
            errors.append((n, exc))
        finally:
            client.close()

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)

    assert errors == []
    assert results == {key: key.encode() for key in results} and len(results) == 64
    assert len(_all_keys(client, s3.bucket)) == 64


def test_seaweedfs_rejects_a_wrong_secret_without_printing_it(seaweed_s3):
    wrong = "wrong-secret/never+print=me"
    c = _client_for(seaweed_s3, credentials=Credentials(seaweed_s3.access_key, wrong))

    with pytest.raises(S3Error) as info:
        c.put_object(seaweed_s3.bucket, "k", b"x")
    c.close()

    err = info.value
    assert (type(err), err.status, err.code) == (S3Error, 403, "SignatureDoesNotMatch")
    text = str(err)
    assert text.startswith("PUT s3://%s/k: 403 SignatureDoesNotMatch: " % seaweed_s3.bucket)
    assert "(check the secret access key and the region)" in text
    assert "\n" not in text
    assert wrong not in text and wrong not in repr(err)
    assert seaweed_s3.secret_key not in text


def test_seaweedfs_rejects_an_unknown_access_key(seaweed_s3):
    c = _client_for(seaweed_s3, credentials=Credentials("NO-SUCH-KEY", seaweed_s3.secret_key))

    with pytest.raises(S3Error) as info:
        c.get_object(seaweed_s3.bucket, "k")
    c.close()

    assert (info.value.status, info.value.code) == (403, "InvalidAccessKeyId")


def test_a_presigned_url_is_accepted_by_seaweedfs_and_a_tampered_one_is_not(seaweed_s3):
    c = _client_for(seaweed_s3)
    c.put_object(seaweed_s3.bucket, "odd/a b+é", b"presigned body")
    c.close()
    creds = Credentials(seaweed_s3.access_key, seaweed_s3.secret_key)
    url = sigv4._Endpoint(seaweed_s3.endpoint, seaweed_s3.region, None).url(seaweed_s3.bucket, "odd/a b+é")
    signed = sigv4.presign("GET", url, creds, seaweed_s3.region, expires=60)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    with opener.open(signed, timeout=10) as reply:
        body = reply.read()
    with pytest.raises(urllib.error.HTTPError) as info:
        opener.open(signed.replace("X-Amz-Expires=60", "X-Amz-Expires=61"), timeout=10)

    assert body == b"presigned body"
    assert info.value.code == 403


# ==== Stand-in servers =======================================================

Request = namedtuple("Request", "method path headers body connection")


class StandIn:
    """A scripted HTTP/1.1 server on 127.0.0.1: each request (on any connection) is
    answered by the next step of `script`; `default` answers once the script is used up.
    Records every request and counts connections."""

    def __init__(self, tls=None):
        self.script = deque()
        self.default = None
        self.requests = []
        self.connections = 0
        self.closed = threading.Event()  # set by steps that close the connection
        self.release = threading.Event()  # wakes stalled steps at teardown
        self._lock = threading.Lock()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            timeout = 10  # an idle kept-alive connection ends its thread eventually

            def setup(self):
                if tls is not None:
                    self.request = tls.wrap_socket(self.request, server_side=True)
                super().setup()
                with outer._lock:
                    outer.connections += 1
                    self.connection_number = outer.connections

            def log_message(self, *args):
                pass

            def _any(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                headers = {k.lower(): v for k, v in self.headers.items()}
                with outer._lock:
                    outer.requests.append(Request(self.command, self.path, headers, body,
                                                  self.connection_number))
                    step = outer.script.popleft() if outer.script else outer.default
                if step is None:
                    step = reply(599, b"stand-in script exhausted")
                step(self, outer)

            do_GET = do_PUT = do_DELETE = do_HEAD = do_POST = _any

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

            def handle_error(self, request, client_address):
                pass  # resets and failed handshakes are the point of these tests

        self.server = Server(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.url = "%s://127.0.0.1:%d" % ("https" if tls else "http", self.port)
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()

    def then(self, *steps):
        self.script.extend(steps)
        return self

    def close(self):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


def _http_date(dt):
    return email.utils.format_datetime(dt.astimezone(UTC), usegmt=True)


def reply(status, body=b"", headers=None, date=None, close=False):
    """A step: answer with `status`, `body` and `headers` (a Date header unless given);
    with close=True, close the connection afterwards without saying so first."""

    def step(handler, server):
        handler.send_response_only(status)
        sent = {"Date": _http_date(date or datetime.now(UTC)), "Content-Length": str(len(body)),
                "x-amz-request-id": "STANDIN%d" % len(server.requests)}
        if body.startswith(b"<?xml") or body.startswith(b"<Error"):
            sent["Content-Type"] = "application/xml"
        sent.update(headers or {})
        for name, value in sent.items():
            handler.send_header(name, value)
        handler.end_headers()
        if handler.command != "HEAD" and status not in (204, 304):
            handler.wfile.write(body)
        if close:
            _close(handler, server, reset=False)

    return step


def s3_error(status, code, message="", headers=None, date=None):
    body = ('<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>%s</Code><Message>%s</Message>'
            "<RequestId>RID-%s</RequestId></Error>" % (code, message or code, code)).encode()
    return reply(status, body, headers, date)


def _close(handler, server, reset):
    if reset:  # SO_LINGER 0: close() sends RST instead of FIN
        handler.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    handler.rfile.close()  # drop the makefile reference so close() really closes
    handler.connection.close()
    handler.close_connection = True
    server.closed.set()


def reset(handler, server):
    """A step: the connection is reset after the request arrived, before any reply
    (for a write: the server may have applied it)."""
    _close(handler, server, reset=True)


def stall(handler, server):
    """A step: no reply at all until the test ends."""
    server.release.wait(30)
    _close(handler, server, reset=False)


OK = reply(200, b"", {"ETag": '"e0"'})


@pytest.fixture
def make_stand_in():
    made = []

    def make(tls=None):
        server = StandIn(tls)
        made.append(server)
        return server

    yield make
    for server in made:
        server.close()


@pytest.fixture
def stand_in(make_stand_in):
    return make_stand_in()


class Recorder:
    """Injected sleep: records the backoff instead of waiting."""

    def __init__(self):
        self.sleeps = []

    def __call__(self, seconds):
        self.sleeps.append(seconds)


def _stand_in_client(server, **options):
    settings = dict(endpoint=server.url, region="us-east-1", credentials=CREDS, environ={},
                    max_attempts=3, connect_timeout=2, read_timeout=2, backoff_base=0.1,
                    backoff_cap=5.0, sleep=Recorder(), rand=lambda: 0.5)
    settings.update(options)
    return S3Client(**settings)


# ---- retries and backoff -----------------------------------------------------


def test_a_503_slowdown_is_retried_after_a_full_jitter_sleep(stand_in):
    stand_in.then(s3_error(503, "SlowDown", "Please reduce your request rate."), OK)
    c = _stand_in_client(stand_in, rand=lambda: 0.75)

    result = c.put_object("bucket", "k", b"body")

    assert (result.status, result.etag) == (200, '"e0"')
    assert c._sleep.sleeps == [0.75 * 0.1 * 2]
    assert [r.body for r in stand_in.requests] == [b"body", b"body"]


def test_backoff_sleeps_stay_within_full_jitter_bounds_up_to_the_cap(stand_in):
    rands = iter([0.999999, 0.0, 0.5, 0.25, 1.0 - 1e-9])
    stand_in.then(*[s3_error(503, "SlowDown")] * 5, OK)
    c = _stand_in_client(stand_in, max_attempts=6, backoff_base=1.0, backoff_cap=3.0,
                         rand=lambda: next(rands))

    c.get_object("bucket", "k")

    bounds = [min(3.0, 1.0 * 2 ** n) for n in range(1, 6)]  # 2, 3, 3, 3, 3
    assert c._sleep.sleeps == pytest.approx([0.999999 * 2, 0.0, 1.5, 0.75, 3.0 * (1.0 - 1e-9)])
    assert all(0 <= s <= b for s, b in zip(c._sleep.sleeps, bounds))


def test_a_500_internal_error_is_retried(stand_in):
    stand_in.then(s3_error(500, "InternalError", "We encountered an internal error."), reply(200, b"data"))
    c = _stand_in_client(stand_in)

    assert c.get_object("bucket", "k").body == b"data"
    assert len(stand_in.requests) == 2
    assert len(c._sleep.sleeps) == 1


def test_a_connection_reset_before_any_reply_is_retried_on_a_new_connection(stand_in):
    stand_in.then(reset, reply(200, b"data"))
    c = _stand_in_client(stand_in)

    assert c.get_object("bucket", "k").body == b"data"
    assert [r.connection for r in stand_in.requests] == [1, 2]
    assert len(c._sleep.sleeps) == 1  # a fresh connection's reset is a real attempt, with backoff


def test_a_retried_request_is_signed_again(stand_in):
    stand_in.then(s3_error(503, "SlowDown"), OK)
    c = _stand_in_client(stand_in)

    c.put_object("bucket", "k", b"x")

    first, second = stand_in.requests
    assert first.headers["authorization"].startswith("AWS4-HMAC-SHA256 Credential=AKIDSTANDIN/")
    assert second.headers["x-amz-date"] >= first.headers["x-amz-date"]
    assert second.headers["x-amz-content-sha256"] == first.headers["x-amz-content-sha256"]


@pytest.mark.parametrize("condition", [{"if_none_match": "*"}, {"if_match": '"e0"'}],
                         ids=["if-none-match", "if-match"])
def test_a_conditional_put_whose_reset_attempt_may_have_applied_is_uncertain_when_the_retry_loses(
        stand_in, condition):
    stand_in.then(reset, s3_error(412, "PreconditionFailed", "At least one of the pre-conditions "
                                                             "you specified did not hold"))
    c = _stand_in_client(stand_in)

    with pytest.raises(UncertainWriteError) as info:
        c.put_object("bucket", "tasks/k", b"x", **condition)

    assert len(stand_in.requests) == 2
    assert str(info.value) == (
        "PUT s3://bucket/tasks/k: 412 PreconditionFailed: conditional write retried after a broken "
        "attempt, and the retry lost: the first attempt may have been applied; re-read to decide "
        "[request id RID-PreconditionFailed]"
    )


def test_a_conditional_put_whose_reset_attempt_may_have_applied_is_uncertain_when_retries_run_out(stand_in):
    # Found by the chaos run: a reply lost after the write applied, then 503s to the end; a
    # plain error there made the caller think nothing was written.
    stand_in.then(reset, s3_error(503, "SlowDown"), s3_error(503, "SlowDown"))
    c = _stand_in_client(stand_in)

    with pytest.raises(UncertainWriteError) as info:
        c.put_object("bucket", "k", b"x", if_none_match="*")

    assert len(stand_in.requests) == 3
    assert str(info.value) == ("PUT s3://bucket/k: 503 SlowDown: SlowDown after a broken attempt that may "
                               "have been applied; re-read to decide [request id RID-SlowDown]")


def test_a_conditional_put_after_a_500_is_uncertain_when_the_retry_loses(stand_in):
    # A 500 may come after the write was applied.
    stand_in.then(s3_error(500, "InternalError"), s3_error(412, "PreconditionFailed"))
    c = _stand_in_client(stand_in)

    with pytest.raises(UncertainWriteError):
        c.put_object("bucket", "k", b"x", if_none_match="*")


def test_a_conditional_put_after_a_503_slowdown_is_a_plain_conflict_when_the_retry_loses(stand_in):
    # 503 SlowDown means "not processed": the 412 that follows is a clean loss.
    stand_in.then(s3_error(503, "SlowDown"), s3_error(412, "PreconditionFailed"))
    c = _stand_in_client(stand_in)

    with pytest.raises(ConflictError) as info:
        c.put_object("bucket", "k", b"x", if_none_match="*")

    assert type(info.value) is ConflictError


def test_a_plain_412_with_no_earlier_failure_is_a_conflict(stand_in):
    stand_in.then(s3_error(412, "PreconditionFailed", "At least one of the pre-conditions you "
                                                      "specified did not hold"))
    c = _stand_in_client(stand_in)

    with pytest.raises(ConflictError) as info:
        c.put_object("bucket", "tasks/k", b"x", if_match='"e0"')

    assert type(info.value) is ConflictError
    assert str(info.value) == (
        "PUT s3://bucket/tasks/k: 412 PreconditionFailed: precondition failed: At least one of the "
        "pre-conditions you specified did not hold [request id RID-PreconditionFailed]"
    )
    assert len(stand_in.requests) == 1 and c._sleep.sleeps == []


def test_a_409_conditional_request_conflict_is_retried_and_the_retry_decides(stand_in):
    # AWS answers a conditional write racing another on the key this way, having applied
    # neither; it says to try again. No local server does. The retry's 412 is a plain
    # lost race: the 409'd attempt cannot have been applied.
    conflict = s3_error(409, "ConditionalRequestConflict", "A conflicting operation occurred.")
    stand_in.then(conflict).then(s3_error(412, "PreconditionFailed"))
    stand_in.then(conflict).then(conflict).then(reply(200, headers={"ETag": '"e1"'}))
    c = _stand_in_client(stand_in)

    with pytest.raises(ConflictError) as info:
        c.put_object("bucket", "k", b"x", if_none_match="*")
    assert (info.value.status, info.value.code) == (412, "PreconditionFailed")
    assert type(info.value) is ConflictError  # not UncertainWriteError

    assert c.put_object("bucket", "k", b"x", if_none_match="*").etag == '"e1"'
    assert len(stand_in.requests) == 5


def test_a_409_conditional_request_conflict_on_every_attempt_is_no_lost_race(stand_in):
    for _ in range(3):  # max_attempts
        stand_in.then(s3_error(409, "ConditionalRequestConflict", "A conflicting operation occurred."))
    c = _stand_in_client(stand_in)

    with pytest.raises(S3Error) as info:
        c.put_object("bucket", "k", b"x", if_none_match="*")

    assert (info.value.status, info.value.code) == (409, "ConditionalRequestConflict")
    assert not isinstance(info.value, ConflictError)  # nothing was decided: not "it exists"


def test_a_412_on_an_unconditional_request_is_not_a_conflict(stand_in):
    stand_in.then(s3_error(412, "PreconditionFailed"))
    c = _stand_in_client(stand_in)

    with pytest.raises(S3Error) as info:
        c.put_object("bucket", "k", b"x")

    assert type(info.value) is S3Error


def test_a_client_error_reply_is_not_retried(stand_in):
    stand_in.default = s3_error(403, "AccessDenied", "Access Denied")
    c = _stand_in_client(stand_in)

    with pytest.raises(S3Error) as info:
        c.get_object("bucket", "k")

    assert str(info.value) == ("GET s3://bucket/k: 403 AccessDenied: Access Denied (check the "
                               "credentials' permissions on this bucket) [request id RID-AccessDenied]")
    assert len(stand_in.requests) == 1 and c._sleep.sleeps == []


def test_max_attempts_below_one_is_refused():
    with pytest.raises(ValueError, match="max_attempts must be at least 1, got 0"):
        S3Client(endpoint="http://127.0.0.1:1", credentials=CREDS, environ={}, max_attempts=0)


def test_a_credentials_provider_is_asked_again_for_each_attempt(stand_in):
    # A refreshing provider (an object with get()) may hand out new keys between attempts.
    class Provider:
        def __init__(self):
            self.keys = iter(["AKIDFIRST", "AKIDSECOND"])

        def get(self):
            return Credentials(next(self.keys), "secret")

    stand_in.then(s3_error(503, "SlowDown"), OK)
    c = _stand_in_client(stand_in, credentials=Provider())

    c.get_object("bucket", "k")

    first, second = stand_in.requests
    assert first.headers["authorization"].startswith("AWS4-HMAC-SHA256 Credential=AKIDFIRST/")
    assert second.headers["authorization"].startswith("AWS4-HMAC-SHA256 Credential=AKIDSECOND/")


def test_a_head_404_without_a_body_is_no_such_key(stand_in):
    stand_in.then(reply(404))
    c = _stand_in_client(stand_in)

    with pytest.raises(NoSuchKey) as info:
        c.head_object("bucket", "k")

    assert str(info.value) == "HEAD s3://bucket/k: 404 NotFound: empty error reply [request id STANDIN1]"


def test_exhausted_attempts_raise_a_transport_error_naming_the_cause(stand_in):
    stand_in.default = reset
    c = _stand_in_client(stand_in, max_attempts=3)

    with pytest.raises(TransportError) as info:
        c.get_object("bucket", "k")

    text = str(info.value)
    assert text.startswith("GET s3://bucket/k: no reply after 3 attempts: ")
    assert "ConnectionResetError" in text or "RemoteDisconnected" in text
    assert info.value.code in ("ConnectionResetError", "RemoteDisconnected")
    assert isinstance(info.value.__cause__, (ConnectionResetError, http.client.RemoteDisconnected))
    assert len(c._sleep.sleeps) == 2


def test_an_unreachable_endpoint_raises_a_transport_error_after_every_attempt():
    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    c = S3Client(endpoint="http://127.0.0.1:%d" % port, region="us-east-1", credentials=CREDS,
                 environ={}, max_attempts=2, connect_timeout=1, sleep=Recorder(), rand=lambda: 0.5)

    with pytest.raises(TransportError) as info:
        c.put_object("bucket", "k", b"x", if_none_match="*")

    assert str(info.value).startswith(
        "PUT s3://bucket/k: no reply after 2 attempts: ConnectionRefusedError: ")
    assert info.value.code == "ConnectionRefusedError"
    assert c._sleep.sleeps == [0.5 * 0.1 * 2]


def test_a_stalled_server_is_retried_then_a_transport_error_quickly(stand_in):
    stand_in.default = stall
    c = _stand_in_client(stand_in, max_attempts=2, read_timeout=0.2)
    started = time.monotonic()

    with pytest.raises(TransportError) as info:
        c.get_object("bucket", "k")

    assert str(info.value) == "GET s3://bucket/k: no reply after 2 attempts: timed out"
    assert len(stand_in.requests) == 2
    assert time.monotonic() - started < 2


def test_an_html_502_page_gives_a_readable_error(stand_in):
    page = (b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n<center><h1>502 Bad "
            b"Gateway</h1></center>\r\n<hr><center>nginx/1.25.3</center>\r\n</body>\r\n</html>\r\n")
    stand_in.default = reply(502, page, {"Content-Type": "text/html"})
    c = _stand_in_client(stand_in, max_attempts=2)

    with pytest.raises(S3Error) as info:
        c.get_object("bucket", "k")

    assert type(info.value) is S3Error
    assert str(info.value).startswith(
        "GET s3://bucket/k: 502 BadGateway: non-S3 error reply (HTML); a proxy or a wrong endpoint?")
    assert len(stand_in.requests) == 2


def test_a_skewed_clock_is_learnt_from_the_server_date_and_the_retry_is_signed_with_it(stand_in):
    server_now = datetime.now(UTC).replace(microsecond=0) + timedelta(hours=2)
    stand_in.then(
        s3_error(403, "RequestTimeTooSkewed",
                 "The difference between the request time and the current time is too large.",
                 date=server_now),
        OK, OK,
    )
    c = _stand_in_client(stand_in)

    c.put_object("bucket", "k", b"x")
    c.put_object("bucket", "k2", b"x")

    def signed_at(request):
        return datetime.strptime(request.headers["x-amz-date"], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)

    first, retry, later = stand_in.requests
    assert abs(signed_at(first) - datetime.now(UTC)) < timedelta(seconds=30)
    assert abs(signed_at(retry) - server_now) < timedelta(seconds=30)
    assert abs(signed_at(later) - server_now) < timedelta(seconds=30)
    assert retry.headers["authorization"] != first.headers["authorization"]


def test_a_kept_alive_connection_closed_by_the_server_is_reopened_transparently(stand_in):
    stand_in.then(reply(200, b"one", close=True), reply(200, b"two"), reply(200, b"three"))
    c = _stand_in_client(stand_in)

    first = c.get_object("bucket", "k").body
    assert stand_in.closed.wait(5)
    time.sleep(0.05)  # let the FIN reach the client's socket
    second = c.get_object("bucket", "k").body
    third = c.get_object("bucket", "k").body

    assert (first, second, third) == (b"one", b"two", b"three")
    assert [r.connection for r in stand_in.requests] == [1, 2, 2]
    assert c._sleep.sleeps == []


def test_one_client_keeps_one_connection_per_thread(stand_in):
    stand_in.default = reply(200, b"x")
    c = _stand_in_client(stand_in)
    errors = []

    def work():
        try:
            for _ in range(5):
                c.get_object("bucket", "k")
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)

    assert errors == []
    assert len(stand_in.requests) == 40
    assert stand_in.connections == 8
    per_connection = {}
    for r in stand_in.requests:
        per_connection[r.connection] = per_connection.get(r.connection, 0) + 1
    assert sorted(per_connection.values()) == [5] * 8


def test_on_reply_sees_the_date_of_error_replies_too(stand_in):
    fixed = datetime(2031, 1, 2, 3, 4, 5, tzinfo=UTC)
    stand_in.then(s3_error(412, "PreconditionFailed", date=fixed), reply(200, date=fixed))
    seen = []
    c = _stand_in_client(stand_in, on_reply=lambda date, sent, received: seen.append(date))

    with pytest.raises(ConflictError) as info:
        c.put_object("bucket", "k", b"x", if_none_match="*")
    c.get_object("bucket", "k")

    assert seen == [fixed, fixed]
    assert info.value.date == fixed


# ---- what goes on the wire ---------------------------------------------------


def test_the_request_carries_the_signed_headers_the_body_and_the_encoded_key(stand_in):
    stand_in.then(OK)
    c = _stand_in_client(stand_in)

    c.put_object("bucket", "a b/é+%", b"body", if_none_match="*", content_type="text/plain",
                 metadata={"Owner": "me"})

    (r,) = stand_in.requests
    assert (r.method, r.path, r.body) == ("PUT", "/bucket/a%20b/%C3%A9%2B%25", b"body")
    assert r.headers["host"] == "127.0.0.1:%d" % stand_in.port
    assert r.headers["content-length"] == "4"
    assert r.headers["if-none-match"] == "*"
    assert r.headers["x-amz-meta-owner"] == "me"
    assert r.headers["x-amz-content-sha256"] == sigv4._sha256_hex(b"body")
    assert "SignedHeaders=content-length;" not in r.headers["authorization"]
    assert "SignedHeaders=content-type;host;if-none-match;x-amz-content-sha256;x-amz-date;" \
           "x-amz-meta-owner," in r.headers["authorization"]


def test_list_objects_v2_sends_every_parameter_encoded_and_sorted(stand_in):
    stand_in.then(reply(200, b"<ListBucketResult><IsTruncated>false</IsTruncated></ListBucketResult>"))
    c = _stand_in_client(stand_in)

    c.list_objects_v2("bucket", prefix="a b/", start_after="a b/k+1", continuation_token="t/+=",
                      max_keys=2, delimiter="/")

    assert stand_in.requests[0].path == (
        "/bucket?continuation-token=t%2F%2B%3D&delimiter=%2F&encoding-type=url&list-type=2"
        "&max-keys=2&prefix=a%20b%2F&start-after=a%20b%2Fk%2B1")


def test_list_object_versions_follows_every_page(stand_in):
    def page(truncated, entries, markers=""):
        return reply(200, (
            "<ListVersionsResult><EncodingType>url</EncodingType><IsTruncated>%s</IsTruncated>%s%s"
            "</ListVersionsResult>" % (truncated, markers, entries)).encode())

    version = "<Version><Key>%s</Key><VersionId>%s</VersionId><IsLatest>%s</IsLatest></Version>"
    stand_in.then(
        page("true", version % ("k+a", "v/1", "true") + version % ("k+b", "v/2", "true"),
             "<NextKeyMarker>k+b</NextKeyMarker><NextVersionIdMarker>v/2</NextVersionIdMarker>"),
        page("true", version % ("k+b", "v/3", "false"),
             "<NextKeyMarker>k+c</NextKeyMarker><NextVersionIdMarker>v/4</NextVersionIdMarker>"),
        page("false", "<DeleteMarker><Key>k+c</Key><VersionId>v/5</VersionId>"
                      "<IsLatest>true</IsLatest></DeleteMarker>"),
    )
    c = _stand_in_client(stand_in)

    result = c.list_object_versions("bucket", prefix="k ")

    assert [(v.key, v.version_id, v.is_delete_marker) for v in result.versions] == [
        ("k a", "v/1", False), ("k b", "v/2", False), ("k b", "v/3", False), ("k c", "v/5", True)]
    assert [r.path for r in stand_in.requests] == [
        "/bucket?encoding-type=url&prefix=k%20&versions",
        "/bucket?encoding-type=url&key-marker=k%20b&prefix=k%20&version-id-marker=v%2F2&versions",
        "/bucket?encoding-type=url&key-marker=k%20c&prefix=k%20&version-id-marker=v%2F4&versions",
    ]
    assert isinstance(result.date, datetime)


def test_put_bucket_versioning_sends_a_content_md5(stand_in):
    stand_in.then(OK)
    c = _stand_in_client(stand_in)

    c.put_bucket_versioning("bucket", "Suspended")

    (r,) = stand_in.requests
    assert (r.method, r.path) == ("PUT", "/bucket?versioning")
    assert b"<Status>Suspended</Status>" in r.body
    assert r.headers["content-md5"] == base64.b64encode(hashlib.md5(r.body).digest()).decode()


def test_create_bucket_outside_us_east_1_sends_the_location_constraint(stand_in):
    stand_in.then(OK)
    c = _stand_in_client(stand_in, region="eu-west-1")

    c.create_bucket("bucket")

    (r,) = stand_in.requests
    assert (r.method, r.path) == ("PUT", "/bucket")
    assert b"<LocationConstraint>eu-west-1</LocationConstraint>" in r.body
    assert "/eu-west-1/s3/aws4_request" in r.headers["authorization"]


# ==== Proxy and TLS ==========================================================


class ForwardProxy:
    """A tiny HTTP proxy on 127.0.0.1: CONNECT tunnels and absolute-URI forwarding.
    Records the request head that opened each connection, then pipes bytes both ways."""

    def __init__(self):
        self.heads = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.url = "http://127.0.0.1:%d" % self.port
        self._sockets = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def first_lines(self):
        return [head.split("\r\n", 1)[0] for head in self.heads]

    def _accept(self):
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            self._sockets.append(client)
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client):
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = client.recv(65536)
            if not chunk:
                client.close()
                return
            data += chunk
        head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1")
        self.heads.append(head)
        method, target, _ = head.split("\r\n", 1)[0].split(" ", 2)
        if method == "CONNECT":
            host, port = target.rsplit(":", 1)
            upstream = socket.create_connection((host, int(port)))
            client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            rest = data.split(b"\r\n\r\n", 1)[1]
        else:  # absolute URI: forward the request as it came, to the origin it names
            parts = urlsplit(target)
            upstream = socket.create_connection((parts.hostname, parts.port or 80))
            rest = data
        self._sockets.append(upstream)
        if rest:
            upstream.sendall(rest)
        threading.Thread(target=self._pipe, args=(upstream, client), daemon=True).start()
        self._pipe(client, upstream)

    @staticmethod
    def _pipe(source, sink):
        try:
            while True:
                chunk = source.recv(65536)
                if not chunk:
                    break
                sink.sendall(chunk)
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self):
        self._listener.close()
        for sock in self._sockets:
            try:
                sock.close()
            except OSError:
                pass


@pytest.fixture
def proxy():
    p = ForwardProxy()
    yield p
    p.close()


def test_an_http_request_through_http_proxy_uses_the_absolute_url(stand_in, proxy):
    stand_in.then(reply(200, b"via proxy"))
    c = _stand_in_client(stand_in, environ={"HTTP_PROXY": proxy.url})

    body = c.get_object("bucket", "a b").body

    target = "http://127.0.0.1:%d/bucket/a%%20b" % stand_in.port
    assert body == b"via proxy"
    assert proxy.first_lines == ["GET %s HTTP/1.1" % target]
    assert stand_in.requests[0].path == target
    assert stand_in.requests[0].headers["host"] == "127.0.0.1:%d" % stand_in.port


def test_proxy_credentials_are_sent_to_the_proxy_and_not_signed(stand_in, proxy):
    stand_in.then(OK)
    proxy_url = "http://user:p%%40ss@127.0.0.1:%d" % proxy.port
    c = _stand_in_client(stand_in, environ={"http_proxy": proxy_url})

    c.get_object("bucket", "k")

    headers = stand_in.requests[0].headers
    assert headers["proxy-authorization"] == "Basic " + base64.b64encode(b"user:p@ss").decode()
    assert "proxy-authorization" not in headers["authorization"]
    assert "p@ss" not in repr(c._transport._proxies)


def test_no_proxy_bypasses_the_proxy(stand_in, proxy):
    stand_in.then(reply(200, b"direct"))
    c = _stand_in_client(stand_in, environ={"HTTP_PROXY": proxy.url, "NO_PROXY": "localhost,127.0.0.1"})

    assert c.get_object("bucket", "k").body == b"direct"
    assert proxy.first_lines == []
    assert stand_in.requests[0].path == "/bucket/k"


def test_an_https_proxy_setting_does_not_apply_to_http_endpoints(stand_in, proxy):
    stand_in.then(reply(200, b"direct"))
    c = _stand_in_client(stand_in, environ={"HTTPS_PROXY": proxy.url})

    assert c.get_object("bucket", "k").body == b"direct"
    assert proxy.first_lines == []


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1, made with the openssl command line."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl command is not installed: cannot make a test certificate")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=30,
    )
    return cert, key


@pytest.fixture
def tls_stand_in(make_stand_in, certificate):
    import ssl

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(certificate[0]), str(certificate[1]))
    return make_stand_in(tls=context)


def test_https_with_verification_and_an_unknown_ca_fails_at_once_naming_the_certificate(tls_stand_in):
    c = _stand_in_client(tls_stand_in, max_attempts=3)

    with pytest.raises(TransportError) as info:
        c.get_object("bucket", "k")

    assert str(info.value).startswith("GET s3://bucket/k: TLS certificate verification failed: ")
    assert "certificate verify failed" in str(info.value)
    assert str(info.value).endswith("(set AWS_CA_BUNDLE or ca_bundle for a private CA)")
    assert c._sleep.sleeps == []  # another attempt cannot fix a certificate
    assert tls_stand_in.requests == []


def test_https_with_the_ca_bundle_given_succeeds(tls_stand_in, certificate):
    tls_stand_in.then(reply(200, b"secure"))
    c = _stand_in_client(tls_stand_in, ca_bundle=str(certificate[0]))

    assert c.get_object("bucket", "k").body == b"secure"


def test_https_with_aws_ca_bundle_in_the_environment_succeeds(tls_stand_in, certificate):
    tls_stand_in.then(reply(200, b"secure"))
    c = _stand_in_client(tls_stand_in, environ={"AWS_CA_BUNDLE": str(certificate[0])})

    assert c.get_object("bucket", "k").body == b"secure"


def test_https_checks_the_host_name_against_the_certificate(tls_stand_in, certificate):
    # The certificate names 127.0.0.1 only.
    c = _stand_in_client(tls_stand_in, endpoint="https://localhost:%d" % tls_stand_in.port,
                         ca_bundle=str(certificate[0]), max_attempts=1)

    with pytest.raises(TransportError) as info:
        c.get_object("bucket", "k")

    assert "certificate verify failed" in str(info.value)


def test_https_without_verification_accepts_any_certificate(tls_stand_in):
    tls_stand_in.then(reply(200, b"unverified"))
    c = _stand_in_client(tls_stand_in, verify=False)

    assert c.get_object("bucket", "k").body == b"unverified"


def test_https_through_a_connect_proxy_works_with_the_ca_given(tls_stand_in, certificate, proxy):
    tls_stand_in.then(reply(200, b"tunnelled"), reply(200, b"again"))
    c = _stand_in_client(tls_stand_in, ca_bundle=str(certificate[0]),
                         environ={"HTTPS_PROXY": "http://u:pw@127.0.0.1:%d" % proxy.port})

    first = c.get_object("bucket", "k").body
    second = c.get_object("bucket", "k").body

    assert (first, second) == (b"tunnelled", b"again")
    (line,) = proxy.first_lines  # one tunnel, reused (HTTP/1.0 before Python 3.13, then 1.1)
    assert line.startswith("CONNECT 127.0.0.1:%d HTTP/1." % tls_stand_in.port)
    assert "Proxy-Authorization: Basic " + base64.b64encode(b"u:pw").decode() in proxy.heads[0]
    assert [r.path for r in tls_stand_in.requests] == ["/bucket/k", "/bucket/k"]
    assert "proxy-authorization" not in tls_stand_in.requests[0].headers


def test_https_no_proxy_bypasses_the_connect_proxy(tls_stand_in, certificate, proxy):
    tls_stand_in.then(reply(200, b"direct"))
    c = _stand_in_client(tls_stand_in, ca_bundle=str(certificate[0]),
                         environ={"HTTPS_PROXY": proxy.url, "NO_PROXY": "127.0.0.1:%d" % tls_stand_in.port})

    assert c.get_object("bucket", "k").body == b"direct"
    assert proxy.first_lines == []


# ---- the HTTP/1.1 response reader ------------------------------------------------


def raw(data, close=False):
    """A step: write these bytes as the whole response."""

    def step(handler, server):
        handler.wfile.write(data)
        handler.wfile.flush()
        if close:
            _close(handler, server, reset=False)

    return step


def test_a_chunked_body_is_read_whole_and_the_connection_kept(stand_in):
    stand_in.then(raw(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nETag: \"c1\"\r\n\r\n"
                      b"5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\nX-Trailer: t\r\n\r\n"), reply(200, b"next"))
    c = _stand_in_client(stand_in)

    first = c.get_object("bucket", "k")
    second = c.get_object("bucket", "k")

    assert (first.body, first.etag, second.body) == (b"hello, world", '"c1"', b"next")
    assert [r.connection for r in stand_in.requests] == [1, 1]


def test_an_interim_100_continue_is_skipped(stand_in):
    stand_in.then(raw(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"))
    c = _stand_in_client(stand_in)

    assert c.get_object("bucket", "k").body == b"ok"


def test_a_body_without_length_is_read_to_the_close_and_the_next_request_reconnects(stand_in):
    stand_in.then(raw(b"HTTP/1.0 200 OK\r\nETag: \"x\"\r\n\r\nuntil the end", close=True), reply(200, b"again"))
    c = _stand_in_client(stand_in)

    assert c.get_object("bucket", "k").body == b"until the end"
    assert c.get_object("bucket", "k").body == b"again"
    assert [r.connection for r in stand_in.requests] == [1, 2]
    assert c._sleep.sleeps == []  # a planned close is not a failure


def test_repeated_response_headers_are_joined_with_commas(stand_in):
    stand_in.then(raw(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nX-Amz-Meta-A: 1\r\nx-amz-meta-a: 2\r\n\r\n"))
    c = _stand_in_client(stand_in)

    assert c.head_object("bucket", "k").metadata == {"a": "1, 2"}


def test_a_body_cut_short_is_retried_as_a_broken_exchange(stand_in):
    stand_in.then(raw(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", close=True), reply(200, b"full"))
    c = _stand_in_client(stand_in)

    assert c.get_object("bucket", "k").body == b"full"
    assert len(stand_in.requests) == 2


def test_a_garbage_status_line_is_a_broken_exchange(stand_in):
    stand_in.then(raw(b"NOT HTTP AT ALL\r\n\r\n", close=True), reply(200, b"fine"))
    c = _stand_in_client(stand_in)

    assert c.get_object("bucket", "k").body == b"fine"
    assert len(stand_in.requests) == 2


def test_delete_objects_removes_many_keys_in_one_request_and_reports_none_missing(s3, client):
    keys = ["batch/%d & <odd> 'key'" % i for i in range(30)]
    for key in keys:
        client.put_object(s3.bucket, key, b"x")
    client.put_object(s3.bucket, "batch-keep", b"x")

    errors = client.delete_objects(s3.bucket, keys + ["batch/never-existed"])

    assert errors == []
    assert client.list_objects_v2(s3.bucket, prefix="batch").keys == ["batch-keep"]


def test_delete_objects_refuses_more_than_a_thousand_keys_before_any_request(stand_in):
    c = _stand_in_client(stand_in)

    with pytest.raises(ValueError) as info:
        c.delete_objects("bucket", ["k%d" % i for i in range(1001)])

    assert str(info.value) == "delete_objects(): at most 1000 keys per request, got 1001"
    assert stand_in.requests == []


def test_delete_objects_sends_a_content_md5_and_reports_per_key_errors(stand_in):
    body = (b'<?xml version="1.0" encoding="UTF-8"?><DeleteResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
            b"<Error><Key>b</Key><Code>AccessDenied</Code><Message>Access Denied</Message></Error></DeleteResult>")
    stand_in.then(reply(200, body))
    c = _stand_in_client(stand_in)

    errors = c.delete_objects("bucket", ["a", "b"])

    request = stand_in.requests[0]
    assert (request.method, request.path) == ("POST", "/bucket?delete")
    expected_md5 = base64.b64encode(hashlib.md5(request.body).digest()).decode()
    assert request.headers["content-md5"] == expected_md5
    assert b"<Key>a</Key>" in request.body and b"<Quiet>true</Quiet>" in request.body
    assert errors == [("b", "AccessDenied", "Access Denied")]
