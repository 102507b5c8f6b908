"""manage.py import_labels: Neuronpedia explanation exports as feature labels (the `training` fixture:
model tiny-llama, layer 2, 32 features)."""

import gzip
import json
from pathlib import Path

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from steering_app.models import Feature

pytestmark = pytest.mark.django_db

FIXTURES = Path(__file__).parent / "fixtures"


def snapshot(training):
    return list(
        training.features.order_by("index").values_list(
            "index", "label", "description", "max_activation", "activation_frequency"
        )
    )


def label_of(training, index):
    return Feature.objects.get(training=training, index=index).label


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    return path


def test_it_keeps_the_highest_scored_explanation_of_a_json_export(training):
    call_command("import_labels", "--training", training.pk, str(FIXTURES / "neuronpedia_tiny_llama.json"))

    feature = Feature.objects.get(training=training, index=3)
    assert feature.label == feature.description == "weather forecasts and rain"
    assert feature.max_activation == 4.0 and feature.activation_frequency == 0.01
    assert label_of(training, 5) == "closing brackets in code"
    assert label_of(training, 4) == "feature #4"


def test_it_reads_json_lines_and_keeps_the_first_of_equal_scores(training):
    call_command("import_labels", "--training", training.pk, str(FIXTURES / "neuronpedia_tiny_llama.jsonl"))

    assert label_of(training, 7) == "python import statements"
    assert label_of(training, 9) == "causal connectives"


def test_it_reads_a_gzipped_export(training, tmp_path):
    path = tmp_path / "batch-0.jsonl.gz"
    path.write_bytes(gzip.compress((FIXTURES / "neuronpedia_tiny_llama.jsonl").read_bytes()))

    call_command("import_labels", "--training", training.pk, str(path))

    assert label_of(training, 9) == "causal connectives"


@pytest.mark.parametrize(
    ("model_id", "layer"),
    [("gemma-2-2b", "2-res-32"), ("tiny-llama", "3-res-32"), ("tiny-llama", "res-32")],
)
def test_it_refuses_an_export_of_another_model_or_layer_and_changes_nothing(
    training, tmp_path, model_id, layer
):
    before = snapshot(training)
    path = write_jsonl(
        tmp_path / "other.jsonl",
        [
            {"modelId": "tiny-llama", "layer": "2-res-32", "index": "1", "description": "fine", "score": 1},
            {"modelId": model_id, "layer": layer, "index": "2", "description": "elsewhere", "score": 1},
        ],
    )

    with pytest.raises(
        CommandError, match=rf"line 2: the export is for {model_id}/{layer}.*nothing imported"
    ):
        call_command("import_labels", "--training", training.pk, str(path))

    assert snapshot(training) == before


def test_it_accepts_another_name_given_as_neuronpedia_id(training, tmp_path):
    path = write_jsonl(
        tmp_path / "np.jsonl",
        [{"modelId": "llama-tiny", "layer": "2-res-32", "index": 1, "description": "commas", "score": 0.5}],
    )

    call_command(
        "import_labels", "--training", training.pk, "--neuronpedia-id", "llama-tiny/2-res-32", str(path)
    )

    assert label_of(training, 1) == "commas"


@pytest.mark.parametrize("index", ["32", -1, "x", "9" * 5000])
def test_it_refuses_an_index_out_of_range_naming_its_line(training, tmp_path, index):
    before = snapshot(training)
    rows = [
        {"modelId": "tiny-llama", "layer": "2-res-32", "index": "0", "description": "ok"},
        {"modelId": "tiny-llama", "layer": "2-res-32", "index": "1", "description": "ok too"},
        {"modelId": "tiny-llama", "layer": "2-res-32", "index": index, "description": "bad"},
    ]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)

    with pytest.raises(CommandError, match=r"line 3: index .* is not in 0\.\.31"):
        call_command("import_labels", "--training", training.pk, str(path))

    assert snapshot(training) == before


def test_it_names_the_line_of_a_bad_index_in_a_pretty_printed_list(training, tmp_path):
    rows = [
        {"modelId": "tiny-llama", "layer": "2-res-32", "index": "0", "description": "ok"},
        {"modelId": "tiny-llama", "layer": "2-res-32", "index": "99", "description": "bad"},
    ]
    path = tmp_path / "export.json"
    path.write_text(json.dumps(rows, indent=2))
    line = [number for number, text in enumerate(path.read_text().splitlines(), 1) if text == "  {"][1]

    with pytest.raises(CommandError, match=rf"line {line} \(entry 2\): index '99' is not in 0\.\.31"):
        call_command("import_labels", "--training", training.pk, str(path))


def test_it_refuses_a_line_that_is_not_json(training, tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"modelId": "tiny-llama", "layer": "2", "index": 0, "description": "ok"}\n{nope\n')

    with pytest.raises(CommandError, match="line 2: not valid JSON"):
        call_command("import_labels", "--training", training.pk, str(path))

    assert label_of(training, 0) == "feature #0"


@pytest.mark.parametrize(
    ("export", "message"),
    [
        ("[" * 100_000 + "]" * 100_000, "nested more than 64 levels"),
        (
            '{"index": 0, "description": "ok"}\n' + "[" * 100_000 + "]" * 100_000,
            "line 2: .*nested more than 64",
        ),
    ],
    ids=["json-list", "json-lines"],
)
def test_it_refuses_a_deeply_nested_export_and_changes_nothing(training, tmp_path, export, message):
    before = snapshot(training)
    path = tmp_path / "deep.jsonl"
    path.write_text(export)

    with pytest.raises(CommandError, match=message):
        call_command("import_labels", "--training", training.pk, str(path))

    assert snapshot(training) == before


@pytest.mark.parametrize(
    ("description", "message"),
    [
        (5, r"line 2: description: must be text, got 5"),
        (["rain"], r"line 2: description: must be text"),
        ("\ud800", r"line 2: description: .*lone surrogates"),
        ("nul\x00", r"line 2: description: .*NUL"),
    ],
)
def test_it_refuses_a_description_that_is_not_text_naming_its_line(training, tmp_path, description, message):
    before = snapshot(training)
    rows = [
        {"modelId": "tiny-llama", "layer": "2-res-32", "index": "0", "description": "ok"},
        {"modelId": "tiny-llama", "layer": "2-res-32", "index": "1", "description": description},
    ]

    with pytest.raises(CommandError, match=message):
        call_command(
            "import_labels", "--training", training.pk, str(write_jsonl(tmp_path / "bad.jsonl", rows))
        )

    assert snapshot(training) == before


def test_it_ranks_an_explanation_whose_score_no_float_holds_as_unscored(training, tmp_path):
    row = {"modelId": "tiny-llama", "layer": "2-res-32", "index": 1}
    rows = [{**row, "description": "huge", "score": 10**400}, {**row, "description": "scored", "score": 0.1}]

    call_command(
        "import_labels", "--training", training.pk, str(write_jsonl(tmp_path / "scores.jsonl", rows))
    )

    assert label_of(training, 1) == "scored"
