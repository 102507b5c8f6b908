"""How the linear layers of a slot step compute on this machine: chosen by running them, never by CPU name.

A slot step must give each row the same numbers whatever else shares the batch. Two ways hold that:

- **Row-invariant kernels, occupied rows only.** MKL's packed sgemm (the weights reordered once,
  cblas_sgemm_compute) computes a row of x @ Wᵀ with the same code path at any row count. F.linear does
  not: on the CPUs measured, 1 and 2 rows take different kernels with different reduction orders. When
  every linear shape of the model gives bit-identical rows at 1 to R rows here, a step may run over the
  occupied rows only (slots.py checks a whole step too), and a lone comparison pays for its 2 rows, not R.
- **A fixed shape.** Otherwise (no MKL, a dtype other than float32, a CPU where the check fails, or a GPU,
  whose CUDA graph has a fixed shape anyway) every step runs all R rows, and each weight shape uses the
  fastest form at R rows: F.linear's x @ Wᵀ, W @ xᵀ, or the packed form. Which is fastest flips between
  CPUs of one machine kind (on an AMX Xeon F.linear at 2 rows costs what 1 row does and W @ xᵀ three
  times that; elsewhere it was the other way round), so each shape is timed on the machine itself.

The choice is made once per model and row count (a few hundred milliseconds) and kept.
"""

from __future__ import annotations

import dataclasses
import functools
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

# Timed passes of each linear form when a batch's step plan is measured; its best pass counts.
TIMING_REPEATS = 5
LINEAR, TRANSPOSED, PACKED = "F.linear", "W@x.T", "packed"


class TransposedLinear(torch.nn.Linear):
    """nn.Linear computing W @ x.T (the weights streamed once for all rows)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        y = torch.mm(self.weight, x.reshape(rows, x.shape[-1]).T).T.contiguous()
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.weight.shape[0])


class PackedLinear(torch.nn.Linear):
    """nn.Linear through MKL's packed sgemm; `packed_weight` is set on the module by StepKernels.applied()."""

    packed_weight: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _packed(self.packed_weight, self.weight, self.bias, x)


FORM_CLASSES = {TRANSPOSED: TransposedLinear, PACKED: PackedLinear}


def _packed(packed: torch.Tensor, weight: torch.Tensor, bias, x: torch.Tensor) -> torch.Tensor:
    # The last argument must equal x's row count, or _mkl_linear silently falls back to F.linear.
    return torch.ops.mkl._mkl_linear(x, packed, weight, bias, x.numel() // x.shape[-1])


def can_pack(weight: torch.Tensor) -> bool:
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and torch._C.has_mkl
        and hasattr(torch.ops.mkl, "_mkl_reorder_linear_weight")
    )


# The packed layout is tuned for a row count, and packs for different counts may round differently, so every
# batch of a model uses the one pack of each weight (invariance is then checked per batch's row count). Laid
# out for the widest CPU batch (scheduler.WIDE_ROWS): on the 2-core AMX Xeon a pass over SmolLM2's linears
# cost 51 ms at 10 rows and 63 at 22 with a pack for 8 rows, 35 and 42 with one for 24, and no more at 1 to
# 8 rows (27 and 25 ms at 2; a comparison about 2% faster, its text the same).
PACK_ROWS = 24
_PACKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # nn.Linear -> its packed weight


def packed_weight(module: torch.nn.Linear) -> torch.Tensor:
    """module.weight [out, in] reordered once for MKL's packed sgemm."""
    if module not in _PACKS:
        _PACKS[module] = torch.ops.mkl._mkl_reorder_linear_weight(module.weight, PACK_ROWS)
    return _PACKS[module]


@dataclass
class ShapeChoice:
    """One weight shape: its modules, the seconds per pass over them in each form at R rows, the form used."""

    shape: tuple[int, int]
    modules: list[torch.nn.Linear]
    seconds: dict[str, float]
    form: str
    row_invariant: bool  # the packed form gives bit-identical rows at 1..R rows here
    packs: dict = field(default_factory=dict)  # module -> packed weight, while the form may be packed


@dataclass
class StepKernels:
    """The forms a model's linears take in a slot step of `rows` rows, and whether they are row-invariant."""

    rows: int
    shapes: list[ShapeChoice] = field(default_factory=list)

    @property
    def row_invariant(self) -> bool:
        """Every linear takes the packed form, and it gave bit-identical rows at every row count."""
        return bool(self.shapes) and all(c.form == PACKED and c.row_invariant for c in self.shapes)

    def with_form(self, form: str) -> StepKernels:
        """These shapes, every one in `form` (a forced plan, plan.py); the timings stay the measured ones."""
        return StepKernels(
            self.rows,
            [
                dataclasses.replace(
                    choice,
                    form=form,
                    packs={module: packed_weight(module) for module in choice.modules}
                    if form == PACKED
                    else {},
                )
                for choice in self.shapes
            ],
        )

    @contextmanager
    def applied(self) -> Iterator[None]:
        """The chosen forms for one step (under the model's lock), then nn.Linear again, so every other use
        of the shared model (prefill, metrics, plain generate) is untouched."""
        # object.__setattr__ and __dict__: nn.Module's own __setattr__ costs microseconds, hundreds of times a step.
        for module, form_class, packed in self._swaps:
            object.__setattr__(module, "__class__", form_class)
            if packed is not None:
                module.__dict__["packed_weight"] = packed
        try:
            yield
        finally:
            for module, _, _ in self._swaps:
                object.__setattr__(module, "__class__", torch.nn.Linear)
                module.__dict__.pop("packed_weight", None)

    @functools.cached_property
    def _swaps(self) -> list[tuple]:
        """(module, its form's class, its packed weight or None) for every linear not left as F.linear; listed
        at the first step (the forms are final by then), not at every step."""
        return [
            (module, FORM_CLASSES[choice.form], choice.packs[module] if choice.form == PACKED else None)
            for choice in self.shapes
            if choice.form != LINEAR
            for module in choice.modules
        ]


_CHOSEN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def step_kernels(model: torch.nn.Module, rows: int, device: torch.device) -> StepKernels:
    """The model's StepKernels for `rows` rows, measured at first use and kept for the model's lifetime
    (packed weights cost one more copy of the linears' weights in memory)."""
    by_rows = _CHOSEN.setdefault(model, {})
    if rows not in by_rows:
        by_rows[rows] = _choose(model, rows, device)
    return by_rows[rows]


@torch.inference_mode()
def _choose(model: torch.nn.Module, rows: int, device: torch.device) -> StepKernels:
    kernels = StepKernels(rows)
    if device.type != "cpu":
        return kernels
    groups: dict[tuple, list[torch.nn.Linear]] = {}
    for module in model.modules():
        if type(module) is torch.nn.Linear:
            weight = module.weight
            groups.setdefault((tuple(weight.shape), weight.dtype, module.bias is not None), []).append(module)
    for (shape, dtype, _bias), modules in groups.items():
        kernels.shapes.append(_measure_shape(shape, dtype, modules, rows, device))
    everywhere_invariant = all(choice.row_invariant for choice in kernels.shapes)
    for choice in kernels.shapes:
        choice.form = PACKED if everywhere_invariant else min(choice.seconds, key=choice.seconds.get)
        if choice.form != PACKED:
            for module in choice.packs:
                _PACKS.pop(module, None)  # not used here: freed unless another batch's choice holds it
            choice.packs = {}
    return kernels


def _measure_shape(shape, dtype, modules, rows: int, device) -> ShapeChoice:
    """Each form's time at `rows` rows, and whether the packed form is row-invariant (form decided later)."""
    x = torch.randn(rows, shape[1], dtype=dtype, device=device)
    forms: dict[str, Callable] = {
        LINEAR: lambda m, x: F.linear(x, m.weight, m.bias),
        TRANSPOSED: TransposedLinear.forward,
    }
    invariant, packs = False, {}
    if can_pack(modules[0].weight):
        packs = {module: packed_weight(module) for module in modules}
        forms[PACKED] = lambda m, x: _packed(packs[m], m.weight, m.bias, x)
        invariant = _rows_invariant(forms[PACKED], modules[0], x)
    seconds = _best_seconds(forms, modules, x)
    return ShapeChoice(shape, modules, seconds, LINEAR, invariant, packs)


def _rows_invariant(forward, module: torch.nn.Linear, x: torch.Tensor) -> bool:
    """Whether forward gives each row the same bits at every row count from 1 to len(x)."""
    full = forward(module, x)
    return all(torch.equal(forward(module, x[:count]), full[:count]) for count in range(1, len(x)))


def _best_seconds(
    forms: dict[str, Callable], modules: list[torch.nn.Module], x: torch.Tensor
) -> dict[str, float]:
    """Each form's best time of one pass over every module of a shape: their weights together stream from
    memory as in a decode step (one module timed again and again would sit in the cache and mislead). The
    forms take turns, pass after pass, so that a moment of noise (another process, a clock change) falls on
    all of them alike rather than on whichever form was being timed then."""
    for forward in forms.values():  # warm-up
        for module in modules:
            forward(module, x)
    best = dict.fromkeys(forms, float("inf"))
    for _ in range(TIMING_REPEATS):
        for form, forward in forms.items():
            started = time.perf_counter()
            for module in modules:
                forward(module, x)
            best[form] = min(best[form], time.perf_counter() - started)
    return best
