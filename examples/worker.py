"""A worker for the tasks of producer.py.

    python examples/worker.py            # until Ctrl-C or SIGTERM (graceful)
    python examples/worker.py --drain    # stop when nothing is ready
    buquet worker examples.worker:worker --drain   # the same through the CLI

Handlers may run more than once (a worker that dies gives its task back when
the lease ends): make them idempotent.
"""

import logging
import sys

from buquet import PermanentError, Worker, connect

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(threadName)s %(message)s")
log = logging.getLogger("worker")  # handlers run in several threads: log, do not print

queue = connect()
worker = Worker(queue, "example-worker")  # all 16 shards; pass a list to split them among workers


@worker.task("send_email")
def send_email(input):
    if "@" not in input["to"]:
        raise PermanentError("not an email address: %r" % input["to"])  # no retry
    log.info("sending email to %s", input["to"])
    return {"sent": True}


@worker.task("report")
def report(input, ctx):
    # A second parameter receives the TaskContext.
    log.info("report for %s, attempt %d", input["day"], ctx.attempt)
    return {"rows": 42}


@worker.on_error
def log_error(task, error):
    log.warning("task %s raised %r", task.id, error)


if __name__ == "__main__":
    worker.drain = "--drain" in sys.argv[1:]
    sys.exit(worker.run())
