"""
The picows reference server of the fan-out benchmark (asyncio + Cython).

picows is the fastest Python WebSocket library measured for issue 8: its
framing and buffering are compiled, so what it costs per delivery is close
to the system calls alone.  Plain semantics, as the other references: every
message a client sends goes to every connected client, the sender included,
with one ``transport.send`` per client.  No announcements, no history, no
limits, no pings.

Needs ``pip install picows``.  Usage: ``python bench/ref_picows.py PORT``
(listens on 127.0.0.1; SIGTERM or SIGINT stops it).
"""

import asyncio
import signal
import sys

from picows import WSListener, WSMsgType, ws_create_server

CLIENTS = set()


class BroadcastListener(WSListener):
    def on_ws_connected(self, transport):
        CLIENTS.add(transport)

    def on_ws_frame(self, transport, frame):
        if frame.msg_type in (WSMsgType.TEXT, WSMsgType.BINARY):
            payload = frame.get_payload_as_bytes()
            for client in CLIENTS:
                client.send(frame.msg_type, payload)
        elif frame.msg_type == WSMsgType.CLOSE:
            transport.send_close(frame.get_close_code(), frame.get_close_message())
            transport.disconnect()

    def on_ws_disconnected(self, transport):
        CLIENTS.discard(transport)


async def main(port):
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set_result, None)
    server = await ws_create_server(lambda request: BroadcastListener(), "127.0.0.1", port,
                                    backlog=1024)
    print("ref_picows listening on 127.0.0.1:{}".format(port), flush=True)
    await stop
    server.close()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
