"""The worker in asyncio form (the seed's example): coroutine handlers run on
the program's event loop.

    python examples/async_worker.py [--drain]
"""

import asyncio
import sys

from buquet import Worker, connect


async def main():
    queue = await connect()
    worker = Worker(queue, "async-worker", drain="--drain" in sys.argv[1:])

    @worker.task("send_email")
    async def handle(input):
        await asyncio.sleep(0.01)  # an HTTP call to the mail service, say
        print("sent to", input["to"], flush=True)
        return {"sent": True}

    return await worker.run()


sys.exit(asyncio.run(main()))
