"""jobd for Python: ``concurrent.futures`` across the network.

- :class:`Executor`: a ``concurrent.futures.Executor`` whose jobs run in jobd;
  its futures are real ``concurrent.futures.Future`` objects.
- :mod:`jobd.aio`: the same for asyncio (``jobd.aio.Client``).
- :class:`Worker`: serve job functions written in Python to jobd.
- Errors: :class:`JobdError` and its subclasses (:mod:`jobd.errors`).

The generated gRPC stubs are in :mod:`jobd.v1` for plain calls.
"""

from jobd import aio
from jobd.errors import (
    AlreadyExists,
    DeadlineExceeded,
    ErrorKind,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    JobdError,
    JobFailed,
    NotFound,
    OutOfRange,
    PermissionDenied,
    ResourceExhausted,
    Retry,
    RpcError,
    Unauthenticated,
    Unavailable,
)
from jobd.executor import Executor, JobFuture, MapIterator
from jobd.options import Options
from jobd.types import FunctionInfo, JobInfo, JobState, Progress
from jobd.worker import Context, Worker

__version__ = "0.1.0"

__all__ = [
    "AlreadyExists",
    "Context",
    "DeadlineExceeded",
    "ErrorKind",
    "Executor",
    "FailedPrecondition",
    "FieldViolation",
    "FunctionInfo",
    "InvalidArgument",
    "JobFailed",
    "JobFuture",
    "JobInfo",
    "JobState",
    "JobdError",
    "MapIterator",
    "NotFound",
    "Options",
    "OutOfRange",
    "PermissionDenied",
    "Progress",
    "ResourceExhausted",
    "Retry",
    "RpcError",
    "Unauthenticated",
    "Unavailable",
    "Worker",
    "__version__",
    "aio",
]
