"""Request and response shapes of the JSON API (spec sections 2, 5 and 7)."""

from datetime import datetime
from typing import Annotated, Any, Literal

from django.conf import settings
from ninja import Field, Schema
from pydantic import ConfigDict, ValidationError, field_validator

from steering_app.experiments import DEFAULT_STRENGTHS, MAX_CONDITIONS, MAX_SEEDS, ExperimentRequest
from steering_app.limits import (
    MAX_ABS_COEFFICIENT_HARD,
    MAX_FEATURES,
    MAX_ID,
    MAX_INDEX,
    MAX_LAYERS,
    MAX_PROMPT_CHARS,
    MAX_SEED,
    MAX_SWEEP_MULTIPLIER,
    MAX_TEMPERATURE,
    MAX_VARIANTS,
)
from steering_app.models import Experiment
from steering_app.steering_settings import DEFAULT_MAX_TOKENS, DEFAULT_SWEEP, DEFAULT_TEMPERATURE


class Error(Schema):
    """The one error body of every non-2xx response."""

    detail: str = Field(description="What went wrong, for a person to read.")
    field: str | None = Field(description="The input at fault (dotted path), or null.")


def error_responses(*codes: int) -> dict[int, type[Error]]:
    """Every operation documents 400, 401 and 500; callers add their own codes."""
    return {code: Error for code in sorted({400, 401, 500, *codes})}


# PostgreSQL refuses NUL in text: refuse it at validation as a 400 instead of a 500 in the query.
NO_NUL = r"^[^\x00]*$"


def reject_nul(value: str) -> str:
    """NO_NUL as a pydantic field validator, for schemas that prefer one."""
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    return value


class Page(Schema):
    total: int
    limit: int
    offset: int


class CompletedTrainingOut(Schema):
    id: int
    encoder_type: str
    model_id: int
    model_name: str
    dataset_name: str | None
    hook_layer: int
    created_at: datetime


class CompletedTrainingPage(Page):
    trainings: list[CompletedTrainingOut]


class VectorJobOut(Schema):
    id: int
    name: str
    method: str
    tokens: str
    status: str = Field(description="queued, running, completed or failed.")
    progress: float = Field(description="0..1 while the worker reads the examples.")
    error: str
    report: dict[str, Any] | None = Field(description="The concept's separation report once completed.")
    created_at: datetime
    finished_at: datetime | None


class VectorSpaceOut(Schema):
    concepts: list[dict[str, Any]] = Field(
        description="Per concept (its feature index): name, method, tokens, separation (held-out accuracy of a "
        "threshold on the projection, per layer), best_layer (where separation peaks: the default layer), "
        "examples."
    )
    jobs: list[VectorJobOut] = Field(
        description="The jobs that made or are making its concepts, newest first."
    )


class TrainingOut(Schema):
    id: int
    model_id: int
    model_name: str
    dataset_id: int | None
    dataset_name: str | None
    encoder_type: str
    hook_layer: int
    hook_name: str
    d_in: int
    d_sae: int
    stats: dict[str, Any]
    calibrated: bool = Field(
        description="Whether its features have max activations: additive coefficients are then multiples of "
        "them; before, they are in residual-stream units."
    )
    max_abs_coefficient: float = Field(description="The limit on each feature's |coefficient|.")
    status: str
    error: str
    created_at: datetime
    completed_at: datetime | None
    vectors: VectorSpaceOut | None = Field(
        None,
        description='A steering-vector space (encoder_type "vectors"): its concepts and jobs; else null.',
    )


class StepPlanOut(Schema):
    plan: dict[str, Any] = Field(
        description="The engine's StepPlan: summary, lean step or modules, linear forms per shape with their "
        "timings, occupied or all rows, CUDA graphs or eager, each with why."
    )
    host: str = Field(description="The worker's host that decided it.")
    recorded_at: datetime


class ModelOut(Schema):
    id: int
    name: str
    architecture: str
    num_layers: int
    hidden_size: int
    status: str
    step_plan: StepPlanOut | None = Field(
        None,
        description="How a worker last stepped this model; staff only (null for others, and before a worker "
        "built its batch).",
    )

    @staticmethod
    def resolve_step_plan(model, context) -> dict | None:
        if model.step_plan is None or not context["request"].auth.is_staff:
            return None
        return {"plan": model.step_plan, "host": model.step_plan_host, "recorded_at": model.step_plan_at}


class FeatureOut(Schema):
    index: int
    label: str
    description: str
    max_activation: float | None
    activation_frequency: float | None


class FeaturePage(Page):
    features: list[FeatureOut]


# JSON bodies are validated strictly: a schema-violating value ("1", 0 for false) is a 400, not coerced.
STRICT = ConfigDict(strict=True)


class FeatureCoefficient(Schema):
    model_config = STRICT

    feature_id: int = Field(ge=0, le=MAX_INDEX, description="The feature's index in the training's SAE.")
    coefficient: float = Field(
        ge=-MAX_ABS_COEFFICIENT_HARD,
        le=MAX_ABS_COEFFICIENT_HARD,
        description="Within the training's max_abs_coefficient: multiples of the feature's max activation "
        "once the training is calibrated, residual-stream units before.",
    )


# A steering request's method and intervention layers, as runs, experiments and presets take them.
Method = Literal["additive", "multiplicative"]
Layers = list[Annotated[int, Field(ge=0, le=MAX_INDEX)]]

# Strength multipliers of a sweep, one steered variant each. Only the type is checked here: the limits are
# SteeringSettings' alone, so the panel's form, the API and presets accept the same sweeps.
Sweep = list[float]
SWEEP_LIMITS = (
    f"1 to {MAX_VARIANTS} multipliers (fewer when the worker's batch has fewer rows), each within "
    f"±{MAX_SWEEP_MULTIPLIER:g}; every coefficient times each multiplier must stay within the training's "
    "max_abs_coefficient."
)


# The steering fields of a generate body, with their limits, as a conversation and its messages take them too.
Features = Annotated[list[FeatureCoefficient], Field(min_length=1, max_length=MAX_FEATURES)]
InterventionLayers = Annotated[
    Layers,
    Field(
        min_length=1,
        max_length=MAX_LAYERS,
        description="Decoder blocks to steer, each below the model's layer count.",
    ),
]
Temperature = Annotated[float, Field(ge=0, le=MAX_TEMPERATURE, description="0 is greedy decoding.")]
MaxTokens = Annotated[int, Field(ge=1, le=settings.STEERLAB_MAX_NEW_TOKENS)]
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]


class GenerateIn(Schema):
    model_config = STRICT

    training_id: int = Field(ge=1, le=MAX_ID)
    model_id: int = Field(ge=1, le=MAX_ID, description="Must be the training's model.")
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS, pattern=NO_NUL)
    features: Features
    intervention_layers: InterventionLayers
    temperature: Temperature = DEFAULT_TEMPERATURE
    max_tokens: MaxTokens = Field(
        DEFAULT_MAX_TOKENS,
        description="New tokens per output. The worker's slots (STEERLAB_SLOT_TOKENS) hold the prompt too: at "
        "most slot tokens - prompt tokens + 1; beyond that the answer is a 400 naming max_tokens and the maximum "
        "for this prompt, and no run is created.",
    )
    seed: Seed | None = Field(None, description="Random when omitted; returned either way.")
    method: Method = "additive"
    chat: bool = Field(False, description="Wrap the prompt in the model's chat template.")
    private: bool = Field(
        False, description="Readable only by you and staff; by default every lab member can read the run."
    )
    sweep: Sweep | None = Field(
        None,
        description="A strength sweep: one steered variant per multiplier, each the features with every "
        f"coefficient times it (the panel's default is {list(DEFAULT_SWEEP)}): {SWEEP_LIMITS} The answer's "
        "`variants` follow this order.",
    )


Text = Annotated[str, Field(max_length=MAX_PROMPT_CHARS, pattern=NO_NUL)]


class VectorIn(Schema):
    model_config = STRICT

    model_id: int | None = Field(None, ge=1, le=MAX_ID, description="Start a new vector space on this model…")
    training_id: int | None = Field(
        None, ge=1, le=MAX_ID, description="…or add the concept to this vector space. Give exactly one."
    )
    name: str = Field(max_length=300, pattern=NO_NUL, description="The concept's name, unique in its space.")
    description: str = Field("", max_length=MAX_PROMPT_CHARS, pattern=NO_NUL)
    method: Literal["diffmean", "pca"] = Field(
        "diffmean",
        description="diffmean: mean of positives minus mean of negatives; pca: repeng's first principal component "
        "of the paired differences, its sign toward the positives (needs pairs).",
    )
    tokens: Literal["all", "last"] = Field(
        "all", description="Read each example over every token, or its last token only (repeng's reading)."
    )
    pairs: list[Annotated[list[Text], Field(min_length=2, max_length=2)]] | None = Field(
        None, description="[[positive, negative], ...]; or give positives and negatives (diffmean only)."
    )
    positives: list[Text] | None = Field(None, description="Texts with the property.")
    negatives: list[Text] | None = Field(None, description="Texts without it.")


class VectorAccepted(Schema):
    training_id: int = Field(
        description="The vector space: GET /api/trainings/{id} shows the job, then the space."
    )
    job_id: int


class ControlVectorIn(Schema):
    model_config = STRICT

    training_id: int = Field(ge=1, le=MAX_ID)
    model_id: int = Field(ge=1, le=MAX_ID, description="Must be the training's model.")
    features: list[FeatureCoefficient] = Field(min_length=1, max_length=MAX_FEATURES)
    intervention_layers: Layers = Field(
        min_length=1,
        max_length=MAX_LAYERS,
        description="Decoder blocks to steer; llama.cpp applies no control vector at block 0.",
    )
    method: Method = Field("additive", description="Only additive steering is a fixed vector per layer.")


# How many features "features active on this prompt" lists at most, and by default.
MAX_ACTIVE_FEATURES = 100
DEFAULT_ACTIVE_FEATURES = 20


class ActiveFeaturesIn(Schema):
    model_config = STRICT

    prompt: str = Field(max_length=MAX_PROMPT_CHARS, pattern=NO_NUL, description="Must hold some text.")
    chat: bool = Field(False, description="Read the prompt inside the model's chat template.")
    limit: int = Field(DEFAULT_ACTIVE_FEATURES, ge=1, le=MAX_ACTIVE_FEATURES)


class ActiveFeatureOut(Schema):
    index: int
    label: str
    activation: float = Field(
        description="Its strongest activation over the prompt's tokens (clean model, the SAE's layer)."
    )
    token: str = Field(description="The prompt token it is strongest on.")
    max_activation: float | None = Field(description="Its strongest activation recorded for the training.")
    relative_activation: float | None = Field(
        description="activation ÷ max_activation: how strongly it fires for itself; null when max is unknown."
    )
    activation_frequency: float | None


class ActiveFeaturesOut(Schema):
    features: list[ActiveFeatureOut] = Field(
        description="By relative_activation, highest first, then those with no max activation by activation; "
        "features that stay at 0 are left out."
    )


class FeatureActivationOut(Schema):
    """A steered feature's mean activation (clean model, SAE layer) over each continuation."""

    feature_id: int
    unsteered: float | None
    steered: float | None
    steered_in_run: float | None = Field(
        None, description="Inside the steered run itself, after the intervention."
    )


class MetricsOut(Schema):
    kl_divergence: float | None = Field(None, description="Mean KL(P_clean || P_steered), nats per token.")
    perplexity_delta: float | None = None
    perplexity_unsteered: float | None = None
    perplexity_steered: float | None = None
    semantic_similarity: float | None = None
    word_overlap: float | None = None
    feature_activation: list[FeatureActivationOut] = Field(default_factory=list)


class ScoresOut(Schema):
    """An output's scores in [0, 1] and the raw measures behind them (README: Reading the scores)."""

    concept: float
    fluency: float
    relevance: float
    score: float = Field(description="The harmonic mean of concept, fluency and relevance.")
    concept_sae: float | None = Field(None, description="None when a feature's max activation is unknown.")
    concept_semantic: float
    perplexity_log_ratio: float
    repetition: float
    relevance_cosine: float


class VariantOut(Schema):
    multiplier: float | None = Field(None, description="The sweep multiplier; 1 without a sweep.")
    steered_output: str
    metrics: MetricsOut | None = Field(None, description="None while the run has not completed.")
    scores: ScoresOut | None = Field(
        None, description="None until the run has completed (and for older runs)."
    )
    tokens: int | None = Field(None, description="Tokens this variant generated.")


class GenerateOut(Schema):
    run_id: int
    unsteered_output: str
    steered_output: str = Field(description="The first variant's text.")
    seed: int
    metrics: MetricsOut = Field(description="The first variant's metrics.")
    variants: list[VariantOut] = Field(description="Every steered variant, in sweep order.")


class GenerateAccepted(Schema):
    run_id: int


class RunSettingsOut(Schema):
    """The request that made the run: POSTing it to /api/steering/generate runs it again."""

    training_id: int
    model_id: int
    prompt: str
    features: list[FeatureCoefficient]
    intervention_layers: list[int]
    temperature: float
    max_tokens: int
    seed: int
    method: str
    chat: bool
    sweep: list[float] | None


class RunOut(Schema):
    id: int
    owner: str
    private: bool = Field(description="Readable only by its owner and staff; otherwise by every lab member.")
    status: Literal["queued", "running", "completed", "failed", "cancelled"]
    settings: RunSettingsOut
    unsteered_output: str
    steered_output: str
    metrics: MetricsOut | None
    variants: list[VariantOut] = Field(description="Every steered variant, in sweep order.")
    error: str = Field(description="Why it failed, or who or what cancelled it.")
    timings: dict[str, Any]
    worker: str = Field(description="host:pid of the worker that claimed it.")
    heartbeat_at: datetime | None = Field(description="The worker's last sign of life while it ran.")
    cancel_requested: bool
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class RunPage(Page):
    runs: list[RunOut]


class PrivacyPatch(Schema):
    """What the owner (or staff) may change on a stored run or experiment: only who can read it."""

    model_config = STRICT

    private: bool = Field(description="true: only the owner and staff read it; false: every lab member.")


# Experiments: a generate body's fields and bounds; the limits experiments.create checks (how many conditions,
# strengths, prompts and seeds, each strength against the training's coefficient limit) are its alone, so the
# API and the form refuse the same experiments.
class ConditionIn(Schema):
    model_config = STRICT

    features: list[FeatureCoefficient] = Field(min_length=1, max_length=MAX_FEATURES)


class ExperimentIn(Schema):
    model_config = STRICT

    training_id: int = Field(ge=1, le=MAX_ID)
    model_id: int | None = Field(
        None, ge=1, le=MAX_ID, description="When given, must be the training's model."
    )
    name: str = Field("", max_length=Experiment._meta.get_field("name").max_length, pattern=NO_NUL)
    method: Method = "additive"
    intervention_layers: Layers = Field(
        min_length=1,
        max_length=MAX_LAYERS,
        description="Decoder blocks to steer, each below the model's layer count.",
    )
    conditions: list[ConditionIn] = Field(
        description=f"1 to {MAX_CONDITIONS} conditions, each a set of features steered together."
    )
    strengths: list[float] | None = Field(
        None,
        description="Multipliers of every condition's coefficients; 0 is the unsteered control "
        f"(default {list(DEFAULT_STRENGTHS)}). Distinct, at least one nonzero; the nonzero ones are one run's "
        f"sweep: {SWEEP_LIMITS}",
    )
    prompt_set_id: int | None = Field(None, ge=1, le=MAX_ID, description="A prompt set; or give `prompts`.")
    prompts: list[Annotated[str, Field(max_length=MAX_PROMPT_CHARS, pattern=NO_NUL)]] | None = Field(
        None, description="Distinct, non-empty prompts; or give `prompt_set_id`."
    )
    seeds: int | list[Annotated[int, Field(ge=0, le=MAX_SEED)]] = Field(
        1, description=f"How many seeds each prompt runs with (1 to {MAX_SEEDS}: seeds 0..n-1), or the seeds."
    )
    max_tokens: int = Field(ExperimentRequest.max_tokens, ge=1, le=settings.STEERLAB_MAX_NEW_TOKENS)
    temperature: float = Field(
        ExperimentRequest.temperature, ge=0, le=MAX_TEMPERATURE, description="0 is greedy decoding."
    )
    chat: bool = Field(False, description="Wrap each prompt in the model's chat template.")
    private: bool = Field(
        False, description="Readable only by you and staff; by default every lab member can read it."
    )

    @field_validator("seeds", mode="wrap")
    @classmethod
    def seeds_as_one_error(cls, value, validate):
        # A union's errors are located per member ("seeds.int", "seeds.list[constrained-int].0"): name the field.
        try:
            return validate(value)
        except ValidationError as error:
            raise ValueError(f"must be a whole number or a list of seeds from 0 to {MAX_SEED}") from error


class ExperimentAccepted(Schema):
    id: int


class ExperimentResumed(Schema):
    id: int
    cells: int = Field(description="The cells queued again: those with no stored outputs.")


class ProgressOut(Schema):
    done: int = Field(description="Cells (one run per condition, prompt and seed) whose outputs are stored.")
    total: int
    tokens_per_second: float | None = Field(
        description="Over the experiment's time so far; null before a cell."
    )
    eta_seconds: float | None


class IntervalOut(Schema):
    """A mean with its 95% bootstrap interval."""

    mean: float | None
    low: float | None
    high: float | None


class StrengthSummaryOut(Schema):
    condition: int = Field(description="Its position in `conditions`, from 0.")
    strength: float
    n: int = Field(description="Outputs averaged.")
    concept: IntervalOut
    fluency: IntervalOut
    relevance: IntervalOut
    score: IntervalOut


class BestStrengthOut(Schema):
    condition: int
    strength: float = Field(description="The best mean score on the selection half of the prompts.")
    score: IntervalOut = Field(description="Its score on the other, held-out half.")
    n: int


class ExperimentItemOut(Schema):
    id: int
    name: str
    owner: str
    private: bool
    training_id: int
    model_id: int
    method: str
    intervention_layers: list[int]
    conditions: list[ConditionIn]
    strengths: list[float]
    prompt_set_id: int | None
    prompt_count: int
    seeds: list[int]
    max_tokens: int
    temperature: float
    chat: bool
    status: Literal["queued", "running", "completed", "failed", "cancelled"]
    error: str
    progress: ProgressOut
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class ExperimentOut(ExperimentItemOut):
    prompts: list[str] = Field(description="The prompts as run (a copy of the set's when it was created).")
    summary: list[StrengthSummaryOut] = Field(description="Per condition and strength, in that order.")
    best: list[BestStrengthOut] = Field(
        description="Each condition's best strength, best held-out score first."
    )


class ExperimentPage(Page):
    experiments: list[ExperimentItemOut]


class PromptSetIn(Schema):
    """A JSON body of POST /api/prompt-sets; the limits are prompt_sets.create_prompt_set's."""

    model_config = STRICT

    name: str
    description: str = ""
    prompts: list[str] | None = Field(None, description="The prompts; or give `text`.")
    text: str | None = Field(None, description="Pasted prompts, one per line (blank lines are skipped).")


class PromptSetOut(Schema):
    id: int
    name: str
    description: str
    count: int = Field(description="How many prompts it holds.")
    owner: str | None = Field(description="Null for the shipped sets.")
    created_at: datetime


class PromptSetPage(Page):
    prompt_sets: list[PromptSetOut]


# Conversations (chat mode): the generate body's steering fields and limits; each message may change them.
HistoryMode = Literal["separate", "shared"]


class ConversationIn(Schema):
    model_config = STRICT

    training_id: int = Field(ge=1, le=MAX_ID, description="Its model must have a chat template.")
    model_id: int | None = Field(None, ge=1, le=MAX_ID, description="Must be the training's model.")
    system_prompt: str = Field("", max_length=MAX_PROMPT_CHARS, pattern=NO_NUL)
    history_mode: HistoryMode = Field(
        "separate",
        description="separate: each side reads its own earlier replies (the steered side its steered ones); "
        "shared: both read the unsteered replies, isolating the steering's effect on each turn.",
    )
    features: Features
    intervention_layers: InterventionLayers
    temperature: Temperature = DEFAULT_TEMPERATURE
    max_tokens: MaxTokens = Field(
        DEFAULT_MAX_TOKENS,
        description="New tokens per reply. The history read before a turn and max_tokens must fit the worker's "
        "slots (STEERLAB_SLOT_TOKENS): else the message is a 400 naming content.",
    )
    method: Method = "additive"
    private: bool = Field(
        False, description="Readable only by you and staff; by default every lab member can read it."
    )


class ConversationCreated(Schema):
    id: int


class MessageIn(Schema):
    model_config = STRICT

    content: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS, pattern=NO_NUL)
    seed: Seed | None = Field(None, description="Random when omitted.")
    features: Features | None = Field(None, description="Changes the steering from this turn on.")
    intervention_layers: InterventionLayers | None = None
    temperature: Temperature | None = None
    max_tokens: MaxTokens | None = None
    method: Method | None = None


class RegenerateIn(Schema):
    model_config = STRICT

    seed: Seed | None = Field(None, description="Random when omitted; never the last run's seed.")


class ContinueIn(Schema):
    model_config = STRICT

    turn: int = Field(ge=1, le=MAX_INDEX, description="Copy the turns up to this one.")


class TurnAccepted(Schema):
    turn: int
    run_id: int = Field(description="The turn's run: GET /api/steering/runs/{run_id}, or its websocket.")


class TurnResultOut(TurnAccepted):
    unsteered_output: str
    steered_output: str
    metrics: MetricsOut


class TurnSettingsOut(Schema):
    features: list[FeatureCoefficient]
    intervention_layers: list[int]
    method: str
    temperature: float
    max_tokens: int
    seed: int


class TurnOut(Schema):
    turn: int
    user: str = Field(description="The user's message.")
    unsteered_output: str
    steered_output: str
    run_id: int = Field(description="The turn's current run (the latest, when it was regenerated).")
    status: Literal["queued", "running", "completed", "failed", "cancelled"]
    settings: TurnSettingsOut


class ConversationItemOut(Schema):
    id: int
    owner: str
    private: bool = Field(description="Readable only by its owner and staff; otherwise by every lab member.")
    history_mode: HistoryMode
    system_prompt: str
    training_id: int
    model_id: int
    created_at: datetime
    updated_at: datetime


class ConversationOut(ConversationItemOut):
    turns: list[TurnOut]


class ConversationPage(Page):
    conversations: list[ConversationItemOut]
