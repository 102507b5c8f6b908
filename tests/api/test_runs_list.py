from datetime import timedelta

import pytest
from django.utils import timezone

from steering_app import runs
from steering_app.models import SteeringRun
from tests.api.support import assert_error

URL = "/api/steering/runs"


def test_it_lists_only_the_callers_runs_newest_first(client, owner, teammate, bearer, make_run):
    older = make_run(owner, created_at=timezone.now() - timedelta(hours=1))
    newer = make_run(owner)
    make_run(teammate)

    body = client.get(URL, headers=bearer(owner)).json()

    assert [run["id"] for run in body["runs"]] == [newer.pk, older.pk]
    assert body["total"] == 2 and body["limit"] == 20 and body["offset"] == 0
    assert body["runs"][0]["settings"]["prompt"] == "Once upon a time"


def test_it_pages_with_limit_and_offset(client, owner, bearer, make_run):
    runs = [make_run(owner, created_at=timezone.now() - timedelta(minutes=i)) for i in range(5)]

    body = client.get(URL, {"limit": 2, "offset": 2}, headers=bearer(owner)).json()

    assert [run["id"] for run in body["runs"]] == [runs[2].pk, runs[3].pk]
    assert body["total"] == 5


def test_it_lists_everyones_runs_to_staff_who_ask_for_all(client, owner, teammate, staff, bearer, make_run):
    make_run(owner)
    make_run(teammate, private=True)
    headers = bearer(staff)

    assert client.get(URL, headers=headers).json()["total"] == 0
    assert client.get(URL, {"all": "true"}, headers=headers).json()["total"] == 2


def test_all_lists_the_labs_shared_runs_and_the_callers_own_to_members(
    client, owner, teammate, bearer, make_run
):
    mine = make_run(owner, private=True)
    shared = make_run(teammate)
    make_run(teammate, private=True)

    body = client.get(URL, {"all": "true"}, headers=bearer(owner)).json()

    assert sorted(run["id"] for run in body["runs"]) == sorted([mine.pk, shared.pk])
    assert client.get(URL, headers=bearer(owner)).json()["total"] == 1  # without all: only the caller's


def test_it_filters_by_training_and_by_steered_feature(client, owner, bearer, make_run, training):
    weather = make_run(
        owner, features=[{"feature_id": 7, "coefficient": 1.0}, {"feature_id": 3, "coefficient": -1.0}]
    )
    make_run(owner, features=[{"feature_id": 12, "coefficient": 2.0}])
    headers = bearer(owner)

    by_feature = client.get(URL, {"feature_id": 3}, headers=headers).json()
    by_training = client.get(URL, {"training_id": training.pk}, headers=headers).json()
    elsewhere = client.get(URL, {"training_id": training.pk + 1}, headers=headers).json()

    assert [run["id"] for run in by_feature["runs"]] == [weather.pk]
    assert by_training["total"] == 2 and elsewhere["total"] == 0


def test_listing_changes_nothing_and_shows_the_workers_sweep(client, owner, bearer, make_run, settings):
    settings.STEERLAB_RUN_TIMEOUT = 60
    make_run(owner, status=SteeringRun.Status.QUEUED, created_at=timezone.now() - timedelta(minutes=5))

    assert client.get(URL, headers=bearer(owner)).json()["runs"][0]["status"] == "queued"
    runs.sweep_stale()  # what the worker's timer does
    body = client.get(URL, headers=bearer(owner)).json()

    assert body["runs"][0]["status"] == "failed"


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"limit": 0}, "limit"),
        ({"offset": -5}, "offset"),
        ({"all": "maybe"}, "all"),
        ({"training_id": 0}, "training_id"),
        ({"feature_id": "x"}, "feature_id"),
    ],
)
def test_it_refuses_bad_parameters_as_400(client, owner, bearer, params, field):
    assert_error(client.get(URL, params, headers=bearer(owner)), 400, field)


def test_it_answers_anonymous_requests_with_401(client, db):
    assert_error(client.get(URL), 401)


def test_an_experiments_cells_are_listed_only_when_asked_for(client, owner, training, bearer, make_run):
    from steering_app.models import Experiment

    experiment = Experiment.objects.create(
        owner=owner,
        training=training,
        method="additive",
        intervention_layers=[2],
        conditions=[{"features": [{"feature_id": 3, "coefficient": 1.0}]}],
        strengths=[0, 1],
        prompts=["Tell me about rain"],
        seeds=[0],
        max_new_tokens=8,
        temperature=0.7,
    )
    cell = make_run(owner, experiment=experiment, cell_condition=0, cell_prompt=0, sweep=[1.0])
    single = make_run(owner)

    listed = client.get(URL, headers=bearer(owner)).json()
    cells = client.get(URL, {"experiment_id": experiment.pk}, headers=bearer(owner)).json()

    assert [run["id"] for run in listed["runs"]] == [single.pk]
    assert [run["id"] for run in cells["runs"]] == [cell.pk]
