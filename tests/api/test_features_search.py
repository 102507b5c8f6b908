"""GET /api/trainings/{id}/features?search=: the ranking by meaning (feature_search), on the demo's 2048 labelled
features and the small fixture training, with the real sentence embedder (no model weights: MiniLM ships in a
package)."""

import pytest

from steering_app import feature_search
from steering_app.models import Feature

PLANET, SEA = 1681, 1163


def ranked(client, headers, training, search: str, limit: int = 10) -> list[dict]:
    response = client.get(
        f"/api/trainings/{training.pk}/features", {"search": search, "limit": limit}, headers=headers
    )
    assert response.status_code == 200, response.content
    return response.json()["features"]


@pytest.mark.parametrize("search", ["planets", "astronomy"])
def test_it_finds_the_planet_feature_first_by_meaning(client, owner, bearer, demo_feature_space, search):
    features = ranked(client, bearer(owner), demo_feature_space, search)

    assert features[0]["index"] == PLANET, [(item["index"], item["label"]) for item in features]


def test_it_finds_the_sea_feature_among_the_first_three_for_ocean(client, owner, bearer, demo_feature_space):
    features = ranked(client, bearer(owner), demo_feature_space, "ocean")

    assert SEA in [item["index"] for item in features[:3]], [
        (item["index"], item["label"]) for item in features
    ]


def test_space_is_no_longer_a_list_of_whitespace_features(client, owner, bearer, demo_feature_space):
    by_meaning = [item["label"] for item in ranked(client, bearer(owner), demo_feature_space, "space")]
    by_words = [row.label for row in Feature.objects.filter(training=demo_feature_space).search("space")[:10]]

    # 8 of the word match's first 10 were whitespace features; "place" (places, space) now comes third.
    assert (
        sum("whitespace" in label for label in by_meaning)
        <= 5
        < sum("whitespace" in label for label in by_words)
    )


def test_the_exact_index_then_the_exact_label_come_first(client, owner, bearer, demo_feature_space):
    Feature.objects.filter(training=demo_feature_space, index=77).update(label="1163")
    headers = bearer(owner)

    by_index = ranked(client, headers, demo_feature_space, "1163")
    by_label = ranked(client, headers, demo_feature_space, "sea")

    # 1163 by its index, then #77 whose label is exactly the number, before anything similar in meaning.
    assert [item["index"] for item in by_index[:2]] == [SEA, 77]
    assert by_label[0]["index"] == SEA


def test_it_pages_through_one_ranking_without_repeats(client, owner, bearer, training):
    headers = bearer(owner)
    pages = [
        client.get(
            f"/api/trainings/{training.pk}/features",
            {"search": "feature", "limit": 10, "offset": start},
            headers=headers,
        ).json()
        for start in (0, 10, 20)
    ]

    indices = [item["index"] for page in pages for item in page["features"]]
    assert len(indices) == pages[0]["total"] == len(set(indices)) and pages[0]["total"] >= 29


def test_it_embeds_a_feature_again_after_its_label_changes(client, owner, bearer, training):
    headers = bearer(owner)
    assert ranked(client, headers, training, "astronomy")[:1] != [{"index": 20}]
    before = Feature.objects.get(training=training, index=20)
    assert before.embedding_key and len(before.embedding) == 384 * 4  # stored by the first search

    # A bulk update, as calibration and imports write labels: no signal fires.
    Feature.objects.filter(training=training, index=20).update(label="stars, planets and telescopes")
    features = ranked(client, headers, training, "astronomy")

    after = Feature.objects.get(training=training, index=20)
    assert features[0]["index"] == 20 and features[0]["label"] == "stars, planets and telescopes"
    assert after.embedding_key != before.embedding_key and bytes(after.embedding) != bytes(before.embedding)
    assert after.embedding_key == feature_search.embedding_key(feature_search.feature_text(after))


def test_a_training_without_features_matches_nothing(client, owner, bearer, make_training):
    empty = make_training()

    response = client.get(f"/api/trainings/{empty.pk}/features", {"search": "rain"}, headers=bearer(owner))

    assert response.status_code == 200 and response.json()["features"] == [] and response.json()["total"] == 0
