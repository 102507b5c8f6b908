"""SteeringSettings: what a run steers with and a preset saves, and the one check of it; RunRequest, a run's.

Runs, presets, the panel's forms and the API all build a SteeringSettings and call validate(training):
one set of rules, one set of messages, each naming the field at fault. It reads the worker's batch shape from
settings alone (slot_shape), so the web tier checks requests without importing the engine and torch.
"""

from collections.abc import Container, Mapping
from dataclasses import dataclass, field, replace

from django.conf import settings

from steering_app import engine_config
from steering_app.errors import InvalidInput
from steering_app.limits import (
    MAX_FEATURES,
    MAX_INDEX,
    MAX_LAYERS,
    MAX_SWEEP_MULTIPLIER,
    MAX_TEMPERATURE,
    MAX_VARIANTS,
)
from steering_app.models import Feature, SteeringRun, Training

DEFAULT_TEMPERATURE = 0.7
DEFAULT_MAX_TOKENS = 64
DEFAULT_SWEEP = (0.5, 1.0, 2.0, 4.0)


@dataclass(frozen=True)
class SteeringSettings:
    """features: [{"feature_id": index, "coefficient": c}]; layers: the decoder blocks to steer."""

    features: list[dict] = field(default_factory=list)
    layers: list[int] = field(default_factory=list)
    method: str = SteeringRun.Method.ADDITIVE
    temperature: float = DEFAULT_TEMPERATURE
    max_tokens: int = DEFAULT_MAX_TOKENS
    # A strength sweep: one steered variant per multiplier, each the features with every coefficient times
    # it; None is one variant, the features as given.
    sweep: list[float] | None = None

    @classmethod
    def from_fields(cls, fields: Mapping) -> "SteeringSettings":
        """From the names the API, presets and stored runs use (intervention_layers, max_tokens); a missing
        or null method or number takes the default."""

        def given(name: str, default):
            value = fields.get(name)
            return default if value is None else value

        return cls(
            features=fields.get("features"),
            layers=fields.get("intervention_layers"),
            method=given("method", SteeringRun.Method.ADDITIVE),
            temperature=given("temperature", DEFAULT_TEMPERATURE),
            max_tokens=given("max_tokens", DEFAULT_MAX_TOKENS),
            sweep=fields.get("sweep"),
        )

    def as_fields(self) -> dict:
        """The stored fields these settings fill (SteeringConfig's but chat): from_fields read backwards."""
        return {
            "features": self.features,
            "intervention_layers": self.layers,
            "method": self.method,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            "sweep": self.sweep,
        }

    def validate(
        self, training: Training, known_features: Container[int] | None = None
    ) -> "SteeringSettings":
        """The cleaned settings (layers sorted and unique, numbers as floats); raises InvalidInput.

        known_features, the training's feature indices, spares a query when many settings are checked at once.
        """
        method = _method(self.method, training)
        features = _features(self.features, training, known_features)
        return replace(
            self,
            method=method,
            temperature=_temperature(self.temperature),
            max_tokens=_max_tokens(self.max_tokens),
            layers=_layers(self.layers, training, method),
            features=features,
            sweep=_sweep(self.sweep, features, training),
        )

    def variant_features(self) -> list[list[dict]]:
        """The features of each steered variant: one as given, or one per sweep multiplier."""
        if self.sweep is None:
            return [self.features]
        return [
            [{**item, "coefficient": item["coefficient"] * multiplier} for item in self.features]
            for multiplier in self.sweep
        ]


def is_integer(value: object) -> bool:
    """JSON's true and false are ints to Python; a rule that wants a number must refuse them."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    return is_integer(value) or isinstance(value, float)


def within(value: object, limit: float) -> bool:
    """A number with |value| <= limit: NaN and ±inf are not. Python compares an int with a float exactly,
    so an integer no float can hold (JSON's 1 followed by 400 zeros) is refused here, where float() or
    math.isfinite() would raise OverflowError."""
    return is_number(value) and abs(value) <= limit


def _method(method: object, training: Training) -> str:
    if method not in SteeringRun.Method.values:
        raise InvalidInput("method must be additive or multiplicative.", "method")
    if method == SteeringRun.Method.MULTIPLICATIVE and training.is_vector_space:
        raise InvalidInput(
            f"Training {training.pk} is a steering-vector space: a vector has no encoder to scale a feature by, "
            "so only additive steering applies.",
            "method",
        )
    return method


def _temperature(temperature: object) -> float:
    if not is_number(temperature) or not 0 <= temperature <= MAX_TEMPERATURE:
        raise InvalidInput(f"temperature must be between 0 and {MAX_TEMPERATURE:g}.", "temperature")
    return float(temperature)


def _max_tokens(max_tokens: object) -> int:
    cap = settings.STEERLAB_MAX_NEW_TOKENS
    if not is_integer(max_tokens) or not 1 <= max_tokens <= cap:
        raise InvalidInput(f"max_tokens must be between 1 and {cap}.", "max_tokens")
    return max_tokens


def _layers(layers: object, training: Training, method: str) -> list[int]:
    if not isinstance(layers, list | tuple) or not layers:
        raise InvalidInput("Select at least one intervention layer.", "intervention_layers")
    if len(set(layers)) > MAX_LAYERS:
        raise InvalidInput(f"At most {MAX_LAYERS} intervention layers.", "intervention_layers")
    num_layers = training.model.num_layers
    for layer in layers:
        if not is_integer(layer) or not 0 <= layer < num_layers:
            raise InvalidInput(
                f"Layer {layer} is out of range: {training.model.name} has layers 0..{num_layers - 1}.",
                "intervention_layers",
            )
    cleaned = sorted(set(layers))
    if method == SteeringRun.Method.MULTIPLICATIVE and cleaned != [training.hook_layer]:
        raise InvalidInput(
            f"Multiplicative steering acts only at the SAE's own layer {training.hook_layer}.",
            "intervention_layers",
        )
    return cleaned


def _features(features: object, training: Training, known: Container[int] | None) -> list[dict]:
    if not isinstance(features, list | tuple) or not features:
        raise InvalidInput("Add at least one feature.", "features")
    if len(features) > MAX_FEATURES:
        raise InvalidInput(f"At most {MAX_FEATURES} features.", "features")
    limit = training.max_abs_coefficient
    cleaned = [_feature(item, training, limit) for item in features]
    indices = [item["feature_id"] for item in cleaned]
    repeated = sorted({index for index in indices if indices.count(index) > 1})
    if repeated:
        raise InvalidInput(f"Feature {repeated[0]} is listed twice.", "features")
    if known is None:
        # An index past the database's integer range cannot be looked up (the query would overflow): unknown.
        storable = [index for index in indices if index <= MAX_INDEX]
        known = set(
            Feature.objects.filter(training=training, index__in=storable).values_list("index", flat=True)
        )
    missing = [index for index in indices if index not in known]
    if missing:
        raise InvalidInput(f"Features {missing} do not belong to training {training.pk}.", "features")
    return cleaned


def _feature(item: object, training: Training, limit: float) -> dict:
    if not isinstance(item, dict):
        raise InvalidInput('Each feature must be {"feature_id": index, "coefficient": c}.', "features")
    index, coefficient = item.get("feature_id"), item.get("coefficient")
    if not is_integer(index) or index < 0:
        raise InvalidInput(f"feature_id must be a non-negative integer; got {index!r}.", "features")
    if not is_number(coefficient):
        raise InvalidInput(f"Coefficient of feature {index} must be a number.", "features")
    if not within(coefficient, limit):
        raise InvalidInput(
            f"Coefficient of feature {index} must be finite and within ±{limit:g}, "
            f"the limit of training {training.pk} ({_units(training)}).",
            "features",
        )
    return {"feature_id": index, "coefficient": float(coefficient)}


def _sweep(sweep: object, features: list[dict], training: Training) -> list[float] | None:
    """None, or 1 to max_variants() multipliers, each within ±MAX_SWEEP_MULTIPLIER, whose scaled coefficients
    stay within the training's limit. The one check of a sweep: the panel's form, the API's schemas and
    presets leave every limit to it, so they accept and refuse the same sweeps."""
    if sweep is None:
        return None
    variants = max_variants()
    if not isinstance(sweep, list | tuple) or not 1 <= len(sweep) <= variants:
        raise InvalidInput(f"sweep must list 1 to {variants} strength multipliers.", "sweep")
    if not all(within(item, MAX_SWEEP_MULTIPLIER) for item in sweep):
        raise InvalidInput(
            f"Each sweep multiplier must be a finite number within ±{MAX_SWEEP_MULTIPLIER:g}.", "sweep"
        )
    limit = training.max_abs_coefficient
    strongest = max(abs(item["coefficient"]) for item in features) * max(abs(item) for item in sweep)
    if strongest > limit:
        raise InvalidInput(
            f"The sweep scales a coefficient to {strongest:g}, beyond ±{limit:g}, the limit of training "
            f"{training.pk} ({_units(training)}).",
            "sweep",
        )
    return [float(item) for item in sweep]


@dataclass(frozen=True)
class RunRequest:
    """Everything one comparison needs: the settings, plus what only a run has (prompt, seed, chat)."""

    training_id: int
    prompt: str
    settings: SteeringSettings
    seed: int | None = None
    chat: bool = False
    model_id: int | None = None
    private: bool = False


def slot_shape() -> tuple[int, int]:
    """(rows, tokens) of a worker's batch, from settings alone: STEERLAB_SLOT_ROWS and STEERLAB_SLOT_TOKENS, else
    the defaults of STEERLAB_DEVICE's kind. A worker whose device is auto takes its device's (engine_config); the
    web tier cannot know that device without torch and checks against the CPU's, the smaller shape: behind GPU
    workers, set STEERLAB_DEVICE=cuda (or the slot variables) on every host so that both use the GPU's."""
    kind = "cuda" if settings.STEERLAB_DEVICE.startswith("cuda") else "cpu"
    return engine_config.slot_shape(kind, settings.STEERLAB_SLOT_ROWS, settings.STEERLAB_SLOT_TOKENS)


def max_variants() -> int:
    """Steered variants per run: MAX_VARIANTS, or fewer when the worker's batch has fewer rows (one is the
    clean row)."""
    rows, _tokens = slot_shape()
    return min(MAX_VARIANTS, rows - 1)


def _units(training: Training) -> str:
    if training.is_calibrated:
        return "multiples of each feature's max activation"
    return "uncalibrated: residual-stream units"
