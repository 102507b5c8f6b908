"""A vector's separation report as the coordinates of a small server-drawn SVG chart: one bar per layer, its
height the held-out accuracy from 0.5 (chance) to 1, the best layer marked. The template draws it; no script."""

from collections.abc import Sequence

WIDTH, HEIGHT = 480, 140
LEFT, RIGHT, TOP, BOTTOM = 36, 472, 12, 112
CHANCE = 0.5
Y_TICKS = (0.5, 0.75, 1.0)


def separation_chart(separation: Sequence[float], best_layer: int) -> dict:
    step = (RIGHT - LEFT) / max(1, len(separation))
    bars = [
        {
            "layer": layer,
            "x": round(LEFT + layer * step + 1, 1),
            "y": _y(accuracy),
            "width": round(max(1.0, step - 2), 1),
            "height": round(BOTTOM - _y(accuracy), 1),
            "accuracy": f"{accuracy:.2f}",
            "best": layer == best_layer,
        }
        for layer, accuracy in enumerate(separation)
    ]
    return {
        "width": WIDTH,
        "height": HEIGHT,
        "left": LEFT,
        "right": RIGHT,
        "bottom": BOTTOM,
        "bars": bars,
        "y_ticks": [{"y": _y(value), "label": f"{value:g}"} for value in Y_TICKS],
        "x_labels": [
            {"x": round(LEFT + (layer + 0.5) * step, 1), "label": f"L{layer}"}
            for layer in range(len(separation))
            if layer % 5 == 0 or layer == best_layer
        ],
    }


def _y(accuracy: float) -> float:
    """Accuracy below chance draws at the axis: a threshold that does worse than a coin says nothing more."""
    share = (min(max(accuracy, CHANCE), 1.0) - CHANCE) / (1.0 - CHANCE)
    return round(BOTTOM - share * (BOTTOM - TOP), 1)
