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


def fake_scores(strength: float) -> dict:
    """Made-up scores that rise in concept and fall in fluency with the strength, as steering does."""
    concept, fluency, relevance = min(1.0, 0.1 + 0.2 * abs(strength)), max(0.05, 1 - 0.2 * abs(strength)), 0.9
    return {
        "concept_sae": concept,
        "concept_semantic": 0.0,
        "perplexity_log_ratio": 0.0,
        "repetition": 0.0,
        "relevance_cosine": 0.5,
        "concept": concept,
        "fluency": fluency,
        "relevance": relevance,
        "score": 3 / (1 / concept + 1 / fluency + 1 / relevance),
    }


def sweep_outcome(run, on_step=None, should_stop=None) -> services.Outcome:
    """A completed sweep run: each variant's text names its multiplier, with fake_scores."""
    clean = f"clean {run.prompt} seed {run.seed}"
    variants = [
        {
            "multiplier": multiplier,
            "steered_output": f"x{multiplier:g} {run.prompt}",
            "metrics": {"kl_divergence": multiplier},
            "scores": fake_scores(multiplier),
            "tokens": 4,
        }
        for multiplier in services.multipliers(run)
    ]
    if on_step is not None:
        on_step(clean, variants[0]["steered_output"])
    return services.Outcome(
        unsteered_output=clean,
        steered_output=variants[0]["steered_output"],
        metrics=variants[0]["metrics"],
        timings={},
        variants=variants,
        control_scores=fake_scores(0.0),
        control_tokens=4,
    )
