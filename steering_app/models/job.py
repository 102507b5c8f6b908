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


def progress_constraints(name: str, statuses: list[str]) -> list[models.CheckConstraint]:
    """A job with a progress bar: its status one of `statuses` and its progress within 0..1, the checks named
    <name>_status_valid and <name>_progress_range (a calibration, a vector job)."""
    return [
        models.CheckConstraint(condition=models.Q(status__in=statuses), name=f"{name}_status_valid"),
        models.CheckConstraint(
            condition=models.Q(progress__gte=0) & models.Q(progress__lte=1), name=f"{name}_progress_range"
        ),
    ]
