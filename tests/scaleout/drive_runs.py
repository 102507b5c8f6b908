"""Create COUNT steering runs, hand them all to the worker channel at once, wait for them to finish.

Run as `python tests/scaleout/drive_runs.py COUNT SECONDS` with the deployment's environment (DATABASE_URL,
REDIS_URL). Prints one JSON line: every run's id, status, error and the worker that executed it.
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

from steering_app import runs, worker
from steering_app.models import Feature, SteeringRun, Training
from steering_app.runs import RunRequest
from steering_app.steering_settings import SteeringSettings


def main(count: int, seconds: float) -> None:
    assert worker.mode() == "channel", "REDIS_URL must be set: runs go to runworker processes"
    user = get_user_model().objects.get(username="alice")
    training = Training.objects.filter(status=Training.Status.COMPLETED).first()
    feature = Feature.objects.filter(training=training).order_by("index").first()
    steering = SteeringSettings(
        features=[{"feature_id": feature.index, "coefficient": 2.0}],
        layers=[training.hook_layer],
        max_tokens=6,
    )
    created = [
        runs.create(
            user, RunRequest(training.pk, f"Run {i}: the weather in the mountains is", steering, seed=i)
        )
        for i in range(count)
    ]
    for run in created:  # all at once, before any of them can finish
        runs.submit(run)
    ids = [run.pk for run in created]
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not SteeringRun.objects.filter(pk__in=ids).exclude(status__in=["completed", "failed"]).exists():
            break
        time.sleep(0.5)
    report = [
        {
            "id": run.pk,
            "status": run.status,
            "error": run.error,
            "worker": run.worker,
            "steered": run.steered_output,
        }
        for run in SteeringRun.objects.filter(pk__in=ids).order_by("pk")
    ]
    print(json.dumps(report))


if __name__ == "__main__":
    main(int(sys.argv[1]), float(sys.argv[2]))
