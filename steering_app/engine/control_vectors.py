"""Control vectors on disk: llama.cpp / repeng GGUF files, and per-layer .safetensors / .pt / .npy files.

Keys are SteerLab block indices: the output of decoder block N, 0-based. llama.cpp uses the same numbering.
Its graph adds tensor ``direction.N`` to the output of block N (``build_cvec(cur, il)`` after the block's
last residual add, in the loop ``for il in 0..n_layer-1``), and refuses N = 0
(common/common.cpp: "invalid (zero) direction tensor layer index"; llama-adapter.cpp keeps no tensor for
layer 0). repeng writes ``direction.{layer_id}``, where layer_id indexes ``model.layers`` and its vector is
added to that layer's output (ControlModule): the same block. So no index shifts in either direction.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

ARCH = "controlvector"
_DIRECTION = re.compile(r"direction\.(\d+)")
PER_LAYER_SUFFIXES = (".safetensors", ".pt", ".npy")


class ControlVectorError(ValueError):
    """A control-vector file that cannot be written or read; the message names the problem."""


def write_gguf(path: os.PathLike | str, vectors: dict[int, torch.Tensor], model_hint: str) -> Path:
    """Write a llama.cpp control vector: arch "controlvector", one float32 tensor "direction.N" per block."""
    from gguf import GGUFWriter

    if not vectors:
        raise ControlVectorError("no layer to export: choose at least one intervention layer")
    if 0 in vectors:
        raise ControlVectorError(
            "llama.cpp cannot apply a control vector to the output of block 0 (it rejects direction.0): "
            "choose layers from 1 on"
        )
    arrays = {}
    for layer in sorted(vectors):
        if layer < 0:
            raise ControlVectorError(f"layer {layer} is negative")
        array = vectors[layer].detach().to("cpu", torch.float32).numpy()
        if array.ndim != 1:
            raise ControlVectorError(
                f"layer {layer}: a direction is one vector, got shape {tuple(array.shape)}"
            )
        _check_finite(array, f"layer {layer}")
        arrays[layer] = array
    sizes = {array.shape[0] for array in arrays.values()}
    if len(sizes) != 1:
        raise ControlVectorError(f"the layers' vectors differ in size: {sorted(sizes)}")

    path = Path(path)
    writer = GGUFWriter(path, ARCH)
    writer.add_string(f"{ARCH}.model_hint", model_hint)
    writer.add_uint32(f"{ARCH}.layer_count", len(arrays))
    for layer, array in arrays.items():
        writer.add_tensor(f"direction.{layer}", array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def read_file(path: os.PathLike | str, n_embd: int, num_layers: int) -> dict[int, torch.Tensor]:
    """{block index: float32 [n_embd]} from a control-vector .gguf (llama.cpp or repeng: only the layers it
    has), or from a .safetensors / .pt / .npy holding one vector for every layer of the model."""
    path = Path(path)
    if not path.is_file():
        raise ControlVectorError(f"{path.name}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".gguf":
        vectors = _read_gguf(path)
    elif suffix in PER_LAYER_SUFFIXES:
        vectors = _per_layer(_load_per_layer(path, suffix), num_layers, path.name)
    else:
        raise ControlVectorError(
            f"{path.name}: unknown format {suffix or '(no suffix)'}; expected .gguf, "
            + ", ".join(PER_LAYER_SUFFIXES)
        )
    for layer, vector in vectors.items():
        where = f"{path.name}, layer {layer}"
        if not 0 <= layer < num_layers:
            raise ControlVectorError(f"{where}: the model has blocks 0 to {num_layers - 1} only")
        if vector.shape != (n_embd,):
            raise ControlVectorError(
                f"{where}: a vector of {vector.numel()} values (shape {tuple(vector.shape)}), "
                f"the model's n_embd is {n_embd}"
            )
        _check_finite(vector.numpy(), where)
    return dict(sorted(vectors.items()))


def _read_gguf(path: Path) -> dict[int, torch.Tensor]:
    from gguf import GGMLQuantizationType, GGUFReader

    try:
        reader = GGUFReader(path)
    except Exception as error:  # the reader raises ValueError, struct.error, OSError, ... on a damaged file
        raise ControlVectorError(f"{path.name}: not a readable GGUF file ({error})") from error
    arch = reader.get_field("general.architecture")
    if arch is not None and arch.contents() != ARCH:
        raise ControlVectorError(
            f"{path.name}: a GGUF of architecture {arch.contents()!r}, not a control vector ({ARCH!r})"
        )
    vectors = {}
    for tensor in reader.tensors:
        match = _DIRECTION.fullmatch(tensor.name)
        if match is None:
            raise ControlVectorError(f"{path.name}: tensor {tensor.name!r} is not named direction.N")
        if tensor.tensor_type != GGMLQuantizationType.F32:
            raise ControlVectorError(
                f"{path.name}: {tensor.name} is {tensor.tensor_type.name}; llama.cpp reads F32 directions only"
            )
        if len(tensor.shape) != 1:
            raise ControlVectorError(
                f"{path.name}: {tensor.name} has shape {tuple(int(n) for n in tensor.shape)}, not one vector"
            )
        # Copied out of the memory map, which stays open as long as an array views it.
        vectors[int(match.group(1))] = torch.from_numpy(np.array(tensor.data, dtype=np.float32))
    if not vectors:
        raise ControlVectorError(f"{path.name}: no direction.N tensor")
    return vectors


def _load_per_layer(path: Path, suffix: str):
    try:
        if suffix == ".npy":
            return torch.from_numpy(np.load(path, allow_pickle=False))
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # each loader has its own errors for a damaged or foreign file
        raise ControlVectorError(f"{path.name}: cannot read it as {suffix} ({error})") from error


def _per_layer(loaded, num_layers: int, name: str) -> dict[int, torch.Tensor]:
    """One [num_layers, n_embd] tensor, alone or as a file's only tensor, or one vector per layer keyed by
    its index ("N", N or "direction.N")."""
    if isinstance(loaded, Mapping) and len(loaded) == 1:
        (loaded,) = loaded.values()
    if isinstance(loaded, torch.Tensor):
        if loaded.ndim != 2:
            raise ControlVectorError(
                f"{name}: expected one vector per layer, [num_layers, n_embd], got shape {tuple(loaded.shape)}"
            )
        rows = dict(enumerate(loaded))
    elif isinstance(loaded, Mapping):
        rows = {}
        for key, value in loaded.items():
            match = re.fullmatch(r"(?:direction\.)?(\d+)", str(key))
            if match is None or not isinstance(value, torch.Tensor):
                raise ControlVectorError(f"{name}: entry {key!r} is not a vector keyed by its layer index")
            rows[int(match.group(1))] = value
    else:
        raise ControlVectorError(f"{name}: holds a {type(loaded).__name__}, not per-layer vectors")
    if sorted(rows) != list(range(num_layers)):
        missing = sorted(set(range(num_layers)) - set(rows))
        raise ControlVectorError(
            f"{name}: {len(rows)} vectors for a model of {num_layers} layers"
            + (f" (missing layers {_ranges(missing)})" if missing else "")
        )
    if any(not row.is_floating_point() for row in rows.values()):
        raise ControlVectorError(f"{name}: the vectors are not floating point")
    return {layer: row.to(torch.float32).contiguous() for layer, row in rows.items()}


def _check_finite(array: np.ndarray, where: str) -> None:
    bad = ~np.isfinite(array)
    if bad.any():
        raise ControlVectorError(f"{where}: {int(bad.sum())} NaN or infinite values")


def _ranges(numbers: list[int]) -> str:
    """[1, 2, 3, 7] -> "1-3, 7"."""
    spans = []
    for number in numbers:
        if spans and spans[-1][1] == number - 1:
            spans[-1][1] = number
        else:
            spans.append([number, number])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)
