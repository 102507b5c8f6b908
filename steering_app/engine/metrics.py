"""Comparison metrics, on the continuations only (never the prompt).

- kl_divergence: mean over the unsteered continuation's positions of KL(P_clean || P_steered), both
  teacher-forced on prompt + unsteered continuation, temperature 1, nats/token.
- perplexity_unsteered / perplexity_steered: perplexity of each continuation given the prompt under
  the clean model; perplexity_delta = steered - unsteered.
- semantic_similarity: cosine of the sentence embeddings of the two continuations.
- word_overlap: Jaccard index of the sets of tokens of the two continuations.
- feature_activation: per steered feature, its mean SAE activation (clean model, SAE layer) over the
  unsteered and over the steered continuation's tokens; steered_in_run adds the activation inside the
  steered run itself (after the intervention) at the positions that produced the steered tokens.

Generation already computed most of this: the clean row's logits are P_clean on the unsteered
continuation, and until the continuations diverge (index d) both rows share their context, so the
steered row's logits are P_steered there and the clean row's logits score the steered continuation
too. One extra forward over three rows, continuing the generation's KV cache from position P + d,
supplies the rest: row 0 clean on the steered tokens, row 1 steered on the unsteered tokens, row 2
clean on the unsteered tokens.
"""

from __future__ import annotations

import math
import time

import torch

from .generate import (
    CLEAN,
    STEERED,
    Comparison,
    capture_hook,
    cache_is_plain,
    eos_token_ids,
    model_forward,
    new_cache,
    reshape_cache,
)
from .layers import decoder_blocks
from .loader import LoadedModel
from .sae import SAE
from .steer import SteeringSpec, steering_hooks


def comparison_metrics(lm: LoadedModel, sae: SAE, comparison: Comparison, spec: SteeringSpec, embedder) -> dict:
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


def semantic_similarity(embedder, a: str, b: str) -> float:
    if a == b:
        return 1.0
    embeddings = embedder.encode([a, b], convert_to_tensor=True, normalize_embeddings=True)
    return max(-1.0, min(1.0, float((embeddings[0] * embeddings[1]).sum())))


def word_overlap(a_tokens, b_tokens) -> float:
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

    cache = comparison.cache
    comparison.cache = None
    if cache is not None and cache_is_plain(cache):
        start = P + d
        reshape_cache(cache, [CLEAN, STEERED, CLEAN], start)
    else:
        cache, start = new_cache(model), 0

    eos = eos_token_ids(lm)
    pad_id = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else min(eos, default=0)
    full_s, full_u = prompt + steered, prompt + unsteered
    rows = [full_s[start:], full_u[start:], full_u[start:]]
    width = max(len(row) for row in rows)
    input_ids = torch.tensor([row + [pad_id] * (width - len(row)) for row in rows], device=device)
    special_ids = torch.tensor(sorted(set(lm.tokenizer.all_special_ids)), device=device, dtype=torch.long)

    blocks = decoder_blocks(model)
    with (
        steering_hooks(
            blocks, sae, spec, comparison.sae_layer, rows=(1,), special_mask=torch.isin(input_ids, special_ids)
        ),
        capture_hook(blocks, comparison.sae_layer, sae, spec.feature_ids, rows=(0, 2)) as records,
    ):
        logits = model_forward(model, input_ids, cache)  # [3, width, V]; index j is position start + j
    del cache

    def predicting(t: int) -> int:
        """Index in the pass of the position whose logits predict continuation token t."""
        return P + t - 1 - start

    after = range(d + 1, n_u)
    q_logits = torch.cat(
        [comparison.steered_logits[: min(d + 1, n_u)], logits[1, [predicting(t) for t in after]].float()]
    )
    kl = _kl(comparison.clean_logits[:n_u], q_logits)

    ppl_unsteered = _perplexity(comparison.clean_logits[:n_u], unsteered)
    s_logits = torch.cat(
        [comparison.clean_logits[: min(d + 1, n_s)], logits[0, [predicting(t) for t in range(d + 1, n_s)]].float()]
    )
    ppl_steered = _perplexity(s_logits, steered)

    feature_activation = []
    if spec.feature_ids:
        pass_acts = records[0]  # [2, width, k]: rows 0 (clean on steered) and 2 (clean on unsteered)

        def reading(tokens: list[int], pass_row: int) -> torch.Tensor:
            """Clean activations at the positions of the continuation's tokens (a final EOS excluded)."""
            count = len(tokens) - (1 if tokens and tokens[-1] in eos else 0)
            shared = comparison.clean_activations[1 : 1 + min(d, count)]
            later = pass_acts[pass_row, [P + t - start for t in range(d, count)]]
            return torch.cat([shared, later])

        unsteered_acts = reading(unsteered, 1)
        steered_acts = reading(steered, 0)
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
