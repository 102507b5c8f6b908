"""Bit-identical work on every machine of one CPU kind: a fresh process whose math kernels are pinned.

A float32 result depends on the order of its additions, and two libraries pick that order by the CPU
they find: MKL (every matmul) takes another code path on an AVX-512 or AMX Xeon than on an AMD EPYC,
and ATen's vectorized kernels (softmax, norms, reductions, the random normal fill) run 16-wide on an
AVX-512 CPU and 8-wide on an AVX2 one. Both read their choice from the environment once, when they
start, so the work runs in a spawned Python process started with the choice pinned:

- MKL_CBWR=COMPATIBLE: MKL's conditional numerical reproducibility with its one SSE2 code path, the only
  branch besides AUTO that MKL offers on non-Intel processors (AUTO picks a branch per CPU);
  MKL_DYNAMIC/OMP_DYNAMIC=FALSE, which MKL's reproducibility needs;
- ATEN_CPU_CAPABILITY=avx2: the AVX2 kernels, which every such CPU runs (AVX-512 ones are left unused);
- REPRODUCIBLE_THREADS threads: how a reduction is split between threads changes its bits too.

The bits are then the same from run to run and whatever the parent's settings, but an Intel Xeon with AMX
and an AMD EPYC still write different ones (steering_app/demo/README.md); bench/reproducible_kernels.py
fingerprints each kernel in this process to find which.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from multiprocessing import get_context
from typing import TypeVar

from steering_app import engine_config

REPRODUCIBLE_ENV = {
    "MKL_CBWR": "COMPATIBLE",
    "MKL_DYNAMIC": "FALSE",
    "OMP_DYNAMIC": "FALSE",
    "ATEN_CPU_CAPABILITY": "avx2",
}
REPRODUCIBLE_THREADS = 2

T = TypeVar("T")


def _start(settings: dict) -> None:
    """The spawned process: the parent's engine settings (data dir, device, ...) and the pinned threads."""
    import torch

    engine_config.configure(**settings)
    torch.set_num_threads(REPRODUCIBLE_THREADS)


def run_reproducibly(function: Callable[..., T], /, *args, **kwargs) -> T:
    """function(*args, **kwargs) in a spawned process with CPU-independent kernels; its result or its error.

    function and its arguments cross the process boundary: a module-level function, picklable values.
    """
    saved = {name: os.environ.get(name) for name in REPRODUCIBLE_ENV}
    os.environ.update(REPRODUCIBLE_ENV)
    try:
        pool = ProcessPoolExecutor(
            1, mp_context=get_context("spawn"), initializer=_start, initargs=(asdict(engine_config.current),)
        )
        # The worker starts here and copies the environment as it is now.
        future = pool.submit(function, *args, **kwargs)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    with pool:
        return future.result()
