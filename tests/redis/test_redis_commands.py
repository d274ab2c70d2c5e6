"""
Tests for :mod:`broadcaster.redis.commands`: the command encoding checked
by hiredis's parser, the protocol over a fake transport (which script form
is sent, replies in order, a forgotten script, a hung Redis), and scripts
run on a real ``redis-server``.
"""

import hiredis
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver, StringTransport
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

import txredisapi
from broadcaster.redis.commands import CommandProtocol, Script, encode_command
from tests.redis.test_redis import PASSWORD, RedisTestCase

ECHO = Script("return {KEYS[1], ARGV[1]}")


def parsed(command: bytes):
    """What Redis reads: hiredis parses a command like any RESP array."""
    reader = hiredis.Reader()
    reader.feed(command)
    result = reader.gets()
    assert reader.gets() is False, "more than one command"
    return result


class EncodingTests(SynchronousTestCase):
    def test_arguments_arrive_as_redis_reads_them(self):
        """Bytes as they are, text as UTF-8, integers and floats in decimal."""
        command = encode_command((b"EVALSHA", "h\u00e9llo \U0001f600", 3, -7, 2.5, b"a\r\nb", b""))
        self.assertEqual(
            parsed(command),
            [b"EVALSHA", "h\u00e9llo \U0001f600".encode("utf-8"), b"3", b"-7", b"2.500000", b"a\r\nb", b""],
        )


class _Factory:
    def __init__(self, clock) -> None:
        self.clock = clock


def connected_protocol(clock, reply_timeout=5.0):
    protocol = CommandProtocol(charset=None, replyTimeout=reply_timeout, convertNumbers=False)
    protocol.factory = _Factory(clock)
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport


class ProtocolTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.protocol, self.transport = connected_protocol(self.clock)
        self.addCleanup(self.protocol.connectionLost, None)

    def sent(self):
        data = self.transport.value()
        self.transport.clear()
        reader = hiredis.Reader()
        reader.feed(data)
        commands = []
        while (command := reader.gets()) is not False:
            commands.append(command)
        return commands

    def test_a_script_is_sent_whole_once_then_by_its_sha(self):
        """EVAL the first time on a connection; EVALSHA after, since Redis
        runs the commands in the order they came."""
        first = self.protocol.run_script(ECHO, ["k"], ["v1"])
        second = self.protocol.run_script(ECHO, ["k"], ["v2"])
        self.assertEqual(
            self.sent(),
            [[b"EVAL", ECHO.source, b"1", b"k", b"v1"], [b"EVALSHA", ECHO.sha, b"1", b"k", b"v2"]],
        )
        self.protocol.dataReceived(b"*2\r\n$1\r\nk\r\n$2\r\nv1\r\n*2\r\n$1\r\nk\r\n$2\r\nv2\r\n")
        self.assertEqual(self.successResultOf(first), [b"k", b"v1"])
        self.assertEqual(self.successResultOf(second), [b"k", b"v2"])

    def test_commands_are_answered_in_order(self):
        answers = [self.protocol.run("INCR", "n") for _ in range(3)]
        self.assertEqual(self.sent(), [[b"INCR", b"n"]] * 3)
        self.protocol.dataReceived(b":1\r\n:2\r\n-ERR nope\r\n")
        self.assertEqual([self.successResultOf(d) for d in answers[:2]], [1, 2])
        self.failureResultOf(answers[2], txredisapi.ResponseError)
        self.assertTrue(self.transport.connected)

    def test_a_forgotten_script_drops_the_connection(self):
        """After SCRIPT FLUSH a retry could overtake a later command: the
        connection is dropped instead, and a new one sends EVAL again."""
        self.protocol.run_script(ECHO, ["k"], ["v"])
        self.protocol.dataReceived(b"*2\r\n$1\r\nk\r\n$1\r\nv\r\n")
        self.sent()
        logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        in_flight = [self.protocol.run_script(ECHO, ["k"], [v]) for v in ("w", "x")]
        self.protocol.dataReceived(b"-NOSCRIPT No matching script.\r\n" * 2)
        for d in in_flight:
            self.failureResultOf(d, txredisapi.ResponseError)
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(
            len([e for e in logged if "SCRIPT FLUSH" in e.get("log_format", "")]), 1
        )

        again, transport = connected_protocol(self.clock)
        unanswered = again.run_script(ECHO, ["k"], ["x"])
        self.assertEqual(parsed(transport.value())[0], b"EVAL")
        again.connectionLost(None)
        self.failureResultOf(unanswered, txredisapi.ConnectionError)

    def test_no_reply_in_time_gives_the_connection_up(self):
        """Every command awaiting a reply fails with a timeout once Redis
        has said nothing for the reply timeout, and the connection is
        aborted so it can be re-established."""
        answered = self.protocol.run("PING")
        self.clock.advance(3)
        self.protocol.dataReceived(b"+PONG\r\n")
        self.assertEqual(self.successResultOf(answered), b"PONG")
        waiting = [self.protocol.run("PING"), self.protocol.run("PING")]
        self.clock.advance(4)
        self.assertNoResult(waiting[0])
        self.clock.advance(2)
        for d in waiting:
            self.failureResultOf(d, txredisapi.TimeoutError)
        self.assertTrue(self.transport.disconnecting or not self.transport.connected)

    def test_idle_is_not_hung(self):
        """Nothing awaited: no timeout, however long it stays quiet."""
        self.clock.advance(60)
        self.assertTrue(self.transport.connected)
        self.assertFalse(self.transport.disconnecting)

    def test_not_connected(self):
        self.protocol.connectionLost(None)
        self.assertRaises(txredisapi.ConnectionError, self.protocol.run, "PING")
        self.assertRaises(txredisapi.ConnectionError, self.protocol.run_script, ECHO, [], [])


class RealRedisTests(RedisTestCase):
    @inlineCallbacks
    def connect(self):
        factory = txredisapi.RedisFactory(
            None, 0, 1, isLazy=True, charset=None, password=PASSWORD, convertNumbers=False,
            replyTimeout=5,
        )
        factory.protocol = CommandProtocol
        factory.clock = reactor
        protocol = yield TCP4ClientEndpoint(reactor, "127.0.0.1", self.redis.port).connect(factory)
        self.addCleanup(protocol.transport.loseConnection)
        yield factory.deferred  # authenticated
        return protocol

    @inlineCallbacks
    def test_scripts_and_commands_on_redis(self):
        """A script runs by EVAL then EVALSHA, with text that is not ASCII,
        interleaved in order with plain commands."""
        protocol = yield self.connect()
        text = "\u00e9t\u00e9 \U0001f600"
        replies = yield protocol.run("DEL", "k").addCallback(
            lambda _: [
                protocol.run_script(ECHO, ["k"], [text]),
                protocol.run("RPUSH", "k", 1),
                protocol.run_script(ECHO, ["k"], [b"\x00\xff"]),
                protocol.run("LRANGE", "k", 0, -1),
            ]
        )
        results = []
        for d in replies:
            results.append((yield d))
        self.assertEqual(
            results,
            [[b"k", text.encode("utf-8")], 1, [b"k", b"\x00\xff"], [b"1"]],
        )

    @inlineCallbacks
    def test_the_sha_is_redis_s(self):
        protocol = yield self.connect()
        loaded = yield protocol.run("SCRIPT", "LOAD", ECHO.source)
        self.assertEqual(loaded, ECHO.sha)
