"""SteerLab's steering engine: pure PyTorch + transformers, nothing from Django.

compare() generates a comparison alone and finish() adds its metrics; a worker instead admits its runs into
the shared batch (serving/scheduler.py). It lives here, above serving/generate.py and serving/scheduler.py,
because it needs both and the scheduler is built on generate's Generation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .analysis.metrics import comparison_metrics
from .loader import LoadedModel
from .saes.sae import SAE, SAEFormatError
from .serving.generate import Comparison, Generation, OnStep, Stopped, prepare, prepare_turn
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
    "converse",
    "finish",
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


def compare(
    lm: LoadedModel,
    sae: SAE,
    prompt: str,
    spec: SteeringSpec | Sequence[SteeringSpec],
    *request_args,
    on_step: OnStep | None = None,
    should_stop: Callable[[], bool] | None = None,
    **request_options,
) -> Comparison:
    """Generate the unsteered continuation of prompt and one steered continuation per spec, together.

    spec: one SteeringSpec, or a sequence of 1 to MAX_VARIANTS (the variants). The request's other arguments
    are prepare()'s, in its order: temperature, max_new_tokens, seed, then top_p, chat, sae_layer, min_new_tokens.
    on_step(clean_delta, variant_deltas) streams; min_new_tokens: EOS cannot be sampled before this many
    tokens (benchmarks use min = max); should_stop: asked before every forward, and when it returns True
    the generation raises Stopped, so a cancelled run frees the model within one step.
    The run takes rows of the model's SlotBatch as any worker run does, so it gives the same text.
    Raises SpecError (a ValueError naming the field) for an invalid request.
    """
    variants = (spec,) if isinstance(spec, SteeringSpec) else tuple(spec)
    request = prepare(lm, sae, prompt, variants, *request_args, **request_options)
    generation = Generation(lm, sae, request, on_step, should_stop)
    with lm.lock:
        return scheduler_for(lm).run_alone(generation)


def converse(
    lm: LoadedModel,
    sae: SAE,
    clean_messages: list[dict],
    steered_messages: list[dict],
    spec: SteeringSpec,
    *request_args,
    on_step: OnStep | None = None,
    should_stop: Callable[[], bool] | None = None,
    **request_options,
) -> Comparison:
    """One turn of a conversation: the clean side answers clean_messages and the steered side steered_messages
    (the same list in shared mode), each through the chat template. The request's other arguments are
    prepare_turn()'s: temperature, max_new_tokens, seed, then keep, sae_layer, min_new_tokens. With keep (the
    conversation's key) the rows keep their KV in the model's shared batch for the next turn with that key."""
    request = prepare_turn(lm, sae, clean_messages, steered_messages, spec, *request_args, **request_options)
    generation = Generation(lm, sae, request, on_step, should_stop)
    with lm.lock:
        return scheduler_for(lm).run_alone(generation)


def finish(
    lm: LoadedModel,
    sae: SAE,
    comparison: Comparison,
    spec: SteeringSpec | Sequence[SteeringSpec],
    embedder: SentenceTransformer,
    lean: LeanStep | None = None,
) -> ComparisonResult:
    """A generated comparison with every variant's metrics (lean: its batch's lean step, comparison_metrics)."""
    specs = [spec] if isinstance(spec, SteeringSpec) else spec
    metrics = comparison_metrics(lm, sae, comparison, specs, embedder, lean)
    return ComparisonResult(
        unsteered_text=comparison.unsteered_text,
        variants=[VariantResult(variant.text, item) for variant, item in zip(comparison.variants, metrics)],
        seed=comparison.seed,
        timings=dict(comparison.timings),
    )
