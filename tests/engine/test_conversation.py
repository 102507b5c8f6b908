"""Conversations on the real SmolLM2: two sides with their own histories, the KV of a turn kept for the next.

Each turn is a coupled comparison whose clean row reads the clean side's history and whose steered row reads its
own (separate mode) or the clean one (shared mode), through the chat template. The rows stay parked in the batch
after a turn (Request.keep), so the next turn reads only what follows the full blocks of its history it shares
with the last one; a turn whose rows were evicted reads everything again and must give the same bits.
"""

import pytest
import torch

from steering_app.engine import Stopped, compare, converse, finish, loader
from steering_app.engine.demo import DEMO_CHECKPOINT, DEMO_LAYER
from steering_app.engine.saes.sae import load_sae
from steering_app.engine.serving.scheduler import scheduler_for
from steering_app.engine.steer import SteeringSpec
from steering_app.engine.tokens import chat_history_text

pytestmark = pytest.mark.slow

PLANET_FEATURE = 1681
PLANET_SCALE = 40.526  # its max activation in the demo's features.json
STRENGTH = 4.0  # the demo's showcase strength (tests/steering/test_demo_steering.py): fluent, on topic
USER_TURNS = ["Tell me about your day.", "What did you have for lunch?", "What will you do tomorrow?"]
MAX_TOKENS = 12
TEMPERATURE = 0.8


@pytest.fixture(scope="module")
def demo_sae(smollm2):
    return load_sae(DEMO_CHECKPOINT, dtype=smollm2.dtype)


@pytest.fixture(scope="module")
def planet_talk(smollm2, demo_sae) -> list:
    """A separate-mode conversation steered toward planets, its rows kept between turns."""
    return talk(smollm2, demo_sae, planet(STRENGTH), "separate", key="kept")


def planet(coefficient: float) -> SteeringSpec:
    """#1681 at the demo's layer, its coefficient in units of its max activation (features.json), as runs steer."""
    return SteeringSpec(
        "additive",
        ((PLANET_FEATURE, coefficient),),
        (DEMO_LAYER,),
        feature_scales={PLANET_FEATURE: PLANET_SCALE},
    )


def talk(lm, sae, spec, mode: str, key=None, seed: int = 3, evict_before: int | None = None) -> list:
    """Three turns; each side's history grows with its own replies (separate) or the clean ones (shared).
    evict_before: the turn (1-based) before which the conversation's kept rows are given back."""
    clean, steered, turns = [], [], []
    for number, user in enumerate(USER_TURNS, start=1):
        clean.append({"role": "user", "content": user})
        steered.append({"role": "user", "content": user})
        if evict_before == number:
            with lm.lock:
                assert scheduler_for(lm).evict(key)
        turn = converse(
            lm, sae, list(clean), list(steered), spec, TEMPERATURE, MAX_TOKENS, seed + number, keep=key
        )
        turns.append(turn)
        clean.append({"role": "assistant", "content": turn.unsteered_text})
        reply = turn.unsteered_text if mode == "shared" else turn.steered.text
        steered.append({"role": "assistant", "content": reply})
    if key is not None:
        with lm.lock:
            scheduler_for(lm).evict(key)
    return turns


@pytest.mark.parametrize("mode", ["separate", "shared"])
def test_at_coefficient_zero_both_sides_are_identical_at_every_turn(smollm2, demo_sae, mode):
    for turn in talk(smollm2, demo_sae, planet(0.0), mode, key=("zero", mode)):
        assert turn.steered.ids == turn.unsteered_ids
        assert torch.equal(turn.steered.logits, turn.clean_logits[: len(turn.steered.logits)])


def test_the_planet_feature_changes_the_steered_side_from_the_first_turn_on(smollm2, demo_sae, planet_talk):
    turns = planet_talk
    assert all(turn.steered.ids != turn.unsteered_ids for turn in turns)
    # From turn 2 on, the steered side reads its own history: a prompt of its own.
    assert turns[0].variant_prompts is None
    assert all(turn.variant_prompts[0] != turn.prompt_ids for turn in turns[1:])
    result = finish(smollm2, demo_sae, turns[2], planet(STRENGTH), loader.get_embedder())
    metrics = result.metrics
    assert metrics["kl_divergence"] > 0
    assert metrics["perplexity_steered"] > 0
    reading = metrics["feature_activation"][0]
    assert reading["steered_in_run"] > reading["unsteered"]


def test_in_shared_mode_each_unsteered_reply_is_a_fresh_run_of_that_history(smollm2, demo_sae):
    turns = talk(smollm2, demo_sae, planet(STRENGTH), "shared", key="shared")
    history = []
    for number, (user, turn) in enumerate(zip(USER_TURNS, turns), start=1):
        history.append({"role": "user", "content": user})
        # A plain one-turn run (chat off) of the history as the chat template writes it.
        prompt = chat_history_text(smollm2.tokenizer, history)
        fresh = compare(smollm2, demo_sae, prompt, planet(STRENGTH), TEMPERATURE, MAX_TOKENS, 3 + number)
        assert fresh.prompt_ids == turn.prompt_ids
        assert fresh.unsteered_ids == turn.unsteered_ids
        assert torch.equal(fresh.clean_logits, turn.clean_logits)
        history.append({"role": "assistant", "content": turn.unsteered_text})
    # The kept rows were reused: turn 3 read only what follows the full blocks of turn 2's history.
    assert turns[2].timings["reused_tokens"][0] > 0


def test_a_turn_after_an_eviction_gives_the_bits_of_the_kept_cache(smollm2, demo_sae, planet_talk):
    kept = planet_talk
    evicted = talk(smollm2, demo_sae, planet(STRENGTH), "separate", key="evicted", evict_before=3)
    assert min(kept[2].timings["reused_tokens"]) > 0
    assert evicted[2].timings["reused_tokens"] == [0, 0]
    for a, b in zip(kept, evicted):
        assert a.unsteered_ids == b.unsteered_ids and a.steered.ids == b.steered.ids
        assert torch.equal(a.clean_logits, b.clean_logits)
        assert torch.equal(a.clean_activations, b.clean_activations)
        assert torch.equal(a.steered.activations, b.steered.activations)


def test_turn_2_stopped_midway_keeps_its_text_and_turn_3_runs(smollm2, demo_sae, planet_talk):
    """Turn 1 as planet_talk's; turn 2 stopped after a few tokens; turn 3 reads the partial replies."""
    streamed, asked = ["", ""], []

    def on_step(clean: str, variants: list[str]) -> None:
        streamed[0] += clean
        streamed[1] += variants[0]

    def stop_midway() -> bool:
        asked.append(1)
        return len(asked) > 5  # asked before each row reads its prompt, then after every step

    first = planet_talk[0]
    clean = [user(USER_TURNS[0]), assistant(first.unsteered_text), user(USER_TURNS[1])]
    steered = [user(USER_TURNS[0]), assistant(first.steered.text), user(USER_TURNS[1])]
    spec = planet(STRENGTH)
    with pytest.raises(Stopped):
        converse(
            smollm2,
            demo_sae,
            clean,
            steered,
            spec,
            TEMPERATURE,
            MAX_TOKENS,
            2,
            keep="stopped",
            on_step=on_step,
            should_stop=stop_midway,
        )
    assert streamed[0] and streamed[1]
    clean += [assistant(streamed[0]), user(USER_TURNS[2])]
    steered += [assistant(streamed[1]), user(USER_TURNS[2])]
    third = converse(smollm2, demo_sae, clean, steered, spec, TEMPERATURE, MAX_TOKENS, 3, keep="stopped")
    assert third.unsteered_ids and third.steered.ids
    assert min(third.timings["reused_tokens"]) > 0  # the stopped turn's rows were kept
    with smollm2.lock:
        assert scheduler_for(smollm2).evict("stopped")


def user(content: str) -> dict:
    return {"role": "user", "content": content}


def assistant(content: str) -> dict:
    return {"role": "assistant", "content": content}
