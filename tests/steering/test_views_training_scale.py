"""GET /steering/trainings/<id>/scale/?prompt=: |h| at the SAE's layer, the unit of uncalibrated sliders."""

import pytest

from steering_app.engine import loader
from steering_app.engine.scale import residual_norm
from steering_app.limits import MAX_PROMPT_CHARS
from steering_app.models import LanguageModel, Training

pytestmark = pytest.mark.django_db


def scale(client, training, prompt):
    return client.get(f"/steering/trainings/{training.pk}/scale/", {"prompt": prompt})


def test_it_requires_login(client, training):
    response = scale(client, training, "Hello")
    assert response.status_code == 302 and response["Location"].startswith("/login/")


@pytest.mark.slow
def test_it_measures_the_residual_norm_at_the_trainings_layer_on_the_prompt(client, owner, training):
    LanguageModel.objects.filter(pk=training.model_id).update(source=loader.SMOLLM2_DEMO)
    client.force_login(owner)

    response = scale(client, training, "The weather today is")

    assert response.status_code == 200
    body = response.json()
    lm = loader.load_model(loader.SMOLLM2_DEMO)
    assert body == {"residual_norm": residual_norm(lm, "The weather today is", 2), "layer": 2}
    assert body["residual_norm"] > 0


@pytest.mark.parametrize("prompt", ["", "   ", "x" * (MAX_PROMPT_CHARS + 1), "a\x00b"])
def test_it_refuses_a_prompt_without_text_or_too_long_as_400(client, owner, training, prompt):
    client.force_login(owner)

    response = scale(client, training, prompt)

    assert response.status_code == 400 and response.json()["field"] == "prompt"


def test_it_answers_404_for_a_training_that_has_not_completed(client, owner, training):
    Training.objects.filter(pk=training.pk).update(status=Training.Status.RUNNING)
    client.force_login(owner)

    assert scale(client, training, "Hello").status_code == 404
