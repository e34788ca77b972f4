"""The pure core of buquet: key layout, hashing, timestamps, task documents,
transitions and backoff.  No I/O: every test here runs without a store.

Expected values come from the wire-format spec (shared/spec/wire-format.md,
sections 2, 3, 6 and 9.3) or from an independent computation written here,
never from the code under test.
"""

import json
import math
import random
import re
import struct
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import pytest

import buquet
from buquet import (
    InvalidTaskDocument,
    InvalidTransition,
    LeaseMismatch,
    RetryPolicy,
    TRANSITIONS,
    backoff_ms,
    canonical_json,
    decode_task,
    encode_task,
    format_timestamp,
    idempotency_key,
    lease_key,
    minute_bucket,
    parse_index_key,
    parse_timestamp,
    ready_key,
    shard_of,
    transition,
    validate_task_document,
)

GOLDEN = Path(__file__).resolve().parent / "golden"
UTC = timezone.utc
TASK_ID = "3f2b8c1e-5a7d-4e9b-8c21-0d6f4a1b2c3d"
LEASE = "9c0e7d52-4f1a-4b8e-a6f3-2d7c8b9e0f11"
OTHER_LEASE = "11111111-2222-4333-8444-555555555555"
U32 = 2 ** 32 - 1
U64 = 2 ** 64 - 1


def at(text):
    """A datetime from a spec timestamp (parsed by hand, not by buquet)."""
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%f" if "." in text else "%Y-%m-%dT%H:%M:%S").replace(
        tzinfo=UTC)


def golden(name):
    return (GOLDEN / ("%s.json" % name)).read_bytes().rstrip(b"\n")


def golden_doc(name):
    return json.loads(golden(name))


# ============================================================================
# Key layout (spec 2)
# ============================================================================


@pytest.mark.parametrize("length, shard", [(1, "a"), (2, "a1"), (3, "a1b"), (4, "a1b2")])
def test_the_shard_is_the_first_hex_digits_of_the_id(length, shard):
    assert shard_of("a1b2c3d4-e5f6-7890-abcd-ef1234567890", length) == shard


def test_the_shard_skips_the_hyphens_of_the_id():
    assert shard_of("01234567-89ab-cdef-0123-456789abcdef", 4) == "0123"


def test_a_shard_length_of_0_behaves_as_1_and_10_as_4():
    assert shard_of("a1b2c3d4-e5f6-7890-abcd-ef1234567890", 0) == "a"
    assert shard_of("a1b2c3d4-e5f6-7890-abcd-ef1234567890", 10) == "a1b2"


def test_the_shard_of_the_default_length_is_one_character():
    assert shard_of("A1B2C3D4-E5F6-7890-ABCD-EF1234567890") == "a"


@pytest.mark.parametrize("length, count, first, last", [(1, 16, "0", "f"), (2, 256, "00", "ff"),
                                                        (4, 65536, "0000", "ffff"), (0, 16, "0", "f")])
def test_all_shards_are_the_zero_padded_hex_numbers_of_the_length(length, count, first, last):
    shards = buquet.all_shards(length)
    assert (len(shards), shards[0], shards[-1]) == (count, first, last)
    assert len(set(shards)) == count


@pytest.mark.parametrize("text, bucket", [
    ("2024-01-15T10:30:00", "0028421910"),
    ("2024-01-15T10:45:00", "0028421925"),
    ("1970-01-01T00:05:00", "0000000005"),
    ("2026-01-27T12:00:05", "0029491920"),
    ("2026-01-27T12:05:07.250431", "0029491925"),
    ("2030-01-02T03:04:05", "0031559224"),
])
def test_the_minute_bucket_is_whole_minutes_since_the_epoch_in_ten_digits(text, bucket):
    assert minute_bucket(at(text)) == bucket


def test_the_minute_bucket_ignores_seconds_and_their_fraction():
    assert minute_bucket(at("2024-01-15T10:30:59.999999")) == "0028421910"
    assert minute_bucket(at("2024-01-15T10:31:00")) == "0028421911"


def test_the_minute_bucket_of_a_time_before_the_epoch_rounds_down_and_counts_the_sign():
    assert minute_bucket(at("1969-12-31T23:59:59.500000")) == "-000000001"


def test_ready_and_lease_keys_follow_the_spec_examples():
    assert ready_key("a", at("2024-01-15T10:30:00"), "a1234567-89ab-cdef-0123-456789abcdef") == \
        "ready/a/0028421910/a1234567-89ab-cdef-0123-456789abcdef"
    assert ready_key("3", at("2026-01-27T12:00:05"), TASK_ID) == "ready/3/0029491920/" + TASK_ID
    assert lease_key("3", at("2026-01-27T12:05:07.250431"), TASK_ID) == "leases/3/0029491925/" + TASK_ID
    assert buquet.task_key("3", TASK_ID) == "tasks/3/%s.json" % TASK_ID


def test_other_keys_follow_the_layout():
    assert buquet.worker_key("worker-1") == "workers/worker-1.json"
    assert buquet.payload_key(TASK_ID) == "payloads/%s/input.json" % TASK_ID
    assert buquet.payload_key(TASK_ID, "output") == "payloads/%s/output.json" % TASK_ID


def test_an_index_key_parses_into_shard_bucket_and_id():
    assert parse_index_key("ready/3/0029491920/" + TASK_ID) == ("3", "0029491920", TASK_ID)
    assert parse_index_key("leases/3/0029491925/" + TASK_ID) == ("3", "0029491925", TASK_ID)


def test_an_index_key_with_an_uppercase_id_parses_into_the_canonical_id():
    assert parse_index_key("ready/3/0029491920/" + TASK_ID.upper()) == ("3", "0029491920", TASK_ID)


@pytest.mark.parametrize("key", [
    "ready/0/0000000001/not-a-uuid",
    "leases/2/0000000005/xyz",
    "ready/3/" + TASK_ID,
    "ready/3/minute/" + TASK_ID,
    "tasks/3/0029491920/" + TASK_ID,
    "ready/3/0029491920/%s/extra" % TASK_ID,
    "ready/3/0029491920/",
])
def test_keys_that_are_not_index_keys_parse_to_none(key):
    assert parse_index_key(key) is None


# ============================================================================
# Idempotency hashing and canonical JSON (spec 6.2, 9.3)
# ============================================================================


def test_the_idempotency_record_key_and_key_hash_match_the_spec_vectors():
    record, tag = idempotency_key("charge_customer", "charge-ORD-123")
    assert tag == "sha256:c16719dc40dc60cc79d7a0dbe8e090c1b2a0efd6fdc45629311f0c2c5ce5782c"
    assert record == ("idempotency/charge_customer/"
                      "c16719dc40dc60cc79d7a0dbe8e090c1b2a0efd6fdc45629311f0c2c5ce5782c.json")


def test_the_queue_scope_hashes_the_key_with_the_literal_queue():
    record, tag = idempotency_key("queue", "charge-ORD-123")
    assert tag == "sha256:9a3c12fd2dcfcc93638a0514ac069f2040a8f27caeca3adef8f10febe22759a3"
    assert record == "idempotency/queue/9a3c12fd2dcfcc93638a0514ac069f2040a8f27caeca3adef8f10febe22759a3.json"


def test_the_input_hash_of_the_order_example_matches_the_spec():
    text = canonical_json({"order_id": "ORD-123", "amount": 100})
    assert text == '{"amount":100,"order_id":"ORD-123"}'
    assert buquet.sha256_tag(text) == "sha256:2fbd763354e9633c92364158a4924eeedbfde09167f79b876fcf4e37551a5543"


def test_the_input_hash_of_an_empty_object_matches_the_spec():
    assert buquet.sha256_tag(canonical_json({})) == \
        "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"


def test_the_input_hash_with_floats_matches_what_the_original_computed():
    value = json.loads('{"x":0.00005,"y":1e-7,"z":1e16,"w":[1.5,{"b":1,"a":"é"}]}')
    text = canonical_json(value)
    assert text == '{"w":[1.5,{"a":"é","b":1}],"x":0.00005,"y":1e-7,"z":1e+16}'
    assert buquet.sha256_tag(text) == \
        "sha256:e644597bc889203106d59185628d77bec06b15875df1a9d6bea338b328b17d22"


def test_canonical_json_sorts_keys_by_code_point_at_every_level_and_keeps_array_order():
    value = {"z": 1, "a": {"y": 2, "b": 3}, "B": 0, "é": 1, "_": 2, "l": [3, 1, {"d": 0, "c": None}]}
    assert canonical_json(value) == \
        '{"B":0,"_":2,"a":{"b":3,"y":2},"l":[3,1,{"c":null,"d":0}],"z":1,"é":1}'


def test_canonical_json_writes_non_ascii_raw_and_escapes_like_serde_json():
    value = {"s": "é\u2028\x7f😀/\"\\\n\t\x01\x1f"}
    assert canonical_json(value) == '{"s":"é\u2028\x7f😀/\\"\\\\\\n\\t\\u0001\\u001f"}'


def test_canonical_json_writes_booleans_null_and_64_bit_integers_as_json():
    assert canonical_json([True, False, None, -2 ** 63, U64, 0]) == \
        "[true,false,null,-9223372036854775808,18446744073709551615,0]"


def test_canonical_json_refuses_nan_and_infinity():
    for bad in (float("nan"), float("inf"), float("-inf")):
        with pytest.raises(ValueError) as exc:
            canonical_json({"x": bad})
        assert str(exc.value) == "JSON has no NaN or infinity"


@pytest.mark.parametrize("value, text", [
    (1.0, "1.0"), (0.1, "0.1"), (0.00005, "0.00005"), (1e-7, "1e-7"), (1e16, "1e+16"),
    (1e20, "1e+20"), (-0.0, "-0.0"), (0.0, "0.0"), (100.0, "100.0"), (1.5e-7, "1.5e-7"),
    (1.5, "1.5"), (1e-5, "0.00001"), (9999999999999998.0, "9999999999999998.0"),
    (1e15, "1000000000000000.0"), (-123.456, "-123.456"), (5e-324, "5e-324"),
    (1.7976931348623157e308, "1.7976931348623157e+308"), (2.5e-300, "2.5e-300"),
    (123456789012345.6, "123456789012345.6"), (0.3, "0.3"), (-1e100, "-1e+100"),
])
def test_floats_are_written_as_serde_json_writes_them(value, text):
    assert buquet._serde_float(value) == text


def _serde_float_oracle(x):
    """serde_json's float rule (spec 6.2), computed with Decimal: the shortest
    round-trip digits (repr), plain for 1e-5 <= |x| < 1e16, else d[.ddd]e+-N."""
    if x == 0:
        return "-0.0" if math.copysign(1.0, x) < 0 else "0.0"
    d = Decimal(repr(x)).normalize()
    if 1e-5 <= abs(x) < 1e16:
        text = format(d, "f")
        return text if "." in text else text + ".0"
    return format(d, "e")


def _random_floats(rng, n):
    out = []
    while len(out) < n:
        x = struct.unpack("<d", struct.pack("<Q", rng.getrandbits(64)))[0]
        if not math.isnan(x) and not math.isinf(x):
            out.append(x)
    for _ in range(n):
        out.append(rng.choice((1, -1)) * 10 ** rng.uniform(-9, 20))
        out.append(float(rng.randint(-10 ** 17, 10 ** 17)))
        out.append(round(rng.uniform(-1000, 1000), rng.randint(0, 8)))
    for edge in (1e-5, 1e16):
        for v in (edge, math.nextafter(edge, 0), math.nextafter(edge, math.inf)):
            out.extend((v, -v))
    return out


_PLAIN = re.compile(r"-?(0|[1-9]\d*)\.(0|\d*[1-9])")
_EXPONENT = re.compile(r"-?[1-9](\.\d*[1-9])?e[+-](0|[1-9]\d*)")


def test_thousands_of_random_floats_round_trip_in_the_shortest_serde_json_form():
    rng = random.Random(20260127)
    for x in _random_floats(rng, 4000):
        text = buquet._serde_float(x)
        assert text == _serde_float_oracle(x), x
        assert float(text) == x and math.copysign(1.0, float(text)) == math.copysign(1.0, x), text
        if x != 0 and not 1e-5 <= abs(x) < 1e16:
            assert _EXPONENT.fullmatch(text), text
        else:
            assert _PLAIN.fullmatch(text), text
        # shortest: no more significant digits than Python's shortest repr
        assert len(Decimal(text).normalize().as_tuple().digits) == \
            len(Decimal(repr(x)).normalize().as_tuple().digits), text


# ============================================================================
# Timestamps (spec 3.3)
# ============================================================================


@pytest.mark.parametrize("text, expected", [
    ("2026-01-27T12:00:05Z", "2026-01-27T12:00:05"),
    ("2026-01-27t12:00:05Z", "2026-01-27T12:00:05"),
    ("2026-01-27 12:00:05Z", "2026-01-27T12:00:05"),
    ("2026-01-27T12:00:05z", "2026-01-27T12:00:05"),
    ("2026-01-27T12:00:05UTC", "2026-01-27T12:00:05"),
    ("2026-01-27T12:00:05 UTC", "2026-01-27T12:00:05"),
    ("2026-01-27T12:00:05.5Z", "2026-01-27T12:00:05.500000"),
    ("2026-01-27T12:00:05.25Z", "2026-01-27T12:00:05.250000"),
    ("2026-01-27T12:00:05.250Z", "2026-01-27T12:00:05.250000"),
    ("2026-01-27T12:00:05.2504Z", "2026-01-27T12:00:05.250400"),
    ("2026-01-27T12:00:05.25043Z", "2026-01-27T12:00:05.250430"),
    ("2026-01-27T12:00:05.250431Z", "2026-01-27T12:00:05.250431"),
    ("2026-01-27T12:00:05.2504318Z", "2026-01-27T12:00:05.250431"),
    ("2026-01-27T12:00:05.25043187Z", "2026-01-27T12:00:05.250431"),
    ("2026-01-27T12:00:07.250431877Z", "2026-01-27T12:00:07.250431"),
    ("2026-01-27T12:00:07.2504318779999Z", "2026-01-27T12:00:07.250431"),
    ("2026-01-27T12:00:07.050093700Z", "2026-01-27T12:00:07.050093"),
    ("2026-01-27T13:00:05+01:00", "2026-01-27T12:00:05"),
    ("2026-01-27T13:00:05+0100", "2026-01-27T12:00:05"),
    ("2026-01-27T13:00:05 +01:00", "2026-01-27T12:00:05"),
    ("2026-01-27T06:30:05-05:30", "2026-01-27T12:00:05"),
    ("2026-01-27T12:00:05-00:00", "2026-01-27T12:00:05"),
    ("2026-01-27T12:00:05+00:00", "2026-01-27T12:00:05"),
    ("2026-01-28T00:30:05+12:30", "2026-01-27T12:00:05"),
    ("2026-01-27T23:59:59.5-12:00", "2026-01-28T11:59:59.500000"),
])
def test_every_timestamp_form_the_original_accepts_is_read_as_utc(text, expected):
    parsed = parse_timestamp(text)
    assert parsed == at(expected)
    assert parsed.tzinfo == UTC


def test_a_leap_second_is_accepted_as_the_last_instant_of_its_minute():
    parsed = parse_timestamp("2016-12-31T23:59:60Z")
    assert parsed == at("2016-12-31T23:59:59.999999")
    assert minute_bucket(parsed) == minute_bucket(at("2016-12-31T23:59:00"))


@pytest.mark.parametrize("text", [
    "2026-01-27T12:00:05",
    "2026-01-27T12:00:05.123",
    "2026-01-27T12:00:05+01",
    "2026-01-27T12:00:05 +01",
    "2026-01-27",
    "2026-01-27T12:00Z",
    "2026-01-27X12:00:05Z",
    "2026-1-27T12:00:05Z",
    "2026-01-27T12:00:05.Z",
    "2026-01-27T12:00:05GMT",
    "2026-01-27T12:00:05+1:00",
    "",
    "now",
])
def test_timestamps_without_a_full_offset_are_rejected(text):
    with pytest.raises(ValueError) as exc:
        parse_timestamp(text)
    assert str(exc.value) == "not an RFC 3339 timestamp with an offset: %r" % (text,)


@pytest.mark.parametrize("value", [None, 1769515205, b"2026-01-27T12:00:05Z"])
def test_a_timestamp_that_is_not_a_string_is_rejected(value):
    with pytest.raises(ValueError) as exc:
        parse_timestamp(value)
    assert str(exc.value) == "not an RFC 3339 timestamp with an offset: %r" % (value,)


@pytest.mark.parametrize("text, problem", [
    ("2026-02-30T12:00:05Z", "day is out of range for month"),
    ("2026-01-27T24:00:05Z", "hour must be in 0..23"),
    ("9999-12-31T23:59:59-01:00", "date value out of range"),
    ("0001-01-01T00:00:00+01:00", "date value out of range"),
    ("2026-01-28T09:00:00+01:60", "the offset must be at most 23:59"),  # chrono refuses both
    ("2026-01-28T09:00:00-25:00", "the offset must be at most 23:59"),
])
def test_a_timestamp_out_of_range_is_a_value_error_naming_it(text, problem):
    with pytest.raises(ValueError) as exc:
        parse_timestamp(text)
    assert str(exc.value) == "timestamp %r is out of range: %s" % (text, problem)


@pytest.mark.parametrize("moment, text", [
    (datetime(2026, 1, 27, 12, 0, 5, tzinfo=UTC), "2026-01-27T12:00:05Z"),
    (datetime(2026, 1, 27, 12, 0, 5, 500000, tzinfo=UTC), "2026-01-27T12:00:05.500Z"),
    (datetime(2026, 1, 27, 12, 0, 5, 1000, tzinfo=UTC), "2026-01-27T12:00:05.001Z"),
    (datetime(2026, 1, 27, 12, 0, 9, 871200, tzinfo=UTC), "2026-01-27T12:00:09.871200Z"),
    (datetime(2026, 1, 27, 12, 0, 7, 250431, tzinfo=UTC), "2026-01-27T12:00:07.250431Z"),
    (datetime(2026, 1, 27, 12, 0, 7, 10, tzinfo=UTC), "2026-01-27T12:00:07.000010Z"),
    (datetime(2026, 1, 27, 13, 0, 5, tzinfo=timezone(timedelta(hours=1))), "2026-01-27T12:00:05Z"),
    (datetime(1970, 1, 1, tzinfo=UTC), "1970-01-01T00:00:00Z"),
])
def test_timestamps_are_written_in_utc_with_z_and_no_3_or_6_fraction_digits(moment, text):
    assert format_timestamp(moment) == text


def test_formatting_then_parsing_gives_back_the_instant():
    rng = random.Random(7)
    for _ in range(2000):
        moment = datetime(2026, 1, 1, tzinfo=UTC) + timedelta(microseconds=rng.randrange(10 ** 15))
        if rng.random() < 0.3:
            moment = moment.replace(microsecond=rng.randrange(1000) * 1000)
        assert parse_timestamp(format_timestamp(moment)) == moment


# ============================================================================
# Reading task documents (spec 3.2)
# ============================================================================

MINIMAL = {
    "id": TASK_ID, "shard": "3", "task_type": "send_email", "input": {"to": "a@example.com"},
    "created_at": "2026-01-27T12:00:05Z", "available_at": "2026-01-27T12:00:05Z",
    "updated_at": "2026-01-27T12:00:05Z",
}


def test_a_minimal_document_reads_with_the_defaults_of_the_original():
    task = decode_task(json.dumps(MINIMAL).encode())
    assert (task.status, task.timeout_seconds, task.max_retries, task.retry_count, task.attempt,
            task.reschedule_count, task.cancel_requested) == ("pending", 300, 3, 0, 0, 0, False)
    assert task.retry_policy == RetryPolicy(1000, 60000, 2.0, 0.25)
    assert (task.output, task.lease_id, task.lease_expires_at, task.worker_id, task.last_error,
            task.max_reschedules, task.expires_at, task.input_ref) == (None,) * 8
    assert task.available_at == at("2026-01-27T12:00:05")
    assert task.key == "tasks/3/%s.json" % TASK_ID


def test_every_example_document_of_the_spec_is_accepted():
    for name in ("pending", "running", "completed", "failed", "cancelled", "expired", "archived"):
        task = decode_task(golden(name), '"etag"')
        assert task.status == name
        assert task.etag == '"etag"'


def _with(**changes):
    doc = dict(golden_doc("running"))
    for name, value in changes.items():
        if value is _DROP:
            doc.pop(name)
        else:
            doc[name] = value
    return doc


_DROP = object()
_POLICY_FIELDS = "initial_interval_ms, max_interval_ms, multiplier, jitter_percent"


@pytest.mark.parametrize("changes, message", [
    ({"retry_count": None}, "field retry_count must be an integer 0..4294967295, got None"),
    ({"cancel_requested": None}, "field cancel_requested is null"),
    ({"status": None}, "field status is null"),
    ({"retry_policy": None}, "field retry_policy is null"),
    ({"timeout_seconds": None}, "field timeout_seconds must be an integer 0..18446744073709551615, got None"),
    ({"attempt": None}, "field attempt must be an integer 0..4294967295, got None"),
    ({"max_retries": 3.0}, "field max_retries must be an integer 0..4294967295, got 3.0"),
    ({"max_retries": -1}, "field max_retries must be an integer 0..4294967295, got -1"),
    ({"max_retries": 2 ** 32}, "field max_retries must be an integer 0..4294967295, got 4294967296"),
    ({"max_retries": True}, "field max_retries must be an integer 0..4294967295, got True"),
    ({"max_retries": "3"}, "field max_retries must be an integer 0..4294967295, got '3'"),
    ({"timeout_seconds": 2 ** 64}, "field timeout_seconds must be an integer 0..18446744073709551615, "
                                   "got 18446744073709551616"),
    ({"max_reschedules": -1}, "field max_reschedules must be an integer 0..4294967295, got -1"),
    ({"status": "PENDING"}, "unknown status 'PENDING'"),
    ({"status": "done"}, "unknown status 'done'"),
    ({"retry_policy": {"initial_interval_ms": 1000, "max_interval_ms": 60000, "multiplier": 2.0}},
     "retry_policy must have the fields " + _POLICY_FIELDS),
    ({"retry_policy": [1000, 60000, 2.0, 0.25]}, "retry_policy must have the fields " + _POLICY_FIELDS),
    ({"retry_policy": {"initial_interval_ms": 1.5, "max_interval_ms": 60000, "multiplier": 2.0,
                       "jitter_percent": 0.25}},
     "field initial_interval_ms must be an integer 0..4294967295, got 1.5"),
    ({"retry_policy": {"initial_interval_ms": 1000, "max_interval_ms": 60000, "multiplier": "2",
                       "jitter_percent": 0.25}}, "retry_policy.multiplier must be a number"),
    ({"lease_id": "lease-1"}, "field lease_id is not a UUID: 'lease-1'"),
    ({"lease_id": 7}, "field lease_id is not a UUID: 7"),
    ({"id": "task-1"}, "field id is not a UUID: 'task-1'"),
    ({"id": 7}, "field id must be a string, got 7"),
    ({"shard": None}, "field shard must be a string, got None"),
    ({"task_type": ["send_email"]}, "field task_type must be a string, got ['send_email']"),
    ({"input": _DROP}, "missing required field input"),
    ({"created_at": _DROP}, "missing required field created_at"),
    ({"available_at": _DROP}, "missing required field available_at"),
    ({"updated_at": _DROP}, "missing required field updated_at"),
    ({"id": _DROP}, "missing required field id"),
    ({"created_at": None}, "field created_at is null"),
    ({"available_at": "2026-01-27"},
     "field available_at: not an RFC 3339 timestamp with an offset: '2026-01-27'"),
    ({"lease_expires_at": "2026-01-27T12:05:07"},
     "field lease_expires_at: not an RFC 3339 timestamp with an offset: '2026-01-27T12:05:07'"),
    ({"expires_at": 1769515205}, "field expires_at: not an RFC 3339 timestamp with an offset: 1769515205"),
    ({"cancel_requested": "false"}, "field cancel_requested must be a boolean"),
    ({"cancel_requested": 0}, "field cancel_requested must be a boolean"),
    ({"worker_id": 12}, "field worker_id must be a string or null"),
    ({"last_error": {"msg": "x"}}, "field last_error must be a string or null"),
    ({"input_ref": 1}, "field input_ref must be a string or null"),
])
def test_documents_the_original_rejects_are_rejected_with_a_reason(changes, message):
    with pytest.raises(InvalidTaskDocument) as exc:
        validate_task_document(_with(**changes))
    assert str(exc.value) == message


@pytest.mark.parametrize("changes", [
    {"retry_policy": {"initial_interval_ms": 1000, "max_interval_ms": 60000, "multiplier": 2,
                      "jitter_percent": 0}},
    {"timeout_seconds": U64},
    {"max_retries": 0},
    {"max_retries": U32},
    {"max_reschedules": None},
    {"max_reschedules": 50},
    {"input": None, "input_ref": "payloads/%s/input.json" % TASK_ID},
    {"output": {"sent": True}},
    {"lease_id": LEASE.upper()},
    {"lease_id": "{%s}" % LEASE},
    {"lease_id": LEASE.replace("-", "")},
    {"lease_id": None, "lease_expires_at": None, "worker_id": None},
    {"available_at": "2026-01-27 13:00:05+01:00"},
    {"unknown_field": [1, 2], "another": None},
    {"cancelled_by": None, "cancelled_at": None, "expires_at": None, "expired_at": None},
    {"status": _DROP, "retry_count": _DROP, "retry_policy": _DROP, "cancel_requested": _DROP},
])
def test_documents_the_original_accepts_are_accepted(changes):
    validate_task_document(_with(**changes))


@pytest.mark.parametrize("value, name", [([], "list"), ("x", "str"), (None, "NoneType"), (3, "int")])
def test_a_document_that_is_not_an_object_is_rejected(value, name):
    with pytest.raises(InvalidTaskDocument) as exc:
        validate_task_document(value)
    assert str(exc.value) == "a task document must be a JSON object, got %s" % name


def test_bytes_that_are_not_json_are_an_invalid_document():
    with pytest.raises(InvalidTaskDocument) as exc:
        decode_task(b"junk")
    assert str(exc.value) == "not JSON: Expecting value: line 1 column 1 (char 0)"
    with pytest.raises(InvalidTaskDocument) as exc:
        decode_task(b"\xff\xfe\xfa")
    assert str(exc.value).startswith("not JSON: ")


def test_a_document_with_a_far_future_offset_timestamp_is_invalid_not_a_crash():
    with pytest.raises(InvalidTaskDocument) as exc:
        validate_task_document(_with(available_at="9999-12-31T23:59:59-01:00"))
    assert str(exc.value) == ("field available_at: timestamp '9999-12-31T23:59:59-01:00' is out of range: "
                              "date value out of range")


# ============================================================================
# Writing task documents: order, nulls, escaping (spec 3.1, 3.6)
# ============================================================================


def test_every_example_document_is_written_back_byte_for_byte():
    for name in ("pending", "running", "completed", "failed", "cancelled", "expired", "archived"):
        assert encode_task(golden_doc(name)) == golden(name)


def test_fields_are_written_in_the_spec_order_whatever_order_they_come_in_and_unknown_fields_last():
    doc = golden_doc("pending")
    shuffled = dict(sorted(doc.items(), reverse=True))
    shuffled["zz_custom"] = {"b": 1, "a": 2}
    shuffled["aa_custom"] = 1
    written = json.loads(encode_task(shuffled))
    assert list(written) == list(doc) + ["zz_custom", "aa_custom"]
    assert written["zz_custom"] == {"b": 1, "a": 2}


def test_optional_fields_that_are_null_are_omitted_and_the_others_written_null():
    doc = dict(golden_doc("pending"), input_ref=None, output_ref=None, max_reschedules=None, cancelled_at=None,
               cancelled_by=None, expires_at=None, expired_at=None)
    assert encode_task(doc) == golden("pending")


def test_strings_are_written_with_raw_non_ascii_and_short_or_lowercase_escapes():
    doc = dict(golden_doc("failed"), last_error="é\u2028\x7f😀/\"\\\b\f\n\r\t\x01\x1f")
    body = encode_task(doc)
    assert b'"last_error":"' + "é\u2028\x7f😀/".encode() + b'\\"\\\\\\b\\f\\n\\r\\t\\u0001\\u001f"' in body
    assert b" " not in body.replace(b"Retryable error: SMTP 451 try later", b"")


# ============================================================================
# Transitions (spec 6)
# ============================================================================

T = at("2026-01-27T12:00:09.871200")
TS = "2026-01-27T12:00:09.871200Z"

# A complete argument set for each event.
EVENT_ARGS = {
    "claim": dict(worker_id="worker-2", new_lease_id=OTHER_LEASE),
    "complete": dict(output={"sent": True}),
    "retry": dict(error="Retryable error: boom", delay_ms=1500),
    "reschedule": dict(delay_seconds=30),
    "fail": dict(error="Permanent error: bad"),
    "requeue": {},
    "timeout_retry": dict(delay_ms=2000),
    "timeout_fail": {},
    "extend_lease": dict(seconds=120),
    "request_cancellation": {},
    "cancel_running": {},
    "cancel": dict(reason="No longer needed", cancelled_by="user:alice"),
    "expire": {},
    "replay": {},
    "archive": {},
}
LEASED = {"complete", "retry", "reschedule", "fail", "requeue", "extend_lease", "cancel_running"}


def test_the_transition_table_is_the_one_the_spec_and_the_port_define():
    table = {event: (tuple(sorted(sources)), target) for event, (sources, target) in TRANSITIONS.items()}
    assert table == {
        "claim": (("pending",), "running"),
        "complete": (("running",), "completed"),
        "retry": (("running",), "pending"),
        "reschedule": (("running",), "pending"),
        "fail": (("running",), "failed"),
        "requeue": (("running",), "pending"),
        "timeout_retry": (("running",), "pending"),
        "timeout_fail": (("running",), "failed"),
        "extend_lease": (("running",), "running"),
        "request_cancellation": (("running",), "running"),
        "cancel_running": (("running",), "cancelled"),
        "cancel": (("pending",), "cancelled"),
        "expire": (("pending",), "expired"),
        "replay": (("cancelled", "completed", "expired", "failed"), "pending"),
        "archive": (("cancelled", "completed", "expired", "failed"), "archived"),
    }
    assert set(EVENT_ARGS) == set(TRANSITIONS)


def _doc_in(status):
    """A plausible document in `status`; running ones hold LEASE."""
    doc = golden_doc("running")
    doc["status"] = status
    doc["zz_unknown"] = {"kept": ["é", 1]}
    if status != "running":
        doc.update(lease_id=None, lease_expires_at=None, worker_id=None)
    return doc


ALLOWED = [(event, status) for event, (sources, _) in TRANSITIONS.items() for status in sources]
DISALLOWED = [(event, status) for event, (sources, _) in TRANSITIONS.items()
              for status in buquet.STATUSES if status not in sources]


@pytest.mark.parametrize("event, status", ALLOWED)
def test_every_allowed_transition_leads_to_its_target_state(event, status):
    doc = _doc_in(status)
    before = json.dumps(doc)
    new = transition(doc, event, T, lease_id=doc["lease_id"], **EVENT_ARGS[event])
    assert new["status"] == TRANSITIONS[event][1]
    assert new["updated_at"] == TS
    assert new["zz_unknown"] == {"kept": ["é", 1]}
    assert json.dumps(doc) == before, "the input document must not change"
    validate_task_document(json.loads(encode_task(new)))


@pytest.mark.parametrize("event, status", DISALLOWED)
def test_every_disallowed_transition_names_the_task_the_state_and_the_event(event, status):
    doc = _doc_in(status)
    with pytest.raises(InvalidTransition) as exc:
        transition(doc, event, T, lease_id=doc["lease_id"], **EVENT_ARGS[event])
    allowed = ", ".join(TRANSITIONS[event][0])
    assert str(exc.value) == "task %s is %s: %s is not allowed (allowed from: %s)" % (
        TASK_ID, status, event, allowed)
    assert (exc.value.task_id, exc.value.status, exc.value.event) == (TASK_ID, status, event)


def test_a_document_without_a_status_is_pending_to_transitions():
    doc = dict(MINIMAL)
    new = transition(doc, "claim", T, worker_id="w", new_lease_id=LEASE)
    assert new["status"] == "running"
    with pytest.raises(InvalidTransition) as exc:
        transition(doc, "complete", T, output=None)
    assert str(exc.value) == "task %s is pending: complete is not allowed (allowed from: running)" % TASK_ID


@pytest.mark.parametrize("event", sorted(LEASED))
def test_a_leased_event_with_another_lease_is_a_lease_mismatch(event):
    doc = _doc_in("running")
    with pytest.raises(LeaseMismatch) as exc:
        transition(doc, event, T, lease_id=OTHER_LEASE, **EVENT_ARGS[event])
    assert str(exc.value) == ("lease %s no longer holds task %s: the lease expired and another attempt "
                              "took over" % (OTHER_LEASE, TASK_ID))
    assert (exc.value.task_id, exc.value.lease_id) == (TASK_ID, OTHER_LEASE)


@pytest.mark.parametrize("event", sorted(LEASED))
def test_a_lease_mismatch_is_reported_before_the_state_of_a_recovered_task(event):
    doc = _doc_in("pending")  # the monitor put it back; the old worker still holds LEASE
    with pytest.raises(LeaseMismatch):
        transition(doc, event, T, lease_id=LEASE, **EVENT_ARGS[event])


@pytest.mark.parametrize("event", sorted(set(TRANSITIONS) - LEASED - {"claim"}))
def test_events_not_tied_to_a_lease_ignore_the_lease_argument(event):
    status = TRANSITIONS[event][0][0]
    new = transition(_doc_in(status), event, T, lease_id=OTHER_LEASE, **EVENT_ARGS[event])
    assert new["status"] == TRANSITIONS[event][1]


def _changes(old, new):
    """{field: new value} for every field that differs, added or removed
    (removed = _DROP)."""
    out = {}
    for name in set(old) | set(new):
        if name not in new:
            out[name] = _DROP
        elif old.get(name, _DROP) != new[name] or name not in old:
            out[name] = new[name]
    return out


_CLEARED = {"lease_id": None, "lease_expires_at": None, "worker_id": None}


def _running_with_history():
    doc = _doc_in("running")
    doc.update(retry_count=1, attempt=2, last_error="Retryable error: earlier", reschedule_count=1)
    return doc


def test_claim_changes_exactly_status_worker_lease_attempt_expiry_and_updated_at():
    pending = _doc_in("pending")
    pending.update(retry_count=1, last_error="Retryable error: earlier", cancel_requested=False)
    new = transition(pending, "claim", at("2026-01-27T12:00:07.250431"), worker_id="worker-1a2b3c4d",
                     new_lease_id=LEASE)
    assert _changes(pending, new) == {
        "status": "running", "worker_id": "worker-1a2b3c4d", "lease_id": LEASE, "attempt": 2,
        "lease_expires_at": "2026-01-27T12:05:07.250431Z", "updated_at": "2026-01-27T12:00:07.250431Z"}


def test_complete_clears_the_lease_and_the_error_of_an_earlier_attempt_and_keeps_the_counters():
    # Deliberate difference: the original leaves last_error as it was.
    doc = _running_with_history()
    new = transition(doc, "complete", T, lease_id=LEASE, output={"sent": True})
    assert _changes(doc, new) == dict(_CLEARED, status="completed", output={"sent": True}, completed_at=TS,
                                      updated_at=TS, last_error=None)


def test_retry_counts_the_retry_records_the_error_and_waits_out_the_delay():
    doc = _running_with_history()
    new = transition(doc, "retry", T, lease_id=LEASE, error="Retryable error: boom", delay_ms=1500)
    assert _changes(doc, new) == dict(_CLEARED, status="pending", retry_count=2, last_error="Retryable error: boom",
                                      available_at="2026-01-27T12:00:11.371200Z", updated_at=TS)


def test_fail_records_the_error_and_the_completion_time_and_keeps_the_counters():
    doc = _running_with_history()
    new = transition(doc, "fail", T, lease_id=LEASE, error="Permanent error: bad")
    assert _changes(doc, new) == dict(_CLEARED, status="failed", last_error="Permanent error: bad",
                                      completed_at=TS, updated_at=TS)


def test_reschedule_counts_a_reschedule_and_keeps_retry_count_and_last_error():
    doc = _running_with_history()
    new = transition(doc, "reschedule", T, lease_id=LEASE, delay_seconds=30)
    assert _changes(doc, new) == dict(_CLEARED, status="pending", reschedule_count=2,
                                      available_at="2026-01-27T12:00:39.871200Z", updated_at=TS)


def test_requeue_makes_the_task_available_now_without_counting_anything():
    doc = _running_with_history()
    new = transition(doc, "requeue", T, lease_id=LEASE)
    assert _changes(doc, new) == dict(_CLEARED, status="pending", available_at=TS, updated_at=TS)


def test_a_timeout_retry_counts_a_retry_with_the_original_timeout_message():
    doc = _running_with_history()
    new = transition(doc, "timeout_retry", T, lease_id="ignored", delay_ms=2000)
    assert _changes(doc, new) == dict(_CLEARED, status="pending", retry_count=2,
                                      last_error="Timeout - task exceeded lease duration",
                                      available_at="2026-01-27T12:00:11.871200Z", updated_at=TS)


def test_a_timeout_failure_names_the_attempts_and_clears_the_worker():
    # Deliberate difference: the original keeps the last claimer's worker_id.
    doc = _running_with_history()
    doc["retry_count"] = 3
    new = transition(doc, "timeout_fail", T)
    assert _changes(doc, new) == dict(_CLEARED, status="failed", completed_at=TS, updated_at=TS,
                                      last_error="Timeout after max retries (3 attempts)")


def test_extend_lease_moves_the_expiry_from_its_current_end():
    doc = _running_with_history()  # lease ends 12:05:07.250431877, after T
    new = transition(doc, "extend_lease", T, lease_id=LEASE, seconds=120)
    assert _changes(doc, new) == {"lease_expires_at": "2026-01-27T12:07:07.250431Z", "updated_at": TS}


def test_extend_lease_after_the_lease_ran_out_counts_from_now():
    doc = _running_with_history()
    late = at("2026-01-27T12:06:00")
    new = transition(doc, "extend_lease", late, lease_id=LEASE, seconds=120)
    assert _changes(doc, new) == {"lease_expires_at": "2026-01-27T12:08:00Z", "updated_at": "2026-01-27T12:06:00Z"}


def test_request_cancellation_only_sets_the_flag():
    doc = _running_with_history()
    new = transition(doc, "request_cancellation", T)
    assert _changes(doc, new) == {"cancel_requested": True, "updated_at": TS}


def test_request_cancellation_with_a_reason_and_a_requester_records_both():
    doc = _running_with_history()
    new = transition(doc, "request_cancellation", T, reason="stop", cancelled_by="user:bob")
    assert _changes(doc, new) == {"cancel_requested": True, "updated_at": TS, "last_error": "stop",
                                  "cancelled_by": "user:bob"}


def test_a_honoured_cancellation_request_ends_the_task_cancelled():
    doc = _running_with_history()
    doc["cancel_requested"] = True
    new = transition(doc, "cancel_running", T, lease_id=LEASE)
    assert _changes(doc, new) == dict(_CLEARED, status="cancelled", cancelled_at=TS, updated_at=TS)


def test_cancel_records_when_why_and_by_whom():
    doc = _doc_in("pending")
    new = transition(doc, "cancel", T, reason="No longer needed", cancelled_by="user:alice")
    assert _changes(doc, new) == {"status": "cancelled", "cancelled_at": TS, "cancelled_by": "user:alice",
                                  "last_error": "No longer needed", "updated_at": TS}


def test_cancel_without_a_reason_leaves_last_error_and_without_a_requester_omits_cancelled_by():
    doc = _doc_in("pending")
    doc["last_error"] = "Retryable error: earlier"
    new = transition(doc, "cancel", T)
    assert _changes(doc, new) == {"status": "cancelled", "cancelled_at": TS, "updated_at": TS}
    assert b"cancelled_by" not in encode_task(new)


def test_expire_records_when():
    doc = _doc_in("pending")
    new = transition(doc, "expire", T)
    assert _changes(doc, new) == {"status": "expired", "expired_at": TS, "updated_at": TS}


def test_replay_starts_the_task_afresh():
    # Deliberate difference: the original resets only retry_count, completed_at and last_error.
    doc = golden_doc("failed")
    doc.update(reschedule_count=2, worker_id="worker-old", output={"partial": 1}, cancel_requested=True,
               expires_at="2026-01-27T13:00:00Z")
    new = transition(doc, "replay", T)
    assert _changes(doc, new) == {
        "status": "pending", "retry_count": 0, "attempt": 0, "reschedule_count": 0, "available_at": TS,
        "updated_at": TS, "completed_at": None, "last_error": None, "worker_id": None, "output": None,
        "cancel_requested": False, "expires_at": None, "cancelled_at": None, "cancelled_by": None,
        "expired_at": None}
    written = json.loads(encode_task(new))
    assert "expires_at" not in written and "cancelled_at" not in written


def test_archive_changes_only_status_and_updated_at():
    doc = golden_doc("completed")
    new = transition(doc, "archive", at("2026-01-28T08:00:00"))
    assert _changes(doc, new) == {"status": "archived", "updated_at": "2026-01-28T08:00:00Z"}


def test_the_reschedule_limit_message_matches_the_original():
    assert buquet.reschedule_or_fail(dict(_running_with_history(), max_reschedules=1)) == \
        "Max reschedules (1) exceeded"
    assert buquet.reschedule_or_fail(dict(_running_with_history(), max_reschedules=2)) is None
    assert buquet.reschedule_or_fail(_running_with_history()) is None


def test_claiming_a_task_with_the_largest_timeout_saturates_the_lease_instead_of_failing():
    doc = dict(_doc_in("pending"), timeout_seconds=U64)
    new = transition(doc, "claim", T, worker_id="w", new_lease_id=LEASE)
    assert new["lease_expires_at"] == "9999-12-31T23:59:59.999999Z"
    validate_task_document(new)


@pytest.mark.parametrize("status, keys", [
    ("pending", ["ready/3/0029491920/" + TASK_ID]),
    ("running", ["leases/3/0029491925/" + TASK_ID]),
    ("completed", []), ("failed", []), ("cancelled", []), ("expired", []), ("archived", []),
])
def test_each_state_has_the_index_entries_of_the_spec(status, keys):
    doc = golden_doc("running")
    doc["status"] = status
    assert buquet.index_keys(doc) == keys


# ============================================================================
# Backoff (spec 3.4)
# ============================================================================

NO_JITTER = dict(buquet.DEFAULT_RETRY_POLICY, jitter_percent=0.0)


def test_the_default_backoff_doubles_from_one_second_up_to_a_minute():
    assert [backoff_ms(NO_JITTER, k, 0.0) for k in range(9)] == \
        [1000, 2000, 4000, 8000, 16000, 32000, 60000, 60000, 60000]
    assert backoff_ms(NO_JITTER, 10 ** 6, 0.0) == 60000


def test_a_small_policy_waits_100_then_200_ms():
    policy = RetryPolicy(100, 1000, 2.0, 0.0).to_dict()
    assert [backoff_ms(policy, k, 0.9) for k in range(5)] == [100, 200, 400, 800, 1000]


def test_a_policy_with_a_fractional_multiplier_truncates_to_whole_ms():
    policy = RetryPolicy(500, 10000, 1.5, 0.0).to_dict()
    assert [backoff_ms(policy, k, 0.0) for k in range(4)] == [500, 750, 1125, 1687]


def test_jitter_spreads_the_delay_over_plus_or_minus_the_fraction():
    policy = buquet.DEFAULT_RETRY_POLICY
    assert backoff_ms(policy, 0, 0.0) == 750
    assert backoff_ms(policy, 0, 0.5) == 1000
    assert backoff_ms(policy, 0, 0.9999999999) == 1249
    assert backoff_ms(policy, 6, 0.0) == 45000
    assert backoff_ms(policy, 6, 0.9999999999) == 74999
    rng = random.Random(3)
    for _ in range(1000):
        assert 750 <= backoff_ms(policy, 0, rng.random()) < 1250


def test_a_negative_jitter_from_a_foreign_document_counts_by_its_size():
    policy = dict(buquet.DEFAULT_RETRY_POLICY, jitter_percent=-0.25)
    assert (backoff_ms(policy, 0, 0.0), backoff_ms(policy, 0, 0.9999999999)) == (750, 1249)


def test_nan_and_infinite_delays_become_zero():
    assert backoff_ms(dict(NO_JITTER, multiplier=float("nan")), 1, 0.5) == 0
    assert backoff_ms(dict(NO_JITTER, jitter_percent=float("inf")), 1, 0.9) == 0
    assert backoff_ms(dict(NO_JITTER, jitter_percent=float("inf")), 1, 0.0) == 0
    assert backoff_ms(dict(NO_JITTER, jitter_percent=float("nan")), 1, 0.3) == 0


def test_a_negative_delay_becomes_zero():
    assert backoff_ms(dict(NO_JITTER, jitter_percent=3.0), 0, 0.0) == 0


def test_huge_delays_saturate_at_the_largest_u32():
    policy = {"initial_interval_ms": U32, "max_interval_ms": U32, "multiplier": 10.0, "jitter_percent": 0.25}
    assert backoff_ms(policy, 30, 0.9999) == U32
    assert backoff_ms(dict(policy, jitter_percent=0.0), 30, 0.0) == U32


def test_the_exponent_stops_growing_at_30_retries():
    policy = {"initial_interval_ms": 1, "max_interval_ms": U32, "multiplier": 2.0, "jitter_percent": 0.0}
    assert backoff_ms(policy, 30, 0.0) == 2 ** 30
    assert backoff_ms(policy, 31, 0.0) == 2 ** 30


@pytest.mark.parametrize("kwargs, message", [
    ({"initial_interval_ms": -1}, "retry_policy: initial_interval_ms must be an integer 0..4294967295, got -1"),
    ({"max_interval_ms": 1.5}, "retry_policy: max_interval_ms must be an integer 0..4294967295, got 1.5"),
    ({"multiplier": 0.5}, "retry_policy: multiplier must be a number >= 1, got 0.5"),
    ({"multiplier": float("nan")}, "retry_policy: multiplier must be a number >= 1, got nan"),
    ({"jitter_percent": 25}, "retry_policy: jitter_percent must be a fraction 0..1 (0.25 = 25%), got 25"),
    ({"jitter_percent": True}, "retry_policy: jitter_percent must be a fraction 0..1 (0.25 = 25%), got True"),
])
def test_a_retry_policy_with_a_bad_value_names_it(kwargs, message):
    with pytest.raises(ValueError) as exc:
        RetryPolicy(**kwargs)
    assert str(exc.value) == message


def test_a_retry_policy_is_written_with_float_multiplier_and_jitter():
    assert buquet.dumps(RetryPolicy(500, 10000, 1.5, 0.0).to_dict()) == \
        '{"initial_interval_ms":500,"max_interval_ms":10000,"multiplier":1.5,"jitter_percent":0.0}'
    assert buquet.dumps(RetryPolicy(100, 1000, 2, 0).to_dict()) == \
        '{"initial_interval_ms":100,"max_interval_ms":1000,"multiplier":2.0,"jitter_percent":0.0}'


# ============================================================================
# Golden compatibility: the spec's documents through our transitions (spec 3.6)
# ============================================================================


def _substitute(body, **pairs):
    for old, new in pairs.items():
        body = body.replace(old.encode(), new.encode())
    return body


def test_claiming_the_pending_example_gives_the_running_example():
    task = decode_task(golden("pending"))
    new = transition(task.doc, "claim", at("2026-01-27T12:00:07.250431"), worker_id="worker-1a2b3c4d",
                     new_lease_id=LEASE)
    # We write microseconds where the original wrote nanoseconds.
    assert encode_task(new) == golden("running").replace(b".250431877Z", b".250431Z")


def test_completing_the_running_example_gives_the_completed_example():
    task = decode_task(golden("running"))
    new = transition(task.doc, "complete", at("2026-01-27T12:00:09.871200"), lease_id=LEASE,
                     output={"sent": True})
    assert encode_task(new) == golden("completed")


def test_archiving_the_completed_example_gives_the_archived_example():
    new = transition(decode_task(golden("completed")).doc, "archive", at("2026-01-28T08:00:00"))
    assert encode_task(new) == golden("archived")


def test_failing_the_last_attempt_gives_the_failed_example():
    failed = golden_doc("failed")
    running = dict(failed, status="running", lease_expires_at="2026-01-27T12:05:12.004118230Z",
                   lease_id=LEASE, updated_at="2026-01-27T12:00:12.004118230Z", completed_at=None,
                   worker_id="worker-1a2b3c4d", last_error="Retryable error: SMTP 451 try later")
    new = transition(running, "fail", at("2026-01-27T12:00:14.913377"), lease_id=LEASE,
                     error="Retryable error: SMTP 451 try later")
    assert encode_task(new) == golden("failed").replace(b".913377001Z", b".913377Z")


def test_cancelling_a_pending_task_gives_the_cancelled_example():
    cancelled = golden_doc("cancelled")
    pending = {k: v for k, v in cancelled.items() if k not in ("cancelled_at", "cancelled_by")}
    pending.update(status="pending", updated_at="2026-01-27T12:00:05Z", last_error=None)
    new = transition(decode_task(encode_task(pending)).doc, "cancel", at("2026-01-27T12:03:00.120317"),
                     reason="No longer needed", cancelled_by="user:alice")
    assert encode_task(new) == golden("cancelled")


def test_expiring_a_pending_task_gives_the_expired_example():
    expired = golden_doc("expired")
    pending = {k: v for k, v in expired.items() if k != "expired_at"}
    pending.update(status="pending", updated_at="2026-01-27T12:00:05Z")
    new = transition(decode_task(encode_task(pending)).doc, "expire", at("2026-01-27T12:10:09.500"))
    assert encode_task(new) == golden("expired")


@pytest.mark.parametrize("name, event", [
    ("pending", "claim"), ("running", "complete"), ("running", "retry"), ("completed", "archive"),
    ("failed", "replay"), ("cancelled", "archive"), ("expired", "replay"), ("archived", None),
])
def test_a_rewrite_keeps_field_order_nulls_z_timestamps_and_unknown_fields(name, event):
    original = golden(name)
    # An unknown field another writer added, with non-ASCII and characters to escape.
    body = original[:-1] + ',"x_extension":{"note":"é\\n\\u0001","list":[1.5,null]}}'.encode()
    doc = decode_task(body).doc
    if event is not None:
        doc = transition(doc, event, at("2026-01-27T12:30:00.123456"), lease_id=doc.get("lease_id"),
                         **EVENT_ARGS[event])
    out = encode_task(doc)
    fields = list(json.loads(out))
    assert fields[-1] == "x_extension"
    assert out.endswith(',"x_extension":{"note":"é\\n\\u0001","list":[1.5,null]}}'.encode())
    order = [f for f in buquet.TASK_FIELDS if f in fields]
    assert fields[:-1] == order
    # fields that are always written stay written (null when unset), the optional ones stay omitted
    always = [f for f in buquet.TASK_FIELDS if f not in buquet._OMIT_IF_NULL]
    assert all(f in fields for f in always)
    for f in buquet._OMIT_IF_NULL:
        assert f not in fields or json.loads(out)[f] is not None
    for ts in re.findall(rb'"(\d{4}-\d\d-\d\dT[^"]*)"', out):
        assert re.fullmatch(rb"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{3}|\.\d{6}|\.\d{9})?Z", ts), ts
    assert json.dumps(json.loads(out), separators=(",", ":"), ensure_ascii=False).encode() == out
    validate_task_document(json.loads(out))


# ============================================================================
# The server clock (spec 5): Date headers carried forward by the monotonic clock
# ============================================================================


class _Monotonic:
    def __init__(self, value):
        self.value = value

    def __call__(self):
        return self.value


def test_the_server_clock_places_now_inside_the_second_the_server_stamped():
    mono = _Monotonic(100.2)
    clock = buquet._ServerClock(monotonic=mono)
    assert clock.synced is False

    clock.observe(at("2026-01-27T12:00:05"), 100.0, 100.2)  # offset in [D - 100.2, D + 1 - 100.0]

    assert clock.synced is True
    assert clock.now() == at("2026-01-27T12:00:05.600000")
    mono.value = 160.2
    assert clock.now() == at("2026-01-27T12:01:05.600000")


def test_more_replies_narrow_the_server_clock_to_their_intersection():
    mono = _Monotonic(0.0)
    clock = buquet._ServerClock(monotonic=mono)
    clock.observe(at("2026-01-27T12:00:05"), 10.0, 10.1)   # [D - 10.1, D - 9.0]
    clock.observe(at("2026-01-27T12:00:06"), 10.85, 10.9)  # [D + 1 - 10.9, D + 2 - 10.85] = [D - 9.9, D - 8.85]
    mono.value = 10.0
    # intersection [D - 9.9, D - 9.0], midpoint D - 9.45: at monotonic 10.0 it is D + 0.55
    assert clock.now() == at("2026-01-27T12:00:05.550000")


def test_a_reply_outside_the_known_bounds_restarts_the_server_clock():
    mono = _Monotonic(20.0)
    clock = buquet._ServerClock(monotonic=mono)
    clock.observe(at("2026-01-27T12:00:05"), 10.0, 10.0)
    clock.observe(at("2026-01-27T13:00:00"), 20.0, 20.0)  # the server's clock jumped an hour
    assert clock.now() == at("2026-01-27T13:00:00.500000")


def test_the_server_clock_never_goes_backwards_when_a_reply_narrows_it():
    mono = _Monotonic(10.2)
    clock = buquet._ServerClock(monotonic=mono)
    clock.observe(at("2026-01-27T12:00:05"), 10.0, 10.0)  # offset in [D - 10, D - 9]
    seen = clock.now()
    assert seen == at("2026-01-27T12:00:05.700000")

    clock.observe(at("2026-01-27T12:00:05"), 10.2, 10.2)  # narrows to [D - 10, D - 9.2]: D + 0.6 at 10.2

    assert clock.now() == seen
    mono.value = 10.4
    assert clock.now() == at("2026-01-27T12:00:05.800000")


def test_before_any_reply_the_server_clock_offers_the_local_time_provisionally():
    mono = _Monotonic(10.0)
    clock = buquet._ServerClock(monotonic=mono, wall=lambda: at("2026-01-27T12:00:05.300000").timestamp())

    now, agreed = clock.provisional()
    clock.observe(at("2026-01-27T12:00:05"), 10.0, 10.1)  # offset in [D - 10.1, D + 1 - 10]

    assert now == at("2026-01-27T12:00:05.300000")
    assert agreed() is True
    assert clock.now() == now  # the wall clock lies within the bounds: it is the time


@pytest.mark.parametrize("local, agrees", [
    ("2026-01-27T12:00:05.000000", True),   # the bounds are [D, D + 1]
    ("2026-01-27T12:00:05.999000", True),
    ("2026-01-27T12:00:06.000000", True),
    ("2026-01-27T12:00:04.990000", False),  # 10 ms early
    ("2026-01-27T12:00:06.010000", False),  # 10 ms late
    ("2026-01-27T12:00:08.000000", False),
])
def test_a_provisional_time_agrees_only_when_it_lies_within_the_servers_bounds(local, agrees):
    clock = buquet._ServerClock(monotonic=_Monotonic(10.0), wall=lambda: at(local).timestamp())

    now, agreed = clock.provisional()
    assert agreed() is False  # no reply yet: nothing to agree with
    clock.observe(at("2026-01-27T12:00:05"), 10.0, 10.0)  # offset in [D - 10, D - 9]

    assert agreed() is agrees
    if agrees:  # later times never precede the one handed out
        assert clock.now() >= now


def test_once_synced_the_provisional_time_is_the_servers():
    clock = buquet._ServerClock(monotonic=_Monotonic(10.0), wall=lambda: 0.0)
    clock.observe(at("2026-01-27T12:00:05"), 10.0, 10.0)

    assert clock.provisional() == (at("2026-01-27T12:00:05.500000"), None)


def test_the_server_clock_takes_the_local_wall_clock_when_it_lies_within_the_bounds():
    mono = _Monotonic(10.0)
    wall = _Monotonic(at("2026-01-27T12:00:05.123000").timestamp())
    clock = buquet._ServerClock(monotonic=mono, wall=wall)
    clock.observe(at("2026-01-27T12:00:05"), 10.0, 10.0)  # server time in [05, 06] at monotonic 10

    assert clock.now() == at("2026-01-27T12:00:05.123000")  # not the midpoint 05.5
    wall.value = at("2026-01-27T12:00:07").timestamp()  # the wall clock stepped out of the bounds
    assert clock.now() == at("2026-01-27T12:00:05.500000")


def _index_doc(status, lease_expires_at=None):
    doc = {"id": "3f2b8c1e-5a7d-4e9b-8c21-0d6f4a1b2c3d", "shard": "3", "status": status,
           "available_at": "2026-01-27T12:00:05Z"}
    if lease_expires_at:
        doc["lease_expires_at"] = lease_expires_at
    return doc


@pytest.mark.parametrize("kind, minute_at, age, doc, in_flight", [
    # a submit's ready entry goes before its task exists
    ("ready", "2026-01-27T12:10:00Z", 1, None, True),
    ("ready", "2026-01-27T12:10:00Z", 120, None, False),  # settled: the submit failed
    ("leases", "2026-01-27T12:15:00Z", 1, None, False),  # a lease entry never precedes its task
    # a claim's lease entry goes before the task turns running
    ("leases", "2026-01-27T12:15:00Z", 1, _index_doc("pending"), True),
    ("leases", "2026-01-27T12:15:00Z", 119.9, _index_doc("pending"), True),
    ("leases", "2026-01-27T12:15:00Z", 120, _index_doc("pending"), False),
    ("leases", "2026-01-27T12:15:00Z", None, _index_doc("pending"), False),  # no date: no benefit of doubt
    # an extension's newer entry goes before the new expiry is written
    ("leases", "2026-01-27T12:20:00Z", 1, _index_doc("running", "2026-01-27T12:15:00Z"), True),
    ("leases", "2026-01-27T12:12:00Z", 1, _index_doc("running", "2026-01-27T12:15:00Z"), False),  # older
    # a retry's ready entry goes before the task turns pending
    ("ready", "2026-01-27T12:10:30Z", 1, _index_doc("running", "2026-01-27T12:15:00Z"), True),
    ("ready", "2026-01-27T12:10:30Z", 300, _index_doc("running", "2026-01-27T12:15:00Z"), False),
    # nothing is in flight to a finished task
    ("ready", "2026-01-27T12:30:00Z", 1, _index_doc("completed"), False),
    ("leases", "2026-01-27T12:30:00Z", 1, _index_doc("failed"), False),
])
def test_an_index_entry_is_in_flight_only_while_young_and_only_towards_a_live_state(
        kind, minute_at, age, doc, in_flight):
    now = at("2026-01-27T12:10:20")
    minute = buquet.minute_bucket(at(minute_at.rstrip("Z")))
    modified = None if age is None else now - timedelta(seconds=age)
    assert buquet.index_key_in_flight(kind, minute, modified, doc, now) is in_flight
