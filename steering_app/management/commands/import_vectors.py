import json
import secrets
import shutil
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError
from django.db import transaction
from django.utils import timezone

from steering_app import vector_jobs
from steering_app.models import LanguageModel, Training


class Command(BaseCommand):
    help = (
        "Import steering vectors as a concept of a vector space: a llama.cpp or repeng control-vector .gguf, or a "
        ".safetensors / .pt / .npy with one vector per layer; or a SteerLab vector-space directory (cfg.json "
        "architecture 'vectors'), all of its concepts. Starts a new vector space on --model, or adds to "
        "--training. A wrong hidden size, missing layers or NaN values are refused, and nothing is created."
    )

    def add_arguments(self, parser):
        parser.add_argument("path", help="the file, or a vector-space directory")
        parser.add_argument("--model", help="name of the registered model the vectors belong to")
        parser.add_argument("--training", type=int, help="id of a vector space to add the concepts to")
        parser.add_argument(
            "--name", help="the concept's name (default: the file's name); not for a directory"
        )
        parser.add_argument("--description", default="")

    def handle(self, **options):
        from steering_app.engine.saes.sae import SAEFormatError
        from steering_app.engine.vectors import VectorError

        space, model = self.space(options)
        path = Path(options["path"])
        try:
            concepts, reading_layer = self.concepts(path, model, options)
        except (VectorError, SAEFormatError) as error:  # a file with no vector, a damaged space directory
            raise CommandError(f"{path}: {error}") from None
        self.check_names(concepts, space)
        training = self.store(space, model, concepts, reading_layer)
        names = ", ".join(f"#{index} {concept.name}" for index, concept in self.numbered(concepts, space))
        self.stdout.write(
            self.style.SUCCESS(
                f"Imported into vector space {training.pk} ({model.name}, reading layer {training.hook_layer}): "
                f"{names}"
            )
        )

    def space(self, options) -> tuple[Training | None, LanguageModel]:
        """The space to add to (None: a new one) and the model."""
        if options["training"] is None and options["model"] is None:
            raise CommandError("Give --model NAME for a new vector space, or --training ID to add to one")
        model = None
        if options["model"] is not None:
            model = LanguageModel.objects.filter(name=options["model"]).first()
            if model is None:
                raise CommandError(f"No model named '{options['model']}' (register_model registers one)")
        if options["training"] is None:
            return None, model
        space = Training.objects.select_related("model").filter(pk=options["training"]).first()
        if space is None:
            raise CommandError(f"Training {options['training']} does not exist")
        if not space.is_vector_space or not space.is_completed:
            raise CommandError(f"Training {space.pk} is not a completed vector space")
        if model is not None and model.pk != space.model_id:
            raise CommandError(f"Vector space {space.pk} belongs to {space.model.name}, not {model.name}")
        return space, space.model

    def concepts(self, path: Path, model: LanguageModel, options) -> tuple[list, int | None]:
        """The concepts at path, and the reading layer a directory records (None for a file)."""
        from steering_app.engine import vectors

        if path.is_dir():
            if options["name"] is not None:
                raise CommandError("--name is for a single file: a vector-space directory names its concepts")
            self.check_space_dir(path)
            concepts, reading_layer = vectors.load_concepts(path)
            for concept in concepts:
                shape = tuple(concept.vectors.shape)
                if shape != (model.num_layers, model.hidden_size):
                    raise CommandError(
                        f"{path}: concept '{concept.name}' has vectors of shape {list(shape)}; {model.name} needs "
                        f"[{model.num_layers}, {model.hidden_size}] (one vector per layer)"
                    )
            return concepts, reading_layer
        if not path.is_file():
            raise CommandError(f"{path} does not exist")
        return [self.imported(path, model, options)], None

    @staticmethod
    def check_space_dir(path: Path) -> None:
        # A vector space's checkpoint names its architecture as its training's encoder type does.
        architecture = Training.EncoderType.VECTORS.value
        try:
            cfg = json.loads((path / "cfg.json").read_text())
        except (OSError, ValueError) as error:
            raise CommandError(
                f"{path} is not a vector-space directory: no readable cfg.json ({error})"
            ) from None
        if not isinstance(cfg, dict) or cfg.get("architecture") != architecture:
            raise CommandError(
                f"{path} holds architecture {cfg.get('architecture') if isinstance(cfg, dict) else None!r}, not "
                f"a vector space ('{architecture}'): import an SAE with import_sae"
            )

    @staticmethod
    def imported(path: Path, model: LanguageModel, options):
        from steering_app.engine import control_vectors, vectors

        try:
            layer_vectors = control_vectors.read_file(
                path, n_embd=model.hidden_size, num_layers=model.num_layers
            )
        except control_vectors.ControlVectorError as error:
            raise CommandError(f"{path}: {error}") from None
        name = " ".join((options["name"] if options["name"] is not None else path.stem).split())
        if not name:
            raise CommandError("--name is empty: name the concept")
        return vectors.imported_concept(
            name, options["description"].strip(), layer_vectors, model.num_layers, str(path)
        )

    @staticmethod
    def check_names(concepts: list, space: Training | None) -> None:
        names = [concept.name.lower() for concept in concepts]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise CommandError(f"Two concepts are named '{repeated[0]}'")
        if space is not None:
            taken = {label.lower() for label in space.features.values_list("label", flat=True)}
            clash = sorted(taken & set(names))
            if clash:
                raise CommandError(f"Vector space {space.pk} already has a concept named '{clash[0]}'")

    @staticmethod
    def numbered(concepts: list, space: Training | None) -> list:
        start = 0 if space is None else space.d_sae
        return list(enumerate(concepts, start))

    def store(self, space: Training | None, model: LanguageModel, concepts: list, reading_layer: int | None):
        """The space with the new concepts, written as a new checkpoint directory and one transaction; the
        directory is deleted again if the transaction fails."""
        from steering_app.engine import vectors
        from steering_app.engine.loader import data_dir

        path = None
        try:
            with transaction.atomic():
                if space is None:
                    layer = reading_layer if reading_layer is not None else concepts[0].best_layer
                    training = Training.objects.create(
                        model=model,
                        encoder_type=Training.EncoderType.VECTORS,
                        hook_layer=layer,
                        hook_name=f"blocks.{layer}.hook_resid_post",
                        d_in=model.hidden_size,
                        d_sae=len(concepts),
                        checkpoint_path="",
                        status=Training.Status.COMPLETED,
                        completed_at=timezone.now(),
                    )
                    every, entries = concepts, []
                else:
                    training = Training.objects.select_for_update().get(pk=space.pk)
                    existing, layer = vectors.load_concepts(training.checkpoint_path)
                    every, entries = [*existing, *concepts], list((training.stats or {}).get("concepts", []))
                start = len(every) - len(concepts)
                entries += [vector_jobs.stats_entry(start + i, concept) for i, concept in enumerate(concepts)]
                path = data_dir() / "vectors" / f"{training.pk}-import-{secrets.token_hex(4)}"
                vectors.save_space(path, every, layer, model.name)
                fields = vector_jobs.space_fields(training, every, layer, path, entries)
                Training.objects.filter(pk=training.pk).update(**fields)
                for i, concept in enumerate(concepts):
                    vector_jobs.concept_feature(training, start + i, concept).save()
        except BaseException:
            if path is not None:
                shutil.rmtree(path, ignore_errors=True)
            raise
        training.refresh_from_db()
        return training
