from presets_app.models import SteeringPreset


def url(pk):
    return f"/presets/{pk}/delete/"


def test_it_deletes_the_owners_preset_and_re_renders_the_section(login, owner, preset, make_preset, training):
    kept = make_preset(name="kept")

    response = login(owner).post(url(preset.pk), headers={"HX-Request": "true"})

    assert response.status_code == 200
    assert list(SteeringPreset.objects.all()) == [kept]
    assert [p.pk for p in response.context["presets"]] == [kept.pk]
    assert response.context["training"] == training


def test_it_forbids_a_teammate_to_delete_the_owners_preset(login, teammate, preset):
    assert login(teammate).post(url(preset.pk)).status_code == 403
    assert SteeringPreset.objects.filter(pk=preset.pk).exists()


def test_it_lets_staff_delete_anyones_preset(login, staff, preset):
    assert login(staff).post(url(preset.pk)).status_code == 200
    assert not SteeringPreset.objects.exists()


def test_it_answers_404_for_an_unknown_preset(login, owner):
    assert login(owner).post(url(999)).status_code == 404


def test_it_only_accepts_post(login, owner, preset):
    assert login(owner).get(url(preset.pk)).status_code == 405
    assert SteeringPreset.objects.exists()
