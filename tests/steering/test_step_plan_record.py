"""The worker's step plan: its STEERLAB_STEP_* settings, stored on the model's row when a worker builds its
batch, and shown to staff on the model's admin page."""

import pytest
from django.core.exceptions import ImproperlyConfigured

from steering_app import engine_config, services
from steering_app.engine import loader
from steering_app.model_files import DEMO_MODEL
from steering_app.models import LanguageModel
from steerproject import env
from tests.engine.conftest import tiny_lm


def test_it_reads_the_step_policy_from_the_environment():
    assert env.step_policy({}) == {"lean": "auto", "kernel": "auto", "rows": "auto"}
    forced = {"STEERLAB_STEP_LEAN": "Off", "STEERLAB_STEP_KERNEL": "wxt", "STEERLAB_STEP_ROWS": "all"}
    assert env.step_policy(forced) == {"lean": "off", "kernel": "wxt", "rows": "all"}


@pytest.mark.parametrize("name", ["STEERLAB_STEP_LEAN", "STEERLAB_STEP_KERNEL", "STEERLAB_STEP_ROWS"])
def test_it_refuses_an_unknown_step_choice_naming_the_variable(name):
    with pytest.raises(ImproperlyConfigured, match=name):
        env.step_policy({name: "sometimes"})


def test_the_worker_stores_its_step_plan_on_the_models_row(make_run, owner, monkeypatch):
    tokenizer = loader.load_tokenizer(DEMO_MODEL)
    monkeypatch.setattr(loader, "load_model", lambda source, **options: tiny_lm("llama", tokenizer))
    monkeypatch.setattr(
        engine_config.current, "step_policy", {"lean": "off", "kernel": "linear", "rows": "auto"}
    )
    run = make_run(owner)

    batch = services.EngineBatch(run)

    stored = LanguageModel.objects.get(pk=run.training.model_id)
    assert stored.step_plan == batch.scheduler.batch.plan.as_dict()
    assert stored.step_plan["lean"] is False and stored.step_plan["lean_why"] == "forced off"
    assert stored.step_plan["kernels_why"] == "forced linear"
    assert stored.step_plan_host and stored.step_plan_at is not None


def test_it_shows_the_step_plan_on_the_models_admin_page(client, staff, language_model):
    language_model.step_plan = {"summary": "8 rows x 512: lean step (probe matched the modules)"}
    language_model.step_plan_host = "worker-7"
    language_model.save()
    client.force_login(staff)

    response = client.get(f"/admin/steering_app/languagemodel/{language_model.pk}/change/")

    assert response.status_code == 200
    assert b"8 rows x 512: lean step (probe matched the modules)" in response.content
    assert b"worker-7" in response.content
