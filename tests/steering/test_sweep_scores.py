"""Scores on a stored run's page: each sweep variant's concept, fluency, relevance and aggregate score, the
best variant marked in the table and the chart, a single comparison's scores, and runs stored before scores."""

import re

import pytest
from django.template.loader import render_to_string
from django.utils import timezone

from steering_app.consumers import RESULT_TEMPLATE
from steering_app.presenters import result_context

pytestmark = pytest.mark.django_db


def scores(score: float, concept: float, fluency: float, relevance: float) -> dict:
    return {
        "concept_sae": None,
        "concept_semantic": 0.1,
        "perplexity_log_ratio": 0.5,
        "repetition": 0.0,
        "relevance_cosine": 0.4,
        "concept": concept,
        "fluency": fluency,
        "relevance": relevance,
        "score": score,
    }


def variant(multiplier: float, text: str, perplexity: float, variant_scores: dict | None) -> dict:
    stored = {
        "multiplier": multiplier,
        "steered_output": text,
        "metrics": {"perplexity_steered": perplexity, "kl_divergence": 0.5, "feature_activation": []},
        "tokens": 8,
    }
    if variant_scores is not None:
        stored["scores"] = variant_scores
    return stored


# The issue's case: x1 repeats itself, so the clean model finds it likelier (lower perplexity) than the
# fluent, on-topic x0.5; its score is lower all the same.
ISSUE_SWEEP = [
    variant(0.5, "The planet Earth is home to oceans and forests.", 14.0, scores(0.6, 0.55, 0.62, 0.64)),
    variant(1.0, "Earth. Earth. Human beings.", 6.0, scores(0.3, 0.9, 0.18, 0.45)),
    variant(2.0, "Earth Earth Earth Earth", 4.0, scores(0.1, 0.95, 0.04, 0.2)),
    variant(4.0, "planet planet planet", 3.0, scores(0.0, 1.0, 0.0, 0.0)),
]


def completed_sweep(make_run, owner, variants: list[dict]):
    now = timezone.now()
    return make_run(
        owner,
        status="completed",
        sweep=[item["multiplier"] for item in variants],
        variants=variants,
        unsteered_output="Planets orbit stars.",
        steered_output=variants[0]["steered_output"],
        metrics=variants[0]["metrics"],
        started_at=now - timezone.timedelta(seconds=3),
        finished_at=now,
    )


def table_rows(html: str) -> list[dict]:
    """Each sweep table row: its class, strength, whether it has the best badge, and its score cells."""
    rows = []
    for attributes, cells in re.findall(r'<tr data-variant="\d+"([^>]*)>(.*?)</tr>', html, re.DOTALL):
        rows.append(
            {
                "best_row": 'class="sweep-best"' in attributes,
                "strength": re.search(r'<span class="sweep-strength">(.*?)</span>', cells).group(1),
                "badge": "badge-best" in cells,
                "scores": dict(re.findall(r'data-score="(\w+)">(.*?)</td>', cells)),
            }
        )
    return rows


def test_it_shows_every_variants_four_scores_and_marks_the_fluent_one_best(client, owner, training, make_run):
    run = completed_sweep(make_run, owner, ISSUE_SWEEP)
    client.force_login(owner)

    response = client.get(f"/steering/runs/{run.pk}/")

    assert response.status_code == 200
    rows = table_rows(response.text)
    assert [row["strength"] for row in rows] == ["×0.5", "×1", "×2", "×4"]
    assert rows[0]["scores"] == {"score": "0.60", "concept": "0.55", "fluency": "0.62", "relevance": "0.64"}
    assert rows[1]["scores"] == {"score": "0.30", "concept": "0.90", "fluency": "0.18", "relevance": "0.45"}
    assert [(row["best_row"], row["badge"]) for row in rows] == [(True, True)] + [(False, False)] * 3
    assert "harmonic mean of concept, fluency and relevance" in response.text


def test_the_chart_plots_the_scores_and_rings_the_best_variant_not_the_lowest_perplexity(
    client, owner, training, make_run
):
    run = completed_sweep(make_run, owner, ISSUE_SWEEP)
    client.force_login(owner)

    chart = client.get(f"/steering/runs/{run.pk}/").context["sweep"]["chart"]

    lines = {line["name"]: line for line in chart["series"]}
    assert set(lines) == {"score", "concept", "fluency", "relevance"}
    assert all(len(line["dots"]) == 4 for line in lines.values())
    heights = [dot["y"] for dot in lines["score"]["dots"]]
    assert heights[0] < heights[1] < heights[2] < heights[3]  # SVG y grows downward: 0.6 drawn highest
    assert chart["best"] == lines["score"]["dots"][0]  # the ring sits on x0.5's score


def test_a_tie_goes_to_the_gentler_strength(client, owner, training, make_run):
    tied = [
        variant(2.0, "Sea sea waves.", 20.0, scores(0.5, 0.6, 0.4, 0.5)),
        variant(-1.0, "No sea here.", 12.0, scores(0.5, 0.5, 0.5, 0.5)),
        variant(1.0, "The sea is calm.", 10.0, scores(0.5, 0.4, 0.6, 0.5)),
    ]
    run = completed_sweep(make_run, owner, tied)
    client.force_login(owner)

    rows = table_rows(client.get(f"/steering/runs/{run.pk}/").text)

    assert [row["badge"] for row in rows] == [False, True, False]  # |-1| ties |1| and comes first


def test_no_variant_is_best_when_every_score_is_zero(client, owner, training, make_run):
    failed_all = [
        variant(4.0, "a a a", 3.0, scores(0.0, 1.0, 0.0, 0.0)),
        variant(8.0, "b b b", 2.0, scores(0.0, 1.0, 0.0, 0.0)),
    ]
    run = completed_sweep(make_run, owner, failed_all)
    client.force_login(owner)

    response = client.get(f"/steering/runs/{run.pk}/")

    assert not any(row["badge"] or row["best_row"] for row in table_rows(response.text))
    assert response.context["sweep"]["chart"]["best"] is None


def test_a_sweep_stored_before_scores_still_renders_with_dashes_and_no_chart(
    client, owner, training, make_run
):
    old = [variant(item["multiplier"], item["steered_output"], 5.0, None) for item in ISSUE_SWEEP]
    run = completed_sweep(make_run, owner, old)
    client.force_login(owner)

    response = client.get(f"/steering/runs/{run.pk}/")

    assert response.status_code == 200
    rows = table_rows(response.text)
    assert [row["scores"] for row in rows] == [
        {"score": "–", "concept": "–", "fluency": "–", "relevance": "–"}
    ] * 4
    assert [row["perplexity"] for row in response.context["sweep"]["rows"]] == [
        "5.00"
    ] * 4  # the metrics stay
    assert not any(row["badge"] for row in rows)
    assert response.context["sweep"]["chart"] is None and "sweep-chart" not in response.text


def test_a_single_comparison_shows_its_scores_in_the_metrics(client, owner, training, make_run):
    first = variant(1.0, "The planet Earth is home to oceans.", 14.0, scores(0.71, 0.66, 0.8, 0.69))
    run = completed_sweep(make_run, owner, [first])
    run.sweep = None
    run.save(update_fields=["sweep"])
    client.force_login(owner)

    html = client.get(f"/steering/runs/{run.pk}/").text

    scores_line = re.search(r'data-metric="scores">(.*?)</p>', html, re.DOTALL).group(1)
    shown = dict(re.findall(r'data-score="(\w+)">(.*?)</', scores_line))
    assert shown == {"score": "0.71", "concept": "0.66", "fluency": "0.80", "relevance": "0.69"}
    assert 'id="sweep-result"' not in html


def test_a_single_comparison_stored_before_scores_shows_dashes(client, owner, training, make_run):
    now = timezone.now()
    run = make_run(
        owner,
        status="completed",
        unsteered_output="It is dry.",
        steered_output="It rains.",
        metrics={"kl_divergence": 0.1, "perplexity_delta": 1.0, "feature_activation": []},
        started_at=now,
        finished_at=now,
    )
    client.force_login(owner)

    response = client.get(f"/steering/runs/{run.pk}/")

    assert response.status_code == 200
    assert response.context["metrics"]["scores"] == {
        "score": "–",
        "concept": "–",
        "fluency": "–",
        "relevance": "–",
    }


def test_scores_arrive_with_the_final_fragment_the_stream_ends_with(owner, training, make_run):
    run = make_run(owner, status="running", sweep=[0.5, 1.0, 2.0, 4.0], started_at=timezone.now())
    streaming = render_to_string(
        f"{RESULT_TEMPLATE}#streaming", result_context(run, "Planets", ["The", "Earth"])
    )
    assert "data-score" not in streaming  # nothing is scored until the run completes

    run.status = "completed"
    run.variants = ISSUE_SWEEP
    run.finished_at = timezone.now()
    run.save()
    final = render_to_string(f"{RESULT_TEMPLATE}#final", {**result_context(run), "oob": True})

    rows = table_rows(final)
    assert [row["scores"]["score"] for row in rows] == ["0.60", "0.30", "0.10", "0.00"]
    assert rows[0]["badge"] and 'class="sweep-series series-score"' in final


def test_the_table_starts_with_the_unsteered_baseline_and_shows_each_variants_coefficients(
    client, owner, training, make_run
):
    activations = [{"feature_id": 3, "unsteered": 0.5, "steered": 2.0}, {"feature_id": 7, "unsteered": 0.5}]
    sweep = [
        {
            **item,
            "metrics": {**item["metrics"], "perplexity_unsteered": 9.5, "feature_activation": activations},
        }
        for item in ISSUE_SWEEP
    ]
    run = completed_sweep(make_run, owner, sweep)
    run.features = [{"feature_id": 3, "coefficient": 2.0}, {"feature_id": 7, "coefficient": -0.5}]
    run.save(update_fields=["features"])
    client.force_login(owner)

    response = client.get(f"/steering/runs/{run.pk}/")

    summary = response.context["sweep"]
    assert [row["coefficients"] for row in summary["rows"]] == [
        "#3 1, #7 -0.25",
        "#3 2, #7 -0.5",
        "#3 4, #7 -1",
        "#3 8, #7 -2",
    ]
    assert summary["baseline"] == {"coefficients": "#3 0, #7 0", "activation": "0.500", "perplexity": "9.50"}
    body = response.text[response.text.index("<tbody>") :]
    first_row = body[: body.index("</tr>")]
    assert 'data-variant="baseline"' in first_row and ">unsteered<" in first_row and ">9.50<" in first_row
    assert ">#3 1, #7 -0.25<" in body
    # The chart's x axis is the multiplier through 0 (the baseline), titled, with a tick per variant.
    chart = summary["chart"]
    assert [tick["label"] for tick in chart["ticks"]] == ["0", "×0.5", "×1", "×2", "×4"]
    xs = [tick["x"] for tick in chart["ticks"]]
    assert xs[2] - xs[1] == pytest.approx(xs[1] - xs[0], abs=0.2) and xs[4] - xs[3] == pytest.approx(
        2 * (xs[3] - xs[2]), abs=0.2
    )
    assert [line["label"] for line in chart["grid"]] == ["0", "0.25", "0.5", "0.75", "1"]
    assert "score (0 to 1)" in response.text and "strength: multiplier of every coefficient" in response.text
