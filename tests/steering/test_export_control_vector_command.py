"""manage.py export_control_vector: a training's steering as one vector per layer (services.control_vector_of),
written as a llama.cpp control-vector GGUF (engine.control_vectors; its layout is tests/engine's) and read back
here with the same module's reader."""

import pytest
import torch
from django.core.management import call_command
from django.core.management.base import CommandError
from django.utils import timezone

from steering_app import engine_config, services
from steering_app.engine.control_vectors import read_file
from steering_app.engine.demo import DEMO_CHECKPOINT, DEMO_VECTOR_SPACE
from steering_app.engine.saes.sae import load_sae
from steering_app.engine.vectors import load_concepts
from steering_app.errors import InvalidInput
from steering_app.models import Feature, Training


@pytest.fixture
def demo_space(smollm2_row):
    """The shipped demo vector space, registered on a SmolLM2-shaped model row."""
    space = Training.objects.create(
        model=smollm2_row,
        encoder_type="vectors",
        hook_layer=10,
        hook_name="blocks.10.hook_resid_post",
        d_in=576,
        d_sae=2,
        checkpoint_path=str(DEMO_VECTOR_SPACE),
        status="completed",
        completed_at=timezone.now(),
    )
    for index, name in enumerate(["planet", "cake"]):
        Feature.objects.create(training=space, index=index, label=name, max_activation=1.0)
    return space


def export(training, *args, output):
    call_command(
        "export_control_vector",
        "--training",
        str(training.pk),
        *[str(arg) for arg in args],
        "--output",
        str(output),
    )


def read(path):
    return read_file(path, n_embd=576, num_layers=30)


def test_it_writes_the_sum_of_each_concepts_vector_at_each_layer(demo_space, tmp_path):
    output = tmp_path / "planet.gguf"
    export(demo_space, "--feature", "0:2", "--feature", "1:-0.5", "--layers", "11", "10", output=output)
    (planet, cake), _layer = load_concepts(DEMO_VECTOR_SPACE)
    vectors = read(output)
    assert sorted(vectors) == [10, 11]
    for layer in (10, 11):
        expected = 2 * planet.vectors[layer] - 0.5 * cake.vectors[layer]
        assert torch.allclose(vectors[layer], expected, rtol=1e-6, atol=1e-7)
        assert vectors[layer].dtype == torch.float32


def test_it_scales_an_sae_features_decoder_row_by_its_max_activation(demo_feature_space, tmp_path):
    output = tmp_path / "sae.gguf"
    export(demo_feature_space, "--feature", "1681:1.5", "--layers", "10", output=output)
    vectors = read(output)
    scale = Feature.objects.get(training=demo_feature_space, index=1681).max_activation
    decoder_row = load_sae(DEMO_CHECKPOINT, dtype=torch.float32).W_dec[1681]
    assert list(vectors) == [10]
    assert torch.allclose(vectors[10], 1.5 * scale * decoder_row, rtol=1e-5, atol=1e-6)


def test_it_refuses_what_cannot_be_exported_and_writes_nothing(demo_space, tmp_path):
    output = tmp_path / "out.gguf"
    pending = Training.objects.create(
        model=demo_space.model,
        encoder_type="vectors",
        hook_layer=0,
        hook_name="blocks.0.hook_resid_post",
        d_in=576,
        d_sae=1,
        checkpoint_path="",
        status="pending",
    )
    cases = [
        (
            ("--feature", "0:1", "--layers", "10", "--method", "multiplicative"),
            "method: Multiplicative steering",
        ),
        (("--feature", "7:1", "--layers", "10"), r"features: Features \[7\] do not belong"),
        (("--feature", "0:1", "--layers", "30"), "intervention_layers: Layer 30 is out of range"),
        (("--feature", "0", "--layers", "10"), "must be ID:COEFFICIENT"),
        (("--feature", "0:1e999", "--layers", "10"), "features: Coefficient of feature 0 must be finite"),
        (
            ("--feature", "0:1", "--layers", "0", "1"),
            "intervention_layers: llama.cpp applies no control vector",
        ),
        (("--feature", "0:0", "--layers", "10"), "features: Every coefficient is 0"),
    ]
    for args, words in cases:
        with pytest.raises(CommandError, match=words):
            export(demo_space, *args, output=output)
    with pytest.raises(CommandError, match="is pending"):
        export(pending, "--feature", "0:1", "--layers", "10", output=output)
    with pytest.raises(CommandError, match="is not a directory"):
        export(demo_space, "--feature", "0:1", "--layers", "10", output=tmp_path / "no" / "out.gguf")
    assert not output.exists()


def test_the_api_and_the_command_share_one_function_that_names_the_field(demo_space):
    with pytest.raises(InvalidInput) as refused:
        services.control_vector_of(
            demo_space, [{"feature_id": 0, "coefficient": 1.0}], [10], "multiplicative"
        )
    assert refused.value.field == "method"
    with pytest.raises(InvalidInput) as refused:
        services.control_vector_of(demo_space, [], [10], "additive")
    assert refused.value.field == "features"


def test_a_space_exported_and_imported_again_has_the_same_vectors_bit_for_bit(
    demo_space, smollm2_row, tmp_path, monkeypatch
):
    monkeypatch.setattr(engine_config.current, "data_dir", str(tmp_path))
    output = tmp_path / "planet.gguf"
    layers = range(10, 30)  # as many as one steering may name
    export(demo_space, "--feature", "0:1", "--layers", *layers, output=output)
    call_command("import_vectors", str(output), "--model", smollm2_row.name, "--name", "planet again")
    imported = Training.objects.get(features__label="planet again")
    (concept,), _layer = load_concepts(imported.checkpoint_path)
    (planet, _cake), _layer = load_concepts(DEMO_VECTOR_SPACE)
    assert torch.equal(concept.vectors[10:], planet.vectors[10:])
    assert not concept.vectors[:10].any()  # the layers not exported
