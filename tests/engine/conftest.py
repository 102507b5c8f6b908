"""Engine fixtures: the real SmolLM2 (loaded once per session) with an SAE whose feature 0 is a real
concept direction, and tiny random GPT-2 / Llama models for the mechanics."""

from __future__ import annotations

import pytest
import torch

from steering_app.engine import loader
from steering_app.engine.layers import decoder_blocks
from steering_app.engine.loader import LoadedModel
from steering_app.engine.saes.sae import load_sae, save_sae
from steering_app.model_files import DEMO_MODEL

SAE_LAYER = 10
CAT_TEXTS = [
    "My cat sleeps on the sofa all day.",
    "Cats and kittens purr when they are happy.",
    "The kitten chased the cat's tail.",
    "Our cats love fish and milk.",
]
NEUTRAL_TEXTS = [
    "The train leaves at noon from the station.",
    "He wrote the report on his laptop.",
    "Prices rose sharply last quarter.",
    "The river flows into the sea.",
]


def block_outputs(lm: LoadedModel, texts: list[str], layer: int) -> torch.Tensor:
    """The output of block `layer` at every position of every text, [positions, hidden]."""
    return torch.cat(block_outputs_of_ids(lm, [lm.tokenizer(text).input_ids for text in texts], layer))


def block_outputs_of_ids(lm: LoadedModel, rows: list[list[int]], layer: int) -> list[torch.Tensor]:
    """The output of block `layer` at every position of each token id row (each read alone): [len(row), hidden]."""
    seen = []
    handle = decoder_blocks(lm.model)[layer].register_forward_hook(
        lambda module, args, output: seen.append(output[0] if isinstance(output, tuple) else output)
    )
    try:
        with torch.inference_mode():
            for row in rows:
                lm.model(torch.tensor([row], device=lm.device))
    finally:
        handle.remove()
    return [hidden[0] for hidden in seen]


@pytest.fixture(scope="session")
def smollm2() -> LoadedModel:
    return loader.load_model(DEMO_MODEL, device="cpu")


@pytest.fixture(scope="session")
def smollm2_sae(smollm2, tmp_path_factory):
    """A 64-latent SAE at layer 10: feature 0 reads "cats" (mean activation difference between cat
    sentences and neutral ones), the others are random unit directions; encoder tied to decoder."""
    cats = block_outputs(smollm2, CAT_TEXTS, SAE_LAYER)
    neutral = block_outputs(smollm2, NEUTRAL_TEXTS, SAE_LAYER)
    mean = torch.cat([cats, neutral]).mean(0)
    concept = cats.mean(0) - neutral.mean(0)
    generator = torch.Generator().manual_seed(0)
    W_dec = torch.randn(64, smollm2.hidden_size, generator=generator)
    W_dec[0] = concept
    W_dec = W_dec / W_dec.norm(dim=1, keepdim=True)
    path = tmp_path_factory.mktemp("smollm2_sae")
    save_sae(
        path,
        W_dec.T.clone(),
        W_dec,
        torch.zeros(64),
        mean,
        {"apply_b_dec_to_input": True, "metadata": {"hook_name": f"blocks.{SAE_LAYER}.hook_resid_post"}},
    )
    return loader.load_sae_cached(path, smollm2)


@pytest.fixture(scope="session")
def cat_scale(smollm2, smollm2_sae) -> float:
    """Feature 0's max activation on the cat sentences (its a_i)."""
    cats = block_outputs(smollm2, CAT_TEXTS, SAE_LAYER)
    return float(smollm2_sae.encode(cats)[:, 0].max())


def random_sae(
    tmp_path, d_in: int, d_sae: int = 16, architecture: str = "standard", hook_layer: int = 1, seed=0
):
    generator = torch.Generator().manual_seed(seed)
    W_dec = torch.randn(d_sae, d_in, generator=generator)
    cfg = {
        "architecture": architecture,
        "apply_b_dec_to_input": True,
        "metadata": {"hook_name": f"blocks.{hook_layer}.hook_resid_post"},
    }
    threshold = None
    if architecture == "topk":
        cfg["k"] = 4
    if architecture == "jumprelu":
        threshold = torch.rand(d_sae, generator=generator) * 0.1
    save_sae(
        tmp_path,
        torch.randn(d_in, d_sae, generator=generator) * 0.5,
        W_dec,
        torch.randn(d_sae, generator=generator) * 0.1,
        torch.randn(d_in, generator=generator) * 0.1,
        cfg,
        threshold=threshold,
    )
    return load_sae(tmp_path)


def tiny_lm(architecture: str, tokenizer, vocab_size: int | None = None, context: int = 128) -> LoadedModel:
    """A tiny random causal LM wrapped like a loaded one (eager attention, as the loader does)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    vocab_size = vocab_size or len(tokenizer)
    if architecture == "gpt2":
        config = GPT2Config(
            vocab_size=vocab_size,
            n_positions=context,
            n_embd=32,
            n_layer=4,
            n_head=4,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        model = GPT2LMHeadModel(config)
    else:
        config = LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=context,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        model = LlamaForCausalLM(config)
    model.set_attn_implementation("eager")
    model.eval().requires_grad_(False)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        device=torch.device("cpu"),
        source=f"tiny-{architecture}",
        architecture=type(model).__name__,
        num_layers=4,
        hidden_size=32,
    )


@pytest.fixture(params=["gpt2", "llama"])
def tiny(request, smollm2):
    return tiny_lm(request.param, smollm2.tokenizer)


def hooks_everywhere(model) -> list[str]:
    return [
        name for name, module in model.named_modules() if module._forward_hooks or module._forward_pre_hooks
    ]
