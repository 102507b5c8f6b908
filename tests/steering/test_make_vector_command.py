"""manage.py make_vector: reads the examples, makes the job and runs it here, printing progress and the report.

The model's forwards are stood in for (conftest's fake_engine): what is checked is the command's reading of
files, its refusals with nothing created, and what it stores and prints. test_demo_vectors.py runs it on SmolLM2.
"""

import io
import json

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from steering_app.models import Training, VectorJob


@pytest.fixture
def pairs_file(tmp_path):
    path = tmp_path / "planet.jsonl"
    lines = [json.dumps({"positive": f"Mars {i}.", "negative": f"Bricks {i}."}) for i in range(6)]
    path.write_text("\n".join(lines) + "\n\n")
    return path


def make(*args) -> str:
    out = io.StringIO()
    call_command("make_vector", *[str(arg) for arg in args], stdout=out)
    return out.getvalue()


def test_it_makes_a_new_space_from_pairs_and_prints_the_report(
    language_model, engine_data_dir, fake_engine, pairs_file
):
    out = make("--model", language_model.name, "--name", "planet", "--pairs", pairs_file, "--method", "pca")
    job = VectorJob.objects.get()
    assert (job.status, job.owner, job.method, job.paired, job.worker != "") == (
        "completed",
        None,
        "pca",
        True,
        True,
    )
    assert job.positives == [f"Mars {i}." for i in range(6)] and job.negatives == [
        f"Bricks {i}." for i in range(6)
    ]
    assert fake_engine[0]["method"] == "pca"
    assert "50%" in out  # the stand-in reports half way once
    assert "0:0.50 1:0.50 2:1.00* 3:0.50" in out
    assert (
        f"concept #0 'planet' of vector space {job.training_id}; best layer 2, held-out accuracy 1.000" in out
    )
    assert Training.objects.get().features.get().label == "planet"


def test_it_adds_a_concept_from_two_files_of_examples(
    language_model, engine_data_dir, fake_engine, tmp_path, pairs_file
):
    make("--model", language_model.name, "--name", "planet", "--pairs", pairs_file)
    space = Training.objects.get()
    positives, negatives = tmp_path / "cake.txt", tmp_path / "plain.jsonl"
    positives.write_text("\n".join(f"Cake {i}." for i in range(7)))
    negatives.write_text(
        "\n".join([json.dumps("Road 0."), *(json.dumps({"text": f"Road {i}."}) for i in range(1, 5))])
    )
    make(
        "--training",
        space.pk,
        "--name",
        "cake",
        "--positives",
        positives,
        "--negatives",
        negatives,
        "--tokens",
        "last",
    )
    job = VectorJob.objects.get(name="cake")
    assert (job.status, job.paired, job.tokens, len(job.positives)) == ("completed", False, "last", 7)
    assert job.negatives == [f"Road {i}." for i in range(5)]
    assert list(space.features.values_list("label", flat=True)) == ["planet", "cake"]


def test_it_refuses_bad_input_and_creates_nothing(
    language_model, engine_data_dir, fake_engine, tmp_path, pairs_file
):
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"positive": "a", "negative": "b"}\nnot json\n')
    wrong_keys = tmp_path / "keys.jsonl"
    wrong_keys.write_text('{"pos": "a", "neg": "b"}\n')
    few = tmp_path / "few.txt"
    few.write_text("one\ntwo\n")
    model = ("--model", language_model.name, "--name", "planet")
    cases = [
        ((*model,), "Give --pairs FILE.jsonl, or both"),
        ((*model, "--pairs", pairs_file, "--positives", few), "not both"),
        ((*model, "--positives", few), "Give --pairs FILE.jsonl, or both"),
        ((*model, "--pairs", tmp_path / "missing.jsonl"), "Cannot read"),
        ((*model, "--pairs", broken), "broken.jsonl: Line 2 is not valid JSON"),
        ((*model, "--pairs", wrong_keys), 'keys.jsonl: Line 1 must be {"positive"'),
        ((*model, "--positives", few, "--negatives", few), "positives: positives has 2 examples"),
        ((*model, "--pairs", pairs_file, "--method", "svd"), "method: method must be one of diffmean, pca"),
        ((*model, "--pairs", pairs_file, "--tokens", "first"), "tokens: tokens must be one of all, last"),
        (("--model", "nope", "--name", "planet", "--pairs", pairs_file), "No model named 'nope'"),
        (
            ("--training", "9999", "--name", "planet", "--pairs", pairs_file),
            "training_id: Training 9999 does not exist",
        ),
        (("--model", language_model.name, "--name", " ", "--pairs", pairs_file), "name: name is empty"),
    ]
    for args, words in cases:
        with pytest.raises(CommandError, match=words):
            make(*args)
    assert not VectorJob.objects.exists() and not Training.objects.exists()


def test_a_job_that_fails_while_it_runs_is_kept_failed_with_its_reason(
    language_model, engine_data_dir, fake_engine, pairs_file, monkeypatch
):
    from steering_app.engine import vectors

    def refuse(lm, name, description, positives, negatives, **options):
        raise vectors.VectorError("positives[3]", "is empty once tokenized")

    monkeypatch.setattr(vectors, "make_concept", refuse)
    with pytest.raises(CommandError, match=r"Vector job \d+ failed: positives\[3\]: is empty once tokenized"):
        make("--model", language_model.name, "--name", "planet", "--pairs", pairs_file)
    job = VectorJob.objects.get()
    assert (job.status, job.training.status) == ("failed", "failed")
