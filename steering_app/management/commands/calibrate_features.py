import time

from django.core.management.base import BaseCommand, CommandError
from django.db import transaction
from django.utils import timezone

from steering_app.management.commands.train_sae import (
    DEMO_ALIAS,
    dataset_texts,
    resolve_dataset,
    saved_dataset,
)
from steering_app.models import Calibration, Dataset, Feature, Training

CALIBRATION_TOKENS = 100_000
PROGRESS_EVERY_S = 2.0
# Describing the features after the corpus has streamed takes the last few percent of the time.
COLLECT_SHARE = 0.95
MEASURED_FIELDS = ["max_activation", "activation_frequency", "top_tokens", "examples"]


def has_placeholder_label(feature: Feature) -> bool:
    """No label of its own: empty, or the 'feature #i' that an import without a feature table gives."""
    label = feature.label.strip()
    return not label or label == f"feature #{feature.index}"


class Command(BaseCommand):
    help = (
        "Measure every feature of a completed training on a corpus: max activation (the steering scale), "
        "activation frequency (0: dead), top tokens, the 5 strongest snippets, and a label from the top tokens "
        "where the feature has none. Records a Calibration that ends completed or failed; features, and a "
        "dataset met for the first time, are written all at once at the end, so a failed or interrupted "
        "calibration changes none and registers no dataset."
    )

    def add_arguments(self, parser):
        parser.add_argument("--training", type=int, required=True, help="id of a completed training")
        parser.add_argument(
            "--dataset",
            default=DEMO_ALIAS,
            help="dataset name, 'demo' (the built-in demo corpus, the default), or a text file or a directory "
            "under the dataset roots (<data dir>/datasets, STEERLAB_DATASET_DIRS)",
        )
        parser.add_argument(
            "--tokens",
            type=int,
            default=CALIBRATION_TOKENS,
            help=f"non-special tokens to stream (default {CALIBRATION_TOKENS})",
        )
        parser.add_argument("--device", help="where the model runs (default: the loader's choice)")

    def handle(self, **options):
        training = Training.objects.select_related("model").filter(pk=options["training"]).first()
        if training is None:
            raise CommandError(f"Training {options['training']} does not exist")
        if not training.is_completed:
            raise CommandError(
                f"Training {training.pk} is {training.status}: only a completed training can be calibrated"
            )
        if options["tokens"] < 1:
            raise CommandError("--tokens must be at least 1")
        calibration = Calibration.objects.create(
            training=training,
            tokens_target=options["tokens"],
            status=Calibration.Status.RUNNING,
            started_at=timezone.now(),
        )
        try:
            dataset, result = self.calibrate(calibration, options)
            self.complete(calibration, dataset, result)
        except KeyboardInterrupt:
            self.fail(calibration, "interrupted")
            raise CommandError(f"Calibration {calibration.pk} interrupted; marked failed") from None
        except CommandError as error:
            self.fail(calibration, str(error))
            raise CommandError(f"Calibration {calibration.pk} failed: {error}") from error
        except Exception as error:
            self.fail(calibration, f"{type(error).__name__}: {error}")
            raise CommandError(f"Calibration {calibration.pk} failed: {error}") from error
        dead = sum(1 for entry in result.features if entry["activation_frequency"] == 0)
        self.stdout.write(
            self.style.SUCCESS(
                f"Calibration {calibration.pk} completed: {result.tokens} tokens, {len(result.features)} features "
                f"({dead} dead), collect {result.timings['collect_s']} s, describe {result.timings['describe_s']} s"
            )
        )

    def calibrate(self, calibration: Calibration, options):
        import torch

        from steering_app.engine.analysis.calibrate import calibrate_features
        from steering_app.engine.loader import load_model
        from steering_app.engine.saes.sae import load_sae

        training = calibration.training
        dataset = resolve_dataset(options["dataset"])
        if dataset.pk is not None:  # registered already: admin shows it while the calibration runs
            calibration.dataset = dataset
            calibration.save(update_fields=["dataset"])
        # Float32 whatever the checkpoint's dtype: max activations are the steering scales.
        sae = load_sae(training.checkpoint_path, dtype=torch.float32)
        if (sae.d_in, sae.d_sae) != (training.d_in, training.d_sae):
            raise CommandError(
                f"The checkpoint at {training.checkpoint_path} has d_in {sae.d_in}, d_sae {sae.d_sae}; "
                f"training {training.pk} has d_in {training.d_in}, d_sae {training.d_sae}"
            )
        lm = load_model(training.model.source, device=options["device"])
        sae.to(lm.device)
        self.stdout.write(
            f"Calibration {calibration.pk}: training {training.pk} ({training.model.name}, layer "
            f"{training.hook_layer}) on {dataset.name}, {calibration.tokens_target} tokens, {lm.device}"
        )
        return dataset, calibrate_features(
            lm.model,
            lm.tokenizer,
            sae,
            dataset_texts(dataset, lm),
            training.hook_layer,
            tokens=calibration.tokens_target,
            on_progress=self.progress_recorder(calibration),
        )

    def progress_recorder(self, calibration: Calibration):
        """on_progress for the engine: tokens_seen and progress on the row, and a line, every few seconds."""
        last = -float("inf")

        def record(tokens_seen: int) -> None:
            nonlocal last
            now = time.monotonic()
            if now - last < PROGRESS_EVERY_S and tokens_seen < calibration.tokens_target:
                return
            last = now
            self.record_progress(calibration, tokens_seen)

        return record

    def record_progress(self, calibration: Calibration, tokens_seen: int) -> None:
        fraction = min(1.0, tokens_seen / calibration.tokens_target)
        Calibration.objects.filter(pk=calibration.pk).update(
            tokens_seen=tokens_seen, progress=round(COLLECT_SHARE * fraction, 4)
        )
        self.stdout.write(
            f"Calibration {calibration.pk}: {tokens_seen} / {calibration.tokens_target} tokens seen ({fraction:.0%})"
        )

    @transaction.atomic
    def complete(self, calibration: Calibration, dataset: Dataset, result) -> None:
        training = calibration.training
        existing = {feature.index: feature for feature in training.features.all()}
        changed, created = [], []
        for entry in result.features:
            feature = existing.get(entry["index"])
            if feature is None:
                created.append(Feature.from_description(training, entry["index"], entry))
                continue
            for name in MEASURED_FIELDS:
                setattr(feature, name, entry[name])
            if has_placeholder_label(feature) and entry["label"]:
                feature.label = entry["label"]
                feature.description = entry["description"]
            elif not feature.description:
                feature.description = entry["description"]
            changed.append(feature)
        Feature.objects.bulk_update(changed, [*MEASURED_FIELDS, "label", "description"], batch_size=500)
        Feature.objects.bulk_create(created, batch_size=500)
        calibration.dataset = saved_dataset(dataset)
        calibration.status = Calibration.Status.COMPLETED
        calibration.tokens_seen = result.tokens
        calibration.progress = 1.0
        calibration.finished_at = timezone.now()
        calibration.save(update_fields=["dataset", "status", "tokens_seen", "progress", "finished_at"])
        Dataset.record_tokens(calibration.dataset_id, result.tokens)

    def fail(self, calibration: Calibration, reason: str) -> None:
        calibration.status = Calibration.Status.FAILED
        calibration.error = reason
        calibration.finished_at = timezone.now()
        calibration.save(update_fields=["status", "error", "finished_at"])
