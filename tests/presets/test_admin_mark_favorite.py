from presets_app.models import SteeringPreset

URL = "/admin/presets_app/steeringpreset/"


def test_it_marks_the_selected_presets_favorite(login, staff, make_preset):
    chosen, other = make_preset(), make_preset()

    response = login(staff).post(URL, {"action": "mark_favorite", "_selected_action": [chosen.pk]})

    assert response.status_code == 302
    assert set(SteeringPreset.objects.filter(is_favorite=True)) == {chosen}
    other.refresh_from_db()
    assert other.is_favorite is False


def test_it_is_not_open_to_members(login, teammate, preset):
    response = login(teammate).post(URL, {"action": "mark_favorite", "_selected_action": [preset.pk]})

    assert response.status_code == 302 and "/admin/login/" in response.url
    assert SteeringPreset.objects.get().is_favorite is False
