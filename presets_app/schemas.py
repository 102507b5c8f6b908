"""Request and response shapes of the presets API."""

from datetime import datetime
from typing import Literal

from django.conf import settings
from ninja import Field, Schema

from presets_app.models import SteeringPreset
from presets_app.services import MAX_DESCRIPTION_CHARS, MAX_NAME_CHARS
from steering_app.limits import (
    MAX_FEATURES,
    MAX_ID,
    MAX_LAYERS,
    MAX_PROMPT_CHARS,
    MAX_SEED,
    MAX_TEMPERATURE,
)
from steering_app.schemas import NO_NUL, STRICT, FeatureCoefficient, Layers, Method, Page, Sweep
from steering_app.steering_settings import DEFAULT_MAX_TOKENS, DEFAULT_TEMPERATURE


class PresetIn(Schema):
    model_config = STRICT

    training_id: int = Field(
        ge=1, le=MAX_ID, description="The completed training whose feature space it uses."
    )
    name: str = Field(
        "",
        max_length=MAX_NAME_CHARS,
        pattern=NO_NUL,
        description="Unique per training; blank: automatic.",
    )
    description: str = Field("", max_length=MAX_DESCRIPTION_CHARS, pattern=NO_NUL)
    features: list[FeatureCoefficient] = Field(min_length=1, max_length=MAX_FEATURES)
    intervention_layers: Layers = Field(min_length=1, max_length=MAX_LAYERS)
    method: Method = "additive"
    temperature: float = Field(DEFAULT_TEMPERATURE, ge=0, le=MAX_TEMPERATURE)
    max_tokens: int = Field(DEFAULT_MAX_TOKENS, ge=1, le=settings.STEERLAB_MAX_NEW_TOKENS)
    prompt: str = Field(
        "", max_length=MAX_PROMPT_CHARS, pattern=NO_NUL, description="Optional; blank: the preset keeps none."
    )
    system_prompt: str = Field(
        "", max_length=MAX_PROMPT_CHARS, pattern=NO_NUL, description="Chat mode's system prompt; blank: none."
    )
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="Optional; null: a random seed per run.")
    chat: bool = Field(False, description="Wrap the prompt in the model's chat template.")
    sweep: Sweep | None = Field(None, description="Optional strength sweep (the generate body's `sweep`).")
    is_favorite: bool = False


class PresetPatch(Schema):
    """Only the fields sent change; the result is validated whole, as on creation."""

    model_config = STRICT

    name: str | None = Field(None, min_length=1, max_length=MAX_NAME_CHARS, pattern=NO_NUL)
    description: str | None = Field(None, max_length=MAX_DESCRIPTION_CHARS, pattern=NO_NUL)
    features: list[FeatureCoefficient] | None = Field(None, min_length=1, max_length=MAX_FEATURES)
    intervention_layers: Layers | None = Field(None, min_length=1, max_length=MAX_LAYERS)
    method: Method | None = None
    temperature: float | None = Field(None, ge=0, le=MAX_TEMPERATURE)
    max_tokens: int | None = Field(None, ge=1, le=settings.STEERLAB_MAX_NEW_TOKENS)
    prompt: str | None = Field(None, max_length=MAX_PROMPT_CHARS, pattern=NO_NUL)
    system_prompt: str | None = Field(None, max_length=MAX_PROMPT_CHARS, pattern=NO_NUL)
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="null: forget the seed (random per run).")
    chat: bool | None = None
    sweep: Sweep | None = Field(None, description="null: no sweep.")
    is_favorite: bool | None = None


class PresetSettingsOut(Schema):
    """What a preset saves: the fields export and import carry too."""

    name: str
    description: str
    features: list[FeatureCoefficient]
    intervention_layers: list[int]
    method: str
    temperature: float
    max_tokens: int
    prompt: str
    system_prompt: str
    seed: int | None
    chat: bool
    sweep: list[float] | None
    is_favorite: bool


class PresetOut(PresetSettingsOut):
    id: int
    training_id: int
    owner: str
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


class ExportPreset(PresetSettingsOut):
    training: ExportTraining


class ExportDocument(Schema):
    format: Literal["steerlab.presets"]
    version: Literal[1]
    exported_at: datetime | None = None
    presets: list[ExportPreset]


class ImportOut(Schema):
    created: int
    presets: list[PresetOut]
