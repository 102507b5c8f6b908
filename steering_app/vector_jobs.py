"""A steering vector's life, from examples to a concept of a vector space: create, claim, execute, fail, sweep.

    queued --claim--> running --> completed (the concept is a Feature of the space) | failed (error)

The API and `manage.py make_vector` create a job; create() refuses, writing nothing, everything a worker would
refuse. A worker runs the queued jobs from runs.process_queued() (process_waiting), loads the model, calls the
engine (engine.vectors.make_concept), and stores the concept in ONE transaction: a new checkpoint directory
(written first, under <data dir>/vectors/, deleted again if the transaction fails; old ones may sit in a
worker's SAE cache) and the training's checkpoint path, concept count and stats with the new Feature. Any failure
fails the job with its reason and changes nothing else, except that a space the job started fails with it.
A job whose worker died (no heartbeat for STEERLAB_RUN_MAX_SECONDS; a thread writes it every second while the
job is computed) is failed by sweep_stale().
"""

import logging
import shutil
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Self

from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from steering_app import json_lines, wake
from steering_app.errors import InvalidInput, NotFound, WorkerUnavailable, failure_reason
from steering_app.limits import MAX_ID, MAX_PROMPT_CHARS, MAX_VECTOR_EXAMPLES, MIN_VECTOR_EXAMPLES
from steering_app.models import Feature, LanguageModel, Training, VectorJob

if TYPE_CHECKING:
    from django.contrib.auth.models import AbstractBaseUser as User

    from steering_app.engine.vectors import Concept

logger = logging.getLogger(__name__)

Status = VectorJob.Status
ACTIVE = (Status.QUEUED, Status.RUNNING)
# All texts of one job together: 1000 pairs of a few sentences are ~300k characters; a forward per text.
MAX_TOTAL_CHARS = 2_000_000
MAX_NAME_CHARS = 300
PROGRESS_EVERY_S = 1.0
NO_WORKER = "no worker available"
WORKER_STOPPED = "the worker stopped before finishing"
STORE_ATTEMPTS = 3


class Abandoned(Exception):
    """The job is running no more (a sweep failed it): its worker stops computing it."""


def create(
    owner: "User | None",
    *,
    model_id: int | None = None,
    training_id: int | None = None,
    name: str,
    description: str = "",
    method: str = "diffmean",
    tokens: str = "all",
    pairs: list | None = None,
    positives: list | None = None,
    negatives: list | None = None,
) -> VectorJob:
    """A queued job, stored with the space it starts (model_id) or adds to (training_id), and the workers told.

    InvalidInput naming the field (NotFound for an unknown model or training) with nothing written when the
    request is refused; WorkerUnavailable, the job failed, when no worker can be told."""
    job = store(
        owner,
        model_id=model_id,
        training_id=training_id,
        name=name,
        description=description,
        method=method,
        tokens=tokens,
        pairs=pairs,
        positives=positives,
        negatives=negatives,
    )
    try:
        wake.workers()
    except Exception as error:
        logger.exception("Could not tell a worker of vector job %s", job.pk)
        fail(job, NO_WORKER)
        raise WorkerUnavailable("No steering worker is available; try again later.") from error
    return job


def store(owner: "User | None", *, running: bool = False, **request) -> VectorJob:
    """Validate a request (create()'s keywords) and store its job, queued; or running and claimed by this
    process (running=True: `manage.py make_vector` computes it itself, and no worker may take it)."""
    job = _validated(owner, **request)
    if running:
        moment = timezone.now()
        job.status = Status.RUNNING
        job.started_at = job.heartbeat_at = moment
        job.worker = wake.worker_name()
    with transaction.atomic():
        if job.new_space:
            job.training.save()
            job.training_id = job.training.pk
        job.save()
    return job


def _validated(
    owner: "User | None",
    *,
    model_id: int | None = None,
    training_id: int | None = None,
    name: object,
    description: object = "",
    method: object = "diffmean",
    tokens: object = "all",
    pairs: object = None,
    positives: object = None,
    negatives: object = None,
) -> VectorJob:
    """The unsaved job of a request (with its unsaved training when it starts a space); raises InvalidInput."""
    training, new_space = _space(model_id, training_id)
    name = _name(name, training if not new_space else None)
    if not isinstance(description, str) or len(description) > MAX_PROMPT_CHARS:
        raise InvalidInput(
            f"description must be text of at most {MAX_PROMPT_CHARS} characters.", "description"
        )
    if method not in VectorJob.Method.values:
        raise InvalidInput(f"method must be one of {', '.join(VectorJob.Method.values)}.", "method")
    if tokens not in VectorJob.Tokens.values:
        raise InvalidInput(f"tokens must be one of {', '.join(VectorJob.Tokens.values)}.", "tokens")
    positives, negatives, paired = _examples(pairs, positives, negatives)
    if method == VectorJob.Method.PCA and not paired:
        raise InvalidInput("pca needs pairs: give pairs of [positive, negative] texts.", "pairs")
    return VectorJob(
        owner=owner,
        training=training,
        new_space=new_space,
        name=name,
        description=description.strip(),
        method=method,
        tokens=tokens,
        positives=positives,
        negatives=negatives,
        paired=paired,
    )


def _space(model_id: object, training_id: object) -> tuple[Training, bool]:
    """The space a job adds to (stored), or the pending one it starts (unsaved), and whether it is new."""
    if training_id is None:
        if model_id is None:
            raise InvalidInput(
                "Give model_id for a new vector space, or training_id to add to one.", "model_id"
            )
        model = _model(model_id)
        space = Training(
            model=model,
            encoder_type=Training.EncoderType.VECTORS,
            # Its reading layer is the first concept's best layer, known when the job completes.
            hook_layer=0,
            hook_name="blocks.0.hook_resid_post",
            d_in=model.hidden_size,
            d_sae=1,
            checkpoint_path="",
            status=Training.Status.PENDING,
        )
        return space, True
    if not _is_id(training_id):
        raise InvalidInput("training_id must be a positive integer.", "training_id")
    training = Training.objects.select_related("model").filter(pk=training_id).first()
    if training is None:
        raise NotFound(f"Training {training_id} does not exist.", "training_id")
    if not training.is_vector_space:
        raise InvalidInput(
            f"Training {training.pk} is an SAE, not a vector space: give model_id to start a space.",
            "training_id",
        )
    if not training.is_completed:
        raise InvalidInput(
            f"Vector space {training.pk} is {training.status}: add concepts once its first one is made.",
            "training_id",
        )
    if model_id is not None and model_id != training.model_id:
        raise InvalidInput(
            f"Vector space {training.pk} belongs to model {training.model_id}, not model {model_id}.",
            "model_id",
        )
    return training, False


def _model(model_id: object) -> LanguageModel:
    if not _is_id(model_id):
        raise InvalidInput("model_id must be a positive integer.", "model_id")
    model = LanguageModel.objects.filter(pk=model_id).first()
    if model is None:
        raise NotFound(f"Model {model_id} does not exist.", "model_id")
    if model.status != LanguageModel.Status.READY:
        raise InvalidInput(f"Model {model.name} is not ready: {model.error or model.status}.", "model_id")
    return model


def _is_id(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_ID


def _name(name: object, space: Training | None) -> str:
    if not isinstance(name, str) or not name.strip():
        raise InvalidInput("name is empty: name the concept.", "name")
    name = " ".join(name.split())
    if len(name) > MAX_NAME_CHARS:
        raise InvalidInput(f"name must be at most {MAX_NAME_CHARS} characters.", "name")
    if space is not None and (
        space.features.filter(label__iexact=name).exists()
        or space.vector_jobs.filter(status__in=ACTIVE, name__iexact=name).exists()
    ):
        raise InvalidInput(f"Vector space {space.pk} already has a concept named '{name}'.", "name")
    return name


def _examples(pairs: object, positives: object, negatives: object) -> tuple[list[str], list[str], bool]:
    """(positives, negatives, paired) from pairs, or from the two lists; raises InvalidInput naming the input."""
    if pairs is not None:
        if positives is not None or negatives is not None:
            raise InvalidInput("Give pairs, or positives and negatives, not both.", "pairs")
        if not isinstance(pairs, list | tuple):
            raise InvalidInput("pairs must be a list of [positive, negative] texts.", "pairs")
        for number, pair in enumerate(pairs, 1):
            if not isinstance(pair, list | tuple) or len(pair) != 2:
                raise InvalidInput(f"Pair {number} must be [positive, negative].", "pairs")
        _count(pairs, "pairs", "pairs")
        sides = ([pair[0] for pair in pairs], [pair[1] for pair in pairs])
        texts = [_texts(side, "pairs") for side in sides]
        _total(texts, "pairs")
        return texts[0], texts[1], True
    if positives is None and negatives is None:
        raise InvalidInput("Give pairs, or positives and negatives.", "pairs")
    cleaned = []
    for side, field in ((positives, "positives"), (negatives, "negatives")):
        if not isinstance(side, list | tuple):
            raise InvalidInput(f"{field} must be a list of texts.", field)
        _count(side, field, field)
        cleaned.append(_texts(side, field))
    _total(cleaned, "positives")
    return cleaned[0], cleaned[1], False


def _count(items: list, what: str, field: str) -> None:
    if not MIN_VECTOR_EXAMPLES <= len(items) <= MAX_VECTOR_EXAMPLES:
        raise InvalidInput(
            f"{what} has {len(items)} examples: give {MIN_VECTOR_EXAMPLES} to {MAX_VECTOR_EXAMPLES} "
            f"(a fifth of them, at least one, is held out to measure separation).",
            field,
        )


def _texts(items: list, field: str) -> list[str]:
    for number, text in enumerate(items, 1):
        if not isinstance(text, str) or not text.strip():
            raise InvalidInput(f"Example {number} of {field} is empty: every example needs text.", field)
        if len(text) > MAX_PROMPT_CHARS or "\x00" in text:
            raise InvalidInput(
                f"Example {number} of {field} must be at most {MAX_PROMPT_CHARS} characters of text.", field
            )
    return [text.strip() for text in items]


def _total(sides: list[list[str]], field: str) -> None:
    if sum(len(text) for side in sides for text in side) > MAX_TOTAL_CHARS:
        raise InvalidInput(f"The examples hold more than {MAX_TOTAL_CHARS} characters in all.", field)


def process_waiting(limit: int | None = None) -> int:
    """Run up to `limit` (None: all) of the jobs queued when it is called, oldest first; returns how many it ran.
    runs.process_queued() runs one at a time, between its batch's steps."""
    waiting = VectorJob.objects.filter(status=Status.QUEUED).order_by("created_at", "id")
    count = 0
    for job_id in list(waiting.values_list("pk", flat=True)):
        if limit is not None and count >= limit:
            break
        job = claim(job_id)
        if job is not None:
            execute(job)
            count += 1
    return count


def claim(job_id: int) -> VectorJob | None:
    """Move a queued job to running and return it; None when another worker took it first."""
    moment = timezone.now()
    if not VectorJob.objects.filter(pk=job_id, status=Status.QUEUED).update(
        status=Status.RUNNING, started_at=moment, heartbeat_at=moment, worker=wake.worker_name()
    ):
        return None
    return VectorJob.objects.select_related("training__model").get(pk=job_id)


def execute(job: VectorJob, on_progress: Callable[[float], None] | None = None) -> VectorJob:
    """Compute a running job's concept and store it; any failure fails the job with its reason instead.
    on_progress hears the progress each time it is recorded (about every second). Returns the job as stored."""
    from steering_app.engine.vectors import VectorError

    try:
        if job.new_space:
            Training.objects.filter(pk=job.training_id, status=Training.Status.PENDING).update(
                status=Training.Status.RUNNING
            )
        with _Heartbeat(job.pk):
            concept = _compute(job, on_progress)
            _store(job, concept)
    except Abandoned:
        logger.warning("Vector job %s ended elsewhere while it ran", job.pk)
    except VectorError as error:
        fail(job, str(error))
    except InvalidInput as error:
        fail(job, error.message)
    except Exception as error:  # the job fails with the reason; the worker goes on
        logger.exception("Vector job %s failed", job.pk)
        fail(job, failure_reason(error))
    return VectorJob.objects.get(pk=job.pk)


class _Heartbeat:
    """While its worker computes a job, a thread writes the job's heartbeat every PROGRESS_EVERY_S: loading a model
    (a hub download, a GGUF to dequantize) can take minutes with no progress to record, and a sweep must not take
    that silence for a dead worker."""

    def __init__(self, job_id: int):
        self.job_id = job_id
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._beat, name=f"vector-job-{job_id}-heartbeat", daemon=True)

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.done.set()
        self.thread.join()

    def _beat(self) -> None:
        try:
            while not self.done.wait(PROGRESS_EVERY_S):
                try:
                    VectorJob.objects.filter(pk=self.job_id, status=Status.RUNNING).update(
                        heartbeat_at=timezone.now()
                    )
                except Exception:
                    logger.warning("Heartbeat of vector job %s failed", self.job_id, exc_info=True)
        finally:
            connection.close()  # this thread's own database connection


def _compute(job: VectorJob, on_progress: Callable[[float], None] | None) -> "Concept":
    from steering_app.engine import loader, vectors

    lm = loader.load_model(job.training.model.source)
    return vectors.make_concept(
        lm,
        job.name,
        job.description,
        job.positives,
        job.negatives,
        method=job.method,
        tokens=job.tokens,
        paired=job.paired,
        on_progress=_progress_recorder(job, on_progress),
    )


def _progress_recorder(job: VectorJob, listener: Callable[[float], None] | None) -> Callable[[float], None]:
    """on_progress for the engine: the progress on the row, at most every PROGRESS_EVERY_S;
    Abandoned when the job runs no more, so that the engine stops."""
    last = -float("inf")

    def record(fraction: float) -> None:
        nonlocal last
        now = time.monotonic()
        if now - last < PROGRESS_EVERY_S:
            return
        last = now
        # 1 is for the stored job: the concept is not stored yet.
        progress = round(min(max(float(fraction), 0.0), 0.99), 4)
        if not VectorJob.objects.filter(pk=job.pk, status=Status.RUNNING).update(progress=progress):
            raise Abandoned
        if listener is not None:
            listener(progress)

    return record


class _SpaceMoved(Exception):
    """Another job stored a concept in the space meanwhile: store again from its new checkpoint."""


def _store(job: VectorJob, concept: "Concept") -> None:
    """The concept as a Feature of the space, with the space's new checkpoint, in one transaction."""
    for attempt in range(STORE_ATTEMPTS):
        training = Training.objects.select_related("model").get(pk=job.training_id)
        path = _checkpoint_dir(training, job, attempt)
        concepts, reading_layer = _with_concept(training, job, concept)
        _save_space(path, concepts, reading_layer, training.model.name)
        try:
            _commit(job, training, concept, concepts, reading_layer, path)
            return
        except _SpaceMoved:
            shutil.rmtree(path, ignore_errors=True)
            # A new space moves only when a sweep failed it with its job: nothing is left to store.
            if job.new_space or not VectorJob.objects.filter(pk=job.pk, status=Status.RUNNING).exists():
                raise Abandoned from None
        except BaseException:
            shutil.rmtree(path, ignore_errors=True)
            raise
    raise RuntimeError(f"vector space {job.training_id} kept changing while the concept was stored")


def _checkpoint_dir(training: Training, job: VectorJob, attempt: int) -> Path:
    from steering_app.engine.loader import data_dir

    suffix = f"-{attempt}" if attempt else ""
    return data_dir() / "vectors" / f"{training.pk}-{job.pk}{suffix}"


def _with_concept(training: Training, job: VectorJob, concept: "Concept") -> tuple[list["Concept"], int]:
    """Every concept of the space with the new one last, and the space's reading layer."""
    from steering_app.engine import vectors

    if job.new_space:
        return [concept], concept.best_layer
    existing, reading_layer = vectors.load_concepts(training.checkpoint_path)
    return [*existing, concept], reading_layer


def _save_space(path: Path, concepts: list["Concept"], reading_layer: int, model_name: str) -> None:
    from steering_app.engine import vectors

    shutil.rmtree(path, ignore_errors=True)  # a directory an earlier, failed attempt of this job left
    vectors.save_space(path, concepts, reading_layer, model_name)


def stats_entry(index: int, concept: "Concept") -> dict:
    """What Training.stats["concepts"] records of a concept (the separation report among it)."""
    info = concept.info or {}
    return {
        "index": index,
        "name": concept.name,
        "method": info.get("method"),
        "tokens": info.get("tokens"),
        "separation": [round(float(value), 4) for value in concept.separation],
        "best_layer": int(concept.best_layer),
        "examples": {"positives": info.get("positives"), "negatives": info.get("negatives")}
        if "positives" in info
        else None,
        **({"imported_from": info["imported_from"]} if "imported_from" in info else {}),
    }


def job_report(concept: "Concept", index: int) -> dict:
    best = int(concept.best_layer)
    separation = [round(float(value), 4) for value in concept.separation]
    return {
        "feature_index": index,
        "separation": separation,
        "best_layer": best,
        "accuracy": separation[best] if best < len(separation) else None,
    }


def space_fields(
    training: Training, concepts: list["Concept"], reading_layer: int, path: Path, entries: list[dict]
) -> dict:
    """The columns of a vector space's Training once it holds `concepts`, saved at `path`."""
    return {
        "hook_layer": reading_layer,
        "hook_name": f"blocks.{reading_layer}.hook_resid_post",
        "d_sae": len(concepts),
        "checkpoint_path": str(path),
        "stats": {**(training.stats if isinstance(training.stats, dict) else {}), "concepts": entries},
    }


def concept_feature(training: Training, index: int, concept: "Concept") -> Feature:
    """The Feature row of a concept, unsaved: a_i lives inside its vectors, so its max activation is 1."""
    return Feature(
        training=training,
        index=index,
        label=concept.name[:MAX_NAME_CHARS],
        description=concept.description,
        max_activation=1.0,
        activation_frequency=None,
    )


def _commit(
    job: VectorJob,
    training: Training,
    concept: "Concept",
    concepts: list["Concept"],
    reading_layer: int,
    path: Path,
) -> None:
    index = len(concepts) - 1
    previous = [] if job.new_space else list((training.stats or {}).get("concepts", []))
    entries = [*previous, stats_entry(index, concept)]
    fields = space_fields(training, concepts, reading_layer, path, entries)
    if job.new_space:
        fields.update(status=Training.Status.COMPLETED, completed_at=timezone.now(), error="")
        expected = {"status__in": [Training.Status.PENDING, Training.Status.RUNNING]}
    else:
        expected = {"status": Training.Status.COMPLETED}
    with transaction.atomic():
        if not Training.objects.filter(
            pk=training.pk, checkpoint_path=training.checkpoint_path, **expected
        ).update(**fields):
            raise _SpaceMoved
        if training.features.filter(label__iexact=concept.name).exists():
            raise InvalidInput(
                f"Vector space {training.pk} already has a concept named '{concept.name}'.", "name"
            )
        concept_feature(training, index, concept).save()
        if not VectorJob.objects.filter(pk=job.pk, status=Status.RUNNING).update(
            status=Status.COMPLETED,
            progress=1.0,
            report=job_report(concept, index),
            finished_at=timezone.now(),
        ):
            raise Abandoned


def fail(job: VectorJob, reason: str) -> bool:
    """Fail a queued or running job with its reason, and the space it started; False when it had ended."""
    with transaction.atomic():
        ended = VectorJob.objects.filter(pk=job.pk, status__in=ACTIVE).update(
            status=Status.FAILED, error=reason, finished_at=timezone.now()
        )
        if ended and job.new_space:
            Training.objects.filter(
                pk=job.training_id, status__in=[Training.Status.PENDING, Training.Status.RUNNING]
            ).update(status=Training.Status.FAILED, error=reason)
    return bool(ended)


def sweep_stale() -> int:
    """Fail the running jobs whose worker stopped: no heartbeat for STEERLAB_RUN_MAX_SECONDS (_Heartbeat writes
    it every second while a job is computed). Returns how many it failed."""
    silent_since = timezone.now() - timedelta(seconds=settings.STEERLAB_RUN_MAX_SECONDS)
    stale = VectorJob.objects.filter(status=Status.RUNNING, heartbeat_at__lt=silent_since)
    return sum(fail(job, WORKER_STOPPED) for job in stale.only("pk", "new_space", "training_id"))


def report(training: Training) -> dict:
    """A vector space's concepts (the separation report of each) and its jobs, newest first: what the API's
    training answer and the panel show while a concept is being made."""
    jobs = training.vector_jobs.order_by("-created_at", "-id")[:20]
    return {
        "concepts": (training.stats or {}).get("concepts", []) if isinstance(training.stats, dict) else [],
        "jobs": [
            {
                "id": job.pk,
                "name": job.name,
                "method": job.method,
                "tokens": job.tokens,
                "status": job.status,
                "progress": job.progress,
                "error": job.error,
                "report": job.report,
                "created_at": job.created_at.isoformat(),
                "finished_at": job.finished_at.isoformat() if job.finished_at else None,
            }
            for job in jobs
        ],
    }


def pairs_from_jsonl(text: str, field: str) -> list[list[str]]:
    """[[positive, negative], ...] from JSON Lines of {"positive": ..., "negative": ...} (blank lines skipped);
    InvalidInput naming the line (counted from 1) otherwise. The page's upload and make_vector read pairs so."""
    pairs = []
    for number, item in json_lines.read(text, field):
        if not isinstance(item, dict) or not {"positive", "negative"} <= item.keys():
            raise InvalidInput(f'Line {number} must be {{"positive": "...", "negative": "..."}}.', field)
        pairs.append([item["positive"], item["negative"]])
    return pairs
