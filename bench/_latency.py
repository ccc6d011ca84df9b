"""A TCP relay that delays every byte by a fixed time in each direction: a network round trip, on loopback.

bench/fhir_io.py uses it to measure what batching saves when the FHIR server is on another machine. This kernel has
no netem (``tc qdisc add dev lo root netem delay ...`` answers "Specified qdisc kind is unknown"), so the delay is
added in user space: each chunk read from one side is written to the other side ``delay`` seconds after it was
read, in order, so a request/response exchange gains one round trip of ``2 * delay`` while a long response still
streams. The relay runs in its own process (its CPU is not the client's) and copies bytes for every arm alike.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from multiprocessing.synchronize import Event

CHUNK = 256 * 1024


async def _forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    """Copy ``reader`` to ``writer``, each chunk ``delay`` seconds after it arrived; pass the end of stream on."""
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def receive() -> None:
        while True:
            data = await reader.read(CHUNK)
            queue.put_nowait((time.monotonic() + delay, data))
            if not data:
                return

    async def deliver() -> None:
        while True:
            due, data = await queue.get()
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            if not data:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            writer.write(data)
            await writer.drain()

    with suppress(ConnectionError):
        await asyncio.gather(receive(), deliver())


async def _serve(listen_port: int, upstream_port: int, delay: float, ready: Event) -> None:
    async def relay(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            server_reader, server_writer = await asyncio.open_connection("127.0.0.1", upstream_port)
        except OSError:
            client_writer.close()
            return
        await asyncio.gather(
            _forward(client_reader, server_writer, delay),
            _forward(server_reader, client_writer, delay),
        )
        for writer in (client_writer, server_writer):
            writer.close()

    server = await asyncio.start_server(relay, "127.0.0.1", listen_port, reuse_address=True)
    ready.set()
    async with server:
        await server.serve_forever()


def _run(listen_port: int, upstream_port: int, delay: float, ready: Event) -> None:
    asyncio.run(_serve(listen_port, upstream_port, delay, ready))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextmanager
def delayed_relay(upstream_port: int, round_trip_s: float) -> Iterator[int]:
    """Run a relay to ``127.0.0.1:upstream_port`` adding ``round_trip_s`` per round trip; yields its port."""
    port = free_port()
    ready = multiprocessing.get_context("fork").Event()
    process = multiprocessing.get_context("fork").Process(
        target=_run, args=(port, upstream_port, round_trip_s / 2, ready), daemon=True
    )
    process.start()
    try:
        if not ready.wait(10):
            raise RuntimeError("the latency relay did not start within 10 s")
        yield port
    finally:
        process.terminate()
        process.join(5)
