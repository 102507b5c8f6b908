"""Steering benchmark: SmolLM2-135M-Instruct, prompt "The weather today is", 64 new tokens (min = max),
one feature at layer 10 ("Amplify", coefficient 2), temperature 0.7, warm caches.

- F: plain `model.generate` of the unsteered continuation alone (the floor).
- S: the specification's reference approach (seed section 2) reproduced faithfully: two sequential
  `generate` calls with output_scores, the encode / scale / clamp / decode hook, a SentenceTransformer
  constructed inside the call, its four metrics.
- O: ours, `compare` then `finish`: both continuations and all five metrics, in the worker's slot batch.
- SW: ours, a strength sweep of 4 variants (x0.5, x1, x2, x4) in one run, every variant's metrics.
- C2, C4: 2 and 4 comparisons (different seeds) submitted together to one slot batch, as a worker runs them
  (continuous batching, metrics as each ends): the wall time until the last finishes.
- HFs (CUDA only): `model.generate(cache_implementation="static")`, transformers' best plain practice.
- EX: an experiment: 8 everyday prompts, the same feature and coefficient, strengths x0.5, x1, x2, x4, so
  8 sweep cells of 5 rows submitted together to the model's wide batch (scheduler.wide_scheduler) as a
  worker runs them (admitted as rows free up, metrics as each ends): the wall time until the last ends.
  SEQ: the same 8 sweeps one after another (compare, finish). EX's texts must equal SEQ's.
- FAIR: O's comparison submitted after a few steps of the experiment, ahead of its waiting cells, as a
  worker gives interactive runs priority: into the shared batch, which is stepped alone while it holds runs
  (the cells wait), from its submission to its end, metrics included. FAIRs: the same, admitted instead
  into the cells' batch at the first step where enough rows are free (it shares their steps and waits out
  the metrics of cells ending meanwhile). The experiment is cancelled once it ends.

- CH1, CH6: a conversation of 6 turns (the user's messages CHAT_MESSAGES, each reply NEW_TOKENS long), in a
  batch of the shared one's rows and CHAT_SLOT_TOKENS positions (the CPU default of 512 holds no 600-token
  history): the generation of turn 1 and of turn 6 (about 600 tokens of history on each side), with the
  conversation's rows kept in the batch between turns (its prefill then reads only what follows the full blocks
  of turn 5's history). CH6e: turn 6 again after its rows were evicted (the whole history read again; its bits
  must equal CH6's). Generation only: a turn's metrics read its whole history in one pass, timed apart.

All run interleaved in one process (the order rotates each round); each reports the median of --runs
timed runs (EX, SEQ, FAIR and FAIRs: of --experiment-runs, in the first rounds) after one untimed warm-up
(not for these four: the others run the same code before them, and the wide batch is built before timing).
Prints a table, the CPU and the matmul forms the batch chose, and, last, `O/F=<ratio> S/O=<ratio>
SW/O=<ratio> C2/O=<ratio> C4/O=<ratio> EX/SEQ=<ratio> FAIR/O=<ratio> CH6/CH1=<ratio>` (and `O/HFs=` on CUDA).

    .venv/bin/python bench/steering_bench.py [--runs 7] [--experiment-runs 3] [--device cpu|cuda]
        [--model SOURCE]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from steering_app.engine import SteeringSpec, compare, finish
from steering_app.engine.demo import DEMO_LAYER, DEMO_MODEL_NAME
from steering_app.engine.layers import decoder_blocks
from steering_app.engine.loader import (
    embedder_source,
    get_embedder,
    load_model,
    load_sae_cached,
)
from steering_app.engine.saes.sae import save_sae
from steering_app.engine.serving.generate import Generation, prepare, prepare_turn
from steering_app.engine.serving.scheduler import Scheduler, scheduler_for, slot_shape, wide_scheduler
from steering_app.model_files import DEMO_MODEL

PROMPT = "The weather today is"
NEW_TOKENS = 64
LAYER = DEMO_LAYER
TEMPERATURE = 0.7
COEFFICIENT = 2.0  # the specification UI's "Amplify" preset
D_SAE = 8 * 576  # a usual 8x expansion
SWEEP = (0.5, 1.0, 2.0, 4.0)
EXPERIMENT_PROMPTS = (
    "The best way to spend a Sunday morning is",
    "For dinner tonight I am going to cook",
    "On my way to work I usually",
    "The last book I read was about",
    "A good cup of coffee needs",
    "This summer we would like to visit",
    "The easiest way to keep a houseplant alive is",
    "After a long day at work I like to",
)
FAIR_AFTER_STEPS = 4  # experiment steps before the comparison is submitted
CHAT_SLOT_TOKENS = 1024
CHAT_MESSAGES = (  # about 40 tokens each: with a 64-token reply, turn 6 reads about 600 tokens of history
    (
        "I am planning a small garden behind my house this spring, with tomatoes, beans and some herbs. "
        "What should I plant first, and how much sun do these plants need each day?"
    ),
    (
        "Thanks. The soil in my garden is heavy clay that stays wet for days after it rains. "
        "How can I improve it before planting, and is there anything I should avoid doing?"
    ),
    (
        "I also have two young children who want to help. Which jobs in the garden are safe for them, "
        "and how can I keep them interested for the whole season?"
    ),
    (
        "Our neighbour says that slugs ate all of her lettuce last year. How can I protect my plants "
        "from slugs and snails without using chemicals that could harm birds or pets?"
    ),
    (
        "In July we go away on holiday for two weeks. How can I make sure the garden gets enough water "
        "while we are gone, without asking the neighbours to do it every day?"
    ),
    (
        "Finally, when the tomatoes are ripe, what is a simple recipe that the whole family would enjoy, "
        "and how can I store the extra tomatoes so that they last into the autumn?"
    ),
)


def build_sae(lm, directory: Path):
    """A random SAE at layer 10 (unit decoder rows, tied encoder) and the latent that fires most on the prompt."""
    generator = torch.Generator().manual_seed(0)
    W_dec = torch.randn(D_SAE, lm.hidden_size, generator=generator)
    W_dec = W_dec / W_dec.norm(dim=1, keepdim=True)
    save_sae(
        directory,
        W_dec.T.clone(),
        W_dec,
        torch.zeros(D_SAE),
        torch.zeros(lm.hidden_size),
        {"metadata": {"hook_name": f"blocks.{LAYER}.hook_resid_post", "model_name": DEMO_MODEL_NAME}},
    )
    sae = load_sae_cached(directory, lm)
    seen = []
    handle = decoder_blocks(lm.model)[LAYER].register_forward_hook(lambda m, a, out: seen.append(out))
    with torch.inference_mode():
        lm.model(lm.tokenizer(PROMPT, return_tensors="pt").input_ids.to(lm.device))
    handle.remove()
    hidden = seen[0][0] if isinstance(seen[0], tuple) else seen[0]
    feature = int(sae.encode(hidden[0]).mean(0).argmax())
    return sae, feature


def run_floor(lm, seed: int, **generate_options) -> str:
    """Plain `generate` of the unsteered continuation; cache_implementation="static" makes it transformers'
    compiled static-cache generation, the best plain practice on a GPU."""
    tokenizer, model = lm.tokenizer, lm.model
    torch.manual_seed(seed)
    input_ids = tokenizer(PROMPT, return_tensors="pt").input_ids.to(lm.device)
    with torch.no_grad():
        output = model.generate(
            input_ids,
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=True,
            temperature=TEMPERATURE,
            **generate_options,
        )
    return tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True)


def run_concurrent(lm, sae, spec, embedder, seeds) -> list:
    """Comparisons submitted together to the model's slot batch, as a worker runs them: admitted while rows
    are free (the rest join as rows free up), stepped together, metrics computed as each ends."""
    waiting = [
        Generation(
            lm,
            sae,
            prepare(
                lm,
                sae,
                PROMPT,
                [spec],
                TEMPERATURE,
                NEW_TOKENS,
                seed,
                sae_layer=LAYER,
                min_new_tokens=NEW_TOKENS,
            ),
        )
        for seed in seeds
    ]
    results = []
    with lm.lock:
        scheduler = scheduler_for(lm)
        while waiting or scheduler.active:
            while waiting and scheduler.admit(waiting[0]):
                waiting.pop(0)
            for ended in scheduler.step():
                if ended.error is not None:
                    raise ended.error
                results.append(finish(lm, sae, ended.comparison, spec, embedder, scheduler.batch.lean))
    return results


class Chat:
    """CH's conversation in a batch of its own (CHAT_SLOT_TOKENS positions): six turns, each side with its own
    history, the rows kept between turns; turn 6 once more after an eviction."""

    def __init__(self, lm, sae, spec):
        self.lm, self.sae, self.spec = lm, sae, spec
        rows = slot_shape(lm.device)[0]
        with lm.lock:
            self.scheduler = Scheduler(lm, rows, CHAT_SLOT_TOKENS, scheduler_for(lm).batch.policy)

    def turn(self, clean: list[dict], steered: list[dict], seed: int, key) -> tuple[float, object]:
        request = prepare_turn(
            self.lm,
            self.sae,
            clean,
            steered,
            self.spec,
            TEMPERATURE,
            NEW_TOKENS,
            seed,
            keep=key,
            sae_layer=LAYER,
            min_new_tokens=NEW_TOKENS,
        )
        with self.lm.lock:
            _synchronize(self.lm.device)
            started = time.perf_counter()
            comparison = self.scheduler.run_alone(Generation(self.lm, self.sae, request))
            _synchronize(self.lm.device)
        return time.perf_counter() - started, comparison

    def run(self, seed: int) -> dict:
        """{CH1, CH6, CH6e: seconds, history: turn 6's history tokens, same: CH6e's bits equal CH6's}."""
        key = ("bench", seed)
        clean, steered, times = [], [], {}
        for number, message in enumerate(CHAT_MESSAGES, start=1):
            clean.append({"role": "user", "content": message})
            steered.append({"role": "user", "content": message})
            elapsed, turn = self.turn(clean, steered, seed + number, key)
            times[f"CH{number}"] = elapsed
            clean.append({"role": "assistant", "content": turn.unsteered_text})
            steered.append({"role": "assistant", "content": turn.steered.text})
        with self.lm.lock:
            self.scheduler.evict(key)
        evicted_time, evicted = self.turn(clean[:-1], steered[:-1], seed + len(CHAT_MESSAGES), key)
        with self.lm.lock:
            self.scheduler.evict(key)
        return {
            "CH1": times["CH1"],
            "CH6": times[f"CH{len(CHAT_MESSAGES)}"],
            "CH6e": evicted_time,
            "history": turn.timings["prompt_tokens"],
            "reused": turn.timings["reused_tokens"],
            "same": evicted.unsteered_ids == turn.unsteered_ids
            and evicted.steered.ids == turn.steered.ids
            and torch.equal(evicted.clean_logits, turn.clean_logits),
        }


def generation(lm, sae, prompt: str, specs, seed: int, should_stop=None) -> Generation:
    request = prepare(
        lm, sae, prompt, specs, TEMPERATURE, NEW_TOKENS, seed, sae_layer=LAYER, min_new_tokens=NEW_TOKENS
    )
    return Generation(lm, sae, request, should_stop=should_stop)


def run_experiment(lm, sae, sweep, embedder, seed, interactive=None, same_batch=False):
    """The experiment's cells (one sweep per prompt) submitted together to the model's wide batch
    (scheduler.wide_scheduler), admitted as rows free up, metrics as each ends: their results in prompt order,
    and None.

    With `interactive` (a prompt and its specs), that comparison is submitted after FAIR_AFTER_STEPS steps and
    goes ahead of the waiting cells, as a worker gives interactive runs priority: into the model's shared
    batch, stepped alone while it runs (the cells wait), or, with same_batch, into the cells' batch at the
    first step where enough rows are free (no cell is admitted while it waits). The cells are cancelled once
    it ends; the second value is its time from submission to its end, metrics included."""
    cancelled = []
    cells = [
        generation(lm, sae, prompt, sweep, seed + index, should_stop=lambda: bool(cancelled))
        for index, prompt in enumerate(EXPERIMENT_PROMPTS)
    ]
    results: dict[int, object] = {}
    waiting = list(cells)
    pending = urgent = submitted = fair = None
    if interactive is not None:
        pending = generation(lm, sae, *interactive, seed)
    steps = 0
    with lm.lock:
        wide = wide_scheduler(lm)
        priority = wide if same_batch or interactive is None else scheduler_for(lm)
        while waiting or wide.active or priority.active or pending is not None or urgent is not None:
            if pending is not None and steps >= FAIR_AFTER_STEPS:
                urgent, pending, submitted = pending, None, time.perf_counter()
            if urgent is not None and priority.admit(urgent):
                urgent = None
            stepping = priority if priority.active else wide
            if stepping is wide:
                while urgent is None and waiting and wide.admit(waiting[0]):
                    waiting.pop(0)
            for ended in stepping.step():
                if ended.generation in cells:
                    if not cancelled:  # a cell cancelled after the comparison ended ends with Stopped
                        if ended.error is not None:
                            raise ended.error
                        results[cells.index(ended.generation)] = finish(
                            lm, sae, ended.comparison, sweep, embedder, stepping.batch.lean
                        )
                    continue
                if ended.error is not None:
                    raise ended.error
                finish(lm, sae, ended.comparison, interactive[1], embedder, stepping.batch.lean)
                fair = time.perf_counter() - submitted
                cancelled.append(True)
                waiting.clear()
            steps += 1
    return [results[index] for index in sorted(results)], fair


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def cpu_flags() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    flags = next(
        (line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []
    )
    return " ".join(
        sorted(flag for flag in flags if flag.startswith(("amx", "avx512f", "avx512_bf16", "avx2")))
    )


class SpecSteeringService:
    """Seed section 2's SteeringService, kept as written except where this environment forces a change:
    no async, the model's own device and dtype instead of .cuda(), the decoder blocks found for Llama instead of
    model.transformer.h (GPT-2 only), the embedder from the bundled files instead of a hub download,
    and min_new_tokens so that every approach generates the same 64 tokens. Its SAE encoder and
    decoder are built once, outside the timed call (the specification loads them per call), which
    favours S."""

    def __init__(self, lm, sae):
        self.lm = lm
        self.hook_handles = []
        self.sae_encoder = torch.nn.Linear(sae.d_in, sae.d_sae).to(lm.device, lm.dtype)
        self.sae_decoder = torch.nn.Linear(sae.d_sae, sae.d_in).to(lm.device, lm.dtype)
        with torch.no_grad():
            self.sae_encoder.weight.copy_(sae.W_enc.T)
            self.sae_encoder.bias.copy_(sae.b_enc)
            self.sae_decoder.weight.copy_(sae.W_dec.T)
            self.sae_decoder.bias.copy_(sae.b_dec)

    def generate_with_steering(
        self, prompt, features, intervention_layer, temperature, max_tokens, seed=None
    ):
        model, tokenizer = self.lm.model, self.lm.tokenizer
        sae_encoder, sae_decoder = self.sae_encoder, self.sae_decoder

        if seed is not None:
            torch.manual_seed(seed)
        input_ids = tokenizer.encode(prompt, return_tensors="pt").to(self.lm.device)
        with torch.no_grad():
            unsteered_outputs = model.generate(
                input_ids,
                max_new_tokens=max_tokens,
                min_new_tokens=max_tokens,
                temperature=temperature,
                do_sample=True,
                return_dict_in_generate=True,
                output_scores=True,
            )
        unsteered_text = tokenizer.decode(unsteered_outputs.sequences[0], skip_special_tokens=True)
        unsteered_logprobs = torch.stack(unsteered_outputs.scores, dim=1)

        if seed is not None:
            torch.manual_seed(seed)
        steering_config = {f["feature_id"]: f["coefficient"] for f in features}
        self._register_steering_hook(model, sae_encoder, sae_decoder, intervention_layer, steering_config)
        try:
            with torch.no_grad():
                steered_outputs = model.generate(
                    input_ids,
                    max_new_tokens=max_tokens,
                    min_new_tokens=max_tokens,
                    temperature=temperature,
                    do_sample=True,
                    return_dict_in_generate=True,
                    output_scores=True,
                )
            steered_text = tokenizer.decode(steered_outputs.sequences[0], skip_special_tokens=True)
            steered_logprobs = torch.stack(steered_outputs.scores, dim=1)
        finally:
            self._cleanup_hooks()

        metrics = self._calculate_metrics(
            unsteered_text, steered_text, unsteered_logprobs, steered_logprobs, tokenizer
        )
        return {"unsteered_output": unsteered_text, "steered_output": steered_text, "metrics": metrics}

    def _register_steering_hook(self, model, sae_encoder, sae_decoder, intervention_layer, steering_config):
        def steering_hook(module, input, output):
            activations = output[0] if isinstance(output, tuple) else output
            feature_activations = torch.relu(sae_encoder(activations))
            for feature_id, coefficient in steering_config.items():
                feature_activations[:, :, feature_id] *= 1 + coefficient
            feature_activations = torch.clamp(feature_activations, min=-10, max=10)
            steered_activations = sae_decoder(feature_activations)
            return (steered_activations,) if isinstance(output, tuple) else steered_activations

        target_layer = decoder_blocks(model)[intervention_layer]
        self.hook_handles.append(target_layer.register_forward_hook(steering_hook))

    def _cleanup_hooks(self):
        for handle in self.hook_handles:
            handle.remove()
        self.hook_handles.clear()

    def _calculate_metrics(
        self, unsteered_text, steered_text, unsteered_logprobs, steered_logprobs, tokenizer
    ):
        p_unsteered = torch.softmax(unsteered_logprobs, dim=-1)
        p_steered = torch.softmax(steered_logprobs, dim=-1)
        kl_div = torch.sum(p_unsteered * torch.log(p_unsteered / (p_steered + 1e-10)), dim=-1).mean().item()

        unsteered_nll = -torch.max(unsteered_logprobs, dim=-1).values.mean()
        steered_nll = -torch.max(steered_logprobs, dim=-1).values.mean()
        perplexity_delta = torch.exp(steered_nll).item() - torch.exp(unsteered_nll).item()

        from sentence_transformers import SentenceTransformer

        sentence_model = SentenceTransformer(embedder_source(), device=str(self.lm.device))
        embeddings = sentence_model.encode([unsteered_text, steered_text], convert_to_tensor=True)
        similarity = torch.nn.functional.cosine_similarity(
            embeddings[0].unsqueeze(0), embeddings[1].unsqueeze(0)
        ).item()

        tokens_unsteered = set(tokenizer.tokenize(unsteered_text))
        tokens_steered = set(tokenizer.tokenize(steered_text))
        union = len(tokens_unsteered | tokens_steered)
        word_overlap = len(tokens_unsteered & tokens_steered) / union if union > 0 else 0.0
        return {
            "kl_divergence": round(kl_div, 4),
            "perplexity_delta": round(perplexity_delta, 2),
            "semantic_similarity": round(similarity, 2),
            "word_overlap": round(word_overlap, 2),
        }


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=7, help="timed runs per approach (at least 5)")
    parser.add_argument(
        "--experiment-runs", type=int, default=3, help="timed runs of EX, SEQ, FAIR and FAIRs (at least 3)"
    )
    parser.add_argument("--device", default=None, help="auto (default), cpu, cuda or cuda:N")
    parser.add_argument("--model", default=DEMO_MODEL, help="model source (default: the demo SmolLM2)")
    args = parser.parse_args()
    if args.runs < 5:
        parser.error("--runs must be at least 5")
    if not 3 <= args.experiment_runs <= args.runs:
        parser.error("--experiment-runs must be at least 3 and at most --runs")

    load_before = os.getloadavg()
    lm = load_model(args.model, device=args.device)
    embedder = get_embedder()
    with tempfile.TemporaryDirectory() as directory:
        sae, feature = build_sae(lm, Path(directory))
    spec = SteeringSpec("multiplicative", ((feature, COEFFICIENT),), (LAYER,))
    service = SpecSteeringService(lm, sae)
    details: dict[str, object] = {}

    def floor(seed):
        details["F"] = run_floor(lm, seed)

    def reference(seed):
        details["S"] = service.generate_with_steering(
            PROMPT,
            [{"feature_id": feature, "coefficient": COEFFICIENT}],
            LAYER,
            TEMPERATURE,
            NEW_TOKENS,
            seed,
        )

    def comparison(specs, seed, prompt=PROMPT):
        """Both continuations and all metrics, as a worker computes them (compare, then finish)."""
        generated = compare(
            lm,
            sae,
            prompt=prompt,
            spec=specs,
            temperature=TEMPERATURE,
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            seed=seed,
            sae_layer=LAYER,
        )
        # compare() ran in the model's shared batch: its metrics take that batch's lean step, as a worker's do.
        return finish(lm, sae, generated, specs, embedder, scheduler_for(lm).batch.lean)

    def ours(seed):
        result = details["O"] = comparison(spec, seed)
        phases.append(result.timings)

    sweep = [
        SteeringSpec("multiplicative", ((feature, COEFFICIENT * multiplier),), (LAYER,))
        for multiplier in SWEEP
    ]

    def swept(seed):
        details["SW"] = comparison(sweep, seed)

    def concurrent(count):
        return lambda seed: details.__setitem__(
            f"C{count}", run_concurrent(lm, sae, spec, embedder, [seed + 1000 * i for i in range(count)])
        )

    def experiment(seed):
        details["EX"] = run_experiment(lm, sae, sweep, embedder, seed)[0]

    def sequential(seed):
        details["SEQ"] = [
            comparison(sweep, seed + index, prompt) for index, prompt in enumerate(EXPERIMENT_PROMPTS)
        ]

    chat = Chat(lm, sae, spec)

    def chatted(seed):
        result = details["CH"] = chat.run(seed)
        for name in ("CH1", "CH6", "CH6e"):
            chat_times[name].append(result[name])

    def interactive(same_batch):
        name = "FAIRs" if same_batch else "FAIR"
        return lambda seed: fair_times[name].append(
            run_experiment(
                lm, sae, sweep, embedder, seed, interactive=(PROMPT, [spec]), same_batch=same_batch
            )[1]
        )

    approaches = {
        "F": floor,
        "S": reference,
        "O": ours,
        "SW": swept,
        "C2": concurrent(2),
        "C4": concurrent(4),
        "EX": experiment,
        "SEQ": sequential,
        "FAIR": interactive(same_batch=False),
        "FAIRs": interactive(same_batch=True),
        "CH": chatted,
    }
    experiments = (
        "EX",
        "SEQ",
        "FAIR",
        "FAIRs",
        "CH",
    )  # warmed by the others, and timed in the first rounds only
    labels = {
        "F": "plain generate, unsteered only (floor)",
        "S": "specification section 2 (reference)",
        "O": "ours: both continuations + 5 metrics",
        "SW": "ours: sweep of 4 variants + metrics",
        "C2": "ours: 2 comparisons together",
        "C4": "ours: 4 comparisons together",
        "EX": "ours: experiment, 8 sweeps together",
        "SEQ": "ours: the 8 sweeps one after another",
        "FAIR": "ours: O during the experiment, own batch",
        "FAIRs": "ours: O during the experiment, same batch",
        "CH": "ours: a 6-turn conversation, evicted turn 6",
        "CH1": "ours: conversation, turn 1",
        "CH6": "ours: conversation, turn 6, rows kept",
        "CH6e": "ours: conversation, turn 6, rows evicted",
    }
    if lm.device.type == "cuda":
        approaches["HFs"] = lambda seed: details.__setitem__(
            "HFs", run_floor(lm, seed, cache_implementation="static")
        )
        labels["HFs"] = "generate, static cache (compiled)"
    times: dict[str, list[float]] = {name: [] for name in approaches}
    phases: list[dict] = []
    fair_times: dict[str, list[float]] = {"FAIR": [], "FAIRs": []}
    chat_times: dict[str, list[float]] = {"CH1": [], "CH6": [], "CH6e": []}
    for name, run in approaches.items():  # warm-up
        if name not in experiments:
            run(1000)
    with lm.lock:
        wide_scheduler(lm)  # built (its kernels timed, its probe steps run) before the timed rounds
    phases.clear()
    order = list(approaches)
    for round_ in range(args.runs):
        shift = round_ % len(order)
        for name in order[shift:] + order[:shift]:
            if name in experiments and round_ >= args.experiment_runs:
                continue
            _synchronize(lm.device)
            started = time.perf_counter()
            approaches[name](round_)
            _synchronize(lm.device)
            times[name].append(time.perf_counter() - started)
    times.update(fair_times)  # from the comparison's submission to its end, not the whole experiment's
    times.update(chat_times)  # each turn's own time, not the whole conversation's
    load_after = os.getloadavg()

    medians = {name: statistics.median(values) for name, values in times.items()}
    print(
        f"device: {lm.device} ({torch.cuda.get_device_name(lm.device) if lm.device.type == 'cuda' else 'CPU'}), "
        f"torch threads: {torch.get_num_threads()}, torch {torch.__version__}, dtype {lm.dtype}"
    )
    print(f"CPU: {cpu_model()}; flags: {cpu_flags() or 'none of amx/avx512f/avx2'}")
    print(f"step plan: {scheduler_for(lm).batch.plan.describe()}")
    print(f"step plan (EX's cells, the wide batch): {wide_scheduler(lm).batch.plan.describe()}")
    print(
        f"load average (1, 5, 15 min): before {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}, "
        f"after {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}"
    )
    print(
        f"prompt {PROMPT!r}, {NEW_TOKENS} new tokens, layer {LAYER}, feature {feature} of {D_SAE}, "
        f"coefficient {COEFFICIENT}, temperature {TEMPERATURE}, {args.runs} interleaved runs each"
    )
    print()
    print(f"{'':5} {'approach':40} {'median s':>9} {'min s':>7} {'max s':>7} {'ms/token':>9} {'x F':>6}")
    for name in [*approaches, *chat_times]:
        values = times[name]
        print(
            f"{name:5} {labels[name]:40} {medians[name]:9.3f} {min(values):7.3f} {max(values):7.3f} "
            f"{1000 * medians[name] / NEW_TOKENS:9.1f} {medians[name] / medians['F']:6.2f}"
        )
    phase_names = ["prefill", "decode", "metrics_forward", "embed"]
    print()
    print(
        "O phases, median s: "
        + ", ".join(
            f"{phase} {statistics.median(p.get(phase, 0.0) for p in phases):.3f}" for phase in phase_names
        )
    )
    last = details["O"]
    print(
        f"O last run: KL {last.metrics['kl_divergence']:.4f}, similarity {last.metrics['semantic_similarity']:.2f}, "
        f"steered differs: {last.steered_text != last.unsteered_text}"
    )
    same = all(
        ours.unsteered_text == theirs.unsteered_text
        and [v.text for v in ours.variants] == [v.text for v in theirs.variants]
        for ours, theirs in zip(details["EX"], details["SEQ"], strict=True)
    )
    print(f"EX last run: texts equal to SEQ's (same seeds): {same}")
    chat = details["CH"]
    print(
        f"CH last run: turn 6 read {chat['history']} history tokens (clean, steered), reused {chat['reused']} "
        f"kept; after the eviction, same bits: {chat['same']}; goal CH6/CH1 <= 1.3"
    )
    ratios = {
        "O/F": medians["O"] / medians["F"],
        "S/O": medians["S"] / medians["O"],
        "SW/O": medians["SW"] / medians["O"],
        "C2/O": medians["C2"] / medians["O"],
        "C4/O": medians["C4"] / medians["O"],
        "EX/SEQ": medians["EX"] / medians["SEQ"],
        "FAIR/O": medians["FAIR"] / medians["O"],
        "CH6/CH1": medians["CH6"] / medians["CH1"],
    }
    if "HFs" in medians:
        ratios["O/HFs"] = medians["O"] / medians["HFs"]
    print(" ".join(f"{name}={value:.2f}" for name, value in ratios.items()))


if __name__ == "__main__":
    main()
