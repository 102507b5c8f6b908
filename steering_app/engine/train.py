"""Train TopK sparse autoencoders on a model's residual stream and describe their features.

Pure PyTorch: the caller hands in a loaded model, its tokenizer and an iterable of texts.

1. collect_activations streams the texts through the model, packed into fixed-length sequences,
   and keeps the output of one decoder block (the forward pass stops right after that block).
   Special tokens (BOS, EOS, chat markers) are left out: their residual norm is not typical.
2. train_sae fits a TopK SAE (Gao et al. 2024): unit-norm decoder rows, b_dec subtracted from the
   input, AuxK loss on the latents that stopped firing so they come back to life.
3. describe_features gives each latent its max activation, activation frequency, top tokens with
   short contexts and a label made from the words at its strongest activations.

train_from_texts runs the three steps and writes a SAELens-layout checkpoint. Every step raises on
failure or interruption (KeyboardInterrupt passes through untouched, and a stop() callback that
returns True raises TrainingInterrupted); nothing is written before training has finished, so a
caller can mark its job failed in an except clause and never sees a half-written checkpoint.

Reproduce the demo SAE shipped in steering_app/demo:  python manage.py train_sae --demo
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .layers import block_hidden, decoder_blocks
from .sae import SAE, save_sae

StopCheck = Callable[[], bool] | None


class TrainingInterrupted(RuntimeError):
    """stop() asked the training to end before it finished."""


class _StopForward(Exception):
    """Raised by the collection hook: nothing after the SAE's block needs to run."""


def hook_name_for(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_post"


def _check_stop(stop: StopCheck) -> None:
    if stop is not None and stop():
        raise TrainingInterrupted("training interrupted")


# ---------------------------------------------------------------------------------------------
# 1. Activations
# ---------------------------------------------------------------------------------------------


@dataclass
class Activations:
    """Residual activations at one layer, with the token sequences they came from.

    acts[i] is the activation of the token at flat position positions[i] of token_ids
    (row = positions[i] // seq_len); positions holding special tokens or padding have no row.
    """

    acts: torch.Tensor  # [N, d_in], float16 on CPU
    positions: torch.Tensor  # [N] long
    token_ids: torch.Tensor  # [S, seq_len] long
    layer: int

    @property
    def num_tokens(self) -> int:
        return int(self.acts.shape[0])

    @property
    def d_in(self) -> int:
        return int(self.acts.shape[1])

    def save(self, path) -> None:
        torch.save(
            {"acts": self.acts, "positions": self.positions, "token_ids": self.token_ids, "layer": self.layer}, path
        )

    @classmethod
    def load(cls, path) -> Activations:
        return cls(**torch.load(path, weights_only=True))


def _packed_sequences(tokenizer, texts: Iterable[str], seq_len: int, separator: int | None):
    """Token id lists of length seq_len (the last may be shorter): documents joined by separator."""
    buffer: list[int] = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            continue
        buffer.extend(ids)
        if separator is not None:
            buffer.append(separator)
        while len(buffer) >= seq_len:
            yield buffer[:seq_len]
            buffer = buffer[seq_len:]
    if buffer:
        yield buffer


def _special_ids(tokenizer) -> list[int]:
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            ids.add(int(value))
    return sorted(ids)


def collect_activations(
    model,
    tokenizer,
    texts: Iterable[str],
    layer: int,
    *,
    max_tokens: int,
    seq_len: int = 128,
    batch_size: int = 32,
    progress: bool = True,
    stop: StopCheck = None,
) -> Activations:
    """Outputs of decoder block layer for up to max_tokens non-special tokens of texts.

    Texts are packed into sequences of seq_len tokens, EOS between documents; the model runs on its
    own device and dtype and stops after the block; activations are kept in float16 on the CPU.
    """
    blocks = decoder_blocks(model)
    if not 0 <= layer < len(blocks):
        raise ValueError(f"layer {layer} is out of range: the model has blocks 0..{len(blocks) - 1}")
    device = next(model.parameters()).device
    separator = tokenizer.eos_token_id
    special = torch.tensor(_special_ids(tokenizer), dtype=torch.long)
    pad_id = separator if separator is not None else 0
    captured: list[torch.Tensor] = []

    def hook(_module, _inputs, output):
        captured.append(block_hidden(output))
        raise _StopForward

    acts, positions, rows = [], [], []
    kept = sequences_done = 0
    handle = blocks[layer].register_forward_hook(hook)
    bar = tqdm(total=max_tokens, desc=f"activations at block {layer}", unit="tok", disable=not progress)
    try:
        batch: list[list[int]] = []
        sequences = _packed_sequences(tokenizer, texts, seq_len, separator)
        exhausted = False
        while kept < max_tokens and not exhausted:
            _check_stop(stop)
            batch = []
            for seq in sequences:
                batch.append(seq)
                if len(batch) == batch_size:
                    break
            else:
                exhausted = True
            if not batch:
                break
            ids = torch.full((len(batch), seq_len), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), seq_len), dtype=torch.long)
            for i, seq in enumerate(batch):
                ids[i, : len(seq)] = torch.tensor(seq)
                mask[i, : len(seq)] = 1
            captured.clear()
            with torch.inference_mode():
                try:
                    model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
                except _StopForward:
                    pass
            if not captured:
                raise RuntimeError(f"block {layer} did not run during the forward pass")
            hidden = captured[0].float().cpu()
            keep = mask.bool() & ~torch.isin(ids, special)
            flat = keep.flatten().nonzero().squeeze(1)
            flat = flat[: max_tokens - kept]
            acts.append(hidden.reshape(-1, hidden.shape[-1])[flat].half())
            positions.append(flat + sequences_done * seq_len)
            rows.append(ids)
            sequences_done += len(ids)
            kept += len(flat)
            bar.update(len(flat))
    finally:
        handle.remove()
        bar.close()
    if kept == 0:
        raise ValueError("the texts gave no tokens to train on")
    return Activations(
        acts=torch.cat(acts), positions=torch.cat(positions), token_ids=torch.cat(rows), layer=layer
    )


# ---------------------------------------------------------------------------------------------
# 2. TopK SAE
# ---------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
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


class _SelectedPreActs(torch.autograd.Function):
    """pre[b, indices[b, j]] whose backward touches only the selected latents (k of d_sae per row).

    The dense encoder gradient would cost as much as the forward matmul; the selected entries make a
    sparse matrix with B * k non-zeros, so the backward is almost free.
    """

    @staticmethod
    def forward(ctx, x_centered, W_enc, b_enc, b_dec, pre, indices):
        ctx.save_for_backward(x_centered, W_enc, indices)
        return pre.gather(1, indices)

    @staticmethod
    def backward(ctx, grad):
        x_centered, W_enc, indices = ctx.saved_tensors
        rows, k = indices.shape
        d_sae = W_enc.shape[1]
        flat = indices.reshape(-1)
        grad = grad.reshape(-1).contiguous()
        batch = torch.arange(rows, device=indices.device).repeat_interleave(k)
        selected = torch.sparse_coo_tensor(
            torch.stack([flat, batch]), grad, (d_sae, rows), check_invariants=False
        )
        grad_W_enc = torch.sparse.mm(selected, x_centered).t()
        grad_b_enc = torch.zeros(d_sae, dtype=grad.dtype, device=grad.device).index_add_(0, flat, grad)
        grad_b_dec = -(W_enc @ grad_b_enc)
        return None, grad_W_enc, grad_b_enc, grad_b_dec, None, None


class TopKSAE(torch.nn.Module):
    """f = relu(topk((x - b_dec) @ W_enc + b_enc)), x_hat = f @ W_dec + b_dec, ||W_dec[i]|| = 1."""

    def __init__(self, d_in: int, d_sae: int, k: int, generator: torch.Generator | None = None):
        super().__init__()
        if not 1 <= k <= d_sae:
            raise ValueError(f"k must be in [1, d_sae={d_sae}], got {k}")
        self.k = k
        W_dec = torch.randn(d_sae, d_in, generator=generator)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        self.W_dec = torch.nn.Parameter(W_dec)
        # Encoder starts as the decoder's transpose: every latent begins by detecting its own direction.
        self.W_enc = torch.nn.Parameter(W_dec.t().clone())
        self.b_enc = torch.nn.Parameter(torch.zeros(d_sae))
        self.b_dec = torch.nn.Parameter(torch.zeros(d_in))

    @property
    def d_sae(self) -> int:
        return self.W_dec.shape[0]

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.b_dec) @ self.W_enc + self.b_enc

    def topk(self, pre: torch.Tensor, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        values, indices = pre.topk(k or self.k, dim=-1, sorted=False)
        return torch.relu(values), indices

    def decode_sparse(self, values: torch.Tensor, indices: torch.Tensor, bias: bool = True) -> torch.Tensor:
        # Only k rows of W_dec per token: much cheaper than a dense [B, d_sae] @ [d_sae, d_in].
        out = F.embedding_bag(indices, self.W_dec, per_sample_weights=values, mode="sum")
        return out + self.b_dec if bias else out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode_sparse(*self.topk(self.pre_acts(x)))

    def dense_pre_acts(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x - b_dec, pre-activations), outside autograd: select latents from these, then call selected()."""
        with torch.no_grad():
            centered = x - self.b_dec
            return centered, torch.addmm(self.b_enc, centered, self.W_enc)

    def selected(self, centered: torch.Tensor, pre: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """relu of the chosen pre-activations, differentiable in the encoder's parameters."""
        return torch.relu(_SelectedPreActs.apply(centered, self.W_enc, self.b_enc, self.b_dec, pre, indices))

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)

    @torch.no_grad()
    def project_decoder_grad(self) -> None:
        """Drop the gradient's component along each decoder row (it would only change the row's norm)."""
        if self.W_dec.grad is not None:
            parallel = (self.W_dec.grad * self.W_dec).sum(dim=1, keepdim=True)
            self.W_dec.grad -= parallel * self.W_dec


@dataclass
class TrainResult:
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
                _check_stop(stop)
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
                    tokens=f"{info['tokens']:,}", loss=f"{info['loss']:.4f}", ev=f"{ema_ev:.3f}",
                    dead=f"{info['dead_fraction']:.1%}",
                )
                if on_step is not None:
                    on_step(info)
    finally:
        bar.close()

    sae.eval()
    raw = _fold_scale(sae, scale).cpu()
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


@torch.no_grad()
def _fold_scale(sae: TopKSAE, scale: float) -> TopKSAE:
    """The same SAE for activations scale times larger: f and b_dec scale, W_enc and W_dec do not."""
    raw = TopKSAE(sae.W_dec.shape[1], sae.d_sae, sae.k)
    raw.W_enc.copy_(sae.W_enc)
    raw.W_dec.copy_(sae.W_dec)
    raw.b_enc.copy_(sae.b_enc * scale)
    raw.b_dec.copy_(sae.b_dec * scale)
    return raw.requires_grad_(False)


@torch.no_grad()
def evaluate_sae(sae: TopKSAE, acts: torch.Tensor, eval_idx: torch.Tensor, batch_size: int = 8192) -> dict:
    """explained_variance and l0 on the held-out rows; dead_fraction over all rows."""
    fired = torch.zeros(sae.d_sae, dtype=torch.bool)
    err = total = 0.0
    l0 = 0
    eval_set = acts[eval_idx].float()
    eval_mean = eval_set.mean(dim=0)
    for start in range(0, len(eval_set), batch_size):
        x = eval_set[start : start + batch_size]
        values, indices = sae.topk(sae.pre_acts(x))
        err += float((sae.decode_sparse(values, indices) - x).pow(2).sum())
        total += float((x - eval_mean).pow(2).sum())
        l0 += int((values > 0).sum())
    for start in range(0, len(acts), batch_size):
        values, indices = sae.topk(sae.pre_acts(acts[start : start + batch_size].float()))
        fired[indices[values > 0]] = True
    return {
        "explained_variance": 1.0 - err / max(total, 1e-12),
        "l0": l0 / len(eval_set),
        "dead_fraction": 1.0 - float(fired.float().mean()),
    }


def to_saelens(sae: TopKSAE, metadata: dict, dtype: torch.dtype = torch.float32) -> SAE:
    """The engine's SAE object (what load_sae returns) for a trained TopKSAE."""
    cfg = {
        "d_in": int(sae.W_dec.shape[1]),
        "d_sae": sae.d_sae,
        "dtype": str(dtype).removeprefix("torch."),
        "architecture": "topk",
        "k": sae.k,
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "metadata": metadata,
    }
    tensors = {name: getattr(sae, name).detach().to(dtype) for name in ("W_enc", "W_dec", "b_enc", "b_dec")}
    return SAE(cfg, **tensors)


def write_checkpoint(sae: SAE, path) -> Path:
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


# ---------------------------------------------------------------------------------------------
# 3. Feature descriptions
# ---------------------------------------------------------------------------------------------

_WORD = re.compile(r"[^\W_]", re.UNICODE)


def _is_wordy(text: str) -> bool:
    return bool(_WORD.search(text))


class _Decoder:
    """Token id -> text, cached (decoding one id at a time is slow)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        # Special tokens only appear in contexts, as document boundaries.
        self.cache: dict[int, str] = {token_id: " | " for token_id in _special_ids(tokenizer)}

    def __call__(self, token_id: int) -> str:
        text = self.cache.get(token_id)
        if text is None:
            text = self.cache[token_id] = self.tokenizer.decode([token_id])
        return text


def _word_at(row: list[int], pos: int, decode: _Decoder, reach: int = 4) -> str:
    """The whole word the token at pos belongs to (tokens are often word pieces)."""
    token = decode(row[pos])
    if not _is_wordy(token):
        return token.strip()
    start = pos
    while start > pos - reach and start > 0:
        current = decode(row[start])
        previous = decode(row[start - 1])
        if current[:1].isspace() or not current[:1].isalnum() or not previous[-1:].isalnum():
            break
        start -= 1
    end = pos
    while end < pos + reach and end + 1 < len(row):
        following = decode(row[end + 1])
        if not following[:1].isalnum() or not decode(row[end])[-1:].isalnum():
            break
        end += 1
    return "".join(decode(t) for t in row[start : end + 1]).strip()


def _context(row: list[int], pos: int, decode: _Decoder, before: int, after: int) -> str:
    left = "".join(decode(t) for t in row[max(0, pos - before) : pos])
    right = "".join(decode(t) for t in row[pos + 1 : pos + 1 + after])
    text = f"{left}«{decode(row[pos])}»{right}"
    return " ".join(text.split())


def _fmt(text: str) -> str:
    return repr(text) if not text or text != text.strip() or not _is_wordy(text) else text


@torch.no_grad()
def describe_features(
    sae,
    activations: Activations,
    tokenizer,
    *,
    top_examples: int = 40,
    num_top_tokens: int = 8,
    num_contexts: int = 5,
    context_before: int = 12,
    context_after: int = 3,
    batch_size: int = 4096,
    progress: bool = True,
    stop: StopCheck = None,
) -> list[dict]:
    """One dict per latent: index, label, description, max_activation, activation_frequency, top_tokens, examples.

    sae: anything with encode(x [B, d_in]) -> [B, d_sae] (the engine's SAE, or to_saelens(...)).
    top_tokens are the stripped token strings most frequent among the top_examples strongest
    activations; the label names the most frequent whole word there, then the next ones.
    A latent that never fires gets an empty label and max_activation 0.
    """
    acts = activations.acts
    d_sae = int(sae.W_dec.shape[0])
    top_vals = torch.full((top_examples, d_sae), -1.0)
    top_rows = torch.zeros((top_examples, d_sae), dtype=torch.long)
    counts = torch.zeros(d_sae, dtype=torch.long)
    for start in tqdm(range(0, len(acts), batch_size), desc="describing features", disable=not progress):
        _check_stop(stop)
        f = sae.encode(acts[start : start + batch_size].to(sae.W_dec.dtype)).float()
        counts += (f > 0).sum(dim=0)
        vals, rows = f.topk(min(top_examples, len(f)), dim=0)
        merged_vals = torch.cat([top_vals, vals])
        merged_rows = torch.cat([top_rows, rows + start])
        best = merged_vals.topk(top_examples, dim=0).indices
        top_vals = merged_vals.gather(0, best)
        top_rows = merged_rows.gather(0, best)

    decode = _Decoder(tokenizer)
    seq_len = activations.token_ids.shape[1]
    token_rows = activations.token_ids.tolist()
    positions = activations.positions
    features = []
    for index in tqdm(range(d_sae), desc="labelling features", disable=not progress):
        max_activation = max(0.0, float(top_vals[0, index]))
        frequency = float(counts[index]) / len(acts)
        if counts[index] == 0:
            features.append(
                {
                    "index": index, "label": "", "description": "Never fires on the training corpus (dead latent).",
                    "max_activation": 0.0, "activation_frequency": 0.0, "top_tokens": [], "examples": [],
                }
            )
            continue
        tokens, words, contexts = [], [], []
        live = top_vals[:, index] > 0
        for value, row_index in zip(top_vals[live, index].tolist(), top_rows[live, index].tolist()):
            flat = int(positions[row_index])
            row, pos = token_rows[flat // seq_len], flat % seq_len
            tokens.append(decode(row[pos]).strip() or decode(row[pos]))
            words.append(_word_at(row, pos, decode) or tokens[-1])
            if len(contexts) < num_contexts:
                contexts.append(f"{_context(row, pos, decode, context_before, context_after)} ({value:.1f})")
        features.append(
            {
                "index": index,
                **_label(tokens, words, frequency, max_activation, contexts),
                "max_activation": round(max_activation, 4),
                "activation_frequency": round(frequency, 6),
                "top_tokens": _most_common_forms(tokens)[:num_top_tokens],
                "examples": contexts,
            }
        )
    return features


def _most_common_forms(items: list[str]) -> list[str]:
    """Distinct items by frequency, case folded together; each shown in its most frequent spelling."""
    forms: dict[str, Counter[str]] = {}
    for item in items:
        forms.setdefault(item.lower(), Counter())[item] += 1
    ranked = sorted(forms.values(), key=lambda spellings: -sum(spellings.values()))
    return [spellings.most_common(1)[0][0] for spellings in ranked]


def _show(token: str) -> str:
    """A token as a label shows it: whitespace made visible."""
    if token.strip():
        return token
    return "⏎" if "\n" in token else "␣"


def _label(tokens: list[str], words: list[str], frequency: float, max_activation: float, contexts) -> dict:
    """A label from the tokens (and the whole words around them) at the strongest activations.

    One token behind at least 30% of them: '"head" (next, words)', the head shown as the whole
    word when the token is mostly one word's piece. Otherwise the four most frequent words.
    """
    n = len(tokens)
    head_key, head_count = Counter(token.lower() for token in tokens).most_common(1)[0]
    head_words = [word for token, word in zip(tokens, words) if token.lower() == head_key]
    ranked_words = _most_common_forms(words)
    if head_count >= 0.3 * n:
        whole, whole_count = Counter(head_words).most_common(1)[0]
        head_token = _most_common_forms([t for t in tokens if t.lower() == head_key])[0]
        head = whole if whole_count >= 0.5 * head_count else head_token
        taken = {_show(head).lower(), *(_show(word).lower() for word in head_words)}
        others = _most_common_forms([_show(w) for w in words if _show(w).lower() not in taken])[:3]
        label = f'"{_show(head)}"' + (f" ({', '.join(others)})" if others else "")
    else:
        label = " / ".join(_most_common_forms([_show(word) for word in words])[:4])
    counts = Counter(word.lower() for word in words)
    summary = ", ".join(f"{_fmt(word)} ({counts[word.lower()]})" for word in ranked_words[:6])
    description = (
        f"Strongest on {summary} of its top {n} activations. "
        f"Active on {frequency:.2%} of tokens, max activation {max_activation:.1f}. "
        f"Examples: " + " | ".join(contexts)
    )
    return {"label": label[:300], "description": description}


# ---------------------------------------------------------------------------------------------
# Everything together
# ---------------------------------------------------------------------------------------------


@dataclass
class TrainingRun:
    checkpoint: Path
    stats: dict
    features: list[dict]
    timings: dict


def train_from_texts(
    model,
    tokenizer,
    texts: Iterable[str],
    layer: int,
    out_dir,
    *,
    tokens: int,
    config: TrainConfig | None = None,
    model_name: str = "",
    dataset: str = "",
    dtype: torch.dtype = torch.float32,
    features_path=None,
    activations_cache=None,
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
        "trainer": "steering_app.engine.train (TopK, AuxK)",
    }
    features = describe_features(
        to_saelens(result.sae, metadata), activations, tokenizer, progress=progress, stop=stop
    )
    labelled = sum(1 for f in features if f["label"] and f["max_activation"] > 0)
    metadata["label_coverage"] = round(labelled / len(features), 4)
    timings["describe_s"] = round(time.perf_counter() - started, 1)
    metadata["timings"] = timings
    checkpoint = write_checkpoint(to_saelens(result.sae, metadata, dtype=dtype), out_dir)
    if features_path is not None:
        Path(features_path).write_text(json.dumps(features, indent=1, ensure_ascii=False))
    return TrainingRun(checkpoint=checkpoint, stats=metadata, features=features, timings=timings)
