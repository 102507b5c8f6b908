"""Migrations steering_app 0010 and presets_app 0004: runs and presets share their steering fields (a run's
max_new_tokens became max_tokens) and every stored value stays."""

import pytest
from django.db import IntegrityError, transaction

from tests.migrations import migrate

BEFORE = [("steering_app", "0009_experiments"), ("presets_app", "0003_preset_sweep")]
AFTER = [("steering_app", "0011_steering_config"), ("presets_app", "0004_steering_config")]
STEERING = {
    "features": [{"feature_id": 3, "coefficient": -2.5}],
    "intervention_layers": [2],
    "method": "multiplicative",
    "temperature": 0.25,
    "chat": True,
    "sweep": [0.5, 2.0],
}


@pytest.mark.django_db(transaction=True)
def test_it_keeps_every_runs_and_presets_steering_values(owner, training, back_to_latest):
    old = migrate(BEFORE)
    run = old.get_model("steering_app", "SteeringRun").objects.create(
        owner_id=owner.pk, training_id=training.pk, prompt="Rain?", seed=5, max_new_tokens=17, **STEERING
    )
    preset = old.get_model("presets_app", "SteeringPreset").objects.create(
        owner_id=owner.pk, training_id=training.pk, name="p", seed=None, max_tokens=9, **STEERING
    )

    new = migrate(AFTER)

    fields = [*STEERING, "max_tokens", "seed"]
    NewRun = new.get_model("steering_app", "SteeringRun")
    NewPreset = new.get_model("presets_app", "SteeringPreset")
    assert NewRun.objects.filter(pk=run.pk).values(*fields, "prompt").get() == {
        **STEERING,
        "max_tokens": 17,
        "seed": 5,
        "prompt": "Rain?",
    }
    assert NewPreset.objects.filter(pk=preset.pk).values(*fields, "name").get() == {
        **STEERING,
        "max_tokens": 9,
        "seed": None,
        "name": "p",
    }
    # The database still refuses a run that would generate nothing, under the field's new name.
    with pytest.raises(IntegrityError), transaction.atomic():
        NewRun.objects.filter(pk=run.pk).update(max_tokens=0)
