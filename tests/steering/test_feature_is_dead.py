import pytest

from steering_app.models import Feature


@pytest.mark.parametrize(
    ("frequency", "dead"), [(0.0, True), (0.001, False), (None, False)], ids=["never", "rare", "unknown"]
)
def test_it_calls_a_feature_dead_only_when_it_was_measured_never_active(frequency, dead):
    assert Feature(index=1, activation_frequency=frequency).is_dead is dead


def test_it_reads_examples_from_a_feature_table_entry(training):
    entry = {"label": "rain", "max_activation": 3.0, "examples": ["the« rain» fell (3.0)"]}

    feature = Feature.from_description(training, 4, entry)

    assert feature.examples == ["the« rain» fell (3.0)"]
    assert Feature.from_description(training, 5, {}).examples == []
