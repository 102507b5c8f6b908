import json
import threading
from pathlib import Path

import pytest
import torch

from steering_app import engine_config
from steering_app.engine import loader
from steering_app.engine.loader import (
    data_dir,
    describe_model,
    get_embedder,
    load_model,
    load_sae_cached,
    resolve_device,
    resolve_dtype,
)
from steering_app.model_files import DEMO_MODEL, resolve_source

from .conftest import random_sae


def test_it_resolves_the_demo_model_to_the_bundled_gguf():
    path = Path(resolve_source(DEMO_MODEL))
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    assert resolve_source("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"


def test_it_reads_the_data_dir_and_device_from_the_engine_config(monkeypatch, tmp_path):
    monkeypatch.setattr(engine_config.current, "data_dir", str(tmp_path))
    assert data_dir() == tmp_path
    monkeypatch.setattr(engine_config.current, "device", "cpu")
    assert resolve_device() == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="tpu"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda:0")


def test_it_reads_the_dtype_from_the_engine_config_with_float32_as_a_cpus_auto(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(engine_config.current, "dtype", "auto")
    assert resolve_dtype(cpu) == torch.float32
    monkeypatch.setattr(engine_config.current, "dtype", "float16")
    assert resolve_dtype(cpu) == torch.float16
    assert (
        resolve_dtype(cpu, "bfloat16") == torch.bfloat16
        and resolve_dtype(cpu, torch.float32) == torch.float32
    )
    with pytest.raises(ValueError, match="fp8"):
        resolve_dtype(cpu, "fp8")


def test_it_loads_and_caches_a_model_per_dtype(monkeypatch, tmp_path, smollm2):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=len(smollm2.tokenizer), n_positions=32)
    GPT2LMHeadModel(config).save_pretrained(tmp_path)
    smollm2.tokenizer.save_pretrained(tmp_path)

    monkeypatch.setattr(engine_config.current, "dtype", "bfloat16")
    half = load_model(str(tmp_path), device="cpu")
    monkeypatch.setattr(engine_config.current, "dtype", "auto")
    full = load_model(str(tmp_path), device="cpu")

    assert half.dtype == torch.bfloat16 and full.dtype == torch.float32
    assert load_model(str(tmp_path), device="cpu", dtype="bfloat16") is half


def test_it_reports_a_loads_progress_from_0_to_1_and_nothing_for_a_cached_model(tmp_path, smollm2):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=len(smollm2.tokenizer), n_positions=32)
    GPT2LMHeadModel(config).save_pretrained(tmp_path)
    smollm2.tokenizer.save_pretrained(tmp_path)
    heard, again = [], []

    loaded = load_model(
        str(tmp_path), device="cpu", progress=lambda fraction, stage: heard.append((fraction, stage))
    )

    fractions = [fraction for fraction, _ in heard]
    assert fractions[0] == 0.0 and fractions[-1] == 1.0 and fractions == sorted(fractions), heard
    assert [stage for _, stage in heard] == ["starting", "reading the weights", "moving it to cpu", "loaded"]
    assert load_model(str(tmp_path), device="cpu", progress=lambda *report: again.append(report)) is loaded
    assert again == []


def test_it_caches_the_dequantized_gguf_as_safetensors(smollm2):
    assert load_model(DEMO_MODEL, device="cpu") is smollm2
    assert (smollm2.architecture, smollm2.num_layers, smollm2.hidden_size) == ("LlamaForCausalLM", 30, 576)
    cached = data_dir() / "models" / "SmolLM2-135M-Instruct.Q4_1"
    assert (cached / "model.safetensors").is_file() and (cached / "tokenizer.json").is_file()
    assert "quantization_config" not in json.loads((cached / "config.json").read_text())
    assert describe_model(DEMO_MODEL) == {
        "architecture": "LlamaForCausalLM",
        "num_layers": 30,
        "hidden_size": 576,
    }


def test_it_loads_a_local_directory_once_for_concurrent_callers(smollm2, tmp_path, monkeypatch):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(
        GPT2Config(vocab_size=len(smollm2.tokenizer), n_embd=16, n_layer=2, n_head=2)
    ).save_pretrained(tmp_path)
    smollm2.tokenizer.save_pretrained(tmp_path)
    calls = []
    real = loader._load_pretrained

    def counting(source, dtype, progress):
        calls.append(source)
        return real(source, dtype, progress)

    monkeypatch.setattr(loader, "_load_pretrained", counting)
    results = [None] * 4
    start = threading.Barrier(4)

    def worker(i):
        start.wait()
        results[i] = load_model(str(tmp_path), device="cpu")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1 and all(result is results[0] for result in results)
    assert (results[0].architecture, results[0].num_layers, results[0].hidden_size) == (
        "GPT2LMHeadModel",
        2,
        16,
    )
    assert describe_model(str(tmp_path)) == {
        "architecture": "GPT2LMHeadModel",
        "num_layers": 2,
        "hidden_size": 16,
    }


def test_it_caches_saes_on_the_models_device_and_dtype(smollm2, tmp_path):
    random_sae(tmp_path, d_in=576, d_sae=8)
    sae = load_sae_cached(tmp_path, smollm2)
    assert load_sae_cached(str(tmp_path), smollm2) is sae
    assert sae.W_dec.dtype == smollm2.dtype and sae.W_dec.device == smollm2.device


def test_it_loads_the_embedder_offline_from_the_bundled_package(monkeypatch):
    embedder = get_embedder()
    assert get_embedder() is embedder
    monkeypatch.setattr(engine_config.current, "embedder", loader.embedder_source())
    assert get_embedder() is embedder
