"""Create, resume and read an experiment as the lab deployment's web processes do (experiments.py).

Run with the deployment's environment (DATABASE_URL, REDIS_URL), so that the experiment's "work is waiting"
messages go to the runworker processes. Each command prints one JSON line:

    python tests/scaleout/drive_experiment.py create USERNAME '{"prompts": [...], "strengths": [0, 1, 2], ...}'
        -> {"experiment", "feature", "cells", "outputs"}: one condition on the demo's "planet" feature (#1681)
           when the training has it, else its first feature; the JSON's other keys are ExperimentRequest's
    python tests/scaleout/drive_experiment.py resume ID
        -> {"resumed": cells queued again, "status"}
    python tests/scaleout/drive_experiment.py status ID [STATUS,STATUS... SECONDS]
        -> the experiment as its page reads it (status refreshed from its cells), its cells and its outputs;
           with statuses and seconds, once its status is one of them or after the seconds, whichever is first
"""

import json
import os
import sys
import time
from pathlib import Path

import django

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "steerproject.settings")
django.setup()

from django.contrib.auth import get_user_model

from steering_app import experiment_results, experiments, worker
from steering_app.experiments import ExperimentRequest
from steering_app.models import Experiment, Feature, SteeringRun, Training

PREFERRED_FEATURE = 1681  # the demo's "planet" feature (DESIGN.md: on topic at c = 1 and 2)
POLL_SECONDS = 0.5


def create(username: str, options: dict) -> dict:
    assert worker.mode() == "channel", "REDIS_URL must be set: cells go to runworker processes"
    training = Training.objects.filter(status=Training.Status.COMPLETED).first()
    features = Feature.objects.filter(training=training)
    feature = features.filter(index=PREFERRED_FEATURE).first() or features.order_by("index").first()
    coefficient = options.pop("coefficient", 2.0)
    request = ExperimentRequest(
        training_id=training.pk,
        conditions=[{"features": [{"feature_id": feature.index, "coefficient": coefficient}]}],
        intervention_layers=[training.hook_layer],
        **options,
    )
    experiment = experiments.create(get_user_model().objects.get(username=username), request)
    return {
        "experiment": experiment.pk,
        "feature": feature.index,
        "cells": experiment.total_cells,
        "outputs": experiment.total_outputs,
    }


def resume(experiment_id: int) -> dict:
    experiment = Experiment.objects.get(pk=experiment_id)
    resumed = experiments.resume(experiment, experiment.owner)
    return {"resumed": resumed, "status": experiment.status}


def status(experiment_id: int, until: set[str] | None = None, seconds: float = 0.0) -> dict:
    deadline = time.monotonic() + seconds
    experiment = Experiment.objects.get(pk=experiment_id)
    while True:
        experiment_results.refresh(experiment)  # what the page and the API do before they read it
        if not until or experiment.status in until or time.monotonic() >= deadline:
            break
        time.sleep(POLL_SECONDS)
    cells = SteeringRun.objects.filter(experiment=experiment).order_by("id")
    return {
        "status": experiment.status,
        "error": experiment.error,
        "progress": experiment_results.progress(experiment),
        "cells": [
            {
                "id": run.pk,
                "status": run.status,
                "worker": run.worker,
                "error": run.error,
                "cell": [run.cell_condition, run.cell_prompt, run.seed],
            }
            for run in cells
        ],
        "results": [
            {
                "id": row.pk,
                "run": row.run_id,
                "output": [row.condition, row.prompt_index, row.seed, row.strength],
                "text": row.text,
            }
            for row in experiment.results.order_by("id")
        ],
    }


def main(argv: list[str]) -> dict:
    command, *args = argv
    if command == "create":
        return create(args[0], json.loads(args[1]))
    if command == "resume":
        return resume(int(args[0]))
    if command == "status":
        if len(args) == 1:
            return status(int(args[0]))
        return status(int(args[0]), set(args[1].split(",")), float(args[2]))
    raise SystemExit(f"unknown command {command!r}: create, resume or status")


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])))
