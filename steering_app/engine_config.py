"""The engine's settings, handed to it explicitly: the engine imports nothing from Django.

SteeringAppConfig.ready() sets them once from Django's settings, which steerproject/env.py parsed and checked at
start-up (a bad value is ImproperlyConfigured naming its variable). Scripts and benchmarks that use the engine
without Django get these defaults, or call configure(). The module sits beside the engine, not in it, so that
the app sets it without importing the engine (and torch); like limits.py it is plain Python.
"""

from dataclasses import dataclass, field, fields
from pathlib import Path

# A worker's batch shape (rows, cache tokens) by device kind when STEERLAB_SLOT_ROWS / STEERLAB_SLOT_TOKENS do
# not set it; measured in engine/serving/scheduler.py. The web tier checks requests against the same numbers
# (steering_settings.slot_shape) without importing the engine.
SLOT_SHAPES = {"cpu": (8, 512), "cuda": (32, 1024)}


def slot_shape(device_kind: str, rows: int | None, tokens: int | None) -> tuple[int, int]:
    """(rows, tokens) of a batch: the configured ones, else the defaults of the device's kind ("cpu", "cuda")."""
    default_rows, default_tokens = SLOT_SHAPES.get(device_kind, SLOT_SHAPES["cpu"])
    return rows or default_rows, tokens or default_tokens


@dataclass
class EngineConfig:
    data_dir: Path = Path("var")  # models are cached under data_dir/models
    device: str = "auto"  # auto (cuda when available), cpu, cuda or cuda:N
    dtype: str = (
        "auto"  # auto (float32 on a CPU, bfloat16 on a GPU that supports it), float32, bfloat16, float16
    )
    embedder: str = ""  # a sentence-transformers id or directory; "": the bundled all-MiniLM-L6-v2
    slot_rows: int | None = None  # None: SLOT_SHAPES for the device the model is on
    slot_tokens: int | None = None
    cuda_graphs: bool = True  # a CUDA decode step as one graph launch
    # How long a conversation's rows keep their KV in the batch after a turn (evicted sooner when rows are short).
    chat_keep_seconds: float = 600
    # How a batch's step is chosen (StepPolicy's fields, STEERLAB_STEP_*): a missing one is "auto", measured.
    step_policy: dict[str, str] = field(default_factory=dict)


current = EngineConfig()


def configure_from(source) -> None:
    """Every setting from source's STEERLAB_<NAME> attribute (Django's settings, in the app's ready())."""
    configure(
        **{field.name: getattr(source, f"STEERLAB_{field.name.upper()}") for field in fields(EngineConfig)}
    )


def configure(**values) -> None:
    """Set the named settings (EngineConfig's fields); the others keep their values."""
    names = {field.name for field in fields(EngineConfig)}
    unknown = set(values) - names
    if unknown:
        raise TypeError(f"unknown engine settings: {', '.join(sorted(unknown))}")
    for name, value in values.items():
        setattr(current, name, value)
