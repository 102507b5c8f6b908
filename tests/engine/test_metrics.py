"""Metrics on the real SmolLM2, checked against a plain teacher-forced recomputation."""

import math
from contextlib import nullcontext

import pytest
import torch

from steering_app.engine import compare
from steering_app.engine.analysis.metrics import comparison_metrics, word_overlap
from steering_app.engine.layers import decoder_blocks
from steering_app.engine.loader import get_embedder
from steering_app.engine.steer import RowSteering, SteeringSpec, plan_row

from .conftest import SAE_LAYER

pytestmark = pytest.mark.slow


def _forward(lm, sae, spec, ids, steered: bool):
    """Batch of one, no cache: logits [T, V] and the SAE-layer activations [T, k] (after any steering), with
    the row steering that serving attaches to the model's blocks."""
    blocks = decoder_blocks(lm.model)
    steering = RowSteering(blocks, 1)
    steering.special_mask = torch.isin(torch.tensor([ids]), torch.tensor(lm.tokenizer.all_special_ids))
    steering.assign(0, plan_row(sae, SAE_LAYER, spec))
    acts = []
    with steering.attached() if steered else nullcontext(), torch.inference_mode():
        handle = blocks[SAE_LAYER].register_forward_hook(
            lambda m, a, out: acts.append(sae.encode_features(out[0], spec.feature_ids))
        )
        try:
            logits = lm.model(torch.tensor([ids])).logits[0]
        finally:
            handle.remove()
    return logits, acts[0]


def _reference(lm, sae, comparison, spec):
    P, U, S = comparison.prompt_ids, comparison.unsteered_ids, comparison.steered.ids
    n = len(P)
    clean_u, acts_u = _forward(lm, sae, spec, P + U, steered=False)
    steer_u, _ = _forward(lm, sae, spec, P + U, steered=True)
    clean_s, acts_s = _forward(lm, sae, spec, P + S, steered=False)
    _, run_s = _forward(lm, sae, spec, P + S, steered=True)

    def nll(logits, tokens):
        log_probs = torch.log_softmax(logits[n - 1 : n - 1 + len(tokens)], -1)
        return -log_probs.gather(-1, torch.tensor(tokens)[:, None]).mean().item()

    log_p = torch.log_softmax(clean_u[n - 1 : n - 1 + len(U)], -1)
    log_q = torch.log_softmax(steer_u[n - 1 : n - 1 + len(U)], -1)
    return {
        "kl_divergence": (log_p.exp() * (log_p - log_q)).sum(-1).mean().item(),
        "perplexity_unsteered": math.exp(nll(clean_u, U)),
        "perplexity_steered": math.exp(nll(clean_s, S)),
        "unsteered": acts_u[n - 1 : n - 1 + len(U)].mean(0),
        "steered": acts_s[n - 1 : n - 1 + len(S)].mean(0),
        "steered_in_run": run_s[n - 1 : n - 1 + len(S)].mean(0),
    }


@pytest.mark.parametrize(
    ("method", "features", "layers", "prompt"),
    [
        ("additive", ((0, 2.0), (4, -30.0)), (SAE_LAYER, 14), "Tell me about your weekend."),
        ("multiplicative", ((0, 4.0), (4, -1.0)), (SAE_LAYER,), "Tell me about your cat."),
    ],
)
def test_it_matches_a_plain_teacher_forced_recomputation(
    smollm2, smollm2_sae, cat_scale, method, features, layers, prompt
):
    spec = SteeringSpec(method, features, layers, feature_scales={0: cat_scale})
    comparison = compare(smollm2, smollm2_sae, prompt, spec, 0.7, 16, seed=5, chat=True)
    assert comparison.steered.ids != comparison.unsteered_ids
    (metrics,) = comparison_metrics(smollm2, smollm2_sae, comparison, [spec], get_embedder())
    reference = _reference(smollm2, smollm2_sae, comparison, spec)
    for key in ("kl_divergence", "perplexity_unsteered", "perplexity_steered"):
        assert metrics[key] == pytest.approx(reference[key], rel=2e-3, abs=1e-5), key
    assert metrics["perplexity_delta"] == pytest.approx(
        metrics["perplexity_steered"] - metrics["perplexity_unsteered"]
    )
    for column, entry in enumerate(metrics["feature_activation"]):
        assert entry["feature_id"] == features[column][0]
        for key in ("unsteered", "steered", "steered_in_run"):
            assert entry[key] == pytest.approx(float(reference[key][column]), rel=2e-3, abs=1e-4), key

    embeddings = get_embedder().encode([comparison.unsteered_text, comparison.steered.text])
    cosine = torch.nn.functional.cosine_similarity(torch.tensor(embeddings[:1]), torch.tensor(embeddings[1:]))
    assert metrics["semantic_similarity"] == pytest.approx(float(cosine), abs=1e-5)
    special = set(smollm2.tokenizer.all_special_ids)
    u = {t for t in comparison.unsteered_ids if t not in special}
    s = {t for t in comparison.steered.ids if t not in special}
    assert metrics["word_overlap"] == pytest.approx(len(u & s) / len(u | s))


def test_it_shows_a_positive_coefficient_raising_the_feature(smollm2, smollm2_sae, cat_scale):
    spec = SteeringSpec("additive", ((0, 1.5),), (SAE_LAYER,), feature_scales={0: cat_scale})
    for seed in (0, 1, 2):
        comparison = compare(
            smollm2, smollm2_sae, "My favorite thing to do on weekends is", spec, 0.7, 16, seed
        )
        (metrics,) = comparison_metrics(smollm2, smollm2_sae, comparison, [spec], get_embedder())
        (activation,) = metrics["feature_activation"]
        assert activation["steered"] > activation["unsteered"] + 0.5
        assert activation["steered_in_run"] > activation["unsteered"] + 0.5 * cat_scale


def test_it_shows_multiplicative_minus_one_ablating_the_feature(smollm2, smollm2_sae):
    spec = SteeringSpec("multiplicative", ((0, -1.0),), (SAE_LAYER,))
    comparison = compare(smollm2, smollm2_sae, "Tell me about cats and kittens.", spec, 0.7, 16, seed=0)
    (metrics,) = comparison_metrics(smollm2, smollm2_sae, comparison, [spec], get_embedder())
    (activation,) = metrics["feature_activation"]
    assert activation["unsteered"] > 1.0  # the feature is active on this text
    assert activation["steered_in_run"] == pytest.approx(0.0, abs=1e-3)


def test_it_loads_the_embedder_once(smollm2):
    assert get_embedder() is get_embedder()
    assert get_embedder().encode(["a cat"]).shape == (1, 384)


def test_it_computes_word_overlap_as_a_jaccard_index():
    assert word_overlap([1, 2, 3], [2, 3, 4, 4]) == 0.5
    assert word_overlap([], []) == 1.0
    assert word_overlap([1], []) == 0.0
