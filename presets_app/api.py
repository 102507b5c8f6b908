"""Steering presets API, mounted at /api/presets/steering (spec section 6)."""

from datetime import datetime
from typing import Annotated, Literal

from django.conf import settings
from django.http import HttpRequest, HttpResponse
from ninja import Field, Path, Query, Router, Schema, Status

from presets_app import services
from presets_app.models import SteeringPreset
from steering_app.schemas import (
    MAX_ID,
    MAX_INDEX,
    MAX_PAGE,
    MAX_SEARCH_CHARS,
    NO_NUL,
    STRICT,
    FeatureCoefficient,
    Page,
    error_responses,
)
from steering_app.services import MAX_FEATURES, MAX_LAYERS, InvalidInput
from steerproject.safejson import is_json_media_type

router = Router(tags=["presets"])

Method = Literal["additive", "multiplicative"]
Layers = list[Annotated[int, Field(ge=0, le=MAX_INDEX)]]
PresetId = Path(..., ge=1, le=MAX_ID)


class PresetIn(Schema):
    model_config = STRICT

    training_id: int = Field(
        ge=1, le=MAX_ID, description="The completed training whose feature space it uses."
    )
    name: str = Field(
        "",
        max_length=services.MAX_NAME_CHARS,
        pattern=NO_NUL,
        description="Unique per training; blank: automatic.",
    )
    description: str = Field("", max_length=services.MAX_DESCRIPTION_CHARS, pattern=NO_NUL)
    features: list[FeatureCoefficient] = Field(min_length=1, max_length=MAX_FEATURES)
    intervention_layers: Layers = Field(min_length=1, max_length=MAX_LAYERS)
    method: Method = "additive"
    temperature: float = Field(0.7, ge=0, le=2)
    max_tokens: int = Field(64, ge=1, le=settings.STEERLAB_MAX_NEW_TOKENS)
    is_favorite: bool = False


class PresetPatch(Schema):
    """Only the fields sent change; the result is validated whole, as on creation."""

    model_config = STRICT

    name: str | None = Field(None, min_length=1, max_length=services.MAX_NAME_CHARS, pattern=NO_NUL)
    description: str | None = Field(None, max_length=services.MAX_DESCRIPTION_CHARS, pattern=NO_NUL)
    features: list[FeatureCoefficient] | None = Field(None, min_length=1, max_length=MAX_FEATURES)
    intervention_layers: Layers | None = Field(None, min_length=1, max_length=MAX_LAYERS)
    method: Method | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    max_tokens: int | None = Field(None, ge=1, le=settings.STEERLAB_MAX_NEW_TOKENS)
    is_favorite: bool | None = None


class PresetOut(Schema):
    id: int
    training_id: int
    owner: str
    name: str
    description: str
    features: list[FeatureCoefficient]
    intervention_layers: list[int]
    method: str
    temperature: float
    max_tokens: int
    is_favorite: bool
    created_at: datetime
    updated_at: datetime

    @staticmethod
    def resolve_owner(preset: SteeringPreset) -> str:
        return preset.owner.get_username()


class PresetPage(Page):
    presets: list[PresetOut]


class ExportTraining(Schema):
    id: int = Field(description="The training's id on the exporting installation.")
    model_name: str
    hook_layer: int
    d_sae: int


class ExportPreset(Schema):
    name: str
    description: str
    training: ExportTraining
    features: list[FeatureCoefficient]
    intervention_layers: list[int]
    method: str
    temperature: float
    max_tokens: int
    is_favorite: bool


class ExportDocument(Schema):
    format: Literal["steerlab.presets"]
    version: Literal[1]
    exported_at: datetime | None = None
    presets: list[ExportPreset]


class ImportOut(Schema):
    created: int
    presets: list[PresetOut]


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
        raise services.NotFound(f"Presets {missing} do not exist.", "ids")
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
