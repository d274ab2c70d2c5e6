"""
A minimal blocking WebSocket client of the JSON protocol, for scenarios
that measure what one client sees (S6): the standard library only, so the
benchmark needs nothing the server does not.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import struct
import time
from typing import Any, Dict, Tuple


class WSError(Exception):
    """The server refused the handshake or broke the protocol."""


class JSONClient:
    """
    One ``broadcaster.json`` connection on loopback ``port``.

    :ivar received: bytes of frames received so far (headers included).
    """

    def __init__(self, port: int, timeout: float = 60.0) -> None:
        self.received = 0
        self._buffer = b""
        self._sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode("ascii")
        self._sock.sendall(
            "GET /?name=bench HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: {}\r\nSec-WebSocket-Version: 13\r\n"
            "Sec-WebSocket-Protocol: broadcaster.json\r\n\r\n".format(port, key).encode("ascii")
        )
        while b"\r\n\r\n" not in self._buffer:
            self._fill()
        head, self._buffer = self._buffer.split(b"\r\n\r\n", 1)
        if not head.startswith(b"HTTP/1.1 101"):
            raise WSError("handshake refused: {!r}".format(head.split(b"\r\n", 1)[0]))

    def _fill(self) -> None:
        chunk = self._sock.recv(1 << 20)
        if not chunk:
            raise WSError("the server closed the connection")
        self._buffer += chunk

    def _take(self, n: int) -> bytes:
        while len(self._buffer) < n:
            self._fill()
        data, self._buffer = self._buffer[:n], self._buffer[n:]
        return data

    def send(self, event: Dict[str, Any]) -> None:
        payload = json.dumps(event).encode("utf-8")
        mask = os.urandom(4)
        length = len(payload)
        if length < 126:
            header = struct.pack(">BB", 0x81, 0x80 | length)
        elif length < 1 << 16:
            header = struct.pack(">BBH", 0x81, 0x80 | 126, length)
        else:
            header = struct.pack(">BBQ", 0x81, 0x80 | 127, length)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self._sock.sendall(header + mask + masked)

    def receive(self) -> Tuple[Dict[str, Any], int]:
        """
        The next JSON event (binary messages and control frames skipped).

        :return: the event and the size of its frame.
        """
        while True:
            first, second = self._take(2)
            length = second & 0x7F
            size = 2
            if length == 126:
                (length,) = struct.unpack(">H", self._take(2))
                size += 2
            elif length == 127:
                (length,) = struct.unpack(">Q", self._take(8))
                size += 8
            payload = self._take(length)
            size += length
            self.received += size
            opcode = first & 0x0F
            if opcode == 0x8:
                raise WSError("closed by the server: {!r}".format(payload[2:]))
            if opcode == 0x1:
                return json.loads(payload), size

    def receive_type(self, kind: str, deadline: float) -> Tuple[Dict[str, Any], int]:
        """The next event of type ``kind`` (others skipped), before ``deadline``."""
        while time.monotonic() < deadline:
            event, size = self.receive()
            if event.get("type") == kind:
                return event, size
            if event.get("type") == "error":
                raise WSError("error from the server: {}".format(event.get("reason")))
        raise WSError("no {} before the deadline".format(kind))

    def close(self) -> None:
        self._sock.close()
