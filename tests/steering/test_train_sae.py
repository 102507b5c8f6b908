import random
from types import SimpleNamespace

import pytest
import torch
from django.core.management import CommandError, call_command
from transformers import LlamaConfig, LlamaForCausalLM

from steering_app.engine import loader, training
from steering_app.engine.training import corpus, trainer
from steering_app.models import Dataset, Feature, LanguageModel, Training

pytestmark = pytest.mark.django_db

WORDS = [
    "rain",
    "sun",
    "cloud",
    "storm",
    "river",
    "tree",
    "stone",
    "bread",
    "cheese",
    "music",
    "guitar",
    "dance",
    "code",
    "python",
    "train",
    "ship",
]


@pytest.fixture
def tiny_model(tmp_path):
    """A 3-layer random Llama with SmolLM2's tokenizer, registered as `tiny`."""
    tokenizer = loader.load_model("smollm2-demo").tokenizer
    config = LlamaConfig(
        num_hidden_layers=3,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=256,
    )
    directory = tmp_path / "tiny"
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    call_command("register_model", "tiny", str(directory))
    return LanguageModel.objects.get(name="tiny")


@pytest.fixture
def text_file(dataset_dir):
    rng = random.Random(0)
    sentences = (" ".join(rng.choice(WORDS) for _ in range(12)) + "." for _ in range(600))
    path = dataset_dir / "corpus.txt"
    path.write_text("\n\n".join(sentences))
    return path


def train(text_file, out, *extra):
    call_command(
        "train_sae",
        "--model",
        "tiny",
        "--layer",
        "1",
        "--dataset",
        str(text_file),
        "--d-sae",
        "64",
        "--k",
        "4",
        "--tokens",
        "4000",
        "--epochs",
        "2",
        "--out",
        str(out),
        *extra,
    )


def test_it_trains_records_and_writes_a_checkpoint_import_sae_reads_back(tiny_model, text_file, tmp_path):
    train(text_file, tmp_path / "sae")

    training = Training.objects.get()
    assert training.status == Training.Status.COMPLETED and training.completed_at is not None
    assert (training.encoder_type, training.hook_layer, training.d_in, training.d_sae) == ("topk", 1, 32, 64)
    assert set(training.stats) == {"explained_variance", "l0", "dead_fraction"}
    assert 0 < training.stats["l0"] <= 4 and training.stats["explained_variance"] > 0
    assert training.features.count() == 64
    assert training.features.filter(max_activation__gt=0).exclude(label="").exists()
    assert training.dataset == Dataset.objects.get() and training.dataset.num_tokens >= 4000

    call_command("import_sae", "--model", "tiny", "--path", str(tmp_path / "sae"))

    imported = Training.objects.exclude(pk=training.pk).get()
    assert (imported.encoder_type, imported.hook_layer, imported.d_sae) == ("topk", 1, 64)


def test_it_marks_an_interrupted_training_failed(tiny_model, text_file, tmp_path, monkeypatch):
    original = trainer.train_sae

    def interrupted_after_one_step(*args, **kwargs):
        def on_step(stats):
            raise KeyboardInterrupt

        return original(*args, **{**kwargs, "on_step": on_step})

    monkeypatch.setattr(trainer, "train_sae", interrupted_after_one_step)

    with pytest.raises(CommandError, match="interrupted"):
        train(text_file, tmp_path / "sae")

    training = Training.objects.get()
    assert (training.status, training.error) == (Training.Status.FAILED, "interrupted")
    assert not Feature.objects.exists() and not (tmp_path / "sae" / "cfg.json").exists()
    assert training.dataset is None and not Dataset.objects.exists()


def test_it_refuses_a_dataset_outside_the_dataset_roots_and_records_nothing(
    tiny_model, data_dir, dataset_dir
):
    with pytest.raises(CommandError, match="not under a dataset root") as refused:
        call_command(
            "train_sae", "--model", "tiny", "--layer", "1", "--dataset", str(data_dir / "secret_key")
        )

    assert str(data_dir / "secret_key") in str(refused.value)
    assert str(data_dir / "datasets") in str(refused.value) and str(dataset_dir) in str(refused.value)
    assert not Training.objects.exists() and not Dataset.objects.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "nope", "--layer", "1", "--dataset", "demo"], "Unknown model"),
        (["--model", "tiny", "--layer", "3", "--dataset", "demo"], "out of range"),
        (["--model", "tiny", "--layer", "1", "--dataset", "/no/such/text"], "Unknown dataset"),
        (["--model", "tiny", "--layer", "1", "--dataset", "demo", "--k", "99", "--d-sae", "64"], "--k"),
    ],
)
def test_it_refuses_bad_arguments_and_creates_no_training(tiny_model, args, message):
    with pytest.raises(CommandError, match=message):
        call_command("train_sae", *args)
    assert not Training.objects.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--demo", "--model", "tiny"], "drop --model"),
        (["--model", "tiny", "--layer", "1"], "required"),
        (["--model", "tiny", "--layer", "1", "--dataset", "demo", "--prompts", "5"], "only go with --demo"),
    ],
)
def test_it_refuses_to_mix_the_demo_with_a_training_of_its_own(args, message):
    with pytest.raises(CommandError, match=message):
        call_command("train_sae", *args)
    assert not Training.objects.exists()


def test_it_rebuilds_the_demo_with_its_recipe_and_records_nothing(tmp_path, monkeypatch):
    """--demo rebuilds the demo as the engine's former argparse CLI did, with the same defaults."""
    calls = {}

    def load_model(source, device=None):
        calls["load_model"] = (source, device)
        return SimpleNamespace(model="model", tokenizer="tokenizer", device=torch.device("cpu"))

    def build_demo_corpus(model, tokenizer, path, **options):
        calls["corpus"] = (path, options)
        path.write_text("A document.")

    def train_from_texts(model, tokenizer, texts, layer, out_dir, **options):
        calls["train"] = (list(texts), layer, out_dir, options)
        stats = dict.fromkeys(("tokens", "explained_variance", "l0", "dead_fraction", "label_coverage"), 0)
        return training.TrainingRun(checkpoint=out_dir, stats=stats, features=[], timings={})

    monkeypatch.setattr(loader, "load_model", load_model)
    monkeypatch.setattr(corpus, "build_demo_corpus", build_demo_corpus)
    monkeypatch.setattr(training, "train_from_texts", train_from_texts)

    call_command("train_sae", "--demo", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work"))

    assert calls["load_model"] == ("smollm2-demo", None)
    corpus_options = {"seed": 0, "sampled_prompts": 560, "offline_tokens": 260_000}
    assert calls["corpus"] == (tmp_path / "work" / "corpus-seed0.txt", corpus_options)
    texts, layer, out_dir, options = calls["train"]
    assert (texts, layer, out_dir) == (["A document."], 10, tmp_path / "out" / "sae")
    assert options["config"] == training.TrainConfig(d_sae=2048, k=32, epochs=6.0, seed=0)
    assert options["tokens"] == 400_000 and options["dtype"] == torch.float16
    assert options["features_path"] == tmp_path / "out" / "features.json"
    assert options["activations_cache"] == tmp_path / "work" / "acts-seed0-L10.pt"
    assert (options["model_name"], options["dataset"]) == ("SmolLM2-135M-Instruct", "smollm2-demo-corpus")
    assert not (Training.objects.exists() or Dataset.objects.exists() or LanguageModel.objects.exists())
