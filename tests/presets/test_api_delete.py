from presets_app.models import SteeringPreset
from tests.api.support import assert_error


def url(pk):
    return f"/api/presets/steering/{pk}"


def test_it_lets_the_owner_delete(login, owner, preset):
    response = login(owner).delete(url(preset.pk))

    assert response.status_code == 204
    assert not SteeringPreset.objects.exists()


def test_it_forbids_a_teammate_to_delete_the_owners_preset(login, teammate, preset):
    assert_error(login(teammate).delete(url(preset.pk)), 403)
    assert SteeringPreset.objects.filter(pk=preset.pk).exists()


def test_it_lets_staff_delete_anyones_preset(login, staff, preset):
    assert login(staff).delete(url(preset.pk)).status_code == 204
    assert not SteeringPreset.objects.exists()


def test_it_answers_404_for_an_unknown_preset(login, owner):
    assert_error(login(owner).delete(url(999)), 404, "id")


def test_it_refuses_anonymous_users(client, preset):
    assert_error(client.delete(url(preset.pk)), 401)
    assert SteeringPreset.objects.exists()
