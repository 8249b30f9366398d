"""The synchronous plumbing under :class:`jobd.Executor`: calls with retries,
and the watch streams that settle futures.

No future polls. Every job an executor submits carries the label
``jobd.python/executor=<executor id>``, and one ``Watch`` stream filtered on
that label and on the terminal states, opened before the first submission,
brings each job's final event (with its value or error) to a thread that
settles the job's future. Jobs adopted by id (``pool.future(job_id)``) do not
carry the label; a second stream watches them by id, opened only while there
are some.

When a watch breaks, it is resumed after the last event it received (jobd
replays what it missed from its event history), within a bounded time; when
it cannot be resumed (jobd restarted, or the watcher lagged past the
history) a fresh watch starts and every pending job is asked for once, so no
final event is ever lost silently.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from concurrent.futures._base import (
    CANCELLED,
    CANCELLED_AND_NOTIFIED,
    FINISHED,
    PENDING,
)
from typing import TYPE_CHECKING, Any, TypeVar

import grpc

from jobd import errors
from jobd._connect import Connection, job_service
from jobd._values import from_value
from jobd.types import CANCELLED as WIRE_CANCELLED
from jobd.types import FAILED as WIRE_FAILED
from jobd.types import SUCCEEDED as WIRE_SUCCEEDED
from jobd.types import job_failed

if TYPE_CHECKING:
    from jobd.executor import MapIterator

log = logging.getLogger("jobd")

T = TypeVar("T")

EXECUTOR_LABEL = "jobd.python/executor"
"""The label every job an executor submits carries: its executor's id."""

MAP_LABEL = "jobd.python/map"
"""The label every job of one ``map`` carries: that map's id."""

RETRY_PAUSES = (0.05, 0.2, 0.8)
"""Pauses before each retry of a call that found jobd unavailable; together
they ride out a brief outage or a restart of jobd."""

RECONNECT_TIMEOUT = 30.0
"""How long a broken watch keeps trying to reconnect before the futures
waiting on it fail with :class:`~jobd.Unavailable`."""

WATCH_IDS_MAX = 1000
"""The most ids one Watch call takes (jobd's limit)."""

EARLY_MAX = 4096
"""Final events kept for jobs whose submission has not returned yet."""

WATCH_EVENT_LAGGED = 4


def pb() -> Any:
    """The generated ``jobd.v1.jobd_pb2`` module (imported once, on first use)."""
    from jobd.v1 import jobd_pb2

    return jobd_pb2


class JobFuture(Future[Any]):
    """A job's future: a real ``concurrent.futures.Future``, settled by jobd.

    ``concurrent.futures.wait``, ``as_completed`` and ``add_done_callback``
    work unchanged. ``result()`` returns the job's value, raises
    :class:`~jobd.JobFailed` for a failed job and ``CancelledError`` for a
    cancelled one. ``cancel()`` asks jobd (see :meth:`cancel`); ``running()``
    asks jobd too, since only jobd knows.
    """

    def __init__(self, job_id: str, function: str, core: Core | None) -> None:
        super().__init__()
        self.job_id = job_id
        """The job's id, as jobd gave it."""
        self.function = function
        """The job function's name."""
        self._core = core

    def cancel(self) -> bool:
        """Asks jobd to cancel the job; True once the job is cancelled.

        As ``Future.cancel()``: True for a job that had not started (it never
        runs), False for one that has finished. Unlike a thread pool, jobd
        can stop a running job too: one on its async pool (or an async
        worker function) is aborted and this returns True; one on a blocking
        pool (or a sync worker function) is asked to stop and this returns
        False, and the future ends cancelled if the job honours the request.
        Raises :class:`~jobd.Unavailable` when jobd cannot be asked.
        """
        if self.done():
            return self.cancelled()
        core = self._core
        if core is None or core.closed:
            return False
        response = core.call(core.stub.Cancel, pb().CancelRequest(job_id=self.job_id))
        if response.cancelled or response.state == WIRE_CANCELLED:
            self._cancelled_by_jobd()
            return True
        return False

    def running(self) -> bool:
        """True while jobd runs the job (asked of jobd: this is one call)."""
        if self.done():
            return False
        core = self._core
        if core is None or core.closed:
            return False
        response = core.call(core.stub.Done, pb().DoneRequest(job_id=self.job_id))
        return bool(response.state == 2)

    def __repr__(self) -> str:
        return f"<JobFuture {self.function} {self.job_id} {self._state.lower()}>"

    def _settle(self, state: int, value: Any, error: Any) -> None:
        """Settles the future from a final state (a watch event, a Result, a GetJob).

        Idempotent: the first settlement wins, later ones change nothing.
        """
        if state == WIRE_SUCCEEDED:
            try:
                self.set_result(from_value(value))
            except Exception as err:  # InvalidStateError: already settled
                if not isinstance(err, _InvalidState):
                    raise
        elif state == WIRE_CANCELLED:
            self._cancelled_by_jobd()
        elif state == WIRE_FAILED:
            try:
                self.set_exception(job_failed(self.job_id, self.function, error))
            except _InvalidState:
                pass

    def _fail(self, exc: BaseException) -> None:
        try:
            self.set_exception(exc)
        except _InvalidState:
            pass

    def _cancelled_by_jobd(self) -> None:
        """Marks the future cancelled and wakes its waiters, in one step.

        ``Future.cancel()`` alone would leave it CANCELLED but unseen by
        ``wait()``/``as_completed()`` until ``set_running_or_notify_cancel``,
        which an executor calls when it would have started the work; here
        jobd decided, so both happen at once, under the future's lock.
        """
        with self._condition:
            if self._state != PENDING:
                return
            self._state = CANCELLED_AND_NOTIFIED
            for waiter in self._waiters:
                waiter.add_cancelled(self)
            self._condition.notify_all()
        self._invoke_callbacks()  # type: ignore[attr-defined]


try:
    from concurrent.futures import InvalidStateError as _InvalidState
except ImportError:  # pragma: no cover - Python < 3.8
    _InvalidState = RuntimeError  # type: ignore[misc, assignment]

_SETTLED_STATES = (CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED)


class Core:
    """What every view of one executor shares: the channel, the futures, the watches."""

    def __init__(self, connection: Connection, executor_id: str, max_pending: int | None) -> None:
        self.connection = connection
        self.metadata = connection.metadata
        self.executor_id = executor_id
        self.channel = connection.channel()
        self.stub = job_service(self.channel)
        self.max_pending = max_pending
        self.lock = threading.Lock()
        self.space = threading.Condition(self.lock)
        # Futures not yet settled by a final event, by job id.
        self.pending: dict[str, JobFuture] = {}
        # Final events of jobs whose submission has not registered a future yet.
        self.early: collections.OrderedDict[str, tuple[int, Any, Any]] = collections.OrderedDict()
        # Bumped whenever final events may have been missed (a fresh watch):
        # a submission that started before the bump checks its job itself.
        self.generation = 0
        self.watch: LabelWatch | None = None
        self.id_watch: IdWatch | None = None
        self.start_lock = threading.Lock()
        self.maps: weakref.WeakSet[MapIterator] = weakref.WeakSet()
        self.shutting_down = False
        self.closed = False

    # -- calls --------------------------------------------------------------

    def call(
        self,
        method: Callable[..., T],
        request: Any,
        *,
        retry: bool = True,
        timeout: float | None = None,
    ) -> T:
        """One unary call; retried while jobd is unavailable when ``retry``
        (every call made with it is safe to repeat)."""
        attempt = 0
        while True:
            try:
                return method(request, metadata=self.metadata, timeout=timeout)
            except grpc.RpcError as err:
                if (
                    retry
                    and err.code() == grpc.StatusCode.UNAVAILABLE
                    and attempt < len(RETRY_PAUSES)
                ):
                    time.sleep(RETRY_PAUSES[attempt])
                    attempt += 1
                    continue
                raise errors.from_grpc(err) from None
            except ValueError as err:
                # grpc raises ValueError for a call on a closed channel.
                if self.closed:
                    raise RuntimeError("the executor has been shut down") from err
                raise

    # -- futures --------------------------------------------------------------

    def register(self, future: JobFuture, generation: int) -> JobFuture:
        """Makes ``future`` wait for its job's final event; returns the future
        that does (an earlier one for the same job wins)."""
        early = None
        with self.lock:
            existing = self.pending.get(future.job_id)
            if existing is not None:
                return existing
            early = self.early.pop(future.job_id, None)
            if early is None:
                self.pending[future.job_id] = future
        if early is not None:
            future._settle(*early)
            return future
        if generation != self.generation:
            self.check(future)
        return future

    def wait_for_space(self) -> None:
        """Blocks while ``max_pending`` futures are unsettled (backpressure)."""
        if self.max_pending is None:
            return
        with self.space:
            while len(self.pending) >= self.max_pending and not self.closed:
                self.space.wait(1.0)

    def resolve(self, job_id: str, state: int, value: Any, error: Any) -> None:
        """A final event arrived for ``job_id``."""
        with self.lock:
            future = self.pending.pop(job_id, None)
            if future is None:
                self.early[job_id] = (state, value, error)
                if len(self.early) > EARLY_MAX:
                    self.early.popitem(last=False)
            elif self.max_pending is not None:
                self.space.notify()
        if future is not None:
            future._settle(state, value, error)

    def forget(self, job_id: str) -> None:
        with self.lock:
            self.pending.pop(job_id, None)
            self.space.notify()

    def unsettled(self) -> list[JobFuture]:
        with self.lock:
            return [f for f in self.pending.values() if f._state not in _SETTLED_STATES]

    def check(self, future: JobFuture) -> None:
        """Settles ``future`` now if its job has finished (a ``Result`` that does not wait)."""
        response = self.result_now(future.job_id)
        if isinstance(response, errors.NotFound):
            self.forget(future.job_id)
            future._fail(response)
        elif response is not None:
            self.resolve(future.job_id, response.state, response.value, response.error)

    def result_now(self, job_id: str) -> Any:
        """The job's ``ResultResponse`` if it has finished, None if not, or
        the NotFound it raised."""
        request = pb().ResultRequest(job_id=job_id)
        request.timeout.SetInParent()  # zero: answer at once
        try:
            return self.call(self.stub.Result, request)
        except errors.DeadlineExceeded:
            return None
        except errors.NotFound as err:
            return err

    def reconcile(self) -> None:
        """Asks jobd for every pending job once: after a fresh watch, final
        events that came before it are not coming again."""
        with self.lock:
            self.generation += 1
            ids = list(self.pending)
        for job_id in ids:
            with self.lock:
                future = self.pending.get(job_id)
            if future is None:
                continue
            try:
                self.check(future)
            except errors.JobdError as err:
                log.warning("cannot ask jobd about job %s: %s", job_id, err)

    def fail_all(self, exc: errors.JobdError) -> None:
        """Fails every pending future (the watch could not be restored)."""
        with self.lock:
            futures = list(self.pending.values())
            self.pending.clear()
            self.space.notify_all()
        for future in futures:
            future._fail(exc)

    # -- watching ---------------------------------------------------------------

    def ensure_watching(self) -> None:
        """Makes sure the label watch runs: before the first submission, so
        that no final event can come before it."""
        watch = self.watch
        if watch is not None and watch.alive:
            return
        with self.start_lock:
            watch = self.watch
            if watch is not None and watch.alive:
                return
            watch = LabelWatch(self)
            watch.start()  # raises if jobd cannot be reached
            self.watch = watch

    def adopt(self, future: JobFuture) -> None:
        with self.start_lock:
            if self.id_watch is None or not self.id_watch.alive:
                self.id_watch = IdWatch(self)
            self.id_watch.add(future.job_id)

    # -- shutting down ------------------------------------------------------------

    def idle(self) -> bool:
        with self.lock:
            return not self.pending and not self.maps

    def close_if_idle(self) -> None:
        """Closes the channel once the executor is shut down and nothing is left."""
        if self.shutting_down and not self.closed and self.idle():
            self.close()

    def close(self) -> None:
        with self.lock:
            if self.closed:
                return
            self.closed = True
            self.space.notify_all()
        for watch in (self.watch, self.id_watch):
            if watch is not None:
                watch.stop()
        self.channel.close()


class LabelWatch:
    """The one Watch stream that settles an executor's own futures."""

    def __init__(self, core: Core) -> None:
        self.core = core
        self.call: Any = None
        self.epoch = ""
        self.seq = 0
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None
        self.alive = False

    def start(self) -> None:
        self.call = self.open(resume=False)
        self.alive = True
        self.thread = threading.Thread(
            target=self.run, name=f"jobd-watch-{self.core.executor_id[:8]}", daemon=True
        )
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        call = self.call
        if call is not None:
            call.cancel()
        thread = self.thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)

    def open(self, resume: bool) -> Any:
        """Opens the watch and waits until jobd has set it up (its response
        headers): from then on every final event of the executor's jobs
        reaches it."""
        jobd_pb2 = pb()
        request = jobd_pb2.WatchRequest(
            states=[WIRE_SUCCEEDED, WIRE_FAILED, WIRE_CANCELLED],
            labels={EXECUTOR_LABEL: self.core.executor_id},
        )
        if resume:
            request.stream_epoch = self.epoch
            request.after_seq = self.seq
        call = self.core.stub.Watch(request, metadata=self.core.metadata)
        call.initial_metadata()
        if call.done() and call.code() != grpc.StatusCode.OK:
            raise errors.from_grpc(call)
        return call

    def run(self) -> None:
        core = self.core
        try:
            while not self.stopping.is_set():
                try:
                    for event in self.call:
                        self.on_event(event)
                        if core.shutting_down and core.idle():
                            core.close()
                            return
                    problem: errors.RpcError = errors.Unavailable("the watch stream ended")
                except grpc.RpcError as err:
                    if self.stopping.is_set():
                        return
                    problem = errors.from_grpc(err)
                if not self.reconnect(problem):
                    return
        finally:
            self.alive = False

    def on_event(self, event: Any) -> None:
        if event.kind == WATCH_EVENT_LAGGED:
            # Events were skipped: a filter watch cannot replay them, so ask.
            log.info("jobd says this executor's watch lagged (%d events missed)", event.missed)
            self.epoch, self.seq = event.stream_epoch, event.seq
            self.core.reconcile()
            return
        self.epoch, self.seq = event.stream_epoch, event.seq
        if event.state in (WIRE_SUCCEEDED, WIRE_FAILED, WIRE_CANCELLED):
            self.core.resolve(event.job_id, event.state, event.value, event.error)

    def reconnect(self, problem: errors.RpcError) -> bool:
        """Reopens the watch after a break; False when it is over (stopped,
        or jobd stayed away and the pending futures were failed)."""
        core = self.core
        if isinstance(problem, errors.Unauthenticated | errors.PermissionDenied):
            core.fail_all(problem)
            return False
        deadline = time.monotonic() + RECONNECT_TIMEOUT
        pause = 0.05
        log.debug("the executor's watch broke (%s); reconnecting", problem)
        while not self.stopping.is_set():
            try:
                resumable = bool(self.epoch)
                try:
                    self.call = self.open(resume=resumable)
                except (errors.FailedPrecondition, errors.OutOfRange):
                    # jobd restarted (another epoch) or forgot: start afresh.
                    resumable = False
                    self.call = self.open(resume=False)
                if not resumable:
                    self.epoch, self.seq = "", 0
                    core.reconcile()
                return True
            except errors.RpcError as err:
                if isinstance(err, errors.Unauthenticated | errors.PermissionDenied):
                    core.fail_all(err)
                    return False
                if time.monotonic() >= deadline:
                    core.fail_all(
                        errors.Unavailable(
                            f"lost contact with jobd for {RECONNECT_TIMEOUT:.0f}s ({err.message}); "
                            "the job may still run: adopt it again with Executor.future(job_id)"
                        )
                    )
                    return False
                self.stopping.wait(pause)
                pause = min(pause * 2, 2.0)
        return False


class IdWatch:
    """Watches jobs adopted by id (they do not carry the executor's label).

    One stream at a time, of up to 1,000 ids; adopting another id restarts
    it with the new set (jobd sends a snapshot of each id first, so a job
    that finished meanwhile is not missed).
    """

    def __init__(self, core: Core) -> None:
        self.core = core
        self.ids: set[str] = set()
        self.watched: frozenset[str] = frozenset()
        self.cond = threading.Condition()
        self.call: Any = None
        self.stopping = False
        self.alive = True
        self.thread = threading.Thread(target=self.run, name="jobd-adopted", daemon=True)
        self.thread.start()

    def add(self, job_id: str) -> None:
        with self.cond:
            self.ids.add(job_id)
            self.cond.notify()
            call = self.call
            restart = call is not None and len(self.watched) < WATCH_IDS_MAX
        if restart:
            call.cancel()

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify()
            call = self.call
        if call is not None:
            call.cancel()
        if self.thread is not threading.current_thread():
            self.thread.join(timeout=5)

    def run(self) -> None:
        core = self.core
        pause = 0.05
        try:
            while True:
                with self.cond:
                    while not self.ids and not self.stopping:
                        self.cond.wait()
                    if self.stopping:
                        return
                    batch = sorted(self.ids)[:WATCH_IDS_MAX]
                    self.watched = frozenset(batch)
                    request = pb().WatchRequest(job_ids=batch)
                    self.call = call = core.stub.Watch(request, metadata=core.metadata)
                try:
                    for event in call:
                        if event.state in (WIRE_SUCCEEDED, WIRE_FAILED, WIRE_CANCELLED):
                            with self.cond:
                                self.ids.discard(event.job_id)
                            core.resolve(event.job_id, event.state, event.value, event.error)
                    pause = 0.05
                except grpc.RpcError as err:
                    code = err.code()
                    if code == grpc.StatusCode.CANCELLED:
                        continue  # restarted for a new id, or stopping
                    problem = errors.from_grpc(err)
                    if isinstance(problem, errors.NotFound):
                        self.settle_missing(batch)
                        continue
                    log.debug("the watch of adopted jobs broke (%s); reconnecting", problem)
                    with self.cond:
                        self.cond.wait(pause)
                    pause = min(pause * 2, 2.0)
        finally:
            with self.cond:
                self.call = None
            self.alive = False

    def settle_missing(self, batch: Iterable[str]) -> None:
        """Some watched id is unknown to jobd (deleted, expired): find which."""
        for job_id in batch:
            with self.core.lock:
                future = self.core.pending.get(job_id)
            if future is None:
                with self.cond:
                    self.ids.discard(job_id)
                continue
            try:
                self.core.check(future)
            except errors.JobdError:
                continue
            if future.done():
                with self.cond:
                    self.ids.discard(job_id)
