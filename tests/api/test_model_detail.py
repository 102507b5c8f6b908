from tests.api.support import assert_error


def test_it_shows_a_models_name_architecture_and_size(client, owner, bearer, language_model):
    response = client.get(f"/api/models/{language_model.pk}", headers=bearer(owner))

    assert response.status_code == 200
    assert response.json() == {
        "id": language_model.pk,
        "name": "tiny-llama",
        "architecture": "LlamaForCausalLM",
        "num_layers": 4,
        "hidden_size": 16,
        "status": "ready",
    }


def test_it_answers_404_for_an_unknown_model(client, owner, bearer, language_model):
    assert_error(client.get(f"/api/models/{language_model.pk + 1}", headers=bearer(owner)), 404, "model_id")


def test_it_answers_400_for_a_malformed_id(client, owner, bearer, db):
    assert_error(client.get("/api/models/-3", headers=bearer(owner)), 400, "model_id")


def test_it_answers_anonymous_requests_with_401(client, language_model):
    assert_error(client.get(f"/api/models/{language_model.pk}"), 401)
