"""/api/experiments: create, read, list, cancel, resume, delete, and export the results as CSV and JSON Lines."""

import csv
import dataclasses
import io
import json

import pytest

from steering_app import wake
from steering_app.engine.analysis.scores import harmonic_mean
from steering_app.models import Experiment, ExperimentResult, PromptSet, SteeringRun
from tests.api.support import assert_error
from tests.fake_engine import fake_scores, sweep_outcome, use_engine

URL = "/api/experiments"
# The CSV header line, the export's contract with spreadsheets and scripts (the JSONL keys, in that order).
HEADER = (
    "experiment_id,condition,features,prompt_index,prompt,seed,strength,text,score,concept,fluency,relevance,"
    "concept_sae,concept_semantic,perplexity_log_ratio,repetition,relevance_cosine,kl_divergence,"
    "perplexity_delta,run_id"
)
# A generated text a spreadsheet would run as a formula, with everything CSV must quote.
TRICKY = '=HYPERLINK("x"), then "quoted",\nand a second line'


@pytest.fixture
def body(training):
    return {
        "training_id": training.pk,
        "name": "rain against code",
        "method": "additive",
        "intervention_layers": [2],
        "conditions": [
            {"features": [{"feature_id": 3, "coefficient": 2.0}]},
            {"features": [{"feature_id": 7, "coefficient": 1.0}, {"feature_id": 12, "coefficient": -0.5}]},
        ],
        "strengths": [0, 1, 2],
        "prompts": ["Plan a picnic", "Describe the sea"],
        "seeds": 2,
        "max_tokens": 8,
        "temperature": 0.0,
    }


@pytest.fixture
def create(client, bearer):
    """create(user, body) -> the response of POST /api/experiments."""

    def post(user, body):
        return client.post(URL, json.dumps(body), content_type="application/json", headers=bearer(user))

    return post


def nothing_created() -> bool:
    return not Experiment.objects.exists() and not SteeringRun.objects.exists()


def test_it_accepts_an_experiment_and_runs_every_cell(create, owner, body, engine, training):
    response = create(owner, body)

    assert response.status_code == 202, response.content
    experiment = Experiment.objects.get()
    assert response.json() == {"id": experiment.pk}
    assert (experiment.owner, experiment.name, experiment.training) == (owner, "rain against code", training)
    assert experiment.strengths == [0.0, 1.0, 2.0] and experiment.seeds == [0, 1]
    assert experiment.prompts == ["Plan a picnic", "Describe the sea"]
    assert (experiment.max_new_tokens, experiment.temperature, experiment.private) == (8, 0.0, False)
    assert experiment.conditions[1]["features"] == [
        {"feature_id": 7, "coefficient": 1.0},
        {"feature_id": 12, "coefficient": -0.5},
    ]
    assert experiment.cells.count() == 8  # 2 conditions x 2 prompts x 2 seeds
    assert ExperimentResult.objects.filter(experiment=experiment).count() == 24  # x 3 strengths


def test_it_reads_the_prompts_of_a_prompt_set(create, owner, body, engine):
    prompt_set = PromptSet.objects.create(name="two", prompts=["Write a haiku", "Name a planet"])
    body.pop("prompts")

    response = create(owner, {**body, "prompt_set_id": prompt_set.pk})

    assert response.status_code == 202, response.content
    experiment = Experiment.objects.get()
    assert experiment.prompt_set == prompt_set and experiment.prompts == ["Write a haiku", "Name a planet"]


def test_it_shows_an_experiment_with_its_progress_and_scores(client, create, owner, bearer, body, engine):
    experiment_id = create(owner, body).json()["id"]

    response = client.get(f"{URL}/{experiment_id}", headers=bearer(owner))

    assert response.status_code == 200
    shown = response.json()
    assert shown["status"] == "completed" and shown["error"] == "" and shown["owner"] == "owner"
    assert shown["progress"]["done"] == shown["progress"]["total"] == 8
    assert shown["progress"]["tokens_per_second"] > 0 and shown["progress"]["eta_seconds"] == 0
    assert shown["prompts"] == body["prompts"] and shown["prompt_count"] == 2
    assert (shown["strengths"], shown["seeds"], shown["max_tokens"]) == ([0.0, 1.0, 2.0], [0, 1], 8)
    assert shown["finished_at"] is not None
    # 2 conditions x 3 strengths; each group has 2 prompts x 2 seeds, all scored alike by the fake engine.
    assert [(row["condition"], row["strength"], row["n"]) for row in shown["summary"]] == [
        (condition, strength, 4) for condition in (0, 1) for strength in (0.0, 1.0, 2.0)
    ]
    at_two = shown["summary"][2]
    assert at_two["concept"] == {"mean": 0.5, "low": 0.5, "high": 0.5}  # 0.1 + 0.2 x 2
    assert at_two["score"]["mean"] == pytest.approx(harmonic_mean(0.5, 0.6, 0.9))
    assert {entry["condition"] for entry in shown["best"]} == {0, 1}
    best = shown["best"][0]
    assert best["n"] == 2  # the held-out prompt, at 2 seeds
    assert best["score"]["mean"] == pytest.approx(fake_scores(best["strength"])["score"])


def test_it_lists_the_experiments_the_caller_may_read_newest_first(
    client, create, owner, teammate, stranger, bearer, body, queued_only
):
    shared = create(teammate, body).json()["id"]
    hidden = create(stranger, {**body, "private": True}).json()["id"]
    own_private = create(owner, {**body, "private": True}).json()["id"]

    response = client.get(URL, headers=bearer(owner))

    assert response.status_code == 200
    page = response.json()
    assert [item["id"] for item in page["experiments"]] == [own_private, shared]
    assert page["total"] == 2 and hidden not in [item["id"] for item in page["experiments"]]
    assert page["experiments"][1]["status"] == "queued"
    assert page["experiments"][1]["progress"] == {
        "done": 0,
        "total": 8,
        "tokens_per_second": None,
        "eta_seconds": None,
    }


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        # The service's limits, named as for a run.
        ({"strengths": [0, 100]}, "strengths"),  # 2.0 x 100 is beyond the training's coefficient limit
        ({"strengths": [0]}, "strengths"),
        ({"strengths": [1, 1.0]}, "strengths"),
        ({"prompts": []}, "prompts"),
        ({"prompts": ["Same", "Same"]}, "prompts"),
        ({"prompts": ["Plan a picnic"], "prompt_set_id": 1}, "prompts"),
        ({"conditions": []}, "conditions"),
        ({"conditions": [{"features": [{"feature_id": 31, "coefficient": 1.0}]}] * 17}, "conditions"),
        ({"conditions": [{"features": [{"feature_id": 99, "coefficient": 1.0}]}]}, "conditions"),
        ({"seeds": 0}, "seeds"),
        ({"seeds": [4, 4]}, "seeds"),
        ({"seeds": True}, "seeds"),
        ({"intervention_layers": [9]}, "intervention_layers"),
        ({"model_id": 999}, "model_id"),
        # The schema's bounds, those of a generate body.
        (
            {"conditions": [{"features": [{"feature_id": 3, "coefficient": 1e9}]}]},
            "conditions.0.features.0.coefficient",
        ),
        ({"conditions": [{"features": []}]}, "conditions.0.features"),
        ({"intervention_layers": []}, "intervention_layers"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": 2.5}, "temperature"),
        ({"method": "sideways"}, "method"),
        ({"private": "yes"}, "private"),
        ({"prompts": ["x" * 20_001]}, "prompts.0"),
        ({"name": "n" * 201}, "name"),
    ],
)
def test_it_refuses_bad_input_naming_the_field_and_creates_nothing(
    create, owner, body, engine, changes, field
):
    assert_error(create(owner, {**body, **changes}), 400, field)

    assert nothing_created()


def test_it_refuses_an_empty_prompt_set(create, owner, body, engine):
    empty = PromptSet.objects.create(name="empty", prompts=[])
    body.pop("prompts")

    body = assert_error(create(owner, {**body, "prompt_set_id": empty.pk}), 400, "prompt_set_id")

    assert "empty" in body["detail"]
    assert nothing_created()


def test_it_answers_404_for_an_unknown_training(create, owner, body, engine):
    assert_error(create(owner, {**body, "training_id": 99_999}), 404, "training_id")

    assert nothing_created()


def test_it_answers_503_when_no_worker_can_be_told(create, owner, body, monkeypatch):
    def unreachable(run_id=None):
        raise ConnectionError("redis is down")

    monkeypatch.setattr(wake, "submit", unreachable)

    assert_error(create(owner, body), 503)

    experiment = Experiment.objects.get()
    assert experiment.status == Experiment.Status.FAILED
    assert not experiment.cells.exclude(status=SteeringRun.Status.FAILED).exists()


def test_every_route_needs_a_login(client, create, owner, body, queued_only):
    experiment_id = create(owner, body).json()["id"]
    base = f"{URL}/{experiment_id}"

    for method, path in [
        ("get", URL),
        ("post", URL),
        ("get", base),
        ("delete", base),
        ("post", f"{base}/cancel"),
        ("post", f"{base}/resume"),
        ("get", f"{base}/results.csv"),
        ("get", f"{base}/results.jsonl"),
    ]:
        assert_error(getattr(client, method)(path), 401)
    assert Experiment.objects.get().status == Experiment.Status.QUEUED


def test_another_members_private_experiment_is_a_404_like_an_unknown_one(
    client, create, owner, stranger, staff, bearer, body, queued_only
):
    experiment_id = create(owner, {**body, "private": True}).json()["id"]
    base = f"{URL}/{experiment_id}"

    for method, path in [
        ("get", base),
        ("delete", base),
        ("post", f"{base}/cancel"),
        ("post", f"{base}/resume"),
        ("get", f"{base}/results.csv"),
        ("get", f"{base}/results.jsonl"),
    ]:
        assert_error(getattr(client, method)(path, headers=bearer(stranger)), 404, "experiment_id")
    assert_error(client.get(f"{URL}/{experiment_id + 1}", headers=bearer(owner)), 404, "experiment_id")
    assert client.get(base, headers=bearer(staff)).status_code == 200
    assert Experiment.objects.get().status == Experiment.Status.QUEUED


def test_a_teammate_reads_a_shared_experiment_but_cannot_cancel_resume_or_delete_it(
    client, create, owner, teammate, bearer, body, queued_only
):
    experiment_id = create(owner, body).json()["id"]
    base = f"{URL}/{experiment_id}"

    assert client.get(base, headers=bearer(teammate)).status_code == 200
    assert_error(client.post(f"{base}/cancel", headers=bearer(teammate)), 403, "experiment_id")
    assert_error(client.post(f"{base}/resume", headers=bearer(teammate)), 403, "experiment_id")
    assert_error(client.delete(base, headers=bearer(teammate)), 403, "experiment_id")

    experiment = Experiment.objects.get()
    assert experiment.status == Experiment.Status.QUEUED and experiment.cancel_requested_at is None
    assert not experiment.cells.exclude(status=SteeringRun.Status.QUEUED).exists()


def test_the_owner_cancels_resumes_and_deletes(client, create, owner, bearer, body, monkeypatch):
    submit = wake.submit
    monkeypatch.setattr(wake, "submit", lambda run_id=None: None)  # the cells stay queued
    experiment_id = create(owner, body).json()["id"]
    base, headers = f"{URL}/{experiment_id}", bearer(owner)

    assert_error(client.post(f"{base}/resume", headers=headers), 409, "experiment_id")  # still queued
    assert_error(client.delete(base, headers=headers), 409, "experiment_id")
    cancelled = client.post(f"{base}/cancel", headers=headers)
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert_error(client.post(f"{base}/cancel", headers=headers), 409, "experiment_id")

    monkeypatch.setattr(wake, "submit", submit)  # the inline worker runs the resumed cells at once
    use_engine(monkeypatch, sweep_outcome)
    resumed = client.post(f"{base}/resume", headers=headers)
    assert resumed.status_code == 202 and resumed.json() == {"id": experiment_id, "cells": 8}
    experiment = Experiment.objects.get()
    assert experiment.status == Experiment.Status.COMPLETED and experiment.results.count() == 24
    assert_error(client.post(f"{base}/resume", headers=headers), 409, "experiment_id")  # nothing missing

    assert client.delete(base, headers=headers).status_code == 204
    assert nothing_created() and not ExperimentResult.objects.exists()


def tricky_outcome(run, on_step=None, should_stop=None):
    """sweep_outcome whose clean text is TRICKY."""
    return dataclasses.replace(sweep_outcome(run, on_step, should_stop), unsteered_output=TRICKY)


def exported(client, user, bearer, experiment_id: int, extension: str):
    response = client.get(f"{URL}/{experiment_id}/results.{extension}", headers=bearer(user))
    assert response.status_code == 200, response.content
    return response


def test_the_csv_has_one_row_per_output_with_every_column(client, create, owner, bearer, body, monkeypatch):
    use_engine(monkeypatch, tricky_outcome)
    body = {
        **body,
        "strengths": [-1, 0, 2],
        "prompts": ["-5 degrees: what to wear?", "Plan a picnic"],
        "seeds": 1,
    }
    experiment_id = create(owner, body).json()["id"]

    response = exported(client, owner, bearer, experiment_id, "csv")

    assert response["Content-Type"] == "text/csv; charset=utf-8"
    assert response["Content-Disposition"] == f'attachment; filename="experiment-{experiment_id}-results.csv"'
    reader = csv.DictReader(io.StringIO(response.content.decode()))
    rows = list(reader)
    assert ",".join(reader.fieldnames) == HEADER
    assert len(rows) == 12 == ExperimentResult.objects.count()  # 2 conditions x 2 prompts x 3 strengths
    by_key = {(row["condition"], row["prompt_index"], row["strength"]): row for row in rows}
    control = by_key[("1", "0", "0.0")]
    assert control["text"] == "'" + TRICKY  # quoted intact, and kept from running as a formula
    assert control["prompt"] == "'-5 degrees: what to wear?"
    assert control["features"] == "7:1.0;12:-0.5"
    assert (
        control["kl_divergence"] == "" and control["perplexity_delta"] == ""
    )  # the control compares nothing
    steered = by_key[("0", "1", "-1.0")]  # a negative number stays a number
    assert steered["text"] == "x-1 Plan a picnic" and steered["features"] == "3:2.0"
    assert (steered["experiment_id"], steered["seed"], steered["kl_divergence"]) == (
        str(experiment_id),
        "0",
        "-1.0",
    )
    expected = fake_scores(-1.0)
    for name in ("score", "concept", "fluency", "relevance", "concept_sae", "repetition", "relevance_cosine"):
        assert float(steered[name]) == pytest.approx(expected[name]), name
    run = SteeringRun.objects.get(experiment_id=experiment_id, cell_condition=0, cell_prompt=1)
    assert steered["run_id"] == str(run.pk)
    assert '"\'=HYPERLINK(""x""), then ""quoted"",\nand a second line"' in response.content.decode()


def test_the_jsonl_holds_the_same_rows_with_values_unchanged(
    client, create, owner, bearer, body, monkeypatch
):
    use_engine(monkeypatch, tricky_outcome)
    experiment_id = create(owner, body).json()["id"]

    response = exported(client, owner, bearer, experiment_id, "jsonl")

    assert (
        response["Content-Disposition"] == f'attachment; filename="experiment-{experiment_id}-results.jsonl"'
    )
    rows = [json.loads(line) for line in response.content.decode().splitlines()]
    assert len(rows) == 24 and all(",".join(row) == HEADER for row in rows)
    control = next(row for row in rows if row["strength"] == 0 and row["condition"] == 0)
    assert control["text"] == TRICKY and control["kl_divergence"] is None
    steered = next(row for row in rows if row["strength"] == 2 and row["condition"] == 1)
    assert steered["features"] == "7:1.0;12:-0.5" and steered["kl_divergence"] == 2.0
    assert steered["score"] == pytest.approx(fake_scores(2.0)["score"])


def test_privacy_is_the_experiments_and_its_cells_follow(
    client, create, owner, teammate, bearer, body, engine
):
    experiment_id = create(owner, body).json()["id"]
    base = f"{URL}/{experiment_id}"
    cell = SteeringRun.objects.filter(experiment_id=experiment_id).first()

    assert_error(
        client.patch(base, {"private": True}, content_type="application/json", headers=bearer(teammate)),
        403,
        "experiment_id",
    )
    made_private = client.patch(
        base, {"private": True}, content_type="application/json", headers=bearer(owner)
    )

    assert made_private.status_code == 200 and made_private.json()["private"] is True
    assert not SteeringRun.objects.filter(experiment_id=experiment_id, private=False).exists()
    assert client.get(base, headers=bearer(teammate)).status_code == 404
    assert client.get(f"/api/steering/runs/{cell.pk}", headers=bearer(teammate)).status_code == 404
    shared_cell = client.patch(
        f"/api/steering/runs/{cell.pk}",
        {"private": False},
        content_type="application/json",
        headers=bearer(owner),
    )
    assert_error(shared_cell, 409, "run_id")  # a cell alone cannot leak one prompt of a private experiment
    assert SteeringRun.objects.get(pk=cell.pk).private is True
