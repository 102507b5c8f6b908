import pytest
from django.core.management import CommandError, call_command
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from steering_app import engine_config
from steering_app.models import LanguageModel

pytestmark = pytest.mark.django_db


@pytest.fixture
def tiny_gpt2_dir(tmp_path):
    config = GPT2Config(n_layer=3, n_embd=24, n_head=2, vocab_size=64, n_positions=64)
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    return tmp_path / "gpt2"


@pytest.fixture
def tiny_llama_dir(tmp_path):
    config = LlamaConfig(
        num_hidden_layers=5,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
    )
    LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    return tmp_path / "llama"


def test_it_registers_a_local_gpt2_directory(tiny_gpt2_dir):
    call_command("register_model", "tiny-gpt2", str(tiny_gpt2_dir))

    model = LanguageModel.objects.get(name="tiny-gpt2")
    assert (model.architecture, model.num_layers, model.hidden_size) == ("GPT2LMHeadModel", 3, 24)
    assert model.status == LanguageModel.Status.READY and model.source == str(tiny_gpt2_dir)


def test_it_updates_a_model_registered_again_instead_of_duplicating(tiny_gpt2_dir, tiny_llama_dir):
    call_command("register_model", "lab-model", str(tiny_gpt2_dir))
    call_command("register_model", "lab-model", str(tiny_llama_dir))

    model = LanguageModel.objects.get()
    assert (model.architecture, model.num_layers, model.hidden_size) == ("LlamaForCausalLM", 5, 32)


@pytest.mark.slow
def test_it_registers_the_smollm2_gguf_and_caches_it_as_safetensors():
    from steering_app.engine import loader

    call_command("register_model", "SmolLM2-135M-Instruct", "smollm2-demo")

    model = LanguageModel.objects.get()
    assert (model.architecture, model.num_layers, model.hidden_size) == ("LlamaForCausalLM", 30, 576)
    cache = loader.data_dir() / "models" / "SmolLM2-135M-Instruct.Q4_1"
    assert (cache / "config.json").is_file() and list(cache.glob("*.safetensors"))


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("/nonexistent/model.gguf", "no such GGUF file"),
        ("no-such-org/no-such-model", "no-such-org/no-such-model"),
    ],
)
def test_it_refuses_a_source_it_cannot_load(source, message):
    with pytest.raises(CommandError, match=message):
        call_command("register_model", "broken", source)
    assert not LanguageModel.objects.exists()


def test_it_refuses_a_directory_without_a_model(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CommandError, match="Cannot load model source"):
        call_command("register_model", "broken", str(tmp_path / "empty"))
    assert not LanguageModel.objects.exists()


def gpt2_parameters(tiny_gpt2_dir) -> int:
    return sum(parameter.numel() for parameter in GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir).parameters())


def test_it_refuses_a_model_larger_than_the_free_memory_and_creates_nothing(tiny_gpt2_dir, monkeypatch):
    monkeypatch.setattr(engine_config.current, "device", "cpu")
    monkeypatch.setattr(engine_config.current, "dtype", "float32")
    monkeypatch.setattr("steering_app.engine.loader.free_bytes", lambda device: 1000)
    needed = gpt2_parameters(tiny_gpt2_dir) * 4

    with pytest.raises(CommandError, match=rf"need {needed:,} bytes .* in float32 on cpu, and 1,000 bytes"):
        call_command("register_model", "tiny-gpt2", str(tiny_gpt2_dir))

    assert not LanguageModel.objects.exists()


def test_it_sizes_the_model_in_steerlab_dtype(tiny_gpt2_dir, monkeypatch):
    float32_bytes = gpt2_parameters(tiny_gpt2_dir) * 4
    monkeypatch.setattr(engine_config.current, "device", "cpu")
    monkeypatch.setattr("steering_app.engine.loader.free_bytes", lambda device: float32_bytes - 1)

    monkeypatch.setattr(engine_config.current, "dtype", "float32")
    with pytest.raises(CommandError, match="does not fit"):
        call_command("register_model", "tiny-gpt2", str(tiny_gpt2_dir))
    monkeypatch.setattr(engine_config.current, "dtype", "bfloat16")
    call_command("register_model", "tiny-gpt2", str(tiny_gpt2_dir))

    assert LanguageModel.objects.get().name == "tiny-gpt2"


def test_it_registers_a_model_too_large_for_this_machine_when_told_to_skip_the_check(
    tiny_gpt2_dir, monkeypatch
):
    monkeypatch.setattr("steering_app.engine.loader.free_bytes", lambda device: 0)

    call_command("register_model", "tiny-gpt2", str(tiny_gpt2_dir), "--skip-memory-check")

    assert LanguageModel.objects.get().name == "tiny-gpt2"
