import hashlib
import io
import json
import random
from types import SimpleNamespace

import pytest
from django.core.management import CommandError, call_command
from transformers import LlamaConfig, LlamaForCausalLM

from steering_app.engine import demo, loader, training
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


@pytest.fixture
def reproducible_runs(monkeypatch):
    """The calls to run_reproducibly, made here instead of in a spawned process: (function, args, kwargs)."""
    from steering_app.engine.training import reproducible

    calls = []

    def run(function, *args, **kwargs):
        calls.append((function, args, kwargs))
        stats = dict.fromkeys(("tokens", "explained_variance", "l0", "dead_fraction", "label_coverage"), 0)
        return training.TrainingRun(checkpoint=args[0], stats=stats, features=[], timings={})

    monkeypatch.setattr(reproducible, "run_reproducibly", run)
    return calls


def test_it_rebuilds_the_demo_from_the_shipped_corpus_ids_and_records_nothing(tmp_path, reproducible_runs):
    """--demo trains from the shipped token ids with the demo's recipe, in the CPU-independent process."""
    call_command("train_sae", "--demo", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work"))

    ((function, args, options),) = reproducible_runs
    assert function is training.train_demo and args == (tmp_path / "out", demo.DEMO_IDS)
    assert options["config"] == training.TrainConfig(d_sae=2048, k=32, epochs=6.0, seed=0)
    assert options["tokens"] == 400_000 and options["device"] is None
    digest = hashlib.sha256(demo.DEMO_IDS.read_bytes()).hexdigest()
    assert options["activations_cache"] == tmp_path / "work" / f"acts-{digest[:16]}-L10.pt"
    assert not (Training.objects.exists() or Dataset.objects.exists() or LanguageModel.objects.exists())


def test_it_resamples_the_demo_corpus_into_out_when_asked(tmp_path, monkeypatch, reproducible_runs):
    tokenizer = loader.load_model("smollm2-demo").tokenizer
    built = {}

    def build_demo_corpus(model, tokenizer, path, **options):
        built[path] = options
        corpus.write_corpus(path, ["A document.", "Another one."])

    monkeypatch.setattr(
        loader, "load_model", lambda source, device=None: SimpleNamespace(model="model", tokenizer=tokenizer)
    )
    monkeypatch.setattr(corpus, "build_demo_corpus", build_demo_corpus)

    call_command(
        "train_sae",
        "--demo",
        "--resample",
        "--prompts",
        "7",
        "--out",
        str(tmp_path / "out"),
        "--work",
        str(tmp_path / "work"),
    )

    assert built == {
        tmp_path / "work" / "corpus-seed0.txt": {"seed": 0, "sampled_prompts": 7, "offline_tokens": 260_000}
    }
    ((_function, args, _options),) = reproducible_runs
    assert args == (tmp_path / "out", tmp_path / "out" / demo.DEMO_IDS.name)
    ids = corpus.read_token_ids(args[1])
    documents = list(corpus.token_documents(ids, tokenizer.eos_token_id))
    assert [tokenizer.decode(document) for document in documents] == ["A document.", "Another one."]


def test_it_samples_a_demo_corpus_only_with_resample(tmp_path, reproducible_runs):
    with pytest.raises(CommandError, match="only go with --resample"):
        call_command("train_sae", "--demo", "--offline-tokens", "10", "--work", str(tmp_path))
    assert not reproducible_runs


# sha256 of sae_weights.safetensors that the small demo training below writes, on each CPU of this machine kind:
# run_reproducibly makes it the same from run to run and whatever the parent process's kernel settings, but the
# two vendors part somewhere (steering_app/demo/README.md; bench/reproducible_kernels.py fingerprints the kernels).
SMALL_DEMO_WEIGHTS_SHA256 = {
    "f8ece0c32d5765795f068c1008e9aba3c79ec07acd5e85d29c32eb31493b3770": "AMD EPYC (AVX-512, no AMX)",
    "37743e2c9e3fc43f3332cc0da9bd8d2fb0cf912c8348d8185a2ba6787fd8582c": "Intel Xeon (AVX-512, AMX)",
}
# One forward of collect_activations' batch (32 rows of 128 packed tokens) holds the first 4,064 non-special tokens
# of the corpus: 4,096 would cost a second forward, the slowest part of the test under MKL's reproducible path,
# for 32 tokens more.
SMALL_DEMO_TOKENS = 4000


@pytest.mark.slow
def test_it_retrains_the_demo_bit_for_bit_from_the_shipped_ids(tmp_path):
    """A small SAE from the first 4,000 tokens of the shipped demo corpus: the weights measured on this CPU kind."""
    call_command(
        "train_sae",
        "--demo",
        "--tokens",
        str(SMALL_DEMO_TOKENS),
        "--d-sae",
        "256",
        "--k",
        "16",
        "--epochs",
        "3",
        "--out",
        str(tmp_path / "out"),
        "--work",
        str(tmp_path / "work"),
        stdout=io.StringIO(),
    )

    weights = (tmp_path / "out" / "sae" / "sae_weights.safetensors").read_bytes()
    features = json.loads((tmp_path / "out" / "features.json").read_text())
    assert len(features) == 256 and sum(entry["max_activation"] > 0 for entry in features) > 200
    assert hashlib.sha256(weights).hexdigest() in SMALL_DEMO_WEIGHTS_SHA256
