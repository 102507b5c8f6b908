"""Statistics of an experiment's result rows: bootstrap intervals and the best strength per condition.

The best strength is chosen on a fixed half of the prompts (selection_prompts) and its score is reported
on the other, held-out half, so the leaderboard does not reward a strength for fitting the prompts it
was picked on.
"""

from __future__ import annotations

import hashlib
import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

SCORE_NAMES = ("concept", "fluency", "relevance", "score")


def bootstrap_interval(values: Sequence[float], resamples: int = 1000, seed: int = 0) -> dict:
    """{mean, low, high}: the mean and the 2.5th / 97.5th percentiles of the means of resamples (numpy's
    linear interpolation). Vectorized: a page summarizes hundreds of groups, 1000 resamples each."""
    if not values:
        return {"mean": None, "low": None, "high": None}
    data = np.asarray(values, dtype=np.float64)
    mean = float(data.mean())
    if len(data) == 1:
        return {"mean": mean, "low": mean, "high": mean}
    picks = np.random.default_rng(seed).integers(0, len(data), size=(resamples, len(data)))
    low, high = np.percentile(data[picks].mean(axis=1), [2.5, 97.5])
    return {"mean": mean, "low": float(low), "high": float(high)}


def selection_prompts(prompts: Iterable[str]) -> set[str]:
    """The first half (rounded up) of the distinct prompts in sha256 order: stable and order-free."""
    distinct = sorted(set(prompts), key=lambda prompt: hashlib.sha256(prompt.encode()).hexdigest())
    return set(distinct[: math.ceil(len(distinct) / 2)])


def summarize(rows: Iterable[Mapping]) -> list[dict]:
    """One entry per (condition, strength), in that order: n and a bootstrap interval of each score."""
    groups = defaultdict(list)
    for row in rows:
        groups[(row["condition"], row["strength"])].append(row)
    return [
        {
            "condition": condition,
            "strength": strength,
            "n": len(group),
            **{name: bootstrap_interval([row[name] for row in group]) for name in SCORE_NAMES},
        }
        for (condition, strength), group in sorted(groups.items())
    ]


def best_strengths(rows: Iterable[Mapping]) -> list[dict]:
    """Per condition, the strength with the best mean score on the selection half, with its held-out score.

    Ties go to the lower |strength| (gentler steering). A condition is left out when the selection half
    has no row of it or the held-out half no row at its chosen strength. Sorted by held-out mean, best first.
    """
    rows = list(rows)
    chosen_on = selection_prompts(row["prompt"] for row in rows)
    selection, held_out = defaultdict(list), defaultdict(list)
    for row in rows:
        half = selection if row["prompt"] in chosen_on else held_out
        half[(row["condition"], row["strength"])].append(row["score"])

    leaderboard = []
    for condition, strength in _best_per_condition(selection).items():
        scores = held_out.get((condition, strength))
        if scores:
            interval = bootstrap_interval(scores)
            leaderboard.append(
                {"condition": condition, "strength": strength, "score": interval, "n": len(scores)}
            )
    return sorted(leaderboard, key=lambda entry: (-entry["score"]["mean"], entry["condition"]))


def _best_per_condition(scores: Mapping[tuple, list[float]]) -> dict:
    """condition -> the strength with the highest mean score; the lower |strength| on a tie."""
    ranks = defaultdict(list)
    for (condition, strength), values in scores.items():
        ranks[condition].append((-statistics.fmean(values), abs(strength), strength))
    return {condition: min(ranked)[-1] for condition, ranked in ranks.items()}
