"""POST /api/trainings/{id}/features/active: the features a prompt lights up, on the real SmolLM2 and demo SAE."""

import pytest

from steering_app.models import Feature, Training
from tests.api.support import assert_error

PLANETS = "The planets of the solar system orbit the Sun: Mars, Venus, Jupiter and Earth."
SEA = "The sea was calm and the ocean water was cold."
PLANET, SEA_FEATURE = 1681, 1163


def url(training) -> str:
    return f"/api/trainings/{training.pk}/features/active"


def post(client, headers, training, body):
    return client.post(url(training), body, content_type="application/json", headers=headers)


@pytest.mark.slow
def test_it_lists_the_planet_feature_among_the_strongest_on_a_prompt_about_planets(
    client, owner, bearer, demo_feature_space
):
    response = post(client, bearer(owner), demo_feature_space, {"prompt": PLANETS})

    assert response.status_code == 200, response.content
    features = response.json()["features"]
    assert len(features) == 20
    activations = [item["activation"] for item in features]
    assert activations == sorted(activations, reverse=True) and activations[-1] > 0
    top = [item["index"] for item in features[:10]]
    assert PLANET in top, [(item["index"], item["label"]) for item in features]
    planet = next(item for item in features if item["index"] == PLANET)
    row = Feature.objects.get(training=demo_feature_space, index=PLANET)
    assert (planet["label"], planet["max_activation"]) == (row.label, row.max_activation)
    assert planet["token"].strip() in PLANETS  # the prompt token it peaks on


@pytest.mark.slow
def test_it_reads_the_users_text_inside_the_chat_template(client, owner, bearer, demo_feature_space):
    response = post(client, bearer(owner), demo_feature_space, {"prompt": SEA, "chat": True, "limit": 5})

    assert response.status_code == 200, response.content
    features = response.json()["features"]
    assert len(features) == 5 and features[0]["index"] == SEA_FEATURE
    # Only the user's words: nothing from the template's system turn ("You are a helpful AI assistant ...").
    assert all(item["token"].strip() in SEA for item in features), features


@pytest.mark.parametrize("prompt", ["", "   \n"])
def test_it_refuses_an_empty_prompt_naming_the_field(client, owner, bearer, training, prompt):
    body = assert_error(post(client, bearer(owner), training, {"prompt": prompt}), 400, "prompt")

    assert "prompt is empty" in body["detail"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "prompt"),
        ({"prompt": 5}, "prompt"),
        ({"prompt": "a", "chat": 1}, "chat"),
        ({"prompt": "a", "limit": 0}, "limit"),
    ],
)
def test_it_refuses_a_malformed_body(client, owner, bearer, training, body, field):
    assert_error(post(client, bearer(owner), training, body), 400, field)


def test_it_answers_404_for_an_unknown_training(client, owner, bearer, training):
    response = client.post(
        f"/api/trainings/{training.pk + 1}/features/active",
        {"prompt": PLANETS},
        content_type="application/json",
        headers=bearer(owner),
    )

    assert_error(response, 404, "training_id")


def test_it_answers_409_for_a_training_that_has_not_completed(client, owner, bearer, training):
    Training.objects.filter(pk=training.pk).update(status=Training.Status.RUNNING)

    assert_error(post(client, bearer(owner), training, {"prompt": PLANETS}), 409, "training_id")


def test_it_answers_anonymous_requests_with_401(client, training):
    assert_error(post(client, {}, training, {"prompt": PLANETS}), 401)
