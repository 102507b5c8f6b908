"""An experiment's cells as they end: store each output once, keep the experiment's status true, tell watchers.

runs.py calls record() in the transaction that stores a cell run's completion, and cell_ended() after any cell
ends; the experiment's pages and API call refresh() before they read it. Nothing here starts work: that is
experiments.py (create, cancel, resume), which depends on runs.py; this module depends on neither.
"""

import logging
from collections.abc import Iterable

from django.db.models import Count, Min, Sum
from django.utils import timezone

from steering_app import streaming
from steering_app.models import Experiment, ExperimentResult, SteeringRun

logger = logging.getLogger(__name__)

Status = Experiment.Status
ACTIVE = (Status.QUEUED, Status.RUNNING)
# The scores an ExperimentResult keeps in columns of their own (to sort and average in the database).
SCORE_COLUMNS = ("score", "concept", "fluency", "relevance")


def record(run: SteeringRun, control: dict, variants: list[dict]) -> int:
    """Store a completed cell's outputs: strength 0 is the run's clean row (`control`), every other strength its
    variant ({multiplier, steered_output, scores, metrics, tokens}). A cell already stored (a run duplicated by
    a race) stores nothing; returns how many rows were written."""
    experiment = Experiment.objects.get(pk=run.experiment_id)
    cell = {"condition": run.cell_condition, "prompt_index": run.cell_prompt, "seed": run.seed}
    if ExperimentResult.objects.filter(experiment=experiment, **cell).exists():
        return 0
    by_strength = {variant["multiplier"]: variant for variant in variants}
    rows = []
    for strength in experiment.strengths:
        output = control if strength == 0 else by_strength[strength]
        scores = output["scores"]
        rows.append(
            ExperimentResult(
                experiment=experiment,
                run=run,
                strength=strength,
                text=output["steered_output"],
                **{name: scores[name] for name in SCORE_COLUMNS},
                scores=scores,
                metrics=output["metrics"],
                tokens=output["tokens"],
                **cell,
            )
        )
    ExperimentResult.objects.bulk_create(rows)
    return len(rows)


def cell_started(experiment_id: int) -> None:
    """A worker claimed one of its cells: a queued experiment is running from now on (one UPDATE, the rest
    of its life is decided by refresh())."""
    Experiment.objects.filter(pk=experiment_id, status=Status.QUEUED).update(
        status=Status.RUNNING, started_at=timezone.now()
    )


def cell_ended(experiment_id: int) -> None:
    """After a cell ended, however: bring the experiment's status up to date and send its progress."""
    experiment = Experiment.objects.filter(pk=experiment_id).first()
    if experiment is None:  # deleted meanwhile
        return
    refresh(experiment)
    streaming.publish_experiment(experiment_id, {"status": experiment.status, **progress(experiment)})


def refresh(experiment: Experiment) -> Experiment:
    """Its status as its cells say: running while a cell is in progress, then completed when every output is
    stored, cancelled when a cancel stopped it, failed (with the first cell's reason) otherwise. Stored only
    when it changed; a failed cell's worker may have been killed, so the reads decide, not the worker."""
    cells = SteeringRun.objects.filter(experiment=experiment)
    counts = dict(cells.values_list("status").annotate(count=Count("id")).values_list("status", "count"))
    active = sum(counts.get(status, 0) for status in ACTIVE)
    changes: dict = {}
    if active:
        started = counts.get(Status.RUNNING, 0) or experiment.results.exists()
        status = Status.RUNNING if started else Status.QUEUED
        if status == Status.RUNNING and experiment.started_at is None:
            changes["started_at"] = cells.aggregate(first=Min("started_at"))["first"] or timezone.now()
    elif experiment.results.count() == experiment.total_outputs:
        status = Status.COMPLETED
    elif experiment.cancel_requested_at is not None:
        status = Status.CANCELLED
    else:
        status = Status.FAILED
        changes["error"] = _failure(cells, experiment)
    if status != experiment.status:
        changes["status"] = status
        changes["finished_at"] = None if status in ACTIVE else timezone.now()
    if changes:
        Experiment.objects.filter(pk=experiment.pk).update(**changes)
        for name, value in changes.items():
            setattr(experiment, name, value)
    return experiment


def _failure(cells, experiment: Experiment) -> str:
    unfinished = cells.exclude(status=SteeringRun.Status.COMPLETED).exclude(error="")
    first = unfinished.order_by("finished_at").values_list("error", flat=True).first() or "unknown"
    missing = experiment.total_cells - done_cells(experiment)
    return f"{missing} of {experiment.total_cells} cells did not complete (first reason: {first}); Resume runs them."


def done_cells(experiment: Experiment) -> int:
    """Cells whose outputs are stored (each stores len(strengths) rows at once)."""
    return experiment.results.count() // max(1, len(experiment.strengths))


def progress(experiment: Experiment) -> dict:
    """{done, total} cells, with the generation rate (tokens per second since the experiment last started:
    a resume starts the clock again) and an estimate of the seconds left; None until a cell is done since."""
    done, total = done_cells(experiment), experiment.total_cells
    rate = eta = None
    if experiment.started_at is not None:
        recent = experiment.results.filter(run__started_at__gte=experiment.started_at)
        tokens = recent.aggregate(tokens=Sum("tokens"))["tokens"] or 0
        cells = recent.values("run_id").distinct().count()
        if cells:
            end = experiment.finished_at or timezone.now()
            elapsed = max((end - experiment.started_at).total_seconds(), 1e-3)
            rate = tokens / elapsed
            eta = 0.0 if done >= total else elapsed / cells * (total - done)
    return {"done": done, "total": total, "tokens_per_second": rate, "eta_seconds": eta}


def stored_cells(experiment: Experiment) -> set[tuple[int, int, int]]:
    """(condition, prompt_index, seed) of every cell whose outputs are stored."""
    return set(experiment.results.values_list("condition", "prompt_index", "seed").distinct())


def all_cells(experiment: Experiment) -> Iterable[tuple[int, int, int]]:
    """Every cell in the order they run: prompt by prompt, so early results cover every condition."""
    for prompt_index in range(len(experiment.prompts)):
        for seed in experiment.seeds:
            for condition in range(len(experiment.conditions)):
                yield condition, prompt_index, seed
