"""The test servers behave as the rest of the suite assumes.

These tests use boto3 and urllib only, never buquet: when they fail, the fixtures or the
servers are at fault, not the code under test.
"""

import re
import urllib.error
import urllib.request
from dataclasses import replace
from pathlib import Path
from typing import Tuple

import pytest
from botocore.exceptions import ClientError

ROOT = Path(__file__).resolve().parent.parent


def _error(exc_info) -> Tuple[int, str]:
    response = exc_info.value.response
    return response["ResponseMetadata"]["HTTPStatusCode"], response["Error"]["Code"]


def _anonymous_get(url: str) -> int:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


# ==== Both servers ===========================================================


def test_an_object_put_can_be_read_back(s3):
    client = s3.client()
    client.put_object(Bucket=s3.bucket, Key="tasks/a/1.json", Body=b'{"x": 1}')

    got = client.get_object(Bucket=s3.bucket, Key="tasks/a/1.json")

    assert got["Body"].read() == b'{"x": 1}'


def test_each_test_gets_a_fresh_empty_unversioned_bucket(s3):
    client = s3.client()

    listing = client.list_objects_v2(Bucket=s3.bucket)
    versioning = client.get_bucket_versioning(Bucket=s3.bucket)

    assert listing["KeyCount"] == 0
    assert s3.versioned is False
    assert versioning.get("Status") is None
    assert re.fullmatch(r"[a-z0-9][a-z0-9-]{1,61}[a-z0-9]", s3.bucket)
    assert s3.region == "us-east-1"
    assert s3.endpoint.startswith("http://127.0.0.1:")


@pytest.mark.versioned
def test_a_versioned_bucket_reports_enabled(s3):
    client = s3.client()

    versioning = client.get_bucket_versioning(Bucket=s3.bucket)

    assert s3.versioned is True
    assert versioning["Status"] == "Enabled"


@pytest.mark.versioned
def test_a_versioned_bucket_keeps_every_version(s3):
    client = s3.client()
    for body in (b"one", b"two"):
        client.put_object(Bucket=s3.bucket, Key="k", Body=body)

    versions = client.list_object_versions(Bucket=s3.bucket, Prefix="k")["Versions"]

    assert len(versions) == 2


def test_a_second_create_only_put_gets_412(s3):
    client = s3.client()
    client.put_object(Bucket=s3.bucket, Key="ready/1", Body=b"first", IfNoneMatch="*")

    with pytest.raises(ClientError) as exc_info:
        client.put_object(Bucket=s3.bucket, Key="ready/1", Body=b"second", IfNoneMatch="*")

    assert _error(exc_info) == (412, "PreconditionFailed")
    assert client.get_object(Bucket=s3.bucket, Key="ready/1")["Body"].read() == b"first"


def test_a_put_with_a_stale_etag_gets_412(s3):
    client = s3.client()
    stale = client.put_object(Bucket=s3.bucket, Key="k", Body=b"v1")["ETag"]
    client.put_object(Bucket=s3.bucket, Key="k", Body=b"v2", IfMatch=stale)

    with pytest.raises(ClientError) as exc_info:
        client.put_object(Bucket=s3.bucket, Key="k", Body=b"v3", IfMatch=stale)

    assert _error(exc_info) == (412, "PreconditionFailed")


def test_buckets_of_two_tests_on_one_server_differ(moto_s3, seaweed_s3, moto_server):
    other = moto_server.create_bucket()

    assert other.bucket != moto_s3.bucket
    assert moto_s3.server == "moto" and seaweed_s3.server == "seaweedfs"


# ==== SeaweedFS enforces SigV4 ===============================================


def test_seaweedfs_rejects_a_wrong_secret(seaweed_s3):
    client = seaweed_s3.client()
    wrong = replace(seaweed_s3, secret_key="not-the-secret").client()
    client.put_object(Bucket=seaweed_s3.bucket, Key="k", Body=b"v")

    with pytest.raises(ClientError) as exc_info:
        wrong.get_object(Bucket=seaweed_s3.bucket, Key="k")

    assert _error(exc_info) == (403, "SignatureDoesNotMatch")


def test_seaweedfs_rejects_an_unknown_access_key(seaweed_s3):
    stranger = replace(seaweed_s3, access_key="someone-else").client()

    with pytest.raises(ClientError) as exc_info:
        stranger.list_objects_v2(Bucket=seaweed_s3.bucket)

    assert _error(exc_info) == (403, "InvalidAccessKeyId")


def test_seaweedfs_rejects_anonymous_requests(seaweed_s3):
    seaweed_s3.client().put_object(Bucket=seaweed_s3.bucket, Key="k", Body=b"v")

    assert _anonymous_get(f"{seaweed_s3.endpoint}/{seaweed_s3.bucket}/k") == 403
    assert _anonymous_get(f"{seaweed_s3.endpoint}/{seaweed_s3.bucket}?list-type=2") == 403


def test_moto_accepts_any_signature_so_it_proves_nothing_about_signing(moto_s3):
    # Kept so that nobody takes a green SigV4 test on moto as evidence. (moto does refuse
    # an anonymous GET of an object, by its default private ACL, not by checking signatures.)
    wrong = replace(moto_s3, secret_key="not-the-secret").client()

    wrong.put_object(Bucket=moto_s3.bucket, Key="k", Body=b"v")

    assert wrong.get_object(Bucket=moto_s3.bucket, Key="k")["Body"].read() == b"v"
    assert _anonymous_get(f"{moto_s3.endpoint}/{moto_s3.bucket}?list-type=2") == 200


# ==== The test command =======================================================


def _readme_test_command() -> str:
    readme = (ROOT / "README.md").read_text()
    commands = [line.strip() for line in readme.splitlines()
                if line.strip().startswith("python3 -m venv .venv ")]
    assert len(commands) == 1, f"README.md should show one test command line, found {commands}"
    return commands[0]


def test_ci_runs_exactly_the_readme_test_command():
    command = _readme_test_command()
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]

    assert command.endswith("-m pytest")
    assert ci_lines.count(command) == 1, f".ci/run should contain the line: {command}"
