import gzip
import json
import re
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError
from django.db import transaction

from steering_app import json_checks
from steering_app.models import Feature, Training

_LEADING_NUMBER = re.compile(r"\s*(\d+)")


def read_export(path: Path) -> list[tuple[str, dict]]:
    """(where, object) for each explanation of a Neuronpedia export: a JSON list or JSON lines, maybe gzipped.

    where names the line ("line 3") so that an error can point at it.
    """
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        text = raw.decode("utf-8")
    except (OSError, EOFError, UnicodeDecodeError) as error:
        raise CommandError(f"Cannot read {path}: {error}") from error
    if text.lstrip().startswith("["):
        _bound_depth(raw, str(path))  # the list's entries are parsed one by one, each within the list's depth
        return _json_list(path, text)
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        _bound_depth(line.encode(), f"{path}, line {number}")
        try:
            rows.append((f"line {number}", json.loads(line)))
        except json.JSONDecodeError as error:
            raise CommandError(f"{path}, line {number}: not valid JSON ({error.msg})") from error
    return rows


def _json_list(path: Path, text: str) -> list[tuple[str, dict]]:
    """The list's items, each with the line it starts on (a pretty-printed export has one item per block)."""
    decoder = json.JSONDecoder()
    rows = []
    position = text.index("[") + 1
    while True:
        position = _skip_space(text, position)
        if position < len(text) and text[position] == "]":
            break
        line = text.count("\n", 0, position) + 1
        try:
            item, position = decoder.raw_decode(text, position)
        except json.JSONDecodeError as error:
            raise CommandError(f"{path}, line {error.lineno}: not valid JSON ({error.msg})") from error
        rows.append((f"line {line} (entry {len(rows) + 1})", item))
        position = _skip_space(text, position)
        if position < len(text) and text[position] == ",":
            position += 1
        elif position >= len(text) or text[position] != "]":
            line = text.count("\n", 0, position) + 1
            raise CommandError(f"{path}, line {line}: not valid JSON (expected ',' or ']')")
    return rows


def _bound_depth(raw: bytes, where: str) -> None:
    """Refuse JSON nested too deep for json's recursive parser (RecursionError) before parsing it."""
    try:
        json_checks.check_depth(raw)
    except json_checks.MalformedJSON as error:
        raise CommandError(f"{where}: {error}") from error


def _skip_space(text: str, position: int) -> int:
    while position < len(text) and text[position].isspace():
        position += 1
    return position


def score_of(row: dict) -> float | None:
    """The explanation's best score: `score`, `scoreV1`/`scoreV2`, or the best of `scores` (numbers or
    objects with a `value` or `score`); None when it has none."""
    candidates = [row.get("score"), row.get("scoreV1"), row.get("scoreV2")]
    scores = row.get("scores")
    if isinstance(scores, list):
        for item in scores:
            candidates.append(item.get("value", item.get("score")) if isinstance(item, dict) else item)
    numbers = [number for number in map(json_checks.finite_float, candidates) if number is not None]
    return max(numbers) if numbers else None


def matches_model(model_id: str, training: Training, neuronpedia_id: str | None) -> bool:
    """The export's modelId is this training's model: --neuronpedia-id's model part when given, else the
    model's name, its source, or the source's last path part (a hub id's repository name), ignoring case."""
    if neuronpedia_id:
        return model_id.lower() == neuronpedia_id.split("/", 1)[0].lower()
    source = training.model.source.rstrip("/")
    names = {training.model.name, source, source.rsplit("/", 1)[-1]}
    return model_id.lower() in {name.lower() for name in names}


def matches_layer(layer: str, training: Training, neuronpedia_id: str | None) -> bool:
    """The export's layer is this training's: --neuronpedia-id's layer part exactly (ignoring case) when
    given, else the layer string's leading number ("20-gemmascope-res-16k" -> 20) equals hook_layer."""
    if neuronpedia_id and "/" in neuronpedia_id:
        return layer.lower() == neuronpedia_id.split("/", 1)[1].lower()
    number = _LEADING_NUMBER.match(layer)
    return number is not None and int(number.group(1)) == training.hook_layer


def best_explanations(rows, training: Training, neuronpedia_id: str | None) -> dict[int, dict]:
    """index -> the explanation to keep: the highest score; an unscored one ranks below any scored one;
    on a tie the first in the file wins. Any row of another model or layer, or out of range, is an error."""
    best: dict[int, tuple[float, dict]] = {}
    for where, row in rows:
        if not isinstance(row, dict):
            raise CommandError(f"{where}: expected an object with modelId, layer, index and description")
        missing = [key for key in ("modelId", "layer", "index", "description") if row.get(key) is None]
        if missing:
            raise CommandError(f"{where}: missing {', '.join(missing)}")
        try:
            json_checks.check_strings(row)  # first: the messages below quote the row's text
            json_checks.text(row["description"], ("description",))
        except json_checks.MalformedJSON as error:
            raise CommandError(f"{where}: {error}") from error
        model_id, layer = str(row["modelId"]), str(row["layer"])
        if not matches_model(model_id, training, neuronpedia_id) or not matches_layer(
            layer, training, neuronpedia_id
        ):
            expected = neuronpedia_id or f"{training.model.name}/{training.hook_layer}-..."
            raise CommandError(
                f"{where}: the export is for {model_id}/{layer}, but training {training.pk} is "
                f"{training.model.name} (source {training.model.source}) at layer {training.hook_layer} "
                f"(expected {expected}); nothing imported. If the names differ, pass --neuronpedia-id MODEL/LAYER"
            )
        index = json_checks.digits_as_int(row["index"])
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < training.d_sae:
            raise CommandError(f"{where}: index {row['index']!r:.40} is not in 0..{training.d_sae - 1}")
        score = score_of(row)
        rank = score if score is not None else -float("inf")
        if index not in best or rank > best[index][0]:
            best[index] = (rank, row)
    return {index: row for index, (_, row) in best.items()}


class Command(BaseCommand):
    help = (
        "Import Neuronpedia explanations (a bulk export: JSON list or JSON lines, .gz too) as the labels and "
        "descriptions of a training's features; max activations and other measurements are kept. An export "
        "of another model or layer is refused and nothing changes."
    )

    def add_arguments(self, parser):
        parser.add_argument("--training", type=int, required=True, help="id of the training to label")
        parser.add_argument("file", help="Neuronpedia explanations export (.json, .jsonl, optionally .gz)")
        parser.add_argument(
            "--neuronpedia-id",
            help="MODEL/LAYER as Neuronpedia names them (e.g. gemma-2-2b/20-gemmascope-res-16k), when they "
            "differ from the registered model's name or source",
        )

    def handle(self, **options):
        training = Training.objects.select_related("model").filter(pk=options["training"]).first()
        if training is None:
            raise CommandError(f"Training {options['training']} does not exist")
        path = Path(options["file"])
        explanations = best_explanations(read_export(path), training, options["neuronpedia_id"])
        updated = self.apply(training, explanations)
        self.stdout.write(
            self.style.SUCCESS(
                f"Labelled {updated} features of training {training.pk} from {path.name} "
                f"({len(explanations)} explained)"
            )
        )

    @transaction.atomic
    def apply(self, training: Training, explanations: dict[int, dict]) -> int:
        features = list(training.features.filter(index__in=explanations))
        for feature in features:
            description = explanations[feature.index]["description"].strip()
            feature.label = description[:300]
            feature.description = description
        Feature.objects.bulk_update(features, ["label", "description"], batch_size=500)
        present = {feature.index for feature in features}
        created = [
            Feature.from_description(training, index, {"description": row["description"].strip()})
            for index, row in explanations.items()
            if index not in present
        ]
        Feature.objects.bulk_create(created, batch_size=500)
        return len(features) + len(created)
