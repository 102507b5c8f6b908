import json

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from presets_app import services
from presets_app.models import SteeringPreset
from tests.presets.support import settings_of, snapshot

URL = "/presets/import/"


def upload(content: bytes):
    return SimpleUploadedFile("presets.json", content, "application/json")


def test_it_imports_a_file_and_re_renders_the_section(login, owner, teammate, preset, training):
    exported = services.export_json([preset]).encode()

    response = login(teammate).post(
        URL, {"preset_file": upload(exported), "training": training.pk}, headers={"HX-Request": "true"}
    )

    assert response.status_code == 200
    copy = SteeringPreset.objects.get(owner=teammate)
    assert copy.name == "rainy python (2)"
    assert settings_of(copy) == settings_of(preset)
    assert response.context["notice"] == "Imported 1 preset(s)."
    assert {p.pk for p in response.context["presets"]} == {preset.pk, copy.pk}


def test_it_says_when_presets_went_to_another_training(login, owner, preset, training, pending_training):
    pending_training.status = "completed"
    pending_training.save()

    response = login(owner).post(
        URL, {"preset_file": upload(services.export_json([preset]).encode()), "training": pending_training.pk}
    )

    assert response.context["notice"] == "Imported 1 preset(s), 1 for another training."


def test_it_imports_nothing_from_a_bad_file_and_shows_why(login, owner, preset, training):
    document = json.loads(services.export_json([preset]))
    document["presets"].append({**document["presets"][0], "intervention_layers": [17]})
    before = snapshot()

    response = login(owner).post(
        URL, {"preset_file": upload(json.dumps(document).encode()), "training": training.pk}
    )

    assert response.status_code == 200
    assert response.context["error"].field == "presets[1].intervention_layers"
    assert snapshot() == before


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"sweep": [10**400]}, "presets[0].sweep"),
        ({"features": [{"feature_id": 3, "coefficient": -(10**400)}]}, "presets[0].features"),
    ],
)
def test_it_refuses_an_integer_too_large_for_a_float_and_shows_why(
    login, owner, preset, training, changes, field
):
    document = json.loads(services.export_json([preset]))
    document["presets"][0].update(changes)
    before = snapshot()

    response = login(owner).post(
        URL, {"preset_file": upload(json.dumps(document).encode()), "training": training.pk}
    )

    assert response.status_code == 200
    assert response.context["error"].field == field
    assert snapshot() == before


def test_it_refuses_a_file_over_one_megabyte(login, owner, training):
    response = login(owner).post(
        URL, {"preset_file": upload(b" " * (services.MAX_IMPORT_BYTES + 1)), "training": training.pk}
    )

    assert response.context["error"].field == "file"
    assert not SteeringPreset.objects.exists()


def test_it_asks_for_a_file(login, owner, training):
    response = login(owner).post(URL, {"training": training.pk})

    assert response.context["error"].field == "preset_file"


def test_it_sends_anonymous_users_to_log_in(client, preset):
    assert (
        client.post(URL, {"preset_file": upload(services.export_json([preset]).encode())}).status_code == 302
    )
    assert SteeringPreset.objects.count() == 1
