from tests.api.support import assert_error


def url(pk):
    return f"/api/presets/steering/{pk}"


def test_it_shows_any_members_preset(login, stranger, preset):
    response = login(stranger).get(url(preset.pk))

    assert response.status_code == 200
    body = response.json()
    assert (body["id"], body["name"], body["owner"], body["training_id"]) == (
        preset.pk,
        "rainy python",
        "owner",
        preset.training_id,
    )
    assert body["features"] == preset.features
    assert (body["prompt"], body["seed"], body["chat"]) == ("", None, False)


def test_it_shows_the_prompt_seed_and_chat_it_keeps(login, teammate, make_preset):
    preset = make_preset(prompt="Tell me about rain", seed=42, chat=True)

    body = login(teammate).get(url(preset.pk)).json()

    assert (body["prompt"], body["seed"], body["chat"]) == ("Tell me about rain", 42, True)


def test_it_answers_404_for_an_unknown_preset(login, owner):
    assert_error(login(owner).get(url(999)), 404, "id")


def test_it_answers_400_for_an_id_that_cannot_be_one(login, owner):
    assert_error(login(owner).get(url(2**70)), 400, "preset_id")
    assert_error(login(owner).get(url("rain")), 400, "preset_id")


def test_it_refuses_anonymous_users(client, preset):
    assert_error(client.get(url(preset.pk)), 401)
