"""SteerLab's steering engine: pure PyTorch + transformers, nothing from Django.

run_comparison is the one call the service makes; the modules below it are usable on their own.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .generate import Comparison, Stopped, compare
from .loader import LoadedModel, get_embedder
from .metrics import comparison_metrics
from .sae import SAE, SAEFormatError
from .steer import SpecError, SteeringSpec, validate

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

__all__ = [
    "SAE",
    "Comparison",
    "ComparisonResult",
    "SAEFormatError",
    "SpecError",
    "SteeringSpec",
    "Stopped",
    "compare",
    "comparison_metrics",
    "run_comparison",
    "validate",
]


@dataclass
class ComparisonResult:
    unsteered_text: str
    steered_text: str
    seed: int
    metrics: dict
    timings: dict


def run_comparison(
    lm: LoadedModel, sae: SAE, *, embedder: SentenceTransformer | None = None, **compare_args: Any
) -> ComparisonResult:
    """Both continuations and all metrics; the model is held for the whole call.

    compare_args are compare()'s, by name: prompt, spec, temperature, max_new_tokens, seed, and optionally
    top_p, chat, on_step, sae_layer, min_new_tokens, should_stop. Raises SpecError (a ValueError naming the
    field) for an invalid request, Stopped when should_stop() ended the generation.
    """
    started = time.perf_counter()
    embedder = embedder or get_embedder()
    with lm.lock:
        comparison = compare(lm, sae, **compare_args)
        metrics = comparison_metrics(lm, sae, comparison, compare_args["spec"], embedder)
    timings = dict(comparison.timings)
    timings["total"] = time.perf_counter() - started
    return ComparisonResult(
        unsteered_text=comparison.unsteered_text,
        steered_text=comparison.steered_text,
        seed=comparison.seed,
        metrics=metrics,
        timings=timings,
    )
