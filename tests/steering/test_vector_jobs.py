"""vector_jobs: a steering vector's job, from the request to a concept of a vector space.

Creation refuses, writing nothing, every request a worker would refuse. The worker's part runs the real storage
(engine.vectors.save_space / load_concepts) with a stand-in for the model's forwards (make_concept), whose
vectors depend only on the examples: the math is tests/engine's, the real model's is test_vectors_demo.py's.
"""

import time
from datetime import timedelta

import pytest
import torch
from django.utils import timezone

from steering_app import runs, vector_jobs, wake
from steering_app.engine import loader, vectors
from steering_app.errors import InvalidInput, NotFound, WorkerUnavailable
from steering_app.limits import MAX_PROMPT_CHARS
from steering_app.models import Feature, LanguageModel, Training, VectorJob
from tests.fake_engine import sweep_outcome, use_engine
from tests.vector_stand_ins import fake_concept

PAIRS = [[f"planet text {i}", f"plain text {i}"] for i in range(6)]


def create(model, **fields):
    values = {"model_id": model.pk, "name": "planet", "pairs": PAIRS}
    values.update(fields)
    return vector_jobs.create(None, **values)


def assert_nothing_written():
    assert not VectorJob.objects.exists()
    assert not Training.objects.filter(encoder_type="vectors").exists()


@pytest.mark.parametrize(
    ("fields", "field", "words"),
    [
        ({"name": "  "}, "name", "empty"),
        ({"name": "x" * 301}, "name", "at most 300"),
        ({"method": "svd"}, "method", "diffmean, pca"),
        ({"tokens": "first"}, "tokens", "all, last"),
        ({"pairs": PAIRS[:3]}, "pairs", "has 3 examples"),
        ({"pairs": [[f"a{i}", f"b{i}"] for i in range(1001)]}, "pairs", "5 to 1000"),
        ({"pairs": [*PAIRS, ["only one"]]}, "pairs", "Pair 7 must be [positive, negative]"),
        ({"pairs": [*PAIRS, ["ok", " "]]}, "pairs", "Example 7 of pairs is empty"),
        ({"pairs": [*PAIRS, ["x" * (MAX_PROMPT_CHARS + 1), "y"]]}, "pairs", f"at most {MAX_PROMPT_CHARS}"),
        ({"pairs": "planet vs plain"}, "pairs", "list of [positive, negative]"),
        ({"pairs": None}, "pairs", "Give pairs, or positives and negatives"),
        ({"pairs": PAIRS, "positives": ["a"] * 5}, "pairs", "not both"),
        ({"pairs": None, "positives": ["p"] * 5, "negatives": ["n"] * 3}, "negatives", "has 3 examples"),
        ({"pairs": None, "positives": "p", "negatives": ["n"] * 5}, "positives", "list of texts"),
        ({"pairs": None, "positives": ["p"] * 5, "negatives": [1, 2, 3, 4, 5]}, "negatives", "Example 1"),
        (
            {"pairs": None, "positives": ["p"] * 5, "negatives": ["n"] * 5, "method": "pca"},
            "pairs",
            "pca needs",
        ),
        ({"description": 7}, "description", "description must be text"),
        ({"model_id": None}, "model_id", "Give model_id"),
        ({"model_id": True}, "model_id", "positive integer"),
    ],
)
def test_it_refuses_a_bad_request_naming_the_field_and_writes_nothing(language_model, fields, field, words):
    with pytest.raises(InvalidInput) as refused:
        create(language_model, **fields)
    assert refused.value.field == field
    assert words in refused.value.message
    assert_nothing_written()


def test_it_answers_not_found_for_an_unknown_model_or_space(language_model):
    with pytest.raises(NotFound) as model:
        create(language_model, model_id=language_model.pk + 100)
    with pytest.raises(NotFound) as space:
        create(language_model, model_id=None, training_id=9999)
    assert (model.value.field, space.value.field) == ("model_id", "training_id")
    assert_nothing_written()


def test_it_refuses_a_model_that_is_not_ready(language_model):
    LanguageModel.objects.filter(pk=language_model.pk).update(status="error", error="weights missing")
    with pytest.raises(InvalidInput, match="weights missing") as refused:
        create(language_model)
    assert refused.value.field == "model_id"
    assert_nothing_written()


def make_space(model, **fields) -> Training:
    values = {
        "model": model,
        "encoder_type": "vectors",
        "hook_layer": 2,
        "hook_name": "blocks.2.hook_resid_post",
        "d_in": model.hidden_size,
        "d_sae": 1,
        "checkpoint_path": "/nonexistent/space",
        "status": "completed",
        "stats": {"concepts": [{"index": 0, "name": "planet"}]},
    }
    values.update(fields)
    space = Training.objects.create(**values)
    Feature.objects.create(training=space, index=0, label="planet", max_activation=1.0)
    return space


def test_it_refuses_to_add_to_an_sae_a_pending_space_another_models_space_or_a_taken_name(
    language_model, training, queued_only
):
    other = LanguageModel.objects.create(
        name="other",
        source="/nonexistent/other",
        architecture="LlamaForCausalLM",
        num_layers=4,
        hidden_size=16,
    )
    space = make_space(language_model)
    pending = make_space(language_model, status="pending")
    cases = [
        ({"training_id": training.pk}, "training_id", "is an SAE"),
        ({"training_id": pending.pk}, "training_id", "is pending"),
        (
            {"training_id": space.pk, "model_id": other.pk},
            "model_id",
            f"belongs to model {language_model.pk}",
        ),
        ({"training_id": space.pk, "name": " Planet "}, "name", "already has a concept named 'Planet'"),
    ]
    for fields, field, words in cases:
        with pytest.raises(InvalidInput) as refused:
            create(language_model, **fields)
        assert (refused.value.field, words in refused.value.message) == (field, True)
    create(language_model, model_id=None, training_id=space.pk, name="cake")
    with pytest.raises(InvalidInput, match="already has a concept named 'CAKE'"):
        create(language_model, model_id=None, training_id=space.pk, name="CAKE")
    assert list(VectorJob.objects.values_list("name", "status")) == [("cake", "queued")]


def test_it_stores_a_queued_job_with_a_pending_space_and_tells_the_workers(language_model, monkeypatch):
    told = []
    monkeypatch.setattr(wake, "submit", lambda run_id=None: told.append(run_id))
    job = create(language_model, description=" Planets. ", method="pca", tokens="last")
    job.refresh_from_db()
    assert told == [None]
    assert (job.status, job.progress, job.new_space, job.paired) == ("queued", 0.0, True, True)
    assert (job.method, job.tokens, job.description) == ("pca", "last", "Planets.")
    assert job.positives == [pair[0] for pair in PAIRS] and job.negatives == [pair[1] for pair in PAIRS]
    space = job.training
    assert (space.encoder_type, space.status, space.d_in, space.model_id) == (
        "vectors",
        "pending",
        16,
        language_model.pk,
    )
    assert space.label == f"vectors: no concept yet • {language_model.name}"


def test_it_fails_the_job_and_its_space_when_no_worker_can_be_told(language_model, monkeypatch):
    def down(run_id=None):
        raise ConnectionError("redis is down")

    monkeypatch.setattr(wake, "submit", down)
    with pytest.raises(WorkerUnavailable):
        create(language_model)
    job = VectorJob.objects.get()
    assert (job.status, job.error, job.training.status) == ("failed", "no worker available", "failed")


def test_it_makes_a_new_space_with_its_first_concept(
    language_model, engine_data_dir, queued_only, fake_engine
):
    job = create(language_model, description="Planets and moons")
    assert vector_jobs.process_waiting() == 1
    job.refresh_from_db()
    assert (job.status, job.progress, job.error) == ("completed", 1.0, "")
    assert (
        job.report["best_layer"] == 2 and job.report["accuracy"] == 1.0 and job.report["feature_index"] == 0
    )
    space = Training.objects.get(pk=job.training_id)
    assert (space.status, space.hook_layer, space.hook_name, space.d_sae) == (
        "completed",
        2,
        "blocks.2.hook_resid_post",
        1,
    )
    assert space.checkpoint_path == str(engine_data_dir / "vectors" / f"{space.pk}-{job.pk}")
    assert space.stats["concepts"][0]["name"] == "planet"
    assert space.stats["concepts"][0]["examples"] == {"positives": 6, "negatives": 6}
    assert space.label == f"vectors: planet • {language_model.name}"
    feature = space.features.get()
    assert (feature.index, feature.label, feature.description, feature.max_activation) == (
        0,
        "planet",
        "Planets and moons",
        1.0,
    )
    assert feature.activation_frequency is None
    concepts, reading_layer = vectors.load_concepts(space.checkpoint_path)
    assert reading_layer == 2 and [concept.name for concept in concepts] == ["planet"]
    assert fake_engine == [
        {"method": "diffmean", "tokens": "all", "paired": True, "positives": job.positives}
    ]


def test_it_adds_a_concept_in_a_new_checkpoint_and_keeps_the_old_one(
    language_model, engine_data_dir, queued_only, fake_engine
):
    first = create(language_model)
    vector_jobs.process_waiting()
    space = Training.objects.get(pk=first.training_id)
    old_path = space.checkpoint_path
    second = create(
        language_model,
        model_id=None,
        training_id=space.pk,
        name="cake",
        pairs=None,
        positives=["cake"] * 5,
        negatives=["plain"] * 5,
    )
    vector_jobs.process_waiting()
    second.refresh_from_db()
    space.refresh_from_db()
    assert (second.status, second.report["feature_index"], space.d_sae, space.hook_layer) == (
        "completed",
        1,
        2,
        2,
    )
    assert space.checkpoint_path != old_path
    assert [concept.name for concept in vectors.load_concepts(old_path)[0]] == ["planet"]
    concepts, _layer = vectors.load_concepts(space.checkpoint_path)
    assert [concept.name for concept in concepts] == ["planet", "cake"]
    assert torch.equal(concepts[1].vectors, fake_concept("cake", "", ["cake"] * 5, [], 4, 16).vectors)
    assert list(space.features.values_list("index", "label")) == [(0, "planet"), (1, "cake")]
    assert [entry["name"] for entry in space.stats["concepts"]] == ["planet", "cake"]
    assert space.label == f"vectors: planet, cake • {language_model.name}"


def test_a_failure_fails_the_job_and_its_new_space_and_changes_nothing_else(
    language_model, engine_data_dir, queued_only, fake_engine, monkeypatch
):
    def refuse(lm, name, description, positives, negatives, **options):
        raise vectors.VectorError("positives", "the examples are all the same text")

    monkeypatch.setattr(vectors, "make_concept", refuse)
    job = create(language_model)
    vector_jobs.process_waiting()
    job.refresh_from_db()
    assert (job.status, job.progress) == ("failed", 0.0)
    assert "all the same text" in job.error
    assert (job.training.status, job.training.error) == ("failed", job.error)
    assert not Feature.objects.exists()
    assert not (engine_data_dir / "vectors").exists() or not any((engine_data_dir / "vectors").iterdir())


def test_a_failure_while_storing_removes_the_new_checkpoint(
    language_model, engine_data_dir, queued_only, fake_engine, monkeypatch
):
    first = create(language_model)
    vector_jobs.process_waiting()
    space = Training.objects.get(pk=first.training_id)
    before = (space.checkpoint_path, space.d_sae, space.stats)
    second = create(language_model, model_id=None, training_id=space.pk, name="cake")

    def broken(training, index, concept):
        raise RuntimeError("disk full")

    monkeypatch.setattr(vector_jobs, "concept_feature", broken)
    vector_jobs.process_waiting()
    second.refresh_from_db()
    space.refresh_from_db()
    assert (second.status, second.error) == ("failed", "RuntimeError: disk full")
    assert (space.status, space.checkpoint_path, space.d_sae, space.stats) == ("completed", *before)
    assert sorted(path.name for path in (engine_data_dir / "vectors").iterdir()) == [f"{space.pk}-{first.pk}"]


def test_it_records_progress_on_the_row(
    language_model, engine_data_dir, queued_only, fake_engine, monkeypatch
):
    seen = []

    def make_concept(lm, name, description, positives, negatives, **options):
        options["on_progress"](0.4)
        seen.append(VectorJob.objects.values_list("status", "progress").get())
        return fake_concept(name, description, positives, negatives, 4, 16)

    monkeypatch.setattr(vectors, "make_concept", make_concept)
    create(language_model)
    vector_jobs.process_waiting()
    assert seen == [("running", 0.4)]


def test_a_job_failed_meanwhile_stops_and_stays_failed(
    language_model, engine_data_dir, queued_only, fake_engine, monkeypatch
):
    def make_concept(lm, name, description, positives, negatives, **options):
        VectorJob.objects.update(status="failed", error="the worker stopped before finishing")
        options["on_progress"](0.4)
        raise AssertionError("the job should have stopped at its progress")

    monkeypatch.setattr(vectors, "make_concept", make_concept)
    job = create(language_model)
    vector_jobs.process_waiting()
    job.refresh_from_db()
    assert (job.status, job.error) == ("failed", "the worker stopped before finishing")
    assert not Feature.objects.exists()


def test_the_sweep_fails_a_silent_running_job_and_its_new_space(language_model, settings, queued_only):
    settings.STEERLAB_RUN_MAX_SECONDS = 60
    silent = create(language_model)
    beating = create(language_model, name="cake")
    queued = create(language_model, name="sea")
    long_ago = timezone.now() - timedelta(seconds=61)
    VectorJob.objects.filter(pk=silent.pk).update(
        status="running", started_at=long_ago, heartbeat_at=long_ago
    )
    VectorJob.objects.filter(pk=beating.pk).update(
        status="running", started_at=long_ago, heartbeat_at=timezone.now()
    )
    assert vector_jobs.sweep_stale() == 1
    states = dict(VectorJob.objects.values_list("pk", "status"))
    assert states == {silent.pk: "failed", beating.pk: "running", queued.pk: "queued"}
    silent.refresh_from_db()
    assert silent.error == vector_jobs.WORKER_STOPPED and silent.training.status == "failed"


def test_a_worker_claims_a_queued_job_once(language_model, queued_only):
    job = create(language_model)
    claimed = vector_jobs.claim(job.pk)
    assert claimed.status == "running" and claimed.worker == wake.worker_name()
    assert vector_jobs.claim(job.pk) is None


def test_a_worker_told_of_a_job_makes_it(language_model, engine_data_dir, fake_engine):
    """Inline workers (the tests' mode) run runs.process_queued() when told: it makes the waiting vector jobs."""
    job = create(language_model)
    job.refresh_from_db()
    assert (job.status, job.training.status, job.training.features.count()) == ("completed", "completed", 1)


def test_a_worker_serves_queued_runs_before_it_makes_a_vector(
    language_model, training, owner, make_run, engine_data_dir, fake_engine, queued_only, monkeypatch
):
    """A vector takes up to a minute of forwards: a member's comparison waiting meanwhile is served first."""
    order = []

    def execute(run, on_step=None, should_stop=None):
        order.append(f"run {run.pk}")
        return sweep_outcome(run, on_step, should_stop)

    fake_make_concept = vectors.make_concept

    def make_concept(*args, **options):
        order.append(f"vector {job.pk}")
        return fake_make_concept(*args, **options)

    use_engine(monkeypatch, execute)
    monkeypatch.setattr(vectors, "make_concept", make_concept)
    job = create(language_model)
    run = make_run(owner)
    runs.process_queued()
    assert order == [f"run {run.pk}", f"vector {job.pk}"]
    run.refresh_from_db()
    job.refresh_from_db()
    assert (run.status, job.status) == ("completed", "completed")


def test_a_concept_stored_meanwhile_in_the_same_space_is_kept(
    language_model, engine_data_dir, queued_only, fake_engine, monkeypatch
):
    """Two jobs add to one space at once: the later store sees the space moved and stores again from it."""
    first = create(language_model)
    vector_jobs.process_waiting()
    space = Training.objects.get(pk=first.training_id)
    cake = create(language_model, model_id=None, training_id=space.pk, name="cake")
    sea = create(language_model, model_id=None, training_id=space.pk, name="sea")
    save_space = vector_jobs._save_space

    def save_while_another_stores(path, concepts, reading_layer, model_name):
        save_space(path, concepts, reading_layer, model_name)
        if path.name == f"{space.pk}-{cake.pk}":
            vector_jobs.execute(vector_jobs.claim(sea.pk))

    monkeypatch.setattr(vector_jobs, "_save_space", save_while_another_stores)
    vector_jobs.process_waiting()
    space.refresh_from_db()
    assert VectorJob.objects.get(pk=cake.pk).status == VectorJob.objects.get(pk=sea.pk).status == "completed"
    assert list(space.features.values_list("index", "label")) == [(0, "planet"), (1, "sea"), (2, "cake")]
    assert space.checkpoint_path == str(engine_data_dir / "vectors" / f"{space.pk}-{cake.pk}-1")
    concepts, _layer = vectors.load_concepts(space.checkpoint_path)
    assert [concept.name for concept in concepts] == ["planet", "sea", "cake"]
    assert [entry["name"] for entry in space.stats["concepts"]] == ["planet", "sea", "cake"]
    assert not (engine_data_dir / "vectors" / f"{space.pk}-{cake.pk}").exists()


@pytest.mark.django_db(transaction=True)
def test_a_job_beats_while_the_engine_is_silent(
    language_model, engine_data_dir, queued_only, fake_engine, monkeypatch
):
    """Loading a model can take minutes with no progress to record: the heartbeat goes on meanwhile (its thread
    writes through a connection of its own, so the rows are committed here)."""
    monkeypatch.setattr(vector_jobs, "PROGRESS_EVERY_S", 0.02)
    beats = []

    def silent_load(source, **options):
        claimed = VectorJob.objects.get().heartbeat_at
        time.sleep(0.3)
        beats.append(VectorJob.objects.get().heartbeat_at - claimed)
        return type("LM", (), {"num_layers": 4, "hidden_size": 16})()

    monkeypatch.setattr(loader, "load_model", silent_load)
    create(language_model)
    vector_jobs.process_waiting()
    assert VectorJob.objects.get().status == "completed"
    assert beats[0] >= timedelta(seconds=0.2)
