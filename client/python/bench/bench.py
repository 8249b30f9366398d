"""Measures jobd from Python, side by side in one run.

    python3 client/python/bench/bench.py [--jobd target/release/jobd] [--rounds 3]
                                         [--store memory|sqlite] [--json out.json]

The peers' workload (as Ray, Celery and Dask were measured on it):

- **batch**: 5,000 no-op tasks submitted, then every result collected;
  tasks/s over the whole.
- **sequential**: 500 times submit one no-op task and wait for its result;
  tasks/s and the p50 latency of one task.

each through plain generated stubs (``Submit`` then ``Result``, the
straightforward way), ``jobd.Executor`` (``submit`` then ``result()``),
``Executor.map`` (batch only), and Python's own ``ProcessPoolExecutor(2)``
for scale; and a **Python worker** serving a no-op function (async and sync)
in its own process, fed by ``map``: jobs/s.

It starts its own jobd (release build, on 127.0.0.1, a free port) and stops
it by its PID at the end. Every measurement is repeated ``--rounds`` times,
the modes interleaved so that a drift of this shared machine hits all alike;
the median round is reported. Everything is bounded: fixed counts, and a
run that takes longer than ``--limit`` seconds stops.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

import jobd

REPO = Path(__file__).resolve().parents[3]
BATCH = 5_000
SEQUENTIAL = 500
MAP_TASKS = 10_000
WORKER_JOBS = 20_000


def noop(x: Any) -> Any:
    """The task for ProcessPoolExecutor (module level, so it pickles)."""
    return x


class Server:
    def __init__(self, binary: str, store: str, data: Path) -> None:
        args = [binary, "--listen", "127.0.0.1:0", "--store", store]
        if store == "sqlite":
            args += ["--data-dir", str(data)]
        self.process = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line.startswith("listening on "):
            raise SystemExit(f"jobd did not start: {line!r}")
        self.address = "http://" + line.split()[-1]

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


# -- the measurements ---------------------------------------------------------


def stubs_batch(address: str) -> float:
    from google.protobuf import struct_pb2

    from jobd.v1 import jobd_pb2, jobd_pb2_grpc

    channel = grpc.insecure_channel(address.removeprefix("http://"))
    stub = jobd_pb2_grpc.JobServiceStub(channel)
    started = time.perf_counter()
    ids = []
    for n in range(BATCH):
        request = jobd_pb2.SubmitRequest(
            function="noop", args=struct_pb2.Value(number_value=n), request_id=uuid.uuid4().hex
        )
        ids.append(stub.Submit(request).job_id)
    for job_id in ids:
        stub.Result(jobd_pb2.ResultRequest(job_id=job_id))
    elapsed = time.perf_counter() - started
    channel.close()
    return BATCH / elapsed


def stubs_sequential(address: str) -> tuple[float, float]:
    from google.protobuf import struct_pb2

    from jobd.v1 import jobd_pb2, jobd_pb2_grpc

    channel = grpc.insecure_channel(address.removeprefix("http://"))
    stub = jobd_pb2_grpc.JobServiceStub(channel)
    latencies = []
    started = time.perf_counter()
    for n in range(SEQUENTIAL):
        begin = time.perf_counter()
        request = jobd_pb2.SubmitRequest(
            function="noop", args=struct_pb2.Value(number_value=n), request_id=uuid.uuid4().hex
        )
        job_id = stub.Submit(request).job_id
        stub.Result(jobd_pb2.ResultRequest(job_id=job_id))
        latencies.append(time.perf_counter() - begin)
    elapsed = time.perf_counter() - started
    channel.close()
    return SEQUENTIAL / elapsed, statistics.median(latencies) * 1e3


def executor_batch(address: str) -> float:
    with jobd.Executor(address) as pool:
        pool.submit("noop", 0).result()  # the connection and the watch, outside the clock
        started = time.perf_counter()
        futures = [pool.submit("noop", n) for n in range(BATCH)]
        for future in futures:
            future.result()
        return BATCH / (time.perf_counter() - started)


def executor_sequential(address: str) -> tuple[float, float]:
    with jobd.Executor(address) as pool:
        pool.submit("noop", 0).result()
        latencies = []
        started = time.perf_counter()
        for n in range(SEQUENTIAL):
            begin = time.perf_counter()
            pool.submit("noop", n).result()
            latencies.append(time.perf_counter() - begin)
        elapsed = time.perf_counter() - started
        return SEQUENTIAL / elapsed, statistics.median(latencies) * 1e3


def executor_map(address: str, count: int = BATCH, function: str = "noop") -> float:
    with jobd.Executor(address) as pool:
        started = time.perf_counter()
        done = sum(1 for _ in pool.map(function, range(count)))
        assert done == count
        return count / (time.perf_counter() - started)


def process_pool_batch(pool: concurrent.futures.ProcessPoolExecutor) -> float:
    started = time.perf_counter()
    futures = [pool.submit(noop, n) for n in range(BATCH)]
    for future in futures:
        future.result()
    return BATCH / (time.perf_counter() - started)


def process_pool_sequential(pool: concurrent.futures.ProcessPoolExecutor) -> tuple[float, float]:
    latencies = []
    started = time.perf_counter()
    for n in range(SEQUENTIAL):
        begin = time.perf_counter()
        pool.submit(noop, n).result()
        latencies.append(time.perf_counter() - begin)
    elapsed = time.perf_counter() - started
    return SEQUENTIAL / elapsed, statistics.median(latencies) * 1e3


# -- the worker ---------------------------------------------------------------------


def serve_worker(address: str, slots: int) -> None:
    """``--serve-worker``: a worker process serving py_noop (async) and py_noop_sync."""
    worker = jobd.Worker(address, slots=slots, name="bench")

    @worker.function(schema=None)
    async def py_noop(x: Any = None) -> Any:
        return x

    @worker.function(schema=None)
    def py_noop_sync(x: Any = None) -> Any:
        return x

    def announce() -> None:
        if worker.wait_attached(30):
            print("attached", flush=True)

    threading.Thread(target=announce, daemon=True).start()
    worker.run()


def worker_rate(address: str, function: str) -> float:
    executor_map(address, 500, function)  # warm
    return executor_map(address, WORKER_JOBS, function)


# -- the run -------------------------------------------------------------------------


def median_of(rounds: list[Any]) -> Any:
    if isinstance(rounds[0], tuple):
        return tuple(statistics.median(r[i] for r in rounds) for i in range(len(rounds[0])))
    return statistics.median(rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobd", default=str(REPO / "target" / "release" / "jobd"))
    parser.add_argument("--store", choices=["memory", "sqlite"], default="memory")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--slots", type=int, default=256, help="the bench worker's slots")
    parser.add_argument("--limit", type=float, default=600, help="stop after this many seconds")
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("--serve-worker", metavar="ADDRESS", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.serve_worker:
        serve_worker(options.serve_worker, options.slots)
        return
    if not 1 <= options.rounds <= 20:
        raise SystemExit("--rounds: 1 to 20")

    # A watchdog: whatever happens, the run ends within the limit.
    def expire() -> None:
        print(f"bench: over its {options.limit:.0f}s limit; stopping", file=sys.stderr, flush=True)
        os._exit(3)

    watchdog = threading.Timer(options.limit, expire)
    watchdog.daemon = True
    watchdog.start()

    with tempfile.TemporaryDirectory() as data:
        server = Server(options.jobd, options.store, Path(data))
        worker_process = None
        try:
            address = server.address
            measures: dict[str, Callable[[], Any]] = {}
            process_pool = concurrent.futures.ProcessPoolExecutor(2)
            process_pool.submit(noop, 0).result()  # start its processes outside the clock
            measures = {
                "batch/stubs": lambda: stubs_batch(address),
                "batch/executor": lambda: executor_batch(address),
                "batch/map": lambda: executor_map(address),
                "batch/processpool": lambda: process_pool_batch(process_pool),
                "map10k/map": lambda: executor_map(address, MAP_TASKS),
                "sequential/stubs": lambda: stubs_sequential(address),
                "sequential/executor": lambda: executor_sequential(address),
                "sequential/processpool": lambda: process_pool_sequential(process_pool),
            }
            results: dict[str, list[Any]] = {name: [] for name in measures}
            for _ in range(options.rounds):
                for name, measure in measures.items():
                    results[name].append(measure())
            process_pool.shutdown()

            worker_process = subprocess.Popen(
                [
                    sys.executable,
                    __file__,
                    "--serve-worker",
                    address,
                    "--slots",
                    str(options.slots),
                ],
                stdout=subprocess.PIPE,
                text=True,
            )
            assert worker_process.stdout is not None
            if worker_process.stdout.readline().strip() != "attached":
                raise SystemExit("the bench worker did not attach")
            worker_results: dict[str, list[float]] = {"async": [], "sync": []}
            for _ in range(options.rounds):
                worker_results["async"].append(worker_rate(address, "py_noop"))
                worker_results["sync"].append(worker_rate(address, "py_noop_sync"))
        finally:
            if worker_process is not None:
                worker_process.send_signal(signal.SIGTERM)
                worker_process.wait(timeout=60)
            server.stop()

    figures = {name: median_of(rounds) for name, rounds in results.items()}
    figures.update({f"worker/{k}": statistics.median(v) for k, v in worker_results.items()})
    report(figures, results, worker_results, options)
    if options.json:
        Path(options.json).write_text(
            json.dumps(
                {"figures": figures, "rounds": results, "worker_rounds": worker_results}, indent=2
            )
        )


def report(
    figures: dict[str, Any],
    results: dict[str, list[Any]],
    worker_results: dict[str, list[float]],
    options: argparse.Namespace,
) -> None:
    cpu = platform.processor() or platform.machine()
    print(
        f"jobd from Python: {options.rounds} rounds, median shown; store {options.store}; "
        f"{os.cpu_count()} CPUs ({cpu}); Python {platform.python_version()}, "
        f"grpcio {grpc.__version__}\n"
    )
    stubs_batch_rate = figures["batch/stubs"]
    stubs_seq_rate, stubs_p50 = figures["sequential/stubs"]
    rows = [
        ("plain generated stubs", stubs_batch_rate, figures["sequential/stubs"]),
        ("jobd.Executor", figures["batch/executor"], figures["sequential/executor"]),
        ("jobd.Executor.map", figures["batch/map"], None),
        (
            "ProcessPoolExecutor(2), in-process",
            figures["batch/processpool"],
            figures["sequential/processpool"],
        ),
    ]
    print(f"{'':36} {'5,000 batch tasks/s':>20} {'500 sequential tasks/s':>23} {'p50 ms':>8}")
    for name, batch, sequential in rows:
        seq = (
            f"{sequential[0]:>23,.0f} {sequential[1]:>8.2f}"
            if sequential
            else f"{'-':>23} {'-':>8}"
        )
        print(f"{name:36} {batch:>20,.0f} {seq}")
    print()
    executor_ratio = figures["batch/executor"] / stubs_batch_rate
    sequential_ratio = figures["sequential/executor"][0] / stubs_seq_rate
    print(
        f"Executor / stubs: batch {executor_ratio:.2f}x, sequential {sequential_ratio:.2f}x "
        f"(target >= 0.9x)"
    )
    print(f"map of 10,000: {figures['map10k/map']:,.0f} tasks/s (target >= 10,000)")
    print(
        f"Python worker ({options.slots} slots, own process, fed by map): "
        f"async {figures['worker/async']:,.0f} jobs/s, sync {figures['worker/sync']:,.0f} jobs/s "
        f"(target >= 3,000)"
    )
    print("\nevery round:")
    for name, rounds in {
        **results,
        **{f"worker/{k}": v for k, v in worker_results.items()},
    }.items():
        shown = ", ".join(
            f"{r[0]:,.0f} ({r[1]:.2f} ms)" if isinstance(r, tuple) else f"{r:,.0f}" for r in rounds
        )
        print(f"  {name:24} {shown}")


if __name__ == "__main__":
    main()
