from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from steering_app import services
from steering_app.errors import SteeringError
from steering_app.models import Training


def parse_feature(value: str) -> dict:
    """ID:COEF -> {"feature_id": ID, "coefficient": COEF}; the ranges are checked as a run's are."""
    index, sep, coefficient = value.partition(":")
    try:
        if not sep:
            raise ValueError
        return {"feature_id": int(index), "coefficient": float(coefficient)}
    except ValueError:
        raise CommandError(f"--feature {value!r} must be ID:COEFFICIENT, e.g. 1681:1.5") from None


class Command(BaseCommand):
    help = (
        "Write the steering of a training's features as a llama.cpp control vector (GGUF): for every chosen layer, "
        "the sum of c x a_i x direction_i, what llama.cpp adds to that block's output. Apply it with "
        "`llama-cli --control-vector-scaled FILE 1.0`. Only additive steering can be exported."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--training", type=int, required=True, help="id of a completed training or vector space"
        )
        parser.add_argument(
            "--feature",
            action="append",
            required=True,
            metavar="ID:COEF",
            help="a feature and its coefficient",
        )
        parser.add_argument("--layers", type=int, nargs="+", required=True, help="the layers to steer")
        parser.add_argument(
            "--method", default="additive", help="additive (multiplicative cannot be exported)"
        )
        parser.add_argument("--output", required=True, help="the .gguf file to write")

    def handle(self, **options):
        try:
            training = Training.objects.get_completed(options["training"])
        except SteeringError as error:
            raise CommandError(error.message) from None
        features = [parse_feature(value) for value in options["feature"]]
        output = Path(options["output"])
        if not output.parent.is_dir():
            raise CommandError(f"{output.parent} is not a directory")
        try:
            content = services.control_vector_gguf(training, features, options["layers"], options["method"])
        except SteeringError as error:
            raise CommandError(f"{error.field}: {error.message}" if error.field else error.message) from None
        output.write_bytes(content)
        layers = " ".join(str(layer) for layer in sorted(set(options["layers"])))
        self.stdout.write(
            self.style.SUCCESS(
                f"Wrote {output}: a control vector for layers {layers} of {training.model.name}. Apply it with: "
                f"llama-cli -m <{training.model.name}.gguf> --control-vector-scaled {output} 1.0"
            )
        )
