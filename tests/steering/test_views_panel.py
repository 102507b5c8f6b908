"""The steering panel page: /steering/ with ?training, ?run and ?preset."""

import pytest
from django.utils import timezone

from steering_app.models import Feature, LanguageModel, Training

pytestmark = pytest.mark.django_db

PANEL = "/steering/"


def test_it_redirects_anonymous_users_to_login(client):
    response = client.get(PANEL)
    assert response.status_code == 302 and response["Location"].startswith("/login/")


def test_it_preselects_the_newest_completed_training(client, owner, training, language_model):
    older = Training.objects.create(
        model=language_model,
        encoder_type="standard",
        hook_layer=1,
        hook_name="blocks.1.hook_resid_post",
        d_in=16,
        d_sae=8,
        checkpoint_path="/x",
        status="completed",
        created_at=timezone.now() - timezone.timedelta(days=3),
    )
    Training.objects.create(  # newer but not completed: not offered
        model=language_model,
        encoder_type="jumprelu",
        hook_layer=1,
        hook_name="blocks.1.hook_resid_post",
        d_in=16,
        d_sae=8,
        checkpoint_path="/x",
        status="running",
    )
    client.force_login(owner)

    response = client.get(PANEL)

    assert response.status_code == 200
    assert response.context["training"] == training
    assert [t.pk for t in response.context["trainings"]] == [training.pk, older.pk]
    label = response.context["trainings"][0].label
    assert label.startswith("topk SAE • tiny-llama • no dataset • Started ")
    assert list(response.context["layer_choices"]) == [0, 1, 2, 3]
    assert response.context["state"].layers == [training.hook_layer]


def test_it_shows_the_empty_state_without_completed_trainings(client, owner, language_model):
    client.force_login(owner)
    response = client.get(PANEL)
    assert response.status_code == 200
    assert response.context["training"] is None
    assert "No completed trainings available. Complete a training first to use steering." in response.text


def test_it_opens_on_the_requested_training(client, owner, training, language_model):
    other = Training.objects.create(
        model=language_model,
        encoder_type="standard",
        hook_layer=0,
        hook_name="blocks.0.hook_resid_post",
        d_in=16,
        d_sae=8,
        checkpoint_path="/x",
        status="completed",
        created_at=timezone.now() - timezone.timedelta(days=1),
    )
    client.force_login(owner)

    response = client.get(PANEL, {"training": other.pk})

    assert response.status_code == 200 and response.context["training"] == other
    assert response.context["state"].layers == [0]


@pytest.mark.parametrize("value", ["999999", "abc"])
def test_it_404s_for_an_unknown_training(client, owner, training, value):
    client.force_login(owner)
    assert client.get(PANEL, {"training": value}).status_code == 404


def test_it_404s_for_a_training_that_is_not_completed(client, owner, training):
    training.status = Training.Status.FAILED
    training.save()
    client.force_login(owner)
    assert client.get(PANEL, {"training": training.pk}).status_code == 404


def test_it_fills_the_panel_from_a_run_of_the_user(client, owner, training, make_run):
    run = make_run(
        owner,
        features=[{"feature_id": 3, "coefficient": 2.5}],
        intervention_layers=[1, 2],
        temperature=0.3,
        max_new_tokens=17,
        seed=1234,
        chat=True,
    )
    client.force_login(owner)

    response = client.get(PANEL, {"run": run.pk})

    state = response.context["state"]
    assert response.status_code == 200 and response.context["training"] == training
    assert (
        state.prompt,
        state.layers,
        state.method,
        state.temperature,
        state.max_tokens,
        state.seed,
        state.chat,
    ) == ("Tell me about rain", [1, 2], "additive", 0.3, 17, 1234, True)
    assert [(f.index, f.label, f.coefficient) for f in state.features] == [(3, "weather and rain", 2.5)]
    assert 'name="feature_id" value="3"' in response.text


def test_it_fills_the_panel_from_a_teammates_shared_run(client, owner, teammate, training, make_run):
    run = make_run(owner, prompt="Shared prompt")
    client.force_login(teammate)

    response = client.get(PANEL, {"run": run.pk})

    assert response.status_code == 200 and response.context["state"].prompt == "Shared prompt"


def test_it_does_not_fill_from_another_users_private_run(client, owner, stranger, training, make_run):
    run = make_run(owner, private=True)
    client.force_login(stranger)
    assert client.get(PANEL, {"run": run.pk}).status_code == 404


def test_staff_can_fill_from_any_run(client, owner, staff, training, make_run):
    run = make_run(owner)
    client.force_login(staff)
    assert client.get(PANEL, {"run": run.pk}).status_code == 200


def test_it_fills_the_panel_from_a_preset(client, owner, training):
    from presets_app.models import SteeringPreset

    preset = SteeringPreset.objects.create(
        training=training,
        owner=owner,
        name="rainy",
        features=[{"feature_id": 12, "coefficient": -8.0}],
        intervention_layers=[0, 2],
        method="additive",
        temperature=1.2,
        max_tokens=33,
    )
    client.force_login(owner)

    response = client.get(PANEL, {"preset": preset.pk})

    state = response.context["state"]
    assert response.status_code == 200 and response.context["training"] == training
    assert (state.layers, state.temperature, state.max_tokens) == ([0, 2], 1.2, 33)
    [card] = state.features
    assert (card.index, card.label, card.coefficient) == (12, "cooking recipes", -8.0)
    assert (card.slider_min, card.slider_max) == (-8.0, 5.0)  # the slider can show the preset's value
    assert (state.prompt, state.seed, state.chat) == ("", None, False)  # a preset without them


def test_a_preset_restores_its_prompt_seed_chat_and_method(client, owner, training):
    from presets_app.models import SteeringPreset

    preset = SteeringPreset.objects.create(
        training=training,
        owner=owner,
        name="rain, exactly",
        features=[{"feature_id": 3, "coefficient": 1.5}],
        intervention_layers=[2],
        method="multiplicative",
        temperature=0.0,
        max_tokens=12,
        prompt="Tell me about rain",
        seed=777,
        chat=True,
    )
    client.force_login(owner)

    response = client.get(PANEL, {"preset": preset.pk})

    state = response.context["state"]
    assert (state.prompt, state.seed, state.chat, state.method, state.layers) == (
        "Tell me about rain",
        777,
        True,
        "multiplicative",
        [2],
    )
    assert (state.temperature, state.max_tokens) == (0.0, 12)
    html = response.text
    assert ">Tell me about rain</textarea>" in html and 'name="seed" value="777"' in html


def test_it_404s_for_an_unknown_preset(client, owner, training):
    client.force_login(owner)
    assert client.get(PANEL, {"preset": 424242}).status_code == 404


def test_it_answers_404_for_a_preset_that_does_not_exist_or_an_id_that_is_not_one(client, owner, training):
    client.force_login(owner)
    for preset in ("1", "x", str(2**70)):
        assert client.get(PANEL, {"preset": preset}).status_code == 404


def test_it_offers_the_chat_toggle_only_for_models_with_a_chat_template(client, owner, training, tmp_path):
    client.force_login(owner)
    assert client.get(PANEL).context["chat_available"] is False

    (tmp_path / "tokenizer_config.json").write_text('{"chat_template": "{{ messages }}"}')
    LanguageModel.objects.filter(pk=training.model_id).update(source=str(tmp_path))
    response = client.get(PANEL)
    assert response.context["chat_available"] is True
    assert 'name="chat"' in response.text


def test_the_form_carries_the_fields_of_the_panel_contract(client, owner, training):
    client.force_login(owner)
    html = client.get(PANEL).text
    assert 'id="steering-form"' in html
    for name in ("training", "prompt", "method", "temperature", "max_tokens", "seed", "layers"):
        assert f'name="{name}"' in html
    assert 'id="presets-section"' in html or "presets/_section.html" not in html


def test_it_gives_the_script_the_scale_url_and_the_trainings_limit(client, owner, training):
    client.force_login(owner)

    response = client.get(PANEL)

    assert f'data-scale-url="/steering/trainings/{training.pk}/scale/"' in response.text
    assert 'data-max-abs-coefficient="100"' in response.text


def test_it_marks_the_selected_cards_of_an_uncalibrated_training(client, owner, training, make_run):
    Feature.objects.filter(training=training).update(max_activation=None)
    Feature.objects.filter(training=training, index=3).update(activation_frequency=0.0)
    Training.objects.filter(pk=training.pk).update(stats={"residual_norm": 40.0})
    run = make_run(owner, features=[{"feature_id": 3, "coefficient": 150.0}])
    client.force_login(owner)

    response = client.get(PANEL, {"run": run.pk})

    card = response.context["state"].features[0]
    assert (card.calibrated, card.dead, card.slider_max) == (False, True, 150)
    assert 'data-max-abs-coefficient="4000"' in response.text
    assert 'data-calibrated="false" data-dead' in response.text
    assert "uncalibrated: c is in residual-stream units" in response.text
