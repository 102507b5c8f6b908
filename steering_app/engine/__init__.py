"""SteerLab's steering engine: pure PyTorch + transformers, nothing from Django.

run_comparison is the one call the service makes; the modules below it are usable on their own.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .analysis.metrics import comparison_metrics
from .loader import LoadedModel, get_embedder
from .saes.sae import SAE, SAEFormatError
from .serving.generate import Comparison, Stopped, compare
from .serving.lean import LeanStep
from .serving.scheduler import scheduler_for
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
    "VariantResult",
    "compare",
    "comparison_metrics",
    "finish",
    "run_comparison",
    "validate",
]


@dataclass
class VariantResult:
    text: str
    metrics: dict


@dataclass
class ComparisonResult:
    unsteered_text: str
    variants: list[VariantResult]
    seed: int
    timings: dict

    @property
    def steered_text(self) -> str:
        return self.variants[0].text

    @property
    def metrics(self) -> dict:
        return self.variants[0].metrics


def run_comparison(
    lm: LoadedModel, sae: SAE, *, embedder: SentenceTransformer | None = None, **compare_args: Any
) -> ComparisonResult:
    """The continuations and all metrics; the model is held for the whole call.

    compare_args are compare()'s, by name: prompt, spec (one SteeringSpec or a sequence: the variants),
    temperature, max_new_tokens, seed, and optionally top_p, chat, on_step, sae_layer, min_new_tokens,
    should_stop. Raises SpecError (a ValueError naming the field) for an invalid request, Stopped when
    should_stop() ended the generation.
    """
    started = time.perf_counter()
    embedder = embedder or get_embedder()
    with lm.lock:
        comparison = compare(lm, sae, **compare_args)
        # compare() ran in the model's shared batch (or one of its shape and plan): its lean step, if any.
        lean = scheduler_for(lm).batch.lean
        result = finish(lm, sae, comparison, compare_args["spec"], embedder, lean)
    result.timings["total"] = time.perf_counter() - started
    return result


def finish(
    lm: LoadedModel,
    sae: SAE,
    comparison: Comparison,
    spec: SteeringSpec | Sequence[SteeringSpec],
    embedder: SentenceTransformer,
    lean: LeanStep | None = None,
) -> ComparisonResult:
    """A generated comparison with every variant's metrics (lean: its batch's lean step, comparison_metrics)."""
    specs = [spec] if isinstance(spec, SteeringSpec) else list(spec)
    metrics = comparison_metrics(lm, sae, comparison, specs, embedder, lean)
    return ComparisonResult(
        unsteered_text=comparison.unsteered_text,
        variants=[VariantResult(variant.text, item) for variant, item in zip(comparison.variants, metrics)],
        seed=comparison.seed,
        timings=dict(comparison.timings),
    )
