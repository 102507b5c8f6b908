import pytest

from steering_app.engine.analysis.active import active_latents
from steering_app.engine.steer import SpecError
from tests.engine.conftest import block_outputs, hooks_everywhere, random_sae

PROMPT = "The weather today is rainy and cold"
LAYER = 2


@pytest.fixture
def sae(tmp_path):
    return random_sae(tmp_path, d_in=32, d_sae=16, hook_layer=LAYER)


def test_it_is_each_latents_strongest_activation_over_the_prompt_strongest_first(tiny, sae):
    # The prompt read after a BOS (the attention sink), which itself is left out.
    bos = tiny.tokenizer.bos_token
    latents = sae.encode(block_outputs(tiny, [bos + PROMPT], LAYER)[1:])
    strongest, where = latents.max(dim=0)
    ids = tiny.tokenizer(PROMPT).input_ids

    found = active_latents(tiny, sae, PROMPT, LAYER, limit=16)

    firing = sorted(range(16), key=lambda index: -float(strongest[index]))
    firing = [index for index in firing if strongest[index] > 0]
    assert [latent.index for latent in found] == firing and firing
    for latent in found:
        assert latent.activation == pytest.approx(float(strongest[latent.index]), rel=1e-5)
        assert latent.token == tiny.tokenizer.decode([ids[int(where[latent.index])]])
    assert hooks_everywhere(tiny.model) == []


def test_it_lists_at_most_limit(tiny, sae):
    assert len(active_latents(tiny, sae, PROMPT, LAYER, limit=3)) == 3


def test_it_reads_only_the_users_text_in_a_chat_template(tiny, sae):
    found = active_latents(tiny, sae, PROMPT, LAYER, chat=True, limit=16)

    assert found and all(latent.token.strip() in PROMPT for latent in found)


@pytest.mark.parametrize(
    ("prompt", "layer", "limit", "field"),
    [(PROMPT, 4, 5, "layer"), (PROMPT, LAYER, 0, "limit"), ("<|im_end|>", LAYER, 5, "prompt")],
)
def test_it_refuses_a_bad_request_naming_the_field(tiny, sae, prompt, layer, limit, field):
    with pytest.raises(SpecError) as raised:
        active_latents(tiny, sae, prompt, layer, limit=limit)
    assert raised.value.field == field
