"""POST /api/trainings/{id}/features/active: the features a prompt lights up, on the real SmolLM2 and demo SAE."""

import resource
import time

import pytest

from steering_app import services, wake
from steering_app.errors import InvalidInput
from steering_app.models import AnalysisJob, Feature, Training
from tests.api.conftest import FAKE_LATENT
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
    ratios = [item["relative_activation"] for item in features]
    assert ratios == sorted(ratios, reverse=True) and ratios[-1] > 0
    assert all(
        item["activation"] / item["max_activation"] == pytest.approx(item["relative_activation"])
        for item in features
    )
    # Commas and "the" fire near their own max on any text, so "planet" (28.5 of 40.5 on " Mars") is 12th.
    listed = [item["index"] for item in features]
    assert PLANET in listed, [(item["index"], item["label"]) for item in features]
    planet = next(item for item in features if item["index"] == PLANET)
    row = Feature.objects.get(training=demo_feature_space, index=PLANET)
    assert (planet["label"], planet["max_activation"]) == (row.label, row.max_activation)
    assert planet["token"].strip() in PLANETS  # the prompt token it peaks on


@pytest.mark.slow
def test_it_reads_the_users_text_inside_the_chat_template(client, owner, bearer, demo_feature_space):
    response = post(client, bearer(owner), demo_feature_space, {"prompt": SEA, "chat": True, "limit": 5})

    assert response.status_code == 200, response.content
    features = response.json()["features"]
    assert len(features) == 5 and SEA_FEATURE in [item["index"] for item in features[:2]]
    # Only the user's words: nothing from the template's system turn ("You are a helpful AI assistant ...").
    assert all(item["token"].strip() in SEA for item in features), features


def test_it_answers_through_a_worker_with_each_features_row_and_keeps_no_job(
    client, owner, bearer, training, fake_engine
):
    response = post(client, bearer(owner), training, {"prompt": "Tell me about rain", "limit": 5})

    assert response.status_code == 200, response.content
    row = Feature.objects.get(training=training, index=FAKE_LATENT["index"])
    assert response.json() == {
        "features": [
            {
                **FAKE_LATENT,
                "label": row.label,
                "max_activation": row.max_activation,
                "relative_activation": FAKE_LATENT["activation"] / row.max_activation,
                "activation_frequency": row.activation_frequency,
            }
        ]
    }
    assert not AnalysisJob.objects.exists()


def test_it_ranks_by_activation_over_max_activation_then_the_uncalibrated_by_activation(
    client, owner, bearer, training, monkeypatch, settings
):
    settings.STEERLAB_WORKER_MODE = "inline"
    Feature.objects.filter(training=training, index__in=[7, 9]).update(max_activation=None)
    asked = []

    def every_active_latent(training, prompt, chat, limit):
        asked.append(limit)
        # Raw order; the fixture's feature i has max activation i + 1, 7 and 9 none.
        return [
            {"index": 7, "activation": 9.0, "token": " code"},
            {"index": 12, "activation": 6.5, "token": " soup"},
            {"index": 3, "activation": 3.0, "token": " rain"},
            {"index": 9, "activation": 2.5, "token": " and"},
            {"index": 20, "activation": 2.1, "token": " then"},
        ]

    monkeypatch.setattr(services, "active_latents", every_active_latent)

    features = post(client, bearer(owner), training, {"prompt": "Rain, soup, code", "limit": 4}).json()[
        "features"
    ]

    # 3: 3.0 of 4 = 0.75; 12: 6.5 of 13 = 0.5; 20: 2.1 of 21 = 0.1; then 7 (9.0) before 9 (2.5), max unknown.
    assert [item["index"] for item in features] == [3, 12, 20, 7]
    assert [item["relative_activation"] for item in features[:3]] == pytest.approx([0.75, 0.5, 0.1])
    assert features[3]["relative_activation"] is None
    assert [item["activation"] for item in features] == [3.0, 6.5, 2.1, 9.0]
    assert asked == [training.d_sae]  # the worker lists every active latent; the limit applies to the ranking


def test_it_refuses_a_prompt_longer_than_a_slot_in_tokens_before_queueing_it(
    client, owner, bearer, training, monkeypatch
):
    monkeypatch.setattr(services, "active_latents", lambda *args: pytest.fail("the model read the prompt"))
    prompt = "word " * (services.slot_tokens() + 1)  # the fake model counts a word a token

    body = assert_error(post(client, bearer(owner), training, {"prompt": prompt}), 400, "prompt")

    assert f"at most {services.slot_tokens()}" in body["detail"]
    assert not AnalysisJob.objects.exists()


def test_a_prompt_the_engine_refuses_is_a_400_naming_its_field(client, owner, bearer, training, monkeypatch):
    def refuse(training, prompt, chat, limit):
        raise InvalidInput("this model's tokenizer has no chat template", "chat")

    monkeypatch.setattr(services, "active_latents", refuse)

    body = assert_error(post(client, bearer(owner), training, {"prompt": SEA, "chat": True}), 400, "chat")

    assert body["detail"] == "this model's tokenizer has no chat template"


def test_it_answers_503_and_drops_the_job_when_no_worker_answers_in_time(
    client, owner, bearer, training, monkeypatch, settings
):
    settings.STEERLAB_RUN_TIMEOUT = 0
    monkeypatch.setattr(wake, "submit", lambda run_id=None: None)  # no worker hears of it

    assert_error(post(client, bearer(owner), training, {"prompt": SEA}), 503)
    assert not AnalysisJob.objects.exists()


# What took daphne 128 s and 4.5 GB in one request: prompts within the character limit, far beyond a slot.
HUGE_PROMPTS = {
    "combining marks": "a" + "\u0301" * 5000,
    "CJK": "\u6c34" * 20_000,
    "ASCII": ("The sea was calm and the ocean water was cold. " * 500)[:20_000],
}


@pytest.mark.slow
def test_it_refuses_huge_prompts_quickly_without_growing_in_memory(client, owner, bearer, demo_feature_space):
    services.prompt_token_count(demo_feature_space, "warm up", False)  # the tokenizer loads once per process
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    headers = bearer(owner)

    for name, prompt in HUGE_PROMPTS.items():
        started = time.monotonic()
        body = assert_error(post(client, headers, demo_feature_space, {"prompt": prompt}), 400, "prompt")
        assert time.monotonic() - started < 5, name
        assert f"at most {services.slot_tokens()}" in body["detail"], name

    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_kib) / 1024
    assert grown_mib < 100, f"the peak memory grew by {grown_mib:.0f} MiB"
    assert not AnalysisJob.objects.exists()


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
