"""The run stream through the deployment's Redis channel layer (as configured from REDIS_URL)."""

import pytest
from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from channels.testing import WebsocketCommunicator
from django.test import Client

from steering_app import streaming, wake
from steering_app.models import SteeringRun
from steerproject import env
from tests.scaleout.support import REDIS_HOST, REDIS_PORT, redis_client

pytestmark = [pytest.mark.redis, pytest.mark.django_db(transaction=True)]

# Longer than redis-py 8's default socket timeout (5 s): an idle page must keep its stream.
IDLE_SECONDS = 6.5


@pytest.fixture
def redis_layer(settings, redis_db):
    settings.CHANNEL_LAYERS = env.channel_layers(
        {"REDIS_URL": f"redis://{REDIS_HOST}:{REDIS_PORT}/{redis_db}"}
    )
    yield
    redis_client(redis_db)[0].flushdb()


def test_the_submitting_page_streams_through_redis_even_after_idling(
    redis_layer, owner, training, monkeypatch
):
    run = SteeringRun.objects.create(
        owner=owner,
        training=training,
        prompt="Rain?",
        seed=1,
        features=[{"feature_id": 3, "coefficient": 2.0}],
        intervention_layers=[2],
    )
    monkeypatch.setattr(wake, "submit", lambda run_id: None)
    url = streaming.open_mailbox(run.pk)
    group = streaming.group_name(run.pk)
    async_to_sync(get_channel_layer().group_send)(
        group,
        {"type": "run.event", "run_id": run.pk, "event": "delta", "unsteered": "Early", "steered": "Early"},
    )
    client = Client()
    client.force_login(owner)
    headers = [
        (b"origin", b"http://127.0.0.1"),
        (b"cookie", f"sessionid={client.cookies['sessionid'].value}".encode()),
    ]

    async def scenario():
        from steerproject.asgi import application

        ws = WebsocketCommunicator(
            application, f"/ws/steering/runs/{run.pk}/?{url.split('?', 1)[1]}", headers
        )
        connected, _ = await ws.connect()
        early = await ws.receive_from(10)
        idle = await ws.receive_nothing(IDLE_SECONDS, interval=0.5)
        await get_channel_layer().group_send(
            group,
            {
                "type": "run.event",
                "run_id": run.pk,
                "event": "delta",
                "unsteered": " late",
                "steered": " late",
            },
        )
        late = await ws.receive_from(10)
        await ws.disconnect()
        return connected, early, idle, late

    connected, early, idle, late = async_to_sync(scenario)()
    assert connected and ">Early</div>" in early and idle and "> late</div>" in late
