"""POST /steering/generate/ with integers no database column can hold: a form error, never an OverflowError."""

import pytest

from steering_app import wake
from steering_app.models import SteeringRun
from tests.steering.test_views_generate import GENERATE, HTMX, error_items, form_data

pytestmark = pytest.mark.django_db

HUGE = "99999999999999999999"


@pytest.fixture
def submitted(monkeypatch):
    ids = []
    monkeypatch.setattr(wake, "submit", ids.append)
    return ids


@pytest.mark.parametrize(
    ("changes", "label"),
    [
        ({"feature_id": [HUGE, "7"]}, "Selected Features"),
        ({"feature_id": ["-" + HUGE, "7"]}, "Selected Features"),
        ({"training": HUGE}, "Training Job"),
        ({"layers": [HUGE]}, "Intervention Layers"),
        ({"max_tokens": HUGE}, "Max Tokens"),
        ({"seed": HUGE}, "Seed"),
    ],
)
def test_it_refuses_an_integer_the_database_cannot_hold(client, owner, training, submitted, changes, label):
    client.force_login(owner)

    response = client.post(GENERATE, form_data(training, **changes), **HTMX)

    assert response.status_code == 422
    assert any(item.startswith(f"{label}:") for item in error_items(response)), error_items(response)
    assert SteeringRun.objects.count() == 0 and submitted == []
