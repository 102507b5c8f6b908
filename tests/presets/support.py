"""Helpers shared by the preset tests."""

from presets_app.models import SteeringPreset
from presets_app.services import SETTINGS


def snapshot() -> list[tuple]:
    """Every preset's stored values, to show that a refused request changed nothing."""
    return list(
        SteeringPreset.objects.order_by("pk").values_list(
            "pk", "training_id", "owner_id", *SETTINGS, "updated_at"
        )
    )


def settings_of(preset: SteeringPreset) -> dict:
    return {field: getattr(preset, field) for field in SETTINGS if field != "name"}
