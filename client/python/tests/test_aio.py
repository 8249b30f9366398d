"""jobd.aio.Client against the real jobd."""

from __future__ import annotations

import asyncio
import time

import pytest

import jobd
import jobd.aio
from conftest import JobdServer, wait_for_state


def run(coroutine: object) -> object:
    return asyncio.run(coroutine)  # type: ignore[arg-type]


def test_submit_await_and_seed_timings(server: JobdServer) -> None:
    async def main() -> None:
        async with jobd.aio.Client(server.address) as client:
            started = time.monotonic()
            a = await client.submit("return_future", ["hello", 1])
            b = await client.submit("return_future", ["world", 1])
            assert not a.done()
            assert (await a, await b) == ("hello", "world")
            assert time.monotonic() - started < 1.9  # side by side on two threads
            assert await (await client.submit("echo", x=1)) == {"x": 1}
            assert await (await client.submit("hello", "Ann")).result(timeout=10) == "Hello, Ann!"

    run(main())


def test_map_wait_as_completed(server: JobdServer) -> None:
    async def main() -> None:
        async with jobd.aio.Client(server.address) as client:
            assert [v async for v in client.map("noop", range(2000))] == list(range(2000))

            async def numbers():  # type: ignore[no-untyped-def]
                for n in range(50):
                    yield n

            assert [v async for v in client.map("echo", numbers(), "x" * 50, buffersize=8)] == [
                [n, "x"] for n in range(50)
            ]
            assert sorted([v async for v in client.map("sleep", [0.2, 0], ordered=False)]) == [
                0,
                0.2,
            ]
            slow, fast, middle = [await client.submit("sleep", s) for s in (0.9, 0.05, 0.4)]
            done, pending = await client.wait([slow, fast], return_when=jobd.aio.FIRST_COMPLETED)
            assert done == {fast} and pending == {slow}
            order = [job async for job in client.as_completed([slow, fast, middle], timeout=20)]
            assert order == [fast, middle, slow]

    run(main())


def test_early_break_failure_cancel_and_errors(server: JobdServer) -> None:
    async def main() -> None:
        async with jobd.aio.Client(server.address) as client:
            results = client.map("sleep", [0.0] + [30.0] * 10)
            async for value in results:
                assert value == 0
                break
            await results.aclose()  # type: ignore[attr-defined]

            failing = await client.with_options(timeout=0.1).submit("sleep", 30)
            with pytest.raises(jobd.JobFailed) as failed:
                await failing
            assert failed.value.kind is jobd.ErrorKind.TIMED_OUT
            assert isinstance(await failing.exception(), jobd.JobFailed)

            sleeping = await client.submit("sleep", 30)
            await asyncio.to_thread(wait_for_state, server, sleeping.id, "running")
            assert await sleeping.cancel() is True
            with pytest.raises(asyncio.CancelledError):
                await sleeping
            assert (await sleeping.status()).state is jobd.JobState.CANCELLED

            with pytest.raises(jobd.InvalidArgument) as refused:
                await client.submit("return_future", {"message": 1})
            assert [v.field for v in refused.value.field_violations] == ["args.message"]
            with pytest.raises(jobd.NotFound):
                await client.submit("no_such_function")

            adopted = client.job((await client.submit("sleep", 0.2)).id)
            assert await adopted == 0.2
            with pytest.raises(jobd.NotFound):
                await client.job("01a23c34-0000-7000-8000-000000000000")

            pending = await client.with_options(delay=60).submit("noop", 1)
        # Closing leaves jobs running unless asked; ask here.
        async with jobd.aio.Client(server.address) as other:
            job = other.job(pending.id)
            assert await job.cancel() is True

    run(main())
