import re

import pytest
from django.utils.html import escape

from presets_app.models import SteeringPreset
from tests.presets.support import snapshot

URL = "/presets/save/"


@pytest.fixture
def panel_form(training):
    """What the section's Save button posts: the steering form's fields (hx-include) and its own."""
    return {
        "training": str(training.pk),
        "prompt": "The weather today is",
        "method": "additive",
        "temperature": "0.4",
        "max_tokens": "48",
        "seed": "",
        "layers": ["2", "0"],
        "feature_id": ["3", "12"],
        "coefficient": ["2", "-0.5"],
        "preset_name": "rainy",
        "preset_description": "rain, not recipes",
    }


def test_it_saves_the_current_configuration(login, teammate, panel_form, training):
    response = login(teammate).post(URL, panel_form, headers={"HX-Request": "true"})

    assert response.status_code == 200
    preset = SteeringPreset.objects.get()
    assert (preset.owner, preset.training, preset.name, preset.description) == (
        teammate,
        training,
        "rainy",
        "rain, not recipes",
    )
    assert preset.features == [{"feature_id": 3, "coefficient": 2.0}, {"feature_id": 12, "coefficient": -0.5}]
    assert (preset.intervention_layers, preset.method, preset.temperature, preset.max_tokens) == (
        [0, 2],
        "additive",
        0.4,
        48,
    )
    assert (preset.prompt, preset.seed, preset.chat) == ("The weather today is", None, False)
    assert [p.pk for p in response.context["presets"]] == [preset.pk]
    assert response.context["notice"] == "Saved “rainy”."


def test_it_saves_the_seed_and_chat_setting_of_the_panel(login, owner, panel_form):
    panel_form.update(seed="1234", chat="1")

    login(owner).post(URL, panel_form, headers={"HX-Request": "true"})

    preset = SteeringPreset.objects.get()
    assert (preset.prompt, preset.seed, preset.chat) == ("The weather today is", 1234, True)


def test_it_names_the_preset_automatically(login, owner, panel_form):
    panel_form["preset_name"] = "  "

    login(owner).post(URL, panel_form)
    panel_form["layers"] = ["1"]
    login(owner).post(URL, panel_form)

    names = list(SteeringPreset.objects.order_by("pk").values_list("name", flat=True))
    assert re.fullmatch(r"steering_2features_layers0-2_\d{4}", names[0])
    assert re.fullmatch(r"steering_2features_layer1_\d{4}", names[1])


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"feature_id": ["3", "40"], "coefficient": ["1", "1"]}, "features"),
        ({"feature_id": [], "coefficient": []}, "features"),
        ({"feature_id": ["3"], "coefficient": ["1", "2"]}, "features"),
        ({"coefficient": ["2", "lots"]}, "features"),
        ({"coefficient": ["2", "nan"]}, "features"),
        ({"layers": ["9"]}, "intervention_layers"),
        ({"layers": []}, "intervention_layers"),
        ({"temperature": "7"}, "temperature"),
        ({"max_tokens": "many"}, "max_tokens"),
        ({"method": "multiplicative"}, "intervention_layers"),
        ({"training": ""}, "training_id"),
        ({"preset_name": "x" * 201}, "name"),
        ({"seed": "-4"}, "seed"),
        ({"seed": "soon"}, "seed"),
        ({"coefficient": ["0", "0"], "sweep": "1e308"}, "sweep"),  # past ±10000, as the API refuses it
    ],
)
def test_it_saves_nothing_and_shows_why_on_an_error(login, owner, panel_form, preset, change, field):
    before = snapshot()
    panel_form.update(change)

    response = login(owner).post(URL, panel_form, headers={"HX-Request": "true"})

    assert response.status_code == 200
    assert response.context["error"].field == field
    assert escape(response.context["error"].message) in response.content.decode()
    assert snapshot() == before


def test_it_keeps_what_was_typed_after_an_error(login, owner, panel_form, preset):
    panel_form["preset_name"] = preset.name

    response = login(owner).post(URL, panel_form)

    assert response.context["error"].field == "name"
    assert (response.context["name"], response.context["description"]) == (preset.name, "rain, not recipes")
    assert SteeringPreset.objects.count() == 1


def test_it_sends_anonymous_users_to_log_in(client, panel_form):
    response = client.post(URL, panel_form)

    assert response.status_code == 302
    assert not SteeringPreset.objects.exists()


def test_it_only_accepts_post(login, owner):
    assert login(owner).get(URL).status_code == 405
