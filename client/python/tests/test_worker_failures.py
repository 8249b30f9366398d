"""Python workers that stall or lose the network while they run a job, against
the real jobd: a lapsed lease sends the job to another worker, and the late
report of the first is fenced off (refused, changing nothing); a connection
that merely blinks costs nothing (the job is re-attached, not run again).

Every job here runs ``gated`` (tests/worker_process.py): each run leaves a
file ``run-ATTEMPT-PID`` saying when it started, then waits for the test to
create ``release-ATTEMPT``. The worker processes run with ``--log``, so the
test can wait on what the worker's own logger says (a session attached, a
report refused as stale).
"""

from __future__ import annotations

import json
import queue
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from netproxy import TcpProxy

import jobd
from conftest import WORKER_FLAGS, JobdServer, WorkerProcess

# conftest's WORKER_FLAGS: heartbeats every 200 ms, leases of 1 s.
LEASE = 1.0


@pytest.fixture
def lease_server() -> Iterator[JobdServer]:
    """A jobd of this test's own (no other test's workers), with short
    leases, that does not wait long for workers' reports when it stops."""
    server = JobdServer(*WORKER_FLAGS, "--shutdown-grace", "1s").start()
    yield server
    assert server.stop() == 0, "jobd did not shut down cleanly"


@pytest.fixture
def executor(lease_server: JobdServer) -> Iterator[jobd.Executor]:
    """An executor on ``lease_server``, whose jobs are cancelled at the end."""
    pool = jobd.Executor(lease_server.address)
    yield pool
    # Without waiting: the job of a test that failed may not settle until
    # jobd stops (its worker was killed, or is paused).
    pool.shutdown(wait=False, cancel_futures=True)


def runs(directory: Path) -> list[tuple[int, int]]:
    """(attempt, pid) of every run of ``gated`` there, in order of attempt."""
    found = []
    for path in directory.glob("run-*"):
        mark = json.loads(path.read_text())
        found.append((mark["attempt"], mark["pid"]))
    return sorted(found)


def started_at(directory: Path, attempt: int, pid: int) -> float:
    """When (time.time()) that run of ``gated`` started."""
    return float(json.loads((directory / f"run-{attempt}-{pid}").read_text())["started"])


def release(directory: Path, attempt: int) -> None:
    (directory / f"release-{attempt}").touch()


def stale_line(job_id: str) -> str:
    """The start of the line a ``--log`` worker prints when jobd refuses its report."""
    return f"log jobd refused the report of job {job_id} as stale"


def rest_of(process: WorkerProcess) -> list[str]:
    """What an exited worker process printed that no ``expect`` took."""
    lines = []
    while True:
        try:
            line = process.lines.get(timeout=10)
        except queue.Empty:
            raise AssertionError("the worker's output did not end") from None
        if line is None:
            return lines
        lines.append(line)


def terminate(process: WorkerProcess) -> list[str]:
    """Drains an idle worker process (SIGTERM): it must exit 0; returns the rest of its output."""
    process.signal(signal.SIGTERM)
    assert process.wait(timeout=15) == 0, "".join(process.stderr)
    return rest_of(process)


def kill(process: WorkerProcess | None) -> None:
    """Kills a worker process whatever state it is in (a stopped one too)."""
    if process is None or process.process.poll() is not None:
        return
    process.signal(signal.SIGCONT)  # not needed by SIGKILL, but by anything gentler
    process.stop()


def test_paused_worker_is_fenced_off_when_it_resumes(
    lease_server: JobdServer, executor: jobd.Executor, tmp_path: Path
) -> None:
    """SIGSTOP a worker mid-job: its lease lapses, the job runs again on a
    second worker (attempt 2) and ends with that worker's result. Resumed
    (SIGCONT), the first worker finishes attempt 1 and reports it: jobd
    refuses the report as stale, and the job keeps attempt 2's result."""
    paused = WorkerProcess(lease_server.address, "--log")
    rescuer: WorkerProcess | None = None
    try:
        paused.expect("attached")
        future = executor.submit("gated", str(tmp_path))
        job_id = future.job_id
        assert paused.expect("started").split()[1:] == [job_id, "1"]
        # Started after the job: jobd can only have given it to the first.
        rescuer = WorkerProcess(lease_server.address, "--log")
        rescuer.expect("attached")

        paused.signal(signal.SIGSTOP)
        stopped = time.time()
        assert rescuer.expect("started", timeout=10).split()[1:] == [job_id, "2"]
        # Not before the paused worker's lease lapsed (it was last heard
        # from at most one heartbeat interval before it stopped).
        waited = started_at(tmp_path, 2, rescuer.process.pid) - stopped
        assert waited > LEASE / 2, f"attempt 2 started {waited:.3f}s after the pause"
        release(tmp_path, 2)
        rescued = {"pid": rescuer.process.pid, "attempt": 2}
        assert future.result(timeout=10) == rescued
        done = executor.status(job_id)
        assert (done.state, done.attempt, done.value) == (jobd.JobState.SUCCEEDED, 2, rescued)

        # Attempt 1 may end as soon as the paused worker resumes: its
        # report reaches jobd late (after a reconnect) and is refused.
        release(tmp_path, 1)
        paused.signal(signal.SIGCONT)
        assert paused.expect("finished", timeout=10).split()[1:] == [job_id, "1"]
        refused = paused.expect(stale_line(job_id), timeout=10)
        assert "is not current" in refused
        after = executor.status(job_id)
        assert (after.state, after.attempt, after.value) == (
            jobd.JobState.SUCCEEDED,
            2,
            rescued,
        )
        assert after.finished == done.finished
        assert after.started == done.started
        assert runs(tmp_path) == [(1, paused.process.pid), (2, rescuer.process.pid)]
        # The resumed worker is sound again: it drains and exits cleanly.
        assert not [line for line in terminate(paused) if "refused" in line]
        assert not [line for line in terminate(rescuer) if "refused" in line]
    finally:
        kill(paused)
        kill(rescuer)


@pytest.fixture
def proxy(lease_server: JobdServer) -> Iterator[TcpProxy]:
    """A TCP proxy in front of ``lease_server``."""
    with TcpProxy(lease_server.address) as tcp_proxy:
        yield tcp_proxy


def test_cut_off_worker_is_fenced_off_after_the_heal(
    lease_server: JobdServer, executor: jobd.Executor, proxy: TcpProxy, tmp_path: Path
) -> None:
    """Cut the network between a worker and jobd mid-job: the lease lapses
    and a second worker (connected directly) runs attempt 2. The first
    worker finishes attempt 1 while cut off; after the heal its report
    arrives, and is refused while attempt 2 still runs; the job ends with
    the second worker's result."""
    cut = WorkerProcess(proxy.address, "--log")
    direct: WorkerProcess | None = None
    try:
        cut.expect("attached")
        future = executor.submit("gated", str(tmp_path))
        job_id = future.job_id
        assert cut.expect("started").split()[1:] == [job_id, "1"]
        direct = WorkerProcess(lease_server.address, "--log")
        direct.expect("attached")

        proxy.partition()
        cutoff = time.time()
        assert direct.expect("started", timeout=10).split()[1:] == [job_id, "2"]
        waited = started_at(tmp_path, 2, direct.process.pid) - cutoff
        assert waited > LEASE / 2, f"attempt 2 started {waited:.3f}s after the cut"
        # Attempt 1 ends while the cable is cut: its report waits.
        release(tmp_path, 1)
        assert cut.expect("finished", timeout=10).split()[1:] == [job_id, "1"]
        running = executor.status(job_id)
        assert (running.state, running.attempt) == (jobd.JobState.RUNNING, 2)

        proxy.heal()
        refused = cut.expect(stale_line(job_id), timeout=10)
        assert "is not current" in refused
        # Refused while attempt 2 runs, and nothing changed.
        running = executor.status(job_id)
        assert (running.state, running.attempt) == (jobd.JobState.RUNNING, 2)
        assert running.value is None

        release(tmp_path, 2)
        expected = {"pid": direct.process.pid, "attempt": 2}
        assert future.result(timeout=10) == expected
        done = executor.status(job_id)
        assert (done.state, done.attempt, done.value) == (jobd.JobState.SUCCEEDED, 2, expected)
        assert runs(tmp_path) == [(1, cut.process.pid), (2, direct.process.pid)]
        # It came back by itself: a second connection through the proxy.
        assert proxy.accepted >= 2
        terminate(cut)
        terminate(direct)
    finally:
        kill(cut)
        kill(direct)


def test_reset_connection_reattaches_the_running_job(
    lease_server: JobdServer, executor: jobd.Executor, proxy: TcpProxy, tmp_path: Path
) -> None:
    """Reset the worker's connection mid-job (well within the lease): the
    worker reconnects, re-attaches the job it runs, and its report is
    accepted: the job ran once, attempt 1, on that worker."""
    worker = WorkerProcess(proxy.address, "--log")
    try:
        worker.expect("attached")
        future = executor.submit("gated", str(tmp_path))
        job_id = future.job_id
        assert worker.expect("started").split()[1:] == [job_id, "1"]

        assert proxy.reset() >= 1
        worker.expect("log worker session lost")
        worker.expect("log attached to jobd")  # its second session
        running = executor.status(job_id)
        assert (running.state, running.attempt) == (jobd.JobState.RUNNING, 1)

        release(tmp_path, 1)
        expected = {"pid": worker.process.pid, "attempt": 1}
        assert future.result(timeout=10) == expected
        done = executor.status(job_id)
        assert (done.state, done.attempt, done.value) == (jobd.JobState.SUCCEEDED, 1, expected)
        assert runs(tmp_path) == [(1, worker.process.pid)]
        rest = terminate(worker)
        assert not [line for line in rest if "refused" in line or "no longer holds" in line], rest
    finally:
        kill(worker)
