"""Django records -> engine calls: load what a run needs and compute its comparison.

runs.py decides a run's life; this module only turns a SteeringRun into engine arguments and the
engine's result into the values a run stores.
"""

import math
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from django.utils.timezone import now

from steering_app import conversation_history, model_loading
from steering_app.errors import Conflict, InvalidInput
from steering_app.models import Feature, LanguageModel, SteeringRun, Training
from steering_app.steering_settings import SteeringSettings, slot_shape

if TYPE_CHECKING:
    import torch

    from steering_app.engine.serving.generate import Comparison, Generation
    from steering_app.engine.serving.lean import LeanStep
    from steering_app.engine.steer import SteeringSpec

OnStep = Callable[[str, list[str]], None]  # (clean delta, one delta per variant)
ShouldStop = Callable[[], bool]


class Cancelled(Exception):
    """The run's cancel flag stopped its generation between two steps."""


@dataclass(frozen=True)
class Outcome:
    """What a run stores: the first variant's text and metrics, and every variant (in sweep order)."""

    unsteered_output: str
    steered_output: str
    metrics: dict
    timings: dict
    # [{"multiplier", "steered_output", "metrics", "scores", "tokens"}]; None: just the first
    variants: list[dict] | None = None
    control_scores: dict | None = None  # the clean row's scores: an experiment's strength 0
    control_tokens: int = 0

    def all_variants(self) -> list[dict]:
        if self.variants is not None:
            return self.variants
        return [{"multiplier": 1.0, "steered_output": self.steered_output, "metrics": self.metrics}]

    def control(self) -> dict:
        """The clean row as a variant of strength 0 (no steering, so no comparison metrics)."""
        return {
            "multiplier": 0.0,
            "steered_output": self.unsteered_output,
            "metrics": {},
            "scores": self.control_scores,
            "tokens": self.control_tokens,
        }


def variant_specs(run: SteeringRun) -> list["SteeringSpec"]:
    """The engine's SteeringSpec of each variant, with each feature's a_i (its max activation, 1 when unknown)."""
    from steering_app.engine.steer import SteeringSpec

    scales = steering_scales(run.training, run.features)
    return [
        SteeringSpec(
            method=run.method,
            features=tuple((item["feature_id"], item["coefficient"] * multiplier) for item in run.features),
            layers=tuple(run.intervention_layers),
            feature_scales=scales,
        )
        for multiplier in multipliers(run)
    ]


def steering_scales(training: Training, features: list[dict]) -> dict[int, float]:
    """a_i of each steered feature: its max activation, 1 when unknown."""
    indices = [item["feature_id"] for item in features]
    return {
        feature.index: feature.steering_scale
        for feature in Feature.objects.filter(training=training, index__in=indices)
    }


def check_steering_scales(training: Training, features: list[dict]) -> None:
    """InvalidInput naming `features` when a feature's a_i is not a finite number (a labels file imported
    before imports checked it): the engine would refuse the run, so it is refused when it is created."""
    for index, scale in sorted(steering_scales(training, features).items()):
        if not math.isfinite(scale):
            raise InvalidInput(
                f"Feature {index} has no finite max activation ({scale}): recalibrate training {training.pk} "
                "or import its labels again.",
                "features",
            )


def control_vector_of(
    training: Training, features: object, layers: object, method: object
) -> dict[int, "torch.Tensor"]:
    """{layer: sum_i c_i * a_i * d_i}: the steering fields of a generate body as one vector per chosen layer, what a
    llama.cpp control vector adds (engine.vectors.control_vector), over an SAE or a vector space alike.

    InvalidInput naming the field: multiplicative steering (`method`) needs the SAE's encoder at generation
    time, so no fixed vector can stand for it; features and layers are checked as a run's are."""
    import torch

    from steering_app.engine.saes.sae import SAEFormatError, load_sae
    from steering_app.engine.steer import SteeringSpec
    from steering_app.engine.vectors import control_vector

    if method == SteeringRun.Method.MULTIPLICATIVE:
        raise InvalidInput(
            "Multiplicative steering cannot be exported: it scales what the SAE's encoder reads at each step, "
            "which a fixed control vector cannot do. Export additive steering.",
            "method",
        )
    cleaned = SteeringSettings(features=features, layers=layers, method=method).validate(training)
    spec = SteeringSpec(
        method=cleaned.method,
        features=tuple((item["feature_id"], item["coefficient"]) for item in cleaned.features),
        layers=tuple(cleaned.layers),
        feature_scales=steering_scales(training, cleaned.features),
    )
    check_steering_scales(training, cleaned.features)
    try:
        # Float32 whatever the checkpoint's dtype: a control vector file holds float32.
        sae = load_sae(training.checkpoint_path, dtype=torch.float32)
    except (
        SAEFormatError
    ) as error:  # moved or damaged on disk since the training completed: staff must fix it
        raise Conflict(f"Training {training.pk}'s SAE cannot be read: {error}", "training_id") from error
    return control_vector(sae, spec)


CONTROL_VECTOR_MEDIA_TYPE = "application/octet-stream"


def control_vector_gguf(training: Training, features: object, layers: object, method: object) -> bytes:
    """control_vector_of's vectors as a llama.cpp control-vector GGUF file's bytes; InvalidInput naming the
    field when llama.cpp could not apply them (block 0) or nothing is steered (every coefficient 0)."""
    from steering_app.engine.control_vectors import write_gguf

    vectors = control_vector_of(training, features, layers, method)
    if not vectors:
        raise InvalidInput("Every coefficient is 0: there is no steering to export.", "features")
    if 0 in vectors:
        raise InvalidInput(
            "llama.cpp applies no control vector to the output of block 0 (it refuses direction.0): choose "
            "layers from 1 on.",
            "intervention_layers",
        )
    with tempfile.TemporaryDirectory() as folder:
        return write_gguf(Path(folder) / "control.gguf", vectors, model_hint(training.model)).read_bytes()


def model_hint(model: LanguageModel) -> str:
    """What a control vector's controlvector.model_hint names (repeng writes config.model_type, "llama"):
    the architecture's class name without its head (LlamaForCausalLM: llama). llama.cpp does not check it."""
    name = model.architecture
    for head in ("ForCausalLM", "LMHeadModel"):
        name = name.removesuffix(head)
    return name.lower() or "unknown"


def control_vector_filename(training: Training) -> str:
    return f"steerlab-training-{training.pk}-control-vector.gguf"


def multipliers(run: SteeringRun) -> list[float]:
    return list(run.sweep) if run.sweep is not None else [1.0]


def start(run: SteeringRun, on_step: OnStep, should_stop: ShouldStop) -> "Generation":
    """The run's generation, validated against its model and SAE (loaded once per process), not yet in a batch.

    InvalidInput when the engine refuses the request (a prompt too long for the slots, say)."""
    from steering_app.engine import loader
    from steering_app.engine.serving.generate import Generation, prepare
    from steering_app.engine.steer import SpecError

    training = run.training
    lm = loader.load_model(training.model.source)
    sae = loader.load_sae_cached(training.checkpoint_path, lm)
    try:
        if run.conversation_id is not None:
            request = _turn_request(run, lm, sae)
        else:
            request = prepare(
                lm,
                sae,
                prompt=run.prompt,
                variants=variant_specs(run),
                temperature=run.temperature,
                max_new_tokens=run.max_tokens,
                seed=run.seed,
                chat=run.chat,
                sae_layer=training.hook_layer,
            )
    except SpecError as error:
        raise InvalidInput(str(error), error.field) from error
    return Generation(lm, sae, request, on_step, should_stop)


def _turn_request(run: SteeringRun, lm, sae):
    """A conversation turn's request: each side's history (conversation_history.row_messages), and the key under
    which the worker's batch keeps the conversation's rows for its next turn."""
    from steering_app.engine.serving.generate import prepare_turn

    clean, steered = conversation_history.row_messages(run)
    return prepare_turn(
        lm,
        sae,
        clean,
        steered,
        variant_specs(run)[0],
        run.temperature,
        run.max_tokens,
        run.seed,
        keep=keep_key(run),
        sae_layer=run.training.hook_layer,
    )


def keep_key(run: SteeringRun) -> tuple[str, int] | None:
    """The key a conversation's rows are kept under in a worker's batch between its turns (None: not a turn)."""
    return None if run.conversation_id is None else ("conversation", run.conversation_id)


def conclude(
    run: SteeringRun, generation: "Generation", comparison: "Comparison", lean: "LeanStep | None"
) -> Outcome:
    """The run's outputs with every variant's metrics (lean: the lean step of the batch it ran in)."""
    from steering_app import engine
    from steering_app.engine import loader

    embedder = loader.get_embedder()
    result = engine.finish(
        generation.lm, generation.sae, comparison, list(generation.request.variants), embedder, lean
    )
    started = time.perf_counter()
    control_scores, scores = score(run, result, embedder)
    result.timings["scores"] = time.perf_counter() - started
    variants = [
        {
            "multiplier": multiplier,
            "steered_output": variant.text,
            "metrics": variant.metrics,
            "scores": variant_scores,
            "tokens": len(generated.ids),
        }
        for multiplier, variant, variant_scores, generated in zip(
            multipliers(run), result.variants, scores, comparison.variants
        )
    ]
    return Outcome(
        unsteered_output=result.unsteered_text,
        steered_output=variants[0]["steered_output"],
        metrics=variants[0]["metrics"],
        timings=result.timings,
        variants=variants,
        control_scores=control_scores,
        control_tokens=len(comparison.unsteered_ids),
    )


def score(run: SteeringRun, result, embedder) -> tuple[dict, list[dict]]:
    """The concept, fluency, relevance and aggregate scores (engine/analysis/scores.py) of the clean row and of each
    variant, read against the run's features: their labels and descriptions, and their max activations."""
    from steering_app.engine.analysis.scores import Reading, score_outputs

    indices = [item["feature_id"] for item in run.features]
    rows = {row.index: row for row in Feature.objects.filter(training=run.training, index__in=indices)}
    concept_text = "; ".join(
        ". ".join(part for part in (rows[index].label, rows[index].description) if part)
        for index in indices
        if index in rows
    )
    max_activations = [rows[index].max_activation if index in rows else None for index in indices]

    def activations(metrics: dict, side: str) -> tuple[float, ...]:
        return tuple(item[side] for item in metrics["feature_activation"])

    first = result.variants[0].metrics
    clean = Reading(result.unsteered_text, first["perplexity_unsteered"], activations(first, "unsteered"))
    outputs = [
        Reading(variant.text, variant.metrics["perplexity_steered"], activations(variant.metrics, "steered"))
        for variant in result.variants
    ]
    return score_outputs(embedder, run.prompt, concept_text, clean, outputs, max_activations)


Ended = tuple[SteeringRun, Outcome | Exception]


class EngineBatch:
    """The runs sharing one model's slot batch in this worker (continuous batching, engine/serving/scheduler.py).

    admit() prefills a run into free rows at a step boundary; step() advances every admitted run by one
    token and returns the runs that ended, each with its Outcome or the exception that ended it
    (Cancelled when its cancel flag stopped it). runs.process_queued() drives it.
    """

    def __init__(self, run: SteeringRun):
        from steering_app.engine.serving.scheduler import scheduler_for, wide_scheduler

        self.model_id = run.training.model_id
        self.lm = model_loading.ready(run.training.model)  # the waiting runs' pages show its progress
        # An experiment's cells share the engine's wide batch (more rows where free rows cost nothing); other
        # runs the model's shared one. A run gives the same numbers in either (engine/serving/scheduler.py).
        shared = run.experiment_id is None
        with self.lm.lock:
            self.scheduler = scheduler_for(self.lm) if shared else wide_scheduler(self.lm)
        # What staff see of how this worker steps the model (admin, GET /api/models/{id}).
        LanguageModel.objects.filter(pk=self.model_id).update(
            step_plan=self.scheduler.batch.plan.as_dict(),
            step_plan_host=socket.gethostname(),
            step_plan_at=now(),
        )
        self.runs: dict[int, SteeringRun] = {}  # id(generation) -> its run

    @property
    def active(self) -> bool:
        return bool(self.runs)

    def accepts(self, run: SteeringRun) -> bool:
        """True when the run can join now: the same model, and enough rows free or parked by conversations."""
        rows = 1 + len(multipliers(run))
        return run.training.model_id == self.model_id and rows <= self.scheduler.room()

    def admit(self, run: SteeringRun, on_step: OnStep, should_stop: ShouldStop) -> bool:
        """Prefill the run into free rows; False when too few are free. Cancelled when its cancel flag stops
        the prompt read."""
        from steering_app.engine import Stopped
        from steering_app.engine.steer import SpecError

        generation = start(run, on_step, should_stop)
        try:
            with self.lm.lock:
                admitted = self.scheduler.admit(generation)
        except SpecError as error:
            raise InvalidInput(str(error), error.field) from error
        except Stopped as error:
            raise Cancelled(str(error)) from error
        if admitted:
            self.runs[id(generation)] = run
        return admitted

    def step(self) -> list[Ended]:
        from steering_app.engine import Stopped

        with self.lm.lock:
            ended = self.scheduler.step()
        results = []
        for item in ended:
            run = self.runs.pop(id(item.generation))
            if isinstance(item.error, Stopped):
                results.append((run, Cancelled(str(item.error))))
            elif item.error is not None:
                results.append((run, item.error))
            else:
                try:
                    results.append(
                        (run, conclude(run, item.generation, item.comparison, self.scheduler.batch.lean))
                    )
                except Exception as error:  # noqa: BLE001 - a failed metric fails this run only
                    results.append((run, error))
        return results

    def abandon(self) -> list[SteeringRun]:
        """After a failed step (the scheduler has freed its rows): the runs that were in it."""
        runs, self.runs = list(self.runs.values()), {}
        return runs


def batch_for(run: SteeringRun) -> EngineBatch:
    """The batch a worker opens for a run's model (the seam tests replace with a fake engine)."""
    return EngineBatch(run)


def slot_tokens() -> int:
    """Positions one run may hold in the worker's batch (steering_settings.slot_shape, as max_variants())."""
    return slot_shape()[1]


def room_for_new_tokens(prompt_tokens: int) -> int:
    """How many tokens a run may generate after a prompt of that many tokens: its cache holds the prompt and
    every generated token but the last (engine Request.tokens)."""
    return slot_tokens() - prompt_tokens + 1


def history_token_count(training: Training, messages: list[dict]) -> int:
    """How many tokens the model reads for a conversation's history through its chat template (a side's
    row_messages); InvalidInput naming `chat` when the model's tokenizer has no chat template."""
    from steering_app.engine.tokens import encode_chat

    return _token_count(training, lambda tokenizer: encode_chat(tokenizer, messages))


def prompt_token_count(training: Training, prompt: str, chat: bool) -> int:
    """How many tokens the model reads for the prompt (the seam tests replace with a fake engine)."""
    from steering_app.engine.tokens import encode_text

    return _token_count(training, lambda tokenizer: encode_text(tokenizer, prompt, chat))


def _token_count(training: Training, encode: Callable) -> int:
    """len(encode(the training's tokenizer)); the engine's refusal (no chat template) as InvalidInput."""
    from steering_app.engine import loader
    from steering_app.engine.steer import SpecError

    try:
        return len(encode(loader.load_tokenizer(training.model.source)))
    except SpecError as error:
        raise InvalidInput(str(error), error.field) from error


def check_prompt_fits(training: Training, prompt: str, chat: bool, max_new_tokens: int = 1) -> int:
    """The prompt's token count, as the worker will read it; InvalidInput naming `prompt` when the prompt alone
    leaves no room in the worker's slots, or `max_tokens` when it and max_new_tokens do not fit together.

    Every prompt the server reads passes here first, so that no request makes the model read more positions
    than a slot holds (a 20,000-character prompt can be 20,000 tokens)."""
    count = prompt_token_count(training, prompt, chat)
    length = slot_tokens()
    if count > length:
        raise InvalidInput(
            f"The prompt is {count} tokens; the worker's slots hold at most {length} "
            "(STEERLAB_SLOT_TOKENS). Shorten the prompt.",
            "prompt",
        )
    room = room_for_new_tokens(count)
    if max_new_tokens > room:
        raise InvalidInput(
            f"max_tokens can be at most {room} for this {count}-token prompt: the worker's slots hold "
            f"{length} tokens (STEERLAB_SLOT_TOKENS).",
            "max_tokens",
        )
    return count


def residual_norm(training: Training, prompt: str) -> float:
    """|h| at the training's layer over the prompt (clean model): the unit of an uncalibrated training's
    coefficients. InvalidInput for a prompt without text."""
    from steering_app.engine import loader
    from steering_app.engine.analysis.scale import residual_norm as measure
    from steering_app.engine.steer import SpecError

    try:
        return measure(loader.load_model(training.model.source), prompt, training.hook_layer)
    except SpecError as error:
        raise InvalidInput(str(error), error.field) from error


@dataclass(frozen=True)
class PromptFeature:
    """A feature the prompt lights up: its strongest activation over the prompt and the token it peaks on."""

    index: int
    activation: float
    token: str
    feature: Feature | None  # its row: label, max activation, ... (None if the table lacks it)

    @property
    def relative_activation(self) -> float | None:
        """Its activation ÷ its max activation recorded for the training; None when that is unknown."""
        if self.feature is None or not self.feature.is_calibrated:
            return None
        return self.activation / self.feature.max_activation


def active_latents(training: Training, prompt: str, chat: bool, limit: int) -> list[dict]:
    """The training's latents the prompt lights up most, strongest first, as a worker stores them
    ({index, activation, token}): one clean forward of the prompt to the SAE's layer (engine.active).
    InvalidInput naming the field for a prompt without text or a chat template the model lacks."""
    from steering_app.engine import loader
    from steering_app.engine.analysis.active import active_latents as strongest
    from steering_app.engine.steer import SpecError

    lm = loader.load_model(training.model.source)
    sae = loader.load_sae_cached(training.checkpoint_path, lm)
    try:
        latents = strongest(lm, sae, prompt, training.hook_layer, chat=chat, limit=limit)
    except SpecError as error:
        raise InvalidInput(str(error), error.field) from error
    return [
        {"index": latent.index, "activation": latent.activation, "token": latent.token} for latent in latents
    ]


def prompt_features(training: Training, latents: list[dict]) -> list[PromptFeature]:
    """active_latents' answer with each latent's feature row, in the same order."""
    rows = {
        row.index: row
        for row in Feature.objects.filter(
            training=training, index__in=[latent["index"] for latent in latents]
        )
    }
    return [
        PromptFeature(latent["index"], latent["activation"], latent["token"], rows.get(latent["index"]))
        for latent in latents
    ]
