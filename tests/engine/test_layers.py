import pytest
import torch
import transformers

from steering_app.engine.layers import block_hidden, decoder_blocks, replace_block_hidden

TINY = {"vocab_size": 64, "hidden_size": 16, "num_attention_heads": 2, "num_hidden_layers": 3}


def _model(name: str):
    torch.manual_seed(0)
    configs = {
        "gpt2": lambda: transformers.GPT2Config(
            vocab_size=64, n_embd=16, n_head=2, n_layer=3, n_positions=32
        ),
        "llama": lambda: transformers.LlamaConfig(**TINY, intermediate_size=32),
        "mistral": lambda: transformers.MistralConfig(**TINY, intermediate_size=32, num_key_value_heads=1),
        "qwen2": lambda: transformers.Qwen2Config(**TINY, intermediate_size=32, num_key_value_heads=1),
        "gemma": lambda: transformers.GemmaConfig(
            **TINY, intermediate_size=32, num_key_value_heads=1, head_dim=8
        ),
        "gpt_neox": lambda: transformers.GPTNeoXConfig(**TINY, intermediate_size=32),
        "opt": lambda: transformers.OPTConfig(
            vocab_size=64,
            hidden_size=16,
            num_attention_heads=2,
            num_hidden_layers=3,
            ffn_dim=32,
            word_embed_proj_dim=16,
        ),
        "phi": lambda: transformers.PhiConfig(**TINY, intermediate_size=32),
    }
    config = configs[name]()
    return transformers.AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("name", ["gpt2", "llama", "mistral", "qwen2", "gemma", "gpt_neox", "opt", "phi"])
def test_it_finds_the_decoder_blocks_of_any_architecture(name):
    model = _model(name).eval()
    blocks = decoder_blocks(model)
    assert len(blocks) == 3
    seen = []
    handle = blocks[1].register_forward_hook(lambda m, a, out: seen.append(block_hidden(out).shape))
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]))
    handle.remove()
    assert seen == [torch.Size([1, 3, 16])]


def test_it_replaces_hidden_states_in_tensor_and_tuple_outputs():
    hidden, other = torch.zeros(1, 2, 3), torch.ones(1)
    assert replace_block_hidden(hidden, other) is other
    assert replace_block_hidden((hidden, "cache"), other) == (other, "cache")
    assert block_hidden((hidden, "cache")) is hidden
