import asyncio
import math
import socket
import subprocess
import sys
import threading
import time
from datetime import timedelta

import pytest
from asgiref.sync import async_to_sync
from django.utils import timezone

from steering_app import runs, services, wake, worker
from steering_app.errors import Conflict, InvalidInput, NotFound, TooManyRuns, WorkerUnavailable
from steering_app.models import AnalysisJob, Feature, SteeringRun, Training, Worker
from steering_app.runs import RunRequest
from steering_app.steering_settings import SteeringSettings
from steerproject.api import status_code
from tests.fake_engine import use_engine

pytestmark = pytest.mark.django_db


def request_for(training, **changes) -> RunRequest:
    """A valid request; changes use the API's names (intervention_layers, max_tokens)."""
    values = {
        "training_id": training.pk,
        "prompt": "The weather today is",
        "features": [{"feature_id": 3, "coefficient": 2.0}],
        "intervention_layers": [2],
        "seed": 7,
    }
    values.update(changes)
    steering = SteeringSettings(
        features=values.pop("features"),
        layers=values.pop("intervention_layers"),
        method=values.pop("method", "additive"),
        temperature=values.pop("temperature", 0.7),
        max_tokens=values.pop("max_tokens", 64),
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
        (
            {"features": [{"feature_id": 3, "coefficient": 1}, {"feature_id": 3, "coefficient": 2}]},
            "features",
        ),
        ({"temperature": 2.5}, "temperature"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 513}, "max_tokens"),
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

    runs.process_queued(lambda run_id: lambda event, payload: events.append((event, payload)))

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


def test_a_queued_run_waits_past_the_timeout_while_a_worker_beats_and_fails_once_none_has(
    owner, training, settings
):
    from django.utils import timezone

    settings.STEERLAB_RUN_TIMEOUT = 5
    waiting = runs.create(owner, request_for(training))
    age(waiting, 60)
    runs.beat("busy-host:1")  # a worker serving someone else's long sweep: alive, not free

    assert runs.sweep_stale() == 0
    waiting.refresh_from_db()
    assert waiting.status == SteeringRun.Status.QUEUED

    silent_since = timezone.now() - timezone.timedelta(seconds=runs.WORKER_SILENT_SECONDS + 1)
    Worker.objects.update(seen_at=silent_since)
    assert runs.sweep_stale() == 1
    waiting.refresh_from_db()
    assert (waiting.status, waiting.error) == (SteeringRun.Status.FAILED, runs.NO_WORKER)


def queue_of(owner, training, count: int) -> list[SteeringRun]:
    return [runs.create(owner, request_for(training, prompt=f"run {index}")) for index in range(count)]


def test_runs_are_taken_round_robin_across_members_not_oldest_first(owner, teammate, staff, training):
    backlog = queue_of(owner, training, 4)
    theirs = queue_of(teammate, training, 2)
    staffs = queue_of(staff, training, 1)

    order = []
    while (run := runs.claim()) is not None:
        order.append(run.pk)

    assert order == [
        backlog[0].pk,
        theirs[0].pk,
        staffs[0].pk,
        backlog[1].pk,
        theirs[1].pk,
        backlog[2].pk,
        backlog[3].pk,
    ]


def test_a_member_with_no_run_in_progress_goes_before_a_backlog_with_runs_in_the_batch(
    owner, teammate, training
):
    backlog = queue_of(owner, training, 5)
    first, second = runs.claim(), runs.claim()  # the batch holds two of the backlog
    late = runs.create(teammate, request_for(training))

    assert (first.pk, second.pk) == (backlog[0].pk, backlog[1].pk)
    assert runs.claim().pk == late.pk


def test_the_next_run_in_turn_waits_for_rows_rather_than_being_overtaken(owner, teammate, training):
    mine = runs.create(owner, request_for(training))
    runs.create(teammate, request_for(training))

    assert runs.claim(accepts=lambda run: run.pk != mine.pk) is None
    assert SteeringRun.objects.filter(status=SteeringRun.Status.RUNNING).count() == 0


def test_it_refuses_a_run_beyond_the_members_queue_share_and_stores_nothing(
    owner, teammate, training, settings
):
    settings.STEERLAB_MAX_QUEUED_PER_MEMBER = 3
    queue_of(owner, training, 3)

    with pytest.raises(TooManyRuns) as refused:
        runs.create(owner, request_for(training))

    assert status_code(refused.value) == 429 and refused.value.retry_after > 0
    assert "STEERLAB_MAX_QUEUED_PER_MEMBER" in refused.value.message
    assert SteeringRun.objects.filter(owner=owner).count() == 3
    assert runs.create(teammate, request_for(training)).status == SteeringRun.Status.QUEUED
    runs.claim()  # one of the member's runs starts: there is room again
    assert runs.create(owner, request_for(training)).status == SteeringRun.Status.QUEUED


@pytest.mark.parametrize(
    ("seconds", "retry_after"),
    [([], runs.RETRY_AFTER_SECONDS), ([2.2, 3.5, 40.0], 4), ([0.0, 0.0], 1), ([300.0], 60)],
    ids=["no-run-yet", "median-rounded-up", "at-least-one-second", "at-most-a-minute"],
)
def test_retry_after_is_about_one_of_the_latest_runs(owner, training, settings, seconds, retry_after):
    """The 429's Retry-After: the median start-to-end time of the latest completed runs (a failed one is left
    out), in whole seconds between 1 and 60; 10 before any run has completed."""
    settings.STEERLAB_MAX_QUEUED_PER_MEMBER = 1
    end = timezone.now()
    for index, duration in enumerate(seconds):
        make_finished_run(owner, training, end - timedelta(seconds=duration), end, index)
    make_finished_run(
        owner, training, end - timedelta(seconds=500), end, -1, status=SteeringRun.Status.FAILED
    )
    queue_of(owner, training, 1)

    with pytest.raises(TooManyRuns) as refused:
        runs.create(owner, request_for(training))

    assert refused.value.retry_after == retry_after


def make_finished_run(owner, training, started, finished, index, status=SteeringRun.Status.COMPLETED):
    run = runs.create(owner, request_for(training, prompt=f"finished {index}"))
    SteeringRun.objects.filter(pk=run.pk).update(status=status, started_at=started, finished_at=finished)


@pytest.mark.parametrize(
    ("prompt", "max_tokens", "field"),
    [(" ".join(["word"] * 600), 1, "prompt"), ("four words of prompt", 512, "max_tokens")],
)
def test_it_refuses_a_prompt_and_max_tokens_beyond_the_workers_slots_when_created(
    owner, training, settings, prompt, max_tokens, field
):
    settings.STEERLAB_SLOT_TOKENS = 512

    with pytest.raises(InvalidInput) as refused:
        runs.create(owner, request_for(training, prompt=prompt, max_tokens=max_tokens))

    assert refused.value.field == field
    assert "509" in refused.value.message if field == "max_tokens" else "512" in refused.value.message
    assert not SteeringRun.objects.exists()
    runs.create(owner, request_for(training, prompt="four words of prompt", max_tokens=509))


def test_it_refuses_a_feature_whose_max_activation_is_not_finite(owner, training):
    Feature.objects.filter(training=training, index=3).update(max_activation=math.inf)

    with pytest.raises(InvalidInput) as refused:
        runs.create(owner, request_for(training))

    assert refused.value.field == "features" and "Feature 3" in refused.value.message
    assert not SteeringRun.objects.exists()


def test_a_request_the_worker_refuses_fails_with_the_field_at_fault(owner, training, monkeypatch):
    def refuse(run, on_step, should_stop):
        raise InvalidInput("max_tokens: 4 prompt tokens + 64 new tokens exceed the slots", "max_tokens")

    use_engine(monkeypatch, refuse)
    run = runs.create(owner, request_for(training))

    runs.process_queued()
    processed = SteeringRun.objects.get()

    assert (processed.status, processed.error_field) == (SteeringRun.Status.FAILED, "max_tokens")
    assert processed.error == "max_tokens: 4 prompt tokens + 64 new tokens exceed the slots"
    assert run.pk == processed.pk


def test_a_cancel_that_stops_the_prompt_read_ends_the_run_cancelled_by_its_canceller(
    owner, training, monkeypatch
):
    """The engine raises its own Stopped when the cancel flag stops the prefill, before any step."""
    from steering_app.engine import Stopped

    def stopped_while_reading_the_prompt(run, on_step, should_stop):
        runs.cancel(run.pk, "cancelled by owner")
        raise Stopped("generation stopped: the run was cancelled")

    use_engine(monkeypatch, stopped_while_reading_the_prompt)
    runs.create(owner, request_for(training))

    runs.process_queued()
    processed = SteeringRun.objects.get()

    assert (processed.status, processed.error) == (SteeringRun.Status.CANCELLED, "cancelled by owner")


@pytest.mark.slow
def test_a_cancel_during_the_real_prompt_read_ends_cancelled_not_failed(
    owner, demo_feature_space, monkeypatch
):
    """The real engine: the cancel arrives after the run is claimed and before its prefill's forward, as a
    Stop pressed while the prompt is read; the prefill's stop check ends it."""
    start = services.start

    def cancelled_as_it_starts(run, on_step, should_stop):
        generation = start(run, on_step, should_stop)
        runs.cancel(run.pk, "cancelled by owner")  # this process's run: its stop flag is set at once
        return generation

    monkeypatch.setattr(services, "start", cancelled_as_it_starts)
    sweep = SteeringSettings(
        features=[{"feature_id": 1681, "coefficient": 1.0}], layers=[10], max_tokens=8, sweep=[0.5, 1, 2]
    )
    runs.create(owner, RunRequest(demo_feature_space.pk, "The weather today is", sweep, seed=1))

    runs.process_queued()
    processed = SteeringRun.objects.get()

    assert (processed.status, processed.error) == (SteeringRun.Status.CANCELLED, "cancelled by owner")
    assert processed.unsteered_output == ""


def test_it_names_out_of_memory_in_the_words_users_act_on():
    import torch

    assert runs.failure_reason(torch.OutOfMemoryError("CUDA out of memory")) == runs.OOM_MESSAGE


def fake_execute(metrics):
    def execute(run, on_step, should_stop=None):
        on_step("sun", "rain")
        return services.Outcome("sun", "rain", metrics, {"generate_s": 0.1})

    return execute


def test_it_completes_a_run_and_stores_non_finite_numbers_as_null(owner, training, monkeypatch):
    use_engine(monkeypatch, fake_execute({"kl_divergence": math.inf, "word_overlap": 0.5}))
    run = runs.create(owner, request_for(training))
    events = []

    runs.process_queued(lambda run_id: lambda event, payload: events.append(event))

    run.refresh_from_db()
    assert run.status == SteeringRun.Status.COMPLETED and run.finished_at is not None
    assert (run.unsteered_output, run.steered_output) == ("sun", "rain")
    assert run.metrics == {"kl_divergence": None, "word_overlap": 0.5}
    assert events == ["started", "delta", "completed"]


def test_it_keeps_a_run_failed_when_it_was_ended_while_generating(owner, training, monkeypatch):
    def ended_meanwhile(run, on_step, should_stop=None):
        SteeringRun.objects.filter(pk=run.pk).update(status=SteeringRun.Status.FAILED, error="timed out")
        return fake_execute({})(run, on_step)

    use_engine(monkeypatch, ended_meanwhile)
    run = runs.create(owner, request_for(training))
    events = []

    runs.process_queued(lambda run_id: lambda event, payload: events.append(event))

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

    monkeypatch.setattr(wake, "submit", broken_transport)
    run = runs.create(owner, request_for(training))

    with pytest.raises(WorkerUnavailable) as caught:
        runs.submit(run)

    run.refresh_from_db()
    assert status_code(caught.value) == 503
    assert (run.status, run.error) == (SteeringRun.Status.FAILED, "no worker available")
    assert run.finished_at is not None


def test_process_queued_runs_every_waiting_run_oldest_first(owner, training, monkeypatch):
    use_engine(monkeypatch, fake_execute({}))
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


@pytest.mark.parametrize(
    ("reader", "sees_shared", "sees_private"),
    [("owner", True, True), ("teammate", True, False), ("staff", True, True)],
)
def test_visible_to_lets_members_read_shared_runs_and_only_the_owner_and_staff_private_ones(
    request, owner, teammate, staff, training, reader, sees_shared, sees_private
):
    shared = runs.create(owner, request_for(training))
    private = runs.create(owner, request_for(training, private=True))
    user = request.getfixturevalue(reader)

    visible = set(SteeringRun.objects.visible_to(user).values_list("pk", flat=True))

    assert private.private and not shared.private
    assert (shared.pk in visible, private.pk in visible) == (sees_shared, sees_private)


def test_visible_to_shows_an_anonymous_user_nothing(owner, training):
    from django.contrib.auth.models import AnonymousUser

    runs.create(owner, request_for(training))
    assert not SteeringRun.objects.visible_to(AnonymousUser()).exists()


def age(run, seconds: int) -> None:
    from django.utils import timezone

    SteeringRun.objects.filter(pk=run.pk).update(
        created_at=timezone.now() - timezone.timedelta(seconds=seconds)
    )


def left_silent(run, seconds: int) -> None:
    """As a worker of another host leaves a run it stopped serving: running, no heartbeat for `seconds`."""
    from django.utils import timezone

    long_ago = timezone.now() - timezone.timedelta(seconds=seconds)
    running(run, started_at=long_ago, heartbeat_at=long_ago, worker="elsewhere:1")


@pytest.mark.django_db(transaction=True)
def test_the_embedded_worker_sweeps_stale_runs_on_its_timer_without_any_request(owner, training, settings):
    settings.STEERLAB_RUN_MAX_SECONDS = 5
    stale = runs.create(owner, request_for(training))
    left_silent(stale, 60)

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
    assert (stale.status, stale.error) == (SteeringRun.Status.FAILED, runs.WORKER_STOPPED)


@pytest.mark.django_db(transaction=True)
def test_the_runworker_sweeper_thread_fails_stale_runs_as_it_starts(owner, training, settings):
    settings.STEERLAB_RUN_MAX_SECONDS = 5
    stale = runs.create(owner, request_for(training))
    left_silent(stale, 60)

    stop = worker.start_sweeper_thread(interval=60)
    try:
        for _ in range(100):  # bounded: 5 s at most
            stale.refresh_from_db()
            if stale.is_finished:
                break
            time.sleep(0.05)
    finally:
        stop.set()

    assert (stale.status, stale.error) == (SteeringRun.Status.FAILED, runs.WORKER_STOPPED)
    assert Worker.objects.filter(name=wake.worker_name()).exists()  # and it beat as it started


def running(run, **fields) -> None:
    SteeringRun.objects.filter(pk=run.pk).update(status=SteeringRun.Status.RUNNING, **fields)


def test_the_sweep_judges_a_running_run_by_its_heartbeat_not_by_how_long_it_has_run(
    owner, training, settings
):
    from django.utils import timezone

    settings.STEERLAB_RUN_MAX_SECONDS = 60
    now = timezone.now()
    long_but_alive = runs.create(owner, request_for(training))
    silent = runs.create(owner, request_for(training))
    running(long_but_alive, started_at=now - timezone.timedelta(hours=2), heartbeat_at=now)
    running(
        silent,
        started_at=now - timezone.timedelta(seconds=90),
        heartbeat_at=now - timezone.timedelta(seconds=61),
    )

    assert runs.sweep_stale() == 1

    long_but_alive.refresh_from_db()
    silent.refresh_from_db()
    assert long_but_alive.status == SteeringRun.Status.RUNNING
    assert (silent.status, silent.error) == (SteeringRun.Status.FAILED, runs.WORKER_STOPPED)


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_the_sweep_fails_at_once_a_run_whose_worker_process_on_this_host_is_gone(owner, training):
    from django.utils import timezone

    orphan = runs.create(owner, request_for(training))
    alive = runs.create(owner, request_for(training))
    running(
        orphan,
        started_at=timezone.now(),
        heartbeat_at=timezone.now(),
        worker=f"{socket.gethostname()}:{dead_pid()}",
    )
    running(alive, started_at=timezone.now(), heartbeat_at=timezone.now(), worker=wake.worker_name())

    assert runs.sweep_stale() == 1

    orphan.refresh_from_db()
    alive.refresh_from_db()
    assert (orphan.status, orphan.error) == (SteeringRun.Status.FAILED, runs.WORKER_GONE)
    assert alive.status == SteeringRun.Status.RUNNING


def slow_engine(steps: int, seconds_per_step: float, started: threading.Event | None = None):
    """An engine honouring the contract of the real one: should_stop is asked before every step."""
    taken = []

    def execute(run, on_step, should_stop=None):
        for step in range(steps):
            if should_stop is not None and should_stop():
                raise services.Cancelled("generation stopped")
            time.sleep(seconds_per_step)
            taken.append(step)
            on_step(f" u{step}", f" s{step}")
            if started is not None:
                started.set()
        return services.Outcome("unsteered", "steered", {"kl_divergence": 0.5}, {})

    execute.taken = taken
    return execute


@pytest.mark.django_db(transaction=True)
def test_a_slow_run_completes_past_max_seconds_while_its_heartbeat_is_fresh(
    owner, training, settings, monkeypatch
):
    settings.STEERLAB_RUN_MAX_SECONDS = 1
    monkeypatch.setattr(runs, "HEARTBEAT_SECONDS", 0.1)
    use_engine(monkeypatch, slow_engine(steps=25, seconds_per_step=0.1))  # 2.5 s
    runs.create(owner, request_for(training))

    stop_sweeping = worker.start_sweeper_thread(interval=0.1)
    try:
        runs.process_queued(lambda run_id: lambda event, payload: None)
        processed = SteeringRun.objects.get()
    finally:
        stop_sweeping.set()

    assert (processed.status, processed.error) == (SteeringRun.Status.COMPLETED, "")
    assert processed.finished_at - processed.started_at > timezone_seconds(2)
    assert processed.steered_output == "steered"


def timezone_seconds(seconds: float):
    from django.utils import timezone

    return timezone.timedelta(seconds=seconds)


def test_cancelling_a_queued_run_ends_it_at_once(owner, training):
    run = runs.create(owner, request_for(training))

    assert runs.cancel(run.pk, "cancelled by owner") is True

    run.refresh_from_db()
    assert (run.status, run.error) == (SteeringRun.Status.CANCELLED, "cancelled by owner")
    assert run.finished_at is not None and runs.claim() is None
    assert runs.cancel(run.pk, "again") is False


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("local", [True, False], ids=["same-process", "through-the-database"])
def test_a_cancel_during_generation_stops_within_one_step_and_frees_the_worker(
    owner, training, monkeypatch, local
):
    monkeypatch.setattr(runs, "HEARTBEAT_SECONDS", 0.05)
    started = threading.Event()
    engine = slow_engine(steps=400, seconds_per_step=0.02, started=started)  # 8 s unless stopped
    use_engine(monkeypatch, engine)
    run = runs.create(owner, request_for(training))
    if not local:  # a worker in another process: only the flag in the database reaches it
        monkeypatch.setattr(runs.Liveness, "active", {})
    events = []
    thread = threading.Thread(
        target=lambda: runs.process_queued(lambda run_id: lambda e, p: events.append(e))
    )
    thread.start()
    assert started.wait(5)

    runs.cancel(run.pk, "cancelled by owner")
    steps_when_cancelled = len(engine.taken)
    thread.join(timeout=5)

    assert not thread.is_alive()
    run.refresh_from_db()
    assert (run.status, run.error) == (SteeringRun.Status.CANCELLED, "cancelled by owner")
    # The text streamed until it stopped is kept, and it stopped within one step (the thread's poll: 3).
    assert run.steered_output == "".join(f" s{step}" for step in engine.taken)
    assert len(engine.taken) - steps_when_cancelled <= (1 if local else 4)
    assert events[-1] == "cancelled"

    use_engine(monkeypatch, fake_execute({}))
    following = runs.create(owner, request_for(training))
    runs.process_queued()
    following.refresh_from_db()
    assert following.status == SteeringRun.Status.COMPLETED


class StepwiseBatch:
    """services.EngineBatch's protocol for one run, one token a step, so that a worker goes round between steps."""

    def __init__(self, steps: int, seconds_per_step: float):
        self.steps, self.seconds_per_step = steps, seconds_per_step
        self.taken = 0
        self.stepping = threading.Event()
        self.admitted = None

    @property
    def active(self) -> bool:
        return self.admitted is not None

    def accepts(self, run) -> bool:
        return False

    def admit(self, run, on_step, should_stop) -> bool:
        self.admitted = (run, on_step)
        return True

    def step(self):
        run, on_step = self.admitted
        time.sleep(self.seconds_per_step)
        self.taken += 1
        on_step(" u", [" s"])
        self.stepping.set()
        if self.taken < self.steps:
            return []
        self.admitted = None
        return [(run, services.Outcome("unsteered", "steered", {}, {}))]

    def abandon(self):
        abandoned, self.admitted = [self.admitted[0]] if self.admitted else [], None
        return abandoned


@pytest.mark.django_db(transaction=True)
def test_a_worker_busy_generating_reads_a_prompt_for_a_web_request_between_two_steps(
    client, owner, training, monkeypatch, settings
):
    settings.STEERLAB_RUN_TIMEOUT = 10  # bounded: the request gives up (503) if no step reads its prompt
    batch = StepwiseBatch(steps=100, seconds_per_step=0.02)
    monkeypatch.setattr(services, "batch_for", lambda run: batch)
    read = []

    def measure(training, prompt):
        read.append((threading.current_thread(), batch.taken, batch.active))
        return 7.5

    monkeypatch.setattr(services, "residual_norm", measure)
    # A busy worker's message waits behind its batch: it finds the job itself when it goes round.
    monkeypatch.setattr(wake, "submit", lambda run_id=None: None)
    run = runs.create(owner, request_for(training))
    busy = threading.Thread(target=runs.process_queued, args=(lambda run_id: lambda e, p: None,))
    busy.start()
    try:
        assert batch.stepping.wait(5)
        client.force_login(owner)
        response = client.post(f"/steering/trainings/{training.pk}/scale/", {"prompt": "The weather is"})
    finally:
        busy.join(timeout=10)

    assert response.status_code == 200 and response.json()["residual_norm"] == 7.5
    [(thread, steps_before, generating)] = read
    assert thread is busy  # the worker's thread, not the request's
    assert generating and 0 < steps_before < batch.steps
    run.refresh_from_db()
    assert run.status == SteeringRun.Status.COMPLETED
    assert not AnalysisJob.objects.exists()


def analysis_job(owner, training, **fields) -> AnalysisJob:
    return AnalysisJob.objects.create(
        owner=owner, training=training, kind="residual_norm", prompt="Hi", **fields
    )


def test_the_sweep_fails_a_stalled_analysis_job_and_deletes_those_no_request_awaits(
    owner, training, settings
):
    from django.utils import timezone

    settings.STEERLAB_RUN_TIMEOUT, settings.STEERLAB_RUN_MAX_SECONDS = 120, 60
    now = timezone.now()
    stalled = analysis_job(owner, training, status="running", started_at=now - timezone.timedelta(seconds=61))
    working = analysis_job(owner, training, status="running", started_at=now)
    waiting = analysis_job(owner, training)
    abandoned = [
        analysis_job(owner, training, status=status, created_at=now - timezone.timedelta(seconds=241))
        for status in ("queued", "running", "completed", "failed")
    ]

    worker.sweep()

    stalled.refresh_from_db()
    assert (stalled.status, stalled.error) == ("failed", "the worker stopped before finishing")
    assert set(AnalysisJob.objects.values_list("pk", flat=True)) == {stalled.pk, working.pk, waiting.pk}
    assert not AnalysisJob.objects.filter(pk__in=[job.pk for job in abandoned]).exists()
