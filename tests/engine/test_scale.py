import pytest
import torch

from steering_app.engine.analysis.scale import residual_norm
from steering_app.engine.layers import decoder_blocks
from steering_app.engine.steer import SpecError
from tests.engine.conftest import block_outputs, hooks_everywhere

PROMPT = "The weather today is"


def test_it_is_the_mean_norm_of_the_layers_output_over_the_non_special_positions(tiny):
    ids = tiny.tokenizer(PROMPT).input_ids
    special = set(tiny.tokenizer.all_special_ids)
    keep = torch.tensor([token not in special for token in ids])
    expected = block_outputs(tiny, [PROMPT], 2)[keep].norm(dim=-1).mean()

    norm = residual_norm(tiny, PROMPT, 2)

    assert norm == pytest.approx(float(expected), rel=1e-6) and norm > 0
    assert hooks_everywhere(tiny.model) == []


def test_it_runs_no_block_after_the_layer(tiny):
    later_calls = []
    handle = decoder_blocks(tiny.model)[3].register_forward_hook(lambda *args: later_calls.append(1))
    try:
        residual_norm(tiny, PROMPT, 1)
    finally:
        handle.remove()

    assert later_calls == []


@pytest.mark.parametrize(
    ("layer", "prompt", "field"), [(4, PROMPT, "layer"), (-1, PROMPT, "layer"), (1, "", "prompt")]
)
def test_it_refuses_a_layer_the_model_lacks_or_a_prompt_without_text(tiny, layer, prompt, field):
    with pytest.raises(SpecError) as raised:
        residual_norm(tiny, prompt, layer)
    assert raised.value.field == field
