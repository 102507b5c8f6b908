"""POST /steering/trainings/<id>/scale/ {prompt}: |h| at the SAE's layer, the unit of uncalibrated sliders."""

import pytest
from django.test import Client

from steering_app import services, wake
from steering_app.engine import loader
from steering_app.engine.analysis.scale import residual_norm
from steering_app.errors import InvalidInput
from steering_app.limits import MAX_PROMPT_CHARS
from steering_app.model_files import DEMO_MODEL
from steering_app.models import AnalysisJob, LanguageModel, Training

pytestmark = pytest.mark.django_db


def scale(client, training, prompt):
    return client.post(f"/steering/trainings/{training.pk}/scale/", {"prompt": prompt})


def test_it_requires_login(client, training):
    response = scale(client, training, "Hello")
    assert response.status_code == 302 and response["Location"].startswith("/login/")


def test_it_refuses_a_get_so_that_no_link_can_start_a_forward(client, owner, training):
    client.force_login(owner)

    response = client.get(f"/steering/trainings/{training.pk}/scale/", {"prompt": "Hello"})

    assert response.status_code == 405 and not AnalysisJob.objects.exists()


def test_it_refuses_a_post_without_the_csrf_token(owner, training):
    client = Client(enforce_csrf_checks=True)
    client.force_login(owner)

    assert scale(client, training, "Hello").status_code == 403


@pytest.mark.slow
def test_it_measures_the_residual_norm_at_the_trainings_layer_on_the_prompt(client, owner, training):
    LanguageModel.objects.filter(pk=training.model_id).update(source=DEMO_MODEL)
    client.force_login(owner)

    response = scale(client, training, "The weather today is")

    assert response.status_code == 200
    body = response.json()
    lm = loader.load_model(DEMO_MODEL)
    assert body == {"residual_norm": residual_norm(lm, "The weather today is", 2), "layer": 2}
    assert body["residual_norm"] > 0


def test_a_worker_measures_it_and_the_job_is_gone_once_answered(client, owner, training, monkeypatch):
    measured = []

    def measure(training, prompt):
        measured.append(prompt)
        return 12.5

    monkeypatch.setattr(services, "residual_norm", measure)
    client.force_login(owner)

    response = scale(client, training, "The weather today is")

    assert response.status_code == 200
    assert response.json() == {"residual_norm": 12.5, "layer": training.hook_layer}
    assert measured == ["The weather today is"]
    assert not AnalysisJob.objects.exists()


@pytest.mark.parametrize("prompt", ["", "   ", "x" * (MAX_PROMPT_CHARS + 1), "a\x00b"])
def test_it_refuses_a_prompt_without_text_or_too_long_as_400(client, owner, training, prompt):
    client.force_login(owner)

    response = scale(client, training, prompt)

    assert response.status_code == 400 and response.json()["field"] == "prompt"


def test_it_refuses_a_prompt_longer_than_a_slot_in_tokens_before_queueing_it(
    client, owner, training, monkeypatch
):
    monkeypatch.setattr(services, "residual_norm", lambda training, prompt: pytest.fail("the model read it"))
    client.force_login(owner)

    response = scale(client, training, "word " * (services.slot_tokens() + 1))

    body = response.json()
    assert response.status_code == 400 and body["field"] == "prompt"
    assert f"at most {services.slot_tokens()}" in body["detail"]
    assert not AnalysisJob.objects.exists()


def test_a_prompt_the_engine_refuses_is_a_400_naming_its_field(client, owner, training, monkeypatch):
    def refuse(training, prompt):
        raise InvalidInput("prompt has no tokens other than special ones", "prompt")

    monkeypatch.setattr(services, "residual_norm", refuse)
    client.force_login(owner)

    response = scale(client, training, "<|im_start|>")

    assert response.status_code == 400
    assert response.json() == {"detail": "prompt has no tokens other than special ones", "field": "prompt"}
    assert not AnalysisJob.objects.exists()


def test_it_answers_503_and_drops_the_job_when_no_worker_answers_in_time(
    client, owner, training, monkeypatch, settings
):
    settings.STEERLAB_RUN_TIMEOUT = 0
    monkeypatch.setattr(wake, "submit", lambda run_id=None: None)  # no worker hears of it
    client.force_login(owner)

    response = scale(client, training, "Hello")

    assert (
        response.status_code == 503
        and "No steering worker could take the prompt" in response.json()["detail"]
    )
    assert not AnalysisJob.objects.exists()


def test_it_answers_404_for_a_training_that_has_not_completed(client, owner, training):
    Training.objects.filter(pk=training.pk).update(status=Training.Status.RUNNING)
    client.force_login(owner)

    assert scale(client, training, "Hello").status_code == 404
