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

import hashlib
import json
import os
import random
import re
import sys
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone

__all__ = [
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
    "StoreError",
    "Task",
    "TaskNotFound",
    "TRANSITIONS",
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
        super().__init__("cannot %s task %s: it is %s%s" % (event.replace("_", " "), task_id, status, expected))
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

_TS_RE = re.compile(
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
    leap = second == 60  # chrono accepts a leap second; Python cannot hold it
    frac = m.group(7) or ""
    micro = int(frac[:6].ljust(6, "0")) if frac else 0
    dt = datetime(year, month, day, hour, minute, 59 if leap else second, micro, tzinfo=timezone.utc)
    if leap:
        dt = dt.replace(microsecond=999999)
    if m.group(10):
        offset = timedelta(hours=int(m.group(11)), minutes=int(m.group(12)))
        dt = dt - offset if m.group(10) == "+" else dt + offset
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


def sha256_tag(text):
    return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()


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
        task_id = str(uuid.UUID(parts[3]))
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
        uuid.UUID(doc["id"])
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
                uuid.UUID(doc[name])
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


def decode_task(body, etag=None, key=None):
    """Bytes of a task document -> Task; InvalidTaskDocument when the bytes
    are not a document both implementations can use."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidTaskDocument("not JSON: %s" % exc) from None
    validate_task_document(doc)
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
_CLEAR_LEASE = {"lease_id": None, "lease_expires_at": None, "worker_id": None}
TIMEOUT_ERROR = "Timeout - task exceeded lease duration"


def _ms(dt, ms):
    return dt + timedelta(milliseconds=ms)


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
    if status not in allowed:
        raise InvalidTransition(task_id, status, event, allowed)
    if event in _LEASED and doc.get("lease_id") != lease_id:
        raise LeaseMismatch(task_id, lease_id)
    ts = format_timestamp(now)
    new = dict(doc)
    new["status"] = target
    new["updated_at"] = ts
    if event == "claim":
        timeout = doc.get("timeout_seconds", DEFAULT_TIMEOUT)
        new.update(
            worker_id=args["worker_id"],
            lease_id=args["new_lease_id"],
            attempt=doc.get("attempt", 0) + 1,
            lease_expires_at=format_timestamp(now + timedelta(seconds=timeout)),
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
#   list(prefix, *, start_after=None, limit=1000) -> ([keys], truncated)
#       Keys under prefix, after start_after, ascending UTF-8 byte order.
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
    return '"%s"' % hashlib.md5(body, usedforsecurity=False).hexdigest()


def _utc_now():
    return datetime.now(timezone.utc)


class MemoryStore:
    """An in-memory store for unit tests of queue logic: S3's semantics
    (ETags, conditional writes, ordered listing, optional versions) in one
    process.  `clock` is a callable returning an aware datetime."""

    def __init__(self, *, clock=None, versioned=False):
        self._objects = {}
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
            if self.versioned:
                self._history.setdefault(key, []).append((uuid.uuid4().hex, blob.body, self._clock()))
            return blob.etag

    def delete(self, key):
        with self._lock:
            self._count("DELETE")
            if self._objects.pop(key, None) is not None and self.versioned:
                self._history.setdefault(key, []).append((uuid.uuid4().hex, None, self._clock()))

    def list(self, prefix, *, start_after=None, limit=1000):
        with self._lock:
            self._count("LIST")
            keys = sorted(
                (k for k in self._objects if k.startswith(prefix) and (start_after is None or k > start_after)),
                key=lambda k: k.encode("utf-8"),
            )
            return keys[:limit], len(keys) > limit

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


class _ServerClock:
    """The server's time, learnt from the `Date` header of replies (whole
    seconds) and carried forward by the local monotonic clock.

    Each reply stamped D, sent at local instant s and received at r, bounds
    the offset (server - monotonic) to [D - r, D + 1 - s]; intersecting the
    bounds of many replies pins it well below a second.  Disjoint bounds mean
    one of the clocks jumped: start again from the newest reply."""

    def __init__(self, monotonic=time.monotonic):
        self._monotonic = monotonic
        self._lo = None
        self._hi = None
        self._lock = threading.Lock()

    def observe(self, date, sent, received):
        d = date.timestamp()
        lo, hi = d - received, d + 1.0 - sent
        with self._lock:
            if self._lo is None or lo > self._hi or hi < self._lo:
                self._lo, self._hi = lo, hi
            else:
                self._lo, self._hi = max(self._lo, lo), min(self._hi, hi)

    @property
    def synced(self):
        return self._lo is not None

    def now(self):
        with self._lock:
            offset = (self._lo + self._hi) / 2.0
        return datetime.fromtimestamp(self._monotonic() + offset, timezone.utc)


class S3Store:
    """The store over S3 (sigv4.S3Client).  Its clock is the server's, from
    the Date header of every reply; before the first reply, one cheap probe
    (HEAD of a key, whatever it answers) learns it."""

    def __init__(self, bucket, *, client=None, endpoint=None, region=None, profile=None, credentials=None,
                 **client_options):
        import sigv4

        self._sigv4 = sigv4
        self.bucket = bucket
        self.clock = _ServerClock()
        if client is None:
            client = sigv4.S3Client(endpoint=endpoint, region=region, profile=profile, credentials=credentials,
                                    on_reply=self.clock.observe, **client_options)
        else:
            client._on_reply = self.clock.observe
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
        except self._sigv4.NoSuchKey:
            return None
        except self._sigv4.S3Error as exc:
            raise self._wrap(exc) from None
        return Blob(r.body, r.etag)
