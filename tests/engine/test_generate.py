"""Coupled dual generation: mostly on the real SmolLM2 (loaded once per session)."""

import threading

import pytest
import torch

from steering_app.engine import compare, finish
from steering_app.engine.analysis.metrics import comparison_metrics
from steering_app.engine.loader import get_embedder
from steering_app.engine.serving.generate import Stopped, sample_coupled
from steering_app.engine.serving.scheduler import scheduler_for
from steering_app.engine.steer import SteeringSpec
from steering_app.engine.tokens import eos_token_ids

from .conftest import SAE_LAYER, hooks_everywhere, random_sae, tiny_lm

PROMPT = "My favorite thing to do on weekends is"


def _compare(lm, sae, spec, seed, tokens=16, **kwargs):
    return compare(
        lm, sae, kwargs.pop("prompt", PROMPT), spec, kwargs.pop("temperature", 0.7), tokens, seed, **kwargs
    )


@pytest.mark.slow
@pytest.mark.parametrize("method", ["additive", "multiplicative"])
def test_it_generates_identical_rows_and_zero_kl_at_coefficient_zero(smollm2, smollm2_sae, method):
    spec = SteeringSpec(method, ((0, 0.0), (7, 0.0)), (SAE_LAYER,))
    for seed in (0, 1, 2):
        comparison = _compare(smollm2, smollm2_sae, spec, seed)
        assert comparison.steered.ids == comparison.unsteered_ids
        (metrics,) = comparison_metrics(smollm2, smollm2_sae, comparison, [spec], get_embedder())
        assert metrics["kl_divergence"] == 0.0
        assert metrics["perplexity_delta"] == 0.0
        assert metrics["semantic_similarity"] == 1.0 and metrics["word_overlap"] == 1.0


@pytest.mark.slow
def test_it_keeps_the_unsteered_continuation_whatever_the_features(smollm2, smollm2_sae, cat_scale):
    specs = [
        SteeringSpec("additive", ((0, 1.5),), (SAE_LAYER,), feature_scales={0: cat_scale}),
        SteeringSpec("additive", ((3, -40.0), (9, 25.0)), (2, 20)),
        SteeringSpec("additive", ((5, 60.0),), (0,)),
        SteeringSpec("multiplicative", ((0, -1.0), (1, 3.0)), (SAE_LAYER,)),
    ]
    # The short prompt matters: with few rows, matrix kernels differ between batch sizes.
    for prompt, seed in ((PROMPT, 7), ("The weather today is", 0)):
        runs = [_compare(smollm2, smollm2_sae, spec, seed, tokens=12, prompt=prompt) for spec in specs]
        assert len({tuple(run.unsteered_ids) for run in runs}) == 1
        assert all(torch.equal(run.clean_logits, runs[0].clean_logits) for run in runs)
        assert sum(run.steered.ids != run.unsteered_ids for run in runs) >= 2  # the steering did act


@pytest.mark.slow
def test_it_decodes_greedily_at_temperature_zero(smollm2, smollm2_sae):
    spec = SteeringSpec("additive", ((0, 0.0),), (SAE_LAYER,))
    first = _compare(smollm2, smollm2_sae, spec, seed=1, tokens=16, temperature=0)
    second = _compare(smollm2, smollm2_sae, spec, seed=2, tokens=16, temperature=0)
    assert first.unsteered_ids == second.unsteered_ids
    assert first.unsteered_ids == first.clean_logits.argmax(-1).tolist()
    prompt = torch.tensor([first.prompt_ids])
    with torch.inference_mode():
        reference = smollm2.model.generate(prompt, max_new_tokens=16, do_sample=False)
    assert first.unsteered_ids == reference[0, prompt.shape[1] :].tolist()


@pytest.mark.slow
def test_it_streams_text_deltas_for_both_columns(smollm2, smollm2_sae, cat_scale):
    spec = SteeringSpec("additive", ((0, 2.0),), (SAE_LAYER,), feature_scales={0: cat_scale})
    for chat, prompt in ((False, PROMPT), (True, "Describe a sunny day with emojis 🌞")):
        deltas = []
        comparison = _compare(
            smollm2,
            smollm2_sae,
            spec,
            seed=1,
            tokens=32,
            chat=chat,
            prompt=prompt,
            on_step=lambda u, s, out=deltas: out.append((u, s)),
        )
        assert "".join(u for u, _ in deltas) == comparison.unsteered_text
        assert "".join(s[0] for _, s in deltas) == comparison.steered.text
        assert len(deltas) > 5
    assert comparison.prompt_ids[0] == smollm2.tokenizer.convert_tokens_to_ids("<|im_start|>")


@pytest.mark.slow
def test_it_leaves_no_hook_after_a_failure_and_generates_as_before(smollm2, smollm2_sae, cat_scale):
    spec = SteeringSpec("additive", ((0, 2.0),), (SAE_LAYER,), feature_scales={0: cat_scale})
    before = _compare(smollm2, smollm2_sae, spec, seed=4, tokens=12)
    steps = []

    def failing(unsteered, steered):
        steps.append(unsteered)
        if len(steps) == 4:
            raise RuntimeError("injected")

    with pytest.raises(RuntimeError, match="injected"):
        _compare(smollm2, smollm2_sae, spec, seed=4, tokens=12, on_step=failing)
    assert hooks_everywhere(smollm2.model) == []
    after = _compare(smollm2, smollm2_sae, spec, seed=4, tokens=12)
    assert after.unsteered_ids == before.unsteered_ids and after.steered.ids == before.steered.ids
    assert torch.equal(after.clean_logits, before.clean_logits)


@pytest.mark.slow
def test_it_gives_two_threads_exactly_what_each_gets_alone(smollm2, smollm2_sae, cat_scale):
    requests = [
        {
            "spec": SteeringSpec("additive", ((0, 2.0),), (SAE_LAYER,), feature_scales={0: cat_scale}),
            "seed": 3,
        },
        {"spec": SteeringSpec("multiplicative", ((1, 4.0), (0, -1.0)), (SAE_LAYER,)), "seed": 3},
    ]

    def run(request):
        comparison = compare(
            smollm2, smollm2_sae, PROMPT, temperature=0.7, max_new_tokens=16, sae_layer=SAE_LAYER, **request
        )
        lean = scheduler_for(smollm2).batch.lean
        return finish(smollm2, smollm2_sae, comparison, request["spec"], get_embedder(), lean)

    alone = [run(request) for request in requests]
    together = [None, None]
    start = threading.Barrier(2)

    def worker(i):
        start.wait()
        together[i] = run(requests[i])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for a, t in zip(alone, together):
        assert (t.unsteered_text, t.steered_text, t.metrics) == (a.unsteered_text, a.steered_text, a.metrics)
    assert alone[0].steered_text != alone[1].steered_text


def test_it_stops_each_row_at_its_own_eos(smollm2, tmp_path):
    """A feature pointing at the EOS embedding, added after the last block, ends the steered row at once."""
    tiny = tiny_lm("gpt2", smollm2.tokenizer)
    (eos,) = eos_token_ids(tiny.tokenizer, tiny.model)
    direction = torch.randn(32, generator=torch.Generator().manual_seed(0))
    tiny.model.get_output_embeddings().weight.data[eos] = 2 * direction / direction.norm()
    sae = random_sae(tmp_path, d_in=32, hook_layer=3)
    sae.W_dec.data[2] = 100 * direction
    spec = SteeringSpec("additive", ((2, 1.0),), (3,))
    streamed = []
    comparison = compare(
        tiny, sae, "Hello there", spec, 0.7, 10, seed=0, on_step=lambda u, s: streamed.append(s[0])
    )
    assert comparison.steered.ids == [eos] and comparison.steered.text == ""
    assert len(comparison.unsteered_ids) == 10 and eos not in comparison.unsteered_ids
    assert "".join(streamed) == ""
    (metrics,) = comparison_metrics(tiny, sae, comparison, [spec], get_embedder())
    # The steered continuation is only produced by the last prompt position, shared with the clean row.
    assert metrics["feature_activation"][0]["steered"] == pytest.approx(
        float(comparison.clean_activations[0, 0])
    )
    assert metrics["kl_divergence"] > 0 and metrics["word_overlap"] == 0.0


def test_it_samples_from_the_tempered_distribution_with_shared_noise():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [2.0, 1.0, 0.0, -1.0]])
    generator = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_coupled(logits, 0.7, None, generator) for _ in range(20000)])
    assert torch.equal(draws[:, 0], draws[:, 1])  # equal distributions, equal tokens
    frequencies = torch.bincount(draws[:, 0], minlength=4).float() / len(draws)
    assert torch.allclose(frequencies, torch.softmax(logits[0] / 0.7, -1), atol=0.01)

    nucleus = torch.stack([sample_coupled(logits, 1.0, 0.7, generator) for _ in range(2000)])
    assert set(nucleus.flatten().tolist()) == {0, 1}  # p(0) = 0.64 < 0.7 <= p(0) + p(1)
    assert sample_coupled(logits, 0, None, generator).tolist() == [0, 0]


def test_it_stops_before_the_next_step_once_should_stop_says_so_and_leaves_no_hook(tiny, tmp_path):
    sae = random_sae(tmp_path, d_in=32, hook_layer=1)
    spec = SteeringSpec("additive", ((0, 2.0),), (1,))
    forwards, asked = [], []
    with tiny.lock:
        scheduler_for(tiny)  # the model's batch is built (its kernels checked by probe steps) before counting
    counter = tiny.model.register_forward_hook(lambda module, args, output: forwards.append(1))

    def should_stop() -> bool:
        asked.append(len(forwards))
        return len(asked) > 3  # let the prefill and two decode steps run, then stop

    try:
        with pytest.raises(Stopped):
            compare(
                tiny, sae, "Hello there", spec, 0.7, 50, seed=0, min_new_tokens=50, should_stop=should_stop
            )
    finally:
        counter.remove()

    assert asked == [0, 1, 2, 3]  # asked before every forward
    assert len(forwards) == 3  # and no forward ran once it said stop
    assert hooks_everywhere(tiny.model) == []
    assert _free_elsewhere(tiny.lock)  # another thread can take the model at once


def _free_elsewhere(lock) -> bool:
    taken = []
    thread = threading.Thread(
        target=lambda: taken.append(lock.acquire(timeout=1) and (lock.release() or True))
    )
    thread.start()
    thread.join()
    return taken == [True]
