"""Fixtures of the steering app's tests: stored runs in the `training` feature space (tests/conftest.py)."""

import pytest

from steering_app.models import LanguageModel, SteeringRun
from tests.migrations import migrate_to_latest


@pytest.fixture
def in_memory_channel_layer(settings):
    """Channels' in-memory layer: websocket tests run without Redis (use with pytest.mark.usefixtures)."""
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}


@pytest.fixture
def application():
    """The project's ASGI application, for WebsocketCommunicator."""
    from steerproject.asgi import application

    return application


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


@pytest.fixture
def data_dir(settings, tmp_path):
    """A data dir of its own, as a deployment's: the database and the secret key beside an empty datasets/."""
    path = tmp_path / "data"
    (path / "datasets").mkdir(parents=True)
    (path / "secret_key").write_text("the-deployments-secret-key\n")
    (path / "steerlab.sqlite3").write_text("SQLite format 3")
    settings.STEERLAB_DATA_DIR = path
    return path


@pytest.fixture
def dataset_dir(settings, tmp_path):
    """A dataset root (STEERLAB_DATASET_DIRS) for the corpora a test writes: jobs read no corpus elsewhere."""
    path = tmp_path / "corpora"
    path.mkdir()
    settings.STEERLAB_DATASET_DIRS = [path]
    return path


@pytest.fixture
def back_to_latest():
    """Whatever a migration test does, the schema ends at the latest migration: the tests after it need every
    table."""
    yield
    migrate_to_latest()


@pytest.fixture
def fake_engine(monkeypatch, language_model):
    """Vector jobs without the model, on language_model's shape (tests/vector_stand_ins.py); returns the calls to
    make_concept."""
    # Imported here: the engine brings torch, which most of these tests never need.
    from tests.vector_stand_ins import use_vector_engine

    return use_vector_engine(monkeypatch, language_model.num_layers, language_model.hidden_size)
