"""A TCP relay that delays every byte by a fixed time each way, keeping order and not limiting throughput:
where the kernel has no netem (these machines), it puts a database "far away" for the fleet tests and
benchmarks. Run: C{python delayrelay.py LISTEN_HOST:PORT TARGET_HOST:PORT DELAY_SECONDS}; it prints
C{listening} once it accepts. Each direction of each connection is a queue of (due time, bytes): read as
soon as the bytes come, written once they are due."""

from __future__ import annotations

import asyncio


async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    """Copy C{reader} to C{writer}, each chunk C{delay} seconds after it arrived; end the write side at EOF."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def send() -> None:
        while True:
            due, data = await queue.get()
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if not data:
                writer.write_eof() if writer.can_write_eof() else writer.close()
                return
            writer.write(data)
            await writer.drain()

    sending = asyncio.ensure_future(send())
    try:
        while True:
            data = await reader.read(65536)
            queue.put_nowait((loop.time() + delay, data))
            if not data:
                break
        await sending
    except (ConnectionError, OSError):
        sending.cancel()
        writer.close()


async def main(listen: str, target: str, delay: float) -> None:
    """Relay every connection to C{listen} to C{target}, C{delay} seconds each way."""
    targetHost, targetPort = target.rsplit(":", 1)

    async def relay(clientReader: asyncio.StreamReader, clientWriter: asyncio.StreamWriter) -> None:
        try:
            serverReader, serverWriter = await asyncio.open_connection(targetHost, int(targetPort))
        except OSError:
            clientWriter.close()
            return
        await asyncio.gather(pump(clientReader, serverWriter, delay), pump(serverReader, clientWriter, delay),
                             return_exceptions=True)
        for writer in (clientWriter, serverWriter):
            writer.close()

    host, port = listen.rsplit(":", 1)
    server = await asyncio.start_server(relay, host, int(port))
    print("listening", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("listen", help="HOST:PORT to accept on")
    parser.add_argument("target", help="HOST:PORT to relay each connection to")
    parser.add_argument("delay", type=float, help="seconds every byte is held, each way")
    arguments = parser.parse_args()
    asyncio.run(main(arguments.listen, arguments.target, arguments.delay))
