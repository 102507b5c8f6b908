from django import forms
from django.contrib import admin
from django.forms.fields import InvalidJSONInput
from django.http import HttpResponse
from django.utils import timezone
from django.utils.html import format_html_join

from presets_app import services
from presets_app.models import SteeringPreset
from steering_app import json_checks
from steering_app.errors import SteeringError
from steering_app.models.steering_config import STEERING_FIELDS


class BoundedJSONField(forms.JSONField):
    """Django's JSONField parses with json.loads, to validate a value and again to show it back, and a deeply
    nested value drives json.loads into RecursionError (a 500). Its depth is bounded first, as the API bounds
    a body's: too deep, it is a form error and is shown back as typed."""

    def to_python(self, value):
        if _too_deep(value):
            raise forms.ValidationError(
                f"The JSON is nested more than {json_checks.MAX_DEPTH} levels deep.", code="invalid"
            )
        return super().to_python(value)

    def bound_data(self, data, initial):
        if _too_deep(data) and not self.disabled:
            return InvalidJSONInput(data)
        return super().bound_data(data, initial)


def _too_deep(value: object) -> bool:
    return isinstance(value, str) and json_checks.nesting_depth(value.encode()) > json_checks.MAX_DEPTH


class SteeringPresetForm(forms.ModelForm):
    """Admin saves go through the same validation as the API, the panel and import."""

    class Meta:
        model = SteeringPreset
        fields = "__all__"
        field_classes = {
            "features": BoundedJSONField,
            "intervention_layers": BoundedJSONField,
            "sweep": BoundedJSONField,
        }

    def clean(self):
        cleaned = super().clean()
        training = cleaned.get("training") or (self.instance.training if self.instance.training_id else None)
        if training is None or self.errors:
            return cleaned
        data = {field: cleaned.get(field, getattr(self.instance, field)) for field in services.SETTINGS}
        try:
            values = services.clean_preset(training, data)
            services.check_name_free(training, values["name"], exclude_pk=self.instance.pk)
        except SteeringError as error:
            field = {"training_id": "training"}.get(error.field, error.field)
            self.add_error(field if field in self.fields else None, error.message)
            return cleaned
        for field, value in values.items():
            if field in self.fields:
                cleaned[field] = value
            else:
                setattr(self.instance, field, value)
        return cleaned


@admin.register(SteeringPreset)
class SteeringPresetAdmin(admin.ModelAdmin):
    form = SteeringPresetForm
    list_display = ["name", "training", "owner", "is_favorite", "feature_count", "updated_at"]
    list_filter = ["training", "is_favorite", "owner"]
    search_fields = ["name", "description"]
    list_select_related = ["owner", "training__model", "training__dataset"]
    actions = ["mark_favorite", "unmark_favorite", "export_json"]

    def get_changeform_initial_data(self, request):
        return {"owner": request.user.pk, **super().get_changeform_initial_data(request)}

    def get_fields(self, request, obj=None):
        fields = [
            "name",
            "description",
            "training",
            "owner",
            *STEERING_FIELDS,
            "prompt",
            "system_prompt",
            "seed",
            "is_favorite",
        ]
        if obj is None:
            return fields
        fields[fields.index("features")] = "features_with_labels"
        return [*fields, "created_at", "updated_at"]

    def get_readonly_fields(self, request, obj=None):
        # The features belong to the training's feature space: neither changes once the preset exists.
        return ["training", "features_with_labels", "created_at", "updated_at"] if obj else []

    @admin.display(description="features")
    def feature_count(self, preset):
        return len(preset.features)

    @admin.display(description="features")
    def features_with_labels(self, preset):
        services.attach_feature_labels([preset])
        return format_html_join(
            "\n",
            "<div>#{} {} <strong>× {}</strong></div>",
            (
                (item["feature_id"], item["label"], f"{item['coefficient']:g}")
                for item in preset.labelled_features
            ),
        )

    @admin.action(description="Mark selected presets as favorite")
    def mark_favorite(self, request, queryset):
        count = queryset.filter(is_favorite=False).update(is_favorite=True, updated_at=timezone.now())
        self.message_user(request, f"Marked {count} preset(s) as favorite.")

    @admin.action(description="Unmark selected presets as favorite")
    def unmark_favorite(self, request, queryset):
        count = queryset.filter(is_favorite=True).update(is_favorite=False, updated_at=timezone.now())
        self.message_user(request, f"Unmarked {count} preset(s).")

    @admin.action(description="Export selected presets as JSON")
    def export_json(self, request, queryset):
        presets = queryset.select_related("training__model").order_by("-is_favorite", "-created_at", "-id")
        response = HttpResponse(services.export_json(presets), content_type="application/json")
        response["Content-Disposition"] = f'attachment; filename="{services.export_filename()}"'
        return response
