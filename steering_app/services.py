"""Django records -> engine calls: load what a run needs and compute its comparison.

runs.py decides a run's life; this module only turns a SteeringRun into engine arguments and the
engine's result into the values a run stores.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from steering_app.errors import InvalidInput
from steering_app.models import Feature, SteeringRun, Training

if TYPE_CHECKING:
    from steering_app.engine.steer import SteeringSpec

OnStep = Callable[[str, str], None]
ShouldStop = Callable[[], bool]


class Cancelled(Exception):
    """The run's cancel flag stopped the generation between two steps."""


@dataclass(frozen=True)
class Outcome:
    unsteered_output: str
    steered_output: str
    metrics: dict
    timings: dict


def steering_spec(run: SteeringRun) -> "SteeringSpec":
    """The engine's SteeringSpec for a run, with each feature's a_i (its max activation, 1 when unknown)."""
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


def execute(run: SteeringRun, on_step: OnStep, should_stop: ShouldStop | None = None) -> Outcome:
    """Run the comparison on the run's model and SAE; on_step(unsteered_delta, steered_delta) streams.

    should_stop is asked before every model step; Cancelled means it said stop.
    """
    from steering_app import engine
    from steering_app.engine import loader

    training = run.training
    lm = loader.load_model(training.model.source)
    sae = loader.load_sae_cached(training.checkpoint_path, lm)
    try:
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
            should_stop=should_stop,
        )
    except engine.Stopped as stopped:
        raise Cancelled(str(stopped)) from stopped
    return Outcome(result.unsteered_text, result.steered_text, result.metrics, result.timings)


def residual_norm(training: Training, prompt: str) -> float:
    """|h| at the training's layer over the prompt (clean model): the unit of an uncalibrated training's
    coefficients. InvalidInput for a prompt without text."""
    from steering_app.engine import loader
    from steering_app.engine.scale import residual_norm as measure
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


def features_active_on(
    training: Training, prompt: str, chat: bool = False, limit: int = 20
) -> list[PromptFeature]:
    """The training's features the prompt lights up most, strongest first: one clean forward of the prompt to
    the SAE's layer (engine.active). InvalidInput naming the field for an empty or oversized prompt, or a chat
    template the model lacks."""
    from steering_app.engine import loader
    from steering_app.engine.active import active_latents
    from steering_app.engine.steer import SpecError
    from steering_app.limits import MAX_PROMPT_CHARS

    if not prompt.strip():
        raise InvalidInput("prompt is empty: enter the text whose features to list.", "prompt")
    if len(prompt) > MAX_PROMPT_CHARS or "\x00" in prompt:
        raise InvalidInput(f"prompt must be at most {MAX_PROMPT_CHARS} characters of text.", "prompt")
    lm = loader.load_model(training.model.source)
    sae = loader.load_sae_cached(training.checkpoint_path, lm)
    try:
        latents = active_latents(lm, sae, prompt, training.hook_layer, chat=chat, limit=limit)
    except SpecError as error:
        raise InvalidInput(str(error), error.field) from error
    rows = {
        row.index: row
        for row in Feature.objects.filter(training=training, index__in=[latent.index for latent in latents])
    }
    return [
        PromptFeature(latent.index, latent.activation, latent.token, rows.get(latent.index))
        for latent in latents
    ]
