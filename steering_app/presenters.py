"""How a run's results look on a page: the output columns, the metric cards, the activations, the scores."""

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
    coefficients = {item["feature_id"]: item["coefficient"] for item in run.features}
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
        "scores": score_cells((run.variants or [{}])[0].get("scores")),
        "activations": [
            {
                "index": item.get("feature_id"),
                "label": labels.get(item.get("feature_id"), ""),
                "unsteered": _number(item.get("unsteered"), "{:.3f}"),
                "steered": _number(item.get("steered"), "{:.3f}"),
                "in_run": _number(item.get("steered_in_run"), "{:.3f}"),
                "coefficient": coefficients.get(item.get("feature_id"), 0),
                "moved": moved(
                    coefficients.get(item.get("feature_id"), 0), item.get("unsteered"), item.get("steered")
                ),
            }
            for item in activations
        ],
    }


def moved(coefficient: float, before, after) -> str:
    """Whether a reading moved the way the coefficient asked: "wanted" (a rise for c > 0, a drop for a
    suppression or an ablation, c < 0), "against", or "still" (no change, c = 0 or a missing reading). The
    result colours it green, red or neutral: a rise after c = -1 is no success."""
    if not (_finite(before) and _finite(after)) or after == before or coefficient == 0:
        return "still"
    return "wanted" if (after > before) == (coefficient > 0) else "against"


def _direction(coefficients: list[float]) -> float:
    """The way a set of coefficients asks the features to move: +1, -1, or 0 when they disagree."""
    signs = {math.copysign(1, c) for c in coefficients if c != 0}
    return signs.pop() if len(signs) == 1 else 0


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


SCORE_NAMES = ("score", "concept", "fluency", "relevance")  # the aggregate first, then its parts


def score_cells(scores: dict | None) -> dict:
    """An output's aggregate score and its three parts (engine/analysis/scores.py), two decimals each; a run stored
    before scores existed has none, and shows a dash."""
    scores = scores or {}
    return {name: _number(scores.get(name), "{:.2f}") for name in SCORE_NAMES}


def best_variant(multipliers: list[float], variants: list[dict]) -> int | None:
    """The index of the variant with the highest aggregate score, the gentler |multiplier| on a tie. None when
    no variant scored above 0: a 0 means off concept, disfluent or off prompt, which is no one's best."""
    candidates = []
    for index, (multiplier, variant) in enumerate(zip(multipliers, variants)):
        score = (variant.get("scores") or {}).get("score")
        if _finite(score) and score > 0:
            candidates.append((-score, abs(multiplier), index))
    return min(candidates)[2] if candidates else None


def sweep_summary(run: SteeringRun) -> dict | None:
    """A completed sweep's table and chart: an unsteered baseline row, then one row per variant with the
    coefficients it used (the multiplier times each feature's c). The chart plots each variant's aggregate score
    and its parts against strength, not perplexity: a repetitive text reads as likely to the clean model, so a
    low perplexity would favour "Earth. Earth. Earth." over a fluent text on the concept."""
    if not run.sweep or not run.variants or run.status != SteeringRun.Status.COMPLETED:
        return None
    best = best_variant(run.sweep, run.variants)
    direction = _direction([item["coefficient"] for item in run.features])
    first = run.variants[0].get("metrics") or {}
    baseline_activation = _mean([item.get("unsteered") for item in first.get("feature_activation", [])])
    rows = []
    for index, (multiplier, variant) in enumerate(zip(run.sweep, run.variants)):
        metrics = variant.get("metrics") or {}
        scores = variant.get("scores") or {}
        activation = _mean([item.get("steered") for item in metrics.get("feature_activation", [])])
        in_run = _mean([item.get("steered_in_run") for item in metrics.get("feature_activation", [])])
        rows.append(
            {
                "multiplier": f"×{multiplier:g}",
                "multiplier_value": multiplier,
                "coefficients": _coefficients(run.features, multiplier),
                "best": index == best,
                "scores": score_cells(scores),
                "activation": _number(activation, "{:.3f}"),
                "activation_moved": moved(direction * multiplier, baseline_activation, activation),
                "in_run": _number(in_run, "{:.3f}"),
                "perplexity": _number(metrics.get("perplexity_steered"), "{:.2f}"),
                "kl": _number(metrics.get("kl_divergence"), "{:.4f}"),
                "similarity": _number(_percent(metrics.get("semantic_similarity")), "{:.1f}%"),
                "overlap": _number(_percent(metrics.get("word_overlap")), "{:.1f}%"),
                "score_values": {name: scores.get(name) for name in SCORE_NAMES},
            }
        )
    baseline = {
        "coefficients": _coefficients(run.features, 0.0),
        "activation": _number(baseline_activation, "{:.3f}"),
        "perplexity": _number(first.get("perplexity_unsteered"), "{:.2f}"),
    }
    return {"baseline": baseline, "rows": rows, "chart": _chart(rows)}


def _coefficients(features: list[dict], multiplier: float) -> str:
    """The coefficients a variant steered with: "#1681 1, #1163 -0.5"."""
    return ", ".join(f"#{item['feature_id']} {item['coefficient'] * multiplier + 0.0:g}" for item in features)


CHART_WIDTH, CHART_HEIGHT = 960, 270
CHART_LEFT, CHART_RIGHT, CHART_TOP, CHART_BOTTOM = 64, 24, 44, 54
SCORE_TICKS = (0, 0.25, 0.5, 0.75, 1)


def _chart(rows: list[dict]) -> dict | None:
    """SVG coordinates: x is the strength multiplier on a linear scale through 0 (the unsteered baseline), y one
    0-1 scale shared by every score (they are all in [0, 1], so the lines compare directly), both axes titled
    and ticked with their values. None when no variant has scores (a run stored before them)."""
    top, bottom = CHART_TOP, CHART_HEIGHT - CHART_BOTTOM
    left, right = CHART_LEFT, CHART_WIDTH - CHART_RIGHT
    values = [row["multiplier_value"] for row in rows]
    low, high = min(0.0, *values), max(0.0, *values)
    span = (high - low) or 1.0

    def x(value: float) -> float:
        return round(left + (value - low) / span * (right - left), 1)

    def y(value: float) -> float:
        return round(bottom - value * (bottom - top), 1)

    xs = [x(value) for value in values]
    series = []
    for position, name in enumerate(SCORE_NAMES):
        points = [
            (px, y(row["score_values"][name]))
            for px, row in zip(xs, rows)
            if _finite(row["score_values"][name])
        ]
        series.append(
            {
                "name": name,
                "points": " ".join(f"{px},{py}" for px, py in points),
                "dots": [{"x": px, "y": py} for px, py in points],
                "radius": 4 if name == "score" else 2.5,
                "legend_x": round(left + position * (right - left) / len(SCORE_NAMES), 1),
            }
        )
    if not any(line["dots"] for line in series):
        return None
    best = next(((px, row) for px, row in zip(xs, rows) if row["best"]), None)
    ticks = [{"x": px, "label": row["multiplier"]} for px, row in zip(xs, rows)]
    if 0.0 not in values:
        ticks.insert(0, {"x": x(0.0), "label": "0"})
    return {
        "width": CHART_WIDTH,
        "height": CHART_HEIGHT,
        "top": top,
        "bottom": bottom,
        "left": left,
        "right": right,
        "middle_x": round((left + right) / 2, 1),
        "middle_y": round((top + bottom) / 2, 1),
        "grid": [{"y": y(value), "label": f"{value:g}"} for value in SCORE_TICKS],
        "ticks": ticks,
        "series": series,
        "best": {"x": best[0], "y": y(best[1]["score_values"]["score"])} if best else None,
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
