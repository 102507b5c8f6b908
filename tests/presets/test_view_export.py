import json

URL = "/presets/export/"


def test_it_sends_the_section_to_the_download(login, teammate, make_preset, training):
    first, second = make_preset(name="one"), make_preset(name="two")

    response = login(teammate).get(
        URL,
        {"preset_ids": [str(first.pk), str(second.pk)], "training": training.pk},
        headers={"HX-Request": "true"},
    )

    assert response.status_code == 204
    assert response["HX-Redirect"] == f"/presets/export/?ids={first.pk},{second.pk}"


def test_it_downloads_the_document(login, teammate, make_preset, training):
    first, second = make_preset(name="one"), make_preset(name="two")

    response = login(teammate).get(URL, {"ids": f"{first.pk},{second.pk}"})

    assert response.status_code == 200
    assert response["Content-Disposition"].startswith('attachment; filename="steerlab-presets-')
    document = json.loads(response.content)
    assert (document["format"], document["version"]) == ("steerlab.presets", 1)
    assert {item["name"] for item in document["presets"]} == {"one", "two"}
    assert document["presets"][0]["training"] == {
        "id": training.pk,
        "model_name": "tiny-llama",
        "hook_layer": 2,
        "d_sae": 32,
    }


def test_it_asks_to_select_presets_when_none_are(login, owner, preset, training):
    response = login(owner).get(URL, {"training": training.pk}, headers={"HX-Request": "true"})

    assert response.status_code == 200
    assert response.context["error"].field == "preset_ids"
    assert [p.pk for p in response.context["presets"]] == [preset.pk]


def test_it_answers_404_to_a_download_of_nothing(login, owner):
    assert login(owner).get(URL, {"ids": "999"}).status_code == 404


def test_it_sends_anonymous_users_to_log_in(client, preset):
    assert client.get(URL, {"ids": str(preset.pk)}).status_code == 302
