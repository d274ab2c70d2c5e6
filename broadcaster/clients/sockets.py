"""
A blocking client library for broadcaster's raw-TCP ports, for programs that
use plain :mod:`socket` rather than Twisted.

Only the standard library is imported here.  Pillow is imported by the
functions that take or return Pillow images (:func:`send_image` given an
image, :func:`get_image`, :func:`decode_image`), and only when they are called.

Wire formats
    Image port (``--image-port``, default 9998): a frame is a 4-byte
    big-endian unsigned length (``struct.pack(">I", n)``) followed by ``n``
    bytes.  We send one image per frame, in any format Pillow reads.  The
    server sends PNGs of the images other clients send, and a frame whose
    payload is UTF-8 text starting with ``ERROR`` and a space when it refuses our last
    frame (good frames get no reply).  See :mod:`broadcaster.protocols.images`.

    Line bridge (``--line-port``, default 9997): UTF-8 text, one message per
    line.  The server ends lines with LF; CRLF is accepted too.  Every line
    client receives every message, its own included, and arrivals and
    departures as ``<id> connected`` / ``<id> disconnected``; the first line a
    client receives is its own arrival.  See :mod:`broadcaster.protocols.lines`.

Timeouts
    Every read takes a ``timeout`` in seconds: a deadline for the whole
    frame or line, not for each ``recv``, so a peer trickling one byte at a
    time cannot stretch it.  ``None`` means the socket's own timeout
    (``sock.gettimeout()``), used the same way; sockets from :func:`connect`
    have none, so ``None`` waits as long as it takes.  Waiting is done with
    :mod:`selectors`, never by changing the socket's timeout, so one thread
    may read while another sends on the same socket.

Errors
    Everything raised for network trouble is a :class:`SocketError`:
    :class:`ConnectError`, :class:`ConnectionClosed`, :class:`FrameTimeout`,
    :class:`ServerError` and :class:`FrameTooLarge`.  Their messages say how
    far a frame or line had got.  Bad arguments raise :class:`ValueError` or
    :class:`TypeError`.

These functions work on plain stream sockets (TCP, Unix, ``socketpair``), not
on :class:`ssl.SSLSocket`: :func:`recv_line` peeks with ``MSG_PEEK``.

Example: run ``twistd -n broadcaster``, then::

    from PIL import Image
    from broadcaster.clients import sockets

    # Sockets are context managers: leaving the block closes them.
    with sockets.connect("localhost", 9998) as screen, \\
            sockets.connect("localhost", 9998) as camera:
        sockets.send_image(camera, Image.new("RGB", (64, 48), "red"))
        image = sockets.get_image(screen, timeout=5)
        print(image.size)                           # (64, 48)

    with sockets.connect("localhost", 9997) as chat:
        print(sockets.recv_line(chat, timeout=5))   # "<id> connected"
        sockets.send_line(chat, "hello")
        print(sockets.recv_line(chat, timeout=5))   # "hello"
"""

from __future__ import annotations

import io
import os
import selectors
import socket
import struct
import time
from typing import TYPE_CHECKING, Optional, Union

if TYPE_CHECKING:  # pragma: no cover
    from PIL.Image import Image as PillowImage

__all__ = [
    "SocketError",
    "ConnectError",
    "ConnectionClosed",
    "FrameTimeout",
    "ServerError",
    "FrameTooLarge",
    "connect",
    "read_exactly",
    "send_frame",
    "read_frame",
    "recv_line",
    "send_line",
    "send_image",
    "decode_image",
    "get_image",
    "close",
    "ERROR_PREFIX",
]

_HEADER = struct.Struct(">I")

#: Default for ``max_size``: the server's own default ``--max-image-size``.
DEFAULT_MAX_FRAME_SIZE = 16 * 1024 * 1024

#: Default for ``max_length`` of :func:`recv_line`, in bytes.
DEFAULT_MAX_LINE_LENGTH = 1024 * 1024

#: How the payload of an error frame from the image port starts.
ERROR_PREFIX = b"ERROR "
_RECV_CHUNK = 256 * 1024
# select() can report a socket readable when a recv would still block (e.g.
# after a segment with a bad checksum is dropped); never block in recv
# then, or the deadline would not hold.  Windows lacks the flag.
_DONTWAIT = getattr(socket, "MSG_DONTWAIT", 0)


# Exceptions


class SocketError(Exception):
    """
    Base class of everything this module raises for network trouble.
    """


class ConnectError(SocketError):
    """
    :func:`connect` could not connect; the message names the address and why.
    """


class _Incomplete(SocketError):
    """
    A read that ended early.

    :ivar midway: whether it ended in the middle of a frame or line,
        rather than between two.
    :ivar received: bytes of the frame part (header or payload), or of the
        line, received so far.
    :ivar expected: bytes that were wanted, or ``None`` for a line.
    :ivar partial: the bytes received and consumed before the read ended,
        so a caller can still use them.
    """

    def __init__(
        self, message: str, received: int = 0, expected: Optional[int] = None,
        partial: bytes = b"", midway: bool = True,
    ) -> None:
        super().__init__(message)
        self.midway = midway
        self.received = received
        self.expected = expected
        self.partial = partial


class ConnectionClosed(_Incomplete):
    """
    The peer closed the connection (or reset it), possibly in the middle of
    a frame or line: the message then says how many of how many bytes came.
    """


class FrameTimeout(_Incomplete):
    """
    A read's deadline passed; if it passed in the middle of a frame or line
    the message says so, with the byte counts.  The bytes already read are
    consumed (see :attr:`partial`): the stream is no longer at a frame
    boundary, so the connection is best closed.
    """


class ServerError(SocketError):
    """
    The server sent an ``ERROR`` frame: it refused the last frame we sent.

    :ivar reason: the server's reason, without the ``ERROR`` prefix.
    """

    def __init__(self, reason: str) -> None:
        super().__init__("the server refused our last frame: {}".format(reason))
        self.reason = reason


class FrameTooLarge(SocketError):
    """
    A frame (or line) is larger than the caller's limit.  Its body was not
    read, so the stream is out of step: close the connection.

    :ivar length: the declared length, or the line length reached.
    :ivar max_size: the limit.
    """

    def __init__(self, message: str, length: int, max_size: int) -> None:
        super().__init__(message)
        self.length = length
        self.max_size = max_size


# Connecting and closing


def _address(host: str, port: int) -> str:
    return "[{}]:{}".format(host, port) if ":" in host else "{}:{}".format(host, port)


def connect(host: str, port: int, timeout: Optional[float] = 10.0) -> socket.socket:
    """
    Connect to a broadcaster port over TCP (IPv4 or IPv6, whichever resolves
    and answers first).

    The socket returned is in blocking mode with no timeout of its own: give
    each read its ``timeout`` instead.  Use it as a context manager,
    ``with connect(host, port) as sock:``, to have it closed, or call
    :func:`close`.

    :param timeout: seconds allowed for connecting.
    :raise ConnectError: with a message such as ``cannot connect to
        localhost:9998: Connection refused``.
    """
    address = _address(host, port)
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except socket.timeout:
        raise ConnectError(
            "cannot connect to {}: no answer within {:g} s".format(address, timeout)
        ) from None
    except OSError as e:
        raise ConnectError("cannot connect to {}: {}".format(address, e.strerror or e)) from e
    sock.settimeout(None)
    # Each send is one whole frame or line in one sendall: Nagle's
    # algorithm would only delay the next one.
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass
    return sock


def close(sock: socket.socket) -> None:
    """
    Shut the connection down in both directions, then close the socket.

    ``shutdown`` tells the peer at once, even if another reference to the
    socket (a ``dup``, a child process) keeps it open.  Closing a socket
    that is already closed or disconnected is not an error.
    """
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


# Reading


def _deadline(sock: socket.socket, timeout: Optional[float]) -> tuple:
    """
    :return: ``(deadline, timeout)``: the monotonic time reads must finish
        by (``None`` for never) and the timeout it came from, for messages.
    """
    if timeout is None:
        timeout = sock.gettimeout()
    if timeout is None:
        return None, None
    if timeout < 0:
        raise ValueError("timeout must not be negative, not {!r}".format(timeout))
    return time.monotonic() + timeout, timeout


class _Reader:
    """
    Waits for a socket to be readable before a deadline and reads from it,
    turning OS errors into this module's exceptions.
    """

    def __init__(self, sock: socket.socket, deadline: Optional[float]) -> None:
        if sock.fileno() < 0:
            raise SocketError("cannot read from a closed socket")
        self.sock = sock
        self.deadline = deadline
        self._selector = selectors.DefaultSelector()
        self._selector.register(sock, selectors.EVENT_READ)

    def __enter__(self) -> "_Reader":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._selector.close()

    def readable(self) -> bool:
        """
        Wait until the socket has data (or EOF) to read.

        :return: ``False`` if the deadline passed first.
        """
        while True:
            if self.deadline is None:
                remaining = None
            else:
                remaining = self.deadline - time.monotonic()
                if remaining <= 0:
                    # One last look: data that is already there still counts.
                    remaining = 0
            if self._selector.select(remaining):
                return True
            if remaining is not None and remaining <= 0:
                return False

    def recv(self, size: int, flags: int = 0) -> Optional[bytes]:
        """
        One ``recv``, after :meth:`readable` said yes.

        :return: the bytes (``b""`` at EOF), or ``None`` for a spurious
            wake-up with nothing to read after all.
        :raise ConnectionClosed: for a reset connection (``received`` etc.
            filled in by the caller).
        """
        try:
            return self.sock.recv(size, flags | _DONTWAIT)
        except (BlockingIOError, InterruptedError, socket.timeout):
            return None
        except ConnectionError as e:
            raise ConnectionClosed(
                "connection lost ({})".format(e.strerror or e.__class__.__name__)
            ) from e
        except OSError as e:
            raise SocketError("cannot read from the socket: {}".format(e.strerror or e)) from e


def _timeout_text(timeout: Optional[float]) -> str:
    return "{:g} s".format(timeout) if timeout is not None else "the socket's timeout"


def _read(
    reader: _Reader, n: int, timeout: Optional[float], unit: str, boundary: bool
) -> bytes:
    """
    Read exactly ``n`` bytes.

    :param unit: what the bytes are, for messages: ``""``, ``"header "``,
        ``"payload "``.
    :param boundary: whether nothing read yet means we are between frames,
        so that a timeout or EOF then is not "in the middle of a frame".
    """
    data = bytearray()
    while len(data) < n:
        have = len(data)
        between = boundary and not have
        where = " in the middle of a frame" if unit and not between else ""
        progress = "{}: received {} of {} {}bytes".format(where, have, n, unit)
        if not reader.readable():
            if between:
                message = "no frame arrived within {}".format(_timeout_text(timeout))
            else:
                message = "timed out after {}{}".format(_timeout_text(timeout), progress)
            raise FrameTimeout(message, have, n, bytes(data), not between)
        try:
            chunk = reader.recv(min(n - have, _RECV_CHUNK))
        except ConnectionClosed as e:
            raise ConnectionClosed(
                "{}{}".format(e, progress), have, n, bytes(data), not between
            ) from e.__cause__
        if chunk is None:
            continue
        if not chunk:
            if between:
                message = "connection closed by the peer"
            else:
                message = "connection closed by the peer{}".format(progress)
            raise ConnectionClosed(message, have, n, bytes(data), not between)
        data += chunk
    return bytes(data)


def read_exactly(sock: socket.socket, n: int, timeout: Optional[float] = None) -> bytes:
    """
    Read exactly ``n`` bytes: ``recv`` may return fewer than asked for, so
    this loops until they have all come.

    :param timeout: seconds for all ``n`` bytes together (see the module
        docstring for ``None``).
    :raise FrameTimeout: if the deadline passes first; the message gives the
        byte counts.
    :raise ConnectionClosed: if the peer closes first; likewise.
    """
    if n < 0:
        raise ValueError("cannot read {} bytes".format(n))
    deadline, timeout = _deadline(sock, timeout)
    with _Reader(sock, deadline) as reader:
        return _read(reader, n, timeout, "", boundary=False)


def read_frame(
    sock: socket.socket, timeout: Optional[float] = None, max_size: int = DEFAULT_MAX_FRAME_SIZE
) -> bytes:
    """
    Read one length-prefixed frame from the image port.

    :param timeout: seconds for the whole frame, header and payload.
    :param max_size: largest payload accepted, in bytes.  The default is
        the server's default limit on what it is sent, but the PNGs it sends
        on can be larger than that (a JPEG re-encoded as PNG grows): raise
        it to receive big images.
    :return: the payload, which may be an ``ERROR`` frame: see
        :func:`get_image` for a reader that tells them apart.
    :raise FrameTooLarge: if the header declares more than ``max_size``
        bytes; the payload is left unread.
    :raise FrameTimeout: if the deadline passes, with the byte counts if a
        frame had started.
    :raise ConnectionClosed: if the peer closes, likewise.
    """
    deadline, timeout = _deadline(sock, timeout)
    with _Reader(sock, deadline) as reader:
        header = _read(reader, _HEADER.size, timeout, "header ", boundary=True)
        (length,) = _HEADER.unpack(header)
        if length > max_size:
            raise FrameTooLarge(
                "the peer announced a frame of {} bytes, larger than the limit of {} bytes;"
                " its payload was not read".format(length, max_size),
                length,
                max_size,
            )
        return _read(reader, length, timeout, "payload ", boundary=False)


def recv_line(
    sock: socket.socket, timeout: Optional[float] = None,
    max_length: int = DEFAULT_MAX_LINE_LENGTH,
) -> str:
    """
    Read one line from the line bridge.

    Bytes after the line end stay in the socket, so other reads (another
    :func:`recv_line`, :func:`read_exactly`, or code of your own) carry on
    where this one stopped.

    A line starting with ``ERROR`` and a space is returned like any other: on the line
    bridge it tells us the server refused a line we sent (too long, not
    UTF-8), it does not end the conversation.  Check for it yourself if it
    matters.

    :param timeout: seconds for the whole line.
    :param max_length: longest line accepted, in bytes, line end excluded.
    :return: the line, decoded from UTF-8 (invalid bytes become U+FFFD),
        without its LF or CRLF.
    :raise FrameTimeout: if no complete line arrives in time; the bytes of
        the incomplete line are consumed and kept in its ``partial``.
    :raise ConnectionClosed: if the peer closes first.
    :raise FrameTooLarge: if the line grows longer than ``max_length``.
    """
    deadline, timeout = _deadline(sock, timeout)
    line = bytearray()
    with _Reader(sock, deadline) as reader:
        while True:
            if not reader.readable():
                if line:
                    message = "timed out after {} in the middle of a line: received {} bytes" \
                        " without a line end".format(_timeout_text(timeout), len(line))
                else:
                    message = "no line arrived within {}".format(_timeout_text(timeout))
                raise FrameTimeout(message, len(line), None, bytes(line), bool(line))
            # Peek to find the line end, then take only up to it.  Bytes
            # before it are taken even without a line end: they belong to
            # this line, and leaving them would make select() report the
            # socket readable forever.
            try:
                peeked = reader.recv(_RECV_CHUNK, socket.MSG_PEEK)
            except ConnectionClosed as e:
                raise ConnectionClosed(
                    "{} after {} bytes of a line".format(e, len(line)),
                    len(line), None, bytes(line), bool(line),
                ) from e.__cause__
            if peeked is None:
                continue
            if not peeked:
                if line:
                    message = "connection closed by the peer in the middle of a line:" \
                        " received {} bytes without a line end".format(len(line))
                else:
                    message = "connection closed by the peer"
                raise ConnectionClosed(message, len(line), None, bytes(line), bool(line))
            end = peeked.find(b"\n")
            if end >= 0:
                take = end + 1
                before = peeked[end - 1 : end] if end else bytes(line[-1:])
                content = len(line) + end - (before == b"\r")
            else:
                # A CR at the end may be the first half of a CRLF.
                take = len(peeked)
                content = len(line) + take - peeked.endswith(b"\r")
            if content > max_length:
                raise FrameTooLarge(
                    "a line longer than the limit of {} bytes arrived ({} bytes so far)".format(
                        max_length, content
                    ),
                    content,
                    max_length,
                )
            # Already in the socket's buffer: this does not wait.
            line += _read(reader, take, timeout, "", boundary=False)
            if end >= 0:
                break
    del line[-1:]
    if line.endswith(b"\r"):
        del line[-1:]
    return line.decode("utf-8", errors="replace")


# Sending


def _sendall(sock: socket.socket, data: bytes, what: str) -> None:
    try:
        sock.sendall(data)
    except socket.timeout:
        raise FrameTimeout(
            "timed out sending {} ({} bytes); part of it may have been sent".format(
                what, len(data)
            ),
            expected=len(data),
        ) from None
    except ConnectionError as e:
        raise ConnectionClosed(
            "connection lost while sending {}: {}".format(what, e.strerror or e),
            expected=len(data),
        ) from e
    except OSError as e:
        raise SocketError("cannot send {}: {}".format(what, e.strerror or e)) from e


def send_frame(sock: socket.socket, payload: bytes) -> None:
    """
    Send ``payload`` as one length-prefixed frame.

    The server answers a frame it refuses with an ``ERROR`` frame and says
    nothing about a good one; read the answer with :func:`read_frame` or
    :func:`get_image`.

    :raise ValueError: if ``payload`` is longer than a 4-byte length can say.
    :raise ConnectionClosed: if the connection is lost while sending.
    """
    if len(payload) > 0xFFFFFFFF:
        raise ValueError("a frame holds at most 4 GiB - 1 bytes, not {}".format(len(payload)))
    _sendall(sock, _HEADER.pack(len(payload)) + payload, "a frame")


def send_line(sock: socket.socket, text: str) -> None:
    """
    Send ``text`` as one line, UTF-8 with an LF appended.

    :raise ValueError: if ``text`` contains a CR or LF: it would arrive as
        more than one message, or lose a character.
    :raise ConnectionClosed: if the connection is lost while sending.
    """
    if "\n" in text or "\r" in text:
        raise ValueError("a line cannot contain a line break: {!r}".format(text))
    _sendall(sock, text.encode("utf-8") + b"\n", "a line")


_PNG_MODES = frozenset(["1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"])


def _png_of(image: "PillowImage") -> bytes:
    if image.mode not in _PNG_MODES:
        image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def send_image(
    sock: socket.socket, image: Union[bytes, str, "os.PathLike[str]", "PillowImage"]
) -> int:
    """
    Send one image as a frame to the image port.

    :param image: the encoded image as ``bytes`` (sent as they are), the
        path of an image file (``str`` or :class:`pathlib.Path`: the file is
        sent as it is), or a Pillow image (sent as PNG).  The server
        decodes it; if it cannot, the reply is an ``ERROR`` frame.
    :return: the size of the image sent, in bytes (the 4-byte header
        excluded).
    :raise ValueError: for an empty image (the server would refuse it and
        hang up).
    :raise TypeError: for anything else.
    :raise OSError: if the file cannot be read.
    """
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
    elif isinstance(image, (str, os.PathLike)):
        with open(image, "rb") as f:
            data = f.read()
    else:
        from PIL import Image

        if not isinstance(image, Image.Image):
            raise TypeError(
                "send_image takes bytes, a file path or a Pillow image, not {}".format(
                    type(image).__name__
                )
            )
        data = _png_of(image)
    if not data:
        raise ValueError("empty image: nothing to send")
    send_frame(sock, data)
    return len(data)


# Receiving images


def decode_image(payload: bytes) -> Optional["PillowImage"]:
    """
    Turn a frame payload from the image port into a Pillow image.

    :return: the image, loaded and converted to RGB, or ``None`` if the
        payload is not an image Pillow can decode.
    :raise ServerError: if the payload is an ``ERROR`` frame.
    """
    if payload.startswith(ERROR_PREFIX):
        raise ServerError(payload[len(ERROR_PREFIX) :].decode("utf-8", errors="replace"))
    from PIL import Image

    try:
        with Image.open(io.BytesIO(payload)) as image:
            image.load()
            return image.convert("RGB")
    # Pillow signals a bad file with many exception types (OSError,
    # SyntaxError, ValueError, DecompressionBombError, struct.error...);
    # to the caller they all mean "not an image".
    except Exception:
        return None


def get_image(
    sock: socket.socket, timeout: Optional[float] = None, max_size: int = DEFAULT_MAX_FRAME_SIZE
) -> Optional["PillowImage"]:
    """
    Read the next frame from the image port as a Pillow image.

    :param timeout: seconds for the whole frame.
    :param max_size: largest frame accepted, in bytes.
    :return: an RGB Pillow image, or ``None`` if the frame is not an image.
    :raise ServerError: for an ``ERROR`` frame, the server refusing the
        last frame we sent; its ``reason`` says why.
    :raise FrameTimeout: if the deadline passes (with byte counts if the
        frame had started).
    :raise ConnectionClosed: if the server closes the connection.
    :raise FrameTooLarge: if the frame is larger than ``max_size``.
    """
    return decode_image(read_frame(sock, timeout, max_size))
