"""One StepPlan per slot batch: the default is the measured choice, each forced setting gives its plan or a
clear error, row invariance holds wherever the plan claims it, and the step's graphs are kept LRU."""

import dataclasses
import json

import pytest
import torch

from steering_app.engine import steer
from steering_app.engine.analysis.metrics import comparison_metrics
from steering_app.engine.serving.generate import Generation, prepare
from steering_app.engine.serving.kernels import (
    LINEAR,
    PACKED,
    TRANSPOSED,
    StepKernels,
    TransposedLinear,
    can_pack,
)
from steering_app.engine.serving.plan import PlanError, StepPolicy
from steering_app.engine.serving.scheduler import Scheduler
from steering_app.engine.serving.slots import SlotBatch
from steering_app.engine.steer import SteeringSpec, plan_row

from .conftest import random_sae, tiny_lm

ROWS, LENGTH = 4, 32


@pytest.fixture
def llama(smollm2):
    """A tiny Llama of its own (plans are kept per model, so each test decides afresh)."""
    return tiny_lm("llama", smollm2.tokenizer)


def _batch(lm, **policy) -> SlotBatch:
    with lm.lock:
        return SlotBatch(lm, ROWS, LENGTH, StepPolicy(**policy))


def test_the_default_plan_is_the_measured_one_and_reads_as_one_line_and_json(tiny):
    batch = _batch(tiny)
    plan = batch.plan
    llama = tiny.architecture == "LlamaForCausalLM"
    assert plan.lean == llama == (batch.lean is not None)
    assert plan.lean_why == ("probe matched the modules" if llama else "architecture not supported")
    assert not plan.graphs and plan.graphs_why == "cpu"
    # occupied rows only where every linear is packed and row-invariant here, and the probe steps agreed
    assert not plan.occupied_rows or batch.kernels.row_invariant
    assert batch.occupied_only == plan.occupied_rows
    assert [shape.form for shape in plan.kernels] == [choice.form for choice in batch.kernels.shapes]
    assert all(dict(shape.ms).keys() >= {LINEAR, TRANSPOSED} for shape in plan.kernels)
    line = plan.describe()
    assert "\n" not in line and line.startswith(f"{ROWS} rows x {LENGTH}: ")
    assert ("lean step" if llama else "modules") in line and "eager" in line
    data = json.loads(json.dumps(plan.as_dict()))
    assert data["summary"] == line and data["lean"] == llama and data["rows"] == ROWS
    assert {"shape", "form", "ms", "row_invariant"} <= set(data["kernels"][0])


def test_it_logs_the_plan_once_when_the_first_batch_of_a_shape_is_built(llama, caplog):
    with caplog.at_level("INFO", logger="steering_app.engine.serving.slots"):
        _batch(llama)
        _batch(llama)
    assert len([r for r in caplog.records if r.getMessage().startswith("Step plan for tiny-llama: ")]) == 1


def test_forcing_the_lean_step_off_takes_the_modules(llama):
    batch = _batch(llama, lean="off")
    assert not batch.plan.lean and batch.plan.lean_why == "forced off" and batch.lean is None


def test_forcing_the_lean_step_on_a_gpt2_raises(smollm2):
    gpt2 = tiny_lm("gpt2", smollm2.tokenizer)
    with pytest.raises(PlanError, match="STEERLAB_STEP_LEAN=on"):
        _batch(gpt2, lean="on")


def test_forcing_the_lean_step_on_where_its_probe_differs_raises(llama, monkeypatch):
    monkeypatch.setattr(SlotBatch, "_lean_matches", lambda batch: False)
    assert not _batch(llama).plan.lean  # auto: the modules
    with pytest.raises(PlanError, match="probe logits differ"):
        _batch(llama, lean="on")


@pytest.mark.parametrize(
    ("kernel", "form", "module_class"),
    [("linear", LINEAR, torch.nn.Linear), ("wxt", TRANSPOSED, TransposedLinear)],
)
def test_forcing_a_kernel_form_puts_every_linear_in_it(llama, kernel, form, module_class):
    batch = _batch(llama, kernel=kernel)
    assert batch.plan.kernels and {shape.form for shape in batch.plan.kernels} == {form}
    assert batch.plan.kernels_why == f"forced {kernel}"
    assert not batch.plan.occupied_rows and batch.plan.rows_why == "linears not row-invariant"
    with batch.kernels.applied():
        assert type(llama.model.model.layers[0].mlp.down_proj) is module_class


def test_forcing_the_packed_form(llama):
    if not can_pack(llama.model.lm_head.weight):
        with pytest.raises(PlanError, match="packed"):
            _batch(llama, kernel="packed")
        return
    batch = _batch(llama, kernel="packed")
    assert {shape.form for shape in batch.plan.kernels} == {PACKED}
    assert batch.kernels.row_invariant == all(shape.row_invariant for shape in batch.plan.kernels)


def test_forcing_all_rows_runs_every_row(llama):
    batch = _batch(llama, rows="all")
    assert not batch.plan.occupied_rows and batch.plan.rows_why == "forced all"
    batch.take(1)
    assert batch.step_rows() == ROWS


def test_forcing_occupied_rows_where_the_kernels_are_not_row_invariant_raises(llama):
    with pytest.raises(PlanError, match="STEERLAB_STEP_ROWS=occupied"):
        _batch(llama, kernel="linear", rows="occupied")


def test_forcing_occupied_rows_where_the_probe_steps_differ_raises(llama, monkeypatch):
    monkeypatch.setattr(StepKernels, "row_invariant", property(lambda kernels: True))  # the probe decides
    monkeypatch.setattr(SlotBatch, "_rows_invariant", lambda batch, lean: False)
    assert not _batch(llama).plan.occupied_rows
    with pytest.raises(PlanError, match="probe steps differed"):
        _batch(llama, rows="occupied")


def test_forcing_cuda_graphs_on_a_cpu_raises(llama):
    with pytest.raises(PlanError, match="CUDA graphs need a CUDA device"):
        _batch(llama, graphs="on")


def test_it_refuses_an_unknown_choice():
    with pytest.raises(PlanError, match="step kernel must be one of auto, linear, wxt, packed"):
        StepPolicy(kernel="fast")


def test_a_row_gets_the_same_bits_alone_and_beside_others_whichever_rows_the_plan_computes(llama, tmp_path):
    """Where the plan says occupied rows, alone computes fewer rows than beside others, and the bits must still
    agree (the invariance the plan claims); where it says all rows, the same bits are the fixed shape's promise."""
    sae = random_sae(tmp_path, d_in=32, hook_layer=1)
    with llama.lock:
        scheduler = Scheduler(
            llama, ROWS, 64, StepPolicy(kernel="packed" if can_pack(llama.model.lm_head.weight) else "auto")
        )
    spec = SteeringSpec("additive", ((0, 4.0),), (1,))

    def generation(prompt, seed):
        return Generation(llama, sae, prepare(llama, sae, prompt, [spec], 0.8, 12, seed))

    with llama.lock:
        alone = scheduler.run_alone(generation("Hello there", 3))
        other = generation("Once upon a time", 1)
        assert scheduler.admit(other)
        target = generation("Hello there", 3)
        assert scheduler.admit(target)
        beside = None
        while scheduler.active:
            for ended in scheduler.step():
                assert ended.error is None
                if ended.generation is target:
                    beside = ended.comparison
    if scheduler.batch.plan.occupied_rows:
        assert beside.timings["slots"] != alone.timings["slots"]  # other rows, fewer of them computed alone
    assert torch.equal(alone.clean_logits, beside.clean_logits)
    assert torch.equal(alone.steered.logits, beside.steered.logits)


def _counting_hook(calls):
    def hook(module, args, output):
        calls.append(module)

    return hook


def test_a_hook_on_the_models_own_modules_turns_the_lean_step_off(llama):
    batch = _batch(llama)
    assert batch.plan.lean and batch.lean_usable()
    calls = []
    handle = llama.model.model.norm.register_forward_hook(_counting_hook(calls))
    try:
        assert not batch.lean_usable()
        batch.take(1)
        batch.step()
    finally:
        handle.remove()
    assert calls  # the module path ran, so the model's hook saw it
    assert batch.lean_usable()


def test_a_global_forward_hook_keeps_the_lean_step(llama):
    batch = _batch(llama)
    calls = []
    handle = torch.nn.modules.module.register_module_forward_hook(_counting_hook(calls))
    try:
        assert batch.lean_usable()
        batch.take(1)
        batch.step()
    finally:
        handle.remove()
    assert calls == []  # the lean step calls no module


def test_the_step_graphs_are_kept_lru_and_a_recaptured_graph_gives_the_same_bits(
    llama, tmp_path, monkeypatch
):
    """A fake capture (no GPU here): its 'graph' recomputes the step into the logits it captured, over the
    steering tensors it was captured with."""
    monkeypatch.setattr(steer, "STRUCTURES_KEPT", 2)
    captures = []

    def capture(batch):
        structure = batch.steering.structure
        captures.append(structure)
        logits = batch._forward()

        class Graph:
            def replay(self):
                assert batch.steering.structure is structure  # the tensors it reads are still its own
                logits.copy_(batch._forward())

        return Graph(), logits, dict(batch.steering.gathered)

    monkeypatch.setattr(SlotBatch, "_capture", capture)
    batch = _batch(llama)
    batch.plan = dataclasses.replace(batch.plan, graphs=True, occupied_rows=False)  # as on a GPU
    sae = random_sae(tmp_path, d_in=32, hook_layer=1)
    plans = [plan_row(sae, 1, SteeringSpec("additive", ((0, 4.0),), (layer,))) for layer in (0, 1, 2)]
    (row,) = batch.take(1)
    batch.set_input(row, 7)

    def step(plan):
        batch.steering.assign(row, plan)
        batch.positions.zero_()  # every step rewrites position 0: the same inputs, the same bits
        with llama.lock:
            return batch.step().clone()

    first = step(plans[0])
    assert len(captures) == 1 and torch.equal(step(plans[0]), first)  # replayed, not captured again
    others = [step(plans[1]), step(plans[2])]
    assert len(captures) == 3 and len(batch.steering._by_signature) == 2  # plans[0]'s structure went
    assert not torch.equal(others[0], first)  # the steering acted
    again = step(plans[0])
    assert len(captures) == 4 and captures[3] is not captures[0]  # captured anew
    assert torch.equal(again, first)
    assert torch.equal(step(plans[2]), others[1]) and len(captures) == 4  # still kept: replayed


class _Embedder:
    """semantic_similarity's embedder, without a download: any unit vectors."""

    def encode(self, texts, convert_to_tensor, normalize_embeddings):
        return torch.nn.functional.normalize(
            torch.randn(len(texts), 4, generator=torch.Generator().manual_seed(0))
        )


def test_the_metrics_take_the_lean_step_their_caller_passes(llama, tmp_path):
    sae = random_sae(tmp_path, d_in=32, hook_layer=1)
    spec = SteeringSpec("additive", ((0, 4.0),), (1,))
    with llama.lock:
        scheduler = Scheduler(llama, ROWS, 64)
        comparison = scheduler.run_alone(
            Generation(llama, sae, prepare(llama, sae, "Hello there", [spec], 0.8, 8, 3))
        )
    lean, calls = scheduler.batch.lean, []

    class Counted:
        length = lean.length

        def __call__(self, *args, **kwargs):
            calls.append(1)
            return lean(*args, **kwargs)

    through_lean = comparison_metrics(llama, sae, comparison, [spec], _Embedder(), Counted())[0]
    assert calls == [1]
    through_modules = comparison_metrics(llama, sae, comparison, [spec], _Embedder())[0]
    assert calls == [1]
    for key in ("kl_divergence", "perplexity_unsteered", "perplexity_steered"):
        assert through_lean[key] == pytest.approx(through_modules[key], rel=1e-4, abs=1e-6)
