"""A model made ready for runs, with its progress said: the weights, (when a worker starts) its SAEs and the
sentence embedder, then the step plan measured on this machine (tens of seconds on a CPU).

Each stage goes to the log ("loading SmolLM2-135M-Instruct … 40 % (measuring this machine's kernels)") and to
the pages of the runs that wait for the model (streaming.publish_loading); the last report is repeated every
REPEAT_SECONDS, so that a page opened in the middle of a long stage sees it at once.
"""

import functools
import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from steering_app import streaming
from steering_app.models import LanguageModel, Training

if TYPE_CHECKING:
    from steering_app.engine.loader import LoadedModel, Progress

logger = logging.getLogger(__name__)

REPEAT_SECONDS = 1.0
# Where the stages end and begin, as fractions of a load: the weights, then (as a worker starts) the SAEs and the
# embedder, then the step plan, which dominates on a CPU.
WEIGHTS_END, PLAN_START = 0.3, 0.4


class LoadingReport:
    """The progress of one model's load: published and logged as it moves, repeated while it lasts."""

    def __init__(self, model: LanguageModel):
        self.model = model
        self.started = time.monotonic()
        self.last: tuple[int, str] | None = None  # None until a stage is reported: nothing was loading
        self.done = threading.Event()
        self.repeater: threading.Thread | None = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.done.set()
        if self.repeater is not None:
            self.repeater.join()

    def __call__(self, fraction: float, stage: str) -> None:
        report = (min(100, int(fraction * 100)), stage)
        if report == self.last:
            return
        self.last = report
        logger.info("loading %s … %d %% (%s)", self.model.name, *report)
        self.publish()
        if self.repeater is None:
            self.repeater = threading.Thread(target=self.repeat, name="model-loading-report", daemon=True)
            self.repeater.start()

    def within(self, start: float, end: float) -> "Progress":
        """The progress of one stage, mapped onto [start, end] of the whole load."""
        return lambda fraction, stage: self(start + fraction * (end - start), stage)

    def publish(self) -> None:
        if self.last is not None:
            percent, stage = self.last
            seconds = int(time.monotonic() - self.started)
            streaming.publish_loading(self.model.pk, self.model.name, percent, stage, seconds)

    def repeat(self) -> None:
        while not self.done.wait(REPEAT_SECONDS):
            self.publish()


def ready(model: LanguageModel) -> "LoadedModel":
    """The model with its shared step plan (engine/serving/scheduler.py), both made once per process: what a
    model's first run waits for, and what the waiting runs' pages see the progress of."""
    with LoadingReport(model) as report:
        lm = _planned_model(model, report)
        if report.last is not None:
            report(1.0, "ready")
        return lm


def _planned_model(
    model: LanguageModel, report: LoadingReport, extras: Callable[["LoadedModel"], None] | None = None
) -> "LoadedModel":
    """The weights (up to WEIGHTS_END of the report), extras(lm) (up to PLAN_START), then the step plan."""
    from steering_app.engine import loader
    from steering_app.engine.serving.scheduler import has_shared_scheduler, scheduler_for

    lm = loader.load_model(model.source, progress=report.within(0.0, WEIGHTS_END))
    if extras is not None:
        extras(lm)
    with lm.lock:
        # The weights may have come without a plan (a prompt read by the model loads them alone).
        if not has_shared_scheduler(lm):
            report(PLAN_START, "measuring this machine's kernels")
            scheduler_for(lm)
    return lm


def warm() -> None:
    """Load every model that has a completed training, with its SAEs and the sentence embedder, before the first
    run asks: a worker calls it as it starts. A failure is logged; the first run then loads and says why."""
    models = LanguageModel.objects.filter(
        status=LanguageModel.Status.READY, trainings__status=Training.Status.COMPLETED
    ).distinct()
    for model in models:
        try:
            with LoadingReport(model) as report:
                _planned_model(model, report, extras=functools.partial(_saes_and_embedder, model, report))
                report(1.0, "ready")
            logger.info("%s is ready (%.0f s)", model.name, time.monotonic() - report.started)
        except Exception:
            logger.exception("Loading %s before the first run failed", model.name)


def _saes_and_embedder(model: LanguageModel, report: LoadingReport, lm: "LoadedModel") -> None:
    """Loaded before the plan, which holds the model's lock while it measures: a search by meaning needs the
    embedder, not the plan."""
    from steering_app.engine import loader

    report(WEIGHTS_END, "loading the SAEs and the sentence embedder")
    for training in model.trainings.completed():
        loader.load_sae_cached(training.checkpoint_path, lm)
    loader.get_embedder()
