"""Secrets are never printed: not by the CLI, not in tracebacks, not in logs, not
in the repr or str of anything a user may print.

A whole session runs with a distinctive fake secret key and session token: against moto
(which accepts any secret, so the commands succeed) and against SeaweedFS with a WRONG
secret (so every request fails and errors are printed). Everything is captured (stdout and
stderr of `python -m buquet` subprocesses, --debug tracebacks included; log records at
DEBUG; repr/str of credentials, provider, client, store, queue and every S3Error) and
searched for the secret, the token and the secret's first 8 characters.
"""

import io
import json
import logging
import os
import subprocess
import sys
import textwrap
import threading
import traceback
from datetime import datetime, timezone
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import buquet  # noqa: E402
import sigv4  # noqa: E402

SECRET = "NeverPrintThisSecret1234567890abcdef"
TOKEN = "NeverPrintThisToken0987654321fedcbaSessionTokenValue"
NEEDLES = (SECRET, TOKEN, SECRET[:8], SECRET[-12:], TOKEN[-12:])

APP = textwrap.dedent("""
    import buquet

    queue = buquet.connect()
    worker = buquet.Worker(queue, "secret-worker", drain=True, monitor=False, scheduler=False)

    @worker.task("echo")
    def echo(input):
        return input
""")


def assert_no_secret(text, where):
    for needle in NEEDLES:
        assert needle not in text, "%s shows a secret (%r):\n%s" % (where, needle[:8] + "...", text[-3000:])


def cli_env(tmp_path, target, *, secret=SECRET, token=TOKEN, **extra):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("S3_", "BUQUET_", "AWS_", "PYTEST_")) and "proxy" not in k.lower()}
    env.update(
        PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT)]), XDG_CONFIG_HOME=str(tmp_path / "xdg"),
        AWS_EC2_METADATA_DISABLED="true", AWS_CONFIG_FILE=str(tmp_path / "none"),
        AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
        S3_BUCKET=target.bucket, S3_ENDPOINT=target.endpoint, S3_REGION=target.region,
        AWS_ACCESS_KEY_ID=target.access_key, AWS_SECRET_ACCESS_KEY=secret,
    )
    if token:
        env["AWS_SESSION_TOKEN"] = token
    env.update(extra)
    return env


class Transcript:
    """Every byte a session printed, with where it came from."""

    def __init__(self, tmp_path, env):
        self.tmp_path = tmp_path
        self.env = env
        self.parts = []
        self.codes = {}

    def run(self, *argv, timeout=60):
        proc = subprocess.run([sys.executable, "-m", "buquet"] + list(argv), cwd=str(self.tmp_path), env=self.env,
                              capture_output=True, text=True, timeout=timeout)
        label = "buquet " + " ".join(argv)
        self.parts.append((label, proc.stdout + proc.stderr))
        self.codes[label] = proc.returncode
        return proc

    def add(self, label, text):
        self.parts.append((label, text))

    def check(self):
        assert self.parts
        for label, text in self.parts:
            assert_no_secret(text, label)


@pytest.fixture
def log_capture():
    """Every log record at DEBUG, formatted with its traceback, from the root logger."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


def describe_error(exc):
    """All the ways an exception is commonly shown."""
    return "\n".join([str(exc), repr(exc), repr(exc.args), repr(vars(exc)),
                      "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))])


# ==== Objects that hold credentials =========================================


def test_credentials_provider_and_client_never_show_the_secret():
    creds = sigv4.Credentials("AKIDEXAMPLE", SECRET, TOKEN, datetime(2030, 1, 1, tzinfo=timezone.utc))
    provider = sigv4.CredentialProvider(lambda now: creds, source="test", credentials=creds)
    client = sigv4.S3Client(endpoint="http://127.0.0.1:9", region="us-east-1", credentials=provider, environ={})
    store = buquet.S3Store("bkt", client=client)
    queue = buquet.Queue(store)
    resolved = sigv4.resolve_credentials(environ={"AWS_ACCESS_KEY_ID": "AKIDEXAMPLE",
                                                  "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_SESSION_TOKEN": TOKEN})
    shown = []
    for obj in (creds, provider, client, store, queue, resolved, client.credentials()):
        shown += [repr(obj), str(obj), "%s" % (obj,), "%r" % (obj,), format(obj, "")]
    shown.append(repr([creds, {"c": creds}, (provider,)]))
    assert_no_secret("\n".join(shown), "repr/str")
    assert "AKIDEXAMPLE" in repr(creds)  # the access key is not a secret: shown to tell keys apart


def test_presigned_urls_carry_no_secret():
    creds = sigv4.Credentials("AKIDEXAMPLE", SECRET)
    url = sigv4.presign("GET", "http://127.0.0.1:9/bkt/key", creds, "us-east-1")
    assert "AKIDEXAMPLE" in url and "X-Amz-Signature=" in url
    assert_no_secret(url, "presign")
    # With a session token the URL must carry the token (that is how SigV4 query
    # authentication works), never the secret.
    url = sigv4.presign("GET", "http://127.0.0.1:9/bkt/key", sigv4.Credentials("AKIDEXAMPLE", SECRET, TOKEN),
                        "us-east-1")
    for needle in (SECRET, SECRET[-12:]):
        assert needle not in url


# ==== A whole session on moto (the commands succeed) ========================


def test_a_cli_session_on_moto_never_prints_the_secret(moto_s3, tmp_path):
    (tmp_path / "secret_app.py").write_text(APP)
    session = Transcript(tmp_path, cli_env(tmp_path, moto_s3))
    session.run("config", "show")
    session.run("config", "show", "--json")
    session.run("doctor")
    submitted = session.run("submit", "-t", "echo", "-i", '{"x": 1}', "--json")
    assert submitted.returncode == 0, submitted.stderr
    task_id = json.loads(submitted.stdout)["id"]
    session.run("list")
    session.run("get", task_id)
    session.run("stats")
    session.run("workers")
    worker = session.run("worker", "secret_app:worker", "--drain", "--no-monitor", "--no-scheduler")
    assert worker.returncode == 0, worker.stdout + worker.stderr
    done = session.run("get", task_id, "--json")
    assert json.loads(done.stdout)["status"] == "completed", done.stdout + done.stderr
    session.run("--debug", "get", "00000000-0000-4000-8000-000000000000")
    # Failing --debug runs print tracebacks: a refused connection, and a bucket that is not there.
    session.run("--debug", "--endpoint", "http://127.0.0.1:9", "list")
    session.run("--debug", "--bucket", "no-such-bucket-for-secrets", "submit", "-t", "echo")
    session.check()
    assert session.codes["buquet submit -t echo -i {\"x\": 1} --json"] == 0
    assert any(code != 0 for label, code in session.codes.items() if "--debug" in label)
    assert "Traceback" in "".join(text for label, text in session.parts if "--debug" in label)


def test_the_library_on_moto_never_logs_the_secret(moto_s3, log_capture):
    queue = buquet.connect(bucket=moto_s3.bucket, endpoint=moto_s3.endpoint, region=moto_s3.region,
                           credentials=sigv4.Credentials(moto_s3.access_key, SECRET, TOKEN), use_config=False)
    task = queue.submit("echo", {"x": 1})
    worker = buquet.Worker(queue, "secret-worker", max_tasks=1, monitor=False, scheduler=False)
    worker.task("echo")(lambda input: input)
    watchdog = threading.Timer(20, worker.stop)  # a stuck worker fails the test below, not the run
    watchdog.start()
    try:
        worker.run(install_signal_handlers=False)
    finally:
        watchdog.cancel()
    assert queue.get(task.id).status == "completed"
    shown = [repr(queue), str(queue), repr(queue.store), repr(queue.store.client), log_capture.getvalue()]
    assert_no_secret("\n".join(shown), "library session on moto")


# ==== A whole session on SeaweedFS with a wrong secret (everything fails) ===


def test_a_cli_session_with_a_wrong_secret_never_prints_it(seaweed_s3, tmp_path):
    (tmp_path / "secret_app.py").write_text(APP)
    # Without a session token: SeaweedFS would refuse an unknown token before checking
    # the signature; the signature is what must fail here.
    session = Transcript(tmp_path, cli_env(tmp_path, seaweed_s3, token=None))
    for debug in ([], ["--debug"]):
        session.run(*debug, "config", "show")
        session.run(*debug, "config", "show", "--json")
        session.run(*debug, "doctor")
        session.run(*debug, "submit", "-t", "echo", "-i", '{"x": 1}')
        session.run(*debug, "list")
        session.run(*debug, "get", "00000000-0000-4000-8000-000000000000")
        session.run(*debug, "stats")
        session.run(*debug, "workers")
    session.run("--debug", "worker", "secret_app:worker", "--drain", "--no-monitor", "--no-scheduler",
                "--grace-period", "1s", timeout=90)
    session.check()
    failed = [label for label, code in session.codes.items() if code != 0]
    assert any("submit" in label for label in failed), session.codes
    # A drain run that could not look at the queue fails; it does not report it empty.
    assert [code for label, code in session.codes.items() if " worker " in label] == [1], session.codes
    for label, out in session.parts:  # without --debug, errors are one line, never a traceback
        assert "--debug" in label or "Traceback" not in out, label + ":\n" + out[-2000:]
    text = "".join(t for _, t in session.parts)
    assert "SignatureDoesNotMatch" in text or "AccessDenied" in text or "403" in text
    assert "Traceback" in text
    # With the token too: whatever SeaweedFS answers, neither shows.
    session = Transcript(tmp_path, cli_env(tmp_path, seaweed_s3))
    session.run("--debug", "submit", "-t", "echo")
    session.run("doctor")
    session.check()


def test_s3_errors_and_logs_from_a_wrong_secret_never_show_it(seaweed_s3, log_capture, capsys):
    creds = sigv4.Credentials(seaweed_s3.access_key, SECRET)
    client = sigv4.S3Client(endpoint=seaweed_s3.endpoint, region=seaweed_s3.region, credentials=creds,
                            max_attempts=2, environ={}, sleep=lambda s: None)
    bucket = seaweed_s3.bucket
    calls = [
        lambda: client.put_object(bucket, "k", b"v"),
        lambda: client.put_object(bucket, "k", b"v", if_none_match="*"),
        lambda: client.get_object(bucket, "k"),
        lambda: client.head_object(bucket, "k"),
        lambda: client.delete_object(bucket, "k"),
        lambda: client.delete_objects(bucket, ["a", "b"]),
        lambda: client.list_objects_v2(bucket, prefix="tasks/"),
        lambda: client.list_object_versions(bucket),
        lambda: client.get_bucket_versioning(bucket),
    ]
    errors = []
    for call in calls:
        with pytest.raises(sigv4.S3Error) as info:
            call()
        errors.append(info.value)
    assert any(e.status == 403 for e in errors), [str(e) for e in errors]
    shown = [describe_error(e) for e in errors]

    queue = buquet.connect(bucket=bucket, endpoint=seaweed_s3.endpoint, region=seaweed_s3.region,
                           credentials=sigv4.Credentials(seaweed_s3.access_key, SECRET, TOKEN), use_config=False,
                           max_attempts=2)
    for call in (lambda: queue.submit("echo", {}), lambda: queue.get("00000000-0000-4000-8000-000000000000"),
                 lambda: queue.list("0"), lambda: queue.versioning()):
        try:
            call()
        except Exception as exc:  # noqa: BLE001 - every error is shown, whatever its type
            shown.append(describe_error(exc))
        else:
            pytest.fail("a call with a wrong secret succeeded")
    worker = buquet.Worker(queue, "secret-worker", ["0"], drain=True, monitor=False, scheduler=False,
                           grace_period=1)
    worker.task("echo")(lambda input: input)
    try:
        worker.run(install_signal_handlers=False)
    except Exception as exc:  # noqa: BLE001
        shown.append(describe_error(exc))
    out = capsys.readouterr()
    shown += [out.out, out.err, log_capture.getvalue(), repr(client), repr(queue), repr(queue.store)]
    assert_no_secret("\n".join(shown), "errors and logs with a wrong secret")
