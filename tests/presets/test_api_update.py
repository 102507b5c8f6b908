import pytest

from presets_app.models import SteeringPreset
from tests.api.support import assert_error
from tests.presets.support import snapshot


def url(pk):
    return f"/api/presets/steering/{pk}"


def test_it_lets_the_owner_change_only_the_fields_sent(login, owner, preset):
    response = login(owner).patch(
        url(preset.pk), {"name": "renamed", "intervention_layers": [2, 0]}, content_type="application/json"
    )

    assert response.status_code == 200
    preset.refresh_from_db()
    assert (preset.name, preset.intervention_layers, preset.description) == (
        "renamed",
        [0, 2],
        "rain and code",
    )
    assert preset.features == [{"feature_id": 3, "coefficient": 2.0}, {"feature_id": 7, "coefficient": -1.5}]
    assert response.json()["name"] == "renamed"


def test_it_sets_and_forgets_the_prompt_seed_and_chat(login, owner, preset):
    client = login(owner)

    body = client.patch(
        url(preset.pk), {"prompt": "Rain?", "seed": 9, "chat": True}, content_type="application/json"
    ).json()
    assert (body["prompt"], body["seed"], body["chat"]) == ("Rain?", 9, True)

    client.patch(url(preset.pk), {"name": "kept seed"}, content_type="application/json")
    preset.refresh_from_db()
    assert (preset.name, preset.prompt, preset.seed, preset.chat) == ("kept seed", "Rain?", 9, True)

    client.patch(url(preset.pk), {"seed": None, "prompt": ""}, content_type="application/json")
    preset.refresh_from_db()
    assert (preset.prompt, preset.seed, preset.chat) == ("", None, True)


def test_it_keeps_the_sweep_unless_sent_and_clears_it_when_sent_as_null(login, owner, preset):
    client = login(owner)
    client.patch(url(preset.pk), {"sweep": [0.5, 2]}, content_type="application/json")

    client.patch(url(preset.pk), {"name": "kept sweep"}, content_type="application/json")
    preset.refresh_from_db()
    assert (preset.name, preset.sweep) == ("kept sweep", [0.5, 2.0])

    response = client.patch(url(preset.pk), {"sweep": None}, content_type="application/json")
    assert response.status_code == 200 and response.json()["sweep"] is None
    preset.refresh_from_db()
    assert preset.sweep is None


def test_it_lets_staff_change_anyones_preset(login, staff, preset):
    response = login(staff).patch(
        url(preset.pk), {"features": [{"feature_id": 12, "coefficient": 4}]}, content_type="application/json"
    )

    assert response.status_code == 200
    assert SteeringPreset.objects.get().features == [{"feature_id": 12, "coefficient": 4.0}]


def test_it_forbids_a_teammate(login, teammate, preset):
    before = snapshot()

    assert_error(
        login(teammate).patch(url(preset.pk), {"name": "mine now"}, content_type="application/json"), 403
    )
    assert snapshot() == before


def test_it_validates_the_result_like_a_new_preset(login, owner, preset):
    before = snapshot()

    response = login(owner).patch(
        url(preset.pk), {"method": "multiplicative"}, content_type="application/json"
    )

    assert_error(response, 400, "intervention_layers")
    assert snapshot() == before


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"sweep": [-(10**400)]}, "sweep.0"),
        ({"features": [{"feature_id": 3, "coefficient": 10**400}]}, "features.0.coefficient"),
        ({"temperature": 10**400}, "temperature"),
    ],
)
def test_it_refuses_an_integer_too_large_for_a_float_naming_the_field(login, owner, preset, changes, field):
    before = snapshot()

    assert_error(login(owner).patch(url(preset.pk), changes, content_type="application/json"), 400, field)
    assert snapshot() == before


def test_it_refuses_a_name_taken_by_another_preset(login, owner, preset, make_preset):
    other = make_preset(name="other")
    before = snapshot()

    assert_error(
        login(owner).patch(url(other.pk), {"name": preset.name}, content_type="application/json"), 400, "name"
    )
    assert snapshot() == before


def test_it_keeps_its_own_name(login, owner, preset):
    response = login(owner).patch(
        url(preset.pk), {"name": preset.name, "max_tokens": 10}, content_type="application/json"
    )

    assert response.status_code == 200
    assert SteeringPreset.objects.get().max_tokens == 10


def test_it_answers_404_for_an_unknown_preset(login, owner):
    assert_error(login(owner).patch(url(999), {"name": "x"}, content_type="application/json"), 404, "id")
