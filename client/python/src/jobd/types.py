"""Plain Python views of what jobd reports: job states, jobs, functions.

The client's public types are its own, never generated protobuf classes, so
that a change in the wire format does not ripple into user code.
"""

from __future__ import annotations

import datetime as dt
import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from jobd._values import from_value
from jobd.errors import ErrorKind, JobFailed


class JobState(enum.StrEnum):
    """Where a job is in its life (``jobd.v1.JobState``)."""

    UNSPECIFIED = "unspecified"
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def done(self) -> bool:
        """True for the three terminal states."""
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)

    @classmethod
    def from_wire(cls, number: int) -> JobState:
        """The state for a ``jobd.v1.JobState`` number."""
        return _STATES.get(number, cls.UNSPECIFIED)

    def to_wire(self) -> int:
        """The ``jobd.v1.JobState`` number."""
        return _NUMBERS[self]


_STATES = {
    0: JobState.UNSPECIFIED,
    1: JobState.PENDING,
    2: JobState.RUNNING,
    3: JobState.SUCCEEDED,
    4: JobState.FAILED,
    5: JobState.CANCELLED,
}
_NUMBERS = {state: number for number, state in _STATES.items()}

# The wire numbers of the terminal states, for hot paths.
SUCCEEDED = 3
FAILED = 4
CANCELLED = 5


@dataclass(frozen=True)
class Progress:
    """How far a running job says it is."""

    fraction: float
    message: str
    updated: dt.datetime | None


@dataclass(frozen=True)
class JobInfo:
    """Everything jobd knows about one job (``GetJob``)."""

    id: str
    function: str
    pool: str
    state: JobState
    args: Any
    labels: Mapping[str, str]
    attempt: int
    max_attempts: int
    priority: int
    submitted: dt.datetime | None
    started: dt.datetime | None
    finished: dt.datetime | None
    progress: Progress | None
    value: Any = None
    error: JobFailed | None = None
    request_id: str = ""
    worker_labels: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_wire(cls, job: Any) -> JobInfo:
        """The view of a ``jobd.v1.Job``."""
        progress = None
        if job.HasField("progress"):
            progress = Progress(
                job.progress.fraction,
                job.progress.message,
                _time(job.progress, "update_time"),
            )
        state = JobState.from_wire(job.state)
        return cls(
            id=job.id,
            function=job.function,
            pool=job.pool,
            state=state,
            args=from_value(job.args),
            labels=dict(job.labels),
            attempt=job.attempt,
            max_attempts=job.max_attempts,
            priority=job.priority,
            submitted=_time(job, "submit_time"),
            started=_time(job, "start_time"),
            finished=_time(job, "finish_time"),
            progress=progress,
            value=from_value(job.value) if state is JobState.SUCCEEDED else None,
            error=(
                job_failed(job.id, job.function, job.error)
                if job.HasField("error") and state is JobState.FAILED
                else None
            ),
            request_id=job.request_id,
            worker_labels=dict(job.worker_labels),
        )


@dataclass(frozen=True)
class FunctionInfo:
    """One function jobd can run (``ListFunctions``)."""

    name: str
    pool: str
    description: str
    args_schema: Any
    """The JSON Schema its arguments must match, or ``None`` for any JSON."""
    returns: str
    workers: int
    """For functions served by remote workers: how many sessions serve it now."""

    @classmethod
    def from_wire(cls, info: Any) -> FunctionInfo:
        """The view of a ``jobd.v1.FunctionInfo``."""
        return cls(
            name=info.name,
            pool=info.pool,
            description=info.description,
            args_schema=from_value(info.args_schema) if info.HasField("args_schema") else None,
            returns=info.returns,
            workers=info.workers,
        )


def job_failed(job_id: str, function: str, error: Any) -> JobFailed:
    """The exception for a ``jobd.v1.JobError``."""
    details = {"job_id": job_id}
    if function:
        details["function"] = function
    return JobFailed(ErrorKind.from_wire(error.kind), error.message, details)


def _time(message: Any, name: str) -> dt.datetime | None:
    if not message.HasField(name):
        return None
    stamp = getattr(message, name)
    return dt.datetime.fromtimestamp(stamp.seconds + stamp.nanos / 1e9, tz=dt.UTC)
