"""Which way a slot step runs, decided once when a SlotBatch is built, and why: one record to read.

Four choices make a step: the lean step (lean.py) or transformers' modules; each linear shape's form
(F.linear, W @ xᵀ or MKL's packed sgemm, timed here by kernels.py); occupied rows only or all rows (only
where whole probe steps gave a row the same bits at every row count and span); a CUDA graph or eager.
decide() takes them in that dependency order from a StepPolicy: "auto" everywhere is the measured choice,
and an operator or a test may force one. A forced choice this machine or model cannot take raises
PlanError instead of quietly running another way.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .kernels import LINEAR, PACKED, TRANSPOSED, StepKernels, can_pack, step_kernels

LEAN_CHOICES = ("auto", "on", "off")
KERNEL_CHOICES = ("auto", "linear", "wxt", "packed")
ROWS_CHOICES = ("auto", "occupied", "all")
GRAPHS_CHOICES = ("auto", "on", "off")
KERNEL_FORMS = {"linear": LINEAR, "wxt": TRANSPOSED, "packed": PACKED}


class PlanError(ValueError):
    """A forced step choice this model or machine cannot take."""


@dataclass(frozen=True)
class StepPolicy:
    """How a batch's step may be chosen: "auto" measures, anything else forces (STEERLAB_STEP_*)."""

    lean: str = "auto"
    kernel: str = "auto"
    rows: str = "auto"
    graphs: str = "auto"

    def __post_init__(self):
        for name, choices in (
            ("lean", LEAN_CHOICES),
            ("kernel", KERNEL_CHOICES),
            ("rows", ROWS_CHOICES),
            ("graphs", GRAPHS_CHOICES),
        ):
            if getattr(self, name) not in choices:
                raise PlanError(
                    f"step {name} must be one of {', '.join(choices)}; got {getattr(self, name)!r}"
                )


AUTO = StepPolicy()  # every choice measured: the default


@dataclass(frozen=True)
class ShapeForm:
    """One linear weight shape [out, in]: the form its modules take, each form's ms per pass over them at
    the batch's row count, and whether the packed form gave bit-identical rows at 1..R rows."""

    shape: tuple[int, int]
    form: str
    ms: tuple[tuple[str, float], ...]
    row_invariant: bool


@dataclass(frozen=True)
class StepPlan:
    rows: int
    length: int
    lean: bool
    lean_why: str
    kernels: tuple[ShapeForm, ...]
    kernels_why: str
    occupied_rows: bool
    rows_why: str
    graphs: bool
    graphs_why: str

    def describe(self) -> str:
        forms = (
            ", ".join(
                f"{out}x{inp} {shape.form} (" + "/".join(f"{form} {ms:.2f}" for form, ms in shape.ms) + " ms)"
                for shape in self.kernels
                for out, inp in [shape.shape]
            )
            or "F.linear everywhere"
        )
        return (
            f"{self.rows} rows x {self.length}: {'lean step' if self.lean else 'modules'} ({self.lean_why}); "
            f"linears {forms} ({self.kernels_why}); "
            f"{'occupied rows' if self.occupied_rows else 'all rows'} ({self.rows_why}); "
            f"{'CUDA graphs' if self.graphs else 'eager'} ({self.graphs_why})"
        )

    def as_dict(self) -> dict:
        plan = {"summary": self.describe(), **dataclasses.asdict(self)}
        plan["kernels"] = [
            {
                "shape": list(shape.shape),
                "form": shape.form,
                "ms": dict(shape.ms),
                "row_invariant": shape.row_invariant,
            }
            for shape in self.kernels
        ]
        return plan


def choose_kernels(
    policy: StepPolicy, model: torch.nn.Module, rows: int, device: torch.device
) -> StepKernels:
    """The linears' forms: the fastest measured (kernels.py), or the forced one on every shape."""
    measured = step_kernels(model, rows, device)
    if policy.kernel == "auto" or (policy.kernel == "linear" and not measured.shapes):
        return measured
    if device.type != "cpu":
        raise PlanError(
            f"STEERLAB_STEP_KERNEL={policy.kernel}: linear forms are chosen on a CPU only, not {device}"
        )
    if policy.kernel == "packed" and not all(can_pack(shape.modules[0].weight) for shape in measured.shapes):
        raise PlanError("STEERLAB_STEP_KERNEL=packed needs MKL and float32 weights on the CPU")
    return measured.with_form(KERNEL_FORMS[policy.kernel])


def decide(
    policy: StepPolicy,
    rows: int,
    length: int,
    device: torch.device,
    kernels: StepKernels,
    *,
    lean_supported: bool,
    lean_matches: Callable[[], bool],
    rows_invariant: Callable[[bool], bool],
    graphs_enabled: bool,
) -> StepPlan:
    """The batch's StepPlan. lean_matches(): the lean step's probe logits match the modules'; rows_invariant(lean):
    whole probe steps give a row the same bits at every row count and span; graphs_enabled: CUDA graphs are
    not turned off (STEERLAB_CUDA_GRAPHS)."""
    if policy.graphs == "on" and device.type != "cuda":
        raise PlanError(f"CUDA graphs need a CUDA device; this batch is on {device}")
    if policy.graphs == "off":
        graphs, graphs_why = False, "forced off"
    elif device.type != "cuda":
        graphs, graphs_why = False, f"{device.type}"
    elif policy.graphs == "on" or graphs_enabled:
        graphs, graphs_why = True, "forced on" if policy.graphs == "on" else "CUDA"
    else:
        graphs, graphs_why = False, "STEERLAB_CUDA_GRAPHS=0"

    if policy.lean == "off":
        lean, lean_why = False, "forced off"
    elif not lean_supported:
        if policy.lean == "on":
            raise PlanError("STEERLAB_STEP_LEAN=on: the lean step supports plain Llama-family models only")
        lean, lean_why = False, "architecture not supported"
    elif lean_matches():
        lean, lean_why = True, "probe matched the modules" + (" (forced on)" if policy.lean == "on" else "")
    elif policy.lean == "on":
        raise PlanError("STEERLAB_STEP_LEAN=on: the lean step's probe logits differ from the modules'")
    else:
        lean, lean_why = False, "probe differed from the modules"

    if policy.rows == "all":
        occupied, rows_why = False, "forced all"
    elif graphs:
        occupied, rows_why = False, "a CUDA graph has a fixed shape"
    elif not kernels.row_invariant:
        occupied, rows_why = False, "linears not row-invariant"
    elif rows_invariant(lean):
        occupied, rows_why = (
            True,
            "probe steps row-invariant" + (" (forced)" if policy.rows == "occupied" else ""),
        )
    else:
        occupied, rows_why = False, "probe steps differed between row counts"
    if policy.rows == "occupied" and not occupied:
        raise PlanError(f"STEERLAB_STEP_ROWS=occupied: not row-invariant here ({rows_why})")

    forms = tuple(
        ShapeForm(
            tuple(choice.shape),
            choice.form,
            tuple((form, round(seconds * 1e3, 4)) for form, seconds in choice.seconds.items()),
            choice.row_invariant,
        )
        for choice in kernels.shapes
    )
    kernels_why = (
        f"forced {policy.kernel}"
        if policy.kernel != "auto"
        else "fastest measured" + (", all packed: row-invariant" if kernels.row_invariant else "")
        if forms
        else "not timed off the CPU"
    )
    return StepPlan(rows, length, lean, lean_why, forms, kernels_why, occupied, rows_why, graphs, graphs_why)
