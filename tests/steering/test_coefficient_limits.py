"""The limit on |c| is the training's: 100 max activations once calibrated, else 100 residual norms."""

import pytest

from steering_app.errors import InvalidInput
from steering_app.limits import MAX_ABS_COEFFICIENT_HARD
from steering_app.models import Feature, Training
from steering_app.steering_settings import SteeringSettings

pytestmark = pytest.mark.django_db


def settings_with(coefficient: float) -> SteeringSettings:
    return SteeringSettings(features=[{"feature_id": 3, "coefficient": coefficient}], layers=[2])


def uncalibrate(training: Training, **stats) -> Training:
    Feature.objects.filter(training=training).update(max_activation=None)
    Training.objects.filter(pk=training.pk).update(stats=stats)
    return Training.objects.get(pk=training.pk)


def test_it_calls_a_training_calibrated_when_a_feature_has_a_max_activation_in_one_query(
    training, django_assert_num_queries
):
    with django_assert_num_queries(1):
        assert training.is_calibrated and training.is_calibrated
    assert Feature.objects.get(training=training, index=0).is_calibrated


def test_it_calls_a_training_uncalibrated_when_no_feature_has_a_positive_max_activation(training):
    Feature.objects.filter(training=training).update(max_activation=None)
    Feature.objects.filter(training=training, index=5).update(max_activation=0.0)

    training = Training.objects.get(pk=training.pk)

    assert training.is_calibrated is False
    assert Feature.objects.get(training=training, index=5).is_calibrated is False


def test_it_keeps_a_calibrated_trainings_limit_at_100(training):
    assert training.max_abs_coefficient == 100
    assert settings_with(-100).validate(training).features[0]["coefficient"] == -100.0

    with pytest.raises(InvalidInput, match=rf"within ±100, the limit of training {training.pk}") as caught:
        settings_with(100.5).validate(training)
    assert caught.value.field == "features"


def test_it_scales_an_uncalibrated_trainings_limit_with_its_recorded_residual_norm(training):
    training = uncalibrate(training, residual_norm=40.0)

    assert training.max_abs_coefficient == 4000
    assert settings_with(3999.5).validate(training).features[0]["coefficient"] == 3999.5
    with pytest.raises(InvalidInput, match=r"within ±4000, .*residual-stream units"):
        settings_with(4000.5).validate(training)


def test_it_allows_an_uncalibrated_training_without_a_recorded_norm_up_to_the_hard_cap(training):
    training = uncalibrate(training)

    assert training.max_abs_coefficient == MAX_ABS_COEFFICIENT_HARD == 10_000
    assert settings_with(9_000).validate(training).features[0]["coefficient"] == 9_000.0
    with pytest.raises(InvalidInput, match="within ±10000"):
        settings_with(10_000.5).validate(training)


def test_it_never_lets_a_recorded_norm_raise_the_limit_past_the_hard_cap(training):
    assert uncalibrate(training, residual_norm=1e6).max_abs_coefficient == MAX_ABS_COEFFICIENT_HARD
