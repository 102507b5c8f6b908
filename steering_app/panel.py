"""The steering panel's state: what its inputs show, opened fresh, from a run, a preset, its URL or a refused
form."""

import math
from dataclasses import dataclass, field

from django.apps import apps
from django.conf import settings
from django.http import Http404
from django.shortcuts import get_object_or_404

from steering_app import limits, services
from steering_app.errors import InvalidInput
from steering_app.forms import SteeringForm
from steering_app.model_files import has_chat_template
from steering_app.models import Feature, SteeringRun, Training
from steering_app.steering_settings import (
    DEFAULT_MAX_TOKENS,
    DEFAULT_SWEEP,
    DEFAULT_TEMPERATURE,
    max_variants,
    slot_shape,
)

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
    "sweep",
    "private",
)
SLIDER_RANGE = 5.0
# The mock's Amplify button: where a feature just added starts, so that a first Generate steers with it.
AMPLIFY = 2.0
# The panel's configuration in its URL: the steering form's own field names (static/js/panel_state.js writes
# the form into the query string as the user edits; a reload or a shared link reads it back). chat and
# private come as 1 or 0 there, since an unticked box would otherwise be missing, as an absent value is.
QUERY_FIELDS = (
    "training",
    "prompt",
    "method",
    "temperature",
    "max_tokens",
    "seed",
    "chat",
    "private",
    "sweep",
    "layers",
    "feature_id",
    "coefficient",
)
FLAGS = {"1": True, "on": True, "true": True, "0": False, "off": False, "false": False}
SHOWN_CHARS = 40


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
    # Its row, for the details (description, top tokens, snippets); None when the training lacks it.
    row: Feature | None = None

    @property
    def slider_bound(self) -> float:
        """The slider spans ±this: ±5 as in the mock, wider when the coefficient is (the script does the same
        when a value is typed), so that the range input never clamps the coefficient it submits."""
        return max(SLIDER_RANGE, math.ceil(abs(self.coefficient)))

    @property
    def slider_min(self) -> float:
        return -self.slider_bound

    @property
    def slider_max(self) -> float:
        return self.slider_bound

    @property
    def scale_label(self) -> str:
        """The bound as the scale under the slider shows it (5.0, 12, 150), like the script's scaleNumber."""
        bound = self.slider_bound
        return f"{bound:.1f}" if bound < 10 else f"{bound:.0f}"


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
    sweep: list[float] | None = None
    # Chat mode's system prompt: a loaded preset's, or what a refused Start chat sent.
    system_prompt: str = ""
    # Where it came from, for the note above the form: the preset loaded or the run copied (restored: the
    # user's last run, reopened because the URL named nothing), whether the URL changed it since, and what
    # the URL asked for that the panel cannot use.
    preset: object | None = None
    run: SteeringRun | None = None
    restored: bool = False
    edited: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def sweep_value(self) -> str:
        """The sweep multipliers' text input: this state's multipliers, else the default ones."""
        return ", ".join(f"{item:g}" for item in (self.sweep or DEFAULT_SWEEP))

    @property
    def multiplicative(self) -> bool:
        return self.method == SteeringRun.Method.MULTIPLICATIVE

    def layer_chips(self) -> list[dict]:
        """The layer grid: under multiplicative steering only the SAE's own layer can act (DESIGN.md's steering
        math), so it is the one checked and required, and the others are disabled (a disabled box is not sent)."""
        hook_layer = self.training.hook_layer
        return [
            {
                "layer": layer,
                "sae": layer == hook_layer,
                "checked": layer == hook_layer if self.multiplicative else layer in self.layers,
                "disabled": self.multiplicative and layer != hook_layer,
            }
            for layer in range(self.training.model.num_layers)
        ]

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
        row=row,
    )


def feature_card(feature: Feature) -> SelectedFeature:
    """The card of a feature just added, at the Amplify coefficient."""
    return _card({"feature_id": feature.index, "coefficient": AMPLIFY}, feature)


def state_from_run(run: SteeringRun) -> PanelState:
    return _state_from_saved(run.training, run, private=run.private, run=run)


def state_from_preset(preset) -> PanelState:
    training = get_object_or_404(Training.objects.completed(), pk=preset.training_id)
    return _state_from_saved(training, preset, preset=preset, system_prompt=preset.system_prompt)


def _state_from_saved(training: Training, saved, **origin) -> PanelState:
    """The panel as a run or a preset has it: both carry SteeringConfig's fields, a prompt and a seed."""
    return PanelState(
        training=training,
        prompt=saved.prompt,
        features=selected_features(training, saved.features),
        layers=list(saved.intervention_layers),
        method=saved.method,
        temperature=saved.temperature,
        max_tokens=saved.max_tokens,
        seed=saved.seed,
        chat=saved.chat,
        sweep=saved.sweep,
        **origin,
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
    state.sweep = data.get("sweep")
    state.private = bool(data.get("private"))
    state.system_prompt = form.data.get("system_prompt", "")
    return state


def initial_state(request) -> PanelState:
    """The panel opened from its URL: ?run= or ?preset= fill it from a run or a preset, ?training= opens a
    training, and the form's fields in the query (QUERY_FIELDS) set the rest. A URL with none of these
    reopens the user's last run, else the newest completed training."""
    query = request.GET
    if "run" in query:
        runs = SteeringRun.objects.visible_to(request.user).select_related("training__model", "owner")
        state = state_from_run(get_object_or_404(runs, pk=_id_or_404(query["run"])))
    elif "preset" in query:
        # Looked up by name: presets_app builds on steering_app, not the other way round.
        presets = apps.get_model("presets_app", "SteeringPreset").objects.select_related("owner")
        state = state_from_preset(get_object_or_404(presets, pk=_id_or_404(query["preset"])))
    elif not any(name in query for name in QUERY_FIELDS):
        return _last_run_state(request.user) or PanelState(training=Training.objects.completed().first())
    else:
        state = PanelState(training=Training.objects.completed().first())
    return apply_query(state, query)


def _last_run_state(user) -> PanelState | None:
    last = (
        SteeringRun.objects.filter(owner=user, training__status=Training.Status.COMPLETED)
        .select_related("training__model", "owner")
        .order_by("-created_at", "-id")
        .first()
    )
    if last is None:
        return None
    state = state_from_run(last)
    state.restored = True
    return state


def apply_query(state: PanelState, query) -> PanelState:
    """`state` with the form's fields of the query applied. A value the panel cannot use is left out with a
    note saying why, never an error page. A query that names the training is a whole configuration (what
    the page's script writes): its features and layers are then all there are, none when it has none."""
    notes: list[str] = []
    whole = "training" in query
    if whole:
        training = get_object_or_404(Training.objects.completed(), pk=_id_or_404(query["training"]))
        if training != state.training:  # the preset's or run's settings belong to another feature space
            state = PanelState(training=training, prompt=state.prompt)
    training = state.training
    if training is None:
        return state
    for name, parse in (
        ("prompt", _prompt),
        ("method", _method),
        ("temperature", _bounded(float, 0, limits.MAX_TEMPERATURE)),
        ("max_tokens", _bounded(int, 1, settings.STEERLAB_MAX_NEW_TOKENS)),
        ("seed", _seed),
        ("chat", _flag),
        ("private", _flag),
        ("sweep", _sweep),
    ):
        if name in query:
            try:
                setattr(state, name, parse(query[name]))
            except ValueError as error:
                notes.append(f"Ignored {name}={_shown(query[name])} from the link: {error}.")
    if whole and "sweep" not in query:
        state.sweep = None  # the Sweep box unticked: its multipliers are not sent
    if whole or "layers" in query:
        state.layers = _query_layers(query.getlist("layers"), training, notes)
    if whole or "feature_id" in query or "coefficient" in query:
        state.features = _query_features(query, training, notes)
    state.edited = any(name in query for name in QUERY_FIELDS) and (state.preset or state.run) is not None
    state.notes = notes
    return state


def _shown(raw: str) -> str:
    return repr(raw if len(raw) <= SHOWN_CHARS else raw[:SHOWN_CHARS] + "…")


def _bounded(kind: type, low, high):
    def parse(raw: str):
        try:
            value = kind(raw)
        except (ValueError, OverflowError):
            raise ValueError("not a whole number" if kind is int else "not a number") from None
        # The finite bounds refuse NaN and ±inf too; math.isfinite would overflow on a 400-digit int.
        if not low <= value <= high:
            raise ValueError(f"outside {_number(low)} to {_number(high)}")
        return value

    return parse


def _number(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _prompt(raw: str) -> str:
    if len(raw) > limits.MAX_PROMPT_CHARS or "\x00" in raw:
        raise ValueError(f"a prompt is at most {limits.MAX_PROMPT_CHARS} characters of text")
    return raw


def _method(raw: str) -> str:
    if raw not in SteeringRun.Method.values:
        raise ValueError("the method is additive or multiplicative")
    return raw


def _seed(raw: str) -> int | None:
    """A random seed per run when blank, else a non-negative 63-bit integer."""
    return _bounded(int, 0, limits.MAX_SEED)(raw) if raw.strip() else None


def _sweep(raw: str) -> list[float]:
    """The sweep's multipliers as the form sends them ("0.5, 1, 2, 4"), within the limits that need no
    features (steering_settings._sweep checks the scaled coefficients when the run is created)."""
    try:
        multipliers = [float(item) for item in raw.split(",")]
    except ValueError:
        raise ValueError("multipliers are numbers separated by commas") from None
    variants = max_variants()
    if not 1 <= len(multipliers) <= variants:
        raise ValueError(f"a sweep has 1 to {variants} multipliers")
    if not all(
        abs(item) <= limits.MAX_SWEEP_MULTIPLIER for item in multipliers
    ):  # NaN fails the comparison too
        raise ValueError(f"each multiplier is a finite number within ±{limits.MAX_SWEEP_MULTIPLIER:g}")
    return multipliers


def _flag(raw: str) -> bool:
    if raw.lower() not in FLAGS:
        raise ValueError("1 or 0")
    return FLAGS[raw.lower()]


def _query_layers(values: list[str], training: Training, notes: list[str]) -> list[int]:
    parse = _bounded(int, 0, training.model.num_layers - 1)
    layers = set()
    for raw in values:
        try:
            layers.add(parse(raw))
        except ValueError as error:
            notes.append(f"Ignored layer {_shown(raw)} from the link: {error}.")
    return sorted(layers) or [training.hook_layer]


def _query_features(query, training: Training, notes: list[str]) -> list[SelectedFeature]:
    indices, coefficients = query.getlist("feature_id"), query.getlist("coefficient")
    if len(indices) != len(coefficients):
        notes.append("Ignored the link's features: each feature needs exactly one coefficient.")
        return []
    limit = training.max_abs_coefficient
    index_of, coefficient_of = _bounded(int, 0, limits.MAX_INDEX), _bounded(float, -limit, limit)
    items, seen = [], set()
    for raw_index, raw_coefficient in zip(indices, coefficients, strict=True):
        try:
            index, coefficient = index_of(raw_index), coefficient_of(raw_coefficient)
        except ValueError as error:
            notes.append(f"Ignored feature {_shown(raw_index)} from the link: {error}.")
            continue
        if index not in seen and len(items) < limits.MAX_FEATURES:
            seen.add(index)
            items.append({"feature_id": index, "coefficient": coefficient})
    cards = selected_features(training, items)
    for card in cards:
        if not card.known:
            notes.append(
                f"Ignored feature #{card.index} from the link: training {training.pk} has no such feature."
            )
    return [card for card in cards if card.known]


def _id_or_404(raw: str) -> int:
    try:
        return _bounded(int, 1, limits.MAX_ID)(raw)
    except ValueError:
        raise Http404("Not a valid id.") from None


def error_context(form: SteeringForm | None) -> dict:
    errors = (
        {name: " ".join(str(m) for m in messages) for name, messages in form.errors.items()} if form else {}
    )
    return {
        "field_errors": errors,
        "error_slots": [(name, errors.get(name, "")) for name in ERROR_SLOTS],
        "error_list": form.error_list() if form is not None else [],
    }


def max_tokens_hint(training: Training, prompt: str = "", chat: bool = False) -> dict:
    """What the hint beside Max Tokens says: the most any prompt allows (a one-token prompt leaves the whole slot,
    its last token never cached), and once a prompt is typed, the most that prompt leaves room for."""
    _rows, slot_tokens = slot_shape()
    cap = min(settings.STEERLAB_MAX_NEW_TOKENS, slot_tokens)
    hint = {"max_tokens_cap": cap, "slot_tokens": slot_tokens}
    if not prompt.strip():
        return hint
    try:
        count = services.check_prompt_fits(training, prompt, chat)  # a prompt too long for a slot says so
    except InvalidInput as error:
        return {**hint, "prompt_error": error.message}
    return {
        **hint,
        "prompt_tokens": count,
        "max_tokens_room": min(cap, services.room_for_new_tokens(count)),
    }


def panel_context(state: PanelState, form: SteeringForm | None = None) -> dict:
    training = state.training
    return {
        **error_context(form),
        "trainings": list(Training.objects.completed()),
        "training": training,
        "state": state,
        "layer_chips": state.layer_chips() if training else [],
        "chat_available": bool(training) and has_chat_template(training.model.source),
        **(max_tokens_hint(training) if training else {}),
        # A reopened prompt asks for its own maximum as the panel loads (a typed one as the typing pauses).
        "hint_on_load": bool(state.prompt.strip()),
        "max_layers": limits.MAX_LAYERS,
        "max_variants": max_variants(),
        "methods": SteeringRun.Method.choices,
    }
