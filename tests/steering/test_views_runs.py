"""/steering/runs/ and /steering/runs/<id>/: stored comparisons."""

import pytest
from django.utils import timezone

from steering_app.models import SteeringRun

pytestmark = pytest.mark.django_db

METRICS = {
    "kl_divergence": 0.123456,
    "perplexity_delta": 2.5,
    "perplexity_unsteered": 10.0,
    "perplexity_steered": 12.5,
    "semantic_similarity": 0.8123,
    "word_overlap": 0.5,
    "feature_activation": [{"feature_id": 3, "unsteered": 0.25, "steered": 3.5}],
}


def completed(make_run, owner, **changes) -> SteeringRun:
    now = timezone.now()
    return make_run(
        owner,
        status="completed",
        unsteered_output="It is dry.",
        steered_output="It rains and pours.",
        metrics=METRICS,
        started_at=now - timezone.timedelta(seconds=3),
        finished_at=now,
        **changes,
    )


def listed(response) -> list[int]:
    return [run.pk for run in response.context["page"].object_list]


def test_the_list_requires_login(client):
    response = client.get("/steering/runs/")
    assert response.status_code == 302 and response["Location"].startswith("/login/")


def test_the_list_shows_only_the_users_runs_newest_first(client, owner, stranger, training, make_run):
    now = timezone.now()
    old = make_run(owner, created_at=now - timezone.timedelta(hours=2))
    new = make_run(owner, created_at=now)
    make_run(stranger)
    client.force_login(owner)

    response = client.get("/steering/runs/")

    assert response.status_code == 200 and listed(response) == [new.pk, old.pk]
    assert response.context["show_owner"] is False


def test_staff_see_every_run_with_its_owner(client, owner, stranger, staff, training, make_run):
    runs = [make_run(owner), make_run(stranger)]
    client.force_login(staff)
    response = client.get("/steering/runs/")
    assert sorted(listed(response)) == sorted(run.pk for run in runs)
    assert response.context["show_owner"] is True and "stranger" in response.text


def test_the_list_is_paginated(client, owner, training, make_run):
    now = timezone.now()
    for minutes in range(25):
        make_run(owner, created_at=now - timezone.timedelta(minutes=minutes))
    client.force_login(owner)

    first, second = client.get("/steering/runs/"), client.get("/steering/runs/", {"page": 2})

    assert len(listed(first)) == 20 and len(listed(second)) == 5
    assert not set(listed(first)) & set(listed(second))
    assert client.get("/steering/runs/", {"page": 99}).status_code == 200  # the last page, not an error


def test_the_detail_requires_login(client, owner, training, make_run):
    run = make_run(owner)
    response = client.get(f"/steering/runs/{run.pk}/")
    assert response.status_code == 302 and response["Location"].startswith("/login/")


def test_another_users_run_is_404(client, owner, stranger, training, make_run):
    run = completed(make_run, owner)
    client.force_login(stranger)
    assert client.get(f"/steering/runs/{run.pk}/").status_code == 404


def test_staff_can_open_any_run(client, owner, staff, training, make_run):
    run = completed(make_run, owner)
    client.force_login(staff)
    assert client.get(f"/steering/runs/{run.pk}/").status_code == 200


def test_the_detail_shows_the_stored_comparison_settings_and_metrics(client, owner, training, make_run):
    run = completed(make_run, owner)
    client.force_login(owner)

    response = client.get(f"/steering/runs/{run.pk}/")

    html = response.text
    assert response.status_code == 200
    assert "It is dry." in html and "It rains and pours." in html
    assert "0.1235" in html and "+2.50" in html and "Higher uncertainty" in html
    assert "81.2%" in html and "50.0%" in html
    assert "weather and rain" in html and "0.250 → " in html and "3.500" in html
    assert "Seed 42" in html and "Tell me about rain" in html
    assert f'href="/steering/?run={run.pk}"' in html  # Re-run
    assert "ws-connect" not in html  # nothing left to stream


def test_a_lower_perplexity_is_emerald(client, owner, training, make_run):
    run = completed(make_run, owner)
    SteeringRun.objects.filter(pk=run.pk).update(metrics={**METRICS, "perplexity_delta": -1.25})
    client.force_login(owner)
    html = client.get(f"/steering/runs/{run.pk}/").text
    assert '<div class="metric-value text-emerald">-1.25</div>' in html and "Lower uncertainty" in html


def test_an_unchanged_perplexity_is_neutral(client, owner, training, make_run):
    run = completed(make_run, owner)
    SteeringRun.objects.filter(pk=run.pk).update(metrics={**METRICS, "perplexity_delta": 0.0})
    client.force_login(owner)
    html = client.get(f"/steering/runs/{run.pk}/").text
    assert '<div class="metric-value text-slate">0.00</div>' in html and "No change in uncertainty" in html
    assert "Lower uncertainty" not in html


def test_it_shows_the_in_run_activation_beside_the_clean_models_reading(client, owner, training, make_run):
    run = completed(make_run, owner)
    activation = {"feature_id": 3, "unsteered": 0.25, "steered": 3.5, "steered_in_run": 7.125}
    SteeringRun.objects.filter(pk=run.pk).update(metrics={**METRICS, "feature_activation": [activation]})
    client.force_login(owner)
    html = client.get(f"/steering/runs/{run.pk}/").text
    assert "clean model reading the texts, unsteered → steered" in html and "0.250 → " in html
    assert "in the steered run, steering on" in html and "7.125" in html


@pytest.mark.parametrize(("chat", "shown"), [(False, True), (True, False)])
def test_it_shows_the_prompt_greyed_before_a_continuation_but_not_before_a_chat_answer(
    client, owner, training, make_run, chat, shown
):
    run = completed(make_run, owner, chat=chat)
    client.force_login(owner)
    html = client.get(f"/steering/runs/{run.pk}/").text
    prefix = '<span class="output-prompt" title="The prompt (not generated)">Tell me about rain</span>'
    assert html.count(prefix) == (2 if shown else 0)  # before both columns
    assert '<div id="unsteered-output" class="output-text">It is dry.</div>' in html


def test_a_streaming_run_says_it_is_loading_the_model_until_its_first_token(
    client, owner, training, make_run
):
    run = make_run(owner, status="running", started_at=timezone.now())
    client.force_login(owner)
    html = client.get(f"/steering/runs/{run.pk}/").text
    # Empty columns: the CSS shows the placeholder while #run-result streams and the column is still empty.
    assert '<div id="steered-output" class="output-text"></div>' in html
    assert html.count("loading the model…") == 2


def test_a_failed_run_shows_its_reason(client, owner, training, make_run):
    run = make_run(owner, status="failed", error="no worker available", finished_at=timezone.now())
    client.force_login(owner)
    response = client.get(f"/steering/runs/{run.pk}/")
    assert response.status_code == 200 and "no worker available" in response.text


def test_an_unfinished_run_connects_to_its_stream(client, owner, training, make_run):
    run = make_run(owner)
    client.force_login(owner)
    html = client.get(f"/steering/runs/{run.pk}/").text
    assert f'ws-connect="/ws/steering/runs/{run.pk}/"' in html and 'data-state="streaming"' in html


def test_the_stop_button_shows_on_an_unfinished_run_for_its_owner_only(
    client, owner, staff, training, make_run
):
    run = make_run(owner)  # queued
    client.force_login(owner)
    assert 'id="stop-run"' in client.get(f"/steering/runs/{run.pk}/").text
    client.force_login(staff)
    assert 'id="stop-run"' in client.get(f"/steering/runs/{run.pk}/").text
    finished = completed(make_run, owner)
    assert 'id="stop-run"' not in client.get(f"/steering/runs/{finished.pk}/").text


def test_stop_cancels_the_run_for_its_owner(client, owner, training, make_run):
    run = make_run(owner)
    client.force_login(owner)

    response = client.post(f"/steering/runs/{run.pk}/cancel/", headers={"HX-Request": "true"})

    assert response.status_code == 204
    run.refresh_from_db()
    assert (run.status, run.error) == ("cancelled", "cancelled by owner")


def test_stop_without_htmx_returns_to_the_run_page_which_says_cancelled(client, owner, training, make_run):
    run = make_run(owner)
    client.force_login(owner)

    response = client.post(f"/steering/runs/{run.pk}/cancel/", follow=True)

    assert response.redirect_chain == [(f"/steering/runs/{run.pk}/", 302)]
    assert "Run cancelled" in response.text and "cancelled by owner" in response.text


def test_stop_refuses_strangers_and_changes_nothing(client, owner, stranger, training, make_run):
    run = make_run(owner)
    client.force_login(stranger)

    assert client.post(f"/steering/runs/{run.pk}/cancel/").status_code == 404
    assert client.get(f"/steering/runs/{run.pk}/cancel/").status_code == 405
    run.refresh_from_db()
    assert run.status == "queued"
