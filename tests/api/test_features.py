import pytest

from steering_app.models import Feature
from tests.api.support import assert_error


def url(training):
    return f"/api/trainings/{training.pk}/features"


def test_it_lists_a_trainings_features_by_index_with_total(client, owner, bearer, training):
    response = client.get(url(training), {"limit": 5}, headers=bearer(owner))

    assert response.status_code == 200
    body = response.json()
    assert body["total"] == 32 and body["limit"] == 5 and body["offset"] == 0
    assert [item["index"] for item in body["features"]] == [0, 1, 2, 3, 4]
    assert body["features"][3] == {
        "index": 3,
        "label": "weather and rain",
        "description": "",
        "max_activation": 4.0,
        "activation_frequency": 0.01,
    }


def test_it_pages_with_offset(client, owner, bearer, training):
    body = client.get(url(training), {"limit": 10, "offset": 30}, headers=bearer(owner)).json()

    assert [item["index"] for item in body["features"]] == [30, 31]
    assert body["total"] == 32


def test_it_searches_labels_case_insensitively(client, owner, bearer, training):
    body = client.get(url(training), {"search": "PYTHON"}, headers=bearer(owner)).json()

    assert [item["index"] for item in body["features"]] == [7]
    assert body["total"] == 1


def test_it_searches_descriptions(client, owner, bearer, training):
    Feature.objects.filter(training=training, index=20).update(description="fires on French verbs")

    body = client.get(url(training), {"search": "french"}, headers=bearer(owner)).json()

    assert [item["index"] for item in body["features"]] == [20]


def test_it_finds_a_feature_by_its_exact_index(client, owner, bearer, training):
    body = client.get(url(training), {"search": "12"}, headers=bearer(owner)).json()

    # index 12 itself, and no label contains "12" except through the index match
    assert [item["index"] for item in body["features"]] == [12]


def test_it_matches_index_and_labels_together(client, owner, bearer, training):
    body = client.get(url(training), {"search": "3"}, headers=bearer(owner)).json()

    # index 3 by number; "feature #13", "#23", "#30", "#31" by label
    assert [item["index"] for item in body["features"]] == [3, 13, 23, 30, 31]


def test_it_answers_an_empty_page_when_nothing_matches(client, owner, bearer, training):
    body = client.get(url(training), {"search": "astronomy"}, headers=bearer(owner)).json()

    assert body == {"features": [], "total": 0, "limit": 100, "offset": 0}


def test_it_answers_404_for_an_unknown_training(client, owner, bearer, training):
    assert_error(
        client.get(f"/api/trainings/{training.pk + 1}/features", headers=bearer(owner)), 404, "training_id"
    )


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"limit": 0}, "limit"),
        ({"offset": "x"}, "offset"),
        ({"search": "a" * 301}, "search"),
        ({"search": "bad\x00byte"}, "search"),
    ],
)
def test_it_refuses_bad_parameters_as_400(client, owner, bearer, training, params, field):
    assert_error(client.get(url(training), params, headers=bearer(owner)), 400, field)


def test_it_answers_anonymous_requests_with_401(client, training):
    assert_error(client.get(url(training)), 401)


def ranked(client, headers, training, search: str, **params) -> dict:
    response = client.get(url(training), {"search": search, **params}, headers=headers)
    assert response.status_code == 200, response.content
    return response.json()


@pytest.mark.parametrize(("search", "first", "words"), [("planet", 1681, 14), ("sea", 1163, 88)])
def test_it_ranks_the_demo_feature_named_by_the_word_first(
    client, owner, bearer, demo_feature_space, search, first, words
):
    body = ranked(client, bearer(owner), demo_feature_space, search, limit=20)

    assert body["features"][0]["index"] == first
    assert body["features"][0]["label"].startswith(f'"{search}" ')
    # Every feature whose label or description holds the word, and those nearest in meaning, however many one
    # page shows.
    matching = Feature.objects.filter(training=demo_feature_space).search(search).count()
    assert matching == words and body["total"] >= words and len(body["features"]) == min(20, body["total"])


def test_it_pages_through_the_ranking_without_repeats(client, owner, bearer, demo_feature_space):
    headers = bearer(owner)
    pages = [
        ranked(client, headers, demo_feature_space, "sea", limit=20, offset=start)
        for start in range(0, 100, 20)
    ]

    indices = [item["index"] for page in pages for item in page["features"]]
    total = pages[0]["total"]
    assert len(indices) == min(total, 100) and len(set(indices)) == len(indices) and indices[0] == 1163


def test_it_ranks_the_exact_label_then_the_word_in_labels_by_meaning(client, owner, bearer, training):
    rows = {
        4: ("rainbow colours", ""),
        5: ("heavy rain", ""),
        6: ("rain", ""),
        8: ("terrain maps", ""),
        9: ("sunny", "no rain today"),
        10: ("rain gauges", ""),
    }
    for index, (label, description) in rows.items():
        Feature.objects.filter(training=training, index=index).update(label=label, description=description)

    order = [item["index"] for item in ranked(client, bearer(owner), training, "rain")["features"]]

    # The exact label 6; then the labels holding the word, nearest in meaning first ("weather and rain" 3);
    # a label holding it only inside another word ("terrain") after them; every word match listed.
    assert order[:4] == [6, 3, 5, 10]
    assert order.index(8) > 3 and {4, 8, 9} <= set(order)


def test_it_puts_the_exact_index_before_a_label_that_is_the_number(client, owner, bearer, training):
    Feature.objects.filter(training=training, index=30).update(label="13")

    body = ranked(client, bearer(owner), training, "13")

    assert [item["index"] for item in body["features"]] == [13, 30]


def test_it_lists_every_feature_holding_all_the_words_of_a_query(client, owner, bearer, demo_feature_space):
    body = ranked(client, bearer(owner), demo_feature_space, "sea ocean")

    assert body["features"][0]["index"] == 1163
    listed = {item["index"] for item in body["features"]}
    holding = (
        Feature.objects.filter(training=demo_feature_space)
        .search("sea ocean")
        .values_list("index", flat=True)
    )
    assert set(holding) <= listed and len(holding) < len(listed)  # and the features nearest in meaning
