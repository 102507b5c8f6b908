"""Steering specs, their validation, and the hooks that apply them.

h is the output of decoder block L (the residual stream after block L), at every position:
- additive:        h' = h + sum_i c_i * a_i * d_i        at each layer in spec.layers
- multiplicative:  h' = h + sum_i c_i * f_i(h) * d_i     only at the SAE's own layer
where d_i = W_dec[i], f_i is SAE latent i and a_i its recorded max activation (1 when unknown).
Multiplicative steering is error-preserving: it equals h + dec(f') - dec(f) with f'_i = (1 + c_i) f_i,
so c = 0 changes nothing and the SAE's reconstruction error stays in the residual stream.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from steering_app.limits import MAX_ABS_COEFFICIENT_HARD  # plain constants: the engine stays free of Django

from .layers import block_hidden, replace_block_hidden
from .sae import SAE

METHODS = ("additive", "multiplicative")


class SpecError(ValueError):
    """An invalid steering request; ``field`` names the offending input."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class SteeringSpec:
    method: str
    features: tuple[tuple[int, float], ...]
    layers: tuple[int, ...]
    feature_scales: dict[int, float] | None = None
    steer_special_tokens: bool = False

    def __post_init__(self):
        # Accept lists (JSON) but store tuples, so a spec cannot change while hooks read it.
        object.__setattr__(self, "features", tuple((idx, coef) for idx, coef in self.features))
        object.__setattr__(self, "layers", tuple(self.layers))

    @property
    def feature_ids(self) -> tuple[int, ...]:
        return tuple(int(idx) for idx, _ in self.features)

    def scale(self, index: int) -> float:
        """a_i: the feature's recorded max activation, 1 when unknown."""
        if not self.feature_scales:
            return 1.0
        value = self.feature_scales.get(index, self.feature_scales.get(str(index)))
        return 1.0 if value is None else float(value)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate(
    spec: SteeringSpec,
    num_layers: int,
    sae: SAE,
    *,
    hidden_size: int | None = None,
    sae_layer: int | None = None,
) -> None:
    """Raise SpecError (a ValueError) naming the first invalid field."""
    if spec.method not in METHODS:
        raise SpecError("method", f"must be one of {', '.join(METHODS)}, got {spec.method!r}")
    if hidden_size is not None and sae.d_in != hidden_size:
        raise SpecError("sae", f"SAE d_in {sae.d_in} does not match the model's hidden size {hidden_size}")
    if sae_layer is not None and not (_is_int(sae_layer) and 0 <= sae_layer < num_layers):
        raise SpecError("sae_layer", f"{sae_layer!r} is out of range [0, {num_layers - 1}]")
    seen = set()
    for position, item in enumerate(spec.features):
        index, coefficient = item
        if not _is_int(index) or not 0 <= index < sae.d_sae:
            raise SpecError(
                f"features[{position}].feature_id", f"{index!r} is out of range [0, {sae.d_sae - 1}] (d_sae)"
            )
        if index in seen:
            raise SpecError(f"features[{position}].feature_id", f"feature {index} is listed twice")
        seen.add(index)
        if isinstance(coefficient, bool) or not isinstance(coefficient, (int, float)):
            raise SpecError(f"features[{position}].coefficient", f"must be a number, got {coefficient!r}")
        if not math.isfinite(coefficient):
            raise SpecError(f"features[{position}].coefficient", f"must be finite, got {coefficient!r}")
        if abs(coefficient) > MAX_ABS_COEFFICIENT_HARD:
            raise SpecError(
                f"features[{position}].coefficient",
                f"|{coefficient}| exceeds the limit of {MAX_ABS_COEFFICIENT_HARD:g}",
            )
        scale = spec.scale(index)
        if not math.isfinite(scale) or scale < 0:
            raise SpecError(
                "feature_scales", f"scale of feature {index} must be finite and >= 0, got {scale!r}"
            )
    if not spec.layers:
        raise SpecError("layers", "at least one intervention layer is required")
    for layer in spec.layers:
        if not _is_int(layer) or not 0 <= layer < num_layers:
            raise SpecError("layers", f"layer {layer!r} is out of range [0, {num_layers - 1}]")
    if len(set(spec.layers)) != len(spec.layers):
        raise SpecError("layers", f"{list(spec.layers)} lists a layer twice")
    if spec.method == "multiplicative":
        if sae_layer is None:
            raise SpecError("sae_layer", "multiplicative steering needs the SAE's layer")
        if tuple(spec.layers) != (sae_layer,):
            raise SpecError(
                "layers",
                f"multiplicative steering acts only at the SAE's layer {sae_layer}, got {list(spec.layers)}",
            )


@dataclass
class SteeringControl:
    """Per-forward state the caller updates: which positions are special tokens (never steered).

    special_mask: bool tensor broadcastable to [batch, seq] for the next forward (True = special),
    or None when no position is special.
    """

    special_mask: torch.Tensor | None = None
    enabled: bool = True
    handles: list = field(default_factory=list)


def _active_features(spec: SteeringSpec) -> list[tuple[int, float]]:
    # A zero coefficient must leave h bit-identical, so such features take no part at all.
    return [(int(idx), float(coef)) for idx, coef in spec.features if coef != 0]


@contextmanager
def steering_hooks(
    blocks: torch.nn.ModuleList,
    sae: SAE,
    spec: SteeringSpec,
    sae_layer: int | None,
    rows: Iterable[int] = (1,),
    special_mask: torch.Tensor | None = None,
) -> Iterator[SteeringControl]:
    """Register the steering hooks for one call; they are removed on any exit, KeyboardInterrupt included.

    rows: the batch rows to steer (the others stay clean). Yields a SteeringControl whose
    special_mask the caller sets before each forward.
    """
    control = SteeringControl(special_mask=special_mask)
    active = _active_features(spec)
    rows = tuple(rows)
    try:
        if active and rows:
            hook = _make_hook(sae, spec, active, rows, control)
            for layer in spec.layers:
                control.handles.append(blocks[layer].register_forward_hook(hook))
        yield control
    finally:
        for handle in control.handles:
            handle.remove()
        control.handles.clear()


def _make_hook(sae: SAE, spec: SteeringSpec, active, rows, control: SteeringControl):
    indices = [idx for idx, _ in active]
    decoder = sae.W_dec[indices]  # [k, d_in]
    coefficients = torch.tensor([coef for _, coef in active], dtype=sae.dtype, device=sae.device)
    if spec.method == "additive":
        scales = torch.tensor([spec.scale(idx) for idx in indices], dtype=sae.dtype, device=sae.device)
        additive_delta = (coefficients * scales) @ decoder  # [d_in], the same at every position

    def hook(module, args, output):
        if not control.enabled:
            return None
        hidden = block_hidden(output)
        batch = hidden.shape[0]
        steered_rows = [row for row in rows if row < batch]
        if not steered_rows:
            return None
        selected = hidden[steered_rows]
        if spec.method == "additive":
            delta = additive_delta.to(hidden.dtype)
            updated = selected + delta
        else:
            activations = sae.encode_features(selected, indices)  # [r, seq, k]
            delta = ((activations * coefficients) @ decoder).to(hidden.dtype)
            updated = selected + delta
        mask = control.special_mask
        if mask is not None and not spec.steer_special_tokens:
            mask = torch.as_tensor(mask, device=hidden.device, dtype=torch.bool)
            if mask.dim() == 1:
                mask = mask.unsqueeze(0)
            if mask.shape[0] > 1:
                mask = mask[steered_rows]
            updated = torch.where(mask.unsqueeze(-1), selected, updated)
        new_hidden = hidden.clone()
        new_hidden[steered_rows] = updated
        return replace_block_hidden(output, new_hidden)

    return hook
