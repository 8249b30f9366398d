"""A TCP proxy for tests that cut, heal and reset the network between a
client and jobd.

::

    with TcpProxy("127.0.0.1:50051") as proxy:
        worker = WorkerProcess(proxy.address)   # talks to jobd through the proxy
        proxy.partition()   # a cut cable: nothing passes, nothing is closed
        proxy.heal()        # what waited passes, in order, as TCP would retransmit it
        proxy.reset()       # every connection ends with an RST, both ways

It runs an asyncio loop on a thread of its own. A partition stops reading
on both sides of every connection: what was sent waits in the kernels'
buffers (and at most one chunk per direction here), and neither end is told
anything, as when a cable is cut. A connection accepted during a partition
is held: jobd sees it only after the heal. Healing resumes forwarding, so
what was written during the cut arrives late, the way TCP delivers it once a
cable is mended before its connections time out.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
from typing import Any

_LINGER_ZERO = struct.pack("ii", 1, 0)
"""SO_LINGER on, 0 s: close() sends an RST instead of a FIN."""


class TcpProxy:
    """Forwards ``127.0.0.1:PORT`` (``address``) to ``upstream`` (``host:port``
    or ``http://host:port``)."""

    def __init__(self, upstream: str) -> None:
        host, _, port = upstream.removeprefix("http://").rpartition(":")
        self.upstream = (host, int(port))
        self.address = ""
        self.accepted = 0
        """Connections accepted so far."""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="tcp-proxy", daemon=True
        )
        self._open: asyncio.Event | None = None
        self._server: asyncio.Server | None = None
        self._connections: set[_Connection] = set()

    # -- from the test's thread --------------------------------------------------

    def start(self) -> TcpProxy:
        self._thread.start()
        port = self._call(self._start())
        self.address = f"http://127.0.0.1:{port}"
        return self

    def partition(self) -> None:
        """Stops forwarding, both ways, on every connection (and holds new ones)."""
        self._call(self._set_open(False))

    def heal(self) -> None:
        """Forwards again: what waited is delivered."""
        self._call(self._set_open(True))

    def reset(self) -> int:
        """Resets every connection (RST to both ends); returns how many there were."""
        return self._call(self._reset())

    def close(self) -> None:
        if self._thread.is_alive():
            self._call(self._close())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        if not self._thread.is_alive():
            self._loop.close()

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=10)

    # -- on the proxy's loop -------------------------------------------------------

    async def _start(self) -> int:
        self._open = asyncio.Event()
        self._open.set()
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def _set_open(self, value: bool) -> None:
        assert self._open is not None
        if value:
            self._open.set()
        else:
            self._open.clear()

    async def _reset(self) -> int:
        connections = list(self._connections)
        for connection in connections:
            connection.reset()
        return len(connections)

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        await self._reset()
        assert self._open is not None
        self._open.set()  # lets the pumps held by a cut see that they are closed

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self._open is not None
        self.accepted += 1
        connection = _Connection(self._open)
        connection.ends.append(writer)
        self._connections.add(connection)
        try:
            await self._open.wait()  # a connection made during a cut is held
            if connection.closed:
                return
            try:
                up_reader, up_writer = await asyncio.open_connection(*self.upstream)
            except OSError:
                connection.reset()
                return
            connection.ends.append(up_writer)
            if connection.closed:  # reset while it connected
                connection.reset()
                return
            await asyncio.gather(
                connection.pump(reader, up_writer), connection.pump(up_reader, writer)
            )
        finally:
            connection.reset()
            self._connections.discard(connection)


class _Connection:
    """Both ends of one proxied connection."""

    def __init__(self, open_: asyncio.Event) -> None:
        self.open = open_
        self.ends: list[asyncio.StreamWriter] = []
        self.closed = False

    async def pump(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        try:
            while not self.closed:
                await self.open.wait()
                data = await source.read(65536)
                if not data:
                    break
                await self.open.wait()  # cut while it read: hold it
                if self.closed:
                    break
                sink.write(data)
                await sink.drain()
        except (ConnectionError, OSError):
            pass
        # Either side ending ends the whole connection (no half-close: gRPC
        # does not use it), and abruptly, as a proxy that lost a peer would.
        self.reset()

    def reset(self) -> None:
        """Closes both ends with an RST (whatever they have not read is dropped)."""
        self.closed = True
        for end in self.ends:
            if end.transport.is_closing():
                continue
            sock = end.get_extra_info("socket")
            if sock is not None:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
                except OSError:
                    pass
            end.transport.abort()
