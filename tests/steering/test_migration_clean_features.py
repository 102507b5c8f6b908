"""Migration 0007: features imported before labels files were checked get values the app can show."""

import math

import pytest

from tests.migrations import migrate

BEFORE = [("steering_app", "0006_run_error_field_and_workers")]
AFTER = [("steering_app", "0007_clean_imported_feature_values")]


@pytest.mark.django_db(transaction=True)
def test_it_clears_values_the_panel_and_the_api_cannot_use_and_keeps_the_rest(training, back_to_latest):
    old = migrate(BEFORE)
    Feature = old.get_model("steering_app", "Feature")
    Feature.objects.filter(training_id=training.pk, index=3).update(
        max_activation=math.inf, top_tokens="notalist", examples=5
    )
    Feature.objects.filter(training_id=training.pk, index=7).update(top_tokens=[" rain", 4])
    Feature.objects.filter(training_id=training.pk, index=12).update(
        top_tokens=[" cake"], examples=["«cake»"]
    )

    new = migrate(AFTER)

    rows = {
        row.index: (row.max_activation, row.top_tokens, row.examples)
        for row in new.get_model("steering_app", "Feature").objects.filter(index__in=[3, 7, 12])
    }
    assert rows == {3: (None, [], []), 7: (8.0, [], []), 12: (13.0, [" cake"], ["«cake»"])}
