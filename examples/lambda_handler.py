"""buquet on AWS Lambda: each invocation (a schedule, say every minute) works
through the ready tasks and stops in time, putting back what is still running.

Handler: lambda_handler.handler.  Package this file with buquet.py, sigv4.py
and cron.py; set S3_BUCKET (and S3_REGION) in the function's environment; the
execution role's credentials are found in the environment.
"""

from buquet import Worker, connect

queue = connect()  # no network request: cold starts stay cheap
worker = Worker(queue, scheduler=False)  # schedules are fired by a long-running worker, or `buquet schedule run`


@worker.task("send_email")
def send_email(input):
    return {"sent": True, "to": input["to"]}


def handler(event, context):
    # Drains the queue until the invocation's remaining time runs low
    # (context.get_remaining_time_in_millis()), keeping 10% in reserve.
    return worker.lambda_handler(event, context)
