"""The demo feature space steers for real: amplified features put their own words into the text.

Three demo features whose labels name a clear word or topic are each amplified (additive, c = 4, layer 10)
over five seeds on the real SmolLM2; the steered continuations must contain the feature's top tokens more
often than the unsteered ones, and the feature must fire more on them.
"""

import re

import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.db import transaction

from steering_app import runs, services
from steering_app.models import Feature, SteeringRun, Training
from steering_app.runs import RunRequest
from steering_app.steering_settings import SteeringSettings

pytestmark = [pytest.mark.django_db, pytest.mark.slow]

# Labels name a topic: "planet" (Mars, earth, flora), cake / bread / honey / mug, "play" (playing, plays).
SHOWCASE_FEATURES = [1681, 1083, 1039]
PROMPT = "Tell me about your day."
SEEDS = range(5)
MAX_TOKENS = 20


def word_hits(text: str, words: list[str]) -> int:
    lowered = text.lower()
    return sum(len(re.findall(rf"\b{re.escape(word.lower())}", lowered)) for word in words)


@pytest.fixture(scope="module")
def demo_outcomes(django_db_setup, django_db_blocker) -> dict:
    """{feature index: (its label, its top words, [its run's Outcome at each seed])}, on the demo as
    bootstrap_demo imports it. Each seed's three runs (one per feature) are created as a member's are and
    share one batch of the worker's engine, as queued runs do (services.EngineBatch: each run's rows get the
    numbers they get alone), so the model steps 5 x 30 times instead of 15 x 30. Computed once for the
    three tests, in a transaction rolled back at the end."""
    with django_db_blocker.unblock(), transaction.atomic():
        owner = get_user_model().objects.create_user(username="owner", password="pw-owner")
        call_command("bootstrap_demo")
        training = Training.objects.exclude(encoder_type="vectors").get()
        features = {index: Feature.objects.get(training=training, index=index) for index in SHOWCASE_FEATURES}
        outcomes = {index: [] for index in SHOWCASE_FEATURES}
        for seed in SEEDS:
            created = {
                index: runs.create(
                    owner,
                    RunRequest(
                        training.pk,
                        PROMPT,
                        SteeringSettings(
                            features=[{"feature_id": index, "coefficient": 4.0}],
                            layers=[10],
                            temperature=0.8,
                            max_tokens=MAX_TOKENS,
                        ),
                        seed=seed,
                        chat=True,
                    ),
                )
                for index in SHOWCASE_FEATURES
            }
            batch = services.batch_for(created[SHOWCASE_FEATURES[0]])
            for run in created.values():
                assert batch.admit(run, lambda unsteered, variants: None, lambda: False)
            ended = {}
            while batch.active:
                for run, result in batch.step():
                    ended[run.pk] = result
            for index, run in created.items():
                if isinstance(ended[run.pk], Exception):
                    raise ended[run.pk]
                outcomes[index].append(ended[run.pk])
            # Out of the member's queue, as a worker leaves them: the next seed's runs fit its share.
            SteeringRun.objects.filter(pk__in=[run.pk for run in created.values()]).update(
                status=SteeringRun.Status.COMPLETED
            )
        transaction.set_rollback(True)
    return {
        index: (
            feature.label,
            [token.strip() for token in feature.top_tokens[:5] if token.strip().isalpha()],
            outcomes[index],
        )
        for index, feature in features.items()
    }


@pytest.mark.parametrize("index", SHOWCASE_FEATURES)
def test_it_puts_an_amplified_features_words_into_the_steered_text(demo_outcomes, index):
    label, words, outcomes = demo_outcomes[index]
    print(f"#{index} {label}: {words}")
    assert words, f"feature {index} ({label}) has no word among its top tokens"
    assert len(outcomes) == len(SEEDS)
    unsteered_hits = steered_hits = 0
    unsteered_activation = steered_activation = 0.0
    for outcome in outcomes:
        unsteered_hits += word_hits(outcome.unsteered_output, words)
        steered_hits += word_hits(outcome.steered_output, words)
        (activation,) = outcome.metrics["feature_activation"]
        assert activation["feature_id"] == index
        unsteered_activation += activation["unsteered"]
        steered_activation += activation["steered"]

    assert steered_hits > unsteered_hits, (label, words, steered_hits, unsteered_hits)
    assert steered_activation > unsteered_activation
