"""SAE checkpoint layouts other than SAELens's, converted once into it.

A folder is recognised by the files in it:

- SAELens: ``cfg.json`` + ``sae_weights.safetensors``; used as it is.
- Gemma Scope: ``params.npz`` (Gemma Scope 2: ``params.safetensors``) with W_enc [d_in, d_sae],
  W_dec [d_sae, d_in], b_enc [d_sae], b_dec [d_in], threshold [d_sae] (JumpReLU). The arrays already
  are SAELens's; only cfg.json is written. The layer comes from ``--layer`` or from the folder path
  (``layer_20/width_16k/average_l0_71``).
- Llama Scope (OpenMOSS lm-saes): ``hyperparams.json`` + ``checkpoints/final.safetensors`` (or
  ``sae_weights.safetensors``) with nn.Linear tensors encoder.weight [d_sae, d_model], encoder.bias,
  decoder.weight [d_model, d_sae], decoder.bias. lm-saes computes, for an activation x,
  ``x' = x * s_in (- decoder.bias)``, ``f = act(x' @ encoder.weight.T + encoder.bias)`` and reconstructs
  ``(f @ decoder.weight.T + decoder.bias) / s_out``, where ``s = sqrt(d_model) / dataset norm`` under
  ``norm_activation: dataset-wise``. The scales and the pre-encoder bias are folded into our weights
  exactly, so that ``encode`` gives f and ``decode`` the reconstruction in the model's own units.
  A TopK SAE with ``sparsity_include_decoder_norm`` ranks latents by f_i * ||decoder column i||; we
  fold that norm into the latent, so its activations are those f_i * ||d_i|| (lm-saes's "true" feature
  activations) and the reconstruction is unchanged.

A converted checkpoint lives in ``<converted root>/<name>-<digest of its inputs>``, written to a
temporary folder and renamed into place only once the caller accepts it (see ``staged``).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from steering_app import json_checks
from steering_app.engine.saes.sae import (
    CFG_FILE,
    WEIGHTS_FILE,
    SAEFormatError,
    hook_layer_from_name,
    save_sae,
)

GEMMA_SCOPE_FILES = ("params.npz", "params.safetensors")
LLAMA_SCOPE_CONFIG = "hyperparams.json"
# lm-saes looks for its weights in this order.
LLAMA_SCOPE_WEIGHTS = (
    "sae_weights.safetensors",
    "checkpoints/pruned.safetensors",
    "checkpoints/final.safetensors",
)
LLAMA_SCOPE_ACT_FNS = ("relu", "jumprelu", "topk")
GEMMA_SCOPE_ARRAYS = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")
MAX_DIMENSION = 2**31 - 1

_LAYER_IN_PATH = re.compile(r"(?:^|/)layer_(\d+)(?:/|_|$)")
# Gemma Scope also publishes SAEs on the embeddings, attention and MLP outputs, and transcoders; the
# steering hooks read the residual stream after a block.
_NOT_RESIDUAL = re.compile(r"embedding|-att\b|-mlp\b|attn_out|mlp_out|transcoder|\bclt\b", re.IGNORECASE)


@dataclass(frozen=True)
class Source:
    """Where a checkpoint folder came from, and what the caller knows about it beyond its files."""

    folder: Path
    name: str = ""  # "org/repo/path/in/repo" for hub folders; the folder path otherwise
    layer: int | None = None  # --layer
    metadata: dict | None = None  # written into cfg.json's metadata (release, neuronpedia_id, ...)


@dataclass(frozen=True)
class Staged:
    path: Path  # a SAELens-layout folder to load now
    final: Path  # where it lives once accepted
    format: str


def detect(folder: Path) -> tuple[str, list[Path]]:
    """The layout of a checkpoint folder and the files its conversion reads."""
    if not folder.is_dir():
        raise SAEFormatError(
            f"{folder}: not a directory (an SAE is a directory with {CFG_FILE} and {WEIGHTS_FILE}, "
            f"{' or '.join(GEMMA_SCOPE_FILES)} (Gemma Scope), or {LLAMA_SCOPE_CONFIG} (Llama Scope))"
        )
    if (folder / CFG_FILE).exists():
        return "saelens", [folder / CFG_FILE, folder / WEIGHTS_FILE]
    if (folder / LLAMA_SCOPE_CONFIG).exists():
        weights = next((folder / name for name in LLAMA_SCOPE_WEIGHTS if (folder / name).is_file()), None)
        if weights is None:
            raise SAEFormatError(
                f"{folder / LLAMA_SCOPE_CONFIG}: Llama Scope SAE without weights "
                f"(expected one of {', '.join(LLAMA_SCOPE_WEIGHTS)} next to it)"
            )
        return "llama_scope", [folder / LLAMA_SCOPE_CONFIG, weights]
    for name in GEMMA_SCOPE_FILES:
        if (folder / name).exists():
            return "gemma_scope", [folder / name]
    present = sorted(path.name for path in folder.iterdir())[:10]
    raise SAEFormatError(
        f"{folder}: unknown SAE layout; expected {CFG_FILE} + {WEIGHTS_FILE} (SAELens), "
        f"{' or '.join(GEMMA_SCOPE_FILES)} (Gemma Scope) or {LLAMA_SCOPE_CONFIG} + "
        f"checkpoints/final.safetensors (Llama Scope); found {', '.join(present) or 'nothing'}"
    )


@contextmanager
def staged(source: Source, converted_root: Path) -> Iterator[Staged]:
    """A SAELens-layout folder for the checkpoint at source.folder.

    SAELens folders are used in place. Other layouts are converted into a temporary folder under
    converted_root, which is renamed to its final name when the block exits normally and removed when
    it raises; a conversion done before (same inputs) is reused.
    """
    layout, inputs = detect(source.folder)
    if layout == "saelens":
        yield Staged(source.folder, source.folder, layout)
        return
    final = converted_root / f"{_slug(source.name or str(source.folder))}-{_digest(layout, inputs, source)}"
    if (final / CFG_FILE).is_file() and (final / WEIGHTS_FILE).is_file():
        yield Staged(final, final, layout)
        return
    converted_root.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=".converting-", dir=converted_root))
    try:
        CONVERTERS[layout](source, inputs, temporary)
        yield Staged(temporary, final, layout)
        if final.exists():  # converted meanwhile by another import of the same SAE: same content
            shutil.rmtree(temporary)
        else:
            temporary.rename(final)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


def _slug(name: str) -> str:
    tail = "-".join(part for part in Path(name).parts[-4:] if part not in ("/", ""))
    return re.sub(r"[^A-Za-z0-9._-]+", "_", tail).strip("._-")[:80] or "sae"


def _digest(layout: str, inputs: list[Path], source: Source) -> str:
    digest = hashlib.sha256(
        json.dumps([layout, source.name, source.layer, source.metadata], sort_keys=True, default=str).encode()
    )
    for path in inputs:
        digest.update(path.name.encode())
        with path.open("rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def _hook_name(source: Source, hinted: str | None = None) -> str:
    if source.layer is not None:
        return f"blocks.{source.layer}.hook_resid_post"
    if hinted:
        return hinted
    match = _LAYER_IN_PATH.search(source.name or str(source.folder))
    if match is None:
        raise SAEFormatError(
            f"{source.folder}: cannot tell which layer the SAE reads (no layer_<L> in its path); pass --layer"
        )
    return f"blocks.{int(match.group(1))}.hook_resid_post"


def _cfg(d_in: int, d_sae: int, architecture: str, hook_name: str, source: Source, layout: str) -> dict:
    metadata = {"hook_name": hook_name, "converted_from": layout, "source": source.name or str(source.folder)}
    metadata.update(source.metadata or {})
    return {
        "architecture": architecture,
        "d_in": d_in,
        "d_sae": d_sae,
        "dtype": "float32",
        "apply_b_dec_to_input": False,
        "normalize_activations": "none",
        "metadata": metadata,
    }


def _expect_shape(tensor, shape: tuple[int, ...], name: str, where: Path) -> None:
    if tuple(tensor.shape) != shape:
        raise SAEFormatError(f"{where}: {name} has shape {list(tensor.shape)}, expected {list(shape)}")


# Gemma Scope ------------------------------------------------------------------------------------------


def _read_gemma_arrays(path: Path) -> dict[str, np.ndarray | torch.Tensor]:
    if path.suffix == ".safetensors":
        tensors = _read_safetensors(path)
    else:
        try:
            with np.load(path, allow_pickle=False) as archive:
                tensors = {}
                for key in archive.files:
                    try:
                        tensors[key] = archive[key]
                    except ValueError as error:  # an object array, refused without pickle
                        raise SAEFormatError(f"{path}: array {key!r} is not numeric ({error})") from error
        except SAEFormatError:
            raise
        except (OSError, ValueError, EOFError) as error:
            raise SAEFormatError(f"{path}: not a readable .npz archive ({error})") from error
    # The released files spell the matrices w_enc / w_dec; SAELens spells them W_enc / W_dec.
    return {("W" + key[1:] if key.startswith("w_") else key): value for key, value in tensors.items()}


def _as_float64(value, name: str, where: Path) -> torch.Tensor:
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "fiu":
            raise SAEFormatError(f"{where}: array {name!r} is not numeric (dtype {value.dtype})")
        return torch.from_numpy(np.ascontiguousarray(value, dtype=np.float64))
    if value.dtype == torch.bool or value.is_complex():
        raise SAEFormatError(f"{where}: tensor {name!r} is not real-valued (dtype {value.dtype})")
    return value.to(torch.float64)


def convert_gemma_scope(source: Source, inputs: list[Path], target: Path) -> None:
    (path,) = inputs
    if _NOT_RESIDUAL.search(source.name or str(source.folder)):
        raise SAEFormatError(
            f"{source.name or source.folder}: not a residual-stream SAE (embedding, attention, MLP or "
            "transcoder); only SAEs on a block's output can steer"
        )
    arrays = _read_gemma_arrays(path)
    for name in GEMMA_SCOPE_ARRAYS:
        if name not in arrays:
            hint = " (Gemma Scope SAEs are JumpReLU)" if name == "threshold" else ""
            raise SAEFormatError(
                f"{path}: missing array {name!r}{hint}; expected {', '.join(GEMMA_SCOPE_ARRAYS)}"
            )
    tensors = {name: _as_float64(arrays[name], name, path) for name in GEMMA_SCOPE_ARRAYS}
    if tensors["W_enc"].dim() != 2:
        raise SAEFormatError(
            f"{path}: W_enc has shape {list(tensors['W_enc'].shape)}, expected [d_in, d_sae]"
        )
    d_in, d_sae = tensors["W_enc"].shape
    for name, shape in {
        "W_dec": (d_sae, d_in),
        "b_enc": (d_sae,),
        "b_dec": (d_in,),
        "threshold": (d_sae,),
    }.items():
        _expect_shape(tensors[name], shape, name, path)
    scale = arrays.get("scaling_factor")
    if scale is not None and not np.allclose(np.asarray(scale, dtype=np.float64), 1.0):
        raise SAEFormatError(f"{path}: a scaling_factor other than 1 (a finetuned SAE) is not supported")
    # Gemma Scope's JumpReLU is relu(pre) * (pre > threshold); ours, pre * (pre > threshold), is the
    # same function once the threshold is at least 0.
    tensors["threshold"] = tensors["threshold"].clamp(min=0)
    cfg = _cfg(d_in, d_sae, "jumprelu", _hook_name(source), source, "gemma_scope")
    _save(target, tensors, cfg)


# Llama Scope ------------------------------------------------------------------------------------------


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise SAEFormatError(f"{path}: unreadable safetensors file ({error})") from error


def _read_hyperparams(path: Path) -> dict:
    try:
        params = json_checks.loads(path.read_bytes())
    except (OSError, ValueError) as error:  # ValueError: not JSON, not UTF-8, or refused by json_checks
        raise SAEFormatError(f"{path}: malformed {LLAMA_SCOPE_CONFIG} ({error})") from error
    if not isinstance(params, dict):
        raise SAEFormatError(f"{path}: malformed {LLAMA_SCOPE_CONFIG} (top level is not an object)")
    return params


def _integer(params: dict, key: str, where: Path) -> int:
    value = params.get(key)
    # Bounded so that float arithmetic on it (sqrt(d_model)) cannot overflow; no SAE is that wide.
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_DIMENSION:
        raise SAEFormatError(
            f"{where}: {key} must be an integer from 1 to {MAX_DIMENSION}, got {value!r:.40}"
        )
    return value


def _number(value, what: str, where: Path, positive: bool = False) -> float:
    number = json_checks.finite_float(value)
    if number is None:
        raise SAEFormatError(f"{where}: {what} must be a finite number, got {value!r:.40}")
    if positive and number <= 0:
        raise SAEFormatError(f"{where}: {what} must be positive, got {value!r}")
    return number


def _norm_scales(params: dict, d_model: int, where: Path) -> tuple[float, float]:
    """The factors lm-saes multiplies inputs (and divides reconstructions) by: sqrt(d_model) / norm."""
    mode = params.get("norm_activation", "dataset-wise")
    if mode == "inference":  # the dataset norms are already folded into the weights
        return 1.0, 1.0
    if mode != "dataset-wise":
        raise SAEFormatError(
            f"{where}: norm_activation {mode!r} is not supported (only 'dataset-wise' and 'inference': a "
            "per-token or per-batch norm cannot be folded into fixed weights)"
        )
    norms = params.get("dataset_average_activation_norm")
    if not isinstance(norms, dict):
        raise SAEFormatError(
            f"{where}: norm_activation 'dataset-wise' needs dataset_average_activation_norm {{in, out}}"
        )
    hook_in = params["hook_point_in"]
    hook_out = params.get("hook_point_out", hook_in)
    scales = []
    for side, hook in (("in", hook_in), ("out", hook_out)):
        value = norms.get(side, norms.get(hook))
        if value is None:
            raise SAEFormatError(f"{where}: dataset_average_activation_norm has no {side!r} entry")
        norm = _number(value, f"dataset_average_activation_norm.{side}", where, positive=True)
        scales.append(math.sqrt(d_model) / norm)
    return scales[0], scales[1]


def convert_llama_scope(source: Source, inputs: list[Path], target: Path) -> None:
    config_path, weights_path = inputs
    params = _read_hyperparams(config_path)
    d_model = _integer(params, "d_model", config_path)
    if "d_sae" in params:
        d_sae = _integer(params, "d_sae", config_path)
    else:
        d_sae = d_model * _integer(params, "expansion_factor", config_path)
    act_fn = str(params.get("act_fn", "relu")).lower()
    if act_fn not in LLAMA_SCOPE_ACT_FNS:
        raise SAEFormatError(
            f"{config_path}: unknown act_fn {params.get('act_fn')!r} (supported: {', '.join(LLAMA_SCOPE_ACT_FNS)})"
        )
    hook_in = params.get("hook_point_in")
    if not isinstance(hook_in, str):
        raise SAEFormatError(f"{config_path}: missing key 'hook_point_in' (e.g. blocks.15.hook_resid_post)")
    if params.get("hook_point_out", hook_in) != hook_in:
        raise SAEFormatError(
            f"{config_path}: hook_point_out {params['hook_point_out']!r} differs from hook_point_in "
            f"{hook_in!r}: a transcoder, not an SAE"
        )
    try:
        hook_layer_from_name(hook_in)
    except SAEFormatError as error:
        raise SAEFormatError(f"{config_path}: hook_point_in: {error}") from error
    if params.get("use_glu_encoder"):
        raise SAEFormatError(f"{config_path}: use_glu_encoder is not supported")
    scale_in, scale_out = _norm_scales(params, d_model, config_path)

    loaded = _read_safetensors(weights_path)
    names = ["encoder.weight", "encoder.bias", "decoder.weight"]
    use_decoder_bias = params.get("use_decoder_bias", True)
    if use_decoder_bias:
        names.append("decoder.bias")
    for name in names:
        if name not in loaded:
            raise SAEFormatError(f"{weights_path}: missing tensor {name!r}; expected {', '.join(names)}")
    encoder = _as_float64(loaded["encoder.weight"], "encoder.weight", weights_path)
    encoder_bias = _as_float64(loaded["encoder.bias"], "encoder.bias", weights_path)
    decoder = _as_float64(loaded["decoder.weight"], "decoder.weight", weights_path)
    decoder_bias = (
        _as_float64(loaded["decoder.bias"], "decoder.bias", weights_path)
        if use_decoder_bias
        else torch.zeros(d_model, dtype=torch.float64)
    )
    _expect_shape(encoder, (d_sae, d_model), "encoder.weight", weights_path)
    _expect_shape(encoder_bias, (d_sae,), "encoder.bias", weights_path)
    _expect_shape(decoder, (d_model, d_sae), "decoder.weight", weights_path)
    _expect_shape(decoder_bias, (d_model,), "decoder.bias", weights_path)

    # f = act((s_in x - [b_dec]) E^T + b_e) = act(x (s_in E^T) + (b_e - [b_dec] E^T))
    W_enc = scale_in * encoder.T
    b_enc = encoder_bias.clone()
    if use_decoder_bias and params.get("apply_decoder_bias_to_pre_encoder", True):
        b_enc -= decoder_bias @ encoder.T
    # reconstruction = (f D^T + b_dec) / s_out
    W_dec = decoder.T / scale_out
    b_dec = decoder_bias / scale_out
    tensors = {"W_enc": W_enc, "W_dec": W_dec, "b_enc": b_enc, "b_dec": b_dec}
    architecture = {"relu": "standard"}.get(act_fn, act_fn)
    cfg = _cfg(d_model, d_sae, architecture, _hook_name(source, hook_in), source, "llama_scope")
    if act_fn == "jumprelu":
        if "jump_relu_threshold" not in params:
            raise SAEFormatError(f"{config_path}: act_fn 'jumprelu' needs jump_relu_threshold")
        threshold = _number(params["jump_relu_threshold"], "jump_relu_threshold", config_path)
        tensors["threshold"] = torch.full((d_sae,), threshold, dtype=torch.float64)
    if act_fn == "topk":
        k = params.get("top_k")
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= d_sae:
            raise SAEFormatError(f"{config_path}: top_k must be an integer in [1, {d_sae}], got {k!r}")
        cfg["k"] = k
        if params.get("sparsity_include_decoder_norm", True):
            _fold_decoder_norm(tensors, decoder.norm(dim=0))
    _save(target, tensors, cfg)


def _fold_decoder_norm(tensors: dict[str, torch.Tensor], norms: torch.Tensor) -> None:
    """Scale latent i by n_i, the norm of its lm-saes decoder column, so that ranking pre-activations
    ranks f_i * n_i as lm-saes does; the activations become lm-saes's f_i * n_i.

    A latent with a zero decoder column reconstructs nothing; its encoder is zeroed so it ranks like
    an inactive one.
    """
    live = norms > 0
    tensors["W_enc"] = tensors["W_enc"] * torch.where(live, norms, torch.zeros_like(norms))
    tensors["b_enc"] = tensors["b_enc"] * torch.where(live, norms, torch.zeros_like(norms))
    tensors["W_dec"] = tensors["W_dec"] / torch.where(live, norms, torch.ones_like(norms))[:, None]


def _save(target: Path, tensors: dict[str, torch.Tensor], cfg: dict) -> None:
    threshold = tensors.pop("threshold", None)
    floats = {name: tensor.to(torch.float32) for name, tensor in tensors.items()}
    save_sae(
        target,
        cfg=cfg,
        threshold=None if threshold is None else threshold.to(torch.float32),
        **floats,
    )


CONVERTERS = {"gemma_scope": convert_gemma_scope, "llama_scope": convert_llama_scope}
