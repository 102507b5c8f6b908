import math

import pytest

from steering_app import services
from steering_app.models import SteeringRun, Training
from steering_app.services import InvalidInput, NotFound, SteeringRequest, TrainingNotCompleted

pytestmark = pytest.mark.django_db


def request_for(training, **changes) -> SteeringRequest:
    values = dict(training_id=training.pk, prompt="The weather today is",
                  features=[{"feature_id": 3, "coefficient": 2.0}], intervention_layers=[2], seed=7)
    values.update(changes)
    return SteeringRequest(**values)


def test_it_creates_a_queued_run_with_sorted_unique_layers(owner, training):
    run = services.create_run(owner, request_for(training, intervention_layers=[3, 0, 3]))

    assert run.status == SteeringRun.Status.QUEUED and run.owner == owner
    assert run.intervention_layers == [0, 3]
    assert run.features == [{"feature_id": 3, "coefficient": 2.0}] and run.seed == 7


def test_it_draws_a_seed_when_none_is_given_and_stores_it(owner, training):
    run = services.create_run(owner, request_for(training, seed=None))
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
        services.create_run(owner, request_for(training, **changes))
    assert caught.value.field == field and caught.value.status_code == 400
    assert not SteeringRun.objects.exists()


def test_it_refuses_more_than_twenty_layers(owner, training):
    training.model.num_layers = 40
    training.model.save()
    with pytest.raises(InvalidInput, match="At most 20"):
        services.create_run(owner, request_for(training, intervention_layers=list(range(21))))


def test_it_accepts_multiplicative_steering_at_the_saes_own_layer(owner, training):
    run = services.create_run(owner, request_for(training, method="multiplicative", intervention_layers=[2]))
    assert run.method == "multiplicative"


def test_it_answers_404_for_an_unknown_training_and_409_for_an_unfinished_one(owner, training):
    with pytest.raises(NotFound):
        services.create_run(owner, request_for(training, training_id=training.pk + 100))
    training.status = Training.Status.RUNNING
    training.save()
    with pytest.raises(TrainingNotCompleted) as caught:
        services.create_run(owner, request_for(training))
    assert caught.value.status_code == 409
    assert not SteeringRun.objects.exists()


def test_it_marks_a_run_failed_with_its_reason_when_the_engine_raises(owner, training):
    run = services.create_run(owner, request_for(training))
    events = []

    services.run_steering(run.pk, lambda event, payload: events.append((event, payload)))

    run.refresh_from_db()
    assert run.status == SteeringRun.Status.FAILED and run.finished_at is not None
    assert "nonexistent" in run.error  # the training's checkpoint and model paths do not exist
    assert [event for event, _ in events] == ["started", "failed"]


def test_it_runs_a_claimed_run_only_once(owner, training):
    run = services.create_run(owner, request_for(training))
    assert services.claim_run(run.pk) is not None
    assert services.claim_run(run.pk) is None


def test_it_fails_runs_no_worker_took_in_time(owner, training, settings):
    from django.utils import timezone

    settings.STEERLAB_RUN_TIMEOUT = 5
    stale = services.create_run(owner, request_for(training))
    SteeringRun.objects.filter(pk=stale.pk).update(created_at=timezone.now() - timezone.timedelta(seconds=60))
    fresh = services.create_run(owner, request_for(training))

    assert services.fail_stale_runs() == 1

    stale.refresh_from_db()
    fresh.refresh_from_db()
    assert (stale.status, stale.error) == (SteeringRun.Status.FAILED, "no worker available")
    assert fresh.status == SteeringRun.Status.QUEUED


def test_it_names_out_of_memory_in_the_words_users_act_on():
    import torch

    assert services.failure_reason(torch.OutOfMemoryError("CUDA out of memory")) == services.OOM_MESSAGE


def fake_execute(metrics):
    def execute(run, emit):
        emit("delta", {"unsteered": "sun", "steered": "rain"})
        run.unsteered_output, run.steered_output = "sun", "rain"
        run.metrics, run.timings = metrics, {"generate_s": 0.1}

    return execute


def test_it_completes_a_run_and_stores_non_finite_numbers_as_null(owner, training, monkeypatch):
    monkeypatch.setattr(services, "execute", fake_execute({"kl_divergence": math.inf, "word_overlap": 0.5}))
    run = services.create_run(owner, request_for(training))
    events = []

    services.run_steering(run.pk, lambda event, payload: events.append(event))

    run.refresh_from_db()
    assert run.status == SteeringRun.Status.COMPLETED and run.finished_at is not None
    assert (run.unsteered_output, run.steered_output) == ("sun", "rain")
    assert run.metrics == {"kl_divergence": None, "word_overlap": 0.5}
    assert events == ["started", "delta", "completed"]


def test_it_keeps_a_run_failed_when_it_was_ended_while_generating(owner, training, monkeypatch):
    def ended_meanwhile(run, emit):
        SteeringRun.objects.filter(pk=run.pk).update(status=SteeringRun.Status.FAILED, error="timed out")
        fake_execute({})(run, emit)

    monkeypatch.setattr(services, "execute", ended_meanwhile)
    run = services.create_run(owner, request_for(training))
    events = []

    services.run_steering(run.pk, lambda event, payload: events.append(event))

    run.refresh_from_db()
    assert (run.status, run.error, run.steered_output) == (SteeringRun.Status.FAILED, "timed out", "")
    assert events[-1] == "failed"


def test_it_fails_runs_whose_worker_died_mid_run(owner, training, settings):
    from django.utils import timezone

    settings.STEERLAB_RUN_MAX_SECONDS = 60
    run = services.create_run(owner, request_for(training))
    SteeringRun.objects.filter(pk=run.pk).update(
        status=SteeringRun.Status.RUNNING, started_at=timezone.now() - timezone.timedelta(seconds=61)
    )

    assert services.fail_stale_runs() == 1

    run.refresh_from_db()
    assert (run.status, run.error) == (SteeringRun.Status.FAILED, "the worker stopped before finishing")


def test_it_hands_a_free_worker_the_oldest_queued_run_whichever_message_it_holds(owner, training):
    first = services.create_run(owner, request_for(training))
    second = services.create_run(owner, request_for(training))

    assert services.claim_next_run().pk == first.pk
    assert services.claim_next_run().pk == second.pk
    assert services.claim_next_run() is None
