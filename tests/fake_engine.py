"""A stand-in engine for tests of a run's life: canned outcomes instead of a model.

use_engine(monkeypatch, execute) makes every worker batch a SerialBatch around
execute(run, on_step, should_stop) -> services.Outcome, where on_step(unsteered_delta, steered_delta)
streams and raising services.Cancelled means the run stopped.
"""

from steering_app import services


class SerialBatch:
    """services.EngineBatch's protocol, one run at a time: step() runs the admitted run to its end."""

    def __init__(self, execute):
        self.execute = execute
        self.admitted = None

    @property
    def active(self) -> bool:
        return self.admitted is not None

    def accepts(self, run) -> bool:
        return False  # the worker finishes this run before it claims the next

    def admit(self, run, on_step, should_stop) -> bool:
        self.admitted = (run, on_step, should_stop)
        return True

    def step(self):
        run, on_step, should_stop = self.admitted
        self.admitted = None
        try:
            return [
                (
                    run,
                    self.execute(run, lambda unsteered, steered: on_step(unsteered, [steered]), should_stop),
                )
            ]
        except Exception as error:  # noqa: BLE001 - the engine's error ends the run, as EngineBatch's does
            return [(run, error)]

    def abandon(self):
        runs = [self.admitted[0]] if self.admitted else []
        self.admitted = None
        return runs


def use_engine(monkeypatch, execute) -> None:
    monkeypatch.setattr(services, "batch_for", lambda run: SerialBatch(execute))
