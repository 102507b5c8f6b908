"""The demo feature space steers for real: amplified features put their own words into the text.

Three demo features whose labels name a clear word or topic are each amplified (additive, c = 4, layer 10)
over five seeds on the real SmolLM2; the steered continuations must contain the feature's top tokens more
often than the unsteered ones, and the feature must fire more on them.
"""

import re

import pytest
from django.core.management import call_command

from steering_app import runs
from steering_app.models import Feature, SteeringRun, Training
from steering_app.runs import RunRequest
from steering_app.steering_settings import SteeringSettings

pytestmark = [pytest.mark.django_db, pytest.mark.slow]

# Labels name a topic: "planet" (Mars, earth, flora), cake / bread / honey / mug, "play" (playing, plays).
SHOWCASE_FEATURES = [1681, 1083, 1039]
PROMPT = "Tell me about your day."
SEEDS = range(5)
MAX_TOKENS = 30


def word_hits(text: str, words: list[str]) -> int:
    lowered = text.lower()
    return sum(len(re.findall(rf"\b{re.escape(word.lower())}", lowered)) for word in words)


@pytest.fixture
def demo_training(owner):
    call_command("bootstrap_demo")
    return Training.objects.get()


@pytest.mark.parametrize("index", SHOWCASE_FEATURES)
def test_it_puts_an_amplified_features_words_into_the_steered_text(owner, demo_training, index):
    feature = Feature.objects.get(training=demo_training, index=index)
    words = [token.strip() for token in feature.top_tokens[:5] if token.strip().isalpha()]
    print(f"#{index} {feature.label}: {words}")
    assert words, f"feature {index} ({feature.label}) has no word among its top tokens"
    unsteered_hits = steered_hits = 0
    unsteered_activation = steered_activation = 0.0
    for seed in SEEDS:
        steering = SteeringSettings(
            features=[{"feature_id": index, "coefficient": 4.0}],
            layers=[10],
            temperature=0.8,
            max_tokens=MAX_TOKENS,
        )
        run = runs.create(owner, RunRequest(demo_training.pk, PROMPT, steering, seed=seed, chat=True))
        runs.process_queued(lambda run_id: lambda event, payload: None)
        run.refresh_from_db()
        assert run.status == SteeringRun.Status.COMPLETED, run.error
        unsteered_hits += word_hits(run.unsteered_output, words)
        steered_hits += word_hits(run.steered_output, words)
        (activation,) = run.metrics["feature_activation"]
        unsteered_activation += activation["unsteered"]
        steered_activation += activation["steered"]

    assert steered_hits > unsteered_hits, (feature.label, words, steered_hits, unsteered_hits)
    assert steered_activation > unsteered_activation
