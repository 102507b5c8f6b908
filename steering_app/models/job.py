"""What every background job records, whatever it computes: a calibration, a steering run, an experiment, an
analysis a web request waits for."""

from django.db import models
from django.utils import timezone


class Job(models.Model):
    """Why it failed (blank unless it did), and when it was made, claimed and ended; newest first."""

    error = models.TextField(blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        abstract = True
        ordering = ["-created_at", "-id"]
