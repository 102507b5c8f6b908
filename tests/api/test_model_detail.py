from django.utils import timezone

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
        "step_plan": None,
    }


def test_it_answers_404_for_an_unknown_model(client, owner, bearer, language_model):
    assert_error(client.get(f"/api/models/{language_model.pk + 1}", headers=bearer(owner)), 404, "model_id")


def test_it_answers_400_for_a_malformed_id(client, owner, bearer, db):
    assert_error(client.get("/api/models/-3", headers=bearer(owner)), 400, "model_id")


def test_it_answers_anonymous_requests_with_401(client, language_model):
    assert_error(client.get(f"/api/models/{language_model.pk}"), 401)


def _recorded(language_model):
    language_model.step_plan = {"summary": "8 rows x 512: lean step", "lean": True}
    language_model.step_plan_host = "worker-1"
    language_model.step_plan_at = timezone.now()
    language_model.save()


def test_it_shows_staff_the_workers_step_plan(client, staff, bearer, language_model):
    _recorded(language_model)
    response = client.get(f"/api/models/{language_model.pk}", headers=bearer(staff))

    assert response.status_code == 200
    step_plan = response.json()["step_plan"]
    assert step_plan["plan"] == {"summary": "8 rows x 512: lean step", "lean": True}
    assert step_plan["host"] == "worker-1" and step_plan["recorded_at"]


def test_it_hides_the_step_plan_from_members(client, owner, bearer, language_model):
    _recorded(language_model)
    response = client.get(f"/api/models/{language_model.pk}", headers=bearer(owner))

    assert response.status_code == 200 and response.json()["step_plan"] is None


def test_it_shows_staff_no_step_plan_before_a_worker_recorded_one(client, staff, bearer, language_model):
    response = client.get(f"/api/models/{language_model.pk}", headers=bearer(staff))

    assert response.status_code == 200 and response.json()["step_plan"] is None
