"""SigV4 signing without a network: known answers, botocore as an oracle, pure helpers.

Layers:
  - AWS's published vectors (shared/vectors/sigv4.json) must give the exact Authorization.
  - botocore (installed with moto, a test dependency) is an independent implementation:
    a few hundred seeded random S3 requests, awkward on purpose, must sign identically,
    both as headers (`S3SigV4Auth`) and as presigned URLs (`S3SigV4QueryAuth`).
  - The small pure pieces: query canonicalisation, the signing-key cache, header
    replacement, addressing, NO_PROXY rules, the XML reply parsers, error strings.
"""

import hashlib
import json
import random
from datetime import datetime, timedelta, timezone
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import pytest

import sigv4
from sigv4 import (
    EMPTY_SHA256,
    UNSIGNED_PAYLOAD,
    ConflictError,
    Credentials,
    NoSuchKey,
    S3Client,
    S3Error,
    TransportError,
    UncertainWriteError,
    canonical_query_string,
    canonical_request,
    presign,
    sign,
    signing_key,
    string_to_sign,
)

# CI copies shared/ beside the clone: /work/main/tests/this.py -> /work/shared/vectors.
VECTORS = Path(__file__).resolve().parents[2] / "shared" / "vectors" / "sigv4.json"
UTC = timezone.utc
NOW = datetime(2024, 5, 17, 12, 30, 45, tzinfo=UTC)
CREDS = Credentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY")


# ==== Known answers ==========================================================


def _vector_params():
    if not VECTORS.is_file():
        reason = "SigV4 vectors not found at %s (CI copies shared/ beside the clone)" % VECTORS
        return [pytest.param(None, marks=pytest.mark.skip(reason=reason), id="vectors-missing")]
    cases = json.loads(VECTORS.read_text(encoding="utf-8"))["cases"]
    return [pytest.param(case, id=case["name"]) for case in cases]


def _vector_now(case):
    return datetime.strptime(case["headers"]["X-Amz-Date"], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)


@pytest.mark.parametrize("case", _vector_params())
def test_each_published_vector_gives_exactly_the_expected_authorization(case):
    assert hashlib.sha256(case["body"].encode("utf-8")).hexdigest() == case["payload_hash"]

    signed = sign(
        case["method"], case["url"], case["headers"], case["payload_hash"],
        Credentials(case["access_key"], case["secret_key"]), case["region"], case["service"],
        now=_vector_now(case),
    )

    assert signed["authorization"] == case["authorization"]


def test_a_session_token_in_the_credentials_signs_like_the_published_sts_vector():
    if not VECTORS.is_file():
        pytest.skip("SigV4 vectors not found at %s" % VECTORS)
    cases = {c["name"]: c for c in json.loads(VECTORS.read_text(encoding="utf-8"))["cases"]}
    case = cases["post-sts-header-before"]
    headers = dict(case["headers"])
    token = headers.pop("X-Amz-Security-Token")

    signed = sign(
        case["method"], case["url"], headers, case["payload_hash"],
        Credentials(case["access_key"], case["secret_key"], token), case["region"],
        case["service"], now=_vector_now(case),
    )

    assert signed["x-amz-security-token"] == token
    assert signed["authorization"] == case["authorization"]


def test_the_signing_key_matches_the_example_in_the_aws_documentation():
    # "Examples of how to derive a signing key for Signature Version 4" (AWS General Reference).
    key = signing_key("wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", "20120215", "us-east-1", "iam")

    assert key.hex() == "f4780e2d9f65fa895f9c67b32ce1baf0b0d8a43505a000a1a9e090d414db404d"


@pytest.mark.parametrize("key_len", [0, 1, 32, 63, 64, 65, 100, 200])
def test_the_own_hmac_sha256_agrees_with_the_standard_library(key_len):
    # sigv4 signs with its own HMAC over CPython's SHA-256 module (hashlib costs a cold
    # start 2.5 ms); keys longer than the 64-byte block are hashed first (RFC 2104).
    import hmac

    rng = random.Random(key_len)
    for msg_len in (0, 1, 55, 56, 64, 1000):
        key, msg = rng.randbytes(key_len), rng.randbytes(msg_len)
        assert sigv4._hmac_sha256(key, msg).digest() == hmac.new(key, msg, hashlib.sha256).digest()


# ==== botocore as an oracle ==================================================

# Pieces of keys, chosen to break naive encoders: reserved and sub-delim characters,
# spaces, non-ASCII (2, 3 and 4 UTF-8 bytes), doubled and trailing slashes.
_KEY_PIECES = [
    "a", "Z9", "tasks", " ", "  ", "é", "ключ", "任务", "😀", "+", "%", "%20", "~", "=", "&",
    "$", "@", ":", "//", "/", "-", "_", ".", "..", "*", "'", "(", ")", "!", ",", ";", "?",
    "#", "[", "]", "^", "`", "{", "}", "|", "\\", '"', "<", ">",
]
_QUERY_NAMES = [
    "versioning", "versions", "list-type", "prefix", "start-after", "continuation-token",
    "key-marker", "a", "A", "b", "x y", "ü", "+", "=", "a-b", "a.b", "uploads", "tagging",
]
_QUERY_VALUES = [None, "", "1", "2", "abc", "a b", "a+b", "a=b", "a&b", "100%", "~ok~", "é/ü",
                 "tasks/", "//", "ünïcødé 😀", "$@:,;"]
_ENDPOINTS = [
    ("https://s3.eu-west-1.amazonaws.com", None, "eu-west-1"),  # AWS virtual-hosted
    (None, None, "us-east-1"),
    (None, True, "ap-southeast-2"),
    (None, None, "cn-north-1"),
    ("http://127.0.0.1:9000", None, "us-east-1"),
    ("http://localhost:8333/base/", None, "us-east-1"),
    ("https://[::1]:9443", None, "eu-central-1"),
    ("https://minio.example.com", False, "us-west-2"),
]
_BUCKETS = ["bucket", "my-bucket-1", "dotted.bucket.name", "UpperCase", "b12"]


def _spaced(rng, text):
    """The same value with leading, trailing and inner runs of blanks."""
    words = text.split(" ")
    out = words[0]
    for word in words[1:]:
        out += rng.choice([" ", "  ", "   ", "\t", " \t "]) + word
    return rng.choice(["", " ", "  ", "\t"]) + out + rng.choice(["", " ", "   "])


def _random_key(rng):
    key = "".join(rng.choice(_KEY_PIECES) for _ in range(rng.randint(1, 8)))
    if rng.random() < 0.2:
        key += "/"
    if rng.random() < 0.1:
        key = "/" + key
    return key


def _random_query(rng, unique_names=False):
    params = []
    names = list(_QUERY_NAMES)
    for _ in range(rng.choice([0, 0, 1, 2, 3, 5])):
        name = rng.choice(names)
        if unique_names:
            names.remove(name)
        params.append((name, rng.choice(_QUERY_VALUES)))
    if not unique_names and params and rng.random() < 0.3:
        params.append((params[0][0], rng.choice(_QUERY_VALUES[1:])))  # a repeated name
    rng.shuffle(params)
    return sigv4._query(params)


def _random_headers(rng):
    headers = {}
    if rng.random() < 0.4:
        headers["Content-Type"] = rng.choice(["application/json", "text/plain; charset=utf-8"])
    if rng.random() < 0.5:
        headers[rng.choice(["X-Amz-Meta-A", "x-amz-meta-a", "X-AMZ-META-A"])] = _spaced(rng, "one two")
    if rng.random() < 0.3:
        # Two names differing only in case: both are sent and signed, joined by a comma.
        headers["X-Amz-Meta-Dup"] = _spaced(rng, "first value")
        headers["x-amz-meta-dup"] = _spaced(rng, "second  value")
    if rng.random() < 0.3:
        headers["If-Match"] = '"%032x"' % rng.getrandbits(128)
    if rng.random() < 0.2:
        headers["If-None-Match"] = "*"
    if rng.random() < 0.2:
        headers["Range"] = "bytes=0-%d" % rng.randint(0, 999)
    if rng.random() < 0.2:
        headers["x-amz-meta-empty"] = ""
    if rng.random() < 0.2:
        headers["Content-MD5"] = "1B2M2Y8AsgTpgAmY7PhCfg=="
    if rng.random() < 0.2:
        headers["User-Agent"] = "not signed/1.0"  # neither signer signs it
    if rng.random() < 0.1:
        headers["Expect"] = "100-continue"
    if rng.random() < 0.2:
        headers["x-amz-storage-class"] = "  REDUCED_REDUNDANCY "
    return headers


def _random_request(seed, *, presigned=False):
    rng = random.Random(seed)
    endpoint, path_style, region = rng.choice(_ENDPOINTS)
    bucket = rng.choice(_BUCKETS)
    key = None if rng.random() < 0.1 else _random_key(rng)
    url = sigv4._Endpoint(endpoint, region, path_style).url(bucket, key, _random_query(rng, presigned))
    if endpoint is None and rng.random() < 0.1:
        parts = urlsplit(url)  # a default port written out: it must not reach the host header
        url = parts._replace(netloc=parts.netloc + ":443").geturl()
    method = rng.choice(["GET", "PUT", "DELETE", "HEAD", "POST"])
    body = b""
    if method in ("PUT", "POST") and rng.random() < 0.8 and not presigned:
        body = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 64)))
    token = None
    if rng.random() < 0.3:
        token = "FwoGZXIvYXdzE" + "".join(rng.choice("ab/+=9Z") for _ in range(40)) + "=="
    creds = Credentials(
        "AKIA%016X" % rng.getrandbits(64),
        "".join(rng.choice("abcXYZ019/+") for _ in range(40)),
        token,
    )
    offset = timedelta(minutes=rng.choice([0, 0, 330, -480, 60]))
    now = datetime(2000, 1, 1, tzinfo=UTC) + timedelta(seconds=rng.randrange(100 * 365 * 86400))
    now = now.astimezone(timezone(offset))  # any aware datetime: the signer converts to UTC
    return dict(
        method=method, url=url, headers={} if presigned else _random_headers(rng), body=body,
        creds=creds, region=region, now=now, unsigned=not presigned and rng.random() < 0.1,
        expires=rng.choice([1, 60, 3600, 604800]),
    )


class _S3Config:
    """What botocore reads from request.context["client_config"] to skip payload signing."""

    s3 = {"payload_signing_enabled": False}


@pytest.fixture
def frozen_botocore(monkeypatch):
    """Freeze botocore's clock (it reads it inside add_auth) for this test only."""
    auth = pytest.importorskip("botocore.auth")
    box = {}
    if hasattr(auth, "get_current_datetime"):
        monkeypatch.setattr(auth, "get_current_datetime", lambda *a, **k: box["now"])
    else:  # older botocore: datetime.datetime.utcnow() inside botocore.auth
        import datetime as real

        class _Frozen(real.datetime):
            @classmethod
            def utcnow(cls):
                return box["now"]

        fake = type("datetime_module", (), {"datetime": _Frozen})
        monkeypatch.setattr(auth, "datetime", fake)

    def freeze(now):
        box["now"] = now.astimezone(UTC).replace(tzinfo=None)  # botocore wants naive UTC

    return auth, freeze


def _botocore_request(case):
    from botocore.awsrequest import AWSRequest

    return AWSRequest(method=case["method"], url=case["url"], headers=dict(case["headers"]),
                      data=case["body"])


def _botocore_credentials(case):
    from botocore.credentials import Credentials as BotoCredentials

    c = case["creds"]
    return BotoCredentials(c.access_key, c.secret_key, c.session_token)


@pytest.mark.parametrize("seed", range(300), ids=lambda s: "request-%03d" % s)
def test_sign_agrees_with_botocore_on_random_s3_requests(seed, frozen_botocore):
    auth, freeze = frozen_botocore
    case = _random_request(seed)
    payload_hash = UNSIGNED_PAYLOAD if case["unsigned"] else hashlib.sha256(case["body"]).hexdigest()

    ours = sign(case["method"], case["url"], case["headers"], payload_hash, case["creds"],
                case["region"], now=case["now"])

    theirs = _botocore_request(case)
    if case["unsigned"]:
        theirs.context["client_config"] = _S3Config()
    signer = auth.S3SigV4Auth(_botocore_credentials(case), "s3", case["region"])
    freeze(case["now"])
    signer.add_auth(theirs)
    their_authorization = theirs.headers["Authorization"]
    # On a mismatch, the canonical requests show where (pytest diffs the two strings);
    # botocore computes its own before adding Authorization, so take that out again.
    del theirs.headers["Authorization"]
    our_canonical, _ = canonical_request(
        case["method"], case["url"], {k: v for k, v in ours.items() if k != "authorization"},
        payload_hash,
    )
    assert our_canonical == signer.canonical_request(theirs), case
    assert ours["authorization"] == their_authorization, case
    assert ours["x-amz-content-sha256"] == theirs.headers["X-Amz-Content-SHA256"]


@pytest.mark.parametrize("seed", range(100), ids=lambda s: "presign-%03d" % s)
def test_presign_agrees_with_botocore_on_random_urls(seed, frozen_botocore):
    # Query names are unique here: botocore's presigner folds repeated names (parse_qs).
    auth, freeze = frozen_botocore
    case = _random_request(seed, presigned=True)

    ours = presign(case["method"], case["url"], case["creds"], case["region"],
                   expires=case["expires"], now=case["now"])

    theirs = _botocore_request(case)
    signer = auth.S3SigV4QueryAuth(_botocore_credentials(case), "s3", case["region"],
                                   expires=case["expires"])
    freeze(case["now"])
    signer.add_auth(theirs)
    ours_parts, theirs_parts = urlsplit(ours), urlsplit(theirs.url)
    assert ours_parts[:3] == theirs_parts[:3]
    assert sorted(parse_qsl(ours_parts.query, keep_blank_values=True)) == \
        sorted(parse_qsl(theirs_parts.query, keep_blank_values=True)), case
    assert ours_parts.query.rsplit("&", 1)[1] == "X-Amz-Signature=" + dict(
        parse_qsl(theirs_parts.query))["X-Amz-Signature"]


def test_the_oracle_would_notice_a_one_character_difference(frozen_botocore):
    # Guard against a vacuous oracle: change one byte of the key and botocore disagrees.
    auth, freeze = frozen_botocore
    case = _random_request(7)
    signer = auth.S3SigV4Auth(_botocore_credentials(case), "s3", case["region"])
    theirs = _botocore_request(dict(case, url=case["url"] + ("&x" if "?" in case["url"] else "?x")))
    freeze(case["now"])
    signer.add_auth(theirs)

    ours = sign(case["method"], case["url"], case["headers"],
                hashlib.sha256(case["body"]).hexdigest(), case["creds"], case["region"],
                now=case["now"])

    assert ours["authorization"] != theirs.headers["Authorization"]


# ==== canonical_query_string =================================================


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("", ""),
        ("versioning", "versioning="),
        ("versions&prefix=a", "prefix=a&versions="),
        ("b=2&a=1", "a=1&b=2"),
        ("a=2&a=1&a=", "a=&a=1&a=2"),  # repeated names: sorted by value
        ("B=1&a=1", "B=1&a=1"),  # byte order: upper case first
        ("a-b=1&a=2", "a=2&a-b=1"),  # sorted by name, not by "name=value"
        ("a=b=c", "a=b%3Dc"),  # only the first '=' separates
        ("a&&b=", "a=&b="),  # empty parts skipped
        ("k=a%20b", "k=a%20b"),
        ("k=a b", "k=a%20b"),  # a raw space is encoded, never as '+'
        ("k=a+b", "k=a%2Bb"),  # '+' is a literal plus, not a space
        ("k=%2f%7e", "k=%2F~"),  # upper-case hex, unreserved decoded
        ("k=-_.~", "k=-_.~"),
        ("k=é", "k=%C3%A9"),
        ("k=%C3%A9", "k=%C3%A9"),
        ("k=/:@$&", "k=%2F%3A%40%24"),  # the '&' ends the pair; '$', ':' and '/' are encoded
        ("%E2%9C%93=%E2%9C%93", "%E2%9C%93=%E2%9C%93"),
    ],
)
def test_canonical_query_string_encodes_and_sorts_like_the_spec(raw, expected):
    assert canonical_query_string(raw) == expected


def test_the_query_sent_by_the_client_is_already_canonical():
    params = [("prefix", "a b/é+"), ("versions", None), ("max-keys", "10"), ("a", "")]

    sent = sigv4._query(sorted(params, key=lambda p: p[0]))

    assert sent == "a=&max-keys=10&prefix=a%20b%2F%C3%A9%2B&versions"
    assert canonical_query_string(sent) == "a=&max-keys=10&prefix=a%20b%2F%C3%A9%2B&versions="


# ==== signing_key, sign, presign =============================================


def test_signing_key_returns_the_same_object_for_the_same_day_region_and_service():
    first = signing_key("secret-cache-1", "20240517", "eu-west-1", "s3")

    assert signing_key("secret-cache-1", "20240517", "eu-west-1", "s3") is first


@pytest.mark.parametrize(
    "changed",
    [
        ("secret-cache-2", "20240517", "eu-west-1", "s3"),
        ("secret-cache-1", "20240518", "eu-west-1", "s3"),
        ("secret-cache-1", "20240517", "eu-west-2", "s3"),
        ("secret-cache-1", "20240517", "eu-west-1", "sts"),
    ],
    ids=["secret", "day", "region", "service"],
)
def test_signing_key_cache_is_keyed_by_secret_day_region_and_service(changed):
    base = signing_key("secret-cache-1", "20240517", "eu-west-1", "s3")
    signing_key.cache_clear()

    other = signing_key(*changed)

    assert other != base
    assert other == signing_key.__wrapped__(*changed)  # what an uncached derivation gives


def test_sign_rejects_a_naive_datetime():
    with pytest.raises(ValueError, match="now must be an aware datetime"):
        sign("GET", "https://b.s3.amazonaws.com/k", {}, EMPTY_SHA256, CREDS, "us-east-1",
             now=datetime(2024, 5, 17, 12, 0))


def test_presign_rejects_a_naive_datetime():
    # A naive time would be read as local time and silently shift the signature's date.
    with pytest.raises(ValueError, match="now must be an aware datetime"):
        presign("GET", "https://b.s3.amazonaws.com/k", CREDS, "us-east-1",
                now=datetime(2024, 5, 17, 12, 0))


@pytest.mark.parametrize("expires", [0, -1, 604801])
def test_presign_rejects_an_expiry_outside_one_second_to_seven_days(expires):
    with pytest.raises(ValueError, match="expires must be 1 to 604800 seconds"):
        presign("GET", "https://b.s3.amazonaws.com/k", CREDS, "us-east-1", expires=expires, now=NOW)


def test_sign_converts_an_aware_datetime_to_utc():
    local = NOW.astimezone(timezone(timedelta(hours=-7)))

    assert sign("GET", "https://b.s3.amazonaws.com/k", {}, EMPTY_SHA256, CREDS, "us-east-1",
                now=local) == \
        sign("GET", "https://b.s3.amazonaws.com/k", {}, EMPTY_SHA256, CREDS, "us-east-1", now=NOW)


def test_sign_replaces_caller_headers_of_the_same_name_whatever_their_case():
    caller = {
        "HOST": "evil.example.com",
        "X-Amz-Date": "19990101T000000Z",
        "x-AMZ-content-SHA256": "0" * 64,
        "Authorization": "AWS4-HMAC-SHA256 forged",
        "X-Amz-Security-Token": "stale-token",
        "X-Amz-Meta-Kept": "yes",
    }

    signed = sign("PUT", "http://127.0.0.1:9000/b/k", caller, EMPTY_SHA256,
                  Credentials("AK", "SK", "fresh-token"), "us-east-1", now=NOW)

    assert signed == {
        "X-Amz-Meta-Kept": "yes",
        "host": "127.0.0.1:9000",
        "x-amz-date": "20240517T123045Z",
        "x-amz-content-sha256": EMPTY_SHA256,
        "x-amz-security-token": "fresh-token",
        "authorization": signed["authorization"],
    }
    assert "SignedHeaders=host;x-amz-content-sha256;x-amz-date;x-amz-meta-kept;" \
        "x-amz-security-token," in signed["authorization"]


def test_sign_leaves_the_callers_headers_untouched():
    caller = {"Host": "x", "Content-Type": "text/plain"}

    sign("GET", "https://b.s3.amazonaws.com/k", caller, EMPTY_SHA256, CREDS, "us-east-1", now=NOW)

    assert caller == {"Host": "x", "Content-Type": "text/plain"}


def test_the_session_token_header_is_added_and_signed():
    url = "https://b.s3.eu-west-1.amazonaws.com/k"
    with_token = Credentials("AK", "SK", "TOKEN/with+chars=")

    signed = sign("GET", url, {}, EMPTY_SHA256, with_token, "eu-west-1", now=NOW)
    unsigned_token = sign("GET", url, {}, EMPTY_SHA256, Credentials("AK", "SK"), "eu-west-1", now=NOW)

    assert signed["x-amz-security-token"] == "TOKEN/with+chars="
    assert "x-amz-security-token" not in unsigned_token
    assert "SignedHeaders=host;x-amz-content-sha256;x-amz-date;x-amz-security-token," \
        in signed["authorization"]
    # The token is covered by the signature: recomputed from the headers sent it matches,
    # and with another token it does not.
    def recomputed(headers):
        canonical, _ = canonical_request("GET", url, headers, EMPTY_SHA256)
        key = signing_key("SK", "20240517", "eu-west-1", "s3")
        scope = "20240517/eu-west-1/s3/aws4_request"
        return sigv4.signature(key, string_to_sign("20240517T123045Z", scope, canonical))

    sent = {k: v for k, v in signed.items() if k != "authorization"}
    assert signed["authorization"].endswith("Signature=" + recomputed(sent))
    assert not signed["authorization"].endswith(
        "Signature=" + recomputed(dict(sent, **{"x-amz-security-token": "OTHER"})))


def test_only_s3_gets_the_content_sha256_header():
    s3 = sign("GET", "https://h/", {}, EMPTY_SHA256, CREDS, "us-east-1", service="s3", now=NOW)
    sts = sign("GET", "https://h/", {}, EMPTY_SHA256, CREDS, "us-east-1", service="sts", now=NOW)

    assert s3["x-amz-content-sha256"] == EMPTY_SHA256
    assert "x-amz-content-sha256" not in sts
    assert "/us-east-1/sts/aws4_request, SignedHeaders=host;x-amz-date," in sts["authorization"]


@pytest.mark.parametrize(
    "url, host",
    [
        ("https://b.s3.amazonaws.com/k", "b.s3.amazonaws.com"),
        ("https://b.s3.amazonaws.com:443/k", "b.s3.amazonaws.com"),
        ("http://127.0.0.1:80/b/k", "127.0.0.1"),
        ("http://127.0.0.1:443/b/k", "127.0.0.1:443"),
        ("https://[::1]:9443/b/k", "[::1]:9443"),
        ("http://User@Example.COM:8080/b", "example.com:8080"),
    ],
)
def test_the_host_header_drops_default_ports_and_userinfo(url, host):
    assert sign("GET", url, {}, EMPTY_SHA256, CREDS, "us-east-1", now=NOW)["host"] == host


def test_the_string_to_sign_has_the_four_lines_of_the_spec():
    text = string_to_sign("20240517T123045Z", "20240517/us-east-1/s3/aws4_request", "canonical")

    assert text == "AWS4-HMAC-SHA256\n20240517T123045Z\n20240517/us-east-1/s3/aws4_request\n" \
        + hashlib.sha256(b"canonical").hexdigest()


def test_s3_paths_are_signed_exactly_as_sent_and_other_services_normalise_them():
    assert sigv4.canonical_uri("/b/a//./../k%20x", "s3") == "/b/a//./../k%20x"
    assert sigv4.canonical_uri("/b/a//./../k%20x", "service") == "/b/k%2520x"
    assert sigv4.canonical_uri("", "s3") == "/"


# ==== Addressing =============================================================


@pytest.mark.parametrize(
    "endpoint, region, path_style, bucket, key, expected",
    [
        (None, "eu-west-1", None, "bucket", "key", "https://bucket.s3.eu-west-1.amazonaws.com/key"),
        (None, "eu-west-1", None, "bucket", None, "https://bucket.s3.eu-west-1.amazonaws.com/"),
        (None, "us-east-1", None, "bucket", "a b/c+d", "https://bucket.s3.us-east-1.amazonaws.com/a%20b/c%2Bd"),
        (None, "eu-west-1", None, "my.bucket", "key", "https://s3.eu-west-1.amazonaws.com/my.bucket/key"),
        (None, "eu-west-1", None, "UpperCase", "key", "https://s3.eu-west-1.amazonaws.com/UpperCase/key"),
        (None, "eu-west-1", True, "bucket", "key", "https://s3.eu-west-1.amazonaws.com/bucket/key"),
        (None, "cn-north-1", None, "bucket", "key", "https://bucket.s3.cn-north-1.amazonaws.com.cn/key"),
        ("http://127.0.0.1:9000", "us-east-1", None, "bucket", "key", "http://127.0.0.1:9000/bucket/key"),
        ("http://127.0.0.1:9000", "us-east-1", None, "bucket", None, "http://127.0.0.1:9000/bucket"),
        ("http://localhost:9000", "us-east-1", False, "bucket", "k", "http://bucket.localhost:9000/k"),
        ("https://gw.example.com/s3/", "us-east-1", None, "b", "k", "https://gw.example.com/s3/b/k"),
        ("minio.example.com:9000", "us-east-1", None, "b", "k", "https://minio.example.com:9000/b/k"),
        ("http://[::1]:9000", "us-east-1", None, "b", "k", "http://[::1]:9000/b/k"),
        ("https://r2.example.com:443", "auto", None, "b", "k~x", "https://r2.example.com/b/k~x"),
    ],
)
def test_endpoint_addressing(endpoint, region, path_style, bucket, key, expected):
    assert sigv4._Endpoint(endpoint, region, path_style).url(bucket, key) == expected


def test_endpoint_urls_carry_the_query_as_given():
    url = sigv4._Endpoint("http://h:1", "us-east-1", None).url("b", None, "versioning")

    assert url == "http://h:1/b?versioning"


def test_an_endpoint_that_is_not_http_is_refused():
    with pytest.raises(ValueError, match="endpoint must be an http:// or https:// URL, got 'ftp://h'"):
        sigv4._Endpoint("ftp://h", "us-east-1", None)


@pytest.mark.parametrize("value, path_style", [("true", True), ("1", True), ("yes", True),
                                               ("false", False), ("0", False), ("", False)])
def test_s3_force_path_style_in_the_environment_forces_path_style_on_aws(value, path_style):
    client = S3Client(region="eu-west-1", credentials=CREDS, environ={"S3_FORCE_PATH_STYLE": value})

    url = client._endpoint.url("bucket", "k")

    assert url == ("https://s3.eu-west-1.amazonaws.com/bucket/k" if path_style
                   else "https://bucket.s3.eu-west-1.amazonaws.com/k")


def test_the_endpoint_comes_from_the_environment_when_not_given():
    client = S3Client(region="us-east-1", credentials=CREDS,
                      environ={"AWS_ENDPOINT_URL": "http://a:1", "AWS_ENDPOINT_URL_S3": "http://b:2"})

    assert client.endpoint_url == "http://b:2"
    assert repr(client) == "S3Client(endpoint='http://b:2', region='us-east-1', path_style=True)"


# ==== NO_PROXY ===============================================================


@pytest.mark.parametrize(
    "no_proxy, host, port, matches",
    [
        ("*", "anything.example", 443, True),
        ("example.com", "example.com", 443, True),
        ("example.com", "s3.example.com", 443, True),
        ("example.com", "badexample.com", 443, False),
        (".example.com", "s3.example.com", 443, True),
        (".example.com", "example.com", 443, True),
        ("EXAMPLE.com", "S3.Example.COM", 443, True),
        (" other.org , example.com ", "example.com", 80, True),
        ("other.org,,", "example.com", 80, False),
        ("localhost:9000", "localhost", 9000, True),
        ("localhost:9000", "localhost", 9001, False),
        ("127.0.0.1", "127.0.0.1", 8333, True),
        ("127.0.0.1", "127.0.0.10", 8333, False),
        ("::1", "[::1]", 9000, True),
        ("[::1]", "::1", 9000, True),
        ("", "example.com", 443, False),
    ],
)
def test_no_proxy_follows_curls_rules(no_proxy, host, port, matches):
    assert sigv4._no_proxy_matches(no_proxy, host, port) is matches


# ==== XML replies ============================================================

_NS = ' xmlns="http://s3.amazonaws.com/doc/2006-03-01/"'


def _list_v2(ns, encoded, keys, prefixes=(), truncated=False, token=None):
    items = "".join(
        "<Contents><Key>%s</Key><LastModified>2024-05-17T12:30:45.123Z</LastModified>"
        "<ETag>&quot;e%d&quot;</ETag><Size>%d</Size><StorageClass>STANDARD</StorageClass>"
        "</Contents>" % (k, i, i * 10) for i, k in enumerate(keys)
    )
    prefixes = "".join("<CommonPrefixes><Prefix>%s</Prefix></CommonPrefixes>" % p for p in prefixes)
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n<ListBucketResult%s><Name>b</Name><Prefix></Prefix>'
        "<KeyCount>%d</KeyCount><MaxKeys>1000</MaxKeys>%s<IsTruncated>%s</IsTruncated>%s%s%s"
        "</ListBucketResult>" % (
            ns, len(keys), "<EncodingType>url</EncodingType>" if encoded else "",
            "true" if truncated else "false",
            "<NextContinuationToken>%s</NextContinuationToken>" % token if token else "",
            items, prefixes,
        )
    ).encode("utf-8")


@pytest.mark.parametrize("ns", [_NS, ""], ids=["namespaced", "no-namespace"])
def test_list_objects_v2_replies_decode_url_encoded_keys_with_plus_as_space(ns):
    body = _list_v2(ns, True, ["a+b%2Bc", "%C3%A9t%C3%A9/x", "100%25"], ["dir%2Fsub+x/"],
                    truncated=True, token="tok/+=")

    result = sigv4._parse_list_objects_v2(body, NOW)

    assert result.keys == ["a b+c", "été/x", "100%"]
    assert result.common_prefixes == ["dir/sub x/"]
    assert result.is_truncated is True
    assert result.next_continuation_token == "tok/+="
    assert result.key_count == 3
    assert result.date == NOW
    first = result.contents[0]
    assert (first.etag, first.size) == ('"e0"', 0)
    assert first.last_modified == datetime(2024, 5, 17, 12, 30, 45, 123000, tzinfo=UTC)


@pytest.mark.parametrize("ns", [_NS, ""], ids=["namespaced", "no-namespace"])
def test_list_objects_v2_replies_without_encoding_type_keep_keys_verbatim(ns):
    body = _list_v2(ns, False, ["a+b%2Bc", "&lt;x&amp;y&gt;"])

    result = sigv4._parse_list_objects_v2(body, None)

    assert result.keys == ["a+b%2Bc", "<x&y>"]
    assert result.is_truncated is False
    assert result.next_continuation_token is None


def test_an_empty_listing_parses_to_no_keys():
    result = sigv4._parse_list_objects_v2(_list_v2(_NS, True, []), None)

    assert (result.keys, result.common_prefixes, result.key_count) == ([], [], 0)


@pytest.mark.parametrize("ns", [_NS, ""], ids=["namespaced", "no-namespace"])
def test_list_object_versions_replies_give_versions_and_delete_markers_in_order(ns):
    body = (
        "<ListVersionsResult%s><Name>b</Name><EncodingType>url</EncodingType>"
        "<IsTruncated>true</IsTruncated><NextKeyMarker>k+%%C3%%A9</NextKeyMarker>"
        "<NextVersionIdMarker>v/2</NextVersionIdMarker>"
        "<DeleteMarker><Key>k+%%C3%%A9</Key><VersionId>v3</VersionId><IsLatest>true</IsLatest>"
        "<LastModified>2024-05-17T12:30:45Z</LastModified></DeleteMarker>"
        "<Version><Key>k+%%C3%%A9</Key><VersionId>v/2</VersionId><IsLatest>false</IsLatest>"
        "<ETag>\"e2\"</ETag><Size>12</Size><LastModified>2024-05-17T12:30:44.5Z</LastModified></Version>"
        "<CommonPrefixes><Prefix>ignored/</Prefix></CommonPrefixes>"
        "</ListVersionsResult>" % ns
    ).encode("utf-8")

    versions, truncated, key_marker, version_marker = sigv4._parse_list_object_versions(body)

    assert [(v.key, v.version_id, v.is_latest, v.is_delete_marker, v.etag, v.size) for v in versions] == [
        ("k é", "v3", True, True, None, None),
        ("k é", "v/2", False, False, '"e2"', 12),
    ]
    assert versions[1].last_modified == datetime(2024, 5, 17, 12, 30, 44, 500000, tzinfo=UTC)
    assert (truncated, key_marker, version_marker) == (True, "k é", "v/2")


@pytest.mark.parametrize(
    "body, status",
    [
        (b'<?xml version="1.0"?><VersioningConfiguration' + _NS.encode() + b"><Status>Enabled</Status>"
         b"</VersioningConfiguration>", "Enabled"),
        (b"<VersioningConfiguration><Status>Suspended</Status></VersioningConfiguration>", "Suspended"),
        (b"<VersioningConfiguration" + _NS.encode() + b"/>", None),
        (b"<?xml version='1.0' encoding='UTF-8'?><GetBucketVersioningResponse" + _NS.encode() +
         b"><Status>Enabled</Status></GetBucketVersioningResponse>", "Enabled"),  # moto
        (b"", None),
        (b"  \n", None),
    ],
    ids=["aws", "no-namespace", "never-versioned", "moto", "empty", "blank"],
)
def test_versioning_replies_are_read_whatever_the_root_element(body, status):
    assert sigv4._parse_versioning(body) == status


@pytest.mark.parametrize(
    "status, body, expected",
    [
        (404, b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>NoSuchKey</Code>'
              b"<Message>The specified key does not exist.</Message><Key>k</Key>"
              b"<RequestId>4442587FB7D0A2F9</RequestId></Error>",
         ("NoSuchKey", "The specified key does not exist.", "4442587FB7D0A2F9")),
        (403, b"<Error><Code>SignatureDoesNotMatch</Code><Message>The request signature\n   we "
              b"calculated does not match</Message></Error>",
         ("SignatureDoesNotMatch", "The request signature we calculated does not match", None)),
        (409, b'<?xml version="1.0"?><ErrorResponse><Error><Code>ConditionalRequestConflict</Code>'
              b"</Error></ErrorResponse>",
         ("ConditionalRequestConflict", "ConditionalRequestConflict", None)),
        (502, b"<html><head><title>502 Bad Gateway</title></head><body><center><h1>502 Bad Gateway"
              b"</h1></center><hr><center>nginx</center></body></html>",
         ("BadGateway", "non-S3 error reply (HTML); a proxy or a wrong endpoint?", None)),
        (503, b"<!DOCTYPE html>\n<HTML><body>down</body></HTML>",
         ("ServiceUnavailable", "non-S3 error reply (HTML); a proxy or a wrong endpoint?", None)),
        (500, b"", ("InternalError", "empty error reply", None)),
        (418, b"", ("HTTP418", "empty error reply", None)),
        (500, b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>InternalErr',
         ("InternalError", 'malformed XML error reply: <?xml version="1.0" encoding="UTF-8"?> '
                           "<Error><Code>InternalErr", None)),
        (400, b"plain text\n  from a   gateway", ("BadRequest", "plain text from a gateway", None)),
    ],
    ids=["s3-xml", "folded-message", "nested-error", "html", "html-doctype", "empty", "unknown-status",
         "truncated-xml", "plain-text"],
)
def test_error_replies_are_read_whatever_their_shape(status, body, expected):
    assert sigv4._parse_error(status, body) == expected


# ==== Error strings ==========================================================


def test_s3_error_prints_one_line_naming_call_object_reply_hint_and_request_id():
    err = sigv4.S3Error("The request signature we calculated does not match", status=403,
                        code="SignatureDoesNotMatch", method="PUT", bucket="b", key="tasks/a.json",
                        request_id="RID1")

    assert str(err) == (
        "PUT s3://b/tasks/a.json: 403 SignatureDoesNotMatch: The request signature we calculated "
        "does not match (check the secret access key and the region) [request id RID1]"
    )


def test_s3_error_for_a_bucket_call_names_the_bucket_alone():
    err = sigv4.S3Error("Access Denied", status=403, code="AccessDenied", method="GET", bucket="b")

    assert str(err) == "GET s3://b: 403 AccessDenied: Access Denied (check the credentials' " \
                       "permissions on this bucket)"


def test_error_classes_share_one_root():
    for cls in (ConflictError, NoSuchKey, TransportError, UncertainWriteError, sigv4.CredentialsError):
        assert issubclass(cls, S3Error)


def test_the_client_repr_and_errors_never_show_the_secret():
    secret = "SUPER/SECRET+KEY=never-print-me"
    client = S3Client(endpoint="http://127.0.0.1:1", region="us-east-1",
                      credentials=Credentials("AKID", secret, "TOKEN-never-print-me"), environ={},
                      max_attempts=1, connect_timeout=0.5)

    with pytest.raises(TransportError) as info:
        client.get_object("b", "k")

    for text in (repr(client), str(info.value), repr(info.value)):
        assert secret not in text and "TOKEN-never-print-me" not in text
    assert "\n" not in str(info.value)
    assert str(info.value).startswith("GET s3://b/k: no reply after 1 attempts: ")
