"""Continuous batching: the generations that share one model's SlotBatch, admitted and advanced step by step.

A worker keeps one shared Scheduler per model (and a wide one for runs that may wait, below). admit()
prefills a generation into free rows at a step boundary; step() advances every admitted generation by one
token (one forward over the batch's rows) and returns those that ended, each with its Comparison or its
error, so that one run's failure or cancellation never ends another's.

The slot shape (rows, cache length) is fixed per process: STEERLAB_SLOT_ROWS and STEERLAB_SLOT_TOKENS (the
engine's configuration, engine_config.py), or the device's defaults (engine_config.SLOT_SHAPES), chosen from
measurements (bench/steering_bench.py, bench/slots_check.py):
- CPU (2-core AMX Xeon, SmolLM2-135M fp32): where the kernels were shown row-invariant (kernels.py), a step
  runs only the occupied rows and attended positions, so free rows and positions cost nothing: 8 rows hold
  a sweep of 4 beside a comparison, or 4 comparisons. The lean step costs 33 ms at 1 row, 36 at 2, 41 at
  4, 50 at 8. Elsewhere every step runs all 8 rows.
- CUDA (H100, bf16, the lean step a CUDA graph over all rows): a bare step costs 2.4 ms at 16 rows x 1024
  positions, 2.6 at 32 x 1024 and 2.9 at 64 x 1024 (attention reads every row's whole cache: 64 x 2048
  cost 5.0 ms), so 32 x 1024: 16 comparisons share each step at about the cost of one, and a request may
  hold 1024 positions.

Runs that may wait, such as an experiment's cells (a sweep of 4 is 5 rows, so 8 rows hold one), get a batch
of their own, wide_scheduler(): WIDE_ROWS rows where steps compute only the occupied rows, so that its row
count is capacity, not cost. That is checked when the batch is built (kernels.py, slots.py), never assumed
from the CPU's name. Where it fails, every step runs all rows: more rows would slow every run in them and
change its numbers, so the wide batch keeps the shared batch's shape. Either way a run gives the same
numbers in both batches. Measured (2-core AMX Xeon, SmolLM2 fp32, packs for 24 rows), a step over 2, 4, 8,
12, 16, 20, 24 occupied rows: 38, 42, 53, 59, 64, 71, 76 ms; over 2 it costs the same in batches of 8, 12,
16 and 24 rows; 8 sweeps of 4 took 0.51 of the time of the same 8 one after another.

Interactive runs keep the shared batch (scheduler_for), which a worker steps alone while it holds runs: in
the wide batch a comparison would pay for the cells' rows (a step of 22 rows costs about twice one of 2) and
wait out the metrics of every cell ending meanwhile, about 3 times its time alone; stepped alone, it costs
what it costs alone while the cells wait.

A conversation's turn (Request.keep set) leaves its rows parked in the batch when it ends (done or stopped):
they keep the KV of the prompt's full blocks (slots.PREFILL_BLOCK), so the next turn with the same key reads
only the rest of its history and its new message, with the same bits as reading it all (slots.read_blocks).
Parked rows are given back after STEERLAB_CHAT_KEEP_SECONDS idle (checked at each admission), and at once,
oldest first, when a run needs rows that are not free. A turn whose rows were given back reads its whole history.
"""

from __future__ import annotations

import dataclasses
import time
import weakref
from dataclasses import dataclass

import torch

from steering_app import engine_config  # plain settings: the engine stays free of Django

from ..loader import LoadedModel
from ..steer import SpecError
from .generate import Comparison, Generation, Request, Stopped
from .kernels import PACK_ROWS, step_kernels
from .plan import AUTO, StepPolicy
from .slots import SlotBatch, prefix_length

WIDE_ROWS = PACK_ROWS  # wide_scheduler()'s rows where steps compute only the occupied rows (below)


def slot_shape(device: torch.device) -> tuple[int, int]:
    """(rows, cache length) for a batch on this device: the configured ones, else the device's defaults."""
    config = engine_config.current
    return engine_config.slot_shape(device.type, config.slot_rows, config.slot_tokens)


@dataclass
class Ended:
    """A generation that left the batch: its comparison, or the error that ended it (Stopped: cancelled)."""

    generation: Generation
    comparison: Comparison | None = None
    error: BaseException | None = None


@dataclass
class Kept:
    """A conversation's parked rows: the prompts they read at its last turn (their KV's source), and since when."""

    rows: list[int]
    prompts: list[list[int]]
    since: float  # time.monotonic()


class Scheduler:
    """One model's SlotBatch and the generations in it. The caller holds the model's lock around each call."""

    def __init__(self, lm: LoadedModel, rows: int, length: int, policy: StepPolicy = AUTO):
        self.lm = lm
        self.batch = SlotBatch(lm, rows, length, policy)
        self.active: list[Generation] = []
        self.kept: dict[object, Kept] = {}  # conversation key -> its parked rows, oldest first

    def room(self) -> int:
        """Rows a run may take now: the free ones and the parked ones (given back when needed)."""
        return len(self.batch.free) + sum(len(kept.rows) for kept in self.kept.values())

    def evict(self, key: object) -> bool:
        """Give the conversation's parked rows back (its next turn reads its whole history); False if none."""
        kept = self.kept.pop(key, None)
        if kept is not None:
            self.batch.give_back(kept.rows)
        return kept is not None

    def check_fits(self, request: Request) -> None:
        """SpecError when the request can never run here (more rows or positions than the batch has)."""
        batch = self.batch
        if request.rows > batch.rows:
            raise SpecError(
                "variants",
                f"{len(request.variants)} variants need {request.rows} rows; this worker's batch has "
                f"{batch.rows} (STEERLAB_SLOT_ROWS), so at most {batch.rows - 1} variants",
            )
        if request.tokens > batch.length:
            raise SpecError(
                "max_new_tokens",
                f"{len(request.prompt_ids)} prompt tokens + {request.max_new_tokens} new tokens exceed the "
                f"worker's {batch.length}-token slots (STEERLAB_SLOT_TOKENS)",
            )

    def admit(self, generation: Generation) -> bool:
        """Prefill the generation into rows: its conversation's parked rows, else free ones (giving parked rows
        back, oldest first, when too few are free); False (nothing changed) when the batch has too few."""
        request = generation.request
        self.check_fits(request)
        self._expire()
        kept = self.kept.pop(request.keep, None) if request.keep is not None else None
        if kept is not None and len(kept.rows) == request.rows:
            rows, prompts = kept.rows, kept.prompts
            self.batch.resume(rows)
        else:
            if kept is not None:
                self.batch.give_back(kept.rows)
            rows, prompts = self._take(request.rows), None
            if rows is None:
                return False
        try:
            generation.prefill(self.batch, rows, prompts)
        except BaseException:
            self.batch.give_back(rows)
            raise
        self.active.append(generation)
        return True

    def _take(self, count: int) -> list[int] | None:
        while count > len(self.batch.free) and self.kept:
            self.evict(next(iter(self.kept)))
        return self.batch.take(count)

    def _expire(self) -> None:
        limit = time.monotonic() - engine_config.current.chat_keep_seconds
        for key in [key for key, kept in self.kept.items() if kept.since <= limit]:
            self.evict(key)

    def step(self) -> list[Ended]:
        """Advance every generation by one token; returns those that ended (done, cancelled or failed).

        An error of the step itself (the forward: out of memory, say) ends every generation: their rows are
        freed and the error raised; so is an interrupt (KeyboardInterrupt) from any of them.
        """
        try:
            ended = self._advance_all()
            if self.active:
                logits = self.batch.step()
                records = self.batch.steering.records()
                for generation in self.active:
                    generation.receive(logits, records)
        except BaseException:
            for generation in list(self.active):
                self._leave(generation)
            raise
        return ended

    def _advance_all(self) -> list[Ended]:
        ended = []
        for generation in list(self.active):
            try:
                if generation.advance(self.batch):
                    ended.append(Ended(generation, comparison=generation.result()))
            except Exception as error:  # noqa: BLE001 - any error (Stopped included) ends this run only
                ended.append(Ended(generation, error=error))
        for item in ended:
            # A stopped turn's prompt was read in full: its conversation goes on from it as from a finished one.
            self._leave(item.generation, keep=item.error is None or isinstance(item.error, Stopped))
        return ended

    def _leave(self, generation: Generation, keep: bool = False) -> None:
        """The generation's rows back to the batch, or parked for its conversation's next turn."""
        self.active.remove(generation)
        request, rows = generation.request, generation.rows
        prompts = request.prompts
        reusable = [prefix_length(len(prompt)) for prompt in prompts]
        if keep and request.keep is not None and max(reusable) < self.batch.length:
            self.batch.park(rows, reusable)
            self.kept[request.keep] = Kept(rows, prompts, time.monotonic())
        else:
            self.batch.give_back(rows)

    def run_alone(self, generation: Generation) -> Comparison:
        """Admit one generation and step until it ends; its Comparison, or its error raised."""
        if not self.admit(generation):
            raise RuntimeError("the batch has too few free rows")
        while True:
            for item in self.step():
                if item.generation is generation:
                    if item.error is not None:
                        raise item.error
                    return item.comparison


def has_shared_scheduler(lm: LoadedModel) -> bool:
    """Whether the model's shared Scheduler, and so its step plan, exists in this process."""
    return lm.model in _SHARED


def scheduler_for(lm: LoadedModel, policy: StepPolicy | None = None) -> Scheduler:
    """The model's shared Scheduler (created at first use, its steps planned by `policy`, by default the
    configured one), or, while it serves other runs, a private one of the same shape and policy: the same shape
    and plan give the same numbers. The caller holds the model's lock."""
    shared = _SHARED.get(lm.model)
    if shared is None:
        shared = _SHARED[lm.model] = Scheduler(lm, *slot_shape(lm.device), policy or configured_policy())
    if not shared.active:
        return shared
    return Scheduler(lm, shared.batch.rows, shared.batch.length, shared.batch.policy)


def wide_scheduler(lm: LoadedModel, policy: StepPolicy | None = None) -> Scheduler:
    """The model's Scheduler for runs that may wait (an experiment's cells), created at first use: WIDE_ROWS
    rows where its steps, and the shared batch's (scheduler_for), compute only the occupied rows, else the
    shared batch's shape (so a run gives the same numbers in either). STEERLAB_SLOT_ROWS, when set, fixes the
    rows of both. The caller holds the model's lock.

    A worker admits interactive runs into the shared batch and the cells into this one, and each turn steps
    the shared batch if it holds runs, else this one: the cells wait (their rows are not computed) while an
    interactive run generates."""
    found = _WIDE.get(lm.model)
    if found is None:
        found = _WIDE[lm.model] = _wide(lm, policy)
    return found


def configured_policy() -> StepPolicy:
    """The step policy the deployment set (engine_config.step_policy, from STEERLAB_STEP_*)."""
    return StepPolicy(**engine_config.current.step_policy)


_SHARED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its shared Scheduler
_WIDE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its wide Scheduler


def _wide(lm: LoadedModel, policy: StepPolicy | None) -> Scheduler:
    shared = scheduler_for(lm, policy).batch
    policy = shared.policy
    widen = WIDE_ROWS > shared.rows and shared.occupied_only and engine_config.current.slot_rows is None
    # The linears' check first: where it fails, no wide cache is allocated and no probe step run.
    if widen and step_kernels(lm.model, WIDE_ROWS, lm.device).row_invariant:
        # rows="auto" for the try: the wide batch is kept only where it runs the occupied rows anyway.
        wide = Scheduler(lm, WIDE_ROWS, shared.length, dataclasses.replace(policy, rows="auto"))
        if wide.batch.occupied_only:
            return wide
    return Scheduler(lm, shared.rows, shared.length, policy)


__all__ = [
    "Ended",
    "Scheduler",
    "Stopped",
    "scheduler_for",
    "slot_shape",
    "wide_scheduler",
]
