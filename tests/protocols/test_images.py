"""
Tests for :mod:`broadcaster.protocols.images`, the length-prefixed raw-TCP image
protocol: unit tests over in-memory transports with a fake clock, and
integration tests through real sockets to image-port and WebSocket clients.
"""

import io
import struct

from PIL import Image
from twisted.internet.address import IPv4Address
import threading

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks, maybeDeferred
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver, StringTransport
from twisted.logger import LogLevel, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from broadcaster.core.events import ImageMessage
from broadcaster.core.imaging import normalise
from broadcaster.core.imaging import ImageBusy
from broadcaster.protocols import images as images_module
from broadcaster.protocols.images import DecoderPool, ImageFactory, error_frame, frame
from broadcaster.core.members import MemberBase
from tests.support import (
    immediate_hub,
    FrameClient,
    connect_client,
    connect_raw,
    port_of,
    start_server,
    wait_for,
)
from tests.core.test_imaging import bomb_png, make_image


def parse_frames(data: bytes):
    frames = []
    while data:
        (length,) = struct.unpack(">I", data[:4])
        frames.append(data[4 : 4 + length])
        data = data[4 + length :]
    return frames


def png_size(png: bytes):
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG", image.format
    return image.size


class Recorder(MemberBase):
    """A hub member that keeps the images it is given."""

    id = "recorder"
    name = None

    def __init__(self):
        self.images = []

    def deliver(self, event):
        if isinstance(event, ImageMessage):
            self.images.append(event)


class ImageProtocolTests(SynchronousTestCase):
    """The protocol over StringTransport, with a synchronous decoder by default."""

    def setUp(self):
        self.clock = Clock()
        self.hub = immediate_hub(self.clock, node_id="t")
        self.recorder = Recorder()
        self.hub.connect(self.recorder)
        self.factory = ImageFactory(
            self.hub,
            self.clock,
            lambda data: maybeDeferred(normalise, data, 1_000_000),
            max_image_size=1024 * 1024,
            image_timeout=30,
        )

    def connect(self):
        protocol = self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5000))
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.addCleanup(self.disconnect, protocol)
        return protocol, transport

    def disconnect(self, protocol):
        if protocol.id in self.hub:
            protocol.connectionLost(Failure(ConnectionDone()))

    def test_frame_read_byte_by_byte(self):
        """A frame split into single bytes is reassembled and broadcast once."""
        protocol, transport = self.connect()
        for byte in frame(make_image("PNG", size=(5, 7))):
            protocol.dataReceived(bytes([byte]))
        (image,) = self.recorder.images
        self.assertEqual((image.sender, image.width, image.height), (protocol.id, 5, 7))
        self.assertEqual(transport.value(), b"")

    def test_several_frames_in_one_read(self):
        """Frames arriving in one chunk are all broadcast, in order."""
        protocol, _ = self.connect()
        protocol.dataReceived(b"".join(frame(make_image(size=(n, 1))) for n in (1, 2, 3)))
        self.assertEqual([i.width for i in self.recorder.images], [1, 2, 3])

    def test_other_image_clients_receive_png_frames_but_not_the_sender(self):
        """Every other image-port client gets the PNG framed; the sender does not."""
        sender, sender_t = self.connect()
        other, other_t = self.connect()
        sender.dataReceived(frame(make_image("JPEG", size=(8, 8))))
        (png,) = parse_frames(other_t.value())
        self.assertEqual(png_size(png), (8, 8))
        self.assertEqual(sender_t.value(), b"")

    def test_garbage_gets_an_error_frame_and_the_connection_stays(self):
        """A frame that is no image gets 'ERROR ...' back, and the next image still goes out."""
        logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        protocol, transport = self.connect()
        protocol.dataReceived(frame(b"definitely not an image"))
        (reply,) = parse_frames(transport.value())
        self.assertTrue(reply.startswith(b"ERROR "), reply)
        self.assertFalse(transport.disconnecting)
        self.assertEqual(self.recorder.images, [])
        protocol.dataReceived(frame(make_image()))
        self.assertEqual(len(self.recorder.images), 1)
        warnings = [e for e in logged if e["log_level"] == LogLevel.warn]
        self.assertEqual(len(warnings), 1)

    def test_zero_length_closes(self):
        """A declared length of 0 gets an error frame and the connection is closed."""
        protocol, transport = self.connect()
        protocol.dataReceived(struct.pack(">I", 0) + frame(make_image()))
        (reply,) = parse_frames(transport.value())
        self.assertIn(b"empty", reply)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.recorder.images, [])

    def test_oversized_declared_length_closes_before_buffering(self):
        """A 2 GiB declared length is refused from the header alone."""
        protocol, transport = self.connect()
        protocol.dataReceived(struct.pack(">I", 2**31) + b"x" * 1000)
        (reply,) = parse_frames(transport.value())
        self.assertTrue(reply.startswith(b"ERROR "))
        self.assertIn(b"2147483648", reply)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(len(protocol._buffer), 0)

    def test_stalled_frame_times_out(self):
        """A frame not completed within the deadline gets an error and a close."""
        protocol, transport = self.connect()
        data = frame(make_image())
        protocol.dataReceived(data[:10])
        self.clock.advance(29)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(1)
        (reply,) = parse_frames(transport.value())
        self.assertIn(b"not completed within 30 s", reply)
        self.assertTrue(transport.disconnecting)
        protocol.dataReceived(data[10:])
        self.assertEqual(self.recorder.images, [])

    def test_deadline_is_per_frame(self):
        """A slow but steady sender is not cut off: each frame has its own deadline."""
        protocol, transport = self.connect()
        for _ in range(3):
            data = frame(make_image())
            protocol.dataReceived(data[:5])
            self.clock.advance(20)
            protocol.dataReceived(data[5:])
            self.clock.advance(20)
        self.assertEqual(len(self.recorder.images), 3)
        self.assertFalse(transport.disconnecting)
        # No frame deadline is left: only the idle limit, from the last byte.
        (idle,) = self.clock.getDelayedCalls()
        self.assertEqual(idle.getTime(), self.clock.seconds() - 20 + 900)

    def test_truncated_frame_on_disconnect_is_dropped(self):
        """Half a frame followed by a disconnect broadcasts nothing and leaves no timer."""
        protocol, _ = self.connect()
        protocol.dataReceived(frame(make_image())[:20])
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.recorder.images, [])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_decodes_in_order_one_at_a_time_and_pauses_reading(self):
        """With a slow decoder, frames are decoded in the order received, one
        at a time, and the socket stops being read while frames wait."""
        pending = []

        def slow_decode(data):
            d = Deferred()
            pending.append((data, d))
            return d

        self.factory.decode = slow_decode
        protocol, transport = self.connect()
        images = [make_image(size=(n, 1)) for n in (1, 2, 3)]
        protocol.dataReceived(b"".join(frame(i) for i in images))
        self.assertEqual(len(pending), 1)
        self.assertEqual(transport.producerState, "paused")
        while pending:
            data, d = pending.pop(0)
            d.callback(normalise(data))
        self.assertEqual([i.width for i in self.recorder.images], [1, 2, 3])
        self.assertEqual(transport.producerState, "producing")

    def test_error_frame_format(self):
        """An error frame is a normal frame whose payload is 'ERROR ' and UTF-8 text."""
        self.assertEqual(error_frame("bad \u00e9"), b"\x00\x00\x00\x0cERROR bad \xc3\xa9")


class ImagePortIntegrationTests(TestCase):
    """Images through real sockets to every kind of client."""

    @inlineCallbacks
    def setUp(self):
        self.service, _ = yield start_server(self, ["--image-max-pixels", "1000000"])
        self.web_port = port_of(self.service.web_endpoint)
        self.image_port = port_of(self.service.image_endpoint)

    @inlineCallbacks
    def test_images_reach_image_json_and_plain_clients(self):
        """PNG and JPEG from a raw socket reach another image client as PNG
        frames, JSON clients as metadata plus PNG, plain clients as PNG."""
        receiver = yield connect_raw(self, self.image_port, FrameClient)
        js = yield connect_client(self, self.web_port, json_mode=True)
        plain = yield connect_client(self, self.web_port)
        sender = yield connect_raw(self, self.image_port, FrameClient)
        yield wait_for(lambda: len(self.service.hub) == 4, what="four members")
        # Skip what arriving caused: the JSON client's welcome and three
        # joins (its own, plain's, sender's), the plain client's two joins.
        self.assertEqual((yield js.next_json())["type"], "welcome")
        for _ in range(3):
            self.assertEqual((yield js.next_json())["type"], "join")
        for _ in range(2):
            self.assertRegex((yield plain.next_text()), " connected$")

        sender.send_frame(make_image("PNG", size=(10, 20)))
        sender.send_frame(make_image("JPEG", size=(30, 40)))
        for expected in [(10, 20), (30, 40)]:
            png = yield receiver.next()
            self.assertEqual(png_size(png), expected)

            header = yield js.next_json()
            self.assertEqual(header["type"], "image")
            self.assertEqual((header["width"], header["height"]), expected)
            self.assertEqual(header["format"], "png")
            payload, binary = yield js.next()
            self.assertTrue(binary)
            self.assertEqual(header["size"], len(payload))
            self.assertEqual(payload, png)

            payload, binary = yield plain.next()
            self.assertEqual((payload, binary), (png, True))

    @inlineCallbacks
    def test_many_images_arrive_in_order(self):
        """Ten images from one sender arrive in the order sent."""
        receiver = yield connect_raw(self, self.image_port, FrameClient)
        sender = yield connect_raw(self, self.image_port, FrameClient)
        yield wait_for(lambda: len(self.service.hub) == 2, what="two members")
        for n in range(1, 11):
            sender.send_frame(make_image("PNG", size=(n, n)))
        sizes = []
        for _ in range(10):
            sizes.append(png_size((yield receiver.next())))
        self.assertEqual(sizes, [(n, n) for n in range(1, 11)])

    @inlineCallbacks
    def test_bad_input_costs_only_the_sender(self):
        """Garbage, a bomb and a 2 GiB header: each sender gets its error,
        the others get nothing bad, and the next good image arrives intact."""
        receiver = yield connect_raw(self, self.image_port, FrameClient)
        sender = yield connect_raw(self, self.image_port, FrameClient)
        yield wait_for(lambda: len(self.service.hub) == 2, what="two members")

        sender.send_frame(b"\x89PNG but not really")
        self.assertTrue((yield sender.next()).startswith(b"ERROR "))
        sender.send_frame(bomb_png(50_000, 50_000))
        reply = yield sender.next()
        self.assertTrue(reply.startswith(b"ERROR "), reply)
        self.assertIn(b"too large", reply)

        hostile = yield connect_raw(self, self.image_port, FrameClient)
        hostile.transport.write(struct.pack(">I", 2 * 1024**3))
        self.assertTrue((yield hostile.next()).startswith(b"ERROR "))
        yield hostile.closed

        good = make_image("PNG", size=(3, 3))
        sender.send_frame(good)
        png = yield receiver.next()
        self.assertEqual(png_size(png), (3, 3))
        self.assertEqual(receiver.inbox.items, [png])

    @inlineCallbacks
    def test_connections_are_announced(self):
        """Image-port clients are announced to WebSocket clients like any other."""
        plain = yield connect_client(self, self.web_port)
        yield plain.next_text()
        camera = yield connect_raw(self, self.image_port, FrameClient)
        announcement = yield plain.next_text()
        self.assertRegex(announcement, r"^\S+ connected$")
        camera.transport.loseConnection()
        self.assertEqual(
            (yield plain.next_text()), announcement.replace("connected", "disconnected")
        )


class ImageLogTests(SynchronousTestCase):
    def test_each_image_is_logged_with_its_size_not_its_bytes(self):
        """An accepted image is logged with sender, dimensions, format and sizes."""
        from twisted.internet.testing import EventLoggingObserver
        from twisted.logger import globalLogPublisher

        logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        clock = Clock()
        hub = immediate_hub(clock, node_id="t")
        factory = ImageFactory(hub, clock, lambda data: maybeDeferred(normalise, data))
        protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5000))
        protocol.makeConnection(StringTransport())
        self.addCleanup(protocol.connectionLost, Failure(ConnectionDone()))
        protocol.dataReceived(frame(make_image("JPEG", size=(6, 4))))
        (event,) = [e for e in logged if "image (" in e.get("log_format", "")]
        self.assertEqual(
            (event["width"], event["height"], event["source_format"]), (6, 4, "JPEG")
        )
        self.assertEqual(self.flushLoggedErrors(), [])


class DecoderPoolTests(TestCase):
    """The pool every image is decoded in, with real threads, its decoding
    held back by the test."""

    def setUp(self):
        self.release = threading.Event()
        self.started = []
        real = images_module.normalise

        def held(data, *args):
            self.started.append(data)
            self.release.wait(10)
            return real(data, *args)

        self.patch(images_module, "normalise", held)
        self.pool = DecoderPool(
            reactor, threads=1, max_pixels=10**6, max_png_size=10**6, max_pending=2
        )
        self.pool.startService()
        # Cleanups run last first: let the decoding go, then stop the pool.
        self.addCleanup(lambda: self.pool.running and self.pool.stopService())
        self.addCleanup(self.release.set)

    @inlineCallbacks
    def test_pending_images_are_bounded_server_wide(self):
        """With max_pending images waiting or being decoded, one more is
        refused at once as busy; once they are done, images are accepted
        again."""
        waiting = [self.pool.decode(make_image("PNG")) for _ in range(2)]
        busy = self.failureResultOf(self.pool.decode(make_image("PNG")), ImageBusy)
        self.assertEqual(
            str(busy.value), "the server is busy decoding 2 other images; retry later"
        )
        self.release.set()
        for d in waiting:
            image = yield d
            self.assertEqual(image.source_format, "PNG")
        self.assertEqual((self.pool.pending, self.pool.refused_busy), (0, 1))
        image = yield self.pool.decode(make_image("JPEG"))
        self.assertEqual(image.source_format, "JPEG")
        yield self.pool.stopService()

    @inlineCallbacks
    def test_stopping_never_blocks_the_reactor(self):
        """Stopping while an image is being decoded waits for it without
        blocking the reactor thread: timers still fire meanwhile."""
        decoding = self.pool.decode(make_image("PNG"))
        yield wait_for(lambda: self.started, what="the decode to start")
        stopped = self.pool.stopService()
        self.assertNoResult(stopped)
        ticked = Deferred()
        reactor.callLater(0.05, ticked.callback, "the reactor turned")
        self.assertEqual((yield ticked), "the reactor turned")
        self.assertNoResult(stopped)
        self.release.set()
        yield stopped
        self.assertEqual((yield decoding).source_format, "PNG")
        self.assertFalse(self.pool.running)
