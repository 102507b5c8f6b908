"""Reading a prompt with the model for a web request (the features it lights up, the residual norm at the SAE's
layer), as a job the worker runs: never in the request, whose process may not even hold the model.

    queued --claim--> running --> completed (result) | failed (error, error_field)

The web tier validates the request (its prompt limited in tokens, as a run's is) and creates the job, tells the
workers, awaits the job's end and deletes it: a job is one request's answer, not a record. Every worker runs
the waiting jobs each time runs.process_queued() goes round, so a worker busy with a batch answers them
between two steps. sweep_stale() fails the jobs whose worker stopped and deletes those no request awaits.
"""

import logging
from datetime import timedelta
from typing import TYPE_CHECKING

from asgiref.sync import sync_to_async
from django.conf import settings
from django.utils import timezone

from steering_app import services, wake
from steering_app.errors import InvalidInput, WorkerUnavailable, failure_reason
from steering_app.limits import MAX_PROMPT_CHARS
from steering_app.models import AnalysisJob, Training
from steering_app.polling import poll_until

if TYPE_CHECKING:
    from django.contrib.auth.models import AbstractBaseUser as User

logger = logging.getLogger(__name__)

Kind = AnalysisJob.Kind
Status = AnalysisJob.Status
ENDED = (Status.COMPLETED, Status.FAILED)
WORKER_STOPPED = "the worker stopped before finishing"


async def features_active_on(
    owner: "User", training: Training, prompt: str, chat: bool = False, limit: int = 20
) -> list[services.PromptFeature]:
    """The `limit` features the prompt lights up most for their own scale: by activation ÷ max activation, then
    the features with no recorded max activation, by activation (their ratio is unknown; in an uncalibrated
    training that is all of them).

    The worker lists every latent active on the prompt (services.active_latents): a feature that is strong in
    raw numbers (the generic #1737 "is / object", 36.6 of its 58.5) can be weak for itself, and one outside the
    raw top 20 near its own maximum."""
    job = AnalysisJob(
        owner=owner,
        training=training,
        kind=Kind.ACTIVE_FEATURES,
        prompt=prompt,
        chat=chat,
        limit=training.d_sae,
    )
    result = await answer(job)
    found = await sync_to_async(services.prompt_features)(training, result["features"])
    return sorted(found, key=_for_its_own_scale)[:limit]


def _for_its_own_scale(item: services.PromptFeature) -> tuple:
    ratio = item.relative_activation
    return (0, -ratio, item.index) if ratio is not None else (1, -item.activation, item.index)


async def residual_norm(owner: "User", training: Training, prompt: str) -> float:
    """|h| at the training's layer over the prompt (services.residual_norm)."""
    result = await answer(AnalysisJob(owner=owner, training=training, kind=Kind.RESIDUAL_NORM, prompt=prompt))
    return result["residual_norm"]


async def answer(job: AnalysisJob) -> dict:
    """Store the job, tell the workers and await its result, for at most STEERLAB_RUN_TIMEOUT seconds.

    InvalidInput naming the field when the request or the engine refuses the prompt; WorkerUnavailable when no
    worker answered in time or the job failed otherwise. The job is deleted whatever happens, the request
    going away included: a worker that took it meanwhile finds nowhere to store its answer, and moves on."""
    await sync_to_async(create)(job)
    timeout = settings.STEERLAB_RUN_TIMEOUT
    try:
        await sync_to_async(submit)()
        job = await wait(job.pk, timeout)
    finally:
        await AnalysisJob.objects.filter(pk=job.pk).adelete()
    if job.status == Status.COMPLETED:
        return job.result
    if job.status == Status.FAILED and job.error_field:
        raise InvalidInput(job.error, job.error_field)
    if job.status == Status.FAILED:
        raise WorkerUnavailable(f"The worker could not read the prompt: {job.error}.")
    picked = "finish reading" if job.started_at else "take"
    raise WorkerUnavailable(
        f"No steering worker could {picked} the prompt within {timeout} s; try again later."
    )


def create(job: AnalysisJob) -> None:
    """Validate an unsaved job and store it, queued; nothing is written when it is invalid.

    The prompt is counted in tokens here, in the web tier, before any worker sees it: a 20,000-character
    prompt can be 20,000 tokens, and the model's memory and time grow with every one."""
    prompt = job.prompt
    if not isinstance(prompt, str) or not prompt.strip():
        raise InvalidInput("prompt is empty: enter the text to read.", "prompt")
    if len(prompt) > MAX_PROMPT_CHARS or "\x00" in prompt:
        raise InvalidInput(f"prompt must be at most {MAX_PROMPT_CHARS} characters of text.", "prompt")
    services.check_prompt_fits(job.training, prompt, job.chat)
    job.save()


def submit() -> None:
    """Tell the workers a job is waiting; WorkerUnavailable when none can be told."""
    try:
        wake.workers()
    except Exception as error:
        logger.exception("Could not tell a worker of an analysis job")
        raise WorkerUnavailable("No steering worker is available; try again later.") from error


async def wait(job_id: int, timeout: float, poll_ceiling: float = 0.1) -> AnalysisJob:
    """The job once it has ended, or as it is after `timeout` seconds."""
    return await poll_until(
        lambda: AnalysisJob.objects.aget(pk=job_id),
        lambda job: job.status in ENDED,
        timeout,
        0.01,
        poll_ceiling,
    )


def process_waiting() -> int:
    """Run the jobs waiting when it is called, oldest first; returns how many it ran. What runs.process_queued()
    calls between two steps: jobs queued meanwhile wait for the next step, so a stream of them cannot stall a
    batch."""
    waiting = AnalysisJob.objects.filter(status=Status.QUEUED).order_by("created_at", "id")
    count = 0
    for job_id in list(waiting.values_list("pk", flat=True)):
        job = claim(job_id)
        if job is not None:
            execute(job)
            count += 1
    return count


def claim(job_id: int) -> AnalysisJob | None:
    """Move a queued job to running and return it; None when it is queued no more (another worker took it, or
    its request gave up and deleted it)."""
    if not AnalysisJob.objects.filter(pk=job_id, status=Status.QUEUED).update(
        status=Status.RUNNING, started_at=timezone.now()
    ):
        return None
    return AnalysisJob.objects.select_related("training__model").filter(pk=job_id).first()


def execute(job: AnalysisJob) -> None:
    """Compute a claimed job's answer and store it; any failure fails the job with its reason instead."""
    try:
        _end(job, Status.COMPLETED, result=_compute(job))
    except InvalidInput as error:
        _end(job, Status.FAILED, error=error.message, error_field=error.field or "")
    except Exception as error:  # the job fails with the reason; the worker goes on
        logger.exception("Analysis job %s failed", job.pk)
        _end(job, Status.FAILED, error=failure_reason(error))


def _compute(job: AnalysisJob) -> dict:
    if job.kind == Kind.ACTIVE_FEATURES:
        return {"features": services.active_latents(job.training, job.prompt, job.chat, job.limit)}
    return {"residual_norm": services.residual_norm(job.training, job.prompt)}


def _end(job: AnalysisJob, status: str, **stored) -> None:
    """Store a job's end, unless it ended meanwhile (a sweep failed it) or its request deleted it."""
    AnalysisJob.objects.filter(pk=job.pk, status=Status.RUNNING).update(
        status=status, finished_at=timezone.now(), **stored
    )


def sweep_stale() -> int:
    """Fail the running jobs whose worker stopped, and delete the jobs no request awaits; returns how many
    it failed.

    - running for longer than STEERLAB_RUN_MAX_SECONDS: a job is one forward of a slot-length prompt, far
      shorter, so its worker died or hangs; its request answers at once instead of waiting out its timeout;
    - created more than twice STEERLAB_RUN_TIMEOUT ago, whatever its state: a request awaits its job for at
      most STEERLAB_RUN_TIMEOUT and then deletes it, so the request is gone (its web process stopped).
    """
    if not AnalysisJob.objects.exists():  # nearly always: a job lives seconds; no write for the timer then
        return 0
    now = timezone.now()
    stalled = AnalysisJob.objects.filter(
        status=Status.RUNNING, started_at__lt=now - timedelta(seconds=settings.STEERLAB_RUN_MAX_SECONDS)
    ).update(status=Status.FAILED, error=WORKER_STOPPED, finished_at=now)
    AnalysisJob.objects.filter(
        created_at__lt=now - timedelta(seconds=2 * settings.STEERLAB_RUN_TIMEOUT)
    ).delete()
    return stalled
