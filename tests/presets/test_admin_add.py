from presets_app.models import SteeringPreset

URL = "/admin/presets_app/steeringpreset/add/"


def form(training, owner, features):
    return {
        "name": "added",
        "description": "",
        "training": str(training.pk),
        "owner": str(owner.pk),
        "features": features,
        "intervention_layers": "[2]",
        "method": "additive",
        "temperature": "0.7",
        "max_tokens": "64",
    }


def test_it_lets_staff_add_a_preset_with_valid_features(login, staff, owner, training):
    response = login(staff).post(URL, form(training, owner, '[{"feature_id": 12, "coefficient": 3}]'))

    assert response.status_code == 302
    assert SteeringPreset.objects.get().features == [{"feature_id": 12, "coefficient": 3.0}]


def test_it_refuses_to_add_a_preset_with_unknown_features(login, staff, owner, training):
    response = login(staff).post(URL, form(training, owner, '[{"feature_id": 99, "coefficient": 3}]'))

    assert response.status_code == 200
    assert "features" in response.context["adminform"].form.errors
    assert not SteeringPreset.objects.exists()


def test_it_refuses_a_training_that_is_not_completed(login, staff, owner, pending_training):
    response = login(staff).post(URL, form(pending_training, owner, '[{"feature_id": 1, "coefficient": 3}]'))

    assert "training" in response.context["adminform"].form.errors
    assert not SteeringPreset.objects.exists()


def test_it_proposes_the_staff_member_as_owner(login, staff):
    response = login(staff).get(URL)

    assert response.context["adminform"].form.initial["owner"] == staff.pk


def test_it_refuses_deeply_nested_features_as_a_form_error(login, staff, owner, training):
    response = login(staff).post(URL, form(training, owner, "[" * 100_000 + "]" * 100_000))

    assert response.status_code == 200
    assert "nested more than 64 levels" in str(response.context["adminform"].form.errors["features"])
    assert not SteeringPreset.objects.exists()


def test_it_lets_staff_add_a_preset_with_a_sweep_checked_like_the_apis(login, staff, owner, training):
    features = '[{"feature_id": 12, "coefficient": 3}]'
    refused = login(staff).post(URL, {**form(training, owner, features), "sweep": '["x"]'})
    assert "sweep" in refused.context["adminform"].form.errors
    assert not SteeringPreset.objects.exists()

    response = login(staff).post(URL, {**form(training, owner, features), "sweep": "[0.5, 2]"})

    assert response.status_code == 302
    assert SteeringPreset.objects.get().sweep == [0.5, 2.0]
