"""Helpers shared by test modules (plain functions; fixtures live in conftest.py)."""

import json
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
