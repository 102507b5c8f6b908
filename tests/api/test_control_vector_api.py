"""POST /api/steering/control-vector: the steering fields of a generate body as a llama.cpp control vector (GGUF).

The file is read back with SteerLab's own reader (engine/control_vectors.py); that llama.cpp applies it to the
right blocks is tests/steering/test_llama_cpp_control_vector.py's."""

import pytest
import torch

from steering_app.engine.control_vectors import read_file
from steering_app.engine.saes.sae import load_sae
from tests.api.support import assert_error

URL = "/api/steering/control-vector"


@pytest.fixture
def export(client, bearer, owner):
    def post(body):
        return client.post(URL, body, content_type="application/json", headers=bearer(owner))

    return post


def read_back(response, tmp_path, hidden: int, layers: int) -> dict[int, torch.Tensor]:
    path = tmp_path / "exported.gguf"
    path.write_bytes(response.content)
    return read_file(path, n_embd=hidden, num_layers=layers)


def test_it_exports_each_layers_own_vectors_times_their_coefficients(export, vector_space, tmp_path):
    body = {
        "training_id": vector_space.pk,
        "model_id": vector_space.model_id,
        "features": [{"feature_id": 0, "coefficient": 1.0}, {"feature_id": 1, "coefficient": -0.5}],
        "intervention_layers": [1, 3],
    }
    response = export(body)
    assert response.status_code == 200, response.content
    assert response["Content-Type"] == "application/octet-stream"
    assert (
        response["Content-Disposition"]
        == f'attachment; filename="steerlab-training-{vector_space.pk}-control-vector.gguf"'
    )
    vectors = read_back(response, tmp_path, hidden=16, layers=4)
    assert sorted(vectors) == [1, 3]
    planet, cake = vector_space.vectors
    for layer in (1, 3):
        assert torch.allclose(vectors[layer], planet[layer] - 0.5 * cake[layer], atol=1e-6)


def test_it_exports_an_sae_feature_as_c_times_max_activation_times_its_decoder_row(
    export, demo_feature_space, tmp_path
):
    body = {
        "training_id": demo_feature_space.pk,
        "model_id": demo_feature_space.model_id,
        "features": [{"feature_id": 1681, "coefficient": 2.0}],
        "intervention_layers": [10],
    }
    response = export(body)
    assert response.status_code == 200, response.content
    vectors = read_back(response, tmp_path, hidden=576, layers=30)
    scale = demo_feature_space.features.get(index=1681).max_activation
    sae = load_sae(demo_feature_space.checkpoint_path, dtype=torch.float32)
    assert list(vectors) == [10]
    assert torch.allclose(vectors[10], 2.0 * scale * sae.W_dec[1681], atol=1e-5)


@pytest.mark.parametrize(
    ("change", "status", "field"),
    [
        ({"method": "multiplicative", "intervention_layers": [2]}, 400, "method"),
        ({"intervention_layers": [0, 2]}, 400, "intervention_layers"),
        ({"intervention_layers": [4]}, 400, "intervention_layers"),
        ({"features": [{"feature_id": 0, "coefficient": 0.0}]}, 400, "features"),
        ({"features": [{"feature_id": 9, "coefficient": 1.0}]}, 400, "features"),
        ({"model_id": 999}, 400, "model_id"),
        ({"training_id": 999}, 404, "training_id"),
    ],
)
def test_it_refuses_what_llama_cpp_cannot_apply_naming_the_field(export, vector_space, change, status, field):
    body = {
        "training_id": vector_space.pk,
        "model_id": vector_space.model_id,
        "features": [{"feature_id": 0, "coefficient": 1.0}],
        "intervention_layers": [2],
        **change,
    }
    assert_error(export(body), status, field)


def test_it_refuses_multiplicative_sae_steering(export, training):
    body = {
        "training_id": training.pk,
        "model_id": training.model_id,
        "features": [{"feature_id": 3, "coefficient": 1.0}],
        "intervention_layers": [training.hook_layer],
        "method": "multiplicative",
    }
    body = assert_error(export(body), 400, "method")
    assert "cannot be exported" in body["detail"]


def test_it_answers_409_naming_the_training_when_its_sae_cannot_be_read(export, training):
    body = {
        "training_id": training.pk,
        "model_id": training.model_id,
        "features": [{"feature_id": 3, "coefficient": 1.0}],
        "intervention_layers": [training.hook_layer],
    }
    body = assert_error(export(body), 409, "training_id")
    assert "/nonexistent/sae" in body["detail"]


def test_it_answers_401_without_a_token(client, vector_space):
    response = client.post(URL, {}, content_type="application/json")
    assert response.status_code == 401
