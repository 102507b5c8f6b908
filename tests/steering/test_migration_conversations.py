"""Migrations steering_app 0014 and presets_app 0005: conversations, a run's conversation and turn, a preset's
system prompt. Every stored run and preset stays, with no conversation and no system prompt."""

import pytest

from tests.migrations import migrate

BEFORE = [("steering_app", "0013_vector_jobs"), ("presets_app", "0004_steering_config")]
AFTER = [("steering_app", "0014_conversations"), ("presets_app", "0005_preset_system_prompt")]
STEERING = {"features": [{"feature_id": 3, "coefficient": 2.0}], "intervention_layers": [2], "max_tokens": 9}


@pytest.mark.django_db(transaction=True)
def test_it_keeps_every_run_and_preset(owner, training, back_to_latest):
    old = migrate(BEFORE)
    run = old.get_model("steering_app", "SteeringRun").objects.create(
        owner_id=owner.pk, training_id=training.pk, prompt="Rain?", seed=5, **STEERING
    )
    preset = old.get_model("presets_app", "SteeringPreset").objects.create(
        owner_id=owner.pk, training_id=training.pk, name="p", prompt="Rain?", **STEERING
    )

    new = migrate(AFTER)

    NewRun = new.get_model("steering_app", "SteeringRun")
    NewPreset = new.get_model("presets_app", "SteeringPreset")
    assert NewRun.objects.filter(pk=run.pk).values("prompt", "seed", "conversation", "turn").get() == {
        "prompt": "Rain?",
        "seed": 5,
        "conversation": None,
        "turn": None,
    }
    assert NewPreset.objects.filter(pk=preset.pk).values("name", "prompt", "system_prompt").get() == {
        "name": "p",
        "prompt": "Rain?",
        "system_prompt": "",
    }
    assert not new.get_model("steering_app", "Conversation").objects.exists()
