"""Features imported before labels files were checked may hold values the app cannot show or steer with: a
max activation that is not finite (the API would emit `Infinity`, not JSON), and top tokens or examples that
are not lists of text (the panel's feature card iterates them). Unknown is what such a value means: null for
the max activation (steering then uses 1, and says so), an empty list for the others."""

import math

from django.db import migrations


def is_text_list(value) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def clean_feature_values(apps, schema_editor):
    Feature = apps.get_model("steering_app", "Feature")
    broken = []
    for feature in Feature.objects.only("pk", "max_activation", "top_tokens", "examples").iterator(chunk_size=2000):
        fixed = False
        if feature.max_activation is not None and not math.isfinite(feature.max_activation):
            feature.max_activation, fixed = None, True
        for name in ("top_tokens", "examples"):
            if not is_text_list(getattr(feature, name)):
                setattr(feature, name, [])
                fixed = True
        if fixed:
            broken.append(feature)
    Feature.objects.bulk_update(broken, ["max_activation", "top_tokens", "examples"], batch_size=500)


class Migration(migrations.Migration):
    dependencies = [("steering_app", "0006_run_error_field_and_workers")]

    operations = [migrations.RunPython(clean_feature_values, migrations.RunPython.noop)]
