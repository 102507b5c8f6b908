"""manage.py import_vectors: a control-vector file, or a SteerLab vector-space directory, as a vector space.

Files are read by engine.control_vectors (its formats and refusals are tests/engine's); this module checks what
the command makes of what the reader gives or refuses: one transaction, nothing left behind on an error."""

import shutil

import numpy as np
import pytest
import torch
from django.core.management import call_command
from django.core.management.base import CommandError

from steering_app import engine_config
from steering_app.engine.control_vectors import write_gguf
from steering_app.engine.demo import DEMO_CHECKPOINT, DEMO_VECTOR_SPACE
from steering_app.engine.vectors import load_concepts
from steering_app.models import Feature, Training


@pytest.fixture
def vectors_dir(monkeypatch, tmp_path):
    """Where the command writes checkpoints: <data dir>/vectors of the test's own."""
    monkeypatch.setattr(engine_config.current, "data_dir", str(tmp_path))
    return tmp_path / "vectors"


def vector_file(tmp_path, name="honesty.gguf", width=16, layers=(1, 2), scale=1.0):
    """A llama.cpp control vector with direction.N = scale * (N + 1) everywhere, for each layer given."""
    path = tmp_path / name
    write_gguf(
        path, {layer: torch.full((width,), scale * (layer + 1)) for layer in layers}, model_hint="llama"
    )
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
    assert space.stats["concepts"][0]["imported_from"] == str(tmp_path / "honesty.gguf")


def test_it_adds_a_file_to_a_space_under_the_name_given(language_model, vectors_dir, tmp_path):
    run(vector_file(tmp_path), "--model", language_model.name)
    space = Training.objects.get()
    first_checkpoint = space.checkpoint_path
    per_layer = tmp_path / "other.npy"
    np.save(per_layer, -torch.arange(1.0, 5.0).repeat_interleave(16).reshape(4, 16).numpy())
    run(per_layer, "--training", space.pk, "--name", "lying")
    space.refresh_from_db()
    assert (space.d_sae, space.hook_layer) == (2, 2)
    assert list(space.features.values_list("index", "label")) == [(0, "honesty"), (1, "lying")]
    assert space.checkpoint_path != first_checkpoint
    concepts, _layer = load_concepts(space.checkpoint_path)
    assert [concept.name for concept in concepts] == ["honesty", "lying"]
    assert torch.equal(concepts[1].vectors[2], torch.full((16,), -3.0))
    assert space.label == f"vectors: honesty, lying • {language_model.name}"


def test_it_imports_a_vector_space_directory_whole(smollm2_row, vectors_dir):
    run(DEMO_VECTOR_SPACE, "--model", smollm2_row.name)
    space = Training.objects.get()
    assert (space.d_sae, space.hook_layer, space.d_in) == (2, 11, 576)
    assert list(space.features.values_list("label", flat=True)) == ["planet", "cake"]
    shipped, _layer = load_concepts(DEMO_VECTOR_SPACE)
    copied, _layer = load_concepts(space.checkpoint_path)
    for ours, theirs in zip(copied, shipped, strict=True):
        assert torch.equal(ours.vectors, theirs.vectors) and ours.separation == theirs.separation
    assert space.stats["concepts"][1]["best_layer"] == shipped[1].best_layer


def test_it_refuses_what_the_reader_refuses_and_creates_nothing(language_model, vectors_dir, tmp_path):
    nan = tmp_path / "nan.pt"
    torch.save(torch.full((4, 16), float("nan")), nan)
    short = tmp_path / "short.pt"
    torch.save(torch.ones(3, 16), short)
    cases = [
        (vector_file(tmp_path, width=8), "honesty.gguf, layer 1: a vector of 8 values .* n_embd is 16"),
        (nan, "nan.pt, layer 0: 16 NaN or infinite values"),
        (short, r"short.pt: 3 vectors for a model of 4 layers \(missing layers 3\)"),
        (
            vector_file(tmp_path, "deep.gguf", layers=(1, 7)),
            "deep.gguf, layer 7: the model has blocks 0 to 3",
        ),
    ]
    for path, words in cases:
        with pytest.raises(CommandError, match=words):
            run(path, "--model", language_model.name)
    assert not Training.objects.exists() and not Feature.objects.exists()
    assert not vectors_dir.exists()


def damaged_space(tmp_path):
    """The demo's vector space with its tensors file overwritten."""
    damaged = tmp_path / "damaged"
    shutil.copytree(DEMO_VECTOR_SPACE, damaged)
    (damaged / "vectors.safetensors").write_bytes(b"not a safetensors file")
    return damaged


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
            (DEMO_VECTOR_SPACE, "--model", language_model.name),
            r"concept 'planet' has vectors of shape \[30, 576\]",
        ),
        ((DEMO_VECTOR_SPACE, "--model", smollm2_row.name, "--name", "x"), "--name is for a single file"),
        ((sae_copy, "--model", smollm2_row.name), "architecture 'topk', not a vector space"),
        ((tmp_path, "--model", smollm2_row.name), "no readable cfg.json"),
        ((damaged_space(tmp_path), "--model", smollm2_row.name), "vectors.safetensors: unreadable"),
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
