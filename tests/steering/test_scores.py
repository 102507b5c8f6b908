"""Scores of steered outputs, with a bag-of-words embedder whose cosines are easy to work out by hand."""

import math

import pytest
import torch

from steering_app.engine.analysis.scores import (
    RELEVANCE_FLOOR,
    SEMANTIC_FULL,
    UNUSABLE_LOG_RATIO,
    Reading,
    harmonic_mean,
    repetition,
    score_outputs,
)
from steering_app.engine.loader import get_embedder

SCORE_KEYS = {
    "concept_sae",
    "concept_semantic",
    "perplexity_log_ratio",
    "repetition",
    "relevance_cosine",
    "concept",
    "fluency",
    "relevance",
    "score",
}


class BagOfWords:
    """Unit vectors of word counts: cos(a, b) = shared words / sqrt(words(a) * words(b)) for distinct words."""

    def __init__(self):
        self.calls = []

    def encode(self, texts, convert_to_tensor, normalize_embeddings):
        assert convert_to_tensor and normalize_embeddings
        self.calls.append(list(texts))
        vocabulary = sorted({word for text in texts for word in text.split()})
        vectors = torch.zeros(len(texts), len(vocabulary) + 1)
        vectors[:, -1] = 1e-12  # an empty text still has a direction
        for row, text in enumerate(texts):
            for word in text.split():
                vectors[row, vocabulary.index(word)] += 1
        return torch.nn.functional.normalize(vectors, dim=1)


def reading(text, perplexity=10.0, activations=(1.0,)):
    return Reading(text=text, perplexity=perplexity, feature_activations=activations)


def score(outputs, clean=None, max_activations=(4.0,), embedder=None):
    return score_outputs(
        embedder or BagOfWords(),
        prompt="dogs",
        concept_text="ocean",
        clean=clean or reading("dogs run"),
        outputs=outputs,
        max_activations=max_activations,
    )


def test_it_counts_repeated_trigrams():
    assert repetition("play play play play") == 0.5
    assert repetition(")))))))") == 0.8  # 5 trigrams, all the same: 4 repeats
    assert repetition("The cat sat on the mat.") == 0.0
    assert repetition("Play, play, PLAY, play") == pytest.approx(3 / 5)  # case-free, commas are pieces
    assert repetition("two words") == 0.0


def test_it_scores_an_output_equal_to_the_clean_one_as_no_semantic_change():
    embedder = BagOfWords()
    control, (same,) = score([reading("dogs run")], embedder=embedder)
    assert same["concept_semantic"] == 0.0 and same["perplexity_log_ratio"] == 0.0
    assert same == control
    assert embedder.calls == [["dogs", "ocean", "dogs run"]]


def test_it_scores_the_clean_output_as_the_strength_zero_control():
    control, _ = score([], clean=reading("dogs run dogs run dogs", activations=(2.0,)))
    assert set(control) == SCORE_KEYS
    assert control["concept_semantic"] == 0.0 and control["perplexity_log_ratio"] == 0.0
    assert control["repetition"] == pytest.approx(1 / 3)
    assert control["fluency"] == pytest.approx(2 / 3)
    assert control["relevance"] == 1.0
    assert control["concept_sae"] == 0.5 and control["concept"] == 0.25  # no semantic gain over itself


def test_it_maps_each_measure_to_the_unit_interval():
    on_concept = reading("ocean dogs", perplexity=40.0, activations=(2.0,))
    _, (scores,) = score([on_concept])
    assert set(scores) == SCORE_KEYS
    assert scores["concept_sae"] == 0.5
    assert scores["concept_semantic"] == pytest.approx(1 / math.sqrt(2))  # from cos 0 to 1/sqrt(2)
    assert scores["concept"] == pytest.approx((0.5 + 1.0) / 2)  # the gain exceeds SEMANTIC_FULL
    assert scores["perplexity_log_ratio"] == pytest.approx(math.log(4))
    assert scores["fluency"] == pytest.approx(0.5)  # sqrt(10 / 40)
    assert scores["relevance_cosine"] == pytest.approx(1 / math.sqrt(2))
    assert scores["relevance"] == 1.0  # as relevant as the clean "dogs run"
    assert scores["score"] == pytest.approx(3 / (1 / 0.75 + 1 / 0.5 + 1 / 1.0))


def test_it_scales_a_small_semantic_gain_by_semantic_full():
    # One word in 25 is the concept's: cos 0.2.
    words = " ".join(["ocean", "dogs", *(f"w{i}" for i in range(23))])
    _, (scores,) = score([reading(words)], max_activations=(None,))
    assert scores["concept_semantic"] == pytest.approx(0.2)
    assert scores["concept_sae"] is None
    assert scores["concept"] == pytest.approx(0.2 / SEMANTIC_FULL)  # the semantic part alone


def test_it_caps_fluency_for_an_output_more_likely_than_the_clean_one():
    _, (scores,) = score([reading("dogs swim", perplexity=2.0)])
    assert scores["perplexity_log_ratio"] == pytest.approx(math.log(0.2))
    assert scores["fluency"] == 1.0


def test_it_divides_relevance_by_the_floor_when_the_clean_output_is_off_topic():
    _, (scores,) = score([reading("dogs " + " ".join(f"w{i}" for i in range(399)))], clean=reading("cats"))
    assert scores["relevance_cosine"] == pytest.approx(0.05)
    assert scores["relevance"] == pytest.approx(0.05 / RELEVANCE_FLOOR)


@pytest.mark.parametrize("perplexity", [None, math.nan, math.inf, 0.0, -1.0])
def test_it_treats_an_unusable_perplexity_as_maximally_disfluent(perplexity):
    _, (scores,) = score([reading("ocean dogs", perplexity=perplexity)])
    assert scores["perplexity_log_ratio"] == UNUSABLE_LOG_RATIO
    assert scores["fluency"] == 0.0 and scores["score"] == 0.0


def test_it_reads_every_output_as_unusable_when_the_clean_perplexity_is():
    control, (scores,) = score([reading("ocean dogs")], clean=reading("dogs run", perplexity=None))
    assert control["fluency"] == 0.0 and scores["fluency"] == 0.0


@pytest.mark.parametrize("max_activations", [(4.0, None), (4.0, 0.0), (4.0, -2.0)])
def test_it_leaves_concept_sae_out_when_a_max_activation_is_unknown(max_activations):
    outputs = [reading("ocean dogs", activations=(2.0, 2.0))]
    control, (scores,) = score(
        outputs, clean=reading("dogs run", activations=(0.0, 0.0)), max_activations=max_activations
    )
    assert scores["concept_sae"] is None and control["concept_sae"] is None
    assert scores["concept"] == 1.0  # the semantic part alone: a gain of 0.71


def test_it_averages_the_ratios_of_several_features():
    outputs = [reading("dogs run", activations=(2.0, 1.0))]
    _, (scores,) = score(
        outputs, clean=reading("dogs run", activations=(0.0, 0.0)), max_activations=(4.0, 4.0)
    )
    assert scores["concept_sae"] == 0.375
    assert scores["concept"] == 0.375 / 2  # no semantic gain


def test_it_never_lets_nan_escape():
    outputs = [reading("ocean dogs", perplexity=math.nan, activations=(math.nan,)), reading("")]
    control, scores = score(outputs, clean=reading("", perplexity=math.inf))
    for value in [*control.values(), *(value for entry in scores for value in entry.values())]:
        assert value is None or math.isfinite(value)


def test_it_scores_zero_when_any_part_is_zero():
    assert harmonic_mean(0.0, 1.0, 1.0) == 0.0
    assert harmonic_mean(1.0, 1.0, 0.0) == 0.0
    assert harmonic_mean(1.0, 1.0, 1.0) == 1.0
    assert harmonic_mean(0.5, 1.0, 1.0) == 0.75


def test_it_scores_with_the_real_minilm():
    clean = reading("Sunday is a good day for a walk in the park with friends.")
    on_concept = reading("Sunday is a good day for a swim in the ocean, with waves and salty sea wind.")
    control, (same, steered) = score_outputs(
        get_embedder(),
        prompt="Suggest three things to do on a rainy Sunday afternoon.",
        concept_text="the ocean, the sea, waves and beaches",
        clean=clean,
        outputs=[clean, on_concept],
        max_activations=(4.0,),
    )
    assert same["concept_semantic"] == 0.0 and same == control
    assert steered["concept_semantic"] > 0.1
    assert 0.0 < steered["score"] <= 1.0
