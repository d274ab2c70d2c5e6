"""
Property-based tests: whatever bytes a client sends, the code that reads
them never crashes the server, and what it does is what its wire format
promises.

Each property is checked with Hypothesis against :mod:`broadcaster.protocols.wire`'s
JSON parser, the line bridge, the image port and the WebSocket protocol,
the last three over in-memory transports with fake clocks.  Every example
builds its own hub and connections, so examples cannot leak into each other.

Inputs the server once mishandled are pinned with ``@example``, so they
are tried on every run whatever Hypothesis draws.
"""

import functools
import json
import os
import re
import struct
import traceback
from contextlib import contextmanager

from hypothesis import example, given, settings, strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.defer import maybeDeferred
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock, StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from broadcaster.core.events import ImageMessage, TextMessage
from broadcaster.core.text import escape_controls
from broadcaster.protocols.images import ImageFactory, frame
from broadcaster.core.imaging import ImageError, normalise
from broadcaster.protocols.lines import LineBridgeFactory
from broadcaster.core.names import LOBBY
from broadcaster.protocols.origin import OriginPolicy
from broadcaster.protocols.websocket import BroadcastServerFactory
from broadcaster.protocols.wire import (
    CLIENT_TYPES,
    MAX_EPOCH_LENGTH,
    MAX_SAFE_INTEGER,
    MAX_REF_LENGTH,
    BadRequest,
    JSONCodec,
    parse_client_message,
)
from broadcaster.core.members import MemberBase
from tests.support import (
    immediate_hub,
    DEFAULT_MASK,
    OP_BINARY,
    OP_CLOSE,
    OP_CONTINUATION,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    build_frame,
    close_payload,
    parse_frames,
)
from tests.core.test_imaging import make_image

#: Every property: 200 examples, no per-example deadline (the first example
#: pays for imports), no example database written into the checkout, and
#: one failure reported (the simplest Hypothesis found), not a group.
#: What the line bridge turns into spaces: every line break of a terminal
#: or of str.splitlines() (see broadcaster.protocols.lines).
LINE_BREAKS = re.compile("\r\n|[\r\n\v\f\x1c\x1d\x1e\x85\u2028\u2029]")

# Derandomised in CI, with the failing blob printed: see tests/__init__.py.
FUZZ = settings(max_examples=200, deadline=None, database=None, report_multiple_bugs=False)


def reported(test):
    """
    Make a failing example visible under trial.

    Hypothesis attaches the falsifying example to the exception as a note,
    which trial does not print: fail instead with the whole original
    exception, traceback and notes included.
    """

    @functools.wraps(test)
    def run(self, *args, **kwargs):
        try:
            return test(self, *args, **kwargs)
        except Exception as e:
            if not getattr(e, "__notes__", None):
                raise
            raise self.failureException("".join(traceback.format_exception(e))) from None

    return run


def chunked(data: bytes, cuts) -> list:
    """
    ``data`` split at the positions ``cuts`` (each taken modulo one more
    than its length), as TCP might deliver it; never an empty chunk.
    """
    points = sorted({cut % (len(data) + 1) for cut in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:]) if b > a]


cut_points = st.lists(st.integers(min_value=0, max_value=2**16), max_size=12)


class FuzzTestCase(SynchronousTestCase):
    """
    Checks that an example logged no failure: the hub and the protocols
    log, rather than raise, what goes wrong delivering to a member.
    """

    @contextmanager
    def no_failures_logged(self):
        """
        Run the block, then fail if it logged a failure (reported once, by
        this check, not again by trial's own observer).
        """
        observer = EventLoggingObserver()
        globalLogPublisher.addObserver(observer)
        try:
            yield
        finally:
            globalLogPublisher.removeObserver(observer)
        failures = [e["log_failure"] for e in observer if "log_failure" in e]
        if failures:
            self.flushLoggedErrors()
            self.fail(
                "failures logged: {}".format(
                    "; ".join(
                        "{}: {}".format(f.type.__name__, f.getErrorMessage()) for f in failures
                    )
                )
            )


def encodable(value) -> bool:
    """Whether every string in ``value`` can be sent as UTF-8."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return False
        return True
    if isinstance(value, dict):
        return all(encodable(k) and encodable(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(encodable(v) for v in value)
    return True


# JSON-mode input

#: Any code point, lone surrogates included (JSON's "\ud800" escapes
#: decode to them), with the troublesome ones drawn often.
any_character = st.characters(exclude_categories=()) | st.sampled_from(
    ["\ud800", "\udfff", "\x00", "\n", "\u2028", "\u202e", "\u00e9", "\U0001f600"]
)
# Not st.text(alphabet=any_character), which would draw from the first
# strategy alone.
any_text = st.lists(any_character, max_size=20).map("".join)


def json_of(strings):
    """JSON values (NaN and infinities included: Python reads them) with ``strings``."""
    return st.recursive(
        st.none()
        | st.booleans()
        | st.integers()
        | st.floats(allow_nan=True, allow_infinity=True)
        | strings,
        lambda children: st.lists(children, max_size=4)
        | st.dictionaries(strings, children, max_size=4),
        max_leaves=12,
    )


json_values = json_of(any_text)

valid_rooms = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", fullmatch=True)
valid_refs = st.text(max_size=MAX_REF_LENGTH) | st.integers(min_value=-(2**53), max_value=2**53)
valid_names = st.text(
    alphabet=st.characters(exclude_categories=("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp")),
    min_size=1,
    max_size=32,
).filter(str.strip)


def mostly(usual, other):
    """``usual`` two times in three, else ``other``."""
    return st.one_of(usual, usual, other)


#: Objects shaped like client messages, with any value in any field.
message_like = st.fixed_dictionaries(
    {"type": mostly(st.sampled_from(CLIENT_TYPES), json_values)},
    optional={
        "ref": mostly(valid_refs | any_text, json_values),
        "room": mostly(valid_rooms, json_values),
        "text": mostly(any_text, json_values),
        "name": mostly(valid_names | any_text, json_values),
        "since": mostly(
            st.fixed_dictionaries(
                {}, optional={"epoch": mostly(any_text, json_values), "seq": st.integers()}
            ),
            json_values,
        ),
        "limit": mostly(st.integers(), json_values),
        "token": mostly(any_text, json_values),
    },
)


@st.composite
def valid_messages(draw):
    """
    A client message the server must accept, and the request it must read
    from it.
    """
    kind = draw(st.sampled_from(CLIENT_TYPES))
    message = {"type": kind}
    expected = {"type": kind, "ref": None}
    if draw(st.booleans()):
        message["ref"] = expected["ref"] = draw(valid_refs | st.none())

    def optional_room():
        if draw(st.booleans()):
            message["room"] = draw(valid_rooms)
        expected["room"] = message.get("room", LOBBY)

    if kind == "message":
        message["text"] = expected["text"] = draw(st.text())
        optional_room()
    elif kind in ("join", "leave"):
        message["room"] = expected["room"] = draw(valid_rooms)
        if kind == "join":
            expected["since"] = None
            if draw(st.booleans()):
                since = draw(
                    st.none()
                    | st.fixed_dictionaries(
                        {
                            "epoch": st.text(max_size=MAX_EPOCH_LENGTH),
                            "seq": st.integers(min_value=0, max_value=MAX_SAFE_INTEGER),
                        }
                    )
                )
                message["since"] = since
                if since is not None:
                    expected["since"] = (since["epoch"], since["seq"])
    elif kind == "hello":
        message["name"] = draw(valid_names)
        expected["name"] = message["name"].strip()
    elif kind == "who":
        optional_room()
        expected["cursor"] = None
        if draw(st.booleans()):
            message["cursor"] = expected["cursor"] = draw(st.text(max_size=1024) | st.none())
        expected["limit"] = 100
        if draw(st.booleans()):
            message["limit"] = draw(st.integers(min_value=1, max_value=10**6))
            expected["limit"] = min(message["limit"], 100)
    elif kind == "history":
        optional_room()
        expected["limit"] = 100
        if draw(st.booleans()):
            message["limit"] = draw(st.integers(min_value=1, max_value=10**6))
            expected["limit"] = min(message["limit"], 100)
        expected["before"] = None
        if draw(st.booleans()):
            message["before"] = expected["before"] = draw(
                st.integers(min_value=1, max_value=2**53) | st.none()
            )
    elif kind == "image":
        optional_room()
        message["size"] = expected["size"] = draw(st.integers(min_value=1, max_value=2**53))
    elif kind == "image_url":
        message["url"] = expected["url"] = draw(st.text(min_size=1, max_size=2048))
    elif kind == "refresh":
        message["token"] = expected["token"] = draw(st.text(min_size=1, max_size=8192))
    # Fields the server does not know are ignored.
    known = {
        "type", "ref", "room", "text", "name", "since", "limit", "url", "cursor", "before", "token",
        "size",
    }
    extra = draw(
        st.dictionaries(
            st.text().filter(lambda k: k not in known), json_of(st.text(max_size=20)), max_size=2
        )
    )
    message.update(extra)
    return message, expected


def as_payload(value, ascii_only: bool = True) -> bytes:
    """``value`` as a client would send it: JSON text, UTF-8."""
    return json.dumps(value, ensure_ascii=ascii_only).encode("utf-8")


class ParseClientMessageTests(FuzzTestCase):
    """:func:`broadcaster.protocols.wire.parse_client_message` on untrusted input."""

    def check(self, payload: bytes) -> None:
        """
        ``payload`` is read as a request or refused with :class:`BadRequest`,
        and either way the server can say so: everything it would send back
        encodes as UTF-8 JSON.
        """
        try:
            request = parse_client_message(payload)
        except BadRequest as e:
            self.assertIsInstance(str(e), str)
            # The refusal goes back to the client, its ref echoed.
            JSONCodec().error(str(e), e.ref)
            return
        self.assertIsInstance(request, dict)
        self.assertIn(request["type"], CLIENT_TYPES)
        self.assertTrue(
            encodable(request),
            "a request the server cannot send back as UTF-8: {!r}".format(request),
        )

    @reported
    @FUZZ
    @given(st.binary(max_size=200))
    @example(b"[" * 50_000)
    @example(b'{"type": "history", "limit": 1e999}')
    @example(b'{"type": "join", "room": "a", "since": {"epoch": "e", "seq": ' + b"9" * 5000 + b"}}")
    @example(b"\xef\xbb\xbf{}")
    @example(b'{"type": "message", "text": "\\ud800"}')
    def test_arbitrary_bytes(self, payload):
        """Any bytes give a request or BadRequest, nothing else."""
        self.check(payload)

    @reported
    @FUZZ
    @given(json_values | message_like)
    @example({"type": "message", "text": "\ud800"})
    @example({"type": "dance", "ref": "\udfff"})
    @example({"type": "who", "ref": "\udfff"})
    @example(json.loads("[" * 50 + "]" * 50))
    def test_arbitrary_json(self, value):
        """Any JSON value, most shaped like a client message, gives a request
        or BadRequest, and whatever the server would send back encodes."""
        self.check(as_payload(value))

    @reported
    @FUZZ
    @given(valid_messages(), st.booleans())
    def test_valid_messages_round_trip(self, message_and_expected, ascii_only):
        """A valid client message is read with exactly the fields it carried."""
        message, expected = message_and_expected
        self.assertEqual(parse_client_message(as_payload(message, ascii_only)), expected)


# The line bridge

LINE_LIMIT = 32

line_pieces = st.one_of(
    st.binary(max_size=12),
    st.sampled_from(
        [
            b"\r",
            b"\xff",
            b"\xc3",
            "\u00e9".encode("utf-8"),
            "\u2028".encode("utf-8"),
            "\x85\x0b\x0c\x1c".encode("utf-8"),
            b"   ",
            b"ERROR not really",
        ]
    ),
    st.integers(min_value=LINE_LIMIT - 2, max_value=LINE_LIMIT + 2).map(lambda n: b"x" * n),
)

#: Lines of pieces, most of them ended by LF or CRLF.
line_streams = st.lists(
    st.tuples(
        st.lists(line_pieces, max_size=4).map(b"".join),
        st.sampled_from([b"\n", b"\n", b"\r\n", b""]),
    ).map(b"".join),
    max_size=10,
).map(b"".join)


def line_bridge_outcome(chunks, limit):
    """
    What the line bridge must do with ``chunks``, per its wire format.

    :return: ``(lines, closes)``: the complete lines (line end removed) it
        must act on, and whether it must hang up because more than
        ``limit`` bytes arrived without a line end.  A CR at the very end
        may be the first half of a CRLF, so it does not count against the
        limit.
    """
    received = b""
    for chunk in chunks:
        received += chunk
        pending = received.rpartition(b"\n")[2]
        if pending.endswith(b"\r"):
            pending = pending[:-1]
        if len(pending) > limit:
            return _lines(received), True
    return _lines(received), False


def _lines(received):
    return [line[:-1] if line.endswith(b"\r") else line for line in received.split(b"\n")[:-1]]


class Recorder(MemberBase):
    """A hub member that keeps the events it is given."""

    id = "recorder"
    name = None

    def __init__(self):
        self.events = []

    def deliver(self, event):
        self.events.append(event)


class LineBridgeFuzzTests(FuzzTestCase):
    """The line bridge fed arbitrary bytes, in arbitrary chunks."""

    @reported
    @FUZZ
    @given(line_streams, cut_points)
    @example(b"x" * LINE_LIMIT + b"\r\n", [LINE_LIMIT + 1])
    @example(b"x" * (LINE_LIMIT + 1) + b"\n", [LINE_LIMIT + 1])
    @example(b"ok\r\r\na\rb\xc2\x85c\n", [5])
    @example(b"\x1b]0;x\x07 \x1f\t\xc2\x9b\n", [3])
    def test_any_bytes(self, data, cuts):
        """Every complete line is broadcast, or refused with one ERROR line;
        broadcasts hold no line break and fit the limit; the client reads
        only ERROR lines and its own messages, one per line; it is cut off
        only when more than the limit arrives without a line end."""
        clock = Clock()
        hub = immediate_hub(clock, node_id="t")
        recorder = Recorder()
        hub.connect(recorder)
        factory = LineBridgeFactory(hub, clock, max_line_length=LINE_LIMIT)
        protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5000))
        transport = StringTransport()
        protocol.makeConnection(transport)
        transport.clear()
        recorder.events.clear()

        chunks = chunked(data, cuts)
        with self.no_failures_logged():
            for chunk in chunks:
                if transport.disconnecting:
                    break  # the reactor reads no more from a closing connection
                protocol.dataReceived(chunk)

        lines, closes = line_bridge_outcome(chunks, LINE_LIMIT)
        expected_texts = []
        expected_replies = []
        for line in lines:
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError:
                text = None
            if len(line) > LINE_LIMIT or text is None:
                expected_replies.append("error")
            elif text.strip():
                expected_texts.append(text)
                expected_replies.append(text)
        if closes:
            expected_replies.append("error")

        texts = [e.text for e in recorder.events if isinstance(e, TextMessage)]
        self.assertEqual(texts, expected_texts)
        for text in texts:
            self.assertNotIn("\n", text)
            self.assertLessEqual(len(text.encode("utf-8")), LINE_LIMIT)
        self.assertEqual({e.sender for e in recorder.events}, {protocol.id} if texts else set())

        output = transport.value()
        self.assertTrue(output == b"" or output.endswith(b"\n"), output)
        replies = []
        prefix = "{}: ".format(protocol.id)
        for raw in output.split(b"\n")[:-1]:
            line = raw.decode("utf-8")
            self.assertEqual(line.splitlines(), [line], "one message, one line")
            if line.startswith("ERROR "):
                replies.append("error")
            else:
                self.assertTrue(line.startswith(prefix), line)
                replies.append(line[len(prefix) :])
        self.assertEqual(len(replies), len(expected_replies), (replies, expected_replies))
        for got, want in zip(replies, expected_replies):
            if want == "error":
                self.assertEqual(got, "error")
            else:
                # Line breaks inside the message became spaces, other
                # control characters escapes; all else is as sent.
                self.assertEqual(got, escape_controls(" ".join(LINE_BREAKS.split(want))))
        self.assertEqual(transport.disconnecting, closes)

        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(hub.member_ids(), ["recorder"])
        self.assertEqual(clock.getDelayedCalls(), [])


# The image port

MAX_IMAGE_SIZE = 2048
IMAGE_TIMEOUT = 30
MAX_PIXELS = 10000

GOOD_IMAGES = [
    make_image("PNG", size=(1, 1)),
    make_image("PNG", size=(3, 2), color=(0, 255, 0)),
    make_image("PNG", mode="RGBA", size=(2, 2), color=(0, 0, 255, 128)),
    make_image("GIF", mode="P", size=(4, 4), color=3),
]


def header(length: int) -> bytes:
    return struct.pack(">I", length)


image_pieces = st.one_of(
    st.sampled_from(GOOD_IMAGES).map(frame),
    st.sampled_from(GOOD_IMAGES).map(frame),
    st.binary(min_size=1, max_size=64).map(frame),
    st.sampled_from(GOOD_IMAGES).map(lambda png: frame(png[: len(png) // 2])),
    st.sampled_from([0, 1, MAX_IMAGE_SIZE, MAX_IMAGE_SIZE + 1, 2**31, 2**32 - 1]).map(header),
    st.integers(min_value=0, max_value=2**32 - 1).map(header),
    st.binary(min_size=1, max_size=16),
)


def image_port_outcome(data: bytes):
    """
    What the image port must do with ``data``, per its wire format.

    :return: ``(bodies, ending)``: the frame bodies it must decode, in
        order, and how the stream ends: ``"clean"`` (between frames),
        ``"fatal"`` (a length of 0 or above the limit: an error and a close)
        or ``"partial"`` (a frame left incomplete, which times out).
    """
    bodies = []
    position = 0
    while True:
        if position == len(data):
            return bodies, "clean"
        if len(data) - position < 4:
            return bodies, "partial"
        (length,) = struct.unpack(">I", data[position : position + 4])
        position += 4
        if length == 0 or length > MAX_IMAGE_SIZE:
            return bodies, "fatal"
        if len(data) - position < length:
            return bodies, "partial"
        bodies.append(data[position : position + length])
        position += length


def decoded_png(body: bytes):
    """The PNG the server must publish for ``body``, or ``None`` if it must refuse it."""
    try:
        return normalise(body, MAX_PIXELS).png
    except ImageError:
        return None


def read_frames(data: bytes):
    """
    The length-prefixed frames in ``data``.

    :return: ``(payloads, bytes left over that are not a whole frame)``.
    """
    frames = []
    while len(data) >= 4:
        (length,) = struct.unpack(">I", data[:4])
        if len(data) < 4 + length:
            break
        frames.append(data[4 : 4 + length])
        data = data[4 + length :]
    return frames, data


class ImagePortFuzzTests(FuzzTestCase):
    """The image port fed arbitrary frames and bytes, in arbitrary chunks."""

    @reported
    @FUZZ
    @given(st.lists(image_pieces, min_size=1, max_size=8), cut_points)
    @example([frame(GOOD_IMAGES[0]), header(0), frame(GOOD_IMAGES[1])], [3])
    @example([frame(b"junk"), frame(GOOD_IMAGES[1]), b"\x00\x00"], [])
    def test_any_frames(self, pieces, cuts):
        """The sender reads only well-formed ERROR frames; the images it framed
        correctly before any fatal framing error are published, in order, and
        reach another image client as PNG frames; bad framing or a stalled
        frame, and nothing else, closes the connection."""
        clock = Clock()
        hub = immediate_hub(clock, node_id="t")
        recorder = Recorder()
        hub.connect(recorder)
        factory = ImageFactory(
            hub,
            clock,
            lambda data: maybeDeferred(normalise, data, MAX_PIXELS),
            max_image_size=MAX_IMAGE_SIZE,
            image_timeout=IMAGE_TIMEOUT,
        )
        receiver = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5001))
        receiver_transport = StringTransport()
        receiver.makeConnection(receiver_transport)
        protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5000))
        transport = StringTransport()
        protocol.makeConnection(transport)

        data = b"".join(pieces)
        with self.no_failures_logged():
            for chunk in chunked(data, cuts):
                if transport.disconnecting:
                    break  # the reactor reads no more from a closing connection
                protocol.dataReceived(chunk)
            clock.advance(IMAGE_TIMEOUT)

        bodies, ending = image_port_outcome(data)
        pngs = [decoded_png(body) for body in bodies]
        expected_pngs = [png for png in pngs if png is not None]
        expected_errors = pngs.count(None) + (ending != "clean")

        published = [e for e in recorder.events if isinstance(e, ImageMessage)]
        self.assertEqual([e.png for e in published], expected_pngs)
        self.assertEqual({e.sender for e in published}, {protocol.id} if published else set())
        replies, rest = read_frames(transport.value())
        self.assertEqual(rest, b"", "a partial frame was written")
        self.assertEqual(len(replies), expected_errors, replies)
        for reply in replies:
            self.assertTrue(reply.startswith(b"ERROR "), reply)
            reply.decode("utf-8")
        if ending == "fatal":
            self.assertRegex(replies[-1], b"empty frame|larger than the limit")
        elif ending == "partial":
            self.assertIn(b"not completed within", replies[-1])
        self.assertEqual(transport.disconnecting, ending != "clean")
        self.assertEqual(read_frames(receiver_transport.value()), (expected_pngs, b""))

        for connection in (protocol, receiver):
            connection.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(hub.member_ids(), ["recorder"])
        self.assertEqual(clock.getDelayedCalls(), [])


# The WebSocket protocol

HANDSHAKE = (
    b"GET / HTTP/1.1\r\nHost: 127.0.0.1:9999\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\n"
)

#: Close codes a server may put in a close frame (RFC 6455 section 7.4).
SENDABLE_CLOSE_CODES = {1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011} | set(
    range(3000, 5000)
)

text_payloads = st.one_of(
    st.text(max_size=60).map(lambda t: t.encode("utf-8")),
    (json_values | message_like).map(as_payload),
)
frame_payloads = st.one_of(
    st.binary(max_size=140),
    text_payloads,
    st.integers(min_value=0, max_value=2**16 - 1).map(lambda code: close_payload(code, b"why")),
)


@st.composite
def valid_frames(draw):
    """A frame a client may send: a message, whole or in fragments, or a ping or pong."""
    kind = draw(st.sampled_from(["text", "text", "binary", "fragmented", "ping", "pong"]))
    if kind in ("ping", "pong"):
        opcode = OP_PING if kind == "ping" else OP_PONG
        return build_frame(opcode, draw(st.binary(max_size=125)))
    if kind == "binary":
        return build_frame(OP_BINARY, draw(st.binary(max_size=140)))
    payload = draw(text_payloads)
    if kind == "text":
        return build_frame(OP_TEXT, payload)
    cuts = sorted(draw(st.lists(st.integers(0, len(payload)), min_size=1, max_size=3)))
    parts = [payload[a:b] for a, b in zip([0] + cuts, cuts + [len(payload)])]
    frames = []
    for i, part in enumerate(parts):
        opcode = OP_TEXT if i == 0 else OP_CONTINUATION
        frames.append(build_frame(opcode, part, fin=i == len(parts) - 1))
        if draw(st.booleans()):
            frames.append(build_frame(OP_PING, b"mid"))
    return b"".join(frames)


@st.composite
def any_frames(draw):
    """A frame with any header: every field may be wrong, or right by chance."""
    opcode = draw(st.integers(min_value=0, max_value=15))
    payload = draw(frame_payloads)
    fin = draw(st.booleans())
    rsv = draw(st.sampled_from([0, 0, 0, 1, 2, 4, 7]))
    mask = draw(st.sampled_from([DEFAULT_MASK, DEFAULT_MASK, b"\0\0\0\0", None]))
    length = draw(st.none() | st.integers(min_value=0, max_value=2**64 - 1))
    if length is not None and length > len(payload):
        length_bits = None  # a header promising more than follows
    else:
        length, length_bits = None, draw(st.sampled_from([None, None, 16, 64]))
    return build_frame(
        opcode, payload, fin=fin, rsv=rsv, mask=mask, length=length, length_bits=length_bits
    )


#: Mostly valid frames, so that the server gets past the first one, with
#: arbitrary frames and bytes among them.
websocket_streams = st.lists(
    st.one_of(
        valid_frames(),
        valid_frames(),
        valid_frames(),
        any_frames(),
        st.binary(min_size=1, max_size=20),
    ),
    max_size=8,
)


class WebSocketFuzzTests(FuzzTestCase):
    """The WebSocket protocol fed arbitrary frames, in arbitrary chunks."""

    def connect(self, factory, json_mode=False):
        protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        transport = StringTransport()
        protocol.makeConnection(transport)
        request = HANDSHAKE
        if json_mode:
            request += b"Sec-WebSocket-Protocol: broadcaster.json\r\n"
        protocol.dataReceived(request + b"\r\n")
        self.assertIn(b"101 Switching Protocols", transport.value())
        transport.clear()
        return protocol, transport

    def server_frames(self, transport, json_mode=False):
        """
        Everything written to ``transport`` after the handshake, as frames a
        server may send: whole, unmasked, no reserved bits, a defined
        opcode, and nothing after a close frame; text is UTF-8 (in JSON
        mode, a JSON event).
        """
        frames, rest = parse_frames(transport.value())
        self.assertEqual(rest, b"", "a partial frame was written")
        for i, f in enumerate(frames):
            self.assertFalse(f.masked, f)
            self.assertEqual(f.rsv, 0, f)
            self.assertTrue(f.fin, f)
            self.assertIn(f.opcode, (OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG), f)
            if f.opcode == OP_TEXT:
                text = f.payload.decode("utf-8")
                if json_mode:
                    self.assertIn("type", json.loads(text))
            if f.opcode == OP_CLOSE:
                self.assertEqual(i, len(frames) - 1, "frames after a close: {!r}".format(frames))
                # No code at all is what answers a client's close without
                # one (RFC 6455 5.5.1: the reply echoes the status, if any).
                self.assertIn(f.close_code, SENDABLE_CLOSE_CODES | {None}, f)
                f.close_reason.decode("utf-8")
        return frames

    @reported
    @FUZZ
    @given(websocket_streams, cut_points, st.booleans())
    @example([build_frame(OP_TEXT, b'{"type": "message", "text": "\\ud800"}')], [], True)
    @example([build_frame(OP_CLOSE, b"")], [], False)
    @example([build_frame(OP_TEXT, b'{"type": "dance", "ref": "\\udfff"}')], [], True)
    @example([build_frame(OP_TEXT, b"[" * 50_000)], [], True)
    @example(
        [build_frame(OP_TEXT, b"hi", mask=None), build_frame(OP_CLOSE, close_payload(1002))],
        [],
        False,
    )
    def test_any_frames(self, stream, cuts, json_mode):
        """Nothing a client sends raises out of dataReceived; both it and a
        bystander only ever receive well-formed server frames; and once the
        connections are gone the hub is empty and no timer is left."""
        reactor = MemoryReactorClock()
        hub = immediate_hub(reactor, node_id="t")
        factory = BroadcastServerFactory(hub, OriginPolicy(), reactor)
        bystander, bystander_transport = self.connect(factory)
        protocol, transport = self.connect(factory, json_mode)

        with self.no_failures_logged():
            for chunk in chunked(b"".join(stream), cuts):
                if transport.disconnecting:
                    break  # the reactor reads no more from a closing connection
                protocol.dataReceived(chunk)
            protocol.connectionLost(Failure(ConnectionDone()))

        self.server_frames(transport, json_mode)
        heard = self.server_frames(bystander_transport)
        self.assertEqual(
            heard[-1].payload, "{} disconnected".format(protocol.id).encode("ascii")
        )
        self.assertEqual(hub.member_ids(), [bystander.id])
        bystander.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(len(hub), 0)
        self.assertEqual(hub.rooms(), [])
        self.assertEqual(reactor.getDelayedCalls(), [])


class ReproducibleTests(SynchronousTestCase):
    def test_ci_runs_the_same_examples_every_time(self):
        """In CI the property tests are derandomised, so that a failure there
        is the same failure on any machine; everywhere a failure prints the
        blob that replays it."""
        self.assertTrue(FUZZ.print_blob)
        self.assertEqual(FUZZ.derandomize, bool(os.environ.get("CI")))
