"""Steering presets API, mounted at /api/presets/steering (spec section 6)."""

from django.http import HttpRequest, HttpResponse
from ninja import Path, Query, Router, Status

from presets_app import services
from presets_app.schemas import ExportDocument, ImportOut, PresetIn, PresetOut, PresetPage, PresetPatch
from steering_app.errors import InvalidInput, NotFound
from steering_app.limits import MAX_ID, MAX_INDEX, MAX_PAGE, MAX_SEARCH_CHARS
from steering_app.schemas import NO_NUL, error_responses
from steerproject.safejson import is_json_media_type

router = Router(tags=["presets"])
PresetId = Path(..., ge=1, le=MAX_ID)
# The fields a PATCH clears when it sends them as null; any other null field keeps its value.
CLEARED_BY_NULL = {"seed", "sweep"}


def _to_dicts(items) -> list[dict]:
    return [item.model_dump() for item in items]


@router.get("", response={200: PresetPage, **error_responses()}, summary="List presets")
def list_presets(
    request: HttpRequest,
    training_id: int | None = Query(None, ge=1, le=MAX_ID),
    search: str = Query("", max_length=MAX_SEARCH_CHARS, pattern=NO_NUL),
    favorites_only: bool = False,
    limit: int = Query(50, ge=1, le=MAX_PAGE),
    offset: int = Query(0, ge=0, le=MAX_INDEX),
):
    """Every member's presets, favorites first, then the newest; search looks in name and description."""
    presets = services.list_presets(training_id, search.strip(), favorites_only)
    return {
        "presets": list(presets[offset : offset + limit]),
        "total": presets.count(),
        "limit": limit,
        "offset": offset,
    }


@router.post("", response={201: PresetOut, **error_responses(404, 409)}, summary="Save a preset")
def create_preset(request: HttpRequest, payload: PresetIn):
    data = payload.model_dump(exclude={"training_id"})
    data["features"] = _to_dicts(payload.features)
    return Status(201, services.create_preset(request.auth, payload.training_id, data))


@router.get("/export", response={200: ExportDocument, **error_responses(404)}, summary="Export presets")
def export_presets(
    request: HttpRequest, ids: str = Query(..., max_length=20 * services.MAX_EXPORT_IDS, examples=["1,2"])
):
    """A downloadable document another installation can import (training named by model, layer, d_sae)."""
    wanted = _parse_ids(ids)
    found = {preset.pk: preset for preset in services.list_presets().filter(pk__in=wanted)}
    missing = [pk for pk in wanted if pk not in found]
    if missing:
        raise NotFound(f"Presets {missing} do not exist.", "ids")
    response = HttpResponse(services.export_json(found[pk] for pk in wanted), content_type="application/json")
    response["Content-Disposition"] = f'attachment; filename="{services.export_filename()}"'
    return response


def _parse_ids(ids: str) -> list[int]:
    try:
        wanted = list(dict.fromkeys(int(part) for part in ids.split(",") if part.strip()))
    except ValueError as error:
        raise InvalidInput("ids must be preset ids separated by commas, like 1,2.", "ids") from error
    if not wanted or len(wanted) > services.MAX_EXPORT_IDS or not all(1 <= pk <= MAX_ID for pk in wanted):
        raise InvalidInput(f"ids must name 1 to {services.MAX_EXPORT_IDS} preset ids, like 1,2.", "ids")
    return wanted


@router.post(
    "/import",
    response={201: ImportOut, **error_responses()},
    summary="Import presets",
    openapi_extra={
        "requestBody": {
            "required": True,
            "description": f"An exported document, at most {services.MAX_IMPORT_BYTES} bytes: "
            "as the JSON body or as the multipart field `file`.",
            "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/ExportDocument"}},
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "properties": {"file": {"type": "string", "format": "binary"}},
                        "required": ["file"],
                    }
                },
            },
        }
    },
)
def import_presets(request: HttpRequest):
    """All or nothing: the whole document is validated first; a clashing name gets a " (2)" suffix."""
    created = services.import_document(request.auth, services.parse_document(import_payload(request)))
    return Status(201, {"created": len(created), "presets": created})


def import_payload(request: HttpRequest) -> bytes:
    # Refuse an oversized body before Django reads it (its own limit would answer outside the error shape).
    multipart_overhead = 64 * 1024
    if int(request.META.get("CONTENT_LENGTH") or 0) > services.MAX_IMPORT_BYTES + multipart_overhead:
        raise InvalidInput(
            f"The document is larger than {services.MAX_IMPORT_BYTES // 1024 // 1024} MB.", "file"
        )
    if request.content_type == "multipart/form-data":
        upload = request.FILES.get("file")
        if upload is None:
            raise InvalidInput("Send the document as the multipart field `file`.", "file")
        if upload.size > services.MAX_IMPORT_BYTES:
            raise InvalidInput(
                f"The document is larger than {services.MAX_IMPORT_BYTES // 1024 // 1024} MB.", "file"
            )
        return upload.read()
    if not is_json_media_type(request.content_type or ""):
        raise InvalidInput("Send the document as application/json or as the multipart field `file`.", "file")
    return request.body


@router.get("/{preset_id}", response={200: PresetOut, **error_responses(404)}, summary="Get a preset")
def get_preset(request: HttpRequest, preset_id: int = PresetId):
    return services.get_preset(preset_id)


@router.patch(
    "/{preset_id}", response={200: PresetOut, **error_responses(403, 404)}, summary="Update a preset"
)
def update_preset(request: HttpRequest, payload: PresetPatch, preset_id: int = PresetId):
    """Owner or staff only."""
    preset = services.get_preset_to_modify(request.auth, preset_id)
    changes = payload.model_dump(exclude_unset=True, exclude_none=True)
    # A null seed or sweep is a value, not "keep": a random seed per run; no sweep.
    for name in CLEARED_BY_NULL & payload.model_fields_set:
        changes[name] = getattr(payload, name)
    if payload.features is not None:
        changes["features"] = _to_dicts(payload.features)
    return services.update_preset(preset, changes)


@router.delete("/{preset_id}", response={204: None, **error_responses(403, 404)}, summary="Delete a preset")
def delete_preset(request: HttpRequest, preset_id: int = PresetId):
    """Owner or staff only."""
    services.get_preset_to_modify(request.auth, preset_id).delete()
    return Status(204, None)


@router.post(
    "/{preset_id}/favorite",
    response={200: PresetOut, **error_responses(403, 404)},
    summary="Toggle favorite",
)
def toggle_favorite(request: HttpRequest, preset_id: int = PresetId):
    """Owner or staff only."""
    return services.toggle_favorite(services.get_preset_to_modify(request.auth, preset_id))
