"""Python workers against the real jobd: a Python program submits, jobd
dispatches, Python workers run the functions."""

from __future__ import annotations

import asyncio
import concurrent.futures
import io
import logging
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import jobd
from conftest import (
    WORKER_FLAGS,
    JobdServer,
    WorkerProcess,
    running_worker,
    wait_for_progress,
    wait_for_state,
)
from jobd.v1 import jobd_pb2


def test_python_program_to_python_workers(server: JobdServer, pool: jobd.Executor) -> None:
    first = WorkerProcess(server.address, "--slots", "2")
    second = WorkerProcess(server.address, "--slots", "2")
    try:
        first.expect("attached")
        second.expect("attached")
        futures = [pool.submit("whoami", n) for n in range(40)]
        results = [f.result(timeout=30) for f in futures]
        assert [n for n, _ in results] == list(range(40))
        pids = {pid for _, pid in results}
        assert pids <= {first.process.pid, second.process.pid}
        ordered = list(pool.map("whoami", range(200)))
        assert [n for n, _ in ordered] == list(range(200))
        assert {pid for _, pid in ordered} <= {first.process.pid, second.process.pid}
    finally:
        for process in (first, second):
            process.signal(signal.SIGTERM)
        assert first.wait() == 0 and second.wait() == 0


def test_worker_killed_mid_job_completes_on_a_second_worker(
    server: JobdServer, pool: jobd.Executor
) -> None:
    doomed = WorkerProcess(server.address)
    rescuer: WorkerProcess | None = None
    try:
        doomed.expect("attached")
        future = pool.submit("hold", 60)
        assert doomed.expect("started").split()[1:] == [future.job_id, "1"]
        doomed.signal(signal.SIGKILL)
        doomed.wait()
        rescuer = WorkerProcess(server.address)
        # The lease lapses (1 s without heartbeats), the job goes back to
        # pending, and the second worker runs its second attempt.
        assert rescuer.expect("started").split()[1:] == [future.job_id, "2"]
        assert future.result(timeout=20) == {"pid": rescuer.process.pid, "attempt": 2}
        assert pool.status(future).attempt == 2
    finally:
        doomed.stop()
        if rescuer is not None:
            rescuer.signal(signal.SIGTERM)
            assert rescuer.wait() == 0


def test_sigterm_drains_then_gives_back_what_cannot_finish(
    server: JobdServer, pool: jobd.Executor
) -> None:
    worker = WorkerProcess(server.address, "--grace", "1")
    helper: WorkerProcess | None = None
    try:
        worker.expect("attached")
        quick = pool.submit("nap", 0.5)
        worker.expect("started")
        long = pool.submit("nap", 60)
        worker.expect("started")
        worker.signal(signal.SIGTERM)
        # The quick job finishes within the grace and is reported; the long
        # one is given back when the grace ends; then the worker exits 0.
        assert worker.wait(timeout=20) == 0
        assert quick.result(timeout=5)["attempt"] == 1
        assert not long.done()
        helper = WorkerProcess(server.address, "--grace", "0.2")
        # Given back: pending again, so the next worker takes it (a second attempt).
        line = helper.expect("started")
        assert line.split()[1] == long.job_id
        helper.signal(signal.SIGTERM)  # its grace is short: it gives the job back too
        assert helper.wait(timeout=20) == 0
    finally:
        worker.stop()
        if helper is not None:
            helper.stop()
    long.cancel()


def test_functions_schemas_errors_retries(server: JobdServer, pool: jobd.Executor) -> None:
    worker = jobd.Worker(server.address, slots=4)

    @worker.function(schema={"type": "string"})
    def shout(text):  # type: ignore[no-untyped-def]
        return text.upper()

    @worker.function()
    def py_add(a: int, b: int = 10) -> int:
        """Adds two integers."""
        return a + b

    @worker.function()
    def py_boom() -> None:
        raise ValueError("boom")

    @worker.function()
    async def py_flaky(ctx: jobd.Context) -> int:
        if ctx.attempt < 2:
            raise jobd.Retry("not yet")
        return ctx.attempt

    @worker.function()
    def py_not_json() -> object:
        return {1, 2}

    with running_worker(worker):
        assert pool.submit(shout, "hi").result(timeout=10) == "HI"
        assert pool.submit("py_add", 1, 2).result(timeout=10) == 3
        assert pool.submit("py_add", a=5).result(timeout=10) == 15
        assert pool.submit("py_add", 5).result(timeout=10) == 15
        with pytest.raises(jobd.InvalidArgument) as refused:
            pool.submit("py_add", "x", 2)
        assert [(v.field, v.description) for v in refused.value.field_violations] == [
            ("args[0]", '"x" is not of type "integer"')
        ]
        with pytest.raises(jobd.InvalidArgument) as refused:
            pool.submit("shout", 5)
        assert [v.field for v in refused.value.field_violations] == ["args"]
        info = {f.name: f for f in pool.functions()}["py_add"]
        assert info.description == "Adds two integers." and info.returns == "int"
        assert info.workers == 1 and info.pool == "worker"
        assert info.args_schema["properties"]["a"] == {"type": "integer"}

        with pytest.raises(jobd.JobFailed) as failed:
            pool.submit("py_boom").result(timeout=10)
        assert failed.value.kind is jobd.ErrorKind.FAILED
        assert failed.value.message == "ValueError: boom"

        assert pool.with_options(max_attempts=3).submit("py_flaky").result(timeout=20) == 2
        with pytest.raises(jobd.JobFailed) as out_of_attempts:
            pool.submit("py_flaky").result(timeout=10)
        assert out_of_attempts.value.message == "not yet"

        with pytest.raises(jobd.JobFailed, match="not JSON"):
            pool.submit("py_not_json").result(timeout=10)


def test_cancel_reaches_async_and_sync_functions(server: JobdServer, pool: jobd.Executor) -> None:
    worker = jobd.Worker(server.address, slots=4)
    seen: dict[str, threading.Event] = {"async": threading.Event(), "sync": threading.Event()}

    @worker.function()
    async def py_wait_async() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            seen["async"].set()
            raise

    @worker.function()
    def py_wait_sync(ctx: jobd.Context) -> str:
        if ctx.sleep(60):
            seen["sync"].set()
            ctx.raise_if_cancelled()
        return "not cancelled"

    with running_worker(worker):
        for name, kind in (("py_wait_async", "async"), ("py_wait_sync", "sync")):
            future = pool.submit(name)
            wait_for_state(server, future.job_id, "running")
            # jobd pushes the cancel to the worker; the job ends when the
            # worker reports it, so cancel() itself cannot say True yet.
            future.cancel()
            with pytest.raises(concurrent.futures.CancelledError):
                future.result(timeout=10)
            assert seen[kind].is_set(), f"the {kind} function never saw its cancel"


def test_progress_reaches_jobd(server: JobdServer, pool: jobd.Executor) -> None:
    worker = jobd.Worker(server.address, slots=2)
    release = threading.Event()

    @worker.function()
    async def py_steps(ctx: jobd.Context) -> str:
        ctx.progress(1, 4, "one of four")
        while not release.is_set():
            await asyncio.sleep(0.01)
        return "done"

    with running_worker(worker):
        future = pool.submit("py_steps")
        event = wait_for_progress(server, future.job_id)
        assert event.progress.fraction == 0.25
        assert event.progress.message == "one of four"
        progress = pool.status(future).progress
        assert progress is not None and progress.fraction == 0.25
        release.set()
        assert future.result(timeout=10) == "done"


def test_worker_tokens(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(
        "client-token-0123456789 name=client\nworker-token-0123456789 worker name=worker\n"
    )
    tokens.chmod(0o600)
    protected = JobdServer("--auth-token-file", str(tokens), *WORKER_FLAGS).start()
    try:

        def worker_with(token: str | None) -> jobd.Worker:
            worker = jobd.Worker(protected.address, token=token, slots=1)

            @worker.function()
            def py_tokened(n: int) -> int:
                return n * 2

            return worker

        for token, error in (
            (None, jobd.Unauthenticated),
            ("client-token-0123456789", jobd.PermissionDenied),
        ):
            with pytest.raises(error):
                worker_with(token).run(handle_signals=False)
        with running_worker(worker_with("worker-token-0123456789")):
            with jobd.Executor(protected.address, token="client-token-0123456789") as pool:
                assert pool.submit("py_tokened", 21).result(timeout=10) == 42
            with jobd.Executor(protected.address, token="worker-token-0123456789") as pool:
                with pytest.raises(jobd.PermissionDenied):
                    pool.submit("py_tokened", 1)
            os.environ["JOBD_TOKEN"] = "client-token-0123456789"
            try:
                with jobd.Executor(protected.address) as pool:
                    assert pool.submit("py_tokened", 1).result(timeout=10) == 2
            finally:
                del os.environ["JOBD_TOKEN"]
    finally:
        assert protected.stop() == 0


def test_worker_rides_out_a_jobd_restart(tmp_path: Path) -> None:
    """A job running on a worker survives a kill -9 of jobd (durable store):
    the worker reconnects, re-attaches the job, and its report is accepted."""
    first = JobdServer(*WORKER_FLAGS, store_dir=tmp_path / "data").start()
    listen = first.address.removeprefix("http://")
    worker = jobd.Worker(first.address, slots=2)
    release = threading.Event()
    started = threading.Event()

    @worker.function()
    def py_survivor(ctx: jobd.Context) -> int:
        started.set()
        release.wait(30)
        return ctx.attempt

    second: JobdServer | None = None
    try:
        with running_worker(worker):
            submitter = jobd.Executor(first.address)
            job_id = submitter.submit("py_survivor").job_id
            submitter.shutdown(wait=False)
            assert started.wait(10)
            first.kill()
            second = JobdServer(*WORKER_FLAGS, store_dir=tmp_path / "data", listen=listen).start()
            # The worker reconnects by itself and re-attaches the running job.
            assert worker.wait_attached(15, count=2)
            release.set()
            with jobd.Executor(second.address) as pool:
                # Attempt 1 still: the job was not run again, its report counted.
                assert pool.future(job_id).result(timeout=20) == 1
    finally:
        release.set()
        first.kill()
        if second is not None:
            assert second.stop() == 0


STDOUT, STDERR, LOG = (
    jobd_pb2.LOG_STREAM_STDOUT,
    jobd_pb2.LOG_STREAM_STDERR,
    jobd_pb2.LOG_STREAM_LOG,
)


def job_log(server: JobdServer, job_id: str) -> list[tuple[int, bytes]]:
    """The job's whole log as jobd has it now (stream, data), read once."""
    entries: list[tuple[int, bytes]] = []
    request = jobd_pb2.LogsRequest(job_id=job_id, offset=0, follow=False)
    for page in server.stubs().Logs(request, timeout=10):
        assert page.skipped == 0
        for entry in page.entries:
            assert entry.attempt == 1
            entries.append((entry.stream, entry.data))
    return entries


@pytest.fixture
def app_logger() -> Iterator[logging.Logger]:
    """A logger of the job's code, passing everything (DEBUG) to the root's handlers."""
    logger = logging.getLogger("jobd-test.app")
    level = logger.level
    logger.setLevel(logging.DEBUG)
    yield logger
    logger.setLevel(level)


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_job_logs_reach_jobd_in_order_before_the_report(
    server: JobdServer, pool: jobd.Executor, app_logger: logging.Logger, kind: str
) -> None:
    worker = jobd.Worker(server.address, slots=2)

    def first_steps(ctx: jobd.Context) -> None:
        ctx.log(f"{kind} starts")
        ctx.log_output("stdout", b"raw \xff\xfe not UTF-8\n")
        ctx.log_output("stderr", "half a ")
        ctx.log_output("stderr", b"line\n")
        app_logger.info("info from %s", kind)
        app_logger.debug("debug is below INFO: not in the log")

    def last_steps(ctx: jobd.Context) -> None:
        for n in range(300):
            ctx.log(f"line {n}")
        ctx.log("returning\n")  # just before the report

    @worker.function()
    def py_log_sync(ctx: jobd.Context) -> str:
        first_steps(ctx)
        last_steps(ctx)
        return "sync done"

    @worker.function()
    async def py_log_async(ctx: jobd.Context) -> str:
        first_steps(ctx)
        await asyncio.sleep(0)  # the rest runs in the job's task

        async def child() -> None:
            app_logger.warning("from a task the job started")

        await asyncio.create_task(child())
        last_steps(ctx)
        return "async done"

    expected = [
        (LOG, f"{kind} starts\n".encode()),
        (STDOUT, b"raw \xff\xfe not UTF-8\n"),
        (STDERR, b"half a "),
        (STDERR, b"line\n"),
        (LOG, f"INFO jobd-test.app: info from {kind}\n".encode()),
    ]
    if kind == "async":
        expected.append((LOG, b"WARNING jobd-test.app: from a task the job started\n"))
    expected += [(LOG, f"line {n}\n".encode()) for n in range(300)]
    expected.append((LOG, b"returning\n"))

    with running_worker(worker):
        for _ in range(3):
            future = pool.submit(f"py_log_{kind}")
            assert future.result(timeout=10) == f"{kind} done"
            # Read once, right after the result: every line came before the report.
            assert job_log(server, future.job_id) == expected


def test_job_log_is_bounded_and_counts_dropped_lines(
    server: JobdServer, pool: jobd.Executor
) -> None:
    worker = jobd.Worker(server.address, slots=1)
    line = "x" * 1023  # 1 KiB with its newline

    @worker.function()
    async def py_log_flood(lines: int, ctx: jobd.Context) -> int:
        # No await: the worker cannot send anything until this returns, so
        # all of it waits, and the bound (256 KiB per job) applies exactly.
        for _ in range(lines):
            ctx.log(line)
        return lines

    with running_worker(worker):
        flooded = pool.submit("py_log_flood", 300)
        assert flooded.result(timeout=10) == 300
        entries = job_log(server, flooded.job_id)
        assert entries[:-1] == [(LOG, (line + "\n").encode())] * 256
        assert entries[-1] == (
            LOG,
            b"[worker: 44 log lines dropped: the job wrote faster than they could be sent]\n",
        )
        # The bound is per job: the next one starts afresh.
        fits = pool.submit("py_log_flood", 256)
        assert fits.result(timeout=10) == 256
        assert job_log(server, fits.job_id) == [(LOG, (line + "\n").encode())] * 256


def _capture_handlers() -> list[logging.Handler]:
    return [h for h in logging.getLogger().handlers if type(h).__name__ == "_JobLogHandler"]


def test_logging_capture_is_scoped_to_jobs_and_can_be_turned_off(
    server: JobdServer, pool: jobd.Executor, app_logger: logging.Logger
) -> None:
    started = threading.Event()
    release = threading.Event()

    def held(ctx: jobd.Context) -> str:
        started.set()
        assert release.wait(10)
        app_logger.info("inside the job")
        ctx.log("explicit")
        return "held"

    worker = jobd.Worker(server.address, slots=1)
    worker.add(held, name="py_log_held")
    quiet = jobd.Worker(server.address, slots=1, capture_logging=False)
    quiet.add(held, name="py_log_held_quiet")
    assert _capture_handlers() == []
    with running_worker(quiet):
        assert _capture_handlers() == []
        with running_worker(worker):
            assert len(_capture_handlers()) == 1
            future = pool.submit("py_log_held")
            assert started.wait(10)
            # While the job runs, but not in its context: not its line.
            app_logger.warning("outside the job")
            release.set()
            assert future.result(timeout=10) == "held"
            assert job_log(server, future.job_id) == [
                (LOG, b"INFO jobd-test.app: inside the job\n"),
                (LOG, b"explicit\n"),
            ]
            # The other worker's handler is there, but this worker does not capture.
            future = pool.submit("py_log_held_quiet")
            assert future.result(timeout=10) == "held"
            assert job_log(server, future.job_id) == [(LOG, b"explicit\n")]
        assert _capture_handlers() == []  # removed when the worker stopped


def test_capture_keeps_warnings_of_unconfigured_logging_printed(
    server: JobdServer, pool: jobd.Executor
) -> None:
    """Without handlers of its own, Python prints WARNING records
    (logging.lastResort); the worker's handler on the root logger must not
    silence them."""
    logger = logging.getLogger("jobd-test.unconfigured")
    root = logging.getLogger()
    saved_handlers, saved_last_resort = root.handlers[:], logging.lastResort
    printed = io.StringIO()
    logging.lastResort = logging.StreamHandler(printed)
    logging.lastResort.setLevel(logging.WARNING)
    for handler in saved_handlers:
        root.removeHandler(handler)
    try:
        worker = jobd.Worker(server.address, slots=1)

        @worker.function()
        def py_log_warns() -> None:
            logger.warning("inside the job")
            logger.info("INFO does not pass the root logger's WARNING")

        with running_worker(worker):
            logger.warning("outside a job")
            future = pool.submit("py_log_warns")
            assert future.result(timeout=10) is None
            assert job_log(server, future.job_id) == [
                (LOG, b"WARNING jobd-test.unconfigured: inside the job\n")
            ]
    finally:
        logging.lastResort = saved_last_resort
        for handler in saved_handlers:
            root.addHandler(handler)
    assert printed.getvalue() == "outside a job\ninside the job\n"
