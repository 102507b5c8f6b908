"""POST /steering/generate/: the panel's Generate Comparison."""

import re

import pytest
from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.test import Client

from steering_app import services, streaming, wake
from steering_app.models import SteeringRun, Training
from tests.fake_engine import use_engine

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("in_memory_channel_layer")]

GENERATE = "/steering/generate/"
HTMX = {"HTTP_HX_REQUEST": "true"}


@pytest.fixture
def submitted(monkeypatch):
    """Run ids handed to the worker; nothing executes."""
    ids = []
    monkeypatch.setattr(wake, "submit", ids.append)
    return ids


def form_data(training_obj, **changes) -> dict:
    data = {
        "training": training_obj.pk,
        "prompt": "The weather today is",
        "method": "additive",
        "temperature": "0.5",
        "max_tokens": "12",
        "seed": "99",
        "layers": ["1", "2"],
        "feature_id": ["3", "7"],
        "coefficient": ["2", "-1.5"],
    }
    data.update(changes)
    return {key: value for key, value in data.items() if value is not None}


def error_items(response) -> list[str]:
    return [re.sub(r"<[^>]+>", "", item) for item in re.findall(r"<li>(.*?)</li>", response.text)]


def test_it_requires_login(client, training, submitted):
    response = client.post(GENERATE, form_data(training), **HTMX)
    assert response.status_code == 302 and response["Location"].startswith("/login/")
    assert SteeringRun.objects.count() == 0 and submitted == []


def test_it_only_accepts_post(client, owner, training):
    client.force_login(owner)
    assert client.get(GENERATE).status_code == 405


def test_it_requires_the_csrf_token(owner, training, submitted):
    client = Client(enforce_csrf_checks=True)
    client.force_login(owner)
    assert client.post(GENERATE, form_data(training), **HTMX).status_code == 403
    assert SteeringRun.objects.count() == 0


def test_it_creates_a_queued_run_and_hands_it_to_the_worker(client, owner, training, submitted):
    client.force_login(owner)

    response = client.post(GENERATE, form_data(training, chat="1"), **HTMX)

    assert response.status_code == 200
    run = SteeringRun.objects.get()
    assert submitted == [run.pk]
    assert (run.owner, run.training, run.status) == (owner, training, SteeringRun.Status.QUEUED)
    assert run.features == [{"feature_id": 3, "coefficient": 2.0}, {"feature_id": 7, "coefficient": -1.5}]
    assert (run.intervention_layers, run.method, run.temperature, run.max_tokens, run.seed, run.chat) == (
        [1, 2],
        "additive",
        0.5,
        12,
        99,
        True,
    )
    assert f'ws-connect="/ws/steering/runs/{run.pk}/?stream=' in response.text
    assert 'id="unsteered-output"' in response.text and 'id="steered-output"' in response.text
    assert "Seed 99" in response.text


def test_a_run_is_shared_unless_the_private_box_is_ticked(client, owner, training, submitted):
    client.force_login(owner)

    client.post(GENERATE, form_data(training), **HTMX)
    client.post(GENERATE, form_data(training, private="1"), **HTMX)

    assert list(SteeringRun.objects.order_by("id").values_list("private", flat=True)) == [False, True]


def test_a_blank_seed_draws_one_that_is_shown(client, owner, training, submitted):
    client.force_login(owner)
    response = client.post(GENERATE, form_data(training, seed=""), **HTMX)
    run = SteeringRun.objects.get()
    assert response.status_code == 200 and f"Seed {run.seed}" in response.text


def test_the_stream_token_names_a_mailbox_subscribed_before_the_worker_starts(
    client, owner, training, monkeypatch
):
    layer = get_channel_layer()
    seen = {}

    def submit(run_id):  # what the worker would see at the moment it gets the run
        seen["members"] = set(layer.groups.get(streaming.group_name(run_id), {}))

    monkeypatch.setattr(wake, "submit", submit)
    client.force_login(owner)

    response = client.post(GENERATE, form_data(training), **HTMX)

    run = SteeringRun.objects.get()
    token = re.search(r'\?stream=([^"]+)"', response.text).group(1)
    mailbox = streaming.read_stream_token(token, run.pk)
    assert mailbox and seen["members"] == {mailbox}
    assert streaming.read_stream_token(token, run.pk + 1) is None
    assert streaming.read_stream_token(token + "x", run.pk) is None


def test_the_mailbox_keeps_every_event_of_a_run_that_ran_before_the_page_connected(
    client, owner, training, monkeypatch, settings
):
    settings.STEERLAB_WORKER_MODE = "inline"

    def execute(run, on_step, should_stop=None):
        for unsteered, steered in [("It", "It"), (" rains", " pours")]:
            on_step(unsteered, steered)
        return services.Outcome("It rains", "It pours", {"kl_divergence": 0.1}, {})

    use_engine(monkeypatch, execute)
    client.force_login(owner)

    response = client.post(GENERATE, form_data(training), **HTMX)

    run = SteeringRun.objects.get()
    assert run.status == SteeringRun.Status.COMPLETED
    mailbox = streaming.read_stream_token(re.search(r'\?stream=([^"]+)"', response.text).group(1), run.pk)
    receive = async_to_sync(get_channel_layer().receive)
    events = [receive(mailbox) for _ in range(4)]
    assert [e["event"] for e in events] == ["started", "delta", "delta", "completed"]
    assert [e.get("steered") for e in events[1:3]] == ["It", " pours"]


def test_without_htmx_it_redirects_to_the_run(client, owner, training, submitted):
    client.force_login(owner)
    response = client.post(GENERATE, form_data(training))
    run = SteeringRun.objects.get()
    assert response.status_code == 302 and response["Location"] == f"/steering/runs/{run.pk}/"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"prompt": "   "}, "Prompt: Enter a prompt."),
        ({"feature_id": None, "coefficient": None}, "Selected Features: Add at least one feature."),
        (
            {"feature_id": ["40"], "coefficient": ["1"]},
            "Selected Features: Features [40] do not belong to training",
        ),
        (
            {"feature_id": ["3"], "coefficient": ["lots"]},
            "Selected Features: Feature ids must be whole numbers",
        ),
        (
            {"feature_id": ["3", "7"], "coefficient": ["1"]},
            "Selected Features: Each feature needs exactly one",
        ),
        ({"coefficient": ["2", "500"]}, "Selected Features: Coefficient of feature 7 must be finite"),
        (  # the API's limit on a multiplier, whatever the coefficients
            {"coefficient": ["0", "0"], "sweep": "1,1e308"},
            "Sweep strength: Each sweep multiplier must be a finite number within ±10000.",
        ),
        ({"sweep": "0.5,nan"}, "Sweep strength: Each sweep multiplier must be a finite number"),
        ({"layers": None}, "Intervention Layers: Select at least one intervention layer."),
        ({"layers": ["9"]}, "Intervention Layers: Layer 9 is out of range"),
        (
            {"method": "multiplicative", "layers": ["1"]},
            "Intervention Layers: Multiplicative steering acts only at",
        ),
        ({"method": "sideways"}, "Method: Select a valid choice."),
        ({"temperature": "3"}, "Temperature: temperature must be between 0 and 2."),
        ({"temperature": "warm"}, "Temperature: Enter a number."),
        ({"max_tokens": "100000"}, "Max Tokens: max_tokens must be between 1 and"),
        ({"max_tokens": "0"}, "Max Tokens: max_tokens must be between 1 and"),
        ({"max_tokens": "512"}, "Max Tokens: max_tokens can be at most 509 for this 4-token prompt"),
        ({"prompt": "word " * 600}, "Prompt: The prompt is 600 tokens"),
        ({"seed": "-4"}, "Seed: seed must be a non-negative 63-bit integer."),
        ({"training": "987654"}, "Training Job: Training 987654 does not exist."),
    ],
)
def test_invalid_input_is_a_form_error_naming_the_field(client, owner, training, submitted, changes, message):
    client.force_login(owner)

    response = client.post(GENERATE, form_data(training, **changes), **HTMX)

    assert response.status_code == 422
    assert response["HX-Retarget"] == "#form-errors"
    assert any(item.startswith(message) for item in error_items(response)), error_items(response)
    assert SteeringRun.objects.count() == 0 and submitted == []


def test_a_training_that_is_not_completed_is_refused(client, owner, training, submitted):
    Training.objects.filter(pk=training.pk).update(status="running")
    client.force_login(owner)
    response = client.post(GENERATE, form_data(training), **HTMX)
    assert response.status_code == 422
    assert any(item.startswith("Training Job: Training") for item in error_items(response))
    assert SteeringRun.objects.count() == 0


def test_the_error_also_fills_the_slot_next_to_the_field(client, owner, training, submitted):
    client.force_login(owner)
    response = client.post(GENERATE, form_data(training, prompt=""), **HTMX)
    assert '<p class="field-error" id="error-prompt" hx-swap-oob="true">Enter a prompt.</p>' in response.text
    assert '<p class="field-error" id="error-layers" hx-swap-oob="true"></p>' in response.text


def test_without_htmx_the_panel_comes_back_with_the_errors_and_the_input(client, owner, training, submitted):
    client.force_login(owner)
    response = client.post(GENERATE, form_data(training, prompt="Hello", layers=["9"]))
    assert response.status_code == 422
    assert "Layer 9 is out of range" in response.text
    state = response.context["state"]
    assert state.prompt == "Hello" and [f.index for f in state.features] == [3, 7]
    assert SteeringRun.objects.count() == 0


def test_max_tokens_beyond_the_slots_comes_back_beside_the_field_with_the_maximum(
    client, owner, training, submitted
):
    client.force_login(owner)

    response = client.post(GENERATE, form_data(training, max_tokens="510"))  # the 4-word prompt leaves 509

    assert response.status_code == 422
    slot = re.search(r'<p class="field-error" id="error-max_tokens">(.*?)</p>', response.text).group(1)
    assert slot.startswith("max_tokens can be at most 509 for this 4-token prompt")
    assert 'id="max-tokens-limit">512<' in response.text  # and the slot's maximum in the hint
    assert SteeringRun.objects.count() == 0 and submitted == []


@pytest.mark.parametrize("htmx", [True, False])
def test_a_failed_submit_fails_the_run_and_the_panel_says_so(client, owner, training, monkeypatch, htmx):
    def broken_transport(run_id):
        raise ConnectionError("redis is down")

    monkeypatch.setattr(wake, "submit", broken_transport)
    client.force_login(owner)

    response = client.post(GENERATE, form_data(training), **(HTMX if htmx else {}))

    run = SteeringRun.objects.get()
    assert response.status_code == 503
    assert "No steering worker is available; try again later." in response.text
    assert (run.status, run.error) == (SteeringRun.Status.FAILED, "no worker available")
    assert run.finished_at is not None
