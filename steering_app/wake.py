"""How "work is waiting" reaches a worker, for the modules that queue work: runs, analysis, experiments and vector
jobs; and the name a worker process goes by in what it claims.

The transport is worker.submit (inline, an embedded task or a channel message). The worker is an entry layer
above those modules (it calls runs.process_queued), so they cannot import it: SteeringAppConfig.ready() installs
worker.submit here once, at start-up, and they call workers().
"""

import os
import socket
from collections.abc import Callable

Submit = Callable[[int | None], None]
submit: Submit | None = None


def install(transport: Submit) -> None:
    global submit
    submit = transport


def workers(run_id: int | None = None) -> None:
    """Tell a worker that work is waiting: run `run_id`, or an analysis job or experiment cells (None)."""
    if submit is None:
        raise RuntimeError("no worker transport installed (SteeringAppConfig.ready installs worker.submit)")
    submit(run_id)


def worker_name() -> str:
    """host:pid of this process: which worker claimed a run or a vector job (the run page shows it, and scale-out
    tests check that work was shared), and the name its heartbeat goes by."""
    return f"{socket.gethostname()}:{os.getpid()}"
