"""manage.py import_vectors: a control-vector file, or a SteerLab vector-space directory, as a vector space.

The file reader (engine.control_vectors.read_file) is stood in for by a tiny reader of {layer: tensor} .pt files
that refuses a wrong width or NaN as the real one does: this module checks what the command does with what a
reader gives or refuses; the formats are tests/engine's."""

import shutil
import sys
import types

import pytest
import torch
from django.core.management import call_command
from django.core.management.base import CommandError

import steering_app.engine
from steering_app import engine_config
from steering_app.engine.demo import DEMO_CHECKPOINT
from steering_app.engine.vectors import load_concepts
from steering_app.management.commands.bootstrap_demo import DEMO_VECTORS
from steering_app.models import Feature, Training


class ControlVectorError(ValueError):
    pass


def read_file(path, n_embd, num_layers):
    vectors = torch.load(path)
    for layer, vector in vectors.items():
        if vector.shape != (n_embd,):
            raise ControlVectorError(
                f"direction.{layer} has {vector.shape[0]} values; the model's n_embd is {n_embd}"
            )
        if not torch.isfinite(vector).all():
            raise ControlVectorError(f"direction.{layer} holds NaN or infinite values")
    return vectors


@pytest.fixture(autouse=True)
def reader(monkeypatch):
    stub = types.SimpleNamespace(ControlVectorError=ControlVectorError, read_file=read_file)
    monkeypatch.setitem(sys.modules, "steering_app.engine.control_vectors", stub)
    monkeypatch.setattr(steering_app.engine, "control_vectors", stub, raising=False)


@pytest.fixture
def vectors_dir(monkeypatch, tmp_path):
    """Where the command writes checkpoints: <data dir>/vectors of the test's own."""
    monkeypatch.setattr(engine_config.current, "data_dir", str(tmp_path))
    return tmp_path / "vectors"


def vector_file(tmp_path, name="honesty.pt", width=16, layers=(1, 2), scale=1.0):
    vectors = {layer: torch.full((width,), scale * (layer + 1)) for layer in layers}
    path = tmp_path / name
    torch.save(vectors, path)
    return path


def run(*args) -> None:
    call_command("import_vectors", *[str(arg) for arg in args])


def test_it_imports_a_file_as_a_new_space_named_after_it(language_model, vectors_dir, tmp_path):
    run(vector_file(tmp_path), "--model", language_model.name, "--description", "Says what is true")
    space = Training.objects.get()
    assert (space.encoder_type, space.status, space.d_in, space.d_sae, space.hook_layer) == (
        "vectors",
        "completed",
        16,
        1,
        2,  # the layer with the largest vector
    )
    assert space.checkpoint_path.startswith(str(vectors_dir / f"{space.pk}-import-"))
    assert space.label == f"vectors: honesty • {language_model.name}"
    feature = space.features.get()
    assert (feature.index, feature.label, feature.description, feature.max_activation) == (
        0,
        "honesty",
        "Says what is true",
        1.0,
    )
    (concept,), reading_layer = load_concepts(space.checkpoint_path)
    assert reading_layer == 2
    expected = torch.zeros(4, 16)
    expected[1], expected[2] = 2.0, 3.0
    assert torch.equal(concept.vectors, expected)
    assert space.stats["concepts"][0]["imported_from"] == str(tmp_path / "honesty.pt")


def test_it_adds_a_file_to_a_space_under_the_name_given(language_model, vectors_dir, tmp_path):
    run(vector_file(tmp_path), "--model", language_model.name)
    space = Training.objects.get()
    first_checkpoint = space.checkpoint_path
    run(vector_file(tmp_path, "other.pt", scale=-1.0), "--training", space.pk, "--name", "lying")
    space.refresh_from_db()
    assert (space.d_sae, space.hook_layer) == (2, 2)
    assert list(space.features.values_list("index", "label")) == [(0, "honesty"), (1, "lying")]
    assert space.checkpoint_path != first_checkpoint
    concepts, _layer = load_concepts(space.checkpoint_path)
    assert [concept.name for concept in concepts] == ["honesty", "lying"]
    assert torch.equal(concepts[1].vectors[2], torch.full((16,), -3.0))
    assert space.label == f"vectors: honesty, lying • {language_model.name}"


def test_it_imports_a_vector_space_directory_whole(smollm2_row, vectors_dir):
    run(DEMO_VECTORS, "--model", smollm2_row.name)
    space = Training.objects.get()
    assert (space.d_sae, space.hook_layer, space.d_in) == (2, 10, 576)
    assert list(space.features.values_list("label", flat=True)) == ["planet", "cake"]
    shipped, _layer = load_concepts(DEMO_VECTORS)
    copied, _layer = load_concepts(space.checkpoint_path)
    for ours, theirs in zip(copied, shipped, strict=True):
        assert torch.equal(ours.vectors, theirs.vectors) and ours.separation == theirs.separation
    assert space.stats["concepts"][1]["best_layer"] == shipped[1].best_layer


@pytest.mark.parametrize(
    ("file_options", "words"),
    [
        ({"width": 8}, "honesty.pt: direction.1 has 8 values; the model's n_embd is 16"),
        ({"scale": float("nan")}, "NaN"),
    ],
)
def test_it_refuses_what_the_reader_refuses_and_creates_nothing(
    language_model, vectors_dir, tmp_path, file_options, words
):
    with pytest.raises(CommandError, match=words):
        run(vector_file(tmp_path, **file_options), "--model", language_model.name)
    assert not Training.objects.exists() and not Feature.objects.exists()
    assert not vectors_dir.exists() or not any(vectors_dir.iterdir())


def test_it_refuses_bad_arguments_and_creates_nothing(
    language_model, training, smollm2_row, vectors_dir, tmp_path
):
    path = vector_file(tmp_path)
    run(path, "--model", language_model.name)
    space = Training.objects.get(encoder_type="vectors")
    sae_copy = tmp_path / "sae"
    shutil.copytree(DEMO_CHECKPOINT, sae_copy)
    cases = [
        ((path,), "Give --model NAME"),
        ((path, "--model", "nope"), "No model named 'nope'"),
        ((tmp_path / "missing.pt", "--model", language_model.name), "missing.pt does not exist"),
        ((path, "--training", 9999), "Training 9999 does not exist"),
        ((path, "--training", training.pk), f"Training {training.pk} is not a completed vector space"),
        ((path, "--training", space.pk, "--model", smollm2_row.name), f"belongs to {language_model.name}"),
        ((path, "--training", space.pk, "--name", "HONESTY"), "already has a concept named 'honesty'"),
        ((path, "--model", language_model.name, "--name", " "), "--name is empty"),
        (
            (DEMO_VECTORS, "--model", language_model.name),
            r"concept 'planet' has vectors of shape \[30, 576\]",
        ),
        ((DEMO_VECTORS, "--model", smollm2_row.name, "--name", "x"), "--name is for a single file"),
        ((sae_copy, "--model", smollm2_row.name), "architecture 'topk', not a vector space"),
        ((tmp_path, "--model", smollm2_row.name), "no readable cfg.json"),
    ]
    for args, words in cases:
        with pytest.raises(CommandError, match=words):
            run(*args)
    assert list(Training.objects.values_list("pk", flat=True).order_by("pk")) == sorted(
        [training.pk, space.pk]
    )
    space.refresh_from_db()
    assert space.d_sae == 1 and space.features.count() == 1
    assert len(list(vectors_dir.iterdir())) == 1
