"""
Tests for :mod:`broadcaster.protocols.internals`: the Twisted and Autobahn
internals the fast path relies on are there on the installed versions,
their absence fails loudly, setup.cfg pins the versions they were tested
with, and a real TCP transport behaves as the direct path assumes.
"""

from __future__ import annotations

import configparser
import os
import re

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.tcp import Server
from twisted.trial.unittest import SynchronousTestCase, TestCase

import autobahn
import twisted
from broadcaster.protocols import internals
from tests.support import REPO_ROOT, wait_for


class CheckTests(SynchronousTestCase):
    def test_the_installed_versions_have_every_internal(self):
        """check() finds every internal on the Twisted and Autobahn installed here."""
        internals.check()

    def test_a_missing_transport_internal_fails_loudly(self):
        """A Twisted whose tcp.Server lacks a field the direct path reads
        stops the server with a message naming it."""
        self.patch(internals, "_TCPServer", type("Server", (), {"connected": 0}))
        error = self.assertRaises(internals.InternalsChanged, internals.check)
        self.assertIn("tcp.Server has no class attribute dataBuffer", str(error))

    def test_a_missing_autobahn_internal_fails_loudly(self):
        """An Autobahn without sendCloseFrame stops the server with a message naming it."""
        stripped = type("WebSocketServerProtocol", (), {"sendFrame": lambda self, opcode, payload, rsv: None})
        self.patch(internals, "WebSocketServerProtocol", stripped)
        error = self.assertRaises(internals.InternalsChanged, internals.check)
        self.assertIn("WebSocketServerProtocol has no sendCloseFrame", str(error))

    def test_autobahn_without_pformat_fails_loudly(self):
        import autobahn.websocket.protocol as autobahn_protocol

        self.patch(autobahn_protocol, "pformat", lambda value: repr(value))
        error = self.assertRaises(internals.InternalsChanged, internals.check)
        self.assertIn("no longer uses pprint's pformat", str(error))

    def test_autobahn_setting_up_connections_otherwise_fails_loudly(self):
        """An Autobahn whose connection set-up changed (here: no longer
        making a UTF-8 validator) stops the server: the lean protocol's
        set-up stands in for it and would no longer match."""
        from autobahn.websocket.protocol import WebSocketProtocol

        changed = dict(internals._AUTOBAHN_OPENING)
        changed[WebSocketProtocol._connectionMade] = changed[WebSocketProtocol._connectionMade] - {
            "Utf8Validator"
        }
        self.patch(internals, "_AUTOBAHN_OPENING", changed)
        error = self.assertRaises(internals.InternalsChanged, internals.check)
        self.assertIn("WebSocketProtocol._connectionMade now uses", str(error))

    def test_the_lean_set_up_is_autobahn_s(self):
        """
        A lean connection, once made, has every attribute Autobahn's own
        set-up gives one, with the same value, but what it leaves unmade
        on purpose (made when first needed, or shared).
        """
        from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
        from twisted.internet.testing import StringTransport

        class Lean(internals.LeanWebSocketServerProtocol):
            pass

        class LeanFactory(internals.LeanWebSocketServerFactory):
            protocol = Lean

        lean_factory = LeanFactory()
        lean_factory.setProtocolOptions(openHandshakeTimeout=0)
        plain_factory = WebSocketServerFactory()
        plain_factory.protocol = WebSocketServerProtocol
        plain_factory.setProtocolOptions(openHandshakeTimeout=0)
        lean = lean_factory.buildProtocol(None)
        plain = plain_factory.buildProtocol(None)
        lean.makeConnection(StringTransport())
        plain.makeConnection(StringTransport())
        self.assertEqual(lean.peer, plain.peer)
        self.assertEqual(lean_factory.countConnections, 1)
        on_purpose = {"utf8validator", "trafficStats", "send_queue", "log", "factory", "transport"}
        names = set()
        for method in internals._AUTOBAHN_OPENING:
            code = method.__code__
            names.update(n for n in code.co_names if n[0].islower() and hasattr(plain, n))
        names = {n for n in names if not callable(getattr(plain, n)) or n == "state"}
        self.assertIn("wasClean", names)
        for name in sorted(names - on_purpose):
            self.assertEqual(getattr(lean, name), getattr(plain, name), name)
        self.assertIsNotNone(lean.utf8validator)

    def test_options_are_pretty_printed_only_if_shown(self):
        """Autobahn's per-connection debug line costs nothing unless shown."""
        calls = []
        self.patch(internals, "pformat", lambda value: calls.append(value) or "shown")
        lazy = internals.LazyFormat([("maxFramePayloadSize", 65536)])
        self.assertEqual(calls, [])
        self.assertEqual("{}".format(lazy), "shown")
        self.assertEqual(len(calls), 1)

    def test_an_untested_major_version_fails_loudly(self):
        """A Twisted major version outside the tested range is refused by name."""
        self.patch(internals, "TESTED", dict(internals.TESTED, twisted=(1, 2)))
        error = self.assertRaises(internals.InternalsChanged, internals.check)
        self.assertIn("twisted {} is outside the tested majors 1-2".format(twisted.__version__), str(error))

    def test_setup_cfg_pins_the_tested_majors(self):
        """setup.cfg allows exactly the major versions the internals were tested with."""
        config = configparser.ConfigParser()
        config.read(os.path.join(REPO_ROOT, "setup.cfg"))
        requires = config["options"]["install_requires"]
        for name, distribution in (("twisted", r"Twisted\[tls\]"), ("autobahn", "autobahn")):
            match = re.search(distribution + r"\s*>=\s*(\d+)[.\d]*\s*,\s*<\s*(\d+)\b", requires)
            self.assertIsNotNone(match, "no upper bound for {} in setup.cfg".format(name))
            first, last = internals.TESTED[name]
            self.assertEqual((int(match.group(1)), int(match.group(2)) - 1), (first, last), name)
        for module in (twisted, autobahn):
            first, last = internals.TESTED[module.__name__]
            self.assertTrue(first <= int(module.__version__.split(".")[0]) <= last)


class Sink(Protocol):
    """The server side of a connection, for its transport."""

    def connectionMade(self):
        self.factory.connected.callback(self)


class Collector(Protocol):
    """A client that reads everything."""

    def __init__(self):
        self.received = bytearray()

    def dataReceived(self, data):
        self.received += data


class Stalled(Protocol):
    """A client that reads nothing."""

    def connectionMade(self):
        self.transport.pauseProducing()


class TransportTests(TestCase):
    @inlineCallbacks
    def test_lean_writes_arrive_whole_and_in_order(self):
        """
        Writes sent at once and writes queued behind a socket that took
        only part of one interleave as the reader's pace allows, and the
        reader gets every byte, in order, once.
        """
        factory = Factory.forProtocol(Sink)
        factory.connected = Deferred()
        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
        self.addCleanup(port.stopListening)
        internals.use_lean_transports(port)
        reader = Collector()
        yield TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port).connect(
            Factory.forProtocol(lambda: reader)
        )
        self.addCleanup(reader.transport.abortConnection)
        server = yield factory.connected
        self.addCleanup(server.transport.abortConnection)
        chunks = [bytes([n % 251]) * (1 + (n * 7919) % 300000) for n in range(60)]
        for n, chunk in enumerate(chunks):
            server.transport.write(chunk)
            if n % 10 == 9:
                # Let the reader take some, so that later writes find the
                # queue empty again.
                yield wait_for(
                    lambda: not server.transport._tempDataLen and not server.transport.dataBuffer,
                    what="the queue to drain",
                )
        expected = b"".join(chunks)
        yield wait_for(lambda: len(reader.received) >= len(expected), what="every byte")
        self.assertEqual(bytes(reader.received), expected)

    def test_queued_bytes_are_where_the_direct_path_looks(self):
        """
        On a real tcp.Server, nothing is queued until the socket stops taking
        bytes; then what waits is in ``_tempDataLen`` or ``dataBuffer``,
        exactly the fields the direct path checks before a send().
        """
        return self.check_transport(lean=False)

    def test_lean_transports_queue_where_the_direct_path_looks(self):
        """
        A LeanTCPServer (what broadcaster's listeners build) keeps its
        state in slots, no instance dict, and queues as tcp.Server does.
        """
        return self.check_transport(lean=True)

    @inlineCallbacks
    def check_transport(self, lean):
        factory = Factory.forProtocol(Sink)
        factory.connected = Deferred()
        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
        self.addCleanup(port.stopListening)
        if lean:
            internals.use_lean_transports(port)
        client = yield TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port).connect(
            Factory.forProtocol(Stalled)
        )
        self.addCleanup(client.transport.abortConnection)
        server = yield factory.connected
        self.addCleanup(server.transport.abortConnection)
        transport = server.transport
        self.assertIs(type(transport), internals.LeanTCPServer if lean else Server)
        if lean:
            self.assertFalse(hasattr(transport, "__dict__") and vars(transport))
            self.assertEqual(repr(transport), "<Sink #{} on {}>".format(
                transport.sessionno, port.getHost().port))
        self.assertFalse(transport._tempDataLen or transport.dataBuffer)
        self.assertFalse(transport.TLS or transport._writeDisconnected)
        # A lean port's connections have TCP_NODELAY from the listening
        # socket, before anything asks for it; it can still be turned off.
        self.assertEqual(bool(transport.getTcpNoDelay()), lean)
        transport.setTcpNoDelay(True)
        self.assertTrue(transport.getTcpNoDelay())
        transport.setTcpNoDelay(False)
        self.assertFalse(transport.getTcpNoDelay())
        transport.setTcpNoDelay(True)
        self.assertTrue(transport.getTcpNoDelay())
        transport.write(b"x" * 100)
        if lean:
            # Sent at once: nothing queued, and the reactor not asked to
            # watch the socket for writability.
            self.assertFalse(transport._tempDataLen or transport.dataBuffer)
            self.assertNotIn(transport, reactor.getWriters())
        else:
            self.assertEqual(transport._tempDataLen, 100)
        # The socket takes what it can; a client that reads nothing leaves
        # the rest with the transport.
        transport.write(b"y" * (32 * 1024 * 1024))
        if lean:
            # What the socket did not take at once is queued.
            self.assertTrue(transport._tempDataLen or transport.dataBuffer)
        else:
            yield wait_for(lambda: not transport._tempDataLen, what="a write turn")
            self.assertTrue(transport.dataBuffer)
        if lean:
            self.assertFalse(hasattr(transport, "__dict__") and vars(transport))
