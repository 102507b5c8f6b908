"""Fixtures of the steering app's tests: stored runs in the `training` feature space (tests/conftest.py)."""

import pytest

from steering_app.models import LanguageModel, SteeringRun


@pytest.fixture
def make_run(training):
    """make_run(owner, **fields) -> a stored run, queued unless fields say otherwise."""

    def make(owner, **fields) -> SteeringRun:
        values = {
            "owner": owner,
            "training": training,
            "prompt": "Tell me about rain",
            "features": [{"feature_id": 3, "coefficient": 2.0}],
            "intervention_layers": [2],
            "seed": 42,
        }
        values.update(fields)
        return SteeringRun.objects.create(**values)

    return make


@pytest.fixture
def smollm2_row(db):
    """A model row of SmolLM2-135M's shape (hidden 576, 30 layers), for importing SAEs; no weights load."""
    return LanguageModel.objects.create(
        name="smollm2",
        source="/nonexistent/smollm2",
        architecture="LlamaForCausalLM",
        num_layers=30,
        hidden_size=576,
    )
