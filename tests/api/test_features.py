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
