"""Steering vectors on tiny random models: the math of make_concept, the checkpoint, steering with a vector per
layer, and what an export to llama.cpp holds. The real SmolLM2's vectors are tested in tests/steering."""

import pytest
import torch

from steering_app.engine import compare
from steering_app.engine.saes.sae import SAEFormatError, VectorSpace, load_sae
from steering_app.engine.steer import SpecError, SteeringSpec, validate
from steering_app.engine.vectors import (
    HELD_OUT_EVERY,
    VectorError,
    control_vector,
    imported_concept,
    load_concepts,
    make_concept,
    peak_layer,
    representations,
    save_space,
)

from .test_steer import _row_pairs, _run_probed

POSITIVES = [f"The planet number {i} circles its star far away." for i in range(10)]
NEGATIVES = [f"The bakery number {i} sells bread on the corner." for i in range(10)]


@pytest.fixture
def tiny_llama(smollm2):
    from .conftest import tiny_lm

    return tiny_lm("llama", smollm2.tokenizer)


def _ids(lm, texts):
    return [list(lm.tokenizer(text).input_ids) for text in texts]


def test_it_makes_diffmean_the_difference_of_the_class_means_scaled_by_the_positives_projection(tiny_llama):
    concept = make_concept(tiny_llama, "planet", "space", POSITIVES, NEGATIVES)
    reps = representations(tiny_llama, _ids(tiny_llama, POSITIVES + NEGATIVES), "all")
    positive, negative = reps[:10], reps[10:]
    for layer in range(4):
        difference = positive[:, layer].mean(0) - negative[:, layer].mean(0)
        unit = difference / difference.norm()
        assert torch.allclose(
            concept.vectors[layer], difference, atol=1e-5
        )  # a = <difference, u> = |difference|
        assert torch.allclose(concept.offsets[layer], negative[:, layer].mean(0) @ unit, atol=1e-5)
    assert concept.info == {"method": "diffmean", "tokens": "all", "positives": 10, "negatives": 10}
    assert len(concept.separation) == 4 and all(0 <= value <= 1 for value in concept.separation)
    assert concept.separation[concept.best_layer] == max(concept.separation)


def test_it_reads_each_text_alone_whatever_the_padding_of_its_batch(tiny_llama):
    texts = ["Short one.", "A much longer sentence about the orbits of distant moons and planets."]
    together = representations(tiny_llama, _ids(tiny_llama, texts), "all")
    for position, text in enumerate(texts):
        alone = representations(tiny_llama, _ids(tiny_llama, [text]), "all")
        assert torch.allclose(together[position], alone[0], atol=1e-5)
    last = representations(tiny_llama, _ids(tiny_llama, texts), "last")
    assert not torch.allclose(last[0], together[0])


def test_it_turns_the_pca_direction_toward_the_positives(tiny_llama):
    concept = make_concept(
        tiny_llama, "planet", "", POSITIVES, NEGATIVES, method="pca", tokens="last", paired=True
    )
    reps = representations(tiny_llama, _ids(tiny_llama, POSITIVES + NEGATIVES), "last")
    for layer in range(4):
        unit = concept.vectors[layer] / concept.vectors[layer].norm()
        higher = (reps[:10, layer] @ unit > reps[10:, layer] @ unit).sum()
        assert higher >= 5  # the majority of pairs project higher on the positive side, as repeng fixes it
        assert torch.allclose(unit.norm(), torch.tensor(1.0))


@pytest.mark.parametrize(
    "change, field",
    [
        ({"method": "mean"}, "method"),
        ({"tokens": "first"}, "tokens"),
        ({"method": "pca"}, "pairs"),
        ({"positives": POSITIVES[: HELD_OUT_EVERY - 1]}, "positives"),
        ({"negatives": NEGATIVES[:3]}, "negatives"),
        ({"negatives": NEGATIVES[:-1], "paired": True}, "pairs"),
        ({"positives": POSITIVES[:-1] + ["   "]}, "positives[9]"),
        ({"negatives": NEGATIVES[:-1] + ["<|im_end|>"]}, "negatives[9]"),
    ],
)
def test_it_refuses_examples_naming_the_field(tiny_llama, change, field):
    arguments = {"positives": POSITIVES, "negatives": NEGATIVES, **change}
    with pytest.raises(VectorError) as raised:
        make_concept(tiny_llama, "planet", "", **arguments)
    assert raised.value.field == field


def test_it_saves_and_loads_a_space_that_steers_with_each_layers_own_vector(tiny_llama, tmp_path):
    planet = make_concept(tiny_llama, "planet", "space", POSITIVES, NEGATIVES)
    bakery = make_concept(tiny_llama, "bakery", "bread", NEGATIVES, POSITIVES)
    save_space(tmp_path, [planet, bakery], reading_layer=1, model_name="tiny")
    space = load_sae(tmp_path)
    assert isinstance(space, VectorSpace) and (space.d_in, space.d_sae, space.hook_layer) == (32, 2, 1)
    concepts, reading = load_concepts(tmp_path)
    assert reading == 1 and [concept.name for concept in concepts] == ["planet", "bakery"]
    assert torch.equal(concepts[0].vectors, planet.vectors) and concepts[1].separation == bakery.separation

    spec = SteeringSpec("additive", ((0, 1.5), (1, -0.5)), (1, 2))
    for layer in (1, 2):
        expected = 1.5 * planet.vectors[layer] - 0.5 * bakery.vectors[layer]
        comparison, probe = _run_probed(tiny_llama, space, spec, layer)
        for clean, steered in _row_pairs(comparison, probe):
            assert torch.equal(clean[1], clean[0])
            assert torch.allclose(steered[1] - steered[0], expected.expand_as(steered[0]), atol=1e-5)


def test_it_reads_a_direction_as_its_projection_from_the_negatives_over_a(tiny_llama, tmp_path):
    planet = make_concept(tiny_llama, "planet", "", POSITIVES, NEGATIVES)
    save_space(tmp_path, [planet], reading_layer=2, model_name="tiny")
    space = load_sae(tmp_path)
    reps = representations(tiny_llama, _ids(tiny_llama, POSITIVES + NEGATIVES), "all")[:, 2]
    # Linear, so the mean activation over a text's tokens is the activation of its mean: 1 for the positives'
    # mean, 0 for the negatives'.
    assert torch.allclose(space.encode(reps[:10].mean(0)), torch.tensor([1.0]), atol=1e-4)
    assert torch.allclose(space.encode(reps[10:].mean(0)), torch.tensor([0.0]), atol=1e-4)
    assert space.encode(reps[10:].mean(0) - 3 * planet.vectors[2]).item() < 0  # signed: no ReLU


def test_it_steers_nothing_at_coefficient_zero_and_refuses_multiplicative(tiny_llama, tmp_path):
    save_space(tmp_path, [make_concept(tiny_llama, "planet", "", POSITIVES, NEGATIVES)], 1, "tiny")
    space = load_sae(tmp_path)
    comparison = compare(
        tiny_llama,
        space,
        "Hello there",
        SteeringSpec("additive", ((0, 0.0),), (1, 2)),
        0.8,
        8,
        seed=1,
        sae_layer=1,
    )
    assert comparison.steered.ids == comparison.unsteered_ids
    assert torch.equal(comparison.steered.logits, comparison.clean_logits)
    with pytest.raises(SpecError) as raised:
        validate(SteeringSpec("multiplicative", ((0, 1.0),), (1,)), 4, space, 32, 1)
    assert raised.value.field == "method"
    with pytest.raises(SpecError) as raised:
        validate(SteeringSpec("additive", ((0, 1.0),), (1,)), 6, space, 32, 1)
    assert raised.value.field == "sae"


def test_it_exports_c_times_a_times_direction_per_layer_for_a_space_and_an_sae(tiny_llama, tmp_path):
    planet = make_concept(tiny_llama, "planet", "", POSITIVES, NEGATIVES)
    save_space(tmp_path / "space", [planet], 1, "tiny")
    space = load_sae(tmp_path / "space")
    exported = control_vector(space, SteeringSpec("additive", ((0, 2.0),), (1, 3)))
    assert sorted(exported) == [1, 3]
    assert torch.equal(exported[3], 2.0 * planet.vectors[3])
    assert control_vector(space, SteeringSpec("additive", ((0, 0.0),), (1,))) == {}

    from .conftest import random_sae

    sae = random_sae(tmp_path / "sae", d_in=32)
    exported = control_vector(sae, SteeringSpec("additive", ((5, 1.5),), (2,), feature_scales={5: 4.0}))
    assert torch.allclose(exported[2], 1.5 * 4.0 * sae.W_dec[5])
    with pytest.raises(SpecError) as raised:
        control_vector(sae, SteeringSpec("multiplicative", ((5, 1.0),), (1,)))
    assert raised.value.field == "method"


def test_it_imports_a_file_as_its_vectors_at_c_one(tmp_path):
    vectors = {3: torch.randn(32), 1: torch.randn(32) * 4}
    concept = imported_concept("honesty", "", vectors, num_layers=4, source="honesty.gguf")
    assert torch.equal(concept.vectors[3], vectors[3]) and torch.equal(concept.vectors[0], torch.zeros(32))
    assert concept.best_layer == 1 and concept.info == {"imported_from": "honesty.gguf"}
    save_space(tmp_path, [concept], concept.best_layer, "tiny")
    space = load_sae(tmp_path)
    assert torch.equal(space.decoder_rows([0], 3)[0], vectors[3])
    with pytest.raises(VectorError):
        imported_concept("empty", "", {}, 4, "empty.gguf")


def test_it_refuses_a_damaged_space_checkpoint(tiny_llama, tmp_path):
    save_space(tmp_path, [make_concept(tiny_llama, "planet", "", POSITIVES, NEGATIVES)], 1, "tiny")
    (tmp_path / "vectors.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(SAEFormatError, match="vectors.safetensors"):
        load_sae(tmp_path)


@pytest.mark.parametrize(
    ("separation", "best"),
    [
        ([1.0] * 30, 14),  # few held-out examples tie every block: the middle of the model
        ([0.9, 1.0, 1.0, 1.0, 0.9, 1.0], 2),  # the widest plateau, not the last block at the peak
        ([1.0, 0.8, 1.0, 0.8], 0),  # equal plateaus: the first
        ([0.6, 0.7, 0.9, 0.8], 2),
    ],
)
def test_it_defaults_to_the_middle_of_the_widest_plateau_of_separation(separation, best):
    assert peak_layer(separation) == best
