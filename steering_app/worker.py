"""Transport only: how "a run is waiting" reaches a worker, and the timer that sweeps stale runs.

An entry layer: it calls runs and analysis, never the reverse. What a worker does with a run is decided in
runs.py; every mode calls runs.process_queued(). runs, analysis and experiments tell a worker through
wake.workers(), which SteeringAppConfig.ready() points at submit() below.
- embedded (default, no REDIS_URL): a task on the daphne process's event loop, started with the first
  connection (see steerproject/asgi.py); runs execute one at a time in a worker thread.
- channel (REDIS_URL): a message on the channel `steering-worker`, consumed by any number of
  `python manage.py runworker steering-worker` processes (SteeringWorkerConsumer below).
- inline (tests: STEERLAB_WORKER_MODE=inline): the run executes in the submitting thread.
STEERLAB_WORKER_MODE (settings) picks one; unset, channel with REDIS_URL, else embedded.
Embedded and channel workers load their models as they start (model_loading.warm, in a thread of its own): the
first run does not wait for the weights and the step plan, or sees their progress if it comes sooner.
Embedded and channel workers also beat (runs.beat: "this worker is alive", busy or not) and call
runs.sweep_stale(), analysis.sweep_stale() and vector_jobs.sweep_stale() every SWEEP_SECONDS, and once as they start.
"""

import asyncio
import logging
import threading

from asgiref.sync import async_to_sync, sync_to_async
from channels.consumer import SyncConsumer
from channels.layers import get_channel_layer
from django.conf import settings

from steering_app import analysis, model_loading, runs, vector_jobs, wake

logger = logging.getLogger(__name__)

WORKER_CHANNEL = "steering-worker"
SWEEP_SECONDS = 5.0


def mode() -> str:
    return settings.STEERLAB_WORKER_MODE


def submit(run_id: int | None = None) -> None:
    """Tell a worker that work is waiting: run `run_id`, or an analysis job (None). Safe to call from sync code
    (views, API, commands)."""
    current = mode()
    if current == "inline":
        runs.process_queued()
    elif current == "channel":
        async_to_sync(get_channel_layer().send)(WORKER_CHANNEL, {"type": "run.waiting", "run_id": run_id})
    else:
        async_to_sync(_wake_embedded)()


def sweep() -> None:
    """This worker's heartbeat and one sweep of runs and analysis jobs; a failing database must not stop the
    timer that calls it."""
    try:
        runs.beat(wake.worker_name())
        swept = runs.sweep_stale()
        stalled = analysis.sweep_stale()
        stalled_vectors = vector_jobs.sweep_stale()
    except Exception:
        logger.exception("Sweeping stale runs failed")
        return
    if swept:
        logger.warning("Failed %d stale run(s)", swept)
    if stalled:
        logger.warning("Failed %d stale analysis job(s)", stalled)
    if stalled_vectors:
        logger.warning("Failed %d stale vector job(s)", stalled_vectors)


def start_warming() -> None:
    """Load the models in the background (model_loading.warm): the server answers and sweeps meanwhile."""
    threading.Thread(target=model_loading.warm, name="steering-warm", daemon=True).start()


class SteeringWorkerConsumer(SyncConsumer):
    """`python manage.py runworker steering-worker`: each message means "work is waiting"."""

    def run_waiting(self, message: dict) -> None:
        runs.process_queued()


def start_sweeper_thread(interval: float = SWEEP_SECONDS) -> threading.Event:
    """For runworker processes, whose consumer only wakes on messages: sweep now, then on a timer.
    Returns the event that stops the thread."""

    def loop() -> None:
        while not stop.is_set():
            sweep()
            stop.wait(interval)

    stop = threading.Event()
    threading.Thread(target=loop, name="steering-sweeper", daemon=True).start()
    return stop


class EmbeddedWorker:
    """Runs on the server's event loop: one job at a time in a thread of its own, and the sweep timer."""

    def __init__(self, sweep_seconds: float = SWEEP_SECONDS):
        self.waiting = asyncio.Event()
        self.sweep_seconds = sweep_seconds
        loop = asyncio.get_running_loop()
        self.tasks = [loop.create_task(self.work()), loop.create_task(self.sweep())]

    @property
    def alive(self) -> bool:
        return all(not task.done() for task in self.tasks)

    def wake(self) -> None:
        self.waiting.set()

    async def work(self) -> None:
        while True:
            await self.waiting.wait()
            self.waiting.clear()
            try:
                await sync_to_async(runs.process_queued, thread_sensitive=False)()
            except Exception:  # runs records failures itself; this guards the loop
                logger.exception("Embedded worker failed")

    async def sweep(self) -> None:
        # embedded_worker() swept once before starting this worker; the timer takes over from there.
        while True:
            await asyncio.sleep(self.sweep_seconds)
            await sync_to_async(sweep, thread_sensitive=False)()

    def stop(self) -> None:
        for task in self.tasks:
            task.cancel()


_embedded: dict[asyncio.AbstractEventLoop, EmbeddedWorker] = {}


async def embedded_worker() -> EmbeddedWorker:
    """This event loop's embedded worker, started on first use (and again if it died).

    A fresh worker first sweeps (a run the previous process left running fails with its reason, before
    the request that started the worker is served) and then takes the runs still queued.
    """
    loop = asyncio.get_running_loop()
    current = _embedded.get(loop)
    if current is None or not current.alive:
        await sync_to_async(sweep, thread_sensitive=False)()
        current = _embedded.get(loop)  # another request may have started it meanwhile
        if current is None or not current.alive:
            current = _embedded[loop] = EmbeddedWorker()
            current.wake()
    return current


async def _wake_embedded() -> None:
    (await embedded_worker()).wake()


class StartEmbeddedWorker:
    """ASGI middleware: the embedded worker starts with the server's first connection, so stale runs of
    a previous process are swept and queued ones resume even before anyone submits a run. Its models start
    loading with the server, before any connection."""

    def __init__(self, app):
        self.app = app
        if mode() == "embedded":
            start_warming()

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket") and mode() == "embedded":
            await embedded_worker()
        return await self.app(scope, receive, send)
