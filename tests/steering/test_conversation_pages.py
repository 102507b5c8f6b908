"""/steering/conversations/: chat mode's pages. The panel's Start chat, a conversation with its turns (the steering
change marked), the owner's message form, Regenerate, sharing and delete, a reader's Continue from here; the list,
the run page's link back, and admin."""

import pytest
from django.utils import timezone

from presets_app.models import SteeringPreset
from steering_app import services
from steering_app.models import Conversation, LanguageModel, SteeringRun
from tests.fake_engine import use_engine

pytestmark = pytest.mark.django_db

METRICS = {
    "kl_divergence": 0.5,
    "perplexity_delta": 1.25,
    "perplexity_unsteered": 3.0,
    "perplexity_steered": 4.25,
    "semantic_similarity": 0.75,
    "word_overlap": 0.5,
    "feature_activation": [{"feature_id": 3, "unsteered": 0.25, "steered": 3.5}],
}


@pytest.fixture
def replies(monkeypatch, settings):
    """Turns run at once in the request's thread, with canned replies instead of a model."""
    settings.STEERLAB_WORKER_MODE = "inline"

    def execute(run, on_step, should_stop=None):
        return services.Outcome(f"clean: {run.prompt}", f"steered: {run.prompt}", METRICS, {})

    use_engine(monkeypatch, execute)


@pytest.fixture
def conversation(owner, training):
    return Conversation.objects.create(
        owner=owner,
        training=training,
        system_prompt="You are a sailor.",
        features=[{"feature_id": 3, "coefficient": 8.0}],
        intervention_layers=[2],
        temperature=0.0,
        max_tokens=8,
        chat=True,
    )


@pytest.fixture
def turn(make_run, conversation, owner):
    """turn(number, coefficient=4.0, **fields) -> a completed turn of `conversation`."""

    def make(number: int, coefficient: float = 4.0, **fields) -> SteeringRun:
        values = {
            "conversation": conversation,
            "turn": number,
            "prompt": f"message {number}",
            "chat": True,
            "features": [{"feature_id": 3, "coefficient": coefficient}],
            "status": "completed",
            "unsteered_output": f"clean reply {number}",
            "steered_output": f"steered reply {number}",
            "metrics": METRICS,
            "started_at": timezone.now(),
            "finished_at": timezone.now(),
        }
        return make_run(owner, **{**values, **fields})

    return make


def page(conversation) -> str:
    return f"/steering/conversations/{conversation.pk}/"


def chat_training(training, tmp_path):
    """The fake model given a tokenizer config with a chat template: the panel offers chat mode."""
    (tmp_path / "tokenizer_config.json").write_text('{"chat_template": "{{ messages }}"}')
    LanguageModel.objects.filter(pk=training.model_id).update(source=str(tmp_path))


def test_the_panel_offers_chat_mode_only_for_a_model_with_a_chat_template(client, owner, training, tmp_path):
    client.force_login(owner)
    assert 'id="start-chat"' not in client.get("/steering/").text

    chat_training(training, tmp_path)
    html = client.get("/steering/").text

    assert 'id="start-chat"' in html and 'name="system_prompt"' in html and 'name="history_mode"' in html


def test_start_chat_makes_a_conversation_of_the_panels_settings_and_opens_it(client, owner, training):
    client.force_login(owner)
    form = {
        "training": training.pk,
        "method": "additive",
        "temperature": "0",
        "max_tokens": "8",
        "layers": ["2"],
        "feature_id": ["3"],
        "coefficient": ["4"],
        "system_prompt": "Be brief.",
        "history_mode": "shared",
    }

    response = client.post("/steering/conversations/new/", form, headers={"HX-Request": "true"})

    conversation = Conversation.objects.get()
    assert response.status_code == 204 and response["HX-Redirect"] == page(conversation)
    assert (conversation.owner, conversation.system_prompt, conversation.history_mode) == (
        owner,
        "Be brief.",
        "shared",
    )
    assert conversation.features == [{"feature_id": 3, "coefficient": 4.0}]
    assert (conversation.intervention_layers, conversation.max_tokens) == ([2], 8)


def test_start_chat_shows_the_refusal_in_the_panel_and_stores_nothing(client, owner, training):
    client.force_login(owner)
    form = {
        "training": training.pk,
        "method": "additive",
        "temperature": "0",
        "max_tokens": "8",
        "layers": ["2"],
    }

    response = client.post("/steering/conversations/new/", {**form, "history_mode": "separate"})

    assert response.status_code == 422 and "Add at least one feature." in response.text
    assert not Conversation.objects.exists()


def test_the_page_shows_each_turn_and_marks_where_the_steering_changed(client, owner, conversation, turn):
    turn(1)
    turn(2)
    turn(3, coefficient=8.0)
    client.force_login(owner)

    response = client.get(page(conversation))

    html = response.text
    assert response.status_code == 200
    assert "You are a sailor." in html
    for number in (1, 2, 3):
        assert (
            f"message {number}" in html
            and f"clean reply {number}" in html
            and f"steered reply {number}" in html
        )
    assert html.count("Steering changed:") == 1
    assert "Steering changed: #3 coefficient 4 → 8" in html
    assert [row["changes"] for row in response.context["turns"]] == [[], [], ["#3 coefficient 4 → 8"]]
    assert "KL <span" in html and "0.5000" in html  # the compact metrics
    assert 'id="message-form"' in html and 'value="8"' in html  # prefilled with the next turn's coefficient


def test_the_page_streams_the_turn_in_progress_over_its_run_websocket(client, owner, conversation, turn):
    running = turn(1, status="running", unsteered_output="", steered_output="")
    client.force_login(owner)

    html = client.get(page(conversation)).text

    assert f'ws-connect="/ws/steering/runs/{running.pk}/"' in html
    assert 'id="stop-run"' in html and 'id="regenerate"' not in html


def test_sending_a_message_adds_a_turn_with_the_forms_steering(client, owner, conversation, turn, replies):
    turn(1, coefficient=8.0)
    client.force_login(owner)
    form = {
        "content": "And the sea?",
        "feature_id": ["3"],
        "coefficient": ["2"],
        "layers": "1, 2",
        "method": "additive",
        "temperature": "0",
        "max_tokens": "6",
        "seed": "9",
    }

    response = client.post(page(conversation) + "send/", form)

    assert response.status_code == 302 and response["Location"] == page(conversation)
    run = conversation.turns()[-1]
    assert (run.turn, run.prompt, run.seed, run.status) == (2, "And the sea?", 9, "completed")
    assert run.features == [{"feature_id": 3, "coefficient": 2.0}]
    assert (run.intervention_layers, run.max_tokens) == ([1, 2], 6)
    assert "Steering changed: #3 coefficient 8 → 2" in client.get(page(conversation)).text


def test_a_refused_message_shows_why_and_adds_no_turn(client, owner, conversation):
    client.force_login(owner)
    form = {"content": "hi", "feature_id": ["3"], "coefficient": ["2"], "layers": "9", "method": "additive"}

    response = client.post(page(conversation) + "send/", {**form, "temperature": "0", "max_tokens": "8"})

    assert response.status_code == 422 and "out of range" in response.text
    assert not SteeringRun.objects.exists()


def test_regenerate_redoes_the_last_turn_with_another_seed(client, owner, conversation, turn, replies):
    first = turn(1, seed=5)
    client.force_login(owner)

    assert client.post(page(conversation) + "regenerate/").status_code == 302

    current = conversation.turns()
    assert len(current) == 1 and current[0].pk != first.pk and current[0].seed != 5
    assert current[0].prompt == "message 1"


def test_a_member_reads_it_read_only_and_continues_from_a_turn(client, owner, teammate, conversation, turn):
    for number in (1, 2, 3):
        turn(number)
    client.force_login(teammate)

    html = client.get(page(conversation)).text
    assert 'id="message-form"' not in html and 'id="toggle-private"' not in html
    assert html.count("continue-from") == 3
    assert client.post(page(conversation) + "send/", {"content": "hi"}).status_code == 403

    response = client.post(page(conversation) + "continue/", {"turn": "2"})

    copy = Conversation.objects.get(owner=teammate)
    assert response.status_code == 302 and response["Location"] == page(copy)
    assert [run.prompt for run in copy.turns()] == ["message 1", "message 2"]
    assert 'id="message-form"' in client.get(page(copy)).text


def test_the_owner_makes_it_private_and_deletes_it(client, owner, teammate, conversation, turn):
    run = turn(1)
    client.force_login(owner)

    client.post(page(conversation) + "visibility/", {"private": "1"})

    assert Conversation.objects.get().private and SteeringRun.objects.get().private
    client.force_login(teammate)
    assert client.get(page(conversation)).status_code == 404
    assert client.get(f"/steering/runs/{run.pk}/").status_code == 404
    assert client.post(page(conversation) + "delete/").status_code == 404
    client.force_login(owner)
    response = client.post(page(conversation) + "delete/")
    assert response.status_code == 302 and response["Location"] == "/steering/conversations/"
    assert not Conversation.objects.exists() and not SteeringRun.objects.exists()


def test_the_list_shows_the_members_and_the_labs_conversations(
    client, owner, teammate, conversation, turn, training
):
    turn(1)
    Conversation.objects.create(owner=teammate, training=training, private=True)
    shared = Conversation.objects.create(owner=teammate, training=training)
    client.force_login(owner)

    response = client.get("/steering/conversations/")

    assert {item.pk for item in response.context["page"].object_list} == {conversation.pk, shared.pk}
    assert 'href="/steering/conversations/"' in response.text  # the nav's link


def test_a_turns_run_page_links_back_to_its_conversation(client, owner, conversation, turn):
    run = turn(1)
    client.force_login(owner)

    html = client.get(f"/steering/runs/{run.pk}/").text

    assert f'href="/steering/conversations/{conversation.pk}/"' in html and "Turn 1 of" in html


def test_admin_reads_a_conversation_and_its_turns_and_deletes_it(client, staff, conversation, turn):
    turn(1)
    client.force_login(staff)
    url = f"/admin/steering_app/conversation/{conversation.pk}/change/"

    html = client.get(url).text
    assert "message 1" in html and "You are a sailor." in html
    assert client.get("/admin/steering_app/conversation/add/").status_code == 403
    assert client.post(url, {"system_prompt": "changed"}).status_code == 403

    response = client.post(f"/admin/steering_app/conversation/{conversation.pk}/delete/", {"post": "yes"})

    assert response.status_code == 302 and not Conversation.objects.exists()


def test_loading_a_preset_sets_the_chat_system_prompt(client, owner, training, tmp_path, make_preset):
    chat_training(training, tmp_path)
    preset = make_preset(system_prompt="Talk like a pirate.")
    client.force_login(owner)

    html = client.get("/steering/", {"preset": preset.pk}).text

    assert ">Talk like a pirate.</textarea>" in html
    assert SteeringPreset.objects.get().system_prompt == "Talk like a pirate."


def test_a_message_or_a_delete_during_a_turn_shows_why_and_changes_nothing(client, owner, conversation, turn):
    turn(1, status="running", unsteered_output="", steered_output="")
    client.force_login(owner)
    form = {"content": "hi", "feature_id": ["3"], "coefficient": ["2"], "layers": "2", "method": "additive"}

    response = client.post(page(conversation) + "send/", {**form, "temperature": "0", "max_tokens": "8"})

    assert response.status_code == 422 and "Turn 1 of conversation" in response.text
    deleted = client.post(page(conversation) + "delete/")
    assert deleted.status_code == 409 and "stop it before deleting" in deleted.text
    assert SteeringRun.objects.count() == 1 and Conversation.objects.exists()
