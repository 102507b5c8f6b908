"""The TopK sparse autoencoder (Gao et al. 2024) as a trainable module, its evaluation and its export.

f = relu(topk((x - b_dec) @ W_enc + b_enc)), x_hat = f @ W_dec + b_dec, with unit-norm decoder rows.
The encoder's backward touches only the k selected latents per token (_SelectedPreActs), the decoder
reads only their k rows (embedding_bag). to_saelens turns a trained TopKSAE into the engine's SAE.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..saes.sae import SAE


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


@torch.no_grad()
def fold_scale(sae: TopKSAE, scale: float) -> TopKSAE:
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
