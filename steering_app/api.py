"""JSON API of the steering app: trainings, features, models, steering runs, experiments, prompt sets.
Mounted at /api/."""

from asgiref.sync import sync_to_async
from django.conf import settings
from django.http import HttpResponse
from ninja import Path, Query, Router, Status
from ninja.errors import HttpError, ValidationError
from ninja.signature.utils import get_path_param_names
from pydantic import ValidationError as PydanticValidationError

from steering_app import (
    analysis,
    conversations,
    experiment_results,
    experiments,
    exports,
    feature_search,
    prompt_sets,
    runs,
    services,
    vector_jobs,
)
from steering_app.errors import Conflict, Forbidden, InvalidInput, NotFound
from steering_app.limits import MAX_ID, MAX_INDEX, MAX_PAGE, MAX_SEARCH_CHARS, MAX_SEED
from steering_app.models import (
    Conversation,
    Experiment,
    Feature,
    LanguageModel,
    PromptSet,
    SteeringRun,
    Training,
)
from steering_app.schemas import (
    NO_NUL,
    ActiveFeaturesIn,
    ActiveFeaturesOut,
    CompletedTrainingPage,
    ContinueIn,
    ControlVectorIn,
    ConversationCreated,
    ConversationIn,
    ConversationOut,
    ConversationPage,
    ExperimentAccepted,
    ExperimentIn,
    ExperimentOut,
    ExperimentPage,
    ExperimentResumed,
    FeaturePage,
    GenerateAccepted,
    GenerateIn,
    GenerateOut,
    MessageIn,
    ModelOut,
    PrivacyPatch,
    PromptSetIn,
    PromptSetOut,
    PromptSetPage,
    RunOut,
    RunPage,
    TrainingOut,
    TurnAccepted,
    TurnResultOut,
    VectorAccepted,
    VectorIn,
    error_responses,
)
from steering_app.steering_settings import SteeringSettings
from steerproject.safejson import SafeJSONParser

router = Router(tags=["steering"])

Id = Path(..., ge=1, le=MAX_ID)
Limit = Query(100, ge=1, le=MAX_PAGE)
Offset = Query(0, ge=0, le=MAX_ID)
JSONL = "application/jsonl"


def page(queryset, limit: int, offset: int) -> tuple[list, int]:
    return list(queryset[offset : offset + limit]), queryset.count()


@router.get("/trainings/completed", response={200: CompletedTrainingPage, **error_responses()})
def list_completed_trainings(request, limit: int = Limit, offset: int = Offset):
    """Completed trainings, newest first: the feature spaces one can steer with (SAEs, and steering-vector spaces
    with encoder_type "vectors")."""
    trainings, total = page(Training.objects.completed().order_by("-created_at", "-id"), limit, offset)
    return {
        "trainings": [
            {
                "id": training.pk,
                "encoder_type": training.encoder_type,
                "model_id": training.model_id,
                "model_name": training.model.name,
                "dataset_name": training.dataset.name if training.dataset_id else None,
                "hook_layer": training.hook_layer,
                "created_at": training.created_at,
            }
            for training in trainings
        ],
        "total": total,
        "limit": limit,
        "offset": offset,
    }


def get_training(training_id: int) -> Training:
    training = Training.objects.select_related("model", "dataset").filter(pk=training_id).first()
    if training is None:
        raise NotFound(f"Training {training_id} does not exist.", "training_id")
    return training


@router.get("/trainings/{training_id}", response={200: TrainingOut, **error_responses(404)})
def get_training_detail(request, training_id: int = Id):
    training = get_training(training_id)
    return {
        "id": training.pk,
        "model_id": training.model_id,
        "model_name": training.model.name,
        "dataset_id": training.dataset_id,
        "dataset_name": training.dataset.name if training.dataset_id else None,
        "encoder_type": training.encoder_type,
        "hook_layer": training.hook_layer,
        "hook_name": training.hook_name,
        "d_in": training.d_in,
        "d_sae": training.d_sae,
        "stats": training.stats,
        "calibrated": training.is_calibrated,
        "max_abs_coefficient": training.max_abs_coefficient,
        "status": training.status,
        "error": training.error,
        "created_at": training.created_at,
        "completed_at": training.completed_at,
        "vectors": vector_jobs.report(training) if training.is_vector_space else None,
    }


@router.post("/vectors", response={202: VectorAccepted, **error_responses(404, 409, 503)})
def create_vector(request, payload: VectorIn):
    """Make a steering vector from examples: a new vector space on `model_id`, or a concept added to the space
    `training_id`. The worker reads the examples (progress and then the separation report in GET
    /api/trainings/{training_id}); the space changes only once the whole concept is made."""
    job = vector_jobs.create(request.auth, **payload.model_dump())
    return Status(202, {"training_id": job.training_id, "job_id": job.pk})


@router.get("/trainings/{training_id}/features", response={200: FeaturePage, **error_responses(404)})
def list_features(
    request,
    training_id: int = Id,
    search: str = Query(
        "",
        max_length=MAX_SEARCH_CHARS,
        pattern=NO_NUL,
        description="Words or a topic, or an index; ranked best first, as the panel's search ranks them.",
    ),
    limit: int = Limit,
    offset: int = Offset,
):
    """A training's features by index; `search` ranks matches: the exact index, the exact label, then the
    features whose label, top tokens and description are nearest the query in meaning (the sentence
    embedder's similarity), raised by a word match in the label (case-insensitive)."""
    training = get_training(training_id)
    if search.strip():
        features, total = feature_search.search(training, search, offset, limit)
    else:
        features, total = page(Feature.objects.filter(training=training).order_by("index"), limit, offset)
    return {
        "features": [
            {
                "index": feature.index,
                "label": feature.label,
                "description": feature.description,
                "max_activation": feature.max_activation,
                "activation_frequency": feature.activation_frequency,
            }
            for feature in features
        ],
        "total": total,
        "limit": limit,
        "offset": offset,
    }


@router.post(
    "/trainings/{training_id}/features/active",
    response={200: ActiveFeaturesOut, **error_responses(404, 409, 503)},
)
async def list_active_features(request, payload: ActiveFeaturesIn, training_id: int = Id):
    """The training's features the prompt lights up, strongest for themselves first: one clean forward of the
    prompt to the SAE's layer, each feature's strongest activation over the prompt's own tokens (special tokens
    and a chat template's system turn left out), ranked by activation ÷ its max activation; features with no
    recorded max activation come after, by activation.

    The prompt must fit a worker's slots (a 400 naming `prompt` says how many tokens they hold). A worker reads
    it between two steps of its batch; after STEERLAB_RUN_TIMEOUT seconds without an answer, a 503."""
    training = await sync_to_async(Training.objects.get_completed)(training_id)
    found = await analysis.features_active_on(
        request.auth, training, payload.prompt, chat=payload.chat, limit=payload.limit
    )
    return {
        "features": [
            {
                "index": item.index,
                "label": item.feature.label if item.feature else "",
                "activation": item.activation,
                "token": item.token,
                "max_activation": item.feature.max_activation if item.feature else None,
                "relative_activation": item.relative_activation,
                "activation_frequency": item.feature.activation_frequency if item.feature else None,
            }
            for item in found
        ]
    }


@router.get("/models/{model_id}", response={200: ModelOut, **error_responses(404)})
def get_model(request, model_id: int = Id):
    model = LanguageModel.objects.filter(pk=model_id).first()
    if model is None:
        raise NotFound(f"Model {model_id} does not exist.", "model_id")
    return model


def run_request(payload: GenerateIn) -> runs.RunRequest:
    return runs.RunRequest(
        training_id=payload.training_id,
        model_id=payload.model_id,
        prompt=payload.prompt,
        settings=SteeringSettings.from_fields(payload.model_dump()),
        seed=payload.seed,
        chat=payload.chat,
        private=payload.private,
    )


@router.post(
    "/steering/generate",
    response={200: GenerateOut, 202: GenerateAccepted, **error_responses(403, 404, 409, 429, 503, 507)},
)
async def generate(
    request,
    payload: GenerateIn,
    run_async: bool = Query(
        False, alias="async", description="Answer 202 {run_id} at once instead of waiting."
    ),
):
    """Generate unsteered and steered text side by side, with metrics.

    Waits up to STEERLAB_RUN_TIMEOUT seconds for the worker (503 after that, and the run is cancelled:
    the worker stops it within one step, keeping the text so far);
    with `?async=true` it answers 202 at once: poll GET /api/steering/runs/{run_id}.
    """
    run = await sync_to_async(runs.create)(request.auth, run_request(payload))
    await sync_to_async(runs.submit)(run)
    if run_async:
        return Status(202, {"run_id": run.pk})

    run = await finished(run)
    return {
        "run_id": run.pk,
        "unsteered_output": run.unsteered_output,
        "steered_output": run.steered_output,
        "seed": run.seed,
        "metrics": run.metrics,
        "variants": run.variants,
    }


async def finished(run: SteeringRun) -> SteeringRun:
    """The run once completed; its other endings as the errors generate documents (the turns of a conversation
    answer the same)."""
    timeout = settings.STEERLAB_RUN_TIMEOUT
    run = await runs.wait(run.pk, timeout)
    if not run.is_finished:
        # The same path as the Stop button: the worker stops within one step and is free for the next run.
        await sync_to_async(runs.cancel)(run.pk, f"timed out after {timeout} s")
        picked = "did not finish" if run.started_at else "was not picked up by a worker"
        raise HttpError(503, f"Run {run.pk} {picked} within {timeout} s; it was cancelled.")
    if run.status == SteeringRun.Status.CANCELLED:
        raise HttpError(409, f"Run {run.pk} was cancelled ({run.error}).")
    if run.status == SteeringRun.Status.FAILED:
        if run.error_field:  # the worker refused the request: the caller's input, as at creation
            raise InvalidInput(f"Run {run.pk} was refused: {run.error}", run.error_field)
        if run.error == runs.OOM_MESSAGE:
            raise HttpError(507, runs.OOM_MESSAGE)
        if run.started_at is None:
            raise HttpError(503, f"Run {run.pk} was not picked up by a worker: {run.error}")
        raise HttpError(500, f"Run {run.pk} failed: {run.error}")
    return run


def run_out(run: SteeringRun) -> dict:
    return {
        "id": run.pk,
        "owner": run.owner.get_username(),
        "private": run.private,
        "status": run.status,
        "settings": {
            "training_id": run.training_id,
            "model_id": run.training.model_id,
            "prompt": run.prompt,
            "features": run.features,
            "intervention_layers": run.intervention_layers,
            "temperature": run.temperature,
            "max_tokens": run.max_tokens,
            "seed": run.seed,
            "method": run.method,
            "chat": run.chat,
            "sweep": run.sweep,
        },
        "unsteered_output": run.unsteered_output,
        "steered_output": run.steered_output,
        "metrics": run.metrics or None,
        "variants": run.variants,
        "error": run.error,
        "timings": run.timings,
        "worker": run.worker,
        "heartbeat_at": run.heartbeat_at,
        "cancel_requested": run.cancel_requested_at is not None,
        "created_at": run.created_at,
        "started_at": run.started_at,
        "finished_at": run.finished_at,
    }


def visible_runs(user):
    return SteeringRun.objects.visible_to(user).select_related("owner", "training")


def get_visible_run(user, run_id: int) -> SteeringRun:
    """A run the caller may not read (another member's private run) is a 404, like an unknown one: its
    existence is not the caller's business."""
    run = visible_runs(user).filter(pk=run_id).first()
    if run is None:
        raise NotFound(f"Run {run_id} does not exist.", "run_id")
    return run


def shared_record_routes(path: str, *, fetch, out: tuple, update_doc: str, delete_doc: str) -> None:
    """PATCH {private} and DELETE on a record its owner shares with the lab (a run, an experiment): the same
    rules for every kind, through the record's own set_private and delete_by. `path` ends in the record's id
    parameter ("{run_id}"), which the two routes take under that name; `out` is (schema, serializer)."""
    id_name = get_path_param_names(path).pop()
    kind = id_name.removesuffix("_id")
    schema, serialize = out

    def update(request, payload: PrivacyPatch, **path_params):
        record = fetch(request.auth, path_params[id_name])
        record.set_private(request.auth, payload.private)
        return serialize(record)

    def delete(request, **path_params):
        fetch(request.auth, path_params[id_name]).delete_by(request.auth)
        return Status(204, None)

    for view, verb, doc in ((update, "update", update_doc), (delete, "delete", delete_doc)):
        view.__name__, view.__doc__ = f"{verb}_{kind}", doc  # the operation id and description of before
        view._ninja_contribute_args = [(id_name, int, Id)]  # ninja's hook for a parameter a factory adds
    router.patch(path, response={200: schema, **error_responses(403, 404)})(update)
    router.delete(path, response={204: None, **error_responses(403, 404, 409)})(delete)


@router.get("/steering/runs/{run_id}", response={200: RunOut, **error_responses(404)})
def get_run(request, run_id: int = Id):
    """One run: status, the settings that made it, outputs, metrics and error. Every member reads the
    shared runs; a private run only its owner and staff (404 for anyone else)."""
    return run_out(get_visible_run(request.auth, run_id))


shared_record_routes(
    "/steering/runs/{run_id}",
    fetch=get_visible_run,
    out=(RunOut, run_out),
    update_doc="Make a run private (only its owner and staff read it) or share it with the lab; owner or staff only.",
    delete_doc="Delete a finished run (owner or staff only); stop a queued or running one first (409 until then).",
)


@router.get("/steering/runs", response={200: RunPage, **error_responses()})
def list_runs(
    request,
    limit: int = Query(20, ge=1, le=MAX_PAGE),
    offset: int = Offset,
    everyone: bool = Query(
        False, alias="all", description="Every run you may read (the lab's shared runs; staff: all runs)."
    ),
    training_id: int | None = Query(None, ge=1, le=MAX_ID, description="Only runs of this training."),
    feature_id: int | None = Query(
        None, ge=0, le=MAX_INDEX, description="Only runs that steer this feature."
    ),
    experiment_id: int | None = Query(
        None, ge=1, le=MAX_ID, description="The cells of this experiment (left out of the list otherwise)."
    ),
):
    """The caller's runs, newest first; `all=true`: every run the caller may read. An experiment's cells are
    listed only with experiment_id: a large experiment would bury everything else."""
    visible = visible_runs(request.auth)
    queryset = visible if everyone else visible.filter(owner=request.auth)
    queryset = queryset.filter(experiment_id=experiment_id)  # None: the runs outside experiments
    if training_id is not None:
        queryset = queryset.filter(training_id=training_id)
    if feature_id is not None:
        queryset = queryset.steering_feature(feature_id)
    found, total = page(queryset.order_by("-created_at", "-id"), limit, offset)
    return {"runs": [run_out(run) for run in found], "total": total, "limit": limit, "offset": offset}


@router.post("/steering/runs/{run_id}/cancel", response={200: RunOut, **error_responses(403, 404, 409)})
def cancel_run(request, run_id: int = Id):
    """Stop a queued or running run (its owner or staff). It ends `cancelled` with the text generated so
    far: at once when queued, within one model step when running (until then `cancel_requested` is true)."""
    run = get_visible_run(request.auth, run_id)
    if not run.can_change(request.auth):
        raise Forbidden("Only the run's owner or staff can cancel it.", "run_id")
    if run.is_finished:
        raise Conflict(f"Run {run_id} has already ended ({run.status}).", "run_id")
    runs.cancel(run.pk, f"cancelled by {request.auth.get_username()}")
    run.refresh_from_db()
    return run_out(run)


def visible_conversations(user):
    return Conversation.objects.visible_to(user).select_related("owner", "training")


def get_visible_conversation(user, conversation_id: int) -> Conversation:
    """As for runs: another member's private conversation is a 404, like an unknown one."""
    conversation = visible_conversations(user).filter(pk=conversation_id).first()
    if conversation is None:
        raise NotFound(f"Conversation {conversation_id} does not exist.", "conversation_id")
    return conversation


def conversation_item(conversation: Conversation) -> dict:
    return {
        "id": conversation.pk,
        "owner": conversation.owner.get_username(),
        "private": conversation.private,
        "history_mode": conversation.history_mode,
        "system_prompt": conversation.system_prompt,
        "training_id": conversation.training_id,
        "model_id": conversation.training.model_id,
        "created_at": conversation.created_at,
        "updated_at": conversation.updated_at,
    }


def conversation_out(conversation: Conversation) -> dict:
    return {
        **conversation_item(conversation),
        "turns": [
            {
                "turn": run.turn,
                "user": run.prompt,
                "unsteered_output": run.unsteered_output,
                "steered_output": run.steered_output,
                "run_id": run.pk,
                "status": run.status,
                "settings": {
                    "features": run.features,
                    "intervention_layers": run.intervention_layers,
                    "method": run.method,
                    "temperature": run.temperature,
                    "max_tokens": run.max_tokens,
                    "seed": run.seed,
                },
            }
            for run in conversation.turns()
        ],
    }


@router.post("/conversations", response={201: ConversationCreated, **error_responses(404, 409)})
def create_conversation(request, payload: ConversationIn):
    """Start a conversation (chat mode) with the settings of its first turn; the training's model must have a
    chat template (else a 400 naming training_id). Nothing is generated until the first message."""
    fields = payload.model_dump()
    conversation = conversations.create(
        request.auth,
        conversations.ConversationRequest(
            training_id=payload.training_id,
            model_id=payload.model_id,
            system_prompt=payload.system_prompt,
            history_mode=payload.history_mode,
            private=payload.private,
            settings=SteeringSettings.from_fields(fields),
        ),
    )
    return Status(201, {"id": conversation.pk})


@router.get("/conversations", response={200: ConversationPage, **error_responses()})
def list_conversations(request, limit: int = Query(20, ge=1, le=MAX_PAGE), offset: int = Offset):
    """Every conversation the caller may read (the lab's shared ones and their own), latest activity first."""
    found, total = page(visible_conversations(request.auth), limit, offset)
    return {
        "conversations": [conversation_item(conversation) for conversation in found],
        "total": total,
        "limit": limit,
        "offset": offset,
    }


@router.get("/conversations/{conversation_id}", response={200: ConversationOut, **error_responses(404)})
def get_conversation(request, conversation_id: int = Id):
    """Its system prompt, history mode and every turn: the user's message, both replies, the run and the
    settings it used. Every member reads the shared ones; a private one only its owner and staff."""
    return conversation_out(get_visible_conversation(request.auth, conversation_id))


shared_record_routes(
    "/conversations/{conversation_id}",
    fetch=get_visible_conversation,
    out=(ConversationOut, conversation_out),
    update_doc="Make a conversation private (it and every turn: only its owner and staff read them) or share "
    "it with the lab; owner or staff only.",
    delete_doc="Delete a conversation with every turn (owner or staff only); stop a turn in progress first.",
)

TURN_RESPONSES = {200: TurnResultOut, 202: TurnAccepted, **error_responses(403, 404, 409, 429, 503, 507)}
RunAsync = Query(False, alias="async", description="Answer 202 {turn, run_id} at once instead of waiting.")


async def turn_answer(run: SteeringRun, run_async: bool):
    """A turn's run at once (202), or once it completed, with generate's errors otherwise."""
    if run_async:
        return Status(202, {"turn": run.turn, "run_id": run.pk})
    run = await finished(run)
    return {
        "turn": run.turn,
        "run_id": run.pk,
        "unsteered_output": run.unsteered_output,
        "steered_output": run.steered_output,
        "metrics": run.metrics,
    }


@router.post("/conversations/{conversation_id}/messages", response=TURN_RESPONSES)
async def send_message(request, payload: MessageIn, conversation_id: int = Id, run_async: bool = RunAsync):
    """The next turn: both assistants answer the message, each reading its history (the conversation's
    history_mode). Steering fields given here change the settings from this turn on. One turn at a time (409
    while one is queued or running); a history that with max_tokens does not fit the worker's slots is a 400
    naming content. Waits as /api/steering/generate does; its run streams over the run websocket."""
    changes = payload.model_dump(exclude={"content", "seed"}, exclude_none=True)

    def send():
        conversation = get_visible_conversation(request.auth, conversation_id)
        return conversations.send(conversation, request.auth, payload.content, payload.seed, changes)

    return await turn_answer(await sync_to_async(send)(), run_async)


@router.post("/conversations/{conversation_id}/regenerate", response=TURN_RESPONSES)
async def regenerate_turn(
    request,
    conversation_id: int = Id,
    seed: int | None = Query(
        None, ge=0, le=MAX_SEED, description="Random when omitted; never the last one's."
    ),
    run_async: bool = RunAsync,
):
    """The last turn again with its message and settings and another seed; the new run becomes the turn's
    current one, the one later turns read."""

    def regenerate():
        conversation = get_visible_conversation(request.auth, conversation_id)
        return conversations.regenerate(conversation, request.auth, seed)

    return await turn_answer(await sync_to_async(regenerate)(), run_async)


@router.post(
    "/conversations/{conversation_id}/continue",
    response={201: ConversationCreated, **error_responses(404)},
)
def continue_conversation(request, payload: ContinueIn, conversation_id: int = Id):
    """Copy the conversation up to `turn` (its finished turns) into a new one of yours, to go on from there
    with that turn's settings; any member who reads it may."""
    conversation = get_visible_conversation(request.auth, conversation_id)
    return Status(201, {"id": conversations.continue_from(conversation, request.auth, payload.turn).pk})


@router.post(
    "/conversations/{conversation_id}/cancel",
    response={200: ConversationOut, **error_responses(403, 404, 409)},
)
def cancel_turn(request, conversation_id: int = Id):
    """Stop the turn in progress (owner or staff); it keeps the text so far and the conversation goes on."""
    conversation = get_visible_conversation(request.auth, conversation_id)
    conversations.cancel(conversation, request.auth)
    return conversation_out(conversation)


def visible_experiments(user):
    return Experiment.objects.visible_to(user).select_related("owner", "training")


def get_visible_experiment(user, experiment_id: int) -> Experiment:
    """As for runs: another member's private experiment is a 404, like an unknown one."""
    experiment = visible_experiments(user).filter(pk=experiment_id).first()
    if experiment is None:
        raise NotFound(f"Experiment {experiment_id} does not exist.", "experiment_id")
    return experiment


def experiment_fields(experiment: Experiment) -> dict:
    """What was asked and when it ran; read after the status was refreshed."""
    return {
        "id": experiment.pk,
        "name": experiment.name,
        "owner": experiment.owner.get_username(),
        "private": experiment.private,
        "training_id": experiment.training_id,
        "model_id": experiment.training.model_id,
        "method": experiment.method,
        "intervention_layers": experiment.intervention_layers,
        "conditions": experiment.conditions,
        "strengths": experiment.strengths,
        "prompt_set_id": experiment.prompt_set_id,
        "prompt_count": len(experiment.prompts),
        "seeds": experiment.seeds,
        "max_tokens": experiment.max_new_tokens,
        "temperature": experiment.temperature,
        "chat": experiment.chat,
        "created_at": experiment.created_at,
        "started_at": experiment.started_at,
        "finished_at": experiment.finished_at,
    }


def experiment_item(experiment: Experiment) -> dict:
    experiment_results.refresh(experiment)
    return {
        **experiment_fields(experiment),
        "status": experiment.status,
        "error": experiment.error,
        "progress": experiment_results.progress(experiment),
    }


def experiment_out(experiment: Experiment) -> dict:
    report = experiments.report(experiment)  # first: it refreshes the status and times
    return {**experiment_fields(experiment), "prompts": experiment.prompts, **report}


@router.post("/experiments", response={202: ExperimentAccepted, **error_responses(404, 409, 503)})
def create_experiment(request, payload: ExperimentIn):
    """Run every condition over every prompt, seed and strength: one sweep run per (condition, prompt, seed),
    queued behind interactive runs. Validated whole first: a 400 naming the field stores nothing.
    Poll GET /api/experiments/{id}."""
    experiment = experiments.create(request.auth, experiments.ExperimentRequest(**payload.model_dump()))
    return Status(202, {"id": experiment.pk})


@router.get("/experiments", response={200: ExperimentPage, **error_responses()})
def list_experiments(request, limit: int = Query(20, ge=1, le=MAX_PAGE), offset: int = Offset):
    """Every experiment the caller may read (the lab's shared ones and their own), newest first."""
    found, total = page(visible_experiments(request.auth), limit, offset)
    return {
        "experiments": [experiment_item(experiment) for experiment in found],
        "total": total,
        "limit": limit,
        "offset": offset,
    }


@router.get("/experiments/{experiment_id}", response={200: ExperimentOut, **error_responses(404)})
def get_experiment(request, experiment_id: int = Id):
    """Its settings, status and progress, the mean scores per condition and strength with 95% bootstrap
    intervals, and each condition's best strength (chosen on half of the prompts, scored on the other)."""
    return experiment_out(get_visible_experiment(request.auth, experiment_id))


@router.post(
    "/experiments/{experiment_id}/cancel", response={200: ExperimentOut, **error_responses(403, 404, 409)}
)
def cancel_experiment(request, experiment_id: int = Id):
    """Stop a queued or running experiment (its owner or staff); the outputs stored so far stay."""
    experiment = get_visible_experiment(request.auth, experiment_id)
    experiments.cancel(experiment, request.auth)
    return experiment_out(experiment)


@router.post(
    "/experiments/{experiment_id}/resume",
    response={202: ExperimentResumed, **error_responses(403, 404, 409, 503)},
)
def resume_experiment(request, experiment_id: int = Id):
    """Queue again the cells of a finished experiment that have no outputs (failed or cancelled ones)."""
    experiment = get_visible_experiment(request.auth, experiment_id)
    cells = experiments.resume(experiment, request.auth)
    return Status(202, {"id": experiment.pk, "cells": cells})


shared_record_routes(
    "/experiments/{experiment_id}",
    fetch=get_visible_experiment,
    out=(ExperimentOut, experiment_out),
    update_doc="Make an experiment private (it and every cell: only its owner and staff read them) or share it "
    "with the lab; owner or staff only.",
    delete_doc="Delete a finished experiment with its runs and outputs (owner or staff); cancel a running one "
    "first.",
)


def download(media_type: str) -> dict:
    """openapi_extra of a route that answers a file rather than JSON."""
    return {
        "responses": {
            200: {"description": "A file download.", "content": {media_type: {"schema": {"type": "string"}}}}
        }
    }


def attachment(content: str | bytes, media_type: str, filename: str) -> HttpResponse:
    """A download: text in UTF-8, or bytes as they are."""
    content_type = media_type if isinstance(content, bytes) else f"{media_type}; charset=utf-8"
    response = HttpResponse(content, content_type=content_type)
    response["Content-Disposition"] = f'attachment; filename="{filename}"'
    return response


@router.post(
    "/steering/control-vector",
    response={200: None, **error_responses(404, 409)},
    openapi_extra=download(services.CONTROL_VECTOR_MEDIA_TYPE),
)
def export_control_vector(request, payload: ControlVectorIn):
    """The steering as a llama.cpp control vector (GGUF): for each chosen layer, the sum of c × a_i × direction
    (an SAE feature's decoder row, or a vector's own vector for the layer). Apply it with
    `llama-cli --control-vector-scaled FILE 1.0`; multiplicative steering cannot be exported (400 naming method)."""
    training = Training.objects.get_completed(payload.training_id, payload.model_id)
    fields = payload.model_dump()
    content = services.control_vector_gguf(
        training, fields["features"], fields["intervention_layers"], fields["method"]
    )
    return attachment(content, services.CONTROL_VECTOR_MEDIA_TYPE, services.control_vector_filename(training))


@router.get(
    "/experiments/{experiment_id}/results.csv",
    response={200: None, **error_responses(404)},
    openapi_extra=download("text/csv"),
)
def export_results_csv(request, experiment_id: int = Id):
    """One row per stored output with its scores. A text cell starting with = + - @, a tab or a carriage
    return gets a leading ' so that a spreadsheet does not run it as a formula."""
    experiment = get_visible_experiment(request.auth, experiment_id)
    return attachment(exports.csv_text(experiment), "text/csv", exports.filename(experiment, "csv"))


@router.get(
    "/experiments/{experiment_id}/results.jsonl",
    response={200: None, **error_responses(404)},
    openapi_extra=download(JSONL),
)
def export_results_jsonl(request, experiment_id: int = Id):
    """One JSON object per line and stored output, with the CSV's columns and unchanged values."""
    experiment = get_visible_experiment(request.auth, experiment_id)
    return attachment(exports.jsonl_text(experiment), JSONL, exports.filename(experiment, "jsonl"))


def prompt_set_out(prompt_set: PromptSet) -> dict:
    return {
        "id": prompt_set.pk,
        "name": prompt_set.name,
        "description": prompt_set.description,
        "count": len(prompt_set.prompts),
        "owner": prompt_set.owner.get_username() if prompt_set.owner_id else None,
        "created_at": prompt_set.created_at,
    }


@router.get("/prompt-sets", response={200: PromptSetPage, **error_responses()})
def list_prompt_sets(request, limit: int = Limit, offset: int = Offset):
    """Every prompt set, by name: any member may run an experiment over any of them."""
    found, total = page(PromptSet.objects.select_related("owner"), limit, offset)
    return {
        "prompt_sets": [prompt_set_out(prompt_set) for prompt_set in found],
        "total": total,
        "limit": limit,
        "offset": offset,
    }


@router.post(
    "/prompt-sets",
    response={201: PromptSetOut, **error_responses()},
    description=f"A named set of up to {prompt_sets.MAX_PROMPTS} distinct prompts. As JSON: "
    '{name, description?, prompts: [...]} or {name, description?, text: "one prompt per line"}. As a multipart '
    "upload: the fields `name` and `description`, and `file`: a .txt (one prompt per line) or a .jsonl (each "
    'line a JSON string or an object with a "prompt" string), UTF-8. A duplicate name, a bad line, or an empty, '
    "repeated or too long prompt is a 400 naming the field.",
    openapi_extra={
        "requestBody": {
            "required": True,
            "description": "The prompts as a JSON body (`prompts`, or pasted `text`), or a multipart upload.",
            "content": {
                "application/json": {"schema": PromptSetIn.model_json_schema()},
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "properties": {
                            "name": {"type": "string"},
                            "description": {"type": "string"},
                            "file": {"type": "string", "format": "binary"},
                        },
                        "required": ["name", "file"],
                    }
                },
            },
        }
    },
)
def create_prompt_set(request):
    if request.content_type == "multipart/form-data":
        prompt_set = prompt_set_from_upload(request)
    else:
        prompt_set = prompt_set_from_json(request)
    return Status(201, prompt_set_out(prompt_set))


def prompt_set_from_json(request) -> PromptSet:
    try:
        document = SafeJSONParser().parse_body(request)
    except ValueError as error:  # answered as ninja answers a body its parser refuses (on_http_error)
        raise HttpError(400, "Cannot parse request body") from error
    try:
        payload = PromptSetIn.model_validate(document)
    except PydanticValidationError as error:
        # The location ninja gives a body's errors, so they leave in the API's one shape.
        raise ValidationError(
            [{**item, "loc": ("body", "payload", *item["loc"])} for item in error.errors(include_url=False)]
        ) from error
    if payload.prompts is not None and payload.text is not None:
        raise InvalidInput("Give prompts or text, not both.", "prompts")
    if payload.text is not None:
        prompts, field = prompt_sets.prompts_from_text(payload.text), "text"
    else:
        prompts, field = payload.prompts, "prompts"
    return prompt_sets.create_prompt_set(request.auth, payload.name, payload.description, prompts, field)


def prompt_set_from_upload(request) -> PromptSet:
    # Refuse an oversized body before Django reads it to a temporary file.
    multipart_overhead = 64 * 1024
    if int(request.META.get("CONTENT_LENGTH") or 0) > prompt_sets.MAX_UPLOAD_BYTES + multipart_overhead:
        raise InvalidInput(
            f"The file is larger than {prompt_sets.MAX_UPLOAD_BYTES // 1024 // 1024} MB.", "file"
        )
    upload = request.FILES.get("file")
    if upload is None:
        raise InvalidInput("Send the prompts as the multipart field `file` (.txt or .jsonl).", "file")
    prompts = prompt_sets.prompts_from_file(upload.name, upload.read(), "file")
    name, description = request.POST.get("name", ""), request.POST.get("description", "")
    return prompt_sets.create_prompt_set(request.auth, name, description, prompts, "file")
