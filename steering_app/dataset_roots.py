"""Where trainings and calibrations may read a corpus: under the dataset roots, and nowhere else.

What a job reads ends up where every member reads it (feature labels, top tokens, example snippets), so a
corpus path must never reach the server's own files. The roots are the data dir's datasets/ folder and the
folders of STEERLAB_DATASET_DIRS; inside the data dir nothing outside datasets/ is read (the database, the
secret key), whatever the roots. Paths are compared with their symlinks resolved, and a folder's files one by
one: a link inside a folder that others can write to may point anywhere.
"""

from pathlib import Path

from django.conf import settings

from steering_app.errors import InvalidInput


def roots() -> list[Path]:
    return [Path(settings.STEERLAB_DATA_DIR) / "datasets", *settings.STEERLAB_DATASET_DIRS]


def corpus_files(source: str) -> list[Path]:
    """The resolved text files of a corpus (a text file, or a folder's text files), every one under the
    dataset roots; InvalidInput naming the path and the roots otherwise, or when there is nothing to read."""
    # The engine brings torch, which a form's check rarely needs.
    from steering_app.engine.training import corpus

    path = Path(source).resolve()
    refuse_outside_roots(f"Dataset path {source!r} resolves to {path}, which", path)
    try:
        files = corpus.text_files(path)
    except FileNotFoundError as error:
        raise InvalidInput(f"Dataset path {source!r}: {error}", "dataset") from None
    resolved = []
    for file in files:
        target = file.resolve()
        refuse_outside_roots(f"Dataset path {source!r} holds {file}, which resolves to {target} and", target)
        resolved.append(target)
    return resolved


def refuse_outside_roots(subject: str, path: Path) -> None:
    data_dir = Path(settings.STEERLAB_DATA_DIR).resolve()
    allowed = [root.resolve() for root in roots()]
    own_data = path.is_relative_to(data_dir) and not path.is_relative_to(data_dir / "datasets")
    if own_data or not any(path.is_relative_to(root) for root in allowed):
        raise InvalidInput(
            f"{subject} is not under a dataset root ({', '.join(map(str, allowed))}). Corpora are read only "
            "there (STEERLAB_DATASET_DIRS adds roots), and never the data dir's own files outside datasets/.",
            "dataset",
        )
