"""Feature search by meaning: the ranked word match (FeatureQuerySet.search) blended with the sentence embedder's
similarity between the query and each feature's label, top tokens and description.

A feature's embedding is stored on its row with the key it was computed from (the embedder and the text), so a
training's features are embedded once, by the first search that finds them missing. The key is checked at each
search: a label changed by any path (admin, calibration's bulk updates, a new import) is embedded again then,
with no signal to forget. The embedder is loaded on first use (engine.loader keeps one per process), not when
this module is imported: the web tier's forms and settings stay free of torch.
"""

from __future__ import annotations

import hashlib
import json
import threading
from functools import lru_cache
from pathlib import Path

import numpy as np

from steering_app import engine_config
from steering_app.models import Feature, Training

# Word-match ranks (FeatureQuerySet.search) that always come first, in that order: the index, the exact label.
PINNED_RANK = 1
# What a word match adds to the similarity, by rank: a label that starts with the query, that holds its words.
# A label that holds them only inside other words ("space" in "whitespace") or a description that merely
# mentions them ("the", "internal") adds nothing: their meaning alone ranks them.
WORD_BONUS = {2: 0.3, 3: 0.2, 4: 0.0, 5: 0.0}
# The features nearest in meaning that join the word matches: at most this many, and only this similar.
NEAREST = 30
MIN_SIMILARITY = 0.3
# A feature's text is cut here (characters): MiniLM reads its first 256 word pieces only.
TEXT_CHARS = 2000
BUNDLED_EMBEDDER = "all-MiniLM-L6-v2"
DEMO_DIR = Path(__file__).resolve().parent / "demo"
# The demo table's vectors, made by write_demo_vectors: embedding its 2048 features takes minutes on a CPU.
DEMO_VECTORS = DEMO_DIR / "feature_embeddings.npz"

_refreshing = threading.Lock()
# Vectors by key, shared by every training in the process (the demo's first): a table imported again embeds
# nothing new.
_vectors: dict[str, np.ndarray] = {}


def search(training: Training, query: str, offset: int, limit: int) -> tuple[list[Feature], int]:
    """A page of the training's features ranked for the query, and how many match in all."""
    ranked = ranked_indices(training, query)
    wanted = ranked[offset : offset + limit]
    rows = {row.index: row for row in Feature.objects.filter(training=training, index__in=wanted)}
    return [rows[index] for index in wanted if index in rows], len(ranked)


def ranked_indices(training: Training, query: str) -> list[int]:
    """The indices of the matching features, best first: the exact index and the exact label, then the word
    matches and the features nearest in meaning, by similarity plus the word match's bonus (ties by index)."""
    query = " ".join(query.split())
    if not query:
        return []
    words = Feature.objects.filter(training=training).search(query).values_list("index", "search_rank")
    pinned = [index for index, rank in words if rank <= PINNED_RANK]
    bonus = {index: WORD_BONUS[rank] for index, rank in words if rank > PINNED_RANK}
    similarity = {}
    if not query.removeprefix("#").isdecimal():  # a number asks for an index: its meaning says nothing
        indices, vectors = stored_vectors(training)
        if indices:
            similarity = dict(zip(indices, (vectors @ query_vector(query)).tolist(), strict=True))
    for index in sorted(similarity, key=lambda index: -similarity[index])[:NEAREST]:
        if similarity[index] >= MIN_SIMILARITY:
            bonus.setdefault(index, 0.0)
    for index in pinned:
        bonus.pop(index, None)
    rest = sorted(bonus, key=lambda index: (-(similarity.get(index, 0.0) + bonus[index]), index))
    return pinned + rest


def stored_vectors(training: Training) -> tuple[list[int], np.ndarray]:
    """The training's feature indices and their unit vectors, one row each; those whose text or embedder
    changed since they were stored are embedded again and stored first."""
    with _refreshing:  # one process embeds a training's features once, not once per waiting request
        rows = list(
            Feature.objects.filter(training=training)
            .order_by("index")
            .only("index", "label", "description", "top_tokens", "embedding", "embedding_key")
        )
        keys = [embedding_key(feature_text(row)) for row in rows]
        stale = [(row, key) for row, key in zip(rows, keys, strict=True) if row.embedding_key != key]
        if stale:
            _store([row for row, _ in stale], [key for _, key in stale])
    if not rows:
        return [], np.zeros((0, 0), dtype=np.float32)
    return [row.index for row in rows], np.stack(
        [np.frombuffer(row.embedding, dtype=np.float32) for row in rows]
    )


def feature_text(feature: Feature) -> str:
    """What a feature means, for the embedder: its label, top tokens and description."""
    tokens = ", ".join(str(token) for token in feature.top_tokens if str(token).strip())
    return f"{feature.label}. {tokens}. {feature.description}"[:TEXT_CHARS]


def embedding_key(text: str) -> str:
    """The text's key under the configured embedder: the same on every machine, for the shipped demo vectors."""
    embedder = engine_config.current.embedder or BUNDLED_EMBEDDER
    return hashlib.sha256(f"{embedder}\x00{text}".encode()).hexdigest()


def _store(rows: list[Feature], keys: list[str]) -> None:
    if not _vectors and DEMO_VECTORS.exists():
        with np.load(DEMO_VECTORS) as shipped:
            _vectors.update(zip(shipped["keys"].tolist(), shipped["vectors"].astype(np.float32), strict=True))
    missing = sorted({key for key in keys if key not in _vectors})
    if missing:
        texts = {key: feature_text(row) for row, key in zip(rows, keys, strict=True)}
        for key, vector in zip(missing, _embed([texts[key] for key in missing]), strict=True):
            _vectors[key] = vector
    for row, key in zip(rows, keys, strict=True):
        row.embedding, row.embedding_key = _vectors[key].tobytes(), key
    Feature.objects.bulk_update(rows, ["embedding", "embedding_key"], batch_size=500)


def _embed(texts: list[str]) -> np.ndarray:
    from steering_app.engine import loader

    vectors = loader.get_embedder().encode(
        texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True
    )
    return vectors.astype(np.float32)


@lru_cache(maxsize=256)  # "Load more" and a retyped query ask again: one encode each
def query_vector(query: str) -> np.ndarray:
    return _embed([query])[0]


def write_demo_vectors() -> None:
    """Embed the demo table (demo/features.json) and write DEMO_VECTORS; run it again when the table or
    feature_text changes (the keys then differ, and the features are embedded at their first search instead)."""
    table = json.loads((DEMO_DIR / "features.json").read_text())
    texts = sorted({feature_text(Feature.from_description(None, entry["index"], entry)) for entry in table})
    vectors = _embed(texts).astype(np.float16)  # half the file; cosines move by about 1e-3
    keys = np.array([embedding_key(text) for text in texts])
    np.savez_compressed(DEMO_VECTORS, keys=keys, vectors=vectors)
