import pytest

from tests.presets.support import snapshot


def url(preset):
    return f"/admin/presets_app/steeringpreset/{preset.pk}/change/"


@pytest.fixture
def form(preset, owner):
    return {
        "name": "curated",
        "description": "checked by staff",
        "owner": str(owner.pk),
        "intervention_layers": "[0, 2]",
        "method": "additive",
        "temperature": "0.9",
        "max_tokens": "30",
        "is_favorite": "on",
    }


def test_it_shows_the_features_read_only_with_their_labels(login, staff, preset):
    response = login(staff).get(url(preset))

    assert response.status_code == 200
    page = response.content.decode()
    assert "#3 weather and rain" in page and "#7 python code" in page
    assert 'name="features"' not in page and 'name="training"' not in page


def test_it_saves_a_valid_change(login, staff, preset, form):
    response = login(staff).post(url(preset), form)

    assert response.status_code == 302
    preset.refresh_from_db()
    assert (preset.name, preset.intervention_layers, preset.temperature, preset.is_favorite) == (
        "curated",
        [0, 2],
        0.9,
        True,
    )
    assert preset.features == [{"feature_id": 3, "coefficient": 2.0}, {"feature_id": 7, "coefficient": -1.5}]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"intervention_layers": "[4]"}, "intervention_layers"),
        ({"intervention_layers": "[]"}, "intervention_layers"),
        ({"intervention_layers": '"2"'}, "intervention_layers"),
        ({"method": "multiplicative"}, "intervention_layers"),
        ({"temperature": "2.5"}, "temperature"),
        ({"description": "x" * 2001}, "description"),
    ],
)
def test_it_refuses_what_the_api_refuses(login, staff, preset, form, change, field):
    before = snapshot()
    form.update(change)

    response = login(staff).post(url(preset), form)

    assert response.status_code == 200
    assert field in response.context["adminform"].form.errors
    assert snapshot() == before


def test_it_refuses_a_name_taken_in_the_training(login, staff, preset, make_preset, form):
    make_preset(name="taken")
    before = snapshot()
    form["name"] = "taken"

    response = login(staff).post(url(preset), form)

    assert "name" in response.context["adminform"].form.errors
    assert snapshot() == before
