import hashlib
import re
import secrets
from collections.abc import Iterable
from datetime import timedelta
from functools import cached_property

from django.conf import settings
from django.db import models, transaction
from django.db.models import Case, Q, When
from django.utils import timezone

from steering_app import streaming
from steering_app.errors import Conflict, Forbidden, InvalidInput, NotFound
from steering_app.limits import (
    MAX_ABS_COEFFICIENT,
    MAX_ABS_COEFFICIENT_HARD,
    MAX_FEATURES,
    MAX_ID,
    MAX_INDEX,
)
from steering_app.models.choices import RunStatus, SteeringMethod
from steering_app.models.job import Job, progress_constraints
from steering_app.models.steering_config import SteeringConfig, steering_constraints


class LanguageModel(models.Model):
    class Status(models.TextChoices):
        READY = "ready"
        ERROR = "error"

    name = models.CharField(max_length=200, unique=True)
    source = models.CharField(
        max_length=1000, help_text="Hub id, local directory, .gguf path or smollm2-demo"
    )
    architecture = models.CharField(max_length=100)
    num_layers = models.PositiveIntegerField()
    hidden_size = models.PositiveIntegerField()
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.READY)
    error = models.TextField(blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    # How the worker's slot step runs this model (engine/serving/plan.py StepPlan.as_dict()), stored when a
    # worker builds its batch: which host decided it, and when. Staff read it; nothing else depends on it.
    step_plan = models.JSONField(null=True, blank=True, editable=False)
    step_plan_host = models.CharField(max_length=255, blank=True, editable=False)
    step_plan_at = models.DateTimeField(null=True, blank=True, editable=False)

    class Meta:
        ordering = ["name"]
        constraints = [
            models.CheckConstraint(
                condition=Q(status__in=["ready", "error"]), name="languagemodel_status_valid"
            ),
            models.CheckConstraint(condition=Q(num_layers__gte=1), name="languagemodel_num_layers_positive"),
            models.CheckConstraint(
                condition=Q(hidden_size__gte=1), name="languagemodel_hidden_size_positive"
            ),
        ]

    def __str__(self):
        return self.name


class Dataset(models.Model):
    name = models.CharField(max_length=200, unique=True)
    source = models.CharField(max_length=1000, help_text="Text file, directory of text files, or demo")
    description = models.TextField(blank=True)
    num_tokens = models.PositiveBigIntegerField(default=0)

    class Meta:
        ordering = ["name"]

    def __str__(self):
        return self.name

    @classmethod
    def record_tokens(cls, pk: int | None, tokens: object) -> None:
        """Its token count is the most any job read from it: a training, a calibration, or the SAE an import
        brings (its cfg's metadata.tokens); a smaller or unknown count never lowers it."""
        if pk is not None and isinstance(tokens, int) and not isinstance(tokens, bool) and tokens > 0:
            cls.objects.filter(pk=pk, num_tokens__lt=tokens).update(num_tokens=tokens)


class JobStatus(models.TextChoices):
    """The life of a background job (an SAE training, a feature calibration)."""

    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"


class TrainingQuerySet(models.QuerySet):
    def completed(self) -> "TrainingQuerySet":
        """The trainings one can steer with: completed ones define a feature space."""
        return self.filter(status=Training.Status.COMPLETED).select_related("model", "dataset")

    def get_completed(self, pk: int, model_id: int | None = None) -> "Training":
        """The training with this id when it is completed; NotFound or Conflict naming training_id, and
        InvalidInput naming model_id when one is given that is not the training's model."""
        training = (
            self.select_related("model", "dataset").filter(pk=pk).first() if 1 <= pk <= MAX_ID else None
        )
        if training is None:
            raise NotFound(f"Training {pk} does not exist.", "training_id")
        if not training.is_completed:
            raise Conflict(
                f"Training {pk} is {training.status}; steering needs a completed training.", "training_id"
            )
        if model_id is not None and model_id != training.model_id:
            raise InvalidInput(
                f"model_id {model_id} is not the model of training {training.pk} ({training.model_id}).",
                "model_id",
            )
        return training


class Training(models.Model):
    """An SAE training job; a completed one defines a feature space over one layer of one model."""

    objects = TrainingQuerySet.as_manager()

    class EncoderType(models.TextChoices):
        STANDARD = "standard"
        TOPK = "topk"
        JUMPRELU = "jumprelu"
        # Directions made from examples or imported (steering_app/vector_jobs.py): one per concept, per layer.
        VECTORS = "vectors"

    Status = JobStatus

    model = models.ForeignKey(LanguageModel, on_delete=models.PROTECT, related_name="trainings")
    dataset = models.ForeignKey(
        Dataset, on_delete=models.SET_NULL, null=True, blank=True, related_name="trainings"
    )
    encoder_type = models.CharField(max_length=10, choices=EncoderType.choices)
    hook_layer = models.PositiveIntegerField()
    hook_name = models.CharField(max_length=200)
    d_in = models.PositiveIntegerField()
    d_sae = models.PositiveIntegerField()
    checkpoint_path = models.CharField(max_length=1000)
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.PENDING)
    error = models.TextField(blank=True)
    stats = models.JSONField(default=dict, blank=True, help_text="explained_variance, l0, dead_fraction")
    created_at = models.DateTimeField(default=timezone.now)
    completed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [models.Index(fields=["status", "-created_at"], name="training_status_created")]
        constraints = [
            models.CheckConstraint(
                condition=Q(encoder_type__in=["standard", "topk", "jumprelu", "vectors"]),
                name="training_encoder_type_valid",
            ),
            models.CheckConstraint(
                condition=Q(status__in=["pending", "running", "completed", "failed"]),
                name="training_status_valid",
            ),
            models.CheckConstraint(condition=Q(d_in__gte=1) & Q(d_sae__gte=1), name="training_dims_positive"),
        ]

    def __str__(self):
        return self.label

    @property
    def label(self) -> str:
        """How the panel's training picker (the specification's mock), admin and run pages name it."""
        if self.is_vector_space:
            concepts = (self.stats or {}).get("concepts") if isinstance(self.stats, dict) else None
            names = ", ".join(str(entry.get("name")) for entry in concepts or [] if isinstance(entry, dict))
            return f"vectors: {names or 'no concept yet'} • {self.model.name}"
        dataset = self.dataset.name if self.dataset_id else "no dataset"
        started = self.created_at
        return (
            f"{self.encoder_type} SAE • {self.model.name} • {dataset} • "
            f"Started {started.month}/{started.day}/{started.year}"
        )

    @property
    def is_completed(self) -> bool:
        return self.status == self.Status.COMPLETED

    @property
    def is_vector_space(self) -> bool:
        """Its features are directions with no encoder: only additive steering applies."""
        return self.encoder_type == self.EncoderType.VECTORS

    @cached_property
    def is_calibrated(self) -> bool:
        """Whether its features have max activations: additive coefficients are then multiples of them.

        Before calibration (an imported SAE) a_i = 1, so coefficients are in residual-stream units.
        """
        return self.features.filter(max_activation__gt=0).exists()

    @property
    def max_abs_coefficient(self) -> float:
        """The limit on |c|: 100 max activations once calibrated; else 100 residual norms at its layer when
        one was recorded (stats["residual_norm"]), else the hard cap."""
        if self.is_calibrated:
            return MAX_ABS_COEFFICIENT
        norm = self.stats.get("residual_norm") if isinstance(self.stats, dict) else None
        if isinstance(norm, int | float) and not isinstance(norm, bool) and norm > 0:
            return min(MAX_ABS_COEFFICIENT * float(norm), MAX_ABS_COEFFICIENT_HARD)
        return MAX_ABS_COEFFICIENT_HARD


class FeatureQuerySet(models.QuerySet):
    def search(self, query: str) -> "FeatureQuerySet":
        """Features matching the query, best first: the exact index (12 or #12), then the exact label, a label
        that starts with the query, one that holds its words as whole words, then as parts of words, then the
        description. Every word must appear in the label or the description. Ties go by index.

        The ranking by words alone (annotated as `search_rank`, plain SQL on SQLite and PostgreSQL), which
        feature_search blends with the features' meaning for the panel and the API. SteerLab's own labels read `"planet" (Mars, earth, flora)`: its quoted head word
        counts as the exact label.
        """
        query = " ".join(query.split())
        if not query:
            return self.none()
        words = query.split()
        in_label = Q()
        as_words = Q()
        anywhere = Q()
        for word in words:
            in_label &= Q(label__icontains=word)
            as_words &= Q(label__iregex=_WORD.format(re.escape(word)))
            anywhere &= Q(label__icontains=word) | Q(description__icontains=word)
        exact_label = (
            Q(label__iexact=query) | Q(label__iexact=f'"{query}"') | Q(label__istartswith=f'"{query}" ')
        )
        label_prefix = Q(label__istartswith=query) | Q(label__istartswith=f'"{query}')
        ranks = [
            When(exact_label, then=1),
            When(label_prefix, then=2),
            When(as_words, then=3),
            When(in_label, then=4),
        ]
        matches = anywhere
        number = query.removeprefix("#")
        if number.isdecimal() and int(number) <= MAX_INDEX:
            matches |= Q(index=int(number))
            ranks.insert(0, When(index=int(number), then=0))
        rank = Case(*ranks, default=5, output_field=models.IntegerField())
        return self.filter(matches).annotate(search_rank=rank).order_by("search_rank", "index")

    def labels(self, keys: Iterable[tuple[int, int]]) -> dict[tuple[int, int], str]:
        """{(training_id, index): label} of those features, in one query."""
        keys = set(keys)
        if not keys:
            return {}
        rows = self.filter(
            training_id__in={training for training, _ in keys}, index__in={index for _, index in keys}
        ).values_list("training_id", "index", "label")
        return {(training, index): label for training, index, label in rows if (training, index) in keys}


# A whole word inside a label, for SQLite's REGEXP (Python's re) and PostgreSQL's ~* alike: no \b, which
# PostgreSQL reads as a backspace, and no character classes only one of them knows.
_WORD = r"(^|[^0-9A-Za-z]){}([^0-9A-Za-z]|$)"


class Feature(models.Model):
    objects = FeatureQuerySet.as_manager()

    training = models.ForeignKey(Training, on_delete=models.CASCADE, related_name="features")
    index = models.PositiveIntegerField()
    label = models.CharField(max_length=300, blank=True)
    description = models.TextField(blank=True)
    max_activation = models.FloatField(
        null=True, blank=True, help_text="Empty when unknown: steering then uses 1"
    )
    activation_frequency = models.FloatField(null=True, blank=True)
    top_tokens = models.JSONField(default=list, blank=True)
    examples = models.JSONField(
        default=list, blank=True, help_text="Strongest activating snippets, the token marked «like this»"
    )
    # The sentence embedder's unit vector of its label, top tokens and description (float32 bytes), and the key
    # of the embedder and text it was computed from: feature_search embeds it again when they differ.
    embedding = models.BinaryField(null=True, blank=True, editable=False)
    embedding_key = models.CharField(max_length=64, blank=True, editable=False)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["training", "index"], name="feature_unique_index_per_training"),
            models.CheckConstraint(
                condition=Q(activation_frequency__isnull=True)
                | (Q(activation_frequency__gte=0) & Q(activation_frequency__lte=1)),
                name="feature_activation_frequency_range",
            ),
        ]
        indexes = [models.Index(fields=["training", "label"], name="feature_training_label")]
        ordering = ["training", "index"]

    def __str__(self):
        return f"#{self.index} {self.label}"

    @classmethod
    def from_description(cls, training: "Training", index: int, info: dict) -> "Feature":
        """A row from a feature-table entry (Neuronpedia explanation or SteerLab description), unsaved."""
        description = str(info.get("description") or "")
        label = str(info.get("label") or description or f"feature #{index}")
        return cls(
            training=training,
            index=index,
            label=label[:300],
            description=description,
            max_activation=info.get("max_activation"),
            activation_frequency=info.get("activation_frequency"),
            top_tokens=info.get("top_tokens") or [],
            examples=info.get("examples") or [],
        )

    @property
    def steering_scale(self) -> float:
        """a_i of the additive steering formula: the strongest observed activation, 1 when unknown."""
        return self.max_activation if self.max_activation and self.max_activation > 0 else 1.0

    @property
    def is_calibrated(self) -> bool:
        """Whether its max activation is known: its coefficient is then a multiple of it."""
        return self.max_activation is not None and self.max_activation > 0

    @property
    def is_dead(self) -> bool:
        """Never active on the corpus it was measured on (unknown frequency: not dead)."""
        return self.activation_frequency == 0


class Calibration(Job):
    """A job that measures a training's features on a corpus: max activation, frequency, top tokens, examples."""

    Status = JobStatus

    training = models.ForeignKey(Training, on_delete=models.CASCADE, related_name="calibrations")
    dataset = models.ForeignKey(
        Dataset, on_delete=models.SET_NULL, null=True, blank=True, related_name="calibrations"
    )
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.PENDING)
    tokens_target = models.PositiveBigIntegerField()
    tokens_seen = models.PositiveBigIntegerField(default=0)
    progress = models.FloatField(default=0.0, help_text="0..1")

    class Meta(Job.Meta):
        constraints = [
            *progress_constraints("calibration", ["pending", "running", "completed", "failed"]),
            models.CheckConstraint(
                condition=Q(tokens_target__gte=1), name="calibration_tokens_target_positive"
            ),
        ]

    def __str__(self):
        return f"Calibration {self.pk} of training {self.training_id} ({self.status})"


class SteeringRunQuerySet(models.QuerySet):
    def visible_to(self, user) -> "SteeringRunQuerySet":
        """The runs `user` may read: every lab member reads the shared runs and their own private ones;
        staff read every run; an anonymous visitor reads none. The one access rule of pages, API and
        websocket: a run outside it answers 404, like one that does not exist."""
        if not user.is_authenticated:
            return self.none()
        return self if user.is_staff else self.filter(Q(private=False) | Q(owner=user))

    def steering_feature(self, index: int) -> "SteeringRunQuerySet":
        """The runs that steer feature `index` (of their own training).

        JSONField's `contains` is not available on SQLite; a run steers at most MAX_FEATURES features,
        so one key lookup per position covers every run on both SQLite and PostgreSQL.
        """
        matches = Q()
        for position in range(MAX_FEATURES):
            matches |= Q(**{f"features__{position}__feature_id": index})
        return self.filter(matches)


class SteeringRun(SteeringConfig, Job):
    objects = SteeringRunQuerySet.as_manager()

    Method = SteeringMethod
    Status = RunStatus

    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="steering_runs"
    )
    training = models.ForeignKey(Training, on_delete=models.PROTECT, related_name="runs")
    prompt = models.TextField()
    seed = models.BigIntegerField()
    private = models.BooleanField(
        default=False, help_text="Readable only by its owner and staff; otherwise by every lab member"
    )
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.QUEUED)
    unsteered_output = models.TextField(blank=True)
    steered_output = models.TextField(blank=True)
    metrics = models.JSONField(default=dict, blank=True)
    # Every steered variant in order: [{"multiplier", "steered_output", "metrics"}]; the first one is also
    # steered_output and metrics.
    variants = models.JSONField(default=list, blank=True)
    # The input at fault when the worker refused the run's request (the API then answers 400 naming it);
    # blank for every other ending.
    error_field = models.CharField(max_length=40, blank=True)
    timings = models.JSONField(default=dict, blank=True)
    # Liveness: the worker that claimed the run (host:pid) writes heartbeat_at every second or so while it
    # works; a running run is judged dead only by its heartbeat's age, never by how long it has run.
    worker = models.CharField(max_length=200, blank=True)
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    cancel_requested_at = models.DateTimeField(null=True, blank=True)
    # A cell of an experiment (experiments.py): its condition and prompt there; the seed is the run's own.
    experiment = models.ForeignKey(
        "Experiment", on_delete=models.CASCADE, null=True, blank=True, related_name="cells"
    )
    cell_condition = models.PositiveIntegerField(null=True, blank=True)
    cell_prompt = models.PositiveIntegerField(null=True, blank=True)
    # A turn of a conversation (models/conversations.py): its prompt is the user's message of that turn (1-based);
    # a regenerated turn has several runs with the same number, the latest one current.
    conversation = models.ForeignKey(
        "Conversation", on_delete=models.CASCADE, null=True, blank=True, related_name="runs"
    )
    turn = models.PositiveIntegerField(null=True, blank=True)

    class Meta(Job.Meta):
        indexes = [
            models.Index(fields=["owner", "-created_at"], name="run_owner_created"),
            models.Index(fields=["status", "created_at"], name="run_status_created"),
        ]
        constraints = [
            *steering_constraints("run"),
            models.CheckConstraint(
                condition=Q(status__in=["queued", "running", "completed", "failed", "cancelled"]),
                name="run_status_valid",
            ),
        ]

    def __str__(self):
        return f"Run {self.pk} ({self.status})"

    @property
    def is_finished(self) -> bool:
        return self.status in (self.Status.COMPLETED, self.Status.FAILED, self.Status.CANCELLED)

    def can_change(self, user) -> bool:
        """Only the owner or staff cancel, delete or share a run (or change it in any way); other members
        who may read it see it read-only."""
        return user.is_authenticated and (user.is_staff or user.pk == self.owner_id)

    def set_private(self, user, private: bool) -> None:
        """Keep the run to its owner and staff, or share it with the lab again (owner or staff only)."""
        self._check_can_change(user, "change who can read it")
        if (
            self.experiment_id is not None
        ):  # one prompt of a private experiment must not leak through its cell
            raise Conflict(
                f"Run {self.pk} is a cell of experiment {self.experiment_id}: who reads it follows the experiment.",
                "run_id",
            )
        if self.conversation_id is not None:  # a private conversation must not leak through one of its turns
            raise Conflict(
                f"Run {self.pk} is a turn of conversation {self.conversation_id}: who reads it follows the "
                "conversation.",
                "run_id",
            )
        # One column: a worker may be writing the run's outputs meanwhile.
        SteeringRun.objects.filter(pk=self.pk).update(private=private)
        self.private = private
        if private:
            # Members watching it live must stop reading it now, not when the run ends; after the commit, so
            # that their sockets read it as private. Robust: the change is made; a channel layer that is down
            # only delays the close to the sockets' next periodic read of the run.
            transaction.on_commit(
                lambda: streaming.publish(self.pk, streaming.ACCESS_CHANGED, {}), robust=True
            )

    def delete_by(self, user) -> None:
        """Delete a finished run (owner or staff only); a queued or running one must be stopped first."""
        self._check_can_change(user, "delete it")
        if not self.is_finished:
            raise Conflict(f"Run {self.pk} is {self.status}: stop it before deleting it.", "run_id")
        if self.conversation_id is not None:  # later turns read its replies as their history
            raise Conflict(
                f"Run {self.pk} is a turn of conversation {self.conversation_id}: delete the conversation.",
                "run_id",
            )
        self.delete()

    def _check_can_change(self, user, action: str) -> None:
        if not self.can_change(user):
            raise Forbidden(f"Only the run's owner or staff can {action}.", "run_id")


class Worker(models.Model):
    """A worker process that serves the queue, known by the heartbeat its sweep timer writes every few
    seconds, busy or idle: a queued run fails "no worker available" only when no worker has beaten lately."""

    name = models.CharField(max_length=200, unique=True, help_text="host:pid")
    started_at = models.DateTimeField(default=timezone.now)
    seen_at = models.DateTimeField(default=timezone.now)

    def __str__(self):
        return self.name


class ApiToken(models.Model):
    """A per-user bearer token for scripts; only its SHA-256 is stored, the token is shown once."""

    PREFIX = "stl_"
    LAST_USED_PRECISION = timedelta(minutes=1)

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_tokens")
    name = models.CharField(max_length=100, blank=True)
    token_hash = models.CharField(max_length=64, unique=True, editable=False)
    created_at = models.DateTimeField(default=timezone.now)
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self):
        return f"{self.user} {self.name or self.pk}"

    @staticmethod
    def hash(raw: str) -> str:
        return hashlib.sha256(raw.encode()).hexdigest()

    @classmethod
    def issue(cls, user, name: str = "") -> tuple["ApiToken", str]:
        raw = cls.PREFIX + secrets.token_urlsafe(32)
        return cls.objects.create(user=user, name=name, token_hash=cls.hash(raw)), raw

    @classmethod
    def user_for(cls, raw: str):
        token = (
            cls.objects.select_related("user")
            .filter(token_hash=cls.hash(raw), revoked_at__isnull=True)
            .first()
        )
        if token is None or not token.user.is_active:
            return None
        moment = timezone.now()
        # A write per request would serialize every scripted call on SQLite's one write lock; a minute's
        # precision is all "last used" needs.
        if token.last_used_at is None or moment - token.last_used_at >= cls.LAST_USED_PRECISION:
            cls.objects.filter(pk=token.pk).update(last_used_at=moment)
        return token.user


class AnalysisJob(Job):
    """One read of a prompt by the model that a web request awaits (analysis.py): the features the prompt lights
    up, or the residual norm at the SAE's layer. A worker answers it between two steps of its batch; the request
    deletes it once it has read the answer, so a row lives seconds."""

    class Kind(models.TextChoices):
        ACTIVE_FEATURES = "active_features"
        RESIDUAL_NORM = "residual_norm"

    class Status(models.TextChoices):
        QUEUED = "queued"
        RUNNING = "running"
        COMPLETED = "completed"
        FAILED = "failed"

    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="analysis_jobs"
    )
    training = models.ForeignKey(Training, on_delete=models.CASCADE, related_name="analysis_jobs")
    kind = models.CharField(max_length=20, choices=Kind.choices)
    prompt = models.TextField()
    chat = models.BooleanField(default=False)
    limit = models.PositiveIntegerField(default=20, help_text="How many features to list (active_features)")
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.QUEUED)
    result = models.JSONField(null=True, blank=True)
    error_field = models.CharField(
        max_length=100, blank=True, help_text="The input at fault, when there is one"
    )

    class Meta:
        indexes = [models.Index(fields=["status", "created_at"], name="analysis_status_created")]

    def __str__(self):
        return f"Analysis {self.pk} ({self.kind}, {self.status})"


from steering_app.models.conversations import Conversation  # noqa: F401
from steering_app.models.experiments import Experiment, ExperimentResult, PromptSet  # noqa: F401
from steering_app.models.vectors import VectorJob  # noqa: F401
