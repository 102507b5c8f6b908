"""The wide batch for runs that may wait: WIDE_ROWS rows only where its steps and the shared batch's compute
only the occupied rows, else the shared batch's shape; a run gives the same numbers in either."""

from types import SimpleNamespace

import pytest
import torch

from steering_app import engine_config
from steering_app.engine.serving import scheduler as scheduling
from steering_app.engine.serving.generate import Generation, prepare
from steering_app.engine.serving.kernels import StepKernels
from steering_app.engine.serving.plan import StepPlan
from steering_app.engine.serving.scheduler import (
    WIDE_ROWS,
    scheduler_for,
    slot_shape,
    wide_scheduler,
)
from steering_app.engine.serving.slots import SlotBatch
from steering_app.engine.steer import SteeringSpec

from .conftest import SAE_LAYER, random_sae, tiny_lm

DEFAULT_ROWS, LENGTH = slot_shape(torch.device("cpu"))


@pytest.fixture
def llama(smollm2):
    """A tiny Llama of its own (its batches' checks are cached per model, so each test gets a fresh one)."""
    return tiny_lm("llama", smollm2.tokenizer)


def _machine(monkeypatch, invariant_rows) -> list[int]:
    """Pretend this machine's linears are row-invariant and its probe steps are at invariant_rows(rows) (the
    tiny model's kernels need not be: the wiring is tested here, the real machine by the slow test below);
    returns the row counts of the batches built."""
    monkeypatch.setattr(
        scheduling, "step_kernels", lambda model, rows, device: SimpleNamespace(row_invariant=True)
    )
    built = []

    def plan(batch):
        built.append(batch.rows)
        occupied = invariant_rows(batch.rows)
        return StepPlan(batch.rows, batch.length, True, "faked", (), "faked", occupied, "faked", False, "cpu")

    monkeypatch.setattr(SlotBatch, "_decide", plan)
    return built


def test_it_widens_the_batch_for_waiting_runs_where_steps_compute_only_the_occupied_rows(llama, monkeypatch):
    built = _machine(monkeypatch, lambda rows: True)
    with llama.lock:
        wide = wide_scheduler(llama)
        assert wide is wide_scheduler(llama) and wide is not scheduler_for(llama)
    assert (wide.batch.rows, wide.batch.length) == (WIDE_ROWS, LENGTH) and wide.batch.occupied_only
    assert scheduler_for(llama).batch.rows == DEFAULT_ROWS  # single runs keep the default rows
    assert built == [DEFAULT_ROWS, WIDE_ROWS]


def test_it_keeps_the_shared_shape_where_every_step_runs_all_rows(smollm2):
    """GPT-2's linears are Conv1D, never packed: its steps run every row, so more rows would cost each run."""
    gpt2 = tiny_lm("gpt2", smollm2.tokenizer)
    with gpt2.lock:
        wide = wide_scheduler(gpt2).batch
    assert (wide.rows, wide.length) == (DEFAULT_ROWS, LENGTH) and not wide.occupied_only


def test_it_keeps_the_shared_shape_where_the_wide_probe_steps_differ_between_row_counts(llama, monkeypatch):
    built = _machine(monkeypatch, lambda rows: rows != WIDE_ROWS)
    with llama.lock:
        wide = wide_scheduler(llama).batch
    assert (wide.rows, wide.length) == (DEFAULT_ROWS, LENGTH) and wide.occupied_only
    assert built == [DEFAULT_ROWS, WIDE_ROWS, DEFAULT_ROWS]


def test_it_builds_no_wide_batch_where_the_linears_are_not_row_invariant(llama, monkeypatch):
    built = _machine(monkeypatch, lambda rows: True)
    monkeypatch.setattr(scheduling, "step_kernels", lambda model, rows, device: StepKernels(rows))
    with llama.lock:
        assert wide_scheduler(llama).batch.rows == DEFAULT_ROWS
    assert built == [DEFAULT_ROWS, DEFAULT_ROWS]


def test_it_builds_no_wide_batch_where_the_shared_batch_runs_all_rows(llama, monkeypatch):
    """A wide batch's run would then differ from the same run in the shared batch, whose row count sets its
    numbers."""
    built = _machine(monkeypatch, lambda rows: rows == WIDE_ROWS)
    with llama.lock:
        assert wide_scheduler(llama).batch.rows == DEFAULT_ROWS
    assert built == [DEFAULT_ROWS, DEFAULT_ROWS]


def test_the_configured_rows_fix_both_batches(llama, monkeypatch):
    _machine(monkeypatch, lambda rows: True)
    monkeypatch.setattr(engine_config.current, "slot_rows", 5)
    with llama.lock:
        assert wide_scheduler(llama).batch.rows == scheduler_for(llama).batch.rows == 5


def test_a_run_gives_the_same_numbers_in_the_wide_and_the_shared_batch(llama, tmp_path):
    sae = random_sae(tmp_path, d_in=32, hook_layer=1)
    spec = SteeringSpec("additive", ((0, 4.0),), (1,))
    with llama.lock:
        runs = [
            scheduler.run_alone(
                Generation(llama, sae, prepare(llama, sae, "Hello there", [spec], 0.8, 12, 3))
            )
            for scheduler in (scheduler_for(llama), wide_scheduler(llama))
        ]
    assert runs[0].unsteered_ids == runs[1].unsteered_ids and runs[0].steered.ids == runs[1].steered.ids
    assert torch.equal(runs[0].clean_logits, runs[1].clean_logits)
    assert torch.equal(runs[0].steered.logits, runs[1].steered.logits)
    assert runs[0].steered.ids != runs[0].unsteered_ids  # the steering acted


@pytest.mark.slow
def test_a_run_gives_the_same_numbers_in_the_wide_batch_beside_sweeps_as_in_the_default_one(
    smollm2, smollm2_sae, cat_scale
):
    """The request runs alone in the shared batch (default rows), then in the model's wide batch in rows the
    default one lacks, beside three sweeps of 4 variants admitted before it and a comparison joining during
    it."""
    lm, sae = smollm2, smollm2_sae
    with lm.lock:
        wide, default = wide_scheduler(lm), scheduler_for(lm)
    if wide.batch.rows != WIDE_ROWS:
        pytest.skip("this CPU's kernels were not row-invariant: the engine keeps the default rows here")
    assert wide.batch.occupied_only and default.batch.occupied_only and default.batch.rows == DEFAULT_ROWS

    def request(prompt, specs, tokens, seed):
        return prepare(lm, sae, prompt, specs, 0.8, tokens, seed, sae_layer=SAE_LAYER)

    additive = SteeringSpec("additive", ((0, 3.0),), (SAE_LAYER, 14), feature_scales={0: cat_scale})
    target = request("Tell me about your favourite animal.", [additive], 16, seed=4)
    sweeps = [
        request(
            prompt,
            [SteeringSpec("multiplicative", ((1, 2.0 * m),), (SAE_LAYER,)) for m in (0.5, 1.0, 2.0, 4.0)],
            tokens,
            seed,
        )
        for prompt, tokens, seed in (("Once upon a time", 20, 1), ("List three fruits:", 9, 2), ("Hi", 30, 3))
    ]
    joining = request("My cat", [additive], 10, seed=5)
    with lm.lock:
        alone = default.run_alone(Generation(lm, sae, target))
        for other in sweeps:
            assert wide.admit(Generation(lm, sae, other))
        beside = Generation(lm, sae, target)
        assert wide.admit(beside)
        result, step = None, 0
        while wide.active:
            if step == 3:
                assert wide.admit(Generation(lm, sae, joining))
            for ended in wide.step():
                assert ended.error is None, ended.error
                if ended.generation is beside:
                    result = ended.comparison
            step += 1
    assert result.timings["slots"] == [15, 16] != alone.timings["slots"]
    assert result.unsteered_ids == alone.unsteered_ids and result.steered.ids == alone.steered.ids
    assert torch.equal(result.clean_logits, alone.clean_logits)
    assert torch.equal(result.steered.logits, alone.steered.logits)
    assert torch.equal(result.clean_activations, alone.clean_activations)
    assert torch.equal(result.steered.activations, alone.steered.activations)
    assert alone.steered.ids != alone.unsteered_ids  # the steering acted
