from datetime import timedelta

from django.utils import timezone

from steering_app import runs
from steering_app.models import SteeringRun
from tests.api.conftest import FAKE_METRICS
from tests.api.support import assert_error


def url(run):
    return f"/api/steering/runs/{run.pk}"


def test_it_shows_the_owners_run_with_settings_outputs_and_metrics(client, owner, bearer, make_run, training):
    run = make_run(owner, temperature=0.5, max_tokens=16, chat=True)

    response = client.get(url(run), headers=bearer(owner))

    assert response.status_code == 200
    body = response.json()
    assert body["id"] == run.pk and body["owner"] == "owner" and body["status"] == "completed"
    assert body["settings"] == {
        "training_id": training.pk,
        "model_id": training.model_id,
        "prompt": "Once upon a time",
        "features": [{"feature_id": 3, "coefficient": 1.0}],
        "intervention_layers": [2],
        "temperature": 0.5,
        "max_tokens": 16,
        "seed": 11,
        "method": "additive",
        "chat": True,
        "sweep": None,
    }
    assert body["unsteered_output"] == "clean" and body["steered_output"] == "steered"
    assert body["metrics"] == FAKE_METRICS
    assert body["error"] == ""


def test_its_settings_can_be_posted_back_to_generate(client, owner, bearer, make_run, fake_engine):
    headers = bearer(owner)
    settings = client.get(url(make_run(owner)), headers=headers).json()["settings"]

    response = client.post(
        "/api/steering/generate", settings, content_type="application/json", headers=headers
    )

    assert response.status_code == 200
    assert response.json()["seed"] == 11


def test_it_accepts_again_the_settings_of_a_sweep_the_panel_ran_at_its_limits(
    client, owner, bearer, training, fake_engine
):
    client.force_login(owner)
    form = {
        "training": training.pk,
        "prompt": "Rain?",
        "method": "additive",
        "temperature": "0",
        "max_tokens": "4",
        "layers": ["2"],
        "feature_id": ["3"],
        "coefficient": ["0"],
        "sweep": "10000,-10000",
    }
    assert client.post("/steering/generate/", form).status_code == 302
    settings = client.get(url(SteeringRun.objects.get()), headers=bearer(owner)).json()["settings"]

    response = client.post(
        "/api/steering/generate?async=true", settings, content_type="application/json", headers=bearer(owner)
    )

    assert response.status_code == 202, response.content


def test_it_shows_a_queued_run_without_metrics(client, owner, bearer, make_run):
    run = make_run(
        owner, status=SteeringRun.Status.QUEUED, metrics={}, unsteered_output="", steered_output=""
    )

    body = client.get(url(run), headers=bearer(owner)).json()

    assert body["status"] == "queued" and body["metrics"] is None


def test_it_shows_the_reason_of_a_failed_run(client, owner, bearer, make_run):
    run = make_run(owner, status=SteeringRun.Status.FAILED, error="no worker available", metrics={})

    body = client.get(url(run), headers=bearer(owner)).json()

    assert body["status"] == "failed" and body["error"] == "no worker available"


def test_reading_a_run_changes_nothing_and_shows_the_workers_sweep(client, owner, bearer, make_run, settings):
    settings.STEERLAB_RUN_TIMEOUT = 60
    stale = make_run(
        owner, status=SteeringRun.Status.QUEUED, created_at=timezone.now() - timedelta(seconds=61)
    )

    assert client.get(url(stale), headers=bearer(owner)).json()["status"] == "queued"
    runs.sweep_stale()  # what the worker's timer does
    body = client.get(url(stale), headers=bearer(owner)).json()

    assert body["status"] == "failed" and body["error"] == "no worker available"


def test_it_shows_a_shared_run_to_a_teammate(client, owner, teammate, bearer, make_run):
    run = make_run(owner)

    response = client.get(url(run), headers=bearer(teammate))

    assert response.status_code == 200
    assert response.json()["owner"] == "owner" and response.json()["private"] is False


def test_it_answers_404_for_another_users_private_run_as_for_an_unknown_one(
    client, owner, stranger, bearer, make_run
):
    run = make_run(owner, private=True)

    private = assert_error(client.get(url(run), headers=bearer(stranger)), 404, "run_id")
    unknown = assert_error(
        client.get(f"/api/steering/runs/{run.pk + 1}", headers=bearer(stranger)), 404, "run_id"
    )

    assert private["detail"] == f"Run {run.pk} does not exist."
    assert unknown["detail"] == f"Run {run.pk + 1} does not exist."


def test_it_shows_a_private_run_to_its_owner(client, owner, bearer, make_run):
    run = make_run(owner, private=True)

    response = client.get(url(run), headers=bearer(owner))

    assert response.status_code == 200 and response.json()["private"] is True


def test_it_shows_any_run_to_staff(client, owner, staff, bearer, make_run):
    run = make_run(owner, private=True)

    response = client.get(url(run), headers=bearer(staff))

    assert response.status_code == 200 and response.json()["owner"] == "owner"


def test_it_answers_404_for_an_unknown_run(client, owner, bearer, db):
    assert_error(client.get("/api/steering/runs/12345", headers=bearer(owner)), 404, "run_id")


def test_it_answers_anonymous_requests_with_401(client, owner, make_run):
    assert_error(client.get(url(make_run(owner))), 401)


def test_it_answers_a_revoked_token_with_401(client, owner, make_run):
    from steering_app.models import ApiToken

    token, raw = ApiToken.issue(owner)
    ApiToken.objects.filter(pk=token.pk).update(revoked_at=timezone.now())

    assert_error(client.get(url(make_run(owner)), headers={"Authorization": f"Bearer {raw}"}), 401)


def test_it_refuses_the_token_of_an_inactive_user_with_401(client, owner, bearer, make_run):
    headers = bearer(owner)
    owner.is_active = False
    owner.save()

    assert_error(client.get(url(make_run(owner)), headers=headers), 401)
