"""Feature calibration: measure an existing SAE's features on a corpus.

calibrate_features streams texts through the model up to the SAE's layer (collect_activations), encodes
them with the SAE in batches and describes every latent (describe_features): max activation, activation
frequency, top tokens, the strongest snippets with the token marked «like this», and a label made from the
top tokens. An imported SAE without a feature table gets its steering scales (a_i = max activation) this way.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ..training.activations import collect_activations
from ..training.describe import describe_features
from ..training.stop import StopCheck

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from ..saes.sae import SAE


@dataclass
class CalibrationResult:
    features: list[dict]  # describe_features' entries, one per latent, in index order
    tokens: int
    timings: dict = field(default_factory=dict)


class _EncodeOnDevice:
    """The SAE as describe_features sees it: activations (kept on the CPU) are encoded on the SAE's device."""

    def __init__(self, sae: SAE):
        self.sae = sae
        self.W_dec = sae.W_dec

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.sae.encode(x.to(self.sae.W_dec.device)).cpu()


def calibrate_features(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    sae: SAE,
    texts: Iterable[str],
    layer: int,
    *,
    tokens: int,
    progress: bool = True,
    stop: StopCheck = None,
    **reading,
) -> CalibrationResult:
    """Describe every latent of sae over the first `tokens` non-special tokens of texts at block layer.

    reading: how collect_activations reads them (seq_len, batch_size, and on_progress, which receives the number
    of tokens streamed so far after each batch); stop() ends the work with TrainingInterrupted. A latent that
    never fires has max activation 0 and frequency 0 (dead).
    """
    timings = {}
    started = time.perf_counter()
    activations = collect_activations(
        model, tokenizer, texts, layer, max_tokens=tokens, progress=progress, stop=stop, **reading
    )
    timings["collect_s"] = round(time.perf_counter() - started, 1)
    started = time.perf_counter()
    features = describe_features(_EncodeOnDevice(sae), activations, tokenizer, progress=progress, stop=stop)
    timings["describe_s"] = round(time.perf_counter() - started, 1)
    for entry in features:
        if entry["activation_frequency"] == 0:
            entry["description"] = f"Never active on the {activations.num_tokens} calibration tokens (dead)."
    return CalibrationResult(features=features, tokens=activations.num_tokens, timings=timings)
