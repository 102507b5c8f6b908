import json
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError
from django.db import transaction
from django.utils import timezone

from steering_app.json_checks import (
    MalformedJSON,
    digits_as_int,
    loads,
    number,
    text,
    text_list,
    whole_number,
)
from steering_app.limits import MAX_ID
from steering_app.models import Dataset, Feature, LanguageModel, Training

STAT_KEYS = ("explained_variance", "l0", "dead_fraction")


def frequency(value: object, path: tuple) -> float:
    return number(value, path, 0.0, 1.0)


# A feature table's keys, each with the check of its type: the panel and the feature card iterate top_tokens
# and examples, the API writes the numbers as JSON, and the database allows frequencies from 0 to 1 only.
FEATURE_FIELDS = {
    "label": text,
    "description": text,
    "max_activation": number,
    "activation_frequency": frequency,
    "top_tokens": text_list,
    "examples": text_list,
}


def read_feature_table(path: Path, d_sae: int) -> dict[int, dict]:
    """Neuronpedia-style explanations [{"index", "description"}] or SteerLab's feature table (more keys)."""
    try:
        rows = loads(path.read_bytes())
    except OSError as error:
        raise CommandError(f"Cannot read labels file {path}: {error}") from error
    except json.JSONDecodeError as error:
        raise CommandError(f"Labels file {path} is not valid JSON: {error}") from error
    except ValueError as error:  # not UTF-8, or refused by json_checks (too deep, NUL, lone surrogate)
        raise CommandError(f"Labels file {path}: {error}") from error
    if not isinstance(rows, list):
        raise CommandError(f"Labels file {path} must hold a JSON list of {{index, description}} objects")
    try:
        return dict(feature_entry(row, position, d_sae) for position, row in enumerate(rows))
    except MalformedJSON as error:
        raise CommandError(f"Labels file {path}: {error}") from error


def feature_entry(row: object, position: int, d_sae: int) -> tuple[int, dict]:
    """(index, the entry's known keys, checked); raises MalformedJSON naming the first value at fault."""
    if not isinstance(row, dict):
        raise MalformedJSON("must be an object with index and description", (position,))
    index = whole_number(digits_as_int(row.get("index")), (position, "index"), 0, d_sae - 1)
    return index, {
        key: check(row[key], (position, key))
        for key, check in FEATURE_FIELDS.items()
        if row.get(key) is not None
    }


def recorded_metadata(cfg: dict) -> tuple[dict, int | None]:
    """The stats a training records from cfg.json's metadata, and its dataset's token count: finite numbers
    (the API cannot write Infinity as JSON). The count is informational: one that is not a positive whole
    number the database's integer column holds is left out, and the dataset keeps the count it has."""
    metadata = cfg.get("metadata", {})
    try:
        stats = {
            key: number(metadata[key], ("metadata", key))
            for key in STAT_KEYS
            if metadata.get(key) is not None
        }
    except MalformedJSON as error:
        raise CommandError(f"cfg.json: {error}") from error
    tokens = metadata.get("tokens")
    usable = isinstance(tokens, int) and not isinstance(tokens, bool) and 0 < tokens <= MAX_ID
    return stats, tokens if usable else None


class Command(BaseCommand):
    help = (
        "Import an SAE as a completed training: a local checkpoint directory, a folder of a hub repository, "
        "or a release of SAELens's pretrained-SAE registry; SAELens, Gemma Scope and Llama Scope layouts."
    )

    def add_arguments(self, parser):
        parser.add_argument("--model", required=True, help="name of a registered language model")
        where = parser.add_mutually_exclusive_group(required=True)
        where.add_argument(
            "--path", help="local checkpoint directory (SAELens, Gemma Scope or Llama Scope layout)"
        )
        where.add_argument(
            "--hf-repo", help="hub model repository ORG/NAME holding the SAE (see --path-in-repo)"
        )
        where.add_argument("--release", help="release of SAELens's pretrained-SAE registry (see --sae-id)")
        parser.add_argument("--path-in-repo", help="folder of --hf-repo holding the SAE (default: the root)")
        parser.add_argument("--sae-id", help="SAE id within --release")
        parser.add_argument(
            "--layer", type=int, help="decoder block whose output the SAE reads (default: from cfg)"
        )
        parser.add_argument(
            "--labels", help="JSON list of {index, description[, label, max_activation, ...]}"
        )
        parser.add_argument("--dataset", help="name of the dataset it was trained on (created if new)")

    def handle(self, **options):
        from steering_app.engine.loader import data_dir
        from steering_app.engine.saes.formats import staged
        from steering_app.engine.saes.sae import SAEFormatError, hook_layer_from_name, load_sae

        model = LanguageModel.objects.filter(name=options["model"]).first()
        if model is None:
            raise CommandError(f"Unknown model {options['model']!r}: register it first with register_model")
        source = self.locate(options, data_dir() / "hub")
        try:
            with staged(source, data_dir() / "saes" / "converted") as checkpoint:
                sae = load_sae(checkpoint.path)
                hook_name = sae.hook_name
                layer = (
                    options["layer"]
                    if options["layer"] is not None
                    else hook_layer_from_name(hook_name or "")
                )
                if sae.d_in != model.hidden_size:
                    raise CommandError(
                        f"SAE d_in {sae.d_in} does not match {model.name}'s hidden size {model.hidden_size}"
                    )
                if not 0 <= layer < model.num_layers:
                    raise CommandError(
                        f"Layer {layer} is out of range: {model.name} has layers 0..{model.num_layers - 1}"
                    )
                stats, tokens = recorded_metadata(sae.cfg)
                table = read_feature_table(Path(options["labels"]), sae.d_sae) if options["labels"] else {}
        except SAEFormatError as error:
            raise CommandError(f"Invalid SAE checkpoint at {source.folder}: {error}") from error
        training = self.create_training(
            model, sae, checkpoint.final, layer, hook_name, table, stats, tokens, options["dataset"]
        )
        converted = (
            f", converted from {checkpoint.format} into {checkpoint.final}"
            if checkpoint.path != source.folder
            else ""
        )
        self.stdout.write(
            f"Imported training {training.pk}: {training.encoder_type} SAE, {sae.d_sae} features, "
            f"{model.name} layer {layer}, {len(table)} labelled{converted}"
        )

    def locate(self, options, hub_cache: Path):
        """The checkpoint folder the options name, fetched from the hub when they name a hub folder."""
        from steering_app.engine.saes import hub
        from steering_app.engine.saes.formats import Source

        if options["sae_id"] and not options["release"]:
            raise CommandError("--sae-id goes with --release")
        if options["path_in_repo"] is not None and not options["hf_repo"]:
            raise CommandError("--path-in-repo goes with --hf-repo")
        try:
            if options["release"]:
                if not options["sae_id"]:
                    raise CommandError("--release needs --sae-id")
                entry = hub.resolve(options["release"], options["sae_id"])
                repo_id, folder = entry.repo_id, entry.path_in_repo
                metadata = {
                    "release": entry.release,
                    "sae_id": entry.sae_id,
                    "neuronpedia_id": entry.neuronpedia_id,
                    "model_name": entry.model,
                }
            elif options["hf_repo"]:
                repo_id, folder, metadata = options["hf_repo"], (options["path_in_repo"] or "").strip("/"), {}
            else:
                path = Path(options["path"]).resolve()
                return Source(folder=path, name=str(path), layer=options["layer"])
            local = hub.download_folder(repo_id, folder, hub_cache)
        except hub.HubError as error:
            raise CommandError(str(error)) from error
        metadata.update({"repo_id": repo_id, "path_in_repo": folder})
        return Source(
            folder=local, name=f"{repo_id}/{folder}".rstrip("/"), layer=options["layer"], metadata=metadata
        )

    @transaction.atomic
    def create_training(
        self, model, sae, path, layer, hook_name, table, stats, tokens, dataset_name
    ) -> Training:
        dataset = None
        if dataset_name:
            dataset, _ = Dataset.objects.get_or_create(name=dataset_name, defaults={"source": dataset_name})
            Dataset.record_tokens(dataset.pk, tokens)
        training = Training.objects.create(
            model=model,
            dataset=dataset,
            encoder_type=sae.architecture,
            hook_layer=layer,
            hook_name=hook_name or f"blocks.{layer}.hook_resid_post",
            d_in=sae.d_in,
            d_sae=sae.d_sae,
            checkpoint_path=str(path),
            status=Training.Status.COMPLETED,
            stats=stats,
            completed_at=timezone.now(),
        )
        Feature.objects.bulk_create(
            (Feature.from_description(training, index, table.get(index, {})) for index in range(sae.d_sae)),
            batch_size=2000,
        )
        return training
