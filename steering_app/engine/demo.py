"""The demo feature space shipped in steering_app/demo: where it lives and the recipe that made it.

One place for every constant of the demo (model, layer, corpus, SAE hyper-parameters, file layout), read
by the loader, the corpus builder, `manage.py train_sae --demo` (which rebuilds it), `manage.py
calibrate_features` (which reads its corpus), `manage.py bootstrap_demo` (which imports it), the benchmark
and the tests. Plain values and paths; the model's source name comes from steering_app.model_files.
"""

from __future__ import annotations

from pathlib import Path

# The model's source name lives in model_files, which the web tier reads without the engine; one of the demo's
# constants all the same.
from steering_app.model_files import DEMO_MODEL  # noqa: F401

DEMO_DIR = Path(__file__).resolve().parents[1] / "demo"
DEMO_CHECKPOINT = DEMO_DIR / "sae"  # SAELens layout: cfg.json + sae_weights.safetensors
DEMO_FEATURES = DEMO_DIR / "features.json"
# The demo corpus as token ids (corpus.write_token_ids): sampled once, read by every run since.
DEMO_IDS = DEMO_DIR / "corpus.npy.xz"
# The planet and cake steering vectors (engine/vectors.py), made from the shipped pair sets: `manage.py make_vector
# --model SmolLM2-135M-Instruct --pairs planet.jsonl` (diffmean, tokens all), then cake added to it.
DEMO_VECTOR_SPACE = DEMO_DIR / "vectors"
DEMO_PAIR_SETS = DEMO_DIR.parent / "data" / "vectors" / "sets.json"  # [{"name", "description", "file"}]

DEMO_MODEL_NAME = "SmolLM2-135M-Instruct"
DEMO_DATASET = "smollm2-demo-corpus"
DEMO_DATASET_DESCRIPTION = (
    "Built-in demo corpus: SmolLM2-135M-Instruct's own answers to a fixed list of everyday prompts (seeded), "
    "mixed with prose from the Python standard library's docstrings."
)

# The recipe (the defaults of `manage.py train_sae --demo`; the corpus's with --resample).
DEMO_LAYER = 10  # output of decoder block 10: blocks.10.hook_resid_post
DEMO_PROMPTS = 560  # sampled answers in the corpus
DEMO_OFFLINE_TOKENS = 260_000  # stdlib prose tokens in the corpus
DEMO_TOKENS = 400_000  # activations to collect (at most: the corpus gives about 333k, all of them)
DEMO_D_SAE = 2048
DEMO_K = 32
DEMO_EPOCHS = 6.0
DEMO_SEED = 0

DEMO_WORK_DIR = "demo"  # under the data dir: the corpus and the activation cache


def demo_corpus_path(work: Path, seed: int = DEMO_SEED) -> Path:
    """A sampled demo corpus text file in work (`train_sae --demo --resample`, once per seed)."""
    return Path(work) / f"corpus-seed{seed}.txt"


def demo_activations_path(work: Path, ids_digest: str, layer: int = DEMO_LAYER) -> Path:
    """The activation cache in work of the corpus whose ids file has this sha256 (another corpus, another
    cache)."""
    return Path(work) / f"acts-{ids_digest[:16]}-L{layer}.pt"
