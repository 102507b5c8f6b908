"""API fixtures: bearer tokens, a stubbed worker, runs in each state. Users and trainings come from tests/conftest.py."""

import pytest
from django.utils import timezone

from steering_app import services
from steering_app.models import ApiToken, SteeringRun
from tests.fake_engine import use_engine

FAKE_METRICS = {
    "kl_divergence": 0.25,
    "perplexity_delta": 1.5,
    "perplexity_unsteered": 3.0,
    "perplexity_steered": 4.5,
    "semantic_similarity": 0.9,
    "word_overlap": 0.5,
    "feature_activation": [{"feature_id": 3, "unsteered": 0.1, "steered": 2.0, "steered_in_run": 2.5}],
}


# What fake_engine's "features active on this prompt" finds, whatever the prompt.
FAKE_LATENT = {"index": 3, "activation": 2.5, "token": " rain"}


@pytest.fixture
def bearer(db):
    """bearer(user) -> headers that authenticate as the user with a fresh API token."""

    def headers(user) -> dict:
        _, raw = ApiToken.issue(user, "tests")
        return {"Authorization": f"Bearer {raw}"}

    return headers


@pytest.fixture
def fake_engine(monkeypatch, settings):
    """Runs execute at once in the request's thread, with canned outputs instead of a model; so does the search
    for features active on a prompt."""
    settings.STEERLAB_WORKER_MODE = "inline"

    def execute(run, on_step, should_stop=None):
        return services.Outcome(
            f"clean: {run.prompt}", f"steered: {run.prompt}", FAKE_METRICS, {"generate_s": 0.01}
        )

    use_engine(monkeypatch, execute)
    monkeypatch.setattr(services, "active_latents", lambda training, prompt, chat, limit: [FAKE_LATENT])


@pytest.fixture
def failing_engine(monkeypatch, settings):
    """failing_engine(error): the inline worker's engine raises `error`."""
    settings.STEERLAB_WORKER_MODE = "inline"

    def use(error: Exception):
        def execute(run, on_step, should_stop=None):
            raise error

        use_engine(monkeypatch, execute)

    return use


@pytest.fixture
def generate_body(training):
    return {
        "training_id": training.pk,
        "model_id": training.model_id,
        "prompt": "The weather today is",
        "features": [{"feature_id": 3, "coefficient": 2.0}],
        "intervention_layers": [2],
        "temperature": 0.0,
        "max_tokens": 8,
        "seed": 7,
    }


@pytest.fixture
def make_run(training):
    """make_run(user, **fields) -> a stored run; completed with outputs unless fields say otherwise."""

    def make(user, **fields) -> SteeringRun:
        values = {
            "owner": user,
            "training": training,
            "prompt": "Once upon a time",
            "features": [{"feature_id": 3, "coefficient": 1.0}],
            "intervention_layers": [2],
            "seed": 11,
            "status": SteeringRun.Status.COMPLETED,
            "unsteered_output": "clean",
            "steered_output": "steered",
            "metrics": FAKE_METRICS,
            "started_at": timezone.now(),
            "finished_at": timezone.now(),
        }
        values.update(fields)
        return SteeringRun.objects.create(**values)

    return make


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
    """schemathesis names each operation's test `test_...[GET /api/...]` after pytest has made its id from the plain
    name (pytest 9 no longer lets it rename the id), so all 41 shared one id: pytest-xdist ran one of them and
    dropped the rest. Each gets the id of its own name back."""
    for item in items:
        if item.nodeid.rpartition("::")[2] != item.name:
            item._id = item.parent.id.child(item.name)
