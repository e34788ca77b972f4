"""Fuzz the parsers that read what others wrote: S3 replies, HTTP, dates, task
documents, durations, the small TOML reader and cron expressions.

Each parser may fail only with its module's own error type:

    sigv4 XML parsers       xml.etree.ElementTree.ParseError for bytes that are not
                            XML (the client turns it into an S3Error naming the
                            operation, tested at the end); well-formed XML of any shape
                            never raises
    sigv4._parse_error      never raises (it describes any body)
    sigv4._read_response    OSError (sigv4._BadReply) only
    date parsers            return None (sigv4) / ValueError (buquet.parse_timestamp)
    buquet.decode_task      InvalidTaskDocument
    buquet.parse_duration   UsageError
    buquet._parse_toml_small ConfigError
    cron.Cron               CronError; next_after on a valid one never raises

Hypothesis runs derandomized (reproducible in CI), without deadlines, with example
counts chosen to keep this file under about 20 s.
"""

import io
import json
import sys
import threading
import xml.etree.ElementTree as ET
from datetime import datetime, timedelta, timezone
from pathlib import Path
from xml.sax.saxutils import escape

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import buquet  # noqa: E402
import cron  # noqa: E402
import sigv4  # noqa: E402

FUZZ = settings(max_examples=300, deadline=None, derandomize=True,
                suppress_health_check=list(HealthCheck), database=None)
FUZZ_SMALL = settings(FUZZ, max_examples=150)

NS = "http://s3.amazonaws.com/doc/2006-03-01/"

# ==== S3 XML: random element trees with S3's names ==========================

S3_NAMES = [
    "ListBucketResult", "ListVersionsResult", "VersioningConfiguration", "Error",
    "GetBucketVersioningResponse", "Contents", "Version", "DeleteMarker", "CommonPrefixes",
    "Key", "ETag", "Size", "LastModified", "Prefix", "KeyCount", "IsTruncated",
    "NextContinuationToken", "EncodingType", "VersionId", "IsLatest", "NextKeyMarker",
    "NextVersionIdMarker", "Status", "Code", "Message", "RequestId", "Name", "MaxKeys",
    "StorageClass", "Owner", "ID", "DisplayName",
]
TEXTS = st.one_of(
    st.sampled_from(["", "true", "false", "TRUE", " true ", "url", "Enabled", "Suspended", "0", "12",
                     "-1", "\u00b2", "\u0663", "1e3", "99999999999999999999999", "%", "%zz", "%C3%A9",
                     "a+b", "%ff%fe", "2009-10-12T17:50:30.000Z", "2009-13-45T99:99:99Z",
                     "2009-10-12T17:50:30.\u00b2Z", "null", "\"etag\""]),
    st.text(max_size=20),
)


def _xml_text(text):
    # Only characters XML 1.0 can carry; the rest would make the document invalid,
    # which the garbage tests cover anyway.
    ok = "".join(c for c in text if c in "\t\n\r" or "\x20" <= c <= "\ud7ff" or "\ue000" <= c <= "\ufffd"
                 or c >= "\U00010000")
    return escape(ok)


@st.composite
def element(draw, depth=0):
    name = draw(st.sampled_from(S3_NAMES))
    if depth >= 3 or draw(st.booleans()):
        return "<%s>%s</%s>" % (name, _xml_text(draw(TEXTS)), name)
    children = draw(st.lists(element(depth=depth + 1), max_size=5))
    return "<%s>%s</%s>" % (name, "".join(children), name)


@st.composite
def s3_document(draw):
    root = draw(st.sampled_from(["ListBucketResult", "ListVersionsResult", "VersioningConfiguration",
                                 "Error", "GetBucketVersioningResponse"] + S3_NAMES))
    xmlns = draw(st.sampled_from(['', ' xmlns="%s"' % NS, ' xmlns="urn:other"']))
    body = "".join(draw(st.lists(element(), max_size=8)))
    decl = draw(st.sampled_from(["", '<?xml version="1.0" encoding="UTF-8"?>\n']))
    return ("%s<%s%s>%s</%s>" % (decl, root, xmlns, body, root)).encode("utf-8")


LIST_V2 = (
    '<?xml version="1.0" encoding="UTF-8"?>\n<ListBucketResult xmlns="%s"><Name>b</Name>'
    "<Prefix>tasks/</Prefix><KeyCount>2</KeyCount><MaxKeys>1000</MaxKeys><EncodingType>url</EncodingType>"
    "<IsTruncated>true</IsTruncated><NextContinuationToken>tok+1</NextContinuationToken>"
    "<Contents><Key>tasks/0/a%%20b.json</Key><LastModified>2009-10-12T17:50:30.000Z</LastModified>"
    "<ETag>&quot;abc&quot;</ETag><Size>434</Size><StorageClass>STANDARD</StorageClass></Contents>"
    "<Contents><Key>tasks/1/c.json</Key><ETag>&quot;d&quot;</ETag><Size>1</Size></Contents>"
    "<CommonPrefixes><Prefix>tasks/2/</Prefix></CommonPrefixes></ListBucketResult>" % NS
).encode()
VERSIONS = (
    '<?xml version="1.0" encoding="UTF-8"?>\n<ListVersionsResult xmlns="%s"><Name>b</Name>'
    "<EncodingType>url</EncodingType><IsTruncated>true</IsTruncated><NextKeyMarker>k%%2B</NextKeyMarker>"
    "<NextVersionIdMarker>v2</NextVersionIdMarker>"
    "<Version><Key>k</Key><VersionId>v1</VersionId><IsLatest>true</IsLatest><ETag>&quot;e&quot;</ETag>"
    "<Size>3</Size><LastModified>2009-10-12T17:50:30.123Z</LastModified></Version>"
    "<DeleteMarker><Key>k</Key><VersionId>v0</VersionId><IsLatest>false</IsLatest>"
    "<LastModified>2009-10-12T17:50:29.000Z</LastModified></DeleteMarker></ListVersionsResult>" % NS
).encode()
VERSIONING = ('<VersioningConfiguration xmlns="%s"><Status>Enabled</Status></VersioningConfiguration>'
              % NS).encode()
ERROR = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>NoSuchKey</Code>'
         b"<Message>The specified key does not exist.</Message><RequestId>R1</RequestId></Error>")
VALID_REPLIES = [LIST_V2, VERSIONS, VERSIONING, ERROR]


@st.composite
def mutated(draw, base=st.sampled_from(VALID_REPLIES)):
    """A valid reply truncated, with bytes flipped, inserted or removed."""
    data = bytearray(draw(base))
    for _ in range(draw(st.integers(0, 4))):
        if not data:
            break
        op = draw(st.sampled_from(["cut", "flip", "insert", "delete"]))
        i = draw(st.integers(0, len(data) - 1))
        if op == "cut":
            del data[i:]
        elif op == "flip":
            data[i] = draw(st.integers(0, 255))
        elif op == "insert":
            data[i:i] = draw(st.binary(max_size=8))
        else:
            del data[i:i + draw(st.integers(1, 10))]
    return bytes(data)


XML_INPUTS = st.one_of(s3_document(), mutated(), st.binary(max_size=200),
                       st.text(max_size=100).map(lambda t: t.encode("utf-8")))
XML_GARBAGE_EXAMPLES = [b"", b"   ", b"<", b"<a>", b"\xff\xfe<\x00a\x00/>", b"<!DOCTYPE a [<!ENTITY e 'x'>]><a>&e;</a>",
                        b'<?xml version="1.0" encoding="no-such-codec"?><a/>',
                        b'<?xml version="1.0" encoding="utf-16"?><a/>',
                        b"<ListBucketResult><Contents><Size>\xc2\xb2</Size></Contents><KeyCount>\xc2\xb2</KeyCount>"
                        b"</ListBucketResult>",
                        b"<ListVersionsResult><Version><Size>\xc2\xb2</Size></Version></ListVersionsResult>",
                        b"<a><!-- c --><?pi x?><Contents><!-- c --></Contents></a>"]


def _only_parse_error(call, body):
    try:
        call(body)
    except ET.ParseError:
        pass  # not XML: the client reports it as an S3Error (see the end of this file)


def _examples(*bodies):
    def deco(f):
        for body in bodies:
            f = example(body)(f)
        return f
    return deco


@FUZZ
@given(XML_INPUTS)
@_examples(*XML_GARBAGE_EXAMPLES + VALID_REPLIES)
def test_list_objects_v2_parser_raises_only_parse_error(body):
    _only_parse_error(lambda b: sigv4._parse_list_objects_v2(b, None), body)


@FUZZ
@given(s3_document())
def test_list_objects_v2_parser_reads_any_well_formed_document(body):
    result = sigv4._parse_list_objects_v2(body, None)
    assert isinstance(result.is_truncated, bool)
    assert isinstance(result.key_count, int)
    assert all(isinstance(k, str) for k in result.keys)
    for obj in result.contents:
        assert obj.size is None or isinstance(obj.size, int)
        obj.last_modified  # parsed lazily: must not raise either


@FUZZ
@given(XML_INPUTS)
@_examples(*XML_GARBAGE_EXAMPLES + VALID_REPLIES)
def test_list_object_versions_parser_raises_only_parse_error(body):
    _only_parse_error(sigv4._parse_list_object_versions, body)


@FUZZ
@given(s3_document())
def test_list_object_versions_parser_reads_any_well_formed_document(body):
    versions, truncated, key_marker, version_marker = sigv4._parse_list_object_versions(body)
    assert isinstance(truncated, bool)
    for v in versions:
        assert v.size is None or isinstance(v.size, int)
        assert isinstance(v.is_latest, bool)


@FUZZ
@given(XML_INPUTS)
@_examples(*XML_GARBAGE_EXAMPLES + VALID_REPLIES)
def test_versioning_parser_raises_only_parse_error(body):
    _only_parse_error(sigv4._parse_versioning, body)


@FUZZ
@given(s3_document())
def test_versioning_parser_reads_any_well_formed_document(body):
    status = sigv4._parse_versioning(body)
    assert status is None or isinstance(status, str)


def test_the_valid_replies_parse_as_expected():
    page = sigv4._parse_list_objects_v2(LIST_V2, None)
    assert page.keys == ["tasks/0/a b.json", "tasks/1/c.json"]
    assert page.contents[0].size == 434 and page.is_truncated and page.key_count == 2
    assert page.next_continuation_token == "tok+1" and page.common_prefixes == ["tasks/2/"]
    versions, truncated, key_marker, version_marker = sigv4._parse_list_object_versions(VERSIONS)
    assert [(v.key, v.version_id, v.is_delete_marker) for v in versions] == [("k", "v1", False), ("k", "v0", True)]
    assert (truncated, key_marker, version_marker) == (True, "k+", "v2")
    assert sigv4._parse_versioning(VERSIONING) == "Enabled"


def test_unicode_digits_that_int_rejects_are_not_sizes():
    # '²'.isdigit() is True but int('²') raises: such a size or count is unreadable, not fatal.
    body = "<ListBucketResult><Contents><Key>k</Key><Size>\u00b2</Size></Contents><KeyCount>\u00b2</KeyCount>" \
           "</ListBucketResult>".encode()
    page = sigv4._parse_list_objects_v2(body, None)
    assert page.contents[0].size is None and page.key_count == 1
    body = "<ListVersionsResult><Version><Key>k</Key><Size>\u00b2</Size></Version></ListVersionsResult>".encode()
    assert sigv4._parse_list_object_versions(body)[0][0].size is None


# ==== Error bodies ==========================================================


@FUZZ
@given(st.integers(100, 999), st.one_of(XML_INPUTS, st.sampled_from([
    b"<html><body>502 Bad Gateway</body></html>", b"<Error><Code>SlowDown</Code>",
    b"<?xml version='1.0'?><Error>", b"<Error><Code></Code><Message>  a \n b </Message></Error>",
    b"<Other><Error><Code>X</Code></Error></Other>", b"\x00" * 10 + b"\xff" * 10,
])))
@example(404, ERROR)
def test_error_parser_describes_any_body_in_one_line(status, body):
    code, message, request_id = sigv4._parse_error(status, body)
    assert isinstance(code, str) and code
    assert isinstance(message, str) and "\n" not in message
    assert request_id is None or isinstance(request_id, str)


# ==== HTTP replies ==========================================================

GOOD_REPLIES = [
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nDate: Sun, 06 Nov 1994 08:49:37 GMT\r\n\r\nhello",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;x=y\r\nhello\r\n3\r\nabc\r\n0\r\nT: 1\r\n\r\n",
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n",
    b"HTTP/1.0 404 Not Found\r\nContent-Type: application/xml\r\n\r\n" + ERROR,
]
HTTP_TOKENS = [b"HTTP/1.1 ", b"HTTP/1.0 ", b"200", b"100", b"204", b"304", b"500", b" OK", b"\r\n", b"\n",
               b"Content-Length: ", b"Transfer-Encoding: chunked", b"Connection: close", b"5", b"-1", b"0",
               b"ff", b"99999999999999999999999999", b"\xb2", b"\xb200", b";ext", b"hello", b":", b" ", b"\x00"]


@st.composite
def http_reply(draw):
    return b"".join(draw(st.lists(st.sampled_from(HTTP_TOKENS), max_size=25)))


@FUZZ
@given(st.one_of(mutated(st.sampled_from(GOOD_REPLIES)), http_reply(), st.binary(max_size=300)),
       st.sampled_from(["GET", "HEAD", "PUT", "CONNECT"]))
@example(b"HTTP/1.1 \xb200 OK\r\n\r\n", "GET")
@example(b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999999999\r\n\r\n", "GET")
@example(b"HTTP/1.1 200 OK\r\nContent-Length: -5\r\n\r\nabc", "GET")
@example(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffffffffffff\r\n", "GET")
@example(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-5\r\nabc\r\n", "GET")
@example(b"HTTP/1.1 200 OK\r\nContent-Length: \xb2\r\n\r\n", "GET")
@example(b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 300 + b"\r\n", "GET")
@example(b"HTTP/1.1 200 OK\r\nX: " + b"y" * 70000 + b"\r\n\r\n", "GET")
def test_http_reply_reader_raises_only_os_errors(data, method):
    try:
        status, headers, body, will_close = sigv4._read_response(io.BytesIO(data), method)
    except OSError:
        return
    assert 100 <= status <= 999 and isinstance(body, bytes) and isinstance(will_close, bool)


def test_well_formed_replies_read_as_expected():
    assert sigv4._read_response(io.BytesIO(GOOD_REPLIES[0]), "GET")[::2] == (200, b"hello")
    assert sigv4._read_response(io.BytesIO(GOOD_REPLIES[1]), "GET")[2] == b"helloabc"
    assert sigv4._read_response(io.BytesIO(GOOD_REPLIES[2]), "PUT")[0] == 204


# ==== Dates and timestamps ==================================================


@FUZZ
@given(st.one_of(st.text(max_size=40), st.builds(
    lambda *p: " ".join(p),
    st.sampled_from(["Sun,", "Mon,", "x"]), st.sampled_from(["06", "0", "99", "\u00b2", "-1", "\u0663"]),
    st.sampled_from(["Nov", "Feb", "nov", "Foo"]),
    st.sampled_from(["1994", "0", "9999", "10000", "99999999999999999999", "-5"]),
    st.sampled_from(["08:49:37", "24:00:00", "1:2:3", "a:b:c", "08:49", "::", "99999999999999999999:0:0"]),
    st.sampled_from(["GMT", "UTC", "PST"]))))
@example("Sun, 06 Nov 99999999999999999999 08:49:37 GMT")
def test_http_date_parser_returns_a_datetime_or_none(text):
    result = sigv4._parse_http_date(text)
    assert result is None or result.tzinfo is not None


@FUZZ
@given(st.one_of(st.text(max_size=40), st.from_regex(
    r"\A[0-9\u00b2]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{0,12})?"
    r"\s?(Z|z|UTC|[+-][0-9]{2}:?[0-9]{2})?\Z")))
@example("9999-12-31T23:59:59-23:59")
@example("0001-01-01T00:00:00+23:59")
@example("0000-01-01T00:00:00Z")
@example("2016-12-31T23:59:60Z")
def test_timestamp_parsers_fail_only_with_value_error(text):
    try:
        dt = buquet.parse_timestamp(text)
    except ValueError:
        pass
    else:
        assert dt.tzinfo is not None
    result = sigv4._parse_timestamp(text)  # S3's XML dates: None when unreadable
    assert result is None or result.tzinfo is not None


# ==== Task documents ========================================================

MINIMAL = {
    "id": "0f4b7b7a-3f0e-4a6e-9c84-3f6f7d1b2c3d", "shard": "3", "task_type": "send_email",
    "input": {"to": "a@example.com"}, "created_at": "2026-01-27T12:00:05Z",
    "available_at": "2026-01-27T12:00:05Z", "updated_at": "2026-01-27T12:00:05Z",
}
GOLDEN = sorted((Path(__file__).parent / "golden").glob("*.json"))
JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70), st.floats(allow_nan=True),
              st.text(max_size=30), st.sampled_from(["pending", "running", "2026-01-27T12:00:05Z",
                                                    "9999-12-31T23:59:59-23:59", "not-a-uuid", ""])),
    lambda children: st.one_of(st.lists(children, max_size=4),
                               st.dictionaries(st.text(max_size=10), children, max_size=4)),
    max_leaves=10,
)
TASK_FIELDS = ["id", "shard", "task_type", "input", "output", "status", "created_at", "available_at",
               "updated_at", "lease_id", "lease_expires_at", "worker_id", "last_error", "timeout_seconds",
               "max_retries", "retry_count", "attempt", "reschedule_count", "max_reschedules",
               "cancel_requested", "retry_policy", "expires_at", "input_ref", "idempotency_key"]


@st.composite
def near_valid_task(draw):
    base = dict(json.loads(draw(st.sampled_from(GOLDEN)).read_bytes())) if GOLDEN and draw(st.booleans()) \
        else dict(MINIMAL)
    for _ in range(draw(st.integers(0, 3))):
        name = draw(st.sampled_from(TASK_FIELDS + sorted(base)))
        if draw(st.integers(0, 4)) == 0:
            base.pop(name, None)
        else:
            base[name] = draw(JSON_VALUES)
    if draw(st.booleans()):
        base["retry_policy"] = draw(st.dictionaries(
            st.sampled_from(["initial_interval_ms", "max_interval_ms", "multiplier", "jitter_percent"]),
            JSON_VALUES, max_size=4))
    return json.dumps(base).encode()


@FUZZ
@given(st.one_of(near_valid_task(), st.binary(max_size=200), JSON_VALUES.map(lambda v: json.dumps(v).encode()),
                 mutated(near_valid_task())))
@example(b"[" * 100000)
@example(b'{"a":' * 100000)
@example(json.dumps(dict(MINIMAL, input=[[[[[]]]]])).encode())
@example(b"\xff\xfe{\x00}\x00")
@example(("{\"id\": " + "1" * 5000 + "}").encode())
def test_decode_task_raises_only_invalid_task_document(body):
    try:
        task = buquet.decode_task(body)
    except buquet.InvalidTaskDocument:
        return
    assert task.id and task.status in buquet.STATUSES


def test_the_golden_documents_decode():
    assert GOLDEN
    for path in GOLDEN:
        buquet.decode_task(path.read_bytes())


# ==== Durations, TOML =======================================================


@FUZZ
@given(st.one_of(st.text(max_size=20), st.lists(st.sampled_from(
    ["1", "30", "1.5", ".5", "\u00b2", "\u0663", "s", "m", "h", "d", "w", "hours", "week", "weeks", " ", "x",
     "1e309", "9" * 400, "-", "\t"]), max_size=6).map("".join)))
@example("9" * 400 + "w")
@example("\u0663\u0660s")
def test_parse_duration_raises_only_usage_error(text):
    try:
        seconds = buquet.parse_duration(text)
    except buquet.UsageError:
        return
    assert isinstance(seconds, float) and seconds >= 0


TOML_TOKENS = ["[queue]", "[a.b]", "[[x]]", "[", "]", "name", "x.y", '"q"', "'q'", '"""', "'''", "=", " = ",
               "1", "-1", "1.5", "1e3", "inf", "nan", "true", "false", "[1, 2]", "[", "{a = 1}", "{", "}",
               "\n", "#c", "\\", '"\\u00e9"', '"\\x"', '"\\uD800"', "2026-01-27T12:00:05Z", "0x1f", "1_000",
               ",", '"', "'"]


@FUZZ
@given(st.one_of(st.text(max_size=80), st.lists(st.sampled_from(TOML_TOKENS), max_size=25).map("".join)))
@example('a = "\\uD800"')
@example('a = "\\U00110000"')
@example("a = 99999999999999999999999999999999")
@example("a = " + "[" * 5000)
@example('[q]\na = 1\n[q]\na = 2')
@example('a = 1\na = 2')
@example('a.b = 1\na = 2')
def test_small_toml_reader_raises_only_config_error(text):
    try:
        result = buquet._parse_toml_small(text, "fuzz.toml")
    except buquet.ConfigError as exc:
        assert "\n" not in str(exc)
        return
    assert isinstance(result, dict)


# ==== Cron ==================================================================

CRON_TOKENS = ["*", "*/5", "0", "59", "60", "7", "0-5", "5-0", "1-31/2", "JAN", "jan-MAR", "SUN", "mon-fri",
               "L", "W", "?", "#", "1#2", ",", "/", "-", "", "\u00b2", "\u0663", "1,2,,3", "*/0", "*/99",
               "99999999999999999999", "31", "30", "29", "2", "12", "FEB", "ſun"]


@st.composite
def cron_expr(draw):
    if draw(st.integers(0, 9)) == 0:
        return draw(st.sampled_from(["@daily", "@hourly", "@weekly", "@monthly", "@yearly", "@annually",
                                     "@midnight", "@reboot", "@DAILY", "@", "@every 5m"]))
    fields = [draw(st.lists(st.sampled_from(CRON_TOKENS), min_size=1, max_size=3).map("".join))
              for _ in range(draw(st.sampled_from([5, 5, 5, 5, 4, 6])))]
    return " ".join(fields)


@FUZZ
@given(st.one_of(cron_expr(), st.text(max_size=30)))
@example("0 0 30 2 *")
@example("0 0 31 4,6,9,11 *")
@example("0 0 29 2 *")
def test_cron_parser_raises_only_cron_error(expr):
    try:
        cron.Cron(expr)
    except cron.CronError as exc:
        assert "\n" not in str(exc)


VALID_CRON_FIELDS = [
    st.sampled_from(["*", "0", "*/15", "5,35", "0-59/7", "59"]),
    st.sampled_from(["*", "0", "23", "*/6", "1-5", "2,3"]),
    st.sampled_from(["*", "1", "31", "29", "30", "15-20", "*/10", "1,15"]),
    st.sampled_from(["*", "2", "FEB", "1-12/3", "jan,jul", "4,6,9,11", "12"]),
    st.sampled_from(["*", "0", "7", "MON-FRI", "sat,sun", "3", "1-5/2"]),
]
ZONES = [None, "UTC", "Europe/Berlin", "America/New_York", "Australia/Lord_Howe", "Asia/Kolkata",
         timezone(timedelta(hours=-9, minutes=-30))]


def _zone_available(zone):
    try:
        cron.Cron("* * * * *", tz=zone)
        return True
    except cron.CronError:
        return False


ZONES = [z for z in ZONES if _zone_available(z)]


@FUZZ_SMALL
@given(st.tuples(*VALID_CRON_FIELDS).map(" ".join), st.sampled_from(ZONES),
       st.datetimes(min_value=datetime(1970, 1, 2), max_value=datetime(2099, 12, 1),
                    timezones=st.sampled_from([timezone.utc, timezone(timedelta(hours=14)),
                                               timezone(timedelta(hours=-12))])))
@example("0 0 29 2 *", None, datetime(2096, 3, 1, tzinfo=timezone.utc))
@example("0 0 31 12 *", "Europe/Berlin", datetime(2099, 11, 30, tzinfo=timezone.utc))
@example("30 2 * 3 SUN", "Europe/Berlin", datetime(1990, 3, 1, tzinfo=timezone.utc))
def test_next_after_never_raises_on_valid_crons(expr, zone, moment):
    try:
        schedule = cron.Cron(expr, tz=zone)
    except cron.CronError:
        return  # e.g. "31" with "4,6,9,11": rejected as never matching
    result = schedule.next_after(moment)
    assert result is not None and result > moment
    assert result.second == 0 and result.microsecond == 0


# ==== A malformed success body through the client ===========================


class _OneReplyServer:
    """A loopback HTTP server answering every request with one canned reply."""

    def __init__(self, reply):
        import socket

        self.reply = reply
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.endpoint = "http://127.0.0.1:%d" % self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                rfile = conn.makefile("rb")
                try:
                    while True:
                        line = rfile.readline()
                        if not line:
                            break
                        length = 0
                        while True:
                            h = rfile.readline()
                            if h in (b"\r\n", b""):
                                break
                            if h.lower().startswith(b"content-length:"):
                                length = int(h.split(b":")[1])
                        rfile.read(length)
                        conn.sendall(self.reply)
                except OSError:
                    pass

    def close(self):
        self.sock.close()


def _body_reply(body):
    return (b"HTTP/1.1 200 OK\r\nContent-Type: application/xml\r\nContent-Length: %d\r\n\r\n" % len(body)) + body


@pytest.mark.parametrize("call, operation", [
    (lambda c: c.list_objects_v2("bkt", prefix="tasks/"), "ListObjectsV2"),
    (lambda c: c.list_object_versions("bkt"), "ListObjectVersions"),
    (lambda c: c.get_bucket_versioning("bkt"), "GetBucketVersioning"),
    (lambda c: c.delete_objects("bkt", ["a"]), "DeleteObjects"),
])
@pytest.mark.parametrize("body", [b"<ListBucketResult><Contents>", b"\xff\xfe garbage", b"<html>oops</html"])
def test_a_malformed_success_body_is_an_s3_error_naming_the_operation(call, operation, body):
    server = _OneReplyServer(_body_reply(body))
    client = sigv4.S3Client(endpoint=server.endpoint, region="us-east-1",
                            credentials=sigv4.Credentials("AKIDFUZZ", "fuzz-secret"), max_attempts=1,
                            environ={})
    try:
        with pytest.raises(sigv4.S3Error) as info:
            call(client)
    finally:
        client.close()
        server.close()
    text = str(info.value)
    assert operation in text and "bkt" in text and "\n" not in text
    assert not isinstance(info.value, ET.ParseError)
