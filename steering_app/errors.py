"""The domain's errors: what went wrong and which input is at fault.

They know nothing of HTTP. The API maps each kind to a status code in one place
(steerproject/api.py, STATUS_CODES); the pages turn them into form errors, 404 or 403.
"""

OOM_MESSAGE = "Out of memory during generation. Try reducing max_tokens or using fewer intervention layers."


class SteeringError(Exception):
    """A request that cannot be served; `field` names the input at fault, when there is one."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.message = message
        self.field = field


class InvalidInput(SteeringError):
    """The request breaks a rule: the caller must change it."""


class NotFound(SteeringError):
    """The request names something that does not exist, or that the caller may not see."""


class Forbidden(SteeringError):
    """The caller may see it but not change it (only the owner or staff may)."""


class Conflict(SteeringError):
    """It exists but its state does not allow this (a training that has not completed, a finished run)."""


class WorkerUnavailable(SteeringError):
    """No steering worker took the run; the run is failed with this message."""


class TooManyRuns(SteeringError):
    """The member already has as many runs queued as one member may; retry once one has started."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message, "runs")
        self.retry_after = retry_after


def failure_reason(error: Exception) -> str:
    """The reason a failed run or analysis job stores: out of memory in the words users act on, else the
    error's type and message."""
    if is_out_of_memory(error):
        return OOM_MESSAGE
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def is_out_of_memory(error: Exception) -> bool:
    import torch

    return isinstance(error, torch.OutOfMemoryError | MemoryError)
