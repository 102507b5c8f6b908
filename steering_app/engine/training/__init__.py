"""Train TopK sparse autoencoders on a model's residual stream and describe their features.

Pure PyTorch: the caller hands in a loaded model, its tokenizer and an iterable of texts. Split the
way SAELens splits its trainer, one job a module:

- activations: collect_activations streams the texts through the model and keeps the output of one
  decoder block (special tokens left out);
- topk: the TopK SAE module, its held-out evaluation and its export to the engine's SAE;
- trainer: train_sae (the training loop) and train_from_texts (collect, train, describe, then write a
  SAELens-layout checkpoint atomically);
- describe: describe_features, the feature table (max activation, frequency, top tokens, label);
- stop: the stop() callback every step checks, and TrainingInterrupted;
- corpus: text sources, the demo corpus's builder and its token ids;
- reproducible: run_reproducibly, a process with pinned kernels: the same bits on every machine of one CPU kind.

Reproduce the demo SAE shipped in steering_app/demo:  python manage.py train_sae --demo
"""

from .activations import Activations, collect_activations, hook_name_for
from .describe import describe_features
from .stop import StopCheck, TrainingInterrupted
from .topk import TopKSAE, evaluate_sae, to_saelens
from .trainer import (
    TrainConfig,
    TrainingRun,
    TrainResult,
    train_demo,
    train_from_texts,
    train_sae,
    write_checkpoint,
)

__all__ = [
    "Activations",
    "StopCheck",
    "TopKSAE",
    "TrainConfig",
    "TrainResult",
    "TrainingInterrupted",
    "TrainingRun",
    "collect_activations",
    "describe_features",
    "evaluate_sae",
    "hook_name_for",
    "to_saelens",
    "train_demo",
    "train_from_texts",
    "train_sae",
    "write_checkpoint",
]
