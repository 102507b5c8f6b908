"""Experiments' life with a stand-in engine: cells as runs, outputs stored once, cancel, resume, fair share."""

import pytest

from steering_app import experiment_results, experiments, runs, services
from steering_app.errors import Conflict, InvalidInput
from steering_app.experiments import ExperimentRequest
from steering_app.models import Experiment, ExperimentResult, PromptSet, SteeringRun
from tests.fake_engine import sweep_outcome, use_engine
from tests.steering.test_runs import request_for

pytestmark = pytest.mark.django_db

Status = SteeringRun.Status


def experiment_request(training, **changes) -> ExperimentRequest:
    values = {
        "training_id": training.pk,
        "conditions": [{"features": [{"feature_id": 3, "coefficient": 2.0}]}],
        "intervention_layers": [2],
        "strengths": [0, 1, 2],
        "prompts": ["Plan a picnic", "Describe the sea", "Write a haiku"],
        "seeds": 1,
        "max_tokens": 16,
    }
    values.update(changes)
    return ExperimentRequest(**values)


def after_the_first_cell(action):
    """runs.process_queued's emit_for: `action()` once the first cell has completed, before the worker (one
    cell at a time with the fake engine) claims the next."""
    done = []

    def emit_for(run_id):
        def emit(event, payload):
            if event == "completed" and not done:
                done.append(run_id)
                action()

        return emit

    return emit_for


def test_an_experiment_runs_every_cell_once_and_stores_every_output(owner, training, engine):
    experiment = experiments.create(owner, experiment_request(training, seeds=2))

    experiment.refresh_from_db()
    assert experiment.status == Experiment.Status.COMPLETED
    cells = SteeringRun.objects.filter(experiment=experiment)
    assert cells.count() == 6 and set(cells.values_list("status", flat=True)) == {Status.COMPLETED}
    assert all(cell.sweep == [1.0, 2.0] for cell in cells)  # strength 0 is each cell's clean row
    results = ExperimentResult.objects.filter(experiment=experiment)
    assert results.count() == 18  # 3 prompts x 2 seeds x 3 strengths
    control = results.get(prompt_index=1, seed=1, strength=0)
    assert control.text == "clean Describe the sea seed 1"  # strength 0 is the clean row
    assert results.get(prompt_index=1, seed=1, strength=2).text == "x2 Describe the sea"
    assert control.run.experiment_id == experiment.pk
    assert experiment_results.progress(experiment)["done"] == 6


def test_the_report_has_a_summary_per_strength_and_a_held_out_best(owner, training, engine):
    experiment = experiments.create(owner, experiment_request(training))

    report = experiments.report(experiment)

    assert report["status"] == "completed" and report["progress"]["done"] == report["progress"]["total"] == 3
    assert [(row["condition"], row["strength"], row["n"]) for row in report["summary"]] == [
        (0, 0.0, 3),
        (0, 1.0, 3),
        (0, 2.0, 3),
    ]
    assert set(report["summary"][0]["score"]) == {"mean", "low", "high"}
    (best,) = report["best"]
    assert best["condition"] == 0 and best["strength"] in (0.0, 1.0, 2.0)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"conditions": []}, "conditions"),
        ({"conditions": [{"features": [{"feature_id": 99, "coefficient": 1.0}]}]}, "conditions"),
        ({"conditions": [{"features": [{"feature_id": 3, "coefficient": 60.0}]}]}, "strengths"),
        ({"strengths": [0]}, "strengths"),
        ({"strengths": [1, 1.0]}, "strengths"),
        ({"strengths": [float("nan")]}, "strengths"),
        ({"prompts": []}, "prompts"),
        ({"prompts": ["same", "same"]}, "prompts"),
        ({"prompts": ["ok", "  "]}, "prompts"),
        ({"prompt_set_id": 12345, "prompts": None}, "prompt_set_id"),
        ({"seeds": 0}, "seeds"),
        ({"seeds": [1, 1]}, "seeds"),
        ({"intervention_layers": [9]}, "intervention_layers"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"model_id": 999}, "model_id"),
    ],
)
def test_bad_input_names_the_field_and_creates_nothing(owner, training, engine, changes, field):
    with pytest.raises(InvalidInput) as raised:
        experiments.create(owner, experiment_request(training, **changes))

    assert raised.value.field == field
    assert not Experiment.objects.exists() and not SteeringRun.objects.exists()


def test_an_experiment_over_the_output_limit_is_refused(owner, training, engine, settings):
    settings.STEERLAB_MAX_EXPERIMENT_OUTPUTS = 8

    with pytest.raises(InvalidInput, match="9 outputs") as raised:
        experiments.create(owner, experiment_request(training))

    assert raised.value.field == "prompts" and not Experiment.objects.exists()


def test_a_prompt_set_gives_the_prompts(owner, training, engine):
    prompt_set = PromptSet.objects.create(name="two", prompts=["Plan a picnic", "Write a haiku"])

    experiment = experiments.create(
        owner, experiment_request(training, prompts=None, prompt_set_id=prompt_set.pk)
    )

    assert experiment.prompts == ["Plan a picnic", "Write a haiku"] and experiment.prompt_set == prompt_set
    assert ExperimentResult.objects.filter(experiment=experiment).count() == 6


def test_interactive_runs_go_before_queued_cells_and_cells_do_not_count_toward_the_queue_cap(
    owner, training, queued_only, settings
):
    settings.STEERLAB_MAX_QUEUED_PER_MEMBER = 1
    experiments.create(owner, experiment_request(training))
    run = runs.create(owner, request_for(training))  # 3 queued cells do not fill a cap of 1

    assert runs.next_in_turn() == run
    runs.claim()
    assert runs.next_in_turn().experiment_id is not None


def test_cancel_stops_queued_cells_and_keeps_the_finished_ones(owner, training, queued_only, monkeypatch):
    use_engine(monkeypatch, sweep_outcome)
    experiment = experiments.create(owner, experiment_request(training))

    runs.process_queued(after_the_first_cell(lambda: experiments.cancel(experiment, owner)))

    assert experiment.status == Experiment.Status.CANCELLED
    statuses = list(experiment.cells.order_by("id").values_list("status", flat=True))
    assert statuses == [Status.COMPLETED, Status.CANCELLED, Status.CANCELLED]
    assert experiment.results.count() == 3 and runs.claim() is None  # no cell starts after it


def test_resume_runs_only_the_missing_cells(owner, training, queued_only, monkeypatch):
    use_engine(monkeypatch, sweep_outcome)
    experiment = experiments.create(owner, experiment_request(training))

    def die_and_cancel():
        runs.fail(runs.claim().pk, runs.WORKER_GONE)  # a worker died in the middle of the second cell
        experiments.cancel(experiment, owner)

    runs.process_queued(after_the_first_cell(die_and_cancel))
    assert experiment.status == Experiment.Status.CANCELLED

    assert experiments.resume(experiment, owner) == 2
    runs.process_queued()

    experiment_results.refresh(experiment)
    assert experiment.status == Experiment.Status.COMPLETED
    stored = list(experiment.results.values_list("condition", "prompt_index", "seed", "strength"))
    assert len(stored) == len(set(stored)) == 9
    with pytest.raises(Conflict, match="nothing to resume"):
        experiments.resume(experiment, owner)


def test_a_failed_cell_fails_the_experiment_with_its_reason(owner, training, queued_only, monkeypatch):
    use_engine(monkeypatch, sweep_outcome)
    experiment = experiments.create(owner, experiment_request(training))
    runs.fail(runs.claim().pk, runs.WORKER_GONE)
    runs.process_queued()

    experiment_results.refresh(experiment)

    assert experiment.status == Experiment.Status.FAILED
    assert experiment.error.startswith("1 of 3 cells did not complete (first reason: the worker stopped")


def test_only_the_owner_or_staff_cancel_resume_or_delete(owner, teammate, staff, training, queued_only):
    experiment = experiments.create(owner, experiment_request(training))

    for action in (experiments.cancel, experiments.resume):
        with pytest.raises(Exception, match="owner or staff"):
            action(experiment, teammate)
    with pytest.raises(Conflict, match="cancel it before deleting"):
        experiment.delete_by(staff)
    experiments.cancel(experiment, staff)
    experiment.delete_by(owner)
    assert not Experiment.objects.exists() and not SteeringRun.objects.exists()


def test_its_status_follows_its_cells_without_a_read(owner, training, queued_only, monkeypatch):
    """A claim makes it running; a sweep that fails its last cells ends it, so the admin and watchers see
    the truth without anyone refreshing it."""
    use_engine(monkeypatch, sweep_outcome)
    experiment = experiments.create(owner, experiment_request(training))
    stored = Experiment.objects.filter(pk=experiment.pk)
    assert stored.get().status == Experiment.Status.QUEUED

    cell = runs.claim()
    assert stored.get().status == Experiment.Status.RUNNING and stored.get().started_at is not None

    runs.fail(cell.pk, runs.WORKER_GONE)
    for queued in experiment.cells.filter(status=Status.QUEUED):
        runs.fail(queued.pk, runs.NO_WORKER)
    ended = stored.get()
    assert ended.status == Experiment.Status.FAILED and ended.finished_at is not None
    assert "3 of 3 cells did not complete" in ended.error


class RowBatch:
    """services.EngineBatch's protocol with rows: runs join while rows are free and end after `steps` steps;
    every admit and step is logged with the batch's kind, to see which batch a worker advances."""

    def __init__(self, kind: str, log: list, rows: int = 8, steps: int = 3, on_first_step=None):
        self.kind, self.log, self.rows, self.steps = kind, log, rows, steps
        self.on_first_step = on_first_step
        self.runs: dict[int, list] = {}

    @property
    def active(self) -> bool:
        return bool(self.runs)

    def accepts(self, run) -> bool:
        used = sum(1 + len(services.multipliers(item)) for item, _left in self.runs.values())
        return used + 1 + len(services.multipliers(run)) <= self.rows

    def admit(self, run, on_step, should_stop) -> bool:
        self.runs[run.pk] = [run, self.steps]
        self.log.append(("admit", self.kind, run.pk))
        return True

    def step(self):
        self.log.append(("step", self.kind))
        if self.on_first_step is not None:
            self.on_first_step()
            self.on_first_step = None
        ended = []
        for pk, entry in list(self.runs.items()):
            entry[1] -= 1
            if entry[1] == 0:
                del self.runs[pk]
                ended.append((entry[0], sweep_outcome(entry[0])))
        return ended

    def abandon(self):
        abandoned, self.runs = [entry[0] for entry in self.runs.values()], {}
        return abandoned


def test_a_comparison_during_an_experiment_is_stepped_alone_and_no_cell_joins_meanwhile(
    owner, teammate, training, queued_only, monkeypatch
):
    log: list = []
    submitted = []

    def a_member_submits_a_comparison():
        submitted.append(runs.create(teammate, request_for(training)))

    batches = {
        "cells": RowBatch("cells", log, on_first_step=a_member_submits_a_comparison),
        "interactive": RowBatch("interactive", log),
    }
    monkeypatch.setattr(
        services, "batch_for", lambda run: batches["cells" if run.experiment_id else "interactive"]
    )
    experiment = experiments.create(
        owner, experiment_request(training, prompts=[f"Prompt {i}" for i in range(4)])
    )

    runs.process_queued()

    (comparison,) = submitted
    start = log.index(("admit", "interactive", comparison.pk))
    own_steps = log[start + 1 : start + 1 + 3]
    assert own_steps == [("step", "interactive")] * 3  # its 3 steps, nothing of the cells' in between
    assert log[:start].count(("step", "cells")) == 1  # it went at the first step boundary after it came
    assert [entry[1] for entry in log[:start] if entry[0] == "admit"] == [
        "cells",
        "cells",
    ]  # 2 cells of 3 rows
    experiment_results.refresh(experiment)
    assert experiment.status == Experiment.Status.COMPLETED and experiment.results.count() == 12
    comparison.refresh_from_db()
    assert comparison.status == Status.COMPLETED
