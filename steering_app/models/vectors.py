"""A job that makes one steering vector (a concept) from contrastive examples: steering_app/vector_jobs.py runs it.

    queued --claim--> running --> completed (report) | failed (error)

The training it belongs to is a vector space (Training.encoder_type "vectors"). A job that starts a new space
creates that training, pending, with it: the training completes with its first concept, or fails with it.
"""

from django.conf import settings
from django.db import models
from django.db.models import Q

from steering_app.models.job import Job, progress_constraints


class VectorJob(Job):
    class Status(models.TextChoices):
        QUEUED = "queued"
        RUNNING = "running"
        COMPLETED = "completed"
        FAILED = "failed"

    class Method(models.TextChoices):
        DIFFMEAN = "diffmean"
        PCA = "pca"

    class Tokens(models.TextChoices):
        ALL = "all"
        LAST = "last"

    # Null for a job that a management command made.
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, null=True, blank=True, related_name="vector_jobs"
    )
    training = models.ForeignKey("Training", on_delete=models.CASCADE, related_name="vector_jobs")
    # Whether the job created its training: the training then fails with the job.
    new_space = models.BooleanField(default=False)
    name = models.CharField(max_length=300)
    description = models.TextField(blank=True)
    method = models.CharField(max_length=10, choices=Method.choices, default=Method.DIFFMEAN)
    tokens = models.CharField(max_length=10, choices=Tokens.choices, default=Tokens.ALL)
    positives = models.JSONField(help_text="Texts that have the concept")
    negatives = models.JSONField(help_text="Texts that do not")
    paired = models.BooleanField(default=False, help_text="positives[i] pairs with negatives[i]")
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.QUEUED)
    progress = models.FloatField(default=0.0, help_text="0..1")
    # {"separation": [held-out accuracy per layer], "best_layer", "accuracy", "feature_index", ...}
    report = models.JSONField(null=True, blank=True)
    # The worker that claimed it (host:pid) writes heartbeat_at every second while it works; a sweep fails a job whose
    # heartbeat is older than STEERLAB_RUN_MAX_SECONDS.
    worker = models.CharField(max_length=200, blank=True)
    heartbeat_at = models.DateTimeField(null=True, blank=True)

    class Meta(Job.Meta):
        indexes = [models.Index(fields=["status", "created_at"], name="vectorjob_status_created")]
        constraints = [
            *progress_constraints("vectorjob", ["queued", "running", "completed", "failed"]),
            models.CheckConstraint(
                condition=Q(method__in=["diffmean", "pca"]), name="vectorjob_method_valid"
            ),
            models.CheckConstraint(condition=Q(tokens__in=["all", "last"]), name="vectorjob_tokens_valid"),
        ]

    def __str__(self):
        return f"Vector job {self.pk} '{self.name}' ({self.status})"

    @property
    def is_finished(self) -> bool:
        return self.status in (self.Status.COMPLETED, self.Status.FAILED)
