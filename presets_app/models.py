from django.conf import settings
from django.db import models
from django.db.models import Q
from django.utils import timezone

from steering_app.models import Training
from steering_app.models.steering_config import SteeringConfig, steering_constraints


class SteeringPreset(SteeringConfig):
    """A saved steering configuration within one training's feature space, shared with every lab member."""

    training = models.ForeignKey(Training, on_delete=models.CASCADE, related_name="presets")
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="steering_presets"
    )
    name = models.CharField(max_length=200)
    description = models.TextField(blank=True)
    # Optional: what a run adds to the settings. Loading the preset fills them in when it has them.
    prompt = models.TextField(blank=True)
    seed = models.BigIntegerField(null=True, blank=True, help_text="Empty: a random seed per run")
    # Chat mode's system prompt: loading the preset into the panel sets the chat's system prompt field.
    system_prompt = models.TextField(blank=True)
    is_favorite = models.BooleanField(default=False)
    created_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-is_favorite", "-created_at", "-id"]
        constraints = [
            models.UniqueConstraint(fields=["training", "name"], name="preset_unique_name_per_training"),
            *steering_constraints("preset"),
            models.CheckConstraint(
                condition=Q(seed__isnull=True) | Q(seed__gte=0), name="preset_seed_non_negative"
            ),
        ]
        indexes = [
            models.Index(fields=["training", "-is_favorite", "-created_at"], name="preset_training_listing")
        ]

    def __str__(self):
        return self.name

    def can_modify(self, user) -> bool:
        return user.is_authenticated and (user.is_staff or user.pk == self.owner_id)
