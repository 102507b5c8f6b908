"""Checks of the slot batch beside the benchmark, for a GPU (or, with DEV=cpu, this machine):
- which step it takes (lean or modules), whether steps skip free rows, whether it uses CUDA graphs;
- batch invariance: a request alone, then beside 3 other runs admitted before and during it, gives
  bit-identical tokens and logits;
- a 2-row run's prefill, scheduler steps (host work included) and bare batch steps at several slot shapes;
- on a CPU, the model's wide batch (scheduler.wide_scheduler: wide where its steps compute only the occupied
  rows) and what one step costs at 2, 4, ... occupied rows, each with fresh 2-row runs (a short context);
- graph == eager for the same request.

It reads the random-weight SmolLM2-shaped model that ../shared/gpu/on_gpu.py writes to /tmp/smol, or MODEL
(MODEL=smollm2-demo: the real one). On a lent GPU: copy it into .gpu/ and run it after on_gpu.py
(python3 .gpu/slots_check.py); here: DEV=cpu MODEL=smollm2-demo .venv/bin/python bench/slots_check.py.
"""

import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path.cwd()))
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path.cwd() / "bench"))
import steering_bench as B

from steering_app.engine import SteeringSpec
from steering_app.engine.loader import load_model
from steering_app.engine.serving.generate import Generation, prepare
from steering_app.engine.serving.plan import StepPolicy
from steering_app.engine.serving.scheduler import Scheduler, wide_scheduler

device = os.environ.get("DEV", "cuda")
lm = load_model(os.environ.get("MODEL", "/tmp/smol"), device=device)
with tempfile.TemporaryDirectory() as d:
    sae, feature = B.build_sae(lm, Path(d))
spec = SteeringSpec("multiplicative", ((feature, 2.0),), (B.LAYER,))
other = SteeringSpec("additive", ((feature + 1, 3.0),), (3, 7))
rows = int(os.environ.get("ROWS", "32" if device == "cuda" else "8"))


def generation(prompt, specs, seed, tokens=24):
    request = prepare(lm, sae, prompt, specs, 0.7, tokens, seed, sae_layer=B.LAYER, min_new_tokens=tokens)
    return Generation(lm, sae, request)


def run(scheduler, target, others_before, others_during):
    for g in others_before:
        assert scheduler.admit(g)
    assert scheduler.admit(target)
    pending = list(others_during)
    result = None
    while scheduler.active:
        if pending and target.step == 3:
            assert scheduler.admit(pending.pop(0))
        for ended in scheduler.step():
            if ended.error is not None:
                raise ended.error
            if ended.generation is target:
                result = ended.comparison
    return result


def sync():
    if device == "cuda":
        torch.cuda.synchronize()


def seconds_per_step(step, warm_up=3, repeats=20) -> float:
    for _ in range(warm_up):
        step()
    sync()
    started = time.perf_counter()
    for _ in range(repeats):
        step()
    sync()
    return (time.perf_counter() - started) / repeats


def timed(scheduler, label):
    """Prefill of one run, its scheduler steps (host work included), bare batch steps, and scheduler steps with
    the batch full."""
    batch = scheduler.batch
    sync()
    started = time.perf_counter()
    assert scheduler.admit(generation(B.PROMPT, [spec], 5, 200))
    sync()
    prefill = time.perf_counter() - started
    step_1run = seconds_per_step(scheduler.step)
    bare = seconds_per_step(batch.step, warm_up=0)
    for seed in range(batch.rows // 2 - 1):
        assert scheduler.admit(generation(B.PROMPT, [spec], seed, 200))
    step_full = seconds_per_step(scheduler.step)
    print(
        f"{label}: prefill of a 2-row run {prefill * 1e3:.1f} ms; scheduler step with 1 run {step_1run * 1e3:.2f} ms; "
        f"bare batch step {bare * 1e3:.2f} ms; scheduler step with {len(scheduler.active)} runs {step_full * 1e3:.2f} ms"
    )
    for g in list(scheduler.active):
        scheduler._leave(g)


with lm.lock:
    scheduler = Scheduler(lm, rows, 1024 if device == "cuda" else 512)
    batch = scheduler.batch
    print(f"device {device} dtype {lm.dtype}")
    print(f"step plan: {batch.plan.describe()}")
    alone = run(scheduler, generation(B.PROMPT, [spec], 7), [], [])
    beside = run(
        scheduler,
        generation(B.PROMPT, [spec], 7),
        [generation("Tell me a story", [other], 1, 30)],
        [generation("Hello", [spec, other], 2, 10), generation("Paris is", [other], 3, 40)],
    )
    same = alone.unsteered_ids == beside.unsteered_ids and alone.steered.ids == beside.steered.ids
    same_logits = torch.equal(alone.clean_logits, beside.clean_logits) and torch.equal(
        alone.steered.logits, beside.steered.logits
    )
    print(
        f"invariance alone vs beside 3 runs: tokens {'PASS' if same else 'FAIL'}, "
        f"logits {'PASS' if same_logits else 'FAIL'}"
    )
    timed(scheduler, f"{rows} rows x {scheduler.batch.length}")


def step_by_occupied_rows(scheduler) -> str:
    """Scheduler steps at 2, 4, ... occupied rows, each count with fresh 2-row runs (contexts of a few tokens)."""
    costs = []
    for count in range(2, scheduler.batch.rows + 1, 2):
        for g in list(scheduler.active):
            scheduler._leave(g)
        for seed in range(count // 2):
            assert scheduler.admit(generation(B.PROMPT, [spec], seed, 200))
        costs.append(f"{count}: {seconds_per_step(scheduler.step, repeats=10) * 1e3:.1f}")
    for g in list(scheduler.active):
        scheduler._leave(g)
    return ", ".join(costs)


for shape in ((16, 1024), (64, 1024)) if device == "cuda" else ((12, 512), (16, 512), (24, 512)):
    with lm.lock:
        timed(Scheduler(lm, *shape), f"{shape[0]} rows x {shape[1]}")
if device == "cpu":
    with lm.lock:
        wide = wide_scheduler(lm)
        print(f"step plan (wide batch): {wide.batch.plan.describe()}")
        print(f"wide batch: ms per step by occupied rows: {step_by_occupied_rows(wide)}")
with lm.lock:
    scheduler = Scheduler(lm, rows, 1024 if device == "cuda" else 512, StepPolicy(graphs="off"))
    eager = run(scheduler, generation(B.PROMPT, [spec], 7), [], [])
    print(
        "graph == eager tokens:",
        eager.unsteered_ids == alone.unsteered_ids and eager.steered.ids == alone.steered.ids,
        "max logit diff:",
        float((eager.clean_logits - alone.clean_logits).abs().max()),
    )
