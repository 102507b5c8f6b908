"""A steering run's life, decided in one place: create, submit, claim, process, cancel, fail, sweep_stale.

    queued --claim--> running --process--> completed
       |                 +------cancel---> cancelled (with the text generated so far)
       +--cancel------------------------> cancelled
       +-----------------+--fail / sweep_stale--> failed (with the reason)

The panel and the API create and submit (wake.workers tells the worker, an entry layer above this module:
worker.py); every worker mode (inline, embedded, channel) calls process_queued(), which claims queued runs in fair-share order (next_in_turn), processes them, and repeats;
the workers also call beat() and sweep_stale() on a timer and as they start. A run always ends: any failure
while processing fails it with its reason, and a run whose cancel was asked for ends cancelled wherever it
stopped. While a worker processes a run, a liveness thread writes the run's heartbeat every
HEARTBEAT_SECONDS and watches its cancel flag; the engine asks before every step whether to stop.

Fair share: one member's backlog must not hold back another's run. The next run is the oldest queued run
of the member with the fewest runs in progress; among equals, the member whose latest run started longest
ago. A member may have STEERLAB_MAX_QUEUED_PER_MEMBER runs queued; one more is refused (TooManyRuns, 429).
"""

import logging
import math
import os
import random
import socket
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Self

from django.conf import settings
from django.db import connection, transaction
from django.db.models import Count, Max, Q
from django.utils import timezone

from steering_app import analysis, experiment_results, services, streaming, vector_jobs, wake
from steering_app.errors import (
    OOM_MESSAGE,  # noqa: F401 - the API compares a failed run's error with it
    InvalidInput,
    SteeringError,
    TooManyRuns,
    WorkerUnavailable,
    failure_reason,
)
from steering_app.limits import MAX_PROMPT_CHARS, MAX_SEED
from steering_app.models import SteeringRun, Training, Worker
from steering_app.polling import poll_until
from steering_app.steering_settings import RunRequest, is_integer

if TYPE_CHECKING:
    from django.contrib.auth.models import AbstractBaseUser as User

logger = logging.getLogger(__name__)

Emit = Callable[[str, dict], None]
Status = SteeringRun.Status
ACTIVE = (Status.QUEUED, Status.RUNNING)
NO_WORKER = "no worker available"
WORKER_STOPPED = "the worker stopped before finishing"
WORKER_GONE = "the worker stopped before finishing: its process is gone"
HEARTBEAT_SECONDS = 1.0
# How many times one claim tries again when other workers take the run it chose first.
CLAIM_CANDIDATES = 20
# A worker that has not beaten for this long is gone: six missed sweeps (worker.SWEEP_SECONDS is 5).
WORKER_SILENT_SECONDS = 30.0
# What a member over the queue cap is told to wait: about one run, measured as the median start-to-end time of
# the RECENT_RUNS latest completed runs (a run's end frees its rows for the next in turn), within these bounds;
# RETRY_AFTER_SECONDS before any run has completed. "Latest" by creation: the (status, created_at) index reads
# them without sorting every completed run, on the path a client over its cap keeps calling.
RETRY_AFTER_SECONDS = 10
RETRY_AFTER_BOUNDS = (1, 60)
RECENT_RUNS = 20


def create(owner: "User", request: RunRequest) -> SteeringRun:
    """Validate a request and store it as a queued run; nothing is written when it is invalid."""
    training = Training.objects.get_completed(request.training_id, request.model_id)
    prompt = request.prompt.strip() if isinstance(request.prompt, str) else ""
    if not prompt:
        raise InvalidInput("Enter a prompt.", "prompt")
    if len(request.prompt) > MAX_PROMPT_CHARS:  # as stored, spaces included: its settings must POST again
        raise InvalidInput(f"The prompt is longer than {MAX_PROMPT_CHARS} characters.", "prompt")
    if request.seed is not None and (not is_integer(request.seed) or not 0 <= request.seed <= MAX_SEED):
        raise InvalidInput("seed must be a non-negative 63-bit integer.", "seed")
    steering = request.settings.validate(training)
    services.check_prompt_fits(training, request.prompt, bool(request.chat), steering.max_tokens)
    services.check_steering_scales(training, steering.features)
    _check_queue_share(owner)
    return SteeringRun.objects.create(
        owner=owner,
        training=training,
        prompt=request.prompt,
        seed=request.seed if request.seed is not None else random.randrange(2**31),
        chat=bool(request.chat),
        private=bool(request.private),
        **steering.as_fields(),
    )


def _check_queue_share(owner: "User") -> None:
    cap = settings.STEERLAB_MAX_QUEUED_PER_MEMBER
    queued = SteeringRun.objects.filter(owner=owner, status=Status.QUEUED, experiment__isnull=True)
    if queued.count() >= cap:  # an experiment's cells wait behind every run, so they count apart
        raise TooManyRuns(
            f"You have {cap} runs waiting in the queue, the most one member may have "
            "(STEERLAB_MAX_QUEUED_PER_MEMBER); send more once one has started.",
            retry_after_seconds(),
        )


def retry_after_seconds() -> int:
    """About one run on this deployment: the median time the latest completed runs took, in whole seconds
    within RETRY_AFTER_BOUNDS (a GPU lab's runs end in a second, a CPU's in several)."""
    recent = (
        SteeringRun.objects.filter(
            status=Status.COMPLETED, started_at__isnull=False, finished_at__isnull=False
        )
        .order_by("-created_at")
        .values_list("started_at", "finished_at")[:RECENT_RUNS]
    )
    durations = sorted((finished - started).total_seconds() for started, finished in recent)
    if not durations:
        return RETRY_AFTER_SECONDS
    low, high = RETRY_AFTER_BOUNDS
    return min(high, max(low, math.ceil(durations[len(durations) // 2])))


def submit(run: SteeringRun) -> None:
    """Tell the workers a run is waiting. When no worker can be told, the run fails and WorkerUnavailable
    says so: the panel shows the message, the API answers 503."""
    try:
        wake.workers(run.pk)
    except Exception as error:
        logger.exception("Could not hand run %s to a worker", run.pk)
        fail(run.pk, NO_WORKER)
        raise WorkerUnavailable("No steering worker is available; try again later.") from error


def claim(accepts: Callable[[SteeringRun], bool] | None = None) -> SteeringRun | None:
    """Move the next run in turn (next_in_turn) to running and return it; None when none is queued, or when
    `accepts` refuses it (a batch with too few free rows: the run waits, and no other run overtakes it here).

    Every worker claims this way: a message to a worker means "work is waiting", not "run this one", so
    a free worker takes runs whose messages went to a busy one.
    """
    for _attempt in range(CLAIM_CANDIDATES):
        run = next_in_turn()
        if run is None or (accepts is not None and not accepts(run)):
            return None
        now = timezone.now()
        taken = SteeringRun.objects.filter(pk=run.pk, status=Status.QUEUED).update(
            status=Status.RUNNING, started_at=now, heartbeat_at=now, worker=wake.worker_name()
        )
        if taken:
            run.refresh_from_db()
            if run.experiment_id is not None:
                experiment_results.cell_started(run.experiment_id)
            return run
    return None  # other workers kept taking the runs chosen here; they are serving the queue


def next_in_turn() -> SteeringRun | None:
    """The queued run that goes next by the fair-share rule: the oldest queued run of the member with the
    fewest runs in progress; among equals, the member whose latest run started longest ago (or never), then
    the member whose oldest queued run is oldest. Experiments' cells go only when no other run waits, shared
    by the same rule among their owners: a comparison never waits behind an experiment's backlog."""
    queued = SteeringRun.objects.filter(status=Status.QUEUED)
    return _fair_pick(queued.filter(experiment__isnull=True)) or _fair_pick(
        queued.filter(experiment__isnull=False)
    )


def _fair_pick(queued) -> SteeringRun | None:
    queued = queued.order_by("created_at", "id")
    heads: dict[int, int] = {}  # member -> their oldest queued run, oldest first
    for pk, owner_id in queued.values_list("pk", "owner_id"):
        heads.setdefault(owner_id, pk)
    if len(heads) <= 1:  # nobody to share with: a batch asks every step, so no aggregates then
        return _claimable(next(iter(heads.values()), None))
    members = SteeringRun.objects.filter(owner_id__in=heads).values("owner_id")
    in_progress = dict(
        members.filter(status=Status.RUNNING).annotate(count=Count("id")).values_list("owner_id", "count")
    )
    last_started = dict(
        members.filter(started_at__isnull=False)
        .annotate(last=Max("started_at"))
        .values_list("owner_id", "last")
    )
    never = datetime.min.replace(tzinfo=UTC)
    member = min(heads, key=lambda owner: (in_progress.get(owner, 0), last_started.get(owner) or never))
    return _claimable(heads[member])


def _claimable(pk: int | None) -> SteeringRun | None:
    return SteeringRun.objects.select_related("training__model").filter(pk=pk).first() if pk else None


def process_queued(emit_for: Callable[[int], Emit] | None = None) -> int:
    """Claim runs into a batch while rows are free, advance them together step by step, and store each as
    it ends; returns how many ran once none is queued or running here. What every worker calls.

    Runs join at any step (continuous batching) when they fit the batch that is open: the same model,
    enough free rows. The outcome is stored only while the run is still running: a run failed meanwhile
    (a sweep judged it dead) keeps that ending. A cancelled run keeps the text streamed until it stopped.
    """
    count = 0
    batches = _Batches()
    working: dict[int, _Working] = {}
    while True:
        # A prompt a web request awaits is read between two steps: one short forward, before more runs join.
        analysis.process_waiting()
        while (run := claim(batches.accepts)) is not None:
            count += 1
            item = _Working(run, emit_for(run.pk) if emit_for else None)
            try:
                if not batches.open_for(run).admit(run, item.on_step, item.liveness.should_stop):
                    raise RuntimeError("the batch had too few free rows")
                working[run.pk] = item
            except Exception as error:  # noqa: BLE001 - the run fails with the reason; the batch goes on
                item.end(error)
        # A steering vector takes seconds to a minute of forwards: one is made only while no interactive run
        # streams here, so that no member's comparison stalls behind it; then runs queued meanwhile are claimed.
        if not batches.streaming and vector_jobs.process_waiting(limit=1):
            continue
        batch = batches.to_step()
        if batch is None:
            return count
        try:
            ended = batch.step()
        except Exception as error:  # noqa: BLE001 - every run in the failed step fails with the reason
            for run in batch.abandon():
                working.pop(run.pk).end(error)
            continue
        for run, result in ended:
            working.pop(run.pk).end(result)


class _Batches:
    """A worker's two batches: interactive runs in one, experiments' cells in the other (the engine's wide batch,
    where it has one: services.batch_for). The interactive batch is stepped alone while it holds runs, and no
    cell joins meanwhile: a comparison never shares its steps with an experiment's rows or waits out their
    metrics; the cells go on once it ends."""

    def __init__(self):
        self.interactive: services.EngineBatch | None = None
        self.cells: services.EngineBatch | None = None

    @property
    def streaming(self) -> bool:
        """Whether interactive runs are in progress here."""
        return self._active(self.interactive)

    @staticmethod
    def _active(batch) -> bool:
        return batch is not None and batch.active

    def accepts(self, run: SteeringRun) -> bool:
        """Whether the run in turn may join now: into its kind's open batch when it fits, or a new one."""
        if run.experiment_id is None:
            batch = self.interactive
        elif self._active(self.interactive):
            return False  # the cell waits for the interactive runs to end
        else:
            batch = self.cells
        return not self._active(batch) or batch.accepts(run)

    def open_for(self, run: SteeringRun) -> "services.EngineBatch":
        """The open batch of the run's kind, or a new one for its model."""
        if run.experiment_id is None:
            if not self._active(self.interactive):
                self.interactive = services.batch_for(run)
            return self.interactive
        if not self._active(self.cells):
            self.cells = services.batch_for(run)
        return self.cells

    def to_step(self) -> "services.EngineBatch | None":
        """The batch to advance: the interactive one while it holds runs, else the cells'; None when both are idle."""
        for batch in (self.interactive, self.cells):
            if self._active(batch):
                return batch
        return None


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
                self._complete(result)
            elif isinstance(result, services.Cancelled) or _cancel_requested(run_id):
                # Whatever stopped it (a step, the prompt read, loading the model), a run whose cancel was
                # asked for ends cancelled, keeping who cancelled it and the text so far.
                streamed = self.streamed[1]
                _end_running(
                    run_id,
                    Status.CANCELLED,
                    unsteered_output=self.streamed[0],
                    steered_output=streamed[0] if streamed else "",
                    variants=[{"steered_output": text} for text in streamed],
                )
            elif isinstance(result, SteeringError):  # the worker refused the request: the caller's to fix
                logger.warning("Steering run %s refused: %s", run_id, result.message)
                fail(run_id, result.message, field=result.field or "")
            else:
                reason = failure_reason(result)
                logger.error("Steering run %s failed: %s", run_id, reason, exc_info=result)
                fail(run_id, reason)
        finally:
            self.liveness.__exit__(None, None, None)
        status, error = SteeringRun.objects.filter(pk=run_id).values_list("status", "error").get()
        self.emit(status, {"error": error})
        if self.run.experiment_id is not None:
            experiment_results.cell_ended(self.run.experiment_id)

    def _complete(self, outcome: "services.Outcome") -> None:
        """Store the completion, and an experiment cell's outputs in the same transaction: a cell is either
        completed with its outputs or not at all (a resume then runs it again)."""
        variants = finite_json(outcome.all_variants())
        with transaction.atomic():
            completed = _end_running(
                self.run.pk,
                Status.COMPLETED,
                unsteered_output=outcome.unsteered_output,
                steered_output=outcome.steered_output,
                metrics=finite_json(outcome.metrics),
                variants=variants,
                timings=finite_json(outcome.timings),
            )
            if completed and self.run.experiment_id is not None:
                experiment_results.record(self.run, finite_json(outcome.control()), variants)


def _cancel_requested(run_id: int) -> bool:
    return SteeringRun.objects.filter(pk=run_id, cancel_requested_at__isnull=False).exists()


def _end_running(run_id: int, status: str, **stored) -> int:
    """Store a processed run's ending, unless it was ended meanwhile (a sweep judged it dead); 1 when stored."""
    return SteeringRun.objects.filter(pk=run_id, status=Status.RUNNING).update(
        status=status, finished_at=timezone.now(), **stored
    )


def cancel(run_id: int, reason: str) -> bool:
    """Stop a run: a queued one ends cancelled at once; a running one is flagged, and its worker stops
    within one step and stores it as cancelled with the text so far. False when it had already ended."""
    now = timezone.now()
    runs = SteeringRun.objects.filter(pk=run_id)
    experiments = _experiments_of(runs)
    if runs.filter(status=Status.QUEUED).update(status=Status.CANCELLED, error=reason, finished_at=now):
        _cells_ended(experiments)
        return True
    flagged = runs.filter(status=Status.RUNNING).update(cancel_requested_at=now, error=reason)
    local = Liveness.active.get(run_id)
    if local is not None:  # processed by this process: no need to wait for the liveness thread
        local.stop.set()
    return bool(flagged)


def fail(run_id: int, reason: str, field: str = "") -> bool:
    """End a queued or running run as failed with `reason` (and the input at fault, when the worker refused
    the request); False when it had already ended."""
    return bool(_fail_all(SteeringRun.objects.filter(pk=run_id), reason, field))


def beat(name: str) -> None:
    """A worker's heartbeat, written by its sweep timer whether it is busy or idle: one UPDATE a sweep. Its
    first beat makes its row and forgets the workers silent for a day, so that restarts do not pile up rows."""
    now = timezone.now()
    if Worker.objects.filter(name=name).update(seen_at=now):
        return
    Worker.objects.create(name=name, started_at=now, seen_at=now)  # only this process beats under its name
    Worker.objects.filter(seen_at__lt=now - timedelta(days=1)).delete()


def workers_alive() -> bool:
    since = timezone.now() - timedelta(seconds=WORKER_SILENT_SECONDS)
    return Worker.objects.filter(seen_at__gte=since).exists()


def sweep_stale() -> int:
    """Fail the runs that can no longer finish, so that none stays queued or running forever.

    - queued for over STEERLAB_RUN_TIMEOUT seconds while no worker is alive (none has beaten within
      WORKER_SILENT_SECONDS): a busy worker's queue only waits, it never fails;
    - running, and its heartbeat is older than STEERLAB_RUN_MAX_SECONDS (however long it has run: a run
      slow because of load keeps beating and completes);
    - running on a worker of this host whose process is gone (killed, crashed): at once.
    """
    now = timezone.now()
    silent_since = now - timedelta(seconds=settings.STEERLAB_RUN_MAX_SECONDS)
    silent = SteeringRun.objects.filter(status=Status.RUNNING).filter(
        Q(heartbeat_at__lt=silent_since) | Q(heartbeat_at__isnull=True, started_at__lt=silent_since)
    )
    swept = _fail_all(silent, WORKER_STOPPED) + _fail_orphans()
    if not workers_alive():
        unclaimed = SteeringRun.objects.filter(
            status=Status.QUEUED, created_at__lt=now - timedelta(seconds=settings.STEERLAB_RUN_TIMEOUT)
        )
        swept += _fail_all(unclaimed, NO_WORKER)
    return swept


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


def _fail_all(runs, reason: str, field: str = "") -> int:
    ending = runs.filter(status__in=ACTIVE)
    experiments = _experiments_of(ending)
    count = ending.update(status=Status.FAILED, error=reason, error_field=field, finished_at=timezone.now())
    _cells_ended(experiments)
    return count


def _experiments_of(runs) -> list[int]:
    return sorted(set(runs.filter(experiment__isnull=False).values_list("experiment_id", flat=True)))


def _cells_ended(experiment_ids: list[int]) -> None:
    """Cells ended outside a worker's batch (a sweep, a cancel while queued): their experiments' status
    follows at once, as when a worker ends a cell (_Working.end)."""
    for experiment_id in experiment_ids:
        experiment_results.cell_ended(experiment_id)


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
    """The run once it has ended, or as it is after `timeout` seconds."""
    return await poll_until(
        lambda: SteeringRun.objects.aget(pk=run_id), lambda run: run.is_finished, timeout, 0.02, poll_ceiling
    )


def finite_json(value: object) -> object:
    """JSON columns refuse NaN and infinities (SQLite and PostgreSQL alike): store them as null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite_json(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [finite_json(item) for item in value]
    return value
