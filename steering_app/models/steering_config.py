from django.db import models
from django.db.models import Q

from steering_app.models.choices import SteeringMethod


class SteeringConfig(models.Model):
    """What a run steers with and a preset saves, under the names the API and SteeringSettings use.

    The training, the prompt and the seed are each model's own: a run's prompt and seed are required and a
    preset's optional, and each has its own rule for deleting a training.
    """

    Method = SteeringMethod

    features = models.JSONField(default=list, help_text='[{"feature_id": index, "coefficient": c}]')
    intervention_layers = models.JSONField(default=list)
    method = models.CharField(max_length=20, choices=Method.choices, default=Method.ADDITIVE)
    temperature = models.FloatField(default=0.7)
    max_tokens = models.PositiveIntegerField(default=64)
    chat = models.BooleanField(default=False, help_text="Wrap the prompt in the model's chat template")
    sweep = models.JSONField(
        null=True, blank=True, help_text="Strength multipliers, one steered variant each; empty: one variant."
    )

    class Meta:
        abstract = True


STEERING_FIELDS = tuple(field.name for field in SteeringConfig._meta.local_fields)


def steering_constraints(prefix: str) -> list[models.CheckConstraint]:
    """The database's checks of the steering fields; prefix keeps each model's constraint names unique."""
    return [
        models.CheckConstraint(
            condition=Q(method__in=SteeringConfig.Method.values), name=f"{prefix}_method_valid"
        ),
        models.CheckConstraint(
            condition=Q(temperature__gte=0) & Q(temperature__lte=2), name=f"{prefix}_temperature_range"
        ),
        models.CheckConstraint(condition=Q(max_tokens__gte=1), name=f"{prefix}_max_tokens_positive"),
    ]
