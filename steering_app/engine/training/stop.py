"""Cooperative stop for every training step: a stop() callback checked between batches.

A stop() that returns True raises TrainingInterrupted; KeyboardInterrupt is never caught, so it passes
through untouched.
"""

from __future__ import annotations

from collections.abc import Callable

StopCheck = Callable[[], bool] | None


class TrainingInterrupted(RuntimeError):
    """stop() asked the training to end before it finished."""


def check_stop(stop: StopCheck) -> None:
    """Raise TrainingInterrupted when stop() says so (stop None: never)."""
    if stop is not None and stop():
        raise TrainingInterrupted("training interrupted")
