"""The panel's "Saved Presets" section: HTMX partials that each re-render the section's body."""

from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpResponse
from django.shortcuts import render
from django.urls import reverse
from django.views.decorators.http import require_GET, require_POST

from presets_app import services
from presets_app.forms import PresetForm
from steering_app.errors import Forbidden, InvalidInput, NotFound, SteeringError
from steering_app.limits import MAX_ID, MAX_INDEX
from steering_app.models import Training

BODY = "presets/_section.html#body"
PAGE_SIZE = 20
MAX_PAGE_NUMBER = MAX_INDEX // PAGE_SIZE


@login_required
@require_GET
def section(request):
    """One page of the training's presets; "Load more" appends the next page's rows (see the template)."""
    page = _int_or_none(request.GET.get("page")) or 1
    return _render_body(
        request, _training_or_none(request.GET.get("training")), page=min(max(page, 1), MAX_PAGE_NUMBER)
    )


@login_required
@require_POST
def save(request):
    """Save the panel's current configuration; on an error nothing is saved and the section shows why."""
    training = _training_or_none(request.POST.get("training"))
    name, description = request.POST.get("preset_name", ""), request.POST.get("preset_description", "")
    form = PresetForm(request.POST)
    try:
        if not form.is_valid():
            raise form.first_error()
        preset = services.create_preset(request.user, form.cleaned_data["training"], form.preset_data())
    except SteeringError as error:
        return _render_body(request, training, error=error, name=name, description=description)
    return _render_body(request, preset.training, notice=f"Saved “{preset.name}”.")


@login_required
@require_POST
def favorite(request, pk):
    preset = services.toggle_favorite(_get_preset_for_user(request, pk))
    return _render_body(request, preset.training)


@login_required
@require_POST
def delete(request, pk):
    preset = _get_preset_for_user(request, pk)
    preset.delete()
    return _render_body(request, preset.training, notice=f"Deleted “{preset.name}”.")


@login_required
@require_GET
def export(request):
    """From the section (HTMX) it sends the browser to download the file, which the plain GET answers."""
    training = _training_or_none(request.GET.get("training"))
    try:
        ids = _ids(request.GET)
        found = {preset.pk: preset for preset in services.list_presets().filter(pk__in=ids)}
        presets = [found[pk] for pk in dict.fromkeys(ids) if pk in found]
        if not presets:
            raise InvalidInput("Select the presets to export.", "preset_ids")
    except SteeringError as error:
        if request.htmx:
            return _render_body(request, training, error=error)
        raise Http404(error.message) from error
    if request.htmx:
        response = HttpResponse(status=204)
        response["HX-Redirect"] = reverse("presets-export") + "?ids=" + ",".join(str(p.pk) for p in presets)
        return response
    response = HttpResponse(services.export_json(presets), content_type="application/json")
    response["Content-Disposition"] = f'attachment; filename="{services.export_filename()}"'
    return response


@login_required
@require_POST
def import_file(request):
    training = _training_or_none(request.POST.get("training"))
    upload = request.FILES.get("preset_file")
    try:
        if upload is None:
            raise InvalidInput("Choose a presets file to import.", "preset_file")
        if upload.size > services.MAX_IMPORT_BYTES:
            raise InvalidInput(
                f"The file is larger than {services.MAX_IMPORT_BYTES // 1024 // 1024} MB.", "file"
            )
        created = services.import_document(request.user, services.parse_document(upload.read()))
    except SteeringError as error:
        return _render_body(request, training, error=error)
    elsewhere = sum(1 for preset in created if training is None or preset.training_id != training.pk)
    notice = f"Imported {len(created)} preset(s)" + (
        f", {elsewhere} for another training." if elsewhere else "."
    )
    return _render_body(request, training or created[0].training, notice=notice)


def _render_body(request, training, page=1, **context):
    presets, total, offset = [], 0, (page - 1) * PAGE_SIZE
    if training:
        listed = services.list_presets(training.pk)
        presets, total = list(listed[offset : offset + PAGE_SIZE]), listed.count()
    services.attach_feature_labels(presets)
    for preset in presets:
        preset.editable = preset.can_modify(request.user)
    shown = min(offset + len(presets), total)
    return render(
        request,
        BODY,
        {
            "training": training,
            "presets": presets,
            "total": total,
            "shown": shown,
            "next_page": page + 1 if shown < total and presets else None,
            **context,
        },
    )


def _get_preset_for_user(request, pk):
    try:
        return services.get_preset_to_modify(request.user, pk)
    except Forbidden as error:
        raise PermissionDenied(error.message) from error
    except NotFound as error:
        raise Http404(error.message) from error


def _training_or_none(value) -> Training | None:
    pk = _int_or_none(value)
    if pk is None or not 1 <= pk <= MAX_ID:
        return None
    return Training.objects.completed().filter(pk=pk).first()


def _int_or_none(value) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _ids(query) -> list[int]:
    parts = [
        part for value in query.getlist("preset_ids") + query.getlist("ids") for part in value.split(",")
    ]
    ids = [_int_or_none(part) for part in parts if part.strip()]
    if any(pk is None or not 1 <= pk <= MAX_ID for pk in ids) or len(ids) > services.MAX_EXPORT_IDS:
        raise InvalidInput(f"Select 1 to {services.MAX_EXPORT_IDS} presets by id.", "preset_ids")
    return ids
