"""engine.sae_formats: layout detection, the Llama Scope options each folded exactly, Gemma Scope 2's
params.safetensors, and the temporary folder that only becomes a converted checkpoint when accepted."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from steering_app.engine.saes.formats import Source, detect, staged
from steering_app.engine.saes.sae import SAEFormatError, load_sae
from tests.steering.sae_checkpoints import (
    gemma_scope_reference,
    llama_scope_reference,
    write_gemma_scope_params,
    write_llama_scope_folder,
    write_saelens_checkpoint,
)


def convert(tmp_path, folder, **source):
    with staged(Source(folder=folder, **source), tmp_path / "converted") as checkpoint:
        pass
    return checkpoint, load_sae(checkpoint.final)


def x(seed=1):
    return torch.randn(16, 576, generator=torch.Generator().manual_seed(seed)) * 0.5


def test_it_detects_each_layout_by_its_files(tmp_path):
    assert detect(write_saelens_checkpoint(tmp_path / "saelens"))[0] == "saelens"
    assert detect(write_gemma_scope_params(tmp_path / "gemma"))[0] == "gemma_scope"
    llama = write_llama_scope_folder(tmp_path / "llama", weights_file="sae_weights.safetensors")
    layout, inputs = detect(llama)
    assert layout == "llama_scope" and inputs[1].name == "sae_weights.safetensors"


def test_it_uses_a_saelens_folder_in_place(tmp_path):
    folder = write_saelens_checkpoint(tmp_path / "saelens")

    checkpoint, _ = convert(tmp_path, folder)

    assert checkpoint.path == checkpoint.final == folder
    assert not (tmp_path / "converted").exists()


@pytest.mark.parametrize(
    "hyperparams",
    [
        {"act_fn": "relu"},
        {"act_fn": "jumprelu", "apply_decoder_bias_to_pre_encoder": False, "jump_relu_threshold": -0.05},
        {"act_fn": "topk", "sparsity_include_decoder_norm": False},
        {"act_fn": "jumprelu", "dataset_average_activation_norm": {"blocks.15.hook_resid_post": 3.0}},
        {"act_fn": "relu", "d_sae": None, "expansion_factor": 1},
    ],
    ids=[
        "relu",
        "jumprelu-no-pre-bias-negative-threshold",
        "topk-plain-ranking",
        "norm-by-hook-name",
        "expansion",
    ],
)
def test_it_folds_each_llama_scope_option_exactly(tmp_path, hyperparams):
    d_sae = 576 if hyperparams.get("expansion_factor") else 64
    folder = write_llama_scope_folder(tmp_path / "llama", d_sae=d_sae, hyperparams=hyperparams)

    _, sae = convert(tmp_path, folder)

    encode, decode, _ = llama_scope_reference(folder)
    acts = encode(x())
    torch.testing.assert_close(sae.encode(x()).double(), acts, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae.decode(acts.float()).double(), decode(acts), rtol=1e-5, atol=1e-5)


def test_it_reads_a_llama_scope_folder_already_normalised_for_inference(tmp_path):
    folder = write_llama_scope_folder(
        tmp_path / "llama",
        hyperparams={"norm_activation": "inference", "dataset_average_activation_norm": None},
    )

    _, sae = convert(tmp_path, folder)

    # s_in = s_out = 1: the matrices are the nn.Linear weights transposed.
    original = load_file(folder / "checkpoints" / "final.safetensors")
    torch.testing.assert_close(sae.W_enc, original["encoder.weight"].T)
    torch.testing.assert_close(sae.W_dec, original["decoder.weight"].T)


def test_it_zeroes_the_encoder_of_a_topk_latent_with_a_dead_decoder(tmp_path):
    folder = write_llama_scope_folder(tmp_path / "llama", act_fn="topk")
    weights_path = folder / "checkpoints" / "final.safetensors"
    weights = load_file(weights_path)
    weights["decoder.weight"][:, 3] = 0
    save_file(weights, weights_path)

    _, sae = convert(tmp_path, folder)

    assert torch.all(sae.W_enc[:, 3] == 0) and sae.b_enc[3] == 0
    assert torch.isfinite(sae.W_dec).all()
    encode, decode, _ = llama_scope_reference(folder)
    torch.testing.assert_close(
        sae.decode(sae.encode(x())).double(), decode(encode(x())), rtol=1e-5, atol=1e-5
    )


def test_it_reads_gemma_scope_2_params_safetensors_with_lowercase_names(tmp_path):
    npz = write_gemma_scope_params(tmp_path / "npz")
    with np.load(npz / "params.npz") as archive:
        arrays = {name.replace("W_", "w_"): torch.from_numpy(archive[name]) for name in archive.files}
    folder = tmp_path / "resid_post" / "layer_9_width_16k_l0_small"
    folder.mkdir(parents=True)
    save_file(arrays, folder / "params.safetensors")

    _, sae = convert(tmp_path, folder)

    assert sae.hook_layer == 9
    encode, _ = gemma_scope_reference(npz / "params.npz")
    torch.testing.assert_close(sae.encode(x()).double(), encode(x()), rtol=1e-5, atol=1e-5)


def test_it_makes_a_negative_gemma_scope_threshold_behave_as_relu(tmp_path):
    folder = write_gemma_scope_params(
        tmp_path / "layer_2", arrays={"threshold": np.full(64, -0.2, dtype=np.float32)}
    )

    _, sae = convert(tmp_path, folder)

    encode, _ = gemma_scope_reference(folder / "params.npz")
    assert (encode(x()) >= 0).all()
    torch.testing.assert_close(sae.encode(x()).double(), encode(x()), rtol=1e-5, atol=1e-5)


def test_it_refuses_non_residual_gemma_scope_saes(tmp_path):
    folder = write_gemma_scope_params(tmp_path / "layer_2")

    with pytest.raises(SAEFormatError, match="not a residual-stream SAE"):
        convert(tmp_path, folder, name="google/gemma-scope-2b-pt-mlp/layer_2/width_16k/average_l0_10")

    assert list((tmp_path / "converted").iterdir()) == []


def test_it_removes_the_temporary_folder_when_the_caller_refuses_the_checkpoint(tmp_path):
    folder = write_gemma_scope_params(tmp_path / "layer_2")

    with pytest.raises(RuntimeError), staged(Source(folder=folder), tmp_path / "converted") as checkpoint:
        assert (checkpoint.path / "cfg.json").is_file() and checkpoint.path != checkpoint.final
        raise RuntimeError("d_in does not match")

    assert list((tmp_path / "converted").iterdir()) == []


def test_it_reconverts_when_the_source_changes(tmp_path):
    folder = write_gemma_scope_params(tmp_path / "layer_2")
    first, _ = convert(tmp_path, folder)
    write_gemma_scope_params(folder, seed=7)

    second, _ = convert(tmp_path, folder)

    assert first.final != second.final
    assert sorted(path.name for path in (tmp_path / "converted").iterdir()) == sorted(
        [first.final.name, second.final.name]
    )
