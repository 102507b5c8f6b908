"""import_sae --hf-repo / --release: a folder of a hub repository, found through SAELens's registry or named
directly, read from a hub cache in huggingface_hub's own layout with HF_HUB_OFFLINE=1."""

from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
import yaml
from django.core.management import CommandError, call_command

from steering_app import engine_config
from steering_app.engine.saes import hub
from steering_app.engine.saes.sae import load_sae
from steering_app.models import Feature, Training
from tests.steering.sae_checkpoints import gemma_scope_reference, write_gemma_scope_params, write_hub_cache

pytestmark = pytest.mark.django_db

REPO = "google/gemma-scope-tiny-pt-res"
FOLDER = "layer_20/width_16k/average_l0_71"


@pytest.fixture
def data_dir(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "data"
    monkeypatch.setattr(engine_config.current, "data_dir", str(path))
    # pytest_defaults sets HF_HUB_OFFLINE=1 before huggingface_hub reads it; this holds even when the
    # developer's shell said otherwise.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return path


@pytest.fixture
def hub_cache(data_dir, tmp_path) -> Path:
    """The hub cache import_sae uses (<data dir>/hub) holding REPO's FOLDER, a Gemma Scope SAE, and another
    folder that must not be needed."""
    source = write_gemma_scope_params(tmp_path / "source")
    other = write_gemma_scope_params(tmp_path / "other", seed=5)
    return write_hub_cache(
        data_dir / "hub",
        REPO,
        {
            f"{FOLDER}/params.npz": source / "params.npz",
            "layer_3/width_16k/x/params.npz": other / "params.npz",
        },
    )


@pytest.fixture
def registry(tmp_path, monkeypatch) -> Path:
    """A registry in SAELens's format with one release, in place of the vendored one."""
    path = tmp_path / "pretrained_saes.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "gemma-scope-tiny-pt-res": {
                    "conversion_func": "gemma_2",
                    "model": "tiny",
                    "repo_id": REPO,
                    "saes": [
                        {"id": FOLDER, "path": FOLDER, "l0": 71, "neuronpedia": "tiny/20-gemmascope-res-16k"},
                        {
                            "id": "layer_20/width_16k/canonical",
                            "path": FOLDER,
                            "neuronpedia": "tiny/20-canon",
                        },
                    ],
                },
                "dictionary-tiny": {
                    "conversion_func": "dictionary_learning_1",
                    "model": "tiny",
                    "repo_id": "x/y",
                    "saes": [{"id": "a", "path": "a"}],
                },
            }
        )
    )
    monkeypatch.setattr(hub, "REGISTRY_FILE", path)
    return path


def import_sae(*args):
    call_command("import_sae", "--model", "smollm2", *args)


def converted_dirs(data_dir: Path) -> list[Path]:
    root = data_dir / "saes" / "converted"
    return sorted(root.iterdir()) if root.exists() else []


def assert_gemma_scope_training(hub_cache: Path, data_dir: Path) -> Training:
    training = Training.objects.get()
    assert (training.encoder_type, training.hook_layer, training.d_in, training.d_sae) == (
        "jumprelu",
        20,
        576,
        64,
    )
    assert training.features.count() == 64
    assert converted_dirs(data_dir) == [Path(training.checkpoint_path)]
    sae = load_sae(training.checkpoint_path)
    encode, _ = gemma_scope_reference(hub_cache / FOLDER / "params.npz")
    x = torch.randn(4, 576) * 0.5
    assert (sae.encode(x).double() - encode(x)).abs().max() < 1e-5
    return training


def test_it_imports_a_folder_of_a_hub_repository_from_the_cache(smollm2_row, hub_cache, data_dir):
    import_sae("--hf-repo", REPO, "--path-in-repo", FOLDER)

    training = assert_gemma_scope_training(hub_cache, data_dir)
    metadata = load_sae(training.checkpoint_path).cfg["metadata"]
    assert metadata["repo_id"] == REPO and metadata["path_in_repo"] == FOLDER


def test_it_imports_a_registry_release_and_records_where_it_came_from(
    smollm2_row, hub_cache, data_dir, registry
):
    import_sae("--release", "gemma-scope-tiny-pt-res", "--sae-id", "layer_20/width_16k/canonical")

    training = assert_gemma_scope_training(hub_cache, data_dir)
    metadata = load_sae(training.checkpoint_path).cfg["metadata"]
    assert metadata["release"] == "gemma-scope-tiny-pt-res"
    assert metadata["neuronpedia_id"] == "tiny/20-canon"
    assert metadata["hook_name"] == "blocks.20.hook_resid_post"


def test_it_resolves_releases_of_the_vendored_registry():
    entry = hub.resolve("gemma-scope-2b-pt-res-canonical", "layer_20/width_16k/canonical")

    assert (entry.repo_id, entry.path_in_repo, entry.model, entry.conversion_func) == (
        "google/gemma-scope-2b-pt-res",
        "layer_20/width_16k/average_l0_71",
        "gemma-2-2b",
        "gemma_2",
    )
    assert entry.neuronpedia_id == "gemma-2-2b/20-gemmascope-res-16k"
    llama = hub.resolve("llama_scope_lxr_8x", "l15r_8x")
    assert (llama.repo_id, llama.path_in_repo) == ("fnlp/Llama3_1-8B-Base-LXR-8x", "Llama3_1-8B-Base-L15R-8x")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--release", "gemma-scope-tiny-pt-re", "--sae-id", FOLDER],
            "Unknown SAE release 'gemma-scope-tiny-pt-re'; close matches: gemma-scope-tiny-pt-res",
        ),
        (
            ["--release", "gemma-scope-tiny-pt-res", "--sae-id", "layer_20/width_16k/average_l0_7"],
            "has no SAE id 'layer_20/width_16k/average_l0_7'; close matches: layer_20/width_16k/average_l0_71",
        ),
        (
            ["--release", "dictionary-tiny", "--sae-id", "a"],
            "SAELens converts it with 'dictionary_learning_1'",
        ),
        (["--release", "gemma-scope-tiny-pt-res"], "--release needs --sae-id"),
        (
            ["--hf-repo", REPO, "--path-in-repo", "layer_9/width_16k/y"],
            "'layer_9/width_16k/y' of .* is not in the hub cache",
        ),
        (
            ["--hf-repo", "google/not-cached", "--path-in-repo", FOLDER],
            "Cannot fetch google/not-cached/.* from the hub",
        ),
        (["--path", "/x", "--sae-id", "a"], "--sae-id goes with --release"),
    ],
)
def test_it_refuses_what_it_cannot_find_and_creates_nothing(
    smollm2_row, hub_cache, data_dir, registry, args, message
):
    with pytest.raises(CommandError, match=message):
        import_sae(*args)

    assert not Training.objects.exists() and not Feature.objects.exists()
    assert converted_dirs(data_dir) == []


def test_it_lists_close_matches_from_the_vendored_registry(smollm2_row, data_dir):
    with pytest.raises(CommandError, match="close matches: gemma-scope-2b-pt-res"):
        import_sae("--release", "gemma-scope-2b-pt-ress", "--sae-id", "layer_20/width_16k/canonical")
    assert not Training.objects.exists()
