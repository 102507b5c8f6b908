"""PATCH /api/steering/runs/{id}: who can read a run (private or shared with the lab); owner or staff only."""

import pytest

from steering_app.models import SteeringRun
from tests.api.support import assert_error


def url(run):
    return f"/api/steering/runs/{run.pk}"


def patch(client, run, body, headers):
    return client.patch(url(run), body, content_type="application/json", headers=headers)


@pytest.mark.parametrize("changer", ["owner", "staff"])
def test_it_makes_a_run_private_and_shares_it_again_for_its_owner_or_staff(
    request, client, owner, teammate, bearer, make_run, changer
):
    run = make_run(owner)
    headers = bearer(request.getfixturevalue(changer))

    response = patch(client, run, {"private": True}, headers)

    assert response.status_code == 200 and response.json()["private"] is True
    assert SteeringRun.objects.get(pk=run.pk).private is True
    assert client.get(url(run), headers=bearer(teammate)).status_code == 404

    assert patch(client, run, {"private": False}, headers).json()["private"] is False
    assert client.get(url(run), headers=bearer(teammate)).status_code == 200


def test_it_answers_403_to_a_teammate_who_reads_the_shared_run_and_changes_nothing(
    client, owner, teammate, bearer, make_run
):
    run = make_run(owner)

    body = assert_error(patch(client, run, {"private": True}, bearer(teammate)), 403, "run_id")

    assert "owner or staff" in body["detail"]
    assert SteeringRun.objects.get(pk=run.pk).private is False


def test_it_answers_404_for_another_users_private_run_and_changes_nothing(
    client, owner, stranger, bearer, make_run
):
    run = make_run(owner, private=True)

    assert_error(patch(client, run, {"private": False}, bearer(stranger)), 404, "run_id")

    assert SteeringRun.objects.get(pk=run.pk).private is True


def test_it_changes_only_who_can_read_it(client, owner, bearer, make_run):
    run = make_run(owner)

    response = patch(client, run, {"private": True, "prompt": "changed", "seed": 1}, bearer(owner))

    assert response.status_code == 200
    run.refresh_from_db()
    assert (run.private, run.prompt, run.seed) == (True, "Once upon a time", 11)


@pytest.mark.parametrize("body", [{}, {"private": 1}, {"private": "true"}, {"private": None}])
def test_it_refuses_a_body_without_a_boolean_private_as_400(client, owner, bearer, make_run, body):
    run = make_run(owner)

    assert_error(patch(client, run, body, bearer(owner)), 400, "private")

    assert SteeringRun.objects.get(pk=run.pk).private is False


def test_it_answers_anonymous_requests_with_401(client, owner, make_run):
    assert_error(client.patch(url(make_run(owner)), {"private": True}, content_type="application/json"), 401)


def test_it_refuses_a_session_without_the_csrf_token_with_403(owner, make_run):
    from django.test import Client

    client = Client(enforce_csrf_checks=True)
    client.force_login(owner)
    run = make_run(owner)

    response = client.patch(url(run), {"private": True}, content_type="application/json")

    assert response.status_code == 403
    assert SteeringRun.objects.get(pk=run.pk).private is False
