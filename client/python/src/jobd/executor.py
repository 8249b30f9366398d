"""``jobd.Executor``: a ``concurrent.futures.Executor`` whose work runs in jobd.

::

    with jobd.Executor("http://127.0.0.1:50051") as pool:
        f = pool.submit("hello", "Ann")          # a job; f is a concurrent.futures.Future
        print(f.result())                        # Hello, Ann!
        print(list(pool.map("hello", ["Ann", "Bob"])))

Functions are named (jobd runs registered functions and functions served by
workers, not pickled Python), and their arguments travel as JSON (see
:func:`jobd._values.call_args` for how ``*args``/``**kwargs`` become one
JSON value). Everything else is the standard library's contract: futures are
real ``concurrent.futures.Future`` objects, ``shutdown(wait, cancel_futures)``
and the context manager behave alike, and ``map`` takes ``timeout``,
``chunksize`` and Python 3.14's ``buffersize``.
"""

from __future__ import annotations

import collections
import concurrent.futures
import threading
import uuid
import weakref
from collections.abc import Iterable, Iterator
from typing import Any

import grpc

from jobd import errors
from jobd._connect import Connection, PemSource
from jobd._sync import (
    EXECUTOR_LABEL,
    MAP_LABEL,
    Core,
    JobFuture,
    pb,
)
from jobd._values import call_args, fill_value, from_value, to_value
from jobd.options import Options
from jobd.types import CANCELLED, FAILED, SUCCEEDED, FunctionInfo, JobInfo, job_failed

__all__ = ["Executor", "JobFuture", "MapIterator"]

MAP_MAX_IN_FLIGHT = 1024
"""jobd's ceiling on a map's jobs in flight."""

MAP_MESSAGE_ARGS = 256
"""The most arguments one Map request message carries."""

DEFAULT_MAX_PENDING = 100_000
"""Unsettled futures one executor holds before ``submit`` waits (jobd's own
default queue bound)."""


def function_name(fn: Any) -> str:
    """The job function's name: a string, or a function a :class:`jobd.Worker` serves."""
    if isinstance(fn, str):
        return fn
    name = getattr(fn, "__jobd_name__", None)
    if isinstance(name, str):
        return name
    raise TypeError(
        f"jobd runs functions by name: pass the function's name (a str), not {type(fn).__name__}"
    )


class Executor(concurrent.futures.Executor):
    """Submits jobs to jobd; each job's future settles when jobd finishes it.

    ``address`` is ``http://host:port`` (plaintext), ``https://host:port``
    (TLS) or a bare ``host:port``; by default ``JOBD_ADDR``, else
    ``http://127.0.0.1:50051``. ``token``/``token_file``, ``ca_cert``,
    ``client_cert`` and ``client_key`` (each falling back on its ``JOBD_*``
    variable, as in jobctl) reach a protected server. ``options`` are the
    default :class:`~jobd.Options` of every job. ``max_pending`` bounds the
    unsettled futures (``submit`` waits for room; ``None``: no bound).

    The executor opens its own connection, lazily: nothing is sent before
    the first ``submit``, ``map`` or ``future``.
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        token: str | None = None,
        token_file: str | None = None,
        ca_cert: PemSource | None = None,
        client_cert: PemSource | None = None,
        client_key: PemSource | None = None,
        options: Options | None = None,
        max_pending: int | None = DEFAULT_MAX_PENDING,
    ) -> None:
        if max_pending is not None and max_pending < 1:
            raise ValueError("max_pending must be at least 1 (or None for no bound)")
        connection = Connection.resolve(
            address,
            token=token,
            token_file=token_file,
            ca_cert=ca_cert,
            client_cert=client_cert,
            client_key=client_key,
        )
        self._core = Core(connection, uuid.uuid4().hex, max_pending)
        self._options = options or Options()

    # -- views ------------------------------------------------------------------

    @property
    def options(self) -> Options:
        """The options this view submits with."""
        return self._options

    @property
    def id(self) -> str:
        """This executor's id: the value of the ``jobd.python/executor`` label of its jobs."""
        return self._core.executor_id

    def with_options(self, options: Options | None = None, /, **changes: Any) -> Executor:
        """A view of this executor that submits with other options.

        ``pool.with_options(priority=5, timeout=30).submit("resize", path)``.
        Labels are merged with the current ones. The view shares everything
        else (connection, futures, shutdown) with this executor.
        """
        base = options if options is not None else self._options
        view = object.__new__(Executor)
        view._core = self._core
        view._options = base.merged(**changes) if changes else base
        return view

    # -- concurrent.futures.Executor --------------------------------------------

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> JobFuture:
        """Submits a job of function ``fn`` (its name) and returns its future.

        ``*args``/``**kwargs`` become the job's JSON argument: none is
        ``null``, one positional argument is that value, several are an
        array, keyword arguments alone are an object (both at once is a
        ``TypeError``). The Submit call happens now: a refused job raises
        here (:class:`~jobd.NotFound` for an unknown function,
        :class:`~jobd.InvalidArgument` with field violations for arguments
        that do not match its schema, ...). Transient unavailability is
        retried, safely: each submission carries a request id.
        """
        core = self._core
        if core.shutting_down:
            raise RuntimeError("cannot schedule new futures after shutdown")
        name = function_name(fn)
        options = self._options
        jobd_pb2 = pb()
        request = jobd_pb2.SubmitRequest(
            function=name, request_id=options.request_id or uuid.uuid4().hex
        )
        fill_value(request.args, call_args(args, kwargs), "args")
        options.apply_to_submit(request)
        request.labels[EXECUTOR_LABEL] = core.executor_id
        core.wait_for_space()
        core.ensure_watching()
        generation = core.generation
        response = core.call(core.stub.Submit, request)
        return core.register(JobFuture(response.job_id, name, core), generation)

    def map(
        self,
        fn: Any,
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
        buffersize: int | None = None,
        ordered: bool = True,
    ) -> MapIterator:
        """Runs ``fn`` over the arguments, one job each, through one Map stream.

        As ``Executor.map``: results in input order (``ordered=False``: as
        they finish), lazily; a failed job raises its :class:`~jobd.JobFailed`
        when its turn comes, and the rest of the map is cancelled.
        ``timeout`` bounds the whole map from this call (``TimeoutError``).
        ``buffersize`` (Python 3.14's semantics): the input is read lazily,
        at most that many arguments submitted and not yet yielded; without
        it the input is read at once, as the standard library does, and jobd
        bounds the jobs in flight (1,024). ``chunksize`` is accepted for
        compatibility: arguments already read travel up to
        ``max(chunksize, 256)`` to a message anyway.

        Leaving the loop early (``break``, an exception, dropping the
        iterator) cancels the map's unfinished jobs in jobd.
        """
        if buffersize is not None:
            if not isinstance(buffersize, int) or isinstance(buffersize, bool):
                raise TypeError("buffersize must be an integer or None")
            if buffersize < 1:
                raise ValueError("buffersize must be None or > 0")
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        core = self._core
        if core.shutting_down:
            raise RuntimeError("cannot schedule new futures after shutdown")
        return MapIterator(
            core,
            function_name(fn),
            iterables,
            self._options,
            timeout=timeout,
            chunksize=chunksize,
            buffersize=buffersize,
            ordered=ordered,
        )

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """As ``Executor.shutdown``: no new submissions from now on.

        ``cancel_futures=True`` cancels every unfinished job of this executor
        in jobd (pending ones never run; running async ones are aborted;
        running blocking ones are asked to stop) and every open map.
        ``wait=True`` returns once every future is settled and the connection
        is closed; ``wait=False`` returns at once and the connection closes
        by itself when the last future settles.
        """
        core = self._core
        core.shutting_down = True
        if cancel_futures:
            for map_iterator in list(core.maps):
                map_iterator.close()
            self._cancel_all(core.unsettled())
        if wait:
            while True:
                unsettled = core.unsettled()
                if not unsettled:
                    break
                concurrent.futures.wait(unsettled)
            for map_iterator in list(core.maps):
                map_iterator.wait_closed()
            core.close()
        else:
            core.close_if_idle()

    def _cancel_all(self, futures: list[JobFuture]) -> None:
        """Cancels many jobs at once: up to 256 Cancel calls in flight."""
        core = self._core
        jobd_pb2 = pb()
        in_flight: collections.deque[tuple[JobFuture, Any]] = collections.deque()

        def finish(future: JobFuture, call: Any) -> None:
            try:
                response = call.result()
            except grpc.RpcError:
                return  # it settles by its final event (or the watch's end)
            if response.cancelled or response.state == CANCELLED:
                future._cancelled_by_jobd()

        for future in futures:
            if future.done():
                continue
            call = core.stub.Cancel.future(
                jobd_pb2.CancelRequest(job_id=future.job_id), metadata=core.metadata
            )
            in_flight.append((future, call))
            if len(in_flight) >= 256:
                finish(*in_flight.popleft())
        while in_flight:
            finish(*in_flight.popleft())

    # -- beyond concurrent.futures -------------------------------------------------

    def future(self, job_id: str) -> JobFuture:
        """The future of an existing job (submitted elsewhere, or earlier).

        Raises :class:`~jobd.NotFound` for an unknown job. Adopted jobs are
        watched by id, on one more stream opened only while there are some.
        """
        core = self._core
        with core.lock:
            existing = core.pending.get(job_id)
        if existing is not None:
            return existing
        job = core.call(core.stub.GetJob, pb().GetJobRequest(job_id=job_id)).job
        future = JobFuture(job.id, job.function, core)
        if job.state in (SUCCEEDED, FAILED, CANCELLED):
            future._settle(job.state, job.value, job.error)
            return future
        registered = core.register(future, core.generation)
        if registered is future:
            core.adopt(future)
        return registered

    def status(self, job: str | JobFuture) -> JobInfo:
        """Everything jobd knows about a job (state, attempt, progress, ...)."""
        job_id = job.job_id if isinstance(job, JobFuture) else job
        core = self._core
        return JobInfo.from_wire(core.call(core.stub.GetJob, pb().GetJobRequest(job_id=job_id)).job)

    def functions(self) -> list[FunctionInfo]:
        """The functions jobd can run, with their argument schemas."""
        core = self._core
        response = core.call(core.stub.ListFunctions, pb().ListFunctionsRequest())
        return [FunctionInfo.from_wire(f) for f in response.functions]

    def __repr__(self) -> str:
        state = "shut down" if self._core.shutting_down else "open"
        return f"<jobd.Executor {self._core.connection.target} {state}>"


_END = object()


class _Feed:
    """The arguments of one map on their way out: filled by the caller's
    thread, drained by gRPC's request thread. Apart from the iterator, so
    that the stream holds no reference to it and dropping the iterator can
    cancel the map."""

    def __init__(self, start: Any, per_message: int) -> None:
        self.start = start
        self.per_message = per_message
        self.cond = threading.Condition()
        # Arguments converted and not yet sent; _END after the last one.
        self.queue: collections.deque[Any] = collections.deque()
        self.closed = False

    def put(self, batch: list[Any], end: bool) -> None:
        with self.cond:
            self.queue.extend(batch)
            if end:
                self.queue.append(_END)
            self.cond.notify()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    def requests(self) -> Iterator[Any]:
        """The request stream: the start, then the arguments as they come;
        it ends (a half-close: jobd answers the rest, then ends the stream)
        after the last argument."""
        jobd_pb2 = pb()
        first = True
        while True:
            with self.cond:
                while not self.queue and not self.closed:
                    self.cond.wait()
                if self.closed:
                    return
                batch: list[Any] = []
                end = False
                while self.queue and len(batch) < self.per_message:
                    item = self.queue.popleft()
                    if item is _END:
                        end = True
                        break
                    batch.append(item)
            if first:
                first = False
                yield jobd_pb2.MapRequest(start=self.start, args=batch)
            elif batch:
                yield jobd_pb2.MapRequest(args=batch)
            if end:
                return


class MapIterator(Iterator[Any]):
    """The results of :meth:`Executor.map`, one per argument.

    Closing it (``close()``, leaving a ``with`` block, or dropping it)
    cancels the map's unfinished jobs in jobd.
    """

    def __init__(
        self,
        core: Core,
        function: str,
        iterables: tuple[Iterable[Any], ...],
        options: Options,
        *,
        timeout: float | None,
        chunksize: int,
        buffersize: int | None,
        ordered: bool,
    ) -> None:
        self._core = core
        self._function = function
        self._id = uuid.uuid4().hex
        self._finished = False
        self._buffersize = buffersize
        self._inputs: Iterator[tuple[Any, ...]] = zip(
            *iterables, strict=False
        )  # as map(): the shortest ends it
        self._input_done = False
        self._read = 0
        self._answered = 0
        self._timeout = timeout
        jobd_pb2 = pb()
        start = jobd_pb2.MapStart(
            function=function,
            ordered=ordered,
            max_in_flight=min(buffersize or MAP_MAX_IN_FLIGHT, MAP_MAX_IN_FLIGHT),
        )
        options.apply_to_map(start)
        start.labels[MAP_LABEL] = self._id
        self._feed = _Feed(start, max(chunksize, MAP_MESSAGE_ARGS))
        # As the standard library: the first arguments are read (and their
        # jobs submitted) now, the rest as results are taken (buffersize),
        # or all of them now.
        self._read_inputs(buffersize)
        self._call = core.stub.Map(self._feed.requests(), metadata=core.metadata, timeout=timeout)
        self._responses = iter(self._call)
        with core.lock:
            core.maps.add(self)
        # Dropping the iterator without closing it still cancels the map.
        self._finalizer = weakref.finalize(self, _cancel_map, self._call, self._feed)

    @property
    def id(self) -> str:
        """This map's id: the value of the ``jobd.python/map`` label of its jobs."""
        return self._id

    def _read_inputs(self, count: int | None) -> None:
        """Reads (and converts) up to ``count`` more arguments; all when None.
        Runs in the caller's thread, so a failing input raises there."""
        batch: list[Any] = []
        try:
            while count is None or len(batch) < count:
                args = next(self._inputs, None)
                if args is None:
                    self._input_done = True
                    break
                batch.append(to_value(call_args(args, {})))
        finally:
            self._read += len(batch)
            self._feed.put(batch, self._input_done)

    def __iter__(self) -> MapIterator:
        return self

    def __next__(self) -> Any:
        if self._finished:
            raise StopIteration
        try:
            response = next(self._responses)
        except StopIteration:
            self._finish()
            if self._answered < self._read:
                raise errors.Unavailable(
                    f"jobd ended the map after {self._answered} of {self._read} answers"
                ) from None
            raise
        except grpc.RpcError as err:
            self._finish()
            if err.code() == grpc.StatusCode.DEADLINE_EXCEEDED and self._timeout is not None:
                raise TimeoutError("the map did not finish within its timeout") from None
            raise errors.from_grpc(err) from None
        self._answered += 1
        if self._buffersize is not None and not self._input_done:
            try:
                self._read_inputs(1)
            except BaseException:
                self._finish()
                raise
        state = response.state
        if state == SUCCEEDED:
            return from_value(response.value)
        self._finish()
        if state == FAILED:
            raise job_failed(response.job_id, self._function, response.error)
        if state == CANCELLED:
            raise concurrent.futures.CancelledError(f"job {response.job_id} was cancelled")
        rejected = response.rejected
        raise errors.from_batch_item(rejected.code, rejected.message, rejected.field_violations)

    def close(self) -> None:
        """Stops the map: its unfinished jobs are cancelled in jobd."""
        self._finish()

    def wait_closed(self) -> None:
        """Waits for the stream to end (after a close, at once)."""
        try:
            self._call.code()
        except Exception:
            pass

    def __enter__(self) -> MapIterator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _finish(self) -> None:
        if self._finished:
            return
        self._finished = True
        self._finalizer()
        core = self._core
        with core.lock:
            core.maps.discard(self)
        core.close_if_idle()


def _cancel_map(call: Any, feed: _Feed) -> None:
    feed.close()
    if not call.done():
        call.cancel()
