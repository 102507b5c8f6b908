"""Continuous batching on the real SmolLM2: a request gives bit-identical numbers alone and beside other runs,
and every variant of a sweep keeps the guarantees of a one-variant comparison."""

import pytest
import torch

from steering_app.engine import compare
from steering_app.engine.analysis.metrics import comparison_metrics
from steering_app.engine.layers import decoder_blocks
from steering_app.engine.loader import get_embedder
from steering_app.engine.serving.generate import Generation, prepare
from steering_app.engine.serving.plan import StepPolicy
from steering_app.engine.serving.scheduler import Scheduler
from steering_app.engine.steer import SpecError, SteeringSpec

from .conftest import SAE_LAYER, hooks_everywhere

pytestmark = pytest.mark.slow

ROWS, LENGTH = 6, 128


def _request(lm, sae, prompt, specs, tokens, seed, temperature=0.8, chat=False):
    return prepare(lm, sae, prompt, specs, temperature, tokens, seed, chat=chat, sae_layer=SAE_LAYER)


def _others(lm, sae, cat_scale):
    """Three other runs: other prompts, lengths, features, methods; one is a sweep of 2."""
    additive = SteeringSpec("additive", ((0, 2.0),), (SAE_LAYER,), feature_scales={0: cat_scale})
    return [
        _request(lm, sae, "Write a short poem about the sea.", [additive], 14, seed=11, chat=True),
        _request(
            lm,
            sae,
            "Once upon a time",
            [SteeringSpec("multiplicative", ((1, 3.0), (2, -1.0)), (SAE_LAYER,))],
            9,
            12,
        ),
        _request(
            lm,
            sae,
            "List three fruits:",
            [
                SteeringSpec("additive", ((0, m), (3, -m)), (6, SAE_LAYER), feature_scales={0: cat_scale})
                for m in (1.0, 4.0)
            ],
            18,
            seed=13,
            temperature=1.0,
        ),
    ]


def _run(scheduler, request_under_test, lm, sae, others, schedule):
    """Run the request beside `others`; schedule[i] is the step of the request at which other i asks to join
    (negative: that many steps before the request joins); it waits while too few rows are free.
    Returns the request's Comparison."""
    target = Generation(lm, sae, request_under_test)
    pending = sorted(
        ((at, Generation(lm, sae, other)) for at, other in zip(schedule, others)), key=lambda x: x[0]
    )
    step, joined, result = -max([0, *[-at for at, _ in pending]]), False, None
    while result is None:
        for at, generation in [item for item in pending if item[0] <= step]:
            if scheduler.admit(generation):
                pending.remove((at, generation))
        if step == 0 and not joined:
            assert scheduler.admit(target)
            joined = True
        for ended in scheduler.step():
            assert ended.error is None, ended.error
            if ended.generation is target:
                result = ended.comparison
        step += 1
    while scheduler.active:  # let the others finish so that the batch is free for the next scenario
        scheduler.step()
    return result


@pytest.mark.parametrize("occupied_only", [True, False], ids=["occupied-rows", "all-rows"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_it_gives_bit_identical_numbers_alone_and_beside_other_runs(
    smollm2, smollm2_sae, cat_scale, seed, occupied_only
):
    """Both ways of stepping: over the occupied rows only (where this machine's kernels were shown to be
    row-invariant) and over all rows, the fixed shape every other machine uses."""
    lm, sae = smollm2, smollm2_sae
    spec = SteeringSpec("additive", ((0, 3.0),), (SAE_LAYER, 14), feature_scales={0: cat_scale})
    request = _request(lm, sae, "Tell me about your favourite animal.", [spec], 16, seed)
    others = _others(lm, sae, cat_scale)
    scheduler = Scheduler(lm, ROWS, LENGTH, StepPolicy(rows="auto" if occupied_only else "all"))
    if scheduler.batch.occupied_only != occupied_only:
        pytest.skip("this CPU's kernels were not row-invariant: every step runs all rows (the other case)")
    alone = _run(scheduler, request, lm, sae, [], [])
    slots = {tuple(alone.timings["slots"])}
    # 1, 2 and 3 neighbours, joining before the request, during it and after its first steps.
    for schedule in ([-2], [-3, 4], [-1, 2, 6]):
        shared = _run(scheduler, request, lm, sae, others[: len(schedule)], schedule)
        slots.add(tuple(shared.timings["slots"]))
        assert shared.unsteered_ids == alone.unsteered_ids and shared.steered.ids == alone.steered.ids
        assert torch.equal(shared.clean_logits, alone.clean_logits)
        assert torch.equal(shared.steered.logits, alone.steered.logits)
        assert torch.equal(shared.clean_activations, alone.clean_activations)
        assert torch.equal(shared.steered.activations, alone.steered.activations)
    assert len(slots) > 1  # the check is not vacuous: the request ran in other rows beside the others
    assert alone.steered.ids != alone.unsteered_ids  # ... and the steering did something


def test_each_sweep_variant_is_the_one_variant_run_of_its_strength(smollm2, smollm2_sae, cat_scale):
    lm, sae = smollm2, smollm2_sae
    prompt, tokens, seed = "My favourite pet is", 14, 5
    multipliers = (0.0, 1.0, 2.0, 4.0)
    variants = [
        SteeringSpec("additive", ((0, 1.5 * m),), (SAE_LAYER,), feature_scales={0: cat_scale})
        for m in multipliers
    ]
    sweep = compare(lm, sae, prompt, variants, 0.8, tokens, seed, sae_layer=SAE_LAYER)
    for spec, variant in zip(variants, sweep.variants):
        single = compare(lm, sae, prompt, spec, 0.8, tokens, seed, sae_layer=SAE_LAYER)
        assert single.unsteered_ids == sweep.unsteered_ids  # the clean row never depends on the variants
        assert torch.equal(single.clean_logits, sweep.clean_logits)
        assert single.steered.ids == variant.ids and torch.equal(single.steered.logits, variant.logits)
    zero = sweep.variants[0]
    assert zero.ids == sweep.unsteered_ids and torch.equal(
        zero.logits, sweep.clean_logits[: len(zero.logits)]
    )
    metrics = comparison_metrics(lm, sae, sweep, variants, get_embedder())
    assert metrics[0]["kl_divergence"] == 0.0
    assert all(item["kl_divergence"] > 0 for item in metrics[2:])
    in_run = [item["feature_activation"][0]["steered_in_run"] for item in metrics]
    assert in_run == sorted(in_run) and in_run[-1] > in_run[0]  # stronger steering, stronger feature


def test_a_failing_run_ends_alone_and_leaves_no_hook(smollm2, smollm2_sae, cat_scale):
    lm, sae = smollm2, smollm2_sae
    spec = SteeringSpec("additive", ((0, 2.0),), (SAE_LAYER,), feature_scales={0: cat_scale})
    scheduler = Scheduler(lm, ROWS, LENGTH)
    healthy = Generation(lm, sae, _request(lm, sae, "Hello", [spec], 8, seed=1))

    def explode(clean, variants):
        raise RuntimeError("the stream broke")

    broken = Generation(lm, sae, _request(lm, sae, "Hi there", [spec], 8, seed=2), on_step=explode)
    assert scheduler.admit(healthy) and scheduler.admit(broken)
    ended = {}
    while scheduler.active:
        for item in scheduler.step():
            ended[id(item.generation)] = item
    assert isinstance(ended[id(broken)].error, RuntimeError)
    assert ended[id(healthy)].error is None and len(ended[id(healthy)].comparison.unsteered_ids) == 8
    assert hooks_everywhere(lm.model) == [] and len(scheduler.batch.free) == ROWS
    assert decoder_blocks(lm.model)[SAE_LAYER]._forward_hooks == {}


@pytest.mark.parametrize(
    ("variants", "tokens", "field"),
    [(ROWS, 8, "variants"), (1, LENGTH + 1, "max_new_tokens")],
)
def test_it_refuses_a_run_the_slots_cannot_hold_naming_the_field(
    smollm2, smollm2_sae, variants, tokens, field
):
    lm, sae = smollm2, smollm2_sae
    specs = [SteeringSpec("additive", ((0, float(k)),), (SAE_LAYER,)) for k in range(variants)]
    scheduler = Scheduler(lm, ROWS, LENGTH)
    with pytest.raises(SpecError) as raised:
        scheduler.admit(Generation(lm, sae, _request(lm, sae, "Hello", specs, tokens, seed=0)))
    assert raised.value.field == field and len(scheduler.batch.free) == ROWS


def test_the_lean_step_computes_what_the_modules_compute(smollm2, smollm2_sae, cat_scale):
    """SmolLM2's batch steps without transformers' modules; a forward hook on the model (which only module
    calls would reach) sends the same request through the modules, and the numbers agree."""
    lm, sae = smollm2, smollm2_sae
    spec = SteeringSpec("multiplicative", ((0, 4.0),), (SAE_LAYER,))
    request = _request(lm, sae, "Tell me about your cat.", [spec], 12, seed=3)
    scheduler = Scheduler(lm, ROWS, LENGTH)
    assert scheduler.batch.lean is not None
    lean = _run(scheduler, request, lm, sae, [], [])
    calls = []
    handle = decoder_blocks(lm.model)[0].register_forward_hook(lambda *args: calls.append(1))
    try:
        modules = _run(scheduler, request, lm, sae, [], [])
    finally:
        handle.remove()
    assert len(calls) == 2 + 11  # the module path ran: two prompt reads, then one call per decode step
    assert modules.unsteered_ids == lean.unsteered_ids and modules.steered.ids == lean.steered.ids
    scale = float(lean.clean_logits.abs().max())
    for ours, theirs in (
        (lean.clean_logits, modules.clean_logits),
        (lean.steered.logits, modules.steered.logits),
    ):
        assert float((ours - theirs).abs().max()) <= 1e-4 * scale
    assert lean.steered.ids != lean.unsteered_ids  # the check is not vacuous: the steering acted
