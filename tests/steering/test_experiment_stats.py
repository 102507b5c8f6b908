"""Bootstrap intervals, the selection half of the prompts and the best strength per condition."""

import math
import random
import statistics

import pytest

from steering_app.experiment_stats import best_strengths, bootstrap_interval, selection_prompts, summarize

PROMPTS = [f"prompt number {i}" for i in range(8)]
SELECTION = selection_prompts(PROMPTS)
HELD_OUT = [prompt for prompt in PROMPTS if prompt not in SELECTION]


def row(condition, strength, prompt, score, concept=0.5, fluency=0.5, relevance=0.5):
    return {
        "condition": condition,
        "strength": strength,
        "prompt": prompt,
        "concept": concept,
        "fluency": fluency,
        "relevance": relevance,
        "score": score,
    }


def test_it_bootstraps_a_deterministic_interval_around_the_mean():
    rng = random.Random(7)
    values = [rng.random() for _ in range(30)]
    interval = bootstrap_interval(values)
    assert interval == bootstrap_interval(values)
    assert interval != bootstrap_interval(values, seed=1)
    assert interval["mean"] == pytest.approx(statistics.fmean(values))
    assert interval["low"] < interval["mean"] < interval["high"]
    # A 95 % interval of a mean spans about four standard errors.
    standard_error = statistics.stdev(values) / math.sqrt(len(values))
    assert interval["high"] - interval["low"] == pytest.approx(4 * standard_error, rel=0.15)


def test_it_gives_a_point_interval_for_one_or_equal_values_and_none_for_no_value():
    assert bootstrap_interval([0.4]) == {"mean": 0.4, "low": 0.4, "high": 0.4}
    assert bootstrap_interval([0.25] * 5) == {"mean": 0.25, "low": 0.25, "high": 0.25}
    assert bootstrap_interval([]) == {"mean": None, "low": None, "high": None}


@pytest.mark.parametrize("count", range(1, 10))
def test_it_selects_half_of_the_distinct_prompts_rounded_up(count):
    prompts = [f"p{i}" for i in range(count)]
    selection = selection_prompts(prompts + prompts[:2])
    assert len(selection) == math.ceil(count / 2) and selection <= set(prompts)


def test_it_selects_the_same_prompts_in_any_order():
    shuffled = PROMPTS[:]
    random.Random(3).shuffle(shuffled)
    assert selection_prompts(shuffled) == SELECTION
    assert selection_prompts(iter(reversed(PROMPTS))) == SELECTION


def test_it_summarizes_each_condition_and_strength_in_order():
    rows = [
        row(2, 1.0, "a", 0.2),
        row(1, 4.0, "a", 0.6, concept=1.0),
        row(1, 4.0, "b", 0.8, concept=0.0),
        row(1, -2.0, "a", 0.4),
    ]
    summary = summarize(rows)
    assert [(entry["condition"], entry["strength"], entry["n"]) for entry in summary] == [
        (1, -2.0, 1),
        (1, 4.0, 2),
        (2, 1.0, 1),
    ]
    assert summary[1]["score"]["mean"] == pytest.approx(0.7)
    assert summary[1]["concept"]["mean"] == 0.5
    assert summary[1]["fluency"] == {"mean": 0.5, "low": 0.5, "high": 0.5}
    assert set(summary[1]) == {"condition", "strength", "n", "concept", "fluency", "relevance", "score"}


def test_it_chooses_the_strength_on_the_selection_half_and_reports_it_on_the_held_out_half():
    # Strength 2 wins on the selection half, strength 4 on the held-out half: the selection half decides.
    rows = [row(1, 2.0, prompt, 0.9) for prompt in SELECTION]
    rows += [row(1, 2.0, prompt, 0.1) for prompt in HELD_OUT]
    rows += [row(1, 4.0, prompt, 0.2) for prompt in SELECTION]
    rows += [row(1, 4.0, prompt, 0.8) for prompt in HELD_OUT]
    (best,) = best_strengths(rows)
    assert best["condition"] == 1 and best["strength"] == 2.0
    assert best["score"] == {"mean": 0.1, "low": 0.1, "high": 0.1}
    assert best["n"] == len(HELD_OUT) == 4


def test_it_prefers_the_gentler_strength_on_a_tie():
    rows = [row(1, strength, prompt, 0.5) for strength in (3.0, -1.0, 1.5) for prompt in PROMPTS]
    (best,) = best_strengths(rows)
    assert best["strength"] == -1.0


def test_it_ranks_conditions_by_held_out_score_and_skips_those_missing_a_half():
    rows = [row(1, 1.0, prompt, 0.3) for prompt in PROMPTS]
    rows += [row(2, 1.0, prompt, 0.6) for prompt in PROMPTS]
    rows += [row(3, 1.0, prompt, 0.9) for prompt in SELECTION]
    rows += [row(4, 1.0, prompt, 0.9) for prompt in HELD_OUT]
    assert [best["condition"] for best in best_strengths(rows)] == [2, 1]
