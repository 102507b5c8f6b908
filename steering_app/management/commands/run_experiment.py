"""manage.py run_experiment: an experiment run in this process, with progress, and its results as Markdown.

It makes README's table of the demo's features (`make experiment-demo`): the held-out best strength of each
feature and its aggregate score, the mean scores at every strength, and a typical output at the best strength.
"""

import time

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from steering_app import experiment_results, experiment_stats, experiments, runs
from steering_app.engine.demo import DEMO_LAYER, DEMO_MODEL_NAME
from steering_app.errors import SteeringError
from steering_app.experiments import ExperimentRequest
from steering_app.management.commands.bootstrap_demo import DEMO_USER
from steering_app.models import Experiment, Feature, PromptSet, Training


class Command(BaseCommand):
    help = (
        "Run an experiment in this process (one condition per feature, over the first --prompts prompts of the "
        "default prompt set) and print its held-out best strengths and scores as Markdown. The experiment is "
        "stored like any other: its page and CSV are on the site."
    )

    def add_arguments(self, parser):
        parser.add_argument("--training", type=int, help="a completed training (default: the demo's)")
        parser.add_argument(
            "--features", type=int, nargs="+", required=True, help="one condition per feature"
        )
        parser.add_argument("--coefficient", type=float, default=1.0, help="each feature's base coefficient")
        parser.add_argument("--strengths", type=float, nargs="+", default=list(experiments.DEFAULT_STRENGTHS))
        parser.add_argument("--prompts", type=int, default=16, help="how many prompts of the default set")
        parser.add_argument("--seeds", type=int, default=1)
        parser.add_argument("--max-tokens", type=int, default=32)
        parser.add_argument("--temperature", type=float, default=0.7)
        parser.add_argument("--layers", type=int, nargs="+", help="intervention layers (default: the SAE's)")
        parser.add_argument("--chat", action="store_true", help="wrap each prompt in the chat template")
        parser.add_argument("--owner", default=DEMO_USER, help="the member who owns it (default: demo)")

    def handle(self, **options):
        training = self.training(options["training"])
        prompt_set = PromptSet.objects.filter(name=PromptSet.DEFAULT_NAME).first()
        if prompt_set is None:
            raise CommandError(
                f"No prompt set '{PromptSet.DEFAULT_NAME}': run `manage.py bootstrap_demo` first."
            )
        owner = get_user_model().objects.filter(username=options["owner"]).first()
        if owner is None:
            raise CommandError(f"No user {options['owner']!r}.")
        request = ExperimentRequest(
            training_id=training.pk,
            name=f"features {', '.join(map(str, options['features']))}",
            conditions=[
                {"features": [{"feature_id": index, "coefficient": options["coefficient"]}]}
                for index in options["features"]
            ],
            intervention_layers=options["layers"] or [training.hook_layer],
            strengths=options["strengths"],
            prompts=prompt_set.prompts[: options["prompts"]],
            seeds=options["seeds"],
            max_tokens=options["max_tokens"],
            temperature=options["temperature"],
            chat=options["chat"],
        )
        try:
            experiment = experiments.create(owner, request, wake=False)
        except SteeringError as error:
            raise CommandError(f"{error.field}: {error.message}") from error
        self.run(experiment)
        self.print_report(experiment)

    def training(self, pk: int | None) -> Training:
        trainings = Training.objects.filter(status=Training.Status.COMPLETED)
        if pk is not None:
            training = trainings.filter(pk=pk).first()
        else:
            training = trainings.filter(model__name=DEMO_MODEL_NAME, hook_layer=DEMO_LAYER).first()
        if training is None:
            raise CommandError("No such completed training (the demo's: run `manage.py bootstrap_demo`).")
        return training

    def run(self, experiment: Experiment) -> None:
        """Process the queue here, one progress line per cell."""
        started = time.monotonic()

        def emit_for(_run_id):
            def emit(event, _payload):
                if event in ("completed", "failed", "cancelled"):
                    experiment.refresh_from_db()
                    done = experiment_results.progress(experiment)
                    self.stdout.write(
                        f"  {done['done']}/{done['total']} cells, {time.monotonic() - started:.0f} s",
                        ending="\r",
                    )

            return emit

        self.stdout.write(f"Experiment {experiment.pk}: {experiment.total_cells} cells on this process")
        runs.process_queued(emit_for)
        experiment_results.refresh(experiment)
        self.stdout.write(f"\n{experiment.status} in {time.monotonic() - started:.0f} s")

    def print_report(self, experiment: Experiment) -> None:
        report = experiments.report(experiment)
        rows = experiments.result_rows(experiment)
        labels = dict(Feature.objects.filter(training=experiment.training).values_list("index", "label"))
        strengths = experiment.strengths
        means = {(item["condition"], item["strength"]): item["score"]["mean"] for item in report["summary"]}
        header = " | ".join(f"×{strength:g}" for strength in strengths)
        self.stdout.write(f"\n| feature | best strength (held out) | aggregate [95 % CI] | {header} |")
        self.stdout.write("| --- | --- | --- | " + " | ".join("---" for _ in strengths) + " |")
        for best in sorted(report["best"], key=lambda item: item["condition"]):
            condition = best["condition"]
            index = experiment.conditions[condition]["features"][0]["feature_id"]
            score = best["score"]
            cells = " | ".join(f"{means[(condition, strength)]:.2f}" for strength in strengths)
            self.stdout.write(
                f"| #{index} {labels.get(index, '')} | ×{best['strength']:g} | "
                f"{score['mean']:.2f} [{score['low']:.2f}, {score['high']:.2f}] | {cells} |"
            )
        held_out = {row["prompt"] for row in rows} - experiment_stats.selection_prompts(
            row["prompt"] for row in rows
        )
        self.stdout.write("\nA typical held-out output at each feature's best strength (the median score):\n")
        for best in sorted(report["best"], key=lambda item: item["condition"]):
            chosen = [
                row
                for row in rows
                if row["condition"] == best["condition"]
                and row["strength"] == best["strength"]
                and row["prompt"] in held_out
            ]
            median = sorted(chosen, key=lambda row: row["score"])[len(chosen) // 2]
            index = experiment.conditions[best["condition"]]["features"][0]["feature_id"]
            text = " ".join(median["text"].split())
            self.stdout.write(
                f"- #{index} at ×{best['strength']:g} (score {median['score']:.2f}), "
                f'"{median["prompt"]}": {text}'
            )
