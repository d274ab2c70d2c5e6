"""
RFC 6455 conformance of the WebSocket port, on the paths real clients reach.

Every test runs a real server on a loopback port.  The offender is a
:class:`tests.support.RawWebSocketClient`: it does the opening handshake by
hand and then sends frames built byte by byte, right or wrong.  Beside it a
well-behaved Autobahn client, the bystander, keeps chatting: whatever the
offender does, the bystander hears every message and only the offender's
departure, so the offender alone pays.

When the server fails a connection it sends a close frame with the status
code of RFC 6455 section 7.4.1 (Autobahn runs with ``failByDrop=False``),
waits for the client's close frame in reply, and then closes TCP.  The
helpers here play the client's part of that handshake.
"""

from twisted.internet.defer import inlineCallbacks
from twisted.internet.error import ConnectionDone
from twisted.trial.unittest import FailTest, TestCase

from tests.support import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONTINUATION,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    RSV1,
    RSV2,
    RSV3,
    build_frame,
    close_payload,
    connect_plain_clients,
    connect_raw_websocket,
    start_server,
    wait_for,
)

# Status codes (RFC 6455 section 7.4.1).
NORMAL = 1000
PROTOCOL_ERROR = 1002
INVALID_PAYLOAD = 1007
MESSAGE_TOO_BIG = 1009

#: Seconds within which the server must close TCP once a close handshake is
#: complete: well under its 5 s close-handshake timeout, so that a server
#: that merely timed out does not pass.
PROMPTLY = 3.0


def text(data: bytes, fin: bool = True, **kwargs) -> bytes:
    """A masked text frame."""
    return build_frame(OP_TEXT, data, fin=fin, **kwargs)


def continuation(data: bytes, fin: bool = True, **kwargs) -> bytes:
    """A masked continuation frame."""
    return build_frame(OP_CONTINUATION, data, fin=fin, **kwargs)


class ConformanceTestCase(TestCase):
    """
    A server, a bystander that has heard its own arrival, and helpers to
    bring in an offender and to check that it alone was closed.
    """

    server_args: tuple = ()

    @inlineCallbacks
    def setUp(self):
        self.service, self.port = yield start_server(self, self.server_args)
        ((self.bystander, _),) = yield connect_plain_clients(self, self.port, 1)

    @inlineCallbacks
    def offender(self):
        """
        Connect a raw client and read the announcement of its arrival, on
        its side and the bystander's.

        :return: a Deferred firing with ``(client, its id)``.
        """
        client = yield connect_raw_websocket(self, self.port)
        frame = yield self.next_frame(client)
        self.assertEqual(frame.opcode, OP_TEXT)
        announcement = frame.payload.decode("utf-8")
        self.assertRegex(announcement, r"^\S+ connected$")
        self.assertEqual((yield self.bystander.next_text()), announcement)
        return client, announcement.split()[0]

    @inlineCallbacks
    def next_frame(self, client):
        """
        The next frame from the server, checked to be one a server may send:
        unmasked (section 5.1), no reserved bits (5.2), a defined opcode.
        """
        frame = yield client.next()
        self.assertFalse(frame.masked, "server frames must not be masked: {!r}".format(frame))
        self.assertEqual(frame.rsv, 0, "no extension was negotiated: {!r}".format(frame))
        self.assertIn(
            frame.opcode, (OP_CONTINUATION, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG)
        )
        if frame.opcode & 0x8:
            self.assertTrue(frame.fin, "control frames must not be fragmented")
            self.assertLessEqual(len(frame.payload), 125)
        return frame

    @inlineCallbacks
    def assert_closed_with(self, client, offender_id, code):
        """
        The server fails ``client``'s connection with ``code``: its close
        frame says so, the client answers it, TCP is closed promptly, and
        the bystander hears only the departure and can carry on.
        """
        try:
            frame = yield self.next_frame(client)
        except FailTest:
            if client.reason is None:
                raise
            self.fail(
                "expected a close frame with code {}; the server closed TCP"
                " without one ({})".format(code, client.reason.getErrorMessage())
            )
        self.assertEqual(
            (frame.opcode, frame.close_code),
            (OP_CLOSE, code),
            "expected a close frame with code {}, got {!r}".format(code, frame),
        )
        frame.close_reason.decode("utf-8")  # a close reason must be UTF-8 (5.5.1)
        client.send(build_frame(OP_CLOSE, close_payload(code)))
        yield self.tcp_closed(client)
        self.assertIs(client.inbox.items[-1], frame, "frames after the close frame")
        yield self.assert_bystander_unaffected(offender_id)

    def tcp_closed(self, client):
        """
        Wait for the server to close TCP, within :data:`PROMPTLY` seconds.

        :return: a Deferred firing with how the connection ended (a Failure
            wrapping ``ConnectionDone`` for a clean close).
        """
        d = wait_for(
            lambda: client.reason is not None,
            timeout=PROMPTLY,
            what="the server to close the TCP connection",
        )
        # A Failure cannot be a Deferred's result, so hand back a 1-tuple.
        return d.addCallback(lambda _: (client.reason,))

    @inlineCallbacks
    def assert_bystander_unaffected(self, offender_id):
        """
        The bystander's next message is the offender's departure (so nothing
        the offender sent was broadcast), and it can still chat.
        """
        self.assertEqual(
            (yield self.bystander.next_text()), "{} disconnected".format(offender_id)
        )
        self.bystander.send_text("still here")
        self.assertEqual((yield self.bystander.next_text()), "still here")

    @inlineCallbacks
    def assert_each_closed_with(self, frames, code):
        """
        A fresh offender for each of ``frames`` (bytes, sent after a valid
        message that everybody receives) is closed with ``code``.
        """
        for data in frames:
            client, client_id = yield self.offender()
            client.send(text(b"before"))
            self.assertEqual((yield self.bystander.next_text()), "before")
            self.assertEqual((yield self.next_frame(client)).payload, b"before")
            client.send(data)
            yield self.assert_closed_with(client, client_id, code)


class InvalidUTF8Tests(ConformanceTestCase):
    """Text messages must be UTF-8 (RFC 6455 section 8.1); failing that, 1007."""

    @inlineCallbacks
    def test_invalid_utf8_in_a_text_frame_closes_1007(self):
        """Each kind of invalid UTF-8 in a text frame closes its sender with 1007."""
        yield self.assert_each_closed_with(
            [
                text(b"bad \xc3\x28"),  # a lead byte without its continuation
                text(b"bad \xff"),  # a byte UTF-8 never uses
                text(b"bad \xc0\xaf"),  # an overlong encoding of '/'
                text(b"bad \xed\xa0\x80"),  # a UTF-16 surrogate
                text(b"bad \xf4\x90\x80\x80"),  # above U+10FFFF
            ],
            INVALID_PAYLOAD,
        )

    @inlineCallbacks
    def test_invalid_utf8_split_across_fragments_closes_1007(self):
        """A sequence begun in one fragment and broken in the next closes with 1007."""
        yield self.assert_each_closed_with(
            [text(b"euro \xe2\x82", fin=False) + continuation(b"\x28 rest")], INVALID_PAYLOAD
        )

    @inlineCallbacks
    def test_invalid_utf8_fails_before_the_message_ends(self):
        """Invalid UTF-8 in a first fragment fails the connection without waiting
        for the rest of the message."""
        yield self.assert_each_closed_with([text(b"bad \xff", fin=False)], INVALID_PAYLOAD)

    @inlineCallbacks
    def test_message_ending_inside_a_character_closes_1007(self):
        """A text message whose last fragment stops mid-character closes with 1007."""
        yield self.assert_each_closed_with(
            [text(b"cut \xe2", fin=False) + continuation(b"\x82")], INVALID_PAYLOAD
        )

    @inlineCallbacks
    def test_character_split_across_fragments_is_accepted(self):
        """A valid character split between two fragments is reassembled and broadcast."""
        client, _ = yield self.offender()
        client.send(text(b"euro \xe2\x82", fin=False) + continuation(b"\xac!"))
        self.assertEqual((yield self.bystander.next_text()), "euro \u20ac!")


class ReservedBitsAndOpcodesTests(ConformanceTestCase):
    """Reserved bits and opcodes mean nothing without an extension (section 5.2): 1002."""

    @inlineCallbacks
    def test_reserved_bits_close_1002(self):
        """A frame with RSV1, RSV2 or RSV3 set, no extension negotiated, closes with 1002."""
        yield self.assert_each_closed_with(
            [text(b"hi", rsv=rsv) for rsv in (RSV1, RSV2, RSV3)], PROTOCOL_ERROR
        )

    @inlineCallbacks
    def test_reserved_bits_on_a_control_frame_close_1002(self):
        """A ping with RSV1 set closes with 1002 rather than being answered."""
        yield self.assert_each_closed_with([build_frame(OP_PING, b"hi", rsv=RSV1)], PROTOCOL_ERROR)

    @inlineCallbacks
    def test_reserved_opcodes_close_1002(self):
        """The reserved data opcodes 0x3-0x7 and control opcodes 0xB-0xF close with 1002."""
        yield self.assert_each_closed_with(
            [build_frame(opcode, b"hi") for opcode in (0x3, 0xB)], PROTOCOL_ERROR
        )
        yield self.assert_each_closed_with(
            [build_frame(opcode, b"") for opcode in (0x4, 0x5, 0x6, 0x7, 0xC, 0xD, 0xE, 0xF)],
            PROTOCOL_ERROR,
        )


class MaskingTests(ConformanceTestCase):
    """Clients must mask every frame (section 5.1)."""

    @inlineCallbacks
    def test_unmasked_client_frame_closes_1002(self):
        """An unmasked text frame is refused with 1002 and not broadcast."""
        yield self.assert_each_closed_with([text(b"naked", mask=None)], PROTOCOL_ERROR)

    @inlineCallbacks
    def test_all_zero_mask_is_still_a_mask(self):
        """A masked frame whose key happens to be zero is accepted."""
        client, _ = yield self.offender()
        client.send(text(b"zero key", mask=b"\x00\x00\x00\x00"))
        self.assertEqual((yield self.bystander.next_text()), "zero key")


class FragmentationTests(ConformanceTestCase):
    """Fragmented messages (section 5.4)."""

    @inlineCallbacks
    def test_three_fragments_are_broadcast_as_one_message(self):
        """A text message in three fragments reaches the others whole, as one message."""
        client, _ = yield self.offender()
        client.send(text(b"one ", fin=False))
        client.send(continuation(b"two ", fin=False))
        client.send(continuation(b"three"))
        self.assertEqual((yield self.bystander.next_text()), "one two three")
        echo = yield self.next_frame(client)
        self.assertEqual((echo.fin, echo.opcode, echo.payload), (True, OP_TEXT, b"one two three"))

    @inlineCallbacks
    def test_ping_between_fragments_is_answered_and_reassembly_goes_on(self):
        """A ping between fragments gets its pong at once, with the same
        payload, and the message is still reassembled whole."""
        client, _ = yield self.offender()
        client.send(text(b"one ", fin=False) + build_frame(OP_PING, b"mid-message"))
        pong = yield self.next_frame(client)
        self.assertEqual((pong.opcode, pong.payload), (OP_PONG, b"mid-message"))
        client.send(continuation(b"two ", fin=False))
        client.send(build_frame(OP_PING, b"again") + continuation(b"three"))
        pong = yield self.next_frame(client)
        self.assertEqual((pong.opcode, pong.payload), (OP_PONG, b"again"))
        self.assertEqual((yield self.bystander.next_text()), "one two three")
        self.assertEqual((yield self.next_frame(client)).payload, b"one two three")

    @inlineCallbacks
    def test_fragmented_binary_is_broadcast_whole(self):
        """A binary message in fragments reaches the others whole and binary."""
        client, _ = yield self.offender()
        client.send(build_frame(OP_BINARY, b"\x00\x01", fin=False) + continuation(b"\xff"))
        self.assertEqual((yield self.bystander.next()), (b"\x00\x01\xff", True))

    @inlineCallbacks
    def test_continuation_without_a_start_closes_1002(self):
        """A continuation frame with no message in progress closes with 1002."""
        yield self.assert_each_closed_with(
            [continuation(b"orphan"), continuation(b"orphan", fin=False)], PROTOCOL_ERROR
        )

    @inlineCallbacks
    def test_new_message_inside_a_fragmented_one_closes_1002(self):
        """A text or binary frame while a fragmented message is in progress closes with 1002."""
        yield self.assert_each_closed_with(
            [
                text(b"start ", fin=False) + text(b"interloper"),
                text(b"start ", fin=False) + build_frame(OP_BINARY, b"interloper"),
            ],
            PROTOCOL_ERROR,
        )


class ControlFrameTests(ConformanceTestCase):
    """Pings, pongs and the limits on control frames (section 5.5)."""

    @inlineCallbacks
    def test_ping_gets_a_pong_with_the_same_payload(self):
        """Pings with empty, short and 125-byte payloads get pongs echoing them."""
        client, _ = yield self.offender()
        for payload in (b"", b"are you there?", bytes(range(125))):
            client.send(build_frame(OP_PING, payload))
            pong = yield self.next_frame(client)
            self.assertEqual((pong.opcode, pong.payload), (OP_PONG, payload))

    @inlineCallbacks
    def test_unsolicited_pong_is_ignored(self):
        """A pong nobody asked for is ignored (section 5.5.3) and the
        connection carries on."""
        client, _ = yield self.offender()
        client.send(build_frame(OP_PONG, b"heartbeat") + text(b"after the pong"))
        self.assertEqual((yield self.bystander.next_text()), "after the pong")

    @inlineCallbacks
    def test_control_frame_over_125_bytes_closes_1002(self):
        """A ping or pong with a 126-byte payload closes with 1002."""
        yield self.assert_each_closed_with(
            [build_frame(OP_PING, b"p" * 126), build_frame(OP_PONG, b"p" * 126)],
            PROTOCOL_ERROR,
        )

    @inlineCallbacks
    def test_fragmented_control_frame_closes_1002(self):
        """A ping without FIN closes with 1002."""
        yield self.assert_each_closed_with(
            [build_frame(OP_PING, b"half", fin=False) + continuation(b"rest")], PROTOCOL_ERROR
        )


class CloseHandshakeTests(ConformanceTestCase):
    """The closing handshake and its status codes (sections 5.5.1, 7)."""

    @inlineCallbacks
    def test_valid_close_codes_are_answered_and_tcp_closed(self):
        """A close with 1000, 3000 or 4999 gets a close frame back, then TCP is closed
        cleanly by the server."""
        for code in (NORMAL, 3000, 4999):
            client, client_id = yield self.offender()
            client.send(build_frame(OP_CLOSE, close_payload(code, b"bye")))
            reply = yield self.next_frame(client)
            self.assertEqual(reply.opcode, OP_CLOSE)
            # Section 5.5.1: the reply "typically echos the status code it
            # received"; NORMAL is as good an answer.
            self.assertIn(reply.close_code, (code, NORMAL), reply)
            (reason,) = yield self.tcp_closed(client)
            self.assertIsInstance(reason.value, ConnectionDone)
            self.assertIs(client.inbox.items[-1], reply, "frames after the close frame")
            yield self.assert_bystander_unaffected(client_id)

    @inlineCallbacks
    def test_close_without_a_code_is_answered(self):
        """An empty close frame (no code at all) is answered with a close and TCP is closed."""
        client, client_id = yield self.offender()
        client.send(build_frame(OP_CLOSE))
        reply = yield self.next_frame(client)
        self.assertEqual(reply.opcode, OP_CLOSE)
        self.assertNotEqual(reply.close_code, PROTOCOL_ERROR, reply)
        (reason,) = yield self.tcp_closed(client)
        self.assertIsInstance(reason.value, ConnectionDone)
        yield self.assert_bystander_unaffected(client_id)

    @inlineCallbacks
    def test_invalid_close_codes_are_answered_with_1002(self):
        """Close codes that are reserved, unassigned or out of range are answered with 1002."""
        yield self.assert_each_closed_with(
            [
                build_frame(OP_CLOSE, close_payload(code))
                for code in (0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000)
            ],
            PROTOCOL_ERROR,
        )

    @inlineCallbacks
    def test_one_byte_close_payload_is_answered_with_1002(self):
        """A close frame whose body is one byte (half a status code) is answered with 1002."""
        yield self.assert_each_closed_with([build_frame(OP_CLOSE, b"\x03")], PROTOCOL_ERROR)

    @inlineCallbacks
    def test_close_frame_over_125_bytes_is_answered_with_1002(self):
        """A close frame with a 126-byte body (code and reason) is answered with 1002."""
        yield self.assert_each_closed_with(
            [build_frame(OP_CLOSE, close_payload(NORMAL, b"r" * 124))], PROTOCOL_ERROR
        )

    @inlineCallbacks
    def test_close_reason_not_utf8_is_answered_with_1007(self):
        """A close frame whose reason is not UTF-8 is answered with 1007."""
        yield self.assert_each_closed_with(
            [build_frame(OP_CLOSE, close_payload(NORMAL, b"bye \xff"))], INVALID_PAYLOAD
        )

    @inlineCallbacks
    def test_server_closes_tcp_cleanly_after_its_own_close_handshake(self):
        """When the server started the closing handshake (a protocol error)
        and the client answers it, the server closes TCP cleanly (FIN, not
        RST), as section 7.1.1 asks."""
        client, client_id = yield self.offender()
        client.send(text(b"naked", mask=None))
        frame = yield self.next_frame(client)
        self.assertEqual((frame.opcode, frame.close_code), (OP_CLOSE, PROTOCOL_ERROR))
        client.send(build_frame(OP_CLOSE, close_payload(PROTOCOL_ERROR)))
        (reason,) = yield self.tcp_closed(client)
        self.assertIsInstance(
            reason.value,
            ConnectionDone,
            "the server reset the connection instead of closing it: {}".format(
                reason.getErrorMessage()
            ),
        )
        yield self.assert_bystander_unaffected(client_id)

    @inlineCallbacks
    def test_data_after_close_is_ignored(self):
        """Data frames a client sends after its close frame are not broadcast."""
        client, client_id = yield self.offender()
        client.send(build_frame(OP_CLOSE, close_payload(NORMAL)) + text(b"too late"))
        reply = yield self.next_frame(client)
        self.assertEqual(reply.opcode, OP_CLOSE)
        yield self.tcp_closed(client)
        yield self.assert_bystander_unaffected(client_id)


class MessageSizeTests(ConformanceTestCase):
    """--max-message-size caps frames and reassembled messages: 1009 (section 7.4.1)."""

    server_args = ("--max-message-size", "1000")

    @inlineCallbacks
    def test_fragments_adding_up_to_more_than_the_limit_close_1009(self):
        """Three 400-byte fragments (1200 bytes in all) close their sender with 1009."""
        yield self.assert_each_closed_with(
            [
                text(b"a" * 400, fin=False)
                + continuation(b"b" * 400, fin=False)
                + continuation(b"c" * 400)
            ],
            MESSAGE_TOO_BIG,
        )

    @inlineCallbacks
    def test_a_frame_one_byte_over_the_limit_closes_1009(self):
        """A single 1001-byte frame closes its sender with 1009."""
        yield self.assert_each_closed_with([text(b"x" * 1001)], MESSAGE_TOO_BIG)

    @inlineCallbacks
    def test_huge_declared_length_closes_1009_before_the_body(self):
        """A header declaring 2**40 bytes (64-bit length) is refused at once,
        without the server waiting for the body."""
        yield self.assert_each_closed_with([text(b"", length=2**40)], MESSAGE_TOO_BIG)

    @inlineCallbacks
    def test_a_frame_of_exactly_the_limit_is_accepted(self):
        """A 1000-byte frame (16-bit length) is broadcast whole."""
        client, _ = yield self.offender()
        client.send(text(b"x" * 1000))
        self.assertEqual((yield self.bystander.next_text()), "x" * 1000)
        self.assertEqual((yield self.next_frame(client)).payload, b"x" * 1000)

    @inlineCallbacks
    def test_fragments_adding_up_to_exactly_the_limit_are_accepted(self):
        """Fragments of 400, 400 and 200 bytes make a 1000-byte message that is broadcast."""
        client, _ = yield self.offender()
        client.send(
            text(b"a" * 400, fin=False)
            + continuation(b"b" * 400, fin=False)
            + continuation(b"c" * 200)
        )
        expected = "a" * 400 + "b" * 400 + "c" * 200
        self.assertEqual((yield self.bystander.next_text()), expected)


class LengthEncodingTests(ConformanceTestCase):
    """Payload lengths in 7, 16 and 64 bits (section 5.2)."""

    @inlineCallbacks
    def test_each_length_encoding_is_read(self):
        """Messages of 125 (7-bit), 126 and 65535 (16-bit) and 65536 bytes
        (64-bit, exactly the default limit) are all broadcast."""
        client, _ = yield self.offender()
        for size in (125, 126, 65535, 65536):
            client.send(text(b"L" * size))
            self.assertEqual(len((yield self.bystander.next_text())), size)

    @inlineCallbacks
    def test_non_minimal_length_encoding_closes_1002(self):
        """A length that fits in 7 bits but is sent in 16 or 64 closes with 1002."""
        yield self.assert_each_closed_with(
            [text(b"short", length_bits=16), text(b"short", length_bits=64)], PROTOCOL_ERROR
        )

    @inlineCallbacks
    def test_length_with_the_top_bit_set_closes(self):
        """A 64-bit length with its most significant bit set closes with 1002
        (or 1009: it is also far above the limit)."""
        client, client_id = yield self.offender()
        client.send(text(b"", length=2**63))
        frame = yield self.next_frame(client)
        self.assertEqual(frame.opcode, OP_CLOSE)
        self.assertIn(frame.close_code, (PROTOCOL_ERROR, MESSAGE_TOO_BIG))
        client.send(build_frame(OP_CLOSE, close_payload(frame.close_code)))
        yield self.tcp_closed(client)
        yield self.assert_bystander_unaffected(client_id)
