"""Every program in examples/ runs as documented in examples/README.md: on
the local directory store (BUQUET_LOCAL_DIR), the sync pair also on moto."""

import importlib.util
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

import buquet
import sigv4
from buquet import LocalStore, Queue, load_config

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def environment(tmp_path, **extra):
    """A clean environment: no bucket, profile or user file of the machine."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("S3_", "BUQUET_", "AWS_", "PYTEST_")) and "proxy" not in k.lower()}
    env.update(PYTHONPATH=str(ROOT), XDG_CONFIG_HOME=str(tmp_path / "xdg"), AWS_EC2_METADATA_DISABLED="true")
    env.update(extra)
    return env


def run(tmp_path, env, *argv):
    """Run a program from a directory without a .buquet.toml; its output."""
    done = subprocess.run([sys.executable] + [str(a) for a in argv], cwd=str(tmp_path), env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout, done.stderr


def statuses(queue):
    return sorted((t.task_type, t.status) for shard in queue.shards for t in queue.list(shard))


EXPECTED_AFTER_WORKER = [("report", "pending"),  # delayed by an hour
                         ("send_email", "completed"), ("send_email", "completed"),
                         ("send_email", "failed")]


@pytest.fixture
def local(tmp_path):
    store = tmp_path / "store"
    return Queue(LocalStore(str(store))), environment(tmp_path, BUQUET_LOCAL_DIR=str(store))


def test_producer_then_worker_with_drain(tmp_path, local):
    queue, env = local
    out, err = run(tmp_path, env, EXAMPLES / "producer.py")
    assert [line.split()[2] for line in out.splitlines()] == ["send_email"] * 3 + ["report,"]
    assert err == ""  # BUQUET_LOCAL_DIR chose the store: no notice
    out, err = run(tmp_path, env, EXAMPLES / "worker.py", "--drain")
    logged = sorted(line.split(None, 3)[3] for line in err.splitlines())  # after date, time, thread
    assert logged[:2] == ["sending email to ada@example.com", "sending email to grace@example.com"]
    assert logged[2].endswith(" raised PermanentError(\"not an email address: 'not-an-address'\")")
    assert statuses(queue) == EXPECTED_AFTER_WORKER
    # The report's idempotency key: a second producer run submits it again as the same task.
    run(tmp_path, env, EXAMPLES / "producer.py")
    assert [t for t in statuses(queue) if t[0] == "report"] == [("report", "pending")]


def test_the_worker_runs_through_the_cli(tmp_path, local):
    queue, env = local
    run(tmp_path, env, EXAMPLES / "producer.py")
    out, err = run(tmp_path, env, "-m", "buquet", "worker", "examples.worker:worker", "--drain")
    assert "buquet: worker example-worker on LocalStore(" in err
    assert "sending email to ada@example.com" in err
    assert statuses(queue) == EXPECTED_AFTER_WORKER


def test_async_producer_then_async_worker(tmp_path, local):
    queue, env = local
    out, err = run(tmp_path, env, EXAMPLES / "async_producer.py")
    assert [line.split()[2] for line in out.splitlines()] == ["user%d@example.com" % n for n in range(3)]
    out, err = run(tmp_path, env, EXAMPLES / "async_worker.py", "--drain")
    assert sorted(out.splitlines()) == ["sent to user%d@example.com" % n for n in range(3)]
    assert statuses(queue) == [("send_email", "completed")] * 3
    assert {t.output["sent"] for shard in queue.shards for t in queue.list(shard)} == {True}


def test_producer_and_worker_on_a_bucket(tmp_path, moto_s3):
    env = environment(tmp_path, S3_BUCKET=moto_s3.bucket, S3_ENDPOINT=moto_s3.endpoint, S3_REGION=moto_s3.region,
                      AWS_ACCESS_KEY_ID=moto_s3.access_key, AWS_SECRET_ACCESS_KEY=moto_s3.secret_key)
    run(tmp_path, env, EXAMPLES / "producer.py")
    run(tmp_path, env, EXAMPLES / "worker.py", "--drain")
    queue = buquet.connect(bucket=moto_s3.bucket, endpoint=moto_s3.endpoint, region=moto_s3.region,
                           credentials=sigv4.Credentials(moto_s3.access_key, moto_s3.secret_key), use_config=False)
    assert statuses(queue) == EXPECTED_AFTER_WORKER


class FakeLambdaContext:
    """What AWS Lambda passes as `context`, as far as buquet uses it."""

    def __init__(self, remaining_ms):
        self.remaining_ms = remaining_ms
        self.aws_request_id = str(uuid.uuid4())

    def get_remaining_time_in_millis(self):
        return self.remaining_ms


def load_lambda_module(monkeypatch, store):
    monkeypatch.setenv("BUQUET_LOCAL_DIR", str(store))
    monkeypatch.delenv("S3_BUCKET", raising=False)
    name = "lambda_handler_%s" % uuid.uuid4().hex[:8]
    spec = importlib.util.spec_from_file_location(name, str(EXAMPLES / "lambda_handler.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_lambda_handler_drains_the_queue_within_the_invocation(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    queue = Queue(LocalStore(str(tmp_path / "store")))
    tasks = [queue.submit("send_email", {"to": "u%d@example.com" % n}) for n in range(3)]
    module = load_lambda_module(monkeypatch, tmp_path / "store")
    result = module.handler({"source": "aws.events"}, FakeLambdaContext(60000))
    assert result["completed"] == 3 and result["failed"] == 0 and result["stopped_early"] is False
    assert [queue.get(t.id).output for t in tasks] == [{"sent": True, "to": "u%d@example.com" % n} for n in range(3)]
    assert json.loads(json.dumps(result)) == result  # Lambda returns it as JSON

    # With no time left beyond the reserve it stops at once and leaves the tasks pending.
    late = queue.submit("send_email", {"to": "late@example.com"})
    result = module.handler({}, FakeLambdaContext(5000))
    assert result["stopped_early"] is True
    assert queue.get(late.id).status in ("pending", "completed")  # never left running


def test_example_configuration_loads_without_warnings(tmp_path):
    env = {"XDG_CONFIG_HOME": str(tmp_path / "xdg")}
    path = str(EXAMPLES / ".buquet.toml")
    config = load_config(config_file=path, cwd=str(tmp_path), environ=env)
    assert config.warnings == [] and config.files == [path]
    assert config.values == {
        "bucket": "my-queue", "region": "eu-west-1", "shards": list("01234567"), "concurrency": 8,
        "grace_period": 30, "poll_min_ms": 100, "poll_max_ms": 2500, "monitor_interval": 60,
        "sweep_interval": 300,
    }
    dev = load_config(profile="dev", config_file=path, cwd=str(tmp_path), environ=env)
    assert dev.warnings == []
    assert (dev.get("bucket"), dev.get("endpoint"), dev.get("force_path_style")) == (
        "my-queue-dev", "http://localhost:9000", True)
    # The small reader (Python 3.9 and 3.10) reads it the same.
    text = Path(path).read_text()
    assert buquet._parse_toml_small(text, path) == buquet.parse_toml(text, path)


def test_the_examples_readme_describes_every_example():
    readme = (EXAMPLES / "README.md").read_text()
    files = sorted(p.name for p in EXAMPLES.iterdir() if p.is_file() and p.name != "README.md")
    assert files == [".buquet.toml", "async_producer.py", "async_worker.py", "lambda_handler.py", "producer.py",
                     "worker.py"]
    for name in files:
        assert "**`%s`**" % name in readme, name
