import pytest
from django.contrib.auth import authenticate
from django.core.management import call_command

from steering_app.engine.demo import DEMO_CHECKPOINT
from steering_app.models import Feature, LanguageModel, Training

pytestmark = [pytest.mark.django_db, pytest.mark.slow]


def test_it_makes_the_demo_ready_and_changes_nothing_when_run_again(monkeypatch, capsys):
    monkeypatch.setenv("DEMO_PASSWORD", "steer-me")

    call_command("bootstrap_demo")
    call_command("bootstrap_demo")

    model = LanguageModel.objects.get()
    assert (model.name, model.num_layers, model.hidden_size) == ("SmolLM2-135M-Instruct", 30, 576)
    training = Training.objects.exclude(encoder_type="vectors").get()
    assert training.status == Training.Status.COMPLETED and training.hook_layer == 10
    assert training.checkpoint_path == str(DEMO_CHECKPOINT.resolve())
    assert training.dataset.name == "smollm2-demo-corpus"
    assert training.stats["explained_variance"] >= 0.75 and training.stats["dead_fraction"] <= 0.10
    assert training.features.count() == training.d_sae >= 2048
    labelled = Feature.objects.filter(max_activation__gt=0).exclude(label__startswith="feature #").count()
    assert labelled >= training.d_sae / 2
    assert authenticate(username="demo", password="steer-me") is not None


def test_it_prints_a_generated_password_once(monkeypatch, capsys):
    monkeypatch.delenv("DEMO_PASSWORD", raising=False)

    call_command("bootstrap_demo")
    first = capsys.readouterr().out
    call_command("bootstrap_demo")
    second = capsys.readouterr().out

    password = first.rsplit("password ", 1)[1].strip()
    assert authenticate(username="demo", password=password) is not None
    assert "exists" in second and password not in second
