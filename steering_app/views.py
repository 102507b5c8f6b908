"""Server-rendered steering pages: the panel, its HTMX partials, and the stored runs."""

import functools
import json
import math
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.apps import apps
from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.core import signing
from django.core.paginator import Paginator
from django.db.models import Q
from django.http import Http404
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.views.decorators.http import require_GET, require_POST
from django_htmx.http import reswap, retarget

from steering_app import services, worker
from steering_app.forms import SteeringForm
from steering_app.models import Feature, SteeringRun, Training

RUNS_PER_PAGE = 20
SEARCH_LIMIT = 20
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
)
STREAM_SALT = "steering.run-stream"
STREAM_TOKEN_MAX_AGE = 600


# --- lookups -------------------------------------------------------------------------------------


def completed_trainings():
    return Training.objects.filter(status=Training.Status.COMPLETED).select_related("model", "dataset")


def _get_completed_training(pk) -> Training:
    return get_object_or_404(completed_trainings(), pk=pk)


def _get_run_for_user(request, pk) -> SteeringRun:
    runs = SteeringRun.objects.select_related("training__model", "training__dataset", "owner")
    if not request.user.is_staff:
        runs = runs.filter(owner=request.user)
    return get_object_or_404(runs, pk=pk)


def _get_preset(pk):
    # The presets app may not define its model yet; the panel must keep working without it.
    if not apps.is_installed("presets_app"):
        raise Http404("Presets are not available.")
    try:
        preset_model = apps.get_model("presets_app", "SteeringPreset")
    except LookupError:
        raise Http404("Presets are not available.") from None
    return get_object_or_404(preset_model, pk=pk)


def training_label(training: Training) -> str:
    dataset = training.dataset.name if training.dataset_id else "no dataset"
    started = training.created_at
    return (
        f"{training.encoder_type} SAE • {training.model.name} • {dataset} • "
        f"Started {started.month}/{started.day}/{started.year}"
    )


@functools.lru_cache(maxsize=64)
def has_chat_template(source: str) -> bool:
    """Read from the tokenizer files on disk: loading a model only to draw a checkbox would cost seconds."""
    from steering_app.engine import loader

    try:
        resolved = Path(loader.resolve_source(source))
    except (FileNotFoundError, OSError):
        return False
    if resolved.suffix == ".gguf":
        from gguf import GGUFReader

        try:
            return "tokenizer.chat_template" in GGUFReader(resolved).fields
        except (OSError, ValueError):
            return False
    if resolved.is_dir():
        config = resolved / "tokenizer_config.json"
        if (resolved / "chat_template.jinja").is_file() or (resolved / "chat_template.json").is_file():
            return True
        try:
            return bool(json.loads(config.read_text()).get("chat_template"))
        except (OSError, ValueError):
            return False
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(source, "tokenizer_config.json")
    except ValueError:  # not a valid hub id either
        return False
    if isinstance(cached, str):
        try:
            return bool(json.loads(Path(cached).read_text()).get("chat_template"))
        except (OSError, ValueError):
            return False
    return False


# --- panel state -----------------------------------------------------------------------------------


@dataclass
class SelectedFeature:
    index: int
    coefficient: float
    label: str = ""
    max_activation: float | None = None
    known: bool = True

    @property
    def slider_min(self) -> float:
        return min(-5.0, math.floor(self.coefficient))

    @property
    def slider_max(self) -> float:
        return max(5.0, math.ceil(self.coefficient))


@dataclass
class PanelState:
    training: Training | None
    prompt: str = ""
    features: list[SelectedFeature] = field(default_factory=list)
    layers: list[int] = field(default_factory=list)
    method: str = SteeringRun.Method.ADDITIVE
    temperature: float = 0.7
    max_tokens: int = 64
    seed: int | None = None
    chat: bool = False

    def __post_init__(self):
        if not self.layers and self.training is not None:
            self.layers = [self.training.hook_layer]


def selected_features(training: Training, items) -> list[SelectedFeature]:
    """Cards for [{feature_id, coefficient}], labelled from the training's Feature rows."""
    items = list(items)
    rows = {
        f.index: f
        for f in Feature.objects.filter(training=training, index__in=[i["feature_id"] for i in items])
    }
    cards = []
    for item in items:
        row = rows.get(item["feature_id"])
        cards.append(
            SelectedFeature(
                index=item["feature_id"],
                coefficient=float(item["coefficient"]),
                label=row.label if row else "unknown feature",
                max_activation=row.max_activation if row else None,
                known=row is not None,
            )
        )
    return cards


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
    )


def state_from_preset(preset) -> PanelState:
    training = _get_completed_training(preset.training_id)
    return PanelState(
        training=training,
        features=selected_features(training, preset.features),
        layers=list(preset.intervention_layers),
        method=preset.method,
        temperature=preset.temperature,
        max_tokens=preset.max_tokens,
    )


def state_from_form(form: SteeringForm, fallback: Training | None) -> PanelState:
    """What the user submitted, to show it again beside the errors (no-JavaScript path)."""
    data = form.cleaned_data
    training = completed_trainings().filter(pk=data.get("training")).first() or fallback
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
    return state


def initial_state(request) -> PanelState:
    if "run" in request.GET:
        return state_from_run(_get_run_for_user(request, _int_or_404(request.GET["run"])))
    if "preset" in request.GET:
        return state_from_preset(_get_preset(_int_or_404(request.GET["preset"])))
    if "training" in request.GET:
        return PanelState(training=_get_completed_training(_int_or_404(request.GET["training"])))
    return PanelState(training=completed_trainings().first())


def _int_or_404(raw: str) -> int:
    try:
        return int(raw)
    except ValueError:
        raise Http404("Not a valid id.") from None


def field_errors(form: SteeringForm | None) -> dict[str, str]:
    if form is None:
        return {}
    return {name: " ".join(str(m) for m in messages) for name, messages in form.errors.items()}


def error_context(form: SteeringForm | None) -> dict:
    errors = field_errors(form)
    return {
        "field_errors": errors,
        "error_slots": [(name, errors.get(name, "")) for name in ERROR_SLOTS],
        "error_list": form.error_list() if form is not None else [],
    }


def panel_context(state: PanelState, form: SteeringForm | None = None) -> dict:
    trainings = list(completed_trainings())
    for training in trainings:
        training.label = training_label(training)
    training = state.training
    num_layers = training.model.num_layers if training else 0
    return {
        **error_context(form),
        "trainings": trainings,
        "training": training,
        "state": state,
        "layer_choices": range(num_layers),
        "chat_available": bool(training) and has_chat_template(training.model.source),
        "max_tokens_cap": settings.STEERLAB_MAX_NEW_TOKENS,
        "methods": SteeringRun.Method.choices,
    }


# --- results ---------------------------------------------------------------------------------------


def _number(value, pattern: str) -> str:
    if isinstance(value, int | float) and math.isfinite(value):
        return pattern.format(value)
    return "–"


def metric_cards(run: SteeringRun) -> dict | None:
    metrics = run.metrics or {}
    if not metrics:
        return None
    delta = metrics.get("perplexity_delta")
    higher = isinstance(delta, int | float) and delta > 0
    labels = dict(
        Feature.objects.filter(training_id=run.training_id)
        .filter(index__in=[item.get("feature_id") for item in metrics.get("feature_activation", [])])
        .values_list("index", "label")
    )
    return {
        "kl": _number(metrics.get("kl_divergence"), "{:.4f}"),
        "perplexity_delta": ("+" if higher else "") + _number(delta, "{:.2f}"),
        "perplexity_higher": higher,
        "perplexity_unsteered": _number(metrics.get("perplexity_unsteered"), "{:.2f}"),
        "perplexity_steered": _number(metrics.get("perplexity_steered"), "{:.2f}"),
        "similarity": _number(_scaled(metrics.get("semantic_similarity")), "{:.1f}%"),
        "overlap": _number(_scaled(metrics.get("word_overlap")), "{:.1f}%"),
        "activations": [
            {
                "index": item.get("feature_id"),
                "label": labels.get(item.get("feature_id"), ""),
                "unsteered": _number(item.get("unsteered"), "{:.3f}"),
                "steered": _number(item.get("steered"), "{:.3f}"),
                "rose": _greater(item.get("steered"), item.get("unsteered")),
            }
            for item in metrics.get("feature_activation", [])
        ],
    }


def _scaled(value):
    return value * 100 if isinstance(value, int | float) else None


def _greater(a, b) -> bool:
    return isinstance(a, int | float) and isinstance(b, int | float) and a > b


def result_context(run: SteeringRun, unsteered: str | None = None, steered: str | None = None) -> dict:
    """What the result area shows; unsteered/steered override stored text (a failed run's streamed part)."""
    seconds = None
    if run.started_at and run.finished_at:
        seconds = (run.finished_at - run.started_at).total_seconds()
    return {
        "run": run,
        "unsteered_text": run.unsteered_output or unsteered or "",
        "steered_text": run.steered_output or steered or "",
        "metrics": metric_cards(run),
        "seconds": seconds,
        "ws_url": stream_url(run),
    }


def stream_url(run: SteeringRun, token: str = "") -> str:
    url = f"/ws/steering/runs/{run.pk}/"
    return f"{url}?stream={token}" if token else url


def start_run(run: SteeringRun) -> str:
    """Hand the run to the worker; returns the websocket URL that will replay every event of the run.

    The browser connects only after this response, while the worker may already be streaming tokens: a
    mailbox channel joins the run's group before the run is submitted and buffers its events until the
    page's socket drains it (consumers.RunStreamConsumer), so not even the first token is lost.
    """
    mailbox = f"steering-mailbox.{uuid.uuid4().hex}"
    async_to_sync(get_channel_layer().group_add)(worker.group_name(run.pk), mailbox)
    worker.submit(run.pk)
    token = signing.dumps({"run": run.pk, "mailbox": mailbox}, salt=STREAM_SALT)
    return stream_url(run, token)


def read_stream_token(token: str, run_id: int) -> str | None:
    """The mailbox a stream token names, when it is genuine, fresh and for this run."""
    try:
        data = signing.loads(token, salt=STREAM_SALT, max_age=STREAM_TOKEN_MAX_AGE)
    except signing.BadSignature:
        return None
    if not isinstance(data, dict) or data.get("run") != run_id:
        return None
    return data.get("mailbox")


# --- views -----------------------------------------------------------------------------------------


@login_required
@require_GET
def panel(request):
    return render(request, "steering/panel.html", panel_context(initial_state(request)))


@login_required
@require_GET
def feature_search(request, training_id):
    training = _get_completed_training(training_id)
    query = request.GET.get("q", "").strip()
    features = []
    if query:
        matches = Q(label__icontains=query) | Q(description__icontains=query)
        number = query.lstrip("#")
        if number.isdigit():
            matches |= Q(index=int(number))
        features = list(
            Feature.objects.filter(training=training).filter(matches).order_by("index")[:SEARCH_LIMIT]
        )
    return render(
        request,
        "steering/panel.html#feature-results",
        {"training": training, "query": query, "results": features},
    )


@login_required
@require_GET
def feature_card(request, training_id, index):
    training = _get_completed_training(training_id)
    feature = get_object_or_404(Feature, training=training, index=index)
    card = SelectedFeature(
        index=feature.index, coefficient=0.0, label=feature.label, max_activation=feature.max_activation
    )
    return render(request, "steering/panel.html#feature-card", {"feature": card})


@login_required
@require_POST
def generate(request):
    form = SteeringForm(request.POST)
    run = None
    if form.is_valid():
        try:
            run = services.create_run(request.user, form.steering_request())
        except services.SteeringError as error:
            form.add_service_error(error)
    if run is None:
        if request.htmx:
            response = render(request, "steering/panel.html#form-errors", error_context(form), status=422)
            return reswap(retarget(response, "#form-errors"), "outerHTML")
        state = state_from_form(form, completed_trainings().first())
        return render(request, "steering/panel.html", panel_context(state, form), status=422)
    ws_url = start_run(run)
    if not request.htmx:
        return redirect("steering-run", pk=run.pk)
    context = {**result_context(run), "ws_url": ws_url, "error_slots": [(name, "") for name in ERROR_SLOTS]}
    return render(request, "steering/_result.html#submitted", context)


@login_required
@require_GET
def run_list(request):
    runs = SteeringRun.objects.select_related("training__model", "owner")
    if not request.user.is_staff:
        runs = runs.filter(owner=request.user)
    page = Paginator(runs.order_by("-created_at", "-id"), RUNS_PER_PAGE).get_page(request.GET.get("page"))
    return render(request, "steering/run_list.html", {"page": page, "show_owner": request.user.is_staff})


@login_required
@require_GET
def run_detail(request, pk):
    run = _get_run_for_user(request, pk)
    context = result_context(run)
    context["features"] = selected_features(run.training, run.features)
    context["training_label"] = training_label(run.training)
    context["rerun_url"] = reverse("steering-panel") + f"?run={run.pk}"
    return render(request, "steering/run_detail.html", context)
