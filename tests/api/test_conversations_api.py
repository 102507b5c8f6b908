"""/api/conversations: chat mode. Create, send messages (turns), change steering between turns, regenerate, stop,
continue from a turn, and who reads and changes a conversation (the runs' rule)."""

import pytest

from steering_app import conversations, services, wake
from steering_app.conversation_history import row_messages
from steering_app.errors import InvalidInput
from steering_app.models import Conversation, SteeringRun
from tests.api.conftest import FAKE_METRICS
from tests.api.support import assert_error
from tests.fake_engine import use_engine

URL = "/api/conversations"


@pytest.fixture
def chat_body(training):
    return {
        "training_id": training.pk,
        "model_id": training.model_id,
        "system_prompt": "You are a sailor.",
        "history_mode": "separate",
        "features": [{"feature_id": 3, "coefficient": 2.0}],
        "intervention_layers": [2],
        "temperature": 0.0,
        "max_tokens": 8,
    }


@pytest.fixture
def make_conversation(training):
    """make_conversation(user, **fields) -> a stored conversation with no turn yet."""

    def make(user, **fields) -> Conversation:
        values = {
            "owner": user,
            "training": training,
            "features": [{"feature_id": 3, "coefficient": 2.0}],
            "intervention_layers": [2],
            "temperature": 0.0,
            "max_tokens": 8,
            "chat": True,
        }
        return Conversation.objects.create(**{**values, **fields})

    return make


def post(client, path, body, headers, query=""):
    return client.post(f"{URL}{path}{query}", body, content_type="application/json", headers=headers)


def say(client, conversation_id, headers, content, **changes):
    response = post(client, f"/{conversation_id}/messages", {"content": content, **changes}, headers)
    assert response.status_code == 200, response.content
    return response.json()


@pytest.fixture
def chatting(client, owner, bearer, chat_body, fake_engine):
    """chatting(**body changes) -> (conversation id, the owner's headers): a conversation created by the API."""

    def start(**changes):
        headers = bearer(owner)
        response = post(client, "", {**chat_body, **changes}, headers)
        assert response.status_code == 201, response.content
        return response.json()["id"], headers

    return start


def test_it_creates_a_conversation_with_the_settings_of_its_first_turn(
    client, owner, bearer, chat_body, training
):
    response = post(client, "", {**chat_body, "history_mode": "shared", "private": True}, bearer(owner))

    assert response.status_code == 201
    conversation = Conversation.objects.get(pk=response.json()["id"])
    assert (conversation.owner, conversation.training, conversation.private) == (owner, training, True)
    assert (conversation.system_prompt, conversation.history_mode) == ("You are a sailor.", "shared")
    assert conversation.features == [{"feature_id": 3, "coefficient": 2.0}]
    assert (conversation.intervention_layers, conversation.max_tokens, conversation.temperature) == (
        [2],
        8,
        0.0,
    )
    assert not conversation.runs.exists()


def test_it_defaults_to_separate_histories_and_a_conversation_shared_with_the_lab(
    client, owner, bearer, chat_body
):
    del chat_body["history_mode"], chat_body["system_prompt"], chat_body["model_id"]

    conversation = Conversation.objects.get(pk=post(client, "", chat_body, bearer(owner)).json()["id"])

    assert (conversation.history_mode, conversation.system_prompt, conversation.private) == (
        "separate",
        "",
        False,
    )


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"history_mode": "mixed"}, "history_mode"),
        ({"system_prompt": "x" * 20_001}, "system_prompt"),
        ({"system_prompt": "a\x00b"}, "system_prompt"),
        ({"features": []}, "features"),
        ({"features": [{"feature_id": 99, "coefficient": 1.0}]}, "features"),
        ({"features": [{"feature_id": 3, "coefficient": 101}]}, "features"),
        ({"intervention_layers": [4]}, "intervention_layers"),
        ({"method": "multiplicative", "intervention_layers": [1]}, "intervention_layers"),
        ({"temperature": 2.5}, "temperature"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"model_id": 999}, "model_id"),
        ({"private": "yes"}, "private"),
    ],
)
def test_it_refuses_a_bad_field_as_400_naming_it_and_stores_nothing(
    client, owner, bearer, chat_body, changes, field
):
    assert_error(post(client, "", {**chat_body, **changes}, bearer(owner)), 400, field)

    assert not Conversation.objects.exists()


def test_it_refuses_a_model_without_a_chat_template_naming_the_training(
    client, owner, bearer, chat_body, monkeypatch
):
    def no_template(training, prompt, chat):
        raise InvalidInput("The tokenizer has no chat template.", "chat")

    monkeypatch.setattr(services, "prompt_token_count", no_template)

    body = assert_error(post(client, "", chat_body, bearer(owner)), 400, "training_id")

    assert "no chat template" in body["detail"]
    assert not Conversation.objects.exists()


def test_it_answers_each_message_as_the_next_turn_with_both_replies_and_metrics(client, chatting):
    conversation_id, headers = chatting()

    first = say(client, conversation_id, headers, "Hello there")
    second = say(client, conversation_id, headers, "Where is the sea?", seed=5)

    assert first["turn"] == 1 and second["turn"] == 2
    assert second["unsteered_output"] == "clean: Where is the sea?"
    assert second["steered_output"] == "steered: Where is the sea?"
    assert second["metrics"]["kl_divergence"] == FAKE_METRICS["kl_divergence"]
    run = SteeringRun.objects.get(pk=second["run_id"])
    assert (run.conversation_id, run.turn, run.prompt, run.seed, run.chat) == (
        conversation_id,
        2,
        "Where is the sea?",
        5,
        True,
    )


@pytest.mark.parametrize("mode", ["separate", "shared"])
def test_it_gives_each_side_its_history_as_the_history_mode_says(client, chatting, mode, monkeypatch):
    read = {}

    def execute(run, on_step, should_stop=None):
        read[run.turn] = row_messages(run)
        return services.Outcome(f"clean {run.turn}", f"steered {run.turn}", FAKE_METRICS, {})

    use_engine(monkeypatch, execute)
    conversation_id, headers = chatting(history_mode=mode)
    for content in ("one", "two", "three"):
        say(client, conversation_id, headers, content)

    clean, steered = read[3]
    system = {"role": "system", "content": "You are a sailor."}
    assert clean == [
        system,
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "clean 1"},
        {"role": "user", "content": "two"},
        {"role": "assistant", "content": "clean 2"},
        {"role": "user", "content": "three"},
    ]
    replies = [message["content"] for message in steered if message["role"] == "assistant"]
    assert replies == (["steered 1", "steered 2"] if mode == "separate" else ["clean 1", "clean 2"])
    assert [message for message in steered if message["role"] != "assistant"] == [
        message for message in clean if message["role"] != "assistant"
    ]


def test_it_leaves_a_failed_turn_out_of_the_history_and_keeps_a_cancelled_turns_text(
    owner, make_conversation, make_run
):
    conversation = make_conversation(owner, system_prompt="")
    make_run(owner, conversation=conversation, turn=1, prompt="lost", status="failed")
    make_run(
        owner,
        conversation=conversation,
        turn=2,
        prompt="stopped",
        status="cancelled",
        unsteered_output="half",
        steered_output="hal",
    )
    third = make_run(owner, conversation=conversation, turn=3, prompt="go on", status="queued")

    clean, steered = row_messages(third)

    assert [message["content"] for message in clean] == ["stopped", "half", "go on"]
    assert [message["content"] for message in steered] == ["stopped", "hal", "go on"]
    with pytest.raises(ValueError):
        row_messages(make_run(owner))


def test_it_records_the_steering_each_turn_used_when_a_message_changes_it(client, chatting):
    conversation_id, headers = chatting()
    say(client, conversation_id, headers, "one")
    say(
        client,
        conversation_id,
        headers,
        "two",
        features=[{"feature_id": 3, "coefficient": 8.0}],
        max_tokens=4,
    )
    say(client, conversation_id, headers, "three")

    turns = client.get(f"{URL}/{conversation_id}", headers=headers).json()["turns"]

    coefficients = [turn["settings"]["features"][0]["coefficient"] for turn in turns]
    assert coefficients == [2.0, 8.0, 8.0]
    assert [turn["settings"]["max_tokens"] for turn in turns] == [8, 4, 4]
    assert [turn["user"] for turn in turns] == ["one", "two", "three"]
    conversation = Conversation.objects.get(pk=conversation_id)
    assert conversation.features == [{"feature_id": 3, "coefficient": 8.0}]


def test_it_refuses_a_bad_change_naming_the_field_and_changes_nothing(client, chatting):
    conversation_id, headers = chatting()
    body = {"content": "hi", "features": [{"feature_id": 99, "coefficient": 1.0}]}

    assert_error(post(client, f"/{conversation_id}/messages", body, headers), 400, "features")
    assert_error(post(client, f"/{conversation_id}/messages", {"content": "  "}, headers), 400, "content")

    assert not SteeringRun.objects.exists()
    assert Conversation.objects.get(pk=conversation_id).features == [{"feature_id": 3, "coefficient": 2.0}]


def test_it_answers_409_while_a_turn_is_in_progress(client, chatting, monkeypatch):
    conversation_id, headers = chatting()
    monkeypatch.setattr("steering_app.wake.submit", lambda run_id=None: None)  # a busy worker: the turn waits
    accepted = post(client, f"/{conversation_id}/messages", {"content": "one"}, headers, "?async=true")
    assert accepted.status_code == 202 and accepted.json()["turn"] == 1

    assert_error(
        post(client, f"/{conversation_id}/messages", {"content": "two"}, headers), 409, "conversation_id"
    )
    assert_error(post(client, f"/{conversation_id}/regenerate", {}, headers), 409, "conversation_id")

    assert SteeringRun.objects.count() == 1


def test_it_refuses_a_history_beyond_the_slots_as_400_naming_content(client, chatting, settings):
    settings.STEERLAB_SLOT_TOKENS = 20
    conversation_id, headers = chatting(system_prompt="")  # the fake model counts a word a token
    say(client, conversation_id, headers, "one two three four five")  # 5 + 8 new tokens fit in 20

    response = post(client, f"/{conversation_id}/messages", {"content": "six seven eight nine ten"}, headers)

    detail = assert_error(response, 400, "content")["detail"]
    assert detail.startswith("The conversation's history is 16 tokens; with max_tokens 8 it exceeds")
    assert "Start a new conversation, or continue from an earlier turn." in detail
    assert SteeringRun.objects.count() == 1


def test_it_regenerates_the_last_turn_with_another_seed_as_its_current_run(client, chatting):
    conversation_id, headers = chatting()
    say(client, conversation_id, headers, "one")
    last = say(client, conversation_id, headers, "two", seed=5)

    response = post(client, f"/{conversation_id}/regenerate", {}, headers)

    assert response.status_code == 200 and response.json()["turn"] == 2
    again = SteeringRun.objects.get(pk=response.json()["run_id"])
    assert (again.turn, again.prompt) == (2, "two") and again.seed != 5
    turns = client.get(f"{URL}/{conversation_id}", headers=headers).json()["turns"]
    assert [turn["run_id"] for turn in turns][-1] == again.pk != last["run_id"]
    assert len(turns) == 2
    assert_error(
        post(client, f"/{conversation_id}/regenerate", {}, headers, f"?seed={again.seed}"), 400, "seed"
    )


def test_it_answers_409_to_regenerate_before_any_turn(client, chatting):
    conversation_id, headers = chatting()

    assert_error(post(client, f"/{conversation_id}/regenerate", {}, headers), 409, "conversation_id")


def test_it_stops_the_turn_in_progress_keeping_its_text_and_the_conversation_goes_on(
    client, chatting, monkeypatch
):
    conversation_id, headers = chatting()
    free_worker = wake.submit
    monkeypatch.setattr(wake, "submit", lambda run_id=None: None)  # a busy worker: the turn waits
    post(client, f"/{conversation_id}/messages", {"content": "one"}, headers, "?async=true")

    response = post(client, f"/{conversation_id}/cancel", {}, headers)

    assert response.status_code == 200 and response.json()["turns"][0]["status"] == "cancelled"
    assert_error(post(client, f"/{conversation_id}/cancel", {}, headers), 409, "conversation_id")
    monkeypatch.setattr(wake, "submit", free_worker)
    assert say(client, conversation_id, headers, "two")["turn"] == 2


def test_it_continues_from_a_turn_into_a_conversation_of_the_reader(client, chatting, teammate, bearer):
    conversation_id, headers = chatting()
    for content in ("one", "two", "three"):
        say(client, conversation_id, headers, content, **({"max_tokens": 4} if content == "three" else {}))

    response = post(client, f"/{conversation_id}/continue", {"turn": 2}, bearer(teammate))

    assert response.status_code == 201
    copy = Conversation.objects.get(pk=response.json()["id"])
    assert (copy.owner, copy.system_prompt, copy.history_mode, copy.private) == (
        teammate,
        "You are a sailor.",
        "separate",
        False,
    )
    assert copy.max_tokens == 8  # the settings of turn 2, where it goes on from
    copied = copy.turns()
    assert [(run.turn, run.prompt, run.unsteered_output) for run in copied] == [
        (1, "one", "clean: one"),
        (2, "two", "clean: two"),
    ]
    assert all(run.owner == teammate and not run.private for run in copied)
    assert Conversation.objects.get(pk=conversation_id).runs.count() == 3
    assert_error(post(client, f"/{conversation_id}/continue", {"turn": 4}, bearer(teammate)), 400, "turn")


def test_it_shows_a_conversation_to_members_and_a_private_one_to_its_owner_and_staff_only(
    client, owner, teammate, staff, bearer, make_conversation, make_run
):
    shared = make_conversation(owner)
    make_run(owner, conversation=shared, turn=1, prompt="hi")
    private = make_conversation(owner, private=True)

    body = client.get(f"{URL}/{shared.pk}", headers=bearer(teammate)).json()
    assert body["owner"] == "owner" and body["turns"][0]["user"] == "hi"
    assert body["turns"][0]["settings"]["seed"] == 11
    assert_error(client.get(f"{URL}/{private.pk}", headers=bearer(teammate)), 404, "conversation_id")
    assert client.get(f"{URL}/{private.pk}", headers=bearer(staff)).status_code == 200
    listed = client.get(URL, headers=bearer(teammate)).json()
    assert [item["id"] for item in listed["conversations"]] == [shared.pk] and listed["total"] == 1
    assert client.get(URL, headers=bearer(owner)).json()["total"] == 2


def test_it_lets_only_the_owner_or_staff_send_or_change_and_hides_a_private_one(
    client, owner, teammate, stranger, staff, bearer, make_conversation, fake_engine
):
    conversation = make_conversation(owner)
    path = f"/{conversation.pk}"

    assert_error(
        post(client, f"{path}/messages", {"content": "hi"}, bearer(teammate)), 403, "conversation_id"
    )
    assert_error(post(client, f"{path}/regenerate", {}, bearer(teammate)), 403, "conversation_id")
    patch = client.patch(
        f"{URL}{path}", {"private": True}, content_type="application/json", headers=bearer(teammate)
    )
    assert_error(patch, 403, "conversation_id")
    assert_error(client.delete(f"{URL}{path}", headers=bearer(teammate)), 403, "conversation_id")
    assert not SteeringRun.objects.exists()

    assert post(client, f"{path}/messages", {"content": "hi"}, bearer(staff)).status_code == 200
    patch = client.patch(
        f"{URL}{path}", {"private": True}, content_type="application/json", headers=bearer(owner)
    )
    assert patch.status_code == 200 and patch.json()["private"] is True
    assert SteeringRun.objects.get().private is True  # its turns follow it
    assert_error(
        client.get(f"/api/steering/runs/{SteeringRun.objects.get().pk}", headers=bearer(stranger)),
        404,
        "run_id",
    )
    assert_error(post(client, f"{path}/continue", {"turn": 1}, bearer(stranger)), 404, "conversation_id")

    assert client.delete(f"{URL}{path}", headers=bearer(owner)).status_code == 204
    assert not Conversation.objects.exists() and not SteeringRun.objects.exists()


def test_it_makes_a_new_turn_private_when_the_conversation_is(client, chatting):
    conversation_id, headers = chatting(private=True)

    run_id = say(client, conversation_id, headers, "secret")["run_id"]

    assert SteeringRun.objects.get(pk=run_id).private is True


def test_it_keeps_a_turns_run_following_its_conversation(client, owner, bearer, make_conversation, make_run):
    conversation = make_conversation(owner)
    run = make_run(owner, conversation=conversation, turn=1)
    run_url = f"/api/steering/runs/{run.pk}"

    patch = client.patch(run_url, {"private": True}, content_type="application/json", headers=bearer(owner))

    assert_error(patch, 409, "run_id")
    assert_error(client.delete(run_url, headers=bearer(owner)), 409, "run_id")


def test_it_refuses_to_delete_a_conversation_with_a_turn_in_progress(
    client, owner, bearer, make_conversation, make_run
):
    conversation = make_conversation(owner)
    make_run(owner, conversation=conversation, turn=1, status="running")

    assert_error(client.delete(f"{URL}/{conversation.pk}", headers=bearer(owner)), 409, "conversation_id")

    assert Conversation.objects.exists()


def test_it_changes_settings_through_the_service_only_when_the_turn_is_created(
    owner, make_conversation, monkeypatch
):
    conversation = make_conversation(owner)
    monkeypatch.setattr(services, "history_token_count", lambda training, messages: 10_000)

    with pytest.raises(InvalidInput) as refused:
        conversations.send(conversation, owner, "hi", changes={"max_tokens": 4})

    assert refused.value.field == "content"
    conversation.refresh_from_db()
    assert conversation.max_tokens == 8 and not SteeringRun.objects.exists()
