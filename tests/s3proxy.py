#!/usr/bin/env python3
"""A counting, fault-injecting HTTP/1.1 proxy for S3: the one proxy of the
tests and the benchmarks.

Sits between S3 clients and an S3-compatible server on 127.0.0.1, forwards
every request byte for byte (the Host header stays as the client sent it:
SigV4 signs it and the server checks it), optionally waits a fixed latency
(plus jitter) before forwarding each request, injects faults on request, and
counts requests:

* by method (GET, PUT, ...);
* by kind: LIST (GET with `list-type` in the query), LISTV (GET with
  `versions`), GET, HEAD, PUT, DELETE, POST, other;
* by status as the client saw it (so 412 Precondition Failed is counted, and
  an injected 503 too; a request whose reply was cut off by a fault counts
  under the fault's name: `reset_before`, `reset_after`, `stall`), and by
  (kind, status);
* by area: the first component of the key (`tasks`, `ready`, `leases`,
  `workers`, ...) or, for a LIST, of its `prefix`; `(bucket)` for
  bucket-level requests other than listings;
* by fault injected (`faults`); `fault_log` keeps each one as (time, fault,
  method, path, the server's status or None when it never saw the request).

Faults (`FAULTS`), what the client sees, and whether the server saw it:

    slowdown      503 SlowDown (S3's XML error body)        not forwarded
    internal      500 InternalError                         not forwarded
    conflict      409 ConditionalRequestConflict, only for  not forwarded
                  conditional writes (PUT with If-Match or
                  If-None-Match); other requests pass
    reset_before  the connection reset (TCP RST) once the   not forwarded
                  request has arrived
    reset_after   the connection reset after the server's   applied
                  whole reply was read: the reply is lost
    stall         no reply for `stall_s` seconds (longer    applied
                  than the client's read timeout), then
                  the connection closed without one

Faults come at random, each kind with a per-request probability
(`faults=`, `set_faults()`), or aimed: `fail_next(kind, n, match)` injects
exactly the next n requests that the kind applies to and `match(method,
path, headers)` accepts (`path` is the request target as sent, query
included; header names are lowercase).  Aimed faults go first.  `match` is
called in the connection's thread for each candidate request, without any
lock held: it may even talk to the server (not through this proxy with a
rule that would catch its own request).

Connections are persistent both ways: each client connection gets a thread
and its own upstream connection, reopened when the server closes it.
`Expect: 100-continue` is relayed.  With `track_keys=True` every request is
also logged as (time, kind, path, status) in `proxy.log`, for per-key
analysis.  Path-style addressing is assumed for the area counts and
`key_of` (forwarding works with any addressing).

In-process use (tests/test_faults.py, benchmarks/bench_fleet.py):

    proxy = S3Proxy("127.0.0.1", 8333, latency_ms=20, jitter_ms=2,
                    faults={"slowdown": 0.02, "reset_after": 0.01}, seed=7).start()
    ... point clients at proxy.endpoint ...
    aim = proxy.fail_next("reset_after", match=lambda method, path, headers:
                          method == "PUT" and key_of(path).startswith("tasks/"))
    ... aim.done, aim.hits ...
    counts = proxy.snapshot()      # dict of counters; proxy.reset() zeroes them
    proxy.set_latency(0)           # change the latency at any time
    proxy.set_faults({})           # and the fault rates
    proxy.stop()

Standalone (counts served as JSON on a second port: GET /stats, GET /reset):

    python tests/s3proxy.py --upstream http://127.0.0.1:8333 --port 9333 \\
        --latency-ms 20 --jitter-ms 2 --faults slowdown=0.02,reset_after=0.01 \\
        --stall-s 5 --stats-port 9334

Only the standard library; binds 127.0.0.1 only.
"""

import argparse
import json
import random
import socket
import struct
import sys
import threading
import time
from collections import Counter
from email.utils import formatdate
from urllib.parse import parse_qsl, unquote, urlsplit
from xml.sax.saxutils import escape

__all__ = ["FAULTS", "Aim", "LatencyProxy", "S3Proxy", "area_of", "key_of", "kind_of", "parse_faults"]

# The faults, in the order a random draw walks them.
FAULTS = ("slowdown", "internal", "conflict", "reset_before", "reset_after", "stall")
# The faults answered by the proxy itself: status, reason, S3 code, AWS's message.
_ERRORS = {
    "slowdown": (503, "Slow Down", "SlowDown", "Please reduce your request rate."),
    "internal": (500, "Internal Server Error", "InternalError",
                 "We encountered an internal error. Please try again."),
    "conflict": (409, "Conflict", "ConditionalRequestConflict",
                 "A conflicting conditional operation is currently in progress against this resource. "
                 "Please try again."),
}

_MAX_LINE = 65536
_CHUNK = 65536
_BUFFERED_BODY = 1 << 20  # request bodies up to this size are read whole before forwarding


class _Closed(Exception):
    """The peer closed the connection (or sent garbage): drop this connection."""


def kind_of(method, target):
    """The coarse kind of a request: LIST, LISTV, GET, HEAD, PUT, DELETE, POST, other."""
    path, _, query = target.partition("?")
    if method == "GET":
        names = {name for name, _ in parse_qsl(query, keep_blank_values=True)}
        if "list-type" in names:
            return "LIST"
        if "versions" in names:
            return "LISTV"
        return "GET"
    if method in ("HEAD", "PUT", "DELETE", "POST"):
        return method
    return "other"


def area_of(method, target):
    """First key component (path-style URL), or of the LIST prefix."""
    path, _, query = target.partition("?")
    if path.startswith("http://") or path.startswith("https://"):  # absolute form
        path = urlsplit(path).path
    parts = path.lstrip("/").split("/", 1)
    key = unquote(parts[1]) if len(parts) > 1 else ""
    if key:
        return key.split("/", 1)[0]
    params = dict(parse_qsl(query, keep_blank_values=True))
    if method == "GET" and ("list-type" in params or "versions" in params):
        prefix = params.get("prefix", "")
        return (prefix.split("/", 1)[0] or "(all)") if prefix else "(all)"
    return "(bucket)"


def _read_line(rfile):
    line = rfile.readline(_MAX_LINE + 1)
    if not line:
        raise _Closed("eof")
    if len(line) > _MAX_LINE:
        raise _Closed("line too long")
    return line


def _read_head(rfile, first=None):
    """(start line, raw head bytes, {lower name: value}); skips blank lines
    before a request line."""
    line = first if first is not None else _read_line(rfile)
    while line in (b"\r\n", b"\n"):
        line = _read_line(rfile)
    raw = [line]
    headers = {}
    while True:
        h = _read_line(rfile)
        raw.append(h)
        if h in (b"\r\n", b"\n"):
            break
        name, sep, value = h.decode("latin-1").partition(":")
        if not sep:
            raise _Closed("bad header line")
        name = name.strip().lower()
        value = value.strip()
        if name in headers:
            headers[name] = headers[name] + ", " + value
        else:
            headers[name] = value
        if len(raw) > 200:
            raise _Closed("too many headers")
    return line.decode("latin-1").rstrip("\r\n"), b"".join(raw), headers


def _relay_body(rfile, send, headers, until_eof=False):
    """Copy a message body as it is framed (chunked, Content-Length, or to
    EOF), raw bytes included (chunk sizes, trailers).  `send(bytes)`."""
    te = headers.get("transfer-encoding", "").lower()
    if "chunked" in te:
        while True:
            size_line = _read_line(rfile)
            send(size_line)
            size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
            if size == 0:
                while True:  # trailers up to the blank line
                    t = _read_line(rfile)
                    send(t)
                    if t in (b"\r\n", b"\n"):
                        return
            _copy(rfile, send, size + 2)  # data and its CRLF
    elif "content-length" in headers:
        _copy(rfile, send, int(headers["content-length"].split(",")[0]))
    elif until_eof:
        while True:
            data = rfile.read1(_CHUNK) if hasattr(rfile, "read1") else rfile.read(_CHUNK)
            if not data:
                return
            send(data)


def _copy(rfile, send, n):
    while n > 0:
        data = rfile.read(min(n, _CHUNK))
        if not data:
            raise _Closed("eof in body")
        send(data)
        n -= len(data)


class _Buffer:
    """Collects small writes so a head and a small body leave in one send."""

    def __init__(self, sock, limit=_CHUNK):
        self.sock, self.limit, self.parts, self.size = sock, limit, [], 0

    def __call__(self, data):
        self.parts.append(data)
        self.size += len(data)
        if self.size >= self.limit:
            self.flush()

    def flush(self):
        if self.parts:
            data = b"".join(self.parts)
            self.parts, self.size = [], 0
            self.sock.sendall(data)


def key_of(path):
    """The object key of a path-style request target ("/bucket/key?query"),
    percent-decoded; "" for a bucket-level request."""
    path = path.partition("?")[0]
    if path.startswith("http://") or path.startswith("https://"):  # absolute form
        path = urlsplit(path).path
    parts = path.lstrip("/").split("/", 1)
    return unquote(parts[1]) if len(parts) > 1 else ""


def _applies(kind, method, headers):
    """Whether a fault can hit this request: a conflict only answers a
    conditional write, where S3 can send it."""
    return kind != "conflict" or (method == "PUT" and ("if-match" in headers or "if-none-match" in headers))


def _check_rates(faults):
    """{kind: rate} validated: known kinds, probabilities adding up to <= 1."""
    if faults is None:
        return {}
    if not isinstance(faults, dict):
        raise ValueError("faults must be a dict of fault kind -> probability, got %r" % (faults,))
    rates = {}
    for kind, rate in faults.items():
        if kind not in FAULTS:
            raise ValueError("unknown fault %r: the faults are %s" % (kind, ", ".join(FAULTS)))
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate <= 1.0:
            raise ValueError("fault rate %s=%r is not a probability between 0 and 1" % (kind, rate))
        if rate:
            rates[kind] = float(rate)
    total = sum(rates.values())
    if total > 1.0 + 1e-9:
        raise ValueError("fault rates add up to %g, more than 1: %s" % (
            total, ", ".join("%s=%g" % item for item in sorted(rates.items()))))
    return rates


def parse_faults(text):
    """"slowdown=0.02,reset_after=0.01" -> {kind: rate}, validated."""
    rates = {}
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        kind, sep, value = item.partition("=")
        if not sep:
            raise ValueError("fault %r: expected KIND=RATE, e.g. slowdown=0.02" % (item,))
        try:
            rates[kind.strip()] = float(value)
        except ValueError:
            raise ValueError("fault %s: rate %r is not a number" % (kind.strip(), value)) from None
    return _check_rates(rates)


class Aim:
    """What `S3Proxy.fail_next` returns: the aimed fault, and the requests
    it hit so far (`hits`: (method, path) pairs, in order)."""

    def __init__(self, kind, n, match):
        self.kind = kind
        self.n = n
        self.match = match
        self.hits = []
        self.error = None  # an exception `match` raised (the request then passed)

    @property
    def remaining(self):
        return self.n - len(self.hits)

    @property
    def done(self):
        return len(self.hits) >= self.n

    def __repr__(self):
        return "Aim(%r, %d of %d injected)" % (self.kind, len(self.hits), self.n)


def _discard(data):
    """The sink of a reply that a fault keeps from the client."""


def _reset(sock):
    """Make the coming close() send a TCP RST instead of a FIN."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass


class S3Proxy:
    """See the module docstring."""

    def __init__(self, upstream_host, upstream_port, *, latency_ms=0.0, jitter_ms=0.0, faults=None, stall_s=5.0,
                 host="127.0.0.1", port=0, seed=None, timeout=120.0, track_keys=False):
        self.upstream = (upstream_host, int(upstream_port))
        self.set_latency(latency_ms, jitter_ms)
        self._faults = _check_rates(faults)
        if isinstance(stall_s, bool) or not isinstance(stall_s, (int, float)) or not stall_s > 0:
            raise ValueError("stall_s must be a positive number of seconds, got %r" % (stall_s,))
        self.stall_s = float(stall_s)
        self.timeout = timeout
        self.track_keys = track_keys  # also count "KIND path status" (for debugging; grows with the keys)
        self._rand = random.Random(seed)
        self._rand_lock = threading.Lock()
        self._lock = threading.Lock()
        self._aims = []
        self._request_ids = 0
        self._listener = socket.create_server((host, port))
        self.host, self.port = self._listener.getsockname()[:2]
        self.endpoint = "http://%s:%d" % (self.host, self.port)
        self._conns = set()
        self._stop = threading.Event()
        self._thread = None
        self.reset()

    def __repr__(self):
        return "S3Proxy(%s -> %s:%d, faults=%r)" % (self.endpoint, self.upstream[0], self.upstream[1], self._faults)

    # -- counters -------------------------------------------------------------

    def reset(self):
        with self._lock:
            self.methods = Counter()
            self.kinds = Counter()
            self.statuses = Counter()
            self.kind_status = Counter()
            self.areas = Counter()  # "KIND area" -> requests
            self.upstream_seconds = Counter()  # kind -> seconds waiting for the server
            self.keys = Counter()  # "KIND path status" -> requests, with track_keys
            self.log = []  # (time, kind, path, status), with track_keys
            self.faults = Counter()  # fault kind -> injected
            # (time, fault, method, path, the server's status or None when it never saw the request)
            self.fault_log = []
            self.total = 0
            self.errors = 0
            self.connections = 0
            self.since = time.time()

    def snapshot(self):
        """A JSON-ready copy of the counters."""
        with self._lock:
            return {
                "total": self.total, "errors": self.errors, "connections": self.connections,
                "seconds": time.time() - self.since, "latency_ms": self.latency_ms, "jitter_ms": self.jitter_ms,
                "methods": dict(self.methods), "kinds": dict(self.kinds),
                "statuses": {str(k): v for k, v in self.statuses.items()},
                "kind_status": {"%s %s" % k: v for k, v in self.kind_status.items()},
                "areas": dict(self.areas),
                "upstream_ms_avg": {k: round(1000.0 * s / self.kinds[k], 3)
                                    for k, s in self.upstream_seconds.items() if self.kinds.get(k)},
                "faults": dict(self.faults), "fault_rates": dict(self._faults), "stall_s": self.stall_s,
            }

    @staticmethod
    def diff(after, before):
        """Counters of `after` minus `before` (two snapshots)."""
        out = {"total": after["total"] - before["total"], "errors": after["errors"] - before["errors"],
               "connections": after["connections"] - before["connections"],
               "seconds": after["seconds"] - before["seconds"]}
        for name in ("methods", "kinds", "statuses", "kind_status", "areas", "faults"):
            d = {k: v - before.get(name, {}).get(k, 0) for k, v in after.get(name, {}).items()}
            out[name] = {k: v for k, v in sorted(d.items()) if v}
        return out

    def set_latency(self, latency_ms, jitter_ms=None):
        """Wait latency_ms (+- uniform jitter_ms) before forwarding each request."""
        if not float(latency_ms) >= 0:
            raise ValueError("latency_ms must not be negative, got %r" % (latency_ms,))
        if jitter_ms is not None and not float(jitter_ms) >= 0:
            raise ValueError("jitter_ms must not be negative, got %r" % (jitter_ms,))
        self.latency_ms = float(latency_ms)
        if jitter_ms is not None:
            self.jitter_ms = float(jitter_ms)

    # -- faults ---------------------------------------------------------------

    def set_faults(self, faults):
        """Replace the random fault rates ({kind: probability per request},
        adding up to at most 1; {} or None: none).  Aimed faults stay."""
        self._faults = _check_rates(faults)

    def fail_next(self, kind, n=1, match=None):
        """Inject `kind` into exactly the next `n` requests it applies to that
        `match(method, path, headers)` accepts (every one when match is
        None).  Returns an Aim whose `hits` fill in as it fires."""
        if kind not in FAULTS:
            raise ValueError("unknown fault %r: the faults are %s" % (kind, ", ".join(FAULTS)))
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError("n must be a positive number of requests, got %r" % (n,))
        if match is not None and not callable(match):
            raise ValueError("match must be callable(method, path, headers) or None, got %r" % (match,))
        aim = Aim(kind, n, match)
        with self._lock:
            self._aims.append(aim)
        return aim

    def clear_aims(self):
        """Drop the aimed faults that have not fired yet."""
        with self._lock:
            self._aims = []

    def _pick(self, method, target, headers):
        """The fault for this request, or None."""
        if self._aims:
            with self._lock:
                aims = list(self._aims)
        else:
            aims = ()  # the common case, without taking the lock
        for aim in aims:
            if aim.done or not _applies(aim.kind, method, headers):
                continue
            if aim.match is not None:
                try:
                    if not aim.match(method, target, headers):
                        continue
                except Exception as exc:  # a broken matcher: report it, let the request pass
                    aim.error = exc
                    sys.stderr.write("s3proxy: match of %r raised %s: %s\n" % (aim, type(exc).__name__, exc))
                    continue
            with self._lock:
                if aim.done:  # taken meanwhile by a request of another connection
                    continue
                aim.hits.append((method, target))
                if aim.done and aim in self._aims:
                    self._aims.remove(aim)
            return aim.kind
        rates = self._faults
        if not rates:
            return None
        with self._rand_lock:
            draw = self._rand.random()
        for kind in FAULTS:
            rate = rates.get(kind, 0.0)
            if draw < rate:
                return kind if _applies(kind, method, headers) else None
            draw -= rate
        return None

    def _error_reply(self, fault, method, target, close):
        """S3's error reply for an answered fault: XML body, request id, Date."""
        status, reason, code, message = _ERRORS[fault]
        with self._lock:
            self._request_ids += 1
            request_id = "S3PROXY%08X" % self._request_ids
        body = ('<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>%s</Code><Message>%s</Message>'
                "<Resource>%s</Resource><RequestId>%s</RequestId></Error>"
                % (code, escape(message), escape(target.partition("?")[0]), request_id)).encode("utf-8")
        if method == "HEAD":
            body = b""  # a HEAD reply has no body, S3's errors included
        head = ["HTTP/1.1 %d %s" % (status, reason), "Content-Type: application/xml",
                "Content-Length: %d" % len(body), "Date: " + formatdate(usegmt=True),
                "x-amz-request-id: " + request_id, "Server: s3proxy"]
        if close:
            head.append("Connection: close")
        return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body

    def _record(self, fault, method, target, server_status):
        with self._lock:
            self.faults[fault] += 1
            self.fault_log.append((time.time(), fault, method, target, server_status))

    def _count(self, method, kind, status, area, upstream_s, target=None):
        with self._lock:
            if self.track_keys and target is not None:
                path = target if kind in ("LIST", "LISTV") else target.partition("?")[0]
                self.keys["%s %s %s" % (kind, path, status)] += 1
                self.log.append((time.time(), kind, path, status))
            self.total += 1
            self.methods[method] += 1
            self.kinds[kind] += 1
            self.statuses[status] += 1
            self.kind_status[(kind, status)] += 1
            self.areas["%s %s" % (kind, area)] += 1
            self.upstream_seconds[kind] += upstream_s
            if status == "error":
                self.errors += 1

    def _delay(self):
        lat = self.latency_ms
        if lat <= 0 and self.jitter_ms <= 0:
            return
        with self._rand_lock:
            j = self._rand.uniform(-self.jitter_ms, self.jitter_ms) if self.jitter_ms > 0 else 0.0
        d = (lat + j) / 1000.0
        if d > 0:
            time.sleep(d)

    # -- serving --------------------------------------------------------------

    def start(self):
        self._thread = threading.Thread(target=self._accept_loop, name="s3proxy", daemon=True)
        self._thread.start()
        return self

    def stop(self):
        """Close the listener and every connection (stalled replies end now)."""
        self._stop.set()
        try:
            self._listener.close()
        except OSError:
            pass
        with self._lock:
            conns = list(self._conns)
        for s in conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            try:
                s.close()
            except OSError:
                pass

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def _accept_loop(self):
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
                self._conns.add(client)
            threading.Thread(target=self._serve, args=(client,), name="s3proxy-conn", daemon=True).start()

    def _open_upstream(self):
        s = socket.create_connection(self.upstream, timeout=self.timeout)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            self._conns.add(s)
        return s, s.makefile("rb")

    def _drop(self, sock):
        if sock is None:
            return
        with self._lock:
            self._conns.discard(sock)
        try:
            sock.close()
        except OSError:
            pass

    def _serve(self, client):
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client.settimeout(None)
        crfile = client.makefile("rb")
        up = urfile = None
        try:
            while not self._stop.is_set():
                try:
                    line, head, headers = _read_head(crfile)
                except _Closed:
                    return
                parts = line.split(" ")
                if len(parts) != 3:
                    return
                method, target, version = parts
                kind = kind_of(method, target)
                area = area_of(method, target)
                chunked = "chunked" in headers.get("transfer-encoding", "").lower()
                length = int((headers.get("content-length") or "0").split(",")[0] or 0)
                has_body = chunked or length > 0
                expect = has_body and headers.get("expect", "").lower() == "100-continue"
                close_after = headers.get("connection", "").lower() == "close" or version == "HTTP/1.0"
                request = None
                if not expect and (chunked or length <= _BUFFERED_BODY):
                    # Whole request in memory: it can be sent again if a
                    # kept-alive upstream connection turns out to be closed.
                    buf = [head]
                    _relay_body(crfile, buf.append, headers)
                    request = b"".join(buf)
                self._delay()
                fault = self._pick(method, target, headers)
                if fault == "reset_before":
                    self._record(fault, method, target, None)
                    self._count(method, kind, fault, area, 0.0, target)
                    _reset(client)
                    return
                if fault in _ERRORS:  # answered here: the server never sees the request
                    if request is None and has_body:
                        if expect:
                            close_after = True  # no 100 Continue: the body may still come
                        else:
                            _relay_body(crfile, _discard, headers)
                    self._record(fault, method, target, None)
                    self._count(method, kind, _ERRORS[fault][0], area, 0.0, target)
                    client.sendall(self._error_reply(fault, method, target, close_after))
                    if close_after:
                        return
                    continue
                started = time.monotonic()
                status = "error"
                counted = None
                try:
                    body_sent = not has_body
                    for attempt in (0, 1):
                        fresh = up is None
                        if fresh:
                            up, urfile = self._open_upstream()
                        try:
                            if request is not None:
                                up.sendall(request)
                                body_sent = True
                            elif not expect:  # a large body: streamed, cannot be resent
                                out = _Buffer(up)
                                out(head)
                                _relay_body(crfile, out, headers)
                                out.flush()
                                body_sent = True
                            else:
                                up.sendall(head)
                            first = _read_line(urfile)
                            break
                        except (_Closed, OSError):
                            self._drop(up)
                            up = urfile = None
                            if attempt or fresh or request is None:
                                raise
                    cout = _Buffer(client)
                    while True:
                        sline, rhead, rheaders = _read_head(urfile, first)
                        code = sline.split(" ", 2)[1] if " " in sline else "?"
                        if code.startswith("1") and code != "101":
                            cout(rhead)  # interim replies reach the client whatever the fault
                            cout.flush()
                            if code == "100" and not body_sent:
                                _relay_body(crfile, _sender(up), headers)
                                body_sent = True
                            first = _read_line(urfile)
                            continue
                        break
                    status = int(code) if code.isdigit() else code
                    if not body_sent:
                        close_after = True  # the client may still send the body: do not reuse
                    # reset_after and stall: the server's whole reply is read
                    # (it applied the request), and the client gets none of it.
                    reply = cout if fault is None else _discard
                    reply(rhead)
                    no_body = method == "HEAD" or status in (204, 304)
                    r_close = rheaders.get("connection", "").lower() == "close"
                    if not no_body:
                        framed = "chunked" in rheaders.get("transfer-encoding", "").lower() or \
                            "content-length" in rheaders
                        _relay_body(urfile, reply, rheaders, until_eof=not framed)
                        if not framed:
                            r_close = True
                    if r_close:
                        self._drop(up)
                        up = urfile = None
                    # Counted before the client has the whole reply: whoever
                    # reads the counters after a request returned finds it.
                    counted = status if fault is None else fault
                    if fault is not None:
                        self._record(fault, method, target, status)
                    self._count(method, kind, counted, area, time.monotonic() - started, target)
                    cout.flush()
                except (_Closed, OSError, ValueError):
                    if counted is None:
                        self._count(method, kind, status, area, time.monotonic() - started, target)
                    if status == "error":
                        try:
                            client.sendall(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n"
                                           b"Connection: close\r\n\r\n")
                        except OSError:
                            pass
                    return
                if fault == "reset_after":
                    _reset(client)
                    return
                if fault == "stall":  # past the client's read timeout, then hang up without a reply
                    self._stop.wait(self.stall_s)
                    return
                if close_after:
                    return
        except (_Closed, OSError, ValueError):
            return  # the client went away or sent garbage (or stop() closed the sockets)
        finally:
            crfile.close()  # the socket closes (and a reset is sent) only once its file is closed too
            self._drop(up)
            self._drop(client)


LatencyProxy = S3Proxy  # the name benchmarks used first


def _sender(sock):
    def send(data):
        sock.sendall(data)
    return send


# -- standalone -------------------------------------------------------------


def _stats_server(proxy, port):
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            if self.path.startswith("/reset"):
                proxy.reset()
            body = json.dumps(proxy.snapshot(), indent=1, sort_keys=True).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--upstream", required=True, help="the S3 server, e.g. http://127.0.0.1:8333")
    p.add_argument("--port", type=int, default=0, help="port to listen on (127.0.0.1; 0 = any free port)")
    p.add_argument("--latency-ms", type=float, default=0.0, help="added before forwarding each request")
    p.add_argument("--jitter-ms", type=float, default=0.0, help="uniform +-jitter added to the latency")
    p.add_argument("--faults", default="", metavar="KIND=RATE,...",
                   help="per-request fault probabilities; kinds: " + ", ".join(FAULTS))
    p.add_argument("--stall-s", type=float, default=5.0, help="how long a stalled reply is held (default 5)")
    p.add_argument("--stats-port", type=int, default=None, help="serve the counts as JSON here (GET /stats)")
    p.add_argument("--seed", type=int, default=None)
    args = p.parse_args(argv)
    u = urlsplit(args.upstream)
    if u.scheme != "http" or not u.hostname:
        p.error("--upstream must be an http:// URL, got %r" % (args.upstream,))
    try:
        faults = parse_faults(args.faults)
        proxy = S3Proxy(u.hostname, u.port or 80, latency_ms=args.latency_ms, jitter_ms=args.jitter_ms,
                        faults=faults, stall_s=args.stall_s, port=args.port, seed=args.seed).start()
    except ValueError as exc:
        p.error(str(exc))
    print("proxy %s -> %s, latency %.1f+-%.1f ms, faults %s" % (
        proxy.endpoint, args.upstream, args.latency_ms, args.jitter_ms,
        ",".join("%s=%g" % item for item in sorted(faults.items())) or "none"), flush=True)
    if args.stats_port is not None:
        stats = _stats_server(proxy, args.stats_port)
        print("stats http://127.0.0.1:%d/stats" % stats.server_address[1], flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        proxy.stop()
        json.dump(proxy.snapshot(), sys.stdout, indent=1, sort_keys=True)
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
