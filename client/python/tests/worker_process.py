"""A Python worker in its own process, for the tests that kill or signal one.

    python worker_process.py ADDRESS [--grace SECONDS] [--slots N] [--log]

It serves ``hold`` (waits on its first attempt until cancelled, or for
``seconds``; returns at once on later attempts), ``nap`` (an async sleep),
``whoami`` and ``gated`` (marks each run with a file in a directory, then
waits there for its attempt's release file), and prints one line per thing a
test waits for: ``attached``, ``started JOB_ID ATTEMPT``, ``finished JOB_ID
ATTEMPT`` (``gated``), ``stopped``; with ``--log``, also ``log MESSAGE`` for
each record of the worker's own logger (``jobd.worker``: sessions attached
and lost, reports refused as stale). Each result names the process that
produced it (its PID).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import threading
import time
from pathlib import Path

import jobd

_SAY = threading.Lock()


def say(line: str) -> None:
    with _SAY:
        print(line, flush=True)


class _Say(logging.Handler):
    """Prints the worker's own log records as ``log MESSAGE`` lines."""

    def emit(self, record: logging.LogRecord) -> None:
        say(f"log {record.getMessage()}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("address")
    parser.add_argument("--grace", type=float, default=30.0)
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--log", action="store_true")
    options = parser.parse_args()
    if options.log:
        logger = logging.getLogger("jobd.worker")
        logger.setLevel(logging.INFO)
        logger.addHandler(_Say())
    worker = jobd.Worker(
        options.address, slots=options.slots, grace=options.grace, name=f"test-{os.getpid()}"
    )

    @worker.function()
    def hold(seconds: float, ctx: jobd.Context) -> dict[str, int]:
        """Holds its slot on the first attempt; returns at once on later ones."""
        say(f"started {ctx.job_id} {ctx.attempt}")
        if ctx.attempt == 1:
            ctx.sleep(seconds)
            ctx.raise_if_cancelled()
        return {"pid": os.getpid(), "attempt": ctx.attempt}

    @worker.function()
    async def nap(seconds: float, ctx: jobd.Context) -> dict[str, int]:
        """Sleeps asynchronously."""
        say(f"started {ctx.job_id} {ctx.attempt}")
        await asyncio.sleep(seconds)
        return {"pid": os.getpid(), "attempt": ctx.attempt}

    @worker.function()
    def whoami(n: int) -> list[int]:
        return [n, os.getpid()]

    @worker.function()
    def gated(directory: str, ctx: jobd.Context) -> dict[str, int]:
        """Marks its run in ``directory``, then waits for ``release-ATTEMPT`` there."""
        here = Path(directory)
        # One file per run, named by attempt and process, saying when it
        # started: written whole (renamed into place) before the line below.
        mark = {"pid": os.getpid(), "attempt": ctx.attempt, "started": time.time()}
        partial = here / f".run-{ctx.attempt}-{os.getpid()}"
        partial.write_text(json.dumps(mark))
        partial.rename(here / f"run-{ctx.attempt}-{os.getpid()}")
        say(f"started {ctx.job_id} {ctx.attempt}")
        release = here / f"release-{ctx.attempt}"
        deadline = time.monotonic() + 60
        while not release.exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{release} did not appear within 60 s")
            ctx.sleep(0.005)
            ctx.raise_if_cancelled()
        say(f"finished {ctx.job_id} {ctx.attempt}")
        return {"pid": os.getpid(), "attempt": ctx.attempt}

    def announce() -> None:
        if worker.wait_attached(30):
            say("attached")

    threading.Thread(target=announce, daemon=True).start()
    worker.run()
    say("stopped")


if __name__ == "__main__":
    sys.exit(main())
