"""calibrate_features on the tiny random GPT-2 of test_train (a few seconds, no downloads)."""

from __future__ import annotations

import pytest
import torch

from steering_app.engine.analysis.calibrate import calibrate_features
from steering_app.engine.saes.sae import load_sae, save_sae
from steering_app.engine.training import TrainingInterrupted
from tests.engine.test_train import gpt2, sentences, tokenizer  # noqa: F401 (fixtures)

D_SAE = 16


@pytest.fixture
def sae(tmp_path):
    """A topk SAE at block 1 whose latent 0 can never be positive (dead)."""
    generator = torch.Generator().manual_seed(0)
    b_enc = torch.zeros(D_SAE)
    b_enc[0] = -1e6
    save_sae(
        tmp_path,
        torch.randn(32, D_SAE, generator=generator),
        torch.randn(D_SAE, 32, generator=generator),
        b_enc,
        torch.zeros(32),
        {"architecture": "topk", "k": 4, "metadata": {"hook_name": "blocks.1.hook_resid_post"}},
    )
    return load_sae(tmp_path)


def test_it_describes_every_latent_and_reports_its_progress(gpt2, tokenizer, sae):  # noqa: F811
    seen = []

    result = calibrate_features(
        gpt2,
        tokenizer,
        sae,
        sentences(300),
        1,
        tokens=1500,
        batch_size=4,
        progress=False,
        on_progress=seen.append,
    )

    assert result.tokens == 1500 and seen[-1] == 1500 and seen == sorted(seen) and len(seen) > 1
    assert [entry["index"] for entry in result.features] == list(range(D_SAE))
    dead = result.features[0]
    assert (dead["max_activation"], dead["activation_frequency"], dead["examples"]) == (0.0, 0.0, [])
    assert dead["description"] == "Never active on the 1500 calibration tokens (dead)."
    live = [entry for entry in result.features[1:] if entry["activation_frequency"] > 0]
    assert live and all(entry["label"] and entry["top_tokens"] for entry in live)
    assert all(len(entry["examples"]) == 5 and "«" in entry["examples"][0] for entry in live)


def test_a_stop_request_ends_it(gpt2, tokenizer, sae):  # noqa: F811
    with pytest.raises(TrainingInterrupted):
        calibrate_features(
            gpt2, tokenizer, sae, sentences(300), 1, tokens=1500, progress=False, stop=lambda: True
        )
