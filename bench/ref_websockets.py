"""
The ``websockets`` reference server of the fan-out benchmark (asyncio).

Plain semantics, as broadcaster's plain mode: every message a client sends
goes to every connected client, the sender included, with
``websockets.broadcast`` (which frames it once and writes it to each
connection without waiting).  Compression off; library defaults otherwise.

Needs ``pip install websockets``.  Usage: ``python bench/ref_websockets.py
PORT`` (listens on 127.0.0.1; SIGTERM or SIGINT stops it).
"""

import asyncio
import signal
import sys

from websockets.asyncio.server import broadcast, serve

CLIENTS = set()


async def handler(websocket):
    CLIENTS.add(websocket)
    try:
        async for message in websocket:
            broadcast(CLIENTS, message)
    finally:
        CLIENTS.discard(websocket)


async def main(port):
    stop = asyncio.get_running_loop().create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set_result, None)
    async with serve(handler, "127.0.0.1", port, compression=None, backlog=1024):
        print("ref_websockets listening on 127.0.0.1:{}".format(port), flush=True)
        await stop


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
