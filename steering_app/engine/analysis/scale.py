"""The residual stream's scale at a layer: the unit of an uncalibrated SAE's steering coefficients.

Without a max activation a_i = 1, so c * d_i with a unit-norm decoder row moves h by |c|: a coefficient
means something only next to |h|, the norm of the residual stream at the layer where it is added.
"""

from __future__ import annotations

import torch

from ..layers import block_output, decoder_blocks
from ..loader import LoadedModel
from ..steer import SpecError
from ..tokens import encode_text, special_ids


def residual_norm(lm: LoadedModel, prompt: str, layer: int, chat: bool = False) -> float:
    """Mean L2 norm of block `layer`'s output over the prompt's non-special positions (clean model).

    Special tokens are left out: BOS in particular carries a residual many times larger than any text
    token's and is never steered.
    """
    blocks = decoder_blocks(lm.model)
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < len(blocks):
        raise SpecError("layer", f"{layer!r} is out of range [0, {len(blocks) - 1}]")
    ids = encode_text(lm.tokenizer, prompt, chat)[: lm.context_window]
    special = special_ids(lm.tokenizer)
    keep = torch.tensor([token not in special for token in ids], dtype=torch.bool)
    if not keep.any():
        raise SpecError("prompt", "has no tokens other than special ones")
    # Under the model's lock: block_output's hook would otherwise stop another call's forward on the shared model.
    with lm.lock:
        hidden = block_output(lm.model, torch.tensor([ids], device=lm.device), layer)[0]
    hidden = hidden[keep.to(hidden.device)].float()
    return float(hidden.norm(dim=-1).mean())
