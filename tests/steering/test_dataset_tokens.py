"""A dataset's token count (Dataset.num_tokens, shown in admin): recorded by import_sae from the SAE's cfg,
and by bootstrap_demo for a demo corpus imported before that (which admin showed with 0 tokens)."""

import json

import pytest
from django.core.management import call_command
from django.urls import reverse

from steering_app.engine.demo import DEMO_CHECKPOINT, DEMO_DATASET, DEMO_MODEL_NAME
from steering_app.models import Dataset, LanguageModel, Training
from tests.steering.sae_checkpoints import write_saelens_checkpoint

pytestmark = pytest.mark.django_db

DEMO_TOKENS = json.loads((DEMO_CHECKPOINT / "cfg.json").read_text())["metadata"]["tokens"]


def with_tokens(path, tokens):
    cfg = json.loads((path / "cfg.json").read_text())
    cfg["metadata"]["tokens"] = tokens
    (path / "cfg.json").write_text(json.dumps(cfg))
    return path


def import_sae(path, dataset="tiny-corpus"):
    call_command("import_sae", "--model", "tiny-llama", "--path", str(path), "--dataset", dataset)


def test_import_records_the_token_count_of_the_sae_cfg(language_model, tmp_path):
    import_sae(with_tokens(write_saelens_checkpoint(tmp_path / "sae"), 333_404))

    assert Dataset.objects.get(name="tiny-corpus").num_tokens == 333_404


@pytest.mark.parametrize("tokens", [None, "many", True, -5, 0, 2**63])
def test_import_leaves_the_count_alone_when_the_cfg_has_no_usable_one(language_model, tmp_path, tokens):
    Dataset.objects.create(name="tiny-corpus", source="tiny", num_tokens=1000)

    import_sae(with_tokens(write_saelens_checkpoint(tmp_path / "sae"), tokens))

    assert Dataset.objects.get(name="tiny-corpus").num_tokens == 1000


def test_a_smaller_count_never_lowers_it(language_model, tmp_path):
    Dataset.objects.create(name="tiny-corpus", source="tiny", num_tokens=5000)

    import_sae(with_tokens(write_saelens_checkpoint(tmp_path / "sae"), 4000))

    assert Dataset.objects.get(name="tiny-corpus").num_tokens == 5000


def test_bootstrap_demo_fixes_a_demo_corpus_imported_with_zero_tokens(monkeypatch, client, staff):
    """A database bootstrapped before the fix: the model and training exist, the corpus says 0 tokens.
    (The model row being ready, bootstrap_demo loads no weights.)"""
    monkeypatch.setenv("DEMO_PASSWORD", "steer-me")
    model = LanguageModel.objects.create(
        name=DEMO_MODEL_NAME,
        source="smollm2-demo",
        architecture="LlamaForCausalLM",
        num_layers=30,
        hidden_size=576,
    )
    dataset = Dataset.objects.create(name=DEMO_DATASET, source=DEMO_DATASET)
    Training.objects.create(
        model=model,
        dataset=dataset,
        encoder_type="topk",
        hook_layer=10,
        hook_name="blocks.10.hook_resid_post",
        d_in=576,
        d_sae=2048,
        checkpoint_path=str(DEMO_CHECKPOINT.resolve()),
        status=Training.Status.COMPLETED,
    )

    call_command("bootstrap_demo")

    dataset.refresh_from_db()
    assert dataset.num_tokens == DEMO_TOKENS > 300_000
    assert dataset.description.startswith("Built-in demo corpus")
    client.force_login(staff)
    changelist = client.get(reverse("admin:steering_app_dataset_changelist")).text
    assert f'<td class="field-num_tokens">{DEMO_TOKENS}</td>' in changelist
