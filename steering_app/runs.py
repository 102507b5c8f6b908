"""A steering run's life, decided in one place: create, submit, claim, process, cancel, fail, sweep_stale.

    queued --claim--> running --process--> completed
       |                 +------cancel---> cancelled (with the text generated so far)
       +--cancel------------------------> cancelled
       +-----------------+--fail / sweep_stale--> failed (with the reason)

The panel and the API create and submit; every worker mode (inline, embedded, channel) calls
process_queued(), which claims the oldest queued run, processes it, and repeats; the workers also call
sweep_stale() on a timer and as they start. A run always ends: any failure while processing fails it
with its reason. While a worker processes a run, a liveness thread writes the run's heartbeat every
HEARTBEAT_SECONDS and watches its cancel flag; the engine asks before every step whether to stop.
"""

import asyncio
import logging
import math
import os
import random
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Self

from django.conf import settings
from django.db import connection
from django.db.models import Q
from django.utils import timezone

from steering_app import services, streaming, worker
from steering_app.errors import InvalidInput, WorkerUnavailable
from steering_app.limits import MAX_PROMPT_CHARS, MAX_SEED
from steering_app.models import SteeringRun, Training
from steering_app.steering_settings import SteeringSettings, is_integer

if TYPE_CHECKING:
    from django.contrib.auth.models import AbstractBaseUser as User

logger = logging.getLogger(__name__)

Emit = Callable[[str, dict], None]
Status = SteeringRun.Status
ACTIVE = (Status.QUEUED, Status.RUNNING)
OOM_MESSAGE = "Out of memory during generation. Try reducing max_tokens or using fewer intervention layers."
NO_WORKER = "no worker available"
WORKER_STOPPED = "the worker stopped before finishing"
WORKER_GONE = "the worker stopped before finishing: its process is gone"
HEARTBEAT_SECONDS = 1.0
# How far down the queue one claim looks when other workers keep taking the oldest runs first.
CLAIM_CANDIDATES = 20


@dataclass(frozen=True)
class RunRequest:
    """Everything one comparison needs: the settings, plus what only a run has (prompt, seed, chat)."""

    training_id: int
    prompt: str
    settings: SteeringSettings
    seed: int | None = None
    chat: bool = False
    model_id: int | None = None
    private: bool = False


def create(owner: "User", request: RunRequest) -> SteeringRun:
    """Validate a request and store it as a queued run; nothing is written when it is invalid."""
    training = Training.objects.get_completed(request.training_id)
    if request.model_id is not None and request.model_id != training.model_id:
        raise InvalidInput(
            f"model_id {request.model_id} is not the model of training {training.pk} ({training.model_id}).",
            "model_id",
        )
    prompt = request.prompt.strip() if isinstance(request.prompt, str) else ""
    if not prompt:
        raise InvalidInput("Enter a prompt.", "prompt")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise InvalidInput(f"The prompt is longer than {MAX_PROMPT_CHARS} characters.", "prompt")
    if request.seed is not None and (not is_integer(request.seed) or not 0 <= request.seed <= MAX_SEED):
        raise InvalidInput("seed must be a non-negative 63-bit integer.", "seed")
    steering = request.settings.validate(training)
    services.check_prompt_fits(training, request.prompt, bool(request.chat), steering.max_tokens)
    return SteeringRun.objects.create(
        owner=owner,
        training=training,
        prompt=request.prompt,
        features=steering.features,
        intervention_layers=steering.layers,
        method=steering.method,
        temperature=steering.temperature,
        max_new_tokens=steering.max_tokens,
        seed=request.seed if request.seed is not None else random.randrange(2**31),
        chat=bool(request.chat),
        sweep=steering.sweep,
        private=bool(request.private),
    )


def submit(run: SteeringRun) -> None:
    """Tell the workers a run is waiting. When no worker can be told, the run fails and WorkerUnavailable
    says so: the panel shows the message, the API answers 503."""
    try:
        worker.submit(run.pk)
    except Exception as error:
        logger.exception("Could not hand run %s to a worker", run.pk)
        fail(run.pk, NO_WORKER)
        raise WorkerUnavailable("No steering worker is available; try again later.") from error


def claim(accepts: Callable[[SteeringRun], bool] | None = None) -> SteeringRun | None:
    """Move the oldest queued run to running and return it; None when none is left, or when `accepts`
    refuses it (a batch with too few free rows: the run waits, and no later run overtakes it here).

    Every worker claims this way: a message to a worker means "work is waiting", not "run this one", so
    a free worker takes runs whose messages went to a busy one.
    """
    queued = SteeringRun.objects.filter(status=Status.QUEUED).order_by("created_at", "id")
    for run in queued.select_related("training__model")[:CLAIM_CANDIDATES]:
        if accepts is not None and not accepts(run):
            return None
        now = timezone.now()
        taken = SteeringRun.objects.filter(pk=run.pk, status=Status.QUEUED).update(
            status=Status.RUNNING, started_at=now, heartbeat_at=now, worker=worker_name()
        )
        if taken:
            return SteeringRun.objects.select_related("training__model").get(pk=run.pk)
    return None


def process_queued(emit_for: Callable[[int], Emit] | None = None) -> int:
    """Claim runs into a batch while rows are free, advance them together step by step, and store each as
    it ends; returns how many ran once none is queued or running here. What every worker calls.

    Runs join at any step (continuous batching) when they fit the batch that is open: the same model,
    enough free rows. The outcome is stored only while the run is still running: a run failed meanwhile
    (a sweep judged it dead) keeps that ending. A cancelled run keeps the text streamed until it stopped.
    """
    count = 0
    batch: services.EngineBatch | None = None
    working: dict[int, _Working] = {}
    while True:
        while (run := claim(batch.accepts if batch is not None and batch.active else None)) is not None:
            count += 1
            item = _Working(run, emit_for(run.pk) if emit_for else None)
            try:
                if batch is None or not batch.active:
                    batch = services.batch_for(run)
                if not batch.admit(run, item.on_step, item.liveness.should_stop):
                    raise RuntimeError("the batch had too few free rows")
                working[run.pk] = item
            except Exception as error:  # noqa: BLE001 - the run fails with the reason; the batch goes on
                item.end(error)
        if batch is None or not batch.active:
            return count
        try:
            ended = batch.step()
        except Exception as error:  # noqa: BLE001 - every run in the failed step fails with the reason
            for run in batch.abandon():
                working.pop(run.pk).end(error)
            continue
        for run, result in ended:
            working.pop(run.pk).end(result)


def process(run: SteeringRun, emit: Emit | None = None) -> SteeringRun:
    """Process one claimed run alone (a batch of its own) and store its outcome."""
    item = _Working(run, emit)
    try:
        batch = services.batch_for(run)
        if not batch.admit(run, item.on_step, item.liveness.should_stop):
            raise RuntimeError("the batch had too few free rows")
        while batch.active:
            for _run, result in batch.step():
                item.end(result)
    except Exception as error:  # noqa: BLE001 - the run fails with the reason
        item.end(error)
    run.refresh_from_db()
    return run


class _Working:
    """A claimed run while a worker processes it: its stream, its liveness thread, and how it ends."""

    def __init__(self, run: SteeringRun, emit: Emit | None):
        self.run = run
        self.emit = emit or (lambda event, payload: streaming.publish(run.pk, event, payload))
        self.streamed = ["", []]
        self.ended = False
        self.emit("started", {})
        self.liveness = Liveness(run.pk).__enter__()

    def on_step(self, unsteered: str, variants: list[str]) -> None:
        self.streamed[0] += unsteered
        extra = len(variants) - len(self.streamed[1])
        self.streamed[1] += [""] * max(0, extra)
        for index, delta in enumerate(variants):
            self.streamed[1][index] += delta
        self.emit(
            "delta",
            {"unsteered": unsteered, "steered": variants[0] if variants else "", "variants": variants},
        )

    def end(self, result: "services.Outcome | Exception") -> None:
        """Store the ending (completed, cancelled or failed), stop the liveness thread, tell the watchers."""
        if self.ended:
            return
        self.ended = True
        run_id = self.run.pk
        try:
            if isinstance(result, services.Outcome):
                variants = result.all_variants()
                _end_running(
                    run_id,
                    Status.COMPLETED,
                    unsteered_output=result.unsteered_output,
                    steered_output=result.steered_output,
                    metrics=finite_json(result.metrics),
                    variants=finite_json(variants),
                    timings=finite_json(result.timings),
                )
            elif isinstance(result, services.Cancelled):
                streamed = self.streamed[1]
                _end_running(
                    run_id,
                    Status.CANCELLED,
                    unsteered_output=self.streamed[0],
                    steered_output=streamed[0] if streamed else "",
                    variants=[{"steered_output": text} for text in streamed],
                )
            else:
                reason = failure_reason(result)
                logger.error("Steering run %s failed: %s", run_id, reason, exc_info=result)
                fail(run_id, reason)
        finally:
            self.liveness.__exit__(None, None, None)
        status, error = SteeringRun.objects.filter(pk=run_id).values_list("status", "error").get()
        self.emit(status, {"error": error})


def _end_running(run_id: int, status: str, **stored) -> None:
    """Store a processed run's ending, unless it was ended meanwhile (a sweep judged it dead)."""
    SteeringRun.objects.filter(pk=run_id, status=Status.RUNNING).update(
        status=status, finished_at=timezone.now(), **stored
    )


def worker_name() -> str:
    """Which worker ran a run: the run page shows it, and scale-out tests check that work was shared."""
    return f"{socket.gethostname()}:{os.getpid()}"


def cancel(run_id: int, reason: str) -> bool:
    """Stop a run: a queued one ends cancelled at once; a running one is flagged, and its worker stops
    within one step and stores it as cancelled with the text so far. False when it had already ended."""
    now = timezone.now()
    runs = SteeringRun.objects.filter(pk=run_id)
    if runs.filter(status=Status.QUEUED).update(status=Status.CANCELLED, error=reason, finished_at=now):
        return True
    flagged = runs.filter(status=Status.RUNNING).update(cancel_requested_at=now, error=reason)
    local = Liveness.active.get(run_id)
    if local is not None:  # processed by this process: no need to wait for the liveness thread
        local.stop.set()
    return bool(flagged)


def fail(run_id: int, reason: str) -> bool:
    """End a queued or running run as failed with `reason`; False when it had already ended."""
    return bool(_fail_all(SteeringRun.objects.filter(pk=run_id), reason))


def sweep_stale() -> int:
    """Fail the runs that can no longer finish, so that none stays queued or running forever.

    - queued, and no worker took it within STEERLAB_RUN_TIMEOUT seconds;
    - running, and its heartbeat is older than STEERLAB_RUN_MAX_SECONDS (however long it has run: a run
      slow because of load keeps beating and completes);
    - running on a worker of this host whose process is gone (killed, crashed): at once.
    """
    now = timezone.now()
    unclaimed = SteeringRun.objects.filter(
        status=Status.QUEUED, created_at__lt=now - timedelta(seconds=settings.STEERLAB_RUN_TIMEOUT)
    )
    silent_since = now - timedelta(seconds=settings.STEERLAB_RUN_MAX_SECONDS)
    silent = SteeringRun.objects.filter(status=Status.RUNNING).filter(
        Q(heartbeat_at__lt=silent_since) | Q(heartbeat_at__isnull=True, started_at__lt=silent_since)
    )
    return _fail_all(unclaimed, NO_WORKER) + _fail_all(silent, WORKER_STOPPED) + _fail_orphans()


def _fail_orphans() -> int:
    """Runs left running by a dead process of this host; other hosts' runs wait for their heartbeat."""
    host = socket.gethostname()
    running = SteeringRun.objects.filter(status=Status.RUNNING, worker__startswith=f"{host}:")
    gone = [pk for pk, name in running.values_list("pk", "worker") if not _process_alive(name)]
    return _fail_all(SteeringRun.objects.filter(pk__in=gone), WORKER_GONE) if gone else 0


def _process_alive(worker: str) -> bool:
    pid = worker.rpartition(":")[2]
    if not pid.isdecimal():
        return True  # not ours to judge
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def _fail_all(runs, reason: str) -> int:
    return runs.filter(status__in=ACTIVE).update(
        status=Status.FAILED, error=reason, finished_at=timezone.now()
    )


class Liveness:
    """While a worker processes a run: a thread writes the run's heartbeat and watches its cancel flag.

    `stop` is set when the run was cancelled (or ended by anyone else); the engine asks should_stop()
    before every step, so it stops within one. Liveness.active maps the runs this process is working on,
    so that cancel() in the same process (embedded worker) stops them without waiting for the thread.
    """

    active: dict[int, "Liveness"] = {}

    def __init__(self, run_id: int, interval: float | None = None):
        self.run_id = run_id
        self.interval = HEARTBEAT_SECONDS if interval is None else interval
        self.stop = threading.Event()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._beat, name=f"run-{run_id}-liveness", daemon=True)

    def should_stop(self) -> bool:
        return self.stop.is_set()

    def __enter__(self) -> Self:
        Liveness.active[self.run_id] = self
        self.thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.done.set()
        self.thread.join()
        Liveness.active.pop(self.run_id, None)

    def _beat(self) -> None:
        try:
            while not self.done.wait(self.interval):
                try:
                    self._check_in()
                except Exception:
                    logger.warning("Heartbeat of run %s failed", self.run_id, exc_info=True)
        finally:
            connection.close()  # this thread's own database connection

    def _check_in(self) -> None:
        runs = SteeringRun.objects.filter(pk=self.run_id)
        runs.filter(status=Status.RUNNING).update(heartbeat_at=timezone.now())
        state = runs.values_list("status", "cancel_requested_at").first()
        # Stop only on a positive sign: a row this connection cannot see (yet) is no reason to stop.
        if state is not None and (state[0] != Status.RUNNING or state[1] is not None):
            self.stop.set()


async def wait(run_id: int, timeout: float, poll_ceiling: float = 0.25) -> SteeringRun:
    """Poll the run until it ends or `timeout` passes; awaiting keeps Django's one sync thread free."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    pause = 0.02
    while True:
        run = await SteeringRun.objects.aget(pk=run_id)
        remaining = deadline - loop.time()
        if run.is_finished or remaining <= 0:
            return run
        await asyncio.sleep(min(pause, remaining))
        pause = min(pause * 2, poll_ceiling)


def failure_reason(error: Exception) -> str:
    if is_out_of_memory(error):
        return OOM_MESSAGE
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def is_out_of_memory(error: Exception) -> bool:
    import torch

    return isinstance(error, torch.OutOfMemoryError | MemoryError)


def finite_json(value: object) -> object:
    """JSON columns refuse NaN and infinities (SQLite and PostgreSQL alike): store them as null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite_json(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [finite_json(item) for item in value]
    return value
