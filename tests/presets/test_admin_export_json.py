import json

from presets_app.models import SteeringPreset

URL = "/admin/presets_app/steeringpreset/"
IMPORT = "/api/presets/steering/import"


def test_it_downloads_the_selected_presets_as_an_importable_document(login, staff, make_preset, training):
    chosen = make_preset(name="chosen", is_favorite=True)
    make_preset(name="left out")

    response = login(staff).post(URL, {"action": "export_json", "_selected_action": [chosen.pk]})

    assert response.status_code == 200
    assert response["Content-Disposition"].startswith('attachment; filename="steerlab-presets-')
    document = json.loads(response.content)
    assert (document["format"], document["version"]) == ("steerlab.presets", 1)
    assert [item["name"] for item in document["presets"]] == ["chosen"]
    assert document["presets"][0]["training"] == {
        "id": training.pk,
        "model_name": "tiny-llama",
        "hook_layer": 2,
        "d_sae": 32,
    }

    imported = login(staff).post(IMPORT, response.content, content_type="application/json")
    assert imported.json()["created"] == 1
    assert SteeringPreset.objects.get(name="chosen (2)").features == chosen.features


def test_it_is_not_open_to_members(login, teammate, preset):
    response = login(teammate).post(URL, {"action": "export_json", "_selected_action": [preset.pk]})

    assert response.status_code == 302 and "/admin/login/" in response.url
