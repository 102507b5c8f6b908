from datetime import timedelta

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
