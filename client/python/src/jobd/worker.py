"""``jobd.Worker``: serve job functions written in Python to jobd.

::

    worker = jobd.Worker("http://127.0.0.1:50051", slots=8)

    @worker.function(schema={"type": "string"})
    def shout(text):
        return text.upper()

    @worker.function()
    async def fetch(url: str, ctx: jobd.Context) -> int:
        ctx.progress(1, 2, "fetching")
        ctx.log(f"fetching {url}")                  # a line of the job's log
        logging.getLogger("app").warning("slow")    # so is this one
        ...

    worker.run()      # until SIGTERM (or SIGINT): then it drains

A worker holds one ``WorkerService.Session`` stream to jobd and speaks the
protocol of ``proto/jobd/v1/worker.proto`` (read its rules there):

- it attaches with its functions and their JSON Schemas (from the signature,
  or given), and ``slots``: jobd never assigns it more jobs than that;
- it sends a heartbeat whenever it has said nothing for the interval jobd
  gave in ``Attached``;
- every report carries the fencing token of its assignment, and is kept
  (and sent again after a reconnect) until jobd acknowledges it; after a
  reconnect the jobs still running here are re-attached (``Attach.running``);
- a pushed cancel is acknowledged at once and honoured: an async function is
  cancelled (``CancelledError`` at its next ``await``); a sync one, which runs
  on the worker's threads, sees ``ctx.cancelled`` become True;
- ``raise jobd.Retry(...)`` asks for another attempt;
- what a job logs (:meth:`Context.log`, :meth:`Context.log_output`, and by
  default the records of Python's ``logging`` emitted while it runs) goes to
  the job's log (``jobctl logs``, ``JobService.Logs``), in order, and all of
  it before the job's report: a job's log is complete when it ends;
- on SIGTERM (or :meth:`Worker.stop`) it drains: it takes nothing new,
  lets running jobs finish within ``grace``, gives back what cannot, and
  returns once every report is acknowledged.

It reconnects by itself (100 ms doubling to 5 s, with jitter) whenever the
stream breaks or jobd restarts, and stops with an error only when jobd
refuses it (a bad declaration, a missing or wrong token).
"""

from __future__ import annotations

import asyncio
import collections
import collections.abc
import concurrent.futures
import contextvars
import datetime as dt
import inspect
import logging
import os
import queue
import random
import re
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar, overload

import grpc
import grpc.aio

from jobd import errors
from jobd._connect import Connection, PemSource, aio_eof, worker_service
from jobd._signature import Binding, JsonSchema, bind
from jobd._values import from_value, to_value

__all__ = ["Context", "Worker"]

_EOF = aio_eof()
"""What ``read()`` returns on a stream that ended."""

log = logging.getLogger("jobd.worker")

F = TypeVar("F", bound=Callable[..., Any])

ATTACH_TIMEOUT = 30.0
"""How long jobd gets to answer ``attach``."""

CLOSE_WAIT = 5.0
"""How long a worker that closed its side waits for jobd to end the session,
so that its last messages (give-backs, reports) are read before it goes."""

FIRST_RECONNECT = 0.1
MAX_RECONNECT = 5.0

DEFAULT_MAX_RESULT_BYTES = 1024 * 1024
"""jobd's own default cap on a result; a larger one is reported as a failure
here, rather than sent and refused."""

_FATAL = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.OUT_OF_RANGE,
    }
)
"""Statuses ending a session that mean jobd refused this worker: attaching
again would be refused again, so :meth:`Worker.run` raises instead."""

_DERIVE: Any = object()

# WorkerFailure.Kind numbers.
_FAILED, _RETRYABLE, _CANCELLED, _PANICKED = 1, 2, 3, 4

# LogStream numbers.
_STDOUT, _STDERR, _LOG = 1, 2, 3
_STREAMS = {"stdout": _STDOUT, "stderr": _STDERR, "log": _LOG}

MAX_PENDING_LOG = 256 * 1024
"""Bytes of log lines one job may have waiting to be sent (while the worker
reconnects, or a job logs faster than the connection takes); past it lines
are dropped, and counted in the log (as the Rust SDK does)."""


def _pb() -> Any:
    from jobd.v1 import worker_pb2

    return worker_pb2


_EVENT_LOCK = threading.Lock()


class Context:
    """What a running job knows about itself, and how it talks back.

    Given to a worker function that has a parameter named ``ctx`` (or one
    annotated ``jobd.Context``). Safe to use from the function's thread.
    """

    def __init__(
        self,
        runner: _Runner,
        job_id: str,
        token: int,
        function: str,
        attempt: int,
        max_attempts: int,
        deadline: dt.datetime | None,
    ) -> None:
        self._runner = runner
        self._token = token
        # The cancel flag; the Event that sleep() waits on is made only when
        # a function sleeps (most never do, and an Event costs a lock).
        self._cancelled = False
        self._event: threading.Event | None = None
        self.job_id = job_id
        """The job's id."""
        self.function = function
        """The function's name."""
        self.attempt = attempt
        """Which attempt this is, from 1."""
        self.max_attempts = max_attempts
        """The attempts the job may make in all."""
        self.deadline = deadline
        """When jobd fails the job as timed out (and cancels it here), if it has a timeout."""

    @property
    def cancelled(self) -> bool:
        """True once jobd asked to stop this job (cancelled, timed out, or lost here)."""
        return self._cancelled

    @property
    def last_attempt(self) -> bool:
        """True when a ``jobd.Retry`` now would not be retried."""
        return self.attempt >= max(self.max_attempts, 1)

    def remaining(self) -> float | None:
        """Seconds until the deadline (negative once past), or None without one."""
        if self.deadline is None:
            return None
        return (self.deadline - dt.datetime.now(dt.UTC)).total_seconds()

    def raise_if_cancelled(self) -> None:
        """Raises ``concurrent.futures.CancelledError`` once the job was asked to stop."""
        if self._cancelled:
            raise concurrent.futures.CancelledError(f"job {self.job_id} was cancelled")

    def sleep(self, seconds: float) -> bool:
        """Sleeps (in a sync function) unless cancelled first; True if it was cancelled."""
        with _EVENT_LOCK:
            if self._event is None:
                self._event = threading.Event()
                if self._cancelled:
                    self._event.set()
            event = self._event
        return event.wait(seconds)

    def _cancel(self) -> None:
        with _EVENT_LOCK:
            self._cancelled = True
            if self._event is not None:
                self._event.set()

    def progress(self, done: float, total: float | None = None, message: str = "") -> None:
        """Reports how far the job is: ``progress(0.5)``, ``progress(3, 10, "step 3")``.

        Reports are coalesced: the latest one is sent as soon as the
        connection allows (jobd coalesces further, to one per 100 ms).
        """
        if total is not None:
            fraction = done / total if total else 1.0
        else:
            fraction = float(done)
        self._runner.post_progress(self.job_id, self._token, fraction, str(message))

    def log(self, message: str) -> None:
        """Adds a line to the job's log (stream LOG), which ``jobctl logs``
        and ``JobService.Logs`` show; a newline is added unless it ends with one.

        Safe from any thread and from async functions; it never blocks.
        Lines are sent to jobd in order and all before the job's report (so
        a line logged just before returning is in the log when the result
        is seen), tagged with this attempt's fencing token: jobd drops lines
        of an attempt that is no longer current. Bounded, as in the Rust
        SDK: at most 256 KiB per job wait to be sent (``MAX_PENDING_LOG``);
        a job that logs faster than they can be sent loses lines rather than
        slowing down, and its log then says how many (``[worker: N log lines
        dropped: ...]``). Lines of a job that ends while the worker is
        disconnected are lost (jobd would refuse them).
        """
        data = str(message).encode("utf-8", "replace")
        if not data.endswith(b"\n"):
            data += b"\n"
        self._runner.post_log(self.job_id, self._token, _LOG, data)

    def log_output(self, stream: str, data: bytes | bytearray | memoryview | str) -> None:
        """Adds what a program the job runs wrote to the job's log, as it is:
        ``stream`` is ``"stdout"`` or ``"stderr"`` (or ``"log"``); bytes are
        kept as they are (output that is not UTF-8 survives), a ``str`` is
        written as UTF-8; no newline is added. Sent and bounded as :meth:`log`.
        """
        number = _STREAMS.get(stream.lower()) if isinstance(stream, str) else None
        if number is None:
            raise ValueError(f'stream must be "stdout" or "stderr", not {stream!r}')
        raw = data.encode("utf-8", "replace") if isinstance(data, str) else bytes(data)
        if raw:
            self._runner.post_log(self.job_id, self._token, number, raw)

    def __repr__(self) -> str:
        return f"<jobd.Context {self.function} {self.job_id} attempt {self.attempt}>"


_JOB: contextvars.ContextVar[Context | None] = contextvars.ContextVar("jobd_job", default=None)
"""The job whose function runs in this context: set on the worker thread for
the call of a sync function, and in the task's context of an async one (so
tasks it starts inherit it)."""


class _JobLogHandler(logging.Handler):
    """On the root logger while a worker with ``capture_logging`` runs: a
    record emitted in a job's context becomes a line of that job's log."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            ctx = _JOB.get()
            if ctx is not None and ctx._runner.worker.capture_logging:
                ctx.log(self.format(record))
            last_resort = logging.lastResort
            if (
                last_resort is not None
                and record.levelno >= last_resort.level
                and self._alone(record)
            ):
                # Without this handler the record would have met no handler
                # and Python would have printed it (lastResort): so it is.
                last_resort.handle(record)
        except Exception:
            self.handleError(record)

    def _alone(self, record: logging.LogRecord) -> bool:
        """Whether this is the only handler the record meets on its way up."""
        node: Any
        if record.name == logging.root.name:
            node = logging.root
        else:
            node = logging.Logger.manager.loggerDict.get(record.name)
            if not isinstance(node, logging.Logger):
                return False  # not a logger of the tree: do not guess
        while node is not None:
            if any(handler is not self for handler in node.handlers):
                return False
            node = node.parent if node.propagate else None
        return True


_CAPTURE_LOCK = threading.Lock()
_capture_users = 0
_capture_handler: _JobLogHandler | None = None


def _start_capture() -> None:
    global _capture_users, _capture_handler
    with _CAPTURE_LOCK:
        _capture_users += 1
        if _capture_handler is None:
            _capture_handler = _JobLogHandler()
            logging.getLogger().addHandler(_capture_handler)


def _stop_capture() -> None:
    global _capture_users, _capture_handler
    with _CAPTURE_LOCK:
        _capture_users -= 1
        if _capture_users == 0 and _capture_handler is not None:
            logging.getLogger().removeHandler(_capture_handler)
            _capture_handler = None


@dataclass(frozen=True)
class _Function:
    name: str
    fn: Callable[..., Any]
    binding: Binding
    is_async: bool
    schema: JsonSchema | None
    description: str
    returns: str
    not_safe_to_retry: bool


_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")


class Worker:
    """A process serving job functions to jobd.

    ``slots``: jobs run at once (async functions as tasks on the worker's
    event loop, sync ones on ``threads`` threads, by default ``slots``).
    ``name`` (shown by ``jobctl workers``; by default host-pid),
    ``labels`` (a job submitted with ``worker_labels`` only goes to workers
    carrying them), ``grace`` (seconds a drain lets running jobs finish),
    ``max_result_bytes`` (a larger result is reported as a failure). The
    connection settings are as :class:`jobd.Executor`'s; a worker needs a
    token with the ``worker`` capability on a server that requires tokens.

    ``capture_logging`` (on by default): while the worker runs, a handler on
    the root logger sends the records of Python's ``logging`` emitted inside
    a job (on the thread of a sync function, during its call; in the context
    of an async one, which the tasks it starts inherit) at INFO and above to
    that job's log, as ``LEVEL name: message`` lines (with the traceback of
    ``exc_info``), on top of whatever the application's own handlers do with
    them. The loggers' levels still decide what is emitted: with logging left
    unconfigured the root logger passes WARNING and above only, so set a
    level (``logging.getLogger("app").setLevel(logging.INFO)``, or
    ``basicConfig(level=logging.INFO)``) to have INFO records too. Records
    from threads a job starts itself are not captured (use
    :meth:`Context.log`). The handler is removed when :meth:`run` returns;
    while it is there, a record that meets no other handler is printed as
    Python prints it without any (``logging.lastResort``). Call
    ``logging.basicConfig`` before :meth:`run`: it does nothing once the root
    logger has a handler (unless ``force=True``).
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        slots: int = 8,
        name: str | None = None,
        labels: Mapping[str, str] | None = None,
        grace: float = 30.0,
        threads: int | None = None,
        max_result_bytes: int = DEFAULT_MAX_RESULT_BYTES,
        version: str | None = None,
        capture_logging: bool = True,
        token: str | None = None,
        token_file: str | None = None,
        ca_cert: PemSource | None = None,
        client_cert: PemSource | None = None,
        client_key: PemSource | None = None,
    ) -> None:
        if not 1 <= slots <= 10_000:
            raise ValueError("slots must be 1 to 10,000")
        if grace < 0:
            raise ValueError("grace must not be negative")
        self.connection = Connection.resolve(
            address,
            token=token,
            token_file=token_file,
            ca_cert=ca_cert,
            client_cert=client_cert,
            client_key=client_key,
        )
        self.slots = slots
        self.name = name or _default_name()
        if not _NAME.match(self.name):
            raise ValueError("name must be 1-128 characters of [A-Za-z0-9_.:-]")
        self.labels = dict(labels or {})
        self.grace = grace
        self.threads = threads or slots
        self.max_result_bytes = max_result_bytes
        self.capture_logging = capture_logging
        """Whether ``logging`` records emitted inside a job go to its log."""
        from jobd import __version__

        self.version = version or (
            f"jobd-python/{__version__} (Python {sys.version_info.major}.{sys.version_info.minor})"
        )
        self.instance = str(uuid.uuid4())
        """This process, for jobd: the same across reconnects."""
        self._functions: dict[str, _Function] = {}
        self._attached = threading.Event()
        self._sessions = 0
        self._sessions_changed = threading.Condition()
        self._runner: _Runner | None = None
        self._stop_requests = 0
        self._lock = threading.Lock()

    # -- declaring functions ---------------------------------------------------

    @overload
    def function(self, fn: F, /) -> F: ...

    @overload
    def function(
        self,
        name: str | None = None,
        *,
        schema: JsonSchema | None = ...,
        description: str | None = None,
        returns: str | None = None,
        not_safe_to_retry: bool = False,
    ) -> Callable[[F], F]: ...

    def function(
        self,
        name: Any = None,
        *,
        schema: Any = _DERIVE,
        description: str | None = None,
        returns: str | None = None,
        not_safe_to_retry: bool = False,
    ) -> Any:
        """Declares a function this worker serves (a decorator).

        ``name`` defaults to the function's own name. ``schema`` is the JSON
        Schema its argument must match: derived from the signature by
        default, given explicitly, or ``None`` for any JSON.
        ``description`` defaults to the docstring's first line.
        ``not_safe_to_retry``: a run lost with its worker is not run again
        (the job fails WORKER_LOST instead). The decorated function is
        returned unchanged (so it can still be called locally) and can be
        passed to ``Executor.submit`` in place of its name.
        """
        if callable(name):
            return self.function()(name)

        def declare(fn: F) -> F:
            self.add(
                fn,
                name=name,
                schema=schema,
                description=description,
                returns=returns,
                not_safe_to_retry=not_safe_to_retry,
            )
            return fn

        return declare

    def add(
        self,
        fn: Callable[..., Any],
        *,
        name: str | None = None,
        schema: Any = _DERIVE,
        description: str | None = None,
        returns: str | None = None,
        not_safe_to_retry: bool = False,
    ) -> None:
        """Declares ``fn`` (as :meth:`function`, without the decorator)."""
        if self._runner is not None:
            raise RuntimeError("declare every function before the worker runs")
        name = name or str(getattr(fn, "__name__", ""))
        if not _NAME.match(name):
            raise ValueError(f"function name {name!r}: 1-128 characters of [A-Za-z0-9_.:-]")
        if name in self._functions:
            raise ValueError(f"function {name!r} is declared twice")
        from jobd.worker import Context as context_type

        binding = bind(fn, context_type, derive=schema is _DERIVE)
        declared = binding.schema if schema is _DERIVE else schema
        if declared is not None and not isinstance(declared, dict):
            raise TypeError("schema must be a JSON Schema (a dict), or None for any JSON")
        if declared is not None:
            to_value(declared)  # a schema must be JSON itself
        if description is None:
            doc = inspect.getdoc(fn) or ""
            description = doc.strip().splitlines()[0] if doc.strip() else ""
        if returns is None:
            annotation = inspect.signature(fn).return_annotation
            returns = "" if annotation is inspect.Signature.empty else _describe(annotation)
        target = fn
        # A callable object whose __call__ is a coroutine function is async too.
        call_method = vars(type(fn)).get("__call__")
        is_async = inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(call_method)
        self._functions[name] = _Function(
            name=name,
            fn=target,
            binding=binding,
            is_async=is_async,
            schema=declared,
            description=description[:1024],
            returns=returns[:1024],
            not_safe_to_retry=not_safe_to_retry,
        )
        try:
            fn.__jobd_name__ = name  # type: ignore[attr-defined]
        except (AttributeError, TypeError):
            pass

    @property
    def functions(self) -> list[str]:
        """The names of the declared functions."""
        return sorted(self._functions)

    def schema(self, name: str) -> JsonSchema | None:
        """The JSON Schema declared for function ``name``."""
        return self._functions[name].schema

    # -- running ------------------------------------------------------------------

    def run(self, *, handle_signals: bool = True) -> None:
        """Serves until stopped (SIGTERM, SIGINT, or :meth:`stop`), then drains.

        Runs its own event loop (``asyncio.run``). With ``handle_signals``
        (and in the main thread) the first SIGTERM or SIGINT starts the
        drain and a second one ends its grace at once. Raises a
        :class:`~jobd.RpcError` when jobd refuses the worker.
        """
        asyncio.run(self.serve(handle_signals=handle_signals))

    async def serve(self, *, handle_signals: bool = False) -> None:
        """:meth:`run` on the running event loop."""
        if not self._functions:
            raise RuntimeError("declare at least one function before running the worker")
        loop = asyncio.get_running_loop()
        runner = _Runner(self, loop)
        with self._lock:
            if self._runner is not None:
                raise RuntimeError("this worker is already running")
            self._runner = runner
            stops = self._stop_requests
        installed: list[signal.Signals] = []
        if handle_signals and threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                try:
                    loop.add_signal_handler(signum, self.stop)
                    installed.append(signum)
                except (NotImplementedError, RuntimeError):
                    pass
        capture = self.capture_logging
        if capture:
            _start_capture()
        try:
            for _ in range(stops):
                runner.request_stop()
            await runner.run()
        finally:
            if capture:
                _stop_capture()
            for signum in installed:
                loop.remove_signal_handler(signum)
            self._attached.clear()
            runner.close()

    def stop(self) -> None:
        """Starts the drain (from any thread); a second call ends its grace at once."""
        with self._lock:
            self._stop_requests += 1
            runner = self._runner
        if runner is not None:
            runner.loop.call_soon_threadsafe(runner.request_stop)

    def wait_attached(self, timeout: float | None = None, *, count: int = 1) -> bool:
        """Waits until the worker is attached to jobd, after ``count``
        sessions in all (2: it has reconnected once); False on timeout."""
        with self._sessions_changed:
            if not self._sessions_changed.wait_for(lambda: self._sessions >= count, timeout):
                return False
        return self._attached.wait(timeout)

    @property
    def sessions(self) -> int:
        """How many sessions this worker has attached so far (reconnects count)."""
        return self._sessions

    def _on_attached(self) -> None:
        with self._sessions_changed:
            self._sessions += 1
            self._attached.set()
            self._sessions_changed.notify_all()


def _default_name() -> str:
    host = re.sub(r"[^A-Za-z0-9_.:-]", "-", socket.gethostname())[:100] or "worker"
    return f"{host}-{os.getpid()}"


def _describe(annotation: Any) -> str:
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


class _DaemonThreads:
    """A fixed set of daemon threads for sync functions.

    Not a ``ThreadPoolExecutor``: its threads are joined at interpreter exit,
    so one function that ignores its cancel would keep a stopped worker
    process from exiting.
    """

    def __init__(self, count: int) -> None:
        self._work: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._serve, name=f"jobd-worker-{n}", daemon=True)
            for n in range(count)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, work: Callable[[], None]) -> None:
        self._work.put(work)

    def _serve(self) -> None:
        while True:
            work = self._work.get()
            if work is None:
                return
            work()

    def close(self) -> None:
        for _ in self._threads:
            self._work.put(None)


@dataclass
class _PendingLog:
    """One job's log lines waiting to be sent."""

    lines: list[tuple[int, bytes]]
    size: int = 0
    dropped: int = 0


@dataclass
class _Running:
    job_id: str
    token: int
    attempt: int
    ctx: Context
    task: asyncio.Task[Any] | None = None

    def cancel(self) -> None:
        self.ctx._cancel()
        if self.task is not None:
            self.task.cancel()


class _End(Exception):
    """Why a session ended."""

    def __init__(self, kind: str, why: str = "", error: errors.RpcError | None = None) -> None:
        super().__init__(why)
        self.kind = kind  # "stopped", "drained", "broken", "fatal"
        self.why = why
        self.error = error


def _ended_by(err: grpc.aio.AioRpcError) -> _End:
    problem = errors.from_grpc(err)
    if err.code() in _FATAL:
        return _End("fatal", str(problem), problem)
    return _End("broken", f"jobd ended the session: {problem}")


class _Session:
    """One open session: its stream, and what it keeps that the next starts afresh."""

    def __init__(self, call: Any, heartbeat: float) -> None:
        self.call = call
        self.heartbeat = heartbeat
        self.jobd_draining = False
        self.owed_credit = 0
        self.outbox: collections.deque[Any] = collections.deque()
        self.last_sent = time.monotonic()


class _Runner:
    """Everything that outlives one session: running jobs, unacknowledged
    reports, the stop state. Lives on the worker's event loop."""

    def __init__(self, worker: Worker, loop: asyncio.AbstractEventLoop) -> None:
        self.worker = worker
        self.loop = loop
        self.functions = worker._functions
        self.pb = _pb()
        self.jobs: dict[str, _Running] = {}
        # Reports not yet acknowledged, by (job id, fencing token).
        self.unacked: dict[tuple[str, int], Any] = {}
        self.session: _Session | None = None
        self.wake = asyncio.Event()
        self.stop_by: float | None = None
        self.stop_timer: asyncio.TimerHandle | None = None
        self.stop_requests = 0
        self.progress_lock = threading.Lock()
        self.progress: dict[tuple[str, int], tuple[float, str]] = {}
        # Log lines waiting to be sent, by (job id, fencing token).
        self.logs_lock = threading.Lock()
        self.logs: dict[tuple[str, int], _PendingLog] = {}
        self.threads: _DaemonThreads | None = None
        self.max_unacked = max(2 * worker.slots, 64)
        self.credit_batch = max(1, min(32, worker.slots // 8))

    # -- the reconnect loop ---------------------------------------------------------

    async def run(self) -> None:
        backoff = FIRST_RECONNECT
        breaks = 0
        while True:
            if self.stopped():
                return
            try:
                await self.session_once()
            except _End as end:
                if end.kind == "stopped":
                    return
                if end.kind == "fatal":
                    assert end.error is not None
                    raise end.error from None
                if end.kind == "drained":
                    log.info("jobd drained this worker's session; reconnecting")
                    breaks = 0
                else:
                    breaks += 1
                    level = logging.WARNING if breaks == 1 else logging.DEBUG
                    log.log(level, "worker session lost (%s); reconnecting", end.why)
            else:
                backoff = FIRST_RECONNECT
            if self.stopped():
                return
            pause = backoff * (0.5 + random.random() / 2)
            backoff = min(backoff * 2, MAX_RECONNECT)
            if not await self.offline(pause):
                return

    async def offline(self, pause: float) -> bool:
        """Waits ``pause`` between sessions; False once the worker has stopped
        (nothing left to report, or the grace ended)."""
        deadline = self.loop.time() + pause
        while True:
            if self.stopped():
                return False
            if self.stop_by is not None and self.loop.time() >= self.stop_by:
                self.abandon_all("the grace ended before jobd could be reached")
                return False
            left = deadline - self.loop.time()
            if left <= 0:
                return True
            self.wake.clear()
            try:
                await asyncio.wait_for(self.wake.wait(), left)
            except TimeoutError:
                return True

    async def session_once(self) -> None:
        """Opens, serves and ends one session; raises :class:`_End`."""
        worker = self.worker
        channel = worker.connection.aio_channel()
        try:
            stub = worker_service(channel)
            call = stub.Session(metadata=worker.connection.metadata)
            try:
                await call.write(self.attach_message())
                first = await asyncio.wait_for(call.read(), ATTACH_TIMEOUT)
            except TimeoutError:
                call.cancel()
                raise _End(
                    "broken", f"jobd did not answer attach within {ATTACH_TIMEOUT:.0f}s"
                ) from None
            except grpc.aio.AioRpcError as err:
                raise _ended_by(err) from None
            except asyncio.InvalidStateError:
                raise _End("broken", "the session ended before it attached") from None
            if first is _EOF:
                raise await self.end_of(call, "jobd ended the session before it attached")
            if first.WhichOneof("kind") != "attached":
                call.cancel()
                raise _End("broken", f"jobd answered attach with {first.WhichOneof('kind')}")
            await self.serve(call, first.attached)
        finally:
            self.session = None
            worker._attached.clear()
            await channel.close(None)

    async def end_of(self, call: Any, why: str) -> _End:
        """The end of a session whose stream jobd closed."""
        try:
            code = await call.code()
        except Exception:
            return _End("broken", why)
        if code == grpc.StatusCode.OK:
            return _End("broken", why)
        details = await call.details()
        err = errors.error_for(code, details)
        if code in _FATAL:
            return _End("fatal", str(err), err)
        return _End("broken", f"{why}: {err}")

    # -- one session ------------------------------------------------------------------

    async def serve(self, call: Any, attached: Any) -> None:
        interval = attached.heartbeat_interval.ToTimedelta().total_seconds() or 5.0
        session = _Session(call, max(interval, 0.01))
        log.info("attached to jobd (session %s)", attached.session_id)
        for lease in attached.lost:
            self.lose(lease.job_id, lease.fencing_token)
        self.session = session
        if self.stop_by is not None:
            session.outbox.append(self.pb.WorkerMessage(draining=self.pb.Draining()))
        for report in self.unacked.values():
            session.outbox.append(report)
        self.worker._on_attached()
        reader = asyncio.create_task(self.read(session))
        beat = asyncio.create_task(self.heartbeats(session))
        try:
            await self.control(session, reader)
        finally:
            beat.cancel()
            if not reader.done():
                reader.cancel()
            await asyncio.gather(reader, beat, return_exceptions=True)

    async def control(self, session: _Session, reader: asyncio.Task[None]) -> None:
        """Writes what is due and ends the session when its time has come."""
        while True:
            idle = not self.jobs and not self.unacked
            if self.stop_by is not None and idle:
                await self.flush(session)
                await self.end_session(session, reader)
                raise _End("stopped")
            if session.jobd_draining and idle:
                await self.flush(session)
                await self.end_session(session, reader)
                raise _End("drained")
            if self.stop_by is not None and self.loop.time() >= self.stop_by:
                self.give_up(session)
                await self.flush(session)
                await self.end_session(session, reader)
                raise _End("stopped")
            if reader.done():
                end = reader.exception()
                if isinstance(end, _End):
                    raise end
                raise _End("broken", f"the session's reader ended: {end!r}")
            await self.flush(session)
            if (
                not session.outbox
                and not self.credit_due(session)
                and not self.progress
                and not self.logs
            ):
                self.wake.clear()
                await self.wake.wait()

    def credit_due(self, session: _Session) -> bool:
        """Whether to offer jobd the slots freed since the last credit.

        Freed slots are offered in batches (an eighth of the slots, at most
        32): each message costs the worker a write, and jobd never runs short
        meanwhile, since it still holds at least seven eighths of the slots
        less those running. While too many reports await acknowledgement the
        credit is held back, so that a jobd slow to commit slows the worker
        down instead of piling up results here.
        """
        return session.owed_credit >= self.credit_batch and len(self.unacked) < self.max_unacked

    async def flush(self, session: _Session) -> None:
        """Writes everything queued: messages, owed credit, log lines, progress."""
        pb = self.pb
        call = session.call
        try:
            while True:
                if session.outbox:
                    message = session.outbox.popleft()
                elif self.credit_due(session):
                    message = pb.WorkerMessage(credit=pb.Credit(slots=session.owed_credit))
                    session.owed_credit = 0
                elif self.logs:
                    with self.logs_lock:
                        logs, self.logs = self.logs, {}
                    for (job_id, token), pending in logs.items():
                        running = self.jobs.get(job_id)
                        # Lines of a job that has ended here would be dropped.
                        if running is not None and running.token == token:
                            session.outbox.append(self.log_message(job_id, token, pending))
                    continue
                elif self.progress:
                    with self.progress_lock:
                        notes, self.progress = self.progress, {}
                    for (job_id, token), (fraction, note) in notes.items():
                        running = self.jobs.get(job_id)
                        if running is not None and running.token == token:
                            session.outbox.append(
                                pb.WorkerMessage(
                                    progress=pb.ProgressReport(
                                        job_id=job_id,
                                        fencing_token=token,
                                        fraction=fraction,
                                        message=note.encode()[:256].decode(errors="ignore"),
                                    )
                                )
                            )
                    continue
                else:
                    return
                await call.write(message)
                session.last_sent = time.monotonic()
        except grpc.aio.AioRpcError as err:
            raise _ended_by(err) from None
        except asyncio.InvalidStateError:
            raise await self.end_of(call, "the session's stream closed") from None

    async def heartbeats(self, session: _Session) -> None:
        """Queues a heartbeat whenever the worker has said nothing for the interval."""
        while True:
            due = session.last_sent + session.heartbeat
            now = time.monotonic()
            if now >= due:
                session.outbox.append(self.pb.WorkerMessage(heartbeat=self.pb.Heartbeat()))
                session.last_sent = now  # counted from the queueing; the write follows at once
                self.wake.set()
                continue
            await asyncio.sleep(due - now)

    async def read(self, session: _Session) -> None:
        """Reads what jobd says until the stream ends; raises :class:`_End`."""
        call = session.call
        try:
            while True:
                message = await call.read()
                if message is _EOF:
                    raise await self.end_of(call, "jobd ended the session")
                self.on_message(session, message)
        except grpc.aio.AioRpcError as err:
            raise _ended_by(err) from None
        finally:
            self.wake.set()

    async def end_session(self, session: _Session, reader: asyncio.Task[None]) -> None:
        """Ends the session from this side: half-closes, then waits (bounded)
        for jobd to end it too, so that the last messages are read."""
        try:
            await session.call.done_writing()
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            return
        try:
            await asyncio.wait_for(asyncio.shield(reader), CLOSE_WAIT)
        except TimeoutError:
            log.debug("jobd did not end the session after the worker closed it")
        except BaseException:
            pass  # the reader ended the way sessions end

    # -- what jobd says ------------------------------------------------------------------

    def on_message(self, session: _Session, message: Any) -> None:
        kind = message.WhichOneof("kind")
        if kind == "assignment":
            self.assigned(session, message.assignment)
        elif kind == "ack":
            ack = message.ack
            if self.unacked.pop((ack.job_id, ack.fencing_token), None) is not None:
                if ack.result == 2:  # STALE
                    log.info(
                        "jobd refused the report of job %s as stale: %s", ack.job_id, ack.reason
                    )
            self.wake.set()
        elif kind == "cancel":
            cancel = message.cancel
            running = self.jobs.get(cancel.job_id)
            if running is not None and running.token == cancel.fencing_token:
                log.debug("jobd cancelled job %s", cancel.job_id)
                running.cancel()
            # At once, whether it still runs here or not: its report follows.
            session.outbox.append(
                self.pb.WorkerMessage(
                    cancel_ack=self.pb.CancelAck(
                        job_id=cancel.job_id, fencing_token=cancel.fencing_token
                    )
                )
            )
            self.wake.set()
        elif kind == "drain":
            log.info(
                "jobd is shutting down: finishing %d running job(s), taking no new one",
                len(self.jobs),
            )
            session.jobd_draining = True
            session.owed_credit = 0
            self.wake.set()
        elif kind == "attached":
            raise _End("broken", "jobd sent a second attached on one session")
        else:
            log.debug("ignored a message from jobd this worker does not know: %s", kind)

    def assigned(self, session: _Session, assignment: Any) -> None:
        job_id, token = assignment.job_id, assignment.fencing_token
        if self.stop_by is not None or session.jobd_draining:
            # Assigned before jobd read `draining`: it may go elsewhere at once.
            self.give_back(session, job_id, token)
            return
        running = self.jobs.get(job_id)
        if running is not None:
            if running.token == token:
                return  # a repeat
            # A newer lease on a job still running here under an older one:
            # that run's report would be refused, so stop it.
            running.cancel()
            del self.jobs[job_id]
        if len(self.jobs) >= self.worker.slots:
            log.warning("jobd assigned more jobs than this worker's slots; giving one back")
            self.give_back(session, job_id, token)
            return
        function = self.functions.get(assignment.function)
        if function is None:
            self.report(
                job_id,
                token,
                _failure(_FAILED, f"this worker does not serve {assignment.function!r}"),
                session,
            )
            return
        deadline = None
        if assignment.HasField("deadline"):
            deadline = assignment.deadline.ToDatetime(tzinfo=dt.UTC)
        ctx = Context(
            self,
            job_id,
            token,
            function.name,
            assignment.attempt,
            assignment.max_attempts,
            deadline,
        )
        running = _Running(job_id, token, assignment.attempt, ctx)
        self.jobs[job_id] = running
        value = from_value(assignment.args)
        if function.is_async:
            self.start_async(function, value, running)
        else:
            if self.threads is None:
                self.threads = _DaemonThreads(self.worker.threads)
            self.threads.submit(lambda: self.run_sync(function, value, running))

    def give_back(self, session: _Session, job_id: str, token: int) -> None:
        session.outbox.append(
            self.pb.WorkerMessage(give_back=self.pb.GiveBack(job_id=job_id, fencing_token=token))
        )
        self.wake.set()

    def lose(self, job_id: str, token: int) -> None:
        """jobd no longer holds this lease for the worker: stop the job, drop its report."""
        running = self.jobs.get(job_id)
        if running is not None and running.token == token:
            running.cancel()
            del self.jobs[job_id]
        self.unacked.pop((job_id, token), None)
        log.warning("jobd no longer holds job %s for this worker; stopped it here", job_id)

    # -- running jobs --------------------------------------------------------------

    def start_async(self, function: _Function, value: Any, running: _Running) -> None:
        """Runs an async function's first step at once, and makes a task of
        it only if it awaits something: a function that returns without
        waiting (a cache hit, a no-op) costs no task and no trip through the
        event loop. The first step runs in a copy of the context, which the
        task then keeps, as a task started the usual way would."""
        context = contextvars.copy_context()
        context.run(_JOB.set, running.ctx)
        try:
            args, kwargs = context.run(function.binding.call, value, running.ctx)
            coroutine = context.run(function.fn, *args, **kwargs)
            if not inspect.iscoroutine(coroutine):
                if inspect.isawaitable(coroutine):
                    coroutine = _await(coroutine)
                else:
                    self.finished(running, self.encode(coroutine))
                    return
        except BaseException as exc:
            self.finished(running, self.failure_of(exc, running.ctx))
            return
        try:
            first = context.run(coroutine.send, None)
        except StopIteration as stop:
            self.finished(running, self.encode(stop.value))
            return
        except BaseException as exc:
            self.finished(running, self.failure_of(exc, running.ctx))
            return
        task = self.loop.create_task(_Resumed(coroutine, first), context=context)
        running.task = task
        task.add_done_callback(lambda done: self.async_done(running, done))

    def async_done(self, running: _Running, task: asyncio.Task[Any]) -> None:
        if task.cancelled():
            outcome = _failure(_CANCELLED, "cancelled")
        else:
            exc = task.exception()
            if exc is None:
                outcome = self.encode(task.result())
            else:
                outcome = self.failure_of(exc, running.ctx)
        self.finished(running, outcome)

    def run_sync(self, function: _Function, value: Any, running: _Running) -> None:
        """Runs on a worker thread."""
        job = _JOB.set(running.ctx)
        try:
            args, kwargs = function.binding.call(value, running.ctx)
            result = function.fn(*args, **kwargs)
        except BaseException as exc:  # everything the function raises is its outcome
            raised: BaseException | None = exc
        else:
            raised = None
        finally:
            _JOB.reset(job)
        if raised is None and inspect.isawaitable(result):
            raised = TypeError(f"{function.name} returned an awaitable from a sync function")
        if raised is None:
            outcome = self.encode(result)
        else:
            outcome = self.failure_of(raised, running.ctx)
        try:
            self.loop.call_soon_threadsafe(self.finished, running, outcome)
        except RuntimeError:
            pass  # the loop is closed: the worker has stopped

    def encode(self, result: Any) -> Any:
        """The Report outcome of a returned value."""
        try:
            value = to_value(result)
        except (TypeError, ValueError) as err:
            return _failure(
                _FAILED, f"returned a value that is not JSON: {str(err).removeprefix('args')}"
            )
        size = value.ByteSize()
        if size > self.worker.max_result_bytes:
            limit = self.worker.max_result_bytes
            return _failure(
                _FAILED, f"returned {size} bytes, over the worker's max_result_bytes ({limit})"
            )
        return value

    def failure_of(self, exc: BaseException, ctx: Context) -> Any:
        """The Report outcome of what a function raised."""
        if isinstance(exc, errors.Retry):
            return _failure(_RETRYABLE, exc.message)
        if isinstance(exc, asyncio.CancelledError | concurrent.futures.CancelledError):
            return _failure(_CANCELLED, "cancelled")
        if ctx.cancelled:
            return _failure(_CANCELLED, f"cancelled ({type(exc).__name__}: {exc})")
        if isinstance(exc, Exception):
            log.info("job %s (%s) failed", ctx.job_id, ctx.function, exc_info=exc)
            text = str(exc)
            return _failure(
                _FAILED, f"{type(exc).__name__}: {text}" if text else type(exc).__name__
            )
        return _failure(_PANICKED, f"{type(exc).__name__}: {exc}")

    def finished(self, running: _Running, outcome: Any) -> None:
        """A job ended here: report it (now, or in the next session), after
        the log lines it has left to send."""
        with self.logs_lock:
            pending = self.logs.pop((running.job_id, running.token), None)
        if self.jobs.get(running.job_id) is not running:
            # Given back, lost or superseded: jobd would refuse the report.
            return
        del self.jobs[running.job_id]
        session = self.session
        if pending is not None and session is not None:
            # Lines taken earlier are already in the outbox, ahead of these.
            session.outbox.append(self.log_message(running.job_id, running.token, pending))
        self.report(running.job_id, running.token, outcome, session)

    def report(self, job_id: str, token: int, outcome: Any, session: _Session | None) -> None:
        pb = self.pb
        if isinstance(outcome, pb.WorkerFailure):
            report = pb.Report(job_id=job_id, fencing_token=token, failure=outcome)
        else:
            report = pb.Report(job_id=job_id, fencing_token=token, value=outcome)
        message = pb.WorkerMessage(report=report)
        self.unacked[(job_id, token)] = message
        if session is not None:
            session.outbox.append(message)
            if self.stop_by is None and not session.jobd_draining:
                session.owed_credit += 1
        self.wake.set()

    def post_progress(self, job_id: str, token: int, fraction: float, message: str) -> None:
        """From any thread: the latest progress of a job, to send."""
        with self.progress_lock:
            first = not self.progress
            self.progress[(job_id, token)] = (fraction, message)
        if first:
            try:
                self.loop.call_soon_threadsafe(self.wake.set)
            except RuntimeError:
                pass

    def post_log(self, job_id: str, token: int, stream: int, data: bytes) -> None:
        """From any thread: a line of a job's log, to send (or drop, counted,
        past ``MAX_PENDING_LOG`` waiting)."""
        with self.logs_lock:
            first = not self.logs
            key = (job_id, token)
            pending = self.logs.get(key)
            if pending is None:
                pending = self.logs[key] = _PendingLog([])
            if pending.size + len(data) > MAX_PENDING_LOG:
                pending.dropped += 1
            else:
                pending.size += len(data)
                pending.lines.append((stream, data))
        if first:
            try:
                self.loop.call_soon_threadsafe(self.wake.set)
            except RuntimeError:
                pass

    def log_message(self, job_id: str, token: int, pending: _PendingLog) -> Any:
        """The LogLines message of a job's waiting lines, with a note of any dropped."""
        pb = self.pb
        lines = [pb.LogLine(stream=stream, data=data) for stream, data in pending.lines]
        if pending.dropped:
            note = (
                f"[worker: {pending.dropped} log lines dropped: "
                "the job wrote faster than they could be sent]\n"
            )
            lines.append(pb.LogLine(stream=_LOG, data=note.encode()))
        return pb.WorkerMessage(log=pb.LogLines(job_id=job_id, fencing_token=token, lines=lines))

    # -- stopping ---------------------------------------------------------------------

    def request_stop(self) -> None:
        self.stop_requests += 1
        if self.stop_requests == 1:
            log.info(
                "worker draining: taking no new job, letting %d running job(s) finish within %ss",
                len(self.jobs),
                self.worker.grace,
            )
            self.stop_by = self.loop.time() + self.worker.grace
            self.stop_timer = self.loop.call_at(self.stop_by, self.wake.set)
            session = self.session
            if session is not None:
                session.outbox.append(self.pb.WorkerMessage(draining=self.pb.Draining()))
                session.owed_credit = 0
        else:
            log.info("stopping now: giving back the jobs still running")
            self.stop_by = self.loop.time()
        self.wake.set()

    def stopped(self) -> bool:
        return self.stop_by is not None and not self.jobs and not self.unacked

    def give_up(self, session: _Session) -> None:
        """The grace ended: give back what still runs (jobd runs it again
        elsewhere) and stop it here."""
        if self.jobs:
            log.warning("the grace ended: giving back %d running job(s)", len(self.jobs))
        for running in list(self.jobs.values()):
            running.cancel()
            self.give_back(session, running.job_id, running.token)
        self.jobs.clear()
        self.unacked.clear()

    def abandon_all(self, why: str) -> None:
        if self.jobs or self.unacked:
            log.warning("%s: stopping the %d job(s) still running here", why, len(self.jobs))
        for running in self.jobs.values():
            running.cancel()
        self.jobs.clear()
        self.unacked.clear()

    def close(self) -> None:
        self.abandon_all("the worker stopped")
        if self.stop_timer is not None:
            self.stop_timer.cancel()
        if self.threads is not None:
            self.threads.close()
        with self.logs_lock:
            self.logs.clear()
        with self.worker._lock:
            self.worker._runner = None

    # -- the attach -----------------------------------------------------------------------

    def attach_message(self) -> Any:
        pb = self.pb
        worker = self.worker
        attach = pb.Attach(
            name=worker.name,
            instance=worker.instance,
            slots=worker.slots,
            labels=worker.labels,
            version=worker.version,
        )
        for function in self.functions.values():
            declaration = attach.functions.add(
                name=function.name,
                description=function.description,
                not_safe_to_retry=function.not_safe_to_retry,
                returns=function.returns,
            )
            if function.schema is not None:
                declaration.args_schema.CopyFrom(to_value(function.schema))
        for running in self.jobs.values():
            attach.running.add(
                job_id=running.job_id, attempt=running.attempt, fencing_token=running.token
            )
        return pb.WorkerMessage(attach=attach)


async def _await(awaitable: Any) -> Any:
    return await awaitable


class _Resumed(collections.abc.Coroutine[Any, Any, Any]):
    """A coroutine whose first step has already run: hands the task what
    that step yielded, then passes everything through (``send``, and
    ``throw`` for cancellation)."""

    def __init__(self, coroutine: Any, first: Any) -> None:
        self._coroutine = coroutine
        self._first: Any = first
        self._pending = True

    def send(self, value: Any) -> Any:
        if self._pending:
            self._pending = False
            return self._first
        return self._coroutine.send(value)

    def throw(self, typ: Any, value: Any = None, traceback: Any = None) -> Any:
        self._pending = False
        if value is None and traceback is None:
            return self._coroutine.throw(typ)
        return self._coroutine.throw(typ, value, traceback)

    def close(self) -> None:
        self._coroutine.close()

    def __await__(self) -> Any:
        return self

    def __iter__(self) -> Any:
        return self

    def __next__(self) -> Any:
        return self.send(None)


def _failure(kind: int, message: str) -> Any:
    return _pb().WorkerFailure(kind=kind, message=message)
