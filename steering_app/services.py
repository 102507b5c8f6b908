"""Domain logic of steering runs: validation, creation, execution. Views, the API and the worker call this."""

import logging
import math
import os
import random
import socket
from datetime import timedelta
from collections.abc import Callable
from dataclasses import dataclass, field

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from steering_app.models import Feature, SteeringRun, Training

logger = logging.getLogger(__name__)

MAX_LAYERS = 20
MAX_FEATURES = 32
MAX_ABS_COEFFICIENT = 100.0
MAX_PROMPT_CHARS = 20_000
OOM_MESSAGE = "Out of memory during generation. Try reducing max_tokens or using fewer intervention layers."
Emit = Callable[[str, dict], None]


class SteeringError(Exception):
    """A request that cannot be served; `field` names the input at fault, when there is one."""

    status_code = 400

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.message = message
        self.field = field


class InvalidInput(SteeringError):
    status_code = 400


class NotFound(SteeringError):
    status_code = 404


class TrainingNotCompleted(SteeringError):
    status_code = 409


@dataclass
class SteeringRequest:
    training_id: int
    prompt: str
    features: list[dict]
    intervention_layers: list[int] = field(default_factory=list)
    method: str = SteeringRun.Method.ADDITIVE
    temperature: float = 0.7
    max_new_tokens: int = 64
    seed: int | None = None
    chat: bool = False
    model_id: int | None = None


def completed_training(training_id: int) -> Training:
    training = Training.objects.select_related("model", "dataset").filter(pk=training_id).first()
    if training is None:
        raise NotFound(f"Training {training_id} does not exist.", "training_id")
    if not training.is_completed:
        raise TrainingNotCompleted(
            f"Training {training_id} is {training.status}; steering needs a completed training.", "training_id"
        )
    return training


def validate_layers(layers: list[int], training: Training, method: str) -> list[int]:
    if not layers:
        raise InvalidInput("Select at least one intervention layer.", "intervention_layers")
    if len(set(layers)) > MAX_LAYERS:
        raise InvalidInput(f"At most {MAX_LAYERS} intervention layers.", "intervention_layers")
    num_layers = training.model.num_layers
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < num_layers:
            raise InvalidInput(
                f"Layer {layer} is out of range: {training.model.name} has layers 0..{num_layers - 1}.",
                "intervention_layers",
            )
    cleaned = sorted(set(layers))
    if method == SteeringRun.Method.MULTIPLICATIVE and cleaned != [training.hook_layer]:
        raise InvalidInput(
            f"Multiplicative steering acts only at the SAE's own layer {training.hook_layer}.", "intervention_layers"
        )
    return cleaned


def validate_features(features: list[dict], training: Training) -> list[dict]:
    if not features:
        raise InvalidInput("Add at least one feature.", "features")
    if len(features) > MAX_FEATURES:
        raise InvalidInput(f"At most {MAX_FEATURES} features.", "features")
    cleaned, seen = [], set()
    for item in features:
        index, coefficient = item.get("feature_id"), item.get("coefficient")
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise InvalidInput(f"feature_id must be a non-negative integer; got {index!r}.", "features")
        if isinstance(coefficient, bool) or not isinstance(coefficient, int | float):
            raise InvalidInput(f"Coefficient of feature {index} must be a number.", "features")
        if not math.isfinite(coefficient) or abs(coefficient) > MAX_ABS_COEFFICIENT:
            raise InvalidInput(
                f"Coefficient of feature {index} must be finite and within ±{MAX_ABS_COEFFICIENT:g}.", "features"
            )
        if index in seen:
            raise InvalidInput(f"Feature {index} is listed twice.", "features")
        seen.add(index)
        cleaned.append({"feature_id": index, "coefficient": float(coefficient)})
    known = set(Feature.objects.filter(training=training, index__in=seen).values_list("index", flat=True))
    missing = sorted(seen - known)
    if missing:
        raise InvalidInput(f"Features {missing} do not belong to training {training.pk}.", "features")
    return cleaned


def validate_numbers(request: SteeringRequest) -> None:
    if not isinstance(request.temperature, int | float) or not 0 <= request.temperature <= 2:
        raise InvalidInput("temperature must be between 0 and 2.", "temperature")
    cap = settings.STEERLAB_MAX_NEW_TOKENS
    if isinstance(request.max_new_tokens, bool) or not isinstance(request.max_new_tokens, int) or not (
        1 <= request.max_new_tokens <= cap
    ):
        raise InvalidInput(f"max_tokens must be between 1 and {cap}.", "max_tokens")
    if request.seed is not None and not 0 <= request.seed < 2**63:
        raise InvalidInput("seed must be a non-negative 63-bit integer.", "seed")
    if request.method not in SteeringRun.Method.values:
        raise InvalidInput("method must be additive or multiplicative.", "method")


def create_run(owner, request: SteeringRequest) -> SteeringRun:
    """Validate a steering request and store it as a queued run; nothing is written when it is invalid."""
    training = completed_training(request.training_id)
    if request.model_id is not None and request.model_id != training.model_id:
        raise InvalidInput(
            f"model_id {request.model_id} is not the model of training {training.pk} ({training.model_id}).",
            "model_id",
        )
    prompt = (request.prompt or "").strip()
    if not prompt:
        raise InvalidInput("Enter a prompt.", "prompt")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise InvalidInput(f"The prompt is longer than {MAX_PROMPT_CHARS} characters.", "prompt")
    validate_numbers(request)
    layers = validate_layers(request.intervention_layers, training, request.method)
    features = validate_features(request.features, training)
    seed = request.seed if request.seed is not None else random.randrange(2**31)
    return SteeringRun.objects.create(
        owner=owner,
        training=training,
        prompt=request.prompt,
        features=features,
        intervention_layers=layers,
        method=request.method,
        temperature=float(request.temperature),
        max_new_tokens=request.max_new_tokens,
        seed=seed,
        chat=request.chat,
    )


def claim_run(run_id: int) -> SteeringRun | None:
    """Move a queued run to running; None when another worker took it or it timed out meanwhile."""
    with transaction.atomic():
        taken = SteeringRun.objects.filter(pk=run_id, status=SteeringRun.Status.QUEUED).update(
            status=SteeringRun.Status.RUNNING, started_at=timezone.now()
        )
    if not taken:
        return None
    return SteeringRun.objects.select_related("training__model").get(pk=run_id)


def fail_run(run: SteeringRun, reason: str) -> None:
    run.status = SteeringRun.Status.FAILED
    run.error = reason
    run.finished_at = timezone.now()
    run.save(update_fields=["status", "error", "finished_at"])


def fail_stale_runs() -> int:
    """End runs that can no longer finish, so that none stays queued or running forever.

    A queued run no worker took within STEERLAB_RUN_TIMEOUT seconds, and a running one whose worker has been
    silent for STEERLAB_RUN_MAX_SECONDS (the process died mid-run), fail with the reason.
    """
    now = timezone.now()
    queued = SteeringRun.objects.filter(
        status=SteeringRun.Status.QUEUED, created_at__lt=now - timedelta(seconds=settings.STEERLAB_RUN_TIMEOUT)
    ).update(status=SteeringRun.Status.FAILED, error="no worker available", finished_at=now)
    abandoned = SteeringRun.objects.filter(
        status=SteeringRun.Status.RUNNING, started_at__lt=now - timedelta(seconds=settings.STEERLAB_RUN_MAX_SECONDS)
    ).update(status=SteeringRun.Status.FAILED, error="the worker stopped before finishing", finished_at=now)
    return queued + abandoned


def steering_spec(run: SteeringRun):
    from steering_app.engine.steer import SteeringSpec

    indices = [item["feature_id"] for item in run.features]
    scales = {
        feature.index: feature.steering_scale
        for feature in Feature.objects.filter(training=run.training, index__in=indices)
    }
    return SteeringSpec(
        method=run.method,
        features=tuple((item["feature_id"], item["coefficient"]) for item in run.features),
        layers=tuple(run.intervention_layers),
        feature_scales=scales,
    )


def execute(run: SteeringRun, emit: Emit) -> None:
    from steering_app import engine
    from steering_app.engine import loader

    training = run.training
    lm = loader.load_model(training.model.source)
    sae = loader.load_sae_cached(training.checkpoint_path, lm)

    def on_step(unsteered_delta: str, steered_delta: str) -> None:
        emit("delta", {"unsteered": unsteered_delta, "steered": steered_delta})

    result = engine.run_comparison(
        lm,
        sae,
        prompt=run.prompt,
        spec=steering_spec(run),
        temperature=run.temperature,
        max_new_tokens=run.max_new_tokens,
        seed=run.seed,
        chat=run.chat,
        on_step=on_step,
        sae_layer=training.hook_layer,
    )
    run.unsteered_output = result.unsteered_text
    run.steered_output = result.steered_text
    run.metrics = result.metrics
    # Which worker ran it: the run page shows it, and scale-out tests check that the work was shared.
    run.timings = {**result.timings, "worker": f"{socket.gethostname()}:{os.getpid()}"}


def finite_json(value):
    """JSON columns refuse NaN and infinities (SQLite and PostgreSQL alike): store them as null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite_json(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [finite_json(item) for item in value]
    return value


def complete_run(run: SteeringRun) -> bool:
    """Store the results unless the run was ended meanwhile (timed out by a waiting caller)."""
    return bool(
        SteeringRun.objects.filter(pk=run.pk, status=SteeringRun.Status.RUNNING).update(
            status=SteeringRun.Status.COMPLETED,
            finished_at=timezone.now(),
            unsteered_output=run.unsteered_output,
            steered_output=run.steered_output,
            metrics=finite_json(run.metrics),
            timings=finite_json(run.timings),
        )
    )


def claim_next_run() -> SteeringRun | None:
    """Take the oldest queued run, whichever it is; None when there is none left."""
    queued = SteeringRun.objects.filter(status=SteeringRun.Status.QUEUED).order_by("created_at", "id")
    for run_id in queued.values_list("id", flat=True)[:20]:
        run = claim_run(run_id)
        if run is not None:
            return run
    return None


def run_steering(run_id: int, emit: Emit) -> SteeringRun | None:
    """Execute one queued run end to end. The run always ends completed or failed."""
    run = claim_run(run_id)
    return process_run(run, emit) if run is not None else None


def process_run(run: SteeringRun, emit: Emit) -> SteeringRun:
    """Execute a claimed (running) run and store its outcome; emit reports progress to its watchers."""
    run_id = run.pk
    emit("started", {})
    try:
        execute(run, emit)
        completed = complete_run(run)
    except Exception as error:  # noqa: BLE001 - any failure must end the run, with its reason
        reason = failure_reason(error)
        logger.exception("Steering run %s failed: %s", run_id, reason)
        fail_run(run, reason)
        emit("failed", {"error": reason})
        return run
    run.refresh_from_db()
    emit("completed" if completed else run.status, {"error": run.error})
    return run


def failure_reason(error: Exception) -> str:
    if is_out_of_memory(error):
        return OOM_MESSAGE
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def is_out_of_memory(error: Exception) -> bool:
    import torch

    return isinstance(error, torch.OutOfMemoryError | MemoryError)
