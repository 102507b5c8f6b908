"""Experiments: does a steering condition work, at which strength, across many prompts (experiments.py runs them).

An Experiment is conditions x prompts x seeds x strengths. Each (condition, prompt, seed) is one *cell*: a sweep
run (SteeringRun.experiment) whose variants are the nonzero strengths; strength 0 is the run's clean row. Every
output of a completed cell is one ExperimentResult with its text and scores.
"""

from django.conf import settings
from django.db import models
from django.db.models import Q
from django.utils import timezone

from steering_app.errors import Conflict, Forbidden
from steering_app.models.choices import RunStatus, SteeringMethod
from steering_app.models.job import Job


class PromptSet(models.Model):
    """Named prompts an experiment runs over; the shipped default (bootstrap_demo) has no owner."""

    DEFAULT_NAME = "Everyday instructions"  # the set a new experiment starts from

    name = models.CharField(max_length=200, unique=True)
    description = models.TextField(blank=True)
    prompts = models.JSONField(default=list, help_text="The prompts, one string each")
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="prompt_sets",
    )
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["name"]

    def __str__(self):
        return f"{self.name} ({len(self.prompts)} prompts)"


class ExperimentQuerySet(models.QuerySet):
    def visible_to(self, user) -> "ExperimentQuerySet":
        """The runs' access rule (SteeringRunQuerySet.visible_to): lab-visible unless private."""
        if not user.is_authenticated:
            return self.none()
        return self if user.is_staff else self.filter(Q(private=False) | Q(owner=user))


class Experiment(Job):
    objects = ExperimentQuerySet.as_manager()
    Status = RunStatus  # queued -> running -> completed | failed | cancelled; resume: queued again

    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="experiments")
    private = models.BooleanField(default=False)
    name = models.CharField(max_length=200, blank=True)
    training = models.ForeignKey("Training", on_delete=models.PROTECT, related_name="experiments")
    method = models.CharField(max_length=20, choices=SteeringMethod.choices)
    intervention_layers = models.JSONField(default=list)
    conditions = models.JSONField(help_text='[{"features": [{"feature_id": index, "coefficient": c}]}]')
    strengths = models.JSONField(help_text="Multipliers of every condition's coefficients; 0 is the control")
    prompt_set = models.ForeignKey(PromptSet, on_delete=models.SET_NULL, null=True, blank=True)
    prompts = models.JSONField(help_text="The prompts as run (a copy: editing the set changes nothing here)")
    seeds = models.JSONField(help_text="The seeds every prompt runs with")
    max_new_tokens = models.PositiveIntegerField()
    temperature = models.FloatField()
    chat = models.BooleanField(default=False)
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.QUEUED)
    cancel_requested_at = models.DateTimeField(null=True, blank=True)

    class Meta(Job.Meta):
        constraints = [
            models.CheckConstraint(
                condition=Q(status__in=["queued", "running", "completed", "failed", "cancelled"]),
                name="experiment_status_valid",
            ),
        ]

    def __str__(self):
        return f"Experiment {self.pk}" + (f" {self.name}" if self.name else "")

    @property
    def is_finished(self) -> bool:
        return self.status in (self.Status.COMPLETED, self.Status.FAILED, self.Status.CANCELLED)

    @property
    def total_cells(self) -> int:
        return len(self.conditions) * len(self.prompts) * len(self.seeds)

    @property
    def total_outputs(self) -> int:
        return self.total_cells * len(self.strengths)

    def can_change(self, user) -> bool:
        return user.is_authenticated and (user.is_staff or user.pk == self.owner_id)

    def check_can_change(self, user, action: str) -> None:
        if not self.can_change(user):
            raise Forbidden(f"Only the experiment's owner or staff can {action}.", "experiment_id")

    def set_private(self, user, private: bool) -> None:
        """Keep it (and every cell, each a run with its prompt and text) to its owner and staff, or share it."""
        self.check_can_change(user, "change who can read it")
        Experiment.objects.filter(pk=self.pk).update(private=private)
        self.cells.update(private=private)
        self.private = private

    def delete_by(self, user) -> None:
        """Delete a finished experiment with its cells and results (owner or staff only)."""
        self.check_can_change(user, "delete it")
        if not self.is_finished:
            raise Conflict(
                f"Experiment {self.pk} is {self.status}: cancel it before deleting it.", "experiment_id"
            )
        self.delete()


class ExperimentResult(models.Model):
    """One output: (condition, prompt, seed, strength) with its text, scores and metrics, and the run that made it."""

    experiment = models.ForeignKey(Experiment, on_delete=models.CASCADE, related_name="results")
    run = models.ForeignKey("SteeringRun", on_delete=models.SET_NULL, null=True, blank=True, related_name="+")
    condition = models.PositiveIntegerField()
    prompt_index = models.PositiveIntegerField()
    seed = models.BigIntegerField()
    strength = models.FloatField()
    text = models.TextField(blank=True)
    # The aggregate and its three parts, each in [0, 1] (scores.py); `scores` holds them with the raw readings.
    score = models.FloatField()
    concept = models.FloatField()
    fluency = models.FloatField()
    relevance = models.FloatField()
    scores = models.JSONField(default=dict)
    metrics = models.JSONField(default=dict)
    tokens = models.PositiveIntegerField(default=0, help_text="Tokens this output generated")

    class Meta:
        ordering = ["condition", "prompt_index", "seed", "strength"]
        constraints = [
            # A cell is stored once: a resumed experiment computes only the cells that have no results.
            models.UniqueConstraint(
                fields=["experiment", "condition", "prompt_index", "seed", "strength"],
                name="experiment_result_unique_output",
            ),
        ]
        indexes = [models.Index(fields=["experiment", "condition", "strength", "score"], name="result_rank")]

    def __str__(self):
        return f"Experiment {self.experiment_id} c{self.condition} p{self.prompt_index} s{self.seed} x{self.strength:g}"
