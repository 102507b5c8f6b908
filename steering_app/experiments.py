"""Experiments: create one (validated whole, or nothing is written), cancel it, resume it, and read its scores.

An experiment runs every (condition, prompt, seed) cell as one sweep run through runs.py, so its cells share
the batched engine's steps with each other and with everyone's runs. Cells wait behind interactive runs
(runs.next_in_turn), so a comparison submitted during a long experiment starts at the next free rows.
Each cell's outputs are stored once as it completes (experiment_results.py); a resume runs only the cells
that have none.
"""

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from steering_app import experiment_results, experiment_stats, runs, services, wake
from steering_app.errors import Conflict, InvalidInput, WorkerUnavailable
from steering_app.limits import MAX_PROMPT_CHARS, MAX_SEED
from steering_app.models import Experiment, Feature, PromptSet, SteeringRun, Training
from steering_app.steering_settings import SteeringSettings, is_integer, max_variants

logger = logging.getLogger(__name__)

DEFAULT_STRENGTHS = (0.0, 0.5, 1.0, 2.0, 4.0)
MAX_CONDITIONS = 16
MAX_SEEDS = 16
MAX_NAME_CHARS = 200  # Experiment.name's column
# How many "work is waiting" messages a new experiment sends: one wakes each idle worker (channel mode).
WAKE_MESSAGES = 16


@dataclass(frozen=True)
class ExperimentRequest:
    """What the API and the form send; field names and limits are those of a run's (generate's)."""

    training_id: int
    conditions: list = field(default_factory=list)  # [{"features": [{"feature_id", "coefficient"}]}]
    intervention_layers: list = field(default_factory=list)
    method: str = SteeringRun.Method.ADDITIVE
    strengths: list | None = None
    prompt_set_id: int | None = None
    prompts: list | None = None
    seeds: object = 1  # how many seeds per prompt (0..n-1), or the seeds themselves
    max_tokens: int = 48
    temperature: float = 0.7
    chat: bool = False
    private: bool = False
    model_id: int | None = None
    name: str = ""


def create(owner, request: ExperimentRequest, wake: bool = True) -> Experiment:
    """Validate the whole request, store the experiment and its cells as queued runs, and wake the workers
    (unless the caller processes the queue itself: `manage.py run_experiment`). InvalidInput (naming the
    field) writes nothing; WorkerUnavailable when no worker can be told."""
    training = Training.objects.get_completed(request.training_id, request.model_id)
    name = request.name or ""
    if not isinstance(name, str) or len(name) > MAX_NAME_CHARS:
        raise InvalidInput(f"name must be text of at most {MAX_NAME_CHARS} characters.", "name")
    strengths = _strengths(request.strengths)
    steered = [strength for strength in strengths if strength != 0]
    conditions = _conditions(request, training, steered)
    prompts, prompt_set = _prompts(request)
    seeds = _seeds(request.seeds)
    outputs = len(conditions) * len(prompts) * len(seeds) * len(strengths)
    cap = settings.STEERLAB_MAX_EXPERIMENT_OUTPUTS
    if outputs > cap:
        raise InvalidInput(
            f"This experiment asks for {outputs} outputs (conditions x prompts x seeds x strengths); the most is "
            f"{cap} (STEERLAB_MAX_EXPERIMENT_OUTPUTS).",
            "prompts",
        )
    settings_ = conditions[0][1]
    for index, prompt in enumerate(prompts):
        _check_prompt(training, prompt, index, bool(request.chat), settings_.max_tokens)
    with transaction.atomic():
        experiment = Experiment.objects.create(
            owner=owner,
            private=bool(request.private),
            name=name.strip(),
            training=training,
            method=settings_.method,
            intervention_layers=settings_.layers,
            conditions=[{"features": cleaned.features} for _raw, cleaned in conditions],
            strengths=strengths,
            prompt_set=prompt_set,
            prompts=prompts,
            seeds=seeds,
            max_new_tokens=settings_.max_tokens,
            temperature=settings_.temperature,
            chat=bool(request.chat),
        )
        _queue_cells(experiment, experiment_results.all_cells(experiment))
    if wake:
        _wake_workers(experiment)
    return experiment


def _strengths(strengths: object) -> list[float]:
    if strengths is None:
        return list(DEFAULT_STRENGTHS)
    if not isinstance(strengths, list | tuple) or not strengths:
        raise InvalidInput("strengths must list at least one multiplier.", "strengths")
    if not all(is_integer(item) or isinstance(item, float) for item in strengths):
        raise InvalidInput("Each strength must be a number.", "strengths")
    if not all(math.isfinite(item) for item in strengths):
        raise InvalidInput("Each strength must be a finite number.", "strengths")
    cleaned = sorted({float(item) for item in strengths})
    if len(cleaned) != len(strengths):
        raise InvalidInput("A strength is listed twice.", "strengths")
    steered = [item for item in cleaned if item != 0]
    if not steered:
        raise InvalidInput("strengths needs at least one nonzero multiplier (0 is the control).", "strengths")
    variants = max_variants()
    if len(steered) > variants:
        raise InvalidInput(
            f"At most {variants} nonzero strengths: each is a steered row of the worker's batch.", "strengths"
        )
    return cleaned


def _conditions(request: ExperimentRequest, training: Training, steered: list[float]):
    """[(raw, cleaned SteeringSettings)] of each condition, checked as a run's settings with the sweep of the
    experiment's nonzero strengths (so every scaled coefficient stays within the training's limit)."""
    conditions = request.conditions
    if not isinstance(conditions, list | tuple) or not conditions:
        raise InvalidInput("conditions must list at least one condition.", "conditions")
    if len(conditions) > MAX_CONDITIONS:
        raise InvalidInput(f"At most {MAX_CONDITIONS} conditions.", "conditions")
    known = set(Feature.objects.filter(training=training).values_list("index", flat=True))
    cleaned = []
    for number, condition in enumerate(conditions, start=1):
        if not isinstance(condition, Mapping):
            raise InvalidInput(f'Condition {number} must be {{"features": [...]}}.', "conditions")
        steering = SteeringSettings.from_fields(
            {
                "features": condition.get("features"),
                "intervention_layers": request.intervention_layers,
                "method": request.method,
                "temperature": request.temperature,
                "max_tokens": request.max_tokens,
                "sweep": steered,
            }
        )
        try:
            valid = steering.validate(training, known)
            services.check_steering_scales(training, valid.features)
        except InvalidInput as error:
            # The shared fields (layers, method, temperature, max_tokens) name themselves; a condition's
            # features are "conditions" here, and the sweep of its strengths is "strengths".
            field_name = {"features": "conditions", "sweep": "strengths"}.get(error.field)
            if field_name is None:
                raise
            raise InvalidInput(f"Condition {number}: {error.message}", field_name) from error
        cleaned.append((condition, valid))
    return cleaned


def _prompts(request: ExperimentRequest) -> tuple[list[str], PromptSet | None]:
    if request.prompt_set_id is not None and request.prompts is not None:
        raise InvalidInput("Give prompt_set_id or prompts, not both.", "prompts")
    prompt_set = None
    prompts = request.prompts
    if request.prompt_set_id is not None:
        if not is_integer(request.prompt_set_id):
            raise InvalidInput("prompt_set_id must be an integer.", "prompt_set_id")
        prompt_set = PromptSet.objects.filter(pk=request.prompt_set_id).first()
        if prompt_set is None:
            raise InvalidInput(f"Prompt set {request.prompt_set_id} does not exist.", "prompt_set_id")
        return clean_prompts(prompt_set.prompts, "prompt_set_id"), prompt_set
    return clean_prompts(prompts), prompt_set


def clean_prompts(prompts: object, field_name: str = "prompts") -> list[str]:
    """Stripped, distinct, non-empty prompts; InvalidInput naming the field otherwise (the held-out split is
    by prompt text, so a repeated prompt would count twice in one half)."""
    if not isinstance(prompts, list | tuple) or not prompts:
        raise InvalidInput("The prompt set is empty: give at least one prompt.", field_name)
    cleaned: list[str] = []
    for number, prompt in enumerate(prompts, start=1):
        if not isinstance(prompt, str) or not prompt.strip():
            raise InvalidInput(f"Prompt {number} is empty.", field_name)
        if len(prompt) > MAX_PROMPT_CHARS:
            raise InvalidInput(f"Prompt {number} is longer than {MAX_PROMPT_CHARS} characters.", field_name)
        text = prompt.strip()
        if text in cleaned:
            raise InvalidInput(f"Prompt {number} repeats prompt {cleaned.index(text) + 1}.", field_name)
        cleaned.append(text)
    return cleaned


def _seeds(seeds: object) -> list[int]:
    if is_integer(seeds):
        if not 1 <= seeds <= MAX_SEEDS:
            raise InvalidInput(f"seeds must be between 1 and {MAX_SEEDS}.", "seeds")
        return list(range(seeds))
    listed = isinstance(seeds, list | tuple) and 1 <= len(seeds) <= MAX_SEEDS
    if (
        listed
        and all(is_integer(seed) and 0 <= seed <= MAX_SEED for seed in seeds)
        and len(set(seeds)) == len(seeds)
    ):
        return list(seeds)
    raise InvalidInput(
        f"seeds must be a count (1 to {MAX_SEEDS}) or a list of up to {MAX_SEEDS} distinct non-negative seeds.",
        "seeds",
    )


def _check_prompt(training: Training, prompt: str, index: int, chat: bool, max_tokens: int) -> None:
    try:
        services.check_prompt_fits(training, prompt, chat, max_tokens)
    except InvalidInput as error:
        raise InvalidInput(f"Prompt {index + 1}: {error.message}", error.field) from error


def _queue_cells(experiment: Experiment, cells) -> int:
    """Store the given cells as queued sweep runs of the experiment's owner, in the order they should run."""
    steered = [strength for strength in experiment.strengths if strength != 0]
    created = SteeringRun.objects.bulk_create(
        [
            SteeringRun(
                owner_id=experiment.owner_id,
                training_id=experiment.training_id,
                prompt=experiment.prompts[prompt_index],
                features=experiment.conditions[condition]["features"],
                intervention_layers=experiment.intervention_layers,
                method=experiment.method,
                temperature=experiment.temperature,
                max_tokens=experiment.max_new_tokens,
                seed=seed,
                chat=experiment.chat,
                sweep=steered,
                private=experiment.private,
                experiment=experiment,
                cell_condition=condition,
                cell_prompt=prompt_index,
                created_at=timezone.now(),
            )
            for condition, prompt_index, seed in cells
        ]
    )
    return len(created)


def _wake_workers(experiment: Experiment) -> None:
    """Tell the workers that cells wait: one message per idle worker to be (channel mode spreads them)."""
    try:
        for _ in range(min(WAKE_MESSAGES, experiment.total_cells)):
            wake.workers()
            if settings.STEERLAB_WORKER_MODE != "channel":
                break  # one embedded or inline worker drains the whole queue
    except Exception as error:
        logger.exception("Could not hand experiment %s to a worker", experiment.pk)
        cells = SteeringRun.objects.filter(experiment=experiment)
        for pk in cells.filter(status__in=runs.ACTIVE).values_list("pk", flat=True):
            runs.fail(pk, runs.NO_WORKER)
        experiment_results.refresh(experiment)
        raise WorkerUnavailable("No steering worker is available; try again later.") from error


def cancel(experiment: Experiment, user) -> None:
    """Stop it: queued cells end cancelled at once, running ones within a step; finished cells stay."""
    experiment.check_can_change(user, "cancel it")
    if experiment.is_finished:
        raise Conflict(f"Experiment {experiment.pk} is already {experiment.status}.", "experiment_id")
    Experiment.objects.filter(pk=experiment.pk).update(cancel_requested_at=timezone.now())
    experiment.cancel_requested_at = timezone.now()
    cells = SteeringRun.objects.filter(experiment=experiment, status__in=runs.ACTIVE)
    for pk in cells.values_list("pk", flat=True):
        runs.cancel(pk, "the experiment was cancelled")
    experiment_results.cell_ended(experiment.pk)
    experiment.refresh_from_db()


def resume(experiment: Experiment, user) -> int:
    """Run again the cells that have no stored outputs (failed or cancelled ones); returns how many.
    Conflict while it runs or when nothing is missing."""
    experiment.check_can_change(user, "resume it")
    experiment_results.refresh(experiment)
    if not experiment.is_finished:
        raise Conflict(
            f"Experiment {experiment.pk} is {experiment.status}: it is still running.", "experiment_id"
        )
    stored = experiment_results.stored_cells(experiment)
    missing = [cell for cell in experiment_results.all_cells(experiment) if cell not in stored]
    if not missing:
        raise Conflict(f"Experiment {experiment.pk} has every output: nothing to resume.", "experiment_id")
    with transaction.atomic():
        Experiment.objects.filter(pk=experiment.pk).update(
            status=Experiment.Status.QUEUED,
            error="",
            cancel_requested_at=None,
            started_at=None,
            finished_at=None,
        )
        _queue_cells(experiment, missing)
    experiment.refresh_from_db()
    _wake_workers(experiment)
    return len(missing)


def result_rows(experiment: Experiment) -> list[dict]:
    """Every stored output as a plain row (the exports' and the statistics' input)."""
    prompts = experiment.prompts
    return [
        {
            "condition": row.condition,
            "prompt_index": row.prompt_index,
            "prompt": prompts[row.prompt_index],
            "seed": row.seed,
            "strength": row.strength,
            "text": row.text,
            "score": row.score,
            "concept": row.concept,
            "fluency": row.fluency,
            "relevance": row.relevance,
            "scores": row.scores,
            "metrics": row.metrics,
            "run_id": row.run_id,
        }
        for row in experiment.results.all()
    ]


def report(experiment: Experiment) -> dict:
    """What the page and the API show: status, progress, and per (condition, strength) means with intervals,
    and each condition's best strength chosen on one half of the prompts and scored on the other."""
    experiment_results.refresh(experiment)
    rows = result_rows(experiment)
    return {
        "status": experiment.status,
        "error": experiment.error,
        "progress": experiment_results.progress(experiment),
        "summary": experiment_stats.summarize(rows),
        "best": experiment_stats.best_strengths(rows),
    }
