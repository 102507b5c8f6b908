"""Comparison metrics, on the continuations only (never the prompt).

- kl_divergence: mean over the unsteered continuation's positions of KL(P_clean || P_steered), both
  teacher-forced on prompt + unsteered continuation, temperature 1, nats/token.
- perplexity_unsteered / perplexity_steered: perplexity of each continuation given the prompt under
  the clean model; perplexity_delta = steered - unsteered.
- semantic_similarity: cosine of the sentence embeddings of the two continuations.
- word_overlap: Jaccard index of the sets of tokens of the two continuations.
- feature_activation: per steered feature, its mean SAE activation (clean model, SAE layer) over the
  unsteered and over the steered continuation, read at the positions that produce the continuation's
  tokens (the last prompt position and every continuation token but the last); steered_in_run is the
  same inside the steered run itself, after the intervention.

A conversation's turn in separate mode gives the steered row a prompt of its own (its own history): its
continuation is then scored after that prompt (perplexity, activations), while the KL is still read on the
clean prompt and the unsteered continuation, and nothing is shared with generation (divergence -1).

A comparison has K steered variants; each gets every metric against the clean row. Generation already
computed most of this: the clean row's logits are P_clean on the unsteered continuation and its
activations read it, and until a variant's continuation diverges from the clean one (index d) both share
their context, so the variant's logits are P_steered there and the clean row's logits and activations
serve the variant's continuation too. One extra forward over two rows per variant supplies the rest:
the clean model reading the variant's tokens, and the variant's model reading the unsteered ones.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import torch

from ..layers import decoder_blocks
from ..loader import LoadedModel
from ..saes.sae import SAE
from ..serving.generate import Comparison
from ..serving.lean import LeanStep, has_hooks
from ..serving.slots import model_forward, teacher_forced
from ..steer import RowSteering, SteeringSpec, plan_row
from ..tokens import pad_token_id, special_id_tensor, special_ids

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer


def comparison_metrics(
    lm: LoadedModel,
    sae: SAE,
    comparison: Comparison,
    specs: Sequence[SteeringSpec],
    embedder: SentenceTransformer,
    lean: LeanStep | None = None,
) -> list[dict]:
    """The five metrics of each variant against the clean row, one dict a spec, in the variants' order.

    lean: the lean step of the batch that generated the comparison (SlotBatch.lean), for the metrics' forward
    when it covers its positions and no hooks are on the model; None: transformers' modules.
    Also records metrics_forward and embed in comparison.timings.
    """
    t0 = time.perf_counter()
    with lm.lock:
        results = _model_metrics(lm, sae, comparison, list(specs), lean)
    comparison.timings["metrics_forward"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    similarities = semantic_similarities(
        embedder, comparison.unsteered_text, [variant.text for variant in comparison.variants]
    )
    comparison.timings["embed"] = time.perf_counter() - t0
    special = special_ids(lm.tokenizer)
    clean_words = [t for t in comparison.unsteered_ids if t not in special]
    for result, variant, similarity in zip(results, comparison.variants, similarities):
        result["semantic_similarity"] = similarity
        result["word_overlap"] = word_overlap(clean_words, [t for t in variant.ids if t not in special])
    return [{key: result[key] for key in METRIC_KEYS} for result in results]


METRIC_KEYS = (
    "kl_divergence",
    "perplexity_delta",
    "perplexity_unsteered",
    "perplexity_steered",
    "semantic_similarity",
    "word_overlap",
    "feature_activation",
)


def semantic_similarity(embedder: SentenceTransformer, a: str, b: str) -> float:
    return semantic_similarities(embedder, a, [b])[0]


def semantic_similarities(embedder: SentenceTransformer, clean: str, others: list[str]) -> list[float]:
    """Cosine of clean's embedding with each other text's; one encode call for all of them."""
    distinct = [text for text in dict.fromkeys(others) if text != clean]
    if not distinct:
        return [1.0] * len(others)
    embeddings = embedder.encode([clean, *distinct], convert_to_tensor=True, normalize_embeddings=True)
    cosine = {text: float((embeddings[0] * embeddings[1 + i]).sum()) for i, text in enumerate(distinct)}
    return [1.0 if text == clean else max(-1.0, min(1.0, cosine[text])) for text in others]


def word_overlap(a_tokens: Iterable[int], b_tokens: Iterable[int]) -> float:
    a, b = set(a_tokens), set(b_tokens)
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


def _perplexity(logits: torch.Tensor, targets: list[int]) -> float:
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    target = torch.tensor(targets, device=logits.device).unsqueeze(-1)
    nll = -log_probs.gather(-1, target).mean().item()
    # exp overflows past ~709; a perplexity that large means the same as infinity here.
    return math.exp(min(nll, 700.0))


def _kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    log_p = torch.log_softmax(p_logits.float(), dim=-1)
    log_q = torch.log_softmax(q_logits.float(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1).mean().item()


@torch.inference_mode()
def _model_metrics(
    lm: LoadedModel, sae: SAE, comparison: Comparison, specs: list[SteeringSpec], lean: LeanStep | None
) -> list[dict]:
    """KL, perplexities and feature activations of every variant, from one forward over 2 rows per variant:
    row 2k is the clean model reading variant k's tokens after variant k's prompt, row 2k + 1 variant k's model
    reading the unsteered ones after the clean prompt (no cache: the run's slots are already free for others)."""
    clean_prompt, unsteered = comparison.prompt_ids, comparison.unsteered_ids
    rows, plans, starts = [], [], []
    for k, (spec, variant) in enumerate(zip(specs, comparison.variants)):
        own_prompt = comparison.variant_prompt(k)
        rows += [
            own_prompt + variant.ids[: len(variant.ids) - 1],
            clean_prompt + unsteered[: len(unsteered) - 1],
        ]
        plans += [
            plan_row(sae, comparison.sae_layer, None, comparison.capture),
            plan_row(sae, comparison.sae_layer, spec),
        ]
        starts += [len(own_prompt) - 1, len(clean_prompt) - 1]  # the position that predicts the first token
    width = max(len(row) for row in rows)
    pad_id = pad_token_id(lm.tokenizer, lm.model)
    input_ids = torch.tensor([row + [pad_id] * (width - len(row)) for row in rows], device=lm.device)
    steering = RowSteering(decoder_blocks(lm.model), len(rows))
    steering.special_mask = torch.isin(input_ids, special_id_tensor(lm.tokenizer).to(lm.device))
    for row, plan in enumerate(plans):
        steering.assign(row, plan)
    first = min(starts)
    kept = width - first  # positions first .. width - 1: those that predict continuation tokens
    if lean is not None and width <= lean.length and not has_hooks(lm.model):
        logits, _ = teacher_forced(lean, input_ids, steering, kept)  # plain F.linear: fastest at many rows
    else:
        with steering.attached():
            logits = model_forward(lm.model, input_ids, None, logits_to_keep=kept)[:, -kept:]
    records = steering.records()
    readings = [logits[row, start - first :] for row, start in enumerate(starts)]

    results = []
    for k, (spec, variant) in enumerate(zip(specs, comparison.variants)):
        results.append(
            _variant_metrics(
                comparison,
                spec,
                variant,
                readings[2 * k],
                readings[2 * k + 1],
                records.get(2 * k),
                starts[2 * k],
            )
        )
    return results


def _variant_metrics(
    comparison, spec, variant, clean_reading, steered_reading, clean_records, clean_start: int
) -> dict:
    """clean_reading / steered_reading: the pass's logits from the position that predicts each continuation's
    first token (index t predicts token t); clean_start: that position in the variant's row of clean_records.
    Until the divergence d, generation's logits serve (d = -1: the variant had a prompt of its own)."""
    d = variant.divergence
    unsteered, steered = comparison.unsteered_ids, variant.ids
    n_u, n_s = len(unsteered), len(steered)

    def extend(shared: torch.Tensor, reading: torch.Tensor, tokens: int) -> torch.Tensor:
        """Per-token logits up to d from generation, then the pass's for the tokens after d."""
        if tokens <= d + 1:
            return shared[:tokens]
        return torch.cat([shared[: d + 1].float(), reading[d + 1 : tokens].float()])

    kl = _kl(comparison.clean_logits[:n_u], extend(variant.logits, steered_reading, n_u))
    ppl_unsteered = _perplexity(comparison.clean_logits[:n_u], unsteered)
    ppl_steered = _perplexity(extend(comparison.clean_logits, clean_reading, n_s), steered)

    feature_activation = []
    if spec.feature_ids:
        columns = [comparison.capture.index(index) for index in spec.feature_ids]
        # Activations at the positions that produce each continuation token (the last prompt position and
        # every continuation token but the last): the same positions as steered_in_run.
        unsteered_acts = comparison.clean_activations[:n_u, columns]
        steered_acts = comparison.clean_activations[: max(0, min(d + 1, n_s)), columns]
        if n_s > d + 1:
            later = clean_records[clean_start + d + 1 : clean_start + n_s, columns]
            steered_acts = torch.cat([steered_acts, later])
        in_run = variant.activations[:n_s, columns]
        for column, feature_id in enumerate(spec.feature_ids):
            feature_activation.append(
                {
                    "feature_id": feature_id,
                    "unsteered": _mean(unsteered_acts[:, column]),
                    "steered": _mean(steered_acts[:, column]),
                    "steered_in_run": _mean(in_run[:, column]),
                }
            )
    return {
        "kl_divergence": kl,
        "perplexity_unsteered": ppl_unsteered,
        "perplexity_steered": ppl_steered,
        "perplexity_delta": ppl_steered - ppl_unsteered,
        "feature_activation": feature_activation,
    }


def _mean(values: torch.Tensor) -> float:
    return float(values.mean()) if values.numel() else 0.0
