"""Checkpoints written exactly as SAELens, Gemma Scope and Llama Scope publish them, and a hub cache holding
them, for import tests."""

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file


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


def write_gemma_scope_params(
    directory: Path, *, d_in: int = 576, d_sae: int = 64, seed: int = 0, arrays: dict | None = None
) -> Path:
    """A Gemma Scope ``params.npz`` (W_enc [d_in, d_sae], W_dec, b_enc, b_dec, threshold), float32.

    The thresholds sit around the pre-activations' median, so that some latents fire and some do not.
    """
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    values = {
        "W_enc": rng.standard_normal((d_in, d_sae)) / np.sqrt(d_in),
        "W_dec": rng.standard_normal((d_sae, d_in)) / np.sqrt(d_sae),
        "b_enc": rng.standard_normal(d_sae) * 0.1,
        "b_dec": rng.standard_normal(d_in) * 0.1,
        "threshold": np.abs(rng.standard_normal(d_sae)) * 0.5,
    }
    values = {name: array.astype(np.float32) for name, array in values.items()}
    values.update(arrays or {})
    np.savez(directory / "params.npz", **{name: value for name, value in values.items() if value is not None})
    return directory


def write_llama_scope_folder(
    directory: Path,
    *,
    act_fn: str = "jumprelu",
    d_model: int = 576,
    d_sae: int = 64,
    hook_point: str = "blocks.15.hook_resid_post",
    seed: int = 0,
    hyperparams: dict | None = None,
    tensors: dict | None = None,
    weights_file: str = "checkpoints/final.safetensors",
) -> Path:
    """An OpenMOSS Llama Scope folder: hyperparams.json + checkpoints/final.safetensors (nn.Linear tensors).

    Dataset-wise input and output norms differ, the decoder columns are not unit-norm and the decoder bias
    is subtracted before encoding, so that every folding of the conversion is exercised.
    """
    generator = torch.Generator().manual_seed(seed)
    weights = {
        "encoder.weight": torch.randn(d_sae, d_model, generator=generator) / d_model**0.5,
        "encoder.bias": torch.randn(d_sae, generator=generator) * 0.1,
        "decoder.weight": torch.randn(d_model, d_sae, generator=generator)
        * (0.5 + torch.rand(d_sae, generator=generator))
        / d_sae**0.5,
        "decoder.bias": torch.randn(d_model, generator=generator) * 0.1,
    }
    weights.update(tensors or {})
    params = {
        "hook_point_in": hook_point,
        "hook_point_out": hook_point,
        "d_model": d_model,
        "expansion_factor": d_sae // d_model if d_sae % d_model == 0 else 1,
        "d_sae": d_sae,
        "use_decoder_bias": True,
        "apply_decoder_bias_to_pre_encoder": True,
        "norm_activation": "dataset-wise",
        "dataset_average_activation_norm": {"in": 12.5, "out": 9.0},
        "sparsity_include_decoder_norm": True,
        "act_fn": act_fn,
        "jump_relu_threshold": 0.3,
        "top_k": 8,
    }
    params.update(hyperparams or {})
    params = {key: value for key, value in params.items() if value is not None}
    (directory / weights_file).parent.mkdir(parents=True, exist_ok=True)
    save_file({name: tensor.contiguous() for name, tensor in weights.items()}, directory / weights_file)
    (directory / "hyperparams.json").write_text(json.dumps(params))
    return directory


def write_hub_cache(cache_dir: Path, repo_id: str, files: dict[str, Path], commit: str = "a" * 40) -> Path:
    """A huggingface_hub cache holding files (path in repo -> local file) of repo_id at refs/main.

    Same layout as the hub writes: models--ORG--NAME/{refs/main, blobs/<hash>, snapshots/<commit>/<path>
    -> ../blobs/<hash>}.
    """
    storage = cache_dir / ("models--" + repo_id.replace("/", "--"))
    (storage / "refs").mkdir(parents=True, exist_ok=True)
    (storage / "refs" / "main").write_text(commit)
    (storage / "blobs").mkdir(exist_ok=True)
    snapshot = storage / "snapshots" / commit
    for path_in_repo, local in files.items():
        content = local.read_bytes()
        blob = storage / "blobs" / hashlib.sha256(content).hexdigest()
        blob.write_bytes(content)
        link = snapshot / path_in_repo
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return snapshot


def gemma_scope_reference(params: Path):
    """encode, decode as Gemma Scope defines them, in float64, from params.npz itself."""
    with np.load(params) as archive:
        p = {name: torch.from_numpy(archive[name]).double() for name in archive.files}

    def encode(x):
        pre = x.double() @ p["W_enc"] + p["b_enc"]
        return torch.relu(pre) * (pre > p["threshold"])

    def decode(f):
        return f.double() @ p["W_dec"] + p["b_dec"]

    return encode, decode


def llama_scope_reference(folder: Path, weights_file: str = "checkpoints/final.safetensors"):
    """encode, decode as OpenMOSS lm-saes computes them from hyperparams.json and its nn.Linear tensors,
    in float64: x' = x * sqrt(d) / norm_in (- decoder.bias), f = act(encoder(x')),
    reconstruction = decoder(f) / (sqrt(d) / norm_out)."""
    params = json.loads((folder / "hyperparams.json").read_text())
    w = {name: tensor.double() for name, tensor in load_file(folder / weights_file).items()}
    d = params["d_model"]
    norms = params["dataset_average_activation_norm"]
    # lm-saes keys the norms by "in"/"out" (2.x) or by hook point (1.x).
    norm_in = norms.get("in", norms.get(params["hook_point_in"]))
    norm_out = norms.get("out", norms.get(params["hook_point_out"]))
    scale_in, scale_out = d**0.5 / norm_in, d**0.5 / norm_out
    decoder_norm = w["decoder.weight"].norm(dim=0)

    def encode(x):
        x = x.double() * scale_in
        if params["apply_decoder_bias_to_pre_encoder"]:
            x = x - w["decoder.bias"]
        pre = x @ w["encoder.weight"].T + w["encoder.bias"]
        if params["act_fn"] == "jumprelu":
            return pre.where(pre > params["jump_relu_threshold"], 0)
        acts = pre.clamp(min=0)
        if params["act_fn"] == "relu":
            return acts
        score = acts * decoder_norm if params["sparsity_include_decoder_norm"] else acts
        top = score.topk(params["top_k"], dim=-1).indices
        return torch.zeros_like(acts).scatter(-1, top, acts.gather(-1, top))

    def decode(f):
        return (f.double() @ w["decoder.weight"].T + w["decoder.bias"]) / scale_out

    return encode, decode, decoder_norm
