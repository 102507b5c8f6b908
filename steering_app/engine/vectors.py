"""Steering vectors from contrastive examples: one direction per concept for every block of the model.

For each block L the model reads every example; an example's representation x is the mean of its block-L
outputs over its non-special tokens (tokens "all") or its last one (tokens "last", repeng's reading). The first
position is left out: it is the attention sink, whose residual norm on SmolLM2 is ~100x every other's (25951
against ~180 at block 15) whatever its token, so it would outweigh the rest of the text in a mean.
- diffmean (DiffMean, CAA): u_L ∝ mean(x of positives) - mean(x of negatives).
- pca (repeng's pca_diff): u_L = the first principal component of the centred paired differences
  x_pos - x_neg, its sign turned toward the positives by majority over the pairs, as repeng does.
Then a_L = <mean(x+) - mean(x-), u_L>, the mean projection of the positives measured from the negatives' mean,
and the concept stores vectors[L] = a_L * u_L with offsets[L] = <mean(x-), u_L>. The raw projection <x, u>
would carry the residual stream's large common offset and say nothing about the property.

The separation report: for each block, a direction made from 80 % of the examples (every fifth held out), and
the threshold halfway between the two classes' mean projections on it; the held-out accuracy of that threshold.
The best layer is where it peaks: the middle of the widest run of consecutive blocks at the peak (the first such
run when two are as wide). A few held-out examples tie many blocks at 1.0 (six pairs: often all thirty), and a
text's last blocks separate almost any two sets (the planet pairs peak at 10-12 and again at 29), while steering
works best in the middle of the model and llama.cpp cannot steer block 0.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from steering_app.limits import MIN_VECTOR_EXAMPLES  # plain constants: the engine stays free of Django

from .layers import block_hidden, decoder_blocks
from .saes.sae import SAE, SAEFormatError, VectorSpace, load_sae, save_vector_space
from .steer import RowPlan, SpecError, SteeringSpec, plan_row
from .tokens import special_id_tensor, special_ids

METHODS = ("diffmean", "pca")
TOKEN_MODES = ("all", "last")
# Every fifth example is held out: the 80/20 split of the separation report. So each side needs five.
HELD_OUT_EVERY = MIN_EXAMPLES = MIN_VECTOR_EXAMPLES
BATCH_SIZE = 32

OnProgress = Callable[[float], None]


class VectorError(ValueError):
    """Examples no vector can be made from; ``field`` names the input at fault."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass
class Concept:
    name: str
    description: str
    vectors: torch.Tensor  # [num_layers, d] float32: a_L * u_L, the steering vector at c = 1 for each block
    offsets: (
        torch.Tensor
    )  # [num_layers] float32: <mean of negatives, u_L>, where projections start (0: imported)
    separation: list[float]  # held-out accuracy per block; [] for an imported concept
    best_layer: int
    info: dict = field(default_factory=dict)

    def as_cfg(self) -> dict:
        """What the checkpoint's cfg.json keeps of it (the tensors go to vectors.safetensors)."""
        return {
            "name": self.name,
            "description": self.description,
            "separation": self.separation,
            "best_layer": self.best_layer,
            "info": self.info,
        }


def make_concept(
    lm,
    name: str,
    description: str,
    positives: Sequence[str],
    negatives: Sequence[str],
    *,
    method: str = "diffmean",
    tokens: str = "all",
    paired: bool = False,
    on_progress: OnProgress | None = None,
) -> Concept:
    """The concept's vectors and separation report from examples with the property (positives) and without.

    lm: loader.LoadedModel. paired: positives[i] and negatives[i] form a pair (pca needs pairs)."""
    _check_examples(positives, negatives, method, tokens, paired)
    encoded = [
        _encode(lm.tokenizer, text, f"{side}[{position}]")
        for side, examples in (("positives", positives), ("negatives", negatives))
        for position, text in enumerate(examples)
    ]
    reps = representations(lm, encoded, tokens, on_progress)  # [texts, layers, d] float32
    positive, negative = reps[: len(positives)], reps[len(positives) :]
    held_out = torch.arange(len(positives)) % HELD_OUT_EVERY == HELD_OUT_EVERY - 1
    held_out_negative = torch.arange(len(negatives)) % HELD_OUT_EVERY == HELD_OUT_EVERY - 1
    separation = [
        round(
            _held_out_accuracy(positive[:, layer], negative[:, layer], held_out, held_out_negative, method), 4
        )
        for layer in range(reps.shape[1])
    ]
    best_layer = peak_layer(separation)
    vectors, offsets = [], []
    for layer in range(reps.shape[1]):
        unit = _direction(positive[:, layer], negative[:, layer], method)
        mean_negative = negative[:, layer].mean(0)
        scale = (positive[:, layer].mean(0) - mean_negative) @ unit
        vectors.append(scale * unit)
        offsets.append(mean_negative @ unit)
    info = {"method": method, "tokens": tokens, "positives": len(positives), "negatives": len(negatives)}
    return Concept(
        name, description, torch.stack(vectors), torch.stack(offsets), separation, best_layer, info
    )


def peak_layer(separation: Sequence[float]) -> int:
    """The middle of the widest run of consecutive layers at the peak accuracy (the first, between equals)."""
    peak = max(separation)
    best_start, best_width, start = 0, 0, None
    for layer, accuracy in enumerate([*separation, -1.0]):
        if accuracy == peak and start is None:
            start = layer
        elif accuracy != peak and start is not None:
            if layer - start > best_width:
                best_start, best_width = start, layer - start
            start = None
    return best_start + (best_width - 1) // 2


def _check_examples(positives, negatives, method: str, tokens: str, paired: bool) -> None:
    if method not in METHODS:
        raise VectorError("method", f"must be one of {', '.join(METHODS)}, got {method!r}")
    if tokens not in TOKEN_MODES:
        raise VectorError("tokens", f"must be one of {', '.join(TOKEN_MODES)}, got {tokens!r}")
    if method == "pca" and not paired:
        raise VectorError("pairs", "pca reads the differences of paired examples: give pairs")
    if paired and len(positives) != len(negatives):
        raise VectorError(
            "pairs", f"{len(positives)} positives and {len(negatives)} negatives do not pair up"
        )
    for side, examples in (("positives", positives), ("negatives", negatives)):
        if len(examples) < MIN_EXAMPLES:
            raise VectorError(
                side,
                f"needs at least {MIN_EXAMPLES} examples (one in {HELD_OUT_EVERY} is held out to measure "
                f"separation), got {len(examples)}",
            )
        for position, text in enumerate(examples):
            if not isinstance(text, str) or not text.strip():
                raise VectorError(f"{side}[{position}]", "is empty")


def _direction(positive: torch.Tensor, negative: torch.Tensor, method: str) -> torch.Tensor:
    """The unit direction [d] from examples [n, d] of each side (pca: row i of each is pair i)."""
    if method == "diffmean":
        direction = positive.mean(0) - negative.mean(0)
    else:
        differences = positive - negative
        centred = differences - differences.mean(0)
        direction = torch.linalg.svd(centred, full_matrices=False).Vh[0]
        higher = (positive @ direction > negative @ direction).sum()
        lower = (positive @ direction < negative @ direction).sum()
        if lower > higher:
            direction = -direction
    norm = direction.norm()
    return direction / norm if norm > 0 else direction


def _held_out_accuracy(positive, negative, held_out, held_out_negative, method: str) -> float:
    """At one block: the direction and threshold from the kept examples, their accuracy on the held-out ones."""
    if method == "pca":  # pairs stay together: both sides share the split
        held_out_negative = held_out
    unit = _direction(positive[~held_out], negative[~held_out_negative], method)
    threshold = ((positive[~held_out] @ unit).mean() + (negative[~held_out_negative] @ unit).mean()) / 2
    correct = (positive[held_out] @ unit > threshold).sum() + (
        negative[held_out_negative] @ unit <= threshold
    ).sum()
    return float(correct) / int(held_out.sum() + held_out_negative.sum())


def _encode(tokenizer, text: str, field: str) -> list[int]:
    ids = list(tokenizer(text).input_ids)
    if set(ids) <= special_ids(tokenizer):
        raise VectorError(field, "holds no token but special ones")
    return ids


def representations(
    lm, encoded: Sequence[list[int]], tokens: str, on_progress: OnProgress | None = None
) -> torch.Tensor:
    """[texts, num_layers, d] float32: each text's block outputs (its token ids in encoded), averaged over its
    non-special tokens (tokens "all") or its last non-special token (tokens "last"). Texts are read in
    right-padded batches: a causal model's real tokens never see the padding after them."""
    tokenizer, model = lm.tokenizer, lm.model
    special = special_id_tensor(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = []
    with lm.lock:
        for start in range(0, len(encoded), BATCH_SIZE):
            batch = encoded[start : start + BATCH_SIZE]
            width = max(len(ids) for ids in batch)
            ids = torch.tensor([row + [pad] * (width - len(row)) for row in batch])
            lengths = torch.tensor([len(row) for row in batch])
            real = torch.arange(width)[None, :] < lengths[:, None]
            keep = real & ~torch.isin(ids, special)
            # Not the attention sink at position 0, unless the text has no other token.
            keep[:, 0] &= keep[:, 1:].sum(dim=1) == 0
            outputs = all_block_outputs(model, ids.to(lm.device), real.long().to(lm.device))
            out.append(_pool(outputs, keep, tokens))
            if on_progress is not None:
                on_progress(min(1.0, (start + len(batch)) / len(encoded)))
    return torch.cat(out)


def _pool(outputs: torch.Tensor, keep: torch.Tensor, tokens: str) -> torch.Tensor:
    """outputs [layers, batch, seq, d] -> [batch, layers, d] over the kept positions."""
    outputs = outputs.float().cpu()
    if tokens == "last":
        last = (keep * torch.arange(keep.shape[1])).argmax(dim=1)
        return outputs[:, torch.arange(keep.shape[0]), last].transpose(0, 1)
    weights = keep.float() / keep.sum(dim=1, keepdim=True)
    return torch.einsum("lbsd,bs->bld", outputs, weights)


class _AfterLastBlock(Exception):
    """Raised once the last block has run: the final norm and the vocabulary projection are not needed."""


def all_block_outputs(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """[num_layers, batch, seq, d]: the output of every decoder block for a clean forward.

    The caller holds the model's lock: the hooks would otherwise read another call's forward."""
    blocks = decoder_blocks(model)
    captured: list[torch.Tensor] = []

    def hook(module, args, output):
        captured.append(block_hidden(output))
        if len(captured) == len(blocks):
            raise _AfterLastBlock

    handles = [block.register_forward_hook(hook) for block in blocks]
    try:
        with torch.inference_mode():
            model(input_ids, attention_mask=attention_mask, use_cache=False)
    except _AfterLastBlock:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack(captured)


def imported_concept(
    name: str, description: str, layer_vectors: dict[int, torch.Tensor], num_layers: int, source: str
) -> Concept:
    """A concept from a control vector file: its vector at each block it names (c = 1 applies it as the file
    does), zero elsewhere; projections start at 0, since there are no examples to measure from."""
    if not layer_vectors:
        raise VectorError("path", "the file holds no vector")
    d = next(iter(layer_vectors.values())).shape[-1]
    vectors = torch.zeros(num_layers, d)
    for layer, vector in layer_vectors.items():
        vectors[layer] = vector.float()
    best_layer = int(vectors.norm(dim=-1).argmax())
    return Concept(
        name, description, vectors, torch.zeros(num_layers), [], best_layer, {"imported_from": source}
    )


def save_space(path, concepts: Sequence[Concept], reading_layer: int, model_name: str) -> Path:
    """Write the concepts as one vector-space checkpoint directory; reading_layer is where its "feature
    activation" reads the projections (the best layer of its first concept, usually)."""
    cfg = {
        "hook_name": f"blocks.{reading_layer}.hook_resid_post",
        "model_name": model_name,
        "concepts": [concept.as_cfg() for concept in concepts],
    }
    vectors = torch.stack([concept.vectors for concept in concepts])
    offsets = torch.stack([concept.offsets for concept in concepts])
    return save_vector_space(path, vectors, offsets, cfg)


def load_concepts(path) -> tuple[list[Concept], int]:
    """The concepts of a vector-space checkpoint directory, and its reading layer."""
    space = load_sae(path, dtype=torch.float32)
    described = space.cfg.get("concepts")
    if not isinstance(space, VectorSpace) or not isinstance(described, list) or len(described) != space.d_sae:
        raise SAEFormatError(f"{path}: not a vector space with one cfg.json entry per concept")
    concepts = [
        Concept(
            str(entry.get("name", f"concept {index}")),
            str(entry.get("description", "")),
            space.vectors[index].clone(),
            space.offsets[index].clone(),
            list(entry.get("separation", [])),
            int(entry.get("best_layer", space.hook_layer)),
            dict(entry.get("info", {})),
        )
        for index, entry in enumerate(described)
    ]
    return concepts, space.hook_layer


def control_vector(sae: SAE, spec: SteeringSpec) -> dict[int, torch.Tensor]:
    """{block: sum_i c_i * a_i * d_i} of an additive spec over an SAE or a vector space: the per-layer vectors
    llama.cpp adds to the residual stream (float32; blocks where every coefficient is 0 are left out)."""
    if spec.method != "additive":
        raise SpecError(
            "method", "only additive steering is a fixed vector per layer; multiplicative depends on the text"
        )
    plan: RowPlan = plan_row(sae, sae.hook_layer or 0, spec)
    return {layer: delta.detach().float().cpu() for layer, delta in plan.additive}
