"""A conversation's turn streams over its run's websocket under the conversation's reading rule: a private
conversation's turns are refused to other members as if they did not exist, and a teammate watching a turn is cut
off as soon as the owner makes the conversation private."""

import pytest
from asgiref.sync import async_to_sync
from django.test import Client

from steering_app import consumers, wake
from steering_app.models import Conversation
from tests.steering.test_consumers import ORIGIN, TIMEOUT, communicator, cookie_for, publish_async

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("in_memory_channel_layer")]


@pytest.fixture
def turn_of(training, make_run):
    """turn_of(owner, private) -> the running first turn of a new conversation of `owner`."""

    def make(owner, private: bool):
        conversation = Conversation.objects.create(
            owner=owner, training=training, private=private, chat=True, intervention_layers=[2]
        )
        return make_run(
            owner, conversation=conversation, turn=1, private=private, status="running", chat=True
        )

    return make


def connect(application, run, user):
    headers = [ORIGIN, cookie_for(user)]

    async def scenario():
        ws = communicator(application, run, headers)
        connected, code = await ws.connect()
        await ws.disconnect()
        return connected, code

    return async_to_sync(scenario)()


def test_a_private_conversations_turn_is_refused_to_a_teammate_and_a_shared_ones_is_not(
    application, owner, teammate, turn_of
):
    assert connect(application, turn_of(owner, private=True), teammate) == (False, 4404)
    assert connect(application, turn_of(owner, private=True), owner)[0]
    assert connect(application, turn_of(owner, private=False), teammate)[0]


def test_a_teammate_watching_a_turn_is_cut_off_when_the_conversation_turns_private(
    application, owner, teammate, turn_of, monkeypatch
):
    from channels.db import database_sync_to_async

    monkeypatch.setattr(
        consumers, "WATCH_SECONDS", 60
    )  # the privacy event must close it, not a periodic read
    monkeypatch.setattr(wake, "submit", lambda run_id: None)
    run = turn_of(owner, private=False)
    headers = [ORIGIN, cookie_for(teammate)]

    def make_private() -> int:
        client = Client()
        client.force_login(owner)
        url = f"/api/conversations/{run.conversation_id}"
        return client.patch(url, {"private": True}, content_type="application/json").status_code

    async def scenario():
        ws = communicator(application, run, headers)
        assert (await ws.connect())[0]
        await publish_async(run, "delta", unsteered="Shared", steered="Shared")
        before = await ws.receive_from(TIMEOUT)
        status = await database_sync_to_async(make_private)()
        closed = await ws.receive_output(TIMEOUT)
        await ws.disconnect()
        return before, status, closed

    before, status, closed = async_to_sync(scenario)()
    assert ">Shared</div>" in before
    assert status == 200
    assert closed == {"type": "websocket.close", "code": 4404}
