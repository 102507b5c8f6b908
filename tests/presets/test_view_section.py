from datetime import timedelta

import pytest
from django.utils import timezone

URL = "/presets/section/"


def test_it_lists_the_trainings_presets_favorites_first(login, teammate, make_preset, training):
    now = timezone.now()
    old = make_preset(name="old one", created_at=now - timedelta(days=1))
    new = make_preset(name="new one", created_at=now)
    starred = make_preset(name="starred one", is_favorite=True, created_at=now - timedelta(days=5))

    response = login(teammate).get(URL, {"training": training.pk}, headers={"HX-Request": "true"})

    assert response.status_code == 200
    assert [preset.pk for preset in response.context["presets"]] == [starred.pk, new.pk, old.pk]
    assert response.context["training"] == training


def test_it_shows_each_presets_features_with_their_labels(login, owner, preset, training):
    response = login(owner).get(URL, {"training": training.pk})

    assert response.context["presets"][0].labelled_features == [
        {"feature_id": 3, "coefficient": 2.0, "label": "weather and rain"},
        {"feature_id": 7, "coefficient": -1.5, "label": "python code"},
    ]
    assert "weather and rain" in response.content.decode()


def test_it_shows_another_trainings_presets_when_the_training_changes(
    login, owner, make_preset, training, pending_training
):
    make_preset(name="here")
    other = make_preset(name="there", training=pending_training)
    pending_training.status = "completed"
    pending_training.save()

    response = login(owner).get(URL, {"training": pending_training.pk})

    assert [preset.pk for preset in response.context["presets"]] == [other.pk]


def test_it_offers_changes_only_to_the_owner_and_staff(login, owner, teammate, staff, preset, training):
    def editable(user):
        return login(user).get(URL, {"training": training.pk}).context["presets"][0].editable

    assert (editable(owner), editable(teammate), editable(staff)) == (True, False, True)
    page = login(teammate).get(URL, {"training": training.pk}).content.decode()
    assert f"/presets/{preset.pk}/delete/" not in page and f"/presets/{preset.pk}/favorite/" not in page
    assert f"/steering/?preset={preset.pk}" in page


def test_it_asks_for_a_training_when_there_is_none(login, owner, preset):
    response = login(owner).get(URL, {"training": "nonsense"})

    assert response.status_code == 200
    assert response.context["training"] is None and response.context["presets"] == []


def test_it_sends_anonymous_users_to_log_in(client, training):
    response = client.get(URL, {"training": training.pk})

    assert response.status_code == 302 and response.url.startswith("/login/")


def make_many(make_preset, count, favorites=()):
    """`count` presets, the newest first in the listing order, with the given positions marked favorite."""
    now = timezone.now()
    return [
        make_preset(name=f"many {n}", created_at=now - timedelta(minutes=n), is_favorite=n in favorites)
        for n in range(count)
    ]


def test_it_shows_twenty_presets_a_page_with_the_count_and_a_load_more_link(
    login, owner, make_preset, training
):
    presets = make_many(make_preset, 45)

    response = login(owner).get(URL, {"training": training.pk}, headers={"HX-Request": "true"})

    assert response.status_code == 200
    context = response.context
    assert [preset.pk for preset in context["presets"]] == [preset.pk for preset in presets[:20]]
    assert (context["shown"], context["total"], context["next_page"]) == (20, 45, 2)
    page = response.content.decode()
    assert "20 of 45 presets" in page
    assert f'href="/presets/section/?training={training.pk}&amp;page=2"' in page
    assert page.count('class="preset ') + page.count('class="preset"') == 20


def test_it_pages_through_every_preset_favorites_first(login, owner, make_preset, training):
    presets = make_many(make_preset, 45, favorites={30, 44})
    client = login(owner)

    pages = [client.get(URL, {"training": training.pk, "page": page}).context for page in (1, 2, 3)]

    listed = [preset.pk for context in pages for preset in context["presets"]]
    expected = [presets[30], presets[44]] + [p for n, p in enumerate(presets) if n not in (30, 44)]
    assert listed == [preset.pk for preset in expected]
    assert [(c["shown"], c["next_page"]) for c in pages] == [(20, 2), (40, 3), (45, None)]
    last = client.get(URL, {"training": training.pk, "page": 3}).content.decode()
    assert "45 of 45 presets" in last and "Load more" not in last


@pytest.mark.parametrize("page", ["nonsense", "0", "-3", "1.5", str(2**80)])
def test_it_takes_a_bad_page_number_as_the_nearest_page(login, owner, make_preset, training, page):
    make_many(make_preset, 3)

    response = login(owner).get(URL, {"training": training.pk, "page": page})

    assert response.status_code == 200
    assert response.context["total"] == 3


def test_it_shows_the_count_past_the_last_page(login, owner, make_preset, training):
    make_many(make_preset, 3)

    response = login(owner).get(URL, {"training": training.pk, "page": 5})

    assert response.status_code == 200
    assert response.context["presets"] == [] and response.context["next_page"] is None
    page = response.content.decode()
    assert "3 of 3 presets" in page and "No saved presets" not in page
