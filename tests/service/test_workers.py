"""
Tests for :mod:`broadcaster.service.workers` (``--workers N``): the master with a fake
process spawner and a fake clock (restarts and their backoff, the SIGTERM
fan-out, the private Redis's command line), a worker adopting inherited
sockets (TCP and TLS), and a real ``twistd broadcaster --workers 2`` with its
private ``redis-server``, SIGKILLed workers and SIGTERM.

In CI (``CI`` set) a missing ``redis-server`` fails the end-to-end test;
elsewhere it is skipped with the reason.
"""

import itertools
import os
import re
import shutil
import signal
import socket
import sys

from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import inlineCallbacks
from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock
from twisted.internet.threads import deferToThread
from twisted.logger import LogLevel, eventAsJSON, globalLogPublisher
from twisted.python.failure import Failure
from twisted.python.usage import UsageError
from twisted.trial.unittest import FailTest, SkipTest, SynchronousTestCase, TestCase

from broadcaster.service import workers
from broadcaster.service.tap import Options, makeService
from broadcaster.service.workers import (
    NO_REDIS,
    REDIS_LAUNCHER,
    TWISTD,
    MasterService,
    MasterWatchService,
    parse_worker_fds,
    redis_server_argv,
    restart_delay,
)
from tests.support import (
    CollectingProcess,
    checkout_env,
    connect_client,
    free_port,
    listening,
    self_signed_certificate,
    wait_for,
)
from tests.redis.test_redis import require_redis_server


def parse(*args):
    options = Options()
    options.parseOptions(list(args))
    return options


# Fakes for the master


class FakeProcess:
    """The transport of a spawned process: records the signals it is sent."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.signals = []
        self.ended = False

    def signalProcess(self, name) -> None:
        if self.ended:
            raise ProcessExitedAlready()
        self.signals.append(name)


class Spawned:
    def __init__(self, protocol, executable, args, env, child_fds, process) -> None:
        self.protocol = protocol
        self.executable = executable
        self.args = list(args)
        self.env = env
        self.child_fds = child_fds
        self.process = process

    def option(self, name):
        """The value of the last ``name`` option on the command line."""
        values = [self.args[i + 1] for i, arg in enumerate(self.args) if arg == name]
        return values[-1] if values else None

    def end(self, exit_code=0, signal_number=None) -> None:
        """The process ends: with a status, or killed by a signal."""
        self.process.ended = True
        if signal_number is None and exit_code == 0:
            reason = ProcessDone(0)
        else:
            reason = ProcessTerminated(exit_code if signal_number is None else None, signal_number)
        self.protocol.processEnded(Failure(reason))


class FakeSpawner:
    """Stands in for ``reactor.spawnProcess``."""

    def __init__(self) -> None:
        self.spawned = []
        self._pids = itertools.count(1000)
        #: How many of the next spawns fail (as with EAGAIN or EMFILE).
        self.failures = 0

    def __call__(self, protocol, executable, args, env=None, childFDs=None):
        if self.failures:
            self.failures -= 1
            raise OSError(11, "Resource temporarily unavailable")
        process = FakeProcess(next(self._pids))
        protocol.makeConnection(process)
        self.spawned.append(Spawned(protocol, executable, args, env, childFDs, process))
        return process

    def workers(self):
        return [s for s in self.spawned if "broadcaster" in s.args]

    def redis(self):
        return [s for s in self.spawned if "broadcaster" not in s.args]


class FakePort:
    def __init__(self, fd: int, port: int) -> None:
        self.fd = fd
        self.port = port
        self.listening = True

    def fileno(self) -> int:
        return self.fd

    def getHost(self):
        return IPv4Address("TCP", "127.0.0.1", self.port)

    def stopListening(self):
        self.listening = False


class FakeBinder:
    def __init__(self) -> None:
        self.ports = {}
        self._fds = itertools.count(10)

    def __call__(self, reactor, description):
        port = self.ports[description] = FakePort(next(self._fds), 9000 + len(self.ports))
        return port


LISTENERS = [
    ("port", "tcp:9999", "WebSocket endpoint and chat page"),
    ("image", "tcp:9998", "Image protocol"),
]


class MasterTestCase(SynchronousTestCase):
    def master(
        self,
        count=2,
        redis_server=None,
        listeners=LISTENERS,
        stop_timeout=15.0,
        worker_args=("--port", "tcp:9999", "--rate", "5"),
    ):
        self.clock = MemoryReactorClock()
        self.spawner = FakeSpawner()
        self.binder = FakeBinder()
        self.log = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        master = MasterService(
            self.clock,
            count,
            listeners,
            worker_args,
            node_id="m",
            stop_timeout=stop_timeout,
            redis_server=redis_server,
            spawn=self.spawner,
            bind=self.binder,
            python="/usr/bin/python3",
        )
        self.addCleanup(self.stop, master)
        return master

    def stop(self, master):
        """Stop ``master`` if a test left it running, ending its children."""
        if not master.running:
            return
        d = master.stopService()
        for spawned in self.spawner.spawned:
            if not spawned.process.ended:
                spawned.end()
        self.successResultOf(d)

    def start(self, master):
        master.privilegedStartService()
        master.startService()

    def logged(self, fragment):
        return [e for e in self.log if fragment in (e.get("log_format") or "")]


class MasterTests(MasterTestCase):
    def test_workers_get_the_sockets_and_the_options(self):
        """Each worker runs twistd broadcaster with the user's options, its
        node id, JSON logs and the master's listening sockets from fd 3 on."""
        master = self.master()
        self.start(master)
        w0, w1 = self.spawner.workers()
        self.assertEqual(
            w0.args,
            [
                "/usr/bin/python3", "-c", TWISTD, "-n", "--pidfile=", "broadcaster",
                "--port", "tcp:9999", "--rate", "5",
                "--workers", "1", "--worker-fds", "port=3,image=4",
                "--node-id", "m-w0", "--log-format", "json",
            ],
        )
        self.assertEqual(w0.executable, "/usr/bin/python3")
        self.assertEqual(w1.option("--node-id"), "m-w1")
        self.assertEqual(w0.child_fds, {0: "w", 1: "r", 2: "r", 3: 10, 4: 11})
        self.assertEqual(w0.env, dict(os.environ))
        started = self.logged("worker {worker} started")
        self.assertEqual(
            [(e["worker"], e["pid"], e["node"]) for e in started],
            [("w0", w0.process.pid, "m-w0"), ("w1", w1.process.pid, "m-w1")],
        )
        self.assertEqual(self.spawner.redis(), [])

    def test_a_repeated_flag_reaches_every_worker(self):
        """Each --allow-host given reaches every worker, in order: a worker
        parsing its command line answers to the same names."""
        options = parse(
            "--workers", "2", "--redis", "redis://127.0.0.1:6379",
            "--allow-host", "chat.example", "--allow-host", "[::1]",
        )
        master = self.master(worker_args=options["worker-args"])
        self.start(master)
        for worker in self.spawner.workers():
            parsed = parse(*worker.args[worker.args.index("broadcaster") + 1:])
            self.assertEqual(parsed["allow-host"], ["chat.example", "[::1]"])
            self.assertEqual(parsed["worker-fds"], {"port": 3, "image": 4})

    def test_a_dead_worker_is_restarted_with_backoff(self):
        """A worker that dies is logged with its signal or status and
        restarted under a new node id, after 0.5 s doubling while it keeps
        dying within 10 s of its start, and back to 0.5 s once it lived."""
        master = self.master()
        self.start(master)
        w0 = self.spawner.workers()[0]
        w0.end(signal_number=signal.SIGKILL)
        (death,) = self.logged("restarting it in")
        self.assertEqual(
            (death["worker"], death["pid"], death["status"], death["delay"]),
            ("w0", w0.process.pid, "was killed by SIGKILL", 0.5),
        )
        self.assertEqual(death["log_level"], LogLevel.error)
        self.clock.advance(0.49)
        self.assertEqual(len(self.spawner.workers()), 2)
        self.clock.advance(0.01)
        restarted = self.spawner.workers()[2]
        self.assertEqual(restarted.option("--node-id"), "m-w0.1")
        self.assertEqual(restarted.child_fds[3], 10)

        delays = []
        for generation in range(2, 5):
            self.spawner.workers()[-1].end(exit_code=3)
            event = self.logged("restarting it in")[-1]
            delays.append(event["delay"])
            self.clock.advance(event["delay"])
            self.assertEqual(
                self.spawner.workers()[-1].option("--node-id"), "m-w0.{}".format(generation)
            )
        self.assertEqual(delays, [1.0, 2.0, 4.0])
        self.assertEqual(self.logged("restarting it in")[-1]["status"], "exited with status 3")

        self.clock.advance(10)
        self.spawner.workers()[-1].end(exit_code=0)
        self.assertEqual(self.logged("restarting it in")[-1]["delay"], 0.5)

    def test_a_worker_that_cannot_be_spawned_is_tried_again(self):
        """When starting a process fails, the failure is logged and the start
        retried with the same backoff."""
        master = self.master()
        self.spawner.failures = 1
        self.start(master)
        self.assertEqual([s.option("--node-id") for s in self.spawner.workers()], ["m-w1"])
        (event,) = self.logged("could not start")
        self.assertEqual((event["name"], event["delay"]), ("w0", 0.5))
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        self.clock.advance(0.5)
        self.assertEqual(
            [s.option("--node-id") for s in self.spawner.workers()], ["m-w1", "m-w0"]
        )

    def test_restart_delay_is_capped(self):
        """The backoff stops growing at 30 s."""
        self.assertEqual([restart_delay(n) for n in range(3)], [0.5, 1.0, 2.0])
        self.assertEqual(restart_delay(6), 30.0)
        self.assertEqual(restart_delay(1000), 30.0)

    def test_stop_closes_the_ports_and_terminates_every_worker(self):
        """Stopping closes the master's sockets, sends SIGTERM to every
        worker and finishes once they have all exited; a pending restart is
        cancelled."""
        master = self.master(count=3)
        self.start(master)
        w0, w1, w2 = self.spawner.workers()
        w2.end(signal_number=signal.SIGSEGV)
        d = master.stopService()
        self.assertEqual([p.listening for p in self.binder.ports.values()], [False, False])
        self.assertEqual((w0.process.signals, w1.process.signals), (["TERM"], ["TERM"]))
        self.assertNoResult(d)
        w0.end()
        self.assertNoResult(d)
        w1.end(signal_number=signal.SIGTERM)
        self.assertIsNone(self.successResultOf(d))
        self.clock.advance(60)
        self.assertEqual(len(self.spawner.workers()), 3)
        self.assertEqual(
            [e["status"] for e in self.logged("worker {worker} (pid {pid}) {status}")],
            ["exited with status 0", "was killed by SIGTERM"],
        )

    def test_workers_that_do_not_finish_are_killed(self):
        """A worker still running stop_timeout seconds after SIGTERM gets SIGKILL."""
        master = self.master(stop_timeout=7.0)
        self.start(master)
        w0, w1 = self.spawner.workers()
        d = master.stopService()
        w0.end()
        self.clock.advance(6.9)
        self.assertEqual(w1.process.signals, ["TERM"])
        self.clock.advance(0.1)
        self.assertEqual(w1.process.signals, ["TERM", "KILL"])
        self.assertEqual(self.logged("did not finish")[0]["name"], "w1")
        self.assertNoResult(d)
        w1.end(signal_number=signal.SIGKILL)
        self.successResultOf(d)

    def test_worker_logs_join_the_master_s_log(self):
        """A worker's JSON log events are published in the master's log with
        the worker's name; other output is logged as text, stderr as warnings."""
        master = self.master()
        self.start(master)
        w0 = self.spawner.workers()[0]
        line = eventAsJSON(
            {
                "log_format": "{client} connected",
                "client": "m-w0-1",
                "log_level": LogLevel.info,
                "log_namespace": "broadcaster.protocols.connection",
                "log_time": 12.5,
            }
        ).encode("utf-8") + b"\n"
        before = len(self.log)
        w0.protocol.childDataReceived(1, line[:10])
        self.assertEqual(len(self.log), before)
        w0.protocol.childDataReceived(1, line[10:] + b"not json\n")
        w0.protocol.childDataReceived(2, b"Traceback (most recent call last):\n")
        relayed, text, err = list(self.log)[before:]
        self.assertEqual(
            (relayed["client"], relayed["worker"], relayed["log_system"], relayed["log_time"]),
            ("m-w0-1", "w0", "w0 broadcaster.protocols.connection#info", 12.5),
        )
        self.assertEqual(relayed["log_level"], LogLevel.info)
        self.assertEqual((text["worker"], text["line"]), ("w0", "not json"))
        self.assertEqual(err["log_level"], LogLevel.warn)
        self.assertEqual(err["line"], "Traceback (most recent call last):")


class PrivateRedisTests(MasterTestCase):
    def ready(self, master):
        """Make the private Redis's socket accept connections."""
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(server.close)
        server.bind(master.redis_socket)
        server.listen(5)

    def test_command_line_and_the_workers_wait_for_it(self):
        """Without --redis the master runs redis-server on a Unix socket in a
        temporary directory, without persistence, and starts the workers,
        pointed at it, once it accepts connections."""
        master = self.master(redis_server="/usr/bin/redis-server")
        self.start(master)
        (redis,) = self.spawner.redis()
        directory = master.redis_directory
        self.assertTrue(os.path.isdir(directory))
        sock = os.path.join(directory, "redis.sock")
        self.assertEqual(master.redis_socket, sock)
        self.assertEqual(
            redis.args,
            [
                "/usr/bin/python3", "-c", REDIS_LAUNCHER, str(os.getpid()),
                "/usr/bin/redis-server", "--port", "0", "--unixsocket", sock,
                "--unixsocketperm", "700", "--save", "", "--appendonly", "no",
                "--dir", directory,
            ],
        )
        self.assertEqual(redis.args[4:], redis_server_argv("/usr/bin/redis-server", directory))
        self.clock.advance(0.05)
        self.clock.advance(0.05)
        self.assertEqual(self.spawner.workers(), [])
        self.ready(master)
        self.clock.advance(0.05)
        w0, w1 = self.spawner.workers()
        self.assertEqual(w0.option("--redis"), "unix:" + sock)
        self.assertEqual(w1.option("--redis"), "unix:" + sock)

    def test_stop_ends_the_workers_then_redis(self):
        """On stop Redis is sent SIGTERM only once every worker has exited
        (they say goodbye through it), and its directory is removed."""
        master = self.master(redis_server="/usr/bin/redis-server")
        self.start(master)
        self.ready(master)
        self.clock.advance(0.05)
        (redis,) = self.spawner.redis()
        w0, w1 = self.spawner.workers()
        d = master.stopService()
        self.assertEqual(redis.process.signals, [])
        w0.end()
        w1.end()
        self.assertEqual(redis.process.signals, ["TERM"])
        self.assertNoResult(d)
        self.assertTrue(os.path.isdir(master.redis_directory))
        redis.end()
        self.successResultOf(d)
        self.assertFalse(os.path.exists(master.redis_directory))

    def test_a_redis_that_never_answers_does_not_block_the_workers(self):
        """If Redis does not accept connections within 10 s the workers are
        started anyway, with an error: they keep trying to reach it."""
        master = self.master(redis_server="/usr/bin/redis-server")
        self.start(master)
        self.clock.pump([0.05] * 199)
        self.assertEqual(self.spawner.workers(), [])
        self.clock.pump([0.05] * 2)
        self.assertEqual(len(self.spawner.workers()), 2)
        self.assertTrue(self.logged("did not accept connections"))

    def test_a_dead_redis_is_restarted(self):
        """A private Redis that dies is logged with its last output and restarted."""
        master = self.master(redis_server="/usr/bin/redis-server")
        self.start(master)
        self.ready(master)
        self.clock.advance(0.05)
        (redis,) = self.spawner.redis()
        redis.protocol.childDataReceived(1, b"# Server initialized\n# Out of memory\n")
        redis.end(signal_number=signal.SIGKILL)
        (event,) = self.logged("private redis-server (pid {pid})")
        self.assertEqual(event["status"], "was killed by SIGKILL")
        self.assertIn("# Out of memory", event["output"])
        self.clock.advance(0.5)
        first, again = self.spawner.redis()
        self.assertEqual(again.args, first.args)
        self.assertEqual(len(self.spawner.workers()), 2)


class RedisLauncherTests(TestCase):
    @inlineCallbacks
    def launch(self, parent_pid):
        process = CollectingProcess()
        argv = [sys.executable, "-c", REDIS_LAUNCHER, str(parent_pid), "/bin/echo", "launched"]
        reactor.spawnProcess(process, sys.executable, argv, env=dict(os.environ))
        result = yield process.ended()
        return result

    @inlineCallbacks
    def test_it_becomes_the_program(self):
        """The launcher execs the program it is given, arguments and all."""
        out, err, status = yield self.launch(os.getpid())
        self.assertEqual((out, err, status), ("launched\n", "", 0))

    @inlineCallbacks
    def test_not_if_the_master_is_gone(self):
        """If its parent is not the master any more, it starts nothing."""
        out, err, status = yield self.launch(os.getpid() + 1000000)
        self.assertEqual((out, err, status), ("", "", 0))


class OptionsTests(SynchronousTestCase):
    def test_workers_without_redis_need_redis_server(self):
        """--workers without --redis and without redis-server installed is a
        usage error that says what to do."""
        self.patch(workers, "find_redis_server", lambda: None)
        self.patch(sys.modules["broadcaster.service.options"], "find_redis_server", lambda: None)
        error = self.assertRaises(UsageError, parse, "--workers", "2")
        self.assertEqual(
            str(error),
            "--workers needs redis-server (apt-get install redis-server) or --redis URL",
        )
        self.assertEqual(NO_REDIS, str(error))
        options = parse("--workers", "2", "--redis", "redis://127.0.0.1:6379/0")
        self.assertIsNone(options["redis-server"])
        self.assertEqual(parse()["workers"], 1)

    def test_only_tcp_and_ssl_ports_are_shared(self):
        """--workers refuses a unix: port, naming the flag and why."""
        error = self.assertRaises(
            UsageError,
            parse,
            *["--workers", "2", "--redis", "redis://r", "--line-port", "unix:/tmp/l.sock"],
        )
        self.assertIn("--line-port 'unix:/tmp/l.sock'", str(error))
        self.assertIn("tcp:, tcp6: and ssl:", str(error))
        self.assertIsNone(workers.sharing_problem("tcp6:9999:interface=\\:\\:1"))
        self.assertIsNone(workers.sharing_problem("ssl:9443:privateKey=k.pem"))
        self.assertIsNone(workers.sharing_problem("9999"))
        self.assertIsNotNone(workers.sharing_problem("systemd:domain=INET:index=0"))

    def test_worker_fds(self):
        """--worker-fds names inherited sockets; a worker's node id may end in
        -w<i>[.<restarts>], which the user's may not."""
        options = parse("--worker-fds", "port=3,image=4", "--node-id", "ab12-w1.2")
        self.assertEqual(options["worker-fds"], {"port": 3, "image": 4})
        self.assertEqual(options["node-id"], "ab12-w1.2")
        self.assertEqual(parse_worker_fds("line=5,metrics=6"), {"line": 5, "metrics": 6})
        for bad in ["port", "port=x", "ports=3", "port=3,port=4"]:
            self.assertRaises(ValueError, parse_worker_fds, bad)
        self.assertRaises(UsageError, parse, "--worker-fds", "port=x")
        self.assertRaises(UsageError, parse, "--node-id", "ab12-w1")
        self.assertRaises(UsageError, parse, "--worker-fds", "port=3", "--node-id", "a-b-w1")
        error = self.assertRaises(
            UsageError, parse, "--workers", "2", "--redis", "redis://r", "--worker-fds", "port=3"
        )
        self.assertIn("internal", str(error))

    def test_make_service_returns_the_master(self):
        """makeService with --workers 2 builds the master: it listens on every
        port the options name (with the listen backlog) and hands the workers
        the user's options (--redis as parsed, without a password)."""
        args = [
            "--workers", "2", "--redis", "redis://127.0.0.1:6379", "--port", "tcp:9001",
            "--line-port", "none", "--metrics-port", "tcp:9100", "--drain-timeout", "3",
        ]
        master = makeService(parse(*args), reactor=MemoryReactorClock())
        self.assertIsInstance(master, MasterService)
        self.assertEqual(master.count, 2)
        self.assertEqual(
            [(name, description) for name, description, _ in master._listeners],
            [
                ("port", "tcp:9001:backlog=1024"),
                ("image", "tcp:9998:backlog=1024"),
                ("metrics", "tcp:9100:backlog=1024"),
            ],
        )
        self.assertEqual(master._worker_args, [*args[:3], "redis://127.0.0.1:6379/0", *args[4:]])
        self.assertEqual(master.stop_timeout, 8.0)
        # Every --redis server, in order.
        sharded = makeService(
            parse(*args, "--redis", "redis://127.0.0.1:6380"), reactor=MemoryReactorClock()
        )
        self.assertEqual(sharded._worker_args[-2:], ["--redis", "redis://127.0.0.1:6380/0"])
        self.assertEqual(sharded._worker_args[3], "redis://127.0.0.1:6379/0")
        # The workers are given one password (in their environment).
        with self.assertRaises(UsageError):
            parse(*args, "--redis", "redis://:pw@127.0.0.1:6380")
        self.assertIsNone(master._redis_server)
        self.assertRegex(master.node_id, "^[0-9a-f]{6}$")
        with_webhook = makeService(
            parse(*args, "--node-id", "web", "--webhook", "https://hooks.example/x"),
            reactor=MemoryReactorClock(),
        )
        self.assertEqual((with_webhook.node_id, with_webhook.stop_timeout), ("web", 11.0))


# A worker's side


def listening_socket():
    """A non-blocking listening loopback socket, as the master passes on."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(50)
    sock.setblocking(False)
    return sock


class AdoptionTests(TestCase):
    @inlineCallbacks
    def start_worker(self, port_description):
        """
        Build and start a worker adopting a fresh listening socket; the port
        number in ``port_description`` is never listened on.
        """
        sock = listening_socket()
        self.addCleanup(sock.close)
        options = parse(
            "--port", port_description, "--image-port", "none", "--line-port", "none",
            "--worker-fds", "port={}".format(os.dup(sock.fileno())), "--node-id", "m-w0",
        )
        service = makeService(options, reactor=reactor)
        service.privilegedStartService()
        service.startService()
        self.addCleanup(service.stopService)
        port = yield service.web_endpoint.when_listening()
        self.assertEqual(port.getHost().port, sock.getsockname()[1])
        return sock.getsockname()[1]

    @inlineCallbacks
    def test_a_worker_adopts_the_inherited_socket(self):
        """With --worker-fds the server accepts on the inherited socket instead
        of listening on --port."""
        port = yield self.start_worker("tcp:1:interface=127.0.0.1")
        client = yield connect_client(self, port)
        announcement = yield client.next_text()
        self.assertRegex(announcement, r"^m-w0-\d+ connected$")

    @inlineCallbacks
    def test_tls_is_the_worker_s(self):
        """An ssl: port is a plain socket in the master; the worker serves TLS
        on it with the certificate --port names."""
        import websocket as websocket_client

        directory = self.mktemp()
        os.makedirs(directory)
        key, cert = self_signed_certificate(directory)
        port = yield self.start_worker("ssl:1:privateKey={}:certKey={}".format(key, cert))

        def chat():
            ws = websocket_client.create_connection(
                "wss://127.0.0.1:{}/".format(port), timeout=10, sslopt={"ca_certs": cert}
            )
            try:
                greeting = ws.recv()
                ws.send("over tls")
                return greeting, ws.recv()
            finally:
                ws.close()

        greeting, echo = yield deferToThread(chat)
        self.assertRegex(greeting, r"^m-w0-\d+ connected$")
        self.assertEqual(echo, "over tls")


class _RecordingReactor:
    """The real reactor, except that stop() is only recorded."""

    def __init__(self) -> None:
        self.stopped = False

    def addReader(self, reader):
        reactor.addReader(reader)

    def removeReader(self, reader):
        reactor.removeReader(reader)

    def stop(self):
        self.stopped = True


class MasterWatchTests(TestCase):
    @inlineCallbacks
    def test_a_worker_stops_when_its_master_is_gone(self):
        """A worker whose standard input (the master's pipe) ends stops its
        reactor, which drains its clients as SIGTERM would."""
        read_end, write_end = os.pipe()
        self.addCleanup(os.close, read_end)
        fake = _RecordingReactor()
        watch = MasterWatchService(fake, read_end)
        watch.startService()
        self.addCleanup(lambda: watch.running and watch.stopService())
        os.close(write_end)
        yield wait_for(lambda: fake.stopped, what="the worker to notice")


# The real thing


def alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open("/proc/{}/stat".format(pid)) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def node_of(member_id: str) -> str:
    return member_id.rpartition("-")[0]


STARTED = re.compile(r"worker (w\d+) started \(pid (\d+), node ([\w.-]+)\)")
REDIS_STARTED = re.compile(r"private redis-server started \(pid (\d+)\) on unix:(\S+)")


class EndToEndTests(TestCase):
    timeout = 180

    def output(self):
        return b"".join(self.process._out).decode("utf-8", "replace")

    def started(self):
        """``(worker, pid, node)`` for every worker start the master logged."""
        return [(w, int(pid), node) for w, pid, node in STARTED.findall(self.output())]

    @inlineCallbacks
    def start_master(self, *args):
        require_redis_server()
        port = free_port()
        env = checkout_env()
        argv = [
            sys.executable, "-c", TWISTD, "-n", "--pidfile=", "broadcaster",
            "--port", "tcp:{}:interface=127.0.0.1".format(port),
            "--image-port", "none", "--line-port", "none", *args,
        ]
        self.process = process = CollectingProcess()
        reactor.spawnProcess(process, sys.executable, argv, env=env)
        self.pids = set()

        def reap():
            # Whatever the test did, leave no process or directory behind.
            for pid in self.pids | {pid for _, pid, _ in self.started()}:
                if alive(pid):
                    os.kill(pid, signal.SIGKILL)
            if process.result is None:
                process.transport.signalProcess("KILL")
            for _, path in REDIS_STARTED.findall(self.output()):
                shutil.rmtree(os.path.dirname(path), ignore_errors=True)
            return process.ended()

        self.addCleanup(reap)
        yield wait_for(
            lambda: self.output().count("connected to Redis at") >= 2 or process.result is not None,
            timeout=60,
            what="two workers connected to Redis",
        )
        self.assertIsNone(process.result, process.result)
        self.assertTrue(listening(port))
        (redis_pid, redis_socket), = REDIS_STARTED.findall(self.output())
        self.pids.add(int(redis_pid))
        return port, int(redis_pid), redis_socket

    @inlineCallbacks
    def next_text(self, client, ignore):
        """The client's next text message that is not in ``ignore``."""
        while True:
            text = yield client.next_text()
            if text not in ignore:
                return text

    @inlineCallbacks
    def connect_until(self, port, clients, node, ignore=(), limit=60):
        """
        Connect plain clients one at a time until one lands on ``node``, each
        newcomer's arrival heard by every client already there (whichever
        worker it is on).  Returns the new ``(client, id)`` pairs.

        The kernel gives a connection to whichever worker takes it first:
        long runs on one worker happen (more so on a busy machine), hence
        the generous bound.

        :param ignore: messages that may come first (a dead worker's
            clients announced as gone by a worker that learnt it late).
        """
        added = []
        for _ in range(limit):
            client = yield connect_client(self, port)
            announcement = yield self.next_text(client, ignore)
            self.assertTrue(announcement.endswith(" connected"), announcement)
            member_id = announcement.split()[0]
            for earlier, _ in clients:
                heard = yield self.next_text(earlier, ignore)
                self.assertEqual(heard, announcement)
            clients.append((client, member_id))
            added.append((client, member_id))
            if node_of(member_id) == node:
                return added
        raise FailTest(
            "no client reached {} in {} connections: {}".format(
                node, limit, [member_id for _, member_id in added]
            )
        )

    @inlineCallbacks
    def test_workers_share_the_port_restart_and_stop(self):
        """Two workers share the port and deliver each other's messages; a
        SIGKILLed worker is restarted; SIGTERM drains every client with 1001,
        the master exits 0 and no worker or redis-server is left."""
        port, redis_pid, redis_socket = yield self.start_master(
            "--workers", "2", "--node-id", "m1", "--drain-timeout", "5", "--node-timeout", "2"
        )
        self.assertEqual(
            [(w, node) for w, _, node in self.started()], [("w0", "m1-w0"), ("w1", "m1-w1")]
        )
        pids = {w: pid for w, pid, _ in self.started()}

        # Clients on both workers hear each other.
        clients = []
        yield self.connect_until(port, clients, "m1-w0")
        yield self.connect_until(port, clients, "m1-w1")
        if not any(node_of(i) == "m1-w0" for _, i in clients):
            yield self.connect_until(port, clients, "m1-w0")
        sender = next(c for c, i in clients if node_of(i) == "m1-w1")
        sender.send_text("across workers")
        for client, _ in clients:
            text = yield client.next_text()
            self.assertEqual(text, "across workers")

        # SIGKILL w1: the master restarts it under a new node id, and the
        # clients of w0 hear that the dead worker's clients are gone.
        os.kill(pids["w1"], signal.SIGKILL)
        dead = [(c, i) for c, i in clients if node_of(i) == "m1-w1"]
        clients = [(c, i) for c, i in clients if node_of(i) == "m1-w0"]
        for client, _ in dead:
            clean, code, _ = yield client.closed
            self.assertFalse(clean)
        yield wait_for(
            lambda: len(self.started()) == 3, timeout=30, what="the master to restart w1"
        )
        self.assertIn(
            "worker w1 (pid {}, node m1-w1) was killed by SIGKILL".format(pids["w1"]), self.output()
        )
        (_, new_pid, new_node) = self.started()[2]
        self.assertEqual(new_node, "m1-w1.1")
        self.assertFalse(alive(pids["w1"]))
        gone = sorted("{} disconnected".format(i) for _, i in dead)
        for client, _ in clients:
            heard = []
            for _ in gone:
                text = yield client.next_text(timeout=20)
                heard.append(text)
            self.assertEqual(sorted(heard), gone)
        yield wait_for(
            lambda: "connected to Redis at unix:{} as node m1-w1.1".format(redis_socket)
            in self.output(),
            timeout=30,
            what="the new w1 to join",
        )
        # Each worker announces the dead one's clients as gone when the
        # news reaches it through Redis; a client that joins the new w1
        # first may hear them too.
        yield self.connect_until(port, clients, "m1-w1.1", ignore=set(gone))
        sender = next(c for c, i in clients if node_of(i) == "m1-w1.1")
        sender.send_text("after the restart")
        for client, _ in clients:
            text = yield self.next_text(client, set(gone))
            self.assertEqual(text, "after the restart")

        # SIGTERM: every client is told 1001, the master exits 0 in time.
        started = reactor.seconds()
        self.process.transport.signalProcess("TERM")
        for client, _ in clients:
            clean, code, _ = yield client.closed
            self.assertEqual((clean, code), (True, 1001))
        out, err, status = yield self.process.ended()
        self.assertEqual(status, 0, out + err)
        self.assertLess(reactor.seconds() - started, 5)
        self.assertIn("stopping 2 workers", out)
        self.assertEqual(out.count("Server Shut Down"), 3, out)
        for pid in [pids["w0"], pids["w1"], new_pid, redis_pid]:
            self.assertFalse(alive(pid), "process {} is still there".format(pid))
        self.assertFalse(os.path.exists(os.path.dirname(redis_socket)))

    @inlineCallbacks
    def test_a_killed_master_leaves_nothing_behind(self):
        """A master killed with SIGKILL cannot stop anything: its workers see
        their standard input end and shut down (draining their clients), and
        Linux sends its private redis-server SIGTERM."""
        if not sys.platform.startswith("linux"):
            raise SkipTest("the private redis-server's parent-death signal is Linux's")
        port, redis_pid, redis_socket = yield self.start_master("--workers", "2")
        self.addCleanup(shutil.rmtree, os.path.dirname(redis_socket), True)
        pids = [pid for _, pid, _ in self.started()] + [redis_pid]
        client = yield connect_client(self, port)
        yield client.next_text()
        self.process.transport.signalProcess("KILL")
        yield self.process.ended()
        clean, code, _ = yield client.closed
        self.assertEqual((clean, code), (True, 1001))
        yield wait_for(
            lambda: not any(alive(pid) for pid in pids), timeout=30, what="workers and Redis to go"
        )
