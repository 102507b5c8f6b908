import json

from channels.consumer import SyncConsumer
from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer

from steering_app.models import SteeringRun
from steering_app.worker import WORKER_CHANNEL, execute_run, group_name

__all__ = ["WORKER_CHANNEL", "RunStreamConsumer", "SteeringWorkerConsumer"]


class SteeringWorkerConsumer(SyncConsumer):
    """`python manage.py runworker steering-worker`: executes the runs sent to the worker channel."""

    def run_steering(self, message):
        execute_run(message["run_id"])


@database_sync_to_async
def visible_run(user, run_id: int) -> SteeringRun | None:
    if not user.is_authenticated:
        return None
    runs = SteeringRun.objects.all() if user.is_staff else SteeringRun.objects.filter(owner=user)
    return runs.filter(pk=run_id).first()


class RunStreamConsumer(AsyncWebsocketConsumer):
    """ws/steering/runs/<id>/: streams one run's events to its owner (or staff)."""

    async def connect(self):
        run_id = self.scope["url_route"]["kwargs"]["run_id"]
        run = await visible_run(self.scope["user"], run_id)
        if run is None:
            await self.close(code=4403)
            return
        self.group = group_name(run_id)
        await self.channel_layer.group_add(self.group, self.channel_name)
        await self.accept()
        # The run may have finished before the socket opened: tell the client so it never waits forever.
        run = await database_sync_to_async(SteeringRun.objects.get)(pk=run_id)
        if run.is_finished:
            await self.send_event({"event": run.status, "run_id": run_id, "error": run.error})

    async def disconnect(self, code):
        if hasattr(self, "group"):
            await self.channel_layer.group_discard(self.group, self.channel_name)

    async def run_event(self, message):
        await self.send_event(message)

    async def send_event(self, message):
        payload = {key: value for key, value in message.items() if key != "type"}
        await self.send(text_data=json.dumps(payload))
