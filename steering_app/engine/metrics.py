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

Generation already computed most of this: the clean row's logits are P_clean on the unsteered
continuation and its activations read it, and until the continuations diverge (index d) both rows
share their context, so the steered row's logits are P_steered there and the clean row's logits and
activations serve the steered continuation too. One extra forward over two rows, continuing the
generation's KV cache from position P + d, supplies the rest: row 0 is the clean model reading the
steered tokens, row 1 the steered model reading the unsteered ones.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch

from .generate import (
    CLEAN,
    STEERED,
    Comparison,
    cache_is_plain,
    capture_hook,
    eos_token_ids,
    model_forward,
    new_cache,
    reshape_cache,
    skinny_linears,
)
from .layers import decoder_blocks
from .loader import LoadedModel
from .sae import SAE
from .steer import SteeringSpec, steering_hooks

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer


def comparison_metrics(
    lm: LoadedModel, sae: SAE, comparison: Comparison, spec: SteeringSpec, embedder: SentenceTransformer
) -> dict:
    """The five metrics; also records metrics_forward and embed in comparison.timings."""
    t0 = time.perf_counter()
    with lm.lock:
        result = _model_metrics(lm, sae, comparison, spec)
    comparison.timings["metrics_forward"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    result["semantic_similarity"] = semantic_similarity(
        embedder, comparison.unsteered_text, comparison.steered_text
    )
    comparison.timings["embed"] = time.perf_counter() - t0
    special = set(lm.tokenizer.all_special_ids)
    result["word_overlap"] = word_overlap(
        [t for t in comparison.unsteered_ids if t not in special],
        [t for t in comparison.steered_ids if t not in special],
    )
    return {
        key: result[key]
        for key in (
            "kl_divergence",
            "perplexity_delta",
            "perplexity_unsteered",
            "perplexity_steered",
            "semantic_similarity",
            "word_overlap",
            "feature_activation",
        )
    }


def semantic_similarity(embedder: SentenceTransformer, a: str, b: str) -> float:
    if a == b:
        return 1.0
    embeddings = embedder.encode([a, b], convert_to_tensor=True, normalize_embeddings=True)
    return max(-1.0, min(1.0, float((embeddings[0] * embeddings[1]).sum())))


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
def _model_metrics(lm: LoadedModel, sae: SAE, comparison: Comparison, spec: SteeringSpec) -> dict:
    model, device = lm.model, lm.device
    prompt, unsteered, steered = comparison.prompt_ids, comparison.unsteered_ids, comparison.steered_ids
    P, d = len(prompt), comparison.divergence
    n_u, n_s = len(unsteered), len(steered)

    # Beyond d: row 0 = clean model reading the steered tokens, row 1 = steered model reading the
    # unsteered ones. The last token of each continuation is only predicted, never read.
    cache = comparison.cache
    comparison.cache = None
    if cache is not None and cache_is_plain(cache):
        start = P + d
        rows = [steered[d : n_s - 1], unsteered[d : n_u - 1]]
    else:
        start = 0
        rows = [prompt + steered[: n_s - 1], prompt + unsteered[: n_u - 1]]
    width = max(len(row) for row in rows)
    logits = activations = None
    if width:
        if start:
            reshape_cache(cache, [CLEAN, STEERED], start)
        else:
            cache = new_cache(model)
        eos = eos_token_ids(lm)
        pad_id = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else min(eos, default=0)
        input_ids = torch.tensor([row + [pad_id] * (width - len(row)) for row in rows], device=device)
        special_ids = torch.tensor(sorted(set(lm.tokenizer.all_special_ids)), device=device, dtype=torch.long)
        blocks = decoder_blocks(model)
        with (
            skinny_linears(model, device),
            steering_hooks(
                blocks,
                sae,
                spec,
                comparison.sae_layer,
                rows=(STEERED,),
                special_mask=torch.isin(input_ids, special_ids),
            ),
            capture_hook(blocks, comparison.sae_layer, sae, spec.feature_ids, rows=(CLEAN,)) as records,
        ):
            logits = model_forward(model, input_ids, cache)  # [2, width, V]; index j is position start + j
        activations = records[0]
    del cache

    def before(t: int) -> int:
        """Index in the pass of position P + t - 1, whose logits predict continuation token t."""
        return P + t - 1 - start

    def extend(shared: torch.Tensor, row: int, tokens: int) -> torch.Tensor:
        """Per-token logits up to d from generation, then the pass's row for the tokens after d."""
        later = range(d + 1, tokens)
        if not later:
            return shared[:tokens]
        return torch.cat([shared[: d + 1], logits[row, [before(t) for t in later]].float()])

    kl = _kl(comparison.clean_logits[:n_u], extend(comparison.steered_logits, STEERED, n_u))
    ppl_unsteered = _perplexity(comparison.clean_logits[:n_u], unsteered)
    ppl_steered = _perplexity(extend(comparison.clean_logits, CLEAN, n_s), steered)

    feature_activation = []
    if spec.feature_ids:
        # Activations at the positions that produce each continuation token (the last prompt
        # position and every continuation token but the last): the same positions as steered_in_run.
        unsteered_acts = comparison.clean_activations[:n_u]
        later = range(d + 1, n_s)
        steered_acts = comparison.clean_activations[: min(d + 1, n_s)]
        if later:
            steered_acts = torch.cat([steered_acts, activations[0, [before(t) for t in later]]])
        in_run = comparison.steered_activations[:n_s]
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
