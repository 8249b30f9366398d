"""A Python worker in its own process, for the tests that kill or signal one.

    python worker_process.py ADDRESS [--grace SECONDS] [--slots N]

It serves ``hold`` (waits on its first attempt until cancelled, or for
``seconds``; returns at once on later attempts), ``nap`` (an async sleep) and
``whoami``, and prints one line per thing a test waits for: ``attached``,
``started JOB_ID ATTEMPT``, ``stopped``. Each result names the process that
produced it (its PID).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import threading

import jobd


def say(line: str) -> None:
    print(line, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("address")
    parser.add_argument("--grace", type=float, default=30.0)
    parser.add_argument("--slots", type=int, default=4)
    options = parser.parse_args()
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

    def announce() -> None:
        if worker.wait_attached(30):
            say("attached")

    threading.Thread(target=announce, daemon=True).start()
    worker.run()
    say("stopped")


if __name__ == "__main__":
    sys.exit(main())
