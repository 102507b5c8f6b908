import asyncio
import time

import pytest
import torch
from asgiref.sync import async_to_sync
from django.test import AsyncClient, Client
from django.utils import timezone

from steering_app.errors import InvalidInput
from steering_app.model_files import DEMO_MODEL
from steering_app.models import Feature, LanguageModel, SteeringRun, Training
from steering_app.runs import OOM_MESSAGE
from tests.api.conftest import FAKE_METRICS
from tests.api.support import assert_error
from tests.fake_engine import use_engine

URL = "/api/steering/generate"


def post(client, body, headers, query=""):
    return client.post(URL + query, body, content_type="application/json", headers=headers)


def test_it_runs_the_comparison_and_answers_both_outputs_with_metrics(
    client, owner, bearer, generate_body, fake_engine
):
    response = post(client, generate_body, bearer(owner))

    assert response.status_code == 200, response.content
    body = response.json()
    run = SteeringRun.objects.get()
    assert body == {
        "run_id": run.pk,
        "unsteered_output": "clean: The weather today is",
        "steered_output": "steered: The weather today is",
        "seed": 7,
        "metrics": FAKE_METRICS,
        "variants": [
            {
                "multiplier": 1.0,
                "steered_output": "steered: The weather today is",
                "metrics": FAKE_METRICS,
                "scores": None,  # this stand-in engine scores nothing
                "tokens": None,
            }
        ],
    }
    assert run.owner == owner and run.status == "completed"
    assert run.features == [{"feature_id": 3, "coefficient": 2.0}]
    assert run.max_tokens == 8 and run.temperature == 0.0 and run.method == "additive" and not run.chat


def test_it_draws_a_seed_when_none_is_given_and_returns_it(client, owner, bearer, generate_body, fake_engine):
    del generate_body["seed"]

    body = post(client, generate_body, bearer(owner)).json()

    assert body["seed"] == SteeringRun.objects.get().seed


def test_it_stores_layers_sorted_and_passes_method_and_chat(
    client, owner, bearer, generate_body, fake_engine
):
    generate_body.update(intervention_layers=[3, 0, 2], chat=True)

    assert post(client, generate_body, bearer(owner)).status_code == 200

    run = SteeringRun.objects.get()
    assert run.intervention_layers == [0, 2, 3] and run.chat


def test_it_stores_a_shared_run_by_default_and_a_private_one_when_asked(
    client, owner, teammate, bearer, generate_body, fake_engine
):
    shared = post(client, generate_body, bearer(owner)).json()["run_id"]
    private = post(client, {**generate_body, "private": True}, bearer(owner)).json()["run_id"]

    assert SteeringRun.objects.get(pk=shared).private is False
    assert SteeringRun.objects.get(pk=private).private is True
    reader = bearer(teammate)
    assert client.get(f"/api/steering/runs/{shared}", headers=reader).status_code == 200
    assert client.get(f"/api/steering/runs/{private}", headers=reader).status_code == 404


def test_it_answers_202_with_the_run_id_at_once_when_async(client, owner, bearer, generate_body, monkeypatch):
    submitted = []
    monkeypatch.setattr("steering_app.wake.submit", submitted.append)

    response = post(client, generate_body, bearer(owner), "?async=true")

    assert response.status_code == 202
    run = SteeringRun.objects.get()
    assert response.json() == {"run_id": run.pk}
    assert submitted == [run.pk] and run.status == "queued"


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"intervention_layers": []}, "intervention_layers"),
        ({"intervention_layers": list(range(21))}, "intervention_layers"),
        ({"intervention_layers": [4]}, "intervention_layers"),  # the model has layers 0..3
        ({"intervention_layers": [-1]}, "intervention_layers.0"),
        ({"features": []}, "features"),
        ({"features": [{"feature_id": 99, "coefficient": 1.0}]}, "features"),  # not in the training
        (
            {"features": [{"feature_id": 3, "coefficient": 1.0}, {"feature_id": 3, "coefficient": 2.0}]},
            "features",
        ),
        ({"features": [{"feature_id": 3, "coefficient": 101}]}, "features"),  # the training's limit: 100
        ({"features": [{"feature_id": 3, "coefficient": 10_001}]}, "features.0.coefficient"),  # the schema's
        ({"features": [{"feature_id": 3}]}, "features.0.coefficient"),
        ({"temperature": 2.5}, "temperature"),
        ({"temperature": "hot"}, "temperature"),  # a type error: ninja's 422, the API's 400
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 100_000}, "max_tokens"),
        ({"seed": -1}, "seed"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": "   "}, "prompt"),
        ({"prompt": "a\x00b"}, "prompt"),
        ({"method": "replace"}, "method"),
        (
            {"method": "multiplicative", "intervention_layers": [1]},
            "intervention_layers",
        ),  # SAE is at layer 2
        ({"model_id": 999}, "model_id"),
        ({"training_id": "one"}, "training_id"),
        ({"model_id": None}, "model_id"),
        ({"private": 1}, "private"),
        ({"private": "yes"}, "private"),
    ],
)
def test_it_refuses_invalid_input_as_400_naming_the_field(
    client, owner, bearer, generate_body, changes, field
):
    generate_body.update(changes)

    assert_error(post(client, generate_body, bearer(owner)), 400, field)

    assert not SteeringRun.objects.exists()


def test_it_refuses_a_missing_field_as_400(client, owner, bearer, generate_body):
    del generate_body["training_id"]

    body = assert_error(post(client, generate_body, bearer(owner)), 400, "training_id")

    assert "required" in body["detail"].lower()


def test_it_refuses_a_body_that_is_not_json_as_400(client, owner, bearer, training):
    response = client.post(URL, "{not json", content_type="application/json", headers=bearer(owner))

    assert_error(response, 400)


def test_it_refuses_an_empty_body_as_400_listing_the_required_fields(client, owner, bearer, training):
    body = assert_error(
        client.post(URL, content_type="application/json", headers=bearer(owner)), 400, "training_id"
    )

    assert "prompt: Field required" in body["detail"]


def test_it_answers_404_for_an_unknown_training(client, owner, bearer, generate_body):
    generate_body["training_id"] += 1

    assert_error(post(client, generate_body, bearer(owner)), 404, "training_id")


def test_it_answers_409_for_a_training_that_is_not_completed(client, owner, bearer, generate_body, training):
    Training.objects.filter(pk=training.pk).update(status=Training.Status.RUNNING)

    assert_error(post(client, generate_body, bearer(owner)), 409, "training_id")
    assert not SteeringRun.objects.exists()


def test_it_answers_503_and_cancels_the_run_when_no_worker_takes_it(
    client, owner, bearer, generate_body, monkeypatch, settings
):
    # The channel worker mode with nobody listening on the channel: the run stays queued.
    settings.STEERLAB_WORKER_MODE = "channel"
    settings.STEERLAB_RUN_TIMEOUT = 0.3

    body = assert_error(post(client, generate_body, bearer(owner)), 503)

    run = SteeringRun.objects.get()
    assert "not picked up" in body["detail"]
    assert run.status == "cancelled" and "timed out" in run.error and run.finished_at is not None


def test_it_answers_503_when_the_run_cannot_be_handed_to_a_worker(
    client, owner, bearer, generate_body, monkeypatch
):
    def broken_submit(run_id):
        raise ConnectionError("redis is down")

    monkeypatch.setattr("steering_app.wake.submit", broken_submit)

    body = assert_error(post(client, generate_body, bearer(owner)), 503)

    assert "redis" not in body["detail"]
    assert SteeringRun.objects.get().status == "failed"


@pytest.mark.parametrize("error", [MemoryError(), torch.OutOfMemoryError("CUDA out of memory")])
def test_it_answers_507_with_advice_when_generation_runs_out_of_memory(
    client, owner, bearer, generate_body, failing_engine, error
):
    failing_engine(error)

    body = assert_error(post(client, generate_body, bearer(owner)), 507)

    assert body["detail"] == OOM_MESSAGE
    assert SteeringRun.objects.get().error == OOM_MESSAGE


def test_it_answers_500_with_the_reason_but_no_traceback_when_the_engine_fails(
    client, owner, bearer, generate_body, failing_engine
):
    failing_engine(FileNotFoundError("no SAE checkpoint at /data/sae"))

    body = assert_error(post(client, generate_body, bearer(owner)), 500)

    assert "FileNotFoundError: no SAE checkpoint" in body["detail"]
    assert SteeringRun.objects.get().status == "failed"


def test_it_answers_429_with_retry_after_beyond_the_members_queue_share_and_creates_nothing(
    client, owner, teammate, bearer, generate_body, monkeypatch, settings
):
    settings.STEERLAB_MAX_QUEUED_PER_MEMBER = 2
    monkeypatch.setattr("steering_app.wake.submit", lambda run_id: None)  # a busy worker: runs stay queued
    for _ in range(2):
        assert post(client, generate_body, bearer(owner), "?async=true").status_code == 202

    response = post(client, generate_body, bearer(owner), "?async=true")

    body = assert_error(response, 429, "runs")
    assert int(response["Retry-After"]) > 0 and "2 runs waiting" in body["detail"]
    assert SteeringRun.objects.filter(owner=owner).count() == 2
    assert post(client, generate_body, bearer(teammate), "?async=true").status_code == 202


@pytest.mark.parametrize(("slot_tokens", "allowed"), [(None, 509), (64, 61)])
def test_it_refuses_max_tokens_beyond_the_slots_for_the_prompt_before_any_run_exists(
    client, owner, bearer, generate_body, fake_engine, settings, slot_tokens, allowed
):
    settings.STEERLAB_SLOT_TOKENS = slot_tokens  # None: the CPU's 512-token slots
    body = {**generate_body, "max_tokens": allowed + 1}  # the fake model's 4-word prompt is 4 tokens

    detail = assert_error(post(client, body, bearer(owner)), 400, "max_tokens")["detail"]

    assert detail.startswith(f"max_tokens can be at most {allowed} for this 4-token prompt")
    assert not SteeringRun.objects.exists()
    assert post(client, {**body, "max_tokens": allowed}, bearer(owner)).status_code == 200


def test_it_answers_400_naming_the_field_when_the_worker_refuses_the_request(
    client, owner, bearer, generate_body, failing_engine
):
    failing_engine(
        InvalidInput("max_new_tokens: 30 prompt tokens + 8 new tokens exceed the slots", "max_tokens")
    )

    body = assert_error(post(client, generate_body, bearer(owner)), 400, "max_tokens")

    assert "exceed the slots" in body["detail"]
    assert SteeringRun.objects.get().error_field == "max_tokens"


def test_it_answers_409_never_500_when_a_cancel_stops_the_prompt_read(
    client, owner, bearer, generate_body, monkeypatch, settings
):
    from steering_app import runs
    from steering_app.engine import Stopped

    settings.STEERLAB_WORKER_MODE = "inline"

    def cancelled_while_reading_the_prompt(run, on_step, should_stop):
        runs.cancel(run.pk, "cancelled by owner")
        raise Stopped("generation stopped: the run was cancelled")

    use_engine(monkeypatch, cancelled_while_reading_the_prompt)

    body = assert_error(post(client, generate_body, bearer(owner)), 409)

    assert "cancelled by owner" in body["detail"]
    run = SteeringRun.objects.get()
    assert (run.status, run.error) == ("cancelled", "cancelled by owner")


def test_it_answers_anonymous_requests_with_401(client, generate_body):
    assert_error(post(client, generate_body, {}), 401)
    assert not SteeringRun.objects.exists()


def test_it_answers_a_revoked_token_with_401(client, owner, generate_body, fake_engine):
    from steering_app.models import ApiToken

    token, raw = ApiToken.issue(owner)
    token.revoked_at = token.created_at
    token.save()

    body = assert_error(post(client, generate_body, {"Authorization": f"Bearer {raw}"}), 401)

    assert "revoked" in body["detail"]


def test_it_does_not_fall_back_to_the_session_when_a_bad_token_is_sent(
    client, owner, generate_body, fake_engine
):
    client.force_login(owner)

    assert_error(post(client, generate_body, {"Authorization": "Bearer stl_wrong"}), 401)


def test_it_accepts_a_session_with_its_csrf_token(owner, generate_body, fake_engine):
    client = Client(enforce_csrf_checks=True)
    client.force_login(owner)
    client.get("/login/")  # sets the csrftoken cookie, as any page of the app does

    response = post(client, generate_body, {"X-CSRFToken": client.cookies["csrftoken"].value})

    assert response.status_code == 200


def test_it_refuses_a_session_without_the_csrf_token_with_403(owner, generate_body, fake_engine):
    client = Client(enforce_csrf_checks=True)
    client.force_login(owner)

    assert_error(post(client, generate_body, {}), 403)
    assert not SteeringRun.objects.exists()


def test_it_keeps_serving_other_requests_while_it_waits_for_the_worker(
    owner, bearer, generate_body, monkeypatch, settings
):
    # Under ASGI Django runs every sync view on one thread: a generate that blocked it would stall this listing.
    settings.STEERLAB_WORKER_MODE = "channel"
    settings.STEERLAB_RUN_TIMEOUT = 2
    headers = bearer(owner)
    client = AsyncClient()

    async def generate_and_list_meanwhile():
        generate = asyncio.create_task(
            client.post(URL, generate_body, content_type="application/json", headers=headers)
        )
        await asyncio.sleep(0.3)
        started = time.monotonic()
        listing = await client.get("/api/trainings/completed", headers=headers)
        elapsed = time.monotonic() - started
        assert not generate.done()
        return listing, elapsed, await generate

    listing, elapsed, generated = async_to_sync(generate_and_list_meanwhile)()

    assert listing.status_code == 200 and elapsed < 0.5
    assert generated.status_code == 503


# One generate through the whole stack on the real SmolLM2: API -> service -> inline worker -> engine.
SAE_LAYER = 10
D_SAE = 64


@pytest.fixture
def smollm2_training(db, tmp_path):
    """SmolLM2 with a random 64-feature SAE at layer 10, in the SAELens layout."""
    from steering_app.engine import loader
    from steering_app.engine.saes.sae import save_sae

    lm = loader.load_model(DEMO_MODEL)  # cached in the data dir after the first load
    hidden = lm.model.config.hidden_size
    generator = torch.Generator().manual_seed(0)
    checkpoint = save_sae(
        tmp_path / "sae",
        W_enc=torch.randn(hidden, D_SAE, generator=generator) / hidden**0.5,
        W_dec=torch.randn(D_SAE, hidden, generator=generator) / hidden**0.5,
        b_enc=torch.zeros(D_SAE),
        b_dec=torch.zeros(hidden),
        cfg={
            "metadata": {
                "model_name": "SmolLM2-135M-Instruct",
                "hook_name": f"blocks.{SAE_LAYER}.hook_resid_post",
            }
        },
    )
    model = LanguageModel.objects.create(
        name="SmolLM2-135M-Instruct",
        source=DEMO_MODEL,
        architecture="LlamaForCausalLM",
        num_layers=lm.model.config.num_hidden_layers,
        hidden_size=hidden,
    )
    training = Training.objects.create(
        model=model,
        encoder_type=Training.EncoderType.STANDARD,
        hook_layer=SAE_LAYER,
        hook_name=f"blocks.{SAE_LAYER}.hook_resid_post",
        d_in=hidden,
        d_sae=D_SAE,
        checkpoint_path=str(checkpoint),
        status=Training.Status.COMPLETED,
        completed_at=timezone.now(),
    )
    Feature.objects.bulk_create(Feature(training=training, index=i, max_activation=5.0) for i in range(D_SAE))
    return training


@pytest.mark.slow
def test_it_gives_identical_outputs_and_zero_kl_at_coefficient_zero_on_the_real_model(
    client, owner, bearer, smollm2_training, settings
):
    settings.STEERLAB_WORKER_MODE = "inline"
    body = {
        "training_id": smollm2_training.pk,
        "model_id": smollm2_training.model_id,
        "prompt": "The weather today is",
        "features": [{"feature_id": 3, "coefficient": 0.0}, {"feature_id": 17, "coefficient": 0.0}],
        "intervention_layers": [4, SAE_LAYER, 20],
        "temperature": 0.8,  # sampled, not greedy: the coupled draw must keep the two rows together
        "max_tokens": 16,
        "seed": 1234,
    }

    response = client.post(
        "/api/steering/generate", body, content_type="application/json", headers=bearer(owner)
    )

    assert response.status_code == 200, response.content
    result = response.json()
    assert result["unsteered_output"] and result["unsteered_output"] == result["steered_output"]
    assert result["metrics"]["kl_divergence"] == 0.0
    assert result["metrics"]["word_overlap"] == 1.0
    assert result["seed"] == 1234
    assert SteeringRun.objects.get(pk=result["run_id"]).status == "completed"


@pytest.mark.slow
def test_it_refuses_max_tokens_beyond_the_slots_for_this_prompt_as_400_and_creates_no_run(
    client, owner, bearer, smollm2_training
):
    body = {
        "training_id": smollm2_training.pk,
        "model_id": smollm2_training.model_id,
        "prompt": "The weather today is",
        "features": [{"feature_id": 3, "coefficient": 1.0}],
        "intervention_layers": [SAE_LAYER],
        "max_tokens": 512,  # the documented cap, but the CPU's 512-token slots hold the prompt too
    }

    response = client.post(
        "/api/steering/generate", body, content_type="application/json", headers=bearer(owner)
    )

    detail = assert_error(response, 400, "max_tokens")["detail"]
    assert "max_tokens can be at most" in detail and "512" in detail
    assert not SteeringRun.objects.exists()


@pytest.mark.parametrize(
    ("sweep", "why"),
    [
        (
            [0.5, 1, 1.5, 2, 2.5, 3, 4, 8],
            "1 to 7",
        ),  # more variants than the batch's 8 rows leave beside the clean one
        ([1, 1000], "beyond ±100"),  # 2 × 1000 past the training's limit
        ([1, 10_001], "within ±10000"),  # the panel's form refuses the same multiplier
        ([], None),  # the schema wants at least one multiplier
    ],
)
def test_it_refuses_a_sweep_the_worker_cannot_run_naming_the_field(
    client, owner, bearer, generate_body, fake_engine, sweep, why
):
    generate_body["sweep"] = sweep

    body = assert_error(post(client, generate_body, bearer(owner)), 400, "sweep")

    assert why is None or why in body["detail"]
    assert not SteeringRun.objects.exists()


def test_it_stores_a_sweep_with_the_run(client, owner, bearer, generate_body, fake_engine):
    generate_body["sweep"] = [0.5, 4]

    response = post(client, generate_body, bearer(owner))

    assert response.status_code == 200, response.content
    run = SteeringRun.objects.get()
    assert run.sweep == [0.5, 4.0]
    detail = client.get(f"/api/steering/runs/{run.pk}", headers=bearer(owner)).json()
    assert detail["settings"]["sweep"] == [0.5, 4.0]


def test_each_variant_answers_its_scores_and_tokens(client, owner, bearer, generate_body, monkeypatch):
    from tests.fake_engine import fake_scores, sweep_outcome

    use_engine(monkeypatch, sweep_outcome)
    generate_body["sweep"] = [0.5, 4]

    body = post(client, generate_body, bearer(owner)).json()

    assert [variant["scores"]["score"] for variant in body["variants"]] == [
        pytest.approx(fake_scores(0.5)["score"]),
        pytest.approx(fake_scores(4)["score"]),
    ]
    assert (
        body["variants"][1]["scores"]["concept"] == pytest.approx(0.9) and body["variants"][1]["tokens"] == 4
    )
