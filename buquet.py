"""buquet: a task queue whose only backend is S3-compatible object storage.

No broker, no database: tasks are JSON objects in a bucket, claimed with
conditional writes (If-Match), recovered by lease expiry.  Standard library
only; the same bucket can be served by the original (Rust) buquet.

    import buquet

    queue = buquet.connect()                      # S3_BUCKET, S3_ENDPOINT, ...
    task = queue.submit("send_email", {"to": "user@example.com"})

    worker = buquet.Worker(queue, "worker-1", ["0", "1", "2", "3"])

    @worker.task("send_email")
    def handle(input):
        return {"sent": True}

    worker.run()

Lifecycle of a task (transitions live in one table, `TRANSITIONS`):

               submit
                 |            cancel / expire
                 v          +----------------> cancelled / expired
    +-------> pending ------+
    |            | claim
    | retry,     v          complete              archive
    | reschedule running ------------> completed --------> archived
    | timeout,   |                                  ^
    | requeue    | fail (permanent, retries spent)  | archive
    +------------+-----------> failed --------------+
                                 | replay -> pending

Bucket layout (byte-compatible with the original):

    tasks/{shard}/{id}.json             the task document, the source of truth
    ready/{shard}/{minute10}/{id}       empty: claimable from that minute on
    leases/{shard}/{minute10}/{id}      empty: running, lease ends that minute
    workers/{worker_id}.json            heartbeats
    schedules/{id}.json                 recurring schedules (+ {id}/last_run.json)
    idempotency/{scope}/{sha256}.json   idempotent-submit records
    payloads/{id}/input.json            offloaded inputs

`{shard}` is the first hex digit of the task id (16 shards); `{minute10}` is
minutes since the epoch, zero-padded to 10 digits.  Index objects are hints:
the task document always decides.

Time is the server's: every S3 reply carries a `Date` header, and the queue
follows it with the local monotonic clock, so hosts with bad clocks agree.

Environment: S3_BUCKET, S3_ENDPOINT, S3_REGION, AWS credentials (see
sigv4.resolve_credentials), BUQUET_ALLOW_NO_VERSIONING (accepted, no effect:
versioning is optional here).
"""

import json
import os
import re
import sys
import threading
import time
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone

__all__ = [
    "AsyncQueue",
    "BuquetError",
    "ConflictError",
    "IdempotencyConflict",
    "InvalidTransition",
    "LeaseMismatch",
    "LocalStore",
    "MemoryStore",
    "PermanentError",
    "Queue",
    "RescheduleError",
    "RetryableError",
    "RetryPolicy",
    "S3Store",
    "Schedule",
    "ScheduleError",
    "Scheduler",
    "StoreError",
    "Task",
    "TaskContext",
    "TaskNotFound",
    "TRANSITIONS",
    "Worker",
    "connect",
    "main",
]

# ============================================================================
# Constants (each default says why)
# ============================================================================

STATUSES = ("pending", "running", "completed", "failed", "cancelled", "archived", "expired")
TERMINAL = frozenset(("completed", "failed", "cancelled", "archived", "expired"))

# The original's defaults, kept so that a mixed fleet behaves the same.
DEFAULT_TIMEOUT = 300  # seconds of lease per claim: long enough for most jobs
DEFAULT_MAX_RETRIES = 3  # retries after the first attempt (4 runs in all)
DEFAULT_RETRY_POLICY = {
    "initial_interval_ms": 1000,
    "max_interval_ms": 60000,
    "multiplier": 2.0,
    "jitter_percent": 0.25,
}
IDEMPOTENCY_TTL_DAYS = 30  # the original's record lifetime
SHARD_PREFIX_LEN = 1  # the only length the original's CLI, monitor and sweeper serve
ALL_SHARDS = tuple("0123456789abcdef")
_U32 = 2 ** 32 - 1
_U64 = 2 ** 64 - 1

# Field order of a task document as the original writes it (spec 3.2).
TASK_FIELDS = (
    "id", "shard", "task_type", "input", "output", "input_ref", "output_ref",
    "timeout_seconds", "max_retries", "retry_count", "retry_policy", "status",
    "created_at", "available_at", "lease_expires_at", "lease_id", "attempt",
    "updated_at", "completed_at", "worker_id", "last_error", "reschedule_count",
    "max_reschedules", "cancel_requested", "cancelled_at", "cancelled_by",
    "expires_at", "expired_at",
)
# Written only when set (absent, never null).
_OMIT_IF_NULL = frozenset(
    ("input_ref", "output_ref", "max_reschedules", "cancelled_at", "cancelled_by", "expires_at", "expired_at")
)
_TIMESTAMP_FIELDS = frozenset(
    ("created_at", "available_at", "lease_expires_at", "updated_at", "completed_at",
     "cancelled_at", "expires_at", "expired_at")
)


class _LazyRe:
    """A regular expression compiled when first used: importing buquet
    compiles none (a dozen patterns cost ~4 ms of every cold start)."""

    __slots__ = ("_args", "_compiled")

    def __init__(self, *args):
        self._args = args
        self._compiled = None

    def __getattr__(self, name):
        if self._compiled is None:
            self._compiled = re.compile(*self._args)
        return getattr(self._compiled, name)


# ============================================================================
# Errors
# ============================================================================


class BuquetError(Exception):
    """Root of buquet's errors.  Handler control flow (RetryableError,
    PermanentError, RescheduleError) is deliberately outside this tree, so
    `except BuquetError` cannot swallow it."""


class TaskNotFound(BuquetError):
    def __init__(self, task_id):
        super().__init__("task %s not found" % task_id)
        self.task_id = task_id


class InvalidTransition(BuquetError):
    """An operation that the task's current state does not allow."""

    def __init__(self, task_id, status, event, allowed=()):
        expected = " (allowed from: %s)" % ", ".join(allowed) if allowed else ""
        super().__init__("task %s is %s: %s is not allowed%s" % (task_id, status, event, expected))
        self.task_id = task_id
        self.status = status
        self.event = event


class LeaseMismatch(BuquetError):
    """The caller's lease is no longer the task's lease: another attempt took
    over (the lease expired and the task was recovered)."""

    def __init__(self, task_id, lease_id):
        super().__init__("lease %s no longer holds task %s: the lease expired and another attempt took over"
                         % (lease_id, task_id))
        self.task_id = task_id
        self.lease_id = lease_id


class ConflictError(BuquetError):
    """A conditional write lost to a concurrent writer."""


class IdempotencyConflict(BuquetError):
    """An idempotency key reused with a different input."""


class StoreError(BuquetError):
    """The store failed (the S3 error, one line, is in the message)."""


class InvalidTaskDocument(BuquetError):
    """A task document that cannot be read (skipped and reported, never fatal
    to a poll, never deleted)."""


class RetryableError(Exception):
    """Raise from a handler: the attempt failed, retry with backoff."""


class PermanentError(Exception):
    """Raise from a handler: fail the task now, no retry."""


class RescheduleError(Exception):
    """Raise from a handler: run again in `delay_seconds`, no retry consumed."""

    def __init__(self, delay_seconds, message=None):
        if not isinstance(delay_seconds, int) or isinstance(delay_seconds, bool) or delay_seconds < 0:
            raise ValueError("RescheduleError: delay_seconds must be a non-negative int, got %r" % (delay_seconds,))
        super().__init__(message or "Reschedule after %d seconds" % delay_seconds)
        self.delay_seconds = delay_seconds


# ============================================================================
# Timestamps and JSON (pure)
# ============================================================================

_TS_RE = _LazyRe(
    r"^(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?"
    r"\s?(?:([Zz])|(UTC)|([+-])(\d{2}):?(\d{2}))$"
)


def parse_timestamp(text):
    """An RFC 3339 timestamp as the original accepts it (chrono's relaxed
    form: `T`, `t` or space; any number of fraction digits; `Z`, `z`, `UTC`,
    `+HH:MM` or `+HHMM`) -> aware UTC datetime.  ValueError otherwise."""
    m = _TS_RE.match(text) if isinstance(text, str) else None
    if m is None:
        raise ValueError("not an RFC 3339 timestamp with an offset: %r" % (text,))
    year, month, day, hour, minute, second = (int(g) for g in m.groups()[:6])
    if m.group(10) and (int(m.group(11)) > 23 or int(m.group(12)) > 59):
        # chrono refuses these too: an offset is less than a day, its minutes less than an hour.
        raise ValueError("timestamp %r is out of range: the offset must be at most 23:59" % (text,))
    leap = second == 60  # chrono accepts a leap second; Python cannot hold it
    frac = m.group(7) or ""
    micro = int(frac[:6].ljust(6, "0")) if frac else 0
    try:
        dt = datetime(year, month, day, hour, minute, 59 if leap else second, micro, tzinfo=timezone.utc)
        if leap:
            dt = dt.replace(microsecond=999999)
        if m.group(10):
            offset = timedelta(hours=int(m.group(11)), minutes=int(m.group(12)))
            dt = dt - offset if m.group(10) == "+" else dt + offset
    except (ValueError, OverflowError) as exc:
        # OverflowError too: a document is then unreadable, not fatal to a poll.
        raise ValueError("timestamp %r is out of range: %s" % (text, exc)) from None
    return dt


def format_timestamp(dt):
    """UTC with a literal Z; no fraction for whole seconds, else 3 digits
    for whole milliseconds, else 6 (the original's AutoSi rule)."""
    dt = dt.astimezone(timezone.utc)
    base = dt.strftime("%Y-%m-%dT%H:%M:%S")
    us = dt.microsecond
    if us == 0:
        return base + "Z"
    if us % 1000 == 0:
        return "%s.%03dZ" % (base, us // 1000)
    return "%s.%06dZ" % (base, us)


def dumps(value):
    """Compact JSON as the original writes it: no spaces, non-ASCII raw."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _serde_float(x):
    """A float as serde_json 1.0.149 (zmij) writes it: the shortest digits
    that round-trip, in plain notation when 1e-5 <= |x| < 1e16 (integral
    values keep ".0"), else as d[.ddd]e+N / d[.ddd]e-N."""
    sign = "-" if repr(x).startswith("-") else ""
    if x == 0:
        return sign + "0.0"
    mantissa, _, exp = repr(abs(x)).partition("e")
    intpart, _, frac = mantissa.partition(".")
    digits = (intpart + frac).lstrip("0").rstrip("0")
    # value = 0.<digits> * 10**point
    if intpart.strip("0"):
        point = len(intpart.lstrip("0")) + int(exp or 0)
    else:
        point = int(exp or 0) - (len(frac) - len(frac.lstrip("0")))
    if 1e-5 <= abs(x) < 1e16:
        if point <= 0:
            return sign + "0." + "0" * -point + digits
        if point >= len(digits):
            return sign + digits + "0" * (point - len(digits)) + ".0"
        return sign + digits[:point] + "." + digits[point:]
    e = point - 1
    return "%s%s%se%s%d" % (sign, digits[0], "." + digits[1:] if len(digits) > 1 else "", "+" if e >= 0 else "-", abs(e))


def canonical_json(value):
    """JSON with object keys sorted at every level and floats formatted as
    serde_json does, so idempotency hashes equal the original's."""
    if isinstance(value, dict):
        items = sorted(value.items())
        return "{" + ",".join(json.dumps(k, ensure_ascii=False) + ":" + canonical_json(v) for k, v in items) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(canonical_json(v) for v in value) + "]"
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError("JSON has no NaN or infinity")
        return _serde_float(value)
    return json.dumps(value, ensure_ascii=False)


_UUID_RE = _LazyRe(
    r"(?:urn:uuid:)?(\{)?([0-9a-fA-F]{8})-?([0-9a-fA-F]{4})-?([0-9a-fA-F]{4})-?([0-9a-fA-F]{4})-?"
    r"([0-9a-fA-F]{12})(?(1)\})\Z")


def canonical_uuid(text):
    """The lowercase hyphenated form of a UUID in any form the original
    reads (hyphenated, 32 hex digits, braced, urn:uuid:, any case);
    ValueError otherwise.  (The uuid module costs a millisecond to import.)"""
    m = _UUID_RE.match(text) if isinstance(text, str) else None
    if m is None:
        raise ValueError("not a UUID: %r" % (text,))
    return "-".join(m.groups()[1:]).lower()


def new_uuid():
    """A random (version 4) UUID, lowercase hyphenated."""
    b = bytearray(os.urandom(16))
    b[6] = (b[6] & 0x0F) | 0x40
    b[8] = (b[8] & 0x3F) | 0x80
    h = b.hex()
    return "%s-%s-%s-%s-%s" % (h[:8], h[8:12], h[12:16], h[16:20], h[20:])


def sha256_tag(text):
    import hashlib  # 2.5 ms; a plain submit never needs it

    return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()


def _random():
    """random.random(); the random module (2 ms to import) loads when first
    needed, which a producer's submit never does."""
    import random

    return random.random()


# ============================================================================
# Key layout (pure)
# ============================================================================


def shard_of(task_id, prefix_len=SHARD_PREFIX_LEN):
    """The first `prefix_len` hex digits of the id (clamped to 1..4)."""
    n = min(max(int(prefix_len), 1), 4)
    return str(task_id).lower().replace("-", "")[:n]


def all_shards(prefix_len=SHARD_PREFIX_LEN):
    n = min(max(int(prefix_len), 1), 4)
    return ["%0*x" % (n, i) for i in range(16 ** n)]


def minute_bucket(dt):
    """Whole minutes since the epoch, zero-padded to 10 digits."""
    seconds = int((dt - _EPOCH).total_seconds() // 1)
    return "%010d" % (seconds // 60)


_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def task_key(shard, task_id):
    return "tasks/%s/%s.json" % (shard, task_id)


def ready_key(shard, available_at, task_id):
    return "ready/%s/%s/%s" % (shard, minute_bucket(available_at), task_id)


def lease_key(shard, lease_expires_at, task_id):
    return "leases/%s/%s/%s" % (shard, minute_bucket(lease_expires_at), task_id)


def worker_key(worker_id):
    return "workers/%s.json" % worker_id


def idempotency_key(scope, key):
    """(record key, key hash) for an idempotency key in a scope."""
    tag = sha256_tag("%s:%s" % (scope, key))
    return "idempotency/%s/%s.json" % (scope, tag[7:]), tag


def payload_key(task_id, name="input"):
    return "payloads/%s/%s.json" % (task_id, name)


def parse_index_key(key):
    """(shard, minute bucket, task id) of a ready/ or leases/ key, or None
    when the key does not have that shape or its id is not a UUID."""
    parts = key.split("/")
    if len(parts) != 4 or parts[0] not in ("ready", "leases"):
        return None
    try:
        task_id = canonical_uuid(parts[3])
    except ValueError:
        return None
    if not parts[2].isdigit():
        return None
    return parts[1], parts[2], task_id


# ============================================================================
# Task documents: reading with the original's rules, writing in its order
# ============================================================================


def _check_uint(doc, name, limit, default):
    value = doc.get(name, default)
    if name in doc and (isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= limit):
        raise InvalidTaskDocument("field %s must be an integer 0..%d, got %r" % (name, limit, value))
    return value


def validate_task_document(doc):
    """Raise InvalidTaskDocument unless `doc` satisfies the original's reader
    (spec 3.2): the rules under which both implementations can use it."""
    if not isinstance(doc, dict):
        raise InvalidTaskDocument("a task document must be a JSON object, got %s" % type(doc).__name__)
    for name in ("id", "shard", "task_type", "input", "created_at", "available_at", "updated_at"):
        if name not in doc:
            raise InvalidTaskDocument("missing required field %s" % name)
    for name in ("id", "shard", "task_type"):
        if not isinstance(doc[name], str):
            raise InvalidTaskDocument("field %s must be a string, got %r" % (name, doc[name]))
    try:
        canonical_uuid(doc["id"])
    except ValueError:
        raise InvalidTaskDocument("field id is not a UUID: %r" % (doc["id"],)) from None
    for name in ("timeout_seconds",):
        _check_uint(doc, name, _U64, None)
    for name in ("max_retries", "retry_count", "attempt", "reschedule_count"):
        _check_uint(doc, name, _U32, None)
    if doc.get("max_reschedules") is not None:
        _check_uint(doc, "max_reschedules", _U32, None)
    for name in ("timeout_seconds", "max_retries", "retry_count", "retry_policy", "status",
                 "attempt", "reschedule_count", "cancel_requested"):
        if name in doc and doc[name] is None:
            raise InvalidTaskDocument("field %s is null" % name)
    status = doc.get("status", "pending")
    if status not in STATUSES:
        raise InvalidTaskDocument("unknown status %r" % (status,))
    if "cancel_requested" in doc and not isinstance(doc["cancel_requested"], bool):
        raise InvalidTaskDocument("field cancel_requested must be a boolean")
    policy = doc.get("retry_policy", DEFAULT_RETRY_POLICY)
    if not isinstance(policy, dict) or any(k not in policy for k in DEFAULT_RETRY_POLICY):
        raise InvalidTaskDocument("retry_policy must have the fields %s" % ", ".join(DEFAULT_RETRY_POLICY))
    for name in ("initial_interval_ms", "max_interval_ms"):
        _check_uint(policy, name, _U32, None)
    for name in ("multiplier", "jitter_percent"):
        if isinstance(policy[name], bool) or not isinstance(policy[name], (int, float)):
            raise InvalidTaskDocument("retry_policy.%s must be a number" % name)
    for name in _TIMESTAMP_FIELDS:
        value = doc.get(name)
        if value is None:
            if name in ("created_at", "available_at", "updated_at"):
                raise InvalidTaskDocument("field %s is null" % name)
            continue
        try:
            parse_timestamp(value)
        except ValueError as exc:
            raise InvalidTaskDocument("field %s: %s" % (name, exc)) from None
    for name in ("lease_id",):
        if doc.get(name) is not None:
            try:
                canonical_uuid(doc[name])
            except (ValueError, AttributeError, TypeError):
                raise InvalidTaskDocument("field %s is not a UUID: %r" % (name, doc[name])) from None
    for name in ("worker_id", "last_error", "input_ref", "output_ref", "cancelled_by"):
        if doc.get(name) is not None and not isinstance(doc[name], str):
            raise InvalidTaskDocument("field %s must be a string or null" % name)


def _ordered(doc):
    """The document in the original's field order, unknown fields after.
    Optional fields that are unset are dropped rather than written null."""
    out = {}
    for name in TASK_FIELDS:
        if name in doc:
            if name in _OMIT_IF_NULL and doc[name] is None:
                continue
            out[name] = doc[name]
    for name, value in doc.items():
        if name not in out and name not in TASK_FIELDS:
            out[name] = value
    return out


def encode_task(doc):
    return dumps(_ordered(doc)).encode("utf-8")


class Task:
    """A task as read from the bucket: the document's fields as attributes
    (timestamps as aware datetimes), plus the ETag it was read with.

    The document itself (`doc`) keeps every field, unknown ones included, so
    a rewrite preserves what other writers put there."""

    __slots__ = ("doc", "etag", "key")

    def __init__(self, doc, etag=None, key=None):
        self.doc = doc
        self.etag = etag
        self.key = key or task_key(doc["shard"], doc["id"])

    def __getattr__(self, name):
        if name.startswith("_") or name not in TASK_FIELDS:
            raise AttributeError(name)
        value = self.doc.get(name, _DEFAULTS.get(name))
        if name in _TIMESTAMP_FIELDS and value is not None:
            return parse_timestamp(value)
        if name == "retry_policy":
            return RetryPolicy.from_dict(value)
        return value

    def __repr__(self):
        return "Task(id=%r, task_type=%r, status=%r, attempt=%r)" % (
            self.doc.get("id"), self.doc.get("task_type"), self.doc.get("status", "pending"), self.doc.get("attempt", 0))

    def __eq__(self, other):
        return isinstance(other, Task) and self.doc == other.doc and self.etag == other.etag

    __hash__ = None

    def to_dict(self):
        """A copy of the document as JSON-ready data."""
        return json.loads(dumps(self.doc))


_DEFAULTS = {
    "timeout_seconds": DEFAULT_TIMEOUT,
    "max_retries": DEFAULT_MAX_RETRIES,
    "retry_count": 0,
    "retry_policy": DEFAULT_RETRY_POLICY,
    "status": "pending",
    "attempt": 0,
    "reschedule_count": 0,
    "cancel_requested": False,
}


def _check_task_key(doc, key, prefix_len):
    """InvalidTaskDocument unless the document lives at its own key,
    tasks/{shard of its id}/{id}.json, with that shard in its shard field:
    every writer (the original too) rewrites a task at the key its fields
    name, so a document anywhere else can never be claimed there, and a
    rewrite in place would leave index entries pointing elsewhere."""
    task_id = canonical_uuid(doc["id"])
    shard = shard_of(task_id, prefix_len)
    if doc["shard"] != shard:
        raise InvalidTaskDocument("field shard is %r, but task %s belongs to shard %r"
                                  % (doc["shard"], task_id, shard))
    if key != task_key(shard, task_id):
        raise InvalidTaskDocument("holds task %s, whose key is %s" % (task_id, task_key(shard, task_id)))


def decode_task(body, etag=None, key=None):
    """Bytes of a task document -> Task; InvalidTaskDocument when the bytes
    are not a document both implementations can use."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidTaskDocument("not JSON: %s" % exc) from None
    except RecursionError:  # json nests by recursion: '[' * 100000
        raise InvalidTaskDocument("not a task document: JSON nested too deeply") from None
    validate_task_document(doc)
    try:
        # Python's json reads NaN, Infinity and lone surrogate escapes, which
        # serde_json refuses and which buquet could not write back: a claim
        # would raise in the middle of a worker's poll.
        encode_task(doc)
    except ValueError as exc:
        raise InvalidTaskDocument("not JSON the original reads: %s" % exc) from None
    return Task(doc, etag, key)


# ============================================================================
# Retry policy and backoff (pure)
# ============================================================================


class RetryPolicy:
    """Exponential backoff with jitter, as the original computes it: retry k
    (counting from 0) waits min(initial * multiplier**k, max) ms, times a
    random factor in [1 - jitter, 1 + jitter]."""

    __slots__ = ("initial_interval_ms", "max_interval_ms", "multiplier", "jitter_percent")

    def __init__(self, initial_interval_ms=1000, max_interval_ms=60000, multiplier=2.0, jitter_percent=0.25):
        for name, value in (("initial_interval_ms", initial_interval_ms), ("max_interval_ms", max_interval_ms)):
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _U32:
                raise ValueError("retry_policy: %s must be an integer 0..%d, got %r" % (name, _U32, value))
        if isinstance(multiplier, bool) or not isinstance(multiplier, (int, float)) or not multiplier >= 1:
            raise ValueError("retry_policy: multiplier must be a number >= 1, got %r" % (multiplier,))
        if isinstance(jitter_percent, bool) or not isinstance(jitter_percent, (int, float)) or not 0 <= jitter_percent <= 1:
            raise ValueError("retry_policy: jitter_percent must be a fraction 0..1 (0.25 = 25%%), got %r" % (jitter_percent,))
        self.initial_interval_ms = initial_interval_ms
        self.max_interval_ms = max_interval_ms
        self.multiplier = float(multiplier)
        self.jitter_percent = float(jitter_percent)

    @classmethod
    def from_dict(cls, d):
        obj = cls.__new__(cls)  # documents written by others are not re-validated
        for name in cls.__slots__:
            setattr(obj, name, d[name])
        return obj

    def to_dict(self):
        return {name: getattr(self, name) for name in self.__slots__}

    def __repr__(self):
        return "RetryPolicy(%s)" % ", ".join("%s=%r" % (n, getattr(self, n)) for n in self.__slots__)

    def __eq__(self, other):
        return isinstance(other, RetryPolicy) and self.to_dict() == other.to_dict()

    __hash__ = None


def backoff_ms(policy, retry_count, rand):
    """Delay in ms before retry number `retry_count` (0 for the first), for a
    policy mapping; `rand` is a uniform sample in [0, 1)."""
    base = float(policy["initial_interval_ms"]) * float(policy["multiplier"]) ** min(retry_count, 30)
    capped = min(base, float(policy["max_interval_ms"]))
    jitter = abs(float(policy["jitter_percent"]))
    factor = 1.0 if jitter == 0 else 1.0 + (2.0 * rand - 1.0) * jitter
    delay = capped * factor
    if delay != delay or delay in (float("inf"), float("-inf")):
        return 0
    return min(int(max(0.0, delay)), _U32)


# ============================================================================
# State transitions (pure): one table, one function
# ============================================================================

# event -> (states it may start from, state it leads to)
TRANSITIONS = {
    "claim": (("pending",), "running"),
    "complete": (("running",), "completed"),
    "retry": (("running",), "pending"),
    "reschedule": (("running",), "pending"),
    "fail": (("running",), "failed"),
    "requeue": (("running",), "pending"),  # graceful shutdown: not a failed attempt
    "timeout_retry": (("running",), "pending"),
    "timeout_fail": (("running",), "failed"),
    "extend_lease": (("running",), "running"),
    "request_cancellation": (("running",), "running"),
    "cancel_running": (("running",), "cancelled"),  # a worker honours a cancellation request
    "cancel": (("pending",), "cancelled"),
    "expire": (("pending",), "expired"),
    "replay": (("failed", "cancelled", "expired", "completed"), "pending"),
    "archive": (("completed", "failed", "cancelled", "expired"), "archived"),
}
# Events only the holder of the current lease may perform.
_LEASED = frozenset(
    ("complete", "retry", "reschedule", "fail", "requeue", "extend_lease", "cancel_running")
)
# Outcomes of a handler; a requested cancellation overrides them.
_FINISHING = frozenset(("complete", "retry", "reschedule", "fail"))
_ALWAYS_WRITTEN = {
    "output": None, "timeout_seconds": DEFAULT_TIMEOUT, "max_retries": DEFAULT_MAX_RETRIES, "retry_count": 0,
    "retry_policy": DEFAULT_RETRY_POLICY, "status": "pending", "lease_expires_at": None, "lease_id": None,
    "attempt": 0, "completed_at": None, "worker_id": None, "last_error": None, "reschedule_count": 0,
    "cancel_requested": False,
}
_CLEAR_LEASE = {"lease_id": None, "lease_expires_at": None, "worker_id": None}
TIMEOUT_ERROR = "Timeout - task exceeded lease duration"


def _ms(dt, ms):
    return dt + timedelta(milliseconds=ms)


def _add_seconds(dt, seconds):
    # A valid document may carry any u64 timeout; past year 9999 the lease
    # saturates rather than make every claim of the task raise.
    try:
        return dt + timedelta(seconds=seconds)
    except OverflowError:
        return datetime.max.replace(tzinfo=timezone.utc)


def transition(doc, event, now, *, lease_id=None, **args):
    """The document after `event` at time `now` (a new dict; `doc` is not
    changed).  Raises InvalidTransition when the task's state does not allow
    the event and LeaseMismatch when `lease_id` is not the task's lease.

    Arguments by event: claim(worker_id, new_lease_id), complete(output),
    retry(error, delay_ms), fail(error), reschedule(delay_seconds),
    extend_lease(seconds), cancel / request_cancellation(reason,
    cancelled_by), cancel_running(), timeout_retry(delay_ms), timeout_fail(),
    requeue(), expire(), replay(), archive()."""
    allowed, target = TRANSITIONS[event]
    status = doc.get("status", "pending")
    task_id = doc.get("id")
    # The lease first: to a worker whose lease ran out, "your lease is gone"
    # is the useful answer, whatever became of the task since.
    if event in _LEASED and doc.get("lease_id") != lease_id:
        raise LeaseMismatch(task_id, lease_id)
    if status not in allowed:
        raise InvalidTransition(task_id, status, event, allowed)
    ts = format_timestamp(now)
    # Fields the original always writes are filled in when a document that
    # relied on reader defaults is rewritten (spec 3.2).
    new = dict(_ALWAYS_WRITTEN)
    new.update(doc)
    new["status"] = target
    new["updated_at"] = ts
    if event == "claim":
        timeout = doc.get("timeout_seconds", DEFAULT_TIMEOUT)
        new.update(
            worker_id=args["worker_id"],
            lease_id=args["new_lease_id"],
            attempt=doc.get("attempt", 0) + 1,
            lease_expires_at=format_timestamp(_add_seconds(now, timeout)),
        )
    elif event == "complete":
        # Unlike the original, a success clears the error of an earlier attempt.
        new.update(_CLEAR_LEASE, output=args["output"], completed_at=ts, last_error=None)
    elif event in ("retry", "timeout_retry"):
        new.update(
            _CLEAR_LEASE,
            retry_count=doc.get("retry_count", 0) + 1,
            last_error=args.get("error", TIMEOUT_ERROR),
            available_at=format_timestamp(_ms(now, args["delay_ms"])),
        )
    elif event == "fail":
        new.update(_CLEAR_LEASE, last_error=args["error"], completed_at=ts)
    elif event == "timeout_fail":
        # Unlike the original, worker_id is cleared too: nobody holds the task.
        error = "Timeout after max retries (%d attempts)" % doc.get("retry_count", 0)
        new.update(_CLEAR_LEASE, last_error=error, completed_at=ts)
    elif event == "reschedule":
        new.update(
            _CLEAR_LEASE,
            reschedule_count=doc.get("reschedule_count", 0) + 1,
            available_at=format_timestamp(now + timedelta(seconds=args["delay_seconds"])),
        )
    elif event == "requeue":
        new.update(_CLEAR_LEASE, available_at=ts)
    elif event == "extend_lease":
        current = parse_timestamp(doc["lease_expires_at"]) if doc.get("lease_expires_at") else now
        new["lease_expires_at"] = format_timestamp(max(current, now) + timedelta(seconds=args["seconds"]))
    elif event in ("cancel", "request_cancellation"):
        if event == "request_cancellation":
            new["cancel_requested"] = True
        else:
            new["cancelled_at"] = ts
        if args.get("cancelled_by") is not None:
            new["cancelled_by"] = args["cancelled_by"]
        if args.get("reason") is not None:
            new["last_error"] = args["reason"]
    elif event == "cancel_running":
        new.update(_CLEAR_LEASE, cancelled_at=ts)
    elif event == "expire":
        new["expired_at"] = ts
    elif event == "replay":
        # A replay is a fresh start: counters, errors and deadlines reset.
        new.update(
            _CLEAR_LEASE, retry_count=0, attempt=0, reschedule_count=0, available_at=ts,
            completed_at=None, last_error=None, cancel_requested=False, output=None,
            cancelled_at=None, cancelled_by=None, expires_at=None, expired_at=None,
        )
    return new


def reschedule_or_fail(doc):
    """The error text when a reschedule would pass `max_reschedules`, else None."""
    limit = doc.get("max_reschedules")
    if limit is not None and doc.get("reschedule_count", 0) >= limit:
        return "Max reschedules (%d) exceeded" % limit
    return None


def index_keys(doc):
    """The index entries a task in this state should have (spec 4)."""
    status = doc.get("status", "pending")
    shard, task_id = doc["shard"], doc["id"]
    if status == "pending":
        return [ready_key(shard, parse_timestamp(doc["available_at"]), task_id)]
    if status == "running" and doc.get("lease_expires_at"):
        return [lease_key(shard, parse_timestamp(doc["lease_expires_at"]), task_id)]
    return []


# Seconds an index entry may precede the task write it announces (one write,
# with the client's retries); younger entries that do not fit their task yet
# are left alone.
INDEX_SETTLE = 120.0


def index_key_in_flight(kind, minute, modified, doc, now):
    """Whether an index entry that does not fit its task may be the first
    half of a transition still in flight: transitions write the entry the
    new state needs before the task document, so that a process killed in
    between leaves a task its index still shows (the monitor can recover it)
    rather than one no index shows.  Such entries are a ready entry with no
    task yet (a submit), a lease entry of a pending task (a claim) or a newer
    one of a running task (an extension), and a ready entry of a running task
    (a retry, a reschedule, a requeue), written (`modified`, from the
    listing) less than INDEX_SETTLE seconds ago.  `doc` None: no task."""
    if modified is None or (now - modified).total_seconds() >= INDEX_SETTLE:
        return False
    if doc is None:
        return kind == "ready"
    status = doc.get("status", "pending")
    if kind == "ready":
        return status == "running"
    if status == "pending":
        return True
    if status == "running" and doc.get("lease_expires_at"):
        return minute > minute_bucket(parse_timestamp(doc["lease_expires_at"]))
    return False


# ============================================================================
# Stores: one narrow port, three implementations
# ============================================================================
#
# The port every store implements (and tests/test_store_contract.py checks):
#
#   get(key) -> Blob | None
#       The object's bytes and ETag; None when absent.
#   put(key, body, *, if_match=None, if_none_match=False) -> etag
#       Write bytes.  if_match: replace only if the current ETag equals it;
#       if_none_match: create only.  A failed condition raises ConflictError
#       (a missing key under if_match is a failed condition too).  A write
#       that may or may not have been applied raises UncertainWrite.
#   delete(key) -> None
#       Unconditional; deleting a missing key is not an error.
#   delete_many(keys) -> None
#       The same for many keys, in as few requests as the store allows.
#   list(prefix, *, start_after=None, limit=1000) -> ([keys], truncated)
#       Keys under prefix, after start_after, ascending UTF-8 byte order.
#       start_after is a key, or a "directory" ending in "/": SeaweedFS reads
#       "a" as the whole a/ subtree and skips it, where S3 lists a/b.
#   list_info(prefix, *, start_after=None, limit=1000) -> ([(key, modified)], truncated)
#       The same listing with each object's last-modified time (aware UTC).
#   versions(key) -> [Version] newest first, or raise VersioningUnavailable
#   get_version(key, version_id) -> Blob | None
#   now() -> aware UTC datetime: the store's clock (S3: the server's).
#
# ETags are opaque strings compared for equality, quoted as S3 quotes them.


class UncertainWrite(StoreError):
    """A conditional write may have been applied although it reported a
    conflict (its first attempt broke in transit).  Re-read to decide."""


class VersioningUnavailable(StoreError):
    """The store keeps no object versions, so there is no history."""


class Blob:
    __slots__ = ("body", "etag")

    def __init__(self, body, etag):
        self.body = body
        self.etag = etag

    def __repr__(self):
        return "Blob(%d bytes, etag=%r)" % (len(self.body), self.etag)


class Version:
    __slots__ = ("version_id", "is_latest", "is_delete_marker", "last_modified", "etag")

    def __init__(self, version_id, is_latest, is_delete_marker, last_modified, etag=None):
        self.version_id = version_id
        self.is_latest = is_latest
        self.is_delete_marker = is_delete_marker
        self.last_modified = last_modified
        self.etag = etag

    def __repr__(self):
        return "Version(%r, latest=%r, delete_marker=%r, %s)" % (
            self.version_id, self.is_latest, self.is_delete_marker, self.last_modified)


def _etag(body):
    # S3's ETag of a single-part upload: the quoted MD5 of the body.
    import hashlib

    return '"%s"' % hashlib.md5(body, usedforsecurity=False).hexdigest()


def _utc_now():
    return datetime.now(timezone.utc)


class MemoryStore:
    """An in-memory store for unit tests of queue logic: S3's semantics
    (ETags, conditional writes, ordered listing, optional versions) in one
    process.  `clock` is a callable returning an aware datetime."""

    def __init__(self, *, clock=None, versioned=False):
        self._objects = {}
        self._modified = {}
        self._history = {}  # key -> [(version_id, body or None, when)], newest last
        self._lock = threading.Lock()
        self._clock = clock or _utc_now
        self.versioned = versioned
        self.requests = {}  # operation -> count, for cost assertions in tests

    def _count(self, op):
        self.requests[op] = self.requests.get(op, 0) + 1

    def now(self):
        return self._clock()

    def get(self, key):
        with self._lock:
            self._count("GET")
            blob = self._objects.get(key)
            return Blob(blob.body, blob.etag) if blob else None

    def put(self, key, body, *, if_match=None, if_none_match=False):
        with self._lock:
            self._count("PUT")
            current = self._objects.get(key)
            if if_none_match and current is not None:
                raise ConflictError("%s already exists" % key)
            if if_match is not None and (current is None or current.etag != if_match):
                raise ConflictError("%s changed (ETag mismatch)" % key)
            blob = self._objects[key] = Blob(bytes(body), _etag(body))
            self._modified[key] = self._clock()
            if self.versioned:
                self._history.setdefault(key, []).append((new_uuid().replace("-", ""), blob.body, self._clock()))
            return blob.etag

    def delete(self, key):
        with self._lock:
            self._count("DELETE")
            if self._objects.pop(key, None) is not None and self.versioned:
                self._history.setdefault(key, []).append((new_uuid().replace("-", ""), None, self._clock()))

    def list(self, prefix, *, start_after=None, limit=1000):
        with self._lock:
            self._count("LIST")
            keys = sorted(
                (k for k in self._objects if k.startswith(prefix) and (start_after is None or k > start_after)),
                key=lambda k: k.encode("utf-8"),
            )
            return keys[:limit], len(keys) > limit

    def delete_many(self, keys):
        for key in keys:
            self.delete(key)

    def list_info(self, prefix, *, start_after=None, limit=1000):
        keys, truncated = self.list(prefix, start_after=start_after, limit=limit)
        with self._lock:
            return [(k, self._modified.get(k)) for k in keys], truncated

    def versions(self, key):
        if not self.versioned:
            raise VersioningUnavailable("the memory store was created without versioning")
        with self._lock:
            self._count("LIST")
            history = self._history.get(key, [])
            n = len(history)
            return [Version(vid, i == n - 1, body is None, when, None if body is None else _etag(body))
                    for i, (vid, body, when) in reversed(list(enumerate(history)))]

    def get_version(self, key, version_id):
        with self._lock:
            self._count("GET")
            for vid, body, _ in self._history.get(key, []):
                if vid == version_id and body is not None:
                    return Blob(body, _etag(body))
            return None


# Bytes kept as they are in file names; everything else is percent-encoded.  No
# upper case: on case-insensitive file systems (macOS, Windows) `A` and `a` would
# be one file.  A leading "." is encoded too, so "." and ".." are never path
# components and every name starting with "." is the store's own.
_PLAIN_NAME = _LazyRe(r"[a-z0-9_-][a-z0-9._-]*\Z")
_ENCODED_NAME = _LazyRe(r"(?:[a-z0-9._-]|%[0-9A-F]{2})+\Z")
_ESCAPE = _LazyRe(rb"%([0-9A-F]{2})")
_SAFE_BYTES = frozenset(b"abcdefghijklmnopqrstuvwxyz0123456789._-")
# eCryptfs allows 143-byte names, most file systems 255: above this an encoded
# segment is replaced by its hash (keys go up to 1,024 bytes, 3 chars per byte).
_MAX_NAME = 128
_OBJECT = "@"  # suffix of object files; "@" is always encoded inside segments
_HASHED = "+"  # prefix of hashed names; "+" is always encoded inside segments
_EMPTY = "%"  # the empty segment ("a//b", "a/"); a lone "%" is no escape
_SEGMENT_FILE = ".segment"  # in a hashed directory: its segment, encoded
_TMP = ".tmp-"
_LOCK_FILE = ".lock"
# A writer holds its temporary file for milliseconds; one an hour old was left by
# a process that died between creating and renaming it.
_STALE_TMP_SECONDS = 3600.0


def _encode_segment(segment):
    if _PLAIN_NAME.match(segment):
        return segment
    raw = segment.encode("utf-8")
    return "".join(
        chr(b) if b in _SAFE_BYTES and (i or b != 0x2E) else "%%%02X" % b
        for i, b in enumerate(raw))


def _decode_segment(encoded):
    """The segment `encoded` stands for, or None if no segment encodes to it."""
    if _PLAIN_NAME.match(encoded):
        return encoded
    if not _ENCODED_NAME.match(encoded):
        return None
    raw = _ESCAPE.sub(lambda m: bytes.fromhex(m.group(1).decode("ascii")), encoded.encode("ascii"))
    try:
        segment = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    # Only the canonical spelling counts: a stray file ("Foo", "%41") is not a key.
    return segment if _encode_segment(segment) == encoded else None


def _hashed_name(encoded):
    import hashlib

    return _HASHED + hashlib.sha256(encoded.encode("ascii")).hexdigest()


def _segment_name(segment):
    """(file-system name, encoded segment if the name is hashed else None)."""
    encoded = _encode_segment(segment)
    if not encoded:
        return _EMPTY, None
    if len(encoded) > _MAX_NAME:
        return _hashed_name(encoded), encoded
    return encoded, None


class LocalStore:
    """The store on a local directory: S3's object semantics (ETags, conditional
    create and replace, ordered listing) for development, demos, tests of your
    handlers and single-host use; safe for many processes on one host.  The
    directory is created if needed.  `clock` is a callable returning an aware
    datetime (default: the UTC wall clock).

    On-disk layout.  A key is split at "/"; every segment but the last is a
    directory, the last is a file whose name ends in "@":

        tasks/3/3f2a.json        ROOT/tasks/3/3f2a.json@
        ready/3/0028691234/3f2a  ROOT/ready/3/0028691234/3f2a@
        a  and  a/b              ROOT/a@  and  ROOT/a/b@
        Tasks/x y                ROOT/%54asks/x%20y@
        a//b/                    ROOT/a/%/b/%@      ("%" is the empty segment)
        ../.x                    ROOT/%2E./%2Ex@
        (a 300-byte segment)     ROOT/+<sha256>@    (hashed, see below)

    A segment is its UTF-8 bytes with everything but a-z 0-9 . _ - (and a
    leading ".") percent-encoded with upper-case hex: names are lower-case
    ASCII, so case-insensitive or normalising file systems cannot merge two
    keys, and no segment can be ".", "..", or one of the store's own names,
    which all start with ".".  An encoded segment longer than 128 characters is
    stored as "+" and the SHA-256 of its encoding: a hashed directory keeps the
    encoding in its ".segment" file, a hashed object file starts with the
    encoding and a newline.  Other object files hold exactly the object's bytes;
    the ETag is the quoted MD5 of those bytes, computed when read.

    Other files: ROOT/.lock (the write lock) and ".tmp-PID-RANDOM" (a write in
    progress, next to its target; listing ignores them and removes those an hour
    old, left by a process that died).  Anything else that is not a canonical
    name (e.g. a file you copied in) is ignored.

    Consistency.  A write goes to a temporary file in the target's directory,
    flushed and fsynced, then renamed over the target (os.replace), and the
    directory is fsynced: a reader or a crash sees the old bytes or the new,
    never a mix.  Writes and deletes take one store-wide exclusive flock on
    ROOT/.lock for the check-and-rename only (the temporary file is written
    before), which makes conditional writes atomic across processes and
    threads; reads take no lock.  Deletes remove the directories they leave
    empty.  Needs POSIX (fcntl) and a local file system; keys up to S3's 1,024
    bytes fit Linux's 4,096-byte path limit unless ROOT itself is very long.
    The local store keeps no versions.
    """

    def __init__(self, root, *, clock=None):
        try:
            import fcntl
        except ImportError:
            raise StoreError("the local store needs POSIX file locks (fcntl), which this platform lacks: "
                             "use an S3 bucket (S3_BUCKET), or WSL on Windows") from None
        self._flock = fcntl.flock
        self._LOCK_EX, self._LOCK_UN = fcntl.LOCK_EX, fcntl.LOCK_UN
        self.root = os.path.abspath(os.fspath(root))
        self._clock = clock or _utc_now
        try:
            os.makedirs(self.root, exist_ok=True)
        except OSError as exc:
            raise self._error("cannot create the store directory", exc) from None

    def __repr__(self):
        return "LocalStore(%r)" % self.root

    def _error(self, what, exc, key=None):
        where = "local store %s" % self.root if key is None else "local store %s, key %r" % (self.root, key)
        return StoreError("%s: %s: %s" % (where, what, exc.strerror or exc))

    def now(self):
        return self._clock()

    # -- paths -----------------------------------------------------------------

    def _locate(self, key):
        """(directory path, [(dir path, encoded) of hashed directories], file path, encoded if hashed)."""
        segments = key.split("/")
        path = self.root
        hashed_dirs = []
        for segment in segments[:-1]:
            name, encoded = _segment_name(segment)
            path = os.path.join(path, name)
            if encoded is not None:
                hashed_dirs.append((path, encoded))
        name, encoded = _segment_name(segments[-1])
        return path, hashed_dirs, os.path.join(path, name + _OBJECT), encoded

    @staticmethod
    def _read(path, hashed):
        with open(path, "rb") as f:
            data = f.read()
        return data.partition(b"\n")[2] if hashed else data

    # -- reads (no lock: renames are atomic) -------------------------------------

    def get(self, key):
        _, _, path, hashed = self._locate(key)
        try:
            body = self._read(path, hashed)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise self._error("cannot read", exc, key) from None
        return Blob(body, _etag(body))

    def list(self, prefix, *, start_after=None, limit=1000):
        # Go straight to the directory of the prefix's complete segments, then walk
        # depth-first in key order, skipping subtrees outside the range.
        *dirs, _ = prefix.split("/")
        path = self.root
        for segment in dirs:
            path = os.path.join(path, _segment_name(segment)[0])
        base = "".join(segment + "/" for segment in dirs)
        keys = []
        try:
            for key in self._walk(path, base, prefix, start_after):
                if len(keys) == limit:
                    return keys, True
                keys.append(key)
        except OSError as exc:
            raise self._error("cannot list", exc, prefix) from None
        return keys, False

    def delete_many(self, keys):
        for key in keys:
            self.delete(key)

    def list_info(self, prefix, *, start_after=None, limit=1000):
        keys, truncated = self.list(prefix, start_after=start_after, limit=limit)
        out = []
        for key in keys:
            try:
                mtime = os.stat(self._locate(key)[2]).st_mtime
            except OSError:
                continue  # deleted since the listing
            out.append((key, datetime.fromtimestamp(mtime, timezone.utc)))
        return out, truncated

    def _walk(self, path, base, prefix, start_after):
        entries = []
        try:
            scan = os.scandir(path)
        except (FileNotFoundError, NotADirectoryError):
            return  # removed meanwhile, or never created
        with scan:
            for entry in scan:
                name = entry.name
                if name.startswith("."):
                    if name.startswith(_TMP):
                        self._sweep(entry)
                    continue
                is_object = name.endswith(_OBJECT)
                if is_object:
                    name = name[:-1]
                elif not entry.is_dir(follow_symlinks=False):
                    continue
                segment = self._segment_of(entry.path, name, is_object)
                if segment is None:
                    continue
                if is_object:
                    key = base + segment
                    if key.startswith(prefix) and (start_after is None or key > start_after):
                        entries.append((segment, key, None))
                else:
                    # Every key under the directory starts with `block`: all of them
                    # lie outside the prefix (whose last segment is in this directory
                    # or above), or all before start_after, or none.
                    block = base + segment + "/"
                    if not block.startswith(prefix):
                        continue
                    if start_after is not None and start_after > block and not start_after.startswith(block):
                        continue
                    entries.append((segment + "/", block, entry.path))
        # Siblings sort as their segment (objects) or segment + "/" (directories):
        # str order is code-point order, which is UTF-8 byte order.
        entries.sort()
        for _, key, subdir in entries:
            if subdir is None:
                yield key
            else:
                yield from self._walk(subdir, key, prefix, start_after)

    def _segment_of(self, path, name, is_object):
        if name == _EMPTY:
            return ""
        if not name.startswith(_HASHED):
            return _decode_segment(name)
        try:
            if is_object:
                with open(path, "rb") as f:
                    encoded = f.readline().rstrip(b"\n").decode("ascii")
            else:
                with open(os.path.join(path, _SEGMENT_FILE), "rb") as f:
                    encoded = f.read().decode("ascii")
        except (OSError, UnicodeDecodeError):
            return None  # being removed, or written before its ".segment" (no objects yet)
        segment = _decode_segment(encoded)
        return segment if segment is not None and _hashed_name(encoded) == name else None

    @staticmethod
    def _sweep(entry):
        try:
            if entry.stat(follow_symlinks=False).st_mtime < time.time() - _STALE_TMP_SECONDS:
                os.unlink(entry.path)
        except OSError:
            pass  # gone already, or not ours to remove

    # -- writes ------------------------------------------------------------------

    @contextmanager
    def _locked(self):
        # One open file description per call: flock then excludes other threads of
        # this process too, and a forked child never shares our lock.  The explicit
        # unlock releases it even if a forked child still holds a copy of the fd.
        try:
            fd = os.open(os.path.join(self.root, _LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            raise self._error("cannot open the lock file", exc) from None
        try:
            self._flock(fd, self._LOCK_EX)
            yield
        finally:
            try:
                self._flock(fd, self._LOCK_UN)
            finally:
                os.close(fd)

    def put(self, key, body, *, if_match=None, if_none_match=False):
        body = bytes(body)
        etag = _etag(body)
        directory, hashed_dirs, path, hashed = self._locate(key)
        data = body if hashed is None else hashed.encode("ascii") + b"\n" + body
        conditional = if_none_match or if_match is not None
        try:
            if conditional:
                # A write that is bound to lose fails before paying for its fsync
                # (a read is atomic, so this is a valid answer); a winner checks
                # again under the lock.
                self._check(key, path, hashed, if_match, if_none_match)
            tmp = self._write_temporary(directory, data)
        except OSError as exc:
            raise self._error("cannot write", exc, key) from None
        done = False
        try:
            with self._locked():
                try:
                    if conditional:
                        self._check(key, path, hashed, if_match, if_none_match)
                    for dir_path, encoded in hashed_dirs:
                        self._name_directory(dir_path, encoded)
                    os.replace(tmp, path)
                    done = True
                finally:
                    if not done:
                        # Dropping the write may leave a directory it created empty.
                        self._discard(tmp)
                        self._prune(directory)
        except OSError as exc:
            raise self._error("cannot write", exc, key) from None
        finally:
            if not done:
                self._discard(tmp)  # also when the lock could not be taken
        self._fsync_directory(directory)
        return etag

    def _check(self, key, path, hashed, if_match, if_none_match):
        try:
            current = _etag(self._read(path, hashed))
        except FileNotFoundError:
            current = None
        if if_none_match and current is not None:
            raise ConflictError("%s already exists" % key)
        if if_match is not None and current is None:
            raise ConflictError("%s does not exist (If-Match %s)" % (key, if_match))
        if if_match is not None and current != if_match:
            raise ConflictError("%s changed (ETag mismatch)" % key)

    def _write_temporary(self, directory, data):
        tmp = os.path.join(directory, "%s%d-%s" % (_TMP, os.getpid(), os.urandom(6).hex()))
        # The directory may be missing, or be removed (when empty) by a delete
        # between our mkdir and our open: then make it again.  Once the temporary
        # file is in it, no delete removes it.
        for attempt in range(20):
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
                break
            except FileNotFoundError:
                if attempt == 19:
                    raise
                try:
                    os.makedirs(directory, exist_ok=True)
                except FileNotFoundError:
                    pass  # a parent went away meanwhile: try again
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            self._discard(tmp)
            raise
        os.close(fd)
        return tmp

    def _name_directory(self, dir_path, encoded):
        # Under the lock, before an object appears in a hashed directory: its
        # ".segment" (a delete's pruning may have removed it meanwhile).
        name_path = os.path.join(dir_path, _SEGMENT_FILE)
        if not os.path.exists(name_path):
            tmp = self._write_temporary(dir_path, encoded.encode("ascii"))
            os.replace(tmp, name_path)

    @staticmethod
    def _discard(path):
        try:
            os.unlink(path)
        except OSError:
            pass

    def _fsync_directory(self, directory):
        # Makes the rename durable; a directory pruned meanwhile needs nothing.
        try:
            fd = os.open(directory, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(fd)
        except OSError:
            pass  # some file systems refuse fsync on directories
        finally:
            os.close(fd)

    def delete(self, key):
        directory, _, path, _ = self._locate(key)
        try:
            with self._locked():
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    return
                self._prune(directory)
        except OSError as exc:
            raise self._error("cannot delete", exc, key) from None
        self._fsync_directory(os.path.dirname(path))

    def _prune(self, directory):
        """Remove `directory` and its parents while empty.  Called under the lock;
        a writer outside it may be recreating them, and then rmdir fails."""
        while directory != self.root and directory.startswith(self.root):
            if os.path.basename(directory).startswith(_HASHED):
                try:
                    if os.listdir(directory) != [_SEGMENT_FILE]:
                        return
                    os.unlink(os.path.join(directory, _SEGMENT_FILE))
                except OSError:
                    return
            try:
                os.rmdir(directory)
            except OSError:
                return
            directory = os.path.dirname(directory)

    # -- versions ----------------------------------------------------------------

    def versions(self, key):
        raise VersioningUnavailable("the local store keeps no object versions")

    def get_version(self, key, version_id):
        raise VersioningUnavailable("the local store keeps no object versions")


class _ServerClock:
    """The server's time, learnt from the `Date` header of replies (whole
    seconds) and carried forward by the local monotonic clock.

    Each reply stamped D, sent at local instant s and received at r, bounds
    the offset (server - monotonic) to [D - r, D + 1 - s]; intersecting the
    bounds of many replies pins it well below a second.  Disjoint bounds mean
    one of the clocks jumped: start again from the newest reply.

    Within the bounds the local wall clock is the best guess: hosts kept by
    NTP then agree to the millisecond, where midpoints could differ by half a
    second (a task submitted on one could look not yet due on another).  A
    wall clock outside the bounds is wrong, and the midpoint stands in."""

    def __init__(self, monotonic=time.monotonic, wall=time.time):
        self._monotonic = monotonic
        self._wall = wall
        self._lo = None
        self._hi = None
        self._last = None  # the latest value now() returned
        self._lock = threading.Lock()

    def observe(self, date, sent, received):
        d = date.timestamp()
        lo, hi = d - received, d + 1.0 - sent
        with self._lock:
            if self._lo is None or lo > self._hi or hi < self._lo:
                self._lo, self._hi = lo, hi
                self._last = None  # a clock jumped: follow the new timeline
            else:
                self._lo, self._hi = max(self._lo, lo), min(self._hi, hi)

    @property
    def synced(self):
        return self._lo is not None

    def provisional(self):
        """(now, agreed): now() without waiting for a reply, the local time
        before the first; agreed() tells after a reply whether that time lay
        within the server's bounds (None: the time is the server's already).
        A first submit stamps with it and rewrites only when it did not, which
        spares every short-lived producer a clock probe."""
        if self.synced:
            return self.now(), None
        mono, wall = self._monotonic(), self._wall()

        def agreed():
            with self._lock:
                if self._lo is None or not self._lo <= wall - mono <= self._hi:
                    return False
                if self._last is None or self._last < wall:
                    self._last = wall  # later times never precede it
            return True

        return datetime.fromtimestamp(wall, timezone.utc), agreed

    def now(self):
        # Never backwards: narrowing the bounds moves the midpoint (by up to
        # half a second in a process's first moments), and a task seen due,
        # or timestamps written in sequence, must stay in order.
        with self._lock:
            mono = self._monotonic()
            offset = self._wall() - mono
            if not self._lo <= offset <= self._hi:
                offset = (self._lo + self._hi) / 2.0
            t = mono + offset
            if self._last is not None and t < self._last:
                t = self._last
            self._last = t
        return datetime.fromtimestamp(t, timezone.utc)


class S3Store:
    """The store over S3 (sigv4.S3Client).  Its clock is the server's, from
    the Date header of every reply; before the first reply, one cheap probe
    (HEAD of a key, whatever it answers) learns it."""

    def __init__(self, bucket, *, client=None, endpoint=None, region=None, profile=None, credentials=None,
                 **client_options):
        import sigv4

        self._sigv4 = sigv4
        if not isinstance(bucket, str) or not bucket or any(c == "/" or c.isspace() or ord(c) < 32 for c in bucket):
            # "bucket/sub" would put every key under sub/ in `bucket`, where no listing finds it.
            raise ValueError("bucket must be a bucket name without '/', spaces or control characters, got %r"
                             % (bucket,))
        self.bucket = bucket
        self.clock = _ServerClock()
        self._batch_delete = True
        if client is None:
            client = sigv4.S3Client(endpoint=endpoint, region=region, profile=profile, credentials=credentials,
                                    **client_options)
        # The clock hears every reply; a hook the caller gave hears it too.
        theirs = client._on_reply
        observe = self.clock.observe
        client._on_reply = observe if theirs is None else (
            lambda date, sent, received: (observe(date, sent, received), theirs(date, sent, received)))
        self.client = client

    def __repr__(self):
        return "S3Store(bucket=%r, endpoint=%r)" % (self.bucket, self.client.endpoint_url)

    def _wrap(self, exc):
        sigv4 = self._sigv4
        if isinstance(exc, sigv4.UncertainWriteError):
            return UncertainWrite(str(exc))
        if isinstance(exc, sigv4.ConflictError):
            return ConflictError(str(exc))
        return StoreError(str(exc))

    def provisional_now(self):
        return self.clock.provisional()

    def now(self):
        if not self.clock.synced:
            try:
                self.client.head_object(self.bucket, "clock/now")
            except self._sigv4.S3Error:
                pass  # any reply carries a Date; only a transport failure does not
            if not self.clock.synced:
                raise StoreError("cannot read the server's clock: no reply from %s" % self.client.endpoint_url)
        return self.clock.now()

    def get(self, key):
        try:
            r = self.client.get_object(self.bucket, key)
        except self._sigv4.NoSuchKey:
            return None
        except self._sigv4.S3Error as exc:
            raise self._wrap(exc) from None
        return Blob(r.body, r.etag)

    def put(self, key, body, *, if_match=None, if_none_match=False):
        try:
            r = self.client.put_object(self.bucket, key, body, if_match=if_match,
                                       if_none_match="*" if if_none_match else None)
        except self._sigv4.S3Error as exc:
            raise self._wrap(exc) from None
        return r.etag

    def delete(self, key):
        try:
            self.client.delete_object(self.bucket, key)
        except self._sigv4.S3Error as exc:
            raise self._wrap(exc) from None

    def list(self, prefix, *, start_after=None, limit=1000):
        keys = []
        token = None
        try:
            while True:
                page = self.client.list_objects_v2(
                    self.bucket, prefix=prefix, start_after=None if token else start_after,
                    continuation_token=token, max_keys=min(1000, limit - len(keys)))
                keys.extend(page.keys)
                token = page.next_continuation_token
                if len(keys) >= limit or not page.is_truncated or not token:
                    return keys, page.is_truncated
        except self._sigv4.S3Error as exc:
            raise self._wrap(exc) from None

    def delete_many(self, keys):
        """DeleteObjects, 1000 keys a request; one DELETE each where the
        provider lacks it (learnt once)."""
        keys = list(keys)
        if self._batch_delete:
            try:
                for i in range(0, len(keys), 1000):
                    for key, code, message in self.client.delete_objects(self.bucket, keys[i:i + 1000]):
                        _warn("delete of %s failed: %s %s", key, code, message)
                return
            except self._sigv4.S3Error as exc:
                if exc.status not in (400, 405, 501):
                    raise self._wrap(exc) from None
                self._batch_delete = False  # not offered here: one by one from now on
        for key in keys:
            self.delete(key)

    def list_info(self, prefix, *, start_after=None, limit=1000):
        try:
            page = self.client.list_objects_v2(self.bucket, prefix=prefix, start_after=start_after,
                                               max_keys=min(1000, limit))
        except self._sigv4.S3Error as exc:
            raise self._wrap(exc) from None
        return [(o.key, o.last_modified) for o in page.contents], page.is_truncated

    def versioning(self):
        try:
            return self.client.get_bucket_versioning(self.bucket)
        except self._sigv4.S3Error as exc:
            raise self._wrap(exc) from None

    def versions(self, key):
        try:
            result = self.client.list_object_versions(self.bucket, prefix=key)
        except self._sigv4.S3Error as exc:
            raise self._wrap(exc) from None
        found = [v for v in result.versions if v.key == key and v.version_id not in (None, "null")]
        if not found and result.versions:
            raise VersioningUnavailable("bucket %s keeps no object versions" % self.bucket)
        found.sort(key=lambda v: (v.is_latest, v.last_modified or _EPOCH), reverse=True)
        return [Version(v.version_id, v.is_latest, v.is_delete_marker, v.last_modified, v.etag) for v in found]

    def get_version(self, key, version_id):
        try:
            r = self.client.get_object(self.bucket, key, version_id=version_id)
        except self._sigv4.S3Error as exc:
            # A delete marker has no body: AWS answers 405, moto 404 NoSuchVersion.
            if exc.status in (404, 405):
                return None
            raise self._wrap(exc) from None
        return Blob(r.body, r.etag)


# ============================================================================
# The queue
# ============================================================================

_log = None


def _warn(message, *args):
    global _log
    if _log is None:
        import logging  # only when there is something to say

        _log = logging.getLogger("buquet")
    _log.warning(message, *args)


class History(list):
    """Versions of a task, newest first.  `versioned` is False when the
    bucket keeps no versions: then the list holds only the current state and
    `note` says why."""

    versioned = True
    note = None


def _seconds(value, name):
    """Seconds from an int, a float or a timedelta; ValueError naming the
    argument otherwise."""
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise ValueError("%s must be a number of seconds or a timedelta, got %r" % (name, value))
    if abs(value) > _MAX_SECONDS:
        raise ValueError("%s must be at most %d seconds (100 years), got %r" % (name, _MAX_SECONDS, value))
    return float(value)


_MAX_SECONDS = 100 * 365 * 86400  # far beyond any real delay; keeps datetimes in range


def _instant(value, name):
    if isinstance(value, str):
        try:
            return parse_timestamp(value)
        except ValueError:
            raise ValueError("%s must be an RFC 3339 timestamp with an offset (2026-01-28T09:00:00Z), got %r"
                             % (name, value)) from None
    if not isinstance(value, datetime) or value.tzinfo is None:
        raise ValueError("%s must be an aware datetime or an RFC 3339 string, got %r" % (name, value))
    return value.astimezone(timezone.utc)


def _uint(value, name, minimum=0, limit=_U32):
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= limit:
        raise ValueError("%s must be an integer %d..%d, got %r" % (name, minimum, limit, value))
    return value


# serde_json, the original's reader, stops at a document's 128th level of
# nesting; the task document is the first, so an input or output may have 126
# (checked against the original: 126 reads, 127 fails "recursion limit exceeded").
_MAX_NESTING = 126


def _check_json(value, name):
    """The value's compact JSON, or ValueError naming where it is not JSON."""
    def walk(v, path, depth=1):
        if isinstance(v, (dict, list, tuple)) and depth > _MAX_NESTING:
            raise ValueError("%s is nested more than %d levels deep at %s (the original cannot read that)"
                             % (name, _MAX_NESTING, path[:60] + ("..." if len(path) > 60 else "")))
        if isinstance(v, dict):
            for k, item in v.items():
                if not isinstance(k, str):
                    raise ValueError("%s: object keys must be strings, got %r at %s" % (name, k, path))
                walk(item, "%s[%r]" % (path, k), depth + 1)
        elif isinstance(v, (list, tuple)):
            for i, item in enumerate(v):
                walk(item, "%s[%d]" % (path, i), depth + 1)
        elif isinstance(v, bool) or v is None or isinstance(v, str):
            pass
        elif isinstance(v, int):
            if not -2 ** 63 <= v <= _U64:
                raise ValueError("%s: integer out of the 64-bit range at %s" % (name, path))
        elif isinstance(v, float):
            if v != v or v in (float("inf"), float("-inf")):
                raise ValueError("%s: %r at %s is not valid JSON" % (name, v, path))
        elif path == name:
            raise ValueError("%s must be JSON-serialisable, got %s" % (name, type(v).__name__))
        else:
            raise ValueError("%s must be JSON-serialisable: %s at %s is not" % (name, type(v).__name__, path))
    walk(value, name)
    return dumps(value)


def _check_name(value, name):
    if not isinstance(value, str) or not value.strip() or "/" in value or any(ord(c) < 32 for c in value):
        raise ValueError("%s must be a non-empty string without '/' or control characters, got %r" % (name, value))
    return value


def _task_id(value):
    try:
        return canonical_uuid(str(value))
    except ValueError:
        raise ValueError("task id must be a UUID, got %r" % (value,)) from None


class Queue:
    """Every task operation, over one store (S3, a local directory, memory).

    Thread-safe.  Methods that change a claimed task take the Task the claim
    returned and check its lease, so a worker whose lease expired cannot
    overwrite a newer attempt.  A lost race is never an exception to the
    caller of claim_next: it just claims nothing."""

    def __init__(self, store, *, shard_prefix_len=SHARD_PREFIX_LEN, rand=None, max_threads=16):
        self.store = store
        self.shard_prefix_len = min(max(int(shard_prefix_len), 1), 4)
        self.shards = all_shards(self.shard_prefix_len)
        self._rand = rand or _random
        self._max_threads = max_threads
        self._pool = None
        self._pool_lock = threading.Lock()
        self._versioned = None
        self._discoveries = {}  # shards -> _Discovery, for claim_next
        self._claimer_id = "worker-%s" % new_uuid()[:8]
        self.skipped = {}  # key -> reason, for documents that could not be read
        # Index upkeep after a transition goes through this hook; a worker
        # swaps in a background runner to keep it off the handler's path.
        self.run_index_ops = self._index_now

    def __repr__(self):
        return "Queue(%r)" % (self.store,)

    # -- plumbing --------------------------------------------------------------

    def now(self):
        """The store's clock: S3's time for the S3 store."""
        return self.store.now()

    def _executor(self):
        if self._pool is None:
            with self._pool_lock:
                if self._pool is None:
                    from concurrent.futures import ThreadPoolExecutor

                    self._pool = ThreadPoolExecutor(self._max_threads, thread_name_prefix="buquet")
        return self._pool

    def _map(self, fn, items):
        items = list(items)
        if len(items) <= 1:
            return [fn(i) for i in items]
        return list(self._executor().map(fn, items))

    def close(self):
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def _read(self, key):
        """(Task, None) / (None, None) when absent / (None, reason) when the
        document cannot be read (reported, never fatal)."""
        blob = self.store.get(key)
        if blob is None:
            return None, None
        try:
            task = decode_task(blob.body, blob.etag, key)
            _check_task_key(task.doc, key, self.shard_prefix_len)
            return task, None
        except InvalidTaskDocument as exc:
            reason = str(exc)
            if self.skipped.get(key) != reason:
                _warn("skipping unreadable task document %s: %s", key, reason)
            self.skipped[key] = reason
            return None, reason

    def _key_for(self, task_id):
        return task_key(shard_of(task_id, self.shard_prefix_len), task_id)

    def _index_now(self, puts, deletes, strict=False):
        for key in puts:
            try:
                self.store.put(key, b"")
            except BuquetError as exc:  # best effort: the sweeper repairs
                if strict:
                    raise
                _warn("index write %s failed: %s", key, exc)
        for key in deletes:
            try:
                self.store.delete(key)
            except BuquetError as exc:
                _warn("index delete %s failed: %s", key, exc)

    def _delete_index_keys(self, keys):
        """Best-effort deletes of index keys, batched where the store can."""
        many = getattr(self.store, "delete_many", None)
        if many is None or len(keys) == 1:
            self._index_now([], keys)
            return
        try:
            many(keys)
        except BuquetError as exc:
            _warn("index deletes failed (%d keys): %s", len(keys), exc)

    def _reindex(self, old_doc, new_doc, also_delete=(), written=()):
        old = set(index_keys(old_doc)) if old_doc else set()
        old.update(also_delete)
        new = index_keys(new_doc)
        puts = [k for k in new if k not in old and k not in written]
        deletes = sorted(k for k in old if k not in new)
        if puts or deletes:
            self.run_index_ops(puts, deletes)

    def _index_first(self, old_doc, new_doc, written):
        """Write the entries `new_doc` needs and `old_doc` lacks before the
        task document moves (see index_key_in_flight); returns `written`
        with them.  Raises when one cannot be written: then the task must not
        move either.  A write that then loses leaves its entry to the monitor
        or sweeper, once its minute has passed."""
        old = set(index_keys(old_doc)) if old_doc else set()
        puts = [k for k in index_keys(new_doc) if k not in old and k not in written]
        if puts:
            self.run_index_ops(puts, [], strict=True)
        return written.union(puts)

    def _write(self, task, event, *, lease_id=None, also_delete=(), attempts=8, **args):
        """Apply `event` to `task` with compare-and-swap; on a lost race
        re-read and re-apply (the transition re-checks state and lease), up
        to `attempts` writes.  Returns the new Task."""
        current = task
        written = frozenset()
        for attempt in range(1, attempts + 1):
            if event in _FINISHING and current.doc.get("cancel_requested"):
                # Cancellation was requested while the handler ran: whatever
                # it returned, the task ends cancelled.
                event, args = "cancel_running", {}
            new_doc = transition(current.doc, event, self.now(), lease_id=lease_id, **args)
            body = encode_task(new_doc)
            written = self._index_first(current.doc, new_doc, written)
            try:
                etag = self.store.put(current.key, body, if_match=current.etag)
            except UncertainWrite:
                latest, _ = self._read(current.key)
                if latest is None or encode_task(latest.doc) != body:
                    if attempt == attempts:
                        break
                    current = latest or self._reread(current)  # (re-read only to raise)
                    continue
                etag = latest.etag  # the first attempt had been applied
            except ConflictError:
                if attempt == attempts:
                    break  # no read that nothing would use
                current = self._reread(current)
                continue
            self._reindex(current.doc, new_doc, also_delete, written)
            return Task(new_doc, etag, current.key)
        raise ConflictError("task %s kept changing under %s (%d attempts); gave up" % (task.doc["id"], event, attempts))

    def _reread(self, task):
        latest, reason = self._read(task.key)
        if latest is None:
            if reason:
                raise InvalidTaskDocument("task %s: %s" % (task.doc["id"], reason))
            raise TaskNotFound(task.doc["id"])
        return latest

    def _load(self, task_or_id):
        if isinstance(task_or_id, Task):
            return self._reread(task_or_id)
        task_id = _task_id(task_or_id)
        task, reason = self._read(self._key_for(task_id))
        if task is None:
            if reason:
                raise InvalidTaskDocument("task %s: %s" % (task_id, reason))
            raise TaskNotFound(task_id)
        return task

    # -- submit ----------------------------------------------------------------

    def _new_document(self, task_type, input, *, delay=None, at=None, ttl=None, expires_at=None,
                      timeout=DEFAULT_TIMEOUT, max_retries=DEFAULT_MAX_RETRIES, retry_policy=None,
                      max_reschedules=None):
        """Validate every option (no request is made) and return a function
        of (task id, now) that builds the document."""
        _check_name(task_type, "task_type")
        _check_json(input, "input")
        if delay is not None and at is not None:
            raise ValueError("give either delay or at, not both")
        if ttl is not None and expires_at is not None:
            raise ValueError("give either ttl or expires_at, not both")
        delay_s = None if delay is None else _seconds(delay, "delay")
        if delay_s is not None and delay_s < 0:
            raise ValueError("delay must not be negative, got %r" % (delay,))
        at_dt = None if at is None else _instant(at, "at")
        ttl_s = None if ttl is None else _seconds(ttl, "ttl")
        if ttl_s is not None and ttl_s <= 0:
            raise ValueError("ttl must be positive (a TTL in the past expires the task at once), got %r" % (ttl,))
        exp_dt = None if expires_at is None else _instant(expires_at, "expires_at")
        if exp_dt is not None and exp_dt <= self.now():  # the store's clock, as every queue decision
            raise ValueError("expires_at is in the past: %s" % format_timestamp(exp_dt))
        _uint(timeout, "timeout", 1, _U64)
        _uint(max_retries, "max_retries")
        if max_reschedules is not None:
            _uint(max_reschedules, "max_reschedules")
        if retry_policy is None:
            policy = dict(DEFAULT_RETRY_POLICY)
        elif isinstance(retry_policy, RetryPolicy):
            policy = retry_policy.to_dict()
        elif isinstance(retry_policy, dict):
            policy = RetryPolicy(**retry_policy).to_dict()
        else:
            raise ValueError("retry_policy must be a RetryPolicy or a dict, got %r" % (retry_policy,))

        def build(task_id, now):
            available = now
            if delay_s is not None:
                available = now + timedelta(seconds=delay_s)
            elif at_dt is not None:
                available = at_dt
            ts = format_timestamp(now)
            doc = {
                "id": task_id, "shard": shard_of(task_id, self.shard_prefix_len), "task_type": task_type,
                "input": input, "output": None, "timeout_seconds": timeout, "max_retries": max_retries,
                "retry_count": 0, "retry_policy": policy, "status": "pending", "created_at": ts,
                "available_at": format_timestamp(available), "lease_expires_at": None, "lease_id": None,
                "attempt": 0, "updated_at": ts, "completed_at": None, "worker_id": None, "last_error": None,
                "reschedule_count": 0, "max_reschedules": max_reschedules, "cancel_requested": False,
            }
            if ttl_s is not None:
                doc["expires_at"] = format_timestamp(now + timedelta(seconds=ttl_s))
            elif exp_dt is not None:
                doc["expires_at"] = format_timestamp(exp_dt)
            return _ordered(doc)

        return build

    def submit(self, task_type, input=None, *, delay=None, at=None, ttl=None, expires_at=None,
               timeout=DEFAULT_TIMEOUT, max_retries=DEFAULT_MAX_RETRIES, retry_policy=None,
               idempotency_key=None, idempotency_scope=None, idempotency_ttl_days=IDEMPOTENCY_TTL_DAYS,
               max_reschedules=None):
        """Submit a task; returns it (pending).  Costs two PUTs (task, ready
        index), plus one for an idempotency record.

        delay / at: not claimable before now + delay (seconds or timedelta)
        or the instant `at`.  ttl / expires_at: expire if not claimed by then.
        timeout: lease seconds per attempt.  max_retries: retries after the
        first attempt.  idempotency_key: one key never yields two tasks (for
        `idempotency_ttl_days`), even with processes racing; reusing it with a
        different input raises IdempotencyConflict."""
        build = self._new_document(
            task_type, input, delay=delay, at=at, ttl=ttl, expires_at=expires_at, timeout=timeout,
            max_retries=max_retries, retry_policy=retry_policy, max_reschedules=max_reschedules)
        if idempotency_key is not None:
            if not isinstance(idempotency_key, str) or not idempotency_key:
                raise ValueError("idempotency_key must be a non-empty string, got %r" % (idempotency_key,))
            scope = self._scope(idempotency_scope, task_type)
            _uint(idempotency_ttl_days, "idempotency_ttl_days", 1)
            return self._submit_idempotent(build, task_type, input, idempotency_key, scope, idempotency_ttl_days)
        now, agreed = self._provisional_now()
        return self._create(build(new_uuid(), now), build if agreed else None, agreed)

    @staticmethod
    def _scope(scope, task_type):
        if scope in (None, "task_type", "TaskType"):
            return task_type
        if scope in ("queue", "Queue"):
            return "queue"
        return _check_name(scope, "idempotency_scope")

    def _provisional_now(self):
        """(now, agreed): the store's time without waiting for its clock, and
        a check of it for after the next reply (None if it is exact already)."""
        guess = getattr(self.store, "provisional_now", None)
        return guess() if guess is not None else (self.now(), None)

    def _create(self, doc, rebuild=None, agreed=None):
        key = task_key(doc["shard"], doc["id"])
        body = encode_task(doc)
        # The ready entry first: a task is never without it, whatever fails.
        written = self._index_first(None, doc, frozenset())
        try:
            etag = self.store.put(key, body, if_none_match=True)
        except (ConflictError, UncertainWrite) as exc:
            existing, _ = self._read(key)
            if existing is not None and isinstance(exc, UncertainWrite) and encode_task(existing.doc) == body:
                etag = existing.etag
            elif existing is not None:  # created by a racer with the same (record-given) id
                self._index_now([], [k for k in written if k not in index_keys(existing.doc)])
                return existing
            else:
                self._index_now([], written)
                raise
        except BuquetError:
            # Not written (a write that may have been is UncertainWrite): the
            # entry goes too, best effort; else the sweeper, once settled.
            self._index_now([], written)
            raise
        if agreed is not None and not agreed():
            # Stamped with a local clock that is off the server's: restamp it
            # (its ready entry first, again).
            fixed = rebuild(doc["id"], self.now())
            written = self._index_first(doc, fixed, written)
            try:
                etag = self.store.put(key, encode_task(fixed), if_match=etag)
                doc = fixed
            except (ConflictError, UncertainWrite):
                existing, _ = self._read(key)
                if existing is None:
                    raise
                if encode_task(existing.doc) not in (body, encode_task(fixed)):
                    return existing  # a sweeper found it first, and indexed it
                doc, etag = existing.doc, existing.etag
        self._reindex(None, doc, also_delete=[k for k in written if k not in index_keys(doc)], written=written)
        return Task(doc, etag, key)

    def _submit_idempotent(self, build, task_type, input, key, scope, ttl_days):
        """The original's record format and key, with one change that makes
        a second task impossible: a racer that finds the record but not yet
        its task creates the task itself, *with the record's task id* and
        If-None-Match, so at most one task can ever exist per record."""
        record_key, key_hash = idempotency_key(scope, key)
        input_hash = sha256_tag(canonical_json(input))
        now = self.now()
        doc = build(new_uuid(), now)

        def record_for(d, at):
            return dumps({
                "key": key, "key_hash": key_hash, "task_id": d["id"], "task_key": task_key(d["shard"], d["id"]),
                "created_at": format_timestamp(at), "expires_at": format_timestamp(at + timedelta(days=ttl_days)),
                "task_type": task_type, "input_hash": input_hash,
            }).encode("utf-8")

        write = {"if_none_match": True}
        for _ in range(8):
            try:
                self.store.put(record_key, record_for(doc, now), **write)
                return self._create(doc)
            except (ConflictError, UncertainWrite):
                pass
            blob = self.store.get(record_key)
            if blob is None:
                write = {"if_none_match": True}
                continue
            try:
                record = json.loads(blob.body)
                expired = parse_timestamp(record["expires_at"]) < self.now()
                record_task_id = _task_id(record["task_id"])
                record_task_key = record.get("task_key") or self._key_for(record_task_id)
            except (ValueError, KeyError, TypeError, RecursionError) as exc:
                raise IdempotencyConflict("idempotency record %s is unreadable (%s); delete it to reuse the key"
                                          % (record_key, exc)) from None
            if record_task_id == doc["id"]:
                return self._create(doc)  # our own write, reported uncertain
            if expired:
                now = self.now()
                doc = build(doc["id"], now)
                write = {"if_match": blob.etag}
                continue
            if record.get("input_hash") != input_hash:
                raise IdempotencyConflict(  # the original's wording (spec 6.2)
                    "Idempotency conflict: Idempotency key '%s' was used with different input. Existing task: %s. "
                    "Input hash mismatch: expected %s, got %s"
                    % (key, record_task_id, record.get("input_hash"), input_hash))
            existing, _ = self._read(record_task_key)
            if existing is not None:
                return existing
            # The record's creator has not written its task yet (or died):
            # write it under the record's id; If-None-Match picks one writer.
            now = self.now()
            taken = build(record_task_id, now)
            taken["shard"] = record_task_key.split("/")[1]
            return self._create(taken)
        raise ConflictError("idempotency record %s keeps changing; gave up" % record_key)

    def submit_many(self, tasks):
        """Submit many tasks with overlapping requests (threads).  `tasks`
        holds (task_type, input) pairs or dicts of submit's arguments.  Every
        item is validated before the first request; returns the Tasks in
        order."""
        calls = []
        for i, item in enumerate(tasks):
            if isinstance(item, dict):
                kwargs = dict(item)
                try:
                    args = (kwargs.pop("task_type"), kwargs.pop("input", None))
                except KeyError:
                    raise ValueError("submit_many: item %d has no task_type" % i) from None
            else:
                try:
                    args, kwargs = tuple(item), {}
                except TypeError:
                    raise ValueError("submit_many: item %d must be (task_type, input) or a dict, got %r"
                                     % (i, item)) from None
            if kwargs.get("idempotency_key") is None:
                self._new_document(*args, **{k: v for k, v in kwargs.items() if not k.startswith("idempotency")})
            calls.append((args, kwargs))
        return self._map(lambda c: self.submit(*c[0], **c[1]), calls)

    # -- reading ---------------------------------------------------------------

    def get(self, task_id):
        """The task, or None when there is none with this id."""
        task_id = _task_id(task_id)
        task, reason = self._read(self._key_for(task_id))
        if reason:
            raise InvalidTaskDocument("task %s: %s" % (task_id, reason))
        return task

    def load_input(self, task):
        """The task's input, fetched from its payload object when offloaded."""
        ref = task.doc.get("input_ref")
        if not ref:
            return task.doc.get("input")
        blob = self.store.get(ref)
        if blob is None:
            raise StoreError("payload %s of task %s is missing" % (ref, task.doc["id"]))
        return json.loads(blob.body)

    def load_output(self, task):
        ref = task.doc.get("output_ref")
        if not ref:
            return task.doc.get("output")
        blob = self.store.get(ref)
        if blob is None:
            raise StoreError("payload %s of task %s is missing" % (ref, task.doc["id"]))
        return json.loads(blob.body)

    def _check_shard(self, shard):
        if shard not in self.shards:
            raise ValueError("shard must be one of %s..%s, got %r" % (self.shards[0], self.shards[-1], shard))
        return shard

    def list(self, shard, status=None, task_type=None, limit=100):
        """Up to `limit` tasks of a shard, in id order, filtered by status and
        task type.  Unreadable documents are skipped (see `skipped`)."""
        self._check_shard(shard)
        if status is not None and status not in STATUSES:
            raise ValueError("status must be one of %s, got %r" % (", ".join(STATUSES), status))
        _uint(limit, "limit", 1, 10 ** 9)
        out = []
        start = None
        while len(out) < limit:
            page = max(limit - len(out), 100) if (status or task_type) else limit - len(out)
            keys, truncated = self.store.list("tasks/%s/" % shard, start_after=start, limit=min(page, 1000))
            keys = [k for k in keys if k.endswith(".json")]
            for task, _ in self._map(self._read, keys):
                if task is None:
                    continue
                if status is not None and task.doc.get("status", "pending") != status:
                    continue
                if task_type is not None and task.doc.get("task_type") != task_type:
                    continue
                out.append(task)
                if len(out) >= limit:
                    break
            if not truncated or not keys:
                break
            start = keys[-1]
        return out

    def list_ready(self, shard, limit=100):
        """Ids of tasks in a shard's ready index whose minute has come
        (hints: a claim re-checks the task)."""
        self._check_shard(shard)
        now_bucket = minute_bucket(self.now())
        keys, _ = self.store.list("ready/%s/" % shard, limit=limit)
        out = []
        for key in keys:
            parsed = parse_index_key(key)
            if parsed and parsed[1] <= now_bucket:
                out.append(parsed[2])
        return out

    def versioning(self):
        """Whether the store keeps object versions (asked once)."""
        if self._versioned is None:
            probe = getattr(self.store, "versioning", None)
            if probe is not None:
                self._versioned = probe() == "Enabled"
            else:
                self._versioned = bool(getattr(self.store, "versioned", False))
        return self._versioned

    def history(self, task_id):
        """Every version of the task, newest first (a History list).  On a
        bucket without versioning: only the current state, with a note."""
        task_id = _task_id(task_id)
        key = self._key_for(task_id)
        out = History()
        if not self.versioning():
            current = self.get(task_id)
            if current is None:
                raise TaskNotFound(task_id)
            out.append(current)
            out.versioned = False
            out.note = "the bucket keeps no object versions: only the current state is known"
            return out
        for version in self.store.versions(key):
            if version.is_delete_marker:
                continue
            blob = self.store.get_version(key, version.version_id)
            if blob is None:
                continue
            try:
                out.append(decode_task(blob.body, blob.etag, key))
            except InvalidTaskDocument as exc:
                _warn("skipping unreadable version %s of %s: %s", version.version_id, key, exc)
        if not out:
            raise TaskNotFound(task_id)
        return out

    # -- claiming ----------------------------------------------------------------

    def claim(self, task_id, worker_id, task_types=None, *, ready_key=None):
        """Claim one task by id if it is pending, due, and of a wanted type.
        Returns the running Task, or None (not claimable, or another worker
        won).  Costs GET + PUT, then the index moves (lease in, ready out)."""
        return self._claim(task_id, worker_id, task_types, ready_key)[0]

    def _claim(self, task_id, worker_id, task_types, ready_key):
        """claim's work.  Returns (running Task, None, False) or (None, wait,
        taken): wait is the seconds before another try could succeed (not
        yet due), 0.0 when that may be any time (a worker holds it, or the
        race was lost), None when it cannot become claimable by itself
        (gone, foreign type, finished, expired); taken says that another
        claimer got there first (gone, no longer pending, race lost), a sign
        that the listing it came from is stale.  A worker sizes its skip
        cache with wait and lists again when taken."""
        task_id = _task_id(task_id)
        key = self._key_for(task_id)
        task, _ = self._read(key)
        if task is None:
            parsed = parse_index_key(ready_key) if ready_key else None
            if parsed and parsed[1] >= minute_bucket(self.now()):
                return None, 0.0, False  # maybe a submit in flight (ready entry first): look again soon
            return None, None, True
        doc = task.doc
        if task_types is not None and doc["task_type"] not in task_types:
            return None, None, False
        status = doc.get("status", "pending")
        if status != "pending":
            return None, (0.0 if status == "running" else None), True
        now = self.now()
        if doc.get("expires_at") and now >= parse_timestamp(doc["expires_at"]):
            try:
                self._write(task, "expire", also_delete=[ready_key] if ready_key else (), attempts=1)
            except (BuquetError,) as exc:
                _warn("could not mark task %s expired: %s", task_id, exc)
            return None, None, False
        available = parse_timestamp(doc["available_at"])
        if now < available:
            return None, (available - now).total_seconds(), False
        lease = new_uuid()
        new_doc = transition(doc, "claim", now, worker_id=worker_id, new_lease_id=lease)
        body = encode_task(new_doc)
        written = self._index_first(doc, new_doc, frozenset())
        try:
            etag = self.store.put(key, body, if_match=task.etag)
        except (ConflictError, UncertainWrite) as exc:
            latest, _ = self._read(key)
            if isinstance(exc, ConflictError) or latest is None or latest.doc.get("lease_id") != lease:
                # Lost: our lease entry goes unless the winner's has the same
                # name (one GET per lost race keeps the index exact).
                mine = [k for k in written if latest is None or k not in index_keys(latest.doc)]
                if mine:
                    self._index_now([], mine)
                return None, 0.0, True
            etag = latest.etag
        self._reindex(doc, new_doc, [ready_key] if ready_key else (), written)
        return Task(new_doc, etag, key), None, False

    def claim_next(self, shards=None, task_types=None, *, worker_id=None):
        """Claim a claimable task from the ready index of the given shards
        (all by default), or return None.  Discovery is the worker's: one
        LIST for every shard, candidates kept for the next calls."""
        shards = tuple(self.shards if shards is None else shards)
        for s in shards:
            self._check_shard(s)
        worker_id = worker_id or self._claimer_id
        discovery = self._discoveries.get(shards)
        if discovery is None:
            discovery = self._discoveries[shards] = _Discovery(self, shards, self._rand)
        refilled = False
        while True:
            candidate = discovery.take()
            if candidate is None:
                if refilled or not discovery.refill(self.now()):
                    return None
                refilled = True
                continue
            # No skip cache here, unlike the worker: each call answers for
            # the state of the bucket at that moment.
            task = self._claim(candidate[1], worker_id, task_types, candidate[0])[0]
            if task is not None:
                return task

    # -- finishing a claimed task ------------------------------------------------

    def complete(self, task, output=None):
        """Mark a claimed task completed with `output` (JSON)."""
        _check_json(output, "output")
        return self._write(task, "complete", lease_id=task.doc.get("lease_id"), output=output)

    def fail(self, task, error):
        """Fail a claimed task permanently, recording `error`."""
        return self._write(task, "fail", lease_id=task.doc.get("lease_id"), error=str(error))

    def retry(self, task, error):
        """A failed attempt: back to pending after the retry policy's backoff,
        or failed when the retries are spent."""
        doc = task.doc
        if doc.get("retry_count", 0) >= doc.get("max_retries", DEFAULT_MAX_RETRIES):
            return self.fail(task, error)
        delay = backoff_ms(doc.get("retry_policy", DEFAULT_RETRY_POLICY), doc.get("retry_count", 0), self._rand())
        return self._write(task, "retry", lease_id=doc.get("lease_id"), error=str(error), delay_ms=delay)

    def reschedule(self, task, delay):
        """Run a claimed task again after `delay` seconds, consuming no retry
        (fails it when max_reschedules is reached)."""
        delay_s = _seconds(delay, "delay")
        if delay_s < 0:
            raise ValueError("delay must not be negative, got %r" % (delay,))
        over = reschedule_or_fail(task.doc)
        if over:
            return self.fail(task, over)
        return self._write(task, "reschedule", lease_id=task.doc.get("lease_id"),
                           delay_seconds=int(round(delay_s)))

    def extend_lease(self, task, seconds):
        """Push a claimed task's lease `seconds` further (from its current end
        or now, whichever is later)."""
        _uint(seconds, "seconds", 1, _MAX_SECONDS)
        return self._write(task, "extend_lease", lease_id=task.doc.get("lease_id"), seconds=seconds)

    def requeue(self, task):
        """Put a claimed task back to pending at once, not counted as a
        failed attempt (graceful shutdown)."""
        return self._write(task, "requeue", lease_id=task.doc.get("lease_id"))

    def finish_cancelled(self, task):
        """End a claimed task whose cancellation was requested as cancelled."""
        return self._write(task, "cancel_running", lease_id=task.doc.get("lease_id"))

    # -- administration ---------------------------------------------------------

    def cancel(self, task_id, reason=None, cancelled_by=None):
        """Cancel a pending task (a running one: see request_cancellation)."""
        return self._write(self._load(task_id), "cancel", reason=reason, cancelled_by=cancelled_by)

    def request_cancellation(self, task_id, reason=None, cancelled_by=None):
        """Cancel a task whatever its state: a pending one at once; a running
        one cooperatively: the flag is set, its handler sees it
        (`is_cancellation_requested`), and the task ends `cancelled`."""
        task = self._load(task_id)
        if task.doc.get("status", "pending") == "pending":
            try:
                return self._write(task, "cancel", reason=reason, cancelled_by=cancelled_by)
            except InvalidTransition:
                task = self._load(task)  # claimed meanwhile: fall through
        return self._write(task, "request_cancellation", reason=reason, cancelled_by=cancelled_by)

    def cancel_many(self, task_ids, reason=None, cancelled_by=None):
        """Cancel several tasks with overlapping requests.  Returns, in
        order, the cancelled Task or the error that prevented it."""
        ids = [_task_id(t) for t in task_ids]

        def one(tid):
            try:
                return self.cancel(tid, reason, cancelled_by)
            except BuquetError as exc:
                return exc
        return self._map(one, ids)

    def cancel_by_type(self, task_type, reason=None, cancelled_by=None, shards=None, progress=None):
        """Cancel every pending task of a type (a scan of the shards)."""
        results = []
        for shard in shards or self.shards:
            pending = self.list(shard, status="pending", task_type=task_type, limit=10 ** 9)
            results.extend(self.cancel_many([t.doc["id"] for t in pending], reason, cancelled_by))
            if progress:
                progress(shard, len(results))
        return results

    def mark_expired(self, task_id):
        return self._write(self._load(task_id), "expire")

    def archive(self, task_id):
        return self._write(self._load(task_id), "archive")

    def replay(self, task_id):
        """Run a finished task again from scratch."""
        return self._write(self._load(task_id), "replay")

    # -- recovery ------------------------------------------------------------------

    def recover_expired_leases(self, limit=1000):
        """Put tasks whose lease ran out back to pending (with backoff) or
        fail them when retries are spent; drop lease entries that point
        nowhere.  One LIST covers every shard (lease keys sort by expiry
        minute within a shard).  Returns the recovered Tasks."""
        now = self.now()
        now_bucket = minute_bucket(now)
        infos, _ = self.store.list_info("leases/", limit=limit)
        candidates = []
        for key, modified in infos:
            parsed = parse_index_key(key)
            if parsed is None or parsed[0] not in self.shards or parsed[1] > now_bucket:
                continue
            candidates.append((key, parsed[2], modified))
        return [t for t in self._map(lambda c: self._recover(*c, now=now), candidates) if t is not None]

    def _recover(self, key, task_id, modified, now):
        task, reason = self._read(self._key_for(task_id))
        if task is None:
            if reason is None:
                self._index_now([], [key])  # the task is gone: the entry points nowhere
            return None
        doc = task.doc
        if doc.get("status") != "running" or not doc.get("lease_expires_at"):
            if not index_key_in_flight("leases", parse_index_key(key)[1], modified, doc, now):
                self._index_now([], [key])
            return None
        expiry = parse_timestamp(doc["lease_expires_at"])
        if now <= expiry:
            if lease_key(doc["shard"], expiry, task_id) != key and not index_key_in_flight(
                    "leases", parse_index_key(key)[1], modified, doc, now):
                self._index_now([], [key])  # left behind by a lease extension
            return None
        lease = doc.get("lease_id")
        try:
            if doc.get("retry_count", 0) < doc.get("max_retries", DEFAULT_MAX_RETRIES):
                delay = backoff_ms(doc.get("retry_policy", DEFAULT_RETRY_POLICY), doc.get("retry_count", 0), self._rand())
                return self._write(task, "timeout_retry", lease_id=lease, delay_ms=delay, also_delete=[key],
                                   attempts=1)
            return self._write(task, "timeout_fail", lease_id=lease, also_delete=[key], attempts=1)
        except (LeaseMismatch, InvalidTransition, ConflictError):
            return None  # finished or extended meanwhile

    def sweeper(self, page_size=100):
        return IndexSweeper(self, page_size=page_size)


class IndexSweeper:
    """Repairs the ready and lease indexes from the task documents, a page
    at a time, resuming where the last step stopped: phase `ready/` drops
    entries of tasks that are gone or no longer pending, phase `leases/`
    likewise for running tasks, phase `tasks/` writes entries that are
    missing.  A step costs one LIST plus at most three requests per key.
    Keys it cannot read are reported in `skipped`, never deleted."""

    PHASES = ("ready/", "leases/", "tasks/")

    def __init__(self, queue, page_size=100):
        self.queue = queue
        self.page_size = _uint(page_size, "page_size", 1, 1000)
        self.phase = 0
        self.cursor = None
        self.passes = 0
        self.counts = {"checked": 0, "deleted": 0, "created": 0, "expired": 0, "skipped": 0}
        self.skipped = {}
        self._modified = {}  # index entry -> when it was written, from the page being swept

    def __repr__(self):
        return "IndexSweeper(phase=%r, cursor=%r, passes=%d, %r)" % (
            self.PHASES[self.phase], self.cursor, self.passes, self.counts)

    def step(self):
        """Sweep one page; returns True when this step finished a full pass."""
        q = self.queue
        prefix = self.PHASES[self.phase]
        if prefix == "tasks/":
            keys, truncated = q.store.list(prefix, start_after=self.cursor, limit=self.page_size)
        else:  # index entries: with their age (see index_key_in_flight)
            infos, truncated = q.store.list_info(prefix, start_after=self.cursor, limit=self.page_size)
            keys, self._modified = [k for k, _ in infos], dict(infos)
        check = (self._ready, self._lease, self._task)[self.phase]
        now = q.now()
        for outcome in q._map(lambda k: check(k, now), keys):
            self.counts["checked"] += 1
            if outcome:
                self.counts[outcome] += 1
        if truncated and keys:
            self.cursor = keys[-1]
            return False
        self.cursor = None
        self.phase = (self.phase + 1) % len(self.PHASES)
        if self.phase == 0:
            self.passes += 1
            return True
        return False

    def run_pass(self, max_steps=10 ** 6):
        """Sweep until a full pass ends (or max_steps)."""
        for _ in range(max_steps):
            if self.step():
                return True
        return False

    def _skip(self, key, reason):
        self.skipped[key] = reason
        return "skipped"

    def _index_target(self, key):
        parsed = parse_index_key(key)
        if parsed is None or parsed[0] not in self.queue.shards:
            return None, self._skip(key, "not an index key of this queue")
        task, reason = self.queue._read(self.queue._key_for(parsed[2]))
        if reason:
            return None, self._skip(key, "its task document is unreadable: " + reason)
        if task is None:
            kind, now = key.split("/", 1)[0], self.queue.now()
            if index_key_in_flight(kind, parsed[1], self._modified.get(key), None, now):
                return None, None  # a submit in flight
            self.queue._index_now([], [key])
            return None, "deleted"
        return task, None

    def _ready(self, key, now):
        task, outcome = self._index_target(key)
        if task is None:
            return outcome
        doc = task.doc
        if doc.get("status", "pending") != "pending":
            if index_key_in_flight("ready", parse_index_key(key)[1], self._modified.get(key), doc, now):
                return None
            self.queue._index_now([], [key])
            return "deleted"
        if doc.get("expires_at") and now >= parse_timestamp(doc["expires_at"]):
            try:
                self.queue._write(task, "expire", also_delete=[key], attempts=1)
                return "expired"
            except BuquetError:
                return None
        expected = index_keys(doc)
        if key not in expected:
            self.queue._index_now(expected, [key])
            return "deleted"
        return None

    def _lease(self, key, now):
        task, outcome = self._index_target(key)
        if task is None:
            return outcome
        expected = index_keys(task.doc) if task.doc.get("status") == "running" else []
        if key not in expected:
            if index_key_in_flight("leases", parse_index_key(key)[1], self._modified.get(key), task.doc, now):
                return None
            self.queue._index_now(expected, [key])
            return "deleted"
        return None

    def _task(self, key, now):
        parts = key.split("/")
        if len(parts) != 3 or not parts[2].endswith(".json"):
            return self._skip(key, "not a task key")
        task, reason = self.queue._read(key)
        if reason:
            return self._skip(key, reason)
        if task is None:
            return None
        doc = task.doc
        status = doc.get("status", "pending")
        if status == "pending" and doc.get("expires_at") and now >= parse_timestamp(doc["expires_at"]):
            try:
                self.queue._write(task, "expire", attempts=1)
                return "expired"
            except BuquetError:
                return None
        created = None
        for expected in index_keys(doc):
            if self.queue.store.get(expected) is None:
                self.queue._index_now([expected], [])
                created = "created"
        return created


# ============================================================================
# connect
# ============================================================================


def connect(bucket=None, endpoint=None, region=None, profile=None, *, store=None, local_dir=None,
            shard_prefix_len=None, credentials=None, aws_profile=None, environ=None, use_config=True,
            **client_options):
    """A Queue over the configured bucket.  Performs no network request.

    What is not passed comes from the environment (S3_BUCKET, S3_ENDPOINT,
    S3_REGION, then AWS_REGION), then from .buquet.toml (`profile` selects
    [profiles.NAME]; BUQUET_PROFILE likewise).  Credentials: `credentials`,
    else the AWS chain (`aws_profile` or AWS_PROFILE for shared files).  With
    no bucket at all, the local directory store is used (BUQUET_LOCAL_DIR,
    else ./.buquet with a one-line notice on stderr).  Inside a running
    event loop this returns an AsyncQueue (`queue = await connect()`)."""
    env = os.environ if environ is None else environ
    if store is None:
        settings = load_config(profile=profile, environ=env) if use_config else Config()
        for warning in settings.warnings:
            if "unknown" in warning:
                _warn("%s", warning)
        bucket = bucket or settings.get("bucket")
        if shard_prefix_len is None:
            shard_prefix_len = settings.get("shard_prefix_len", SHARD_PREFIX_LEN)
        if bucket is None:
            root = local_dir or settings.get("local_dir")
            if not root:  # the fallback says so; a directory the user chose does not need saying
                root = ".buquet"
                sys.stderr.write("buquet: no bucket configured (S3_BUCKET); using the local directory store at %s\n"
                                 % root)
            store = LocalStore(root)
        else:
            endpoint = endpoint or settings.get("endpoint")
            region = region or settings.get("region") or env.get("AWS_REGION") or None
            if settings.get("force_path_style") and "path_style" not in client_options:
                client_options["path_style"] = True
            store = S3Store(bucket, endpoint=endpoint, region=region, credentials=credentials,
                            profile=aws_profile or settings.get("aws_profile"), environ=env, **client_options)
    if shard_prefix_len is None:
        shard_prefix_len = SHARD_PREFIX_LEN
    queue = Queue(store, shard_prefix_len=shard_prefix_len)
    # Called inside a running event loop (`queue = await connect()`): the
    # same queue with coroutine methods.
    return AsyncQueue(queue) if _running_loop() is not None else queue


class AsyncQueue:
    """A Queue whose public methods are coroutines, each run in a thread so
    the event loop never waits on S3.  `sync` is the Queue itself; awaiting
    an AsyncQueue gives the AsyncQueue (the seed's `await connect()`)."""

    def __init__(self, queue):
        self.sync = queue

    def __repr__(self):
        return "AsyncQueue(%r)" % (self.sync,)

    def __await__(self):
        return self
        yield  # pragma: no cover - makes this a generator

    def __getattr__(self, name):
        attr = getattr(self.sync, name)
        if name.startswith("_") or not callable(attr):
            return attr

        async def call(*args, **kwargs):
            import asyncio
            from functools import partial

            return await asyncio.get_running_loop().run_in_executor(None, partial(attr, *args, **kwargs))
        call.__name__ = name
        call.__doc__ = attr.__doc__
        return call


# ============================================================================
# The worker
# ============================================================================

# Polling: a claim resets the sleep to the floor; each empty poll multiplies
# it by 1.5 up to the cap.  The cap sets the idle cost: one LIST per 2.5 s
# plus a heartbeat per 30 s and a lease check per 60 s is about 0.45
# requests/s, ~$0.6 a month of S3 requests per idle worker.
POLL_MIN = 0.1
POLL_MAX = 2.5
POLL_GROWTH = 1.5
HEARTBEAT_INTERVAL = 30.0  # within the original's 60 s health threshold
MONITOR_INTERVAL = 60.0  # lease recovery: one LIST of leases/ for all shards
SWEEP_INTERVAL = 300.0  # one sweeper page (bounded requests) this often
GRACE_PERIOD = 30.0  # seconds running handlers get to finish on shutdown
# Handler threads per process.  Handlers of a task queue mostly wait on I/O;
# 8 threads keep a process busy at S3's tens-of-ms latency while holding
# few leases and connections.  CPU-bound handlers want 1 and more processes.
CONCURRENCY = 8
_SKIP_TTL = 60.0  # seconds an id known not to be ours / not claimable is skipped
FLEET_REFRESH = 30.0  # seconds between looks at workers/ while there is a backlog
# Stale index keys wait this long to be deleted together: a stale key costs
# at most a wasted GET, and a batch of deletes is one request.
INDEX_LINGER = 0.1
FLEET_RECHECK = 1.0  # ... or this soon after another worker took a task we listed
# An id held by a worker (or whose race we lost) is skipped only briefly:
# its holder may put it back (retry, requeue on shutdown) at any moment, and
# its ready key, the only reason to read it, is normally gone within ms.
_BUSY_SKIP = 1.0


class TaskContext:
    """What a handler that takes a second argument receives."""

    def __init__(self, worker, task):
        self._worker = worker
        self.task = task

    @property
    def task_id(self):
        return self.task.doc["id"]

    @property
    def attempt(self):
        return self.task.doc.get("attempt", 0)

    @property
    def retry_count(self):
        return self.task.doc.get("retry_count", 0)

    @property
    def worker_id(self):
        return self._worker.worker_id

    def extend_lease(self, seconds):
        """Push this task's lease `seconds` further.  Raises LeaseMismatch
        when the lease was already lost (the handler should stop)."""
        self.task = self._worker._queue.extend_lease(self.task, seconds)
        return self.task.lease_expires_at

    def is_cancellation_requested(self):
        """Whether someone asked to cancel this task (one GET)."""
        latest = self._worker._queue.get(self.task_id)
        return latest is None or bool(latest.doc.get("cancel_requested")) or latest.doc.get("lease_id") != \
            self.task.doc.get("lease_id")


class _Poller:
    """The adaptive sleep between empty polls (pure apart from `rand`)."""

    def __init__(self, floor, cap, growth=POLL_GROWTH, rand=_random):
        if not 0 < floor <= cap:
            raise ValueError("poll interval bounds must satisfy 0 < poll_min <= poll_max, got %r and %r"
                             % (floor, cap))
        self.floor, self.cap, self.growth, self._rand = floor, cap, growth, rand
        self.interval = floor

    def reset(self):
        self.interval = self.floor

    def next_sleep(self):
        """The sleep after an empty poll (±10% jitter so that workers started
        together drift apart), growing toward the cap."""
        sleep = self.interval * (0.9 + 0.2 * self._rand())
        self.interval = min(self.cap, self.interval * self.growth)
        return sleep


class _Discovery:
    """Finds claimable task ids in the ready index with as few LISTs as it
    can: one LIST of `ready/` covers every shard while the index is small;
    shards not served here and minutes still to come are jumped over with
    start-after.  Candidates are kept between polls and taken in an order
    of this worker's own, so that workers sharing a backlog do not all chase
    the same first key."""

    def __init__(self, queue, shards, rand, page_size=1000, max_lists=4):
        self.queue = queue
        self.shards = sorted(set(shards))
        self.page_size = page_size
        self.max_lists = max_lists
        self._rand = rand
        self._candidates = []
        self._skip = {}  # task id -> monotonic time until which it is skipped
        self._lock = threading.Lock()
        self.lists = 0
        # (this worker's rank, live workers): each takes its own share of a
        # shared backlog first, then helps with the rest.
        self.partition = (0, 1)

    def drop(self):
        """Forget the candidates (another worker got there first: the
        listing is stale, list again rather than read stale keys)."""
        with self._lock:
            self._candidates = []

    def skip(self, task_id, seconds=_SKIP_TTL):
        self._skip[task_id] = time.monotonic() + seconds

    def unskip(self, task_id):
        self._skip.pop(task_id, None)

    def take(self):
        with self._lock:
            while self._candidates:
                key, task_id = self._candidates.pop()
                until = self._skip.get(task_id)
                if until is not None:
                    if until > time.monotonic():
                        continue
                    del self._skip[task_id]
                return key, task_id
            return None

    def refill(self, now):
        """List the ready index; returns how many candidates are due."""
        now_bucket = minute_bucket(now)
        wanted = set(self.shards)
        found = []
        # start-after a "directory" ends with "/": SeaweedFS takes
        # "ready/3" as the whole ready/3/ subtree and skips it.
        start = "ready/%s/" % self.shards[0]
        for _ in range(self.max_lists):
            keys, truncated = self.queue.store.list("ready/", start_after=start, limit=self.page_size)
            self.lists += 1
            jump = None
            for key in keys:
                parsed = parse_index_key(key)
                if parsed is None:
                    continue
                shard, bucket, task_id = parsed
                if shard in wanted and bucket <= now_bucket:
                    found.append((key, task_id))
            if not truncated or not keys:
                break
            last = parse_index_key(keys[-1]) or (keys[-1].split("/")[1], "", "")
            if last[0] not in wanted or last[1] > now_bucket:
                # The rest of that shard is not for us (or not due): skip it.
                later = [s for s in self.shards if s > last[0]]
                if not later:
                    break
                jump = "ready/%s/" % later[0]
            if found:
                break  # enough to work on; the rest waits for the next poll
            start = jump or keys[-1]
        now_mono = time.monotonic()
        with self._lock:
            self._skip = {k: v for k, v in self._skip.items() if v > now_mono}
            fresh = [c for c in found if c[1] not in self._skip]
            # This worker's share first (by the id's last hex digits, which
            # are random), the others' after, each in a random order of this
            # worker's own: workers sharing a backlog rarely try the same
            # key.  take() pops from the end.
            self._candidates = self._order(fresh)
            return len(fresh)

    def _order(self, candidates):
        rank, count = self.partition
        r = self._rand
        mine = [c for c in candidates if int(c[1][-8:], 16) % count == rank]
        others = [c for c in candidates if int(c[1][-8:], 16) % count != rank] if count > 1 else []
        mine.sort(key=lambda c: r())
        others.sort(key=lambda c: r())
        return others + mine

    def set_partition(self, rank, count):
        with self._lock:
            self.partition = (rank, count)
            self._candidates = self._order(self._candidates)


class Worker:
    """Runs handlers for task types, claiming tasks from some shards.

        worker = Worker(queue, "worker-1", ["0", "1", "2", "3"])

        @worker.task("send_email")
        def handle(input):              # or async def; or (input, ctx)
            return {"sent": True}

        worker.run()                    # or: await worker.run()

    Handlers raise RetryableError (retry with backoff), PermanentError
    (fail now) or RescheduleError(seconds); any other exception is a
    retryable failure recorded as "ExceptionName: message"; a result that is
    not JSON fails the task permanently.  A handler still running when its
    lease ends loses the task to recovery, and its late result is refused.
    """

    def __init__(self, queue, worker_id=None, shards=None, *, concurrency=CONCURRENCY, poll_min=POLL_MIN,
                 poll_max=POLL_MAX, max_tasks=None, drain=False, grace_period=GRACE_PERIOD, monitor=True,
                 heartbeat_interval=HEARTBEAT_INTERVAL, monitor_interval=MONITOR_INTERVAL,
                 sweep_interval=SWEEP_INTERVAL, scheduler=True, rand=None):
        queue = getattr(queue, "sync", queue)  # an AsyncQueue wraps a Queue
        if not isinstance(queue, Queue):
            raise TypeError("Worker needs a Queue (from buquet.connect()), got %r" % (queue,))
        self.worker_id = _check_name(worker_id or "worker-%s" % new_uuid()[:8], "worker_id")
        shards = list(queue.shards if shards is None else shards)
        if not shards:
            raise ValueError("shards must name at least one shard")
        for s in shards:
            queue._check_shard(s)
        self.shards = shards
        self.concurrency = _uint(concurrency, "concurrency", 1, 1024)
        if max_tasks is not None:
            _uint(max_tasks, "max_tasks", 1, 10 ** 12)
        self.max_tasks = max_tasks
        self.drain = bool(drain)
        self.grace_period = _seconds(grace_period, "grace_period")
        self.monitor = bool(monitor)
        self.scheduler = bool(scheduler)  # fire due schedules (any number of workers may)
        self.heartbeat_interval = _seconds(heartbeat_interval, "heartbeat_interval")
        self.monitor_interval = _seconds(monitor_interval, "monitor_interval")
        self.sweep_interval = _seconds(sweep_interval, "sweep_interval")
        if rand is None:
            import random

            rand = random.Random().random
        self._rand = rand
        self._poller = _Poller(_seconds(poll_min, "poll_min"), _seconds(poll_max, "poll_max"), rand=self._rand)
        # Our own Queue over the same store: index upkeep goes to a background
        # thread here without changing the caller's queue.
        self._queue = Queue(queue.store, shard_prefix_len=queue.shard_prefix_len, rand=self._rand)
        self._queue.run_index_ops = self._defer_index_ops
        self._discovery = _Discovery(self._queue, shards, self._rand)
        self.handlers = {}
        self._hooks = {"on_startup": [], "on_shutdown": [], "on_success": [], "on_error": []}
        self._running = {}  # task id -> Task, for heartbeats and shutdown requeue
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._poll_lock = threading.Lock()
        self._quiet_until = 0.0  # monotonic time before which an empty poll is not repeated
        self._poll_error = None  # in drain mode: the poll that failed, raised by run()
        self._listed_empty = False  # the last listing found nothing due (drain mode ends there)
        self._fleet_due = 0.0  # monotonic time of the next look at workers/ (when busy)
        self._stopping = threading.Event()
        self._claimed = 0
        self.completed = 0
        self.failed = 0
        self._index_jobs = []  # lists of stale index keys to delete, oldest first
        self._index_busy = set()  # the keys the index thread is deleting now
        self._index_cond = threading.Condition()
        self._index_thread = None
        self._index_stop = False
        self._loop = None  # the event loop coroutine handlers run on
        self._own_loop = None
        self._started_at = None

    def __repr__(self):
        return "Worker(%r, shards=%r, handlers=%r)" % (self.worker_id, self.shards, sorted(self.handlers))

    # -- registration --------------------------------------------------------------

    def task(self, task_type):
        """Decorator registering a handler (function or coroutine function)
        for a task type."""
        _check_name(task_type, "task_type")

        def register(fn):
            if not callable(fn):
                raise TypeError("a handler must be callable, got %r" % (fn,))
            self.handlers[task_type] = fn
            return fn
        return register

    def _hook(name):
        def register(self, fn):
            self._hooks[name].append(fn)
            return fn
        register.__name__ = name
        register.__doc__ = "Decorator: call fn at %s." % name.replace("on_", "").replace("_", " ")
        return register

    on_startup = _hook("on_startup")  # fn(worker)
    on_shutdown = _hook("on_shutdown")  # fn(worker)
    on_success = _hook("on_success")  # fn(task, output)
    on_error = _hook("on_error")  # fn(task, exception)
    del _hook

    def _call_hooks(self, name, *args):
        for fn in self._hooks[name]:
            try:
                result = fn(*args)
                if _is_awaitable(result):
                    self._await(result)
            except Exception as exc:  # a hook must not take the worker down
                _warn("%s hook %r failed: %s: %s", name, fn, type(exc).__name__, exc)

    # -- the step ------------------------------------------------------------------

    def step(self):
        """Claim and run at most one task.  Returns (ran, seconds to wait
        before the next step)."""
        if self._stopping.is_set():
            return False, 0.0
        with self._lock:
            if self.max_tasks is not None and self._claimed >= self.max_tasks:
                return False, 0.0
        task = self._claim_one()
        if task is None:
            return False, max(0.0, self._quiet_until - time.monotonic())
        self._poller.reset()
        self._quiet_until = 0.0
        self._execute(task)
        return True, 0.0

    def _claim_one(self):
        q = self._queue
        types = set(self.handlers)
        for _ in range(2):
            candidate = self._discovery.take()
            if candidate is None:
                # One LIST at a time, and none until the sleep after an empty
                # one has passed: idle handler slots share one poll instead
                # of each listing on its own timer.
                with self._poll_lock:
                    candidate = self._discovery.take()
                    if candidate is None:
                        if time.monotonic() < self._quiet_until:
                            return None
                        try:
                            found = self._discovery.refill(q.now())
                            if found > 1 and time.monotonic() >= self._fleet_due:
                                self._refresh_fleet()
                        except BuquetError as exc:  # S3 unreachable: back off, keep the slots alive
                            _warn("poll failed: %s", exc)
                            if self.drain:  # "nothing ready" is unknown: a drain run has failed
                                self._poll_error = exc
                            found = 0
                        self._listed_empty = not found
                        if not found:
                            self._quiet_until = time.monotonic() + self._poller.next_sleep()
                            return None
                        continue
            while candidate is not None:
                if self._stopping.is_set():
                    return None
                key, task_id = candidate
                task = self._try_claim(key, task_id, types)
                if task is not None:
                    return task
                candidate = self._discovery.take()
        return None

    def _refresh_fleet(self):
        """This worker's rank among the live workers (heartbeats younger
        than three intervals), so that discovery takes its own share of a
        backlog first.  One LIST of workers/, at most every FLEET_REFRESH
        seconds and only when there is a backlog: an idle worker pays
        nothing for it."""
        self._fleet_due = time.monotonic() + FLEET_REFRESH
        lister = getattr(self._queue.store, "list_info", None)
        if lister is None:
            return
        horizon = self._queue.now() - timedelta(seconds=3 * self.heartbeat_interval)
        entries, _ = lister("workers/", limit=1000)
        live = {self.worker_id}
        for key, modified in entries:
            if key.endswith(".json") and (modified is None or modified >= horizon):
                live.add(key[len("workers/"):-len(".json")])
        ranked = sorted(live)
        self._discovery.set_partition(ranked.index(self.worker_id), len(ranked))

    def _try_claim(self, key, task_id, types):
        q = self._queue
        with self._lock:
            if self.max_tasks is not None and self._claimed >= self.max_tasks:
                return None
            self._claimed += 1
        task, wait, taken = None, 0.0, False
        try:
            task, wait, taken = q._claim(task_id, self.worker_id, types, key)
        except BuquetError as exc:
            _warn("claim of %s failed: %s", task_id, exc)
        finally:
            if task is None:
                with self._lock:
                    self._claimed -= 1
        if task is None:
            # Not ours (other type), finished, held by a worker, or not yet
            # due: skip it for as long as reading it again cannot help,
            # instead of reading it every poll.
            if wait is None:
                self._discovery.skip(task_id, _SKIP_TTL)
            else:
                self._discovery.skip(task_id, min(wait or _BUSY_SKIP, _SKIP_TTL))
            if taken:
                # Another worker got there first: the listing is going stale
                # under us; list again (and look at the fleet again) rather
                # than read more of it.
                self._discovery.drop()
                self._fleet_due = min(self._fleet_due, time.monotonic() + FLEET_RECHECK)
        else:
            # Ours now: sibling slots must not re-read it from a ready key
            # whose deletion is still queued (unskipped when it finishes).
            self._discovery.skip(task_id, _SKIP_TTL)
        return task

    # -- running a handler -------------------------------------------------------------

    def _execute(self, task):
        q = self._queue
        task_id = task.doc["id"]
        with self._lock:
            self._running[task_id] = task
        ctx = TaskContext(self, task)
        try:
            handler = self.handlers[task.doc["task_type"]]
            try:
                output = _call_handler(handler, q.load_input(task), ctx, self._await)
            except RescheduleError as exc:
                self._finish(ctx, q.reschedule, exc.delay_seconds, error=exc)
            except PermanentError as exc:
                self._finish(ctx, q.fail, _error_text(exc), error=exc)
            except Exception as exc:  # any other failure: retry with backoff
                self._finish(ctx, q.retry, _error_text(exc), error=exc)
            else:
                try:
                    _check_json(output, "handler result")
                except ValueError as exc:  # retrying would give the same result
                    self._finish(ctx, q.fail, "PermanentError: %s" % exc, error=exc)
                else:
                    self._finish(ctx, q.complete, output, output=output)
        finally:
            with self._lock:
                if self._running.get(task_id) is task:  # not a newer attempt of the same task
                    del self._running[task_id]
                self._wake.notify_all()

    def _finish(self, ctx, operation, arg, error=None, output=None):
        try:
            final = operation(ctx.task, arg)
        except LeaseMismatch as exc:
            _warn("task %s: result dropped: %s", ctx.task_id, exc)
            return
        except InvalidTransition as exc:
            _warn("task %s: result dropped: %s", ctx.task_id, exc)
            return
        except BuquetError as exc:
            _warn("task %s: could not record the result: %s", ctx.task_id, exc)
            return
        status = final.doc.get("status")
        if status == "pending":
            # Retried or rescheduled: ours to claim again when due (it was
            # skipped here while it ran; a finished one stays skipped, so its
            # ready key, deleted in the background, is not read again).
            self._discovery.unskip(ctx.task_id)
        if status == "completed":
            with self._lock:
                self.completed += 1
            self._call_hooks("on_success", final, output)
        else:
            if status == "failed":
                with self._lock:
                    self.failed += 1
            if error is not None:
                self._call_hooks("on_error", final, error)

    # -- background index upkeep -------------------------------------------------------

    def _defer_index_ops(self, puts, deletes, strict=False):
        """Index upkeep after a transition.  New keys are written now: a
        lease key (claim) or ready key (retry, requeue) still queued when the
        process dies would hide the task from the monitor and from workers
        until the sweeper comes by, hours later on a big bucket.  Deletes of
        keys that became stale wait for the background thread: a stale key
        is a hint that costs a GET, never a lost task."""
        with self._index_cond:
            background = self._index_thread is not None and not self._index_stop
            if background and puts:
                # A delete queued by an earlier transition of the same task
                # (same minute, same key) must not undo this write.
                written = set(puts)
                self._index_jobs = [[k for k in job if k not in written] for job in self._index_jobs]
                while self._index_busy & written:
                    self._index_cond.wait()
            if background and deletes:
                self._index_jobs.append(list(deletes))
                self._index_cond.notify_all()
        # Without a background thread (step() called outside run(), or a
        # handler finishing after shutdown) the deletes are done now too.
        self._queue._index_now(puts, [] if background else deletes, strict)

    def _index_loop(self):
        while True:
            with self._index_cond:
                while not self._index_jobs:
                    if self._index_stop:
                        return
                    self._index_cond.wait()
                if not self._index_stop:
                    # Let a busy worker's deletes gather: one DeleteObjects
                    # request then removes many stale keys at once.
                    self._index_cond.wait(INDEX_LINGER)
                deletes = list(dict.fromkeys(k for job in self._index_jobs for k in job))
                self._index_jobs = []
                self._index_busy = set(deletes)
            if deletes:
                self._queue._delete_index_keys(deletes)
            with self._index_cond:
                self._index_busy = set()
                self._index_cond.notify_all()

    def _flush_index(self):
        with self._index_cond:
            self._index_stop = True
            self._index_cond.notify_all()
        if self._index_thread is not None:
            self._index_thread.join()

    # -- housekeeping: heartbeat and monitor ---------------------------------------------

    def _heartbeat(self):
        now = self._queue.now()
        with self._lock:
            running = list(self._running)
        doc = {
            "worker_id": self.worker_id, "started_at": format_timestamp(self._started_at or now),
            "last_heartbeat": format_timestamp(now), "shards": self.shards,
            "current_task": running[0] if running else None, "tasks_completed": self.completed,
            "tasks_failed": self.failed, "running_tasks": running, "concurrency": self.concurrency,
            "pid": os.getpid(),
        }
        try:
            self._queue.store.put(worker_key(self.worker_id), dumps(doc).encode("utf-8"))
        except BuquetError as exc:
            _warn("heartbeat failed: %s", exc)

    def _housekeeping(self):
        """Heartbeats and, with the monitor on, lease recovery and sweeping,
        each on its own timer."""
        sweeper = self._queue.sweeper()
        scheduler = Scheduler(self._queue)
        due = {"heartbeat": 0.0, "monitor": self.monitor_interval * self._rand(), "sweep": self.sweep_interval,
               "schedule": 0.0}
        started = time.monotonic()
        while not self._stopping.wait(min(1.0, self.heartbeat_interval)):
            elapsed = time.monotonic() - started
            if elapsed >= due["heartbeat"]:
                due["heartbeat"] = elapsed + self.heartbeat_interval
                self._heartbeat()
            try:
                if self.scheduler and elapsed >= due["schedule"]:
                    _, wait = scheduler.tick()
                    due["schedule"] = elapsed + wait + 0.05
                if self.monitor and elapsed >= due["monitor"]:
                    due["monitor"] = elapsed + self.monitor_interval
                    for task in self._queue.recover_expired_leases():
                        self._discovery.unskip(task.doc["id"])  # claimable again here too
                if self.monitor and elapsed >= due["sweep"]:
                    due["sweep"] = elapsed + self.sweep_interval
                    sweeper.step()
            except Exception as exc:  # one duty failing must not stop heartbeats and recovery
                _warn("housekeeping: %s: %s", type(exc).__name__, exc)

    # -- running -----------------------------------------------------------------------

    def stop(self):
        """Stop claiming; running handlers get the grace period to finish.
        Called while no run is in progress, it ends the next run at once."""
        self._stopping.set()
        with self._lock:
            self._wake.notify_all()

    def run(self, *, install_signal_handlers=True):
        """Run until stopped (signal, `stop()`, `max_tasks`, or an empty
        queue in drain mode).  Inside a running event loop this returns a
        coroutine (`await worker.run()`), and coroutine handlers run on that
        loop; otherwise it blocks."""
        loop = _running_loop()
        if loop is not None:
            return self._run_async(loop, install_signal_handlers)
        return self._run(install_signal_handlers)

    async def _run_async(self, loop, install_signal_handlers):
        import signal

        self._loop = loop
        if install_signal_handlers:
            for sig in (signal.SIGINT, signal.SIGTERM):
                try:
                    loop.add_signal_handler(sig, self._on_signal, sig, None)
                except (NotImplementedError, RuntimeError):
                    pass
        try:
            return await loop.run_in_executor(None, self._run, False)
        finally:
            self._loop = None  # a later run() must not send coroutines to this loop
            if install_signal_handlers:
                for sig in (signal.SIGINT, signal.SIGTERM):
                    try:
                        loop.remove_signal_handler(sig)
                    except (NotImplementedError, RuntimeError):
                        pass

    def _on_signal(self, signum, frame):
        if self._stopping.is_set():
            # A second signal: leave now; the leases bring the tasks back.
            os._exit(128 + int(signum))
        self.stop()

    def _run(self, install_signal_handlers=True):
        if not self.handlers:
            raise BuquetError("worker %s has no handlers: register one with @worker.task(\"type\")"
                              % self.worker_id)
        previous = {}
        if install_signal_handlers and threading.current_thread() is threading.main_thread():
            import signal

            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.signal(sig, self._on_signal)
        self._poll_error = None
        # A run looks at once, whatever the last one's poll timer said (a warm
        # Lambda invoked again a second after draining must not skip its look).
        self._quiet_until = 0.0
        self._listed_empty = False
        self._poller.reset()
        with self._lock:  # max_tasks and the counts are per run (per Lambda invocation)
            self._claimed = self.completed = self.failed = 0
        self._index_stop = False
        self._index_thread = threading.Thread(target=self._index_loop, name="buquet-index", daemon=True)
        self._index_thread.start()
        self._started_at = self._queue.now()
        self._heartbeat()
        housekeeping = threading.Thread(target=self._housekeeping, name="buquet-housekeeping", daemon=True)
        housekeeping.start()
        self._call_hooks("on_startup", self)
        try:
            slots = [threading.Thread(target=self._slot_loop, name="buquet-handler-%d" % i, daemon=True)
                     for i in range(self.concurrency)]
            for t in slots:
                t.start()
            self._supervise(slots)
        finally:
            self._shutdown(housekeeping)
            if previous:
                import signal

                for sig, handler in previous.items():
                    signal.signal(sig, handler)
            # Cleared here, not at the start: a stop() that comes before a run
            # (a watchdog, a signal during start-up) ends that run at once.
            self._stopping.clear()
        if self._poll_error is not None:
            raise self._poll_error
        return 0

    def _slot_loop(self):
        while not self._stopping.is_set():
            ran, wait = self.step()
            if ran:
                continue
            with self._lock:
                if self.max_tasks is not None and self._claimed >= self.max_tasks:
                    return
                # Drained only when the last listing found nothing due: a step
                # that ended on a finished, taken or unreadable candidate says
                # nothing about the rest of the ready index.
                if self.drain and not self._running and self._listed_empty:
                    return
                self._wake.wait(wait)

    def _supervise(self, slots):
        while any(t.is_alive() for t in slots):
            if self._stopping.is_set():
                deadline = time.monotonic() + self.grace_period
                for t in slots:
                    t.join(max(0.0, deadline - time.monotonic()))
                return
            for t in slots:
                t.join(0.2)

    def _shutdown(self, housekeeping):
        self._stopping.set()
        with self._lock:
            unfinished = list(self._running.values())
        for task in unfinished:
            # Past the grace period: back to pending at once, no attempt lost.
            try:
                self._queue.requeue(task)
            except BuquetError as exc:
                _warn("could not requeue task %s: %s", task.doc["id"], exc)
        self._flush_index()
        housekeeping.join(timeout=5)
        try:
            self._queue.store.delete(worker_key(self.worker_id))
        except BuquetError as exc:
            _warn("could not deregister: %s", exc)
        self._call_hooks("on_shutdown", self)
        if self._own_loop is not None:
            self._own_loop.call_soon_threadsafe(self._own_loop.stop)
            self._own_loop = None

    # -- coroutines ----------------------------------------------------------------------

    def _await(self, coro):
        """Run a coroutine on the worker's event loop from a handler thread."""
        import asyncio

        loop = self._loop
        if loop is None:
            with self._lock:
                if self._own_loop is None:
                    self._own_loop = asyncio.new_event_loop()
                    threading.Thread(target=self._own_loop.run_forever, name="buquet-asyncio", daemon=True).start()
                loop = self._own_loop
        return asyncio.run_coroutine_threadsafe(coro, loop).result()

    # -- AWS Lambda --------------------------------------------------------------------

    def lambda_handler(self, event=None, context=None, *, margin=None):
        """An AWS Lambda handler: drain the queue until the invocation's
        remaining time runs low, then requeue what is still running.

        `margin` (seconds kept in reserve) defaults to 10% of the invocation
        time, at least 5 s, so results and requeues are written in time."""
        remaining_ms = getattr(context, "get_remaining_time_in_millis", None)
        budget = remaining_ms() / 1000.0 if remaining_ms else 900.0
        reserve = margin if margin is not None else max(5.0, budget * 0.1)
        deadline = time.monotonic() + budget - reserve
        self.drain = True
        self._stopping.clear()  # a late timer of the last invocation is no stop() of this one
        timer = threading.Timer(max(0.0, budget - reserve), self.stop)
        timer.daemon = True
        timer.start()
        saved = self.grace_period
        self.grace_period = max(0.0, min(saved, reserve / 2.0))
        try:
            self._run(install_signal_handlers=False)
        finally:
            timer.cancel()
            self.grace_period = saved
        return {"worker_id": self.worker_id, "completed": self.completed, "failed": self.failed,
                "stopped_early": time.monotonic() >= deadline}


def _is_awaitable(value):
    return hasattr(value, "__await__")


def _running_loop():
    asyncio = sys.modules.get("asyncio")  # not imported: no loop can be running
    if asyncio is None:
        return None
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _call_handler(handler, input, ctx, run_coroutine):
    if _wants_context(handler):
        result = handler(input, ctx)
    else:
        result = handler(input)
    if _is_awaitable(result):
        result = run_coroutine(result)
    return result


def _wants_context(handler):
    code = getattr(handler, "__code__", None)
    if code is None:
        return False
    positional = code.co_argcount - (1 if getattr(handler, "__self__", None) is not None else 0)
    return positional >= 2 or bool(code.co_flags & 0x04)  # two parameters, or *args


def _error_text(exc):
    text = str(exc)
    return "%s: %s" % (type(exc).__name__, text) if text else type(exc).__name__


# ============================================================================
# Schedules: recurring tasks, each due time submitted exactly once
# ============================================================================
#
# schedules/{id}.json holds the schedule (the original's fields, plus an
# optional `timezone`); schedules/{id}/last_run.json the last run.  A tick
# submits the due run with the idempotency key `schedule:{id}:{due unix
# seconds}` (the original's key), so any number of schedulers racing on the
# same due time yield one task; the last-run record then moves forward by
# compare-and-swap.  Policies:
#   * a new schedule waits for its first due time after creation;
#   * after downtime, missed runs are caught up once: the latest due time
#     that has passed fires, the earlier ones are skipped.
# Cron expressions are standard crontab(5) (cron.py); the original read
# day-of-week 1-7 from Sunday, so schedules with a day-of-week field mean
# different days in the two implementations (see the README).

SCHEDULE_TICK = 60.0  # seconds between looks at the schedules; runs fire on time in between
SCHEDULE_RETRY = 5.0  # seconds before a look that failed is tried again, within the due minute
_SCHEDULE_FIELDS = ("id", "task_type", "input", "cron", "enabled", "timeout_seconds", "max_retries",
                    "created_at", "updated_at")
_MAX_CATCH_UP_STEPS = 100000  # due times walked to find the latest missed one


class ScheduleError(BuquetError):
    """A schedule operation that cannot be done (exists, missing, bad cron)."""


def schedule_key(schedule_id):
    return "schedules/%s.json" % schedule_id


def last_run_key(schedule_id):
    return "schedules/%s/last_run.json" % schedule_id


def _cron_for(expr, tz):
    import cron

    try:
        return cron.Cron(expr, tz)
    except cron.CronError as exc:
        raise ScheduleError(str(exc)) from None


class Schedule:
    """A schedule as read from the bucket; the document's fields as
    attributes (timestamps as datetimes)."""

    __slots__ = ("doc", "etag", "_cron")

    def __init__(self, doc, etag=None):
        self.doc = doc
        self.etag = etag
        self._cron = None

    def __getattr__(self, name):
        if name in ("created_at", "updated_at"):
            value = self.doc.get(name)
            return parse_timestamp(value) if value else None
        if name == "enabled":
            return self.doc.get("enabled", True)
        if name in _SCHEDULE_FIELDS or name == "timezone":
            return self.doc.get(name)
        raise AttributeError(name)

    def __repr__(self):
        return "Schedule(id=%r, task_type=%r, cron=%r, enabled=%r)" % (
            self.doc.get("id"), self.doc.get("task_type"), self.doc.get("cron"), self.enabled)

    @property
    def cron_schedule(self):
        if self._cron is None:
            self._cron = _cron_for(self.doc["cron"], self.doc.get("timezone"))
        return self._cron

    def next_runs(self, after, n=5):
        """The next `n` due times strictly after `after`, in the schedule's
        time zone."""
        out = []
        for _ in range(n):
            after = self.cron_schedule.next_after(after)
            out.append(after)
        return out

    def to_dict(self):
        return json.loads(dumps(self.doc))


def _decode_schedule(body, etag):
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ScheduleError("schedule is not JSON: %s" % exc) from None
    except RecursionError:
        raise ScheduleError("schedule is not JSON: nested too deeply") from None
    if not isinstance(doc, dict):
        raise ScheduleError("schedule must be a JSON object")
    for name in ("id", "task_type", "cron"):
        if not isinstance(doc.get(name), str):
            raise ScheduleError("schedule field %s must be a string" % name)
    if "input" not in doc:
        raise ScheduleError("schedule field input is missing")
    # The original rejects a schedule whose enabled is not a boolean; "false"
    # would be truthy here and fire a schedule meant to be off.
    if not isinstance(doc.get("enabled", True), bool):
        raise ScheduleError("schedule field enabled must be true or false, got %r" % (doc["enabled"],))
    if doc.get("timezone") is not None and not isinstance(doc["timezone"], str):
        raise ScheduleError("schedule field timezone must be a time zone name, got %r" % (doc["timezone"],))
    return Schedule(doc, etag)


def due_run(cron_schedule, after, now):
    """The due time to fire now, or None: the latest due time in
    (after, now] (so missed runs are caught up once), pure."""
    due = cron_schedule.next_after(after)
    if due > now:
        return None
    # After a long downtime, start the walk near `now` (the window doubles
    # until it holds a due time), so that the latest due time is found in
    # a few steps: walking from `after` could run out of steps and fire an
    # earlier run, then another at each following tick.
    back = timedelta(hours=1)
    while now - back > due:
        candidate = cron_schedule.next_after(now - back)
        if candidate <= now:
            due = candidate
            break
        back *= 2
    for _ in range(_MAX_CATCH_UP_STEPS):
        following = cron_schedule.next_after(due)
        if following > now:
            return due
        due = following
    return due


class _Schedules:
    """The schedule operations of a Queue (mixed into it below)."""

    def create_schedule(self, schedule_id, task_type, input=None, cron=None, *, timezone=None, timeout=None,
                        max_retries=None, enabled=True):
        """Create a schedule; ScheduleError if one with this id exists.  The
        first run is the first due time after now."""
        _check_name(schedule_id, "schedule id")
        _check_name(task_type, "task_type")
        _check_json(input, "input")
        if not isinstance(cron, str):
            raise ValueError("cron must be a cron expression string, got %r" % (cron,))
        # Validated as it will be stored: a tzinfo is stored by name, and one
        # without an IANA name (a fixed offset) could never be read back.
        if timezone is not None and not isinstance(timezone, str):
            timezone = str(timezone)
        _cron_for(cron, timezone)  # validates both
        if timeout is not None:
            _uint(timeout, "timeout", 1, _U64)
        if max_retries is not None:
            _uint(max_retries, "max_retries")
        ts = format_timestamp(self.now())
        doc = {"id": schedule_id, "task_type": task_type, "input": input, "cron": cron, "enabled": bool(enabled),
               "timeout_seconds": timeout, "max_retries": max_retries, "created_at": ts, "updated_at": ts}
        if timezone is not None:
            doc["timezone"] = timezone
        try:
            etag = self._put_decided(schedule_key(schedule_id), dumps(doc).encode("utf-8"), if_none_match=True)
        except ConflictError:
            raise ScheduleError("Schedule already exists: %s" % schedule_id) from None
        return Schedule(doc, etag)

    def _put_decided(self, key, body, **condition):
        """A conditional put whose lost reply is decided by a re-read: our
        bytes there mean it was applied; anything else, that it lost."""
        try:
            return self.store.put(key, body, **condition)
        except UncertainWrite as exc:
            blob = self.store.get(key)
            if blob is not None and blob.body == body:
                return blob.etag
            raise ConflictError(str(exc)) from None

    def get_schedule(self, schedule_id):
        _check_name(schedule_id, "schedule id")  # no schedule can have another id
        blob = self.store.get(schedule_key(schedule_id))
        return None if blob is None else _decode_schedule(blob.body, blob.etag)

    def _schedule(self, schedule_id):
        found = self.get_schedule(schedule_id)
        if found is None:
            raise ScheduleError("no schedule %r" % (schedule_id,))
        return found

    def list_schedules(self):
        """Every readable schedule, by id; unreadable ones are reported in
        `skipped` and left alone."""
        keys = []
        start = None
        while True:
            page, truncated = self.store.list("schedules/", start_after=start, limit=1000)
            keys.extend(k for k in page if k.lower().endswith(".json") and not k.endswith("/last_run.json"))
            if not truncated or not page:
                break
            start = page[-1]

        def read(key):
            blob = self.store.get(key)
            if blob is None:
                return None
            try:
                return _decode_schedule(blob.body, blob.etag)
            except ScheduleError as exc:
                if self.skipped.get(key) != str(exc):
                    _warn("skipping unreadable schedule %s: %s", key, exc)
                self.skipped[key] = str(exc)
                return None
        return [s for s in self._map(read, keys) if s is not None]

    def delete_schedule(self, schedule_id):
        self._schedule(schedule_id)
        self.store.delete(schedule_key(schedule_id))
        self.store.delete(last_run_key(schedule_id))

    def _set_enabled(self, schedule_id, enabled):
        for _ in range(8):
            current = self._schedule(schedule_id)
            doc = dict(current.doc, enabled=enabled, updated_at=format_timestamp(self.now()))
            try:
                etag = self._put_decided(schedule_key(schedule_id), dumps(doc).encode("utf-8"), if_match=current.etag)
                return Schedule(doc, etag)
            except ConflictError:
                continue
        raise ConflictError("schedule %s keeps changing; gave up" % schedule_id)

    def enable_schedule(self, schedule_id):
        return self._set_enabled(schedule_id, True)

    def disable_schedule(self, schedule_id):
        return self._set_enabled(schedule_id, False)

    def _submit_for(self, schedule, **extra):
        doc = schedule.doc
        return self.submit(
            doc["task_type"], doc.get("input"),
            timeout=doc.get("timeout_seconds") or DEFAULT_TIMEOUT,
            max_retries=DEFAULT_MAX_RETRIES if doc.get("max_retries") is None else doc["max_retries"],
            **extra)

    def trigger_schedule(self, schedule_id):
        """Submit one run now (no effect on the schedule's own runs)."""
        return self._submit_for(self._schedule(schedule_id))

    def get_last_run(self, schedule_id):
        """The last-run record (dict) or None."""
        blob = self.store.get(last_run_key(schedule_id))
        if blob is None:
            return None
        try:
            record = json.loads(blob.body)
        except (ValueError, RecursionError):
            return None
        return record if isinstance(record, dict) else None

    def _tick_one(self, schedule, now):
        sid = schedule.doc["id"]
        blob = self.store.get(last_run_key(sid))
        record = None
        if blob is not None:
            try:
                record = json.loads(blob.body)
            except (ValueError, RecursionError):
                record = None
        after = None
        if isinstance(record, dict):
            for name in ("last_due_at", "last_run_at"):  # ours, then the original's
                try:
                    after = parse_timestamp(record[name])
                    break
                except (KeyError, ValueError, TypeError):
                    continue
        # Due times before the schedule's creation or its last enable/disable
        # (`updated_at`) never fire: a new schedule waits for its first due
        # time, and a re-enabled one for its next (not the runs missed while
        # it was disabled).
        since = None
        for name in ("updated_at", "created_at"):
            try:
                since = since or getattr(schedule, name)
            except ValueError:
                continue  # unreadable: try the other one
        if after is None or (since is not None and since > after):
            after = since or now
        due = due_run(schedule.cron_schedule, after, now)
        if due is None:
            return None
        stamp = int(due.timestamp())
        task = self._submit_for(schedule, idempotency_key="schedule:%s:%d" % (sid, stamp))
        following = schedule.cron_schedule.next_after(due)
        new = {"schedule_id": sid, "last_run_at": format_timestamp(now), "last_task_id": task.doc["id"],
               "next_run_at": format_timestamp(following), "last_due_at": format_timestamp(due)}
        try:
            if blob is None:
                self.store.put(last_run_key(sid), dumps(new).encode("utf-8"), if_none_match=True)
            else:
                self.store.put(last_run_key(sid), dumps(new).encode("utf-8"), if_match=blob.etag)
        except ConflictError:
            pass  # another scheduler recorded this run (same task, by the key)
        return task


# Schedule operations are Queue methods; they are defined here so that this
# section holds all of scheduling.
for _name in [n for n in vars(_Schedules) if not n.startswith("__")]:
    setattr(Queue, _name, vars(_Schedules)[_name])
del _name


class Scheduler:
    """The scheduler loop: `tick()` submits every due run once and says how
    long to wait; `run()` loops until stopped.  It runs inside `buquet
    worker` (unless disabled) and alone as `buquet schedule run`; any number
    may run at once."""

    def __init__(self, queue, *, interval=SCHEDULE_TICK):
        self.queue = getattr(queue, "sync", queue)
        self.interval = _seconds(interval, "interval")
        self.fired = 0

    def tick(self, now=None):
        """(submitted Tasks, seconds until the next look)."""
        q = self.queue
        now = now or q.now()
        fired = []
        wait = self.interval
        for schedule in q.list_schedules():
            if not schedule.enabled:
                continue
            try:
                task = q._tick_one(schedule, now)
                if task is not None:
                    fired.append(task)
                upcoming = schedule.cron_schedule.next_after(now)
                wait = min(wait, max(0.0, (upcoming - now).total_seconds()))
            except (BuquetError, ValueError) as exc:
                # Soon again: the next minute's look would find only the next
                # due time, and this one would be lost.
                _warn("schedule %s: %s", schedule.doc.get("id"), exc)
                wait = min(wait, SCHEDULE_RETRY)
        self.fired += len(fired)
        return fired, wait

    def run(self, stop=None):
        stop = stop or threading.Event()
        while not stop.is_set():
            try:
                _, wait = self.tick()
            except BuquetError as exc:
                _warn("scheduler: %s", exc)
                wait = min(self.interval, SCHEDULE_RETRY)
            # Wake just after the due minute starts, not before it.
            stop.wait(wait + 0.05)


# ============================================================================
# Configuration: .buquet.toml, environment, flags
# ============================================================================
#
# Precedence, highest first: command-line flags, environment variables, the
# selected profile ([profiles.NAME]), [default]; files merged as the original
# merges them: --config / BUQUET_CONFIG over ./.buquet.toml (found in the
# current directory or a parent) over the user file
# ($XDG_CONFIG_HOME/buquet/config.toml).  Every key of the original's file is
# accepted; keys that have no effect here say so in `config validate`, and
# unknown keys are reported.

# table -> {key: (type, effect)}; effect None means accepted for
# compatibility with the original, without effect here.
CONFIG_SCHEMA = {
    "default": {
        "bucket": (str, "bucket"), "region": (str, "region"), "endpoint": (str, "endpoint"),
        "local_dir": (str, "local_dir"), "aws_profile": (str, "aws_profile"),
        "force_path_style": (bool, "force_path_style"),
    },
    "queue": {"shard_prefix_len": (int, "shard_prefix_len")},
    "worker": {
        "shards": (list, "shards"), "concurrency": (int, "concurrency"),
        "grace_period_secs": ((int, float), "grace_period"), "heartbeat_interval_secs": ((int, float), "heartbeat"),
        "scheduler": (bool, "scheduler"), "monitor": (bool, "monitor"),
        "poll_interval_ms": (int, None), "index_mode": (str, None),
    },
    "worker.polling": {
        "strategy": (str, "poll_strategy"), "min_interval_ms": (int, "poll_min_ms"),
        "max_interval_ms": (int, "poll_max_ms"), "backoff_multiplier": ((int, float), None),
        "interval_ms": (int, "poll_interval_ms"),
    },
    "worker.shard_leasing": {
        "enabled": (bool, None), "shards_per_worker": (int, None), "lease_ttl_secs": (int, None),
        "renewal_interval_secs": (int, None),
    },
    "monitor": {
        "check_interval_secs": ((int, float), "monitor_interval"), "sweep_interval_secs": ((int, float), "sweep_interval"),
        "max_tasks_per_scan": (int, None), "max_objects_per_sweep": (int, None), "sweep_mode": (str, None),
    },
}

# Environment variables -> setting, with the value's parser.
CONFIG_ENV = {
    "S3_BUCKET": "bucket", "S3_ENDPOINT": "endpoint", "S3_REGION": "region", "BUQUET_LOCAL_DIR": "local_dir",
    "S3_FORCE_PATH_STYLE": "force_path_style", "BUQUET_SHARDS": "shards", "BUQUET_SHARD_PREFIX_LEN": "shard_prefix_len",
    "BUQUET_CONCURRENCY": "concurrency", "BUQUET_POLLING_MIN_INTERVAL_MS": "poll_min_ms",
    "BUQUET_POLLING_MAX_INTERVAL_MS": "poll_max_ms", "BUQUET_MONITOR_CHECK_INTERVAL": "monitor_interval",
    "BUQUET_MONITOR_SWEEP_INTERVAL": "sweep_interval", "BUQUET_NO_MONITOR": "no_monitor",
}
# The original's variables with no effect here, accepted quietly.
CONFIG_ENV_IGNORED = ("BUQUET_ALLOW_NO_VERSIONING", "BUQUET_INDEX_MODE", "BUQUET_READY_PAGE_SIZE",
                      "BUQUET_LOG_SCAN_PAGE_SIZE", "BUQUET_POLL_INTERVAL_MS", "BUQUET_POLLING_STRATEGY",
                      "BUQUET_POLLING_BACKOFF_MULTIPLIER", "BUQUET_SHARD_LEASING",
                      "BUQUET_SHARD_LEASING_SHARDS_PER_WORKER", "BUQUET_SHARD_LEASING_TTL_SECS",
                      "BUQUET_SHARD_LEASING_RENEW_SECS", "BUQUET_SWEEPER_MAX_OBJECTS_PER_SWEEP",
                      "BUQUET_SWEEPER_MODE", "BUQUET_MONITOR_WORKER_HEALTH_THRESHOLD",
                      "BUQUET_MONITOR_SWEEP_PAGE_SIZE", "BUQUET_MONITOR_MAX_TASKS_PER_SCAN")


class ConfigError(BuquetError):
    """A configuration file or value that cannot be used."""


def _hex_shards(value):
    return bool(value) and all(isinstance(s, str) and 0 < len(s) <= 4 and not s.strip("0123456789abcdef")
                               for s in value)


# setting -> (test, what is expected): ranges, checked wherever a value comes
# from (a file or a variable), so that none is clamped or read as "unset".
_SETTING_RANGES = {
    "shard_prefix_len": (lambda v: 1 <= v <= 4, "an integer 1..4"),
    "concurrency": (lambda v: 1 <= v <= 1024, "an integer 1..1024"),
    "poll_min_ms": (lambda v: v >= 1, "a positive integer"),
    "poll_max_ms": (lambda v: v >= 1, "a positive integer"),
    "poll_interval_ms": (lambda v: v >= 1, "a positive integer"),
    "grace_period": (lambda v: 0 <= v <= _MAX_SECONDS, "a number of seconds >= 0"),
    "heartbeat": (lambda v: 0 < v <= _MAX_SECONDS, "a number of seconds > 0"),
    "monitor_interval": (lambda v: 0 < v <= _MAX_SECONDS, "a number of seconds > 0"),
    "sweep_interval": (lambda v: 0 <= v <= _MAX_SECONDS, "a number of seconds >= 0 (0: no sweep)"),
    "shards": (_hex_shards, "a non-empty list of hex shards such as 0, 1, a, f"),
}


_TOML_BARE = _LazyRe(r"[A-Za-z0-9_-]+\Z")
_TOML_TOKEN = _LazyRe(r"[^\s,\]#]+")
_TOML_ESCAPES = {"b": "\b", "t": "\t", "n": "\n", "f": "\f", "r": "\r", '"': '"', "\\": "\\"}


def _toml_value(text, where):
    """One value of the small TOML reader: strings, integers, floats,
    booleans and arrays of these, which is what .buquet.toml uses."""
    text = text.strip()
    try:
        value, rest = _toml_scan(text, 0, where)
    except RecursionError:  # arrays are read by recursion
        raise ConfigError("%s: arrays nested too deeply" % where) from None
    rest = text[rest:].strip()
    if rest and not rest.startswith("#"):
        raise ConfigError("%s: unexpected %r after the value" % (where, rest[:20]))
    return value


def _toml_scan(text, i, where):
    while i < len(text) and text[i] in " \t\n":
        i += 1
    if i >= len(text):
        raise ConfigError("%s: a value is missing" % where)
    c = text[i]
    if text.startswith('"""', i) or text.startswith("'''", i):
        raise ConfigError("%s: multi-line strings are not supported by the small TOML reader used "
                          "before Python 3.11; write the value on one line" % where)
    if c == '"':
        out, i = [], i + 1
        while i < len(text) and text[i] != '"':
            if text[i] == "\\":
                nxt = text[i + 1:i + 2]
                if nxt in _TOML_ESCAPES:
                    out.append(_TOML_ESCAPES[nxt])
                    i += 2
                elif nxt in ("u", "U"):
                    n = 4 if nxt == "u" else 8
                    digits = text[i + 2:i + 2 + n]
                    hex_ok = len(digits) == n and not digits.strip("0123456789abcdefABCDEF")
                    code = int(digits, 16) if hex_ok else -1
                    if not (0 <= code < 0xD800 or 0xDFFF < code <= 0x10FFFF):
                        raise ConfigError("%s: bad escape %r (a Unicode scalar value in hex)" % (where, "\\" + nxt + digits))
                    out.append(chr(code))
                    i += 2 + n
                else:
                    raise ConfigError("%s: unknown escape \\%s" % (where, nxt))
            else:
                out.append(text[i])
                i += 1
        if i >= len(text):
            raise ConfigError("%s: unterminated string" % where)
        return "".join(out), i + 1
    if c == "'":
        end = text.find("'", i + 1)
        if end < 0:
            raise ConfigError("%s: unterminated string" % where)
        return text[i + 1:end], end + 1
    if c == "[":
        items, i = [], i + 1
        while True:
            while i < len(text) and text[i] in " \t\n,":
                if text[i] == ",":
                    if not items:
                        raise ConfigError("%s: stray comma in array" % where)
                i += 1
            if i < len(text) and text[i] == "#":
                i = text.find("\n", i) if "\n" in text[i:] else len(text)
                continue
            if i >= len(text):
                raise _TomlUnterminated("%s: unterminated array" % where)
            if text[i] == "]":
                return items, i + 1
            value, i = _toml_scan(text, i, where)
            items.append(value)
            while i < len(text) and text[i] in " \t\n":
                i += 1
            if i < len(text) and text[i] not in ",]#":
                raise ConfigError("%s: expected , or ] in array" % where)
    if c == "{":
        raise ConfigError("%s: inline tables are not supported by the small TOML reader used before "
                          "Python 3.11; use a [table]" % where)
    m = _TOML_TOKEN.match(text, i)
    token = m.group(0)
    end = m.end()
    if token == "true":
        return True, end
    if token == "false":
        return False, end
    plain = token.replace("_", "")
    try:
        if re.match(r"[+-]?\d+\Z", plain):
            return int(plain), end
        if re.match(r"[+-]?(\d+\.\d+([eE][+-]?\d+)?|\d+[eE][+-]?\d+|inf|nan)\Z", plain):
            return float(plain), end
    except ValueError:
        pass
    raise ConfigError("%s: cannot read %r (the small TOML reader used before Python 3.11 reads strings, "
                      "numbers, booleans and arrays)" % (where, token))


class _TomlUnterminated(ConfigError):
    """An array still open at the end of the text read so far."""


def _toml_closed(text, where):
    """Whether an array value is complete, so that the next line is not part
    of it (brackets in strings and comments do not count)."""
    try:
        _toml_scan(text, 0, where)
    except _TomlUnterminated:
        return False
    except (ConfigError, RecursionError):
        pass  # another error: reported when the value is read
    return True


def _toml_key(text, where):
    parts = []
    for part in text.split("."):
        part = part.strip()
        if len(part) >= 2 and part[0] == part[-1] and part[0] in "\"'":
            part = part[1:-1]
        elif not _TOML_BARE.match(part):
            raise ConfigError("%s: bad key %r" % (where, text.strip()))
        parts.append(part)
    return parts


def parse_toml(text, name="<config>"):
    """TOML -> dict: tomllib where there is one (3.11+), else a small reader
    for the subset configuration files use, with a clear error for the rest."""
    try:
        import tomllib
    except ImportError:
        tomllib = None
    if tomllib is not None:
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError("%s: %s" % (name, exc)) from None
        except RecursionError:  # tomllib reads nested values by recursion
            raise ConfigError("%s: values nested too deeply" % name) from None
    return _parse_toml_small(text, name)


def _parse_toml_small(text, name):
    root = table = {}
    declared = set()  # table headers seen: each may appear once
    lines = text.splitlines()
    n = 0
    while n < len(lines):
        raw = lines[n]
        n += 1
        where = "%s:%d" % (name, n)
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("[["):
            raise ConfigError("%s: arrays of tables are not supported by the small TOML reader" % where)
        if line.startswith("["):
            end = line.find("]")
            rest = line[end + 1:].strip()
            if end < 0 or (rest and not rest.startswith("#")):
                raise ConfigError("%s: bad table header %r" % (where, line))
            table = root
            parts = _toml_key(line[1:end], where)
            if tuple(parts) in declared:
                raise ConfigError("%s: table [%s] defined twice" % (where, ".".join(parts)))
            declared.add(tuple(parts))
            for part in parts:
                table = table.setdefault(part, {})
                if not isinstance(table, dict):
                    raise ConfigError("%s: %r is not a table" % (where, part))
            continue
        key, eq, value = line.partition("=")
        if not eq:
            raise ConfigError("%s: expected key = value, got %r" % (where, line))
        value = value.strip()
        while value.startswith("[") and n < len(lines) and not _toml_closed(value, where):
            value += "\n" + lines[n]  # an array over several lines
            n += 1
        parts = _toml_key(key, where)
        target = table
        for part in parts[:-1]:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise ConfigError("%s: %r is not a table" % (where, part))
        if parts[-1] in target:
            raise ConfigError("%s: key %r defined twice" % (where, key.strip()))
        target[parts[-1]] = _toml_value(value, where)
    return root


def config_paths(cwd=None, environ=None):
    """[(role, path)] of the files that may configure buquet, lowest
    precedence first, whether or not they exist."""
    env = os.environ if environ is None else environ
    home = os.path.expanduser("~")
    xdg = env.get("XDG_CONFIG_HOME") or os.path.join(home, ".config")
    paths = [("user", os.path.join(xdg, "buquet", "config.toml"))]
    here = os.path.abspath(cwd or os.getcwd())
    project = None
    while True:
        candidate = os.path.join(here, ".buquet.toml")
        if os.path.isfile(candidate):
            project = candidate
            break
        parent = os.path.dirname(here)
        if parent == here:
            break
        here = parent
    paths.append(("project", project or os.path.join(os.path.abspath(cwd or os.getcwd()), ".buquet.toml")))
    if env.get("BUQUET_CONFIG"):
        paths.append(("explicit", env["BUQUET_CONFIG"]))
    return paths


class Config:
    """Resolved settings with the source of each (`sources`), and the
    problems found (`warnings`: unknown keys, keys without effect)."""

    def __init__(self):
        self.values = {}
        self.sources = {}
        self.warnings = []
        self.files = []
        self.profile = None

    def get(self, name, default=None):
        return self.values.get(name, default)

    def set(self, name, value, source):
        self.values[name] = value
        self.sources[name] = source


def _check_setting(table, key, value, where, config):
    spec = CONFIG_SCHEMA.get(table, {}).get(key)
    if spec is None:
        config.warnings.append("%s: unknown key %s.%s (ignored)" % (where, table, key))
        return None
    kind, effect = spec
    ok = isinstance(value, kind) and not (isinstance(value, bool) and kind in (int, (int, float)))
    if not ok:
        expected = {str: "a string", int: "an integer", bool: "true or false", list: "an array"}.get(
            kind, "a number")
        raise ConfigError("%s: %s.%s must be %s, got %r" % (where, table, key, expected, value))
    test, expected = _SETTING_RANGES.get(effect, (None, None))
    if test is not None and not test(value):
        raise ConfigError("%s: %s.%s must be %s, got %r" % (where, table, key, expected, value))
    if effect is None:
        config.warnings.append("%s: %s.%s is accepted for compatibility with the original and has no "
                               "effect here" % (where, table, key))
    return effect


def _flatten_file(data, where, profile, config):
    """Settings from one file's tables: [default], then [profiles.NAME]."""
    out = {}
    for table, content in data.items():
        if table == "profiles":
            if not isinstance(content, dict):
                raise ConfigError("%s: profiles must be a table" % where)
            continue
        if not isinstance(content, dict):
            config.warnings.append("%s: unknown top-level key %s (ignored; settings go under [default])"
                                   % (where, table))
            continue
        for key, value in content.items():
            if isinstance(value, dict) and "%s.%s" % (table, key) in CONFIG_SCHEMA:
                sub = "%s.%s" % (table, key)
                for k2, v2 in value.items():
                    effect = _check_setting(sub, k2, v2, where, config)
                    if effect:
                        out[effect] = v2
                continue
            effect = _check_setting(table, key, value, where, config)
            if effect:
                out[effect] = value
    profiles = data.get("profiles", {})
    for name, content in profiles.items():
        if not isinstance(content, dict):
            raise ConfigError("%s: profiles.%s must be a table" % (where, name))
        for key, value in content.items():
            effect = _check_setting("default", key, value, "%s [profiles.%s]" % (where, name), config)
            if effect and name == profile:
                out[effect] = value
    return out, set(profiles)


def load_config(*, profile=None, config_file=None, cwd=None, environ=None):
    """Settings from the files and the environment (flags are applied by the
    caller).  Raises ConfigError for a file that cannot be read or a value of
    the wrong type."""
    env = os.environ if environ is None else environ
    config = Config()
    profile = profile or env.get("BUQUET_PROFILE") or None
    config.profile = profile
    paths = config_paths(cwd, env)
    if config_file:
        paths = [p for p in paths if p[0] != "explicit"] + [("explicit", config_file)]
    known_profiles = set()
    for role, path in paths:
        if not os.path.isfile(path):
            if role == "explicit":
                raise ConfigError("config file %s does not exist" % path)
            continue
        try:
            with open(path, encoding="utf-8") as f:
                data = parse_toml(f.read(), path)
        except OSError as exc:
            raise ConfigError("cannot read %s: %s" % (path, exc.strerror or exc)) from None
        except UnicodeDecodeError as exc:
            raise ConfigError("cannot read %s: not UTF-8 text (%s)" % (path, exc)) from None
        config.files.append(path)
        values, names = _flatten_file(data, path, profile, config)
        known_profiles |= names
        for name, value in values.items():
            config.set(name, value, path)
    if profile and profile not in known_profiles and config.files:
        config.warnings.append("profile %r is not defined in %s" % (profile, ", ".join(config.files)))
    for var, name in CONFIG_ENV.items():
        raw = env.get(var)
        if raw is None or raw == "":
            continue
        if name == "shards":
            value = [s.strip() for s in raw.split(",")]
        elif name in ("force_path_style", "no_monitor"):
            word = raw.strip().lower()
            if word not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                raise ConfigError("%s must be true or false (1/0, yes/no, on/off), got %r" % (var, raw))
            value = word in ("1", "true", "yes", "on")
        elif name in ("shard_prefix_len", "concurrency", "poll_min_ms", "poll_max_ms"):
            try:
                value = int(raw)
            except ValueError:
                raise ConfigError("%s must be an integer, got %r" % (var, raw)) from None
        elif name in ("monitor_interval", "sweep_interval"):
            try:
                value = float(raw)
            except ValueError:
                raise ConfigError("%s must be a number of seconds, got %r" % (var, raw)) from None
        else:
            value = raw
        test, expected = _SETTING_RANGES.get(name, (None, None))
        if test is not None and not test(value):
            raise ConfigError("%s must be %s, got %r" % (var, expected, raw))
        config.set(name, value, "$" + var)
    if config.get("no_monitor"):
        config.set("monitor", False, config.sources["no_monitor"])
    return config


def queue_from_config(config, environ=None):
    """A Queue (no network request) for resolved settings."""
    options = {"path_style": True} if config.get("force_path_style") else {}
    return connect(bucket=config.get("bucket"), endpoint=config.get("endpoint"), region=config.get("region"),
                   aws_profile=config.get("aws_profile"), local_dir=config.get("local_dir"),
                   shard_prefix_len=config.get("shard_prefix_len", SHARD_PREFIX_LEN), environ=environ,
                   use_config=False, **options)


# ============================================================================
# Command line: `buquet ...` and `python -m buquet ...`
# ============================================================================
#
# Exit codes: 0 success; 1 the operation failed (not found, refused by the
# task's state, S3 error); 2 bad input or configuration (one line
# `buquet: error: ...`); 3 doctor found the bucket unsafe for the queue;
# 130 / 143 after a second SIGINT / SIGTERM.

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNSAFE = 0, 1, 2, 3

_DURATION_UNITS = {
    "s": 1, "sec": 1, "secs": 1, "second": 1, "seconds": 1,
    "m": 60, "min": 60, "mins": 60, "minute": 60, "minutes": 60,
    "h": 3600, "hr": 3600, "hrs": 3600, "hour": 3600, "hours": 3600,
    "d": 86400, "day": 86400, "days": 86400, "w": 604800, "week": 604800, "weeks": 604800,
}
_DURATION_RE = _LazyRe(r"\s*(\d+(?:\.\d+)?)\s*([a-z]*)", re.I)


class UsageError(BuquetError):
    """Bad command-line input (exit 2)."""


def parse_duration(text):
    """Seconds from `30s`, `15m`, `1h`, `2d`, `1h30m`, `90` (seconds), or
    the original's spellings (`2 hours`, `1 week`)."""
    if not isinstance(text, str) or not text.strip():
        raise UsageError("expected a duration like 30s, 15m, 1h, 2d or 1h30m, got %r" % (text,))
    total, pos, source = 0.0, 0, text.strip()
    while pos < len(source):
        m = _DURATION_RE.match(source, pos)
        if not m or m.end() == pos:
            raise UsageError("expected a duration like 30s, 15m, 1h, 2d or 1h30m, got %r" % (text,))
        unit = m.group(2).lower()
        if unit and unit not in _DURATION_UNITS or (not unit and m.end() < len(source)):
            raise UsageError("expected a duration like 30s, 15m, 1h, 2d or 1h30m, got %r" % (text,))
        total += float(m.group(1)) * _DURATION_UNITS.get(unit, 1)
        pos = m.end()
        while pos < len(source) and source[pos] == " ":
            pos += 1
    return total


def parse_rfc3339(text):
    try:
        return parse_timestamp(text.strip())
    except (ValueError, AttributeError):
        raise UsageError("expected an RFC 3339 timestamp with an offset, like 2026-01-28T09:00:00Z "
                         "or 2026-01-28T10:00:00+01:00, got %r" % (text,)) from None


# Deeper JSON cannot be checked and written without running into the
# interpreter's recursion limit (which some Pythons' json.loads reaches first).
_MAX_JSON_DEPTH = 500


def _json_depth(value):
    depth, level = 0, [value]
    while level:
        depth += 1
        level = [v for c in level if isinstance(c, (dict, list)) for v in (c.values() if isinstance(c, dict) else c)]
    return depth


def _json_arg(text, name):
    try:
        value = json.loads(text)
        deep = _json_depth(value) > _MAX_JSON_DEPTH
    except ValueError as exc:
        raise UsageError("%s must be JSON, got %r (%s)" % (name, text, exc)) from None
    except RecursionError:  # not a ValueError
        deep = True
    if deep:  # the text can be long: a glimpse of it
        raise UsageError("%s must be JSON, got %r (nested too deeply)" % (name, text[:20] + "..."))
    return value


def _shards_arg(text, queue):
    shards = [s.strip() for s in text.split(",")] if isinstance(text, str) else list(text)
    if not all(shards):  # "", "0,,1", "0,": a list typed or pasted wrong
        raise UsageError("expected shards like 0,1,2,3, got %r" % (text,))
    for s in shards:
        if s not in queue.shards:
            raise UsageError("shard must be one of %s..%s, got %r" % (queue.shards[0], queue.shards[-1], s))
    if not shards:
        raise UsageError("expected shards like 0,1,2,3, got %r" % (text,))
    return shards


def _when(value):
    """A timestamp for people: local time, and UTC when they differ."""
    if value is None:
        return "-"
    dt = parse_timestamp(value) if isinstance(value, str) else value
    local, utc = dt.astimezone(), dt.astimezone(timezone.utc)
    if local.utcoffset() == timedelta(0):
        return utc.strftime("%Y-%m-%d %H:%M:%S UTC")
    return "%s (%s)" % (local.strftime("%Y-%m-%d %H:%M:%S %Z"), utc.strftime("%H:%M:%S UTC"))


def _table(rows, headers, out):
    rows = [[("-" if c is None else str(c)) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    out.write("  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip() + "\n")
    for r in rows:
        out.write("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() + "\n")


def _task_rows(tasks):
    return [[t.doc["id"], t.doc["task_type"], t.doc.get("status", "pending"), t.doc.get("attempt", 0),
             t.doc.get("retry_count", 0), _when(t.doc.get("updated_at"))] for t in tasks]


_TASK_HEADERS = ["ID", "TYPE", "STATUS", "ATTEMPT", "RETRIES", "UPDATED"]


def _print_task(task, out):
    doc = task.doc
    for name in TASK_FIELDS:
        if name not in doc:
            continue
        value = doc[name]
        if name in _TIMESTAMP_FIELDS and value:
            value = _when(value)
        elif isinstance(value, (dict, list)):
            value = dumps(value)
        out.write("%-17s %s\n" % (name + ":", "-" if value is None else value))


class _Progress:
    """A one-line progress report on a terminal (stderr), silent otherwise."""

    def __init__(self, label, stream=None):
        self.stream = stream or sys.stderr
        self.label = label
        self.active = hasattr(self.stream, "isatty") and self.stream.isatty()

    def __call__(self, where, count):
        if self.active:
            self.stream.write("\r%s: %s (%d so far)" % (self.label, where, count))
            self.stream.flush()

    def done(self):
        if self.active:
            self.stream.write("\n")


def _parser():
    import argparse

    class Parser(argparse.ArgumentParser):
        def error(self, message):  # one line like every other bad input, not usage + error
            self.exit(2, "buquet: error: %s (see: %s --help)\n" % (message, self.prog))

    p = Parser(prog="buquet", description="A task queue on S3-compatible object storage.")
    p.add_argument("--profile", help="configuration profile ([profiles.NAME] in .buquet.toml)")
    p.add_argument("--config", help="configuration file (default: .buquet.toml here or in a parent)")
    p.add_argument("--bucket", help="S3 bucket (default: S3_BUCKET, then the configuration)")
    p.add_argument("--endpoint", help="S3 endpoint URL for S3-compatible stores")
    p.add_argument("--region", help="S3 region")
    p.add_argument("--local-dir", help="use the local directory store at this path")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def cmd(name, help, json_flag=True):
        c = sub.add_parser(name, help=help, description=help)
        if json_flag:
            c.add_argument("--json", action="store_true", help="print JSON")
        return c

    c = cmd("submit", "submit a task")
    c.add_argument("-t", "--task-type", required=True)
    c.add_argument("-i", "--input", default="{}", help="task input as JSON (default {})")
    g = c.add_mutually_exclusive_group()
    g.add_argument("--delay", help="run after this long (30s, 15m, 1h30m)")
    g.add_argument("--at", help="run at this RFC 3339 time")
    g = c.add_mutually_exclusive_group()
    g.add_argument("--ttl", help="expire if not started within this long")
    g.add_argument("--expires-at", help="expire if not started by this RFC 3339 time")
    c.add_argument("--timeout", type=int, default=DEFAULT_TIMEOUT, help="lease seconds per attempt (300)")
    c.add_argument("--retries", type=int, default=DEFAULT_MAX_RETRIES, help="retries after the first attempt (3)")
    c.add_argument("--max-reschedules", type=int)
    c.add_argument("--idempotency-key")

    c = cmd("worker", "run a worker for the handlers in APP", json_flag=False)
    c.add_argument("app", nargs="?", help="module:attribute of a buquet.Worker, e.g. myapp.tasks:worker")
    c.add_argument("--shards", help="comma-separated shards (default: all)")
    c.add_argument("--id", help="worker id (default: the app's, else worker-XXXXXXXX)")
    c.add_argument("--concurrency", type=int, help="handler threads (default %d)" % CONCURRENCY)
    c.add_argument("--max-tasks", type=int, help="exit after this many tasks")
    c.add_argument("--drain", action="store_true", help="exit when nothing is ready")
    c.add_argument("--grace-period", help="time handlers get to finish on shutdown (30s)")
    c.add_argument("--poll-min", help="shortest sleep between polls (0.1s)")
    c.add_argument("--poll-max", help="longest sleep between polls (2.5s)")
    c.add_argument("--no-monitor", action="store_true", help="do not recover expired leases here")
    c.add_argument("--no-scheduler", action="store_true", help="do not fire schedules here")

    c = cmd("list", "list tasks of a shard (all shards when none is given)")
    c.add_argument("shard", nargs="?")
    c.add_argument("-s", "--shard", dest="shard_opt")
    c.add_argument("--status", choices=STATUSES)
    c.add_argument("-t", "--task-type")
    c.add_argument("--limit", type=int, default=100, help="per shard (100)")

    for name, help in (("get", "show a task"), ("status", "show a task (the original's name)"),
                       ("history", "show every version of a task, newest first"),
                       ("replay", "run a finished task again"), ("archive", "archive a finished task")):
        c = cmd(name, help)
        c.add_argument("id")

    c = cmd("cancel", "cancel tasks by id, or every pending task of a type")
    c.add_argument("ids", nargs="*")
    c.add_argument("-t", "--task-type")
    c.add_argument("-r", "--reason")
    c.add_argument("-b", "--cancelled-by")

    cmd("workers", "list workers and their last heartbeat")
    c = cmd("stats", "queue depth per status and shard, oldest ready task, workers")
    c.add_argument("--full", action="store_true", help="read every task (costs a GET per task)")
    c = cmd("tail", "follow task changes as they happen")
    c.add_argument("-t", "--task-type")
    c.add_argument("--status", choices=STATUSES)
    c.add_argument("--interval", default="2s", help="time between looks (2s)")
    c.add_argument("--limit", type=int, help="stop after this many changes")
    c = cmd("sweep", "repair the ready and lease indexes (one full pass)")
    c = cmd("doctor", "check that a bucket can safely run the queue")
    _add_serve_parser(sub)  # defined with the dashboard, below
    c = cmd("demo", "submit demo tasks and run a worker on them, showing progress", json_flag=False)
    c.add_argument("--tasks", type=int, default=24, help="how many (24)")
    c.add_argument("--timeout", type=float, default=60.0, help="give up after this many seconds (60)")

    c = cmd("config", "show, validate or locate the configuration")
    c.add_argument("action", choices=("show", "validate", "paths"))

    c = cmd("schedule", "recurring schedules", json_flag=False)
    ssub = c.add_subparsers(dest="schedule_command", metavar="ACTION")
    ssub.required = True
    s = ssub.add_parser("create", help="create a schedule")
    s.add_argument("id")
    s.add_argument("-t", "--task-type", required=True)
    s.add_argument("-c", "--cron", required=True, help='cron expression, e.g. "0 9 * * MON-FRI"')
    s.add_argument("-i", "--input", default="{}")
    s.add_argument("--tz", help="IANA time zone, e.g. Europe/Berlin (default UTC)")
    s.add_argument("--timeout", type=int)
    s.add_argument("--retries", type=int)
    s.add_argument("--json", action="store_true")
    s = ssub.add_parser("list", help="list schedules")
    s.add_argument("--json", action="store_true")
    for name in ("show", "enable", "disable", "delete", "trigger"):
        s = ssub.add_parser(name, help="%s a schedule" % name)
        s.add_argument("id")
        s.add_argument("--json", action="store_true")
    s = ssub.add_parser("run", help="run the scheduler alone")
    s.add_argument("--interval", default="60s", help="longest time between looks at the schedules (60s)")
    return p


def main(argv=None):
    """The `buquet` command.  Returns the exit code."""
    import argparse

    parser = _parser()
    out = sys.stdout
    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse printed its one-line usage error
        return EXIT_USAGE if exc.code else EXIT_OK
    try:
        return _COMMANDS[args.command](args, out)
    except (UsageError, ConfigError, ValueError, argparse.ArgumentTypeError) as exc:
        if debug:
            raise
        sys.stderr.write("buquet: error: %s\n" % _one_line(exc))
        return EXIT_USAGE
    except (BuquetError, OSError) as exc:
        if debug:
            raise
        sys.stderr.write("buquet: error: %s\n" % _one_line(exc))
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130


def _one_line(exc):
    return " ".join(str(exc).split()) or type(exc).__name__


def _config_for(args):
    # An empty value is an unset variable in a script ("--local-dir $DIR"),
    # never a wish for the default.
    for name in ("profile", "config", "bucket", "endpoint", "region", "local_dir"):
        value = getattr(args, name, None)
        if value is not None and not value.strip():
            raise UsageError("--%s must not be empty" % name.replace("_", "-"))
    config = load_config(profile=args.profile, config_file=args.config)
    for name in ("bucket", "endpoint", "region", "local_dir"):
        value = getattr(args, name, None)
        if value:
            config.set(name, value, "--" + name.replace("_", "-"))
    return config


def _queue_for(args):
    config = _config_for(args)
    for warning in config.warnings:
        if "unknown" in warning or "not defined" in warning:
            sys.stderr.write("buquet: warning: %s\n" % warning)
    return queue_from_config(config), config


def _emit(args, out, data, human):
    if getattr(args, "json", False):
        out.write(json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")
    else:
        human()
    return EXIT_OK


def _cmd_submit(args, out):
    # Every argument is parsed before the store is touched: bad input writes nothing.
    def given(value, parse):
        return None if value is None else parse(value)
    input = _json_arg(args.input, "--input")
    options = dict(delay=given(args.delay, parse_duration), at=given(args.at, parse_rfc3339),
                   ttl=given(args.ttl, parse_duration), expires_at=given(args.expires_at, parse_rfc3339))
    queue, _ = _queue_for(args)
    task = queue.submit(
        args.task_type, input, **options,
        timeout=args.timeout, max_retries=args.retries, max_reschedules=args.max_reschedules,
        idempotency_key=args.idempotency_key)
    return _emit(args, out, task.to_dict(), lambda: out.write(
        "%s  %s  %s  available %s\n" % (task.doc["id"], task.doc["task_type"], task.doc["status"],
                                         _when(task.doc["available_at"]))))


def _cmd_get(args, out):
    queue, _ = _queue_for(args)
    task = queue.get(args.id)
    if task is None:
        raise TaskNotFound(_task_id(args.id))
    return _emit(args, out, task.to_dict(), lambda: _print_task(task, out))


def _cmd_history(args, out):
    queue, _ = _queue_for(args)
    history = queue.history(args.id)
    data = {"versioned": history.versioned, "note": history.note, "versions": [t.to_dict() for t in history]}

    def human():
        if history.note:
            out.write("note: %s\n" % history.note)
        _table([[t.doc.get("status"), t.doc.get("attempt", 0), t.doc.get("retry_count", 0),
                 _when(t.doc.get("updated_at")), t.doc.get("last_error") or ""] for t in history],
               ["STATUS", "ATTEMPT", "RETRIES", "UPDATED", "ERROR"], out)
    return _emit(args, out, data, human)


def _cmd_simple(operation):
    def run(args, out):
        queue, _ = _queue_for(args)
        task = getattr(queue, operation)(args.id)
        return _emit(args, out, task.to_dict(), lambda: out.write("%s  %s\n" % (task.doc["id"], task.doc["status"])))
    return run


def _cmd_list(args, out):
    queue, _ = _queue_for(args)
    shard = args.shard if args.shard is not None else args.shard_opt
    shards = [shard] if shard is not None else queue.shards
    for s in shards:
        queue._check_shard(s)
    tasks = []
    for s in shards:
        tasks.extend(queue.list(s, status=args.status, task_type=args.task_type, limit=args.limit))
    return _emit(args, out, [t.to_dict() for t in tasks], lambda: _table(_task_rows(tasks), _TASK_HEADERS, out))


def _cmd_cancel(args, out):
    if not args.ids and not args.task_type:
        raise UsageError("name task ids to cancel, or a task type with -t")
    queue, _ = _queue_for(args)
    results = []
    if args.ids:
        results.extend(queue.cancel_many(args.ids, args.reason, args.cancelled_by))
    if args.task_type:
        progress = _Progress("cancelling %s" % args.task_type)
        results.extend(queue.cancel_by_type(args.task_type, args.reason, args.cancelled_by, progress=progress))
        progress.done()
    failed = [r for r in results if not isinstance(r, Task)]
    data = [{"id": r.doc["id"], "status": r.doc["status"]} if isinstance(r, Task) else {"error": str(r)}
            for r in results]

    def human():
        for r in results:
            out.write("%s  cancelled\n" % r.doc["id"] if isinstance(r, Task) else "error: %s\n" % _one_line(r))
        out.write("%d cancelled, %d failed\n" % (len(results) - len(failed), len(failed)))
    _emit(args, out, data, human)
    return EXIT_FAILED if failed else EXIT_OK


def _read_workers(queue):
    keys, start = [], None
    while True:
        page, truncated = queue.store.list("workers/", start_after=start, limit=1000)
        keys.extend(k for k in page if k.endswith(".json"))
        if not truncated or not page:
            break
        start = page[-1]

    def read(key):
        blob = queue.store.get(key)
        if blob is None:
            return None
        try:
            doc = json.loads(blob.body)
        except (ValueError, RecursionError) as exc:
            _warn("skipping unreadable heartbeat %s: not JSON: %s", key, exc)
            return None
        if not isinstance(doc, dict) or "last_heartbeat" not in doc:
            _warn("skipping unreadable heartbeat %s: not a heartbeat (no last_heartbeat)", key)
            return None
        return doc
    return [w for w in queue._map(read, keys) if w is not None]


def _worker_rows(workers, now):
    rows = []
    for w in workers:
        try:
            age = (now - parse_timestamp(w["last_heartbeat"])).total_seconds()
        except (ValueError, TypeError):
            age = None
        alive = age is not None and age < 60
        shards = w.get("shards")  # anything: a heartbeat is only shown
        shards = ",".join(map(str, shards)) if isinstance(shards, list) else shards
        rows.append([w.get("worker_id"), "alive" if alive else "stale", "%ds ago" % age if age is not None else "?",
                     shards, w.get("current_task"), w.get("tasks_completed"), w.get("tasks_failed")])
    return rows


def _cmd_workers(args, out):
    queue, _ = _queue_for(args)
    workers = _read_workers(queue)
    now = queue.now()
    return _emit(args, out, workers, lambda: _table(
        _worker_rows(workers, now), ["WORKER", "STATE", "HEARTBEAT", "SHARDS", "CURRENT", "DONE", "FAILED"], out))


def _cmd_stats(args, out):
    queue, _ = _queue_for(args)
    now = queue.now()
    now_bucket = minute_bucket(now)
    per_shard = {s: {} for s in queue.shards}
    oldest = None

    def scan(prefix):
        keys, start = [], None
        while True:
            page, truncated = queue.store.list(prefix, start_after=start, limit=1000)
            keys.extend(page)
            if not truncated or not page:
                return keys
            start = page[-1]

    ignored = 0
    for key in scan("ready/"):
        parsed = parse_index_key(key)
        if parsed is None or parsed[0] not in per_shard:
            ignored += 1
            continue
        label = "ready" if parsed[1] <= now_bucket else "scheduled"
        per_shard[parsed[0]][label] = per_shard[parsed[0]].get(label, 0) + 1
        if label == "ready" and (oldest is None or parsed[1] < oldest[0]):
            oldest = (parsed[1], parsed[2])
    for key in scan("leases/"):
        parsed = parse_index_key(key)
        if parsed and parsed[0] in per_shard:
            per_shard[parsed[0]]["running"] = per_shard[parsed[0]].get("running", 0) + 1
        else:
            ignored += 1
    if args.full:
        for shard in queue.shards:
            for task in queue.list(shard, limit=10 ** 9):
                status = "status:" + task.doc.get("status", "pending")
                per_shard[shard][status] = per_shard[shard].get(status, 0) + 1
    oldest_age = None
    if oldest is not None:
        task, _ = queue._read(queue._key_for(oldest[1]))  # unreadable: reported, the minute will do
        if task is not None and task.doc.get("status") == "pending":
            oldest_age = max(0.0, (now - task.available_at).total_seconds())
        else:
            oldest_age = max(0.0, (now - _EPOCH).total_seconds() - int(oldest[0]) * 60)
    workers = _read_workers(queue)
    alive = sum(1 for r in _worker_rows(workers, now) if r[1] == "alive")
    totals = {}
    for counts in per_shard.values():
        for k, v in counts.items():
            totals[k] = totals.get(k, 0) + v
    data = {"now": format_timestamp(now), "totals": totals, "shards": per_shard,
            "oldest_ready_age_seconds": oldest_age, "workers_alive": alive, "workers_registered": len(workers)}
    if ignored:
        _warn("ignored %d keys under ready/ and leases/ that are not index entries (`buquet sweep` names them)",
              ignored)

    def human():
        labels = ["ready", "scheduled", "running"] + sorted({k for c in per_shard.values() for k in c
                                                            if k.startswith("status:")})
        _table([[s] + [per_shard[s].get(l, 0) for l in labels] for s in queue.shards] +
               [["total"] + [totals.get(l, 0) for l in labels]], ["SHARD"] + [l.upper() for l in labels], out)
        out.write("oldest ready task: %s\n" % ("none" if oldest_age is None else "%.0fs waiting" % oldest_age))
        out.write("workers: %d alive, %d registered\n" % (alive, len(workers)))
        if not args.full:
            out.write("(completed and other finished tasks are counted with --full: one GET per task)\n")
    return _emit(args, out, data, human)


def _list_with_etags(queue, prefix):
    """{key: None} for every key of a prefix: the stores list no ETags, so
    tail compares the ETags of the documents it reads."""
    start, out = None, {}
    while True:
        page, truncated = queue.store.list(prefix, start_after=start, limit=1000)
        for k in page:
            out[k] = None
        if not truncated or not page:
            return out
        start = page[-1]


def _positive_interval(text):
    interval = parse_duration(text)
    if interval <= 0:
        raise UsageError("--interval must be more than 0s, got %r" % (text,))
    return interval


def _cmd_tail(args, out):
    interval = _positive_interval(args.interval)
    if args.limit is not None and args.limit < 1:
        raise UsageError("--limit must be at least 1, got %d" % args.limit)
    queue, _ = _queue_for(args)
    seen = {}  # key -> the ETag last seen, from the listing or, when it has none, from the read
    shown = 0
    first = True
    while True:
        current = _list_with_etags(queue, "tasks/")
        changed = [k for k, e in current.items() if k.endswith(".json") and (e is None or seen.get(k) != e)]
        for k, e in current.items():
            if e is not None:
                seen[k] = e
        # Without ETags in the listing every task is read (the first look
        # too), and only the ones whose ETag moved are shown.
        must_read = changed if not first else [k for k in changed if current[k] is None]
        for task, _ in queue._map(queue._read, must_read):
            if task is None:
                continue
            if current.get(task.key) is None:
                before, seen[task.key] = seen.get(task.key), task.etag
                if first or before == task.etag:
                    continue
            if args.status and task.doc.get("status") != args.status:
                continue
            if args.task_type and task.doc.get("task_type") != args.task_type:
                continue
            if args.json:
                out.write(dumps(task.doc) + "\n")
            else:
                out.write("%s  %s  %-9s  attempt %s  %s\n" % (
                    _when(task.doc.get("updated_at")), task.doc["id"], task.doc.get("status"),
                    task.doc.get("attempt", 0), task.doc["task_type"]))
            out.flush()
            shown += 1
            if args.limit and shown >= args.limit:
                return EXIT_OK
        first = False
        time.sleep(interval)


def _cmd_sweep(args, out):
    queue, _ = _queue_for(args)
    sweeper = queue.sweeper()
    progress = _Progress("sweeping")
    while not sweeper.step():
        progress(sweeper.PHASES[sweeper.phase] + (sweeper.cursor or ""), sweeper.counts["checked"])
    progress.done()
    data = {"counts": sweeper.counts, "skipped": sweeper.skipped}

    def human():
        out.write(", ".join("%s %d" % kv for kv in sweeper.counts.items()) + "\n")
        for key, reason in sorted(sweeper.skipped.items()):
            out.write("skipped %s: %s\n" % (key, reason))
    return _emit(args, out, data, human)


def _cmd_config(args, out):
    config = _config_for(args)
    if args.action == "paths":
        paths = [{"role": role, "path": path, "exists": os.path.isfile(path)}
                 for role, path in config_paths(environ=dict(os.environ, **(
                     {"BUQUET_CONFIG": args.config} if args.config else {})))]
        return _emit(args, out, paths, lambda: _table(
            [[p["role"], p["path"], "yes" if p["exists"] else "no"] for p in paths], ["ROLE", "PATH", "EXISTS"], out))
    if args.action == "validate":
        data = {"files": config.files, "warnings": config.warnings, "valid": True}
        _emit(args, out, data, lambda: out.write(
            "".join("warning: %s\n" % w for w in config.warnings) +
            "ok: %s\n" % (", ".join(config.files) or "no configuration file; environment and defaults only")))
        return EXIT_OK
    shown = {}
    for name, value in sorted(config.values.items()):
        shown[name] = {"value": value, "source": config.sources.get(name)}
    store = "s3://%s" % config.get("bucket") if config.get("bucket") else \
        "local directory %s" % (config.get("local_dir") or ".buquet")
    try:
        import sigv4

        creds = sigv4.resolve_credentials(profile=config.get("aws_profile"))
        cred_source = creds.source
    except Exception as exc:  # credentials are optional for `config show`
        cred_source = "none (%s)" % _one_line(exc)
    data = {"profile": config.profile, "store": store, "settings": shown, "credentials": cred_source,
            "files": config.files}

    def human():
        out.write("store: %s\nprofile: %s\ncredentials: %s\n" % (store, config.profile or "default", cred_source))
        _table([[k, dumps(v["value"]), v["source"]] for k, v in shown.items()], ["SETTING", "VALUE", "FROM"], out)
    return _emit(args, out, data, human)


def _load_app(spec):
    """The Worker named by `module:attribute` (attribute default `worker`).
    Only the module the user named is imported."""
    import importlib

    if not spec:
        raise UsageError("name the module with your handlers, e.g. `buquet worker myapp.tasks:worker`")
    module_name, _, attr = spec.partition(":")
    if not re.match(r"[A-Za-z_][\w.]*\Z", module_name) or (attr and not re.match(r"[A-Za-z_][\w.]*\Z", attr)):
        raise UsageError("expected module:attribute like myapp.tasks:worker, got %r" % (spec,))
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` would, so `myapp` resolves here
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UsageError("cannot import %s: %s" % (module_name, exc)) from None
    obj = module
    for part in (attr or "worker").split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise UsageError("%s has no attribute %s" % (module_name, attr or "worker"))
    if not isinstance(obj, Worker):
        raise UsageError("%s must name a buquet.Worker, got %s" % (spec, type(obj).__name__))
    return obj


def _cmd_worker(args, out):
    if args.id is not None:
        _check_name(args.id, "worker_id")  # Worker() would take "" for "make one up"
    app = _load_app(args.app)
    config = _config_for(args)
    queue = queue_from_config(config) if (config.get("bucket") or config.get("local_dir")) else app._queue
    shards = _shards_arg(args.shards, queue) if args.shards is not None else (
        _shards_arg(config.get("shards"), queue) if config.get("shards") else app.shards)

    def seconds(flag, setting_ms, current):
        if flag is not None:
            return parse_duration(flag)
        return config.get(setting_ms) / 1000.0 if config.get(setting_ms) else current

    poll_min = seconds(args.poll_min, "poll_min_ms", app._poller.floor)
    poll_max = seconds(args.poll_max, "poll_max_ms", app._poller.cap)
    if config.get("poll_strategy") == "fixed" and config.get("poll_interval_ms") and args.poll_min is None \
            and args.poll_max is None:
        poll_min = poll_max = config.get("poll_interval_ms") / 1000.0
    worker = Worker(
        queue, args.id if args.id is not None else app.worker_id, shards,
        concurrency=args.concurrency if args.concurrency is not None else config.get("concurrency", app.concurrency),
        poll_min=poll_min, poll_max=poll_max,
        max_tasks=args.max_tasks if args.max_tasks is not None else app.max_tasks, drain=args.drain or app.drain,
        grace_period=parse_duration(args.grace_period) if args.grace_period is not None else config.get(
            "grace_period", app.grace_period),
        monitor=False if args.no_monitor else config.get("monitor", app.monitor),
        heartbeat_interval=config.get("heartbeat", app.heartbeat_interval),
        monitor_interval=config.get("monitor_interval", app.monitor_interval),
        sweep_interval=config.get("sweep_interval", app.sweep_interval) or 10 ** 9,
        scheduler=False if args.no_scheduler else config.get("scheduler", app.scheduler))
    worker.handlers = dict(app.handlers)
    worker._hooks = app._hooks
    sys.stderr.write("buquet: worker %s on %s, shards %s, handlers: %s\n" % (
        worker.worker_id, queue.store, ",".join(shards), ", ".join(sorted(worker.handlers))))
    return worker.run()


def _schedule_data(schedule, queue, n=5):
    doc = dict(schedule.doc)
    now = queue.now()
    try:
        runs = schedule.next_runs(now, n)
    except ScheduleError:
        runs = []
    doc["next_runs"] = [r.isoformat() for r in runs]
    doc["next_runs_utc"] = [format_timestamp(r) for r in runs]
    doc["last_run"] = queue.get_last_run(schedule.doc["id"])
    return doc


def _cmd_schedule(args, out):
    action = args.schedule_command
    if action == "create":
        import cron

        input = _json_arg(args.input, "--input")
        cron.Cron(args.cron, args.tz)  # CronError is a ValueError: bad input, exit 2
    queue, _ = _queue_for(args)
    if action == "create":
        schedule = queue.create_schedule(args.id, args.task_type, input, args.cron,
                                         timezone=args.tz, timeout=args.timeout, max_retries=args.retries)
        return _emit(args, out, _schedule_data(schedule, queue), lambda: out.write(
            "created %s: %s %r, next run %s\n" % (args.id, args.task_type, args.cron,
                                                 _when(schedule.next_runs(queue.now(), 1)[0]))))
    if action == "list":
        schedules = queue.list_schedules()
        now = queue.now()

        def next_run(s):
            try:
                return _when(s.next_runs(now, 1)[0]) if s.enabled else "disabled"
            except ScheduleError as exc:
                return "invalid: %s" % exc
        return _emit(args, out, [s.to_dict() for s in schedules], lambda: _table(
            [[s.doc["id"], s.doc["task_type"], s.doc["cron"], s.doc.get("timezone") or "UTC",
              "yes" if s.enabled else "no", next_run(s)] for s in schedules],
            ["ID", "TYPE", "CRON", "TZ", "ENABLED", "NEXT RUN"], out))
    if action == "run":
        interval = _positive_interval(args.interval)
        sys.stderr.write("buquet: scheduler on %s, looking every %ss at most\n" % (queue.store, interval))
        Scheduler(queue, interval=interval).run()
        return EXIT_OK
    if action == "show":
        schedule = queue.get_schedule(args.id)
        if schedule is None:
            raise ScheduleError("no schedule %r" % args.id)
        data = _schedule_data(schedule, queue)

        def human():
            for name in ("id", "task_type", "cron", "timezone", "enabled", "timeout_seconds", "max_retries"):
                out.write("%-16s %s\n" % (name + ":", data.get(name) if data.get(name) is not None else "-"))
            out.write("%-16s %s\n" % ("input:", dumps(data.get("input"))))
            last = data["last_run"] or {}
            out.write("%-16s %s\n" % ("last run:", _when(last.get("last_run_at")) if last else "never"))
            out.write("next runs (%s, and UTC):\n" % (data.get("timezone") or "UTC"))
            for local, utc in zip(data["next_runs"], data["next_runs_utc"]):
                out.write("  %s  %s\n" % (local, utc))
        return _emit(args, out, data, human)
    if action == "trigger":
        task = queue.trigger_schedule(args.id)
        return _emit(args, out, task.to_dict(), lambda: out.write("submitted %s\n" % task.doc["id"]))
    operation = {"enable": queue.enable_schedule, "disable": queue.disable_schedule,
                 "delete": queue.delete_schedule}[action]
    result = operation(args.id)
    data = result.to_dict() if isinstance(result, Schedule) else {"id": args.id, "deleted": True}
    return _emit(args, out, data, lambda: out.write("%s %sd\n" % (args.id, action)))


def _cmd_demo(args, out):
    """Submit a batch of tasks and let a worker run them, showing progress:
    buquet's main job end to end, on whatever store is configured (with
    nothing configured, the local directory store)."""
    if args.tasks < 1:
        raise UsageError("--tasks must be at least 1, got %d" % args.tasks)
    if not args.timeout > 0:  # nan too; a watcher that gives up at once would stop the worker before it starts
        raise UsageError("--timeout must be a positive number of seconds, got %r" % args.timeout)
    queue, _ = _queue_for(args)
    total = args.tasks
    import random

    rng = random.Random()
    policy = {"initial_interval_ms": 300, "max_interval_ms": 1000, "multiplier": 2.0, "jitter_percent": 0.2}
    tasks = queue.submit_many([{"task_type": "demo.thumbnail", "input": {"image": "photo-%03d.jpg" % i},
                                "retry_policy": policy} for i in range(total)])
    ids = {t.doc["id"] for t in tasks}
    out.write("submitted %d demo.thumbnail tasks to %r\n" % (total, queue.store))
    worker = Worker(queue, "demo-worker", concurrency=4, poll_min=0.05, poll_max=0.25, monitor=False,
                    scheduler=False)
    lock = threading.Lock()
    state = {"running": 0, "completed": 0, "retried": 0, "failed": 0}
    flaky = set(rng.sample(sorted(ids), max(1, total // 6)))

    @worker.task("demo.thumbnail")
    def thumbnail(input, ctx):
        with lock:
            state["running"] += 1
        try:
            time.sleep(rng.uniform(0.05, 0.4))  # the "work"
            if ctx.task_id in flaky and ctx.retry_count == 0:
                raise RetryableError("thumbnail service busy (the demo fails some tasks once)")
            return {"thumbnail": input["image"].replace(".jpg", "-thumb.jpg")}
        finally:
            with lock:
                state["running"] -= 1

    @worker.on_success
    def done(task, output):
        if task.doc["id"] in ids:
            with lock:
                state["completed"] += 1

    @worker.on_error
    def failed(task, error):
        if task.doc["id"] in ids:
            with lock:
                state["retried" if task.doc.get("status") == "pending" else "failed"] += 1

    tty = hasattr(out, "isatty") and out.isatty()

    def watch():
        deadline = time.monotonic() + args.timeout
        last = None
        while time.monotonic() < deadline:
            with lock:
                snapshot = dict(state)
            line = "  running %(running)d  completed %(completed)d  retried %(retried)d  failed %(failed)d" % snapshot
            if tty:
                out.write("\r" + line)
            elif line != last:  # a log, not a terminal: one line per change
                out.write(line + "\n")
            last = line
            out.flush()
            if snapshot["completed"] + snapshot["failed"] >= total:
                break
            time.sleep(0.2 if tty else 0.5)
        if tty:
            out.write("\n")
        worker.stop()
    watcher = threading.Thread(target=watch, name="buquet-demo", daemon=True)
    watcher.start()
    worker.run(install_signal_handlers=False)
    watcher.join()
    finished = [queue.get(t) for t in sorted(ids)]
    counts = {}
    for t in finished:
        counts[t.doc["status"]] = counts.get(t.doc["status"], 0) + 1
    out.write("done: %s\n" % ", ".join("%d %s" % (n, s) for s, n in sorted(counts.items())))
    sample = next((t for t in finished if t.doc.get("retry_count")), finished[0])
    out.write("one of them: %s %s attempt %d, output %s\n" % (
        sample.doc["id"], sample.doc["status"], sample.doc.get("attempt", 0), dumps(sample.doc.get("output"))))
    out.write("next: `buquet list --status completed`, `buquet get %s`, `buquet stats`\n" % sample.doc["id"])
    return EXIT_OK if counts.get("completed") == total else EXIT_FAILED


_COMMANDS = {
    "submit": _cmd_submit, "get": _cmd_get, "status": _cmd_get, "history": _cmd_history,
    "replay": _cmd_simple("replay"), "archive": _cmd_simple("archive"), "list": _cmd_list,
    "cancel": _cmd_cancel, "workers": _cmd_workers, "stats": _cmd_stats, "tail": _cmd_tail,
    "sweep": _cmd_sweep, "config": _cmd_config, "worker": _cmd_worker, "schedule": _cmd_schedule,
    "doctor": lambda args, out: _cmd_doctor(args, out), "demo": _cmd_demo,
}


# -- doctor ---------------------------------------------------------------------

class _Check:
    __slots__ = ("name", "verdict", "detail")

    def __init__(self, name, verdict, detail):
        self.name, self.verdict, self.detail = name, verdict, detail


def doctor(store, *, race_threads=8, race_rounds=5, samples=10):
    """Check that a bucket can safely run the queue; returns [_Check] with
    verdicts "ok", "warn" (works, with a caveat), "FAIL" (unsafe), "info".
    Everything it writes lives under .doctor-test/{uuid}/ and is removed,
    every version of it included."""
    import sigv4

    checks = []
    add = lambda name, verdict, detail: checks.append(_Check(name, verdict, detail))  # noqa: E731
    if not isinstance(store, S3Store):
        add("store", "info", "%r: local stores have no provider to check" % (store,))
        return checks
    client, bucket = store.client, store.bucket
    try:
        creds = client.credentials()
        source = getattr(client._credentials, "source", "explicit")
        add("credentials", "ok", "%s (access key %s...)" % (source, creds.access_key[:4]))
    except sigv4.S3Error as exc:
        add("credentials", "FAIL", _one_line(exc))
        return checks
    prefix = ".doctor-test/%s/" % new_uuid()
    try:
        try:
            client.list_objects_v2(bucket, prefix=prefix, max_keys=1)
            add("bucket reachable", "ok", "s3://%s at %s" % (bucket, client.endpoint_url))
        except sigv4.S3Error as exc:
            add("bucket reachable", "FAIL", _one_line(exc))
            return checks
        _doctor_conditionals(client, bucket, prefix, add, race_threads, race_rounds)
        _doctor_listing(client, bucket, prefix, add)
        try:
            state = client.get_bucket_versioning(bucket)
            add("versioning", "info", "%s: %s" % (state or "never enabled", "history keeps every version"
                                                   if state == "Enabled" else "history shows the current state only"))
        except sigv4.S3Error as exc:
            add("versioning", "warn", "cannot read it (%s): history shows the current state only" % _one_line(exc))
        latencies, skews = [], []
        for i in range(samples):
            sent = time.monotonic()
            wall = _utc_now()
            r = client.head_object(bucket, prefix + "a") if i else client.put_object(bucket, prefix + "a", b"x")
            latencies.append(time.monotonic() - sent)
            if r.date is not None:
                skews.append((wall - r.date).total_seconds())
        latencies.sort()
        skew = sorted(skews)[len(skews) // 2] if skews else None
        if skew is None:
            add("clock", "warn", "the server sends no Date header: the queue falls back to the local clock")
        else:
            verdict = "ok" if abs(skew) < 5 else ("warn" if abs(skew) < 600 else "FAIL")
            add("clock skew", verdict, "local clock %+.1fs from the server's (the queue runs on the server's; "
                "signatures fail past 15 min)" % skew)
        add("latency", "info", "median %.1f ms, max %.1f ms over %d requests" % (
            latencies[len(latencies) // 2] * 1000, latencies[-1] * 1000, len(latencies)))
    finally:
        _doctor_cleanup(client, bucket, prefix, add)
    return checks


def _doctor_conditionals(client, bucket, prefix, add, threads, rounds):
    import sigv4

    key = prefix + "cas"
    first = client.put_object(bucket, key, b"0", if_none_match="*")
    try:
        client.put_object(bucket, key, b"1", if_none_match="*")
        add("conditional create", "FAIL", "a second If-None-Match: * write replaced the object: two workers "
            "could both submit or claim")
    except sigv4.ConflictError:
        add("conditional create", "ok", "If-None-Match: * refused an existing key")
    stale = first.etag
    current = client.put_object(bucket, key, b"2", if_match=stale)
    try:
        client.put_object(bucket, key, b"3", if_match=stale)
        add("compare-and-swap", "FAIL", "a write with a stale If-Match ETag succeeded: claims are not exclusive")
    except sigv4.ConflictError:
        add("compare-and-swap", "ok", "If-Match refused a stale ETag")
    try:
        client.put_object(bucket, prefix + "missing", b"x", if_match=current.etag)
        add("If-Match on a missing key", "FAIL", "created the object: a deleted task could be resurrected")
    except sigv4.ConflictError as exc:
        add("If-Match on a missing key", "ok", "refused (%s)" % exc.status)
    # A real race: many threads swap from the same ETag; exactly one may win.
    from concurrent.futures import ThreadPoolExecutor

    doubles = 0
    with ThreadPoolExecutor(threads) as pool:
        for n in range(rounds):
            base = client.put_object(bucket, key, b"round-%d" % n).etag

            def swap(i, base=base, n=n):
                try:
                    client.put_object(bucket, key, b"%d-%d" % (n, i), if_match=base)
                    return 1
                except sigv4.ConflictError:
                    return 0
            wins = sum(pool.map(swap, range(threads)))
            doubles += max(0, wins - 1)
    if doubles:
        add("race (%d threads x %d)" % (threads, rounds), "FAIL",
            "%d extra winners: conditional writes are not atomic here" % doubles)
    else:
        add("race (%d threads x %d)" % (threads, rounds), "ok", "one winner per round")
    try:
        client.delete_object(bucket, key, if_match='"0000000000000000000000000000000"')
        still = True
        try:
            client.head_object(bucket, key)
        except sigv4.NoSuchKey:
            still = False
        if still:
            add("conditional delete", "info", "accepted but not applied?")
        else:
            add("conditional delete", "info", "ignored (deleted despite a wrong ETag); buquet never relies on it")
    except sigv4.ConflictError:
        add("conditional delete", "info", "supported; buquet never relies on it")
    except sigv4.S3Error as exc:
        add("conditional delete", "info", "not supported (%s); buquet never relies on it" % exc.status)


def _doctor_listing(client, bucket, prefix, add):
    keys = [prefix + "list/%d" % i for i in range(3)]
    for k in keys:
        client.put_object(bucket, k, b"")
    first = client.list_objects_v2(bucket, prefix=prefix + "list/", max_keys=2)
    rest = client.list_objects_v2(bucket, prefix=prefix + "list/", max_keys=2,
                                  continuation_token=first.next_continuation_token) if first.is_truncated else None
    after = client.list_objects_v2(bucket, prefix=prefix + "list/", start_after=keys[0])
    if first.keys == keys[:2] and first.is_truncated and rest is not None and rest.keys == keys[2:] \
            and after.keys == keys[1:]:
        add("list paging", "ok", "max-keys, continuation tokens and start-after behave")
    else:
        add("list paging", "FAIL", "listing pages wrong (got %r then %r, start-after %r)" % (
            first.keys, rest.keys if rest else None, after.keys))


def _doctor_cleanup(client, bucket, prefix, add):
    import sigv4

    try:
        versions = client.list_object_versions(bucket, prefix=prefix).versions
        for v in versions:
            vid = None if v.version_id in (None, "null") else v.version_id
            client.delete_object(bucket, v.key, version_id=vid)
        left = client.list_object_versions(bucket, prefix=prefix).versions
    except sigv4.S3Error:
        try:
            for k in client.list_objects_v2(bucket, prefix=prefix).keys:
                client.delete_object(bucket, k)
            left = client.list_objects_v2(bucket, prefix=prefix).keys
        except sigv4.S3Error as exc:  # e.g. a wrong secret: report it, do not mask the checks' own error
            add("cleanup", "warn", "could not clean up under %s: %s" % (prefix, exc))
            return
    if left:
        add("cleanup", "warn", "%d objects left under %s" % (len(left), prefix))
    else:
        add("cleanup", "ok", "nothing left behind")


def _cmd_doctor(args, out):
    queue, _ = _queue_for(args)
    checks = doctor(queue.store)
    unsafe = [c for c in checks if c.verdict == "FAIL"]
    data = {"checks": [{"check": c.name, "verdict": c.verdict, "detail": c.detail} for c in checks],
            "safe": not unsafe}

    def human():
        _table([[c.name, c.verdict, c.detail] for c in checks], ["CHECK", "VERDICT", "DETAIL"], out)
        if unsafe:
            out.write("verdict: this bucket cannot run the queue safely: %s\n" % "; ".join(
                "%s: %s" % (c.name, c.detail) for c in unsafe))
        else:
            out.write("verdict: this bucket can run the queue\n")
    _emit(args, out, data, human)
    return EXIT_UNSAFE if unsafe else EXIT_OK


# ============================================================================
# Dashboard: `buquet serve`, a web view of the queue on http.server
# ============================================================================
#
# No framework, no build step: pages are rendered here as HTML strings, one
# same-origin script (/static/dashboard.js) refreshes parts of them from the
# JSON twin of each page, and one stylesheet styles them.
#
#   GET  /                          overview: backlog, tasks per shard, workers,
#                                   schedules, completions/failures per minute
#   GET  /tasks?shard=&status=&type=&after=
#                                   task list, one page of 50 documents
#   GET  /tasks/{id}                task detail and its history as a timeline
#   GET  /api/overview  /api/chart  /api/tasks?...  /api/tasks/{id}
#                                   the same as JSON: {"parts": {element id:
#                                   HTML}, "data": ..., "requests": ...}
#   GET  /static/dashboard.js  /static/dashboard.css
#   POST /tasks/{id}/cancel|replay|archive   /schedules/{id}/trigger
#                                   only with --allow-actions
#
# S3 costs money per request, so every response counts the requests made
# while serving it (a counting view of the store per HTTP request) and the
# page shows the number.  Each view is bounded:
#   overview   LIST ready/ and LIST leases/ (1 per 1,000 keys, at most
#              _INDEX_PAGES each), LIST workers/ + a GET per heartbeat (at most
#              _MAX_WORKERS), LIST schedules/ + a GET per schedule (at most
#              _MAX_SCHEDULES), 1 GET of the oldest ready task;
#   chart      LIST tasks/ with last-modified times (at most _CHART_PAGES), a
#              GET per document changed in the last hour (at most
#              _CHART_READS; finished ones are cached, so a refresh re-reads
#              only what changed); refreshed every 30 s, the rest every 5 s;
#   task list  1 LIST of _PAGE_SIZE keys + a GET per key of that page, every
#              10 s (filters apply to the page read: the cost never grows);
#   task       1 GET (+1 per offloaded payload), and with versioning 1 LIST of
#              versions + a GET per version not yet seen (versions never
#              change; at most _MAX_VERSIONS).
#
# Security: the server binds loopback by default and accepts only loopback
# Host names there (a DNS-rebinding page cannot read it).  GETs never change
# anything.  Actions need --allow-actions, a POST, the per-process token
# embedded in the pages (compared with hmac.compare_digest) and an Origin (or
# Referer) naming this server, so neither a link nor another site's form can
# trigger them.  Pages send Referrer-Policy: no-referrer, under which browsers
# send `Origin: null` with a plain form POST; the page's script therefore
# posts actions with fetch(), which sends the real Origin.  Everything from
# the bucket is HTML-escaped; the Content-Security-Policy allows no inline
# script or style.

_PAGE_SIZE = 50  # task list: documents read per page (one GET each)
_INDEX_PAGES = 10  # ready/ and leases/: 10,000 keys each before the counts say "at least"
_MAX_WORKERS = 50  # heartbeats read per refresh; a bigger fleet is summarised
_MAX_SCHEDULES = 50
_CHART_PAGES = 5  # the chart looks at the first 5,000 task documents; pick a shard for more
_CHART_READS = 200  # documents changed in the last hour read per chart refresh
_MAX_VERSIONS = 25  # a timeline shows the newest 25 versions
_REFRESH = 5.0  # seconds between refreshes of a page; the chart: 6x that
_ALIVE = 90  # a heartbeat older than this (3 missed 30 s beats) is stale
_MAX_SHOWN = 64 * 1024  # characters of an input, output or error shown on a page
_MAX_POST = 4096  # bytes of a form body; an action needs a token and nothing else
_CACHE_SIZE = 5000  # documents kept for the chart and timelines

_SECURITY_HEADERS = (
    ("Content-Security-Policy", "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                                "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"),
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    ("Referrer-Policy", "no-referrer"),
    ("Cache-Control", "no-store"),
)
_LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
_CANCELLABLE = ("pending", "running")
_REPLAYABLE = ("failed", "cancelled", "expired", "completed")
_ARCHIVABLE = ("completed", "failed", "cancelled", "expired")


class _HTTPError(Exception):
    """A response other than 200, with a message for the person reading it."""

    def __init__(self, status, message, headers=()):
        super().__init__(message)
        self.status = status
        self.headers = headers


# -- counting and caching -------------------------------------------------------


class _CountingStore:
    """A store seen through one HTTP request: every call is forwarded and
    counted by S3 operation.  The dashboard asks for at most 1,000 keys per
    listing, so each call is one S3 request."""

    _OPERATIONS = {"get": "GET", "get_version": "GET", "versioning": "GET", "put": "PUT", "delete": "DELETE",
                   "list": "LIST", "list_info": "LIST", "versions": "LIST", "list_etags": "LIST"}

    def __init__(self, store):
        self._store = store
        self._lock = threading.Lock()
        self.counts = {}

    def __repr__(self):
        return repr(self._store)

    def __getattr__(self, name):
        attr = getattr(self._store, name)
        op = self._OPERATIONS.get(name)
        if op is None or not callable(attr):
            return attr

        def counted(*args, **kwargs):
            with self._lock:
                self.counts[op] = self.counts.get(op, 0) + 1
            return attr(*args, **kwargs)
        return counted

    @property
    def total(self):
        with self._lock:
            return sum(self.counts.values())


class _Cache:
    """A small bounded mapping shared by the request threads (oldest out)."""

    def __init__(self, size=_CACHE_SIZE):
        from collections import OrderedDict

        self._items = OrderedDict()
        self._size = size
        self._lock = threading.Lock()

    def get(self, key):
        with self._lock:
            return self._items.get(key)

    def put(self, key, value):
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self._size:
                self._items.popitem(last=False)


class _Dashboard:
    """What the request threads share: the queue, the token, the caches."""

    def __init__(self, queue, *, allow_actions=False, refresh=_REFRESH, log=None, debug=False):
        import secrets

        self.queue = getattr(queue, "sync", queue)  # an AsyncQueue serves too
        self.allow_actions = bool(allow_actions)
        self.token = secrets.token_urlsafe(32)
        self.refresh = float(refresh)
        self.log = log if log is not None else sys.stderr
        self.debug = debug
        self.cache = _Cache()
        self.hits = {}  # path -> requests served, for tests and curiosity
        self._lock = threading.Lock()
        self._versioned = None
        self._pool = None
        self.loopback_only = True  # set by make_server from the bound address

    def executor(self):
        with self._lock:
            if self._pool is None:
                from concurrent.futures import ThreadPoolExecutor

                self._pool = ThreadPoolExecutor(8, thread_name_prefix="buquet-serve")
            return self._pool

    def close(self):
        if self._pool is not None:
            self._pool.shutdown(wait=False)

    def request_queue(self, store):
        """A Queue over a request's counting store, sharing the thread pool
        and what is known of versioning."""
        queue = Queue(store, shard_prefix_len=self.queue.shard_prefix_len)
        queue._pool = self.executor()
        queue._versioned = self._versioned
        return queue

    def versioned(self, queue):
        if self._versioned is None:
            self._versioned = queue.versioning()  # one GET bucket versioning, once per process
        return self._versioned

    def count_hit(self, path):
        with self._lock:
            self.hits[path] = self.hits.get(path, 0) + 1

    def write_log(self, line):
        try:
            self.log.write(line + "\n")
            self.log.flush()
        except (OSError, ValueError):
            pass  # a closed stderr must not take the server down


class _Request:
    """One HTTP request's view of the queue: its own counting store."""

    def __init__(self, dashboard):
        self.dashboard = dashboard
        self.store = _CountingStore(dashboard.queue.store)
        self.queue = dashboard.request_queue(self.store)
        self._now = None

    def now(self):
        if self._now is None:
            self._now = self.queue.now()
        return self._now

    def cost(self):
        counts = dict(self.store.counts)
        return {"total": sum(counts.values()), "by_operation": counts}


# -- HTML helpers ----------------------------------------------------------------------


def _e(value):
    """HTML-escaped text (quotes too: safe in attributes); None shows as -."""
    import html  # imported here, like every module only `buquet serve` needs

    return html.escape("-" if value is None else str(value), quote=True)


def _u(value):
    """A URL path segment."""
    from urllib.parse import quote

    return quote(str(value), safe="")


def _href(path, **params):
    from urllib.parse import urlencode

    query = urlencode([(k, v) for k, v in params.items() if v not in (None, "")])
    return path + ("?" + query if query else "")


def _script_json(value):
    """JSON to embed in <script type="application/json">: no `<`, `>` or `&`
    survives, so `</script>` or `<!--` in the data cannot end the element."""
    text = json.dumps(value, ensure_ascii=False)
    return (text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")
            .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


def _ago(seconds):
    if seconds is None:
        return "?"
    seconds = int(max(0, seconds))
    if seconds < 60:
        return "%ds" % seconds
    if seconds < 3600:
        return "%dm %02ds" % (seconds // 60, seconds % 60)
    if seconds < 86400:
        return "%dh %02dm" % (seconds // 3600, seconds % 3600 // 60)
    return "%dd %02dh" % (seconds // 86400, seconds % 86400 // 3600)


def _time(value, now=None):
    """A timestamp for people: local time and UTC, and how long ago."""
    if not value:
        return "-"
    try:
        dt = parse_timestamp(value) if isinstance(value, str) else value
    except ValueError:
        return _e(value)
    text = '<time datetime="%s">%s</time>' % (_e(format_timestamp(dt)), _e(_when(dt)))
    if now is not None:
        delta = (now - dt).total_seconds()
        text += ' <span class="muted">(%s)</span>' % (
            "%s ago" % _ago(delta) if delta >= 0 else "in %s" % _ago(-delta))
    return text


def _badge(status):
    status = status or "pending"
    known = status if status in STATUSES or status in ("alive", "stale", "enabled", "disabled") else "unknown"
    return '<span class="badge s-%s">%s</span>' % (known, _e(status))


def _pre(value, text=False):
    """A JSON value pretty-printed (or, with text=True, a string as it is),
    escaped, cut at _MAX_SHOWN characters."""
    text = str(value) if text else json.dumps(value, indent=2, ensure_ascii=False)
    note = ""
    if len(text) > _MAX_SHOWN:
        note = '<p class="muted">showing the first %d of %d characters</p>' % (_MAX_SHOWN, len(text))
        text = text[:_MAX_SHOWN]
    return "<pre>%s</pre>%s" % (_e(text), note)


def _short(text, n=90):
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[:n - 1] + "\u2026"


def _html_table(headers, rows, cls=""):
    head = "".join("<th>%s</th>" % h for h in headers)
    body = "".join("<tr>%s</tr>" % "".join("<td>%s</td>" % c for c in row) for row in rows)
    return '<table class="%s"><thead><tr>%s</tr></thead><tbody>%s</tbody></table>' % (cls, head, body)


def _task_link(task_id, text=None):
    return '<a class="id" href="/tasks/%s">%s</a>' % (_u(task_id), _e(text or task_id))


def _action_form(dashboard, path, label, cls=""):
    # Posted by the page's script (fetch sends the Origin); the token is the
    # proof that the request comes from a page this server rendered.
    return ('<form class="action" method="post" action="%s"><input type="hidden" name="token" value="%s">'
            '<button type="submit" class="%s">%s</button></form>' % (_e(path), _e(dashboard.token), cls, _e(label)))


# -- views: each returns a _View; the page and its JSON twin are built from it --


class _View:
    """A page: its title, its sections (element id, heading, HTML), the data
    behind it, and what the script should poll."""

    def __init__(self, title, sections, data, poll, bound, nav, layout="", static=()):
        self.layout = layout
        self.static = static  # sections the refresh leaves alone (a form being filled in)
        self.title = title
        self.sections = sections
        self.data = data
        self.poll = poll
        self.bound = bound
        self.nav = nav


def _list_all(store, prefix, max_pages):
    """Keys under prefix, at most max_pages LISTs of 1,000.  Returns (keys,
    complete)."""
    keys, start = [], None
    for _ in range(max_pages):
        page, truncated = store.list(prefix, start_after=start, limit=1000)
        keys.extend(page)
        if not truncated or not page:
            return keys, True
        start = page[-1]
    return keys, False


def _overview_data(r):
    q, store, now = r.queue, r.store, r.now()
    now_bucket = minute_bucket(now)
    per_shard = {s: {"ready": 0, "scheduled": 0, "running": 0} for s in q.shards}
    oldest = None
    ready_keys, ready_complete = _list_all(store, "ready/", _INDEX_PAGES)
    for key in ready_keys:
        parsed = parse_index_key(key)
        if parsed is None or parsed[0] not in per_shard:
            continue
        due = parsed[1] <= now_bucket
        per_shard[parsed[0]]["ready" if due else "scheduled"] += 1
        if due and (oldest is None or parsed[1] < oldest[0]):
            oldest = (parsed[1], parsed[2])
    lease_keys, leases_complete = _list_all(store, "leases/", _INDEX_PAGES)
    for key in lease_keys:
        parsed = parse_index_key(key)
        if parsed is not None and parsed[0] in per_shard:
            per_shard[parsed[0]]["running"] += 1
    oldest_ready = None
    if oldest is not None:
        # The index gives the minute; the document gives the second (1 GET).
        task, _ = q._read(q._key_for(oldest[1]))
        if task is not None and task.doc.get("status", "pending") == "pending":
            age = (now - parse_timestamp(task.doc["available_at"])).total_seconds()
        else:
            age = (now - _EPOCH).total_seconds() - int(oldest[0]) * 60
        oldest_ready = {"task_id": oldest[1], "age_seconds": max(0.0, age)}
    totals = {k: sum(c[k] for c in per_shard.values()) for k in ("ready", "scheduled", "running")}

    worker_keys, _ = store.list("workers/", limit=1000)
    worker_keys = [k for k in worker_keys if k.endswith(".json")]

    def read_json(key):
        blob = store.get(key)
        if blob is None:
            return None
        try:
            return json.loads(blob.body)
        except (ValueError, RecursionError):
            return None
    workers = []
    for doc in q._map(read_json, worker_keys[:_MAX_WORKERS]):
        if not isinstance(doc, dict) or "last_heartbeat" not in doc:
            continue
        try:
            age = (now - parse_timestamp(doc["last_heartbeat"])).total_seconds()
        except (ValueError, TypeError):
            age = None
        workers.append({
            "worker_id": doc.get("worker_id"), "last_heartbeat": doc.get("last_heartbeat"), "age_seconds": age,
            "alive": age is not None and age < _ALIVE, "current_task": doc.get("current_task"),
            "running_tasks": doc.get("running_tasks"), "shards": doc.get("shards"),
            "tasks_completed": doc.get("tasks_completed"), "tasks_failed": doc.get("tasks_failed")})

    schedule_keys, _ = store.list("schedules/", limit=1000)
    schedule_keys = [k for k in schedule_keys if k.lower().endswith(".json") and not k.endswith("/last_run.json")]
    schedules = []
    for key, blob in zip(schedule_keys, q._map(store.get, schedule_keys[:_MAX_SCHEDULES])):
        if blob is None:
            continue
        try:
            schedule = _decode_schedule(blob.body, blob.etag)
        except ScheduleError as exc:
            schedules.append({"id": key[len("schedules/"):-len(".json")], "error": str(exc)})
            continue
        entry = {"id": schedule.doc["id"], "task_type": schedule.doc["task_type"], "cron": schedule.doc["cron"],
                 "timezone": schedule.doc.get("timezone"), "enabled": schedule.enabled, "next_runs": []}
        try:
            entry["next_runs"] = [format_timestamp(t) for t in schedule.next_runs(now, 3)]
        except (ScheduleError, ValueError) as exc:
            entry["error"] = str(exc)
        schedules.append(entry)
    return {
        "now": format_timestamp(now), "totals": totals, "shards": per_shard, "oldest_ready": oldest_ready,
        "complete": {"ready": ready_complete, "leases": leases_complete},
        "workers": workers, "workers_registered": len(worker_keys),
        "workers_alive": sum(1 for w in workers if w["alive"]),
        "schedules": schedules, "schedules_registered": len(schedule_keys), "shard_count": len(q.shards),
    }


def _render_backlog(data):
    at_least = "" if all(data["complete"].values()) else "\u2265 "
    oldest = data["oldest_ready"]
    cards = [
        ("Ready now", at_least + str(data["totals"]["ready"]), _href("/tasks", status="pending")),
        ("Scheduled later", at_least + str(data["totals"]["scheduled"]), None),
        ("Running", at_least + str(data["totals"]["running"]), _href("/tasks", status="running")),
        ("Oldest ready task waits", _ago(oldest["age_seconds"]) if oldest else "none",
         "/tasks/%s" % _u(oldest["task_id"]) if oldest else None),
        ("Workers alive", "%d of %d" % (data["workers_alive"], data["workers_registered"]), None),
    ]
    out = []
    for label, value, link in cards:
        value_html = '<a href="%s">%s</a>' % (_e(link), _e(value)) if link else _e(value)
        out.append('<div class="card"><div class="value">%s</div><div class="label">%s</div></div>'
                   % (value_html, _e(label)))
    note = ""
    if at_least:
        note = ('<p class="muted">The indexes hold more than %d keys: counts stop there to bound the cost.</p>'
                % (_INDEX_PAGES * 1000))
    return '<div class="cards">%s</div>%s' % ("".join(out), note)


def _render_shards(data):
    """Shards across, counts down: 16 shards fit a screen's width."""
    shards = data["shards"]
    shown = [s for s in sorted(shards) if len(shards) <= 16 or any(shards[s].values())]

    def cell(shard, n, status):
        if not n:
            return '<span class="muted">0</span>'
        if status is None:
            return str(n)
        return '<a href="%s">%d</a>' % (_e(_href("/tasks", shard=shard, status=status)), n)
    head = ["Shard"] + ['<a href="%s">%s</a>' % (_e(_href("/tasks", shard=s)), _e(s)) for s in shown] + ["Total"]
    rows = []
    for label, key, status in (("Ready", "ready", "pending"), ("Scheduled", "scheduled", None),
                               ("Running", "running", "running")):
        rows.append([label] + [cell(s, shards[s][key], status) for s in shown] +
                    ["<strong>%d</strong>" % data["totals"][key]])
    note = ('<p class="muted">From the ready/ and leases/ indexes (hints the task documents overrule; '
            '<code>buquet sweep</code> repairs them). Finished tasks are not indexed: open a shard to see them.</p>')
    return '<div class="scroll">%s</div>%s' % (_html_table(head, rows, "numeric"), note)


def _render_workers(data, now):
    if not data["workers"]:
        return '<p class="muted">No worker has sent a heartbeat (workers/ is empty).</p>'
    rows = []
    for w in data["workers"]:
        current = w.get("current_task")
        try:
            current_html = _task_link(_task_id(current)) if current else '<span class="muted">idle</span>'
        except ValueError:
            current_html = _e(current)
        running = w.get("running_tasks")
        if isinstance(running, list) and len(running) > 1:
            current_html += ' <span class="muted">+%d more</span>' % (len(running) - 1)
        shards = w.get("shards")
        shards_text = ("all" if isinstance(shards, list) and len(shards) >= data["shard_count"] else
                       ",".join(str(s) for s in shards) if isinstance(shards, list) else shards)
        rows.append([_e(w["worker_id"]), _badge("alive" if w["alive"] else "stale"),
                     "%s ago" % _ago(w["age_seconds"]) if w["age_seconds"] is not None else "?",
                     _e(shards_text), current_html, _e(w.get("tasks_completed")), _e(w.get("tasks_failed"))])
    more = data["workers_registered"] - len(data["workers"])
    note = ('<p class="muted">%d more heartbeat files not read (at most %d per refresh).</p>'
            % (more, _MAX_WORKERS)) if more > 0 else ""
    return _html_table(["Worker", "State", "Last heartbeat", "Shards", "Current task", "Done", "Failed"], rows) + note


def _render_schedules(dashboard, data):
    if not data["schedules"]:
        return '<p class="muted">No schedules.</p>'
    rows = []
    for s in data["schedules"]:
        if "task_type" not in s:
            rows.append([_e(s["id"]), "", "", "", "", '<span class="error">unreadable: %s</span>' % _e(s["error"]), ""])
            continue
        runs = "<br>".join(_time(t) for t in s["next_runs"]) or '<span class="error">%s</span>' % _e(s.get("error"))
        action = ""
        if dashboard.allow_actions:
            action = _action_form(dashboard, "/schedules/%s/trigger" % _u(s["id"]), "Run now")
        rows.append([_e(s["id"]), _e(s["task_type"]), "<code>%s</code>" % _e(s["cron"]), _e(s["timezone"] or "UTC"),
                     _badge("enabled" if s["enabled"] else "disabled"), runs, action])
    more = data["schedules_registered"] - len(data["schedules"])
    note = '<p class="muted">%d more schedules not read.</p>' % more if more > 0 else ""
    return _html_table(["Schedule", "Task type", "Cron", "Time zone", "State", "Next runs", ""], rows) + note


def _overview_bound():
    return ("A refresh costs LIST ready/ and LIST leases/ (one per 1,000 keys, at most %d each), LIST workers/ "
            "and a GET per heartbeat (at most %d), LIST schedules/ and a GET per schedule (at most %d), and one "
            "GET of the oldest ready task." % (_INDEX_PAGES, _MAX_WORKERS, _MAX_SCHEDULES))


def _view_overview(r, query):
    data = _overview_data(r)
    now = r.now()
    chart = _view_chart(r, query)
    sections = [
        ("backlog", "Backlog", _render_backlog(data)),
        ("chart", "Finished in the last hour", chart.sections[0][2]),
        ("shards", "Tasks per shard", _render_shards(data)),
        ("workers", "Workers", _render_workers(data, now)),
        ("schedules", "Schedules", _render_schedules(r.dashboard, data)),
    ]
    data["chart"] = chart.data
    every = int(r.dashboard.refresh * 1000)
    poll = [{"url": "/api/overview", "every": every},
            {"url": _href("/api/chart", chart_shard=chart.data["shard"]), "every": every * 6}]
    return _View("Overview", sections, data, poll, _overview_bound(), "overview")


def _view_overview_refresh(r, query):
    """The overview's 5-second refresh: everything but the chart."""
    data = _overview_data(r)
    now = r.now()
    sections = [("backlog", "", _render_backlog(data)), ("shards", "", _render_shards(data)),
                ("workers", "", _render_workers(data, now)), ("schedules", "", _render_schedules(r.dashboard, data))]
    return _View("Overview", sections, data, [], _overview_bound(), "overview")


# -- the chart -----------------------------------------------------------------------


def _chart_data(r, shard=None):
    q, store, now = r.queue, r.store, r.now()
    since = now - timedelta(hours=1)
    prefix = "tasks/%s/" % shard if shard else "tasks/"
    recent, start, complete, scanned = [], None, False, 0
    for _ in range(_CHART_PAGES):
        page, truncated = store.list_info(prefix, start_after=start, limit=1000)
        scanned += len(page)
        recent.extend((k, m) for k, m in page if k.endswith(".json") and (m is None or m >= since))
        if not truncated or not page:
            complete = True
            break
        start = page[-1][0]
    recent.sort(key=lambda km: km[1] or now, reverse=True)
    cache = r.dashboard.cache

    def finished(key_modified):
        key, modified = key_modified
        cached = cache.get(("chart", key, modified)) if modified else None
        if cached is not None:
            return cached
        task, _ = q._read(key)
        if task is None:
            return ("gone", None)
        value = (task.doc.get("status", "pending"), task.doc.get("completed_at"))
        if modified and value[0] in TERMINAL:
            cache.put(("chart", key, modified), value)  # finished documents rarely change again
        return value
    # Reads go to the cache first, so only new or still-moving documents cost a GET.
    before = store.counts.get("GET", 0)
    results = q._map(finished, recent[:_CHART_READS])
    reads = store.counts.get("GET", 0) - before
    first = now.replace(second=0, microsecond=0) - timedelta(minutes=59)
    minutes = [{"t": format_timestamp(first + timedelta(minutes=i)), "completed": 0, "failed": 0} for i in range(60)]
    for status, completed_at in results:
        if status not in ("completed", "failed") or not completed_at:
            continue
        try:
            at = parse_timestamp(completed_at)
        except ValueError:
            continue
        i = int((at - first).total_seconds() // 60)
        if 0 <= i < 60:
            minutes[i][status] += 1
    return {"minutes": minutes, "shard": shard, "scanned": scanned, "changed_last_hour": len(recent),
            "read": reads, "complete": complete and len(recent) <= _CHART_READS,
            "completed": sum(m["completed"] for m in minutes), "failed": sum(m["failed"] for m in minutes)}


def _chart_svg(data):
    """Completions (green) and failures (red) per minute as stacked bars,
    drawn here: no script, no style attribute (the CSP allows neither)."""
    width, height, left, right, top, bottom = 1180, 190, 40, 10, 12, 26
    plot_w, plot_h = width - left - right, height - top - bottom
    minutes = data["minutes"]
    peak = max([m["completed"] + m["failed"] for m in minutes] + [1])
    step = plot_w / 60.0
    parts = ['<svg class="chart" viewBox="0 0 %d %d" role="img" '
             'aria-label="tasks completed and failed per minute, last hour">' % (width, height)]
    for frac in (0.0, 0.5, 1.0):
        y = top + plot_h * (1 - frac)
        parts.append('<line class="grid" x1="%d" x2="%d" y1="%.1f" y2="%.1f"/>' % (left, width - right, y, y))
        parts.append('<text class="axis" x="%d" y="%.1f" text-anchor="end">%s</text>'
                     % (left - 6, y + 4, _e(("%.1f" % (peak * frac)).rstrip("0").rstrip("."))))
    for i, m in enumerate(minutes):
        x = left + i * step + 1
        w = max(step - 2, 1)
        ok_h = plot_h * m["completed"] / peak
        bad_h = plot_h * m["failed"] / peak
        base = top + plot_h
        label = "%s: %d completed, %d failed" % (_when(m["t"]), m["completed"], m["failed"])
        parts.append('<g><title>%s</title>' % _e(label))
        parts.append('<rect class="hit" x="%.1f" y="%d" width="%.1f" height="%d"/>' % (x, top, w, plot_h))
        if ok_h:
            parts.append('<rect class="ok" x="%.1f" y="%.1f" width="%.1f" height="%.1f"/>'
                         % (x, base - ok_h, w, ok_h))
        if bad_h:
            parts.append('<rect class="bad" x="%.1f" y="%.1f" width="%.1f" height="%.1f"/>'
                         % (x, base - ok_h - bad_h, w, bad_h))
        parts.append("</g>")
        if i % 10 == 0 or i == 59:
            t = parse_timestamp(m["t"]).astimezone()
            parts.append('<text class="axis" x="%.1f" y="%d" text-anchor="middle">%s</text>'
                         % (left + (i + 0.5) * step, height - 8, _e(t.strftime("%H:%M"))))
    parts.append("</svg>")
    return "".join(parts)


def _view_chart(r, query):
    shard = _query_shard(r, query, "chart_shard")
    before = r.store.total  # the overview page draws the chart in the same request
    data = _chart_data(r, shard)
    spent = r.store.total - before
    legend = ('<p class="legend"><span class="key ok"></span> %d completed <span class="key bad"></span> %d failed'
              ' <span class="muted">in the last hour, per minute (local time)</span></p>'
              % (data["completed"], data["failed"]))
    notes = ["from %s: %d documents listed, %d changed in the last hour, %d read now (finished ones are cached)."
             % ("shard %s" % _e(shard) if shard else "all shards", data["scanned"], data["changed_last_hour"],
                data["read"])]
    if not data["complete"]:
        notes.append("Partial: the chart lists at most %d documents and reads at most %d per refresh; "
                     "chart one shard for more." % (_CHART_PAGES * 1000, _CHART_READS))
    html = (legend + _chart_svg(data) + '<p class="muted">%s This chart: %d S3 requests (refreshed every %ds).</p>'
            % (" ".join(notes), spent, int(r.dashboard.refresh * 6)))
    if shard or not data["complete"]:
        links = ['<a href="/"%s>all</a>' % (' class="on"' if not shard else "")]
        links += ['<a href="%s"%s>%s</a>' % (_e(_href("/", chart_shard=s)), ' class="on"' if s == shard else "", _e(s))
                  for s in r.queue.shards]
        html += '<p class="shard-links">Chart shard: %s</p>' % " ".join(links)
    return _View("Chart", [("chart", "", html)], data, [],
                 "A chart refresh costs LIST tasks/ (at most %d) and a GET per document changed in the last hour "
                 "(at most %d, finished ones cached)." % (_CHART_PAGES, _CHART_READS), "overview")


# -- task list -------------------------------------------------------------------------

_CURSOR = _LazyRe(r"tasks/[0-9a-f]{1,4}/[^/]{1,200}\.json\Z")


def _query_value(query, name, limit=200):
    value = (query.get(name) or [""])[0]
    if len(value) > limit:
        raise _HTTPError(400, "%s is too long (at most %d characters)" % (name, limit))
    return value


def _query_shard(r, query, name="shard"):
    shard = _query_value(query, name).strip().lower()
    if shard and shard not in r.queue.shards:
        raise _HTTPError(400, "shard must be one of %s..%s, got %r" % (r.queue.shards[0], r.queue.shards[-1], shard))
    return shard or None


def _tasks_data(r, query):
    q, store = r.queue, r.store
    shard = _query_shard(r, query)
    status = _query_value(query, "status").strip()
    if status and status not in STATUSES:
        raise _HTTPError(400, "status must be one of %s, got %r" % (", ".join(STATUSES), status))
    task_type = _query_value(query, "type")
    after = _query_value(query, "after", 300)
    prefix = "tasks/%s/" % shard if shard else "tasks/"
    if after and (not _CURSOR.match(after) or not after.startswith(prefix)):
        raise _HTTPError(400, "after must be a task key under %s, got %r" % (prefix, after))
    keys, truncated = store.list(prefix, start_after=after or None, limit=_PAGE_SIZE)
    docs = [k for k in keys if k.endswith(".json")]
    tasks, unreadable = [], 0
    for task, reason in q._map(q._read, docs):
        if task is None:
            unreadable += 1 if reason else 0
            continue
        if status and task.doc.get("status", "pending") != status:
            continue
        if task_type and task.doc.get("task_type") != task_type:
            continue
        tasks.append(task)
    return {"shard": shard, "status": status or None, "type": task_type or None, "after": after or None,
            "scanned": len(docs), "unreadable": unreadable, "next": keys[-1] if truncated and keys else None,
            "tasks": tasks}


def _render_task_rows(r, data):
    now = r.now()
    rows = []
    for t in data["tasks"]:
        d = t.doc
        error = d.get("last_error")
        rows.append([_task_link(d["id"]), _e(d.get("task_type")), _badge(d.get("status", "pending")),
                     _e(d.get("attempt", 0)), "%s/%s" % (_e(d.get("retry_count", 0)), _e(d.get("max_retries", "-"))),
                     _time(d.get("updated_at"), now), _e(d.get("worker_id") or ""),
                     '<span class="error">%s</span>' % _e(_short(error)) if error else ""])
    filters = dict(shard=data["shard"], status=data["status"], type=data["type"])
    if rows:
        table = _html_table(["Task", "Type", "Status", "Attempt", "Retries", "Updated", "Worker", "Last error"],
                       rows, "tasks")
    else:
        table = '<p class="empty">No task on this page matches.</p>'
    links = []
    if data["after"]:
        links.append('<a href="%s">\u2190 First page</a>' % _e(_href("/tasks", **filters)))
    if data["next"]:
        following = _href("/tasks", after=data["next"], **filters)
        links.append('<a class="next" href="%s">Next page \u2192</a>' % _e(following))
    where = "shard %s" % _e(data["shard"]) if data["shard"] else "all shards"
    summary = ("This page read %d task documents of %s in key order; %d match%s." % (
        data["scanned"], where, len(data["tasks"]), "" if len(data["tasks"]) != 1 else "es"))
    if data["unreadable"]:
        summary += " %d could not be read." % data["unreadable"]
    if (data["status"] or data["type"]) and data["next"]:
        summary += " Filters apply to each page: later pages may hold more."
    return '%s<div class="pager"><span class="muted">%s</span> %s</div>' % (table, summary, " ".join(links))


def _render_filters(r, data):
    def option(value, label, selected):
        return '<option value="%s"%s>%s</option>' % (_e(value), " selected" if selected else "", _e(label))
    shard_opts = [option("", "all shards", not data["shard"])] + [
        option(s, "shard " + s, s == data["shard"]) for s in r.queue.shards]
    status_opts = [option("", "any status", not data["status"])] + [
        option(s, s, s == data["status"]) for s in STATUSES]
    form = ('<form class="filters" method="get" action="/tasks">'
            '<label>Shard <select name="shard">%s</select></label>'
            '<label>Status <select name="status" id="status-filter">%s</select></label>'
            '<label>Type <input name="type" value="%s" placeholder="any type" size="18"></label>'
            '<button type="submit">Filter</button></form>'
            % ("".join(shard_opts), "".join(status_opts), _e(data["type"] or "")))
    chips = []
    for status in ("",) + STATUSES:
        href = _href("/tasks", shard=data["shard"], status=status, type=data["type"])
        chips.append('<a class="chip%s%s" href="%s">%s</a>' % (
            " s-" + status if status else "", " on" if status == (data["status"] or "") else "", _e(href),
            status or "any"))
    return form + '<nav class="chips">%s</nav>' % "".join(chips)


def _view_tasks(r, query):
    data = _tasks_data(r, query)
    sections = [("filters", "Tasks", _render_filters(r, data)), ("task-table", "", _render_task_rows(r, data))]
    public = dict(data, tasks=[t.to_dict() for t in data["tasks"]])
    url = _href("/api/tasks", shard=data["shard"], status=data["status"], type=data["type"], after=data["after"])
    poll = [{"url": url, "every": int(r.dashboard.refresh * 2000)}]
    bound = ("A refresh costs one LIST of up to %d keys and a GET per key of this page, whatever the filters."
             % _PAGE_SIZE)
    return _View("Tasks", sections, public, poll, bound, "tasks", static=("filters",))


# -- task detail ----------------------------------------------------------------------


def _event(prev, cur):
    """What happened between two versions of a task, in words."""
    p, c = (prev or {}), cur
    status, before = c.get("status", "pending"), p.get("status", "pending")
    if prev is None:
        return "submitted" if status == "pending" and not c.get("attempt") else "first recorded version"
    if status == "running" and before == "pending":
        return "claimed by %s (attempt %s)" % (c.get("worker_id") or "?", c.get("attempt", 0))
    if status == "running" and before == "running":
        if c.get("cancel_requested") and not p.get("cancel_requested"):
            return "cancellation requested"
        if c.get("lease_expires_at") != p.get("lease_expires_at"):
            return "lease extended"
        return "updated"
    if status == "pending" and before == "running":
        if c.get("retry_count", 0) > p.get("retry_count", 0):
            return "attempt failed, retry %s scheduled" % c.get("retry_count")
        if c.get("reschedule_count", 0) > p.get("reschedule_count", 0):
            return "rescheduled"
        return "put back (worker shut down)"
    if status == "pending" and before != "pending":
        return "replayed"
    return {"completed": "completed", "failed": "failed", "cancelled": "cancelled", "archived": "archived",
            "expired": "expired"}.get(status, "updated")


def _history(r, task):
    """(versions as docs, newest first, or None when unversioned; total
    count; note)."""
    q, cache = r.queue, r.dashboard.cache
    try:
        if not r.dashboard.versioned(q):
            return None, 0, "This bucket keeps no object versions, so only the current state is known. " \
                            "Enable versioning on the bucket to see every change as a timeline."
        versions = [v for v in q.store.versions(task.key) if not v.is_delete_marker]
    except VersioningUnavailable as exc:
        return None, 0, "No history: %s." % exc
    except BuquetError as exc:  # e.g. no permission to read the bucket's versioning
        return None, 0, "No history: %s." % _one_line(exc)

    def read(version):
        hit = cache.get(("version", task.key, version.version_id))
        if hit is not None:
            return hit
        blob = q.store.get_version(task.key, version.version_id)
        if blob is None:
            return None
        try:
            doc = decode_task(blob.body, blob.etag, task.key).doc
        except InvalidTaskDocument:
            return None
        cache.put(("version", task.key, version.version_id), doc)  # a version never changes
        return doc
    docs = [d for d in q._map(read, versions[:_MAX_VERSIONS]) if d is not None]
    note = None
    if len(versions) > _MAX_VERSIONS:
        note = "Showing the newest %d of %d versions." % (_MAX_VERSIONS, len(versions))
    return docs, len(versions), note


def _render_timeline(docs, now, complete):
    """Versions newest first, each with what changed since the one before;
    the oldest shown has no "before" unless it is the first version."""
    items = []
    for i, doc in enumerate(docs):
        older = docs[i + 1] if i + 1 < len(docs) else None
        label = _event(older, doc) if older is not None or complete else "state"
        details = []
        if doc.get("worker_id"):
            details.append("worker %s" % _e(doc["worker_id"]))
        if doc.get("cancelled_by") and doc.get("cancelled_by") != (older or {}).get("cancelled_by"):
            details.append("by %s" % _e(doc["cancelled_by"]))
        if doc.get("last_error") and doc.get("last_error") != (older or {}).get("last_error"):
            details.append('<span class="error">%s</span>' % _e(_short(doc["last_error"], 200)))
        items.append('<li class="t-%s"><span class="dot"></span><div class="when">%s</div>'
                     '<div class="what">%s %s</div><div class="muted">%s</div></li>' % (
                         _e(doc.get("status", "pending")), _time(doc.get("updated_at"), now),
                         _badge(doc.get("status", "pending")), _e(label if label != doc.get("status") else ""),
                         " \u00b7 ".join(details)))
    return '<ol class="timeline">%s</ol>' % "".join(items)


def _render_stamps(doc, now):
    """Without versions: the moments the document itself records."""
    stamps = [("created_at", "submitted"), ("available_at", "available"), ("lease_expires_at", "lease ends"),
              ("cancelled_at", "cancelled"), ("expired_at", "expired"), ("completed_at", "finished"),
              ("updated_at", "last change")]
    found = [(doc.get(name), label) for name, label in stamps if doc.get(name)]
    found.sort(key=lambda vl: parse_timestamp(vl[0]), reverse=True)
    items = ['<li><span class="dot"></span><div class="when">%s</div><div class="what">%s</div></li>'
             % (_time(v, now), _e(label)) for v, label in found]
    return '<ol class="timeline plain">%s</ol>' % "".join(items)


def _task_actions(dashboard, doc):
    if not dashboard.allow_actions:
        return '<p class="muted">Read-only: start with <code>buquet serve --allow-actions</code> to act on tasks.</p>'
    status, tid = doc.get("status", "pending"), _u(doc["id"])
    forms = []
    if status in _CANCELLABLE and not doc.get("cancel_requested"):
        forms.append(_action_form(dashboard, "/tasks/%s/cancel" % tid,
                                  "Cancel" if status == "pending" else "Request cancellation", "danger"))
    if status in _REPLAYABLE:
        forms.append(_action_form(dashboard, "/tasks/%s/replay" % tid, "Replay"))
    if status in _ARCHIVABLE:
        forms.append(_action_form(dashboard, "/tasks/%s/archive" % tid, "Archive"))
    if not forms:
        return '<p class="muted">No action applies to a %s task.</p>' % _e(status)
    return '<div class="actions">%s</div>' % "".join(forms)


def _view_task(r, task_id):
    try:
        task_id = _task_id(task_id)
    except ValueError as exc:
        raise _HTTPError(400, str(exc))
    q, now = r.queue, r.now()
    task = q.get(task_id)
    if task is None:
        raise TaskNotFound(task_id)
    doc = task.doc
    status = doc.get("status", "pending")
    fields = [
        ("Status", _badge(status) + (' <span class="muted">cancellation requested</span>'
                                      if doc.get("cancel_requested") else "")),
        ("Type", _e(doc.get("task_type"))), ("Shard", _e(doc.get("shard"))),
        ("Attempts", "%s <span class=\"muted\">(retries %s of %s, reschedules %s)</span>" % (
            _e(doc.get("attempt", 0)), _e(doc.get("retry_count", 0)), _e(doc.get("max_retries", "-")),
            _e(doc.get("reschedule_count", 0)))),
        ("Worker", _e(doc.get("worker_id") or "")), ("Lease", "%ss per attempt" % _e(doc.get("timeout_seconds"))),
    ]
    for name, label in (("created_at", "Created"), ("available_at", "Available"), ("updated_at", "Updated"),
                        ("lease_expires_at", "Lease expires"), ("completed_at", "Finished"),
                        ("cancelled_at", "Cancelled"), ("cancelled_by", "Cancelled by"),
                        ("expires_at", "Expires if not started"), ("expired_at", "Expired")):
        if doc.get(name):
            fields.append((label, _time(doc[name], now) if name.endswith("_at") else _e(doc[name])))
    info = '<dl class="fields">%s</dl>' % "".join("<dt>%s</dt><dd>%s</dd>" % f for f in fields)
    info += _task_actions(r.dashboard, doc)

    def payload(name, ref_name):
        if doc.get(ref_name):
            try:
                value = (q.load_input if name == "input" else q.load_output)(task)
            except (BuquetError, ValueError) as exc:
                return '<p class="error">offloaded to %s, which cannot be read: %s</p>' % (
                    _e(doc[ref_name]), _e(_one_line(exc)))
            return '<p class="muted">offloaded to %s</p>%s' % (_e(doc[ref_name]), _pre(value))
        value = doc.get(name)
        return _pre(value) if value is not None else '<p class="muted">none</p>'
    error = doc.get("last_error")
    versions, total, note = _history(r, task)
    if versions is None:
        timeline = '<p class="note">%s</p>%s' % (_e(note), _render_stamps(doc, now))
    else:
        timeline = _render_timeline(versions, now, total <= _MAX_VERSIONS)
        if note:
            timeline += '<p class="muted">%s</p>' % _e(note)
    sections = [
        ("task", "Task %s" % _e(task_id), info),
        ("timeline", "History", timeline),
        ("input", "Input", payload("input", "input_ref")),
        ("output", "Output", payload("output", "output_ref")),
        ("error", "Last error", _pre(error, text=True) if error else '<p class="muted">none</p>'),
    ]
    data = {"task": task.to_dict(), "versioned": versions is not None, "note": note,
            "versions": versions or [], "versions_total": total}
    poll = [{"url": "/api/tasks/%s" % _u(task_id), "every": int(r.dashboard.refresh * 1000)}]
    bound = ("A refresh costs one GET of the task (one more per offloaded payload) and, when the bucket keeps "
             "versions, one LIST of its versions and a GET per version not seen before (at most %d)."
             % _MAX_VERSIONS)
    return _View("Task %s" % task_id[:8], sections, data, poll, bound, "tasks", "detail")


# -- actions (POST only) --------------------------------------------------------------


def _act(r, kind, ident):
    """Perform an action; returns (message, where to go next)."""
    q = r.queue
    if kind == "trigger":
        task = q.trigger_schedule(ident)
        return "schedule %s: submitted task %s" % (ident, task.doc["id"]), "/tasks/%s" % task.doc["id"]
    try:
        task_id = _task_id(ident)
    except ValueError as exc:
        raise _HTTPError(400, str(exc))
    if kind == "cancel":
        task = q.request_cancellation(task_id, cancelled_by="dashboard")
        done = "cancelled" if task.doc.get("status") == "cancelled" else "cancellation requested"
    elif kind == "replay":
        task = q.replay(task_id)
        done = "replayed"
    else:
        task = q.archive(task_id)
        done = "archived"
    return "task %s %s" % (task_id, done), "/tasks/%s" % task_id


# -- pages -------------------------------------------------------------------------------


def _layout(dashboard, view, cost, store_name):
    nav = "".join('<a href="%s"%s>%s</a>' % (href, ' class="on"' if view.nav == key else "", label)
                  for key, href, label in (("overview", "/", "Overview"), ("tasks", "/tasks", "Tasks")))
    mode = ('<span class="mode act">actions allowed</span>' if dashboard.allow_actions
            else '<span class="mode">read-only</span>')
    body = "".join('<section class="sec-%s">%s<div id="%s">%s</div></section>' % (
        sid, "<h2>%s</h2>" % heading if heading else "", sid, html) for sid, heading, html in view.sections)
    config = {"poll": view.poll}
    live = "live: refreshed every %ss" % ("%.1f" % (view.poll[0]["every"] / 1000.0)).rstrip("0").rstrip(".") \
        if view.poll else "not refreshed"
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<title>buquet \u00b7 %s</title><link rel="icon" href="/static/favicon.svg">'
        '<link rel="stylesheet" href="/static/dashboard.css">'
        '<script type="application/json" id="buquet-config">%s</script>'
        '<script src="/static/dashboard.js" defer></script></head><body>'
        '<header><a class="brand" href="/">buquet</a><nav>%s</nav><span class="store">%s</span>%s</header>'
        '<main class="%s"><p id="flash" class="flash" hidden></p>%s</main>'
        '<footer><p><span id="cost">%s</span> \u00b7 <span id="live">%s</span></p>'
        '<p class="muted">%s</p></footer></body></html>\n'
        % (_e(view.title), _script_json(config), nav, _e(store_name), mode, _e(view.layout), body, _cost_html(cost),
           _e(live), _e(view.bound)))


def _cost_html(cost):
    ops = ", ".join("%s %d" % kv for kv in sorted(cost["by_operation"].items()))
    return "this refresh: %d S3 request%s%s" % (cost["total"], "" if cost["total"] == 1 else "s",
                                                 " (%s)" % ops if ops else "")


def _error_html(status, message):
    import http

    try:
        reason = http.HTTPStatus(status).phrase
    except ValueError:
        reason = "Error"
    return ('<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>%d %s \u00b7 buquet</title>'
            '<link rel="stylesheet" href="/static/dashboard.css"></head><body>'
            '<header><a class="brand" href="/">buquet</a></header><main><section><h2>%d %s</h2>'
            '<p class="error-message">%s</p><p><a href="/">Back to the overview</a></p></section></main>'
            '</body></html>\n' % (status, _e(reason), status, _e(reason), _e(message)))


_ACTION_PATH = _LazyRe(r"/(?:tasks/([^/]+)/(cancel|replay|archive)|schedules/([^/]+)/(trigger))\Z")
_TASK_PATH = _LazyRe(r"/(api/)?tasks/([^/]+)\Z")
_PAGES = {"/": _view_overview, "/tasks": _view_tasks}
_API = {"/api/overview": _view_overview_refresh, "/api/chart": _view_chart, "/api/tasks": _view_tasks}


class _HandlerMixin:
    """The request handler (mixed with http.server's BaseHTTPRequestHandler
    in make_server, so that this section imports no server module)."""

    server_version = "buquet"
    sys_version = ""
    dashboard = None  # set on the class made by make_server

    # -- plumbing -------------------------------------------------------------

    def log_request(self, code="-", size="-"):
        pass  # one line per request is written by _respond, with the cost

    def log_message(self, format, *args):
        self.dashboard.write_log("%s %s" % (self.address_string(), format % args))

    def send_error(self, code, message=None, explain=None):
        # http.server's own errors (bad request line, unknown method) get the
        # same small page and headers as ours.
        self._respond(code, _error_html(code, message or explain or "request refused"),
                      "text/html; charset=utf-8", error=message)

    def _respond(self, status, body, content_type, headers=(), error=None):
        data = body.encode("utf-8") if isinstance(body, str) else body
        try:
            self.send_response(status)
            for name, value in _SECURITY_HEADERS:
                self.send_header(name, value)
            for name, value in headers:
                self.send_header(name, value)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the browser went away
        request = getattr(self, "_request", None)
        spent = "%.0fms" % ((time.monotonic() - self._started) * 1000) if getattr(self, "_started", None) else "-"
        line = '"%s" %d %dB %s s3=%s' % (
            getattr(self, "requestline", "") or "-", status, len(data), spent,
            request.store.total if request is not None else 0)
        if error:
            line += " error: %s" % _one_line(error)
        self.log_message("%s", line)

    def _wants_json(self, path):
        return path.startswith("/api/") or "application/json" in (self.headers.get("Accept") or "")

    def _fail(self, path, status, message, headers=()):
        if self._wants_json(path):
            body = json.dumps({"error": message}, ensure_ascii=False)
            self._respond(status, body, "application/json; charset=utf-8", headers, error=message)
        else:
            self._respond(status, _error_html(status, message), "text/html; charset=utf-8", headers, error=message)

    def _host_ok(self):
        """On loopback, only loopback names: a page whose DNS name was
        rebound to 127.0.0.1 sends its own name as Host and is refused."""
        if not self.dashboard.loopback_only:
            return True
        host = (self.headers.get("Host") or "").strip().lower()
        if host.startswith("["):
            name = host[1:].partition("]")[0]
        else:
            name = host.rpartition(":")[0] if ":" in host else host
        return name in _LOOPBACK_NAMES or name.endswith(".localhost")

    def _origin_ok(self):
        """The POST comes from a page of this server: its Origin (or, when a
        browser sends none, its Referer) names the Host it was sent to."""
        from urllib.parse import urlsplit

        host = (self.headers.get("Host") or "").lower()
        origin = self.headers.get("Origin")
        if origin is not None:
            return origin.lower() == "http://" + host, "Origin %s is not this server" % origin
        referer = self.headers.get("Referer")
        if referer:
            parts = urlsplit(referer)
            return (parts.scheme == "http" and parts.netloc.lower() == host,
                    "Referer %s is not this server" % referer)
        return False, "the request has neither Origin nor Referer"

    # -- methods ----------------------------------------------------------------

    def do_GET(self):
        self._handle("GET")

    def do_HEAD(self):
        self._handle("GET")

    def do_POST(self):
        self._handle("POST")

    def _handle(self, method):
        from urllib.parse import parse_qs, unquote, urlsplit

        self._started = time.monotonic()
        self._request = None
        url = urlsplit(self.path)
        path = url.path
        d = self.dashboard
        try:
            if not self._host_ok():
                raise _HTTPError(400, "unexpected Host %r: this dashboard answers only to loopback names"
                                 % self.headers.get("Host"))
            action = _ACTION_PATH.match(path)
            if action:
                if method != "POST":
                    raise _HTTPError(405, "actions change the queue, so they take a POST (with the page's token)",
                                     [("Allow", "POST")])
                d.count_hit(path)
                return self._action(path, unquote(action.group(1) or action.group(3)),
                                    action.group(2) or action.group(4))
            if method != "GET":
                raise _HTTPError(405, "%s is read-only: use GET" % path, [("Allow", "GET, HEAD")])
            if path.startswith("/static/") or path == "/favicon.ico":
                return self._static(path)
            query = parse_qs(url.query, keep_blank_values=True)
            task = _TASK_PATH.match(path)
            if task:
                view, as_json = (lambda r, q: _view_task(r, unquote(task.group(2)))), bool(task.group(1))
            elif path in _PAGES:
                view, as_json = _PAGES[path], False
            elif path in _API:
                view, as_json = _API[path], True
            else:
                raise _HTTPError(404, "no page at %s" % path)
            d.count_hit(path)
            self._request = _Request(d)
            result = view(self._request, query)
            cost = self._request.cost()
            if as_json:
                parts = {sid: html for sid, _, html in result.sections if sid not in result.static}
                parts["cost"] = _cost_html(cost)
                body = json.dumps({"parts": parts, "data": result.data, "requests": cost, "bound": result.bound},
                                  ensure_ascii=False, default=str)
                return self._respond(200, body, "application/json; charset=utf-8")
            page = _layout(d, result, cost, repr(d.queue.store))
            return self._respond(200, page, "text/html; charset=utf-8")
        except Exception as exc:  # every failure is a small page, never a traceback
            status, message, headers = self._classify(exc)
            if status == 500 and d.debug:
                import traceback

                traceback.print_exc(file=d.log)
            return self._fail(path, status, message, headers)

    @staticmethod
    def _classify(exc):
        if isinstance(exc, _HTTPError):
            return exc.status, str(exc), exc.headers
        if isinstance(exc, TaskNotFound):
            return 404, str(exc), ()
        if isinstance(exc, ScheduleError):
            return (404 if str(exc).startswith("no schedule") else 400), str(exc), ()
        if isinstance(exc, (InvalidTransition, LeaseMismatch, ConflictError)):
            return 409, str(exc), ()
        if isinstance(exc, (ValueError, UsageError)):
            return 400, _one_line(exc), ()
        if isinstance(exc, BuquetError):
            return 502, "the store failed: %s" % _one_line(exc), ()
        return 500, "internal error (%s): %s" % (type(exc).__name__, _one_line(exc)), ()

    def _action(self, path, ident, kind):
        import hmac
        from urllib.parse import parse_qs

        d = self.dashboard
        if not d.allow_actions:
            raise _HTTPError(403, "this dashboard is read-only: start it with `buquet serve --allow-actions`")
        ok, why = self._origin_ok()
        if not ok:
            raise _HTTPError(403, "refused: %s (actions come from the dashboard's own pages)" % why)
        try:
            length = int(self.headers.get("Content-Length") or "0")
        except ValueError:
            raise _HTTPError(400, "bad Content-Length")
        if length > _MAX_POST:
            raise _HTTPError(413, "the form is larger than %d bytes" % _MAX_POST)
        form = parse_qs(self.rfile.read(length).decode("utf-8", "replace")) if length > 0 else {}
        token = (form.get("token") or [""])[0]
        if not hmac.compare_digest(token.encode("utf-8"), d.token.encode("utf-8")):
            raise _HTTPError(403, "refused: the token is missing or wrong (reload the page: "
                                  "the server may have restarted)")
        self._request = _Request(d)
        message, location = _act(self._request, kind, ident)
        if self._wants_json(path):
            body = json.dumps({"ok": True, "message": message, "location": location, "requests":
                               self._request.cost()}, ensure_ascii=False)
            return self._respond(200, body, "application/json; charset=utf-8")
        return self._respond(303, _error_html(303, message), "text/html; charset=utf-8",
                             [("Location", location)])

    def _static(self, path):
        if path == "/static/dashboard.js":
            return self._respond(200, _DASHBOARD_JS, "text/javascript; charset=utf-8")
        if path == "/static/dashboard.css":
            return self._respond(200, _DASHBOARD_CSS, "text/css; charset=utf-8")
        if path in ("/static/favicon.svg", "/favicon.ico"):
            return self._respond(200, _FAVICON, "image/svg+xml")
        raise _HTTPError(404, "no file at %s" % path)


# The page script: refresh the parts of a page from its JSON twin every few
# seconds (paused while the tab is hidden), and post actions with fetch().
# Each page names what to poll in its JSON config block.
_DASHBOARD_JS = r"""// buquet dashboard: live refresh and actions, no framework.
(function () {
  "use strict";
  var config = JSON.parse(document.getElementById("buquet-config").textContent);
  var live = document.getElementById("live");
  function say(text) { if (live) { live.textContent = text; } }

  function poller(spec) {
    var timer = null, busy = false;
    function arm() {
      if (timer === null && !busy && !document.hidden) { timer = setTimeout(tick, spec.every); }
    }
    function tick() {
      timer = null;
      if (document.hidden) { return; }
      busy = true;
      fetch(spec.url, {headers: {Accept: "application/json"}, cache: "no-store", credentials: "same-origin"})
        .then(function (r) {
          return r.json().then(function (body) {
            if (!r.ok) { throw new Error(body.error || ("HTTP " + r.status)); }
            return body;
          });
        })
        .then(function (body) {
          Object.keys(body.parts).forEach(function (id) {
            var el = document.getElementById(id);
            if (el) { el.innerHTML = body.parts[id]; }  // server-rendered, escaped HTML
          });
          say("live: updated " + new Date().toLocaleTimeString());
        })
        .catch(function (err) { say("refresh failed: " + err.message + " (will retry)"); })
        .then(function () { busy = false; arm(); });
    }
    document.addEventListener("visibilitychange", function () {
      clearTimeout(timer);
      timer = null;
      if (document.hidden) { say("paused while the tab is hidden"); } else if (!busy) { tick(); }
    });
    arm();
  }
  (config.poll || []).forEach(poller);

  function flash(text) {
    var el = document.getElementById("flash");
    if (el) { el.textContent = text; el.hidden = false; }
  }
  // Actions: fetch() sends the page's Origin (a plain form POST under
  // Referrer-Policy: no-referrer would send "Origin: null", which is refused).
  document.addEventListener("submit", function (event) {
    var form = event.target;
    if (!form.classList || !form.classList.contains("action")) { return; }
    event.preventDefault();
    var button = form.querySelector("button");
    if (button) { button.disabled = true; }
    fetch(form.action, {method: "POST", body: new URLSearchParams(new FormData(form)),
                        headers: {Accept: "application/json"}, credentials: "same-origin"})
      .then(function (r) { return r.json(); })
      .then(function (body) {
        if (body.location) { window.location.assign(body.location); return; }
        flash(body.error || "the action failed");
      })
      .catch(function (err) { flash("the action failed: " + err.message); })
      .then(function () { if (button) { button.disabled = false; } });
  });
})();
"""

_FAVICON = ('<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 32 32"><path d="M5 9h22l-3 19H8z" fill="#2f5bd3"/>'
            '<ellipse cx="16" cy="9" rx="11" ry="3.5" fill="#1d2330"/></svg>')

_DASHBOARD_CSS = """
:root { --fg: #1d2330; --muted: #6b7385; --line: #dde1e8; --bg: #f6f7f9; --card: #fff; --accent: #2f5bd3;
        --ok: #1e8e4f; --bad: #c8372d; --warn: #b7791f; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg);
       background: var(--bg); }
header { display: flex; align-items: center; gap: 20px; padding: 10px 24px; background: #1d2330; color: #e8ebf1; }
header a { color: #e8ebf1; text-decoration: none; }
header .brand { font-weight: 700; font-size: 18px; letter-spacing: .5px; }
header nav a { padding: 4px 10px; border-radius: 4px; }
header nav a.on, header nav a:hover { background: #364055; }
header .store { margin-left: auto; color: #aab2c2; font-size: 12px; font-family: ui-monospace, monospace; }
.mode { font-size: 12px; padding: 2px 8px; border-radius: 10px; background: #364055; }
.mode.act { background: #8a3b12; }
main { padding: 16px 24px; max-width: 1280px; }
section { background: var(--card); border: 1px solid var(--line); border-radius: 6px; padding: 12px 16px;
          margin-bottom: 16px; }
h2 { font-size: 15px; margin: 0 0 10px; }
a { color: var(--accent); }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: 5px 10px; border-bottom: 1px solid var(--line); vertical-align: top; }
th { font-size: 12px; text-transform: uppercase; letter-spacing: .4px; color: var(--muted); font-weight: 600; }
tbody tr:nth-child(even) { background: #fafbfc; }
tbody tr:hover { background: #f0f3f9; }
table.numeric td + td, table.numeric th + th { text-align: right; font-variant-numeric: tabular-nums; }
.scroll { overflow-x: auto; }
table.numeric th { text-transform: none; }
.id, code, pre, time { font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size: 12.5px; }
pre { background: #f3f4f7; border: 1px solid var(--line); border-radius: 4px; padding: 10px; overflow: auto;
      max-height: 420px; white-space: pre-wrap; word-break: break-word; margin: 0; }
.muted { color: var(--muted); }
.error, .error-message { color: var(--bad); }
.badge { display: inline-block; padding: 1px 8px; border-radius: 10px; font-size: 12px; font-weight: 600;
         background: #e6e8ee; color: #3a4152; }
.chip { padding: 2px 10px; border-radius: 12px; border: 1px solid var(--line); text-decoration: none; font-size: 12px;
        background: #fff; color: var(--fg); }
.s-pending { background: #e3ecfd; color: #2f5bd3; }
.s-running { background: #fdf1dc; color: #9a5b00; }
.s-completed, .s-alive, .s-enabled { background: #dff3e7; color: var(--ok); }
.s-failed, .s-stale { background: #fbe3e1; color: var(--bad); }
.s-cancelled, .s-disabled { background: #ececec; color: #5b5f66; }
.s-archived { background: #ece6f6; color: #5e3d99; }
.s-expired { background: #f4e8dc; color: #8a5a2b; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; }
.card { flex: 1 1 150px; border: 1px solid var(--line); border-radius: 6px; padding: 10px 14px; background: #fbfcfd; }
.card .value { font-size: 24px; font-weight: 650; font-variant-numeric: tabular-nums; }
.card .value a { text-decoration: none; }
.card .label { color: var(--muted); font-size: 12px; }
svg.chart { display: block; width: 100%; height: auto; }
svg.chart .grid { stroke: #e3e6ec; stroke-width: 1; }
svg.chart .axis { fill: var(--muted); font-size: 11px; }
svg.chart .ok { fill: var(--ok); }
svg.chart .bad { fill: var(--bad); }
svg.chart .hit { fill: transparent; }
svg.chart g:hover .hit { fill: #eef1f6; }
.legend .key { display: inline-block; width: 10px; height: 10px; border-radius: 2px; margin: 0 4px 0 10px; }
.shard-links a { margin-right: 6px; } .shard-links a.on { font-weight: 700; text-decoration: none; }
.legend .key.ok { background: var(--ok); } .legend .key.bad { background: var(--bad); }
form.filters { display: flex; gap: 14px; align-items: end; flex-wrap: wrap; margin-bottom: 10px; }
form.filters label { display: flex; flex-direction: column; font-size: 12px; color: var(--muted); gap: 3px; }
select, input, button { font: inherit; padding: 4px 8px; border: 1px solid #c5cad4; border-radius: 4px;
                        background: #fff; }
button { cursor: pointer; background: #eef1f6; }
button.danger { color: var(--bad); border-color: #e3a6a1; }
.chips { display: flex; gap: 6px; flex-wrap: wrap; }
.chip.on { outline: 2px solid var(--accent); }
.pager { display: flex; gap: 16px; align-items: center; margin-top: 10px; flex-wrap: wrap; }
.pager .next { margin-left: auto; }
.empty { color: var(--muted); padding: 16px 0; }
dl.fields { display: grid; grid-template-columns: 170px 1fr; gap: 4px 12px; margin: 0 0 12px; }
dl.fields dt { color: var(--muted); } dl.fields dd { margin: 0; }
.actions { display: flex; gap: 8px; }
form.action { display: inline; margin: 0; }
.note { background: #fff8e6; border: 1px solid #f0dca8; padding: 8px 12px; border-radius: 4px; }
.flash { background: #fbe3e1; border: 1px solid #eab3ae; padding: 8px 12px; border-radius: 4px; color: var(--bad); }
ol.timeline { list-style: none; margin: 0; padding: 0 0 0 18px; border-left: 2px solid var(--line); }
ol.timeline li { position: relative; padding: 4px 0 10px 12px; }
ol.timeline .dot { position: absolute; left: -25px; top: 9px; width: 12px; height: 12px; border-radius: 50%;
                   background: #9aa3b5; border: 2px solid #fff; }
ol.timeline li.t-completed .dot { background: var(--ok); } ol.timeline li.t-failed .dot { background: var(--bad); }
ol.timeline li.t-running .dot { background: var(--warn); } ol.timeline li.t-pending .dot { background: var(--accent); }
ol.timeline .when { font-size: 12px; color: var(--muted); }
main.detail { display: grid; grid-template-columns: minmax(0, 1fr) minmax(0, 1fr); gap: 16px; align-items: start; }
main.detail section { margin: 0; }
main.detail .flash, main.detail .sec-error { grid-column: 1 / -1; }
footer { padding: 0 24px 24px; color: var(--muted); font-size: 12px; }
footer p { margin: 4px 0; }
#cost { font-weight: 600; color: var(--fg); }
"""


# -- serving --------------------------------------------------------------------------


def make_server(queue, host="127.0.0.1", port=8080, allow_actions=False, *, refresh=_REFRESH, log=None,
                debug=False):
    """The dashboard's HTTP server, bound and ready (call serve_forever).
    port=0 picks a free port; the URL is `server.url`.  `log`: where the
    access log goes (default stderr)."""
    import ipaddress
    import socket
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    dashboard = _Dashboard(queue, allow_actions=allow_actions, refresh=refresh, log=log, debug=debug)
    handler = type("DashboardHandler", (_HandlerMixin, BaseHTTPRequestHandler), {"dashboard": dashboard})

    class Server(ThreadingHTTPServer):
        daemon_threads = True  # a slow browser must not hold up shutdown
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

        def server_close(self):
            super().server_close()
            dashboard.close()

    server = Server((host, port), handler)
    bound_host, bound_port = server.server_address[:2]
    try:
        dashboard.loopback_only = ipaddress.ip_address(bound_host).is_loopback
    except ValueError:
        dashboard.loopback_only = False
    server.dashboard = dashboard
    server.url = "http://%s:%d/" % ("[%s]" % bound_host if ":" in bound_host else bound_host, bound_port)
    return server


def serve(queue, host="127.0.0.1", port=8080, allow_actions=False, ready=None, **options):
    """Serve the dashboard until Ctrl-C or SIGTERM.  `ready`: a
    threading.Event set once the server listens (for tests)."""
    return _serve_until_stopped(make_server(queue, host, port, allow_actions, **options), ready)


def _serve_until_stopped(server, ready=None):
    import signal

    previous = {}

    def stop(signum, frame):
        # shutdown() waits for serve_forever, which runs in this thread: ask
        # from another one.  Requests in flight run on daemon threads.
        threading.Thread(target=server.shutdown, name="buquet-serve-stop", daemon=True).start()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, stop)
    try:
        if ready is not None:
            ready.set()
        server.serve_forever(poll_interval=0.2)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        server.server_close()
    return server


def _add_serve_parser(sub):
    help = "serve a web dashboard of the queue (read-only unless --allow-actions)"
    c = sub.add_parser("serve", help=help, description=help + ". It has no login: keep it on loopback, or put it "
                       "behind something that authenticates.")
    c.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    c.add_argument("--port", type=int, default=8080, help="port (default 8080; 0 picks a free one)")
    c.add_argument("--allow-actions", action="store_true",
                   help="allow cancel, replay, archive and running a schedule from the pages")
    return c


def _cmd_serve(args, out):
    if not 0 <= args.port <= 65535:
        raise UsageError("--port must be 0..65535, got %d" % args.port)
    queue, _ = _queue_for(args)
    try:
        server = make_server(queue, args.host, args.port, args.allow_actions, debug=getattr(args, "debug", False))
    except OSError as exc:
        raise OSError("cannot listen on %s:%d: %s (choose another with --host/--port)"
                      % (args.host, args.port, exc.strerror or exc)) from None
    exposed = not server.dashboard.loopback_only
    sys.stderr.write("buquet: dashboard on %s over %s (%s); Ctrl-C stops it\n" % (
        server.url, queue.store, "actions allowed" if args.allow_actions else "read-only"))
    if exposed:
        sys.stderr.write("buquet: warning: %s is not a loopback address and the dashboard has no login: anyone "
                         "who can reach it sees every task%s\n" % (args.host, " and can act on them"
                                                                   if args.allow_actions else ""))
    _serve_until_stopped(server)
    sys.stderr.write("buquet: dashboard stopped\n")
    return EXIT_OK


_COMMANDS["serve"] = _cmd_serve


if __name__ == "__main__":
    # `python -m buquet` runs this file as __main__; hand over to the real
    # module so that user code importing buquet sees the same classes.
    import buquet

    sys.exit(buquet.main())
