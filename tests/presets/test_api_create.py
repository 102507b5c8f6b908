import re

import pytest

from presets_app.models import SteeringPreset
from steering_app.models import ApiToken, LanguageModel, Training
from tests.api.support import assert_error

URL = "/api/presets/steering"


@pytest.fixture
def body(training):
    return {
        "training_id": training.pk,
        "name": "rain",
        "description": "more rain",
        "features": [{"feature_id": 3, "coefficient": 2.5}, {"feature_id": 12, "coefficient": -1}],
        "intervention_layers": [3, 1],
        "method": "additive",
        "temperature": 0.3,
        "max_tokens": 32,
    }


def test_it_saves_a_preset_for_the_user(login, teammate, body, training):
    response = login(teammate).post(URL, body, content_type="application/json")

    assert response.status_code == 201
    preset = SteeringPreset.objects.get()
    assert response.json()["id"] == preset.pk
    assert (preset.owner, preset.training, preset.name, preset.description) == (
        teammate,
        training,
        "rain",
        "more rain",
    )
    assert preset.features == [{"feature_id": 3, "coefficient": 2.5}, {"feature_id": 12, "coefficient": -1.0}]
    assert preset.intervention_layers == [1, 3]
    assert (preset.method, preset.temperature, preset.max_tokens, preset.is_favorite) == (
        "additive",
        0.3,
        32,
        False,
    )


def test_it_keeps_no_prompt_seed_or_chat_unless_sent(login, owner, body):
    response = login(owner).post(URL, body, content_type="application/json")

    preset = SteeringPreset.objects.get()
    assert (preset.prompt, preset.seed, preset.chat) == ("", None, False)
    assert {key: response.json()[key] for key in ("prompt", "seed", "chat")} == {
        "prompt": "",
        "seed": None,
        "chat": False,
    }


def test_it_saves_the_prompt_seed_chat_and_method_sent(login, owner, body):
    body.update(
        prompt="Tell me about rain", seed=2**40, chat=True, method="multiplicative", intervention_layers=[2]
    )

    response = login(owner).post(URL, body, content_type="application/json")

    assert response.status_code == 201, response.content
    preset = SteeringPreset.objects.get()
    assert (preset.prompt, preset.seed, preset.chat, preset.method) == (
        "Tell me about rain",
        2**40,
        True,
        "multiplicative",
    )
    assert (response.json()["prompt"], response.json()["seed"], response.json()["chat"]) == (
        "Tell me about rain",
        2**40,
        True,
    )


def test_it_names_a_preset_automatically(login, owner, body):
    body.pop("name")

    login(owner).post(URL, body, content_type="application/json")
    body["intervention_layers"] = [2]
    login(owner).post(URL, body, content_type="application/json")

    names = list(SteeringPreset.objects.order_by("pk").values_list("name", flat=True))
    assert re.fullmatch(r"steering_2features_layers1-3_\d{4}", names[0])
    assert re.fullmatch(r"steering_2features_layer2_\d{4}", names[1])


def test_it_suffixes_a_clashing_automatic_name(login, owner, body):
    body["name"] = ""

    first = login(owner).post(URL, body, content_type="application/json").json()["name"]
    second = login(owner).post(URL, body, content_type="application/json").json()["name"]

    assert second == f"{first} (2)"


def test_it_accepts_a_bearer_token(client, owner, body):
    _, raw = ApiToken.issue(owner)

    response = client.post(
        URL, body, content_type="application/json", headers={"Authorization": f"Bearer {raw}"}
    )

    assert response.status_code == 201
    assert SteeringPreset.objects.get().owner == owner


def test_it_refuses_a_name_taken_in_the_training(login, owner, body, preset):
    body["name"] = preset.name

    assert_error(login(owner).post(URL, body, content_type="application/json"), 400, "name")
    assert SteeringPreset.objects.count() == 1


def test_it_refuses_a_feature_of_another_training(login, owner, body):
    body["features"] = [{"feature_id": 32, "coefficient": 1.0}]

    assert_error(login(owner).post(URL, body, content_type="application/json"), 400, "features")
    assert not SteeringPreset.objects.exists()


def test_it_refuses_a_layer_beyond_the_model(login, owner, body):
    body["intervention_layers"] = [4]

    assert_error(login(owner).post(URL, body, content_type="application/json"), 400, "intervention_layers")
    assert not SteeringPreset.objects.exists()


def test_it_refuses_more_than_twenty_layers(login, owner, body, training):
    LanguageModel.objects.filter(pk=training.model_id).update(num_layers=30)
    body["intervention_layers"] = list(range(21))

    assert_error(login(owner).post(URL, body, content_type="application/json"), 400, "intervention_layers")
    assert not SteeringPreset.objects.exists()


def test_it_refuses_multiplicative_steering_off_the_sae_layer(login, owner, body):
    body["method"] = "multiplicative"

    assert_error(login(owner).post(URL, body, content_type="application/json"), 400, "intervention_layers")
    assert not SteeringPreset.objects.exists()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", 2.5),
        ("max_tokens", 0),
        ("max_tokens", 10**6),
        ("method", "sideways"),
        ("features", []),
        ("is_favorite", 0),
        ("name", "nul\x00"),
        ("temperature", "0.5"),
        ("seed", -1),
        ("seed", 2**63),
        ("seed", "7"),
        ("chat", 1),
        ("prompt", "nul\x00"),
        ("prompt", "x" * 20_001),
        ("prompt", 5),
    ],
)
def test_it_refuses_values_out_of_range_or_of_the_wrong_type(login, owner, body, field, value):
    body[field] = value

    assert_error(login(owner).post(URL, body, content_type="application/json"), 400, field)
    assert not SteeringPreset.objects.exists()


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"sweep": [10**400]}, "sweep.0"),
        ({"features": [{"feature_id": 3, "coefficient": 10**400}]}, "features.0.coefficient"),
        ({"temperature": 10**400}, "temperature"),
        ({"max_tokens": 10**400}, "max_tokens"),
    ],
)
def test_it_refuses_an_integer_too_large_for_a_float_naming_the_field(login, owner, body, changes, field):
    body.update(changes)

    assert_error(login(owner).post(URL, body, content_type="application/json"), 400, field)
    assert not SteeringPreset.objects.exists()


def test_it_refuses_an_unknown_training(login, owner, body):
    body["training_id"] = 999

    assert_error(login(owner).post(URL, body, content_type="application/json"), 404, "training_id")


def test_it_refuses_a_training_that_is_not_completed(login, owner, body, training):
    Training.objects.filter(pk=training.pk).update(status=Training.Status.RUNNING)

    assert_error(login(owner).post(URL, body, content_type="application/json"), 409, "training_id")
    assert not SteeringPreset.objects.exists()


def test_it_refuses_anonymous_users(client, body):
    assert_error(client.post(URL, body, content_type="application/json"), 401)
    assert not SteeringPreset.objects.exists()


def test_it_saves_a_strength_sweep_and_refuses_one_past_the_limit(login, owner, body):
    client = login(owner)
    body["sweep"] = [0.5, 2]
    saved = client.post(URL, body, content_type="application/json")
    assert saved.status_code in (200, 201), saved.content
    assert saved.json()["sweep"] == [0.5, 2.0] and SteeringPreset.objects.get().sweep == [0.5, 2.0]

    body.update(name="too strong", sweep=[1, 1000])
    assert_error(client.post(URL, body, content_type="application/json"), 400, "sweep")
    assert SteeringPreset.objects.count() == 1


def test_it_limits_a_sweep_multiplier_as_the_panel_and_generate_do(login, owner, body):
    body.update(features=[{"feature_id": 3, "coefficient": 0}], sweep=[1, 10_001])

    response = login(owner).post(URL, body, content_type="application/json")

    assert "within ±10000" in assert_error(response, 400, "sweep")["detail"]
    assert not SteeringPreset.objects.exists()
