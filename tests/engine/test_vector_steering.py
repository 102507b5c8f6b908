"""The shipped planet vector steers the real SmolLM2 toward planets, and c = 0 changes nothing.

The demo vector space (steering_app/demo/vectors: DiffMean over the shipped planet and cake pairs, every token,
made by make_vector; tests/steering/test_demo_vector_space.py checks it against a fresh make) steers at layer 10
with c = 1 over five seeds of the demo's chat prompt. The demo SAE's planet feature #1681, read by the clean
model on each text, rises on the steered text: an independent reader, which the vector was never fit to.
"""

import pytest
import torch

from steering_app.engine.demo import DEMO_CHECKPOINT, DEMO_LAYER, DEMO_VECTOR_SPACE
from steering_app.engine.layers import block_output
from steering_app.engine.saes.sae import load_sae
from steering_app.engine.serving.generate import Generation, prepare
from steering_app.engine.serving.scheduler import scheduler_for
from steering_app.engine.steer import SteeringSpec

pytestmark = pytest.mark.slow

PLANET_FEATURE = 1681
PROMPT = "Tell me about your day."
SEEDS = range(5)
MAX_TOKENS = 24
LAYER = 10


def generate_together(lm, space, requests: dict[int, list[SteeringSpec]]) -> dict:
    """{seed: Comparison}: the seeds' generations share the model's batch as a worker's runs do (each row's
    numbers are those it gets alone), admitted as rows free up."""
    waiting = {
        seed: prepare(lm, space, PROMPT, specs, 0.8, MAX_TOKENS, seed, chat=True, sae_layer=space.hook_layer)
        for seed, specs in requests.items()
    }
    done = {}
    with lm.lock:
        scheduler = scheduler_for(lm)
        while waiting or scheduler.active:
            for seed in list(waiting):
                if scheduler.admit(Generation(lm, space, waiting[seed], None, None)):
                    del waiting[seed]
            for ended in scheduler.step():
                assert ended.error is None, ended.error
                done[ended.generation.request.seed] = ended.comparison
    return done


def planet_reading(lm, sae, prompt_ids: list[int], ids: list[int]) -> float:
    """The clean model's mean #1681 activation over the continuation's tokens (0 for an empty one)."""
    if not ids:
        return 0.0
    with lm.lock:
        hidden = block_output(lm.model, torch.tensor([prompt_ids + ids], device=lm.device), DEMO_LAYER)
    return float(sae.encode_features(hidden[0, len(prompt_ids) :].float(), [PLANET_FEATURE]).mean())


def test_it_raises_the_planet_feature_at_c_1_and_changes_no_bit_at_c_0(smollm2):
    space = load_sae(DEMO_VECTOR_SPACE, dtype=smollm2.dtype)
    sae = load_sae(DEMO_CHECKPOINT, dtype=torch.float32)
    planet = [entry["name"] for entry in space.cfg["concepts"]].index("planet")
    steer = SteeringSpec("additive", ((planet, 1.0),), (LAYER,))
    unchanged = SteeringSpec("additive", ((planet, 0.0),), (LAYER,))
    comparisons = generate_together(
        smollm2, space, {seed: [steer] + ([unchanged] if seed == 0 else []) for seed in SEEDS}
    )

    zero = comparisons[0].variants[1]
    assert zero.ids == comparisons[0].unsteered_ids and zero.text == comparisons[0].unsteered_text
    assert torch.equal(zero.logits, comparisons[0].clean_logits)

    readings = [
        (
            planet_reading(smollm2, sae, comparison.prompt_ids, comparison.unsteered_ids),
            planet_reading(smollm2, sae, comparison.prompt_ids, comparison.steered.ids),
        )
        for comparison in (comparisons[seed] for seed in SEEDS)
    ]
    unsteered, steered = (sum(side) / len(readings) for side in zip(*readings, strict=True))
    assert steered > unsteered + 0.1, readings
    assert sum(after > before for before, after in readings) >= 3, readings
