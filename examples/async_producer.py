"""The producer in asyncio form: inside a running event loop, `connect()`
gives a queue whose methods are coroutines.

    python examples/async_producer.py
"""

import asyncio

from buquet import connect


async def main():
    queue = await connect()
    tasks = await asyncio.gather(*(queue.submit("send_email", {"to": "user%d@example.com" % n}) for n in range(3)))
    for task in tasks:
        print("submitted", task.id, task.input["to"])


asyncio.run(main())
