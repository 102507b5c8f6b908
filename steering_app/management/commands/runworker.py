"""channels' runworker, plus the stale-run sweep on a timer when it serves the steering worker channel.

`python manage.py runworker steering-worker` is the scale-out worker (README, "Scale out"). Its consumer
only wakes on messages, so a thread sweeps stale runs as the worker starts and every few seconds after; another
loads the models meanwhile (worker.start_warming).
"""

from channels.management.commands import runworker

from steering_app import worker


class Command(runworker.Command):
    def handle(self, *args, **options):
        if worker.WORKER_CHANNEL in options["channels"]:
            worker.start_sweeper_thread()
            worker.start_warming()
        super().handle(*args, **options)
