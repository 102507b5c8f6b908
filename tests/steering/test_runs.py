import asyncio
import math
import time

import pytest

from asgiref.sync import async_to_sync

from steering_app import runs, services, worker
from steering_app.errors import Conflict, InvalidInput, NotFound, WorkerUnavailable
from steering_app.models import SteeringRun, Training
from steering_app.runs import RunRequest
from steering_app.steering_settings import SteeringSettings
from steerproject.api import status_code

pytestmark = pytest.mark.django_db


def request_for(training, **changes) -> RunRequest:
    """A valid request; changes use the API's names (intervention_layers, max_new_tokens)."""
    values = dict(
        training_id=training.pk,
        prompt="The weather today is",
        features=[{"feature_id": 3, "coefficient": 2.0}],
        intervention_layers=[2],
        seed=7,
    )
    values.update(changes)
    steering = SteeringSettings(
        features=values.pop("features"),
        layers=values.pop("intervention_layers"),
        method=values.pop("method", "additive"),
        temperature=values.pop("temperature", 0.7),
        max_tokens=values.pop("max_new_tokens", 64),
    )
    return RunRequest(settings=steering, **values)


def test_it_creates_a_queued_run_with_sorted_unique_layers(owner, training):
    run = runs.create(owner, request_for(training, intervention_layers=[3, 0, 3]))

    assert run.status == SteeringRun.Status.QUEUED and run.owner == owner
    assert run.intervention_layers == [0, 3]
    assert run.features == [{"feature_id": 3, "coefficient": 2.0}] and run.seed == 7


def test_it_draws_a_seed_when_none_is_given_and_stores_it(owner, training):
    run = runs.create(owner, request_for(training, seed=None))
    assert 0 <= run.seed < 2**31


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"prompt": "   "}, "prompt"),
        ({"intervention_layers": []}, "intervention_layers"),
        ({"intervention_layers": [4]}, "intervention_layers"),
        ({"intervention_layers": [-1]}, "intervention_layers"),
        ({"features": []}, "features"),
        ({"features": [{"feature_id": 32, "coefficient": 1.0}]}, "features"),
        ({"features": [{"feature_id": 3, "coefficient": math.nan}]}, "features"),
        ({"features": [{"feature_id": 3, "coefficient": math.inf}]}, "features"),
        ({"features": [{"feature_id": 3, "coefficient": 100.5}]}, "features"),
        ({"features": [{"feature_id": 3, "coefficient": 1}, {"feature_id": 3, "coefficient": 2}]}, "features"),
        ({"temperature": 2.5}, "temperature"),
        ({"max_new_tokens": 0}, "max_tokens"),
        ({"max_new_tokens": 513}, "max_tokens"),
        ({"method": "clamp"}, "method"),
        ({"method": "multiplicative", "intervention_layers": [1]}, "intervention_layers"),
        ({"model_id": 999}, "model_id"),
    ],
)
def test_it_refuses_invalid_input_naming_the_field_and_stores_nothing(owner, training, changes, field):
    with pytest.raises(InvalidInput) as caught:
        runs.create(owner, request_for(training, **changes))
    assert caught.value.field == field and status_code(caught.value) == 400
    assert not SteeringRun.objects.exists()


def test_it_refuses_more_than_twenty_layers(owner, training):
    training.model.num_layers = 40
    training.model.save()
    with pytest.raises(InvalidInput, match="At most 20"):
        runs.create(owner, request_for(training, intervention_layers=list(range(21))))


def test_it_accepts_multiplicative_steering_at_the_saes_own_layer(owner, training):
    run = runs.create(owner, request_for(training, method="multiplicative", intervention_layers=[2]))
    assert run.method == "multiplicative"


def test_it_answers_404_for_an_unknown_training_and_409_for_an_unfinished_one(owner, training):
    with pytest.raises(NotFound):
        runs.create(owner, request_for(training, training_id=training.pk + 100))
    training.status = Training.Status.RUNNING
    training.save()
    with pytest.raises(Conflict) as caught:
        runs.create(owner, request_for(training))
    assert status_code(caught.value) == 409
    assert not SteeringRun.objects.exists()


def test_it_marks_a_run_failed_with_its_reason_when_the_engine_raises(owner, training):
    run = runs.create(owner, request_for(training))
    events = []

    runs.process(runs.claim(), lambda event, payload: events.append((event, payload)))

    run.refresh_from_db()
    assert run.status == SteeringRun.Status.FAILED and run.finished_at is not None
    assert "nonexistent" in run.error  # the training's checkpoint and model paths do not exist
    assert [event for event, _ in events] == ["started", "failed"]


def test_it_runs_a_claimed_run_only_once(owner, training):
    run = runs.create(owner, request_for(training))
    assert runs.claim().pk == run.pk
    assert runs.claim() is None


def test_it_fails_runs_no_worker_took_in_time(owner, training, settings):
    from django.utils import timezone

    settings.STEERLAB_RUN_TIMEOUT = 5
    stale = runs.create(owner, request_for(training))
    SteeringRun.objects.filter(pk=stale.pk).update(created_at=timezone.now() - timezone.timedelta(seconds=60))
    fresh = runs.create(owner, request_for(training))

    assert runs.sweep_stale() == 1

    stale.refresh_from_db()
    fresh.refresh_from_db()
    assert (stale.status, stale.error) == (SteeringRun.Status.FAILED, "no worker available")
    assert fresh.status == SteeringRun.Status.QUEUED


def test_it_names_out_of_memory_in_the_words_users_act_on():
    import torch

    assert runs.failure_reason(torch.OutOfMemoryError("CUDA out of memory")) == runs.OOM_MESSAGE


def fake_execute(metrics):
    def execute(run, on_step, should_stop=None):
        on_step("sun", "rain")
        return services.Outcome("sun", "rain", metrics, {"generate_s": 0.1})

    return execute


def test_it_completes_a_run_and_stores_non_finite_numbers_as_null(owner, training, monkeypatch):
    monkeypatch.setattr(services, "execute", fake_execute({"kl_divergence": math.inf, "word_overlap": 0.5}))
    run = runs.create(owner, request_for(training))
    events = []

    runs.process(runs.claim(), lambda event, payload: events.append(event))

    run.refresh_from_db()
    assert run.status == SteeringRun.Status.COMPLETED and run.finished_at is not None
    assert (run.unsteered_output, run.steered_output) == ("sun", "rain")
    assert run.metrics == {"kl_divergence": None, "word_overlap": 0.5}
    assert events == ["started", "delta", "completed"]


def test_it_keeps_a_run_failed_when_it_was_ended_while_generating(owner, training, monkeypatch):
    def ended_meanwhile(run, on_step, should_stop=None):
        SteeringRun.objects.filter(pk=run.pk).update(status=SteeringRun.Status.FAILED, error="timed out")
        return fake_execute({})(run, on_step)

    monkeypatch.setattr(services, "execute", ended_meanwhile)
    run = runs.create(owner, request_for(training))
    events = []

    runs.process(runs.claim(), lambda event, payload: events.append(event))

    run.refresh_from_db()
    assert (run.status, run.error, run.steered_output) == (SteeringRun.Status.FAILED, "timed out", "")
    assert events[-1] == "failed"


def test_it_fails_runs_whose_worker_died_mid_run(owner, training, settings):
    from django.utils import timezone

    settings.STEERLAB_RUN_MAX_SECONDS = 60
    run = runs.create(owner, request_for(training))
    SteeringRun.objects.filter(pk=run.pk).update(
        status=SteeringRun.Status.RUNNING, started_at=timezone.now() - timezone.timedelta(seconds=61)
    )

    assert runs.sweep_stale() == 1

    run.refresh_from_db()
    assert (run.status, run.error) == (SteeringRun.Status.FAILED, "the worker stopped before finishing")


def test_it_hands_a_free_worker_the_oldest_queued_run_whichever_message_it_holds(owner, training):
    first = runs.create(owner, request_for(training))
    second = runs.create(owner, request_for(training))

    assert runs.claim().pk == first.pk
    assert runs.claim().pk == second.pk
    assert runs.claim() is None


def test_it_fails_the_run_when_no_worker_can_be_told(owner, training, monkeypatch):
    def broken_transport(run_id):
        raise ConnectionError("redis is down")

    monkeypatch.setattr(worker, "submit", broken_transport)
    run = runs.create(owner, request_for(training))

    with pytest.raises(WorkerUnavailable) as caught:
        runs.submit(run)

    run.refresh_from_db()
    assert status_code(caught.value) == 503
    assert (run.status, run.error) == (SteeringRun.Status.FAILED, "no worker available")
    assert run.finished_at is not None


def test_process_queued_runs_every_waiting_run_oldest_first(owner, training, monkeypatch):
    monkeypatch.setattr(services, "execute", fake_execute({}))
    first = runs.create(owner, request_for(training))
    second = runs.create(owner, request_for(training))
    order = []

    assert runs.process_queued(lambda run_id: lambda event, payload: order.append((run_id, event))) == 2

    assert [run_id for run_id, event in order if event == "completed"] == [first.pk, second.pk]
    assert not SteeringRun.objects.exclude(status=SteeringRun.Status.COMPLETED).exists()


def test_fail_leaves_an_ended_run_as_it_ended(owner, training):
    run = runs.create(owner, request_for(training))
    SteeringRun.objects.filter(pk=run.pk).update(status=SteeringRun.Status.COMPLETED)

    assert runs.fail(run.pk, "too late") is False

    run.refresh_from_db()
    assert (run.status, run.error) == (SteeringRun.Status.COMPLETED, "")


@pytest.mark.parametrize(("reader", "sees_owners_run"), [("owner", True), ("stranger", False), ("staff", True)])
def test_visible_to_lets_the_owner_and_staff_read_a_run(request, owner, stranger, staff, training, reader,
                                                       sees_owners_run):
    owners_run = runs.create(owner, request_for(training))
    strangers_run = runs.create(stranger, request_for(training))
    user = request.getfixturevalue(reader)

    visible = set(SteeringRun.objects.visible_to(user).values_list("pk", flat=True))

    assert (owners_run.pk in visible) is sees_owners_run
    assert (strangers_run.pk in visible) is (reader in ("stranger", "staff"))


def test_visible_to_shows_an_anonymous_user_nothing(owner, training):
    from django.contrib.auth.models import AnonymousUser

    runs.create(owner, request_for(training))
    assert not SteeringRun.objects.visible_to(AnonymousUser()).exists()


def age(run, seconds: int) -> None:
    from django.utils import timezone

    SteeringRun.objects.filter(pk=run.pk).update(created_at=timezone.now() - timezone.timedelta(seconds=seconds))


@pytest.mark.django_db(transaction=True)
def test_the_embedded_worker_sweeps_stale_runs_on_its_timer_without_any_request(owner, training, settings):
    settings.STEERLAB_RUN_TIMEOUT = 5
    stale = runs.create(owner, request_for(training))
    age(stale, 60)

    async def scenario():
        embedded = worker.EmbeddedWorker(sweep_seconds=0.05)
        try:
            for _ in range(100):  # bounded: 5 s at most
                await asyncio.sleep(0.05)
                if (await SteeringRun.objects.aget(pk=stale.pk)).is_finished:
                    break
        finally:
            embedded.stop()

    async_to_sync(scenario)()

    stale.refresh_from_db()
    assert (stale.status, stale.error) == (SteeringRun.Status.FAILED, "no worker available")


@pytest.mark.django_db(transaction=True)
def test_the_runworker_sweeper_thread_fails_stale_runs_as_it_starts(owner, training, settings):
    settings.STEERLAB_RUN_TIMEOUT = 5
    stale = runs.create(owner, request_for(training))
    age(stale, 60)

    stop = worker.start_sweeper_thread(interval=60)
    try:
        for _ in range(100):  # bounded: 5 s at most
            stale.refresh_from_db()
            if stale.is_finished:
                break
            time.sleep(0.05)
    finally:
        stop.set()

    assert (stale.status, stale.error) == (SteeringRun.Status.FAILED, "no worker available")
