"""Find the decoder blocks of any Hugging Face causal LM."""

from __future__ import annotations

import torch


def _num_hidden_layers(model) -> int:
    config = model.config
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    for name in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    raise ValueError(f"{type(model).__name__}: config has no num_hidden_layers")


def decoder_blocks(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The ModuleList of decoder blocks: the one whose length is config.num_hidden_layers.

    Attribute names differ between architectures (transformer.h, model.layers, gpt_neox.layers,
    model.decoder.layers, ...), so search instead of hard-coding them. The first match in module
    order is the outermost stack, which is the one that runs the blocks.
    """
    expected = _num_hidden_layers(model)
    for _name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == expected:
            return module
    raise ValueError(f"{type(model).__name__}: no ModuleList of {expected} decoder blocks found")


def block_hidden(output: torch.Tensor | tuple) -> torch.Tensor:
    """The hidden states in a block's output: a tensor (transformers 5) or the first item of a tuple."""
    return output[0] if isinstance(output, tuple) else output


def replace_block_hidden(output: torch.Tensor | tuple, hidden: torch.Tensor) -> torch.Tensor | tuple:
    """The block's output with its hidden states replaced, in the same structure."""
    if isinstance(output, tuple):
        return (hidden,) + tuple(output[1:])
    return hidden


class _Reached(Exception):
    """Raised by block_output's hook once its block has run: the blocks after it are not needed."""


def block_output(model: torch.nn.Module, input_ids: torch.Tensor, layer: int) -> torch.Tensor:
    """The hidden states block `layer` outputs for input_ids [batch, seq] (a clean forward stopped there).

    The caller holds the model's lock: the hook would otherwise stop another call's forward on the model.
    """
    captured: list[torch.Tensor] = []

    def hook(module, args, output):
        captured.append(block_hidden(output))
        raise _Reached

    handle = decoder_blocks(model)[layer].register_forward_hook(hook)
    try:
        with torch.inference_mode():
            model(input_ids, use_cache=False)
    except _Reached:
        pass
    finally:
        handle.remove()
    return captured[0]
