"""Feature spaces: sparse autoencoders in the SAELens layout, and steering-vector spaces. Load, validate,
encode, decode, save.

An SAE checkpoint is a directory holding ``cfg.json`` and ``sae_weights.safetensors`` with
W_enc [d_in, d_sae], W_dec [d_sae, d_in], b_enc [d_sae], b_dec [d_in] and, for jumprelu,
threshold [d_sae].

A vector-space checkpoint (cfg.json's architecture "vectors", made by engine/vectors.py) holds
``vectors.safetensors`` with vectors [d_sae, num_layers, d_in] and offsets [d_sae, num_layers]: one direction
per concept for every block of the model. load_sae reads either, and a VectorSpace is an SAE to the rest of
the engine.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from steering_app import json_checks

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
ARCHITECTURES = ("standard", "topk", "jumprelu")
VECTORS_ARCHITECTURE = "vectors"
VECTORS_FILE = "vectors.safetensors"

_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}

_HOOK_NAME = re.compile(r"^blocks\.(\d+)\.hook_resid_(pre|post)$")


class SAEFormatError(ValueError):
    """The checkpoint is not a usable SAELens SAE; the message names the problem."""


def hook_layer_from_name(hook_name: str) -> int:
    """Index of the decoder block whose output the hook reads.

    ``blocks.L.hook_resid_post`` is the output of block L; ``blocks.L.hook_resid_pre`` is the
    input of block L, i.e. the output of block L-1.
    """
    match = _HOOK_NAME.match(hook_name or "")
    if not match:
        raise SAEFormatError(
            f"hook_name {hook_name!r} is not a residual-stream hook "
            "(expected blocks.<L>.hook_resid_post or blocks.<L>.hook_resid_pre)"
        )
    layer = int(match.group(1))
    if match.group(2) == "post":
        return layer
    if layer == 0:
        raise SAEFormatError("hook_name blocks.0.hook_resid_pre reads the embeddings, not a block output")
    return layer - 1


def parse_dtype(name: object) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    key = str(name).removeprefix("torch.")
    if key not in _DTYPES:
        raise SAEFormatError(f"cfg.json: unsupported dtype {name!r}")
    return _DTYPES[key]


class SAE(torch.nn.Module):
    def __init__(
        self,
        cfg: dict,
        W_enc: torch.Tensor,
        W_dec: torch.Tensor,
        b_enc: torch.Tensor,
        b_dec: torch.Tensor,
        threshold: torch.Tensor | None = None,
    ):
        super().__init__()
        self.cfg = cfg
        self.d_in = int(cfg["d_in"])
        self.d_sae = int(cfg["d_sae"])
        self.architecture = cfg.get("architecture", "standard")
        self.k = int(cfg["k"]) if self.architecture == "topk" else None
        self.apply_b_dec_to_input = bool(cfg.get("apply_b_dec_to_input", False))
        self.W_enc = torch.nn.Parameter(W_enc, requires_grad=False)
        self.W_dec = torch.nn.Parameter(W_dec, requires_grad=False)
        self.b_enc = torch.nn.Parameter(b_enc, requires_grad=False)
        self.b_dec = torch.nn.Parameter(b_dec, requires_grad=False)
        if threshold is not None:
            self.threshold = torch.nn.Parameter(threshold, requires_grad=False)
        else:
            self.threshold = None

    @property
    def hook_name(self) -> str | None:
        metadata = self.cfg.get("metadata") or {}
        return metadata.get("hook_name") or self.cfg.get("hook_name")

    @property
    def hook_layer(self) -> int | None:
        """The block whose output this SAE reads, when cfg.json says so."""
        name = self.hook_name
        return hook_layer_from_name(name) if name else None

    @property
    def dtype(self) -> torch.dtype:
        return self.W_dec.dtype

    @property
    def device(self) -> torch.device:
        return self.W_dec.device

    def _sae_in(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.dtype)
        return x - self.b_dec if self.apply_b_dec_to_input else x

    def _activate(self, pre: torch.Tensor, threshold: torch.Tensor | None) -> torch.Tensor:
        if self.architecture == "jumprelu":
            return pre * (pre > threshold)
        return torch.relu(pre)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Latent activations f(x), shape [..., d_sae]."""
        pre = self._sae_in(x) @ self.W_enc + self.b_enc
        if self.architecture == "topk":
            values, indices = pre.topk(self.k, dim=-1)
            return torch.zeros_like(pre).scatter(-1, indices, torch.relu(values))
        return self._activate(pre, self.threshold)

    def encode_features(self, x: torch.Tensor, indices: Iterable[int]) -> torch.Tensor:
        """Activations of the given latents only, shape [..., len(indices)].

        Standard and jumprelu latents are independent of each other, so only their encoder
        columns are needed; a topk latent depends on all the others.
        """
        idx = torch.as_tensor(list(indices), dtype=torch.long, device=self.device)
        if self.architecture == "topk":
            return self.encode(x).index_select(-1, idx)
        pre = self._sae_in(x) @ self.W_enc.index_select(1, idx) + self.b_enc.index_select(0, idx)
        threshold = self.threshold.index_select(0, idx) if self.threshold is not None else None
        return self._activate(pre, threshold)

    def encoder_columns(self, ids: torch.Tensor) -> tuple | None:
        """What encode_rows needs for per-row latents ids [R, W]: (W_enc's columns [R, d_in, W], b_enc [R, W],
        threshold [R, W] or None), or None for a topk SAE, whose latents depend on all the others."""
        if self.architecture == "topk":
            return None
        columns = self.W_enc.T[ids].transpose(1, 2).contiguous()
        threshold = self.threshold[ids] if self.threshold is not None else None
        return columns, self.b_enc[ids], threshold

    def encode_rows(self, x: torch.Tensor, ids: torch.Tensor, columns: tuple | None) -> torch.Tensor:
        """Activations [R, seq, W] of each row's own latents ids [R, W] for x [R, seq, d_in]; columns from
        encoder_columns(ids): then only those W columns of the encoder are multiplied, not all d_sae."""
        if columns is None:
            return self.encode(x).gather(-1, ids.unsqueeze(1).expand(-1, x.shape[1], -1))
        weights, bias, threshold = columns
        pre = torch.bmm(self._sae_in(x), weights) + bias.unsqueeze(1)
        return self._activate(pre, None if threshold is None else threshold.unsqueeze(1))

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return f.to(self.dtype) @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    def decoder_rows(self, indices: list[int], layer: int) -> torch.Tensor:
        """d_i [len(indices), d_in]: what additive steering adds per unit of c_i * a_i at block `layer`. An SAE
        has one decoder row per latent, whatever the layer."""
        return self.W_dec[indices]


class VectorSpace(SAE):
    """Steering directions, one per concept, with a vector for every block of the model.

    vectors[i, L] = a_{i,L} * u_{i,L}: the unit direction u at block L times a, the mean projection of the
    examples with the property, measured from the mean of those without it (offsets[i, L] = <mean negative, u>).
    c = 1 therefore adds the property as strongly as the examples hold it, the meaning c has for an SAE feature.

    To the rest of the engine it is an SAE read at its reading layer R (cfg's hook_name): W_dec[i] = vectors[i, R],
    and encode(h)_i = (<h, u_{i,R}> - offsets[i, R]) / a_{i,R}, a signed projection that reads 0 like the
    negatives and 1 like the positives. Only additive steering applies: there is no sparse code to scale.
    """

    def __init__(self, cfg: dict, vectors: torch.Tensor, offsets: torch.Tensor):
        reading = hook_layer_from_name(cfg["hook_name"])
        rows = vectors[:, reading]
        scale = rows.norm(dim=-1)
        # A concept imported without a vector at the reading layer reads 0 there rather than dividing by zero.
        known = scale > 0
        safe = torch.where(known, scale, torch.ones_like(scale))
        W_enc = torch.where(known[:, None], rows / (safe * safe)[:, None], torch.zeros_like(rows)).T
        b_enc = torch.where(known, -offsets[:, reading] / safe, torch.zeros_like(scale))
        super().__init__(cfg, W_enc.contiguous(), rows.clone(), b_enc, torch.zeros_like(rows[0]))
        self.vectors = torch.nn.Parameter(vectors, requires_grad=False)
        self.offsets = torch.nn.Parameter(offsets, requires_grad=False)

    @property
    def num_layers(self) -> int:
        return self.vectors.shape[1]

    def _activate(self, pre: torch.Tensor, threshold: torch.Tensor | None) -> torch.Tensor:
        return pre

    def decoder_rows(self, indices: list[int], layer: int) -> torch.Tensor:
        return self.vectors[indices, layer]


def _read_cfg(path: Path) -> dict:
    cfg_path = path / CFG_FILE
    if not cfg_path.is_file():
        raise SAEFormatError(f"{cfg_path}: missing file {CFG_FILE}")
    try:
        cfg = json_checks.loads(cfg_path.read_bytes())
    except json_checks.MalformedJSON as exc:  # too deep to parse safely, or text no database stores
        raise SAEFormatError(f"{cfg_path}: {exc}") from exc
    except ValueError as exc:  # not JSON, or not UTF-8
        raise SAEFormatError(f"{cfg_path}: malformed cfg.json ({exc})") from exc
    if not isinstance(cfg, dict):
        raise SAEFormatError(f"{cfg_path}: malformed cfg.json (top level is not an object)")
    return cfg


def validate_cfg(cfg: dict) -> dict:
    """Check cfg.json's keys; return it with SAELens defaults filled in."""
    cfg = dict(cfg)
    for key in ("d_in", "d_sae"):
        if key not in cfg:
            raise SAEFormatError(f"cfg.json: missing key {key!r}")
        if not isinstance(cfg[key], int) or isinstance(cfg[key], bool) or cfg[key] < 1:
            raise SAEFormatError(f"cfg.json: {key} must be a positive integer, got {cfg[key]!r}")
    cfg.setdefault("architecture", "standard")
    if cfg["architecture"] not in ARCHITECTURES:
        raise SAEFormatError(
            f"cfg.json: unknown architecture {cfg['architecture']!r} (supported: {', '.join(ARCHITECTURES)})"
        )
    if cfg["architecture"] == "topk":
        k = cfg.get("k")
        if k is None:
            raise SAEFormatError("cfg.json: missing key 'k' (required by architecture topk)")
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= cfg["d_sae"]:
            raise SAEFormatError(f"cfg.json: k must be an integer in [1, d_sae], got {k!r}")
    normalize = cfg.get("normalize_activations")
    if normalize not in (None, "none"):
        raise SAEFormatError(f"cfg.json: normalize_activations {normalize!r} is not supported (only 'none')")
    cfg.setdefault("apply_b_dec_to_input", False)
    cfg.setdefault("dtype", "float32")
    parse_dtype(cfg["dtype"])
    if "metadata" in cfg and not isinstance(cfg["metadata"], dict):
        raise SAEFormatError("cfg.json: metadata must be an object")
    # An import stores the hook name, and hook_layer_from_name matches it as text.
    for where, hook_name in (
        ("metadata.hook_name", cfg.get("metadata", {}).get("hook_name")),
        ("hook_name", cfg.get("hook_name")),
    ):
        if hook_name is not None and not isinstance(hook_name, str):
            raise SAEFormatError(f"cfg.json: {where}: must be text, got {hook_name!r:.40}")
    return cfg


def _expected_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    d_in, d_sae = cfg["d_in"], cfg["d_sae"]
    shapes = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_enc": (d_sae,), "b_dec": (d_in,)}
    if cfg["architecture"] == "jumprelu":
        shapes["threshold"] = (d_sae,)
    return shapes


def load_sae(
    path: os.PathLike | str, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
) -> SAE:
    """Load an SAELens checkpoint directory, or a vector space's; raise SAEFormatError naming what is wrong."""
    path = Path(path)
    if not path.is_dir():
        raise SAEFormatError(
            f"{path}: not a directory (an SAE is a directory with {CFG_FILE} and {WEIGHTS_FILE})"
        )
    cfg = _read_cfg(path)
    if cfg.get("architecture") == VECTORS_ARCHITECTURE:
        return _load_vector_space(path, cfg, device, dtype or torch.float32)
    cfg = validate_cfg(cfg)
    weights_path = path / WEIGHTS_FILE
    if not weights_path.is_file():
        raise SAEFormatError(f"{weights_path}: missing file {WEIGHTS_FILE}")
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise SAEFormatError(f"{weights_path}: unreadable safetensors file ({exc})") from exc
    _check_tensors(tensors, cfg, WEIGHTS_FILE)
    dtype = dtype or parse_dtype(cfg["dtype"])
    moved = {name: tensors[name].to(device=device, dtype=dtype) for name in _expected_shapes(cfg)}
    return SAE(cfg, **moved)


def _load_vector_space(path: Path, cfg: dict, device, dtype: torch.dtype) -> VectorSpace:
    cfg = validate_vectors_cfg(cfg)
    weights_path = path / VECTORS_FILE
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise SAEFormatError(f"{weights_path}: unreadable or missing safetensors file ({exc})") from exc
    shapes = {
        "vectors": (cfg["d_sae"], cfg["num_layers"], cfg["d_in"]),
        "offsets": (cfg["d_sae"], cfg["num_layers"]),
    }
    for name, shape in shapes.items():
        if name not in tensors or tuple(tensors[name].shape) != shape:
            found = list(tensors[name].shape) if name in tensors else "none"
            raise SAEFormatError(f"{weights_path}: tensor {name} has shape {found}, expected {list(shape)}")
        if not torch.isfinite(tensors[name]).all():
            raise SAEFormatError(f"{weights_path}: tensor {name} holds NaN or infinite values")
    moved = {name: tensors[name].to(device=device, dtype=dtype) for name in shapes}
    return VectorSpace(cfg, **moved)


def validate_vectors_cfg(cfg: dict) -> dict:
    """A vector space's cfg.json: d_in, d_sae (concepts) and num_layers positive, hook_name a block's output
    inside the model."""
    for key in ("d_in", "d_sae", "num_layers"):
        value = cfg.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise SAEFormatError(f"cfg.json: {key} must be a positive integer, got {value!r}")
    reading = hook_layer_from_name(cfg.get("hook_name") if isinstance(cfg.get("hook_name"), str) else "")
    if reading >= cfg["num_layers"]:
        raise SAEFormatError(
            f"cfg.json: hook_name {cfg['hook_name']!r} is past the last of {cfg['num_layers']} blocks"
        )
    return cfg


def save_vector_space(
    path: os.PathLike | str, vectors: torch.Tensor, offsets: torch.Tensor, cfg: dict
) -> Path:
    """Write a vector-space checkpoint directory (cfg.json + vectors.safetensors), float32."""
    path = Path(path)
    cfg = {
        **cfg,
        "architecture": VECTORS_ARCHITECTURE,
        "d_sae": int(vectors.shape[0]),
        "num_layers": int(vectors.shape[1]),
        "d_in": int(vectors.shape[2]),
        "dtype": "float32",
    }
    validate_vectors_cfg(cfg)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {"vectors": vectors, "offsets": offsets}
    save_file(
        {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()},
        str(path / VECTORS_FILE),
    )
    (path / CFG_FILE).write_text(json.dumps(cfg, indent=2))
    return path


def _check_tensors(tensors: dict, cfg: dict, where: str) -> None:
    """Every tensor the architecture needs is there, with the shape cfg's d_in and d_sae give it."""
    for name, shape in _expected_shapes(cfg).items():
        if name not in tensors:
            raise SAEFormatError(f"{where}: missing tensor {name!r}")
        if tuple(tensors[name].shape) != shape:
            raise SAEFormatError(
                f"{where}: tensor {name} has shape {list(tensors[name].shape)}, expected {list(shape)}"
            )


def save_sae(
    path: os.PathLike | str,
    W_enc: torch.Tensor,
    W_dec: torch.Tensor,
    b_enc: torch.Tensor,
    b_dec: torch.Tensor,
    cfg: dict,
    threshold: torch.Tensor | None = None,
) -> Path:
    """Write an SAELens checkpoint directory (cfg.json + sae_weights.safetensors)."""
    path = Path(path)
    cfg = dict(cfg)
    cfg.setdefault("d_in", int(W_enc.shape[0]))
    cfg.setdefault("d_sae", int(W_enc.shape[1]))
    cfg.setdefault("architecture", "jumprelu" if threshold is not None else "standard")
    cfg.setdefault("dtype", str(W_enc.dtype).removeprefix("torch."))
    cfg.setdefault("normalize_activations", "none")
    cfg = validate_cfg(cfg)
    tensors = {"W_enc": W_enc, "W_dec": W_dec, "b_enc": b_enc, "b_dec": b_dec}
    if threshold is not None:
        tensors["threshold"] = threshold
    _check_tensors(tensors, cfg, "save_sae")
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(path / WEIGHTS_FILE))
    (path / CFG_FILE).write_text(json.dumps(cfg, indent=2))
    return path
