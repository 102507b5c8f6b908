"""The websockets of the pages: ws/steering/runs/<id>/ streams one run to its readers, and
ws/steering/experiments/<id>/ an experiment's progress to its readers."""

import asyncio
import logging
from urllib.parse import parse_qs

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer
from django.template.loader import render_to_string

from steering_app import experiment_results
from steering_app.experiment_views import DETAIL_TEMPLATE, progress_context
from steering_app.models import Experiment, SteeringRun
from steering_app.presenters import output_id, result_context
from steering_app.streaming import (
    ACCESS_CHANGED,
    LOADING_GROUP,
    experiment_group,
    group_name,
    read_stream_token,
)

logger = logging.getLogger(__name__)

RESULT_TEMPLATE = "steering/_result.html"
LOADING_TEMPLATE = "steering/_loading.html"
# How often an open page checks the database for an end the event stream did not bring (the worker's
# sweep failed the run, or its terminal event was lost): the page must never show "Generating..." forever.
WATCH_SECONDS = 3.0
# An experiment's progress event (streaming.publish_experiment), and the statuses that end its page's watch.
PROGRESS_FIELDS = ("status", "done", "total", "tokens_per_second", "eta_seconds")
FINAL_STATUSES = (Experiment.Status.COMPLETED, Experiment.Status.FAILED, Experiment.Status.CANCELLED)


@database_sync_to_async
def readable_run(user, run_id: int) -> SteeringRun | None:
    """The run as it is now, or None once user may not read it: its owner may make it private at any time."""
    return SteeringRun.objects.visible_to(user).select_related("training").filter(pk=run_id).first()


@database_sync_to_async
def render_final(run: SteeringRun, unsteered: str, streamed: list[str]) -> str:
    return render_to_string(
        f"{RESULT_TEMPLATE}#final", {**result_context(run, unsteered, streamed), "oob": True}
    )


class RunStreamConsumer(AsyncWebsocketConsumer):
    """ws/steering/runs/<id>/: streams one run to those who may read it (SteeringRun.objects.visible_to) as
    HTML for htmx's ws extension; anyone else is refused as if the run did not exist.

    Token deltas are appended out of band to #unsteered-output and each variant's #steered-output(-k); the end of the run
    replaces #run-result with the stored comparison (full text, metrics or the failure) and closes the
    socket. A page that just submitted the run passes ?stream=<token>: it then reads the run's events
    from the mailbox the view subscribed before submitting, so it sees every token from the first.
    A reader who may no longer read the run (its owner made it private: the "access" event, or any later
    read of the run) has the socket closed at once with 4404, as a refused connect, and nothing more sent.
    Until its first token, the run's status line shows the progress of its model's load ("loading SmolLM2 …
    40 %"), which every stream hears (streaming.LOADING_GROUP): a run may wait for a load that another run,
    or the worker's start, began.
    """

    async def connect(self):
        self.run_id = self.scope["url_route"]["kwargs"]["run_id"]
        self.finished = False
        self.generating = False
        self.tasks: list[asyncio.Task] = []
        self.streamed = {"unsteered": "", "variants": []}
        run = await readable_run(self.scope["user"], self.run_id)
        if run is None:  # unknown, or another member's private run: the same answer, as a page's 404
            await self.close(code=4404)
            return
        self.model_id = run.training.model_id
        self.mailbox = self.requested_mailbox()
        if self.mailbox is None:
            await self.channel_layer.group_add(group_name(self.run_id), self.channel_name)
            await self.channel_layer.group_add(LOADING_GROUP, self.channel_name)
        await self.accept()
        # The run may have finished, or turned private, before the socket joined its group: the events that
        # said so are gone, so read it again. The client must never wait forever, nor read a private run.
        run = await self.still_readable()
        if run is None:
            return
        if run.is_finished:
            await self.finish(run)
            return
        if self.mailbox is not None:
            self.tasks.append(asyncio.create_task(self.drain_mailbox()))
        self.tasks.append(asyncio.create_task(self.watch()))

    def requested_mailbox(self) -> str | None:
        query = parse_qs(self.scope.get("query_string", b"").decode())
        token = (query.get("stream") or [""])[0]
        return read_stream_token(token, self.run_id) if token else None

    async def disconnect(self, code):
        for task in getattr(self, "tasks", []):
            task.cancel()
        if getattr(self, "mailbox", None) is None and hasattr(self, "model_id"):
            await self.channel_layer.group_discard(group_name(self.run_id), self.channel_name)
            await self.channel_layer.group_discard(LOADING_GROUP, self.channel_name)

    async def drain_mailbox(self):
        try:
            while not self.finished:
                # run.event -> run_event, model.loading -> model_loading, as for a group's messages
                await self.dispatch(await self.channel_layer.receive(self.mailbox))
        except Exception:  # the channel layer failed; watch() still ends the page when the run ends
            logger.exception("Stream of run %s lost its mailbox", self.run_id)

    async def watch(self):
        while not self.finished:
            await asyncio.sleep(WATCH_SECONDS)
            run = await self.still_readable()
            if run is not None and run.is_finished:
                await self.finish(run)

    async def still_readable(self) -> SteeringRun | None:
        """The run as it is now; None, with the socket closed, once the user may no longer read it."""
        run = await readable_run(self.scope["user"], self.run_id)
        if run is None:
            await self.lose_access()
        return run

    async def run_event(self, message):
        if self.finished:
            return
        event = message.get("event")
        if event == "delta":
            self.generating = True
            unsteered = message.get("unsteered", "")
            variants = message.get("variants") or [message.get("steered", "")]
            self.streamed["unsteered"] += unsteered
            streamed = self.streamed["variants"]
            streamed += [""] * (len(variants) - len(streamed))
            for index, text in enumerate(variants):
                streamed[index] += text
            html = render_to_string(
                f"{RESULT_TEMPLATE}#delta",
                {
                    "unsteered": unsteered,
                    "variants": [(output_id(i), text) for i, text in enumerate(variants)],
                },
            )
            if html.strip():
                await self.send(text_data=html)
        elif event == "started":
            html = render_to_string(
                f"{RESULT_TEMPLATE}#status", {"state": SteeringRun.Status.RUNNING, "status_oob": True}
            )
            await self.send(text_data=html)
        elif event == ACCESS_CHANGED:
            await self.still_readable()
        elif event in (SteeringRun.Status.COMPLETED, SteeringRun.Status.FAILED, SteeringRun.Status.CANCELLED):
            run = await self.still_readable()
            if run is not None:
                await self.finish(run)

    async def model_loading(self, message):
        """A model's load progress: shown while this run waits for its model; at 100 % the run's own status
        (queued or running) is back."""
        if self.finished or self.generating or message.get("model_id") != self.model_id:
            return
        if message["percent"] < 100:
            await self.send(text_data=render_to_string(LOADING_TEMPLATE, message))
            return
        run = await self.still_readable()
        if run is not None and not run.is_finished:
            context = {"state": run.status, "status_oob": True}
            await self.send(text_data=render_to_string(f"{RESULT_TEMPLATE}#status", context))

    async def finish(self, run: SteeringRun):
        if self.finished:
            return
        self.finished = True
        html = await render_final(run, self.streamed["unsteered"], self.streamed["variants"])
        await self.send(text_data=html)
        await self.stop()

    async def lose_access(self):
        """The user may no longer read the run: close as a refused connect does, with nothing more sent."""
        if self.finished:
            return
        self.finished = True
        await self.stop(code=4404)

    async def stop(self, code: int | None = None):
        """Stop reading the run's events and close the socket."""
        if self.mailbox is not None:
            await self.channel_layer.group_discard(group_name(self.run_id), self.mailbox)
            await self.channel_layer.group_discard(LOADING_GROUP, self.mailbox)
        current = asyncio.current_task()
        for task in self.tasks:
            if task is not current:
                task.cancel()
        await self.close(code=code)


@database_sync_to_async
def readable_experiment(user, experiment_id: int) -> Experiment | None:
    """The experiment with its status brought up to date (its cells say), or None when user may not read it
    (or it was deleted)."""
    experiment = Experiment.objects.visible_to(user).filter(pk=experiment_id).first()
    return experiment_results.refresh(experiment) if experiment is not None else None


@database_sync_to_async
def stored_progress(experiment: Experiment) -> dict:
    return {"status": experiment.status, **experiment_results.progress(experiment)}


class ExperimentProgressConsumer(AsyncWebsocketConsumer):
    """ws/steering/experiments/<id>/: an experiment's progress bar, live, for those who may read it
    (Experiment.objects.visible_to); anyone else is refused with 4404, as a page's 404.

    Each "experiment.progress" event of the group (a cell ended) replaces #experiment-progress out of band.
    Once the experiment has ended, the page is sent an element that loads its results in place of the live
    part, and the socket closes. The database is read every WATCH_SECONDS too, so a lost event (or a cell
    that a sweep failed without one) still moves the bar and ends the page.
    """

    async def connect(self):
        self.experiment_id = self.scope["url_route"]["kwargs"]["experiment_id"]
        self.finished = False
        self.sent: dict = {}
        self.watcher: asyncio.Task | None = None
        if await readable_experiment(self.scope["user"], self.experiment_id) is None:
            await self.close(code=4404)
            return
        await self.channel_layer.group_add(experiment_group(self.experiment_id), self.channel_name)
        await self.accept()
        # It may have ended between the page's render and this connect: the event that said so is gone.
        await self.check()
        if not self.finished:
            self.watcher = asyncio.create_task(self.watch())

    async def disconnect(self, code):
        if getattr(self, "watcher", None) is not None:
            self.watcher.cancel()
        if hasattr(self, "experiment_id"):
            await self.channel_layer.group_discard(experiment_group(self.experiment_id), self.channel_name)

    async def watch(self):
        while not self.finished:
            await asyncio.sleep(WATCH_SECONDS)
            await self.check()

    async def check(self):
        """Read the experiment as the database has it: progress, its end, or the reader's lost access."""
        experiment = await readable_experiment(self.scope["user"], self.experiment_id)
        if experiment is None:
            await self.stop(code=4404)
        else:
            await self.show(await stored_progress(experiment))

    async def experiment_progress(self, message):
        await self.show({name: message.get(name) for name in PROGRESS_FIELDS})

    async def show(self, progress: dict):
        if self.finished or progress == self.sent:
            return
        self.sent = progress
        if progress["status"] in FINAL_STATUSES:
            # Only a reader gets the results: the experiment may have been deleted meanwhile.
            if await readable_experiment(self.scope["user"], self.experiment_id) is None:
                await self.stop(code=4404)
                return
            html = render_to_string(f"{DETAIL_TEMPLATE}#load-results", {"experiment_id": self.experiment_id})
            await self.send(text_data=html)
            await self.stop()
            return
        html = render_to_string(
            f"{DETAIL_TEMPLATE}#progress", {"progress": progress_context(progress), "oob": True}
        )
        await self.send(text_data=html)

    async def stop(self, code: int | None = None):
        self.finished = True
        await self.channel_layer.group_discard(experiment_group(self.experiment_id), self.channel_name)
        if self.watcher is not None and self.watcher is not asyncio.current_task():
            self.watcher.cancel()
        await self.close(code=code)
