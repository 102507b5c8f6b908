"""The steering panel's form: parses the browser's fields into SteeringSettings and a RunRequest.

Only types are checked here; ranges, ownership of features and layer rules are SteeringSettings.validate's
job, so the panel, presets and the JSON API reject the same requests with the same messages.
"""

from django import forms

from steering_app.errors import SteeringError
from steering_app.form_integers import storable_int
from steering_app.limits import MAX_ID, MAX_INDEX
from steering_app.models import SteeringRun, SteeringRunQuerySet
from steering_app.runs import RunRequest
from steering_app.steering_settings import SteeringSettings

# SteeringError.field -> the form field that shows the message
ERROR_FIELDS = {
    "training_id": "training",
    "model_id": "training",
    "prompt": "prompt",
    "features": "features",
    "intervention_layers": "layers",
    "temperature": "temperature",
    "max_tokens": "max_tokens",
    "seed": "seed",
    "method": "method",
    "chat": "chat",
    "sweep": "sweep",
    "private": "private",
}


class SteeringForm(forms.Form):
    training = forms.IntegerField(label="Training Job", min_value=1, max_value=MAX_ID)
    prompt = forms.CharField(label="Prompt", required=False, strip=False, widget=forms.Textarea)
    method = forms.ChoiceField(label="Method", choices=SteeringRun.Method.choices)
    temperature = forms.FloatField(label="Temperature")
    max_tokens = forms.IntegerField(label="Max Tokens", max_value=MAX_INDEX)
    seed = forms.IntegerField(label="Seed", required=False, max_value=MAX_ID)
    chat = forms.BooleanField(label="Chat template", required=False)
    # The checkbox's value lists the multipliers ("0.5,1,2,4"), so a run's own sweep survives a reopen.
    sweep = forms.CharField(label="Sweep strength", required=False)
    private = forms.BooleanField(label="Private", required=False)
    # Repeated inputs; parsed in clean() from the raw lists.
    layers = forms.Field(label="Intervention Layers", required=False)
    features = forms.Field(label="Selected Features", required=False)

    def clean(self):
        cleaned = super().clean()
        cleaned["layers"] = self._integers("layers", self.data.getlist("layers"))
        cleaned["features"] = self._features()
        cleaned["sweep"] = self._sweep(cleaned.get("sweep") or "")
        return cleaned

    def _sweep(self, raw: str) -> list[float] | None:
        if not raw.strip():
            return None
        try:
            return [float(item) for item in raw.split(",")]
        except ValueError:
            self.add_error("sweep", "Sweep multipliers must be numbers separated by commas.")
            return None

    def _integers(self, field: str, raw: list[str]) -> list[int]:
        try:
            return [storable_int(value, MAX_INDEX) for value in raw]
        except ValueError:
            self.add_error(field, "Every value must be a whole number.")
            return []

    def _features(self) -> list[dict]:
        indices = self.data.getlist("feature_id")
        coefficients = self.data.getlist("coefficient")
        if len(indices) != len(coefficients):
            self.add_error("features", "Each feature needs exactly one coefficient.")
            return []
        try:
            return [
                {"feature_id": storable_int(index, MAX_INDEX), "coefficient": float(coefficient)}
                for index, coefficient in zip(indices, coefficients, strict=True)
            ]
        except ValueError:
            self.add_error(
                "features", f"Feature ids must be whole numbers up to {MAX_INDEX} and coefficients numbers."
            )
            return []

    def steering_settings(self) -> SteeringSettings:
        data = self.cleaned_data
        return SteeringSettings(
            features=data["features"],
            layers=data["layers"],
            method=data["method"],
            temperature=data["temperature"],
            max_tokens=data["max_tokens"],
            sweep=data.get("sweep"),
        )

    def run_request(self) -> RunRequest:
        data = self.cleaned_data
        return RunRequest(
            training_id=data["training"],
            prompt=data["prompt"],
            settings=self.steering_settings(),
            seed=data["seed"],
            chat=data["chat"],
            private=data["private"],
        )

    def add_steering_error(self, error: SteeringError) -> None:
        """Show a domain error beside the input it names (or above the form when it names none)."""
        self.add_error(ERROR_FIELDS.get(error.field), error.message)

    def error_list(self) -> list[tuple[str, str]]:
        """(field label, message) pairs, so a message always says which input it is about."""
        items = []
        for name, errors in self.errors.items():
            label = self.fields[name].label if name in self.fields else "Request"
            items.extend((label, str(message)) for message in errors)
        return items


class RunFilterForm(forms.Form):
    """The run history's filters (a GET form): whose runs, which training, which steered feature.

    A value it cannot use is shown as the field's error and that filter is left out.
    """

    MINE, EVERYONE = "mine", "all"

    scope = forms.ChoiceField(
        label="Runs", choices=[(MINE, "Mine"), (EVERYONE, "Everyone's")], required=False
    )
    training = forms.IntegerField(label="Training", min_value=1, max_value=MAX_ID, required=False)
    feature = forms.CharField(label="Feature", max_length=20, required=False)

    def __init__(self, data, user):
        super().__init__(data)
        self.user = user

    def clean_feature(self) -> int | None:
        raw = self.cleaned_data["feature"].strip().removeprefix("#")
        if not raw:
            return None
        if not raw.isdecimal() or int(raw) > MAX_INDEX:
            raise forms.ValidationError("A feature is its index, like 12 or #12.")
        return int(raw)

    @property
    def scope_value(self) -> str:
        """Staff see everyone's runs unless they ask for their own; members their own unless they ask."""
        self.is_valid()
        chosen = self.cleaned_data.get("scope")
        return chosen or (self.EVERYONE if self.user.is_staff else self.MINE)

    def filter(self, runs: SteeringRunQuerySet) -> SteeringRunQuerySet:
        """`runs` (already those the user may read) narrowed by the valid filters."""
        self.is_valid()
        data = self.cleaned_data
        if self.scope_value == self.MINE:
            runs = runs.filter(owner=self.user)
        if data.get("training"):
            runs = runs.filter(training_id=data["training"])
        if data.get("feature") is not None:
            runs = runs.steering_feature(data["feature"])
        return runs
