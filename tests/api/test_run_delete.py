"""DELETE /api/steering/runs/{id}: the owner or staff delete a finished run; no one else can."""

import pytest

from steering_app.models import SteeringRun
from tests.api.support import assert_error


def url(run):
    return f"/api/steering/runs/{run.pk}"


@pytest.mark.parametrize("deleter", ["owner", "staff"])
def test_it_deletes_a_finished_run_for_its_owner_or_staff(request, client, owner, bearer, make_run, deleter):
    run = make_run(owner, private=True)

    response = client.delete(url(run), headers=bearer(request.getfixturevalue(deleter)))

    assert response.status_code == 204
    assert not SteeringRun.objects.filter(pk=run.pk).exists()


def test_it_answers_403_to_a_teammate_who_reads_the_shared_run_and_keeps_it(
    client, owner, teammate, bearer, make_run
):
    run = make_run(owner)

    assert_error(client.delete(url(run), headers=bearer(teammate)), 403, "run_id")

    assert SteeringRun.objects.filter(pk=run.pk).exists()


def test_it_answers_404_for_another_users_private_run_and_keeps_it(client, owner, stranger, bearer, make_run):
    run = make_run(owner, private=True)

    assert_error(client.delete(url(run), headers=bearer(stranger)), 404, "run_id")

    assert SteeringRun.objects.filter(pk=run.pk).exists()


@pytest.mark.parametrize("status", ["queued", "running"])
def test_it_answers_409_for_a_run_that_has_not_ended(client, owner, bearer, make_run, status):
    run = make_run(owner, status=status, finished_at=None, metrics={})

    body = assert_error(client.delete(url(run), headers=bearer(owner)), 409, "run_id")

    assert "stop it" in body["detail"]
    assert SteeringRun.objects.filter(pk=run.pk).exists()


def test_it_answers_404_for_an_unknown_run(client, owner, bearer, db):
    assert_error(client.delete("/api/steering/runs/4242", headers=bearer(owner)), 404, "run_id")


def test_it_answers_anonymous_requests_with_401(client, owner, make_run):
    run = make_run(owner)

    assert_error(client.delete(url(run)), 401)

    assert SteeringRun.objects.filter(pk=run.pk).exists()
