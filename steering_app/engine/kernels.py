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

TIMING_REPEATS = 5


class TransposedLinear(torch.nn.Linear):
    """nn.Linear computing W @ x.T (the weights streamed once for all rows)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        y = torch.mm(self.weight, x.reshape(rows, x.shape[-1]).T).T.contiguous()
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.weight.shape[0])


def _best_seconds(function, x: torch.Tensor) -> float:
    function(x)  # warm-up
    best = float("inf")
    for _ in range(TIMING_REPEATS):
        started = time.perf_counter()
        function(x)
        best = min(best, time.perf_counter() - started)
    return best


@torch.inference_mode()
def choose_linear_forms(model: torch.nn.Module, rows: int, device: torch.device) -> dict[str, list]:
    """{"transposed": [modules], "timings": [(shape, linear_s, transposed_s)]}: the nn.Linear modules for
    which W @ x.T was faster at `rows` rows here. Nothing is timed off the CPU (a GPU keeps F.linear)."""
    linears = [module for module in model.modules() if type(module) is torch.nn.Linear]
    choice: dict[str, list] = {"transposed": [], "timings": []}
    if device.type != "cpu":
        return choice
    faster: dict[tuple, bool] = {}
    for module in linears:
        weight = module.weight
        shape = (tuple(weight.shape), weight.dtype, module.bias is not None)
        if shape not in faster:
            x = torch.randn(rows, weight.shape[1], dtype=weight.dtype, device=weight.device)
            linear_s = _best_seconds(lambda x, m=module: F.linear(x, m.weight, m.bias), x)
            transposed_s = _best_seconds(lambda x, m=module: TransposedLinear.forward(m, x), x)
            faster[shape] = transposed_s < linear_s
            choice["timings"].append((shape[0], linear_s, transposed_s))
        if faster[shape]:
            choice["transposed"].append(module)
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
