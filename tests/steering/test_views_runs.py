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


def test_the_list_shows_method_training_and_labelled_features(client, owner, training, make_run):
    make_run(
        owner,
        method="multiplicative",
        features=[{"feature_id": 3, "coefficient": 2.5}, {"feature_id": 12, "coefficient": -1.0}],
    )
    client.force_login(owner)

    html = client.get("/steering/runs/").text

    assert '<th class="col-training">Training</th>' in html and '<th class="col-method">Method</th>' in html
    assert '<td class="col-method">multiplicative</td>' in html
    assert f"#{training.pk} topk · L2" in html
    assert '#3×2.50</span> <span class="muted">weather and rain</span>' in html
    assert '#12×-1</span> <span class="muted">cooking recipes</span>' in html


def test_everyones_runs_are_the_labs_shared_ones_and_the_users_own(
    client, owner, teammate, stranger, training, make_run
):
    mine_private = make_run(owner, private=True)
    shared = make_run(teammate)
    make_run(stranger, private=True)
    client.force_login(owner)

    response = client.get("/steering/runs/", {"scope": "all"})

    assert sorted(listed(response)) == sorted([mine_private.pk, shared.pk])
    assert response.context["show_owner"] is True and "teammate" in response.text
    assert ">private</span>" in response.text


def test_staff_can_narrow_the_list_to_their_own_runs(client, owner, staff, training, make_run):
    make_run(owner)
    own = make_run(staff)
    client.force_login(staff)

    assert listed(client.get("/steering/runs/", {"scope": "mine"})) == [own.pk]


def test_the_list_filters_by_training_and_by_feature(client, owner, training, make_training, make_run):
    other = make_training()
    rain = make_run(
        owner, features=[{"feature_id": 7, "coefficient": 1.0}, {"feature_id": 3, "coefficient": 2.0}]
    )
    recipes = make_run(owner, features=[{"feature_id": 12, "coefficient": 1.0}])
    elsewhere = make_run(owner, training=other, features=[{"feature_id": 3, "coefficient": 1.0}])
    client.force_login(owner)

    assert sorted(listed(client.get("/steering/runs/", {"feature": "3"}))) == sorted([rain.pk, elsewhere.pk])
    assert listed(client.get("/steering/runs/", {"feature": "#12"})) == [recipes.pk]
    assert listed(client.get("/steering/runs/", {"training": other.pk})) == [elsewhere.pk]
    assert listed(client.get("/steering/runs/", {"training": training.pk, "feature": "3"})) == [rain.pk]
    response = client.get("/steering/runs/", {"feature": "31"})
    assert listed(response) == [] and "No runs match these filters." in response.text


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"feature": "rain"}, "feature"),
        ({"feature": "99999999999999999999"}, "feature"),
        ({"training": "x"}, "training"),
        ({"training": "99999999999999999999"}, "training"),
        ({"scope": "nobody"}, "scope"),
    ],
)
def test_a_bad_filter_is_shown_as_an_error_and_left_out(client, owner, training, make_run, params, field):
    run = make_run(owner)
    client.force_login(owner)

    response = client.get("/steering/runs/", params)

    assert response.status_code == 200 and listed(response) == [run.pk]
    assert f'id="filter-error-{field}"' in response.text


def test_the_pages_keep_the_filters(client, owner, training, make_run):
    for _ in range(21):
        make_run(owner, features=[{"feature_id": 3, "coefficient": 1.0}])
    client.force_login(owner)

    response = client.get("/steering/runs/", {"feature": "3", "training": training.pk})

    assert f'href="?feature=3&amp;training={training.pk}&amp;page=2"' in response.text


def test_the_detail_requires_login(client, owner, training, make_run):
    run = make_run(owner)
    response = client.get(f"/steering/runs/{run.pk}/")
    assert response.status_code == 302 and response["Location"].startswith("/login/")


def test_another_users_private_run_is_404(client, owner, stranger, training, make_run):
    run = completed(make_run, owner, private=True)
    client.force_login(stranger)
    assert client.get(f"/steering/runs/{run.pk}/").status_code == 404


def test_a_teammate_reads_a_shared_run_read_only_with_a_rerun(client, owner, teammate, training, make_run):
    run = completed(make_run, owner)
    client.force_login(teammate)

    response = client.get(f"/steering/runs/{run.pk}/")

    html = response.text
    assert response.status_code == 200 and response.context["can_change"] is False
    assert "It rains and pours." in html and "Shared by <strong>owner</strong>" in html
    assert f'href="/steering/?run={run.pk}"' in html
    assert 'id="toggle-private"' not in html and 'id="delete-run"' not in html


def test_the_owner_sees_the_visibility_switch_and_delete(client, owner, training, make_run):
    run = completed(make_run, owner)
    client.force_login(owner)

    html = client.get(f"/steering/runs/{run.pk}/").text

    assert 'id="toggle-private"' in html and "Make private" in html and 'id="delete-run"' in html


def test_staff_can_open_any_run(client, owner, staff, training, make_run):
    run = completed(make_run, owner, private=True)
    client.force_login(staff)
    response = client.get(f"/steering/runs/{run.pk}/")
    assert response.status_code == 200 and response.context["can_change"] is True


@pytest.mark.parametrize("user", ["owner", "staff"])
def test_the_owner_or_staff_make_a_run_private_and_share_it_again(
    request, client, owner, training, make_run, user
):
    run = completed(make_run, owner)
    client.force_login(request.getfixturevalue(user))
    url = f"/steering/runs/{run.pk}/visibility/"

    response = client.post(url, {"private": "1"})

    assert response.status_code == 302 and response["Location"] == f"/steering/runs/{run.pk}/"
    run.refresh_from_db()
    assert run.private is True
    client.post(url, {"private": "0"})
    run.refresh_from_db()
    assert run.private is False


def test_a_teammate_cannot_change_who_reads_a_shared_run(client, owner, teammate, training, make_run):
    run = completed(make_run, owner)
    client.force_login(teammate)

    response = client.post(f"/steering/runs/{run.pk}/visibility/", {"private": "1"})

    assert response.status_code == 403
    run.refresh_from_db()
    assert run.private is False


def test_a_stranger_cannot_share_a_private_run(client, owner, stranger, training, make_run):
    run = completed(make_run, owner, private=True)
    client.force_login(stranger)

    assert client.post(f"/steering/runs/{run.pk}/visibility/", {"private": "0"}).status_code == 404
    run.refresh_from_db()
    assert run.private is True


def test_the_owner_deletes_a_finished_run_and_returns_to_the_list(client, owner, training, make_run):
    run = completed(make_run, owner)
    client.force_login(owner)

    response = client.post(f"/steering/runs/{run.pk}/delete/")

    assert response.status_code == 302 and response["Location"] == "/steering/runs/"
    assert not SteeringRun.objects.filter(pk=run.pk).exists()


def test_delete_from_htmx_sends_the_browser_to_the_list(client, owner, training, make_run):
    run = completed(make_run, owner)
    client.force_login(owner)

    response = client.post(f"/steering/runs/{run.pk}/delete/", headers={"HX-Request": "true"})

    assert response.status_code == 204 and response["HX-Redirect"] == "/steering/runs/"
    assert not SteeringRun.objects.filter(pk=run.pk).exists()


def test_delete_refuses_a_teammate_and_a_stranger_and_keeps_the_runs(
    client, owner, teammate, stranger, training, make_run
):
    shared, private = completed(make_run, owner), completed(make_run, owner, private=True)

    client.force_login(teammate)
    assert client.post(f"/steering/runs/{shared.pk}/delete/").status_code == 403
    client.force_login(stranger)
    assert client.post(f"/steering/runs/{private.pk}/delete/").status_code == 404
    assert client.get(f"/steering/runs/{shared.pk}/delete/").status_code == 405

    assert SteeringRun.objects.filter(pk__in=[shared.pk, private.pk]).count() == 2


def test_delete_of_an_unfinished_run_says_to_stop_it_first(client, owner, training, make_run):
    run = make_run(owner)  # queued
    client.force_login(owner)

    response = client.post(f"/steering/runs/{run.pk}/delete/")

    assert response.status_code == 409 and "stop it before deleting it" in response.text
    assert SteeringRun.objects.filter(pk=run.pk).exists()


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


def test_stop_refuses_a_teammate_who_reads_the_shared_run(client, owner, teammate, training, make_run):
    run = make_run(owner)
    client.force_login(teammate)

    html = client.get(f"/steering/runs/{run.pk}/").text
    response = client.post(f"/steering/runs/{run.pk}/cancel/")

    assert 'id="stop-run"' not in html and response.status_code == 403
    run.refresh_from_db()
    assert run.status == "queued"


def test_stop_refuses_strangers_and_changes_nothing(client, owner, stranger, training, make_run):
    run = make_run(owner, private=True)
    client.force_login(stranger)

    assert client.post(f"/steering/runs/{run.pk}/cancel/").status_code == 404
    assert client.get(f"/steering/runs/{run.pk}/cancel/").status_code == 405
    run.refresh_from_db()
    assert run.status == "queued"


@pytest.mark.parametrize(
    ("coefficient", "before", "after", "moved", "colour"),
    [
        (-1.0, 4.833, 5.239, "against", "text-red"),  # the ablation: a rise is no success
        (-1.0, 5.239, 4.833, "wanted", "text-emerald"),
        (2.0, 0.25, 3.5, "wanted", "text-emerald"),
        (2.0, 3.5, 0.25, "against", "text-red"),
        (0.0, 0.25, 3.5, "still", "text-slate"),
    ],
)
def test_an_activations_colour_says_whether_it_moved_the_way_the_coefficient_asked(
    client, owner, training, make_run, coefficient, before, after, moved, colour
):
    activation = [{"feature_id": 3, "unsteered": before, "steered": after}]
    run = completed(make_run, owner, features=[{"feature_id": 3, "coefficient": coefficient}])
    SteeringRun.objects.filter(pk=run.pk).update(metrics={**METRICS, "feature_activation": activation})
    client.force_login(owner)

    html = client.get(f"/steering/runs/{run.pk}/").text

    assert f'<span class="reading-steered {colour}" data-moved="{moved}"' in html
    assert f">{after:.3f}</span>" in html
