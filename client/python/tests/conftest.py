"""Test harness: the real jobd binary on 127.0.0.1, and helpers that wait on
signals (watch events, process output), never on sleeps.

``JOBD_BIN`` names the binary (``cargo test`` sets it to the one it built, see
server/tests/python.rs); without it the repository's own build is used if
there is one. Each server binds port 0 and reports the address it got, so
tests never race for a port; it runs with ``--store memory`` unless a test
asks for SQLite, in a temporary directory, and is stopped by its PID.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

import jobd

HERE = Path(__file__).resolve().parent
PACKAGE = HERE.parent
REPO = PACKAGE.parent.parent

# Worker flags for every server: a lost worker's jobs come back within
# about two seconds instead of thirty.
WORKER_FLAGS = ["--worker-heartbeat-interval", "200ms", "--worker-lease-timeout", "1s"]


def _check_installed_package() -> None:
    """Fails the run when the installed jobd is not this checkout's: tests
    of stale code would pass or fail for the wrong reasons."""
    installed = Path(jobd.__file__).resolve().parent
    source = PACKAGE / "src" / "jobd"
    hint = "reinstall it: python3 -m pip install './client/python[test]'"
    if installed != source.resolve():
        for path in source.glob("*.py"):
            copy = installed / path.name
            if not copy.is_file() or copy.read_bytes() != path.read_bytes():
                pytest.exit(
                    f"the installed jobd package ({installed}) differs from {path}: {hint}", 2
                )
    from jobd import v1

    digest = hashlib.sha256()
    for name in ("jobd.proto", "worker.proto"):
        digest.update((REPO / "proto" / "jobd" / "v1" / name).read_bytes())
    if getattr(v1, "PROTO_SHA256", None) != digest.hexdigest():
        pytest.exit(f"the installed jobd stubs were generated from other .proto files: {hint}", 2)


def pytest_configure(config: pytest.Config) -> None:
    _check_installed_package()


def jobd_binary() -> str:
    binary = os.environ.get("JOBD_BIN")
    if binary:
        if not os.access(binary, os.X_OK):
            pytest.exit(f"JOBD_BIN={binary} is not an executable", 2)
        return binary
    for profile in ("release", "debug"):
        candidate = REPO / "target" / profile / "jobd"
        if candidate.is_file():
            return str(candidate)
    pytest.exit("no jobd binary: set JOBD_BIN, or build it (cargo build --release --bin jobd)", 2)


class JobdServer:
    """One jobd process on 127.0.0.1 (a free port), stopped by its PID."""

    def __init__(self, *args: str, store_dir: Path | None = None, listen: str = "127.0.0.1:0"):
        self.args = list(args)
        self.store_dir = store_dir
        self.listen = listen
        self.process: subprocess.Popen[str] | None = None
        self.address = ""
        self.log: list[str] = []

    def start(self) -> JobdServer:
        store = ["--store", "memory"]
        if self.store_dir is not None:
            store = ["--store", "sqlite", "--data-dir", str(self.store_dir)]
        command = [jobd_binary(), "--listen", self.listen, *store, *self.args]
        self.process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn")},
        )
        lines: queue.Queue[str | None] = queue.Queue()

        def pump(stream: Any, keep: list[str], announce: bool) -> None:
            for line in stream:
                keep.append(line)
                if announce:
                    lines.put(line)
            if announce:
                lines.put(None)

        threading.Thread(target=pump, args=(self.process.stdout, [], True), daemon=True).start()
        threading.Thread(
            target=pump, args=(self.process.stderr, self.log, False), daemon=True
        ).start()
        deadline = time.monotonic() + 30
        while True:
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self.stop()
                raise RuntimeError("jobd did not say where it listens within 30 s") from None
            if line is None:
                raise RuntimeError(f"jobd exited at start: {''.join(self.log)}")
            if line.startswith("listening on "):
                self.address = "http://" + line.split()[-1]
                return self

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        process = self.process
        if process is None or process.poll() is not None:
            return process.returncode if process else None
        process.send_signal(sig)
        try:
            return process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            return process.wait(timeout=10)

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def stubs(self) -> Any:
        """Plain generated stubs on a new channel (for what the test itself checks)."""
        from jobd.v1 import jobd_pb2_grpc

        channel = grpc.insecure_channel(self.address.removeprefix("http://"))
        return jobd_pb2_grpc.JobServiceStub(channel)


@pytest.fixture(scope="session")
def server() -> Iterator[JobdServer]:
    """The jobd most tests share: two blocking threads (the seed example's
    ThreadPoolExecutor(max_workers=2)) and quick worker leases."""
    jobd_server = JobdServer("--blocking-workers", "2", *WORKER_FLAGS).start()
    yield jobd_server
    assert jobd_server.stop() == 0, "jobd did not shut down cleanly"


@pytest.fixture
def pool(server: JobdServer) -> Iterator[jobd.Executor]:
    executor = jobd.Executor(server.address)
    yield executor
    executor.shutdown(wait=True, cancel_futures=True)


def wire_state(name: str) -> int:
    return jobd.JobState(name).to_wire()


def wait_for_state(server: JobdServer, job_id: str, state: str, timeout: float = 10) -> Any:
    """Waits (on a Watch stream: no polling) until ``job_id`` reaches ``state``
    (or has finished); returns the event."""
    from jobd.v1 import jobd_pb2

    stub = server.stubs()
    wanted = wire_state(state)
    call = stub.Watch(jobd_pb2.WatchRequest(job_ids=[job_id]), timeout=timeout)
    for event in call:
        if event.state == wanted or event.state in (3, 4, 5):
            call.cancel()
            return event
    raise AssertionError(f"job {job_id} never reached {state}")


def wait_for_progress(server: JobdServer, job_id: str, timeout: float = 10) -> Any:
    """Waits for the first progress report of ``job_id`` (a Watch event)."""
    from jobd.v1 import jobd_pb2

    call = server.stubs().Watch(jobd_pb2.WatchRequest(job_ids=[job_id]), timeout=timeout)
    for event in call:
        if event.HasField("progress"):
            call.cancel()
            return event
    raise AssertionError(f"job {job_id} reported no progress")


@contextlib.contextmanager
def running_worker(worker: jobd.Worker, timeout: float = 10) -> Iterator[jobd.Worker]:
    """Runs ``worker`` on a thread for the block; drains it after."""
    failure: list[BaseException] = []

    def run() -> None:
        try:
            worker.run(handle_signals=False)
        except BaseException as err:  # reported by the test below
            failure.append(err)

    thread = threading.Thread(target=run, name="test-worker", daemon=True)
    thread.start()
    if not worker.wait_attached(timeout):
        worker.stop()
        thread.join(timeout)
        raise AssertionError(f"the worker did not attach: {failure}")
    try:
        yield worker
    finally:
        worker.stop()
        thread.join(timeout)
        assert not thread.is_alive(), "the worker did not stop"
    if failure:
        raise failure[0]


class WorkerProcess:
    """tests/worker_process.py in its own process, its output read line by line."""

    def __init__(self, address: str, *args: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(HERE / "worker_process.py"), address, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.stderr: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()
        threading.Thread(
            target=lambda: self.stderr.extend(self.process.stderr or []), daemon=True
        ).start()

    def _pump(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line.strip())
        self.lines.put(None)

    def expect(self, prefix: str, timeout: float = 15) -> str:
        """The next line of output starting with ``prefix`` (others are skipped)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(
                    f"the worker process printed no {prefix!r} line; stderr: {''.join(self.stderr)}"
                ) from None
            if line is None:
                raise AssertionError(
                    f"the worker process exited before printing {prefix!r}; "
                    f"stderr: {''.join(self.stderr)}"
                )
            if line.startswith(prefix):
                return line

    def signal(self, sig: int) -> None:
        self.process.send_signal(sig)

    def wait(self, timeout: float = 20) -> int:
        return self.process.wait(timeout=timeout)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
