"""Control-vector files: llama.cpp GGUF export and import, repeng's GGUF, per-layer tensor files, bad input."""

import numpy as np
import pytest
import torch
from gguf import GGUFReader, GGUFWriter
from safetensors.torch import save_file

from steering_app.engine.control_vectors import ControlVectorError, read_file, write_gguf

N_EMBD = 16
NUM_LAYERS = 6


def random_vectors(layers) -> dict[int, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {layer: torch.randn(N_EMBD, generator=generator) * 10 ** (layer - 3) for layer in layers}


def write_like_repeng(path, directions: dict[int, np.ndarray], model_type: str = "llama"):
    """repeng's ControlVector.export_gguf (repeng/extract.py), line for line but the loop's spelling."""
    arch = "controlvector"
    writer = GGUFWriter(path, arch)
    writer.add_string(f"{arch}.model_hint", model_type)
    writer.add_uint32(f"{arch}.layer_count", len(directions))
    for layer, direction in directions.items():
        writer.add_tensor(f"direction.{layer}", direction)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_it_round_trips_a_gguf_bit_for_bit(tmp_path):
    vectors = random_vectors([1, 2, 5])
    vectors[2][3] = 1e-42  # a subnormal float32 survives too

    path = write_gguf(tmp_path / "planet.gguf", vectors, "SmolLM2-135M-Instruct")
    read = read_file(path, N_EMBD, NUM_LAYERS)

    assert list(read) == [1, 2, 5]
    for layer, vector in vectors.items():
        assert read[layer].dtype == torch.float32
        assert torch.equal(read[layer].view(torch.int32), vector.view(torch.int32))


def test_it_writes_what_llama_cpp_reads(tmp_path):
    """common.cpp's loader: F32 1-D tensors named direction.N; repeng's metadata keys beside them."""
    path = write_gguf(tmp_path / "v.gguf", random_vectors([3, 1]), "SmolLM2-135M-Instruct")

    reader = GGUFReader(path)
    assert reader.get_field("general.architecture").contents() == "controlvector"
    assert reader.get_field("controlvector.model_hint").contents() == "SmolLM2-135M-Instruct"
    assert reader.get_field("controlvector.layer_count").contents() == 2
    assert [(t.name, t.tensor_type.name, list(t.shape)) for t in reader.tensors] == [
        ("direction.1", "F32", [N_EMBD]),
        ("direction.3", "F32", [N_EMBD]),
    ]


def test_it_reads_a_repeng_gguf(tmp_path):
    # repeng's default layers run from the last block down, in that order; its ids are block indices.
    directions = {
        layer: np.random.default_rng(layer).standard_normal(N_EMBD, dtype=np.float32)
        for layer in range(NUM_LAYERS - 1, 0, -1)
    }
    write_like_repeng(tmp_path / "honesty.gguf", directions)

    read = read_file(tmp_path / "honesty.gguf", N_EMBD, NUM_LAYERS)

    assert list(read) == [1, 2, 3, 4, 5]
    for layer, direction in directions.items():
        assert np.array_equal(read[layer].numpy(), direction)


def test_it_reads_a_repeng_gguf_with_block_0(tmp_path):
    """repeng may steer block 0, which llama.cpp refuses; SteerLab can steer it, so the import keeps it."""
    direction = np.arange(N_EMBD, dtype=np.float32)
    write_like_repeng(tmp_path / "v.gguf", {0: direction})

    assert np.array_equal(read_file(tmp_path / "v.gguf", N_EMBD, NUM_LAYERS)[0].numpy(), direction)


def save_npy(path, vectors):
    np.save(path, torch.stack([vectors[layer] for layer in sorted(vectors)]).numpy())


def save_pt_tensor(path, vectors):
    torch.save(torch.stack([vectors[layer] for layer in sorted(vectors)]), path)


def save_pt_dict(path, vectors):
    torch.save(vectors, path)


def save_safetensors_one(path, vectors):
    save_file({"vectors": torch.stack([vectors[layer] for layer in sorted(vectors)])}, path)


def save_safetensors_keyed(path, vectors):
    save_file({f"direction.{layer}": vector for layer, vector in vectors.items()}, path)


PER_LAYER_FILES = [
    ("v.npy", save_npy),
    ("v.pt", save_pt_tensor),
    ("v.pt", save_pt_dict),
    ("v.safetensors", save_safetensors_one),
    ("v.safetensors", save_safetensors_keyed),
]


@pytest.mark.parametrize(("name", "save"), PER_LAYER_FILES)
def test_it_reads_one_vector_per_layer(tmp_path, name, save):
    vectors = random_vectors(range(NUM_LAYERS))
    save(tmp_path / name, vectors)

    read = read_file(tmp_path / name, N_EMBD, NUM_LAYERS)

    assert list(read) == list(range(NUM_LAYERS))
    for layer, vector in vectors.items():
        assert torch.equal(read[layer], vector)


def test_it_reads_half_precision_as_float32(tmp_path):
    vectors = {layer: vector.half() for layer, vector in random_vectors(range(NUM_LAYERS)).items()}
    save_npy(tmp_path / "v.npy", vectors)

    read = read_file(tmp_path / "v.npy", N_EMBD, NUM_LAYERS)

    assert read[4].dtype == torch.float32
    assert torch.equal(read[4], vectors[4].float())


def test_it_refuses_a_wrong_n_embd(tmp_path):
    write_gguf(tmp_path / "v.gguf", random_vectors([2]), "other")
    save_npy(tmp_path / "v.npy", random_vectors(range(NUM_LAYERS)))

    with pytest.raises(ControlVectorError, match=r"v\.gguf, layer 2: a vector of 16 values .* n_embd is 576"):
        read_file(tmp_path / "v.gguf", 576, NUM_LAYERS)
    with pytest.raises(ControlVectorError, match=r"v\.npy, layer 0: a vector of 16 values .* n_embd is 576"):
        read_file(tmp_path / "v.npy", 576, NUM_LAYERS)


def test_it_refuses_a_layer_outside_the_model(tmp_path):
    write_gguf(tmp_path / "v.gguf", random_vectors([2, NUM_LAYERS]), "bigger")

    with pytest.raises(ControlVectorError, match=r"layer 6: the model has blocks 0 to 5 only"):
        read_file(tmp_path / "v.gguf", N_EMBD, NUM_LAYERS)


@pytest.mark.parametrize(
    ("name", "save", "layers", "message"),
    [
        ("v.npy", save_npy, range(NUM_LAYERS - 1), r"5 vectors for a model of 6 layers \(missing layers 5\)"),
        ("v.safetensors", save_safetensors_keyed, [0, 1, 4], r"3 vectors .* \(missing layers 2-3, 5\)"),
        ("v.pt", save_pt_tensor, range(NUM_LAYERS + 1), r"7 vectors for a model of 6 layers$"),
    ],
)
def test_it_refuses_missing_layers(tmp_path, name, save, layers, message):
    path = tmp_path / name
    save(path, random_vectors(layers))

    with pytest.raises(ControlVectorError, match=message):
        read_file(path, N_EMBD, NUM_LAYERS)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_it_refuses_non_finite_values(tmp_path, bad):
    vectors = random_vectors(range(NUM_LAYERS))
    vectors[3][7] = bad
    write_like_repeng(tmp_path / "v.gguf", {3: vectors[3].numpy()})
    save_pt_dict(tmp_path / "v.pt", vectors)

    for name in ("v.gguf", "v.pt"):
        with pytest.raises(ControlVectorError, match=rf"{name}, layer 3: 1 NaN or infinite values"):
            read_file(tmp_path / name, N_EMBD, NUM_LAYERS)
    with pytest.raises(ControlVectorError, match=r"layer 3: 1 NaN or infinite values"):
        write_gguf(tmp_path / "out.gguf", {3: vectors[3]}, "x")


def test_it_refuses_an_unreadable_file(tmp_path):
    for name in ("v.gguf", "v.npy", "v.pt", "v.safetensors"):
        (tmp_path / name).write_bytes(b"not a tensor file at all")
        with pytest.raises(ControlVectorError, match=rf"{name}: "):
            read_file(tmp_path / name, N_EMBD, NUM_LAYERS)


def test_it_refuses_an_unknown_or_missing_file(tmp_path):
    (tmp_path / "v.txt").write_text("0.1 0.2")

    with pytest.raises(ControlVectorError, match=r"v\.txt: unknown format \.txt; expected \.gguf"):
        read_file(tmp_path / "v.txt", N_EMBD, NUM_LAYERS)
    with pytest.raises(ControlVectorError, match=r"nothing\.gguf: no such file"):
        read_file(tmp_path / "nothing.gguf", N_EMBD, NUM_LAYERS)


def test_it_refuses_a_model_gguf(tmp_path):
    writer = GGUFWriter(tmp_path / "model.gguf", "llama")
    writer.add_tensor("token_embd.weight", np.zeros((4, N_EMBD), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    with pytest.raises(ControlVectorError, match=r"architecture 'llama', not a control vector"):
        read_file(tmp_path / "model.gguf", N_EMBD, NUM_LAYERS)


def test_it_refuses_to_export_what_llama_cpp_rejects(tmp_path):
    with pytest.raises(ControlVectorError, match=r"rejects direction\.0"):
        write_gguf(tmp_path / "v.gguf", random_vectors([0, 1]), "x")
    with pytest.raises(ControlVectorError, match=r"no layer to export"):
        write_gguf(tmp_path / "v.gguf", {}, "x")
    assert not (tmp_path / "v.gguf").exists()
