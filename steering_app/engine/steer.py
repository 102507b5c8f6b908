"""Steering specs, their validation, and the hooks that apply them.

h is the output of decoder block L (the residual stream after block L), at every position:
- additive:        h' = h + sum_i c_i * a_i * d_i        at each layer in spec.layers
- multiplicative:  h' = h + sum_i c_i * f_i(h) * d_i     only at the SAE's own layer
where d_i = W_dec[i], f_i is SAE latent i and a_i its recorded max activation (1 when unknown). A steering
vector (saes.sae.VectorSpace) has a vector per layer, a_{i,L} * u_{i,L}, its scale inside: a_i is 1 and d_i the
vector of the layer steered; it steers additively only.
Multiplicative steering is error-preserving: it equals h + dec(f') - dec(f) with f'_i = (1 + c_i) f_i,
so c = 0 changes nothing and the SAE's reconstruction error stays in the residual stream.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from steering_app.limits import (  # plain constants: the engine stays free of Django
    MAX_ABS_COEFFICIENT_HARD,
    MAX_FEATURES,
)

from .layers import block_hidden, replace_block_hidden
from .saes.sae import SAE, VectorSpace

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


def validate(spec: SteeringSpec, num_layers: int, sae: SAE, hidden_size: int, sae_layer: int | None) -> None:
    """Raise SpecError (a ValueError) naming the first invalid field. sae_layer: the SAE's layer in the model,
    None when unknown (multiplicative steering then refuses)."""
    if spec.method not in METHODS:
        raise SpecError("method", f"must be one of {', '.join(METHODS)}, got {spec.method!r}")
    if sae.d_in != hidden_size:
        raise SpecError("sae", f"SAE d_in {sae.d_in} does not match the model's hidden size {hidden_size}")
    if isinstance(sae, VectorSpace):
        _validate_vector_space(spec, sae, num_layers)
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


def _validate_vector_space(spec: SteeringSpec, space: VectorSpace, num_layers: int) -> None:
    if space.num_layers != num_layers:
        raise SpecError(
            "sae", f"the vector space has vectors for {space.num_layers} blocks, the model has {num_layers}"
        )
    if spec.method == "multiplicative":
        raise SpecError(
            "method", "a steering vector has no encoder to scale a feature by: only additive steering applies"
        )


@dataclass(frozen=True)
class RowPlan:
    """One batch row's steering as data, computed once per run: the hooks only index and add.

    additive: (layer, delta) pairs, delta = sum_i c_i * a_i * d_i [d_in], added at every position;
    multiplicative: (feature, coefficient) pairs applied at sae_layer as h + sum_i c_i * f_i(h) * d_i;
    capture: the features whose activations the row records at sae_layer, after its own steering.
    A clean row has neither additive nor multiplicative entries.
    """

    sae: SAE
    sae_layer: int
    additive: tuple[tuple[int, torch.Tensor], ...] = ()
    multiplicative: tuple[tuple[int, float], ...] = ()
    capture: tuple[int, ...] = ()
    steer_special_tokens: bool = False


def plan_row(sae: SAE, sae_layer: int, spec: SteeringSpec | None, capture: Iterable[int] = ()) -> RowPlan:
    """The row plan of spec (None: a clean row); zero coefficients take no part, so c = 0 is the clean row."""
    capture = tuple(int(index) for index in capture)
    if spec is None:
        return RowPlan(sae, sae_layer, capture=capture)
    active = _active_features(spec)
    additive, multiplicative = (), ()
    if active and spec.method == "additive":
        indices = [idx for idx, _ in active]
        weights = torch.tensor(
            [coef * spec.scale(idx) for idx, coef in active], dtype=sae.dtype, device=sae.device
        )
        additive = tuple((layer, weights @ sae.decoder_rows(indices, layer)) for layer in spec.layers)
    elif active:
        multiplicative = tuple(active)
    return RowPlan(sae, sae_layer, additive, multiplicative, capture, spec.steer_special_tokens)


def _active_features(spec: SteeringSpec) -> list[tuple[int, float]]:
    # A zero coefficient must leave h bit-identical, so such features take no part at all.
    return [(int(idx), float(coef)) for idx, coef in spec.features if coef != 0]


@dataclass
class _MultiplicativeGroup:
    """The rows steered multiplicatively through one SAE, padded to MAX_FEATURES features each.

    Every row has the same number of feature slots (unused ones have coefficient 0), so a row's
    numbers never depend on how many features the other rows steer.
    """

    sae: SAE
    member: torch.Tensor  # [rows] bool
    ids: torch.Tensor  # [rows, MAX_FEATURES] long
    coefficients: torch.Tensor  # [rows, MAX_FEATURES]
    decoder: torch.Tensor  # [rows, MAX_FEATURES, d_in]: W_dec[ids]
    encoder: tuple | None  # SAE.encoder_columns(ids)


@dataclass
class _CaptureGroup:
    """The rows recording features of one SAE at its layer; ids padded to `width` (read-only, no effect on h)."""

    sae: SAE
    rows: list[int]
    widths: list[int]
    ids: torch.Tensor  # [rows, width] long
    encoder: tuple | None  # SAE.encoder_columns(ids)


@dataclass
class _LayerOps:
    additive: torch.Tensor | None = None  # [rows, d_in]; zero for rows not steered here
    multiplicative: list[_MultiplicativeGroup] = field(default_factory=list)
    capture: list[_CaptureGroup] = field(default_factory=list)


# Steering structures a batch keeps, each with the CUDA graph of a step captured over its tensors
# (slots.SlotBatch._replay). A worker sees a handful (which layers, SAEs and capture widths its runs use), but
# every kept graph holds its tensors and its memory, so past this many the least recently used structure goes,
# graph included, and is built and captured again if it returns.
STRUCTURES_KEPT = 16


@dataclass
class _Structure:
    ops: dict[int, _LayerOps]
    protected: torch.Tensor  # [rows] bool: rows whose special tokens stay unsteered
    captured: object = None  # the CUDA graph of a step reading these tensors (set by SlotBatch._replay)


class RowSteering:
    """The steering of a batch whose rows may belong to different runs, as per-row tensors.

    Hooks sit only on the layers some row uses; a row not steered at a hooked layer gets h + 0 = h,
    bit for bit, and every operation is row-wise (elementwise, or batched over rows at a fixed shape),
    so a row's numbers depend only on its own plan. special_mask ([rows, seq] bool, True = special
    token) is set by the caller before each forward; special positions are not steered unless the row's
    plan asks. records() after a forward: {row: [seq, len(capture)]} for the rows that capture.

    The tensors the hooks read are updated in place while the plans keep their structure (signature():
    which layers, which SAEs, how wide the captures), so a captured CUDA graph of the step stays valid
    as runs join and leave; a new structure builds new tensors (and a new graph).
    """

    def __init__(self, blocks: torch.nn.ModuleList, rows: int):
        self.blocks = blocks
        self.rows = rows
        self.plans: list[RowPlan | None] = [None] * rows
        self.special_mask: torch.Tensor | None = None
        self.gathered: dict[tuple[int, int], torch.Tensor] = {}  # (layer, group) -> [rows, seq, width]
        self._handles: list = []
        self._ops: dict[int, _LayerOps] | None = None
        self._protected: torch.Tensor | None = None  # [rows] bool: rows whose special tokens stay unsteered
        self._by_signature: OrderedDict[tuple, _Structure] = OrderedDict()  # least recently used first
        self.structure: _Structure | None = None  # the one prepare() made current
        self._stale = True

    def assign(self, row: int, plan: RowPlan | None) -> None:
        self.plans[row] = plan
        self._stale = True

    def signature(self) -> tuple:
        """The plans' structure: hooked layers, SAE groups and capture widths (not the values)."""
        additive, multiplicative, capture = set(), set(), {}
        for plan in self.plans:
            if plan is None:
                continue
            additive.update(layer for layer, _ in plan.additive)
            if plan.multiplicative:
                multiplicative.add((id(plan.sae), plan.sae_layer))
            if plan.capture:
                key = (id(plan.sae), plan.sae_layer)
                capture[key] = max(capture.get(key, 0), _capture_width(len(plan.capture)))
        return tuple(sorted(additive)), tuple(sorted(multiplicative)), tuple(sorted(capture.items()))

    def prepare(self) -> None:
        """Bring the hooks' tensors up to date with the plans: in place when the structure is unchanged."""
        if not self._stale and self._ops is not None:
            return
        signature = self.signature()
        fresh = self._layer_ops()
        protected = self._protected_rows()
        kept = self._by_signature.get(signature)
        if kept is None:
            # Kept while it is among the STRUCTURES_KEPT last used: a captured graph of it reads these tensors.
            kept = self._by_signature[signature] = _Structure(fresh, protected)
            if len(self._by_signature) > STRUCTURES_KEPT:
                self._by_signature.popitem(last=False)
        else:
            _copy_ops(kept.ops, fresh)
            kept.protected.copy_(protected)
            self._by_signature.move_to_end(signature)
        self.structure = kept
        self._ops, self._protected = kept.ops, kept.protected
        self._stale = False

    def records(self) -> dict[int, torch.Tensor]:
        """The last forward's captured activations per row: views into the gathered tensors."""
        records = {}
        for layer, ops in (self._ops or {}).items():
            for index, group in enumerate(ops.capture):
                gathered = self.gathered.get((layer, index))
                if gathered is None:
                    continue
                for row, width in zip(group.rows, group.widths):
                    records[row] = gathered[row, :, :width]
        return records

    @contextmanager
    def attached(self) -> Iterator[RowSteering]:
        """Hooks on for the duration; removed on any exit, KeyboardInterrupt included."""
        self.begin()
        try:
            for layer in self._ops:
                self._handles.append(self.blocks[layer].register_forward_hook(self._hook(layer)))
            yield self
        finally:
            for handle in self._handles:
                handle.remove()
            self._handles.clear()

    def begin(self) -> None:
        """Ready for one forward that calls steer() itself between blocks (lean.py), without hooks."""
        self.prepare()
        self.gathered = {}

    def steer(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """Block `layer`'s output hidden [rows, seq, d] after this forward's steering (itself if none)."""
        ops = self._ops.get(layer)
        if ops is None:
            return hidden
        count = hidden.shape[0]
        if count > self.rows:
            raise RuntimeError(f"steering planned for {self.rows} rows, the forward has {count}")
        # A step over the first rows only (SlotBatch.step) is padded back to all rows here, so the SAE's
        # matmuls keep their shape and a row's numbers stay independent of how many rows ran.
        padded, special_mask = hidden, self.special_mask
        if count < self.rows:
            padded = _pad_rows(hidden, self.rows)
            special_mask = None if special_mask is None else _pad_rows(special_mask, self.rows)
        steered = padded
        if ops.additive is not None:
            steered = steered + ops.additive.to(hidden.dtype).unsqueeze(1)
        for group in ops.multiplicative:
            selected = group.sae.encode_rows(steered, group.ids, group.encoder)
            delta = torch.bmm(selected * group.coefficients.unsqueeze(1), group.decoder).to(hidden.dtype)
            steered = torch.where(group.member[:, None, None], steered + delta, steered)
        if steered is not padded and special_mask is not None:
            keep = special_mask.to(hidden.device) & self._protected.unsqueeze(1)
            steered = torch.where(keep.unsqueeze(-1), padded, steered)
        for index, group in enumerate(ops.capture):
            activations = group.sae.encode_rows(steered, group.ids, group.encoder)
            self.gathered[(layer, index)] = activations.float()
        return hidden if steered is padded else steered[:count]

    def _layer_ops(self) -> dict[int, _LayerOps]:
        ops: dict[int, _LayerOps] = {}
        by_sae: dict[tuple[int, int], list[int]] = {}
        captures: dict[tuple[int, int], list[int]] = {}
        for row, plan in enumerate(self.plans):
            if plan is None:
                continue
            for layer, delta in plan.additive:
                layer_ops = ops.setdefault(layer, _LayerOps())
                if layer_ops.additive is None:
                    layer_ops.additive = delta.new_zeros(self.rows, delta.shape[-1])
                layer_ops.additive[row] = delta
            if plan.multiplicative:
                by_sae.setdefault((id(plan.sae), plan.sae_layer), []).append(row)
            if plan.capture:
                captures.setdefault((id(plan.sae), plan.sae_layer), []).append(row)
        for (_, layer), rows in sorted(by_sae.items()):
            ops.setdefault(layer, _LayerOps()).multiplicative.append(self._multiplicative_group(rows))
        for (_, layer), rows in sorted(captures.items()):
            ops.setdefault(layer, _LayerOps()).capture.append(self._capture_group(rows))
        return dict(sorted(ops.items()))

    def _multiplicative_group(self, rows: list[int]) -> _MultiplicativeGroup:
        sae = self.plans[rows[0]].sae
        ids = torch.zeros(self.rows, MAX_FEATURES, dtype=torch.long, device=sae.device)
        coefficients = torch.zeros(self.rows, MAX_FEATURES, dtype=sae.dtype, device=sae.device)
        member = torch.zeros(self.rows, dtype=torch.bool, device=sae.device)
        for row in rows:
            features = self.plans[row].multiplicative
            ids[row, : len(features)] = torch.tensor([idx for idx, _ in features])
            coefficients[row, : len(features)] = torch.tensor([coef for _, coef in features])
            member[row] = True
        return _MultiplicativeGroup(sae, member, ids, coefficients, sae.W_dec[ids], sae.encoder_columns(ids))

    def _capture_group(self, rows: list[int]) -> _CaptureGroup:
        sae = self.plans[rows[0]].sae
        widths = [len(self.plans[row].capture) for row in rows]
        ids = torch.zeros(self.rows, _capture_width(max(widths)), dtype=torch.long, device=sae.device)
        for row in rows:
            features = self.plans[row].capture
            ids[row, : len(features)] = torch.tensor(features)
        return _CaptureGroup(sae, rows, widths, ids, sae.encoder_columns(ids))

    def _protected_rows(self) -> torch.Tensor:
        device = next((plan.sae.device for plan in self.plans if plan is not None), torch.device("cpu"))
        return torch.tensor(
            [plan is not None and not plan.steer_special_tokens for plan in self.plans], device=device
        )

    def _hook(self, layer: int):
        def hook(module, args, output):
            hidden = block_hidden(output)
            steered = self.steer(layer, hidden)
            return None if steered is hidden else replace_block_hidden(output, steered)

        return hook


def _pad_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """tensor [count, ...] with zero rows appended up to `rows`."""
    return torch.cat([tensor, tensor.new_zeros(rows - tensor.shape[0], *tensor.shape[1:])])


def _capture_width(width: int) -> int:
    """Capture widths rounded up to a power of two (at least 8), so that most runs share a structure."""
    return max(8, 1 << (max(width, 1) - 1).bit_length())


def _copy_ops(target: dict[int, _LayerOps], source: dict[int, _LayerOps]) -> None:
    """Copy the values of source into target's tensors (the same structure): the hooks keep their tensors."""
    for layer, ops in source.items():
        kept = target[layer]
        if ops.additive is not None:
            kept.additive.copy_(ops.additive)
        for old, new in zip(kept.multiplicative, ops.multiplicative):
            old.member.copy_(new.member)
            old.ids.copy_(new.ids)
            old.coefficients.copy_(new.coefficients)
            old.decoder.copy_(new.decoder)
            _copy_tensors(old.encoder, new.encoder)
        for old, new in zip(kept.capture, ops.capture):
            old.ids.copy_(new.ids)
            _copy_tensors(old.encoder, new.encoder)
            old.rows, old.widths = new.rows, new.widths


def _copy_tensors(target: tuple | None, source: tuple | None) -> None:
    for old, new in zip(target or (), source or ()):
        if old is not None:
            old.copy_(new)
