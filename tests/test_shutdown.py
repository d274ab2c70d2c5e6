"""
SIGTERM on a real ``twistd broadcaster`` process with clients connected: the
clients are told the server is going away (1001) and the process exits 0
within the drain timeout, even when a client never answers.
"""

import os
import signal
import socket
import sys

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory
from twisted.trial.unittest import TestCase

from tests.support import CollectingProcess, REPO_ROOT, connect_plain_clients, wait_for
from tests.test_limits import StalledReader


def free_port() -> int:
    """A loopback port nothing listens on now (bound to 0, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


class SIGTERMTests(TestCase):
    @inlineCallbacks
    def start_twistd(self, *args):
        port = free_port()
        path = [REPO_ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(path))
        argv = [
            sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
            "-n", "--pidfile=", "broadcaster",
            "--port", "tcp:{}:interface=127.0.0.1".format(port),
            "--image-port", "none", "--line-port", "none", *args,
        ]
        process = CollectingProcess()
        reactor.spawnProcess(process, sys.executable, argv, env=env)

        def reap():
            if process.result is None:
                process.transport.signalProcess("KILL")
            return process.ended()

        self.addCleanup(reap)
        yield wait_for(
            lambda: listening(port) or process.result is not None, timeout=30, what="twistd"
        )
        self.assertIsNone(process.result, process.result)
        return process, port

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
