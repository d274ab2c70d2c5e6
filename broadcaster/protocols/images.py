"""
The raw-TCP image protocol (``--image-port``, default ``tcp:9998``).

Wire format, both directions: a frame is a 4-byte big-endian unsigned length
``N`` (``struct.pack(">I", N)``) followed by ``N`` bytes.

Client to server
    Each frame holds one image: PNG, JPEG, GIF, WebP or BMP by default
    (``--image-formats``).  With sign-in configured (``--auth-url``,
    ``--jwt-*``) and the port open (``--anonymous-raw-ports``), a first
    frame ``AUTH <credential>`` signs the client in, checked as a WebSocket
    handshake's ``Authorization: Bearer``: answered with a frame ``OK
    signed in as <user>``, or an error frame and a disconnect.  Without it
    a client has the rights of ``--anonymous-rooms``.

Server to client
    Each frame holds a PNG: an image another client sent (any image-port
    client's, normalised to RGB).  A frame whose payload starts with
    ``ERROR`` and a space is UTF-8 text: the server refused the client's last frame.

Errors
    - A frame that is not a decodable image in an accepted format (or is
      larger than ``--image-max-pixels``) is answered with an error frame;
      the connection stays usable.
    - So is one that arrives while the server has ``--max-pending-images``
      images to decode, or not the ``--image-decode-memory`` to decode it
      (``ERROR the server is busy ...; retry later``).
    - A declared length of 0 or above ``--max-image-size`` is answered with
      an error frame and the connection is closed, before any of the body is
      buffered.
    - A frame not completed within ``--image-timeout`` seconds of its first
      byte is answered with an error frame and the connection is closed.
    - A frame cut short by the client disconnecting is dropped.
    - Over ``--max-connections`` (see :mod:`broadcaster.protocols.admission`), or
      silent for ``--raw-idle-timeout``: an error frame, then the
      connection is closed.

Images are decoded off the reactor thread (see :mod:`broadcaster.core.imaging`)
one at a time per connection, so each client's images are broadcast in the
order it sent them.  While frames wait to be decoded the connection stops
reading, so a fast sender cannot make the server hold more than a few frames.

Image-port clients are hub members like WebSocket clients: their arrival and
departure are announced to the others.  They receive only images, and not
their own.

Frames are read into one ``bytearray`` rather than with Twisted's
:class:`~twisted.protocols.basic.Int32StringReceiver`, whose
``dataReceived`` builds ``_unprocessed + data`` anew on every read: for a
16 MiB frame arriving in 64 KiB reads that is quadratic, about 2 GB copied.
The behaviour is the same: the declared length is checked before anything
of the body is kept.
"""

from __future__ import annotations

import struct
from collections import deque
from typing import Callable, Deque, Optional, Sequence

from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail
from twisted.internet.threads import deferToThreadPool
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from broadcaster.protocols.admission import Admission
from broadcaster.core.flow import Limits
from broadcaster.core.events import encoded, Event, ImageMessage
from broadcaster.core.hub import LOBBY, Hub
from broadcaster.core.identity import SignIn
from broadcaster.core.permissions import EVERYTHING, PUBLISH, Forbidden, Grants
from broadcaster.core.imaging import (
    DEFAULT_FORMATS,
    DecodeBudget,
    ImageBusy,
    ImageError,
    NormalisedImage,
    normalise,
)
from broadcaster.protocols.connection import RawMemberFactory, RawMemberProtocol

_HEADER = struct.Struct(">I")

#: Completed frames a connection may have waiting for the decoder before it
#: stops reading from its socket.
MAX_QUEUED_FRAMES = 2

Decoder = Callable[[bytes], Deferred]


def frame(payload: bytes) -> bytes:
    """
    Frame ``payload`` for the image port.
    """
    return _HEADER.pack(len(payload)) + payload


def error_frame(reason: str) -> bytes:
    """
    The frame that tells a client its last frame was refused.
    """
    return frame("ERROR {}".format(reason).encode("utf-8"))


def _png_frame_header(event: ImageMessage) -> bytes:
    return _HEADER.pack(len(event.png))


class ImageProtocol(RawMemberProtocol):
    """
    One image-port client: reads frames incrementally, has each decoded off
    the reactor thread in order, and receives other clients' images.
    """

    _log = Logger()
    kind = "image"
    error = staticmethod(error_frame)

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._expected: Optional[int] = None  # body length of the frame being read
        self._deadline: Optional[IDelayedCall] = None
        self._queue: Deque[bytes] = deque()
        self._decoding = False
        self._first_frame = True
        self._paused = False

    # Connection lifecycle

    def connectionLost(self, reason: Optional[Failure] = None) -> None:
        self._cancel_deadline()
        if self._buffer or self._expected is not None:
            self._log.info(
                "{client}: dropped an incomplete frame ({have} of {want} bytes) on disconnect",
                client=self.id,
                have=len(self._buffer),
                want=self._expected if self._expected is not None else "?",
            )
        self._buffer = bytearray()
        self._expected = None
        super().connectionLost(reason)

    # Reading frames

    def dataReceived(self, data: bytes) -> None:
        if self.closing:
            return
        self.touched()
        if not self._buffer and self._expected is None:
            self._start_deadline()
        self._buffer += data
        while not self.closing and not self.signing_in:
            if self._expected is None:
                if len(self._buffer) < _HEADER.size:
                    return
                (length,) = _HEADER.unpack_from(self._buffer)
                del self._buffer[: _HEADER.size]
                if not self._acceptable_length(length):
                    return
                self._expected = length
            if len(self._buffer) < self._expected:
                return
            body = bytes(self._buffer[: self._expected])
            del self._buffer[: self._expected]
            self._expected = None
            self._cancel_deadline()
            self._frame_received(body)
            if self._buffer:
                self._start_deadline()
            else:
                return

    def _acceptable_length(self, length: int) -> bool:
        limit = self.factory.max_image_size
        if length == 0:
            self._refuse_and_close("empty frame (declared length 0)")
            return False
        if length > limit:
            self._refuse_and_close(
                "frame of {} bytes is larger than the limit of {} bytes".format(length, limit)
            )
            return False
        return True

    def _start_deadline(self) -> None:
        self._cancel_deadline()
        self._deadline = self.factory.clock.callLater(
            self.factory.image_timeout, self._frame_timed_out
        )

    def _cancel_deadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def _frame_timed_out(self) -> None:
        self._deadline = None
        have = len(self._buffer)
        want = self._expected
        self._buffer = bytearray()
        self._expected = None
        self._refuse_and_close(
            "frame not completed within {:g} s ({} of {} bytes received)".format(
                self.factory.image_timeout, have, want if want is not None else "?"
            )
        )

    def _refuse_and_close(self, reason: str) -> None:
        """
        Bad framing: the stream can no longer be trusted to be in step, so
        say why and hang up.
        """
        self.factory.hub.stats.bad_input[self.kind] += 1
        self._log.warn(
            "[BAD INPUT] {client} ({peer}): {reason}; closing",
            client=self.id,
            peer=self.peer,
            reason=reason,
        )
        self._buffer = bytearray()
        self._cancel_deadline()
        self.close_with(error_frame(reason))

    def signed_in(self) -> bytes:
        return frame("OK signed in as {}".format(self.user or "-").encode("utf-8"))

    def resume_input(self) -> None:
        # Frames that came with the AUTH frame, or while it was checked.
        self.dataReceived(b"")

    def busy(self) -> bool:
        return self._decoding or bool(self._queue)

    # Decoding, in order, off the reactor thread

    def _frame_received(self, body: bytes) -> None:
        if self._first_frame:
            self._first_frame = False
            if self.signs_in(body):
                return
        self.factory.hub.stats.received(self.kind, len(body))
        if not self.within_rate(error_frame):
            return
        try:
            # Before it is decoded for nothing.
            self.factory.hub.check(self.id, LOBBY, PUBLISH)
        except Forbidden as e:
            self.send(error_frame(str(e)))
            return
        self._queue.append(body)
        if len(self._queue) >= MAX_QUEUED_FRAMES and not self._paused:
            self._paused = True
            self.transport.pauseProducing()
        self._decode_next()

    def _decode_next(self) -> None:
        if self._decoding or not self._queue:
            return
        body = self._queue.popleft()
        if self._paused and len(self._queue) < MAX_QUEUED_FRAMES:
            self._paused = False
            if not self.closing:
                self.transport.resumeProducing()
        self._decoding = True
        d = self.factory.decode(body)
        d.addCallbacks(self._decoded, self._not_decoded, errbackArgs=(len(body),))
        d.addBoth(self._decode_finished)

    def _decoded(self, image: NormalisedImage) -> None:
        self.factory.hub.publish_image(self.id, image.png, image.width, image.height)
        self._log.info(
            "{client} sent a {width}x{height} {source_format} image ({size} bytes, {png} as PNG)",
            client=self.id,
            width=image.width,
            height=image.height,
            source_format=image.source_format,
            size=image.source_size,
            png=len(image.png),
        )

    def _not_decoded(self, failure: Failure, size: int) -> None:
        self.factory.hub.stats.image_decode_errors += 1
        if not failure.check(ImageError):
            self._log.failure(
                "{client}: decoding a {size}-byte frame failed unexpectedly",
                failure,
                client=self.id,
                size=size,
            )
            reason = "the server could not process this image"
        else:
            reason = str(failure.value)
            self._log.warn(
                "[BAD INPUT] {client} ({peer}): {size}-byte frame refused: {reason}",
                client=self.id,
                peer=self.peer,
                size=size,
                reason=reason,
            )
        if self.transport is not None and not self.closing:
            self.send(error_frame(reason))

    def _decode_finished(self, _: object) -> None:
        self._decoding = False
        self._decode_next()

    # Receiving images

    def deliver(self, event: Event) -> None:
        """
        Pass on other clients' images; everything else is for other kinds of client.
        """
        if not isinstance(event, ImageMessage) or event.sender == self.id or self.closing:
            return
        self.send(encoded(event, ImageProtocol, _png_frame_header), event.png)


class ImageFactory(RawMemberFactory):
    """
    Builds :class:`ImageProtocol` instances sharing a hub and a decoder.

    :param decode: takes frame bytes, returns a Deferred firing with a
        :class:`NormalisedImage` or failing with :class:`ImageError`; in
        production it runs :func:`broadcaster.core.imaging.normalise` in a thread
        pool.
    :param max_image_size: largest declared frame length accepted, in bytes.
    :param image_timeout: seconds a frame may take from its first byte to its last.
    """

    protocol = ImageProtocol
    listener = "image port"
    refusal = staticmethod(lambda reason: error_frame(reason + "; closing"))

    def __init__(
        self,
        hub: Hub,
        clock: IReactorTime,
        decode: Decoder,
        max_image_size: int = 16 * 1024 * 1024,
        image_timeout: float = 30.0,
        limits: Limits = Limits(),
        admission: Optional[Admission] = None,
        anonymous: Grants = EVERYTHING,
        authenticator: Optional[SignIn] = None,
    ) -> None:
        super().__init__(hub, clock, limits, admission, anonymous, authenticator)
        self.decode = decode
        self.max_image_size = max_image_size
        self.image_timeout = image_timeout


class DecoderPool(Service):
    """
    A bounded pool of threads that decode images, started and stopped with
    the server: the one place every image a client sends is decoded (the
    image port's frames and ``image_url`` downloads alike).

    Decoding is CPU work that would stall every client if it ran on the
    reactor thread.  A pool of its own (rather than the reactor's shared
    one) caps how many cores image decoding may take from the fan-out.

    What it holds is bounded whoever sends: at most ``max_pending`` images
    wait or are being decoded (``--max-pending-images``; each sender has at
    most one on the image port and ``MAX_FETCHES_PER_CLIENT`` through
    ``image_url``), and the images being decoded hold at most ``memory``
    bytes of pixels between them (``--image-decode-memory``, see
    :class:`~broadcaster.core.imaging.DecodeBudget`).  Past either, the
    image is refused with :class:`~broadcaster.core.imaging.ImageBusy`
    ("busy; retry later"), which its sender is told.

    :param threads: most images decoded at once.
    :param max_pixels: passed to :func:`broadcaster.core.imaging.normalise`.
    :param max_png_size: likewise: no frame the server sends is larger.
    :param formats: the Pillow formats accepted (``--image-formats``).
    """

    _log = Logger()

    def __init__(
        self,
        reactor,
        threads: int,
        max_pixels: int,
        max_png_size: int,
        formats: Sequence[str] = DEFAULT_FORMATS,
        max_pending: int = 16,
        memory: int = 1024 * 1024 * 1024,
    ) -> None:
        self._reactor = reactor
        self._max_pixels = max_pixels
        self._max_png_size = max_png_size
        self.formats = tuple(formats)
        self.max_pending = max_pending
        self.pending = 0
        self.budget = DecodeBudget(memory)
        self.refused_busy = 0
        # Fires once no image is being decoded, after stopService.
        self._idle: Optional[Deferred] = None
        self._pool = ThreadPool(minthreads=0, maxthreads=threads, name="broadcaster-images")

    def startService(self) -> None:
        super().startService()
        self._pool.start()

    def stopService(self) -> Deferred:
        """
        Stop the threads once the images being decoded are done (bounded by
        --image-max-pixels).  The reactor goes on meanwhile: only then are
        the threads, idle by now, told to exit and joined, which takes no
        time (``ThreadPool.stop`` joins them, and would block the reactor
        for as long as an image still took).
        """
        super().stopService()
        self._idle = idle = Deferred()
        if not self.pending:
            idle.callback(None)
        return idle.addCallback(lambda _: self._pool.stop())

    def register_metrics(self, collector) -> None:
        """
        Report on ``/metrics`` (a :class:`~broadcaster.http.metrics.StatsCollector`).
        """
        collector.add_gauge(
            "broadcaster_images_pending",
            "Images waiting to be decoded or being decoded now.",
            lambda: self.pending,
        )
        collector.add_gauge(
            "broadcaster_image_decode_memory_bytes",
            "Bytes of pixels reserved by the images being decoded now.",
            lambda: self.budget.used,
        )
        collector.add_gauge(
            "broadcaster_images_refused_busy",
            "Images refused because the server was decoding too many, since start.",
            lambda: self.refused_busy,
        )

    def decode(self, data: bytes) -> Deferred:
        """
        Normalise ``data`` in the pool.

        :return: a Deferred firing with a :class:`NormalisedImage`, or
            failing with :class:`ImageError` (:class:`ImageBusy` if the
            server has too many images to decode now).
        """
        if not self.running:
            return fail(ImageError("the server is shutting down"))
        if self.pending >= self.max_pending:
            self.refused_busy += 1
            return fail(
                ImageBusy(
                    "the server is busy decoding {} other images; retry later".format(
                        self.pending
                    )
                )
            )
        self.pending += 1

        def done(result):
            self.pending -= 1
            if isinstance(result, Failure) and result.check(ImageBusy):
                self.refused_busy += 1
            if not self.pending and self._idle is not None and not self._idle.called:
                self._idle.callback(None)
            return result

        return deferToThreadPool(
            self._reactor,
            self._pool,
            normalise,
            data,
            self._max_pixels,
            self._max_png_size,
            self.formats,
            self.budget,
        ).addBoth(done)
