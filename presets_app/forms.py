"""The panel's "Save preset" form: the steering form's fields, a name and a description."""

from django import forms

from steering_app.errors import InvalidInput
from steering_app.forms import SteeringForm

# form field -> the preset field a message names (as the API names it)
PRESET_FIELDS = {
    "training": "training_id",
    "layers": "intervention_layers",
    "preset_name": "name",
    "preset_description": "description",
}


class PresetForm(SteeringForm):
    """Parses what the panel would generate with, prompt, seed and chat setting included."""

    preset_name = forms.CharField(required=False, strip=False)
    preset_description = forms.CharField(required=False, strip=False)
    system_prompt = forms.CharField(required=False, strip=False)  # chat mode's, when the panel offers it

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Left empty, the preset takes the defaults.
        for name in ("method", "temperature", "max_tokens"):
            self.fields[name].required = False

    def preset_data(self) -> dict:
        settings = self.steering_settings()
        return {
            "name": self.cleaned_data["preset_name"],
            "description": self.cleaned_data["preset_description"],
            "features": settings.features,
            "intervention_layers": settings.layers,
            "method": settings.method or None,
            "temperature": settings.temperature,
            "max_tokens": settings.max_tokens,
            "prompt": self.cleaned_data["prompt"],
            "system_prompt": self.cleaned_data["system_prompt"],
            "seed": self.cleaned_data["seed"],
            "chat": self.cleaned_data["chat"],
            "sweep": settings.sweep,
        }

    def first_error(self) -> InvalidInput:
        """The first parse error, naming the field the way the preset (and the API) names it."""
        name, messages = next(iter(self.errors.items()))
        return InvalidInput(" ".join(str(message) for message in messages), PRESET_FIELDS.get(name, name))
