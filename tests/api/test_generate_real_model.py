"""One generate through the whole stack on the real SmolLM2: API -> service -> inline worker -> engine."""

import pytest
import torch
from django.utils import timezone

from steering_app.models import Feature, LanguageModel, SteeringRun, Training

pytestmark = pytest.mark.slow

SAE_LAYER = 10
D_SAE = 64


@pytest.fixture
def smollm2_training(db, tmp_path):
    from steering_app.engine import loader
    from steering_app.engine.sae import save_sae

    lm = loader.load_model(loader.SMOLLM2_DEMO)  # cached in the data dir after the first load
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
        source=loader.SMOLLM2_DEMO,
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


def test_it_gives_identical_outputs_and_zero_kl_at_coefficient_zero(
    client, owner, bearer, smollm2_training, monkeypatch
):
    monkeypatch.setenv("STEERLAB_WORKER_MODE", "inline")
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
