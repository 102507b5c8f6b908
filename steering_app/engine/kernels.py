"""Which matmul form each linear layer uses in a slot step, chosen by timing both on the machine itself.

On a CPU, a linear over a few rows can run as F.linear's x @ W.T or as W @ x.T, and which is faster
depends on the CPU: on a Xeon with AMX, F.linear at 2 rows costs what 1 row does and W @ x.T three times
that; on another CPU of the same machine kind it was the other way round. So the choice is never made
by CPU name: each distinct weight shape is timed in both forms at the batch's row count when the batch is
built (a few milliseconds per shape), and the faster form is used. Both forms compute each row from its
own input only, at a fixed shape, so either keeps a row's numbers independent of the other rows.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

TIMING_REPEATS = 3


class TransposedLinear(torch.nn.Linear):
    """nn.Linear computing W @ x.T (the weights streamed once for all rows)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        y = torch.mm(self.weight, x.reshape(rows, x.shape[-1]).T).T.contiguous()
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.weight.shape[0])


def _best_seconds(forward, modules: list[torch.nn.Module], x: torch.Tensor) -> float:
    """Best time of one pass over every module of a shape: their weights together stream from memory as in
    a decode step (one module timed again and again would sit in the cache and mislead)."""
    for module in modules:  # warm-up
        forward(module, x)
    best = float("inf")
    for _ in range(TIMING_REPEATS):
        started = time.perf_counter()
        for module in modules:
            forward(module, x)
        best = min(best, time.perf_counter() - started)
    return best


def _linear(module: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, module.weight, module.bias)


@torch.inference_mode()
def choose_linear_forms(model: torch.nn.Module, rows: int, device: torch.device) -> dict[str, list]:
    """{"transposed": [modules], "timings": [(shape, linear_s, transposed_s)]}: the nn.Linear modules for
    which W @ x.T was faster at `rows` rows here (times per pass over all modules of the shape). Nothing is
    timed off the CPU (a GPU keeps F.linear)."""
    choice: dict[str, list] = {"transposed": [], "timings": []}
    if device.type != "cpu":
        return choice
    groups: dict[tuple, list[torch.nn.Module]] = {}
    for module in model.modules():
        if type(module) is torch.nn.Linear:
            weight = module.weight
            groups.setdefault((tuple(weight.shape), weight.dtype, module.bias is not None), []).append(module)
    for (shape, dtype, _bias), modules in groups.items():
        x = torch.randn(rows, shape[1], dtype=dtype, device=device)
        linear_s = _best_seconds(_linear, modules, x)
        transposed_s = _best_seconds(TransposedLinear.forward, modules, x)
        choice["timings"].append((shape, linear_s, transposed_s))
        if transposed_s < linear_s:
            choice["transposed"].extend(modules)
    logger.info(
        "Linear forms at %d rows: %s",
        rows,
        ", ".join(
            f"{out}x{inp} {'W@x.T' if t < lin else 'F.linear'} ({lin * 1e3:.2f} vs {t * 1e3:.2f} ms)"
            for (out, inp), lin, t in choice["timings"]
        ),
    )
    return choice


@contextmanager
def transposed_linears(modules: list[torch.nn.Module]) -> Iterator[None]:
    """The given modules compute as TransposedLinear for one call (under the model's lock), then back, so
    every other use of the shared model keeps nn.Linear."""
    for module in modules:
        module.__class__ = TransposedLinear
    try:
        yield
    finally:
        for module in modules:
            module.__class__ = torch.nn.Linear
