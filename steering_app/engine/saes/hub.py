"""Find an SAE on the Hugging Face hub: SAELens's pretrained-SAE registry, and folder downloads.

The registry is SAELens's ``pretrained_saes.yaml``, vendored as data in ``engine/data`` (see
``pretrained_saes.SOURCE.md`` there for its version and how to refresh it); sae-lens itself is not a
dependency.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import yaml

REGISTRY_FILE = Path(__file__).parent / "data" / "pretrained_saes.yaml"
# SAELens's conversion_func values whose files engine.sae_formats reads (None: the SAELens layout).
SUPPORTED_CONVERSIONS = (None, "sae_lens", "gemma_2", "gemma_3", "llama_scope")


class HubError(ValueError):
    """The SAE cannot be found in the registry or fetched from the hub; the message says why."""


@dataclass(frozen=True)
class RegistryEntry:
    release: str
    sae_id: str
    repo_id: str
    path_in_repo: str
    model: str
    conversion_func: str | None
    neuronpedia_id: str | None
    l0: float | None


@cache
def _load_registry(path: Path) -> dict:
    # The C loader parses the 1.5 MB file in ~2 s, the pure-Python one several times slower.
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    with path.open() as handle:
        registry = yaml.load(handle, Loader=loader)
    if not isinstance(registry, dict):
        raise HubError(f"{path}: the SAE registry is not a mapping of releases")
    return registry


def _close_matches(word: str, candidates, what: str) -> str:
    matches = difflib.get_close_matches(word, list(candidates), n=5, cutoff=0.5)
    return f"; close matches: {', '.join(matches)}" if matches else f"; no {what} looks similar"


def resolve(release: str, sae_id: str) -> RegistryEntry:
    """The hub repository and folder of a (release, SAE id) pair of the SAELens registry."""
    registry = _load_registry(REGISTRY_FILE)
    info = registry.get(release)
    if not isinstance(info, dict):
        raise HubError(f"Unknown SAE release {release!r}" + _close_matches(release, registry, "release"))
    saes = {str(sae["id"]): sae for sae in info.get("saes") or [] if isinstance(sae, dict) and "id" in sae}
    sae = saes.get(sae_id)
    if sae is None:
        raise HubError(
            f"Release {release!r} has no SAE id {sae_id!r}" + _close_matches(sae_id, saes, "SAE id")
        )
    conversion = info.get("conversion_func")
    if conversion not in SUPPORTED_CONVERSIONS:
        raise HubError(
            f"Release {release!r} ({info['repo_id']}) is stored in a layout SteerLab does not read "
            f"(SAELens converts it with {conversion!r}; readable: SAELens, Gemma Scope, Llama Scope)"
        )
    return RegistryEntry(
        release=release,
        sae_id=sae_id,
        repo_id=info["repo_id"],
        path_in_repo=str(sae["path"]),
        model=info.get("model", ""),
        conversion_func=conversion,
        neuronpedia_id=sae.get("neuronpedia"),
        l0=sae.get("l0"),
    )


def download_folder(repo_id: str, path_in_repo: str, cache_dir: Path) -> Path:
    """Fetch one folder of a hub model repository into cache_dir (the hub cache layout); its local path.

    huggingface_hub reads HF_TOKEN and HF_HUB_OFFLINE itself and shows its own progress bars.
    With HF_HUB_OFFLINE=1 the folder must already be in cache_dir.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError

    folder = path_in_repo.strip("/")
    patterns = [f"{folder}/*"] if folder else None
    try:
        snapshot = Path(snapshot_download(repo_id, allow_patterns=patterns, cache_dir=cache_dir))
    except (LocalEntryNotFoundError, HfHubHTTPError, HFValidationError) as error:
        raise HubError(f"Cannot fetch {repo_id}/{folder} from the hub: {error}") from error
    local = snapshot / folder
    if not local.is_dir() or not any(local.iterdir()):
        # Offline, snapshot_download returns the cached snapshot even when this folder was never fetched.
        raise HubError(
            f"Folder {folder!r} of {repo_id} is not in the hub cache {cache_dir} "
            "(and HF_HUB_OFFLINE forbids downloading it)"
            if _offline()
            else f"Folder {folder!r} does not exist in {repo_id}"
        )
    return local


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)
