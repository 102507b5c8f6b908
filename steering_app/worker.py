"""Hands queued runs to a worker and publishes their events to the run's group.

Embedded default (no REDIS_URL): one asyncio task inside the daphne process runs jobs one at a time in a
worker thread. Scale-out (REDIS_URL): runs go to the channel `steering-worker`, consumed by any number of
`python manage.py runworker steering-worker` processes (see consumers.SteeringWorkerConsumer).
Tests may set STEERLAB_WORKER_MODE=inline to run a job in the submitting thread.
"""

import asyncio
import logging
import os

from asgiref.sync import async_to_sync, sync_to_async
from channels.layers import get_channel_layer
from django.conf import settings

from steering_app import services

logger = logging.getLogger(__name__)

WORKER_CHANNEL = "steering-worker"


def group_name(run_id: int) -> str:
    return f"steering-run-{run_id}"


def publish(run_id: int, event: str, payload: dict) -> None:
    """Send one run event to everyone watching the run; called from sync worker code."""
    message = {"type": "run.event", "run_id": run_id, "event": event, **payload}
    async_to_sync(get_channel_layer().group_send)(group_name(run_id), message)


def execute_run(run_id: int) -> None:
    services.run_steering(run_id, lambda event, payload: publish(run_id, event, payload))


def execute_next_queued() -> None:
    """Run the oldest queued run. `runworker` takes channel messages faster than it runs them, so a busy
    worker holds a backlog of messages; treating each message as "work is waiting" rather than "run this
    one" lets a free worker take the runs whose messages went to a busy one."""
    run = services.claim_next_run()
    if run is not None:
        services.process_run(run, lambda event, payload: publish(run.pk, event, payload))


def worker_mode() -> str:
    mode = os.environ.get("STEERLAB_WORKER_MODE", "")
    if mode:
        return mode
    return "channel" if "RedisChannelLayer" in settings.CHANNEL_LAYERS["default"]["BACKEND"] else "embedded"


def submit(run_id: int) -> None:
    """Queue a run for execution. Safe to call from sync code (views, API, commands)."""
    mode = worker_mode()
    if mode == "inline":
        execute_run(run_id)
    elif mode == "channel":
        async_to_sync(get_channel_layer().send)(WORKER_CHANNEL, {"type": "run.steering", "run_id": run_id})
    else:
        async_to_sync(_embedded_enqueue)(run_id)


class EmbeddedWorker:
    """One job at a time, on the server's event loop; the job itself runs in a thread of its own."""

    def __init__(self):
        self.queue: asyncio.Queue[int] = asyncio.Queue()
        self.task = asyncio.get_running_loop().create_task(self.loop())

    async def loop(self) -> None:
        while True:
            run_id = await self.queue.get()
            try:
                await sync_to_async(execute_run, thread_sensitive=False)(run_id)
            except Exception:  # run_steering records failures itself; this guards the loop
                logger.exception("Embedded worker crashed on run %s", run_id)


_embedded: dict[asyncio.AbstractEventLoop, EmbeddedWorker] = {}


async def _embedded_enqueue(run_id: int) -> None:
    loop = asyncio.get_running_loop()
    worker = _embedded.get(loop)
    if worker is None or worker.task.done():
        worker = _embedded[loop] = EmbeddedWorker()
    worker.queue.put_nowait(run_id)
