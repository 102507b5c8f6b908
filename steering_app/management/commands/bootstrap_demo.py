import json
import os
import secrets
from datetime import timedelta
from pathlib import Path

from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError
from django.db import transaction
from django.utils import timezone

from steering_app import vector_jobs
from steering_app.engine.demo import (
    DEMO_CHECKPOINT,
    DEMO_DATASET,
    DEMO_DATASET_DESCRIPTION,
    DEMO_FEATURES,
    DEMO_MODEL,
    DEMO_MODEL_NAME,
    DEMO_VECTOR_SPACE,
)
from steering_app.models import Dataset, LanguageModel, PromptSet, Training

DEMO_USER = "demo"
DATA = Path(__file__).resolve().parents[2] / "data"
DEFAULT_PROMPTS = DATA / "prompts" / "everyday.txt"


def registered(model: LanguageModel, checkpoint: str) -> Training | None:
    """The model's completed training whose checkpoint is that directory, if one was registered."""
    return Training.objects.filter(
        model=model, checkpoint_path=checkpoint, status=Training.Status.COMPLETED
    ).first()


class Command(BaseCommand):
    help = (
        "Make the demo ready to steer: the SmolLM2 model, its layer-10 SAE with labelled features, the planet and "
        "cake vector space, the default prompt set, user demo."
    )

    def handle(self, **options):
        if not (DEMO_CHECKPOINT / "cfg.json").is_file():
            raise CommandError(f"The demo SAE is missing from {DEMO_CHECKPOINT}")
        model = self.ensure_model()
        self.ensure_training(model)
        self.ensure_vector_space(model)
        self.ensure_dataset()
        self.ensure_prompt_set()
        self.ensure_user()

    def ensure_model(self) -> LanguageModel:
        model = LanguageModel.objects.filter(name=DEMO_MODEL_NAME, status=LanguageModel.Status.READY).first()
        if model is None:
            call_command("register_model", DEMO_MODEL_NAME, DEMO_MODEL, stdout=self.stdout)
            model = LanguageModel.objects.get(name=DEMO_MODEL_NAME)
        return model

    def ensure_training(self, model: LanguageModel) -> None:
        checkpoint = str(DEMO_CHECKPOINT.resolve())
        if registered(model, checkpoint) is not None:
            self.stdout.write("Demo training already imported.")
            return
        call_command(
            "import_sae",
            "--model",
            model.name,
            "--path",
            checkpoint,
            "--labels",
            str(DEMO_FEATURES),
            "--dataset",
            DEMO_DATASET,
            stdout=self.stdout,
        )

    def ensure_vector_space(self, model: LanguageModel) -> None:
        """The shipped vector space (planet and cake) beside the demo SAE, registered from its checkpoint without
        running the model. Dated just before the demo SAE: the newest completed training is the panel's default,
        and the demo opens on the SAE."""
        from steering_app.engine.vectors import load_concepts

        checkpoint = str(DEMO_VECTOR_SPACE.resolve())
        if registered(model, checkpoint) is not None:
            self.stdout.write("Demo vector space already registered.")
            return
        concepts, reading_layer = load_concepts(checkpoint)
        sae = registered(model, str(DEMO_CHECKPOINT.resolve()))
        created = (sae.created_at if sae else timezone.now()) - timedelta(seconds=1)
        entries = [vector_jobs.stats_entry(index, concept) for index, concept in enumerate(concepts)]
        with transaction.atomic():
            space = Training(
                model=model,
                encoder_type=Training.EncoderType.VECTORS,
                d_in=model.hidden_size,
                status=Training.Status.COMPLETED,
                created_at=created,
                completed_at=created,
            )
            fields = vector_jobs.space_fields(space, concepts, reading_layer, Path(checkpoint), entries)
            for name, value in fields.items():
                setattr(space, name, value)
            space.save()
            for index, concept in enumerate(concepts):
                vector_jobs.concept_feature(space, index, concept).save()
        self.stdout.write(f"Demo vector space registered: {space.label} (training {space.pk}).")

    def ensure_dataset(self) -> None:
        """The demo corpus's token count (from the SAE's cfg) and description; databases bootstrapped before
        import_sae recorded the count showed 0 tokens in admin."""
        metadata = json.loads((DEMO_CHECKPOINT / "cfg.json").read_text()).get("metadata", {})
        dataset = Dataset.objects.filter(name=DEMO_DATASET).first()
        if dataset is None:
            return
        Dataset.record_tokens(dataset.pk, metadata.get("tokens"))
        Dataset.objects.filter(pk=dataset.pk, description="").update(description=DEMO_DATASET_DESCRIPTION)

    def ensure_prompt_set(self) -> None:
        """The prompt set experiments start from: everyday instructions written for SteerLab."""
        prompts = [line.strip() for line in DEFAULT_PROMPTS.read_text().splitlines() if line.strip()]
        _set, created = PromptSet.objects.get_or_create(
            name=PromptSet.DEFAULT_NAME,
            defaults={
                "prompts": prompts,
                "description": "Everyday requests (cooking, travel, work, health, stories): the default set of "
                "an experiment, written for this project.",
            },
        )
        if created:
            self.stdout.write(f"Prompt set '{PromptSet.DEFAULT_NAME}' created ({len(prompts)} prompts).")

    def ensure_user(self) -> None:
        configured = os.environ.get("DEMO_PASSWORD")
        user = get_user_model().objects.filter(username=DEMO_USER).first()
        if user is not None and not configured:
            self.stdout.write(f"User {DEMO_USER} exists (set DEMO_PASSWORD to reset its password).")
            return
        password = configured or secrets.token_urlsafe(9)
        if user is None:
            get_user_model().objects.create_user(DEMO_USER, password=password)
        else:
            user.set_password(password)
            user.save(update_fields=["password"])
        shown = "the one in DEMO_PASSWORD" if configured else password
        # The address is the server's to say (make serve prints the one it listens on): not known here.
        self.stdout.write(self.style.SUCCESS(f"Log in as {DEMO_USER}, password {shown}"))
