"""Checkpoints written exactly as SAELens saves them (cfg.json + sae_weights.safetensors), for import tests."""

import json
from pathlib import Path

import torch
from safetensors.torch import save_file


def write_saelens_checkpoint(
    directory: Path,
    *,
    d_in: int = 16,
    d_sae: int = 32,
    architecture: str = "standard",
    hook_name: str = "blocks.2.hook_resid_post",
    k: int | None = None,
    tensors: dict | None = None,
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    weights = {
        "W_enc": torch.randn(d_in, d_sae, generator=generator),
        "W_dec": torch.randn(d_sae, d_in, generator=generator),
        "b_enc": torch.zeros(d_sae),
        "b_dec": torch.zeros(d_in),
    }
    if architecture == "jumprelu":
        weights["threshold"] = torch.full((d_sae,), 0.1)
    weights.update(tensors or {})
    save_file(
        {name: tensor.contiguous() for name, tensor in weights.items()}, directory / "sae_weights.safetensors"
    )
    cfg = {
        "architecture": architecture,
        "d_in": d_in,
        "d_sae": d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            "model_name": "tiny-llama",
            "hook_name": hook_name,
            "hook_head_index": None,
            "prepend_bos": True,
            "dataset_path": "tiny",
            "context_size": 128,
        },
    }
    if architecture == "topk":
        cfg["k"] = k or 4
    (directory / "cfg.json").write_text(json.dumps(cfg))
    return directory
