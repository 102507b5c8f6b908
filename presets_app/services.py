"""Steering presets: the one validation (API, panel, admin and import all call it), export and import."""

import json
from collections import defaultdict
from collections.abc import Container, Iterable
from datetime import datetime
from typing import TYPE_CHECKING

from django.db import IntegrityError, transaction
from django.db.models import Q, QuerySet
from django.utils import timezone

from presets_app.models import SteeringPreset
from steering_app.errors import Conflict, Forbidden, InvalidInput, NotFound, SteeringError
from steering_app.json_checks import MalformedJSON, bracketed, loads
from steering_app.limits import MAX_ID, MAX_INDEX, MAX_PROMPT_CHARS, MAX_SEED
from steering_app.models import Feature, Training
from steering_app.models.steering_config import STEERING_FIELDS
from steering_app.steering_settings import (
    SteeringSettings,
    is_integer,
)

if TYPE_CHECKING:
    from django.contrib.auth.models import AbstractBaseUser as User

FORMAT = "steerlab.presets"
VERSION = 1
MAX_IMPORT_BYTES = 1024 * 1024
MAX_EXPORT_IDS = 1000
# Rows per write transaction of an import: a few milliseconds of SQLite's write lock each.
IMPORT_BATCH_SIZE = 200
MAX_NAME_CHARS = SteeringPreset._meta.get_field("name").max_length
MAX_DESCRIPTION_CHARS = 2000
SETTINGS = ("name", "description", *STEERING_FIELDS, "prompt", "system_prompt", "seed", "is_favorite")
# The steering fields' defaults are SteeringSettings.from_fields'. A preset without a seed (null) leaves each
# run its own random one.
DEFAULTS = {"description": "", "prompt": "", "system_prompt": "", "chat": False, "is_favorite": False}


def clean_preset(training: Training, data: dict, known_features: Container[int] | None = None) -> dict:
    """Check a preset's settings against `training` the way a steering run is checked.

    Returns the values to store; raises InvalidInput naming the field at fault. A blank name becomes the
    automatic name of the specification. known_features (the training's feature indices) spares a query.
    """
    if not training.is_completed:
        raise Conflict(
            f"Training {training.pk} is {training.status}; presets need a completed training.", "training_id"
        )
    values = {**DEFAULTS, **{key: value for key, value in data.items() if value is not None}}
    name = _text(values.get("name") or "", "name", MAX_NAME_CHARS)
    description = _text(values["description"], "description", MAX_DESCRIPTION_CHARS)
    prompt = _text(values["prompt"], "prompt", MAX_PROMPT_CHARS)
    system_prompt = _text(values["system_prompt"], "system_prompt", MAX_PROMPT_CHARS)
    seed = values.get("seed")
    if seed is not None and (not is_integer(seed) or not 0 <= seed <= MAX_SEED):
        raise InvalidInput("seed must be a non-negative 63-bit integer, or null for a random one.", "seed")
    for flag in ("chat", "is_favorite"):
        if not isinstance(values[flag], bool):
            raise InvalidInput(f"{flag} must be true or false.", flag)
    steering = SteeringSettings.from_fields(values).validate(training, known_features)
    return {
        "name": name.strip() or auto_name(len(steering.features), steering.layers),
        "description": description.strip(),
        "prompt": prompt if prompt.strip() else "",
        "system_prompt": system_prompt if system_prompt.strip() else "",
        "seed": seed,
        "chat": values["chat"],
        "is_favorite": values["is_favorite"],
        **steering.as_fields(),
    }


def _text(value: object, field: str, limit: int) -> str:
    if not isinstance(value, str):
        raise InvalidInput(f"{field} must be text.", field)
    if "\x00" in value:
        raise InvalidInput("Text must not contain NUL characters.", field)
    if len(value.strip()) > limit:
        raise InvalidInput(f"The {field} is longer than {limit} characters.", field)
    return value


def auto_name(feature_count: int, layers: list[int], now: datetime | None = None) -> str:
    hhmm = timezone.localtime(now).strftime("%H%M")
    if len(layers) == 1:
        return f"steering_{feature_count}features_layer{layers[0]}_{hhmm}"
    return f"steering_{feature_count}features_layers{min(layers)}-{max(layers)}_{hhmm}"


def free_name(name: str, taken: set[str]) -> str:
    """`name`, or `name (2)`, `name (3)`... whichever is not taken, within the length limit."""
    candidate, number = name, 1
    while candidate in taken:
        number += 1
        suffix = f" ({number})"
        candidate = name[: MAX_NAME_CHARS - len(suffix)] + suffix
    return candidate


def taken_names(training: Training) -> set[str]:
    return set(SteeringPreset.objects.filter(training=training).values_list("name", flat=True))


def list_presets(
    training_id: int | None = None, search: str = "", favorites_only: bool = False
) -> QuerySet[SteeringPreset]:
    """Every member sees every preset: favorites first, then the newest."""
    presets = SteeringPreset.objects.select_related("owner", "training__model")
    if training_id is not None:
        presets = presets.filter(training_id=training_id)
    if search:
        presets = presets.filter(Q(name__icontains=search) | Q(description__icontains=search))
    if favorites_only:
        presets = presets.filter(is_favorite=True)
    return presets.order_by("-is_favorite", "-created_at", "-id")


def attach_feature_labels(presets: list[SteeringPreset]) -> None:
    """Give each preset `labelled_features`: its features in order, each with its label in the training."""
    wanted = defaultdict(set)
    for preset in presets:
        wanted[preset.training_id].update(item["feature_id"] for item in preset.features)
    labels = {}
    for training_id, indices in wanted.items():
        rows = Feature.objects.filter(training_id=training_id, index__in=indices).values_list(
            "index", "label"
        )
        labels.update(((training_id, index), label) for index, label in rows)
    for preset in presets:
        preset.labelled_features = [
            {**item, "label": labels.get((preset.training_id, item["feature_id"]), "")}
            for item in preset.features
        ]


def get_preset(pk: int) -> SteeringPreset:
    within_range = 1 <= pk <= MAX_ID
    preset = (
        within_range
        and SteeringPreset.objects.select_related("owner", "training__model").filter(pk=pk).first()
    )
    if not preset:
        raise NotFound(f"Preset {pk} does not exist.", "id")
    return preset


def get_preset_to_modify(user: "User", pk: int) -> SteeringPreset:
    preset = get_preset(pk)
    if not preset.can_modify(user):
        raise Forbidden("Only the preset's owner or staff can change or delete it.")
    return preset


def create_preset(owner: "User", training_id: int, data: dict) -> SteeringPreset:
    training = Training.objects.get_completed(training_id)
    values = clean_preset(training, data)
    if (data.get("name") or "").strip():
        check_name_free(training, values["name"])
    else:
        values["name"] = free_name(values["name"], taken_names(training))
    return _save(SteeringPreset(training=training, owner=owner, **values))


def update_preset(preset: SteeringPreset, changes: dict) -> SteeringPreset:
    current = {field: getattr(preset, field) for field in SETTINGS}
    values = clean_preset(preset.training, {**current, **changes})
    check_name_free(preset.training, values["name"], exclude_pk=preset.pk)
    for field, value in values.items():
        setattr(preset, field, value)
    return _save(preset)


def toggle_favorite(preset: SteeringPreset) -> SteeringPreset:
    preset.is_favorite = not preset.is_favorite
    preset.save(update_fields=["is_favorite", "updated_at"])
    return preset


def check_name_free(training: Training, name: str, exclude_pk: int | None = None) -> None:
    if SteeringPreset.objects.filter(training=training, name=name).exclude(pk=exclude_pk).exists():
        raise InvalidInput(f"A preset named “{name}” already exists for this training.", "name")


def _save(preset: SteeringPreset) -> SteeringPreset:
    try:
        with transaction.atomic():
            preset.save()
    except IntegrityError as error:  # a concurrent save took the name between the check and the write
        raise InvalidInput(
            f"A preset named “{preset.name}” already exists for this training.", "name"
        ) from error
    return preset


def export_document(presets: Iterable[SteeringPreset]) -> dict:
    """A versioned document naming each preset's training portably, so another installation can import it."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "exported_at": timezone.now().isoformat(),
        "presets": [
            {
                "name": preset.name,
                "description": preset.description,
                "training": {
                    "id": preset.training_id,
                    "model_name": preset.training.model.name,
                    "hook_layer": preset.training.hook_layer,
                    "d_sae": preset.training.d_sae,
                },
                "features": preset.features,
                "intervention_layers": preset.intervention_layers,
                "method": preset.method,
                "temperature": preset.temperature,
                "max_tokens": preset.max_tokens,
                "prompt": preset.prompt,
                "system_prompt": preset.system_prompt,
                "seed": preset.seed,
                "chat": preset.chat,
                "sweep": preset.sweep,
                "is_favorite": preset.is_favorite,
            }
            for preset in presets
        ],
    }


def export_json(presets: Iterable[SteeringPreset]) -> str:
    return json.dumps(export_document(presets), indent=2, ensure_ascii=False)


def export_filename() -> str:
    return f"steerlab-presets-{timezone.localtime():%Y%m%d-%H%M%S}.json"


def parse_document(raw: bytes) -> object:
    if len(raw) > MAX_IMPORT_BYTES:
        raise InvalidInput(f"The document is larger than {MAX_IMPORT_BYTES // 1024 // 1024} MB.", "file")
    try:
        return loads(raw)
    except MalformedJSON as error:
        field = bracketed(error.path) or "file"
        position = error.path[1] if error.path[:1] == ("presets",) and len(error.path) > 1 else None
        where = f"Preset {position + 1} ({field})" if isinstance(position, int) else field
        raise InvalidInput(f"{where}: {error.message}", field) from error
    except (ValueError, UnicodeDecodeError) as error:
        raise InvalidInput(f"The document is not valid JSON: {error}.", "file") from error


def import_document(owner: "User", document: object) -> list[SteeringPreset]:
    """Import every preset of the document as `owner`'s, or none: all are validated before the first write.

    The presets are written in batches, each its own short transaction, so that an import never holds
    SQLite's one write lock for long; if a batch fails, the batches already written are deleted.
    """
    items = _document_presets(document)
    trainings: dict[tuple, Training] = {}
    known_features: dict[int, frozenset[int]] = {}
    cleaned = []
    for position, item in enumerate(items):
        try:
            if not isinstance(item, dict):
                raise InvalidInput("A preset must be an object.")
            training = _match_training(item.get("training"), trainings)
            if training.pk not in known_features:
                known_features[training.pk] = frozenset(training.features.values_list("index", flat=True))
            cleaned.append((training, clean_preset(training, item, known_features[training.pk])))
        except SteeringError as error:
            field = f"presets[{position}]" + (f".{error.field}" if error.field else "")
            raise InvalidInput(f"Preset {position + 1} ({field}): {error.message}", field) from error
    names = {training.pk: taken_names(training) for training in trainings.values()}
    presets = []
    for training, values in cleaned:
        taken = names[training.pk]
        values["name"] = free_name(values["name"], taken)
        taken.add(values["name"])
        presets.append(SteeringPreset(training=training, owner=owner, **values))
    return _write_all_or_none(presets)


def _document_presets(document: object) -> list:
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise InvalidInput(f'Not a SteerLab presets document: "format" must be "{FORMAT}".', "format")
    if document.get("version") != VERSION:
        raise InvalidInput(
            f"Unsupported document version {document.get('version')!r}; this installation reads {VERSION}.",
            "version",
        )
    items = document.get("presets")
    if not isinstance(items, list) or not items:
        raise InvalidInput('"presets" must be a non-empty list.', "presets")
    return items


def _write_all_or_none(presets: list[SteeringPreset]) -> list[SteeringPreset]:
    created: list[SteeringPreset] = []
    try:
        for start in range(0, len(presets), IMPORT_BATCH_SIZE):
            with transaction.atomic():
                created += SteeringPreset.objects.bulk_create(presets[start : start + IMPORT_BATCH_SIZE])
    except Exception as error:
        _delete_in_batches([preset.pk for preset in created])
        if isinstance(error, IntegrityError):  # a concurrent save took one of the names
            raise InvalidInput(
                "A preset name was taken while importing; nothing was imported, try again.", "presets"
            ) from error
        raise
    return created


def _delete_in_batches(pks: list[int]) -> None:
    for start in range(0, len(pks), IMPORT_BATCH_SIZE):
        with transaction.atomic():
            SteeringPreset.objects.filter(pk__in=pks[start : start + IMPORT_BATCH_SIZE]).delete()


def _match_training(reference: object, cache: dict[tuple, Training]) -> Training:
    """The training a document names: the same id when it matches, else a completed one of the same shape."""
    shape = "training must name model_name, hook_layer and d_sae (and id)."
    if not isinstance(reference, dict):
        raise InvalidInput(shape, "training")
    model_name, hook_layer, d_sae, pk = (
        reference.get(key) for key in ("model_name", "hook_layer", "d_sae", "id")
    )
    if (
        not isinstance(model_name, str)
        or "\x00" in model_name
        or not all(is_integer(v) and 0 <= v <= MAX_INDEX for v in (hook_layer, d_sae))
    ):
        raise InvalidInput(shape, "training")
    key = (model_name, hook_layer, d_sae, pk if is_integer(pk) and 1 <= pk <= MAX_ID else None)
    if key not in cache:
        same_shape = Training.objects.select_related("model").filter(
            model__name=model_name, hook_layer=hook_layer, d_sae=d_sae, status=Training.Status.COMPLETED
        )
        training = (
            same_shape.filter(pk=key[3]).first() if key[3] is not None else None
        ) or same_shape.order_by("-created_at", "-id").first()
        if training is None:
            raise InvalidInput(
                f"No completed training of {model_name} at layer {hook_layer} with {d_sae} features here.",
                "training",
            )
        cache[key] = training
    return cache[key]
