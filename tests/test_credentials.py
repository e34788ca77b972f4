"""Credential chain tests: every network source runs against a stand-in server on
127.0.0.1; time is an injected clock; nothing sleeps or leaves the host."""

import json
import os
import pickle
import socket
import threading
import time
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs

import pytest

import sigv4
from sigv4 import (
    CredentialProvider,
    Credentials,
    CredentialsError,
    resolve_credentials,
    resolve_region,
)

NOW = datetime(2025, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
TOKEN = "FwoGZXIvYXdzEXAMPLETOKEN"


# --- helpers ------------------------------------------------------------------


class Clock:
    def __init__(self, now=NOW):
        self.now = now

    def __call__(self):
        return self.now


class Stub:
    """A tiny HTTP server: ``respond(request)`` returns (status, body) and every
    request is recorded as a dict of method, path, headers and body."""

    def __init__(self, respond):
        self.requests = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def _handle(self):
                length = int(self.headers.get("Content-Length") or 0)
                request = {
                    "method": self.command,
                    "path": self.path,
                    "headers": {k.lower(): v for k, v in self.headers.items()},
                    "body": self.rfile.read(length).decode(),
                }
                stub.requests.append(request)
                status, body = respond(request)
                body = body.encode() if isinstance(body, str) else body
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_PUT = do_POST = _handle

            def log_message(self, *args):
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = "http://127.0.0.1:%d" % self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.01,), daemon=True)
        self._thread.start()

    def close(self):
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def stub():
    started = []

    def start(respond):
        server = Stub(respond)
        started.append(server)
        return server

    yield start
    for server in started:
        server.close()


@pytest.fixture
def env(tmp_path):
    """An environment that points the shared files into tmp_path and keeps
    instance metadata off, so no test reads ~/.aws or probes 169.254.169.254."""
    return {
        "HOME": str(tmp_path),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "credentials"),
        "AWS_CONFIG_FILE": str(tmp_path / "config"),
        "AWS_EC2_METADATA_DISABLED": "true",
    }


@pytest.fixture(autouse=True)
def no_retry_delay(monkeypatch):
    monkeypatch.setattr(sigv4, "_RETRY_DELAY", 0.0)


def write(path, text):
    path.write_text(text)
    return str(path)


def closed_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def expiry(moment):
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


# --- Credentials value --------------------------------------------------------


def test_repr_and_str_show_the_access_key_but_never_the_secret_or_token():
    creds = Credentials("AKIDEXAMPLE", SECRET, TOKEN, NOW)
    for text in (repr(creds), str(creds)):
        assert SECRET not in text
        assert TOKEN not in text
        assert "AKIDEXAMPLE" in text
    assert repr(creds) == (
        "Credentials(access_key='AKIDEXAMPLE', secret_key='***', session_token='***',"
        " expiration=2025-01-02T03:04:05Z)"
    )
    assert repr(Credentials("AKID", SECRET)) == (
        "Credentials(access_key='AKID', secret_key='***', session_token=None, expiration=None)"
    )


def test_credentials_are_immutable_values():
    creds = Credentials("AKID", SECRET, TOKEN, NOW)
    with pytest.raises(AttributeError):
        creds.secret_key = "other"
    assert creds == Credentials("AKID", SECRET, TOKEN, NOW)
    assert creds != Credentials("AKID", SECRET, None, NOW)
    assert len({creds, Credentials("AKID", SECRET, TOKEN, NOW)}) == 1
    assert pickle.loads(pickle.dumps(creds)) == creds


def test_expiration_must_be_aware_and_is_stored_in_utc():
    with pytest.raises(ValueError, match="timezone-aware"):
        Credentials("AKID", SECRET, expiration=datetime(2025, 1, 1))
    plus_two = timezone(timedelta(hours=2))
    creds = Credentials("AKID", SECRET, expiration=datetime(2025, 1, 1, 12, tzinfo=plus_two))
    assert creds.expiration == datetime(2025, 1, 1, 10, tzinfo=timezone.utc)
    assert creds.expiration.tzinfo is timezone.utc


def test_empty_keys_are_rejected():
    with pytest.raises(ValueError):
        Credentials("", SECRET)
    with pytest.raises(ValueError):
        Credentials("AKID", "")


@pytest.mark.parametrize("text, expected", [
    ("2025-01-02T03:04:05Z", NOW),
    ("2025-01-02T03:04:05.123Z", NOW.replace(microsecond=123000)),
    ("2025-01-02T05:04:05+02:00", NOW),
    ("2025-01-02T03:04:05", NOW),
    ("1735787045", NOW),
])
def test_service_timestamps_parse_to_utc(text, expected):
    assert sigv4._parse_iso_timestamp(text) == expected


# --- chain order --------------------------------------------------------------


def test_explicit_arguments_beat_the_environment(env):
    env.update(AWS_ACCESS_KEY_ID="AKIDENV", AWS_SECRET_ACCESS_KEY="envsecret")
    provider = resolve_credentials(access_key="AKIDARG", secret_key=SECRET, session_token=TOKEN, environ=env)
    assert provider.source == "explicit"
    assert provider.get() == Credentials("AKIDARG", SECRET, TOKEN)


def test_half_an_explicit_key_pair_is_an_error():
    with pytest.raises(CredentialsError, match="^explicit arguments: access_key and secret_key go together$"):
        resolve_credentials(access_key="AKID", environ={})


def test_environment_variables_give_static_credentials(env):
    env.update(AWS_ACCESS_KEY_ID="AKIDENV", AWS_SECRET_ACCESS_KEY=SECRET, AWS_SESSION_TOKEN=TOKEN)
    provider = resolve_credentials(environ=env)
    assert provider.source == "environment"
    assert provider.get() == Credentials("AKIDENV", SECRET, TOKEN)


def test_aws_security_token_is_accepted_as_the_legacy_token_name(env):
    env.update(AWS_ACCESS_KEY_ID="AKIDENV", AWS_SECRET_ACCESS_KEY=SECRET, AWS_SECURITY_TOKEN=TOKEN)
    assert resolve_credentials(environ=env).get().session_token == TOKEN


def test_environment_expiration_makes_the_credentials_refresh_from_the_environment(env):
    env.update(
        AWS_ACCESS_KEY_ID="AKID1", AWS_SECRET_ACCESS_KEY=SECRET,
        AWS_CREDENTIAL_EXPIRATION=expiry(NOW + timedelta(hours=1)),
    )
    clock = Clock()
    provider = resolve_credentials(environ=env, clock=clock)
    assert provider.get().expiration == NOW + timedelta(hours=1)
    env.update(AWS_ACCESS_KEY_ID="AKID2", AWS_CREDENTIAL_EXPIRATION=expiry(NOW + timedelta(hours=2)))
    clock.now = NOW + timedelta(minutes=55)
    assert provider.get().access_key == "AKID2"


def test_access_key_without_secret_in_the_environment_is_an_error_without_values(env):
    env.update(AWS_ACCESS_KEY_ID="AKIDHALF")
    with pytest.raises(CredentialsError) as caught:
        resolve_credentials(environ=env)
    assert str(caught.value) == (
        "environment: AWS_ACCESS_KEY_ID is set but AWS_SECRET_ACCESS_KEY is not"
    )


def test_environment_beats_the_shared_credentials_file(env, tmp_path):
    write(tmp_path / "credentials", "[default]\naws_access_key_id = AKIDFILE\naws_secret_access_key = s\n")
    env.update(AWS_ACCESS_KEY_ID="AKIDENV", AWS_SECRET_ACCESS_KEY=SECRET)
    assert resolve_credentials(environ=env).get().access_key == "AKIDENV"


def test_an_explicit_profile_skips_the_environment(env, tmp_path):
    write(tmp_path / "credentials", "[prod]\naws_access_key_id = AKIDPROD\naws_secret_access_key = s\n")
    env.update(AWS_ACCESS_KEY_ID="AKIDENV", AWS_SECRET_ACCESS_KEY=SECRET)
    provider = resolve_credentials(profile="prod", environ=env)
    assert provider.get().access_key == "AKIDPROD"
    assert provider.source == "shared-credentials-file %s [prod]" % (tmp_path / "credentials")


def test_aws_profile_in_the_environment_selects_the_section_but_env_keys_still_win(env, tmp_path):
    write(tmp_path / "credentials", "[prod]\naws_access_key_id = AKIDPROD\naws_secret_access_key = s\n")
    env.update(AWS_PROFILE="prod")
    assert resolve_credentials(environ=env).get().access_key == "AKIDPROD"
    env.update(AWS_ACCESS_KEY_ID="AKIDENV", AWS_SECRET_ACCESS_KEY=SECRET)
    assert resolve_credentials(environ=env).get().access_key == "AKIDENV"


def test_aws_default_profile_wins_over_aws_profile_as_in_botocore(env, tmp_path):
    write(tmp_path / "credentials", (
        "[a]\naws_access_key_id = AKIDA\naws_secret_access_key = s\n"
        "[b]\naws_access_key_id = AKIDB\naws_secret_access_key = s\n"
    ))
    env.update(AWS_PROFILE="a", AWS_DEFAULT_PROFILE="b")
    assert resolve_credentials(environ=env).get().access_key == "AKIDB"


def test_default_file_locations_are_under_home(tmp_path):
    (tmp_path / ".aws").mkdir()
    write(tmp_path / ".aws" / "credentials", "[default]\naws_access_key_id = AKIDHOME\naws_secret_access_key = s\n")
    provider = resolve_credentials(environ={"HOME": str(tmp_path), "AWS_EC2_METADATA_DISABLED": "true"})
    assert provider.get().access_key == "AKIDHOME"
    assert provider.source == "shared-credentials-file ~/.aws/credentials [default]"


def test_credentials_file_sections_are_bare_profile_names(env, tmp_path):
    write(tmp_path / "credentials", (
        "[profile prod]\naws_access_key_id = AKIDWRONG\naws_secret_access_key = s\n"
        "[prod]\naws_access_key_id = AKIDPROD\naws_secret_access_key = s\n"
        "aws_session_token = tok\n"
    ))
    creds = resolve_credentials(profile="prod", environ=env).get()
    assert (creds.access_key, creds.session_token) == ("AKIDPROD", "tok")


def test_config_file_uses_profile_sections_and_a_bare_default(env, tmp_path):
    write(tmp_path / "config", (
        "[default]\naws_access_key_id = AKIDDEFAULT\naws_secret_access_key = s\n"
        "[prod]\naws_access_key_id = AKIDBARE\naws_secret_access_key = s\n"
        "[profile prod]\naws_access_key_id = AKIDPROD\naws_secret_access_key = s\n"
    ))
    provider = resolve_credentials(environ=env)
    assert provider.get().access_key == "AKIDDEFAULT"
    assert provider.source == "config-file %s [default]" % (tmp_path / "config")
    assert resolve_credentials(profile="prod", environ=env).get().access_key == "AKIDPROD"


def test_credentials_file_beats_config_file(env, tmp_path):
    write(tmp_path / "credentials", "[default]\naws_access_key_id = AKIDCREDS\naws_secret_access_key = s\n")
    write(tmp_path / "config", "[default]\naws_access_key_id = AKIDCONFIG\naws_secret_access_key = s\n")
    assert resolve_credentials(environ=env).get().access_key == "AKIDCREDS"


def test_a_named_profile_that_exists_nowhere_is_an_error(env, tmp_path):
    with pytest.raises(CredentialsError) as caught:
        resolve_credentials(profile="nope", environ=env)
    assert str(caught.value) == "profile 'nope' not found in %s or %s" % (
        tmp_path / "config", tmp_path / "credentials",
    )


def test_a_half_key_pair_in_a_file_is_an_error(env, tmp_path):
    write(tmp_path / "credentials", "[default]\naws_access_key_id = AKID\n")
    with pytest.raises(CredentialsError) as caught:
        resolve_credentials(environ=env)
    assert str(caught.value) == "%s: aws_access_key_id needs aws_secret_access_key" % (tmp_path / "credentials")


def test_unparsable_files_name_the_line_but_never_quote_it(env, tmp_path):
    write(tmp_path / "credentials", "aws_secret_access_key = %s\n[default]\n" % SECRET)
    with pytest.raises(CredentialsError) as caught:
        resolve_credentials(environ=env)
    assert str(caught.value) == "cannot parse %s: line 1 comes before any [section] header" % (
        tmp_path / "credentials"
    )
    write(tmp_path / "credentials", "[default]\n%s\n" % SECRET)
    with pytest.raises(CredentialsError) as caught:
        resolve_credentials(environ=env)
    assert SECRET not in str(caught.value)
    assert str(caught.value).endswith(": cannot parse line 2")


@pytest.mark.parametrize("profile_text, feature", [
    ("role_arn = arn:aws:iam::1:role/r\nsource_profile = base\n", "role_arn with source_profile"),
    ("sso_account_id = 1\nsso_role_name = r\n", "IAM Identity Center"),
    ("credential_process = /bin/creds\n", "credential_process"),
])
def test_profile_sources_we_do_not_implement_are_errors_not_silently_skipped(env, tmp_path, profile_text, feature):
    write(tmp_path / "config", "[profile x]\n" + profile_text)
    with pytest.raises(CredentialsError, match="profile 'x' uses %s" % feature):
        resolve_credentials(profile="x", environ=env)


def test_shared_file_beats_container_credentials(env, tmp_path):
    write(tmp_path / "credentials", "[default]\naws_access_key_id = AKIDFILE\naws_secret_access_key = s\n")
    env["AWS_CONTAINER_CREDENTIALS_RELATIVE_URI"] = "/v2/credentials/x"
    assert resolve_credentials(environ=env).source.startswith("shared-credentials-file")


def test_nothing_found_raises_on_get_naming_what_was_looked_at(env, tmp_path):
    provider = resolve_credentials(environ=env)
    assert provider.source == "none"
    with pytest.raises(CredentialsError) as caught:
        provider.get()
    assert str(caught.value) == (
        "no AWS credentials found; looked at: explicit arguments, environment, web identity,"
        " shared credentials file {0}/credentials [default],"
        " config file {0}/config [default], container,"
        " instance metadata (disabled by AWS_EC2_METADATA_DISABLED)".format(tmp_path)
    )


# --- region -------------------------------------------------------------------


def test_region_comes_from_aws_region_then_aws_default_region_then_the_profile(env, tmp_path):
    write(tmp_path / "config", "[default]\nregion = eu-west-1\n[profile p]\nregion = ap-south-1\n")
    assert resolve_region(environ=env) == "eu-west-1"
    assert resolve_region(profile="p", environ=env) == "ap-south-1"
    assert resolve_region(profile="missing", environ=env) is None
    env["AWS_DEFAULT_REGION"] = "us-west-2"
    assert resolve_region(profile="p", environ=env) == "us-west-2"
    env["AWS_REGION"] = "eu-central-1"
    assert resolve_region(profile="p", environ=env) == "eu-central-1"


# --- refresh ------------------------------------------------------------------


class Fetcher:
    """A fetch function handing out numbered credentials valid for an hour."""

    def __init__(self, fail=False, delay=0.0):
        self.calls = 0
        self.fail = fail
        self.delay = delay
        self._lock = threading.Lock()

    def __call__(self, now):
        time.sleep(self.delay)
        with self._lock:
            self.calls += 1
            number = self.calls
        if self.fail:
            raise CredentialsError("stub: down")
        return Credentials("AKID%d" % number, SECRET, TOKEN, now + timedelta(hours=1))


def test_first_get_fetches_and_later_gets_return_the_cached_value():
    fetch = Fetcher()
    provider = CredentialProvider(fetch, source="stub", clock=Clock())
    assert fetch.calls == 0  # nothing before the first get
    first = provider.get()
    assert provider.get() is first
    assert fetch.calls == 1


def test_no_refresh_before_the_advisory_window():
    fetch, clock = Fetcher(), Clock()
    provider = CredentialProvider(fetch, source="stub", clock=clock)
    provider.get()
    clock.now = NOW + timedelta(minutes=44, seconds=59)  # 15 min 1 s left
    assert provider.get().access_key == "AKID1"
    assert fetch.calls == 1


def test_refresh_happens_inside_the_advisory_window():
    fetch, clock = Fetcher(), Clock()
    provider = CredentialProvider(fetch, source="stub", clock=clock)
    provider.get()
    clock.now = NOW + timedelta(minutes=46)  # 14 min left
    assert provider.get().access_key == "AKID2"
    assert fetch.calls == 2


def test_a_failing_refresh_in_the_advisory_window_keeps_the_old_credentials():
    clock = Clock()
    old = Credentials("AKIDOLD", SECRET, TOKEN, NOW + timedelta(minutes=12))
    fetch = Fetcher(fail=True)
    provider = CredentialProvider(fetch, source="stub", clock=clock, credentials=old)
    assert provider.get() is old
    assert fetch.calls == 1


def test_a_failing_refresh_in_the_mandatory_window_raises():
    old = Credentials("AKIDOLD", SECRET, TOKEN, NOW + timedelta(minutes=9))
    provider = CredentialProvider(Fetcher(fail=True), source="stub", clock=Clock(), credentials=old)
    with pytest.raises(CredentialsError, match="^stub: down$"):
        provider.get()


def test_credentials_that_arrive_already_expired_are_an_error():
    def fetch(now):
        return Credentials("AKID", SECRET, TOKEN, now - timedelta(seconds=1))

    provider = CredentialProvider(fetch, source="stub", clock=Clock())
    with pytest.raises(CredentialsError) as caught:
        provider.get()
    assert str(caught.value) == "stub: fetched credentials already expired at 2025-01-02T03:04:04Z"


def test_static_credentials_never_refresh():
    creds = Credentials("AKID", SECRET)
    provider = CredentialProvider(Fetcher(fail=True), source="stub", clock=Clock(), credentials=creds)
    assert provider.get() is creds


@pytest.mark.parametrize("minutes_left", [None, 5])
def test_eight_threads_calling_get_together_cause_one_fetch(minutes_left):
    fetch, clock = Fetcher(delay=0.05), Clock()
    old = None if minutes_left is None else Credentials("AKID0", SECRET, TOKEN, NOW + timedelta(minutes=minutes_left))
    provider = CredentialProvider(fetch, source="stub", clock=clock, credentials=old)
    start = threading.Barrier(8)
    results = []

    def worker():
        start.wait()
        results.append(provider.get().access_key)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert fetch.calls == 1
    assert results == ["AKID1"] * 8


def test_in_the_advisory_window_other_threads_do_not_wait_for_the_refresh():
    release = threading.Event()
    entered = threading.Event()

    def slow_fetch(now):
        entered.set()
        release.wait(2)
        return Credentials("AKIDNEW", SECRET, TOKEN, now + timedelta(hours=1))

    old = Credentials("AKIDOLD", SECRET, TOKEN, NOW + timedelta(minutes=12))
    provider = CredentialProvider(slow_fetch, source="stub", clock=Clock(), credentials=old)
    refresher = threading.Thread(target=provider.get)
    refresher.start()
    assert entered.wait(2)
    assert provider.get() is old  # returns at once while the refresh is running
    release.set()
    refresher.join()
    assert provider.get().access_key == "AKIDNEW"


# --- web identity -------------------------------------------------------------

STS_REPLY = """<AssumeRoleWithWebIdentityResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">
  <AssumeRoleWithWebIdentityResult>
    <SubjectFromWebIdentityToken>system:serviceaccount:ns:sa</SubjectFromWebIdentityToken>
    <AssumedRoleUser>
      <Arn>arn:aws:sts::123456789012:assumed-role/worker/s</Arn>
      <AssumedRoleId>AROAEXAMPLE:s</AssumedRoleId>
    </AssumedRoleUser>
    <Credentials>
      <SessionToken>%s</SessionToken>
      <SecretAccessKey>%s</SecretAccessKey>
      <Expiration>2025-01-02T04:04:05Z</Expiration>
      <AccessKeyId>ASIASTS</AccessKeyId>
    </Credentials>
    <Audience>sts.amazonaws.com</Audience>
  </AssumeRoleWithWebIdentityResult>
  <ResponseMetadata><RequestId>req-1</RequestId></ResponseMetadata>
</AssumeRoleWithWebIdentityResponse>""" % (TOKEN, SECRET)

STS_ERROR = """<ErrorResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">
  <Error><Type>Sender</Type><Code>InvalidIdentityToken</Code>
  <Message>Incorrect token audience</Message></Error>
  <RequestId>req-2</RequestId></ErrorResponse>"""


def test_web_identity_from_the_environment_calls_sts_lazily_with_the_token(env, tmp_path, stub):
    sts = stub(lambda request: (200, STS_REPLY))
    token_file = write(tmp_path / "token", "eyJhbGciOiJSUzI1NiJ9.jwt.sig\n")
    env.update(
        AWS_ROLE_ARN="arn:aws:iam::123456789012:role/worker",
        AWS_WEB_IDENTITY_TOKEN_FILE=token_file,
        AWS_ROLE_SESSION_NAME="s1",
        AWS_ENDPOINT_URL_STS=sts.url,
    )
    provider = resolve_credentials(environ=env, clock=Clock())
    assert provider.source == "web-identity arn:aws:iam::123456789012:role/worker via " + sts.url
    assert sts.requests == []  # resolution does no network request
    creds = provider.get()
    assert creds == Credentials("ASIASTS", SECRET, TOKEN, NOW + timedelta(hours=1))
    (request,) = sts.requests
    assert request["method"] == "POST"
    assert "authorization" not in request["headers"]  # unsigned: the token is the proof
    assert request["headers"]["content-type"].startswith("application/x-www-form-urlencoded")
    assert parse_qs(request["body"]) == {
        "Action": ["AssumeRoleWithWebIdentity"],
        "Version": ["2011-06-15"],
        "RoleArn": ["arn:aws:iam::123456789012:role/worker"],
        "RoleSessionName": ["s1"],
        "WebIdentityToken": ["eyJhbGciOiJSUzI1NiJ9.jwt.sig"],
    }


def test_web_identity_rereads_the_rotated_token_file_on_refresh(env, tmp_path, stub):
    sts = stub(lambda request: (200, STS_REPLY))
    token_path = tmp_path / "token"
    write(token_path, "first")
    env.update(AWS_ROLE_ARN="arn:aws:iam::1:role/r", AWS_WEB_IDENTITY_TOKEN_FILE=str(token_path), AWS_ENDPOINT_URL=sts.url)
    clock = Clock()
    provider = resolve_credentials(environ=env, clock=clock)
    provider.get()
    write(token_path, "second")
    clock.now = NOW + timedelta(minutes=50)
    provider.get()
    assert [parse_qs(r["body"])["WebIdentityToken"] for r in sts.requests] == [["first"], ["second"]]
    assert parse_qs(sts.requests[0]["body"])["RoleSessionName"] == ["buquet-session-%d" % NOW.timestamp()]


def test_web_identity_from_the_profile_when_a_profile_is_passed(env, tmp_path, stub):
    sts = stub(lambda request: (200, STS_REPLY))
    token_file = write(tmp_path / "token", "jwt")
    write(tmp_path / "config", (
        "[profile eks]\nrole_arn = arn:aws:iam::1:role/fromprofile\n"
        "web_identity_token_file = %s\n" % token_file
    ))
    env.update(
        AWS_ROLE_ARN="arn:aws:iam::1:role/fromenv",
        AWS_WEB_IDENTITY_TOKEN_FILE="/nonexistent",
        AWS_ENDPOINT_URL_STS=sts.url,
    )
    provider = resolve_credentials(profile="eks", environ=env, clock=Clock())
    provider.get()
    assert parse_qs(sts.requests[0]["body"])["RoleArn"] == ["arn:aws:iam::1:role/fromprofile"]


def test_web_identity_without_a_role_arn_is_an_error(env, tmp_path):
    env["AWS_WEB_IDENTITY_TOKEN_FILE"] = write(tmp_path / "token", "jwt")
    with pytest.raises(CredentialsError, match="^web identity: a token file is configured but no role ARN"):
        resolve_credentials(environ=env)


def test_an_sts_error_names_the_status_and_code_but_not_the_token(env, tmp_path, stub):
    sts = stub(lambda request: (400, STS_ERROR))
    env.update(
        AWS_ROLE_ARN="arn:aws:iam::1:role/r",
        AWS_WEB_IDENTITY_TOKEN_FILE=write(tmp_path / "token", "secret.jwt.value"),
        AWS_ENDPOINT_URL_STS=sts.url,
    )
    with pytest.raises(CredentialsError) as caught:
        resolve_credentials(environ=env).get()
    assert str(caught.value) == (
        "web identity: STS %s: HTTP 400 InvalidIdentityToken: Incorrect token audience" % sts.url
    )
    assert len(sts.requests) == 1  # a client error is not retried


def test_sts_server_errors_are_retried(env, tmp_path, stub):
    replies = iter([(503, ""), (200, STS_REPLY)])
    sts = stub(lambda request: next(replies))
    env.update(
        AWS_ROLE_ARN="arn:aws:iam::1:role/r",
        AWS_WEB_IDENTITY_TOKEN_FILE=write(tmp_path / "token", "jwt"),
        AWS_ENDPOINT_URL_STS=sts.url,
    )
    assert resolve_credentials(environ=env, clock=Clock()).get().access_key == "ASIASTS"
    assert len(sts.requests) == 2


def test_a_garbled_sts_reply_is_a_one_line_error(env, tmp_path, stub):
    sts = stub(lambda request: (200, "<html>proxy login</html>"))
    env.update(
        AWS_ROLE_ARN="arn:aws:iam::1:role/r",
        AWS_WEB_IDENTITY_TOKEN_FILE=write(tmp_path / "token", "jwt"),
        AWS_ENDPOINT_URL_STS=sts.url,
    )
    with pytest.raises(CredentialsError, match=r"^web identity: STS http://127\.0\.0\.1:\d+: HTTP 200 reply lacks Credentials$"):
        resolve_credentials(environ=env).get()


@pytest.mark.parametrize("settings, region, expected", [
    ({}, "eu-west-1", "https://sts.eu-west-1.amazonaws.com"),
    ({}, None, "https://sts.amazonaws.com"),
    ({"AWS_STS_REGIONAL_ENDPOINTS": "legacy"}, "eu-west-1", "https://sts.amazonaws.com"),
    ({"AWS_STS_REGIONAL_ENDPOINTS": "legacy"}, "eu-south-1", "https://sts.eu-south-1.amazonaws.com"),
    ({}, "cn-north-1", "https://sts.cn-north-1.amazonaws.com.cn"),
    ({"AWS_ENDPOINT_URL": "http://localhost:9000"}, "eu-west-1", "http://localhost:9000"),
    ({"AWS_ENDPOINT_URL": "http://a", "AWS_ENDPOINT_URL_STS": "http://b"}, None, "http://b"),
    ({"AWS_ENDPOINT_URL": "http://a", "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS": "true"}, None, "https://sts.amazonaws.com"),
])
def test_sts_endpoint_follows_botocore(env, settings, region, expected):
    env.update(settings)
    profile = sigv4._Profile(env, "default")
    assert sigv4._sts_endpoint(env, profile, region) == expected


def test_web_identity_uses_the_region_to_pick_the_sts_endpoint(env, tmp_path):
    env.update(AWS_ROLE_ARN="arn:aws:iam::1:role/r", AWS_WEB_IDENTITY_TOKEN_FILE=write(tmp_path / "t", "jwt"))
    assert resolve_credentials(environ=env, region="eu-west-3").source.endswith(
        "via https://sts.eu-west-3.amazonaws.com"
    )
    env["AWS_DEFAULT_REGION"] = "ap-south-1"
    assert resolve_credentials(environ=env).source.endswith("via https://sts.ap-south-1.amazonaws.com")


# --- container ----------------------------------------------------------------


def container_reply(request):
    return 200, json.dumps({
        "AccessKeyId": "ASIACONTAINER", "SecretAccessKey": SECRET, "Token": TOKEN,
        "Expiration": "2025-01-02T09:04:05Z", "AccountId": "123456789012",
    })


def test_container_credentials_send_the_authorization_token(env, stub):
    agent = stub(container_reply)
    env.update(
        AWS_CONTAINER_CREDENTIALS_FULL_URI=agent.url + "/v1/credentials?x=1",
        AWS_CONTAINER_AUTHORIZATION_TOKEN="Basic abc",
    )
    provider = resolve_credentials(environ=env, clock=Clock())
    assert provider.source == "container %s/v1/credentials" % agent.url
    assert agent.requests == []
    assert provider.get() == Credentials("ASIACONTAINER", SECRET, TOKEN, NOW + timedelta(hours=6))
    (request,) = agent.requests
    assert (request["method"], request["path"]) == ("GET", "/v1/credentials?x=1")
    assert request["headers"]["authorization"] == "Basic abc"


def test_the_container_token_file_wins_over_the_token_variable_and_is_reread(env, tmp_path, stub):
    agent = stub(container_reply)
    token_path = tmp_path / "eks-pod-identity-token"
    write(token_path, "token-from-file\n")
    env.update(
        AWS_CONTAINER_CREDENTIALS_FULL_URI=agent.url + "/v1/credentials",
        AWS_CONTAINER_AUTHORIZATION_TOKEN="token-from-env",
        AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE=str(token_path),
    )
    clock = Clock()
    provider = resolve_credentials(environ=env, clock=clock)
    provider.get()
    write(token_path, "rotated")
    clock.now = NOW + timedelta(hours=5, minutes=50)
    provider.get()
    assert [r["headers"]["authorization"] for r in agent.requests] == ["token-from-file", "rotated"]


def test_the_relative_uri_points_at_the_ecs_agent(env):
    env["AWS_CONTAINER_CREDENTIALS_RELATIVE_URI"] = "/v2/credentials/abc"
    env["AWS_CONTAINER_CREDENTIALS_FULL_URI"] = "http://127.0.0.1/ignored"
    assert resolve_credentials(environ=env).source == "container http://169.254.170.2/v2/credentials/abc"


@pytest.mark.parametrize("url, allowed", [
    ("http://127.0.0.1:8080/creds", True),
    ("http://[::1]/creds", True),
    ("http://169.254.170.23/v1/credentials", True),
    ("http://[fd00:ec2::23]/v1/credentials", True),
    ("http://localhost/creds", True),
    ("https://creds.example.com/x", True),
    ("http://creds.example.com/x", False),
    ("http://10.0.0.1/x", False),
    ("ftp://127.0.0.1/x", False),
])
def test_the_full_uri_must_be_https_or_a_local_agent(env, url, allowed):
    env["AWS_CONTAINER_CREDENTIALS_FULL_URI"] = url
    if allowed:
        assert resolve_credentials(environ=env).source.startswith("container ")
    else:
        with pytest.raises(CredentialsError, match="^AWS_CONTAINER_CREDENTIALS_FULL_URI must be https"):
            resolve_credentials(environ=env)


def test_a_container_error_names_the_url_and_status(env, stub):
    agent = stub(lambda request: (403, '{"message": "bad token"}'))
    env["AWS_CONTAINER_CREDENTIALS_FULL_URI"] = agent.url + "/v1/credentials"
    with pytest.raises(CredentialsError) as caught:
        resolve_credentials(environ=env).get()
    assert str(caught.value) == "container credentials %s/v1/credentials: HTTP 403" % agent.url
    assert len(agent.requests) == 1


def test_container_server_errors_are_retried_three_times(env, stub):
    agent = stub(lambda request: (500, "oops"))
    env["AWS_CONTAINER_CREDENTIALS_FULL_URI"] = agent.url + "/creds"
    with pytest.raises(CredentialsError, match="HTTP 500$"):
        resolve_credentials(environ=env).get()
    assert len(agent.requests) == 3


def test_a_container_reply_without_keys_is_an_error(env, stub):
    agent = stub(lambda request: (200, '{"AccessKeyId": "A"}'))
    env["AWS_CONTAINER_CREDENTIALS_FULL_URI"] = agent.url + "/creds"
    with pytest.raises(CredentialsError, match=r"^container credentials http://127\.0\.0\.1:\d+/creds: reply lacks SecretAccessKey$"):
        resolve_credentials(environ=env).get()


# --- instance metadata --------------------------------------------------------


def imds(v2=True, role="worker-role", expiration="2025-01-02T09:04:05Z", code="Success"):
    def respond(request):
        path, headers = request["path"], request["headers"]
        if path == "/latest/api/token":
            if not v2:
                return 403, ""
            assert request["method"] == "PUT"
            assert headers["x-aws-ec2-metadata-token-ttl-seconds"] == "21600"
            return 200, "imds-token"
        if v2:
            assert headers.get("x-aws-ec2-metadata-token") == "imds-token"
        if path == "/latest/meta-data/iam/security-credentials/":
            return (200, role + "\n") if role else (404, "")
        if path == "/latest/meta-data/iam/security-credentials/" + role:
            return 200, json.dumps({
                "Code": code, "LastUpdated": "2025-01-02T03:00:00Z", "Type": "AWS-HMAC",
                "AccessKeyId": "ASIAIMDS", "SecretAccessKey": SECRET, "Token": TOKEN,
                "Expiration": expiration,
            })
        return 404, ""

    return respond


def imds_env(env, server):
    del env["AWS_EC2_METADATA_DISABLED"]
    env["AWS_EC2_METADATA_SERVICE_ENDPOINT"] = server.url
    return env


def test_instance_metadata_uses_an_imdsv2_token_then_gets_the_role_and_its_keys(env, stub):
    server = stub(imds())
    provider = resolve_credentials(environ=imds_env(env, server), clock=Clock())
    assert provider.source == "instance-metadata %s/" % server.url
    assert server.requests == []
    assert provider.get() == Credentials("ASIAIMDS", SECRET, TOKEN, NOW + timedelta(hours=6))
    assert [(r["method"], r["path"]) for r in server.requests] == [
        ("PUT", "/latest/api/token"),
        ("GET", "/latest/meta-data/iam/security-credentials/"),
        ("GET", "/latest/meta-data/iam/security-credentials/worker-role"),
    ]
    put, *gets = server.requests
    assert put["headers"]["x-aws-ec2-metadata-token-ttl-seconds"] == "21600"
    assert [r["headers"]["x-aws-ec2-metadata-token"] for r in gets] == ["imds-token", "imds-token"]


def test_instance_metadata_falls_back_to_imdsv1_when_the_token_is_refused(env, stub):
    server = stub(imds(v2=False))
    assert resolve_credentials(environ=imds_env(env, server)).get().access_key == "ASIAIMDS"
    assert [r["headers"].get("x-aws-ec2-metadata-token") for r in server.requests] == [None, None, None]


def test_imdsv1_fallback_is_refused_when_v1_is_disabled(env, stub):
    server = stub(imds(v2=False))
    imds_env(env, server)["AWS_EC2_METADATA_V1_DISABLED"] = "true"
    with pytest.raises(CredentialsError, match="no IMDSv2 token and IMDSv1 is disabled$"):
        resolve_credentials(environ=env).get()


def test_an_instance_without_a_role_reports_the_404_after_listing_the_chain(env, stub):
    server = stub(imds(role=None))
    with pytest.raises(CredentialsError) as caught:
        resolve_credentials(environ=imds_env(env, server)).get()
    message = str(caught.value)
    assert message.startswith("no AWS credentials found; looked at: explicit arguments, environment,")
    assert message.endswith(
        "container; then instance metadata %s/: role list: HTTP 404 (no IAM role attached?)" % server.url
    )


def test_an_imds_error_document_is_reported_by_its_code(env, stub):
    server = stub(imds(code="AssumeRoleUnauthorizedAccess"))
    with pytest.raises(CredentialsError, match="role worker-role: AssumeRoleUnauthorizedAccess$"):
        resolve_credentials(environ=imds_env(env, server)).get()


def test_an_unreachable_metadata_service_fails_fast_without_a_v1_retry(env):
    env.pop("AWS_EC2_METADATA_DISABLED")
    env["AWS_EC2_METADATA_SERVICE_ENDPOINT"] = "http://127.0.0.1:%d" % closed_port()
    provider = resolve_credentials(environ=env)
    started = time.monotonic()
    with pytest.raises(CredentialsError, match=r"; then instance metadata http://127\.0\.0\.1:\d+/: unreachable \(.+\)$"):
        provider.get()
    assert time.monotonic() - started < 1


def test_stale_imds_credentials_are_extended_instead_of_refetched_on_every_call(env, stub):
    # During an IMDS outage the service keeps serving credentials about to expire.
    server = stub(imds(expiration=expiry(NOW + timedelta(minutes=3))))
    provider = resolve_credentials(environ=imds_env(env, server), clock=Clock())
    creds = provider.get()
    assert NOW + timedelta(minutes=17) <= creds.expiration <= NOW + timedelta(minutes=25)
    provider.get()
    assert len(server.requests) == 3


def test_instance_metadata_refreshes_inside_the_window(env, stub):
    server = stub(imds(expiration="2025-01-02T04:04:05Z"))
    clock = Clock()
    provider = resolve_credentials(environ=imds_env(env, server), clock=clock)
    provider.get()
    clock.now = NOW + timedelta(minutes=30)
    provider.get()
    assert len(server.requests) == 3
    clock.now = NOW + timedelta(minutes=46)
    provider.get()
    assert len(server.requests) == 6


def test_imds_settings_come_from_the_environment_and_are_checked(env):
    del env["AWS_EC2_METADATA_DISABLED"]
    assert resolve_credentials(environ=env).source == "instance-metadata http://169.254.169.254/"
    env["AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE"] = "IPv6"
    assert resolve_credentials(environ=env).source == "instance-metadata http://[fd00:ec2::254]/"
    env["AWS_METADATA_SERVICE_NUM_ATTEMPTS"] = "zero"
    with pytest.raises(CredentialsError, match="must be a positive integer"):
        resolve_credentials(environ=env)


# --- botocore as an oracle for the local chain ----------------------------------

ORACLE_CREDENTIALS = (
    "[default]\naws_access_key_id = AKIDCREDSDEFAULT\naws_secret_access_key = s\n"
    "[a]\naws_access_key_id = AKIDCREDSA\naws_secret_access_key = s\n"
    "[profile b]\naws_access_key_id = AKIDCREDSWRONG\naws_secret_access_key = s\n"
)
ORACLE_CONFIG = (
    "[default]\naws_access_key_id = AKIDCONFIGDEFAULT\naws_secret_access_key = s\n"
    "[profile a]\naws_access_key_id = AKIDCONFIGA\naws_secret_access_key = s\n"
    "[profile b]\naws_access_key_id = AKIDCONFIGB\naws_secret_access_key = s\n"
    "aws_security_token = legacy\naws_session_token = modern\n"
    "[b]\naws_access_key_id = AKIDCONFIGWRONG\naws_secret_access_key = s\n"
)
ENV_KEYS = {"AWS_ACCESS_KEY_ID": "AKIDENV", "AWS_SECRET_ACCESS_KEY": "s"}


@pytest.mark.parametrize("variables, profile", [
    ({}, None),
    (ENV_KEYS, None),
    (ENV_KEYS, "a"),
    (dict(ENV_KEYS, AWS_PROFILE="a"), None),
    ({"AWS_PROFILE": "a"}, None),
    ({"AWS_PROFILE": "b"}, None),
    ({"AWS_PROFILE": "a", "AWS_DEFAULT_PROFILE": "b"}, None),
    ({"AWS_SESSION_TOKEN": "t1", "AWS_SECURITY_TOKEN": "t2", **ENV_KEYS}, None),
    ({}, "b"),
])
def test_the_local_chain_picks_what_botocore_picks(tmp_path, monkeypatch, variables, profile):
    session_module = pytest.importorskip("botocore.session")
    write(tmp_path / "credentials", ORACLE_CREDENTIALS)
    write(tmp_path / "config", ORACLE_CONFIG)
    environ = {
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "credentials"),
        "AWS_CONFIG_FILE": str(tmp_path / "config"),
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    environ.update(variables)
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    theirs = session_module.Session(profile=profile).get_credentials().get_frozen_credentials()
    ours = resolve_credentials(profile=profile, environ=environ).get()
    assert (ours.access_key, ours.session_token) == (theirs.access_key, theirs.token)
