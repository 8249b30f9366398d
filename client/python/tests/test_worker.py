"""Python workers against the real jobd: a Python program submits, jobd
dispatches, Python workers run the functions."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import signal
import threading
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
