"""Submit a few tasks for worker.py.

    python examples/producer.py

The bucket comes from the environment (S3_BUCKET, S3_ENDPOINT, S3_REGION and
the AWS credentials) or from .buquet.toml; with neither, the local directory
store ./.buquet is used (BUQUET_LOCAL_DIR chooses another directory).
"""

from buquet import connect

queue = connect()

for address in ["ada@example.com", "grace@example.com", "not-an-address"]:
    task = queue.submit("send_email", {"to": address}, max_retries=2)
    print("submitted", task.id, "send_email", address)

# Run in an hour, unless nobody has started it within a day.
task = queue.submit("report", {"day": "2026-01-28"}, delay=3600, ttl=86400,
                    idempotency_key="report-2026-01-28")  # submitting again yields the same task
print("submitted", task.id, "report, available at", task.available_at)
