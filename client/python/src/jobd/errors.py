"""The exceptions jobd's Python client raises, and how gRPC statuses become them.

Two families, kept apart as jobd's wire contract keeps them apart:

- A job that failed is data, not a transport error: its future's ``result()``
  raises :class:`JobFailed` (or ``concurrent.futures.CancelledError`` for a
  cancelled job), carrying the error kind and message the job ended with.
- A request that failed (unknown function, bad arguments, server gone) raises
  an :class:`RpcError` subclass named after its gRPC status code. Each also
  derives from the built-in exception a Python user would reach for first
  (``ValueError`` for a bad argument, ``LookupError`` for an unknown job,
  ``ConnectionError`` for an unreachable server, ``TimeoutError`` for a
  deadline), so ``except ValueError`` works without knowing gRPC.

Everything derives from :class:`JobdError`.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import grpc

__all__ = [
    "AlreadyExists",
    "DeadlineExceeded",
    "ErrorKind",
    "FailedPrecondition",
    "FieldViolation",
    "InvalidArgument",
    "JobFailed",
    "JobdError",
    "NotFound",
    "OutOfRange",
    "PermissionDenied",
    "ResourceExhausted",
    "Retry",
    "RpcError",
    "Unauthenticated",
    "Unavailable",
]


class JobdError(Exception):
    """The base of every exception this package raises about jobd."""


class ErrorKind(enum.StrEnum):
    """Why a job did not produce a value (``jobd.v1.ErrorKind``)."""

    UNSPECIFIED = "unspecified"
    FAILED = "failed"
    """The function raised (or returned) an error."""
    PANICKED = "panicked"
    """The function panicked (Rust) or raised something other than an Exception."""
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"
    """The server stopped while the job ran."""
    TIMED_OUT = "timed_out"
    """The job ran past the ``timeout`` it was submitted with."""
    RESULT_TOO_LARGE = "result_too_large"
    WORKER_LOST = "worker_lost"
    """The worker running it vanished and the job may not run again."""

    @classmethod
    def from_wire(cls, number: int) -> ErrorKind:
        """The kind for a ``jobd.v1.ErrorKind`` number (unknown ones are UNSPECIFIED)."""
        return _KINDS.get(number, cls.UNSPECIFIED)


_KINDS = {
    0: ErrorKind.UNSPECIFIED,
    1: ErrorKind.FAILED,
    2: ErrorKind.PANICKED,
    3: ErrorKind.CANCELLED,
    4: ErrorKind.INTERRUPTED,
    5: ErrorKind.TIMED_OUT,
    6: ErrorKind.RESULT_TOO_LARGE,
    7: ErrorKind.WORKER_LOST,
}


_PHRASES = {
    ErrorKind.PANICKED: "panicked",
    ErrorKind.INTERRUPTED: "was interrupted",
    ErrorKind.TIMED_OUT: "timed out",
    ErrorKind.RESULT_TOO_LARGE: "returned too large a result",
    ErrorKind.WORKER_LOST: "lost its worker",
}


class JobFailed(JobdError):
    """The job ended FAILED: raised by ``result()`` and returned by ``exception()``.

    ``kind`` says why (an :class:`ErrorKind`), ``message`` is the function's
    own message, and ``details`` holds what else is known (``job_id``,
    ``function``), read-only.
    """

    def __init__(self, kind: ErrorKind, message: str, details: Mapping[str, Any] | None = None):
        self.kind = kind
        self.message = message
        self.details: Mapping[str, Any] = MappingProxyType(dict(details or {}))
        super().__init__(kind, message, self.details)

    @property
    def job_id(self) -> str | None:
        """The failed job's id, when known."""
        job_id = self.details.get("job_id")
        return job_id if isinstance(job_id, str) else None

    def __str__(self) -> str:
        who = f"job {self.job_id}" if self.job_id else "the job"
        return f"{who} {_PHRASES.get(self.kind, 'failed')}: {self.message}"

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.kind, self.message, dict(self.details)))


@dataclass(frozen=True)
class FieldViolation:
    """One refused request field (``google.rpc.BadRequest.FieldViolation``).

    ``field`` names a request field (``"labels"``) or a spot in the job's
    arguments (``"args"``, ``"args.name"``, ``"args[1]"``).
    """

    field: str
    description: str

    def __str__(self) -> str:
        return f"{self.field}: {self.description}"


class RpcError(JobdError):
    """jobd (or the connection to it) refused a request.

    ``code`` is the gRPC status code, ``message`` the server's message, and
    ``field_violations`` the decoded ``google.rpc.BadRequest`` detail (empty
    when the status carried none).
    """

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode | None = None,
        field_violations: tuple[FieldViolation, ...] = (),
    ):
        if code is not None:
            self.code = code
        self.message = message
        self.field_violations = tuple(field_violations)
        super().__init__(message)

    def __str__(self) -> str:
        text = f"{self.code.name.lower()}: {self.message}"
        if self.field_violations and not all(str(v) in self.message for v in self.field_violations):
            text += " (" + "; ".join(str(v) for v in self.field_violations) + ")"
        return text

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_rpc_error, (type(self), self.message, self.code, self.field_violations))


def _rebuild_rpc_error(
    cls: type[RpcError], message: str, code: grpc.StatusCode, violations: tuple[FieldViolation, ...]
) -> RpcError:
    return cls(message, code=code, field_violations=violations)


class InvalidArgument(RpcError, ValueError):
    """A malformed request, or arguments that do not match the function's schema.

    ``field_violations`` lists every problem, one per field.
    """

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(RpcError, LookupError):
    """An unknown function, or a job id jobd does not know (or deleted, or expired)."""

    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(RpcError):
    """A request id reused with a different function or arguments."""

    code = grpc.StatusCode.ALREADY_EXISTS


class ResourceExhausted(RpcError):
    """jobd is at a limit (queue full, too many calls or watchers): back off and retry."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(RpcError):
    """The request does not fit the job's (or the server's) state."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class OutOfRange(RpcError):
    """A request over jobd's message size limit, or a watch resumed past its newest event."""

    code = grpc.StatusCode.OUT_OF_RANGE


class Unauthenticated(RpcError):
    """No bearer token, or a wrong one, for a server that requires tokens."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(RpcError):
    """The token may not do this (a read-only token changing something, a
    client token attaching a worker, a worker token submitting)."""

    code = grpc.StatusCode.PERMISSION_DENIED


class Unavailable(RpcError, ConnectionError):
    """jobd cannot be reached, or is shutting down."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(RpcError, TimeoutError):
    """A call's deadline passed before jobd answered."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Retry(Exception):
    """Raised by a worker function: this attempt failed, but another may succeed.

    The job runs again after jobd's backoff while it has attempts left (the
    ``max_attempts`` it was submitted with), else it fails with this message.
    Not a :class:`JobdError`: it is something user code raises, not
    something jobd raises at it.
    """

    def __init__(self, message: str = "retry requested"):
        self.message = message
        super().__init__(message)


_BY_CODE: dict[grpc.StatusCode, type[RpcError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        ResourceExhausted,
        FailedPrecondition,
        OutOfRange,
        Unauthenticated,
        PermissionDenied,
        Unavailable,
        DeadlineExceeded,
    )
}

_DETAILS_KEY = "grpc-status-details-bin"


def error_for(
    code: grpc.StatusCode, message: str, field_violations: tuple[FieldViolation, ...] = ()
) -> RpcError:
    """The exception for a status code."""
    cls = _BY_CODE.get(code, RpcError)
    return cls(message, code=code, field_violations=field_violations)


def decode_field_violations(trailing_metadata: Any) -> tuple[FieldViolation, ...]:
    """The ``google.rpc.BadRequest`` field violations of a status, if it has any.

    Read from the ``grpc-status-details-bin`` trailer (a ``google.rpc.Status``)
    directly, so that it works alike for the sync and asyncio APIs.
    """
    if not trailing_metadata:
        return ()
    raw = None
    for key, value in trailing_metadata:
        if key == _DETAILS_KEY:
            raw = value
            break
    if not isinstance(raw, bytes | bytearray):
        return ()
    from google.rpc import error_details_pb2, status_pb2

    status = status_pb2.Status()
    try:
        status.ParseFromString(bytes(raw))
    except Exception:  # a malformed detail must not hide the status itself
        return ()
    violations: list[FieldViolation] = []
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations.extend(FieldViolation(v.field, v.description) for v in bad.field_violations)
    return tuple(violations)


def from_grpc(err: grpc.RpcError) -> RpcError:
    """The jobd exception for a failed gRPC call (sync or asyncio)."""
    code = _call(err, "code") or grpc.StatusCode.UNKNOWN
    message = _call(err, "details") or ""
    if not isinstance(code, grpc.StatusCode):
        code = grpc.StatusCode.UNKNOWN
    violations = decode_field_violations(_call(err, "trailing_metadata"))
    return error_for(code, str(message), violations)


def _call(err: grpc.RpcError, method: str) -> Any:
    fn = getattr(err, method, None)
    if fn is None:
        return None
    try:
        return fn()
    except Exception:
        return None


def from_batch_item(code: int, message: str, violations: Any) -> RpcError:
    """The exception for a refused item of SubmitBatch or Map (a ``BatchItemError``)."""
    status = _STATUS_BY_NUMBER.get(code, grpc.StatusCode.UNKNOWN)
    return error_for(
        status, message, tuple(FieldViolation(v.field, v.description) for v in violations)
    )


_STATUS_BY_NUMBER = {status.value[0]: status for status in grpc.StatusCode}
