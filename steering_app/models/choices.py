"""A run's choices, below both model modules: an experiment (experiments.py) shares its runs' status and method,
and models/__init__.py imports experiments.py, so these cannot live on SteeringRun's own module."""

from django.db import models


class RunStatus(models.TextChoices):
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


class SteeringMethod(models.TextChoices):
    ADDITIVE = "additive"
    MULTIPLICATIVE = "multiplicative"
