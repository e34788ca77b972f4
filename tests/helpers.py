"""Helpers shared by test modules (plain functions; fixtures live in conftest.py)."""

import json
import os
import threading
import time
from contextlib import contextmanager
from datetime import timedelta

import buquet
import sigv4


def connect(t, **options):
    """Our queue on an S3Target's fresh bucket."""
    return buquet.connect(bucket=t.bucket, endpoint=t.endpoint, region=t.region,
                          credentials=sigv4.Credentials(t.access_key, t.secret_key), **options)


def bucket_keys(t, prefix=""):
    """Every key under prefix, read with boto3 (not with the code under test)."""
    client = t.client()
    out = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=t.bucket, Prefix=prefix):
        out.extend(obj["Key"] for obj in page.get("Contents", ()))
    return sorted(out)


def raw(t, key):
    return t.client().get_object(Bucket=t.bucket, Key=key)["Body"].read()


def read_doc(t, key):
    return json.loads(raw(t, key))


class Clock:
    """A store clock the test moves by hand."""

    def __init__(self, start):
        self.now = start

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += timedelta(seconds=seconds)

    def set(self, when):
        self.now = when


def wait_for(predicate, timeout=5.0, interval=0.01, what="condition"):
    """predicate()'s first truthy value, polled until `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("%s not met within %.1f s" % (what, timeout))


@contextmanager
def running(worker, join_timeout=20):
    """Run the worker in a thread for the body of the with block, then stop
    it and check that run() returned 0."""
    result = {}

    def target():
        result["code"] = worker.run(install_signal_handlers=False)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    try:
        yield thread
    finally:
        worker.stop()
        thread.join(join_timeout)
        assert not thread.is_alive(), "the worker did not stop"
    assert result.get("code") == 0


def isolate_environment(monkeypatch, tmp_path):
    """No bucket, profile, proxy or user file from the machine running the tests,
    and the temporary directory as the current one (the CLI reads .buquet.toml there)."""
    for name in list(os.environ):
        if name.startswith(("S3_", "BUQUET_", "AWS_")) or "proxy" in name.lower():
            monkeypatch.delenv(name)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.chdir(tmp_path)
