"""How a run's results look on a page: the output columns, the metric cards, the activations."""

import math

from steering_app import streaming
from steering_app.models import Feature, SteeringRun


def result_context(run: SteeringRun, unsteered: str | None = None, streamed: list[str] | None = None) -> dict:
    """What the result area shows; unsteered/streamed (each variant's text) stand in for stored text (a failed
    run's streamed part)."""
    seconds = None
    if run.started_at and run.finished_at:
        seconds = (run.finished_at - run.started_at).total_seconds()
    return {
        "run": run,
        "unsteered_text": run.unsteered_output or unsteered or "",
        "variant_columns": variant_columns(run, streamed or []),
        "sweep": sweep_summary(run),
        "metrics": None if run.sweep else metric_cards(run),
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


def output_id(variant: int) -> str:
    """The element a variant's text streams into: #steered-output for the first, as without a sweep."""
    return "steered-output" if variant == 0 else f"steered-output-{variant}"


def variant_columns(run: SteeringRun, streamed: list[str]) -> list[dict]:
    """One output column per steered variant, titled with its sweep multiplier."""
    multipliers = run.sweep or [None]
    stored = run.variants or []
    columns = []
    for index, multiplier in enumerate(multipliers):
        text = stored[index].get("steered_output", "") if index < len(stored) else ""
        if index == 0:
            text = run.steered_output or text
        if not text and index < len(streamed):
            text = streamed[index]
        title = "Steered" if multiplier is None else f"Steered ×{multiplier:g}"
        columns.append({"dom_id": output_id(index), "title": title, "text": text})
    return columns


CHART_WIDTH, CHART_HEIGHT, CHART_PAD = 520, 180, 36


def sweep_summary(run: SteeringRun) -> dict | None:
    """A completed sweep's table and chart: against strength, the steered features' mean activation in each
    variant's text (clean model reading it: does the concept come through?) and the clean model's
    perplexity of it (is it still fluent?)."""
    if not run.sweep or not run.variants or run.status != SteeringRun.Status.COMPLETED:
        return None
    rows = []
    for multiplier, variant in zip(run.sweep, run.variants):
        metrics = variant.get("metrics") or {}
        activation = _mean([item.get("steered") for item in metrics.get("feature_activation", [])])
        in_run = _mean([item.get("steered_in_run") for item in metrics.get("feature_activation", [])])
        perplexity = metrics.get("perplexity_steered")
        rows.append(
            {
                "multiplier": f"×{multiplier:g}",
                "activation": _number(activation, "{:.3f}"),
                "in_run": _number(in_run, "{:.3f}"),
                "perplexity": _number(perplexity, "{:.2f}"),
                "kl": _number(metrics.get("kl_divergence"), "{:.4f}"),
                "similarity": _number(_percent(metrics.get("semantic_similarity")), "{:.1f}%"),
                "overlap": _number(_percent(metrics.get("word_overlap")), "{:.1f}%"),
                "activation_value": activation,
                "perplexity_value": perplexity,
            }
        )
    return {"rows": rows, "chart": _chart(rows)}


def _chart(rows: list[dict]) -> dict:
    """SVG coordinates: the variants evenly spaced in sweep order, each series scaled to its own range."""
    inner = CHART_WIDTH - 2 * CHART_PAD
    step = inner / max(1, len(rows) - 1)
    xs = [CHART_PAD + (i * step if len(rows) > 1 else inner / 2) for i in range(len(rows))]

    def series(key: str) -> dict:
        values = [row[key] if _finite(row[key]) else None for row in rows]
        known = [value for value in values if value is not None]
        low, high = (min(known), max(known)) if known else (0.0, 1.0)
        span = (high - low) or 1.0
        points = [
            (
                round(x, 1),
                round(CHART_HEIGHT - CHART_PAD - (value - low) / span * (CHART_HEIGHT - 2 * CHART_PAD), 1),
            )
            for x, value in zip(xs, values)
            if value is not None
        ]
        return {
            "points": " ".join(f"{x},{y}" for x, y in points),
            "dots": [{"x": x, "y": y} for x, y in points],
            "low": _number(low, "{:.3g}"),
            "high": _number(high, "{:.3g}"),
        }

    return {
        "width": CHART_WIDTH,
        "height": CHART_HEIGHT,
        "top": CHART_PAD,
        "bottom": CHART_HEIGHT - CHART_PAD,
        "left": CHART_PAD,
        "right": CHART_WIDTH - CHART_PAD,
        "ticks": [{"x": round(x, 1), "label": row["multiplier"]} for x, row in zip(xs, rows)],
        "activation": series("activation_value"),
        "perplexity": series("perplexity_value"),
    }


def _finite(value) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def _mean(values: list) -> float | None:
    numbers = [value for value in values if _finite(value)]
    return sum(numbers) / len(numbers) if numbers else None


def _number(value, pattern: str) -> str:
    if isinstance(value, int | float) and math.isfinite(value):
        return pattern.format(value)
    return "–"


def _percent(value):
    return value * 100 if isinstance(value, int | float) else None


def _greater(a, b) -> bool:
    return isinstance(a, int | float) and isinstance(b, int | float) and a > b
