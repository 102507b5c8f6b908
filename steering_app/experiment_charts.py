"""An experiment condition's scores against strength, as the coordinates of a server-drawn SVG chart.

x: the experiment's strengths as evenly spaced categories (0, 0.5, 1, 2, 4 would crowd a linear axis at its
left); y: a score in [0, 1]. Each score is a line through its means over a band from its interval's low to
its high; a strength without outputs yet leaves a gap. The template draws the shapes; no script runs.
"""

from collections.abc import Mapping, Sequence

from steering_app.experiment_stats import SCORE_NAMES

WIDTH, HEIGHT = 640, 300
LEFT, RIGHT, TOP, BOTTOM = 48, 624, 28, 252
Y_TICKS = (0.0, 0.25, 0.5, 0.75, 1.0)
SERIES_LABELS = {"concept": "Concept", "fluency": "Fluency", "relevance": "Relevance", "score": "Score"}


def strength_chart(rows: Sequence[Mapping], strengths: Sequence[float], best: float | None) -> dict:
    """rows: one condition's summary entries ({strength, n, concept: {mean, low, high}, ...}); best: its held-out
    best strength, marked with a vertical line, or None."""
    by_strength = {row["strength"]: row for row in rows}
    xs = [_x(position, len(strengths)) for position in range(len(strengths))]
    return {
        "width": WIDTH,
        "height": HEIGHT,
        "left": LEFT,
        "right": RIGHT,
        "top": TOP,
        "bottom": BOTTOM,
        "x_ticks": [{"x": x, "label": f"×{strength:g}"} for x, strength in zip(xs, strengths, strict=True)],
        "y_ticks": [{"y": _y(value), "label": f"{value:g}"} for value in Y_TICKS],
        "series": [_series(name, xs, [by_strength.get(s) for s in strengths]) for name in SCORE_NAMES],
        "best": _best_marker(best, xs, strengths),
    }


def _x(position: int, count: int) -> float:
    return round(LEFT + (position + 0.5) * (RIGHT - LEFT) / count, 1)


def _y(value: float) -> float:
    return round(BOTTOM - min(max(value, 0.0), 1.0) * (BOTTOM - TOP), 1)


def _series(name: str, xs: list[float], rows: list[Mapping | None]) -> dict:
    """The line through the means and the band of the intervals, each restarted after a gap."""
    line, band = [], []
    for run in _runs([(x, row[name]) for x, row in zip(xs, rows, strict=True) if row is not None], xs):
        line.append("M " + " L ".join(f"{x} {_y(interval['mean'])}" for x, interval in run))
        highs = [f"{x} {_y(interval['high'])}" for x, interval in run]
        lows = [f"{x} {_y(interval['low'])}" for x, interval in reversed(run)]
        band.append("M " + " L ".join(highs + lows) + " Z")
    points = [(x, row[name]["mean"]) for x, row in zip(xs, rows, strict=True) if row is not None]
    return {
        "name": name,
        "label": SERIES_LABELS[name],
        "line": " ".join(line),
        "band": " ".join(band),
        "dots": [{"x": x, "y": _y(mean), "value": f"{mean:.2f}"} for x, mean in points],
    }


def _runs(points: list[tuple[float, Mapping]], xs: list[float]) -> list[list[tuple[float, Mapping]]]:
    """The points split where a strength between them has none."""
    runs: list[list] = []
    previous = None
    for x, interval in points:
        if previous is None or xs.index(x) != xs.index(previous) + 1:
            runs.append([])
        runs[-1].append((x, interval))
        previous = x
    return runs


def _best_marker(best: float | None, xs: list[float], strengths: Sequence[float]) -> dict | None:
    if best is None or best not in strengths:
        return None
    return {"x": xs[list(strengths).index(best)], "label": f"best ×{best:g}"}
