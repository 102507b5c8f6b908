"""How a run's results look on a page: the output columns, the metric cards, the activations."""

import math

from steering_app import streaming
from steering_app.models import Feature, SteeringRun


def result_context(run: SteeringRun, unsteered: str | None = None, steered: str | None = None) -> dict:
    """What the result area shows; unsteered/steered stand in for stored text (a failed run's streamed part)."""
    seconds = None
    if run.started_at and run.finished_at:
        seconds = (run.finished_at - run.started_at).total_seconds()
    return {
        "run": run,
        "unsteered_text": run.unsteered_output or unsteered or "",
        "steered_text": run.steered_output or steered or "",
        "metrics": metric_cards(run),
        "seconds": seconds,
        "ws_url": streaming.stream_url(run.pk),
    }


def metric_cards(run: SteeringRun) -> dict | None:
    metrics = run.metrics or {}
    if not metrics:
        return None
    delta = metrics.get("perplexity_delta")
    higher = isinstance(delta, int | float) and delta > 0
    lower = isinstance(delta, int | float) and delta < 0
    activations = metrics.get("feature_activation", [])
    labels = dict(
        Feature.objects.filter(training_id=run.training_id)
        .filter(index__in=[item.get("feature_id") for item in activations])
        .values_list("index", "label")
    )
    return {
        "kl": _number(metrics.get("kl_divergence"), "{:.4f}"),
        "perplexity_delta": ("+" if higher else "") + _number(delta, "{:.2f}"),
        # Exactly 0 (or unknown) is neither better nor worse: a neutral card, not a green "lower".
        "perplexity_trend": "higher" if higher else "lower" if lower else "same",
        "perplexity_unsteered": _number(metrics.get("perplexity_unsteered"), "{:.2f}"),
        "perplexity_steered": _number(metrics.get("perplexity_steered"), "{:.2f}"),
        "similarity": _number(_percent(metrics.get("semantic_similarity")), "{:.1f}%"),
        "overlap": _number(_percent(metrics.get("word_overlap")), "{:.1f}%"),
        "activations": [
            {
                "index": item.get("feature_id"),
                "label": labels.get(item.get("feature_id"), ""),
                "unsteered": _number(item.get("unsteered"), "{:.3f}"),
                "steered": _number(item.get("steered"), "{:.3f}"),
                "in_run": _number(item.get("steered_in_run"), "{:.3f}"),
                "rose": _greater(item.get("steered"), item.get("unsteered")),
            }
            for item in activations
        ],
    }


def _number(value, pattern: str) -> str:
    if isinstance(value, int | float) and math.isfinite(value):
        return pattern.format(value)
    return "–"


def _percent(value):
    return value * 100 if isinstance(value, int | float) else None


def _greater(a, b) -> bool:
    return isinstance(a, int | float) and isinstance(b, int | float) and a > b
