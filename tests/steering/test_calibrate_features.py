"""manage.py calibrate_features: an imported SAE without a feature table gets its features measured.

The demo SAE is imported a second time without features.json and calibrated on the demo corpus (its shipped
token ids, nothing sampled); its measurements must agree with the shipped demo table, and steering must work
with them.
"""

import io
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from steering_app import runs
from steering_app.engine.demo import DEMO_CHECKPOINT, DEMO_FEATURES, DEMO_MODEL, DEMO_MODEL_NAME
from steering_app.engine.training import corpus
from steering_app.management.commands import calibrate_features
from steering_app.models import Calibration, Dataset, Feature, LanguageModel, SteeringRun, Training
from steering_app.runs import RunRequest
from steering_app.steering_settings import SteeringSettings

FIXTURES = Path(__file__).parent / "fixtures"
DEMO_ANSWERS = FIXTURES / "demo_answers.json"
# The first tokens of the shipped demo corpus ids, the tokens the demo table was measured on (all 333,404 of them
# reproduce it; tests/engine/test_demo_corpus.py checks that in seconds): a max activation seen here is at most
# the table's, and a max activation is an extreme statistic, so only some come within 10%. 16,000 fill four of
# collect_activations' batches (32 rows of 128); each of the 50 most frequent features fires within them, and CAKE's
# top tokens are already bakery and baking words (in the first 12,000, three batches, they are boxes and beaches).
CALIBRATION_TOKENS = 16_000
TOP_FREQUENT = 50
TOLERANCE = 0.10
PLANET, CAKE = 1681, 1083


def demo_table() -> list[dict]:
    return json.loads(DEMO_FEATURES.read_text())


@pytest.fixture(scope="module")
def calibrated(django_db_setup, django_db_blocker):
    """The demo SAE imported without its table and calibrated on the demo corpus once for the whole module:
    (training id, calibration id, command output). Committed outside the tests' transactions, deleted
    afterwards."""
    out = io.StringIO()
    with django_db_blocker.unblock():
        call_command("register_model", DEMO_MODEL_NAME, DEMO_MODEL, stdout=io.StringIO())
        call_command(
            "import_sae", "--model", DEMO_MODEL_NAME, "--path", str(DEMO_CHECKPOINT), stdout=io.StringIO()
        )
        training = Training.objects.get(model__name=DEMO_MODEL_NAME)
        call_command(
            "calibrate_features", "--training", training.pk, "--tokens", CALIBRATION_TOKENS, stdout=out
        )
        calibration = Calibration.objects.get(training=training)
        yield training.pk, calibration.pk, out.getvalue()
        Training.objects.filter(pk=training.pk).delete()
        LanguageModel.objects.filter(name=DEMO_MODEL_NAME).delete()
        Dataset.objects.filter(source="demo").delete()


def measured(training_id) -> dict[int, Feature]:
    return {feature.index: feature for feature in Feature.objects.filter(training_id=training_id)}


@pytest.mark.slow
@pytest.mark.django_db
def test_it_measures_the_max_activations_of_the_demo_table(calibrated):
    training_id, calibration_id, _ = calibrated
    features = measured(training_id)
    most_frequent = sorted(demo_table(), key=lambda entry: -entry["activation_frequency"])[:TOP_FREQUENT]

    ratios = {
        entry["index"]: features[entry["index"]].max_activation / entry["max_activation"]
        for entry in most_frequent
    }
    print(
        f"max activation / demo table's, top {TOP_FREQUENT}: {min(ratios.values()):.3f}..{max(ratios.values()):.3f}"
    )

    close = [index for index, ratio in ratios.items() if abs(ratio - 1) <= TOLERANCE]
    print(f"within {TOLERANCE:.0%}: {len(close)} of {TOP_FREQUENT}")
    # The table's max is over every token these are the first of (float16 rounding aside), and each of these
    # frequent features fires within them.
    assert all(0 < ratio <= 1.001 for ratio in ratios.values()), ratios
    calibration = Calibration.objects.get(pk=calibration_id)
    assert calibration.status == Calibration.Status.COMPLETED and calibration.error == ""
    assert calibration.tokens_seen == calibration.tokens_target == CALIBRATION_TOKENS
    assert calibration.dataset.name == calibration.dataset.source == "demo"
    assert calibration.progress == 1.0 and calibration.finished_at >= calibration.started_at
    assert all(features[entry["index"]].examples for entry in most_frequent)
    assert all("«" in example for example in features[most_frequent[0]["index"]].examples)


@pytest.mark.slow
@pytest.mark.django_db
def test_it_labels_features_from_their_top_tokens(calibrated):
    training_id, _, _ = calibrated
    features = measured(training_id)
    table = demo_table()

    for index, word in ((PLANET, "planet"), (CAKE, "cake")):
        label = features[index].label
        print(f"#{index}: {label!r} (demo table: {table[index]['label']!r})")
        words = {word, *(token.lower() for token in table[index]["top_tokens"] if token.isalpha())}
        assert any(candidate in label.lower() for candidate in words), label
        assert features[index].top_tokens and len(features[index].examples) == 5
    assert not Feature.objects.filter(
        training_id=training_id, label__startswith="feature #", max_activation__gt=0
    )


@pytest.mark.slow
@pytest.mark.django_db
def test_it_prints_its_progress(calibrated):
    _, calibration_id, output = calibrated

    assert (
        f"Calibration {calibration_id}: {CALIBRATION_TOKENS} / {CALIBRATION_TOKENS} tokens seen (100%)"
        in output
    )
    assert f"Calibration {calibration_id} completed: {CALIBRATION_TOKENS} tokens" in output


@pytest.mark.slow
@pytest.mark.django_db
def test_it_steers_with_the_recalibrated_scale(calibrated, owner):
    training_id, _, _ = calibrated
    steering = SteeringSettings(
        features=[{"feature_id": PLANET, "coefficient": 2.0}], layers=[10], temperature=0.8, max_tokens=30
    )

    run = runs.create(owner, RunRequest(training_id, "Tell me about your day.", steering, seed=0, chat=True))
    runs.process_queued(lambda run_id: lambda event, payload: None)

    run.refresh_from_db()
    assert run.status == SteeringRun.Status.COMPLETED, run.error
    (activation,) = run.metrics["feature_activation"]
    assert activation["steered"] > activation["unsteered"], activation


def feature_rows(training_id):
    return list(
        Feature.objects.filter(training_id=training_id)
        .order_by("index")
        .values_list("index", "label", "description", "max_activation", "activation_frequency", "examples")
    )


@pytest.mark.slow
@pytest.mark.django_db
def test_it_ends_failed_when_interrupted_and_changes_no_feature(calibrated, monkeypatch, dataset_dir):
    training_id, _, _ = calibrated
    before = feature_rows(training_id)

    def interrupt(self, calibration, tokens_seen):
        raise KeyboardInterrupt

    monkeypatch.setattr(calibrate_features.Command, "record_progress", interrupt)
    text = corpus.write_corpus(dataset_dir / "corpus.txt", json.loads(DEMO_ANSWERS.read_text())[:10])
    with pytest.raises(CommandError, match="interrupted; marked failed"):
        call_command("calibrate_features", "--training", training_id, "--dataset", str(text), "--tokens", 500)

    calibration = Calibration.objects.filter(training_id=training_id).first()
    assert (calibration.status, calibration.error) == (Calibration.Status.FAILED, "interrupted")
    assert calibration.finished_at is not None
    assert feature_rows(training_id) == before


@pytest.mark.slow
@pytest.mark.django_db
def test_it_writes_no_feature_when_writing_them_fails(calibrated, monkeypatch, dataset_dir):
    training_id, _, _ = calibrated
    before = feature_rows(training_id)

    def broken(*args, **kwargs):
        raise RuntimeError("database went away")

    # The last write of the features: the ones before it are rolled back with it.
    monkeypatch.setattr(Feature.objects, "bulk_create", broken)
    text = corpus.write_corpus(dataset_dir / "corpus.txt", json.loads(DEMO_ANSWERS.read_text())[:10])
    with pytest.raises(CommandError, match="database went away"):
        call_command("calibrate_features", "--training", training_id, "--dataset", str(text), "--tokens", 500)

    calibration = Calibration.objects.filter(training_id=training_id).first()
    assert calibration.status == Calibration.Status.FAILED
    assert calibration.error == "RuntimeError: database went away"
    assert feature_rows(training_id) == before


@pytest.fixture
def new_datasets(db):
    """new_datasets() -> the Dataset rows this test made: the module's calibration commits one of its own that
    outlives the tests' transactions."""
    before = set(Dataset.objects.values_list("pk", flat=True))
    return lambda: list(Dataset.objects.exclude(pk__in=before).order_by("pk"))


@pytest.mark.django_db
def test_it_ends_failed_when_the_dataset_does_not_exist(new_datasets, training, tmp_path):
    before = feature_rows(training.pk)

    with pytest.raises(CommandError, match="Unknown dataset"):
        call_command(
            "calibrate_features", "--training", training.pk, "--dataset", str(tmp_path / "missing.txt")
        )

    calibration = Calibration.objects.get(training=training)
    assert calibration.status == Calibration.Status.FAILED
    assert calibration.error.startswith(f"Unknown dataset '{tmp_path / 'missing.txt'}'")
    assert feature_rows(training.pk) == before
    assert not new_datasets()


@pytest.mark.django_db
def test_it_ends_failed_when_the_checkpoint_cannot_be_read_and_registers_no_dataset(
    new_datasets, training, dataset_dir
):
    before = feature_rows(training.pk)
    text = corpus.write_corpus(dataset_dir / "corpus.txt", json.loads(DEMO_ANSWERS.read_text())[:10])

    with pytest.raises(CommandError, match="failed"):
        call_command("calibrate_features", "--training", training.pk, "--dataset", str(text))

    calibration = Calibration.objects.get(training=training)
    assert calibration.status == Calibration.Status.FAILED and "/nonexistent/sae" in calibration.error
    assert calibration.dataset is None and not new_datasets()
    assert feature_rows(training.pk) == before


@pytest.mark.django_db
def test_a_failed_calibration_keeps_the_registered_dataset_it_read(new_datasets, training, dataset_dir):
    text = corpus.write_corpus(dataset_dir / "corpus.txt", ["A document."])
    registered = Dataset.objects.create(name="lab-corpus", source=str(text))

    with pytest.raises(CommandError, match="failed"):
        call_command("calibrate_features", "--training", training.pk, "--dataset", "lab-corpus")

    calibration = Calibration.objects.get(training=training)
    assert calibration.status == Calibration.Status.FAILED and calibration.dataset == registered
    assert new_datasets() == [registered]


@pytest.fixture
def engine_reads(monkeypatch, training):
    """A stand-in engine for calibrations that need no weights: it loads nothing, measures no feature, and
    records the documents the calibration gave it in the list this fixture returns."""
    from steering_app.engine import loader
    from steering_app.engine.analysis import calibrate
    from steering_app.engine.saes import sae

    documents = []

    def measure(model, tokenizer, sae, texts, layer, tokens, on_progress):
        documents.extend(texts)
        return SimpleNamespace(tokens=tokens, features=[], timings={"collect_s": 0.0, "describe_s": 0.0})

    stand_in_sae = SimpleNamespace(d_in=training.d_in, d_sae=training.d_sae, to=lambda device: None)
    monkeypatch.setattr(sae, "load_sae", lambda path, dtype: stand_in_sae)
    monkeypatch.setattr(
        loader, "load_model", lambda source, device: SimpleNamespace(model=None, tokenizer=None, device="cpu")
    )
    monkeypatch.setattr(calibrate, "calibrate_features", measure)
    return documents


def calibrate_on(training, dataset: str):
    call_command(
        "calibrate_features",
        "--training",
        training.pk,
        "--dataset",
        dataset,
        "--tokens",
        50,
        stdout=io.StringIO(),
    )


@pytest.mark.django_db
@pytest.mark.parametrize("root", ["datasets", "STEERLAB_DATASET_DIRS"])
def test_it_calibrates_on_a_corpus_under_a_dataset_root_and_registers_it(
    new_datasets, training, data_dir, dataset_dir, engine_reads, root
):
    folder = (data_dir / "datasets" if root == "datasets" else dataset_dir) / "lab"
    corpus.write_corpus(folder / "corpus.txt", ["Rain on the roof.", "Sun on the sea."])

    calibrate_on(training, str(folder))

    calibration = Calibration.objects.get(training=training)
    assert calibration.status == Calibration.Status.COMPLETED
    assert engine_reads == ["Rain on the roof.", "Sun on the sea."]
    (dataset,) = new_datasets()
    assert calibration.dataset == dataset and dataset.source == str(folder.resolve())
    assert dataset.num_tokens == 50


def link(path: Path, target: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to(target)
    return path


# --dataset paths to refuse, made in a data dir (its datasets/ folder and STEERLAB_DATASET_DIRS are the roots)
# and a temporary folder outside both.
OUTSIDE_THE_ROOTS = {
    "the secret key": lambda data, elsewhere: data / "secret_key",
    "the database": lambda data, elsewhere: data / "steerlab.sqlite3",
    "the data dir itself": lambda data, elsewhere: data,
    "a path that climbs out of datasets/": lambda data, elsewhere: data / "datasets" / ".." / "secret_key",
    "a link in datasets/ to the secret key": lambda data, elsewhere: link(
        data / "datasets" / "notes.txt", data / "secret_key"
    ),
    "a folder in datasets/ that holds such a link": lambda data, elsewhere: (
        link(data / "datasets" / "folder" / "notes.txt", data / "secret_key").parent
    ),
    "a file outside every root": lambda data, elsewhere: corpus.write_corpus(
        elsewhere / "notes.txt", ["Mine."]
    ),
}


@pytest.mark.django_db
@pytest.mark.parametrize("where", OUTSIDE_THE_ROOTS)
def test_it_refuses_a_dataset_outside_the_dataset_roots_and_reads_nothing(
    new_datasets, training, data_dir, dataset_dir, tmp_path, engine_reads, where
):
    before = feature_rows(training.pk)
    path = OUTSIDE_THE_ROOTS[where](data_dir, tmp_path)

    with pytest.raises(CommandError, match="not under a dataset root") as refused:
        calibrate_on(training, str(path))

    message = str(refused.value)
    assert str(path) in message and str(data_dir / "datasets") in message and str(dataset_dir) in message
    assert engine_reads == []
    calibration = Calibration.objects.get(training=training)
    assert calibration.status == Calibration.Status.FAILED and str(path) in calibration.error
    assert not new_datasets()
    assert feature_rows(training.pk) == before


@pytest.mark.django_db
def test_it_never_reads_the_data_dirs_own_files_even_under_a_root_that_holds_them(
    new_datasets, training, data_dir, settings, engine_reads
):
    settings.STEERLAB_DATASET_DIRS = [data_dir.parent]

    with pytest.raises(CommandError, match="not under a dataset root"):
        calibrate_on(training, str(data_dir / "secret_key"))

    assert engine_reads == [] and not new_datasets()


@pytest.mark.django_db
def test_it_refuses_a_registered_dataset_whose_source_is_outside_the_roots(training, data_dir, engine_reads):
    Dataset.objects.create(name="notes", source=str(data_dir / "secret_key"))

    with pytest.raises(CommandError, match="not under a dataset root"):
        calibrate_on(training, "notes")

    assert engine_reads == []
    assert Calibration.objects.get(training=training).status == Calibration.Status.FAILED


@pytest.mark.django_db
def test_it_refuses_a_training_that_is_not_completed(training):
    Training.objects.filter(pk=training.pk).update(status=Training.Status.RUNNING)

    with pytest.raises(CommandError, match="only a completed training can be calibrated"):
        call_command("calibrate_features", "--training", training.pk)

    assert not Calibration.objects.filter(training=training).exists()
