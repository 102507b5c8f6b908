import json

import pytest
import torch
from django.core.management import CommandError, call_command

from steering_app.models import Dataset, Feature, Training
from tests.steering.sae_checkpoints import write_saelens_checkpoint

pytestmark = pytest.mark.django_db


def import_sae(*args):
    call_command("import_sae", *args)


@pytest.mark.parametrize("architecture", ["standard", "topk", "jumprelu"])
def test_it_imports_each_saelens_architecture_with_all_features(language_model, tmp_path, architecture):
    path = write_saelens_checkpoint(tmp_path / architecture, architecture=architecture)

    import_sae("--model", "tiny-llama", "--path", str(path), "--dataset", "tiny-corpus")

    training = Training.objects.get()
    assert training.status == Training.Status.COMPLETED and training.completed_at is not None
    assert (training.encoder_type, training.hook_layer, training.d_in, training.d_sae) == (
        architecture,
        2,
        16,
        32,
    )
    assert training.hook_name == "blocks.2.hook_resid_post"
    assert training.dataset == Dataset.objects.get(name="tiny-corpus")
    assert list(training.features.values_list("index", flat=True)) == list(range(32))
    assert training.features.get(index=5).label == "feature #5"


@pytest.mark.parametrize(
    ("hook_name", "layer"), [("blocks.3.hook_resid_post", 3), ("blocks.3.hook_resid_pre", 2)]
)
def test_it_takes_the_layer_from_either_hook_name_form(language_model, tmp_path, hook_name, layer):
    import_sae(
        "--model",
        "tiny-llama",
        "--path",
        str(write_saelens_checkpoint(tmp_path / "sae", hook_name=hook_name)),
    )
    assert Training.objects.get().hook_layer == layer


def test_it_lets_the_layer_option_override_the_hook_name(language_model, tmp_path):
    import_sae(
        "--model", "tiny-llama", "--path", str(write_saelens_checkpoint(tmp_path / "sae")), "--layer", "1"
    )
    assert Training.objects.get().hook_layer == 1


def test_it_reads_neuronpedia_style_labels(language_model, tmp_path):
    labels = tmp_path / "explanations.json"
    labels.write_text(
        json.dumps([{"index": 3, "description": "weather words"}, {"index": "7", "description": "code"}])
    )

    import_sae(
        "--model",
        "tiny-llama",
        "--path",
        str(write_saelens_checkpoint(tmp_path / "sae")),
        "--labels",
        str(labels),
    )

    assert Feature.objects.get(index=3).label == "weather words"
    assert Feature.objects.get(index=7).description == "code"
    assert Feature.objects.get(index=4).label == "feature #4"


def test_it_keeps_a_feature_tables_top_snippets(language_model, tmp_path):
    table = tmp_path / "features.json"
    snippets = ["it will\u00ab rain\u00bb today (4.1)", "heavy\u00ab rain\u00bb (3.9)"]
    table.write_text(json.dumps([{"index": 3, "label": "rain", "max_activation": 4.1, "examples": snippets}]))

    import_sae(
        "--model",
        "tiny-llama",
        "--path",
        str(write_saelens_checkpoint(tmp_path / "sae")),
        "--labels",
        str(table),
    )

    assert Feature.objects.get(index=3).examples == snippets
    assert Feature.objects.get(index=4).examples == []


def with_metadata(directory, **metadata):
    """The checkpoint with its cfg.json's metadata changed (json.dumps writes float("inf") as Infinity)."""
    cfg = json.loads((directory / "cfg.json").read_text())
    cfg["metadata"].update(metadata)
    (directory / "cfg.json").write_text(json.dumps(cfg))
    return directory


def broken_checkpoints(tmp_path):
    missing_weights = write_saelens_checkpoint(tmp_path / "no-weights")
    (missing_weights / "sae_weights.safetensors").unlink()
    malformed_cfg = write_saelens_checkpoint(tmp_path / "bad-cfg")
    (malformed_cfg / "cfg.json").write_text("{not json")
    deep_cfg = write_saelens_checkpoint(tmp_path / "deep-cfg")
    (deep_cfg / "cfg.json").write_text(
        '{"d_in": 16, "d_sae": 32, "x": ' + "[" * 100_000 + "]" * 100_000 + "}"
    )
    checkpoint = write_saelens_checkpoint
    return {
        "missing file": (missing_weights, "sae_weights.safetensors"),
        "malformed cfg.json": (malformed_cfg, "cfg.json"),
        "wrong tensor shape": (
            write_saelens_checkpoint(tmp_path / "shape", tensors={"W_dec": torch.zeros(32, 15)}),
            "W_dec",
        ),
        "unknown architecture": (write_saelens_checkpoint(tmp_path / "arch", architecture="gated"), "gated"),
        "d_in mismatch": (write_saelens_checkpoint(tmp_path / "din", d_in=8), "hidden size"),
        "layer out of range": (
            write_saelens_checkpoint(tmp_path / "layer", hook_name="blocks.9.hook_resid_post"),
            "out of range",
        ),
        "not a directory": (tmp_path / "nowhere", "cfg.json"),
        "deeply nested cfg.json": (deep_cfg, r"cfg\.json: .*nested more than 64 levels"),
        "infinite stat": (
            with_metadata(checkpoint(tmp_path / "inf"), explained_variance=float("inf")),
            r"cfg\.json: metadata\.explained_variance: must be a finite number, got Infinity",
        ),
        "stat not a number": (
            with_metadata(checkpoint(tmp_path / "abc"), l0="abc"),
            r"cfg\.json: metadata\.l0: must be a finite number",
        ),
        "hook name not text": (
            with_metadata(checkpoint(tmp_path / "hook"), hook_name=5),
            r"cfg\.json: metadata\.hook_name: must be text",
        ),
        "lone surrogate": (
            with_metadata(checkpoint(tmp_path / "surrogate"), model_name="\ud800"),
            r"cfg\.json: metadata\.model_name: .*lone surrogates",
        ),
    }


@pytest.mark.parametrize(
    "case",
    [
        "missing file",
        "malformed cfg.json",
        "wrong tensor shape",
        "unknown architecture",
        "d_in mismatch",
        "layer out of range",
        "not a directory",
        "deeply nested cfg.json",
        "infinite stat",
        "stat not a number",
        "hook name not text",
        "lone surrogate",
    ],
)
def test_it_refuses_a_broken_checkpoint_and_creates_nothing(language_model, tmp_path, case):
    path, message = broken_checkpoints(tmp_path)[case]

    with pytest.raises(CommandError, match=message):
        import_sae("--model", "tiny-llama", "--path", str(path), "--dataset", "never-created")

    assert not Training.objects.exists() and not Feature.objects.exists() and not Dataset.objects.exists()


def test_it_refuses_an_unknown_model(db, tmp_path):
    with pytest.raises(CommandError, match="Unknown model 'nope'"):
        import_sae("--model", "nope", "--path", str(write_saelens_checkpoint(tmp_path / "sae")))
    assert not Training.objects.exists()


def import_with_labels(tmp_path, labels):
    import_sae(
        "--model",
        "tiny-llama",
        "--path",
        str(write_saelens_checkpoint(tmp_path / "sae")),
        "--labels",
        str(labels),
    )


def test_it_refuses_labels_out_of_range_and_creates_nothing(language_model, tmp_path):
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps([{"index": 99, "description": "beyond d_sae"}]))
    with pytest.raises(CommandError, match=r"\[0\]\.index: must be a whole number from 0 to 31, got 99"):
        import_with_labels(tmp_path, labels)
    assert not Training.objects.exists() and not Feature.objects.exists()


def labels_file(tmp_path, *entries):
    path = tmp_path / "labels.json"
    path.write_text(json.dumps([{"index": 1, "description": "fine"}, *entries]))
    return path


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"index": 3, "examples": 5}, r"\[1\]\.examples: must be a list of text"),
        ({"index": 3, "top_tokens": "notalist"}, r"\[1\]\.top_tokens: must be a list of text"),
        ({"index": 3, "top_tokens": ["rain", 5]}, r"\[1\]\.top_tokens\[1\]: must be text"),
        ({"index": 3, "max_activation": float("inf")}, r"\[1\]\.max_activation: must be a finite number"),
        ({"index": 3, "max_activation": "abc"}, r"\[1\]\.max_activation: must be a finite number"),
        ({"index": 3, "max_activation": 10**400}, r"\[1\]\.max_activation: must be a finite number"),
        ({"index": 3, "activation_frequency": float("-inf")}, r"\[1\]\.activation_frequency: must be a"),
        ({"index": 3, "activation_frequency": 1.5}, r"\[1\]\.activation_frequency: must be .* 0 to 1"),
        ({"index": 3, "label": 5}, r"\[1\]\.label: must be text"),
        ({"index": 3, "description": "\ud800"}, r"\[1\]\.description: .*lone surrogates"),
        ({"index": 3, "description": "nul\x00"}, r"\[1\]\.description: .*NUL"),
        ({"index": "²"}, r"\[1\]\.index: must be a whole number from 0 to 31"),
        ({"index": "9" * 5000}, r"\[1\]\.index: must be a whole number from 0 to 31"),
    ],
)
def test_it_refuses_a_labels_file_with_a_bad_value_naming_it_and_creates_nothing(
    language_model, tmp_path, entry, message
):
    with pytest.raises(CommandError, match=message):
        import_with_labels(tmp_path, labels_file(tmp_path, entry))

    assert not Training.objects.exists() and not Feature.objects.exists()


def test_it_refuses_a_deeply_nested_labels_file_and_creates_nothing(language_model, tmp_path):
    labels = tmp_path / "labels.json"
    labels.write_text("[" * 100_000 + "]" * 100_000)

    with pytest.raises(CommandError, match="nested more than 64 levels"):
        import_with_labels(tmp_path, labels)

    assert not Training.objects.exists() and not Feature.objects.exists()
