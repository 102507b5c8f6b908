"""A preset's system prompt (chat mode's): saved from the panel, created and changed by the API, exported and
imported, refused when too long; loading the preset into the panel sets it (tests/steering/test_conversation_pages.py)."""

import json

from presets_app.models import SteeringPreset
from tests.api.support import assert_error

API = "/api/presets/steering"


def test_the_panels_save_keeps_the_chat_system_prompt(login, teammate, training):
    form = {
        "training": str(training.pk),
        "method": "additive",
        "temperature": "0.4",
        "max_tokens": "48",
        "layers": ["2"],
        "feature_id": ["3"],
        "coefficient": ["2"],
        "preset_name": "pirate",
        "system_prompt": "Talk like a pirate.",
    }

    assert login(teammate).post("/presets/save/", form, headers={"HX-Request": "true"}).status_code == 200

    assert SteeringPreset.objects.get().system_prompt == "Talk like a pirate."


def test_the_api_creates_changes_and_answers_it(login, owner, training):
    client = login(owner)
    body = {
        "training_id": training.pk,
        "name": "pirate",
        "features": [{"feature_id": 3, "coefficient": 2.0}],
        "intervention_layers": [2],
        "system_prompt": "Talk like a pirate.",
    }

    created = client.post(API, json.dumps(body), content_type="application/json")

    assert created.status_code == 201 and created.json()["system_prompt"] == "Talk like a pirate."
    url = f"{API}/{created.json()['id']}"
    changed = client.patch(url, json.dumps({"system_prompt": "Be brief."}), content_type="application/json")
    assert changed.json()["system_prompt"] == "Be brief."
    assert SteeringPreset.objects.get().system_prompt == "Be brief."
    too_long = client.patch(url, json.dumps({"system_prompt": "x" * 20_001}), content_type="application/json")
    assert_error(too_long, 400, "system_prompt")


def test_export_and_import_carry_it(login, owner, teammate, make_preset):
    preset = make_preset(name="pirate", system_prompt="Talk like a pirate.")
    document = login(owner).get(f"{API}/export", {"ids": str(preset.pk)}).json()
    assert document["presets"][0]["system_prompt"] == "Talk like a pirate."
    preset.delete()

    imported = login(teammate).post(f"{API}/import", json.dumps(document), content_type="application/json")

    assert imported.status_code == 201
    assert SteeringPreset.objects.get(owner=teammate).system_prompt == "Talk like a pirate."
