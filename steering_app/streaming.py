"""A run's (and an experiment's) events on the channel layer: who listens (the run's group), what is sent, and stream tokens.

The worker publishes every event of a run to the group `steering-run-<id>`; the websocket consumer
forwards them to the browser. A page that has just submitted a run connects only after the response,
while tokens may already flow: open_mailbox() subscribes a mailbox channel to the group before the run is
submitted, and the signed stream token in the socket's URL tells the consumer to drain that mailbox.
"""

import uuid

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.core import signing

STREAM_SALT = "steering.run-stream"
STREAM_TOKEN_MAX_AGE = 600
# The run's readers changed: each websocket checks whether its user may still read the run.
ACCESS_CHANGED = "access"
# Every run stream listens here: a model's load progress, shown by the pages whose run waits for that model.
LOADING_GROUP = "model-loading"


def group_name(run_id: int) -> str:
    return f"steering-run-{run_id}"


def publish(run_id: int, event: str, payload: dict) -> None:
    """Send one run event to everyone watching the run; called from sync worker code."""
    message = {"type": "run.event", "run_id": run_id, "event": event, **payload}
    async_to_sync(get_channel_layer().group_send)(group_name(run_id), message)


def publish_loading(model_id: int, model: str, percent: int, stage: str, seconds: int) -> None:
    """Send a model's load progress (seconds: since the load began) to every open run stream; called from sync
    worker code."""
    message = {
        "type": "model.loading",
        "model_id": model_id,
        "model": model,
        "percent": percent,
        "stage": stage,
        "seconds": seconds,
    }
    async_to_sync(get_channel_layer().group_send)(LOADING_GROUP, message)


def experiment_group(experiment_id: int) -> str:
    return f"experiment-{experiment_id}"


def publish_experiment(experiment_id: int, payload: dict) -> None:
    """Send an experiment's progress ({status, done, total, tokens_per_second, eta_seconds}) to its watchers."""
    message = {"type": "experiment.progress", "experiment_id": experiment_id, **payload}
    async_to_sync(get_channel_layer().group_send)(experiment_group(experiment_id), message)


def stream_url(run_id: int, token: str = "") -> str:
    url = f"/ws/steering/runs/{run_id}/"
    return f"{url}?stream={token}" if token else url


def open_mailbox(run_id: int) -> str:
    """Subscribe a fresh mailbox to the run's events and to the models' load progress; returns the websocket URL
    that drains it."""
    mailbox = f"steering-mailbox.{uuid.uuid4().hex}"
    layer = get_channel_layer()
    async_to_sync(layer.group_add)(group_name(run_id), mailbox)
    async_to_sync(layer.group_add)(LOADING_GROUP, mailbox)
    token = signing.dumps({"run": run_id, "mailbox": mailbox}, salt=STREAM_SALT)
    return stream_url(run_id, token)


def read_stream_token(token: str, run_id: int) -> str | None:
    """The mailbox a stream token names, when it is genuine, fresh and for this run."""
    try:
        data = signing.loads(token, salt=STREAM_SALT, max_age=STREAM_TOKEN_MAX_AGE)
    except signing.BadSignature:
        return None
    if not isinstance(data, dict) or data.get("run") != run_id:
        return None
    return data.get("mailbox")
