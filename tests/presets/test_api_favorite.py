from presets_app.models import SteeringPreset
from tests.api.support import assert_error


def url(pk):
    return f"/api/presets/steering/{pk}/favorite"


def test_it_toggles_the_owners_favorite_on_and_off(login, owner, preset):
    client = login(owner)

    first = client.post(url(preset.pk))
    assert first.status_code == 200 and first.json()["is_favorite"] is True
    assert SteeringPreset.objects.get().is_favorite is True

    second = client.post(url(preset.pk))
    assert second.json()["is_favorite"] is False
    assert SteeringPreset.objects.get().is_favorite is False


def test_it_lets_staff_toggle_anyones_preset(login, staff, preset):
    assert login(staff).post(url(preset.pk)).status_code == 200
    assert SteeringPreset.objects.get().is_favorite is True


def test_it_forbids_a_teammate(login, teammate, preset):
    assert_error(login(teammate).post(url(preset.pk)), 403)
    assert SteeringPreset.objects.get().is_favorite is False


def test_it_answers_404_for_an_unknown_preset(login, owner):
    assert_error(login(owner).post(url(999)), 404, "id")
