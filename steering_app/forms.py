"""The pages' forms: the steering panel's (the browser's fields into SteeringSettings and a RunRequest), the run
history's filters, the new-experiment page's (an ExperimentRequest), the new-steering-vector page's and the
control-vector download's.

Only types are checked here; ranges, ownership of features and layer rules are SteeringSettings.validate's
job, so the panel, presets and the JSON API reject the same requests with the same messages.
"""

from django import forms

from steering_app import prompt_sets, vector_jobs
from steering_app.conversations import ConversationRequest
from steering_app.errors import InvalidInput, SteeringError
from steering_app.experiments import ExperimentRequest
from steering_app.form_integers import storable_int
from steering_app.limits import MAX_ID, MAX_INDEX
from steering_app.models import (
    Conversation,
    LanguageModel,
    PromptSet,
    SteeringRun,
    SteeringRunQuerySet,
    Training,
)
from steering_app.steering_settings import RunRequest, SteeringSettings

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
    "system_prompt": "system_prompt",
    "history_mode": "history_mode",
}


def parse_integers(raw: list[str]) -> list[int]:
    """Repeated whole-number inputs (layers); ValidationError when one is not."""
    try:
        return [storable_int(value, MAX_INDEX) for value in raw]
    except ValueError:
        raise forms.ValidationError("Every value must be a whole number.") from None


def parse_features(data) -> list[dict]:
    """The repeated feature_id / coefficient inputs of a feature list as [{feature_id, coefficient}]."""
    indices = data.getlist("feature_id")
    coefficients = data.getlist("coefficient")
    if len(indices) != len(coefficients):
        raise forms.ValidationError("Each feature needs exactly one coefficient.")
    try:
        return [
            {"feature_id": storable_int(index, MAX_INDEX), "coefficient": float(coefficient)}
            for index, coefficient in zip(indices, coefficients, strict=True)
        ]
    except ValueError:
        raise forms.ValidationError(
            f"Feature ids must be whole numbers up to {MAX_INDEX} and coefficients numbers."
        ) from None


def _parsed(form: forms.Form, field: str, parse, raw):
    """parse(raw), or [] with the message as the field's error."""
    try:
        return parse(raw)
    except forms.ValidationError as error:
        form.add_error(field, error)
        return []


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
        cleaned["layers"] = _parsed(self, "layers", parse_integers, self.data.getlist("layers"))
        cleaned["features"] = _parsed(self, "features", parse_features, self.data)
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
        return form_errors(self)


class ChatForm(SteeringForm):
    """The panel's Start chat: its steering settings as a conversation's first turn's, with a system prompt and
    a history mode (the prompt box is not used: the conversation's page takes the messages)."""

    system_prompt = forms.CharField(label="System prompt", required=False, strip=False, widget=forms.Textarea)
    history_mode = forms.ChoiceField(label="History", choices=Conversation.HistoryMode.choices)

    def conversation_request(self) -> ConversationRequest:
        data = self.cleaned_data
        return ConversationRequest(
            training_id=data["training"],
            settings=self.steering_settings(),
            system_prompt=data["system_prompt"],
            history_mode=data["history_mode"],
            private=data["private"],
        )


class MessageForm(forms.Form):
    """A conversation's next message, with the steering of its turn: each feature's coefficient, the layers
    (comma-separated), the method, temperature and max tokens, prefilled from the conversation's settings."""

    content = forms.CharField(label="Message", strip=False, widget=forms.Textarea)
    seed = forms.IntegerField(label="Seed", required=False, min_value=0, max_value=MAX_ID)
    method = forms.ChoiceField(label="Method", choices=SteeringRun.Method.choices)
    layers = forms.CharField(label="Intervention Layers")
    temperature = forms.FloatField(label="Temperature")
    max_tokens = forms.IntegerField(label="Max Tokens", max_value=MAX_INDEX)
    features = forms.Field(label="Features", required=False)  # repeated feature_id / coefficient inputs

    def clean(self):
        cleaned = super().clean()
        cleaned["features"] = _parsed(self, "features", parse_features, self.data)
        raw = [item for item in cleaned.get("layers", "").replace(" ", "").split(",") if item]
        cleaned["layers"] = _parsed(self, "layers", parse_integers, raw)
        return cleaned

    def changes(self) -> dict:
        """The steering fields this turn uses, by the names conversations.send takes."""
        data = self.cleaned_data
        return {
            "features": data["features"],
            "intervention_layers": data["layers"],
            "method": data["method"],
            "temperature": data["temperature"],
            "max_tokens": data["max_tokens"],
        }

    def add_steering_error(self, error: SteeringError) -> None:
        """Beside the input it names; above the form when it names none of this form's (a turn in progress)."""
        name = {**ERROR_FIELDS, "content": "content", "prompt": "content"}.get(error.field)
        self.add_error(name if name in self.fields else None, error.message)


class RunFilterForm(forms.Form):
    """The run history's filters (a GET form): whose runs, which training, which steered feature, and which
    experiment's cells (listed only there).

    A value it cannot use is shown as the field's error and that filter is left out.
    """

    MINE, EVERYONE = "mine", "all"

    scope = forms.ChoiceField(
        label="Runs", choices=[(MINE, "Mine"), (EVERYONE, "Everyone's")], required=False
    )
    training = forms.IntegerField(label="Training", min_value=1, max_value=MAX_ID, required=False)
    feature = forms.CharField(label="Feature", max_length=20, required=False)
    experiment = forms.IntegerField(label="Experiment", min_value=1, max_value=MAX_ID, required=False)

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
        """`runs` (already those the user may read) narrowed by the valid filters. An experiment's cells are
        listed only under their experiment: hundreds of them would bury the comparisons."""
        self.is_valid()
        data = self.cleaned_data
        runs = runs.filter(experiment_id=data.get("experiment"))
        if self.scope_value == self.MINE:
            runs = runs.filter(owner=self.user)
        if data.get("training"):
            runs = runs.filter(training_id=data["training"])
        if data.get("feature") is not None:
            runs = runs.steering_feature(data["feature"])
        return runs


# ExperimentRequest's field (as InvalidInput names it) -> the experiment form's field that shows the message
EXPERIMENT_ERROR_FIELDS = {
    "training_id": "training",
    "model_id": "training",
    "conditions": "features",
    "intervention_layers": "layers",
    "method": "method",
    "strengths": "strengths",
    "prompt_set_id": "prompt_set",
    "seeds": "seeds",
    "max_tokens": "max_tokens",
    "temperature": "temperature",
    "chat": "chat",
}


class ExperimentForm(forms.Form):
    """The new-experiment page: the panel's features, layers and method (carried as hidden inputs), how they
    form conditions, the prompts (a set, pasted lines or a .txt / .jsonl file) and the sweep's settings.

    As SteeringForm, only types are checked here; experiments.create checks everything else."""

    EACH, TOGETHER = "each", "together"
    # Where the prompts came from (clean() says): the field that shows an error about them.
    prompt_source = "prompts"

    training = forms.IntegerField(label="Training", min_value=1, max_value=MAX_ID, widget=forms.HiddenInput)
    method = forms.ChoiceField(label="Method", choices=SteeringRun.Method.choices, widget=forms.HiddenInput)
    # Repeated hidden inputs, as the panel names them; parsed in clean() from the raw lists.
    layers = forms.Field(label="Intervention layers", required=False)
    features = forms.Field(label="Features", required=False)
    grouping = forms.ChoiceField(
        label="Conditions",
        choices=[(EACH, "One condition per feature"), (TOGETHER, "All features together as one condition")],
        initial=EACH,
        widget=forms.RadioSelect,
    )
    prompt_set = forms.ModelChoiceField(
        label="Prompt set", queryset=PromptSet.objects.all(), required=False, empty_label="(none)"
    )
    prompts = forms.CharField(label="Pasted prompts", required=False, widget=forms.Textarea)
    prompts_file = forms.FileField(label="Prompts file", required=False)
    strengths = forms.CharField(label="Strengths", initial="0, 0.5, 1, 2, 4")
    seeds = forms.IntegerField(label="Seeds per prompt", initial=1, max_value=MAX_INDEX)
    max_tokens = forms.IntegerField(label="Max tokens", initial=48, max_value=MAX_INDEX)
    temperature = forms.FloatField(label="Temperature")
    chat = forms.BooleanField(label="Chat template", required=False)
    private = forms.BooleanField(label="Private", required=False)
    name = forms.CharField(label="Name", max_length=200, required=False)

    def clean(self):
        cleaned = super().clean()
        cleaned["layers"] = _parsed(self, "layers", parse_integers, self.data.getlist("layers"))
        cleaned["features"] = _parsed(self, "features", parse_features, self.data)
        cleaned["strengths"] = self._strengths(cleaned.get("strengths") or "")
        cleaned["prompt_list"] = self._prompts(cleaned)
        return cleaned

    def _strengths(self, raw: str) -> list[float]:
        try:
            return [float(item) for item in raw.replace(",", " ").split()]
        except ValueError:
            self.add_error("strengths", "Strengths must be numbers separated by commas, like 0, 0.5, 1, 2.")
            return []

    def _prompts(self, cleaned: dict) -> list[str] | None:
        """The pasted or uploaded prompts, which replace the set; None to run the set's. Read and checked as
        the prompt sets' API reads them (prompt_sets.py)."""
        prompts = prompt_sets.prompts_from_text(cleaned.get("prompts") or "")
        upload = cleaned.get("prompts_file")
        if prompts and upload:
            self.add_error("prompts_file", "Paste prompts or upload a file, not both.")
            return None
        if not (prompts or upload):
            self.prompt_source = "prompt_set"
            if cleaned.get("prompt_set") is None and "prompt_set" not in self.errors:
                self.add_error("prompt_set", "Choose a prompt set, paste prompts or upload a file.")
            return None
        self.prompt_source = "prompts_file" if upload else "prompts"
        try:
            if upload:
                # One byte past the limit is enough for prompts_from_file to refuse a larger file.
                data = upload.read(prompt_sets.MAX_UPLOAD_BYTES + 1)
                prompts = prompt_sets.prompts_from_file(upload.name, data, self.prompt_source)
            return prompt_sets.checked_prompts(prompts, self.prompt_source)
        except InvalidInput as error:
            self.add_error(self.prompt_source, error.message)
            return None

    def conditions(self) -> list[dict]:
        features = self.cleaned_data["features"]
        if self.cleaned_data["grouping"] == self.TOGETHER:
            return [{"features": features}]
        return [{"features": [feature]} for feature in features]

    # Fields of the form that ExperimentRequest takes under the same name, as they are.
    REQUEST_FIELDS = ("method", "strengths", "seeds", "max_tokens", "temperature", "chat", "private", "name")

    def experiment_request(self):
        data = self.cleaned_data
        prompts = data["prompt_list"]
        return ExperimentRequest(
            **{name: data[name] for name in self.REQUEST_FIELDS},
            training_id=data["training"],
            conditions=self.conditions(),
            intervention_layers=data["layers"],
            prompt_set_id=data["prompt_set"].pk if prompts is None else None,
            prompts=prompts,
        )

    def add_steering_error(self, error: SteeringError) -> None:
        """Beside the input the domain error names: a prompt's fault beside where the prompts came from."""
        if error.field in ("prompts", "prompt"):
            field = self.prompt_source
        else:
            field = EXPERIMENT_ERROR_FIELDS.get(error.field)
        self.add_error(field, error.message)


def form_errors(form: forms.Form) -> list[tuple[str, str]]:
    """(field label, message) pairs of any form, so a message always says which input it is about."""
    items = []
    for name, errors in form.errors.items():
        label = form.fields[name].label if name in form.fields else "Request"
        items.extend((label, str(message)) for message in errors)
    return items


class ControlVectorForm(forms.Form):
    """The steering a llama.cpp control-vector download exports, as the panel's form names it (training, method,
    repeated layers, feature_id and coefficient). Only types are checked here; services.control_vector_gguf
    checks the rest as a run's settings are checked."""

    training = forms.IntegerField(label="Training Job", min_value=1, max_value=MAX_ID)
    method = forms.ChoiceField(label="Method", choices=SteeringRun.Method.choices)
    layers = forms.Field(label="Intervention layers", required=False)
    features = forms.Field(label="Features", required=False)

    def clean(self):
        cleaned = super().clean()
        cleaned["layers"] = _parsed(self, "layers", parse_integers, self.data.getlist("layers"))
        cleaned["features"] = _parsed(self, "features", parse_features, self.data)
        return cleaned

    def add_steering_error(self, error: SteeringError) -> None:
        self.add_error(ERROR_FIELDS.get(error.field), error.message)


VECTOR_ERROR_FIELDS = {
    "model_id": "target",
    "training_id": "target",
    "name": "name",
    "description": "description",
    "method": "method",
    "tokens": "tokens",
    "positives": "positives",
    "negatives": "negatives",
}


class VectorForm(forms.Form):
    """The "New steering vector" page: where the concept goes (a new space on a model, or an existing space),
    its name, method and examples: pasted (one per line; line i of each box a pair when paired) or a .jsonl of
    {"positive", "negative"} pairs. Only types are checked here; vector_jobs.create checks everything else."""

    NEW_SPACE, EXISTING_SPACE = "model", "space"
    # Where the examples came from (clean() says): the field that shows an error about them.
    examples_source = "positives"

    target = forms.ChoiceField(label="Vector space")
    name = forms.CharField(label="Name", max_length=300)
    description = forms.CharField(
        label="Description", required=False, widget=forms.Textarea(attrs={"rows": 2})
    )
    method = forms.ChoiceField(
        label="Method",
        choices=[
            ("diffmean", "DiffMean: mean of positives − mean of negatives"),
            ("pca", "PCA of paired differences (repeng)"),
        ],
        initial="diffmean",
    )
    tokens = forms.ChoiceField(
        label="Read each example over",
        choices=[("all", "every token"), ("last", "its last token")],
        initial="all",
    )
    positives = forms.CharField(label="Positive examples", required=False, strip=False, widget=forms.Textarea)
    negatives = forms.CharField(label="Negative examples", required=False, strip=False, widget=forms.Textarea)
    paired = forms.BooleanField(label="Paired", required=False, initial=True)
    pairs_file = forms.FileField(label="Pairs file", required=False)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        models = LanguageModel.objects.filter(status=LanguageModel.Status.READY)
        spaces = Training.objects.completed().filter(encoder_type=Training.EncoderType.VECTORS)
        self.fields["target"].choices = [
            ("New space on a model", [(f"{self.NEW_SPACE}-{model.pk}", model.name) for model in models]),
            (
                "Add to a vector space",
                [(f"{self.EXISTING_SPACE}-{space.pk}", space.label) for space in spaces],
            ),
        ]

    def clean(self):
        cleaned = super().clean()
        cleaned["examples"] = self._examples(cleaned)
        return cleaned

    def _examples(self, cleaned: dict) -> dict:
        """pairs, or positives and negatives, for vector_jobs.create (which checks their counts and texts)."""
        upload = cleaned.get("pairs_file")
        positives = prompt_sets.prompts_from_text(cleaned.get("positives") or "")
        negatives = prompt_sets.prompts_from_text(cleaned.get("negatives") or "")
        if upload and (positives or negatives):
            self.add_error("pairs_file", "Paste examples or upload a file of pairs, not both.")
            return {}
        if upload:
            self.examples_source = "pairs_file"
            return self._uploaded_pairs(upload)
        if not cleaned.get("paired"):
            return {"positives": positives, "negatives": negatives}
        if len(positives) != len(negatives):
            self.add_error(
                "negatives",
                f"Paired examples need as many negatives as positives: {len(positives)} positive and "
                f"{len(negatives)} negative lines.",
            )
            return {}
        return {"pairs": [list(pair) for pair in zip(positives, negatives, strict=True)]}

    def _uploaded_pairs(self, upload) -> dict:
        # One byte past the limit is enough to know the file is too large: it is never read whole.
        data = upload.read(prompt_sets.MAX_UPLOAD_BYTES + 1)
        if len(data) > prompt_sets.MAX_UPLOAD_BYTES:
            self.add_error(
                "pairs_file", f"The file is larger than {prompt_sets.MAX_UPLOAD_BYTES // 1024 // 1024} MB."
            )
            return {}
        try:
            return {"pairs": vector_jobs.pairs_from_jsonl(data.decode("utf-8"), "pairs")}
        except UnicodeDecodeError:
            self.add_error("pairs_file", "The file is not UTF-8 text.")
        except InvalidInput as error:
            self.add_error("pairs_file", error.message)
        return {}

    def vector_request(self) -> dict:
        """vector_jobs.create's keywords."""
        data = self.cleaned_data
        kind, _, pk = data["target"].partition("-")
        return {
            "model_id" if kind == self.NEW_SPACE else "training_id": int(pk),
            "name": data["name"],
            "description": data["description"],
            "method": data["method"],
            "tokens": data["tokens"],
            **data["examples"],
        }

    def add_steering_error(self, error: SteeringError) -> None:
        """Beside the input the domain error names: an example's fault beside where the examples came from."""
        field = (error.field or "").split("[")[0]
        if field in ("pairs", "positives", "negatives") and self.examples_source == "pairs_file":
            self.add_error("pairs_file", error.message)
        elif field == "pairs":
            self.add_error("positives", error.message)
        else:
            self.add_error(VECTOR_ERROR_FIELDS.get(field), error.message)
