"""The steering panel page: /steering/ with ?training, ?run and ?preset."""

import pytest
from django.utils import timezone

from steering_app.models import Feature, LanguageModel, Training

pytestmark = pytest.mark.django_db

PANEL = "/steering/"


def test_it_redirects_anonymous_users_to_login(client):
    response = client.get(PANEL)
    assert response.status_code == 302 and response["Location"].startswith("/login/")


def test_it_preselects_the_newest_completed_training(client, owner, training, make_training):
    older = make_training(created_at=timezone.now() - timezone.timedelta(days=3))
    make_training(encoder_type="jumprelu", status="running")  # newer but not completed: not offered
    client.force_login(owner)

    response = client.get(PANEL)

    assert response.status_code == 200
    assert response.context["training"] == training
    assert [t.pk for t in response.context["trainings"]] == [training.pk, older.pk]
    label = response.context["trainings"][0].label
    assert label.startswith("topk SAE • tiny-llama • no dataset • Started ")
    assert [chip["layer"] for chip in response.context["layer_chips"]] == [0, 1, 2, 3]
    assert response.context["state"].layers == [training.hook_layer]


def test_it_shows_the_empty_state_without_completed_trainings(client, owner, language_model):
    client.force_login(owner)
    response = client.get(PANEL)
    assert response.status_code == 200
    assert response.context["training"] is None
    assert "No completed trainings available. Complete a training first to use steering." in response.text


def test_it_opens_on_the_requested_training(client, owner, training, make_training):
    other = make_training(hook_layer=0, created_at=timezone.now() - timezone.timedelta(days=1))
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
        max_tokens=17,
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


def test_it_fills_the_panel_from_a_preset(client, owner, training, make_preset):
    preset = make_preset(
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
    assert (card.slider_min, card.slider_max) == (-8, 8)  # symmetric, wide enough for the preset's value
    assert (state.prompt, state.seed, state.chat) == ("", None, False)  # a preset without them


def test_a_preset_restores_its_prompt_seed_chat_and_method(client, owner, training, make_preset):
    preset = make_preset(
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


def test_it_names_the_scale_url_and_gives_the_script_the_trainings_limit(client, owner, training):
    client.force_login(owner)

    response = client.get(PANEL)

    assert f'hx-post="/steering/trainings/{training.pk}/scale/"' in response.text
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


def test_the_url_carries_the_whole_configuration(client, owner, training):
    client.force_login(owner)
    query = (
        f"training={training.pk}&prompt=Tell+me+about+rain&method=additive&temperature=0.25&max_tokens=17"
        "&seed=4321&chat=1&private=1&layers=3&layers=1&feature_id=12&coefficient=-1.5&feature_id=3"
        "&coefficient=2"
    )

    response = client.get(f"{PANEL}?{query}")

    state = response.context["state"]
    assert response.status_code == 200 and state.notes == []
    assert (state.prompt, state.method, state.temperature, state.max_tokens, state.seed) == (
        "Tell me about rain",
        "additive",
        0.25,
        17,
        4321,
    )
    assert (state.chat, state.private, state.layers) == (True, True, [1, 3])
    assert [(card.index, card.label, card.coefficient) for card in state.features] == [
        (12, "cooking recipes", -1.5),
        (3, "weather and rain", 2.0),
    ]
    html = response.text
    assert ">Tell me about rain</textarea>" in html and 'name="seed" value="4321"' in html
    assert 'name="private" value="1" checked' in html
    assert 'src="/static/js/panel_state.js"' in html


def test_the_url_keeps_the_sweep_and_its_multipliers(client, owner, training):
    client.force_login(owner)

    ticked = client.get(PANEL, {"training": training.pk, "sweep": "0.5,1, 2,4"})
    unticked = client.get(PANEL, {"training": training.pk})

    assert ticked.context["state"].sweep == [0.5, 1.0, 2.0, 4.0] and ticked.context["state"].notes == []
    assert '<input type="checkbox" id="sweep" checked' in ticked.text
    assert 'name="sweep" value="0.5, 1, 2, 4" inputmode' in ticked.text
    assert unticked.context["state"].sweep is None
    assert '<input type="checkbox" id="sweep" aria-controls' in unticked.text
    assert 'aria-describedby="sweep-hint" disabled>' in unticked.text  # not sent: no sweep
    assert 'aria-describedby="sweep-hint">' in ticked.text


def test_multiplicative_disables_the_layers_other_than_the_saes_and_says_why(client, owner, training):
    client.force_login(owner)

    response = client.get(PANEL, {"training": training.pk, "method": "multiplicative", "layers": [0, 1]})

    chips = {chip["layer"]: chip for chip in response.context["layer_chips"]}
    hook = training.hook_layer
    assert [layer for layer, chip in chips.items() if chip["disabled"]] == [n for n in range(4) if n != hook]
    assert [layer for layer, chip in chips.items() if chip["checked"]] == [hook]
    assert f'name="layers" value="{hook}" checked required' in response.text
    assert f"acts only at the SAE's layer L{hook}" in response.text
    additive = client.get(PANEL, {"training": training.pk, "method": "additive", "layers": [0, 1]})
    assert not any(chip["disabled"] for chip in additive.context["layer_chips"])
    assert [chip["layer"] for chip in additive.context["layer_chips"] if chip["checked"]] == [0, 1]


def test_the_max_tokens_field_says_the_slots_maximum(client, owner, training, settings):
    settings.STEERLAB_SLOT_TOKENS = 300
    client.force_login(owner)

    response = client.get(PANEL, {"training": training.pk})

    assert 'name="max_tokens" value="64" min="1" max="300"' in response.text
    assert 'At most <strong id="max-tokens-limit">300</strong>' in response.text
    assert "the worker's 300-token slots hold the prompt too (300 − prompt tokens + 1)" in response.text


def test_the_max_tokens_hint_gives_the_most_a_typed_prompt_leaves_room_for(client, owner, training, settings):
    settings.STEERLAB_SLOT_TOKENS = 300
    client.force_login(owner)
    url = f"/steering/trainings/{training.pk}/max-tokens/"

    typed = client.post(url, {"prompt": "one two three four"})  # the fake model: a word a token
    opened = client.get(PANEL, {"training": training.pk, "prompt": "one two"})

    assert typed.status_code == 200
    assert 'At most <strong id="max-tokens-limit">297</strong> for this 4-token prompt' in typed.text
    assert 'hx-trigger="input changed' in typed.text  # it keeps listening, without asking again on load
    assert 'hx-trigger="load, input changed' in opened.text  # a reopened prompt asks for its own as it loads
    blank = client.post(url, {"prompt": "  "})
    assert "300 − prompt tokens + 1" in blank.text  # no prompt: the slots' maximum
    assert client.get(url).status_code == 405
    too_long = client.post(url, {"prompt": " ".join(["word"] * 400)})
    assert "The prompt is 400 tokens; the worker&#x27;s slots hold at most 300" in too_long.text


def test_a_url_naming_the_training_without_features_or_layers_has_none(client, owner, training, make_run):
    make_run(owner)  # the last run is not reopened: the URL names a configuration
    client.force_login(owner)

    state = client.get(PANEL, {"training": training.pk, "prompt": "Hi"}).context["state"]

    assert (state.features, state.layers, state.prompt, state.run) == ([], [training.hook_layer], "Hi", None)


@pytest.mark.parametrize(
    ("name", "value", "kept"),
    [
        ("temperature", "hot", 0.7),
        ("temperature", "2.5", 0.7),
        ("temperature", "nan", 0.7),
        ("max_tokens", "0", 64),
        ("max_tokens", "1e3", 64),
        ("max_tokens", "9" * 400, 64),  # no float holds it: compared as an int, not through math.isfinite
        ("seed", "-1", None),
        ("seed", "9" * 30, None),
        ("method", "sideways", "additive"),
        ("chat", "maybe", False),
        ("prompt", "nul\x00", ""),
        ("sweep", "0.5,lots", None),
        ("sweep", "1,1e308", None),  # the API's limit on a multiplier
        ("sweep", ",".join(["1"] * 9), None),  # more variants than the worker's rows
    ],
)
def test_a_bad_value_in_the_url_is_ignored_with_a_visible_note(client, owner, training, name, value, kept):
    client.force_login(owner)

    response = client.get(PANEL, {"training": training.pk, name: value})

    assert response.status_code == 200
    state = response.context["state"]
    assert getattr(state, name) == kept
    [note] = state.notes
    assert note.startswith(f"Ignored {name}=") and "from the link" in note
    assert 'class="notice notice-warn link-note"' in response.text


def test_bad_layers_and_features_in_the_url_are_ignored_one_by_one(client, owner, training):
    client.force_login(owner)
    query = (
        f"training={training.pk}&layers=1&layers=99&layers=x"
        "&feature_id=3&coefficient=2&feature_id=999&coefficient=1&feature_id=7&coefficient=lots"
        "&feature_id=12&coefficient=500&feature_id=3&coefficient=4"
    )

    response = client.get(f"{PANEL}?{query}")

    state = response.context["state"]
    assert response.status_code == 200
    assert state.layers == [1]
    assert [(card.index, card.coefficient) for card in state.features] == [(3, 2.0)]
    notes = " | ".join(state.notes)
    assert "Ignored layer '99'" in notes and "Ignored layer 'x'" in notes
    assert "Ignored feature #999 from the link: training" in notes
    assert "Ignored feature '7' from the link: not a number" in notes
    assert "Ignored feature '12' from the link: outside -100 to 100" in notes


def test_features_without_their_coefficients_are_ignored_with_a_note(client, owner, training):
    client.force_login(owner)

    response = client.get(f"{PANEL}?training={training.pk}&feature_id=3&feature_id=7&coefficient=1")

    assert response.context["state"].features == []
    assert response.context["state"].notes == [
        "Ignored the link's features: each feature needs exactly one coefficient."
    ]


def test_the_url_changes_a_preset_but_the_panel_still_names_it(client, owner, training, make_preset):
    preset = make_preset(
        name="rainy",
        features=[{"feature_id": 12, "coefficient": -8.0}],
        intervention_layers=[0, 2],
        prompt="From the preset",
        seed=5,
    )
    client.force_login(owner)

    loaded = client.get(PANEL, {"preset": preset.pk})
    edited = client.get(PANEL, {"preset": preset.pk, "training": training.pk, "seed": "6", "layers": "1"})

    assert loaded.context["state"].edited is False and edited.context["state"].edited is True
    assert 'id="loaded-preset"' in loaded.text and "rainy" in loaded.text and "then edited" not in loaded.text
    assert "then edited" in edited.text
    state = edited.context["state"]
    # A whole configuration: what the URL leaves out (features) is gone; the prompt, not in it, is kept.
    assert (state.seed, state.layers, state.features, state.prompt) == (6, [1], [], "From the preset")


def test_a_url_without_a_configuration_reopens_the_users_last_run(
    client, owner, teammate, training, make_run
):
    now = timezone.now()
    make_run(owner, prompt="older", created_at=now - timezone.timedelta(hours=1))
    last = make_run(owner, prompt="latest", seed=99, created_at=now - timezone.timedelta(minutes=1))
    make_run(teammate, prompt="someone else's", created_at=now)
    client.force_login(owner)

    response = client.get(PANEL)

    state = response.context["state"]
    assert (state.prompt, state.seed, state.run, state.restored) == ("latest", 99, last, True)
    assert 'id="loaded-run"' in response.text and f"?training={training.pk}" in response.text  # Start fresh


def test_a_member_without_runs_gets_a_fresh_panel(client, owner, teammate, training, make_run):
    make_run(teammate)
    client.force_login(owner)

    state = client.get(PANEL).context["state"]

    assert (state.prompt, state.features, state.run, state.notes) == ("", [], None, [])


def test_a_reopened_sweep_run_keeps_its_multipliers_and_the_history_shows_them(client, owner, make_run):
    run = make_run(owner, sweep=[0.25, 3.0], status="completed")
    client.force_login(owner)

    panel = client.get(PANEL, {"run": run.pk})

    assert panel.context["state"].sweep == [0.25, 3.0]
    assert '<input type="checkbox" id="sweep" checked' in panel.text
    assert 'name="sweep" value="0.25, 3" inputmode' in panel.text  # enabled: the form sends it
    history = client.get("/steering/runs/").text
    assert "sweep ×0.25, ×3.0" in history
