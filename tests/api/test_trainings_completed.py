from datetime import timedelta

import pytest
from django.utils import timezone

from steering_app.models import Dataset, Training
from tests.api.support import assert_error

URL = "/api/trainings/completed"


def add_training(training, **fields):
    values = {
        "model": training.model,
        "encoder_type": training.encoder_type,
        "hook_layer": training.hook_layer,
        "hook_name": training.hook_name,
        "d_in": training.d_in,
        "d_sae": training.d_sae,
        "checkpoint_path": training.checkpoint_path,
        "status": Training.Status.COMPLETED,
    }
    values.update(fields)
    return Training.objects.create(**values)


def test_it_lists_completed_trainings_newest_first_with_model_and_dataset_names(
    client, owner, bearer, training
):
    dataset = Dataset.objects.create(name="openwebtext-1m", source="demo")
    newer = add_training(
        training, dataset=dataset, encoder_type="jumprelu", created_at=timezone.now() + timedelta(1)
    )
    add_training(training, status=Training.Status.RUNNING)
    add_training(training, status=Training.Status.FAILED)

    response = client.get(URL, headers=bearer(owner))

    assert response.status_code == 200
    body = response.json()
    assert body["total"] == 2 and body["limit"] == 100 and body["offset"] == 0
    assert [item["id"] for item in body["trainings"]] == [newer.pk, training.pk]
    first = body["trainings"][0]
    assert first["encoder_type"] == "jumprelu"
    assert first["model_name"] == "tiny-llama"
    assert first["dataset_name"] == "openwebtext-1m"
    assert first["created_at"]
    assert body["trainings"][1]["dataset_name"] is None


def test_it_pages_with_limit_and_offset(client, owner, bearer, training):
    for day in range(1, 4):
        add_training(training, created_at=timezone.now() - timedelta(days=day))

    response = client.get(URL, {"limit": 2, "offset": 1}, headers=bearer(owner))

    body = response.json()
    assert body["total"] == 4 and body["limit"] == 2 and body["offset"] == 1
    assert len(body["trainings"]) == 2
    assert body["trainings"][0]["id"] != training.pk


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"limit": 0}, "limit"),
        ({"limit": 1001}, "limit"),
        ({"offset": -1}, "offset"),
        ({"limit": "ten"}, "limit"),
    ],
)
def test_it_refuses_bad_paging_as_400(client, owner, bearer, training, params, field):
    assert_error(client.get(URL, params, headers=bearer(owner)), 400, field)


def test_it_answers_anonymous_requests_with_401(client, training):
    assert_error(client.get(URL), 401)


def test_it_accepts_a_logged_in_session(client, owner, training):
    client.force_login(owner)

    assert client.get(URL).status_code == 200
