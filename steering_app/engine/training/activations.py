"""Activation collection: the residual stream at one layer for the SAE to train on.

collect_activations streams texts through the model, packed into fixed-length sequences (EOS between
documents), and keeps the output of one decoder block: the forward pass stops right after that block.
Special tokens (BOS, EOS, chat markers) are left out: their residual norm is not typical. Each kept
activation remembers its token position, so features can be described in context later.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from ..layers import block_hidden, decoder_blocks
from ..tokens import pad_token_id, special_id_tensor
from .stop import StopCheck, check_stop

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


class _StopForward(Exception):
    """Raised by the collection hook: nothing after the SAE's block needs to run."""


def hook_name_for(layer: int) -> str:
    """The SAELens hook name of the output of decoder block layer (what collect_activations keeps)."""
    return f"blocks.{layer}.hook_resid_post"


@dataclass
class Activations:
    """Residual activations at one layer, with the token sequences they came from.

    acts[i] is the activation of the token at flat position positions[i] of token_ids
    (row = positions[i] // seq_len); positions holding special tokens or padding have no row.
    """

    acts: torch.Tensor  # [N, d_in], float16 on CPU
    positions: torch.Tensor  # [N] long
    token_ids: torch.Tensor  # [S, seq_len] long
    layer: int

    @property
    def num_tokens(self) -> int:
        return int(self.acts.shape[0])

    @property
    def d_in(self) -> int:
        return int(self.acts.shape[1])

    def save(self, path: str | Path) -> None:
        torch.save(
            {
                "acts": self.acts,
                "positions": self.positions,
                "token_ids": self.token_ids,
                "layer": self.layer,
            },
            path,
        )

    @classmethod
    def load(cls, path: str | Path) -> Activations:
        return cls(**torch.load(path, weights_only=True))


def _packed_sequences(
    tokenizer, texts: Iterable[str | list[int]], seq_len: int, separator: int | None
) -> Iterator[list[int]]:
    """Token id lists of length seq_len (the last may be shorter): documents joined by separator.

    A document is a text or its token ids already (the demo corpus ships as ids)."""
    buffer: list[int] = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] if isinstance(text, str) else text
        if not ids:
            continue
        buffer.extend(ids)
        if separator is not None:
            buffer.append(separator)
        while len(buffer) >= seq_len:
            yield buffer[:seq_len]
            buffer = buffer[seq_len:]
    if buffer:
        yield buffer


def collect_activations(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    texts: Iterable[str | list[int]],
    layer: int,
    *,
    max_tokens: int,
    seq_len: int = 128,
    batch_size: int = 32,
    progress: bool = True,
    stop: StopCheck = None,
    on_progress: Callable[[int], None] | None = None,
) -> Activations:
    """Outputs of decoder block layer for up to max_tokens non-special tokens of texts (or token id lists).

    Texts are packed into sequences of seq_len tokens, EOS between documents; the model runs on its
    own device and dtype and stops after the block; activations are kept in float16 on the CPU.
    on_progress (optional) receives the number of tokens kept so far after each batch.
    """
    blocks = decoder_blocks(model)
    if not 0 <= layer < len(blocks):
        raise ValueError(f"layer {layer} is out of range: the model has blocks 0..{len(blocks) - 1}")
    device = next(model.parameters()).device
    separator = tokenizer.eos_token_id
    special = special_id_tensor(tokenizer)
    pad_id = pad_token_id(tokenizer, model)
    captured: list[torch.Tensor] = []

    def hook(_module, _inputs, output):
        captured.append(block_hidden(output))
        raise _StopForward

    acts, positions, rows = [], [], []
    kept = sequences_done = 0
    handle = blocks[layer].register_forward_hook(hook)
    bar = tqdm(total=max_tokens, desc=f"activations at block {layer}", unit="tok", disable=not progress)
    try:
        batch: list[list[int]] = []
        sequences = _packed_sequences(tokenizer, texts, seq_len, separator)
        exhausted = False
        while kept < max_tokens and not exhausted:
            check_stop(stop)
            batch = []
            for seq in sequences:
                batch.append(seq)
                if len(batch) == batch_size:
                    break
            else:
                exhausted = True
            if not batch:
                break
            ids = torch.full((len(batch), seq_len), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), seq_len), dtype=torch.long)
            for i, seq in enumerate(batch):
                ids[i, : len(seq)] = torch.tensor(seq)
                mask[i, : len(seq)] = 1
            captured.clear()
            with torch.inference_mode():
                try:
                    model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
                except _StopForward:
                    pass
            if not captured:
                raise RuntimeError(f"block {layer} did not run during the forward pass")
            hidden = captured[0].float().cpu()
            keep = mask.bool() & ~torch.isin(ids, special)
            flat = keep.flatten().nonzero().squeeze(1)
            flat = flat[: max_tokens - kept]
            acts.append(hidden.reshape(-1, hidden.shape[-1])[flat].half())
            positions.append(flat + sequences_done * seq_len)
            rows.append(ids)
            sequences_done += len(ids)
            kept += len(flat)
            bar.update(len(flat))
            if on_progress is not None:
                on_progress(kept)
    finally:
        handle.remove()
        bar.close()
    if kept == 0:
        raise ValueError("the texts gave no tokens to train on")
    return Activations(
        acts=torch.cat(acts), positions=torch.cat(positions), token_ids=torch.cat(rows), layer=layer
    )
