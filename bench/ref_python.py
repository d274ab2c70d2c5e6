"""
The pure-Python floor of the fan-out benchmark: ``bench/ref_c.c`` line for
line in Python (the standard library's ``select.epoll`` and sockets, no
framework), so that what the interpreter itself costs around each
``send()`` can be told apart from what a server built on Twisted and
Autobahn adds.

One thread, epoll.  Plain semantics, as the other references: every
message a client sends (text or binary) goes to every connected client,
the sender included.  The messages read in one turn of the loop are framed
once, into one buffer, and each client gets that buffer with one
``send()``; what a socket does not take waits in the client's own buffer
until EPOLLOUT.  No announcements, history, limits, pings or compression;
no fragmented messages (a client that sends one is dropped).

Usage: ``python bench/ref_python.py PORT`` (listens on 127.0.0.1; SIGTERM
or SIGINT stops it).
"""

import base64
import hashlib
import select
import signal
import socket
import struct
import sys

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_MAX_HANDSHAKE = 8192


def frame(opcode: int, payload: bytes) -> bytes:
    n = len(payload)
    if n < 126:
        return bytes((0x80 | opcode, n)) + payload
    if n < 65536:
        return bytes((0x80 | opcode, 126)) + struct.pack("!H", n) + payload
    return bytes((0x80 | opcode, 127)) + struct.pack("!Q", n) + payload


class Client:
    __slots__ = ("sock", "send", "open", "writing", "inbox", "out")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.send = sock.send
        self.open = False
        self.writing = False
        self.inbox = bytearray()
        self.out = bytearray()


class Server:
    def __init__(self, port: int) -> None:
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", port))
        self.listener.listen(4096)
        self.listener.setblocking(False)
        self.ep = select.epoll()
        self.ep.register(self.listener.fileno(), select.EPOLLIN)
        self.by_fd = {}
        # The open clients, in a dict for O(1) removal, iterated in order.
        self.opened = {}
        self.stopping = False

    def want_out(self, c: Client, on: bool) -> None:
        if c.writing != on:
            self.ep.modify(c.sock.fileno(), select.EPOLLIN | (select.EPOLLOUT if on else 0))
            c.writing = on

    def give(self, c: Client, data: bytes) -> None:
        if not c.out:
            try:
                n = c.send(data)
            except BlockingIOError:
                n = 0
            if n == len(data):
                return
            data = data[n:]
        c.out += data
        self.want_out(c, True)

    def flush_out(self, c: Client) -> None:
        while c.out:
            try:
                n = c.send(c.out)
            except BlockingIOError:
                self.want_out(c, True)
                return
            del c.out[:n]
        self.want_out(c, False)

    def drop(self, c: Client) -> None:
        fd = c.sock.fileno()
        self.by_fd.pop(fd, None)
        self.opened.pop(fd, None)
        try:
            self.ep.unregister(fd)
        except (OSError, ValueError):
            pass
        c.sock.close()

    def handshake(self, c: Client) -> bool:
        end = c.inbox.find(b"\r\n\r\n")
        if end < 0:
            if len(c.inbox) > _MAX_HANDSHAKE:
                raise ConnectionError("handshake too large")
            return False
        key = None
        for line in bytes(c.inbox[:end]).split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"sec-websocket-key":
                key = value.strip()
        if key is None:
            raise ConnectionError("no key")
        accept = base64.b64encode(hashlib.sha1(key + _GUID).digest())
        del c.inbox[: end + 4]
        c.open = True
        self.opened[c.sock.fileno()] = c
        self.give(
            c,
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n",
        )
        return True

    def parse_frames(self, c: Client, batch: list) -> None:
        data = c.inbox
        while True:
            have = len(data)
            if have < 2:
                return
            first, second = data[0], data[1]
            opcode, length, h = first & 0x0F, second & 0x7F, 2
            if not second & 0x80 or not first & 0x80:
                raise ConnectionError("unmasked or fragmented")
            if length == 126:
                if have < 4:
                    return
                length, h = struct.unpack_from("!H", data, 2)[0], 4
            elif length == 127:
                if have < 10:
                    return
                length, h = struct.unpack_from("!Q", data, 2)[0], 10
            if have < h + 4 + length:
                return
            mask = bytes(data[h : h + 4])
            masked = int.from_bytes(data[h + 4 : h + 4 + length], "little")
            key = int.from_bytes(mask * (length // 4 + 1), "little") & ((1 << 8 * length) - 1)
            payload = (masked ^ key).to_bytes(length, "little")
            del data[: h + 4 + length]
            if opcode in (1, 2):
                batch.append(frame(opcode, payload))
            elif opcode == 8:
                self.give(c, frame(8, payload[:2]))
                raise ConnectionError("closed")
            elif opcode == 9:
                self.give(c, frame(10, payload))

    def on_readable(self, c: Client, batch: list) -> None:
        while True:
            try:
                chunk = c.sock.recv(65536)
            except BlockingIOError:
                return
            if not chunk:
                raise ConnectionError("gone")
            c.inbox += chunk
            if not c.open and not self.handshake(c):
                continue
            if c.open:
                self.parse_frames(c, batch)

    def run(self) -> None:
        listener_fd = self.listener.fileno()
        while not self.stopping:
            try:
                events = self.ep.poll(1.0)
            except InterruptedError:
                continue
            batch = []
            for fd, mask in events:
                if fd == listener_fd:
                    while True:
                        try:
                            sock, _ = self.listener.accept()
                        except BlockingIOError:
                            break
                        sock.setblocking(False)
                        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                        c = self.by_fd[sock.fileno()] = Client(sock)
                        self.ep.register(sock.fileno(), select.EPOLLIN)
                    continue
                c = self.by_fd.get(fd)
                if c is None:
                    continue
                try:
                    if mask & select.EPOLLOUT:
                        self.flush_out(c)
                    if mask & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
                        self.on_readable(c, batch)
                except (ConnectionError, OSError):
                    self.drop(c)
            if batch:
                # One send() per client for everything read in this turn.
                data = b"".join(batch)
                for c in list(self.opened.values()):
                    try:
                        self.give(c, data)
                    except OSError:
                        self.drop(c)


def main(argv) -> None:
    server = Server(int(argv[1]))

    def stop(signum, frame):
        server.stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print("ref_python listening on 127.0.0.1:{}".format(argv[1]), flush=True)
    server.run()


if __name__ == "__main__":
    main(sys.argv)
