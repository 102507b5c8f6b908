from pathlib import Path

from django.core.management.base import BaseCommand, CommandError
from django.db import transaction
from django.utils import timezone

from steering_app.engine import demo
from steering_app.models import Dataset, Feature, LanguageModel, Training

DEMO_ALIAS = "demo"  # --dataset demo: the built-in demo corpus


def resolve_dataset(name_or_path: str) -> Dataset:
    """A registered dataset by name, the built-in demo corpus, or a text file / directory (registered now)."""
    dataset = Dataset.objects.filter(name=name_or_path).first()
    if dataset is not None:
        return dataset
    if name_or_path == DEMO_ALIAS:
        return Dataset.objects.create(name=DEMO_ALIAS, source=DEMO_ALIAS, description=demo.DEMO_DATASET_DESCRIPTION)
    path = Path(name_or_path).expanduser().resolve()
    if not path.exists():
        raise CommandError(f"Unknown dataset {name_or_path!r}: not a registered dataset, 'demo', or a text path")
    kind = "directory of text files" if path.is_dir() else "text file"
    dataset, _ = Dataset.objects.get_or_create(name=str(path), defaults={"source": str(path), "description": kind})
    return dataset


def dataset_texts(dataset: Dataset, lm):
    from steering_app.engine import corpus
    from steering_app.engine.loader import data_dir

    if dataset.source == DEMO_ALIAS:
        path = demo.demo_corpus_path(data_dir() / demo.DEMO_WORK_DIR)
        if not path.is_file():
            corpus.build_demo_corpus(lm.model, lm.tokenizer, path)
        return corpus.read_text_file(path)
    return corpus.read_texts(dataset.source)


class Command(BaseCommand):
    help = (
        "Train a TopK SAE on one layer's residual stream (output of block L), write a SAELens-layout checkpoint, "
        "describe every feature, and record a completed Training. A failed or interrupted run is marked failed."
    )

    def add_arguments(self, parser):
        parser.add_argument("--model", required=True, help="name of a registered language model")
        parser.add_argument("--layer", type=int, required=True, help="decoder block whose output is modelled")
        parser.add_argument("--dataset", required=True, help="dataset name, 'demo', a text file or a directory")
        parser.add_argument("--d-sae", type=int, default=2048)
        parser.add_argument("--k", type=int, default=32)
        parser.add_argument("--tokens", type=int, default=300_000, help="activations to collect")
        parser.add_argument("--epochs", type=float, default=8.0)
        parser.add_argument("--seed", type=int, default=0)
        parser.add_argument("--out", help="checkpoint directory (default: <data dir>/saes/<model>-L<layer>-<id>)")

    def handle(self, **options):
        model = LanguageModel.objects.filter(name=options["model"]).first()
        if model is None:
            raise CommandError(f"Unknown model {options['model']!r}: register it first with register_model")
        layer = options["layer"]
        if not 0 <= layer < model.num_layers:
            raise CommandError(f"Layer {layer} is out of range: {model.name} has layers 0..{model.num_layers - 1}")
        for name in ("d_sae", "k", "tokens"):
            if options[name] < 1:
                raise CommandError(f"--{name.replace('_', '-')} must be at least 1")
        if options["k"] > options["d_sae"]:
            raise CommandError("--k must not exceed --d-sae")
        training = self.start_training(model, resolve_dataset(options["dataset"]), layer, options["d_sae"])
        try:
            run = self.train(training, options)
        except KeyboardInterrupt:
            self.fail(training, "interrupted")
            raise CommandError(f"Training {training.pk} interrupted; marked failed") from None
        except Exception as error:
            self.fail(training, f"{type(error).__name__}: {error}")
            raise CommandError(f"Training {training.pk} failed: {error}") from error
        self.complete(training, run)
        stats = training.stats
        self.stdout.write(self.style.SUCCESS(
            f"Training {training.pk} completed: {run.stats['tokens']} tokens, explained variance "
            f"{stats['explained_variance']:.3f}, L0 {stats['l0']:.1f}, dead {stats['dead_fraction']:.1%}; "
            f"checkpoint {training.checkpoint_path}"
        ))

    def start_training(self, model, dataset, layer, d_sae) -> Training:
        from steering_app.engine.train import hook_name_for

        return Training.objects.create(
            model=model, dataset=dataset, encoder_type=Training.EncoderType.TOPK, hook_layer=layer,
            hook_name=hook_name_for(layer), d_in=model.hidden_size, d_sae=d_sae, checkpoint_path="",
            status=Training.Status.RUNNING,
        )

    def train(self, training: Training, options):
        from steering_app.engine.loader import data_dir, load_model
        from steering_app.engine.train import TrainConfig, train_from_texts

        lm = load_model(training.model.source)
        out = Path(options["out"] or data_dir() / "saes" / f"{training.model.name}-L{training.hook_layer}-{training.pk}")
        training.checkpoint_path = str(out.resolve())
        training.save(update_fields=["checkpoint_path"])
        config = TrainConfig(d_sae=options["d_sae"], k=options["k"], epochs=options["epochs"], seed=options["seed"])
        return train_from_texts(
            lm.model, lm.tokenizer, dataset_texts(training.dataset, lm), training.hook_layer, out,
            tokens=options["tokens"], config=config, model_name=training.model.name, dataset=training.dataset.name,
        )

    @transaction.atomic
    def complete(self, training: Training, run) -> None:
        training.stats = {key: run.stats[key] for key in ("explained_variance", "l0", "dead_fraction")}
        training.status = Training.Status.COMPLETED
        training.completed_at = timezone.now()
        training.save(update_fields=["stats", "status", "completed_at"])
        Feature.objects.bulk_create(
            (Feature.from_description(training, entry["index"], entry) for entry in run.features), batch_size=2000
        )
        Dataset.objects.filter(pk=training.dataset_id, num_tokens__lt=run.stats["tokens"]).update(
            num_tokens=run.stats["tokens"]
        )

    def fail(self, training: Training, reason: str) -> None:
        training.status = Training.Status.FAILED
        training.error = reason
        training.completed_at = timezone.now()
        training.save(update_fields=["status", "error", "completed_at"])
