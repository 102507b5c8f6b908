from steering_app.models import Feature, Training
from tests.api.support import assert_error


def test_it_shows_a_training_with_its_model_layer_size_and_stats(client, owner, bearer, training):
    response = client.get(f"/api/trainings/{training.pk}", headers=bearer(owner))

    assert response.status_code == 200
    body = response.json()
    assert body["id"] == training.pk
    assert body["model_id"] == training.model_id
    assert body["hook_layer"] == 2 and body["hook_name"] == "blocks.2.hook_resid_post"
    assert body["d_sae"] == 32 and body["d_in"] == 16
    assert body["encoder_type"] == "topk"
    assert body["status"] == "completed"
    assert body["stats"] == {"explained_variance": 0.8, "l0": 8, "dead_fraction": 0.05}


def test_it_states_a_calibrated_trainings_limit_in_max_activations(client, owner, bearer, training):
    body = client.get(f"/api/trainings/{training.pk}", headers=bearer(owner)).json()

    assert body["calibrated"] is True and body["max_abs_coefficient"] == 100


def test_it_states_an_uncalibrated_trainings_limit_in_residual_norms(client, owner, bearer, training):
    Feature.objects.filter(training=training).update(max_activation=None)
    Training.objects.filter(pk=training.pk).update(stats={"residual_norm": 42.5})

    body = client.get(f"/api/trainings/{training.pk}", headers=bearer(owner)).json()

    assert body["calibrated"] is False and body["max_abs_coefficient"] == 4250


def test_it_shows_unfinished_trainings_too(client, owner, bearer, training):
    Training.objects.filter(pk=training.pk).update(status=Training.Status.RUNNING)

    assert client.get(f"/api/trainings/{training.pk}", headers=bearer(owner)).json()["status"] == "running"


def test_it_answers_404_for_an_unknown_training(client, owner, bearer, training):
    assert_error(client.get(f"/api/trainings/{training.pk + 1}", headers=bearer(owner)), 404, "training_id")


def test_it_answers_400_for_an_id_that_is_not_a_positive_integer(client, owner, bearer, db):
    assert_error(client.get("/api/trainings/abc", headers=bearer(owner)), 400, "training_id")
    assert_error(client.get("/api/trainings/0", headers=bearer(owner)), 400, "training_id")
    assert_error(client.get(f"/api/trainings/{2**64}", headers=bearer(owner)), 400, "training_id")


def test_it_answers_anonymous_requests_with_401(client, training):
    assert_error(client.get(f"/api/trainings/{training.pk}"), 401)
