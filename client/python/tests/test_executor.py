"""jobd.Executor against the real jobd: the concurrent.futures contract."""

from __future__ import annotations

import concurrent.futures
import time
from concurrent.futures import ALL_COMPLETED, FIRST_COMPLETED, FIRST_EXCEPTION, Future

import pytest

import jobd
from conftest import JobdServer, wait_for_state, wire_state
from jobd.v1 import jobd_pb2


def test_seed_example_with_its_timings(server: JobdServer) -> None:
    """The issue's example, as written: two blocking jobs of 3 s on a pool of
    two threads finish together after ~3 s, not 6."""
    started = time.monotonic()
    with jobd.Executor(server.address) as pool:  # like ThreadPoolExecutor(max_workers=2)
        f1 = pool.submit("return_future", "hello")
        f2 = pool.submit("return_future", "world")
        time.sleep(1)
        assert f1.done() is False
        time.sleep(3)
        assert f2.done() is True
        assert (f1.result(), f2.result()) == ("hello", "world")
        both = time.monotonic() - started
        assert list(pool.map("hello", ["Ann", "Bob"])) == ["Hello, Ann!", "Hello, Bob!"]
    assert 4.0 <= both < 5.5, f"the two 3 s jobs took {both:.2f}s with the sleeps: not in parallel?"


def test_futures_are_real_futures_with_callbacks(pool: jobd.Executor) -> None:
    future = pool.submit("hello", "Ann")
    assert isinstance(future, Future)
    assert isinstance(pool, concurrent.futures.Executor)
    called: list[Future[object]] = []
    done = concurrent.futures.Future[None]()
    future.add_done_callback(lambda f: (called.append(f), done.set_result(None)))
    assert future.result(timeout=10) == "Hello, Ann!"
    done.result(timeout=10)
    assert called == [future]
    # A callback added after the end runs at once, as with any Future.
    late: list[Future[object]] = []
    future.add_done_callback(late.append)
    assert late == [future]
    assert future.job_id and future.function == "hello"
    assert not future.running() and not future.cancelled()


def test_arguments_map_to_json_as_documented(pool: jobd.Executor) -> None:
    assert pool.submit("echo").result(10) is None
    assert pool.submit("echo", 5).result(10) == 5
    assert pool.submit("echo", 1, "two", [3.5]).result(10) == [1, "two", [3.5]]
    assert pool.submit("echo", a=1, b={"c": None}).result(10) == {"a": 1, "b": {"c": None}}
    assert pool.submit("echo", (1, 2)).result(10) == [1, 2]
    with pytest.raises(TypeError, match="positional or keyword"):
        pool.submit("echo", 1, a=2)
    with pytest.raises(TypeError, match="set is not JSON"):
        pool.submit("echo", {1, 2})
    with pytest.raises(ValueError, match="2\\*\\*53"):
        pool.submit("echo", 2**60)


def test_wait_first_completed(pool: jobd.Executor) -> None:
    fast = pool.submit("sleep", 0.1)
    slow = pool.submit("sleep", 30)
    started = time.monotonic()
    done, not_done = concurrent.futures.wait([slow, fast], timeout=20, return_when=FIRST_COMPLETED)
    assert done == {fast} and not_done == {slow}
    assert time.monotonic() - started < 10
    assert slow.cancel() is True  # an async job is aborted, so cancel() succeeds
    assert slow.cancelled()


def test_wait_first_exception(pool: jobd.Executor) -> None:
    failing = pool.with_options(timeout=0.2).submit("sleep", 30)
    fine = pool.submit("noop", 1)
    slow = pool.submit("sleep", 30)
    done, not_done = concurrent.futures.wait(
        [failing, fine, slow], timeout=20, return_when=FIRST_EXCEPTION
    )
    assert failing in done and slow in not_done
    error = failing.exception()
    assert isinstance(error, jobd.JobFailed)
    assert error.kind is jobd.ErrorKind.TIMED_OUT
    assert error.job_id == failing.job_id
    slow.cancel()


def test_wait_all_completed_and_as_completed(pool: jobd.Executor) -> None:
    futures = [pool.submit("noop", n) for n in range(20)] + [pool.submit("sleep", 0.3)]
    done, not_done = concurrent.futures.wait(futures, timeout=20, return_when=ALL_COMPLETED)
    assert done == set(futures) and not not_done
    assert [f.result() for f in futures[:20]] == list(range(20))

    slow, fast, middle = (pool.submit("sleep", s) for s in (1.2, 0.1, 0.6))
    order = list(concurrent.futures.as_completed([slow, fast, middle], timeout=20))
    assert order == [fast, middle, slow]


def test_as_completed_times_out(pool: jobd.Executor) -> None:
    slow = pool.submit("sleep", 30)
    with pytest.raises(TimeoutError):
        list(concurrent.futures.as_completed([slow], timeout=0.3))
    with pytest.raises(TimeoutError):
        slow.result(timeout=0.1)
    slow.cancel()


def test_map_of_10000_in_order(pool: jobd.Executor) -> None:
    started = time.monotonic()
    results = list(pool.map("noop", range(10_000)))
    assert results == list(range(10_000))
    assert time.monotonic() - started < 60


def test_map_with_several_iterables_and_unordered(pool: jobd.Executor) -> None:
    assert list(pool.map("echo", [1, 2, 3], "ab")) == [[1, "a"], [2, "b"]]
    assert sorted(pool.map("sleep", [0.3, 0.0, 0.1], ordered=False)) == [0, 0.1, 0.3]
    unordered = list(pool.map("sleep", [0.4, 0.0], ordered=False))
    assert unordered == [0, 0.4]


def _jobs_of_map(server: JobdServer, map_id: str) -> list[jobd_pb2.Job]:
    stub = server.stubs()
    jobs: list[jobd_pb2.Job] = []
    token = ""
    for _ in range(100):
        page = stub.ListJobs(
            jobd_pb2.ListJobsRequest(labels={"jobd.python/map": map_id}, page_token=token)
        )
        jobs.extend(page.jobs)
        token = page.next_page_token
        if not token:
            return jobs
    raise AssertionError("too many pages")


def test_map_early_break_leaves_no_job_running(server: JobdServer, pool: jobd.Executor) -> None:
    results = pool.map("sleep", [0.0] + [30.0] * 50)
    map_id = results.id
    for value in results:
        assert value == 0
        break
    del results  # dropping the iterator cancels the map
    # Wait (server-side, no polling) until every job the map made has ended;
    # list again until no new one shows up.
    stub = server.stubs()
    seen: set[str] = set()
    for _ in range(5):
        jobs = _jobs_of_map(server, map_id)
        ids = [j.id for j in jobs]
        if set(ids) == seen:
            break
        seen = set(ids)
        answer = stub.Wait(jobd_pb2.WaitRequest(job_ids=ids, timeout={"seconds": 15}))
        assert not answer.not_done, f"{len(answer.not_done)} jobs of the map are unfinished"
    states = [job.state for job in jobs]
    assert len(states) >= 2
    assert states.count(wire_state("succeeded")) == 1
    assert states.count(wire_state("cancelled")) == len(states) - 1


def test_map_buffersize_reads_lazily(pool: jobd.Executor) -> None:
    read: list[int] = []

    def inputs() -> object:
        for n in range(100):
            read.append(n)
            yield n

    results = pool.map("noop", inputs(), buffersize=4)
    assert len(read) == 4  # submitted at the call, as the standard library does
    assert next(results) == 0
    assert len(read) == 5  # one more for each result taken
    assert next(results) == 1
    assert len(read) == 6
    assert list(results) == list(range(2, 100))
    with pytest.raises(ValueError):
        pool.map("noop", [1], buffersize=0)
    with pytest.raises(TypeError):
        pool.map("noop", [1], buffersize=1.5)  # type: ignore[arg-type]


def test_map_failures_and_timeout(pool: jobd.Executor) -> None:
    results = pool.map("sleep", [0.0, {"seconds": -1}, 0.0])
    assert next(results) == 0
    with pytest.raises(jobd.InvalidArgument) as refused:
        next(results)
    assert [v.field for v in refused.value.field_violations] == ["args.seconds"]
    with pytest.raises(StopIteration):
        next(results)
    failing = pool.with_options(timeout=0.1).map("sleep", [0.0, 30])
    assert next(failing) == 0
    with pytest.raises(jobd.JobFailed) as failed:
        next(failing)
    assert failed.value.kind is jobd.ErrorKind.TIMED_OUT
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        list(pool.map("sleep", [30], timeout=0.3))
    assert time.monotonic() - started < 5
    with pytest.raises(jobd.NotFound):
        list(pool.map("no_such_function", [1]))


def test_cancel_before_running(server: JobdServer, pool: jobd.Executor) -> None:
    future = pool.with_options(delay=60).submit("noop", 1)
    assert future.cancel() is True
    assert future.cancelled() and future.done()
    with pytest.raises(concurrent.futures.CancelledError):
        future.result(timeout=1)
    assert pool.status(future).state is jobd.JobState.CANCELLED
    # wait() sees a cancelled future as done at once.
    done, _ = concurrent.futures.wait([future], timeout=1)
    assert done == {future}


def test_cancel_while_running(server: JobdServer, pool: jobd.Executor) -> None:
    # An async job is aborted: cancel() is True.
    sleeping = pool.submit("sleep", 30)
    wait_for_state(server, sleeping.job_id, "running")
    assert sleeping.running() is True
    assert sleeping.cancel() is True
    with pytest.raises(concurrent.futures.CancelledError):
        sleeping.result(timeout=1)
    # A blocking job can only be asked: cancel() is False (as for a running
    # thread), and the future ends cancelled once the job honours it.
    hashing = pool.submit("sha256", {"text": "x", "rounds": 100_000_000})
    wait_for_state(server, hashing.job_id, "running")
    assert hashing.cancel() is False
    with pytest.raises(concurrent.futures.CancelledError):
        hashing.result(timeout=20)
    assert hashing.cancelled()
    # A finished job cannot be cancelled.
    done = pool.submit("noop", 1)
    assert done.result(timeout=10) == 1
    assert done.cancel() is False


def test_failure_and_its_exception(pool: jobd.Executor) -> None:
    future = pool.with_options(timeout=0.1).submit("sleep", 30)
    with pytest.raises(jobd.JobFailed) as failed:
        future.result(timeout=20)
    error = failed.value
    assert isinstance(error, jobd.JobdError)
    assert error.kind is jobd.ErrorKind.TIMED_OUT
    assert error.details["job_id"] == future.job_id
    assert error.details["function"] == "sleep"
    assert "timed out" in str(error)
    assert future.exception() is error
    assert pool.status(future).error is not None


def test_shutdown_cancel_futures(server: JobdServer) -> None:
    pool = jobd.Executor(server.address)
    running = [pool.submit("sleep", 30) for _ in range(3)]
    waiting = [pool.with_options(delay=60).submit("noop", n) for n in range(3)]
    started = time.monotonic()
    pool.shutdown(wait=True, cancel_futures=True)
    assert time.monotonic() - started < 10
    assert all(f.cancelled() for f in running + waiting)
    with pytest.raises(RuntimeError, match="after shutdown"):
        pool.submit("noop", 1)
    stub = server.stubs()
    for future in running + waiting:
        job = stub.GetJob(jobd_pb2.GetJobRequest(job_id=future.job_id)).job
        assert job.state == wire_state("cancelled")


def test_shutdown_without_waiting(server: JobdServer) -> None:
    pool = jobd.Executor(server.address)
    future = pool.submit("sleep", 0.3)
    started = time.monotonic()
    pool.shutdown(wait=False)
    assert time.monotonic() - started < 0.2
    assert future.result(timeout=10) == 0.3  # the job goes on and still settles
    with jobd.Executor(server.address) as other:
        assert other.submit("noop", 2).result(timeout=10) == 2


def test_bad_arguments_refused_with_field_violations(pool: jobd.Executor) -> None:
    with pytest.raises(jobd.InvalidArgument) as refused:
        pool.submit("return_future", {"message": 1, "delay": -1})
    error = refused.value
    assert isinstance(error, ValueError)
    assert sorted((v.field, v.description) for v in error.field_violations) == [
        ("args.delay", "-1 is less than the minimum of 0"),
        ("args.message", '1 is not of type "string"'),
    ]
    with pytest.raises(jobd.InvalidArgument) as option:
        pool.with_options(priority=5000).submit("noop", 1)
    assert [v.field for v in option.value.field_violations] == ["priority"]
    with pytest.raises(jobd.NotFound):
        pool.submit("no_such_function", 1)
    with pytest.raises(TypeError):
        jobd.Options(priority="high")  # type: ignore[arg-type]


def test_options_reach_the_job(pool: jobd.Executor) -> None:
    view = pool.with_options(priority=7, labels={"team": "py"}, max_attempts=3)
    future = view.submit("noop", 1)
    assert future.result(timeout=10) == 1
    info = pool.status(future)
    assert info.priority == 7 and info.max_attempts == 3
    assert info.labels["team"] == "py"
    assert info.labels["jobd.python/executor"] == pool.id
    assert info.state is jobd.JobState.SUCCEEDED and info.value == 1
    assert pool.options.priority is None  # the view did not change the executor


def test_adopting_an_existing_job(server: JobdServer, pool: jobd.Executor) -> None:
    stub = server.stubs()
    request = jobd_pb2.SubmitRequest(function="sleep")
    request.args.number_value = 0.3
    job_id = stub.Submit(request).job_id
    adopted = pool.future(job_id)
    assert adopted is pool.future(job_id)
    assert adopted.result(timeout=10) == 0.3
    finished = pool.future(job_id)
    assert finished.done() and finished.result() == 0.3
    with pytest.raises(jobd.NotFound):
        pool.future("01a23c34-0000-7000-8000-000000000000")


def test_unreachable_server_is_unavailable() -> None:
    # A port nobody listens on: bind one, then close it.
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with jobd.Executor(f"http://127.0.0.1:{port}") as pool:
        with pytest.raises(jobd.Unavailable) as unavailable:
            pool.submit("noop", 1)
    assert isinstance(unavailable.value, ConnectionError)
