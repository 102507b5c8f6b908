"""The training loop and the whole run: activations -> TopK SAE -> feature table -> checkpoint.

train_sae fits a TopK SAE (Gao et al. 2024): unit-norm decoder rows, b_dec subtracted from the input,
AuxK loss on the latents that stopped firing so they come back to life. It trains on activations
rescaled to mean squared norm d_in and folds the result back to raw units.

train_from_texts runs the three steps (collect_activations, train_sae, describe_features) and writes a
SAELens-layout checkpoint; train_demo runs them on the demo's model and corpus ids (in
reproducible.run_reproducibly: the same bits on every machine with one CPU kind). Every step raises on failure or interruption (KeyboardInterrupt passes
through untouched, and a stop() callback that returns True raises TrainingInterrupted); nothing is
written before training has finished, so a caller can mark its job failed in an except clause and never
sees a half-written checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from .. import demo
from ..saes.sae import SAE, save_sae
from .activations import Activations, collect_activations, hook_name_for
from .corpus import read_token_ids, token_documents
from .describe import describe_features
from .stop import StopCheck, check_stop
from .topk import TopKSAE, evaluate_sae, fold_scale, to_saelens

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass
class TrainConfig:
    """Hyper-parameters of train_sae."""

    d_sae: int = 2048
    k: int = 32
    batch_size: int = 4096
    epochs: float = 8.0
    lr: float = 1e-3
    warmup_fraction: float = 0.02
    decay_fraction: float = 0.3  # the last part of training decays the learning rate linearly to 0
    aux_k: int | None = None  # default d_in // 2
    aux_coef: float = 1 / 32
    dead_after_tokens: int = 200_000  # clamped to half the training set
    eval_fraction: float = 0.02
    seed: int = 0


@dataclass
class TrainResult:
    """What train_sae returns: the SAE and its held-out stats."""

    sae: TopKSAE  # in the units of the raw activations
    stats: dict = field(default_factory=dict)


def _lr_factor(step: int, total: int, cfg: TrainConfig) -> float:
    warmup = max(1, int(total * cfg.warmup_fraction))
    decay_start = int(total * (1 - cfg.decay_fraction))
    if step < warmup:
        return (step + 1) / warmup
    if step >= decay_start:
        return max(0.0, (total - step) / max(1, total - decay_start))
    return 1.0


def train_sae(
    acts: torch.Tensor,
    cfg: TrainConfig | None = None,
    *,
    device: str | torch.device = "cpu",
    progress: bool = True,
    stop: StopCheck = None,
    on_step: Callable[[dict], None] | None = None,
) -> TrainResult:
    """Fit a TopK SAE to acts [N, d_in]; stats (held-out explained variance, l0, dead fraction) included.

    Training runs on activations rescaled to mean squared norm d_in (one set of hyperparameters for
    every model); the returned SAE is folded back to raw units: decoder rows keep unit norm and the
    latents measure the raw residual stream.
    """
    cfg = cfg or TrainConfig()
    device = torch.device(device)
    generator = torch.Generator().manual_seed(cfg.seed)
    n, d_in = acts.shape
    order = torch.randperm(n, generator=generator)
    n_eval = min(max(1, int(n * cfg.eval_fraction)), n // 2)
    eval_idx, train_idx = order[:n_eval], order[n_eval:]
    if len(train_idx) == 0:
        raise ValueError("too few activations to train on")

    sample = acts[train_idx[:100_000]].float()
    scale = float(sample.pow(2).sum(dim=1).mean().div(d_in).sqrt())
    mean = sample.mean(dim=0) / scale
    total_variance = float((sample / scale - mean).pow(2).sum(dim=1).mean())

    sae = TopKSAE(d_in, cfg.d_sae, min(cfg.k, cfg.d_sae), generator=generator).to(device)
    with torch.no_grad():
        sae.b_dec.copy_(mean)
    optimizer = torch.optim.Adam(sae.parameters(), lr=cfg.lr, betas=(0.9, 0.999), eps=6.25e-10)
    aux_k = min(cfg.aux_k or max(1, d_in // 2), cfg.d_sae)
    dead_after = max(cfg.batch_size, min(cfg.dead_after_tokens, len(train_idx) // 2))
    since_fired = torch.zeros(cfg.d_sae, dtype=torch.long, device=device)

    batch_size = min(cfg.batch_size, len(train_idx))
    steps_per_epoch = math.ceil(len(train_idx) / batch_size)
    total_steps = max(1, int(cfg.epochs * steps_per_epoch))
    ema_ev = None
    bar = tqdm(total=total_steps, desc="training SAE", unit="step", disable=not progress)
    sae.train()
    try:
        step = 0
        while step < total_steps:
            perm = train_idx[torch.randperm(len(train_idx), generator=generator)]
            for start in range(0, len(perm), batch_size):
                if step >= total_steps:
                    break
                check_stop(stop)
                x = acts[perm[start : start + batch_size]].to(device=device, dtype=torch.float32) / scale
                centered, pre = sae.dense_pre_acts(x)
                indices = pre.topk(sae.k, dim=-1, sorted=False).indices
                values = sae.selected(centered, pre, indices)
                recon = sae.decode_sparse(values, indices)
                mse = (recon - x).pow(2).sum(dim=1).mean() / total_variance
                loss = mse

                fired = torch.zeros(cfg.d_sae, dtype=torch.bool, device=device)
                fired[indices[values > 0]] = True
                since_fired += len(x)
                since_fired[fired] = 0
                dead = since_fired > dead_after
                aux = torch.zeros((), device=device)
                if dead.any():
                    # AuxK: the dead latents' top activations must explain what the live ones miss.
                    residual = (x - recon).detach()
                    dead_pre = pre.masked_fill(~dead, float("-inf"))
                    aux_indices = dead_pre.topk(min(aux_k, int(dead.sum())), dim=-1, sorted=False).indices
                    aux_values = sae.selected(centered, pre, aux_indices)
                    aux_recon = sae.decode_sparse(aux_values, aux_indices, bias=False)
                    residual_var = (residual - residual.mean(dim=0)).pow(2).sum(dim=1).mean().clamp_min(1e-8)
                    aux = (aux_recon - residual).pow(2).sum(dim=1).mean() / residual_var
                    loss = loss + cfg.aux_coef * aux
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"SAE training diverged at step {step} (loss {float(loss)})")

                for group in optimizer.param_groups:
                    group["lr"] = cfg.lr * _lr_factor(step, total_steps, cfg)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                sae.project_decoder_grad()
                optimizer.step()
                sae.normalize_decoder()

                ev = 1.0 - mse.item()
                ema_ev = ev if ema_ev is None else 0.9 * ema_ev + 0.1 * ev
                step += 1
                info = {
                    "step": step,
                    "total_steps": total_steps,
                    "tokens": step * batch_size,
                    "loss": loss.item(),
                    "explained_variance": ema_ev,
                    "dead_fraction": float(dead.float().mean()),
                }
                bar.update(1)
                bar.set_postfix(
                    tokens=f"{info['tokens']:,}",
                    loss=f"{info['loss']:.4f}",
                    ev=f"{ema_ev:.3f}",
                    dead=f"{info['dead_fraction']:.1%}",
                )
                if on_step is not None:
                    on_step(info)
    finally:
        bar.close()

    sae.eval()
    raw = fold_scale(sae, scale).cpu()
    stats = evaluate_sae(raw, acts, eval_idx)
    stats.update(
        {
            "tokens": int(n),
            "train_tokens_seen": int(total_steps * batch_size),
            "steps": total_steps,
            "d_sae": cfg.d_sae,
            "k": sae.k,
            "activation_scale": scale,
            "train_config": asdict(cfg),
        }
    )
    return TrainResult(sae=raw, stats=stats)


def write_checkpoint(sae: SAE, path: str | Path) -> Path:
    """Write the SAELens layout atomically: a reader never sees a half-written directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        save_sae(staging, sae.W_enc, sae.W_dec, sae.b_enc, sae.b_dec, sae.cfg)
        # mkdtemp makes the directory private; a checkpoint is as readable as any other file.
        umask = os.umask(0)
        os.umask(umask)
        staging.chmod(0o777 & ~umask)
        for file in staging.iterdir():
            file.chmod(0o666 & ~umask)
        if path.exists():
            shutil.rmtree(path)
        staging.rename(path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


@dataclass
class TrainingRun:
    """What train_from_texts made: the checkpoint directory, its metadata, the feature table."""

    checkpoint: Path
    stats: dict
    features: list[dict]
    timings: dict


def train_from_texts(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    texts: Iterable[str],
    layer: int,
    out_dir: str | Path,
    *,
    tokens: int,
    config: TrainConfig | None = None,
    model_name: str = "",
    dataset: str = "",
    dtype: torch.dtype = torch.float32,
    features_path: str | Path | None = None,
    activations_cache: str | Path | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    stop: StopCheck = None,
    on_step: Callable[[dict], None] | None = None,
) -> TrainingRun:
    """Collect activations at block layer, train, write the checkpoint to out_dir, describe features.

    Stats go into cfg.json's metadata too. features_path (optional) receives the feature table as
    JSON. activations_cache (optional file) is reused when present, written when not.
    """
    config = config or TrainConfig()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    timings = {}
    started = time.perf_counter()
    if activations_cache is not None and Path(activations_cache).is_file():
        activations = Activations.load(activations_cache)
        if activations.layer != layer or activations.num_tokens < min(tokens, activations.num_tokens):
            raise ValueError(f"{activations_cache} holds activations of another layer")
        activations.acts = activations.acts[:tokens]
        activations.positions = activations.positions[:tokens]
    else:
        activations = collect_activations(
            model, tokenizer, texts, layer, max_tokens=tokens, progress=progress, stop=stop
        )
        if activations_cache is not None:
            Path(activations_cache).parent.mkdir(parents=True, exist_ok=True)
            activations.save(activations_cache)
    timings["collect_s"] = round(time.perf_counter() - started, 1)

    started = time.perf_counter()
    result = train_sae(activations.acts, config, device=device, progress=progress, stop=stop, on_step=on_step)
    timings["train_s"] = round(time.perf_counter() - started, 1)

    started = time.perf_counter()
    metadata = {
        "model_name": model_name,
        "hook_name": hook_name_for(layer),
        "hook_layer": layer,
        "dataset": dataset,
        "tokens": activations.num_tokens,
        "context_size": int(activations.token_ids.shape[1]),
        "explained_variance": round(result.stats["explained_variance"], 4),
        "l0": round(result.stats["l0"], 2),
        "dead_fraction": round(result.stats["dead_fraction"], 4),
        "train_tokens_seen": result.stats["train_tokens_seen"],
        "activation_scale": round(result.stats["activation_scale"], 4),
        "train_config": result.stats["train_config"],
        "trainer": "steering_app.engine.training (TopK, AuxK)",
    }
    # The table measures the checkpoint as written (weights rounded to dtype): calibrating it reproduces it.
    written = to_saelens(result.sae, metadata, dtype=dtype).float()
    features = describe_features(written, activations, tokenizer, progress=progress, stop=stop)
    labelled = sum(1 for f in features if f["label"] and f["max_activation"] > 0)
    metadata["label_coverage"] = round(labelled / len(features), 4)
    timings["describe_s"] = round(time.perf_counter() - started, 1)
    metadata["timings"] = timings
    checkpoint = write_checkpoint(to_saelens(result.sae, metadata, dtype=dtype), out_dir)
    if features_path is not None:
        Path(features_path).write_text(json.dumps(features, indent=1, ensure_ascii=False))
    return TrainingRun(checkpoint=checkpoint, stats=metadata, features=features, timings=timings)


def train_demo(
    out: Path,
    ids_path: Path,
    *,
    tokens: int,
    config: TrainConfig,
    activations_cache: Path | None = None,
    device: str | None = None,
) -> TrainingRun:
    """The demo SAE (out/sae, out/features.json) from a demo corpus ids file: the demo model's layer, float16."""
    from ..loader import load_model

    lm = load_model(demo.DEMO_MODEL, device=device)
    return train_from_texts(
        lm.model,
        lm.tokenizer,
        token_documents(read_token_ids(ids_path), lm.tokenizer.eos_token_id),
        demo.DEMO_LAYER,
        out / demo.DEMO_CHECKPOINT.name,
        tokens=tokens,
        config=config,
        model_name=demo.DEMO_MODEL_NAME,
        dataset=demo.DEMO_DATASET,
        dtype=torch.float16,
        features_path=out / demo.DEMO_FEATURES.name,
        activations_cache=activations_cache,
        device=lm.device,
    )
