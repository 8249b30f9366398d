"""Per-job options: the knobs of ``SubmitRequest`` beside the function and its arguments.

They live apart from ``submit(function, *args, **kwargs)`` on purpose: every
keyword of ``submit`` belongs to the job function, so an option can never
collide with a function's own parameter. Set them on a view of the executor
(``pool.with_options(priority=5).submit(...)``) or give an :class:`Options`
to the constructor. jobd checks every value (ranges, label syntax) and
refuses a bad one with :class:`~jobd.InvalidArgument` naming the field.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import duration_pb2, timestamp_pb2

Seconds = float | int | dt.timedelta
"""A duration: seconds (fractions allowed) or a ``timedelta``."""


@dataclass(frozen=True)
class Options:
    """How jobs are submitted. Every field is optional; ``None`` leaves it to jobd."""

    pool: str | None = None
    """``"async"``, ``"blocking"`` or ``"process"``: the function's own pool, or
    the process pool for an async or blocking function of jobd."""
    priority: int | None = None
    """-1000 to 1000 (default 0): a higher priority starts first within a pool."""
    labels: Mapping[str, str] = field(default_factory=dict)
    """Key/value labels stored with each job (shown by GetJob, filter ListJobs and Watch)."""
    delay: Seconds | None = None
    """Do not start a job until this long after it is accepted."""
    not_before: dt.datetime | None = None
    """Do not start a job before this (timezone-aware) time."""
    timeout: Seconds | None = None
    """Running-time limit per attempt: past it the job fails TIMED_OUT."""
    max_attempts: int | None = None
    """Attempts in all (1 to 100) for retryable failures (``jobd.Retry`` in a worker)."""
    request_id: str | None = None
    """An idempotency key for one submission (one is made up for each when none is given)."""
    worker_labels: Mapping[str, str] = field(default_factory=dict)
    """Only workers carrying all of these labels may run the job."""

    def __post_init__(self) -> None:
        # Checked here so that a wrong type fails where it was written, not
        # deep inside protobuf; ranges and syntax are jobd's to check.
        if self.pool is not None and not isinstance(self.pool, str):
            raise TypeError("pool must be a str")
        if self.priority is not None and type(self.priority) is not int:
            raise TypeError("priority must be an int")
        if self.max_attempts is not None and type(self.max_attempts) is not int:
            raise TypeError("max_attempts must be an int")
        if self.request_id is not None and not isinstance(self.request_id, str):
            raise TypeError("request_id must be a str")
        for name in ("labels", "worker_labels"):
            labels = getattr(self, name)
            if not isinstance(labels, Mapping) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in labels.items()
            ):
                raise TypeError(f"{name} must map str to str")
            object.__setattr__(self, name, dict(labels))
        for name in ("delay", "timeout"):
            value = getattr(self, name)
            if value is not None:
                _duration(value, name)
        if self.not_before is not None:
            if not isinstance(self.not_before, dt.datetime):
                raise TypeError("not_before must be a datetime")
            if self.not_before.tzinfo is None:
                raise ValueError("not_before must be timezone-aware (e.g. datetime.now(UTC))")
        if self.delay is not None and self.not_before is not None:
            raise ValueError("give delay or not_before, not both")

    def merged(self, **changes: Any) -> Options:
        """These options with ``changes`` applied; labels are merged, not replaced."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise TypeError(f"unknown option(s): {', '.join(sorted(unknown))}")
        for name in ("labels", "worker_labels"):
            if name in changes and changes[name] is not None:
                changes[name] = {**getattr(self, name), **changes[name]}
        if "delay" in changes and changes["delay"] is not None:
            changes.setdefault("not_before", None)
        if "not_before" in changes and changes["not_before"] is not None:
            changes.setdefault("delay", None)
        return dataclasses.replace(self, **changes)

    def apply_to_submit(self, request: Any) -> None:
        """Sets the fields of a ``SubmitRequest``."""
        if self.pool:
            request.pool = self.pool
        if self.priority:
            request.priority = self.priority
        if self.labels:
            request.labels.update(self.labels)
        if self.delay is not None:
            request.delay.CopyFrom(_duration(self.delay, "delay"))
        if self.not_before is not None:
            stamp = timestamp_pb2.Timestamp()
            stamp.FromDatetime(self.not_before)
            request.not_before.CopyFrom(stamp)
        if self.timeout is not None:
            request.timeout.CopyFrom(_duration(self.timeout, "timeout"))
        if self.max_attempts:
            request.max_attempts = self.max_attempts
        if self.worker_labels:
            request.worker_labels.update(self.worker_labels)

    def apply_to_map(self, start: Any) -> None:
        """Sets the fields of a ``MapStart``; refuses what Map cannot carry."""
        unsupported = [
            name
            for name, value in (
                ("delay", self.delay),
                ("not_before", self.not_before),
                ("request_id", self.request_id),
                ("worker_labels", self.worker_labels or None),
            )
            if value is not None
        ]
        if unsupported:
            raise ValueError(
                f"map cannot carry {', '.join(unsupported)} (the Map RPC has no such field); "
                "submit the jobs one by one for that"
            )
        if self.pool:
            start.pool = self.pool
        if self.priority:
            start.priority = self.priority
        if self.labels:
            start.labels.update(self.labels)
        if self.timeout is not None:
            start.timeout.CopyFrom(_duration(self.timeout, "timeout"))
        if self.max_attempts:
            start.max_attempts = self.max_attempts


def _duration(value: Seconds, name: str) -> duration_pb2.Duration:
    if isinstance(value, dt.timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    else:
        raise TypeError(f"{name} must be seconds (a number) or a timedelta")
    duration = duration_pb2.Duration()
    whole = int(seconds // 1)
    duration.seconds = whole
    duration.nanos = int(round((seconds - whole) * 1e9))
    if duration.nanos >= 1_000_000_000:
        duration.seconds += 1
        duration.nanos -= 1_000_000_000
    if whole < 0 and duration.nanos:
        # Duration's nanos carry the sign of its seconds.
        duration.seconds += 1
        duration.nanos -= 1_000_000_000
    return duration


def duration(seconds: Seconds, name: str = "timeout") -> duration_pb2.Duration:
    """A ``google.protobuf.Duration`` of ``seconds``."""
    return _duration(seconds, name)
