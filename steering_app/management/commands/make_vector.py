from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from steering_app import json_lines, vector_jobs
from steering_app.errors import InvalidInput, SteeringError
from steering_app.models import LanguageModel, VectorJob


def read_pairs(path: str) -> list[list[str]]:
    """[[positive, negative], ...] from a .jsonl file of {"positive": ..., "negative": ...} lines."""
    try:
        return vector_jobs.pairs_from_jsonl(_text(path), "pairs")
    except InvalidInput as error:
        raise CommandError(f"{path}: {error.message}") from None


def read_examples(path: str) -> list[str]:
    """One example a line: plain text, or in a .jsonl file a JSON string or {"text": ...} a line."""
    text = _text(path)
    if not path.endswith(".jsonl"):
        return [line.strip() for line in text.splitlines() if line.strip()]
    examples = []
    try:
        for number, item in json_lines.read(text, "examples"):
            example = item.get("text") if isinstance(item, dict) else item
            if not isinstance(example, str):
                raise CommandError(f'{path}: Line {number} must be a JSON string or {{"text": "..."}}.')
            examples.append(example)
    except InvalidInput as error:
        raise CommandError(f"{path}: {error.message}") from None
    return examples


def _text(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise CommandError(f"Cannot read {path}: {error}") from None


def separation_lines(report: dict) -> list[str]:
    """The separation report as a few lines: the held-out accuracy of every layer, the best one marked."""
    separation = report.get("separation") or []
    cells = [
        f"{layer}:{accuracy:.2f}{'*' if layer == report.get('best_layer') else ''}"
        for layer, accuracy in enumerate(separation)
    ]
    return [" ".join(cells[start : start + 10]) for start in range(0, len(cells), 10)]


class Command(BaseCommand):
    help = (
        "Make a steering vector (a concept of a vector space) from contrastive examples: the mean difference "
        "(diffmean) or the first principal component of paired differences (pca), at every layer. Starts a new "
        "vector space on --model, or adds to --training. Runs the job here, printing its progress and the "
        "separation report (held-out accuracy of a threshold on the projection, per layer); bad input is refused "
        "with nothing created, and a failed job changes nothing but its own record."
    )

    def add_arguments(self, parser):
        space = parser.add_mutually_exclusive_group(required=True)
        space.add_argument("--model", help="name of a registered model: starts a new vector space")
        space.add_argument("--training", type=int, help="id of a vector space to add the concept to")
        parser.add_argument("--name", required=True, help="the concept's name")
        parser.add_argument("--description", default="")
        parser.add_argument("--method", default="diffmean", help="diffmean (default) or pca (needs --pairs)")
        parser.add_argument(
            "--tokens", default="all", help="all tokens (default) or the last one of each example"
        )
        parser.add_argument("--pairs", help='.jsonl of {"positive": ..., "negative": ...} lines')
        parser.add_argument("--positives", help="examples with the concept: one a line (.txt or .jsonl)")
        parser.add_argument("--negatives", help="examples without it: one a line (.txt or .jsonl)")

    def handle(self, **options):
        examples = self.examples(options)
        model_id = None
        if options["model"] is not None:
            model = LanguageModel.objects.filter(name=options["model"]).first()
            if model is None:
                raise CommandError(f"No model named '{options['model']}' (register_model registers one)")
            model_id = model.pk
        try:
            job = vector_jobs.store(
                None,
                running=True,
                model_id=model_id,
                training_id=options["training"],
                name=options["name"],
                description=options["description"],
                method=options["method"],
                tokens=options["tokens"],
                **examples,
            )
        except SteeringError as error:
            raise CommandError(f"{error.field}: {error.message}" if error.field else error.message) from None
        self.stdout.write(
            f"Vector job {job.pk}: '{job.name}' ({job.method}, tokens {job.tokens}) from {len(job.positives)} "
            f"positive and {len(job.negatives)} negative examples, vector space {job.training_id}"
        )
        try:
            job = vector_jobs.execute(job, on_progress=self.progress)
        except KeyboardInterrupt:
            vector_jobs.fail(job, "interrupted")
            raise CommandError(f"Vector job {job.pk} interrupted; marked failed") from None
        if job.status != VectorJob.Status.COMPLETED:
            raise CommandError(f"Vector job {job.pk} failed: {job.error}")
        report = job.report
        self.stdout.write("Held-out accuracy per layer (* best):")
        for line in separation_lines(report):
            self.stdout.write("  " + line)
        self.stdout.write(
            self.style.SUCCESS(
                f"Vector job {job.pk} completed: concept #{report['feature_index']} '{job.name}' of vector space "
                f"{job.training_id}; best layer {report['best_layer']}, held-out accuracy {report['accuracy']:.3f}"
            )
        )

    def examples(self, options) -> dict:
        if options["pairs"] is not None:
            if options["positives"] is not None or options["negatives"] is not None:
                raise CommandError("Give --pairs, or --positives and --negatives, not both")
            return {"pairs": read_pairs(options["pairs"])}
        if options["positives"] is None or options["negatives"] is None:
            raise CommandError("Give --pairs FILE.jsonl, or both --positives FILE and --negatives FILE")
        return {
            "positives": read_examples(options["positives"]),
            "negatives": read_examples(options["negatives"]),
        }

    def progress(self, fraction: float) -> None:
        self.stdout.write(f"  {fraction:.0%}")
