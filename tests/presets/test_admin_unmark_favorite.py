from presets_app.models import SteeringPreset

URL = "/admin/presets_app/steeringpreset/"


def test_it_unmarks_the_selected_presets(login, staff, make_preset):
    chosen, other = make_preset(is_favorite=True), make_preset(is_favorite=True)

    response = login(staff).post(URL, {"action": "unmark_favorite", "_selected_action": [chosen.pk]})

    assert response.status_code == 302
    assert set(SteeringPreset.objects.filter(is_favorite=True)) == {other}


def test_it_is_not_open_to_members(login, teammate, make_preset):
    preset = make_preset(is_favorite=True)

    login(teammate).post(URL, {"action": "unmark_favorite", "_selected_action": [preset.pk]})

    assert SteeringPreset.objects.get().is_favorite is True
