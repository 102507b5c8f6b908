"""Steering mechanics on tiny random GPT-2 and Llama models with a random SAE."""

import math

import pytest
import torch

from steering_app.engine import compare
from steering_app.engine.layers import decoder_blocks
from steering_app.engine.serving.kernels import PackedLinear, TransposedLinear
from steering_app.engine.serving.scheduler import scheduler_for
from steering_app.engine.steer import RowSteering, SpecError, SteeringSpec, plan_row, validate

from .conftest import hooks_everywhere, random_sae


class BlockProbe:
    """Block L's output before the steering hooks run, and as the next block receives it."""

    def __init__(self, model, layer: int):
        blocks = decoder_blocks(model)
        self.before, self.after = [], []
        self.handles = [
            blocks[layer].register_forward_hook(lambda m, a, out: self.before.append(out.clone())),
            blocks[layer + 1].register_forward_pre_hook(self._record_input, with_kwargs=True),
        ]

    def _record_input(self, module, args, kwargs):
        self.after.append((args[0] if args else kwargs["hidden_states"]).clone())

    def remove(self):
        for handle in self.handles:
            handle.remove()


def _run_probed(tiny, sae, spec, layer, **kwargs):
    with tiny.lock:
        scheduler_for(tiny)  # the model's batch is built (its kernels checked by probe steps) before probing
    probe = BlockProbe(tiny.model, layer)
    try:
        comparison = compare(tiny, sae, "Hello there, how are", spec, 0.8, 6, seed=3, sae_layer=1, **kwargs)
    finally:
        probe.remove()
    return comparison, probe


def test_it_adds_c_times_scale_times_direction_at_prompt_and_generated_positions(tiny, tmp_path):
    sae = random_sae(tmp_path, d_in=32)
    spec = SteeringSpec("additive", ((5, 1.5), (9, -0.7)), (1, 2), feature_scales={5: 2.5})
    expected = 1.5 * 2.5 * sae.W_dec[5] - 0.7 * 1.0 * sae.W_dec[9]
    for layer in (1, 2):
        comparison, probe = _run_probed(tiny, sae, spec, layer)
        for clean, steered in _row_pairs(comparison, probe):
            assert torch.equal(clean[1], clean[0])  # the clean row is untouched
            assert torch.allclose(steered[1] - steered[0], expected.expand_as(steered[0]), atol=1e-5)


def _row_pairs(comparison, probe) -> list[tuple[tuple, tuple]]:
    """Per forward, ((before, after) of the clean row, (before, after) of the steered row): each row's
    prompt alone in one forward, then one forward per generated token over the batch's slot rows."""
    forwards = list(zip(probe.before, probe.after))
    prompt, decode = forwards[:2], forwards[2:]
    assert all(before.shape == (1, len(comparison.prompt_ids), 32) for before, _ in prompt)
    assert len(decode) == 5 and all(before.shape[1] == 1 for before, _ in decode)  # cached steps
    clean, steered = comparison.timings["slots"]
    pairs = [((prompt[0][0][0], prompt[0][1][0]), (prompt[1][0][0], prompt[1][1][0]))]
    for before, after in decode:
        pairs.append(((before[clean], after[clean]), (before[steered], after[steered])))
    return pairs


def test_it_scales_the_feature_by_its_own_activation_when_multiplicative(tiny, tmp_path):
    sae = random_sae(tmp_path, d_in=32)
    spec = SteeringSpec("multiplicative", ((5, 2.0), (9, -1.0)), (1,))
    comparison, probe = _run_probed(tiny, sae, spec, 1)
    fired = 0
    for clean, (before, after) in _row_pairs(comparison, probe):
        assert torch.equal(clean[1], clean[0])
        f = sae.encode(before)
        expected = 2.0 * f[..., 5:6] * sae.W_dec[5] - 1.0 * f[..., 9:10] * sae.W_dec[9]
        assert torch.allclose(after - before, expected, atol=1e-5)
        fired += int((f[..., [5, 9]] > 0).sum())
    assert fired >= 3  # the check is not vacuous: the features fire at several positions


def test_it_leaves_special_tokens_alone_unless_asked(tiny, tmp_path):
    sae = random_sae(tmp_path, d_in=32)
    blocks = decoder_blocks(tiny.model)
    ids = torch.tensor([[5, 6, 7, 8], [5, 6, 7, 8]])
    special = torch.tensor([[True, False, False, True]])
    for steer_special, changed in ((False, [False, True, True, False]), (True, [True, True, True, True])):
        spec = SteeringSpec("additive", ((3, 4.0),), (2,), steer_special_tokens=steer_special)
        steering = RowSteering(blocks, 2)
        steering.special_mask = special
        steering.assign(1, plan_row(sae, 1, spec))
        probe = BlockProbe(tiny.model, 2)
        with steering.attached(), torch.no_grad():
            tiny.model(ids)
        probe.remove()
        moved = (probe.after[0][1] - probe.before[0][1]).abs().amax(-1) > 0
        assert moved.tolist() == changed


def test_it_steers_nothing_at_coefficient_zero(tiny, tmp_path):
    sae = random_sae(tmp_path, d_in=32)
    for method in ("additive", "multiplicative"):
        comparison = compare(
            tiny, sae, "Hello there", SteeringSpec(method, ((5, 0.0),), (1,)), 0.8, 8, seed=1, sae_layer=1
        )
        assert comparison.steered.ids == comparison.unsteered_ids
        assert torch.equal(comparison.steered.logits, comparison.clean_logits)


@pytest.mark.parametrize("interrupt", [RuntimeError("boom"), KeyboardInterrupt()])
def test_it_always_removes_its_hooks(tiny, tmp_path, interrupt):
    sae = random_sae(tmp_path, d_in=32)
    blocks = decoder_blocks(tiny.model)
    spec = SteeringSpec("additive", ((5, 1.0),), (0, 1, 2))
    steering = RowSteering(blocks, 2)
    steering.assign(1, plan_row(sae, 1, spec))
    with pytest.raises(type(interrupt)), steering.attached():
        assert len(hooks_everywhere(tiny.model)) == 3
        raise interrupt
    assert hooks_everywhere(tiny.model) == []

    def on_step(unsteered, steered):
        raise interrupt

    with pytest.raises(type(interrupt)):
        compare(tiny, sae, "Hello there", spec, 0.8, 8, seed=1, sae_layer=1, on_step=on_step)
    assert hooks_everywhere(tiny.model) == []
    assert not any(isinstance(module, (PackedLinear, TransposedLinear)) for module in tiny.model.modules())


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"layers": (4,)}, "layers"),
        ({"layers": (-1,)}, "layers"),
        ({"layers": ()}, "layers"),
        ({"features": ((16, 1.0),)}, "features[0].feature_id"),
        ({"features": ((-1, 1.0),)}, "features[0].feature_id"),
        ({"features": ((1, 1.0), (2, math.nan))}, "features[1].coefficient"),
        ({"features": ((1, math.inf),)}, "features[0].coefficient"),
        ({"features": ((1, -10_000.5),)}, "features[0].coefficient"),
        ({"method": "multiplicative", "layers": (2,)}, "layers"),
        ({"method": "rotate"}, "method"),
        ({"feature_scales": {1: math.nan}}, "feature_scales"),
    ],
)
def test_it_rejects_invalid_specs_naming_the_field(tiny, tmp_path, change, field):
    sae = random_sae(tmp_path, d_in=32, d_sae=16)
    spec = SteeringSpec(**{"method": "additive", "features": ((1, 1.0),), "layers": (1,), **change})
    with pytest.raises(SpecError) as raised:
        validate(spec, 4, sae, hidden_size=32, sae_layer=1)
    assert raised.value.field == field and str(raised.value).startswith(field)
    with pytest.raises(ValueError, match=f"^{field.replace('[', '.').replace(']', '.')}"):
        compare(tiny, sae, "Hi", spec, 0.5, 4, seed=0, sae_layer=1)


def test_it_accepts_the_limits(tmp_path):
    sae = random_sae(tmp_path, d_in=32, d_sae=16)
    validate(SteeringSpec("additive", ((15, 100.0), (0, -100)), (0, 3)), 4, sae, hidden_size=32, sae_layer=1)
    validate(SteeringSpec("multiplicative", ((15, -1.0),), (1,)), 4, sae, hidden_size=32, sae_layer=1)


def test_it_rejects_an_sae_of_another_width(tiny, tmp_path):
    sae = random_sae(tmp_path, d_in=24)
    with pytest.raises(ValueError, match="^sae: SAE d_in 24 does not match the model's hidden size 32"):
        compare(tiny, sae, "Hi", SteeringSpec("additive", ((1, 1.0),), (1,)), 0.5, 4, seed=0, sae_layer=1)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": -3}, "max_new_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"seed": -1}, "seed"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": "word " * 40}, "prompt"),
        ({"prompt": "word " * 20, "max_new_tokens": 20}, "max_new_tokens"),
        ({"sae_layer": 7}, "sae_layer"),
    ],
)
def test_it_rejects_invalid_generation_arguments_naming_the_field(smollm2, tmp_path, kwargs, field):
    from .conftest import tiny_lm

    tiny = tiny_lm("gpt2", smollm2.tokenizer, context=32)
    sae = random_sae(tmp_path, d_in=32)
    args = {"prompt": "Hello", "temperature": 0.5, "max_new_tokens": 4, "seed": 0, "sae_layer": 1} | kwargs
    with pytest.raises(ValueError, match=f"^{field}:"):
        compare(tiny, sae, spec=SteeringSpec("additive", ((1, 1.0),), (1,)), **args)
