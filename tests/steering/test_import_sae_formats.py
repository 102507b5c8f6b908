"""import_sae on Gemma Scope and Llama Scope checkpoints: converted once into the SAELens layout, with the
same encode and decode as the original; malformed ones refused with nothing created."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from django.core.management import CommandError, call_command

from steering_app import engine_config
from steering_app.engine.saes.sae import load_sae
from steering_app.models import Dataset, Feature, Training
from tests.steering.sae_checkpoints import (
    gemma_scope_reference,
    llama_scope_reference,
    write_gemma_scope_params,
    write_llama_scope_folder,
)

pytestmark = pytest.mark.django_db


@pytest.fixture
def data_dir(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "data"
    monkeypatch.setattr(engine_config.current, "data_dir", str(path))
    return path


def import_sae(*args):
    call_command("import_sae", "--model", "smollm2", *args)


def inputs(seed=1) -> torch.Tensor:
    """Residual-stream-like activations: norms around 12, as the dataset norm in the Llama Scope fixture."""
    return torch.randn(16, 576, generator=torch.Generator().manual_seed(seed)) * 0.5


def assert_same(ours: torch.Tensor, reference: torch.Tensor):
    torch.testing.assert_close(ours.double(), reference.double(), rtol=1e-5, atol=1e-5)


def converted_dirs(data_dir: Path) -> list[Path]:
    root = data_dir / "saes" / "converted"
    return sorted(root.iterdir()) if root.exists() else []


def test_it_imports_a_gemma_scope_params_npz_with_the_same_encode_and_decode(smollm2_row, tmp_path, data_dir):
    folder = write_gemma_scope_params(tmp_path / "layer_12" / "width_16k" / "average_l0_20")

    import_sae("--path", str(folder))

    training = Training.objects.get()
    assert (training.encoder_type, training.hook_layer, training.hook_name) == (
        "jumprelu",
        12,
        "blocks.12.hook_resid_post",
    )
    assert (training.d_in, training.d_sae, training.features.count()) == (576, 64, 64)
    assert converted_dirs(data_dir) == [Path(training.checkpoint_path)]
    sae = load_sae(training.checkpoint_path)
    encode, decode = gemma_scope_reference(folder / "params.npz")
    x = inputs()
    reference_acts = encode(x)
    assert 0 < (reference_acts > 0).sum() < reference_acts.numel()
    assert_same(sae.encode(x), reference_acts)
    assert_same(sae.decode(reference_acts.float()), decode(reference_acts))


@pytest.mark.parametrize("act_fn", ["jumprelu", "topk"])
def test_it_imports_a_llama_scope_folder_with_the_same_encode_and_decode(
    smollm2_row, tmp_path, data_dir, act_fn
):
    folder = write_llama_scope_folder(tmp_path / f"Llama-L15R-{act_fn}", act_fn=act_fn)

    import_sae("--path", str(folder))

    training = Training.objects.get()
    assert (training.encoder_type, training.hook_layer, training.hook_name) == (
        act_fn,
        15,
        "blocks.15.hook_resid_post",
    )
    sae = load_sae(training.checkpoint_path)
    encode, decode, decoder_norm = llama_scope_reference(folder)
    x = inputs()
    reference_acts = encode(x)
    assert 0 < (reference_acts != 0).sum() < reference_acts.numel()
    if act_fn == "topk":
        # lm-saes ranks TopK latents by f_i * ||decoder column i||; the conversion folds that norm into the
        # latents (engine/saes/formats.py), so activations carry it and the reconstruction is the same.
        assert sae.k == 8
        assert_same(sae.encode(x), reference_acts * decoder_norm)
        assert_same(sae.decode(sae.encode(x)), decode(reference_acts))
    else:
        assert_same(sae.encode(x), reference_acts)
        assert_same(sae.decode(reference_acts.float()), decode(reference_acts))


def test_it_converts_once_and_reuses_the_converted_checkpoint(smollm2_row, tmp_path, data_dir):
    folder = write_gemma_scope_params(tmp_path / "layer_3")

    import_sae("--path", str(folder))
    import_sae("--path", str(folder))

    first, second = Training.objects.order_by("pk")
    assert first.checkpoint_path == second.checkpoint_path
    assert len(converted_dirs(data_dir)) == 1


def test_it_takes_the_layer_option_when_the_path_names_none(smollm2_row, tmp_path, data_dir):
    import_sae("--path", str(write_gemma_scope_params(tmp_path / "my-sae")), "--layer", "7")

    training = Training.objects.get()
    assert (training.hook_layer, training.hook_name) == (7, "blocks.7.hook_resid_post")


def malformed(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    gemma = tmp_path / "gemma" / "layer_3"
    llama = tmp_path / "llama"
    no_weights = write_llama_scope_folder(llama / "no-weights")
    (no_weights / "checkpoints" / "final.safetensors").unlink()
    return {
        "unknown layout": (_mkdir(tmp_path / "empty"), "unknown SAE layout; expected cfg.json"),
        "Llama Scope weights missing": (no_weights, "hyperparams.json: Llama Scope SAE without weights"),
        "Gemma Scope wrong shape": (
            write_gemma_scope_params(gemma / "shape", arrays={"W_dec": np.zeros((64, 575), np.float32)}),
            r"params.npz: W_dec has shape \[64, 575\], expected \[64, 576\]",
        ),
        "Llama Scope wrong shape": (
            write_llama_scope_folder(llama / "shape", tensors={"encoder.weight": torch.zeros(64, 100)}),
            r"final.safetensors: encoder.weight has shape \[64, 100\], expected \[64, 576\]",
        ),
        "unknown act_fn": (
            write_llama_scope_folder(llama / "act", act_fn="gelu"),
            "hyperparams.json: unknown act_fn 'gelu'",
        ),
        "non-numeric array": (
            write_gemma_scope_params(gemma / "text", arrays={"b_dec": np.array(["a"] * 576)}),
            "params.npz: array 'b_dec' is not numeric",
        ),
        "Gemma Scope threshold missing": (
            write_gemma_scope_params(gemma / "nothreshold", arrays={"threshold": None}),
            "params.npz: missing array 'threshold'",
        ),
        "Llama Scope threshold missing": (
            write_llama_scope_folder(llama / "nothreshold", hyperparams={"jump_relu_threshold": None}),
            "hyperparams.json: act_fn 'jumprelu' needs jump_relu_threshold",
        ),
        "not a residual-stream hook": (
            write_llama_scope_folder(llama / "mlp", hook_point="blocks.15.hook_mlp_out"),
            "hook_point_in: hook_name 'blocks.15.hook_mlp_out' is not a residual-stream hook",
        ),
        "per-token normalisation": (
            write_llama_scope_folder(llama / "tokenwise", hyperparams={"norm_activation": "token-wise"}),
            "norm_activation 'token-wise' is not supported",
        ),
        "not an npz archive": (_write(gemma / "garbage" / "params.npz", b"not a zip"), "not a readable .npz"),
        "no layer anywhere": (write_gemma_scope_params(tmp_path / "my-sae"), "pass --layer"),
        "d_in mismatch after conversion": (
            write_gemma_scope_params(gemma / "narrow", d_in=16),
            "SAE d_in 16 does not match smollm2's hidden size 576",
        ),
        "layer out of range after conversion": (
            write_llama_scope_folder(llama / "deep", hook_point="blocks.40.hook_resid_post"),
            "Layer 40 is out of range",
        ),
        "deeply nested hyperparams.json": (
            nested_hyperparams(write_llama_scope_folder(llama / "nested")),
            "hyperparams.json: malformed hyperparams.json .*nested more than 64 levels",
        ),
        "d_model no float holds": (
            write_llama_scope_folder(llama / "wide", hyperparams={"d_model": 10**400}),
            "hyperparams.json: d_model must be an integer from 1 to 2147483647",
        ),
        "dataset norm no float holds": (
            write_llama_scope_folder(
                llama / "norm", hyperparams={"dataset_average_activation_norm": {"in": 10**400, "out": 9.0}}
            ),
            "hyperparams.json: dataset_average_activation_norm.in must be a finite number",
        ),
    }


def nested_hyperparams(folder: Path) -> Path:
    """The folder, its hyperparams.json holding 100,000 nested lists: json.loads alone raises RecursionError."""
    config = folder / "hyperparams.json"
    config.write_text('{"x": ' + "[" * 100_000 + "]" * 100_000 + ", " + config.read_text()[1:])
    return folder


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


def _write(path: Path, content: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path.parent


@pytest.mark.parametrize(
    "case",
    [
        "unknown layout",
        "Llama Scope weights missing",
        "Gemma Scope wrong shape",
        "Llama Scope wrong shape",
        "unknown act_fn",
        "non-numeric array",
        "Gemma Scope threshold missing",
        "Llama Scope threshold missing",
        "not a residual-stream hook",
        "per-token normalisation",
        "not an npz archive",
        "no layer anywhere",
        "d_in mismatch after conversion",
        "layer out of range after conversion",
        "deeply nested hyperparams.json",
        "d_model no float holds",
        "dataset norm no float holds",
    ],
)
def test_it_refuses_a_malformed_checkpoint_and_creates_nothing(smollm2_row, tmp_path, data_dir, case):
    folder, message = malformed(tmp_path)[case]

    with pytest.raises(CommandError, match=message):
        import_sae("--path", str(folder), "--dataset", "never-created")

    assert not Training.objects.exists() and not Feature.objects.exists() and not Dataset.objects.exists()
    assert converted_dirs(data_dir) == []


def test_it_names_the_file_of_an_unreadable_hyperparams_json(smollm2_row, tmp_path, data_dir):
    folder = write_llama_scope_folder(tmp_path / "llama")
    (folder / "hyperparams.json").write_text(json.dumps([1, 2]))

    with pytest.raises(CommandError, match=r"hyperparams.json: malformed hyperparams.json"):
        import_sae("--path", str(folder))

    assert not Training.objects.exists() and converted_dirs(data_dir) == []
