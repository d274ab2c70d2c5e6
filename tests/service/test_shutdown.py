"""
SIGTERM on a real ``twistd broadcaster`` process with clients connected: the
clients are told the server is going away (1001) and the process exits 0
within the drain timeout, even when a client never answers.
"""

import signal

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory
from twisted.trial.unittest import TestCase

from tests.support import connect_plain_clients, start_twistd, wait_for
from tests.test_limits import StalledReader


class SIGTERMTests(TestCase):
    def start_twistd(self, *args):
        return start_twistd(self, args)

    @inlineCallbacks
    def test_clients_get_1001_and_the_process_exits_0(self):
        """SIGTERM: every client gets close 1001 and twistd exits with status 0."""
        process, port = yield self.start_twistd("--drain-timeout", "10")
        clients = yield connect_plain_clients(self, port, 2)
        started = reactor.seconds()
        process.transport.signalProcess(signal.SIGTERM)
        for client, _ in clients:
            clean, code, _ = yield client.closed
            self.assertEqual((clean, code), (True, 1001))
        out, err, status = yield process.ended()
        self.assertEqual(status, 0, out + err)
        self.assertLess(reactor.seconds() - started, 10)
        self.assertIn("closing 2 connections", out)
        self.assertIn("Server Shut Down", out)

    @inlineCallbacks
    def test_a_client_that_never_answers_delays_exit_only_to_the_drain_timeout(self):
        """A frozen client is dropped after --drain-timeout and twistd still exits 0."""
        process, port = yield self.start_twistd("--drain-timeout", "1")
        frozen = yield TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(
            Factory.forProtocol(StalledReader)
        )
        self.addCleanup(frozen.transport.abortConnection)
        yield wait_for(lambda: "[CONNECT]" in "".join(p.decode() for p in process._out), what="connect")
        started = reactor.seconds()
        process.transport.signalProcess(signal.SIGTERM)
        out, err, status = yield process.ended()
        self.assertEqual(status, 0, out + err)
        self.assertLess(reactor.seconds() - started, 8)
        self.assertIn("did not close within 1 s; dropping them", out)
