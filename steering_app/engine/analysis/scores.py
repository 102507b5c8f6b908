"""Scores of steered outputs for experiments (AxBench-style): on concept, fluent, relevant to the prompt.

A steered run gives a clean (unsteered) continuation and K steered ones of one prompt; the clean one is
scored too, as the strength-0 control. Every output is read by the clean model (its perplexity and the
mean SAE activation of each condition feature on it) and embedded with the sentence embedder (MiniLM).

Raw measures of one output:

- concept_sae: mean over the condition's features of activation / max activation; None when any
  feature's max activation is unknown (None or <= 0), a ratio is not finite, or there is no feature.
- concept_semantic: cos(output, concept_text) - cos(clean output, concept_text), where concept_text is
  the features' labels and descriptions. Each distinct text is embedded once, so an output equal to the
  clean text scores exactly 0.0.
- perplexity_log_ratio: log(ppl_output / ppl_clean). A perplexity that is None, not finite or <= 0 is
  unusable; the ratio then reads UNUSABLE_LOG_RATIO, as disfluent as two perplexities (>= 1, capped at
  exp(700) by metrics) can be.
- repetition: the share of the output's word 3-grams that repeat an earlier one (pieces are lowercased
  words and single punctuation marks); 0.0 under 3 pieces. "play play play play" -> 0.5.
- relevance_cosine: cos(output, prompt).

Each mapped to [0, 1]:

- concept = mean of clip(concept_sae, 0, 1) and clip(concept_semantic / SEMANTIC_FULL, 0, 1): a cosine
  gain of SEMANTIC_FULL toward the labels counts as fully on concept. Only the semantic part when
  concept_sae is None.
- fluency = (1 - repetition) * min(1, exp(-perplexity_log_ratio / 2)), i.e. sqrt(ppl_clean / ppl_output)
  capped at 1; 0 when a perplexity is unusable.
- relevance = clip(relevance_cosine / max(clean relevance_cosine, RELEVANCE_FLOOR), 0, 1): as relevant to
  the prompt as the unsteered output is 1; the floor keeps an off-topic clean output from inflating it.
- score = harmonic mean of concept, fluency and relevance, 3 / (1/c + 1/f + 1/r); 0 when any is <= 0,
  so an output must do all three to score.

The clean control is scored against itself: concept_semantic 0, perplexity_log_ratio 0,
fluency = 1 - its repetition, relevance 1 (when its cosine reaches the floor).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

SEMANTIC_FULL = 0.3
RELEVANCE_FLOOR = 0.1
UNUSABLE_LOG_RATIO = 700.0

_PIECE = re.compile(r"\w+|[^\w\s]")

Scores = dict[str, float | None]


@dataclass(frozen=True)
class Reading:
    """One output as the clean model read it."""

    text: str
    perplexity: float | None
    feature_activations: tuple[float, ...]  # mean activation of each condition feature on the text


def score_outputs(
    embedder: SentenceTransformer,
    prompt: str,
    concept_text: str,
    clean: Reading,
    outputs: Sequence[Reading],
    max_activations: Sequence[float | None],
) -> tuple[Scores, list[Scores]]:
    """(the clean output's scores as the strength-0 control, each output's scores)."""
    cosine = _cosines(embedder, [prompt, concept_text, clean.text, *(output.text for output in outputs)])
    clean_relevance = cosine(clean.text, prompt)

    def scores(reading: Reading) -> Scores:
        log_ratio = perplexity_log_ratio(reading.perplexity, clean.perplexity)
        raw = {
            "concept_sae": concept_sae(reading.feature_activations, max_activations),
            "concept_semantic": cosine(reading.text, concept_text) - cosine(clean.text, concept_text),
            "perplexity_log_ratio": UNUSABLE_LOG_RATIO if log_ratio is None else log_ratio,
            "repetition": repetition(reading.text),
            "relevance_cosine": cosine(reading.text, prompt),
        }
        concept = _concept(raw["concept_sae"], raw["concept_semantic"])
        fluency = _fluency(raw["repetition"], log_ratio)
        relevance = _clip(raw["relevance_cosine"] / max(clean_relevance, RELEVANCE_FLOOR))
        mapped = {"concept": concept, "fluency": fluency, "relevance": relevance}
        return {**raw, **mapped, "score": harmonic_mean(concept, fluency, relevance)}

    return scores(clean), [scores(output) for output in outputs]


def concept_sae(activations: Sequence[float], max_activations: Sequence[float | None]) -> float | None:
    ratios = []
    for activation, max_activation in zip(activations, max_activations, strict=True):
        if max_activation is None or not max_activation > 0:
            return None
        ratio = activation / max_activation
        if not math.isfinite(ratio):
            return None
        ratios.append(ratio)
    return math.fsum(ratios) / len(ratios) if ratios else None


def perplexity_log_ratio(perplexity: float | None, clean_perplexity: float | None) -> float | None:
    """log(perplexity / clean_perplexity); None when either is unusable."""
    if not (_usable(perplexity) and _usable(clean_perplexity)):
        return None
    # A difference of logs: the quotient of two extreme perplexities could overflow.
    return math.log(perplexity) - math.log(clean_perplexity)


def repetition(text: str) -> float:
    pieces = _PIECE.findall(text.lower())
    trigrams = list(zip(pieces, pieces[1:], pieces[2:]))
    if not trigrams:
        return 0.0
    return (len(trigrams) - len(set(trigrams))) / len(trigrams)


def harmonic_mean(concept: float, fluency: float, relevance: float) -> float:
    parts = (concept, fluency, relevance)
    if min(parts) <= 0:
        return 0.0
    return len(parts) / sum(1 / part for part in parts)


def _concept(sae_ratio: float | None, semantic_gain: float) -> float:
    semantic_part = _clip(semantic_gain / SEMANTIC_FULL)
    return semantic_part if sae_ratio is None else (_clip(sae_ratio) + semantic_part) / 2


def _fluency(repeated_share: float, log_ratio: float | None) -> float:
    if log_ratio is None:
        return 0.0
    # Capping the exponent rather than the result: exp overflows on a much lower output perplexity.
    return (1 - repeated_share) * math.exp(min(0.0, -log_ratio / 2))


def _cosines(embedder: SentenceTransformer, texts: list[str]) -> Callable[[str, str], float]:
    """cosine(a, b) over the given texts, from one encode call: equal texts share one vector."""
    distinct = list(dict.fromkeys(texts))
    row = {text: index for index, text in enumerate(distinct)}
    embeddings = embedder.encode(distinct, convert_to_tensor=True, normalize_embeddings=True)

    def cosine(a: str, b: str) -> float:
        value = float((embeddings[row[a]] * embeddings[row[b]]).sum())
        # A non-finite embedding carries no evidence of similarity.
        return max(-1.0, min(1.0, value)) if math.isfinite(value) else 0.0

    return cosine


def _usable(perplexity: float | None) -> bool:
    return perplexity is not None and math.isfinite(perplexity) and perplexity > 0


def _clip(value: float) -> float:
    return max(0.0, min(1.0, value))
