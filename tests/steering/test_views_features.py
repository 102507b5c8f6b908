"""Feature search and the feature card partial of the panel."""

import re

import pytest

from steering_app import services, wake
from steering_app.models import AnalysisJob, Feature, Training

pytestmark = pytest.mark.django_db


def search(client, training, q):
    return client.get(f"/steering/trainings/{training.pk}/features/", {"q": q}, HTTP_HX_REQUEST="true")


def found(response) -> list[int]:
    return [
        int(index) for index in re.findall(r'class="feature-result" data-feature-id="(\d+)"', response.text)
    ]


def test_it_requires_login(client, training):
    response = search(client, training, "rain")
    assert response.status_code == 302 and response["Location"].startswith("/login/")


def test_it_searches_labels_case_insensitively(client, owner, training):
    client.force_login(owner)
    response = search(client, training, "RAIN")
    assert response.status_code == 200 and found(response) == [3]
    assert "weather and rain" in response.text and "max act 4.00" in response.text


def test_it_searches_descriptions(client, owner, training):
    Feature.objects.filter(training=training, index=20).update(description="fires on Python decorators")
    client.force_login(owner)
    assert found(search(client, training, "decorators")) == [20]


@pytest.mark.parametrize("q", ["12", "#12"])
def test_it_finds_a_feature_by_index(client, owner, training, q):
    client.force_login(owner)
    assert 12 in found(search(client, training, q))


def test_it_returns_nothing_for_an_empty_query(client, owner, training):
    client.force_login(owner)
    response = search(client, training, "  ")
    assert response.status_code == 200 and found(response) == []


def test_it_stays_within_the_training(client, owner, training, make_training):
    other = make_training(d_sae=4)
    Feature.objects.create(training=other, index=0, label="rain elsewhere")
    client.force_login(owner)
    assert found(search(client, training, "rain")) == [3]


def test_it_limits_the_number_of_results(client, owner, training):
    client.force_login(owner)
    assert len(found(search(client, training, "feature"))) == 20


def test_it_404s_for_a_training_that_is_not_completed(client, owner, training):
    Training.objects.filter(pk=training.pk).update(status="running")
    client.force_login(owner)
    assert search(client, training, "rain").status_code == 404


def test_the_card_has_the_features_inputs_and_starts_at_the_amplify_coefficient(client, owner, training):
    client.force_login(owner)
    response = client.get(f"/steering/trainings/{training.pk}/features/7/card/", HTTP_HX_REQUEST="true")
    assert response.status_code == 200
    assert 'name="feature_id" value="7"' in response.text
    assert 'name="coefficient"' in response.text and 'value="2"' in response.text
    assert 'class="coefficient-number"' in response.text  # the number box beside the slider
    assert "python code" in response.text
    for button in ("Suppress", "Reset", "Amplify"):
        assert button in response.text


def test_the_card_says_when_the_max_activation_is_unknown(client, owner, training):
    Feature.objects.filter(training=training, index=7).update(max_activation=None)
    client.force_login(owner)
    response = client.get(f"/steering/trainings/{training.pk}/features/7/card/")
    assert "Max activation unknown: additive steering uses 1." in response.text


def test_the_card_404s_for_a_feature_outside_the_training(client, owner, training):
    client.force_login(owner)
    assert client.get(f"/steering/trainings/{training.pk}/features/32/card/").status_code == 404


def test_the_card_of_a_calibrated_feature_keeps_the_max_activation_scale(client, owner, training):
    client.force_login(owner)
    response = client.get(f"/steering/trainings/{training.pk}/features/7/card/")
    assert 'data-calibrated="true"' in response.text and "−5.0 (suppress)" in response.text
    assert "uncalibrated" not in response.text and "data-dead" not in response.text


def test_the_card_of_an_uncalibrated_feature_says_c_is_in_residual_units(client, owner, training):
    Feature.objects.filter(training=training).update(max_activation=None)
    client.force_login(owner)
    response = client.get(f"/steering/trainings/{training.pk}/features/7/card/")
    assert response.status_code == 200 and 'data-calibrated="false"' in response.text
    assert "uncalibrated: c is in residual-stream units" in response.text
    assert 'class="scale residual-scale"' in response.text


def test_the_card_of_a_dead_feature_is_greyed(client, owner, training):
    Feature.objects.filter(training=training, index=7).update(activation_frequency=0.0)
    client.force_login(owner)
    response = client.get(f"/steering/trainings/{training.pk}/features/7/card/")
    assert "data-dead" in response.text and "Dead: it never fired during calibration." in response.text


def test_search_results_say_which_features_are_uncalibrated_or_dead(client, owner, training):
    Feature.objects.filter(training=training, index=3).update(max_activation=None, activation_frequency=0.0)
    Feature.objects.filter(training=training, index=12).update(activation_frequency=None)
    client.force_login(owner)

    dead = search(client, training, "rain").text
    unmeasured = search(client, training, "cooking").text

    assert 'data-feature-id="3" data-dead' in dead and "dead: never fired" in dead
    assert "uncalibrated: c is in residual-stream units" in dead
    assert "data-dead" not in unmeasured and "uncalibrated" not in unmeasured


def test_it_says_how_many_of_all_matches_it_shows_and_loads_more(client, owner, training):
    client.force_login(owner)

    first = search(client, training, "feature")
    more = client.get(
        f"/steering/trainings/{training.pk}/features/", {"q": "feature", "offset": 20}, HTTP_HX_REQUEST="true"
    )

    assert "20 of 29 features match" in first.text and 'id="feature-results-more"' in first.text
    assert "offset=20" in first.text
    assert more.status_code == 200 and len(found(more)) == 9
    assert not set(found(first)) & set(found(more))
    # The count above the list is swapped out of band; nothing is left to load.
    assert 'id="feature-results-count" hx-swap-oob="true">29 of 29' in more.text
    assert 'id="feature-results-more"' not in more.text


def test_it_ranks_the_demo_feature_named_by_the_word_first(client, owner, demo_feature_space):
    client.force_login(owner)

    response = search(client, demo_feature_space, "planet")

    # The 14 features holding the word, and one more near it in meaning.
    assert found(response)[0] == 1681 and "15 of 15 features match" in response.text


def test_a_result_details_its_feature(client, owner, demo_feature_space):
    client.force_login(owner)

    html = search(client, demo_feature_space, "planet").text
    row = html[html.index('data-feature-id="1681"') :]

    assert '<details class="feature-details">' in row
    assert '<span class="token mono">planet</span>' in row  # top tokens
    assert "of tokens" in row and "Max activation" in row
    assert "<mark>" in row  # a snippet with its strongest token marked


def test_the_card_of_a_selected_feature_has_the_same_details(client, owner, demo_feature_space):
    client.force_login(owner)

    response = client.get(f"/steering/trainings/{demo_feature_space.pk}/features/1681/card/")

    assert '<details class="feature-details">' in response.text and "<mark>" in response.text


def prompt_features(client, training, prompt: str, **extra):
    return client.post(
        f"/steering/trainings/{training.pk}/features/active/",
        {"prompt": prompt, **extra},
        HTTP_HX_REQUEST="true",
    )


def test_prompt_features_require_login(client, training):
    response = prompt_features(client, training, "planets")
    assert response.status_code == 302 and response["Location"].startswith("/login/")


def test_prompt_features_say_the_prompt_is_empty(client, owner, training):
    client.force_login(owner)

    response = prompt_features(client, training, "  ")

    assert response.status_code == 422 and "prompt is empty" in response.text


@pytest.mark.slow
def test_prompt_features_list_the_features_the_prompt_lights_up_with_add_buttons(
    client, owner, demo_feature_space
):
    client.force_login(owner)

    response = prompt_features(
        client, demo_feature_space, "The planets of the solar system orbit the Sun: Mars, Venus and Earth."
    )

    assert response.status_code == 200
    assert 1681 in found(response)
    assert "20 features active on the prompt" in response.text
    assert f'hx-get="/steering/trainings/{demo_feature_space.pk}/features/1681/card/"' in response.text


def test_prompt_features_are_read_by_a_worker_and_no_job_is_kept(client, owner, training, monkeypatch):
    monkeypatch.setattr(
        services,
        "active_latents",
        lambda training, prompt, chat, limit: [
            {"index": 12, "activation": 4.0, "token": " soup"},
            {"index": 3, "activation": 1.5, "token": " rain"},
        ],
    )
    client.force_login(owner)

    response = prompt_features(client, training, "Rain, then soup")

    assert response.status_code == 200 and found(response) == [3, 12]  # 1.5 of 4 before 4.0 of 13
    assert "cooking recipes" in response.text and "2 features active on the prompt" in response.text
    assert not AnalysisJob.objects.exists()


def test_prompt_features_refuse_a_prompt_longer_than_a_slot_in_tokens(client, owner, training, monkeypatch):
    monkeypatch.setattr(services, "active_latents", lambda *args: pytest.fail("the model read the prompt"))
    client.force_login(owner)

    response = prompt_features(client, training, "word " * (services.slot_tokens() + 1))

    assert response.status_code == 422 and f"at most {services.slot_tokens()}" in response.text
    assert not AnalysisJob.objects.exists()


def test_prompt_features_say_so_when_no_worker_answers_in_time(
    client, owner, training, monkeypatch, settings
):
    settings.STEERLAB_RUN_TIMEOUT = 0
    monkeypatch.setattr(wake, "submit", lambda run_id=None: None)  # no worker hears of it
    client.force_login(owner)

    response = prompt_features(client, training, "Rain")

    assert response.status_code == 503 and "No steering worker could take the prompt" in response.text
    assert not AnalysisJob.objects.exists()


def test_prompt_features_rank_by_activation_over_max_and_show_both_numbers(
    client, owner, training, monkeypatch
):
    Feature.objects.filter(training=training, index=7).update(max_activation=None)
    monkeypatch.setattr(
        services,
        "active_latents",
        lambda training, prompt, chat, limit: [
            {"index": 7, "activation": 9.0, "token": " code"},  # the strongest, but its max is unknown
            {"index": 12, "activation": 6.5, "token": " soup"},  # 6.5 of its max 13
            {"index": 3, "activation": 3.0, "token": " rain"},  # 3.0 of its max 4
        ],
    )
    client.force_login(owner)

    response = prompt_features(client, training, "Rain, soup and code")

    assert response.status_code == 200 and found(response) == [3, 12, 7]
    assert "0.75 × its max · 3.0 on “ rain”" in response.text and "max act 4.00" in response.text
    assert "0.50 × its max · 6.5 on “ soup”" in response.text
    assert ">9.0 on “ code”" in response.text and "max act unknown" in response.text
    assert "those with no max activation after them, by activation" in response.text
