"""Server-rendered pages of steering vectors: "New steering vector", a vector space with its separation charts,
and the download of any steering as a llama.cpp control vector.

A vector's life is vector_jobs.py's; the export is services.control_vector_gguf. These views read the request,
call those, and render. A space's page polls itself (htmx, every second) while one of its jobs is unfinished.
"""

from urllib.parse import urlencode

from django.contrib.auth.decorators import login_required
from django.http import HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.views.decorators.http import require_GET, require_http_methods

from steering_app import forms as steering_forms
from steering_app import services, vector_charts, vector_jobs
from steering_app.errors import InvalidInput, SteeringError, WorkerUnavailable
from steering_app.models import Training

SPACE_TEMPLATE = "steering/vectors/space.html"
# What a control-vector download reads of the panel's form (its own field names, as panel.apply_query reads them).
EXPORTED_FIELDS = ("training", "method", "layers", "feature_id", "coefficient")


@login_required
@require_http_methods(["GET", "POST"])
def new_vector(request):
    if request.method == "GET":
        form = steering_forms.VectorForm(initial={"target": request.GET.get("target", "")})
        return _render_new(request, form)
    form = steering_forms.VectorForm(request.POST, request.FILES)
    status = 400
    if form.is_valid():
        try:
            job = vector_jobs.create(request.user, **form.vector_request())
        except SteeringError as error:
            form.add_steering_error(error)
            status = 503 if isinstance(error, WorkerUnavailable) else 400
        else:
            return redirect("steering-vector-space", pk=job.training_id)
    return _render_new(request, form, status)


def _render_new(request, form, status: int = 200):
    return render(request, "steering/vectors/new.html", {"form": form}, status=status)


@login_required
@require_GET
def vector_space(request, pk):
    """A vector space's concepts with their separation charts, and its jobs; an htmx request (the page polling
    while a job runs) gets the body only."""
    space = get_object_or_404(
        Training.objects.select_related("model"), pk=pk, encoder_type=Training.EncoderType.VECTORS
    )
    report = vector_jobs.report(space)
    concepts = [_concept(space, entry) for entry in report["concepts"]]
    context = {
        "space": space,
        "concepts": concepts,
        "jobs": report["jobs"],
        "working": any(job["status"] in ("queued", "running") for job in report["jobs"]),
    }
    template = f"{SPACE_TEMPLATE}#body" if request.htmx else SPACE_TEMPLATE
    return render(request, template, context)


def _concept(space: Training, entry: dict) -> dict:
    """A concept as its card shows it: the chart, and the panel's link that steers with it at its best layer."""
    query = urlencode(
        {"training": space.pk, "feature_id": entry["index"], "coefficient": 1, "layers": entry["best_layer"]}
    )
    separation, best = entry["separation"], entry["best_layer"]
    return {
        **entry,
        "accuracy": separation[best] if best < len(separation) else None,
        "chart": vector_charts.separation_chart(separation, best),
        "steer_url": f"{reverse('steering-panel')}?{query}",
    }


@login_required
@require_GET
def control_vector(request):
    """The steering in the query (the panel's field names) as a llama.cpp control vector (GGUF) download.

    The panel's button asks with htmx first: an error is shown in the panel's error list (422), and a valid
    request answers HX-Redirect to this URL with only the exported fields, which the browser then downloads."""
    form = steering_forms.ControlVectorForm(request.GET)
    if form.is_valid():
        data = form.cleaned_data
        training = Training.objects.completed().filter(pk=data["training"]).first()
        try:
            if training is None:
                raise InvalidInput(f"Training {data['training']} is not a completed training.", "training_id")
            content = services.control_vector_gguf(training, data["features"], data["layers"], data["method"])
        except SteeringError as error:
            form.add_steering_error(error)
    if form.errors:
        return _export_refused(request, steering_forms.form_errors(form))
    if request.htmx:
        response = HttpResponse(status=204)
        kept = [(name, value) for name in EXPORTED_FIELDS for value in request.GET.getlist(name)]
        response["HX-Redirect"] = f"{reverse('steering-control-vector')}?{urlencode(kept)}"
        return response
    response = HttpResponse(content, content_type=services.CONTROL_VECTOR_MEDIA_TYPE)
    response["Content-Disposition"] = f'attachment; filename="{services.control_vector_filename(training)}"'
    return response


def _export_refused(request, errors: list[tuple[str, str]]) -> HttpResponse:
    if request.htmx:
        return render(request, "steering/panel.html#form-errors", {"error_list": errors}, status=422)
    return render(request, "steering/vectors/export_refused.html", {"error_list": errors}, status=400)
