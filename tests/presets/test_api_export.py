import json

from tests.api.support import assert_error

URL = "/api/presets/steering/export"


def test_it_downloads_a_versioned_document_in_the_order_asked(login, stranger, make_preset, training):
    first = make_preset(
        name="first",
        description="d",
        is_favorite=True,
        method="multiplicative",
        intervention_layers=[2],
        prompt="It rains",
        system_prompt="You are a sailor.",
        seed=5,
        chat=True,
    )
    second = make_preset(name="second")

    response = login(stranger).get(URL, {"ids": f"{second.pk},{first.pk}"})

    assert response.status_code == 200
    assert response["Content-Type"] == "application/json"
    assert response["Content-Disposition"].startswith('attachment; filename="steerlab-presets-')
    document = json.loads(response.content)
    assert (document["format"], document["version"]) == ("steerlab.presets", 1)
    assert [item["name"] for item in document["presets"]] == ["second", "first"]
    assert document["presets"][1] == {
        "name": "first",
        "description": "d",
        "training": {"id": training.pk, "model_name": "tiny-llama", "hook_layer": 2, "d_sae": 32},
        "features": [{"feature_id": 3, "coefficient": 2.0}, {"feature_id": 7, "coefficient": -1.5}],
        "intervention_layers": [2],
        "method": "multiplicative",
        "temperature": 0.5,
        "max_tokens": 40,
        "prompt": "It rains",
        "system_prompt": "You are a sailor.",
        "seed": 5,
        "chat": True,
        "sweep": None,
        "is_favorite": True,
    }
    assert (document["presets"][0]["prompt"], document["presets"][0]["seed"]) == ("", None)


def test_it_answers_404_naming_unknown_ids(login, owner, preset):
    body = assert_error(login(owner).get(URL, {"ids": f"{preset.pk},999"}), 404, "ids")
    assert "999" in body["detail"]


def test_it_refuses_ids_that_are_not_numbers(login, owner):
    assert_error(login(owner).get(URL, {"ids": "1,two"}), 400, "ids")


def test_it_requires_ids(login, owner):
    assert_error(login(owner).get(URL), 400, "ids")


def test_it_refuses_anonymous_users(client, preset):
    assert_error(client.get(URL, {"ids": str(preset.pk)}), 401)
