"""
Tests for :mod:`broadcaster.clients.sockets`, the blocking client library, and for
the console scripts in :mod:`broadcaster.clients.imagetools`.

Framing and line reading are tested over ``socket.socketpair()`` with no
server.  The integration tests talk to the real server in-process: the
library blocks, so it runs in a thread (``deferToThread``), always with a
timeout; the scripts run as real subprocesses, killed and reaped if a test
ends before they do.
"""

import io
import os
import pathlib
import re
import socket
import struct
from typing import Sequence

from PIL import Image
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from broadcaster.clients import sockets
from broadcaster.clients.imagetools import parse_address
from tests.support import port_of, run_module, start_server, wait_for
from tests.core.test_imaging import make_image

#: Seconds any blocking call in these tests may take, so that a failing
#: test cannot leave a thread blocked for ever.
PATIENCE = 10.0


def frame(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


def socket_pair(testcase):
    """
    Two connected stream sockets, closed when ``testcase`` ends.

    ``theirs`` has a timeout so that a test reading it directly cannot hang.
    """
    ours, theirs = socket.socketpair()
    theirs.settimeout(PATIENCE)
    testcase.addCleanup(ours.close)
    testcase.addCleanup(theirs.close)
    return ours, theirs


def unused_port(testcase) -> int:
    """
    A loopback port nothing listens on: bound (so no one else takes it) but
    not listening, for as long as ``testcase`` runs.
    """
    holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    holder.bind(("127.0.0.1", 0))
    testcase.addCleanup(holder.close)
    return holder.getsockname()[1]


class ConnectTests(SynchronousTestCase):
    """connect() and close()."""

    def test_refused_connection_says_where_and_why(self):
        """Connecting where nothing listens raises ConnectError naming the address and reason."""
        port = unused_port(self)
        error = self.assertRaises(sockets.ConnectError, sockets.connect, "127.0.0.1", port, 5.0)
        self.assertIsInstance(error, sockets.SocketError)
        self.assertEqual(
            str(error), "cannot connect to 127.0.0.1:{}: Connection refused".format(port)
        )

    def test_close_twice(self):
        """close() shuts down and closes; closing again, or after the peer left, is harmless."""
        ours, theirs = socket_pair(self)
        theirs.close()
        sockets.close(ours)
        sockets.close(ours)
        self.assertEqual(ours.fileno(), -1)


class ReadExactlyTests(SynchronousTestCase):
    """read_exactly() over a socketpair."""

    def test_collects_pieces(self):
        """Bytes written in several pieces come back as one exact read, leaving the rest."""
        ours, theirs = socket_pair(self)
        ours.sendall(b"abc")
        ours.sendall(b"defgh")
        self.assertEqual(sockets.read_exactly(theirs, 6, timeout=PATIENCE), b"abcdef")
        self.assertEqual(theirs.recv(10), b"gh")

    def test_deadline_gives_byte_counts(self):
        """Fewer bytes than asked for by the deadline raise FrameTimeout with both counts."""
        ours, theirs = socket_pair(self)
        ours.sendall(b"abc")
        error = self.assertRaises(sockets.FrameTimeout, sockets.read_exactly, theirs, 5, 0.3)
        self.assertEqual(str(error), "timed out after 0.3 s: received 3 of 5 bytes")
        self.assertEqual((error.received, error.expected, error.partial), (3, 5, b"abc"))

    def test_peer_closing_gives_byte_counts(self):
        """The peer closing before all bytes came raises ConnectionClosed with both counts."""
        ours, theirs = socket_pair(self)
        ours.sendall(b"abc")
        ours.close()
        error = self.assertRaises(
            sockets.ConnectionClosed, sockets.read_exactly, theirs, 5, PATIENCE
        )
        self.assertEqual(str(error), "connection closed by the peer: received 3 of 5 bytes")


class FrameTests(SynchronousTestCase):
    """send_frame() and read_frame() over a socketpair."""

    def test_round_trip(self):
        """Frames sent back to back are read back one at a time."""
        ours, theirs = socket_pair(self)
        sockets.send_frame(ours, b"hello")
        sockets.send_frame(ours, b"")
        sockets.send_frame(ours, b"world")
        self.assertEqual(theirs.recv(9), b"\x00\x00\x00\x05hello")
        self.assertEqual(sockets.read_frame(theirs, timeout=PATIENCE), b"")
        self.assertEqual(sockets.read_frame(theirs, timeout=PATIENCE), b"world")

    def test_no_frame_times_out(self):
        """Nothing arriving raises FrameTimeout that says no frame started."""
        _, theirs = socket_pair(self)
        error = self.assertRaises(sockets.FrameTimeout, sockets.read_frame, theirs, 0.3)
        self.assertEqual(str(error), "no frame arrived within 0.3 s")
        self.assertFalse(error.midway)

    def test_socket_timeout_is_the_default(self):
        """With no timeout given, the socket's own timeout is the deadline."""
        _, theirs = socket_pair(self)
        theirs.settimeout(0.3)
        error = self.assertRaises(sockets.FrameTimeout, sockets.read_frame, theirs)
        self.assertIn("0.3 s", str(error))

    def test_timeout_mid_payload(self):
        """A payload cut short by the deadline raises FrameTimeout with the payload byte counts."""
        ours, theirs = socket_pair(self)
        ours.sendall(struct.pack(">I", 100) + b"x" * 10)
        error = self.assertRaises(sockets.FrameTimeout, sockets.read_frame, theirs, 0.3)
        self.assertEqual(
            str(error),
            "timed out after 0.3 s in the middle of a frame: received 10 of 100 payload bytes",
        )
        self.assertTrue(error.midway)
        self.assertEqual(error.partial, b"x" * 10)

    def test_timeout_mid_header(self):
        """A header cut short by the deadline raises FrameTimeout with the header byte counts."""
        ours, theirs = socket_pair(self)
        ours.sendall(b"\x00\x00")
        error = self.assertRaises(sockets.FrameTimeout, sockets.get_image, theirs, 0.3)
        self.assertIn("in the middle of a frame: received 2 of 4 header bytes", str(error))

    def test_closed_mid_frame(self):
        """The peer closing mid-frame raises ConnectionClosed with the byte counts."""
        ours, theirs = socket_pair(self)
        ours.sendall(struct.pack(">I", 10) + b"abc")
        ours.close()
        error = self.assertRaises(sockets.ConnectionClosed, sockets.get_image, theirs, PATIENCE)
        self.assertEqual(
            str(error),
            "connection closed by the peer in the middle of a frame:"
            " received 3 of 10 payload bytes",
        )
        self.assertTrue(error.midway)

    def test_closed_between_frames(self):
        """The peer closing between frames raises ConnectionClosed that is not midway."""
        ours, theirs = socket_pair(self)
        sockets.send_frame(ours, b"last")
        ours.close()
        self.assertEqual(sockets.read_frame(theirs, timeout=PATIENCE), b"last")
        error = self.assertRaises(sockets.ConnectionClosed, sockets.read_frame, theirs, PATIENCE)
        self.assertEqual(str(error), "connection closed by the peer")
        self.assertFalse(error.midway)

    def test_too_large_is_refused_from_the_header(self):
        """A declared length above max_size raises FrameTooLarge and leaves the payload unread."""
        ours, theirs = socket_pair(self)
        ours.sendall(struct.pack(">I", 1000) + b"abc")
        error = self.assertRaises(
            sockets.FrameTooLarge, sockets.read_frame, theirs, PATIENCE, 999
        )
        self.assertEqual((error.length, error.max_size), (1000, 999))
        self.assertIn("1000 bytes", str(error))
        self.assertIn("999 bytes", str(error))
        self.assertEqual(theirs.recv(10), b"abc")


class GetImageTests(SynchronousTestCase):
    """get_image() and send_image() over a socketpair."""

    def test_image_comes_back_as_rgb(self):
        """A PNG frame with transparency comes back as an RGB Pillow image of its size."""
        ours, theirs = socket_pair(self)
        sockets.send_frame(ours, make_image("PNG", mode="RGBA", size=(7, 5), color=(1, 2, 3, 4)))
        image = sockets.get_image(theirs, timeout=PATIENCE)
        self.assertEqual((image.mode, image.size), ("RGB", (7, 5)))

    def test_not_an_image_is_none(self):
        """A frame that is neither image nor error gives None; the next frame still reads."""
        ours, theirs = socket_pair(self)
        sockets.send_frame(ours, b"just some bytes")
        sockets.send_frame(ours, make_image("PNG", size=(2, 2)))
        self.assertIsNone(sockets.get_image(theirs, timeout=PATIENCE))
        self.assertEqual(sockets.get_image(theirs, timeout=PATIENCE).size, (2, 2))

    def test_error_frame_raises(self):
        """An ERROR frame raises ServerError carrying the reason."""
        ours, theirs = socket_pair(self)
        ours.sendall(frame("ERROR caf\u00e9 refused".encode("utf-8")))
        error = self.assertRaises(sockets.ServerError, sockets.get_image, theirs, PATIENCE)
        self.assertEqual(error.reason, "caf\u00e9 refused")

    def test_send_image_takes_bytes_paths_and_pillow_images(self):
        """Bytes go as they are, paths as the file's bytes, Pillow images as PNG."""
        ours, theirs = socket_pair(self)
        jpeg = make_image("JPEG", size=(8, 8))
        path = pathlib.Path(self.mktemp())
        path.write_bytes(jpeg)
        self.assertEqual(sockets.send_image(ours, jpeg), len(jpeg))
        sockets.send_image(ours, path)
        sockets.send_image(ours, str(path))
        sockets.send_image(ours, Image.new("CMYK", (3, 4)))
        for _ in range(3):
            self.assertEqual(sockets.read_frame(theirs, timeout=PATIENCE), jpeg)
        png = Image.open(io.BytesIO(sockets.read_frame(theirs, timeout=PATIENCE)))
        self.assertEqual((png.format, png.size), ("PNG", (3, 4)))

    def test_send_image_refuses_nonsense(self):
        """Empty images and things that are not images are refused before sending."""
        ours, _ = socket_pair(self)
        self.assertRaises(ValueError, sockets.send_image, ours, b"")
        self.assertRaises(TypeError, sockets.send_image, ours, 42)


class LineTests(SynchronousTestCase):
    """recv_line() and send_line() over a socketpair."""

    def test_lines_arriving_together_are_read_one_by_one(self):
        """Two lines in one chunk come back from two calls, LF and CRLF stripped."""
        ours, theirs = socket_pair(self)
        ours.sendall(b"one\ntwo\r\n")
        self.assertEqual(sockets.recv_line(theirs, timeout=PATIENCE), "one")
        self.assertEqual(sockets.recv_line(theirs, timeout=PATIENCE), "two")

    def test_no_over_read(self):
        """Bytes after the line end are left in the socket for other reads."""
        ours, theirs = socket_pair(self)
        ours.sendall(b"caf\xc3\xa9\n" + frame(b"payload") + b"rest")
        self.assertEqual(sockets.recv_line(theirs, timeout=PATIENCE), "caf\u00e9")
        self.assertEqual(sockets.read_frame(theirs, timeout=PATIENCE), b"payload")
        self.assertEqual(theirs.recv(10), b"rest")

    def test_error_lines_are_returned(self):
        """A line starting with ERROR is returned like any other line."""
        ours, theirs = socket_pair(self)
        ours.sendall(b"ERROR line too long\n")
        self.assertEqual(sockets.recv_line(theirs, timeout=PATIENCE), "ERROR line too long")

    def test_timeout_mid_line(self):
        """A line without its end by the deadline raises FrameTimeout giving the bytes received."""
        ours, theirs = socket_pair(self)
        ours.sendall(b"three")
        error = self.assertRaises(sockets.FrameTimeout, sockets.recv_line, theirs, 0.3)
        self.assertIn("received 5 bytes without a line end", str(error))
        self.assertEqual(error.partial, b"three")

    def test_closed_mid_line(self):
        """The peer closing mid-line raises ConnectionClosed giving the bytes received."""
        ours, theirs = socket_pair(self)
        ours.sendall(b"half a li")
        ours.close()
        error = self.assertRaises(sockets.ConnectionClosed, sockets.recv_line, theirs, PATIENCE)
        self.assertIn("received 9 bytes without a line end", str(error))

    def test_too_long(self):
        """A line longer than max_length raises FrameTooLarge; CRLF does not count."""
        ours, theirs = socket_pair(self)
        ours.sendall(b"12345\r\n123456\n")
        self.assertEqual(sockets.recv_line(theirs, PATIENCE, max_length=5), "12345")
        self.assertRaises(sockets.FrameTooLarge, sockets.recv_line, theirs, PATIENCE, 5)

    def test_send_line(self):
        """send_line sends UTF-8 with an LF, and refuses text with a line break."""
        ours, theirs = socket_pair(self)
        sockets.send_line(ours, "h\u00e9")
        self.assertEqual(theirs.recv(10), b"h\xc3\xa9\n")
        self.assertRaises(ValueError, sockets.send_line, ours, "two\nlines")
        self.assertRaises(ValueError, sockets.send_line, ours, "cr\r")


class ImagePortTests(TestCase):
    """The library against the real server's image port, run in threads."""

    @inlineCallbacks
    def setUp(self):
        self.service, _ = yield start_server(self)
        self.port = port_of(self.service.image_endpoint)

    @inlineCallbacks
    def connect(self):
        sock = yield deferToThread(sockets.connect, "127.0.0.1", self.port, PATIENCE)
        self.addCleanup(sockets.close, sock)
        return sock

    @inlineCallbacks
    def test_images_reach_another_socket(self):
        """PNG, JPEG and Pillow images sent on one socket arrive on another as RGB, same size."""
        receiver = yield self.connect()
        sender = yield self.connect()
        yield wait_for(lambda: len(self.service.hub) == 2, what="two members")
        sent = [
            make_image("PNG", mode="RGBA", size=(10, 20)),
            make_image("JPEG", size=(30, 40)),
            Image.new("L", (5, 6)),
        ]
        for image in sent:
            yield deferToThread(sockets.send_image, sender, image)
        for size in [(10, 20), (30, 40), (5, 6)]:
            image = yield deferToThread(sockets.get_image, receiver, PATIENCE)
            self.assertEqual((image.mode, image.size), ("RGB", size))

    @inlineCallbacks
    def test_refusal_raises_server_error(self):
        """Garbage sent with send_frame makes get_image on the same socket raise ServerError."""
        sock = yield self.connect()

        def exchange():
            sockets.send_frame(sock, b"no image here")
            return sockets.get_image(sock, timeout=PATIENCE)

        error = yield self.assertFailure(deferToThread(exchange), sockets.ServerError)
        self.assertEqual(error.reason, "unsupported image format (the server accepts PNG, JPEG, GIF, WEBP or BMP)")

    @inlineCallbacks
    def test_nothing_arrives(self):
        """With nobody sending, get_image raises FrameTimeout after its timeout."""
        sock = yield self.connect()
        error = yield self.assertFailure(
            deferToThread(sockets.get_image, sock, 0.3), sockets.FrameTimeout
        )
        self.assertEqual(str(error), "no frame arrived within 0.3 s")


class LineBridgeTests(TestCase):
    """The library against the real server's line bridge, run in threads."""

    @inlineCallbacks
    def setUp(self):
        self.service, _ = yield start_server(self)
        port = port_of(self.service.line_endpoint)
        self.sock = yield deferToThread(sockets.connect, "127.0.0.1", port, PATIENCE)
        self.addCleanup(sockets.close, self.sock)

    @inlineCallbacks
    def test_own_message_comes_back(self):
        """A line client hears its own arrival, then its own message."""

        def chat():
            arrival = sockets.recv_line(self.sock, timeout=PATIENCE)
            sockets.send_line(self.sock, "hello \u2603")
            return arrival, sockets.recv_line(self.sock, timeout=PATIENCE)

        arrival, echo = yield deferToThread(chat)
        self.assertRegex(arrival, r"^\S+ connected$")
        self.assertEqual(echo, "{}: hello \u2603".format(arrival.split()[0]))

    @inlineCallbacks
    def test_refusal_is_an_ordinary_line(self):
        """The bridge's ERROR reply to invalid UTF-8 is returned by recv_line as it is."""

        def chat():
            sockets.recv_line(self.sock, timeout=PATIENCE)
            self.sock.sendall(b"\xff\n")
            return sockets.recv_line(self.sock, timeout=PATIENCE)

        reply = yield deferToThread(chat)
        self.assertTrue(reply.startswith("ERROR line is not valid UTF-8"), reply)


class ParseAddressTests(SynchronousTestCase):
    """HOST:PORT as the scripts parse it."""

    def test_good(self):
        """Names, IPv4 and bracketed IPv6 addresses are split from the port."""
        self.assertEqual(parse_address("localhost:9998"), ("localhost", 9998))
        self.assertEqual(parse_address("127.0.0.1:1"), ("127.0.0.1", 1))
        self.assertEqual(parse_address("[::1]:9998"), ("::1", 9998))

    def test_bad(self):
        """No port, a bad port, no host or an unbracketed IPv6 address are refused."""
        import argparse

        for text in ["localhost", "host:", "host:0", "host:65536", "host:x", ":80",
                     "::1:80", "[::1]", "[::1]80", "[]:80"]:
            self.assertRaises(argparse.ArgumentTypeError, parse_address, text)


def run_tool(testcase, tool: str, args: Sequence[str]):
    """
    Run ``python -m broadcaster.clients.imagetools TOOL ARGS`` on this checkout.
    """
    return run_module(testcase, "broadcaster.clients.imagetools", [tool, *args])


class _FrameServer(Protocol):
    """Sends its factory's frames to each client, then hangs up."""

    def connectionMade(self) -> None:
        self.transport.write(b"".join(frame(p) for p in self.factory.frames))
        self.transport.loseConnection()


def fake_image_port(testcase, frames: Sequence[bytes]) -> int:
    """
    Listen on a free loopback port with a server that sends ``frames`` and
    hangs up.

    :return: the port.
    """
    factory = Factory.forProtocol(_FrameServer)
    factory.frames = list(frames)
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    testcase.addCleanup(port.stopListening)
    return port.getHost().port


_SAVED = re.compile(r"^image-\d{8}T\d{6}-(\d+)\.png$")


class ImageToolsTests(TestCase):
    """broadcaster-send-image and broadcaster-watch-images as subprocesses."""

    def write_images(self, *specs):
        directory = self.mktemp()
        os.makedirs(directory)
        paths = []
        for name, data in specs:
            path = os.path.join(directory, name)
            with open(path, "wb") as f:
                f.write(data)
            paths.append(path)
        return paths

    def saved_sizes(self, directory):
        """The sizes of the images saved in ``directory``, in the order of their numbers."""
        names = os.listdir(directory)
        for name in names:
            self.assertRegex(name, _SAVED)
        names.sort(key=lambda name: int(_SAVED.match(name).group(1)))
        sizes = []
        for name in names:
            with Image.open(os.path.join(directory, name)) as image:
                self.assertEqual(image.format, "PNG")
                sizes.append(image.size)
        return sizes

    @inlineCallbacks
    def test_send_to_watch(self):
        """Two files sent with send-image are saved as two PNGs by watch-images, both exiting 0."""
        service, _ = yield start_server(self)
        address = "127.0.0.1:{}".format(port_of(service.image_endpoint))
        directory = os.path.join(self.mktemp(), "new")
        watch = run_tool(
            self,
            "watch",
            ["--from", address, "--dir", directory, "--count", "2", "--timeout", "30"],
        )
        yield wait_for(lambda: len(service.hub) == 1, what="the watcher to join")
        files = self.write_images(
            ("a.png", make_image("PNG", size=(10, 20))),
            ("b.jpg", make_image("JPEG", size=(30, 40))),
        )
        out, err, status = yield run_tool(self, "send", [*files, "--to", address]).ended()
        self.assertEqual((err, status), ("", 0))
        self.assertEqual(
            out.splitlines(),
            ["sent {} ({} bytes)".format(path, os.path.getsize(path)) for path in files],
        )
        out, err, status = yield watch.ended()
        self.assertEqual((err, status), ("", 0))
        self.assertEqual(self.saved_sizes(directory), [(10, 20), (30, 40)])
        saved = sorted(os.path.join(directory, name) for name in os.listdir(directory))
        self.assertEqual(sorted(out.splitlines()), saved)

    @inlineCallbacks
    def test_send_refused(self):
        """A file that is no image makes send-image print the server's refusal and exit 1."""
        service, _ = yield start_server(self)
        address = "127.0.0.1:{}".format(port_of(service.image_endpoint))
        files = self.write_images(("good.png", make_image()), ("notes.txt", b"not an image"))
        out, err, status = yield run_tool(self, "send", [*files, "--to", address]).ended()
        self.assertEqual(status, 1)
        self.assertEqual(len(out.splitlines()), 2)
        self.assertEqual(
            err,
            "broadcaster-send-image: server refused an image: "
            "unsupported image format (the server accepts PNG, JPEG, GIF, WEBP or BMP)\n",
        )

    @inlineCallbacks
    def test_send_too_large(self):
        """A file over the server's size limit is refused, the server hangs up, and send exits 1."""
        service, _ = yield start_server(self, ["--max-image-size", "500"])
        address = "127.0.0.1:{}".format(port_of(service.image_endpoint))
        noise = Image.frombytes("RGB", (100, 100), bytes(range(256)) * 117 + bytes(48))
        out = io.BytesIO()
        noise.save(out, format="PNG")
        files = self.write_images(("big.png", out.getvalue()), ("small.png", make_image()))
        _, err, status = yield run_tool(self, "send", [*files, "--to", address]).ended()
        self.assertEqual(status, 1)
        self.assertIn(
            "broadcaster-send-image: server refused an image: frame of {} bytes is larger"
            " than the limit of 500 bytes\n".format(len(out.getvalue())),
            err,
        )

    @inlineCallbacks
    def test_send_missing_file(self):
        """A missing file is a usage error (exit 2) reported before any attempt to connect."""
        (good,) = self.write_images(("good.png", make_image()))
        missing = os.path.join(os.path.dirname(good), "missing.png")
        address = "127.0.0.1:{}".format(unused_port(self))
        out, err, status = yield run_tool(self, "send", [good, missing, "--to", address]).ended()
        self.assertEqual((out, status), ("", 2))
        self.assertIn(repr(missing), err)
        self.assertIn("No such file", err)

    @inlineCallbacks
    def test_send_cannot_connect(self):
        """With nothing listening, send-image says it cannot connect and exits 1."""
        (good,) = self.write_images(("good.png", make_image()))
        port = unused_port(self)
        out, err, status = yield run_tool(
            self, "send", [good, "--to", "127.0.0.1:{}".format(port)]
        ).ended()
        self.assertEqual((out, status), ("", 1))
        self.assertIn("cannot connect to 127.0.0.1:{}".format(port), err)

    @inlineCallbacks
    def test_send_bad_address(self):
        """An unbracketed IPv6 address is a usage error."""
        (good,) = self.write_images(("good.png", make_image()))
        _, err, status = yield run_tool(self, "send", [good, "--to", "::1:9998"]).ended()
        self.assertEqual(status, 2)
        self.assertIn("[::1]:9998", err)

    @inlineCallbacks
    def test_watch_timeout(self):
        """watch-images exits 1 when no image arrives within --timeout."""
        service, _ = yield start_server(self)
        address = "127.0.0.1:{}".format(port_of(service.image_endpoint))
        out, err, status = yield run_tool(
            self, "watch", ["--from", address, "--dir", self.mktemp(), "--timeout", "0.3"]
        ).ended()
        self.assertEqual((out, status), ("", 1))
        self.assertIn("no image arrived within 0.3 s", err)

    @inlineCallbacks
    def test_watch_skips_what_is_not_an_image(self):
        """Non-image and error frames are reported on stderr and skipped; images are saved."""
        port = fake_image_port(
            self, [b"junk", b"ERROR something", make_image("PNG", size=(3, 2))]
        )
        directory = self.mktemp()
        out, err, status = yield run_tool(
            self, "watch",
            ["--from", "127.0.0.1:{}".format(port), "--dir", directory, "--count", "1"],
        ).ended()
        self.assertEqual(status, 0)
        self.assertIn("skipped a frame of 4 bytes that is not an image", err)
        self.assertIn("something", err)
        self.assertEqual(self.saved_sizes(directory), [(3, 2)])
        self.assertEqual(len(out.splitlines()), 1)

    @inlineCallbacks
    def test_watch_server_closes(self):
        """The server closing the connection before --count images makes watch-images exit 1."""
        port = fake_image_port(self, [make_image("PNG", size=(3, 2))])
        directory = self.mktemp()
        out, err, status = yield run_tool(
            self, "watch",
            ["--from", "127.0.0.1:{}".format(port), "--dir", directory, "--count", "2"],
        ).ended()
        self.assertEqual(status, 1)
        self.assertIn("the server closed the connection; 1 image saved", err)
        self.assertEqual(len(out.splitlines()), 1)

    @inlineCallbacks
    def test_watch_interrupted(self):
        """Ctrl-C (SIGINT) makes watch-images exit 0 without a word."""
        service, _ = yield start_server(self)
        address = "127.0.0.1:{}".format(port_of(service.image_endpoint))
        watch = run_tool(self, "watch", ["--from", address, "--dir", self.mktemp()])
        yield wait_for(lambda: len(service.hub) == 1, what="the watcher to join")
        watch.transport.signalProcess("INT")
        self.assertEqual((yield watch.ended()), ("", "", 0))
