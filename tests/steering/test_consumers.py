"""ws/steering/runs/<id>/: the run stream, as htmx ws-extension fragments."""

import re

import pytest
from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from channels.testing import WebsocketCommunicator
from django.test import Client
from django.utils import timezone

from steering_app import consumers, streaming, wake
from steering_app.models import SteeringRun

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("in_memory_channel_layer")]

ORIGIN = (b"origin", b"http://127.0.0.1")
TIMEOUT = 5


def cookie_for(user) -> tuple[bytes, bytes]:
    client = Client()
    client.force_login(user)
    return b"cookie", f"sessionid={client.cookies['sessionid'].value}".encode()


def headers_for(user=None, origin=ORIGIN) -> list:
    """Built before the event loop runs: logging in touches the database synchronously."""
    return [origin] + ([cookie_for(user)] if user is not None else [])


def communicator(application, run, headers, query=""):
    path = f"/ws/steering/runs/{run.pk}/" + (f"?{query}" if query else "")
    return WebsocketCommunicator(application, path, headers=headers)


def publish(run, event, **payload):
    async_to_sync(get_channel_layer().group_send)(
        streaming.group_name(run.pk), {"type": "run.event", "run_id": run.pk, "event": event, **payload}
    )


def finish(run, **fields):
    defaults = {
        "status": "completed",
        "unsteered_output": "It is dry.",
        "steered_output": "It pours.",
        "metrics": {
            "kl_divergence": 0.5,
            "perplexity_delta": -1.0,
            "semantic_similarity": 0.5,
            "word_overlap": 0.25,
            "feature_activation": [],
        },
        "started_at": timezone.now(),
        "finished_at": timezone.now(),
    }
    defaults.update(fields)
    SteeringRun.objects.filter(pk=run.pk).update(**defaults)


def text(html) -> str:
    return re.sub(r"\s+", " ", html)


def test_the_owner_receives_tokens_status_and_the_final_comparison(application, owner, training, make_run):
    run = make_run(owner)

    headers = headers_for(owner)

    async def scenario():
        ws = communicator(application, run, headers)
        connected, _ = await ws.connect()
        assert connected
        await publish_async(run, "started")
        status = await ws.receive_from(TIMEOUT)
        await publish_async(run, "delta", unsteered="It", steered="It")
        first = await ws.receive_from(TIMEOUT)
        await publish_async(run, "delta", unsteered=" is <dry>", steered=" pours")
        second = await ws.receive_from(TIMEOUT)
        await finish_async(run)
        await publish_async(run, "completed")
        final = await ws.receive_from(TIMEOUT)
        closed = await ws.receive_output(TIMEOUT)
        await ws.disconnect()
        return status, first, second, final, closed

    status, first, second, final, closed = async_to_sync(scenario)()

    assert 'id="run-status"' in status and 'hx-swap-oob="true"' in status and "Generating" in status
    assert first == (
        '<div hx-swap-oob="beforeend:#unsteered-output">It</div>'
        '<div hx-swap-oob="beforeend:#steered-output">It</div>'
    )
    assert '<div hx-swap-oob="beforeend:#unsteered-output"> is &lt;dry&gt;</div>' in second
    assert '<section id="run-result"' in final and 'hx-swap-oob="true"' in final
    assert 'data-state="completed"' in final and "It pours." in final and "ws-connect" not in final
    for card in ("KL Divergence", "Perplexity Δ", "Similarity", "Word Overlap"):
        assert card in final
    assert closed["type"] == "websocket.close"


@pytest.mark.parametrize(
    ("watcher", "private"),
    [("teammate", False), ("staff", True)],
    ids=["a teammate watches a shared run", "staff watch any run, private ones too"],
)
def test_a_reader_of_the_run_watches_it(application, owner, training, make_run, request, watcher, private):
    run = make_run(owner, private=private)

    headers = headers_for(request.getfixturevalue(watcher))

    async def scenario():
        ws = communicator(application, run, headers)
        connected, _ = await ws.connect()
        await publish_async(run, "delta", unsteered="a", steered="b")
        message = await ws.receive_from(TIMEOUT)
        await ws.disconnect()
        return connected, message

    connected, message = async_to_sync(scenario)()
    assert connected and "beforeend:#steered-output" in message


def make_private(run, user):
    """PATCH /api/steering/runs/<id> {"private": true} as user (session login), its status code."""
    client = Client()
    client.force_login(user)
    response = client.patch(
        f"/api/steering/runs/{run.pk}", {"private": True}, content_type="application/json"
    )
    return response.status_code


@pytest.mark.parametrize("mailbox", [False, True], ids=["watching the run", "the owner's submitting page"])
def test_a_teammates_socket_closes_at_once_when_the_run_turns_private_and_the_owners_stays_open(
    application, owner, teammate, training, monkeypatch, make_run, mailbox
):
    from channels.db import database_sync_to_async

    # The privacy event must close it, not the consumers' periodic read of the run.
    monkeypatch.setattr(consumers, "WATCH_SECONDS", 60)
    monkeypatch.setattr(wake, "submit", lambda run_id: None)
    run = make_run(owner)
    owner_query = streaming.open_mailbox(run.pk).split("?", 1)[1] if mailbox else ""

    owner_headers, teammate_headers = headers_for(owner), headers_for(teammate)

    async def scenario():
        owner_ws = communicator(application, run, owner_headers, query=owner_query)
        teammate_ws = communicator(application, run, teammate_headers)
        assert (await owner_ws.connect())[0] and (await teammate_ws.connect())[0]
        await publish_async(run, "delta", unsteered="Shared", steered="Shared")
        before = [await owner_ws.receive_from(TIMEOUT), await teammate_ws.receive_from(TIMEOUT)]
        status = await database_sync_to_async(make_private)(run, owner)
        closed = await teammate_ws.receive_output(TIMEOUT)
        await publish_async(run, "delta", unsteered="Secret", steered="Secret")
        owner_delta = await owner_ws.receive_from(TIMEOUT)
        await finish_async(run, steered_output="Secret result")
        await publish_async(run, "completed")
        owner_final = await owner_ws.receive_from(TIMEOUT)
        teammate_silent = await teammate_ws.receive_nothing(0.3)
        await owner_ws.disconnect()
        await teammate_ws.disconnect()
        return before, status, closed, owner_delta, owner_final, teammate_silent

    before, status, closed, owner_delta, owner_final, teammate_silent = async_to_sync(scenario)()
    assert all(">Shared</div>" in message for message in before)
    assert status == 200
    assert closed == {"type": "websocket.close", "code": 4404}
    assert teammate_silent
    assert ">Secret</div>" in owner_delta
    assert 'data-state="completed"' in owner_final and "Secret result" in owner_final


def test_staff_keep_watching_a_run_that_turns_private(
    application, owner, staff, training, monkeypatch, make_run
):
    from channels.db import database_sync_to_async

    monkeypatch.setattr(consumers, "WATCH_SECONDS", 60)
    run = make_run(owner)

    headers = headers_for(staff)

    async def scenario():
        ws = communicator(application, run, headers)
        connected, _ = await ws.connect()
        status = await database_sync_to_async(make_private)(run, owner)
        await publish_async(run, "delta", unsteered="a", steered="b")
        message = await ws.receive_from(TIMEOUT)
        await ws.disconnect()
        return connected, status, message

    connected, status, message = async_to_sync(scenario)()
    assert connected and status == 200 and "beforeend:#steered-output" in message


def test_a_teammates_socket_closes_at_its_next_read_of_a_run_that_turned_private_unannounced(
    application, owner, teammate, training, monkeypatch, make_run
):
    monkeypatch.setattr(consumers, "WATCH_SECONDS", 0.05)
    run = make_run(owner)

    headers = headers_for(teammate)

    async def scenario():
        from channels.db import database_sync_to_async

        ws = communicator(application, run, headers)
        connected, _ = await ws.connect()
        # As if the privacy event were lost: the column changes with no message to the group.
        await database_sync_to_async(SteeringRun.objects.filter(pk=run.pk).update)(private=True)
        closed = await ws.receive_output(TIMEOUT)
        await ws.disconnect()
        return connected, closed

    connected, closed = async_to_sync(scenario)()
    assert connected and closed == {"type": "websocket.close", "code": 4404}


def test_a_stranger_is_refused_a_private_run_as_if_it_did_not_exist(
    application, owner, stranger, training, make_run
):
    private = make_run(owner, private=True)
    unknown = SteeringRun(pk=private.pk + 1000)

    headers = headers_for(stranger)

    async def scenario(run):
        ws = communicator(application, run, headers)
        connected, code = await ws.connect()
        await ws.disconnect()
        return connected, code

    assert async_to_sync(scenario)(private) == (False, 4404)
    assert async_to_sync(scenario)(unknown) == (False, 4404)


def test_an_anonymous_visitor_is_refused(application, owner, training, make_run):
    run = make_run(owner)

    headers = headers_for()

    async def scenario():
        ws = communicator(application, run, headers)
        connected, _ = await ws.connect()
        await ws.disconnect()
        return connected

    assert async_to_sync(scenario)() is False


def test_a_foreign_origin_is_refused(application, owner, training, make_run):
    run = make_run(owner)

    headers = headers_for(owner, origin=(b"origin", b"http://evil.example"))

    async def scenario():
        ws = communicator(application, run, headers)
        connected, _ = await ws.connect()
        await ws.disconnect()
        return connected

    assert async_to_sync(scenario)() is False


def test_a_run_that_finished_before_the_socket_opened_is_sent_at_once(application, owner, training, make_run):
    run = make_run(owner)
    finish(run, status="failed", error="RuntimeError: boom", metrics={})

    headers = headers_for(owner)

    async def scenario():
        ws = communicator(application, run, headers)
        connected, _ = await ws.connect()
        final = await ws.receive_from(TIMEOUT)
        closed = await ws.receive_output(TIMEOUT)
        await ws.disconnect()
        return connected, final, closed

    connected, final, closed = async_to_sync(scenario)()
    assert connected and 'data-state="failed"' in final and "RuntimeError: boom" in final
    assert closed["type"] == "websocket.close"


def test_the_submitting_page_gets_the_events_sent_before_it_connected(
    application, owner, training, monkeypatch, make_run
):
    run = make_run(owner)
    monkeypatch.setattr(wake, "submit", lambda run_id: None)
    url = streaming.open_mailbox(run.pk)  # the view subscribes the mailbox, then submits
    publish(run, "started")
    publish(run, "delta", unsteered="Early", steered="Early")
    publish(run, "delta", unsteered=" bird", steered=" worm")

    headers = headers_for(owner)

    async def scenario():
        ws = communicator(application, run, headers, query=url.split("?", 1)[1])
        connected, _ = await ws.connect()
        received = [await ws.receive_from(TIMEOUT) for _ in range(3)]
        await finish_async(run)
        await publish_async(run, "completed")
        received.append(await ws.receive_from(TIMEOUT))
        await ws.disconnect()
        return connected, received

    connected, received = async_to_sync(scenario)()
    assert connected
    assert "Generating" in received[0]
    assert ">Early</div>" in received[1] and "> worm</div>" in received[2]
    assert 'data-state="completed"' in received[3]


def test_a_token_for_another_run_does_not_open_its_mailbox(
    application, owner, training, monkeypatch, make_run
):
    run, other = make_run(owner), make_run(owner)
    monkeypatch.setattr(wake, "submit", lambda run_id: None)
    url = streaming.open_mailbox(other.pk)
    publish(run, "delta", unsteered="before", steered="before")

    headers = headers_for(owner)

    async def scenario():
        ws = communicator(application, run, headers, query=url.split("?", 1)[1])
        connected, _ = await ws.connect()
        nothing = await ws.receive_nothing(0.3)
        await publish_async(run, "delta", unsteered="after", steered="after")
        message = await ws.receive_from(TIMEOUT)
        await ws.disconnect()
        return connected, nothing, message

    connected, nothing, message = async_to_sync(scenario)()
    assert connected and nothing and ">after</div>" in message


def test_a_failed_run_keeps_the_text_streamed_so_far(application, owner, training, make_run):
    run = make_run(owner)

    headers = headers_for(owner)

    async def scenario():
        ws = communicator(application, run, headers)
        await ws.connect()
        await publish_async(run, "delta", unsteered="Half", steered="Half")
        await ws.receive_from(TIMEOUT)
        await finish_async(
            run,
            status="failed",
            error="Out of memory during generation.",
            unsteered_output="",
            steered_output="",
            metrics={},
        )
        await publish_async(run, "failed", error="Out of memory during generation.")
        final = await ws.receive_from(TIMEOUT)
        await ws.disconnect()
        return final

    final = text(async_to_sync(scenario)())
    assert "Run failed:</strong> Out of memory during generation." in final
    assert '<div id="unsteered-output" class="output-text">Half</div>' in final


def test_a_cancelled_run_ends_the_stream_with_the_text_so_far(application, owner, training, make_run):
    run = make_run(owner)

    headers = headers_for(owner)

    async def scenario():
        ws = communicator(application, run, headers)
        await ws.connect()
        await publish_async(run, "delta", unsteered="Half", steered="Way")
        await ws.receive_from(TIMEOUT)
        await finish_async(
            run,
            status="cancelled",
            error="cancelled by owner",
            unsteered_output="Half",
            steered_output="Way",
            metrics={},
        )
        await publish_async(run, "cancelled", error="cancelled by owner")
        final = await ws.receive_from(TIMEOUT)
        closed = await ws.receive_output(TIMEOUT)
        return final, closed

    final, closed = async_to_sync(scenario)()
    assert 'data-state="cancelled"' in final and "Run cancelled</strong> (cancelled by owner)" in final
    assert '<div id="steered-output" class="output-text">Way</div>' in text(final)
    assert closed["type"] == "websocket.close"


def test_a_run_no_worker_takes_fails_and_the_page_is_told(
    application, owner, training, settings, monkeypatch, make_run
):
    from channels.db import database_sync_to_async

    from steering_app import runs

    settings.STEERLAB_RUN_TIMEOUT = 1
    monkeypatch.setattr(consumers, "WATCH_SECONDS", 0.05)
    run = make_run(owner, created_at=timezone.now() - timezone.timedelta(seconds=5))

    headers = headers_for(owner)

    async def scenario():
        ws = communicator(application, run, headers)
        connected, _ = await ws.connect()
        await database_sync_to_async(runs.sweep_stale)()  # the worker's timer, with no event to the page
        final = await ws.receive_from(TIMEOUT)
        await ws.disconnect()
        return connected, final

    connected, final = async_to_sync(scenario)()
    assert connected and 'data-state="failed"' in final and "no worker available" in final
    run.refresh_from_db()
    assert run.status == SteeringRun.Status.FAILED and run.error == "no worker available"


async def publish_async(run, event, **payload):
    await get_channel_layer().group_send(
        streaming.group_name(run.pk), {"type": "run.event", "run_id": run.pk, "event": event, **payload}
    )


async def finish_async(run, **fields):
    from channels.db import database_sync_to_async

    await database_sync_to_async(finish)(run, **fields)


async def loading_async(model_id: int, percent: int, stage: str = "reading the weights"):
    await get_channel_layer().group_send(
        streaming.LOADING_GROUP,
        {
            "type": "model.loading",
            "model_id": model_id,
            "model": "tiny-llama",
            "percent": percent,
            "stage": stage,
            "seconds": 3,
        },
    )


@pytest.mark.parametrize("mailbox", [False, True], ids=["watching the run", "the owner's submitting page"])
def test_a_waiting_run_shows_its_models_load_progress_until_it_generates(
    application, owner, training, make_run, mailbox
):
    run = make_run(owner, status="running", started_at=timezone.now())  # claimed: its batch loads the model
    model_id = training.model_id
    headers = headers_for(owner)
    query = streaming.open_mailbox(run.pk).split("?", 1)[1] if mailbox else ""

    async def scenario():
        ws = communicator(application, run, headers, query)
        connected, _ = await ws.connect()
        assert connected
        await loading_async(model_id + 1, 10)  # another model's load: not this run's wait
        await loading_async(model_id, 40, "measuring the kernels")
        progress = await ws.receive_from(TIMEOUT)
        await loading_async(model_id, 100, "ready")
        loaded = await ws.receive_from(TIMEOUT)
        await publish_async(run, "delta", unsteered="It", steered="It")
        await ws.receive_from(TIMEOUT)
        await loading_async(model_id, 50)  # a later load (another process's, say) once this run generates
        quiet = await ws.receive_nothing(0.3)
        await ws.disconnect()
        return progress, loaded, quiet

    progress, loaded, quiet = async_to_sync(scenario)()

    assert 'id="run-status"' in progress and 'hx-swap-oob="true"' in progress
    assert "loading tiny-llama … 40 %" in text(progress) and "measuring the kernels · 3 s" in progress
    assert 'id="run-status"' in loaded and "Generating" in loaded and "loading" not in loaded
    assert quiet
