import json
import time
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError
from django.db import transaction
from django.utils import timezone

from steering_app import dataset_roots
from steering_app.engine import demo
from steering_app.errors import InvalidInput
from steering_app.models import Dataset, Feature, LanguageModel, Training

DEMO_ALIAS = "demo"  # --dataset demo: the built-in demo corpus
TRAIN_TOKENS = 300_000
DEMO_ONLY = ("work", "resample", "prompts", "offline_tokens")


def resolve_dataset(name_or_path: str) -> Dataset:
    """A registered dataset by name, the built-in demo corpus, or a text file / directory under the dataset
    roots. One not registered yet comes back unsaved: the job records it with its results (saved_dataset),
    so a job that fails leaves no dataset row behind."""
    dataset = Dataset.objects.filter(name=name_or_path).first()
    if dataset is not None:
        if dataset.source != DEMO_ALIAS:
            corpus_files(dataset.source)  # a registered dataset's path is refused before the job starts too
        return dataset
    if name_or_path == DEMO_ALIAS:
        return Dataset(name=DEMO_ALIAS, source=DEMO_ALIAS, description=demo.DEMO_DATASET_DESCRIPTION)
    path = Path(name_or_path).expanduser()
    if not path.exists():
        raise CommandError(
            f"Unknown dataset {name_or_path!r}: not a registered dataset, 'demo', or a text path"
        )
    corpus_files(str(path))  # refused before the job starts, naming the path as given
    path = path.resolve()
    kind = "directory of text files" if path.is_dir() else "text file"
    return Dataset.objects.filter(name=str(path)).first() or Dataset(
        name=str(path), source=str(path), description=kind
    )


def saved_dataset(dataset: Dataset) -> Dataset:
    """The dataset's row: its own, or the row of its name, made now (or by a job that completed meanwhile)."""
    if dataset.pk is not None:
        return dataset
    row, _ = Dataset.objects.get_or_create(
        name=dataset.name, defaults={"source": dataset.source, "description": dataset.description}
    )
    return row


def corpus_files(source: str) -> list[Path]:
    try:
        return dataset_roots.corpus_files(source)
    except InvalidInput as error:
        raise CommandError(error.message) from None


def demo_corpus(lm, work: Path, seed: int, **options) -> Path:
    """A demo corpus file in work, sampled from lm the first time (options: build_demo_corpus's)."""
    from steering_app.engine.training import corpus

    path = demo.demo_corpus_path(work, seed)
    if not path.is_file():
        corpus.build_demo_corpus(lm.model, lm.tokenizer, path, seed=seed, **options)
    return path


def dataset_texts(dataset: Dataset, lm):
    """The dataset's documents: texts, or for the demo corpus its shipped token ids (nothing is sampled)."""
    from steering_app.engine.training import corpus

    if dataset.source == DEMO_ALIAS:
        return corpus.token_documents(corpus.read_token_ids(demo.DEMO_IDS), lm.tokenizer.eos_token_id)
    # Checked again as the job starts reading, and the checked targets are read: the links of a folder may
    # have changed since the job was asked for.
    return corpus.read_texts(corpus_files(dataset.source))


class Command(BaseCommand):
    help = (
        "Train a TopK SAE on one layer's residual stream (output of block L), write a SAELens-layout checkpoint, "
        "describe every feature, and record a completed Training. A failed or interrupted run is marked failed. "
        "With --demo: rebuild the demo SAE shipped in steering_app/demo from its recipe (files only)."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--demo",
            action="store_true",
            help=f"rebuild the demo SAE ({demo.DEMO_MODEL_NAME}, layer {demo.DEMO_LAYER}) into --out; records "
            "nothing in the database (bootstrap_demo imports it); the defaults below become the demo's recipe",
        )
        parser.add_argument("--model", help="name of a registered language model")
        parser.add_argument("--layer", type=int, help="decoder block whose output is modelled")
        parser.add_argument(
            "--dataset",
            help="dataset name, 'demo', or a text file or a directory under the dataset roots "
            "(<data dir>/datasets, STEERLAB_DATASET_DIRS)",
        )
        # The training's sizes: TrainConfig's defaults, or with --demo the demo's recipe.
        for flag, kind, what, demo_value in (
            ("--d-sae", int, "latents", demo.DEMO_D_SAE),
            ("--k", int, "active latents a token", demo.DEMO_K),
            ("--epochs", float, "passes over the activations", demo.DEMO_EPOCHS),
            ("--seed", int, "random seed", demo.DEMO_SEED),
        ):
            parser.add_argument(
                flag, type=kind, help=f"{what} (default: TrainConfig's; --demo: {demo_value})"
            )
        parser.add_argument(
            "--tokens",
            type=int,
            help=f"activations to collect (default {TRAIN_TOKENS}; --demo: {demo.DEMO_TOKENS})",
        )
        parser.add_argument("--device", help="where the model runs (default: the loader's choice)")
        parser.add_argument(
            "--out",
            help="checkpoint directory (default: <data dir>/saes/<model>-L<layer>-<id>); with --demo, the directory "
            f"that receives sae/ and features.json (default {demo.DEMO_DIR})",
        )
        parser.add_argument(
            "--work", help="--demo: where the corpus and activation cache go (default: <data dir>/demo)"
        )
        parser.add_argument(
            "--resample",
            action="store_true",
            help=f"--demo: sample a new demo corpus from the model (its text depends on the CPU) and write its "
            f"token ids into --out, instead of reading the shipped ones ({demo.DEMO_IDS.name})",
        )
        parser.add_argument(
            "--prompts", type=int, help=f"--resample: sampled answers in the corpus ({demo.DEMO_PROMPTS})"
        )
        parser.add_argument(
            "--offline-tokens",
            type=int,
            help=f"--resample: stdlib prose tokens in the corpus ({demo.DEMO_OFFLINE_TOKENS})",
        )

    def handle(self, **options):
        options = self.with_defaults(options)
        if options["demo"]:
            self.check_sizes(options)
            self.rebuild_demo(options)
            return
        model = LanguageModel.objects.filter(name=options["model"]).first()
        if model is None:
            raise CommandError(f"Unknown model {options['model']!r}: register it first with register_model")
        layer = options["layer"]
        if not 0 <= layer < model.num_layers:
            raise CommandError(
                f"Layer {layer} is out of range: {model.name} has layers 0..{model.num_layers - 1}"
            )
        self.check_sizes(options)
        dataset = resolve_dataset(options["dataset"])
        training = self.start_training(model, dataset, layer, options["d_sae"])
        try:
            run = self.train(training, dataset, options)
        except KeyboardInterrupt:
            self.fail(training, "interrupted")
            raise CommandError(f"Training {training.pk} interrupted; marked failed") from None
        except Exception as error:
            self.fail(training, f"{type(error).__name__}: {error}")
            raise CommandError(f"Training {training.pk} failed: {error}") from error
        self.complete(training, dataset, run)
        stats = training.stats
        self.stdout.write(
            self.style.SUCCESS(
                f"Training {training.pk} completed: {run.stats['tokens']} tokens, explained variance "
                f"{stats['explained_variance']:.3f}, L0 {stats['l0']:.1f}, dead {stats['dead_fraction']:.1%}; "
                f"checkpoint {training.checkpoint_path}"
            )
        )

    def with_defaults(self, options) -> dict:
        """options with each unset value filled in: the demo's recipe with --demo, TrainConfig's otherwise."""
        from steering_app.engine.training import TrainConfig

        given = [f"--{name}" for name in ("model", "layer", "dataset") if options[name] is not None]
        if options["demo"]:
            if given:
                raise CommandError(
                    f"--demo trains the demo's own model, layer and corpus: drop {', '.join(given)}"
                )
            defaults = {
                "d_sae": demo.DEMO_D_SAE,
                "k": demo.DEMO_K,
                "tokens": demo.DEMO_TOKENS,
                "epochs": demo.DEMO_EPOCHS,
                "seed": demo.DEMO_SEED,
            }
        else:
            if len(given) < 3:
                raise CommandError("--model, --layer and --dataset are required (or --demo)")
            demo_only = [
                f"--{name.replace('_', '-')}" for name in DEMO_ONLY if options[name] not in (None, False)
            ]
            if demo_only:
                raise CommandError(f"{', '.join(demo_only)} only go with --demo")
            config = TrainConfig()
            defaults = {
                "d_sae": config.d_sae,
                "k": config.k,
                "tokens": TRAIN_TOKENS,
                "epochs": config.epochs,
                "seed": config.seed,
            }
        return {**options, **{name: value for name, value in defaults.items() if options[name] is None}}

    def check_sizes(self, options) -> None:
        for name in ("d_sae", "k", "tokens"):
            if options[name] < 1:
                raise CommandError(f"--{name.replace('_', '-')} must be at least 1")
        if options["k"] > options["d_sae"]:
            raise CommandError("--k must not exceed --d-sae")

    def rebuild_demo(self, options) -> None:
        """Train the demo SAE from the shipped corpus ids (or, with --resample, from a newly sampled corpus) in
        a process whose bits do not depend on the CPU, describe its features, write them into --out."""
        import hashlib

        from steering_app.engine.loader import data_dir
        from steering_app.engine.training import TrainConfig, corpus, train_demo
        from steering_app.engine.training.reproducible import run_reproducibly

        if not options["resample"] and (
            options["prompts"] is not None or options["offline_tokens"] is not None
        ):
            raise CommandError("--prompts and --offline-tokens only go with --resample")
        work = Path(options["work"] or data_dir() / demo.DEMO_WORK_DIR)
        work.mkdir(parents=True, exist_ok=True)
        out = Path(options["out"] or demo.DEMO_DIR)
        ids_path = demo.DEMO_IDS
        timings = {}
        if options["resample"]:
            from steering_app.engine.loader import load_model

            started = time.perf_counter()
            lm = load_model(demo.DEMO_MODEL, device=options["device"])
            text_path = demo_corpus(
                lm,
                work,
                options["seed"],
                sampled_prompts=options["prompts"] or demo.DEMO_PROMPTS,
                offline_tokens=options["offline_tokens"] or demo.DEMO_OFFLINE_TOKENS,
            )
            ids = corpus.corpus_token_ids(lm.tokenizer, corpus.read_text_file(text_path))
            ids_path = corpus.write_token_ids(out / demo.DEMO_IDS.name, ids)
            timings["corpus_s"] = round(time.perf_counter() - started, 1)
        digest = hashlib.sha256(ids_path.read_bytes()).hexdigest()
        config = TrainConfig(
            d_sae=options["d_sae"], k=options["k"], epochs=options["epochs"], seed=options["seed"]
        )
        run = run_reproducibly(
            train_demo,
            out,
            ids_path,
            tokens=options["tokens"],
            config=config,
            activations_cache=demo.demo_activations_path(work, digest),
            device=options["device"],
        )
        timings.update(run.timings)
        keys = ("tokens", "explained_variance", "l0", "dead_fraction", "label_coverage")
        self.stdout.write(json.dumps({key: run.stats[key] for key in keys} | {"timings": timings}, indent=1))

    def start_training(self, model, dataset, layer, d_sae) -> Training:
        from steering_app.engine.training import hook_name_for

        return Training.objects.create(
            model=model,
            # A dataset this training meets for the first time is saved and linked when it completes.
            dataset=dataset if dataset.pk is not None else None,
            encoder_type=Training.EncoderType.TOPK,
            hook_layer=layer,
            hook_name=hook_name_for(layer),
            d_in=model.hidden_size,
            d_sae=d_sae,
            checkpoint_path="",
            status=Training.Status.RUNNING,
        )

    def train(self, training: Training, dataset: Dataset, options):
        from steering_app.engine.loader import data_dir, load_model
        from steering_app.engine.training import TrainConfig, train_from_texts

        lm = load_model(training.model.source, device=options["device"])
        out = Path(
            options["out"]
            or data_dir() / "saes" / f"{training.model.name}-L{training.hook_layer}-{training.pk}"
        )
        training.checkpoint_path = str(out.resolve())
        training.save(update_fields=["checkpoint_path"])
        config = TrainConfig(
            d_sae=options["d_sae"], k=options["k"], epochs=options["epochs"], seed=options["seed"]
        )
        return train_from_texts(
            lm.model,
            lm.tokenizer,
            dataset_texts(dataset, lm),
            training.hook_layer,
            out,
            tokens=options["tokens"],
            config=config,
            model_name=training.model.name,
            dataset=dataset.name,
        )

    @transaction.atomic
    def complete(self, training: Training, dataset: Dataset, run) -> None:
        training.dataset = saved_dataset(dataset)
        training.stats = {key: run.stats[key] for key in ("explained_variance", "l0", "dead_fraction")}
        training.status = Training.Status.COMPLETED
        training.completed_at = timezone.now()
        training.save(update_fields=["dataset", "stats", "status", "completed_at"])
        Feature.objects.bulk_create(
            (Feature.from_description(training, entry["index"], entry) for entry in run.features),
            batch_size=2000,
        )
        Dataset.record_tokens(training.dataset_id, run.stats["tokens"])

    def fail(self, training: Training, reason: str) -> None:
        training.status = Training.Status.FAILED
        training.error = reason
        training.completed_at = timezone.now()
        training.save(update_fields=["status", "error", "completed_at"])
