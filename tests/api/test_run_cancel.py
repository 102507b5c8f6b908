"""POST /api/steering/runs/{id}/cancel, and a timed-out sync generate, which cancels through the same path."""

import threading

import pytest

from steering_app import runs, services, wake
from steering_app.models import SteeringRun
from tests.api.support import assert_error
from tests.fake_engine import use_engine


def url(run):
    return f"/api/steering/runs/{run.pk}/cancel"


def queued(make_run, user):
    return make_run(user, status=SteeringRun.Status.QUEUED, started_at=None, finished_at=None, metrics={})


@pytest.mark.parametrize("canceller", ["owner", "staff"])
def test_it_cancels_a_queued_run_for_its_owner_or_staff(request, client, owner, bearer, make_run, canceller):
    run = queued(make_run, owner)
    user = request.getfixturevalue(canceller)

    response = client.post(url(run), headers=bearer(user))

    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "cancelled" and body["error"] == f"cancelled by {canceller}"
    run.refresh_from_db()
    assert run.status == SteeringRun.Status.CANCELLED and run.finished_at is not None


def test_it_flags_a_running_run_which_its_worker_then_stops(client, owner, bearer, make_run):
    run = queued(make_run, owner)
    runs.claim()

    body = client.post(url(run), headers=bearer(owner)).json()

    assert body["status"] == "running" and body["cancel_requested"] is True
    run.refresh_from_db()
    assert run.cancel_requested_at is not None


def test_it_answers_404_for_another_users_private_run_and_changes_nothing(
    client, owner, stranger, bearer, make_run
):
    run = queued(make_run, owner)
    SteeringRun.objects.filter(pk=run.pk).update(private=True)

    assert_error(client.post(url(run), headers=bearer(stranger)), 404, "run_id")

    run.refresh_from_db()
    assert run.status == SteeringRun.Status.QUEUED


def test_it_answers_403_to_a_teammate_who_reads_the_shared_run_and_changes_nothing(
    client, owner, teammate, bearer, make_run
):
    run = queued(make_run, owner)

    assert_error(client.post(url(run), headers=bearer(teammate)), 403, "run_id")

    run.refresh_from_db()
    assert run.status == SteeringRun.Status.QUEUED


def test_it_answers_409_for_a_run_that_has_ended(client, owner, bearer, make_run):
    run = make_run(owner)  # completed

    body = assert_error(client.post(url(run), headers=bearer(owner)), 409, "run_id")

    assert "completed" in body["detail"]


def test_it_needs_the_csrf_token_with_a_session(owner, make_run):
    from django.test import Client

    run = queued(make_run, owner)
    client = Client(enforce_csrf_checks=True)
    client.force_login(owner)

    assert_error(client.post(url(run)), 403)
    run.refresh_from_db()
    assert run.status == SteeringRun.Status.QUEUED


@pytest.mark.django_db(transaction=True)
def test_a_timed_out_generate_cancels_the_run_and_the_worker_takes_the_next_at_once(
    client, owner, bearer, generate_body, monkeypatch, settings
):
    """A worker thread of its own (as the embedded worker has): the 503 must leave it free, not busy."""
    settings.STEERLAB_RUN_TIMEOUT = 1
    monkeypatch.setattr(runs, "HEARTBEAT_SECONDS", 0.05)
    waiting, stop_worker, steps = threading.Event(), threading.Event(), []

    def slow_engine(run, on_step, should_stop=None):
        for step in range(500):  # 10 s unless stopped
            if should_stop():
                raise services.Cancelled("generation stopped")
            threading.Event().wait(0.02)
            steps.append(step)
            on_step(".", ".")
        return services.Outcome("done", "done", {}, {})

    def worker_loop():
        while not stop_worker.is_set():
            if waiting.wait(0.05):
                waiting.clear()
                runs.process_queued(lambda run_id: lambda event, payload: None)

    use_engine(monkeypatch, slow_engine)
    monkeypatch.setattr(wake, "submit", lambda run_id: waiting.set())
    thread = threading.Thread(target=worker_loop)
    thread.start()
    try:
        body = assert_error(
            client.post("/api/steering/generate", generate_body, "application/json", headers=bearer(owner)),
            503,
        )
        timed_out = SteeringRun.objects.get()
        for _ in range(100):  # bounded: 5 s
            timed_out.refresh_from_db()
            if timed_out.is_finished:
                break
            threading.Event().wait(0.05)

        use_engine(
            monkeypatch,
            lambda run, on_step, should_stop=None: services.Outcome("quick", "quick", {}, {}),
        )
        settings.STEERLAB_RUN_TIMEOUT = 30  # the worker is free: only a loaded machine makes it take long
        following = client.post(
            "/api/steering/generate", generate_body, "application/json", headers=bearer(owner)
        )
    finally:
        stop_worker.set()
        thread.join(timeout=10)

    assert "did not finish within 1 s; it was cancelled" in body["detail"]
    assert (timed_out.status, timed_out.error) == (SteeringRun.Status.CANCELLED, "timed out after 1 s")
    assert timed_out.steered_output == "." * len(steps) and len(steps) < 500
    assert following.status_code == 200, following.content
    assert following.json()["steered_output"] == "quick"
