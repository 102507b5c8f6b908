"""The steering panel's state: what its inputs show, opened fresh, from a run, a preset or a refused form."""

import math
from dataclasses import dataclass, field

from django.apps import apps
from django.conf import settings
from django.http import Http404
from django.shortcuts import get_object_or_404

from steering_app.forms import SteeringForm
from steering_app.limits import MAX_ID
from steering_app.models import Feature, SteeringRun, Training
from steering_app.steering_settings import DEFAULT_MAX_TOKENS, DEFAULT_TEMPERATURE

# Slots next to the inputs where the panel shows a field's error (ids error-<name>).
ERROR_SLOTS = (
    "training",
    "prompt",
    "features",
    "layers",
    "method",
    "temperature",
    "max_tokens",
    "seed",
    "chat",
    "private",
)
SLIDER_RANGE = 5.0


@dataclass
class SelectedFeature:
    index: int
    coefficient: float
    label: str = ""
    max_activation: float | None = None
    known: bool = True
    # Uncalibrated: no max activation, so c is in residual-stream units and the script scales the slider to |h|.
    calibrated: bool = True
    # Never fired while the training was calibrated (activation frequency 0): steering it is unlikely to show.
    dead: bool = False

    @property
    def slider_min(self) -> float:
        return min(-SLIDER_RANGE, math.floor(self.coefficient))

    @property
    def slider_max(self) -> float:
        return max(SLIDER_RANGE, math.ceil(self.coefficient))


@dataclass
class PanelState:
    training: Training | None
    prompt: str = ""
    features: list[SelectedFeature] = field(default_factory=list)
    layers: list[int] = field(default_factory=list)
    method: str = SteeringRun.Method.ADDITIVE
    temperature: float = DEFAULT_TEMPERATURE
    max_tokens: int = DEFAULT_MAX_TOKENS
    seed: int | None = None
    chat: bool = False
    private: bool = False

    def __post_init__(self):
        if not self.layers and self.training is not None:
            self.layers = [self.training.hook_layer]


def selected_features(training: Training, items) -> list[SelectedFeature]:
    """Cards for [{feature_id, coefficient}], labelled from the training's Feature rows."""
    items = list(items)
    indices = [item["feature_id"] for item in items]
    rows = {
        feature.index: feature for feature in Feature.objects.filter(training=training, index__in=indices)
    }
    return [_card(item, rows.get(item["feature_id"])) for item in items]


def _card(item: dict, row: Feature | None) -> SelectedFeature:
    return SelectedFeature(
        index=item["feature_id"],
        coefficient=float(item["coefficient"]),
        label=row.label if row else "unknown feature",
        max_activation=row.max_activation if row else None,
        known=row is not None,
        calibrated=row is None or row.is_calibrated,
        dead=row is not None and row.is_dead,
    )


def feature_card(feature: Feature) -> SelectedFeature:
    """The card of a feature just added, at coefficient 0."""
    return _card({"feature_id": feature.index, "coefficient": 0.0}, feature)


def state_from_run(run: SteeringRun) -> PanelState:
    return PanelState(
        training=run.training,
        prompt=run.prompt,
        features=selected_features(run.training, run.features),
        layers=list(run.intervention_layers),
        method=run.method,
        temperature=run.temperature,
        max_tokens=run.max_new_tokens,
        seed=run.seed,
        chat=run.chat,
        private=run.private,
    )


def state_from_preset(preset) -> PanelState:
    training = get_object_or_404(Training.objects.completed(), pk=preset.training_id)
    return PanelState(
        training=training,
        features=selected_features(training, preset.features),
        layers=list(preset.intervention_layers),
        method=preset.method,
        temperature=preset.temperature,
        max_tokens=preset.max_tokens,
        prompt=preset.prompt,
        seed=preset.seed,
        chat=preset.chat,
    )


def state_from_form(form: SteeringForm) -> PanelState:
    """What the user submitted, to show it again beside the errors (the no-JavaScript path)."""
    data = form.cleaned_data
    completed = Training.objects.completed()
    training = completed.filter(pk=data.get("training")).first() or completed.first()
    state = PanelState(training=training, prompt=form.data.get("prompt", ""))
    if training is None:
        return state
    if data.get("training") == training.pk:
        state.features = selected_features(training, data.get("features") or [])
    state.layers = data.get("layers") or state.layers
    state.method = data.get("method") or state.method
    state.temperature = data.get("temperature", state.temperature)
    state.max_tokens = data.get("max_tokens") or state.max_tokens
    state.seed = data.get("seed")
    state.chat = bool(data.get("chat"))
    state.private = bool(data.get("private"))
    return state


def initial_state(request) -> PanelState:
    """The panel opened with ?run=, ?preset= or ?training=, else on the newest completed training."""
    if "run" in request.GET:
        runs = SteeringRun.objects.visible_to(request.user).select_related("training__model")
        return state_from_run(get_object_or_404(runs, pk=_id_or_404(request.GET["run"])))
    if "preset" in request.GET:
        # Looked up by name: presets_app builds on steering_app, not the other way round.
        presets = apps.get_model("presets_app", "SteeringPreset").objects
        return state_from_preset(get_object_or_404(presets, pk=_id_or_404(request.GET["preset"])))
    completed = Training.objects.completed()
    if "training" in request.GET:
        return PanelState(training=get_object_or_404(completed, pk=_id_or_404(request.GET["training"])))
    return PanelState(training=completed.first())


def _id_or_404(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise Http404("Not a valid id.") from None
    if not 1 <= value <= MAX_ID:
        raise Http404("Not a valid id.")
    return value


def error_context(form: SteeringForm | None) -> dict:
    errors = (
        {name: " ".join(str(m) for m in messages) for name, messages in form.errors.items()} if form else {}
    )
    return {
        "field_errors": errors,
        "error_slots": [(name, errors.get(name, "")) for name in ERROR_SLOTS],
        "error_list": form.error_list() if form is not None else [],
    }


def panel_context(state: PanelState, form: SteeringForm | None = None) -> dict:
    # Imported here: the engine brings torch, which a web process that only enqueues runs never needs.
    from steering_app.engine.loader import has_chat_template

    training = state.training
    return {
        **error_context(form),
        "trainings": list(Training.objects.completed()),
        "training": training,
        "state": state,
        "layer_choices": range(training.model.num_layers if training else 0),
        "chat_available": bool(training) and has_chat_template(training.model.source),
        "max_tokens_cap": settings.STEERLAB_MAX_NEW_TOKENS,
        "methods": SteeringRun.Method.choices,
    }
