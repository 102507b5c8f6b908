import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from steering_app.engine.saes.sae import SAEFormatError, hook_layer_from_name, load_sae, save_sae

from .conftest import random_sae


def test_it_round_trips_the_saelens_layout(tmp_path):
    sae = random_sae(tmp_path, d_in=8, d_sae=12, hook_layer=3)
    assert (tmp_path / "cfg.json").is_file() and (tmp_path / "sae_weights.safetensors").is_file()
    tensors = load_file(tmp_path / "sae_weights.safetensors")
    assert {name: tuple(t.shape) for name, t in tensors.items()} == {
        "W_enc": (8, 12),
        "W_dec": (12, 8),
        "b_enc": (12,),
        "b_dec": (8,),
    }
    assert (sae.d_in, sae.d_sae, sae.architecture, sae.hook_layer) == (8, 12, "standard", 3)
    assert torch.equal(sae.W_enc, tensors["W_enc"])


def test_it_encodes_like_saelens_for_each_architecture(tmp_path):
    x = torch.randn(5, 8)
    standard = random_sae(tmp_path / "s", d_in=8)
    expected = torch.relu((x - standard.b_dec) @ standard.W_enc + standard.b_enc)
    assert torch.allclose(standard.encode(x), expected)
    assert torch.allclose(standard.decode(expected), expected @ standard.W_dec + standard.b_dec)

    topk = random_sae(tmp_path / "t", d_in=8, architecture="topk")
    f = topk.encode(x)
    assert ((f > 0).sum(-1) <= 4).all()
    pre = (x - topk.b_dec) @ topk.W_enc + topk.b_enc
    top = pre.topk(4, dim=-1)
    assert torch.allclose(f.gather(-1, top.indices), torch.relu(top.values))

    jump = random_sae(tmp_path / "j", d_in=8, architecture="jumprelu")
    pre = (x - jump.b_dec) @ jump.W_enc + jump.b_enc
    assert torch.allclose(jump.encode(x), pre * (pre > jump.threshold))


def test_it_encodes_selected_features_like_the_full_encoder(tmp_path):
    x = torch.randn(2, 3, 8)
    for architecture in ("standard", "topk", "jumprelu"):
        sae = random_sae(tmp_path / architecture, d_in=8, architecture=architecture)
        assert torch.allclose(sae.encode_features(x, [5, 1]), sae.encode(x)[..., [5, 1]])


def test_it_loads_onto_the_requested_dtype(tmp_path):
    random_sae(tmp_path, d_in=8)
    assert load_sae(tmp_path, dtype=torch.float64).W_dec.dtype == torch.float64


def test_it_maps_hook_names_to_block_outputs():
    assert hook_layer_from_name("blocks.10.hook_resid_post") == 10
    assert hook_layer_from_name("blocks.10.hook_resid_pre") == 9
    with pytest.raises(SAEFormatError, match="hook_name"):
        hook_layer_from_name("blocks.10.attn.hook_z")
    with pytest.raises(SAEFormatError):
        hook_layer_from_name("blocks.0.hook_resid_pre")


def _write(tmp_path, cfg: dict, tensors: dict):
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    save_file(tensors, str(tmp_path / "sae_weights.safetensors"))
    return tmp_path


def _tensors(d_in=4, d_sae=6):
    return {
        "W_enc": torch.zeros(d_in, d_sae),
        "W_dec": torch.zeros(d_sae, d_in),
        "b_enc": torch.zeros(d_sae),
        "b_dec": torch.zeros(d_in),
    }


@pytest.mark.parametrize(
    ("cfg", "tensors", "message"),
    [
        (
            {"d_in": 4, "d_sae": 6},
            {k: v for k, v in _tensors().items() if k != "b_dec"},
            "missing tensor 'b_dec'",
        ),
        ({"d_in": 4, "d_sae": 6}, {**_tensors(), "W_dec": torch.zeros(4, 6)}, r"W_dec has shape \[4, 6\]"),
        ({"d_sae": 6}, _tensors(), "missing key 'd_in'"),
        ({"d_in": 4, "d_sae": 6, "architecture": "gated"}, _tensors(), "unknown architecture 'gated'"),
        ({"d_in": 4, "d_sae": 6, "architecture": "topk"}, _tensors(), "missing key 'k'"),
        ({"d_in": 4, "d_sae": 6, "architecture": "jumprelu"}, _tensors(), "missing tensor 'threshold'"),
        (
            {"d_in": 4, "d_sae": 6, "normalize_activations": "expected_average_only_in"},
            _tensors(),
            "normalize",
        ),
    ],
)
def test_it_rejects_malformed_checkpoints_naming_the_problem(tmp_path, cfg, tensors, message):
    _write(tmp_path, cfg, tensors)
    with pytest.raises(SAEFormatError, match=message):
        load_sae(tmp_path)


def test_it_rejects_missing_files_and_bad_json(tmp_path):
    with pytest.raises(SAEFormatError, match="not a directory"):
        load_sae(tmp_path / "nope")
    with pytest.raises(SAEFormatError, match="missing file cfg.json"):
        load_sae(tmp_path)
    (tmp_path / "cfg.json").write_text("{not json")
    with pytest.raises(SAEFormatError, match="malformed cfg.json"):
        load_sae(tmp_path)
    (tmp_path / "cfg.json").write_text(json.dumps({"d_in": 4, "d_sae": 6}))
    with pytest.raises(SAEFormatError, match="missing file sae_weights.safetensors"):
        load_sae(tmp_path)


def test_it_refuses_to_save_mismatched_tensors(tmp_path):
    with pytest.raises(SAEFormatError, match="b_dec"):
        save_sae(tmp_path, torch.zeros(4, 6), torch.zeros(6, 4), torch.zeros(6), torch.zeros(5), {})
