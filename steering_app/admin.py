from pathlib import Path

from django import forms
from django.contrib import admin
from django.core.exceptions import ValidationError
from django.db.models import Count
from django.urls import reverse
from django.utils import timezone
from django.utils.html import format_html, format_html_join

from steering_app import dataset_roots, prompt_sets
from steering_app.errors import InvalidInput
from steering_app.models import (
    ApiToken,
    Calibration,
    Conversation,
    Dataset,
    Experiment,
    ExperimentResult,
    Feature,
    LanguageModel,
    PromptSet,
    SteeringRun,
    Training,
    VectorJob,
)
from steering_app.models.steering_config import STEERING_FIELDS


@admin.register(LanguageModel)
class LanguageModelAdmin(admin.ModelAdmin):
    list_display = ["name", "architecture", "num_layers", "hidden_size", "status", "created_at"]
    list_filter = ["status", "architecture"]
    search_fields = ["name", "source"]
    readonly_fields = [
        "architecture",
        "num_layers",
        "hidden_size",
        "created_at",
        "step_plan_summary",
        "step_plan",
        "step_plan_host",
        "step_plan_at",
    ]

    @admin.display(description="Step plan")
    def step_plan_summary(self, obj):
        """The worker's last recorded step plan in one line (engine/serving/plan.py StepPlan.describe())."""
        return (obj.step_plan or {}).get("summary", "not recorded yet")


class DatasetForm(forms.ModelForm):
    class Meta:
        model = Dataset
        fields = "__all__"

    def clean_source(self):
        """A source that is a file or folder on this machine is read by the jobs that name the dataset, so it
        must lie under the dataset roots. Any other source is a name, such as the hub dataset an imported SAE
        was trained on: recorded, never read (the jobs check again as they read)."""
        source = self.cleaned_data["source"]
        if Path(source).exists():
            try:
                dataset_roots.corpus_files(source)
            except InvalidInput as error:
                raise ValidationError(error.message) from None
        return source


@admin.register(Dataset)
class DatasetAdmin(admin.ModelAdmin):
    form = DatasetForm
    list_display = ["name", "source", "num_tokens"]
    search_fields = ["name", "source", "description"]


@admin.register(Training)
class TrainingAdmin(admin.ModelAdmin):
    list_display = [
        "id",
        "model",
        "dataset",
        "encoder_type",
        "hook_layer",
        "d_sae",
        "status",
        "feature_count",
        "created_at",
    ]
    list_filter = ["status", "encoder_type", "model"]
    search_fields = ["hook_name", "model__name", "dataset__name"]
    readonly_fields = [
        "stats",
        "d_in",
        "d_sae",
        "hook_name",
        "checkpoint_path",
        "created_at",
        "completed_at",
        "features_link",
        "vector_jobs_link",
    ]

    # What a completed training's checkpoint was trained on: changing one would describe another SAE than the
    # weights on disk (a layer 12 whose hook still reads blocks.10).
    FIXED_ONCE_COMPLETED = ["model", "hook_layer", "encoder_type"]

    def get_readonly_fields(self, request, obj=None):
        fields = list(super().get_readonly_fields(request, obj))
        if obj is not None and obj.status == Training.Status.COMPLETED:
            fields += self.FIXED_ONCE_COMPLETED
        return fields

    def get_queryset(self, request):
        return (
            super()
            .get_queryset(request)
            .select_related("model", "dataset")
            .annotate(_feature_count=Count("features"))
        )

    @admin.display(description="features", ordering="_feature_count")
    def feature_count(self, training):
        return training._feature_count

    @admin.display(description="features")
    def features_link(self, training):
        url = reverse("admin:steering_app_feature_changelist") + f"?training__id__exact={training.pk}"
        return format_html('<a href="{}">{} features</a>', url, training.features.count())

    @admin.display(description="vector jobs")
    def vector_jobs_link(self, training):
        """A vector space's concepts are made by jobs: how each went (none for an SAE)."""
        url = reverse("admin:steering_app_vectorjob_changelist") + f"?training__id__exact={training.pk}"
        return format_html('<a href="{}">{} vector jobs</a>', url, training.vector_jobs.count())


class FinishedRecordAdmin(admin.ModelAdmin):
    """A record of what was asked and what came out (a run, an experiment, a vector job): staff read it and delete it once
    it has ended, never add or edit one (with no change permission every field is read-only and a POST to the
    change page is refused)."""

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        # A queued or running one is still being written by workers: stop it first (as the API says). Admin's
        # "delete selected" asks this of every object it would delete, so it refuses those too.
        return super().has_delete_permission(request, obj) and (obj is None or obj.is_finished)


@admin.register(VectorJob)
class VectorJobAdmin(FinishedRecordAdmin):
    """Vector jobs are made by the API, the panel and `manage.py make_vector`; admin shows their progress and
    separation report, read-only (the job's worker writes the row)."""

    list_display = ["id", "name", "training", "method", "tokens", "status", "progress_percent", "created_at"]
    list_filter = ["status", "method", "training"]
    search_fields = ["name", "description", "error"]
    list_select_related = ["training__model", "training__dataset", "owner"]
    exclude = ["positives", "negatives"]
    readonly_fields = ["examples_count", "best_layer"]

    @admin.display(description="progress", ordering="progress")
    def progress_percent(self, job):
        return f"{job.progress:.0%}"

    @admin.display(description="examples")
    def examples_count(self, job):
        kind = "pairs" if job.paired else "examples"
        return f"{len(job.positives)} positive, {len(job.negatives)} negative {kind}"

    @admin.display(description="best layer (held-out accuracy)")
    def best_layer(self, job):
        report = job.report or {}
        if report.get("best_layer") is None:
            return "-"
        return f"{report['best_layer']} ({report.get('accuracy')})"


@admin.register(Feature)
class FeatureAdmin(admin.ModelAdmin):
    list_display = ["index", "label", "training", "max_activation", "activation_frequency"]
    list_filter = ["training"]
    search_fields = ["label", "description", "=index"]
    readonly_fields = [
        "training",
        "index",
        "max_activation",
        "activation_frequency",
        "top_tokens",
        "examples",
    ]
    list_select_related = ["training__model", "training__dataset"]


@admin.register(Calibration)
class CalibrationAdmin(admin.ModelAdmin):
    """Calibrations are made by `manage.py calibrate_features`; admin shows how they went."""

    list_display = [
        "id",
        "training",
        "dataset",
        "status",
        "tokens_seen",
        "tokens_target",
        "progress",
        "created_at",
        "finished_at",
    ]
    list_filter = ["status", "training"]
    search_fields = ["training__model__name", "dataset__name", "error"]
    readonly_fields = [
        "training",
        "dataset",
        "status",
        "tokens_target",
        "tokens_seen",
        "progress",
        "error",
        "created_at",
        "started_at",
        "finished_at",
    ]
    list_select_related = ["training__model", "training__dataset", "dataset"]

    def has_add_permission(self, request):
        return False


@admin.register(SteeringRun)
class SteeringRunAdmin(FinishedRecordAdmin):
    list_display = ["id", "owner", "training", "method", "private", "status", "created_at", "finished_at"]
    list_filter = ["status", "method", "private", "training"]
    search_fields = ["prompt", "owner__username"]
    list_select_related = ["owner", "training__model", "training__dataset"]
    # The stored JSON, shown as tables in its place.
    TABLES = {"metrics": "metrics_table", "variants": "variants_table"}
    readonly_fields = ["run_page", *TABLES.values()]

    def get_fieldsets(self, request, obj=None):
        # Every field, as Django lists them, with the steering fields (those a preset saves) in their own section.
        fields = [name for name in self.get_fields(request, obj) if name not in self.readonly_fields]
        others = [
            "run_page",
            *(self.TABLES.get(name, name) for name in fields if name not in STEERING_FIELDS),
        ]
        return [(None, {"fields": others}), ("Steering", {"fields": STEERING_FIELDS})]

    @admin.display(description="page")
    def run_page(self, run):
        url = reverse("steering-run", args=[run.pk])
        return format_html('<a href="{}">Run #{} as members see it</a>', url, run.pk)

    @admin.display(description="metrics")
    def metrics_table(self, run):
        return metric_table(run.metrics)

    @admin.display(description="variants")
    def variants_table(self, run):
        """One row per steered variant: its multiplier, tokens, scalar metrics, score and text."""
        variants = run.variants or []
        if not variants:
            return "-"
        names = sorted(
            {name for v in variants for name, value in (v.get("metrics") or {}).items() if scalar(value)}
        )
        head = ["multiplier", "tokens", *names, "score", "text"]
        return html_table("run-variants", head, [variant_row(variant, names) for variant in variants])


def variant_row(variant: dict, names: list[str]) -> list[str]:
    metrics = variant.get("metrics") or {}
    return [
        shown(variant.get("multiplier")),
        shown(variant.get("tokens")),
        *(shown(metrics.get(name)) for name in names),
        shown((variant.get("scores") or {}).get("score")),
        variant.get("steered_output", ""),
    ]


def html_table(css_class: str, head: list[str], rows: list[list[str]]):
    """A table of escaped cells under a row of headings."""
    headings = format_html_join("", "<th>{}</th>", ((name,) for name in head))
    body = format_html_join(
        "", "<tr>{}</tr>", ((format_html_join("", "<td>{}</td>", ((cell,) for cell in row)),) for row in rows)
    )
    return format_html('<table class="{}"><tr>{}</tr>{}</table>', css_class, headings, body)


def scalar(value) -> bool:
    return value is None or isinstance(value, (int, float, str))


def shown(value) -> str:
    """A metric's value in a cell: numbers to 4 significant digits, nested values as `key: value` pairs."""
    if isinstance(value, bool) or value is None:
        return "-" if value is None else str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):  # sorted: PostgreSQL's jsonb does not keep the stored key order
        return ", ".join(f"{key}: {shown(value[key])}" for key in sorted(value))
    if isinstance(value, list):
        return "; ".join(shown(item) for item in value)
    return str(value)


def metric_table(metrics: dict):
    if not metrics:
        return "-"
    rows = format_html_join(
        "", "<tr><th>{}</th><td>{}</td></tr>", ((name, shown(v)) for name, v in metrics.items())
    )
    return format_html('<table class="run-metrics">{}</table>', rows)


@admin.register(Experiment)
class ExperimentAdmin(FinishedRecordAdmin):
    """Like runs: a record of what was asked and what came out. Staff read and delete experiments, never add or
    edit one (members create them; the service validates them whole)."""

    list_display = ["id", "name", "owner", "training", "status", "outputs", "private", "created_at"]
    list_filter = ["status", "private", "training"]
    search_fields = ["name", "owner__username"]
    list_select_related = ["owner", "training__model", "training__dataset"]
    readonly_fields = ["results_link"]

    def get_queryset(self, request):
        return super().get_queryset(request).annotate(_outputs=Count("results"))

    @admin.display(description="outputs", ordering="_outputs")
    def outputs(self, experiment):
        return f"{experiment._outputs} / {experiment.total_outputs}"

    @admin.display(description="results")
    def results_link(self, experiment):
        url = (
            reverse("admin:steering_app_experimentresult_changelist")
            + f"?experiment__id__exact={experiment.pk}"
        )
        return format_html('<a href="{}">{} outputs</a>', url, experiment.results.count())

    def get_deleted_objects(self, objs, request):
        # Its results go with it, though admin deletes none of them one by one (ExperimentResultAdmin).
        deleted, counts, perms_needed, protected = super().get_deleted_objects(objs, request)
        perms_needed.discard(ExperimentResult._meta.verbose_name)
        return deleted, counts, perms_needed, protected


class TurnInline(admin.TabularInline):
    """A conversation's turns, each run in order (a regenerated turn shows all its runs, the latest current)."""

    model = SteeringRun
    fields = ["turn", "run_link", "status", "prompt", "unsteered_output", "steered_output", "seed"]
    readonly_fields = fields
    ordering = ["turn", "id"]
    extra = 0
    can_delete = False
    show_change_link = False

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    @admin.display(description="run")
    def run_link(self, run):
        return format_html('<a href="{}">#{}</a>', reverse("steering-run", args=[run.pk]), run.pk)


@admin.register(Conversation)
class ConversationAdmin(FinishedRecordAdmin):
    """Like runs: staff read conversations and delete them with their turns, never add or edit one."""

    list_display = ["id", "owner", "training", "history_mode", "private", "created_at", "updated_at"]
    list_filter = ["history_mode", "private", "training"]
    search_fields = ["system_prompt", "owner__username"]
    list_select_related = ["owner", "training__model", "training__dataset"]
    readonly_fields = ["conversation_page"]
    inlines = [TurnInline]

    def has_delete_permission(self, request, obj=None):
        # A turn in progress is still being written by a worker: stop it first (as the API says).
        allowed = admin.ModelAdmin.has_delete_permission(self, request, obj)
        return allowed and (obj is None or obj.turn_in_progress() is None)

    @admin.display(description="page")
    def conversation_page(self, conversation):
        url = reverse("steering-conversation", args=[conversation.pk])
        return format_html('<a href="{}">Conversation #{} as members see it</a>', url, conversation.pk)

    def get_deleted_objects(self, objs, request):
        # Its turns go with it, whatever the staff member may do to runs one by one.
        deleted, counts, perms_needed, protected = super().get_deleted_objects(objs, request)
        perms_needed.discard(SteeringRun._meta.verbose_name)
        return deleted, counts, perms_needed, protected


@admin.register(ExperimentResult)
class ExperimentResultAdmin(admin.ModelAdmin):
    """Read only, and not deleted one by one: a cell's outputs are stored together, and a cell missing some
    would never be run again by a resume."""

    list_display = [
        "experiment",
        "condition",
        "prompt_index",
        "seed",
        "strength",
        "score",
        "concept",
        "fluency",
    ]
    list_filter = ["experiment"]
    search_fields = ["text"]
    list_select_related = ["experiment"]

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


class PromptSetForm(forms.ModelForm):
    class Meta:
        model = PromptSet
        fields = "__all__"

    def clean_prompts(self):
        try:
            return prompt_sets.checked_prompts(self.cleaned_data["prompts"])
        except InvalidInput as error:
            raise ValidationError(error.message) from None


@admin.register(PromptSet)
class PromptSetAdmin(admin.ModelAdmin):
    """Editing a set changes no experiment: each keeps a copy of the prompts it ran."""

    form = PromptSetForm
    list_display = ["name", "owner", "prompt_count", "created_at"]
    search_fields = ["name", "description"]
    readonly_fields = ["created_at"]
    list_select_related = ["owner"]

    @admin.display(description="prompts")
    def prompt_count(self, prompt_set):
        return len(prompt_set.prompts)


@admin.register(ApiToken)
class ApiTokenAdmin(admin.ModelAdmin):
    list_display = ["user", "name", "created_at", "last_used_at", "revoked_at"]
    list_filter = ["revoked_at"]
    search_fields = ["user__username", "name"]
    readonly_fields = ["token_hash", "created_at", "last_used_at"]
    actions = ["revoke"]

    @admin.action(description="Revoke selected tokens")
    def revoke(self, request, queryset):
        count = queryset.filter(revoked_at__isnull=True).update(revoked_at=timezone.now())
        self.message_user(request, f"Revoked {count} token(s).")
