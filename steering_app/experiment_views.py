"""Server-rendered experiment pages: the list, the new-experiment form, and an experiment with its results.

The experiment's life is experiments.py's (create, cancel, resume, report); its chart's coordinates are
experiment_charts.py's. These functions read the request, call those, and render. The page's progress bar
is kept live by consumers.ExperimentProgressConsumer, which renders its fragments with progress_context.
"""

from collections import defaultdict
from urllib.parse import urlencode

from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.db.models import Count
from django.http import HttpResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from steering_app import experiments, panel
from steering_app.errors import Conflict, Forbidden, SteeringError, WorkerUnavailable
from steering_app.experiment_charts import strength_chart
from steering_app.forms import ExperimentForm
from steering_app.models import Experiment, ExperimentResult, Feature, PromptSet, Training
from steering_app.views import delete_then_go, visible_or_404

DETAIL_TEMPLATE = "steering/experiments/detail.html"
EXPERIMENTS_PER_PAGE = 20
# What the panel's "Evaluate over prompts" carries over (the panel's own field names, as panel.apply_query
# reads them); anything else in the query, such as the panel form's CSRF token, is dropped from the URL.
CARRIED_FIELDS = ("training", "method", "layers", "feature_id", "coefficient", "temperature", "chat")


@login_required
@require_GET
def experiment_list(request):
    visible = (
        Experiment.objects.visible_to(request.user)
        .select_related("owner", "training__model", "training__dataset")
        .annotate(outputs=Count("results"))
        .order_by("-created_at", "-id")  # an aggregate drops Meta.ordering
    )
    page = Paginator(visible, EXPERIMENTS_PER_PAGE).get_page(request.GET.get("page"))
    for experiment in page.object_list:
        experiment.done_cells = experiment.outputs // max(1, len(experiment.strengths))
    return render(request, "steering/experiments/list.html", {"page": page})


@login_required
@require_http_methods(["GET", "POST"])
def new_experiment(request):
    if request.method == "POST":
        return _create(request)
    carried = [(name, value) for name in CARRIED_FIELDS for value in request.GET.getlist(name)]
    clean_url = reverse("steering-experiment-new") + (f"?{urlencode(carried)}" if carried else "")
    if request.htmx:  # the panel's button: the browser goes to the page itself
        response = HttpResponse(status=204)
        response["HX-Redirect"] = clean_url
        return response
    if set(request.GET) - set(CARRIED_FIELDS):  # the panel's form submitted without JavaScript
        return redirect(clean_url)
    state = panel.apply_query(panel.PanelState(training=None), request.GET)
    form = ExperimentForm(initial=_initial(state))
    return _render_new(request, form, state.training, state.features, state.layers, state.method, state.notes)


def _initial(state: panel.PanelState) -> dict:
    default_set = PromptSet.objects.filter(name=PromptSet.DEFAULT_NAME).first()
    return {
        "training": state.training.pk if state.training else None,
        "method": state.method,
        "prompt_set": default_set.pk if default_set else None,
        "temperature": state.temperature,
        "chat": state.chat,
    }


def _create(request):
    form = ExperimentForm(request.POST, request.FILES)
    status = 400
    if form.is_valid():
        try:
            experiment = experiments.create(request.user, form.experiment_request())
        except SteeringError as error:
            form.add_steering_error(error)
            status = 503 if isinstance(error, WorkerUnavailable) else 400
        else:
            return redirect("steering-experiment", pk=experiment.pk)
    data = form.cleaned_data
    training = Training.objects.completed().filter(pk=data.get("training")).first()
    features = panel.selected_features(training, data.get("features") or []) if training else []
    layers, method = data.get("layers") or [], data.get("method") or ""
    return _render_new(request, form, training, features, layers, method, status=status)


def _render_new(request, form, training, features, layers, method, notes=(), status=200):
    context = {
        "form": form,
        "training": training,
        "features": features,
        "layers": layers,
        "method": method,
        "notes": notes,
        "panel_url": reverse("steering-panel") + (f"?training={training.pk}" if training else ""),
    }
    return render(request, "steering/experiments/new.html", context, status=status)


@login_required
@require_GET
def experiment_detail(request, pk):
    """The experiment's page; an htmx request (the live part's end) gets its body only."""
    return _render_detail(request, _visible_experiment(request, pk))


def _visible_experiment(request, pk) -> Experiment:
    return visible_or_404(
        request, Experiment, pk, "owner", "training__model", "training__dataset", "prompt_set"
    )


def _render_detail(request, experiment: Experiment, notice: str = "", status: int = 200):
    template = f"{DETAIL_TEMPLATE}#body" if request.htmx else DETAIL_TEMPLATE
    return render(request, template, detail_context(request, experiment, notice), status=status)


def detail_context(request, experiment: Experiment, notice: str = "") -> dict:
    report = experiments.report(experiment)  # once per view: it reads every stored output
    progress = report["progress"]
    labels = Feature.objects.labels(
        (experiment.training_id, item["feature_id"])
        for condition in experiment.conditions
        for item in condition["features"]
    )
    best = {entry["condition"]: entry for entry in report["best"]}
    examples = _best_and_worst(experiment)
    conditions = [
        _condition(experiment, index, report["summary"], best.get(index), labels, examples)
        for index in range(len(experiment.conditions))
    ]
    can_change = experiment.can_change(request.user)
    return {
        "experiment": experiment,
        "status": report["status"],
        "error": report["error"],
        "progress": progress_context({"status": report["status"], **progress}),
        "has_results": bool(report["summary"]),
        "conditions": conditions,
        "leaderboard": [{**entry, "condition": conditions[entry["condition"]]} for entry in report["best"]],
        "can_change": can_change,
        "can_cancel": can_change and not experiment.is_finished,
        "can_resume": can_change and experiment.is_finished and progress["done"] < progress["total"],
        "can_delete": can_change and experiment.is_finished,
        "notice": notice,
        "ws_url": f"/ws/steering/experiments/{experiment.pk}/",
        "csv_url": f"/api/experiments/{experiment.pk}/results.csv",
        "jsonl_url": f"/api/experiments/{experiment.pk}/results.jsonl",
        "cells_url": reverse("steering-runs")
        + "?"
        + urlencode({"experiment": experiment.pk, "scope": "all"}),
    }


def _condition(experiment, index, summary, best, labels, examples) -> dict:
    features = [
        {**item, "label": labels.get((experiment.training_id, item["feature_id"]), "")}
        for item in experiment.conditions[index]["features"]
    ]
    rows = [row for row in summary if row["condition"] == index]
    by_strength = {row["strength"]: row for row in rows}
    best_strength = best["strength"] if best else None
    return {
        "index": index,
        "number": index + 1,
        "features": features,
        "chart": strength_chart(rows, experiment.strengths, best_strength) if rows else None,
        "table": [
            {"strength": strength, "summary": by_strength.get(strength), "best": strength == best_strength}
            for strength in experiment.strengths
        ],
        "examples": [
            {"strength": strength, **examples[(index, strength)]}
            for strength in experiment.strengths
            if (index, strength) in examples
        ],
        "best": best,
        "apply_url": apply_url(experiment, features, best_strength) if best else "",
    }


def _best_and_worst(experiment: Experiment) -> dict:
    """{(condition, strength): {"best": result, "worst": result}} by aggregate score, in two queries."""
    scored = defaultdict(list)
    rows = experiment.results.values_list("pk", "condition", "strength", "score")
    for pk, condition, strength, score in rows:
        scored[(condition, strength)].append((score, pk))
    chosen = {key: (max(ranked)[1], min(ranked)[1]) for key, ranked in scored.items()}
    results = ExperimentResult.objects.in_bulk([pk for pair in chosen.values() for pk in pair])
    for result in results.values():
        result.prompt = experiment.prompts[result.prompt_index]
    return {key: {"best": results[best], "worst": results[worst]} for key, (best, worst) in chosen.items()}


def apply_url(experiment: Experiment, features: list[dict], strength: float) -> str:
    """The panel opened with the condition's features at `strength` times their coefficients, in the
    experiment's training, method, layers and generation settings (the panel reads its fields from the URL)."""
    query = [("training", experiment.training_id), ("method", experiment.method)]
    query += [("layers", layer) for layer in experiment.intervention_layers]
    for item in features:
        query += [("feature_id", item["feature_id"]), ("coefficient", repr(item["coefficient"] * strength))]
    query += [
        ("temperature", f"{experiment.temperature:g}"),
        ("max_tokens", experiment.max_new_tokens),
        ("chat", "1" if experiment.chat else "0"),
    ]
    return reverse("steering-panel") + "?" + urlencode(query)


def progress_context(progress: dict) -> dict:
    """The progress bar's words from {status, done, total, tokens_per_second, eta_seconds}."""
    rate, eta = progress.get("tokens_per_second"), progress.get("eta_seconds")
    status = progress["status"]
    return {
        "status": status,
        "status_label": Experiment.Status(status).label,
        "done": progress["done"],
        "total": progress["total"],
        "rate": f"{rate:.1f} tokens/s" if rate is not None else "",
        "eta": f"about {_duration(eta)} left" if eta and status in ("queued", "running") else "",
    }


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds // 3600:.0f} h {seconds % 3600 / 60:.0f} min"


@login_required
@require_POST
def cancel_experiment(request, pk):
    return _change(request, pk, experiments.cancel)


@login_required
@require_POST
def resume_experiment(request, pk):
    return _change(request, pk, experiments.resume)


def _change(request, pk, action):
    """Cancel or resume as the owner or staff, then back to the experiment's page."""
    experiment = _visible_experiment(request, pk)
    try:
        action(experiment, request.user)
    except Forbidden as error:
        raise PermissionDenied(error.message) from error
    except (Conflict, WorkerUnavailable) as error:
        return _render_detail(request, experiment, error.message, 409 if isinstance(error, Conflict) else 503)
    return redirect("steering-experiment", pk=experiment.pk)


@login_required
@require_POST
def delete_experiment(request, pk):
    return delete_then_go(
        request, _visible_experiment(request, pk), _render_detail, reverse("steering-experiments")
    )
