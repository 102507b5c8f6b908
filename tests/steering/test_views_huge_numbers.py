"""Page URLs and query parameters with integers no database column can hold: a 404 or a form error, not a 500."""

import pytest

from presets_app.models import SteeringPreset
from steering_app.models import SteeringRun

pytestmark = pytest.mark.django_db

HUGE = "99999999999999999999"


@pytest.mark.parametrize(
    "path",
    [
        f"/steering/runs/{HUGE}/",
        f"/steering/trainings/{HUGE}/features/?q=rain",
        f"/steering/?training={HUGE}",
        f"/steering/?preset={HUGE}",
    ],
)
def test_it_answers_a_huge_id_in_a_page_url_with_404(client, owner, training, path):
    client.force_login(owner)

    assert client.get(path).status_code == 404


def test_it_finds_no_feature_by_a_huge_number(client, owner, training):
    client.force_login(owner)

    response = client.get(f"/steering/trainings/{training.pk}/features/", {"q": HUGE})

    assert response.status_code == 200


@pytest.mark.parametrize("path", [f"/presets/{HUGE}/favorite/", f"/presets/{HUGE}/delete/"])
def test_it_answers_a_huge_preset_id_with_404_and_changes_nothing(client, owner, training, path):
    client.force_login(owner)

    assert client.post(path).status_code == 404
    assert SteeringPreset.objects.count() == 0 and SteeringRun.objects.count() == 0


def test_it_refuses_saving_a_preset_for_a_huge_training_id(client, owner, training):
    client.force_login(owner)

    response = client.post(
        "/presets/save/",
        {"training": HUGE, "name": "x", "feature_id": ["3"], "coefficient": ["1"], "layers": ["2"]},
        HTTP_HX_REQUEST="true",
    )

    assert response.status_code < 500  # the presets section shows the error in place
    assert SteeringPreset.objects.count() == 0
