"""A slot decode step for Llama-family models that calls the weights directly instead of the modules.

A one-token step of SmolLM2-135M through transformers' modules makes about 2,200 top-level PyTorch calls
(norms spelled out op by op, the rotary table rebuilt every step, views and casts) besides the module and
hook dispatch in Python; on a 2-core CPU these cost about as much as the matmuls, and on a GPU each is a
kernel. This step computes the same function with about 1,500 calls and no module dispatch: one rms_norm
per norm, a rotary table built once per batch, the rotation as one addcmul, fused attention on a GPU, and
the steering applied between blocks (RowSteering.steer) instead of through hooks.

It is used only where it is the same function: a supported architecture in a plain configuration (below),
its logits checked against the module path's on a probe when the batch is built (plan.py), and no forward
hooks on the model's modules (a user's hooks see module calls, which this step does not make). Everything else takes the
module path in slots.py.
"""

from __future__ import annotations

import weakref
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..steer import RowSteering

# Architectures whose decoder layer is exactly: x + attn(rms(x)), then x + down(silu(gate(rms(x))) * up(rms(x))).
SUPPORTED = {"llama", "mistral", "qwen2"}
# The probe's tolerance against the module path, relative to the largest logit (fp32 differs by ~1e-6).
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}


class _Layer(NamedTuple):
    input_norm: torch.nn.Module
    attention: torch.nn.Module
    q: torch.nn.Linear
    k: torch.nn.Linear
    v: torch.nn.Linear
    o: torch.nn.Linear
    mlp_norm: torch.nn.Module
    gate: torch.nn.Linear
    up: torch.nn.Linear
    down: torch.nn.Linear

    @classmethod
    def of(cls, layer: torch.nn.Module) -> _Layer:
        attention, mlp = layer.self_attn, layer.mlp
        return cls(
            layer.input_layernorm,
            attention,
            attention.q_proj,
            attention.k_proj,
            attention.v_proj,
            attention.o_proj,
            layer.post_attention_layernorm,
            mlp.gate_proj,
            mlp.up_proj,
            mlp.down_proj,
        )


class LeanStep:
    """A Llama-family model's forward over a slot cache: decode steps, and prefills and teacher-forced passes
    (`length`: the positions its rotary table covers)."""

    def __init__(self, model: torch.nn.Module, length: int, attention):
        """attention(module, query, key, value, mask, scaling) -> (output [rows, seq, heads, head_dim], _):
        the slot attention (slots.py)."""
        self.attention = attention
        self.length = length
        inner = model.model
        config = model.config
        # Each layer's modules looked up once (nn.Module attribute access costs a microsecond, 16 per layer).
        self.layers = [_Layer.of(layer) for layer in inner.layers]
        self.embed = inner.embed_tokens
        self.final_norm = inner.norm
        self.lm_head = model.lm_head
        self.hidden = config.hidden_size
        attention = self.layers[0].attention
        self.head_dim = attention.head_dim
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.scaling = attention.scaling
        # transformers' own rotary module builds the table, so its values are the module path's.
        weight = self.embed.weight
        positions = torch.arange(length, device=weight.device).unsqueeze(0)
        cos, sin = inner.rotary_emb(weight[:1].unsqueeze(0), positions)
        half = self.head_dim // 2
        self.cos = cos[0]  # [length, head_dim]
        # rotate_half(x) * sin == roll(x, half) * sin with the first half's sign flipped.
        self.signed_sin = torch.cat([-sin[0, :, :half], sin[0, :, half:]], dim=-1)

    @classmethod
    def supports(cls, model: torch.nn.Module) -> bool:
        config = getattr(model, "config", None)
        if config is None or getattr(config, "model_type", None) not in SUPPORTED:
            return False
        rope = getattr(config, "rope_scaling", None) or getattr(config, "rope_parameters", None) or {}
        if (rope.get("rope_type") or rope.get("type") or "default") != "default":
            return False
        if (
            getattr(config, "hidden_act", None) != "silu"
            or getattr(config, "sliding_window", None)
            and getattr(config, "use_sliding_window", True)
        ):
            return False
        inner = getattr(model, "model", None)
        needed = ("embed_tokens", "layers", "norm", "rotary_emb")
        return (
            inner is not None and all(hasattr(inner, name) for name in needed) and hasattr(model, "lm_head")
        )

    def _norm(self, module: torch.nn.Module, h: torch.Tensor) -> torch.Tensor:
        # LlamaRMSNorm in one call (it computes in float32 inside); LlamaRMSNorm rounds to the model's dtype
        # once more before scaling, a difference within the probe's tolerance.
        return F.rms_norm(h, (self.hidden,), module.weight, module.variance_epsilon)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(x * cos, torch.roll(x, self.head_dim // 2, dims=-1), sin)

    def __call__(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        cache,
        mask: torch.Tensor,
        steering: RowSteering,
        keep: int = 1,
    ) -> torch.Tensor:
        """Logits [rows, keep, V] of the last `keep` positions of ids [rows, seq] at positions [rows, seq],
        writing their keys and values into cache (a slots.SlotCache); mask [rows, 1, seq, span] (True =
        attend)."""
        rows, seq = ids.shape
        cos = self.cos[positions].unsqueeze(1)  # [rows, 1, seq, head_dim]: one table row per token
        sin = self.signed_sin[positions].unsqueeze(1)
        h = F.embedding(ids, self.embed.weight)
        for index, layer in enumerate(self.layers):
            x = self._norm(layer.input_norm, h)
            q = self._heads(layer.q.forward(x), self.heads)
            k = self._heads(layer.k.forward(x), self.kv_heads)
            v = self._heads(layer.v.forward(x), self.kv_heads)
            keys, values = cache.update(self._rotate(k, cos, sin), v, index)
            out, _ = self.attention(
                layer.attention, self._rotate(q, cos, sin), keys, values, mask, self.scaling
            )
            h = h + layer.o.forward(out.reshape(rows, seq, -1))
            x = self._norm(layer.mlp_norm, h)
            h = h + layer.down.forward(F.silu(layer.gate.forward(x)) * layer.up.forward(x))
            h = steering.steer(index, h)
        return self.lm_head.forward(self._norm(self.final_norm, h[:, -keep:]))

    def _heads(self, projected: torch.Tensor, heads: int) -> torch.Tensor:
        """[rows, seq, heads * head_dim] -> [rows, heads, seq, head_dim]."""
        rows, seq, _ = projected.shape
        return projected.view(rows, seq, heads, self.head_dim).transpose(1, 2)


_MODULES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def has_hooks(model: torch.nn.Module) -> bool:
    """Whether a module of the model has forward hooks (which only the module path would call). Global hooks
    (torch.nn.modules.module.register_module_forward_hook) are not the model's: a profiler or a library
    may set them process-wide, and they must not change which step, and so which bits, a batch runs.
    Asked every step, so the modules are listed once (walking them costs a millisecond)."""
    if model not in _MODULES:
        _MODULES[model] = list(model.modules())
    return any(module._forward_hooks or module._forward_pre_hooks for module in _MODULES[model])
