from datetime import timedelta

from django.utils import timezone

from presets_app.models import SteeringPreset
from tests.api.support import assert_error

URL = "/api/presets/steering"


def test_it_lists_favorites_first_then_newest(login, teammate, make_preset):
    now = timezone.now()
    old = make_preset(name="old", created_at=now - timedelta(days=2))
    new = make_preset(name="new", created_at=now)
    starred = make_preset(name="starred old", is_favorite=True, created_at=now - timedelta(days=9))

    response = login(teammate).get(URL, {"training_id": old.training_id})

    assert response.status_code == 200
    body = response.json()
    assert [item["id"] for item in body["presets"]] == [starred.pk, new.pk, old.pk]
    assert body["total"] == 3 and body["limit"] == 50 and body["offset"] == 0


def test_it_returns_each_presets_settings(login, owner, preset):
    item = login(owner).get(URL, {"training_id": preset.training_id}).json()["presets"][0]

    assert item["name"] == "rainy python" and item["owner"] == "owner"
    assert item["features"] == [{"feature_id": 3, "coefficient": 2.0}, {"feature_id": 7, "coefficient": -1.5}]
    assert item["intervention_layers"] == [1, 2]
    assert (item["method"], item["temperature"], item["max_tokens"]) == ("additive", 0.5, 40)


def test_it_keeps_to_the_training(login, owner, make_preset, pending_training):
    mine = make_preset()
    make_preset(training=pending_training)

    body = login(owner).get(URL, {"training_id": mine.training_id}).json()

    assert [item["id"] for item in body["presets"]] == [mine.pk]


def test_it_searches_name_and_description(login, owner, make_preset):
    by_name = make_preset(name="Rain dance")
    by_description = make_preset(description="makes it RAIN")
    make_preset(name="sunny")

    body = login(owner).get(URL, {"search": "rain"}).json()

    assert {item["id"] for item in body["presets"]} == {by_name.pk, by_description.pk}


def test_it_shows_only_favorites_when_asked(login, owner, make_preset):
    starred = make_preset(is_favorite=True)
    make_preset()

    body = login(owner).get(URL, {"favorites_only": "true"}).json()

    assert [item["id"] for item in body["presets"]] == [starred.pk]
    assert body["total"] == 1


def test_it_pages_with_limit_and_offset(login, owner, make_preset):
    now = timezone.now()
    presets = [make_preset(created_at=now - timedelta(minutes=i)) for i in range(5)]

    body = login(owner).get(URL, {"limit": 2, "offset": 2}).json()

    assert [item["id"] for item in body["presets"]] == [presets[2].pk, presets[3].pk]
    assert body["total"] == 5


def test_it_refuses_a_bad_limit(login, owner):
    assert_error(login(owner).get(URL, {"limit": 0}), 400, "limit")


def test_it_refuses_a_nul_in_search(login, owner):
    assert_error(login(owner).get(URL, {"search": "a\x00b"}), 400, "search")


def test_it_refuses_anonymous_users(client, preset):
    assert_error(client.get(URL), 401)


def test_it_pages_a_large_list(login, owner, training):
    now = timezone.now()
    SteeringPreset.objects.bulk_create(
        SteeringPreset(
            training=training,
            owner=owner,
            name=f"bulk {n}",
            features=[{"feature_id": 3, "coefficient": 1.0}],
            intervention_layers=[2],
            created_at=now - timedelta(seconds=n),
        )
        for n in range(1234)
    )
    client = login(owner)

    first = client.get(URL, {"training_id": training.pk}).json()
    widest = client.get(URL, {"limit": 1000, "offset": 0}).json()
    last = client.get(URL, {"limit": 1000, "offset": 1000}).json()

    assert (len(first["presets"]), first["total"], first["limit"]) == (50, 1234, 50)
    assert [item["name"] for item in first["presets"]] == [f"bulk {n}" for n in range(50)]
    assert (len(widest["presets"]), widest["total"]) == (1000, 1234)
    assert [item["name"] for item in last["presets"]] == [f"bulk {n}" for n in range(1000, 1234)]
    assert_error(client.get(URL, {"limit": 1001}), 400, "limit")
