"""The SAE latents a prompt lights up: where to start looking for features to steer with.

One clean forward of the prompt up to the SAE's layer, the SAE's encoding at the prompt's own positions, and
each latent's strongest activation over them. What is not the prompt's text is left out: special tokens (BOS,
chat-template markers) and a chat template's system turn. The first position of any sequence is the model's
attention sink, with a residual many times larger than a text token's, so a prompt that does not begin with a
special token gets the tokenizer's BOS (else EOS) in front: its first word is then read like any other, as in
the packed sequences SAEs are trained on, instead of lighting up the sink's own latents.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..layers import block_output, decoder_blocks
from ..loader import LoadedModel
from ..saes.sae import SAE
from ..steer import SpecError
from ..tokens import chat_text, encode_text, special_ids


@dataclass(frozen=True)
class ActiveLatent:
    index: int
    activation: float  # its strongest activation over the prompt's positions
    token: str  # the prompt token where it is strongest


def active_latents(
    lm: LoadedModel, sae: SAE, prompt: str, layer: int, *, chat: bool = False, limit: int = 20
) -> list[ActiveLatent]:
    """The `limit` latents with the strongest activation anywhere in the prompt, strongest first; latents that
    stay at 0 on every position are not listed. SpecError naming the field for a bad request."""
    blocks = decoder_blocks(lm.model)
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < len(blocks):
        raise SpecError("layer", f"{layer!r} is out of range [0, {len(blocks) - 1}]")
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise SpecError("limit", f"must be a positive integer, got {limit!r}")
    ids, positions = _prompt_positions(lm, prompt, chat)
    if not positions:
        raise SpecError("prompt", "has no tokens other than special ones")
    with lm.lock:
        hidden = block_output(lm.model, torch.tensor([ids], device=lm.device), layer)[0]
    with torch.inference_mode():
        latents = sae.encode(hidden[torch.tensor(positions, device=hidden.device)]).float()
        strongest, where = latents.max(dim=0)
        count = min(limit, int((strongest > 0).sum()))
        values, indices = strongest.topk(count)
    return [
        ActiveLatent(
            index=int(index),
            activation=float(value),
            token=lm.tokenizer.decode([ids[positions[int(where[index])]]]),
        )
        for value, index in zip(values.tolist(), indices.tolist(), strict=True)
    ]


def _prompt_positions(lm: LoadedModel, prompt: str, chat: bool) -> tuple[list[int], list[int]]:
    """The ids the model reads and the positions among them that hold the prompt's own text."""
    tokenizer = lm.tokenizer
    special = special_ids(tokenizer)
    ids = encode_text(tokenizer, prompt, chat)
    own = None
    if chat:
        own = _chat_prompt_span(lm, prompt, len(ids))
    elif ids and ids[0] not in special:
        sink = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if sink is not None:
            ids = [sink, *ids]
    ids = ids[: lm.context_window]
    positions = [
        position
        for position, token in enumerate(ids)
        if token not in special and (own is None or position in own)
    ]
    return ids, positions


def _chat_prompt_span(lm: LoadedModel, prompt: str, length: int) -> range | None:
    """The positions of the user's text inside the chat template (not the template's system turn), from the
    tokenizer's character offsets; None when the tokenizer cannot tell (then every non-special position)."""
    tokenizer = lm.tokenizer
    text = chat_text(tokenizer, prompt)
    start = text.rfind(prompt)
    try:
        offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True).offset_mapping
    except (NotImplementedError, ValueError):  # a slow tokenizer has no offsets
        return None
    if start < 0 or len(offsets) != length:
        return None
    end = start + len(prompt)
    inside = [position for position, (a, b) in enumerate(offsets) if b > a and a < end and b > start]
    return range(inside[0], inside[-1] + 1) if inside else None
