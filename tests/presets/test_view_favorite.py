from presets_app.models import SteeringPreset


def url(pk):
    return f"/presets/{pk}/favorite/"


def test_it_toggles_the_star_and_re_renders_the_section(login, owner, preset):
    client = login(owner)

    response = client.post(url(preset.pk), headers={"HX-Request": "true"})

    assert response.status_code == 200
    assert SteeringPreset.objects.get().is_favorite is True
    assert response.context["presets"][0].is_favorite is True
    client.post(url(preset.pk))
    assert SteeringPreset.objects.get().is_favorite is False


def test_it_lets_staff_star_anyones_preset(login, staff, preset):
    assert login(staff).post(url(preset.pk)).status_code == 200
    assert SteeringPreset.objects.get().is_favorite is True


def test_it_forbids_a_teammate(login, teammate, preset):
    assert login(teammate).post(url(preset.pk)).status_code == 403
    assert SteeringPreset.objects.get().is_favorite is False


def test_it_answers_404_for_an_unknown_preset(login, owner):
    assert login(owner).post(url(999)).status_code == 404


def test_it_only_accepts_post(login, owner, preset):
    assert login(owner).get(url(preset.pk)).status_code == 405
    assert SteeringPreset.objects.get().is_favorite is False
