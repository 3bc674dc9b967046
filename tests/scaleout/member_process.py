"""One member of a shared account, as its own process, for the scale-out tests.

    python member_process.py quota  REDIS_URL FAKE_URL ACCOUNT CAPACITY TASKS SEED
    python member_process.py holder REDIS_URL FAKE_URL ACCOUNT PUBLIC_URL

``quota`` runs TASKS tasks of n = 1..4 at once through the shared limiter;
``holder`` creates one task whose callbacks go to PUBLIC_URL (another process)
and waits for it with polling slowed to 30 s, so only a forwarded callback can
resolve it quickly. Each prints one JSON line of what it saw. The callback
secret comes from KLING_CALLBACK_SECRET, as replicas behind a load balancer get it.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time

from redis.asyncio import Redis

import kling_async
from kling_async.contrib.redis import RedisAccount

API_KEY = "sk-test-0123456789"
POLL = kling_async.PollPolicy(initial_delay=0.05, max_delay=0.2, timeout=60.0)
SLOW = kling_async.PollPolicy(initial_delay=30.0, max_delay=30.0, callback_delay=30.0)


async def quota(redis_url: str, fake: str, name: str, capacity: int, tasks: int, seed: int) -> None:
    rng = random.Random(seed)
    redis = Redis.from_url(redis_url)
    async with RedisAccount(redis, name=name) as account:
        limiter = account.limiter(capacity)
        async with kling_async.Client(
            API_KEY, base_url=fake, max_concurrency=limiter, polling=POLL
        ) as client:

            async def one(number: int) -> str:
                handle = await client.images.generate(prompt=f"p{number}", n=rng.randint(1, 4))
                return (await handle).status.value

            statuses = await asyncio.gather(*(one(number) for number in range(tasks)))
        await limiter.flush()
    await redis.aclose()
    print(json.dumps({"succeeded": statuses.count("succeed"), "creates": limiter.creates}))


async def holder(redis_url: str, fake: str, name: str, public_url: str) -> None:
    redis = Redis.from_url(redis_url)
    receiver = kling_async.CallbackReceiver(public_url)
    async with RedisAccount(redis, name=name) as account:
        fan_in = account.fan_in(receiver)
        await fan_in.ready()
        async with kling_async.Client(
            API_KEY, base_url=fake, callbacks=receiver, polling=SLOW
        ) as client:
            started = time.monotonic()
            handle = await client.images.generate(prompt="held elsewhere")
            task = await asyncio.wait_for(handle.wait(), 20.0)
            seconds = time.monotonic() - started
    await redis.aclose()
    print(
        json.dumps(
            {
                "status": task.status.value,
                "seconds": seconds,
                "delivered": fan_in.delivered,
                "external_task_id": handle.external_task_id,
            }
        )
    )


def main() -> None:
    mode, *arguments = sys.argv[1:]
    if mode == "quota":
        redis_url, fake, name, capacity, tasks, seed = arguments
        asyncio.run(quota(redis_url, fake, name, int(capacity), int(tasks), int(seed)))
    else:
        redis_url, fake, name, public_url = arguments
        asyncio.run(holder(redis_url, fake, name, public_url))


if __name__ == "__main__":
    main()
