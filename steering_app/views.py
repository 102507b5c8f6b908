"""Server-rendered steering pages: the panel, its HTMX partials, and the stored runs.

Panel state lives in panel.py, result display in presenters.py, the stream in streaming.py; a run's life
in runs.py, a prompt read by the model in analysis.py. These functions only read the request, call those,
and render.
"""

from urllib.parse import urlencode

from asgiref.sync import sync_to_async
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.http import HttpResponse, JsonResponse
from django.shortcuts import aget_object_or_404, get_object_or_404, redirect, render
from django.urls import reverse
from django.views.decorators.http import require_GET, require_POST
from django_htmx.http import reswap, retarget

from steering_app import analysis, panel, presenters, runs, streaming
from steering_app.errors import Conflict, Forbidden, InvalidInput, SteeringError, WorkerUnavailable
from steering_app.feature_search import search as search_features
from steering_app.form_integers import storable_int
from steering_app.forms import RunFilterForm, SteeringForm
from steering_app.limits import MAX_INDEX, MAX_SEARCH_CHARS
from steering_app.models import Feature, SteeringRun, Training

RUNS_PER_PAGE = 20
SEARCH_LIMIT = 20


@login_required
@require_GET
def panel_page(request):
    return render(request, "steering/panel.html", panel.panel_context(panel.initial_state(request)))


@login_required
@require_GET
def feature_search(request, training_id):
    """A page of the ranked matches ("20 of 88"); ?offset= gives the next page, which "Load more" appends."""
    training = get_object_or_404(Training.objects.completed(), pk=training_id)
    query = request.GET.get("q", "").strip()[:MAX_SEARCH_CHARS]
    try:
        offset = storable_int(request.GET.get("offset", "0"), MAX_INDEX)
    except ValueError:
        offset = 0
    offset = max(offset, 0)
    results, total = search_features(training, query, offset, SEARCH_LIMIT)
    context = {
        "training": training,
        "query": query,
        "results": results,
        "offset": offset,
        "shown": offset + len(results),
        "total": total,
    }
    return render(request, "steering/panel.html#feature-results", context)


@login_required
@require_POST
async def prompt_features(request, training_id):
    """The panel's "Features on this prompt": the features the prompt lights up, strongest for themselves first
    (activation ÷ max activation, analysis.features_active_on), to add.
    A worker reads the prompt (analysis.py); the request only awaits its answer."""
    training = await aget_object_or_404(Training.objects.completed(), pk=training_id)
    prompt, chat = request.POST.get("prompt", ""), bool(request.POST.get("chat"))
    try:
        found = await analysis.features_active_on(await request.auser(), training, prompt, chat=chat)
    except (InvalidInput, WorkerUnavailable) as error:
        context = {"training": training, "prompt_error": error.message}
        status = 422 if isinstance(error, InvalidInput) else 503
        return await sync_to_async(render)(
            request, "steering/panel.html#prompt-features", context, status=status
        )
    items = [item for item in found if item.feature is not None]
    uncalibrated = any(item.relative_activation is None for item in items)
    context = {"training": training, "items": items, "uncalibrated": uncalibrated}
    return await sync_to_async(render)(request, "steering/panel.html#prompt-features", context)


@login_required
@require_GET
def feature_card(request, training_id, index):
    training = get_object_or_404(Training.objects.completed(), pk=training_id)
    feature = get_object_or_404(Feature, training=training, index=index)
    context = {"feature": panel.feature_card(feature), "training": training}
    return render(request, "steering/panel.html#feature-card", context)


@login_required
@require_POST
async def training_scale(request, training_id):
    """{residual_norm, layer}: |h| at the SAE's layer over the posted prompt, the unit of an uncalibrated
    training's sliders (the panel's script sets their range from it). A POST with the CSRF token: it costs a
    forward of the model, which a link or another site must not be able to start. A worker reads the prompt
    (analysis.py)."""
    training = await aget_object_or_404(Training.objects.completed(), pk=training_id)
    try:
        norm = await analysis.residual_norm(await request.auser(), training, request.POST.get("prompt", ""))
    except (InvalidInput, WorkerUnavailable) as error:
        status = 400 if isinstance(error, InvalidInput) else 503
        return JsonResponse({"detail": error.message, "field": error.field}, status=status)
    return JsonResponse({"residual_norm": norm, "layer": training.hook_layer})


@login_required
@require_POST
def max_tokens_hint(request, training_id):
    """The hint beside Max Tokens, again as the prompt or the chat box changes: the most this prompt leaves room
    for in the worker's slots. A POST: the prompt may be longer than a URL holds."""
    training = get_object_or_404(Training.objects.completed(), pk=training_id)
    hint = panel.max_tokens_hint(training, request.POST.get("prompt", ""), bool(request.POST.get("chat")))
    return render(request, "steering/panel.html#max-tokens-hint", {"training": training, **hint})


@login_required
@require_POST
def generate(request):
    """Create and submit a run; the HTMX page then streams it, a plain form post goes to the run's page."""
    form = SteeringForm(request.POST)
    if not form.is_valid():
        return refused(request, form, status=422)
    try:
        run = runs.create(request.user, form.run_request())
    except SteeringError as error:
        form.add_steering_error(error)
        return refused(request, form, status=422)
    ws_url = streaming.open_mailbox(run.pk)
    try:
        runs.submit(run)
    except WorkerUnavailable as error:  # the run is failed already; say why where the user looks
        form.add_steering_error(error)
        return refused(request, form, status=503)
    if not request.htmx:
        return redirect("steering-run", pk=run.pk)
    context = {
        **presenters.result_context(run),
        "ws_url": ws_url,
        "error_slots": [(name, "") for name in panel.ERROR_SLOTS],
    }
    return render(request, "steering/_result.html#submitted", context)


def refused(request, form: SteeringForm, status: int):
    """The form again with its errors: only the error area for HTMX, the whole panel otherwise."""
    if request.htmx:
        response = render(
            request, "steering/panel.html#form-errors", panel.error_context(form), status=status
        )
        return reswap(retarget(response, "#form-errors"), "outerHTML")
    context = panel.panel_context(panel.state_from_form(form), form)
    return render(request, "steering/panel.html", context, status=status)


@login_required
@require_GET
def run_list(request):
    """The run history: the user's runs (staff: everyone's), or the lab's, by training and steered feature."""
    filters = RunFilterForm(request.GET, user=request.user)
    runs = filters.filter(SteeringRun.objects.visible_to(request.user)).select_related(
        "training__model", "training__dataset", "owner"
    )
    page = Paginator(runs.order_by("-created_at", "-id"), RUNS_PER_PAGE).get_page(request.GET.get("page"))
    page.object_list = list(page.object_list)
    labels = Feature.objects.labels(
        (run.training_id, item["feature_id"]) for run in page.object_list for item in run.features
    )
    for run in page.object_list:
        run.labelled_features = [
            {**item, "label": labels.get((run.training_id, item["feature_id"]), "")} for item in run.features
        ]
    context = {
        "page": page,
        "filters": filters,
        "scope": filters.scope_value,
        "show_owner": filters.scope_value == RunFilterForm.EVERYONE,
        "trainings": Training.objects.select_related("model", "dataset"),
    }
    return render(request, "steering/run_list.html", context)


@login_required
@require_GET
def run_detail(request, pk):
    """The share link of a run: every member reads a shared run, read-only unless it is theirs (or staff)."""
    return _render_run(request, _visible_run(request, pk))


def _visible_run(request, pk) -> SteeringRun:
    return visible_or_404(request, SteeringRun, pk, "training__model", "training__dataset", "owner")


def control_vector_url(run: SteeringRun) -> str | None:
    """The download of the run's steering as a llama.cpp control vector; None when multiplicative, which a fixed
    vector cannot stand for. A sweep exports its features as given (multiplier 1)."""
    if run.method != SteeringRun.Method.ADDITIVE:
        return None
    query = [("training", run.training_id), ("method", run.method)]
    query += [("layers", layer) for layer in run.intervention_layers]
    for item in run.features:
        query += [("feature_id", item["feature_id"]), ("coefficient", repr(float(item["coefficient"])))]
    return f"{reverse('steering-control-vector')}?{urlencode(query)}"


def visible_or_404(request, model, pk, *related):
    """Record `pk` of a model members share (runs, experiments) if this user may read it; another member's
    private one is a 404, like an unknown one. `related`: what the page reads beside it (select_related)."""
    return get_object_or_404(model.objects.visible_to(request.user).select_related(*related), pk=pk)


def _render_run(request, run: SteeringRun, notice: str = "", status: int = 200):
    context = presenters.result_context(run)
    context["features"] = panel.selected_features(run.training, run.features)
    context["rerun_url"] = reverse("steering-panel") + f"?run={run.pk}"
    context["control_vector_url"] = control_vector_url(run)
    context["can_change"] = run.can_change(request.user)
    context["notice"] = notice
    return render(request, "steering/run_detail.html", context, status=status)


@login_required
@require_POST
def run_visibility(request, pk):
    """The owner's Private / Share switch on the run page (private=1 or 0), back to the run's page."""
    run = _visible_run(request, pk)
    try:
        run.set_private(request.user, request.POST.get("private") == "1")
    except Forbidden as error:
        raise PermissionDenied(error.message) from error
    return redirect("steering-run", pk=run.pk)


@login_required
@require_POST
def delete_run(request, pk):
    return delete_then_go(request, _visible_run(request, pk), _render_run, reverse("steering-runs"))


def delete_then_go(request, record, render_page, url: str) -> HttpResponse:
    """The Delete button of a run's or an experiment's page: the owner or staff deletes a finished record,
    then goes to `url`; one still going stays on its page, rendered by render_page with the refusal (409)."""
    try:
        record.delete_by(request.user)
    except Forbidden as error:
        raise PermissionDenied(error.message) from error
    except Conflict as error:
        return render_page(request, record, error.message, 409)
    return go_to(request, url)


def go_to(request, url: str) -> HttpResponse:
    """After a delete: the page at `url`. A button whose confirmation ran in htmx gets HX-Redirect, so the
    browser loads the whole page rather than htmx swapping it into the button's target."""
    if request.htmx:
        response = HttpResponse(status=204)
        response["HX-Redirect"] = url
        return response
    return redirect(url)


@login_required
@require_POST
def cancel_run(request, pk):
    """The Stop button: the stream then brings the run's end; without HTMX, back to the run's page."""
    run = visible_or_404(request, SteeringRun, pk)
    if not run.can_change(request.user):
        raise PermissionDenied("Only the run's owner or staff can stop it.")
    runs.cancel(run.pk, f"cancelled by {request.user.get_username()}")
    return HttpResponse(status=204) if request.htmx else redirect("steering-run", pk=run.pk)
