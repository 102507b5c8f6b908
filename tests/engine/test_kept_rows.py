"""A conversation's rows parked between turns (tiny random models: the mechanics; test_conversation.py has the
real model): reading a prompt from a kept prefix gives the bits of reading it all, parked rows go back to the
batch when a run needs them or after the idle timeout, and a turn that lost its rows reads everything again."""

import pytest
import torch

from steering_app import engine_config
from steering_app.engine.serving.generate import Generation, prepare, prepare_turn
from steering_app.engine.serving.scheduler import Scheduler
from steering_app.engine.serving.slots import PREFILL_BLOCK, PrefixCache, read_blocks
from steering_app.engine.steer import RowSteering, SteeringSpec

from .conftest import random_sae, tiny_lm

ROWS, LENGTH = 4, 512
LAYER = 1  # the tiny models have 4 blocks
SPEC = SteeringSpec("additive", ((0, 2.0),), (LAYER,))


@pytest.fixture
def llama(smollm2):
    return tiny_lm("llama", smollm2.tokenizer, context=LENGTH)


@pytest.fixture
def sae(tmp_path, llama):
    return random_sae(tmp_path, llama.hidden_size, hook_layer=LAYER)


def history(turns: int) -> list[dict]:
    """A user-assistant history of `turns` exchanges, ending with the user's next message."""
    messages = []
    for number in range(turns):
        messages.append(
            {"role": "user", "content": f"Question {number}: what is the colour of the sea at dawn?"}
        )
        messages.append({"role": "assistant", "content": f"Answer {number}: " + "grey and silver, " * 8})
    return [*messages, {"role": "user", "content": "And at night?"}]


def turn(scheduler, lm, sae, messages, key, seed=0):
    request = prepare_turn(lm, sae, messages, messages, SPEC, 0.8, 6, seed, keep=key)
    with lm.lock:
        return scheduler.run_alone(Generation(lm, sae, request))


def test_reading_from_a_kept_prefix_reads_only_the_rest_and_gives_the_bits_of_reading_it_all(llama):
    scheduler = Scheduler(llama, ROWS, LENGTH)
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(llama.tokenizer.vocab_size, (1, 3 * PREFILL_BLOCK + 17), generator=generator)
    blocks = []  # the positions each forward read

    def counting_lean(block_ids, *args, **kwargs):
        blocks.append(block_ids.shape[1])
        return scheduler.batch.lean(block_ids, *args, **kwargs)

    def read(cache: PrefixCache):
        blocks.clear()
        steering = RowSteering(scheduler.batch.steering.blocks, 1)
        steering.assign(0, None)
        return read_blocks(counting_lean, ids, steering, cache, scheduler.batch.special_ids), cache

    whole_logits, whole = read(PrefixCache())
    assert blocks == [PREFILL_BLOCK] * 3 + [17]
    kept = 2 * PREFILL_BLOCK
    prefix = PrefixCache(
        {layer: keys[:, :, :kept].clone() for layer, keys in whole.keys.items()},
        {layer: values[:, :, :kept].clone() for layer, values in whole.values.items()},
    )
    rest_logits, rest = read(prefix)
    assert blocks == [PREFILL_BLOCK, 17]
    assert torch.equal(rest_logits, whole_logits)
    assert all(torch.equal(rest.keys[layer], whole.keys[layer]) for layer in whole.keys)


def test_the_next_turn_reuses_the_full_blocks_and_gives_the_bits_of_a_fresh_read(llama, sae):
    kept = Scheduler(llama, ROWS, LENGTH)
    turn(kept, llama, sae, history(1), "chat")
    assert len(kept.batch.free) == ROWS - 2 and kept.room() == ROWS
    lean, read = kept.batch.lean, []

    def counting_lean(ids, positions, *args, **kwargs):
        if ids.shape[1] > 1:  # a prompt block, not a decode step
            read.append(int(positions[0, 0]))
        return lean(ids, positions, *args, **kwargs)

    kept.batch.lean = counting_lean
    again = turn(kept, llama, sae, history(2), "chat", seed=1)
    fresh = turn(Scheduler(llama, ROWS, LENGTH), llama, sae, history(2), None, seed=1)
    reused = again.timings["reused_tokens"]
    assert reused[0] > 0 and reused[0] % PREFILL_BLOCK == 0 and fresh.timings["reused_tokens"] == [0, 0]
    assert min(read) == reused[0]  # each row's first block starts where its kept prefix ends
    assert again.unsteered_ids == fresh.unsteered_ids and again.steered.ids == fresh.steered.ids
    assert torch.equal(again.clean_logits, fresh.clean_logits)


def test_parked_rows_go_back_oldest_first_when_a_run_needs_them(llama, sae):
    scheduler = Scheduler(llama, ROWS, LENGTH)
    turn(scheduler, llama, sae, history(1), "old")
    turn(scheduler, llama, sae, history(1), "new")
    assert scheduler.batch.free == [] and list(scheduler.kept) == ["old", "new"]
    request = prepare(llama, sae, "Hello there", [SPEC], 0.8, 4, 0)
    with llama.lock:
        scheduler.run_alone(Generation(llama, sae, request))
    assert list(scheduler.kept) == ["new"]
    assert turn(scheduler, llama, sae, history(2), "old").timings["reused_tokens"] == [0, 0]
    assert turn(scheduler, llama, sae, history(2), "new").timings["reused_tokens"][0] > 0


def test_parked_rows_go_back_after_the_idle_timeout(llama, sae, monkeypatch):
    scheduler = Scheduler(llama, ROWS, LENGTH)
    turn(scheduler, llama, sae, history(1), "idle")
    monkeypatch.setattr(engine_config.current, "chat_keep_seconds", 0)
    request = prepare(llama, sae, "Hello there", [SPEC], 0.8, 4, 0)
    with llama.lock:
        scheduler.run_alone(Generation(llama, sae, request))
    assert scheduler.kept == {} and len(scheduler.batch.free) == ROWS


def test_a_failed_turn_gives_its_rows_back(llama, sae):
    scheduler = Scheduler(llama, ROWS, LENGTH)
    request = prepare_turn(llama, sae, history(1), history(1), SPEC, 0.8, 6, 0, keep="failing")

    def fail() -> bool:
        raise RuntimeError("the database went away")

    generation = Generation(llama, sae, request, should_stop=fail)
    with llama.lock, pytest.raises(RuntimeError):
        scheduler.run_alone(generation)
    assert scheduler.kept == {} and len(scheduler.batch.free) == ROWS
