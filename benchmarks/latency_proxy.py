#!/usr/bin/env python3
"""A counting HTTP/1.1 proxy with optional latency, for S3 benchmarks.

Sits between S3 clients and an S3-compatible server on 127.0.0.1, forwards
every request byte for byte (the Host header stays as the client sent it:
SigV4 signs it and the server checks it), optionally waits a fixed latency
(plus jitter) before forwarding each request, and counts requests:

* by method (GET, PUT, ...);
* by kind: LIST (GET with `list-type` in the query), LISTV (GET with
  `versions`), GET, HEAD, PUT, DELETE, POST, other;
* by response status (so 412 Precondition Failed is counted), and by
  (kind, status);
* by area: the first component of the key (`tasks`, `ready`, `leases`,
  `workers`, ...) or, for a LIST, of its `prefix`; `(bucket)` for
  bucket-level requests other than listings.

Connections are persistent both ways: each client connection gets a thread
and its own upstream connection, reopened when the server closes it.
`Expect: 100-continue` is relayed.  With `track_keys=True` every request is
also logged as (time, kind, path, status) in `proxy.log`, for per-key analysis.  Path-style addressing is assumed for the
area counts (forwarding works with any addressing).

In-process use (what benchmarks/bench_fleet.py does):

    proxy = LatencyProxy("127.0.0.1", 8333, latency_ms=20, jitter_ms=2).start()
    ... point clients at proxy.endpoint ...
    counts = proxy.snapshot()      # dict of counters; proxy.reset() zeroes them
    proxy.set_latency(0)           # change the latency at any time
    proxy.stop()

Standalone (counts served as JSON on a second port: GET /stats, GET /reset):

    python benchmarks/latency_proxy.py --upstream http://127.0.0.1:8333 \\
        --port 9333 --latency-ms 20 --jitter-ms 2 --stats-port 9334

Only the standard library; binds 127.0.0.1 only.
"""

import argparse
import json
import random
import socket
import sys
import threading
import time
from collections import Counter
from urllib.parse import parse_qsl, unquote, urlsplit

__all__ = ["LatencyProxy", "kind_of", "area_of"]

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


class LatencyProxy:
    """See the module docstring."""

    def __init__(self, upstream_host, upstream_port, *, latency_ms=0.0, jitter_ms=0.0, host="127.0.0.1",
                 port=0, seed=None, timeout=120.0, track_keys=False):
        self.upstream = (upstream_host, int(upstream_port))
        self.latency_ms = float(latency_ms)
        self.jitter_ms = float(jitter_ms)
        self.timeout = timeout
        self.track_keys = track_keys  # also count "KIND path status" (for debugging; grows with the keys)
        self._rand = random.Random(seed)
        self._rand_lock = threading.Lock()
        self._lock = threading.Lock()
        self._listener = socket.create_server((host, port))
        self.host, self.port = self._listener.getsockname()[:2]
        self.endpoint = "http://%s:%d" % (self.host, self.port)
        self._conns = set()
        self._stopped = False
        self._thread = None
        self.reset()

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
            }

    @staticmethod
    def diff(after, before):
        """Counters of `after` minus `before` (two snapshots)."""
        out = {"total": after["total"] - before["total"], "errors": after["errors"] - before["errors"],
               "connections": after["connections"] - before["connections"],
               "seconds": after["seconds"] - before["seconds"]}
        for name in ("methods", "kinds", "statuses", "kind_status", "areas"):
            d = {k: v - before[name].get(k, 0) for k, v in after[name].items()}
            out[name] = {k: v for k, v in sorted(d.items()) if v}
        return out

    def set_latency(self, latency_ms, jitter_ms=None):
        self.latency_ms = float(latency_ms)
        if jitter_ms is not None:
            self.jitter_ms = float(jitter_ms)

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
        self._thread = threading.Thread(target=self._accept_loop, name="latency-proxy", daemon=True)
        self._thread.start()
        return self

    def stop(self):
        self._stopped = True
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
        while not self._stopped:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
                self._conns.add(client)
            threading.Thread(target=self._serve, args=(client,), name="latency-proxy-conn", daemon=True).start()

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
            while not self._stopped:
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
                started = time.monotonic()
                status = "error"
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
                            cout(rhead)
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
                    cout(rhead)
                    no_body = method == "HEAD" or status in (204, 304)
                    r_close = rheaders.get("connection", "").lower() == "close"
                    if not no_body:
                        framed = "chunked" in rheaders.get("transfer-encoding", "").lower() or \
                            "content-length" in rheaders
                        _relay_body(urfile, cout, rheaders, until_eof=not framed)
                        if not framed:
                            r_close = True
                    cout.flush()
                    if r_close:
                        self._drop(up)
                        up = urfile = None
                except (_Closed, OSError, ValueError):
                    self._count(method, kind, status, area, time.monotonic() - started, target)
                    if status == "error":
                        try:
                            client.sendall(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n"
                                           b"Connection: close\r\n\r\n")
                        except OSError:
                            pass
                    return
                self._count(method, kind, status, area, time.monotonic() - started, target)
                if close_after:
                    return
        finally:
            self._drop(up)
            self._drop(client)


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
    p.add_argument("--stats-port", type=int, default=None, help="serve the counts as JSON here (GET /stats)")
    p.add_argument("--seed", type=int, default=None)
    args = p.parse_args(argv)
    u = urlsplit(args.upstream)
    proxy = LatencyProxy(u.hostname, u.port or 80, latency_ms=args.latency_ms, jitter_ms=args.jitter_ms,
                         port=args.port, seed=args.seed).start()
    print("proxy %s -> %s, latency %.1f+-%.1f ms" % (proxy.endpoint, args.upstream, args.latency_ms,
                                                     args.jitter_ms), flush=True)
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
