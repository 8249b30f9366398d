"""``jobd.aio``: jobd for asyncio, on ``grpc.aio``.

::

    async with jobd.aio.Client("http://127.0.0.1:50051") as client:
        job = await client.submit("hello", "Ann")     # accepted by jobd
        print(await job)                              # Hello, Ann!
        async for greeting in client.map("hello", ["Ann", "Bob"]):
            print(greeting)

The same contract as :class:`jobd.Executor`, in asyncio's terms: ``submit``
answers once jobd has accepted the job and returns a :class:`Job`, which is
awaitable (its value, or :class:`~jobd.JobFailed` / ``asyncio.CancelledError``)
and carries an ``asyncio.Future`` (``job.future``) for ``asyncio.wait`` and
friends. No job polls: one Watch stream per client, filtered on a label every
job of the client carries, settles them, as for the executor. ``map`` is an
async iterator over the Map stream with bounded jobs in flight.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from typing import Any

import grpc
import grpc.aio

from jobd import errors
from jobd._connect import Connection, PemSource, aio_eof, job_service
from jobd._sync import EXECUTOR_LABEL, MAP_LABEL, RECONNECT_TIMEOUT, RETRY_PAUSES
from jobd._values import call_args, fill_value, from_value, to_value
from jobd.executor import MAP_MAX_IN_FLIGHT, MAP_MESSAGE_ARGS, function_name
from jobd.options import Options
from jobd.types import CANCELLED, FAILED, SUCCEEDED, FunctionInfo, JobInfo, job_failed

__all__ = ["ALL_COMPLETED", "FIRST_COMPLETED", "FIRST_EXCEPTION", "Client", "Job"]

_EOF = aio_eof()
"""What ``read()`` returns on a stream that ended."""

log = logging.getLogger("jobd")

FIRST_COMPLETED = asyncio.FIRST_COMPLETED
FIRST_EXCEPTION = asyncio.FIRST_EXCEPTION
ALL_COMPLETED = asyncio.ALL_COMPLETED

_TERMINAL = (SUCCEEDED, FAILED, CANCELLED)
_LAGGED = 4


def _pb() -> Any:
    from jobd.v1 import jobd_pb2

    return jobd_pb2


class Job:
    """One job, as :meth:`Client.submit` or :meth:`Client.job` gives it.

    ``await job`` is its value (or raises :class:`~jobd.JobFailed`, or
    ``asyncio.CancelledError`` for a cancelled job). Awaiting it never
    cancels it: cancel with :meth:`cancel`.
    """

    def __init__(self, client: Client, job_id: str, function: str) -> None:
        self._client = client
        self.id = job_id
        """The job's id."""
        self.function = function
        """The job function's name."""
        self.future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        """Settled with the job's outcome; give it to ``asyncio.wait`` and friends."""
        # A failed job nobody awaits is not an "exception never retrieved".
        self.future.add_done_callback(_retrieve)

    def done(self) -> bool:
        """True once jobd has reported the job finished."""
        return self.future.done()

    def __await__(self) -> Any:
        return asyncio.shield(self.future).__await__()

    async def result(self, timeout: float | None = None) -> Any:
        """The job's value, waiting up to ``timeout`` seconds (``TimeoutError``)."""
        return await asyncio.wait_for(asyncio.shield(self.future), timeout)

    async def exception(self, timeout: float | None = None) -> BaseException | None:
        """The job's failure (None if it succeeded), waiting up to ``timeout``."""
        await asyncio.wait([self.future], timeout=timeout)
        if not self.future.done():
            raise TimeoutError(f"job {self.id} did not finish within {timeout}s")
        if self.future.cancelled():
            return asyncio.CancelledError(f"job {self.id} was cancelled")
        return self.future.exception()

    async def cancel(self) -> bool:
        """Asks jobd to cancel the job; True once it is cancelled (as
        :meth:`jobd.JobFuture.cancel`: a running blocking or sync-worker job
        is only asked, and returns False)."""
        if self.future.done():
            return self.future.cancelled()
        client = self._client
        response = await client._call(client._stub.Cancel, _pb().CancelRequest(job_id=self.id))
        if response.cancelled or response.state == CANCELLED:
            self._settle(CANCELLED, None, None)
            return True
        return False

    async def status(self) -> JobInfo:
        """Everything jobd knows about the job."""
        return await self._client.status(self.id)

    def _settle(self, state: int, value: Any, error: Any) -> None:
        future = self.future
        if future.done():
            return
        if state == SUCCEEDED:
            future.set_result(from_value(value))
        elif state == CANCELLED:
            future.cancel(f"job {self.id} was cancelled")
        elif state == FAILED:
            future.set_exception(job_failed(self.id, self.function, error))

    def _fail(self, exc: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(exc)

    def __repr__(self) -> str:
        state = "done" if self.done() else "pending"
        return f"<jobd.aio.Job {self.function} {self.id} {state}>"


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


class Client:
    """jobd for asyncio. Create it inside a running event loop (or ``async with``).

    The arguments are :class:`jobd.Executor`'s. Close it with :meth:`close`
    (or leave its ``async with`` block), which leaves its jobs running in
    jobd unless asked to cancel them.
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
    ) -> None:
        self._connection = Connection.resolve(
            address,
            token=token,
            token_file=token_file,
            ca_cert=ca_cert,
            client_cert=client_cert,
            client_key=client_key,
        )
        self._shared = _Shared(self._connection)
        self._options = options or Options()

    @property
    def _stub(self) -> Any:
        return self._shared.stub

    @property
    def id(self) -> str:
        """This client's id: the value of the ``jobd.python/executor`` label of its jobs."""
        return self._shared.client_id

    def with_options(self, options: Options | None = None, /, **changes: Any) -> Client:
        """A view of this client submitting with other options (labels merge)."""
        base = options if options is not None else self._options
        view = object.__new__(Client)
        view._connection = self._connection
        view._shared = self._shared
        view._options = base.merged(**changes) if changes else base
        return view

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _call(self, method: Any, request: Any, *, timeout: float | None = None) -> Any:
        """One unary call, retried while jobd is unavailable (only safe calls use it)."""
        return await self._shared.call(method, request, timeout=timeout)

    async def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Job:
        """Submits a job; returns once jobd has accepted it.

        Arguments map to JSON as for :meth:`jobd.Executor.submit`; a refused
        job raises here (:class:`~jobd.InvalidArgument`, :class:`~jobd.NotFound`, ...).
        """
        shared = self._shared
        if shared.closed:
            raise RuntimeError("the client is closed")
        name = function_name(fn)
        options = self._options
        request = _pb().SubmitRequest(
            function=name, request_id=options.request_id or uuid.uuid4().hex
        )
        fill_value(request.args, call_args(args, kwargs), "args")
        options.apply_to_submit(request)
        request.labels[EXECUTOR_LABEL] = shared.client_id
        await shared.ensure_watching()
        generation = shared.generation
        response = await self._call(shared.stub.Submit, request)
        return await shared.register(Job(self, response.job_id, name), generation)

    def job(self, job_id: str) -> Job:
        """The :class:`Job` of an existing job (submitted elsewhere, or earlier).

        Its outcome is awaited on the server (``Result`` calls, asked again
        when jobd's cap on one wait ends them); an unknown id makes awaiting
        it raise :class:`~jobd.NotFound`.
        """
        shared = self._shared
        existing = shared.pending.get(job_id)
        if existing is not None:
            return existing
        job = Job(self, job_id, "")
        shared.adopted.add(asyncio.ensure_future(shared.follow(job)))
        return job

    async def status(self, job: str | Job) -> JobInfo:
        """Everything jobd knows about a job."""
        job_id = job.id if isinstance(job, Job) else job
        response = await self._call(self._stub.GetJob, _pb().GetJobRequest(job_id=job_id))
        return JobInfo.from_wire(response.job)

    async def functions(self) -> list[FunctionInfo]:
        """The functions jobd can run."""
        response = await self._call(self._stub.ListFunctions, _pb().ListFunctionsRequest())
        return [FunctionInfo.from_wire(f) for f in response.functions]

    async def wait(
        self,
        jobs: Iterable[Job],
        timeout: float | None = None,
        return_when: str = ALL_COMPLETED,
    ) -> tuple[set[Job], set[Job]]:
        """As ``concurrent.futures.wait``: the jobs done and not done, once
        ``return_when`` (FIRST_COMPLETED, FIRST_EXCEPTION, ALL_COMPLETED) holds
        or ``timeout`` passes."""
        by_future = {job.future: job for job in jobs}
        if not by_future:
            return set(), set()
        done, pending = await asyncio.wait(by_future, timeout=timeout, return_when=return_when)
        return {by_future[f] for f in done}, {by_future[f] for f in pending}

    async def as_completed(
        self, jobs: Iterable[Job], timeout: float | None = None
    ) -> AsyncIterator[Job]:
        """The jobs, each as soon as it is done (``TimeoutError`` after ``timeout``)."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        by_future = {job.future: job for job in jobs}
        pending = set(by_future)
        while pending:
            left = None if deadline is None else deadline - loop.time()
            if left is not None and left <= 0:
                raise TimeoutError(f"{len(pending)} job(s) still unfinished")
            done, pending = await asyncio.wait(pending, timeout=left, return_when=FIRST_COMPLETED)
            for future in done:
                yield by_future[future]

    async def map(
        self,
        fn: Any,
        *iterables: Iterable[Any] | AsyncIterable[Any],
        ordered: bool = True,
        buffersize: int | None = None,
        chunksize: int = 1,
        timeout: float | None = None,
    ) -> AsyncIterator[Any]:
        """Runs ``fn`` over the arguments (sync or async iterables) through
        one Map stream; ``async for`` over the results, in input order
        (``ordered=False``: as they finish). ``buffersize``: at most that
        many arguments read and not yet yielded (the input is read lazily);
        without it the input is read as fast as jobd takes it (1,024 jobs in
        flight at most). A failed job raises when its turn comes; leaving the
        loop early cancels the map's unfinished jobs in jobd.
        """
        if buffersize is not None and (not isinstance(buffersize, int) or buffersize < 1):
            raise ValueError("buffersize must be None or a positive int")
        shared = self._shared
        if shared.closed:
            raise RuntimeError("the client is closed")
        name = function_name(fn)
        jobd_pb2 = _pb()
        start = jobd_pb2.MapStart(
            function=name,
            ordered=ordered,
            max_in_flight=min(buffersize or MAP_MAX_IN_FLIGHT, MAP_MAX_IN_FLIGHT),
        )
        self._options.apply_to_map(start)
        start.labels[MAP_LABEL] = uuid.uuid4().hex
        per_message = max(chunksize, MAP_MESSAGE_ARGS) if buffersize is None else max(chunksize, 1)
        credit = asyncio.Semaphore(buffersize) if buffersize is not None else None
        call = shared.stub.Map(metadata=shared.metadata, timeout=timeout)
        sent = 0
        input_error: list[BaseException] = []

        async def write() -> None:
            nonlocal sent
            batch: list[Any] = []
            first = True

            async def flush() -> None:
                nonlocal first
                if first:
                    await call.write(jobd_pb2.MapRequest(start=start, args=batch))
                    first = False
                elif batch:
                    await call.write(jobd_pb2.MapRequest(args=batch))
                batch.clear()

            try:
                async for args in _zip(iterables):
                    if credit is not None:
                        if credit.locked() and batch:
                            await flush()
                        await credit.acquire()
                    batch.append(to_value(call_args(args, {})))
                    sent += 1
                    if len(batch) >= per_message:
                        await flush()
                await flush()
            except BaseException as err:
                if not isinstance(err, asyncio.CancelledError):
                    input_error.append(err)
                    call.cancel()
                raise
            await call.done_writing()

        writer = asyncio.ensure_future(write())
        answered = 0
        try:
            while True:
                try:
                    response = await call.read()
                except grpc.aio.AioRpcError as err:
                    if input_error:
                        raise input_error[0] from None
                    if err.code() == grpc.StatusCode.DEADLINE_EXCEEDED and timeout is not None:
                        raise TimeoutError("the map did not finish within its timeout") from None
                    raise errors.from_grpc(err) from None
                except asyncio.CancelledError:
                    if input_error:
                        raise input_error[0] from None
                    raise
                if response is _EOF:
                    if input_error:
                        raise input_error[0]
                    if answered < sent or not writer.done():
                        raise errors.Unavailable(f"jobd ended the map after {answered} answers")
                    return
                answered += 1
                if credit is not None:
                    credit.release()
                state = response.state
                if state == SUCCEEDED:
                    yield from_value(response.value)
                elif state == FAILED:
                    raise job_failed(response.job_id, name, response.error)
                elif state == CANCELLED:
                    raise asyncio.CancelledError(f"job {response.job_id} was cancelled")
                else:
                    rejected = response.rejected
                    raise errors.from_batch_item(
                        rejected.code, rejected.message, rejected.field_violations
                    )
        finally:
            if not writer.done():
                writer.cancel()
            if not call.done():
                call.cancel()
            await asyncio.gather(writer, return_exceptions=True)

    async def close(self, *, cancel_jobs: bool = False) -> None:
        """Closes the connection; with ``cancel_jobs`` first cancels every
        unfinished job this client submitted or adopted."""
        shared = self._shared
        if shared.closed:
            return
        if cancel_jobs:
            jobs = [job for job in shared.pending.values() if not job.done()]
            await asyncio.gather(*(job.cancel() for job in jobs), return_exceptions=True)
        await shared.close()


async def _zip(
    iterables: tuple[Iterable[Any] | AsyncIterable[Any], ...],
) -> AsyncIterator[tuple[Any, ...]]:
    """``zip`` over sync and async iterables alike."""
    iterators: list[Any] = [
        aiter(it) if isinstance(it, AsyncIterable) else iter(it) for it in iterables
    ]
    while True:
        items = []
        for iterator in iterators:
            try:
                if isinstance(iterator, AsyncIterator):
                    items.append(await anext(iterator))
                else:
                    items.append(next(iterator))
            except (StopIteration, StopAsyncIteration):
                return
        yield tuple(items)


class _Shared:
    """What every view of one client shares: channel, jobs, the watch."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self.metadata = connection.metadata
        self.channel = connection.aio_channel()
        self.stub = job_service(self.channel)
        self.client_id = uuid.uuid4().hex
        self.pending: dict[str, Job] = {}
        self.early: dict[str, tuple[int, Any, Any]] = {}
        self.generation = 0
        self.watch_task: asyncio.Task[None] | None = None
        self.watch_call: Any = None
        self.start_lock = asyncio.Lock()
        self.adopted: set[asyncio.Future[None]] = set()
        self.epoch = ""
        self.seq = 0
        self.closed = False

    async def call(self, method: Any, request: Any, *, timeout: float | None = None) -> Any:
        attempt = 0
        while True:
            try:
                return await method(request, metadata=self.metadata, timeout=timeout)
            except grpc.aio.AioRpcError as err:
                if err.code() == grpc.StatusCode.UNAVAILABLE and attempt < len(RETRY_PAUSES):
                    await asyncio.sleep(RETRY_PAUSES[attempt])
                    attempt += 1
                    continue
                raise errors.from_grpc(err) from None

    async def register(self, job: Job, generation: int) -> Job:
        existing = self.pending.get(job.id)
        if existing is not None:
            return existing
        early = self.early.pop(job.id, None)
        if early is not None:
            job._settle(*early)
            return job
        self.pending[job.id] = job
        if generation != self.generation:
            await self.check(job)
        return job

    def resolve(self, job_id: str, state: int, value: Any, error: Any) -> None:
        job = self.pending.pop(job_id, None)
        if job is None:
            self.early[job_id] = (state, value, error)
            if len(self.early) > 4096:
                self.early.pop(next(iter(self.early)))
            return
        job._settle(state, value, error)

    async def check(self, job: Job) -> None:
        request = _pb().ResultRequest(job_id=job.id)
        request.timeout.SetInParent()
        try:
            response = await self.call(self.stub.Result, request)
        except errors.DeadlineExceeded:
            return
        except errors.NotFound as err:
            self.pending.pop(job.id, None)
            job._fail(err)
            return
        self.resolve(job.id, response.state, response.value, response.error)

    async def reconcile(self) -> None:
        self.generation += 1
        for job in list(self.pending.values()):
            try:
                await self.check(job)
            except errors.JobdError as err:
                log.warning("cannot ask jobd about job %s: %s", job.id, err)

    async def follow(self, job: Job) -> None:
        """Settles an adopted job from server-side waits (Result, asked again
        whenever jobd's cap on one wait ends it)."""
        request = _pb().ResultRequest(job_id=job.id)
        while not job.done():
            try:
                response = await self.call(self.stub.Result, request)
            except errors.DeadlineExceeded:
                continue
            except errors.JobdError as err:
                job._fail(err)
                return
            job._settle(response.state, response.value, response.error)

    async def open_watch(self, resume: bool) -> Any:
        request = _pb().WatchRequest(
            states=list(_TERMINAL), labels={EXECUTOR_LABEL: self.client_id}
        )
        if resume:
            request.stream_epoch = self.epoch
            request.after_seq = self.seq
        call = self.stub.Watch(request, metadata=self.metadata)
        try:
            await call.initial_metadata()
        except grpc.aio.AioRpcError as err:
            raise errors.from_grpc(err) from None
        if call.done():
            code = await call.code()
            if code != grpc.StatusCode.OK:
                raise errors.error_for(code, await call.details())
        return call

    async def ensure_watching(self) -> None:
        if self.watch_task is not None and not self.watch_task.done():
            return
        async with self.start_lock:
            if self.watch_task is not None and not self.watch_task.done():
                return
            self.watch_call = await self.open_watch(resume=False)
            self.watch_task = asyncio.ensure_future(self.watch())

    async def watch(self) -> None:
        while not self.closed:
            try:
                async for event in self.watch_call:
                    if event.kind == _LAGGED:
                        self.epoch, self.seq = event.stream_epoch, event.seq
                        await self.reconcile()
                        continue
                    self.epoch, self.seq = event.stream_epoch, event.seq
                    if event.state in _TERMINAL:
                        self.resolve(event.job_id, event.state, event.value, event.error)
                problem: errors.RpcError = errors.Unavailable("the watch stream ended")
            except grpc.aio.AioRpcError as err:
                if self.closed or err.code() == grpc.StatusCode.CANCELLED:
                    return
                problem = errors.from_grpc(err)
            if not await self.reconnect(problem):
                return

    async def reconnect(self, problem: errors.RpcError) -> bool:
        if isinstance(problem, errors.Unauthenticated | errors.PermissionDenied):
            self.fail_all(problem)
            return False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + RECONNECT_TIMEOUT
        pause = 0.05
        while not self.closed:
            try:
                resumable = bool(self.epoch)
                try:
                    self.watch_call = await self.open_watch(resume=resumable)
                except (errors.FailedPrecondition, errors.OutOfRange):
                    resumable = False
                    self.watch_call = await self.open_watch(resume=False)
                if not resumable:
                    self.epoch, self.seq = "", 0
                    await self.reconcile()
                return True
            except errors.RpcError as err:
                if loop.time() >= deadline or isinstance(
                    err, errors.Unauthenticated | errors.PermissionDenied
                ):
                    self.fail_all(err)
                    return False
                await asyncio.sleep(pause)
                pause = min(pause * 2, 2.0)
        return False

    def fail_all(self, exc: errors.JobdError) -> None:
        jobs = list(self.pending.values())
        self.pending.clear()
        for job in jobs:
            job._fail(exc)

    async def close(self) -> None:
        self.closed = True
        if self.watch_call is not None:
            self.watch_call.cancel()
        tasks = [t for t in (self.watch_task, *self.adopted) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.channel.close(None)
